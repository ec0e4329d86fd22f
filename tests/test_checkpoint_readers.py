"""A checkpoint's readers verify what they read: load_for_inference and the streamed HF export catch bit rot and
silent one-element changes, refuse a bad config file in one line, and the converter refuses an --out that overlaps
its input. One tiny model's step, saved once for the module, copied per test."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.errors import CheckpointError, ConfigError
from dsjax.train.checkpoint import Checkpointer
from dsjax.train.checkpoint_io import load_for_inference, model_config_dict
from tests.ckpt_damage import one_line, scribble, set_element
from tests.conftest import param_shapes, randomize_params

RNG = np.zeros(2, np.uint32)


@pytest.fixture(scope="module")
def tiny_step(tmp_path_factory):
    import dsjax

    cfg = dsjax.ModelConfig.preset("tiny")
    params = randomize_params(param_shapes(cfg), seed=3, std=0.1)
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    ck = Checkpointer(workdir, async_save=False)
    ck.save(4, params, {"unused": np.zeros((), np.int32)}, RNG, {}, {"model": model_config_dict(cfg)})
    ck.close()
    return cfg, params, workdir


def _copy_run(tiny_step, tmp_path):
    import shutil

    dst = str(tmp_path / "run")
    shutil.copytree(tiny_step[2], dst)
    return dst, os.path.join(dst, "checkpoints", "4")


def test_load_for_inference_verifies_params(tiny_step, tmp_path):
    cfg, params, workdir = tiny_step
    got_cfg, got = load_for_inference(workdir, param_dtype="bfloat16")  # verified on the stored float32 bits
    assert got_cfg.num_hidden_layers == cfg.num_hidden_layers
    assert jax.tree.leaves(got)[0].dtype == jnp.bfloat16

    run, step = _copy_run(tiny_step, tmp_path)
    scribble(step)
    with pytest.raises(
        CheckpointError, match=r"^checkpoint step 4 \(.*/checkpoints/4\) is corrupt: (cannot read params|params/)"
    ) as e:
        load_for_inference(run)
    one_line(e)

    run2, step2 = _copy_run(tiny_step, tmp_path / "b")
    set_element(os.path.join(step2, "params"), "embed_tokens.embedding", (0, 0), np.float32(3.0))
    with pytest.raises(CheckpointError) as e:
        load_for_inference(run2)
    assert one_line(e) == (
        f"checkpoint step 4 ({step2}) is corrupt: params/embed_tokens/embedding does not match its checksum"
    )


@pytest.mark.parametrize("damage", ["empty", "missing"])
def test_load_for_inference_bad_config(tiny_step, tmp_path, damage):
    run, step = _copy_run(tiny_step, tmp_path)
    path = os.path.join(step, "config", "metadata")
    open(path, "w").close() if damage == "empty" else os.remove(path)
    with pytest.raises(CheckpointError, match=r"checkpoint .*/4: cannot read config/metadata") as e:
        load_for_inference(run)
    one_line(e)


def test_hf_export_verifies_each_leaf(tiny_step, tmp_path):
    from dsjax.convert import stream

    run, step = _copy_run(tiny_step, tmp_path)
    leaf = "moe_layers/mlp/experts_down_proj"  # stacked (layer, expert, ...): streamed one expert at a time
    last = tuple(d - 1 for d in np.shape(tiny_step[1]["moe_layers"]["mlp"]["experts_down_proj"])[:2])
    set_element(os.path.join(step, "params"), leaf.replace("/", "."), last + (0, 0), np.float32(-1.0))
    out = str(tmp_path / "hf")
    with pytest.raises(CheckpointError) as e:
        stream.orbax_to_hf(run, out, dtype="float32", every=60, workers=2)
    assert one_line(e) == f"checkpoint {step} is corrupt: params/{leaf} does not match its checksum"
    assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if f.startswith(".hf")]


def test_convert_refuses_out_overlapping_its_input(tmp_path):
    from dsjax.convert import stream

    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    for out, how in [(src, "is"), (src / "sub", "lies inside"), (tmp_path, "contains")]:
        with pytest.raises(ConfigError, match=rf"--out=.* {how} the input --hf_dir="):
            stream.hf_to_orbax(str(src), str(out), overwrite=True)
        with pytest.raises(ConfigError, match=rf"--out=.* {how} the input --checkpoint="):
            stream.orbax_to_hf(str(src), str(out), overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(src)
    with pytest.raises(ConfigError, match="is the input"):
        stream.orbax_to_hf(str(src), str(link), overwrite=True)
    assert sorted(os.listdir(src)) == ["config.json"] and (src / "config.json").read_text() == "{}"
