"""The empty prompt in guidance, on the 2-D mixture of the mechanism test (test_selfe.py), 3 seeds.

    python results/guidance/toy.py        # about 5 minutes on 2 CPU cores; prints a markdown table

Training gives the empty prompt only to rows with s = t (the earlier default), or to any row (null_any_s, now the
default). Sampling with guidance (omega 5, eta 0) asks the unconditional branch at the conditional branch's
(t, s_k) (the earlier default) or at (t, t) (uncond_at_t, now the default). Flow matching is sampled with
s_k = t_{k+1} (as Self-E) and with s = t (what it was trained on).
Score: fraction of samples within 0.4 of a mode of the asked class, at 1, 2, 4 and 50 steps.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from test_selfe import on_right_modes, train_toy  # noqa: E402

ITERS, SEEDS, STEPS = 1500, (0, 1, 2), (1, 2, 4, 50)
OLD, NEW = dict(null_any_s=False), dict(null_any_s=True)  # training: the empty prompt on s = t rows / on any row
S_K, T = dict(cfg=5.0, uncond_at_t=False), dict(cfg=5.0, uncond_at_t=True)  # sampling: uncond at (t, s_k) / (t, t)
ROWS = {  # name: (method, training options, sampler options)
    "Self-E, null on s = t rows, no guidance": ("selfe", OLD, {}),
    "Self-E, null on s = t rows, uncond at (t, s_k) (before)": ("selfe", OLD, S_K),
    "Self-E, null on s = t rows, uncond at (t, t)": ("selfe", OLD, T),
    "Self-E, null at any s, no guidance": ("selfe", NEW, {}),
    "Self-E, null at any s, uncond at (t, s_k)": ("selfe", NEW, S_K),
    "Self-E, null at any s, uncond at (t, t) (now the default)": ("selfe", NEW, T),
    "FM, no guidance, s = t": ("fm", OLD, dict(s_k=1.0)),
    "FM, guidance, s_k = t_{k+1}": ("fm", OLD, S_K),
    "FM, guidance, s = t": ("fm", OLD, dict(S_K, s_k=1.0)),
}

nets = {}
scores = {name: [] for name in ROWS}
for seed in SEEDS:
    for name, (method, train_opts, sampler) in ROWS.items():
        key = (method, tuple(sorted(train_opts.items())), seed)
        if key not in nets:
            nets[key] = train_toy(method, ITERS, seed, **train_opts)
        scores[name].append([on_right_modes(nets[key], k, **sampler) for k in STEPS])
    print(f"seed {seed} done", file=sys.stderr)

print(f"| {ITERS} iterations, eta 0, mean (min-max) of seeds {SEEDS} | " + " | ".join(f"{k} step{'s' * (k > 1)}"
                                                                                   for k in STEPS) + " |")
print("|---" * (len(STEPS) + 1) + "|")
for name, rows in scores.items():
    a = np.array(rows)
    print(f"| {name} | " + " | ".join(f"{m:.3f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in
                                      zip(a.mean(0), a.min(0), a.max(0))) + " |")
