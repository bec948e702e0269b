"""Batch renormalization (Ioffe, 2017): jaxbn.batch_renorm, renorm_clipping, linen.BatchRenorm.

Every result is compared with a float64 NumPy implementation of the paper's
equations (below); ``r_max=1, d_max=0`` must be batch norm (to rounding: the two
are different programs, which XLA may fuse and round differently), and the
multi-device runs must equal the single-device run on the global batch with
batch norm's collectives: one all-gather forward, one all-reduce backward.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jaxbn
import jaxbn.linen
from tests import hlo, reference
from tests.conftest import N_DEVICES, needs_devices, structural

EPSILON = 1e-5
MOMENTUM = 0.9
R_MAX, D_MAX = 3.0, 5.0
# (feature axis, shape) with 4 channels, 8 examples (one per device below).
LAYOUTS = {"NHWC": (-1, (8, 3, 3, 4)), "NCHW": (1, (8, 4, 3, 3))}
# Per channel: batch std and mean against running std ~1 and mean ~0, so that
# r = (1.5, >3 clipped, <1/3 clipped, 0.8) and d = (2, >5 clipped, <-5 clipped, -1).
BATCH_STD = np.array([1.5, 5.0, 0.2, 0.8])
BATCH_MEAN = np.array([2.0, 8.0, -8.0, -1.0])


def _shape_for(axis, ndim):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return shape


def renorm_reference(x, scale, bias, state, r_max, d_max, *, axis=-1, mask=None, momentum=MOMENTUM):
    """The paper's training step in float64: ``(y, r, d, new_state)``.

    ``mu_B, var_B`` over the valid elements, ``sigma_B = sqrt(var_B + eps)``,
    ``sigma = sqrt(var + eps)`` of the state before the update,
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``,
    ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``,
    ``y = scale * ((x - mu_B) / sigma_B * r + d) + bias`` for every element,
    and the exponential average of ``mu_B, var_B`` into the state.
    """
    x = np.asarray(x, np.float64)
    full_mask = None if mask is None else np.broadcast_to(mask, x.shape)
    mu_b, var_b = reference.batch_stats(x, axis, full_mask)
    mean, var = (np.asarray(state[k], np.float64) for k in ("mean", "var"))
    sigma = np.sqrt(var + EPSILON)
    r = np.clip(np.sqrt(var_b + EPSILON) / sigma, 1 / r_max, r_max)
    d = np.clip((mu_b - mean) / sigma, -d_max, d_max)
    shape = _shape_for(axis, x.ndim)
    x_hat = reference.normalize(x, mu_b, var_b, axis=axis, epsilon=EPSILON)
    y = np.reshape(np.asarray(scale, np.float64), shape) * (
        x_hat * r.reshape(shape) + d.reshape(shape)
    )
    y = y + np.reshape(np.asarray(bias, np.float64), shape)
    new_state = {
        "mean": momentum * mean + (1 - momentum) * mu_b,
        "var": momentum * var + (1 - momentum) * var_b,
    }
    return y, r, d, new_state


def renorm_reference_grads(x, w, scale, r, d, *, axis=-1, mask=None):
    """Float64 gradients of ``sum(w * y)`` w.r.t. x, scale, bias, with r and d constants.

    With ``g = w * scale * r``, ``n`` the valid count and the sums over all
    elements: ``dx = (g - valid * (sum(g) + x_hat sum(g x_hat)) / n) / sigma_B``,
    ``dscale = r sum(w x_hat) + d sum(w)``, ``dbias = sum(w)``.
    """
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    axis = axis % x.ndim
    reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = _shape_for(axis, x.ndim)
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
    mu_b, var_b = reference.batch_stats(x, axis, None if mask is None else valid)
    inv_std = 1 / np.sqrt(var_b + EPSILON).reshape(shape)
    x_hat = (x - mu_b.reshape(shape)) * inv_std
    n = valid.sum(reduce_axes).reshape(shape)
    g = w * np.reshape(np.asarray(scale, np.float64), shape) * r.reshape(shape)
    correction = (
        g.sum(reduce_axes).reshape(shape) + x_hat * (g * x_hat).sum(reduce_axes).reshape(shape)
    ) / n
    dx = inv_std * (g - np.where(valid, correction, 0))
    return dx, r * (w * x_hat).sum(reduce_axes) + d * w.sum(reduce_axes), w.sum(reduce_axes)


def _data(layout, dtype=np.float32, seed=0):
    """x with the per-channel batch statistics above, w, params and a state near (0, 1)."""
    axis, shape = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    z = rng.normal(size=shape)
    reduce_axes = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    z = (z - z.mean(reduce_axes, keepdims=True)) / z.std(reduce_axes, keepdims=True)
    channel = _shape_for(axis, len(shape))
    x = (z * BATCH_STD.reshape(channel) + BATCH_MEAN.reshape(channel)).astype(dtype)
    w = rng.normal(size=shape).astype(dtype)
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, 4), dtype),
        "bias": jnp.asarray(rng.normal(size=4), dtype),
    }
    state = {
        "mean": jnp.asarray(rng.normal(size=4) * 0.05, dtype),
        "var": jnp.asarray(rng.uniform(0.9, 1.1, 4), dtype),
    }
    return x, w, params, state


def _renorm_step(x, w, params, state, *, r_max=R_MAX, d_max=D_MAX, fn=jaxbn.batch_renorm, **kwargs):
    """``(y, new_state, dx, dparams)`` for the loss ``sum(w * y)``."""

    def loss(x, params):
        if fn is jaxbn.batch_norm:
            y, new_state = fn(x, params, state, training=True, **kwargs)
        else:
            y, new_state = fn(x, params, state, training=True, r_max=r_max, d_max=d_max, **kwargs)
        return jnp.sum(w * y), (y, new_state)

    (_, (y, new_state)), (dx, dparams) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        x, params
    )
    return y, new_state, dx, dparams


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(
    "dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)]
)  # x64: slow tier
def test_matches_float64_reference(dtype, layout, masked):
    """Outputs, state and gradients equal the paper's equations in float64, r and d clipped and not."""
    axis, shape = LAYOUTS[layout]
    with jax.enable_x64(dtype == "float64"):
        x, w, params, state = _data(layout, dtype)
        mask = np.random.default_rng(1).uniform(size=shape) < 0.7 if masked else None
        if masked:  # masked-out elements are normalized but do not count: make them junk
            x = np.where(mask, x, 1e3).astype(dtype)
        step = jax.jit(functools.partial(_renorm_step, axis=axis, momentum=MOMENTUM, mask=mask))
        y, new_state, dx, dparams = step(x, w, params, state)
        y_ref, r, d, state_ref = renorm_reference(
            x, params["scale"], params["bias"], state, R_MAX, D_MAX, axis=axis, mask=mask
        )
        dx_ref, dscale_ref, dbias_ref = renorm_reference_grads(
            x, w, params["scale"], r, d, axis=axis, mask=mask
        )

    # The data clips r above and below in channels 1 and 2 and leaves channels 0 and 3 free (the float64
    # reference's r and d; exact where clipped: np.clip returns the limit itself).
    assert r[1] == R_MAX and r[2] == 1 / R_MAX and d[1] == D_MAX and d[2] == -D_MAX
    assert (
        1 / R_MAX < r[0] < R_MAX
        and 1 / R_MAX < r[3] < R_MAX
        and abs(d[0]) < D_MAX
        and abs(d[3]) < D_MAX
    )
    assert np.all(np.abs(r - 1) > 0.1)  # and differs from batch norm everywhere
    assert y.dtype == dx.dtype == jnp.dtype(dtype)
    tol = {"float32": dict(rtol=1e-5, atol=1e-4), "float64": dict(rtol=1e-10, atol=1e-9)}[dtype]
    scale = np.abs(
        y_ref
    ).max()  # junk padding makes masked outputs large: compare relative to the largest
    np.testing.assert_allclose(y, y_ref, rtol=tol["rtol"], atol=tol["atol"] * scale)
    for key in ("mean", "var"):
        np.testing.assert_allclose(new_state[key], state_ref[key], **tol)
    np.testing.assert_allclose(
        dx, dx_ref, rtol=tol["rtol"], atol=tol["atol"] * np.abs(dx_ref).max()
    )
    np.testing.assert_allclose(dparams["scale"], dscale_ref, **tol)
    np.testing.assert_allclose(dparams["bias"], dbias_ref, **tol)


def test_unbounded_limits_give_the_inference_transform():
    """r_max = d_max = inf: y = scale (x - mu) / sigma + bias with the running statistics, state as batch norm."""
    x, _, params, state = _data("NHWC")
    y, new_state = jaxbn.batch_renorm(
        x, params, state, training=True, r_max=np.inf, d_max=float("inf")
    )
    y_ref = reference.normalize(
        x, state["mean"], state["var"], params["scale"], params["bias"], -1, EPSILON
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
    _, bn_state = jaxbn.batch_norm(x, params, state, training=True)
    for key in (
        "mean",
        "var",
    ):  # renorm and batch norm: other programs, the same statistics to rounding
        np.testing.assert_allclose(new_state[key], bn_state[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "dtype, kwargs",
    [
        ("float32", {}),
        ("float32", {"mask": True, "momentum": None, "unbiased_running_var": True}),
        ("float32", {"params": {}, "axis": 1}),
        ("bfloat16", {}),
        ("float32", {"dtype": jnp.bfloat16, "update_running_stats": False}),
    ],
)
def test_unit_limits_equal_batch_norm(dtype, kwargs):
    """r_max=1, d_max=0 is batch norm: outputs, state and gradients, to rounding.

    r = 1 and d = 0 exactly (clipped), so the arithmetic is batch norm's; but the two are different
    programs, which XLA may fuse (and so round) differently: not compared bit for bit.
    """
    kwargs = dict(kwargs)
    x, w, params, state = _data("NHWC", np.float32)
    x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    params = kwargs.pop("params", params)
    if kwargs.get("axis") == 1:
        x, w = jnp.moveaxis(x, -1, 1), jnp.moveaxis(w, -1, 1)
    if kwargs.get("mask"):
        kwargs["mask"] = np.random.default_rng(2).uniform(size=x.shape) < 0.6
    if "momentum" in kwargs and kwargs["momentum"] is None:
        state = {**state, "count": jnp.asarray(3.0, jnp.float32)}
    renorm = jax.jit(functools.partial(_renorm_step, r_max=1.0, d_max=0.0, **kwargs))(
        x, w, params, state
    )
    batch_norm = jax.jit(functools.partial(_renorm_step, fn=jaxbn.batch_norm, **kwargs))(
        x, w, params, state
    )
    for a, b in zip(jax.tree.leaves(renorm), jax.tree.leaves(batch_norm), strict=True):
        assert a.dtype == b.dtype
        _assert_equal_to_rounding(a, b)


def _assert_equal_to_rounding(a, b):
    """Two programs computing the same value: within a few ulps of the dtype, relative to the largest value."""
    tol = (
        1e-2 if jnp.dtype(a.dtype) == jnp.bfloat16 else 1e-6
    )  # bfloat16 holds ~3 digits, float32 ~7
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


@pytest.mark.slow  # ~10 s; test_nnx.py's renorm_ghost case stays
def test_ghost_batches_renormalize_each_group():
    """ghost_batch_size: each group is renormalized with its own r, d; the state is ghost batch norm's."""
    x, w, params, state = _data("NHWC")
    ghost = 4
    y, new_state, dx, dparams = jax.jit(functools.partial(_renorm_step, ghost_batch_size=ghost))(
        x, w, params, state
    )
    dparams_sum = {"scale": 0.0, "bias": 0.0}
    for start in range(0, x.shape[0], ghost):
        part = slice(start, start + ghost)
        y_k, _, dx_k, dp_k = jax.jit(_renorm_step)(x[part], w[part], params, state)
        y_ref, r, _, _ = renorm_reference(
            x[part], params["scale"], params["bias"], state, R_MAX, D_MAX
        )
        # clipping is active in the group (the reference's r; exact: np.clip returns the limit itself)
        assert np.any(r == R_MAX) or np.any(r == 1 / R_MAX)
        np.testing.assert_allclose(y[part], y_ref, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(y[part], y_k, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(dx[part], dx_k, rtol=1e-5, atol=1e-5)
        dparams_sum = {key: dparams_sum[key] + dp_k[key] for key in dparams_sum}
    for key in ("scale", "bias"):
        np.testing.assert_allclose(dparams[key], dparams_sum[key], rtol=1e-5, atol=1e-5)
    _, ghost_state = jaxbn.batch_norm(x, params, state, training=True, ghost_batch_size=ghost)
    for key in ("mean", "var"):
        np.testing.assert_allclose(new_state[key], ghost_state[key], rtol=1e-6, atol=1e-7)
    # r_max=1, d_max=0 is ghost batch norm (to an ulp: XLA may fuse the two programs differently)
    unit = jax.jit(functools.partial(_renorm_step, r_max=1.0, d_max=0.0, ghost_batch_size=ghost))(
        x, w, params, state
    )
    bn = jax.jit(functools.partial(_renorm_step, fn=jaxbn.batch_norm, ghost_batch_size=ghost))(
        x, w, params, state
    )
    for a, b in zip(jax.tree.leaves(unit), jax.tree.leaves(bn), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-7, atol=1e-7)


@pytest.mark.slow  # ~9 s: check_grads of orders 1 and 2
def test_gradients_pass_numerical_check_orders_1_and_2():
    """check_grads (reverse mode, orders 1 and 2) in float64, masked too, with r and d clipped.

    r and d are constants for autodiff (the paper's stop-gradient). Where they
    are clipped they are locally constant in fact, so finite differences of the
    loss see the same function; the data clips every channel with a margin.
    """
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = jnp.asarray(
            rng.normal(size=(6, 3)) * np.array([6.0, 0.1, 5.0]) + np.array([9.0, -9.0, 0.0])
        )
        w = jnp.asarray(rng.normal(size=(6, 3)))
        params = {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0])}
        state = {"mean": jnp.array([0.0, 0.0, 6.0]), "var": jnp.ones(3, jnp.float64)}
        mask = jnp.array([[1], [1], [0], [1], [1], [1]], bool)
        for kw in ({}, {"mask": mask}):
            y_ref, r, d, _ = renorm_reference(
                x, params["scale"], params["bias"], state, 2.0, 1.0, mask=kw.get("mask")
            )
            # every r and d clipped (the reference's; exact: np.clip returns the limits 2, 1/2, +-1 themselves)
            assert np.all((r == 2.0) | (r == 0.5)) and np.all(np.abs(d) == 1.0)

            def f(x, scale, bias, kw=kw):
                y, _ = jaxbn.batch_renorm(
                    x,
                    {"scale": scale, "bias": bias},
                    state,
                    training=True,
                    r_max=2.0,
                    d_max=1.0,
                    **kw,
                )
                return jnp.sum(w * jnp.sin(y))

            check_grads(
                jax.jit(f), (x, params["scale"], params["bias"]), order=2, modes=("rev",), eps=1e-4
            )


def test_schedule_values_and_traced_step():
    """renorm_clipping: plain batch norm through warm-up, linear relaxation, the paper's limits after."""
    expected = {
        0: (1.0, 0.0),
        4999: (1.0, 0.0),
        5000: (1.0, 0.0),
        15000: (1.0 + 2.0 * 10000 / 35000, 2.5),
        22500: (2.0, 4.375),
        25000: (1.0 + 2.0 * 20000 / 35000, 5.0),
        40000: (3.0, 5.0),
        10**7: (3.0, 5.0),
    }
    jitted = jax.jit(jaxbn.renorm_clipping)
    for step, (r_max, d_max) in expected.items():
        for fn in (jaxbn.renorm_clipping, jitted):
            got = fn(jnp.int32(step))
            assert got[0].dtype == got[1].dtype == jnp.float32
            np.testing.assert_allclose(got, (r_max, d_max), rtol=1e-6)
    np.testing.assert_allclose(jaxbn.renorm_clipping(22500), (2.0, 4.375), rtol=1e-6)  # Python int
    custom = jaxbn.renorm_clipping(
        jnp.array([0, 10, 11, 20]),
        r_max=2.0,
        d_max=1.0,
        warmup_steps=10,
        r_max_steps=20,
        d_max_steps=10,
    )
    np.testing.assert_allclose(custom, ([1.0, 1.0, 1.1, 2.0], [0.0, 0.0, 1.0, 1.0]), rtol=1e-6)

    # A step counter inside a jitted train step drives the limits.
    x, _, params, state = _data("NHWC")

    @jax.jit
    def train_step(step, state):
        r_max, d_max = jaxbn.renorm_clipping(step)
        return jaxbn.batch_renorm(x, params, state, training=True, r_max=r_max, d_max=d_max)

    during_warmup = train_step(jnp.int32(100), state)
    batch_norm = jax.jit(lambda state: jaxbn.batch_norm(x, params, state, training=True))(state)
    for a, b in zip(jax.tree.leaves(during_warmup), jax.tree.leaves(batch_norm), strict=True):
        _assert_equal_to_rounding(a, b)  # r = 1, d = 0: batch norm's arithmetic, in another program
    relaxed = train_step(jnp.int32(50000), state)
    for a, b in zip(
        jax.tree.leaves(relaxed),
        jax.tree.leaves(
            jaxbn.batch_renorm(x, params, state, training=True, r_max=R_MAX, d_max=D_MAX)
        ),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_schedule_rejects_bad_arguments():
    """renorm_clipping names the bad argument."""
    for kwargs, match in [
        ({"r_max": 0.5}, "r_max must be a finite"),
        ({"d_max": -1.0}, "d_max must be a finite"),
        ({"r_max": float("inf")}, "r_max must be a finite"),
        ({"warmup_steps": -1}, "warmup_steps must be a non-negative"),
        ({"r_max_steps": 100}, "r_max_steps=100 is before warmup_steps=5000"),
        ({"d_max_steps": 2.5}, "d_max_steps must be a non-negative Python int"),
    ]:
        with pytest.raises(ValueError, match=match):
            jaxbn.renorm_clipping(0, **kwargs)
    with pytest.raises(TypeError, match="step must be an integer or float"):
        jaxbn.renorm_clipping(jnp.array(True))


def test_non_finite_batch_keeps_state():
    """A NaN in the batch leaves the running statistics (and a cumulative count) unchanged."""
    x, _, params, state = _data("NHWC")
    x[3, 1, 2, 0] = np.nan
    y, new_state = jaxbn.batch_renorm(x, params, state, training=True, r_max=R_MAX, d_max=D_MAX)
    assert np.isnan(np.asarray(y)).any()
    for key in ("mean", "var"):  # exact: the update is skipped, the old state selected unchanged
        np.testing.assert_array_equal(new_state[key], state[key])
    cumulative = {**state, "count": jnp.asarray(2.0, jnp.float32)}
    _, new_state = jaxbn.batch_renorm(
        x, params, cumulative, training=True, r_max=R_MAX, d_max=D_MAX, momentum=None
    )
    for key in ("mean", "var", "count"):  # exact: selected unchanged, as above
        np.testing.assert_array_equal(new_state[key], cumulative[key])


def test_inference_and_reestimation_are_batch_norms():
    """training=False (with and without update_running_stats) returns batch_norm's results."""
    x, _, params, state = _data("NCHW")
    for update in (None, True):
        kwargs = dict(training=False, axis=1, update_running_stats=update)
        got = jaxbn.batch_renorm(x, params, state, r_max=R_MAX, d_max=D_MAX, **kwargs)
        expected = jaxbn.batch_norm(x, params, state, **kwargs)
        # exact: without training the correction is never applied, so both run batch norm's eager ops
        # (inference transform, moments, update) on the same inputs
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(a, b)
    assert (
        jaxbn.batch_renorm(x, params, state, training=False, r_max=R_MAX, d_max=D_MAX, axis=1)[1]
        is state
    )


def test_rejects_bad_arguments():
    """Bad limits and batch-norm arguments raise at trace time, naming the argument and value."""
    x, _, params, state = _data("NHWC")

    def call(**kwargs):
        kwargs = {"training": True, "r_max": R_MAX, "d_max": D_MAX, **kwargs}
        return jaxbn.batch_renorm(x, params, state, **kwargs)

    for kwargs, error, match in [
        ({"r_max": 0.5}, ValueError, r"r_max must be a real scalar >= 1 .*got 0.5"),
        ({"r_max": float("nan")}, ValueError, r"r_max must be .*got nan"),
        ({"d_max": -1}, ValueError, r"d_max must be a real scalar >= 0 .*got -1"),
        ({"d_max": "5"}, TypeError, r"d_max must be a real scalar >= 0"),
        ({"r_max": jnp.ones(4)}, TypeError, r"r_max must be a real scalar >= 1"),
        ({"r_max": True}, TypeError, r"r_max must be"),
        ({"training": 1}, TypeError, r"training must be a Python bool"),
        ({"momentum": 1.5}, ValueError, r"momentum must lie in \[0, 1\]"),
        ({"axis": 1}, ValueError, r"params\['scale'\] has shape \(4,\)"),
    ]:
        with pytest.raises(error, match=match):
            call(**kwargs)
    with pytest.raises(TypeError, match=r"r_max must be .*traced array of shape \(4,\)"):
        jax.jit(lambda r: call(r_max=r))(jnp.ones(4))
    # traced scalars are let through (a schedule inside jit)
    y, _ = jax.jit(lambda r, d: call(r_max=r, d_max=d))(jnp.float32(R_MAX), jnp.float32(D_MAX))
    # traced vs constant limits: two compiled programs (XLA may fold the constants), equal to rounding
    np.testing.assert_allclose(y, jax.jit(lambda: call()[0])(), rtol=1e-6, atol=1e-6)


# --- 8 devices --------------------------------------------------------------------------------

multidevice = needs_devices
_shard_map = getattr(jax, "shard_map", None)
if _shard_map is None:  # jax < 0.10.x spelling
    from jax.experimental.shard_map import shard_map as _shard_map


@functools.cache
def _mesh():
    return jax.make_mesh((N_DEVICES,), ("i",))


def _local_step(x, w, params, state, *, axis, axis_name):
    return _renorm_step(x, w, params, state, axis=axis, momentum=MOMENTUM, axis_name=axis_name)


@functools.cache
def _distributed_step(kind, axis):
    """``(x, w, params, state) -> (y, state, dx, dparams)`` on the global batch, one example per device."""
    if kind == "single":
        return jax.jit(functools.partial(_local_step, axis=axis, axis_name=None))
    batch = NamedSharding(_mesh(), P("i"))
    if kind == "jit_sharded":
        step = jax.jit(functools.partial(_local_step, axis=axis, axis_name=None))
        return lambda x, w, p, s: step(jax.device_put(x, batch), jax.device_put(w, batch), p, s)
    local = functools.partial(_local_step, axis=axis, axis_name="i")
    if kind == "pmap":
        step = jax.pmap(local, axis_name="i", in_axes=(0, 0, None, None))

        def run(x, w, p, s):
            per_device = lambda a: a.reshape((N_DEVICES, -1) + a.shape[1:])
            y, new_state, dx, dparams = step(per_device(x), per_device(w), p, s)
            merge = lambda a: a.reshape((-1,) + a.shape[2:])
            # every device holds the same state, bit for bit: the same program merging the same gathered
            # statistics in the same (device) order
            for value in jax.tree.leaves(new_state):
                np.testing.assert_array_equal(value, np.broadcast_to(value[0], value.shape))
            # each device differentiates its own loss: the parameter gradient is their sum
            return (
                merge(y),
                jax.tree.map(lambda a: a[0], new_state),
                merge(dx),
                jax.tree.map(lambda g: g.sum(0), dparams),
            )

        return run
    step = jax.jit(
        _shard_map(
            local,
            mesh=_mesh(),
            in_specs=(P("i"), P("i"), P(), P()),
            out_specs=(P("i"), P(), P("i"), P()),
        )
    )
    return lambda x, w, p, s: step(jax.device_put(x, batch), jax.device_put(w, batch), p, s)


@multidevice
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(
    "kind", [pytest.param("pmap", marks=pytest.mark.slow), "shard_map", "jit_sharded"]
)
def test_distributed_equals_global_batch(kind, layout):
    """pmap/shard_map/jit-sharded renorm equals the single-device run on the global batch (and the reference)."""
    axis, _ = LAYOUTS[layout]
    x, w, params, state = _data(layout)
    single = _distributed_step("single", axis)(x, w, params, state)
    y_ref, r, d, state_ref = renorm_reference(
        x, params["scale"], params["bias"], state, R_MAX, D_MAX, axis=axis
    )
    np.testing.assert_allclose(single[0], y_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        single[2],
        renorm_reference_grads(x, w, params["scale"], r, d, axis=axis)[0],
        rtol=1e-5,
        atol=1e-4,
    )
    got = _distributed_step(kind, axis)(x, w, params, state)
    np.testing.assert_allclose(got[0], single[0], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got[2], single[2], rtol=1e-6, atol=1e-5)
    for key in ("mean", "var"):
        np.testing.assert_allclose(got[1][key], single[1][key], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got[1][key], state_ref[key], rtol=1e-5, atol=1e-6)
    for key in ("scale", "bias"):
        np.testing.assert_allclose(got[3][key], single[3][key], rtol=1e-5, atol=1e-5)


@multidevice
def test_one_collective_per_direction_under_pmap():
    """Compiled pmap HLO, as batch norm: 1 all-gather forward, plus 1 all-reduce backward, no loop."""
    x = jnp.ones((N_DEVICES, 4, 3))
    params, state = jaxbn.batch_norm_init(3)

    def forward(x, p, s):
        return jaxbn.batch_renorm(x, p, s, training=True, r_max=R_MAX, d_max=D_MAX, axis_name="i")

    def loss(x, p, s):
        return jnp.sum(jnp.sin(forward(x, p, s)[0]))

    for fn, all_reduces in ((forward, 0), (jax.grad(loss, argnums=(0, 1)), 1)):
        text = hlo.compiled_text(
            jax.pmap(fn, axis_name="i", in_axes=(0, None, None)), x, params, state
        )
        assert (
            hlo.count_collectives(text, op="all-gather") == 1
        )  # every device's (count, K, mean - K, var)
        assert hlo.count_collectives(text) == all_reduces  # the backward's [Σdy, Σdy·x̂]
        assert (
            " while(" not in text and " conditional(" not in text
        )  # nothing decided from the data
        for op in ("all-gather", "all-reduce"):
            assert hlo.count_in_branches(text, op=op) == 0


# --- linen ------------------------------------------------------------------------------------


def test_linen_variables_and_training_match_functional():
    """BatchRenorm: BatchNorm's variables; apply = batch_renorm; inference = BatchNorm's."""
    x, _, _, _ = _data("NHWC")
    module = jaxbn.linen.BatchRenorm(
        use_running_average=False, momentum=MOMENTUM, r_max=R_MAX, d_max=D_MAX
    )
    batch_norm = jaxbn.linen.BatchNorm(use_running_average=False, momentum=MOMENTUM)
    variables = module.init(jax.random.key(0), x)
    bn_variables = batch_norm.init(jax.random.key(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(bn_variables)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(bn_variables)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)  # exact: both inits fill constants (ones and zeros)

    variables = {
        "params": {"scale": jnp.linspace(0.5, 1.5, 4), "bias": jnp.linspace(-1, 1, 4)},
        "batch_stats": {"mean": jnp.full(4, 0.1), "var": jnp.full(4, 1.2)},
    }
    y, updates = module.apply(variables, x, mutable=["batch_stats"])
    y_ref, new_state = jaxbn.batch_renorm(
        x,
        variables["params"],
        variables["batch_stats"],
        training=True,
        r_max=R_MAX,
        d_max=D_MAX,
        momentum=MOMENTUM,
    )
    # the module and the function: equal to rounding (outputs and statistics of order 1)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for key in ("mean", "var"):
        np.testing.assert_allclose(
            updates["batch_stats"][key], new_state[key], rtol=1e-6, atol=1e-7
        )
    y_ref = renorm_reference(
        x,
        variables["params"]["scale"],
        variables["params"]["bias"],
        variables["batch_stats"],
        R_MAX,
        D_MAX,
    )[0]
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)

    inference = module.clone(use_running_average=True).apply(variables, x)
    # exact: BatchRenorm's inference is BatchNorm's code path, the same eager ops on the same inputs
    np.testing.assert_array_equal(
        inference, batch_norm.clone(use_running_average=True).apply(variables, x)
    )


def test_linen_unit_limits_equal_batch_norm_and_schedule_counts_steps():
    """r_max=1, d_max=0 is BatchNorm (to rounding); callable limits add batch_stats/steps and follow it."""
    x, _, _, _ = _data("NCHW")
    renorm = jaxbn.linen.BatchRenorm(
        use_running_average=False, axis=1, momentum=MOMENTUM, r_max=1.0, d_max=0.0
    )
    batch_norm = jaxbn.linen.BatchNorm(use_running_average=False, axis=1, momentum=MOMENTUM)
    variables = batch_norm.init(jax.random.key(0), x)
    v_renorm = v_bn = variables
    for shift in (0.0, 3.0):
        y1, u1 = jax.jit(lambda v, x: renorm.apply(v, x, mutable=["batch_stats"]))(
            v_renorm, x + shift
        )
        y2, u2 = jax.jit(lambda v, x: batch_norm.apply(v, x, mutable=["batch_stats"]))(
            v_bn, x + shift
        )
        _assert_equal_to_rounding(y1, y2)  # two compiled programs: equal to rounding
        for key in ("mean", "var"):
            _assert_equal_to_rounding(u1["batch_stats"][key], u2["batch_stats"][key])
        v_renorm = v_bn = {"params": variables["params"], **u2}

    # r_max = 1 + 2 * steps, d_max = 5 * steps: batch norm at step 0, (3, 5) at step 1.
    scheduled = renorm.clone(r_max=lambda s: 1.0 + 2.0 * s, d_max=lambda s: 5.0 * s)
    variables = scheduled.init(jax.random.key(0), x)
    assert (
        variables["batch_stats"]["steps"].dtype == jnp.int32
        and variables["batch_stats"]["steps"] == 0
    )
    step = jax.jit(lambda v, x: scheduled.apply(v, x, mutable=["batch_stats"]))
    y, updates = step(variables, x)
    assert updates["batch_stats"]["steps"] == 1
    bn_stats = {k: variables["batch_stats"][k] for k in ("mean", "var")}
    bn_step = jax.jit(lambda v, x: batch_norm.apply(v, x, mutable=["batch_stats"]))
    bn_y, _ = bn_step(
        {"params": variables["params"], "batch_stats": bn_stats}, x
    )  # compiled as `step`
    _assert_equal_to_rounding(y, bn_y)
    state = {k: updates["batch_stats"][k] for k in ("mean", "var")}
    y, updates = step({"params": variables["params"], **updates}, x)
    assert updates["batch_stats"]["steps"] == 2
    expected = jaxbn.batch_renorm(
        x,
        variables["params"],
        state,
        training=True,
        r_max=3.0,
        d_max=5.0,
        axis=1,
        momentum=MOMENTUM,
    )[0]
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    # evaluation does not advance the counter
    _, updates = scheduled.clone(use_running_average=True).apply(
        {"params": variables["params"], **updates}, x, mutable=["batch_stats"]
    )
    assert updates["batch_stats"]["steps"] == 2


@structural
def test_same_passes_as_batch_norm():
    """Renorm moves what batch norm moves (4S forward, 10S forward+backward on XLA:CPU), r and d aside.

    The correction is per-feature work folded into batch norm's scale and bias:
    at most two more small kernels per program, no pass over the tensor.
    """
    shape = (32, 16, 16, 64)
    params, state = jaxbn.batch_norm_init(shape[-1])
    x = jnp.zeros(shape)
    size = x.size * 4

    def programs(fn):
        def forward_backward(x, p, s, dy):
            (y, new_state), vjp = jax.vjp(lambda x, p: fn(x, p, s), x, p)
            return y, new_state, vjp((dy, jax.tree.map(jnp.zeros_like, new_state)))

        return [
            hlo.memory_traffic(
                jax.jit(forward_backward).lower(x, params, state, x).compile().as_text()
            ),
            hlo.memory_traffic(jax.jit(fn).lower(x, params, state).compile().as_text()),
        ]

    renorm = programs(
        lambda x, p, s: jaxbn.batch_renorm(x, p, s, training=True, r_max=R_MAX, d_max=D_MAX)
    )
    batch_norm = programs(lambda x, p, s: jaxbn.batch_norm(x, p, s, training=True))
    for (traffic, kernels), (bn_traffic, bn_kernels) in zip(renorm, batch_norm):
        assert abs(traffic - bn_traffic) / size < 0.01
        assert kernels <= bn_kernels + 2
