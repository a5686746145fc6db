"""benchmarks/kernel_trace.py: per-step kernel statistics from a trace (a synthetic GPU one, a real CPU one)."""

import gzip
import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import kernel_trace  # noqa: E402

GPU, HOST, STREAM, OPS = 1, 2, 10, 11


def write_trace(log_dir, events):
    run_dir = os.path.join(log_dir, "plugins", "profile", "2026_12_03_00_00_00")
    os.makedirs(run_dir)
    metadata = [
        {"ph": "M", "pid": GPU, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": HOST, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": GPU, "tid": STREAM, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": GPU, "tid": OPS, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": HOST, "tid": STREAM, "name": "thread_name", "args": {"name": "Stream lookalike"}},
    ]
    with gzip.open(os.path.join(run_dir, "perfetto_trace.json.gz"), "wt") as f:
        json.dump({"traceEvents": metadata + events}, f)


def kernel(name, ts, dur, pid=GPU, tid=STREAM):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_summary_counts_stream_kernels_per_call(tmp_path):
    events = []
    for call in range(2):  # two calls of one step, 100 us apart
        t = 100.0 * call
        events += [kernel("gla_forward", t, 20.0), kernel("loop_add_fusion_3", t + 10.0, 5.0),  # overlaps gla
                   kernel("sm90_xmma_gemm_bf16bf16_bf16f32", t + 30.0, 40.0), kernel("gla_state_grad", t + 80.0, 10.0)]
    events += [kernel("fusion.12", 5.0, 999.0, tid=OPS),   # the per-op view of the same work: not a kernel
               kernel("fusion.12", 5.0, 999.0, pid=HOST)]  # host activity
    write_trace(str(tmp_path), events)

    summary = kernel_trace.summarize(str(tmp_path), calls=2)

    assert summary["kernels"] == 4
    assert summary["kernel_ms"] == pytest.approx(0.075)
    assert summary["busy_ms"] == pytest.approx(0.070)  # the fusion inside gla_forward's interval counts once
    assert summary["span_ms"] == pytest.approx(0.095)  # 0 to 190 us over two calls
    assert summary["by_kind"] == {
        "matmul": {"count": 1, "ms": pytest.approx(0.040)},
        "pallas gla": {"count": 2, "ms": pytest.approx(0.030)},
        "xla fusion": {"count": 1, "ms": pytest.approx(0.005)},
    }
    assert [row["name"] for row in summary["longest"]][:2] == ["sm90_xmma_gemm_bf16bf16_bf16f32", "gla_forward"]
    table = kernel_trace.format_summary(summary, "DiG-S/2")
    assert table.startswith("DiG-S/2: 4 kernels per call, 0.075 ms summed, 0.070 ms busy")
    assert "| pallas gla | 2 | 0.030 | 15.0 |" in table


def test_kinds_of_kernel_names():
    assert kernel_trace.kind_of("depthwise_conv3x3_backward") == "pallas conv"
    assert kernel_trace.kind_of("cudnn_generated_fort_native_sdpa_sm90") == "attention (cuDNN)"
    assert kernel_trace.kind_of("input_reduce_fusion_7") == "xla fusion"
    assert kernel_trace.kind_of("something_else") == "other"


def test_cpu_trace_has_no_device_kernels(tmp_path):
    step = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((64, 64))
    step(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        step(x).block_until_ready()
    summary = kernel_trace.summarize(str(tmp_path), calls=1)
    assert summary["kernels"] == 0 and summary["by_kind"] == {} and summary["span_ms"] == 0.0


def test_missing_trace_and_bad_calls_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="log_dir="):
        kernel_trace.summarize(str(tmp_path), calls=1)
    write_trace(str(tmp_path), [])
    with pytest.raises(ValueError, match="calls must be >= 1"):
        kernel_trace.summarize(str(tmp_path), calls=0)


def test_conv_tiles_sweep_counts_each_kernel_for_the_tiles_that_ran_it():
    import depthwise_conv_tiles
    import tiles_sweep

    from pallas_kernels.depthwise_conv import Tiles

    def kernel(name, ts, dur):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur}

    events = [kernel("loop_reverse_fusion", 0, 1.0),  # before any conv kernel: nobody's
              kernel("depthwise_conv3x3_t64_c128_w4_s1", 10, 5.0),
              kernel("depthwise_conv3x3_backward_t64_c128_w4_s1", 20, 9.0),
              kernel("input_reduce_fusion", 30, 2.0),
              kernel("depthwise_conv3x3_t16_c64_w2_s8", 40, 3.0),
              kernel("depthwise_conv3x3_backward_t16_c64_w2_s8", 50, 7.0),
              kernel("input_reduce_fusion", 60, 4.0),
              kernel("depthwise_conv3x3_backward_t64_c128_w4_s1", 15, 1.0)]  # out of order: sorted by time
    totals = tiles_sweep.device_us_by_tiles(events, depthwise_conv_tiles.KERNEL_NAME, depthwise_conv_tiles.tiles_of)
    assert totals == {Tiles(64, 128, 4, 1): {"forward_us": 5.0, "backward_us": 10.0, "xla_us": 2.0},
                      Tiles(16, 64, 2, 8): {"forward_us": 3.0, "backward_us": 7.0, "xla_us": 4.0}}
    assert all(2 <= t.tokens * t.channels // (32 * t.num_warps) <= (32 if t.steps == 1 else 4)
               and 1152 % t.channels == 0
               for t in depthwise_conv_tiles.candidates(1152))
