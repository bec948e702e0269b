"""benchmarks/kernels.py: its HLO parsing and its profile of a small compiled function (no times
are looked at, only which kernels the trace names and how they are grouped)."""

import jax
import jax.numpy as jnp

from benchmarks import kernels

OP_NAME = "jit(step)/transpose(jvp(ResNet))/BasicBlock_0/BatchNorm_1/jaxbn.batch_norm/reduce_sum"


def _compiled():
    f = jax.jit(lambda x, a: (jnp.sum(x * a - 1.0, axis=0), jnp.tanh(x) + a))
    args = (jnp.ones((256, 8)), jnp.ones(8))
    return f, args, f.lower(*args).compile().as_text()


def test_kernels_of_names_the_entry_kernels_with_their_operations():
    _, _, text = _compiled()
    found = kernels.kernels_of(text)
    assert found, text
    ops = " ".join(kernel.ops for kernel in found.values())
    assert "reduce" in ops and "tanh" in ops, found
    # parameters, constants and plumbing are not kernels
    assert all(not name.startswith(("x", "a", "constant")) for name in found), found
    assert any(kernel.op_name.startswith("jit(") for kernel in found.values()), found


def test_kind_and_source_group_kernels():
    assert kernels.kind("ynn_fusion.12") == "ynn_fusion" == kernels.kind("ynn_fusion")
    assert kernels.kind("wrapped_convert.5.1") == "wrapped_convert"
    backward = kernels.Kernel("f32[16]", "reduce", OP_NAME)
    assert kernels.source(backward) == "BasicBlock_0/BatchNorm_1 backward"
    forward = backward._replace(op_name="jit(step)/jvp(ResNet)/Conv_0/conv_general_dilated")
    assert kernels.source(forward) == "Conv_0 forward"
    assert kernels.source(backward._replace(op_name="jit(step)/add")) == "other"


def test_profile_times_the_kernels_the_program_names():
    f, args, text = _compiled()
    profile = kernels.profile(lambda: jax.block_until_ready(f(*args)), text, calls=2)
    assert profile.wall_ms > 0
    assert profile.us_per_call and set(profile.us_per_call) <= set(profile.kernels)
    assert all(us >= 0 for us in profile.us_per_call.values())
