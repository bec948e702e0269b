"""jaxbn.batch_norm / normalize on one device: references, guard, transforms, validation."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from tests import reference


def _batches(rng, steps, shape=(8, 4, 4, 3), offset=2.0, dtype=np.float32):
    return [(rng.normal(size=shape) * 1.5 + offset).astype(dtype) for _ in range(steps)]


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("affine", [True, False])
def test_training_steps_match_float64_reference(axis, affine, rng):
    """Outputs and running statistics over 4 steps equal a float64 NumPy batch norm."""
    batches = _batches(rng, 4)
    features = batches[0].shape[axis]
    params, state = jaxbn.batch_norm_init(features, use_scale=affine, use_bias=affine)
    if affine:
        params = {
            "scale": jnp.linspace(0.5, 2.0, features),
            "bias": jnp.linspace(-1.0, 1.0, features),
        }
    step = jax.jit(functools.partial(jaxbn.batch_norm, training=True, axis=axis, momentum=0.9))
    outputs = []
    for x in batches:
        y, state = step(x, params, state)
        outputs.append(y)
    expected, expected_state = reference.batch_norm_steps(
        batches, momentum=0.9, axis=axis, scale=params.get("scale"), bias=params.get("bias")
    )
    for y, y_ref in zip(outputs, expected):
        np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(state["mean"], expected_state["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["var"], expected_state["var"], rtol=1e-5)
    y_eval, same = jaxbn.batch_norm(batches[0], params, state, training=False, axis=axis)
    assert same is state
    np.testing.assert_allclose(
        y_eval,
        reference.normalize(
            batches[0], state["mean"], state["var"], params.get("scale"), params.get("bias"), axis
        ),
        atol=2e-5,
    )


def test_matches_torch_batchnorm2d(rng):
    """NCHW outputs and running statistics equal torch.nn.BatchNorm2d (momentum 1 - m, unbiased var)."""
    torch = pytest.importorskip("torch")
    batches = _batches(rng, 3, shape=(6, 3, 5, 5), offset=3.0)
    module = torch.nn.BatchNorm2d(3, momentum=0.1, eps=1e-5).double()
    params, state = jaxbn.batch_norm_init(3)
    unbiased_var = np.ones(3)
    for x in batches:
        y_torch = module(torch.from_numpy(x.astype(np.float64))).detach().numpy()
        y, state = jaxbn.batch_norm(x, params, state, training=True, axis=1, momentum=0.9)
        np.testing.assert_allclose(y, y_torch, atol=2e-5)
        n = x.size // 3
        _, var = reference.batch_stats(x, axis=1)
        unbiased_var = 0.9 * unbiased_var + 0.1 * var * n / (n - 1)
    np.testing.assert_allclose(state["mean"], module.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    # torch averages the unbiased batch variance; jaxbn (like flax) the biased one
    np.testing.assert_allclose(module.running_var.numpy(), unbiased_var, rtol=1e-10)


def test_normalize_matches_reference_and_keeps_dtype_rule(rng):
    """normalize() is (x - mean) * rsqrt(var + eps) * scale + bias; output dtype follows flax."""
    x = jnp.asarray(rng.normal(size=(4, 3, 2)), jnp.bfloat16)
    mean, var = jnp.array([0.1, 0.2]), jnp.array([1.0, 4.0])
    scale, bias = jnp.array([2.0, 3.0]), jnp.array([0.5, -0.5])
    y = jaxbn.normalize(x, mean, var, scale, bias)
    assert y.dtype == jnp.float32  # bf16 input, f32 params: promoted, as flax
    np.testing.assert_allclose(
        y, reference.normalize(x.astype(jnp.float32), mean, var, scale, bias), atol=1e-5
    )
    assert jaxbn.normalize(x, mean, var, scale, bias, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    assert jaxbn.normalize(x, mean, var).dtype == jnp.bfloat16


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_batch_leaves_state_unchanged_and_recovers(bad, rng):
    """A non-finite value: output non-finite, state unchanged; later steps equal a clean run."""
    clean = _batches(rng, 11, shape=(8, 3))
    poisoned = clean[0].copy()
    poisoned[2, 1] = bad
    params, state0 = jaxbn.batch_norm_init(3)
    step = jax.jit(functools.partial(jaxbn.batch_norm, training=True))
    y, state = step(poisoned, params, state0)
    assert not np.isfinite(np.asarray(y)).all()
    # exact: the update is skipped, the old state selected unchanged
    np.testing.assert_array_equal(state["mean"], state0["mean"])
    np.testing.assert_array_equal(state["var"], state0["var"])
    clean_state = state0
    for x in clean[1:]:
        _, state = step(x, params, state)
        _, clean_state = step(x, params, clean_state)
    # exact: the same compiled `step` run on the same inputs (the states start equal bit for bit)
    np.testing.assert_array_equal(state["mean"], clean_state["mean"])
    np.testing.assert_array_equal(state["var"], clean_state["var"])


@pytest.mark.parametrize("position", [0, 5])
@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_an_infinite_value_gives_an_infinite_variance_wherever_it_is(bad, position, rng):
    """An infinite value of one sign: that feature's variance is +inf and its mean K (as for a
    variance beyond the dtype), its other outputs the bias; the same whether the value is the
    feature's first element (K's fallback) or not."""
    x = _batches(rng, 1, shape=(8, 3))[0].copy()
    x[position, 1] = bad
    params = {"scale": jnp.full(3, 2.0), "bias": jnp.arange(3.0)}
    _, state = jaxbn.batch_norm_init(3)
    y, new, moments = jaxbn.batch_norm(x, params, state, training=True, return_moments=True)
    assert float(moments.var[1]) == np.inf and np.isfinite(moments.mean[1])
    others = np.delete(np.asarray(y[:, 1]), position)
    # exact: a zero multiplier times a finite centred value, plus the bias
    np.testing.assert_array_equal(others, np.full(7, 1.0))
    np.testing.assert_array_equal(new["mean"], state["mean"])  # exact: the update is skipped


def test_fully_masked_batch_and_channel_keep_their_state(rng):
    """No valid element: state unchanged, output finite; an empty channel keeps its own state."""
    x = _batches(rng, 1, shape=(6, 3))[0]
    params, state = jaxbn.batch_norm_init(3)
    y, new = jaxbn.batch_norm(x, params, state, training=True, mask=jnp.zeros((6, 1), bool))
    assert np.isfinite(np.asarray(y)).all()
    # exact: no valid element, the update is skipped and the old state selected unchanged
    np.testing.assert_array_equal(new["mean"], state["mean"])
    np.testing.assert_array_equal(new["var"], state["var"])
    mask = np.ones((6, 3), bool)
    mask[:, 1] = False
    _, new = jaxbn.batch_norm(x, params, state, training=True, mask=mask, momentum=0.5)
    mean, var = reference.batch_stats(x)
    np.testing.assert_allclose(new["mean"], [0.5 * mean[0], 0.0, 0.5 * mean[2]], rtol=1e-6)
    np.testing.assert_allclose(new["var"], [0.5 + 0.5 * var[0], 1.0, 0.5 + 0.5 * var[2]], rtol=1e-6)


def test_masked_statistics_use_valid_examples_only(rng):
    """Masked examples do not enter the statistics but are still normalized."""
    x = _batches(rng, 1, shape=(10, 4))[0]
    mask = (np.arange(10) < 7)[:, None]
    params, state = jaxbn.batch_norm_init(4)
    y, new = jaxbn.batch_norm(x, params, state, training=True, mask=mask, momentum=0.0)
    mean, var = reference.batch_stats(x[:7])
    np.testing.assert_allclose(new["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(new["var"], var, rtol=1e-5)
    np.testing.assert_allclose(y, reference.normalize(x, mean, var), atol=2e-5)


def test_large_offset_first_step_and_steady_state(rng):
    """Offset 1e5 (float32): output error <= 1e-4 at step 1 and after 50 steps."""
    params, state = jaxbn.batch_norm_init(8)
    step = jax.jit(functools.partial(jaxbn.batch_norm, training=True))
    for i in range(50):
        x = (rng.normal(size=(16, 4, 4, 8)) + 1e5).astype(np.float32)
        y, state = step(x, params, state)
        if i in (0, 49):
            mean, var = reference.batch_stats(x)
            assert (
                np.abs(np.asarray(y, np.float64) - reference.normalize(x, mean, var)).max() <= 1e-4
            )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_input_keeps_float32_state(dtype, rng):
    """Half-precision inputs: statistics in float32, state stays float32, output follows dtype."""
    x = jnp.asarray(_batches(rng, 1, shape=(16, 4), offset=100.0)[0], dtype)
    params, state = jaxbn.batch_norm_init(4)
    y, new = jaxbn.batch_norm(x, params, state, training=True, dtype=dtype, momentum=0.0)
    assert y.dtype == dtype and new["mean"].dtype == new["var"].dtype == jnp.float32
    mean, var = reference.batch_stats(np.asarray(x.astype(jnp.float32)))
    np.testing.assert_allclose(new["var"], var, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(y, np.float32), reference.normalize(x.astype(jnp.float32), mean, var), atol=2e-2
    )


def _loss(x, params, state, **kw):
    y, new_state = jaxbn.batch_norm(x, params, state, training=True, **kw)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.shape[-1])), new_state


@pytest.mark.slow  # ~25 s: eager vmap, remat and loops
def test_transforms_jit_grad_vmap_scan_remat_eval_shape(rng):
    """batch_norm composes with jit, grad, vmap, scan, remat and eval_shape."""
    batches = jnp.asarray(np.stack(_batches(rng, 3, shape=(8, 3))))
    params, state = jaxbn.batch_norm_init(3)

    def scan_step(state, x):
        y, state = jaxbn.batch_norm(x, params, state, training=True)
        return state, y

    final, ys = jax.jit(lambda s, b: jax.lax.scan(scan_step, s, b))(state, batches)
    loop_state = state
    for x in batches:
        _, loop_state = jaxbn.batch_norm(x, params, loop_state, training=True)
    np.testing.assert_allclose(final["mean"], loop_state["mean"], rtol=1e-6)

    grads = jax.jit(jax.grad(_loss, argnums=(0, 1), has_aux=True))(batches[0], params, state)[0]
    remat_grads = jax.grad(jax.checkpoint(lambda x, p: _loss(x, p, state)[0]), argnums=(0, 1))(
        batches[0], params
    )
    jax.tree_util.tree_map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), grads, remat_grads
    )

    per_example = jax.vmap(lambda x: jaxbn.batch_norm(x, params, state, training=True)[0])(batches)
    np.testing.assert_allclose(
        per_example[1],
        jaxbn.batch_norm(batches[1], params, state, training=True)[0],
        rtol=1e-6,
        atol=1e-6,
    )
    synced = jax.vmap(
        lambda x: jaxbn.batch_norm(x, params, state, training=True, axis_name="b")[0], axis_name="b"
    )(batches)
    np.testing.assert_allclose(
        synced.reshape(24, 3),
        jaxbn.batch_norm(batches.reshape(24, 3), params, state, training=True)[0],
        rtol=1e-5,
        atol=1e-5,
    )

    shapes = jax.eval_shape(lambda x: jaxbn.batch_norm(x, params, state, training=True), batches[0])
    assert shapes[0].shape == (8, 3) and shapes[1]["var"].shape == (3,)


@pytest.mark.slow  # ~10 s: check_grads of orders 1 and 2
def test_gradients_pass_numerical_check_orders_1_and_2():
    """jax.test_util.check_grads (reverse mode, orders 1 and 2) in float64, masked too.

    Training mode is a custom VJP (see jaxbn/_train_step.py): reverse mode only.
    """
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(7).normal(size=(6, 3)) + 10.0, jnp.float64)
        params = {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0])}
        state = {"mean": jnp.zeros(3, jnp.float64), "var": jnp.ones(3, jnp.float64)}
        mask = jnp.array([[1], [1], [0], [1], [1], [1]], bool)
        for kw in ({}, {"mask": mask}):
            f = lambda x, scale, bias: _loss(x, {"scale": scale, "bias": bias}, state, **kw)[0]
            check_grads(
                jax.jit(f), (x, params["scale"], params["bias"]), order=2, modes=("rev",), eps=1e-4
            )


def test_init_rejects_bad_feature_counts():
    """batch_norm_init needs positive integer feature counts."""
    for bad in (0, -3, 2.5, (), (3, 0), True):
        with pytest.raises((ValueError, TypeError), match="num_features"):
            jaxbn.batch_norm_init(bad)
    params, state = jaxbn.batch_norm_init((2, 3), use_bias=False)
    assert set(params) == {"scale"} and state["mean"].shape == (2, 3)


def _call(x=None, params=None, state=None, **kw):
    x = jnp.ones((4, 3), jnp.float32) if x is None else x
    default_params, default_state = jaxbn.batch_norm_init(3)
    kw.setdefault("training", True)
    return jaxbn.batch_norm(
        x,
        default_params if params is None else params,
        default_state if state is None else state,
        **kw,
    )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(momentum=-0.1), ValueError, r"momentum must lie in \[0, 1\], got -0.1"),
        (dict(momentum=1.5), ValueError, r"momentum must lie in \[0, 1\], got 1.5"),
        (dict(momentum=float("nan")), ValueError, "momentum must lie"),
        (dict(momentum="0.9"), TypeError, "momentum must be a real number"),
        (dict(epsilon=0.0), ValueError, "epsilon must be a finite number > 0"),
        (dict(epsilon=-1e-5), ValueError, "epsilon must be a finite number > 0"),
        (dict(axis=2), ValueError, r"axis=2 is out of range for an input with 2 dimensions"),
        (
            dict(axis=0),
            ValueError,
            r"params\['scale'\] has shape \(3,\), but the input has feature shape \(4,\)",
        ),
        (dict(params={"gamma": jnp.ones(3)}), ValueError, r"unknown keys \['gamma'\]"),
        (dict(state={"mean": jnp.zeros(3)}), ValueError, r"missing \['var'\]"),
        (
            dict(state={"mean": jnp.zeros(4), "var": jnp.ones(4)}),
            ValueError,
            r"state\['mean'\] has shape \(4,\)",
        ),
        (dict(x=jnp.ones((4, 3), jnp.int32)), TypeError, "x must have a floating dtype"),
        (dict(x=jnp.ones((4, 3), bool)), TypeError, "x must have a floating dtype"),
        (
            dict(mask=jnp.ones((3, 3), bool)),
            ValueError,
            r"mask of shape \(3, 3\) does not broadcast",
        ),
        (dict(axis_name="data"), ValueError, "not bound"),
        (dict(training=1), TypeError, "training must be a Python bool"),
        (dict(dtype=jnp.int8), TypeError, "dtype must be a floating dtype"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, error, message):
    """Every bad argument raises at trace time, naming the argument, the value and the fix."""
    with pytest.raises(error, match=message):
        jax.jit(lambda: _call(**kwargs)).lower()


@pytest.mark.slow  # ~10 s of eager calls
def test_single_example_is_fine_in_inference_and_with_a_mask():
    """One element per feature is only refused when it is known to reach the statistics."""
    x = jnp.ones((1, 3))
    _call(x=x, training=False)
    _call(x=x, mask=jnp.ones((1, 1), bool))
    synced = jax.vmap(lambda x: _call(x=x, axis_name="d")[0], axis_name="d")(jnp.ones((2, 1, 3)))
    assert synced.shape == (2, 1, 3)  # two devices with one example each: two values per feature


def test_traced_momentum_is_accepted(rng):
    """A momentum computed inside jit (a schedule) cannot be checked and is used as given."""
    x = jnp.asarray(_batches(rng, 1, shape=(8, 3))[0])
    params, state = jaxbn.batch_norm_init(3)
    new = jax.jit(lambda m: jaxbn.batch_norm(x, params, state, training=True, momentum=m)[1])(0.0)
    np.testing.assert_allclose(new["mean"], reference.batch_stats(x)[0], rtol=1e-6)


@pytest.mark.slow  # ~6 s of op-by-op execution; test_properties.py's eager search is slow too
class EagerEqualsJitTest(chex.TestCase):
    """The public functions give the same values eagerly and under jit (chex.variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_every_normalizer(self):
        x = jnp.asarray(np.random.default_rng(11).normal(size=(6, 4)) * 3 + 7, jnp.float32)
        params, state = jaxbn.batch_norm_init(4)
        calls = {
            "batch_norm": lambda x: jaxbn.batch_norm(x, params, state, training=True),
            "batch_renorm": lambda x: jaxbn.batch_renorm(
                x, params, state, training=True, r_max=2.0, d_max=1.0
            ),
            "layer_norm": jaxbn.layer_norm,
            "rms_norm": jaxbn.rms_norm,
            "group_norm": lambda x: jaxbn.group_norm(x, num_groups=2),
            "moments": lambda x: jaxbn.moments(x, 0),
        }
        for name, call in calls.items():
            chex.assert_trees_all_close(
                self.variant(call)(x), call(x), rtol=1e-6, atol=1e-6, custom_message=name
            )
