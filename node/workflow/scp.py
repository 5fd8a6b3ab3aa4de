"""The UPS DIMSE services the node's receiver answers (UPS Push, Pull, Watch and Query as SCP).

``handlers(settings)`` gives the receiver (pynetdicom) event/handler pairs, bound next to MPPS'
on the same AE (``node.service`` hands them over: the ingest stage never imports this one). The
receiver checks the peer's ``ups`` permission first. Each handler answers from one database
transaction of ``node.workflow.manager``; an unexpected error answers 0110 (Processing failure),
never drops the association.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from pydicom.dataset import Dataset
from pynetdicom import evt

from node.core.errors import describe_error
from node.core.settings import Settings
from node.workflow import manager, states

log = logging.getLogger("ainode.workflow")

# The SOP classes these handlers serve (the receiver's presentation contexts for them).
SOP_CLASSES = (manager.UPS_PUSH, manager.UPS_PULL, manager.UPS_WATCH, manager.UPS_QUERY)
PENDING_MATCH = 0xFF00
CANCELED_FIND = 0xFE00


def _reply(answer: manager.Answer) -> tuple[Any, Dataset | None]:
    """(status, data set) for pynetdicom; a failure carries its Error Comment."""
    if answer.comment and answer.status != states.SUCCESS:
        status = Dataset()
        status.Status = answer.status
        status.ErrorComment = answer.comment[:64]
        return status, answer.dataset
    return answer.status, answer.dataset


def _calling(event: Any) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _safely(name: str, work: Callable[[], manager.Answer]) -> tuple[Any, Dataset | None]:
    try:
        return _reply(work())
    except Exception as err:  # noqa: BLE001 - answer with a status, never drop the association
        log.error("UPS %s failed: %s", name, describe_error(err))
        return manager.PROCESSING_FAILURE, None


def handlers(settings: Settings) -> list[tuple[Any, Callable[..., Any]]]:
    """pynetdicom (event, handler) pairs for UPS N-CREATE, N-SET, N-GET, N-ACTION and C-FIND."""
    url = settings.database.url
    worklist = settings.node.ae_title

    def known(ae_title: str) -> bool:
        peer = settings.peer(ae_title)
        return peer is not None and peer.port is not None

    def on_n_create(event: Any) -> tuple[Any, Dataset | None]:
        uid = str(event.request.AffectedSOPInstanceUID or "")
        if not uid:
            return _reply(manager.Answer(manager.MISSING_ATTRIBUTE, comment="Affected SOP Instance UID required"))
        return _safely("N-CREATE", lambda: manager.create(url, uid, event.attribute_list, _calling(event), worklist))

    def on_n_set(event: Any) -> tuple[Any, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID or "")
        return _safely("N-SET", lambda: manager.set_attributes(url, uid, event.modification_list))

    def on_n_get(event: Any) -> tuple[Any, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID or "")
        listed = event.request.AttributeIdentifierList
        # pydicom gives one tag as a tag, several as a list.
        tags = [] if listed is None else list(listed) if isinstance(listed, (list, tuple)) else [listed]
        return _safely("N-GET", lambda: manager.get(url, uid, tags))

    def on_n_action(event: Any) -> tuple[Any, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID or "")
        action = int(event.request.ActionTypeID or 0)
        info = event.action_information if event.request.ActionInformation is not None else Dataset()
        calling = _calling(event)
        actions: dict[int, Callable[[], manager.Answer]] = {
            states.ACTION_CHANGE_STATE: lambda: manager.change_state(url, uid, info, calling),
            states.ACTION_REQUEST_CANCEL: lambda: manager.request_cancel(url, uid, info, calling),
            states.ACTION_SUBSCRIBE: lambda: manager.subscribe(url, uid, info, known),
            states.ACTION_UNSUBSCRIBE: lambda: manager.unsubscribe(url, uid, info),
            states.ACTION_SUSPEND_GLOBAL: lambda: manager.suspend_global(url, uid, info),
        }
        if action not in actions:
            return manager.NO_SUCH_ACTION, None
        return _safely("N-ACTION", actions[action])

    def on_c_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        try:
            found = list(manager.find(url, event.identifier))
        except Exception as err:  # noqa: BLE001
            log.error("UPS C-FIND failed: %s", describe_error(err))
            yield 0xC000, None  # Unable to process
            return
        for answer in found:
            if event.is_cancelled:
                yield CANCELED_FIND, None
                return
            yield PENDING_MATCH, answer

    return [
        (evt.EVT_N_CREATE, on_n_create),
        (evt.EVT_N_SET, on_n_set),
        (evt.EVT_N_GET, on_n_get),
        (evt.EVT_N_ACTION, on_n_action),
        (evt.EVT_C_FIND, on_c_find),
    ]
