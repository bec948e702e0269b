"""PyTorch <-> Flax state conversion (``conversion``) and comparison (``comparison``).

torch is imported by the functions that need it, not by this package.
"""

from jaxbn.interop.torch.comparison import Comparison, compare
from jaxbn.interop.torch.conversion import (
    batch_norm_kwargs,
    default_prefix_rule,
    flax_to_torch,
    momentum_from_torch,
    momentum_to_torch,
    nnx_to_torch,
    torch_to_flax,
    torch_to_nnx,
)

__all__ = [
    "Comparison",
    "batch_norm_kwargs",
    "compare",
    "default_prefix_rule",
    "flax_to_torch",
    "momentum_from_torch",
    "momentum_to_torch",
    "nnx_to_torch",
    "torch_to_flax",
    "torch_to_nnx",
]
