"""A train step's memory traffic and kernel count per model component, compiled for an NVIDIA GPU on a host without
one: a ledger to compare two configurations (e.g. BF16 against FP8) between GPU sessions. It times nothing.

XLA's GPU compiler runs on any host given a target description: the CUDA PJRT plugin (the `jax-cuda12-pjrt` wheel
matching the installed jaxlib) creates a compile-only topology from a GpuTargetConfig (TARGETS below: the chip's
facts), and `experiments/aot.py` compiles the pretraining step for its one device, as for a TPU slice. Two things
stand in for the GPU: the stub driver of experiments/ptxas_offline.py, and the Mosaic GPU runtime library of the
`jax-cuda12-plugin` wheel (MOSAIC_GPU_RUNTIME_LIB_PATH), which the plugin links each Mosaic kernel's host code
against while compiling. cuDNN's fused attention needs cuDNN itself, so attention runs as XLA's here (the same in
both columns; its own rows are then not the GPU run's).

The ledger walks the compiled HLO's kernels (fusions, custom calls, copies; while bodies times their known trip
count), charges each its output bytes plus its operands' (a fused slice or gather of an operand: the bytes it
takes, not the whole operand; an FP8 grouped GEMM's layer stack of weights: its layer's share, stack_shares)
and attributes it to a component as `bench_pretrain.py --profile` does
(experiments/step_profile.py: the op_name scopes). Bytes are an upper bound on the traffic of memory-bound
kernels and say nothing of a GEMM's time; the kernel count shows launch-bound work (e.g. a binary search XLA
unrolls into a dozen tiny kernels per call).

  pip download --no-deps -d /tmp/pl jax-cuda12-pjrt==0.10.2 jax-cuda12-plugin==0.10.2   # then unzip both wheels
  python experiments/step_ledger.py --plugin=/tmp/pl/jax_plugins/xla_cuda12/xla_cuda_plugin.so \\
      --runtime_lib=/tmp/pl/jax_cuda12_plugin/libmosaic_gpu_runtime.so \\
      --variants="bf16:,fp8:fp8=e4m3+fp8_wgrad=none" --components=experts,"attention proj+rope"
"""

from __future__ import annotations

import collections
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402
from experiments.step_profile import classify, family, index_of, parse_hlo  # noqa: E402

FLAGS = flags.FLAGS
with cli.config_errors():
    config_flags.DEFINE_config_file(
        "config",
        "experiments/configs/small.py",
        "pretraining config file; override fields with --config.<x>=",
        lock_config=False,
    )
flags.DEFINE_string("plugin", None, "the CUDA PJRT plugin's xla_cuda_plugin.so (same version as jaxlib)")
flags.DEFINE_string("runtime_lib", None, "libmosaic_gpu_runtime.so of the jax-cuda12-plugin wheel (same version)")
flags.DEFINE_enum("target", "h100", ["h100", "h200"], "GPU to compile for (a TARGETS key)")
flags.DEFINE_list("variants", ["bf16:", "fp8:fp8=e4m3+fp8_wgrad=none"], "NAME:FIELD=VALUE+... model overrides")
flags.DEFINE_float("mtp_lambda", 0.3, "MTP loss weight (0: no MTP module in the step)")
flags.DEFINE_list("components", [], "components whose kernel kinds to list (e.g. experts)")
flags.DEFINE_string("hlo_out", "", "write each variant's compiled HLO text here")

# GpuTargetConfig text (xla/stream_executor's proto): the chip's facts, as its datasheet and CUDA report them
TARGETS = {
    "h100": """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA" dnn_version_info { major: 9 minor: 8 } device_description_str: "NVIDIA H100 80GB HBM3"
""",
}
# The H200: the H100's SMs with 141 GB of HBM3e at 4.8 TB/s. Its memory keeps XLA from rematerialising where the
# H100's 80 GB make it (XLA's attention, used here, holds more than cuDNN's), so two configs' ledgers differ by their
# own kernels only
TARGETS["h200"] = (
    TARGETS["h100"]
    .replace("memory_bandwidth: 3352320000000", "memory_bandwidth: 4800000000000")
    .replace("device_memory_size: 84942979072", "device_memory_size: 150754820096")
    .replace("NVIDIA H100 80GB HBM3", "NVIDIA H200")
)

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
DTYPE_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})
_SHAPE = re.compile(r"\b([a-z0-9]+)\[([0-9,]*)\]")
# no kernel of their own: bookkeeping, or control flow whose bodies are walked
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "opt-barrier"}
_NO_KERNEL |= {
    "partition-id",
    "replica-id",
    "add-dependency",
    "copy-start",
    "copy-done",
    "while",
    "call",
    "conditional",
}
_SLICING = {"slice", "dynamic-slice", "gather"}


def type_bytes(text: str) -> int:
    """Bytes of an HLO type: an array (bf16[32,64]{1,0}) or a tuple of them."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = DTYPE_BYTES.get(dtype)
        if n is not None:
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n
    return total


def _dims(text: str):
    """(dtype, dims) of an HLO array type, or None for a tuple or scalar-less text."""
    found = _SHAPE.findall(text)
    return (found[0][0], tuple(int(d) for d in filter(None, found[0][1].split(",")))) if len(found) == 1 else None


def stack_shares(operand_types: list[str], reads: list[float]) -> list[float]:
    """A grouped FP8 GEMM given a layer stack of weights (fp8_gmm's group_offset) reads only its G groups of the
    e4m3 stack [T, N, K]; its column scales [G, ceil(K / 128), N] say G. Such an operand is charged G / T of its
    bytes; everything else as it is."""
    shapes = [_dims(t) for t in operand_types]
    scales = {(d[0], d[2]): d for dt, d in filter(None, shapes) if dt == "f32" and len(d) == 3}
    out = list(reads)
    for i, shape in enumerate(shapes):
        if shape and shape[0] == "f8e4m3fn" and len(shape[1]) == 3:
            t, n, k = shape[1]
            groups = next((g for (g, n2), d in scales.items() if n2 == n and d[1] == -(-k // 128) and g < t), None)
            if groups and t % groups == 0:
                out[i] = reads[i] * groups / t
    return out


def kernels(hlo) -> list[tuple[str, str, int, int]]:
    """Every kernel the step runs (HLO text, or step_profile.parse_hlo's result): (instruction, opcode, bytes moved
    over all its runs, runs)."""
    comps, types, entry = parse_hlo(hlo) if isinstance(hlo, str) else hlo

    def read_of(fused: str, i: int) -> float:
        # what a fused computation reads of its parameter i: the slices' outputs if only slices use it
        body = comps.get(fused, [])
        pname = next((x["name"] for x in body if x["opcode"] == "parameter" and x["param"] == i), None)
        users = [x for x in body if pname in x["operands"]]
        if users and all(u["opcode"] in _SLICING and u["operands"][0] == pname for u in users):
            return sum(type_bytes(types[u["name"]]) for u in users)
        return float("inf")

    out = []

    def walk(comp: str, runs: int):
        for ins in comps[comp]:
            if ins["opcode"] == "while" and ins["body"]:
                walk(ins["body"], runs * ins["trip"])
            elif ins["opcode"] == "call" and ins["to_apply"]:
                walk(ins["to_apply"], runs)
            elif ins["opcode"] == "conditional":  # one branch runs: charged the one that moves the most
                taken = []
                for branch in ins["branches"]:
                    before = len(out)
                    walk(branch, runs)
                    taken.append(out[before:])
                    del out[before:]
                out.extend(max(taken, key=lambda ks: sum(k[2] for k in ks), default=[]))
            elif ins["opcode"] not in _NO_KERNEL:
                reads = [type_bytes(types.get(o, "")) for o in ins["operands"]]
                if ins["opcode"] == "fusion" and ins["calls"]:
                    reads = [min(r, read_of(ins["calls"], i)) for i, r in enumerate(reads)]
                if ins["opcode"] == "custom-call":
                    reads = stack_shares([types.get(o, "") for o in ins["operands"]], reads)
                out.append(
                    (ins["name"], ins["opcode"], int(runs * (type_bytes(types[ins["name"]]) + sum(reads))), runs)
                )

    walk(entry, 1)
    return out


def ledger(hlo_text: str):
    """({component: [kernel runs, bytes]}, {component: {kernel kind: [runs, bytes]}})."""
    parsed = parse_hlo(hlo_text)
    index = index_of(parsed)
    per = collections.defaultdict(lambda: [0, 0])
    kinds = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
    for name, opcode, nbytes, runs in kernels(parsed):
        comp = classify(name, index)
        kind = family(name, f"{opcode}:{index[0].get(name, ('', '', None))[2] or name}", index)
        for row in (per[comp], kinds[comp][kind]):
            row[0] += runs
            row[1] += nbytes
    return per, kinds


def gpu_devices(plugin: str, runtime_lib: str, target: str):
    """The one compile-only device of a GPU `target` (TARGETS), through the CUDA PJRT plugin."""
    import ctypes

    from jax._src import xla_bridge
    from jax.experimental import topologies

    from experiments.cuda_stub import load_stub_driver

    for path, flag in ((plugin, "--plugin"), (runtime_lib, "--runtime_lib")):
        if not path or not os.path.exists(path):
            raise SystemExit(f"{flag}={path}: not a file (see this script's docstring for the wheels)")
    load_stub_driver(tempfile.mkdtemp(prefix="step_ledger_"))
    ctypes.CDLL(runtime_lib, mode=ctypes.RTLD_GLOBAL)
    os.environ["MOSAIC_GPU_RUNTIME_LIB_PATH"] = runtime_lib
    xla_bridge.register_plugin("cuda", library_path=plugin)
    topo = topologies.get_topology_desc("", "cuda", target_config=TARGETS[target], topology="1x1x1")
    return list(topo.devices)


def compile_variant(devices, overrides: dict) -> str:
    import copy

    from experiments import aot

    config = copy.deepcopy(FLAGS.config)
    config.train.mtp_lambda = FLAGS.mtp_lambda
    config.model.attention_impl = "xla"  # cuDNN's fused attention needs cuDNN to compile
    for key, value in overrides.items():
        setattr(config.model, key, value)
    return aot.compile_pretrain(config, devices, "")["train_step"].as_text()


def main(argv):
    del argv
    from experiments.bench_util import parse_overrides

    if FLAGS.target not in TARGETS:
        raise SystemExit(f"--target={FLAGS.target}: one of {sorted(TARGETS)}")
    devices = gpu_devices(FLAGS.plugin, FLAGS.runtime_lib, FLAGS.target)
    ledgers = {}
    for spec in FLAGS.variants:
        name, _, sets = spec.partition(":")
        t0 = time.perf_counter()
        text = compile_variant(devices, parse_overrides(sets.replace("+", ",")))
        print(f"{name}: compiled for {devices[0].device_kind} in {time.perf_counter() - t0:.0f} s", flush=True)
        if FLAGS.hlo_out:
            os.makedirs(FLAGS.hlo_out, exist_ok=True)
            with open(os.path.join(FLAGS.hlo_out, f"{name}.hlo"), "w") as f:
                f.write(text)
        ledgers[name] = ledger(text)
    print(format_ledgers(ledgers, FLAGS.components))


def format_ledgers(ledgers: dict, components=()) -> str:
    """One row per component: kernel runs and GB per variant; then the listed components' kernel kinds."""
    names = list(ledgers)
    comps = sorted(
        {c for per, _ in ledgers.values() for c in per}, key=lambda c: -max(p[c][1] for p, _ in ledgers.values())
    )
    head = "| component | " + " | ".join(f"{n} kernels | {n} GB" for n in names) + " |"
    rows = [head, "|---" * (1 + 2 * len(names)) + "|"]
    for c in comps + ["total"]:
        cells = []
        for per, _ in ledgers.values():
            runs, nbytes = [sum(v[i] for v in per.values()) for i in (0, 1)] if c == "total" else per.get(c, [0, 0])
            cells.append(f"{runs} | {nbytes / 1e9:.2f}")
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    for c in components:
        for name, (_, kinds) in ledgers.items():
            top = sorted(kinds.get(c, {}).items(), key=lambda kv: -kv[1][1])[:12]
            rows.append(f"\n{c}, {name}: " + "; ".join(f"{k} x{r} {b / 1e9:.2f} GB" for k, (r, b) in top))
    return "\n".join(rows)


if __name__ == "__main__":
    app.run(main)
