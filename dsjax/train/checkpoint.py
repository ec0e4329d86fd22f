"""Orbax checkpoints for training: async, keep-N, atomic (a step directory appears only once committed), verified.

Layout: <workdir>/checkpoints/<step>/{params, opt_state, meta, data, config}.
  params     the model parameters (router biases included)
  opt_state  the optimizer state
  meta       {"step", "rng", "fingerprints": {"params": {path: [s1, s2]}, "opt_state": {...}}} (JSON)
  data       the data iterator's state (JSON), so a resumed run reads exactly the batches it would have
  config     {"model": ModelConfig.to_hf() + runtime knobs, "experiment": the run's config} (JSON)
Inference reads only params + config (`load_for_inference`, with the other readers in checkpoint_io.py), never the
optimizer state.

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

import errno
import glob
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsjax.errors import CheckpointError, ConfigError
from dsjax.train.checkpoint_io import (
    CKPT_DIR,
    CorruptCheckpointError,
    cast_like,
    first_mismatch,
    is_storage_error,
    is_transient,
    read_quietly,
    restore_targets,
    short_cause,
    stored_leaves,
)
from dsjax.train.fingerprint import fingerprint_tree

TREE_ITEMS = ("params", "opt_state")  # the array items; meta's fingerprints are keyed by these


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
        self._clear_partial(step)
        try:
            saved = self._mngr.save(step, args=args, force=force)
        except Exception as e:  # noqa: BLE001 - only storage errors are turned into one line; see is_storage_error
            self._write_failed(step, e)
        if saved and self.async_save:
            self._pending = step
        return saved

    def _clear_partial(self, step: int, patience_s: float = 10.0, quiet_s: float = 0.2) -> None:
        """Removes what an earlier, failed write of `step` left in Orbax's temporary directory for it. When one
        item's write fails, another item's may still be adding files (and directories) there for a while; Orbax's
        own removal at the retry then fails with "Directory not empty" (seen in CI under load), or the writer
        recreates a directory the new write is about to create. So this removes the directory until it stays gone
        for quiet_s, giving up after patience_s (Orbax's attempt then reports what is left)."""
        if jax.process_index() != 0:  # the checkpoint directory is shared: one process clears it
            return
        pattern = os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")
        deadline = time.monotonic() + patience_s
        while glob.glob(pattern) and time.monotonic() < deadline:
            for path in glob.glob(pattern):
                try:
                    shutil.rmtree(path)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno != errno.ENOTEMPTY:
                        return
            time.sleep(quiet_s)  # a writer still running shows up again within this

    def _newest(self) -> str:
        step = self._mngr.latest_step()
        return "there is no intact checkpoint yet" if step is None else f"the newest intact checkpoint is step {step}"

    def _write_failed(self, step, e: BaseException):
        if not is_storage_error(e):
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
                if not is_storage_error(e):
                    raise

    # ------------------------------------------------------------------------------------------------ reading

    def _require(self, step: int):
        if step not in self._mngr.all_steps():
            raise CheckpointError(f"{self.directory}: no checkpoint at step {step} (steps: {self.all_steps()})")

    def _read_json(self, step: int, item: str) -> Any:
        try:
            value = self._mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # noqa: BLE001 - any failure to read a committed step's file
            if is_transient(e):
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
            stored = stored_leaves(os.path.join(self.directory, str(step), item))
        except Exception as e:  # noqa: BLE001 - an unreadable or empty _METADATA
            if is_transient(e):
                raise CheckpointError(f"checkpoint step {step}: cannot read {item} ({short_cause(e)})") from None
            raise CorruptCheckpointError(step, f"{item}/_METADATA: {short_cause(e)}") from None
        try:
            targets = restore_targets(item, like, stored)
        except CheckpointError as e:
            raise CheckpointError(
                f"checkpoint step {step} does not fit this run: {e}; resume with the config it was written "
                "with, or use another --workdir"
            ) from None
        args = ocp.args.Composite(**{item: ocp.args.StandardRestore(targets)})
        tree, failure = read_quietly(lambda: self._mngr.restore(step, args=args)[item])
        if _any_process(failure is not None):  # every host falls back together, before any collective below
            cause, transient = failure or ("unreadable on another host", False)
            if transient:
                raise CheckpointError(f"checkpoint step {step}: cannot read {item} ({cause})")
            raise CorruptCheckpointError(step, f"{item}: {cause}")
        bad = first_mismatch(item, tree, targets, expected)
        if bad:
            raise CorruptCheckpointError(step, bad)
        return cast_like(tree, like)

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
