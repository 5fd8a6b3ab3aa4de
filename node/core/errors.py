"""Errors as the log and the job record show them: the type and the message, never patient data.

A library's message may quote the value it choked on (a patient name that failed to decode, a
description): ``describe_error`` keeps the words and replaces every quoted value that is not a
DICOM keyword, a tag, a UID or a number with '…'. ``log_traceback`` writes where an error came
from (the frames, which hold code, not data) and that redacted message, so a traceback in the
log carries no patient data either.
"""

from __future__ import annotations

import logging
import re
import traceback

from pydicom.datadict import keyword_dict

# A quoted value: '...' or "..." (not across lines).
_QUOTED = re.compile(r"""(['"])([^'"\n]{0,200}?)\1""")
# Values safe to show: UIDs, numbers, tags like (0028,0030), transfer syntax names, lower-case
# identifiers (analysis names, options: patient names are upper case or carry '^').
_SAFE = re.compile(
    r"[0-9]+(\.[0-9]+)*|-?[0-9.eE+-]+|\(?[0-9A-Fa-f]{4},\s?[0-9A-Fa-f]{4}\)?"
    r"|[A-Za-z][A-Za-z0-9 _-]{0,40} Endian|[a-z][a-z0-9_.-]{0,40}"
)
# Python names a message may quote ('FileDataset' object has no attribute 'PixelSpacing').
_CODE_NAMES = frozenset({"FileDataset", "Dataset", "DataElement", "NoneType", "str", "int", "float", "list", "bytes"})


def _redact(match: re.Match[str]) -> str:
    quote, value = match.group(1), match.group(2)
    if value in keyword_dict or value in _CODE_NAMES or _SAFE.fullmatch(value):
        return match.group(0)
    return f"{quote}…{quote}"


def redact(text: str) -> str:
    """``text`` with quoted values that could be patient data replaced by '…'."""
    return _QUOTED.sub(_redact, text)


def describe_error(err: BaseException, limit: int = 500) -> str:
    """'TypeName: message' with quoted values redacted (the message never empty)."""
    text = redact(str(err).strip()) or "(no message)"
    return f"{type(err).__name__}: {text}"[:limit]


def log_traceback(log: logging.Logger, what: str, err: BaseException) -> None:
    """Log ``what`` (which should include ``describe_error(err)``) at ERROR with the error's frames
    (no exc_info: the standard traceback would print the message as raised)."""
    frames = "".join(traceback.format_tb(err.__traceback__))
    log.error("%s\nTraceback (most recent call last):\n%s", what, frames.rstrip())
