"""A stand-in for the CUDA driver on a host without a GPU, for the tools that compile for one there
(experiments/ptxas_offline.py, experiments/step_ledger.py). Defines no flags."""

from __future__ import annotations

import ctypes
import os
import subprocess

# Just enough of the driver API for MosaicGpuCompile: the current device and its compute capability (attributes
# 75 / 76). Loaded first under the driver's soname, so the plugin's dlopen("libcuda.so.1") returns it.
STUB_DRIVER = r"""
static const char *msg = "no CUDA driver (experiments/cuda_stub.py)";
int cuGetErrorString(int e, const char **s) { *s = msg; return 0; }
int cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_STUB"; return 0; }
int cuInit(unsigned f) { return 0; }
int cuCtxGetDevice(int *d) { *d = 0; return 0; }
int cuDeviceGet(int *d, int o) { *d = 0; return 0; }
int cuDeviceGetAttribute(int *v, int attr, int d) { *v = attr == 75 ? 9 : attr == 16 ? 132 : 0; return 0; }
int cuModuleLoadData(void **m, const void *image) { return 100; }
"""


def load_stub_driver(tmp):
    src, lib = os.path.join(tmp, "stub.c"), os.path.join(tmp, "libcuda.so.1")
    with open(src, "w") as f:
        f.write(STUB_DRIVER)
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", lib, src], check=True)
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
