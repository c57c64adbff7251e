"""A stand-in for TensorRT's compiled core, just enough to run the *real* `tensorrt.plugin` Python sources.

TensorRT's libraries cannot be installed on the CI machine, but the QDP layer (`tensorrt_bindings/plugin/*.py`
in the `tensorrt-cu13-bindings` wheel) is plain Python over a handful of core types. With these stubs the
real decorators validate effx's registrations (`_validate.py`), the real creator builds plugin objects
from ONNX-style fields, and the real `_TemplateAOTPlugin` drives effx's aot_impl through the calls the
builder makes (output types/shapes, format combinations, tactics, launch parameters, kernel).

Dimension expressions are symbolic: a dimension can be a named unknown, so a launch parameter that
wrongly depends on a build-time constant shows up when it is evaluated for other sizes.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from typing import Any

import numpy as np


class Logger:
    WARNING, INFO, ERROR = 1, 2, 0

    def __init__(self, *args: Any) -> None:
        self.messages: list[str] = []

    def log(self, severity: int, message: str) -> None:
        self.messages.append(message)


class _Enum(enum.Enum):
    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


DataType = _Enum("DataType", "FLOAT HALF BF16 INT8 INT32 INT64 BOOL UINT8 FP8 INT4 FP4 E8M0")
float32, float16, bfloat16, int32, int64 = DataType.FLOAT, DataType.HALF, DataType.BF16, DataType.INT32, DataType.INT64
TensorFormat = _Enum("TensorFormat", "LINEAR CHW2 HWC8 CHW4 CHW16 CHW32 DHWC8 CDHW32 HWC DLA_LINEAR DLA_HWC4 HWC16 DHWC")
PluginFieldType = _Enum("PluginFieldType", "FLOAT16 FLOAT32 FLOAT64 INT8 INT16 INT32 CHAR DIMS UNKNOWN BF16 INT64 FP8")
TensorRTPhase = _Enum("TensorRTPhase", "BUILD RUNTIME")
QuickPluginCreationRequest = _Enum("QuickPluginCreationRequest", "UNKNOWN PREFER_JIT PREFER_AOT STRICT_JIT STRICT_AOT")
DimensionOperation = _Enum("DimensionOperation", "SUM PROD MAX MIN SUB EQUAL LESS FLOOR_DIV CEIL_DIV")
PluginArgType = _Enum("PluginArgType", "INT")
PluginArgDataType = _Enum("PluginArgDataType", "INT8 INT16 INT32")


class Dims(tuple):
    MAX_DIMS = 8

    def __new__(cls, shape: Any = ()) -> Dims:
        return super().__new__(cls, [0] * shape if isinstance(shape, int) else shape)


class IDimensionExpr:
    """A dimension: a constant, or a function of named unknowns (evaluate with `expr(env)`)."""

    def __init__(self, fn: Callable[[dict], int], constant: int | None = None, text: str = "?"):
        self._fn, self._constant, self.text = fn, constant, text

    def is_constant(self) -> bool:
        return self._constant is not None

    def get_constant_value(self) -> int:
        assert self._constant is not None, f"{self.text} is not a build-time constant"
        return self._constant

    def __call__(self, env: dict) -> int:
        return self._fn(env)

    def __repr__(self) -> str:
        return f"Expr({self.text})"


def constant(value: int) -> IDimensionExpr:
    return IDimensionExpr(lambda env, v=value: v, value, str(value))


def symbol(name: str) -> IDimensionExpr:
    return IDimensionExpr(lambda env, n=name: env[n], None, name)


def dim(value: int | str) -> IDimensionExpr:
    return symbol(value) if isinstance(value, str) else constant(value)


_OPS = {
    DimensionOperation.SUM: operator.add, DimensionOperation.PROD: operator.mul, DimensionOperation.MAX: max,
    DimensionOperation.MIN: min, DimensionOperation.SUB: operator.sub,
    DimensionOperation.EQUAL: lambda a, b: int(a == b), DimensionOperation.LESS: lambda a, b: int(a < b),
    DimensionOperation.FLOOR_DIV: operator.floordiv, DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b),
}


class IExprBuilder:
    def constant(self, value: int) -> IDimensionExpr:
        return constant(value)

    def operation(self, op: DimensionOperation, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        f = _OPS[op]
        if a.is_constant() and b.is_constant():
            return constant(f(a.get_constant_value(), b.get_constant_value()))
        return IDimensionExpr(lambda env: f(a(env), b(env)), None, f"{op.name}({a.text}, {b.text})")


class DimsExprs(list):
    def __init__(self, n: Any = 0):
        super().__init__([None] * n if isinstance(n, int) else n)


class ISymExpr:
    def __init__(self) -> None:
        pass


class ITensor:
    pass


class PluginField:
    def __init__(self, name: str = "", data: Any = None, type: PluginFieldType = PluginFieldType.UNKNOWN):  # noqa: A002
        self.name, self.type = name, type
        self.data = np.frombuffer(data, dtype=np.int8) if isinstance(data, bytes) else data


class PluginFieldCollection(list):
    pass


class PluginTensorDesc:
    def __init__(self, dims: tuple = (), type: DataType | None = None, format: TensorFormat = TensorFormat.LINEAR,  # noqa: A002
                 scale: float = 1.0):
        self.dims, self.type, self.format, self.scale = Dims(dims), type, format, scale


class DynamicPluginTensorDesc:
    def __init__(self, desc: PluginTensorDesc):
        self.desc = desc
        self.min = self.max = self.opt = desc.dims


class _Interface:
    """Base of the IPluginV3* / IPluginCreatorV3Quick classes: the C++ side only holds Python state."""

    def __init__(self) -> None:
        pass


IPluginV3 = type("IPluginV3", (_Interface,), {})
IPluginV3QuickCore = type("IPluginV3QuickCore", (_Interface,), {})
IPluginV3QuickBuild = type("IPluginV3QuickBuild", (_Interface,), {})
IPluginV3QuickRuntime = type("IPluginV3QuickRuntime", (_Interface,), {})
IPluginV3QuickAOTBuild = type("IPluginV3QuickAOTBuild", (_Interface,), {})
IPluginCreatorV3Quick = type("IPluginCreatorV3Quick", (_Interface,), {})


class _Registry:
    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], Any] = {}

    def register_creator(self, creator: Any, namespace: str) -> bool:
        key = (creator.name, creator.plugin_version, namespace)
        assert key not in self.creators, f"creator {key} registered twice"
        self.creators[key] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = "") -> Any:
        return self.creators.get((name, version, namespace))


_REGISTRY = _Registry()


def get_plugin_registry() -> _Registry:
    return _REGISTRY


def nptype(dtype: DataType) -> type:
    return {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32,
            DataType.INT64: np.int64, DataType.INT8: np.int8, DataType.BOOL: np.bool_}[dtype]


__version__ = "11.4.0.106-stub"
