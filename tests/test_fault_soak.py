"""Fault soak: 300 data-parallel training steps with random bad batches lose nothing.

A small model (batch norm, then a linear head) trains for ``STEPS`` steps
under ``jax.shard_map`` over the 8 forced CPU devices, every batch norm
synchronized with ``axis_name``, so each device keeps its own copy of the
running statistics. At random, a step's global batch is faulty:

=============  ===============================================  ====================================
fault          the batch                                        "removed" means
=============  ===============================================  ====================================
``nan``        one valid element is NaN                         the step is dropped from the run
``inf``        one valid element is +Inf or -Inf                the step is dropped from the run
``masked``     every element masked out (and the padding holds  the step is dropped from the run
               NaN, Inf, 3e38 and ordinary values)
``device``     one device's whole shard masked out (holding     the step runs on the other 7 devices'
               the same kind of garbage); the other 7 valid     examples only: that shard is
                                                                dropped, not the step
=============  ===============================================  ====================================

The training loop is the usual one: a step whose gradients are not finite is
not applied (the NaN/Inf batches); every other step is, including the fully
masked one (zero loss, zero gradients). Four running states are updated each
step: ``jaxbn.batch_norm``'s exponential average (the model's layer), its
cumulative average (``momentum=None``: every batch weighs the same forever,
so a lost or extra batch never fades out of it, and ``count`` must equal the
number of kept steps), and the ``batch_stats`` of a ``jaxbn.linen.BatchNorm``
and the ``BatchStat`` variables of a ``jaxbn.nnx.BatchNorm`` fed the same
batches.

What is compared, on every device:

- **Bit for bit** against the same compiled program run on the clean
  sequence (NaN/Inf/fully masked steps removed, the masked-out padding of the
  ``device`` steps zeros instead of garbage; the sequence ends with skipped
  steps so the program and its length are the same): every running state
  after every step, the final parameters and ``count``. A removed step must
  leave every state exactly as it was (the old value selected), and a masked
  shard must contribute exact zeros (selected), so the same program sees the
  same numbers and nothing may differ. All 8 devices hold identical states and
  parameters (every device gets the same all-reduced sums and runs the same
  program on them).
- **To rounding** (``rtol=1e-6, atol=1e-6``), the modules' states against the
  functional one's: the linen and nnx updates are traced outside
  ``value_and_grad``, so they are other programs (and fusions) computing the
  same statistics.
- **To rounding** against a single-device run (plain ``jit``, no mask, no
  ``axis_name``) on exactly the remaining examples (all 32 of a clean step,
  the 28 valid ones of a ``device`` step): the running statistics to
  ``rtol=2e-6, atol=1e-6`` and the parameters to ``rtol=1e-5, atol=1e-6``
  (observed: at most 5e-7 absolute, 2.6e-7 relative where the value is not
  near 0), ``count`` exactly. Not bit for bit: 8 per-device sums and an
  all-reduce add the same numbers in a different order than one sum over 28
  or 32 rows, so the last bit of a sum may differ.

Also checked at every step: the states stay finite, the gradients of every
applied step are finite, and the gradient of every masked-out element
(NaN, Inf, 3e38 or ordinary) is exactly 0.

The whole soak is one jitted ``lax.scan`` inside ``shard_map``: one
compilation, run twice (faulty and clean), plus one for the single-device
reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from jaxbn import stats
from tests.conftest import N_DEVICES, needs_devices

pytestmark = [needs_devices, pytest.mark.slow]  # a 300-step soak, three compilations

STEPS = 300
PER_DEVICE = 4
BATCH = N_DEVICES * PER_DEVICE
FEATURES = 3
MOMENTUM = 0.9
LEARNING_RATE = 0.05
FAULTS = ("clean", "nan", "inf", "masked", "device")
RATES = (0.6, 0.1, 0.1, 0.1, 0.1)
REMOVED = ("nan", "inf", "masked")  # whole steps dropped from the clean run
GARBAGE = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 7.0], np.float32)

MESH = jax.make_mesh((N_DEVICES,), ("d",))
LINEN_BN = jaxbn.linen.BatchNorm(use_running_average=False, momentum=MOMENTUM, axis_name="d")
NNX_GRAPH, _ = nnx.split(
    jaxbn.nnx.BatchNorm(FEATURES, momentum=MOMENTUM, axis_name="d", rngs=nnx.Rngs(0))
)


def _data(seed=0):
    """Faulty and clean batches, their masks and targets, and the fault kind of each step."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(FAULTS), size=STEPS, p=RATES)
    drift = np.linspace(0.0, 2.0, STEPS)[:, None, None]  # the statistics move during the run
    x = rng.normal(size=(STEPS, BATCH, FEATURES)) * [1.0, 0.5, 3.0] + [2.0, -1.0, 5.0] + drift
    x = x.astype(np.float32)
    target = (
        x @ np.array([0.5, -1.0, 0.25], np.float32) + 0.1 * rng.normal(size=(STEPS, BATCH))
    ).astype(np.float32)
    mask = np.ones((STEPS, BATCH, 1), bool)
    faulty = x.copy()
    devices = np.full(STEPS, -1)
    for step, kind in enumerate(FAULTS[k] for k in kinds):
        if kind in ("nan", "inf"):
            value = np.nan if kind == "nan" else rng.choice([np.inf, -np.inf])
            faulty[step, rng.integers(BATCH), rng.integers(FEATURES)] = value
        elif kind == "masked":
            mask[step] = False
            faulty[step] = rng.choice(GARBAGE, size=(BATCH, FEATURES))
        elif kind == "device":
            devices[step] = device = rng.integers(N_DEVICES)
            rows = slice(device * PER_DEVICE, (device + 1) * PER_DEVICE)
            mask[step, rows] = False
            faulty[step, rows] = rng.choice(GARBAGE, size=(PER_DEVICE, FEATURES))
    clean = np.where(mask, x, 0.0).astype(
        np.float32
    )  # masked-out padding: zeros instead of garbage
    return [FAULTS[k] for k in kinds], faulty, clean, mask, target, devices


def _init():
    params_bn, state = jaxbn.batch_norm_init(FEATURES)
    params = {"bn": params_bn, "head": jnp.asarray([0.3, -0.2, 0.1], jnp.float32)}
    cumulative = jaxbn.batch_norm_init(FEATURES, cumulative=True)[1]
    linen = LINEN_BN.init(jax.random.key(0), jnp.zeros((2, FEATURES)))
    nnx_state = nnx.state(
        jaxbn.nnx.BatchNorm(FEATURES, momentum=MOMENTUM, axis_name="d", rngs=nnx.Rngs(0))
    )
    states = {
        "ema": state,
        "cumulative": cumulative,
        "linen": linen["batch_stats"],
        "nnx": nnx.to_pure_dict(nnx_state),
    }
    return params, states, linen["params"]


def _train_step(params, states, linen_params, x, mask, target, *, axis_name):
    """One step: loss and gradients (also w.r.t. x), the update unless not finite, the observer states."""
    count = jnp.sum(mask, dtype=jnp.float32)
    if axis_name is not None:
        count = lax.psum(count, axis_name)

    def loss_fn(params, x):
        y, state = jaxbn.batch_norm(
            x,
            params["bn"],
            states["ema"],
            training=True,
            momentum=MOMENTUM,
            mask=mask,
            axis_name=axis_name,
        )
        # Masked-out rows still come out normalized (3e38 becomes inf): select, not multiply, before the head.
        error = jnp.where(mask[:, 0], jnp.where(mask, y, 0.0) @ params["head"] - target, 0.0)
        return jnp.sum(error**2) / jnp.maximum(count, 1.0), state

    (_, ema), (grads, dx) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, x)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    new_params = jax.tree.map(
        lambda p, g: jnp.where(finite, p - LEARNING_RATE * g, p), params, grads
    )
    _, cumulative = jaxbn.batch_norm(
        x,
        params["bn"],
        states["cumulative"],
        training=True,
        momentum=None,
        mask=mask,
        axis_name=axis_name,
    )
    linen, nnx_state = states["linen"], states["nnx"]  # the single-device reference has no modules
    if axis_name is not None:
        _, updates = LINEN_BN.apply(
            {"params": linen_params, "batch_stats": states["linen"]},
            x,
            mask=mask,
            mutable=["batch_stats"],
        )
        linen = updates["batch_stats"]
        module = nnx.merge(NNX_GRAPH, nnx_state)
        module(x, mask=mask)
        nnx_state = nnx.to_pure_dict(nnx.state(module))
    checks = {
        "applied": finite,
        "dx_finite": jnp.all(jnp.isfinite(dx)),
        # exact: a masked-out element's gradient is a zero selected by the mask, not computed
        "masked_dx_zero": jnp.all(jnp.where(mask, True, dx == 0.0)),
    }
    return (
        new_params,
        {"ema": ema, "cumulative": cumulative, "linen": linen, "nnx": nnx_state},
        checks,
    )


@functools.cache
def _sharded_soak():
    """``(params, states, linen_params, x, mask, target, skip) -> per-device (params, states, trajectory, checks)``."""

    def soak(params, states, linen_params, xs, masks, targets, skip):
        def step(carry, inputs):
            params, states = carry
            x, mask, target, skip = inputs
            varying = lambda tree: jax.tree.map(lambda v: stats.varying_like(v, x), tree)  # noqa: E731

            def run(params, states):
                params, states, checks = _train_step(
                    params, states, linen_params, x, mask, target, axis_name="d"
                )
                return params, states, varying(checks)

            def skipped(params, states):
                return (
                    params,
                    states,
                    varying({"applied": False, "dx_finite": True, "masked_dx_zero": True}),
                )

            params, states, checks = lax.cond(skip, skipped, run, params, states)
            return (params, states), (states, checks)

        (params, states), (trajectory, checks) = lax.scan(
            step, (params, states), (xs, masks, targets, skip)
        )
        per_device = lambda tree: jax.tree.map(lambda v: stats.varying_like(v, xs)[None], tree)  # noqa: E731
        return per_device(params), per_device(states), per_device(trajectory), per_device(checks)

    batch = P(None, "d")
    return jax.jit(
        jax.shard_map(
            soak,
            mesh=MESH,
            in_specs=(P(), P(), P(), batch, batch, batch, P()),
            out_specs=(P("d"), P("d"), P("d"), P("d")),
        )
    )


@jax.jit
def _single_device_soak(params, states, linen_params, xs, targets, drop):
    """The reference: one device, no mask, each step on the remaining examples (``drop``: the device left out)."""

    def step(carry, inputs):
        params, states = carry
        x, target, drop = inputs

        def all_rows(params, states):
            return _train_step(
                params, states, linen_params, x, jnp.ones((BATCH, 1), bool), target, axis_name=None
            )[:2]

        def without_device(params, states):
            rows = jnp.arange(BATCH - PER_DEVICE)
            rows = rows + PER_DEVICE * (rows >= drop * PER_DEVICE)  # skip the dropped device's rows
            return _train_step(
                params,
                states,
                linen_params,
                x[rows],
                jnp.ones((rows.size, 1), bool),
                target[rows],
                axis_name=None,
            )[:2]

        return lax.cond(drop < 0, all_rows, without_device, params, states), None

    (params, states), _ = lax.scan(step, (params, states), (xs, targets, drop))
    return params, states


def _assert_bitwise(a, b, what):
    """Same bits (NaN matching NaN): only for values guaranteed equal by construction (see the module docstring)."""
    for (path, u), v in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        u, v = np.asarray(u), np.asarray(v)
        assert u.shape == v.shape, (what, path)
        differ = ~((u == v) | (np.isnan(u) & np.isnan(v)))
        assert not differ.any(), (
            f"{what}{jax.tree_util.keystr(path)} differs at {np.argwhere(differ)[:5].tolist()}"
        )


def test_random_faults_lose_nothing_on_any_device():
    kinds, faulty, clean, mask, target, devices = _data()
    kinds = np.asarray(kinds)
    assert all((kinds == kind).sum() >= 20 for kind in FAULTS), "every fault kind is drawn often"
    params, states, linen_params = _init()
    soak = _sharded_soak()
    put = lambda a: jax.device_put(a, NamedSharding(MESH, P(None, "d")))  # noqa: E731

    # The faulty run: every step runs.
    out = soak(
        params, states, linen_params, put(faulty), put(mask), put(target), np.zeros(STEPS, bool)
    )
    got_params, got_states, trajectory, checks = jax.device_get(out)

    # The clean run: the removed steps dropped (the rest in order), padded with skipped steps.
    kept = ~np.isin(kinds, REMOVED)
    n_kept = int(kept.sum())
    pad = lambda a: np.concatenate([a[kept], np.zeros_like(a[: STEPS - n_kept])])  # noqa: E731
    skip = np.arange(STEPS) >= n_kept
    ref = soak(
        params,
        states,
        linen_params,
        put(pad(clean)),
        put(pad(mask) | skip[:, None, None]),
        put(pad(target)),
        skip,
    )
    ref_params, ref_states, ref_trajectory, _ = jax.device_get(ref)

    # Bit for bit, on every device: final parameters and states, and the state after every step. Exact by
    # construction: one compiled program, run on inputs that differ only where the mask selects zeros,
    # with removed steps selecting the old state.
    _assert_bitwise(got_params, ref_params, "params")
    _assert_bitwise(got_states, ref_states, "states")
    index = np.cumsum(kept) - 1  # the clean step whose state each faulty step must have
    for name in ("ema", "cumulative", "linen", "nnx"):
        got = jax.tree.map(lambda v: v[:, index >= 0], trajectory[name])
        want = jax.tree.map(lambda v: v[:, index[index >= 0]], ref_trajectory[name])
        _assert_bitwise(got, want, f"trajectory[{name!r}]")
    # A removed step leaves the state exactly as it was (also at the very start).
    first = index < 0
    for key, value in states["ema"].items():  # exact: the initial state selected unchanged
        assert (trajectory["ema"][key][:, first] == np.asarray(value)).all()
    # The modules' states are the functional one's, to rounding: other programs (traced outside
    # value_and_grad, fused differently) computing the same statistics.
    nnx_stats = {key: trajectory["nnx"][key] for key in ("mean", "var")}
    for name, tree in (("linen", trajectory["linen"]), ("nnx", nnx_stats)):
        for key in ("mean", "var"):
            np.testing.assert_allclose(
                tree[key],
                trajectory["ema"][key],
                rtol=1e-6,
                atol=1e-6,
                err_msg=f"{name} vs functional: {key}",
            )
    # Every device holds the same state, bit for bit: the same program on the same all-reduced sums.
    for tree in (got_params, got_states):
        _assert_bitwise(
            jax.tree.map(lambda v: v[1:], tree),
            jax.tree.map(lambda v: v[:-1], tree),
            "across devices",
        )
    # exact: a count of kept steps (a small integer, each step adds exactly 1)
    np.testing.assert_array_equal(got_states["cumulative"]["count"], n_kept)
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(trajectory))

    # Gradients: finite and applied for every kept step (and the fully masked one), masked-out elements get 0.
    applied = ~np.isin(kinds, ("nan", "inf"))
    assert (checks["applied"] == applied).all()
    assert checks["dx_finite"][:, applied].all()
    assert checks["masked_dx_zero"].all()

    # To rounding: one device on exactly the remaining examples, without masks.
    ref1_params, ref1_states = jax.device_get(
        _single_device_soak(params, states, linen_params, clean[kept], target[kept], devices[kept])
    )
    for name in ("ema", "cumulative"):
        for key in ("mean", "var"):
            np.testing.assert_allclose(
                got_states[name][key],
                np.broadcast_to(ref1_states[name][key], (N_DEVICES, 3)),
                rtol=2e-6,
                atol=1e-6,
                err_msg=f"{name}/{key}",
            )
    np.testing.assert_array_equal(
        ref1_states["cumulative"]["count"], n_kept
    )  # exact: a count of steps
    for got, want in zip(jax.tree.leaves(got_params), jax.tree.leaves(ref1_params), strict=True):
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-5, atol=1e-6)
