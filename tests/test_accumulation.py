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
        jaxbn.moments(jnp.asarray(x[i:i + 8]), 0, mask=mask[i:i + 8], shift=jnp.asarray(x[i]))
        for i in (0, 8, 16)
    ]
    merged = jaxbn.merge_moments(parts)
    mean, var = reference.batch_stats(x[:16])
    np.testing.assert_allclose(merged.count, [16, 16, 16])
    np.testing.assert_allclose(np.asarray(merged.shift, np.float64) + np.asarray(merged.mean_minus_shift), mean,
                               rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(merged.var, var, rtol=1e-5)
    with pytest.raises(ValueError, match="non-empty sequence of Moments"):
        jaxbn.merge_moments([])


def test_one_update_per_step_over_micro_batches_equals_the_whole_batch(rng):
    """4 micro-batches, moments merged, one update: the state of batch_norm on the concatenated batch."""
    x = jnp.asarray(rng.normal(size=(32, 5)) * 3 + 1, jnp.float32)
    params, state = jaxbn.batch_norm_init(5)
    micro = []
    for chunk in jnp.split(x, 4):
        y, same, moments = jaxbn.batch_norm(chunk, params, state, training=True, momentum=0.9,
                                            update_running_stats=False, return_moments=True)
        assert same is state
        micro.append(moments)
    accumulated = jaxbn.update_running_stats(state, jaxbn.merge_moments(micro), momentum=0.9,
                                             unbiased_running_var=True)
    _, whole = jaxbn.batch_norm(x, params, state, training=True, momentum=0.9, unbiased_running_var=True)
    for key in ("mean", "var"):
        np.testing.assert_allclose(accumulated[key], whole[key], rtol=1e-6)
    sequential = state
    for chunk in jnp.split(x, 4):  # what each micro-batch applying its own update does: momentum 0.9**4
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
        variables, x, mutable=["batch_stats", "intermediates"])
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
    _, same, moments = jaxbn.batch_norm(x, params, state, training=False, mask=mask, return_moments=True)
    assert same is state
    np.testing.assert_allclose(moments.mean, x[:5].mean(0), rtol=1e-5, atol=1e-6)
    module = jaxbn.linen.BatchNorm(use_running_average=True)
    variables = module.init(jax.random.key(0), x)
    text = jax.jit(module.apply).lower(variables, x).compile().as_text()
    assert " while(" not in text  # inference is one elementwise pass: no re-shift loop, no reduction
