"""jaxbn.stats.moments on one device: exactness, dtypes, masks, large offsets, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import stats
from tests import accuracy_bounds as ab
from tests import reference


@pytest.mark.parametrize(
    "dtype, rtol",
    [
        (jnp.float32, 1e-6),
        (jnp.bfloat16, 1e-6),
        (jnp.float16, 1e-6),
        pytest.param(jnp.float64, 1e-12, marks=pytest.mark.slow),
    ],  # x64: slow tier
)
@pytest.mark.parametrize("axes", [(0, 1, 2), (0, 2, 3), 0])
def test_moments_match_float64_reference(dtype, rtol, axes, rng):
    """Mean/var equal float64 statistics of the same (rounded) input values."""
    with jax.enable_x64(dtype == jnp.float64):
        x = jnp.asarray(rng.normal(size=(6, 5, 4, 3)) * 3 + 2, dtype)
        values = np.asarray(x.astype(jnp.float32) if dtype != jnp.float64 else x, np.float64)
        m = stats.moments(x, axes)
        axes_t = (axes,) if isinstance(axes, int) else axes
        np.testing.assert_allclose(m.mean, values.mean(axes_t), rtol=rtol, atol=rtol)
        np.testing.assert_allclose(m.var, values.var(axes_t), rtol=rtol * 10)
        np.testing.assert_array_equal(
            m.count, np.prod([x.shape[a] for a in axes_t])
        )  # exact: a count of elements
        expected_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
        assert m.mean.dtype == m.var.dtype == m.count.dtype == expected_dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "shape, axes",
    [
        ((32, 8, 8, 16), (0, 1, 2)),  # rows of 8 feature vectors
        ((4, 6, 8, 3), (0, 1, 2)),  # 3 features: rows of 64 vectors, over two merged axes
        ((5, 8, 8, 24), (1, 2)),  # instance-norm-like: per example and feature, rows of 8
        ((7, 5, 32), (0, 1)),  # 32 features, 35 rows: not a multiple of 4, summed as they are
        ((2, 4, 4, 64), (0, 1, 2)),  # 64 features: summed as they are
        ((4, 16, 8, 3), (1, 3)),  # group-norm-like: 8 groups of 3 as rows of 24, then of 192
        ((3, 10, 16, 24), (1, 3)),  # group-norm-like: 16 groups of 24 as rows of 384
        ((3, 10, 5, 7), (1, 3)),  # group-norm-like, 35 channels, rows not a multiple of 4
    ],
)
def test_narrow_features_are_summed_within_the_bounds(shape, axes, dtype, rng):
    """Where the feature axis is last and at most ``stats.LANES / 4`` wide, or the last axis is
    reduced within the features of the axis before it (group norm's channels of a group), the sums
    read x as rows of whole feature vectors and add their partial sums after: the moments stay
    within docs/accuracy.md's bounds of the exact ones (at an offset, a different one per element
    of the last axis)."""
    offsets = rng.uniform(-1e3, 1e3, size=shape[-1])
    x = jnp.asarray(rng.normal(size=shape) * rng.uniform(0.1, 10, size=shape[-1]) + offsets, dtype)
    m = jax.jit(lambda x: stats.moments(x, axes))(x)
    ref = ab.Normalized(ab.values(x), np.ones(shape, bool), axes, epsilon=1.0)
    features = tuple(n for i, n in enumerate(shape) if i not in axes)
    mean, var = ref.mean.reshape(features), ref.var.reshape(features)
    size = int(np.prod([shape[i] for i in axes]))
    mean_tol, var_tol = ab.statistics_tolerance(mean, var, jnp.float32, size)
    ab.check("mean", m.mean, mean, mean_tol)
    ab.check("var", m.var, var, var_tol)
    np.testing.assert_array_equal(m.count, size)  # exact: a count of elements


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "mask_shape, valid_fraction",
    [((16, 1, 1, 1), 0.6), ((16, 4, 4, 1), 0.6), ((1, 4, 4, 1), 0.6), ((16, 1, 1, 1), 0.0)]
    + [((16, 4, 4, 24), 0.6)],
    ids=["examples", "positions", "positions-only", "none", "elements"],
)
def test_a_mask_narrower_than_x_weighs_the_sums(mask_shape, valid_fraction, dtype, rng):
    """A mask at most an eighth of x's size (of examples or of positions: not varying along the
    features) weighs each pass's summand by the mask as 0 / 1, after x's masked-out elements are
    set to 0 once; a larger mask selects in each pass. Either way the moments of the valid elements
    at an offset are within docs/accuracy.md's bounds, masked-out NaN, Inf and values near the
    maximum reach nothing, and a feature without a valid element has count 0, mean = shift, var 0."""
    shape, axes = (16, 4, 4, 24), (0, 1, 2)
    x = rng.normal(size=shape) * rng.uniform(0.1, 10, size=24) + rng.uniform(-1e4, 1e4, size=24)
    mask = rng.uniform(size=mask_shape) < valid_fraction
    mask.reshape(-1)[0] = False  # (the first element masked out: the shift is a later one)
    if mask_shape == shape:
        mask[..., -1] = False  # (a feature without a valid element)
    valid = np.broadcast_to(mask, shape)
    junk = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38])[np.arange(x.size) % 5].reshape(shape)
    x = jnp.asarray(np.where(valid, x, junk), dtype)
    m = jax.jit(lambda x, mask: stats.moments(x, axes, mask=mask, shift=7.0))(x, mask)
    ref = ab.Normalized(ab.values(x), valid, axes, epsilon=1.0)
    count = valid.sum(axes)
    found = count > 0
    mean, var = ref.mean.reshape(24)[found], ref.var.reshape(24)[found]
    mean_tol, var_tol = ab.statistics_tolerance(mean, var, jnp.float32, int(np.prod(shape[:3])))
    ab.check("mean", m.mean[found], mean, mean_tol)
    ab.check("var", m.var[found], var, var_tol)
    np.testing.assert_array_equal(m.count, count)  # exact: counts of elements
    # exact: a feature without a valid element sums nothing, its mean the shift
    np.testing.assert_array_equal(m.mean[~found], 7.0)
    np.testing.assert_array_equal(m.var[~found], 0.0)


def test_the_shift_is_the_first_valid_element_or_with_a_full_mask_the_largest(rng):
    """The sums' shift ``K`` is an element of the batch: where the mask is at most an eighth of
    x's size, each feature's first valid element (searched in the mask's own shape); where it is
    as large as x, each feature's largest valid element (one library max-reduction; the search
    ran in XLA's own loop over x's size in positions); a feature whose candidate is not finite, or
    that has no valid element, the ``shift`` argument."""
    shape, axes = (16, 4, 4, 8), (0, 1, 2)
    x = rng.normal(size=shape).astype(np.float32)
    narrow = rng.uniform(size=(16, 4, 4, 1)) < 0.5
    full = rng.uniform(size=shape) < 0.5
    full[..., 0] = False  # no valid element
    x[..., 1] = np.where(full[..., 1], np.inf, x[..., 1])  # its largest valid element: inf
    values = x.reshape(-1, 8)
    for mask in (narrow, full):
        valid = np.broadcast_to(mask, shape).reshape(-1, 8)
        m = jax.jit(lambda x, mask: stats.moments(x, axes, mask=mask, shift=7.0))(x, mask)
        if mask is narrow:
            want = values[np.argmax(valid, 0), np.arange(8)]  # the first valid
        else:
            want = np.where(valid, values, -np.inf).max(0)
        want = np.where(np.isfinite(want) & valid.any(0), want, 7.0)
        # exact by construction: an element of x, or the shift argument, carried unchanged
        np.testing.assert_array_equal(m.shift, want)


def test_mask_counts_and_statistics_match_reference(rng):
    """Masked moments use only the valid elements; counts are per feature."""
    x = rng.normal(size=(10, 4)).astype(np.float32)
    mask = rng.random((10, 4)) < 0.6
    m = stats.moments(jnp.asarray(x), 0, mask=mask)
    mean, var = reference.batch_stats(x, axis=-1, mask=mask)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m.var, var, rtol=1e-5)
    np.testing.assert_array_equal(
        m.count, mask.sum(0)
    )  # exact: counts of elements (small integers)


def test_masked_out_nan_does_not_reach_statistics():
    """NaN/Inf padding at masked positions does not poison the statistics."""
    x = np.ones((4, 2), np.float32)
    x[0, 0], x[1, 1] = np.nan, np.inf
    mask = np.array([[False], [False], [True], [True]])
    m = stats.moments(jnp.asarray(x), 0, mask=mask)
    # exact: the padding is selected away (where, not a product), and the statistics of two ones are small-integer
    # arithmetic: (1 + 1) / 2 = 1 and 0 variance
    np.testing.assert_array_equal(m.mean, [1.0, 1.0])
    np.testing.assert_array_equal(m.var, [0.0, 0.0])


def test_empty_channel_has_zero_count_and_no_nan(rng):
    """A feature with no valid element: count 0, mean = shift, var 0, no NaN, finite grads."""
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    mask = jnp.array([[True, False, True]])
    shift = jnp.array([0.5, 7.0, -1.0])
    m = stats.moments(x, 0, mask=mask, shift=shift)
    # exact by construction: no element counted, sums of no element are 0, and mean = shift + 0 / 1
    assert float(m.count[1]) == 0.0
    assert float(m.mean[1]) == 7.0 and float(m.var[1]) == 0.0
    grad = jax.grad(lambda x: jnp.sum(stats.moments(x, 0, mask=jnp.zeros((1, 3), bool)).var))(x)
    assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4, 1e5])
@pytest.mark.parametrize("shift", ["none", "running_mean"])
def test_large_offset_variance_is_exact(offset, shift, rng):
    """float32 at mean `offset`, std 1: variance within 1e-5 of float64 with a poor or good shift.

    (benchmarks/accuracy.py compares flax's and PyTorch's variances at these offsets.)
    """
    x = (rng.normal(size=(32, 4, 4, 8)) + offset * rng.uniform(0.5, 1.5, size=8)).astype(np.float32)
    mean64, var64 = reference.batch_stats(x)
    good_shift = (mean64 + rng.normal(size=8) * 0.3).astype(np.float32)  # a lagging running mean
    m = stats.moments(jnp.asarray(x), (0, 1, 2), shift=None if shift == "none" else good_shift)
    error = np.abs(np.asarray(m.var, np.float64) / var64 - 1).max()
    assert error <= 1e-5
    # the mean is kept as shift + offset so that normalization can avoid its rounding
    centered = np.asarray(m.mean_minus_shift, np.float64) + np.asarray(m.shift, np.float64)
    np.testing.assert_allclose(centered, mean64, rtol=1e-6)


def test_bfloat16_offset_statistics_in_float32(rng):
    """bfloat16 at offset 1e2: statistics (in float32) match float64 stats of the bf16 values."""
    x = jnp.asarray(rng.normal(size=(64, 16)) + 100.0, jnp.bfloat16)
    values = np.asarray(x.astype(jnp.float32), np.float64)
    m = stats.moments(x, 0)
    assert m.var.dtype == jnp.float32
    np.testing.assert_allclose(m.var, values.var(0), rtol=1e-5)
    np.testing.assert_allclose(m.mean, values.mean(0), rtol=1e-6)


def test_gradients_match_two_pass_reference(rng):
    """d(mean)/dx and d(var)/dx equal those of the plain two-pass formulas, shift or not."""
    x = jnp.asarray(rng.normal(size=(16, 3)) + 50, jnp.float32)

    def plain(x):
        mean = x.mean(0)
        return jnp.sum(mean * jnp.arange(3.0)) + jnp.sum(
            ((x - mean) ** 2).mean(0) * jnp.arange(1.0, 4.0)
        )

    def ours(x, shift):
        m = stats.moments(x, 0, shift=shift)
        return jnp.sum(m.mean * jnp.arange(3.0)) + jnp.sum(m.var * jnp.arange(1.0, 4.0))

    expected = jax.grad(plain)(x)
    for shift in (None, jnp.full((3,), 50.0)):
        np.testing.assert_allclose(jax.grad(ours)(x, shift), expected, rtol=1e-4, atol=1e-5)


def test_cross_device_sum_is_one_psum_under_vmap():
    """Stacked values are summed over the named axis; without a name they pass through."""
    a = jnp.arange(4.0)
    summed = jax.vmap(lambda v: stats.cross_device_sum([v, -v], "d"), axis_name="d")(a)
    np.testing.assert_array_equal(summed[0], [6.0] * 4)  # exact: 0 + 1 + 2 + 3 in small integers
    np.testing.assert_array_equal(summed[1], [-6.0] * 4)
    assert stats.cross_device_sum([a], None)[0] is a
    jaxpr = jax.make_jaxpr(
        jax.vmap(lambda v: stats.cross_device_sum([v, v, v], "d"), axis_name="d")
    )(a)
    assert str(jaxpr).count("psum") == 1


def test_moments_under_vmap_axis_name_equals_global(rng):
    """moments with the vmap axis as device axis equals moments of the concatenated batch."""
    x = jnp.asarray(rng.normal(size=(4, 5, 3)) + 1e3, jnp.float32)
    m = jax.vmap(lambda v: stats.moments(v, 0, axis_name="d"), axis_name="d")(x)
    whole = stats.moments(x.reshape(20, 3), 0)
    np.testing.assert_allclose(m.mean[0], whole.mean, rtol=1e-7)
    np.testing.assert_allclose(m.var[0], whole.var, rtol=1e-5)
    np.testing.assert_array_equal(m.count[0], [20.0] * 3)  # exact: a count of elements
    # every device merges the same gathered statistics in the same order: identical bit for bit
    for field in m:
        np.testing.assert_array_equal(field, np.broadcast_to(field[0], field.shape))


@pytest.mark.parametrize("platform, barriers", [("cpu", 1), ("cuda", 0), ("tpu", 0)])
def test_cpu_barrier_is_an_identity_with_a_barrier_on_cpu_only(platform, barriers):
    """One primitive, lowered per platform: an optimization barrier on XLA:CPU, nothing elsewhere."""
    x = jnp.arange(6.0).reshape(2, 3)
    text = (
        jax.jit(lambda x: stats.cpu_barrier(x * 2)[0] + 1)
        .trace(x)
        .lower(lowering_platforms=(platform,))
        .as_text()
    )
    assert text.count("stablehlo.optimization_barrier") == barriers
    assert "stablehlo.if" not in text and "case" not in text


def test_cpu_barrier_under_transforms(rng):
    """It passes values, tangents and cotangents through unchanged, batched or not; None stays None."""
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)

    def f(x):
        a, none, b = stats.cpu_barrier(jnp.sin(x), None, x * x)
        assert none is None
        return jnp.sum(a * b)

    def reference_f(x):
        return jnp.sum(jnp.sin(x) * x * x)

    np.testing.assert_allclose(f(x), reference_f(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(reference_f)(x), rtol=1e-6)
    np.testing.assert_allclose(
        jax.jvp(f, (x,), (x,))[1], jax.jvp(reference_f, (x,), (x,))[1], rtol=1e-6
    )
    np.testing.assert_allclose(
        jax.vmap(jax.grad(f))(x[:, None]), jax.vmap(jax.grad(reference_f))(x[:, None]), rtol=1e-6
    )
    np.testing.assert_allclose(
        jax.jit(jax.hessian(f))(x[0]), jax.hessian(reference_f)(x[0]), rtol=1e-5
    )


def test_computed_once_keeps_values_and_gradients(rng):
    """Values (infinities, NaN and -0.0 of any dtype and shape among them) and gradients pass unchanged,
    and XLA computes a chain of per-feature operations once, not in each of the fusions that read it."""
    a = jnp.asarray([1.5, -np.inf, np.nan, -0.0], jnp.float32)
    b = jnp.asarray(rng.normal(size=(2, 3)), jnp.bfloat16)
    # (a's shape in two dtypes: XLA refuses one reduction of mixed precisions)
    out = stats.computed_once(a, None, b, a * 2, a.astype(jnp.bfloat16))
    np.testing.assert_array_equal(
        out[0], a
    )  # v + (-0.0) == v for every v but -0.0, whose sign may become +0
    assert out[1] is None and out[2].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out[2], b)
    np.testing.assert_array_equal(out[3], a * 2)
    assert out[4].dtype == jnp.bfloat16
    # (compared as float32, exactly: every bfloat16 is one; numpy 2.0's testing finds no NaN in a
    # bfloat16 array, and called the two NaNs unequal)
    as_f32 = lambda v: np.asarray(v, np.float32)
    np.testing.assert_array_equal(as_f32(out[4]), as_f32(a.astype(jnp.bfloat16)))
    g = jax.grad(lambda v: jnp.sum(stats.computed_once(v * 3, v)[0] ** 2))(jnp.arange(3.0))
    np.testing.assert_allclose(g, 18 * jnp.arange(3.0))

    def chain(v):
        for i in range(8):
            v = jnp.where(v > i, v * 1.5 + 0.25, v - 1.0)
        return v

    def two_readers(x, once):
        v = chain(jnp.sum(x, 0))
        if once:
            (v,) = stats.computed_once(v)
        return jnp.sum(jnp.sin(x + v), 0), jnp.sum(jnp.cos(x - v), 0)

    x = jnp.ones((64, 16))
    count = {
        once: jax.jit(two_readers, static_argnums=1)
        .lower(x, once)
        .compile()
        .as_text()
        .count(" select(")
        for once in (False, True)
    }
    assert count[True] == 8 < count[False], count


def test_moments_read_from_a_narrow_source(rng):
    """``source``: the passes read the narrow array, the result and the derivatives are x's."""
    narrow = jnp.asarray(rng.normal(size=(64, 8)) * 3 + 100, jnp.bfloat16)
    wide = narrow.astype(jnp.float32)
    got, want = stats.moments(wide, 0, source=narrow), stats.moments(wide, 0)
    for field in ("mean", "var", "count"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-6)

    def loss(x, source):
        m = stats.moments(x, 0, source=source)
        return jnp.sum(m.mean * m.var)

    np.testing.assert_allclose(jax.grad(loss)(wide, narrow), jax.grad(loss)(wide, None), rtol=1e-5)
    with pytest.raises(ValueError, match="source must have x's shape"):
        stats.moments(wide, 0, source=narrow[:3])


def test_an_offset_beyond_the_dtype_keeps_the_mean():
    """mean - K beyond float32 (K at the maximum, the rest at minus it): mean_minus_shift is its
    infinity, the variance infinite, the mean finite and within its bound; batch norm's training
    output is then the bias and its state is kept."""
    top = float(jnp.finfo(jnp.float32).max)
    x = jnp.array([[top], [-top], [-top], [-top]], jnp.float32)
    m = stats.moments(x, 0)
    exact = (top - 3 * top) / 4  # -top / 2
    assert float(m.mean_minus_shift[0]) == -np.inf
    assert float(m.var[0]) == np.inf
    assert abs(float(m.mean[0]) - exact) <= 64 * 2.0**-24 * (abs(exact) + top)
    params, state = jaxbn.batch_norm_init(1)
    params = {"scale": jnp.ones(1), "bias": jnp.full(1, 0.5)}
    y, new_state = jaxbn.batch_norm(x, params, state, training=True)
    # exact: 0 * (finite centred value) + 0.5, with no inf - inf on the way
    np.testing.assert_array_equal(y, jnp.full(x.shape, 0.5))
    jax.tree.map(np.testing.assert_array_equal, new_state, state)
