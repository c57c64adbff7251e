"""effx.plugins: the custom attention ops (one OpSpec each) and what hangs off them.

Importing this package registers the torch custom ops `torch.ops.effx.*` the models call.
"""

from effx.plugins import block_sparse, hourglass, linear, linformer, local, paged  # noqa: F401  (register ops)

# CUDA tensors run the fused Triton kernels when triton is installed (imported on first CUDA call only)
from effx.plugins.kernels import install as _install_kernels  # noqa: E402
from effx.plugins.opspec import DOMAIN, DOMAIN_VERSION, OPS, OpSpec

_install_kernels()

__all__ = ["DOMAIN", "DOMAIN_VERSION", "OPS", "OpSpec"]
