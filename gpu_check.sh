#!/usr/bin/env bash
# The GPU check, in one run: the step bench of fm and selfe at the GPU preset (compile on), then the default GPU
# training of fm and of selfe, each ending with its ShapesEval medium table and grid, and a summary table last.
#
#   bash gpu_check.sh --text-encoder DIR [--out DIR]  # on a GPU machine (about 9 minutes on one H100, by FLOPs)
#   bash gpu_check.sh --tiny [--out DIR]              # the same steps at toy sizes on a CPU (about a minute)
#   bash gpu_check.sh --pack-encoder DIR              # write a half-precision copy of the default text encoder
#                                                     # (46 MB) to DIR, for a machine with no network
#
# Everything goes to --out (default gpu_check_out): check.log (all output), fm/ and selfe/ (the runs), and report/,
# the few small files worth keeping (8): summary.md, check.log, and per method log.jsonl, the evaluation
# grid and the last sample grid.
set -euo pipefail
OUT=gpu_check_out
ENCODER=default
TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --text-encoder) ENCODER=$2; [ -d "$2" ] && ENCODER=$(realpath "$2"); shift 2 ;;
    --tiny) TINY=1; shift ;;
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
if [ "$TINY" = 1 ]; then  # the CPU preset, shrunk: every step of the check in a couple of minutes
  ARGS=(--preset cpu --iters 20 --batch-size 8 --res 16 --eval-every 10 --sample-every 10 --final-eval small)
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
export TORCHINDUCTOR_CACHE_DIR="$OUT/inductor_cache"  # the bench's compiled graphs are reused by the training runs

check() {
  python3 -c "import torch; print('torch', torch.__version__, '|',
             torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  for method in fm selfe; do
    python3 bench.py "${ARGS[@]}" --method "$method" --text-encoder "$ENCODER" | tee "$OUT/bench_$method.txt"
  done
  for method in fm selfe; do
    start=$SECONDS
    python3 train.py "${ARGS[@]}" --method "$method" --text-encoder "$ENCODER" --out "$OUT/$method"
    echo $((SECONDS - start)) > "$OUT/$method/wall_s.txt"
    cp "$OUT/$method/log.jsonl" "$OUT/report/${method}_log.jsonl"
    cp "$OUT/$method/eval/grid.png" "$OUT/report/${method}_eval_grid.png"
    last=$(ls "$OUT/$method/samples" | tail -1)
    cp "$OUT/$method/samples/$last" "$OUT/report/${method}_samples.png"
  done
  summary
}

summary() {
  python3 - "$OUT" <<'EOF' | tee "$OUT/report/summary.md"
import json, re, sys
out = sys.argv[1]
print("| method | ms/step | img/s | MFU % | peak mem | train + eval | " + " | ".join(f"{k} steps" for k in (2, 4, 8, 50))
      + " |\n|---|---|---|---|---|---|---|---|---|---|")
scores, ms, walls, mfus = {}, {}, {}, {}
for m in ("fm", "selfe"):
    walls[m] = float(open(f"{out}/{m}/wall_s.txt").read()) / 60
    bench = next(line for line in open(f"{out}/bench_{m}.txt") if line.startswith("bench:"))
    ms[m] = float(re.search(r"([\d.]+) ms/step", bench).group(1))
    img_s = re.search(r"([\d.]+) img/s", bench).group(1)
    mfu = re.search(r"MFU ([\d.]+)%", bench)
    if mfu:
        mfus[m] = float(mfu.group(1))
    mem = re.search(r"peak mem ([\d.]+ GB)", bench).group(1)
    res = json.load(open(f"{out}/{m}/eval/results.json"))
    scores[m] = {int(k): r["overall"] for k, r in res["results"].items()}
    print(f"| {m} | {ms[m]:.1f} | {img_s} | {mfus.get(m, '-')} | {mem} | {walls[m]:.1f} min | "
          + " | ".join(f"{scores[m][k]:.3f}" for k in (2, 4, 8, 50)) + " |")
fm, se = scores["fm"], scores["selfe"]
print(f"\nShapesEval {res['eval_size']}, Overall; the step bench at tau = 1, fake term off. Goals:")
ratio = ms["selfe"] / ms["fm"]
goals = [("fm at 50 steps >= 0.6", fm[50], 0.6), ("selfe at 2 steps >= 2 x fm at 2", se[2], 2 * fm[2]),
         ("selfe at 2 steps >= 0.9 x fm at 50", se[2], 0.9 * fm[50]),
         ("selfe at 50 steps >= fm at 50 - 0.03", se[50], fm[50] - 0.03),
         ("selfe rising or flat from 2 to 50 steps", se[50], se[2]),
         ("selfe / fm step time <= 1.4", -ratio, -1.4),  # negated: lower is better
         *((f"{m} training + evaluation <= 3 min", -walls[m], -3.0) for m in ms),
         *((f"{m} MFU >= 35 %", mfus[m], 35.0) for m in mfus)]
for name, a, b in goals:
    print(f"- {name}: {abs(a):.3f} against {abs(b):.3f}: {'met' if a >= b else 'MISSED'}")
EOF
}

check 2>&1 | tee "$OUT/check.log"
cp "$OUT/check.log" "$OUT/report/check.log"
