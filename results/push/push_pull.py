# Push against pull (results/README.md, "why Self-E's 2-step lead stays small"), not project code.
# From the repository root: PYTHONPATH=. python results/push/push_pull.py CKPT
# For 256 training scenes and fixed (t, s): T0 = the Eq. 19 target with the self-evaluation difference left out,
# T = the target with it. pull = |T0 - x0_hat| (where the data term moves the jump), push = |T - T0| (how far the
# difference G_u - G_c moves the target); both are per-sample norms over C x H x W, averaged over the scenes.
import sys

import numpy as np
import torch

import selfe
from common import load_checkpoint
from data import ShapesData

torch.manual_seed(0)
model, cfg, step = load_checkpoint(sys.argv[1])
text = selfe.TextEncoder(cfg["text_encoder"], cfg["text_len"], "cpu")
x0, caps = ShapesData(32).batch(256, np.random.default_rng(0))
cond, null = text(caps), text([""] * 256)
norm = lambda a: a.flatten(1).norm(dim=1).mean()  # noqa: E731
print("step", step)
for tv, sv in [(0.999, 0.5), (0.999, 0.25), (0.5, 0.001), (0.5, 0.1), (0.5, 0.25), (0.8, 0.4), (0.3, 0.1)]:
    t, s = torch.full((256,), tv), torch.full((256,), sv)
    with torch.no_grad():
        x0_hat = selfe.G(model, selfe.add_noise(x0, t, torch.randn_like(x0)), t, s, cond)
        xs_hat, G_c, G_u = selfe.self_evaluate(model, x0_hat, s, cond, null)
        lam = selfe.lambda_st(t, s)
        T, T0 = selfe.energy_renorm(x0, x0_hat - (G_u - G_c), lam), selfe.energy_renorm(x0, x0_hat, lam)
    pull, push = norm(T0 - x0_hat), norm(T - T0)
    print(f"t={tv} s={sv} lam={lam[0]:.2f} |G_u-G_c|={norm(G_u - G_c):.3f} pull={pull:.3f} push={push:.3f} "
          f"push/pull={push / pull:.3f}")
