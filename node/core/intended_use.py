"""Intended use: what an analysis is for, declared once and checked by the node and the workers.

An ``IntendedUse`` names the modalities, body regions, dimensionality (3D volume with a minimum
number of slices and coverage, 2D projection, cine with a frame time) and spacing ranges an
analysis was made for. The router checks a series' headers against it before queuing a job
(``header_reason``); the worker checks the headers and the loaded volume again before inference
(``header_reason``, ``geometry_reason``), and each reference model then checks the image itself.

Body regions are found in the headers through a synonym table (``BodyRegions``): Body Part
Examined and the Anatomic Region Sequence first (coded, the modality's own word), the study,
series and protocol descriptions only when those are empty. Terms are matched as whole words,
upper case, accents folded, in several languages; a site adds its own words in the
configuration (``intended_use.synonyms``). A header that names no known region does not refuse
a series: headers are often empty, and the image check decides then.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Dimensionality = Literal["2d", "3d", "2d+t"]

# Region -> words that name it (any language; matched as whole words, accents folded).
DEFAULT_SYNONYMS: dict[str, tuple[str, ...]] = {
    "head": (
        "HEAD",
        "BRAIN",
        "SKULL",
        "CRANIUM",
        "CRANIAL",
        "CEREBRAL",
        "CCT",
        "CT HEAD",
        "ORBIT",
        "SINUS",
        "KOPF",
        "SCHADEL",
        "SCHAEDEL",
        "HIRN",
        "CRANE",
        "TETE",
        "CERVEAU",
        "CABEZA",
        "CRANEO",
        "CEREBRO",
        "TESTA",
        "CRANIO",
        "ENCEFALO",
        "CERVELLO",
        "HOOFD",
        "HERSENEN",
        "頭部",
        "脳",
        "头部",
        "颅脑",
    ),
    "neck": (
        "NECK",
        "CSPINE",
        "C-SPINE",
        "LARYNX",
        "THYROID",
        "HALS",
        "COU",
        "CUELLO",
        "COLLO",
        "PESCOCO",
        "頸部",
        "颈部",
    ),
    "chest": (
        "CHEST",
        "THORAX",
        "THORACIC",
        "LUNG",
        "LUNGS",
        "PULMONARY",
        "PULMO",
        "THX",
        "CHEST_TO_PELVIS",
        "THORAXABDOMEN",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "TORSO",
        "TRUNK",
        "WHOLEBODY",
        "WHOLE BODY",
        "LUNGE",
        "LUNGEN",
        "BRUST",
        "BRUSTKORB",
        "POUMON",
        "POUMONS",
        "POITRINE",
        "PULMONAIRE",
        "TORAX",
        "PECHO",
        "PULMON",
        "TORACE",
        "POLMONE",
        "POLMONI",
        "TORACICO",
        "BORST",
        "胸部",
        "肺",
    ),
    "abdomen": (
        "ABDOMEN",
        "ABD",
        "ABDOMINAL",
        "LIVER",
        "HEPATIC",
        "KIDNEY",
        "RENAL",
        "PANCREAS",
        "SPLEEN",
        "ABDOMENPELVIS",
        "ABDPELVIS",
        "THORAXABDOMEN",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "TORSO",
        "TRUNK",
        "WHOLEBODY",
        "WHOLE BODY",
        "BAUCH",
        "LEBER",
        "NIERE",
        "FOIE",
        "ABDOMINALE",
        "HIGADO",
        "ADDOME",
        "FEGATO",
        "BUIK",
        "腹部",
        "肝臓",
        "肝",
    ),
    "pelvis": (
        "PELVIS",
        "HIP",
        "ABDOMENPELVIS",
        "ABDPELVIS",
        "CHESTABDPELVIS",
        "BECKEN",
        "BASSIN",
        "PELVIS",
        "BACINO",
        "骨盤",
    ),
    "heart": (
        "HEART",
        "CARDIAC",
        "CARDIO",
        "CORONARY",
        "ECHO",
        "ECHOCARDIOGRAM",
        "ECHOCARDIOGRAPHY",
        "LV",
        "VENTRICLE",
        "HERZ",
        "COEUR",
        "CARDIAQUE",
        "CORAZON",
        "CUORE",
        "HART",
        "心臓",
        "心脏",
    ),
    "spine": ("SPINE", "LSPINE", "TSPINE", "WIRBELSAULE", "RACHIS", "COLUMNA", "COLONNA"),
    "extremity": (
        "EXTREMITY",
        "ARM",
        "LEG",
        "KNEE",
        "TIBIA",
        "FIBULA",
        "FEMUR",
        "ANKLE",
        "FOOT",
        "HAND",
        "WRIST",
        "ELBOW",
        "SHOULDER",
        "HUMERUS",
        "FOREARM",
        "FINGER",
        "TOE",
        "KNIE",
        "SCHULTER",
        "GENOU",
        "EPAULE",
        "PIED",
        "RODILLA",
        "HOMBRO",
        "GINOCCHIO",
        "SPALLA",
    ),
    "breast": ("BREAST", "MAMMA", "MAMMO", "MAMA", "乳房"),
}

# SNOMED CT code values of the Anatomic Region Sequence (CID 4031) -> regions.
REGION_CODES: dict[str, tuple[str, ...]] = {
    "69536005": ("head",), "12738006": ("head",), "45048000": ("neck",), "51185008": ("chest",),
    "43799004": ("chest",), "39607008": ("chest",), "80891009": ("heart", "chest"), "818981001": ("abdomen",),
    "113345001": ("abdomen",), "10200004": ("abdomen",), "64033007": ("abdomen",), "12921003": ("pelvis",),
    "416550000": ("chest", "abdomen"), "416775004": ("chest", "abdomen", "pelvis"), "38266002": ("chest", "abdomen", "pelvis"),
    "421060004": ("spine",), "66019005": ("extremity",), "72696002": ("extremity",), "12611008": ("extremity",),
    "76752008": ("breast",),
}  # fmt: skip


def _fold(text: str) -> str:
    """Upper case, accents removed, separators as spaces: 'Thorax/Poumons' -> 'THORAX POUMONS'."""
    decomposed = unicodedata.normalize("NFKD", text or "")
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).upper()
    return re.sub(r"[\s_^/\\,;:.()+\-]+", " ", plain).strip()


class BodyRegions:
    """The synonym table: which body regions a header's words name."""

    def __init__(self, extra: dict[str, list[str]] | None = None):
        table: dict[str, set[str]] = {region: set(words) for region, words in DEFAULT_SYNONYMS.items()}
        for region, words in (extra or {}).items():
            table.setdefault(region.lower(), set()).update(words)
        self._patterns = {
            region: re.compile(
                "|".join(
                    rf"(?<![A-Z0-9]){re.escape(_fold(w))}(?![A-Z0-9])" for w in sorted(words, key=len, reverse=True)
                )
            )
            for region, words in table.items()
            if words
        }

    @property
    def names(self) -> tuple[str, ...]:
        """Every region the table knows."""
        return tuple(sorted(self._patterns))

    def in_text(self, text: str) -> set[str]:
        """Regions the words of ``text`` name."""
        folded = _fold(text)
        return {region for region, pattern in self._patterns.items() if folded and pattern.search(folded)}


class IntendedUse(BaseModel):
    """What an analysis is for; empty fields mean "any"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    summary: str = ""  # one sentence, for model cards and `ainode models`
    modalities: tuple[str, ...] = ()
    body_regions: tuple[str, ...] = ()  # names in the synonym table: head, chest, abdomen, heart...
    dimensionality: Dimensionality | None = None
    min_slices: int = Field(default=1, ge=1)  # 3D: images (or frames) in the series
    min_coverage_mm: float = Field(default=0.0, ge=0)  # 3D: extent along the slice direction
    min_frames: int = Field(default=2, ge=1)  # cine
    pixel_spacing_mm: tuple[float, float] | None = None  # in-plane range, (min, max)
    slice_spacing_mm: tuple[float, float] | None = None  # 3D: slice step range, (min, max)


@dataclass
class SeriesHeaders:
    """What the headers of one series say, for the intended-use check."""

    modality: str = ""
    body_part: str = ""
    region_codes: list[str] = field(default_factory=list)  # Anatomic Region Sequence code values
    descriptions: list[str] = field(default_factory=list)  # study, series, protocol
    pixel_spacing_mm: float | None = None
    frames: int = 1  # images and frames in the series


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "") if ds is not None else ""
    return str(value).strip() if value is not None else ""


def _pixel_spacing(ds: Any) -> float | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            values = [float(v) for v in ds.get(keyword) or []]
        except (TypeError, ValueError):
            continue
        if len(values) == 2 and min(values) > 0:
            return min(values)
    return None


def series_headers(ds: Any, frames: int) -> SeriesHeaders:
    """The intended-use facts of a series from one of its instances' headers (a pydicom Dataset)
    and the number of images/frames the series holds."""
    codes = []
    for item in ds.get("AnatomicRegionSequence") or []:
        value = _text(item, "CodeValue") or _text(item, "LongCodeValue")
        if value:
            codes.append(value)
    return SeriesHeaders(
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined"),
        region_codes=codes,
        descriptions=[
            d for d in (_text(ds, k) for k in ("StudyDescription", "SeriesDescription", "ProtocolName")) if d
        ],
        pixel_spacing_mm=_pixel_spacing(ds),
        frames=max(1, int(frames)),
    )


def named_regions(headers: SeriesHeaders, regions: BodyRegions) -> tuple[set[str], str]:
    """The regions the headers name and where that was read: the coded attributes first (Body
    Part Examined, Anatomic Region Sequence), the descriptions only when those name none."""
    coded = regions.in_text(headers.body_part)
    for code in headers.region_codes:
        coded |= set(REGION_CODES.get(code, ()))
    if coded:
        return coded, f"BodyPartExamined {headers.body_part!r}" if headers.body_part else "Anatomic Region Sequence"
    described: set[str] = set()
    for text in headers.descriptions:
        described |= regions.in_text(text)
    return described, "the descriptions"


def header_reason(use: IntendedUse | None, headers: SeriesHeaders, regions: BodyRegions) -> str | None:
    """None when the headers fit the intended use (or say nothing against it), else the reason."""
    if use is None:
        return None
    if use.modalities and headers.modality not in use.modalities:
        return f"modality {headers.modality or 'unknown'}; intended for {', '.join(use.modalities)}"
    if use.body_regions:
        found, where = named_regions(headers, regions)
        if found and not found & set(use.body_regions):
            return f"{where} names {', '.join(sorted(found))}; intended for {', '.join(use.body_regions)}"
    if use.dimensionality == "3d" and headers.frames < use.min_slices:
        return f"{headers.frames} image(s) in the series; a 3D volume of at least {use.min_slices} slices is needed"
    if use.dimensionality == "2d+t" and headers.frames < use.min_frames:
        return f"{headers.frames} frame(s); a cine of at least {use.min_frames} frames is needed"
    return _spacing_reason("pixel spacing", headers.pixel_spacing_mm, use.pixel_spacing_mm)


def _spacing_reason(what: str, value: float | None, bounds: tuple[float, float] | None) -> str | None:
    if bounds is None or value is None:
        return None
    low, high = bounds
    if not low <= value <= high:
        return f"{what} {value:.3g} mm outside {low:g}-{high:g} mm"
    return None


def geometry_reason(
    use: IntendedUse | None,
    modality: str,
    shape: tuple[int, ...],
    spacing_kji: tuple[float, float, float],
    frame_time_s: float | None,
) -> str | None:
    """The loaded volume against the intended use: modality, dimensionality, slices and coverage,
    frame time for a cine, spacing ranges. None when it fits."""
    if use is None:
        return None
    if use.modalities and modality not in use.modalities:
        return f"modality {modality or 'unknown'}; intended for {', '.join(use.modalities)}"
    frames = int(shape[0])
    if use.dimensionality == "3d":
        if frame_time_s is not None:
            return "a cine (frames over time), not a 3D volume"
        if frames < use.min_slices:
            return f"{frames} slice(s); a 3D volume of at least {use.min_slices} slices is needed"
        coverage = (frames - 1) * spacing_kji[0]
        if coverage < use.min_coverage_mm:
            return f"the volume covers {coverage:.0f} mm; at least {use.min_coverage_mm:g} mm is needed"
        reason = _spacing_reason("slice spacing", spacing_kji[0], use.slice_spacing_mm)
        if reason:
            return reason
    elif use.dimensionality == "2d+t":
        if frames < use.min_frames:
            return f"{frames} frame(s); a cine of at least {use.min_frames} frames is needed"
        if frame_time_s is None:
            return "no frame time: a cine (frames over time of one position) is needed, not a stack of slices"
    return _spacing_reason("pixel spacing", min(spacing_kji[1], spacing_kji[2]), use.pixel_spacing_mm)
