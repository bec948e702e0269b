"""jaxbn.fold_batch_norm: folded networks compute the unfolded ones, kernels match PyTorch's fusion."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from jaxbn.folding import FoldedBatchNorm, FoldedLinen, FoldedModel

LINEN_NORMS = {"jaxbn": jaxbn.linen.BatchNorm, "flax": nn.BatchNorm}
NNX_NORMS = {"jaxbn": jaxbn.nnx.BatchNorm, "flax": nnx.BatchNorm}
RTOL = 1e-5


def assert_close(folded, reference):
    """float32 agreement: rtol 1e-5, and an absolute floor of 1e-5 of the output's scale."""
    folded, reference = np.asarray(folded), np.asarray(reference)
    assert folded.shape == reference.shape and folded.dtype == reference.dtype == np.float32
    np.testing.assert_allclose(folded, reference, rtol=RTOL, atol=RTOL * np.abs(reference).max())


class LinenNet(nn.Module):
    """Conv (bias or not) -> BN -> relu -> grouped Conv -> BN -> relu -> depthwise Conv -> BN -> Dense -> BN."""

    norm: type = jaxbn.linen.BatchNorm
    conv_bias: bool = True
    folded: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(y):
            return (
                y
                if self.folded
                else self.norm(use_running_average=not train, momentum=0.5, epsilon=1e-3)(y)
            )

        x = nn.relu(bn(nn.Conv(8, (3, 3), use_bias=self.conv_bias or self.folded)(x)))
        x = nn.relu(
            bn(
                nn.Conv(12, (3, 3), feature_group_count=4, use_bias=self.conv_bias or self.folded)(
                    x
                )
            )
        )
        x = bn(
            nn.Conv(24, (3, 3), feature_group_count=12, padding="VALID", use_bias=self.folded)(x)
        )  # depthwise x2
        return bn(nn.Dense(5, use_bias=self.conv_bias or self.folded)(x.mean((1, 2))))


def randomize_linen(variables, rng):
    """Non-trivial running statistics and affine parameters (and biases), float32."""

    def draw(path, value):
        name = path[-1].key
        shape = value.shape
        if name == "var":
            return jnp.asarray(rng.uniform(0.2, 3.0, shape), jnp.float32)
        if name == "mean":
            return jnp.asarray(rng.normal(0.5, 1.0, shape), jnp.float32)
        if name == "scale":
            return jnp.asarray(
                rng.uniform(0.5, 2.0, shape) * rng.choice([-1, 1], shape), jnp.float32
            )
        if name == "bias":
            return jnp.asarray(rng.normal(0.0, 1.0, shape), jnp.float32)
        return value

    return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.mark.parametrize("norm,conv_bias", [("jaxbn", False), ("flax", True)])
def test_linen_folded_equals_unfolded(rng, norm, conv_bias):
    model = LinenNet(norm=LINEN_NORMS[norm], conv_bias=conv_bias)
    x = jnp.asarray(rng.normal(1.0, 2.0, (2, 7, 7, 6)), jnp.float32)
    variables = randomize_linen(model.init(jax.random.key(0), x), rng)
    folded = jaxbn.fold_batch_norm(model, variables, x, train=False)
    assert isinstance(folded, FoldedLinen) and isinstance(folded.model, FoldedModel)
    assert set(folded.variables) == {"params"}  # the batch_stats of the folded BatchNorms are gone
    assert sorted(folded.variables["params"]) == ["Conv_0", "Conv_1", "Conv_2", "Dense_0"]
    assert all(
        set(p) == {"kernel", "bias"} for p in folded.variables["params"].values()
    )  # bias-less got one
    reference = model.apply(variables, x, train=False)
    # the returned model runs the original code (Conv_2 keeps use_bias=False: the wrapper adds its bias)
    assert_close(folded.model.apply(folded.variables, x, train=False), reference)
    assert_close(jax.jit(lambda v, x: folded.model.apply(v, x))(folded.variables, x), reference)
    # the variables also fit a network built without the BatchNorms and with a bias on every folded layer
    assert_close(model.clone(folded=True).apply(folded.variables, x), reference)
    assert float(jnp.abs(reference).max()) > 1.0  # the BatchNorms did something
    # the input variables are untouched
    assert (
        variables["params"]["Conv_0"]["kernel"]
        is not folded.variables["params"]["Conv_0"]["kernel"]
    )
    assert "BatchNorm_0" in variables["params"]


class NNXNet(nnx.Module):
    def __init__(self, norm, conv_bias, rngs):
        bn = lambda n: norm(n, momentum=0.5, epsilon=1e-3, rngs=rngs)  # noqa: E731
        self.conv0 = nnx.Conv(6, 8, (3, 3), use_bias=conv_bias, rngs=rngs)
        self.bn0 = bn(8)
        self.blocks = nnx.List(
            [
                nnx.Conv(8, 12, (3, 3), feature_group_count=4, use_bias=conv_bias, rngs=rngs),
                bn(12),
                nnx.Conv(12, 24, (3, 3), feature_group_count=12, use_bias=False, rngs=rngs),
                bn(24),
            ]
        )
        self.head = nnx.Linear(24, 5, use_bias=conv_bias, rngs=rngs)
        self.bn_head = bn(5)

    def __call__(self, x):
        x = nnx.relu(self.bn0(self.conv0(x)))
        x = nnx.relu(self.blocks[1](self.blocks[0](x)))
        x = self.blocks[3](self.blocks[2](x))
        return self.bn_head(self.head(x.mean((1, 2))))


@pytest.mark.parametrize(
    "norm,conv_bias",
    [
        pytest.param("jaxbn", True, marks=pytest.mark.slow),  # ~7 s
        ("flax", False),
    ],
)
def test_nnx_folded_equals_unfolded(rng, norm, conv_bias):
    model = NNXNet(NNX_NORMS[norm], conv_bias, nnx.Rngs(0))
    x = jnp.asarray(rng.normal(2.0, 2.0, (4, 7, 7, 6)), jnp.float32)
    for step in range(3):  # training steps: running statistics far from (0, 1)
        model(x * (1 + 0.2 * step))
    for _, module in nnx.iter_modules(model):
        if isinstance(module, NNX_NORMS[norm]):
            module.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, module.scale.shape), jnp.float32)
            module.bias[...] = jnp.asarray(rng.normal(0.0, 1.0, module.bias.shape), jnp.float32)
    model.eval()
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    folded = jaxbn.fold_batch_norm(model, x)
    reference = model(x)
    assert_close(folded(x), reference)
    assert_close(nnx.jit(lambda m, x: m(x))(folded, x), reference)
    assert isinstance(folded.bn0, FoldedBatchNorm) and isinstance(folded.blocks[3], FoldedBatchNorm)
    state = nnx.to_pure_dict(nnx.state(folded))
    assert sorted(state) == ["blocks", "conv0", "head"] and sorted(state["blocks"]) == [0, 2]
    assert all(
        set(p) == {"kernel", "bias"}
        for p in (state["conv0"], state["head"], *state["blocks"].values())
    )
    # the module passed in is unchanged (exact: the same arrays, nothing recomputed)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), before)
    assert isinstance(model.bn0, NNX_NORMS[norm])


def _torch(a):
    return torch.from_numpy(np.array(a, np.float32))


@pytest.mark.parametrize("groups,conv_bias", [(1, True), (1, False), (3, True), (6, False)])
def test_conv_matches_pytorch_fusion(rng, groups, conv_bias):
    """The folded HWIO kernel and bias are torch's fuse_conv_bn_eval (OIHW) on the same weights."""
    cin, cout = 6, 12

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(
                cout, (3, 2), feature_group_count=groups, use_bias=conv_bias, padding="VALID"
            )(x)
            return jaxbn.linen.BatchNorm(use_running_average=True, epsilon=1e-3)(x)

    x = jnp.asarray(rng.normal(size=(2, 5, 5, cin)), jnp.float32)
    variables = randomize_linen(Net().init(jax.random.key(0), x), rng)
    params, stats = variables["params"], variables["batch_stats"]["BatchNorm_0"]
    kernel = params["Conv_0"]["kernel"]  # (H, W, I/groups, O)
    assert kernel.shape == (3, 2, cin // groups, cout)
    conv = torch.nn.Conv2d(cin, cout, (3, 2), groups=groups, bias=conv_bias)
    bn = torch.nn.BatchNorm2d(cout, eps=1e-3)
    with torch.no_grad():
        conv.weight.copy_(_torch(kernel).permute(3, 2, 0, 1))  # HWIO -> OIHW
        if conv_bias:
            conv.bias.copy_(_torch(params["Conv_0"]["bias"]))
        bn.weight.copy_(_torch(params["BatchNorm_0"]["scale"]))
        bn.bias.copy_(_torch(params["BatchNorm_0"]["bias"]))
        bn.running_mean.copy_(_torch(stats["mean"]))
        bn.running_var.copy_(_torch(stats["var"]))
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
    folded = jaxbn.fold_batch_norm(Net(), variables, x).variables["params"]["Conv_0"]
    expected_kernel = fused.weight.detach().permute(2, 3, 1, 0).numpy()  # OIHW -> HWIO
    np.testing.assert_allclose(folded["kernel"], expected_kernel, rtol=RTOL, atol=0)
    np.testing.assert_allclose(folded["bias"], fused.bias.detach().numpy(), rtol=RTOL, atol=1e-6)
    # and the torch network agrees with the folded jax one on the same input (NHWC <-> NCHW)
    with torch.no_grad():
        y_torch = fused(_torch(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    y_jax = Net().apply(variables, x)
    np.testing.assert_allclose(y_jax, y_torch, rtol=1e-4, atol=1e-4)


def test_dense_matches_pytorch_fusion(rng):
    model = nnx.Sequential(
        nnx.Linear(7, 4, rngs=nnx.Rngs(0)),
        nnx.BatchNorm(4, use_running_average=True, epsilon=1e-3, rngs=nnx.Rngs(0)),
    )
    linear, bn = model.layers
    bn.mean[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    bn.var[...] = jnp.asarray(rng.uniform(0.1, 4.0, 4), jnp.float32)
    bn.scale[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    bn.bias[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    linear.bias[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
    folded = jaxbn.fold_batch_norm(model, x)
    assert_close(folded(x), model(x))
    t_linear, t_bn = torch.nn.Linear(7, 4), torch.nn.BatchNorm1d(4, eps=1e-3)
    with torch.no_grad():
        t_linear.weight.copy_(_torch(linear.kernel[...]).T)  # (in, out) -> (out, in)
        t_linear.bias.copy_(_torch(linear.bias[...]))
        for name, value in (
            ("weight", bn.scale),
            ("bias", bn.bias),
            ("running_mean", bn.mean),
            ("running_var", bn.var),
        ):
            getattr(t_bn, name).copy_(_torch(value[...]))
    fused = torch.nn.utils.fusion.fuse_linear_bn_eval(t_linear.eval(), t_bn.eval())
    np.testing.assert_allclose(
        folded.layers[0].kernel[...], fused.weight.detach().numpy().T, rtol=RTOL, atol=0
    )
    np.testing.assert_allclose(
        folded.layers[0].bias[...], fused.bias.detach().numpy(), rtol=RTOL, atol=1e-6
    )


class TwoDense(nn.Module):
    """Dense -> BN -> relu -> Dense -> BN, with a train switch."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x)))
        return nn.BatchNorm(use_running_average=not train)(nn.Dense(3, name="out")(x))


def test_explicit_pairs_fold_only_those(rng):
    model = TwoDense()
    x = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    variables = randomize_linen(model.init(jax.random.key(0), x), rng)
    folded = jaxbn.fold_batch_norm(model, variables, x, pairs=[("out", "BatchNorm_1")])
    assert folded.model.batch_norms == (("BatchNorm_1",),) and folded.model.layers == (("out",),)
    out, kept = folded.variables["params"], folded.variables["batch_stats"]
    assert sorted(kept) == ["BatchNorm_0"] and "BatchNorm_1" not in out
    assert not np.allclose(out["out"]["kernel"], variables["params"]["out"]["kernel"], rtol=0.01)
    # exact: an unfolded layer's kernel is copied, not recomputed
    np.testing.assert_array_equal(
        out["Dense_0"]["kernel"], variables["params"]["Dense_0"]["kernel"]
    )
    assert_close(folded.model.apply(folded.variables, x), model.apply(variables, x))


# ---------------------------------------------------------------------------------------------- refusals


class ReluBetween(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jaxbn.linen.BatchNorm(use_running_average=True)(nn.relu(nn.Conv(4, (3, 3))(x)))


class AddOne(nn.Module):
    def __call__(self, x):
        return x + 1


class ModuleBetween(nn.Module):
    @nn.compact
    def __call__(self, x):
        # a deterministic Dropout returns its input itself: transparent, allowed
        x = nn.Dropout(0.5, deterministic=True)(nn.Dense(4)(x))
        return nn.BatchNorm(use_running_average=True)(AddOne()(x))


def _init(model, x):
    return model.init(jax.random.key(0), x)


def test_refuses_function_between():
    x = jnp.ones((1, 5, 5, 3))
    with pytest.raises(
        ValueError, match=r"BatchNorm 'BatchNorm_0' cannot be folded.*'Conv_0', is followed by code"
    ):
        jaxbn.fold_batch_norm(ReluBetween(), _init(ReluBetween(), x), x)


def test_refuses_module_between():
    x = jnp.ones((2, 3))
    with pytest.raises(
        ValueError, match=r"'BatchNorm_0' cannot be folded: its input is the output of 'AddOne_0'"
    ):
        jaxbn.fold_batch_norm(ModuleBetween(), _init(ModuleBetween(), x), x)


def test_refuses_pair_that_does_not_match(rng):
    model = TwoDense()
    x = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(
        ValueError,
        match=r"pairs: \('Dense_0', 'BatchNorm_1'\) does not match.*output of 'out' \(Dense\)",
    ):
        jaxbn.fold_batch_norm(model, variables, x, pairs=[("Dense_0", "BatchNorm_1")])
    with pytest.raises(ValueError, match=r"pairs: no module at 'Conv_9'"):
        jaxbn.fold_batch_norm(model, variables, x, pairs=[("Conv_9", "BatchNorm_0")])
    with pytest.raises(ValueError, match=r"'BatchNorm_0' is a BatchNorm, not a Conv/Dense"):
        jaxbn.fold_batch_norm(model, variables, x, pairs=[("BatchNorm_0", "BatchNorm_0")])
    with pytest.raises(TypeError, match="pairs"):
        jaxbn.fold_batch_norm(model, variables, x, pairs=["Conv_0"])


def test_refuses_nchw_batch_norm():
    class NCHW(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jaxbn.linen.BatchNorm(use_running_average=True, axis=1)(nn.Conv(4, (3, 3))(x))

    x = jnp.ones((1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"'BatchNorm_0' normalizes axis=1 .*NCHW"):
        jaxbn.fold_batch_norm(NCHW(), _init(NCHW(), x), x)
    model = nnx.Sequential(
        nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)),
        nnx.BatchNorm(4, axis=1, use_running_average=True, rngs=nnx.Rngs(0)),
    )
    with pytest.raises(ValueError, match=r"'layers/1' normalizes axis=1"):
        jaxbn.fold_batch_norm(model, jnp.ones((1, 4, 4, 3)))


def test_refuses_training_mode_and_bad_arguments():
    x = jnp.ones((2, 5))
    model = TwoDense()
    variables = _init(model, x)
    with pytest.raises(ValueError, match=r"'BatchNorm_0' is called in training mode"):
        jaxbn.fold_batch_norm(model, variables, x, train=True)
    nnx_model = nnx.Sequential(
        nnx.Linear(5, 3, rngs=nnx.Rngs(0)), jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    )
    with pytest.raises(ValueError, match=r"'layers/1' is called in training mode.*model.eval\(\)"):
        jaxbn.fold_batch_norm(nnx_model, x)  # a BatchNorm trains by default
    with pytest.raises(TypeError, match="model must be a flax.linen.Module"):
        jaxbn.fold_batch_norm(lambda x: x, x)
    with pytest.raises(TypeError, match="variables must be the model's variables"):
        jaxbn.fold_batch_norm(model, x, x)
    with pytest.raises(TypeError, match="sample input"):
        jaxbn.fold_batch_norm(model, variables)


def test_refuses_layer_output_used_elsewhere():
    class Residual(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 3, rngs=rngs)
            self.bn = nnx.BatchNorm(3, use_running_average=True, rngs=rngs)
            self.other = nnx.Linear(3, 3, rngs=rngs)

        def __call__(self, x):
            y = self.dense(x)
            return self.bn(y) + self.other(y)

    with pytest.raises(ValueError, match=r"output of 'dense' also feeds 'other'"):
        jaxbn.fold_batch_norm(Residual(nnx.Rngs(0)), jnp.ones((2, 3)))


# ------------------------------------------------------------------- uses of the layer output besides the BatchNorm


class LinenPlainUse(nn.Module):
    """Dense -> BN, and the Dense output used again by plain code (``use``: h -> what is added to bn(h))."""

    use: object = None

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        return nn.BatchNorm(use_running_average=True)(h) + self.use(h)


PLAIN_USES = {
    "residual": lambda h: h,  # the example: off by ~2.6 before the fix
    "times zero": lambda h: 0.0 * h,  # numerically nothing, still a use: refused (conservative)
    "inside jit": lambda h: jax.jit(jnp.tanh)(h),  # through a higher-order primitive (pjit)
    "inside custom_jvp": jax.nn.relu,
}


@pytest.mark.parametrize("use", PLAIN_USES)
def test_refuses_layer_output_used_by_plain_code_linen(rng, use):
    model = LinenPlainUse(use=PLAIN_USES[use])
    x = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    variables = randomize_linen(_init(model, x), rng)
    with pytest.raises(
        ValueError, match=r"output of 'Dense_0' is used besides BatchNorm 'BatchNorm_0' .*reaches"
    ):
        jaxbn.fold_batch_norm(model, variables, x)


@pytest.mark.parametrize("use", ["residual", "inside jit"])
def test_refuses_layer_output_used_by_plain_code_nnx(use):
    class Residual(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)

        def __call__(self, x):
            h = self.dense(x)
            return self.bn(h) + PLAIN_USES[use](h)

    with pytest.raises(
        ValueError, match=r"output of 'dense' is used besides BatchNorm 'bn' .*reaches"
    ):
        jaxbn.fold_batch_norm(Residual(nnx.Rngs(0)), jnp.ones((2, 3)))


def test_refuses_layer_output_written_to_nnx_state():
    class Keeps(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
            self.last = nnx.Variable(jnp.zeros((2, 4)))

        def __call__(self, x):
            h = self.dense(x)
            self.last[...] = h
            return self.bn(h)

    with pytest.raises(
        ValueError, match=r"output of 'dense' is used besides BatchNorm 'bn' .*or its state"
    ):
        jaxbn.fold_batch_norm(Keeps(nnx.Rngs(0)), jnp.ones((2, 3)))


class NormInChild(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.BatchNorm(use_running_average=True)(x))


class NoOtherUse(nn.Module):
    """Uses that do not count: dead code, a deterministic Dropout, a BatchNorm inside a child module."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        _unused = jnp.sin(h) * 2.0  # reaches no output
        h = nn.Dropout(0.5, deterministic=True)(h)  # returns h itself
        return NormInChild()(h)


def test_uses_that_do_not_reach_the_outputs_are_allowed(rng):
    model = NoOtherUse()
    x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    variables = randomize_linen(_init(model, x), rng)
    folded = jaxbn.fold_batch_norm(model, variables, x)
    assert folded.model.batch_norms == (("NormInChild_0", "BatchNorm_0"),)
    assert_close(folded.model.apply(folded.variables, x), model.apply(variables, x))


# ------------------------------------------------------------------- the linen folded model


class BiaslessResNetBlock(nn.Module):
    """The common pattern: convs built by ``partial(nn.Conv, use_bias=False)``, BatchNorm after each."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(jaxbn.linen.BatchNorm, use_running_average=not train, epsilon=1e-3)
        y = nn.relu(norm()(conv(8, (3, 3))(x)))
        y = norm()(conv(8, (3, 3))(y))
        return nn.relu(y + norm()(conv(8, (1, 1), name="proj")(x)))


def test_linen_folded_model_with_partial_convs_without_bias(rng):
    """The wrapper adds the folded biases of use_bias=False convs: the model's source is used unchanged."""
    model = BiaslessResNetBlock()
    x = jnp.asarray(rng.normal(1.0, 2.0, (2, 6, 6, 3)), jnp.float32)
    variables = flax.core.freeze(randomize_linen(model.init(jax.random.key(0), x), rng))
    folded = jaxbn.fold_batch_norm(model, variables, x, train=False)
    assert isinstance(folded.variables, flax.core.FrozenDict)
    assert sorted(folded.model.layers) == [("Conv_0",), ("Conv_1",), ("proj",)]
    assert all(set(p) == {"kernel", "bias"} for p in folded.variables["params"].values())
    reference = model.apply(variables, x, train=False)
    assert_close(folded.model.apply(folded.variables, x, train=False), reference)
    assert_close(folded.model.apply(folded.variables, x), reference)  # train defaults to False
    # the added biases matter: zeroing one (as flax does for a use_bias=False conv) changes the output
    params = flax.core.unfreeze(folded.variables["params"])
    params["proj"]["bias"] = jnp.zeros_like(params["proj"]["bias"])
    assert not np.allclose(
        folded.model.apply({"params": params}, x), reference, rtol=1e-3, atol=1e-3
    )


def test_folded_model_refuses_what_it_cannot_run_exactly(rng):
    model = BiaslessResNetBlock()
    x = jnp.asarray(rng.normal(size=(1, 4, 4, 3)), jnp.float32)
    variables = randomize_linen(model.init(jax.random.key(0), x), rng)
    folded = jaxbn.fold_batch_norm(model, variables, x)
    with pytest.raises(ValueError, match=r"BatchNorm 'BatchNorm_0' is folded .*training mode"):
        folded.model.apply(folded.variables, x, train=True)
    with pytest.raises(
        ValueError, match=r"lack params/Conv_0/bias, the folded bias .*not to the original ones"
    ):
        folded.model.apply(variables, x)  # the original variables: no bias on the bias-less conv
    with pytest.raises(ValueError, match=r"cannot init the folded bias of 'Conv_0'"):
        folded.model.init(jax.random.key(0), x)
    # layers with a bias of their own: the original variables are caught at the folded BatchNorm
    two = TwoDense()
    variables = _init(two, x[:, 0, 0])
    folded = jaxbn.fold_batch_norm(two, variables, x[:, 0, 0])
    with pytest.raises(
        ValueError, match=r"hold the batch_stats of BatchNorm 'BatchNorm_0', which is folded"
    ):
        folded.model.apply(variables, x[:, 0, 0])


def test_folded_model_runs_as_a_submodule(rng):
    """Paths are relative to the FoldedModel: inside a larger model its BatchNorms still fold, its biases still add."""
    model = BiaslessResNetBlock()
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
    variables = randomize_linen(model.init(jax.random.key(0), x), rng)
    folded = jaxbn.fold_batch_norm(model, variables, x)

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return 2.0 * folded.model.clone(parent=self, name="inner")(x)

    out = Outer().apply({"params": {"inner": folded.variables["params"]}}, x)
    assert_close(out, 2.0 * model.apply(variables, x))


# ------------------------------------------------------------------- what folding does not support


class Scanned(nn.Module):
    """Dense -> BN (foldable), then two scanned Dense -> BN blocks (not foldable: inside nn.scan)."""

    @nn.compact
    def __call__(self, x):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(4)(h))), None

        x = nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))
        scan = nn.scan(
            Block,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=2,
        )
        return scan(name="blocks")(x, None)[0]


def test_refuses_modules_inside_lifted_transforms(rng):
    model = Scanned()
    x = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    variables = randomize_linen(_init(model, x), rng)
    with pytest.raises(
        ValueError,
        match=r"'blocks/BatchNorm_0' \(BatchNorm\) runs inside a lifted transform .*"
        r"module at 'blocks' is wrapped in nn.scan",
    ):
        jaxbn.fold_batch_norm(model, variables, x)
    with pytest.raises(
        ValueError, match=r"'blocks/Dense_0' \(Dense\) runs inside a lifted transform"
    ):
        jaxbn.fold_batch_norm(model, variables, x, pairs=[("blocks/Dense_0", "blocks/BatchNorm_0")])
    # the BatchNorm outside the scan folds; the scanned ones run unchanged
    folded = jaxbn.fold_batch_norm(model, variables, x, pairs=[("Dense_0", "BatchNorm_0")])
    assert sorted(folded.variables["batch_stats"]) == ["blocks"]
    assert_close(folded.model.apply(folded.variables, x), model.apply(variables, x))


def test_refuses_a_model_that_cannot_be_traced():
    class PythonIf(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))
            return x if float(x.sum()) > 0 else -x

    x = jnp.ones((2, 3))
    with pytest.raises(
        ValueError, match=r"model: its forward pass cannot be traced .*ConcretizationTypeError"
    ):
        jaxbn.fold_batch_norm(PythonIf(), _init(PythonIf(), x), x)


def test_batch_norm_called_with_keyword_input(rng):
    """bn(x=h) pairs like bn(h); a residual on h is still refused."""

    class Keyword(nn.Module):
        residual: bool = False

        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4, use_bias=False)(x)
            return nn.BatchNorm(use_running_average=True)(x=h) + (h if self.residual else 0.0)

    x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    variables = randomize_linen(_init(Keyword(), x), rng)
    folded = jaxbn.fold_batch_norm(Keyword(), variables, x)
    assert_close(folded.model.apply(folded.variables, x), Keyword().apply(variables, x))
    with pytest.raises(
        ValueError, match=r"output of 'Dense_0' is used besides BatchNorm 'BatchNorm_0'"
    ):
        jaxbn.fold_batch_norm(Keyword(residual=True), variables, x)
