"""Never losing a good checkpoint: fingerprints (device vs streamed), corruption caught by restore, restore_latest,
bad metadata files, keep >= 1, non-finite saves refused, write failures and the workdir lock. Small trees on CPU
throughout; the readers of a checkpoint (load_for_inference, the converter) are test_checkpoint_readers.py's."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.errors import CheckpointError, ConfigError
from dsjax.train.checkpoint import Checkpointer
from dsjax.train.fingerprint import StreamingFingerprint, fingerprint_tree, fingerprints
from dsjax.train.lock import WorkdirLock
from tests.ckpt_damage import largest_file, one_line, scribble, set_element

RNG = np.zeros(2, np.uint32)


def _tree(seed=0):
    """Random params (f32 big enough for a multi-KiB data file, bf16, int32) and an Adam-like opt_state."""
    r = np.random.RandomState(seed)
    params = {
        "dense": {"kernel": jnp.asarray(r.randn(256, 256), jnp.float32)},
        "bias": jnp.asarray(r.randn(300), jnp.bfloat16),
        "ids": jnp.asarray(r.randint(-(2**31), 2**31 - 1, (7, 5)), jnp.int32),
    }
    opt_state = ({"count": jnp.asarray(3, jnp.int32), "mu": jax.tree.map(jnp.zeros_like, params)},)
    return params, opt_state


def _save(ck, step, params=None, opt_state=None):
    p, o = _tree(step) if params is None else (params, opt_state)
    ck.save(step, p, o, RNG, {"it": step}, {"model": {"step": step}})
    ck.wait()
    return p, o


# -------------------------------------------------------------------------------------------------- fingerprint


def test_fingerprints_whole_and_streamed_agree():
    r = np.random.RandomState(0)
    tree = {
        "bf16": jnp.asarray(r.randn(6, 5, 4), jnp.bfloat16),
        "i32": jnp.asarray(r.randint(-(2**31), 2**31 - 1, (9, 7)), jnp.int32),
        "f32": jnp.asarray(r.randn(3, 8), jnp.float32),
        "f16": jnp.asarray(r.randn(5), jnp.float16),
        "u8": jnp.asarray(r.randint(0, 255, (4, 4)), jnp.uint8),
        "bool": jnp.asarray(r.rand(11) > 0.5),
        "scalar": jnp.float32(2.5),
        "long": jnp.asarray(r.randn(3, 300_000), jnp.bfloat16),  # rows longer than the host's NumPy chunk
    }
    whole = fingerprints(tree)
    assert fingerprints(jax.device_get(tree)) == whole  # the NumPy path of fingerprint_tree
    for name, x in tree.items():
        x = np.asarray(x)
        acc = StreamingFingerprint(x.shape, x.dtype)
        if x.ndim == 0:
            acc.add(x, 0)
        else:
            row = x[0].size
            for i in r.permutation(x.shape[0]):  # any order, one leading-axis unit at a time
                acc.add(x[i], int(i) * row)
        assert acc.complete and acc.value() == whole[name], name
    # position matters: swapping two values keeps s1 and changes s2
    swapped = np.asarray(tree["f32"]).copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    got = fingerprints({"f32": jnp.asarray(swapped)})["f32"]
    assert got[0] == whole["f32"][0] and got[1] != whole["f32"][1]
    _, bad = fingerprint_tree({"a": jnp.asarray([1.0, np.nan]), "b": np.array([np.inf]), "c": jnp.ones(2)})
    assert bad == ["a", "b"]


# ------------------------------------------------------------------------------------------------- corruption


def test_scribbled_step_is_caught_and_moved_aside(tmp_path, capsys):
    ck = Checkpointer(str(tmp_path), keep=3, async_save=False)
    p3, o3 = _save(ck, 3)
    p6, o6 = _save(ck, 6)
    scribble(os.path.join(ck.directory, "6"))
    with pytest.raises(CheckpointError, match=r"^checkpoint step 6 is corrupt: params") as e:
        ck.restore(6, p6, o6)
    one_line(e)

    step, params, opt_state, meta, data = ck.restore_latest(p6, o6)
    assert step == 3 and meta["step"] == 3 and data == {"it": 3}
    np.testing.assert_array_equal(params["dense"]["kernel"], p3["dense"]["kernel"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("checkpoint step 6 is corrupt (params")
    assert lines[0].endswith("; moved aside to checkpoints/6.corrupt; resuming from step 3"), lines[0]
    assert os.path.isdir(os.path.join(ck.directory, "6.corrupt")) and ck.all_steps() == [3]

    _save(ck, 6)  # the same step number again: no collision with the corrupt copy
    set_element(os.path.join(ck.directory, "6", "params"), "dense.kernel", (1, 2), np.float32(7.0))
    assert ck.restore_latest(p6, o6)[0] == 3
    assert "params/dense/kernel does not match its checksum" in capsys.readouterr().out
    assert sorted(os.listdir(ck.directory)) == ["3", "6.corrupt", "6.corrupt-1"]
    ck.close()

    fresh = Checkpointer(str(tmp_path), keep=3)  # a later run lists neither corrupt copy
    assert fresh.latest_step() == 3
    fresh.close()


def test_silent_change_names_the_array_and_dtype_changes_still_check(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=3, async_save=False)
    p, o = _save(ck, 2)
    as_f16 = jax.tree.map(lambda x: x.astype(jnp.float16) if x.dtype == jnp.float32 else x, p)
    got, *_ = ck.restore(2, as_f16, o)  # a param_dtype change across a resume: checked on the stored bits
    assert got["dense"]["kernel"].dtype == jnp.float16
    set_element(os.path.join(ck.directory, "2", "opt_state"), "0.count", (), np.int32(4))
    with pytest.raises(CheckpointError) as e:
        ck.restore(2, p, o)
    assert one_line(e) == "checkpoint step 2 is corrupt: opt_state/0/count does not match its checksum"
    with pytest.raises(CheckpointError, match=r"step 2 does not fit this run: params/dense/kernel has shape"):
        ck.restore(2, {**p, "dense": {"kernel": jnp.zeros((4, 4))}}, o)
    ck.close()


@pytest.mark.parametrize(
    "damage, match",
    [
        ("truncate", r"checkpoint step 5 is corrupt: params: .*not valid for value of size"),
        ("meta", r"checkpoint step 5 is corrupt: meta/metadata: empty file"),
        ("params_metadata", r"checkpoint step 5 is corrupt: params/_METADATA: empty file"),
        ("config", r"checkpoint step 5 is corrupt: config/metadata: empty file"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, damage, match):
    ck = Checkpointer(str(tmp_path), keep=3, async_save=False)
    p, o = _save(ck, 5)
    step = os.path.join(ck.directory, "5")
    if damage == "truncate":
        path = largest_file(os.path.join(step, "params"))
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        path = {"meta": "meta/metadata", "params_metadata": "params/_METADATA", "config": "config/metadata"}[damage]
        open(os.path.join(step, path), "w").close()
    with pytest.raises(CheckpointError, match=match) as e:
        ck.read_config(5) if damage == "config" else ck.restore(5, p, o)
    one_line(e)
    ck.close()


def test_every_step_corrupt(tmp_path, capsys):
    ck = Checkpointer(str(tmp_path), keep=3, async_save=False)
    p, o = _save(ck, 1)
    _save(ck, 2)
    for s in ("1", "2"):
        open(os.path.join(ck.directory, s, "meta", "metadata"), "w").close()
    with pytest.raises(CheckpointError, match=r"every checkpoint is corrupt: steps 2 \(meta.*; 1 \(meta") as e:
        ck.restore_latest(p, o)
    one_line(e)
    assert sorted(os.listdir(ck.directory)) == ["1.corrupt", "2.corrupt"]
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert Checkpointer(str(tmp_path / "empty"), keep=1).restore_latest(p, o) is None
    ck.close()


# ------------------------------------------------------------------------------------------------ saving


def test_keep_must_be_positive_and_deletes_nothing(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=3, async_save=False)
    _save(ck, 1)
    ck.close()
    with pytest.raises(ConfigError, match=r"--config\.train\.keep=0"):
        Checkpointer(str(tmp_path), keep=0)
    assert os.listdir(os.path.join(tmp_path, "checkpoints")) == ["1"]


def test_non_finite_state_is_not_saved(tmp_path):
    ck = Checkpointer(str(tmp_path), keep=3, async_save=True)
    p, o = _save(ck, 3)
    bad = {**p, "bias": p["bias"].at[7].set(jnp.nan)}
    with pytest.raises(CheckpointError) as e:
        ck.save(4, bad, o, RNG, {}, {})
    assert one_line(e) == (
        "step 4: parameters are not finite (params/bias holds NaN or Inf); not saved; "
        "the newest intact checkpoint is step 3"
    )
    inf_opt = (
        {**o[0], "mu": {**o[0]["mu"], "dense": {"kernel": o[0]["mu"]["dense"]["kernel"].at[0, 0].set(jnp.inf)}}},
    )
    with pytest.raises(CheckpointError, match=r"step 5: optimizer state is not finite \(opt_state/0/mu/dense/kernel"):
        ck.save(5, p, inf_opt, RNG, {}, {})
    ck.close()
    assert os.listdir(os.path.join(tmp_path, "checkpoints")) == ["3"]


@pytest.mark.parametrize("async_save", [False, True])
def test_write_failure_names_the_newest_intact_step(tmp_path, monkeypatch, async_save):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    ck = Checkpointer(str(tmp_path), keep=1, async_save=async_save)
    p, o = _save(ck, 3)

    async def disk_full(self, x, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
    with pytest.raises(CheckpointError) as e:
        ck.save(6, p, o, RNG, {}, {})
        ck.wait()  # async: the background write's error surfaces here
    assert one_line(e) == ("saving step 6 failed (No space left on device); the newest intact checkpoint is step 3")
    monkeypatch.undo()
    assert ck.all_steps() == [3] and ck.restore(3, p, o)[2]["step"] == 3  # keep=1 did not rotate step 3 out
    _save(ck, 6)
    assert ck.all_steps() == [6]
    ck.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # the writer must not die early
def test_retry_after_a_failed_write_outlasts_its_stray_writers(tmp_path):
    """A failed write can leave another item's writer still adding files to the step's temporary directory; the
    retry must clear that directory once the writer stops, not fail with "Directory not empty" (seen in CI under
    load, after the simulated disk-full above). Here a thread stands in for the writer for 0.5 s."""
    import threading
    import time

    ck = Checkpointer(str(tmp_path), keep=1, async_save=False)
    p, o = _save(ck, 3)
    partial = os.path.join(ck.directory, "6.orbax-checkpoint-tmp", "params", "d")
    os.makedirs(partial)
    started, stop = threading.Event(), time.monotonic() + 0.5

    def writer():
        i = 0
        while time.monotonic() < stop:
            try:  # the save's cleanup may remove the directory between these calls: make it again
                os.makedirs(partial, exist_ok=True)
                for _ in range(50):
                    open(os.path.join(partial, f"chunk{i}"), "w").close()
                    i += 1
            except FileNotFoundError:
                pass
            started.set()

    thread = threading.Thread(target=writer)
    thread.start()
    started.wait()
    try:
        _save(ck, 6, p, o)
    finally:
        thread.join()
    assert ck.all_steps() == [6] and ck.restore(6, p, o)[2]["step"] == 6
    assert not any(name.startswith("6.orbax-checkpoint-tmp") for name in os.listdir(ck.directory))
    ck.close()


# ------------------------------------------------------------------------------------------------ workdir lock


def test_workdir_lock(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    with WorkdirLock(workdir) as lock:
        owner = json.loads(open(lock.path).read())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(ConfigError, match=rf"is in use by pid {os.getpid()} on host .* \(started .*\); stop"):
            WorkdirLock(workdir).acquire()
    assert not os.path.exists(lock.path)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(lock.path, "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}, f)
    with WorkdirLock(workdir):
        assert f"taking over the lock of pid {dead.pid}" in capsys.readouterr().out
        assert json.loads(open(lock.path).read())["pid"] == os.getpid()

    with open(lock.path, "w") as f:
        json.dump({"pid": 1, "host": "elsewhere", "started": "then"}, f)
    with pytest.raises(ConfigError, match=r"in use by pid 1 on host elsewhere .* delete .*LOCK"):
        WorkdirLock(workdir).acquire()
    assert json.loads(open(lock.path).read())["host"] == "elsewhere"  # refused: left as it was
