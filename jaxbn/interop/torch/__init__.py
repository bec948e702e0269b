"""PyTorch <-> Flax state conversion and comparison; torch is imported only by the functions."""

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

__all__ = ["default_prefix_rule", "flax_to_torch", "nnx_to_torch", "torch_to_flax", "torch_to_nnx"]
__all__ += ["batch_norm_kwargs", "momentum_from_torch", "momentum_to_torch"]
__all__ += ["Comparison", "compare"]
