"""The safe log records of node.core.logs, in a process of their own (it changes process-wide
logging state): escaped control characters, the DICOM libraries' values withheld, whichever
handler writes the record and whichever way a warning arrives."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import REPO_ROOT

NAME = "王小明"
FORGED = "\\r\\nFAKE 2024-01-01 00:00:00 1 ainode ERROR forged"

SCRIPT = textwrap.dedent(
    f'''
    import logging, sys, warnings
    from node.core.logs import configure_logging
    configure_logging()
    import pydicom
    from highdicom.valuerep import check_person_name
    from pydicom.valuerep import PersonName

    name = "{NAME}{FORGED}"
    log = logging.getLogger("ainode.test")
    log.warning("our own line with a value: %s", name)           # escaped, kept
    check_person_name(name)                                       # highdicom's warning: withheld
    logging.getLogger("pydicom").error("bad value %r", name)      # a DICOM library's logger: withheld
    logging.getLogger("pydicom").error(f"bad value {{name}}")     # pre-formatted: withheld whole
    # A library logger with its own handler (as uvicorn has), not propagating to the root.
    own = logging.getLogger("uvicorn.error")
    own.addHandler(logging.StreamHandler(sys.stderr))
    own.propagate = False
    own.error("request for %s", name)
    try:
        pydicom.Dataset().__getattr__(name)                       # raised inside pydicom: withheld
    except AttributeError:
        log.exception("lookup failed")
    logging.captureWarnings(True)                                 # what Celery does
    check_person_name(name + " again")
    warnings.warn("a library's own warning")                      # not a DICOM library: kept
    raise RuntimeError(name)                                      # uncaught: through logging, escaped
    '''
)


def run_script() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


def test_records_are_one_line_and_carry_no_dicom_values():
    run = run_script()
    assert run.returncode == 1, run.stderr
    out = run.stderr
    lines = out.split("\n")
    # Only our own code's lines (and another library's) keep the value, escaped, each on one line;
    # no line of a DICOM library's says the name.
    with_name = [line for line in lines if NAME in line]
    assert len(with_name) == 3, with_name
    assert with_name[0].endswith(f"ainode.test WARNING our own line with a value: {NAME}{FORGED}")
    assert with_name[1] == f"request for {NAME}{FORGED}"  # uvicorn's own handler: escaped all the same
    assert with_name[2] == f"builtins.RuntimeError: {NAME}{FORGED}"
    assert "\r" not in out
    assert not [line for line in lines if line.startswith("FAKE")]
    # Where the withheld things came from is still said.
    # highdicom's warning names its caller (stacklevel 2), here the script: found by the stack.
    assert out.count("UserWarning at <string>:") == 3 and out.count("<withheld> (the warning's text") == 2
    assert "pydicom ERROR bad value <withheld> [" in out
    assert "raised in pydicom/dataset.py" in out
    assert "a library's own warning" in out
    assert "ainode CRITICAL uncaught RuntimeError" in out
