"""Fixtures for the kernel and plugin tests.

Where kernels run (EFFX_KERNEL_DEVICE): "cpu" (default) runs them in the Triton interpreter on torch CPU
tensors; "cuda" runs the compiled kernels on the GPU (benchmarks/gpu_lane.py).

Interpreter runs: effx hands the interpreter its kernels itself (effx.plugins.kernels._common.load), and
`kernel_device` also sets TRITON_INTERPRET=1 (restored at the end of the session) when triton is not
imported yet, so triton's own library is jitted for the interpreter as TRITON_INTERPRET=1 documents.
When something imported triton earlier (torch's exporter does, in a full test run), the loader rewrites
those library functions for the interpreter instead, so the kernel tests never depend on test order.

Ahead-of-time compilation cannot share a process with the interpreter, so the PTX and TensorRT plugin
facts come from tests/plugins/aot_worker.py in a subprocess. It starts in the background as soon as
collection shows a test needs it, and overlaps with the interpreter tests.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DEVICE = os.environ.get("EFFX_KERNEL_DEVICE", "cpu")

# unit roundoff of the low-precision input dtypes
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def bindings_wheel() -> Path | None:
    """The tensorrt-cu13-bindings wheel (or an unpacked copy) if one is on this machine; never downloads."""
    env = os.environ.get("EFFX_TRT_BINDINGS")
    if env:
        return Path(env) if Path(env).exists() else None
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is not None and spec.origin:
        return Path(spec.origin).parent.parent  # site-packages, holding tensorrt_bindings/plugin/
    patterns = ["/tmp/trtb/tensorrt*bindings*.whl", str(Path.home() / ".cache/effx/tensorrt*bindings*.whl"),
                str(Path.home() / ".cache/pip/**/tensorrt*bindings*.whl")]
    for pattern in patterns:
        found = sorted(glob.glob(pattern, recursive=True))
        if found:
            return Path(found[-1])
    return None


# -- device ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kernel_device():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'effx[triton]')")
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("EFFX_KERNEL_DEVICE=cuda but no CUDA device")
        yield torch.device("cuda")
        return
    previous = os.environ.get("TRITON_INTERPRET")
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    yield torch.device("cpu")
    if previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = previous


@pytest.fixture
def close_lowp():
    """Assert a low-precision kernel output against the fp32 math on the same (rounded) inputs.

    Every rounding the kernels do is one the reference does too (Q * scale, P or the feature maps, the
    projected keys, the output), each a relative error of at most one unit roundoff u of the dtype on
    values bounded by `scale` (softmax and linear attention outputs are weighted means of value rows, so
    scale = max |v|). Their sum stays below 2 u scale; the bound 4 u scale leaves a factor 2 for
    accumulation order. `ref_lowp`, when given, is the reference run in the low dtype, which must meet
    the same bound: evidence the bound is neither loose nor unreachable.
    """

    def check(out: torch.Tensor, ref32: torch.Tensor, scale: float, dtype: torch.dtype,
              ref_lowp: torch.Tensor | None = None) -> None:
        assert out.dtype == dtype
        bound = 4 * UNIT_ROUNDOFF[dtype] * scale
        err = (out.float() - ref32).abs().max().item()
        assert err <= bound, f"{dtype}: kernel error {err:.3g} > {bound:.3g}"
        if ref_lowp is not None:
            ref_err = (ref_lowp.float() - ref32).abs().max().item()
            assert ref_err <= bound, f"{dtype}: the reference itself misses the bound ({ref_err:.3g} > {bound:.3g})"

    return check


# -- ahead-of-time facts (background subprocess) ------------------------------------------------------------
_WORKER: dict[str, object] = {}


def _start_worker() -> None:
    if _WORKER or importlib.util.find_spec("triton") is None:
        return
    out = Path(tempfile.mkdtemp(prefix="effx_aot_")) / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile needs the real jit
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    wheel = bindings_wheel()
    args = [sys.executable, "-m", "tests.plugins.aot_worker", str(out), str(wheel) if wheel else ""]
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 (closed when the report is read)
    _WORKER.update(proc=subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), out=out,
                   log=log, wheel=wheel)


def pytest_collection_modifyitems(session, config, items):
    if any("aot_report" in getattr(item, "fixturenames", ()) for item in items):
        _start_worker()


@pytest.fixture(scope="session")
def aot_report() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: nothing to compile")
    _start_worker()
    proc = _WORKER["proc"]
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the AOT worker did not finish in 15 minutes")
    _WORKER["log"].close()
    out: Path = _WORKER["out"]
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"AOT worker failed ({proc.returncode}):\n{out.with_suffix('.log').read_text()[-4000:]}")
    report = json.loads(out.read_text())
    report["wheel"] = str(_WORKER["wheel"]) if _WORKER["wheel"] else None
    return report
