"""The Pallas Triton GLA kernels (impl="pallas" on GPU), run on CPU in Pallas interpret mode.

Checks the kernels' forward and backward against the float32 token-by-token reference, the Triton lowering of
every kernel (jax.export for CUDA, so an op the real lowering rejects fails here), and the shard_map wrapper on
8 host devices. Shapes are small: interpret mode compiles slowly.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dig_jax.models.layers import REMAT_POLICIES, SEQUENCE_MIXER_OUTPUT
from pallas_kernels import gla_triton as gla_triton_module
from pallas_kernels.gla_pallas import gla_pallas, shard_over_batch_and_heads
from pallas_kernels.gla_reference import gla_reference
from pallas_kernels.gla_triton import CHUNK, FACTORISED_GATE_LIMIT, TritonConfig, gla_triton
from pallas_kernels.testing import STRONG_GATES, WEAK_GATES, make_inputs, rms_rel_err
from pallas_kernels.token_grid import transpose_grid

OUTPUT_TOLERANCE = {jnp.float32: 4e-3, jnp.bfloat16: 1e-2}
GRAD_TOLERANCE = {jnp.float32: 5e-3, jnp.bfloat16: 1e-2}
NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dinitial_state")
interpreted = functools.partial(gla_triton, interpret=True)


def gate_inputs(seed, batch, seq_len, heads, key_dim, value_dim, *, gates, dtype, with_initial_state):
    """make_inputs with weak gates everywhere (gates="weak": every chunk takes the factorised intra-chunk path),
    or weak gates in head 0 and strong gates (fla's n = 0.1) in the other heads (gates="mixed": one call takes
    both the factorised path and the exact per-channel one)."""
    dims = (batch, seq_len, heads, key_dim, value_dim)
    q, k, v, g_weak, initial_state = make_inputs(seed, *dims, gate_strength=WEAK_GATES, dtype=dtype,
                                                 with_initial_state=with_initial_state)
    if gates == "weak":
        return q, k, v, g_weak, initial_state
    g_strong = make_inputs(seed + 1, *dims, gate_strength=STRONG_GATES, dtype=dtype)[3]
    g = jnp.concatenate([g_weak[:, :, :1], g_strong[:, :, 1:]], axis=2)
    return q, k, v, g, initial_state


def cotangents(seed, batch, seq_len, heads, key_dim, value_dim, dtype):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((batch, seq_len, heads, value_dim)), dtype),
            jnp.asarray(rng.standard_normal((batch, heads, key_dim, value_dim)), jnp.float32))


@functools.partial(jax.jit, static_argnames=("impl", "reverse"))
def outputs_and_grads(q, k, v, g, initial_state, o_cotangent, state_cotangent, *, impl, reverse):
    """(o, final_state, dq, dk, dv, dg, dinitial_state) for the given cotangents of (o, final_state)."""

    def gla(q, k, v, g, initial_state):
        return impl(q, k, v, g, scale=q.shape[-1] ** -0.5, initial_state=initial_state, reverse=reverse)

    (o, final_state), vjp = jax.vjp(gla, q, k, v, g, initial_state)
    return (o, final_state, *vjp((o_cotangent, state_cotangent)))


def per_head_error(name, actual, expected):
    """Worst RMS-relative error over heads: a head with strong gates has small gradients that the other heads'
    would hide in one norm over all elements."""
    axis = 1 if name in ("final_state", "dinitial_state") else 2  # [B, H, K, V] or [B, T, H, D]
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected)
    return max(rms_rel_err(np.take(actual, head, axis), np.take(expected, head, axis))
               for head in range(actual.shape[axis]))


def assert_matches_reference(actual, inputs, cotangent, reverse, dtype):
    upcast = [None if x is None else x.astype(jnp.float32) for x in (*inputs, *cotangent)]
    expected = outputs_and_grads(*upcast, impl=gla_reference, reverse=reverse)
    errors = {name: per_head_error(name, a, e) for name, a, e in zip(NAMES, actual, expected) if e is not None}
    tolerances = {name: (OUTPUT_TOLERANCE if name in NAMES[:2] else GRAD_TOLERANCE)[dtype] for name in errors}
    assert all(errors[name] < tolerances[name] for name in errors), (errors, tolerances)


# (B, T, H, K, V, reverse, with_initial_state, dtype, gates). T=100 and 130 end in a partial chunk; T=1 is all
# padding.
CASES = [
    (1, 100, 2, 16, 32, False, True, jnp.float32, "mixed"),
    (1, 100, 2, 16, 32, True, True, jnp.float32, "mixed"),
    (1, 130, 2, 16, 32, False, True, jnp.bfloat16, "mixed"),
    (1, 130, 2, 16, 32, True, True, jnp.bfloat16, "weak"),
    (1, 100, 2, 16, 32, False, False, jnp.float32, "weak"),
    (2, 1, 1, 16, 16, True, False, jnp.float32, "weak"),
    # DiG-XL/2-paper's heads (K=36, V=72) and heads below the 16-wide dot tiles: zero-padded to powers of two.
    (1, 100, 2, 36, 72, True, True, jnp.float32, "mixed"),
    (1, 70, 1, 8, 24, False, True, jnp.bfloat16, "weak"),
]


@pytest.mark.parametrize("chunk_parallel", [False, True], ids=["sequential", "chunk_parallel"])
@pytest.mark.parametrize("batch, seq_len, heads, key_dim, value_dim, reverse, with_initial_state, dtype, gates",
                         CASES)
def test_kernels_match_reference(batch, seq_len, heads, key_dim, value_dim, reverse, with_initial_state, dtype,
                                 gates, chunk_parallel):
    dims = (batch, seq_len, heads, key_dim, value_dim)
    inputs = gate_inputs(seq_len, *dims, gates=gates, dtype=dtype, with_initial_state=with_initial_state)
    chunk_decay = (-np.asarray(inputs[3][:, :CHUNK], np.float32).sum(axis=1)).max()
    # "mixed" must really have chunks beyond the factorisation's limit, "weak" none
    assert (chunk_decay > FACTORISED_GATE_LIMIT) == (gates == "mixed")
    cotangent = cotangents(seq_len + 1, *dims, dtype)
    impl = functools.partial(interpreted, config=TritonConfig(chunk_parallel=chunk_parallel))
    actual = outputs_and_grads(*inputs, *cotangent, impl=impl, reverse=reverse)
    o, final_state, dq, dk, dv, dg, dinitial_state = actual
    assert o.dtype == dtype and final_state.dtype == jnp.float32
    assert [x.dtype for x in (dq, dk, dv, dg)] == [dtype] * 4
    assert (dinitial_state is None) == (not with_initial_state)
    assert_matches_reference(actual, inputs, cotangent, reverse, dtype)


@pytest.mark.parametrize("chunk_parallel", [False, True], ids=["sequential", "chunk_parallel"])
@pytest.mark.parametrize("seq_len, reverse, dtype", [(100, False, jnp.float32), (144, True, jnp.bfloat16)])
def test_column_major_scan_matches_reference_on_the_transposed_grid(seq_len, reverse, dtype, chunk_parallel):
    """column_major=True on raster-ordered arrays equals the scan of the transposed grid (10 x 10: a partial last
    chunk; 12 x 12), o and the input gradients transposed back."""
    dims = (1, seq_len, 2, 16, 32)
    inputs = gate_inputs(7, *dims, gates="mixed", dtype=dtype, with_initial_state=True)
    cotangent = cotangents(8, *dims, dtype)
    impl = functools.partial(interpreted, column_major=True, config=TritonConfig(chunk_parallel=chunk_parallel))
    o, final_state, dq, dk, dv, dg, dinitial_state = outputs_and_grads(*inputs, *cotangent, impl=impl,
                                                                       reverse=reverse)
    as_scanned = (transpose_grid(o), final_state, *map(transpose_grid, (dq, dk, dv, dg)), dinitial_state)
    assert_matches_reference(as_scanned, (*map(transpose_grid, inputs[:4]), inputs[4]),
                             (transpose_grid(cotangent[0]), cotangent[1]), reverse, dtype)


def test_value_blocks_and_fix_up_match_reference():
    """V split over two programs per (batch, head): each reports its own gate strength, and the fix-up kernels
    read both."""
    dims = (1, 100, 2, 16, 32)
    inputs = gate_inputs(5, *dims, gates="mixed", dtype=jnp.float32, with_initial_state=True)
    cotangent = cotangents(6, *dims, jnp.float32)
    impl = functools.partial(gla_triton, interpret=True, config=TritonConfig(value_block=16))
    actual = outputs_and_grads(*inputs, *cotangent, impl=impl, reverse=False)
    assert_matches_reference(actual, inputs, cotangent, False, jnp.float32)


def _shape_structs(batch, seq_len, heads, key_dim, value_dim, dtype):
    sequence = functools.partial(jax.ShapeDtypeStruct, dtype=dtype)
    return (sequence((batch, seq_len, heads, key_dim)), sequence((batch, seq_len, heads, key_dim)),
            sequence((batch, seq_len, heads, value_dim)), sequence((batch, seq_len, heads, key_dim)),
            jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32))


def cuda_kernel_names(fn, *args):
    """The Pallas kernels in fn's real Triton lowering for CUDA (jax.export; no GPU needed), in program order."""
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    module = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
    names = re.findall(r'name = "(gla_\w+)"', module)
    assert len(names) == module.count("__gpu$xla.gpu.triton")
    return names


# Kernels of the forward, and of the vjp: its o is unused, so the forward's o kernels are dead code there.
SCHEDULE_KERNELS = {
    False: ({"gla_forward", "gla_forward_fix_up"},
            {"gla_forward", "gla_state_grad", "gla_chunk_grad", "gla_chunk_grad_fix_up"}),
    True: ({"gla_chunk_summary", "gla_scan", "gla_output", "gla_output_fix_up"},
           {"gla_chunk_summary", "gla_scan", "gla_chunk_grad", "gla_chunk_grad_fix_up"}),
}


@pytest.mark.parametrize("column_major", [False, True], ids=["raster", "column_major"])
@pytest.mark.parametrize("chunk_parallel", [False, True], ids=["sequential", "chunk_parallel"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_and_vjp_lower_for_cuda(dtype, chunk_parallel, column_major):
    """Runs the real Triton lowering (no GPU needed) of every forward and backward kernel of a schedule, with the
    rows read in raster order (slices) and column-major over a 10 x 10 grid (gathers)."""
    batch, seq_len, heads, key_dim, value_dim = 2, 100, 3, 32, 64
    inputs = _shape_structs(batch, seq_len, heads, key_dim, value_dim, dtype)
    cotangent = (jax.ShapeDtypeStruct((batch, seq_len, heads, value_dim), dtype), inputs[-1])
    config = TritonConfig(chunk_parallel=chunk_parallel)

    def forward(q, k, v, g, initial_state):
        return gla_triton(q, k, v, g, scale=0.2, initial_state=initial_state, reverse=True,
                          column_major=column_major, config=config)

    def vjp(q, k, v, g, initial_state, o_cotangent, state_cotangent):
        return jax.vjp(forward, q, k, v, g, initial_state)[1]((o_cotangent, state_cotangent))

    forward_kernels, vjp_kernels = SCHEDULE_KERNELS[chunk_parallel]
    assert set(cuda_kernel_names(forward, *inputs)) == forward_kernels
    vjp_names = cuda_kernel_names(vjp, *inputs, *cotangent)
    assert set(vjp_names) == vjp_kernels and len(vjp_names) == 4 + 2 * chunk_parallel  # two summaries and scans


def test_calls_without_a_config_use_the_module_default(monkeypatch):
    """What chunk_gla's callers (the models) get; benchmarks/train_step.py swaps it to time the other schedule."""
    inputs = _shape_structs(1, 200, 2, 32, 64, jnp.bfloat16)

    def kernel_names():  # a new function each time: jit would reuse the trace of the same one
        def forward(q, k, v, g, initial_state):
            return gla_triton(q, k, v, g, scale=0.125, initial_state=initial_state, reverse=False)

        return set(cuda_kernel_names(forward, *inputs))

    assert kernel_names() == SCHEDULE_KERNELS[False][0]
    monkeypatch.setattr(gla_triton_module, "DEFAULT_CONFIG", TritonConfig(chunk_parallel=True))
    assert kernel_names() == SCHEDULE_KERNELS[True][0]


@pytest.mark.parametrize("chunk_parallel", [False, True], ids=["sequential", "chunk_parallel"])
def test_remat_matmuls_policy_runs_the_forward_kernels_once(chunk_parallel):
    """Under the models' remat "matmuls" policy the per-chunk states (CHECKPOINT_NAME) are kept, so the backward
    pass does not run the forward kernels a second time to remake them."""
    batch, seq_len, heads, key_dim = 1, 128, 2, 16
    config = TritonConfig(chunk_parallel=chunk_parallel)

    def layer(kernel, x):  # input projections, log-sigmoid gate, GLA: the shape of DiG's use
        q, k, v, g = (y.reshape(batch, seq_len, heads, key_dim) for y in jnp.split(x @ kernel, 4, axis=-1))
        o, _ = gla_triton(q, k, v, jax.nn.log_sigmoid(g) / 16, scale=0.25, initial_state=None, reverse=False,
                          config=config)
        return jnp.sum(jnp.tanh(checkpoint_name(o, SEQUENCE_MIXER_OUTPUT)))

    kernel = jax.ShapeDtypeStruct((heads * key_dim, 4 * heads * key_dim), jnp.float32)
    x = jax.ShapeDtypeStruct((batch, seq_len, heads * key_dim), jnp.float32)
    plain = cuda_kernel_names(jax.grad(layer), kernel, x)
    remat = cuda_kernel_names(jax.grad(jax.checkpoint(layer, policy=REMAT_POLICIES["matmuls"])), kernel, x)
    assert sorted(remat) == sorted(plain)
    assert remat.count("gla_scan" if chunk_parallel else "gla_forward") == (2 if chunk_parallel else 1)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_over_batch_and_heads(axis_type):
    """Under jit with B and H sharded on a ("data", "model") mesh, the kernels run per shard and match the
    unsharded reference, forward and backward."""
    dims = (4, 70, 2, 16, 16)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    inputs = gate_inputs(3, *dims, gates="mixed", dtype=jnp.float32, with_initial_state=True)
    cotangent = cotangents(4, *dims, jnp.float32)
    kernel = functools.partial(shard_over_batch_and_heads, functools.partial(interpreted, scale=0.25,
                                                                             reverse=False))
    with jax.set_mesh(mesh):
        sequence, state = NamedSharding(mesh, P("data", None, "model")), NamedSharding(mesh, P("data", "model"))
        placed = [jax.device_put(x, s) for x, s in zip(inputs, (sequence,) * 4 + (state,))]

        @jax.jit
        def run(q, k, v, g, initial_state, o_cotangent, state_cotangent):
            def gla(q, k, v, g, initial_state):
                return kernel(q, k, v, g, initial_state)

            (o, final_state), vjp = jax.vjp(gla, q, k, v, g, initial_state)
            return (o, final_state, *vjp((o_cotangent, state_cotangent)))

        actual = run(*placed, *cotangent)
    assert actual[0].sharding.is_equivalent_to(sequence, 4)
    upcast = [x.astype(jnp.float32) for x in (*inputs, *cotangent)]
    expected = outputs_and_grads(*upcast, impl=gla_reference, reverse=False)
    for name, a, e in zip(NAMES, actual, expected):
        assert rms_rel_err(np.asarray(a), e) < 5e-3, name


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU refusal")
def test_pallas_impl_needs_gpu_or_tpu():
    q, k, v, g, _ = make_inputs(0, 1, 4, 1, 16, 16, gate_strength=WEAK_GATES)
    with pytest.raises(ValueError, match="needs a GPU or TPU"):
        gla_pallas(q, k, v, g, scale=0.25, initial_state=None, reverse=False)


def test_unsupported_value_block_raises():
    q, k, v, g, _ = make_inputs(0, 1, 4, 1, 32, 64, gate_strength=WEAK_GATES)
    with pytest.raises(ValueError, match=r"config.value_block\b"):
        gla_triton(q, k, v, g, scale=0.25, initial_state=None, reverse=False, config=TritonConfig(value_block=48))


@pytest.mark.parametrize("programs,stages", [
    (6144, 3), (2304, 3),  # many programs per SM (T <= 1024 at the anchor batches): three share an SM
    (576, 4),              # 4.4 per SM (XL, T=4096): two per SM smooth the last round
    (384, 6),              # 2.9 per SM (S, T=4096): three full rounds of one deep-pipelined program
    (144, 3),              # 1.1 per SM (XL, T=16384): one per SM would leave a mostly idle second round
    (96, 3),               # fewer programs than SMs
])
def test_forward_stages_follow_programs_per_multiprocessor(monkeypatch, programs, stages):
    monkeypatch.setattr(gla_triton_module, "_multiprocessor_count", lambda: 132)  # an H100
    assert gla_triton_module._forward_stages(programs) == stages


@pytest.mark.parametrize("programs,seq_len,chunk_parallel", [
    (6, 12_544, True), (12, 4096, True), (24, 16_384, True),  # most SMs idle, long walks: measured faster
    (48, 16_384, False), (96, 4096, False),                   # a tie at 48 programs, slower at 96
    (6, 1024, False),                                         # 16 chunks: launch-bound, no faster
])
def test_chunk_parallel_schedule_is_picked_by_grid_size(monkeypatch, programs, seq_len, chunk_parallel):
    monkeypatch.setattr(gla_triton_module, "_multiprocessor_count", lambda: 132)
    plans = []
    monkeypatch.setattr(gla_triton_module, "_gla", lambda *args: plans.append(args[-1]) or (None, None))
    q, k, v, g = _shape_structs(programs // 2, seq_len, 2, 32, 64, jnp.bfloat16)[:4]
    gla_triton(q, k, v, g, scale=0.125, initial_state=None, reverse=False)
    assert plans[-1].chunk_parallel is chunk_parallel
    gla_triton(q, k, v, g, scale=0.125, initial_state=None, reverse=False, config=TritonConfig(chunk_parallel=False))
    assert plans[-1].chunk_parallel is False  # an explicit choice wins


def test_forward_stages_default_without_a_gpu(monkeypatch):
    monkeypatch.setattr(gla_triton_module, "_multiprocessor_count", lambda: None)
    assert gla_triton_module._forward_stages(384) == 3
