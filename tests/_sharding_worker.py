"""Subprocess entry point for tests/test_sharding.py: runs on 8 fake CPU devices and prints one `RESULT {json}`.

  python -m tests._sharding_worker model MESH [MESH ...] [--ckpt DIR]   whole model + trainer on each mesh
  python -m tests._sharding_worker moe                                 expert-parallel layer checks
  python -m tests._sharding_worker grpo DIR                            GRPO trainer on one device and on a mesh

XLA_FLAGS must already hold --xla_force_host_platform_device_count=8 (the test sets it).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import dsjax
from dsjax.layers.mlp import MLP
from dsjax.layers.moe import MoE
from dsjax.layers.moe_ops import route, sorted_experts
from dsjax.layers.moe_parallel import capacity, padded_all_to_all
from dsjax.model import head_weight
from dsjax.train.checkpoint import Checkpointer
from dsjax.train.checkpoint_io import model_config_dict
from dsjax.train.loop import model_config
from dsjax.train.losses import lm_loss
from dsjax.train.step import make_step_fns
from experiments.configs import tiny
from sharding.mesh import make_mesh
from sharding.rules import activate
from sharding.state import bind, shard_batch, shard_train_state
from tests.conftest import param_shapes, randomize_params, tokens

B, T = 8, 32


def maxdiff(a, b) -> float:
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def copy(tree):
    return jax.tree.map(jnp.copy, tree)  # the train step donates its state


def model_setup():
    c = tiny.get_config()
    c.model.num_hidden_layers = 2
    c.model.num_nextn_predict_layers = 0
    c.train.mtp_lambda = 0.0
    c.train.bias_gamma = 0.01
    c.optim.schedule, c.optim.warmup_steps = "constant", 0
    cfg = model_config(c)
    params = randomize_params(param_shapes(cfg), seed=1, std=0.1)
    batch = {
        "inputs": tokens(B, T, cfg.vocab_size, seed=6),
        "positions": jnp.broadcast_to(jnp.arange(T), (B, T)),
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "loss_mask": jnp.ones((B, T)),
    }
    batch["targets"] = jnp.roll(batch["inputs"], -1, axis=1)
    return c, cfg, params, batch


def run_model(flags: list[str], ckpt: str | None) -> dict:
    c, cfg, params, batch = model_setup()
    c.train.steps = 10  # the optimizer schedule's length
    model = dsjax.DeepSeekV3(cfg)

    def loss_fn(p, b):
        logits, _, aux = model.apply({"params": p}, b["inputs"], b["positions"], b["segment_ids"])
        return (
            lm_loss(aux["hidden"], head_weight(p, cfg), b["targets"], b["loss_mask"])[0],
            (logits, aux["expert_counts"]),
        )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss0, (logits0, counts0)), grads0 = jax.jit(grad_fn)(params, batch)
    step0, _, _, tx = make_step_fns(cfg, c)
    micro = jax.tree.map(lambda x: x[None], batch)  # one micro-batch per step
    ref1 = step0(copy(params), tx.init(params), np.int32(0), micro)
    ref2 = step0(copy(ref1[0]), copy(ref1[1]), np.int32(1), micro)
    bias = lambda p: p["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"]  # noqa: E731
    # Each device's own rows would move the bias differently from the whole batch: the loads are uneven.
    rows = jax.jit(lambda p, b: loss_fn(p, b)[1][1])
    local = [np.asarray(rows(params, jax.tree.map(lambda x, i=i: x[i : i + 1], batch))) for i in range(B)]
    local_signs_differ = any(
        (
            np.sign(x.mean(-1, keepdims=True) - x)
            != np.sign(np.asarray(counts0).mean(-1, keepdims=True) - np.asarray(counts0))
        ).any()
        for x in local
    )

    out = {
        "ref_loss": float(loss0),
        "local_signs_differ": bool(local_signs_differ),
        "bias_moved": maxdiff(bias(ref1[0]), bias(params)),
        "meshes": {},
    }
    fp8_model = dsjax.DeepSeekV3(cfg.replace(fp8="e4m3", fp8_backend="xla"))
    fp8_grad = jax.value_and_grad(lambda p, b: lm_loss_of(fp8_model, cfg, p, b))
    fp8_loss0, fp8_grads0 = jax.jit(fp8_grad)(params, batch)
    state = None
    for flag in flags:
        mesh = make_mesh(flag)
        p, o = shard_train_state(mesh, copy(params), tx.init(params))
        b = shard_batch(mesh, batch)
        fn = bind(mesh, jax.jit(grad_fn))
        (loss, (logits, counts)), grads = fn(p, b)
        hlo = bind(mesh, lambda *a: jax.jit(grad_fn).lower(*a).as_text())(p, b)
        fp8 = fp8_on_mesh(bind(mesh, jax.jit(fp8_grad))(p, b), (fp8_loss0, fp8_grads0), grads0)  # before p is donated
        step, _, _, _ = make_step_fns(cfg, c, mesh)
        p1, o1, m1 = step(p, o, np.int32(0), shard_batch(mesh, micro, batch_dim=1))
        experts = p1["moe_layers"]["mlp"]["experts_gate_up_proj"].sharding.spec
        out["meshes"][flag] = {
            "logits": maxdiff(logits, logits0),
            "grads": maxdiff(grads, grads0),
            "loss": abs(float(loss - loss0)),
            "grad_scale": max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads0)),
            "counts_equal": bool((np.asarray(counts) == np.asarray(counts0)).all()),
            "step_loss": abs(float(m1["loss"] - ref1[2]["loss"])),
            "grad_norm": abs(float(m1["grad_norm"] - ref1[2]["grad_norm"])),
            "bias": maxdiff(bias(p1), bias(ref1[0])),
            "all_to_all": "all_to_all" in hlo,
            "expert_spec": str(experts),
            "lm_head_moment_spec": str(o1[1].inner_states["decay"].inner_state[0].mu["lm_head"].sharding.spec),
            "fp8": fp8,
        }
        state = (mesh, step, p1, o1)
    if ckpt:  # written under the last mesh, restored under the first, trained one more step there
        out["restore"] = restore_on_first_mesh(ckpt, state, flags[0], (c, cfg, params, tx), micro, ref2)
    return out


def restore_on_first_mesh(ckpt, state, first_flag, setup, micro, ref2) -> dict:
    """The last mesh's trained state saved, restored under the first mesh (first_flag) and stepped once more there:
    its values, layout and next step's loss against the single-device run's (ref2)."""
    c, cfg, params, tx = setup
    _, _, p1, o1 = state
    ck = Checkpointer(ckpt, keep=1, async_save=False)
    ck.save(1, p1, o1, jnp.zeros(2, jnp.uint32), {}, {"model": model_config_dict(cfg), "experiment": {}})
    ck.wait()
    first = make_mesh(first_flag)
    like_p, like_o = shard_train_state(first, copy(params), tx.init(params))
    rp, ro, _, _ = ck.restore(1, like_p, like_o)
    ck.close()
    step, _, _, _ = make_step_fns(cfg, c, first)
    same_layout = all(x.sharding == y.sharding for x, y in zip(jax.tree.leaves(rp), jax.tree.leaves(like_p)))
    values = maxdiff(rp, p1) + maxdiff(ro, o1)
    _, _, m2 = step(rp, ro, np.int32(1), shard_batch(first, micro, batch_dim=1))
    np.save(f"{ckpt}/lm_head.npy", np.asarray(p1["lm_head"]))
    return {
        "values": values,
        "layout_is_new_mesh": same_layout,
        "next_step_loss": abs(float(m2["loss"] - ref2[2]["loss"])),
    }


def lm_loss_of(model, cfg, p, b):
    _, _, aux = model.apply({"params": p}, b["inputs"], b["positions"], b["segment_ids"])
    return lm_loss(aux["hidden"], head_weight(p, cfg), b["targets"], b["loss_mask"])[0]


def fp8_on_mesh(mesh_run, one, f32_grads) -> dict:
    """(loss, grads) of the FP8 model on a mesh against one device's and float32's: relative loss difference and
    relative norms of the whole gradient's differences."""
    flat = lambda g: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(g)])  # noqa: E731
    rel = lambda a, b: float(jnp.linalg.norm(flat(a) - flat(b)) / jnp.linalg.norm(flat(b)))  # noqa: E731
    (loss, grads), (loss1, grads1) = mesh_run, one
    return {
        "loss": abs(float(loss - loss1)) / abs(float(loss1)),
        "mesh_vs_one": rel(grads, grads1),
        "one_vs_f32": rel(grads1, f32_grads),
        "mesh_vs_f32": rel(grads, f32_grads),
    }


def moe_setup(**overrides):
    cfg = dsjax.ModelConfig.preset("tiny", **overrides)
    x = jax.random.normal(jax.random.key(0), (B, 16, cfg.hidden_size))
    layer = MoE(cfg)
    params = randomize_params(jax.eval_shape(layer.init, jax.random.key(1), x)["params"], seed=2, std=0.2)
    return cfg, layer, params, x


def reference_moe(cfg, params, x, device_groups=1, keep=None):
    """Single-device MoE output with the given routing device groups and (optionally) dropped pairs."""
    flat = x.reshape(-1, x.shape[-1])
    r = route(flat @ params["gate"]["kernel"], params["gate"].get("e_score_correction_bias"), cfg, device_groups)
    if keep is not None:
        r = r._replace(weights=r.weights * keep)
    y = sorted_experts(flat, r, params["experts_gate_up_proj"], params["experts_down_proj"], jnp.float32)
    shared = MLP(cfg, cfg.n_shared_experts * cfg.moe_intermediate_size).apply({"params": params["shared_experts"]}, x)
    return y.reshape(x.shape) + shared, r


def on_mesh(flag, layer, params, x):
    with activate(make_mesh(flag)):
        return jax.jit(lambda p, x: layer.apply({"params": p}, x))(params, x)


def kept_pairs(indices, shards: int, cap: int, e: int) -> np.ndarray:
    """Which (token, choice) pairs survive a per-(source device, expert) capacity, later tokens dropping first."""
    keep = np.ones(indices.shape, np.float32)
    for rows in np.split(np.arange(indices.shape[0]), shards):
        seen = np.zeros(e, int)
        for t in rows:
            for j, ex in enumerate(indices[t]):
                keep[t, j] = seen[ex] < cap
                seen[ex] += 1
    return keep


def ragged_semantics(operand, output, in_off, send, out_off, recv):
    """NumPy model of lax.ragged_all_to_all (its docstring's SEND / RECEIVE loops) over all devices at once."""
    n, k = len(operand), len(in_off[0])
    per = k // n
    result = [o.copy() for o in output]
    for src in range(n):
        for i in range(k):
            dst = i // per
            result[dst][out_off[src][i] : out_off[src][i] + send[src][i]] = operand[src][
                in_off[src][i] : in_off[src][i] + send[src][i]
            ]
    return result


def check_padded_all_to_all() -> float:
    mesh = make_mesh("expert:4", jax.devices()[:4])
    rng = np.random.RandomState(0)
    rows, per = 12, 2  # 4 devices x 2 slices each
    send = rng.randint(0, 3, (4, 8))
    recv = send.reshape(4, 4, per).transpose(1, 0, 2).reshape(4, 8)  # recv[d][s*per+j] = send[s][d*per+j]
    in_off = np.stack([np.concatenate([[0], np.cumsum(s)[:-1]]) for s in send])  # packed, in slice order
    # each receiver writes sender s's j-th slice after everything from lower senders, with a gap of one row
    out_off = np.zeros((4, 8), int)
    for d in range(4):
        pos = 0
        for s in range(4):
            for j in range(per):
                out_off[s, d * per + j] = pos
                pos += send[s, d * per + j] + 1
    operand = rng.randn(4, rows, 3).astype(np.float32)
    output = np.full((4, 40, 3), -7.0, np.float32)
    want = ragged_semantics(operand, output, in_off, send, out_off, recv)
    spec = jax.sharding.PartitionSpec("expert")
    f = jax.shard_map(
        lambda *a: padded_all_to_all(*[v[0] for v in a], axis_name="expert", peer_rows=8)[None],
        mesh=mesh,
        in_specs=(spec,) * 6,
        out_specs=spec,
    )
    got = jax.jit(f)(
        *[
            jnp.asarray(v, jnp.int32 if v.dtype.kind == "i" else jnp.float32)
            for v in (operand, output, in_off, send, out_off, recv)
        ]
    )
    return float(np.abs(np.asarray(got) - np.stack(want)).max())


def run_moe() -> dict:
    out = {"padded_a2a": check_padded_all_to_all()}
    # Adversarial routing: biases +100 on experts 0 and 1 (both on device 0 when 2 experts per device), so every
    # token's two choices go to one device, which then receives every pair of every source: the dropless bound.
    cfg, layer, params, x = moe_setup()
    params["gate"]["e_score_correction_bias"] = params["gate"]["e_score_correction_bias"].at[:2].set(100.0)
    want, r = reference_moe(cfg, params, x)
    out["adversarial_all_on_device0"] = bool((np.asarray(r.indices) < 2).all())
    for flag in ("data:2,expert:4", "expert:8"):
        y, stats = on_mesh(flag, layer, params, x)
        out[f"adversarial {flag}"] = float(jnp.abs(y - want).max())
        out[f"counts {flag}"] = np.asarray(stats["expert_counts"]).tolist()
    # Capacity factor 1: each source sends at most ceil(pairs / E) rows per expert; the rest drop.
    cap_cfg, cap_layer, _, _ = moe_setup(moe_capacity_factor=1.0)
    n_local = x.shape[0] * x.shape[1] // 8
    cap = capacity(cap_cfg, n_local * cap_cfg.num_experts_per_tok)
    keep = kept_pairs(np.asarray(r.indices), 8, cap, cap_cfg.n_routed_experts)
    want_cap, _ = reference_moe(cap_cfg, params, x, keep=jnp.asarray(keep))
    y, _ = on_mesh("data:2,expert:4", cap_layer, params, x)
    out["capacity"] = {"cap": cap, "dropped": int((keep == 0).sum()), "err": float(jnp.abs(y - want_cap).max())}
    # Device-limited routing, M of 4 devices: with group limiting (groups = devices here), and without it with
    # four experts per token, which could otherwise reach all four devices.
    for m, extra in ((1, {}), (2, {"n_group": 1, "topk_group": 1, "num_experts_per_tok": 4})):
        lim_cfg, lim_layer, lim_params, _ = moe_setup(moe_device_limit=m, **extra)
        want, r = reference_moe(lim_cfg, lim_params, x, device_groups=4)
        unlimited = reference_moe(lim_cfg, lim_params, x)[1]
        y, _ = on_mesh("data:2,expert:4", lim_layer, lim_params, x)
        devices = np.asarray(r.indices) // (lim_cfg.n_routed_experts // 4)
        out[f"limit {m}"] = {
            "err": float(jnp.abs(y - want).max()),
            "max_devices": int(max(len(set(row)) for row in devices.tolist())),
            "changed_routing": bool((np.asarray(unlimited.indices) != np.asarray(r.indices)).any()),
        }
    out["fp8"] = check_fp8_expert_parallel(x)
    return out


def check_fp8_expert_parallel(x) -> dict:
    """FP8 (the kernels' XLA reference) with the experts split over devices: each projection quantizes the rows it
    receives (fp8_grouped_matmul), where one device quantizes the tokens before dispatch and their gradient before
    the combine's backward (fp8_expert_ffn). A 1 x 128 tile lies within one token's row either way, so the loss,
    the router's and the shared experts' gradients agree; the routed experts' weight gradients contract 128-row
    tiles that hold other rows on a device than on one (its received rows come in another order), so they differ
    by FP8 rounding, each as close to float32's as the other. Per parameter: (mesh vs one device, one device vs
    float32, mesh vs float32), relative norms."""
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
    _, f32_layer, params, _ = moe_setup()
    _, layer, _, _ = moe_setup(fp8="e4m3", fp8_backend="xla")
    probe = jnp.cos(x)

    def value_and_grad(layer):
        return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(layer.apply({"params": p}, x)[0] * probe)))

    (l1, g1), (_, g0) = value_and_grad(layer)(params, x), value_and_grad(f32_layer)(params, x)
    with activate(make_mesh("data:2,expert:4")):
        lm, gm = value_and_grad(layer)(params, x)
    grads = {
        jax.tree_util.keystr(path): (rel(a, b), rel(b, c), rel(a, c))
        for (path, a), b, c in zip(
            jax.tree_util.tree_flatten_with_path(gm)[0], jax.tree.leaves(g1), jax.tree.leaves(g0)
        )
        if "e_score_correction_bias" not in jax.tree_util.keystr(path)  # moved by expert counts, not gradients
    }
    return {"loss": abs(float(lm - l1)) / abs(float(l1)), "grads": grads}


def run_grpo(workdir: str) -> dict:
    """Two GRPO steps (warm start included) on one device and on data:2,expert:4 from the same seed."""
    from dsjax.rl.trainer import train as grpo_train
    from experiments.configs import grpo as grpo_config

    def config():
        c = grpo_config.get_config()
        c.task.max_digits, c.task.num_eval = 1, 8
        c.sft.update(steps=20, batch_size=16, log_every=10, target_pass_at_1=0.0)
        c.rollout.update(num_prompts=4, num_samples=4)
        c.grpo.update(steps=2, mu=2, beta=0.04)
        c.train.update(log_every=1, save_every=2, tensorboard=False, async_save=False)
        return c

    out = {}
    for name, mesh in (("single", None), ("mesh", make_mesh("data:2,expert:4"))):
        summary = grpo_train(config(), f"{workdir}/{name}", mesh)
        with open(f"{workdir}/{name}/metrics.jsonl") as f:
            rows = [r for r in map(json.loads, f) if r["split"] == "train"]
        out[name] = {
            "steps": summary["step"],
            "pass_before": summary["pass@1/before"],
            **{k: [r[k] for r in rows] for k in ("reward/mean", "loss", "kl", "logprob_gap")},
        }
    return out


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "model":
        ckpt = args[args.index("--ckpt") + 1] if "--ckpt" in args else None
        meshes = [a for i, a in enumerate(args) if a != "--ckpt" and (i == 0 or args[i - 1] != "--ckpt")]
        result = run_model(meshes, ckpt)
    elif cmd == "grpo":
        result = run_grpo(args[0])
    else:
        result = run_moe()
    print("RESULT " + json.dumps(result), flush=True)
