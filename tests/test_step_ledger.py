"""experiments/step_ledger.py's ledger of a compiled step: each kernel's bytes (a fused slice charged what it takes
of its operand, a while body times its known trip count) and its component, on hand-written HLO and on a CPU
compile. The GPU compile itself needs the CUDA plugin wheels and is not run here."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.step_ledger import format_ledgers, kernels, ledger, stack_shares, type_bytes

HLO = """HloModule m

%fused_slice (p0: bf16[1024,256]) -> bf16[1024,128] {
  %p0 = bf16[1024,256]{1,0} parameter(0)
  ROOT %s = bf16[1024,128]{1,0} slice(%p0), slice={[0:1024], [0:128]}
}

%fused_add (p0.1: f32[64], p1: f32[64]) -> f32[64] {
  %p0.1 = f32[64]{0} parameter(0)
  %p1 = f32[64]{0} parameter(1)
  ROOT %a = f32[64]{0} add(%p0.1, %p1), metadata={op_name="jit(train_step)/optimizer/add"}
}

%body (t: (s32[], f32[64])) -> (s32[], f32[64]) {
  %t = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %v = f32[64]{0} get-tuple-element(%t), index=1
  %add.1 = f32[64]{0} fusion(%v, %v), kind=kLoop, calls=%fused_add, metadata={op_name="jit(train_step)/optimizer/add"}
  ROOT %r = (s32[], f32[64]{0}) tuple(%i, %add.1)
}

%fused_fill () -> f32[64] {
  %z = f32[] constant(0)
  ROOT %b = f32[64]{0} broadcast(%z), dimensions={}
}

%heavy (a: (f32[64])) -> (f32[64]) {
  %a = (f32[64]{0}) parameter(0)
  %v.1 = f32[64]{0} get-tuple-element(%a), index=0
  %dbl = f32[64]{0} fusion(%v.1, %v.1), kind=kLoop, calls=%fused_add, metadata={op_name="jit(train_step)/experts/k"}
  ROOT %r.1 = (f32[64]{0}) tuple(%dbl)
}

%light (e: (f32[64])) -> (f32[64]) {
  %e = (f32[64]{0}) parameter(0)
  %fill = f32[64]{0} fusion(), kind=kLoop, calls=%fused_fill
  ROOT %r.2 = (f32[64]{0}) tuple(%fill)
}

ENTRY %main (x: bf16[1024,256], y: f32[64], p: pred[]) -> (bf16[1024,128], f32[64]) {
  %x = bf16[1024,256]{1,0} parameter(0)
  %y = f32[64]{0} parameter(1)
  %p = pred[] parameter(2)
  %ty = (f32[64]{0}) tuple(%y)
  %cnd = (f32[64]{0}) conditional(%p, %ty, %ty), true_computation=%heavy, false_computation=%light
  %sl = bf16[1024,128]{1,0} fusion(%x), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(train_step)/experts/s"}
  %c = s32[] constant(0)
  %tup = (s32[], f32[64]{0}) tuple(%c, %y)
  %w = (s32[], f32[64]{0}) while(%tup), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %out = f32[64]{0} get-tuple-element(%w), index=1
  ROOT %res = (bf16[1024,128]{1,0}, f32[64]{0}) tuple(%sl, %out)
}
"""


def test_ledger_charges_slices_what_they_take_and_loops_their_trips():
    assert type_bytes("(bf16[2,3]{1,0}, f8e4m3fn[4], s32[])") == 12 + 4 + 4
    got = {name: (opcode, nbytes, runs) for name, opcode, nbytes, runs in kernels(HLO)}
    # the slice reads half of x: 256 KiB out, 256 KiB in (not x's 512 KiB)
    assert got["sl"] == ("fusion", 2 * 1024 * 128 * 2, 1)
    # the loop body's add: 64 floats out, two 64-float operands, five trips
    assert got["add.1"] == ("fusion", 5 * 3 * 64 * 4, 5)
    # a predicated conditional: one branch runs, charged the heavier (the kernel, not the fill)
    assert got["dbl"] == ("fusion", 3 * 64 * 4, 1)
    assert set(got) == {"sl", "add.1", "dbl"}  # no kernel for parameters, constants, tuples, the while or the cond
    per, kinds = ledger(HLO)
    assert per["casts/copies"] == [1, 2 * 1024 * 128 * 2] and per["optimizer"] == [5, 5 * 3 * 64 * 4]
    assert per["experts"] == [1, 3 * 64 * 4]
    table = format_ledgers({"a": (per, kinds), "b": (per, kinds)}, ["optimizer"])
    assert "| optimizer | 5 | 0.00 | 5 | 0.00 |" in table and "| total | 7 |" in table


def test_ledger_of_a_cpu_compile():
    """A real compiled module: one kernel's bytes lie between its output and its output plus its whole operand."""
    x = jnp.ones((512, 256), jnp.float32)
    text = jax.jit(lambda x: x[:, :128] * 2.0).lower(x).compile().as_text()
    found = kernels(text)
    out = 512 * 128 * 4
    assert found and all(out <= nbytes <= out + x.nbytes for _, _, nbytes, _ in found)


def test_a_grouped_gemm_on_a_layer_stack_is_charged_its_layers_groups():
    """fp8_gmm with a group_offset takes every layer's e4m3 weights [T, N, K] and reads its G groups, which its
    column scales [G, K / 128, N] name: G / T of the stack is charged (forward and dgrad orientations alike); a
    GEMM given just its own groups, and any other operand, as they are."""
    ops = ["s32[3]{0}", "f8e4m3fn[4096,1024]{1,0}", "f32[8,4096]{1,0}", "f8e4m3fn[715,1024,512]{2,1,0}"]
    layer = stack_shares([*ops, "f32[65,4,1024]{2,1,0}"], [12, 4e6, 1.3e5, 715.0, 6.5e4])
    assert layer == [12, 4e6, 1.3e5, 65.0, 6.5e4]
    dgrad = stack_shares(["f8e4m3fn[715,512,1024]{2,1,0}", "f32[65,8,512]{2,1,0}"], [715.0, 1.0])
    assert dgrad == [65.0, 1.0]
    own = stack_shares([*ops[:3], "f8e4m3fn[65,1024,512]{2,1,0}", "f32[65,4,1024]{2,1,0}"], [1, 2, 3, 65.0, 5])
    assert own == [1, 2, 3, 65.0, 5]
