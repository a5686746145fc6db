"""benchmarks/hlo_report.py: kernels and forward-to-backward values of optimized HLO (synthetic and CPU-compiled)."""
# ruff: noqa: E501  (the HLO fixture keeps XLA's one-instruction-per-line form)

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import hlo_report  # noqa: E402

# A step as XLA:GPU prints it: a while loop whose body runs a cuBLAS call (output and workspace), a fusion with two
# outputs, a bitcast of one of them, a Pallas kernel, and backward instructions reading forward values.
HLO = """HloModule jit_multi_step, is_scheduled=true

%fused_gate (p0: bf16[8,4]) -> (f32[8,4], f32[8,4]) {
  %p0 = bf16[8,4]{1,0} parameter(0)
  %c = f32[8,4]{1,0} convert(%p0), metadata={op_name="jvp()/convert_element_type"}
  ROOT %t = (f32[8,4]{1,0}, f32[8,4]{1,0}) tuple(%c, %c)
}

%body (state: (s32[], bf16[8,4])) -> (s32[], bf16[8,4]) {
  %state = (s32[], bf16[8,4]{1,0}) parameter(0)
  %x = bf16[8,4]{1,0} get-tuple-element(%state), index=1
  %mm = (bf16[8,16]{1,0}, s8[1048576]{0}) custom-call(%x, %x), custom_call_target="__cublas$lt$matmul", metadata={op_name="jvp()/dot_general"}
  %gate = (f32[8,4]{1,0}, f32[8,4]{1,0}) fusion(%x), kind=kLoop, calls=%fused_gate, metadata={op_name="jvp()/div"}
  %view = f32[2,4,4]{2,1,0} bitcast(%gate#0), metadata={op_name="jvp()/div"}
  %gla = bf16[8,4]{1,0} custom-call(%view), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jvp(gla_forward)/pallas_call"}
  %dx = bf16[8,4]{1,0} fusion(%mm#0, %gate#1, %view, %gla, %x), kind=kInput, calls=%fused_gate, metadata={op_name="transpose(jvp())/mul"}
  %dw = bf16[8,4]{1,0} fusion(%gate#0, %dx), kind=kLoop, calls=%fused_gate, metadata={op_name="transpose(jvp())/add_any"}
  %i = s32[] get-tuple-element(%state), index=0
  ROOT %out = (s32[], bf16[8,4]{1,0}) tuple(%i, %dw)
}

%cond (state.1: (s32[], bf16[8,4])) -> pred[] {
  %state.1 = (s32[], bf16[8,4]{1,0}) parameter(0)
  ROOT %false = pred[] constant(false)
}

ENTRY %main (arg: bf16[8,4]) -> bf16[8,4] {
  %arg = bf16[8,4]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,4]{1,0}) tuple(%zero, %arg)
  %loop = (s32[], bf16[8,4]{1,0}) while(%init), condition=%cond, body=%body
  %copy.1 = bf16[8,4]{1,0} copy(%arg)
  ROOT %result = bf16[8,4]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_kernels_and_residuals_of_a_synthetic_step():
    computations, entry = hlo_report.parse(HLO)
    assert entry == "main" and set(computations) == {"fused_gate", "body", "cond", "main"}
    instructions = hlo_report.executed(computations, entry)
    assert hlo_report.kernel_counts(instructions) == {
        "copy": 1, "__cublas$lt$matmul": 1, "fusion kLoop": 2, "fusion kInput": 1, "__gpu$xla.gpu.triton": 1}
    residuals = hlo_report.forward_residuals(instructions)
    # mm: its output only, not the workspace; gate: both outputs, output 0 once though read directly and through
    # the bitcast; gla; x is a loop parameter, not a forward value; dx is a backward value.
    mib = 2 ** -20
    assert residuals == {
        ("dot_general", "bf16[8,16]"): (1, pytest.approx(256 * mib)),
        ("div", "f32[8,4]"): (2, pytest.approx(256 * mib)),
        ("pallas_call", "bf16[8,4]"): (1, pytest.approx(64 * mib)),
    }
    assert hlo_report.kernels_by_pass(instructions) == {
        ("forward", "dot_general"): 1, ("forward", "div"): 1, ("forward", "pallas_call"): 1,
        ("backward", "mul"): 1, ("backward", "add_any"): 1, ("update", "?"): 1}  # the copy has no op_name
    text = hlo_report.report(HLO, "step")
    assert text.startswith("step: 6 kernels per run")
    assert "| forward | 3 |  |" in text and "| update | 1 | ? 1 |" in text
    assert "| div | f32[8,4] | 2 | 0.0 |" in text


def test_a_cpu_compiled_gradient_parses():
    def loss(w, x):
        return jnp.sum(jnp.sin(x @ w) @ w.T)

    text = jax.jit(jax.grad(loss)).lower(jnp.ones((64, 64)), jnp.ones((32, 64))).compile().as_text()
    computations, entry = hlo_report.parse(text)
    instructions = hlo_report.executed(computations, entry)
    assert instructions and all(instruction.name for instruction in instructions)
    assert sum(hlo_report.kernel_counts(instructions).values()) >= 2  # at least the two matmuls of the gradient


def test_text_without_an_entry_is_refused():
    with pytest.raises(ValueError, match="no ENTRY computation"):
        hlo_report.parse("%f (x: f32[]) -> f32[] {\n  ROOT %x = f32[] parameter(0)\n}\n")


# A module with XLA's stack-frame tables: frame 2 is a call to `gate` made from `step` (frame 1).
HLO_WITH_FRAMES = """HloModule jit_step

FileNames
1 "/any/where/dig_jax/train.py"
2 "/any/where/dig_jax/models/dig.py"

FunctionNames
1 "step"
2 "gate"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=9}
2 {file_name_id=2 function_name_id=2 line=42 end_line=42 column=1 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}


%fused_mul (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %e = f32[8]{0} exponential(%p0), metadata={op_name="jit(step)/jvp()/exp" stack_frame_id=2}
  ROOT %m = f32[8]{0} multiply(%e, %p0), metadata={op_name="jit(step)/transpose(jvp())/mul" stack_frame_id=1}
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  ROOT %loop_multiply_fusion.3 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_mul, metadata={op_name="jit(step)/transpose(jvp())/mul"}
}
"""


def test_kernel_names_of_a_profile_are_looked_up_with_their_ops_and_source_lines():
    assert hlo_report.source_frames(HLO_WITH_FRAMES) == {1: "dig_jax/train.py:10 (step)",
                                                         2: "models/dig.py:42 (gate)"}
    table = hlo_report.kernel_sources(HLO_WITH_FRAMES, ["loop_multiply_fusion_3", "nvjet_sm90_gemm"])
    assert ("| loop_multiply_fusion_3 | loop_multiply_fusion.3 | f32[8]{0} | exp, mul | "
            "dig_jax/train.py:10 (step); models/dig.py:42 (gate) |") in table
    assert "| nvjet_sm90_gemm | not in this module |" in table


def test_a_cpu_compiled_fusion_is_traced_to_this_file():
    def loss(x):
        return jnp.sum(jnp.sin(x) * 2)

    text = jax.jit(jax.grad(loss)).lower(jnp.ones(8)).compile().as_text()
    computations, entry = hlo_report.parse(text)
    fusions = [i.name for i in hlo_report.executed(computations, entry) if i.opcode == "fusion"]
    assert fusions
    table = hlo_report.kernel_sources(text, fusions)
    assert "tests/test_hlo_report.py:" in table and "<locals>.loss)" in table, table
