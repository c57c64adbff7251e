"""The host side of a decoder's cache plan: the one driver of the decode protocol.

A decoder exports as a prefill graph (a prompt on an empty cache) and a decode graph (new tokens against the
cache); an hourglass also exports decode_fine, which `DecodeDriver.step` runs for a token that completes no
group. The manifest's `kv_cache` plan says which tensors carry the cache (`present.{i}.*` out, `past.{i}.*`
in), which control inputs the host computes (`past_lengths`, and for paged caches `new_lengths` and the
`block_table`) and how they start. `DecodeDriver` holds that state between steps and builds every feed;
validate, calibration, bench, the tests and every runner drive decoders through it, and the C++ runner
(runtimes/cpp/src/effx_run.cpp) implements the same steps. numpy only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from effx.core.errors import EffxError
from effx.core.manifest import CachePlan, Manifest

Feed = dict[str, np.ndarray]
Infer = Callable[[Feed, str], dict[str, np.ndarray]]


def cache_feed(outs: dict[str, np.ndarray]) -> Feed:
    """A step's present.* outputs renamed to the next step's past.* inputs."""
    return {k.replace("present.", "past.", 1): v for k, v in outs.items() if k.startswith("present.")}


def block_table_for(plan: CachePlan, batch: int, total: int) -> np.ndarray:
    """A block table giving every sequence its own consecutive blocks, enough for `total` tokens."""
    bs, num_blocks = int(plan.params["block_size"]), int(plan.params["num_blocks"])
    max_blocks = next(c.shape[1] for c in plan.controls if c.name == "block_table")
    need = -(-total // bs)
    if need * batch > num_blocks:
        raise EffxError(f"{batch} sequences of {total} tokens need {need * batch} paged blocks, the pool has "
                        f"{num_blocks}; lower --batch/--seq or raise kv_cache.num_blocks")
    table = np.zeros((batch, max_blocks), np.int64)
    for b in range(batch):
        table[b, :need] = np.arange(b * need, (b + 1) * need)
    return table


class DecodeDriver:
    """State a host keeps between decoder steps: the cache buffers, the position of each sequence and, for
    paged caches, the block table (allocated for `total` tokens per sequence unless one is given).

        driver = DecodeDriver(manifest, batch=2, total=64)
        outs = driver.prefill(runner.infer, prompt_ids)      # (B, P) -> logits (B, P, V)
        outs = driver.step(runner.infer, next_ids)           # (B, 1) -> logits (B, 1, V)

    The host allocates the buffers of contiguous layers (`capacity` = total slots), ring layers (`ring_{i}` =
    window + chunk - 1 slots, `chunk` being the longest step after the prompt; longer steps are split) and
    paged pools; the prefill takes them too. A runner that writes a graph's `aliases` in place gives the same
    arrays back, updated; any other runner returns new arrays, which become the buffers of the next step.
    """

    def __init__(self, manifest: Manifest, batch: int, total: int, block_table: np.ndarray | None = None,
                 chunk: int = 1):
        if manifest.kv_cache is None or "decode" not in manifest.graphs:
            raise EffxError("this export has no decode graph (an encoder, or a decoder exported without a cache)")
        self.plan = manifest.kv_cache
        self.batch, self.total = batch, total
        self.position = 0
        self.block_table = block_table
        if self.plan.paged and block_table is None:
            self.block_table = block_table_for(self.plan, batch, total)
        # each ring layer's buffer dim and its window
        self.windows = {f"ring_{layer.index}": int(layer.params["window"]) for layer in self.plan.layers
                        if layer.layout == "ring"}
        self.sizes = {"batch": batch, "capacity": total} | {k: w + chunk - 1 for k, w in self.windows.items()}
        # the longest step the ring buffers take: write-before-attend overwrites slots older than every window
        self.max_step = min((self.sizes[k] - w + 1 for k, w in self.windows.items()), default=None)
        # an hourglass's steps of one token that complete no group may run its smaller decode_fine graph
        self.first_ratio = self.plan.params.get("first_ratio") if "decode_fine" in manifest.graphs else None
        # the buffers the prefill graph takes (the host owns them)
        prefill_inputs = {t.name for t in manifest.graphs["prefill"].inputs}
        self._host = [t for t in self.plan.tensors if t.input in prefill_inputs]
        self.cache: Feed = {t.input: np.zeros(self.shape_of(t), np.dtype(t.dtype)) for t in self._host}

    def shape_of(self, tensor) -> tuple[int, ...]:
        """A cache tensor's shape for this host: symbolic dims resolved (batch, capacity, ring_{i})."""
        try:
            return tuple(d if isinstance(d, int) else self.sizes[d] for d in tensor.shape)
        except KeyError as exc:
            raise EffxError(f"cache tensor {tensor.input} has a dimension {exc} this host cannot size") from None

    def set_chunk(self, chunk: int) -> None:
        """Resize the ring buffers for steps of up to `chunk` tokens (window + chunk - 1 slots), keeping the
        newest tokens: e.g. fill a long context in large steps, then decode one token at a time in a ring of
        exactly the window."""
        windows = self.windows
        if not windows:
            return
        old = dict(self.sizes)
        self.sizes |= {k: w + chunk - 1 for k, w in windows.items()}
        self.max_step = chunk
        for t in self.plan.tensors:
            dim = t.shape[2] if len(t.shape) > 2 else None
            if dim not in windows:
                continue
            buf = self.cache[t.input]
            n_old, n_new = old[dim], self.sizes[dim]
            # the newest tokens both rings hold (older slots stay zero: outside every window)
            pos = np.arange(max(0, self.position - min(n_old, n_new)), self.position)
            new = np.zeros(self.shape_of(t), buf.dtype)
            new[:, :, pos % n_new] = buf[:, :, pos % n_old]
            self.cache[t.input] = new

    # -- feeds ----------------------------------------------------------------------------------------
    def prefill_feed(self, ids: np.ndarray) -> Feed:
        """Inputs of the prefill graph for the prompt `ids` (B, P): the tokens and the host's buffers."""
        self._check_fits(ids.shape[1])
        feed: Feed = {"input_ids": ids}
        if self.plan.paged:
            feed |= {"new_lengths": np.full(ids.shape[0], ids.shape[1], np.int64), "block_table": self.block_table}
        return feed | {t.input: self.cache[t.input] for t in self._host}

    def step_feed(self, ids: np.ndarray) -> Feed:
        """Inputs of the decode graph for new tokens `ids` (B, S) after the tokens cached so far."""
        self._check_fits(self.position + ids.shape[1])
        feed = {"input_ids": ids, "past_lengths": np.full(ids.shape[0], self.position, np.int64)} | self.cache
        if self.plan.paged:
            feed |= {"new_lengths": np.full(ids.shape[0], ids.shape[1], np.int64), "block_table": self.block_table}
        return feed

    def _check_fits(self, tokens: int) -> None:
        if tokens > self.total:
            raise EffxError(f"{tokens} tokens exceed the {self.total} this decode was sized for (DecodeDriver total)")

    def advance(self, outs: dict[str, np.ndarray], new_tokens: int) -> None:
        """Take a step's outputs as the cache for the next one (the same arrays where written in place)."""
        self.cache = self.cache | cache_feed(outs)
        self.position += new_tokens

    # -- steps ----------------------------------------------------------------------------------------
    def prefill(self, infer: Infer, ids: np.ndarray) -> dict[str, np.ndarray]:
        outs = infer(self.prefill_feed(ids), "prefill")
        self.advance(outs, ids.shape[1])
        return outs

    def step(self, infer: Infer, ids: np.ndarray) -> dict[str, np.ndarray]:
        """New tokens (B, S) against the cache; steps longer than the ring buffers take are split (the logits
        of the pieces are concatenated)."""
        n = self.max_step or ids.shape[1]
        if ids.shape[1] > n:
            parts = [self.step(infer, ids[:, i:i + n]) for i in range(0, ids.shape[1], n)]
            return {"logits": np.concatenate([p["logits"] for p in parts], axis=1)}
        outs = infer(self.step_feed(ids), self.graph_for(ids.shape[1]))
        self.advance(outs, ids.shape[1])
        return outs

    def graph_for(self, new_tokens: int) -> str:
        """The graph a step of `new_tokens` runs: decode, or an hourglass's decode_fine for one token that
        completes no group of its first shortening (position % first_ratio != 0)."""
        if self.first_ratio and new_tokens == 1 and self.position % int(self.first_ratio):
            return "decode_fine"
        return "decode"


def decode_loop(infer: Infer, manifest: Manifest, ids: np.ndarray, prompt: int,
                block_table: np.ndarray | None = None) -> list[np.ndarray]:
    """Teacher-forced decoding as a host does it: prefill `prompt` tokens, then feed the rest one by one.
    Returns the logits of each step: [(B, prompt, V), (B, 1, V), ...]."""
    batch, n = ids.shape
    driver = DecodeDriver(manifest, batch, n, block_table)
    logits = [driver.prefill(infer, ids[:, :prompt])["logits"]]
    for t in range(prompt, n):
        logits.append(driver.step(infer, ids[:, t:t + 1])["logits"])
    return logits


def greedy(infer: Infer, manifest: Manifest, prompt_ids: np.ndarray, steps: int) -> np.ndarray:
    """Greedy generation of `steps` tokens after the prompt; returns (B, steps) token ids."""
    driver = DecodeDriver(manifest, prompt_ids.shape[0], prompt_ids.shape[1] + steps)
    outs = driver.prefill(infer, prompt_ids)
    tokens = []
    for t in range(steps):
        nxt = outs["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]  # (B, 1)
        tokens.append(nxt)
        if t + 1 < steps:
            outs = driver.step(infer, nxt)
    return np.concatenate(tokens, axis=1)
