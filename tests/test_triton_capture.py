"""pallas_kernels.triton_capture: the Pallas Triton lowering's custom call renamed to the graph-compatible target.
jaxlib 0.10.2 (CI, CPU) lowers Triton kernels to XLA's own `__gpu$xla.gpu.triton`, not to jaxlib's FFI handler,
and has no CUDA Triton runtime: the rename is checked here by pointing SOURCE at that target; whether the GPU
then records the kernels into CUDA graphs is measured on the device (experiments/BENCHMARKS.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src.pallas import core as pallas_core

from pallas_kernels import fp8_gemm as f8
from pallas_kernels import triton_capture


def _lowered(x):
    return jax.jit(lambda a: f8.quantize_tiles(a, backend="gpu")).trace(x).lower(lowering_platforms=("cuda",))


def test_renamed_lowering_emits_the_graph_compatible_target(monkeypatch):
    x = jax.ShapeDtypeStruct((256, 384), jnp.bfloat16)
    plain = _lowered(x).as_text()
    source = "xla.gpu.triton" if "xla.gpu.triton" in plain else triton_capture.SOURCE
    assert source in plain and triton_capture.TARGET not in plain
    monkeypatch.setattr(triton_capture, "SOURCE", f"__gpu${source}" if source == "xla.gpu.triton" else source)
    monkeypatch.setattr(pallas_core, "_backend_lowering_rules", dict(pallas_core._backend_lowering_rules))
    assert triton_capture.install(triton_capture._renaming)
    renamed = _lowered(jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)).as_text()  # a new shape: lowered anew
    assert triton_capture.TARGET in renamed and source not in renamed
    assert renamed.count(triton_capture.TARGET) == plain.count(source)


def test_without_a_cuda_triton_runtime_it_says_why(monkeypatch):
    monkeypatch.setattr(triton_capture, "_state", {})
    from jax._src.lib import gpu_triton

    if getattr(gpu_triton, "_cuda_triton", None) is None:  # CPU hosts: nothing registered, the lowering untouched
        before = dict(pallas_core._backend_lowering_rules)
        why = triton_capture.capture_triton_calls()
        assert isinstance(why, str) and triton_capture.SOURCE in why
        assert pallas_core._backend_lowering_rules == before
    assert triton_capture.capture_triton_calls() is triton_capture.capture_triton_calls()  # decided once
