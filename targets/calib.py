"""Calibration inputs for static quantization: token batches (seeded random, an .npz file, or a token file of
whitespace-separated ids, one sequence per line) and the feeds of every graph they give (decoders through
the host protocol)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from effx.core.errors import SpecError
from effx.core.manifest import Manifest
from effx.core.protocol import DecodeDriver
from effx.core.runner import Feed, Runner


def token_batches(manifest: Manifest, calib: str, samples: int, seq: int = 32, batch: int = 2, seed: int = 0) -> list[np.ndarray]:
    """int64 token batches (batch, seq) to calibrate with."""
    vocab = int(manifest.spec["model"]["vocab_size"])
    seq = min(seq, int(manifest.spec["model"]["max_seq_len"]))
    if calib == "random":
        rng = np.random.default_rng(seed)
        return [rng.integers(0, vocab, (batch, seq), dtype=np.int64) for _ in range(samples)]
    path = Path(calib)
    if not path.is_file():
        raise SpecError(f"--calib {calib}: no such file; use 'random', an .npz with input_ids, or a token file")
    if path.suffix == ".npz":
        with np.load(path) as data:
            if "input_ids" not in data:
                raise SpecError(f"--calib {calib}: the .npz has no 'input_ids' array (found {', '.join(data.files)})")
            ids = data["input_ids"].astype(np.int64)
        if ids.ndim != 2:
            raise SpecError(f"--calib {calib}: input_ids must be 2-D (samples, seq), got shape {ids.shape}")
        return [ids[i:i + batch] for i in range(0, min(len(ids), samples * batch), batch)]
    rows = [[int(t) for t in line.split()] for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SpecError(f"--calib {calib}: the token file is empty")
    if max(max(r) for r in rows) >= vocab:
        raise SpecError(f"--calib {calib}: token ids must be < vocab_size {vocab}")
    n = min(len(r) for r in rows)
    ids = np.array([r[:n] for r in rows], dtype=np.int64)
    return [ids[i:i + batch] for i in range(0, min(len(ids), samples * batch), batch)]


def calibration_feeds(manifest: Manifest, batches: list[np.ndarray], runner: Runner) -> dict[str, list[Feed]]:
    """Feeds per graph for static quantization. Decoders follow the host protocol: prefill all but the last
    token, then one decode step on the cache `runner` (the fp32 graphs) produced."""
    graphs = manifest.graphs
    if "decode" not in graphs:
        name, g = next(iter(graphs.items()))
        mask = "attention_mask" in {t.name for t in g.inputs}
        return {name: [{"input_ids": ids} | ({"attention_mask": np.ones_like(ids)} if mask else {}) for ids in batches]}
    feeds: dict[str, list[Feed]] = {"prefill": [], "decode": []}
    for ids in batches:
        driver = DecodeDriver(manifest, ids.shape[0], ids.shape[1])
        feeds["prefill"].append(driver.prefill_feed(ids[:, :-1]))
        driver.prefill(runner.infer, ids[:, :-1])
        feeds["decode"].append(driver.step_feed(ids[:, -1:]))
    return feeds
