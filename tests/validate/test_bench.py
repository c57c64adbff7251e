"""effx bench: a tiny sweep end to end, resuming, and a cell over its memory cap recorded as OOM."""

from __future__ import annotations

import json

import pytest

import effx.check.bench as bench_mod
from effx.check.bench import bench, parse_params, ratios, table_markdown
from effx.core.errors import SpecError
from tests.cli.test_cli import run_cli


def test_tiny_sweep_resumes_and_records_oom(tmp_path, monkeypatch):
    out = tmp_path / "b"
    kw = dict(d_model=32, heads=2, output=out, iters=2, warmup=1)
    ticks = []
    first = bench(["full", "linear"], [16, 64], on_cell=lambda done, total: ticks.append((done, total)), **kw)
    assert ticks == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    assert [(c["kind"], c["seq"], c["status"]) for c in first["cells"]] == [
        ("full", 16, "ok"), ("full", 64, "ok"), ("linear", 16, "ok"), ("linear", 64, "ok")]
    for c in first["cells"]:
        assert 0 < c["p50_ms"] <= c["p90_ms"] <= c["p99_ms"] and c["tokens_per_s"] > 0 and c["peak_mb"] >= 0
    full64 = next(c for c in first["cells"] if (c["kind"], c["seq"]) == ("full", 64))
    lin64 = next(c for c in first["cells"] if (c["kind"], c["seq"]) == ("linear", 64))
    (r64,) = [r for r in first["ratios"] if r["seq"] == 64]
    assert r64["speedup"] == pytest.approx(full64["p50_ms"] / lin64["p50_ms"])
    assert json.loads((out / "bench.json").read_text())["cells"] == first["cells"]
    assert all((out / p).stat().st_size > 1000 for p in first["plots"]) and len(first["plots"]) == 2

    # resumable: finished cells are not run again, a new length is
    calls = []
    real = bench_mod.run_cell
    monkeypatch.setattr(bench_mod, "run_cell", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    again = bench(["full", "linear"], [16, 64, 32], **kw)
    assert sorted(calls) == [32, 32] and len(again["cells"]) == 6

    # OOM: cap the address space a little above what a small cell needs; full attention's (B, H, n, n)
    # scores at n = 4096 (2 heads: 128 MiB per copy) exceed it, linear attention's (B, H, D, D) state does not
    base = max(c["vm_peak_mb"] for c in first["cells"])
    capped = bench(["full", "linear"], [4096], d_model=32, heads=2, output=tmp_path / "oom", iters=1, warmup=0,
                   mem_limit_mb=int(base + 160), plots=False)
    status = {c["kind"]: c["status"] for c in capped["cells"]}
    assert status == {"full": "oom", "linear": "ok"}, capped["cells"]
    assert capped["ratios"] == [{"kind": "linear", "seq": 4096, "batch": 1, "speedup": "full OOM",
                                 "memory_saving": "full OOM"}]
    assert "OOM" in table_markdown(capped)


def test_ratios_and_params():
    cells = [{"kind": "full", "seq": 8, "batch": 1, "status": "ok", "p50_ms": 4.0, "peak_mb": 10.0},
             {"kind": "local", "seq": 8, "batch": 1, "status": "ok", "p50_ms": 1.0, "peak_mb": 2.5}]
    assert ratios(cells) == [{"kind": "local", "seq": 8, "batch": 1, "speedup": 4.0, "memory_saving": 4.0}]
    assert parse_params(["linformer.k=256", "local.window=64"]) == {"linformer": {"k": 256}, "local": {"window": 64}}
    with pytest.raises(SpecError, match="KIND.FIELD=VALUE"):
        parse_params(["k=256"])


def test_bench_cli_errors(tmp_path, capsys, monkeypatch):
    for args, needle in ((["--attention", "nope"], "nope"), (["--target", "jetson-orin"], "trtexec"),
                         (["--seq", "a,b"], "--seq"), (["--param", "linformer.q=3", "--attention", "linformer"], "q")):
        code, _, err = run_cli(["bench", "-o", str(tmp_path / "x"), "--seq", "16", *args], capsys, monkeypatch)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)


def test_readme_bench_table_is_the_recorded_json():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    results = json.loads((root / "benchmarks/results/bench_cpu.json").read_text())
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- bench:begin -->")[1].split("<!-- bench:end -->")[0]
    assert table_markdown(results) in block
    assert {(c["kind"], c["seq"]) for c in results["cells"]} == {
        (k, n) for k in ("full", "linformer", "local", "linear") for n in (1024, 4096, 16384)}
