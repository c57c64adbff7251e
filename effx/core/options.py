"""Options of the export and build stages, declared once. The API functions take their values, and the CLI
generates the flags of `effx export`, `effx build` and `effx run` (which runs both stages) from these
classes (effx.core.specflags.stage_flags), so the three commands never disagree on a name or a default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from effx.core.errors import SpecError
from effx.core.flavours import SITES, format_attention_ops, parse_attention_ops

MIN_OPSET = 18  # function bodies use ReduceMean/ReduceMax with axes inputs (opset 18)
MAX_OPSET = 27  # the newest ai.onnx opset ONNX Runtime 1.32 runs (LinearAttention-27; IR <= 13)
ATTENTION_OPSET = 23  # ONNX Attention
DEFAULT_OPSET = 23  # without --opset: this, or the newest opset a chosen standard attention op needs


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise SpecError(
            f"--opset {opset} is out of range: effx function bodies need ai.onnx >= {MIN_OPSET} and ONNX Runtime "
            f"runs <= {MAX_OPSET}; full attention becomes the ONNX Attention op from {ATTENTION_OPSET}"
        )


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, values: dict) -> _Options:
        """Validate flag values; a problem becomes one SpecError line naming the flag."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "options"
            raise SpecError(f"{flag} {err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}") from None


class ExportOptions(_Options):
    """`effx export` (and the export stage of `effx run`)."""

    opset: int | None = Field(None, description=f"ai.onnx opset ({MIN_OPSET}-{MAX_OPSET}); default: "
                                                f"{DEFAULT_OPSET}, or what a chosen standard attention op needs "
                                                "(25: windows, soft-capping; 27: LinearAttention)")
    max_batch: int = Field(8, ge=1, description="largest batch in the recorded shape ranges")
    inline: bool = Field(False, description="plain ONNX: inline the effx functions, no custom domain")
    trt_plugins: bool = Field(False, description="mark effx nodes for TensorRT's AOT plugins (aot=1)")
    attention_ops: str | None = Field(None, description="op per attention site, SITE=onnx|effx,... (sites: "
                                                       f"{', '.join(SITES)}); default: the target's measured choice")

    @field_validator("attention_ops")
    @classmethod
    def _attention_ops(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return format_attention_ops(parse_attention_ops(value))

    @field_validator("opset")
    @classmethod
    def _opset(cls, value: int | None) -> int | None:
        if value is not None:
            check_opset(value)
        return value


class BuildOptions(_Options):
    """`effx build` (and the build stage of `effx run`)."""

    target: str = Field("cpu", description="target to build for (see `effx targets`)",
                        json_schema_extra={"short": "-t"})
    precision: str = Field("fp32", description="fp32 | fp16 | bf16 | int8 | fp8 | int4w")
    calib: str = Field("auto", description="int8: auto (cpu: dynamic, else random) | dynamic (ORT) | random | "
                                           "text:FILE (real text, the model's tokenizer) | FILE.npz | token file")
    calib_samples: int = Field(8, ge=1, description="calibration batches")
    dla_core: int | None = Field(None, ge=0, description="run on this DLA core (GPU fallback on)")
