"""Folding eval-mode BatchNorms into the preceding ``Conv``/``Dense`` for inference.

The forward pass is traced, not run, to find which BatchNorm consumes which layer's output and
whether anything else uses it; linen models run folded through ``nn.intercept_methods``, nnx
modules are copied with :class:`FoldedBatchNorm` in place of each folded BatchNorm.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.core import tracers
from jax.extend import core as jex_core

from jaxbn import linen as _jaxbn_linen
from jaxbn import nnx as _jaxbn_nnx
from jaxbn._flax import intercepted_nnx_calls, node_at, parse_path, path_name, reboxed, unboxed

__all__ = ["FoldedBatchNorm", "FoldedLinen", "FoldedModel", "fold_batch_norm"]

_LINEN_LAYERS, _LINEN_NORMS = (nn.Conv, nn.Dense), (nn.BatchNorm, _jaxbn_linen.BatchNorm)
_LAYERS = (*_LINEN_LAYERS, nnx.Conv, nnx.Linear)
_NORMS = (*_LINEN_NORMS, nnx.BatchNorm, _jaxbn_nnx.BatchNorm)
_LAYER_NAMES = "Conv/Dense (nnx: Conv/Linear)"


class FoldedBatchNorm(nnx.Module):
    """The identity, with BatchNorm's call signature: a folded nnx BatchNorm's replacement."""

    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None
    ) -> jax.Array:
        """Returns ``x`` unchanged (its BatchNorm lives on in the preceding layer)."""
        return x


@dataclasses.dataclass
class _Call:
    """One module ``__call__`` seen during the traced forward pass."""

    index: int  # clock tick at entry (one clock for entries and returns)
    path: tuple[str, ...]
    module: Any
    kind: str  # 'layer', 'norm' or 'other'
    args: tuple
    kwargs: dict
    lifted: bool  # called inside a transform within the model (nn.scan, nn.remat, ...)
    probe: int = -1  # layers: which probe was added to the output (-1: none)
    output: Any = None
    done: int = -1  # clock tick at return


def _training(module: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a BatchNorm call ``module(*args, **kwargs)`` uses batch statistics."""
    given = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    return (module.use_running_average if given is None else given) is False


class _Recorder:
    """Traces ``forward(recorder)``, recording its module calls and probing each layer's output.

    With ``probes`` (traced zeros, one per layer call outside lifted transforms; None on the first
    pass, which collects their shapes) a layer returns ``output + probe``, and a BatchNorm handed
    exactly that computes on ``output``: only that use of the output does not depend on the probe.
    """

    def __init__(self, forward: Callable[[_Recorder], Any], fix: str):
        self.forward, self.fix = forward, fix  # fix: what to do about a training-mode BatchNorm
        self.probes: list[Any] | None = None
        self.trace: Any = None  # the trace of the forward pass itself
        self.calls: list[_Call] = []
        self.clock = itertools.count()
        self.shapes: list[jax.ShapeDtypeStruct] = []  # the probed layers' outputs, in call order
        self.unprobed: dict[int, tuple[Any, Any]] = {}  # id(output + probe) -> (it, output)

    def run(self, probes: list[Any] | None) -> list[Any]:
        self.probes, self.trace = probes, tracers.current_trace()
        leaves = jax.tree_util.tree_leaves(self.forward(self))
        return [leaf for leaf in leaves if isinstance(leaf, jax.Array)]

    def record(self, run: Callable, args: tuple, kwargs: dict, path: Sequence, module: Any) -> Any:
        layer, norm = isinstance(module, _LAYERS), isinstance(module, _NORMS)
        kind = "layer" if layer else "norm" if norm else "other"
        if kind == "norm" and not args and "x" in kwargs:  # bn(x=h): the input positional
            args, kwargs = (kwargs["x"],), {k: v for k, v in kwargs.items() if k != "x"}
        lifted = tracers.current_trace() != self.trace
        call = _Call(next(self.clock), tuple(path), module, kind, args, dict(kwargs), lifted)
        self.calls.append(call)
        if kind == "norm":
            if _training(module, args, kwargs):
                raise ValueError(
                    f"fold_batch_norm: BatchNorm '{path_name(call.path)}' is called in training "
                    "mode (use_running_average=False); folding uses the running statistics: "
                    f"{self.fix}."
                )
            if args and id(args[0]) in self.unprobed:
                args = (self.unprobed[id(args[0])][1], *args[1:])
        out = run(*args, **kwargs)
        if kind == "layer" and not lifted and isinstance(out, jax.Array):
            call.probe = len(self.shapes)
            self.shapes.append(jax.ShapeDtypeStruct(jnp.shape(out), out.dtype))
            if self.probes is not None:
                if call.probe >= len(self.probes) or self.probes[call.probe].shape != out.shape:
                    raise ValueError(
                        "fold_batch_norm: the model's forward pass called different layers when "
                        f"traced twice (at '{path_name(call.path)}'); folding needs a forward "
                        "pass that is the same every time."
                    )
                probed = out + self.probes[call.probe]
                self.unprobed[id(probed)] = (probed, out)
                out = probed
        call.output, call.done = out, next(self.clock)
        return out


def _reached(jaxpr: Any) -> set[int]:
    """The inputs of ``jaxpr`` its outputs depend on, conservatively (through any equation)."""
    depends: dict[Any, int] = {v: 1 << i for i, v in enumerate(jaxpr.invars)}
    bits = lambda vs: [depends.get(v, 0) for v in vs if isinstance(v, jex_core.Var)]
    for eqn in jaxpr.eqns:
        if mask := functools.reduce(operator.or_, bits(eqn.invars), 0):
            for v in eqn.outvars:
                depends[v] = depends.get(v, 0) | mask
    reached = functools.reduce(operator.or_, bits(jaxpr.outvars), 0)
    return {i for i in range(len(jaxpr.invars)) if reached >> i & 1}


def _producer_message(norm: _Call, calls: list[_Call]) -> str:
    """Says what produced the BatchNorm's input when it is not a Conv/Dense output."""
    producers = [c for c in calls if 0 <= c.done < norm.index and c.output is norm.args[0]]
    if producers:
        p = max(producers, key=lambda c: c.done)
        return f"its input is the output of '{path_name(p.path)}' ({type(p.module).__name__})"
    layers = [c for c in calls if c.kind == "layer" and 0 <= c.done < norm.index]
    if layers:
        last = max(layers, key=lambda c: c.done)
        return (
            f"its input is not the output of any {_LAYER_NAMES}: the last one called before it, "
            f"'{path_name(last.path)}', is followed by code outside module calls (an activation, "
            "a reshape, arithmetic, ...) that sits between"
        )
    return f"its input is not the output of any {_LAYER_NAMES} (none was called before it)"


def _refuse_lifted(call: _Call, calls: list[_Call]) -> None:
    """Refuses a module called inside a transform within the model, naming the transformed one."""
    if call.lifted:
        lifted = [c for c in calls if c.lifted and call.path[: len(c.path)] == c.path]
        outer = min(lifted, key=lambda c: len(c.path))
        raise ValueError(
            f"fold_batch_norm: '{path_name(call.path)}' ({type(call.module).__name__}) runs inside "
            f"a lifted transform within the model (the module at '{path_name(outer.path)}' is "
            "wrapped in nn.scan, nn.vmap, nn.remat, nn.jit, an nnx transform, ...); folding "
            "modules inside lifted transforms is not supported, so it is refused. Pass "
            "pairs=[...] to fold only BatchNorms outside them."
        )


def _folds(forward: Callable, pairs: Any, fix: str, outputs: str) -> list[tuple[_Call, _Call]]:
    """The checked (layer call, norm call) pairs to fold in the traced ``forward``."""
    if pairs is not None:
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise TypeError(
                f"pairs must be a sequence of (layer_path, batch_norm_path) pairs, got {pairs!r}."
            )
        checked = []
        for pair in pairs:
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise TypeError(
                    f"pairs: each entry must be a (layer_path, batch_norm_path) pair, got {pair!r}."
                )
            checked.append((parse_path(pair[0], "pairs"), parse_path(pair[1], "pairs")))
        pairs = checked
    first, second = _Recorder(forward, fix), _Recorder(forward, fix)
    try:  # the layers' output shapes, then a pass with a probe on each
        jax.eval_shape(first.run, None)
        reached = _reached(jax.make_jaxpr(second.run)(first.shapes).jaxpr)
    except jax.errors.JAXTypeError as err:
        raise ValueError(
            "fold_batch_norm: model: its forward pass cannot be traced (it needs concrete values, "
            f"{type(err).__name__}); fold_batch_norm traces it, as jax.jit does, to find which "
            "BatchNorm follows which layer and every other use of the layer's output. Make the "
            "model traceable (e.g. jnp.where or jax.lax.cond instead of a Python if on an array) "
            "to fold it."
        ) from err
    calls = second.calls
    by_path: dict[tuple[str, ...], list[_Call]] = {}
    for call in calls:
        by_path.setdefault(tuple(str(p) for p in call.path), []).append(call)
    wanted = []
    if pairs is None:
        norms = [c for c in calls if c.kind == "norm"]
        if not norms:
            raise ValueError(
                "fold_batch_norm: the forward pass called no BatchNorm; there is nothing to fold."
            )
        for norm in norms:
            _refuse_lifted(norm, calls)
            producers = [c for c in calls if c.kind == "layer" and 0 <= c.done < norm.index]
            producers = [c for c in producers if c.output is norm.args[0]]
            if not producers:
                raise ValueError(
                    f"fold_batch_norm: BatchNorm '{path_name(norm.path)}' cannot be folded: "
                    f"{_producer_message(norm, calls)}. Folding needs the BatchNorm to consume a "
                    f"{_LAYER_NAMES} output directly; pass pairs=[...] to fold only the others."
                )
            wanted.append((producers[-1], norm))
    for layer_path, norm_path in pairs or ():
        for path in (layer_path, norm_path):
            if path not in by_path:
                raise ValueError(
                    f"pairs: no module at '{path_name(path)}' was called in the forward pass "
                    f"(called: {sorted(path_name(p) for p in by_path)})."
                )
        layer, norm = by_path[layer_path][0], by_path[norm_path][0]
        for call, kind, noun in ((layer, "layer", _LAYER_NAMES), (norm, "norm", "BatchNorm")):
            if call.kind != kind:
                name = f"'{path_name(call.path)}' is a {type(call.module).__name__}"
                raise ValueError(f"pairs: {name}, not a {noun}.")
        _refuse_lifted(layer, calls)
        _refuse_lifted(norm, calls)
        if norm.args[0] is not layer.output:
            raise ValueError(
                f"pairs: ('{path_name(layer_path)}', '{path_name(norm_path)}') does not match: "
                f"BatchNorm '{path_name(norm_path)}' does not consume the output of "
                f"'{path_name(layer_path)}' directly; {_producer_message(norm, calls)}."
            )
        wanted.append((layer, norm))
    seen: set[tuple[str, ...]] = set()
    for layer, norm in wanted:
        for call in (layer, norm):
            _refuse_lifted(call, calls)
            key = tuple(str(p) for p in call.path)
            if len(by_path[key]) > 1:
                raise ValueError(
                    f"fold_batch_norm: '{path_name(call.path)}' is called {len(by_path[key])} "
                    "times in the forward pass (a shared module); folding would change every "
                    "call, so it is refused."
                )
            if key in seen:
                raise ValueError(f"fold_batch_norm: '{path_name(call.path)}' appears in two pairs.")
            seen.add(key)
        for other in calls:
            if other is norm or other.index <= layer.index or other.output is layer.output:
                continue  # the same output passed on unchanged (e.g. a deterministic Dropout)
            leaves = jax.tree_util.tree_leaves((other.args, other.kwargs))
            if any(leaf is layer.output for leaf in leaves) and other.done >= 0:
                if other.index < norm.index and norm.done <= other.done:  # an ancestor passing it
                    continue
                raise ValueError(
                    f"fold_batch_norm: the output of '{path_name(layer.path)}' also feeds "
                    f"'{path_name(other.path)}' ({type(other.module).__name__}), besides BatchNorm "
                    f"'{path_name(norm.path)}'; folding would change that input too."
                )
        x, axis = norm.args[0], norm.module.axis
        ndim, axis = jnp.ndim(x), axis[0] if isinstance(axis, Sequence) and len(axis) == 1 else axis
        if not isinstance(axis, int) or not -ndim <= axis < ndim or axis % ndim != ndim - 1:
            raise ValueError(
                f"fold_batch_norm: BatchNorm '{path_name(norm.path)}' normalizes "
                f"axis={norm.module.axis!r} of its shape-{tuple(jnp.shape(x))} input, but "
                f"'{path_name(layer.path)}' puts its output features on the last axis; folding "
                "needs the BatchNorm's feature axis to be the layer's output feature axis (NCHW "
                "BatchNorm, axis=1 on a 4-D input, is not supported)."
            )
        if jnp.iscomplexobj(x):
            raise TypeError(
                f"fold_batch_norm: BatchNorm '{path_name(norm.path)}' has a complex input; "
                "not supported."
            )
    for layer, norm in wanted:
        if layer.probe < 0 or layer.probe in reached:
            raise ValueError(
                f"fold_batch_norm: the output of '{path_name(layer.path)}' is used besides "
                f"BatchNorm '{path_name(norm.path)}' (by code outside module calls, e.g. a "
                f"residual bn(h) + h), and that use reaches {outputs}; folding would change it "
                "too, so it is refused. Pass pairs=[...] to fold only the others."
            )
    return wanted


def _fold(layer: dict, stats: Mapping, norm: Mapping, epsilon: float, where: str) -> None:
    """Folds a BatchNorm's ``stats``, ``norm`` into ``layer`` as PyTorch's fuse_conv_bn_weights."""
    kernel, bias = unboxed(layer["kernel"]), unboxed(layer.get("bias"))
    mean, var = unboxed(stats["mean"]), unboxed(stats["var"])
    scale, beta = unboxed(norm.get("scale")), unboxed(norm.get("bias"))
    out = kernel.shape[-1]
    for name, value in (("mean", mean), ("var", var), ("scale", scale), ("bias", beta)):
        if value is not None and tuple(value.shape) != (out,):
            raise ValueError(
                f"fold_batch_norm: BatchNorm '{where}' has {name} of shape {tuple(value.shape)}, "
                f"but the layer before it has {out} output features."
            )
    if jnp.iscomplexobj(mean):
        raise TypeError(
            f"fold_batch_norm: BatchNorm '{where}' has a complex running mean; not supported."
        )
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    cast = lambda x, default: jnp.full((out,), default, dtype) if x is None else x.astype(dtype)
    rsqrt = jax.lax.rsqrt(var.astype(dtype) + jnp.asarray(epsilon, dtype))
    gamma = cast(scale, 1)
    new_kernel = (kernel.astype(dtype) * (gamma * rsqrt)).astype(kernel.dtype)
    new_bias = (cast(bias, 0) - mean.astype(dtype)) * rsqrt * gamma + cast(beta, 0)
    layer["kernel"] = reboxed(layer["kernel"], new_kernel)
    bias_dtype = getattr(bias, "dtype", kernel.dtype)
    layer["bias"] = reboxed(layer.get("bias"), new_bias.astype(bias_dtype))


class FoldedModel(nn.Module):
    """A linen model run with its folded BatchNorms as the identity (:func:`fold_batch_norm`).

    It shares ``module``'s scope and intercepts its calls: each BatchNorm in ``batch_norms``
    returns its input, each layer in ``layers`` built with ``use_bias=False`` adds its folded
    bias. It refuses a folded BatchNorm in training mode and the unfolded variables.

    Attributes:
      module: the original model.
      layers: the folded layers' paths.
      batch_norms: the folded BatchNorms' paths, in the same order.
    """

    module: nn.Module
    layers: tuple[tuple[str, ...], ...] = ()
    batch_norms: tuple[tuple[str, ...], ...] = ()

    def setup(self) -> None:
        nn.share_scope(self, self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` with the folded BatchNorms as the identity, biases added."""
        folded = frozenset(map(tuple, self.layers)), frozenset(map(tuple, self.batch_norms))
        with nn.intercept_methods(functools.partial(_run_folded, tuple(self.path), *folded)):
            return self.module(*args, **kwargs)


def _run_folded(prefix, layers, norms, next_fun, args, kwargs, context) -> Any:
    """:class:`FoldedModel`'s interceptor; paths are relative to it (``prefix``)."""
    module, path = context.module, tuple(context.module.path)
    if context.method_name != "__call__" or path[: len(prefix)] != prefix:
        return next_fun(*args, **kwargs)
    path = path[len(prefix) :]
    if path in norms and isinstance(module, _LINEN_NORMS):
        if _training(module, args, kwargs):
            raise ValueError(
                f"FoldedModel: BatchNorm '{path_name(path)}' is folded into the layer before it "
                "(it runs as the identity), so it cannot be called in training mode "
                "(use_running_average=False); call the folded model in eval mode "
                "(e.g. train=False)."
            )
        if module.has_variable("batch_stats", "mean"):
            raise ValueError(
                "FoldedModel: the variables hold the batch_stats of BatchNorm "
                f"'{path_name(path)}', which is folded: apply the folded model to the folded "
                "variables (fold_batch_norm(...).variables), not to the original ones."
            )
        return args[0] if args else kwargs["x"]
    out = next_fun(*args, **kwargs)
    if path in layers and isinstance(module, _LINEN_LAYERS) and not module.use_bias:
        bias: Any = module.get_variable("params", "bias")
        if bias is None and module.is_initializing():
            raise ValueError(
                f"FoldedModel: cannot init the folded bias of '{path_name(path)}': a folded model "
                "only runs the variables fold_batch_norm folded (fold_batch_norm(...).variables); "
                "init the original model."
            )
        if bias is None:
            raise ValueError(
                f"FoldedModel: the variables lack params/{path_name(path)}/bias, the folded bias "
                f"of '{path_name(path)}' (built with use_bias=False): apply the folded model to "
                "the folded variables (fold_batch_norm(...).variables), not to the original ones."
            )
        out = out + jnp.asarray(unboxed(bias), out.dtype)
    return out


class FoldedLinen(NamedTuple):
    """A folded linen model: run it as ``model.apply(variables, *args, **kwargs)``.

    The variables fit only ``model``: a layer built with ``use_bias=False`` elsewhere would
    silently ignore its folded bias.
    """

    model: FoldedModel
    variables: Any


def _remove(tree: Any, path: tuple) -> None:
    """Deletes ``tree[path]`` and the dicts it leaves empty."""
    if path and isinstance(tree, dict) and path[0] in tree:
        if len(path) > 1:
            _remove(tree[path[0]], path[1:])
        if len(path) == 1 or (isinstance(tree[path[0]], dict) and not tree[path[0]]):
            del tree[path[0]]


def _fold_linen(model: nn.Module, variables: Any, args: tuple, kwargs: dict, pairs: Any) -> Any:
    if not isinstance(variables, Mapping) or "params" not in variables:
        keys = f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else ""
        raise TypeError(
            "fold_batch_norm(linen_model, variables, *args): variables must be the model's "
            f"variables ({{'params': ..., 'batch_stats': ...}}), got {type(variables).__name__}"
            f"{keys}."
        )
    if not args:
        raise TypeError(
            "fold_batch_norm(linen_model, variables, *args): pass a sample input after the "
            "variables."
        )

    def forward(recorder: _Recorder) -> Any:
        def intercept(next_fun, call_args, call_kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*call_args, **call_kwargs)
            module = context.module
            return recorder.record(next_fun, call_args, call_kwargs, module.path, module)

        with nn.intercept_methods(intercept):
            return model.apply(variables, *args, **kwargs)

    fix = "pass the arguments of an eval-mode call (e.g. train=False)"
    wanted = _folds(forward, pairs, fix, "what the model returns")
    folded: dict[str, Any] = flax.core.unfreeze(variables)  # type: ignore[arg-type]  # a fresh dict
    for layer, norm in wanted:
        params = node_at(folded["params"], layer.path)
        stats = node_at(folded.get("batch_stats", {}), norm.path)
        if params is None or "kernel" not in params or stats is None:
            raise ValueError(
                f"fold_batch_norm: variables lack the entries of '{path_name(layer.path)}' or "
                f"'{path_name(norm.path)}'."
            )
        norm_params = node_at(folded["params"], norm.path) or {}
        _fold(params, stats, norm_params, norm.module.epsilon, path_name(norm.path))
        for name in list(folded):
            _remove(folded[name], norm.path)
            if name != "params" and not folded[name]:
                del folded[name]
    layers, norms = tuple(lc.path for lc, _ in wanted), tuple(nc.path for _, nc in wanted)
    folded_model = FoldedModel(model, layers=layers, batch_norms=norms)
    frozen = isinstance(variables, flax.core.FrozenDict)
    return FoldedLinen(folded_model, flax.core.freeze(folded) if frozen else folded)


def _fold_nnx(module: nnx.Module, args: tuple, kwargs: dict, pairs: Any) -> nnx.Module:
    if not args:
        raise TypeError(
            "fold_batch_norm(nnx_module, *args): pass a sample input to call the module with."
        )
    model = nnx.clone(module)
    graphdef, state = nnx.split(model)

    def forward(recorder: _Recorder) -> Any:
        traced = nnx.merge(graphdef, state, copy=True)  # new objects: `model` stays as it is
        with intercepted_nnx_calls(traced, recorder.record, lambda node: True):
            out = traced(*args, **kwargs)
        return out, nnx.state(traced)

    fix = "call model.eval() first (or pass use_running_average=True)"
    wanted = _folds(forward, pairs, fix, "what the module returns or its state")
    indexed = lambda parent, key: isinstance(key, int) or isinstance(parent, Mapping)
    modules: dict[tuple, Any] = {tuple(path): m for path, m in nnx.iter_modules(model)}
    for layer_call, norm_call in wanted:
        layer, norm, path = modules[layer_call.path], modules[norm_call.path], norm_call.path
        params = {"kernel": layer.kernel, "bias": layer.bias}
        stats = {"mean": norm.mean, "var": norm.var, "scale": norm.scale, "bias": norm.bias}
        _fold(params, stats, stats, norm.epsilon, path_name(path))
        if layer.bias is None:
            layer.bias, layer.use_bias = nnx.Param(params["bias"]), True
        parent: Any = model
        for key in path[:-1]:
            parent = parent[key] if indexed(parent, key) else getattr(parent, key)
        put = operator.setitem if indexed(parent, path[-1]) else setattr  # list, nnx.List, dict
        try:
            put(parent, path[-1], FoldedBatchNorm())
        except (TypeError, AttributeError) as err:
            raise ValueError(
                f"fold_batch_norm: cannot replace BatchNorm '{path_name(path)}' in its container "
                f"{type(parent).__name__} (immutable?): {err}"
            ) from err
    return model


def fold_batch_norm(
    model: Any, *args: Any, pairs: Sequence[tuple[Any, Any]] | None = None, **kwargs: Any
) -> Any:
    r"""Folds eval-mode BatchNorms into the ``Conv``/``Dense`` layers whose outputs they normalize:
    linen gives a :class:`FoldedLinen`, run as ``folded.model.apply(folded.variables, ...)``, nnx
    a folded copy of the module. Per output feature, :math:`s = \gamma / \sqrt{\mathrm{var} + \epsilon}`,
    :math:`W' = W s` and :math:`b' = (b - \mathrm{mean}) s + \beta`, computed in at least
    float32 in PyTorch's order (``fuse_conv_bn_weights``). One forward pass on the sample
    arguments is traced (the model must be traceable, as under ``jax.jit``). A fold is
    refused, naming the layer, when the BatchNorm does not consume the layer's output
    directly, runs in training mode, normalizes another axis than the layer's output
    features, or when the output has another use that reaches the model's outputs (another
    module, a residual ``bn(h) + h``), or the modules run inside a lifted transform.

    Args:
      model: a ``flax.linen.Module`` (then ``*args`` starts with its variables) or a
        ``flax.nnx.Module``.
      *args: the sample call arguments (an eval-mode call, e.g. ``train=False``).
      pairs: None to fold every BatchNorm called, or ``(layer_path, batch_norm_path)``
        pairs (``'block/Conv_0'`` or a tuple of names) to fold only those.
      **kwargs: keyword arguments of the sample call.

    Raises:
      ValueError: a BatchNorm cannot be folded exactly (the message says why and where).
      TypeError: ``model``, ``variables``, the sample input or ``pairs`` are malformed.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jaxbn.linen import BatchNorm
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return BatchNorm(use_running_average=True)(nn.Dense(4, use_bias=False)(x))
    >>> x = jax.random.normal(jax.random.key(0), (5, 3))
    >>> variables = Net().init(jax.random.key(1), x)
    >>> variables['batch_stats']['BatchNorm_0']['mean'] = jnp.arange(4.0)
    >>> folded = fold_batch_norm(Net(), variables, x)
    >>> jax.tree.map(jnp.shape, folded.variables)
    {'params': {'Dense_0': {'bias': (4,), 'kernel': (3, 4)}}}
    >>> bool(jnp.allclose(folded.model.apply(folded.variables, x), Net().apply(variables, x),
    ...                   atol=1e-5))
    True
    >>> from flax import nnx
    >>> net = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
    ...                      nnx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0)))
    >>> fast = fold_batch_norm(net, x)
    >>> type(fast.layers[1]).__name__, bool(jnp.allclose(fast(x), net(x), atol=1e-5))
    ('FoldedBatchNorm', True)
    """
    if isinstance(model, nn.Module):
        if not args:
            raise TypeError(
                "fold_batch_norm(linen_model, variables, *args): the variables are missing."
            )
        return _fold_linen(model, args[0], args[1:], kwargs, pairs)
    if isinstance(model, nnx.Module):
        return _fold_nnx(model, args, kwargs, pairs)
    raise TypeError(
        "fold_batch_norm: model must be a flax.linen.Module (with its variables) or a "
        f"flax.nnx.Module, got {type(model).__name__}."
    )
