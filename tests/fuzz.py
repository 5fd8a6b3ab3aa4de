"""Seeded fuzzing material for the receiver: malformed PDUs and mutated real data sets.

Everything here is driven by one ``random.Random``: a seed gives the same cases on every run
(tests/receiver/test_fuzz.py prints it in its failure messages; ``FUZZ_SEED`` overrides
it). Nothing here talks to a node: the builders return bytes, the mutator returns encoded data
sets; the test sends them.
"""

from __future__ import annotations

import os
import random
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

DEFAULT_SEED = 20261205


def fuzz_seed() -> int:
    """The seed of this run: ``FUZZ_SEED`` when set, else a fixed one.

    Not an ``AINODE_`` variable: the node takes every ``AINODE_*`` variable for a setting and
    refuses to start on one it does not know (node/core/settings.py)."""
    return int(os.environ.get("FUZZ_SEED", DEFAULT_SEED))


# --- PDUs (PS3.8 9.3) -----------------------------------------------------------------------

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


def item(kind: int, value: bytes) -> bytes:
    """A variable item: type, reserved, 16-bit length, value."""
    return struct.pack(">BBH", kind, 0, len(value)) + value


def pdu(kind: int, body: bytes) -> bytes:
    """A PDU: type, reserved, 32-bit length, body."""
    return struct.pack(">BBI", kind, 0, len(body)) + body


def context_item(context_id: int, abstract: str, *syntaxes: str) -> bytes:
    """A presentation context item of an A-ASSOCIATE-RQ (PS3.8 9.3.2.2)."""
    sub = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in syntaxes)
    return item(0x20, bytes([context_id & 0xFF, 0, 0, 0]) + sub)


def user_item(max_pdu: int = 16384, class_uid: bytes = b"1.2.3.4", version: bytes | None = None) -> bytes:
    """A user information item: maximum length, implementation class UID (and version name)."""
    sub = item(0x51, struct.pack(">I", max_pdu)) + item(0x52, class_uid)
    if version is not None:
        sub += item(0x55, version)
    return item(0x50, sub)


def associate_rq(
    calling: bytes = b"ECHOSCU",
    called: bytes = b"AINODE",
    contexts: bytes | None = None,
    user: bytes | None = None,
    app_context: bytes = APPLICATION_CONTEXT.encode(),
) -> bytes:
    """An A-ASSOCIATE-RQ (by default: Verification and CT Image Storage, explicit and implicit LE)."""
    if contexts is None:
        contexts = context_item(1, VERIFICATION, IMPLICIT_LE) + context_item(
            3, CT_IMAGE_STORAGE, EXPLICIT_LE, IMPLICIT_LE
        )
    body = (
        struct.pack(">HH", 1, 0)
        + called[:16].ljust(16)
        + calling[:16].ljust(16)
        + bytes(32)
        + item(0x10, app_context)
        + contexts
        + (user_item() if user is None else user)
    )
    return pdu(0x01, body)


def pdv(context_id: int, control: int, fragment: bytes) -> bytes:
    """A presentation data value item: length, context ID, message control header, fragment."""
    return struct.pack(">IBB", 2 + len(fragment), context_id, control) + fragment


def p_data(*pdvs: bytes) -> bytes:
    """A P-DATA-TF PDU of the given PDV items."""
    return pdu(0x04, b"".join(pdvs))


def command(*elements: tuple[int, bytes]) -> bytes:
    """A command set (implicit VR LE, group 0000) with its group length first."""
    body = b"".join(struct.pack("<HHI", 0, elem, len(value)) + value for elem, value in elements)
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\x00" if len(raw) % 2 else raw


def echo_command(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set."""
    return command(
        (0x0002, _uid(VERIFICATION)),
        (0x0100, struct.pack("<H", 0x0030)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", 0x0101)),
    )


def store_command(sop_instance: str, message_id: int = 1, sop_class: str = CT_IMAGE_STORAGE) -> bytes:
    """A C-STORE-RQ command set (a data set follows)."""
    return command(
        (0x0002, _uid(sop_class)),
        (0x0100, struct.pack("<H", 0x0001)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0700, struct.pack("<H", 0)),
        (0x0800, struct.pack("<H", 0x0000)),
        (0x1000, _uid(sop_instance)),
    )


def flip_bits(rng: random.Random, data: bytes, flips: int, start: int = 0) -> bytes:
    """``data`` with ``flips`` random bits flipped at or after ``start``."""
    out = bytearray(data)
    if len(out) <= start:
        return bytes(out)
    for _ in range(flips):
        pos = rng.randrange(start, len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


@dataclass
class PduCase:
    """One malformed connection: what it is (for messages) and the bytes it sends."""

    kind: str
    data: bytes


def _lengths(rng: random.Random, true: int, width: int) -> int:
    top = (1 << (8 * width)) - 1
    return rng.choice([0, 1, true - 1, true + 1, true + 7, true * 2, top, top - 1, rng.randrange(top + 1)]) & top


def _item_offsets(rq: bytes) -> list[int]:
    """Offsets of the top-level variable items of an A-ASSOCIATE-RQ."""
    offsets, pos = [], 74
    while pos + 4 <= len(rq):
        offsets.append(pos)
        pos += 4 + struct.unpack_from(">H", rq, pos + 2)[0]
    return offsets


def many_contexts(count: int, syntaxes: int = 1) -> bytes:
    """``count`` presentation context items (IDs wrap around: only 128 odd IDs exist)."""
    ts = [EXPLICIT_LE, IMPLICIT_LE][:syntaxes] if syntaxes <= 2 else [f"1.2.3.{i}" for i in range(syntaxes)]
    return b"".join(context_item(2 * i + 1, CT_IMAGE_STORAGE if i % 2 else VERIFICATION, *ts) for i in range(count))


def pdu_cases(rng: random.Random, count: int) -> list[PduCase]:
    """``count`` malformed connections, a seeded mix of every kind below (the fixed ones first)."""
    fixed = [
        PduCase("contexts-129", associate_rq(contexts=many_contexts(129))),
        PduCase("contexts-3000", associate_rq(contexts=many_contexts(3000))),
        PduCase("contexts-3000-stranger", associate_rq(calling=b"STRANGER", contexts=many_contexts(3000))),
        PduCase("contexts-500x200-syntaxes", associate_rq(contexts=many_contexts(500, syntaxes=20))),
        PduCase("contexts-over-1MiB", associate_rq(contexts=many_contexts(30000))),
        PduCase("long-app-context", associate_rq(app_context=b"1." * 32767)),
        PduCase("long-abstract-syntax", associate_rq(contexts=context_item(1, "1." * 32000 + "1", IMPLICIT_LE))),
        PduCase("long-transfer-syntax", associate_rq(contexts=context_item(1, VERIFICATION, "1." * 32000 + "1"))),
        PduCase("long-class-uid", associate_rq(user=user_item(class_uid=b"9" * 65000))),
        PduCase("long-version-name", associate_rq(user=user_item(version=b"V" * 65000))),
        PduCase("max-pdu-0", associate_rq(user=user_item(max_pdu=0))),
        PduCase("max-pdu-1", associate_rq(user=user_item(max_pdu=1))),
        PduCase("no-user-item", associate_rq(user=b"")),
        PduCase("no-contexts", associate_rq(contexts=b"")),
        PduCase("nul-ae-titles", associate_rq(calling=b"\x00" * 16, called=b"\x00" * 16)),
        PduCase("binary-ae-titles", associate_rq(calling=bytes(range(240, 256)), called=b"\xff" * 16)),
        PduCase("blank-ae-titles", associate_rq(calling=b" " * 16, called=b" " * 16)),
        PduCase("pdata-first", p_data(pdv(1, 0x03, echo_command()))),
        PduCase("empty-pdu", pdu(0x01, b"")),
        PduCase("nothing", b""),
    ]
    fixed += [PduCase(f"wrong-state-{kind:02x}", pdu(kind, bytes(4 if kind > 2 else 100))) for kind in (2, 3, 5, 6, 7)]
    cases = fixed[:count]
    makers = [_wrong_pdu_length, _wrong_item_length, _truncated, _random_bytes, _unknown_type, _flipped_rq]
    makers += [_random_items, _many_items_of_one_kind]
    while len(cases) < count:
        cases.append(rng.choice(makers)(rng))
    return cases


def _wrong_pdu_length(rng: random.Random) -> PduCase:
    rq = associate_rq()
    return PduCase("pdu-length", rq[:2] + struct.pack(">I", _lengths(rng, len(rq) - 6, 4)) + rq[6:])


def _wrong_item_length(rng: random.Random) -> PduCase:
    rq = bytearray(associate_rq())
    at = rng.choice(_item_offsets(bytes(rq)))
    true = struct.unpack_from(">H", rq, at + 2)[0]
    struct.pack_into(">H", rq, at + 2, _lengths(rng, true, 2))
    return PduCase("item-length", bytes(rq))


def _truncated(rng: random.Random) -> PduCase:
    rq = associate_rq()
    return PduCase("truncated", rq[: rng.randrange(1, len(rq))])


def _random_bytes(rng: random.Random) -> PduCase:
    return PduCase("random", rng.randbytes(rng.randrange(1, 4096)))


def _unknown_type(rng: random.Random) -> PduCase:
    kind = rng.choice([0x00, *range(0x08, 0x100)])
    return PduCase("unknown-type", pdu(kind, rng.randbytes(rng.randrange(0, 512))))


def _flipped_rq(rng: random.Random) -> PduCase:
    return PduCase("flipped-rq", flip_bits(rng, associate_rq(), rng.randrange(1, 8)))


def _random_items(rng: random.Random) -> PduCase:
    kinds = [0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0xFF]
    items = b"".join(item(rng.choice(kinds), rng.randbytes(rng.randrange(0, 64))) for _ in range(rng.randrange(1, 40)))
    head = associate_rq()[6:74]
    return PduCase("random-items", pdu(0x01, head + items))


def _many_items_of_one_kind(rng: random.Random) -> PduCase:
    # Repeated application context or user information items (one of each is allowed).
    kind = rng.choice(["app", "user", "sub"])
    if kind == "app":
        extra = item(0x10, APPLICATION_CONTEXT.encode()) * rng.randrange(2, 2000)
        return PduCase("many-app-contexts", associate_rq(contexts=extra + context_item(1, VERIFICATION, IMPLICIT_LE)))
    if kind == "user":
        return PduCase("many-user-items", associate_rq(user=user_item() * rng.randrange(2, 2000)))
    subs = b"".join(item(0x54, rng.randbytes(rng.randrange(0, 40))) for _ in range(rng.randrange(100, 3000)))
    return PduCase("many-role-items", associate_rq(user=item(0x50, item(0x51, struct.pack(">I", 16384)) + subs)))


# The SOP Instance UIDs the malformed C-STOREs below name (none may ever be indexed).
PDATA_STORE_UIDS = ("1.2.3.4", "1.2.3", "1.2.3.5", *(f"1.2.826.0.1.3680043.9.{n}" for n in (7, 8, 9)))


def pdata_cases(rng: random.Random, count: int, context_id: int = 1) -> list[PduCase]:
    """``count`` malformed P-DATA-TF exchanges for an established association (context 1:
    Verification, 3: CT Image Storage explicit VR LE)."""
    good = p_data(pdv(context_id, 0x03, echo_command()))
    fixed = [
        PduCase("pdv-longer-than-pdu", pdu(0x04, struct.pack(">IBB", 5000, context_id, 3) + echo_command())),
        PduCase("pdv-length-0", pdu(0x04, struct.pack(">I", 0) + echo_command())),
        PduCase("pdv-length-1", pdu(0x04, struct.pack(">IB", 1, context_id) + echo_command())),
        PduCase("pdu-longer-than-pdvs", pdu(0x04, good[6:] + b"\x00\x00")),
        PduCase("empty-pdata", pdu(0x04, b"")),
        PduCase("unknown-context", p_data(pdv(255, 0x03, echo_command()))),
        PduCase("even-context", p_data(pdv(2, 0x03, echo_command()))),
        PduCase("data-before-command", p_data(pdv(3, 0x02, b"\x08\x00\x18\x00\x02\x00\x00\x00"))),
        PduCase("command-never-ends", b"".join(p_data(pdv(context_id, 0x01, bytes(16000))) for _ in range(64))),
        PduCase("store-without-data", p_data(pdv(3, 0x03, store_command("1.2.3.4")))),
        PduCase("store-bad-uid", p_data(pdv(3, 0x03, store_command("../../etc/passwd")), pdv(3, 0x02, b""))),
        PduCase("store-on-echo-context", p_data(pdv(1, 0x03, store_command("1.2.3")), pdv(1, 0x02, bytes(8)))),
        PduCase(
            "store-then-command",
            p_data(pdv(3, 0x03, store_command("1.2.3.5")), pdv(3, 0x00, bytes(64)), pdv(1, 0x03, echo_command())),
        ),
        PduCase(
            "store-then-abort",
            p_data(pdv(3, 0x03, store_command("1.2.826.0.1.3680043.9.8")), pdv(3, 0x00, bytes(4000)))
            + pdu(0x07, bytes(4)),
        ),
        PduCase(
            "store-then-bad-pdv",
            p_data(pdv(3, 0x03, store_command("1.2.826.0.1.3680043.9.9")), pdv(3, 0x00, bytes(4000)))
            + pdu(0x04, struct.pack(">IBB", 9000, 3, 0) + bytes(100)),
        ),
        PduCase("release-rq-long", pdu(0x05, bytes(4)) + pdu(0x05, bytes(40))),
        PduCase("associate-again", associate_rq()),
    ]
    cases = fixed[:count]
    while len(cases) < count:
        which = rng.randrange(4)
        if which == 0:  # a command set with bits flipped (framing intact)
            cmd = flip_bits(rng, rng.choice([echo_command(), store_command("1.2.826.0.1.3680043.9.7")]), 3)
            cases.append(PduCase("flipped-command", p_data(pdv(context_id, 0x03, cmd))))
        elif which == 1:  # random bytes as a complete command
            cases.append(PduCase("random-command", p_data(pdv(context_id, 0x03, rng.randbytes(rng.randrange(0, 300))))))
        elif which == 2:  # random message control headers and context IDs
            cases.append(
                PduCase("random-control", p_data(pdv(rng.randrange(256), rng.randrange(256), rng.randbytes(40))))
            )
        else:  # a good P-DATA with bits flipped anywhere
            cases.append(PduCase("flipped-pdata", flip_bits(rng, good, rng.randrange(1, 4))))
    return cases


# --- mutated data sets from real files --------------------------------------------------------

# Small real files (pydicom's test data), each a different transfer syntax or structure.
SEED_FILES = (
    "CT_small.dcm",  # explicit VR LE
    "MR_small_implicit.dcm",  # implicit VR LE
    "MR_small_bigendian.dcm",  # explicit VR BE
    "image_dfl.dcm",  # deflated
    "rtplan.dcm",  # implicit, nested sequences
    "test-SR.dcm",  # deep sequences
    "SC_rgb_rle.dcm",  # RLE, encapsulated
    "JPEG2000.dcm",  # JPEG 2000, encapsulated
    "SC_rgb_jpeg.dcm",  # JPEG baseline
    "rtdose.dcm",  # implicit, multi-frame
    "badVR.dcm",  # a real file with a broken VR
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
)
# The attributes the node keys its index and its answers on.
REQUIRED = (0x00080016, 0x00080018, 0x0020000D, 0x0020000E)
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_ALL_VRS = ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI", "UL", "US"]
_ALL_VRS += sorted(_LONG_VRS) + ["\x00\x00", "ZZ", "xx"]


@dataclass
class Seed:
    """A real file read once: its data set and how it is encoded."""

    name: str
    dataset: Dataset
    sop_class: str
    transfer_syntax: UID


def load_seed(path: Path) -> Seed:
    """Read a real file (pixel data included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path)
    return Seed(path.name, ds, str(ds.file_meta.MediaStorageSOPClassUID), UID(ds.file_meta.TransferSyntaxUID))


@dataclass
class Mutant:
    """A data set to send: its request UIDs, transfer syntax, encoded bytes and what was done."""

    seed: str
    mutation: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    data: bytes


def _encode_elements(ds: Dataset, implicit: bool, little: bool) -> list[bytes]:
    """Each top-level element encoded on its own (their concatenation is the data set)."""
    out = []
    for elem in ds:  # in tag order
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = implicit, little
        write_data_element(fp, elem)
        out.append(fp.getvalue())
    return out


def _tag_of(chunk: bytes, little: bool) -> int:
    group, elem = struct.unpack_from("<HH" if little else ">HH", chunk)
    return (group << 16) | elem


def _length_field(chunk: bytes, implicit: bool) -> tuple[int, int]:
    """(offset, width) of an encoded element's length field."""
    if implicit:
        return 4, 4
    return (8, 4) if chunk[4:6].decode("latin-1") in _LONG_VRS else (6, 2)


def mutate(rng: random.Random, seed: Seed, sop_instance: str) -> Mutant:
    """The seed's data set under a new SOP Instance UID, with one seeded mutation (or none)."""
    ds = seed.dataset.copy()
    ds.SOPInstanceUID = sop_instance
    ts = seed.transfer_syntax
    deflated = ts == DeflatedExplicitVRLittleEndian
    implicit, little = ts.is_implicit_VR, ts.is_little_endian
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chunks = _encode_elements(ds, implicit, little)
    mutation = rng.choice(MUTATIONS)
    if mutation == "none":
        data = b"".join(chunks)
    elif mutation in ("truncate-stream", "flip-bits", "insert-bytes", "append-garbage"):
        data = _raw_mutation(rng, mutation, b"".join(chunks))
    else:
        data = b"".join(_element_mutation(rng, mutation, chunks, implicit, little))
    if deflated:
        deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
        if rng.random() < 0.2:  # now and then the deflated stream itself is broken
            mutation += "+deflate-flip"
            data = flip_bits(rng, data, rng.randrange(1, 6))
    return Mutant(seed.name, mutation, seed.sop_class, sop_instance, str(ts), data)


MUTATIONS = (
    "none",
    "truncate-stream",
    "flip-bits",
    "insert-bytes",
    "append-garbage",
    "truncate-value",
    "wrong-vr",
    "wrong-length",
    "huge-length",
    "delete-required",
    "duplicate-tag",
    "swap-order",
    "bad-uid",
    "unterminated-sequence",
)


def _raw_mutation(rng: random.Random, mutation: str, data: bytes) -> bytes:
    # Bias towards the header: the element area before the pixel data is where parsing happens.
    head = min(len(data), 4096)
    if mutation == "truncate-stream":
        return data[: rng.randrange(0, len(data))]
    if mutation == "flip-bits":
        out = bytearray(data)
        for _ in range(rng.randrange(1, 16)):
            out[rng.randrange(head)] ^= 1 << rng.randrange(8)
        return bytes(out)
    if mutation == "insert-bytes":
        at = rng.randrange(head)
        return data[:at] + rng.randbytes(rng.randrange(1, 64)) + data[at:]
    return data + rng.randbytes(rng.randrange(1, 256))


def _element_mutation(
    rng: random.Random, mutation: str, chunks: list[bytes], implicit: bool, little: bool
) -> list[bytes]:
    chunks = list(chunks)
    required = [i for i, c in enumerate(chunks) if _tag_of(c, little) in REQUIRED]
    i = rng.choice(required) if required and rng.random() < 0.5 else rng.randrange(len(chunks))
    chunk = chunks[i]
    where, width = _length_field(chunk, implicit)
    fmt = {2: "H", 4: "I"}[width]
    order = "<" if little else ">"
    if mutation == "truncate-value":  # the length says more than the value holds
        value_len = len(chunk) - where - width
        chunks[i] = chunk[: where + width + rng.randrange(0, max(1, value_len))]
    elif mutation == "wrong-vr" and not implicit:
        chunks[i] = chunk[:4] + rng.choice(_ALL_VRS).encode("latin-1") + chunk[6:]
    elif mutation in ("wrong-length", "huge-length", "wrong-vr"):
        true = struct.unpack_from(order + fmt, chunk, where)[0]
        top = (1 << (8 * width)) - 1
        value = (
            rng.choice([top, top - 15, 0x7FFFFFF0 & top]) if mutation == "huge-length" else _lengths(rng, true, width)
        )
        chunks[i] = chunk[:where] + struct.pack(order + fmt, value) + chunk[where + width :]
    elif mutation == "delete-required" and required:
        del chunks[rng.choice(required)]
    elif mutation == "duplicate-tag":
        chunks.insert(i + rng.choice([0, 1, 3]), chunk)
    elif mutation == "swap-order" and len(chunks) > 1:
        j = rng.randrange(len(chunks))
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif mutation == "bad-uid" and required:
        k = rng.choice(required)
        bad = rng.choice([b"../../x", b"..", b"1.2.abc", b"1." * 40, b"", b"1.2.\x00\x00", b"/etc/passwd"])
        bad += b"\x00" * (len(bad) % 2)
        chunks[k] = _with_value(chunks[k], bad, implicit, little)
    elif mutation == "unterminated-sequence":  # an undefined-length sequence that never ends
        tag = struct.pack(order + "HH", 0x0040, 0x0275)
        head = tag + (b"" if implicit else b"SQ\x00\x00") + b"\xff\xff\xff\xff"
        start_item = struct.pack(order + "HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        chunks.insert(rng.randrange(len(chunks) + 1), head + start_item + rng.randbytes(rng.randrange(0, 32)))
    return chunks


def _with_value(chunk: bytes, value: bytes, implicit: bool, little: bool) -> bytes:
    where, width = _length_field(chunk, implicit)
    order = ("<" if little else ">") + {2: "H", 4: "I"}[width]
    return chunk[:where] + struct.pack(order, len(value)) + value
