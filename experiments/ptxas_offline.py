"""ptxas's report on our Mosaic GPU kernels without a GPU: registers, spills, wgmma warnings and the SASS.

The Pallas -> Mosaic GPU lowering runs on any host (tests/test_gpu_lowering.py); the rest of the compile, MLIR ->
LLVM -> PTX -> ptxas, lives in the CUDA PJRT plugin's `MosaicGpuCompile`, which this script calls directly. Before
loading the module (the one step that needs a GPU, and fails here) it writes the PTX and ptxas's report where
MOSAIC_GPU_DUMP_TO points. Three things stand in for the GPU: a stub driver library (built here with gcc) that
answers the two compute-capability queries with 9.0 (sm_90a: H100 / H200); the plugin's NVPTX target registration,
which XLA's GPU client does at start-up and is called here through its (unexported) symbol; and a CUDA toolkit's
ptxas (MOSAIC_GPU_CUDA_ROOT). Then ptxas -v is run on the PTX, and nvdisasm (if given) prints the SASS.

The plugin must match the installed jaxlib (Mosaic's serialized dialect): `pip download --no-deps -d /tmp/pl
jax-cuda12-pjrt==$(python -c 'import jaxlib; print(jaxlib.__version__)')` and unzip the wheel. nvdisasm: the wheel
`nvidia-cuda-nvdisasm` (bin/nvdisasm). A tool for kernel work between GPU sessions: register pressure, spills,
where ptxas placed the waits and loads; it times nothing.

  python experiments/ptxas_offline.py --plugin=/tmp/pl/jax_plugins/xla_cuda12/xla_cuda_plugin.so \\
      --kernel=fp8_gmm --config=warp_specialized=true,block_m=192,compute_wgs=3 --out=/tmp/ptxas_ws3
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.bench_util import parse_overrides  # noqa: E402
from experiments.cuda_stub import load_stub_driver  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("plugin", None, "path of the CUDA PJRT plugin's xla_cuda_plugin.so (same version as jaxlib)")
flags.DEFINE_enum("kernel", "fp8_gmm", ["fp8_gmm", "fp8_tgmm", "gmm"], "which kernel to compile")
flags.DEFINE_string("config", "", "kernel config overrides FIELD=VALUE,... (Fp8GpuConfig, or GpuConfig for gmm)")
flags.DEFINE_string("shape", "32,16384,7168,4096", "G,M,K,N (the gate+up shape by default)")
flags.DEFINE_string("out", None, "folder for the PTX, ptxas's report and the SASS (default: a temp folder)")
flags.DEFINE_string("cuda_root", None, "CUDA toolkit holding bin/ptxas (default: the one `ptxas` on PATH is in)")
flags.DEFINE_string("nvdisasm", None, "nvdisasm binary, for the SASS (optional)")

SMS = 132  # an H100 / H200 (no device to read it from)
SASS_LINE = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)")  # address, predicate, opcode


def symbol_offset(path, name):
    """Offset of a (possibly local) symbol in the plugin's static symbol table."""
    out = subprocess.run(["nm", path], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == name:
            return int(parts[0], 16)
    raise SystemExit(f"--plugin={path}: no symbol {name} (stripped, or another plugin version)")


def kernel_module():
    """Lower the chosen kernel for CUDA and return its serialized Mosaic GPU module."""
    from jax.experimental.mosaic.gpu import core

    from pallas_kernels import fp8_gemm as f8
    from pallas_kernels.grouped_matmul import GpuConfig, gpu

    g, m, k, n = (int(v) for v in FLAGS.shape.split(","))
    s, e4, f32, i32 = jax.ShapeDtypeStruct, jnp.float8_e4m3fn, jnp.float32, jnp.int32
    over = parse_overrides(FLAGS.config)
    if FLAGS.kernel == "fp8_gmm":
        cfg = f8.Fp8GpuConfig(**{"num_sms": SMS, **over})
        f = lambda *a: f8.fp8_gmm(*a, backend="gpu", config=cfg)  # noqa: E731
        avals = (s((m, k), e4), s((m, k // 128), f32), s((g, n, k), e4), s((g, n // 128, k // 128), f32), s((g,), i32))
    elif FLAGS.kernel == "fp8_tgmm":  # a [K, M], b [N, M] tile-scaled along M -> [G, K, N]
        cfg = f8.Fp8GpuConfig(**{"num_sms": SMS, **over}) if over else None
        f = lambda *a: f8.fp8_tgmm(*a, backend="gpu", config=cfg)  # noqa: E731
        avals = (s((k, m), e4), s((k, m // 128), f32), s((n, m), e4), s((n, m // 128), f32), s((g,), i32))
    else:
        cfg = GpuConfig(**{"num_sms": SMS, **over})
        f = lambda x, w, gs: gpu.gmm(x, w, gs, config=cfg)  # noqa: E731
        avals = (s((m, k), jnp.bfloat16), s((g, k, n), jnp.bfloat16), s((g,), i32))
    print(f"{FLAGS.kernel} {FLAGS.shape}: {cfg}", flush=True)
    core.KNOWN_KERNELS.clear()
    jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",))
    modules = list(core.KNOWN_KERNELS.values())
    if len(modules) != 1:
        raise SystemExit(f"expected one Mosaic GPU kernel in the lowering, found {len(modules)}")
    return modules[0]


def compile_module(module, plugin, out, cuda_root):
    """MosaicGpuCompile with the dumps on; returns the PTX file it wrote."""
    os.environ.update(
        MOSAIC_GPU_DUMP_TO=out, MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_CUDA_ROOT=cuda_root
    )
    dll = ctypes.CDLL(plugin)
    compile_fn = dll.MosaicGpuCompile
    compile_fn.argtypes, compile_fn.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_void_p
    base = ctypes.cast(compile_fn, ctypes.c_void_p).value - symbol_offset(plugin, "MosaicGpuCompile")
    register = symbol_offset(plugin, "_ZN6mosaic3gpu33EnsureLLVMNVPTXTargetIsRegisteredEv")
    ctypes.CFUNCTYPE(None)(base + register)()
    # Fails at the module load, after the dumps (it also reports that nvdisasm and the host runtime's symbols
    # are missing: expected here)
    compile_fn(ctypes.c_char_p(module), len(module))
    ptx = sorted(p for p in os.listdir(out) if p.endswith(".ptx"))
    if not ptx:
        raise SystemExit(f"MosaicGpuCompile wrote no PTX into {out} (see the messages above)")
    return os.path.join(out, ptx[0])


def main(argv):
    del argv
    if not FLAGS.plugin or not os.path.exists(FLAGS.plugin):
        raise SystemExit(f"--plugin={FLAGS.plugin}: not a file (see this script's docstring for where to get it)")
    ptxas = shutil.which("ptxas", path=os.path.join(FLAGS.cuda_root, "bin") if FLAGS.cuda_root else None)
    if not ptxas:
        raise SystemExit("no ptxas: put a CUDA toolkit's bin on PATH or pass --cuda_root")
    cuda_root = FLAGS.cuda_root or os.path.dirname(os.path.dirname(os.path.realpath(ptxas)))
    out = FLAGS.out or tempfile.mkdtemp(prefix="ptxas_offline_")
    os.makedirs(out, exist_ok=True)
    load_stub_driver(out)
    ptx = compile_module(kernel_module(), FLAGS.plugin, out, cuda_root)
    cubin = os.path.join(out, "kernel.cubin")
    rep = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", cubin], capture_output=True, text=True)
    print(rep.stdout + rep.stderr, end="")
    if FLAGS.nvdisasm and rep.returncode == 0:
        sass = subprocess.run([FLAGS.nvdisasm, "-c", "-g", cubin], capture_output=True, text=True, check=True).stdout
        with open(os.path.join(out, "kernel.sass"), "w") as f:
            f.write(sass)
        ops = [m.group(1) for m in map(SASS_LINE.match, sass.splitlines()) if m]
        counts = {op: sum(o.startswith(op) for o in ops) for op in ("QGMMA", "HGMMA", "WARPGROUP.DEPBAR", "STL", "LDL")}
        print(f"SASS: {len(ops)} instructions, " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"files: {out}")


if __name__ == "__main__":
    app.run(main)
