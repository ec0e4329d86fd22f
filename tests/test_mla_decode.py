"""MLA decode over a paged latent cache: kernels (interpret mode on CPU) against the XLA reference.

Interpret mode fills every kernel output buffer with NaN before the kernel runs, so an element the
kernel does not write shows up as NaN. Pages are shuffled in the block table, table entries past a
sequence's pages hold an invalid page id (so reading one fails), and cache rows past a sequence's
length hold large garbage (GPU: finite, the kernel's contract; reference and TPU: NaN).
With MLA_TEST_REAL_GPU=1 on a Hopper GPU the GPU cases run compiled (interpret=False).
"""

import dataclasses
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mla_decode import common, gpu, mla_decode, mla_decode_reference, tpu

REAL_GPU = os.environ.get("MLA_TEST_REAL_GPU") == "1"
SCALE = 0.06
WIDTH = 576


@pytest.fixture(scope="module", autouse=True)
def _compile_interpreter_threads_once():
    """jax 0.10's GPU interpreter re-traces and re-compiles the kernel body for every grid point and
    warpgroup (thread_map._run_jaxpr), ~10 s each for the 3-warpgroup kernel. Cache the executable
    per jaxpr: the same jaxpr runs with the thread id as an argument, so nothing else changes."""
    try:
        from jax._src.pallas.mosaic.interpret import thread_map

        orig = thread_map._run_jaxpr
    except (ImportError, AttributeError):
        yield
        return
    cache, lock = {}, threading.Lock()

    def run(jaxpr, consts, *args):
        with lock:
            hit = cache.get(id(jaxpr))
            if hit is None:
                fn = jax.jit(lambda c, *a: jax.core.eval_jaxpr(jaxpr, c, *a))
                hit = cache[id(jaxpr)] = (jaxpr, fn.lower(consts, *args).compile())
        hit[1](consts, *args)

    thread_map._run_jaxpr = run
    yield
    thread_map._run_jaxpr = orig


def _case(seed, b, s_q, h, lengths, page=64, stale=np.nan):
    """Random bf16 inputs; returns q, kv_pages, block_table, lengths."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    max_pages = int(common.cdiv(max(lengths.max(), 1), page)) + 1  # one spare column
    num_pages = b * max_pages + 2
    q = rng.standard_normal((b, s_q, h, WIDTH), np.float32)
    kv = rng.standard_normal((num_pages, page, WIDTH), np.float32)
    perm = rng.permutation(num_pages)
    table = np.full((b, max_pages), num_pages + 7, np.int32)  # invalid: must never be read
    for i, n in enumerate(lengths):
        used = int(common.cdiv(n, page))
        table[i, :used] = perm[i * max_pages : i * max_pages + used]
        if n % page:  # rows past the length in the last page
            kv[table[i, used - 1], n % page :] = stale
    return (jnp.asarray(q, jnp.bfloat16), jnp.asarray(kv, jnp.bfloat16), jnp.asarray(table), jnp.asarray(lengths))


def _oracle(q, kv, table, lengths):
    """Loop-per-query float64 numpy oracle, independent of reference.py."""
    q, kv = np.asarray(q, np.float64), np.asarray(kv, np.float64)
    b, s_q, h, _ = q.shape
    out = np.zeros((b, s_q, h, 512))
    lse = np.full((b, s_q, h), -np.inf)
    for i in range(b):
        n = int(lengths[i])
        rows = np.concatenate(
            [kv[p] for p in np.asarray(table[i, : common.cdiv(n, kv.shape[1])])] or [np.zeros((0, WIDTH))]
        )
        for t in range(s_q):
            see = n - s_q + t + 1
            if see <= 0:
                continue
            s = q[i, t] @ rows[:see].T * SCALE
            m = s.max(-1, keepdims=True)
            e = np.exp(s - m)
            out[i, t] = e @ rows[:see, :512] / e.sum(-1, keepdims=True)
            lse[i, t] = np.log(e.sum(-1)) + m[:, 0]
    return out, lse


def _check(got, want):
    out, lse = (np.asarray(x, np.float64) for x in got)
    ref_out, ref_lse = (np.asarray(x, np.float64) for x in want)
    assert not np.isnan(out).any(), "unwritten or NaN-polluted output elements"
    err = np.linalg.norm(out - ref_out) / max(np.linalg.norm(ref_out), 1e-30)
    assert err <= 1e-2, err
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    assert np.isfinite(lse[fin]).all()
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=2e-3, rtol=1e-3)
    np.testing.assert_array_equal(out[~fin], 0.0)  # a query that sees nothing outputs zeros


# ---- reference, split schedule, combine, dispatch (fast) ----


def test_reference_matches_oracle_and_ignores_stale_rows():
    q, kv, table, lengths = _case(0, 3, 2, 4, [1, 13, 64], page=8)
    out, lse = mla_decode_reference(q, kv, table, lengths, softmax_scale=SCALE)
    assert out.shape == (3, 2, 4, 512) and out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    _check((out.astype(jnp.float32), lse), _oracle(q, kv, table, lengths))
    assert np.isneginf(np.asarray(lse[0, 0])).all()  # length 1, s_q 2: query 0 sees nothing


def test_block_ranges_partition_each_sequence():
    rng = np.random.default_rng(0)
    ranges = jax.jit(common.block_range, static_argnums=(2, 3, 4))
    for splits, max_blocks in ((1, 3), (2, 5), (3, 4), (5, 2), (4, 8)):
        lengths = jnp.asarray(rng.integers(0, max_blocks * 64 + 1, 12), jnp.int32)
        start, steps = ranges(lengths[:, None], jnp.arange(splits)[None], splits, 64, max_blocks)
        for n, st, sz in zip(np.asarray(lengths), np.asarray(start), np.asarray(steps)):
            seen = [j for a, k in zip(st, sz) for j in range(a, a + k)]
            assert seen == list(range(common.cdiv(int(n), 64)))


def test_combine_of_split_reference_is_whole():
    q, kv, table, lengths = _case(1, 2, 2, 8, [1, 150], page=16)
    want = mla_decode_reference(q, kv, table, lengths, softmax_scale=SCALE)
    bounds = ((0, 64), (64, 112), (112, 160), (160, 160))  # the last split is empty
    parts = [_partial(q, kv, table, lengths, lo, hi) for lo, hi in bounds]
    o_parts, lse_parts = (jnp.stack([p[i] for p in parts], 1) for i in (0, 1))
    out, lse = jax.jit(common.combine, static_argnums=2)(o_parts, lse_parts, jnp.bfloat16)
    _check(
        (out.reshape(2, 2, 8, 512).astype(jnp.float32), lse.reshape(2, 2, 8)), (want[0].astype(jnp.float32), want[1])
    )


def _partial(q, kv, table, lengths, lo, hi):
    """Attention restricted to positions [lo, hi): (out [B, s_q*H, 512] f32, lse [B, s_q*H])."""
    b, s_q, h, _ = q.shape
    rows = np.asarray(kv, np.float32)[np.clip(np.asarray(table), 0, kv.shape[0] - 1)]
    rows = rows.reshape(b, -1, WIDTH)
    pos = np.arange(rows.shape[1])
    lim = np.asarray(lengths)[:, None] - s_q + 1 + np.arange(s_q)[None]
    vis = (pos[None, None] < lim[..., None]) & (pos >= lo) & (pos < hi)  # [B, s_q, S]
    rows = np.where(vis.any(1)[..., None], rows, 0.0)
    s = np.einsum("bqhd,bsd->bqhs", np.asarray(q, np.float32), rows) * SCALE
    s = np.where(vis[:, :, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    den = e.sum(-1, keepdims=True)
    out = np.einsum("bqhs,bsc->bqhc", e / np.where(den > 0, den, 1), rows[..., :512])
    lse = np.where(den[..., 0] > 0, np.log(np.where(den[..., 0] > 0, den[..., 0], 1)) + m[..., 0], -np.inf)
    return jnp.asarray(out.reshape(b, s_q * h, 512)), jnp.asarray(lse.reshape(b, s_q * h))


def test_dispatch():
    q, kv, table, lengths = _case(2, 1, 1, 16, [5])
    with pytest.raises(ValueError):
        mla_decode(q, kv, table, lengths, softmax_scale=SCALE, backend="cuda")
    with pytest.raises(ValueError):  # the kernels are 16-bit only
        mla_decode(q.astype(jnp.float32), kv.astype(jnp.float32), table, lengths, softmax_scale=SCALE, backend="gpu")
    with pytest.raises(ValueError):  # pages must hold whole 64-row blocks
        mla_decode(q, kv[:, :48], table, lengths, softmax_scale=SCALE, backend="gpu")
    out, lse = mla_decode(q, kv, table, lengths, softmax_scale=SCALE)  # auto on CPU: xla
    assert out.shape == (1, 1, 16, 512) and lse.shape == (1, 1, 16)


def test_interpret_mode_poisons_outputs():
    # The "every element written" checks rely on this.
    assert gpu.interpret_params().uninitialized_memory == "nan"


# ---- kernel bodies in interpret mode (each case is a handful of small grid points) ----

GPU_CASES = {
    # name: (b, s_q, h, lengths, config)
    "ws-h16": (3, 1, 16, [1, 100, 190], gpu.GpuConfig(num_splits=1)),
    "ws-h128-mtp": (1, 2, 128, [130], gpu.GpuConfig(num_splits=1)),
    "ws-splits": (2, 2, 16, [1, 200], gpu.GpuConfig(num_splits=2)),
    "simple-splits": (1, 2, 16, [130], dataclasses.replace(gpu.SIMPLE_CONFIG, num_splits=2)),
}


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_kernel(name):
    b, s_q, h, lengths, cfg = GPU_CASES[name]
    q, kv, table, lens = _case(10 + len(name), b, s_q, h, lengths, stale=300.0)
    got = mla_decode(q, kv, table, lens, softmax_scale=SCALE, backend="gpu", interpret=not REAL_GPU, config=cfg)
    assert got[0].dtype == jnp.bfloat16
    want = mla_decode_reference(q, kv, table, lens, softmax_scale=SCALE)
    _check((got[0].astype(jnp.float32), got[1]), (want[0].astype(jnp.float32), want[1]))


@pytest.mark.skipif(REAL_GPU, reason="the compiled cases above cover it")
@pytest.mark.parametrize(
    "spec",
    [
        dict(),
        dict(p_in_registers=False, pv_inplace=False, pv_chunk=128),
        dict(kernel="simple"),
        dict(kernel="simple", p_in_registers=False, pv_inplace=False, pv_chunk=128),
    ],
)
def test_gpu_kernel_lowers_for_hopper(spec):
    """Lower the compiled (non-interpret) kernel to Mosaic GPU MLIR for CUDA on this CPU machine via
    jax.export: catches shared-memory overflow, layout and TMA-shape errors of the GPU-only paths
    (register P, in-place accumulation, transposed K) that interpret mode does not exercise. The
    PTX/ptxas stage still needs a GPU."""
    from jax import export

    cfg = dataclasses.replace(gpu.GpuConfig(num_sms=132, num_splits=2), **spec)
    f = jax.jit(lambda *a: gpu.mla_decode(*a, softmax_scale=SCALE, config=cfg))
    args = [
        jax.ShapeDtypeStruct(s, d)
        for s, d in (
            ((2, 2, 128, WIDTH), jnp.bfloat16),
            ((8, 64, WIDTH), jnp.bfloat16),
            ((2, 4), jnp.int32),
            ((2,), jnp.int32),
        )
    ]
    assert "mosaic_gpu" in export.export(f, platforms=["cuda"])(*args).mlir_module()


def test_tpu_kernel_lowers_for_tpu():
    """Lower the TPU kernel to a Mosaic TPU custom call (jax.export for platform tpu) on this CPU."""
    from jax import export

    f = jax.jit(lambda *a: tpu.mla_decode(*a, softmax_scale=SCALE, config=tpu.TpuConfig(num_splits=2)))
    args = [
        jax.ShapeDtypeStruct(s, d)
        for s, d in (
            ((2, 2, 128, WIDTH), jnp.bfloat16),
            ((8, 64, WIDTH), jnp.bfloat16),
            ((2, 4), jnp.int32),
            ((2,), jnp.int32),
        )
    ]
    assert "tpu_custom_call" in export.export(f, platforms=["tpu"])(*args).mlir_module()


TPU_CASES = {
    "h16": (3, 2, 16, [1, 37, 64], tpu.TpuConfig()),
    "h128-splits": (2, 1, 128, [45, 3], tpu.TpuConfig(num_splits=3)),
}


@pytest.mark.skipif(REAL_GPU, reason="TPU kernel body; CPU interpret only")
@pytest.mark.parametrize("name", list(TPU_CASES))
def test_tpu_kernel(name):
    b, s_q, h, lengths, cfg = TPU_CASES[name]
    q, kv, table, lens = _case(20 + len(name), b, s_q, h, lengths, page=16)
    got = mla_decode(q, kv, table, lens, softmax_scale=SCALE, backend="tpu", interpret=True, config=cfg)
    want = mla_decode_reference(q, kv, table, lens, softmax_scale=SCALE)
    _check((got[0].astype(jnp.float32), got[1]), (want[0].astype(jnp.float32), want[1]))
