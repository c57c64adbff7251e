"""The first diverging block of an artifact that disagrees with PyTorch, found by bisection.

Block boundaries are located in the ONNX graph from the module scopes the exporter stamps on every node
(only boundaries are exposed, so fusion inside blocks is not disturbed); each probe exposes one boundary as
an extra output and compares it with PyTorch's hidden state after that block.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path

import onnx

from effx.check.reference import TorchRunner
from effx.check.report import Divergence, Probe
from effx.core.protocol import DecodeDriver
from effx.core.runner import Feed, Runner
from effx.core.tolerance import Tolerance, agreement
from effx.targets.ort import OrtRunner

Say = Callable[[str], None]

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)$")


def _scope(node) -> tuple[int | None, bool]:
    """(block index, belongs to a module) of an ONNX node, from the exporter's name-scope metadata."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None, False
            for s in scopes:
                m = _BLOCK.search(s)
                if m:
                    return int(m.group(1)), True
            return None, any(s.startswith("model.") or s == "model" for s in scopes)
    return None, False


def block_boundaries(path: Path) -> dict[int, str]:
    """Per block, the tensor that carries its output to what follows: the last tensor a block's nodes
    produce that is consumed by nodes of another scope (looking through scope-less nodes such as the
    Q/DQ pairs a quantiser inserts)."""


    graph = onnx.load(str(path), load_external_data=False).graph
    scopes = [_scope(n) for n in graph.node]
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(graph.node):
        for name in n.input:
            consumers.setdefault(name, []).append(i)

    def scoped_consumers(tensor: str, seen: set[str]) -> list[int]:
        out = []
        for j in consumers.get(tensor, []):
            if scopes[j][1]:
                out.append(j)
            else:
                for t in graph.node[j].output:
                    if t not in seen:
                        seen.add(t)
                        out += scoped_consumers(t, seen)
        return out

    boundaries: dict[int, str] = {}
    for i, n in enumerate(graph.node):
        block = scopes[i][0]
        if block is None:
            continue
        for t in n.output:
            if any(scopes[j][0] != block for j in scoped_consumers(t, {t})):
                boundaries[block] = t  # later nodes overwrite: the last one wins
    return boundaries


def find_divergence(runner: Runner, reference: TorchRunner, feed: Feed, tol: Tolerance, say: Say) -> Divergence:
    """Bisect over block boundaries of the graph that sees the whole input (encoder / prefill) on `feed`
    (input_ids, and attention_mask for encoders)."""
    if not isinstance(runner, OrtRunner):
        return Divergence(graph="", block=None, layer="not located", probes=[],
                          note="bisection exposes ONNX tensors: run `effx validate` on the onnx/ folder or an ORT "
                               "build of the same export to locate the layer")
    graph = runner.graphs[0]
    path = runner.graph_path(graph)
    marks = block_boundaries(path)
    n_blocks = len(reference.model.blocks)
    if sorted(marks) != list(range(n_blocks)):
        return Divergence(graph=graph, block=None, layer="not located", probes=[],
                          note=f"{path.name} carries no module scopes for every block (found {sorted(marks)})")
    if "attention_mask" not in feed:  # a decoder: the prefill graph on the whole sequence
        ids = feed["input_ids"]
        feed = DecodeDriver(runner.manifest, ids.shape[0], ids.shape[1]).prefill_feed(ids)
    hidden = reference.block_outputs(feed)
    probes: dict[int, Probe] = {}

    def probe(block: int) -> bool:
        say(f"bisect: probing the output of block {block}")
        with OrtRunner(runner.folder, runner.manifest, extra_outputs={graph: [marks[block]]}) as r:
            got = r.infer(feed, graph)[marks[block]]
        ref = hidden[block]
        if "attention_mask" in feed:
            keep = feed["attention_mask"].astype(bool)
            got, ref = got[keep], ref[keep]
        a = agreement(got, ref, tol)
        probes[block] = Probe(block=block, tensor=marks[block], max_abs=a.max_abs, cosine=a.cosine, passed=a.passed)
        return a.passed

    if probe(n_blocks - 1):
        block, layer, note = None, "the head after the last block (final norm / lm_head)", \
            "every block output agrees with PyTorch"
    else:
        lo, hi = 0, n_blocks - 1  # invariant: block hi diverges; the first diverging block is in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if probe(mid):
                lo = mid + 1
            else:
                hi = mid
        block, layer = lo, f"model.blocks.{lo}"
        note = f"{len(probes)} probes over {n_blocks} blocks; blocks before {lo} agree"
        if lo == 0:
            note += " (or the embeddings before block 0)"
    return Divergence(graph=graph, block=block, layer=layer, probes=sorted(probes.values(), key=lambda p: p.block),
                      note=note)


