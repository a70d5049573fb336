#!/usr/bin/env bash
# The GPU check, in one call of at most 10 minutes: the default GPU training of fm and of selfe,
# each followed by its ShapesEval medium table and grid, then selfe's sampling speed at 1 to 50
# steps (sample.py, 256 images), and a summary table last.
#
#   bash tools/gpu_check.sh --text-encoder DIR [--out DIR] [--budget S]  # on a GPU machine
#   bash tools/gpu_check.sh --tiny [--out DIR]  # the same steps at toy sizes on a CPU (2 minutes)
#   bash tools/gpu_check.sh --pack-encoder DIR  # write a half-precision copy of the default text
#                                               # encoder (46 MB) to DIR, for a machine offline
#
# Python: $PYTHON if set, else python3. Time: everything runs within --budget seconds (default
# 560; run it with a 600 s limit), in phases: fm's training, its evaluation, selfe's training, its
# evaluation, the sampling.
# A training gets its share of the time the phases after it leave (fm 4/9, selfe the rest): at its
# limit it gets SIGTERM, saves its last step and stops, and its evaluation scores that step. The
# budget behind these shares: results/README.md. Each phase's end is printed ("phase ...") and the
# summary says which ran out. Compiled kernels go to TORCHINDUCTOR_CACHE_DIR (default
# ~/.cache/selfe_inductor): selfe reuses fm's graph, and a rerun compiles nothing again.
#
# Everything goes to --out (default gpu_check_out): check.log (all output), fm/ and selfe/ (the
# runs, each with eval/), and report/, the few small files worth keeping (at most 8): summary.md,
# check.log, and per method log.jsonl, the evaluation grid and the last sample grid. report/ is
# written however the check ends.
set -euo pipefail
PY=${PYTHON:-python3}
OUT=gpu_check_out
ENCODER=default
TINY=0
BUDGET=560
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --text-encoder) ENCODER=$2; [ -d "$2" ] && ENCODER=$(realpath "$2"); shift 2 ;;
    --tiny) TINY=1; shift ;;
    --budget) BUDGET=$2; shift 2 ;;
    --pack-encoder)
      cd "$(dirname "$0")/.."  # the repository's root
      "$PY" -c "
import sys, torch
from harness import text_encoder
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
        --sample-every 10)
  SAMPLES=8 EVAL=small
else
  ARGS=(--preset gpu)
  SAMPLES=256 EVAL=medium
fi
ARGS+=(--eval-every 0 --final-eval off)  # the table: a phase of its own, after the training
EVAL_S=30 SAMPLE_S=20  # seconds kept for an evaluation and for the sampling speed
OUT=$(realpath -m "$OUT")
# a rerun replaces an earlier check or an empty folder, nothing else
if [ -e "$OUT" ] && [ ! -f "$OUT/check.log" ] && [ -n "$(ls -A "$OUT" 2>/dev/null || echo x)" ]; then
  echo "error: --out $OUT holds files but no earlier check (check.log); choose another --out" >&2
  exit 2
fi
cd "$(dirname "$0")/.."  # the repository's root
rm -rf "$OUT"
mkdir -p "$OUT/report"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/selfe_inductor}"
DEADLINE=$((SECONDS + BUDGET - 20))  # 20 s kept for the report

# phase NAME LIMIT CMD...: CMD for at most LIMIT seconds (SIGTERM, then SIGKILL 60 s later: a
# training signalled while it compiles saves once the step is built); says how it ended
phase() {
  local name=$1 limit=$2 start=$SECONDS rc=0; shift 2
  if [ "$limit" -lt 10 ]; then echo "phase $name: skipped, no time left"; return 0; fi
  timeout -k 60 "$limit" "$@" || rc=$?
  case $rc in
    0) echo "phase $name: done in $((SECONDS - start)) s" ;;
    124|137) echo "phase $name: ran out of its $limit s" ;;
    *) echo "phase $name: failed (exit $rc) after $((SECONDS - start)) s" ;;
  esac
  echo "$name|$((SECONDS - start))|$rc|$limit" >> "$OUT/phases.txt"
}

check() {
  "$PY" -c "import torch; print('torch', torch.__version__, '|',
            torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  for method in fm selfe; do
    evals=$([ "$method" = fm ] && echo 2 || echo 1)  # the evaluations still to come
    left=$((DEADLINE - SECONDS - evals * EVAL_S - SAMPLE_S))
    phase "$method training" $([ "$method" = fm ] && echo $((left * 4 / 9)) || echo "$left") \
      "$PY" train.py "${ARGS[@]}" --method "$method" --text-encoder "$ENCODER" --out "$OUT/$method"
    if [ -f "$OUT/$method/ckpt.pt" ]; then
      left=$((DEADLINE - SECONDS - (evals - 1) * EVAL_S - SAMPLE_S))
      phase "$method evaluation" $((left < 2 * EVAL_S ? left : 2 * EVAL_S)) \
        "$PY" sample.py --ckpt "$OUT/$method/ckpt.pt" --eval --eval-size "$EVAL" \
        --text-encoder "$ENCODER" --out "$OUT/$method/eval"
    fi
  done
  if [ -f "$OUT/selfe/ckpt.pt" ]; then  # sampling speed: the lines "N steps: ... images/s"
    phase sampling $((DEADLINE - SECONDS)) "$PY" sample.py --ckpt "$OUT/selfe/ckpt.pt" \
      --n "$SAMPLES" --prompt "a photo of a red circle" --steps 1,2,4,8,50 --out "$OUT/sampling"
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
phases = {}  # name -> (seconds, exit status, limit)
for line in read(f"{out}/phases.txt").splitlines():
    name, took, rc, limit = line.split("|")
    phases[name] = (int(took), int(rc), int(limit))
print("| method | ms/step | with fake term | img/s | MFU % | peak mem GB | steps trained "
      "| training min | evaluation min | " + " | ".join(f"{k} steps" for k in STEPS)
      + " |\n|" + "---|" * 13)
scores, ms, peak_ms, walls, mfus, size, notes = {}, {}, {}, {}, {}, "(none)", []
for m in ("fm", "selfe"):
    log = [json.loads(line) for line in read(f"{out}/{m}/log.jsonl").splitlines() if line.strip()]
    timed = [r for r in log if "ms_per_step" in r]
    off = [r for r in timed if not r["aux"]]  # the fake-score term off
    on = [r for r in timed if r["aux"]]
    ms[m], mfus[m] = median(off, "ms_per_step"), 100 * median(off, "mfu")
    peak_ms[m] = ms[m] * mfus[m] / 100  # the step's time at its precisions' peaks
    results = json.loads(read(f"{out}/{m}/eval/results.json") or "{}")
    if results:
        scores[m] = {int(k): r["overall"] for k, r in results["results"].items()}
        size = results["eval_size"]
    trained, evaluated = (phases.get(f"{m} {p}", (math.nan, 0, 0)) for p in ("training",
                                                                            "evaluation"))
    walls[m] = (trained[0] + evaluated[0]) / 60
    for p, (took, rc, limit) in (("training", trained), ("evaluation", evaluated)):
        if rc:
            notes.append(f"{m} {p} " + ("ran out of its %d s" % limit if rc in (124, 137)
                                        else "failed (exit %d)" % rc))
    step = results.get("step", log[-1]["step"] if log else 0)
    mem = max([r["peak_mem_gb"] for r in timed], default=float("nan"))
    cells = [f"{ms[m]:.1f}", f"{median(on, 'ms_per_step'):.1f}", f"{median(off, 'img_per_s'):.0f}",
             f"{mfus[m]:.1f}", f"{mem:.2f}", str(step), f"{trained[0] / 60:.2f}",
             f"{evaluated[0] / 60:.2f}"] + [f"{scores[m][k]:.3f}" if m in scores else "-"
                                            for k in STEPS]
    print(f"| {m} | " + " | ".join(cells) + " |")
print(f"\nShapesEval {size}, Overall, of the last step saved. ms/step, img/s, MFU: medians of the "
      f"training log (compilation, checkpoints and grids left out), the fake-score term off; MFU "
      f"counts each pass at its precision's peak (the judges: TF32). training and evaluation "
      f"min: the phases' wall time.")
rates = [line for line in read(f"{out}/check.log").splitlines() if "images/s" in line]
print("\nselfe's sampling speed (sample.py):\n" + "\n".join(f"- {line}" for line in rates))
print("\nPhases that did not finish: " + ("; ".join(notes) if notes else "none"))
print("\nGoals:")
if set(scores) == {"fm", "selfe"}:
    fm, se = scores["fm"], scores["selfe"]
    goals = [("fm at 50 steps >= 0.6", fm[50], 0.6),
             ("selfe at 2 steps >= 2 x fm at 2", se[2], 2 * fm[2]),
             ("selfe at 2 steps >= 0.9 x fm at 50", se[2], 0.9 * fm[50]),
             ("selfe at 50 steps >= fm at 50 - 0.03", se[50], fm[50] - 0.03),
             ("selfe rising or flat from 2 to 50 steps", se[50], se[2]),
             *((f"{m} training + evaluation <= 3 min", -walls[m], -3.0) for m in ms)]
    if not any(math.isnan(v) for v in peak_ms.values()):  # GPUs whose peaks we know
        predicted = peak_ms["selfe"] / peak_ms["fm"]  # the FLOPs at their precisions
        goals += [(f"selfe / fm step time <= 1.1 x {predicted:.2f}, the FLOPs' prediction",
                   -ms["selfe"] / ms["fm"], -1.1 * predicted),  # lower is better
                  *((f"{m} MFU >= 35 %", mfus[m], 35.0) for m in mfus)]
    for name, a, b in goals:
        print(f"- {name}: {abs(a):.3f} against {abs(b):.3f}: {'met' if a >= b else 'MISSED'}")
else:
    print("- incomplete, no verdict: the phases above say which part stopped")
EOF
}

trap report EXIT
check 2>&1 | tee "$OUT/check.log"
