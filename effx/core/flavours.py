"""Attention op flavours: for each attention site, whether the export writes the standard ONNX op or effx's
own form. A target profile (effx.targets.profiles) holds the choice, measured on its runtime; the exporter
receives it as the export option `attention_ops` (`--attention-ops local=effx,full=onnx`).

Sites and what each flavour exports:
- `full`: full attention (whole sequences and cached steps). onnx: ONNX `Attention` (opset >= 23; with
  soft-capping, opset >= 25 for its `softcap`). effx: the decomposed MatMul/Softmax math (Q scaled first).
- `local`: sliding-window attention over a whole sequence (encoders, prefill). onnx: ONNX `Attention`-25
  with `left_window_size`/`right_window_size` (opset >= 25). effx: the `effx::LocalAttention` node with its
  function body (banded, O(n w), for long sequences).
- `local-step`: sliding-window attention of a cached decode step. onnx: ONNX `Attention` with the window as a
  boolean mask over the cache slots (opset >= 23; with soft-capping >= 25). effx: `effx::LocalAttention`.
- `linear`: causal linear attention (decoders: prefill and decode steps). onnx: ONNX `LinearAttention`-27
  (update_rule linear) with the feature maps around it and the normaliser as an extra value column (opset >= 27).
  effx: `effx::NormalizedLinearAttentionState`. Encoders (non-causal) always keep `effx::NormalizedLinearAttention`.
Where the opset is below what the standard op needs, the export takes the effx form; graphs for TensorRT's
plugins (`--trt-plugins`) keep every effx node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from effx.core.errors import SpecError

ONNX, EFFX = "onnx", "effx"
FLAVOURS = (ONNX, EFFX)
SITES = {
    "full": "full attention (whole sequences and cached steps)",
    "local": "sliding-window attention over a whole sequence (encoders, prefill)",
    "local-step": "sliding-window attention of a cached decode step",
    "linear": "causal linear attention (decoders: prefill and decode steps)",
}
ATTENTION_OPSET = 23  # ONNX Attention
WINDOW_OPSET = 25  # ONNX Attention with left/right_window_size and softcap
LINEAR_ATTENTION_OPSET = 27  # ONNX LinearAttention


# ONNX Runtime on the CPU: the `cpu` target's choice (effx.targets.profiles) and so `effx export`'s default.
# Measured by benchmarks/attention_flavours.py (benchmarks/results/attention_flavours.json; 2 threads, shared
# machine, load average 3-6):
# - local: ORT 1.32's CPU Attention-25 computes the n x n scores whatever the window (its 16K out-of-memory error
#   comes from a MatMul node: apparently the op's function body): at 4K 6.6 s / 1.6 GB (encoder) and 15.8 s / 1.8 GB (causal) against effx's banded body's 0.79 s /
#   358 MB and 0.59 s / 242 MB; at 16K out of memory under 8 GB, effx 3.6-4.3 s. -> effx.
# - local-step: a 2-layer decoder's decode step after 1K tokens, least disturbed of 3 alternating rounds:
#   2.03 ms (129 tok/s) with ONNX Attention vs 2.09 ms (135 tok/s) with effx's body; within noise, as the op
#   alone is (0.24 vs 0.09 ms, a small part of a step). benchmarks/results/hybrid_decode.json measured a
#   6-layer hybrid at 24.7 tok/s with ONNX Attention vs 15.3 with effx's body (1K context). -> onnx.
# - full: no consistent winner (causal prefill 1K: effx math 0.76x the time of ONNX Attention in this run,
#   1.2x in a quieter trial run, not recorded; 4K: 1.08x): the standard op stays (one node; TensorRT >= 10.14 imports it).
# linear: ORT's LinearAttention-27 against effx's prefix-sum body, causal prefill, 8 heads x 64: 10.6x / 3.8x / 3.2x
# faster at 1K / 4K / 16K with 8x / 15x / 15x less memory (benchmarks/results/attention_flavours_linear.json).
ORT_CPU_ATTENTION_OPS = {"full": ONNX, "local": EFFX, "local-step": ONNX, "linear": ONNX}
DEFAULT_ATTENTION_OPS = ORT_CPU_ATTENTION_OPS


def parse_attention_ops(text: str | Iterable[str], flag: str = "--attention-ops") -> dict[str, str]:
    """`site=flavour` items (a comma-separated string or an iterable) -> {site: flavour}; one-line SpecError
    naming the bad item and the accepted values."""
    items = text.split(",") if isinstance(text, str) else list(text)
    choice: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        site, sep, flavour = (part.strip() for part in item.partition("="))
        if not sep or site not in SITES or flavour not in FLAVOURS:
            raise SpecError(f"{flag} {item!r}: write SITE=FLAVOUR with SITE one of {', '.join(SITES)} and FLAVOUR "
                            f"one of {', '.join(FLAVOURS)} (e.g. local=effx,full=onnx)")
        if site in choice and choice[site] != flavour:
            raise SpecError(f"{flag}: {site} is given twice ({choice[site]}, {flavour}); keep one")
        choice[site] = flavour
    return choice


def resolve_attention_ops(base: Mapping[str, str] | Iterable[str], override: str | None = None) -> dict[str, str]:
    """A complete choice: every site from `base` (a profile's choice), with `override` (the export option)
    replacing the sites it names."""
    choice = dict(base) if isinstance(base, Mapping) else parse_attention_ops(base, "op_flavours")
    missing = [s for s in SITES if s not in choice]
    if missing:
        raise SpecError(f"op_flavours {format_attention_ops(choice)!r} leaves out {', '.join(missing)}; "
                        "give every site a flavour")
    return choice | (parse_attention_ops(override) if override else {})


def format_attention_ops(choice: Mapping[str, str]) -> str:
    return ",".join(f"{site}={choice[site]}" for site in SITES if site in choice)


def standard_op_opset(site: str, softcap: bool) -> int:
    """The ai.onnx opset the standard op of `site` needs (soft-capping needs Attention-25's `softcap`)."""
    if site == "linear":
        return LINEAR_ATTENTION_OPSET
    return WINDOW_OPSET if site == "local" or softcap else ATTENTION_OPSET


def effective_attention_ops(choice: Mapping[str, str], opset: int, softcap: bool, trt_plugins: bool) -> dict[str, str]:
    """What an export writes per site for `choice`: the standard op only where the opset has it (soft-capping:
    Attention-25) and, in `--trt-plugins` graphs, only for full attention without soft-capping (an effx node
    exists for the rest). The models apply the same rule (effx.models.attention.takes_standard_op)."""
    def standard(site: str) -> bool:
        return _wants_standard(choice, site, softcap, trt_plugins) and opset >= standard_op_opset(site, softcap)
    return {site: ONNX if standard(site) else EFFX for site in SITES}


def _wants_standard(choice: Mapping[str, str], site: str, softcap: bool, trt_plugins: bool) -> bool:
    """The flavour of `site` is onnx and the graph may hold the standard op: `--trt-plugins` graphs keep effx
    nodes wherever one exists (all but full attention without soft-capping)."""
    return choice[site] == ONNX and (not trt_plugins or (site == "full" and not softcap))


def opset_for(choice: Mapping[str, str], sites: Iterable[str], softcap: bool, trt_plugins: bool, default: int,
              newest: int) -> int:
    """The ai.onnx opset an export takes when none is asked for: `default`, raised to the newest opset a standard
    op needs for the `sites` the model has whose flavour is onnx (Attention-25 for windows or soft-capping,
    LinearAttention-27), never above `newest`. Graphs for TensorRT's plugins keep effx nodes, so they raise
    nothing beyond full attention's."""
    need = max((standard_op_opset(site, softcap) for site in sites
                if _wants_standard(choice, site, softcap, trt_plugins)), default=default)
    return min(max(need, default), newest)
