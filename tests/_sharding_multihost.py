"""One process of the 2-process localhost pretraining test (tests/test_sharding.py), wired exactly as a training
script would be: the shared mesh flags, then train() on the global mesh. Prints `LOSSES {step: loss}`, the
gathered per-process data states, then `RESUMED {4: loss}` after resuming to step 4."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from sharding.mesh import define_mesh_flags, mesh_from_flags  # noqa: E402

flags.DEFINE_string("workdir", "", "Shared checkpoint directory.")
flags.DEFINE_string("corpus", "", "Text glob to train on.")
define_mesh_flags()


def main(_):
    mesh = mesh_from_flags()
    from dsjax.train.trainer import train
    from experiments.configs import tiny

    c = tiny.get_config()
    c.model.num_hidden_layers, c.model.first_k_dense_replace = 1, 0  # one MoE layer: the expert-parallel path
    c.model.num_nextn_predict_layers = 0
    c.train.mtp_lambda = 0.0
    c.data.spec, c.data.seq_len, c.data.batch_size = flags.FLAGS.corpus, 32, 8
    c.train.update(dict(steps=3, log_every=1, eval_every=3, eval_batches=1, save_every=3, tensorboard=False))
    summary = train(c, flags.FLAGS.workdir, mesh)
    print("LOSSES " + json.dumps(summary["train_losses"]), flush=True)
    import jax

    from dsjax.train.trainer import gather_data_states

    print("GATHER " + json.dumps(gather_data_states({"p": jax.process_index()})), flush=True)
    c.train.steps = 4  # resume from step 3: each process restores its own data-iterator position
    summary = train(c, flags.FLAGS.workdir, mesh)
    print("RESUMED " + json.dumps(summary["train_losses"]), flush=True)


if __name__ == "__main__":
    app.run(main)
