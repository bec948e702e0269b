"""PyTorch state dicts <-> Flax variable trees, for models ported to jaxbn.

:func:`torch_to_flax` turns a state dict (a mapping of names to torch tensors
or NumPy arrays; never a file: nothing here unpickles) into
``{'params': ..., 'batch_stats': ...}`` for a Flax linen model built with
:class:`jaxbn.linen.BatchNorm`, ``flax.linen.Conv`` and ``flax.linen.Dense``;
:func:`flax_to_torch` goes back, onto the keys, order and dtypes of a reference
state dict. Per module (a state-dict prefix such as ``layer1.0.bn1``):

================================  =====================================  ================================
PyTorch                           Flax                                   how
================================  =====================================  ================================
BatchNorm ``weight``, ``bias``    ``params/scale``, ``params/bias``      as is
``running_mean``, ``running_var`` ``batch_stats/mean``, ``var``          as is
``num_batches_tracked``           ``batch_stats/count`` (float32)        only for a cumulative average
                                                                         (torch ``momentum=None``); else
                                                                         dropped, restored on export
Conv1d/2d/3d ``weight``           ``params/kernel``                      OIW -> WIO, OIHW -> HWIO,
                                                                         OIDHW -> DHWIO (grouped and
                                                                         depthwise: I is in/groups, as
                                                                         flax's ``feature_group_count``)
Linear ``weight``                 ``params/kernel``                      (out, in) -> (in, out)
``bias`` (Conv, Linear)           ``params/bias``                        as is
other 1-D ``weight``              ``params/scale``                       as is (LayerNorm, GroupNorm,
                                                                         BatchNorm without statistics)
================================  =====================================  ================================

A module is a BatchNorm when it has ``running_mean``/``running_var``; any other
module's kind follows from its weight's rank (1: a norm, 2: Linear, 3-5: Conv).
So ``ConvTranspose`` (whose weight is IOHW) and ``Embedding`` (2-D, not
transposed) are not supported, and a Linear after a ``flatten`` of NCHW
activations needs its input features permuted by hand (NHWC flattens in another
order); a global average pool before the Linear, as in ResNets, needs nothing.

Names: an explicit ``name_map`` (torch prefix -> Flax path, ``None`` to skip
the module) is consulted first, then ``rule`` (default
:func:`default_prefix_rule`: ``layer1.0.bn1`` -> ``('layer1_0', 'bn1')``, the
names Flax gives a list of submodules assigned in ``setup``).

Momentum: PyTorch weights the batch (``new = (1 - m) old + m batch``), Flax
and jaxbn the old value (``new = m old + (1 - m) batch``):
:func:`momentum_from_torch`/:func:`momentum_to_torch` convert (``None``, the
cumulative average, stays ``None``), and :func:`batch_norm_kwargs` gives the
:class:`jaxbn.linen.BatchNorm` arguments that continue training as a given
``torch.nn.BatchNorm*d`` would (PyTorch averages the unbiased batch variance).

:func:`torch_to_nnx`/:func:`nnx_to_torch` do the same for an nnx module (its
attribute paths, e.g. ``'layers/0'``), in place.

:func:`compare` runs a batch through both models in eval mode and names the
first module whose parameters, statistics or output differ.

Importing this module does not import torch; the functions that need it do.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

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

FlaxPath = tuple[str, ...]
Rule = Callable[[str], "FlaxPath | None"]

_BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_KNOWN_LEAVES = frozenset(_BN_LEAVES)
_COLLECTIONS = ("params", "batch_stats")


# --------------------------------------------------------------------------- names


def default_prefix_rule(prefix: str) -> FlaxPath:
    """Maps a PyTorch module prefix to a Flax module path, as Flax names submodule lists.

    The prefix is split at dots; a numeric part (an index into an
    ``nn.Sequential`` or ``nn.ModuleList``) is joined to the part before it
    with ``_``, which is how Flax names the elements of a list of submodules
    assigned in ``setup`` (``self.layer1 = [Block(...), Block(...)]`` gives
    ``layer1_0``, ``layer1_1``). A leading numeric part (a top-level
    ``nn.Sequential``) becomes ``layers_N``, the names of ``flax.linen.Sequential``.
    The empty prefix (the state dict of a single module) is the root, ``()``.

    Args:
      prefix: the state-dict key without its last part, e.g. ``'layer1.0.bn1'``.

    Returns:
      The Flax path, a tuple of module names.

    Raises:
      ValueError: an empty part (``'a..b'``).

    >>> default_prefix_rule('layer1.0.bn1')
    ('layer1_0', 'bn1')
    >>> default_prefix_rule('layer2.0.downsample.1')
    ('layer2_0', 'downsample_1')
    >>> default_prefix_rule('0'), default_prefix_rule('bn1'), default_prefix_rule('')
    (('layers_0',), ('bn1',), ())
    """
    if prefix == "":
        return ()
    path: list[str] = []
    for part in prefix.split("."):
        if not part:
            raise ValueError(f"module prefix {prefix!r} has an empty part; expected names separated by single dots.")
        if part.isdigit():
            path.append(f"{path.pop()}_{part}" if path else f"layers_{part}")
        else:
            path.append(part)
    return tuple(path)


def _as_path(value: Any, prefix: str, source: str) -> FlaxPath | None:
    """A Flax path from a tuple/list of names or a ``'a/b'`` string; None skips the module."""
    if value is None:
        return None
    if isinstance(value, str):
        value = tuple(part for part in value.split("/") if part) if value else ()
    if not isinstance(value, (tuple, list)) or not all(isinstance(part, str) and part for part in value):
        raise TypeError(
            f"{source} maps the torch module {prefix!r} to {value!r}; expected a tuple of Flax module "
            "names such as ('layer1_0', 'bn1'), a string 'layer1_0/bn1', or None to skip the module."
        )
    return tuple(value)


def _resolver(name_map: Mapping[str, Any] | None, rule: Rule | None) -> Callable[[str, str], FlaxPath | None]:
    """``(prefix, key) -> Flax path or None``: ``name_map`` first, then ``rule``; raises for neither."""
    if name_map is not None and not isinstance(name_map, Mapping):
        raise TypeError(f"name_map must be a mapping of torch module prefixes to Flax paths, got {type(name_map)}.")
    if rule is not None and not callable(rule):
        raise TypeError(f"rule must be callable (prefix -> Flax path) or None, got {rule!r}.")
    name_map = dict(name_map or {})

    def resolve(prefix: str, key: str) -> FlaxPath | None:
        if prefix in name_map:
            return _as_path(name_map[prefix], prefix, "name_map")
        if rule is None:
            close = difflib.get_close_matches(prefix, list(name_map), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown key {key!r}: its module {prefix!r} is not in name_map{hint} and rule=None; "
                "add it to name_map (None skips it) or pass a rule."
            )
        return _as_path(rule(prefix), prefix, "rule")

    return resolve


# --------------------------------------------------------------------------- arrays


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _to_numpy(value: Any, key: str) -> np.ndarray:
    """A NumPy copy of a torch tensor or array-like; raises TypeError for anything else."""
    if _is_torch_tensor(value):
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; ml_dtypes (via jax) does
            import jax.numpy as jnp

            return tensor.float().numpy().astype(jnp.bfloat16)
        if tensor.is_complex():
            raise TypeError(f"state dict entry {key!r} has dtype {tensor.dtype}; expected a real tensor or array.")
        return tensor.numpy().copy()
    if isinstance(value, (np.ndarray, np.generic, numbers.Number)) or hasattr(value, "__array__"):
        array = np.asarray(value)
        if array.dtype.kind not in "biuf" and array.dtype.name != "bfloat16":
            raise TypeError(f"state dict entry {key!r} has dtype {array.dtype}; expected a numeric tensor or array.")
        return array
    raise TypeError(
        f"state dict entry {key!r} is a {type(value).__name__}; expected a torch.Tensor or a NumPy array."
    )


def _state_dict_of(obj: Any, argument: str) -> tuple[dict[str, Any], Any]:
    """``(state dict, module or None)`` from a torch module or a mapping; refuses paths and bytes."""
    if isinstance(obj, (str, bytes, os.PathLike)):
        raise TypeError(
            f"{argument} is {obj!r}, a path or bytes; pass the loaded state dict (a mapping of names to "
            "tensors or arrays) or the torch module. jaxbn never reads or unpickles files: load them "
            "yourself, e.g. torch.load(path, weights_only=True)."
        )
    if hasattr(obj, "state_dict") and hasattr(obj, "named_modules"):
        return dict(obj.state_dict()), obj
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"{argument} must be a mapping of names to torch tensors or NumPy arrays, or a torch.nn.Module; "
            f"got {type(obj).__name__}."
        )
    for key in obj:
        if not isinstance(key, str):
            raise TypeError(f"{argument} has a non-string key {key!r}; expected state-dict names such as 'bn1.weight'.")
    return dict(obj), None


def _group(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """``{prefix: {leaf: full key}}`` in the order of the keys; raises for unknown leaf names."""
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        prefix, _, leaf = key.rpartition(".")
        if leaf not in _KNOWN_LEAVES:
            raise ValueError(
                f"unknown key {key!r}: its last part {leaf!r} is none of {', '.join(_BN_LEAVES)} "
                "(the entries of BatchNorm, Conv and Linear modules); map or drop the module with "
                "name_map={prefix: None}." if prefix else f"unknown key {key!r}."
            )
        groups.setdefault(prefix, {})[leaf] = key
    return groups


def _kind(prefix: str, leaves: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> str:
    """'batchnorm', 'norm', 'dense' or 'conv', checking the shapes that go together."""
    def shape(leaf: str) -> tuple[int, ...]:
        return shapes[leaves[leaf]]

    name = prefix or "<root>"
    if "running_mean" in leaves or "running_var" in leaves:
        vectors = [leaf for leaf in ("weight", "bias", "running_mean", "running_var") if leaf in leaves]
        for leaf in ("running_mean", "running_var"):
            if leaf not in leaves:
                raise ValueError(
                    f"missing key {_join(prefix, leaf)!r}: the BatchNorm {name!r} has only {sorted(leaves)}."
                )
        reference = shape("running_mean")
        for leaf in vectors:
            if len(shape(leaf)) != 1 or shape(leaf) != reference:
                raise ValueError(
                    f"shape mismatch for {leaves[leaf]!r}: {shape(leaf)}, expected {reference} (one value per "
                    f"feature, as {leaves['running_mean']!r})."
                )
        if "num_batches_tracked" in leaves and shape("num_batches_tracked") != ():
            raise ValueError(
                f"shape mismatch for {leaves['num_batches_tracked']!r}: {shape('num_batches_tracked')}, expected ()."
            )
        return "batchnorm"
    if "num_batches_tracked" in leaves:
        raise ValueError(
            f"unknown key {leaves['num_batches_tracked']!r}: num_batches_tracked without running_mean/running_var."
        )
    if "weight" not in leaves:
        raise ValueError(f"unknown key {leaves['bias']!r}: a bias without a weight in module {name!r}.")
    rank = len(shape("weight"))
    kind = {1: "norm", 2: "dense", 3: "conv", 4: "conv", 5: "conv"}.get(rank)
    if kind is None:
        raise ValueError(
            f"shape mismatch for {leaves['weight']!r}: {shape('weight')}, a {rank}-D weight; expected 1-D "
            "(a norm's scale), 2-D (Linear: out, in) or 3-5-D (Conv: out, in/groups, *kernel)."
        )
    if "bias" in leaves:
        expected = shape("weight")[:1]
        if shape("bias") != expected:
            raise ValueError(
                f"shape mismatch for {leaves['bias']!r}: {shape('bias')}, expected {expected} (the first "
                f"dimension of {leaves['weight']!r}, {shape('weight')})."
            )
    return kind


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _to_flax_layout(kind: str, leaf: str, array: np.ndarray) -> tuple[str, str, np.ndarray]:
    """``(collection, name, array)`` of one torch entry in Flax's layout."""
    if kind == "batchnorm":
        collection, name = {
            "weight": ("params", "scale"),
            "bias": ("params", "bias"),
            "running_mean": ("batch_stats", "mean"),
            "running_var": ("batch_stats", "var"),
            "num_batches_tracked": ("batch_stats", "count"),
        }[leaf]
        return collection, name, array
    if leaf == "bias":
        return "params", "bias", array
    if kind == "norm":
        return "params", "scale", array
    if kind == "dense":
        return "params", "kernel", array.T
    # conv: (O, I/g, *k) -> (*k, I/g, O)
    rank = array.ndim
    return "params", "kernel", np.transpose(array, tuple(range(2, rank)) + (1, 0))


def _to_torch_layout(kind: str, leaf: str, array: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_to_flax_layout` for the array."""
    if kind == "dense" and leaf == "weight":
        return array.T
    if kind == "conv" and leaf == "weight":
        rank = array.ndim  # (*k, I/g, O) -> (O, I/g, *k)
        return np.transpose(array, (rank - 1, rank - 2) + tuple(range(rank - 2)))
    return array


def _flat(tree: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaves of a nested mapping by path (Flax ``FrozenDict`` and boxed leaves included)."""
    if isinstance(tree, Mapping):
        out: dict[tuple[str, ...], Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, path + (str(key),)))
        return out
    return {path: tree.unbox() if hasattr(tree, "unbox") else tree}


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _listed(paths: list[tuple[str, ...]], most: int = 8) -> str:
    """The first ``most`` paths, and how many more, for an error message."""
    more = f" and {len(paths) - most} more" if len(paths) > most else ""
    return ", ".join(repr(_show(path)) for path in paths[:most]) + more


def _show(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _cumulative_prefixes(cumulative: Any, module: Any) -> Callable[[str], bool | None]:
    """``prefix -> True/False``, or None where the template decides."""
    if cumulative is None:
        if module is None:
            return lambda prefix: None
        import torch

        found = {
            name for name, sub in module.named_modules()
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and sub.momentum is None
        }
        return lambda prefix: prefix in found
    if isinstance(cumulative, bool):
        return lambda prefix: cumulative
    if isinstance(cumulative, str) or not isinstance(cumulative, Iterable):
        raise TypeError(
            f"cumulative must be None, a bool or a collection of torch module prefixes, got {cumulative!r}."
        )
    chosen = set(cumulative)
    return lambda prefix: prefix in chosen


# --------------------------------------------------------------------------- conversion


def torch_to_flax(
    state_dict: Any,
    template: Mapping[str, Any] | None = None,
    *,
    name_map: Mapping[str, Any] | None = None,
    rule: Rule | None = default_prefix_rule,
    cumulative: bool | Iterable[str] | None = None,
) -> dict[str, Any]:
    """Converts a PyTorch state dict into a Flax variable tree ``{'params', 'batch_stats'}``.

    Each module (key prefix) is converted as the table in the module
    docstring says; its Flax path comes from ``name_map``, else ``rule``.
    ``num_batches_tracked`` becomes ``batch_stats/.../count`` (float32) only
    for a cumulative average (PyTorch ``momentum=None``, jaxbn
    ``BatchNorm(momentum=None)``) and is dropped otherwise.

    With a ``template`` (e.g. ``model.init(...)`` of the Flax model, or
    ``jax.eval_shape`` of it) the result is checked against it: every leaf
    must exist there with the same shape, every template leaf in ``params`` and
    ``batch_stats`` must be filled, and values take the template's dtypes.

    Args:
      state_dict: a mapping of names to torch tensors or NumPy arrays, or a
        ``torch.nn.Module`` (its ``state_dict()``; its BatchNorms with
        ``momentum=None`` are then the cumulative ones). Never a path.
      template: optional Flax variables to check against; whether it has a
        ``count`` decides the cumulative BatchNorms when ``cumulative`` is None
        and ``state_dict`` is a mapping.
      name_map: torch module prefix -> Flax path (a tuple of names, or
        ``'a/b'``), or None to drop that module's entries.
      rule: ``prefix -> Flax path`` (or None to drop) for prefixes not in
        ``name_map``; None makes every prefix need a ``name_map`` entry.
      cumulative: which BatchNorms keep ``num_batches_tracked`` as ``count``:
        True (all), False (none), a collection of torch prefixes, or None
        (from the module or the template as above; none without either).

    Returns:
      ``{'params': {...}, 'batch_stats': {...}}`` of ``jax.Array`` (no
      ``batch_stats`` without BatchNorms), nested by Flax module path.

    Raises:
      TypeError: ``state_dict`` is a path, bytes or not a mapping, or an entry
        is not a tensor/array.
      ValueError: an unknown key (a last part other than weight, bias,
        running_mean, running_var, num_batches_tracked; a prefix neither in
        ``name_map`` nor mapped by ``rule``; a path the template lacks), a
        shape that does not fit (within a module, or against the template),
        two modules mapped to one path, or a template leaf left missing.

    >>> import torch, jax, jax.numpy as jnp
    >>> torch_model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False),
    ...                                   torch.nn.BatchNorm2d(8))
    >>> variables = torch_to_flax(torch_model.state_dict(),
    ...                           name_map={'0': 'conv', '1': 'bn'})
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'bn': {'mean': (8,), 'var': (8,)}},
     'params': {'bn': {'bias': (8,), 'scale': (8,)}, 'conv': {'kernel': (3, 3, 3, 8)}}}
    >>> torch_to_flax({'bn.running_mean': torch.zeros(3), 'bn.running_var': torch.ones(4)})
    Traceback (most recent call last):
    ...
    ValueError: shape mismatch for 'bn.running_var': (4,), expected (3,) (one value per feature, as 'bn.running_mean').
    """
    import jax.numpy as jnp

    entries, module = _state_dict_of(state_dict, "state_dict")
    arrays = {key: _to_numpy(value, key) for key, value in entries.items()}
    shapes = {key: array.shape for key, array in arrays.items()}
    resolve = _resolver(name_map, rule)
    is_cumulative = _cumulative_prefixes(cumulative, module)
    expected = None if template is None else {
        path: leaf for path, leaf in _flat(template).items() if path[0] in _COLLECTIONS
    }

    out: dict[tuple[str, ...], Any] = {}
    source: dict[tuple[str, ...], str] = {}
    for prefix, leaves in _group(arrays).items():
        first_key = next(iter(leaves.values()))
        module_path = resolve(prefix, first_key)
        if module_path is None:
            continue
        kind = _kind(prefix, leaves, shapes)
        for leaf, key in leaves.items():
            collection, name, array = _to_flax_layout(kind, leaf, arrays[key])
            path = (collection, *module_path, name)
            if leaf == "num_batches_tracked":
                keep = is_cumulative(prefix)
                if keep is None:
                    keep = expected is not None and path in expected
                if not keep:
                    continue
                array = np.asarray(array, np.float32)
            if path in source:
                raise ValueError(
                    f"{key!r} and {source[path]!r} both map to {_show(path)!r}; give the modules "
                    "distinct paths in name_map."
                )
            if expected is not None:
                if path not in expected:
                    close = difflib.get_close_matches(_show(path), [_show(p) for p in expected], n=1)
                    hint = f"; the closest is {close[0]!r}" if close else ""
                    raise ValueError(
                        f"unknown key {key!r}: it maps to {_show(path)!r}, which the template lacks{hint}. "
                        "Fix the name with name_map, or drop the module with name_map={prefix: None}."
                    )
                want = tuple(np.shape(expected[path]))
                if array.shape != want:
                    layouts = {"conv": " (OI...->...IO)", "dense": " (transposed)"}
                    layout = layouts.get(kind, "") if name == "kernel" else ""
                    raise ValueError(
                        f"shape mismatch for {key!r}: {shapes[key]} in torch is {array.shape} in Flax"
                        f"{layout}, but the template's {_show(path)!r} is {want}."
                    )
                array = np.asarray(array).astype(expected[path].dtype)
            source[path] = key
            out[path] = jnp.asarray(array)
    if expected is not None:
        missing = sorted(path for path in expected if path not in out)
        if missing:
            raise ValueError(
                f"missing keys: the template's {_listed(missing)} got no value from the state dict "
                "(a module the state dict lacks, or a name that maps elsewhere: see name_map/rule; a "
                "'count' needs the BatchNorm's num_batches_tracked)."
            )
    return _nest(out)


def flax_to_torch(
    variables: Mapping[str, Any],
    reference: Any,
    *,
    name_map: Mapping[str, Any] | None = None,
    rule: Rule | None = default_prefix_rule,
    num_batches_tracked: int | None = None,
) -> dict[str, Any]:
    """Converts Flax variables back into a PyTorch state dict shaped like ``reference``.

    The inverse of :func:`torch_to_flax` with the same ``name_map``/``rule``:
    every key of ``reference`` (its order, shapes and dtypes) is filled from
    ``variables``, so ``torch_model.load_state_dict(result)`` works.
    ``num_batches_tracked`` comes from ``count`` where the Flax BatchNorm has
    one (a cumulative average), else from the ``num_batches_tracked`` argument,
    else it is the reference's value. A module that ``name_map``/``rule`` skip
    keeps the reference's values.

    Args:
      variables: ``{'params', 'batch_stats'}`` (other collections are ignored).
      reference: the torch module or its state dict (torch tensors or NumPy
        arrays); the result has the same kind of values.
      name_map, rule: as for :func:`torch_to_flax`.
      num_batches_tracked: the counter to write for non-cumulative BatchNorms
        (e.g. the number of steps trained in Flax); default: the reference's.

    Returns:
      A dict with the keys of ``reference``, in its order, with its dtypes.

    Raises:
      TypeError: ``reference`` or ``variables`` is not a mapping (or module).
      ValueError: a reference key whose Flax leaf is missing (missing key), a
        shape that does not fit the reference, a leaf of ``variables`` that no
        reference key uses (unknown key), or an unknown reference key.

    >>> import torch, jax
    >>> torch_model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
    >>> name_map = {'0': 'fc', '1': 'bn'}
    >>> variables = torch_to_flax(torch_model, name_map=name_map)
    >>> variables['params']['fc']['kernel'].shape
    (4, 2)
    >>> back = flax_to_torch(variables, torch_model, name_map=name_map)
    >>> list(back) == list(torch_model.state_dict())
    True
    >>> all(torch.equal(back[k], v) for k, v in torch_model.state_dict().items())  # copies: the same bits
    True
    """
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"variables must be a mapping such as {{'params': ..., 'batch_stats': ...}}, got {type(variables)}."
        )
    entries, _ = _state_dict_of(reference, "reference")
    shapes = {key: tuple(value.shape) if hasattr(value, "shape") else np.shape(value) for key, value in entries.items()}
    resolve = _resolver(name_map, rule)
    flat = {path: leaf for path, leaf in _flat(variables).items() if path[0] in _COLLECTIONS}
    used: set[tuple[str, ...]] = set()
    if num_batches_tracked is not None and (
        isinstance(num_batches_tracked, bool) or not isinstance(num_batches_tracked, numbers.Integral)
    ):
        raise TypeError(f"num_batches_tracked must be an int or None, got {num_batches_tracked!r}.")

    out: dict[str, Any] = {}
    for prefix, leaves in _group(entries).items():
        module_path = resolve(prefix, next(iter(leaves.values())))
        kind = None if module_path is None else _kind(prefix, leaves, shapes)
        for leaf, key in leaves.items():
            ref = entries[key]
            if module_path is None:
                out[key] = ref
                continue
            collection, name, _ = _to_flax_layout(kind, leaf, np.empty((0,) * len(shapes[key])))
            path = (collection, *module_path, name)
            if leaf == "num_batches_tracked":
                if path in flat:
                    used.add(path)
                    value = np.asarray(np.rint(np.asarray(flat[path], np.float64)), np.int64)
                elif num_batches_tracked is not None:
                    value = np.asarray(num_batches_tracked, np.int64)
                else:
                    out[key] = ref.clone() if _is_torch_tensor(ref) else np.array(ref, copy=True)
                    continue
            else:
                if path not in flat:
                    close = difflib.get_close_matches(_show(path), [_show(p) for p in flat], n=1)
                    hint = f"; the closest is {close[0]!r}" if close else ""
                    raise ValueError(f"missing key: {key!r} needs {_show(path)!r}, which variables lack{hint}.")
                used.add(path)
                value = np.asarray(flat[path])
                if value.dtype.kind not in "biuf" and value.dtype.name != "bfloat16":
                    raise TypeError(
                        f"variables' {_show(path)!r} is a {type(flat[path]).__name__} ({value.dtype}); expected an "
                        "array (a template from jax.eval_shape has shapes but no values)."
                    )
                value = _to_torch_layout(kind, leaf, value)
            if value.shape != shapes[key]:
                raise ValueError(
                    f"shape mismatch for {key!r}: {_show(path)!r} of shape {np.shape(flat.get(path, value))} is "
                    f"{value.shape} in torch's layout, but the reference has {shapes[key]}."
                )
            out[key] = _like(value, ref)
    unused = sorted(path for path in flat if path not in used)
    if unused:
        raise ValueError(
            f"unknown keys: {_listed(unused)} in variables match no key of the reference state dict "
            "(a module the torch model lacks, or a name that maps elsewhere: see name_map/rule)."
        )
    return out


def _nnx_collections(module: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """An nnx module's ``{'params', 'batch_stats'}`` with string keys (list indices too), and their pure dicts."""
    from flax import nnx

    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module, got {type(module).__name__}.")
    pure = {"params": nnx.to_pure_dict(nnx.state(module, nnx.Param)),
            "batch_stats": nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))}

    def stringify(tree):
        return {str(key): stringify(value) for key, value in tree.items()} if isinstance(tree, Mapping) else tree

    return {name: stringify(tree) for name, tree in pure.items()}, pure


def torch_to_nnx(
    state_dict: Any,
    module: Any,
    *,
    name_map: Mapping[str, Any] | None = None,
    rule: Rule | None = default_prefix_rule,
    cumulative: bool | Iterable[str] | None = None,
) -> Any:
    """Loads a PyTorch state dict into an nnx module in place (:func:`torch_to_flax` for nnx).

    The module's ``nnx.Param`` and ``nnx.BatchStat`` variables are the
    template: paths are attribute names (``'layers/0'`` for an item of a
    list), with ``name_map``/``rule`` as in :func:`torch_to_flax`.

    Args:
      state_dict: as :func:`torch_to_flax`'s.
      module: the ``flax.nnx`` module (jaxbn's or flax's layers) to fill.
      name_map, rule, cumulative: as in :func:`torch_to_flax`.

    Returns:
      ``module``, its variables replaced.

    Raises:
      TypeError / ValueError: as :func:`torch_to_flax`, naming the key.
    """
    from flax import nnx

    template, pure = _nnx_collections(module)
    converted = torch_to_flax(state_dict, template, name_map=name_map, rule=rule, cumulative=cumulative)
    for collection, variable_type in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
        state = nnx.state(module, variable_type)

        def keyed(tree, like):  # back to the module's own keys (list indices are ints)
            return {key: keyed(tree[str(key)], value) if isinstance(value, Mapping) else tree[str(key)]
                    for key, value in like.items()}

        nnx.replace_by_pure_dict(state, keyed(converted.get(collection, {}), pure[collection]))
        nnx.update(module, state)
    return module


def nnx_to_torch(
    module: Any,
    reference: Any,
    *,
    name_map: Mapping[str, Any] | None = None,
    rule: Rule | None = default_prefix_rule,
    num_batches_tracked: int | None = None,
) -> dict[str, Any]:
    """An nnx module's variables as a PyTorch state dict shaped like ``reference`` (:func:`flax_to_torch` for nnx).

    Args:
      module: the ``flax.nnx`` module.
      reference, name_map, rule, num_batches_tracked: as in :func:`flax_to_torch`.

    Returns:
      The state dict, for ``torch_model.load_state_dict``.
    """
    variables, _ = _nnx_collections(module)
    return flax_to_torch(variables, reference, name_map=name_map, rule=rule, num_batches_tracked=num_batches_tracked)


def _like(value: np.ndarray, ref: Any) -> Any:
    """``value`` as a torch tensor (or NumPy array) with ``ref``'s dtype and device."""
    if _is_torch_tensor(ref):
        import torch

        if str(ref.dtype) == "torch.bfloat16":
            return torch.from_numpy(np.array(value, np.float32, order="C")).to(dtype=ref.dtype, device=ref.device)
        return torch.from_numpy(np.array(value, order="C")).to(dtype=ref.dtype, device=ref.device)
    return np.ascontiguousarray(value, dtype=np.asarray(ref).dtype)


# --------------------------------------------------------------------------- momentum


def _check_unit(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1] or None, got {value!r}.")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] or None, got {value!r}.")
    return float(value)


def _complement(value: float) -> float:
    """``1 - value`` to 15 significant digits, so that 1 - 0.9 is 0.1 (not 0.09999999999999998)."""
    return float(f"{1.0 - value:.15g}")


def momentum_from_torch(momentum: float | None) -> float | None:
    """PyTorch's BatchNorm momentum (weight of the batch) -> Flax/jaxbn's (weight of the old value).

    ``1 - momentum`` (to 15 significant digits, so that decimal values
    convert back exactly); None (PyTorch's cumulative average) stays None
    (``jaxbn.linen.BatchNorm(momentum=None)``).

    Raises:
      TypeError / ValueError: not a number in [0, 1] or None.

    >>> momentum_from_torch(0.1), momentum_from_torch(None)
    (0.9, None)
    """
    return None if momentum is None else _complement(_check_unit(momentum, "momentum (PyTorch's)"))


def momentum_to_torch(momentum: float | None) -> float | None:
    """Flax/jaxbn's BatchNorm momentum -> PyTorch's: ``1 - momentum``; None stays None.

    Raises:
      TypeError / ValueError: not a number in [0, 1] or None.

    >>> momentum_to_torch(0.9), momentum_to_torch(None)
    (0.1, None)
    """
    return None if momentum is None else _complement(_check_unit(momentum, "momentum (Flax's)"))


def batch_norm_kwargs(module: Any) -> dict[str, Any]:
    """The :class:`jaxbn.linen.BatchNorm` arguments that train as a given PyTorch BatchNorm does.

    ``momentum`` converted (:func:`momentum_from_torch`), ``epsilon`` (PyTorch's
    ``eps``), ``unbiased_running_var=True`` (PyTorch averages the unbiased
    batch variance into ``running_var``; both normalize with the biased one),
    and ``use_scale``/``use_bias`` from ``affine``. Pass the result to the
    Flax module: ``BatchNorm(**batch_norm_kwargs(bn), use_running_average=...)``.
    With PyTorch's ``momentum=None`` the Flax module keeps ``count``, which
    :func:`torch_to_flax` fills from ``num_batches_tracked``.

    Args:
      module: a ``torch.nn.BatchNorm1d``/``2d``/``3d`` (or ``SyncBatchNorm``).

    Returns:
      ``{'momentum', 'epsilon', 'unbiased_running_var', 'use_scale', 'use_bias'}``.

    Raises:
      TypeError: ``module`` is not a PyTorch BatchNorm.
      ValueError: ``track_running_stats=False`` (PyTorch then normalizes with
        batch statistics in eval mode too: call the jaxbn module with
        ``use_running_average=False, update_running_stats=False`` instead).

    >>> import torch
    >>> batch_norm_kwargs(torch.nn.BatchNorm2d(8, eps=1e-3, momentum=0.01))
    {'momentum': 0.99, 'epsilon': 0.001, 'unbiased_running_var': True, 'use_scale': True, 'use_bias': True}
    >>> batch_norm_kwargs(torch.nn.BatchNorm1d(8, momentum=None))['momentum'] is None
    True
    """
    import torch

    if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"expected a torch.nn.BatchNorm1d/2d/3d module, got {type(module).__name__}.")
    if not module.track_running_stats:
        raise ValueError(
            f"{module!r} has track_running_stats=False: it normalizes with batch statistics in eval mode "
            "too and keeps no running statistics. Call jaxbn's BatchNorm with use_running_average=False "
            "and update_running_stats=False to do the same."
        )
    return {
        "momentum": momentum_from_torch(module.momentum),
        "epsilon": float(module.eps),
        "unbiased_running_var": True,
        "use_scale": bool(module.affine),
        "use_bias": bool(module.affine),
    }


# --------------------------------------------------------------------------- compare


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What :func:`compare` found.

    Attributes:
      ok: everything compared agrees within the tolerances.
      max_abs_diff, max_rel_diff: of the final outputs (relative to the
        largest absolute torch output).
      first_mismatch: None, or a description of the first difference: the
        first module (in execution order) whose output differs, else the first
        parameter or statistic that differs, else the final output.
      state_mismatches: ``"module '<torch prefix>' (<flax path>): max abs diff <d>"``
        for each parameter or statistic that differs, in state-dict order.
      layer_diffs: ``(torch prefix, max abs diff)`` of each module output
        compared, in execution order (empty unless ``flax_model`` is a module).
    """

    ok: bool
    max_abs_diff: float
    max_rel_diff: float
    first_mismatch: str | None
    state_mismatches: tuple[str, ...]
    layer_diffs: tuple[tuple[str, float], ...]

    def __str__(self) -> str:
        head = "torch and flax agree" if self.ok else f"first mismatch: {self.first_mismatch}"
        return f"{head} (outputs: max abs diff {self.max_abs_diff:.3g}, max rel diff {self.max_rel_diff:.3g})"


def _channels_last(array: np.ndarray, on: bool) -> np.ndarray:
    return np.moveaxis(array, 1, -1) if on and array.ndim >= 3 else array


def _intermediate(tree: Any, path: FlaxPath) -> Any:
    node = tree
    for part in (*path, "__call__"):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node[0] if isinstance(node, (tuple, list)) and node else None


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
    """Runs ``x`` through the PyTorch and the Flax model in eval mode and says where they differ.

    Three checks, reported together: (1) every parameter and running
    statistic of ``torch_module`` against ``variables`` (converted with
    :func:`torch_to_flax` and the same ``name_map``/``rule``), which names the
    first BatchNorm (or Conv, Linear) whose values differ; (2) when
    ``flax_model`` is a linen ``Module``, the output of each torch module that
    has entries in the state dict against the Flax module at its path
    (``capture_intermediates``), in execution order; (3) the final outputs.
    ``torch_module`` is put in eval mode for the call and restored after; the
    Flax model must run in inference mode with ``apply_kwargs`` (e.g.
    ``{'train': False}``): a BatchNorm that tries to update its statistics
    raises, since ``batch_stats`` is not mutable here.

    Args:
      torch_module: the ``torch.nn.Module``.
      flax_model: a ``flax.linen.Module`` (applied as
        ``flax_model.apply(variables, x, **apply_kwargs)``) or a function
        ``apply(variables, x) -> y`` (then check (2) is skipped).
      variables: the Flax variables.
      x: a batch in PyTorch's layout (NCHW ...), tensor or array.
      apply_kwargs: extra keyword arguments for ``flax_model.apply``.
      name_map, rule: as for :func:`torch_to_flax`.
      channels_last: move axis 1 of ``x`` (and of torch activations of rank >=
        3) to the end for Flax (NCHW -> NHWC); False passes them unchanged.
      rtol, atol: ``|flax - torch| <= atol + rtol * |torch|`` elementwise.
      raise_on_mismatch: raise instead of returning a failed comparison.

    Returns:
      A :class:`Comparison`.

    Raises:
      AssertionError: with ``raise_on_mismatch``, when something differs
        (the message is the comparison's description).
      ValueError / TypeError: from the conversion (unknown or missing keys,
        shapes), or a final output shape that differs.

    >>> import torch, jax, flax.linen as nn
    >>> from jaxbn.linen import BatchNorm
    >>> torch_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
    >>> class Model(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return BatchNorm(use_running_average=True, name='layers_1')(nn.Dense(3, name='layers_0')(x))
    >>> variables = torch_to_flax(torch_model)
    >>> result = compare(torch_model, Model(), variables, torch.randn(5, 4))
    >>> result.ok, result.first_mismatch
    (True, None)
    >>> variables['batch_stats']['layers_1']['var'] = variables['batch_stats']['layers_1']['var'] * 2
    >>> compare(torch_model, Model(), variables, torch.randn(5, 4), raise_on_mismatch=False).first_mismatch
    "module '1' (layers_1): max abs diff ..."
    """
    import torch

    if not isinstance(torch_module, torch.nn.Module):
        raise TypeError(f"torch_module must be a torch.nn.Module, got {type(torch_module).__name__}.")
    resolve = _resolver(name_map, rule)
    converted = _flat(torch_to_flax(torch_module, variables, name_map=name_map, rule=rule))
    given = _flat(variables)
    prefix_of: dict[FlaxPath, str] = {}
    for prefix, leaves in _group(torch_module.state_dict()).items():
        module_path = resolve(prefix, next(iter(leaves.values())))
        if module_path is not None:
            prefix_of[module_path] = prefix
    order = {prefix: index for index, prefix in enumerate(prefix_of.values())}
    found = []
    for path, value in converted.items():
        ours = np.asarray(given[path], np.float64)
        theirs = np.asarray(value, np.float64)
        if not np.allclose(ours, theirs, rtol=rtol, atol=atol):
            diff = float(np.max(np.abs(ours - theirs)))
            prefix = prefix_of.get(path[1:-1], "?")
            found.append((order.get(prefix, -1), f"module {prefix!r} ({_show(path)}): max abs diff {diff:.3g}"))
    mismatches = [text for _, text in sorted(found, key=lambda item: item[0])]  # in the state dict's order

    x_np = _to_numpy(x, "x")
    layer_outputs: list[tuple[str, np.ndarray]] = []
    stateful = {prefix for prefix in _group(torch_module.state_dict())}
    handles = []
    for name, sub in torch_module.named_modules():
        if name in stateful:
            def hook(mod, inputs, output, name=name):
                if isinstance(output, torch.Tensor):
                    layer_outputs.append((name, output.detach().cpu().numpy()))
            handles.append(sub.register_forward_hook(hook))
    was_training = torch_module.training
    torch_module.eval()
    try:
        with torch.no_grad():
            y_torch = torch_module(torch.as_tensor(x_np)).detach().cpu().numpy()
    finally:
        torch_module.train(was_training)
        for handle in handles:
            handle.remove()

    x_flax = _channels_last(x_np, channels_last)
    kwargs = dict(apply_kwargs or {})
    intermediates = None
    if hasattr(flax_model, "apply") and hasattr(flax_model, "init"):
        y_flax, captured = flax_model.apply(
            variables, x_flax, capture_intermediates=True, mutable=["intermediates"], **kwargs
        )
        intermediates = captured["intermediates"]
    else:
        y_flax = flax_model(variables, x_flax, **kwargs)
    y_flax = np.asarray(y_flax, np.float64)
    y_ref = _channels_last(np.asarray(y_torch, np.float64), channels_last)
    if y_flax.shape != y_ref.shape:
        raise ValueError(
            f"the Flax output has shape {y_flax.shape}, the torch output (as Flax lays it out) {y_ref.shape}."
        )

    layer_diffs = []
    first_layer = None
    if intermediates is not None:
        for name, output in layer_outputs:
            path = resolve(name, name)
            flax_out = None if path is None else _intermediate(intermediates, path)
            if flax_out is None:
                continue
            ref = _channels_last(np.asarray(output, np.float64), channels_last)
            ours = np.asarray(flax_out, np.float64)
            if ours.shape != ref.shape:
                layer_diffs.append((name, float("inf")))
                shapes_differ = f"module {name!r} ({_show(path)}): output shape {ours.shape}, torch {ref.shape}"
                first_layer = first_layer or shapes_differ
                continue
            diff = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
            layer_diffs.append((name, diff))
            if first_layer is None and not np.allclose(ours, ref, rtol=rtol, atol=atol):
                first_layer = f"module {name!r} ({_show(path)}): max abs diff {diff:.3g}"

    abs_diff = float(np.max(np.abs(y_flax - y_ref))) if y_ref.size else 0.0
    rel_diff = abs_diff / max(float(np.max(np.abs(y_ref))) if y_ref.size else 0.0, np.finfo(np.float64).tiny)
    output_ok = bool(np.allclose(y_flax, y_ref, rtol=rtol, atol=atol))
    first = first_layer or (mismatches[0] if mismatches else None)
    if first is None and not output_ok:
        first = f"final output: max abs diff {abs_diff:.3g}"
    result = Comparison(
        ok=first is None,
        max_abs_diff=abs_diff,
        max_rel_diff=rel_diff,
        first_mismatch=first,
        state_mismatches=tuple(mismatches),
        layer_diffs=tuple(layer_diffs),
    )
    if raise_on_mismatch and not result.ok:
        extra = f"; parameters/statistics differ at: {'; '.join(mismatches)}" if mismatches else ""
        raise AssertionError(f"{result}{extra}")
    return result
