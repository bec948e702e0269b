"""Batch moments out of the modules: merge_moments, update_running_stats, micro-batch accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from tests import reference


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_merged_moments_are_the_moments_of_the_whole(offset, rng):
    """Parts with their own shifts (and an empty part) merge into the statistics of the concatenation."""
    x = (rng.normal(size=(24, 3)) * 2 + offset + rng.normal(size=3)).astype(np.float32)
    mask = np.ones((24, 3), bool)
    mask[16:] = False  # the last part has no valid element
    parts = [
        jaxbn.moments(jnp.asarray(x[i : i + 8]), 0, mask=mask[i : i + 8], shift=jnp.asarray(x[i]))
        for i in (0, 8, 16)
    ]
    merged = jaxbn.merge_moments(parts)
    mean, var = reference.batch_stats(x[:16])
    np.testing.assert_allclose(merged.count, [16, 16, 16])
    np.testing.assert_allclose(
        np.asarray(merged.shift, np.float64) + np.asarray(merged.mean_minus_shift),
        mean,
        rtol=1e-7,
        atol=1e-6,
    )
    np.testing.assert_allclose(merged.var, var, rtol=1e-5)
    with pytest.raises(ValueError, match="non-empty sequence of Moments"):
        jaxbn.merge_moments([])


def test_one_update_per_step_over_micro_batches_equals_the_whole_batch(rng):
    """4 micro-batches, moments merged, one update: the state of batch_norm on the concatenated batch."""
    x = jnp.asarray(rng.normal(size=(32, 5)) * 3 + 1, jnp.float32)
    params, state = jaxbn.batch_norm_init(5)
    micro = []
    for chunk in jnp.split(x, 4):
        y, same, moments = jaxbn.batch_norm(
            chunk,
            params,
            state,
            training=True,
            momentum=0.9,
            update_running_stats=False,
            return_moments=True,
        )
        assert same is state
        micro.append(moments)
    accumulated = jaxbn.update_running_stats(
        state, jaxbn.merge_moments(micro), momentum=0.9, unbiased_running_var=True
    )
    _, whole = jaxbn.batch_norm(
        x, params, state, training=True, momentum=0.9, unbiased_running_var=True
    )
    for key in ("mean", "var"):
        np.testing.assert_allclose(accumulated[key], whole[key], rtol=1e-6)
    sequential = state
    for chunk in jnp.split(
        x, 4
    ):  # what each micro-batch applying its own update does: momentum 0.9**4
        _, sequential = jaxbn.batch_norm(chunk, params, sequential, training=True, momentum=0.9)
    assert not np.allclose(sequential["mean"], whole["mean"], rtol=1e-3)
    with pytest.raises(TypeError, match="batch must be jaxbn.Moments"):
        jaxbn.update_running_stats(state, (1.0, 2.0))


def test_modules_sow_their_batch_moments_when_asked(rng):
    x = jnp.asarray(rng.normal(size=(8, 3)) + 2, jnp.float32)
    expected = jaxbn.moments(x, 0)
    module = jaxbn.linen.BatchNorm(use_running_average=False, sow_moments=True)
    variables = module.init(jax.random.key(0), x)
    _, collections = module.apply(variables, x, mutable=["batch_stats", "intermediates"])
    (sown,) = collections["intermediates"]["batch_moments"]
    np.testing.assert_allclose(sown.mean, expected.mean, rtol=1e-6)
    np.testing.assert_allclose(sown.var, expected.var, rtol=1e-6)
    _, collections = jaxbn.linen.BatchNorm(use_running_average=False).apply(
        variables, x, mutable=["batch_stats", "intermediates"]
    )
    assert "intermediates" not in collections  # flax's variables unless asked
    if not hasattr(nnx, "capture"):
        pytest.skip("this flax has no nnx.capture")
    bn = jaxbn.nnx.BatchNorm(3, sow_moments=True, rngs=nnx.Rngs(0))
    _, intermediates = nnx.capture(bn, nnx.Intermediate)(x)
    (sown,) = nnx.to_pure_dict(intermediates)["batch_moments"]
    np.testing.assert_allclose(sown.var, expected.var, rtol=1e-6)


def test_moments_in_inference_count_the_mask_and_cost_nothing_unless_asked(rng):
    """return_moments in inference takes the mask into account; without it inference takes no statistics."""
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    mask = jnp.arange(8)[:, None] < 5
    params, state = jaxbn.batch_norm_init(3)
    _, same, moments = jaxbn.batch_norm(
        x, params, state, training=False, mask=mask, return_moments=True
    )
    assert same is state
    np.testing.assert_allclose(moments.mean, x[:5].mean(0), rtol=1e-5, atol=1e-6)
    module = jaxbn.linen.BatchNorm(use_running_average=True)
    variables = module.init(jax.random.key(0), x)
    text = jax.jit(module.apply).lower(variables, x).compile().as_text()
    assert " while(" not in text  # inference is one elementwise pass: no loop, no reduction


# -- the returned moments are differentiable (a loss on batch statistics gets its gradient) -------------------------

_W = np.array([0.7, -1.3, 0.4], np.float32)


def _moments_loss(moments):
    # mean, var and mean_minus_shift (linear in it: its value depends on the shift taken, its gradient does not)
    return (
        jnp.sum(_W * moments.mean)
        + jnp.sum(_W**2 * moments.var)
        + jnp.sum(_W[::-1] * moments.mean_minus_shift)
    )


def _output_loss(y):
    return 0.1 * jnp.sum(jnp.asarray(y, jnp.float32) ** 3)


def _group_moments(x, ghost, **kwargs):
    """Ghost batches' moments, as batch_norm averages them: jaxbn.moments per group, averaged."""
    groups = x.reshape((x.shape[0] // ghost, ghost) + x.shape[1:])
    parts = jaxbn.moments(groups, 1, **kwargs)
    mean, var = parts.mean.mean(0), parts.var.mean(0)
    return jaxbn.Moments(mean, var, jnp.sum(parts.count, 0), parts.shift[0], mean - parts.shift[0])


_CASES = {
    "training": (dict(training=True), lambda x: jaxbn.moments(x, 0)),
    "mask": (
        dict(training=True, mask=(np.arange(12) % 3 != 0)[:, None]),
        lambda x: jaxbn.moments(x, 0, mask=(np.arange(12) % 3 != 0)[:, None]),
    ),
    "ghost": (dict(training=True, ghost_batch_size=4), lambda x: _group_moments(x, 4)),
    "inference": (dict(training=False), lambda x: jaxbn.moments(x, 0)),
    "unbiased": (dict(training=True, unbiased_running_var=True), lambda x: jaxbn.moments(x, 0)),
}


@pytest.mark.parametrize(
    "case, normalizer",
    [  # the default tier: every case for batch_norm, training for batch_renorm (same moments
        # path); batch_renorm has no ghost batches
        (case, normalizer)
        if normalizer == "batch_norm" or case == "training"
        else pytest.param(case, normalizer, marks=pytest.mark.slow)
        for case in sorted(_CASES)
        for normalizer in ("batch_norm", "batch_renorm")
        if (case, normalizer) != ("ghost", "batch_renorm")
    ],
)
def test_returned_moments_carry_the_gradient_of_jaxbn_moments(case, normalizer, rng):
    """grad of a loss on the output and the returned moments = that of the output plus jaxbn.moments' own."""
    kwargs, reference_moments = _CASES[case]
    x = jnp.asarray(rng.normal(size=(12, 3)) * 2 + 3, jnp.float32)
    params, state = jaxbn.batch_norm_init(3)
    params["scale"] = params["scale"] * 1.5
    state["mean"] = (
        state["mean"] + 2.5
    )  # a running mean far from the batch: the moments must not depend on it
    function = getattr(jaxbn, normalizer)
    if normalizer == "batch_renorm":
        kwargs = dict(kwargs, r_max=1.5, d_max=0.5)

    def loss(x):
        y, _, moments = function(x, params, state, momentum=0.9, return_moments=True, **kwargs)
        return _output_loss(y) + _moments_loss(moments)

    def reference(x):
        y, _ = function(x, params, state, momentum=0.9, **kwargs)
        return _output_loss(y) + _moments_loss(reference_moments(x))

    got, want = jax.jit(jax.grad(loss))(x), jax.jit(jax.grad(reference))(x)
    assert (
        np.abs(np.asarray(jax.grad(lambda x: _moments_loss(reference_moments(x)))(x))).max() > 0.1
    )
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_the_moments_of_one_value_per_feature_carry_the_gradient(rng):
    """One value per feature: the mean is x itself (gradient 1), the variance 0 (gradient 0)."""
    x = jnp.asarray(rng.normal(size=(1, 3)), jnp.float32)
    params, state = jaxbn.batch_norm_init(3)
    with pytest.warns(jaxbn.DegenerateBatchWarning):
        grad = jax.grad(
            lambda x: _moments_loss(
                jaxbn.batch_norm(x, params, state, training=True, return_moments=True)[2]
            )
        )(x)
    np.testing.assert_allclose(grad, (_W + _W[::-1])[None], rtol=1e-6)


def test_complex_moments_carry_the_gradient(rng):
    """Complex input (differentiated by autodiff, not the custom VJP): the same as jaxbn.moments."""
    x = jnp.asarray(rng.normal(size=(8, 3)) + 1j * rng.normal(size=(8, 3)) + 2, jnp.complex64)
    params, state = jaxbn.batch_norm_init(3, dtype=jnp.complex64)

    def loss(moments):
        return jnp.sum(jnp.abs(moments.mean) ** 2) + jnp.sum(_W * moments.var)

    got = jax.grad(
        lambda x: loss(jaxbn.batch_norm(x, params, state, training=True, return_moments=True)[2])
    )(x)
    want = jax.grad(lambda x: loss(jaxbn.moments(x, 0)))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_moments_gradient_alone_and_running_statistics_carry_none(dtype, rng):
    """Only the moments differentiated (no output cotangent); the updated running statistics carry no gradient.

    The running statistics are state, as PyTorch's buffers (flax differentiates its updated running mean:
    docs/differences.md lists it).
    """
    x = jnp.asarray(rng.normal(size=(16, 3)) + 1, dtype)
    params, state = jaxbn.batch_norm_init(3)
    got = jax.grad(
        lambda x: jnp.sum(
            jaxbn.batch_norm(x, params, state, training=True, return_moments=True)[2].var
        )
    )(x)
    want = jax.grad(lambda x: jnp.sum(jaxbn.moments(x, 0).var))(x)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-3
    )
    for key in ("mean", "var"):
        running = jax.grad(
            lambda x: jnp.sum(jaxbn.batch_norm(x, params, state, training=True)[1][key])
        )(x)
        # exactly 0 by construction: the update stops the gradient, so no arithmetic produces this zero
        assert not np.any(np.asarray(running, np.float32))


def _cross_device_runs():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("i",), axis_types=(jax.sharding.AxisType.Auto,))

    def shard(x):
        return jax.device_put(x.reshape((-1,) + x.shape[2:]), NamedSharding(mesh, P("i")))

    def shard_map(check):
        return lambda f, x: jax.shard_map(
            jax.grad(f), mesh=mesh, in_specs=P("i"), out_specs=P("i"), check_vma=check
        )(shard(x)).reshape(x.shape)

    return {
        "pmap": lambda f, x: jax.pmap(jax.grad(f), axis_name="i", devices=jax.devices()[:4])(x),
        "vmap": lambda f, x: jax.vmap(jax.grad(f), axis_name="i")(x),
        "shard_map": shard_map(True),
        "shard_map_unchecked": shard_map(False),
    }


@pytest.mark.parametrize(
    "setup",
    [
        "pmap",
        "vmap",
        *(
            pytest.param(s, marks=pytest.mark.slow)  # ~30-50 s each, eager
            for s in ("shard_map", "shard_map_unchecked")
        ),
    ],
)
def test_moments_gradient_across_devices_equals_autodiff_through_jaxbn_moments(setup, rng):
    """Under each device setup the moments' gradient is what autodiff through jaxbn.moments' collectives gives."""
    x = jnp.asarray(rng.normal(size=(4, 5, 3)) * 2 + 3, jnp.float32)
    params, state = jaxbn.batch_norm_init(3)

    def loss(x):
        y, _, moments = jaxbn.batch_norm(
            x, params, state, training=True, axis_name="i", return_moments=True
        )
        return _output_loss(y) + _moments_loss(moments)

    def reference(x):
        y, _ = jaxbn.batch_norm(x, params, state, training=True, axis_name="i")
        return _output_loss(y) + _moments_loss(jaxbn.moments(x, 0, axis_name="i"))

    run = _cross_device_runs()[setup]
    np.testing.assert_allclose(run(loss, x), run(reference, x), rtol=2e-5, atol=2e-5)


def test_sown_moments_carry_the_gradient(rng):
    """The modules' sow_moments give the same differentiable moments (linen and nnx)."""
    x = jnp.asarray(rng.normal(size=(8, 3)) + 2, jnp.float32)
    want = jax.grad(lambda x: _moments_loss(jaxbn.moments(x, 0)))(x)
    module = jaxbn.linen.BatchNorm(use_running_average=False, sow_moments=True)
    variables = module.init(jax.random.key(0), x)

    def linen_loss(x):
        _, collections = module.apply(variables, x, mutable=["batch_stats", "intermediates"])
        return _moments_loss(collections["intermediates"]["batch_moments"][0])

    np.testing.assert_allclose(jax.grad(linen_loss)(x), want, rtol=1e-5, atol=1e-6)
    if not hasattr(nnx, "capture"):
        pytest.skip("this flax has no nnx.capture")
    bn = jaxbn.nnx.BatchNorm(3, sow_moments=True, rngs=nnx.Rngs(0))

    def nnx_loss(bn, x):
        _, intermediates = nnx.capture(bn, nnx.Intermediate)(x)
        return _moments_loss(nnx.to_pure_dict(intermediates)["batch_moments"][0])

    np.testing.assert_allclose(nnx.grad(nnx_loss, argnums=1)(bn, x), want, rtol=1e-5, atol=1e-6)
