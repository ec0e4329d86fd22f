"""Pieces the Mosaic GPU gmm (gpu.py) and tgmm (gpu_tgmm.py) kernels share: the config check, the
persistent tile loop and tile order, the warp-specialized pipeline, the chunked epilogue, the kernel
launch, and the interpret-mode stand-ins for transposed wgmma operands.

Functions here take any config with GpuConfig's fields (gpu.GpuConfig); a config may also set `compute_wgs`
(the FP8 kernels' Fp8GpuConfig: 2 or 3 compute warpgroups when warp-specialized).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# Registers per thread the warp-specialized kernels leave to their memory warpgroup (setmaxnreg; the compute
# warpgroups share the rest of the 512): the pipeline's default, and the FP8 kernels' Fp8GpuConfig default
MEMORY_REGISTERS = 40


def check_config(cfg, dtype):
    """Raise ValueError unless block_n rows of `dtype` are a multiple of 128 bytes."""
    # Ragged-row TMA stores start at any smem row; TMA wants 128-byte aligned smem addresses.
    if cfg.block_n * jnp.dtype(dtype).itemsize % 128:
        raise ValueError(f"block_n * itemsize must be a multiple of 128 bytes, got {cfg.block_n}")


def interpret_params():
    """Mosaic GPU interpret params; the public name moved between jax releases."""
    for name in ("InterpretParams", "InterpretGPUParams"):
        if hasattr(plgpu, name):
            return getattr(plgpu, name)()
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def num_wgs(cfg):
    """Compute warpgroups per CTA: warp-specialized, the config's `compute_wgs` (2 where it has none), else 1."""
    return getattr(cfg, "compute_wgs", 2) if cfg.warp_specialized else 1


def num_sms(cfg, interpret):
    """SMs the persistent grid spans: the config's, else the device's (2 when interpreting)."""
    if cfg.num_sms is not None:
        return cfg.num_sms
    if interpret:
        return 2
    # A host without the GPU (lowering for CUDA on a CPU) has no SM count to read: size the persistent grid for
    # an H100 / H200. The grid size only spreads the tile list; any value gives the same result.
    return getattr(jax.devices()[0], "core_count", None) or 132


def transforms(block_minor, dtype):
    """smem tiling + swizzle transforms for blocks `block_minor` elements of `dtype` wide."""
    swizzle = plgpu.find_swizzle(block_minor * jnp.dtype(dtype).itemsize * 8)
    elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def tile_order(lin, n_major, n_minor, width):
    """Linear tile id -> (major, minor) index; strips of `width` minor tiles keep operands in L2."""
    if width <= 0 or width >= n_minor:
        return lax.div(lin, n_minor), lax.rem(lin, n_minor)
    strip = width * n_major
    s = lax.div(lin, strip)
    r = lax.rem(lin, strip)
    w = jnp.minimum(width, n_minor - s * width)
    return lax.div(r, w), s * width + lax.rem(r, w)


def epilogue(acc, out_smem, store_chunk):
    """Cast acc and TMA-store it through out_smem [epi_m, bn], one row chunk at a time.

    A whole bm x bn staging buffer per warpgroup would not fit next to 4 pipeline stages."""
    epi_m = out_smem.shape[0]
    for c in range(acc.shape[0] // epi_m):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous store has left out_smem
        out_smem[...] = acc[c * epi_m : (c + 1) * epi_m].astype(out_smem.dtype)
        plgpu.commit_smem()
        store_chunk(c * epi_m)


def _own_tiles(num_tiles):
    """(this SM's index, the SM count, how many of tiles sm, sm + num_sms, ... < num_tiles are this SM's)."""
    sm = lax.axis_index("sm")
    nsm = lax.axis_size("sm")
    return sm, nsm, lax.div(jnp.maximum(num_tiles - sm + nsm - 1, 0), nsm)


def persistent_loop(num_tiles, body):
    """Each SM takes tiles sm, sm + num_sms, ... < num_tiles: body(i, tile, n) for its i-th of n."""
    sm, nsm, steps = _own_tiles(num_tiles)
    lax.fori_loop(0, steps, lambda i, c: (body(i, i * nsm + sm, steps), c)[1], None)


def persistent_fold(num_tiles, body, init):
    """persistent_loop's tiles with a carry threaded through them: body(tile, carry) -> carry; the last carry."""
    sm, nsm, steps = _own_tiles(num_tiles)
    return lax.fori_loop(0, steps, lambda i, c: body(i * nsm + sm, c), init)


def compute_registers(cfg):
    """Registers per thread of each compute warpgroup (setmaxnreg) beside a memory warpgroup holding the config's
    memory_registers: the rest of the 512 shared out, at most 256, rounded down to a multiple of 8 (the rule
    emit_pipeline_warp_specialized applies, for kernels that run their own warp specialization)."""
    return int(min(256, (512 - getattr(cfg, "memory_registers", MEMORY_REGISTERS)) // num_wgs(cfg)) // 8 * 8)


def chained(run_tile, i, n, chain):
    """Run tile i of n with the pipeline state that chains it to its neighbours. States are static,
    so each branch gets its own unrolled prologue and drain; a lone tile fills and drains alone."""
    if not chain:
        run_tile(None)
        return
    pp = plgpu.PipelinePipeline
    pl.when(n == 1)(lambda: run_tile(None))
    pl.when((n > 1) & (i == 0))(lambda: run_tile(pp.START))
    pl.when((i > 0) & (i < n - 1))(lambda: run_tile(pp.STEADY))
    pl.when((n > 1) & (i == n - 1))(lambda: run_tile(pp.STOP))


def named(body, plan, name):
    """body(plan, *refs) as a kernel body of its own name (Mosaic GPU names the kernel after its body function:
    the name profiles show)."""

    def kernel(*refs):
        body(plan, *refs)

    kernel.__name__ = kernel.__qualname__ = name
    return kernel


def run(body, out_type, cfg, interpret):
    """plgpu.kernel over one CTA per SM (grid axis "sm"); warp-specialized: num_wgs + 1 warpgroups (axis "wg")."""
    cluster = getattr(cfg, "cluster_n", 1)  # CTAs per cluster (axis "cluster"); "sm" then counts clusters
    kw = dict(
        out_type=out_type,
        grid=(num_sms(cfg, interpret) // cluster,),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    if cluster > 1:
        kw.update(cluster=(cluster,), cluster_names=("cluster",))
    if cfg.warp_specialized:  # the compute warpgroups, then the memory one
        kw.update(num_threads=num_wgs(cfg) + 1, thread_name="wg")
    if interpret:
        kw["interpret"] = interpret_params()
    return plgpu.kernel(body, **kw)


def pipeline(cfg, mma, ctx, steps, in_specs, mcs, state=None, manual_release=False):
    """Warp-specialized pipeline over `steps` contraction steps (may be traced, may be 0).

    `state` (static steps only) chains the pipelines of an SM's consecutive tiles: the memory
    warpgroup streams the next tile's loads while the compute warpgroups finish the current tile.
    manual_release: mma releases each stage itself (it is passed one consumed barrier per input, before the
    carry) instead of the pipeline releasing it when mma returns."""
    return plgpu.emit_pipeline_warp_specialized(
        mma,
        grid=(steps,),
        memory_registers=getattr(cfg, "memory_registers", MEMORY_REGISTERS),  # an FP8 knob; the bf16 kernels keep it
        in_specs=in_specs,
        wg_axis="wg",
        num_compute_wgs=num_wgs(cfg),
        max_concurrent_steps=mcs,
        compute_context=ctx,
        pipeline_state=state,
        manual_consumed_barriers=manual_release,
    )


def ws_scope(allocs, t_shape, out_smem, body):
    """The warp-specialized kernels' shared smem, allocated collectively over the warpgroups: the pipeline's
    `allocs`, a transpose scratch per compute warpgroup (t_shape [num_wgs, ...] or None on hardware) and the output
    staging buffers `out_smem`. Runs body(allocs, wg, this warpgroup's scratch or None, out_smem)."""

    def scoped(allocs, t_smem, out_smem):
        wg = lax.axis_index("wg")
        body(allocs, wg, None if t_smem is None else t_smem.at[wg], out_smem)

    pl.run_scoped(scoped, allocs=allocs, t_smem=t_shape, out_smem=out_smem, collective_axes="wg")


def ignore(*_, **__):
    """Placeholder body/context (returns None) for a pipeline built only for get_allocations()."""


def transposed(ref, scratch):
    """wgmma operand ref.T. Hardware reads it in place (transpose_ref); jax 0.10's GPU interpreter
    cannot apply a TransposeTransform to a wgmma operand, so interpret mode copies the transpose into
    `scratch` through registers instead."""
    if scratch is None:
        return plgpu.transpose_ref(ref, (1, 0))
    scratch[...] = ref[...].T
    return scratch


def scratch(interpret, shape, dtype):
    """smem buffer for `transposed` in interpret mode; None (read in place) on hardware."""
    return plgpu.SMEM(shape, dtype) if interpret else None


def acc_with_scratch(acc_scope, acc_shape, scratch):
    """run_scoped(acc_scope, ACC, scratch); register and smem scopes cannot be mixed."""
    acc = lambda t: pl.run_scoped(lambda a: acc_scope(a, t), plgpu.ACC(acc_shape, jnp.float32))
    return acc(None) if scratch is None else pl.run_scoped(acc, scratch)
