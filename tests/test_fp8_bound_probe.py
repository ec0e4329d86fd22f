"""experiments/fp8_bound_probe.py: its cut-down K steps really replace the kernel's (interpret mode), the kernel
is restored afterwards, and its aligned group layout fills whole tiles."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import fp8_bound_probe as probe
from pallas_kernels.fp8_gemm import Fp8GpuConfig, fp8_gmm, quantize_blocks, quantize_tiles


def _run(xq, xs, wq, ws, gs):
    return np.asarray(
        fp8_gmm(xq, xs, wq, ws, gs, out_dtype=jnp.float32, backend="gpu", interpret=True, config=Fp8GpuConfig())
    )


def test_cut_down_steps_replace_the_kernels_and_are_undone():
    rng = np.random.default_rng(0)
    sizes = [64, 64]
    xq, xs = quantize_tiles(jnp.asarray(rng.standard_normal((128, 256)), jnp.float32))
    wq, ws = quantize_blocks(jnp.asarray(rng.standard_normal((2, 256, 128)) * 0.05, jnp.float32))
    gs = jnp.asarray(sizes, jnp.int32)
    want = np.asarray(fp8_gmm(xq, xs, wq, ws, gs, out_dtype=jnp.float32, backend="xla"))
    with probe.k_step("full"):
        np.testing.assert_allclose(_run(xq, xs, wq, ws, gs), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    with probe.k_step("no_promote"):  # the last K step's unscaled product of the codes
        got = _run(xq, xs, wq, ws, gs)
    codes_x, codes_w = np.asarray(xq, np.float32)[:, 128:], np.asarray(wq, np.float32)[:, :, 128:]
    last = np.concatenate([codes_x[:64] @ codes_w[0].T, codes_x[64:] @ codes_w[1].T])
    np.testing.assert_allclose(got, last, rtol=1e-5, atol=1e-3)
    with probe.k_step("loads_only"):
        assert not _run(xq, xs, wq, ws, gs).any()
    with probe.k_step("compute_x2"):  # every step's product promoted twice: twice the product
        np.testing.assert_allclose(_run(xq, xs, wq, ws, gs), 2 * want, rtol=1e-4, atol=2e-5 * np.abs(want).max())
    np.testing.assert_allclose(_run(xq, xs, wq, ws, gs), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="--parts"):
        with probe.k_step("wgmma_only"):
            pass


def test_layouts_split_m_and_aligned_fills_whole_tiles():
    d = probe.group_sizes(32, 16384, "dirichlet", 192)
    assert d.sum() == 16384 and (d > 0).all()
    a = probe.group_sizes(32, 16384, "aligned", 192)
    assert a.sum() == 192 * (16384 // 192) and (a % 192 == 0).all() and (a > 0).all()
    with pytest.raises(ValueError, match="fewer than G=32"):
        probe.group_sizes(32, 192 * 31, "aligned", 192)
