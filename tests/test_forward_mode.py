"""Forward-mode autodiff (jax.jvp, jax.jacfwd, jax.linearize) through training normalization.

The training step is a custom JVP whose tangent JAX transposes for reverse mode, so forward mode equals
a plain-JAX reference's and jacfwd equals jacrev, for every variant the step serves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx

EPS = 1e-5
SHAPE = (8, 3, 2, 4)


def _reference(
    x, scale, bias, mask=None, axes=(0, 1, 2), feature=-1, ghost=None, renorm=None, state=None
):
    """Batch norm in plain JAX (autodiff differentiates it in both modes)."""
    if ghost:
        groups = x.reshape((x.shape[0] // ghost, ghost) + x.shape[1:])
        return jax.vmap(
            lambda g: _reference(g, scale, bias, None, axes, feature, None, renorm, state)
        )(groups).reshape(x.shape)
    m = jnp.ones(x.shape) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    shape = [1] * x.ndim
    shape[feature] = -1
    n = m.sum(axes)
    mean = (m * jnp.where(m > 0, x, 0)).sum(axes) / n
    var = (m * (jnp.where(m > 0, x, 0) - mean.reshape(shape)) ** 2).sum(axes) / n
    x_hat = (x - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + EPS)
    if renorm is not None:
        r_max, d_max = renorm
        r = jax.lax.stop_gradient(
            jnp.clip(jnp.sqrt(var + EPS) / jnp.sqrt(state["var"] + EPS), 1 / r_max, r_max)
        )
        d = jax.lax.stop_gradient(
            jnp.clip((mean - state["mean"]) / jnp.sqrt(state["var"] + EPS), -d_max, d_max)
        )
        x_hat = x_hat * r.reshape(shape) + d.reshape(shape)
    return x_hat * scale.reshape(shape) + bias.reshape(shape)


@pytest.fixture
def data(rng):
    x = jnp.asarray(rng.normal(size=SHAPE) * 2 + 3, jnp.float32)
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
    }
    state = {
        "mean": jnp.asarray(rng.normal(size=4), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 3, 4), jnp.float32),
    }
    tangents = (
        jnp.asarray(rng.normal(size=SHAPE), jnp.float32),
        jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), params),
    )
    mask = jnp.asarray(rng.uniform(size=(8, 3, 2, 1)) > 0.3)
    return x, params, state, tangents, mask


CASES = {
    "plain": (dict(), dict()),
    "mask": (dict(mask=True), dict(mask=True)),
    "ghost": (dict(ghost_batch_size=4), dict(ghost=4)),
    "renorm": (dict(renorm=(1.2, 0.3)), dict(renorm=(1.2, 0.3))),
}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.slow) if c in ("ghost", "mask") else c  # ~10 s each
        for c in sorted(CASES)
    ],
)
def test_jvp_jacfwd_linearize_through_training_batch_norm(case, data):
    x, params, state, (tx, tp), mask = data
    options, reference_options = CASES[case]
    options, reference_options = dict(options), dict(reference_options)
    if options.pop("mask", False):
        options["mask"] = reference_options["mask"] = mask
    renorm = options.pop("renorm", None)
    reference_options["state"] = state

    def ours(x, p):
        if renorm:
            return jaxbn.batch_renorm(
                x, p, state, training=True, r_max=renorm[0], d_max=renorm[1], **options
            )[0]
        return jaxbn.batch_norm(x, p, state, training=True, **options)[0]

    def reference(x, p):
        return _reference(x, p["scale"], p["bias"], **reference_options)

    y, dy = jax.jvp(ours, (x, params), (tx, tp))
    y_ref, dy_ref = jax.jvp(reference, (x, params), (tx, tp))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dy, dy_ref, rtol=1e-4, atol=1e-4)
    y_lin, linear = jax.linearize(ours, x, params)
    np.testing.assert_allclose(linear(tx, tp), dy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jax.jacfwd(lambda x: ours(x, params))(x),  # full Jacobians: jacfwd = jacrev
        jax.jacrev(lambda x: ours(x, params))(x),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.slow) if c in ("mask_bfloat16", "renorm") else c  # ~4 s
        for c in ["plain", "mask", "mask_bfloat16", "renorm", "layer_norm"]
    ],
)
def test_second_order_derivatives_equal_the_reference(case, rng):
    """The step is differentiable to any order: Hessians in ``x`` (forward over reverse, reverse
    over reverse, reverse over forward) and mixed ``x``-parameter derivatives equal the plain-JAX
    reference's. In bfloat16 with a mask, where the backward sets masked-out non-finite values to
    0 on x's bits (a custom JVP gives its derivative), they equal the float32 step's on the same
    rounded x to within 5% of their largest value (bfloat16's rounding: at most 0.6% in six
    seeds; without the custom JVP, 45%-190%)."""
    x = jnp.asarray(rng.normal(size=(6, 4)) * 2 + 3, jnp.float32)
    weights = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32), "bias": jnp.ones(4)}
    state = {"mean": jnp.zeros(4), "var": jnp.full(4, 2.0)}
    mask = jnp.asarray([[True], [True], [False], [True], [True], [False]])
    options = {"mask": mask} if case.startswith("mask") else {}
    dtype = jnp.bfloat16 if case == "mask_bfloat16" else jnp.float32
    reference_options = dict(options, axes=(0,), state=state)
    if case == "renorm":
        reference_options["renorm"] = (1.2, 0.3)

    def ours(x, p):
        if case == "renorm":
            y = jaxbn.batch_renorm(x, p, state, training=True, r_max=1.2, d_max=0.3)[0]
        elif case == "layer_norm":
            y = jaxbn.layer_norm(x, p, epsilon=EPS)
        else:
            y = jaxbn.batch_norm(x.astype(dtype), p, state, training=True, epsilon=EPS, **options)
            y = y[0].astype(jnp.float32)
        return jnp.sum(jnp.sin(y) * weights)

    def reference(x, p):
        if case == "mask_bfloat16":  # the float32 step (the case "mask") on x rounded
            y = jaxbn.batch_norm(x, p, state, training=True, epsilon=EPS, **options)[0]
        elif case == "layer_norm":  # statistics per row (batch norm of x.T), parameters per feature
            y = _reference(x.T, jnp.ones(6), jnp.zeros(6), axes=(0,)).T
            y = y * p["scale"] + p["bias"]
        else:
            y = _reference(x, p["scale"], p["bias"], **reference_options)
        return jnp.sum(jnp.sin(y) * weights)

    rounded = x.astype(jnp.bfloat16).astype(jnp.float32) if case == "mask_bfloat16" else x
    for second_order in (
        jax.hessian,
        lambda f: jax.jacrev(jax.grad(f)),
        lambda f: jax.jacrev(jax.jacfwd(f)),
        lambda f: jax.jacfwd(jax.grad(f, argnums=1)),  # d/dx of the parameters' gradient
    ):
        got = jax.tree.leaves(jax.jit(second_order(ours))(x, params))
        want = jax.tree.leaves(jax.jit(second_order(reference))(rounded, params))
        for value, expected in zip(got, want, strict=True):
            # bfloat16: to 5% of the largest value (see above); float32: the reference's rounding
            rtol, atol = (
                (0, 5e-2 * np.abs(expected).max()) if dtype == jnp.bfloat16 else (2e-3,) * 2
            )
            np.testing.assert_allclose(value, expected, rtol=rtol, atol=atol)


@pytest.mark.slow  # ~7 s of eager forward mode
def test_forward_mode_of_the_returned_moments_and_under_vmap_with_an_axis_name(data):
    x, params, state, (tx, _), _ = data
    _, moments_tangent = jax.jvp(
        lambda x: jaxbn.batch_norm(x, params, state, training=True, return_moments=True)[2],
        (x,),
        (tx,),
    )
    _, want = jax.jvp(lambda x: jaxbn.moments(x, (0, 1, 2)), (x,), (tx,))
    np.testing.assert_allclose(moments_tangent.mean, want.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(moments_tangent.var, want.var, rtol=1e-4, atol=1e-5)

    def per_device(x):
        return jaxbn.batch_norm(x, params, state, training=True, axis_name="i")[0]

    split = lambda v: v.reshape((2, 4) + v.shape[1:])  # noqa: E731
    _, dy = jax.jvp(jax.vmap(per_device, axis_name="i"), (split(x),), (split(tx),))
    _, dy_global = jax.jvp(
        lambda x: jaxbn.batch_norm(x, params, state, training=True)[0], (x,), (tx,)
    )
    np.testing.assert_allclose(dy.reshape(x.shape), dy_global, rtol=1e-4, atol=1e-5)


def test_forward_mode_through_the_modules_equals_flax(data):
    x, _, _, (tx, _), _ = data
    from flax import linen as nn

    ours, theirs = (
        jaxbn.linen.BatchNorm(use_running_average=False),
        nn.BatchNorm(use_running_average=False),
    )
    variables = theirs.init(jax.random.key(0), x)

    def apply(module):
        return lambda x: module.apply(variables, x, mutable=["batch_stats"])[0]

    np.testing.assert_allclose(
        jax.jvp(apply(ours), (x,), (tx,))[1],
        jax.jvp(apply(theirs), (x,), (tx,))[1],
        rtol=1e-4,
        atol=1e-5,
    )
    tangents = []
    for cls in (
        jaxbn.nnx.BatchNorm,
        nnx.BatchNorm,
    ):  # the state passed in (a training call writes it)
        graph, state = nnx.split(cls(4, rngs=nnx.Rngs(0)))

        def call(x, state):
            module = nnx.merge(graph, state)
            return module(x), nnx.state(module)

        tangents.append(jax.jvp(call, (x, state), (tx, jax.tree.map(jnp.zeros_like, state)))[1][0])
    np.testing.assert_allclose(tangents[0], tangents[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch_norm", "batch_renorm", "layer_norm", "group_norm"])
def test_forward_mode_where_the_variance_is_beyond_float32(norm, rng):
    """Values of both signs near the maximum (x - K overflows, the variance is beyond float32): the
    tangent was NaN where x - K overflowed (inf * 0). It is the derivative of the documented output
    (the bias, or 0): dβ for batch norm, γ d's tangent for renorm, 0 for the per-example norms; and
    jacfwd equals jacrev."""
    x = jnp.asarray(3e38 * rng.choice([-1.0, 1.0], (8, 4)), jnp.float32)
    params = {"scale": jnp.full(4, 1.5), "bias": jnp.arange(4.0)}
    state = {"mean": jnp.zeros(4), "var": jnp.ones(4)}
    fn = {
        "batch_norm": lambda x, p: jaxbn.batch_norm(x, p, state, training=True)[0],
        "batch_renorm": lambda x, p: jaxbn.batch_renorm(
            x, p, state, training=True, r_max=3.0, d_max=5.0
        )[0],
        "layer_norm": lambda x, p: jaxbn.layer_norm(x.reshape(2, 16), None).reshape(8, 4),
        "group_norm": lambda x, p: jaxbn.group_norm(x.reshape(2, 16), None, num_groups=2).reshape(
            8, 4
        ),
    }[norm]
    tangents = (
        jnp.asarray(rng.normal(size=x.shape), jnp.float32),
        jax.tree.map(jnp.ones_like, params),
    )
    y, tangent = jax.jit(lambda x, p, t: jax.jvp(fn, (x, p), t))(x, params, tangents)
    assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(tangent)).all()
    if norm == "batch_norm":  # y = β: dy = dβ
        np.testing.assert_allclose(tangent, np.ones((8, 4)), rtol=1e-6)
    if norm == "batch_renorm":  # y = γ d + β (r and d carry no gradient): dy = d dγ + dβ
        d = np.clip(np.asarray(x, np.float64).mean(0) / np.sqrt(1 + 1e-5), -5.0, 5.0)
        np.testing.assert_allclose(tangent, np.broadcast_to(d + 1, (8, 4)), rtol=1e-6)
    if norm in ("layer_norm", "group_norm"):  # y = 0
        np.testing.assert_allclose(tangent, 0, atol=1e-30)
    forward = jax.jit(jax.jacfwd(fn))(x, params)
    reverse = jax.jit(jax.jacrev(fn))(x, params)
    np.testing.assert_allclose(forward, reverse, atol=1e-6)
