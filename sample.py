"""
Images from a Self-E checkpoint at any number of steps, one model for all of them.

    python sample.py --ckpt out/ckpt.pt --prompt "a photo of a red circle" --steps 2,4,8,50

writes OUT/grid.png (rows: prompts, columns: step counts; the same initial noise in every column) and every single
image as OUT/images/PPP_NN_SSsteps.png. Also used by train.py for its periodic sample grids.
"""
import argparse
import os
import re

import torch
from PIL import Image, ImageDraw, ImageFont

import selfe

# Sampler defaults (METHOD.md section 5): the paper's omega = 5 and eta = 1; s_k = t_{k+1}.
SAMPLER = dict(cfg=5.0, eta=1.0, s_k="next")


def load_checkpoint(path, device="cpu"):
    """-> (EMA model in eval mode, run config). Checkpoints hold only tensors and plain data: weights_only=True."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    model = build_model(cfg, text_dim=ckpt["text_dim"])
    model.load_state_dict(ckpt["ema"])
    return model.to(device).eval(), cfg


def build_model(cfg, text_dim):
    return selfe.DiT(res=cfg["res"], patch=cfg["patch"], text_dim=text_dim, **selfe.MODELS[cfg["model"]])


@torch.no_grad()
def generate(model, text, prompts, steps_list, seed=0, cfg=5.0, eta=1.0, s_k="next", shift=1.0):
    """-> {steps: (P, 3, H, W) images in [-1, 1]}. The initial noise depends on the seed only, not on the steps."""
    device = next(model.parameters()).device
    cond, null = text(prompts), text([""] * len(prompts))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), model.channels, model.res, model.res, generator=gen).to(device)
    out = {}
    for steps in steps_list:
        gen.manual_seed(seed + 1)  # the fresh noise of eta > 0 is the same for every step count too
        x = selfe.sample(model, noise, cond, null, steps=steps, cfg=cfg, eta=eta, s_k=s_k, shift=shift,
                         generator=gen)
        out[steps] = x.float().clamp(-1, 1).cpu()
    return out


def to_pil(x):
    """(3, H, W) in [-1, 1] -> PIL image."""
    return Image.fromarray(((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def save_grid(images, prompts, path, cell=96):
    """images: {steps: (P, 3, H, W)}. One row per prompt (its text on the left), one column per step count."""
    font = ImageFont.load_default()
    cols, label_w, head_h = list(images), 8 + int(max(font.getlength(p) for p in prompts)), 16
    grid = Image.new("RGB", (label_w + cell * len(cols), head_h + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for j, steps in enumerate(cols):
        draw.text((label_w + j * cell + 4, 2), f"{steps} step{'s' * (steps > 1)}", fill="black", font=font)
        for i, x in enumerate(images[steps]):
            grid.paste(to_pil(x).resize((cell, cell), Image.NEAREST), (label_w + j * cell, head_h + i * cell))
    for i, p in enumerate(prompts):
        draw.text((4, head_h + i * cell + cell // 2 - 5), p, fill="black", font=font)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file, one prompt per line")
    p.add_argument("--steps", default="2,4,8,50", help="comma-separated step counts")
    p.add_argument("--cfg", type=float, default=SAMPLER["cfg"], help="guidance scale omega (1 = no guidance)")
    p.add_argument("--eta", type=float, default=SAMPLER["eta"], help="0 = deterministic Euler, 1 = DDPM-like")
    p.add_argument("--s-k", default=SAMPLER["s_k"], help="target time per step: 'next' = t_{k+1}, or f * t_k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--out", default="samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    prompts = list(args.prompt)
    if args.prompts:
        with open(args.prompts) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        p.error("give at least one --prompt or a --prompts file")
    steps_list = [int(s) for s in args.steps.split(",")]
    s_k = args.s_k if args.s_k == "next" else float(args.s_k)

    model, cfg = load_checkpoint(args.ckpt, args.device)
    text = selfe.TextEncoder(cfg["text_encoder"], cfg["text_len"], args.device)
    rows = [pr for pr in prompts for _ in range(args.n)]
    images = generate(model, text, rows, steps_list, args.seed, args.cfg, args.eta, s_k, cfg["shift"])
    save_grid(images, rows, os.path.join(args.out, "grid.png"))
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    for steps, batch in images.items():
        for i, x in enumerate(batch):
            name = f"{i // args.n:03d}_{i % args.n:02d}_{steps}steps_{re.sub(r'[^a-z0-9]+', '-', rows[i].lower())[:40]}"
            to_pil(x).save(os.path.join(args.out, "images", name + ".png"))
    print(f"wrote {os.path.join(args.out, 'grid.png')} and {len(rows) * len(steps_list)} images")


if __name__ == "__main__":
    main()
