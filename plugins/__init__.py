"""effx.plugins: the custom attention ops (one OpSpec each) and what hangs off them.

Importing this package registers the torch custom ops `torch.ops.effx.*` the models call.
"""

if __name__ != "effx.plugins":  # imported as a top-level name (a checkout's root on sys.path)
    raise ImportError(f"{__name__}: import effx.plugins (the folder plugins/ is mapped into the effx package)")

from effx.plugins import block_sparse, cache_write, linear, linformer, local, paged, standard  # noqa: E402, F401 (register ops)
from effx.plugins.kernels import install as _install_kernels  # noqa: E402
from effx.plugins.opspec import DOMAIN, DOMAIN_VERSION, MASK_VALUE, OPS, OpSpec  # noqa: E402

# CUDA tensors run the fused Triton kernels when triton is installed (triton is imported on the first CUDA call)
_install_kernels()

__all__ = ["DOMAIN", "DOMAIN_VERSION", "MASK_VALUE", "OPS", "OpSpec"]
