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


def test_shared_weights_read_group_0s_rows_with_each_groups_scales_and_are_undone():
    rng = np.random.default_rng(1)
    xq, xs = quantize_tiles(jnp.asarray(rng.standard_normal((128, 256)), jnp.float32))
    w = rng.standard_normal((2, 256, 128)) * 0.05
    w[1] *= 1e3  # group 1's block scales ~1000x group 0's: a mixed-up scale shows
    wq, ws = quantize_blocks(jnp.asarray(w, jnp.float32))
    gs = jnp.asarray([64, 64], jnp.int32)
    want = np.asarray(fp8_gmm(xq, xs, wq, ws, gs, out_dtype=jnp.float32, backend="xla"))
    # group 1's rows against group 0's codes under group 1's scales
    shared_wq = jnp.stack([wq[0], wq[0]])
    want_shared = np.asarray(fp8_gmm(xq, xs, shared_wq, ws, gs, out_dtype=jnp.float32, backend="xla"))
    with probe.weights("shared"):
        got = _run(xq, xs, wq, ws, gs)
    np.testing.assert_allclose(got, want_shared, rtol=1e-4, atol=1e-5 * np.abs(want_shared).max())
    assert np.abs(got[64:] - want[64:]).max() > 0.1 * np.abs(want[64:]).max()  # not the product, on purpose
    with probe.weights("distinct"):
        np.testing.assert_allclose(_run(xq, xs, wq, ws, gs), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(_run(xq, xs, wq, ws, gs), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="--weights"):
        with probe.weights("replicated"):
            pass


def test_shared_weights_refuse_the_ring_kernel_and_the_table_names_the_source():
    ring = Fp8GpuConfig(block_m=192, warp_specialized=True, compute_wgs=3, ring_loads=True)
    with pytest.raises(ValueError, match="ring kernel"):
        probe.probe((2, 192, 256, 128), [("ring", ring)], ["full"], ["dirichlet"], 1, True, ("distinct", "shared"))
    with pytest.raises(ValueError, match="--weights: unknown source"):
        probe.probe((2, 192, 256, 128), [], ["full"], ["dirichlet"], 1, True, ("distinct", "l2"))
    rows = [
        {"config": "ws3", "weights": s, "layout": "aligned", "part": p, "m": 192, "tflops": t}
        for s, p, t in [("distinct", "full", 900.0), ("distinct", "loads_only", 1000.0), ("shared", "full", 1100.0)]
    ]
    text = probe.table(rows)
    assert "| ws3 | distinct | aligned | 192 | 900 | 1000 | 0.90 |" in text
    assert "| ws3 | shared | aligned | 192 | 1100 |  |  |" in text
