#!/usr/bin/env bash
# The GPU check, in one call of at most 10 minutes: the step bench of selfe at the GPU preset (compile on; the
# fake-score term off, then on: it builds every graph both methods train with), then the default GPU training of
# fm and of selfe, each ending with its ShapesEval medium table and grid, and a summary table last.
#
#   bash gpu_check.sh --text-encoder DIR [--out DIR] [--budget S]  # on a GPU machine
#   bash gpu_check.sh --tiny [--out DIR]              # the same steps at toy sizes on a CPU (about 2 minutes)
#   bash gpu_check.sh --pack-encoder DIR              # write a half-precision copy of the default text encoder
#                                                     # (46 MB) to DIR, for a machine with no network
#
# Time: everything runs within --budget seconds (default 480; README estimates each part), so the report comes
# back from a 10-minute call even when a part runs long. The bench gets at most a third of the time, fm 4/9 of what
# is left then, selfe the rest; at its limit a part gets SIGTERM: a training run saves its checkpoint and stops (its
# final evaluation too), and the summary says where. Compiled kernels go to TORCHINDUCTOR_CACHE_DIR (default
# ~/.cache/selfe_inductor), outside --out: the training runs load the bench's graphs, and a rerun on the same
# machine compiles nothing again.
#
# Everything goes to --out (default gpu_check_out): check.log (all output, the bench's lines too), fm/ and selfe/
# (the runs), and report/, the few small files worth keeping (at most 8): summary.md, check.log, and per method
# log.jsonl, the evaluation grid and the last sample grid. report/ is written however the check ends.
set -euo pipefail
OUT=gpu_check_out
ENCODER=default
TINY=0
BUDGET=480
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --text-encoder) ENCODER=$2; [ -d "$2" ] && ENCODER=$(realpath "$2"); shift 2 ;;
    --tiny) TINY=1; shift ;;
    --budget) BUDGET=$2; shift 2 ;;
    --pack-encoder)
      cd "$(dirname "$0")"
      python3 -c "
import sys, torch, selfe
from transformers import AutoModel, AutoTokenizer
path = selfe.resolve_text_encoder('default')
AutoTokenizer.from_pretrained(path).save_pretrained(sys.argv[1])
AutoModel.from_pretrained(path, dtype=torch.float16).save_pretrained(sys.argv[1])
print('wrote', sys.argv[1])" "$(realpath -m "$2")"
      exit 0 ;;
    *) echo "error: unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done
if [ "$TINY" = 1 ]; then  # the CPU preset, shrunk, with the GPU preset's fake-score term: every step of the check
  ARGS=(--preset cpu --iters 20 --batch-size 8 --res 16 --aux-start 0.77 --log-every 5 --eval-every 10
        --sample-every 10 --final-eval small)
else
  ARGS=(--preset gpu)
fi
OUT=$(realpath -m "$OUT")
if [ -e "$OUT" ] && [ ! -f "$OUT/check.log" ]; then  # a rerun replaces an earlier check, nothing else
  echo "error: --out $OUT exists and holds no earlier check (check.log); choose another --out" >&2
  exit 2
fi
cd "$(dirname "$0")"
rm -rf "$OUT"
mkdir -p "$OUT/report"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/selfe_inductor}"
DEADLINE=$((SECONDS + BUDGET - 20))  # 20 s kept for the report

# limited SECONDS CMD...: run CMD for at most SECONDS (SIGTERM, then SIGKILL 20 s later); note where it stopped
limited() {
  local limit=$1; shift
  if [ "$limit" -lt 10 ]; then echo "skipped, no time left: $*"; return 0; fi
  local rc=0
  timeout -k 20 "$limit" "$@" || rc=$?
  if [ "$rc" != 0 ]; then echo "stopped by the time limit ($limit s) or failed (exit $rc): $*"; fi
  return 0
}

check() {
  python3 -c "import torch; print('torch', torch.__version__, '|',
             torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  left=$((DEADLINE - SECONDS))
  limited $((left / 3)) python3 bench.py "${ARGS[@]}" --method selfe --text-encoder "$ENCODER"
  for method in fm selfe; do
    left=$((DEADLINE - SECONDS))
    start=$SECONDS
    limited $([ "$method" = fm ] && echo $((left * 4 / 9)) || echo "$left") python3 train.py "${ARGS[@]}" \
      --method "$method" --text-encoder "$ENCODER" --out "$OUT/$method"
    if [ -d "$OUT/$method" ]; then echo $((SECONDS - start)) > "$OUT/$method/wall_s.txt"; fi
  done
}

report() {
  for method in fm selfe; do
    cp "$OUT/$method/log.jsonl" "$OUT/report/${method}_log.jsonl" 2>/dev/null || true
    cp "$OUT/$method/eval/grid.png" "$OUT/report/${method}_eval_grid.png" 2>/dev/null || true
    last=$(ls "$OUT/$method/samples" 2>/dev/null | tail -1)
    if [ -n "$last" ]; then cp "$OUT/$method/samples/$last" "$OUT/report/${method}_samples.png"; fi
  done
  summary | tee "$OUT/report/summary.md"
  cp "$OUT/check.log" "$OUT/report/check.log" 2>/dev/null || true
}

summary() {
  python3 - "$OUT" <<'EOF'
import json, math, os, statistics, sys
out = sys.argv[1]


def read(path):
    return open(path).read() if os.path.exists(path) else ""


def median(records, key):
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else float("nan")


print("| method | ms/step | with fake term | img/s | MFU % | peak mem GB | last logged step | training min | final eval min "
      "| wall min | " + " | ".join(f"{k} steps" for k in (2, 4, 8, 50)) + " |\n|" + "---|" * 14)
scores, ms, walls, mfus, size = {}, {}, {}, {}, "(none)"
for m in ("fm", "selfe"):
    log = [json.loads(line) for line in read(f"{out}/{m}/log.jsonl").splitlines() if line.strip()]
    timed = [r for r in log if "ms_per_step" in r]
    off, on = [r for r in timed if not r["aux"]], [r for r in timed if r["aux"]]  # the fake-score term
    ms[m], mfus[m] = median(off, "ms_per_step"), 100 * median(off, "mfu")
    prev, train_min = 0, 0.0
    for r in timed:  # each record's speed over the steps since the previous one
        train_min += (r["step"] - prev) * r["ms_per_step"] / 60000
        prev = r["step"]
    final = next((r for r in log if "final_overall" in r), None)
    if final:
        scores[m], size = {int(k): v for k, v in final["final_overall"].items()}, final["final_eval"]
    walls[m] = float(read(f"{out}/{m}/wall_s.txt") or "nan") / 60
    print(f"| {m} | {ms[m]:.1f} | {median(on, 'ms_per_step'):.1f} | {median(off, 'img_per_s'):.0f} | {mfus[m]:.1f} | "
          f"{max([r['peak_mem_gb'] for r in timed], default=float('nan')):.2f} | {prev} | {train_min:.2f} | "
          f"{final['seconds'] / 60 if final else float('nan'):.2f} | {walls[m]:.2f} | "
          + " | ".join(f"{scores[m][k]:.3f}" if m in scores else "-" for k in (2, 4, 8, 50)) + " |")
print(f"\nShapesEval {size}, Overall. ms/step, img/s, MFU: medians of the training log (compilation, checkpoints, "
      f"grids and evaluations left out), the fake-score term off; training min: the log's speed over its steps; "
      f"wall: the whole train.py call. The bench's lines are in check.log. Goals:")
if set(scores) == {"fm", "selfe"}:
    fm, se = scores["fm"], scores["selfe"]
    goals = [("fm at 50 steps >= 0.6", fm[50], 0.6), ("selfe at 2 steps >= 2 x fm at 2", se[2], 2 * fm[2]),
             ("selfe at 2 steps >= 0.9 x fm at 50", se[2], 0.9 * fm[50]),
             ("selfe at 50 steps >= fm at 50 - 0.03", se[50], fm[50] - 0.03),
             ("selfe rising or flat from 2 to 50 steps", se[50], se[2]),
             ("selfe / fm step time <= 1.4", -ms["selfe"] / ms["fm"], -1.4),  # negated: lower is better
             *((f"{m} training + evaluation <= 3 min", -walls[m], -3.0) for m in ms),
             *((f"{m} MFU >= 35 %", mfus[m], 35.0) for m in mfus if not math.isnan(mfus[m]))]  # known GPUs only
    for name, a, b in goals:
        print(f"- {name}: {abs(a):.3f} against {abs(b):.3f}: {'met' if a >= b else 'MISSED'}")
else:
    print("- incomplete, no verdict: check.log says which part stopped")
EOF
}

trap report EXIT
check 2>&1 | tee "$OUT/check.log"
