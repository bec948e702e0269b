"""jaxbn.interop.torch: PyTorch state dicts <-> Flax variables, on a small torchvision-style ResNet.

The same ResNet (conv-bn-relu stem, two BasicBlocks, the second with a
stride-2 conv+bn downsample, global average pool, linear) is built in PyTorch
(NCHW) and in Flax linen with jaxbn's BatchNorm (NHWC). After converting, the
two must compute the same in eval mode and train to the same running
statistics; conversions must round-trip exactly (they copy and transpose values, never compute them, so
exact comparisons of converted values are exact by construction; what was computed is compared to rounding).
"""

import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxbn.interop import torch as interop  # noqa: E402
from jaxbn.linen import BatchNorm  # noqa: E402

LR = 0.1
N_CLASSES = 10


# --------------------------------------------------------------------------- the models


class TorchBasicBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride, momentum):
        super().__init__()
        bn = lambda c: torch.nn.BatchNorm2d(c, momentum=momentum)  # noqa: E731
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class TorchResNet(torch.nn.Module):
    def __init__(self, momentum=0.1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8, momentum=momentum)
        self.relu = torch.nn.ReLU()
        self.layer1 = torch.nn.Sequential(TorchBasicBlock(8, 8, 1, momentum))
        self.layer2 = torch.nn.Sequential(TorchBasicBlock(8, 16, 2, momentum))
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, N_CLASSES)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _conv(features, kernel, stride, name):
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=[(pad, pad)] * 2,
        use_bias=False,
        name=name,
    )


class FlaxBasicBlock(nn.Module):
    features: int
    stride: int
    downsample: bool
    bn: tuple  # jaxbn BatchNorm keyword arguments, as items

    @nn.compact
    def __call__(self, x, train):
        norm = lambda name: BatchNorm(use_running_average=not train, name=name, **dict(self.bn))  # noqa: E731
        identity = x
        if self.downsample:
            identity = norm("downsample_1")(_conv(self.features, 1, self.stride, "downsample_0")(x))
        y = nn.relu(norm("bn1")(_conv(self.features, 3, self.stride, "conv1")(x)))
        return nn.relu(norm("bn2")(_conv(self.features, 3, 1, "conv2")(y)) + identity)


class FlaxResNet(nn.Module):
    bn: tuple

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(
            BatchNorm(use_running_average=not train, name="bn1", **dict(self.bn))(
                _conv(8, 3, 1, "conv1")(x)
            )
        )
        x = FlaxBasicBlock(8, 1, False, self.bn, name="layer1_0")(x, train)
        x = FlaxBasicBlock(16, 2, True, self.bn, name="layer2_0")(x, train)
        return nn.Dense(N_CLASSES, name="fc")(x.mean((1, 2)))


def _models(momentum=0.1, seed=0):
    torch.manual_seed(seed)
    torch_model = TorchResNet(momentum)
    kwargs = interop.batch_norm_kwargs(torch_model.bn1)
    flax_model = FlaxResNet(tuple(sorted(kwargs.items())))
    return torch_model, flax_model, _init(flax_model)


@functools.lru_cache
def _init(flax_model):
    """The Flax variables' shapes and dtypes: a template without compiling the random initialisers."""
    return jax.eval_shape(flax_model.init, jax.random.key(0), jnp.zeros((2, 8, 8, 3)))


SCALES = np.array([2.0, 0.5, 1.0])[:, None, None]
OFFSETS = np.array([1.0, -2.0, 3.0])[:, None, None]


def _batches(rng, n=3):
    """Batches with per-channel offsets, so that the running statistics move visibly."""
    return [
        (
            (rng.normal(size=(8, 3, 8, 8)) * SCALES + OFFSETS).astype(np.float32),
            rng.integers(0, N_CLASSES, size=8),
        )
        for _ in range(n)
    ]


def _torch_train(model, batches):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(
            model(torch.from_numpy(x)), torch.from_numpy(y)
        ).backward()
        optimizer.step()


def _flax_train(model, variables, batches):
    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), updates["batch_stats"]

    @jax.jit
    def step(params, batch_stats, x, y):
        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
        return jax.tree.map(lambda p, g: p - LR * g, params, grads), batch_stats

    params, batch_stats = variables["params"], variables["batch_stats"]
    for x, y in batches:
        params, batch_stats = step(
            params, batch_stats, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(y)
        )
    return {"params": params, "batch_stats": batch_stats}


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, prefix + (key,)).items()}
    return {prefix: np.asarray(tree)}


def _max_diffs(ours, theirs):
    """(max abs diff, max rel diff) over all leaves of two trees with the same structure."""
    a, b = _flat(ours), _flat(theirs)
    assert a.keys() == b.keys()
    abs_diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    rel_diff = max(float(np.max(np.abs(a[k] - b[k]) / np.maximum(np.abs(b[k]), 1e-30))) for k in a)
    return abs_diff, rel_diff


def _assert_trees_close(ours, theirs, rtol, atol=0.0):
    a, b = _flat(ours), _flat(theirs)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg="/".join(key))


# --------------------------------------------------------------------------- ResNet


def test_resnet_eval_outputs_match_after_conversion(rng):
    torch_model, flax_model, template = _models()
    batches = _batches(rng, 4)
    _torch_train(torch_model, batches[:3])  # non-trivial weights and running statistics
    assert not torch.allclose(torch_model.layer2[0].downsample[1].running_var, torch.ones(16))
    variables = interop.torch_to_flax(torch_model.state_dict(), template)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, template)
    assert (
        "count" not in variables["batch_stats"]["bn1"]
    )  # num_batches_tracked dropped (momentum 0.1)

    x = batches[3][0]
    torch_model.eval()
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    got = np.asarray(flax_model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=False))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(expected)) > 0.1  # a non-trivial output

    result = interop.compare(
        torch_model, flax_model, variables, x, apply_kwargs={"train": False}, rtol=1e-5, atol=1e-6
    )
    assert result.ok and result.first_mismatch is None
    assert [name for name, _ in result.layer_diffs][:3] == ["conv1", "bn1", "layer1.0.conv1"]
    assert (
        len(result.layer_diffs) == 13
    )  # every conv (6), bn (6) and the linear, in execution order
    assert result.max_abs_diff == pytest.approx(np.max(np.abs(got - expected)), abs=1e-7)


def test_compare_names_the_first_mismatching_batchnorm(rng):
    torch_model, flax_model, template = _models()
    batches = _batches(rng, 2)
    _torch_train(torch_model, batches[:1])
    variables = interop.torch_to_flax(torch_model, template)
    stats = variables["batch_stats"]["layer2_0"]["bn1"]
    stats["var"] = stats["var"].at[3].multiply(1.5)  # one channel of one BatchNorm
    result = interop.compare(
        torch_model,
        flax_model,
        variables,
        batches[1][0],
        apply_kwargs={"train": False},
        raise_on_mismatch=False,
    )
    assert not result.ok
    assert result.first_mismatch.startswith("module 'layer2.0.bn1' (layer2_0/bn1)")
    assert result.state_mismatches == (result.state_mismatches[0],)
    assert (
        "layer2.0.bn1" in result.state_mismatches[0]
        and "batch_stats/layer2_0/bn1/var" in result.state_mismatches[0]
    )
    diffs = dict(result.layer_diffs)
    assert diffs["layer1.0.bn2"] < 1e-5 < diffs["layer2.0.bn1"]
    with pytest.raises(AssertionError, match=r"first mismatch: module 'layer2.0.bn1'"):
        interop.compare(
            torch_model, flax_model, variables, batches[1][0], apply_kwargs={"train": False}
        )
    # a plain apply function: no per-layer outputs, the state comparison still names it
    apply = lambda v, x: flax_model.apply(v, x, train=False)  # noqa: E731
    result = interop.compare(torch_model, apply, variables, batches[1][0], raise_on_mismatch=False)
    assert result.layer_diffs == () and "layer2.0.bn1" in result.first_mismatch
    # state mismatches are listed in the torch model's order, statistics and parameters alike
    conv = variables["params"]["layer2_0"]["conv2"]
    conv["kernel"] = conv["kernel"] + 0.01
    stats = variables["batch_stats"]["layer1_0"]["bn2"]
    stats["mean"] = stats["mean"] + 0.01
    result = interop.compare(torch_model, apply, variables, batches[1][0], raise_on_mismatch=False)
    assert [text.split(" (")[0] for text in result.state_mismatches] == [
        "module 'layer1.0.bn2'",
        "module 'layer2.0.bn1'",
        "module 'layer2.0.conv2'",
    ]
    assert result.first_mismatch == result.state_mismatches[0]


def test_compare_keeps_module_outputs_that_an_in_place_op_changes_later(rng):
    """A ReLU(inplace=True) after a BatchNorm (as in torchvision) overwrites its output: copied."""
    torch.manual_seed(0)
    relu = torch.nn.ReLU(inplace=True)
    torch_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), relu)
    model = nn.Sequential([nn.Dense(3), BatchNorm(use_running_average=True), nn.relu])
    x = rng.normal(size=(8, 4)).astype(np.float32)
    variables = interop.torch_to_flax(torch_model)
    result = interop.compare(torch_model, model, variables, x, raise_on_mismatch=False)
    assert result.ok, result
    assert [name for name, _ in result.layer_diffs] == ["0", "1"]


@pytest.mark.slow  # ~5 s; the eval-mode and round-trip conversions stay
@pytest.mark.parametrize("torch_momentum", [0.1, None], ids=["exponential", "cumulative"])
def test_three_training_steps_give_the_same_running_statistics(rng, torch_momentum):
    torch_model, flax_model, template = _models(momentum=torch_momentum)
    bn_kwargs = dict(flax_model.bn)
    assert bn_kwargs["momentum"] == (None if torch_momentum is None else pytest.approx(0.9))
    assert bn_kwargs["unbiased_running_var"] is True
    batches = _batches(rng, 5)
    _torch_train(torch_model, batches[:2])  # start from trained weights and statistics
    variables = before = interop.torch_to_flax(torch_model, template)
    if (
        torch_momentum is None
    ):  # exact: a count of batches (a small integer), converted from num_batches_tracked
        assert float(variables["batch_stats"]["layer2_0"]["downsample_1"]["count"]) == 2.0
    else:
        assert "count" not in variables["batch_stats"]["layer2_0"]["downsample_1"]

    _torch_train(torch_model, batches[2:])
    variables = _flax_train(flax_model, variables, batches[2:])
    expected = interop.torch_to_flax(torch_model, template)
    np.testing.assert_raises(
        AssertionError, _assert_trees_close, expected["batch_stats"], before["batch_stats"], 1e-2
    )  # the statistics moved
    _assert_trees_close(variables["batch_stats"], expected["batch_stats"], rtol=1e-5, atol=1e-6)
    _assert_trees_close(variables["params"], expected["params"], rtol=1e-4, atol=1e-6)
    if torch_momentum is None:  # exact: a count of batches, 2 + 1 + 1 + 1 in small integers
        assert float(variables["batch_stats"]["bn1"]["count"]) == 5.0
        back = interop.flax_to_torch(variables, torch_model)
        assert back["bn1.num_batches_tracked"].dtype == torch.int64
        assert int(back["bn1.num_batches_tracked"]) == 5


def test_round_trip_flax_torch_flax_is_exact(rng):
    torch_model, _, template = _models()
    variables = jax.tree.map(
        lambda v: jnp.asarray(rng.normal(size=v.shape).astype(np.float32)), template
    )
    state_dict = interop.flax_to_torch(variables, torch_model)
    assert list(state_dict) == list(torch_model.state_dict())
    torch_model.load_state_dict(state_dict)  # strict: every key, every shape
    again = interop.torch_to_flax(torch_model.state_dict(), template)
    a, b = _flat(again), _flat(variables)
    assert a.keys() == b.keys()
    for key in a:  # exact: the conversions copy and transpose, the same bits come back
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def test_round_trip_torch_flax_torch_state_dict_equal(rng):
    torch_model, _, template = _models()
    _torch_train(torch_model, _batches(rng, 3))
    original = torch_model.state_dict()
    variables = interop.torch_to_flax(original, template)
    fresh, _, _ = _models(seed=1)  # other weights: every value must come from the variables
    restored = interop.flax_to_torch(variables, fresh, num_batches_tracked=3)
    assert list(restored) == list(original)
    for key, value in original.items():
        assert isinstance(restored[key], torch.Tensor) and restored[key].dtype == value.dtype, key
        assert torch.equal(restored[key], value), key  # exact: copied and transposed, not computed
    # without num_batches_tracked the reference's counter is kept
    assert int(interop.flax_to_torch(variables, fresh)["bn1.num_batches_tracked"]) == 0
    # NumPy in, NumPy out
    as_numpy = interop.flax_to_torch(variables, {k: v.numpy() for k, v in original.items()})
    assert all(
        isinstance(v, np.ndarray) and np.array_equal(v, original[k].numpy())  # exact: copies
        for k, v in as_numpy.items()
    )


def test_numpy_reference_gets_a_0d_counter_from_count():
    bn = torch.nn.BatchNorm1d(3, momentum=None)  # cumulative: num_batches_tracked is kept as count
    variables = interop.torch_to_flax(bn)
    variables["batch_stats"]["count"] = jnp.float32(5.0)
    reference = {key: value.numpy() for key, value in bn.state_dict().items()}
    counter = interop.flax_to_torch(variables, reference)["num_batches_tracked"]
    assert counter.shape == () and counter.dtype == np.int64 and counter == 5  # exact: a count


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    "dims, groups",
    [(1, 1), (2, 1), (2, 2), (2, 4), (3, 1)],
    ids=["conv1d", "conv2d", "grouped", "depthwise", "conv3d"],
)
def test_conv_kernels_compute_the_same(rng, dims, groups):
    conv = [None, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d][dims](
        4, 8, 3, padding=1, groups=groups
    )
    variables = interop.torch_to_flax(conv.state_dict())  # the root module: path ()
    kernel = variables["params"]["kernel"]
    assert kernel.shape == (3,) * dims + (4 // groups, 8)
    x = rng.normal(size=(2, 4) + (5,) * dims).astype(np.float32)
    with torch.no_grad():
        expected = np.moveaxis(conv(torch.from_numpy(x)).numpy(), 1, -1)
    flax_conv = nn.Conv(8, (3,) * dims, padding=[(1, 1)] * dims, feature_group_count=groups)
    got = flax_conv.apply(variables, jnp.asarray(np.moveaxis(x, 1, -1)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    back = interop.flax_to_torch(variables, conv)
    assert all(
        torch.equal(back[k], v) for k, v in conv.state_dict().items()
    )  # exact: a round trip of copies


def test_linear_and_batchnorm1d(rng):
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3, eps=1e-3)).eval()
    model[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    model[1].running_var.copy_(torch.tensor([0.25, 4.0, 1.5]))
    variables = interop.torch_to_flax(model, name_map={"0": ("fc",), "1": "bn"})
    # exact: the kernel is the weight transposed, the same values
    np.testing.assert_array_equal(
        variables["params"]["fc"]["kernel"], model[0].weight.detach().numpy().T
    )

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return BatchNorm(
                use_running_average=True, name="bn", **interop.batch_norm_kwargs(model[1])
            )(nn.Dense(3, name="fc")(x))

    x = rng.normal(size=(4, 5)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        np.asarray(Model().apply(variables, jnp.asarray(x))), expected, rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------- names and errors


def test_default_prefix_rule_and_name_map():
    assert interop.default_prefix_rule("layer1.0.bn1") == ("layer1_0", "bn1")
    assert interop.default_prefix_rule("layer2.0.downsample.0") == ("layer2_0", "downsample_0")
    assert interop.default_prefix_rule("features.3") == ("features_3",)
    assert interop.default_prefix_rule("0.1") == ("layers_0_1",)
    state_dict = {
        "a.b.running_mean": np.zeros(2),
        "a.b.running_var": np.ones(2),
        "skip.weight": np.ones(3),
    }
    variables = interop.torch_to_flax(state_dict, name_map={"a.b": "x/y", "skip": None})
    assert set(variables["batch_stats"]["x"]["y"]) == {"mean", "var"} and "params" not in variables
    custom = interop.torch_to_flax(
        state_dict, name_map={"skip": None}, rule=lambda p: ("custom", p.replace(".", "-"))
    )
    assert set(custom["batch_stats"]["custom"]) == {"a-b"}


def test_errors_for_shapes(rng):
    torch_model, _, template = _models()
    state_dict = dict(torch_model.state_dict())
    state_dict["layer1.0.conv2.weight"] = torch.zeros(8, 8, 5, 5)
    message = (
        r"shape mismatch for 'layer1.0.conv2.weight': \(8, 8, 5, 5\) in torch is \(5, 5, 8, 8\) in Flax "
        r".*template's 'params/layer1_0/conv2/kernel' is \(3, 3, 8, 8\)"
    )
    with pytest.raises(ValueError, match=message):
        interop.torch_to_flax(state_dict, template)
    state_dict = dict(torch_model.state_dict())
    state_dict["bn1.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"shape mismatch for 'bn1.bias': \(7,\), expected \(8,\)"):
        interop.torch_to_flax(state_dict)
    with pytest.raises(ValueError, match=r"shape mismatch for 'w.weight': \(1, 1, 1, 1, 1, 1\)"):
        interop.torch_to_flax({"w.weight": np.zeros((1,) * 6)})
    variables = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), template)
    variables["params"]["fc"]["kernel"] = jnp.zeros((10, 16))  # torch's layout by mistake
    with pytest.raises(
        ValueError, match=r"shape mismatch for 'fc.weight'.*reference has \(10, 16\)"
    ):
        interop.flax_to_torch(variables, torch_model)


def test_errors_for_unknown_and_missing_keys():
    torch_model, _, template = _models()
    zeros = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), template)
    state_dict = dict(torch_model.state_dict())
    with pytest.raises(ValueError, match=r"unknown key 'bn1.gamma'"):
        interop.torch_to_flax({**state_dict, "bn1.gamma": torch.ones(8)}, template)
    extra = {**state_dict, "head.weight": torch.ones(2, 16)}
    message = (
        r"unknown key 'head.weight': it maps to 'params/head/kernel', which the template lacks"
    )
    with pytest.raises(ValueError, match=message):
        interop.torch_to_flax(extra, template)
    interop.torch_to_flax(extra, template, name_map={"head": None})  # dropped on request
    with pytest.raises(
        ValueError, match=r"unknown key 'conv1.weight': its module 'conv1' is not in name_map"
    ):
        interop.torch_to_flax(state_dict, template, name_map={"bn1": "bn1"}, rule=None)
    del state_dict["layer2.0.downsample.1.running_var"]
    with pytest.raises(ValueError, match=r"missing key 'layer2.0.downsample.1.running_var'"):
        interop.torch_to_flax(state_dict)
    state_dict = {k: v for k, v in torch_model.state_dict().items() if not k.startswith("fc.")}
    with pytest.raises(
        ValueError, match=r"missing keys: the template's 'params/fc/bias', 'params/fc/kernel'"
    ):
        interop.torch_to_flax(state_dict, template)
    variables = {
        "params": {**zeros["params"], "extra": {"kernel": jnp.ones((2, 2))}},
        "batch_stats": zeros["batch_stats"],
    }
    with pytest.raises(ValueError, match=r"unknown keys: 'params/extra/kernel' in variables"):
        interop.flax_to_torch(variables, torch_model)
    variables = {
        "params": {k: v for k, v in zeros["params"].items() if k != "fc"},
        "batch_stats": zeros["batch_stats"],
    }
    with pytest.raises(ValueError, match=r"missing key: 'fc.weight' needs 'params/fc/kernel'"):
        interop.flax_to_torch(variables, torch_model)
    with pytest.raises(TypeError, match=r"variables' 'params/conv1/kernel' is a ShapeDtypeStruct"):
        interop.flax_to_torch(template, torch_model)


def test_errors_for_inputs_that_are_not_state_dicts(tmp_path):
    for bad in ("model.pt", tmp_path / "model.pt", b"\x80\x04"):
        with pytest.raises(TypeError, match="never reads or unpickles files"):
            interop.torch_to_flax(bad)
    with pytest.raises(TypeError, match=r"entry 'bn.weight' is a list"):
        interop.torch_to_flax({"bn.weight": [1.0, 2.0]})
    with pytest.raises(TypeError, match="must be a mapping"):
        interop.torch_to_flax([("bn.weight", np.ones(2))])


def test_momentum_conversion_and_batch_norm_kwargs():
    # Exact by construction: host Python floats, 1 - m rounded to 15 significant digits and parsed (correctly
    # rounded, the same on every platform), so decimal momenta convert to the float of the decimal literal;
    # epsilon is passed through unchanged.
    assert interop.momentum_from_torch(0.1) == 0.9 and interop.momentum_to_torch(0.9) == 0.1
    assert interop.momentum_from_torch(0.0) == 1.0 and interop.momentum_to_torch(
        0.999
    ) == pytest.approx(1e-3)
    assert interop.momentum_from_torch(None) is None and interop.momentum_to_torch(None) is None
    assert interop.momentum_to_torch(interop.momentum_from_torch(0.25)) == 0.25
    for bad, error in (
        (1.5, ValueError),
        (-0.1, ValueError),
        (True, TypeError),
        ("0.1", TypeError),
    ):
        with pytest.raises(error, match="momentum"):
            interop.momentum_from_torch(bad)
    kwargs = interop.batch_norm_kwargs(
        torch.nn.BatchNorm3d(4, eps=1e-4, momentum=0.05, affine=False)
    )
    assert kwargs == {
        "momentum": pytest.approx(0.95),
        "epsilon": 1e-4,
        "unbiased_running_var": True,
        "use_scale": False,
        "use_bias": False,
    }
    BatchNorm(**kwargs)  # valid arguments of the module
    with pytest.raises(ValueError, match="track_running_stats=False"):
        interop.batch_norm_kwargs(torch.nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(TypeError, match="module must be a torch.nn.BatchNorm1d/2d/3d, got Linear"):
        interop.batch_norm_kwargs(torch.nn.Linear(2, 2))


@pytest.mark.slow  # a fresh interpreter
def test_importing_the_module_does_not_import_torch():
    code = "import sys, jaxbn.interop.torch; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"


def test_nnx_module_loads_a_torch_state_dict_and_exports_it_back(rng):
    """torch -> nnx in place: eval outputs equal; nnx -> torch: the state dict comes back equal."""
    import torch
    from flax import nnx

    import jaxbn.nnx
    from jaxbn.interop.torch import nnx_to_torch, torch_to_nnx

    torch.manual_seed(0)
    torch_model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
    )
    torch_model.train()
    for _ in range(3):  # non-trivial running statistics
        torch_model(torch.randn(4, 3, 6, 6) * 2 + 1)
    torch_model.eval()

    class Stem(nnx.Module):
        def __init__(self):
            self.layers = nnx.List(
                [
                    nnx.Conv(3, 8, (3, 3), padding=1, use_bias=False, rngs=nnx.Rngs(0)),
                    jaxbn.nnx.BatchNorm(8, use_running_average=True, rngs=nnx.Rngs(0)),
                ]
            )

        def __call__(self, x):
            return nnx.relu(self.layers[1](self.layers[0](x)))

    stem = Stem()
    name_map = {"0": "layers/0", "1": "layers/1"}
    assert torch_to_nnx(torch_model.state_dict(), stem, name_map=name_map) is stem
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    expected = torch_model(torch.tensor(x)).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(
        stem(jnp.asarray(x.transpose(0, 2, 3, 1))), expected, rtol=1e-5, atol=1e-6
    )
    back = nnx_to_torch(stem, torch_model, name_map=name_map)
    for (
        key,
        value,
    ) in torch_model.state_dict().items():  # exact: loaded and exported copies, not computed
        np.testing.assert_array_equal(np.asarray(back[key]), value.numpy(), err_msg=key)
