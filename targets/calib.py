"""Calibration inputs for static quantization: token batches (seeded random, an .npz file, a token file of
whitespace-separated ids one sequence per line, or real text: `text:FILE`) and the feeds of every graph input
they give (decoders through the host protocol).

Real text is tokenized with the model's own tokenizer when the export came from a Hugging Face folder (its
`origin.json` names the folder), and packed into full sequences, so every token is real and the mask is all
ones. effx's own seeded models have no tokenizer: their text is read as UTF-8 bytes modulo the vocabulary,
which still gives the activations of natural-text statistics (repetition, a skewed token distribution) that
uniform random ids lack. The same packing feeds `effx validate --inputs text:FILE`; calibration and
validation take alternate sequences of the stream, so a build is never judged on what calibrated it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effx.core.errors import SpecError
from effx.core.lazy import lazy_import
from effx.core.manifest import Manifest
from effx.core.protocol import DecodeDriver
from effx.core.runner import Feed, Runner
from effx.models.transformer import ORIGIN_NAME

TEXT_PREFIX = "text:"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def token_batches(manifest: Manifest, calib: str, samples: int, seq: int = 32, batch: int = 2, seed: int = 0,
                  folder: Path | None = None, info: dict | None = None) -> list[np.ndarray]:
    """int64 token batches (batch, seq) to calibrate with ("auto" means random here: the caller chose static
    calibration). `folder` (the artifact folder) locates the model's tokenizer for `text:FILE`; `info`, when
    given, gets how the text was tokenized."""
    vocab = int(manifest.spec["model"]["vocab_size"])
    seq = min(seq, int(manifest.spec["model"]["max_seq_len"]))
    if calib in ("random", "auto"):
        rng = np.random.default_rng(seed)
        return [rng.integers(0, vocab, (batch, seq), dtype=np.int64) for _ in range(samples)]
    if calib.startswith(TEXT_PREFIX):
        text = TextTokens.load(manifest, calib[len(TEXT_PREFIX):], folder, what="--calib")
        # sequences as long as real inputs (up to 128): attention and activation ranges depend on length
        batches = text.batches(samples, batch, min(128, int(manifest.spec["model"]["max_seq_len"])), part=0)
        if info is not None:
            info |= text.describe()
        return batches
    path = Path(calib)
    if not path.is_file():
        raise SpecError(f"--calib {calib}: no such file; use 'random', 'dynamic', text:FILE, an .npz with input_ids, "
                        "or a token file")
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


# --------------------------------------------------------------------------------------------- real text
def hf_origin(manifest: Manifest, folder: Path | None) -> Path | None:
    """The Hugging Face folder the exported weights were imported from, if it is recorded: the manifest's
    weights entry, or the origin.json of the model/ folder of an `effx run` output (beside onnx/, or two
    levels above build/<target>/)."""
    recorded = ((manifest.weights or {}).get("origin") or {}).get("hf")
    if recorded:
        return Path(recorded)
    if folder is None:
        return None
    for model_dir in (Path(folder).parent / "model", Path(folder).parent.parent / "model"):
        origin = model_dir / ORIGIN_NAME
        if origin.is_file():
            hf = json.loads(origin.read_text()).get("hf")
            return Path(hf) if hf else None
    return None


@dataclass
class TextTokens:
    """A text file as one token stream, and how it was tokenized (recorded in manifests and reports)."""

    ids: np.ndarray  # (T,) int64, without special tokens
    tokenizer: str  # what tokenized it, in words
    source: str
    prefix: list[int]  # special tokens around each packed sequence (BERT: [CLS] ... [SEP])
    suffix: list[int]

    @classmethod
    def load(cls, manifest: Manifest, file: str, folder: Path | None, what: str,
             tokenizer_dir: Path | None = None) -> TextTokens:
        path = Path(file)
        label = f"{what} {TEXT_PREFIX}{file}"
        if not file or not path.is_file():
            raise SpecError(f"{label}: no such file; pass text:PATH to a UTF-8 text file")
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            raise SpecError(f"{label}: cannot read it as UTF-8 text ({exc.__class__.__name__})") from None
        if not text.strip():
            raise SpecError(f"{label}: the file holds no text")
        vocab = int(manifest.spec["model"]["vocab_size"])
        hf = tokenizer_dir or hf_origin(manifest, folder)
        if hf is None:
            data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64) % vocab
            return cls(data, f"byte-level (UTF-8 bytes modulo vocab_size {vocab}): the model has no tokenizer",
                       str(path), [], [])
        if not any((Path(hf) / name).is_file() for name in _TOKENIZER_FILES):
            raise SpecError(f"{label}: the model was imported from {hf}, whose tokenizer is not there (no "
                            f"{' / '.join(_TOKENIZER_FILES[:3])}); restore that folder or pass --calib random")
        transformers = lazy_import("transformers", purpose="tokenizing text with the model's tokenizer")
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(hf))
        except Exception as exc:  # a broken tokenizer folder: one line naming it
            raise SpecError(f"{label}: cannot load the tokenizer of {hf} ({exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0][:160]})") from None
        tok.model_max_length = 1 << 62  # the stream is packed into max_seq_len pieces later: no length warning
        # paragraph by paragraph: tokenizers warn about (and some truncate) one very long input
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        ids = [t for chunk in tok(paragraphs, add_special_tokens=False)["input_ids"] for t in chunk]
        # where the tokenizer puts its special tokens around a sequence (BERT: [CLS] ... [SEP]; none: [])
        body = tok("text", add_special_tokens=False)["input_ids"]
        marked = tok("text", add_special_tokens=True)["input_ids"]
        at = next(i for i in range(len(marked) - len(body) + 1) if marked[i:i + len(body)] == body)
        stream = np.asarray(ids, np.int64)
        if stream.size and int(stream.max()) >= vocab:
            raise SpecError(f"{label}: the tokenizer of {hf} gives ids up to {int(stream.max())}, beyond the model's "
                            f"vocab_size {vocab}")
        return cls(stream, f"{type(tok).__name__} of {hf}", str(path), marked[:at], marked[at + len(body):])

    def sequences(self, count: int, seq: int, part: int) -> np.ndarray:
        """`count` packed sequences of `seq` tokens: alternate windows of the stream (part 0: calibration,
        part 1: validation), spread over the whole text, with the tokenizer's special tokens around each."""
        body = seq - len(self.prefix) - len(self.suffix)
        if body < 1:
            raise SpecError(f"sequence length {seq} leaves no room for text between the special tokens")
        windows = self.ids.size // body
        if windows < 2 * count:  # a short text is repeated, and the description says so
            reps = -(-2 * count * body // max(self.ids.size, 1))
            self.ids = np.tile(self.ids, reps)
            self.tokenizer += f"; the text repeats {reps} times to fill {count} sequences of {seq}"
            windows = self.ids.size // body
        starts = np.linspace(0, windows - 2, count).astype(int) // 2 * 2 + part
        rows = [self.prefix + self.ids[s * body:(s + 1) * body].tolist() + self.suffix for s in starts]
        return np.asarray(rows, np.int64)

    def batches(self, samples: int, batch: int, seq: int, part: int) -> list[np.ndarray]:
        rows = self.sequences(samples * batch, seq, part)
        return [rows[i:i + batch] for i in range(0, len(rows), batch)]

    def describe(self) -> dict[str, str | int]:
        return {"text": self.source, "tokenizer": self.tokenizer, "tokens": int(self.ids.size)}


# -------------------------------------------------------------------------------------------------- feeds
def encoder_feed(manifest: Manifest, graph: str, ids: np.ndarray) -> Feed:
    """Every input of an encoder graph for the token batch `ids`: packed text and random tokens are all real
    tokens, so the attention mask is all ones."""
    known = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    names = [t.name for t in manifest.graphs[graph].inputs]
    missing = [n for n in names if n not in known]
    if missing:
        raise SpecError(f"graph {graph} takes {', '.join(missing)}, which calibration cannot make; "
                        "calibrate with --calib dynamic")
    return {n: known[n] for n in names}


def calibration_feeds(manifest: Manifest, batches: list[np.ndarray], runner: Runner) -> dict[str, list[Feed]]:
    """Feeds per graph for static quantization, each with every input of its graph. Decoders follow the host
    protocol: prefill all but the last token (with the host's cache buffers), then one decode step on the
    cache `runner` (the fp32 graphs) produced."""
    graphs = manifest.graphs
    if "decode" not in graphs:
        name = next(iter(graphs))
        return {name: [encoder_feed(manifest, name, ids) for ids in batches]}
    feeds: dict[str, list[Feed]] = {"prefill": [], "decode": []}
    for ids in batches:
        driver = DecodeDriver(manifest, ids.shape[0], ids.shape[1])
        # copies: a runner that writes caches in place (IOBinding) would change the recorded feeds
        feeds["prefill"].append({k: np.array(v) for k, v in driver.prefill_feed(ids[:, :-1]).items()})
        driver.prefill(runner.infer, ids[:, :-1])
        feeds["decode"].append({k: np.array(v) for k, v in driver.step_feed(ids[:, -1:]).items()})
    if "decode_fine" in graphs:  # an hourglass's step that completes no group: the part of a decode feed it takes
        fine = {t.name for t in graphs["decode_fine"].inputs}
        feeds["decode_fine"] = [{k: v for k, v in f.items() if k in fine} for f in feeds["decode"]]
    return feeds
