"""benchmarks/gpu_lane.py without a GPU: it must refuse and write nothing; its roofline table must match
the GPU names torch reports."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from tests.plugins.conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_lane", REPO / "benchmarks" / "gpu_lane.py")
gpu_lane = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_lane)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the lane would run")
def test_refuses_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_lane.py"), "--out-dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("name", "tb_per_s"), [
    ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 NVL", 3.9), ("NVIDIA H200", 4.8),
    ("NVIDIA A100-SXM4-80GB", 2.039), ("NVIDIA A100-SXM4-40GB", 1.555), ("NVIDIA L4", 0.3),
    ("Orin (nvgpu)", 0.2048),
])
def test_spec_sheet_bandwidth_by_name(name, tb_per_s):
    found = gpu_lane.spec_sheet_bandwidth(name)
    assert found["bytes_per_s"] == pytest.approx(tb_per_s * 1e12)
    assert found["source"].startswith("spec sheet")


def test_unknown_gpu_has_no_roofline():
    assert gpu_lane.spec_sheet_bandwidth("Some Future GPU") is None


def test_percentiles():
    p = gpu_lane.percentiles([float(x) for x in range(1, 101)])
    assert (p["p50_ms"], p["p90_ms"], p["p99_ms"], p["min_ms"], p["repeats"]) == (51.0, 90.0, 99.0, 1.0, 100)
