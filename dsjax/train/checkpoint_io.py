"""Reading checkpoints back: the model config a step saved, verified restores of its arrays, one-line causes for
the errors Orbax and TensorStore raise, and a step's parameters for inference (`load_for_inference`). Writing and
the training-side rotation live in dsjax/train/checkpoint.py (`Checkpointer`), which builds on these.

A step directory is <workdir>/checkpoints/<step>/{params, opt_state, meta, data, config} (checkpoint.py's module
doc); inference reads only params + config, never the optimizer state, and checks params against the fingerprints
meta recorded when they were written.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import inspect
import json
import os
import re
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsjax.config import RUNTIME_FIELDS, ModelConfig
from dsjax.errors import CheckpointError
from dsjax.runtime import AUTO_FIELDS
from dsjax.train.fingerprint import fingerprints, path_str

CKPT_DIR = "checkpoints"


def model_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {**cfg.to_hf(), "dsjax_runtime": {k: getattr(cfg, k) for k in RUNTIME_FIELDS}}


def model_config_from_dict(d: dict[str, Any], **runtime) -> ModelConfig:
    """The config a checkpoint saved. Runtime knobs it holds that this version no longer has (a knob removed since)
    are dropped: they never shaped the weights."""
    d = dict(d)
    saved = d.pop("dsjax_runtime", {})
    rt = {**{k: v for k, v in saved.items() if k in RUNTIME_FIELDS}, **runtime}
    return ModelConfig.from_hf(d, **rt)


def config_mismatch(old: ModelConfig, new: ModelConfig) -> list[str]:
    """Architecture fields that differ (runtime knobs such as dtype or remat may change across a resume)."""
    return [
        f"{f.name}: checkpoint {getattr(old, f.name)!r} vs now {getattr(new, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in RUNTIME_FIELDS and getattr(old, f.name) != getattr(new, f.name)
    ]


class CorruptCheckpointError(CheckpointError):
    """A step whose files cannot be read back or do not reproduce the fingerprints saved with them.
    `restore_latest` moves such a step aside; other CheckpointErrors (a checkpoint that does not fit the run, a
    permission problem) are raised as they are, since the files may be fine."""

    def __init__(self, step, cause: str, where: str | None = None):
        self.step, self.cause = step, cause
        super().__init__(f"checkpoint step {step}{f' ({where})' if where else ''} is corrupt: {cause}")


# ------------------------------------------------------------------------------------------------ error messages

_TRANSIENT = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")


def _chain(e: BaseException) -> list[BaseException]:
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return out


def short_cause(e: BaseException) -> str:
    """One line for an Orbax / TensorStore / OS / JSON error: the innermost cause's first line, without the status
    code prefix and the long file URLs TensorStore adds (its full messages run to dozens of lines)."""
    for c in reversed(_chain(e)):
        if isinstance(c, json.JSONDecodeError):
            return "empty file" if not c.doc.strip() else f"not valid JSON ({c.msg} at line {c.lineno})"
        if isinstance(c, OSError) and c.strerror:
            return f"{c.strerror}: {c.filename}" if c.errno == errno.ENOENT and c.filename else c.strerror
        lines = [line for line in str(c).splitlines() if line.strip()]
        if lines:
            msg = re.sub(r"^[A-Z_]+: ", "", lines[0].strip())
            msg = re.sub(r' (in OCDBT database )?at local file "[^"]*"', "", msg)
            return msg if len(msg) <= 300 else msg[:297] + "..."
    return type(e).__name__


def is_transient(e: BaseException) -> bool:
    """An error that says nothing about the files' contents (access rights, memory, an unavailable service)."""
    for c in _chain(e):
        if isinstance(c, PermissionError | MemoryError | TimeoutError | KeyboardInterrupt):
            return True
        if str(c).startswith(_TRANSIENT):
            return True
    return False


def is_storage_error(e: BaseException) -> bool:
    """What a failed write raises: OS errors, TensorStore's ValueErrors, Orbax's wrapped background errors."""
    return any(isinstance(c, OSError | ValueError | RuntimeError) for c in _chain(e))


def read_quietly(read) -> tuple[Any, tuple[str, bool] | None]:
    """(read(), None), or (None, (one-line cause, transient?)) when it raised.

    Orbax reads a tree's arrays concurrently; when one read fails, the reads still in flight die with its event
    loop, and Python prints each as an "Exception ignored" traceback holding TensorStore's full spec (dozens of
    lines per array) whenever they are collected. They echo the one error that is reported, so the exception
    (which keeps them alive) is dropped here and they are collected, silenced, before returning."""
    previous = sys.unraisablehook

    def hook(unraisable):
        echo = str(unraisable.exc_value).startswith(("Encountered error while reading", "Event loop is closed"))
        if not (echo or inspect.iscoroutine(unraisable.object)):
            previous(unraisable)

    sys.unraisablehook = hook
    failure = None
    try:
        try:
            return read(), None
        except Exception as e:  # noqa: BLE001 - decoding, truncated or missing files: TensorStore's ValueErrors
            failure = (short_cause(e), is_transient(e))
            return None, failure
    finally:
        for _ in range(5 if failure else 1):  # Orbax's reader threads may still be letting go of the dead reads
            gc.collect()
            if failure:
                time.sleep(0.02)
        sys.unraisablehook = previous


# ----------------------------------------------------------------------------------------------- tree metadata


def _metadata_leaves(tree_metadata) -> dict[str, Any]:
    """{path: ArrayMetadata (shape, dtype)} of an Orbax item's tree metadata (tuples come back as lists and
    namedtuples as dicts, which flatten to the same '/'-joined paths as the live trees)."""
    tree = getattr(tree_metadata, "item_metadata", tree_metadata)
    tree = getattr(tree, "tree", tree)
    is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_array)[0]
    return {path_str(p): x for p, x in flat if is_array(x)}


def stored_leaves(directory: str) -> dict[str, Any]:
    """{path: ArrayMetadata} of an Orbax array item's directory, read from its _METADATA file (raises on an
    empty, unreadable or missing one)."""
    from etils import epath

    # the handler, not a Checkpointer: an item of a step has no _CHECKPOINT_METADATA of its own to warn about
    leaves = _metadata_leaves(ocp.StandardCheckpointHandler().metadata(epath.Path(directory)))
    if not leaves:
        raise ValueError(f"{os.path.basename(directory)}/_METADATA lists no arrays")
    return leaves


def restore_targets(item: str, like, stored: dict[str, Any]):
    """The like tree as abstract arrays in the dtypes on disk (so the fingerprints can be checked on the exact
    stored bits; `cast_like` applies a runtime dtype change afterwards). Raises CheckpointError when the
    checkpoint's arrays are not the run's (names or shapes): a config problem, not corruption."""
    flat, tree = jax.tree_util.tree_flatten_with_path(like)
    have = {path_str(p) for p, _ in flat}
    missing, extra = sorted(have - set(stored)), sorted(set(stored) - have)
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the run does not"
        raise CheckpointError(f"{item} {what} ({len(missing)} missing, {len(extra)} unexpected arrays)")
    out = []
    for p, x in flat:
        s, meta = ocp.utils.to_shape_dtype_struct(x), stored[path_str(p)]
        if tuple(s.shape) != tuple(meta.shape):
            raise CheckpointError(f"{item}/{path_str(p)} has shape {tuple(meta.shape)}, the run needs {s.shape}")
        out.append(jax.ShapeDtypeStruct(s.shape, np.dtype(meta.dtype), sharding=getattr(s, "sharding", None)))
    return jax.tree_util.tree_unflatten(tree, out)


def cast_like(tree, like):
    return jax.tree.map(lambda x, t: x if np.dtype(x.dtype) == np.dtype(t.dtype) else x.astype(t.dtype), tree, like)


def first_mismatch(item: str, tree, targets, expected: dict[str, list[int]] | None) -> str | None:
    """The first array of `tree` whose fingerprint differs from `expected` (None: all match, or no record).
    An array that did not come back in its stored dtype (a 64-bit one while JAX runs without x64) is not
    compared: its bits were changed by the restore, not on disk."""
    if not expected:
        return None
    got = fingerprints(tree)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    as_stored = {
        path_str(p): np.dtype(x.dtype) == np.dtype(t.dtype)
        for (p, x), t in zip(flat, jax.tree_util.tree_leaves(targets))
    }
    for name, want in expected.items():
        if name in got and as_stored.get(name) and list(got[name]) != list(want):
            return f"{item}/{name} does not match its checksum"
    return None


# ------------------------------------------------------------------------------------------------ step directories


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
        raise CheckpointError(f"{path}: no committed checkpoint (expected <workdir>/{CKPT_DIR}/<step>/params)")
    return os.path.join(root, str(steps[-1]))


def _read_step_json(step: str, item: str) -> Any:
    path = os.path.join(step, item, "metadata")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # missing, unreadable, empty or not JSON
        raise CheckpointError(f"checkpoint {step}: cannot read {item}/metadata ({short_cause(e)})") from None


def read_step_config(step: str) -> dict:
    """The config JSON of a step directory (a trainer's or a converted one); one-line CheckpointError if absent
    or unreadable."""
    config = _read_step_json(step, "config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"checkpoint {step}: config/metadata has no model config")
    return config


def params_fingerprints(step: str) -> dict[str, list[int]] | None:
    """The params fingerprints recorded in a step directory's meta (None: no meta, as in what
    `experiments/convert.py --to=orbax` writes, or a checkpoint from before fingerprints)."""
    if not os.path.exists(os.path.join(step, "meta")):
        return None
    meta = _read_step_json(step, "meta")
    return ((meta.get("fingerprints") or {}) if isinstance(meta, dict) else {}).get("params")


def _restore_params(step: str, shapes, expected):
    """Params of a step directory into `shapes` (abstract arrays with shardings), verified against `expected`."""
    directory = os.path.join(step, "params")
    try:
        targets = shapes
        if expected:  # read the stored dtypes, so the check sees the stored bits
            stored = stored_leaves(directory)
            targets = restore_targets("params", shapes, stored)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {step} does not fit its config: {e}") from None
    except Exception as e:  # noqa: BLE001 - an unreadable or empty _METADATA
        raise CheckpointError(f"checkpoint {step}: cannot read params/_METADATA ({short_cause(e)})") from None
    params, failure = read_quietly(lambda: ocp.StandardCheckpointer().restore(directory, targets))
    if failure:  # a file that no longer decodes: corruption (truncation, bit rot), named like a checksum mismatch
        raise CorruptCheckpointError(os.path.basename(step), f"cannot read params ({failure[0]})", where=step)
    bad = first_mismatch("params", params, targets, expected)
    if bad:
        raise CorruptCheckpointError(os.path.basename(step), bad, where=step)
    return cast_like(params, shapes)


def load_for_inference(path: str, dtype=None, mesh=None, **runtime):
    """(ModelConfig, params) from a pretraining workdir (its latest step) or one step's directory (also what
    `experiments/convert.py --to=orbax` writes).

    Params come back in the dtypes the checkpoint's config declares (its param_dtype; the router float32), on
    one local device, or with `mesh` placed straight onto it by the rule table (sharding/rules.py): each device
    reads only its own shards, so a checkpoint larger than one host's memory restores. A trainer's checkpoint is
    checked against the params fingerprints saved with it: CorruptCheckpointError (one line, naming the step
    directory and the array) when they differ; CheckpointError for a missing or unreadable config or params."""
    step = step_dir(path)
    config = read_step_config(step)  # where it trained is not where it runs now
    try:
        cfg = model_config_from_dict(config["model"], **{**dict.fromkeys(AUTO_FIELDS, "auto"), **runtime})
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {step}: config/metadata is not a model config ({e})") from None
    expected = params_fingerprints(step)
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
    params = _restore_params(step, shapes, expected)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return cfg, params
