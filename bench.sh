#!/usr/bin/env bash
# Speed table in one go: the training step for fm and selfe with torch.compile off and on, then sampling speed.
#   bash bench.sh                 # the GPU preset
#   PRESET=cpu ROUNDS=9 bash bench.sh   # the CPU preset (compile off only, as the preset trains); a noisy
#                                       # machine needs several rounds: the ratio printed is their median
# Extra arguments go to every train.py call, e.g. bash bench.sh --batch-size 128.
set -euo pipefail
PRESET=${PRESET:-gpu}
ROUNDS=${ROUNDS:-1}
CKPT_DIR=$(mktemp -d)
trap 'rm -rf "$CKPT_DIR"' EXIT
ms() { echo "$1" | awk -F'|' '{split($2, f, " "); print f[1]}'; }  # "bench: fm | 199.8 ms/step | ..." -> 199.8
median() { tr ' ' '\n' | sed '/^$/d' | sort -n | awk '{r[NR] = $1} END {print (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2}'; }
compiles="--no-compile --compile"
[ "$PRESET" = cpu ] && compiles="--no-compile"
for compile in $compiles; do
  ratios=""
  for _ in $(seq "$ROUNDS"); do  # fm and selfe alternate, so a slow spell of the machine hits both
    fm=$(python train.py --bench --preset "$PRESET" --method fm "$compile" "$@" | tail -1)
    se=$(python train.py --bench --preset "$PRESET" --method selfe "$compile" "$@" | tail -1)
    printf '%s\n%s\n' "$fm" "$se"
    ratios="$ratios $(awk -v a="$(ms "$fm")" -v b="$(ms "$se")" 'BEGIN {printf "%.2f", b / a}')"
  done
  echo "selfe / fm step time ($compile): $ratios; median $(echo "$ratios" | median)"
done
# sampling speed does not depend on the weights: one step of training makes a checkpoint of the right shape
python train.py --preset "$PRESET" --iters 1 --out "$CKPT_DIR/run" --sample-every 100000 --eval-every 0 --final-eval off "$@" \
  > /dev/null 2>&1
python sample.py --ckpt "$CKPT_DIR/run/ckpt.pt" --bench --n "$([ "$PRESET" = gpu ] && echo 256 || echo 64)" \
  --steps 1,2,4,8,50
