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
