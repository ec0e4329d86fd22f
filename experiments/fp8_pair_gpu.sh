#!/usr/bin/env bash
# One run of the FP8 / BF16 loss comparison on a GPU (experiments/BENCHMARKS.md, "FP8, eighth session" onwards):
# 1,000 steps of `small` on the Python sources of the machine's site-packages (a corpus the run never repeats),
# evaluation at steps 0, 500 and 1000 on 16 fixed batches, metrics every 10 steps.
#
#   bash experiments/fp8_pair_gpu.sh bf16_1
#   bash experiments/fp8_pair_gpu.sh fp8bwg_1 --config.model.fp8=e4m3 --config.model.fp8_wgrad=none
#   python experiments/plot_metrics.py --workdir=runs/fp8_pair/bf16_1,runs/fp8_pair/fp8bwg_1,... --group=bf16,fp8,...
#
# A GPU run is not bitwise deterministic and small's routers amplify the difference: the same BF16 command ran
# twice ends 1.8% apart in training loss (twelfth session), so run each side more than once and compare the
# groups. SITE overrides the corpus root, RUNS (default runs/fp8_pair) holds the workdirs; LIMIT (seconds, default 3600) sends SIGTERM, on which
# the trainer saves a checkpoint and stops; COPY_TO, if set, receives NAME.jsonl and NAME.log.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
NAME=${1:?usage: fp8_pair_gpu.sh NAME [--config.FIELD=VALUE ...]}
shift
# the sessions' corpus: the site-packages holding torch (SITE overrides it)
SITE=${SITE:-$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')}
WORKDIR="${RUNS:-runs/fp8_pair}/$NAME"
mkdir -p "$(dirname "$WORKDIR")"
timeout -s TERM "${LIMIT:-3600}" python3 experiments/pretrain.py --config=experiments/configs/small.py \
  --workdir="$WORKDIR" --config.data.spec="$SITE/**/*.py" --config.train.eval_batches=16 \
  --config.train.steps=1000 --config.train.eval_every=500 --config.train.save_every=1000 \
  --config.train.log_every=10 "$@" 2>&1 | grep -v "^[WI][0-9]\{4\}" | tee "$WORKDIR.log"
if [ -n "${COPY_TO:-}" ]; then
  cp "$WORKDIR/metrics.jsonl" "$COPY_TO/$NAME.jsonl" && cp "$WORKDIR.log" "$COPY_TO/$NAME.log"
fi
