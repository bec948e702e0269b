"""jaxbn.inspect: each BatchNorm's batch statistics against its running statistics, linen and nnx."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from jaxbn.inspect import inspect_batch_norms, plot


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        # the last feature of the Dense is dead: zero kernel column and bias
        dense = nn.Dense(4, kernel_init=lambda key, shape, dtype: jax.random.normal(key, shape).at[:, -1].set(0))
        h = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.0)(dense(x))
        return jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.0)(nn.Dense(3)(nn.relu(h)))


def test_linen_reports_match_float64_and_flag_drift_and_dead_features(rng):
    x = jnp.asarray(rng.normal(size=(64, 2)) * 2 + 1, jnp.float32)
    model = Net()
    variables = model.init(jax.random.key(0), x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])  # momentum 0: x's statistics
    variables = {**variables, **updates}
    first, second = inspect_batch_norms(model, variables, x)
    assert first.path == ("BatchNorm_0",) and second.path == ("BatchNorm_1",)
    h = np.asarray(x, np.float64) @ np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
    np.testing.assert_allclose(first.batch_mean, h.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(first.batch_var, h.var(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(first.count, [64] * 4)
    assert first.drift < 1e-3 and second.drift < 1e-3  # the running statistics are this batch's
    assert first.dead_features == 1
    (shifted, _) = inspect_batch_norms(model, variables, x + 5.0)
    assert shifted.drift > 1.0


def test_nnx_reports_and_the_plot(rng, tmp_path):
    x = jnp.asarray(rng.normal(size=(32, 3)) + 4, jnp.float32)
    model = nnx.Sequential(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), jaxbn.nnx.BatchNorm(5, momentum=0.0, rngs=nnx.Rngs(0)))
    model(x)  # training: momentum 0 takes this batch's statistics
    model.eval()
    (report,) = inspect_batch_norms(model, x, normalize_with="batch")
    assert report.drift < 1e-3 and report.dead_features == 0
    np.testing.assert_allclose(report.running_mean, model.layers[1].mean[...], rtol=1e-6)
    pytest.importorskip("matplotlib")
    figure = plot([report, report._replace(path=("other",), drift=2.0)], str(tmp_path / "drift.png"))
    assert (tmp_path / "drift.png").stat().st_size > 0 and len(figure.axes) == 2


def test_errors():
    dense = nn.Dense(2)
    x = jnp.ones((4, 3))
    variables = {"params": dense.init(jax.random.key(0), x)["params"], "batch_stats": {}}
    with pytest.raises(ValueError, match="found no BatchNorm"):
        inspect_batch_norms(dense, variables, x)
    with pytest.raises(ValueError, match="normalize_with must be one of"):
        inspect_batch_norms(dense, variables, x, normalize_with="train")
    with pytest.raises(TypeError, match="must be a flax.linen or flax.nnx module"):
        inspect_batch_norms(object(), x)
