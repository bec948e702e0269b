"""Structure of the compiled batch norm: memory traffic, kernels, temp memory.

Speed is measured in benchmarks/, not here; these tests pin what the compiler
produces, which is stable across machines, so a regression fails CI. Traffic
is counted as in the performance issue: over the kernels of the compiled
program, the bytes of their operands and outputs, in units of S (the bytes of
the activation tensor). Floors: 3S train forward, 8S forward+backward, 2S
inference.

jaxbn compiles to 4S / 10S / 2S here, in float32 and bfloat16. The statistics
take two passes around an element of the batch, with no data-dependent control
flow: pass one sums x - K, pass two |x - mean|^2 and its scaled copy. XLA:CPU's
library reductions read x once per reduction, so pass two takes both of its sums
in one, over the deviations and their scaled copy stacked along an axis before
the last (two reductions read x three times, 5S / 11S: RESULTS.md, sixteenth);
the normalization reads x and writes y (2S). The backward adds 6S: dy read for the bias gradient's
sum, x and dy for the scale gradient's, and x and dy read with dx written.
(The replaced design, sums around the running mean re-taken in a `while` loop
while the shift was poor, compiled to 4S / 10S / 2S here too, with one loop per
layer.) flax's default compiles to 4S / 15S (float32) and 9S / 29S (bfloat16)
here: its float32 forward, one fused pass of E[x] and E[x^2] (inexact at large
offsets), moves what jaxbn's does; its forward+backward 5S (float32) and 19S
(bfloat16) more.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxbn
from jaxbn import stats
from tests import hlo
from tests.conftest import N_DEVICES, STRUCTURE_PINNED, needs_devices, structural

SHAPE = (32, 16, 16, 64)


def _programs(dtype, mask=None, shape=SHAPE):
    """jaxbn's training forward, forward+backward and inference, jitted and compiled."""
    return {mode: lowered.compile() for mode, lowered in _lowered(dtype, mask, shape).items()}


def _lowered(dtype, mask=None, shape=SHAPE):
    """jaxbn's training forward, forward+backward and inference, jitted and lowered; a ``mask`` is
    an argument of the training programs (XLA folds a constant one)."""
    params, state = jaxbn.batch_norm_init(shape[-1])
    masks = () if mask is None else (mask,)

    def forward(x, p, s, *mask):
        return jaxbn.batch_norm(x, p, s, training=True, dtype=dtype, mask=(*mask, None)[0])

    def forward_backward(x, p, s, dy, *mask):
        (y, new_state), vjp = jax.vjp(lambda x, p: forward(x, p, s, *mask), x, p)
        return y, new_state, vjp((dy, jax.tree_util.tree_map(jnp.zeros_like, new_state)))

    def inference(x, p, s):
        return jaxbn.batch_norm(x, p, s, training=False, dtype=dtype)[0]

    x = jnp.zeros(shape, dtype)
    return {
        "forward": jax.jit(forward).lower(x, params, state, *masks),
        "forward_backward": jax.jit(forward_backward).lower(x, params, state, x, *masks),
        "inference": jax.jit(inference).lower(x, params, state),
    }


def _flax_forward_backward(dtype, compiled=True):
    """flax.linen's BatchNorm training forward+backward, jitted and compiled (or lowered)."""
    module = nn.BatchNorm(use_running_average=False, dtype=dtype)
    variables = module.init(jax.random.key(0), jnp.zeros((2, *SHAPE[1:]), dtype))

    def forward_backward(x, p, s, dy):
        f = lambda x, p: module.apply({"params": p, "batch_stats": s}, x, mutable=["batch_stats"])
        (y, updates), vjp = jax.vjp(f, x, p)
        return y, updates, vjp((dy, jax.tree_util.tree_map(jnp.zeros_like, updates)))

    x = jnp.zeros(SHAPE, dtype)
    lowered = jax.jit(forward_backward).lower(x, variables["params"], variables["batch_stats"], x)
    return lowered.compile() if compiled else lowered


# (traffic in S, kernels) reached on XLA:CPU with jax 0.10; kernels include the
# small per-feature ones (the data shift and the scales of the two passes, the merge
# of the sums, the rsqrt, the guard, the state update): 14 / 18 with a stacked merge
# whose readers sliced it and a guard XLA split into three kernels, 12 / 16 with
# pass two's sums in two reductions (5S / 11S).
EXPECTED = {"forward": (4.0, 11), "forward_backward": (10.0, 15), "inference": (2.0, 2)}


@structural
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_traffic_and_kernels_are_pinned(dtype):
    """Traffic stays at 4S / 10S / 2S, with at most the pinned kernels."""
    size = np.prod(SHAPE) * jnp.dtype(dtype).itemsize
    for mode, compiled in _programs(dtype).items():
        traffic, kernels = hlo.memory_traffic(compiled.as_text())
        expected_traffic, expected_kernels = EXPECTED[mode]
        assert expected_traffic <= traffic / size <= expected_traffic + 0.05, (mode, traffic / size)
        assert kernels <= expected_kernels, (mode, kernels)


@structural
def test_float16_squares_take_one_sum():
    """No sum of float16 squares overflows float32, so pass two takes its plain sum alone (no
    scaled copy): forward 9S and forward+backward 21S, 2S less than with the copy. (XLA:CPU's
    library kernels take no float16, so x is read through a float32 copy, 2S per read: flax's
    float16 program moves 9S / 29S.)"""
    size = np.prod(SHAPE) * 2
    for mode, compiled in _programs(jnp.float16).items():
        traffic = hlo.memory_traffic(compiled.as_text())[0] / size
        expected = {"forward": 9, "forward_backward": 21, "inference": 2}[mode]
        assert expected <= traffic <= expected + 0.05, (mode, traffic)


@structural
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_layers_of_one_shape_move_what_each_moves_alone(dtype, masked):
    """Two training batch norms of one shape in one program (a model's layers) move twice what one
    moves, forward and forward+backward. The passes' power-of-two scales are scalar constants, the
    same in every layer of a shape: XLA:CPU merged their broadcasts across the layers and handed
    each library reduction the merged broadcast as a full-size float32 operand, written once per
    shape and read by every sum that scales (float32 forward: 16S for two layers, against 5S for
    one then), until each layer's scales passed its barrier with its x."""
    mask = jnp.arange(SHAPE[0]).reshape(-1, 1, 1, 1) < SHAPE[0] - 2 if masked else None
    params, state = jaxbn.batch_norm_init(SHAPE[-1])
    layer = lambda x, p: jaxbn.batch_norm(x, p, state, training=True, dtype=dtype, mask=mask)

    def forward_backward(*xs):
        out, vjp = jax.vjp(lambda p: [layer(x, p) for x in xs], params)
        return out, vjp([(x, jax.tree.map(jnp.zeros_like, state)) for x in xs])

    size = np.prod(SHAPE) * jnp.dtype(dtype).itemsize
    for fn in (lambda *xs: [layer(x, params) for x in xs], forward_backward):
        one, two = (
            hlo.memory_traffic(hlo.compiled_text(jax.jit(fn), *[jnp.zeros(SHAPE, dtype)] * n))[0]
            / size
            for n in (1, 2)
        )
        assert two <= 2 * one + 0.05, (one, two)


@pytest.mark.parametrize(
    "shape, rows",
    [
        ((64, 16, 16, 16), (64, 16, 2, 128)),  # 16 features: rows of 8 feature vectors
        ((64, 16, 16, 32), (64, 16, 4, 128)),  # 32 features: rows of 4
        ((128, 16, 16, 3), (128, 4, 192)),  # 3 features: rows of 64 (a power of two), 2 axes merged
        ((64, 16, 16, 64), None),  # 64 features: summed as they are
    ],
)
def test_narrow_features_are_summed_in_rows_of_lanes(shape, rows):
    """The training statistics read a feature axis of at most ``stats.LANES / 4`` features as rows
    of whole feature vectors at least ``LANES`` long (XLA:CPU's library reductions take 2-5x as long
    over rows of 16 features as of 128: RESULTS.md, 2026-12-07, eleventh); wider ones as they are.
    A reshape of x, the same traffic: forward 4S as pinned above (on XLA:CPU of jax >= 0.10.2)."""
    params, state = jaxbn.batch_norm_init(shape[-1])
    forward = jax.jit(lambda x: jaxbn.batch_norm(x, params, state, training=True))
    x = jnp.zeros(shape)
    wide = hlo.feature_rows(forward.lower(x).as_text(dialect="hlo"), shape)
    assert wide == ({rows} if rows else set()), wide
    if STRUCTURE_PINNED:  # (the rows are JAX's program; what XLA:CPU compiles them to, its own)
        size = np.prod(shape) * 4
        traffic = hlo.memory_traffic(forward.lower(x).compile().as_text())[0] / size
        assert traffic <= EXPECTED["forward"][0] + 0.05, traffic


@needs_devices
def test_narrow_features_of_a_sharded_batch_are_summed_in_rows_of_lanes():
    """With the batch split over devices (sharding in types), each shard's statistics read its
    part of x as rows of lanes too: (64, 16, 16, 16) on 8 devices as (8, 8, 16, 2, 128), the shards
    kept. Before, x as it was, and the partitioner's three all-reduces: at (128, 32, 32, 16) the
    forward took 2.9x-3.0x flax's time on 8 forced CPU devices, now 1.4x-1.5x (RESULTS.md,
    fifteenth)."""
    shape = (64, 16, 16, 16)
    params, state = jaxbn.batch_norm_init(shape[-1])
    mesh = jax.make_mesh((N_DEVICES,), ("i",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("i"))
    x = jax.device_put(jnp.zeros(shape), sharding)
    lowered = jax.jit(lambda x: jaxbn.batch_norm(x, params, state, training=True)).lower(x)
    rows = (N_DEVICES, shape[0] // N_DEVICES, 16, 2, 128)
    assert hlo.feature_rows(lowered.as_text(dialect="hlo"), shape) == {rows}


@needs_devices
@pytest.mark.parametrize("masked", ["examples", "positions"])
def test_a_sharded_batch_with_a_small_mask_moves_what_one_device_moves(masked):
    """Each device's training forward over its part of an explicitly sharded batch moves what one
    device's unsharded call moves, with a mask of examples or of positions, and takes one
    collective. The first valid element was taken with a sum of the one selected element per
    feature, which read all of ``x`` through a select XLA:CPU wrote out (3S more: 9.1S against
    6.0S); it is now a gather batched along the kept axes, which each device takes from its own
    part of ``x`` (a plain gather made the partitioner add an all-reduce and an all-gather)."""
    shape = (8 * N_DEVICES, 16, 16, 128)
    mask_shape = {"examples": (shape[0], 1, 1, 1), "positions": (*shape[:-1], 1)}[masked]
    params, state = jaxbn.batch_norm_init(shape[-1])
    forward = jax.jit(lambda x, m: jaxbn.batch_norm(x, params, state, training=True, mask=m)[0])
    mesh = jax.make_mesh((N_DEVICES,), ("i",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("i"))
    part = (shape[0] // N_DEVICES, *shape[1:])
    local = hlo.compiled_text(forward, jnp.zeros(part), jnp.ones((part[0], *mask_shape[1:]), bool))
    sharded = hlo.compiled_text(
        forward,
        jax.device_put(jnp.zeros(shape), sharding),
        jax.device_put(jnp.ones(mask_shape, bool), sharding),
    )
    collectives = [hlo.count_per_execution(sharded, op) for op in ("all-gather", "all-reduce")]
    assert collectives == [1, 0], collectives  # (the merge's one all-gather of moments)
    size = math.prod(part) * 4
    local, sharded = (hlo.memory_traffic(text)[0] / size for text in (local, sharded))
    assert local <= sharded <= local + 0.2, (local, sharded)


@structural
@pytest.mark.parametrize(
    "shape, rows",
    [
        ((8, 64, 32, 4), (8, 64, 128)),  # 32 groups of 4 channels: rows of the 128 channels
        ((8, 64, 4, 4), (8, 8, 128)),  # 16 channels: rows of 8 x 16 channels
        ((8, 64, 2, 256), (8, 64, 512)),  # 2 groups of 256 channels
    ],
)
def test_groups_of_channels_are_summed_in_rows_of_channels(shape, rows):
    """Statistics over the last axis and others before the axis before it (group norm's x as
    ``(N, ..., G, C / G)``) read x as rows of the ``G * C / G`` channels and add each group's partial
    sums after: their per-(example, group) operands, varying along few elements of the last axis,
    made XLA:CPU's library reductions 3-10x as slow (RESULTS.md, 2026-12-07, twelfth)."""
    lowered = jax.jit(lambda x: stats.moments(x, (1, 3))).lower(jnp.zeros(shape))
    assert hlo.feature_rows(lowered.as_text(dialect="hlo"), shape) == {rows}


@structural
@pytest.mark.parametrize(
    "masked, sharded",
    [(False, False), (True, False), pytest.param(False, True, marks=needs_devices)],
)
def test_group_norm_reads_x_as_channels(masked, sharded):
    """Group norm's step reads x as it is, each group's statistics over the other axes and its
    channels (the plan's ``inner``), its vectors repeated to the channels: forward and backward, no
    arithmetic on a ``(..., G, C / G)`` view of x, whose per-group operands, varying along a few
    elements of the last axis, made XLA:CPU's library reductions 3-10x as slow. With a mask too
    (whose count, and the search for each group's first valid element, take that view of the mask
    and of x: no arithmetic on x), and with the batch explicitly sharded (sharding in types: its
    step took the view, 4.8x flax's forward time at (64, 32, 32, 128) on 8 devices, RESULTS.md)."""
    shape, groups = (8, 16, 16, 128), 32
    x = jnp.zeros(shape)
    if sharded:
        mesh = jax.make_mesh((N_DEVICES,), ("i",), axis_types=(jax.sharding.AxisType.Explicit,))
        x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("i")))
    mask = jnp.ones(shape[:-1] + (1,), bool) if masked else None
    p = {"scale": jnp.ones(shape[-1]), "bias": jnp.zeros(shape[-1])}
    norm = lambda x, p: jaxbn.group_norm(x, p, num_groups=groups, mask=mask)

    def forward_backward(x, p, dy):
        y, vjp = jax.vjp(norm, x, p)
        return y, vjp(dy)

    text = jax.jit(forward_backward).lower(x, p, x).as_text(dialect="hlo")
    split = re.escape(f"f32[{','.join(map(str, shape[:-1]))},{groups},{shape[-1] // groups}]")
    arithmetic = re.findall(rf"= {split}\S* (add|subtract|multiply|select)\(", text)
    assert not arithmetic, arithmetic


def _no_control_flow(text):
    """No ``while`` and no ``conditional`` anywhere in compiled HLO text (any computation)."""
    return text.count(" while(") == 0 and text.count(" conditional(") == 0


@pytest.mark.parametrize("case", ["batch_norm", "masked", "ghost", "layer_norm"])
def test_no_data_dependent_control_flow_in_training(case):
    """The training step compiles to straight-line code: no ``while``, no ``conditional``, forward or
    forward+backward (a data-dependent loop is a host round trip per layer on XLA:GPU)."""
    shape = (32, 4, 4, 16)
    params, state = jaxbn.batch_norm_init(shape[-1])
    mask = jnp.arange(shape[0]).reshape(-1, 1, 1, 1) < 20  # a real mask: some examples padded

    def forward(x, p):
        if case == "layer_norm":
            return jaxbn.layer_norm(x, p, reduction_axes=(1, 2, 3), feature_axes=-1)
        kwargs = (
            {"mask": mask}
            if case == "masked"
            else {"ghost_batch_size": 8}
            if case == "ghost"
            else {}
        )
        return jaxbn.batch_norm(x, p, state, training=True, **kwargs)

    def forward_backward(x, p, dy):
        out, vjp = jax.vjp(forward, x, p)
        return out, vjp(
            jax.tree.map(lambda o: dy if o.shape == dy.shape else jnp.zeros_like(o), out)
        )

    x = jnp.zeros(shape)
    for fn, args in ((forward, (x, params)), (forward_backward, (x, params, x))):
        text = jax.jit(fn).lower(*args).compile().as_text()
        assert _no_control_flow(text), (case, fn.__name__)


@structural
def test_no_control_flow_in_the_pinned_programs():
    """The programs whose traffic is pinned hold no loop or conditional either (nothing uncounted)."""
    for dtype in (jnp.float32, jnp.bfloat16):
        for mode, compiled in _programs(dtype).items():
            assert _no_control_flow(compiled.as_text()), (dtype, mode)


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_no_custom_call_in_any_lowering(platform):
    """jaxbn is pure JAX: the training step lowers to no custom call on any backend, and to no loop
    and no branch at all (channel_sums' per-backend barrier is one primitive, lowered per platform)."""
    params, state = jaxbn.batch_norm_init(SHAPE[-1])

    def step(x, p, s):
        (y, new_state), vjp = jax.vjp(lambda x, p: jaxbn.batch_norm(x, p, s, training=True), x, p)
        return y, new_state, vjp((y, jax.tree_util.tree_map(jnp.zeros_like, new_state)))

    x = jnp.zeros(SHAPE)
    text = jax.jit(step).trace(x, params, state).lower(lowering_platforms=(platform,)).as_text()
    assert "custom_call" not in text
    assert "stablehlo.while" not in text and "stablehlo.if" not in text


def _instructions(compiled) -> int:
    return sum(
        1
        for line in compiled.as_text().splitlines()
        if re.match(r"\s*(ROOT )?%\S+ = \S+ [\w-]+\(", line)
    )


@structural
def test_compiled_instructions_within_twice_flax():
    """The compiled forward+backward stays small: the statistics' per-feature chain is computed once
    (``stats.computed_once``), not copied by XLA into every fusion that reads it (2.8x flax's count
    that way). 1.22x today (1.36x when each reader sliced its value out of one stacked sum, 1.28x
    with pass two's sums in two reductions): the exact statistics take their sums and their
    scaling, flax's two sums; ``benchmarks/compile.py``
    measures what this costs a whole model."""
    compiled = _programs(jnp.float32)["forward_backward"]
    ours, theirs = _instructions(compiled), _instructions(_flax_forward_backward(jnp.float32))
    assert ours <= 2 * theirs, (ours, theirs)
    # its readers take the values whole: the slices left are K, x at index 0, and pass two's two
    # sums taken from their one stacked reduction (10 more when each reader sliced its row out of
    # a stacked sum)
    slices = re.findall(r"= \S+ slice\(", compiled.as_text())
    assert len(slices) == 3, slices
    # the running statistics' check that every batch statistic is finite is one kernel: a variadic
    # reduction (XLA:CPU splits a plain one over more than 32 values into a reduce-window and a
    # reduce, two kernels more)
    assert " reduce-window(" not in compiled.as_text()


@structural
def test_the_lowered_step_is_at_most_two_and_a_half_times_flax():
    """What tracing emits stays small: the training forward+backward lowers to 2.2x flax's HLO
    instructions (3.0x with a nested jit per ``jnp.where`` and a per-feature vector broadcast
    through ``expand_dims``, which made ``benchmarks/compile.py``'s lower time 1.4x flax's instead
    of 1.2x: RESULTS.md, 2026-12-06 (sixth))."""
    instruction = re.compile(r"\s*(ROOT )?%?[\w.-]+ = \S+ [\w-]+\(")
    ours, theirs = (
        sum(map(bool, map(instruction.match, lowered.as_text(dialect="hlo").splitlines())))
        for lowered in (
            _lowered(jnp.float32)["forward_backward"],
            _flax_forward_backward(jnp.float32, compiled=False),
        )
    )
    assert ours <= 2.5 * theirs, (ours, theirs)


@structural
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_less_traffic_and_temp_memory_than_flax(dtype):
    """Forward+backward moves at least a quarter less than flax's default, and its temp memory holds
    per-feature vectors only (no tensor of x's size: flax's bfloat16 default holds a float32 copy)."""
    ours = _programs(dtype)["forward_backward"]
    theirs = _flax_forward_backward(dtype)
    # 10S vs 15S in float32 (0.67), 10S vs 29S in bfloat16 (0.34), per-feature vectors aside
    assert hlo.memory_traffic(ours.as_text())[0] <= 0.7 * hlo.memory_traffic(theirs.as_text())[0]
    size = np.prod(SHAPE) * jnp.dtype(dtype).itemsize
    temp, flax_temp = (
        ours.memory_analysis().temp_size_in_bytes,
        theirs.memory_analysis().temp_size_in_bytes,
    )
    # a few KB in both dtypes (flax's float32: 1.5 KB, its bfloat16: 2S of float32 x)
    assert temp <= size / 100, temp
    assert temp <= max(flax_temp, size / 100), (temp, flax_temp)


@structural
def test_bfloat16_tensors_stay_bfloat16():
    """No full-size float32 tensor is written in the bfloat16 programs (statistics accumulate in
    float32), with a mask of positions too (an argument): the backward's select of x is taken on
    x's bits, where XLA wrote a select of bfloat16 values read in float32 as float32 (2S more)."""
    full_size_f32 = re.compile(r"f32\[" + ",".join(map(str, SHAPE)) + r"\]")
    positions = jax.random.uniform(jax.random.key(0), SHAPE[:-1] + (1,)) < 0.9
    for mask in (None, positions):
        for mode, compiled in _programs(jnp.bfloat16, mask).items():
            entry = compiled.as_text().split("\nENTRY")[1]
            assert not full_size_f32.search(entry), (mode, mask is not None)


@pytest.fixture
def wide_barrier_views(monkeypatch):
    """jaxbn compiled with XLA:CPU's barriers on float32 views (the measuring variant of
    benchmarks/e2e.py), JAX's caches cleared around it (the jitted step caches by shapes only)."""
    jax.clear_caches()
    monkeypatch.setattr(stats, "barrier_views_in_compute_dtype", True)
    yield
    monkeypatch.undo()
    jax.clear_caches()


@pytest.mark.parametrize("norm", ["batch_norm", "layer_norm"])
def test_wide_barrier_views_compute_the_same_step(norm, wide_barrier_views):
    """The measuring variant moves XLA:CPU's barriers to the float32 views of a bfloat16 x and dy
    (what a model's float32 producers hand over anyway): outputs, running statistics and
    gradients are those of the default, and it writes full-size float32 tensors, which batch
    norm's default does not (``test_bfloat16_tensors_stay_bfloat16``)."""
    shape = SHAPE  # (at a few elements per feature XLA:CPU fuses the float32 views away)
    x = jax.random.normal(jax.random.key(1), shape, jnp.bfloat16) * 3 + 100
    dy = jax.random.normal(jax.random.key(2), shape, jnp.bfloat16)
    params, state = jaxbn.batch_norm_init(shape[-1])
    if norm == "batch_norm":
        step = lambda x, p: jaxbn.batch_norm(x, p, state, training=True, dtype=jnp.bfloat16)
    else:
        step = lambda x, p: (jaxbn.layer_norm(x, p, dtype=jnp.bfloat16), ())

    def forward_backward(x, p, dy):
        y, vjp, aux = jax.vjp(step, x, p, has_aux=True)
        return y, aux, vjp(dy)

    wide = jax.jit(forward_backward)
    wide_out, wide_text = wide(x, params, dy), wide.lower(x, params, dy).compile().as_text()
    stats.barrier_views_in_compute_dtype = False  # (the fixture restores it, too)
    jax.clear_caches()
    default = jax.jit(forward_backward)
    default_out, default_text = (
        default(x, params, dy),
        default.lower(x, params, dy).compile().as_text(),
    )
    full_size_f32 = re.compile(r"f32\[" + ",".join(map(str, shape)) + r"\]")
    entry = lambda text: text.split("\nENTRY")[1]
    if STRUCTURE_PINNED:  # (which tensors XLA:CPU writes: its fusion decisions)
        assert full_size_f32.search(entry(wide_text))
        if norm == "batch_norm":  # (layer norm's parameter gradients make one either way)
            assert not full_size_f32.search(entry(default_text))
    # the same sums of the same float32 values; only XLA's summation order may differ (by a
    # rounding of the float32 sums: below one bfloat16 unit in the bfloat16 leaves)
    for got, want in zip(
        jax.tree_util.tree_leaves(wide_out), jax.tree_util.tree_leaves(default_out)
    ):
        rtol = 2.0**-8 if want.dtype == jnp.bfloat16 else 1e-5
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


# (forward, forward+backward) traffic in S with a mask, float32 and bfloat16, the mask's own reads
# included (a boolean per element of x: 0.25S per read in float32, 0.5S in bfloat16). A mask at
# most an eighth of x's size weighs the passes: one write of x with its masked-out elements 0,
# then each pass reads that, 2S more than unmasked. A mask of x's size selects in each pass, which
# writes what its sum reads (2S more for pass one, 1S for pass two; float32 copies in bfloat16),
# and its shift, the largest valid element, reads a select written for it (3S; the search for
# the first valid element moved less by this count, 12.25S / 20.5S forward, but XLA ran it in its
# own loop over int32 positions: 1.6x-1.7x flax's forward time, now 1.06x-1.19x)
MASKED_TRAFFIC = {
    ("examples", jnp.float32): (6, 14),
    ("examples", jnp.bfloat16): (6, 14),
    ("positions", jnp.float32): (6, 14),
    ("positions", jnp.bfloat16): (6, 14),
    ("elements", jnp.float32): (14.25, 22.75),
    ("elements", jnp.bfloat16): (23.5, 32.5),
}


@structural
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("masked", ["examples", "positions", "elements"])
def test_masked_training_traffic(masked, dtype):
    """A mask's cost in traffic is pinned (``MASKED_TRAFFIC``). XLA:CPU's library reductions do not
    absorb the select that keeps masked-out (possibly NaN) elements out of the sums. A mask that
    does not vary along the features (of examples or of positions) is small: x is written once with
    its masked-out elements 0 and each pass weighs its summand by the mask as 0 / 1 (forward 9S and
    14S in bfloat16 before, the first valid element searched in a mask broadcast to x's size, and
    each pass's select written out)."""
    shape = {"examples": (SHAPE[0], 1, 1, 1), "positions": SHAPE[:-1] + (1,)}.get(masked, SHAPE)
    mask = jax.random.uniform(jax.random.key(0), shape) < 0.9
    programs = _lowered(dtype, mask)
    size = np.prod(SHAPE) * jnp.dtype(dtype).itemsize
    traffic = [
        hlo.memory_traffic(programs[mode].compile().as_text())[0] / size
        for mode in ("forward", "forward_backward")
    ]
    expected = MASKED_TRAFFIC[masked, dtype]
    for got, want in zip(traffic, expected, strict=True):  # (a narrow mask's bytes: below 0.3S)
        assert want <= got <= want + 0.3, (traffic, expected)


def test_traffic_model_charges_a_sliced_operand_its_slice():
    """tests/hlo.py: a fusion that only slices an operand (after element-wise converts) reads the slice;
    one that also uses the whole operand reads all of it. (jaxbn's data shift slices one element per
    feature out of x: 1S in the model without this, a few bytes in fact.)"""
    text = """HloModule m

%sliced (p0: bf16[64,16], p1: f32[16]) -> f32[16] {
  %p0 = bf16[64,16]{1,0} parameter(0)
  %c = f32[64,16]{1,0} convert(%p0)
  %s = f32[1,16]{1,0} slice(%c), slice={[0:1], [0:16]}
  %b = f32[16]{0} bitcast(%s)
  %p1 = f32[16]{0} parameter(1)
  ROOT %a = f32[16]{0} add(%b, %p1)
}

%whole (q0: bf16[64,16]) -> bf16[64,16] {
  %q0 = bf16[64,16]{1,0} parameter(0)
  %t = bf16[1,16]{1,0} slice(%q0), slice={[0:1], [0:16]}
  ROOT %n = bf16[64,16]{1,0} negate(%q0)
}

ENTRY %main (x: bf16[64,16], k: f32[16]) -> (f32[16], bf16[64,16]) {
  %x = bf16[64,16]{1,0} parameter(0)
  %k = f32[16]{0} parameter(1)
  %f = f32[16]{0} fusion(%x, %k), kind=kLoop, calls=%sliced
  %g = bf16[64,16]{1,0} fusion(%x), kind=kLoop, calls=%whole
  ROOT %r = (f32[16]{0}, bf16[64,16]{1,0}) tuple(%f, %g)
}
"""
    traffic, kernels = hlo.memory_traffic(text)
    # %f: 16 bf16 read + 16 f32 read + 16 f32 written; %g: x read and written
    assert (traffic, kernels) == ((32 + 64 + 64) + 2 * 64 * 16 * 2, 2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_and_separate_sums_agree(dtype):
    """The GPU/TPU form of channel_sums (one shared pass) equals the CPU form."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 5, 3)) + 100, dtype)
    shift = jnp.full((3,), 100.0)

    def summands():
        centered = lambda x, k: x.astype(jnp.float32) - k
        return [centered, lambda x, k: jnp.square(centered(x, k))]

    fused = jax.jit(lambda x: stats.channel_sums(summands(), [x, shift], (0, 1), fuse=True))(x)
    separate = jax.jit(lambda x: stats.channel_sums(summands(), [x, shift], (0, 1), fuse=False))(x)
    default = stats.channel_sums(summands(), [x, shift], (0, 1))
    for a, b, c in zip(fused, separate, default):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(b, c, rtol=1e-6, atol=1e-5)


@needs_devices
@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_accelerator_lowerings_under_shard_map(platform):
    """Per BatchNorm call, lowered for each backend on 8 devices with axis_name: no loop, no custom call;
    the forward's one collective is an all-gather (every device's count, shift, mean - shift and variance,
    merged in device order), the backward's one an all-reduce (the two gradient sums)."""
    mesh = jax.make_mesh((N_DEVICES,), ("i",))
    params, state = jaxbn.batch_norm_init(16)

    def forward(x, p, s):
        return jaxbn.batch_norm(x, p, s, training=True, axis_name="i")

    def forward_backward(x, p, s):
        (y, new_state), vjp = jax.vjp(lambda x, p: forward(x, p, s), x, p)
        return y, new_state, vjp((y, jax.tree_util.tree_map(jnp.zeros_like, new_state)))

    x = jax.device_put(
        jnp.ones((64, 16)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("i"))
    )
    specs = (
        jax.sharding.PartitionSpec("i"),
        jax.sharding.PartitionSpec(),
        jax.sharding.PartitionSpec(),
    )
    for fn, out_specs, all_reduces in (
        (forward, (specs[0], specs[1]), 0),
        (forward_backward, (specs[0], specs[1], (specs[0], specs[1])), 1),
    ):
        mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_specs))
        text = mapped.trace(x, params, state).lower(lowering_platforms=(platform,)).as_text()
        assert "custom_call" not in text
        assert "stablehlo.while" not in text and "stablehlo.if" not in text
        assert text.count('"stablehlo.all_gather"') == 1
        assert text.count('"stablehlo.all_reduce"') == all_reduces
        for op in ("reduce_scatter", "collective_permute", "all_to_all"):
            assert f'"stablehlo.{op}"' not in text
        if platform == "cpu":  # and so the compiled program, loop bodies and branches included
            compiled = mapped.lower(x, params, state).compile().as_text()
            assert _no_control_flow(compiled)
            assert hlo.count_collectives(compiled, "all-gather", include_branches=True) == 1
            assert (
                hlo.count_collectives(compiled, "all-reduce", include_branches=True) == all_reduces
            )


@pytest.mark.parametrize("call", ["batch_norm", "linen", "nnx", "layer_norm"])
def test_an_eager_training_call_is_a_few_cached_jitted_calls(call, caplog):
    """An eager (un-jitted) training call runs the step and the state update as cached jitted functions:
    a handful of dispatches (27 operations each dispatched on their own before), and a second call with
    the same shapes traces and compiles nothing."""
    import logging

    from flax import nnx

    import jaxbn.linen
    import jaxbn.nnx

    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 4, 3)), jnp.float32)
    params, state = jaxbn.batch_norm_init(3)
    if call == "batch_norm":
        run = lambda x: jaxbn.batch_norm(x, params, state, training=True)
    elif call == "linen":
        module = jaxbn.linen.BatchNorm(use_running_average=False)
        variables = module.init(jax.random.key(0), x)
        run = lambda x: module.apply(variables, x, mutable=["batch_stats"])
    elif call == "nnx":
        layer = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
        graphdef, layer_state = nnx.split(layer)

        def traced(x, layer_state):
            module = nnx.merge(graphdef, layer_state)
            return module(x), nnx.state(module)

        assert len(jax.make_jaxpr(traced)(x, layer_state).jaxpr.eqns) <= 3
    else:
        run = lambda x: jaxbn.layer_norm(x, {"scale": jnp.ones(3)})
    if call != "nnx":
        assert len(jax.make_jaxpr(run)(x).jaxpr.eqns) <= 3
    eager = (lambda: layer(x)) if call == "nnx" else (lambda: run(x))
    jax.block_until_ready(eager())
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.DEBUG, logger="jax"):
            jax.block_until_ready(eager())
    finally:
        jax.config.update("jax_log_compiles", previous)
    assert not [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling ")]


@structural
@pytest.mark.parametrize("norm", ["layer_norm", "group_norm"])
def test_per_example_norms_in_bfloat16_move_less_than_flax(norm):
    """Layer and group norm of bfloat16 x read x in its own dtype (no float32 copy: 11S forward, 41S
    forward+backward that way, flax 9S / 29S): at this shape 4S / 13.4S and 4.4S / 13.7S, gradients
    rounded once (20S and 25S before the backward's x̂ dγ' term read its centre through XLA:CPU's
    barrier with x). (Group norm moved 7.2S / 18.6S while its step read x split into groups.)"""
    shape, groups = (16, 8, 8, 64), 16
    x = jnp.zeros(shape, jnp.bfloat16)
    p = {"scale": jnp.ones(shape[-1]), "bias": jnp.zeros(shape[-1])}
    if norm == "layer_norm":
        ours = lambda x, p: jaxbn.layer_norm(
            x, p, reduction_axes=(1, 2, 3), feature_axes=-1, dtype=jnp.bfloat16
        )
        module = nn.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=-1, dtype=jnp.bfloat16)
    else:
        ours = lambda x, p: jaxbn.group_norm(x, p, num_groups=groups, dtype=jnp.bfloat16)
        module = nn.GroupNorm(num_groups=groups, dtype=jnp.bfloat16)
    theirs = lambda x, p: module.apply({"params": p}, x)

    def with_backward(f):
        def run(x, p, dy):
            y, vjp = jax.vjp(f, x, p)
            return y, vjp(dy)

        return run

    size = x.size * x.dtype.itemsize
    traffic = {}
    for name, f in (("ours", ours), ("theirs", theirs)):
        forward = hlo.memory_traffic(jax.jit(f).lower(x, p).compile().as_text())[0] / size
        both = (
            hlo.memory_traffic(jax.jit(with_backward(f)).lower(x, p, x).compile().as_text())[0]
            / size
        )
        traffic[name] = (forward, both)
    assert traffic["ours"][0] <= {"layer_norm": 4.1, "group_norm": 4.4}[norm], traffic
    assert traffic["ours"][1] <= {"layer_norm": 13.4, "group_norm": 13.7}[norm], traffic
    assert traffic["ours"][1] <= 0.9 * traffic["theirs"][1], traffic


@structural
@pytest.mark.parametrize(
    "shape, axis, stacked",
    [
        ((16, 8, 8, 128), -1, (16, 8, 8, 2, 128)),  # NHWC: before the features
        ((32, 64, 16, 16), 1, (32, 64, 2, 16, 16)),  # NCHW: before the spatial axes (256 elements)
        ((32, 64, 4, 4), 1, (32, 2, 64, 4, 4)),  # NCHW, small images: before the features
    ],
)
def test_pass_two_takes_its_sums_in_one_reduction(shape, axis, stacked):
    """Pass two sums the squared deviations and their scaled copy (taken where the first overflows)
    in one reduction, over the two stacked along a new axis: XLA:CPU's library reductions read x
    once per reduction (two reductions: 5S forward, RESULTS.md, sixteenth). The axis goes where at
    least ``stats.LANES`` elements follow it: before the last axis, it made NCHW's forward (32
    elements of a row of the image) 1.2x-1.6x slower than two reductions; before the first, XLA
    read x twice."""
    params, state = jaxbn.batch_norm_init(shape[axis])
    forward = jax.jit(lambda x: jaxbn.batch_norm(x, params, state, training=True, axis=axis))
    text = hlo.compiled_text(forward, jnp.zeros(shape))
    # the reductions of at least x's size: pass one's, and pass two's over the stacked deviations
    reduced = [dims for dims in hlo.reduced_shapes(text) if math.prod(dims) >= math.prod(shape)]
    assert len(reduced) == 2 and stacked in reduced, reduced


@structural
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_sums_squares_without_a_mean(dtype):
    """RMS norm's statistic is the mean square: its forward sums x's squares (plain, and scaled where
    they overflow: two reads of x on XLA:CPU, which took two plain sums of squares faster than one
    over the two stacked) and writes y, 4S, where the mean, a shift and two passes around it moved
    5.1S (5.2S in bfloat16)."""
    x = jnp.zeros((8, 64, 256), dtype)
    size = x.size * x.dtype.itemsize
    scale = {"scale": jnp.ones(256, dtype)}
    compiled = jax.jit(lambda x, p: jaxbn.rms_norm(x, p)).lower(x, scale).compile()
    assert hlo.memory_traffic(compiled.as_text())[0] / size <= 4.1


def test_layers_of_one_shape_share_one_lowered_step():
    """The step is one cached jitted function: the lowered gradient of a model's BatchNorms of one
    shape and configuration defines the step's functions once and calls them per layer (what keeps a
    ResNet's lowering time near flax's), instead of lowering a copy per layer."""
    params, state = jaxbn.batch_norm_init(7)

    def layers(x, count):
        for _ in range(count):
            x, _ = jaxbn.batch_norm(x, params, state, training=True)
        return x

    def lowered(count):
        text = (
            jax.jit(jax.grad(lambda x: jnp.sum(layers(x, count))))
            .lower(jnp.ones((5, 3, 7)))
            .as_text()
        )
        return len(re.findall(r"func\.func private @batch_norm_train", text)), text.count(
            "call @batch_norm_train"
        )

    # (one layer lowers one function fewer than several: the count is compared from two layers up)
    (two_defined, two_called), (eight_defined, eight_called) = lowered(2), lowered(8)
    assert 1 <= eight_defined == two_defined <= 3, (two_defined, eight_defined)
    assert eight_called == 4 * two_called, (two_called, eight_called)
