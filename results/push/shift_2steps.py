# 2-step ShapesEval (medium) with the sampling grid shifted (results/README.md), not project code.
# From the repository root: PYTHONPATH=. python results/push/shift_2steps.py SELFE_CKPT FM_CKPT OUT.json 1,0.7,0.5,0.33
# Shift k puts the 2-step grid's middle time at k / (1 + k); each method keeps its default sampler otherwise.
import json
import sys

import selfe
from common import SAMPLERS, load_checkpoint, shapes_eval

out = {}
for method, path in [("selfe", sys.argv[1]), ("fm", sys.argv[2])]:
    model, cfg, step = load_checkpoint(path)
    text = selfe.TextEncoder(cfg["text_encoder"], cfg["text_len"], "cpu")
    for k in [float(a) for a in sys.argv[4].split(",")]:
        res, _, _ = shapes_eval(model, text, [2], "medium", progress=False, shift=k, **SAMPLERS[method])
        out[f"{method} k={k}"] = res[2]
        print(method, f"k={k} middle t={float(selfe.time_grid(2, k)[1]):.3f}", f"{res[2]['overall']:.3f}",
              f"{res[2]['fd']:.1f}", flush=True)
json.dump(out, open(sys.argv[3], "w"), indent=1)
