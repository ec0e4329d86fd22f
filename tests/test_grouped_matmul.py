"""Grouped matmul kernels against the float32 oracle in reference.py.

On CPU the Mosaic GPU and Mosaic TPU kernel bodies run in interpret mode, which fills every output
buffer with NaN before the kernel runs, so an element the kernel fails to write shows up as NaN.
With GMM_TEST_REAL_GPU=1 on a Hopper GPU the same GPU cases run compiled (interpret=False).
Rows past sum(group_sizes) of lhs and dout are NaN in every case: they must be ignored.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import GpuConfig, TpuConfig, gmm, reference, tgmm
from pallas_kernels.grouped_matmul import gpu as gmm_gpu
from pallas_kernels.grouped_matmul import gpu_common as gmm_gpu_common
from pallas_kernels.grouped_matmul import tpu as gmm_tpu

REAL_GPU = os.environ.get("GMM_TEST_REAL_GPU") == "1"
INTERPRET = not REAL_GPU
SMS = None if REAL_GPU else 2  # 2 simulated SMs, so each walks several tiles

# About the smallest tiles the hardware takes (wgmma: 64 rows; 128-byte TMA rows; 64-row masks),
# so the compiled run checks the same configs.
GPU_WS = (
    GpuConfig(block_m=64, block_n=64, block_k=32, max_concurrent_steps=2, num_sms=SMS),
    GpuConfig(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2, num_sms=SMS),
)
GPU_SIMPLE = tuple(
    GpuConfig(block_m=64, block_n=64, block_k=bk, max_concurrent_steps=2, warp_specialized=False, num_sms=SMS)
    for bk in (32, 64)
)
TPU_CFG = (TpuConfig(block_m=16, block_k=32, block_n=32),) * 2
BACKENDS = {
    "gpu-ws": ("gpu", GPU_WS),
    "gpu-simple": ("gpu", GPU_SIMPLE),
    "tpu": ("tpu", TPU_CFG),
    "xla": ("xla", (None, None)),
}
CPU_ONLY = ("tpu", "xla")


def _backends(*names):
    if REAL_GPU:
        names = [n for n in names if n.startswith("gpu")]
    return pytest.mark.parametrize("name", names)


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def _inputs(seed, m, k, n, group_sizes, dtype):
    ks = jax.random.split(jax.random.key(seed), 4)
    gs = jnp.asarray(group_sizes, jnp.int32)
    tail = (jnp.arange(m) >= int(np.sum(group_sizes)))[:, None]
    lhs = jnp.where(tail, jnp.nan, jax.random.normal(ks[0], (m, k))).astype(dtype)
    rhs = jax.random.normal(ks[1], (len(group_sizes), k, n)).astype(dtype)
    dout = jnp.where(tail, jnp.nan, jax.random.normal(ks[2], (m, n))).astype(dtype)
    return lhs, rhs, dout, gs


def _tol(dtype):
    return 1e-2 if dtype == jnp.bfloat16 else 1e-5


def _call_kwargs(name):
    backend, (gcfg, tcfg) = BACKENDS[name]
    return dict(backend=backend, interpret=INTERPRET and backend != "xla", gmm_config=gcfg, tgmm_config=tcfg)


# ---- cheap checks of the host-side schedules and of the XLA reference ----


@pytest.mark.parametrize("seed", range(6))
def test_gmm_tiles_cover_each_group_row_once(seed):
    rng = np.random.default_rng(seed)
    g, block_m = int(rng.integers(1, 7)), int(rng.choice([8, 16, 64]))
    m = int(rng.integers(block_m // 8, 40)) * 8
    gs = rng.multinomial(int(rng.integers(0, m + 1)), np.ones(g) / g)
    gs[rng.random(g) < 0.3] = 0
    count, group, row0, lo, rows = map(np.asarray, gmm_gpu.gmm_tiles(jnp.asarray(gs), m, block_m))
    owner = np.full(m, -2)
    for t in range(int(count[0])):
        assert row0[t] % 8 == 0 and 0 <= row0[t] <= m - block_m
        assert 0 <= lo[t] and lo[t] + rows[t] <= block_m and rows[t] > 0
        span = slice(row0[t] + lo[t], row0[t] + lo[t] + rows[t])
        assert np.all(owner[span] == -2)
        owner[span] = group[t]
    expect = np.concatenate([np.repeat(np.arange(g), gs), np.full(m - gs.sum(), -1)])
    np.testing.assert_array_equal(owner, expect)
    assert count[0] <= group.shape[0]
    # The kernel walks real tiles [0, count[1]) first and the zero tail after them.
    assert np.all(group[: count[1]] >= 0) and np.all(group[count[1] : count[0]] == -1)


@pytest.mark.parametrize("seed", range(4))
def test_tpu_visits_cover_each_group_block_pair(seed):
    rng = np.random.default_rng(seed)
    g, block_m, nb = int(rng.integers(1, 6)), 8, int(rng.integers(1, 12))
    m = nb * block_m
    gs = rng.multinomial(int(rng.integers(0, m + 1)), np.ones(g) / g)
    gs[rng.random(g) < 0.3] = 0
    ends = np.cumsum(gs)
    pairs = {
        (gi, b)
        for gi in range(g)
        if gs[gi]
        for b in range((ends[gi] - gs[gi]) // block_m, (ends[gi] - 1) // block_m + 1)
    }
    vg, vb = map(np.asarray, gmm_tpu.gmm_visits(jnp.asarray(gs), m, block_m))
    assert np.all(np.diff(vb) >= 0)  # an output block's visits are consecutive
    real = {(int(a), int(b)) for a, b in zip(vg, vb) if a < g}
    assert real == pairs
    assert set(vb.tolist()) == set(range(nb))  # blocks with no group rows still get written
    tg, tb, tv = map(np.asarray, gmm_tpu.tgmm_visits(jnp.asarray(gs), m, block_m))
    assert np.all(np.diff(tg) >= 0) and set(tg.tolist()) == set(range(g))
    assert {(int(a), int(b)) for a, b, v in zip(tg, tb, tv) if v and gs[a]} == pairs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_matches_dense_oracle(dtype):
    lhs, rhs, dout, gs = _inputs(0, 50, 24, 20, [7, 0, 30, 5], dtype)
    out = reference.gmm(lhs, rhs, gs, out_dtype=jnp.float32)
    np.testing.assert_allclose(out, reference.gmm_dense(lhs, rhs, gs), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out[42:]), 0.0)
    out_t = reference.gmm(dout, rhs, gs, transpose_rhs=True, out_dtype=jnp.float32)
    want_t = reference.gmm_dense(dout, jnp.swapaxes(rhs, 1, 2), gs)
    np.testing.assert_allclose(out_t, want_t, rtol=1e-5, atol=1e-4)
    d = reference.tgmm(lhs, dout, gs, out_dtype=jnp.float32)
    np.testing.assert_allclose(d, reference.tgmm_dense(lhs, dout, gs), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(d[1]), 0.0)


def test_interpret_mode_poisons_outputs():
    # The "every element written" checks below rely on this.
    assert gmm_gpu_common.interpret_params().uninitialized_memory == "nan"


def test_backend_dispatch_and_dtypes():
    lhs, rhs, _, gs = _inputs(1, 16, 8, 8, [10, 6], jnp.float32)
    with pytest.raises(ValueError):
        gmm(lhs, rhs, gs, backend="gpu")  # the GPU kernel is 16-bit only
    with pytest.raises(ValueError):
        gmm(lhs, rhs, gs, backend="cuda")
    out = gmm(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), gs, backend="xla", preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    assert gmm(lhs, rhs, gs).dtype == jnp.float32
    # "auto" for a target platform the caller resolved takes that platform's kernel, whatever this host is (a CPU
    # host compiling for a GPU or TPU); for this host's own platform (None), the CPU has none
    from pallas_kernels.grouped_matmul.ops import resolve_backend

    assert (
        resolve_backend("auto", jnp.bfloat16, "gpu") == "gpu" and resolve_backend("auto", jnp.float32, "gpu") == "xla"
    )
    assert resolve_backend("auto", jnp.bfloat16, "tpu") == "tpu" and resolve_backend("auto", jnp.bfloat16) == "xla"


# ---- kernels: forward, both gradients through jax.vjp, and tgmm directly ----

CASES = {
    # ragged groups, empty groups, rows past sum(gs), M/K/N off the tile multiples
    "ragged": (100, 72, 80, [9, 0, 37, 0, 41]),
    # one group holds every row
    "one-group": (64, 32, 64, [0, 64, 0]),
}


def _check_fwd_bwd(name, case, dtype, seed=0):
    m, k, n, sizes = CASES[case]
    lhs, rhs, dout, gs = _inputs(seed, m, k, n, sizes, dtype)
    total = int(np.sum(sizes))
    out, vjp = jax.vjp(lambda a, b: gmm(a, b, gs, **_call_kwargs(name)), lhs, rhs)
    dlhs, drhs = vjp(dout)
    ref_out, ref_vjp = jax.vjp(lambda a, b: reference.gmm_dense(a, b, gs), lhs, rhs)
    # The oracle's gradients see the NaN rows only through where(), so they stay finite.
    ref_dlhs, ref_drhs = ref_vjp(jnp.where(jnp.isnan(dout), 0, dout).astype(jnp.float32))
    for got, want in ((out, ref_out), (dlhs, ref_dlhs), (drhs, ref_drhs)):
        got = np.asarray(got.astype(jnp.float32))
        assert not np.isnan(got).any(), "unwritten or NaN-polluted elements"
        assert _rel_err(got, want) <= _tol(dtype)
    assert out.dtype == dtype and dlhs.dtype == dtype and drhs.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out[total:], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(dlhs[total:], np.float32), 0.0)
    for g in np.flatnonzero(np.asarray(sizes) == 0):
        np.testing.assert_array_equal(np.asarray(drhs[g], np.float32), 0.0)


@_backends("gpu-simple", "tpu", "xla")
def test_gmm_fwd_bwd_ragged(name):
    _check_fwd_bwd(name, "ragged", jnp.bfloat16)


@pytest.mark.slow
@_backends("gpu-ws")
def test_gmm_fwd_bwd_ragged_warp_specialized(name):
    _check_fwd_bwd(name, "ragged", jnp.bfloat16, seed=1)


@_backends("gpu-ws", "tpu")
def test_gmm_forward_one_group(name):
    m, k, n, sizes = CASES["one-group"]
    lhs, rhs, _, gs = _inputs(2, m, k, n, sizes, jnp.bfloat16)
    out = gmm(lhs, rhs, gs, **_call_kwargs(name))
    assert _rel_err(out.astype(jnp.float32), reference.gmm_dense(lhs, rhs, gs)) <= 1e-2


# K = 4 block_k steps over a 2-deep ring: consecutive tiles of an SM chain their pipelines (the
# memory warpgroup streams the next tile's loads during the current epilogue). With 2 SMs these sizes
# give each SM a start, steady and stop tile (~4 real tiles each), then zero-tail tiles. A lone tile
# (n == 1, filled and drained alone) is test_gmm_forward_one_group's case.
@pytest.mark.parametrize("sizes", [[30, 0, 77, 50, 90, 1]])
def test_gmm_warp_specialized_chained_tiles(sizes):
    m, k, n = 8 * (sum(sizes) // 8 + 9), 128, 128
    cfg = GpuConfig(block_m=64, block_n=64, block_k=32, max_concurrent_steps=2, num_sms=SMS)
    lhs, rhs, dout, gs = _inputs(5, m, k, n, sizes, jnp.bfloat16)
    out, vjp = jax.vjp(lambda a: gmm(a, rhs, gs, backend="gpu", interpret=INTERPRET, gmm_config=cfg), lhs)
    (dlhs,) = vjp(dout)
    ref_out, ref_vjp = jax.vjp(lambda a: reference.gmm_dense(a, rhs, gs), lhs)
    (ref_dlhs,) = ref_vjp(jnp.where(jnp.isnan(dout), 0, dout).astype(jnp.float32))
    for got, want in ((out, ref_out), (dlhs, ref_dlhs)):
        got = np.asarray(got.astype(jnp.float32))
        assert not np.isnan(got).any(), "unwritten or NaN-polluted elements"
        assert _rel_err(got, want) <= 1e-2
        np.testing.assert_array_equal(got[sum(sizes) :], 0.0)


@pytest.mark.parametrize("name", ["tpu", "xla"])
def test_gmm_fwd_bwd_float32(name):
    _check_fwd_bwd(name, "ragged", jnp.float32, seed=3)


@_backends("gpu-ws", "gpu-simple", "tpu")
def test_tgmm_direct(name):
    m, k, n, sizes = 136, 96, 64, [0, 70, 1, 0, 50]
    lhs, _, dout, gs = _inputs(4, m, k, n, sizes, jnp.bfloat16)
    backend, (_, tcfg) = BACKENDS[name]
    got = tgmm(lhs, dout, gs, backend=backend, interpret=INTERPRET, config=tcfg)
    got = np.asarray(got.astype(jnp.float32))
    assert got.shape == (len(sizes), k, n) and not np.isnan(got).any()
    assert _rel_err(got, reference.tgmm_dense(lhs, dout, gs)) <= 1e-2
    for g in (0, 3):
        np.testing.assert_array_equal(got[g], 0.0)
