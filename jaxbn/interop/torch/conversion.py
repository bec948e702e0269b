"""PyTorch state dicts <-> Flax variables: module names, layouts, dtypes and momentum."""

from __future__ import annotations

import difflib
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

FlaxPath = tuple[str, ...]
Rule = Callable[[str], "FlaxPath | None"]
Resolver = Callable[[str, str], "FlaxPath | None"]  # (torch prefix, a key of it) -> Flax path
# A BatchNorm's entries -> (collection, name) in Flax; the last parts a state-dict key may have.
_BN_NAMES = {"weight": ("params", "scale"), "bias": ("params", "bias")}
_BN_NAMES |= {f"running_{name}": ("batch_stats", name) for name in ("mean", "var")}
_BN_NAMES["num_batches_tracked"] = ("batch_stats", "count")
_COLLECTIONS = ("params", "batch_stats")
_is_tensor = lambda value: type(value).__module__.startswith("torch") and hasattr(value, "detach")
_numeric = lambda array: array.dtype.kind in "biuf" or array.dtype.name == "bfloat16"


def bad(name: str, expected: str, got: Any, error: type[Exception] = TypeError) -> Exception:
    """``error("<name> must be <expected>, got <got>.")``, for an argument with a wrong value."""
    return error(f"{name} must be {expected}, got {got}.")


def default_prefix_rule(prefix: str) -> FlaxPath:
    """Maps a PyTorch module prefix (``'layer1.0.bn1'``) to a Flax path, as Flax names module lists.

    Raises:
      ValueError: an empty part (``'a..b'``).

    >>> [default_prefix_rule(prefix) for prefix in ('layer2.0.downsample.1', '0', '')]
    [('layer2_0', 'downsample_1'), ('layers_0',), ()]
    """
    if prefix and "" in prefix.split("."):
        raise bad("prefix", "names joined by single dots", repr(prefix), ValueError)
    path: list[str] = []
    for part in prefix.split(".") if prefix else ():
        path.append(f"{path.pop() if path else 'layers'}_{part}" if part.isdigit() else part)
    return tuple(path)


def path_resolver(name_map: Any, rule: Any) -> Resolver:
    """``(prefix, key) -> Flax path or None``, from ``name_map`` or else ``rule``."""
    if name_map is not None and not isinstance(name_map, Mapping):
        raise bad("name_map", "a mapping of torch module prefixes to Flax paths", type(name_map))
    if rule is not None and not callable(rule):
        raise bad("rule", "callable (prefix -> Flax path) or None", repr(rule))
    names = dict(name_map or {})

    def resolve(prefix: str, key: str) -> FlaxPath | None:
        if prefix not in names and rule is None:
            raise ValueError(
                f"unknown key {key!r}: its module {prefix!r} is not in name_map and rule=None"
                f"{_closest(prefix, names)}; add it to name_map (None skips it) or pass a rule."
            )
        value = names[prefix] if prefix in names else rule(prefix)
        value = tuple(filter(None, value.split("/"))) if isinstance(value, str) else value
        ok = isinstance(value, (tuple, list)) and all(isinstance(p, str) and p for p in value)
        if value is None or ok:
            return None if value is None else tuple(value)
        where = f"name_map[{prefix!r}]" if prefix in names else f"rule({prefix!r})"
        raise bad(where, "a tuple of Flax names, a string 'a/b' or None", repr(value))

    return resolve


def to_numpy(value: Any, key: str) -> np.ndarray:
    """A NumPy copy of a torch tensor or array-like; raises TypeError for anything else."""
    if _is_tensor(value) and (tensor := value.detach().cpu()).is_complex():
        problem = f"has dtype {tensor.dtype}; expected a real tensor or array"
    elif _is_tensor(value):  # bfloat16 is not in NumPy; ml_dtypes (via jax) has it
        bf16 = str(tensor.dtype) == "torch.bfloat16"
        return tensor.float().numpy().astype(jnp.bfloat16) if bf16 else tensor.numpy().copy()
    elif not (isinstance(value, numbers.Number) or hasattr(value, "__array__")):
        problem = f"is a {type(value).__name__}; expected a torch.Tensor or a NumPy array"
    elif _numeric(array := np.asarray(value)):
        return array
    else:
        problem = f"has dtype {array.dtype}; expected a numeric tensor or array"
    raise TypeError(f"state dict entry {key!r} {problem}.")


def _state_dict_of(obj: Any, argument: str) -> tuple[dict[str, Any], Any]:
    """``(state dict, module or None)`` from a torch module or a mapping; never a path."""
    if isinstance(obj, (str, bytes, os.PathLike)):
        raise TypeError(
            f"{argument} is {obj!r}, a path or bytes; jaxbn never reads or unpickles files: "
            "pass the torch module or torch.load(path, weights_only=True)."
        )
    if hasattr(obj, "state_dict") and hasattr(obj, "named_modules"):
        return dict(obj.state_dict()), obj
    if not isinstance(obj, Mapping):
        raise bad(argument, "a mapping of names to arrays or a torch.nn.Module", type(obj).__name__)
    if keys := [key for key in obj if not isinstance(key, str)]:
        raise bad(f"{argument}'s keys", "names such as 'bn1.weight'", repr(keys[0]))
    return dict(obj), None


def entry_paths(values: Mapping[str, Any], resolve: Resolver) -> Iterator[tuple[str, str, Any]]:
    """``(prefix, key, Flax path or None)`` by module: last parts checked first, then shapes."""
    groups: dict[str, dict[str, str]] = {}
    for key in values:
        prefix, _, leaf = key.rpartition(".")
        if leaf not in _BN_NAMES:
            raise ValueError(
                f"unknown key {key!r}: {leaf!r} is none of {', '.join(_BN_NAMES)} (BatchNorm, "
                "Conv, Linear); drop its module with name_map={prefix: None}."
            )
        groups.setdefault(prefix, {})[leaf] = key
    for prefix, leaves in groups.items():
        at = resolve(prefix, next(iter(leaves.values())))
        paths = {} if at is None else _paths(prefix, leaves, values, at)
        yield from ((prefix, key, paths.get(leaf)) for leaf, key in leaves.items())


def _paths(prefix: str, leaves: dict[str, str], values: Any, at: FlaxPath) -> dict[str, FlaxPath]:
    """``{leaf: Flax variable path}`` of a module, after checking the shapes that go together."""
    shape = {leaf: tuple(np.shape(values[key])) for leaf, key in leaves.items()}
    module = prefix or "<root>"
    mismatch = lambda leaf, want: ValueError(
        f"shape mismatch for {leaves[leaf]!r}: {shape[leaf]}, expected {want}."
    )
    if "running_mean" in leaves or "running_var" in leaves:
        if (leaf := "running_var" if "running_mean" in leaves else "running_mean") not in leaves:
            key = f"{prefix}.{leaf}" if prefix else leaf
            raise ValueError(
                f"missing key {key!r}: BatchNorm {module!r} has only {sorted(leaves)}."
            )
        per_feature = f"{shape['running_mean']} (one per feature, as {leaves['running_mean']!r})"
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            if leaf in leaves and (len(shape[leaf]) != 1 or shape[leaf] != shape["running_mean"]):
                raise mismatch(leaf, per_feature)
        if shape.get("num_batches_tracked", ()) != ():
            raise mismatch("num_batches_tracked", "()")
        return {leaf: (_BN_NAMES[leaf][0], *at, _BN_NAMES[leaf][1]) for leaf in leaves}
    if "num_batches_tracked" in leaves:
        raise ValueError(f"unknown key {leaves['num_batches_tracked']!r} without running_mean/var.")
    if "weight" not in leaves:
        raise ValueError(f"unknown key {leaves['bias']!r}: a bias without a weight in {module!r}.")
    if not 1 <= len(weight := shape["weight"]) <= 5:
        raise mismatch("weight", "1-D (a norm's scale), 2-D (Linear) or 3-5-D (Conv)")
    if "bias" in leaves and shape["bias"] != weight[:1]:
        raise mismatch("bias", f"{weight[:1]} (the first dimension of {leaves['weight']!r})")
    name = "scale" if len(weight) == 1 else "kernel"  # a norm's weight, or Linear's and Conv's
    return {leaf: ("params", *at, "bias" if leaf == "bias" else name) for leaf in leaves}


def flat_tree(tree: Any, path: FlaxPath = ()) -> dict[FlaxPath, Any]:
    """Leaves of a nested mapping by path of strings (``FrozenDict`` and boxed leaves too)."""
    if not isinstance(tree, Mapping):
        return {path: tree.unbox() if hasattr(tree, "unbox") else tree}
    return {p: v for key, sub in tree.items() for p, v in flat_tree(sub, (*path, str(key))).items()}


def _closest(name: Any, names: Iterable[Any]) -> str:
    join = lambda name: name if isinstance(name, str) else "/".join(name)  # a path, or a prefix
    close = difflib.get_close_matches(join(name), [join(n) for n in names], n=1)
    return f"; the closest is {close[0]!r}" if close else ""


def _listed(paths: list[FlaxPath]) -> str:
    more = f" and {len(paths) - 8} more" if len(paths) > 8 else ""
    return ", ".join(repr("/".join(path)) for path in paths[:8]) + more


def torch_to_flax(
    state_dict: Any,
    template: Mapping[str, Any] | None = None,
    *,
    name_map: Mapping[str, Any] | None = None,
    rule: Rule | None = default_prefix_rule,
    cumulative: bool | Iterable[str] | None = None,
) -> dict[str, Any]:
    """Converts a PyTorch state dict into Flax variables ``{'params', 'batch_stats'}``.

    Args:
      state_dict: a mapping of names to torch tensors or NumPy arrays, or a ``torch.nn.Module``.
      template: Flax variables to match: the same leaves and shapes; its dtypes are kept.
      name_map: torch module prefix -> Flax path (names or ``'a/b'``), or None to drop it.
      rule: ``prefix -> Flax path`` for the prefixes not in ``name_map``.
      cumulative: the BatchNorms that keep ``num_batches_tracked`` (True, False or prefixes).

    Raises:
      TypeError: a path, an entry that is not a real array, or a bad argument.
      ValueError: an unknown or missing key, or a shape that does not fit (named in the message).

    >>> torch_to_flax({'fc.weight': np.ones((3, 2))})  # Linear's (out, in) is Dense's (in, out)
    {'params': {'fc': {'kernel': Array([[1., 1., 1.], [1., 1., 1.]], dtype=float32)}}}
    """
    entries, module = _state_dict_of(state_dict, "state_dict")
    arrays, resolve = {k: to_numpy(v, k) for k, v in entries.items()}, path_resolver(name_map, rule)
    if cumulative is None and module is not None:
        import torch

        bn, modules = torch.nn.modules.batchnorm._BatchNorm, module.named_modules()
        cumulative = [n for n, m in modules if isinstance(m, bn) and m.momentum is None]
    if isinstance(cumulative, str) or not isinstance(cumulative, bool | Iterable | None):
        raise bad("cumulative", "None, a bool or a collection of torch prefixes", repr(cumulative))
    every = {key.rpartition(".")[0] for key in arrays} if cumulative is True else ()
    kept = None if cumulative is None else set(every if type(cumulative) is bool else cumulative)
    expected = {p: v for p, v in flat_tree(template or {}).items() if p[0] in _COLLECTIONS}
    counted = lambda prefix, path: path in expected if kept is None else prefix in kept
    out: dict[FlaxPath, tuple[str, Any]] = {}  # path -> (torch key, array)
    for prefix, key, path in entry_paths(arrays, resolve):
        if path is None or path[-1] == "count" and not counted(prefix, path):
            continue  # skipped, or a num_batches_tracked (a float32 count if cumulative only)
        kernel = path[-1] == "kernel"
        array = np.moveaxis(arrays[key], (0, 1), (-1, -2)) if kernel else arrays[key]
        array = np.asarray(array, np.float32) if path[-1] == "count" else array
        name = "/".join(path)
        if path in out:
            raise ValueError(f"{key!r} and {out[path][0]!r} both map to {name!r}; see name_map.")
        if template is not None and path not in expected:
            raise ValueError(
                f"unknown key {key!r}: it maps to {name!r}, which the template lacks"
                f"{_closest(path, expected)}; rename or drop it (None) with name_map."
            )
        if template is not None and array.shape != (want := np.shape(expected[path])):
            layout = "" if not kernel else " (transposed)" if array.ndim == 2 else " (OI...->...IO)"
            raise ValueError(
                f"shape mismatch for {key!r}: {arrays[key].shape} in torch is {array.shape} in "
                f"Flax{layout}, but the template's {name!r} is {tuple(want)}."
            )
        out[path] = key, jnp.asarray(array.astype(expected[path].dtype) if expected else array)
    if missing := sorted(path for path in expected if path not in out):
        raise ValueError(
            f"missing keys: the template's {_listed(missing)} got no value from the state dict "
            "(see name_map/rule; a 'count' needs the BatchNorm's num_batches_tracked)."
        )
    return traverse_util.unflatten_dict({path: array for path, (_, array) in out.items()})


def flax_to_torch(
    variables: Mapping[str, Any],
    reference: Any,
    *,
    name_map: Mapping[str, Any] | None = None,
    rule: Rule | None = default_prefix_rule,
    num_batches_tracked: int | None = None,
) -> dict[str, Any]:
    """Converts Flax variables back into a PyTorch state dict, the inverse of :func:`torch_to_flax`.

    Args:
      variables: ``{'params', 'batch_stats'}`` (other collections are ignored).
      reference: the torch module or state dict whose keys, order, shapes and dtypes it takes.
      name_map, rule: as for :func:`torch_to_flax`; a module they skip keeps the reference's values.
      num_batches_tracked: the counter of BatchNorms without ``count`` (default: the reference's).

    Raises:
      TypeError: a leaf without values (``jax.eval_shape``'s) or a bad argument.
      ValueError: a key without its leaf, a leaf that no key uses, or a shape that differs.

    >>> flax_to_torch({'params': {'kernel': np.ones((2, 3))}}, {'weight': np.zeros((3, 2))})
    {'weight': array([[1., 1.], [1., 1.], [1., 1.]])}
    """
    if not isinstance(variables, Mapping):
        raise bad("variables", "a mapping {'params': ..., 'batch_stats': ...}", type(variables))
    entries, _ = _state_dict_of(reference, "reference")
    resolve, count = path_resolver(name_map, rule), num_batches_tracked
    flat = {path: leaf for path, leaf in flat_tree(variables).items() if path[0] in _COLLECTIONS}
    if isinstance(count, bool) or not isinstance(count, numbers.Integral | None):
        raise bad("num_batches_tracked", "an int or None", repr(count))
    out: dict[str, Any] = {}
    used: set[FlaxPath] = set()
    for _, key, path in entry_paths(entries, resolve):
        if path is None:  # a module that name_map or rule skips: kept as is
            out[key] = entries[key]
            continue
        used.add(path)
        ref, name = entries[key], "/".join(path)
        if path[-1] == "count" and path not in flat:  # num_batches_tracked: the argument, or a copy
            value = to_numpy(ref, key) if count is None else np.asarray(count, np.int64)
        elif path not in flat:
            raise ValueError(
                f"missing key: {key!r} needs {name!r}, which variables lack{_closest(path, flat)}."
            )
        elif path[-1] == "count":
            value = np.asarray(np.rint(np.asarray(flat[path], np.float64)), np.int64)
        elif not _numeric(value := np.asarray(flat[path])):
            raise TypeError(
                f"variables' {name!r} is a {type(flat[path]).__name__} ({value.dtype}); "
                "expected an array (a template from jax.eval_shape has shapes but no values)."
            )
        value = np.moveaxis(value, (-1, -2), (0, 1)) if path[-1] == "kernel" else value
        if value.shape != (want := tuple(np.shape(ref))):
            raise ValueError(
                f"shape mismatch for {key!r}: {name!r} of shape {np.shape(flat.get(path, value))}"
                f" is {value.shape} in torch's layout, but the reference has {want}."
            )
        if _is_tensor(ref):  # through float32 for bfloat16: NumPy has no bfloat16
            dtype = np.float32 if str(ref.dtype) == "torch.bfloat16" else None
            out[key] = ref.new_tensor(np.array(value, dtype, order="C"))
        else:
            out[key] = np.array(value, np.asarray(ref).dtype, order="C")  # a copy, 0-d kept
    if unused := sorted(path for path in flat if path not in used):
        raise ValueError(
            f"unknown keys: {_listed(unused)} in variables match no key of the reference state "
            "dict (see name_map/rule)."
        )
    return out


def _nnx_variables(module: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An nnx module's ``Param`` and ``BatchStat`` states, and as ``{'params', 'batch_stats'}``."""
    if not isinstance(module, nnx.Module):
        raise bad("module", "a flax.nnx.Module", type(module).__name__)
    states = nnx.state(module, nnx.Param, nnx.BatchStat)
    return states, dict(zip(_COLLECTIONS, map(nnx.to_pure_dict, states)))


def torch_to_nnx(
    state_dict: Any,
    module: Any,
    *,
    name_map: Mapping[str, Any] | None = None,
    rule: Rule | None = default_prefix_rule,
    cumulative: bool | Iterable[str] | None = None,
) -> Any:
    """Loads a PyTorch state dict into an nnx module, in place: :func:`torch_to_flax` for nnx.

    Args:
      state_dict: the state dict or torch module.
      module: the ``flax.nnx`` module to fill and return; its variables are the template.
      name_map, rule, cumulative: as for :func:`torch_to_flax`.

    Raises:
      TypeError: ``module`` is not an nnx module, or as for :func:`torch_to_flax`.
      ValueError: as for :func:`torch_to_flax`.

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


def nnx_to_torch(
    module: Any,
    reference: Any,
    *,
    name_map: Mapping[str, Any] | None = None,
    rule: Rule | None = default_prefix_rule,
    num_batches_tracked: int | None = None,
) -> dict[str, Any]:
    """An nnx module's variables as a PyTorch state dict: :func:`flax_to_torch` for nnx.

    Args:
      module: the ``flax.nnx`` module.
      reference, name_map, rule, num_batches_tracked: as for :func:`flax_to_torch`.

    Raises:
      TypeError: ``module`` is not an nnx module, or as for :func:`flax_to_torch`.
      ValueError: as for :func:`flax_to_torch`.

    >>> import torch, jaxbn.nnx
    >>> nnx_to_torch(jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0)), torch.nn.BatchNorm1d(3))['bias']
    tensor([0., 0., 0.])
    """
    pure, count = _nnx_variables(module)[1], num_batches_tracked
    return flax_to_torch(pure, reference, name_map=name_map, rule=rule, num_batches_tracked=count)


def _flip(momentum: Any, name: str) -> float | None:
    """``1 - momentum`` to 15 digits, so that decimals convert back exactly (1 - 0.9 is 0.1)."""
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real | None):
        raise bad(name, "a real number in [0, 1] or None", repr(momentum))
    if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
        raise bad(name, "in [0, 1] or None", repr(momentum), ValueError)
    return None if momentum is None else float(f"{1.0 - float(momentum):.15g}")


def momentum_from_torch(momentum: float | None) -> float | None:
    """PyTorch's BatchNorm momentum (the batch's weight) as Flax's (the old value's); None stays.

    Raises:
      TypeError: not a number or None.
      ValueError: a number outside [0, 1].

    >>> momentum_from_torch(0.1), momentum_from_torch(None)
    (0.9, None)
    """
    return _flip(momentum, "momentum (PyTorch's)")


def momentum_to_torch(momentum: float | None) -> float | None:
    """Flax's (and jaxbn's) BatchNorm momentum as PyTorch's: :func:`momentum_from_torch` inverted.

    Raises:
      TypeError: not a number or None.
      ValueError: a number outside [0, 1].

    >>> momentum_to_torch(0.9)
    0.1
    """
    return _flip(momentum, "momentum (Flax's)")


def batch_norm_kwargs(module: Any) -> dict[str, Any]:
    """The :class:`jaxbn.linen.BatchNorm` arguments that train as the torch BatchNorm ``module``.

    Raises:
      TypeError: not a PyTorch BatchNorm.
      ValueError: a BatchNorm without running statistics.

    >>> import torch
    >>> batch_norm_kwargs(torch.nn.BatchNorm2d(8, eps=1e-3, momentum=0.01))
    {'momentum': 0.99, 'epsilon': 0.001, 'unbiased_running_var': True,
     'use_scale': True, 'use_bias': True}
    """
    import torch

    if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        raise bad("module", "a torch.nn.BatchNorm1d/2d/3d", type(module).__name__)
    if not module.track_running_stats:
        raise ValueError(
            f"module {module!r} has track_running_stats=False (no running statistics); jaxbn's "
            "BatchNorm does the same with use_running_average=False, update_running_stats=False."
        )
    kwargs = {"momentum": momentum_from_torch(module.momentum), "epsilon": float(module.eps)}
    affine = bool(module.affine)
    return {**kwargs, "unbiased_running_var": True, "use_scale": affine, "use_bias": affine}
