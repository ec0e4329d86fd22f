"""Device meshes from a flag (`--mesh=data:2,expert:4`) and multi-host start-up.

Every mesh has the four axes data, fsdp, expert, tensor (unnamed ones have size 1), in that order: tensor is
innermost so tensor-parallel collectives stay on the fastest links (NVLink, neighbouring TPU chips) and data
outermost so only gradient reductions cross hosts. All axes are `Auto` (GSPMD propagation plus logical
sharding constraints); the MoE layer switches to manual collectives itself (dsjax/layers/moe_parallel.py).

Scripts call `define_mesh_flags()` at import and `mesh_from_flags()` in main (after absl parsed the flags).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the axes a batch is split over (see rules.py)


def parse_mesh_flag(flag: str) -> dict[str, int]:
    """ "data:2,expert:4" -> {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}. One size may be -1 (the rest of
    the devices); an empty flag means {"data": -1}."""
    sizes = dict.fromkeys(AXES, 1)
    items = [s.strip() for s in (flag or "data:-1").split(",") if s.strip()]
    seen = set()
    for item in items:
        name, sep, size = item.partition(":")
        name = name.strip()
        if not sep or name not in AXES:
            raise ValueError(f"--mesh={flag!r}: {item!r} is not AXIS:SIZE with AXIS one of {AXES}")
        if name in seen:
            raise ValueError(f"--mesh={flag!r}: axis {name!r} is given twice")
        seen.add(name)
        try:
            sizes[name] = int(size)
        except ValueError:
            raise ValueError(f"--mesh={flag!r}: size {size!r} of axis {name!r} is not an integer") from None
        if sizes[name] < 1 and sizes[name] != -1:
            raise ValueError(f"--mesh={flag!r}: axis {name!r} has size {sizes[name]}; sizes are >= 1 (or -1)")
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"--mesh={flag!r}: only one axis may be -1")
    return sizes


def make_mesh(sizes: dict[str, int] | str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: every device of every process), which it must use exactly."""
    if isinstance(sizes, str):
        sizes = parse_mesh_flag(sizes)
    sizes = {**dict.fromkeys(AXES, 1), **sizes}
    devices = list(jax.devices() if devices is None else devices)
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if len(devices) % fixed:
            raise ValueError(f"mesh {sizes}: the other axes ({fixed} devices) do not divide {len(devices)} devices")
        sizes = {k: len(devices) // fixed if v == -1 else v for k, v in sizes.items()}
    shape = tuple(sizes[a] for a in AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh {describe(sizes)} needs {math.prod(shape)} devices but {len(devices)} are "
            "available; name the sizes so that they multiply to the device count (or use -1)"
        )
    types = (AxisType.Auto,) * len(AXES)  # jax.make_mesh defaults to Explicit axes, which shard_map rejects here
    if devices == list(jax.devices()):  # topology-aware order (ICI/NVLink rings, hosts outermost)
        return jax.make_mesh(shape, AXES, axis_types=types)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=types)  # a subset (benchmarks): as given


def describe(mesh_or_sizes) -> str:
    sizes = dict(mesh_or_sizes.shape) if isinstance(mesh_or_sizes, Mesh) else mesh_or_sizes
    named = [f"{a}:{sizes[a]}" for a in AXES if sizes.get(a, 1) != 1]
    return ",".join(named) or "data:1"


def initialize_distributed(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, auto: bool = False
) -> None:
    """Joins a multi-process run before any device is touched.

    With a coordinator address (GPU clusters without a scheduler jax knows, or the localhost test) every process
    passes the same address and process count and its own id. With `auto`, jax detects the cluster (TPU pod
    slices, SLURM, Open MPI). Neither: a single-process run, nothing to do.
    """
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < "
                f"num_processes (got {num_processes}, {process_id})"
            )
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
    elif auto:
        jax.distributed.initialize()


def define_mesh_flags() -> None:
    """The absl flags every training script shares: --mesh plus the multi-host start-up flags."""
    from absl import flags

    caller = sys._getframe(1).f_globals.get("__name__")  # list them under the script's own --help
    kw = {"module_name": sys.argv[0] if caller == "__main__" else caller}
    flags.DEFINE_string(
        "mesh",
        "",
        "Device mesh as AXIS:SIZE pairs over the axes data, fsdp, expert, tensor, e.g. "
        "'data:2,expert:4'; unnamed axes have size 1 and one size may be -1 (the remaining devices). Empty: every "
        "device of every process on the data axis (pure data parallelism). The batch is split over data x fsdp x "
        "expert; fsdp also splits parameters and optimizer state, expert splits the routed experts, tensor splits "
        "attention heads and MLP width (sharding/rules.py has the table).",
        **kw,
    )
    flags.DEFINE_string(
        "coordinator_address",
        "",
        "host:port of process 0 for a multi-process run without a "
        "cluster scheduler jax detects (GPU clusters, localhost tests); every process passes the "
        "same value, --num_processes and its own --process_id.",
        **kw,
    )
    flags.DEFINE_integer("num_processes", 0, "Number of processes (with --coordinator_address).", **kw)
    flags.DEFINE_integer(
        "process_id", -1, "This process's index in [0, num_processes) (with --coordinator_address).", **kw
    )
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize() with cluster auto-detection (TPU pod "
        "slices, SLURM, Open MPI) before building the mesh.",
        **kw,
    )


def mesh_from_flags() -> Mesh:
    """Initialises multi-host jax if the flags ask for it, then builds the --mesh mesh over all devices."""
    from absl import flags

    f = flags.FLAGS
    initialize_distributed(f.coordinator_address, f.num_processes, f.process_id, f.distributed)
    return make_mesh(f.mesh)
