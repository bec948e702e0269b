"""Bad data and bad state lose nothing: masked garbage, non-finite or far running means, overflow,
batches with one value per feature and features with no valid element."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from tests import reference
from tests.conftest import N_DEVICES


def _normal(seed, shape, scale=1.0, offset=0.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale + offset).astype(np.float32)


# -- A1/A2: one value per feature ----------------------------------------------------------------


def test_one_value_per_feature_outputs_the_bias_updates_the_mean_and_warns():
    """A (1, C) training batch: the bias, flax's gradients; the running mean moves, the variance stays."""
    x = jnp.asarray(_normal(0, (1, 3), offset=2.0))
    params = {"scale": jnp.array([0.5, 1.0, 2.0]), "bias": jnp.array([-1.0, 0.0, 1.0])}
    state = {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([4.0, 5.0, 6.0])}
    w = jnp.array([[1.0, -2.0, 3.0]])

    def loss(x, params):
        y, new_state = jaxbn.batch_norm(x, params, state, training=True, momentum=0.9)
        return jnp.sum(w * y), (y, new_state)

    with pytest.warns(jaxbn.DegenerateBatchWarning, match="one value per feature"):
        (_, (y, new_state)), (dx, dparams) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
            x, params
        )
    # exact: the normalized value is x - x of the same array (0) times a finite factor, so y is the bias itself
    np.testing.assert_array_equal(y, jnp.broadcast_to(params["bias"], (1, 3)))
    np.testing.assert_allclose(new_state["mean"], 0.9 * state["mean"] + 0.1 * x[0], rtol=1e-6)
    np.testing.assert_array_equal(
        new_state["var"], state["var"]
    )  # exact: n = 1, the old variance selected
    module = nn.BatchNorm(use_running_average=False, momentum=0.9)
    variables = {"params": params, "batch_stats": state}
    flax_loss = lambda x, p: jnp.sum(
        w * module.apply({**variables, "params": p}, x, mutable=["batch_stats"])[0]
    )
    flax_dx, flax_dparams = jax.grad(flax_loss, (0, 1))(x, params)
    np.testing.assert_allclose(dx, flax_dx, atol=1e-6)
    np.testing.assert_allclose(dparams["scale"], flax_dparams["scale"], atol=1e-6)
    np.testing.assert_allclose(dparams["bias"], flax_dparams["bias"], atol=1e-6)
    nan_batch = x.at[0, 1].set(jnp.nan)  # a non-finite value still leaves everything as it was
    with pytest.warns(
        jaxbn.DegenerateBatchWarning
    ):  # exact: the update skipped, the old mean selected
        assert jaxbn.batch_norm(nan_batch, params, state, training=True)[1]["mean"][0] == 1.0


def test_one_value_per_feature_in_the_modules():
    """linen and nnx BatchNorm on a (1, C) training batch: flax's output, the variance kept."""
    x = jnp.asarray(_normal(1, (1, 4), offset=3.0))
    module = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # init estimates nothing: no warning there
        variables = module.init(jax.random.key(0), x)
    with pytest.warns(jaxbn.DegenerateBatchWarning, match="one value per feature"):
        y, updates = module.apply(variables, x, mutable=["batch_stats"])
    # exact: x - x of the same array is 0, times a finite factor, plus the bias 0; the variance is selected unchanged
    np.testing.assert_array_equal(y, jnp.zeros((1, 4)))
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.5 * x[0], rtol=1e-6)
    np.testing.assert_array_equal(updates["batch_stats"]["var"], jnp.ones(4))
    from flax import nnx

    bn = jaxbn.nnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))
    with pytest.warns(jaxbn.DegenerateBatchWarning, match="one value per feature"):
        y = bn(x)
    np.testing.assert_array_equal(y, jnp.zeros((1, 4)))  # exact, as for linen
    np.testing.assert_allclose(bn.mean[...], 0.5 * x[0], rtol=1e-6)
    np.testing.assert_array_equal(bn.var[...], jnp.ones(4))


@pytest.mark.parametrize("shape, feature_axes", [((4, 3), -1), ((2, 3, 5), (1, 2))])
def test_instance_norm_without_a_spatial_axis_outputs_the_bias_as_flax(shape, feature_axes):
    x = jnp.asarray(_normal(2, shape))
    module = nn.InstanceNorm(feature_axes=feature_axes, bias_init=nn.initializers.normal(1.0))
    variables = module.init(jax.random.key(0), x)
    with pytest.warns(jaxbn.DegenerateBatchWarning, match="no spatial axis"):
        ours = jaxbn.linen.InstanceNorm(feature_axes=feature_axes).apply(variables, x)
    expected = module.apply(variables, x)
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    grad = lambda m: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(m.apply(variables, x)))))(x)
    with pytest.warns(jaxbn.DegenerateBatchWarning):
        np.testing.assert_allclose(
            grad(jaxbn.linen.InstanceNorm(feature_axes=feature_axes)), grad(module), atol=1e-6
        )


# -- A4: features without a valid element --------------------------------------------------------


def test_feature_without_valid_elements_uses_the_running_statistics():
    """A fully masked feature is normalized as inference would, keeps its state; gradients finite."""
    x = jnp.asarray(_normal(3, (6, 3), scale=2.0, offset=1.0))
    mask = np.ones((6, 3), bool)
    mask[:, 1] = False
    params = {"scale": jnp.array([1.0, 2.0, 3.0]), "bias": jnp.array([0.0, 0.5, 1.0])}
    state = {"mean": jnp.array([0.0, 4.0, 0.0]), "var": jnp.array([1.0, 9.0, 1.0])}

    def loss(x, params):
        y, new_state = jaxbn.batch_norm(x, params, state, training=True, mask=mask, momentum=0.5)
        return jnp.sum(jnp.sin(y)), (y, new_state)

    (_, (y, new_state)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, params)
    inference = (x[:, 1] - 4.0) / np.sqrt(9.0 + 1e-5) * 2.0 + 0.5
    np.testing.assert_allclose(y[:, 1], inference, rtol=1e-5)
    # exact: the empty feature's update is skipped, its old state selected unchanged
    assert float(new_state["mean"][1]) == 4.0 and float(new_state["var"][1]) == 9.0
    mean, var = reference.batch_stats(x[:, [0, 2]])
    np.testing.assert_allclose(new_state["mean"][jnp.array([0, 2])], 0.5 * mean, rtol=1e-5)
    # the statistics of the empty feature do not depend on x: dx = scale * rsqrt(var + eps) * dy
    np.testing.assert_allclose(
        grads[0][:, 1], jnp.cos(y[:, 1]) * 2.0 / np.sqrt(9.0 + 1e-5), rtol=1e-5
    )
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


# -- B6: masked-out NaN or Inf reaches nothing ---------------------------------------------------


def _masked_pair(seed=4, shape=(8, 6)):
    x = _normal(seed, shape, offset=1.0)
    mask = np.random.default_rng(seed).uniform(size=shape) < 0.7
    mask[0] = True
    poisoned = np.where(
        mask, x, np.array([np.nan, np.inf, -np.inf])[np.arange(x.size) % 3].reshape(shape)
    )
    clean = np.where(mask, x, 0.0)
    return jnp.asarray(poisoned, jnp.float32), jnp.asarray(clean, jnp.float32), jnp.asarray(mask)


NORMALIZERS = {
    "batch_norm": lambda x, p, mask: jaxbn.batch_norm(
        x, p, jaxbn.batch_norm_init(6)[1], training=True, mask=mask
    )[0],
    "layer_norm": lambda x, p, mask: jaxbn.layer_norm(x, p, mask=mask),
    "rms_norm": lambda x, p, mask: jaxbn.rms_norm(x, {"scale": p["scale"]}, mask=mask),
    "group_norm": lambda x, p, mask: jaxbn.group_norm(x, p, num_groups=2, mask=mask),
    "instance_norm": lambda x, p, mask: jaxbn.instance_norm(
        x.reshape(4, 2, 6), p, mask=mask.reshape(4, 2, 6)
    ).reshape(8, 6),
}


def _assert_padding_reaches_nothing(normalizer, poisoned, clean, mask, valid, params):
    """The loss over valid outputs, its gradients and the outputs are finite and the same whether
    the padding holds NaN/Inf (``poisoned``) or 0 (``clean``)."""

    def loss(x, p):
        return jnp.sum(jnp.where(valid, jnp.sin(normalizer(x, p, mask)), 0))

    grad = jax.jit(jax.value_and_grad(loss, (0, 1)))
    (value, (dx, dp)), (value_clean, (dx_clean, dp_clean)) = (
        grad(poisoned, params),
        grad(clean, params),
    )
    np.testing.assert_allclose(value, value_clean, rtol=1e-6)
    np.testing.assert_allclose(
        jnp.where(valid, dx, 0), jnp.where(valid, dx_clean, 0), rtol=1e-5, atol=1e-6
    )
    assert np.isfinite(dx).all()
    for key in dp:
        np.testing.assert_allclose(dp[key], dp_clean[key], rtol=1e-5, atol=1e-6)
    y = jax.jit(normalizer)(poisoned, params, mask)
    assert np.isfinite(y).all()  # masked-out non-finite elements are normalized as 0


@pytest.mark.parametrize("name", sorted(NORMALIZERS))
def test_masked_out_nan_and_inf_reach_no_output_or_gradient(name):
    """Loss over valid outputs: identical values and gradients whether the padding holds NaN/Inf or 0."""
    poisoned, clean, mask = _masked_pair()
    params = {"scale": jnp.linspace(0.5, 1.5, 6), "bias": jnp.linspace(-1, 1, 6)}
    _assert_padding_reaches_nothing(NORMALIZERS[name], poisoned, clean, mask, mask, params)


NARROW_MASKED = {
    "batch_norm": lambda x, p, mask: jaxbn.batch_norm(
        x, p, jaxbn.batch_norm_init(24)[1], training=True, mask=mask
    )[0],
    "group_norm": lambda x, p, mask: jaxbn.group_norm(x, p, num_groups=4, mask=mask),
    "group_norm_of_ones": lambda x, p, mask: jaxbn.group_norm(x, p, num_groups=24, mask=mask),
    "instance_norm": lambda x, p, mask: jaxbn.instance_norm(x, p, mask=mask),
}


@pytest.mark.parametrize("name", sorted(NARROW_MASKED))
@pytest.mark.parametrize("mask_shape", [(8, 4, 4, 1), (8, 1, 1, 1)], ids=["positions", "examples"])
def test_masked_out_nan_and_inf_of_a_narrow_mask_reach_nothing(name, mask_shape):
    """A mask at most an eighth of x's size (the statistics weigh the sums by it as 0 / 1, after
    setting x's masked-out elements to 0): the loss over valid outputs, its gradients and the
    outputs are those of the same batch with 0 as its padding."""
    shape = (8, 4, 4, 24)
    x = _normal(6, shape, scale=2.0, offset=1e3)
    mask = np.random.default_rng(6).uniform(size=mask_shape) < 0.7
    mask.reshape(-1)[0] = False
    valid = np.broadcast_to(mask, shape)
    junk = np.array([np.nan, np.inf, -np.inf])[np.arange(x.size) % 3].reshape(shape)
    poisoned = jnp.asarray(np.where(valid, x, junk), jnp.float32)
    clean = jnp.asarray(np.where(valid, x, 0), jnp.float32)
    params = {"scale": jnp.linspace(0.5, 1.5, 24), "bias": jnp.linspace(-1, 1, 24)}
    _assert_padding_reaches_nothing(NARROW_MASKED[name], poisoned, clean, mask, valid, params)


def test_a_fully_masked_device_holding_nan_does_not_poison_the_others():
    """pmap over 8 devices, one device all padding (NaN): every device's gradients stay finite and exact."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(N_DEVICES, 4, 3)).astype(np.float32)
    mask = np.ones((N_DEVICES, 4, 1), bool)
    mask[3] = False
    poisoned = np.where(mask, x, np.nan).astype(np.float32)
    params, state = jaxbn.batch_norm_init(3)

    def grads(x, mask):
        def loss(x, p):
            y, _ = jaxbn.batch_norm(x, p, state, training=True, mask=mask, axis_name="i")
            return jnp.sum(jnp.where(mask, y * y * jnp.arange(1.0, 4.0), 0))

        return jax.grad(loss, (0, 1))(x, params)

    step = jax.pmap(grads, axis_name="i")
    dx, dp = step(poisoned, mask)
    dx_clean, dp_clean = step(np.where(mask, x, 0.0).astype(np.float32), mask)
    assert np.isfinite(np.asarray(dx)).all()
    np.testing.assert_allclose(dx, dx_clean, rtol=1e-5, atol=1e-6)
    for key in dp:
        np.testing.assert_allclose(dp[key], dp_clean[key], rtol=1e-5, atol=1e-6)


# -- B7/B8: the incoming state, however bad or far, degrades no result ---------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e20, -1e30])
def test_a_bad_running_mean_does_not_reach_training_outputs(bad):
    """Training normalizes with batch statistics whatever the running mean holds; momentum 0 takes the batch's."""
    x = jnp.asarray(_normal(6, (16, 3), scale=2.0, offset=5.0))
    params = jaxbn.batch_norm_init(3)[0]
    clean = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    bad_state = {"mean": jnp.array([bad, 0.0, bad], jnp.float32), "var": jnp.ones(3)}
    y_clean, _ = jaxbn.batch_norm(x, params, clean, training=True)
    y, new_state = jax.jit(lambda s: jaxbn.batch_norm(x, params, s, training=True, momentum=0.0))(
        bad_state
    )
    np.testing.assert_allclose(y, y_clean, atol=2e-5)
    mean, var = reference.batch_stats(x)
    np.testing.assert_allclose(new_state["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(new_state["var"], var, rtol=1e-4)
    # with momentum 0.9 a non-finite running statistic is replaced by the batch's, a finite one averaged
    _, averaged = jaxbn.batch_norm(x, params, bad_state, training=True, momentum=0.9)
    assert np.isfinite(np.asarray(averaged["mean"])).all() or not np.isfinite(bad)


@pytest.mark.parametrize("distance", [1e4, 1e7, 1e8, 1e10, 1e20, 3e38])
def test_variance_is_exact_for_any_finite_shift(distance):
    """Running mean far from a batch of std 0.01: variance and output still match float64."""
    x = _normal(7, (256, 4), scale=0.01)
    state = {"mean": jnp.full(4, distance, jnp.float32), "var": jnp.ones(4)}
    y, new_state = jaxbn.batch_norm(
        jnp.asarray(x), {}, state, training=True, momentum=0.0, epsilon=1e-12
    )
    mean, var = reference.batch_stats(x)
    np.testing.assert_allclose(new_state["var"], var, rtol=1e-5)
    np.testing.assert_allclose(new_state["mean"], mean, atol=1e-7)
    np.testing.assert_allclose(y, reference.normalize(x, mean, var, epsilon=1e-12), atol=1e-4)
    batch = jaxbn.moments(jnp.asarray(x), 0, shift=jnp.full(4, distance))
    np.testing.assert_allclose(batch.var, var, rtol=1e-5)


# -- transforms see the same --------------------------------------------------------------------


@pytest.mark.slow  # ~30 s per case: eager vmap and shard_map of moments
@pytest.mark.parametrize("offset, shift", [(0.0, 1e8), (1e4, 0.0), (-3e4, 1e10)])
def test_exact_statistics_at_far_shifts_under_vmap_and_shard_map(offset, shift):
    """Data far from the given shift, or far from 0: the statistics still match float64 per example
    under vmap, over a vmap axis_name and over shard_map's devices (parts of different means merged)."""
    parts = N_DEVICES
    x = _normal(10, (parts * 4, 3), scale=0.01, offset=offset)
    x = (
        x + np.repeat(np.arange(parts, dtype=np.float32) * 0.03, 4)[:, None]
    )  # the parts' means differ
    x_parts = jnp.asarray(x).reshape(parts, 4, 3)
    shift = jnp.full(3, shift, jnp.float32)
    mean, var = reference.batch_stats(x, axis=1)

    def check(result, mean, var, rtol):
        np.testing.assert_allclose(result.var, var, rtol=rtol)
        np.testing.assert_allclose(result.mean, mean, rtol=1e-6, atol=1e-6)

    per_example = jax.vmap(lambda part: jaxbn.moments(part, 0, shift=shift))(x_parts)
    expected = [reference.batch_stats(part, axis=1) for part in x.reshape(parts, 4, 3)]
    check(
        per_example,
        np.stack([m for m, _ in expected]),
        np.stack([v for _, v in expected]),
        rtol=1e-4,
    )
    merged = jax.vmap(
        lambda part: jaxbn.moments(part, 0, shift=shift, axis_name="b"), axis_name="b"
    )(x_parts)
    check(merged, np.broadcast_to(mean, (parts, 3)), np.broadcast_to(var, (parts, 3)), rtol=1e-5)

    mesh = jax.make_mesh((N_DEVICES,), ("i",))
    f = jax.shard_map(
        lambda x: jaxbn.moments(x, 0, shift=shift, axis_name="i"),
        mesh=mesh,
        in_specs=P("i"),
        out_specs=P(),
    )
    check(
        f(jax.device_put(jnp.asarray(x), jax.sharding.NamedSharding(mesh, P("i")))),
        mean,
        var,
        rtol=1e-5,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(
            jax.jit(lambda x: jaxbn.moments(x, 0, shift=shift))(jnp.asarray(x)),
            mean,
            var,
            rtol=1e-5,
        )


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_a_masked_out_first_element_with_a_far_running_mean_keeps_the_variance(layout, rng):
    """The statistics are taken around the first *valid* element: padding first and a far (cold or bad) running
    mean do not lose the variance of data with std 0.01 (around 1e8, float32 rounds x - 1e8 to -1e8)."""
    x = rng.normal(size=(8, 3, 3, 4)) * 0.01
    mask = rng.random((8, 3, 3, 1)) > 0.5
    mask[0] = False  # the first example is padding
    axes, feature = ((0, 1, 2), -1) if layout == "NHWC" else ((0, 2, 3), 1)
    if layout == "NCHW":
        x, mask = np.moveaxis(x, -1, 1), np.moveaxis(mask, -1, 1)
    valid = np.broadcast_to(mask, x.shape)
    want = np.array(
        [
            np.take(x, c, feature)[np.take(valid, c, feature)].astype(np.float64).var()
            for c in range(4)
        ]
    )
    moments = jax.jit(lambda x, m: jaxbn.moments(x, axes, mask=m, shift=jnp.full(4, 1e8)))(
        jnp.asarray(x, jnp.float32), jnp.asarray(mask)
    )
    np.testing.assert_allclose(moments.var, want, rtol=1e-5)
    params, state = jaxbn.batch_norm_init(4)
    state["mean"] = jnp.full(4, 1e8)
    _, new_state = jaxbn.batch_norm(
        jnp.asarray(x, jnp.float32),
        params,
        state,
        training=True,
        axis=feature,
        mask=jnp.asarray(mask),
        momentum=0.0,
    )
    np.testing.assert_allclose(new_state["var"], want, rtol=1e-5)
