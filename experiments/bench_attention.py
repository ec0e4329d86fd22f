"""MLA's full (training) attention: every implementation, forward + backward, at the training shapes.

  python experiments/bench_attention.py                        # small preset shapes: B 8, T 2048, H 16, 192/128
  python experiments/bench_attention.py --batch=4 --seq_len=4096 --segments=1,4

Rows: "xla" (einsums, the reference), "cudnn" (what attention_impl="cudnn" runs: documents as cuDNN's packed layout),
"cudnn_causal" (the same kernel ignoring documents, MLA head dims: what cross-document attention would cost),
"cudnn_public" (jax.nn.dot_product_attention: value head zero-padded to 192 and a [B, 1, T, T] document mask: the
path before). Each is checked against the float32 reference on the same inputs (relative Frobenius error of out and
of dq, dk, dv; "cudnn_causal" against the reference without documents) before it is timed. TFLOP/s counts causal
attention within documents as 2 x (qk + v head dims) x heads x visible pairs, x 3.5 for forward + backward (the
flash-attention convention).
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("batch", 8, "Sequences.")
flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
flags.DEFINE_integer("heads", 16, "Attention heads.")
flags.DEFINE_integer("qk_dim", 192, "Query/key head dim (nope + rope).")
flags.DEFINE_integer("v_dim", 128, "Value head dim.")
flags.DEFINE_list("segments", ["1", "3"], "Documents per row (equal lengths) to time.")
flags.DEFINE_list("impls", ["cudnn", "cudnn_public", "xla"], "Implementations to time.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
FLAGS = flags.FLAGS


def run(impl, q, k, v, seg, scale):
    import jax.numpy as jnp

    from dsjax.layers import attention as A

    if impl == "cudnn":
        return A.cudnn_attention(q, k, v, seg, scale)
    if impl == "cudnn_causal":  # documents ignored: what attending across them would cost
        return A.cudnn_attention(q, k, v, None, scale)
    if impl == "cudnn_public":
        import jax

        mask = (seg[:, :, None] == seg[:, None, :])[:, None]
        vp = jnp.pad(v, [(0, 0)] * 3 + [(0, q.shape[-1] - v.shape[-1])])
        o = jax.nn.dot_product_attention(q, k, vp, mask=mask, scale=scale, is_causal=True, implementation="cudnn")
        return o[..., : v.shape[-1]]
    return A.xla_attention(q, k, v, A.causal_mask(seg, q.shape[1]), scale)


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from experiments.bench_util import median_seconds, write_results

    b, t, h, dqk, dv = FLAGS.batch, FLAGS.seq_len, FLAGS.heads, FLAGS.qk_dim, FLAGS.v_dim
    scale = dqk**-0.5
    keys = jax.random.split(jax.random.key(0), 4)
    q, k = (jax.random.normal(kk, (b, t, h, dqk), jnp.bfloat16) for kk in keys[:2])
    v = jax.random.normal(keys[2], (b, t, h, dv), jnp.bfloat16)
    dout = jax.random.normal(keys[3], (b, t, h, dv), jnp.bfloat16)
    rows = []
    print(f"device {jax.devices()[0].device_kind}; B {b} T {t} H {h} qk {dqk} v {dv}", flush=True)
    for n_seg in map(int, FLAGS.segments):
        seg = jnp.broadcast_to((jnp.arange(t) * n_seg // t + 1).astype(jnp.int32), (b, t))
        per_doc = t // n_seg
        pairs = b * n_seg * per_doc * (per_doc + 1) / 2
        flops = 3.5 * 2 * (dqk + dv) * h * pairs

        def fwd_bwd(impl, seg, q, k, v):
            o, vjp = jax.vjp(functools.partial(run, impl, seg=seg, scale=scale), q, k, v)
            return o, vjp(dout.astype(o.dtype))

        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        refs = {}
        for impl in FLAGS.impls:
            seg_ref = jnp.ones_like(seg) if impl == "cudnn_causal" else seg  # the causal row ignores documents
            if seg_ref is not seg or "docs" not in refs:
                refs["ones" if seg_ref is not seg else "docs"] = jax.jit(functools.partial(fwd_bwd, "xla", seg_ref))(
                    *f32
                )
            ref = refs["ones" if seg_ref is not seg else "docs"]
            f = jax.jit(functools.partial(fwd_bwd, impl, seg))
            try:
                got = f(q, k, v)
                errs = [
                    float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
                    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref))
                ]
                s = median_seconds(f, q, k, v, warmup=2, iters=10, repeats=5)
                row = {
                    "impl": impl,
                    "segments": n_seg,
                    "ms": 1e3 * s,
                    "tflops": flops / s / 1e12,
                    "max_rel_err": max(errs),
                }
            except Exception as e:  # noqa: BLE001 - an unsupported variant is a result
                row = {"impl": impl, "segments": n_seg, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            print(row, flush=True)
    print("\n| impl | docs/row | fwd+bwd ms | TFLOP/s | max rel err (out, dq, dk, dv) |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['segments']} | failed: {r['error'][:80]} | | |")
        else:
            print(f"| {r['impl']} | {r['segments']} | {r['ms']:.2f} | {r['tflops']:.0f} | {r['max_rel_err']:.1e} |")
    write_results(FLAGS.out, FLAGS.flags_into_string(), rows)


if __name__ == "__main__":
    app.run(main)
