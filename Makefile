# The README's two set-up commands are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-test demo test

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh --test

demo: install
	$(VENV)/bin/ainode demo --out demo-out

test: install-test
	bash scripts/run_tests.sh
