#!/usr/bin/env bash
# Speed table in one go: the training step for fm and selfe with torch.compile off and on, then sampling speed.
#   bash bench.sh                 # the GPU preset (compile matters on CUDA only; on a CPU both rows are eager)
#   PRESET=cpu bash bench.sh      # the CPU preset
# Extra arguments go to every train.py call, e.g. bash bench.sh --batch-size 128.
set -euo pipefail
PRESET=${PRESET:-gpu}
CKPT_DIR=$(mktemp -d)
trap 'rm -rf "$CKPT_DIR"' EXIT
for compile in --no-compile --compile; do
  for method in fm selfe; do
    python train.py --bench --preset "$PRESET" --method "$method" "$compile" "$@"
  done
done
# sampling speed does not depend on the weights: one step of training makes a checkpoint of the right shape
python train.py --preset "$PRESET" --iters 1 --out "$CKPT_DIR/run" --sample-every 100000 --eval-every 0 "$@" \
  > /dev/null 2>&1
python sample.py --ckpt "$CKPT_DIR/run/ckpt.pt" --bench --n "$([ "$PRESET" = gpu ] && echo 256 || echo 64)" \
  --steps 1,2,4,8,50
