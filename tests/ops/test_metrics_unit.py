"""GPU sampling for the metrics: nvidia-smi output parsing, and the real tool where a GPU exists."""

from __future__ import annotations

import shutil

import pytest

from node.core.metrics import gpu_status, parse_nvidia_smi


def test_nvidia_smi_rows_are_parsed_to_bytes_and_ratios():
    rows = parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 1024, 81559, 37\n1, Tesla T4, 0, 15360, [N/A]\nbroken line\n")
    assert rows[0] == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "memory_used_bytes": 1024 * 1024**2,
        "memory_total_bytes": 81559 * 1024**2,
        "utilisation": 0.37,
    }
    assert rows[1]["utilisation"] is None and len(rows) == 2


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no NVIDIA driver on this machine")
def test_real_gpus_are_reported():
    gpus = gpu_status()
    assert gpus and all(g["memory_total_bytes"] > g["memory_used_bytes"] >= 0 for g in gpus)
