"""Weight conversion at DeepSeek-V3 scale: FP8 block math, streaming HF <-> Orbax, bad input, memory.

Acceptance map (issue 9):
  FP8 tiny model (576-row tensor) within e4m3 bounds, logits close   test_fp8_checkpoint_converts_within_bounds
  sharded input with an index; HF -> Orbax -> HF byte-identical bf16  test_bf16_roundtrip_is_byte_identical
  FP8 export round-trips                                              test_fp8_export_roundtrips, test_fp8_block_math
  transformers loads the exported directory                          test_bf16_roundtrip_is_byte_identical (verify)
  restores straight onto a mesh; the CLI                             test_cli_mesh_layout_and_sharded_restore
  trainer checkpoints go back to HF                                  test_trainer_checkpoint_to_hf
  bad input: clear error naming file + tensor, no half-written output test_bad_input
  pickles refused unless allowed, then weights_only                   test_pickle_policy
  peak RSS bounded on a ~2 GB multi-shard checkpoint                  test_memory_bounded_on_2gb_checkpoint
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsjax
from dsjax.convert import fp8, stream
from dsjax.convert import safetensors_io as st
from dsjax.convert.orbax_io import ParamsReader
from dsjax.convert.source import CheckpointError, HFSource
from dsjax.train.checkpoint_io import load_for_inference
from tests.conftest import param_shapes, randomize_params, tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = np.dtype(ml_dtypes.bfloat16)
SHARD = 600_000  # bytes: the tiny checkpoints below come out as 3-5 shards with an index


def _cfg():
    # kv_lora_rank 512 + rope 64 = 576 rows in kv_a_proj_with_mqa (scale [5, 2]: ragged rows and columns)
    return dsjax.ModelConfig.preset(
        "tiny",
        hidden_size=160,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=16,
        v_head_dim=16,
        num_attention_heads=2,
        q_lora_rank=96,
        intermediate_size=192,
        moe_intermediate_size=48,
    )


def _flat(params) -> dict[str, np.ndarray]:
    return {"/".join(str(k.key) for k in p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random bf16 model, its sharded bf16 and FP8 HF directories, and the FP8 one converted to Orbax."""
    cfg = _cfg()
    params = randomize_params(param_shapes(cfg), seed=4, std=0.02)
    # bf16-exact values (rounded in NumPy: a jnp cast per leaf shape would compile ~50 tiny programs)
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(BF16).astype(np.float32)), params)
    # Pin the routing (experts 0 and 4 always win through the correction bias): a random MoE's top-k would flip
    # under any weight perturbation, and the logit gap should measure the FP8 weights, not those jumps.
    bias = np.zeros(cfg.n_routed_experts, np.float32)
    bias[[0, 4]] = 5.0
    for seg in ("moe_layers", "mtp_0"):
        gate = params[seg]["mlp"]["gate"] if seg == "moe_layers" else params[seg]["block"]["mlp"]["gate"]
        gate["e_score_correction_bias"] = jnp.broadcast_to(bias, gate["e_score_correction_bias"].shape)
    root = tmp_path_factory.mktemp("convert")
    bf16_dir, fp8_dir = str(root / "hf_bf16"), str(root / "hf_fp8")
    dsjax.save_hf(bf16_dir, cfg, params, dtype=jnp.bfloat16, max_shard_bytes=SHARD)
    dsjax.save_hf(fp8_dir, cfg, params, dtype=jnp.bfloat16, max_shard_bytes=SHARD, fp8=True)
    orbax_fp8 = str(root / "orbax_fp8")
    stream.hf_to_orbax(fp8_dir, orbax_fp8, every=60)
    return dict(cfg=cfg, params=params, root=root, bf16=bf16_dir, fp8=fp8_dir, orbax_fp8=orbax_fp8)


_APPLY: dict = {}


def _logits(cfg, params, tok):
    cfg = cfg.replace(dtype="float32", param_dtype="float32")
    if cfg not in _APPLY:
        _APPLY[cfg] = jax.jit(lambda p, t: dsjax.DeepSeekV3(cfg).apply({"params": p}, t).logits)
    return np.asarray(_APPLY[cfg](jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), tok))


# ------------------------------------------------------------------------------------------------ FP8 math
def test_fp8_block_math():
    rng = np.random.RandomState(0)
    w = (rng.standard_normal((576, 200)) * 0.05).astype(BF16)
    w[130:140, 128:] = 0  # an all-zero corner inside a block
    q, s = fp8.quantize(w)
    assert q.dtype == fp8.E4M3 and s.dtype == np.float32 and s.shape == (5, 2)
    per = np.kron(s, np.ones((128, 128), np.float32))[:576, :200]  # the format, written out naively
    ref = (q.astype(np.float32) * per).astype(BF16)
    deq = fp8.dequantize(q, s, BF16)
    np.testing.assert_array_equal(deq.view(np.uint16), ref.view(np.uint16))  # bit-identical to the definition
    err = np.abs(deq.astype(np.float32) - w.astype(np.float32))
    assert (err <= fp8.error_bound(w, s) + np.abs(w.astype(np.float32)) * 2.0**-8).all()
    blocks = np.abs(q.astype(np.float32))
    assert blocks[:128, :128].max() == 448 and blocks[512:, 128:].max() == 448  # ragged edge blocks use the range
    # idempotent: re-quantizing the dequantized weights gives the same codes and scales
    q2, s2 = fp8.quantize(deq)
    np.testing.assert_array_equal(q2.view(np.uint8), q.view(np.uint8))
    np.testing.assert_array_equal(s2, s)
    # released scales are arbitrary float32: codes still come back exactly, scales within a bf16 rounding
    s3 = s * rng.uniform(0.9, 1.1, s.shape).astype(np.float32)
    q3, s4 = fp8.quantize(fp8.dequantize(q, s3, BF16))
    np.testing.assert_array_equal(q3.view(np.uint8), q.view(np.uint8))
    assert np.abs(s4 / s3 - 1).max() <= 2.0**-8
    # the fast float32 -> e4m3 rounding equals ml_dtypes' on every e4m3 value, every midpoint and its neighbours
    v = np.unique(np.abs(np.arange(256, dtype=np.uint8).view(fp8.E4M3).astype(np.float32)))
    v = v[np.isfinite(v)]
    mid = (v[1:] + v[:-1]) / 2
    x = np.concatenate([v, mid, np.nextafter(mid, np.float32(1e9)), np.nextafter(mid, np.float32(0))])
    x = np.concatenate([x, -x])
    np.testing.assert_array_equal(fp8.e4m3_codes(x), x.astype(fp8.E4M3).view(np.uint8))
    with pytest.raises(ValueError, match="scale_inv has shape"):
        fp8.dequantize(q, s[:4])
    w[3, 3] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        fp8.quantize(w)


def test_fp8_checkpoint_converts_within_bounds(model):
    cfg, params = model["cfg"], model["params"]
    with HFSource(model["fp8"]) as f:
        kv = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
        assert f.dtype(kv) == fp8.E4M3 and f.shape(kv) == (576, 160) and f.shape(kv + "_scale_inv") == (5, 2)
    got_cfg, restored = load_for_inference(model["orbax_fp8"])
    assert got_cfg.num_nextn_predict_layers == 1  # the MTP layer came through
    want, got = _flat(params), _flat(restored)
    quantized = 0
    for path, w in want.items():
        g = got[path].astype(np.float32)
        if np.array_equal(g, w):
            continue
        quantized += 1  # an FP8 tensor: every element inside the e4m3 bound (+ the bf16 rounding of the output)
        assert "kernel" in path or "experts" in path, path
        bound = np.abs(w) * (2.0**-4 + 2.0**-8) + np.abs(w).max() / 448 * 2.0**-10 * 2
        assert (np.abs(g - w) <= bound).all(), path
    assert quantized >= 14
    tok = tokens(2, 24, cfg.vocab_size, seed=5)
    a, b = _logits(cfg, params, tok), _logits(cfg, restored, tok)
    gap, scale = np.abs(a - b).max(), np.abs(a).max()
    print(f"FP8 vs bf16 original: max |dlogit| {gap:.3e} (logit scale {scale:.2f})")
    assert gap <= 0.1 * scale and np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.995


def test_bf16_roundtrip_is_byte_identical(model, tmp_path):
    src = model["bf16"]
    assert os.path.exists(os.path.join(src, st.INDEX)) and len(os.listdir(src)) >= 5
    ob, back = str(tmp_path / "orbax"), str(tmp_path / "back")
    stream.hf_to_orbax(src, ob, every=60)
    stream.orbax_to_hf(ob, back, max_shard_bytes=SHARD, every=60)
    files = sorted(os.listdir(src))
    assert files == sorted(os.listdir(back))
    match, mismatch, errors = filecmp.cmpfiles(src, back, files, shallow=False)
    assert not mismatch and not errors, mismatch
    # transformers loads the export (from_pretrained) and agrees with dsjax on the Orbax side
    from dsjax.convert.verify import verify

    r = verify(back, ob)
    assert r["max_abs_gap"] <= 1e-4, r


def test_fp8_export_roundtrips(model, tmp_path):
    out = str(tmp_path / "fp8_back")
    stream.orbax_to_hf(model["orbax_fp8"], out, fp8=True, max_shard_bytes=SHARD, every=60)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
    files = sorted(os.listdir(model["fp8"]))
    assert files == sorted(os.listdir(out))
    _, mismatch, errors = filecmp.cmpfiles(model["fp8"], out, files, shallow=False)
    assert not mismatch and not errors, mismatch  # FP8 -> bf16 Orbax -> FP8: the same bytes
    mtp = f"model.layers.{model['cfg'].num_hidden_layers}."
    with HFSource(out) as f:  # the MTP layer: its block in FP8, its own projections and head copies in bf16
        assert f.dtype(mtp + "mlp.experts.0.up_proj.weight") == fp8.E4M3
        assert f.dtype(mtp + "self_attn.kv_a_proj_with_mqa.weight_scale_inv") == np.float32
        assert f.dtype(mtp + "eh_proj.weight") == BF16 and f.dtype(mtp + "shared_head.head.weight") == BF16


def test_cli_mesh_layout_and_sharded_restore(model, tmp_path):
    out = str(tmp_path / "meshed")
    script = f"""
import json, runpy, sys
import jax, numpy as np
sys.argv = ["convert.py", "--to=orbax", "--hf_dir={model["fp8"]}", "--out={out}", "--mesh=expert:4,tensor:2",
            "--progress_every=60"]
try:
    runpy.run_path("{ROOT}/experiments/convert.py", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
from dsjax.convert.orbax_io import ParamsReader
from dsjax.train.checkpoint_io import load_for_inference
from sharding.mesh import make_mesh
r = ParamsReader("{out}/params")
chunks = {{p: list(r.array(p).chunk_layout.read_chunk.shape) for p in r.paths}}
mesh = make_mesh("expert:4,tensor:2")
_, sharded = load_for_inference("{out}", mesh=mesh)
_, single = load_for_inference("{model["orbax_fp8"]}")
leaf = sharded["moe_layers"]["mlp"]["experts_gate_up_proj"]
pairs = zip(jax.tree.leaves(sharded), jax.tree.leaves(single))
same = all(bool((np.asarray(a) == np.asarray(b)).all()) for a, b in pairs)
print("RESULT " + json.dumps({{"chunks": chunks, "spec": list(leaf.sharding.spec), "same": same,
                              "shards": len(leaf.addressable_shards)}}))
"""
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")}
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "GB/s" in p.stdout  # the CLI's summary line
    r = json.loads([line for line in p.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    cfg = model["cfg"]
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    assert r["chunks"]["moe_layers/mlp/experts_gate_up_proj"] == [1, 1, d, 2 * i // 2]  # one expert, half of mlp
    assert r["chunks"]["embed_tokens/embedding"] == [cfg.vocab_size // 2, d // 4]  # vocab/tensor, embed/expert
    assert r["spec"] == [None, "expert", None, "tensor"] and r["shards"] == 8 and r["same"]


def test_trainer_checkpoint_to_hf(tmp_path):
    from dsjax.train.checkpoint import Checkpointer
    from dsjax.train.checkpoint_io import model_config_dict

    cfg = dsjax.ModelConfig.preset("tiny")
    params = randomize_params(param_shapes(cfg), seed=2, std=0.1)
    ck = Checkpointer(str(tmp_path / "run"), async_save=False)
    ck.save(7, params, {"mu": params}, jax.random.key_data(jax.random.key(0)), {}, {"model": model_config_dict(cfg)})
    ck.close()
    out = str(tmp_path / "hf")
    stream.orbax_to_hf(str(tmp_path / "run"), out, dtype="float32", every=60)
    cfg2, loaded = dsjax.load_hf(out)
    assert cfg2 == cfg
    want, got = _flat(params), _flat(loaded)
    for path, w in want.items():
        np.testing.assert_array_equal(got[path], w, err_msg=path)


# ------------------------------------------------------------------------------------------------ bad input
def _edit(src: str, dst: str, fn) -> str:
    """Copy an index-sharded HF dir, letting fn(files: {file: {name: array}}) change its tensors."""
    shutil.copytree(src, dst)
    files = {}
    for fname in sorted(x for x in os.listdir(dst) if x.endswith(".safetensors")):
        with st.SafetensorsFile(os.path.join(dst, fname)) as f:
            files[fname] = {k: np.array(f.get(k)) for k in f.keys()}
    fn(files)
    for fname, tensors in files.items():
        st.write(os.path.join(dst, fname), list(tensors.items()))
    with open(os.path.join(dst, st.INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: fn_ for fn_, t in files.items() for k in t}}, f)
    return dst


def _file_of(files, name):
    return next(f for f, t in files.items() if name in t)


KV = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
UP = "model.layers.2.mlp.experts.3.up_proj.weight"


def _missing_shard(d):
    os.remove(os.path.join(d, "model-00002-of-00004.safetensors"))


def _truncate(d):
    path = os.path.join(d, "model-00003-of-00004.safetensors")
    os.truncate(path, os.path.getsize(path) - 1000)


def _config(d):
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    c["moe_intermediate_size"] = 40
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f)


BAD = {
    "missing_shard": (
        None,
        _missing_shard,
        FileNotFoundError,
        r"model-00002-of-00004\.safetensors: shard listed in .* is missing \(it holds tensor 'model\.",
    ),
    "truncated": (None, _truncate, ValueError, r"model-00003-of-00004\.safetensors: tensor '.*' ends at .*truncated"),
    "missing_scale": (
        lambda t: t[_file_of(t, KV + "_scale_inv")].pop(KV + "_scale_inv"),
        None,
        KeyError,
        r"model-0000\d-of-00004\.safetensors: FP8 tensor '" + KV.replace(".", r"\.") + "' has no block",
    ),
    "wrong_shape": (
        lambda t: t[_file_of(t, UP)].update({UP: t[_file_of(t, UP)][UP][:, :-1]}),
        None,
        ValueError,
        r"safetensors: tensor '" + UP.replace(".", r"\.") + r"' has shape \(48, 159\), but the config "
        r"needs \(48, 160\)",
    ),
    "unknown_name": (
        lambda t: t[_file_of(t, UP)].update({"model.layers.0.self_attn.bogus.weight": np.zeros(3, BF16)}),
        None,
        ValueError,
        r"unexpected tensors for this config: \['model\.layers\.0\.self_attn\.bogus"
        r"\.weight'\] \(first in .*model-0000\d-of-00004\.safetensors",
    ),
    "config_mismatch": (
        None,
        _config,
        ValueError,
        r"safetensors: tensor 'model\.layers\.1\.mlp\.experts\.0\.gate_proj"
        r"\.weight' has shape \(48, 160\), but the config needs \(40, 160\) \(does config\.json",
    ),
}


@pytest.mark.parametrize("case", list(BAD) + ["fails_while_writing"])
def test_bad_input(model, tmp_path, case, monkeypatch):
    src = str(tmp_path / "src")
    if case == "fails_while_writing":  # a read error half-way through the stream: the temp dir goes, nothing stays
        shutil.copytree(model["fp8"], src)
        calls = []

        def flaky(source, unit, dtype, _real=stream.hf.read_unit):
            calls.append(1)
            if len(calls) == 40:
                raise OSError(f"{source.file_of(unit.names[0])}: I/O error reading {unit.names[0]!r}")
            return _real(source, unit, dtype)

        monkeypatch.setattr(stream.hf, "read_unit", flaky)
        err, pattern = OSError, r"safetensors: I/O error reading 'model\."
    else:
        edit_tensors, edit_dir, err, pattern = BAD[case]
        _edit(model["fp8"], src, edit_tensors) if edit_tensors else shutil.copytree(model["fp8"], src)
        if edit_dir:
            edit_dir(src)
    out = tmp_path / "out"
    with pytest.raises(err, match=pattern):
        stream.hf_to_orbax(src, str(out), every=60)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no temporary directory left behind


def test_pickle_policy(model, tmp_path):
    import torch

    src = str(tmp_path / "pt")
    os.makedirs(src)
    shutil.copy(os.path.join(model["bf16"], "config.json"), src)
    sd = {}
    for fname in sorted(x for x in os.listdir(model["bf16"]) if x.endswith(".safetensors")):
        with st.SafetensorsFile(os.path.join(model["bf16"], fname)) as f:
            for k in f.keys():
                a = np.array(f.get(k))
                sd[k] = (
                    torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == BF16 else torch.from_numpy(a)
                )
    torch.save(sd, os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickled PyTorch checkpoints .* --allow_pickle"):
        stream.hf_to_orbax(src, str(tmp_path / "refused"), every=60)
    stream.hf_to_orbax(src, str(tmp_path / "ok"), allow_pickle=True, every=60)
    stream.hf_to_orbax(model["bf16"], str(tmp_path / "safe"), every=60)
    a, b = ParamsReader(str(tmp_path / "ok" / "params")), ParamsReader(str(tmp_path / "safe" / "params"))
    assert a.paths == b.paths
    assert all(np.array_equal(a.read(p).view(np.uint8), b.read(p).view(np.uint8)) for p in b.paths)
    # an object that only full unpickling could rebuild: weights_only refuses it
    torch.save({**sd, "evil": Exception("not a tensor")}, os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        stream.hf_to_orbax(src, str(tmp_path / "evil"), allow_pickle=True, every=60)


# ------------------------------------------------------------------------------------------------ memory
RSS_BOUND_MB = 1024  # whole child process: Python + jax + TensorStore (~180 MB) + the conversion (~500 MB)


@pytest.mark.slow
def test_memory_bounded_on_2gb_checkpoint(tmp_path):
    """HF (2.2 GB, 5 shards + index) -> Orbax in a fresh process: peak RSS (VmHWM) stays under RSS_BOUND_MB, well
    under the checkpoint's size. What it holds: `workers` (4) units in flight, the largest here the 64 MB embedding /
    lm_head, plus TensorStore's 256 MB write-behind, plus reads, transposes and FP8 scratch of one unit each."""
    from experiments.bench_convert import make_synthetic, measure

    src = str(tmp_path / "hf")
    size = make_synthetic(src, max_shard_bytes=512 << 20)
    assert size > 2e9 and os.path.exists(os.path.join(src, st.INDEX))
    r = measure("orbax", src, str(tmp_path / "orbax"))
    print(
        f"HF -> Orbax: {size / 1e9:.2f} GB, {r['gb_per_s']:.3f} GB/s, peak RSS {r['peak_rss_mb']:.0f} MB "
        f"(after imports {r['import_rss_mb']:.0f} MB)"
    )
    assert r["peak_rss_mb"] < RSS_BOUND_MB
    assert (r["peak_rss_mb"] - r["import_rss_mb"]) * 2**20 < 0.4 * size
