"""Damage done to a saved checkpoint step by the tests that check it is caught (test_checkpoint.py,
test_checkpoint_readers.py, test_train_loop.py): bit rot in a data file, a silent one-element rewrite that still
decodes, and the one-line error a user sees."""

from __future__ import annotations

import os

import numpy as np
import tensorstore as ts


def largest_file(directory: str) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def scribble(step_dir: str, seed: int = 1) -> None:
    """4 KiB of random bytes into the middle of the largest params data file of a checkpoint step."""
    path = largest_file(os.path.join(step_dir, "params"))
    size = os.path.getsize(path)
    assert size > 8192, size  # else the bytes could miss the data and the test prove nothing
    with open(path, "r+b") as f:
        f.seek(size // 2 - 2048)
        f.write(np.random.RandomState(seed).bytes(4096))


def set_element(params_dir: str, name: str, index, value) -> None:
    """A silent change: one element rewritten through TensorStore, so every file still decodes."""
    arr = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{params_dir}/"}, "path": name}
    ).result()
    arr[index] = value


def one_line(e) -> str:
    """The message of a pytest.raises ExceptionInfo, asserted to be one line."""
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg
