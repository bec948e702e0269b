"""jax.export with symbolic shapes: every normalizer, training and inference, and the exported call equals the jit.

Serving with dynamic batch and image sizes needs no Python arithmetic on shapes that a symbolic dimension cannot
answer (issue 19); the statistics take no data-dependent control flow, so the exported program is the jitted one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxbn
import jaxbn.linen
from tests.conftest import N_DEVICES, needs_devices

C = 8
PARAMS, STATE = jaxbn.batch_norm_init(C)
AFFINE = {"scale": jnp.linspace(0.5, 2.0, C), "bias": jnp.linspace(-1.0, 1.0, C)}

# name: (function of x, symbolic shape, a concrete shape that fits it)
CASES = {
    "batch_norm training": (
        lambda x: jaxbn.batch_norm(x, PARAMS, STATE, training=True),
        "b, h, w, 8",
        (6, 5, 3, C),
    ),
    "batch_norm inference": (
        lambda x: jaxbn.batch_norm(x, PARAMS, STATE, training=False),
        "b, h, w, 8",
        (6, 5, 3, C),
    ),
    "batch_norm with a mask": (
        lambda x: jaxbn.batch_norm(x, PARAMS, STATE, training=True, mask=x[..., :1] > 0),
        "b, h, w, 8",
        (6, 5, 3, C),
    ),
    "ghost batches": (
        lambda x: jaxbn.batch_norm(x, PARAMS, STATE, training=True, ghost_batch_size=2),
        "2*b, h, w, 8",
        (6, 5, 3, C),
    ),
    "batch_renorm": (
        lambda x: jaxbn.batch_renorm(x, PARAMS, STATE, training=True, r_max=2.0, d_max=1.0),
        "b, h, w, 8",
        (6, 5, 3, C),
    ),
    "layer_norm": (lambda x: jaxbn.layer_norm(x, AFFINE), "b, t, 8", (6, 7, C)),
    "rms_norm": (lambda x: jaxbn.rms_norm(x, {"scale": AFFINE["scale"]}), "b, t, 8", (6, 7, C)),
    "group_norm": (lambda x: jaxbn.group_norm(x, AFFINE, num_groups=4), "b, h, w, 8", (6, 5, 3, C)),
    "instance_norm": (lambda x: jaxbn.instance_norm(x, AFFINE), "b, h, w, 8", (6, 5, 3, C)),
    "moments": (lambda x: jaxbn.moments(x, (0, 1, 2)), "b, h, w, 8", (6, 5, 3, C)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_with_symbolic_shapes_equals_jit(name, rng):
    function, spec, shape = CASES[name]
    exported = export.export(jax.jit(function))(
        jax.ShapeDtypeStruct(export.symbolic_shape(spec), jnp.float32)
    )
    x = jnp.asarray(
        rng.normal(size=shape) * 3 + 1e3, jnp.float32
    )  # an offset: the statistics must stay exact
    got, want = exported.call(x), jax.jit(function)(x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)
    # no data-dependent control flow in what runs (channel_sums' per-platform choice is a constant case)
    text = jax.jit(exported.call).lower(x).compile().as_text()
    assert " while(" not in text and " conditional(" not in text


@pytest.mark.parametrize("values", ["both signs near the maximum", "subnormal", "offset 1e6"])
def test_exported_moments_at_the_edges_of_float32_equal_jit(values):
    """With a symbolic batch the scaling powers of two come from the symbolic size (not a constant):
    the exported statistics still equal the jitted ones where the scaling matters."""
    rng = np.random.default_rng(0)
    x = {
        "both signs near the maximum": 3e38 * rng.choice([-1.0, 1.0], (16, 4)),
        "subnormal": 1e-40 * rng.normal(size=(16, 4)),
        "offset 1e6": 1e6 + rng.normal(size=(16, 4)),
    }[values]
    x = jnp.asarray(x, jnp.float32)
    f = jax.jit(lambda x: jaxbn.moments(x, 0))
    exported = export.export(f)(jax.ShapeDtypeStruct(export.symbolic_shape("b, 4"), jnp.float32))
    for got, want in zip(exported.call(x), f(x)):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_exported_linen_training_step_round_trips(rng):
    """A linen BatchNorm train step serialized and deserialized keeps its results (symbolic batch)."""
    module = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9)
    x = jnp.asarray(rng.normal(size=(4, 3, 3, C)), jnp.float32)
    variables = module.init(jax.random.key(0), x)

    def step(variables, x):
        return module.apply(variables, x, mutable=["batch_stats"])

    shape = jax.ShapeDtypeStruct(export.symbolic_shape("b, 3, 3, 8"), jnp.float32)
    exported = export.deserialize(export.export(jax.jit(step))(variables, shape).serialize())
    x = jnp.asarray(rng.normal(size=(10, 3, 3, C)) + 5, jnp.float32)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
        exported.call(variables, x),
        jax.jit(step)(variables, x),
    )


@needs_devices
def test_symbolic_batch_split_over_devices_keeps_x_sharded():
    """A batch explicitly sharded over devices with a symbolic size (the global sums then, not each
    shard's statistics: the split needs a known size): no view of x that the sums read is
    constrained to be replicated. (Before, the shift's gather along the split axis overwrote the
    spec the views took theirs from: x's 16-feature rows were constrained replicated, an
    all-gather of x.)"""
    import re

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((N_DEVICES,), ("i",))  # (explicit axes: sharding in types)
    params, state = jaxbn.batch_norm_init(16)
    (batch,) = export.symbolic_shape(f"{N_DEVICES}*b")
    with jax.set_mesh(mesh):
        sharding = NamedSharding(mesh, P("i"))
        x = jax.ShapeDtypeStruct((batch, 16, 16, 16), jnp.float32, sharding=sharding)
        train = jax.jit(lambda x: jaxbn.batch_norm(x, params, state, training=True)[0])
        text = export.export(train)(x).mlir_module()
    assert re.search(r'%arg\d+: tensor<\?x16x16x16xf32> \{sdy.sharding = [^\n]*\[\{"i"\}', text)
    replicated = r"sharding_constraint %\w+ <@mesh, \[(\{\}, )+\{\}\]> : tensor<\?x"
    assert not re.findall(replicated, text)
