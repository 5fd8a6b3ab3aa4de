"""The wire codec: what a received data set says, checked without parsing it, and the file meta.

``read_header`` walks the element headers of an encoded data set once, checking that every
declared length fits (a truncated or garbled data set is refused before it is stored), and takes
out the fields the index needs without decoding the rest (``Header``). ``file_meta`` encodes the
preamble and File Meta Information written in front of every stored data set. A deflated data
set is inflated to at most a given size; past 16 MiB into a scratch file the caller hands over
(the one way anything here reaches the disk). Nothing here touches the database or the network.
"""

from __future__ import annotations

import io
import mmap
import re
import struct
import zlib
from typing import Any, BinaryIO, Callable

from pydicom import uid as dcm_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

# The file meta names the implementation that received the data (as the conformance statement).
IMPLEMENTATION_CLASS_UID = PYNETDICOM_IMPLEMENTATION_UID
IMPLEMENTATION_VERSION = PYNETDICOM_IMPLEMENTATION_VERSION

# The header fields the index needs: everything else stays unparsed.
HEADER_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "Modality",
    "Manufacturer",
    "ReferringPhysicianName",
    "StationName",
    "StudyDescription",
    "SeriesDescription",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "BodyPartExamined",
    "SliceThickness",
    "DeviceSerialNumber",
    "ContributingEquipmentSequence",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyID",
    "SeriesNumber",
    "InstanceNumber",
    "NumberOfFrames",
    "FrameOfReferenceUID",
)
HEADER_TAGS = [Tag(k) for k in HEADER_KEYWORDS]
SEQUENCE_KEYWORDS = frozenset({"ContributingEquipmentSequence"})
_PIXEL_DATA = 0x7FE00010


class Unparseable(Exception):
    """The data set is not a complete, well-formed DICOM encoding (answer C000)."""


class TooLarge(Exception):
    """The data set inflates to more than the configured maximum (answer A700)."""


# Inflated data sets are kept in memory up to this size; beyond it they go to the caller's
# scratch file (mapped for the walk, which touches element headers only).
_INFLATE_IN_MEMORY = 16 * 1024 * 1024
_INFLATE_STEP = 4 * 1024 * 1024  # output per zlib call
_INFLATE_INPUT_STEP = 256 * 1024  # input per zlib call


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def _walk(
    buf: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    little: bool,
    stop_at: int | None,
    pixel_at: list[int] | None = None,
    uids: dict[int, tuple[int, int, bytes]] | None = None,
) -> int:
    """Walk element headers from ``pos``; return where the walk stopped.

    Checks that every declared length fits in the buffer, so a truncated data set is caught
    without reading any value. ``stop_at`` is an item/sequence delimiter tag that ends the walk;
    ``pixel_at`` receives the offset of the first top-level element after the index's fields
    (where the header the index needs ends), ``uids`` the (offset,
    length, VR) of the top-level elements the index needs (``_INDEX_TAGS``; VR ``b""`` when
    implicit).
    """
    u16 = "<H" if little else ">H"
    u32 = "<I" if little else ">I"
    while pos < end:
        if pos + 8 > end:
            raise Unparseable("data set ends inside an element header")
        group, elem = struct.unpack_from("<HH" if little else ">HH", buf, pos)
        tag = (group << 16) | elem
        if pixel_at is not None and not pixel_at and tag > _LAST_INDEX_TAG:
            pixel_at.append(pos)
        if tag in (_ITEM_END, _SEQ_END):
            if tag != stop_at:
                raise Unparseable("unexpected delimiter")
            return pos + 8
        if implicit or group == 0xFFFE:
            length = struct.unpack_from(u32, buf, pos + 4)[0]
            header, vr = 8, b""
        else:
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise Unparseable("data set ends inside an element header")
                length = struct.unpack_from(u32, buf, pos + 8)[0]
                header = 12
            else:
                length = struct.unpack_from(u16, buf, pos + 6)[0]
                header = 8
        pos += header
        if uids is not None and tag in _INDEX_TAGS and length != 0xFFFFFFFF:
            uids[tag] = (pos, length, vr)
        if length == 0xFFFFFFFF:
            start = pos
            pos = _walk_items(buf, pos, end, implicit, little, encapsulated=(tag == _PIXEL_DATA))
            if uids is not None and tag in _INDEX_TAGS:  # a sequence the index reads (pydicom decodes it)
                uids[tag] = (start, pos - start, vr)
        else:
            pos += length
            if pos > end:
                raise Unparseable("an element's value runs past the end of the data set")
    if stop_at is not None:
        raise Unparseable("data set ends inside a sequence")
    return pos


def _walk_items(buf: memoryview, pos: int, end: int, implicit: bool, little: bool, encapsulated: bool) -> int:
    # An undefined-length sequence or encapsulated pixel data: items until the sequence delimiter.
    order = "<HHI" if little else ">HHI"
    while True:
        if pos + 8 > end:
            raise Unparseable("data set ends inside a sequence")
        group, elem, length = struct.unpack_from(order, buf, pos)
        tag = (group << 16) | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise Unparseable("expected an item in a sequence")
        if length == 0xFFFFFFFF and not encapsulated:
            pos = _walk(buf, pos, end, implicit, little, stop_at=_ITEM_END)
        else:
            pos += length
            if pos > end:
                raise Unparseable("an item runs past the end of the data set")


_UID_TAGS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_INDEX_TAGS = {int(tag): keyword for tag, keyword in zip(HEADER_TAGS, HEADER_KEYWORDS)}
_LAST_INDEX_TAG = max(_INDEX_TAGS)
# Value representations whose bytes are the text itself (PS3.5 6.2); ASCII text of these is
# decoded here, anything else by pydicom.
_TEXT_VRS = frozenset(
    {
        b"AE",
        b"AS",
        b"CS",
        b"DA",
        b"DS",
        b"DT",
        b"IS",
        b"LO",
        b"LT",
        b"PN",
        b"SH",
        b"ST",
        b"TM",
        b"UC",
        b"UI",
        b"UT",
        b"",
    }
)
_MISSING: Any = object()
# ISO 2022 code extension (PS3.5 6.1.2.5.3): ESC, intermediate bytes (0x20-0x2F), a final byte.
_ESC = b"\x1b"
_ESCAPE_SEQUENCE = re.compile(rb"\x1b[\x20-\x2f]*[\x30-\x7e]?")
_ESCAPE_TEXT = re.compile("\x1b[\x20-\x2f]*[\x30-\x7e]?")


class Header:
    """The fields of a data set the index needs.

    Found by the walk that checks the encoding (``read_header``) and decoded straight from the
    bytes when they are ASCII text, which they nearly always are: the four UIDs the answer
    depends on at once, the rest when the Indexer asks. Values come back as text (several
    values joined by backslashes, as encoded), which is what the index stores. A value in
    another character set, one with ISO 2022 escape sequences (7-bit, so ASCII bytes, but not
    ASCII text: ``ESC $ B`` switches to JIS X 0208) or an unexpected VR is decoded by pydicom
    with the instance's Specific Character Set (the whole header parsed once, only the index's
    fields). Supports ``get(keyword)`` and attribute access like a pydicom Dataset.
    """

    def __init__(
        self,
        raw: bytes,
        implicit: bool,
        little: bool,
        uids: dict[str, str],
        fields: dict[str, tuple[int, int, bytes]] | None = None,
    ):
        self._raw, self._implicit, self._little = raw, implicit, little
        self._uids = uids
        self._fields = fields or {}
        self._dataset: Dataset | None = None

    def get(self, keyword: str, default: Any = None) -> Any:
        """The value of ``keyword`` (None/default when absent)."""
        if keyword in self._uids:
            return self._uids[keyword]
        if keyword in UID_KEYWORDS:
            return default
        where = self._fields.get(keyword)
        if where is None:
            return default
        pos, length, vr = where
        value = self._raw[pos : pos + length]
        # ISO 2022 text (ESC sequences) is 7-bit too, but only pydicom decodes it correctly.
        if vr in _TEXT_VRS and value.isascii() and _ESC not in value and keyword not in SEQUENCE_KEYWORDS:
            return value.decode("ascii").rstrip("\x00 ")
        return self.dataset().get(keyword, default)

    def raw_text(self, keyword: str) -> str:
        """The value's bytes as text without decoding its character set: escape sequences
        dropped, non-ASCII bytes replaced (for values pydicom cannot decode)."""
        where = self._fields.get(keyword)
        if where is None:
            return ""
        pos, length, _ = where
        value = self._raw[pos : pos + length]
        return _ESCAPE_SEQUENCE.sub(b"", value).decode("ascii", "replace").rstrip("\x00 ")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        value = self.get(name, _MISSING)
        if value is _MISSING:
            raise AttributeError(name)
        return value

    def dataset(self) -> Dataset:
        """The header parsed by pydicom (only the index's fields)."""
        if self._dataset is None:
            try:
                self._dataset = read_dataset(
                    io.BytesIO(self._raw),
                    self._implicit,
                    self._little,
                    stop_when=_before_pixels,
                    specific_tags=HEADER_TAGS,
                )
            except Exception:  # pydicom raises many kinds on odd values: index without them
                self._dataset = Dataset()
        return self._dataset


UID_KEYWORDS = frozenset(_UID_TAGS.values())


def _inflate(encoded: memoryview, limit: int | None, scratch: Callable[[], BinaryIO] | None) -> Any:
    """Inflate a deflated data set in steps, never past ``limit`` bytes (raises TooLarge).

    Returns a bytearray, or (past ``_INFLATE_IN_MEMORY``, when ``scratch`` gives a file) a
    read-only map of the scratch file the rest was written to. The input is fed in slices, so
    zlib's copy of the unconsumed input stays small whatever the data set's size.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    file: BinaryIO | None = None
    total = 0

    def step(data: Any) -> bool:
        """Inflate ``data`` completely (output in bounded steps); False once the stream ended."""
        nonlocal out, file, total
        while True:
            room = _INFLATE_STEP if limit is None else min(_INFLATE_STEP, limit - total + 1)
            chunk = inflater.decompress(data, room)
            data = inflater.unconsumed_tail
            total += len(chunk)
            if limit is not None and total > limit:
                raise TooLarge(f"data set inflates to more than {limit} bytes")
            if file is None and scratch is not None and len(out) + len(chunk) > _INFLATE_IN_MEMORY:
                file = scratch()
                file.write(out)
                out = bytearray()
            if file is not None:
                file.write(chunk)
            else:
                out += chunk
            if inflater.eof:
                return False
            if not data and len(chunk) < room:  # this input is used up, no output pending
                return True

    try:
        for offset in range(0, len(encoded), _INFLATE_INPUT_STEP):
            if not step(encoded[offset : offset + _INFLATE_INPUT_STEP]):
                break
        else:
            step(b"")  # anything zlib still holds
    except zlib.error as err:
        if file is not None:
            file.close()
        raise Unparseable(f"deflated data set does not inflate: {err}") from None
    except BaseException:
        if file is not None:
            file.close()
        raise
    if file is None:
        return out
    file.flush()
    try:
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    finally:
        file.close()  # the map keeps the (unlinked) file's pages


def read_header(
    encoded: memoryview,
    transfer_syntax: str,
    max_inflated: int | None = None,
    scratch: Callable[[], BinaryIO] | None = None,
) -> Header:
    """Check the encoded data set is complete and take out what the index needs.

    A deflated data set is inflated to at most ``max_inflated`` bytes (more raises TooLarge);
    past 16 MiB the inflated bytes go to the file ``scratch`` returns (an unnamed temporary
    file), so memory stays flat whatever the data set inflates to.
    """
    ts = dcm_uid.UID(transfer_syntax)
    if ts == dcm_uid.DeflatedExplicitVRLittleEndian:
        inflated = _inflate(encoded, max_inflated, scratch)
        try:
            with memoryview(inflated) as view:
                return _read_header(view, ts)
        finally:
            if isinstance(inflated, mmap.mmap):
                try:
                    inflated.close()
                except BufferError:  # a view still held (by a traceback): closed when collected
                    pass
    return _read_header(encoded, ts)


def _read_header(encoded: memoryview, ts: dcm_uid.UID) -> Header:
    implicit, little = ts.is_implicit_VR, ts.is_little_endian
    if len(encoded) == 0:
        raise Unparseable("empty data set")
    try:
        pixel_at: list[int] = []
        found: dict[int, tuple[int, int, bytes]] = {}
        _walk(encoded, 0, len(encoded), implicit, little, stop_at=None, pixel_at=pixel_at, uids=found)
    except Unparseable:
        raise
    except Exception as err:  # struct errors on garbage
        raise Unparseable(f"{type(err).__name__}") from None
    uids = {
        _UID_TAGS[tag]: bytes(encoded[pos : pos + length]).decode("ascii", "replace").rstrip("\x00 ")
        for tag, (pos, length, _) in found.items()
        if tag in _UID_TAGS
    }
    fields = {_INDEX_TAGS[tag]: where for tag, where in found.items() if tag not in _UID_TAGS}
    # Copy only the header for the parser (up to the last of the index's fields), never the
    # pixel data or any other large value that follows.
    end = max([pixel_at[0] if pixel_at else len(encoded)] + [pos + length for pos, length, _ in found.values()])
    return Header(bytes(encoded[:end]), implicit, little, uids, fields)


def _before_pixels(tag: Any, _vr: Any, _length: int) -> bool:
    return int(tag) >= _PIXEL_DATA


def text_value(ds: Dataset | Header, keyword: str, limit: int) -> str:
    """The value as the index stores it: decoded text, several values joined by backslashes.

    A value pydicom cannot decode (a broken escape sequence, an unknown character set) is never
    an error of the receive: it is indexed as its ASCII bytes (``Header.raw_text``).
    """
    try:
        value = ds.get(keyword)
        if value is None:
            return ""
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = "\\".join(str(v) for v in value)
        text = str(value)
        if "\x1b" in text:  # an escape pydicom could not follow (unknown set, cut short): dropped
            text = _ESCAPE_TEXT.sub("", text)
        return text.strip()[:limit]
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on odd values
        return ds.raw_text(keyword).strip()[:limit] if isinstance(ds, Header) else ""


def int_value(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        if value in (None, ""):
            return None
        if isinstance(value, str):  # IS as text: "12", " 12 ", also "12.0" as pydicom reads it
            try:
                return int(value)
            except ValueError:
                number = float(value)
                return int(number) if number.is_integer() else None
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def float_value(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


# --- the file meta written in front of a stored data set -------------------------------------


def _meta_element(elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, calling_ae: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information (PS3.10 7.1), explicit VR little endian.

    Encoded directly (pydicom takes about a millisecond for this); byte-identical to
    ``pydicom.filewriter.write_file_meta_info`` (a test holds it to that).
    """
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01", b"\x00"),
            _meta_element(0x0002, b"UI", sop_class.encode("ascii"), b"\x00"),
            _meta_element(0x0003, b"UI", sop_instance.encode("ascii"), b"\x00"),
            _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\x00"),
            _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00"),
            _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode("ascii"), b" "),
            _meta_element(0x0016, b"AE", str(calling_ae).strip().encode("ascii", "replace"), b" "),
        )
    )
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body)), b"") + body


def file_meta_pydicom(sop_class: str, sop_instance: str, transfer_syntax: str, calling_ae: str) -> bytes:
    """The same, through pydicom (the reference for tests)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    meta.SourceApplicationEntityTitle = str(calling_ae).strip()
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()
