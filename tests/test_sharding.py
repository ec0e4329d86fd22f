"""Sharding: mesh flags, the rule table, expert parallelism, the trainer on meshes, checkpoints across meshes,
a 2-process run, the memory plan.

Mesh tests run in subprocesses on 8 fake CPU devices (tests/_sharding_worker.py, tests/_sharding_multihost.py).
The jobs the selected tests need start at module setup, two at a time, while the in-process tests run; each test
waits for its own job. One job compiles the single-device reference once for all four meshes.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

import dsjax
from dsjax.layers.moe_ops import route
from sharding.mesh import AXES, make_mesh, parse_mesh_flag
from sharding.rules import like_params_specs, param_logical_axes, param_specs
from tests.conftest import param_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ["data:8", "fsdp:8", "data:2,expert:4", "fsdp:2,expert:2,tensor:2"]
NEEDS = {
    "test_mesh_matches_single_device": ["model"],
    "test_router_bias_update_uses_global_counts": ["model"],
    "test_checkpoint_restores_under_another_mesh": ["model"],
    "test_expert_parallel_drops_no_token_under_adversarial_routing": ["moe"],
    "test_capacity_factor_drops_only_the_overflow": ["moe"],
    "test_device_limited_routing_on_a_mesh": ["moe"],
    "test_padded_all_to_all_has_ragged_semantics": ["moe"],
    "test_fp8_experts_on_a_mesh_match_one_device": ["moe"],
    "test_two_processes_train_on_one_global_mesh": ["multihost"],
    "test_grpo_trains_on_a_mesh_like_on_one_device": ["grpo"],
}


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return env


def _run(argv, env) -> tuple[int, str]:
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return p.returncode, p.stdout + p.stderr


def _worker(*args) -> dict:
    rc, out = _run(["-m", "tests._sharding_worker", *args], _env(8))
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert rc == 0 and lines, out[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _corpus(directory) -> str:
    rng = np.random.RandomState(0)
    words = ["def", "return", "class", "import", "self", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    for i in range(40):
        (directory / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, rng.randint(20, 200))))
    return str(directory / "*.txt")


def _multihost(tmp) -> dict:
    """Two processes x 2 CPU devices on localhost, one data:2,expert:2 mesh, gloo collectives."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    corpus, workdir = _corpus(tmp), str(tmp / "run")
    args = [
        sys.executable,
        "tests/_sharding_multihost.py",
        f"--workdir={workdir}",
        f"--corpus={corpus}",
        "--mesh=data:2,expert:2",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
    ]
    procs = [
        subprocess.Popen(
            args + [f"--process_id={i}"],
            cwd=ROOT,
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    return {"rc": [p.returncode for p in procs], "out": outs, "workdir": workdir}


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
    """Starts the subprocess jobs of the selected tests (longest first, two at a time); yields their futures."""
    wanted = {
        j
        for item in request.session.items
        if item.module is sys.modules[__name__]
        for j in NEEDS.get(item.originalname, [])
    }
    ckpt = tmp_path_factory.mktemp("ckpt")
    starts = {
        "model": lambda: {**_worker("model", *MESHES, "--ckpt", str(ckpt)), "ckpt": str(ckpt)},
        "moe": lambda: _worker("moe"),
        "multihost": lambda: _multihost(tmp_path_factory.mktemp("multihost")),
        "grpo": lambda: _worker("grpo", str(tmp_path_factory.mktemp("grpo"))),
    }
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(starts[name]) for name in starts if name in wanted}
    yield futures
    pool.shutdown(wait=True)


# ---------------------------------------------------------------- in-process: flags, rules, routing, plan
def test_mesh_flag_parsing():
    assert parse_mesh_flag("data:2,expert:4") == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert parse_mesh_flag("") == {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1}
    for bad, msg in (
        ("model:2", "AXIS:SIZE"),
        ("data:0", "size 0"),
        ("data:2,data:2", "twice"),
        ("data", "AXIS:SIZE"),
        ("data:x", "not an integer"),
        ("data:-1,expert:-1", "only one axis"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_mesh_flag(bad)
    mesh = make_mesh("")  # every device (one here) on the data axis
    assert mesh.axis_names == AXES and dict(mesh.shape) == {
        "data": jax.device_count(),
        "fsdp": 1,
        "expert": 1,
        "tensor": 1,
    }
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match=f"needs {2 * jax.device_count()} devices"):
        make_mesh(f"data:{2 * jax.device_count()}")


def _abstract(**sizes):
    sizes = {**dict.fromkeys(AXES, 1), **sizes}
    return AbstractMesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES))


@pytest.mark.parametrize(
    "preset,overrides",
    [("tiny", {}), ("tiny", {"q_lora_rank": None}), ("small", {}), ("deepseek-v2-lite", {}), ("deepseek-v3-671b", {})],
)
def test_rule_table_names_every_parameter(preset, overrides):
    params = param_shapes(dsjax.ModelConfig.preset(preset, **overrides))
    axes = param_logical_axes(params)
    for x, names in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=lambda v: isinstance(v, tuple))):
        assert len(names) == x.ndim
    with pytest.raises(KeyError, match="no entry"):
        param_logical_axes({"new_module": {"kernel": jnp.zeros((2, 2))}})


def test_rule_table_layouts():
    v3 = param_shapes(dsjax.ModelConfig.preset("deepseek-v3-671b"))
    specs = param_specs(v3, _abstract(fsdp=4, expert=64))
    moe = specs["moe_layers"]
    assert moe["mlp"]["experts_gate_up_proj"] == P(None, "expert", "fsdp", None)
    assert moe["mlp"]["experts_down_proj"] == P(None, "expert", None, "fsdp")
    assert moe["self_attn"]["o_proj"]["kernel"] == P(None, None, ("fsdp", "expert"))
    assert moe["self_attn"]["q_b_proj"]["kernel"] == P(None, ("fsdp", "expert"), None)  # no embed axis: q_lora
    assert moe["input_layernorm"]["weight"] == P(None, None)
    assert specs["lm_head"] == P(("fsdp", "expert"), None)
    # tensor splits heads and widths; a dimension the axis does not divide (vocab 259 here) stays whole
    tiny = param_shapes(dsjax.ModelConfig.preset("tiny", vocab_size=259))
    specs = param_specs(tiny, _abstract(fsdp=2, expert=2, tensor=2))
    assert specs["moe_layers"]["self_attn"]["kv_b_proj"]["kernel"] == P(None, ("fsdp", "expert"), "tensor")
    assert specs["dense_layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", ("fsdp", "expert"))
    assert specs["moe_layers"]["mlp"]["experts_gate_up_proj"] == P(None, "expert", "fsdp", "tensor")
    assert specs["lm_head"] == P(("fsdp", "expert"), None)
    # optimizer moments follow their parameter; step counts are replicated
    from dsjax.train.optim import OptimConfig, make_optimizer

    opt = jax.eval_shape(make_optimizer(OptimConfig()).init, tiny)
    ospecs = like_params_specs(opt, tiny, specs)
    adam = ospecs[1].inner_states["decay"].inner_state[0]
    assert adam.mu["moe_layers"]["mlp"]["experts_gate_up_proj"] == P(None, "expert", "fsdp", "tensor")
    assert adam.nu["lm_head"] == specs["lm_head"] and adam.count == P()


@pytest.mark.parametrize(
    "e,k,groups,topk_groups,ep,limit",
    [(16, 4, 1, 1, 4, 1), (16, 4, 1, 1, 4, 2), (16, 6, 1, 1, 8, 3), (32, 8, 8, 4, 8, 3), (32, 8, 4, 2, 8, 3)],
)
def test_device_limited_routing_reaches_at_most_m_devices(e, k, groups, topk_groups, ep, limit):
    cfg = dsjax.ModelConfig.preset(
        "tiny",
        n_routed_experts=e,
        num_experts_per_tok=k,
        n_group=groups,
        topk_group=topk_groups,
        moe_device_limit=limit,
    )
    rng = np.random.RandomState(e + k + ep)
    logits = jnp.asarray(rng.randn(512, e), jnp.float32)
    bias = jnp.asarray(0.3 * rng.randn(e), jnp.float32)
    limited = route(logits, bias, cfg, device_groups=ep)
    devices = np.asarray(limited.indices) // (e // ep)
    spans = [len(set(row)) for row in devices.tolist()]
    assert max(spans) <= limit
    free = route(logits, bias, cfg)  # one device: no limit
    assert max(len(set(r)) for r in (np.asarray(free.indices) // (e // ep)).tolist()) > limit  # it had to bite
    unlimited = route(logits, bias, cfg.replace(moe_device_limit=ep), device_groups=ep)
    np.testing.assert_array_equal(unlimited.indices, free.indices)
    with pytest.raises(ValueError, match="cannot hold"):  # one expert per device, k - 1 devices
        route(logits, bias, cfg.replace(moe_device_limit=k - 1), device_groups=e)


def test_memory_plan_splits_state_by_the_rule_table():
    from experiments.memory_plan import plan, plan_decode, report

    cfg = dsjax.ModelConfig.preset("tiny", num_nextn_predict_layers=0)
    sizes = {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    rows = plan(cfg, sizes, batch_size=16, seq_len=32, use_mtp=False)
    total, local = rows["  routed experts"]
    assert local == total // 8  # experts over expert x fsdp, nothing replicated
    total, local = rows["parameters"]
    assert total / 8 <= local <= total / 8 * 1.1  # only norms and router biases are whole everywhere
    assert 0.99 * 2 * local <= rows["AdamW moments"][1] <= 2 * local  # router biases have no moments
    total, local = rows["activations saved (remat none)"]
    assert total / 8 <= local < total / 4
    worst, balanced = rows["MoE buffers, one layer (worst)"][1], rows["MoE buffers, one layer (balanced)"][1]
    assert worst > balanced
    # FSDP transients: a gathered layer is split over `expert` only (routed experts), whole otherwise
    params = param_shapes(cfg)["moe_layers"]
    layer_bytes = lambda itemsize: sum(  # noqa: E731
        x.size // x.shape[0] // (4 if "experts_" in jax.tree_util.keystr(p) else 1) * itemsize
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    )
    assert rows["two moe layers' weights gathered (float32)"][1] == 2 * layer_bytes(4)
    assert rows["one moe layer's gradient before reduce-scatter (float32)"][1] == layer_bytes(4)
    decode = plan_decode(cfg.replace(dtype="bfloat16"), sizes, batch=16, context=64)
    cache_total, cache_local = decode["latent cache (16 x 64 positions)"]
    assert cache_total == cfg.num_hidden_layers * 16 * 64 * cfg.cache_width * 2 and cache_local == cache_total // 8
    assert decode["total"][1] == sum(v[1] for k, v in decode.items() if k != "total")
    text = report(
        "deepseek-v3-671b",
        dsjax.ModelConfig.preset("deepseek-v3-671b", dtype="bfloat16", remat="full"),
        {"data": 1, "fsdp": 4, "expert": 64, "tensor": 1},
        256,
        4096,
        True,
    )
    assert "256 devices" in text and "routed experts" in text


# ---------------------------------------------------------------- 8 fake devices: model, trainer, checkpoints
EXPERT_SPECS = {
    "data:8": "P(None, None, None, None)",
    "fsdp:8": "P(None, None, 'fsdp', None)",
    "data:2,expert:4": "P(None, 'expert', None, None)",
    "fsdp:2,expert:2,tensor:2": "P(None, 'expert', 'fsdp', 'tensor')",
}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_matches_single_device(jobs, mesh):
    """Logits, gradients and one trainer step on the mesh equal the single-device run (float32). In FP8 (every
    linear layer per device through fp8.on_local_tokens, the kernels' XLA reference) the loss matches and the
    gradients differ from one device's by FP8 rounding only (weight gradients contract each device's own
    128-token tiles), no further from float32's than one device's are."""
    r = jobs["model"].result()["meshes"][mesh]
    print(mesh, r)
    fp8 = r["fp8"]
    # a tensor axis splits the routed experts' intermediate width: the down projection quantizes each device's
    # slice of its contraction (finer tiles), FP8 rounding that reaches the loss; otherwise every tile is whole
    assert fp8["loss"] <= (1e-3 if "tensor" in mesh else 1e-5) and fp8["one_vs_f32"] > 1e-2
    assert fp8["mesh_vs_one"] < fp8["one_vs_f32"] and fp8["mesh_vs_f32"] < 1.1 * fp8["one_vs_f32"]
    assert r["logits"] <= 1e-5 and r["loss"] <= 1e-5
    assert r["grads"] <= 1e-5 and r["grad_scale"] > 1e-2
    assert r["step_loss"] <= 1e-5 and r["grad_norm"] <= 1e-5
    assert r["counts_equal"]
    assert r["expert_spec"] == EXPERT_SPECS[mesh]  # the state really is laid out by the rule table
    assert r["all_to_all"] == ("expert" in mesh)  # expert parallelism only with an expert axis


def test_router_bias_update_uses_global_counts(jobs):
    r = jobs["model"].result()
    assert r["local_signs_differ"]  # per-device loads alone would move the bias differently
    assert r["bias_moved"] > 0
    for mesh in MESHES:
        assert r["meshes"][mesh]["bias"] <= 1e-7


def test_checkpoint_restores_under_another_mesh(jobs):
    r = jobs["model"].result()
    assert r["restore"]["values"] == 0.0 and r["restore"]["layout_is_new_mesh"]
    assert r["restore"]["next_step_loss"] <= 1e-5
    from dsjax.train.checkpoint_io import load_for_inference

    cfg, params = load_for_inference(r["ckpt"])  # and on this process's single device
    assert cfg.num_hidden_layers == 2
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), np.load(os.path.join(r["ckpt"], "lm_head.npy")))


def test_expert_parallel_drops_no_token_under_adversarial_routing(jobs):
    r = jobs["moe"].result()
    assert r["adversarial_all_on_device0"]  # one device receives every pair of every source
    for mesh in ("data:2,expert:4", "expert:8"):
        assert r[f"adversarial {mesh}"] <= 1e-5
        assert r[f"counts {mesh}"] == [128, 128, 0, 0, 0, 0, 0, 0]


def test_capacity_factor_drops_only_the_overflow(jobs):
    r = jobs["moe"].result()["capacity"]
    assert r["dropped"] > 0 and r["err"] <= 1e-5


def test_device_limited_routing_on_a_mesh(jobs):
    r = jobs["moe"].result()
    for m in (1, 2):
        assert r[f"limit {m}"]["max_devices"] <= m and r[f"limit {m}"]["changed_routing"]
        assert r[f"limit {m}"]["err"] <= 1e-5


def test_padded_all_to_all_has_ragged_semantics(jobs):
    assert jobs["moe"].result()["padded_a2a"] == 0.0


def test_fp8_experts_on_a_mesh_match_one_device(jobs):
    """ModelConfig.fp8 with expert parallelism (data:2,expert:4): the MoE layer's loss and gradients match one
    device's FP8 path far closer than FP8 differs from float32 (so FP8 really ran, and ran the same on both)."""
    r = jobs["moe"].result()["fp8"]
    print(r)
    assert r["loss"] < 1e-4
    assert len(r["grads"]) == 6  # the router's kernel, both routed expert weights, the shared expert's three
    for name, (mesh_vs_one, one_vs_f32, mesh_vs_f32) in r["grads"].items():
        assert one_vs_f32 > 1e-2, name  # e4m3 operands: percent-level from float32, so FP8 really ran
        if "shared" in name:  # per device (fp8.on_local_tokens): its own tokens' 128-row tiles, gradients summed
            assert mesh_vs_one < one_vs_f32 and mesh_vs_f32 < 1.1 * one_vs_f32, name
        elif "experts_" in name:  # the same products over other 128-row scaling tiles
            assert mesh_vs_one < 0.6 * one_vs_f32 and mesh_vs_f32 < 1.1 * one_vs_f32, name
        else:
            assert mesh_vs_one < 1e-4, name


@pytest.mark.slow
def test_two_processes_train_on_one_global_mesh(jobs):
    r = jobs["multihost"].result()
    assert r["rc"] == [0, 0], "\n\n".join(o[-3000:] for o in r["out"])
    losses = [json.loads(next(line for line in o.splitlines() if line.startswith("LOSSES "))[7:]) for o in r["out"]]
    assert losses[0] == losses[1] and sorted(losses[0]) == ["1", "2", "3"]
    assert all(np.isfinite(v) for v in losses[0].values())
    assert os.path.exists(os.path.join(r["workdir"], "checkpoints", "3", "commit_success.txt"))
    # each host's data-iterator position reaches the checkpoint (Orbax writes JSON from process 0 only)
    for o in r["out"]:
        assert '"per_process": [{"p": 0}, {"p": 1}]' in o, o[-3000:]
        assert "resumed from" in o
    resumed = [json.loads(next(line for line in o.splitlines() if line.startswith("RESUMED "))[8:]) for o in r["out"]]
    assert resumed[0] == resumed[1] and sorted(resumed[0]) == ["4"] and np.isfinite(resumed[0]["4"])
    with open(os.path.join(r["workdir"], "checkpoints", "4", "data", "metadata")) as f:
        assert len(json.load(f)["per_process"]) == 2


@pytest.mark.slow
def test_grpo_trains_on_a_mesh_like_on_one_device(jobs):
    """experiments/grpo.py's trainer on data:2,expert:4 (sharded state, split batches, expert-parallel updates)
    follows the single-device run: same warm start, same rollouts' rewards, same losses to float tolerance."""
    r = jobs["grpo"].result()
    one, mesh = r["single"], r["mesh"]
    assert one["steps"] == mesh["steps"] == 2
    assert mesh["pass_before"] == pytest.approx(one["pass_before"])
    assert mesh["reward/mean"] == pytest.approx(one["reward/mean"], abs=1e-6)
    np.testing.assert_allclose(mesh["loss"], one["loss"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(mesh["kl"], one["kl"], rtol=1e-3, atol=1e-6)
    assert max(mesh["logprob_gap"]) < 1e-4
