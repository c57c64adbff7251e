"""effx.plugins: the custom attention ops (one OpSpec each) and what hangs off them.

Importing this package registers the torch custom ops `torch.ops.effx.*` the models call.
"""

from effx.plugins import block_sparse, hourglass, linear, linformer, local, paged  # noqa: F401  (register ops)
from effx.plugins.opspec import DOMAIN, DOMAIN_VERSION, OPS, OpSpec

__all__ = ["DOMAIN", "DOMAIN_VERSION", "OPS", "OpSpec"]
