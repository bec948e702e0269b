"""Complex inputs (complex64/complex128): complex mean, real variance E|x - mu|^2.

Compared with a complex128 NumPy reference, with flax.linen (whose ``_abs_sq``
gives the same convention), with JAX's autodiff of a plain ``jnp`` reference
for gradients, and across devices. haiku's BatchNorm gets the variance of
complex input wrong (``E[x^2] - E[x]^2``, a complex number); a test shows the
difference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxbn
import jaxbn.linen
from jaxbn import stats
from tests import hlo
from tests.conftest import structural, tiered

EPSILON = 1e-5
MOMENTUM = 0.9
LAYOUTS = {"NHWC": (-1, (8, 3, 3, 4)), "NCHW": (1, (8, 4, 3, 3))}


def _complex(shape, seed=0, offset=3 - 2j, dtype=np.complex64):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=shape) * 1.5 + 1j * rng.normal(size=shape) * 0.7 + offset
    return z.astype(dtype)


def _reduce_axes(ndim, axis):
    return tuple(i for i in range(ndim) if i != axis % ndim)


def reference_stats(z, axes, mask=None):
    """Complex128 mean and real E|z - mean|^2 over ``axes`` (valid elements only), keepdims."""
    z = np.asarray(z, np.complex128)
    valid = np.ones(z.shape, bool) if mask is None else np.broadcast_to(mask, z.shape)
    count = valid.sum(axes, keepdims=True)
    mean = np.where(valid, z, 0).sum(axes, keepdims=True) / count
    var = np.where(valid, np.abs(z - mean) ** 2, 0).sum(axes, keepdims=True) / count
    return mean, var


def reference_norm(
    z, axes, scale=None, bias=None, feature_shape=None, mask=None, center=True, epsilon=EPSILON
):
    z = np.asarray(z, np.complex128)
    if center:
        mean, var = reference_stats(z, axes, mask)
    else:
        valid = np.ones(z.shape, bool) if mask is None else np.broadcast_to(mask, z.shape)
        mean = 0
        var = np.where(valid, np.abs(z) ** 2, 0).sum(axes, keepdims=True) / valid.sum(
            axes, keepdims=True
        )
    y = (z - mean) / np.sqrt(var + epsilon)
    if scale is not None:
        y = y * np.reshape(scale, feature_shape)
    if bias is not None:
        y = y + np.reshape(bias, feature_shape)
    return y


def _feature_shape(shape, axis):
    return tuple(n if i == axis % len(shape) else 1 for i, n in enumerate(shape))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "dtype", [np.complex64, pytest.param(np.complex128, marks=pytest.mark.slow)]
)  # x64: slow tier
def test_moments_match_complex128_reference(dtype, masked):
    """Mean complex, variance real and exact at a large complex offset, count real."""
    z = _complex((64, 5), offset=1e4 - 3e3j, dtype=dtype)
    mask = np.random.default_rng(2).uniform(size=z.shape) < 0.6 if masked else None
    if (
        masked
    ):  # a feature whose first element is masked out: its sums cannot go around that element
        mask[0, 0] = False
    with jax.enable_x64(dtype == np.complex128):
        # One path, whatever `shift` is (0 by default, or the offset itself): two passes around an
        # element of the batch, at a complex offset 1e4 standard deviations away.
        for shift in (None, np.full(5, 1e4 - 3e3j, dtype)):
            m = stats.moments(jnp.asarray(z), 0, mask=mask, shift=shift)
            real = jnp.float64 if dtype == np.complex128 else jnp.float32
            assert m.mean.dtype == dtype and m.var.dtype == real and m.count.dtype == real
            mean, var = reference_stats(z, (0,), mask)
            tol = 1e-6 if dtype == np.complex64 else 1e-12
            np.testing.assert_allclose(m.mean, mean[0], rtol=tol)
            # float32 at |offset| ~ 1e4: the data themselves carry rounding of 1e4 * 6e-8
            np.testing.assert_allclose(m.var, var[0], rtol=1e-5 if dtype == np.complex64 else 1e-12)
            np.testing.assert_allclose(
                m.count, (~np.isnan(z.real) if mask is None else mask).sum(0)
            )


@pytest.mark.slow  # ~3 s; test_synchronized_complex_batch_norm_under_pmap_equals_global_batch stays
def test_moments_across_devices_equal_global():
    """With an axis name the complex sums cross devices in the one collective and give global statistics."""
    z = _complex((4, 6, 3), seed=3)
    per_device = jax.vmap(lambda a: stats.moments(a, 0, axis_name="i"), axis_name="i")(
        jnp.asarray(z)
    )
    mean, var = reference_stats(z.reshape(24, 3), (0,))
    np.testing.assert_allclose(per_device.mean, np.broadcast_to(mean, (4, 3)), rtol=1e-6)
    np.testing.assert_allclose(per_device.var, np.broadcast_to(var, (4, 3)), rtol=1e-5)
    if (
        jax.device_count() >= 4
    ):  # real and imaginary parts travel with count and variance: one all-gather
        for mask in (None, np.ones((4, 6, 1), bool)):
            step = jax.pmap(
                lambda a, m: stats.moments(a, 0, axis_name="i", mask=m),
                axis_name="i",
                in_axes=(0, None if mask is None else 0),
            )
            text = hlo.compiled_text(step, jnp.asarray(z), mask)
            assert hlo.count_collectives(text, "all-gather") == 1
            assert hlo.count_collectives(text, "all-reduce") == 0
            assert (
                " while(" not in text and " conditional(" not in text
            )  # nothing decided from the data
            result = step(jnp.asarray(z), mask)
            np.testing.assert_allclose(result.var, np.broadcast_to(var, (4, 3)), rtol=1e-5)


@pytest.mark.parametrize(
    "layout, masked", tiered(sorted(LAYOUTS), (False, True), {("NCHW", False), ("NHWC", True)})
)
def test_batch_norm_training_matches_reference_and_flax(layout, masked):
    """Two training steps: outputs and running statistics equal the reference and flax.linen.BatchNorm."""
    axis, shape = LAYOUTS[layout]
    channels = shape[axis]
    rng = np.random.default_rng(1)
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=channels), jnp.float32),
    }
    mask = rng.uniform(size=shape) < 0.7 if masked else None
    state = jaxbn.batch_norm_init(channels, dtype=jnp.complex64)[1]
    module = nn.BatchNorm(axis=axis, momentum=MOMENTUM, epsilon=EPSILON)
    flax_state = module.init(jax.random.key(0), jnp.zeros(shape, jnp.complex64), False)[
        "batch_stats"
    ]
    expected_mean, expected_var = np.zeros(channels, complex), np.ones(channels)
    step = jax.jit(
        functools.partial(
            jaxbn.batch_norm,
            training=True,
            axis=axis,
            momentum=MOMENTUM,
            epsilon=EPSILON,
            mask=mask,
        )
    )
    for seed in range(2):
        z = _complex(shape, seed=seed)
        y, state = step(jnp.asarray(z), params, state)
        axes = _reduce_axes(len(shape), axis)
        fs = _feature_shape(shape, axis)
        np.testing.assert_allclose(
            y, reference_norm(z, axes, params["scale"], params["bias"], fs, mask), atol=2e-5
        )
        assert y.dtype == jnp.complex64
        mean, var = reference_stats(z, axes, mask)
        expected_mean = MOMENTUM * expected_mean + (1 - MOMENTUM) * mean.ravel()
        expected_var = MOMENTUM * expected_var + (1 - MOMENTUM) * var.ravel()
        assert state["mean"].dtype == jnp.complex64 and state["var"].dtype == jnp.float32
        np.testing.assert_allclose(state["mean"], expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["var"], expected_var, rtol=1e-5)
        y_flax, updates = module.apply(
            {"params": params, "batch_stats": flax_state},
            jnp.asarray(z),
            False,
            mask=mask,
            mutable=["batch_stats"],
        )
        flax_state = updates["batch_stats"]
        np.testing.assert_allclose(y, y_flax, atol=2e-5)
        np.testing.assert_allclose(state["mean"], flax_state["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["var"], flax_state["var"], rtol=1e-5)
    # inference with the complex running mean, as flax
    y, same = jaxbn.batch_norm(
        jnp.asarray(z), params, state, training=False, axis=axis, epsilon=EPSILON
    )
    assert same is state
    y_flax = module.apply(
        {"params": params, "batch_stats": flax_state}, jnp.asarray(z), use_running_average=True
    )
    np.testing.assert_allclose(y, y_flax, atol=2e-5)


def test_non_finite_complex_batch_keeps_state():
    """A NaN imaginary part leaves the (complex) running statistics unchanged."""
    z = _complex((8, 3))
    z[2, 1] = complex(1.0, np.nan)
    params, state = jaxbn.batch_norm_init(3, dtype=jnp.complex64)
    state = {"mean": state["mean"].astype(jnp.complex64), "var": state["var"]}
    _, new_state = jaxbn.batch_norm(jnp.asarray(z), params, state, training=True)
    for key in state:  # exact: the update is skipped, the old value selected unchanged
        np.testing.assert_array_equal(new_state[key], state[key])


def test_linen_batch_norm_complex_variables_and_flax_parity():
    """jaxbn.linen.BatchNorm creates a complex running mean (flax's turns complex at its first update)."""
    z = jnp.asarray(_complex((8, 5)))
    ours = jaxbn.linen.BatchNorm(use_running_average=False, momentum=MOMENTUM)
    theirs = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM)
    variables = ours.init(jax.random.key(0), z)
    flax_variables = theirs.init(jax.random.key(0), z)
    assert (
        variables["batch_stats"]["mean"].dtype == jnp.complex64
    )  # flax: float32 until the first update
    assert (
        variables["batch_stats"]["var"].dtype
        == flax_variables["batch_stats"]["var"].dtype
        == jnp.float32
    )
    y, updates = ours.apply(variables, z, mutable=["batch_stats"])
    y_flax, flax_updates = theirs.apply(flax_variables, z, mutable=["batch_stats"])
    assert (
        flax_updates["batch_stats"]["mean"].dtype
        == updates["batch_stats"]["mean"].dtype
        == jnp.complex64
    )
    np.testing.assert_allclose(y, y_flax, atol=2e-5)
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
        updates["batch_stats"],
        flax_updates["batch_stats"],
    )


MODULES = {
    "LayerNorm": (jaxbn.linen.LayerNorm, nn.LayerNorm, {}, (-1,), True),
    "RMSNorm": (jaxbn.linen.RMSNorm, nn.RMSNorm, {}, (-1,), False),
    "GroupNorm": (jaxbn.linen.GroupNorm, nn.GroupNorm, {"num_groups": 2}, None, True),
    "InstanceNorm": (jaxbn.linen.InstanceNorm, nn.InstanceNorm, {}, (1, 2), True),
}


@pytest.mark.parametrize(
    "name",
    [
        n if n in ("LayerNorm", "RMSNorm") else pytest.param(n, marks=pytest.mark.slow)
        for n in sorted(MODULES)
    ],
)  # GroupNorm, InstanceNorm: ~3 s each
def test_per_example_norms_match_reference_and_flax(name):
    """Layer/RMS/group/instance norm of complex input: reference and flax.linen agree with jaxbn."""
    ours, theirs, kwargs, axes, center = MODULES[name]
    z = jnp.asarray(_complex((2, 3, 3, 4), seed=4))
    variables = theirs(**kwargs).init(jax.random.key(0), z)
    rng = np.random.default_rng(5)
    variables = jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), variables
    )
    y = ours(**kwargs).apply(variables, z)
    y_flax = theirs(**kwargs).apply(variables, z)
    assert y.dtype == y_flax.dtype == jnp.complex64
    np.testing.assert_allclose(y, y_flax, atol=3e-5)
    p = variables["params"]
    fs = (1, 1, 1, 4)
    if name == "GroupNorm":
        grouped = np.asarray(z).reshape(2, 3, 3, 2, 2)
        expected = reference_norm(grouped, (1, 2, 4), epsilon=1e-6).reshape(z.shape)
        expected = expected * np.reshape(p["scale"], fs) + np.reshape(p["bias"], fs)
    else:
        expected = reference_norm(
            z, axes, p["scale"], p.get("bias"), fs, center=center, epsilon=1e-6
        )
    np.testing.assert_allclose(y, expected, atol=3e-5)


def _jnp_batch_norm(z, scale, bias, axis, mask=None):
    """Complex batch norm in plain jnp (two-pass statistics), for autodiff."""
    axes = _reduce_axes(z.ndim, axis)
    valid = jnp.ones(z.shape, bool) if mask is None else jnp.broadcast_to(mask, z.shape)
    count = valid.sum(axes, keepdims=True)
    mean = jnp.where(valid, z, 0).sum(axes, keepdims=True) / count
    var = jnp.where(valid, jnp.abs(z - mean) ** 2, 0).sum(axes, keepdims=True) / count
    fs = _feature_shape(z.shape, axis)
    return (z - mean) / jnp.sqrt(var + EPSILON) * scale.reshape(fs) + bias.reshape(fs)


@pytest.mark.parametrize("layout, masked", tiered(sorted(LAYOUTS), (False, True), {("NHWC", True)}))
def test_batch_norm_gradients_match_autodiff_reference(layout, masked):
    """jax.grad of a real loss sum(w |y|^2) w.r.t. complex x and real params, complex128 vs a jnp reference.

    JAX's convention for a real loss of complex x is grad = dL/dRe(x) - i dL/dIm(x)
    (the conjugate of the steepest-ascent direction); a finite difference pins it.
    """
    axis, shape = LAYOUTS[layout]
    rng = np.random.default_rng(6)
    mask = rng.uniform(size=shape) < 0.7 if masked else None
    with jax.enable_x64(True):
        z = jnp.asarray(_complex(shape, seed=7, dtype=np.complex128))
        w = jnp.asarray(rng.uniform(0.5, 1.5, shape))
        scale, bias = (
            jnp.asarray(rng.uniform(0.5, 1.5, shape[axis])),
            jnp.asarray(rng.normal(size=shape[axis])),
        )
        state = {"mean": jnp.zeros(shape[axis], jnp.complex128), "var": jnp.ones(shape[axis])}

        def loss(z, scale, bias):
            y, _ = jaxbn.batch_norm(
                z,
                {"scale": scale, "bias": bias},
                state,
                training=True,
                axis=axis,
                epsilon=EPSILON,
                mask=mask,
            )
            return jnp.sum(w * jnp.abs(y) ** 2)

        def reference_loss(z, scale, bias):
            return jnp.sum(w * jnp.abs(_jnp_batch_norm(z, scale, bias, axis, mask)) ** 2)

        loss = jax.jit(loss)  # one compilation each, not one per operation
        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(z, scale, bias)
        want = jax.jit(jax.grad(reference_loss, argnums=(0, 1, 2)))(z, scale, bias)
        for g, r in zip(got, want):
            assert g.dtype == r.dtype
            np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-9)
        h = 1e-4
        e = jnp.zeros(shape, jnp.complex128).at[(0,) * len(shape)].set(1)
        d_re = (loss(z + h * e, scale, bias) - loss(z - h * e, scale, bias)) / (2 * h)
        d_im = (loss(z + 1j * h * e, scale, bias) - loss(z - 1j * h * e, scale, bias)) / (2 * h)
        np.testing.assert_allclose(
            got[0][(0,) * len(shape)], d_re - 1j * d_im, rtol=1e-5, atol=1e-8
        )


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_per_example_gradients_match_autodiff_reference(name):
    """Gradients of layer/RMS norm of complex input equal autodiff of the jnp formula (complex128)."""
    with jax.enable_x64(True):
        z = jnp.asarray(_complex((3, 6), seed=8, dtype=np.complex128))
        scale = jnp.asarray(np.random.default_rng(9).uniform(0.5, 1.5, 6))
        fn = getattr(jaxbn, name)

        def loss(z, scale):
            return jnp.sum(jnp.abs(fn(z, {"scale": scale}, epsilon=1e-6) - 1j) ** 2)

        def reference(z, scale):
            if name == "layer_norm":
                mean = z.mean(-1, keepdims=True)
                y = (z - mean) / jnp.sqrt((jnp.abs(z - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
            else:
                y = z / jnp.sqrt((jnp.abs(z) ** 2).mean(-1, keepdims=True) + 1e-6)
            return jnp.sum(jnp.abs(y * scale - 1j) ** 2)

        for g, r in zip(
            jax.jit(jax.grad(loss, (0, 1)))(z, scale),
            jax.jit(jax.grad(reference, (0, 1)))(z, scale),
        ):
            np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-10)


def test_normalize_complex():
    """normalize with a complex mean and real variance; a real dtype for complex input is refused."""
    z = _complex((6, 3))
    mean, var = reference_stats(z, (0,))
    y = jaxbn.normalize(
        jnp.asarray(z), jnp.asarray(mean[0], jnp.complex64), jnp.asarray(var[0], jnp.float32)
    )
    np.testing.assert_allclose(y, reference_norm(z, (0,)), atol=2e-5)
    with pytest.raises(
        TypeError, match=r"dtype=float32 is real, but the input is complex64.*imaginary"
    ):
        jaxbn.normalize(jnp.asarray(z), mean[0], var[0], dtype=jnp.float32)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: jaxbn.batch_norm(
            x, None, jaxbn.batch_norm_init(3, dtype=jnp.complex64)[1], training=True
        ),
        lambda x: jaxbn.layer_norm(x),
        lambda x: jaxbn.rms_norm(x),
        lambda x: stats.moments(x, 0),
    ],
    ids=["batch_norm", "layer_norm", "rms_norm", "moments"],
)
def test_integer_input_still_a_type_error(call):
    """Complex is accepted; integers are refused, naming the dtype and the fix."""
    with pytest.raises(TypeError, match=r"floating dtype.*complex.*got int32.*astype"):
        call(jnp.ones((4, 3), jnp.int32))


def test_complex_dtype_for_real_input_is_refused():
    """A complex output dtype for real input is an error (nothing would fill the imaginary part)."""
    with pytest.raises(TypeError, match=r"dtype must be a floating dtype or None, got complex64"):
        jaxbn.layer_norm(jnp.ones((2, 3)), dtype=jnp.complex64)
    y = jaxbn.layer_norm(
        jnp.asarray(_complex((2, 3))), dtype=jnp.complex128 if jax.config.x64_enabled else None
    )
    assert y.dtype == jnp.complex64


@pytest.mark.slow  # ~3 s; test_nnx.py's complex input test stays
def test_ghost_batches_of_complex_input():
    """ghost_batch_size with complex input: each group as its own batch; state from the groups' average."""
    z = jnp.asarray(_complex((8, 2, 3), seed=11))
    params, state = jaxbn.batch_norm_init(3, dtype=jnp.complex64)
    y, new_state = jaxbn.batch_norm(
        z, params, state, training=True, ghost_batch_size=4, momentum=MOMENTUM
    )
    groups = [
        jaxbn.batch_norm(z[i : i + 4], params, state, training=True, momentum=0.0) for i in (0, 4)
    ]
    np.testing.assert_allclose(y, jnp.concatenate([g[0] for g in groups]), atol=1e-6)
    for key in ("mean", "var"):
        average = (groups[0][1][key] + groups[1][1][key]) / 2
        np.testing.assert_allclose(
            new_state[key], MOMENTUM * state[key] + (1 - MOMENTUM) * average, rtol=1e-6, atol=1e-7
        )


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (forced CPU) devices")
def test_synchronized_complex_batch_norm_under_pmap_equals_global_batch():
    """pmap with axis_name: outputs, state and dx (autodiff through the psum) equal the global batch's."""
    z = jnp.asarray(_complex((16, 3, 4), seed=12))
    w = jnp.asarray(np.random.default_rng(13).uniform(0.5, 1.5, z.shape), jnp.float32)
    params, state = jaxbn.batch_norm_init(4, dtype=jnp.complex64)

    def step(z, w, axis_name):
        def loss(z):
            y, new_state = jaxbn.batch_norm(z, params, state, training=True, axis_name=axis_name)
            return jnp.sum(w * jnp.abs(y) ** 2), (y, new_state)

        (_, (y, new_state)), dz = jax.value_and_grad(loss, has_aux=True)(z)
        return y, new_state, dz

    y1, state1, dz1 = jax.jit(functools.partial(step, axis_name=None))(z, w)
    y, new_state, dz = jax.pmap(functools.partial(step, axis_name="i"), axis_name="i")(
        z.reshape(4, 4, 3, 4), w.reshape(4, 4, 3, 4)
    )
    np.testing.assert_allclose(y.reshape(z.shape), y1, atol=2e-5)
    np.testing.assert_allclose(dz.reshape(z.shape), dz1, atol=2e-5)
    for key in state1:
        np.testing.assert_allclose(
            new_state[key], np.broadcast_to(state1[key], new_state[key].shape), rtol=1e-5, atol=1e-6
        )


def test_batch_renorm_training_refuses_complex_with_a_clear_message():
    """Where complex input is not supported, the error says so (and where it is)."""
    params, state = jaxbn.batch_norm_init(3)
    with pytest.raises(
        TypeError, match=r"got complex64: this function does not support complex input.*batch_norm"
    ):
        jaxbn.batch_renorm(
            jnp.asarray(_complex((4, 3))), params, state, training=True, r_max=3.0, d_max=5.0
        )


@structural
def test_complex_batch_norm_sums_pairs_of_reals():
    """Complex batch norm (features on the last axis) reads x as pairs of reals, written once,
    each pass a real sum (XLA:CPU's library reductions take no complex values: each pass wrote the
    parts, 13S forward): a training forward moves 6S (flax.linen's 7S), forward+backward 10S."""
    shape = (16, 8, 8, 32)
    x = jnp.zeros(shape, jnp.complex64)
    params, state = jaxbn.batch_norm_init(shape[-1], dtype=jnp.complex64)
    forward = lambda x: jaxbn.batch_norm(x, params, state, training=True)
    backward = lambda x, dy: jax.vjp(lambda x: forward(x)[0], x)[1](dy)
    size = x.size * x.dtype.itemsize
    for program, args, moved in ((forward, (x,), 6), (backward, (x, x), 10)):
        traffic, _ = hlo.memory_traffic(hlo.compiled_text(jax.jit(program), *args))
        assert traffic / size <= moved + 0.05, (program, traffic / size)
