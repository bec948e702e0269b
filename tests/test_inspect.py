"""jaxbn.inspection: each BatchNorm's batch statistics against its running statistics, linen and nnx."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from jaxbn.inspection import LayerReport, inspect_batch_norms, plot


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        # the last feature of the Dense is dead: zero kernel column and bias
        dense = nn.Dense(
            4, kernel_init=lambda key, shape, dtype: jax.random.normal(key, shape).at[:, -1].set(0)
        )
        h = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.0)(dense(x))
        return jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.0)(
            nn.Dense(3)(nn.relu(h))
        )


def test_linen_reports_match_float64_and_flag_drift_and_dead_features(rng):
    x = jnp.asarray(rng.normal(size=(64, 2)) * 2 + 1, jnp.float32)
    model = Net()
    variables = model.init(jax.random.key(0), x)
    _, updates = model.apply(
        variables, x, train=True, mutable=["batch_stats"]
    )  # momentum 0: x's statistics
    variables = {**variables, **updates}
    first, second = inspect_batch_norms(model, variables, x)
    assert first.path == ("BatchNorm_0",) and second.path == ("BatchNorm_1",)
    h = np.asarray(x, np.float64) @ np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
    np.testing.assert_allclose(first.batch_mean, h.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(first.batch_var, h.var(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        first.count, [64] * 4
    )  # exact by construction: no mask, the batch size
    assert first.drift < 1e-3 and second.drift < 1e-3  # the running statistics are this batch's
    assert first.dead_features == 1
    (shifted, _) = inspect_batch_norms(model, variables, x + 5.0)
    assert shifted.drift > 1.0


def test_nnx_reports_and_the_plot(rng, tmp_path):
    x = jnp.asarray(rng.normal(size=(32, 3)) + 4, jnp.float32)
    model = nnx.Sequential(
        nnx.Linear(3, 5, rngs=nnx.Rngs(0)), jaxbn.nnx.BatchNorm(5, momentum=0.0, rngs=nnx.Rngs(0))
    )
    model(x)  # training: momentum 0 takes this batch's statistics
    model.eval()
    (report,) = inspect_batch_norms(model, x, normalize_with="batch")
    assert report.drift < 1e-3 and report.dead_features == 0
    np.testing.assert_allclose(report.running_mean, model.layers[1].mean[...], rtol=1e-6)
    pytest.importorskip("matplotlib")
    figure = plot(
        [report, report._replace(path=("other",), drift=2.0)], str(tmp_path / "drift.png")
    )
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


DEPTH = 12  # more than 10 layers: BatchNorm_10 sorts before BatchNorm_2 by name


class DeepNet(nn.Module):
    """A stem BatchNorm named "stem" (after every BatchNorm_i by name), then DEPTH BatchNorms named by flax."""

    @nn.compact
    def __call__(self, x):
        x = jaxbn.linen.BatchNorm(use_running_average=True, name="stem")(nn.Dense(4)(x))
        for _ in range(DEPTH):
            x = jaxbn.linen.BatchNorm(use_running_average=True)(nn.Dense(4)(x))
        return x


class DeepNnx(nnx.Module):
    def __init__(self, rngs):
        self.stem = jaxbn.nnx.BatchNorm(4, rngs=rngs)
        for i in range(DEPTH):
            setattr(self, f"bn_{i}", jaxbn.nnx.BatchNorm(4, rngs=rngs))

    def __call__(self, x):
        x = self.stem(x)
        for i in range(DEPTH):
            x = getattr(self, f"bn_{i}")(x)
        return x


def test_reports_come_in_the_order_the_batch_norms_are_first_called(rng):
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    reports = inspect_batch_norms(DeepNet(), DeepNet().init(jax.random.key(0), x), x)
    assert [report.path for report in reports] == [("stem",)] + [
        (f"BatchNorm_{i}",) for i in range(DEPTH)
    ]
    module = DeepNnx(nnx.Rngs(0))
    module.eval()
    reports = inspect_batch_norms(module, x)
    assert [report.path for report in reports] == [("stem",)] + [(f"bn_{i}",) for i in range(DEPTH)]


def _reports(names, dead=0):
    zeros = np.zeros(2)
    return [
        LayerReport(name, zeros, zeros, zeros, zeros, zeros, zeros, zeros, 0.5 * i, dead)
        for i, name in enumerate(names)
    ]


@pytest.mark.parametrize(
    "names",
    [
        [
            ("backbone", f"stage{i}", "block_1", "BatchNorm_1") for i in range(3)
        ],  # long names cut the labels off
        [("stem",)] + [(f"BatchNorm_{i}",) for i in range(DEPTH)],
        [("BatchNorm_0",)],
    ],
    ids=["long_names", "many_layers", "one_layer"],
)
def test_plot_labels_lie_inside_the_figure(names, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = plot(_reports(names), str(tmp_path / "drift.png"))
    assert (tmp_path / "drift.png").stat().st_size > 0
    FigureCanvasAgg(figure).draw()  # lays the figure out as saving it did
    renderer = figure.canvas.get_renderer()
    inside = figure.bbox
    labels = [axes.xaxis.label for axes in figure.axes] + [axes.yaxis.label for axes in figure.axes]
    labels += [
        label for axes in figure.axes for label in axes.get_yticklabels() + axes.get_xticklabels()
    ]
    shown = [label for label in labels if label.get_visible() and label.get_text()]
    assert {"drift (batch vs running)", "dead features", "/".join(names[-1])} <= {
        t.get_text() for t in shown
    }
    for label in shown:
        extent = label.get_window_extent(renderer)
        assert (
            extent.x0 >= inside.x0
            and extent.y0 >= inside.y0
            and extent.x1 <= inside.x1
            and extent.y1 <= inside.y1
        ), (label.get_text(), extent, inside)


def test_plot_says_when_there_are_no_dead_features():
    pytest.importorskip("matplotlib")
    names = [("stem",), ("BatchNorm_0",)]
    _, dead = plot(_reports(names)).axes
    assert [text.get_text() for text in dead.texts] == ["no dead features"] and not dead.patches
    _, dead = plot(_reports(names, dead=2)).axes
    assert not dead.texts and [bar.get_width() for bar in dead.patches] == [2, 2]  # integers, exact
