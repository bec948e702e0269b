"""PyTorch <-> Flax conversion (``convert``) and comparison (``compare``); imports torch lazily."""

from jaxbn.interop.torch.compare import Comparison, compare
from jaxbn.interop.torch.convert import (batch_norm_kwargs, default_prefix_rule, flax_to_torch,
                                         momentum_from_torch, momentum_to_torch, nnx_to_torch,
                                         torch_to_flax, torch_to_nnx)

__all__ = ["Comparison", "batch_norm_kwargs", "compare", "default_prefix_rule", "flax_to_torch",
           "momentum_from_torch", "momentum_to_torch", "nnx_to_torch", "torch_to_flax",
           "torch_to_nnx"]
