"""The receiver's journal: records survive reopening, torn ones are ignored, retired ones stay gone."""

from __future__ import annotations

import os

import pytest

from node.ingest import journal


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
        assert (new.offset, new.meta_len, new.payload_len, new.received_ns) == (
            old.offset,
            old.meta_len,
            old.payload_len,
            old.received_ns,
        )
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


def test_record_carries_the_data_sets_sha256(tmp_path):
    import hashlib

    path = tmp_path / "j.wal"
    jrnl, _ = _open(path)
    data = os.urandom(7000)
    written = jrnl.append(b"META", data)
    given = jrnl.append(b"META", data, sha256=hashlib.sha256(data).digest())
    jrnl.close()
    assert written.sha256 == given.sha256 == hashlib.sha256(data).hexdigest()
    _, found = _open(path)
    assert [r.sha256 for r in found] == [written.sha256] * 2


def test_a_wrong_sha256_is_a_torn_record(tmp_path):
    path = tmp_path / "j.wal"
    jrnl, _ = _open(path)
    jrnl.append(b"META", b"a" * 5000, sha256=b"\0" * 32)
    jrnl.close()
    assert _open(path)[1] == []


def test_version_1_records_are_still_recovered(tmp_path):
    """A journal written before the SHA-256 header (CRC-32 of the whole payload) reads back."""
    import struct
    import zlib

    path = tmp_path / "j.wal"
    jrnl, _ = _open(path)
    jrnl.close()
    meta, data = b"META", os.urandom(6000)
    payload = meta + data
    header = journal._HEADER_V1.pack(journal._RECORD_MAGIC_V1, 7, len(payload), len(meta), zlib.crc32(payload), 42)
    header += struct.pack("<I", zlib.crc32(header))
    with open(path, "r+b") as fh:
        fh.seek(journal.BLOCK)
        fh.write(header.ljust(journal.BLOCK, b"\0") + payload)
    again, found = _open(path)
    assert [(r.seq, r.meta_len, r.payload_len, r.received_ns, r.sha256) for r in found] == [(7, 4, 6004, 42, None)]
    assert bytes(found[0].payload()) == payload
    assert again.append(b"M", b"x").seq == 8
    again.close()
