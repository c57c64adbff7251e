"""The graphs a model exports to: what each takes, returns, and which dimensions are dynamic.

Encoders: one graph, (input_ids, attention_mask) -> last_hidden_state.
Decoders: a prefill graph (a prompt on an empty cache) and a decode-step graph (new tokens against the
cache), both returning logits and the cache after the step as `present.{i}.{name}`; the decode graph takes
the cache as `past.{i}.{name}`. Both are the model's own `step_tensors`, so they are the reference math. An
hourglass also exports decode_fine (Hourglass.step_fine): a step of one token that completes no group, taking
only the factor-1 layers' buffers and the first shortening's tail and last_out.
The buffers of contiguous, ring and paged layers, and of an hourglass's factor-1 layers (contiguous buffers),
belong to the host (host_layers): the prefill takes them too, and the graphs write new keys/values into them
with one ScatterND each, so a runtime can update them in place (the manifest's `aliases`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.export import Dim

from effx.models.attention import LayerState, StepInputs
from effx.models.transformer import EffxModel

HOST_BUFFERS = ("contiguous", "ring", "paged")  # layouts whose cache buffers the host allocates and owns
EXAMPLE_BATCH = 2  # examples of 1 get silently fixed to 1 by the exporter: use >= 2
EXAMPLE_SEQ = 3
EXAMPLE_PAST = 5


def example_lengths(model: EffxModel) -> tuple[int, int]:
    """(new tokens, cached tokens) of the tracing examples. An hourglass must complete >= 2 groups at every
    level in both examples: a size of 1 would be specialised (silently, on an internal dimension) by the
    exporter, and the graphs would only take steps that complete exactly one group."""
    hourglass = getattr(model, "hourglass", None)
    if hourglass is None:
        return EXAMPLE_SEQ, EXAMPLE_PAST
    deepest = max(model.spec.attention.factors)
    return 2 * deepest + 1, EXAMPLE_PAST


@dataclass
class GraphPlan:
    name: str  # file stem and manifest key
    role: str  # encoder | prefill | decode
    module: nn.Module
    args: tuple[Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple
    dim_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> (min, opt, max)
    varargs: bool = False  # module.forward(*args)


def layer_layouts(model: EffxModel) -> list[str]:
    """Each layer's cache layout."""
    return [layer.kv_cache.layout for layer in model.spec.resolved_layers()]


def _full_resolution(model: EffxModel, i: int) -> bool:
    """An hourglass layer at factor 1: its keys/values live in `capacity` slots, as a contiguous layer's."""
    return getattr(model.blocks[i].attn, "factor", None) == 1


def host_layers(model: EffxModel) -> list[bool]:
    """Per layer, whether the host allocates and owns its cache tensors: contiguous, ring and paged layers, and
    an hourglass's factor-1 layers (its shortened levels' pooled caches and tails are made in the prefill)."""
    return [layout in HOST_BUFFERS or (layout == "multiscale" and _full_resolution(model, i))
            for i, layout in enumerate(layer_layouts(model))]


def state_names(model: EffxModel) -> list[list[str]]:
    """Per layer, the names of its cache tensors (the layout fixes them)."""
    cache = model.empty_cache(1)
    return [list(layer) for layer in cache.layers]


class EncoderGraph(nn.Module):
    def __init__(self, model: EffxModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids, attention_mask)


class StepGraph(nn.Module):
    """Decoder step with flat tensor I/O. prefill=True starts from an empty cache made inside the graph
    (paged caches still take the shared block pool, which the host owns)."""

    def __init__(self, model: EffxModel, prefill: bool):
        super().__init__()
        self.model, self.prefill = model, prefill
        self.layouts = layer_layouts(model)
        self.host = host_layers(model)
        self.paged = "paged" in self.layouts
        self.names = state_names(model)

    def forward(self, *args: Tensor):
        args = list(args)
        input_ids = args.pop(0)
        batch, seq = input_ids.shape
        if self.prefill:
            lengths = torch.zeros_like(input_ids[:, 0])
        else:
            lengths = args.pop(0)
        if self.paged:
            new_lengths, block_table = args.pop(0), args.pop(0)
        else:
            new_lengths, block_table = torch.full_like(input_ids[:, 0], seq), None
        in_graph = self.prefill and not all(self.host)
        empty = self.model.empty_cache(1).layers if in_graph else None
        layers = []
        for i, names in enumerate(self.names):
            if self.prefill and not self.host[i]:  # an empty state, made in the graph
                layers.append({k: _like_batch(t, input_ids) for k, t in empty[i].items()})
            else:  # the decode graph's cache, and the host's buffers (the prefill writes into them)
                layers.append({n: args.pop(0) for n in names})
        logits, new_layers = self.model.step_tensors(input_ids, lengths, new_lengths, layers, block_table,
                                                     fresh=self.prefill)
        return (logits, *[t for layer in new_layers for t in layer.values()])


class FineStepGraph(nn.Module):
    """An hourglass's decode step of one token that completes no group (Hourglass.step_fine): it takes and
    returns only what such a step reads and writes, the factor-1 layers' buffers and the first shortening's tail
    (plus its last_out, read only)."""

    def __init__(self, model: EffxModel):
        super().__init__()
        self.model = model
        hourglass = model.hourglass
        self.fine = hourglass.fine_layers()
        self.owner = hourglass.owner[0]

    def forward(self, *args: Tensor):
        input_ids, lengths, *states_ = args
        layers: dict[int, dict[str, Tensor]] = {i: {"key": states_.pop(0), "value": states_.pop(0)} for i in self.fine}
        layers[self.owner] = {"tail": states_.pop(0), "last_out": states_.pop(0)}
        q_pos = lengths[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]  # (B,S)
        inputs = StepInputs(lengths, q_pos, torch.full_like(lengths, input_ids.shape[1]))
        x = self.model.embed_tokens(input_ids, q_pos)
        x, changed = self.model.hourglass.step_fine(self.model.blocks, x, layers, inputs)
        return (self.model.head(x), *[changed[i][n] for i in self.fine for n in ("key", "value")],
                changed[self.owner]["tail"])


def _like_batch(t: Tensor, input_ids: Tensor) -> Tensor:
    """An empty-cache tensor with the batch size of input_ids (batch-free shapes, e.g. pools, stay)."""
    return t.new_zeros((input_ids.shape[0], *t.shape[1:]))


def plan_graphs(model: EffxModel, max_batch: int = 8) -> list[GraphPlan]:
    spec = model.spec
    max_seq = spec.model.max_seq_len
    batch = Dim("batch", min=1, max=max(max_batch, EXAMPLE_BATCH))
    seq = Dim("sequence", min=1, max=max_seq)
    batch_range = (1, 1, max(max_batch, EXAMPLE_BATCH))
    seq_range = (1, min(128, max_seq), max_seq)
    g = torch.Generator().manual_seed(spec.model.seed)
    new, past = example_lengths(model)
    ids = torch.randint(0, spec.model.vocab_size, (EXAMPLE_BATCH, new + past), generator=g)
    if spec.model.family == "encoder":
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # an example with padding, so the mask path is traced
        return [GraphPlan("model", "encoder", EncoderGraph(model), (ids, mask), ["input_ids", "attention_mask"],
                          ["last_hidden_state"], ({0: batch, 1: seq}, {0: batch, 1: seq}),
                          {"batch": batch_range, "sequence": seq_range})]
    if spec.kv_cache.layout == "none":
        return [GraphPlan("model", "prefill", _LogitsOnly(model), (ids,), ["input_ids"], ["logits"],
                          ({0: batch, 1: seq},), {"batch": batch_range, "sequence": seq_range})]
    plans = [_prefill_plan(model, ids, batch, seq, batch_range, seq_range),
             _decode_plan(model, ids, batch, seq, batch_range, seq_range)]
    hourglass = getattr(model, "hourglass", None)
    if hourglass is not None and hourglass.first_ratio is not None:
        plans.append(_decode_fine_plan(model, ids, batch, batch_range))
    return plans


class _LogitsOnly(nn.Module):
    def __init__(self, model: EffxModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)


def _flat(layers: list[LayerState], prefix: str) -> tuple[list[Tensor], list[str]]:
    tensors, names = [], []
    for i, layer in enumerate(layers):
        for name, t in layer.items():
            tensors.append(t)
            names.append(f"{prefix}.{i}.{name}")
    return tensors, names


def buffer_dims(model: EffxModel) -> dict[int, Dim]:
    """The sequence axis of the host's buffers, per layer: one `capacity` (positions a contiguous layer holds,
    what the host will cache) shared by the contiguous layers, `ring_{i}` slots for a ring layer (at least its
    window; window + longest step - 1 lets a step of several tokens be written before it is attended)."""
    max_len = model.spec.model.max_seq_len
    capacity = Dim("capacity", min=1, max=max_len)
    dims = {}
    for i, layout in enumerate(layer_layouts(model)):
        if layout == "contiguous" or (layout == "multiscale" and _full_resolution(model, i)):
            dims[i] = capacity
        elif layout == "ring":
            w = model.blocks[i].attn.window
            dims[i] = Dim(f"ring_{i}", min=w, max=w + max_len)
    return dims


def buffer_ranges(model: EffxModel) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of the buffer dims, for TensorRT profiles: decode steps of one token."""
    max_len = model.spec.model.max_seq_len
    ranges = {}
    for i, layout in enumerate(layer_layouts(model)):
        if layout == "contiguous" or (layout == "multiscale" and _full_resolution(model, i)):
            ranges["capacity"] = (1, min(128, max_len), max_len)
        elif layout == "ring":
            w = model.blocks[i].attn.window
            ranges[f"ring_{i}"] = (w, w, w + max_len)
    return ranges


def _state_dims(model: EffxModel, batch: Dim) -> list[dict[int, Dim]]:
    """Dynamic axes of each cache tensor: batch (not for pools), the host buffers' sequence axis (hourglass
    layers at factor 1 included), and the lengths that grow per layer: the pooled tokens of an hourglass level
    (one Dim per factor: every layer of a level holds as many), the tail of a shortening (0 .. k - 1
    activations)."""
    layouts = layer_layouts(model)
    max_len = model.spec.model.max_seq_len
    buffers = buffer_dims(model)
    level: dict[int, Dim] = {}
    dims = []
    for i, layer in enumerate(model.empty_cache(1).layers):
        layout = layouts[i]
        factor = getattr(model.blocks[i].attn, "factor", 1)
        for name in layer:
            if layout == "paged":
                dims.append({})
            elif i in buffers:
                dims.append({0: batch, 2: buffers[i]})
            elif layout == "multiscale" and name in ("key", "value"):
                level.setdefault(factor, Dim(f"past_groups_f{factor}", min=0, max=max_len))
                dims.append({0: batch, 2: level[factor]})
            elif layout == "multiscale" and name == "tail":
                dims.append({0: batch, 1: Dim(f"tail_{i}", min=0, max=max_len)})
            else:
                dims.append({0: batch})
    return dims


def _example_cache(model: EffxModel, ids: Tensor):
    # rings sized for the example step; the tracing capacity (max_seq_len) differs from every other example size
    cache = model.empty_cache(ids.shape[0], chunk=example_lengths(model)[0])
    with torch.no_grad():
        _, cache = model.step(ids[:, :example_lengths(model)[1]], cache)
    return cache


def _prefill_plan(model, ids, batch, seq, batch_range, seq_range) -> GraphPlan:
    layouts = layer_layouts(model)
    host = host_layers(model)
    new, _ = example_lengths(model)
    prompt = ids[:, :new]
    args: list[Tensor] = [prompt]
    names = ["input_ids"]
    dyn: list = [{0: batch, 1: seq}]
    empty = model.empty_cache(ids.shape[0], chunk=new)
    if "paged" in layouts:
        empty = empty.reserve(new)
        args += [torch.full((ids.shape[0],), new, dtype=torch.int64), empty.block_table]
        names += ["new_lengths", "block_table"]
        dyn += [{0: batch}, {0: batch}]
    state_dims = _state_dims(model, batch)
    k = 0
    for i, layer in enumerate(empty.layers):  # the host's buffers: the prefill writes into them
        for name, t in layer.items():
            if host[i]:
                args.append(t)
                names.append(f"past.{i}.{name}")
                dyn.append(state_dims[k])
            k += 1
    _, out_names = _flat(empty.layers, "present")
    ranges = {"batch": batch_range, "sequence": seq_range} | buffer_ranges(model)
    return GraphPlan("prefill", "prefill", StepGraph(model, prefill=True), tuple(args), names,
                     ["logits", *out_names], tuple(dyn), ranges, varargs=True)


def _decode_plan(model, ids, batch, seq, batch_range, seq_range) -> GraphPlan:
    cache = _example_cache(model, ids)
    n_new, n_past = example_lengths(model)
    new = ids[:, n_past:n_past + n_new]
    args: list[Tensor] = [new, cache.lengths.clone()]
    names = ["input_ids", "past_lengths"]
    dyn: list = [{0: batch, 1: seq}, {0: batch}]
    if "paged" in layer_layouts(model):
        cache = cache.reserve(n_new)
        args += [torch.full((ids.shape[0],), n_new, dtype=torch.int64), cache.block_table]
        names += ["new_lengths", "block_table"]
        dyn += [{0: batch}, {0: batch}]
    states, state_names_ = _flat(cache.layers, "past")
    args += [t.clone() for t in states]
    names += state_names_
    dyn += _state_dims(model, batch)
    _, out_names = _flat(cache.layers, "present")
    max_seq = model.spec.model.max_seq_len
    ranges = {"batch": batch_range, "sequence": (1, 1, max_seq), "past_sequence": (0, min(128, max_seq), max_seq)}
    ranges |= buffer_ranges(model)
    return GraphPlan("decode", "decode", StepGraph(model, prefill=False), tuple(args), names,
                     ["logits", *out_names], tuple(dyn), ranges, varargs=True)


def _decode_fine_plan(model, ids, batch, batch_range) -> GraphPlan:
    """decode_fine: one new token that completes no group, after a prompt that leaves the first shortening's
    group open (its example must not complete one, or it would trace the general step)."""
    hourglass = model.hourglass
    k = hourglass.first_ratio
    past = EXAMPLE_PAST if EXAMPLE_PAST % k else EXAMPLE_PAST + 1
    cache = model.empty_cache(ids.shape[0])
    with torch.no_grad():
        _, cache = model.step(ids[:, :past], cache)
    graph = FineStepGraph(model)
    flat_names = [f"{i}.{n}" for i, layer in enumerate(cache.layers) for n in layer]
    flat_dims = dict(zip(flat_names, _state_dims(model, batch), strict=True))
    taken = [(i, n) for i in graph.fine for n in ("key", "value")] + [(graph.owner, "tail"), (graph.owner, "last_out")]
    args: list[Tensor] = [ids[:, past:past + 1], cache.lengths.clone()]
    args += [cache.layers[i][n].clone() for i, n in taken]
    names = ["input_ids", "past_lengths", *[f"past.{i}.{n}" for i, n in taken]]
    dyn = [{0: batch}, {0: batch}, *[flat_dims[f"{i}.{n}"] for i, n in taken]]
    outputs = ["logits", *[f"present.{i}.{n}" for i, n in taken[:-1]]]  # last_out is only read
    ranges = {"batch": batch_range} | buffer_ranges(model)
    return GraphPlan("decode_fine", "decode", graph, tuple(args), names, outputs, tuple(dyn), ranges, varargs=True)
