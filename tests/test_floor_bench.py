"""benchmarks/floor.py: its guard-free reference BatchNorms are batch norm, and its run measures
every variant.

The references are the floor the compile-time ratios are read against, so each must compute
flax's BatchNorm step: outputs, running statistics and gradients (and, in the forward-mode form,
forward-mode derivatives). Nothing here looks at a time or a ratio's size.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from benchmarks import floor

MOMENTUM = 0.9


def _step(module, variables, x, w):
    """``(y, new running statistics, (d loss / d params, d loss / d x))`` of one training call."""

    def loss(params, x):
        y, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
        )
        return jnp.sum(y * w), (y, updates["batch_stats"])

    (_, (y, batch_stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x
    )
    return y, batch_stats, grads


@pytest.mark.parametrize("name", sorted(floor.REFERENCES))
def test_each_reference_computes_flax_batch_norm_step(name, rng):
    x = jnp.asarray(3.0 + 2.0 * rng.normal(size=(4, 5, 5, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    flax_norm = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM)
    reference = floor.REFERENCES[name](use_running_average=False, momentum=MOMENTUM)
    variables = flax_norm.init(jax.random.key(0), x)
    params = {
        "scale": jnp.asarray(1 + 0.1 * rng.normal(size=6), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=6), jnp.float32),
    }
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    assert jax.tree.structure(reference.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    expected = jax.jit(lambda v, x: _step(flax_norm, v, x, w))(variables, x)
    got = jax.jit(lambda v, x: _step(reference, v, x, w))(variables, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), got, expected)


def test_the_forward_mode_form_has_forward_mode_derivatives(rng):
    """``jax.jvp`` through the custom_jvp form equals JAX's own derivative of the same function;
    the reverse-mode form has none (why the forward-mode form exists)."""
    x = jnp.asarray(rng.normal(size=(8, 3, 4)), jnp.float32)
    scale, bias = jnp.full(4, 1.5), jnp.zeros(4)
    tangents = tuple(jnp.asarray(rng.normal(size=v.shape), jnp.float32) for v in (x, scale, bias))
    forward_mode = floor.forward_mode_form(floor.three_sums)
    autodiff = lambda *a: floor.normalize(floor.three_sums, *a)[0][0]  # noqa: E731
    _, got = jax.jvp(lambda *a: forward_mode(*a)[0], (x, scale, bias), tangents)
    _, expected = jax.jvp(autodiff, (x, scale, bias), tangents)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    reverse_mode = floor.reverse_mode_form(floor.three_sums)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda *a: reverse_mode(*a)[0], (x, scale, bias), tangents)


def test_three_sums_scale_the_squares_of_a_wide_spread(rng):
    """Deviations whose squares overflow float32 (the scaled sum is taken where the other overflows)."""
    x = jnp.asarray(1e19 * rng.normal(size=(64, 3)), jnp.float32)  # Σ d² near 6e39 > max
    mean, var = jax.jit(floor.three_sums, static_argnums=1)(x, (0,))
    wide = np.asarray(x, np.float64)
    np.testing.assert_allclose(mean, wide.mean(0), rtol=1e-5, atol=1e14)
    np.testing.assert_allclose(var, wide.var(0), rtol=1e-5)


@pytest.mark.slow  # compiles floor.py --quick's model five times
def test_quick_run_measures_every_variant_and_each_computes_flax_step(tmp_path):
    path = tmp_path / "floor.json"
    results = floor.main(["--quick", "--json", str(path)])
    assert list(results) == list(floor.VARIANTS)
    for name, row in results.items():
        assert row["lower_s"] > 0 and row["compile_s"] > 0, (name, row)
        assert row["instructions"] > row["fusions"] > 0, (name, row)
        assert row["loss_agrees"], (name, row["loss"], results["flax"]["loss"])
        assert set(row["ratios"]) == {"lower_s", "compile_s", "instructions", "fusions"}
    assert all(ratio == 1 for ratio in results["flax"]["ratios"].values())
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
