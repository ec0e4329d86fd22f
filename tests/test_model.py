"""Model behaviour: decode = forward, MoE backends, router vs NumPy, MTP, bf16 gap, remat, scan / unroll,
document masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.layers.moe_ops import route
from dsjax.model import head_weight
from dsjax.train.losses import cross_entropy, lm_loss
from tests.conftest import param_shapes, randomize_params, tokens


def apply_fn(cfg, aux=False, **kw):
    model = dsjax.DeepSeekV3(cfg)
    if aux:  # (logits, aux dict)
        return jax.jit(lambda p, t: model.apply({"params": p}, t, **kw)[::2])
    return jax.jit(lambda p, t: model.apply({"params": p}, t, **kw).logits)


def test_decode_equals_forward(tiny_cfg, tiny_params):
    cfg, model = tiny_cfg, dsjax.DeepSeekV3(tiny_cfg)
    b, t, prompt = 2, 20, 7
    tok = tokens(b, t, cfg.vocab_size, seed=5)
    full = np.asarray(apply_fn(cfg)(tiny_params, tok))
    cache = dsjax.init_cache(cfg, b, 32, jnp.float32)

    prefill = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c, absorbed=False))
    step = jax.jit(lambda p, x, pos, c: model.apply({"params": p}, x, pos, cache=c))
    logits, cache, _ = prefill(tiny_params, tok[:, :prompt], cache)
    gaps = [np.abs(np.asarray(logits) - full[:, :prompt]).max()]
    for i in range(prompt, t):
        pos = jnp.full((b, 1), i, jnp.int32)
        logits, cache, _ = step(tiny_params, tok[:, i : i + 1], pos, cache)
        gaps.append(np.abs(np.asarray(logits[:, 0]) - full[:, i]).max())
    print("decode vs forward max |dlogit|:", max(gaps))
    assert max(gaps) <= 1e-4
    # the cache holds the 576-style latent rows only: [c_kv | k_pe] per token and layer
    assert cache.moe.shape == (cfg.num_moe_layers, b, 32, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert float(jnp.abs(cache.moe[:, :, t:]).max()) == 0.0  # nothing written past the last position


def test_absorbed_chunk_prefill_and_ragged_positions(tiny_cfg, tiny_params):
    """Absorbed attention over the cache for a whole chunk; sequences at different positions in one batch."""
    cfg, model = tiny_cfg, dsjax.DeepSeekV3(tiny_cfg)
    tok = tokens(2, 12, cfg.vocab_size, seed=6)
    full = np.asarray(apply_fn(cfg)(tiny_params, tok))
    cache = dsjax.init_cache(cfg, 2, 16, jnp.float32)
    run = jax.jit(lambda p, x, pos, c: model.apply({"params": p}, x, pos, cache=c, absorbed=True))
    logits, cache, _ = run(tiny_params, tok[:, :9], jnp.broadcast_to(jnp.arange(9), (2, 9)), cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :9], atol=1e-4)
    # row 0 continues at position 9, row 1 re-decodes position 5 (its slot is overwritten with the same token)
    pos = jnp.array([[9], [5]], jnp.int32)
    nxt = jnp.stack([tok[0, 9:10], tok[1, 5:6]])
    logits, _, _ = run(tiny_params, nxt, pos, cache)
    np.testing.assert_allclose(np.asarray(logits[0, 0]), full[0, 9], atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits[1, 0]), full[1, 5], atol=1e-4)


def test_moe_backends_agree_with_gradients(tiny_cfg, tiny_params):
    tok = tokens(2, 16, tiny_cfg.vocab_size, seed=7)

    def loss_fn(cfg):
        model = dsjax.DeepSeekV3(cfg)

        def f(p):
            logits = model.apply({"params": p}, tok[:, :-1]).logits
            return cross_entropy(logits, tok[:, 1:])[0]

        return jax.jit(jax.value_and_grad(f))

    l1, g1 = loss_fn(tiny_cfg.replace(moe_backend="ragged_dot"))(tiny_params)
    l2, g2 = loss_fn(tiny_cfg.replace(moe_backend="dense"))(tiny_params)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    experts = g1["moe_layers"]["mlp"]["experts_gate_up_proj"]
    assert float(jnp.abs(experts).max()) > 0  # gradients reach the routed experts
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _numpy_route(logits, bias, cfg):
    scores = (
        1 / (1 + np.exp(-logits))
        if cfg.scoring_func == "sigmoid"
        else np.exp(logits - logits.max(-1, keepdims=True))
        / np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
    )
    out_idx, out_w = [], []
    per_group = cfg.n_routed_experts // cfg.n_group
    for s in scores:
        choice = s + (bias if bias is not None else 0)
        allowed = np.arange(cfg.n_routed_experts)
        if cfg.n_group > 1:
            groups = choice.reshape(cfg.n_group, per_group)
            gscore = np.sort(groups, axis=1)[:, -2:].sum(1) if cfg.topk_method == "noaux_tc" else groups.max(1)
            keep = np.argsort(-gscore)[: cfg.topk_group]
            allowed = np.concatenate([np.arange(g * per_group, (g + 1) * per_group) for g in keep])
        idx = allowed[np.argsort(-choice[allowed])[: cfg.num_experts_per_tok]]
        w = s[idx]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        out_idx.append(idx)
        out_w.append(w * cfg.routed_scaling_factor)
    return np.array(out_idx), np.array(out_w)


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny", {}),
        (
            "tiny",
            dict(
                scoring_func="softmax",
                topk_method="group_limited_greedy",
                norm_topk_prob=False,
                routed_scaling_factor=16.0,
            ),
        ),
        ("tiny", dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False)),
        ("deepseek-v3-671b", {}),
    ],
)
def test_router_matches_numpy(preset, overrides):
    cfg = dsjax.ModelConfig.preset(preset, **overrides)
    rng = np.random.RandomState(0)
    logits = rng.standard_normal((64, cfg.n_routed_experts)).astype(np.float32)
    bias = (
        (0.5 * rng.standard_normal(cfg.n_routed_experts)).astype(np.float32) if cfg.topk_method == "noaux_tc" else None
    )
    r = route(jnp.asarray(logits), None if bias is None else jnp.asarray(bias), cfg)
    want_idx, want_w = _numpy_route(logits.astype(np.float64), bias, cfg)
    got_idx, got_w = np.asarray(r.indices), np.asarray(r.weights)
    order_g, order_w = np.argsort(got_idx, 1), np.argsort(want_idx, 1)
    np.testing.assert_array_equal(np.take_along_axis(got_idx, order_g, 1), np.take_along_axis(want_idx, order_w, 1))
    np.testing.assert_allclose(np.take_along_axis(got_w, order_g, 1), np.take_along_axis(want_w, order_w, 1), rtol=1e-5)
    if bias is not None:
        # the bias changes which experts are picked, but the weights are unbiased scores of the picked ones
        scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
        picked = np.take_along_axis(scores, got_idx, 1)
        if cfg.norm_topk_prob:
            picked = picked / picked.sum(1, keepdims=True)
        np.testing.assert_allclose(got_w, picked * cfg.routed_scaling_factor, rtol=1e-5)
        r0 = route(jnp.asarray(logits), None, cfg)
        assert (np.asarray(r0.indices) != got_idx).any()


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_alignment_and_loss(depth):
    cfg = dsjax.ModelConfig.preset("tiny", num_nextn_predict_layers=depth)
    params = randomize_params(param_shapes(cfg), seed=2, std=0.15)
    f = apply_fn(cfg, aux=True, mtp=True)
    tok = tokens(1, 16, cfg.vocab_size, seed=8)
    logits, aux = f(params, tok)
    assert aux["mtp_logits"].shape == (depth, 1, 16, cfg.vocab_size)
    t = 5
    for k in range(1, depth + 1):
        # depth k at position t reads tokens <= t + k: changing token t + k moves it, token t + k + 1 does not
        changed_in = tok.at[0, t + k].set((tok[0, t + k] + 1) % cfg.vocab_size)
        changed_out = tok.at[0, t + k + 1].set((tok[0, t + k + 1] + 1) % cfg.vocab_size)
        base = aux["mtp_logits"][k - 1, 0, t]
        assert float(jnp.abs(f(params, changed_in)[1]["mtp_logits"][k - 1, 0, t] - base).max()) > 1e-3
        np.testing.assert_allclose(f(params, changed_out)[1]["mtp_logits"][k - 1, 0, t], base, atol=1e-5)
    # combined loss = main CE + lambda / D * sum_k CE_k, CE_k against token t + k + 1
    inputs, targets = tok[:, :-1], tok[:, 1:]
    logits, aux = f(params, inputs)
    mask = jnp.ones(targets.shape, jnp.float32)
    loss, m = lm_loss(aux["hidden"], head_weight(params, cfg), targets, mask, aux, mtp_lambda=0.3)
    manual = cross_entropy(logits, targets)[0]
    for k in range(1, depth + 1):
        ce_k = cross_entropy(aux["mtp_logits"][k - 1][:, :-k], targets[:, k:])[0]
        np.testing.assert_allclose(m[f"loss/mtp_{k}"], ce_k, rtol=1e-6)
        manual = manual + 0.3 / depth * ce_k
    np.testing.assert_allclose(loss, manual, rtol=1e-6)


def test_mtp_matches_transformers_mtp_layer():
    """Our MTP modules (depth 2) against transformers' generic MtpLayer running the same weights."""
    import torch
    from transformers import DeepseekV3Config
    from transformers.modeling_layers import MtpLayer
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hfm

    from dsjax.convert.hf import hf_tensors

    cfg = dsjax.ModelConfig.preset("tiny", num_nextn_predict_layers=2)
    params = randomize_params(param_shapes(cfg), seed=3, std=0.15)
    tok = tokens(2, 12, cfg.vocab_size, seed=9)
    _, aux = apply_fn(cfg, aux=True, mtp=True)(params, tok)
    hc = DeepseekV3Config.from_dict(cfg.to_hf())
    hc._attn_implementation = "eager"
    sd = {k: torch.tensor(np.array(v)) for k, v in hf_tensors(cfg, params)}
    rotary = hfm.DeepseekV3RotaryEmbedding(hc)
    t = tok.shape[1]
    mask = torch.triu(torch.full((t, t), torch.finfo(torch.float32).min), 1)[None, None].expand(2, 1, t, t)
    prev = torch.tensor(np.asarray(aux["hidden"]))
    for k in range(1, 3):
        layer = MtpLayer(hc, hfm.DeepseekV3DecoderLayer, hfm.DeepseekV3RMSNorm, layer_idx=cfg.num_hidden_layers + k - 1)
        p = f"model.layers.{cfg.num_hidden_layers + k - 1}."
        own = {n[len(p) :]: v for n, v in sd.items() if n.startswith(p)}
        e = cfg.n_routed_experts
        state = {
            "enorm.weight": own["enorm.weight"],
            "hnorm.weight": own["hnorm.weight"],
            "eh_proj.weight": own["eh_proj.weight"],
            "post_norm.weight": own["shared_head.norm.weight"],
            "mtp_block.mlp.experts.gate_up_proj": torch.stack(
                [
                    torch.cat([own[f"mlp.experts.{j}.gate_proj.weight"], own[f"mlp.experts.{j}.up_proj.weight"]])
                    for j in range(e)
                ]
            ),
            "mtp_block.mlp.experts.down_proj": torch.stack(
                [own[f"mlp.experts.{j}.down_proj.weight"] for j in range(e)]
            ),
        }
        for n, v in own.items():
            if n.startswith(("self_attn", "input_layernorm", "post_attention_layernorm", "mlp.gate", "mlp.shared")):
                state["mtp_block." + n] = v
        missing, unexpected = layer.load_state_dict(state, strict=False)
        assert not unexpected and all("e_score" not in m for m in missing) and len(missing) == 0, (missing, unexpected)
        pos = torch.arange(t)[None].expand(2, t) + k
        emb = torch.tensor(np.asarray(params["embed_tokens"]["embedding"]))[
            torch.tensor(np.asarray(jnp.pad(tok[:, k:], ((0, 0), (0, k)))))
        ]
        with torch.no_grad():
            prev = layer(
                emb, prev, position_embeddings=rotary(emb, pos), attention_mask=mask, position_ids=pos, cache=None
            )
        np.testing.assert_allclose(prev.numpy(), np.asarray(aux["mtp_hidden"][k - 1]), atol=2e-5)


@pytest.mark.parametrize(
    "std, max_rel, max_tv",
    [
        (0.02, 0.02, 0.01),  # the model's init scale: bf16 rounding only
        (0.15, 0.08, 0.05),  # large random weights: bf16 noise flips some top-k expert choices, the main cost
    ],
)
def test_bf16_gap_is_bounded(tiny_cfg, std, max_rel, max_tv):
    """bf16 compute (float32 params) vs float32: the gap is printed and held under the stated bounds.

    Bounds: mean |dlogit| / mean |logit| < max_rel and mean total variation of the next-token distribution
    < max_tv, on 4 x 32 random tokens.
    """
    params = randomize_params(param_shapes(tiny_cfg), seed=1, std=std)
    tok = tokens(4, 32, tiny_cfg.vocab_size, seed=10)
    f32 = np.asarray(apply_fn(tiny_cfg)(params, tok))
    b16 = np.asarray(apply_fn(tiny_cfg.replace(dtype="bfloat16"))(params, tok))
    rel = np.abs(b16 - f32).mean() / np.abs(f32).mean()
    tv = 0.5 * np.abs(np.asarray(jax.nn.softmax(f32)) - np.asarray(jax.nn.softmax(b16))).sum(-1)
    agree = (f32.argmax(-1) == b16.argmax(-1)).mean()
    print(
        f"bf16 vs float32 (weights std {std}): max |dlogit| {np.abs(b16 - f32).max():.4f} at logit scale "
        f"{np.abs(f32).max():.2f}, mean relative {rel:.4f}, TV mean {tv.mean():.4f} max {tv.max():.4f}, "
        f"argmax agreement {agree:.3f}"
    )
    assert rel < max_rel and tv.mean() < max_tv


def test_remat_gives_same_gradients(tiny_cfg, tiny_params):
    tok = tokens(2, 8, tiny_cfg.vocab_size, seed=11)

    def grads(cfg):
        model = dsjax.DeepSeekV3(cfg)
        return jax.jit(jax.grad(lambda p: model.apply({"params": p}, tok).logits.mean()))(tiny_params)

    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(grads(tiny_cfg))[0], jax.tree.leaves(grads(tiny_cfg.replace(remat="full")))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_unrolled_layers_equal_the_scan(tiny_cfg, tiny_params):
    """unroll_layers changes the program, not the math: same logits, MTP logits and gradients (params stay
    stacked, so checkpoints are shared)."""
    tok = tokens(2, 8, tiny_cfg.vocab_size, seed=13)

    def run(cfg):
        model = dsjax.DeepSeekV3(cfg)
        f = lambda p: model.apply({"params": p}, tok, mtp=True)  # noqa: E731
        out = jax.jit(f)(tiny_params)
        g = jax.jit(jax.grad(lambda p: f(p).logits.mean() + f(p).aux["mtp_logits"].mean()))(tiny_params)
        return out, g

    (a, ga), (b, gb) = run(tiny_cfg), run(tiny_cfg.replace(unroll_layers=True))
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.aux["mtp_logits"], b.aux["mtp_logits"], rtol=1e-5, atol=1e-6)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(ga)[0], jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_document_mask_off_makes_a_packed_row_one_sequence(tiny_cfg, tiny_params):
    """document_mask=False: a packed row is one causal sequence (positions 0..T-1), exactly the unpacked forward;
    with the mask on, the second document differs from that and the first does not."""
    tok = tokens(2, 12, tiny_cfg.vocab_size, seed=14)
    seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)
    pos = jnp.asarray([list(range(5)) + list(range(7)), list(range(12))], jnp.int32)
    plain = apply_fn(tiny_cfg)(tiny_params, tok)
    off = dsjax.DeepSeekV3(tiny_cfg.replace(document_mask=False))
    got = jax.jit(lambda p, t: off.apply({"params": p}, t, pos, seg).logits)(tiny_params, tok)
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-6)
    on = jax.jit(lambda p, t: dsjax.DeepSeekV3(tiny_cfg).apply({"params": p}, t, pos, seg).logits)(tiny_params, tok)
    np.testing.assert_allclose(on[0, :5], plain[0, :5], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(on[1], plain[1], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(on[0, 5:] - plain[0, 5:])).max() > 1e-3


def test_scan_keeps_program_size_flat_in_depth():
    def n_eqns(layers):
        cfg = dsjax.ModelConfig.preset("tiny", num_hidden_layers=layers, num_nextn_predict_layers=0)
        shapes = param_shapes(cfg)
        jaxpr = jax.make_jaxpr(lambda p, t: dsjax.DeepSeekV3(cfg).apply({"params": p}, t))(
            shapes, jax.ShapeDtypeStruct((1, 8), jnp.int32)
        )
        return len(jaxpr.eqns)

    assert n_eqns(3) == n_eqns(9)


def test_router_stats_returned(tiny_cfg, tiny_params):
    tok = tokens(3, 10, tiny_cfg.vocab_size, seed=12)
    _, aux = apply_fn(tiny_cfg, aux=True)(tiny_params, tok)
    counts = np.asarray(aux["expert_counts"])
    assert counts.shape == (tiny_cfg.num_moe_layers, tiny_cfg.n_routed_experts)
    assert (counts.sum(1) == 3 * 10 * tiny_cfg.num_experts_per_tok).all()
    assert np.all(np.asarray(aux["balance_loss"]) > 0)


def test_mtp_flag_needs_depth():
    cfg = dsjax.ModelConfig.preset("tiny", num_nextn_predict_layers=0)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), param_shapes(cfg))
    with pytest.raises(ValueError, match="num_nextn_predict_layers is 0"):
        dsjax.DeepSeekV3(cfg).apply({"params": params}, jnp.zeros((1, 4), jnp.int32), mtp=True)


def test_expert_backends_agree_at_layer_level(tiny_cfg):
    """The Pallas gmm backend (its XLA path on CPU; the kernels are tested in test_grouped_matmul) and the
    dense reference agree with lax.ragged_dot, values and gradients (routing weights included)."""
    from dsjax.layers.moe_ops import route, routed_experts_local

    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(40, 64), jnp.float32)
    gu, dn = jnp.asarray(0.1 * rng.randn(8, 64, 64), jnp.float32), jnp.asarray(0.1 * rng.randn(8, 32, 64), jnp.float32)
    logits = jnp.asarray(rng.randn(40, 8), jnp.float32)

    def run(name):
        cfg = tiny_cfg.replace(moe_backend=name, platform="cpu")

        def f(x, gu, dn, logits):
            return jnp.sum(routed_experts_local(x, route(logits, None, cfg), gu, dn, cfg) ** 2)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(x, gu, dn, logits)

    want = run("ragged_dot")
    assert float(jnp.abs(want[1][3]).max()) > 1e-3  # the routing weights do get a gradient
    for name in ("gmm", "dense"):
        for a, b in zip(jax.tree.leaves(run(name)), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
