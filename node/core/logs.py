"""Logging for every process: one format, one line per record, no patient data.

``configure_logging`` is called by each process the node runs: ``ainode serve`` (its receivers
inherit it across the fork), an embedded job's child, ``ainode worker`` (Celery's pool processes
inherit it) and ``ainode demo``. It makes two promises where each record is *created* (a log
record factory), so they hold for every handler, whoever installed it (uvicorn's, Celery's, ours):

- **One record, one line.** Control characters in a message (CR, LF, ESC, the Unicode line
  separators, bidirectional overrides) are escaped, so no value can forge a log line. Tracebacks
  keep their lines, with each exception's message escaped.
- **The DICOM libraries' words are withheld.** pydicom, pynetdicom and highdicom quote element
  values in their messages, warnings and exceptions (highdicom's person-name check quotes a Patient
  Name without ``^``), so what they log keeps its level, source and format string and loses its
  values; their warnings and the messages of exceptions raised in them keep only category, file
  and line. Python warnings are routed through logging (``py.warnings``) for this.

Our own log lines are written not to carry patient data (UIDs, AE titles, counts and the type
names of errors, never a library's error text); what the libraries say is not ours to trust.
Uncaught exceptions (main and other threads) go through logging too, rather than straight to
stderr.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import sys
import threading
import traceback
import warnings
from types import TracebackType
from typing import Any, Callable

from node.core.dicom import quiet_pynetdicom

LOG_FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
WITHHELD = "<withheld>"
# Libraries that read and write DICOM data sets: their text may quote element values.
DICOM_LIBRARIES = ("pydicom", "pynetdicom", "highdicom")
# Characters that could end a line or disguise text on a terminal: C0/C1 controls, DEL, the
# Unicode line and paragraph separators and the bidirectional marks, embeddings and isolates.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# A printf-style conversion in a format string (``%s``, ``%(name)r``, ``%-5.2f``; ``%%`` kept).
_CONVERSION = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa%]")
_WARNINGS_LOGGER = "py.warnings"
_WARNING_FORMAT = "%s at %s: %s"
# How logging.captureWarnings (which Celery turns on) writes a warning: "FILE:LINE: CATEGORY: TEXT".
_CAPTURED_WARNING = re.compile(r"^(?P<file>.*?):(?P<line>\d+): (?P<category>\w+): ", re.DOTALL)


def escape(text: str) -> str:
    """``text`` on one line: control characters written as escapes (``\\n``, ``\\x1b``, ``\\u2028``)."""

    def written(match: re.Match[str]) -> str:
        char = match.group()
        if char in _NAMED:
            return _NAMED[char]
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROL.sub(written, text)


def _package_folders(names: tuple[str, ...]) -> tuple[str, ...]:
    # find_spec of a top-level package locates it without importing it.
    folders = []
    for name in names:
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            folders.append(os.path.join(os.path.realpath(folder), ""))
    return tuple(folders)


_DICOM_FOLDERS = _package_folders(DICOM_LIBRARIES)
# Our own packages: a library's warning raised with a stacklevel may be attributed to our caller.
_OWN_FOLDERS = _package_folders(("node", "workers"))


@functools.lru_cache(maxsize=4096)
def _in(path: str | None, folders: tuple[str, ...]) -> bool:
    return bool(path) and os.path.realpath(path).startswith(folders)


def from_dicom_library(path: str | None) -> bool:
    """True when the source file ``path`` belongs to pydicom, pynetdicom or highdicom."""
    return _in(path, _DICOM_FOLDERS)


def _dicom_logger(name: str) -> bool:
    return any(name == library or name.startswith(library + ".") for library in DICOM_LIBRARIES)


# The modules between a warnings.warn call and the record it becomes.
_PLUMBING = frozenset(os.path.realpath(m.__file__ or "") for m in (warnings, logging, sys.modules[__name__]))


def _warning_origin() -> str | None:
    """The file that called warnings.warn, found on the stack: a warning's own filename is its
    caller's (as far up as its stacklevel says), which may be any code calling the library."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith("<") and os.path.realpath(path) not in _PLUMBING:
            return path
        frame = frame.f_back
    return None


def _short(path: str) -> str:
    """The file as ``package/module.py`` (a site-packages path says nothing more, and is long)."""
    real = os.path.realpath(path)
    for folder in _DICOM_FOLDERS + _OWN_FOLDERS:
        if real.startswith(folder):
            return os.path.relpath(real, os.path.dirname(os.path.dirname(folder)))
    return os.path.basename(path)


def _template(record: logging.LogRecord) -> str:
    """A DICOM library's record without its values: the format string with every argument withheld."""
    if isinstance(record.msg, str) and record.args:
        text = _CONVERSION.sub(lambda m: "%" if m.group() == "%%" else WITHHELD, record.msg)
    else:  # a message formatted before logging (an f-string) may hold anything
        text = WITHHELD
    return f"{text} [{_short(record.pathname)}:{record.lineno}; values withheld, they may be patient data]"


def _error_message(error: BaseException) -> str:
    """An exception's message, escaped; withheld when it was raised inside a DICOM library."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None and from_dicom_library(tb.tb_frame.f_code.co_filename):
        where = _short(tb.tb_frame.f_code.co_filename)
        return f"{WITHHELD} (raised in {where}; the message may hold patient data)"
    try:
        return escape(str(error))
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the record
        return "<message unprintable>"


def _links(error: BaseException) -> list[tuple[BaseException, str]]:
    """The exception and those it came from, the first cause first, each with the sentence that
    links it to the next one (as Python prints them)."""
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = error
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "The above exception was the direct cause of the following exception:"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "During handling of the above exception, another exception occurred:"
        else:
            current = None
    # chain[i]'s link describes how chain[i - 1] follows from chain[i]; print oldest first.
    ordered = []
    for index in range(len(chain) - 1, -1, -1):
        link = chain[index + 1][1] if index + 1 < len(chain) else ""
        ordered.append((chain[index][0], link))
    return ordered


def exception_text(error: BaseException) -> str:
    """A traceback like Python's, with each exception's message escaped (or withheld, see above)."""
    parts = []
    for position, (exc, link) in enumerate(_links(error)):
        if position:
            parts.append(f"\n{link}\n\n")
        if exc.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(exc.__traceback__))
        parts.append(f"{type(exc).__module__}.{type(exc).__qualname__}: {_error_message(exc)}\n")
    # Frame lines quote our and the libraries' source code, never data; escaped all the same.
    return "\n".join(escape(line) for line in "".join(parts).rstrip("\n").split("\n"))


def safe_record(record: logging.LogRecord) -> logging.LogRecord:
    """Make ``record`` safe to write: its message rendered, escaped, values of DICOM libraries
    withheld; its traceback rendered the same way (and the exception itself dropped, so no
    handler can print it raw)."""
    if getattr(record, "ainode_safe", False):
        return record
    try:
        if from_dicom_library(record.pathname) or _dicom_logger(record.name):
            text = _template(record)
        elif record.name == _WARNINGS_LOGGER and record.msg is not _WARNING_FORMAT:
            text = _captured_warning(record.getMessage())
        else:
            text = record.getMessage()
    except Exception:  # noqa: BLE001 - arguments that do not fit the format: keep the format only
        text = f"{record.msg!s} (arguments did not fit the format)"
    record.msg, record.args = escape(text), ()
    if record.exc_info and record.exc_info[1] is not None:
        record.exc_text = exception_text(record.exc_info[1])
    record.exc_info = None
    if record.stack_info:
        record.stack_info = "\n".join(escape(line) for line in record.stack_info.split("\n"))
    record.ainode_safe = True
    return record


def _warning_text(category: str, filename: str, lineno: int | str, text: str) -> tuple[str, str, str]:
    """The arguments of a warning's record; the text withheld when a DICOM library raised it (or
    it is attributed to our code, where a library's warning lands by its stacklevel)."""
    if from_dicom_library(filename) or _in(filename, _OWN_FOLDERS) or from_dicom_library(_warning_origin()):
        text = f"{WITHHELD} (the warning's text may hold patient data)"
    return category, f"{_short(filename)}:{lineno}", text


def _captured_warning(formatted: str) -> str:
    """A warning that logging.captureWarnings wrote (Celery turns it on), under the same rule."""
    match = _CAPTURED_WARNING.match(formatted)
    if match is None:
        return f"{WITHHELD} (a warning in an unknown form)"
    text = formatted[match.end() :].split("\n", 1)[0]
    return _WARNING_FORMAT % _warning_text(match["category"], match["file"], match["line"], text)


def _safe_factory(previous: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return safe_record(previous(*args, **kwargs))

    make.ainode_safe = True  # type: ignore[attr-defined]
    return make


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for every process: the warning becomes a ``py.warnings`` record;
    the text of one raised in (or on behalf of) a DICOM library is withheld."""
    args = _warning_text(category.__name__, filename, lineno, str(message))
    logging.getLogger(_WARNINGS_LOGGER).warning(_WARNING_FORMAT, *args)


def _log_uncaught(exc_type: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, error, tb)
        return
    logging.getLogger("ainode").critical("uncaught %s", exc_type.__name__, exc_info=(exc_type, error, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    name = args.thread.name if args.thread else "?"
    logging.getLogger("ainode").critical(
        "uncaught %s in thread %s", args.exc_type.__name__, name, exc_info=(args.exc_type, args.exc_value, None)
    )


def configure_logging(level: int | str = logging.INFO) -> None:
    """Set up logging for this process (idempotent): a stderr handler in LOG_FORMAT unless one is
    there, safe records (see the module docstring), warnings and uncaught exceptions through
    logging, pynetdicom and pydicom quiet."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(level)
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "ainode_safe", False):
        logging.setLogRecordFactory(_safe_factory(factory))
    warnings.showwarning = show_warning
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    quiet_pynetdicom()
    # highdicom's INFO lines narrate each object it builds (20 per job), values withheld at that.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
