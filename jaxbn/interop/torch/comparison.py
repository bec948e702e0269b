"""Runs a batch through a PyTorch model and its Flax port; names the first module that differs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxbn.interop.torch import conversion
from jaxbn.interop.torch.conversion import Rule, bad, default_prefix_rule, flat_tree, torch_to_flax


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What :func:`compare` found.

    Attributes:
      ok: everything compared agrees within the tolerances.
      max_abs_diff: the final outputs' largest absolute difference.
      max_rel_diff: ``max_abs_diff`` relative to the largest absolute torch output.
      first_mismatch: the first difference (module outputs, then state, then output), or None.
      state_mismatches: ``"module '<prefix>' (<path>): max abs diff <d>"`` per state that differs.
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
        diffs = f"max abs diff {self.max_abs_diff:.3g}, max rel diff {self.max_rel_diff:.3g}"
        return f"{head} (outputs: {diffs})"


def compare(
    torch_module: Any,
    flax_model: Any,
    variables: Mapping[str, Any],
    x: Any,
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    name_map: Mapping[str, Any] | None = None,
    rule: Rule | None = default_prefix_rule,
    channels_last: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    raise_on_mismatch: bool = True,
) -> Comparison:
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
      TypeError: from the conversion, or ``torch_module`` is not a torch module.
      ValueError: from the conversion, or the outputs' shapes differ.

    >>> import torch, flax.linen as nn, jaxbn.linen
    >>> torch_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    >>> model = nn.Sequential([nn.Dense(3), jaxbn.linen.BatchNorm(use_running_average=True)])
    >>> compare(torch_model, model, torch_to_flax(torch_model), torch.randn(5, 4)).ok
    True
    """
    import torch

    if not isinstance(torch_module, torch.nn.Module):
        raise bad("torch_module", "a torch.nn.Module", type(torch_module).__name__)
    given = flat_tree(variables)
    converted = flat_tree(torch_to_flax(torch_module, variables, name_map=name_map, rule=rule))
    resolve = conversion.path_resolver(name_map, rule)
    entries = list(conversion.entry_paths(torch_module.state_dict(), resolve))
    where = {name: path[1:-1] for name, _, path in entries if path is not None}  # Flax modules
    close = lambda ours, ref: np.allclose(ours, ref, rtol=rtol, atol=atol)
    differ = lambda name, at, what: f"module {name!r} ({'/'.join(at)}): {what}"
    mismatches = []
    for name, path in [(name, path) for name, _, path in entries if path in converted]:
        ours, theirs = (np.asarray(tree[path], np.float64) for tree in (given, converted))
        if not close(ours, theirs):  # the parameters and statistics, in state-dict order
            mismatches.append(differ(name, path, f"max abs diff {np.abs(ours - theirs).max():.3g}"))
    outputs: list[tuple[str, np.ndarray]] = []  # of the modules with a Flax path, in call order
    to_flax = lambda a: np.moveaxis(a, 1, -1) if channels_last and a.ndim >= 3 else a
    copy = lambda y: y.detach().cpu().numpy().astype(np.float64)  # an in-place op may change y
    record = lambda n, y: outputs.append((n, copy(y))) if isinstance(y, torch.Tensor) else None
    hooks = [(n, m) for n, m in torch_module.named_modules() if n in where]
    handles = [m.register_forward_hook(lambda _, __, y, n=n: record(n, y)) for n, m in hooks]
    x_np, was_training = conversion.to_numpy(x, "x"), torch_module.training
    torch_module.eval()
    try:
        with torch.no_grad():
            y_torch = to_flax(copy(torch_module(torch.as_tensor(x_np))))
    finally:
        torch_module.train(was_training)
        for handle in handles:
            handle.remove()
    kwargs = dict(apply_kwargs or {})
    if hasattr(flax_model, "apply") and hasattr(flax_model, "init"):  # a linen module
        capture = {"capture_intermediates": True, "mutable": ["intermediates"]}
        y_flax, captured = flax_model.apply(variables, to_flax(x_np), **capture, **kwargs)
    else:
        y_flax, captured = flax_model(variables, to_flax(x_np), **kwargs), {}
    if (y_flax := np.asarray(y_flax, np.float64)).shape != y_torch.shape:
        raise ValueError(
            f"output shapes differ: Flax {y_flax.shape}, torch {y_torch.shape} (in Flax's layout)."
        )
    calls = flat_tree(captured.get("intermediates", {}))
    layer_diffs, first_layer = [], None
    for name, output in outputs:
        node = calls.get((*where[name], "__call__"))
        if not isinstance(node, (tuple, list)) or not node:
            continue
        ours, ref = np.asarray(node[0], np.float64), to_flax(output)
        same = ours.shape == ref.shape
        diff = float(np.max(np.abs(ours - ref), initial=0.0)) if same else float("inf")
        layer_diffs.append((name, diff))
        if first_layer is None and not (same and close(ours, ref)):
            shapes = f"output shape {ours.shape}, torch {ref.shape}"
            first_layer = differ(name, where[name], f"max abs diff {diff:.3g}" if same else shapes)
    abs_diff, largest = (float(np.max(np.abs(a), initial=0.0)) for a in (y_flax - y_torch, y_torch))
    first = first_layer or (mismatches[0] if mismatches else None)
    if first is None and not close(y_flax, y_torch):
        first = f"final output: max abs diff {abs_diff:.3g}"
    rel = abs_diff / max(largest, np.finfo(np.float64).tiny)
    result = Comparison(first is None, abs_diff, rel, first, tuple(mismatches), tuple(layer_diffs))
    if raise_on_mismatch and not result.ok:
        extra = f"; parameters/statistics differ at: {'; '.join(mismatches)}" if mismatches else ""
        raise AssertionError(f"{result}{extra}")
    return result
