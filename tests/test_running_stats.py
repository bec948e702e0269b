"""Running-statistics options of batch_norm: cumulative average, unbiased variance, update switch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxbn
import jaxbn.linen
from tests import reference

NCHW = (6, 3, 5, 5)


def _batches(rng, steps, shape=NCHW, offset=3.0):
    return [(rng.normal(size=shape) * 1.5 + offset).astype(np.float32) for _ in range(steps)]


def _unbiased(var, count):
    return var * count / (count - 1)


@functools.cache
def _step(**kwargs):
    return jax.jit(functools.partial(jaxbn.batch_norm, axis=1, **kwargs))


@pytest.mark.parametrize("unbiased", [False, True])
def test_cumulative_average_is_mean_of_batch_statistics_and_matches_torch(unbiased, rng):
    """momentum=None: after k batches the state is the mean of their statistics (float64, torch)."""
    torch = pytest.importorskip("torch")
    batches = _batches(rng, 4)
    params, state = jaxbn.batch_norm_init(3, cumulative=True)
    module = torch.nn.BatchNorm2d(3, momentum=None).double()
    step = _step(training=True, momentum=None, unbiased_running_var=unbiased)
    for x in batches:
        _, state = step(x, params, state)
        module(torch.from_numpy(x.astype(np.float64)))
    means, variances = zip(*(reference.batch_stats(x, axis=1) for x in batches))
    count = NCHW[0] * NCHW[2] * NCHW[3]
    expected_var = np.mean(variances, 0) * (count / (count - 1) if unbiased else 1)
    assert (
        state["count"] == len(batches) and state["count"].dtype == jnp.float32
    )  # exact: a count of batches
    np.testing.assert_allclose(state["mean"], np.mean(means, 0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state["var"], expected_var, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state["mean"], module.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    if unbiased:  # torch's running variance is always the unbiased one
        np.testing.assert_allclose(state["var"], module.running_var.numpy(), rtol=1e-6, atol=1e-6)


def test_unbiased_running_var_matches_torch_exponential_average(rng):
    """unbiased_running_var with momentum 0.9 reproduces BatchNorm2d(momentum=0.1) over 4 steps."""
    torch = pytest.importorskip("torch")
    params, state = jaxbn.batch_norm_init(3)
    module = torch.nn.BatchNorm2d(3, momentum=0.1).double()
    step = _step(training=True, momentum=0.9, unbiased_running_var=True)
    for x in _batches(rng, 4):
        y, state = step(x, params, state)
        y_torch = module(torch.from_numpy(x.astype(np.float64))).detach().numpy()
        np.testing.assert_allclose(y, y_torch, atol=2e-5)  # normalized with the biased variance
    np.testing.assert_allclose(state["mean"], module.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state["var"], module.running_var.numpy(), rtol=1e-6, atol=1e-6)


def test_unbiased_channel_with_one_valid_element_keeps_its_variance(rng):
    """With a mask, a channel with n == 1 keeps its running var; its mean and other channels update."""
    x = _batches(rng, 1, shape=(4, 3))[0]
    mask = np.ones((4, 3), bool)
    mask[1:, 0] = False  # channel 0: one valid element
    params, state = jaxbn.batch_norm_init(3)
    _, new = jaxbn.batch_norm(
        x, params, state, training=True, momentum=0.5, unbiased_running_var=True, mask=mask
    )
    mean, var = reference.batch_stats(x, mask=mask)
    np.testing.assert_allclose(new["mean"], 0.5 * mean, rtol=1e-6)
    np.testing.assert_allclose(new["var"][0], 1.0)
    np.testing.assert_allclose(new["var"][1:], 0.5 + 0.5 * _unbiased(var[1:], 4), rtol=1e-6)


@pytest.mark.parametrize("bad", ["nan", "all_masked"])
def test_guard_keeps_cumulative_state_and_count(bad, rng):
    """A NaN batch or one without valid elements leaves mean, var and count as they were."""
    params, state = jaxbn.batch_norm_init(3, cumulative=True)
    x = _batches(rng, 1, shape=(4, 3))[0]
    _, state = jaxbn.batch_norm(x, params, state, training=True, momentum=None)
    mask = None
    if bad == "nan":
        x = x.copy()
        x[2, 1] = np.nan
    else:
        mask = np.zeros((4, 1), bool)
    _, new = jaxbn.batch_norm(x, params, state, training=True, momentum=None, mask=mask)
    for key in (
        "mean",
        "var",
        "count",
    ):  # exact: the update is skipped, the old state selected unchanged
        np.testing.assert_array_equal(new[key], state[key])


@pytest.mark.parametrize(
    "training, update",
    [(True, None), (True, True), (True, False), (False, None), (False, False), (False, True)],
)
def test_switch_combinations_follow_the_table(training, update, rng):
    """`training` picks the normalizing statistics, `update_running_stats` whether the state updates."""
    x = _batches(rng, 1, shape=(8, 3), offset=1.0)[0]
    mask = np.arange(8)[:, None] < 6
    params = {"scale": jnp.array([0.5, 1.0, 2.0]), "bias": jnp.array([-1.0, 0.0, 1.0])}
    state = {"mean": jnp.array([0.5, 1.0, 1.5]), "var": jnp.array([1.0, 2.0, 3.0])}
    y, new = jax.jit(
        functools.partial(
            jaxbn.batch_norm, training=training, update_running_stats=update, momentum=0.75
        )
    )(x, params, state, mask=mask)
    batch_mean, batch_var = reference.batch_stats(x, mask=np.broadcast_to(mask, x.shape))
    norm_mean, norm_var = (batch_mean, batch_var) if training else (state["mean"], state["var"])
    np.testing.assert_allclose(
        y, reference.normalize(x, norm_mean, norm_var, params["scale"], params["bias"]), atol=2e-5
    )
    if training if update is None else update:
        np.testing.assert_allclose(new["mean"], 0.75 * state["mean"] + 0.25 * batch_mean, rtol=1e-6)
        np.testing.assert_allclose(new["var"], 0.75 * state["var"] + 0.25 * batch_var, rtol=1e-6)
    else:
        for key in state:  # exact: no update, the state passed through unchanged
            np.testing.assert_array_equal(new[key], state[key])
    if update is False:  # outside jit the state object itself comes back
        assert (
            jaxbn.batch_norm(x, params, state, training=training, update_running_stats=False)[1]
            is state
        )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(momentum=None),
            ValueError,
            r"momentum=None .* batch_norm_init\(\.\.\., cumulative=True\)",
        ),
        (dict(cumulative=True, momentum=0.9), ValueError, "state has a 'count' entry"),
        (
            dict(cumulative=True, momentum=None, count=jnp.zeros(3)),
            ValueError,
            r"state\['count'\] must be a scalar",
        ),
        (
            dict(update_running_stats=1),
            TypeError,
            "update_running_stats must be a Python bool or None",
        ),
        (dict(unbiased_running_var=None), TypeError, "unbiased_running_var must be a Python bool"),
        (
            dict(extra=True),
            ValueError,
            r"unknown keys \['n'\]; expected only \['mean', 'var', 'count'\]",
        ),
    ],
)
def test_validation(kwargs, error, match):
    """Inconsistent state and momentum, and bad switches, raise at trace time with clear messages."""
    _, state = jaxbn.batch_norm_init(3, cumulative=kwargs.pop("cumulative", False))
    if "count" in kwargs:
        state["count"] = kwargs.pop("count")
    if kwargs.pop("extra", False):
        state["n"] = jnp.zeros(())
    call = dict(training=True) | kwargs
    with pytest.raises(error, match=match):
        jaxbn.batch_norm(call.pop("x", jnp.ones((4, 3))), None, state, **call)


def test_inference_passes_count_through():
    """Without an update, a cumulative state is returned as is, whatever the momentum."""
    _, state = jaxbn.batch_norm_init(3, cumulative=True)
    assert jaxbn.batch_norm(jnp.ones((4, 3)), None, state, training=False)[1] is state


@pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (conftest.py forces 8 CPU devices)"
)
@pytest.mark.parametrize("training", [True, False])
def test_unbiased_factor_uses_global_count_across_devices(training, rng):
    """pmap over 8 devices with uneven masked counts: var * n/(n-1) with n the global count."""
    x = (rng.normal(size=(8, 4, 3)) * 2 + 1).astype(np.float32)
    valid = (
        np.arange(4)[None, :] < (np.arange(8) % 4 + 1)[:, None]
    )  # 1..4 valid examples per device
    mask = valid[..., None]
    params, state = jaxbn.batch_norm_init(3, cumulative=True)

    def step(x, mask):
        return jaxbn.batch_norm(
            x,
            params,
            state,
            training=training,
            update_running_stats=True,
            momentum=None,
            unbiased_running_var=True,
            axis_name="i",
            mask=mask,
        )[1]

    new = jax.pmap(step, axis_name="i")(x, mask)
    flat_x, flat_mask = x.reshape(-1, 3), np.broadcast_to(mask, x.shape).reshape(-1, 3)
    mean, var = reference.batch_stats(flat_x, mask=flat_mask)
    n = valid.sum()
    for d in range(8):  # every device holds the same state
        np.testing.assert_allclose(new["mean"][d], mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(new["var"][d], _unbiased(var, n), rtol=1e-6)
        assert new["count"][d] == 1  # exact: a count of updates, 0 + 1


def _linen_update(module, variables, x, **kwargs):
    return module.apply(variables, x, mutable=["batch_stats"], **kwargs)


def test_linen_default_variables_stay_flax_and_options_match_functional(rng):
    """Default variables equal flax's; momentum=None adds count; options call the functional core."""
    x = jnp.asarray(_batches(rng, 1, shape=(8, 3))[0])
    key = jax.random.key(0)
    ours = jaxbn.linen.BatchNorm(use_running_average=False).init(key, x)
    theirs = nn.BatchNorm(use_running_average=False).init(key, x)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, ours, theirs
    )  # exact: constant inits (ones, zeros)

    params, state = jaxbn.batch_norm_init(3, cumulative=True)
    module = jaxbn.linen.BatchNorm(
        use_running_average=False, momentum=None, unbiased_running_var=True
    )
    variables = module.init(key, x)
    assert set(variables["batch_stats"]) == {"mean", "var", "count"}
    for _ in range(2):
        y, updates = _linen_update(module, variables, x)
        variables = {**variables, **updates}
        y_ref, state = jaxbn.batch_norm(
            x, params, state, training=True, momentum=None, unbiased_running_var=True
        )
    np.testing.assert_allclose(y, y_ref)
    jax.tree_util.tree_map(np.testing.assert_allclose, dict(variables["batch_stats"]), state)


def test_linen_update_switch(rng):
    """update_running_stats=False keeps batch_stats in training; True updates them in inference."""
    x = jnp.asarray(_batches(rng, 1, shape=(8, 3))[0])
    frozen = jaxbn.linen.BatchNorm(
        use_running_average=False, update_running_stats=False, momentum=0.5
    )
    variables = frozen.init(jax.random.key(0), x)
    y = frozen.apply(variables, x)  # nothing mutable is needed: nothing is written
    params, state = jaxbn.batch_norm_init(3)
    np.testing.assert_allclose(y, jaxbn.batch_norm(x, params, state, training=True)[0])

    reestimate = jaxbn.linen.BatchNorm(
        use_running_average=True, update_running_stats=True, momentum=0.5
    )
    y, updates = _linen_update(reestimate, variables, x)
    np.testing.assert_allclose(y, jaxbn.batch_norm(x, params, state, training=False)[0])
    expected = jaxbn.batch_norm(x, params, state, training=True, momentum=0.5)[1]
    jax.tree_util.tree_map(np.testing.assert_allclose, dict(updates["batch_stats"]), expected)
