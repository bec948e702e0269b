"""Layer, RMS, group and instance norm: parity with flax.linen, float64 references, offsets, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxbn
import jaxbn.linen
from tests import reference
from tests.conftest import tiered

SHAPE = (4, 3, 5, 6)  # (batch, ..., channels last) except for the NCHW instance norm

# name: (jaxbn module, flax module, fields, reference axes). Group norm's reference
# axes are those of the input reshaped to (..., groups, channels // groups).
CASES = {
    "layer": (
        jaxbn.linen.LayerNorm,
        nn.LayerNorm,
        dict(reduction_axes=(2, 3), feature_axes=(1, 3)),
        dict(reduction_axes=(2, 3), feature_axes=(1, 3)),
    ),
    "rms": (
        jaxbn.linen.RMSNorm,
        nn.RMSNorm,
        {},
        dict(reduction_axes=(3,), feature_axes=(3,), center=False),
    ),
    "group": (jaxbn.linen.GroupNorm, nn.GroupNorm, dict(num_groups=3), dict(groups=3)),
    "group_size": (
        jaxbn.linen.GroupNorm,
        nn.GroupNorm,
        dict(num_groups=None, group_size=3),
        dict(groups=2),
    ),
    "instance_nchw": (
        jaxbn.linen.InstanceNorm,
        nn.InstanceNorm,
        dict(feature_axes=1),
        dict(reduction_axes=(2, 3), feature_axes=(1,)),
    ),
}


def _modules(name, affine=True, **fields):
    """jaxbn's and flax's module for case ``name`` (flax two-pass unless use_fast_variance=True)."""
    ours, theirs, case_fields, _ = CASES[name]
    flags = dict(use_scale=affine) if name == "rms" else dict(use_scale=affine, use_bias=affine)
    kwargs = {**case_fields, **flags, "use_fast_variance": False, **fields}
    return ours(**kwargs), theirs(**kwargs)


def _reference(name, x, params, mask=None):
    """The float64 NumPy output of case ``name``."""
    axes = dict(CASES[name][3])
    x = np.asarray(x, np.float64)
    groups = axes.pop("groups", None)
    if groups is None:
        return reference.per_example_norm(x, mask=mask, **axes, **params)
    grouped = x.shape[:-1] + (groups, x.shape[-1] // groups)
    mask = None if mask is None else np.broadcast_to(mask, x.shape).reshape(grouped)
    y = reference.per_example_norm(
        x.reshape(grouped),
        tuple(range(1, x.ndim - 1)) + (x.ndim,),
        (x.ndim - 1, x.ndim),
        mask=mask,
        **params,
    )
    return y.reshape(x.shape)


def _grads(module, weights):
    def loss(params, x, mask):
        y = module.apply({"params": params}, x, mask=mask)
        return jnp.sum(jnp.sin(y) * weights), y

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def _init(name, x, affine=True):
    """flax's variables for case ``name``, with non-trivial scale and bias; checks jaxbn's init matches."""
    ours, theirs = _modules(name, affine, param_dtype=x.dtype)
    variables = theirs.init(jax.random.key(0), x)
    ours_variables = ours.init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(ours_variables) == jax.tree_util.tree_structure(variables)
    # exact: both inits fill constants (ones and zeros), no arithmetic
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours_variables, variables)
    assert jax.tree_util.tree_map(lambda a: a.dtype, ours_variables) == jax.tree_util.tree_map(
        lambda a: a.dtype, variables
    )
    params = dict(variables.get("params", {}))
    for key, start in (("scale", 0.5), ("bias", -1.0)):
        if key in params:
            params[key] = jnp.linspace(start, start + 1.5, params[key].size, dtype=x.dtype).reshape(
                params[key].shape
            )
    return ours, theirs, params


# float32 only: tests/test_properties.py compares every dtype (float64 included) with an extended-precision reference
@pytest.mark.parametrize(  # the default tier: each with parameters (group_size: group stays), and
    # layer norm masked
    "name, variant",
    tiered(
        CASES,
        ("affine", "plain", "masked"),
        {*((name, "affine") for name in CASES if name != "group_size"), ("layer", "masked")},
    ),
)
def test_parity_with_flax_and_float64_reference(name, variant, rng):
    """Outputs and grads (x, scale, bias) equal flax's two-pass module and float64 NumPy."""
    x = jnp.asarray(rng.normal(size=SHAPE) * 2 + 3, jnp.float32)
    mask = jnp.asarray(rng.random(SHAPE) < 0.7) if variant == "masked" else None
    ours, theirs, params = _init(name, x, affine=variant != "plain")
    weights = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    (param_grads, x_grad), y = _grads(ours, weights)(params, x, mask)
    (param_grads_ref, x_grad_ref), y_ref = _grads(theirs, weights)(params, x, mask)
    tol, grad_tol = dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-5, atol=2e-4)
    assert y.dtype == y_ref.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(x_grad, x_grad_ref, **grad_tol)
    assert param_grads.keys() == param_grads_ref.keys() == params.keys()
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, **grad_tol), param_grads, param_grads_ref
    )
    np.testing.assert_allclose(y, _reference(name, x, params, mask), **tol)


@pytest.mark.parametrize("name", list(CASES))
def test_large_offset_is_exact_where_flax_default_is_not(name, capsys, rng):
    """Per-example mean 1e4, std 1, float32: output within 1e-4 of float64 (flax's default printed)."""
    x = jnp.asarray(rng.normal(size=SHAPE) + 1e4, jnp.float32)
    ours, _, params = _init(name, x)
    _, flax_default = _modules(name, use_fast_variance=True)
    expected = _reference(name, x, params)
    ours_error = np.abs(np.asarray(ours.apply({"params": params}, x), np.float64) - expected).max()
    flax_error = np.abs(
        np.asarray(flax_default.apply({"params": params}, x), np.float64) - expected
    ).max()
    with capsys.disabled():
        print(
            f"\n{name}: offset 1e4 max abs output error: jaxbn {ours_error:.2e}, flax default {flax_error:.2e}"
        )
    assert ours_error <= 1e-4


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_input_gets_float32_statistics(name, rng):
    """bfloat16 in, float32 params: float32 output within 1e-4 of float64 statistics of the same values."""
    x = jnp.asarray(rng.normal(size=SHAPE) + 10, jnp.bfloat16)
    ours, _, params = _init(name, x.astype(jnp.float32))
    y = ours.apply({"params": params}, x)
    assert y.dtype == jnp.float32  # flax's rule: promotion of input and params
    # bfloat16 statistics would be off by ~ulp(10) / std = 0.06
    np.testing.assert_allclose(y, _reference(name, x.astype(jnp.float32), params), atol=1e-4)
    plain = _modules(name, affine=False)[0]
    assert plain.apply({}, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("name", list(CASES))
def test_nan_in_one_example_leaves_the_others_alone(name, rng):
    """Statistics are per example: a NaN in example 0 changes nothing in examples 1..3."""
    x = np.asarray(rng.normal(size=SHAPE) + 3, np.float32)
    ours, _, params = _init(name, jnp.asarray(x))
    apply = jax.jit(ours.apply)
    clean = apply({"params": params}, x[1:])
    x[0, 1, 2, 3] = np.nan
    y = np.asarray(apply({"params": params}, x))
    assert np.isnan(y[0]).any()
    np.testing.assert_allclose(y[1:], clean, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # ~12 s of eager calls
def test_functions_match_their_modules_and_are_exported(rng):
    """The pure functions are public, and each module is its function with the module's params (to rounding)."""
    assert {"layer_norm", "rms_norm", "group_norm", "instance_norm"} <= set(jaxbn.__all__)
    x = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
    scale = jnp.linspace(0.5, 2.0, 6)
    params = {"scale": scale, "bias": -scale}
    for module, function in [
        (jaxbn.linen.LayerNorm(), jaxbn.layer_norm(x, params)),
        (jaxbn.linen.InstanceNorm(), jaxbn.instance_norm(x, params)),
        (jaxbn.linen.GroupNorm(num_groups=2), jaxbn.group_norm(x, params, num_groups=2)),
    ]:
        # a module and the function: two programs computing the same value (outputs of order 1-2)
        np.testing.assert_allclose(
            module.apply({"params": params}, x), function, rtol=1e-6, atol=1e-6
        )
    np.testing.assert_allclose(
        jaxbn.linen.RMSNorm().apply({"params": {"scale": scale}}, x),
        jaxbn.rms_norm(x, {"scale": scale}),
        rtol=1e-6,
        atol=1e-6,
    )
    # a mask that broadcasts (size 1 on the channel axis), which flax's GroupNorm cannot reshape;
    # to rounding: the small mask weighs the sums around each group's first valid element, the
    # full-size one selects around its largest (outputs of order 1-5)
    mask = jnp.arange(4)[None, :, None] < 3
    np.testing.assert_allclose(
        jaxbn.group_norm(x, params, num_groups=2, mask=mask),
        jaxbn.group_norm(x, params, num_groups=2, mask=jnp.broadcast_to(mask, x.shape)),
        rtol=1e-5,
        atol=1e-6,
    )


X = jnp.ones((2, 3, 4, 6))

ERRORS = [
    (
        lambda: jaxbn.layer_norm(jnp.ones((2, 3), jnp.int32)),
        TypeError,
        "x must have a floating dtype",
    ),
    (lambda: jaxbn.rms_norm(jnp.ones((2, 3), bool)), TypeError, "x must have a floating dtype"),
    (
        lambda: jaxbn.group_norm(jnp.ones((2, 4), jnp.int32), num_groups=2),
        TypeError,
        "floating dtype",
    ),
    (lambda: jaxbn.instance_norm(jnp.ones((2, 3, 4), jnp.int8)), TypeError, "floating dtype"),
    (lambda: jaxbn.layer_norm(X, epsilon=0.0), ValueError, "epsilon must be a finite number > 0"),
    (lambda: jaxbn.rms_norm(X, epsilon=-1.0), ValueError, "epsilon must be a finite number > 0"),
    (
        lambda: jaxbn.group_norm(X, num_groups=2, epsilon="1e-5"),
        TypeError,
        "epsilon must be a positive real",
    ),
    (lambda: jaxbn.instance_norm(X, epsilon=float("nan")), ValueError, "epsilon must be a finite"),
    (lambda: jaxbn.layer_norm(X, dtype=jnp.int32), TypeError, "dtype must be a floating dtype"),
    (
        lambda: jaxbn.layer_norm(X, reduction_axes=4),
        ValueError,
        r"reduction_axes=4 is out of range",
    ),
    (
        lambda: jaxbn.rms_norm(X, feature_axes=(1, 1)),
        ValueError,
        r"feature_axes=\(1, 1\) names the same axis",
    ),
    (
        lambda: jaxbn.layer_norm(X, {"scale": jnp.ones(5)}),
        ValueError,
        r"params\['scale'\] has shape \(5,\)",
    ),
    (lambda: jaxbn.layer_norm(X, {"gamma": jnp.ones(6)}), ValueError, r"unknown keys \['gamma'\]"),
    (
        lambda: jaxbn.rms_norm(X, {"bias": jnp.ones(6)}),
        ValueError,
        r"unknown keys \['bias'\]; expected only \['scale'\]",
    ),
    (
        lambda: jaxbn.instance_norm(X, {"bias": jnp.ones(4)}),
        ValueError,
        r"has shape \(4,\).*feature shape \(6,\)",
    ),
    (
        lambda: jaxbn.layer_norm(X, mask=jnp.ones((3, 3), bool)),
        ValueError,
        r"mask of shape \(3, 3\) does not broadcast",
    ),
    (
        lambda: jaxbn.group_norm(X, num_groups=2, mask=jnp.ones((5,), bool)),
        ValueError,
        "mask of shape",
    ),
    (lambda: jaxbn.group_norm(X), ValueError, "num_groups=32 does not divide the 6 channels"),
    (
        lambda: jaxbn.group_norm(X, num_groups=4),
        ValueError,
        "num_groups=4 does not divide the 6 channels",
    ),
    (
        lambda: jaxbn.group_norm(X, num_groups=None, group_size=4),
        ValueError,
        "group_size=4 does not divide the 6",
    ),
    (
        lambda: jaxbn.group_norm(X, num_groups=2, group_size=3),
        ValueError,
        "exactly one of num_groups and group_size must be given, got num_groups=2 and group_size=3",
    ),
    (
        lambda: jaxbn.group_norm(X, num_groups=None),
        ValueError,
        "exactly one of num_groups and group_size",
    ),
    (
        lambda: jaxbn.group_norm(X, num_groups=0),
        ValueError,
        "num_groups must be a positive int or None, got 0",
    ),
    (
        lambda: jaxbn.group_norm(X, num_groups=2.0),
        TypeError,
        "num_groups must be a positive int or None, got 2.0",
    ),
    (
        lambda: jaxbn.group_norm(X, num_groups=None, group_size=True),
        TypeError,
        "group_size must be a positive int",
    ),
    (
        lambda: jaxbn.group_norm(X, num_groups=2, reduction_axes=(1, 2)),
        ValueError,
        r"reduction_axes=\(1, 2\) must include the last axis \(3, or -1\)",
    ),
    (
        lambda: jaxbn.instance_norm(X, feature_axes=(0, 3)),
        ValueError,
        r"feature_axes=\(0, 3\) includes axis 0",
    ),
]


@pytest.mark.parametrize("call, error, message", ERRORS)
def test_validation_errors_name_argument_and_value(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("name", list(CASES))
def test_modules_reject_half_precision_statistics_and_ignore_fast_variance(name, rng):
    """force_float32_reductions=False raises for a half input only; use_fast_variance changes nothing."""
    x = jnp.asarray(rng.normal(size=SHAPE) + 3, jnp.float32)
    ours, _ = _modules(name, force_float32_reductions=False)
    variables = ours.init(jax.random.key(0), x)  # float32: the field changes nothing
    with pytest.raises(
        NotImplementedError, match=r"force_float32_reductions=False\) with a bfloat16 input"
    ):
        ours.apply(variables, x.astype(jnp.bfloat16))
    fast, _ = _modules(name, use_fast_variance=True)
    # exact: the field is ignored, so both run the same eager ops on the same inputs
    np.testing.assert_array_equal(fast.apply(variables, x), ours.apply(variables, x))


# Options flax lacks, appended after flax's fields; their defaults change nothing.
EXTRA_FIELDS = {
    "BatchNorm": [
        ("unbiased_running_var", False),
        ("update_running_stats", None),
        ("ghost_batch_size", None),
        ("sow_moments", False),
    ]
}


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm", "BatchNorm"])
def test_module_fields_order_and_defaults_are_flax(name):
    """Flax's fields in flax's order with flax's defaults (then jaxbn's extras): construction agrees."""
    import dataclasses

    def fields(cls):
        return [
            (f.name, f.default) for f in dataclasses.fields(cls) if f.name not in ("parent", "name")
        ]

    assert fields(getattr(jaxbn.linen, name)) == fields(getattr(nn, name)) + EXTRA_FIELDS.get(
        name, []
    )


@pytest.mark.slow  # ~10 s; test_axis_names.py shards features too
def test_features_sharded_over_a_named_axis_give_the_global_statistics(rng):
    """layer_norm/rms_norm with axis_name: each device holds some features, statistics are of all."""
    x = jnp.asarray(rng.normal(size=(3, 8)) * 2 + 5, jnp.float32)
    shards = x.reshape(3, 2, 4).transpose(1, 0, 2)  # (devices, batch, features / devices)
    for function in (jaxbn.layer_norm, jaxbn.rms_norm):
        sharded = jax.vmap(lambda s: function(s, axis_name="d"), axis_name="d")(shards)
        np.testing.assert_allclose(
            sharded.transpose(1, 0, 2).reshape(3, 8), function(x), rtol=1e-5, atol=1e-5
        )
