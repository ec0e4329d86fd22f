"""GRPO on a generated verifiable task (multi-digit addition by default): warm start, then GRPO.

  python experiments/grpo.py                                        # tiny model, 2-core CPU, ~8 minutes
  python experiments/grpo.py --config.grpo.steps=50 --config.grpo.beta=0.04 --workdir=runs/grpo_kl
  python experiments/grpo.py --config=experiments/configs/grpo_small.py --workdir=runs/grpo_small   # one GPU
  python experiments/grpo.py --config.init_checkpoint=runs/pretrain --config.sft.steps=100
  python experiments/grpo.py --config=experiments/configs/grpo_small.py --mesh=data:2,expert:2   # 4 GPUs

Prints held-out pass@1 (greedy, fixed problems) after the warm start and after GRPO, and rollout / train
tokens/s. Checkpoints, metrics.jsonl and TensorBoard logs go under --workdir; rerunning with the same --workdir
resumes (a finished warm start is reused). SIGTERM or Ctrl-C saves a checkpoint and exits cleanly.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402
from sharding.mesh import define_mesh_flags, mesh_from_flags  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
with cli.config_errors():
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(_HERE, "configs", "grpo.py"),
        "Experiment config file (ml_collections). Sections: model (a dsjax.ModelConfig preset plus any field), task, "
        "sft (warm start), rollout (prompts, G, temperature, lengths), rewards (name -> weight), grpo (steps, mu, "
        "loss_type, epsilons, beta, truncation masking, dynamic sampling), optim, train. Override any field with "
        "--config.<section>.<field>=value; experiments/configs/grpo.py documents each field.",
        lock_config=True,
    )
flags.DEFINE_string(
    "workdir", "runs/grpo", "Directory for checkpoints, metrics.jsonl and TensorBoard logs; an existing one is resumed."
)
define_mesh_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    mesh = mesh_from_flags()  # before anything touches a device
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint write at INFO
    from dsjax.rl.trainer import train

    train(flags.FLAGS.config, flags.FLAGS.workdir, mesh)


if __name__ == "__main__":
    cli.run(main)
