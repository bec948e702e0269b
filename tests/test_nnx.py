"""jaxbn.nnx as a drop-in for flax.nnx's normalization layers.

Every module is run beside its flax.nnx counterpart (``use_fast_variance=False``,
flax's stable two-pass variance) on the same data: outputs, gradients with
respect to the input and the parameters, running statistics over several
``nnx.Optimizer`` steps under ``nnx.jit``, eval mode, and the state itself
(structure, variable types, values, metadata, keys drawn from ``rngs``). Then
the cases users report broken with flax's layers: ``nnx.vmap`` called twice in
training mode, ``nnx.eval_shape``, statistics synchronized under
``nnx.shard_map`` and a batch sharded under ``nnx.jit``, against the
single-device result on the global batch and a float64 NumPy reference.
"""

import functools
import warnings

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from tests import reference
from tests.conftest import N_DEVICES

# (name, jaxbn class, flax class, constructor kwargs, input shape)
CASES = {
    "batch_nhwc": (
        jaxbn.nnx.BatchNorm,
        nnx.BatchNorm,
        dict(num_features=3, momentum=0.8),
        (6, 4, 4, 3),
    ),
    "batch_nchw": (
        jaxbn.nnx.BatchNorm,
        nnx.BatchNorm,
        dict(num_features=3, momentum=0.8, axis=1),
        (6, 3, 4, 4),
    ),
    "layer": (jaxbn.nnx.LayerNorm, nnx.LayerNorm, dict(num_features=5), (4, 3, 5)),
    "layer_2d": (
        jaxbn.nnx.LayerNorm,
        nnx.LayerNorm,
        dict(num_features=5, reduction_axes=(1, 2), feature_axes=-1),
        (4, 3, 5),
    ),
    "rms": (jaxbn.nnx.RMSNorm, nnx.RMSNorm, dict(num_features=5), (4, 3, 5)),
    "group": (jaxbn.nnx.GroupNorm, nnx.GroupNorm, dict(num_features=6, num_groups=3), (4, 3, 3, 6)),
    "group_size": (
        jaxbn.nnx.GroupNorm,
        nnx.GroupNorm,
        dict(num_features=6, num_groups=None, group_size=3),
        (4, 5, 6),
    ),
    "instance": (jaxbn.nnx.InstanceNorm, nnx.InstanceNorm, dict(num_features=4), (3, 5, 5, 4)),
    "instance_nchw": (
        jaxbn.nnx.InstanceNorm,
        nnx.InstanceNorm,
        dict(num_features=4, feature_axes=1),
        (3, 4, 5, 5),
    ),
}
# Another layout or grouping of a module that a case above covers: their parity and swap cases are in the slow tier.
VARIANTS = ("batch_nchw", "layer_2d", "group_size", "instance_nchw")
RANDOM_INITS = dict(scale_init=nnx.initializers.normal(1.0), bias_init=nnx.initializers.normal(1.0))


def _kwargs(cls, kwargs, **extra):
    """Random scale/bias initializers (non-trivial gradients; equal values prove equal keys drawn)."""
    inits = {k: v for k, v in RANDOM_INITS.items() if cls is not nnx.RMSNorm or k == "scale_init"}
    return {**inits, **kwargs, **extra}


def _pair(name, **extra):
    ours_cls, flax_cls, kwargs, shape = CASES[name]
    ours = ours_cls(**_kwargs(flax_cls, kwargs, **extra), rngs=nnx.Rngs(0))
    theirs = flax_cls(
        **_kwargs(flax_cls, kwargs, **extra), use_fast_variance=False, rngs=nnx.Rngs(0)
    )
    return ours, theirs, shape


def _flat_types(module):
    return [(path, type(variable)) for path, variable in nnx.to_flat_state(nnx.state(module))]


@nnx.jit
def _train_step(model, optimizer, x, w):
    """One SGD step on ``sum(sin(y) * w)``: returns ``y``, ``d/dx`` and the parameter gradients."""

    def loss(model, x):
        y = model(x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * w), y

    (grads, x_grad), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    optimizer.update(model, grads)
    return y, x_grad, grads


@nnx.jit
def _eval_step(model, x):
    return model(x)


def _assert_close(a, b, tol):
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(
            np.asarray(u, np.float64), np.asarray(v, np.float64), **tol
        ),
        a,
        b,
    )


# bfloat16 input for one configuration of each class (layouts and axes are dtype-independent)
PARITY = [
    pytest.param(name, jnp.float32, marks=pytest.mark.slow)
    if name in VARIANTS
    else (name, jnp.float32)
    for name in CASES
] + [  # bfloat16: the slow tier
    pytest.param(name, jnp.bfloat16, marks=pytest.mark.slow)
    for name in ("batch_nhwc", "layer", "rms", "group", "instance")
]


@pytest.mark.parametrize("name, dtype", PARITY)
def test_training_parity_with_flax(name, dtype, rng):
    """Outputs, grads (x, params), params after SGD, running stats (3 jitted steps), eval: equal to flax."""
    ours, theirs, shape = _pair(name)
    assert _flat_types(ours) == _flat_types(theirs)
    opt_ours = nnx.Optimizer(ours, optax.sgd(0.1), wrt=nnx.Param)
    opt_theirs = nnx.Optimizer(theirs, optax.sgd(0.1), wrt=nnx.Param)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    if dtype == jnp.float32:
        tol, grad_tol = dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-5, atol=2e-4)
    else:  # both reduce in float32 from the same bfloat16 input; the gradient wrt x is rounded to bfloat16
        tol, grad_tol = dict(rtol=1e-2, atol=1e-2), dict(rtol=2e-2, atol=5e-2)
    for step in range(3):
        x = jnp.asarray(rng.normal(size=shape) * 2 + 3, dtype)
        y, dx, grads = _train_step(ours, opt_ours, x, w)
        y_ref, dx_ref, grads_ref = _train_step(theirs, opt_theirs, x, w)
        assert y.dtype == y_ref.dtype and dx.dtype == dx_ref.dtype == dtype
        _assert_close(y, y_ref, tol)
        _assert_close(dx, dx_ref, grad_tol)
        _assert_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(grads_ref), grad_tol)
        state, state_ref = nnx.to_pure_dict(nnx.state(ours)), nnx.to_pure_dict(nnx.state(theirs))
        assert jax.tree.map(lambda a: a.dtype, state) == jax.tree.map(lambda a: a.dtype, state_ref)
        _assert_close(state, state_ref, grad_tol)  # params after SGD; running statistics
    # the last training output against float64 NumPy (with the parameters before the last SGD step)
    before = jax.tree.map(
        lambda p, g: p + 0.1 * g,
        nnx.to_pure_dict(nnx.state(ours, nnx.Param)),
        nnx.to_pure_dict(grads),
    )
    np.testing.assert_allclose(
        np.asarray(y, np.float64), _numpy_reference(ours, x, **before), **tol
    )
    if isinstance(ours, jaxbn.nnx.BatchNorm):
        ours.eval()
        theirs.eval()
        assert ours.use_running_average and theirs.use_running_average
        _assert_close(_eval_step(ours, x), _eval_step(theirs, x), tol)


def _numpy_reference(module, x, scale=None, bias=None):
    """Float64 training-mode output of ``module`` (one of CASES) on ``x``."""
    x = np.asarray(x, np.float64)
    if isinstance(module, jaxbn.nnx.BatchNorm):
        return reference.normalize(
            x, *reference.batch_stats(x, module.axis), scale, bias, module.axis, module.epsilon
        )
    features = module.feature_axes if not isinstance(module, jaxbn.nnx.GroupNorm) else -1
    features = tuple(np.atleast_1d(features) % x.ndim)
    broadcast = [x.shape[i] if i in features else 1 for i in range(x.ndim)]
    grouped = x
    if isinstance(module, jaxbn.nnx.GroupNorm):
        grouped = x.reshape(x.shape[:-1] + (module.num_groups, module.group_size))
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    elif isinstance(module, jaxbn.nnx.InstanceNorm):
        axes = tuple(i for i in range(1, x.ndim) if i not in features)
    else:
        axes = tuple(np.atleast_1d(module.reduction_axes) % x.ndim)
    if isinstance(module, jaxbn.nnx.RMSNorm):
        y = x / np.sqrt(np.mean(x**2, axes, keepdims=True) + module.epsilon)
    else:
        mean, var = grouped.mean(axes, keepdims=True), grouped.var(axes, keepdims=True)
        y = ((grouped - mean) / np.sqrt(var + module.epsilon)).reshape(x.shape)
    if scale is not None:
        y = y * np.asarray(scale, np.float64).reshape(broadcast)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(broadcast)
    return y


class _SmallCNN(nnx.Module):
    def __init__(self, batch_norm, layer_norm, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn = batch_norm(4, momentum=0.9, rngs=rngs)
        self.dense = nnx.Linear(4, 3, rngs=rngs)
        self.ln = layer_norm(3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.ln(self.dense(jnp.mean(x, (1, 2))))


@nnx.jit
def _cnn_step(model, optimizer, x, labels):
    def loss(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value


@pytest.mark.slow  # ~4 s; test_state_swaps_with_flax stays
def test_swapping_the_import_in_a_model_keeps_everything(rng):
    """A CNN built with jaxbn.nnx's layers has flax's state (same keys drawn from one Rngs) and
    trains to the same numbers under nnx.jit with nnx.Optimizer (SGD with momentum)."""
    ours = _SmallCNN(jaxbn.nnx.BatchNorm, jaxbn.nnx.LayerNorm, nnx.Rngs(0))
    theirs = _SmallCNN(
        functools.partial(nnx.BatchNorm, use_fast_variance=False),
        functools.partial(nnx.LayerNorm, use_fast_variance=False),
        nnx.Rngs(0),
    )
    assert _flat_types(ours) == _flat_types(theirs)
    # exact by construction: the same initializers called with the same keys
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(ours)),
        nnx.to_pure_dict(nnx.state(theirs)),
    )
    opt_ours = nnx.Optimizer(ours, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    opt_theirs = nnx.Optimizer(theirs, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    for _ in range(3):
        x = jnp.asarray(rng.normal(size=(8, 5, 5, 2)) + 1, jnp.float32)
        labels = jnp.asarray(rng.integers(0, 3, size=8))
        np.testing.assert_allclose(
            _cnn_step(ours, opt_ours, x, labels),
            _cnn_step(theirs, opt_theirs, x, labels),
            rtol=1e-5,
        )
    _assert_close(
        nnx.to_pure_dict(nnx.state(ours)),
        nnx.to_pure_dict(nnx.state(theirs)),
        dict(rtol=1e-4, atol=1e-5),
    )
    ours.eval()
    theirs.eval()
    _assert_close(_eval_step(ours, x), _eval_step(theirs, x), dict(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in VARIANTS else n for n in CASES]
)
def test_state_swaps_with_flax(name, rng):
    """A flax module's state merged into jaxbn's graphdef (and back) gives the same outputs."""
    ours, theirs, shape = _pair(name, param_dtype=jnp.float32)
    x = jnp.asarray(rng.normal(size=shape) + 1, jnp.float32)
    if isinstance(theirs, nnx.BatchNorm):  # move the running statistics away from (0, 1)
        theirs(x)
        theirs.eval()
        ours.eval()
    graph_ours, state_ours = nnx.split(ours)
    graph_theirs, state_theirs = nnx.split(theirs)
    assert jax.tree.structure(state_ours) == jax.tree.structure(state_theirs)
    swapped = nnx.merge(graph_ours, state_theirs)
    np.testing.assert_allclose(swapped(x), theirs(x), rtol=1e-5, atol=1e-5)
    back = nnx.merge(
        graph_theirs, nnx.state(swapped)
    )  # exact by construction: the same arrays, moved
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(back)),
        nnx.to_pure_dict(state_theirs),
    )


@pytest.mark.parametrize("use_scale, use_bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("cls", ["batch_nhwc", "layer", "group", "instance"])
def test_optional_params_and_metadata_match_flax(cls, use_scale, use_bias, rng):
    """Disabled scale/bias, Param metadata and the keys drawn from a shared Rngs are flax's."""
    ours_cls, flax_cls, kwargs, shape = CASES[cls]
    extra = dict(
        use_scale=use_scale,
        use_bias=use_bias,
        scale_metadata={"tag": "s"},
        bias_metadata={"tag": "b"},
    )
    rngs_ours, rngs_theirs = nnx.Rngs(3), nnx.Rngs(3)
    ours = ours_cls(**_kwargs(flax_cls, kwargs, **extra), rngs=rngs_ours)
    theirs = flax_cls(**_kwargs(flax_cls, kwargs, **extra), rngs=rngs_theirs)
    assert _flat_types(ours) == _flat_types(theirs)
    # exact by construction: the same initializers called with the same keys
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(ours)),
        nnx.to_pure_dict(nnx.state(theirs)),
    )
    for attr in ("scale", "bias"):
        assert (getattr(ours, attr) is None) == (getattr(theirs, attr) is None)
        if getattr(ours, attr) is not None:
            assert (
                getattr(ours, attr).get_metadata()["tag"]
                == getattr(theirs, attr).get_metadata()["tag"]
            )
    np.testing.assert_array_equal(
        jax.random.key_data(rngs_ours.params()), jax.random.key_data(rngs_theirs.params())
    )
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y, y_ref = ours(x), theirs(x)
    assert y.dtype == y_ref.dtype
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_batchnorm_bfloat16_without_params_has_flax_output_dtype(rng):
    """flax.nnx promotes the input with the float32 running statistics: output float32, as here."""
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.bfloat16)
    ours = jaxbn.nnx.BatchNorm(3, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(3, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
    assert ours(x).dtype == theirs(x).dtype == jnp.float32
    assert jaxbn.nnx.BatchNorm(3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x).dtype == jnp.bfloat16


@pytest.mark.slow  # ~9 s of eager calls
def test_custom_promote_dtype_as_flax(rng):
    """A custom promote_dtype is applied as flax applies it; running statistics stay float32."""

    def to_bfloat16(args, dtype=None):
        return tuple(None if a is None else jnp.asarray(a, jnp.bfloat16) for a in args)

    x = jnp.asarray(rng.normal(size=(8, 4)) + 2, jnp.float32)
    for name in ("batch_nhwc", "layer", "rms"):
        ours_cls, flax_cls, kwargs, _ = CASES[name]
        kwargs = {**kwargs, "num_features": 4}
        ours = ours_cls(**kwargs, promote_dtype=to_bfloat16, rngs=nnx.Rngs(0))
        theirs = flax_cls(
            **kwargs, promote_dtype=to_bfloat16, use_fast_variance=False, rngs=nnx.Rngs(0)
        )
        y, y_ref = ours(x), theirs(x)
        assert y.dtype == y_ref.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=2e-2, atol=2e-2
        )
        for key, value in nnx.to_pure_dict(nnx.state(ours, nnx.BatchStat)).items():
            assert value.dtype == jnp.float32
            np.testing.assert_allclose(value, getattr(theirs, key)[...], rtol=1e-2, atol=1e-2)


@pytest.mark.slow  # ~6 s in x64 mode; test_linen.py's float64 param_dtype test stays
@pytest.mark.parametrize("cls", [jaxbn.nnx.BatchNorm, jaxbn.nnx.BatchRenorm])
def test_float64_param_dtype_keeps_float64_running_stats(cls, rng):
    """Under x64 a float64 param_dtype gives float64 mean/var (flax's nnx keeps float32 and casts
    each float64 update down, with a FutureWarning), exact against float64 NumPy and equal to
    flax's to float32 precision; bfloat16 and float32 param_dtypes keep flax's float32; without
    x64 float64 means float32. count stays float32."""
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(8, 3)) * 2 + 5, jnp.float64)
        ours = cls(3, momentum=0.8, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        theirs = nnx.BatchNorm(
            3, momentum=0.8, param_dtype=jnp.float64, use_fast_variance=False, rngs=nnx.Rngs(0)
        )
        assert ours.mean[...].dtype == ours.var[...].dtype == jnp.float64
        for _ in range(2):
            ours(x)
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", FutureWarning
                )  # flax: float64 scattered into float32
                theirs(x)
        assert ours.mean[...].dtype == ours.var[...].dtype == jnp.float64
        assert theirs.mean[...].dtype == jnp.float32
        mean, var = reference.batch_stats(x)
        np.testing.assert_allclose(ours.mean[...], 0.36 * mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ours.var[...], 0.64 + 0.36 * var, rtol=1e-12, atol=1e-12)
        for key in ("mean", "var"):
            np.testing.assert_allclose(
                getattr(ours, key)[...], getattr(theirs, key)[...], rtol=1e-6, atol=1e-6
            )
        ours.eval()
        theirs.eval()
        y = ours(x)
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(
            y, reference.normalize(x, 0.36 * mean, 0.64 + 0.36 * var), rtol=1e-10, atol=1e-10
        )
        for param_dtype in (jnp.bfloat16, jnp.float32):
            layer = cls(3, param_dtype=param_dtype, momentum=None, rngs=nnx.Rngs(0))
            layer(x)
            flax_layer = nnx.BatchNorm(3, param_dtype=param_dtype, rngs=nnx.Rngs(0))
            assert (
                layer.mean[...].dtype
                == layer.var[...].dtype
                == flax_layer.mean[...].dtype
                == jnp.float32
            )
            assert layer.count[...].dtype == jnp.float32
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # float64 requested without x64: JAX warns (for the params)
        layer = cls(3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert layer.mean[...].dtype == layer.var[...].dtype == jnp.float32


def test_complex_input(rng):
    """Complex input (float64 reference): complex mean, real variance E|x - mean|^2; the running
    mean turns complex. (flax's nnx.BatchNorm writes the complex mean into its float32 variable,
    dropping the imaginary part, which JAX warns will become an error, so it is not run here.)"""
    z = (rng.normal(size=(8, 3)) + 1j * rng.normal(size=(8, 3)) + (3 - 2j)).astype(np.complex64)
    bn = jaxbn.nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    z64 = z.astype(np.complex128)
    mean = z64.mean(0)
    var = np.mean(np.abs(z64 - mean) ** 2, 0)
    y = bn(z)
    assert y.dtype == jnp.complex64
    np.testing.assert_allclose(y, (z64 - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    assert bn.mean[...].dtype == jnp.complex64 and bn.var[...].dtype == jnp.float32
    np.testing.assert_allclose(bn.mean[...], 0.5 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.5 + 0.5 * var, rtol=1e-5)
    bn.eval()
    np.testing.assert_allclose(
        bn(z), (z64 - 0.5 * mean) / np.sqrt(0.5 + 0.5 * var + 1e-5), rtol=1e-5
    )
    layer = jaxbn.nnx.LayerNorm(3, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        layer(z),
        nnx.LayerNorm(3, use_fast_variance=False, rngs=nnx.Rngs(0))(z),
        rtol=1e-5,
        atol=1e-5,
    )


def test_view_info_describes_use_running_average_as_flax():
    """nnx.view_info reads set_view's Args section: jaxbn's BatchNorm documents it as flax's does."""
    model = nnx.Sequential(
        jaxbn.nnx.BatchNorm(2, rngs=nnx.Rngs(0)), nnx.BatchNorm(2, rngs=nnx.Rngs(0))
    )
    info = nnx.view_info(model)
    assert info.count("use_running_average") == 2, info


def test_batchnorm_mode_switches_as_flax(rng):
    """use_running_average from the constructor, the call, .train()/.eval() and nnx.view."""
    x = jnp.asarray(rng.normal(size=(6, 2)) + 4, jnp.float32)

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.bn = jaxbn.nnx.BatchNorm(2, use_running_average=True, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, deterministic=True)

    block = Block(nnx.Rngs(0))
    np.testing.assert_allclose(
        block.bn(x), x / np.sqrt(1 + 1e-5), rtol=1e-6
    )  # eval: nothing updated
    np.testing.assert_array_equal(
        block.bn.mean[...], np.zeros(2)
    )  # exact here and below: the zeros, not written
    block.train()
    assert block.bn.use_running_average is False and block.dropout.deterministic is False
    view = nnx.view(block, use_running_average=True)
    assert view.bn.use_running_average is True and block.bn.use_running_average is False
    view.bn(x)
    np.testing.assert_array_equal(block.bn.mean[...], np.zeros(2))
    block.bn(x, use_running_average=True)  # the call argument wins
    np.testing.assert_array_equal(block.bn.mean[...], np.zeros(2))
    block.bn(x)
    np.testing.assert_allclose(block.bn.mean[...], 0.01 * reference.batch_stats(x)[0], rtol=1e-5)
    none = jaxbn.nnx.BatchNorm(2, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_running_average"):
        none(x)


def test_batchnorm_options_beyond_flax(rng):
    """momentum=None (adds BatchStat count), unbiased_running_var, update_running_stats, mask."""
    batches = [np.asarray(rng.normal(size=(8, 3)) * (i + 1) + i, np.float32) for i in range(3)]
    cumulative = jaxbn.nnx.BatchNorm(3, momentum=None, unbiased_running_var=True, rngs=nnx.Rngs(0))
    assert isinstance(cumulative.count, nnx.BatchStat)
    assert "count" not in nnx.to_pure_dict(nnx.state(jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))))
    for x in batches:
        cumulative(x)
    stats = [reference.batch_stats(x) for x in batches]
    np.testing.assert_allclose(
        cumulative.mean[...], np.mean([m for m, _ in stats], 0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        cumulative.var[...], np.mean([v * 8 / 7 for _, v in stats], 0), rtol=1e-5
    )
    assert cumulative.count[...] == 3  # exact: a float32 counter of small integers

    recalibrate = jaxbn.nnx.BatchNorm(
        3, use_running_average=True, update_running_stats=True, momentum=0.0, rngs=nnx.Rngs(0)
    )
    x = batches[1]
    np.testing.assert_allclose(
        recalibrate(x), x / np.sqrt(1 + 1e-5), rtol=1e-6
    )  # normalized with (0, 1) ...
    np.testing.assert_allclose(
        recalibrate.mean[...], stats[1][0], rtol=1e-5, atol=1e-6
    )  # ... and updated
    frozen = jaxbn.nnx.BatchNorm(3, update_running_stats=False, rngs=nnx.Rngs(0))
    frozen(x)
    np.testing.assert_array_equal(frozen.var[...], np.ones(3))  # exact by construction: not written

    masked = jaxbn.nnx.BatchNorm(3, momentum=0.0, rngs=nnx.Rngs(0))
    mask = (np.arange(8) < 5)[:, None]
    masked(x, mask=mask)
    mean, var = reference.batch_stats(x[:5])
    np.testing.assert_allclose(masked.mean[...], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(masked.var[...], var, rtol=1e-5)
    x_nan = x.copy()
    x_nan[0, 0] = np.nan
    masked(x_nan)  # a non-finite batch leaves the running statistics alone
    np.testing.assert_allclose(masked.mean[...], mean, rtol=1e-5, atol=1e-6)


def test_several_feature_axes_keep_flax_shapes(rng):
    """BatchNorm over axes (1, 2) keeps flax's (num_features,) variables; stats per (h, w) feature."""
    x = np.asarray(rng.normal(size=(5, 2, 3)) + 1, np.float32)
    bn = jaxbn.nnx.BatchNorm(6, axis=(1, 2), momentum=0.0, rngs=nnx.Rngs(0))
    y = bn(x)
    assert bn.mean[...].shape == (6,)
    flat = x.reshape(5, 6)
    np.testing.assert_allclose(bn.mean[...], flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        y.reshape(5, 6), reference.normalize(flat, *reference.batch_stats(flat)), atol=1e-5
    )


def _linen_steps(module, variables, batches, w):
    """jaxbn.linen training steps: outputs, grads (x, params), final variables."""

    def loss(params, x, batch_stats):
        y, updates = module.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(y) * w), (y, updates["batch_stats"])

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    params, batch_stats, results = variables["params"], variables["batch_stats"], []
    for x in batches:
        (dparams, dx), (y, batch_stats) = grad(params, x, batch_stats)
        results.append((y, dx, dparams))
    return results, batch_stats


@nnx.jit
def _nnx_grads(model, x, w):
    def loss(model, x):
        y = model(x)
        return jnp.sum(jnp.sin(y) * w), y

    (grads, dx), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return y, dx, grads


@pytest.mark.parametrize("kind", ["ghost", "renorm", "renorm_scheduled", "renorm_ghost"])
def test_ghost_batches_and_renorm_match_linen(kind, rng):
    """ghost_batch_size and BatchRenorm (fixed and scheduled limits) equal jaxbn.linen's modules
    over 3 steps (outputs, grads, running statistics, step counter); they share the functional core."""
    kwargs = dict(momentum=0.8, axis=1)
    if kind == "ghost":
        ours = jaxbn.nnx.BatchNorm(
            3, ghost_batch_size=2, **kwargs, **RANDOM_INITS, rngs=nnx.Rngs(0)
        )
        linen = jaxbn.linen.BatchNorm(ghost_batch_size=2, **kwargs)
    else:
        if kind == "renorm":
            limits = dict(r_max=1.5, d_max=0.5)
        elif kind == "renorm_ghost":
            limits = dict(r_max=1.5, d_max=0.5, ghost_batch_size=2)
        else:
            limits = dict(r_max=lambda s: 1.0 + 0.5 * s, d_max=lambda s: 0.25 * s)
        ours = jaxbn.nnx.BatchRenorm(3, **limits, **kwargs, **RANDOM_INITS, rngs=nnx.Rngs(0))
        linen = jaxbn.linen.BatchRenorm(**limits, **kwargs)
    shape = (6, 3, 2, 2)
    batches = [jnp.asarray(rng.normal(size=shape) * (2 + i) + 3 * i, jnp.float32) for i in range(3)]
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    state = nnx.to_pure_dict(nnx.state(ours))
    variables = {
        "params": {k: state[k] for k in ("scale", "bias")},
        "batch_stats": {k: v for k, v in state.items() if k not in ("scale", "bias")},
    }
    assert jax.tree.structure(variables) == jax.tree.structure(
        linen.init(jax.random.key(0), batches[0], use_running_average=False)
    )
    linen_out, linen_stats = _linen_steps(linen, variables, batches, w)
    tol = dict(rtol=1e-5, atol=1e-5)
    for x, (y_ref, dx_ref, dparams_ref) in zip(batches, linen_out):
        y, dx, grads = _nnx_grads(ours, x, w)
        _assert_close(
            (y, dx, nnx.to_pure_dict(grads)),
            (y_ref, dx_ref, dparams_ref),
            dict(rtol=1e-5, atol=1e-4),
        )
    final = nnx.to_pure_dict(nnx.state(ours, nnx.BatchStat))
    assert jax.tree.map(lambda a: a.dtype, final) == jax.tree.map(lambda a: a.dtype, linen_stats)
    _assert_close(final, linen_stats, tol)
    if kind == "renorm_scheduled":
        assert int(ours.steps[...]) == 3 and isinstance(ours.steps, nnx.BatchStat)
    if kind == "ghost":  # each pair of examples normalized on its own (float64)
        x = np.asarray(batches[-1])
        scale, bias = (np.asarray(variables["params"][k]) for k in ("scale", "bias"))
        for start in range(0, 6, 2):
            group = x[start : start + 2]
            np.testing.assert_allclose(
                linen_out[-1][0][start : start + 2],
                reference.normalize(group, *reference.batch_stats(group, 1), scale, bias, 1),
                **tol,
            )


def test_batch_renorm_without_clipping_room_is_batch_norm(rng):
    """r_max=1, d_max=0 is BatchNorm; BatchNorm's state loads into BatchRenorm (same variables)."""
    x = jnp.asarray(rng.normal(size=(8, 3)) * 3 + 1, jnp.float32)
    bn = jaxbn.nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    brn = jaxbn.nnx.BatchRenorm(3, momentum=0.5, r_max=1.0, d_max=0.0, rngs=nnx.Rngs(0))
    assert _flat_types(bn) == _flat_types(brn)
    tol = dict(rtol=1e-6, atol=1e-6)  # one formula, but its kernel may round in another order
    for _ in range(2):
        np.testing.assert_allclose(brn(x), bn(x), **tol)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **tol),
        nnx.to_pure_dict(nnx.state(brn)),
        nnx.to_pure_dict(nnx.state(bn)),
    )
    with pytest.raises(ValueError, match="r_max must be a real scalar >= 1"):
        jaxbn.nnx.BatchRenorm(3, r_max=0.5, rngs=nnx.Rngs(0))


# --- the cases users report broken in flax ---------------------------------------------------


@pytest.mark.slow  # ~14 s; test_vmap_closure_in_training_says_what_to_do runs nnx.vmap in training
def test_vmap_called_twice_in_training(rng):
    """flax#4760: nnx.vmap over a BatchNorm in training, twice (and under nnx.jit).

    The running statistics are broadcast (``StateAxes`` None) and synchronized
    over the vmapped axis by ``axis_name``, so every call equals BatchNorm on the
    whole batch; an ensemble (``StateAxes`` 0) keeps one set per member.
    """
    data = jnp.asarray(rng.normal(size=(5, 6, 4)) * 2 + 3, jnp.float32)  # vmapped over axis 1
    state_axes = nnx.StateAxes({(nnx.Param, nnx.BatchStat): None})
    vmapped = nnx.vmap(lambda m, x: m(x), in_axes=(state_axes, 1), out_axes=1, axis_name="batch")
    synced = jaxbn.nnx.BatchNorm(4, momentum=0.5, axis_name="batch", rngs=nnx.Rngs(0))
    jitted = jaxbn.nnx.BatchNorm(4, momentum=0.5, axis_name="batch", rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(
        4, momentum=0.5, axis_name="batch", use_fast_variance=False, rngs=nnx.Rngs(0)
    )
    single = jaxbn.nnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))
    jit_vmapped = nnx.jit(vmapped)
    for _ in range(2):
        y, y_jit, y_ref = vmapped(synced, data), jit_vmapped(jitted, data), vmapped(theirs, data)
        y_single = single(data.reshape(-1, 4)).reshape(data.shape)
        for out in (y, y_jit, y_ref):
            np.testing.assert_allclose(out, y_single, rtol=1e-5, atol=1e-5)
        for module in (synced, jitted, theirs):
            np.testing.assert_allclose(module.mean[...], single.mean[...], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(module.var[...], single.var[...], rtol=1e-5)
    mean, var = reference.batch_stats(data.reshape(-1, 4))
    np.testing.assert_allclose(single.mean[...], 0.75 * mean, rtol=1e-5)
    np.testing.assert_allclose(single.var[...], 0.25 + 0.75 * var, rtol=1e-5)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=0, out_axes=0)
    def ensemble(rngs):
        return jaxbn.nnx.BatchNorm(4, momentum=0.5, rngs=rngs)

    members = ensemble(nnx.Rngs(0))
    assert members.mean[...].shape == (3, 4)
    per_member = nnx.vmap(lambda m, x: m(x), in_axes=(0, 0), out_axes=0)
    xs = jnp.asarray(rng.normal(size=(3, 6, 4)) + np.arange(3)[:, None, None], jnp.float32)
    for _ in range(2):
        per_member(members, xs)
    for i in range(3):
        mean_i = reference.batch_stats(xs[i])[0]
        np.testing.assert_allclose(members.mean[...][i], 0.75 * mean_i, rtol=1e-5, atol=1e-6)


def test_eval_shape_gives_abstract_state():
    """flax#4734: nnx.eval_shape builds the module abstractly, and abstract calls leave it alone."""
    abstract = nnx.eval_shape(lambda: jaxbn.nnx.BatchNorm(4, momentum=None, rngs=nnx.Rngs(0)))
    flat = dict(nnx.to_flat_state(nnx.state(abstract)))
    assert sorted(path[-1] for path in flat) == ["bias", "count", "mean", "scale", "var"]
    for path, variable in flat.items():
        value = variable.get_value()
        assert isinstance(value, jax.ShapeDtypeStruct), (path, type(value))
        assert value.shape == ((4,) if path[-1] != "count" else ()) and value.dtype == jnp.float32
    flax_abstract = nnx.eval_shape(lambda: nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    ours_abstract = nnx.eval_shape(lambda: jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    assert jax.tree.map(
        lambda v: (v.shape, v.dtype), nnx.to_pure_dict(nnx.state(ours_abstract))
    ) == jax.tree.map(lambda v: (v.shape, v.dtype), nnx.to_pure_dict(nnx.state(flax_abstract)))
    bn = jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    out = nnx.eval_shape(lambda m, x: m(x), bn, jax.ShapeDtypeStruct((8, 4), jnp.bfloat16))
    assert out.shape == (8, 4) and out.dtype == jnp.float32
    assert isinstance(bn.mean[...], jax.Array)
    np.testing.assert_array_equal(bn.mean[...], np.zeros(4))  # exact by construction: not written
    bn(jnp.ones((8, 4)))  # still concrete and usable


# --- statistics across 8 devices ------------------------------------------------------------

needs_devices = pytest.mark.skipif(
    jax.device_count() < N_DEVICES,
    reason=f"needs {N_DEVICES} devices (conftest.py forces 8 CPU devices)",
)


@functools.cache
def _mesh():
    return jax.make_mesh((N_DEVICES,), ("i",))


@needs_devices
@pytest.mark.parametrize("cls", [jaxbn.nnx.BatchNorm, nnx.BatchNorm])
def test_shard_map_and_sharded_jit_equal_the_global_batch(cls, rng):
    """Statistics synchronized over the mesh axis (nnx.shard_map) and a P('i')-sharded batch under
    nnx.jit equal one device on the global batch: outputs, grads, running statistics."""
    mesh = _mesh()
    kwargs = dict(momentum=0.8, rngs=nnx.Rngs(0))
    if cls is nnx.BatchNorm:
        kwargs["use_fast_variance"] = False
    mapped = cls(3, axis_name="i", **kwargs)
    sharded = cls(3, **kwargs)
    single = jaxbn.nnx.BatchNorm(3, momentum=0.8, rngs=nnx.Rngs(0))
    w = jnp.asarray(rng.normal(size=(16, 2, 3)), jnp.float32)

    def loss(model, x, w):
        y = model(x)
        return jnp.sum(y * w), y

    grad_fn = nnx.grad(loss, argnums=(0, 1), has_aux=True)

    @nnx.shard_map(mesh=mesh, in_specs=(P(), P("i"), P("i")), out_specs=(P(), P("i"), P("i")))
    def local_grads(model, x, w):
        # the parameters are device-invariant inside the body, so their gradient is summed over devices
        (grads, dx), y = nnx.grad(lambda m, x: loss(m, x, w), argnums=(0, 1), has_aux=True)(
            model, x
        )
        return grads, dx, y

    step_mapped = nnx.jit(local_grads)
    step_sharded = nnx.jit(grad_fn)
    batch = NamedSharding(mesh, P("i"))
    for _ in range(2):
        x = jnp.asarray(rng.normal(size=(16, 2, 3)) * 3 + 2, jnp.float32)
        (g, dx), y = nnx.jit(grad_fn)(single, x, w)
        g_m, dx_m, y_m = step_mapped(mapped, jax.device_put(x, batch), jax.device_put(w, batch))
        (g_s, dx_s), y_s = step_sharded(sharded, jax.device_put(x, batch), jax.device_put(w, batch))
        assert y_s.sharding.spec[0] == "i"
        for out in ((g_m, dx_m, y_m), (g_s, dx_s, y_s)):
            _assert_close(nnx.to_pure_dict(out[0]), nnx.to_pure_dict(g), dict(rtol=1e-5, atol=1e-4))
            _assert_close(out[1:], (dx, y), dict(rtol=1e-5, atol=1e-5))
    for module in (mapped, sharded):
        _assert_close(
            nnx.to_pure_dict(nnx.state(module, nnx.BatchStat)),
            nnx.to_pure_dict(nnx.state(single, nnx.BatchStat)),
            dict(rtol=1e-5, atol=1e-6),
        )
    mean, var = reference.batch_stats(x)
    np.testing.assert_allclose(y, reference.normalize(x, mean, var), rtol=1e-5, atol=1e-5)


@needs_devices
@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "GroupNorm"])
def test_modules_under_set_mesh_with_sharded_batch_and_channels(name, rng):
    """Under jax.set_mesh (sharding in types) with x sharded over its batch and its channels, a
    module's training call under nnx.jit equals the unsharded call: y (sharded as x), and the
    running statistics (replicated, as created)."""
    mesh = jax.make_mesh((N_DEVICES // 2, 2), ("d", "m"))
    make = {
        "BatchNorm": lambda: jaxbn.nnx.BatchNorm(8, momentum=0.8, rngs=nnx.Rngs(0)),
        "LayerNorm": lambda: jaxbn.nnx.LayerNorm(8, rngs=nnx.Rngs(0)),
        "GroupNorm": lambda: jaxbn.nnx.GroupNorm(8, num_groups=4, rngs=nnx.Rngs(0)),
    }[name]
    x = jnp.asarray(rng.normal(size=(16, 3, 8)) * 3 + 2, jnp.float32)
    single = make()
    y = nnx.jit(lambda m, x: m(x))(single, x)
    with jax.set_mesh(mesh):
        sharded = make()
        sharding = NamedSharding(mesh, P("d", None, "m"))
        y_s = nnx.jit(lambda m, x: m(x))(sharded, jax.device_put(x, sharding))
    assert y_s.sharding.is_equivalent_to(sharding, y_s.ndim)
    np.testing.assert_allclose(y_s, y, rtol=1e-5, atol=1e-5)
    _assert_close(
        nnx.to_pure_dict(nnx.state(sharded, nnx.BatchStat)),
        nnx.to_pure_dict(nnx.state(single, nnx.BatchStat)),
        dict(rtol=1e-5, atol=1e-6),
    )
    for stat in jax.tree.leaves(nnx.state(sharded, nnx.BatchStat)):
        assert stat.sharding.is_fully_replicated


@needs_devices
def test_pmap_with_axis_index_groups(rng):
    """axis_index_groups reaches the statistics: each group of 4 devices normalizes its own half."""
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    bn = jaxbn.nnx.BatchNorm(
        3, momentum=0.0, axis_name="i", axis_index_groups=groups, rngs=nnx.Rngs(0)
    )
    graphdef, state = nnx.split(bn)

    def step(state, x):
        module = nnx.merge(graphdef, state)
        return module(x), nnx.state(module)

    x = np.asarray(rng.normal(size=(16, 3)) * 2 + np.repeat([[0.0], [5.0]], 8, 0), np.float32)
    y, new_state = jax.pmap(step, axis_name="i", in_axes=(None, 0))(
        state, x.reshape(N_DEVICES, 2, 3)
    )
    for half, devices in enumerate(groups):
        part = x[8 * half : 8 * half + 8]
        mean, var = reference.batch_stats(part)
        y_group = np.asarray(y)[devices].reshape(8, 3)
        np.testing.assert_allclose(y_group, reference.normalize(part, mean, var), atol=1e-5)
        for device in devices:
            np.testing.assert_allclose(new_state["mean"][...][device], mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(new_state["var"][...][device], var, rtol=1e-5)


# --- validation ------------------------------------------------------------------------------


def test_bad_arguments_raise_with_clear_messages():
    """Construction rejects bad hyperparameters; the first call rejects a feature-count mismatch."""
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="momentum must lie in"):
        jaxbn.nnx.BatchNorm(3, momentum=1.5, rngs=rngs)
    with pytest.raises(TypeError, match="momentum"):
        jaxbn.nnx.BatchNorm(3, momentum="0.9", rngs=rngs)
    for cls in (
        jaxbn.nnx.BatchNorm,
        jaxbn.nnx.LayerNorm,
        jaxbn.nnx.RMSNorm,
        jaxbn.nnx.InstanceNorm,
    ):
        with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
            cls(3, epsilon=0.0, rngs=rngs)
        with pytest.raises(ValueError, match="num_features must be a positive int"):
            cls(0, rngs=rngs)
        with pytest.raises(TypeError, match="num_features"):
            cls(3.0, rngs=rngs)
    with pytest.raises(ValueError, match="num_groups=4 does not divide the 6"):
        jaxbn.nnx.GroupNorm(6, num_groups=4, rngs=rngs)
    with pytest.raises(ValueError, match="exactly one of num_groups and group_size"):
        jaxbn.nnx.GroupNorm(6, num_groups=2, group_size=3, rngs=rngs)
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive int"):
        jaxbn.nnx.BatchNorm(3, ghost_batch_size=0, rngs=rngs)
    with pytest.raises(ValueError, match="ghost_batch_size=3 does not divide the batch size 8"):
        jaxbn.nnx.BatchNorm(3, ghost_batch_size=3, rngs=rngs)(jnp.ones((8, 3)))
    with pytest.raises(TypeError, match="unbiased_running_var"):
        jaxbn.nnx.BatchNorm(3, unbiased_running_var=1, rngs=rngs)
    with pytest.raises(
        ValueError, match=r"BatchNorm\(num_features=4\) got an input of shape \(8, 3\)"
    ):
        jaxbn.nnx.BatchNorm(4, rngs=rngs)(jnp.ones((8, 3)))
    with pytest.raises(ValueError, match=r"num_features=3\) got .* feature_axes=1"):
        jaxbn.nnx.InstanceNorm(3, feature_axes=1, rngs=rngs)(jnp.ones((2, 4, 5)))
    with pytest.raises(
        ValueError, match=r"GroupNorm\(num_features=6\) got .* 4 features along feature_axis=-1"
    ):
        jaxbn.nnx.GroupNorm(6, num_groups=2, use_scale=False, use_bias=False, rngs=rngs)(
            jnp.ones((2, 4))
        )
    with pytest.raises(ValueError, match="out of range"):
        jaxbn.nnx.BatchNorm(3, axis=2, rngs=rngs)(jnp.ones((8, 3)))
    with pytest.raises(TypeError, match="floating dtype"):
        jaxbn.nnx.LayerNorm(3, rngs=rngs)(jnp.ones((2, 3), jnp.int32))


def test_vmap_closure_in_training_says_what_to_do():
    """flax#4760's pattern (a training BatchNorm captured by nnx.vmap) raises with the fix in the message."""
    bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    x = jnp.arange(24.0).reshape(4, 2, 3)
    with pytest.raises(
        flax.errors.TraceContextError, match=r"captured as a closure.*nnx\.StateAxes"
    ):
        nnx.vmap(lambda x: bn(x))(x)
    # the advice works: statistics over the whole batch, state updated
    synced = jaxbn.nnx.BatchNorm(3, axis_name="batch", rngs=nnx.Rngs(0))
    f = nnx.vmap(lambda m, x: m(x), in_axes=(nnx.StateAxes({...: None}), 0), axis_name="batch")
    y = f(synced, x)
    reference = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(y.reshape(8, 3), reference(x.reshape(8, 3)), atol=1e-6)
    np.testing.assert_allclose(synced.mean[...], reference.mean[...], rtol=1e-6)


def test_per_example_vmap_with_one_value_per_feature():
    """flax's per-example pattern (state vmapped along with the examples): flax's outputs and running means."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 1, 3)))
    results = {}
    for name, cls in (("jaxbn", jaxbn.nnx.BatchNorm), ("flax", nnx.BatchNorm)):
        axes = nnx.StateAxes({nnx.BatchStat: 0, ...: None})
        bn = nnx.vmap(lambda _: cls(3, momentum=0.5, rngs=nnx.Rngs(0)), in_axes=0, out_axes=axes)(
            jnp.arange(5)
        )
        f = nnx.vmap(lambda m, x: m(x), in_axes=(axes, 0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", jaxbn.DegenerateBatchWarning)
            results[name] = (f(bn, x), bn.mean[...], bn.var[...])
    np.testing.assert_allclose(results["jaxbn"][0], results["flax"][0], atol=1e-6)
    np.testing.assert_allclose(
        results["jaxbn"][1], results["flax"][1], rtol=1e-6
    )  # the means move alike
    # exact by construction: jaxbn keeps the variance of a one-value batch; flax's go towards 0
    np.testing.assert_array_equal(results["jaxbn"][2], jnp.ones((5, 3)))


def test_tabulate_shows_no_helper_rows():
    """nnx.tabulate wraps every public method: jaxbn's modules expose none beyond flax's, so only the layers show."""

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.bn = jaxbn.nnx.BatchNorm(3, rngs=rngs)
            self.renorm = jaxbn.nnx.BatchRenorm(3, rngs=rngs)

        def __call__(self, x):
            return self.renorm(self.bn(x))

    table = nnx.tabulate(Model(nnx.Rngs(0)), jnp.ones((4, 3)), console_kwargs={"width": 300})
    assert "functional_call" not in table
    assert "bn" in table and "renorm" in table
