"""How far apart the FP8 MoE layer's two ways of running its shared experts are, against FP8's own error.

In FP8 the shared experts run as extra groups of the routed experts' grouped GEMMs (`moe.shared_in_routed`);
tests/test_fp8_layers.py holds that layer equal to the one with a separate FP8 MLP. This prints, per output and
gradient, the distance between the two paths (folded ~ separate) beside each path's distance from the float32 layer:
a gap that is a small fraction of the latter is e4m3 codes rounding the other way, not a wrong product. The test's
layer: `tiny` with 1 shared expert, experts 128 wide, hidden 256, FP8 weight gradients everywhere.

  python experiments/fp8_fold_gap.py --backends=xla,gpu      (gpu: the Mosaic GPU kernels, on a Hopper GPU)
"""

from __future__ import annotations

import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import dsjax  # noqa: E402
from dsjax.layers import moe as moe_module  # noqa: E402
from dsjax.layers.moe import MoE  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("backends", "xla", "fp8_backend values to run, comma-separated (xla, gpu)")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _layer_grads(cfg, params, x, g):
    """(y, d params, d x) of the MoE layer at x for output gradient g, in cfg's compute dtype."""
    dtype = jnp.float32 if cfg.dtype == "float32" else jnp.bfloat16

    def both(params, x, g):
        y, vjp = jax.vjp(lambda p, x: MoE(cfg).apply({"params": p}, x)[0], params, x)
        return y, *vjp(g)

    return jax.jit(both)(params, x.astype(dtype), g.astype(dtype))


def main(argv):
    del argv
    for backend in FLAGS.backends.split(","):
        cfg = dsjax.ModelConfig.preset("tiny", dtype="bfloat16", fp8="e4m3", fp8_backend=backend, fp8_wgrad="all")
        cfg = cfg.replace(n_shared_experts=1, moe_intermediate_size=128, hidden_size=256, moe_backend="ragged_dot")
        rng = np.random.default_rng(17)
        x = jnp.asarray(rng.standard_normal((2, 70, cfg.hidden_size)), jnp.bfloat16)
        g = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
        params = MoE(cfg).init(jax.random.key(1), x)["params"]
        folded = _layer_grads(cfg, params, x, g)
        with mock.patch.object(moe_module, "shared_in_routed", lambda c: False):
            separate = _layer_grads(cfg, params, x, g)
        exact = _layer_grads(cfg.replace(fp8="none", dtype="float32"), params, x, g)
        leaves = zip(jax.tree_util.tree_leaves_with_path(folded), jax.tree.leaves(separate), jax.tree.leaves(exact))
        print(f"{'backend':8s} {'output / gradient':50s} folded~separate  folded~f32  separate~f32")
        for (path, a), b, c in leaves:
            if np.any(np.asarray(b)):  # the router bias has no gradient
                name = jax.tree_util.keystr(path)[:50]
                print(f"{backend:8s} {name:50s} {_rel(a, b):15.2e} {_rel(a, c):11.2e} {_rel(b, c):13.2e}")


if __name__ == "__main__":
    app.run(main)
