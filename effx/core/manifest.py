"""manifest.json: the contract between effx stages and the C++ runtime.

Every artifact folder effx writes (onnx/ from `effx export`, build/<target>/ from `effx build`) holds one
manifest.json validated by `Manifest`. A later stage reads only the previous stage's folder and this file.
The C++ runner (runtimes/cpp) reads the same JSON, so field names here are a public format: add fields,
never rename them, and bump SCHEMA_VERSION when a reader would misread an old file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import onnx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from effx.core.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

Dim = int | str  # a fixed size, or the name of a symbolic dimension ("batch", "sequence", ...)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def inside_folder(path: str, what: str = "path") -> str:
    """`path` if it names a file inside the artifact folder (relative, no `..`); an artifact folder is
    self-contained, so anything else is refused before a file is read."""
    pure = PurePosixPath(path.replace("\\", "/"))
    if not path or pure.is_absolute() or ".." in pure.parts or (len(path) > 1 and path[1] == ":"):
        raise ValueError(f"{what} {path!r} is not a path inside the folder (absolute, or escaping it with '..')")
    return path


class TensorSpec(_Model):
    """One graph input or output. dtype uses numpy names: float32, float16, bfloat16, int64, int32, bool."""

    name: str
    dtype: str
    shape: list[Dim]


class DimRange(_Model):
    """Range of a symbolic dimension: an optimization profile (TensorRT min/opt/max) for that name."""

    min: int
    opt: int
    max: int


class GraphSpec(_Model):
    """One ONNX graph (or the engine built from it)."""

    file: str  # path relative to the folder holding manifest.json
    role: Literal["encoder", "prefill", "decode"]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: dict[str, DimRange] = Field(default_factory=dict)
    # output -> input: the output is the input's buffer after an in-place write (checked on the graph: one
    # ScatterND takes the input as its data and makes the output; nothing else reads the input's values), so a
    # runtime may bind both to one buffer (effx.core.protocol)
    aliases: dict[str, str] = Field(default_factory=dict)

    @field_validator("file")
    @classmethod
    def _inside(cls, value: str) -> str:
        return inside_folder(value, "graph file")


class CacheTensor(_Model):
    """A piece of decoder state carried from one step to the next: feed `output` back as `input`."""

    input: str  # decode-graph input name, e.g. "past.0.key"
    output: str  # output name of both prefill and decode graphs, e.g. "present.0.key"
    dtype: str
    shape: list[Dim]  # shape of the tensor before the first step (symbolic dims resolved by the caller)
    init: Literal["zeros"] = "zeros"


class ControlInput(_Model):
    """A decode-graph input the host computes each step (positions, block tables, lengths)."""

    name: str
    dtype: str
    shape: list[Dim]
    meaning: str


class LayerCache(_Model):
    """One layer's part of the cache: its layout (models that mix attention kinds mix layouts) and parameters."""

    index: int
    kind: str  # the layer's attention kind
    layout: Literal["contiguous", "paged", "ring", "state", "multiscale"]
    tensors: list[str]  # its cache tensors' decode-graph input names (past.{index}.*)
    grows: bool
    params: dict[str, Any] = Field(default_factory=dict)  # window (ring), factor (multiscale), block_size (paged)


class CachePlan(_Model):
    """How to allocate and feed the KV cache of a decoder, step by step. `layout` is the layout of every
    layer, or "hybrid" when they differ (then `layers` says which is which)."""

    layout: Literal["contiguous", "paged", "ring", "state", "multiscale", "hybrid"]
    dtype: str
    tensors: list[CacheTensor]
    controls: list[ControlInput] = Field(default_factory=list)
    grows: bool  # whether some state tensor grows with the number of decoded tokens
    params: dict[str, Any] = Field(default_factory=dict)  # layout parameters (block_size, window, ...)
    protocol: list[str]  # the steps in words, for people and for the device README
    layers: list[LayerCache] = Field(default_factory=list)

    @property
    def paged(self) -> bool:
        """Whether some layer is paged: the host then keeps a block table (and new_lengths)."""
        return self.layout == "paged" or any(layer.layout == "paged" for layer in self.layers)


class CustomOp(_Model):
    domain: str
    op_type: str
    version: int
    count: int  # nodes of this op in the graph(s)
    trt_plugin: str | None = None  # "namespace::name" of the TensorRT plugin that can replace it


class FileEntry(_Model):
    sha256: str
    bytes: int


class BuildInfo(_Model):
    """Filled by `effx build`: what was built, for which target, and how to run it."""

    target: str
    backend: Literal["ort", "tensorrt"]
    precision: str
    engine_built: bool  # False for a device build kit
    reason: str = ""  # why no engine was built, for kits
    sm: int | None = None
    tensorrt_version: str | None = None
    graphs: dict[str, GraphSpec] = Field(default_factory=dict)  # built artifacts (engine or optimized ONNX)
    plugins: list[dict[str, Any]] = Field(default_factory=list)
    session_options: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Model):
    schema_version: int = SCHEMA_VERSION
    stage: Literal["onnx", "build"]
    family: Literal["encoder", "decoder"]
    versions: dict[str, str]  # effx, torch, onnx, onnxruntime ... that made the files
    spec: dict[str, Any]  # the run spec (effx.core.spec.RunSpec as JSON)
    opsets: dict[str, int]  # domain -> version; "" is ai.onnx
    ir_version: int
    custom_ops: list[CustomOp] = Field(default_factory=list)
    graphs: dict[str, GraphSpec]  # "encoder", or "prefill" + "decode"
    kv_cache: CachePlan | None = None
    # the op flavour per attention site the graphs were written with, after the opset and --trt-plugins had their
    # say (effx.core.flavours.effective_attention_ops); empty: an export from before flavours
    attention_ops: dict[str, str] = Field(default_factory=dict)
    build: BuildInfo | None = None
    weights: dict[str, Any] | None = None  # sha256 of the state dict the graphs were exported from, and its source
    files: dict[str, FileEntry] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _files_inside(cls, value: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in value:
            inside_folder(name, "file")
        return value

    # -- io -------------------------------------------------------------------------------------------
    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ArtifactError(f"{folder}: no {MANIFEST_NAME}; point at a folder written by `effx export` or `effx build`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); re-run the stage that wrote it") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise ArtifactError(
                f"{path}: manifest schema_version {version}, this effx reads {SCHEMA_VERSION}; re-run the stage with this effx"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "manifest"
            raise ArtifactError(f"{path}: {where}: {err['msg'].removeprefix('Value error, ')}; re-run the stage "
                                "that wrote it") from None

    def hash_files(self, folder: Path, names: list[str] | None = None) -> None:
        """Record sha256 and size of every file in `folder` (except the manifest itself)."""
        folder = Path(folder)
        paths = [folder / n for n in names] if names else sorted(p for p in folder.rglob("*") if p.is_file())
        self.files = {
            p.relative_to(folder).as_posix(): FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
            for p in sorted(paths)
            if p.name != MANIFEST_NAME
        }

    def verify_files(self, folder: Path) -> None:
        """Raise ArtifactError if a listed file is missing, its content changed, or an ONNX graph reads
        external data from outside the folder."""
        for name, entry in self.files.items():
            p = Path(folder) / name
            if not p.is_file():
                raise ArtifactError(f"{p}: listed in {MANIFEST_NAME} but missing; re-run the stage that wrote {folder}")
            if sha256_file(p) != entry.sha256:
                raise ArtifactError(f"{p}: sha256 differs from {MANIFEST_NAME}; the file was changed after it was written")
        for name in self.files:
            if name.endswith(".onnx"):
                check_external_data(Path(folder) / name)


def check_external_data(path: Path) -> None:
    """Refuse an ONNX file whose external data lies outside its folder (the file is parsed, nothing else read)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            try:
                inside_folder(location, "external data")
            except ValueError as exc:
                raise ArtifactError(f"{path}: {exc}; an artifact folder must be self-contained") from None


def _tensors(graph: onnx.GraphProto):
    """Initializers and constant tensors of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                yield from _tensors(g)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
