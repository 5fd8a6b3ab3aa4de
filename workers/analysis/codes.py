"""codes: coded concepts (SNOMED CT, or a local 99AINODE code) for the label names models use."""

from __future__ import annotations

from workers.analysis.findings import Code

ANATOMICAL_STRUCTURE: Code = ("91723000", "SCT", "Anatomical structure")
ABNORMAL_STRUCTURE: Code = ("49755003", "SCT", "Morphologically abnormal structure")

# Codes for label names a model (built-in or configured) may use; others get a local code (99AINODE).
KNOWN_CODES: dict[str, tuple[Code, Code]] = {  # name -> (category, type)
    "lung": (ANATOMICAL_STRUCTURE, ("39607008", "SCT", "Lung")),
    "liver": (ANATOMICAL_STRUCTURE, ("10200004", "SCT", "Liver")),
    "spleen": (ANATOMICAL_STRUCTURE, ("78961009", "SCT", "Spleen")),
    "kidney": (ANATOMICAL_STRUCTURE, ("64033007", "SCT", "Kidney")),
    "spine": (ANATOMICAL_STRUCTURE, ("421060004", "SCT", "Spinal column")),
    "liver_lesion": (ABNORMAL_STRUCTURE, ("300331000", "SCT", "Lesion of liver")),
    "lung_nodule": (ABNORMAL_STRUCTURE, ("786838002", "SCT", "Pulmonary nodule")),
}


def codes_for(label: str) -> tuple[Code, Code]:
    """(category, type) codes for a label name."""
    if label in KNOWN_CODES:
        return KNOWN_CODES[label]
    return (ANATOMICAL_STRUCTURE, (label.upper()[:16], "99AINODE", label.replace("_", " ")))
