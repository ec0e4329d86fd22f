"""Pretrain a DeepSeek-V3-style model. The project's main job.

  python experiments/pretrain.py                                   # tiny model on the Python stdlib, CPU
  python experiments/pretrain.py --config=experiments/configs/small.py --workdir=runs/small   # one GPU
  python experiments/pretrain.py --config.train.steps=200 --config.data.spec='jsonl:data/*.jsonl:text'
  python experiments/pretrain.py --config=experiments/configs/small.py --mesh=data:2,expert:4   # 8 GPUs, EP 4
  python experiments/pretrain.py --mesh=data:2 --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0

Checkpoints, metrics.jsonl and TensorBoard logs go under --workdir; rerunning with the same --workdir resumes
from its latest checkpoint. SIGTERM or Ctrl-C saves a checkpoint and exits cleanly.
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
        os.path.join(_HERE, "configs", "tiny.py"),
        "Experiment config file (ml_collections). Sections: model (a dsjax.ModelConfig preset plus any of its "
        "fields, e.g. num_hidden_layers, dtype, remat), data (spec, eval_spec, tokenizer, seq_len, batch_size), "
        "optim (lr, warmup_steps, schedule, betas, weight_decay, clip_norm), train (steps, grad_accum, mtp_lambda, "
        "balance_alpha, bias_gamma, log/eval/save intervals, keep, seed). Override any field with "
        "--config.<section>.<field>=value; experiments/configs/tiny.py documents each field.",
        lock_config=True,
    )
flags.DEFINE_string(
    "workdir",
    "runs/pretrain",
    "Directory for checkpoints, metrics.jsonl and TensorBoard logs; "
    "an existing one is resumed from its latest checkpoint.",
)
define_mesh_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    mesh = mesh_from_flags()  # before anything touches a device: multi-host start-up happens here
    from dsjax.train.trainer import train

    train(flags.FLAGS.config, flags.FLAGS.workdir, mesh)


if __name__ == "__main__":
    cli.run(main)
