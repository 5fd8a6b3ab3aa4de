"""The receiver's journal: records survive reopening, torn ones are ignored, retired ones stay gone."""

from __future__ import annotations

import os

import pytest

from node import journal


def _open(path, size=1 << 20):
    return journal.Journal.open(path, size=size)


def test_records_survive_reopening_in_order(tmp_path):
    path = tmp_path / "r0-journal.wal"
    jrnl, found = _open(path)
    assert found == [] and path.stat().st_size == 1 << 20
    written = [jrnl.append(b"META%d" % i, os.urandom(5000 + i), received_ns=i) for i in range(5)]
    jrnl.close()  # as after kill -9: nothing retired

    again, found = _open(path)
    assert [r.seq for r in found] == [r.seq for r in written]
    for old, new in zip(written, found):
        assert (new.offset, new.meta_len, new.payload_len, new.received_ns) == \
            (old.offset, old.meta_len, old.payload_len, old.received_ns)
    assert bytes(found[2].payload()[:5]) == b"META2"
    # New records go after the recovered ones and get higher sequence numbers.
    newer = again.append(b"M", b"x" * 100)
    assert newer.seq > written[-1].seq and newer.offset > written[-1].offset
    again.close()


def test_torn_record_is_ignored(tmp_path):
    path = tmp_path / "j.wal"
    jrnl, _ = _open(path)
    good = jrnl.append(b"META", b"a" * 9000)
    torn = jrnl.append(b"META", b"b" * 9000)
    jrnl.close()
    with open(path, "r+b") as fh:  # the payload of the second one only half made it to disk
        fh.seek(torn.offset + journal.BLOCK + 6000)
        fh.write(b"\0" * 100)
    _, found = _open(path)
    assert [r.seq for r in found] == [good.seq]


def test_retired_records_are_not_recovered_after_a_checkpoint(tmp_path):
    path = tmp_path / "j.wal"
    jrnl, _ = _open(path)
    first = [jrnl.append(b"M", b"1" * 3000) for _ in range(3)]
    jrnl.retire(first[:2])
    jrnl.checkpoint()
    jrnl.close()
    _, found = _open(path)
    assert [r.seq for r in found] == [first[2].seq]


def test_ring_wraps_and_never_overwrites_live_records(tmp_path):
    path = tmp_path / "j.wal"
    jrnl, _ = _open(path, size=64 * journal.BLOCK)
    payload = b"z" * (8 * journal.BLOCK)  # 9 blocks a record: 7 fit in 63
    live = [jrnl.append(b"", payload) for _ in range(7)]
    with pytest.raises(journal.JournalFull):
        jrnl.append(b"", payload)  # nothing retired: no room
    jrnl.retire(live[:2])
    wrapped = jrnl.append(b"", payload)
    assert wrapped.offset == journal.BLOCK  # reuses the start of the ring
    with pytest.raises(journal.JournalFull):
        jrnl.append(b"", b"y" * (20 * journal.BLOCK))  # over a quarter of the journal
    jrnl.retire(live[2:] + [wrapped])
    jrnl.checkpoint()
    jrnl.close()
    assert _open(path, size=64 * journal.BLOCK)[1] == []
