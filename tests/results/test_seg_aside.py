"""The SEG written by a child process while the worker builds the SR and the KOS
(``workers.results.aside``): the same files as the sequential path, and no result lost when the
child dies."""

from __future__ import annotations

import datetime
import os
import signal

import pydicom
import pytest

from tests.results.synthetic import segmentation_findings
from tests.results.validators import dciodvfy_errors
from workers.results import ResultContext, write_results
from workers.results.aside import seg_frames, start_seg_aside
from workers.results.context import UIDFactory
from workers.results.seg import seg_reference, write_seg
from workers.results.sources import SourceImages

STARTED = datetime.datetime(2026, 12, 6, 8, 30, 0)


def context(folder, **kw) -> ResultContext:
    return ResultContext(job_key="aside", output_dir=folder, analysis_started=STARTED, **kw)


def sources_and_uids(findings, ctx):
    sources = SourceImages(findings.volume.sources)
    return sources, UIDFactory(ctx.job_key, [f.sop_instance_uid for f in sources.frames], findings.algorithm_version)


# What differs between two writes of the same results on any path: creation times, the equipment
# items' contribution times and highdicom's fresh Dimension Organization UID.
VOLATILE = {"InstanceCreationDate", "InstanceCreationTime", "ContributionDateTime", "DimensionOrganizationUID"}


def comparable(path) -> dict:
    """The file's data set as JSON, volatile values blanked."""
    ds = pydicom.dcmread(path)
    for element in ds.iterall():
        if element.keyword in VOLATILE:
            element.value = ""
    return ds.to_json_dict()


def files(objects) -> dict[str, dict]:
    return {obj.path.name: comparable(obj.path) for obj in objects}


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP", "FRACTIONAL"])
def test_seg_written_aside_gives_the_same_files(ct, tmp_path, seg_type):
    volume, _ = ct
    findings = segmentation_findings(volume)
    assert seg_frames(findings) > 1
    in_process = write_results(findings, context(tmp_path / "here", segmentation_type=seg_type), seg_aside_frames=10**9)
    aside = write_results(findings, context(tmp_path / "aside", segmentation_type=seg_type), seg_aside_frames=1)
    # Same objects, same order (SEG before the SR and KOS that reference it), same content.
    assert [(o.kind, o.sop_instance_uid) for o in aside] == [(o.kind, o.sop_instance_uid) for o in in_process]
    assert [o.kind for o in aside] == ["seg", "sr", "kos"]
    assert files(aside) == files(in_process)
    if seg_type != "LABELMAP":  # this dicom3tools predates Label Map SEG (see test_writers.py)
        assert dciodvfy_errors(aside[0].path) == []


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
def test_seg_reference_is_what_the_seg_says(ct, tmp_path, seg_type):
    volume, _ = ct
    findings = segmentation_findings(volume)
    ctx = context(tmp_path, segmentation_type=seg_type)
    sources, uids = sources_and_uids(findings, ctx)
    seg = write_seg(findings, sources, ctx, uids)
    ref = seg_reference(findings, sources, ctx, uids)
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Rows", "Columns"):
        assert ref[keyword].value == seg[keyword].value, keyword


def started_aside(ct, folder):
    """(findings, the SEG's child started for them), whatever the SEG's size."""
    findings = segmentation_findings(ct[0])
    ctx = context(folder)
    sources, uids = sources_and_uids(findings, ctx)
    aside = start_seg_aside(findings, sources, ctx, uids, folder, min_frames=1)
    assert aside is not None
    return findings, aside


def test_a_killed_child_leaves_the_seg_to_the_worker(ct, tmp_path):
    findings, aside = started_aside(ct, tmp_path / "out")
    os.kill(aside.pid, signal.SIGKILL)
    path = aside.finish()
    # Written by the worker after the child's death; the same SEG the child would have written.
    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID == aside.reference.SOPInstanceUID
    assert int(ds.NumberOfFrames) == seg_frames(findings)
    aside.stop()
    with pytest.raises(ChildProcessError):
        os.waitpid(aside.pid, os.WNOHANG)  # reaped: no zombie left behind


def test_stop_kills_a_child_still_writing(ct, tmp_path):
    _, aside = started_aside(ct, tmp_path / "out")
    aside.stop()  # a job that failed while the child ran
    with pytest.raises(ChildProcessError):
        os.waitpid(aside.pid, os.WNOHANG)


def test_small_segs_stay_in_the_worker(ct, tmp_path):
    volume, _ = ct
    findings = segmentation_findings(volume)
    ctx = context(tmp_path / "out")
    sources, uids = sources_and_uids(findings, ctx)
    frames = seg_frames(findings)
    assert start_seg_aside(findings, sources, ctx, uids, tmp_path / "out", min_frames=frames + 1) is None
    aside = start_seg_aside(findings, sources, ctx, uids, tmp_path / "out", min_frames=frames)
    assert aside is not None
    aside.finish()
    aside.stop()
