"""What the FP8 test files share (test_fp8_gemm.py: the GEMM kernels; test_fp8_layers.py: FP8 training): whether
the Mosaic GPU kernels run in the interpreter (on the CPU) or compiled (FP8_TEST_REAL_GPU=1 on a Hopper GPU), and
the relative error of a result against its reference."""

from __future__ import annotations

import os

import numpy as np

INTERPRET = os.environ.get("FP8_TEST_REAL_GPU") != "1"
# the layers call the kernels compiled: on a GPU (FP8_TEST_REAL_GPU=1) the "gpu" backend too
LAYER_BACKENDS = ["xla"] + ([] if INTERPRET else ["gpu"])


def rel(a, b):
    """Relative error of a against b: the norm of the difference over b's, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)
