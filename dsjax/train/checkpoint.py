"""Orbax checkpoints for training: async, keep-N, atomic (a step directory appears only once committed), verified.

Layout: <workdir>/checkpoints/<step>/{params, opt_state, meta, data, config}.
  params     the model parameters (router biases included)
  opt_state  the optimizer state
  meta       {"step", "rng", "fingerprints": {"params": {path: [s1, s2]}, "opt_state": {...}}} (JSON)
  data       the data iterator's state (JSON), so a resumed run reads exactly the batches it would have
  config     {"model": ModelConfig.to_hf() + runtime knobs, "experiment": the run's config} (JSON)
Inference reads only params + config (`load_for_inference`), never the optimizer state.

Never losing a good checkpoint:
- `save` fingerprints every array on device (dsjax/train/fingerprint.py) and refuses to write parameters or
  optimizer state holding a NaN or Inf, so nothing unverified is written; `restore` recomputes the fingerprints
  and raises CorruptCheckpointError on any difference or unreadable file.
- keep-N rotation (Orbax's max_to_keep) deletes the oldest steps only after the new step has committed (a failed
  async write stops the rotation), and every committed step passed the checks above when it was written, so the
  newest intact checkpoint is never the one deleted. keep >= 1 is enforced.
- `restore_latest` moves a corrupt step aside (<step>.corrupt, never deleted) and falls back to the next older one.
- Write failures (disk full, ...) become one-line CheckpointErrors naming the newest intact step.
- `dsjax.train.lock.WorkdirLock` keeps two runs from writing into one workdir.
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
from dsjax.errors import CheckpointError, ConfigError
from dsjax.runtime import AUTO_FIELDS
from dsjax.train.fingerprint import fingerprint_tree, fingerprints, path_str

CKPT_DIR = "checkpoints"
TREE_ITEMS = ("params", "opt_state")  # the array items; meta's fingerprints are keyed by these


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


def _transient(e: BaseException) -> bool:
    """An error that says nothing about the files' contents (access rights, memory, an unavailable service)."""
    for c in _chain(e):
        if isinstance(c, PermissionError | MemoryError | TimeoutError | KeyboardInterrupt):
            return True
        if str(c).startswith(_TRANSIENT):
            return True
    return False


def _storage_error(e: BaseException) -> bool:
    """What a failed write raises: OS errors, TensorStore's ValueErrors, Orbax's wrapped background errors."""
    return any(isinstance(c, OSError | ValueError | RuntimeError) for c in _chain(e))


def _read_quietly(read) -> tuple[Any, tuple[str, bool] | None]:
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
            failure = (short_cause(e), _transient(e))
            return None, failure
    finally:
        for _ in range(5 if failure else 1):  # Orbax's reader threads may still be letting go of the dead reads
            gc.collect()
            if failure:
                time.sleep(0.02)
        sys.unraisablehook = previous


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process: a file only some hosts failed to read makes every host fall back."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


# ----------------------------------------------------------------------------------------------- tree metadata


def _metadata_leaves(tree_metadata) -> dict[str, Any]:
    """{path: ArrayMetadata (shape, dtype)} of an Orbax item's tree metadata (tuples come back as lists and
    namedtuples as dicts, which flatten to the same '/'-joined paths as the live trees)."""
    tree = getattr(tree_metadata, "item_metadata", tree_metadata)
    tree = getattr(tree, "tree", tree)
    is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_array)[0]
    return {path_str(p): x for p, x in flat if is_array(x)}


def _stored_leaves(directory: str) -> dict[str, Any]:
    """{path: ArrayMetadata} of an Orbax array item's directory, read from its _METADATA file (raises on an
    empty, unreadable or missing one)."""
    from etils import epath

    # the handler, not a Checkpointer: an item of a step has no _CHECKPOINT_METADATA of its own to warn about
    leaves = _metadata_leaves(ocp.StandardCheckpointHandler().metadata(epath.Path(directory)))
    if not leaves:
        raise ValueError(f"{os.path.basename(directory)}/_METADATA lists no arrays")
    return leaves


def _restore_targets(item: str, like, stored: dict[str, Any]):
    """The like tree as abstract arrays in the dtypes on disk (so the fingerprints can be checked on the exact
    stored bits; `_cast_like` applies a runtime dtype change afterwards). Raises CheckpointError when the
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


def _cast_like(tree, like):
    return jax.tree.map(lambda x, t: x if np.dtype(x.dtype) == np.dtype(t.dtype) else x.astype(t.dtype), tree, like)


def _first_mismatch(item: str, tree, targets, expected: dict[str, list[int]] | None) -> str | None:
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


# ------------------------------------------------------------------------------------------------ Checkpointer


class Checkpointer:
    """A run's checkpoints under <workdir>/checkpoints: `save`, `wait`, `close`; `restore(step, ...)`,
    `restore_latest(...)` (falls back past corrupt steps), `read_config(step)`, `latest_step()`, `all_steps()`.
    Errors are CheckpointErrors with one-line messages (CorruptCheckpointError for a damaged step)."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(
                f"--config.train.keep={keep!r}: keep at least 1 checkpoint (the newest `keep` steps are kept, "
                "older ones deleted), or nothing would be left to resume from"
            )
        self.directory = os.path.abspath(os.path.join(workdir, CKPT_DIR))
        self.async_save = async_save
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        )
        self._pending: int | None = None  # an async save not yet known to have committed

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    # ------------------------------------------------------------------------------------------------- saving

    def save(self, step: int, params, opt_state, rng, data_state: dict, config: dict, force: bool = False) -> bool:
        """Writes step `step` (asynchronously with async_save: `wait`/`close`/the next save surface its errors).

        Raises CheckpointError, writing nothing, when params or opt_state hold a NaN or Inf, and when writing
        fails (this step's or an earlier async one's: disk full, ...); both messages name the newest intact
        step. Returns False when Orbax's schedule skips the step (never with force=True)."""
        if not force and not self._mngr.should_save(step):
            return False
        self.wait()  # an earlier async save's failure is reported as that step's
        fps, not_finite = fingerprint_tree({"params": params, "opt_state": opt_state})
        if not_finite:
            what = "parameters are" if not_finite[0].startswith("params/") else "optimizer state is"
            raise CheckpointError(
                f"step {step}: {what} not finite ({not_finite[0]} holds NaN or Inf); not saved; {self._newest()}"
            )
        by_item = {
            item: {k[len(item) + 1 :]: v for k, v in fps.items() if k.startswith(item + "/")} for item in TREE_ITEMS
        }
        meta = {"step": int(step), "rng": np.asarray(rng).tolist(), "fingerprints": by_item}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        try:
            saved = self._mngr.save(step, args=args, force=force)
        except Exception as e:  # noqa: BLE001 - only storage errors are turned into one line; see _storage_error
            self._write_failed(step, e)
        if saved and self.async_save:
            self._pending = step
        return saved

    def _newest(self) -> str:
        step = self._mngr.latest_step()
        return "there is no intact checkpoint yet" if step is None else f"the newest intact checkpoint is step {step}"

    def _write_failed(self, step, e: BaseException):
        if not _storage_error(e):
            raise e
        self._pending = None
        try:
            self._mngr.reload()  # Orbax dropped the failed step and the ones it meant to rotate out from its list
        except Exception:  # noqa: BLE001 - the listing is only for the message
            pass
        what = "a checkpoint" if step is None else f"step {step}"
        raise CheckpointError(f"saving {what} failed ({short_cause(e)}); {self._newest()}") from None

    def wait(self):
        """Blocks until the last async save has committed; raises CheckpointError if it failed."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._write_failed(self._pending, e)
        self._pending = None

    def close(self):
        try:
            self.wait()
        finally:
            try:
                self._mngr.close()
            except Exception as e:  # noqa: BLE001 - a failed write was reported by wait() already
                if not _storage_error(e):
                    raise

    # ------------------------------------------------------------------------------------------------ reading

    def _require(self, step: int):
        if step not in self._mngr.all_steps():
            raise CheckpointError(f"{self.directory}: no checkpoint at step {step} (steps: {self.all_steps()})")

    def _read_json(self, step: int, item: str) -> Any:
        try:
            value = self._mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # noqa: BLE001 - any failure to read a committed step's file
            if _transient(e):
                raise CheckpointError(f"checkpoint step {step}: cannot read {item} ({short_cause(e)})") from None
            raise CorruptCheckpointError(step, f"{item}/metadata: {short_cause(e)}") from None
        if value is None:
            raise CorruptCheckpointError(step, f"{item}/metadata is missing or empty")
        return value

    def read_config(self, step: int) -> dict:
        """The run config saved with `step`; CheckpointError (CorruptCheckpointError for a bad file) otherwise."""
        self._require(step)
        config = self._read_json(step, "config")
        if not isinstance(config, dict) or "model" not in config:
            raise CorruptCheckpointError(step, "config/metadata has no model config")
        return config

    def _restore_item(self, step: int, item: str, like, expected):
        """One array item (params or opt_state) restored into `like`'s structure, shardings and dtypes, its
        fingerprints checked against `expected` (None: an old checkpoint without them, restored unchecked)."""
        try:
            stored = _stored_leaves(os.path.join(self.directory, str(step), item))
        except Exception as e:  # noqa: BLE001 - an unreadable or empty _METADATA
            if _transient(e):
                raise CheckpointError(f"checkpoint step {step}: cannot read {item} ({short_cause(e)})") from None
            raise CorruptCheckpointError(step, f"{item}/_METADATA: {short_cause(e)}") from None
        try:
            targets = _restore_targets(item, like, stored)
        except CheckpointError as e:
            raise CheckpointError(
                f"checkpoint step {step} does not fit this run: {e}; resume with the config it was written "
                "with, or use another --workdir"
            ) from None
        args = ocp.args.Composite(**{item: ocp.args.StandardRestore(targets)})
        tree, failure = _read_quietly(lambda: self._mngr.restore(step, args=args)[item])
        if _any_process(failure is not None):  # every host falls back together, before any collective below
            cause, transient = failure or ("unreadable on another host", False)
            if transient:
                raise CheckpointError(f"checkpoint step {step}: cannot read {item} ({cause})")
            raise CorruptCheckpointError(step, f"{item}: {cause}")
        bad = _first_mismatch(item, tree, targets, expected)
        if bad:
            raise CorruptCheckpointError(step, bad)
        return _cast_like(tree, like)

    def restore(self, step: int, params_like, opt_state_like):
        """(params, opt_state, meta, data) of `step`, restored into the structure, shardings and dtypes of the
        given abstract or concrete trees (a dtype change, e.g. param_dtype across a resume, is applied after the
        check, which reads the stored bits).

        Raises CorruptCheckpointError (a CheckpointError naming the step and the first bad file or array) when a
        file cannot be read or an array does not reproduce the fingerprint saved with it, and CheckpointError when
        the checkpoint's arrays do not fit the given trees. Checkpoints written before fingerprints existed (no
        "fingerprints" in meta) restore without the check."""
        self._require(step)
        meta = self._read_json(step, "meta")
        if not isinstance(meta, dict) or "step" not in meta:
            raise CorruptCheckpointError(step, "meta/metadata has no step")
        data = self._read_json(step, "data")
        expected = meta.get("fingerprints") or {}
        params = self._restore_item(step, "params", params_like, expected.get("params"))
        opt_state = self._restore_item(step, "opt_state", opt_state_like, expected.get("opt_state"))
        return params, opt_state, meta, data

    def move_aside(self, step: int) -> str:
        """Renames step's directory to <step>.corrupt (or <step>.corrupt-<n>), out of Orbax's listing and rotation
        (it reads only all-digit names) and out of the way of a later save of the same step; returns the path."""
        self.wait()
        src = os.path.join(self.directory, str(step))
        dst, n = src + ".corrupt", 1
        while os.path.exists(dst):
            dst, n = f"{src}.corrupt-{n}", n + 1
        _sync(f"dsjax_checkpoint_move_aside_{step}")  # every host has picked the same name before it changes
        if jax.process_index() == 0:
            os.rename(src, dst)
        _sync(f"dsjax_checkpoint_moved_aside_{step}")
        self._mngr.reload()  # forget the step: latest_step, rotation and the next save see the directory as it is
        return dst

    def restore_latest(self, params_like, opt_state_like, check_config=None):
        """None when there is no checkpoint, else (step, params, opt_state, meta, data) of the newest step that
        restores intact. A corrupt step (CorruptCheckpointError) is moved aside (`move_aside`; never deleted) with
        one printed line, e.g. "checkpoint step 6 is corrupt (<cause>); moved aside to checkpoints/6.corrupt;
        resuming from step 3", and the next older step is tried. `check_config(config_dict)`, if given, sees each
        candidate's saved run config first and may raise (e.g. a model mismatch): that propagates unchanged.

        Raises CheckpointError listing them when every step is corrupt, and any non-corruption CheckpointError
        (a checkpoint that does not fit, unreadable for lack of permission) as it is, moving nothing."""
        moved = []
        while self.all_steps():
            step = self.all_steps()[-1]
            try:
                if check_config is not None:
                    check_config(self.read_config(step))
                return (step, *self.restore(step, params_like, opt_state_like))
            except CorruptCheckpointError as e:
                dst = self.move_aside(step)
                older = self.all_steps()
                rel = os.path.relpath(dst, os.path.dirname(self.directory))
                then = f"resuming from step {older[-1]}" if older else "no older checkpoint left"
                if jax.process_index() == 0:
                    print(f"checkpoint step {step} is corrupt ({e.cause}); moved aside to {rel}; {then}", flush=True)
                moved.append(f"{step} ({e.cause})")
        if moved:
            raise CheckpointError(
                f"{self.directory}: every checkpoint is corrupt: steps {'; '.join(moved)}; they were moved aside "
                "to <step>.corrupt; start over in another --workdir or restore them from a backup"
            )
        return None


# ---------------------------------------------------------------------------------------- one step's directory


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
            stored = _stored_leaves(directory)
            targets = _restore_targets("params", shapes, stored)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {step} does not fit its config: {e}") from None
    except Exception as e:  # noqa: BLE001 - an unreadable or empty _METADATA
        raise CheckpointError(f"checkpoint {step}: cannot read params/_METADATA ({short_cause(e)})") from None
    params, failure = _read_quietly(lambda: ocp.StandardCheckpointer().restore(directory, targets))
    if failure:  # a file that no longer decodes: corruption (truncation, bit rot), named like a checksum mismatch
        raise CorruptCheckpointError(os.path.basename(step), f"cannot read params ({failure[0]})", where=step)
    bad = _first_mismatch("params", params, targets, expected)
    if bad:
        raise CorruptCheckpointError(os.path.basename(step), bad, where=step)
    return _cast_like(params, shapes)


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


# ------------------------------------------------------------------------------------------------ workdir lock
