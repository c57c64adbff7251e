"""Capability checks: a request the target cannot honour is an error before any work starts."""

from __future__ import annotations

from effx.core.errors import CapabilityError
from effx.targets.profiles import PRECISIONS, TargetProfile

DLA_PRECISIONS = ("fp16", "int8")


def check_request(target: TargetProfile, precision: str, dla_core: int | None = None) -> None:
    if target.unsupported:
        raise CapabilityError(f"target {target.name} is not supported: {target.unsupported}")
    if precision not in PRECISIONS:
        raise CapabilityError(f"--precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    if precision not in target.precisions:
        where = f" (sm_{target.sm})" if target.sm else ""
        raise CapabilityError(
            f"--precision {precision} is not supported on target {target.name}{where}; "
            f"it supports {', '.join(target.precisions)}"
        )
    if dla_core is None:
        return
    if target.dla_cores == 0:
        raise CapabilityError(f"--dla-core {dla_core}: target {target.name} has no DLA; drop --dla-core")
    if not 0 <= dla_core < target.dla_cores:
        raise CapabilityError(f"--dla-core {dla_core}: target {target.name} has DLA cores 0..{target.dla_cores - 1}")
    if precision not in DLA_PRECISIONS:
        raise CapabilityError(f"--dla-core needs --precision fp16 or int8 (DLA runs nothing else), got {precision}")
