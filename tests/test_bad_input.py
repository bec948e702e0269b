"""Bad arguments get a clear error at trace time, or are accepted as a user would expect."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx

X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)) + 2.0, jnp.float32)


def _train(x=X, params=None, state=None, **kwargs):
    default_params, default_state = jaxbn.batch_norm_init(3)
    return jaxbn.batch_norm(
        x,
        default_params if params is None else params,
        default_state if state is None else state,
        training=True,
        **kwargs,
    )


def test_bfloat16_state_is_updated_in_float32_and_keeps_its_dtype():
    state = {"mean": jnp.zeros(3, jnp.bfloat16), "var": jnp.ones(3, jnp.bfloat16)}
    _, new_state = _train(state=state, momentum=0.0)
    assert new_state["mean"].dtype == new_state["var"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(new_state["mean"], np.float32), X.mean(0), rtol=1e-2)


def test_traced_epsilon_works_in_training_and_inference():
    """epsilon computed inside jit (e.g. a hyperparameter sweep) is used as given."""
    for training in (True, False):
        f = jax.jit(
            lambda eps: jaxbn.batch_norm(
                X, *jaxbn.batch_norm_init(3), training=training, epsilon=eps
            )
        )
        y, state = f(jnp.float32(1e-3))
        y_static, state_static = jaxbn.batch_norm(
            X, *jaxbn.batch_norm_init(3), training=training, epsilon=1e-3
        )
        np.testing.assert_allclose(y, y_static, rtol=1e-6)
        grad = jax.grad(
            lambda x, eps: jnp.sum(
                jnp.sin(
                    jaxbn.batch_norm(
                        x, {}, jaxbn.batch_norm_init(3)[1], training=True, epsilon=eps
                    )[0]
                )
            )
        )
        assert np.isfinite(jax.jit(grad)(X, jnp.float32(1e-3))).all()


def test_array_likes_and_numpy_integers_are_accepted():
    """Lists for params and state; any integer type for feature counts."""
    y, state = jaxbn.batch_norm(
        X,
        {"scale": [1.0, 2.0, 3.0]},
        {"mean": [0.0, 0.0, 0.0], "var": [1.0, 1.0, 1.0]},
        training=True,
    )
    y_ref, _ = _train(params={"scale": jnp.array([1.0, 2.0, 3.0])})
    np.testing.assert_allclose(y, y_ref)
    assert jaxbn.batch_norm_init(np.int64(3))[1]["mean"].shape == (3,)
    assert jaxbn.nnx.BatchNorm(np.int64(3), rngs=nnx.Rngs(0)).num_features == 3
    assert (
        jaxbn.nnx.GroupNorm(np.int32(4), num_groups=np.int64(2), rngs=nnx.Rngs(0)).num_groups == 2
    )
    with pytest.raises(TypeError, match=r"params\['scale'\] must be an array"):
        jaxbn.batch_norm(X, {"scale": object()}, jaxbn.batch_norm_init(3)[1], training=True)


def test_axis_index_groups_must_cover_the_axis():
    f = lambda groups: jax.pmap(
        lambda x: jaxbn.batch_norm(
            x, *jaxbn.batch_norm_init(3), training=True, axis_name="i", axis_index_groups=groups
        )[0],
        axis_name="i",
    )(jnp.ones((8, 2, 3)))
    for groups in ([[0, 1], [2, 3]], [[0, 1, 2, 3], [3, 4, 5, 6]], [[0, 1, 2], [3, 4, 5, 6, 7]]):
        with pytest.raises(ValueError, match="axis_index_groups must"):
            f(groups)
    assert f([[0, 1, 2, 3], [4, 5, 6, 7]]).shape == (8, 2, 3)


def test_a_numpy_float64_batch_warns_nothing():
    x = np.random.default_rng(1).normal(size=(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxbn.batch_norm(x, *jaxbn.batch_norm_init(3), training=True)
        jaxbn.layer_norm(x)
        jaxbn.group_norm(x, num_groups=3)
        jaxbn.moments(x, 0)


def test_axis_messages_name_the_users_argument():
    with pytest.raises(
        ValueError, match="normalization needs an input with at least one axis, got a 0-d"
    ):
        _train(x=jnp.float32(1.0))
    with pytest.raises(ValueError, match="normalization needs an input with at least one axis"):
        jaxbn.layer_norm(jnp.float32(1.0))
    # every axis a feature axis, with a mask: each element is its own statistic, no internal name in sight
    state = {"mean": jnp.zeros((8, 3)), "var": jnp.ones((8, 3))}
    y, _ = jaxbn.batch_norm(X, {}, state, training=True, axis=(0, 1), mask=jnp.ones((8, 3), bool))
    # x - mean is 0 up to the rounding of the statistics (each element its own mean): not bitwise
    np.testing.assert_allclose(y, jnp.zeros((8, 3)), rtol=0, atol=1e-6)


def test_complex_state_is_created_on_request_and_keeps_its_dtype_in_a_scan():
    """batch_norm_init(dtype=complex64) gives a complex mean; a real mean with complex input is refused."""
    z = jnp.asarray(np.random.default_rng(2).normal(size=(4, 8, 3)) * (1 + 1j), jnp.complex64)
    params, state = jaxbn.batch_norm_init(3, dtype=jnp.complex64)
    assert (
        state["mean"].dtype == jnp.complex64
        and state["var"].dtype == params["scale"].dtype == jnp.float32
    )

    def step(state, x):
        y, state = jaxbn.batch_norm(x, params, state, training=True)
        return state, y

    final, ys = jax.lax.scan(step, state, z)
    assert final["mean"].dtype == jnp.complex64 and ys.shape == z.shape
    with pytest.raises(
        TypeError,
        match=r"state\['mean'\] is float32.*batch_norm_init\(\.\.\., dtype=jnp.complex64\)",
    ):
        jaxbn.batch_norm(z[0], *jaxbn.batch_norm_init(3), training=True)
    y, _ = jaxbn.batch_norm(
        z[0], *jaxbn.batch_norm_init(3), training=False
    )  # inference reads a real mean fine
    assert y.dtype == jnp.complex64


@pytest.mark.parametrize("api", ["functional", "linen", "nnx"])
def test_renorm_steps_advance_only_with_the_running_statistics(api):
    """A NaN batch and a fully masked batch change neither the statistics nor the step counter."""
    schedule = dict(r_max=lambda s: 1.0 + s, d_max=lambda s: s)
    batches = [
        (X, None),
        (X.at[0, 0].set(jnp.nan), None),
        (X, jnp.zeros((8, 1), bool)),
        (X + 1.0, None),
    ]
    if api == "functional":
        params, state = jaxbn.batch_norm_init(3)
        state = {**state, "steps": jnp.zeros((), jnp.int32)}
        counts = []
        for x, mask in batches:
            _, state = jaxbn.batch_renorm(
                x, params, state, training=True, r_max=3.0, d_max=5.0, mask=mask
            )
            counts.append(int(state["steps"]))
    elif api == "linen":
        module = jaxbn.linen.BatchRenorm(use_running_average=False, **schedule)
        variables = module.init(jax.random.key(0), X)
        counts = []
        for x, mask in batches:
            _, updates = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
            variables = {**variables, **updates}
            counts.append(int(variables["batch_stats"]["steps"]))
    else:
        module = jaxbn.nnx.BatchRenorm(3, rngs=nnx.Rngs(0), **schedule)
        counts = []
        for x, mask in batches:
            module(x, mask=mask)
            counts.append(int(module.steps[...]))
    assert counts == [1, 1, 1, 2]
