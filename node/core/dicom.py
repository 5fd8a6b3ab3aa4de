"""DICOM vocabulary shared by the stages: DIMSE status codes, well-known UIDs, a quiet pynetdicom.

pynetdicom's ``Status`` enum names only the general codes; the service-specific ones are named
here after the standard (PS3.4 annexes, PS3.7 annex C) so no stage writes a bare number.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from pydicom import config as pydicom_config
from pynetdicom import _config
from pynetdicom.status import Status

# General (PS3.7 C)
SUCCESS = int(Status.SUCCESS)
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112
NO_SUCH_SOP_CLASS = 0x0118
MISSING_ATTRIBUTE = 0x0120
INVALID_ATTRIBUTE_VALUE = 0x0106
NOT_AUTHORIZED = 0x0124
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: the SOP Class is not the presentation context's
# Storage (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900  # the data set does not match the request's SOP Class/Instance
CANNOT_UNDERSTAND = 0xC000
INVALID_UID = 0xC001  # Cannot understand: a UID that is not digits and dots, or too long
WARNING_ELEMENTS_DISCARDED = 0xB006  # the first copy of a duplicate was kept
# MPPS (PS3.4 F.7.2.2): the step is already COMPLETED/DISCONTINUED
MAY_NO_LONGER_BE_UPDATED = 0xA710

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"

# The equipment the node's result objects name (Manufacturer and Device Serial Number of the
# object, or of its Contributing Equipment item): how the node knows its own output when a PACS
# sends it back (node.ingest.arrival.made_here). The writers take these values from here.
NODE_MANUFACTURER = "ainode"
NODE_DEVICE_SERIAL = "ainode"


def is_success_or_warning(code: int) -> bool:
    """Success, or a warning (Bxxx, 0001, 0107, 0116): the object was stored."""
    return code == SUCCESS or code in (0x0001, 0x0107, 0x0116) or (code & 0xF000) == 0xB000


def quiet_pynetdicom() -> None:
    """No identifiers (patient data) in pynetdicom's or pydicom's logs, no per-PDU chatter.

    pydicom's validation warnings quote element values (a malformed Patient Name would be
    logged verbatim), so they are silenced; our own log lines say what was refused and why.
    """
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    warnings.filterwarnings("ignore", module=r"pynetdicom(\..*)?")


def answers_stay_with_the_sender(assoc: Any) -> Any:
    """Keep a requested association's DIMSE answers for the ``send_*`` call waiting on them
    (pynetdicom 3.0.x, whose version the project pins); returns ``assoc``.

    pynetdicom pauses its association reactor while ``send_c_store`` (and every other ``send_*``)
    waits for the answer: it clears a checkpoint, then waits until the reactor says it is paused.
    The reactor sets that flag just before it passes the checkpoint, so a sender can see it
    while the reactor goes on; if the peer answers before the reactor looks at the DIMSE queue,
    the reactor takes the answer, finds it is no request and drops it, and the sender waits out
    its DIMSE timeout and aborts. Rare, and likelier on a busy machine and a fast peer: measured
    as one C-STORE in about ten 300-instance pushes to the node while a worker started, with
    every byte of the answer read by pynetdicom. Here a response the reactor takes while a
    sender waits (the checkpoint cleared) goes back on the queue, where the sender takes it.
    """
    serve = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        if not assoc._reactor_checkpoint.is_set() and getattr(msg, "is_valid_response", False):
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_request
    return assoc
