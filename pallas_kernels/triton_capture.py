"""Pallas Triton kernels inside XLA's CUDA graphs (command buffers).

XLA:GPU records runs of a step's kernels into CUDA graphs and launches each run as one graph; a custom call joins
a graph only where its FFI handler is registered as command-buffer compatible. jaxlib >= 0.10.3 lowers a Pallas
Triton kernel to the custom call `triton_kernel_call_ffi`, whose handler is registered without that trait, so
every Triton kernel ends the graph before it and starts a new one after it: a launch gap on the GPU each time
(Mosaic GPU's `mosaic_gpu_v2` is registered compatible). The FP8 layers run ~100 Triton quantizers a step of
`small`, and command buffers shorten BF16's step by more than FP8's (experiments/BENCHMARKS.md, twenty-third FP8
session).

`capture_triton_calls()` registers jaxlib's own Triton handler a second time, under TARGET and with the trait,
and has the Pallas Triton lowering emit TARGET instead: the same handler launches the same kernel, now recorded
into the graph (its execute stage only launches the kernel: the module is loaded in its initialize stage, and
Pallas asks it to zero no bytes). Process-wide and idempotent; it affects kernels lowered after the call.
"""

from __future__ import annotations

import functools

SOURCE = "triton_kernel_call_ffi"
TARGET = "dsjax_triton_call_graphable"
_CMD_BUFFER_COMPATIBLE = 1  # xla::ffi::Traits::kCmdBufferCompatible
_state: dict[str, str | None] = {}


def capture_triton_calls() -> str | None:
    """Make Pallas Triton kernels lowered from now on join XLA's CUDA graphs. Returns None once enabled, else why
    it is not (no CUDA Triton runtime, or a jax whose Triton lowering this does not know): the kernels then run as
    before, each outside the graphs."""
    if "result" not in _state:
        _state["result"] = _enable()
    return _state["result"]


def _enable() -> str | None:
    try:
        from jax._src.lib import gpu_triton
        from jaxlib import xla_client
    except ImportError as e:
        return f"no Pallas Triton lowering here ({e})"
    runtime = getattr(gpu_triton, "_cuda_triton", None)
    handlers = runtime.registrations() if runtime is not None and hasattr(runtime, "registrations") else {}
    if SOURCE not in handlers:
        return f"jaxlib registers no {SOURCE} handler (CUDA plugin absent, or an older jaxlib)"
    if not install(_renaming):
        return "this jax's Pallas Triton lowering is not where triton_capture looks for it"
    xla_client.register_custom_call_target(
        TARGET, handlers[SOURCE], platform="CUDA", api_version=1, traits=_CMD_BUFFER_COMPATIBLE
    )
    return None


def install(wrap) -> bool:
    """Replace the Pallas Triton lowering rule by wrap(rule): the rule Pallas picks for a kernel given
    `pltriton.CompilerParams` (every kernel here passes them). False where this jax keeps no such rule."""
    try:
        from jax._src.pallas import core as pallas_core
        from jax._src.pallas.triton import core as triton_core
    except ImportError:
        return False
    rule = pallas_core.get_lowering_rule(triton_core.CompilerParams, "gpu")
    if rule is None:
        return False
    pallas_core.register_lowering_rule(triton_core.CompilerParams, wrap(rule), "gpu")
    return True


def _renaming(lowering):
    """The Triton lowering rule with its custom call's target renamed SOURCE -> TARGET."""
    from jax._src.lib.mlir import ir

    @functools.wraps(lowering)
    def rule(ctx, *args, **kwargs):
        outs = lowering(ctx, *args, **kwargs)
        for value in outs:
            op = value.owner
            op = getattr(op, "operation", op)
            attr = op.attributes["call_target_name"] if "call_target_name" in op.attributes else None
            if attr is not None and ir.StringAttr(attr).value == SOURCE:
                op.attributes["call_target_name"] = ir.StringAttr.get(TARGET)
        return outs

    return rule
