"""Every storage SOP class of the standard is received: one instance of each, sent by a pynetdicom
SCU in associations of at most 128 presentation contexts (a requestor's limit); unknown storage
classes follow ``node.unknown_storage_classes``; the list in docs/conformance.md is the code's.

Run ``python -m tests.receiver.test_sop_classes`` to rewrite that list after the code's changed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import sop_class as pynetdicom_classes
from pynetdicom.presentation import AllStoragePresentationContexts
from sqlalchemy import create_engine, select

from node.index import Instance
from node.ingest.receiver import STANDARD_STORAGE_ROOT, STORAGE_SOP_CLASSES
from tests.helpers import REPO_ROOT, NodeProcess
from tests.receiver.conftest import settled

CONFORMANCE = REPO_ROOT / "docs" / "conformance.md"
BEGIN, END = "<!-- storage-sop-classes: begin -->", "<!-- storage-sop-classes: end -->"
BATCH = 100  # presentation contexts per association (pynetdicom's requestor allows 128)

# Storage classes no list of this release knows: one the standard could define (its storage
# root) and a private one (never accepted).
FUTURE_STANDARD = "1.2.840.10008.5.1.4.1.1.999.1"
PRIVATE = "1.2.826.0.1.3680043.10.543.1.1"
# Classes the issue named as refused by the old receiver (pynetdicom's 120-class list).
NAMED_IN_ISSUE = {
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map Storage
    "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR Storage
}


def instance(sop_class: str) -> Dataset:
    """A minimal data set of ``sop_class``: the UIDs the receiver keys on and a patient."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "SOPCLASSES", "Test^Classes", "OT"
    return ds


def send_each(port: int, called: str, sop_classes: list[str]) -> dict[str, int | None]:
    """C-STORE one instance of each class; {class: status} (None: the context was not accepted)."""
    statuses: dict[str, int | None] = {}
    for start in range(0, len(sop_classes), BATCH):
        batch = sop_classes[start : start + BATCH]
        ae = AE(ae_title="PYNETDICOM")
        for sop_class in batch:
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        assert assoc.is_established, "association refused"
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        try:
            for sop_class in batch:
                if sop_class not in accepted:
                    statuses[sop_class] = None
                    continue
                status = assoc.send_c_store(instance(sop_class))
                statuses[sop_class] = getattr(status, "Status", -1)
        finally:
            assoc.release()
    return statuses


def indexed_classes(node: NodeProcess) -> list[str]:
    settled(node)
    engine = create_engine(node.database_url)
    with engine.connect() as conn:
        classes = list(conn.execute(select(Instance.sop_class_uid)).scalars())
    engine.dispose()
    return classes


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A node with the default policy (unknown_storage_classes: standard)."""
    with NodeProcess(tmp_path_factory.mktemp("node")) as proc:
        yield proc


def test_one_instance_of_every_storage_class_is_stored_and_indexed(node: NodeProcess):
    every = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    assert len(every) >= 170 and NAMED_IN_ISSUE <= set(every)
    statuses = send_each(node.port, node.ae_title, every)
    refused = {uid: status for uid, status in statuses.items() if status != 0x0000}
    assert not refused, f"{len(refused)} of {len(every)} classes not stored: {refused}"
    assert sorted(indexed_classes(node)) == sorted(every)


def test_unknown_standard_class_is_accepted_and_a_private_one_refused(node: NodeProcess):
    before = len(indexed_classes(node))
    statuses = send_each(node.port, node.ae_title, [FUTURE_STANDARD, PRIVATE, "1.2.840.10008.5.1.4.1.1.2"])
    assert statuses == {FUTURE_STANDARD: 0x0000, PRIVATE: None, "1.2.840.10008.5.1.4.1.1.2": 0x0000}
    classes = indexed_classes(node)
    assert len(classes) == before + 2 and FUTURE_STANDARD in classes and PRIVATE not in classes


def test_policy_refuse_accepts_only_the_listed_classes(tmp_path: Path):
    with NodeProcess(tmp_path / "node", {"node": {"unknown_storage_classes": "refuse"}}) as node:
        statuses = send_each(node.port, node.ae_title, [FUTURE_STANDARD, "1.2.840.10008.5.1.4.1.1.30"])
        assert statuses == {FUTURE_STANDARD: None, "1.2.840.10008.5.1.4.1.1.30": 0x0000}


# --- the list in docs/conformance.md --------------------------------------------------------


def class_name(uid: str) -> str:
    """The class's name in pydicom's UID dictionary, else pynetdicom's keyword for it."""
    name = UID(uid).name
    if name != uid:
        return name
    keywords = {str(value): key for key, value in pynetdicom_classes._STORAGE_CLASSES.items()}
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", keywords[uid])


def rendered_table() -> str:
    """The SOP class table of docs/conformance.md as the code gives it."""
    rows = [f"| {class_name(uid)} | {uid} |" for uid in sorted(STORAGE_SOP_CLASSES, key=_uid_key)]
    return "\n".join(["| SOP Class | UID |", "|---|---|", *rows])


def _uid_key(uid: str) -> tuple[int, ...]:
    return tuple(int(part) for part in uid.split("."))


def documented_section() -> str:
    text = CONFORMANCE.read_text()
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def test_conformance_statement_lists_exactly_the_receivers_storage_classes():
    documented = re.findall(r"^\| [^|]+ \| ([0-9.]+) \|$", documented_section(), re.MULTILINE)
    assert sorted(documented) == sorted(STORAGE_SOP_CLASSES), "run: python -m tests.receiver.test_sop_classes"
    assert documented_section() == rendered_table(), "run: python -m tests.receiver.test_sop_classes"
    text = CONFORMANCE.read_text()
    assert f"{len(STORAGE_SOP_CLASSES)} storage SOP classes" in text
    assert STANDARD_STORAGE_ROOT.rstrip(".") in text and "unknown_storage_classes" in text


def write_table() -> None:
    """Rewrite the table in docs/conformance.md from the code."""
    text = CONFORMANCE.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    CONFORMANCE.write_text(f"{head}{BEGIN}\n{rendered_table()}\n{END}{tail}")


if __name__ == "__main__":
    write_table()
    sys.exit(0)
