"""PyTorch state dicts <-> Flax variables: module names, layouts, dtypes and momentum."""

from __future__ import annotations

import difflib
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

FlaxPath = tuple[str, ...]
Rule = Callable[[str], "FlaxPath | None"]

# A BatchNorm's entries -> (collection, name) in Flax; the last parts a state-dict key may have.
_BN_NAMES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
             "num_batches_tracked": ("batch_stats", "count")}
_COLLECTIONS = ("params", "batch_stats")


def default_prefix_rule(prefix: str) -> FlaxPath:
    """Maps a PyTorch module prefix to a Flax module path, as Flax names lists of submodules.

    Args:
      prefix: a state-dict key without its last part, e.g. ``'layer1.0.bn1'``.

    Raises:
      ValueError: an empty part (``'a..b'``).

    >>> [default_prefix_rule(prefix) for prefix in ('layer2.0.downsample.1', '0', '')]
    [('layer2_0', 'downsample_1'), ('layers_0',), ()]
    """
    path: list[str] = []
    for part in prefix.split(".") if prefix else ():
        if not part:
            raise ValueError(f"module prefix {prefix!r} has an empty part; expected names "
                             "separated by single dots.")
        path.append(f"{path.pop() if path else 'layers'}_{part}" if part.isdigit() else part)
    return tuple(path)


def path_resolver(name_map: Any, rule: Any) -> Callable[[str, str], FlaxPath | None]:
    """``(prefix, key) -> Flax path or None``, from ``name_map`` or else ``rule``."""
    if name_map is not None and not isinstance(name_map, Mapping):
        raise TypeError("name_map must be a mapping of torch module prefixes to Flax paths, got "
                        f"{type(name_map)}.")
    if rule is not None and not callable(rule):
        raise TypeError(f"rule must be callable (prefix -> Flax path) or None, got {rule!r}.")
    names = dict(name_map or {})

    def resolve(prefix: str, key: str) -> FlaxPath | None:
        if prefix not in names and rule is None:
            close = difflib.get_close_matches(prefix, list(names), n=1)
            raise ValueError(f"unknown key {key!r}: its module {prefix!r} is not in name_map"
                             f"{f' (did you mean {close[0]!r}?)' if close else ''} and rule=None; "
                             "add it to name_map (None skips it) or pass a rule.")
        value = names[prefix] if prefix in names else rule(prefix)
        if isinstance(value, str):
            value = tuple(part for part in value.split("/") if part)
        if value is None or isinstance(value, (tuple, list)) and all(
                isinstance(part, str) and part for part in value):
            return None if value is None else tuple(value)
        raise TypeError(
            f"{'name_map' if prefix in names else 'rule'} maps the torch module {prefix!r} to "
            f"{value!r}; expected a tuple of Flax module names such as ('layer1_0', 'bn1'), a "
            "string 'layer1_0/bn1', or None to skip the module.")
    return resolve


def to_numpy(value: Any, key: str) -> np.ndarray:
    """A NumPy copy of a torch tensor or array-like; raises TypeError for anything else."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        tensor = value.detach().cpu()
        if tensor.is_complex():
            raise TypeError(f"state dict entry {key!r} has dtype {tensor.dtype}; expected a real "
                            "tensor or array.")
        bf16 = str(tensor.dtype) == "torch.bfloat16"  # not in NumPy; ml_dtypes (via jax) has it
        return tensor.float().numpy().astype(jnp.bfloat16) if bf16 else tensor.numpy().copy()
    if not (isinstance(value, numbers.Number) or hasattr(value, "__array__")):
        raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}; expected a "
                        "torch.Tensor or a NumPy array.")
    if (array := np.asarray(value)).dtype.kind not in "biuf" and array.dtype.name != "bfloat16":
        raise TypeError(f"state dict entry {key!r} has dtype {array.dtype}; expected a numeric "
                        "tensor or array.")
    return array


def _state_dict_of(obj: Any, argument: str) -> tuple[dict[str, Any], Any]:
    """``(state dict, module or None)`` from a torch module or a mapping; never a path."""
    if isinstance(obj, (str, bytes, os.PathLike)):
        raise TypeError(
            f"{argument} is {obj!r}, a path or bytes; pass the loaded state dict (a mapping of "
            "names to tensors or arrays) or the torch module. jaxbn never reads or unpickles "
            "files: load them yourself, e.g. torch.load(path, weights_only=True).")
    if hasattr(obj, "state_dict") and hasattr(obj, "named_modules"):
        return dict(obj.state_dict()), obj
    if not isinstance(obj, Mapping):
        raise TypeError(f"{argument} must be a mapping of names to torch tensors or NumPy arrays, "
                        f"or a torch.nn.Module; got {type(obj).__name__}.")
    if bad := [key for key in obj if not isinstance(key, str)]:
        raise TypeError(f"{argument} has a non-string key {bad[0]!r}; expected state-dict names "
                        "such as 'bn1.weight'.")
    return dict(obj), None


def group_by_module(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """``{prefix: {leaf: full key}}`` in the order of the keys; raises for unknown leaf names."""
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        prefix, _, leaf = key.rpartition(".")
        if leaf not in _BN_NAMES:
            raise ValueError(
                f"unknown key {key!r}: its last part {leaf!r} is none of {', '.join(_BN_NAMES)} "
                "(the entries of BatchNorm, Conv and Linear modules); map or drop the module with "
                "name_map={prefix: None}." if prefix else f"unknown key {key!r}.")
        groups.setdefault(prefix, {})[leaf] = key
    return groups


def _paths(prefix: str, leaves: Mapping[str, str], values: Mapping[str, Any],
           module_path: FlaxPath) -> dict[str, FlaxPath]:
    """``{leaf: Flax variable path}`` of a module, after checking the shapes that go together."""
    shape = {leaf: tuple(np.shape(values[key])) for leaf, key in leaves.items()}
    if "running_mean" in leaves or "running_var" in leaves:
        for leaf in ("running_mean", "running_var"):
            if leaf not in leaves:
                raise ValueError(f"missing key {f'{prefix}.{leaf}' if prefix else leaf!r}: the "
                                 f"BatchNorm {prefix or '<root>'!r} has only {sorted(leaves)}.")
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            if leaf in leaves and (len(shape[leaf]) != 1 or shape[leaf] != shape["running_mean"]):
                raise ValueError(f"shape mismatch for {leaves[leaf]!r}: {shape[leaf]}, expected "
                                 f"{shape['running_mean']} (one value per feature, as "
                                 f"{leaves['running_mean']!r}).")
        if shape.get("num_batches_tracked", ()) != ():
            raise ValueError(f"shape mismatch for {leaves['num_batches_tracked']!r}: "
                             f"{shape['num_batches_tracked']}, expected ().")
        return {leaf: (_BN_NAMES[leaf][0], *module_path, _BN_NAMES[leaf][1]) for leaf in leaves}
    if "num_batches_tracked" in leaves:
        raise ValueError(f"unknown key {leaves['num_batches_tracked']!r}: num_batches_tracked "
                         "without running_mean/running_var.")
    if "weight" not in leaves:
        raise ValueError(f"unknown key {leaves['bias']!r}: a bias without a weight in module "
                         f"{prefix or '<root>'!r}.")
    if not 1 <= len(weight := shape["weight"]) <= 5:
        raise ValueError(f"shape mismatch for {leaves['weight']!r}: {weight}, a {len(weight)}-D "
                         "weight; expected 1-D (a norm's scale), 2-D (Linear: out, in) or 3-5-D "
                         "(Conv: out, in/groups, *kernel).")
    if "bias" in leaves and shape["bias"] != weight[:1]:
        raise ValueError(f"shape mismatch for {leaves['bias']!r}: {shape['bias']}, expected "
                         f"{weight[:1]} (the first dimension of {leaves['weight']!r}, {weight}).")
    name = "scale" if len(weight) == 1 else "kernel"  # a norm's weight, or Linear's and Conv's
    return {leaf: ("params", *module_path, "bias" if leaf == "bias" else name) for leaf in leaves}


def _relayout(array: np.ndarray, to_flax: bool) -> np.ndarray:
    n = array.ndim  # a Linear or Conv weight: (O, I/groups, *kernel) <-> (*kernel, I/groups, O)
    return array.transpose((*range(2, n), 1, 0) if to_flax else (n - 1, n - 2, *range(n - 2)))


def flat_tree(tree: Any, path: FlaxPath = ()) -> dict[FlaxPath, Any]:
    """Leaves of a nested mapping by path of strings (``FrozenDict`` and boxed leaves too)."""
    if not isinstance(tree, Mapping):
        return {path: tree.unbox() if hasattr(tree, "unbox") else tree}
    return {p: v for key, sub in tree.items() for p, v in flat_tree(sub, (*path, str(key))).items()}


def show_path(path: FlaxPath) -> str:
    return "/".join(path)


def _closest(path: FlaxPath, paths: Iterable[FlaxPath]) -> str:
    close = difflib.get_close_matches(show_path(path), [show_path(p) for p in paths], n=1)
    return f"; the closest is {close[0]!r}" if close else ""


def _listed(paths: list[FlaxPath]) -> str:
    more = f" and {len(paths) - 8} more" if len(paths) > 8 else ""
    return ", ".join(repr(show_path(path)) for path in paths[:8]) + more


def torch_to_flax(state_dict: Any, template: Mapping[str, Any] | None = None, *,
                  name_map: Mapping[str, Any] | None = None,
                  rule: Rule | None = default_prefix_rule,
                  cumulative: bool | Iterable[str] | None = None) -> dict[str, Any]:
    """Converts a PyTorch state dict into Flax variables ``{'params', 'batch_stats'}``.

    Each module goes, in Flax's layout, to the path ``name_map`` or else ``rule`` gives its
    prefix; ``num_batches_tracked`` becomes a float32 ``count`` for cumulative BatchNorms only.

    Args:
      state_dict: a mapping of names to torch tensors or NumPy arrays, or a ``torch.nn.Module``.
      template: Flax variables to match: the same leaves and shapes; its dtypes are kept.
      name_map: torch module prefix -> Flax path (names or ``'a/b'``), or None to drop it.
      rule: ``prefix -> Flax path`` for the prefixes not in ``name_map``.
      cumulative: the BatchNorms that keep ``num_batches_tracked``: a bool or torch prefixes
        (default: a module's with ``momentum=None``, else those with a ``count`` in ``template``).

    Raises:
      TypeError / ValueError: a path, an entry that is not an array, an unknown or missing key,
        or a shape that does not fit; the message names the key.

    >>> import torch, jax, jax.numpy as jnp
    >>> torch_model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> jax.tree.map(jnp.shape, torch_to_flax(torch_model, name_map={'0': 'conv', '1': 'bn'}))
    {'batch_stats': {'bn': {'mean': (8,), 'var': (8,)}}, 'params': {'bn': {'bias': (8,),
     'scale': (8,)}, 'conv': {'bias': (8,), 'kernel': (3, 3, 3, 8)}}}
    """
    entries, module = _state_dict_of(state_dict, "state_dict")
    arrays = {key: to_numpy(value, key) for key, value in entries.items()}
    resolve = path_resolver(name_map, rule)
    if cumulative is None and module is not None:
        import torch
        cumulative = [name for name, sub in module.named_modules() if isinstance(
            sub, torch.nn.modules.batchnorm._BatchNorm) and sub.momentum is None]
    if isinstance(cumulative, str) or not isinstance(cumulative, (bool, Iterable, type(None))):
        raise TypeError("cumulative must be None, a bool or a collection of torch module "
                        f"prefixes, got {cumulative!r}.")
    chosen = cumulative if cumulative is None or isinstance(cumulative, bool) else set(cumulative)
    expected = None if template is None else {
        path: leaf for path, leaf in flat_tree(template).items() if path[0] in _COLLECTIONS}
    out: dict[FlaxPath, tuple[str, Any]] = {}  # path -> (torch key, array)
    for prefix, leaves in group_by_module(arrays).items():
        if (module_path := resolve(prefix, next(iter(leaves.values())))) is None:
            continue
        paths = _paths(prefix, leaves, arrays, module_path)
        for leaf, key in leaves.items():
            path, array = paths[leaf], arrays[key]
            array = _relayout(array, True) if path[-1] == "kernel" else array
            if leaf == "num_batches_tracked":  # kept (as a float32 count) for a cumulative average
                if not (expected is not None and path in expected if chosen is None else
                        chosen if isinstance(chosen, bool) else prefix in chosen):
                    continue
                array = np.asarray(array, np.float32)
            if path in out:
                raise ValueError(f"{key!r} and {out[path][0]!r} both map to {show_path(path)!r}; give "
                                 "the modules distinct paths in name_map.")
            if expected is not None and path not in expected:
                raise ValueError(
                    f"unknown key {key!r}: it maps to {show_path(path)!r}, which the template lacks"
                    f"{_closest(path, expected)}. Fix the name with name_map, or drop the module "
                    "with name_map={prefix: None}.")
            if expected is not None and array.shape != (want := tuple(np.shape(expected[path]))):
                layout = " (transposed)" if array.ndim == 2 else " (OI...->...IO)"
                raise ValueError(
                    f"shape mismatch for {key!r}: {arrays[key].shape} in torch is {array.shape} "
                    f"in Flax{layout if path[-1] == 'kernel' else ''}, but the template's "
                    f"{show_path(path)!r} is {want}.")
            out[path] = key, jnp.asarray(array.astype(expected[path].dtype) if expected else array)
    if missing := sorted(path for path in expected or () if path not in out):
        raise ValueError(
            f"missing keys: the template's {_listed(missing)} got no value from the state dict (a "
            "module the state dict lacks, or a name that maps elsewhere: see name_map/rule; a "
            "'count' needs the BatchNorm's num_batches_tracked).")
    return traverse_util.unflatten_dict({path: array for path, (_, array) in out.items()})


def flax_to_torch(variables: Mapping[str, Any], reference: Any, *,
                  name_map: Mapping[str, Any] | None = None,
                  rule: Rule | None = default_prefix_rule,
                  num_batches_tracked: int | None = None) -> dict[str, Any]:
    """Converts Flax variables back into a PyTorch state dict, the inverse of :func:`torch_to_flax`.

    Args:
      variables: ``{'params', 'batch_stats'}`` (other collections are ignored).
      reference: the torch module or state dict whose keys, order, shapes and dtypes (torch or
        NumPy) the result takes; the modules ``name_map`` or ``rule`` skip keep its values.
      name_map, rule: as for :func:`torch_to_flax`.
      num_batches_tracked: the counter of BatchNorms without ``count`` (default: the reference's).

    Raises:
      TypeError / ValueError: a leaf without values (``jax.eval_shape``'s), a reference key
        without its leaf, a leaf that no key uses, or a shape that differs.

    >>> import torch
    >>> torch_model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
    >>> back = flax_to_torch(torch_to_flax(torch_model), torch_model)
    >>> all(torch.equal(back[k], v) for k, v in torch_model.state_dict().items())  # copies
    True
    """
    if not isinstance(variables, Mapping):
        raise TypeError("variables must be a mapping such as {'params': ..., 'batch_stats': ...}, "
                        f"got {type(variables)}.")
    entries, _ = _state_dict_of(reference, "reference")
    shapes = {key: tuple(np.shape(value)) for key, value in entries.items()}
    resolve = path_resolver(name_map, rule)
    flat = {path: leaf for path, leaf in flat_tree(variables).items() if path[0] in _COLLECTIONS}
    if num_batches_tracked is not None and (isinstance(num_batches_tracked, bool) or
                                            not isinstance(num_batches_tracked, numbers.Integral)):
        raise TypeError(f"num_batches_tracked must be an int or None, got {num_batches_tracked!r}.")
    out: dict[str, Any] = {}
    used: set[FlaxPath] = set()
    for prefix, leaves in group_by_module(entries).items():
        if (module_path := resolve(prefix, next(iter(leaves.values())))) is None:  # kept as is
            out.update({key: entries[key] for key in leaves.values()})
            continue
        paths = _paths(prefix, leaves, entries, module_path)
        for leaf, key in leaves.items():
            used.add(path := paths[leaf])
            if leaf == "num_batches_tracked" and path not in flat:  # the argument, or a copy
                value = (to_numpy(entries[key], key) if num_batches_tracked is None
                         else np.asarray(num_batches_tracked, np.int64))
            elif path not in flat:
                raise ValueError(f"missing key: {key!r} needs {show_path(path)!r}, which variables "
                                 f"lack{_closest(path, flat)}.")
            elif leaf == "num_batches_tracked":
                value = np.asarray(np.rint(np.asarray(flat[path], np.float64)), np.int64)
            elif ((value := np.asarray(flat[path])).dtype.kind not in "biuf"
                  and value.dtype.name != "bfloat16"):
                raise TypeError(f"variables' {show_path(path)!r} is a {type(flat[path]).__name__} "
                                f"({value.dtype}); expected an array (a template from "
                                "jax.eval_shape has shapes but no values).")
            value = _relayout(value, False) if path[-1] == "kernel" else value
            if value.shape != shapes[key]:
                raise ValueError(f"shape mismatch for {key!r}: {show_path(path)!r} of shape "
                                 f"{np.shape(flat.get(path, value))} is {value.shape} in torch's "
                                 f"layout, but the reference has {shapes[key]}.")
            if type(ref := entries[key]).__module__.startswith("torch") and hasattr(ref, "detach"):
                bf16 = str(ref.dtype) == "torch.bfloat16"  # through float32: NumPy has no bfloat16
                out[key] = ref.new_tensor(np.array(value, np.float32 if bf16 else None, order="C"))
            else:
                out[key] = np.array(value, np.asarray(ref).dtype, order="C")  # a copy, 0-d kept
    if unused := sorted(path for path in flat if path not in used):
        raise ValueError(f"unknown keys: {_listed(unused)} in variables match no key of the "
                         "reference state dict (a module the torch model lacks, or a name that "
                         "maps elsewhere: see name_map/rule).")
    return out


def _nnx_variables(module: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An nnx module's ``Param`` and ``BatchStat`` states, and as ``{'params', 'batch_stats'}``."""
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module, got {type(module).__name__}.")
    states = nnx.state(module, nnx.Param, nnx.BatchStat)
    return states, dict(zip(_COLLECTIONS, map(nnx.to_pure_dict, states)))


def torch_to_nnx(state_dict: Any, module: Any, *, name_map: Mapping[str, Any] | None = None,
                 rule: Rule | None = default_prefix_rule,
                 cumulative: bool | Iterable[str] | None = None) -> Any:
    """Loads a PyTorch state dict into an nnx module, in place: :func:`torch_to_flax` for nnx.

    Args:
      state_dict: the state dict or torch module.
      module: the ``flax.nnx`` module to fill and return; its variables are the template.
      name_map, rule, cumulative: as for :func:`torch_to_flax`.

    Raises:
      TypeError / ValueError: ``module`` is not an nnx module, or as for :func:`torch_to_flax`.

    >>> import torch, jaxbn.nnx
    >>> torch_to_nnx(torch.nn.BatchNorm1d(3), jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))).var[...]
    Array([1., 1., 1.], dtype=float32)
    """
    states, pure = _nnx_variables(module)
    converted = torch_to_flax(state_dict, pure, name_map=name_map, rule=rule, cumulative=cumulative)
    for state, collection in zip(states, _COLLECTIONS):  # (a key '0' finds the list index 0)
        nnx.replace_by_pure_dict(state, converted.get(collection, {}))
    nnx.update(module, *states)
    return module


def nnx_to_torch(module: Any, reference: Any, *, name_map: Mapping[str, Any] | None = None,
                 rule: Rule | None = default_prefix_rule,
                 num_batches_tracked: int | None = None) -> dict[str, Any]:
    """An nnx module's variables as a PyTorch state dict: :func:`flax_to_torch` for nnx.

    Args:
      module: the ``flax.nnx`` module.
      reference, name_map, rule, num_batches_tracked: as for :func:`flax_to_torch`.

    Raises:
      TypeError / ValueError: ``module`` is not an nnx module, or as for :func:`flax_to_torch`.

    >>> import torch, jaxbn.nnx
    >>> nnx_to_torch(jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0)), torch.nn.BatchNorm1d(3))['bias']
    tensor([0., 0., 0.])
    """
    return flax_to_torch(_nnx_variables(module)[1], reference, name_map=name_map, rule=rule,
                         num_batches_tracked=num_batches_tracked)


def _flip(momentum: Any, name: str) -> float | None:
    """``1 - momentum`` to 15 digits, so that decimals convert back exactly (1 - 0.9 is 0.1)."""
    if isinstance(momentum, bool) or not isinstance(momentum, (numbers.Real, type(None))):
        raise TypeError(f"{name} must be a real number in [0, 1] or None, got {momentum!r}.")
    if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] or None, got {momentum!r}.")
    return None if momentum is None else float(f"{1.0 - float(momentum):.15g}")


def momentum_from_torch(momentum: float | None) -> float | None:
    """PyTorch's BatchNorm momentum (the batch's weight) as Flax's (the old value's weight).

    Args:
      momentum: PyTorch's momentum in [0, 1], or None (the cumulative average, kept).

    Raises:
      TypeError / ValueError: not a number in [0, 1] or None.

    >>> momentum_from_torch(0.1), momentum_from_torch(None)
    (0.9, None)
    """
    return _flip(momentum, "momentum (PyTorch's)")


def momentum_to_torch(momentum: float | None) -> float | None:
    """Flax's (and jaxbn's) BatchNorm momentum as PyTorch's: :func:`momentum_from_torch` inverted.

    Args:
      momentum: Flax's momentum in [0, 1], or None.

    Raises:
      TypeError / ValueError: not a number in [0, 1] or None.

    >>> momentum_to_torch(0.9)
    0.1
    """
    return _flip(momentum, "momentum (Flax's)")


def batch_norm_kwargs(module: Any) -> dict[str, Any]:
    """The :class:`jaxbn.linen.BatchNorm` arguments that train as a PyTorch BatchNorm does.

    Args:
      module: a ``torch.nn.BatchNorm1d``/``2d``/``3d`` (or ``SyncBatchNorm``).

    Raises:
      TypeError / ValueError: not a PyTorch BatchNorm, or one without running statistics.

    >>> import torch
    >>> batch_norm_kwargs(torch.nn.BatchNorm2d(8, eps=1e-3, momentum=0.01))
    {'momentum': 0.99, 'epsilon': 0.001, 'unbiased_running_var': True,
     'use_scale': True, 'use_bias': True}
    """
    import torch
    if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"expected a torch.nn.BatchNorm1d/2d/3d module, got "
                        f"{type(module).__name__}.")
    if not module.track_running_stats:
        raise ValueError(
            f"{module!r} has track_running_stats=False: it normalizes with batch statistics in "
            "eval mode too and keeps no running statistics. Call jaxbn's BatchNorm with "
            "use_running_average=False and update_running_stats=False to do the same.")
    return {"momentum": momentum_from_torch(module.momentum), "epsilon": float(module.eps),
            "unbiased_running_var": True, "use_scale": bool(module.affine),
            "use_bias": bool(module.affine)}
