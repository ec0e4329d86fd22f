"""Draw a run's curves from <workdir>/metrics.jsonl to a PNG.

python experiments/plot_metrics.py --workdir=runs/pretrain             # -> runs/pretrain/metrics.png
python experiments/plot_metrics.py --workdir=runs/a,runs/b --out=cmp.png --keys=loss,eval/bits_per_byte

python experiments/plot_metrics.py --workdir=a.jsonl,b.jsonl,c.jsonl,d.jsonl --group=bf16,bf16,fp8,fp8 --until=980

With several runs it also prints, per metric, each run's last value and its mean over the last --window records,
relative to the first run's (e.g. an FP8 run against its BF16 twin of the same seed and data). With --group, runs of
one group (repeats of one command: GPU runs are not bitwise deterministic, and an MoE run's routers amplify that)
share a colour, and a second table gives each group's mean of those end-of-run means, the spread between its runs,
the gap to the first group and that gap's standard error: a difference between groups means something only next to
the spread within them.
"""

import json
import os
import statistics
import sys

from absl import app, flags

flags.DEFINE_list(
    "workdir",
    ["runs/pretrain"],
    "One or more run directories (their metrics.jsonl is read) or metrics .jsonl files; several are drawn on the "
    "same axes for comparison.",
)
flags.DEFINE_list("group", [], "A group name per --workdir entry (e.g. bf16,bf16,fp8,fp8): repeats of one command.")
flags.DEFINE_integer("until", -1, "Ignore records past this step (e.g. where the shortest run stopped); -1: none.")
flags.DEFINE_string("out", "", "PNG path (default: <first workdir>/metrics.png).")
flags.DEFINE_list(
    "keys",
    ["loss", "loss/mtp", "eval/bits_per_byte", "grad_norm", "lr", "tokens_per_sec", "expert_load/max_over_mean"],
    "Metrics to draw, one panel each; 'eval/NAME' reads the evaluation records, others the training "
    "records. Keys a run does not have are skipped.",
)
flags.DEFINE_integer("window", 10, "Records averaged at the end of each run for the comparison table.")
FLAGS = flags.FLAGS


def read(workdir, until=-1):
    path = workdir if workdir.endswith(".jsonl") else os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--workdir {workdir}: no {path}")
    series = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if 0 <= until < rec["step"]:
                continue
            prefix = "" if rec.get("split") == "train" else f"{rec.get('split')}/"
            for k, v in rec.items():
                if k not in ("step", "split", "time") and isinstance(v, (int, float)):
                    series.setdefault(prefix + k, {})[rec["step"]] = v  # a resumed run overwrites repeated steps
    return series


def end_mean(series: dict, window: int, key: str = "") -> float:
    """The mean of the last `window` records; of an eval/ key's last one (evaluations are sparse: a window of them
    would reach back to step 0)."""
    steps = sorted(series)[-(1 if key.startswith("eval/") else window) :]
    return sum(series[i] for i in steps) / len(steps)


def compare_groups(runs: dict, groups: list, keys, window: int) -> str:
    """A markdown table: per key and group, the mean over the group's runs of their end-of-run means, the spread
    of those means (max - min, relative to the group's mean), the gap to the first group's mean and that gap's
    standard error (Welch's: sqrt(s1^2/n1 + s2^2/n2) over the runs' means, relative to the first group's mean; it
    needs two runs in both groups). A gap is resolved only where it is several standard errors wide."""
    order = list(dict.fromkeys(groups))
    lines = [
        f"| metric | group | runs | mean of last {window} (eval: last), over runs | spread in group | vs {order[0]} "
        "| std. error of the gap |"
    ]
    lines.append("|---" * 7 + "|")
    for key in keys:
        base = None
        for g in order:
            means = [end_mean(s[key], window, key) for s, gg in zip(runs.values(), groups) if gg == g and s.get(key)]
            if not means:
                continue
            mean = statistics.fmean(means)
            var_n = statistics.variance(means) / len(means) if len(means) > 1 else None
            if base is None:
                base, base_var_n, se = mean, var_n, ""
            else:
                known = var_n is not None and base_var_n is not None and base
                se = f"{(var_n + base_var_n) ** 0.5 / base:.2%}" if known else "n/a"
            spread = f"{(max(means) - min(means)) / mean:.2%}" if len(means) > 1 and mean else "n/a"
            gap = f"{mean / base - 1:+.2%}" if base else "n/a"  # e.g. a "skipped" count of 0 in the first group
            lines.append(f"| {key} | {g} | {len(means)} | {mean:.4g} | {spread} | {gap} | {se} |")
    return "\n".join(lines)


def compare(runs: dict, keys, window: int) -> str:
    """A markdown table: per key and run, the last value and the mean of the last `window` records, with their
    relative difference to the first run (which must have the key)."""
    names = list(runs)
    lines = [
        f"| metric | run | last (step) | vs first | mean of last {window} (eval: last) | vs first |",
        "|---" * 6 + "|",
    ]
    for key in keys:
        if key not in runs[names[0]]:
            continue
        base = None
        for name in names:
            s = runs[name].get(key)
            if not s:
                continue
            steps = sorted(s)
            last, mean = s[steps[-1]], end_mean(s, window, key)
            base = base or (last, mean)
            rel = [f"{v / b - 1:+.2%}" if b else "n/a" for v, b in zip((last, mean), base)]
            lines.append(f"| {key} | {name} | {last:.4g} ({steps[-1]}) | {rel[0]} | {mean:.4g} | {rel[1]} |")
    return "\n".join(lines)


def main(argv):
    del argv
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(set(FLAGS.workdir)) != len(FLAGS.workdir):
        sys.exit(f"--workdir names a run twice: {FLAGS.workdir}")
    if FLAGS.group and len(FLAGS.group) != len(FLAGS.workdir):
        sys.exit(f"--group names {len(FLAGS.group)} groups for {len(FLAGS.workdir)} --workdir entries: give one each")
    runs = {w: read(w, FLAGS.until) for w in FLAGS.workdir}
    groups = FLAGS.group or list(FLAGS.workdir)
    colours = {g: f"C{i}" for i, g in enumerate(dict.fromkeys(groups))}
    keys = [k for k in FLAGS.keys if any(k in s for s in runs.values())]
    if not keys:
        sys.exit(f"none of --keys {FLAGS.keys} is in the runs' metrics")
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.6 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for (w, s), g in zip(runs.items(), groups):
            if key in s:
                steps = sorted(s[key])
                ax.plot(
                    steps,
                    [s[key][i] for i in steps],
                    marker="o" if key.startswith("eval/") else None,
                    markersize=3,
                    color=colours[g],
                    linestyle="-" if groups.index(g) == list(runs).index(w) else "--",
                    linewidth=1,
                    label=os.path.basename(os.path.normpath(w)).removesuffix(".jsonl"),
                )
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    axes[-1, 0].set_xlabel("step")
    first = FLAGS.workdir[0]
    out = FLAGS.out or os.path.join(os.path.dirname(first) if first.endswith(".jsonl") else first, "metrics.png")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    if len(runs) > 1:
        print(compare(runs, keys, FLAGS.window))
    if FLAGS.group:
        print(compare_groups(runs, groups, keys, FLAGS.window))


if __name__ == "__main__":
    app.run(main)
