"""Every Mosaic GPU kernel lowers for CUDA, here on the CPU (no GPU): `jit(...).trace(...).lower(
lowering_platforms=("cuda",))` runs the Pallas -> Mosaic GPU lowering, where register layouts, wgmma operand
rules, TMA boxes and shared-memory transforms are checked. The interpret-mode tests check what the kernels compute
but skip all of that (the interpreter has no layouts), so a kernel change that only breaks on the GPU fails here
first. PTX compilation and the run itself still need the GPU (FP8_TEST_REAL_GPU / GMM_TEST_REAL_GPU /
experiments/check_*_gpu.sh)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import fp8_gemm as f8
from pallas_kernels.fp8_gemm import quantize_gpu
from pallas_kernels.grouped_matmul import GpuConfig, gpu, gpu_tgmm
from pallas_kernels.mla_decode import gpu as mla_gpu
from pallas_kernels.mla_decode import mla_decode

S = jax.ShapeDtypeStruct
E4 = jnp.float8_e4m3fn
F32, I32, BF16 = jnp.float32, jnp.int32, jnp.bfloat16
SMS = 132  # an H100 / H200: without a GPU the SM count cannot be read from the device
G, M, K, N = 4, 512, 384, 256


def _lower_for_cuda(f, *avals, kernel="mosaic_gpu"):
    text = jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    assert kernel in text  # the kernel itself, not a fallback
    return text


FP8_CONFIGS = {
    "one_wg": f8.Fp8GpuConfig(num_sms=SMS),
    "warp_specialized": f8.Fp8GpuConfig(num_sms=SMS, block_m=128, warp_specialized=True),
    "column_scales": f8.Fp8GpuConfig(num_sms=SMS, block_m=128, warp_specialized=True, scalar_block_scale=False),
    "three_compute_wgs": f8.Fp8GpuConfig(num_sms=SMS, block_m=192, warp_specialized=True, compute_wgs=3),
    "three_compute_wgs_skip_idle": f8.Fp8GpuConfig(
        num_sms=SMS, block_m=192, warp_specialized=True, compute_wgs=3, skip_idle_wgs=True
    ),
    "three_compute_wgs_early_store_rows": f8.Fp8GpuConfig(
        num_sms=SMS, block_m=192, warp_specialized=True, compute_wgs=3, early_store_rows=True
    ),
    "three_compute_wgs_late_scales": f8.Fp8GpuConfig(
        num_sms=SMS, block_m=192, warp_specialized=True, compute_wgs=3, early_scales=False
    ),
    "three_compute_wgs_160_regs": f8.Fp8GpuConfig(
        num_sms=SMS, block_m=192, warp_specialized=True, compute_wgs=3, memory_registers=24
    ),
    "x_multicast": f8.Fp8GpuConfig(num_sms=SMS, block_m=192, warp_specialized=True, compute_wgs=3, cluster_n=2),
    "ring_loads": f8.Fp8GpuConfig(num_sms=SMS, block_m=192, warp_specialized=True, compute_wgs=3, ring_loads=True),
    "ring_loads_early_store_rows": f8.Fp8GpuConfig(
        num_sms=SMS, block_m=192, warp_specialized=True, compute_wgs=3, ring_loads=True, early_store_rows=True
    ),
}


@pytest.mark.parametrize("name", list(FP8_CONFIGS))
@pytest.mark.parametrize("out_dtype", [BF16, F32])
def test_fp8_gmm_lowers_for_cuda(name, out_dtype):
    cfg = FP8_CONFIGS[name]
    _lower_for_cuda(
        lambda *a: f8.fp8_gmm(*a, backend="gpu", config=cfg, out_dtype=out_dtype),
        S((M, K), E4),
        S((M, K // 128), F32),
        S((G, N, K), E4),
        S((G, N // 128, K // 128), F32),
        S((G,), I32),
    )


@pytest.mark.parametrize("name", ["one_wg", "three_compute_wgs", "ring_loads"])
def test_fp8_gmm_on_a_layer_stack_lowers_for_cuda(name):
    """fp8_gmm reading its groups at a traced offset of a larger stack (every layer's experts)."""
    cfg = FP8_CONFIGS[name]
    _lower_for_cuda(
        lambda *a: f8.fp8_gmm(*a[:5], group_offset=a[5], backend="gpu", config=cfg),
        S((M, K), E4),
        S((M, K // 128), F32),
        S((3 * G, N, K), E4),
        S((3 * G, N // 128, K // 128), F32),
        S((G,), I32),
        S((), I32),
    )


@pytest.mark.parametrize("name", ["one_wg", "warp_specialized", "three_compute_wgs"])
def test_fp8_weight_gradients_lower_for_cuda(name):
    """fp8_tgmm (grouped, one CTA per cluster; warp-specialized: its ring of slots through all tiles) and the dense
    weight gradient through fp8_gemm (float32 output: the warp-specialized kernels fit fewer stages beside it)."""
    cfg = FP8_CONFIGS[name]
    tiles = (S((K, M), E4), S((K, M // 128), F32), S((N, M), E4), S((N, M // 128), F32))
    _lower_for_cuda(lambda *a: f8.fp8_tgmm(*a, backend="gpu", config=cfg), *tiles, S((G,), I32))
    _lower_for_cuda(lambda *a: f8.fp8_gemm(*a, rhs_tiles=True, backend="gpu", config=cfg, out_dtype=F32), *tiles)
    if cfg.cluster_n == 1:  # the split-contraction dense weight gradient runs fp8_tgmm's kernel
        _lower_for_cuda(lambda *a: f8.fp8_wgrad(*a, splits=3, backend="gpu", config=cfg), *tiles)


def test_fp8_quantize_kernels_lower_for_cuda():
    """The Pallas Triton quantizers (quantize_gpu.py), at shapes off their tiles."""
    triton = "xla.gpu.triton"
    x, w = S((M + 3, K + 5), BF16), S((G, K + 5, N + 7), F32)
    _lower_for_cuda(lambda a: f8.quantize_tiles(a, backend="gpu"), x, kernel=triton)
    _lower_for_cuda(lambda a: f8.quantize_blocks(a, backend="gpu"), w, kernel=triton)
    stacked = lambda a, e: f8.quantize_blocks(a, e, backend="gpu")  # noqa: E731 - routed + shared experts
    _lower_for_cuda(stacked, w, S((2, K + 5, N + 7), F32), kernel=triton)
    layers = lambda a, e: f8.quantize_blocks(a, e, transposed=True, backend="gpu")  # noqa: E731 - a layer stack
    _lower_for_cuda(layers, S((3, G, K + 5, N + 7), F32), S((3, 1, K + 5, N + 7), F32), kernel=triton)
    _lower_for_cuda(lambda a: f8.quantize_tiles_t(a, backend="gpu"), x, kernel=triton)
    index = S((M + 128 * G,), I32)
    _lower_for_cuda(lambda a, i: f8.quantize_tiles_t(a, i, backend="gpu"), x, index, kernel=triton)
    scaled = lambda a, i, r: f8.quantize_tiles_t(a, i, r, backend="gpu")  # noqa: E731 - rows times their weight
    _lower_for_cuda(scaled, x, index, S((M + 128 * G,), F32), kernel=triton)
    # requantized from e4m3 tiles (the FP8 layers' weight-gradient operands), gathered and scaled, and plain
    tiles_ = S((M + 3, K + 5), E4), S((M + 3, -(-(K + 5) // 128)), F32)
    requant = lambda q, s, i, r: f8.requantize_tiles_t(q, s, i, r, backend="gpu")  # noqa: E731
    _lower_for_cuda(requant, *tiles_, index, S((M + 128 * G,), F32), kernel=triton)
    for c in (K + 5, K + 6):  # an odd C reads the codes one by one, an even one in uint16 pairs
        pair = S((M + 3, c), E4), S((M + 3, -(-c // 128)), F32)
        _lower_for_cuda(lambda q, s: f8.requantize_tiles_t(q, s, backend="gpu"), *pair, kernel=triton)
    quads = lambda q, s: quantize_gpu.quantize_tiles_t(q, None, None, s, pack=4)  # noqa: E731 - uint32 reads
    _lower_for_cuda(quads, S((M + 3, K + 4), E4), S((M + 3, -(-(K + 4) // 128)), F32), kernel=triton)
    _lower_for_cuda(lambda a: f8.quantize_both(a, backend="gpu"), x, kernel=triton)
    _lower_for_cuda(lambda a, i: f8.quantize_both(a, i, backend="gpu"), x, index, kernel=triton)
    xb = S((M, K), BF16)  # the BlockSpec-tiled variants, on shapes their tiles divide
    _lower_for_cuda(lambda a: quantize_gpu.quantize_tiles(a, blocked=True), xb, kernel=triton)
    _lower_for_cuda(lambda a: quantize_gpu.quantize_tiles_t(a, blocked=True), xb, kernel=triton)


def test_fp8_activation_quantizers_lower_for_cuda():
    """The experts' SwiGLU fused with its quantization (quantize_act.py): the model's swiglu and its vjp traced
    into Triton, at a row count off the row block."""
    from dsjax.layers.mlp import swiglu

    gu, dh = S((M + 3, 2 * N), BF16), S((M + 3, N), BF16)
    text = _lower_for_cuda(lambda a: f8.act_quantize(a, swiglu, BF16, backend="gpu"), gu, kernel="xla.gpu.triton")
    assert "stablehlo.exponential" not in text  # no unfused XLA SwiGLU (its sigmoid) beside the kernel
    _lower_for_cuda(lambda a, d: f8.act_bwd_quantize(a, d, swiglu, backend="gpu"), gu, dh, kernel="xla.gpu.triton")
    # keep=False: only the tiles written
    tiles_only = lambda a: f8.act_quantize(a, swiglu, BF16, keep=False, backend="gpu")[1]  # noqa: E731
    _lower_for_cuda(tiles_only, gu, kernel="xla.gpu.triton")
    bwd_tiles = lambda a, d: f8.act_bwd_quantize(a, d, swiglu, keep=False, backend="gpu")[1]  # noqa: E731
    _lower_for_cuda(bwd_tiles, gu, dh, kernel="xla.gpu.triton")


@pytest.mark.parametrize("ws", [True, False], ids=["warp_specialized", "one_wg"])
def test_bf16_grouped_matmuls_lower_for_cuda(ws):
    cfg = GpuConfig(num_sms=SMS, warp_specialized=ws)
    sizes = S((G,), I32)
    _lower_for_cuda(lambda a, b, g: gpu.gmm(a, b, g, config=cfg), S((M, K), BF16), S((G, K, N), BF16), sizes)
    _lower_for_cuda(
        lambda a, b, g: gpu.gmm(a, b, g, transpose_rhs=True, config=cfg), S((M, N), BF16), S((G, K, N), BF16), sizes
    )
    _lower_for_cuda(lambda a, d, g: gpu_tgmm.tgmm(a, d, g, config=cfg), S((M, K), BF16), S((M, N), BF16), sizes)


@pytest.mark.parametrize("kernel", ["ws", "simple"])
def test_mla_decode_lowers_for_cuda(kernel):
    cfg = mla_gpu.GpuConfig(kernel=kernel, num_sms=SMS)
    _lower_for_cuda(
        lambda q, kv, table, lengths: mla_decode(
            q, kv, table, lengths, softmax_scale=0.1, backend="gpu", config=cfg, platform="gpu"
        ),
        S((2, 1, 16, 576), BF16),
        S((8, 64, 576), BF16),
        S((2, 4), I32),
        S((2,), I32),
    )


def test_fp8_training_step_runs_the_gpu_kernels_when_asked():
    """ModelConfig.fp8_backend="gpu" reaches every FP8 GEMM: the tiny model's loss gradient, lowered for CUDA,
    holds Mosaic GPU kernels (forward, dgrad and wgrad of the projections and experts); "xla" holds none."""
    import dsjax

    def lowered(backend, tokens=16, **kw):
        cfg = dsjax.ModelConfig.preset("tiny", dtype="bfloat16", fp8="e4m3", fp8_backend=backend, platform="cpu", **kw)
        model = dsjax.DeepSeekV3(cfg)
        tok = jnp.zeros((2, tokens), I32)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), tok)["params"])
        loss = lambda p: model.apply({"params": p}, tok).logits.astype(F32).mean()  # noqa: E731
        return jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=("cuda",)).as_text()

    # the MLA projections alone are 4 x 3 GEMMs per block (each layer stack's body is lowered once); 19 kernels in
    # all since the shared experts run inside the routed experts' grouped GEMMs (21 before)
    full = lowered("gpu")
    assert full.count("custom_call @mosaic_gpu") >= 18 and "fp8_quantize_tiles_t" in full
    assert "fp8_requantize_tiles_t" in full  # the SwiGLUs' weight-gradient operands, from their e4m3 tiles
    assert "mosaic_gpu" not in lowered("xla")
    # fp8_wgrad="none": forward and dgrad still in the FP8 kernels, the routed experts' weight gradients in the bf16
    # tgmm kernel, and no transposing quantization pass left
    bf16_wgrad = lowered("gpu", fp8_wgrad="none")
    assert bf16_wgrad.count("custom_call @mosaic_gpu") >= 17 and "quantize_tiles_t" not in bf16_wgrad
    # fp8_wgrad="experts": the transposing quantizer for the experts' weight gradients only (the projections' and
    # the dense MLP's in bf16)
    experts = lowered("gpu", fp8_wgrad="experts").count("fp8_quantize_tiles_t")
    assert 0 < experts < full.count("fp8_quantize_tiles_t"), (experts, full.count("fp8_quantize_tiles_t"))
    # fp8_layers="experts": the FP8 kernels in the routed (and folded shared) experts only, the projections' and the
    # dense MLP's GEMMs bf16 dots
    only_experts = lowered("gpu", fp8_layers="experts").count("custom_call @mosaic_gpu")
    assert 0 < only_experts < full.count("custom_call @mosaic_gpu") - 12, only_experts


def test_kernel_ir_fingerprints_are_stable_and_tell_kernels_apart():
    """experiments/kernel_ir.py (the refactor check: lowered Mosaic GPU IR without source locations, hashed) gives a
    kernel the same fingerprint twice and two kernels different ones."""
    from experiments import kernel_ir

    ks = kernel_ir.kernels()
    first = kernel_ir.fingerprint(*ks["gmm_ws0"])
    assert first == kernel_ir.fingerprint(*ks["gmm_ws0"])
    assert first != kernel_ir.fingerprint(*ks["gmm_t_ws0"])
