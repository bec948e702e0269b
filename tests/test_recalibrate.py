"""jaxbn.recalibrate: running statistics re-estimated from data, linen and nnx, against float64 and PyTorch."""

import functools
import io
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from tests.conftest import N_DEVICES, needs_devices

EPS = 1e-5


class LinenNet(nn.Module):
    """Dense -> BatchNorm -> relu -> Dense -> BatchNorm, in eval mode (the running statistics normalize)."""

    norm: type = jaxbn.linen.BatchNorm
    momentum: float | None = 0.9
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, mask=None):
        norm = functools.partial(
            self.norm, use_running_average=True, momentum=self.momentum, axis_name=self.axis_name
        )
        h = norm()(nn.Dense(5)(x), mask=mask)
        return norm()(nn.Dense(4)(nn.relu(h)), mask=mask)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.dense1, self.bn1 = nnx.Linear(3, 5, rngs=rngs), jaxbn.nnx.BatchNorm(5, rngs=rngs)
        self.dense2, self.bn2 = nnx.Linear(5, 4, rngs=rngs), jaxbn.nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.bn2(self.dense2(nnx.relu(self.bn1(self.dense1(x)))))


def _batches(rng, count=4, size=16):
    """Batches whose means differ, so the population variance is not the mean of the batch variances."""
    return [
        jnp.asarray(rng.normal(size=(size, 3)) * (1 + b) + 3 * b, jnp.float32) for b in range(count)
    ]


def _reference(batches, dense1, dense2, bn1=None, masks=None):
    """float64 population (count, mean, var) of both BatchNorms' inputs; the first normalized per batch
    with its batch statistics (or with ``bn1 = (mean, var)``, the running statistics)."""
    first, second = [], []
    for i, x in enumerate(batches):
        x = np.asarray(x, np.float64)
        valid = np.ones(len(x), bool) if masks is None else np.asarray(masks[i]).reshape(-1)
        h = x @ dense1[0] + dense1[1]
        mean, var = (h[valid].mean(0), h[valid].var(0)) if bn1 is None else bn1
        a = np.maximum((h - mean) / np.sqrt(var + EPS), 0)
        first.append(h[valid])
        second.append((a @ dense2[0] + dense2[1])[valid])
    return [(np.concatenate(v).mean(0), np.concatenate(v).var(0)) for v in (first, second)]


def _dense(params, name):
    return np.asarray(params[name]["kernel"], np.float64), np.asarray(
        params[name]["bias"], np.float64
    )


@pytest.mark.parametrize("norm", [jaxbn.linen.BatchNorm, nn.BatchNorm], ids=["jaxbn", "flax"])
def test_linen_population_statistics_equal_float64(norm, rng):
    batches = _batches(rng)
    model = LinenNet(norm=norm)
    variables = model.init(jax.random.key(0), batches[0])
    new = jaxbn.recalibrate(model, variables, batches, progress=False)
    assert jax.tree.structure(new) == jax.tree.structure(variables)
    expected = _reference(
        batches, _dense(variables["params"], "Dense_0"), _dense(variables["params"], "Dense_1")
    )
    for layer, (mean, var) in zip(("BatchNorm_0", "BatchNorm_1"), expected):
        np.testing.assert_allclose(new["batch_stats"][layer]["mean"], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(new["batch_stats"][layer]["var"], var, rtol=1e-5)
    assert new["params"] is variables["params"]


def test_normalizing_with_the_running_statistics(rng):
    """normalize_with='running': the second layer sees the first normalized by its (old) running statistics."""
    batches = _batches(rng)
    model = LinenNet()
    variables = model.init(jax.random.key(0), batches[0])
    new = jaxbn.recalibrate(model, variables, batches, normalize_with="running", progress=False)
    old = variables["batch_stats"]["BatchNorm_0"]
    expected = _reference(
        batches,
        _dense(variables["params"], "Dense_0"),
        _dense(variables["params"], "Dense_1"),
        bn1=(np.asarray(old["mean"]), np.asarray(old["var"])),
    )
    np.testing.assert_allclose(new["batch_stats"]["BatchNorm_1"]["var"], expected[1][1], rtol=1e-5)


def test_masks_count_only_valid_elements_and_cumulative_modules_get_a_count(rng):
    batches = _batches(rng)
    masks = [jnp.asarray(rng.uniform(size=(16, 1)) < 0.6) for _ in batches]
    model = LinenNet(momentum=None)
    variables = model.init(jax.random.key(0), batches[0])
    new = jaxbn.recalibrate(model, variables, list(zip(batches, masks)), progress=False)
    expected = _reference(
        batches,
        _dense(variables["params"], "Dense_0"),
        _dense(variables["params"], "Dense_1"),
        masks=masks,
    )
    np.testing.assert_allclose(new["batch_stats"]["BatchNorm_0"]["var"], expected[0][1], rtol=1e-5)
    np.testing.assert_allclose(
        new["batch_stats"]["BatchNorm_1"]["mean"], expected[1][0], rtol=1e-5, atol=1e-5
    )
    # exact by construction: the count is the number of batches, a small integer, written as a float
    assert float(new["batch_stats"]["BatchNorm_0"]["count"]) == len(batches)


@needs_devices
def test_a_sharded_batch_gives_the_statistics_of_one_device(rng):
    """Batches sharded over 8 devices, BatchNorms synchronized over an axis name: one device's statistics."""
    batches = _batches(rng, size=2 * N_DEVICES)
    model = LinenNet()
    variables = model.init(jax.random.key(0), batches[0])
    sharding = NamedSharding(jax.make_mesh((N_DEVICES,), ("data",)), P("data"))
    synchronized = LinenNet(axis_name="data")  # as a shard_map / pmap training step would build it
    sharded = jaxbn.recalibrate(
        synchronized, variables, [jax.device_put(b, sharding) for b in batches], progress=False
    )
    single = jaxbn.recalibrate(model, variables, batches, progress=False)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sharded, single
    )


def test_nnx_module_is_updated_in_place_and_matches_linen(rng):
    batches = _batches(rng)
    module = NnxNet(nnx.Rngs(0))
    module.eval()
    assert jaxbn.recalibrate(module, batches, progress=False) is module
    params = {
        name: {"kernel": getattr(module, name).kernel[...], "bias": getattr(module, name).bias[...]}
        for name in ("dense1", "dense2")
    }
    expected = _reference(batches, _dense(params, "dense1"), _dense(params, "dense2"))
    for bn, (mean, var) in zip((module.bn1, module.bn2), expected):
        np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.var[...], var, rtol=1e-5)
    assert not hasattr(module.bn1, "jaxbn_recalibrate")
    module(batches[0])  # the BatchNorms' own __call__ is back: inference with the new statistics


def test_mean_of_batches_matches_pytorch_update_bn(rng):
    """estimator='mean_of_batches' is torch.optim.swa_utils.update_bn's estimate, to 1e-5."""
    torch = pytest.importorskip("torch")
    batches = _batches(rng)
    model = LinenNet()
    variables = model.init(jax.random.key(0), batches[0])
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 5),
        torch.nn.BatchNorm1d(5),
        torch.nn.ReLU(),
        torch.nn.Linear(5, 4),
        torch.nn.BatchNorm1d(4),
    ).double()
    with torch.no_grad():
        for index, name in ((0, "Dense_0"), (3, "Dense_1")):
            net[index].weight.copy_(torch.tensor(np.asarray(variables["params"][name]["kernel"]).T))
            net[index].bias.copy_(torch.tensor(np.asarray(variables["params"][name]["bias"])))
    loader = [torch.tensor(np.asarray(b, np.float64)) for b in batches]
    torch.optim.swa_utils.update_bn(loader, net)
    new = jaxbn.recalibrate(model, variables, batches, estimator="mean_of_batches", progress=False)
    for index, layer in ((1, "BatchNorm_0"), (4, "BatchNorm_1")):
        np.testing.assert_allclose(
            new["batch_stats"][layer]["mean"], net[index].running_mean.numpy(), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            new["batch_stats"][layer]["var"], net[index].running_var.numpy(), rtol=1e-5
        )


def test_clear_errors():
    x = jnp.ones((4, 3))
    dense = nn.Dense(2)
    variables = {"params": dense.init(jax.random.key(0), x)["params"], "batch_stats": {}}
    with pytest.raises(ValueError, match="found no BatchNorm"):
        jaxbn.recalibrate(dense, variables, [x], progress=False)
    with pytest.raises(ValueError, match="normalize_with must be one of"):
        jaxbn.recalibrate(dense, variables, [x], normalize_with="train")
    with pytest.raises(ValueError, match="'batch_stats' collection"):
        jaxbn.recalibrate(dense, {"params": variables["params"]}, [x])
    with pytest.raises(TypeError, match="must be a flax.linen or flax.nnx module"):
        jaxbn.recalibrate(lambda x: x, [x])


def test_progress_bar_when_asked(rng, capsys):
    pytest.importorskip("tqdm")
    batches = _batches(rng)
    model = LinenNet()
    variables = model.init(jax.random.key(0), batches[0])
    quiet = jaxbn.recalibrate(model, variables, batches)  # not a terminal: no bar
    assert "recalibrate" not in capsys.readouterr().err
    shown = jaxbn.recalibrate(model, variables, batches, progress=True)
    assert "recalibrate" in capsys.readouterr().err
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), quiet, shown)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_default_progress_without_tqdm_on_a_terminal_shows_no_bar_and_does_not_fail(
    rng, monkeypatch
):
    """A plain install has no tqdm: on a terminal, the default (progress=None) runs without a bar; only an
    explicit progress=True asks for tqdm, with an ImportError that says how to get it."""
    batches = _batches(rng, count=8)  # more than 5: on a terminal the default would show a bar
    model = LinenNet()
    variables = model.init(jax.random.key(0), batches[0])
    expected = jaxbn.recalibrate(model, variables, batches, progress=False)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm / tqdm.auto raise ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    new = jaxbn.recalibrate(model, variables, batches)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), new, expected)
    assert terminal.getvalue() == ""
    module = NnxNet(nnx.Rngs(0))
    module.eval()
    assert jaxbn.recalibrate(module, batches) is module
    with pytest.raises(ImportError, match=r"progress=True\) needs tqdm: pip install tqdm"):
        jaxbn.recalibrate(model, variables, batches, progress=True)


def test_default_progress_without_stderr_does_not_fail(rng, monkeypatch):
    """Where there is no stderr (pythonw: sys.stderr is None), the default asks no terminal and runs."""
    batches = _batches(rng, count=8)
    model = LinenNet()
    variables = model.init(jax.random.key(0), batches[0])
    monkeypatch.setattr(sys, "stderr", None)
    new = jaxbn.recalibrate(model, variables, batches)
    monkeypatch.undo()
    expected = jaxbn.recalibrate(model, variables, batches, progress=False)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), new, expected)


@pytest.mark.parametrize("array", [jnp.ones, np.ones], ids=["jax", "numpy"])
def test_one_array_instead_of_an_iterable_of_batches_is_refused(array):
    """recalibrate(model, variables, x) would iterate over x's rows (ending in a shape error deep in flax, or
    silently in statistics of single rows): a TypeError asks for [x], linen and nnx."""
    x = array((16, 3), np.float32)
    model = LinenNet()
    variables = model.init(jax.random.key(0), x)
    message = r"batches must be an iterable of batches \(e\.g\. \[x\] or a data loader\), got one array .*\(16, 3\)"
    with pytest.raises(TypeError, match=message):
        jaxbn.recalibrate(model, variables, x, progress=False)
    module = NnxNet(nnx.Rngs(0))
    module.eval()
    before = np.asarray(module.bn1.mean[...])
    with pytest.raises(TypeError, match=message):
        jaxbn.recalibrate(module, x, progress=False)
    np.testing.assert_array_equal(
        module.bn1.mean[...], before
    )  # refused before anything ran: unchanged
    jaxbn.recalibrate(module, [x], progress=False)  # the fix the message names


def test_one_batch_of_arguments_instead_of_a_list_of_batches_is_refused():
    """recalibrate(model, variables, (x, mask)) would run x and then the mask as two batches: a tuple of
    arrays of different shapes or dtypes is refused with the fix ([(x, mask)]); a tuple of like batches
    is still a sequence of batches."""
    x = jnp.ones((16, 3), jnp.float32)
    mask = jnp.ones((16, 1), bool)
    model = LinenNet()
    variables = model.init(jax.random.key(0), x)
    message = r"batches is a tuple of arrays of different shapes or dtypes .*pass a list of batches, e\.g\. \[\(x, mask\)\]"
    with pytest.raises(TypeError, match=message):
        jaxbn.recalibrate(model, variables, (x, mask), progress=False)
    with pytest.raises(TypeError, match=message):
        jaxbn.recalibrate(NnxNet(nnx.Rngs(0)), (x, mask), progress=False)
    jaxbn.recalibrate(
        model, variables, (x, x + 1), progress=False
    )  # two batches of one shape: as before


def test_recalibrating_a_linen_model_twice_compiles_once(caplog):
    """The second call on the same model (new variables, same shapes) reuses the first call's compiled forward."""
    import logging

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jaxbn.linen.BatchNorm(use_running_average=True)(nn.Dense(4)(x))

    batches = [jnp.full((8, 3), float(i)) + jnp.arange(3.0) for i in range(3)]
    variables = Net().init(jax.random.key(0), batches[0])
    first = jaxbn.recalibrate(Net(), variables, batches, progress=False)
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            second = jaxbn.recalibrate(Net(), first, batches, progress=False)
    finally:
        jax.config.update("jax_log_compiles", previous)
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling ")]
    assert not [m for m in compiled if "layer_moments" in m], compiled
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), first, second)


def test_recalibrating_an_nnx_module_twice_compiles_once(caplog):
    """The second call on a module of the same structure reuses the first call's compiled forward."""
    import logging

    class Net(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
            self.bn = jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.bn(self.dense(x))

    batches = [jnp.full((8, 3), float(i)) + jnp.arange(3.0) for i in range(3)]
    first = jaxbn.recalibrate(Net(), batches, progress=False)
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            second = jaxbn.recalibrate(Net(), batches, progress=False)
    finally:
        jax.config.update("jax_log_compiles", previous)
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling ")]
    assert not [m for m in compiled if "forward" in m], compiled
    np.testing.assert_allclose(second.bn.mean[...], first.bn.mean[...], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(second.bn.var[...], first.bn.var[...], rtol=1e-6, atol=1e-6)


def test_two_tools_run_concurrently_in_threads(rng):
    """recalibrate and fold_batch_norm on nnx modules in two threads, both inside their traced forward
    passes at once (each waits there for the other), give what each gives alone: neither edits a class."""
    import threading

    inside = {"recalibrate": threading.Event(), "fold": threading.Event()}

    class Gated(NnxNet):
        def __init__(self, tool, rngs):
            super().__init__(rngs)
            self.tool = tool

        def __call__(self, x):
            h = self.bn1(self.dense1(x))
            inside[self.tool].set()  # both threads between their BatchNorm calls
            other = inside["fold" if self.tool == "recalibrate" else "recalibrate"]
            assert other.wait(timeout=300), "the other thread never reached its forward pass"
            return self.bn2(self.dense2(nnx.relu(h)))

    batches = _batches(rng)
    alone = jaxbn.recalibrate(NnxNet(nnx.Rngs(0)), batches, progress=False)
    unfolded, gated = NnxNet(nnx.Rngs(1)), Gated("fold", nnx.Rngs(1))
    unfolded.eval()
    gated.eval()
    folded_alone = jaxbn.fold_batch_norm(unfolded, batches[0])
    results, errors = {}, []

    def run(tool, work):
        try:
            results[tool] = work()
        except BaseException as err:  # reported below, with the thread's traceback
            errors.append(err)
            inside[tool].set()

    threads = [
        threading.Thread(
            target=run,
            args=(
                "recalibrate",
                lambda: jaxbn.recalibrate(
                    Gated("recalibrate", nnx.Rngs(0)), batches, progress=False
                ),
            ),
        ),
        threading.Thread(
            target=run, args=("fold", lambda: jaxbn.fold_batch_norm(gated, batches[0]))
        ),
    ]
    call = jaxbn.nnx.BatchNorm.__call__
    threads[1].start()  # fold first: inside its forward pass, it waits for recalibrate's
    assert inside["fold"].wait(timeout=300)
    threads[0].start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    for name in ("bn1", "bn2"):
        for stat in ("mean", "var"):
            np.testing.assert_allclose(
                getattr(getattr(results["recalibrate"], name), stat)[...],
                getattr(getattr(alone, name), stat)[...],
                rtol=1e-6,
                atol=1e-6,
            )
    folded = results["fold"]
    for name in ("bn1", "bn2"):
        assert (
            type(getattr(folded, name)).__name__
            == type(getattr(folded_alone, name)).__name__
            == "FoldedBatchNorm"
        )
    for x in batches:
        np.testing.assert_allclose(
            NnxNet.__call__(folded, x), folded_alone(x), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(folded_alone(x), unfolded(x), rtol=1e-4, atol=1e-4)
    assert (
        type(alone.bn1) is jaxbn.nnx.BatchNorm and jaxbn.nnx.BatchNorm.__call__ is call
    )  # nothing edited
