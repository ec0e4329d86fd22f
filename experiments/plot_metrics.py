"""Draw a run's curves from <workdir>/metrics.jsonl to a PNG.

python experiments/plot_metrics.py --workdir=runs/pretrain             # -> runs/pretrain/metrics.png
python experiments/plot_metrics.py --workdir=runs/a,runs/b --out=cmp.png --keys=loss,eval/bits_per_byte

With several runs it also prints, per metric, each run's last value and its mean over the last --window records,
relative to the first run's (e.g. an FP8 run against its BF16 twin of the same seed and data).
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
flags.DEFINE_integer("window", 10, "Records averaged at the end of each run for the comparison table.")
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


def compare(runs: dict, keys, window: int) -> str:
    """A markdown table: per key and run, the last value and the mean of the last `window` records, with their
    relative difference to the first run (which must have the key)."""
    names = list(runs)
    lines = [f"| metric | run | last (step) | vs first | mean of last {window} | vs first |", "|---" * 6 + "|"]
    for key in keys:
        if key not in runs[names[0]]:
            continue
        base = None
        for name in names:
            s = runs[name].get(key)
            if not s:
                continue
            steps = sorted(s)
            last, mean = s[steps[-1]], sum(s[i] for i in steps[-window:]) / len(steps[-window:])
            base = base or (last, mean)
            rel = [f"{v / b - 1:+.2%}" if b else "n/a" for v, b in zip((last, mean), base)]
            lines.append(f"| {key} | {name} | {last:.4g} ({steps[-1]}) | {rel[0]} | {mean:.4g} | {rel[1]} |")
    return "\n".join(lines)


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
    if len(runs) > 1:
        print(compare(runs, keys, FLAGS.window))


if __name__ == "__main__":
    app.run(main)
