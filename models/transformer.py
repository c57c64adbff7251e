"""Encoder (BERT-like: token + position embeddings, bidirectional, returns hidden states) and decoder
(causal LM, RoPE by default, GQA, returns logits) built from a RunSpec, plus save/load and decoding."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from effx.core.errors import ArtifactError, EffxError
from effx.core.spec import RunSpec
from effx.models.attention import AttentionBase, LayerState, StepInputs
from effx.models.block_sparse import BlockSparseAttention
from effx.models.blocks import MLP, Rotary, make_norm
from effx.models.cache import (
    ContiguousCache,
    HybridCache,
    KVCache,
    MultiscaleCache,
    PagedCache,
    RingCache,
    StateCache,
    zeros_lengths,
)
from effx.models.full import FullAttention
from effx.models.hierarchical import HierarchicalAttention, Hourglass, hourglass_schedule
from effx.models.linear import LinearAttention
from effx.models.linformer import LinformerAttention, init_projection
from effx.models.local import LocalAttention

ATTENTION_CLASSES: dict[str, type[AttentionBase]] = {
    cls.kind: cls
    for cls in (FullAttention, LinformerAttention, LocalAttention, BlockSparseAttention, LinearAttention,
                HierarchicalAttention)
}
CACHE_CLASSES: dict[str, type[KVCache]] = {
    cls.layout: cls for cls in (ContiguousCache, PagedCache, RingCache, StateCache, MultiscaleCache)
}


class Block(nn.Module):
    """Transformer block. Pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x)).
    Post-norm (BERT): norm1(x + attn(x)), then norm2(x + mlp(x)).
    Sandwich (Gemma 2/3): x + norm1_post(attn(norm1(x))), then x + norm2_post(mlp(norm2(x)))."""

    def __init__(self, spec: RunSpec, index: int, rope: nn.Module | None, shared: nn.ParameterDict):
        super().__init__()
        m = spec.model
        self.post_norm = m.norm_position == "post"
        self.norm1 = make_norm(m.norm, m.d_model, m.norm_eps)
        self.attn = ATTENTION_CLASSES[spec.layer(index).attention.kind](spec, index, rope, shared)
        self.norm2 = make_norm(m.norm, m.d_model, m.norm_eps)
        self.mlp = MLP(m.d_model, m.d_ff, m.activation, m.bias)
        if m.norm_position == "sandwich":
            self.norm1_post = make_norm(m.norm, m.d_model, m.norm_eps)
            self.norm2_post = make_norm(m.norm, m.d_model, m.norm_eps)

    def _post(self, name: str, x: Tensor) -> Tensor:
        norm = getattr(self, name, None)
        return x if norm is None else norm(x)

    def forward(self, x: Tensor, positions: Tensor | None = None, key_mask: Tensor | None = None, *,
                state: LayerState | None = None, inputs: StepInputs | None = None):
        """Whole sequence: forward(x, positions, key_mask) -> x. Cached step: forward(x, state=, inputs=) ->
        (x, state); going through the module call puts the block's scope on every exported node."""
        if inputs is not None:
            return self.step(x, state, inputs)
        if self.post_norm:
            x = self.norm1(x + self.attn(x, positions, key_mask))
            return self.norm2(x + self.mlp(x))
        x = x + self._post("norm1_post", self.attn(self.norm1(x), positions, key_mask))
        return x + self._post("norm2_post", self.mlp(self.norm2(x)))

    def step(self, x: Tensor, state: LayerState, inputs: StepInputs) -> tuple[Tensor, LayerState]:
        if self.post_norm:
            a, state = self.attn.step(x, state, inputs)
            x = self.norm1(x + a)
            return self.norm2(x + self.mlp(x)), state
        a, state = self.attn.step(self.norm1(x), state, inputs)
        x = x + self._post("norm1_post", a)
        return x + self._post("norm2_post", self.mlp(self.norm2(x))), state


class EffxModel(nn.Module):
    def __init__(self, spec: RunSpec):
        super().__init__()
        m = spec.model
        self.spec = spec
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.pos_embed = nn.Embedding(m.max_seq_len, m.d_model) if m.pos_encoding == "learned" else None
        layers = spec.resolved_layers()
        # one rotary table per RoPE base in use (Gemma 3: local and global layers differ); buffers, not weights
        self.ropes = nn.ModuleList()
        rope_of: list[int] = []  # layer -> index of its rotary table
        if m.pos_encoding == "rope":
            kinds: list[tuple] = []
            for layer in layers:
                key = (layer.rope_theta, layer.rope_scaling)
                if key not in kinds:
                    kinds.append(key)
                    self.ropes.append(Rotary(m.head_dim, m.max_seq_len, layer.rope_theta, layer.rope_scaling))
                rope_of.append(kinds.index(key))
        self.embed_norm = make_norm(m.norm, m.d_model, m.norm_eps) if m.embed_norm else None
        self.shared = nn.ParameterDict()
        layerwise = [layer.attention for layer in layers
                     if layer.attention.kind == "linformer" and layer.attention.sharing == "layerwise"]
        if layerwise:  # one E for every layerwise-shared Linformer layer
            self.shared["linformer_e"] = init_projection(1, layerwise[0].k, m.max_seq_len)
        self.blocks = nn.ModuleList(
            Block(spec, i, self.ropes[rope_of[i]] if rope_of else None, self.shared)
            for i in range(m.n_layers))
        self.norm = make_norm(m.norm, m.d_model, m.norm_eps) if m.final_norm else None
        self.lm_head = (nn.Linear(m.d_model, m.vocab_size, bias=False)
                        if m.family == "decoder" and not m.tie_embeddings else None)
        # an hourglass shortens and upsamples between its levels (created last: other weights keep their seeds)
        self.hourglass = (Hourglass(spec, [blk.attn.factor for blk in self.blocks])
                          if spec.attention.kind == "hierarchical" else None)

    @property
    def family(self) -> str:
        return self.spec.model.family

    def embed_tokens(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.embed(input_ids)  # (B,N,C)
        if self.spec.model.embed_scale is not None:  # Gemma: sqrt(d_model), rounded to the weights' dtype
            x = x * torch.tensor(self.spec.model.embed_scale, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        return x if self.embed_norm is None else self.embed_norm(x)

    def head(self, x: Tensor) -> Tensor:
        """Hidden states (B,N,C) of an encoder, logits (B,N,V) of a decoder (tied: the embedding matrix;
        soft-capped: c tanh(z / c))."""
        m = self.spec.model
        if self.norm is not None:
            x = self.norm(x)
        if m.family != "decoder":
            return x
        logits = x @ self.embed.weight.T if m.tie_embeddings else self.lm_head(x)
        if m.final_softcap is not None:
            logits = torch.tanh(logits / m.final_softcap) * m.final_softcap
        return logits

    # -- whole sequence ---------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoders: last_hidden_state (B,N,C), attention_mask 1 = token, 0 = padding. Decoders: logits (B,N,V)."""
        b, n = input_ids.shape
        if not torch.compiler.is_compiling() and isinstance(n, int) and n > self.spec.model.max_seq_len:
            raise EffxError(
                f"input length {n} exceeds model.max_seq_len={self.spec.model.max_seq_len}; truncate the input"
            )
        positions = torch.arange(n, device=input_ids.device).expand(b, n)
        x = self.embed_tokens(input_ids, positions)
        if self.hourglass is not None:
            return self.head(self.hourglass(self.blocks, x, positions, attention_mask))
        for block in self.blocks:
            x = block(x, positions, attention_mask)
        return self.head(x)

    # -- incremental decoding ---------------------------------------------------------------------------
    def empty_cache(self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None,
                    capacity: int | None = None, chunk: int = 1) -> KVCache:
        """The cache before the first token: each layer's state in its own layout (one class per layout, or a
        HybridCache when layers differ). Contiguous layers hold `capacity` positions (default max_seq_len);
        ring layers window + `chunk` - 1 slots, `chunk` being the longest step after the prompt."""
        c = self.spec.kv_cache
        if self.family != "decoder" or c.layout == "none":
            raise EffxError(
                f"model.family={self.family} with kv_cache.layout={c.layout} does not decode; "
                "use a decoder with a cache layout (see `effx models`)"
            )
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        specs = [layer.kv_cache for layer in self.spec.resolved_layers()]
        layers = [blk.attn.empty_state(batch, spec, dtype, device, capacity=capacity, chunk=chunk)
                  for blk, spec in zip(self.blocks, specs, strict=True)]
        if self.hourglass is not None:  # each shortening's tail and last output, with the first layer below it
            for b, owner in self.hourglass.owner.items():
                layers[owner] |= self.hourglass.empty_boundary(b, batch, self.spec.model.d_model, dtype, device)
        lengths = zeros_lengths(batch, device)
        layout = self.spec.cache_layout
        paged = next((spec for spec in specs if spec.layout == "paged"), None)
        book = {}
        if paged is not None:  # one block table and allocator for every paged layer
            max_blocks = -(-self.spec.model.max_seq_len // paged.block_size)
            book = dict(block_table=torch.zeros(batch, max_blocks, dtype=torch.int64, device=device),
                        block_size=paged.block_size, free_blocks=list(range(paged.num_blocks)),
                        blocks_used=[0] * batch)
        if layout == "hybrid":
            return HybridCache(lengths, layers, layouts=[spec.layout for spec in specs], **book)
        if layout == "paged":
            return PagedCache(lengths, layers, **book)
        if layout == "ring":
            return RingCache(lengths, layers, window=self.blocks[0].attn.window)
        if layout == "multiscale":
            a = self.spec.attention
            return MultiscaleCache(lengths, layers, factors=hourglass_schedule(self.spec.model.n_layers, a.factors))
        return CACHE_CLASSES[layout](lengths, layers)

    def step(self, input_ids: Tensor, cache: KVCache, new_lengths: Tensor | None = None) -> tuple[Tensor, KVCache]:
        """Run new tokens (B,S) against the cache: logits (B,S,V) and the next cache. A prompt of several
        tokens on an empty cache works; `new_lengths` (B,) lets a paged batch take ragged prompts
        (right-padded input_ids; positions past a row's length are ignored)."""
        b, s = input_ids.shape
        if new_lengths is None:
            new_lengths = torch.full((b,), s, dtype=torch.int64, device=input_ids.device)
        chunk = self.max_step(cache)
        if s > chunk and not bool((cache.lengths == 0).all()):  # more than the ring buffers take at once
            logits = []
            for start in range(0, s, chunk):
                part = (new_lengths - start).clamp(0, chunk)
                out, cache = self.step(input_ids[:, start:start + chunk], cache, part)
                logits.append(out)
            return torch.cat(logits, 1), cache
        longest = int((cache.lengths + s).max())
        if longest > self.spec.model.max_seq_len:
            raise EffxError(
                f"decoding to position {longest} exceeds model.max_seq_len={self.spec.model.max_seq_len}"
            )
        block_table = None
        if isinstance(cache, PagedCache) and cache.block_table is not None:
            cache = cache.reserve(s)
            block_table = cache.block_table
        fresh = bool((cache.lengths == 0).all())
        logits, layers = self.step_tensors(input_ids, cache.lengths, new_lengths, cache.layers, block_table, fresh)
        return logits, cache.replaced(cache.lengths + new_lengths, layers)

    def max_step(self, cache: KVCache) -> int:
        """The most tokens one step after the prompt may take: a ring of C slots for a window of w takes
        C - w + 1 (the host sizes rings for its longest step: empty_cache(chunk=...))."""
        limits = [layer["key"].shape[2] - blk.attn.window + 1
                  for blk, layer, spec in zip(self.blocks, cache.layers, self.spec.resolved_layers(), strict=True)
                  if spec.kv_cache.layout == "ring"]
        return min(limits, default=1 << 62)

    def step_tensors(
        self, input_ids: Tensor, lengths: Tensor, new_lengths: Tensor, layers: list[LayerState],
        block_table: Tensor | None = None, fresh: bool = False,
    ) -> tuple[Tensor, list[LayerState]]:
        """The traceable core of `step` (what the exported prefill and decode graphs compute); fresh=True
        promises an empty cache."""
        b, s = input_ids.shape
        q_pos = lengths[:, None] + torch.arange(s, device=input_ids.device)[None, :]  # (B,S)
        inputs = StepInputs(lengths, q_pos, new_lengths, block_table, fresh)
        x = self.embed_tokens(input_ids, q_pos)
        if self.hourglass is not None:
            x, new_layers = self.hourglass.step(self.blocks, x, layers, inputs)
            return self.head(x), new_layers
        new_layers = []
        for block, state in zip(self.blocks, layers, strict=True):
            x, state = block(x, state=state, inputs=inputs)
            new_layers.append(state)
        return self.head(x), new_layers


# ---------------------------------------------------------------------------------------------- building
def build_model(spec: RunSpec) -> EffxModel:
    """The model for `spec`, initialised deterministically from spec.model.seed, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.model.seed)
        model = EffxModel(spec)
    return model.eval()


def weights_digest(model) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes, bytes): which weights an artifact holds."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


WEIGHTS_NAME = "model.safetensors"
SPEC_NAME = "spec.json"
ORIGIN_NAME = "origin.json"


def save_model(model: EffxModel, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "effx_spec": model.spec.to_json()})
    (folder / SPEC_NAME).write_text(model.spec.to_json() + "\n")
    origin = getattr(model, "origin", None)
    if origin:  # where imported weights came from (effx validate compares a swapped attention with it)
        (folder / ORIGIN_NAME).write_text(json.dumps(origin, indent=2) + "\n")
    return folder


def load_model(folder: str | Path) -> EffxModel:
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / SPEC_NAME).is_file():
        raise ArtifactError(f"{folder}: expected {WEIGHTS_NAME} and {SPEC_NAME}; write them with effx.models.save_model")
    spec = RunSpec.from_json((folder / SPEC_NAME).read_text(), source=str(folder / SPEC_NAME))
    model = build_model(spec)
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ArtifactError(f"{folder / WEIGHTS_NAME}: weights do not match {SPEC_NAME} ({first})") from None
    if (folder / ORIGIN_NAME).is_file():
        model.origin = json.loads((folder / ORIGIN_NAME).read_text())
    return model.eval()
