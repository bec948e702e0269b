"""Property-based tests: hypothesis searches for inputs on which jaxbn's statistics are wrong.

Every public normalizer (batch_norm in training and inference, batch_renorm, layer_norm, rms_norm,
group_norm, instance_norm) and moments/merge_moments, over drawn shapes (1-5 axes, size-1 axes),
feature axes (int, negative, tuples), dtypes (float16, bfloat16, float32, and float64 with x64
switched on for that example), masks (random, all-false rows, one valid element, all false,
masked-out NaN/Inf), offsets up to 1e6 and scales from 1e-6 to 1e6: outputs, running statistics
and gradients within the bounds of docs/accuracy.md (tests/accuracy_bounds.py) of an
extended-precision reference; the same outputs for an exactly shifted and scaled input; merged
statistics equal the whole's; eager equals jit; pmap, shard_map and jit with a sharded batch
equal one device for any split of the valid examples over 8 devices, empty devices included.

The searches are in the slow tier (``pytest -m slow``); the regression tests at the end are not.
CI runs the 'ci' profile (tests/conftest.py: 10 examples per property, derandomized; some
properties below search fewer, see ``_examples``); ``pytest -m slow --hypothesis-profile=long``
searches ten times as many, newly drawn. Compilation dominates the time: each drawn shape compiles one
program per property, which computes every checked quantity at once.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import jaxbn
from tests import accuracy_bounds as ab
from tests.conftest import N_DEVICES, needs_devices

DTYPES = ("float16", "bfloat16", "float32", "float64")
#: Mantissa bits (with the implicit one): how many integers a dtype holds exactly.
_MANTISSA = {"float16": 11, "bfloat16": 8, "float32": 24, "float64": 53}


def _examples(n: int) -> int:
    """``n`` examples under the 'ci' profile (10 by default), proportionally more under 'long'."""
    return max(1, n * settings.default.max_examples // 10)


@contextlib.contextmanager
def _quiet():
    """Ignores the DegenerateBatchWarning of drawn batches with one value per feature (tested elsewhere)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaxbn.DegenerateBatchWarning)
        yield


report_worst_ratios = (
    ab.report_worst_ratios
)  # autouse, per module: JAXBN_REPORT_RATIOS=1 prints the worst


# -- strategies --------------------------------------------------------------------------------------------


@st.composite
def shapes(draw, min_dims=1, max_dims=5, max_size=ab.MAX_GROUP):
    """1-5 axes of sizes 1-4, at most ``max_size`` elements."""
    ndim = draw(st.integers(min_dims, max_dims))
    shape, budget = [], max_size
    for _ in range(ndim):
        size = draw(st.integers(1, max(1, min(4, budget))))
        shape.append(size)
        budget //= size
    return tuple(shape)


@st.composite
def axes_of(draw, ndim, *, allowed=None, nonempty=True, as_int_ok=True):
    """A subset of ``allowed`` axes (default all), written as an int or a tuple, possibly negative."""
    allowed = list(range(ndim)) if allowed is None else list(allowed)
    chosen = draw(
        st.lists(
            st.sampled_from(allowed),
            unique=True,
            min_size=1 if nonempty else 0,
            max_size=len(allowed),
        )
    )
    written = [a - ndim if draw(st.booleans()) else a for a in chosen]
    if len(written) == 1 and as_int_ok and draw(st.booleans()):
        return sorted(chosen), written[0]
    return sorted(chosen), tuple(written)


class Draw:
    """What one example draws, beyond the normalizer's own arguments."""

    def __init__(self, data, dtype, shape, group_shape):
        """``group_shape``: ``shape`` with 1 along the axes one statistic reduces over (for invariance)."""
        self.dtype, self.shape = dtype, shape
        self.seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
        self.rng = np.random.default_rng(self.seed)
        self.grid = data.draw(st.booleans(), label="grid (exact shift and scale invariance)")
        self.group_shape = group_shape
        if self.grid:
            self._grid_values(data)
        else:
            self._values(data)
        self.mask_kind = data.draw(
            st.sampled_from(["none", "random", "empty rows", "one valid", "all false"]),
            label="mask",
        )
        self.mask = self._mask(data)
        self.valid = (
            np.ones(shape, bool) if self.mask is None else np.broadcast_to(self.mask, shape)
        )
        # (not on the grid: masked-out NaN/Inf are normalized as 0, which a shift does not move)
        if (
            self.mask is not None
            and not self.grid
            and not self.valid.all()
            and data.draw(st.booleans(), label="NaN/Inf padding")
        ):
            junk = np.array([np.nan, np.inf, -np.inf])[np.arange(math.prod(shape)) % 3].reshape(
                shape
            )
            self.x = np.where(self.valid, self.x, junk)
        self.w = self.rng.normal(size=shape)

    def _values(self, data):
        limit = 4 if self.dtype == "float16" else 6  # float16 ends at 65504
        offset = data.draw(st.sampled_from([0, 1, 2, 4, 6]), label="log10 offset")
        scale = data.draw(
            st.integers(-6, min(limit, 3) if self.dtype == "float16" else 6), label="log10 scale"
        )
        offset = 0.0 if offset == 0 else 10.0 ** min(offset, limit)
        sign = data.draw(st.sampled_from([1, -1]))
        kind = data.draw(
            st.sampled_from(["normal", "integers", "two values"]), label="distribution"
        )
        if kind == "normal":
            z = np.clip(self.rng.normal(size=self.shape), -4, 4)
        elif kind == "integers":
            z = self.rng.integers(-3, 4, size=self.shape).astype(float)
        else:
            z = self.rng.choice([-1.0, 1.0], size=self.shape) * (self.rng.random(self.shape) < 0.5)
        per_feature = self.rng.uniform(0.5, 1.5, size=self.shape[-1:])
        self.x = sign * offset * per_feature + 10.0**scale * z
        self.exponent = None

    def _grid_values(self, data):
        """Integers times 2^e, so that a shift by 2^e t and a scale by 2^k are exact in the dtype."""
        bits = min(_MANTISSA[self.dtype], 24)
        spread_bits = data.draw(st.integers(0, bits - 2), label="spread bits")
        self.q_max = 2**spread_bits
        self.c_max = 2 ** (bits - 1) - self.q_max  # |c + t| + q_max < 2^bits: every sum exact
        if self.dtype == "float16":
            self.exponent = data.draw(st.integers(-12, 0), label="grid exponent")
        else:
            self.exponent = data.draw(st.integers(-20, 20 - bits), label="grid exponent")
        c = self.rng.integers(-self.c_max, self.c_max + 1, size=self.group_shape)
        q = self.rng.integers(-self.q_max, self.q_max + 1, size=self.shape)
        self.x = np.ldexp((c + q).astype(float), self.exponent)

    def _mask(self, data):
        if self.mask_kind == "none":
            return None
        mask_shape = tuple(s if s == 1 or data.draw(st.booleans()) else 1 for s in self.shape)
        if self.mask_kind == "random":
            mask = self.rng.random(mask_shape) < data.draw(st.sampled_from([0.3, 0.7]))
        elif self.mask_kind == "empty rows":
            mask = self.rng.random(mask_shape) < 0.8
            axis = data.draw(st.integers(0, len(mask_shape) - 1))
            index = [slice(None)] * len(mask_shape)
            index[axis] = self.rng.integers(mask_shape[axis])
            mask[tuple(index)] = False
        elif self.mask_kind == "one valid":
            mask = np.zeros(mask_shape, bool)
            mask[tuple(self.rng.integers(s) for s in mask_shape)] = True
        else:
            mask = np.zeros(mask_shape, bool)
        return mask

    def transform(self, data):
        """``(a, b)``: a power-of-two scale and a per-group shift of ``group_shape`` keeping the grid exact."""
        k = data.draw(
            st.integers(-4, 4) if self.dtype == "float16" else st.integers(-8, 8),
            label="log2 scale",
        )
        t = self.rng.integers(
            -self.c_max, self.c_max + 1, size=self.group_shape
        )  # |c + t| <= 2 c_max
        return 2.0**k, np.ldexp(t.astype(float), self.exponent)


def _params(rng, shape, keys, dtype):
    """Scales of either sign in [0.25, 4] and biases in [-4, 4], of ``dtype``."""
    params = {}
    if "scale" in keys:
        params["scale"] = jnp.asarray(
            rng.uniform(0.25, 4, shape) * rng.choice([-1, 1], shape), dtype
        )
    if "bias" in keys:
        params["bias"] = jnp.asarray(rng.uniform(-4, 4, shape), dtype)
    return params


def _param_dtype(data, dtype):
    return data.draw(
        st.sampled_from(
            sorted({dtype, "float32"} if dtype != "float64" else {"float64", "float32"})
        ),
        label="param dtype",
    )


def _out_dtype(x_dtype, params):
    return jnp.result_type(jnp.dtype(x_dtype), *[v.dtype for v in params.values()])


# -- batch norm and batch renorm --------------------------------------------------------------------------


@functools.cache
def _batch_norm_program(axis, momentum, unbiased, renorm):
    """Training (outputs, state, gradients of sum(w y)) and inference outputs of one configuration."""

    def run(x, params, state, w, mask, epsilon, limits):
        def loss(x, params):
            kwargs = dict(
                training=True,
                axis=axis,
                momentum=momentum,
                unbiased_running_var=unbiased,
                epsilon=epsilon,
                mask=mask,
            )
            if renorm:
                y, new_state = jaxbn.batch_renorm(
                    x, params, state, r_max=limits[0], d_max=limits[1], **kwargs
                )
            else:
                y, new_state = jaxbn.batch_norm(x, params, state, **kwargs)
            dtype = jnp.promote_types(y.dtype, jnp.float32)
            return jnp.sum(w.astype(dtype) * y.astype(dtype)), (y, new_state)

        (_, (y, new_state)), (dx, dparams) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
            x, params
        )
        y_inference, _ = jaxbn.batch_norm(
            x, params, state, training=False, axis=axis, epsilon=epsilon
        )
        return y, new_state, dx, dparams, y_inference

    return run


def _check_batch_norm(data, dtype, renorm):
    shape = data.draw(shapes(), label="shape")
    ndim = len(shape)
    features, axis = data.draw(axes_of(ndim), label="feature axes")
    reduction = tuple(i for i in range(ndim) if i not in features)
    feature_shape = tuple(shape[i] for i in features)
    draw = Draw(data, dtype, shape, ab.keep(shape, reduction))
    rng = draw.rng
    param_dtype = _param_dtype(data, dtype)
    keys = data.draw(st.sampled_from([("scale", "bias"), ("scale",), ()]), label="params")
    params = _params(rng, feature_shape, keys, param_dtype)
    momentum = data.draw(st.sampled_from([0.0, 0.9, None]), label="momentum")
    unbiased = data.draw(st.booleans(), label="unbiased")
    epsilon = data.draw(st.sampled_from([1e-5, 1e-2, 1e-12]), label="epsilon")
    limits = data.draw(
        st.sampled_from([(1.0, 0.0), (1.5, 0.5), (3.0, 5.0), (np.inf, np.inf)]),
        label="r_max, d_max",
    )
    state_dtype = "float64" if dtype == "float64" and data.draw(st.booleans()) else "float32"
    compute = jnp.promote_types(jnp.dtype(dtype), jnp.float32)

    # running statistics near the batch's, at the initial (0, 1), or far from it
    first = ab.Normalized(draw.x, draw.valid, reduction, epsilon=epsilon)
    batch_mean = np.nan_to_num(first.mean.reshape(feature_shape).astype(float))
    batch_var = first.var.reshape(feature_shape).astype(float)
    where = data.draw(st.sampled_from(["near", "initial", "far"]), label="running statistics")
    if draw.grid:  # integers times 2^e (2^2e for the variance): exact after the transform below
        e = draw.exponent
        mean_int = np.round(np.ldexp(batch_mean, -e)).clip(-draw.c_max, draw.c_max)
        if where == "far":
            mean_int = np.where(mean_int > 0, -draw.c_max, draw.c_max)
        running_mean = np.ldexp(mean_int, e)
        running_var = np.ldexp(rng.integers(1, 2**10, feature_shape).astype(float), 2 * e)
    elif where == "initial":
        running_mean, running_var = np.zeros(feature_shape), np.ones(feature_shape)
    else:
        spread = np.sqrt(batch_var) + 1e-3 * np.abs(batch_mean) + 1e-6
        distance = rng.uniform(-3, 3, feature_shape) * (1e4 if where == "far" else 1)
        running_mean = batch_mean + distance * spread
        running_var = (batch_var + spread**2) * np.exp(rng.uniform(-2, 2, feature_shape))
    state = {
        "mean": jnp.asarray(running_mean, state_dtype),
        "var": jnp.asarray(running_var, state_dtype),
    }
    if momentum is None:
        state["count"] = jnp.asarray(
            data.draw(st.sampled_from([0.0, 3.0]), label="count"), jnp.float32
        )

    x = jnp.asarray(draw.x, dtype)
    out_dtype = _out_dtype(dtype, params)
    w = jnp.asarray(draw.w, out_dtype)
    mask = None if draw.mask is None else jnp.asarray(draw.mask)
    program = jax.jit(_batch_norm_program(axis, momentum, unbiased, renorm))
    eps = jnp.asarray(epsilon, compute)
    lim = jnp.asarray(limits, compute)
    with _quiet():
        y, new_state, dx, dparams, y_inference = program(x, params, state, w, mask, eps, lim)

    # the reference, on the values jaxbn was given
    x_values, w_values = ab.values(x), ab.values(w)
    valid = draw.valid
    single_value = draw.mask is None and math.prod(shape[i] for i in reduction) == 1
    ref, extra, renorm_units, scale, bias = ab.batch_norm_reference(
        x_values,
        valid,
        reduction,
        features,
        params,
        state,
        epsilon,
        w_values,
        compute,
        limits if renorm else None,
    )
    note(f"x={x_values!r}\nvalid={valid!r}\nstate={state!r}\nparams={params!r}")

    ab.check(
        "batch_norm output" if not renorm else "batch_renorm output",
        y,
        ref.y,
        ab.output_tolerance(ref, scale, bias, compute, out_dtype, extra),
        out_dtype,
    )
    expected, tolerance = ab.state_reference(
        state, ref, single_value, momentum, unbiased, feature_shape
    )
    for key in expected:
        ab.check(f"running {key}", new_state[key], expected[key], tolerance[key], state[key].dtype)
    ab.check("dx", dx, ref.dx, ab.dx_tolerance(ref, reduction, compute, dtype), dtype)
    sums = {
        "scale": (
            ref.w_x_hat,
            np.abs(w_values) * (1 + np.abs(ref.x_hat) + (renorm_units if renorm else 0)),
        ),
        "bias": (w_values, np.abs(w_values)),
    }
    for key in dparams:
        exact, magnitude = (
            np.broadcast_to(a, shape).sum(reduction).reshape(feature_shape) for a in sums[key]
        )
        ab.check(
            f"d{key}",
            dparams[key],
            exact,
            ab.sum_tolerance(magnitude, exact, reduction, compute, param_dtype),
            param_dtype,
        )
    run_mean, run_var = (
        ab.values(state[k]).reshape(ab.keep(shape, reduction)) for k in ("mean", "var")
    )
    inference = ab.Normalized(
        x_values,
        np.zeros(shape, bool),
        reduction,
        scale,
        bias,
        epsilon=epsilon,
        fallback=(run_mean, run_var),
    )
    finite = np.isfinite(x_values)
    ab.check(
        "inference output",
        y_inference,
        inference.y,
        ab.output_tolerance(inference, scale, bias, compute, out_dtype),
        out_dtype,
        where=finite,
    )

    if (
        draw.grid
    ):  # the same outputs for a * (x + b), a = 2^k, with the state and epsilon moved alike
        a, b = draw.transform(data)
        x2 = jnp.asarray(a * (draw.x + b), dtype)
        # exact by construction (a check of the draw): x + b stays on the grid and a is a power of two
        assert np.array_equal(ab.values(x2), a * (x_values + b), equal_nan=True)
        state2 = {
            **state,
            "mean": jnp.asarray(
                a * (ab.values(state["mean"]) + b.reshape(feature_shape)).astype(float), state_dtype
            ),
            "var": jnp.asarray(a * a * ab.values(state["var"]).astype(float), state_dtype),
        }
        with _quiet():
            y2, new_state2, dx2, dparams2, y_inference2 = program(
                x2, params, state2, w, mask, eps * a * a, lim
            )
        # (masked-out NaN/Inf are normalized as 0, which is not shifted: compared where x is finite)
        tol = 2 * ab.output_tolerance(ref, scale, bias, compute, out_dtype, extra)
        ab.check("invariance: output", y2, ab.values(y), tol, out_dtype, where=finite)
        ab.check(
            "invariance: inference output",
            y_inference2,
            ab.values(y_inference),
            2 * ab.output_tolerance(inference, scale, bias, compute, out_dtype),
            out_dtype,
            where=finite,
        )
        ab.check(
            "invariance: dx",
            a * ab.values(dx2),
            ab.values(dx),
            2 * ab.dx_tolerance(ref, reduction, compute, dtype),
            dtype,
        )
        b_features = b.reshape(feature_shape)
        moved = {"mean": a * (expected["mean"] + b_features), "var": a * a * expected["var"]}
        for key in ("mean", "var"):
            ab.check(
                f"invariance: running {key}",
                new_state2[key],
                moved[key],
                (a if key == "mean" else a * a) * tolerance[key]
                + ab.unit_roundoff(state_dtype) * np.abs(moved[key]),
                state_dtype,
            )


@pytest.mark.slow  # a property search
@given(data=st.data())
def test_batch_norm_matches_reference(data):
    """batch_norm: training outputs, running statistics, gradients; inference outputs; invariance."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    with jax.enable_x64(dtype == "float64"):
        _check_batch_norm(data, dtype, renorm=False)


@pytest.mark.slow  # a property search
@settings(max_examples=_examples(8))
@given(data=st.data())
def test_batch_renorm_matches_reference(data):
    """batch_renorm: the same, with r and d from the running statistics, clipped."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    with jax.enable_x64(dtype == "float64"):
        _check_batch_norm(data, dtype, renorm=True)


# -- layer, RMS, group and instance norm ------------------------------------------------------------------


@functools.cache
def _per_example_program(name, static):
    """``(x, params, w, mask, epsilon) -> (y, dx, dparams)`` for one normalizer and its static arguments."""
    function = getattr(jaxbn, name)
    kwargs = dict(static)

    def run(x, params, w, mask, epsilon):
        def loss(x, params):
            y = function(x, params, epsilon=epsilon, mask=mask, **kwargs)
            dtype = jnp.promote_types(y.dtype, jnp.float32)
            return jnp.sum(w.astype(dtype) * y.astype(dtype)), y

        (_, y), (dx, dparams) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
        return y, dx, dparams

    return run


def _per_example_case(data, name, shape):
    """(static kwargs, reduction axes and feature axes of the (grouped) view, view shape, groups)."""
    ndim = len(shape)
    if name in ("layer_norm", "rms_norm"):
        reduction, reduction_arg = data.draw(axes_of(ndim), label="reduction_axes")
        features, feature_arg = data.draw(axes_of(ndim), label="feature_axes")
        return (
            {"reduction_axes": reduction_arg, "feature_axes": feature_arg},
            reduction,
            features,
            shape,
        )
    if name == "instance_norm":  # at least one spatial axis (without one, the output is the bias)
        order = data.draw(st.permutations(range(1, ndim)), label="axes order")
        features = sorted(order[: data.draw(st.integers(1, ndim - 2), label="feature axes")])
        written = tuple(a - ndim if data.draw(st.booleans()) else a for a in features)
        feature_arg = written[0] if len(written) == 1 and data.draw(st.booleans()) else written
        reduction = [i for i in range(1, ndim) if i not in features]
        return {"feature_axes": feature_arg}, reduction, features, shape
    channels = shape[-1]
    divisors = [g for g in range(1, channels + 1) if channels % g == 0]
    groups = data.draw(st.sampled_from(divisors), label="num_groups")
    static = (
        {"num_groups": groups}
        if data.draw(st.booleans())
        else {"num_groups": None, "group_size": channels // groups}
    )
    if ndim > 1 and data.draw(st.booleans(), label="explicit reduction_axes"):
        reduction, reduction_arg = data.draw(
            axes_of(ndim, allowed=range(ndim - 1), nonempty=False), label="others"
        )
        static["reduction_axes"] = tuple(
            reduction_arg if isinstance(reduction_arg, tuple) else (reduction_arg,)
        ) + (-1,)
    else:
        reduction = list(range(1, ndim - 1)) if ndim > 1 else []
    view = shape[:-1] + (groups, channels // groups)
    return static, list(reduction) + [ndim], [ndim - 1, ndim], view


@pytest.mark.slow  # a property search
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "group_norm", "instance_norm"])
@settings(max_examples=_examples(5))
@given(data=st.data())
def test_per_example_norms_match_reference(name, data):
    """Outputs and gradients (x, scale, bias) within the bounds; the same for an exactly moved input."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    with jax.enable_x64(dtype == "float64"):
        _check_per_example(data, name, dtype)


def _check_per_example(data, name, dtype):
    shape = data.draw(shapes(min_dims=3 if name == "instance_norm" else 1), label="shape")
    static, reduction, features, view = _per_example_case(data, name, shape)
    grouped = name == "group_norm"
    group_shape = ab.keep(view, reduction)
    if grouped:  # statistics per (example, group): a shift constant over each group's channels
        group_shape = group_shape[:-2] + (group_shape[-2], 1)
    draw = Draw(data, dtype, view if grouped else shape, group_shape)
    rng = draw.rng
    feature_shape = (shape[-1],) if grouped else tuple(shape[i] for i in features)
    param_dtype = _param_dtype(data, dtype)
    keys = (
        ("scale",)
        if name == "rms_norm"
        else data.draw(st.sampled_from([("scale", "bias"), ("bias",), ()]))
    )
    params = _params(rng, feature_shape, keys, param_dtype)
    epsilon = data.draw(st.sampled_from([1e-6, 1e-2, 1e-12]), label="epsilon")
    compute = jnp.promote_types(jnp.dtype(dtype), jnp.float32)
    out_dtype = _out_dtype(dtype, params)
    x = jnp.asarray(draw.x.reshape(shape), dtype)
    w = jnp.asarray(draw.w.reshape(shape), out_dtype)
    mask = None if draw.mask is None else draw.mask
    if mask is not None and grouped:  # a mask of the view's shape, given in the input's shape
        mask = np.broadcast_to(mask, view).reshape(shape)
    program = jax.jit(_per_example_program(name, tuple(sorted(static.items()))))
    eps = jnp.asarray(epsilon, compute)
    y, dx, dparams = program(x, params, w, None if mask is None else jnp.asarray(mask), eps)

    x_values = ab.values(x).reshape(view)
    w_values = ab.values(w).reshape(view)
    valid = draw.valid
    view_features = [len(view) - 2, len(view) - 1] if grouped else features
    if grouped:
        broadcast = {
            k: ab.values(v).reshape(view[-2:]) * np.ones(view, ab.LD) for k, v in params.items()
        }
    else:
        broadcast = ab.broadcast_params(params, shape, features)
    scale, bias = broadcast.get("scale"), broadcast.get("bias")
    ref = ab.Normalized(
        x_values,
        valid,
        tuple(reduction),
        scale,
        bias,
        epsilon=epsilon,
        w=w_values,
        center=name != "rms_norm",
    )
    note(f"x={x_values!r}\nvalid={valid!r}\nparams={params!r}")
    ab.check(
        f"{name} output",
        ab.values(y).reshape(view),
        ref.y,
        ab.output_tolerance(ref, scale, bias, compute, out_dtype),
        out_dtype,
    )
    # at masked-out NaN/Inf (normalized as the constant 0) autodiff's derivative is 0, batch norm's
    # custom VJP gives scale r dy: either is finite, neither is compared
    finite = np.isfinite(x_values)
    assert not np.isnan(ab.values(dx)).any(), "a gradient is NaN"
    ab.check(
        f"{name} dx",
        ab.values(dx).reshape(view),
        ref.dx,
        ab.dx_tolerance(ref, tuple(reduction), compute, dtype),
        dtype,
        where=finite,
    )
    others = tuple(i for i in range(len(view)) if i not in view_features)
    sums = {
        "scale": (ref.w_x_hat, np.abs(w_values) * (1 + np.abs(ref.x_hat))),
        "bias": (w_values, np.abs(w_values)),
    }
    for key in dparams:
        exact, magnitude = (
            np.broadcast_to(a, view).sum(others).reshape(feature_shape) for a in sums[key]
        )
        ab.check(
            f"{name} d{key}",
            dparams[key],
            exact,
            ab.sum_tolerance(magnitude, exact, others, compute, param_dtype),
            param_dtype,
        )

    if (
        draw.grid
    ):  # a * (x + b), b constant over each statistic's elements (RMS norm: b = 0), eps * a^2
        a, b = draw.transform(data)
        if name == "rms_norm":
            b = 0 * b
        x2 = jnp.asarray((a * (draw.x + b)).reshape(shape), dtype)
        # exact by construction (a check of the draw): x + b stays on the grid and a is a power of two
        assert np.array_equal(ab.values(x2).reshape(view), a * (x_values + b))
        y2, dx2, _ = program(
            x2, params, w, None if mask is None else jnp.asarray(mask), eps * a * a
        )
        # a statistic without valid elements is (mean 0, var 0), which does not move with x
        counted = np.broadcast_to(ref.count > 0, view).reshape(shape)
        ab.check(
            f"invariance: {name} output",
            ab.values(y2),
            ab.values(y),
            2 * ab.output_tolerance(ref, scale, bias, compute, out_dtype).reshape(shape),
            out_dtype,
            counted,
        )
        ab.check(
            f"invariance: {name} dx",
            a * ab.values(dx2),
            ab.values(dx),
            2 * ab.dx_tolerance(ref, tuple(reduction), compute, dtype).reshape(shape),
            dtype,
            counted,
        )


# -- moments and merge_moments ----------------------------------------------------------------------------


@functools.cache
def _moments_program(axes, parts):
    """Moments of the whole, of each part (its own mask and shift) and merged, and a gradient."""

    def run(x, valid, part_masks, shifts, weights):
        whole = jaxbn.moments(x, axes, mask=valid)
        pieces = jax.vmap(lambda m, s: jaxbn.moments(x, axes, mask=m, shift=s))(part_masks, shifts)
        merged = jaxbn.merge_moments(
            [jax.tree.map(lambda leaf: leaf[i], pieces) for i in range(parts)]
        )

        def loss(x):
            m = jaxbn.moments(x, axes, mask=valid)
            return jnp.sum(weights[0] * m.mean + weights[1] * m.var)

        return whole, pieces, merged, jax.grad(loss)(x)

    return run


@pytest.mark.slow  # a property search
@given(data=st.data())
def test_moments_and_merged_parts_match_reference(data):
    """moments (and its gradient) within the bounds; the merge of any partition (own shifts, empty parts) too."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    with jax.enable_x64(dtype == "float64"):
        _check_moments(data, dtype)


def _check_moments(data, dtype):
    shape = data.draw(shapes(), label="shape")
    ndim = len(shape)
    axes, axes_arg = data.draw(axes_of(ndim, nonempty=False), label="axes")
    draw = Draw(data, dtype, shape, ab.keep(shape, axes))
    rng = draw.rng
    parts = data.draw(st.integers(1, 4), label="parts")
    first_empty = parts > 1 and data.draw(st.booleans(), label="first part empty")
    part_of = rng.integers(int(first_empty), parts, size=shape)
    part_masks = np.stack([draw.valid & (part_of == k) for k in range(parts)])
    feature_shape = tuple(s for i, s in enumerate(shape) if i not in axes)
    shift_kind = data.draw(
        st.sampled_from(["zero", "near", "far", "beyond sqrt(max)"]), label="part shifts"
    )
    first = ab.Normalized(draw.x, draw.valid, tuple(axes), epsilon=1.0)
    spread = np.sqrt(first.var.astype(float)) + 1e-3 * np.abs(first.mean.astype(float)) + 1e-6
    distance = {"zero": 0.0, "near": 1.0, "far": 1e4, "beyond sqrt(max)": 0.0}[shift_kind]
    shifts = np.where(
        distance == 0,
        0.0,
        np.nan_to_num(first.mean.astype(float))
        + distance * rng.uniform(-3, 3, (parts,) + first.mean.shape) * spread,
    )
    if shift_kind == "beyond sqrt(max)":  # |shift|^2 overflows float32
        shifts = rng.choice([-1e30, 1e30], (parts,) + first.mean.shape)
    shifts = shifts.reshape((parts,) + feature_shape)
    compute = jnp.promote_types(jnp.dtype(dtype), jnp.float32)
    x = jnp.asarray(draw.x, dtype)
    weights = rng.normal(size=(2,) + feature_shape)
    valid = np.broadcast_to(draw.valid, shape)
    program = jax.jit(_moments_program(axes_arg, parts))
    whole, pieces, merged, grad = program(
        x,
        jnp.asarray(valid),
        jnp.asarray(part_masks),
        jnp.asarray(shifts, compute),
        jnp.asarray(weights, compute),
    )
    x_values = ab.values(x)
    note(f"x={x_values!r}\nparts={part_masks!r}\nshifts={shifts!r}")

    def check(label, moments, mask):
        ref = ab.Normalized(x_values, mask, tuple(axes), epsilon=1.0)
        mean, var, count = (a.reshape(feature_shape) for a in (ref.mean, ref.var, ref.count))
        size = int(np.prod([shape[i] for i in axes]))  # (per statistic, valid or not)
        mean_tol, var_tol = ab.statistics_tolerance(mean, var, compute, size)
        empty = count == 0
        ab.check(f"{label} count", moments.count, count, 0)
        ab.check(f"{label} mean", np.where(empty, 0, ab.values(moments.mean)), mean, mean_tol)
        ab.check(f"{label} var", moments.var, var, var_tol)
        return mean, var, count

    mean, var, count = check("moments", whole, valid)
    for k in range(parts):
        check(f"part {k} moments", jax.tree.map(lambda leaf: leaf[k], pieces), part_masks[k])
    check("merged moments", merged, valid)
    assert np.all(np.isfinite(ab.values(merged.mean))), "a merged mean is not finite"
    # d/dx of sum(a mean + b var) = (a + 2 b (x - mean)) / n over the valid elements
    keep = ab.keep(shape, axes)
    a, b = (ab.values(jnp.asarray(v, compute)).reshape(keep) for v in weights)
    n = np.maximum(count.reshape(keep), 1)
    whole_ref = ab.Normalized(x_values, valid, tuple(axes), epsilon=1.0)
    centered = whole_ref.x_hat / whole_ref.r  # x - mean, exactly
    exact = np.where(valid, (a + 2 * b * centered) / n, 0)
    u, u_x = ab.compute_roundoff(compute), ab.unit_roundoff(dtype)
    magnitude = (np.abs(a) + 2 * np.abs(b) * (np.abs(centered) + np.sqrt(var.reshape(keep)))) / n
    ab.check(
        "moments gradient",
        grad,
        exact,
        u_x * np.abs(exact) + ab.STATISTICS_FACTOR * u * magnitude + ab.smallest(dtype),
        dtype,
    )


# -- eager equals jit ---------------------------------------------------------------------------------------

#: A few shapes (1 to 5 axes, size-1 axes): eager execution compiles each operation once per shape.
_EAGER_SHAPES = ((5,), (4, 1, 3), (2, 1, 2, 1, 4))


def _every_normalizer(x, params, state, mask, w):
    """Each public normalizer's training (or only) output, and batch norm's new state and gradient."""
    c = x.shape[-1]
    bn = functools.partial(jaxbn.batch_norm, training=True, momentum=0.9, mask=mask)
    loss = lambda x: jnp.sum(
        w * bn(x, params, state)[0]
    )  # linear: dx does not depend on y's rounding
    y, new_state = bn(x, params, state)
    return {
        "batch_norm": y,
        "batch_norm state": new_state,
        "batch_norm dx": jax.grad(loss)(x),
        "inference": jaxbn.batch_norm(x, params, state, training=False)[0],
        "batch_renorm": jaxbn.batch_renorm(
            x, params, state, training=True, r_max=2.0, d_max=1.0, mask=mask
        )[0],
        "layer_norm": jaxbn.layer_norm(x, params, mask=mask),
        "rms_norm": jaxbn.rms_norm(x, {"scale": params["scale"]}, mask=mask),
        "group_norm": jaxbn.group_norm(x, params, num_groups=2 if c % 2 == 0 else 1, mask=mask),
        "instance_norm": (jaxbn.instance_norm(x, params, mask=mask) if x.ndim > 2 else None),
        "moments": jaxbn.moments(x, tuple(range(x.ndim - 1)), mask=mask)[:3],  # mean, var, count
    }


@pytest.mark.slow  # a property search
@settings(
    max_examples=_examples(1)
)  # op-by-op execution compiles each operation: ~5 s per new example
@given(data=st.data())
def test_eager_equals_jit(data):
    """Every normalizer gives, op by op, what its jitted call gives (within the bound: XLA may fuse)."""
    dtype = data.draw(st.sampled_from(("float32", "bfloat16", "float16")), label="dtype")
    shape = data.draw(st.sampled_from(_EAGER_SHAPES), label="shape")
    draw = Draw(data, dtype, shape, shape)
    rng = draw.rng
    params = _params(rng, shape[-1:], ("scale", "bias"), "float32")
    state = {
        "mean": jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2, shape[-1:]), jnp.float32),
    }
    x = jnp.asarray(draw.x, dtype)
    mask = None if draw.mask is None else jnp.asarray(draw.mask)
    with _quiet():
        w = jnp.asarray(draw.w, jnp.float32)
        eager = _every_normalizer(x, params, state, mask, w)
        jitted = jax.jit(_every_normalizer)(x, params, state, mask, w)
    u = ab.STATISTICS_FACTOR * ab.compute_roundoff(dtype)
    for key, value in eager.items():
        for a, b in zip(jax.tree.leaves(value), jax.tree.leaves(jitted[key])):
            out_dtype = a.dtype
            a, b = ab.values(a), ab.values(b)
            # both within the documented bound of one exact value (whose terms are of the size of 1 + |b|)
            tolerance = 2 * (ab.unit_roundoff(out_dtype) * np.abs(b) + u * (1 + np.abs(b)))
            same_nan = np.isnan(a) & np.isnan(b)  # inference normalizes NaN (masked or not) to NaN
            ab.check(f"eager vs jit: {key}", a, b, tolerance, out_dtype, where=~same_nan)


# -- pmap, shard_map and jit with a sharded batch equal one device ----------------------------------------

_LOCAL = (
    3  # examples per device: every split of up to 24 valid examples over 8 devices, padding masked
)
_MD_SHAPE = (N_DEVICES * _LOCAL, 2, 3)
_MD_KINDS = ("pmap", "shard_map", "jit_sharded")


def _md_step(x, mask, params, state, w, limits, *, axis_name):
    def loss(x, params):
        y, new_state, moments = jaxbn.batch_norm(
            x,
            params,
            state,
            training=True,
            momentum=0.9,
            axis_name=axis_name,
            mask=mask,
            return_moments=True,
        )
        return jnp.sum(w * y), (y, new_state, moments)

    (_, (y, new_state, moments)), (dx, dparams) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        x, params
    )
    y_renorm, renorm_state = jaxbn.batch_renorm(
        x,
        params,
        state,
        training=True,
        r_max=limits[0],
        d_max=limits[1],
        momentum=0.9,
        axis_name=axis_name,
        mask=mask,
    )
    return y, new_state, moments.count, dx, dparams, y_renorm, renorm_state


@functools.cache
def _md_program(kind):
    """``(x, mask, params, state, w, limits) -> results`` on global arrays; states with a device axis."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    per_device = lambda a: a.reshape((N_DEVICES, -1) + a.shape[1:])
    merged = lambda a: a.reshape((-1,) + a.shape[2:])
    replicated = lambda t: jax.tree.map(lambda a: np.broadcast_to(a, (N_DEVICES,) + np.shape(a)), t)
    if kind in ("single", "jit_sharded"):
        step = jax.jit(functools.partial(_md_step, axis_name=None))
        sharding = NamedSharding(jax.make_mesh((N_DEVICES,), ("i",)), P("i"))
        put = (lambda a: a) if kind == "single" else (lambda a: jax.device_put(a, sharding))

        def run(x, mask, params, state, w, limits):
            y, new_state, count, dx, dparams, y_renorm, renorm_state = step(
                put(x), put(mask), params, state, put(w), limits
            )
            if kind == "jit_sharded":
                assert (
                    len(y.sharding.device_set) == N_DEVICES and not y.sharding.is_fully_replicated
                )
            return y, replicated(new_state), count, dx, dparams, y_renorm, replicated(renorm_state)

        return run
    local = functools.partial(_md_step, axis_name="i")
    if kind == "pmap":
        step = jax.pmap(local, axis_name="i", in_axes=(0, 0, None, None, 0, None))

        def run(x, mask, params, state, w, limits):
            y, new_state, count, dx, dparams, y_renorm, renorm_state = step(
                per_device(x), per_device(mask), params, state, per_device(w), limits
            )
            # each device differentiates its own loss: the parameters' gradient is the sum
            return (
                merged(y),
                new_state,
                count[0],
                merged(dx),
                jax.tree.map(lambda g: g.sum(0), dparams),
                merged(y_renorm),
                renorm_state,
            )

        return run
    mesh = jax.make_mesh((N_DEVICES,), ("i",))
    sharding = NamedSharding(mesh, P("i"))
    step = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P("i"), P("i"), P(), P(), P("i"), P()),
            out_specs=(P("i"), P(), P(), P("i"), P(), P("i"), P()),
        )
    )

    def run(x, mask, params, state, w, limits):
        put = lambda a: jax.device_put(a, sharding)
        y, new_state, count, dx, dparams, y_renorm, renorm_state = step(
            put(x), put(mask), params, state, put(w), limits
        )
        return y, replicated(new_state), count, dx, dparams, y_renorm, replicated(renorm_state)

    return run


@pytest.mark.slow  # a property search
@needs_devices
@settings(max_examples=_examples(6))
@given(data=st.data())
def test_devices_equal_one_device_for_any_split(data):
    """Any number of valid examples per device (0 to all, at any slots): every kind equals one device."""
    counts = data.draw(
        st.lists(st.integers(0, _LOCAL), min_size=N_DEVICES, max_size=N_DEVICES),
        label="valid examples per device",
    )
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    offset = data.draw(st.sampled_from([0.0, 1e2, 1e4, 1e6]), label="offset")
    scale = 10.0 ** data.draw(st.integers(-6, 6), label="log10 scale")
    padding = data.draw(st.sampled_from(["finite", "NaN"]), label="padding")
    limits = data.draw(
        st.sampled_from([(1.0, 0.0), (1.5, 0.5), (np.inf, np.inf)]), label="r_max, d_max"
    )
    rng = np.random.default_rng(seed)
    valid = np.zeros(_MD_SHAPE[0], bool)
    for device, n in enumerate(counts):
        valid[device * _LOCAL + rng.permutation(_LOCAL)[:n]] = True
    x = offset * rng.uniform(0.5, 1.5, 3) + scale * rng.normal(size=_MD_SHAPE)
    junk = (
        rng.normal(size=_MD_SHAPE) * 1e3 + 1e5
        if padding == "finite"
        else np.full(_MD_SHAPE, np.nan)
    )
    x = np.where(valid[:, None, None], x, junk).astype(np.float32)
    mask = valid[:, None, None]
    w = rng.normal(size=_MD_SHAPE).astype(np.float32)
    params = _params(rng, (3,), ("scale", "bias"), "float32")
    if data.draw(st.booleans(), label="running statistics near the batch's"):
        state = {
            "mean": jnp.asarray(offset + scale * rng.normal(size=3), jnp.float32),
            "var": jnp.asarray(scale**2 * rng.uniform(0.5, 2, 3), jnp.float32),
        }
    else:
        state = jaxbn.batch_norm_init(3)[1]
    args = (x, mask, params, state, w, jnp.asarray(limits, jnp.float32))
    with _quiet():
        single = _md_program("single")(*args)

    # one device against the exact statistics of the valid examples
    full = np.broadcast_to(mask, _MD_SHAPE)
    x_values, w_values = ab.values(x), ab.values(w)
    ref, _, _, scale_b, bias_b = ab.batch_norm_reference(
        x_values, full, (0, 1), [2], params, state, 1e-5, w_values, jnp.float32, None
    )
    renorm_ref, extra, _, _, _ = ab.batch_norm_reference(
        x_values, full, (0, 1), [2], params, state, 1e-5, w_values, jnp.float32, limits
    )
    y_tol = ab.output_tolerance(ref, scale_b, bias_b, jnp.float32, jnp.float32)
    renorm_tol = ab.output_tolerance(renorm_ref, scale_b, bias_b, jnp.float32, jnp.float32, extra)
    dx_tol = ab.dx_tolerance(ref, (0, 1), jnp.float32, jnp.float32)
    expected, tolerance = ab.state_reference(state, ref, False, 0.9, False, (3,))
    note(f"x={x!r}\nvalid={valid!r}\nstate={state!r}")
    y, new_state, count, dx, dparams, y_renorm, renorm_state = single
    ab.check("one device: output", y, ref.y, y_tol)
    ab.check("one device: renorm output", y_renorm, renorm_ref.y, renorm_tol)
    ab.check("one device: dx", dx, ref.dx, dx_tol)
    ab.check("one device: count", count, np.full(3, 2 * valid.sum()), 0)
    for key in ("mean", "var"):
        ab.check(f"one device: running {key}", new_state[key][0], expected[key], tolerance[key])
        ab.check(
            f"one device: renorm running {key}", renorm_state[key][0], expected[key], tolerance[key]
        )

    for kind in _MD_KINDS:
        with _quiet():
            got = _md_program(kind)(*args)
        # both within the bound of the exact value: apart by at most twice the bound
        for label, i, tol in (
            ("output", 0, y_tol),
            ("dx", 3, dx_tol),
            ("renorm output", 5, renorm_tol),
        ):
            ab.check(f"{kind}: {label}", got[i], ab.values(single[i]), 2 * tol)
        ab.check(f"{kind}: count", got[2], ab.values(count), 0)
        for i, label in ((1, "running"), (6, "renorm running")):
            for key in ("mean", "var"):
                ab.check(
                    f"{kind}: {label} {key}",
                    got[i][key],
                    ab.values(single[i][key]),
                    2 * tolerance[key],
                )
        u = ab.STATISTICS_FACTOR * ab.compute_roundoff(jnp.float32)
        for key, terms in (
            ("scale", np.abs(w_values) * (1 + np.abs(ref.x_hat))),
            ("bias", np.abs(w_values)),
        ):
            ab.check(
                f"{kind}: d{key}",
                got[4][key],
                ab.values(dparams[key]),
                2 * u * terms.sum((0, 1)) + 1e-30,
            )


# -- regressions: what the search found (each fixed in jaxbn/) --------------------------------------------


def test_renorm_with_one_value_per_feature_applies_the_correction():
    """batch_renorm of a (1, C) batch: scale * d + bias (the normalized value is 0), as a masked batch gives.

    It returned the bias, dropping batch renormalization's d (found by test_batch_renorm_matches_reference).
    """
    x = jnp.array([[3.0, 10.0]])
    params = {"scale": jnp.array([2.0, 1.0]), "bias": jnp.array([0.5, 0.0])}
    state = {"mean": jnp.array([1.0, 0.0]), "var": jnp.array([4.0, 1.0])}
    run = lambda **kw: jaxbn.batch_renorm(
        x, params, state, training=True, r_max=3.0, d_max=5.0, **kw
    )[0]
    with _quiet():
        y, masked = jax.jit(lambda: (run(), run(mask=jnp.ones((1, 1), bool))))()
    d = np.clip((np.array([3.0, 10.0]) - [1.0, 0.0]) / np.sqrt(np.array([4.0, 1.0]) + 1e-5), -5, 5)
    np.testing.assert_allclose(y[0], 2.0 * d * np.array([1, 0.5]) + np.array([0.5, 0.0]), rtol=1e-6)
    np.testing.assert_allclose(y, masked, rtol=1e-6, atol=1e-6)  # two code paths: equal to rounding


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm"])
def test_half_precision_gradients_round_once(name):
    """float16/bfloat16 input: the gradient is the float32 one rounded once (it summed cancelling terms in half).

    Checked as within half an ulp of the half dtype of the float32 gradient (another program, so equal to it
    only to float32 rounding): not bit for bit against the float32 gradient cast, which a float32 value within
    rounding of a half-way point could round either way.

    rms_norm of one float16 value gave dx = 0 for -1.57e-4, layer_norm in bfloat16 was two ulps off
    (found by test_per_example_norms_match_reference).
    """
    dtype = jnp.float16 if name == "rms_norm" else jnp.bfloat16
    x = (
        jnp.array([0.12573242], dtype)
        if name == "rms_norm"
        else jnp.array([-1.140625, -1.203125, -1.15625, -1.09375], dtype)
    )
    params = {"scale": jnp.array([-0.312], dtype)} if name == "rms_norm" else {"bias": jnp.zeros(4)}
    fn = getattr(jaxbn, name)
    w = jnp.linspace(-1, 1, x.size)
    gradient = jax.grad(
        lambda x: jnp.sum(w * fn(x, params, epsilon=1e-6 if name == "rms_norm" else 1e-2))
    )
    grad, exact = jax.jit(lambda x: (gradient(x), gradient(x.astype(jnp.float32))))(x)
    exact = np.asarray(exact, np.float64)
    error = np.abs(np.asarray(grad.astype(jnp.float32), np.float64) - exact)
    half_ulp = 0.5 * float(jnp.finfo(dtype).eps) * 2.0 ** np.floor(np.log2(np.abs(exact)))
    assert np.all(error <= half_ulp * (1 + 1e-3)), (
        grad,
        exact,
        error / half_ulp,
    )  # correctly rounded
    assert float(jnp.abs(grad).max()) > 0


@pytest.mark.parametrize("function", ["batch_norm", "batch_renorm", "instance_norm"])
def test_one_value_per_feature_in_float16_with_a_tiny_epsilon_has_gradient_zero(function):
    """x - x with scale / sqrt(1e-12) > 65504: the two cotangents were opposite float16 infinities, NaN."""
    x = jnp.array([[-9467.0, 3.0]], jnp.float16)
    params = {
        "scale": jnp.array([1.784, 1.0], jnp.float16),
        "bias": jnp.array([-1.835, 0.0], jnp.float16),
    }
    state = {"mean": jnp.array([-9467.568, 0.0]), "var": jnp.array([82.19807, 1.0])}
    calls = {
        "batch_norm": lambda x, p: jaxbn.batch_norm(x, p, state, training=True, epsilon=1e-12)[0],
        "batch_renorm": lambda x, p: jaxbn.batch_renorm(
            x, p, state, training=True, epsilon=1e-12, r_max=3.0, d_max=5.0
        )[0],
        "instance_norm": lambda x, p: jaxbn.instance_norm(x, p, epsilon=1e-12),
    }
    with _quiet():
        dx, dparams = jax.jit(
            jax.grad(lambda x, p: jnp.sum(calls[function](x, p).astype(jnp.float32)), (0, 1))
        )(x, params)
    # exact: x - x has the cotangents g and -g (the same number), whose sum is exactly 0
    np.testing.assert_array_equal(dx, 0)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(dparams))


def test_merge_moments_ignores_where_empty_parts_are():
    """An empty part's shift may lie anywhere: it gave NaN (0 * inf), or as the first part, mean 0."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 2)) + 1000, jnp.float32)

    @jax.jit
    def merges(x, far):
        whole = jaxbn.moments(x, 0)
        empty = jaxbn.moments(x, 0, mask=jnp.zeros((8, 1), bool), shift=jnp.full(2, far))
        parts = (
            [empty, whole],
            [whole, empty],
            [empty, jaxbn.moments(x[:3], 0), empty, jaxbn.moments(x[3:], 0)],
        )
        return whole, [jaxbn.merge_moments(p) for p in parts], jaxbn.merge_moments([empty, empty])

    for far in (1e20, 1e6, -3e38):
        whole, merged, nothing = merges(x, far)
        for m in merged:
            np.testing.assert_allclose(m.mean, whole.mean, rtol=1e-6)
            np.testing.assert_allclose(m.var, whole.var, rtol=1e-5)
            np.testing.assert_array_equal(m.count, 8.0)  # exact: a count of elements, 8 + 0
        # no data at all: count 0, variance 0 (exact: every part's term is a 0 selected by count > 0), no NaN
        assert np.isfinite(np.asarray(nothing.mean)).all() and np.all(np.asarray(nothing.var) == 0)
