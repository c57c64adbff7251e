"""Errors effx raises on purpose. The CLI turns each into one line and exit code 2 (tracebacks only with --debug)."""

from __future__ import annotations


class EffxError(Exception):
    """Base class: the message names the culprit (field, value, file) and the fix."""

    exit_code = 2


class SpecError(EffxError):
    """The run spec is invalid: a value out of range or an incompatible combination."""


class CompatibilityError(SpecError):
    """Attention kind x KV-cache layout x model family that cannot work together."""


class ArtifactError(EffxError):
    """An input folder (model/, onnx/, build/) is missing, incomplete or from another effx version."""


class OutputPathError(EffxError):
    """The output folder cannot be written (it is a file, no permission, ...)."""


class MissingDependencyError(EffxError):
    """An optional dependency is not installed; the message names the extra to install."""


class CapabilityError(EffxError):
    """A target cannot honour the request (fp8 on Orin, DLA on Thor, ...)."""


class StepFailed(EffxError):
    """A step effx runs failed on valid input (a tool it calls exited with an error)."""

    exit_code = 1


class ValidationFailed(EffxError):
    """An artifact disagrees with the PyTorch reference beyond tolerance."""

    exit_code = 1
