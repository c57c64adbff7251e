"""The hourglass transformer (Nawrot et al. 2021, "Hierarchical Transformers Are More Efficient Language
Models", Alg. 1): whole layers run at shortened resolutions.

    x  = PreVanilla(x)                                  layers at factor 1
    x' = Shorten(ShiftRight(x, k - 1), k)               average (or learned linear) pooling over groups of k
    x' = ShortenedLayers(x')                             attention AND MLP on n/k tokens (recursively: [1, 4, 16])
    x  = x + Upsample(x', k)                             repeat (or learned linear), residual from before shortening
    x  = PostVanilla(x)

`attention.factors` [1, 4, 16] gives levels 1, 4, 16, 4, 1 over the layers (hourglass_schedule). Decoders
shift right by k - 1 before pooling (§2.2, App. A.2): pooled token j averages positions jk - k + 1 .. jk, and
position p reads pooled token floor(p / k), which ends at or before p, so no future token leaks. Encoders
pool without the shift (padding pools as zeros; a pooled token is real if any of its tokens is). Every layer
is exact softmax attention at its level's resolution (SDPA; ONNX `Attention` at opset >= 23), so no n x n
tensor exists at a shortened level.

Decoding (multiscale cache): every layer caches keys/values at its level. Factor-1 layers keep them as a
contiguous layer does, in the host's buffers of `capacity` slots (token p in slot p, written by one ScatterND a
runtime can run in place), so a decode step copies no cache; a factor-k level's pooled keys/values grow by one
entry per k tokens. Each shortening keeps, in the cache of the first layer below it, the activations
since the last complete group (`tail`, starting as the k - 1 zeros of the shift) and the shortened level's
output for the newest group (`last_out`): a new token runs the shortened layers only when it completes a
group, and positions inside a group reuse `last_out`. With factors [1] this is the base transformer.

A step that completes no group (no new position p with p % k == 0, k the first shortening's ratio: a deeper
level pools groups of the level above, so it completes nothing either) has nothing to run below the first
shortening: `Hourglass.step_fine` runs only the factor-1 layers, appends to the first tail and upsamples the
first level's `last_out`. It exports as its own graph (decode_fine) that the host protocol picks for such steps,
so they neither run the shortened levels on zero rows nor carry their caches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from effx.core.errors import EffxError
from effx.models.attention import StepInputs
from effx.models.full import FullAttention
from effx.plugins.common import causal_allowed, softmax_attention


def hourglass_schedule(n_layers: int, factors: list[int]) -> list[int]:
    """Shorten factor of each layer: levels down and back up (1, 4, 16, 4, 1), extra layers to the middle.
    With fewer layers than levels the way back up is cut short (2 layers, [1, 2]: 1, 2): every level going
    down keeps its layer, so the model still starts at full resolution."""
    levels = factors + factors[-2::-1]
    if n_layers < len(levels):
        return levels[:n_layers]
    sizes = [n_layers // len(levels)] * len(levels)
    middle = len(levels) // 2
    for i in range(n_layers % len(levels)):
        sizes[middle + (i + 1) // 2 * (1 if i % 2 else -1)] += 1
    return [f for f, size in zip(levels, sizes, strict=True) for _ in range(size)]


class HierarchicalAttention(FullAttention):
    """A layer of the hourglass: exact softmax attention over the sequence of its level (whole tokens at factor
    1, pooled tokens at factor k), cached contiguously at that level."""

    kind = "hierarchical"
    paged_window = None

    def __init__(self, spec, layer_index, rope, shared=None):
        super().__init__(spec, layer_index, rope, shared)
        self.factor = hourglass_schedule(spec.model.n_layers, self.params.factors)[layer_index]

    def empty_state(self, batch, cache_spec, dtype, device, capacity=None, chunk=1):
        """Factor 1: the host's buffers of `capacity` slots (default max_seq_len), as a contiguous layer's; a
        shortened level: no pooled keys/values yet."""
        if cache_spec.layout != "multiscale":
            raise EffxError(f"kv_cache.layout={cache_spec.layout} does not fit attention.kind=hierarchical")
        slots = (capacity or self.max_seq_len) if self.factor == 1 else 0
        z = torch.zeros(batch, self.n_kv_heads, slots, self.head_dim, dtype=dtype, device=device)
        return {"key": z, "value": z.clone()}

    def attend_step(self, q, k, v, state, inputs):
        if self.factor == 1:  # full resolution: write into the buffers (in place where the runtime can), attend
            return self._step_contiguous(q, k, v, state, inputs)
        # a decode step of a shortened level has no new query when no group completes: the explicit form runs on
        # zero rows (ONNX Runtime's Attention kernel refuses an empty query)
        k_all, v_all = torch.cat([state["key"], k], 2), torch.cat([state["value"], v], 2)  # (B,H_kv,J+g,D)
        k_pos = torch.arange(k_all.shape[2], device=k.device).expand(k.shape[0], -1)
        y = softmax_attention(q, k_all, v_all, causal_allowed(inputs.q_pos, k_pos), self.scale)
        return y, {"key": k_all, "value": v_all}


class Shorten(nn.Module):
    """Groups of k tokens -> one: their mean, or a learned linear map of the concatenated group (LinearPool)."""

    def __init__(self, d_model: int, ratio: int, kind: str):
        super().__init__()
        self.ratio, self.kind = ratio, kind
        if kind == "linear":
            self.proj = nn.Linear(ratio * d_model, d_model)

    def pool(self, x: Tensor) -> Tensor:
        """(B, g * k, C) -> (B, g, C)."""
        b, n, c = x.shape
        groups = x.reshape(b, n // self.ratio, self.ratio, c)  # (B,g,k,C)
        return groups.mean(2) if self.kind == "avg" else self.proj(groups.reshape(b, n // self.ratio, self.ratio * c))

    def forward(self, x: Tensor, causal: bool, key_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The whole sequence shortened: (B, n, C) -> (B, ceil(n/k), C), and the pooled key mask."""
        b, n, c = x.shape
        k = self.ratio
        groups = (n + k - 1) // k  # ceil without negative floor division (ONNX Div truncates)
        if key_mask is not None:
            x = x * key_mask[:, :, None].to(x.dtype)  # padding pools as zeros
        shift = k - 1 if causal else 0  # decoders: shift right by k - 1 (no future token in a group)
        fill = groups * k - n  # encoders: zeros to whole groups; decoders: the shift covers it
        padded = torch.cat([x.new_zeros(b, shift, c), x, x.new_zeros(b, fill, c)], 1)[:, :groups * k]
        mask = None
        if key_mask is not None:
            m = torch.cat([key_mask.new_zeros(b, shift), key_mask, key_mask.new_zeros(b, fill)], 1)[:, :groups * k]
            mask = m.reshape(b, groups, k).amax(-1)  # a pooled token is real if any of its tokens is
        return self.pool(padded), mask


class Upsample(nn.Module):
    """One pooled token -> k positions: repeat, or a learned linear map per offset in the group."""

    def __init__(self, d_model: int, ratio: int, kind: str):
        super().__init__()
        self.ratio, self.kind = ratio, kind
        if kind == "linear":
            self.proj = nn.Linear(d_model, ratio * d_model)

    def expand(self, y: Tensor) -> Tensor:
        """(B, g, C) -> (B, g, k, C): the value each offset of each group takes."""
        b, g, c = y.shape
        if self.kind == "repeat":
            return y[:, :, None].expand(b, g, self.ratio, c)
        return self.proj(y).reshape(b, g, self.ratio, c)

    def forward(self, y: Tensor, n: int) -> Tensor:
        """Position p < n takes group p // k: (B, g, C) -> (B, n, C)."""
        b, g, c = y.shape
        return self.expand(y).reshape(b, g * self.ratio, c)[:, :n]

    def at(self, y: Tensor, groups: Tensor, offsets: Tensor) -> Tensor:
        """Positions given by (group index into y, offset in the group), both (B, S): (B, S, C)."""
        e = self.expand(y)  # (B,g,k,C)
        b, g, k, c = e.shape
        flat = (groups * k + offsets)[:, :, None].expand(-1, -1, c)
        return e.reshape(b, g * k, c).gather(1, flat)


class Hourglass(nn.Module):
    """The shortenings and upsamplings between the levels of the layers, and the walk over them."""

    def __init__(self, spec, factors: list[int]):
        super().__init__()
        a, m = spec.attention, spec.model
        self.causal = m.causal
        self.factors = factors  # per layer
        self.shorten = nn.ModuleList()
        self.upsample = nn.ModuleList()
        self.transitions: list[list[tuple[str, int]]] = []  # before each layer: ("down" | "up", boundary)
        stack: list[int] = []
        current = 1
        for f in factors:
            moves = []
            while f > current:  # levels go one step at a time: 1 -> 4 -> 16
                nxt = next(x for x in a.factors if x > current)
                self.shorten.append(Shorten(m.d_model, nxt // current, a.shorten))
                self.upsample.append(Upsample(m.d_model, nxt // current, a.upsample))
                stack.append(len(self.shorten) - 1)
                moves.append(("down", stack[-1]))
                current = nxt
            while f < current:
                moves.append(("up", stack.pop()))
                current = max(x for x in a.factors if x < current)
            self.transitions.append(moves)
        self.final = [("up", b) for b in reversed(stack)]  # back to full resolution after the last layer
        # the layer that keeps a boundary's decode state (tail, last_out): the first one below it
        self.owner = {b: i for i, moves in enumerate(self.transitions) for kind, b in moves if kind == "down"}

    # -- whole sequence ------------------------------------------------------------------------------------
    def forward(self, blocks: nn.ModuleList, x: Tensor, positions: Tensor, key_mask: Tensor | None) -> Tensor:
        stack: list[tuple[Tensor, Tensor, Tensor | None]] = []
        for block, moves in zip(blocks, self.transitions, strict=True):
            x, positions, key_mask = self._move(moves, x, positions, key_mask, stack)
            x = block(x, positions, key_mask)
        x, _, _ = self._move(self.final, x, positions, key_mask, stack)
        return x

    def _move(self, moves, x, positions, key_mask, stack):
        for kind, b in moves:
            if kind == "down":
                stack.append((x, positions, key_mask))
                x, key_mask = self.shorten[b](x, self.causal, key_mask)
                positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            else:
                x_res, positions, key_mask = stack.pop()
                x = x_res + self.upsample[b](x, x_res.shape[1])
        return x, positions, key_mask

    # -- decoding --------------------------------------------------------------------------------------------
    def empty_boundary(self, b: int, batch: int, d_model: int, dtype, device) -> dict[str, Tensor]:
        """A boundary's state before the first token: the k - 1 zeros of the shift, and no output yet."""
        k = self.shorten[b].ratio
        return {"tail": torch.zeros(batch, k - 1, d_model, dtype=dtype, device=device),
                "last_out": torch.zeros(batch, 1, d_model, dtype=dtype, device=device)}

    def step(self, blocks: nn.ModuleList, x: Tensor, states: list[dict[str, Tensor]],
             inputs: StepInputs) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """New tokens (B, S, C) at positions inputs.q_pos against every layer's cache; levels below run only
        for the groups the new tokens complete."""
        new_states = [dict(s) for s in states]
        stack: list[tuple] = []
        level = inputs
        for i, (block, moves) in enumerate(zip(blocks, self.transitions, strict=True)):
            x, level = self._step_move(moves, x, level, new_states, stack)
            attn = {k: v for k, v in new_states[i].items() if k in ("key", "value")}
            x, attn = block(x, state=attn, inputs=level)
            new_states[i] |= attn
        x, _ = self._step_move(self.final, x, level, new_states, stack)
        return x, new_states

    @property
    def first_ratio(self) -> int | None:
        """k of the first shortening (None without one): a step completes a group only where a new position p
        has p % k == 0."""
        return self.shorten[0].ratio if len(self.shorten) else None

    def completes_group(self, lengths: int, new_tokens: int) -> bool:
        """Whether positions lengths .. lengths + new_tokens - 1 complete a group of the first shortening."""
        k = self.first_ratio
        return k is not None and (lengths + new_tokens - 1) // k * k >= lengths

    def fine_layers(self) -> list[int]:
        """The layers a step that completes no group runs: those at full resolution."""
        return [i for i, f in enumerate(self.factors) if f == 1]

    def step_fine(self, blocks: nn.ModuleList, x: Tensor, states: list[dict[str, Tensor]],
                  inputs: StepInputs) -> tuple[Tensor, dict[int, dict[str, Tensor]]]:
        """New tokens (B, S, C) that complete no group (the caller's promise, see completes_group): only the
        factor-1 layers run. Returns the output and the states that change: the factor-1 layers' key/value and
        the first shortening's tail (under its owner layer)."""
        k, owner = self.first_ratio, self.owner[0]
        changed: dict[int, dict[str, Tensor]] = {}
        below = None  # the activations before the first shortening, while the walk is below it

        def move(moves, x):
            nonlocal below
            for kind, b in moves:
                if b != 0:  # deeper levels: nothing reaches them
                    continue
                if kind == "down":
                    changed[owner] = {"tail": torch.cat([states[owner]["tail"], x], 1)}  # fewer than k rows
                    below = x
                else:  # every new position lies in the newest group: the level's output for it, upsampled
                    offsets = inputs.q_pos % k
                    x = below + self.upsample[0].at(states[owner]["last_out"], torch.zeros_like(offsets), offsets)
                    below = None
            return x

        for i, (block, moves) in enumerate(zip(blocks, self.transitions, strict=True)):
            x = move(moves, x)
            if below is None:
                x, attn = block(x, state={n: states[i][n] for n in ("key", "value")}, inputs=inputs)
                changed[i] = attn
        return move(self.final, x), changed

    def _step_move(self, moves, x, level: StepInputs, states, stack):
        for kind, b in moves:
            owner = states[self.owner[b]]
            k = self.shorten[b].ratio
            if kind == "down":
                c = torch.cat([owner["tail"], x], 1)  # activations since the last complete group, then the new ones
                done = c.shape[1] // k * k
                pooled = self.shorten[b].pool(c[:, :done])  # (B, g, C): the groups completed now
                owner["tail"] = c[:, done:]
                stack.append((x, level, b))
                j = (level.lengths + k - 1) // k  # (B,) pooled tokens before this step: ceil(P / k)
                g = pooled.shape[1]
                q_pos = j[:, None] + torch.arange(g, device=x.device)[None, :]
                level = StepInputs(j, q_pos, torch.full_like(j, g), None, level.fresh)
                x = pooled
            else:
                x_res, outer, b = stack.pop()
                outs = torch.cat([owner["last_out"], x], 1)  # index 0: the newest group before this step
                owner["last_out"] = outs[:, -1:]
                j = (outer.lengths + k - 1) // k
                group = outer.q_pos // k - (j[:, None] - 1)  # each new position's group, as an index into outs
                x = x_res + self.upsample[b].at(outs, group, outer.q_pos % k)
                level = outer
        return x, level
