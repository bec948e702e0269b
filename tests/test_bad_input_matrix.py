"""Bad-input matrix: every public function and module against every class of bad input, in one table.

Each row is ``(bad call, exception type, regex)``; the regex must match the
message and names the argument and the value it got (its shape or dtype for
arrays). A functional row (:func:`call`) runs eagerly and is also traced with
``jax.jit(...).trace`` (its array arguments, masks included, become tracers):
the error must come at trace time, before anything is computed. Rows built
by :func:`traced` exist only under ``jit`` (a hyperparameter that is itself a
tracer). Module and tool rows are plain callables.

``docs/errors.md`` lists the same errors by class, with messages copied from
these rows. The classes are the ones jaxbn promises clear errors for:

rank, axis, duplicate_axes, dtype (int/bool input, non-float dtype
arguments), complex (where unsupported), epsilon, momentum (and renorm's
limits, other hyperparameters), static (Python-bool switches of another type),
traced (hyperparameters traced under jit), params_state (shape, dtype or keys),
other_layer (a state or variables from another layer), mask, divide (ghost
batch sizes, groups), zero_size, axis_name (unbound names, groups),
batch_stats (missing or immutable), tools (arguments of recalibrate,
fold_batch_norm, inspect_batch_norms and jaxbn.interop.torch).

A second test checks what docs/errors.md lists as *not* an error (a zero-size
batch without batch statistics, traced scalar hyperparameters, ...).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, NamedTuple

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen as L
import jaxbn.nnx as N
from jaxbn.interop import torch as T

X = jnp.arange(12.0, dtype=jnp.float32).reshape(4, 3)  # (batch, features)
X4 = jnp.arange(32.0, dtype=jnp.float32).reshape(2, 2, 2, 4)  # NHWC for the per-example norms
PARAMS, STATE = jaxbn.batch_norm_init(3)
CUMULATIVE = jaxbn.batch_norm_init(3, cumulative=True)[1]
MOMENTS = jaxbn.moments(X, 0)
KEY = jax.random.key(0)
NAN, INF = float("nan"), float("inf")


class Call(NamedTuple):
    """A call of a jaxbn function: run eagerly, and traced under ``jax.jit`` with its arrays as tracers."""

    fn: Any
    args: tuple
    kwargs: dict
    jit_only: bool = False


def call(fn, *args, **kwargs) -> Call:
    return Call(fn, args, kwargs)


def traced(fn, *args, **kwargs) -> Call:
    """Only under ``jit``: every array argument, hyperparameters given as arrays included, is a tracer."""
    return Call(fn, args, kwargs, jit_only=True)


def _is_arrays(value):
    """True for an array or a container of arrays (params, state): traced under jit; anything else is static."""
    leaves = jax.tree.leaves(value)
    return bool(leaves) and all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)


def _trace(c: Call) -> None:
    """``c`` traced by ``jax.jit``: its array arguments (positional or keyword) are tracers, the rest static."""
    traced_at = [i for i, arg in enumerate(c.args) if _is_arrays(arg) or c.jit_only]
    kwargs = {k: v for k, v in c.kwargs.items() if _is_arrays(v)}
    static = {k: v for k, v in c.kwargs.items() if k not in kwargs}

    def fn(traced_args, kwargs):
        args = list(c.args)
        for i, arg in zip(traced_at, traced_args):
            args[i] = arg
        return c.fn(*args, **static, **kwargs)

    jax.jit(fn).trace([c.args[i] for i in traced_at], kwargs)


ROWS: list = []
COUNTS: collections.Counter = collections.Counter()


def row(kind: str, name: str, build: Any, error: type, match: str) -> None:
    COUNTS[kind] += 1
    ROWS.append(pytest.param(build, error, match, id=f"{kind}-{name}"))


def linen_train(module, x=X, **kwargs):
    """``module`` applied in training with fresh variables from ``init`` on ``x``."""
    return lambda: module.apply(module.init(KEY, x), x, mutable=["batch_stats"], **kwargs)


def nnx_call(make, x=X, **kwargs):
    return lambda: make()(x, **kwargs)


R = lambda: nnx.Rngs(0)  # noqa: E731
BN = functools.partial(jaxbn.batch_norm, training=True)
BRN = functools.partial(jaxbn.batch_renorm, training=True, r_max=3.0, d_max=5.0)
LBN = functools.partial(L.BatchNorm, use_running_average=False)
LBRN = functools.partial(L.BatchRenorm, use_running_average=False)
PER_EXAMPLE = {  # name: function, its keyword defaults, linen class, nnx constructor, class name
    "layer_norm": (
        jaxbn.layer_norm,
        {},
        L.LayerNorm,
        lambda **k: N.LayerNorm(4, rngs=R(), **k),
        "LayerNorm",
    ),
    "rms_norm": (jaxbn.rms_norm, {}, L.RMSNorm, lambda **k: N.RMSNorm(4, rngs=R(), **k), "RMSNorm"),
    "group_norm": (
        jaxbn.group_norm,
        {"num_groups": 2},
        functools.partial(L.GroupNorm, num_groups=2),
        lambda **k: N.GroupNorm(4, num_groups=2, rngs=R(), **k),
        "GroupNorm",
    ),
    "instance_norm": (
        jaxbn.instance_norm,
        {},
        L.InstanceNorm,
        lambda **k: N.InstanceNorm(4, rngs=R(), **k),
        "InstanceNorm",
    ),
}

# -- rank: an input without axes (or, for instance norm, without a batch axis) ----------------------------------
ZERO_D = jnp.float32(1.0)
RANK = r"at least one axis, got a 0-d \(scalar\) input x of shape \(\)"
row(
    "rank",
    "batch_norm",
    call(BN, ZERO_D, {}, {"mean": jnp.zeros(()), "var": jnp.ones(())}),
    ValueError,
    RANK,
)
row(
    "rank",
    "normalize",
    call(jaxbn.normalize, ZERO_D, jnp.zeros(()), jnp.ones(())),
    ValueError,
    RANK,
)
row(
    "rank",
    "batch_renorm",
    call(BRN, ZERO_D, {}, {"mean": jnp.zeros(()), "var": jnp.ones(())}),
    ValueError,
    RANK,
)
row("rank", "moments", call(jaxbn.moments, ZERO_D, ()), ValueError, RANK)
for name, (fn, kw, linen_cls, nnx_make, cls) in PER_EXAMPLE.items():
    row("rank", name, call(fn, ZERO_D, **kw), ValueError, RANK)
    row("rank", f"linen.{cls}", lambda c=linen_cls: c().init(KEY, ZERO_D), ValueError, RANK)
    row("rank", f"nnx.{cls}", nnx_call(nnx_make, ZERO_D), ValueError, RANK)
row(
    "rank",
    "instance_norm_no_batch_axis",
    call(jaxbn.instance_norm, jnp.ones(4)),
    ValueError,
    r"feature_axes=-1 includes axis 0, .* batch axis \(input shape \(4,\)\)",
)
row("rank", "linen.BatchNorm", lambda: LBN().init(KEY, ZERO_D), ValueError, RANK)
row("rank", "linen.BatchRenorm", lambda: LBRN().init(KEY, ZERO_D), ValueError, RANK)
row("rank", "nnx.BatchNorm", nnx_call(lambda: N.BatchNorm(1, rngs=R()), ZERO_D), ValueError, RANK)
row(
    "rank",
    "nnx.BatchRenorm",
    nnx_call(lambda: N.BatchRenorm(1, rngs=R()), ZERO_D),
    ValueError,
    RANK,
)

# -- axis out of range -------------------------------------------------------------------------------------------
AXIS = r"{}={} is out of range for an input with {} dimensions"
row("axis", "batch_norm", call(BN, X, PARAMS, STATE, axis=2), ValueError, AXIS.format("axis", 2, 2))
row(
    "axis",
    "normalize",
    call(jaxbn.normalize, X, STATE["mean"], STATE["var"], axis=-3),
    ValueError,
    AXIS.format("axis", -3, 2),
)
row(
    "axis",
    "batch_renorm",
    call(BRN, X, PARAMS, STATE, axis=(5,)),
    ValueError,
    AXIS.format("axis", r"\(5,\)", 2),
)
row("axis", "moments", call(jaxbn.moments, X, 2), ValueError, AXIS.format("axes", 2, 2))
row(
    "axis",
    "layer_norm_reduction",
    call(jaxbn.layer_norm, X4, reduction_axes=4),
    ValueError,
    AXIS.format("reduction_axes", 4, 4),
)
row(
    "axis",
    "layer_norm_feature",
    call(jaxbn.layer_norm, X4, feature_axes=-5),
    ValueError,
    AXIS.format("feature_axes", -5, 4),
)
row(
    "axis",
    "rms_norm",
    call(jaxbn.rms_norm, X4, reduction_axes=(1, 9)),
    ValueError,
    AXIS.format("reduction_axes", r"\(1, 9\)", 4),
)
row(
    "axis",
    "group_norm",
    call(jaxbn.group_norm, X4, num_groups=2, reduction_axes=5),
    ValueError,
    AXIS.format("reduction_axes", 5, 4),
)
row(
    "axis",
    "group_norm_without_channels",
    call(jaxbn.group_norm, X4, num_groups=2, reduction_axes=(1, 2)),
    ValueError,
    r"reduction_axes=\(1, 2\) must include the last axis \(3, or -1\)",
)
row(
    "axis",
    "instance_norm",
    call(jaxbn.instance_norm, X4, feature_axes=4),
    ValueError,
    AXIS.format("feature_axes", 4, 4),
)
row(
    "axis",
    "linen.BatchNorm",
    lambda: LBN(axis=2).init(KEY, X),
    ValueError,
    AXIS.format("axis", 2, 2),
)
row(
    "axis",
    "linen.BatchRenorm",
    lambda: LBRN(axis=-3).init(KEY, X),
    ValueError,
    AXIS.format("axis", -3, 2),
)
row(
    "axis",
    "linen.LayerNorm",
    lambda: L.LayerNorm(reduction_axes=4).init(KEY, X4),
    ValueError,
    AXIS.format("reduction_axes", 4, 4),
)
row(
    "axis",
    "linen.RMSNorm",
    lambda: L.RMSNorm(feature_axes=4).init(KEY, X4),
    ValueError,
    AXIS.format("feature_axes", 4, 4),
)
row(
    "axis",
    "linen.GroupNorm",
    lambda: L.GroupNorm(num_groups=2, reduction_axes=7).init(KEY, X4),
    ValueError,
    AXIS.format("reduction_axes", 7, 4),
)
row(
    "axis",
    "linen.InstanceNorm",
    lambda: L.InstanceNorm(feature_axes=-5).init(KEY, X4),
    ValueError,
    AXIS.format("feature_axes", -5, 4),
)
row(
    "axis",
    "nnx.BatchNorm",
    nnx_call(lambda: N.BatchNorm(3, axis=2, rngs=R())),
    ValueError,
    AXIS.format("axis", 2, 2),
)
row(
    "axis",
    "nnx.BatchRenorm",
    nnx_call(lambda: N.BatchRenorm(3, axis=-3, rngs=R())),
    ValueError,
    AXIS.format("axis", -3, 2),
)
row(
    "axis",
    "nnx.LayerNorm",
    nnx_call(lambda: N.LayerNorm(4, reduction_axes=4, rngs=R()), X4),
    ValueError,
    AXIS.format("reduction_axes", 4, 4),
)
row(
    "axis",
    "nnx.RMSNorm",
    nnx_call(lambda: N.RMSNorm(4, feature_axes=4, rngs=R()), X4),
    ValueError,
    AXIS.format("feature_axes", 4, 4),
)
row(
    "axis",
    "nnx.GroupNorm",
    nnx_call(lambda: N.GroupNorm(4, num_groups=2, reduction_axes=7, rngs=R()), X4),
    ValueError,
    AXIS.format("reduction_axes", 7, 4),
)
row(
    "axis",
    "nnx.InstanceNorm",
    nnx_call(lambda: N.InstanceNorm(4, feature_axes=-5, rngs=R()), X4),
    ValueError,
    AXIS.format("feature_axes", -5, 4),
)
row(
    "axis",
    "axis_not_an_int",
    call(BN, X, PARAMS, STATE, axis=1.0),
    TypeError,
    r"axis must be an int or a sequence of ints, got 1\.0",
)
row(
    "axis",
    "moments_axes_not_an_int",
    call(jaxbn.moments, X, 0.5),
    TypeError,
    r"axes must be an int or a sequence of ints, got 0\.5",
)

# -- duplicate axes ----------------------------------------------------------------------------------------------
TWICE = r"{}={} names the same axis twice"
row(
    "duplicate_axes",
    "batch_norm",
    call(BN, X, {}, {"mean": jnp.zeros((4, 3)), "var": jnp.ones((4, 3))}, axis=(1, -1)),
    ValueError,
    TWICE.format("axis", r"\(1, -1\)"),
)
row(
    "duplicate_axes",
    "normalize",
    call(jaxbn.normalize, X, STATE["mean"], STATE["var"], axis=(-1, 1)),
    ValueError,
    TWICE.format("axis", r"\(-1, 1\)"),
)
row(
    "duplicate_axes",
    "batch_renorm",
    call(BRN, X, PARAMS, STATE, axis=(1, 1)),
    ValueError,
    TWICE.format("axis", r"\(1, 1\)"),
)
row(
    "duplicate_axes",
    "moments",
    call(jaxbn.moments, X, (0, -2)),
    ValueError,
    TWICE.format("axes", r"\(0, -2\)"),
)
row(
    "duplicate_axes",
    "layer_norm",
    call(jaxbn.layer_norm, X4, reduction_axes=(1, -3)),
    ValueError,
    TWICE.format("reduction_axes", r"\(1, -3\)"),
)
row(
    "duplicate_axes",
    "rms_norm",
    call(jaxbn.rms_norm, X4, feature_axes=(3, 3)),
    ValueError,
    TWICE.format("feature_axes", r"\(3, 3\)"),
)
row(
    "duplicate_axes",
    "group_norm",
    call(jaxbn.group_norm, X4, num_groups=2, reduction_axes=(3, -1)),
    ValueError,
    TWICE.format("reduction_axes", r"\(3, -1\)"),
)
row(
    "duplicate_axes",
    "instance_norm",
    call(jaxbn.instance_norm, X4, feature_axes=(-1, 3)),
    ValueError,
    TWICE.format("feature_axes", r"\(-1, 3\)"),
)
row(
    "duplicate_axes",
    "linen.BatchNorm",
    lambda: LBN(axis=(1, -1)).init(KEY, X),
    ValueError,
    TWICE.format("axis", r"\(1, -1\)"),
)
row(
    "duplicate_axes",
    "linen.LayerNorm",
    lambda: L.LayerNorm(feature_axes=(3, -1)).init(KEY, X4),
    ValueError,
    TWICE.format("feature_axes", r"\(3, -1\)"),
)
row(
    "duplicate_axes",
    "linen.RMSNorm",
    lambda: L.RMSNorm(reduction_axes=(2, -2)).init(KEY, X4),
    ValueError,
    TWICE.format("reduction_axes", r"\(2, -2\)"),
)
row(
    "duplicate_axes",
    "linen.GroupNorm",
    lambda: L.GroupNorm(num_groups=2, reduction_axes=(3, -1)).init(KEY, X4),
    ValueError,
    TWICE.format("reduction_axes", r"\(3, -1\)"),
)
row(
    "duplicate_axes",
    "linen.InstanceNorm",
    lambda: L.InstanceNorm(feature_axes=(3, -1)).init(KEY, X4),
    ValueError,
    TWICE.format("feature_axes", r"\(3, -1\)"),
)
row(
    "duplicate_axes",
    "linen.BatchRenorm",
    lambda: LBRN(axis=(0, -2)).init(KEY, X),
    ValueError,
    TWICE.format("axis", r"\(0, -2\)"),
)
row(
    "duplicate_axes",
    "nnx.BatchNorm",
    nnx_call(lambda: N.BatchNorm(3, axis=(1, -1), rngs=R())),
    ValueError,
    TWICE.format("axis", r"\(1, -1\)"),
)
row(
    "duplicate_axes",
    "nnx.LayerNorm",
    nnx_call(lambda: N.LayerNorm(4, feature_axes=(3, -1), rngs=R()), X4),
    ValueError,
    TWICE.format("feature_axes", r"\(3, -1\)"),
)
row(
    "duplicate_axes",
    "nnx.InstanceNorm",
    nnx_call(lambda: N.InstanceNorm(4, feature_axes=(3, -1), rngs=R()), X4),
    ValueError,
    TWICE.format("feature_axes", r"\(3, -1\)"),
)
row(
    "duplicate_axes",
    "nnx.BatchRenorm",
    nnx_call(lambda: N.BatchRenorm(3, axis=(0, 0), rngs=R())),
    ValueError,
    TWICE.format("axis", r"\(0, 0\)"),
)
row(
    "duplicate_axes",
    "nnx.RMSNorm",
    nnx_call(lambda: N.RMSNorm(4, reduction_axes=(1, 1), rngs=R()), X4),
    ValueError,
    TWICE.format("reduction_axes", r"\(1, 1\)"),
)
row(
    "duplicate_axes",
    "nnx.GroupNorm",
    nnx_call(lambda: N.GroupNorm(4, num_groups=2, reduction_axes=(-1, 3), rngs=R()), X4),
    ValueError,
    TWICE.format("reduction_axes", r"\(-1, 3\)"),
)

# -- dtype: integer or boolean input, non-floating dtype arguments -----------------------------------------------
INT = r"x must have a floating dtype .* got {}\. Cast it first"
XI, XB = X.astype(jnp.int32), X.astype(bool)
row("dtype", "batch_norm_int", call(BN, XI, PARAMS, STATE), TypeError, INT.format("int32"))
row("dtype", "batch_norm_bool", call(BN, XB, PARAMS, STATE), TypeError, INT.format("bool"))
row(
    "dtype",
    "normalize",
    call(jaxbn.normalize, XI, STATE["mean"], STATE["var"]),
    TypeError,
    INT.format("int32"),
)
row("dtype", "batch_renorm", call(BRN, XB, PARAMS, STATE), TypeError, INT.format("bool"))
row("dtype", "moments", call(jaxbn.moments, XI, 0), TypeError, INT.format("int32"))
row("dtype", "moments_bool", call(jaxbn.moments, XB, 0), TypeError, INT.format("bool"))
for name, (fn, kw, linen_cls, nnx_make, cls) in PER_EXAMPLE.items():
    row("dtype", name, call(fn, X4.astype(jnp.int8), **kw), TypeError, INT.format("int8"))
    row(
        "dtype",
        f"linen.{cls}",
        lambda c=linen_cls: c().init(KEY, X4.astype(bool)),
        TypeError,
        INT.format("bool"),
    )
    row(
        "dtype",
        f"nnx.{cls}",
        nnx_call(nnx_make, X4.astype(jnp.int32)),
        TypeError,
        INT.format("int32"),
    )
row("dtype", "linen.BatchNorm", lambda: LBN().init(KEY, XI), TypeError, INT.format("int32"))
row("dtype", "linen.BatchRenorm", lambda: LBRN().init(KEY, XB), TypeError, INT.format("bool"))
row(
    "dtype",
    "nnx.BatchNorm",
    nnx_call(lambda: N.BatchNorm(3, rngs=R()), XB),
    TypeError,
    INT.format("bool"),
)
row(
    "dtype",
    "nnx.BatchRenorm",
    nnx_call(lambda: N.BatchRenorm(3, rngs=R()), XI),
    TypeError,
    INT.format("int32"),
)
row(
    "dtype",
    "batch_norm_dtype",
    call(BN, X, PARAMS, STATE, dtype=jnp.int32),
    TypeError,
    r"dtype must be a floating dtype or None, got int32",
)
row(
    "dtype",
    "layer_norm_dtype",
    call(jaxbn.layer_norm, X4, dtype=jnp.bool_),
    TypeError,
    r"dtype must be a floating dtype or None, got bool",
)
row(
    "dtype",
    "moments_dtype",
    call(jaxbn.moments, X, 0, dtype=jnp.int16),
    TypeError,
    r"dtype must be a floating dtype or None, got int16",
)
row(
    "dtype",
    "batch_norm_init",
    lambda: jaxbn.batch_norm_init(3, dtype=jnp.int32),
    TypeError,
    r"dtype must be a floating or complex dtype or None, got int32",
)
row(
    "dtype",
    "nnx.BatchNorm_dtype",
    lambda: N.BatchNorm(3, dtype=jnp.int32, rngs=R()),
    TypeError,
    r"dtype must be a floating dtype or None, got int32",
)

# -- complex input where it is not supported (and complex state where a real one is needed) ----------------------
Z = X.astype(jnp.complex64)
COMPLEX = r"x must have a real floating dtype here, got complex64"
row("complex", "batch_renorm", call(BRN, Z, PARAMS, STATE), TypeError, COMPLEX)
row("complex", "linen.BatchRenorm", lambda: LBRN().init(KEY, Z), TypeError, COMPLEX)
row(
    "complex",
    "nnx.BatchRenorm",
    nnx_call(lambda: N.BatchRenorm(3, rngs=R()), Z),
    TypeError,
    COMPLEX,
)
row(
    "complex",
    "batch_norm_real_state",
    call(BN, Z, PARAMS, STATE),
    TypeError,
    r"the input is complex64 but state\['mean'\] is float32",
)
row(
    "complex",
    "batch_norm_real_dtype",
    call(jaxbn.batch_norm, Z, PARAMS, STATE, training=False, dtype=jnp.float32),
    TypeError,
    r"dtype=float32 is real, but the input is complex64",
)
row(
    "complex",
    "batch_norm_complex_var",
    call(BN, X, PARAMS, {"mean": STATE["mean"], "var": STATE["var"] + 0j}),
    TypeError,
    r"state\['var'\] must be real .* got complex64",
)
row(
    "complex",
    "normalize_complex_var",
    call(jaxbn.normalize, X, STATE["mean"], STATE["var"] + 0j),
    TypeError,
    r"var must be real .* got complex64",
)
row(
    "complex",
    "layer_norm_real_dtype",
    call(jaxbn.layer_norm, Z, dtype=jnp.float32),
    TypeError,
    r"dtype=float32 is real, but the input is complex64",
)

# -- epsilon: NaN, negative, zero, infinite, underflowing, not a number ------------------------------------------
EPS = r"epsilon must be a finite number > 0 in the float32 .* got {}"
EPSILONS = [(NAN, "nan"), (-1e-3, r"-0\.001"), (0.0, r"0\.0"), (INF, "inf"), (1e-50, "1e-50")]
for i, (name, fn) in enumerate([("batch_norm", BN), ("batch_renorm", BRN)]):
    for value, shown in EPSILONS:
        row(
            "epsilon",
            f"{name}_{shown}",
            call(fn, X, PARAMS, STATE, epsilon=value),
            ValueError,
            EPS.format(shown),
        )
row(
    "epsilon",
    "normalize",
    call(jaxbn.normalize, X, STATE["mean"], STATE["var"], epsilon=0),
    ValueError,
    EPS.format("0"),
)
for i, (name, (fn, kw, linen_cls, nnx_make, cls)) in enumerate(PER_EXAMPLE.items()):
    value, shown = EPSILONS[i % len(EPSILONS)]
    row("epsilon", name, call(fn, X4, epsilon=value, **kw), ValueError, EPS.format(shown))
    value, shown = EPSILONS[(i + 1) % len(EPSILONS)]
    row(
        "epsilon",
        f"linen.{cls}",
        lambda c=linen_cls, v=value: c(epsilon=v).init(KEY, X4),
        ValueError,
        EPS.format(shown),
    )
    value, shown = EPSILONS[(i + 2) % len(EPSILONS)]
    row(
        "epsilon",
        f"nnx.{cls}",
        lambda m=nnx_make, v=value: m(epsilon=v),
        ValueError,
        EPS.format(shown),
    )
row(
    "epsilon",
    "linen.BatchNorm",
    lambda: LBN(epsilon=-1.0).init(KEY, X),
    ValueError,
    EPS.format(r"-1\.0"),
)
row(
    "epsilon",
    "linen.BatchRenorm",
    lambda: LBRN(epsilon=NAN).init(KEY, X),
    ValueError,
    EPS.format("nan"),
)
row(
    "epsilon",
    "nnx.BatchNorm",
    lambda: N.BatchNorm(3, epsilon=0.0, rngs=R()),
    ValueError,
    EPS.format(r"0\.0"),
)
row(
    "epsilon",
    "nnx.BatchRenorm",
    lambda: N.BatchRenorm(3, epsilon=INF, rngs=R()),
    ValueError,
    EPS.format("inf"),
)
row(
    "epsilon",
    "batch_norm_overflow",
    call(jaxbn.batch_norm, X, PARAMS, STATE, training=False, epsilon=1e39),
    ValueError,
    EPS.format("1e[+]?39"),
)
row(
    "epsilon",
    "batch_norm_str",
    call(BN, X, PARAMS, STATE, epsilon="1e-5"),
    TypeError,
    r"epsilon must be a positive real number, got '1e-5' of type str",
)
row(
    "epsilon",
    "layer_norm_list",
    call(jaxbn.layer_norm, X4, epsilon=[1e-5]),
    TypeError,
    r"epsilon must be a positive real number, got \[1e-05\] of type list",
)

# -- momentum (and renorm's limits, the schedule, feature counts) ------------------------------------------------
MOM = r"momentum must lie in \[0, 1\], got {}"
for name, fn in [("batch_norm", BN), ("batch_renorm", BRN)]:
    for value, shown in [(NAN, "nan"), (-0.1, r"-0\.1"), (1.5, r"1\.5")]:
        row(
            "momentum",
            f"{name}_{shown}",
            call(fn, X, PARAMS, STATE, momentum=value),
            ValueError,
            MOM.format(shown),
        )
row(
    "momentum",
    "batch_norm_str",
    call(BN, X, PARAMS, STATE, momentum="0.9"),
    TypeError,
    r"momentum must be a real number in \[0, 1\], got '0\.9' of type str",
)
row(
    "momentum",
    "batch_norm_bool",
    call(BN, X, PARAMS, STATE, momentum=True),
    TypeError,
    r"momentum must be a real number in \[0, 1\], got True of type bool",
)
row(
    "momentum",
    "update_running_stats",
    call(jaxbn.update_running_stats, STATE, MOMENTS, momentum=2.0),
    ValueError,
    MOM.format(r"2\.0"),
)
row(
    "momentum",
    "linen.BatchNorm",
    lambda: LBN(momentum=1.5).init(KEY, X),
    ValueError,
    MOM.format(r"1\.5"),
)
row(
    "momentum",
    "linen.BatchRenorm",
    lambda: LBRN(momentum=-0.5).init(KEY, X),
    ValueError,
    MOM.format(r"-0\.5"),
)
row(
    "momentum",
    "nnx.BatchNorm",
    lambda: N.BatchNorm(3, momentum=NAN, rngs=R()),
    ValueError,
    MOM.format("nan"),
)
row(
    "momentum",
    "nnx.BatchRenorm",
    lambda: N.BatchRenorm(3, momentum=1.01, rngs=R()),
    ValueError,
    MOM.format(r"1\.01"),
)
row(
    "momentum",
    "interop.momentum_from_torch",
    lambda: T.momentum_from_torch(1.5),
    ValueError,
    r"momentum \(PyTorch's\) must be in \[0, 1\] or None, got 1\.5",
)
row(
    "momentum",
    "interop.momentum_to_torch",
    lambda: T.momentum_to_torch(NAN),
    ValueError,
    r"momentum \(Flax's\) must be in \[0, 1\] or None, got nan",
)
row(
    "momentum",
    "batch_renorm_r_max",
    call(BRN, X, PARAMS, STATE, r_max=0.5),
    ValueError,
    r"r_max must be a real scalar >= 1 .* got 0\.5",
)
row(
    "momentum",
    "batch_renorm_d_max",
    call(BRN, X, PARAMS, STATE, d_max=NAN),
    ValueError,
    r"d_max must be a real scalar >= 0 .* got nan",
)
row(
    "momentum",
    "batch_renorm_r_max_str",
    call(BRN, X, PARAMS, STATE, r_max="3"),
    TypeError,
    r"r_max must be a real scalar >= 1 .* got '3' of type str",
)
row(
    "momentum",
    "linen.BatchRenorm_r_max",
    linen_train(LBRN(r_max=0.5)),
    ValueError,
    r"r_max must be a real scalar >= 1 .* got 0\.5",
)
row(
    "momentum",
    "linen.BatchRenorm_scheduled",
    linen_train(LBRN(d_max=lambda step: -1.0)),
    ValueError,
    r"d_max must be a real scalar >= 0 .* got -1\.0",
)
row(
    "momentum",
    "nnx.BatchRenorm_r_max",
    lambda: N.BatchRenorm(3, r_max=0.9, rngs=R()),
    ValueError,
    r"r_max must be a real scalar >= 1 .* got 0\.9",
)
row(
    "momentum",
    "renorm_clipping_r_max",
    lambda: jaxbn.renorm_clipping(0, r_max=0.5),
    ValueError,
    r"renorm_clipping's r_max must be a finite Python number >= 1, got 0\.5",
)
row(
    "momentum",
    "renorm_clipping_warmup",
    lambda: jaxbn.renorm_clipping(0, warmup_steps=-1),
    ValueError,
    r"warmup_steps must be a non-negative Python int, got -1",
)
row(
    "momentum",
    "renorm_clipping_order",
    lambda: jaxbn.renorm_clipping(0, r_max_steps=10),
    ValueError,
    r"r_max_steps=10 is before warmup_steps=5000",
)
row(
    "momentum",
    "renorm_clipping_step",
    lambda: jaxbn.renorm_clipping("10"),
    TypeError,
    r"step must be an integer or float scalar or array, got '10'",
)
row(
    "momentum",
    "renorm_clipping_complex_step",
    lambda: jaxbn.renorm_clipping(1j),
    TypeError,
    r"step must be an integer or float scalar or array, got 1j of dtype complex64",
)
row(
    "momentum",
    "batch_norm_init",
    lambda: jaxbn.batch_norm_init(0),
    ValueError,
    r"num_features must be a positive int, got 0",
)
row(
    "momentum",
    "batch_norm_init_float",
    lambda: jaxbn.batch_norm_init(3.0),
    TypeError,
    r"num_features must be a positive int, got 3\.0 of type float",
)
row(
    "momentum",
    "batch_norm_init_empty",
    lambda: jaxbn.batch_norm_init(()),
    ValueError,
    r"num_features must be a positive int or a non-empty tuple of them, got \(\)",
)
row(
    "momentum",
    "nnx.BatchNorm_num_features",
    lambda: N.BatchNorm(-3, rngs=R()),
    ValueError,
    r"BatchNorm: num_features must be a positive int, got -3",
)
row(
    "momentum",
    "nnx.LayerNorm_num_features",
    lambda: N.LayerNorm(True, rngs=R()),
    TypeError,
    r"LayerNorm: num_features must be a positive int, got True",
)

# -- static switches that are not Python bools -------------------------------------------------------------------
row(
    "static",
    "batch_norm_training",
    call(jaxbn.batch_norm, X, PARAMS, STATE, training=1),
    TypeError,
    r"training must be a Python bool, got 1\.",
)
row(
    "static",
    "batch_norm_update",
    call(BN, X, PARAMS, STATE, update_running_stats="yes"),
    TypeError,
    r"update_running_stats must be a Python bool or None, got 'yes'",
)
row(
    "static",
    "batch_norm_unbiased",
    call(BN, X, PARAMS, STATE, unbiased_running_var=0),
    TypeError,
    r"unbiased_running_var must be a Python bool, got 0\.",
)
row(
    "static",
    "batch_renorm_return_moments",
    call(BRN, X, PARAMS, STATE, return_moments=None),
    TypeError,
    r"return_moments must be a Python bool, got None",
)
row(
    "static",
    "update_running_stats",
    call(jaxbn.update_running_stats, STATE, MOMENTS, unbiased_running_var="no"),
    TypeError,
    r"unbiased_running_var must be a Python bool, got 'no'",
)
row(
    "static",
    "nnx.BatchNorm",
    lambda: N.BatchNorm(3, update_running_stats=1, rngs=R()),
    TypeError,
    r"update_running_stats must be a Python bool or None, got 1\.",
)

# -- traced hyperparameters: those that select code must be static, the others real scalars ----------------------
SELECTS = r"{} must be a Python bool.* got JitTracer"
SCALAR = r"{} must be .* got a traced array of shape {} and dtype float32"
row(
    "traced",
    "batch_norm_training",
    traced(lambda x, t: jaxbn.batch_norm(x, PARAMS, STATE, training=t), X, True),
    TypeError,
    SELECTS.format("training"),
)
row(
    "traced",
    "batch_norm_update",
    traced(lambda x, u: BN(x, PARAMS, STATE, update_running_stats=u), X, True),
    TypeError,
    SELECTS.format("update_running_stats"),
)
row(
    "traced",
    "batch_norm_axis",
    traced(lambda x, a: BN(x, PARAMS, STATE, axis=a), X, -1),
    TypeError,
    r"axis must be an int or a sequence of ints, got JitTracer",
)
row(
    "traced",
    "batch_norm_ghost",
    traced(lambda x, g: BN(x, PARAMS, STATE, ghost_batch_size=g), X, 2),
    TypeError,
    r"ghost_batch_size must be a positive int or None, got JitTracer",
)
row(
    "traced",
    "batch_norm_momentum_array",
    traced(BN, X, PARAMS, STATE, momentum=jnp.full(3, 0.9)),
    TypeError,
    SCALAR.format("momentum", r"\(3,\)"),
)
row(
    "traced",
    "batch_norm_epsilon_array",
    traced(BN, X, PARAMS, STATE, epsilon=jnp.full((2, 3), 1e-3)),
    TypeError,
    SCALAR.format("epsilon", r"\(2, 3\)"),
)
row(
    "traced",
    "batch_norm_momentum_bool",
    traced(BN, X, PARAMS, STATE, momentum=jnp.bool_(True)),
    TypeError,
    r"momentum must be .* got a traced array of shape \(\) and dtype bool",
)
row(
    "traced",
    "normalize_epsilon",
    traced(jaxbn.normalize, X, STATE["mean"], STATE["var"], epsilon=jnp.ones(3)),
    TypeError,
    SCALAR.format("epsilon", r"\(3,\)"),
)
row(
    "traced",
    "batch_renorm_training",
    traced(lambda x, t: BRN(x, PARAMS, STATE, training=t), X, False),
    TypeError,
    SELECTS.format("training"),
)
row(
    "traced",
    "batch_renorm_r_max",
    traced(BRN, X, PARAMS, STATE, r_max=jnp.ones(3)),
    TypeError,
    r"r_max must be a real scalar >= 1 .* got a traced array of shape \(3,\)",
)
row(
    "traced",
    "update_running_stats_momentum",
    traced(jaxbn.update_running_stats, STATE, MOMENTS, momentum=jnp.full((2, 3), 0.9)),
    TypeError,
    SCALAR.format("momentum", r"\(2, 3\)"),
)
row(
    "traced",
    "moments_axes",
    traced(lambda x, a: jaxbn.moments(x, a), X, 0),
    TypeError,
    r"axes must be an int or a sequence of ints, got JitTracer",
)
row(
    "traced",
    "layer_norm_axes",
    traced(lambda x, a: jaxbn.layer_norm(x, reduction_axes=a), X4, -1),
    TypeError,
    r"reduction_axes must be an int or a sequence of ints, got JitTracer",
)
row(
    "traced",
    "rms_norm_epsilon",
    traced(jaxbn.rms_norm, X4, epsilon=jnp.ones(4)),
    TypeError,
    SCALAR.format("epsilon", r"\(4,\)"),
)
row(
    "traced",
    "group_norm_groups",
    traced(lambda x, g: jaxbn.group_norm(x, num_groups=g), X4, 2),
    TypeError,
    r"num_groups must be a positive int or None, got JitTracer",
)
row(
    "traced",
    "instance_norm_axes",
    traced(lambda x, a: jaxbn.instance_norm(x, feature_axes=a), X4, -1),
    TypeError,
    r"feature_axes must be an int or a sequence of ints, got JitTracer",
)
row(
    "traced",
    "batch_norm_init",
    traced(lambda n: jaxbn.batch_norm_init(n), 3),
    TypeError,
    r"num_features must be a positive int, got JitTracer",
)
row(
    "traced",
    "renorm_clipping",
    traced(lambda w: jaxbn.renorm_clipping(0, warmup_steps=w), 5),
    ValueError,
    r"warmup_steps must be a non-negative Python int, got JitTracer",
)
row(
    "traced",
    "linen.BatchNorm",
    lambda: jax.jit(
        lambda t: L.BatchNorm().apply(
            L.BatchNorm().init(KEY, X, True), X, t, mutable=["batch_stats"]
        )
    )(True),
    TypeError,
    r"use_running_average must be a Python bool \(or None\), got a traced value",
)
row(
    "traced",
    "linen.BatchNorm_momentum",
    lambda: jax.jit(lambda m: linen_train(LBN(momentum=m))())(jnp.ones(3)),
    TypeError,
    SCALAR.format("momentum", r"\(3,\)"),
)
row(
    "traced",
    "nnx.BatchNorm",
    lambda: jax.jit(lambda t: N.BatchNorm(3, rngs=R())(X, t))(True),
    TypeError,
    r"use_running_average must be a Python bool \(or None\), got a traced value",
)
row(
    "traced",
    "linen.BatchRenorm",
    lambda: jax.jit(
        lambda t: L.BatchRenorm().apply(
            L.BatchRenorm().init(KEY, X, True), X, use_running_average=t, mutable=["batch_stats"]
        )
    )(False),
    TypeError,
    r"use_running_average must be a Python bool \(or None\), got a traced value",
)
row(
    "traced",
    "nnx.BatchRenorm",
    lambda: jax.jit(lambda t: N.BatchRenorm(3, rngs=R())(X, use_running_average=t))(True),
    TypeError,
    r"use_running_average must be a Python bool \(or None\), got a traced value",
)
row(
    "traced",
    "linen.LayerNorm_epsilon",
    lambda: jax.jit(lambda e: L.LayerNorm(epsilon=e).init(KEY, X4))(jnp.ones(2)),
    TypeError,
    SCALAR.format("epsilon", r"\(2,\)"),
)
row(
    "traced",
    "nnx.LayerNorm_epsilon",
    lambda: jax.jit(lambda e: N.LayerNorm(4, epsilon=e, rngs=R())(X4))(jnp.ones(4)),
    TypeError,
    SCALAR.format("epsilon", r"\(4,\)"),
)

# -- params or state of the wrong shape, dtype or keys -----------------------------------------------------------
SHAPE = r"{}\['{}'\] has shape {}, but the input has feature shape {}"
row(
    "params_state",
    "batch_norm_state_shape",
    call(BN, X, PARAMS, {"mean": jnp.zeros(4), "var": jnp.ones(4)}),
    ValueError,
    SHAPE.format("state", "mean", r"\(4,\)", r"\(3,\)"),
)
row(
    "params_state",
    "batch_norm_var_shape",
    call(BN, X, PARAMS, {"mean": jnp.zeros(3), "var": jnp.ones((1, 3))}),
    ValueError,
    SHAPE.format("state", "var", r"\(1, 3\)", r"\(3,\)"),
)
row(
    "params_state",
    "batch_norm_params_shape",
    call(BN, X, {"scale": jnp.ones(2)}, STATE),
    ValueError,
    SHAPE.format("params", "scale", r"\(2,\)", r"\(3,\)"),
)
row(
    "params_state",
    "batch_norm_params_keys",
    call(BN, X, {"gamma": jnp.ones(3)}, STATE),
    ValueError,
    r"params has unknown keys \['gamma'\]; expected only \['scale', 'bias'\]",
)
row(
    "params_state",
    "batch_norm_state_missing",
    call(BN, X, PARAMS, {"mean": jnp.zeros(3)}),
    ValueError,
    r"state is missing \['var'\]",
)
row(
    "params_state",
    "batch_norm_state_type",
    call(BN, X, PARAMS, (STATE["mean"], STATE["var"])),
    TypeError,
    r"state must be a dict with keys \['mean', 'var', 'count'\], got tuple",
)
row(
    "params_state",
    "batch_norm_params_type",
    call(BN, X, [1.0, 2.0, 3.0], STATE),
    TypeError,
    r"params must be a dict with keys \['scale', 'bias'\], got list",
)
row(
    "params_state",
    "batch_norm_state_int",
    call(BN, X, PARAMS, {"mean": jnp.zeros(3, jnp.int32), "var": STATE["var"]}),
    TypeError,
    r"state\['mean'\] must have a floating dtype, got int32",
)
row(
    "params_state",
    "batch_norm_var_bool",
    call(BN, X, PARAMS, {"mean": STATE["mean"], "var": jnp.ones(3, bool)}),
    TypeError,
    r"state\['var'\] must have a floating dtype, got bool",
)
row(
    "params_state",
    "batch_norm_state_float16",
    call(BN, X, PARAMS, jax.tree.map(lambda v: v.astype(jnp.float16), STATE)),
    TypeError,
    r"state\['mean'\] is float16",
)
row(
    "params_state",
    "batch_norm_params_bool",
    call(BN, X, {"scale": jnp.ones(3, bool)}, STATE),
    TypeError,
    r"params\['scale'\] must have a floating dtype, got bool",
)
row(
    "params_state",
    "batch_norm_params_object",
    call(BN, X, {"bias": object()}, STATE),
    TypeError,
    r"params\['bias'\] must be an array, got object",
)
row(
    "params_state",
    "batch_norm_count_bool",
    call(BN, X, PARAMS, {**STATE, "count": jnp.zeros((), bool)}, momentum=None),
    TypeError,
    r"state\['count'\] must be an integer or floating scalar \(a counter\), got dtype bool",
)
row(
    "params_state",
    "batch_norm_count_shape",
    call(BN, X, PARAMS, {**STATE, "count": jnp.zeros(3)}, momentum=None),
    ValueError,
    r"state\['count'\] must be a scalar, got shape \(3,\)",
)
row(
    "params_state",
    "normalize_mean",
    call(jaxbn.normalize, X, jnp.zeros(4), STATE["var"]),
    ValueError,
    SHAPE.format("state", "mean", r"\(4,\)", r"\(3,\)"),
)
row(
    "params_state",
    "normalize_var_int",
    call(jaxbn.normalize, X, STATE["mean"], jnp.ones(3, jnp.int32)),
    TypeError,
    r"state\['var'\] must have a floating dtype, got int32",
)
row(
    "params_state",
    "normalize_var_missing",
    call(jaxbn.normalize, X, STATE["mean"], None),
    ValueError,
    r"state is missing \['var'\]",
)
row(
    "params_state",
    "batch_renorm_steps_shape",
    call(BRN, X, PARAMS, {**STATE, "steps": jnp.zeros(3, jnp.int32)}),
    ValueError,
    r"state\['steps'\] must be a scalar, got shape \(3,\)",
)
row(
    "params_state",
    "batch_renorm_steps_bool",
    call(BRN, X, PARAMS, {**STATE, "steps": jnp.zeros((), bool)}),
    TypeError,
    r"state\['steps'\] must be an integer or floating scalar .* got dtype bool",
)
row(
    "params_state",
    "update_running_stats_state",
    call(jaxbn.update_running_stats, {"mean": jnp.zeros(4), "var": jnp.ones(4)}, MOMENTS),
    ValueError,
    r"state\['mean'\] has shape \(4,\)",
)
row(
    "params_state",
    "update_running_stats_batch",
    lambda: jaxbn.update_running_stats(STATE, (MOMENTS.mean,)),
    TypeError,
    r"batch must be jaxbn\.Moments, got tuple",
)
row(
    "params_state",
    "update_running_stats_batch_var",
    call(jaxbn.update_running_stats, STATE, MOMENTS._replace(var=jnp.ones((2, 3)))),
    ValueError,
    r"batch\.var has shape \(2, 3\), but batch\.mean has shape \(3,\)",
)
row(
    "params_state",
    "update_running_stats_batch_dtype",
    call(jaxbn.update_running_stats, STATE, MOMENTS._replace(count=jnp.ones(3, jnp.int32))),
    TypeError,
    r"batch\.count must have a real floating dtype, got int32",
)
row(
    "params_state",
    "merge_moments_shapes",
    lambda: jaxbn.merge_moments(
        [MOMENTS, jaxbn.Moments(*(jnp.zeros(4) for _ in jaxbn.Moments._fields))]
    ),
    ValueError,
    r"parts must all have one shape, got \[\(3,\), \(4,\)\]",
)
row(
    "params_state",
    "merge_moments_type",
    lambda: jaxbn.merge_moments([MOMENTS, (1, 2)]),
    TypeError,
    r"parts\[1\] is a tuple",
)
row(
    "params_state",
    "merge_moments_single",
    lambda: jaxbn.merge_moments(MOMENTS),
    TypeError,
    r"parts must be a sequence of Moments, got a single Moments",
)
row(
    "params_state",
    "merge_moments_empty",
    lambda: jaxbn.merge_moments([]),
    ValueError,
    r"parts must be a non-empty sequence of Moments, got \[\]",
)
row(
    "params_state",
    "moments_shift",
    call(jaxbn.moments, X, 0, shift=jnp.zeros(4)),
    ValueError,
    r"shift of shape \(4,\) does not broadcast to the reduced shape \(3,\)",
)
for name, (fn, kw, linen_cls, nnx_make, cls) in PER_EXAMPLE.items():
    row(
        "params_state",
        f"{name}_shape",
        call(fn, X4, {"scale": jnp.ones(3)}, **kw),
        ValueError,
        SHAPE.format("params", "scale", r"\(3,\)", r"\(4,\)"),
    )
    row(
        "params_state",
        f"{name}_keys",
        call(fn, X4, {"gain": jnp.ones(4)}, **kw),
        ValueError,
        r"params has unknown keys \['gain'\]",
    )
    row(
        "params_state",
        f"{name}_dtype",
        call(fn, X4, {"scale": jnp.ones(4, jnp.int32)}, **kw),
        TypeError,
        r"params\['scale'\] must have a floating dtype, got int32",
    )
row(
    "params_state",
    "linen.BatchNorm_batch_stats_dtype",
    lambda: LBN().apply(
        {"params": PARAMS, "batch_stats": {"mean": jnp.zeros(3, jnp.int32), "var": STATE["var"]}},
        X,
        mutable=["batch_stats"],
    ),
    TypeError,
    r"state\['mean'\] must have a floating dtype, got int32",
)
row(
    "params_state",
    "linen.BatchNorm_params_dtype",
    lambda: LBN().apply(
        {"params": {"scale": jnp.ones(3, bool), "bias": PARAMS["bias"]}, "batch_stats": STATE},
        X,
        mutable=["batch_stats"],
    ),
    TypeError,
    r"params\['scale'\] must have a floating dtype, got bool",
)
row(
    "params_state",
    "linen.LayerNorm_params_dtype",
    lambda: L.LayerNorm().apply(
        {"params": {"scale": jnp.ones(4, jnp.int32), "bias": jnp.zeros(4)}}, X4
    ),
    TypeError,
    r"params\['scale'\] must have a floating dtype, got int32",
)


def _nnx_with(make, name, value, x=X):
    def build():
        module = make()
        setattr(module, name, type(getattr(module, name))(value))
        return module(x)

    return build


row(
    "params_state",
    "nnx.BatchNorm_var_dtype",
    _nnx_with(lambda: N.BatchNorm(3, rngs=R()), "var", jnp.ones(3, jnp.int32)),
    TypeError,
    r"state\['var'\] must have a floating dtype, got int32",
)
row(
    "params_state",
    "nnx.LayerNorm_scale_dtype",
    _nnx_with(lambda: N.LayerNorm(4, rngs=R()), "scale", jnp.ones(4, jnp.int32), X4),
    TypeError,
    r"params\['scale'\] must have a floating dtype, got int32",
)
row(
    "params_state",
    "nnx.BatchNorm_wrong_features",
    nnx_call(lambda: N.BatchNorm(4, rngs=R())),
    ValueError,
    r"BatchNorm\(num_features=4\) got an input of shape \(4, 3\) with 3 features along axis=-1",
)
row(
    "params_state",
    "nnx.GroupNorm_wrong_features",
    nnx_call(lambda: N.GroupNorm(8, num_groups=2, rngs=R()), X4),
    ValueError,
    r"GroupNorm\(num_features=8\) got an input of shape \(2, 2, 2, 4\) with 4 features",
)

# -- a state or variables from another layer ---------------------------------------------------------------------
OTHER = (
    r"{}: {} has shape \(5,\), but this layer has {} features: it comes from another layer or model"
)
FIVE = jaxbn.batch_norm_init(5)
row(
    "other_layer",
    "batch_norm_wider_state",
    call(BN, X, PARAMS, FIVE[1]),
    ValueError,
    SHAPE.format("state", "mean", r"\(5,\)", r"\(3,\)"),
)
row(
    "other_layer",
    "batch_norm_cumulative_state",
    call(BN, X, PARAMS, CUMULATIVE, momentum=0.9),
    ValueError,
    r"state has a 'count' entry .* but momentum=0\.9 asks for an exponential average",
)
row(
    "other_layer",
    "batch_norm_exponential_state",
    call(BN, X, PARAMS, STATE, momentum=None),
    ValueError,
    r"momentum=None .* needs state\['count'\]",
)
row(
    "other_layer",
    "batch_norm_renorm_state",
    call(BN, X, PARAMS, {**STATE, "steps": jnp.zeros((), jnp.int32)}),
    ValueError,
    r"state has unknown keys \['steps'\]",
)
row(
    "other_layer",
    "batch_renorm_wider_params",
    call(BRN, X, FIVE[0], STATE),
    ValueError,
    SHAPE.format("params", "(scale|bias)", r"\(5,\)", r"\(3,\)"),
)
row(
    "other_layer",
    "update_running_stats_cumulative",
    call(jaxbn.update_running_stats, CUMULATIVE, MOMENTS, momentum=0.9),
    ValueError,
    r"state has a 'count' entry",
)
row(
    "other_layer",
    "linen.BatchNorm_batch_stats",
    lambda: LBN().apply({"params": PARAMS, "batch_stats": FIVE[1]}, X, mutable=["batch_stats"]),
    ValueError,
    OTHER.format(r"BatchNorm at '<root>'", "batch_stats/mean", 3),
)
row(
    "other_layer",
    "linen.BatchRenorm_batch_stats",
    lambda: L.BatchRenorm(use_running_average=True).apply(
        {"params": PARAMS, "batch_stats": FIVE[1]}, X
    ),
    ValueError,
    OTHER.format(r"BatchRenorm at '<root>'", "batch_stats/mean", 3),
)
row(
    "other_layer",
    "linen.BatchNorm_params",
    lambda: LBN().apply({"params": FIVE[0], "batch_stats": STATE}, X, mutable=["batch_stats"]),
    flax.errors.ScopeParamShapeError,
    r'For parameter "scale" in "/", .* expected to generate shape \(3,\), but the existing parameter .* shape \(5,\)',
)
row(
    "other_layer",
    "linen.LayerNorm_params",
    lambda: L.LayerNorm().apply({"params": FIVE[0]}, X4),
    flax.errors.ScopeParamShapeError,
    r'For parameter "scale" .* shape \(4,\), but the existing parameter .* \(5,\)',
)
row(
    "other_layer",
    "linen.BatchNorm_cumulative",
    lambda: LBN(momentum=None).apply(
        {"params": PARAMS, "batch_stats": STATE}, X, mutable=["batch_stats"]
    ),
    ValueError,
    r"BatchNorm at '<root>' has no batch_stats/count .*momentum=None keeps a 'count'",
)


def _nnx_updated(make, other, x):
    def build():
        module = make()
        nnx.update(module, nnx.state(other()))
        return module(x)

    return build


row(
    "other_layer",
    "nnx.BatchNorm",
    _nnx_updated(lambda: N.BatchNorm(3, rngs=R()), lambda: N.BatchNorm(5, rngs=R()), X),
    ValueError,
    OTHER.format(r"BatchNorm\(num_features=3\)", "mean", 3),
)
row(
    "other_layer",
    "nnx.BatchRenorm",
    _nnx_with(lambda: N.BatchRenorm(3, rngs=R()), "var", jnp.ones(5)),
    ValueError,
    OTHER.format(r"BatchRenorm\(num_features=3\)", "var", 3),
)
for name, (fn, kw, linen_cls, nnx_make, cls) in PER_EXAMPLE.items():
    row(
        "other_layer",
        f"nnx.{cls}",
        _nnx_with(nnx_make, "scale", jnp.ones(5), X4),
        ValueError,
        OTHER.format(rf"{cls}\(num_features=4\)", "scale", 4),
    )

# -- masks of the wrong shape or dtype ---------------------------------------------------------------------------
MASK_SHAPE = r"mask of shape {} does not broadcast to the input shape {}"
MASK_DTYPE = r"mask must be a boolean array .* got dtype {}"
row(
    "mask",
    "batch_norm_shape",
    call(BN, X, PARAMS, STATE, mask=jnp.ones(4, bool)),
    ValueError,
    MASK_SHAPE.format(r"\(4,\)", r"\(4, 3\)"),
)
row(
    "mask",
    "batch_norm_float",
    call(BN, X, PARAMS, STATE, mask=jnp.ones((4, 1))),
    TypeError,
    MASK_DTYPE.format("float32"),
)
row(
    "mask",
    "batch_norm_int",
    call(BN, X, PARAMS, STATE, mask=np.ones((4, 1), np.int64)),
    TypeError,
    MASK_DTYPE.format("int"),
)
row(
    "mask",
    "batch_norm_list",
    call(BN, X, PARAMS, STATE, mask=[True] * 4),
    ValueError,
    MASK_SHAPE.format(r"\(4,\)", r"\(4, 3\)"),
)
row(
    "mask",
    "batch_renorm",
    call(BRN, X, PARAMS, STATE, mask=jnp.ones((4, 1), jnp.uint8)),
    TypeError,
    MASK_DTYPE.format("uint8"),
)
row(
    "mask",
    "moments",
    call(jaxbn.moments, X, 0, mask=jnp.ones((2, 3), bool)),
    ValueError,
    MASK_SHAPE.format(r"\(2, 3\)", r"\(4, 3\)"),
)
row(
    "mask",
    "moments_float",
    call(jaxbn.moments, X, 0, mask=jnp.ones((4, 1))),
    TypeError,
    MASK_DTYPE.format("float32"),
)
row(
    "mask",
    "batch_norm_update_only",
    call(
        jaxbn.batch_norm,
        X,
        PARAMS,
        STATE,
        training=False,
        update_running_stats=True,
        mask=jnp.ones((4, 2), bool),
    ),
    ValueError,
    MASK_SHAPE.format(r"\(4, 2\)", r"\(4, 3\)"),
)
for i, (name, (fn, kw, linen_cls, nnx_make, cls)) in enumerate(PER_EXAMPLE.items()):
    bad, (error, match) = (
        (jnp.ones(3, bool), (ValueError, MASK_SHAPE.format(r"\(3,\)", r"\(2, 2, 2, 4\)")))
        if i % 2
        else (jnp.ones(X4.shape), (TypeError, MASK_DTYPE.format("float32")))
    )
    row("mask", name, call(fn, X4, mask=bad, **kw), error, match)
    row("mask", f"linen.{cls}", lambda c=linen_cls, m=bad: c().init(KEY, X4, mask=m), error, match)
    row("mask", f"nnx.{cls}", nnx_call(nnx_make, X4, mask=bad), error, match)
row(
    "mask",
    "linen.BatchNorm",
    linen_train(LBN(), mask=jnp.ones((4,), bool)),
    ValueError,
    MASK_SHAPE.format(r"\(4,\)", r"\(4, 3\)"),
)
row(
    "mask",
    "linen.BatchRenorm",
    linen_train(LBRN(), mask=jnp.ones((4, 1), jnp.int32)),
    TypeError,
    MASK_DTYPE.format("int32"),
)
row(
    "mask",
    "nnx.BatchNorm",
    nnx_call(lambda: N.BatchNorm(3, rngs=R()), mask=jnp.ones((4, 1), jnp.int8)),
    TypeError,
    MASK_DTYPE.format("int8"),
)
row(
    "mask",
    "nnx.BatchRenorm",
    nnx_call(lambda: N.BatchRenorm(3, rngs=R()), mask=jnp.ones((3, 1), bool)),
    ValueError,
    MASK_SHAPE.format(r"\(3, 1\)", r"\(4, 3\)"),
)

# -- sizes that do not divide: ghost batches, groups -------------------------------------------------------------
GHOST = r"ghost_batch_size={} does not divide the batch size 4"
row(
    "divide",
    "batch_norm_ghost",
    call(BN, X, PARAMS, STATE, ghost_batch_size=3),
    ValueError,
    GHOST.format(3),
)
row(
    "divide",
    "batch_renorm_ghost",
    call(BRN, X, PARAMS, STATE, ghost_batch_size=8),
    ValueError,
    GHOST.format(8),
)
row(
    "divide",
    "batch_norm_ghost_zero",
    call(BN, X, PARAMS, STATE, ghost_batch_size=0),
    ValueError,
    r"ghost_batch_size must be a positive int or None, got 0",
)
row(
    "divide",
    "batch_norm_ghost_float",
    call(BN, X, PARAMS, STATE, ghost_batch_size=2.0),
    TypeError,
    r"ghost_batch_size must be a positive int or None, got 2\.0 of type float",
)
row(
    "divide",
    "batch_norm_ghost_single",
    call(BN, X, PARAMS, STATE, ghost_batch_size=1),
    ValueError,
    r"ghost_batch_size=1 leaves one value per feature in each ghost batch",
)
row(
    "divide",
    "batch_norm_ghost_feature_axis",
    call(BN, X, {}, {"mean": jnp.zeros(4), "var": jnp.ones(4)}, axis=0, ghost_batch_size=2),
    ValueError,
    r"ghost_batch_size=2 splits axis 0 \(the batch\) into groups, but axis 0 is a feature axis",
)
row(
    "divide",
    "linen.BatchNorm_ghost",
    linen_train(LBN(ghost_batch_size=3)),
    ValueError,
    GHOST.format(3),
)
row(
    "divide",
    "linen.BatchRenorm_ghost",
    linen_train(LBRN(ghost_batch_size=3)),
    ValueError,
    GHOST.format(3),
)
row(
    "divide",
    "nnx.BatchNorm_ghost",
    nnx_call(lambda: N.BatchNorm(3, ghost_batch_size=3, rngs=R())),
    ValueError,
    GHOST.format(3),
)
row(
    "divide",
    "nnx.BatchRenorm_ghost",
    lambda: N.BatchRenorm(3, ghost_batch_size=-2, rngs=R()),
    ValueError,
    r"ghost_batch_size must be a positive int or None, got -2",
)
row(
    "divide",
    "group_norm_num_groups",
    call(jaxbn.group_norm, X4, num_groups=3),
    ValueError,
    r"num_groups=3 does not divide the 4 channels of the input",
)
row(
    "divide",
    "group_norm_group_size",
    call(jaxbn.group_norm, X4, num_groups=None, group_size=3),
    ValueError,
    r"group_size=3 does not divide the 4 channels of the input",
)
row(
    "divide",
    "group_norm_both",
    call(jaxbn.group_norm, X4, num_groups=2, group_size=2),
    ValueError,
    r"exactly one of num_groups and group_size must be given, got num_groups=2 and group_size=2",
)
row(
    "divide",
    "group_norm_zero",
    call(jaxbn.group_norm, X4, num_groups=0),
    ValueError,
    r"num_groups must be a positive int or None, got 0",
)
row(
    "divide",
    "linen.GroupNorm",
    lambda: L.GroupNorm(num_groups=3).init(KEY, X4),
    ValueError,
    r"num_groups=3 does not divide the 4 channels of the input",
)
row(
    "divide",
    "nnx.GroupNorm",
    lambda: N.GroupNorm(4, num_groups=3, rngs=R()),
    ValueError,
    r"num_groups=3 does not divide the 4 channels \(num_features\)",
)
row(
    "divide",
    "nnx.GroupNorm_group_size",
    lambda: N.GroupNorm(6, num_groups=None, group_size=4, rngs=R()),
    ValueError,
    r"group_size=4 does not divide the 6 channels \(num_features\)",
)

# -- zero-size batches where batch statistics are taken ----------------------------------------------------------
EMPTY = jnp.ones((0, 3))
ZERO = r"x of shape \(0, 3\) is a zero-size batch: with axis=-1 there are no elements along the reduction axes"
row("zero_size", "batch_norm", call(BN, EMPTY, PARAMS, STATE), ValueError, "batch_norm: " + ZERO)
row(
    "zero_size",
    "batch_norm_update",
    call(jaxbn.batch_norm, EMPTY, PARAMS, STATE, training=False, update_running_stats=True),
    ValueError,
    ZERO,
)
row(
    "zero_size",
    "batch_norm_moments",
    call(jaxbn.batch_norm, EMPTY, PARAMS, STATE, training=False, return_moments=True),
    ValueError,
    ZERO,
)
row(
    "zero_size",
    "batch_norm_ghost",
    call(BN, EMPTY, PARAMS, STATE, ghost_batch_size=2),
    ValueError,
    ZERO,
)
row(
    "zero_size",
    "batch_renorm",
    call(BRN, EMPTY, PARAMS, STATE),
    ValueError,
    "batch_renorm: " + ZERO,
)
row(
    "zero_size",
    "linen.BatchNorm",
    lambda: LBN().apply({"params": PARAMS, "batch_stats": STATE}, EMPTY, mutable=["batch_stats"]),
    ValueError,
    ZERO,
)
row("zero_size", "linen.BatchRenorm", lambda: LBRN().init(KEY, EMPTY), ValueError, ZERO)
row(
    "zero_size",
    "nnx.BatchNorm",
    nnx_call(lambda: N.BatchNorm(3, rngs=R()), EMPTY),
    ValueError,
    ZERO,
)
row(
    "zero_size",
    "nnx.BatchRenorm",
    nnx_call(lambda: N.BatchRenorm(3, rngs=R()), EMPTY),
    ValueError,
    ZERO,
)

# -- axis_name not bound here (and axis_index_groups that do not fit) --------------------------------------------
UNBOUND = r"axis_name='batch' is not bound here"
row("axis_name", "batch_norm", call(BN, X, PARAMS, STATE, axis_name="batch"), ValueError, UNBOUND)
row(
    "axis_name", "batch_renorm", call(BRN, X, PARAMS, STATE, axis_name="batch"), ValueError, UNBOUND
)
row(
    "axis_name",
    "moments",
    call(jaxbn.moments, X, 0, axis_name="batch"),
    ValueError,
    UNBOUND + r".* jax\.shard_map.* jax\.pmap.* pass axis_name=None",
)
for name, (fn, kw, linen_cls, nnx_make, cls) in PER_EXAMPLE.items():
    row("axis_name", name, call(fn, X4, axis_name="batch", **kw), ValueError, UNBOUND)
    row(
        "axis_name",
        f"linen.{cls}",
        lambda c=linen_cls: c(axis_name="batch").init(KEY, X4),
        ValueError,
        UNBOUND,
    )
    row(
        "axis_name",
        f"nnx.{cls}",
        nnx_call(lambda m=nnx_make: m(axis_name="batch"), X4),
        ValueError,
        UNBOUND,
    )
row(
    "axis_name",
    "linen.BatchNorm",
    lambda: LBN(axis_name="batch").apply(
        {"params": PARAMS, "batch_stats": STATE}, X, mutable=["batch_stats"]
    ),
    ValueError,
    UNBOUND,
)
row(
    "axis_name",
    "linen.BatchRenorm",
    lambda: LBRN(axis_name="batch").apply(
        {"params": PARAMS, "batch_stats": STATE}, X, mutable=["batch_stats"]
    ),
    ValueError,
    UNBOUND,
)
row(
    "axis_name",
    "nnx.BatchNorm",
    nnx_call(lambda: N.BatchNorm(3, axis_name="batch", rngs=R())),
    ValueError,
    UNBOUND,
)
row(
    "axis_name",
    "nnx.BatchRenorm",
    nnx_call(lambda: N.BatchRenorm(3, axis_name="batch", rngs=R())),
    ValueError,
    UNBOUND,
)
row(
    "axis_name",
    "groups_in_shard_map",
    lambda: jax.jit(
        jax.shard_map(
            lambda x: BN(x, PARAMS, STATE, axis_name="i", axis_index_groups=[[0], [1]])[0],
            mesh=jax.sharding.Mesh(jax.devices()[:2], ("i",)),
            in_specs=jax.P("i"),
            out_specs=jax.P("i"),
        )
    ).trace(X),
    NotImplementedError,
    r"axis_index_groups=\(\(0,\), \(1,\)\) with axis_name='i': JAX implements "
    r"axis_index_groups under pmap only, not inside shard_map\. .* factor the mesh axis",
)
row(
    "axis_name",
    "groups_without_name",
    call(BN, X, PARAMS, STATE, axis_index_groups=[[0]]),
    ValueError,
    r"axis_index_groups was given without axis_name",
)
row(
    "axis_name",
    "moments_groups_without_name",
    call(jaxbn.moments, X, 0, axis_index_groups=[[0]]),
    ValueError,
    r"axis_index_groups was given without axis_name",
)
row(
    "axis_name",
    "groups_not_covering",
    lambda: jax.vmap(
        lambda x: BN(x, PARAMS, STATE, axis_name="i", axis_index_groups=[[0, 1], [1, 2]])[0],
        axis_name="i",
    )(jnp.ones((4, 2, 3))),
    ValueError,
    r"axis_index_groups must be .* got \(\(0, 1\), \(1, 2\)\)",
)
row(
    "axis_name",
    "groups_of_two_sizes",
    lambda: jax.vmap(
        lambda x: jaxbn.layer_norm(x, axis_name="i", axis_index_groups=[[0], [1, 2, 3]]),
        axis_name="i",
    )(jnp.ones((4, 2, 3))),
    ValueError,
    r"axis_index_groups must all have the same size, got sizes \[1, 3\]",
)

# -- batch_stats missing (or immutable) --------------------------------------------------------------------------
MISSING = r"BatchNorm at '<root>' has no batch_stats/{} in the variables it was applied with"
row(
    "batch_stats",
    "linen.BatchNorm_train",
    lambda: LBN().apply({"params": PARAMS}, X, mutable=["batch_stats"]),
    ValueError,
    MISSING.format("mean"),
)
row(
    "batch_stats",
    "linen.BatchNorm_eval",
    lambda: L.BatchNorm(use_running_average=True).apply({"params": PARAMS}, X),
    ValueError,
    MISSING.format("mean"),
)
row(
    "batch_stats",
    "linen.BatchRenorm_steps",
    lambda: LBRN(r_max=lambda s: 1.0 + s).apply(
        {"params": PARAMS, "batch_stats": STATE}, X, mutable=["batch_stats"]
    ),
    ValueError,
    r"BatchRenorm at '<root>' has no batch_stats/steps",
)
row(
    "batch_stats",
    "linen.BatchNorm_immutable",
    lambda: LBN().apply({"params": PARAMS, "batch_stats": STATE}, X),
    flax.errors.ModifyScopeVariableError,
    r'Cannot update variable "mean" in "/" because collection "batch_stats" '
    r"is immutable",
)
row(
    "batch_stats",
    "nnx.BatchNorm_closure",
    lambda: (lambda bn: jax.jit(lambda x: bn(x))(X))(N.BatchNorm(3, rngs=R())),
    flax.errors.TraceContextError,
    r"BatchNorm updates its running statistics in training, but it was captured as a "
    r"closure by a transform",
)


class _Net(nn.Module):
    """A Dense layer and a BatchNorm (eval mode): the model the tools take."""

    axis: int = -1

    @nn.compact
    def __call__(self, x):
        return L.BatchNorm(use_running_average=True, axis=self.axis)(nn.Dense(3)(x))


def _net_variables():
    return _Net().init(KEY, X[:, :2])


row(
    "batch_stats",
    "recalibrate",
    lambda: jaxbn.recalibrate(_Net(), {"params": _net_variables()["params"]}, [X[:, :2]]),
    ValueError,
    r"variables must be the model's variables with a 'batch_stats' collection .* keys \['params'\]",
)
row(
    "batch_stats",
    "inspect_batch_norms",
    lambda: jaxbn.inspect_batch_norms(_Net(), {"params": _net_variables()["params"]}, X[:, :2]),
    ValueError,
    r"'batch_stats' collection",
)
row(
    "batch_stats",
    "fold_batch_norm",
    lambda: jaxbn.fold_batch_norm(_Net(), {"params": _net_variables()["params"]}, X[:, :2]),
    ValueError,
    r"BatchNorm at 'BatchNorm_0' has no batch_stats/mean",
)

# -- the tools' own arguments ------------------------------------------------------------------------------------
row(
    "tools",
    "recalibrate_other_layer",
    lambda: jaxbn.recalibrate(
        _Net(),
        {"params": _net_variables()["params"], "batch_stats": {"BatchNorm_0": FIVE[1]}},
        [X[:, :2]],
        progress=False,
    ),
    ValueError,
    OTHER.format(r"BatchNorm at 'BatchNorm_0'", "batch_stats/mean", 3),
)
row(
    "tools",
    "recalibrate_empty",
    lambda: jaxbn.recalibrate(_Net(), _net_variables(), [], progress=False),
    ValueError,
    r"recalibrate: batches is empty",
)
row(
    "tools",
    "recalibrate_nnx_empty",
    lambda: jaxbn.recalibrate(N.BatchNorm(3, rngs=R()), iter(()), progress=False),
    ValueError,
    r"recalibrate: batches is empty",
)
row(
    "tools",
    "recalibrate_not_iterable",
    lambda: jaxbn.recalibrate(_Net(), _net_variables(), 5),
    TypeError,
    r"recalibrate: batches must be an iterable of batches .* got int",
)
row(
    "tools",
    "recalibrate_zero_size",
    lambda: jaxbn.recalibrate(_Net(), _net_variables(), [X[:0, :2]], progress=False),
    ValueError,
    ZERO,
)
row(
    "tools",
    "recalibrate_complex",
    lambda: jaxbn.recalibrate(N.BatchNorm(3, rngs=R()), [Z], progress=False),
    TypeError,
    COMPLEX,
)
row(
    "tools",
    "recalibrate_axis",
    lambda: jaxbn.recalibrate(_Net(axis=2), _net_variables(), [X[:, :2]], progress=False),
    ValueError,
    AXIS.format("axis", 2, 2),
)
row(
    "tools",
    "recalibrate_normalize_with",
    lambda: jaxbn.recalibrate(_Net(), _net_variables(), [X[:, :2]], normalize_with="train"),
    ValueError,
    r"normalize_with must be one of \('batch', 'running'\), got 'train'",
)
row(
    "tools",
    "recalibrate_estimator",
    lambda: jaxbn.recalibrate(N.BatchNorm(3, rngs=R()), [X], estimator="mean"),
    ValueError,
    r"estimator must be one of \('population', 'mean_of_batches'\), got 'mean'",
)
row(
    "tools",
    "recalibrate_model",
    lambda: jaxbn.recalibrate(lambda x: x, [X]),
    TypeError,
    r"model must be a flax.linen or flax.nnx module, got function",
)
row(
    "tools",
    "inspect_batch_norms_batch",
    lambda: jaxbn.inspect_batch_norms(_Net(), _net_variables()),
    TypeError,
    r"inspect_batch_norms\(linen_model, variables, batch\): the batch is missing",
)
row(
    "tools",
    "inspect_batch_norms_normalize_with",
    lambda: jaxbn.inspect_batch_norms(_Net(), _net_variables(), X[:, :2], normalize_with="x"),
    ValueError,
    r"normalize_with must be one of .* got 'x'",
)
row(
    "tools",
    "inspect_batch_norms_complex",
    lambda: jaxbn.inspect_batch_norms(N.BatchNorm(3, rngs=R()), Z),
    TypeError,
    COMPLEX,
)
row(
    "tools",
    "fold_batch_norm_complex",
    lambda: jaxbn.fold_batch_norm(_Net(), _net_variables(), Z[:, :2]),
    TypeError,
    r"BatchNorm 'BatchNorm_0' has a complex input; not supported",
)
row(
    "tools",
    "fold_batch_norm_axis",
    lambda: jaxbn.fold_batch_norm(_Net(axis=0), _Net(axis=0).init(KEY, X[:, :2]), X[:, :2]),
    ValueError,
    r"BatchNorm 'BatchNorm_0' normalizes axis=0 of its shape-\(4, 3\) input",
)
row(
    "tools",
    "fold_batch_norm_input",
    lambda: jaxbn.fold_batch_norm(_Net(), _net_variables()),
    TypeError,
    r"pass a sample input after the variables",
)
row(
    "tools",
    "fold_batch_norm_pairs",
    lambda: jaxbn.fold_batch_norm(_Net(), _net_variables(), X[:, :2], pairs="Dense_0"),
    TypeError,
    r"pairs must be a sequence of \(layer_path, batch_norm_path\) pairs, got 'Dense_0'",
)
row(
    "tools",
    "fold_batch_norm_variables",
    lambda: jaxbn.fold_batch_norm(_Net(), [1], X),
    TypeError,
    r"variables must be the model's variables .* got list",
)


def _torch_pair():
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    return torch, module, _net_variables(), {"0": "Dense_0", "1": "BatchNorm_0"}


def _torch_row(edit):
    def build():
        torch, module, template, name_map = _torch_pair()
        return edit(torch, module, template, name_map)

    return build


row(
    "tools",
    "interop.torch_to_flax_shape",
    _torch_row(
        lambda torch, m, t, n: T.torch_to_flax(
            {**m.state_dict(), "1.running_var": torch.ones(4)}, t, name_map=n
        )
    ),
    ValueError,
    r"shape mismatch for '1\.running_var': \(4,\), expected \(3,\)",
)
row(
    "tools",
    "interop.torch_to_flax_complex",
    _torch_row(
        lambda torch, m, t, n: T.torch_to_flax(
            {**m.state_dict(), "1.running_mean": torch.zeros(3, dtype=torch.complex64)},
            t,
            name_map=n,
        )
    ),
    TypeError,
    r"state dict entry '1\.running_mean' has dtype torch\.complex64; expected a real tensor",
)
row(
    "tools",
    "interop.torch_to_flax_type",
    _torch_row(
        lambda torch, m, t, n: T.torch_to_flax(
            {**m.state_dict(), "1.running_mean": "zeros"}, t, name_map=n
        )
    ),
    TypeError,
    r"state dict entry '1\.running_mean' is a str; expected a torch\.Tensor or a NumPy array",
)
row(
    "tools",
    "interop.torch_to_flax_path",
    _torch_row(lambda torch, m, t, n: T.torch_to_flax("model.pt", t)),
    TypeError,
    r"state_dict is 'model\.pt', a path or bytes",
)
row(
    "tools",
    "interop.torch_to_flax_missing",
    _torch_row(
        lambda torch, m, t, n: T.torch_to_flax(
            {k: v for k, v in m.state_dict().items() if k != "1.running_var"}, t, name_map=n
        )
    ),
    ValueError,
    r"missing key '1\.running_var'",
)
row(
    "tools",
    "interop.flax_to_torch_batch_stats",
    _torch_row(lambda torch, m, t, n: T.flax_to_torch({"params": t["params"]}, m, name_map=n)),
    ValueError,
    r"missing key: '1\.running_mean' needs 'batch_stats/BatchNorm_0/mean'",
)
row(
    "tools",
    "interop.flax_to_torch_other_layer",
    _torch_row(
        lambda torch, m, t, n: T.flax_to_torch(
            t, torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4)), name_map=n
        )
    ),
    ValueError,
    r"shape mismatch for '0\.weight'",
)
row(
    "tools",
    "interop.torch_to_nnx_other_layer",
    _torch_row(
        lambda torch, m, t, n: T.torch_to_nnx(
            m.state_dict(),
            nnx.Sequential(nnx.Linear(2, 5, rngs=R()), N.BatchNorm(5, rngs=R())),
            name_map={"0": "layers/0", "1": "layers/1"},
        )
    ),
    ValueError,
    r"shape mismatch for '0\.weight'",
)
row(
    "tools",
    "interop.batch_norm_kwargs",
    _torch_row(lambda torch, m, t, n: T.batch_norm_kwargs(m[0])),
    TypeError,
    r"module must be a torch\.nn\.BatchNorm1d/2d/3d, got Linear",
)


@pytest.mark.parametrize("build, error, match", ROWS)
def test_bad_input_raises_a_clear_error(build, error, match):
    """The documented exception, with a message naming the argument and its value; at trace time under jit."""
    if isinstance(build, Call):
        if not build.jit_only:
            with pytest.raises(error, match=match):
                build.fn(*build.args, **build.kwargs)
        with pytest.raises(error, match=match):
            _trace(build)
    else:
        with pytest.raises(error, match=match):
            build()


def test_what_is_not_an_error():
    """The calls docs/errors.md lists as not errors trace (and the empty moments are those of no element): zero-size
    input without batch statistics, traced scalar hyperparameters, a mask where it is not used or broadcast per
    feature, an axis_name during linen's init."""
    empty = jnp.ones((0, 3))
    shape = lambda f, *args: jax.eval_shape(f, *args)  # noqa: E731
    assert shape(lambda x: jaxbn.normalize(x, STATE["mean"], STATE["var"]), empty).shape == (0, 3)
    assert shape(lambda x: jaxbn.batch_norm(x, PARAMS, STATE, training=False)[0], empty).shape == (
        0,
        3,
    )
    for fn, kw, linen_cls, nnx_make, cls in PER_EXAMPLE.values():
        assert shape(functools.partial(fn, **kw), jnp.ones((0, 2, 4))).shape == (0, 2, 4)
    empty_moments, merged = jax.jit(
        lambda x: (m := jaxbn.moments(x, 0), jaxbn.merge_moments([MOMENTS, m]))
    )(empty)
    # Exact by construction: a count of no element is 0, sums over no element are 0 (0 / 1 = 0), and
    # mean = shift + 0 returns the shift unchanged.
    np.testing.assert_array_equal(empty_moments.count, 0.0)
    np.testing.assert_array_equal(empty_moments.var, 0.0)
    np.testing.assert_array_equal(empty_moments.mean, empty_moments.shift)
    # Exact by construction: X is arange(12) (small integers), the count 4 a power of two, so every
    # sum, n * mean / n and the variance (4.5, 11.25, ...) are exact in float32 whatever the order.
    for field in ("mean", "var", "count"):
        np.testing.assert_array_equal(getattr(merged, field), getattr(MOMENTS, field))
    shape(
        lambda m, e: BN(X, PARAMS, STATE, momentum=m, epsilon=e), 0.9, 1e-3
    )  # traced scalars: used as given
    shape(lambda r, d: BRN(X, PARAMS, STATE, r_max=r, d_max=d), 3.0, 5.0)
    shape(
        lambda x: jaxbn.batch_norm(x, PARAMS, STATE, training=False, mask=jnp.ones(7)), X
    )  # inference: not used
    shape(
        lambda x: BN(x, PARAMS, STATE, mask=jnp.array([True, False, True])), X
    )  # per feature: broadcasts
    assert "batch_stats" in shape(lambda key: LBN(axis_name="batch").init(key, X), KEY)
