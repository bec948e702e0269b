"""Conversions between jaxbn/Flax variables and other frameworks' checkpoints.

- :mod:`jaxbn.interop.torch`: PyTorch state dicts (BatchNorm, Conv, Linear)
  to a Flax variable tree ``{'params', 'batch_stats'}`` and back, momentum
  conversion and a check that both models compute the same.

Nothing here is imported by ``import jaxbn``, and importing a submodule does
not import the other framework: each function that needs it imports it.
"""
