"""Draw a run's curves from <workdir>/metrics.jsonl to a PNG.

python experiments/plot_metrics.py --workdir=runs/pretrain             # -> runs/pretrain/metrics.png
python experiments/plot_metrics.py --workdir=runs/a,runs/b --out=cmp.png --keys=loss,eval/bits_per_byte
"""

import json
import os
import sys

from absl import app, flags

flags.DEFINE_list(
    "workdir",
    ["runs/pretrain"],
    "One or more run directories (their metrics.jsonl is read); several are drawn on the same axes for comparison.",
)
flags.DEFINE_string("out", "", "PNG path (default: <first workdir>/metrics.png).")
flags.DEFINE_list(
    "keys",
    ["loss", "loss/mtp", "eval/bits_per_byte", "grad_norm", "lr", "tokens_per_sec", "expert_load/max_over_mean"],
    "Metrics to draw, one panel each; 'eval/NAME' reads the evaluation records, others the training "
    "records. Keys a run does not have are skipped.",
)
FLAGS = flags.FLAGS


def read(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--workdir {workdir}: no metrics.jsonl")
    series = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            prefix = "" if rec.get("split") == "train" else f"{rec.get('split')}/"
            for k, v in rec.items():
                if k not in ("step", "split", "time") and isinstance(v, (int, float)):
                    series.setdefault(prefix + k, {})[rec["step"]] = v  # a resumed run overwrites repeated steps
    return series


def main(argv):
    del argv
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {w: read(w) for w in FLAGS.workdir}
    keys = [k for k in FLAGS.keys if any(k in s for s in runs.values())]
    if not keys:
        sys.exit(f"none of --keys {FLAGS.keys} is in the runs' metrics")
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.6 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for w, s in runs.items():
            if key in s:
                steps = sorted(s[key])
                ax.plot(
                    steps,
                    [s[key][i] for i in steps],
                    marker="o" if key.startswith("eval/") else None,
                    markersize=3,
                    label=os.path.basename(os.path.normpath(w)),
                )
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    axes[-1, 0].set_xlabel("step")
    out = FLAGS.out or os.path.join(FLAGS.workdir[0], "metrics.png")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
