"""Numerical stress: values at the edges of each dtype, for every public normalizer at once.

Near float32's maximum (where squares overflow), float16 inputs whose squares exceed float16's
range, subnormals, constant features (variance exactly 0) and tiny variances (1e-12) at large
offsets. Where the exact statistics are representable in the dtype jaxbn computes in, every
output, gradient, running statistic and moment is within the bounds of docs/accuracy.md
(tests/accuracy_bounds.py) and nothing is NaN or Inf that is finite in exact arithmetic. Where a
variance (RMS norm: a mean square) is beyond that dtype, the documented behaviour: the mean is
exact, the variance +inf, the normalized value 0 (the output is the bias, batch renorm's
``scale * d + bias``), gradients finite, and batch norm keeps its running statistics.

One program per input dtype computes everything (compiled once, reused by every case).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from tests import accuracy_bounds as ab

SHAPE = (
    4,
    4,
    4,
)  # batch norm: 16 values per channel; per-example norms: 4 (layer, RMS, instance) or 8 (group)
MOMENTUM = 0.9
LIMITS = (3.0, 5.0)  # batch renorm's r_max, d_max
MAX32 = float(jnp.finfo(jnp.float32).max)


def _normal(rng, clip=3.0):
    return np.clip(rng.normal(size=SHAPE), -clip, clip)


#: name: (dtype, values from a generator, epsilon). Each case's regime (variance within the compute
#: dtype or beyond it, per-example gradients within their domain or not) follows from the exact values.
CASES = {
    # squares overflow float32, the variance does not: sums re-taken scaled or around a better shift
    "float32 std 1e19 (squares overflow)": ("float32", lambda r: 1e19 * _normal(r), 1e-5),
    "float32 offset 1e20, std 1e18": ("float32", lambda r: 1e20 + 1e18 * _normal(r), 1e-5),
    "float32 offset -3e38, std 1e18": ("float32", lambda r: -3e38 + 1e18 * _normal(r), 1e-5),
    # the variance itself is beyond float32: documented behaviour
    "float32 near max, relative spread 1e-3": (
        "float32",
        lambda r: 3.3e38 * (1 + 1e-3 * _normal(r)),
        1e-5,
    ),
    "float32 both signs near max": ("float32", lambda r: 3e38 * r.choice([-1.0, 1.0], SHAPE), 1e-5),
    "float32 std 1e20": ("float32", lambda r: 1e20 * _normal(r), 1e-5),
    # the per-example norms' gradients at the edge of their domain (variance 2^100 ~ 1.3e30)
    "float32 std 1e15": ("float32", lambda r: 1e15 * _normal(r), 1e-5),
    "bfloat16 near max": ("bfloat16", lambda r: 3e38 * (1 + 1e-2 * _normal(r)), 1e-5),
    # float16 squares beyond float16 (the statistics are float32)
    "float16 squares beyond float16": ("float16", lambda r: 200 + 100 * _normal(r), 1e-5),
    "float16 near its max": (
        "float16",
        lambda r: np.clip(6.2e4 + 3e3 * _normal(r), -65504, 65504),
        1e-5,
    ),
    "float16 both signs near its max": (
        "float16",
        lambda r: 65504 * r.choice([-1.0, 1.0], SHAPE),
        1e-5,
    ),
    # the mean's first pass scales by 2^-(2 + log2 n): products below tiny flushed (its floor)
    "float32 values near 1e-36": ("float32", lambda r: 1e-36 * (2 + _normal(r)), 1e-5),
    # subnormals
    "float32 subnormal values": ("float32", lambda r: 1e-40 * _normal(r), 1e-5),
    "float32 subnormal variance": ("float32", lambda r: 1e-20 * _normal(r), 1e-5),
    # squares just above tiny (variance ~5e-38): the variance's floor is tiny, not n tiny (a sum of
    # squares scaled down by ~1/n, which could not overflow, would flush them)
    "float32 squares just above tiny": ("float32", lambda r: 2.2e-19 * _normal(r), 1e-5),
    # epsilon below EPSILON_MIN: a flushed variance is no longer negligible, the documented behaviour
    "float32 smallest normal epsilon": (
        "float32",
        lambda r: 1e-20 * _normal(r),
        float(jnp.finfo(jnp.float32).tiny),
    ),
    "float16 subnormal values": ("float16", lambda r: 6e-8 * np.round(8 * _normal(r)), 1e-12),
    # constant features: variance exactly 0, the output exactly the bias
    "float32 constant 0": ("float32", lambda r: np.zeros(SHAPE), 1e-5),
    "float32 constant 1e6": ("float32", lambda r: np.full(SHAPE, -1e6), 1e-12),
    "float32 constant at the maximum": ("float32", lambda r: np.full(SHAPE, MAX32), 1e-5),
    "float32 constant at minus the maximum": ("float32", lambda r: np.full(SHAPE, -MAX32), 1e-5),
    "float32 constant subnormal": ("float32", lambda r: np.full(SHAPE, 1e-40), 1e-5),
    "float16 constant at its maximum": ("float16", lambda r: np.full(SHAPE, 65504.0), 1e-12),
    "bfloat16 constant near the maximum": ("bfloat16", lambda r: np.full(SHAPE, 3e38), 1e-5),
    "float64 constant 1e300": ("float64", lambda r: np.full(SHAPE, 1e300), 1e-5),
    # tiny variances at large offsets
    "float64 variance 1e-12 at offset 1e6": ("float64", lambda r: 1e6 + 1e-6 * _normal(r), 1e-24),
    "float64 variance 1e-12 at offset 1e12": ("float64", lambda r: 1e12 + 1e-6 * _normal(r), 1e-24),
    "float32 variance 1e-12 at offset 1": ("float32", lambda r: 1 + 1e-6 * _normal(r), 1e-20),
    "float32 spread 1e-6 at offset 1e6 (rounds to constant)": (
        "float32",
        lambda r: 1e6 + 1e-6 * _normal(r),
        1e-20,
    ),
    "float64 std 5e153 (squares overflow)": ("float64", lambda r: 5e153 * _normal(r), 1e-5),
}


def _losses(x, params, w, state, epsilon):
    """Every normalizer's output and gradient (of sum(w * y)), batch norm's state, and moments."""
    results = {}

    def train(fn, extra=None):
        def loss(x, p):
            y, new_state = fn(x, p)
            return jnp.sum(w * y.astype(w.dtype)), (y, new_state)

        (_, (y, new_state)), (dx, dp) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
        return y, new_state, dx, dp

    bn = functools.partial(
        jaxbn.batch_norm, state=state, training=True, momentum=MOMENTUM, epsilon=epsilon
    )
    results["batch_norm"] = train(lambda x, p: bn(x, p))
    results["batch_renorm"] = train(
        lambda x, p: jaxbn.batch_renorm(
            x,
            p,
            state,
            training=True,
            momentum=MOMENTUM,
            epsilon=epsilon,
            r_max=LIMITS[0],
            d_max=LIMITS[1],
        )
    )
    results["inference"] = jaxbn.batch_norm(x, params, state, training=False, epsilon=epsilon)[0]
    per_example = {
        "layer_norm": lambda x, p: (jaxbn.layer_norm(x, p, epsilon=epsilon), None),
        "rms_norm": lambda x, p: (jaxbn.rms_norm(x, {"scale": p["scale"]}, epsilon=epsilon), None),
        "group_norm": lambda x, p: (jaxbn.group_norm(x, p, num_groups=2, epsilon=epsilon), None),
        "instance_norm": lambda x, p: (jaxbn.instance_norm(x, p, epsilon=epsilon), None),
    }
    for name, fn in per_example.items():
        results[name] = train(fn)
    results["moments"] = jaxbn.moments(x, (0, 1))
    return results


@functools.cache
def _program(dtype):
    return jax.jit(_losses)


#: (normalizer, reduction axes of its statistics in the view, view shape, centred)
_VIEWS = {
    "layer_norm": ((2,), SHAPE, True),
    "rms_norm": ((2,), SHAPE, False),
    "group_norm": ((1, 3), SHAPE[:2] + (2, 2), True),
    "instance_norm": ((1,), SHAPE, True),
}


#: The cases the default tier runs (one float32 program): squares beyond float32, a variance beyond
#: it (the state kept), a constant feature at the maximum. The whole matrix is the slow tier.
DEFAULT_TIER = (
    "float32 std 1e19 (squares overflow)",
    "float32 std 1e20",
    "float32 constant at the maximum",
)


@pytest.mark.parametrize(
    "case",
    [
        case if case in DEFAULT_TIER else pytest.param(case, marks=pytest.mark.slow)
        for case in sorted(CASES)
    ],
)
def test_stress(case):
    dtype, make, epsilon = CASES[case]
    with jax.enable_x64(dtype == "float64"):
        _check(case, dtype, make, epsilon)


def _check(case, dtype, make, epsilon):
    rng = np.random.default_rng(sum(map(ord, case)))
    compute = jnp.promote_types(jnp.dtype(dtype), jnp.float32)
    big = ab.LD(float(jnp.finfo(compute).max))
    x = jnp.asarray(make(rng), dtype)
    x_values = ab.values(x)
    assert np.isfinite(x_values).all()
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 2, 4), compute),
        "bias": jnp.asarray(rng.uniform(-2, 2, 4), compute),
    }
    state = {
        "mean": jnp.asarray(rng.normal(size=4), compute),
        "var": jnp.asarray(rng.uniform(0.5, 2, 4), compute),
    }
    w = jnp.asarray(rng.normal(size=SHAPE), compute)
    w_values = ab.values(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jaxbn.DegenerateBatchWarning)  # nothing here is degenerate
        results = _program(dtype)(x, params, w, state, jnp.asarray(epsilon, compute))
    for name, leaf in jax.tree_util.tree_leaves_with_path(results):
        assert not np.isnan(ab.values(leaf)).any(), f"{case}: NaN in {jax.tree_util.keystr(name)}"
    if (
        epsilon < ab.EPSILON_MIN[jnp.dtype(compute).name]
    ):  # outside the bounds' domain: finite, that is all
        for name, leaf in jax.tree_util.tree_leaves_with_path(results):
            assert np.isfinite(ab.values(leaf)).all(), (
                f"{case}: {jax.tree_util.keystr(name)} is not finite"
            )
        return

    # batch norm and renorm: the statistics of each channel over (0, 1)
    reduction, features = (0, 1), [2]
    out = compute  # params in the compute dtype: outputs there too
    common = (x_values, np.ones(SHAPE, bool), reduction, features, params, state, epsilon)
    ref, _, _, scale, bias = ab.batch_norm_reference(*common, w_values, compute, None)
    renorm_ref, extra, _, _, _ = ab.batch_norm_reference(*common, w_values, compute, LIMITS)
    fits = ref.var <= big * (1 - 1e-6)  # keepdims: the variance is a number in the compute dtype
    beyond = ref.var >= big * (1 + 1e-6)
    assert (fits | beyond).all(), "a case must not sit on the boundary of the dtype"
    fits_b, beyond_b = (np.broadcast_to(a, SHAPE) for a in (fits, beyond))
    moments = results["moments"]
    mean_tol, var_tol = ab.statistics_tolerance(ref.mean, ref.var, compute, SHAPE[0] * SHAPE[1])
    ab.check(
        f"{case}: moments mean", moments.mean, ref.mean.reshape(4), mean_tol.reshape(4), compute
    )
    ab.check(
        f"{case}: moments var",
        moments.var,
        ref.var.reshape(4),
        var_tol.reshape(4),
        compute,
        fits.reshape(4),
    )
    assert np.all(np.isposinf(ab.values(moments.var))[beyond.reshape(4)]), (
        "a variance beyond the dtype is +inf"
    )

    y, new_state, dx, dparams = results["batch_norm"]
    ab.check(
        f"{case}: batch_norm output",
        y,
        ref.y,
        ab.output_tolerance(ref, scale, bias, compute, out),
        out,
        fits_b,
    )
    # exact: a variance beyond the dtype gives rsqrt = 0, so the normalized value is a product with exactly 0
    # (the centring selected to 0) and the output the bias itself
    np.testing.assert_array_equal(ab.values(y)[beyond_b], bias[beyond_b])
    ab.check(
        f"{case}: batch_norm dx",
        dx,
        ref.dx,
        ab.dx_tolerance(ref, reduction, compute, dtype),
        dtype,
        fits_b,
    )
    np.testing.assert_array_equal(
        ab.values(dx)[beyond_b], 0
    )  # exact: a product with the gain rsqrt = 0
    if (
        beyond.any()
    ):  # the batch's statistics are not finite: the state is kept, whole (selected: exact)
        for key in state:
            np.testing.assert_array_equal(new_state[key], state[key])
    else:
        expected, tolerance = ab.state_reference(state, ref, False, MOMENTUM, False, (4,))
        for key in expected:
            ab.check(
                f"{case}: running {key}", new_state[key], expected[key], tolerance[key], compute
            )
    for key, terms in (
        ("scale", np.abs(w_values) * (1 + np.abs(ref.x_hat))),
        ("bias", np.abs(w_values)),
    ):
        exact = (ref.w_x_hat if key == "scale" else w_values).sum(reduction)
        tolerance = ab.sum_tolerance(terms.sum(reduction), exact, reduction, compute, compute)
        where = fits.reshape(4) if key == "scale" else None
        ab.check(f"{case}: batch_norm d{key}", dparams[key], exact, tolerance, compute, where)
    # exact: x_hat = 0 there (selected), so every term of the sum is 0
    np.testing.assert_array_equal(ab.values(dparams["scale"])[beyond.reshape(4)], 0)

    y_renorm = results["batch_renorm"][0]
    ab.check(
        f"{case}: batch_renorm output",
        y_renorm,
        renorm_ref.y,
        ab.output_tolerance(renorm_ref, scale, bias, compute, out, extra),
        out,
        fits_b,
    )
    d = np.broadcast_to(renorm_ref.offset, SHAPE)
    ab.check(
        f"{case}: batch_renorm output, variance beyond",
        y_renorm,
        scale * d + bias,
        ab.output_tolerance(renorm_ref, scale, bias, compute, out, extra),
        out,
        beyond_b,
    )

    inference = ab.Normalized(
        x_values,
        np.zeros(SHAPE, bool),
        reduction,
        scale,
        bias,
        epsilon=epsilon,
        fallback=(
            ab.values(state["mean"]).reshape(1, 1, 4),
            ab.values(state["var"]).reshape(1, 1, 4),
        ),
    )
    ab.check(
        f"{case}: inference output",
        results["inference"],
        inference.y,
        ab.output_tolerance(inference, scale, bias, compute, out),
        out,
    )

    # per-example norms
    for name, (axes, view, centred) in _VIEWS.items():
        y, _, dx, dparams = results[name]
        xv, wv = x_values.reshape(view), w_values.reshape(view)
        if name == "group_norm":
            scale_v, bias_v = (
                np.broadcast_to(ab.values(params[k]).reshape(2, 2), view) for k in ("scale", "bias")
            )
        else:
            scale_v, bias_v = (
                np.broadcast_to(ab.values(params[k]), view) for k in ("scale", "bias")
            )
        bias_v = bias_v if centred else None
        r = ab.Normalized(
            xv, np.ones(view, bool), axes, scale_v, bias_v, epsilon=epsilon, w=wv, center=centred
        )
        fits_v = np.broadcast_to(r.var <= big * (1 - 1e-6), view)
        beyond_v = np.broadcast_to(r.var >= big * (1 + 1e-6), view)
        assert (fits_v | beyond_v).all(), f"{case}: {name}: a variance on the boundary of the dtype"
        yv, dxv = ab.values(y).reshape(view), ab.values(dx).reshape(view)
        ab.check(
            f"{case}: {name} output",
            yv,
            r.y,
            ab.output_tolerance(r, scale_v, bias_v, compute, out),
            out,
            fits_v,
        )
        # gradients within the bound up to GRADIENT_VARIANCE_MAX, finite beyond
        in_domain = fits_v & np.broadcast_to(
            r.var <= ab.GRADIENT_VARIANCE_MAX[jnp.dtype(compute).name], view
        )
        ab.check(
            f"{case}: {name} dx",
            dxv,
            r.dx,
            ab.dx_tolerance(r, axes, compute, dtype),
            dtype,
            in_domain,
        )
        representable = (
            np.abs(r.dx) < float(jnp.finfo(dtype).max) / 2
        )  # (float16 dx = r dy may exceed 65504)
        assert np.isfinite(dxv[representable]).all(), f"{case}: {name} dx is not finite"
        assert np.isfinite(ab.values(dparams["scale"])).all(), (
            f"{case}: {name} dscale is not finite"
        )
        # exact, as for batch norm: beyond the dtype the normalized value is a product with rsqrt = 0
        np.testing.assert_array_equal(
            yv[beyond_v], (0 if bias_v is None else bias_v)[beyond_v] if centred else 0
        )


report_worst_ratios = (
    ab.report_worst_ratios
)  # autouse, per module: JAXBN_REPORT_RATIOS=1 prints the worst


# -- regressions (each fixed in jaxbn/) -----------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [1e-38, 1e-40, 1e-45])
def test_subnormal_epsilon_is_refused(epsilon):
    """XLA flushes a subnormal epsilon to 0: a constant feature gave rsqrt(0) * 0 = NaN; now a ValueError."""
    with pytest.raises(
        ValueError, match="epsilon must be a finite number > 0 in the float32 .*smallest normal"
    ):
        jax.eval_shape(lambda x: jaxbn.layer_norm(x, epsilon=epsilon), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="smallest normal"):
        jax.eval_shape(
            lambda x: jaxbn.batch_norm(
                x, {}, jaxbn.batch_norm_init(2)[1], training=True, epsilon=epsilon
            ),
            jnp.ones((4, 2)),
        )
    tiny = float(jnp.finfo(jnp.float32).tiny)  # the smallest normal number itself is accepted
    assert np.isfinite(
        np.asarray(jax.jit(lambda x: jaxbn.layer_norm(x, epsilon=tiny))(jnp.ones((2, 3))))
    ).all()


def test_moments_of_values_of_both_signs_near_the_maximum_under_jit():
    """Partial sums overflowing to +inf and -inf gave a NaN mean (jit) or -inf (x - mean overflowed)."""
    x = jnp.asarray(3e38 * np.random.default_rng(0).choice([-1.0, 1.0], (16, 4)), jnp.float32)
    exact = np.asarray(x, np.float64).mean(0)
    for shift in (None, jnp.asarray([0.76, -1.05, -1.93, -0.78], jnp.float32)):
        for m in (jax.jit(lambda x: jaxbn.moments(x, 0, shift=shift))(x),):
            np.testing.assert_allclose(m.mean, exact, rtol=1e-6)
            assert np.all(np.isposinf(np.asarray(m.var)))  # beyond float32: +inf, not NaN


@pytest.mark.parametrize("first", [0.0, 1e-30, 1e37, -2e38])
def test_mean_near_the_maximum_whatever_the_first_element(first):
    """The first valid element (the sums' shift) far below values near the maximum: their sum around it
    overflowed, and the mean came out as that element (0 for an exact 1.6e38); only a first element
    near the maximum scaled the sums. Now the first pass never overflows: the mean is within its bound
    in moments, batch norm's returned moments and a masked batch, eager and jitted."""
    tail = np.array([3e38, 3e38, -1e38, 2e38, 3e38, 1e38, 3e38, -3e38, 3e38, 2.5e38, 3e38])
    x = jnp.asarray(np.concatenate([[first], tail])[:, None] * [1.0, -1.0], jnp.float32)
    exact, var = np.asarray(x, np.float64).mean(0), np.asarray(x, np.float64).var(0)
    bound = ab.statistics_tolerance(exact, var, jnp.float32, 2 * x.shape[0])[0]
    # every other row masked out, NaN there
    padded = jnp.stack([x, jnp.full_like(x, np.nan)], 1).reshape(-1, 2)
    mask = jnp.asarray(np.arange(padded.shape[0]) % 2 == 0)[:, None]
    params, state = jaxbn.batch_norm_init(2)
    train = dict(training=True, return_moments=True)
    for run in (lambda f: f, jax.jit):
        means = {
            "moments": run(lambda x: jaxbn.moments(x, 0).mean)(x),
            "masked": run(lambda x: jaxbn.moments(x, 0, mask=mask).mean)(padded),
            "batch_norm": run(lambda x: jaxbn.batch_norm(x, params, state, **train)[2].mean)(x),
        }
        for name, mean in means.items():
            assert np.all(np.abs(np.asarray(mean, np.float64) - exact) <= bound), (
                name,
                mean,
                exact,
            )


def test_layer_norm_gradient_at_std_1e15():
    """autodiff's rsqrt derivative, -rsqrt(v) / v / 2, underflowed for v > ~1e25: the gradient was 44% off."""
    rng = np.random.default_rng(0)
    x = (1e15 * np.clip(rng.normal(size=(4, 8)), -3, 3)).astype(np.float32)
    w = rng.normal(size=(4, 8)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(w * jaxbn.layer_norm(x))))(jnp.asarray(x))
    ref = ab.Normalized(ab.values(x), np.ones(x.shape, bool), (1,), epsilon=1e-6, w=ab.values(w))
    ab.check(
        "layer_norm dx at std 1e15",
        grad,
        ref.dx,
        ab.dx_tolerance(ref, (1,), jnp.float32, jnp.float32),
    )


def test_renorm_without_limits_on_a_variance_beyond_float32():
    """r_max = inf: r = sqrt(inf / var) was inf, times rsqrt(inf) = 0: NaN outputs and gradients."""
    x = jnp.asarray(
        3.3e38 * (1 + 1e-3 * np.random.default_rng(0).normal(size=(16, 2))), jnp.float32
    )
    params, state = jaxbn.batch_norm_init(2)

    def loss(x, p):
        y, _ = jaxbn.batch_renorm(x, p, state, training=True, r_max=np.inf, d_max=5.0)
        return jnp.sum(y), y

    (_, y), (dx, dparams) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, params)
    # Exact by construction: x_hat = 0 (rsqrt(inf) = 0, r selected as 1), d clipped to exactly 5 (a select),
    # scale 1 and bias 0: y = 1 * 5 + 0; dx a product with the gain 0; dscale a sum of 16 fives (small integers).
    np.testing.assert_array_equal(y, np.full((16, 2), 5.0, np.float32))
    np.testing.assert_array_equal(dx, 0)
    np.testing.assert_array_equal(dparams["scale"], 16 * 5.0)
