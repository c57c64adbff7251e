"""effx.targets.ort: the ONNX Runtime backend (targets `cpu`, `cuda`): its build and its runner."""

from __future__ import annotations

from pathlib import Path

from effx.core.manifest import Manifest
from effx.targets.ort.build import build_ort as build_target
from effx.targets.ort.runner import OrtRunner, ort_providers


def open_runner(folder: Path, manifest: Manifest, provider: str | None = None, threads: int = 0,
                arena: bool = True) -> OrtRunner:
    return OrtRunner(folder, manifest, provider=provider, threads=threads, arena=arena)


__all__ = ["OrtRunner", "build_target", "open_runner", "ort_providers"]
