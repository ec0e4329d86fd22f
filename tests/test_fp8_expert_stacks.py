"""Every layer's FP8 expert weights quantized in one pass (dsjax.layers.fp8.ExpertBlocks): each layer's experts
read their own groups of the stacks, bit-equal to quantizing that layer's weights, alone and through the model."""

from __future__ import annotations

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fp8_helpers import INTERPRET, LAYER_BACKENDS, rel


@pytest.mark.parametrize("backend", LAYER_BACKENDS)
def test_fp8_experts_read_every_layers_blocks_in_place(backend):
    """ExpertBlocks (every layer's expert weights, routed and shared, quantized in one pass) give each layer's FP8
    experts exactly what quantizing that layer's own weights gives: output and every gradient bit-equal, the
    weight gradients returned as the per-layer weights' cotangents (their values unread); through the model's scan
    too, where the segment's stacks reach each layer."""
    import dsjax
    from dsjax.layers.fp8 import expert_stacks
    from dsjax.layers.moe_ops import Routing, sorted_experts
    from dsjax.model import head_weight
    from dsjax.train.loop import init_params
    from dsjax.train.losses import lm_loss

    rng = np.random.default_rng(8)
    n, d, i, e, s, k, layers = 80, 256, 128, 4, 1, 2, 3
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    indices = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(n)]), jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    stack = lambda *shape: jnp.asarray(rng.standard_normal((layers, *shape)) * 0.05, jnp.float32)  # noqa: E731
    gate_up, down, s_gate_up, s_down = stack(e, d, 2 * i), stack(e, i, d), stack(s, d, 2 * i), stack(s, i, d)
    g = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    blocks = expert_stacks((gate_up, s_gate_up), (down, s_down), backend)

    def run(layer, with_blocks):
        def f(x, w, a, b, sa, sb):
            mine = blocks._replace(layer=jnp.int32(layer)) if with_blocks else None
            how = dict(fp8_backend=backend, shared=(sa, sb), blocks=mine)
            return sorted_experts(x, Routing(w, indices, None), a, b, jnp.bfloat16, **how)

        args = (x, weights, gate_up[layer], down[layer], s_gate_up[layer], s_down[layer])
        y, vjp = jax.vjp(f, *args)
        return (y, *vjp(g))

    def same(a, b):  # bit-equal; XLA's reference on a GPU may fuse the sliced dequantization into its dot apart
        a, b = ([np.asarray(u, np.float32) for u in t] for t in (a, b))
        if INTERPRET or backend == "gpu":
            return all(np.array_equal(u, v) for u, v in zip(a, b))
        # a cotangent that is zero in one must be zero in the other (rel would divide by zero)
        return all(u.shape == v.shape and (rel(u, v) < 1e-2 if v.any() else not u.any()) for u, v in zip(a, b))

    for layer in (0, 2):
        assert same(jax.jit(functools.partial(run, layer, True))(), jax.jit(functools.partial(run, layer, False))())
    # layers 0 and 2 differ, so layer 2's equality above needs its own blocks (group_offset 2 * (E + S))
    assert not same(jax.jit(functools.partial(run, 2, True))(), jax.jit(functools.partial(run, 0, True))())

    cfg = dsjax.ModelConfig.preset("tiny", vocab_size=259, dtype="bfloat16", fp8="e4m3", fp8_backend=backend)
    params, tok = init_params(cfg, 0), jax.random.randint(jax.random.key(0), (2, 65), 0, 259)

    def loss(p):
        aux = dsjax.DeepSeekV3(cfg).apply({"params": p}, tok[:, :-1], mtp=True).aux
        return lm_loss(aux["hidden"], head_weight(p, cfg), tok[:, 1:], jnp.ones((2, 64)), aux, mtp_lambda=0.3)[0]

    stacked = jax.jit(jax.value_and_grad(loss))(params)
    with mock.patch("dsjax.model.stacked_expert_blocks", lambda p, c: None):
        per_layer = jax.jit(jax.value_and_grad(loss))(params)
    assert same(jax.tree.leaves(stacked), jax.tree.leaves(per_layer))
    assert np.any(np.asarray(stacked[1]["moe_layers"]["mlp"]["experts_gate_up_proj"]))
