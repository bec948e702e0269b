"""Runs a batch through a PyTorch model and its Flax port; names the first module that differs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxbn.interop.torch.conversion import (Rule, flat_tree, group_by_module, path_resolver, show_path, to_numpy,
                                         default_prefix_rule, torch_to_flax)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What :func:`compare` found.

    Attributes:
      ok: everything compared agrees within the tolerances.
      max_abs_diff: the final outputs' largest absolute difference.
      max_rel_diff: ``max_abs_diff`` relative to the largest absolute torch output.
      first_mismatch: the first difference (module outputs, then state, then output), or None.
      state_mismatches: ``"module '<torch prefix>' (<flax path>): max abs diff <d>"`` for each
        parameter or statistic that differs, in state-dict order.
      layer_diffs: ``(torch prefix, max abs diff)`` of each module output, in execution order.
    """

    ok: bool
    max_abs_diff: float
    max_rel_diff: float
    first_mismatch: str | None
    state_mismatches: tuple[str, ...]
    layer_diffs: tuple[tuple[str, float], ...]

    def __str__(self) -> str:
        head = "torch and flax agree" if self.ok else f"first mismatch: {self.first_mismatch}"
        return (f"{head} (outputs: max abs diff {self.max_abs_diff:.3g}, max rel diff "
                f"{self.max_rel_diff:.3g})")


def compare(torch_module: Any, flax_model: Any, variables: Mapping[str, Any], x: Any, *,
            apply_kwargs: Mapping[str, Any] | None = None,
            name_map: Mapping[str, Any] | None = None, rule: Rule | None = default_prefix_rule,
            channels_last: bool = True, rtol: float = 1e-4, atol: float = 1e-5,
            raise_on_mismatch: bool = True) -> Comparison:
    """Compares two models' parameters, statistics, module outputs and outputs on ``x`` (eval mode).

    Args:
      torch_module: the ``torch.nn.Module`` (in eval mode for the call, restored after).
      flax_model: a ``flax.linen.Module``, or a function ``apply(variables, x) -> y``.
      variables: the Flax variables (not mutable: the model must run in inference mode).
      x: a batch in PyTorch's layout (NCHW ...), tensor or array.
      apply_kwargs: keyword arguments for the Flax call, e.g. ``{'train': False}``.
      name_map, rule: as for :func:`torch_to_flax`.
      channels_last: move axis 1 of ``x`` and of the torch activations last (NCHW -> NHWC).
      rtol, atol: the tolerances: ``|flax - torch| <= atol + rtol * |torch|`` elementwise.
      raise_on_mismatch: raise instead of returning a failed :class:`Comparison`.

    Raises:
      AssertionError: with ``raise_on_mismatch``, when something differs.
      TypeError / ValueError: from the conversion, or the outputs' shapes differ.

    >>> import torch, flax.linen as nn
    >>> from jaxbn.linen import BatchNorm
    >>> torch_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    >>> model = nn.Sequential([nn.Dense(3), BatchNorm(use_running_average=True)])
    >>> variables = torch_to_flax(torch_model)
    >>> variables['batch_stats']['layers_1']['var'] *= 2
    >>> compare(torch_model, model, variables, torch.randn(5, 4), raise_on_mismatch=False)
    Comparison(ok=False, ..., first_mismatch="module '1' (layers_1): max abs diff ...", ...)
    """
    import torch
    if not isinstance(torch_module, torch.nn.Module):
        raise TypeError(f"torch_module must be a torch.nn.Module, got "
                        f"{type(torch_module).__name__}.")
    resolve, given = path_resolver(name_map, rule), flat_tree(variables)
    converted = flat_tree(torch_to_flax(torch_module, variables, name_map=name_map, rule=rule))
    groups, mismatches = group_by_module(torch_module.state_dict()), []
    for prefix, leaves in groups.items():  # the parameters and statistics, in state-dict order
        module_path = resolve(prefix, next(iter(leaves.values())))
        for path in [path for path in converted if path[1:-1] == module_path]:
            ours, theirs = (np.asarray(tree[path], np.float64) for tree in (given, converted))
            if not np.allclose(ours, theirs, rtol=rtol, atol=atol):
                mismatches.append(f"module {prefix!r} ({show_path(path)}): max abs diff "
                                  f"{np.max(np.abs(ours - theirs)):.3g}")

    outputs: list[tuple[str, np.ndarray]] = []  # of the modules with state, in execution order

    def to_flax(array: np.ndarray) -> np.ndarray:
        return np.moveaxis(array, 1, -1) if channels_last and array.ndim >= 3 else array

    def record(name: str, output: Any) -> None:  # a copy: an in-place op may change output later
        if isinstance(output, torch.Tensor):
            outputs.append((name, output.detach().cpu().numpy().astype(np.float64)))

    handles = [sub.register_forward_hook(lambda _, __, output, name=name: record(name, output))
               for name, sub in torch_module.named_modules() if name in groups]
    x_np, was_training = to_numpy(x, "x"), torch_module.training
    torch_module.eval()
    try:
        with torch.no_grad():
            y_torch = to_flax(torch_module(torch.as_tensor(x_np)).cpu().numpy().astype(np.float64))
    finally:
        torch_module.train(was_training)
        for handle in handles:
            handle.remove()
    if hasattr(flax_model, "apply") and hasattr(flax_model, "init"):  # a linen module
        y_flax, captured = flax_model.apply(variables, to_flax(x_np), capture_intermediates=True,
                                            mutable=["intermediates"], **(apply_kwargs or {}))
    else:
        y_flax, captured = flax_model(variables, to_flax(x_np), **(apply_kwargs or {})), {}
    if (y_flax := np.asarray(y_flax, np.float64)).shape != y_torch.shape:
        raise ValueError(f"the Flax output has shape {y_flax.shape}, the torch output (as Flax "
                         f"lays it out) {y_torch.shape}.")
    calls, layer_diffs, first_layer = flat_tree(captured.get("intermediates", {})), [], None
    for name, output in outputs:
        at = resolve(name, name)  # the Flax module's path
        node = None if at is None else calls.get((*at, "__call__"))
        if at is None or not isinstance(node, (tuple, list)) or not node:
            continue
        if (ours := np.asarray(node[0], np.float64)).shape != (ref := to_flax(output)).shape:
            layer_diffs.append((name, float("inf")))
            first_layer = first_layer or (f"module {name!r} ({show_path(at)}): output shape "
                                          f"{ours.shape}, torch {ref.shape}")
            continue
        layer_diffs.append((name, diff := float(np.max(np.abs(ours - ref), initial=0.0))))
        if first_layer is None and not np.allclose(ours, ref, rtol=rtol, atol=atol):
            first_layer = f"module {name!r} ({show_path(at)}): max abs diff {diff:.3g}"
    abs_diff, largest = (float(np.max(np.abs(a), initial=0.0)) for a in (y_flax - y_torch, y_torch))
    first = first_layer or (mismatches[0] if mismatches else None)
    if first is None and not np.allclose(y_flax, y_torch, rtol=rtol, atol=atol):
        first = f"final output: max abs diff {abs_diff:.3g}"
    result = Comparison(first is None, abs_diff, abs_diff / max(largest, np.finfo(np.float64).tiny),
                        first, tuple(mismatches), tuple(layer_diffs))
    if raise_on_mismatch and not result.ok:
        extra = f"; parameters/statistics differ at: {'; '.join(mismatches)}" if mismatches else ""
        raise AssertionError(f"{result}{extra}")
    return result
