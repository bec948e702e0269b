"""The error bounds of docs/accuracy.md and the extended-precision references they are checked against.

Every bound has the form ``rounding of the result's own dtype + C * u * (scale of the terms)``:

* ``u_out``: the unit roundoff of the dtype a result is stored in (2^-11 float16, 2^-8 bfloat16,
  2^-24 float32, 2^-53 float64): rounding the exact answer costs that much, so no bound can be lower.
* ``u``: the unit roundoff of the dtype jaxbn computes in (float32 for float16/bfloat16/float32
  inputs, float64 for float64), and ``C = STATISTICS_FACTOR = 64``: a sum of up to MAX_GROUP terms
  rounds by at most ``n u`` relative to the sum of magnitudes (the variance is a sum of squares
  around the mean itself: no cancellation amplifies it); the errors measured stay below ``6 u``.
* the scale of the terms: what the result is built from (``|scale| (1 + |x_hat|) + |bias|`` for an
  output), so that a bound is relative where the answer is large and absolute where it is 0.

The references compute in NumPy's long double (64-bit mantissa on x86-64) on the values jaxbn
was given (float16/bfloat16 inputs exactly as rounded), with a two-pass shifted mean, so their own
error is far below every bound here, also for float64 inputs at an offset/scale ratio of 1e12.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

LD = np.longdouble

#: The most elements any one statistic of a property test reduces over.
MAX_GROUP = 64
#: ``C``: a multiple of the compute dtype's unit roundoff that bounds each statistic's relative error.
STATISTICS_FACTOR = 2.0**6

#: The bounds' domain, per compute dtype. XLA flushes subnormal numbers to 0, so a variance is
#: known to within the smallest normal number (1.2e-38 in float32): an epsilon of at least
#: EPSILON_MIN keeps that below the bound. The per-example norms' gradients are autodiff's
#: through the statistics, whose derivative with respect to the variance is ~|dy| / variance:
#: it stays a normal number (its precision kept) for variances up to GRADIENT_VARIANCE_MAX.
EPSILON_MIN = {"float32": 2.0**-100, "float64": 2.0**-960}
GRADIENT_VARIANCE_MAX = {"float32": 2.0**100, "float64": 2.0**1000}

_UNIT_ROUNDOFF = {
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
    "float32": 2.0**-24,
    "float64": 2.0**-53,
}


def unit_roundoff(dtype) -> float:
    """Half an ulp of 1 in ``dtype``: the relative error of rounding to it."""
    return _UNIT_ROUNDOFF[jnp.dtype(dtype).name]


def compute_roundoff(dtype) -> float:
    """``u`` of the dtype jaxbn computes statistics in for a ``dtype`` input (at least float32)."""
    return 2.0**-53 if jnp.dtype(dtype) == jnp.float64 else 2.0**-24


def smallest(dtype) -> float:
    """The smallest positive subnormal of ``dtype``: the absolute floor of rounding near 0."""
    info = jnp.finfo(dtype)
    return (
        float(info.smallest_subnormal)
        if hasattr(info, "smallest_subnormal")
        else float(info.tiny) * float(info.eps)
    )


def values(a) -> np.ndarray:
    """The exact values of a JAX or NumPy array, as long doubles."""
    a = np.asarray(a)
    if a.dtype not in (np.float32, np.float64, LD, np.bool_):
        a = a.astype(np.float32)  # float16 and bfloat16 widen exactly
    return a.astype(LD)


# -- references ------------------------------------------------------------------------------------------


def group_moments(x, valid, axes):
    """``(first, second, var, count)`` over ``axes`` of the valid elements (keepdims), long double.

    The mean is ``first + second``, kept as two terms (``first`` the plain mean, ``second`` the
    mean of the deviations from it): at an offset/spread ratio of 1e12 even a long double mean
    rounds by 1e-7 of the spread, while ``(x - first) - second`` does not (``x - first`` is exact).
    Empty groups: count 0, mean 0, variance 0 (as jaxbn.moments with shift 0).
    """
    x = np.asarray(x, LD)
    count = valid.sum(axes, keepdims=True).astype(LD)
    safe = np.maximum(count, 1)
    first = np.where(valid, x, 0).sum(axes, keepdims=True) / safe
    deviation = x - first
    second = np.where(valid, deviation, 0).sum(axes, keepdims=True) / safe
    var = np.where(valid, (deviation - second) ** 2, 0).sum(axes, keepdims=True) / safe
    return first, second, var, count


def effective_input(x, valid):
    """What jaxbn normalizes: masked-out non-finite elements count as 0, everything else as it is."""
    x = np.asarray(x, LD)
    with np.errstate(invalid="ignore"):
        return np.where(valid | np.isfinite(x), x, 0).astype(LD)


class Normalized:
    """A float64-or-better normalization and its gradient, for one loss ``sum(w * y)``.

    Attributes: ``y``, ``x_hat`` (the normalized value), ``r`` (``1/sqrt(var + eps)`` broadcast),
    ``mean``, ``var``, ``count`` (keepdims over the reduction axes), ``dx``, ``w_x_hat`` (``w x_hat``,
    to be summed over the non-feature axes for the scale's gradient), ``g`` (``w * scale``).
    """

    def __init__(
        self,
        x,
        valid,
        axes,
        scale=None,
        bias=None,
        *,
        epsilon,
        w=None,
        center=True,
        fallback=None,
        gain=None,
        offset=None,
    ):
        """``scale``/``bias`` broadcast to ``x``'s shape (or None); ``fallback``: (mean, var) for empty groups.

        ``gain``/``offset`` (keepdims, per group): batch renormalization's ``r`` and ``d``:
        ``y = scale (x_hat r + d) + bias``, both constants for the gradient.
        """
        x = effective_input(x, valid)
        valid = np.broadcast_to(valid, x.shape)
        first, second, var, count = group_moments(x, valid, axes)
        if not center:
            var = np.where(valid, x * x, 0).sum(axes, keepdims=True) / np.maximum(count, 1)
            first, second = 0 * first, 0 * second
        if fallback is not None:
            empty = count == 0
            first = np.where(empty, np.asarray(fallback[0], LD), first)
            second = np.where(empty, 0, second)
            var = np.where(empty, np.asarray(fallback[1], LD), var)
        self.first, self.second, self.mean, self.var, self.count = (
            first,
            second,
            first + second,
            var,
            count,
        )
        self.r = 1 / np.sqrt(var + LD(epsilon))
        self.x_hat = ((x - first) - second) * self.r
        one = LD(1)
        scale_ = one if scale is None else np.asarray(scale, LD)
        bias_ = LD(0) if bias is None else np.asarray(bias, LD)
        gain_ = one if gain is None else np.asarray(gain, LD)
        offset_ = LD(0) if offset is None else np.asarray(offset, LD)
        self.y = scale_ * (self.x_hat * gain_ + offset_) + bias_
        if w is not None:
            w = np.asarray(w, LD)
            g = w * scale_ * gain_
            n = np.maximum(count, 1)
            sum_g = g.sum(axes, keepdims=True)
            sum_gx = (g * self.x_hat).sum(axes, keepdims=True)
            through_stats = (sum_g / n if center else 0) + self.x_hat * sum_gx / n
            self.dx = self.r * (g - np.where(valid, through_stats, 0))
            self.w_x_hat = w * (self.x_hat * gain_ + offset_)
            self.g = g


# -- batch norm --------------------------------------------------------------------------------------


def keep(shape, axes):
    return tuple(1 if i in axes else s for i, s in enumerate(shape))


def broadcast_params(params, shape, feature_axes):
    """Params (of the feature axes' sizes) as long doubles broadcast to ``shape``."""
    target = tuple(s if i in feature_axes else 1 for i, s in enumerate(shape))
    return {k: np.broadcast_to(values(v).reshape(target), shape) for k, v in params.items()}


def state_reference(state, ref, single_value, momentum, unbiased, features_shape):
    """The running statistics batch_norm should return, and their bounds (0 where they must be kept)."""
    old_mean, old_var = values(state["mean"]), values(state["var"])
    mean, var, n = (a.reshape(features_shape) for a in (ref.mean, ref.var, ref.count))
    update = n > 0
    update_var = update
    if unbiased or single_value:
        var = var * n / np.maximum(n - 1, 1)
        update_var = update & (n > 1)
    if momentum is None:
        count = values(state["count"])
        new_mean, new_var = (
            old_mean + (mean - old_mean) / (count + 1),
            old_var + (var - old_var) / (count + 1),
        )
    else:
        new_mean, new_var = (
            momentum * old_mean + (1 - momentum) * mean,
            momentum * old_var + (1 - momentum) * var,
        )
    u = compute_roundoff(ref.compute_dtype)
    u_state = unit_roundoff(state["mean"].dtype)
    mean_tol = u_state * np.abs(new_mean) + STATISTICS_FACTOR * u * (
        np.abs(old_mean) + np.abs(mean) + np.sqrt(var)
    )
    var_tol = u_state * np.abs(new_var) + STATISTICS_FACTOR * u * (old_var + var)
    expected = {
        "mean": np.where(update, new_mean, old_mean),
        "var": np.where(update_var, new_var, old_var),
    }
    tolerance = {"mean": np.where(update, mean_tol, 0), "var": np.where(update_var, var_tol, 0)}
    if momentum is None:
        expected["count"] = values(state["count"]) + update.any()
        tolerance["count"] = 0
    return expected, tolerance


def renorm_correction(ref, running_mean, running_var, epsilon, r_max, d_max):
    """Batch renormalization's (r, d) from the reference statistics, and how exact jaxbn's can be."""
    sigma = np.sqrt(running_var + LD(epsilon))
    r_raw = np.sqrt((ref.var + LD(epsilon)) / (running_var + LD(epsilon)))
    d_raw = ((ref.first - running_mean) + ref.second) / sigma
    return (
        np.clip(r_raw, 1 / LD(r_max), LD(r_max)),
        np.clip(d_raw, -LD(d_max), LD(d_max)),
        r_raw,
        d_raw,
        sigma,
    )


def batch_norm_reference(
    x_values, valid, reduction, features, params, state, epsilon, w_values, compute, limits
):
    """The exact training-mode batch norm (renorm with ``limits``) and the extra bound renorm's r, d need.

    Returns ``(reference, extra output bound, renorm error units, scale, bias)`` with ``scale`` and
    ``bias`` broadcast to the input's shape.
    """
    shape = x_values.shape
    bshape = keep(shape, reduction)
    run_mean, run_var = (values(state[k]).reshape(bshape) for k in ("mean", "var"))
    broadcast = broadcast_params(params, shape, features)
    scale, bias = broadcast.get("scale"), broadcast.get("bias")
    inputs = (x_values, valid, reduction, scale, bias)
    options = dict(epsilon=epsilon, w=w_values, fallback=(run_mean, run_var))
    ref = Normalized(*inputs, **options)
    ref.compute_dtype, ref.gain, ref.offset = compute, None, None
    if limits is None:
        return ref, 0.0, 0.0, scale, bias
    r, d, _, d_raw, sigma = renorm_correction(ref, run_mean, run_var, epsilon, *limits)
    cu = STATISTICS_FACTOR * compute_roundoff(compute)
    # d = ((K - mu) + (mu_B - K)) / sigma: the rounding of mu_B - mu and of the mean, over sigma
    d_units = (np.abs(ref.mean - run_mean) + 4 * np.sqrt(ref.var)) / sigma
    d_units = np.where(
        np.abs(d_raw) - cu * d_units > limits[1], 0, d_units
    )  # clipped with margin: exact
    renorm_units = (
        r * (1 + 2 * np.abs(ref.x_hat)) + d_units
    )  # x_hat r + d: x_hat's, r's and d's errors
    extra = cu * (1 if scale is None else np.abs(scale)) * renorm_units
    ref = Normalized(*inputs, **options, gain=r, offset=d)
    ref.compute_dtype, ref.gain, ref.offset = compute, r, d
    return ref, extra, renorm_units, scale, bias


# -- bounds ----------------------------------------------------------------------------------------------


def output_tolerance(ref: Normalized, scale, bias, compute_dtype, out_dtype, extra=0.0):
    """``u_out |y| + C u (|scale| (1 + |x_hat|) + |bias|)``, elementwise (plus ``extra``)."""
    u, u_out = compute_roundoff(compute_dtype), unit_roundoff(out_dtype)
    scale_ = 1 if scale is None else np.abs(np.asarray(scale, LD))
    bias_ = 0 if bias is None else np.abs(np.asarray(bias, LD))
    return (
        u_out * np.abs(ref.y)
        + STATISTICS_FACTOR * u * (scale_ * (1 + np.abs(ref.x_hat)) + bias_)
        + extra
        + smallest(out_dtype)
    )


def dx_tolerance(ref: Normalized, axes, compute_dtype, x_dtype):
    """``u_x |dx| + C u r max|g| (1 + |x_hat|)(1 + max|x_hat|)``, the maxima over each group."""
    u, u_x = compute_roundoff(compute_dtype), unit_roundoff(x_dtype)
    g_max = np.abs(ref.g).max(axes, keepdims=True)
    x_hat_max = np.abs(ref.x_hat).max(axes, keepdims=True)
    return (
        u_x * np.abs(ref.dx)
        + STATISTICS_FACTOR * u * ref.r * g_max * (1 + np.abs(ref.x_hat)) * (1 + x_hat_max)
        + smallest(x_dtype)
    )


def sum_tolerance(terms, expected, axes, compute_dtype, param_dtype):
    """For a gradient ``sum(terms)`` over ``axes``: ``u_p |expected| + C u sum |terms|-ish``."""
    u, u_p = compute_roundoff(compute_dtype), unit_roundoff(param_dtype)
    return u_p * np.abs(expected) + STATISTICS_FACTOR * u * terms + smallest(param_dtype)


def statistics_tolerance(mean, var, compute_dtype, size):
    """(mean, var) bounds of a batch statistic of ``size`` elements (valid or not, per device):
    ``C u (|mean| + std) + 32 size tiny`` and ``C u var + tiny``.

    ``tiny``, the compute dtype's smallest normal number: XLA flushes subnormal results to 0; the
    mean's first pass scales the values by ``2^-(2 + log2 size)`` first (docs/accuracy.md).
    """
    u, tiny = (
        compute_roundoff(compute_dtype),
        float(jnp.finfo(jnp.promote_types(compute_dtype, jnp.float32)).tiny),
    )
    spread = np.abs(mean) + np.sqrt(var)
    return STATISTICS_FACTOR * u * spread + 32 * size * tiny, STATISTICS_FACTOR * u * var + tiny


# -- checks ----------------------------------------------------------------------------------------------

#: The largest error/bound ratio seen per quantity in this process (printed by JAXBN_REPORT_RATIOS=1).
WORST: dict[str, float] = {}


def check(what, actual, expected, tolerance, dtype=None, where=None):
    """Asserts ``|actual - expected| <= tolerance`` elementwise, NaN failing.

    With ``where``, only those elements are compared. With ``dtype`` (the dtype ``actual`` is stored in), both sides are first clipped to its
    finite range: an exact value beyond it must come out as the infinity of its sign (or the
    largest finite value), which is then no error.
    """
    actual = np.asarray(values(actual) if not isinstance(actual, np.ndarray) else actual, LD)
    expected = np.asarray(expected, LD)
    tolerance = np.broadcast_to(
        np.asarray(tolerance, LD), np.broadcast_shapes(actual.shape, expected.shape)
    )
    if dtype is not None:
        big = LD(float(jnp.finfo(dtype).max))
        actual, expected = np.clip(actual, -big, big), np.clip(expected, -big, big)
    if where is not None:  # compare only there
        actual, expected = np.where(where, actual, 0), np.where(where, expected, 0)
    with np.errstate(invalid="ignore"):
        error = np.abs(actual - expected)
        ratio = np.where(tolerance > 0, error / tolerance, np.where(error == 0, 0, np.inf))
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    if where is not None:
        ratio = np.where(where, ratio, 0)
    worst = float(ratio.max()) if ratio.size else 0.0
    key = what if dtype is None else f"{what} [{jnp.dtype(dtype).name}]"
    WORST[key] = max(WORST.get(key, 0.0), worst)
    if not worst <= 1:
        i = np.unravel_index(np.argmax(ratio), ratio.shape)
        raise AssertionError(
            f"{what}: error {float(error[i]):.3e} > bound {float(tolerance[i]):.3e} (ratio {worst:.3g}) at {i}: "
            f"got {float(actual[i])!r}, exact {float(expected[i])!r}"
        )


@pytest.fixture(autouse=True, scope="module")
def report_worst_ratios():
    """With JAXBN_REPORT_RATIOS=1 (and -s), prints the largest error/bound ratio seen per quantity."""
    yield
    if os.environ.get("JAXBN_REPORT_RATIOS"):
        for what, ratio in sorted(WORST.items(), key=lambda item: -item[1]):
            print(f"{ratio:9.3g}  {what}")
