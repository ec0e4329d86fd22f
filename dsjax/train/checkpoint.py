"""Orbax checkpoints for training: async, keep-N, atomic (a step directory appears only once committed).

Layout: <workdir>/checkpoints/<step>/{params, opt_state, meta, data, config}.
  params     the model parameters (router biases included)
  opt_state  the optimizer state
  meta       {"step", "rng"} (JSON)
  data       the data iterator's state (JSON), so a resumed run reads exactly the batches it would have
  config     {"model": ModelConfig.to_hf() + runtime knobs, "experiment": the run's config} (JSON)
Inference reads only params + config (`load_for_inference`), never the optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsjax.config import RUNTIME_FIELDS, ModelConfig
from dsjax.runtime import AUTO_FIELDS

CKPT_DIR = "checkpoints"


def model_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {**cfg.to_hf(), "dsjax_runtime": {k: getattr(cfg, k) for k in RUNTIME_FIELDS}}


def model_config_from_dict(d: dict[str, Any], **runtime) -> ModelConfig:
    d = dict(d)
    rt = {**d.pop("dsjax_runtime", {}), **runtime}
    return ModelConfig.from_hf(d, **rt)


def config_mismatch(old: ModelConfig, new: ModelConfig) -> list[str]:
    """Architecture fields that differ (runtime knobs such as dtype or remat may change across a resume)."""
    return [
        f"{f.name}: checkpoint {getattr(old, f.name)!r} vs now {getattr(new, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in RUNTIME_FIELDS and getattr(old, f.name) != getattr(new, f.name)
    ]


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, CKPT_DIR))
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, params, opt_state, rng, data_state: dict, config: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({"step": int(step), "rng": np.asarray(rng).tolist()}),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        return self._mngr.save(step, args=args, force=force)

    def read_config(self, step: int) -> dict:
        return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore(self, step: int, params_like, opt_state_like):
        """Restore into the structure (and shardings) of the given abstract or concrete trees."""
        abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)  # noqa: E731
        r = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract(params_like)),
                opt_state=ocp.args.StandardRestore(abstract(opt_state_like)),
                meta=ocp.args.JsonRestore(),
                data=ocp.args.JsonRestore(),
            ),
        )
        return r["params"], r["opt_state"], r["meta"], r["data"]

    def wait(self):
        self._mngr.wait_until_finished()

    def close(self):
        self._mngr.wait_until_finished()
        self._mngr.close()


def step_dir(path: str) -> str:
    """A workdir (-> its latest committed step), a checkpoints/ dir, or one step's directory."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "params")):
        return path
    root = os.path.join(path, CKPT_DIR) if os.path.isdir(os.path.join(path, CKPT_DIR)) else path
    steps = (
        sorted(
            int(d)
            for d in os.listdir(root)
            if d.isdigit() and os.path.exists(os.path.join(root, d, "commit_success.txt"))
        )
        if os.path.isdir(root)
        else []
    )
    if not steps:
        raise FileNotFoundError(f"{path}: no committed checkpoint (expected <workdir>/{CKPT_DIR}/<step>/params)")
    return os.path.join(root, str(steps[-1]))


def load_for_inference(path: str, dtype=None, mesh=None, **runtime):
    """(ModelConfig, params) from a pretraining workdir (its latest step) or one step's directory (also what
    `experiments/convert.py --to=orbax` writes).

    Params come back in the dtypes the checkpoint's config declares (its param_dtype; the router float32), on
    one local device, or with `mesh` placed straight onto it by the rule table (sharding/rules.py): each device
    reads only its own shards, so a checkpoint larger than one host's memory restores."""
    step = step_dir(path)
    with open(os.path.join(step, "config", "metadata")) as f:  # where it trained is not where it runs now
        cfg = model_config_from_dict(json.load(f)["model"], **{**dict.fromkeys(AUTO_FIELDS, "auto"), **runtime})
    import jax.numpy as jnp

    from dsjax.model import DeepSeekV3

    tok = jnp.zeros((1, max(8, cfg.num_nextn_predict_layers + 2)), jnp.int32)  # MTP depth k reads token t+k
    shapes = jax.eval_shape(lambda: DeepSeekV3(cfg).init(jax.random.key(0), tok))["params"]
    if mesh is None:
        # one local device whatever mesh wrote the checkpoint (Orbax would otherwise want the writer's topology)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda s: device, shapes)
    else:
        from sharding.state import state_shardings

        shardings = state_shardings(mesh, shapes)[0]
    shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    params = ocp.StandardCheckpointer().restore(os.path.join(step, "params"), shapes)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return cfg, params
