"""The Indexer batches lone arrivals for a moment (one commit for several) but not after an
association has ended: its last instances, which the study's readiness waits for, go at once."""

from __future__ import annotations

import threading

from pydicom.dataset import Dataset

from node.ingest.arrival import Arrival
from node.ingest.indexer import Indexer


def _arrival(uid: str) -> Arrival:
    header = Dataset()
    header.SOPInstanceUID = uid
    return Arrival(header=header, transfer_syntax="", size_bytes=0, meta_len=0, calling_ae="A", called_ae="B")


def _take_in_thread(indexer: Indexer) -> tuple[threading.Thread, list]:
    taken: list = []
    thread = threading.Thread(target=lambda: taken.append(indexer._take()), daemon=True)
    thread.start()
    return thread, taken


def test_an_ended_association_ends_the_linger(tmp_path):
    indexer = Indexer(None, tmp_path, "keep_first", linger=3600.0, background=False)  # type: ignore[arg-type]
    indexer.submit(_arrival("1.2.3"))
    thread, taken = _take_in_thread(indexer)
    thread.join(0.5)
    assert thread.is_alive() and not taken  # lingering for company (an hour here)
    indexer.no_more_coming()
    thread.join(60)
    assert [a.header.SOPInstanceUID for a in taken[0]] == ["1.2.3"]
    # The next lone arrival lingers again.
    indexer.submit(_arrival("1.2.4"))
    thread, taken = _take_in_thread(indexer)
    thread.join(0.5)
    assert thread.is_alive() and not taken
    indexer.stop(timeout=5)
    thread.join(60)
    assert [a.header.SOPInstanceUID for a in taken[0]] == ["1.2.4"]
