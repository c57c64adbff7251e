"""effx.targets.bundle: what a build folder is packaged as for deployment: its device README, and a Triton
Inference Server model repository (`effx bundle --format triton`)."""

from effx.targets.bundle.readme import bundle_readme
from effx.targets.bundle.triton import write_triton_repo

__all__ = ["bundle_readme", "write_triton_repo"]
