#!/usr/bin/env bash
# The GPU check, in one call of at most 10 minutes: the default GPU training of fm and of selfe,
# each ending with its ShapesEval medium table and grid, then selfe's sampling speed at 1 to 50
# steps (sample.py, 256 images), and a summary table last.
#
#   bash gpu_check.sh --text-encoder DIR [--out DIR] [--budget S]  # on a GPU machine
#   bash gpu_check.sh --tiny [--out DIR]       # the same steps at toy sizes on a CPU (2 minutes)
#   bash gpu_check.sh --pack-encoder DIR       # write a half-precision copy of the default text
#                                              # encoder (46 MB) to DIR, for a machine offline
#
# Python: $PYTHON if set, else python3. Time: everything runs within --budget seconds (default
# 480), so the report comes back from a 10-minute call even when a part runs long: fm gets 4/9 of
# the time, selfe what is left but 40 s, the sampling the rest. At its limit a part gets SIGTERM:
# a training run saves its checkpoint and stops (its final evaluation too), and the summary says
# where. Compiled kernels go to TORCHINDUCTOR_CACHE_DIR (default ~/.cache/selfe_inductor), so a
# rerun on the same machine compiles nothing again.
#
# Everything goes to --out (default gpu_check_out): check.log (all output), fm/ and selfe/ (the
# runs), and report/, the few small files worth keeping (at most 8): summary.md, check.log, and per
# method log.jsonl, the evaluation grid and the last sample grid. report/ is written however the
# check ends.
set -euo pipefail
PY=${PYTHON:-python3}
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
      "$PY" -c "
import sys, torch, text_encoder
from transformers import AutoModel, AutoTokenizer
path = text_encoder.resolve_text_encoder('default')
AutoTokenizer.from_pretrained(path).save_pretrained(sys.argv[1])
AutoModel.from_pretrained(path, dtype=torch.float16).save_pretrained(sys.argv[1])
print('wrote', sys.argv[1])" "$(realpath -m "$2")"
      exit 0 ;;
    *) echo "error: unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done
if [ "$TINY" = 1 ]; then  # the CPU preset, shrunk, with the GPU preset's fake-score term
  ARGS=(--preset cpu --iters 20 --batch-size 8 --res 16 --aux-start 0.77 --log-every 5
        --eval-every 10 --sample-every 10 --final-eval small)
  SAMPLES=8
else
  ARGS=(--preset gpu)
  SAMPLES=256
fi
OUT=$(realpath -m "$OUT")
# a rerun replaces an earlier check or an empty folder, nothing else
if [ -e "$OUT" ] && [ ! -f "$OUT/check.log" ] && [ -n "$(ls -A "$OUT" 2>/dev/null || echo x)" ]; then
  echo "error: --out $OUT holds files but no earlier check (check.log); choose another --out" >&2
  exit 2
fi
cd "$(dirname "$0")"
rm -rf "$OUT"
mkdir -p "$OUT/report"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/selfe_inductor}"
DEADLINE=$((SECONDS + BUDGET - 20))  # 20 s kept for the report

# limited SECONDS CMD...: run CMD for at most SECONDS (SIGTERM, then SIGKILL 20 s later); say so
limited() {
  local limit=$1; shift
  if [ "$limit" -lt 10 ]; then echo "skipped, no time left: $*"; return 0; fi
  local rc=0
  timeout -k 20 "$limit" "$@" || rc=$?
  if [ "$rc" != 0 ]; then echo "stopped by the time limit ($limit s) or failed (exit $rc): $*"; fi
  return 0
}

check() {
  "$PY" -c "import torch; print('torch', torch.__version__, '|',
            torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  for method in fm selfe; do
    left=$((DEADLINE - SECONDS))
    start=$SECONDS
    limited $([ "$method" = fm ] && echo $((left * 4 / 9)) || echo $((left - 40))) "$PY" train.py \
      "${ARGS[@]}" --method "$method" --text-encoder "$ENCODER" --out "$OUT/$method"
    if [ -d "$OUT/$method" ]; then echo $((SECONDS - start)) > "$OUT/$method/wall_s.txt"; fi
  done
  if [ -f "$OUT/selfe/ckpt.pt" ]; then  # sampling speed: the lines "N steps: ... images/s"
    limited $((DEADLINE - SECONDS)) "$PY" sample.py --ckpt "$OUT/selfe/ckpt.pt" --n "$SAMPLES" \
      --prompt "a photo of a red circle" --steps 1,2,4,8,50 --out "$OUT/sampling"
  fi
}

report() {
  for method in fm selfe; do
    cp "$OUT/$method/log.jsonl" "$OUT/report/${method}_log.jsonl" 2>/dev/null || true
    cp "$OUT/$method/eval/grid.png" "$OUT/report/${method}_eval_grid.png" 2>/dev/null || true
    last=$(ls "$OUT/$method/samples" 2>/dev/null | tail -1 || true)  # none: the run never began
    if [ -n "$last" ]; then cp "$OUT/$method/samples/$last" "$OUT/report/${method}_samples.png"; fi
  done
  summary | tee "$OUT/report/summary.md"
  cp "$OUT/check.log" "$OUT/report/check.log" 2>/dev/null || true
}

summary() {
  "$PY" - "$OUT" <<'EOF'
import json, math, os, statistics, sys
out = sys.argv[1]


def read(path):
    return open(path).read() if os.path.exists(path) else ""


def median(records, key):
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else float("nan")


STEPS = (2, 4, 8, 50)
print("| method | ms/step | with fake term | img/s | MFU % | peak mem GB | last logged step "
      "| training min | final eval min | wall min | " + " | ".join(f"{k} steps" for k in STEPS)
      + " |\n|" + "---|" * 14)
scores, ms, walls, mfus, size = {}, {}, {}, {}, "(none)"
for m in ("fm", "selfe"):
    log = [json.loads(line) for line in read(f"{out}/{m}/log.jsonl").splitlines() if line.strip()]
    timed = [r for r in log if "ms_per_step" in r]
    off = [r for r in timed if not r["aux"]]  # the fake-score term off
    on = [r for r in timed if r["aux"]]
    ms[m], mfus[m] = median(off, "ms_per_step"), 100 * median(off, "mfu")
    prev, train_min = 0, 0.0
    for r in timed:  # each record's speed over the steps since the previous one
        train_min += (r["step"] - prev) * r["ms_per_step"] / 60000
        prev = r["step"]
    final = next((r for r in log if "final_overall" in r), None)
    if final:
        scores[m] = {int(k): v for k, v in final["final_overall"].items()}
        size = final["final_eval"]
    walls[m] = float(read(f"{out}/{m}/wall_s.txt") or "nan") / 60
    mem = max([r["peak_mem_gb"] for r in timed], default=float("nan"))
    eval_min = final["seconds"] / 60 if final else float("nan")
    cells = [f"{ms[m]:.1f}", f"{median(on, 'ms_per_step'):.1f}", f"{median(off, 'img_per_s'):.0f}",
             f"{mfus[m]:.1f}", f"{mem:.2f}", str(prev), f"{train_min:.2f}", f"{eval_min:.2f}",
             f"{walls[m]:.2f}"] + [f"{scores[m][k]:.3f}" if m in scores else "-" for k in STEPS]
    print(f"| {m} | " + " | ".join(cells) + " |")
print(f"\nShapesEval {size}, Overall. ms/step, img/s, MFU: medians of the training log "
      f"(compilation, checkpoints, grids and evaluations left out), the fake-score term off; "
      f"training min: the log's speed over its steps; wall: the whole train.py call.")
rates = [line for line in read(f"{out}/check.log").splitlines() if "images/s" in line]
print("\nselfe's sampling speed (sample.py):\n" + "\n".join(f"- {line}" for line in rates))
print("\nGoals:")
if set(scores) == {"fm", "selfe"}:
    fm, se = scores["fm"], scores["selfe"]
    goals = [("fm at 50 steps >= 0.6", fm[50], 0.6),
             ("selfe at 2 steps >= 2 x fm at 2", se[2], 2 * fm[2]),
             ("selfe at 2 steps >= 0.9 x fm at 50", se[2], 0.9 * fm[50]),
             ("selfe at 50 steps >= fm at 50 - 0.03", se[50], fm[50] - 0.03),
             ("selfe rising or flat from 2 to 50 steps", se[50], se[2]),
             ("selfe / fm step time <= 1.4", -ms["selfe"] / ms["fm"], -1.4),  # lower is better
             *((f"{m} training + evaluation <= 3 min", -walls[m], -3.0) for m in ms),
             *((f"{m} MFU >= 35 %", mfus[m], 35.0)  # GPUs whose peak we know
               for m in mfus if not math.isnan(mfus[m]))]
    for name, a, b in goals:
        print(f"- {name}: {abs(a):.3f} against {abs(b):.3f}: {'met' if a >= b else 'MISSED'}")
else:
    print("- incomplete, no verdict: check.log says which part stopped")
EOF
}

trap report EXIT
check 2>&1 | tee "$OUT/check.log"
