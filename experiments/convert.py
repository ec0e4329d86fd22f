"""Convert DeepSeek-V3/R1 weights between Hugging Face safetensors and dsjax's Orbax checkpoints, streaming.

  # the released FP8 checkpoint (163 shards, 641 GB) -> bf16 Orbax, chunked for a 64-device mesh
  python experiments/convert.py --to=orbax --hf_dir=/models/DeepSeek-V3 --out=/ckpt/v3 --mesh=fsdp:8,expert:8
  # a trained model (pretraining workdir, step dir, or converted checkpoint) -> HF, FP8 like the release
  python experiments/convert.py --to=hf --checkpoint=runs/pretrain --out=/models/mine --fp8 --verify

Memory stays at about one unit (a layer of one parameter, or one routed expert of it) plus a bounded write
buffer, never the whole model; progress lines give GB/s and the ETA. Output goes to a temporary directory next to
--out and is renamed into place only when complete. The Orbax output is read by
`experiments/generate.py --checkpoint=OUT`, `experiments/grpo.py --config.init_checkpoint=OUT` and
`dsjax.train.checkpoint_io.load_for_inference(OUT, mesh=...)`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from dsjax.errors import UserError  # noqa: E402
from experiments import cli  # noqa: E402

flags.DEFINE_enum("to", None, ["orbax", "hf"], "Direction: 'orbax' reads --hf_dir, 'hf' reads --checkpoint.")
flags.DEFINE_string(
    "hf_dir",
    None,
    "With --to=orbax: HF directory (config.json + safetensors: one file, or shards "
    "with model.safetensors.index.json; bf16, float32, or FP8 e4m3 with 128x128 weight_scale_inv "
    "block scales, which are applied on the way in).",
)
flags.DEFINE_string(
    "checkpoint",
    None,
    "With --to=hf: an Orbax checkpoint: what --to=orbax wrote, a pretraining "
    "--workdir (its latest step), or one step's directory.",
)
flags.DEFINE_string("out", None, "Output directory. Must not exist (or be empty) unless --overwrite.")
flags.DEFINE_enum(
    "dtype",
    "bfloat16",
    ["bfloat16", "float32"],
    "Stored dtype of the output weights (the router's "
    "weight and correction bias stay float32). float32 for a checkpoint to keep training from.",
)
flags.DEFINE_string(
    "mesh",
    "",
    "With --to=orbax: the device mesh the checkpoint will be restored onto, as "
    "AXIS:SIZE pairs over data, fsdp, expert, tensor (e.g. 'fsdp:8,expert:8'; sizes explicit). Each "
    "parameter is chunked by its per-device shard under sharding/rules.py, so every device reads "
    "only its own chunks. Empty: one device.",
)
flags.DEFINE_bool(
    "fp8",
    False,
    "With --to=hf: write the weights the release stores in FP8 (attention projections, "
    "dense MLPs, routed and shared experts) as float8_e4m3fn with float32 128x128 block scales "
    "(`<name>_scale_inv`), and add quantization_config to config.json.",
)
flags.DEFINE_float("max_shard_gb", 4.0, "With --to=hf: safetensors shard size bound in GB (10^9 bytes).")
flags.DEFINE_bool(
    "allow_pickle",
    False,
    "Accept pickled PyTorch files (*.bin, *.pt) as input, read with "
    "torch.load(weights_only=True). Refused by default: unpickling can run code.",
)
flags.DEFINE_bool("overwrite", False, "Replace an existing --out (atomically, once the new one is complete).")
flags.DEFINE_bool(
    "verify",
    False,
    "After converting, run a few prompts through transformers (CPU, float32) on the "
    "HF side and dsjax on the Orbax side and print the logit gap. Skipped, with a message, for models "
    "that do not fit in host memory.",
)
flags.DEFINE_integer("verify_prompts", 3, "Number of prompts for --verify.")
flags.DEFINE_float("progress_every", 10.0, "Seconds between progress lines.")

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.to or not FLAGS.out:
        raise app.UsageError("give --to=orbax|hf and --out")
    try:
        run()
    except (FileExistsError, FileNotFoundError) as e:  # bad paths: nothing was left at --out
        raise UserError(str(e)) from None


def run():
    from dsjax.convert import stream
    from dsjax.convert.verify import verify

    if FLAGS.to == "orbax":
        if not FLAGS.hf_dir or FLAGS.checkpoint or FLAGS.fp8:
            raise app.UsageError("--to=orbax reads --hf_dir (not --checkpoint) and has no --fp8")
        stats = stream.hf_to_orbax(
            FLAGS.hf_dir,
            FLAGS.out,
            FLAGS.dtype,
            FLAGS.mesh,
            FLAGS.allow_pickle,
            FLAGS.overwrite,
            every=FLAGS.progress_every,
        )
        hf_dir, ckpt = FLAGS.hf_dir, FLAGS.out
    else:
        if not FLAGS.checkpoint or FLAGS.hf_dir or FLAGS.mesh:
            raise app.UsageError("--to=hf reads --checkpoint (not --hf_dir) and has no --mesh")
        stats = stream.orbax_to_hf(
            FLAGS.checkpoint,
            FLAGS.out,
            FLAGS.dtype,
            FLAGS.fp8,
            int(FLAGS.max_shard_gb * 1e9),
            FLAGS.overwrite,
            every=FLAGS.progress_every,
        )
        hf_dir, ckpt = FLAGS.out, FLAGS.checkpoint
    print(
        f"wrote {FLAGS.out}: {stats['bytes'] / 1e9:.3f} GB {'read' if FLAGS.to == 'orbax' else 'written'} in "
        f"{stats['seconds']:.1f}s ({stats['gb_per_s']:.3f} GB/s)"
    )
    if FLAGS.verify:
        verify(hf_dir, ckpt, FLAGS.allow_pickle, FLAGS.verify_prompts)


if __name__ == "__main__":
    cli.run(main)
