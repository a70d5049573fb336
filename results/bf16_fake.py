"""
Does bf16 autocast keep the fake-score correction G_fake - G_c? (selfe.selfe_loss, jump rows.)

The judges G_c and G_u run in float32 (bf16_fidelity.py: bf16 scrambles G_u - G_c). The fake-score
pass carries gradient and runs under autocast; this compares G_fake - G_c with G_fake from bf16
against all float32, on one batch of training scenes, at (t, s = f t): median cosine, its 5th
percentile, the share of rows below 0.99, and |G_fake - G_c| / |x0_hat|. Use a checkpoint whose
fake-score term was on (the cpu preset's).

    OMP_NUM_THREADS=1 python results/bf16_fake.py CKPT   # from the repository's root
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import selfe  # noqa: E402
from harness import shapes  # noqa: E402
from harness.checkpoints import load_both  # noqa: E402
from harness.text_encoder import TextEncoder  # noqa: E402

CELLS = ((0.95, 0.5), (0.8, 0.5), (0.6, 0.5), (0.4, 0.5), (0.95, 0.1), (0.6, 0.9))  # (t, f)


@torch.no_grad()
def main(path, n=256):
    torch.set_num_threads(1)
    cfg, net, ema = load_both(path)
    text = TextEncoder(cfg["text_encoder"], cfg["text_len"])
    images, captions = shapes.TrainingData(cfg["res"]).batch(n, np.random.default_rng(0))
    x0, cond, fake = shapes.to_model(images), text(captions), text(selfe.fake_prompts(captions))
    gen = torch.Generator().manual_seed(0)
    print("| t | s / t | median cosine | p5 | share < 0.99 | \\|G_fake - G_c\\| / \\|x0_hat\\| |")
    print("|---|---|---|---|---|---|")
    for t_, f in CELLS:
        t = torch.full((n,), t_)
        s = t * f
        x0_hat = selfe.G(net, selfe.add_noise(x0, t, torch.randn(x0.shape, generator=gen)), t, s,
                         cond)
        x_s = selfe.add_noise(x0_hat, s, torch.randn(x0.shape, generator=gen))
        G_c = selfe.G(ema, x_s, s, s, cond)
        d32 = selfe.G(net, x_s, s, s, fake) - G_c
        with torch.autocast("cpu", torch.bfloat16):
            d16 = selfe.G(net, x_s, s, s, fake).float() - G_c
        cos = torch.nn.functional.cosine_similarity(d16.flatten(1).double(),
                                                    d32.flatten(1).double(), dim=1)
        size = d32.flatten(1).norm(dim=1) / x0_hat.flatten(1).norm(dim=1)
        print(f"| {t_} | {f} | {cos.median():.4f} | {torch.quantile(cos, 0.05):.4f} | "
              f"{(cos < 0.99).double().mean():.2f} | {size.median():.4f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
