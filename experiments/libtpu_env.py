"""Environment for using libtpu as a compiler only (experiments/compile.py, tests/test_tpu_aot.py): imports no JAX,
so it can run before JAX starts its backends.

The host's own platform stays the CPU, and libtpu is told there is no TPU host to find: it only initialises with a
worker name and a chip type (the slice compiled for comes from the topology asked for, not from these).
"""

import os

COMPILE_ONLY = {
    "JAX_PLATFORMS": "cpu",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5p-8",
}


def set_compile_only_defaults() -> None:
    """Set each COMPILE_ONLY variable the environment does not already set."""
    for key, value in COMPILE_ONLY.items():
        os.environ.setdefault(key, value)
