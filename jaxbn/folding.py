"""Folding eval-mode BatchNorms into the preceding ``Conv``/``Dense`` for inference.

The forward pass is traced, not run, to find which BatchNorm consumes which layer's output and
whether anything else uses it; linen models run folded through ``nn.intercept_methods``, nnx
modules are copied with :class:`FoldedBatchNorm` in place of each folded BatchNorm.
"""

from __future__ import annotations

import dataclasses
import functools
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

_LINEN_LAYERS = (nn.Conv, nn.Dense)
_LINEN_NORMS = (nn.BatchNorm, _jaxbn_linen.BatchNorm)
_NNX_LAYERS = (nnx.Conv, nnx.Linear)
_NNX_NORMS = (nnx.BatchNorm, _jaxbn_nnx.BatchNorm)
_LAYER_NAMES = "Conv/Dense (nnx: Conv/Linear)"


class FoldedBatchNorm(nnx.Module):
    """The identity, with BatchNorm's call signature: a folded nnx BatchNorm's replacement."""

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None) -> jax.Array:
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
    lifted: bool = False  # called inside a transform within the model (nn.scan, nn.remat, ...)
    probe: int = -1  # layers: which probe was added to the output (-1: none)
    output: Any = None
    feature_axis: Any = None  # norms: the axis argument
    training: bool | None = None  # norms: True when called in training mode
    done: int = -1  # clock tick at return


def _training(module: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a BatchNorm call ``module(*args, **kwargs)`` uses batch statistics."""
    given = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    return (module.use_running_average if given is None else given) is False


def _note_norm_call(call: _Call, fix: str) -> None:
    """Records a BatchNorm call's feature axis; refuses a training-mode call (``fix`` says what to do)."""
    call.feature_axis, call.training = call.module.axis, _training(call.module, call.args, call.kwargs)
    if call.training:
        raise ValueError(
            f"fold_batch_norm: BatchNorm '{path_name(call.path)}' is called in training mode "
            f"(use_running_average=False); folding uses the running statistics: {fix}."
        )


class _Recorder:
    """Records the module calls of one traced forward pass and puts a probe on each layer's output.

    With ``probes`` (one traced zero per layer call outside lifted transforms,
    in call order; None on the first pass, which only collects their shapes)
    a layer hands ``output + probe`` to the code that called it, and a
    BatchNorm handed exactly that object computes on ``output`` itself: in the
    traced program every other use of the output depends on the probe, the
    BatchNorm's does not.
    """

    def __init__(self, fix: str):
        self.fix = fix  # what to do about a training-mode BatchNorm
        self.probes: list[Any] | None = None
        self.trace: Any = None  # the trace of the forward pass itself (set when the pass starts)
        self.calls: list[_Call] = []
        self.clock = 0
        self.shapes: list[jax.ShapeDtypeStruct] = []  # the probed layers' outputs, in call order
        self.unprobed: dict[int, tuple[Any, Any]] = {}  # id(output + probe) -> (output + probe, output)

    def __call__(self, path: Sequence[Any], module: Any, kind: str, args: tuple, kwargs: dict,
                 run: Callable[..., Any]) -> Any:
        if kind == "norm" and not args and "x" in kwargs:  # bn(x=h): the input positional, as the checks read it
            kwargs = dict(kwargs)
            args = (kwargs.pop("x"),)
        call = _Call(self.clock, tuple(path), module, kind, args, dict(kwargs))
        call.lifted = tracers.current_trace() != self.trace
        self.clock += 1
        self.calls.append(call)
        if kind == "norm":
            _note_norm_call(call, self.fix)
            if args and id(args[0]) in self.unprobed:
                args = (self.unprobed[id(args[0])][1], *args[1:])
        out = run(*args, **kwargs)
        if kind == "layer" and not call.lifted and isinstance(out, jax.Array):
            call.probe = len(self.shapes)
            self.shapes.append(jax.ShapeDtypeStruct(jnp.shape(out), out.dtype))
            if self.probes is not None:
                if call.probe >= len(self.probes) or self.probes[call.probe].shape != jnp.shape(out):
                    raise ValueError(
                        f"fold_batch_norm: the model's forward pass called different layers when traced twice "
                        f"(at '{path_name(call.path)}'); folding needs a forward pass that is the same every time."
                    )
                probed = out + self.probes[call.probe]
                self.unprobed[id(probed)] = (probed, out)
                out = probed
        call.output, call.done = out, self.clock
        self.clock += 1
        return out


def _reached(jaxpr: Any) -> set[int]:
    """The inputs of ``jaxpr`` that its outputs depend on.

    Conservative: an equation with any dependent input makes all its outputs
    dependent, whatever it computes (higher-order ones such as ``pjit``,
    ``scan`` or ``custom_jvp_call`` included), so a use that is numerically
    zero counts too; equations whose results reach no output do not.
    """
    depends: dict[Any, int] = {v: 1 << i for i, v in enumerate(jaxpr.invars)}
    for eqn in jaxpr.eqns:
        mask = 0
        for v in eqn.invars:
            if isinstance(v, jex_core.Var):
                mask |= depends.get(v, 0)
        if mask:
            for v in eqn.outvars:
                depends[v] = depends.get(v, 0) | mask
    reached = 0
    for v in jaxpr.outvars:
        if isinstance(v, jex_core.Var):
            reached |= depends.get(v, 0)
    return {i for i in range(len(jaxpr.invars)) if reached >> i & 1}


def _trace(forward: Callable[[_Recorder], Any], fix: str) -> tuple[list[_Call], set[int]]:
    """Traces ``forward(recorder)`` twice: for the layers' output shapes, then with a probe on each.

    Returns the calls of the second pass and the probes that the outputs of
    ``forward`` (its array leaves) depend on.
    """

    def traced(recorder: _Recorder) -> Callable[[Any], list[Any]]:
        def run(probes: list[Any] | None) -> list[Any]:
            recorder.probes, recorder.trace = probes, tracers.current_trace()
            return [leaf for leaf in jax.tree_util.tree_leaves(forward(recorder)) if isinstance(leaf, jax.Array)]

        return run

    first, second = _Recorder(fix), _Recorder(fix)
    try:
        jax.eval_shape(traced(first), None)
        closed = jax.make_jaxpr(traced(second))(first.shapes)
    except jax.errors.JAXTypeError as err:
        raise ValueError(
            "fold_batch_norm: model: its forward pass cannot be traced (it needs concrete values, "
            f"{type(err).__name__}); fold_batch_norm traces it, as jax.jit does, to find which BatchNorm "
            "follows which layer and every other use of the layer's output. Make the model traceable "
            "(e.g. jnp.where or jax.lax.cond instead of a Python if on an array) to fold it."
        ) from err
    return second.calls, _reached(closed.jaxpr)


def _check_pairs(pairs: Any) -> list[tuple[tuple[str, ...], tuple[str, ...]]] | None:
    if pairs is None:
        return None
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a sequence of (layer_path, batch_norm_path) pairs, got {pairs!r}.")
    checked = []
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"pairs: each entry must be a (layer_path, batch_norm_path) pair, got {pair!r}.")
        checked.append((parse_path(pair[0], "pairs"), parse_path(pair[1], "pairs")))
    return checked


def _leaves(args: tuple, kwargs: dict) -> list[Any]:
    return jax.tree_util.tree_leaves((args, kwargs))


def _producer_message(norm: _Call, calls: list[_Call]) -> str:
    """Says what produced the BatchNorm's input when it is not a Conv/Dense output."""
    x = norm.args[0]
    producers = [c for c in calls if 0 <= c.done < norm.index and c.output is x]
    if producers:
        p = max(producers, key=lambda c: c.done)
        return f"its input is the output of '{path_name(p.path)}' ({type(p.module).__name__})"
    layers = [c for c in calls if c.kind == "layer" and 0 <= c.done < norm.index]
    if layers:
        last = max(layers, key=lambda c: c.done)
        return (
            f"its input is not the output of any {_LAYER_NAMES}: the last one called before it, "
            f"'{path_name(last.path)}', is followed by code outside module calls (an activation, a reshape, "
            "arithmetic, ...) that sits between"
        )
    return f"its input is not the output of any {_LAYER_NAMES} (none was called before it)"


def _refuse_lifted(call: _Call, calls: list[_Call]) -> None:
    """Refuses a module called inside a transform within the model, naming the transformed module."""
    if not call.lifted:
        return
    outer = min((c for c in calls if c.lifted and call.path[: len(c.path)] == c.path), key=lambda c: len(c.path))
    raise ValueError(
        f"fold_batch_norm: '{path_name(call.path)}' ({type(call.module).__name__}) runs inside a lifted transform "
        f"within the model (the module at '{path_name(outer.path)}' is wrapped in nn.scan, nn.vmap, nn.remat, "
        "nn.jit, an nnx transform, ...); folding modules inside lifted transforms is not supported, so it is "
        "refused. Pass pairs=[...] to fold only BatchNorms outside them."
    )


def _match(calls: list[_Call], pairs: list | None) -> list[tuple[_Call, _Call]]:
    """The (layer call, norm call) pairs to fold, checked."""
    by_path: dict[tuple[str, ...], list[_Call]] = {}
    for call in calls:
        by_path.setdefault(tuple(str(p) for p in call.path), []).append(call)
    if pairs is None:
        norms = [c for c in calls if c.kind == "norm"]
        if not norms:
            raise ValueError("fold_batch_norm: the forward pass called no BatchNorm; there is nothing to fold.")
        wanted = []
        for norm in norms:
            _refuse_lifted(norm, calls)
            producers = [c for c in calls
                         if c.kind == "layer" and c.output is norm.args[0] and 0 <= c.done < norm.index]
            if not producers:
                raise ValueError(
                    f"fold_batch_norm: BatchNorm '{path_name(norm.path)}' cannot be folded: "
                    f"{_producer_message(norm, calls)}. Folding needs the BatchNorm to consume a "
                    f"{_LAYER_NAMES} output directly; pass pairs=[...] to fold only the others."
                )
            wanted.append((producers[-1], norm))
    else:
        wanted = []
        for layer_path, norm_path in pairs:
            for path, what in ((layer_path, "layer"), (norm_path, "norm")):
                if path not in by_path:
                    raise ValueError(
                        f"pairs: no module at '{path_name(path)}' was called in the forward pass "
                        f"(called: {sorted(path_name(p) for p in by_path)})."
                    )
            layer, norm = by_path[layer_path][0], by_path[norm_path][0]
            if layer.kind != "layer":
                raise ValueError(
                    f"pairs: '{path_name(layer_path)}' is a {type(layer.module).__name__}, not a {_LAYER_NAMES}."
                )
            if norm.kind != "norm":
                raise ValueError(f"pairs: '{path_name(norm_path)}' is a {type(norm.module).__name__}, not a BatchNorm.")
            _refuse_lifted(layer, calls)
            _refuse_lifted(norm, calls)
            if norm.args[0] is not layer.output:
                raise ValueError(
                    f"pairs: ('{path_name(layer_path)}', '{path_name(norm_path)}') does not match: BatchNorm "
                    f"'{path_name(norm_path)}' does not consume the output of '{path_name(layer_path)}' directly; "
                    f"{_producer_message(norm, calls)}."
                )
            wanted.append((layer, norm))
    seen: dict[tuple[str, ...], str] = {}
    for layer, norm in wanted:
        for call in (layer, norm):
            _refuse_lifted(call, calls)
            key = tuple(str(p) for p in call.path)
            if len(by_path[key]) > 1:
                raise ValueError(
                    f"fold_batch_norm: '{path_name(call.path)}' is called {len(by_path[key])} times in the forward "
                    "pass (a shared module); folding would change every call, so it is refused."
                )
            if key in seen:
                raise ValueError(f"fold_batch_norm: '{path_name(call.path)}' appears in two pairs.")
            seen[key] = path_name(call.path)
        if norm.training:
            raise ValueError(
                f"fold_batch_norm: BatchNorm '{path_name(norm.path)}' ran in training mode (batch statistics); "
                "folding uses the running statistics, so call the model in eval mode (e.g. train=False, "
                "use_running_average=True, or model.eval() in nnx)."
            )
        for other in calls:
            if other is norm or other.index <= layer.index or other.index < 0:
                continue
            if other.output is layer.output:  # passes its input on unchanged (e.g. a deterministic Dropout)
                continue
            if any(leaf is layer.output for leaf in _leaves(other.args, other.kwargs)) and other.done >= 0:
                if other.index < norm.index and norm.done <= other.done:  # an ancestor passing it on
                    continue
                raise ValueError(
                    f"fold_batch_norm: the output of '{path_name(layer.path)}' also feeds '{path_name(other.path)}' "
                    f"({type(other.module).__name__}), besides BatchNorm '{path_name(norm.path)}'; folding would "
                    "change that input too."
                )
        x = norm.args[0]
        ndim = jnp.ndim(x)
        axis = norm.feature_axis
        if isinstance(axis, Sequence) and len(axis) == 1:
            axis = axis[0]
        if not isinstance(axis, int) or not -ndim <= axis < ndim or axis % ndim != ndim - 1:
            raise ValueError(
                f"fold_batch_norm: BatchNorm '{path_name(norm.path)}' normalizes axis={norm.feature_axis!r} of its "
                f"shape-{tuple(jnp.shape(x))} input, but '{path_name(layer.path)}' puts its output features on the "
                "last axis; folding needs the BatchNorm's feature axis to be the layer's output feature axis "
                "(NCHW BatchNorm, axis=1 on a 4-D input, is not supported)."
            )
        if jnp.iscomplexobj(x):
            raise TypeError(f"fold_batch_norm: BatchNorm '{path_name(norm.path)}' has a complex input; not supported.")
    return wanted


def _refuse_other_uses(wanted: list[tuple[_Call, _Call]], reached: set[int], outputs: str) -> None:
    """Refuses a pair whose layer output has a use besides its BatchNorm that reaches ``outputs``."""
    for layer, norm in wanted:
        if layer.probe < 0 or layer.probe in reached:
            raise ValueError(
                f"fold_batch_norm: the output of '{path_name(layer.path)}' is used besides BatchNorm "
                f"'{path_name(norm.path)}' (by code outside module calls, e.g. a residual bn(h) + h), and that use "
                f"reaches {outputs}; folding would change it too, so it is refused. Pass pairs=[...] to fold "
                "only the others."
            )


def _fold_arrays(kernel, bias, mean, var, scale, beta, epsilon, where: str):
    """``W * s`` and ``(b - mean) * rsqrt(var + eps) * scale + beta``, as PyTorch's fuse_conv_bn_weights."""
    out = kernel.shape[-1]
    for name, value in (("mean", mean), ("var", var), ("scale", scale), ("bias", beta)):
        if value is not None and tuple(value.shape) != (out,):
            raise ValueError(
                f"fold_batch_norm: BatchNorm '{where}' has {name} of shape {tuple(value.shape)}, but the layer "
                f"before it has {out} output features."
            )
    if jnp.iscomplexobj(mean):
        raise TypeError(f"fold_batch_norm: BatchNorm '{where}' has a complex running mean; not supported.")
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    rsqrt = jax.lax.rsqrt(var.astype(dtype) + jnp.asarray(epsilon, dtype))
    gamma = jnp.ones((out,), dtype) if scale is None else scale.astype(dtype)
    shift = jnp.zeros((out,), dtype) if beta is None else beta.astype(dtype)
    b = jnp.zeros((out,), dtype) if bias is None else bias.astype(dtype)
    new_kernel = (kernel.astype(dtype) * (gamma * rsqrt)).astype(kernel.dtype)
    new_bias = ((b - mean.astype(dtype)) * rsqrt * gamma + shift).astype(kernel.dtype if bias is None else bias.dtype)
    return new_kernel, new_bias


# ----------------------------------------------------------------------------- linen


def _remove(tree: dict, path: tuple[str, ...]) -> None:
    """Deletes ``tree[path]`` and the dicts it leaves empty."""
    if not path or not isinstance(tree, dict) or path[0] not in tree:
        return
    if len(path) == 1:
        del tree[path[0]]
        return
    _remove(tree[path[0]], path[1:])
    if isinstance(tree[path[0]], dict) and not tree[path[0]]:
        del tree[path[0]]


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
        """``module(*args, **kwargs)`` with the folded BatchNorms as the identity and the folded biases added."""
        layers = frozenset(tuple(p) for p in self.layers)
        norms = frozenset(tuple(p) for p in self.batch_norms)
        with nn.intercept_methods(functools.partial(_run_folded, tuple(self.path), layers, norms)):
            return self.module(*args, **kwargs)


def _run_folded(prefix: tuple, layers: frozenset, norms: frozenset, next_fun: Callable[..., Any], args: tuple,
                kwargs: dict, context: Any) -> Any:
    """:class:`FoldedModel`'s interceptor: folded BatchNorms return their input, bias-less folded layers add one.

    Paths are relative to the :class:`FoldedModel` (``prefix``), so it also works as a submodule.
    """
    module = context.module
    path = tuple(module.path)
    if context.method_name != "__call__" or path[: len(prefix)] != prefix:
        return next_fun(*args, **kwargs)
    path = path[len(prefix):]
    if path in norms and isinstance(module, _LINEN_NORMS):
        if _training(module, args, kwargs):
            raise ValueError(
                f"FoldedModel: BatchNorm '{path_name(path)}' is folded into the layer before it (it runs as the "
                "identity), so it cannot be called in training mode (use_running_average=False); call the "
                "folded model in eval mode (e.g. train=False)."
            )
        if module.has_variable("batch_stats", "mean"):
            raise ValueError(
                f"FoldedModel: the variables hold the batch_stats of BatchNorm '{path_name(path)}', which is folded: "
                "apply the folded model to the folded variables (fold_batch_norm(...).variables), not to the "
                "original ones."
            )
        return args[0] if args else kwargs["x"]
    out = next_fun(*args, **kwargs)
    if path in layers and isinstance(module, _LINEN_LAYERS) and not module.use_bias:
        bias: Any = module.get_variable("params", "bias")
        if bias is None and module.is_initializing():
            raise ValueError(
                f"FoldedModel: cannot init the folded bias of '{path_name(path)}': a folded model only runs the "
                "variables fold_batch_norm folded (fold_batch_norm(...).variables); init the original model."
            )
        if bias is None:
            raise ValueError(
                f"FoldedModel: the variables lack params/{path_name(path)}/bias, the folded bias of '{path_name(path)}' "
                "(built with use_bias=False): apply the folded model to the folded variables "
                "(fold_batch_norm(...).variables), not to the original ones."
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


def _fold_linen(model: nn.Module, variables: Any, args: tuple, kwargs: dict, pairs: Any) -> FoldedLinen:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(
            "fold_batch_norm(linen_model, variables, *args): variables must be the model's variables "
            f"({{'params': ..., 'batch_stats': ...}}), got {type(variables).__name__}"
            + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "") + "."
        )
    if not args:
        raise TypeError("fold_batch_norm(linen_model, variables, *args): pass a sample input after the variables.")
    checked = _check_pairs(pairs)

    def forward(recorder: _Recorder) -> Any:
        def interceptor(next_fun, call_args, call_kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*call_args, **call_kwargs)
            module = context.module
            is_layer, is_norm = isinstance(module, _LINEN_LAYERS), isinstance(module, _LINEN_NORMS)
            kind = "layer" if is_layer else "norm" if is_norm else "other"
            return recorder(module.path, module, kind, call_args, call_kwargs, next_fun)

        with nn.intercept_methods(interceptor):
            return model.apply(variables, *args, **kwargs)

    calls, reached = _trace(forward, "pass the arguments of an eval-mode call (e.g. train=False)")
    wanted = _match(calls, checked)
    _refuse_other_uses(wanted, reached, "what the model returns")

    frozen = isinstance(variables, flax.core.FrozenDict)
    folded: dict[str, Any] = flax.core.unfreeze(variables)  # type: ignore[arg-type]  # a fresh nested dict
    params = folded["params"]
    for layer, norm in wanted:
        lp, np_ = tuple(layer.path), tuple(norm.path)
        layer_params = node_at(params, lp)
        stats = node_at(folded.get("batch_stats", {}), np_)
        if layer_params is None or "kernel" not in layer_params or stats is None:
            raise ValueError(f"fold_batch_norm: variables lack the entries of '{path_name(lp)}' or '{path_name(np_)}'.")
        norm_params = node_at(params, np_) or {}
        kernel, bias = unboxed(layer_params["kernel"]), unboxed(layer_params.get("bias"))
        new_kernel, new_bias = _fold_arrays(
            kernel, bias, unboxed(stats["mean"]), unboxed(stats["var"]), unboxed(norm_params.get("scale")),
            unboxed(norm_params.get("bias")), norm.module.epsilon, path_name(np_),
        )
        layer_params["kernel"] = reboxed(layer_params["kernel"], new_kernel)
        layer_params["bias"] = reboxed(layer_params["bias"], new_bias) if "bias" in layer_params else new_bias
        for name in list(folded):
            _remove(folded[name], np_)
            if name != "params" and not folded[name]:
                del folded[name]
    folded_model = FoldedModel(
        model, layers=tuple(tuple(layer.path) for layer, _ in wanted),
        batch_norms=tuple(tuple(norm.path) for _, norm in wanted),
    )
    return FoldedLinen(folded_model, flax.core.freeze(folded) if frozen else folded)


# ----------------------------------------------------------------------------- nnx


def _child(parent: Any, key: Any) -> Any:
    if isinstance(key, int) or isinstance(parent, Mapping):
        return parent[key]
    return getattr(parent, key)


def _fold_nnx(module: nnx.Module, args: tuple, kwargs: dict, pairs: Any) -> nnx.Module:
    if not args:
        raise TypeError("fold_batch_norm(nnx_module, *args): pass a sample input to call the module with.")
    checked = _check_pairs(pairs)
    model = nnx.clone(module)
    graphdef, state = nnx.split(model)

    def forward(recorder: _Recorder) -> Any:
        traced = nnx.merge(graphdef, state, copy=True)  # new objects: the trace leaves `model` alone

        def record(run, call_args, call_kwargs, path, node):
            kind = "layer" if isinstance(node, _NNX_LAYERS) else "norm" if isinstance(node, _NNX_NORMS) else "other"
            return recorder(path, node, kind, call_args, call_kwargs, run)

        with intercepted_nnx_calls(traced, record, lambda node: True):
            out = traced(*args, **kwargs)
        return out, nnx.state(traced)

    calls, reached = _trace(forward, "call model.eval() first (or pass use_running_average=True)")
    wanted = _match(calls, checked)
    _refuse_other_uses(wanted, reached, "what the module returns or its state")

    modules: dict[tuple, Any] = {tuple(path): m for path, m in nnx.iter_modules(model)}
    for layer_call, norm_call in wanted:
        layer, norm = modules[layer_call.path], modules[norm_call.path]
        new_kernel, new_bias = _fold_arrays(
            layer.kernel[...], None if layer.bias is None else layer.bias[...], norm.mean[...], norm.var[...],
            None if norm.scale is None else norm.scale[...], None if norm.bias is None else norm.bias[...],
            norm.epsilon, path_name(norm_call.path),
        )
        layer.kernel[...] = new_kernel
        if layer.bias is None:
            layer.bias = nnx.Param(new_bias)
            layer.use_bias = True
        else:
            layer.bias[...] = new_bias
        path = norm_call.path
        parent: Any = model
        for key in path[:-1]:
            parent = _child(parent, key)
        key = path[-1]
        try:
            if isinstance(key, int) or isinstance(parent, Mapping):
                parent[key] = FoldedBatchNorm()  # type: ignore[index]  # a list, nnx.List or dict
            else:
                setattr(parent, key, FoldedBatchNorm())
        except (TypeError, AttributeError) as err:
            raise ValueError(
                f"fold_batch_norm: cannot replace BatchNorm '{path_name(path)}' in its container "
                f"{type(parent).__name__} (immutable?): {err}"
            ) from err
    return model


# ----------------------------------------------------------------------------- entry point


def fold_batch_norm(
    model: Any, *args: Any, pairs: Sequence[tuple[Any, Any]] | None = None, **kwargs: Any
) -> Any:
    r"""Folds eval-mode BatchNorms into the ``Conv``/``Dense`` layers whose outputs they normalize.

    Per output feature, :math:`s = \gamma / \sqrt{\mathrm{var} + \epsilon}`,
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

    Returns:
      linen: a :class:`FoldedLinen` ``(model, variables)``, run as
      ``folded.model.apply(folded.variables, ...)``; nnx: a folded copy of the module.

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
            raise TypeError("fold_batch_norm(linen_model, variables, *args): the variables are missing.")
        return _fold_linen(model, args[0], args[1:], kwargs, pairs)
    if isinstance(model, nnx.Module):
        return _fold_nnx(model, args, kwargs, pairs)
    raise TypeError(
        f"fold_batch_norm: model must be a flax.linen.Module (with its variables) or a flax.nnx.Module, "
        f"got {type(model).__name__}."
    )
