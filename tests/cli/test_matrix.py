"""`effx matrix` on a local Ray cluster (two nodes offering `effx-target:cpu`, started and stopped here) and
without Ray: the same verdicts and errors either way, cells that really ran on workers, a worker killed
mid-cell (retried, or reported and finished by a rerun that runs only what is missing), a target no node
offers (a device kit cell), `effx worker`, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.cli.test_cli import run_cli

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'effx[cluster]' (the dev extra has it)")

TINY = ["--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--max-seq-len", "32"]
FAST = ["--seq", "16", "--iters", "2", "--warmup", "1", "--threads", "1"]
COMPARED = ("cell", "status", "reason", "max_abs", "cosine")  # verdicts and errors; latencies differ by nature


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, one CPU and one `effx-target:cpu` slot each; stopped (every process it
    started) when the module is done, whatever happened."""
    from ray.cluster_utils import Cluster

    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"effx-target:cpu": 1},
                                                          "include_dashboard": False})
    session = Path(nodes.head_node.get_session_dir_path())
    try:
        nodes.add_node(num_cpus=1, resources={"effx-target:cpu": 1})
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False, logging_level="ERROR")
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()  # kills every process the cluster started (raylets, GCS, workers)
        shutil.rmtree(session, ignore_errors=True)  # its logs and sockets
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved


def _cells(out: Path) -> dict[str, dict]:
    return {c["cell"]: c for c in json.loads((out / "matrix.json").read_text())["cells"]}


@pytest.mark.slow
def test_matrix_on_ray_equals_local_and_ran_on_the_workers(cluster, tmp_path, capsys, monkeypatch):
    common = ["matrix", "--attention", "full,linformer", "--param", "linformer.k=8", *TINY, *FAST,
              "--precisions", "fp32,int8", "--calib", "random"]
    on_ray, local = tmp_path / "ray", tmp_path / "local"
    code, out, err = run_cli([*common, "--targets", "cpu,jetson-orin", "--ray", cluster.address, "-o", str(on_ray)],
                             capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli([*common, "--targets", "cpu", "--jobs", "2", "--no-plots", "-o", str(local)],
                           capsys, monkeypatch)
    assert code == 0, err

    remote, here = _cells(on_ray), _cells(local)
    cpu = [f"{k}-cpu-{p}" for k in ("full", "linformer") for p in ("fp32", "int8")]
    assert sorted(here) == sorted(cpu)
    for name in cpu:
        assert remote[name]["status"] == "PASS", remote[name]
        assert {k: remote[name][k] for k in COMPARED} == {k: here[name][k] for k in COMPARED}
    # fp32 agrees to float rounding, int8 (random calibration) within its tolerance but clearly quantized
    assert all(remote[f"{k}-cpu-fp32"]["max_abs"] < 1e-4 for k in ("full", "linformer"))
    assert all(1e-3 < remote[f"{k}-cpu-int8"]["max_abs"] < 0.5 for k in ("full", "linformer"))
    assert all(remote[f"{k}-cpu-int8"]["cosine"] > 0.99 for k in ("full", "linformer"))

    # the cells ran in Ray worker processes on the cluster's nodes (both of them: one slot each), not here
    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert {remote[n]["where"] for n in cpu} == {"ray"}
    assert all(remote[n]["pid"] != os.getpid() for n in cpu)
    assert {remote[n]["node_id"] for n in cpu} == node_ids and len(node_ids) == 2
    assert all(here[n]["where"] == "local" and here[n]["pid"] != os.getpid() for n in cpu)
    assert len({here[n]["pid"] for n in cpu}) == 4  # without Ray: one process per cell

    # a target no node offers: device kit cells with the reason, not a hang
    for name in (f"{k}-jetson-orin-{p}" for k in ("full", "linformer") for p in ("fp32", "int8")):
        kit = remote[name]
        assert kit["status"] == "KIT" and kit["reason"], kit
        assert "no Ray node offers effx-target:jetson-orin" in kit["note"]
        assert (on_ray / "cells" / name / "build" / "build_on_device.sh").is_file()

    # each cell's folder came back: the build, its report, the result
    report = json.loads((on_ray / "cells" / "linformer-cpu-int8" / "report" / "report.json").read_text())
    assert report["passed"] and report["precision"] == "int8"
    assert report["artifact"] == str(on_ray / "cells" / "linformer-cpu-int8" / "build")  # not the worker's temp
    assert (on_ray / "cells" / "full-cpu-fp32" / "build" / "manifest.json").is_file()
    assert (on_ray / "matrix.png").stat().st_size > 1000 and not (local / "matrix.png").exists()
    assert "| linformer | cpu | int8 | PASS |" in (on_ray / "matrix.md").read_text()
    assert out.count(" PASS ") == 4 and out.count(" KIT ") == 4
    kit_line = next(ln for ln in out.splitlines() if ln.startswith("full-jetson-orin-int8: "))
    assert kit_line.endswith("; no Ray node offers effx-target:jetson-orin; ran on the driver"), kit_line


def _kill_cell_when_it_runs(name: str, killed: list[int], timeout_s: float = 240) -> None:
    """SIGKILL the Ray worker process running cell `name` (Ray titles it `ray::effx-cell:<name>`)."""
    title = f"ray::effx-cell:{name}".encode()
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(title):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.05)


def _run_with_a_kill(cluster, out: Path, retries: int, victim: str) -> tuple[dict, list[int]]:
    from effx.core.spec import RunSpec
    from effx.matrix import matrix

    spec = RunSpec().with_overrides({"model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2,
                                     "model.max_seq_len": 32})
    killed: list[int] = []
    killer = threading.Thread(target=_kill_cell_when_it_runs, args=(victim, killed), daemon=True)
    killer.start()
    # many timed runs keep the cell busy for seconds, so the killer finds it running even on a fast machine
    summary = matrix(["full"], ["cpu"], ["fp32", "int8"], out, spec=spec, seq=16, iters=4000, warmup=1, threads=1,
                     plots=False, ray=cluster.address, retries=retries)
    killer.join(timeout=5)
    assert killed, f"the cell {victim} was never seen running"
    return {c["cell"]: c for c in summary["cells"]}, killed


@pytest.mark.slow
def test_worker_killed_mid_cell_is_reported_then_retried_and_a_rerun_runs_only_what_is_missing(cluster, tmp_path):
    out = tmp_path / "m"
    # no retries: the lost cell is reported with its reason, the other cell goes on
    cells, killed = _run_with_a_kill(cluster, out, retries=0, victim="full-cpu-fp32")
    lost, other = cells["full-cpu-fp32"], cells["full-cpu-int8"]
    assert lost["status"] == "ERROR" and "worker lost" in lost["reason"], lost
    assert other["status"] == "PASS" and other["pid"] not in killed
    assert json.loads((out / "cells" / "full-cpu-fp32" / "result.json").read_text())["status"] == "ERROR"

    # the rerun runs only the lost cell; its worker is killed again and Ray retries it on another worker
    cells, killed_again = _run_with_a_kill(cluster, out, retries=1, victim="full-cpu-fp32")
    again = cells["full-cpu-fp32"]
    assert again["status"] == "PASS" and again["pid"] not in killed + killed_again, again
    assert again["started"] > lost["finished"]
    kept = cells["full-cpu-int8"]
    assert kept.get("resumed") and (kept["started"], kept["pid"]) == (other["started"], other["pid"])
    on_disk = json.loads((out / "cells" / "full-cpu-int8" / "result.json").read_text())
    assert (on_disk["started"], on_disk["pid"]) == (other["started"], other["pid"])


def test_worker_offers_what_the_machine_can_build(capsys, monkeypatch):
    code, out, err = run_cli(["worker", "--address", "10.0.0.1:6379", "--dry-run"], capsys, monkeypatch)
    assert code == 0, err
    assert "--address 10.0.0.1:6379" in out and """'{"effx-target:cpu": 1}'""" in out  # no TensorRT here
    code, out, err = run_cli(["worker", "--address", "10.0.0.1:6379", "--targets", "cpu,jetson-orin", "--slots", "2",
                              "--dry-run"], capsys, monkeypatch)
    assert code == 0 and """'{"effx-target:cpu": 2, "effx-target:jetson-orin": 2}'""" in out
    assert "jetson-orin" in err and "device build kits" in err


@pytest.mark.parametrize(("args", "message"), [
    (["worker", "--dry-run"], "exactly one of --address"),
    (["matrix", "--targets", "nosuch", "-o", "{tmp}/m"], "unknown target 'nosuch'"),
    (["matrix", "--attention", "full,full", "-o", "{tmp}/m"], "listed twice"),
    (["matrix", "--attention", "full", "--param", "linformer.k=8", "-o", "{tmp}/m"], "not among --attention"),
    (["matrix", "-o", "{tmp}/foreign"], "effx did not write it"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    code, _, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in args], capsys, monkeypatch)
    assert code == 2 and message in err and err.startswith("effx: error:") and err.count("\n") == 1, err
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine" and not (tmp_path / "m").exists()


@pytest.mark.slow
def test_bench_cells_run_on_ray_nodes_offering_the_target(cluster, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    args = ["bench", "--attention", "full", "--seq", "16", "--d-model", "32", "--heads", "2", "--warmup", "0",
            "--iters", "1", "--no-plots", "--ray", cluster.address, "-o", str(out)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    (cell,) = json.loads((out / "bench.json").read_text())["cells"]
    assert cell["status"] == "ok" and cell["p50_ms"] > 0 and cell["peak_mb_no_arena"] is not None, cell
    assert cell["pid"] != os.getpid() and cell["node_id"] in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    # a target no node offers is refused before any work, in one line
    code, _, err = run_cli([*args[:-2], "--target", "cuda", "-o", str(tmp_path / "cuda")], capsys, monkeypatch)
    assert code == 2 and "no node of the cluster offers effx-target:cuda" in err and err.count("\n") == 1, err
    assert not (tmp_path / "cuda").exists()


def test_a_failing_cell_is_recorded_with_its_reason_and_exits_1_in_one_line(cluster, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m"
    args = ["matrix", *TINY, *FAST, "--targets", "cpu", "--precisions", "int8", "--calib",
            str(tmp_path / "missing.npz"), "--no-plots", "--ray", cluster.address, "-o", str(out)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 1 and err.startswith("effx: error: 1 of 1 cells failed, first full-cpu-int8: ERROR (")
    assert err.count("\n") == 1 and "missing.npz" in err, err
    cell = _cells(out)["full-cpu-int8"]
    assert cell["status"] == "ERROR" and "missing.npz" in cell["reason"] and cell["where"] == "ray"
    assert cell["pid"] != os.getpid()  # it ran (and failed) on a worker


def test_an_address_where_no_cluster_listens_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as from a fresh shell, whatever ran before here
    code, _, err = run_cli(["matrix", *TINY, "--ray", "127.0.0.1:1", "-o", str(tmp_path / "m")], capsys, monkeypatch)
    assert code == 2 and "--ray 127.0.0.1:1: no Ray head answers there" in err and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists()
