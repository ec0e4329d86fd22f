"""TPU slices compiled on this CPU host (libtpu + jax.experimental.topologies): the Mosaic TPU kernels for v5e, v5p
and v6e chips on realistic shapes, and the project's real steps (pretraining under two meshes, expert parallelism
included; the GRPO update; generation's prefill and decode) through experiments/compile.py's code."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from dsjax.runtime import resolve, target_platform
from experiments import aot

CHIPS = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


@functools.cache
def devices(topology: str):
    return aot.topology_devices(topology)


def one_chip(topology, *shapes_dtypes):
    sharding = SingleDeviceSharding(devices(topology)[0])
    return [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes_dtypes]


@pytest.mark.parametrize("chip", sorted(CHIPS))
def test_mosaic_kernels_compile_for_tpu_chips(chip):
    """gmm forward and its VJP (dlhs by gmm, drhs by tgmm) on a DeepSeek-V3 expert shard (32 experts, 7168 ->
    2048), and the MLA decode kernel over a paged cache (128 heads, 576-wide latent rows), each compiled for one chip;
    each program holds a Mosaic TPU custom call."""
    from pallas_kernels.grouped_matmul import gmm, tgmm
    from pallas_kernels.mla_decode import mla_decode

    topo = CHIPS[chip]
    lhs, rhs, sizes, dout = one_chip(
        topo,
        ((2048, 7168), jnp.bfloat16),
        ((32, 7168, 2048), jnp.bfloat16),
        ((32,), jnp.int32),
        ((2048, 2048), jnp.bfloat16),
    )
    programs = {
        "gmm": jax.jit(lambda a, b, g: gmm(a, b, g, backend="tpu")).lower(lhs, rhs, sizes),
        "tgmm": jax.jit(lambda a, d, g: tgmm(a, d, g, backend="tpu")).lower(lhs, dout, sizes),
        "gmm_vjp": jax.jit(
            jax.grad(lambda a, b, g: gmm(a, b, g, backend="tpu").astype(jnp.float32).sum(), argnums=(0, 1))
        ).lower(lhs, rhs, sizes),
    }
    q, pages, table, lengths = one_chip(
        topo,
        ((8, 1, 128, 576), jnp.bfloat16),
        ((8 * 64, 64, 576), jnp.bfloat16),
        ((8, 64), jnp.int32),
        ((8,), jnp.int32),
    )
    programs["mla_decode"] = jax.jit(lambda q, p, t, n: mla_decode(q, p, t, n, softmax_scale=0.1, backend="tpu")).lower(
        q, pages, table, lengths
    )
    for name, lowered in programs.items():
        text = aot.compile_uncached(lowered).as_text()
        assert "tpu_custom_call" in text, (chip, name)


def test_auto_resolves_for_the_tpu_slice_not_the_host():
    topo = devices("v5p:2x2x1")
    assert target_platform() == "cpu" and target_platform(topo) == "tpu"
    from dsjax.config import ModelConfig

    cfg = resolve(ModelConfig.preset("tiny", dtype="bfloat16"), topo)
    assert (cfg.platform, cfg.attention_impl, cfg.moe_backend, cfg.moe_dispatch) == ("tpu", "splash", "gmm", "ragged")


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data:4", "data:2,expert:2"])
def test_pretrain_step_compiles_for_v5p(mesh, capsys):
    compiled = aot.compile_job("pretrain", aot.default_config("pretrain"), devices("v5p:2x2x1"), mesh)
    assert aot.report(compiled, "TPU v5", 0.0)
    text = compiled["train_step"].as_text()
    assert "tpu_custom_call" in text  # splash attention and the grouped matmuls, not their XLA fallbacks
    coll = aot.collectives(text)
    if "expert:2" in mesh:
        assert "ragged-all-to-all" in coll  # tokens travel to their experts' owners
    assert "fits" in capsys.readouterr().out


@pytest.mark.slow
def test_fp8_pretrain_step_compiles_for_v5p():
    """FP8 training (ModelConfig.fp8="e4m3") planned for a TPU pod: "auto" gives the XLA reference FP8 kernels
    there (dequantize, float32 dot: issue 17 accepts them on TPU), each FP8 layer per device in shard_map under
    expert parallelism. The e4m3 operands survive into the compiled step (no fold of quantize into dequantize)."""
    config = aot.default_config("pretrain")
    config.model.fp8 = "e4m3"
    compiled = aot.compile_job("pretrain", config, devices("v5p:2x2x1"), "data:2,expert:2")
    assert aot.report(compiled, "TPU v5", 0.0)
    text = compiled["train_step"].as_text()
    assert "f8e4m3fn" in text
    assert "ragged-all-to-all" in aot.collectives(text)


@pytest.mark.slow
@pytest.mark.parametrize("job", ["grpo", "generate"])
def test_grpo_and_decode_steps_compile_for_v5p(job):
    compiled = aot.compile_job(
        job, aot.default_config(job), devices("v5p:2x2x1"), "data:2,expert:2", batch=8, context=256
    )
    assert aot.report(compiled, "TPU v5", 0.0)
    for name, c in compiled.items():
        assert "tpu_custom_call" in c.as_text(), name
