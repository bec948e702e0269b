"""What the Flax-facing code shares: boxed values, paths, the statistics' dtype, nnx interception."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta


def unboxed(value: Any) -> Any:
    """``value`` without its partitioning box (``nn.with_partitioning``) or nnx Variable, if any."""
    value = value[...] if isinstance(value, nnx.Variable) else value
    return value.unbox() if isinstance(value, meta.AxisMetadata) else value


def reboxed(old: Any, new: Any) -> Any:
    """``new`` in ``old``'s partitioning box, if ``old`` has one; an nnx Variable is written."""
    if isinstance(old, nnx.Variable):
        old[...] = new
        return old
    return old.replace_boxed(new) if isinstance(old, meta.AxisMetadata) else new


def path_name(path: Sequence[Any]) -> str:
    """A module path as messages show it: ``'block/Conv_0'``, ``'<root>'`` for the model itself."""
    return "/".join(map(str, path)) or "<root>"


def parse_path(value: Any, argument: str) -> tuple[str, ...]:
    """A module path given as ``'block/Conv_0'`` or a sequence of names, as a tuple of strings."""
    if isinstance(value, str):
        return tuple(p for p in value.split("/") if p)
    if isinstance(value, Sequence) and all(isinstance(p, (str, int)) for p in value):
        return tuple(str(p) for p in value)
    raise TypeError(
        f"{argument}: a module path must be a string such as 'block/Conv_0' or a tuple of names, "
        f"got {value!r}."
    )


def node_at(tree: Any, path: Sequence[Any]) -> Any:
    """``tree[path[0]][path[1]]...`` in a nest of mappings, None where a key is missing."""
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def running_stats_dtype(param_dtype: Any) -> Any:
    """The dtype of BatchNorm's running statistics: float32, or ``param_dtype`` if wider (float64
    under ``jax_enable_x64``), never half precision, real for a complex ``param_dtype``.

    >>> running_stats_dtype(jnp.bfloat16)
    dtype('float32')
    """
    if param_dtype is None or not jnp.issubdtype(param_dtype, jnp.inexact):
        return jnp.dtype(jnp.float32)
    real = jnp.finfo(param_dtype).dtype
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(jnp.float32, real))


# -- intercepting nnx calls ----------------------------------------------------------------------
# nnx has no nn.intercept_methods: the modules of a copy the caller owns become instances of a
# subclass whose __call__ asks a context variable for the object's interceptor. No class is edited
# (other models, copies, threads are untouched); super().__call__ reaches the parent's own.

#: ``(run, args, kwargs, path, module) -> output``; ``run(*args, **kwargs)`` is the module's call.
Interceptor = Callable[[Callable[..., Any], tuple, dict, tuple, Any], Any]

_HOOKS: contextvars.ContextVar[Mapping[int, tuple[Interceptor, tuple]]] = contextvars.ContextVar(
    "jaxbn_nnx_hooks", default=types.MappingProxyType({})
)


@functools.cache
def _intercepting(cls: type) -> type:
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        run = functools.partial(cls.__call__, self)
        hook = _HOOKS.get().get(id(self))
        return run(*args, **kwargs) if hook is None else hook[0](run, args, kwargs, hook[1], self)

    names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_jaxbn_original": cls}
    return type(cls.__name__, (cls,), {"__call__": __call__, **names})


@contextlib.contextmanager
def intercepted_nnx_calls(
    module: nnx.Module, interceptor: Interceptor, select: Callable[[Any], bool]
) -> Iterator[None]:
    """Routes the calls of the modules ``select`` picks in ``module``'s graph through
    ``interceptor`` inside the block; ``module`` must be a copy the caller owns."""
    hooks = dict(_HOOKS.get())
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Module) and select(node):
            original = getattr(type(node), "_jaxbn_original", type(node))
            object.__setattr__(node, "__class__", _intercepting(original))
            hooks[id(node)] = (interceptor, tuple(path))
    token = _HOOKS.set(hooks)
    try:
        yield
    finally:
        _HOOKS.reset(token)
