"""jaxbn.linen.BatchNorm as a drop-in for flax.linen.BatchNorm."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxbn.linen
from tests import reference


def _run_steps(module, variables, batches, scale_weights):
    """Training steps: outputs, grads of a weighted loss w.r.t. x and params, final batch_stats."""

    def loss(params, x, batch_stats):
        y, updates = module.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(y) * scale_weights), (y, updates["batch_stats"])

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    params, batch_stats = variables.get("params", {}), variables["batch_stats"]
    results = []
    for x in batches:
        (param_grads, x_grad), (y, batch_stats) = grad_fn(params, x, batch_stats)
        results.append((y, x_grad, param_grads))
    return results, batch_stats


@pytest.mark.parametrize(
    "dtype", [jnp.float32, pytest.param(jnp.float64, marks=pytest.mark.slow)]
)  # x64: slow tier
@pytest.mark.parametrize(
    "axis, use_scale, use_bias",
    [  # the default tier: every parameter set on the last axis, axis 1 with both
        (axis, *params)
        if axis == -1 or params == (True, True)
        else pytest.param(axis, *params, marks=pytest.mark.slow)
        for axis in (-1, 1)
        for params in ((True, True), (False, False), (True, False))
    ],
)
def test_parity_with_flax_two_pass(dtype, axis, use_scale, use_bias, rng):
    """Outputs, grads (x, scale, bias), running stats over 3 steps and eval equal flax's."""
    with jax.enable_x64(dtype == jnp.float64):
        shape = (6, 3, 4, 4) if axis == 1 else (6, 4, 4, 3)
        batches = [jnp.asarray(rng.normal(size=shape) * 2 + 5, dtype) for _ in range(3)]
        kwargs = dict(
            momentum=0.8, use_scale=use_scale, use_bias=use_bias, axis=axis, param_dtype=dtype
        )
        ours = jaxbn.linen.BatchNorm(**kwargs)
        theirs = nn.BatchNorm(use_fast_variance=False, **kwargs)
        variables = theirs.init(jax.random.key(0), batches[0], use_running_average=False)
        assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
            ours.init(jax.random.key(0), batches[0], use_running_average=False)
        )
        if use_scale:  # non-trivial affine parameters, so their gradients are tested too
            variables["params"]["scale"] = jnp.linspace(0.5, 1.5, 3, dtype=dtype)
        if use_bias:
            variables["params"]["bias"] = jnp.linspace(-1, 1, 3, dtype=dtype)
        weights = jnp.asarray(rng.normal(size=shape), dtype)
        ours_out, ours_stats = _run_steps(ours, variables, batches, weights)
        theirs_out, theirs_stats = _run_steps(theirs, variables, batches, weights)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-10, atol=1e-10)
        # scale/bias gradients are sums of ~100 terms of either sign: absolute tolerance
        grad_tol = dict(rtol=1e-5, atol=2e-4) if dtype == jnp.float32 else tol
        for (y, *grads), (y_ref, *grads_ref) in zip(ours_out, theirs_out):
            np.testing.assert_allclose(y, y_ref, **tol)
            assert y.dtype == y_ref.dtype
            jax.tree_util.tree_map(
                lambda u, v: np.testing.assert_allclose(u, v, **grad_tol), grads, grads_ref
            )
        # flax's init stores batch_stats in float32 even under x64 (jaxbn's: float64 for a float64
        # param_dtype, test_float64_param_dtype_keeps_float64_running_stats); applied to flax's
        # variables, flax's update silently promotes them to float64, jaxbn's keeps the stored
        # dtype, so the running statistics agree to float32 precision.
        assert ours_stats["mean"].dtype == variables["batch_stats"]["mean"].dtype
        for key in ("mean", "var"):
            np.testing.assert_allclose(ours_stats[key], theirs_stats[key], rtol=1e-5, atol=1e-6)
        eval_vars = {**variables, "batch_stats": ours_stats}
        y_ours = ours.apply(eval_vars, batches[0], use_running_average=True)
        y_theirs = theirs.apply(eval_vars, batches[0], use_running_average=True)
        # flax takes rsqrt of the float32 running variance in float32; jaxbn in the input's dtype
        np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
        y_eval_ref = reference.normalize(
            batches[0],
            ours_stats["mean"],
            ours_stats["var"],
            variables.get("params", {}).get("scale"),
            variables.get("params", {}).get("bias"),
            axis,
        )
        np.testing.assert_allclose(y_ours, y_eval_ref, **tol)
        # and both against float64 NumPy
        mean, var = reference.batch_stats(batches[-1], axis=axis)
        scale = variables.get("params", {}).get("scale")
        bias = variables.get("params", {}).get("bias")
        np.testing.assert_allclose(
            ours_out[-1][0], reference.normalize(batches[-1], mean, var, scale, bias, axis), **tol
        )


def test_checkpoints_swap_both_ways(rng):
    """Variables from flax's init apply in jaxbn's module and vice versa, with equal results."""
    x = jnp.asarray(rng.normal(size=(8, 5)) + 1.0, jnp.float32)
    flax_vars = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    ours_vars = jaxbn.linen.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    # exact by construction: both initialize with ones and zeros
    jax.tree_util.tree_map(np.testing.assert_array_equal, flax_vars, ours_vars)
    assert jax.tree_util.tree_map(lambda a: a.dtype, flax_vars) == jax.tree_util.tree_map(
        lambda a: a.dtype, ours_vars
    )
    _, flax_updates = nn.BatchNorm(use_running_average=False, use_fast_variance=False).apply(
        flax_vars, x, mutable=["batch_stats"]
    )
    y = jaxbn.linen.BatchNorm(use_running_average=True).apply({**flax_vars, **flax_updates}, x)
    y_flax = nn.BatchNorm(use_running_average=True).apply({**flax_vars, **flax_updates}, x)
    np.testing.assert_allclose(y, y_flax, rtol=1e-6)


def test_init_neither_syncs_nor_updates():
    """init leaves batch_stats at (0, 1), needs no bound axis_name, and takes a batch of one silently."""
    module = jaxbn.linen.BatchNorm(use_running_average=False, axis_name="batch")
    variables = module.init(jax.random.key(0), jnp.ones((4, 3)) * 7)
    # exact by construction: the initial zeros and ones, not written by init
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, _ = jaxbn.linen.BatchNorm(use_running_average=False).init_with_output(
            jax.random.key(0), jnp.ones((1, 3))
        )
    np.testing.assert_array_equal(
        y, jnp.zeros((1, 3))
    )  # the bias, as flax (exact: x - mean is 0 for one value)


def test_call_argument_overrides_field_as_in_flax(rng):
    """use_running_average comes from the field or the call, and must be given exactly once."""
    x = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
    module = jaxbn.linen.BatchNorm()
    variables = module.init(jax.random.key(0), x, use_running_average=True)
    y_eval = module.apply(variables, x, use_running_average=True)
    np.testing.assert_allclose(y_eval, x / np.sqrt(1 + 1e-5), rtol=1e-6)
    with pytest.raises(ValueError, match="use_running_average"):
        module.apply(variables, x)


def test_mask_and_guard_reach_the_module(rng):
    """mask= and the non-finite guard work through the module."""
    x = np.asarray(rng.normal(size=(8, 3)), np.float32)
    module = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.0)
    variables = module.init(jax.random.key(0), x)
    mask = (np.arange(8) < 5)[:, None]
    _, updates = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
    mean, var = reference.batch_stats(x[:5])
    np.testing.assert_allclose(updates["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(updates["batch_stats"]["var"], var, rtol=1e-5)
    x[0, 0] = np.nan
    _, updates = module.apply(variables, x, mutable=["batch_stats"])
    # exact by construction: a non-finite batch is skipped, the stored values are kept
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"]
    )


def test_validation_reaches_the_module():
    """Bad hyperparameters raise the functional core's errors from the module."""
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="momentum must lie"):
        jaxbn.linen.BatchNorm(use_running_average=False, momentum=1.1).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="epsilon"):
        jaxbn.linen.BatchNorm(use_running_average=True, epsilon=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="out of range"):
        jaxbn.linen.BatchNorm(use_running_average=True, axis=3).init(jax.random.key(0), x)


class _SmallCNN(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(8, (3, 3))(x)
        x = self.norm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = self.norm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(2)(jnp.mean(x, (1, 2)))


@pytest.mark.slow  # ~4 s; test_checkpoints_swap_both_ways stays
def test_swapping_the_import_in_a_model_keeps_everything(rng):
    """A CNN with jaxbn's BatchNorm has flax's variable tree and trains to the same numbers."""
    x = jnp.asarray(rng.normal(size=(4, 6, 6, 2)), jnp.float32)
    ours, theirs = (
        _SmallCNN(jaxbn.linen.BatchNorm),
        _SmallCNN(lambda **kw: nn.BatchNorm(use_fast_variance=False, **kw)),
    )
    variables = theirs.init(jax.random.key(0), x, train=False)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
        ours.init(jax.random.key(0), x, train=False)
    )
    out_ours, upd_ours = jax.jit(
        lambda v, x: ours.apply(v, x, train=True, mutable=["batch_stats"])
    )(variables, x)
    out_theirs, upd_theirs = theirs.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), upd_ours, upd_theirs
    )


def test_summaries_show_no_helper_rows():
    """tabulate(show_repeated=True) lists BatchNorm/BatchRenorm once each, no helper method as a call."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jaxbn.linen.BatchNorm(use_running_average=False)(nn.Dense(4)(x))
            return jaxbn.linen.BatchRenorm(use_running_average=False, r_max=lambda s: 1.0 + s)(x)

    table = Model().tabulate(
        jax.random.key(0), jnp.ones((2, 3)), show_repeated=True, console_kwargs={"width": 300}
    )
    assert "functional_call" not in table and "_extra_running_stats" not in table
    assert table.count("BatchNorm_0") == 1 and table.count("BatchRenorm_0") == 1


@pytest.mark.parametrize("cls", [jaxbn.linen.BatchNorm, jaxbn.linen.BatchRenorm])
def test_float64_param_dtype_keeps_float64_running_stats(cls, rng):
    """Under x64 a float64 param_dtype gives float64 running statistics from init on (flax's are
    float64 after a float64 update, and from init with force_float32_reductions=False, where they
    equal jaxbn's to float64 precision), exact against float64 NumPy; bfloat16 and float32
    param_dtypes keep flax's float32 (force_float32_reductions=False: param_dtype, as flax);
    without x64 float64 means float32."""
    kwargs = dict(use_running_average=False, momentum=0.8)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(8, 3)) * 2 + 5, jnp.float64)
        for force_float32 in (True, False):
            ours = cls(param_dtype=jnp.float64, force_float32_reductions=force_float32, **kwargs)
            theirs = nn.BatchNorm(
                param_dtype=jnp.float64,
                force_float32_reductions=force_float32,
                use_fast_variance=False,
                **kwargs,
            )
            variables = ours.init(jax.random.key(0), x)
            assert {v.dtype for v in jax.tree.leaves(variables["batch_stats"])} == {
                jnp.dtype(jnp.float64)
            }
            stats, flax_stats = (
                variables["batch_stats"],
                theirs.init(jax.random.key(0), x)["batch_stats"],
            )
            for step in range(2):
                _, stats = ours.apply(
                    {**variables, "batch_stats": stats}, x, mutable=["batch_stats"]
                )
                _, flax_stats = theirs.apply(
                    {**variables, "batch_stats": flax_stats}, x, mutable=["batch_stats"]
                )
                stats, flax_stats = stats["batch_stats"], flax_stats["batch_stats"]
                for key in ("mean", "var"):
                    assert stats[key].dtype == flax_stats[key].dtype == jnp.float64
                    if (
                        not force_float32
                    ):  # (else flax's first update, from float32, rounds momentum to float32)
                        np.testing.assert_allclose(
                            stats[key], flax_stats[key], rtol=1e-12, atol=1e-12
                        )
            mean, var = reference.batch_stats(x)
            np.testing.assert_allclose(stats["mean"], 0.36 * mean, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(stats["var"], 0.64 + 0.36 * var, rtol=1e-12, atol=1e-12)
        for param_dtype, force_float32, expected in (
            (jnp.bfloat16, True, jnp.float32),
            (jnp.float32, True, jnp.float32),
            (jnp.bfloat16, False, jnp.bfloat16),
        ):
            kw = dict(param_dtype=param_dtype, force_float32_reductions=force_float32, **kwargs)
            stats = cls(**kw).init(jax.random.key(0), x)["batch_stats"]
            flax_stats = nn.BatchNorm(**kw).init(jax.random.key(0), x)["batch_stats"]
            assert stats["mean"].dtype == stats["var"].dtype == flax_stats["mean"].dtype == expected
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # float64 requested without x64: JAX warns (for the params)
        stats = cls(param_dtype=jnp.float64, **kwargs).init(jax.random.key(0), x)["batch_stats"]
    assert stats["mean"].dtype == stats["var"].dtype == jnp.float32
