"""
How far do Self-E's two self-evaluation terms move the regression target? (selfe.selfe_loss.)

On a jump row (s < t) the target is energy_renorm(x0, x0_hat - delta, lam) (Eqs. 14, 19). With
delta = 0 it is T0, the data's own target; the *pull* |T0 - x0_hat| is how far the data move the
jump. The *push* |T - T0| is how far delta moves the target, for the two deltas of the loss:
  classifier  G_u - G_c         (Sec. 3.2: the model's own classifier score)
  fake score  G_fake - G_c      (appendix: the model's estimate under "<prompt> fake image",
                                 which learns the mean of its own jumps, against the real one)
The mix a run trains with is k * classifier + (1 - k) * fake score. x0_hat comes from the online
weights, G_c from the EMA, G_u and G_fake from the online weights, as in training. Per-row norms,
means over n training scenes, at fixed (t, s); every prompt kept.

    OMP_NUM_THREADS=1 python results/push_pull.py CKPT [CKPT ...]   # from the repository's root

About a minute per checkpoint on one core at --n 256.
"""
import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import selfe  # noqa: E402
from harness import shapes  # noqa: E402
from harness.checkpoints import load_both  # noqa: E402
from harness.text_encoder import TextEncoder  # noqa: E402

PAIRS = ((0.999, 0.5), (0.999, 0.25), (0.8, 0.4), (0.5, 0.25), (0.5, 0.001))  # (t, s)


def norm(x):
    return x.flatten(1).norm(dim=1)  # (B,)


@torch.no_grad()
def push_pull(path, n, seed):
    """-> [(t, s, lam, pull, classifier push / pull, fake push / pull, cosine of the deltas)]."""
    cfg, net, ema = load_both(path)
    text = TextEncoder(cfg["text_encoder"], cfg["text_len"])
    images, captions = shapes.TrainingData(cfg["res"]).batch(n, np.random.default_rng(seed))
    x0 = shapes.to_model(images)  # (n, 3, res, res)
    cond, null = text(captions), text([""] * n)
    fake = text(selfe.fake_prompts(captions))
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t_, s_ in PAIRS:
        t, s = torch.full((n,), t_), torch.full((n,), s_)
        x_t = selfe.add_noise(x0, t, torch.randn(x0.shape, generator=gen))
        x0_hat = selfe.G(net, x_t, t, s, cond)  # Eq. 6
        x_s = selfe.add_noise(x0_hat, s, torch.randn(x0.shape, generator=gen))
        G_c = selfe.G(ema, x_s, s, s, cond)
        d_cls = selfe.G(net, x_s, s, s, null) - G_c
        d_fake = selfe.G(net, x_s, s, s, fake) - G_c
        lam = selfe.lambda_st(t, s)
        T0 = selfe.energy_renorm(x0, x0_hat, lam)  # Eq. 19 with delta = 0
        pull = norm(T0 - x0_hat)
        push = [norm(selfe.energy_renorm(x0, x0_hat - d, lam) - T0) / pull for d in (d_cls, d_fake)]
        cos = torch.nn.functional.cosine_similarity(d_cls.flatten(1), d_fake.flatten(1), dim=1)
        rows.append((t_, s_, lam[0].item(), pull.mean().item(), push[0].mean().item(),
                     push[1].mean().item(), cos.mean().item()))
    return cfg, rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("ckpts", nargs="+")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"# push and pull, {datetime.date.today()}, torch {torch.__version__}, n {args.n}\n")
    print("| ckpt | k, aux-start | (t, s) | lam | pull | classifier push / pull "
          "| fake push / pull | cos(classifier, fake) |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.ckpts:
        cfg, rows = push_pull(path, args.n, args.seed)
        run = f"{cfg.get('k', 0.9)}, {cfg['aux_start']}"
        for t, s, lam, pull, pc, pf, cos in rows:
            print(f"| {path} | {run} | ({t}, {s}) | {lam:.2f} | {pull:.3f} | {pc:.3f} | {pf:.3f} "
                  f"| {cos:.2f} |", flush=True)


if __name__ == "__main__":
    main()
