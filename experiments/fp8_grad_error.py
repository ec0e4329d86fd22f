"""Each parameter's gradient error at initialisation, BF16 / FP8 / FP8 with BF16 weight gradients against float32.

The training loss (main + 0.3 x MTP) of one random batch, on a CPU-sized model with `small`'s routing (64 experts
top-6, groups, a shared expert, 1 dense + 3 MoE layers + MTP) at hidden 128: per parameter, |g - g_f32| / |g_f32|.
FP8 runs the XLA reference of the recipe's quantization (the same e4m3 rounding as the GPU kernels; float32 sums).

  JAX_PLATFORMS=cpu python experiments/fp8_grad_error.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import dsjax  # noqa: E402
from dsjax.model import head_weight  # noqa: E402
from dsjax.train.loop import init_params  # noqa: E402
from dsjax.train.losses import lm_loss  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("seq", 256, "tokens per row (4 rows)")
flags.DEFINE_float("mtp_lambda", 0.3, "weight of the MTP loss")

WIDTHS = dict(  # the ninth session's CPU stand-in for `small` (experiments/BENCHMARKS.md)
    vocab_size=259, hidden_size=128, intermediate_size=352, moe_intermediate_size=64, num_hidden_layers=4,
    q_lora_rank=48, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, num_attention_heads=4,
)  # fmt: skip


def grads(cfg, params, tok):
    model = dsjax.DeepSeekV3(cfg)
    inp, tgt = tok[:, :-1], tok[:, 1:]

    def loss(p):
        aux = model.apply({"params": p}, inp, mtp=True).aux
        return lm_loss(aux["hidden"], head_weight(p, cfg), tgt, jnp.ones(tgt.shape), aux, mtp_lambda=FLAGS.mtp_lambda)[
            0
        ]

    return jax.jit(jax.grad(loss))(params)


def main(argv):
    del argv
    base = dsjax.ModelConfig.preset("small", **WIDTHS, dtype="float32")
    params = init_params(base, 0)
    tok = jax.random.randint(jax.random.key(0), (4, FLAGS.seq + 1), 0, WIDTHS["vocab_size"])
    ref = grads(base, params, tok)
    bf16 = base.replace(dtype="bfloat16")
    runs = {"bf16": bf16, "fp8": bf16.replace(fp8="e4m3"), "fp8_bwg": bf16.replace(fp8="e4m3", fp8_wgrad="none")}
    got = {name: grads(cfg, params, tok) for name, cfg in runs.items()}
    print(f"{'parameter':78s} {'|g|':>9s} " + " ".join(f"{k:>8s}" for k in runs))
    leaves = {name: jax.tree.leaves(g) for name, g in got.items()}  # same tree structure as ref's
    for i, (path, g_ref) in enumerate(jax.tree_util.tree_flatten_with_path(ref)[0]):
        want = np.asarray(g_ref, np.float64)
        errs = [np.linalg.norm(np.asarray(leaves[name][i], np.float64) - want) for name in runs]
        errs = [e / max(np.linalg.norm(want), 1e-30) for e in errs]
        name = jax.tree_util.keystr(path)[:78]
        print(f"{name:78s} {np.linalg.norm(want):9.2e} " + " ".join(f"{e:8.3f}" for e in errs))


if __name__ == "__main__":
    app.run(main)
