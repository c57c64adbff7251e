"""Attention transfer (`effx adapt`): a pretrained model keeps its quality when its attention is swapped.

    teacher = the model as loaded (its own attention);  student = the same weights with the new attention kind

Stage 1 (LoLCATs, Zhang et al. 2024, "attention transfer") trains only what the swap adds (Linformer E/F,
Hedgehog's learned feature maps for linear attention, which start as the identity) so that every layer's attention output matches the teacher's, both attentions reading the teacher's own
input of that layer:
    L1 = 1000 * mean_l mean((attn_l^student(x_l) - attn_l^teacher(x_l))^2),   x_l = teacher's input of layer l
Linformer's E/F start as average pooling over the training length (the imported random projections mix
all positions; pooling is already close), as the first k positions one by one with `init="prefix"` (short,
padded inputs: exact up to k tokens but for the empty rows' softmax share), or as imported (`init="import"`).
Stage 2 (LoRA, Hu et al. 2021; on by default where stage 1 has nothing to train: local, block-sparse, elu or
FAVOR+ linear) trains rank-r adapters W + (alpha / r) B A on q/k/v/o of every layer against the teacher's
hidden states (relative MSE of every block's output, plus 1 - cosine of the mean-pooled embedding for
encoders or next-token KL for decoders), and merges them into W at the end, so the saved folder
is an ordinary effx model (`effx export --model`, `effx validate --reference` read it like any other).

Text: plain files tokenized with the model folder's own tokenizer, packed into sequences of `seq` tokens
(with the tokenizer's [CLS]/[SEP] or BOS); the last `held_out` share of the sequences is never trained on and
gives the metrics: encoders, mean-pooled embedding cosine with the teacher; decoders, perplexity of teacher
and student.

Determinism and resume: the batch of step t is drawn from a generator seeded by (seed, stage, t) and LoRA's
initialisation from the seed, so a run resumed from a checkpoint (trainable tensors + AdamW state, every
`checkpoint_every` steps and on Ctrl-C, in the sibling folder OUT.checkpoint) reaches the same weights as an
uninterrupted one. The finished folder keeps that state (checkpoint.pt), so `--resume` with more steps
continues an earlier output.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from effx.core.atomic import atomic_dir, check_output_dir, read_marker
from effx.core.errors import ArtifactError, OutputPathError, SpecError
from effx.core.lazy import lazy_import
from effx.models.hf_import import import_hf
from effx.models.transformer import EffxModel, load_model, save_model
from effx.plugins.opspec import differentiable_ops

COMMAND = "adapt"
CHECKPOINT_COMMAND = "adapt-checkpoint"
STATE_NAME = "checkpoint.pt"
REPORT_NAME = "adapt.json"
PLOT_NAME = "loss.png"
STAGE1, STAGE2 = "attention_transfer", "lora"
# a folder holds a tokenizer when it has one of these (fast tokenizer, WordPiece, BPE, SentencePiece)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")

StepCallback = Callable[[str, int, int, float], None]  # (stage, steps done, steps planned, loss)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `adapt`: the checkpoint of the last finished step is saved at `checkpoint`."""

    def __init__(self, checkpoint: Path, stage: str, step: int):
        super().__init__(f"interrupted in {stage} at step {step}")
        self.checkpoint, self.stage, self.step = checkpoint, stage, step


# ------------------------------------------------------------------------------------------------ text
@dataclass
class TextData:
    train: Tensor  # (N_train, seq) int64
    held_out: Tensor  # (N_held, seq) int64
    files: list[dict[str, Any]]
    tokens: int


def load_tokenizer(folder: str | Path):
    """The tokenizer saved beside a Hugging Face model (AutoTokenizer, local files only)."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ArtifactError(f"{folder}: no tokenizer ({', '.join(TOKENIZER_FILES[:3])} ...); adapt tokenizes the "
                            "text with the model's own tokenizer: save it there with tokenizer.save_pretrained(folder)")
    transformers = lazy_import("transformers", purpose="the model's tokenizer (effx adapt)")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds for a broken folder
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{folder}: the tokenizer does not load ({first}); re-save it with "
                            "tokenizer.save_pretrained(folder)") from None


def read_texts(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    if not paths:
        raise SpecError("no text to adapt on: pass --text FILE (plain text, repeatable)")
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise ArtifactError(f"--text {p}: no such file; pass plain text files")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ArtifactError(f"--text {p}: not UTF-8 text ({exc.reason} at byte {exc.start}); pass plain text") from None
        if not text.strip():
            raise SpecError(f"--text {p}: the file holds no text; pass a file with the text to adapt on")
        out.append((p, text))
    return out


def pack_text(tokenizer, texts: list[tuple[Path, str]], seq: int, family: str, vocab_size: int,
              held_out: float = 0.1) -> TextData:
    """Tokenize every file (no special tokens), concatenate, cut into sequences of `seq` tokens wrapped in the
    tokenizer's specials (encoders [CLS] .. [SEP], decoders BOS ..); the last `held_out` share is held out."""
    if family == "encoder":
        head = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
        tail = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
    else:
        head, tail = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []), []
    body = seq - len(head) - len(tail)
    if body < 1:
        raise SpecError(f"--seq {seq} leaves no room for text beside the special tokens; use --seq >= 8")
    stream: list[int] = []
    files = []
    for path, text in texts:
        # line by line: one call on 100k+ tokens makes tokenizers warn about the model's maximum length
        lines = [line for line in text.splitlines() if line.strip()]
        ids = tokenizer(lines, add_special_tokens=False)["input_ids"] if lines else []
        count = sum(len(x) for x in ids)
        for x in ids:
            stream += x
        files.append({"path": str(path), "sha256": hashlib.sha256(text.encode()).hexdigest(), "chars": len(text),
                      "tokens": count})
    n_seq = len(stream) // body
    if n_seq < 2:
        raise SpecError(f"the text holds {len(stream)} tokens, fewer than two sequences of --seq {seq}; "
                        "pass more text or a smaller --seq")
    rows = torch.tensor([head + stream[i * body:(i + 1) * body] + tail for i in range(n_seq)], dtype=torch.int64)
    if int(rows.max()) >= vocab_size:
        raise ArtifactError(f"the tokenizer gives id {int(rows.max())}, beyond the model's vocab_size {vocab_size}; "
                            "is it the model's own tokenizer?")
    n_held = min(n_seq - 1, max(1, round(n_seq * held_out)))
    # held out = the end of the text: never trained on, and no training sequence overlaps it
    return TextData(rows[:n_seq - n_held], rows[n_seq - n_held:], files, len(stream))


# ---------------------------------------------------------------------------------------------- models
@dataclass
class Pair:
    teacher: EffxModel
    student: EffxModel
    teacher_folder: Path  # the Hugging Face folder: weights of the teacher and the tokenizer
    origin: dict[str, Any]


def load_pair(source: str | Path, overrides: dict[str, Any] | None = None) -> Pair:
    """Teacher and student for `hf:PATH` + attention overrides, or for an effx model folder that is a swap
    (origin.json names the Hugging Face folder and its own attention)."""
    overrides = dict(overrides or {})
    if str(source).startswith("hf:"):
        folder = Path(str(source)[3:])
        if "attention.kind" not in overrides and "layers.pattern" not in overrides:
            raise SpecError("effx adapt --model hf:PATH needs the attention to swap in: pass --attention KIND")
        student = import_hf(folder, overrides)
    else:
        if overrides:
            raise SpecError(f"--model {source} is an effx model folder: its attention is already chosen; drop the "
                            "spec flags, or adapt the Hugging Face folder with --model hf:PATH --attention KIND")
        student = load_model(source)
        origin = getattr(student, "origin", None) or {}
        if "hf" not in origin:
            raise ArtifactError(f"{source}: not a swap of anything (no origin.json naming the original model); "
                                "adapt a model imported with `effx import PATH --attention KIND`, or pass "
                                "--model hf:PATH --attention KIND")
        folder = Path(origin["hf"])
        if not folder.is_dir():
            raise ArtifactError(f"{source}/origin.json names {folder} as the original model, which is not there; "
                                "put the Hugging Face folder back or adapt with --model hf:PATH")
    origin = {k: v for k, v in student.origin.items() if k != "adapted"}
    teacher = import_hf(folder, {"model.max_seq_len": student.spec.model.max_seq_len})
    if teacher.spec.resolved_layers() == student.spec.resolved_layers():
        raise SpecError(f"attention {student.spec.attention_summary()} is the model's own ({origin.get('attention')}): "
                        "nothing was swapped, so there is nothing to adapt; choose another --attention")
    if student.spec.attention.kind == "hierarchical" or teacher.spec.attention.kind == "hierarchical":
        raise SpecError("attention.kind=hierarchical runs layers at shortened resolutions, so its layers cannot be "
                        "matched one by one with the teacher's; adapt takes full, linformer, local, block_sparse, linear")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return Pair(teacher.eval(), student.eval(), folder, origin)


def stage1_parameters(pair: Pair) -> dict[str, nn.Parameter]:
    """What the swap added (not in the teacher): Linformer E/F (per layer or the layerwise shared one), Hedgehog's
    feature maps (blocks.i.attn.hedgehog_q / hedgehog_k)."""
    known = set(pair.teacher.state_dict())
    return {name: p for name, p in pair.student.named_parameters() if name not in known}


def pooling_projection(k: int, n: int, n_max: int) -> Tensor:
    """(k, n_max): row r averages positions [r n / k, (r + 1) n / k) of a length-n input (k > n: each position
    repeated k / n times, which leaves softmax attention unchanged); columns past n stay 0."""
    p = torch.zeros(k, n_max)
    for r in range(k):
        lo = (r * n) // k
        hi = max(lo + 1, ((r + 1) * n) // k)
        p[r, lo:hi] = 1.0 / (hi - lo)
    return p


def prefix_projection(k: int, n: int, n_max: int) -> Tensor:
    """(k, n_max): row r takes position r alone, for r < min(k, n): an input of up to k real tokens keeps every
    token's own key and value (the rows past its length see only padding, zeroed), so Linformer starts as full
    attention over each short input, up to the weight the empty rows take in the softmax. Positions k..n-1
    start unused (stage 1 gives them weight). k >= n: pooling_projection, which is exact there."""
    if k >= n:
        return pooling_projection(k, n, n_max)
    p = torch.zeros(k, n_max)
    p[torch.arange(k), torch.arange(k)] = 1.0
    return p


INITS = {"pool": pooling_projection, "prefix": prefix_projection}


@torch.no_grad()
def start_projections(pair: Pair, seq: int, init: str = "pool") -> list[str]:
    """Set every Linformer E/F to a projection of `seq` positions: `pool`, average pooling (Linformer §4 lists
    pooling as a projection; attention over segment means is already near the teacher on long inputs:
    all-MiniLM-L6-v2, seq 256, k=64, held-out chunk cosine 0.61 against 0.03 for the imported random
    projections), or `prefix`, the first k positions one by one (short, padded inputs such as sentences:
    all-MiniLM-L6-v2, k=64 over 128 positions, held-out sentence cosine 0.941 against 0.734 for pooling and
    0.401 imported). Stage 1 starts close instead of from a random mix of positions. Returns the names set."""
    names = []
    for name, param in stage1_parameters(pair).items():
        if name.endswith((".attn.e", ".attn.f")) or name == "shared.linformer_e":  # (H or 1, k, n_max)
            param.copy_(INITS[init](param.shape[-2], seq, param.shape[-1]).expand_as(param))
            names.append(name)
    return names


def swapped_layers(pair: Pair) -> list[int]:
    t, s = pair.teacher.spec.resolved_layers(), pair.student.spec.resolved_layers()
    return [i for i, (a, b) in enumerate(zip(t, s, strict=True)) if a.attention != b.attention]


class LoRA(nn.Module):
    """W -> W + (alpha / r) B A, B = 0 at the start (the student starts as the bare swap)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.b @ self.a) * self.scale


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def add_lora(model: EffxModel, rank: int, alpha: float, seed: int) -> dict[str, nn.Parameter]:
    """LoRA on q/k/v/o of every layer (torch parametrization); returns the adapter parameters by name."""
    g = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        for name in LORA_TARGETS:
            lin = getattr(block.attn, name)
            parametrize.register_parametrization(lin, "weight", LoRA(lin.out_features, lin.in_features, rank, alpha, g))
    return {n: p for n, p in model.named_parameters() if ".parametrizations.weight.0." in n}


def merge_lora(model: EffxModel) -> None:
    for block in model.blocks:
        for name in LORA_TARGETS:
            lin = getattr(block.attn, name)
            if parametrize.is_parametrized(lin, "weight"):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)


# ------------------------------------------------------------------------------------------- activations
def _positions(ids: Tensor) -> Tensor:
    b, n = ids.shape
    return torch.arange(n).expand(b, n)


def attention_io(model: EffxModel, ids: Tensor, layers: Sequence[int],
                 mask: Tensor | None = None) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Each listed layer's attention input and output in a whole-sequence forward of `model` (mask: (B,N),
    1 = token, 0 = padding)."""
    inputs, outputs, hooks = {}, {}, []
    for i in layers:
        def hook(module, args, out, i=i):
            inputs[i], outputs[i] = args[0], out
        hooks.append(model.blocks[i].attn.register_forward_hook(hook))
    try:
        model(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    return inputs, outputs


def block_outputs(model: EffxModel, ids: Tensor, mask: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
    """Every block's output (the hidden states) and the model's output (encoder states or decoder logits)."""
    outs: list[Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.blocks]
    try:
        final = model(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    return outs, final


def stage1_loss(pair: Pair, ids: Tensor, layers: Sequence[int], mask: Tensor | None = None) -> tuple[Tensor, list[float]]:
    """1000 x mean over swapped layers of the attention-output MSE (student and teacher read the teacher's input),
    over the real tokens where `mask` marks padding."""
    with torch.no_grad():
        xs, ys = attention_io(pair.teacher, ids, layers, mask)
    pos = _positions(ids)
    errs = [_mean_square(pair.student.blocks[i].attn(xs[i], pos, mask) - ys[i], mask) for i in layers]
    return 1000 * torch.stack(errs).mean(), [e.item() for e in errs]


def _mean_square(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of x**2 (B,N,C) over the real tokens (mask (B,N): 1 = token), or over everything."""
    if mask is None:
        return (x**2).mean()
    m = mask[..., None].to(x.dtype)  # (B,N,1)
    return ((x * m) ** 2).sum() / (m.sum() * x.shape[-1])


# weight of the sentence-embedding term: 1 - cosine is ~10x smaller than the hidden-state term for the same
# drift (measured on tiny BERTs and all-MiniLM-L6-v2); without it LoRA lowered the per-token error while the
# held-out embedding cosine fell
EMBEDDING_WEIGHT = 10.0


def _relative_mse(s: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
    return _mean_square(s - t, mask) / _mean_square(t, mask).clamp_min(1e-12)


def _mean_pool(h: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return h.mean(1)
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


def stage2_loss(pair: Pair, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over blocks of ||h_student - h_teacher||^2 / ||h_teacher||^2 (pre-norm residual streams grow with
    depth; relative errors weigh every layer alike), plus what the model is used for: encoders, the mean-pooled
    output (the sentence embedding) as 1 - cosine, since per-token errors that do not average out (a shared
    bias) move it most; decoders, KL(teacher || student) of the next-token distributions."""
    with torch.no_grad():
        t_outs, t_final = block_outputs(pair.teacher, ids, mask)
    s_outs, s_final = block_outputs(pair.student, ids, mask)
    loss = torch.stack([_relative_mse(s, t, mask) for s, t in zip(s_outs, t_outs, strict=True)]).mean()
    if pair.student.family == "encoder":
        cos = F.cosine_similarity(_mean_pool(s_final, mask), _mean_pool(t_final, mask), dim=-1)  # (B,)
        return loss + EMBEDDING_WEIGHT * (1 - cos).mean()
    # decoders: distillation of the next-token distributions, KL(teacher || student) per token
    kl = F.kl_div(s_final.float().log_softmax(-1), t_final.float().log_softmax(-1), log_target=True,
                  reduction="none").sum(-1)  # (B,N)
    return loss + kl.mean()


# ------------------------------------------------------------------------------------------------ metrics
def _batches(rows: Tensor, batch: int):
    for start in range(0, rows.shape[0], batch):
        yield rows[start:start + batch]


@torch.no_grad()
def layer_errors(pair: Pair, rows: Tensor, layers: Sequence[int], batch: int) -> list[float]:
    """Per swapped layer: attention-output MSE against the teacher on `rows` (the teacher's layer inputs)."""
    totals = [0.0] * len(layers)
    for ids in _batches(rows, batch):
        _, errs = stage1_loss(pair, ids, layers)
        totals = [t + e * ids.shape[0] for t, e in zip(totals, errs, strict=True)]
    return [t / rows.shape[0] for t in totals]


@torch.no_grad()
def fidelity(pair: Pair, rows: Tensor, batch: int) -> dict[str, float]:
    """Held-out fidelity of the student to the teacher. Encoders: mean-pooled embedding cosine (and the
    hidden-state cosine per token); decoders: perplexity of teacher and student, and KL(teacher || student)."""
    if pair.student.family == "encoder":
        cos_emb, cos_tok = [], []
        for ids in _batches(rows, batch):
            t, s = pair.teacher(ids), pair.student(ids)  # (B,N,C)
            cos_emb.append(F.cosine_similarity(s.mean(1), t.mean(1), dim=-1))
            cos_tok.append(F.cosine_similarity(s, t, dim=-1).flatten())
        return {"embedding_cosine": torch.cat(cos_emb).mean().item(), "token_cosine": torch.cat(cos_tok).mean().item()}
    nll_t = nll_s = kl = 0.0
    count = 0
    for ids in _batches(rows, batch):
        lt, ls = pair.teacher(ids)[:, :-1].float(), pair.student(ids)[:, :-1].float()  # (B,N-1,V)
        target = ids[:, 1:]
        nll_t += F.cross_entropy(lt.flatten(0, 1), target.flatten(), reduction="sum").item()
        nll_s += F.cross_entropy(ls.flatten(0, 1), target.flatten(), reduction="sum").item()
        kl += F.kl_div(ls.log_softmax(-1), lt.log_softmax(-1), log_target=True, reduction="sum").item()
        count += target.numel()
    return {"teacher_perplexity": math.exp(nll_t / count), "perplexity": math.exp(nll_s / count),
            "kl_from_teacher": kl / count}


def headline(metrics: dict[str, float]) -> float:
    """The one number a table shows: embedding cosine (encoders) or perplexity (decoders)."""
    return metrics.get("embedding_cosine", metrics.get("perplexity", float("nan")))


# ------------------------------------------------------------------------------------------------ training
@dataclass
class AdaptResult:
    output: Path
    report: dict[str, Any]
    resumed_from: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        r = self.report
        b, a = r["held_out"]["before"], r["held_out"]["after"]
        what = "embedding cosine" if "embedding_cosine" in a else "perplexity"
        steps = ", ".join(f"{s['name']} {s['steps_done']}/{s['steps']} steps" for s in r["stages"])
        return (f"wrote {self.output} ({r['teacher']['model_type']} -> attention {r['kind']}; {steps}; held-out "
                f"{what} {headline(b):.4f} -> {headline(a):.4f}, {r['minutes']:.1f} min)")


def _batch_ids(rows: Tensor, batch: int, seed: int, stage_no: int, step: int) -> Tensor:
    # the batch depends on (seed, stage, step) only: a resumed run draws what the uninterrupted one drew
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage_no * 100_003 + step)
    return rows[torch.randint(0, rows.shape[0], (min(batch, rows.shape[0]),), generator=g)]


VARIED_MIN = 8  # shortest row of a --lengths varied batch (tokens, specials included)


def vary_lengths(ids: Tensor, tokenizer_ids: dict[str, int | None], seed: int, stage_no: int,
                 step: int) -> tuple[Tensor, Tensor]:
    """Cut each packed row (encoder: [CLS] text [SEP]) to its own random length in [VARIED_MIN, seq], ended by
    [SEP] and right-padded, so training sees the padded, sentence-length inputs a sentence encoder is used on.
    Returns (ids, attention_mask); depends on (seed, stage, step) only, like the batch itself."""
    b, n = ids.shape
    g = torch.Generator().manual_seed(seed * 1_000_033 + stage_no * 100_019 + step)
    lengths = torch.randint(min(VARIED_MIN, n), n + 1, (b,), generator=g)
    keep = torch.arange(n)[None, :] < lengths[:, None]  # (B,N)
    pad = tokenizer_ids.get("pad")
    out = torch.where(keep, ids, torch.full_like(ids, pad if pad is not None else 0))
    sep = tokenizer_ids.get("sep")
    if sep is not None:
        out[torch.arange(b), lengths - 1] = sep
    return out, keep.to(torch.int64)


SCHEDULES = ("cosine", "constant")
LR_FLOOR = 0.05  # the cosine schedule ends at this share of the rate


def scheduled_lr(lr: float, schedule: str, step: int, planned: int) -> float:
    """The rate of step `step` of `planned`: constant, or cosine from lr down to LR_FLOOR * lr at the last step
    (a function of the step and the plan, so a run resumed after an interruption follows the uninterrupted one;
    an output continued with more steps follows the longer plan's rates from its step on). Measured on
    all-MiniLM-L6-v2, local w=16, 64-token rows, held-out sentence cosine: 0.979 after 1400 LoRA steps on a cosine
    from 2e-3 (an exploratory run, its rate from step / planned), where constant rates levelled off at 0.978 (1e-3,
    2000-2778 steps); 2800 steps on this schedule reached 0.981 (benchmarks/results/adapt_minilm.json)."""
    if schedule == "constant" or planned <= 1:
        return lr
    return lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * step / (planned - 1))))


def _save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    with atomic_dir(folder, CHECKPOINT_COMMAND, overwrite=True) as tmp:
        torch.save(state, tmp / STATE_NAME)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactError(f"{path}: unreadable checkpoint ({type(exc).__name__}); start over without --resume "
                            "(or with --overwrite)") from None


def adapt(
    model: str | Path,
    output: str | Path,
    *,
    texts: Sequence[str | Path],
    overrides: dict[str, Any] | None = None,
    seq: int = 128,
    batch: int = 8,
    steps: int = 200,
    lr: float = 1e-4,
    lora_rank: int | None = None,
    lora_steps: int | None = None,
    lora_lr: float = 1e-3,
    lora_alpha: float | None = None,
    seed: int = 0,
    init: str = "auto",
    lengths: str = "packed",
    schedule: str = "cosine",
    held_out: float = 0.1,
    max_held_out: int = 32,
    checkpoint_every: int = 50,
    minutes: float | None = None,
    resume: bool = False,
    overwrite: bool = False,
    plots: bool = True,
    on_step: StepCallback | None = None,
    progress: Callable[[str], None] | None = None,
) -> AdaptResult:
    """Adapt the swapped attention of `model` (`hf:PATH` with `overrides` choosing the attention, or an effx
    model folder imported with a swapped attention) to its teacher, and write the adapted model folder.

    lr: stage 1's rate. From the pooling start, 1e-4 descends on all-MiniLM-L6-v2 where 1e-2 (LoLCATs' rate for
    feature-map MLPs) undid the start within 200 steps (loss 30 -> 157) and 1e-3 stalled; tiny models take more.
    lora_rank: None = 8 where stage 1 has nothing to train, else 0 (off). init: where stage 1 starts, "pool"
    (Linformer E/F as average pooling over `seq` positions), "prefix" (the first k positions one by one),
    "import" (as imported) or "auto" (prefix with lengths="varied", else pool). lengths: "packed" (every
    training row `seq` tokens) or "varied" (encoders: each row cut to a random length, padded, with the attention
    mask; see vary_lengths). schedule: "cosine" (each stage's rate falls to LR_FLOOR x by its last planned step;
    see scheduled_lr) or "constant". minutes: stop training after this
    long (the steps done are recorded). resume: continue from OUT.checkpoint, or from an earlier output's
    checkpoint with more steps. on_step(stage, done, planned, loss) is called after every step."""
    say = progress or (lambda msg: None)
    out = Path(output)
    ckpt_dir = out.parent / f"{out.name}.checkpoint"
    for name, value, low in (("--seq", seq, 2), ("--batch", batch, 1), ("--steps", steps, 0),
                             ("--checkpoint-every", checkpoint_every, 1)):
        if value < low:
            raise SpecError(f"{name} {value}: must be >= {low}")
    if not 0 < held_out < 1:
        raise SpecError(f"--held-out {held_out}: a share between 0 and 1 (e.g. 0.1)")
    if lr <= 0 or lora_lr <= 0:
        raise SpecError("--lr and --lora-lr must be > 0")
    if init not in ("auto", *INITS, "import"):
        raise SpecError(f"--init {init!r}: auto (prefix with --lengths varied, else pool), pool (Linformer E/F start "
                        "as average pooling), prefix (the first k positions one by one, for short padded inputs) or "
                        "import (as imported)")
    if init == "auto":  # whole --seq rows: segment means; short padded rows: each token of the first k
        init = "prefix" if lengths == "varied" else "pool"
    if schedule not in SCHEDULES:
        raise SpecError(f"--lr-schedule {schedule!r}: cosine (each stage's rate falls to {LR_FLOOR:g}x by its last "
                        "step) or constant")
    if lengths not in ("packed", "varied"):
        raise SpecError(f"--lengths {lengths!r}: packed (rows of --seq tokens) or varied (encoders: random lengths, "
                        "padded)")
    mode = check_output_dir(out, COMMAND, overwrite, resumable=resume)
    check_output_dir(ckpt_dir, CHECKPOINT_COMMAND, overwrite=True)  # ours or absent, never someone else's folder
    if not resume and not overwrite and (ckpt_dir / STATE_NAME).is_file():
        raise OutputPathError(f"{ckpt_dir} holds an interrupted `effx adapt`; pass --resume to continue it or "
                              "--overwrite to start over")
    sources = read_texts(texts)

    say("loading teacher and student")
    differentiable_ops()
    pair = load_pair(model, overrides)
    spec = pair.student.spec
    if lengths == "varied" and spec.model.family != "encoder":
        raise SpecError("--lengths varied pads rows for encoders; a decoder's causal attention already trains on "
                        "every prefix length: drop --lengths or use packed")
    if seq > spec.model.max_seq_len:
        raise SpecError(f"--seq {seq} exceeds model.max_seq_len={spec.model.max_seq_len}; choose a smaller --seq")
    new_params = stage1_parameters(pair)
    rank = (0 if new_params else 8) if lora_rank is None else lora_rank
    if rank < 0:
        raise SpecError(f"--lora-rank {rank}: must be >= 0 (0: off)")
    if not new_params and rank == 0:
        raise SpecError(f"attention {spec.attention_summary()} adds no parameters to train (stage 1 has nothing to "
                        "adapt) and LoRA is off: pass --lora-rank R (e.g. 8)")
    steps1 = steps if new_params else 0
    steps2 = (steps if lora_steps is None else lora_steps) if rank else 0
    alpha = float(lora_alpha if lora_alpha is not None else 2 * rank)

    say("tokenizing the text")
    tokenizer = load_tokenizer(pair.teacher_folder)
    data = pack_text(tokenizer, sources, seq, spec.model.family, spec.model.vocab_size, held_out)
    special_ids = {"pad": tokenizer.pad_token_id, "sep": tokenizer.sep_token_id}
    eval_rows = data.held_out[:max_held_out]
    layers = swapped_layers(pair)

    fingerprint = json.dumps({
        "teacher": str(pair.teacher_folder.resolve()), "student": json.loads(spec.to_json()), "seq": seq,
        "batch": batch, "init": init, "lengths": lengths, "schedule": schedule, "lr": lr, "lora_rank": rank, "lora_lr": lora_lr, "lora_alpha": alpha, "seed": seed,
        "held_out": held_out, "text": [f["sha256"] for f in data.files],
    }, sort_keys=True)

    state = None
    resumed_from = None
    if resume:
        for path in (ckpt_dir / STATE_NAME, out / STATE_NAME if mode == "resume" else None):
            if path is not None and path.is_file():
                state, resumed_from = _load_state(path), str(path)
                break
        if state is not None and state.get("fingerprint") != fingerprint:
            raise SpecError(f"{resumed_from} was made with other settings (model, attention, --seq, --batch, --lr, "
                            "LoRA, --seed or text); rerun with the same ones, or start over with --overwrite")

    say("held-out metrics of the bare swap")
    before = fidelity(pair, eval_rows, batch)
    errors_before = layer_errors(pair, eval_rows, layers, batch) if new_params else []
    pooled = start_projections(pair, seq, init) if init in INITS else []

    lora = add_lora(pair.student, rank, alpha, seed) if rank else {}
    trainable = {**new_params, **lora}
    for p in pair.student.parameters():
        p.requires_grad_(False)
    done = {STAGE1: 0, STAGE2: 0}
    losses: dict[str, list[float]] = {STAGE1: [], STAGE2: []}
    optim_state = None
    elapsed_before = 0.0
    if state is not None:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(state["trainable"][name])
        done, losses = dict(state["done"]), {k: list(v) for k, v in state["losses"].items()}
        optim_state = state.get("optimizer")
        elapsed_before = float(state.get("seconds", 0.0))
        if state["stage"] == STAGE2 and done[STAGE1] < steps1:
            steps1 = done[STAGE1]  # stage 2 has started from this stage 1: it cannot grow any more
    start = time.monotonic()
    # the time limit covers the whole configuration, earlier (resumed) sessions included
    deadline = None if minutes is None else start + 60 * minutes - elapsed_before

    def seconds() -> float:
        return elapsed_before + time.monotonic() - start

    def snapshot(stage: str, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
        return {"fingerprint": fingerprint, "stage": stage, "done": dict(done), "losses": losses,
                "trainable": {n: p.detach().clone() for n, p in trainable.items()},
                "optimizer": opt.state_dict() if opt is not None else None, "seconds": seconds()}

    stages = [(STAGE1, 1, list(new_params.values()), steps1, lr), (STAGE2, 2, list(lora.values()), steps2, lora_lr)]
    timed_out = False
    # what the finished folder keeps for a later --resume: the resumed state, or the last stage trained here
    final_state = ({**state, "seconds": seconds()} if state is not None
                   else snapshot(STAGE1 if new_params else STAGE2, None))
    for stage, stage_no, params, planned, stage_lr in stages:
        if planned == 0 or done[stage] >= planned or timed_out:
            continue
        for p in trainable.values():  # only this stage's tensors collect gradients
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=stage_lr, weight_decay=0.0)
        if optim_state is not None and state is not None and state["stage"] == stage:
            opt.load_state_dict(optim_state)
        say(f"{stage}: training {sum(p.numel() for p in params):,} parameters")
        try:
            while done[stage] < planned:
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    break
                ids = _batch_ids(data.train, batch, seed, stage_no, done[stage])
                mask = None
                if lengths == "varied":
                    ids, mask = vary_lengths(ids, special_ids, seed, stage_no, done[stage])
                for group in opt.param_groups:
                    group["lr"] = scheduled_lr(stage_lr, schedule, done[stage], planned)
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():  # whatever the caller's mode (an inference-only process disables it)
                    loss = (stage1_loss(pair, ids, layers, mask)[0] if stage == STAGE1
                            else stage2_loss(pair, ids, mask))
                    loss.backward()
                opt.step()
                done[stage] += 1
                losses[stage].append(loss.item())
                if done[stage] % checkpoint_every == 0 and done[stage] < planned:
                    _save_checkpoint(ckpt_dir, snapshot(stage, opt))
                if on_step is not None:
                    on_step(stage, done[stage], planned, losses[stage][-1])
        except KeyboardInterrupt:
            _save_checkpoint(ckpt_dir, snapshot(stage, opt))
            raise Interrupted(ckpt_dir, stage, done[stage]) from None
        final_state = snapshot(stage, opt)

    say("held-out metrics of the adapted model")
    errors_after = layer_errors(pair, eval_rows, layers, batch) if new_params else []
    for p in trainable.values():
        p.requires_grad_(False)
    merge_lora(pair.student)
    after = fidelity(pair, eval_rows, batch)
    report = {
        "teacher": {"hf": str(pair.teacher_folder.resolve()), "model_type": pair.origin.get("model_type"),
                    "attention": pair.origin.get("attention")},
        "kind": spec.attention_summary(), "family": spec.model.family, "seed": seed, "seq": seq, "batch": batch,
        "lengths": lengths, "schedule": schedule,
        "stages": [
            {"name": STAGE1, "trains": sorted(new_params), "init": init, "pooled": pooled,
             "parameters": sum(p.numel() for p in new_params.values()),
             "steps": steps1, "steps_done": done[STAGE1], "lr": lr, "loss": losses[STAGE1],
             "objective": "1000 x mean over swapped layers of attention-output MSE (teacher's layer inputs)"},
            {"name": STAGE2, "rank": rank, "alpha": alpha, "targets": list(LORA_TARGETS) if rank else [],
             "parameters": sum(p.numel() for p in lora.values()), "steps": steps2, "steps_done": done[STAGE2],
             "lr": lora_lr, "loss": losses[STAGE2], "merged": bool(rank),
             "objective": "mean over blocks of relative MSE of the hidden states against the teacher, + "
                          f"{EMBEDDING_WEIGHT:g} x (1 - embedding cosine) (encoders) or KL(teacher || student) "
                          "of the next token (decoders)"},
        ],
        "text": {"files": data.files, "tokens": data.tokens, "train_sequences": int(data.train.shape[0]),
                 "held_out_sequences": int(data.held_out.shape[0]), "evaluated_sequences": int(eval_rows.shape[0])},
        "held_out": {"before": before, "after": after},
        "layer_attention_mse": {"layers": layers, "before": errors_before, "after": errors_after},
        "minutes": seconds() / 60, "time_limited": timed_out, "threads": torch.get_num_threads(),
        "resumed_from": resumed_from, "torch": torch.__version__,
    }
    pair.student.origin = {**pair.origin, "adapted": {"teacher": report["teacher"]["hf"], "kind": report["kind"],
                                                      "report": REPORT_NAME}}

    say(f"writing {out}")
    with atomic_dir(out, COMMAND, overwrite=overwrite or mode == "resume") as tmp:
        save_model(pair.student, tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        torch.save(final_state, tmp / STATE_NAME)
        if plots:
            plot_losses(report, tmp / PLOT_NAME)
    if read_marker(ckpt_dir) is not None:  # the run is complete: its interim checkpoint is no longer needed
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return AdaptResult(out, report, resumed_from)


def plot_losses(report: dict[str, Any], path: Path) -> None:
    matplotlib = lazy_import("matplotlib", purpose="the loss plot of effx adapt (or pass --no-plots)")
    matplotlib.use("Agg")
    plt = lazy_import("matplotlib.pyplot", extra="plot", purpose="the loss plot of effx adapt (or pass --no-plots)")
    stages = [s for s in report["stages"] if s["loss"]]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(5 * max(1, len(stages)), 3.5), squeeze=False)
    for ax, s in zip(axes[0], stages, strict=False):
        ax.plot(range(1, len(s["loss"]) + 1), s["loss"])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{s['name']} ({report['kind']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["AdaptResult", "Interrupted", "LoRA", "Pair", "TextData", "adapt", "add_lora", "fidelity", "headline",
           "layer_errors", "load_pair", "load_tokenizer", "merge_lora", "pack_text", "read_texts", "stage1_parameters"]
