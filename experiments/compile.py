"""Plan a TPU pod run from any host: compile the real step for a TPU slice that is not there, and say if it fits.

  python experiments/compile.py --topology=v5p:2x2x1 --mesh=data:2,expert:2 --dump_hlo=/tmp/hlo
  python experiments/compile.py --config=experiments/configs/deepseek_v3_pod.py --topology=v5p:8x8x8 \\
      --mesh=fsdp:64,expert:8
  python experiments/compile.py --job=grpo --config=experiments/configs/grpo.py --topology=v5p:2x2x1 --mesh=data:4
  python experiments/compile.py --job=generate --topology=v5e:4x4 --mesh=fsdp:16 --batch=64 --context=4096

`jax.experimental.topologies` describes the slice's devices (libtpu provides the TPU compiler and Mosaic TPU, also on
a CPU-only host: `pip install "jax[tpu]==<your jax version>"`). The mesh is laid over those devices, every "auto"
knob is resolved for them (dsjax/runtime.py: splash attention and the Mosaic TPU kernels, as the pod would run), and
the job's own jitted step is lowered with the shardings its trainer uses and compiled:
  pretrain   the pretraining train step (dsjax/train/trainer.py) on one global batch of the config
  grpo       the GRPO update (dsjax/rl/trainer.py) on one rollout batch of the config
  generate   the generation engine's prefill of --batch prompts of --prompt_len tokens and its decode loop
             (dsjax/generate.py) over a paged latent cache of --context positions per row
Prints per-chip arguments / temporaries / outputs / total against the chip's HBM, the compile time and the
collectives of one step (count and bytes). Exit status 0 when it fits, 3 when it does not, 2 for a usage error
(libtpu missing, a bad topology or mesh).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.libtpu_env import set_compile_only_defaults  # noqa: E402

set_compile_only_defaults()  # before JAX starts: libtpu compiles, the host stays the CPU

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dsjax.errors import UserError  # noqa: E402
from experiments import cli  # noqa: E402
from experiments.aot import JOBS  # noqa: E402

with cli.config_errors():
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Experiment config file (ml_collections), as pretrain.py / grpo.py take it; default "
        "experiments/configs/tiny.py (pretrain, generate) or grpo.py (grpo). Override fields with --config.<x>=.",
        lock_config=True,
    )
flags.DEFINE_string("topology", "v5p:2x2x1", "TPU slice to compile for: any get_topology_desc name (v5p:8x8x8, ...)")
flags.DEFINE_string("mesh", "", "Mesh over the slice's chips, as the training scripts take it (data:2,expert:2)")
flags.DEFINE_enum("job", "pretrain", list(JOBS), "Which step to compile.")
flags.DEFINE_string("dump_hlo", "", "Write the optimized HLO text of the compiled step(s) into this directory.")
flags.DEFINE_integer("batch", 64, "--job=generate: sequences decoded together.")
flags.DEFINE_integer("context", 4096, "--job=generate: positions per sequence the paged cache holds (prompt + new).")
flags.DEFINE_integer("prompt_len", 128, "--job=generate: prompt bucket prefilled in one call; the rest is decoded.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {argv[1:]}")
    from experiments import aot

    config = FLAGS.config if FLAGS.config is not None else aot.default_config(FLAGS.job)
    devices = aot.topology_devices(FLAGS.topology)
    t0 = time.time()
    compiled = aot.compile_job(
        FLAGS.job, config, devices, FLAGS.mesh, batch=FLAGS.batch, context=FLAGS.context, prompt_len=FLAGS.prompt_len
    )
    seconds = time.time() - t0
    fits = aot.report(compiled, devices[0].device_kind, seconds, FLAGS.dump_hlo)
    raise SystemExit(0 if fits else 3)


if __name__ == "__main__":
    cli.run(main)
