"""
Images from a Self-E checkpoint at any number of steps: one model for all of them.

    python sample.py --ckpt out/ckpt.pt --prompt "a photo of a red circle" --steps 2,4,8,50

writes OUT/grid.png (a row per image, a column per step count, the same initial noise in every
column), every image as OUT/images/PPP_NN_SSsteps_PROMPT.png, and prints how long each step count
took (images per second: the sampling speed).

    python sample.py --ckpt out/ckpt.pt --eval --eval-size small

scores the checkpoint on ShapesEval, our GenEval over the shapes world (shapes.py): the evaluation
set at every step count from the same initial noise, judged image by image; prints a table like the
paper's and writes OUT/results.json and OUT/grid.png.
Bad input (a missing checkpoint, --steps 0, a negative --cfg, ...) is one line and exit code 2.
"""
import argparse
import os
import re
import time

import torch
from PIL import Image

import selfe
import shapes
from cli import InputError, Parser, check_writable, run_cli
from model import TextEncoder, generate, load_checkpoint


def parse_steps(text):
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise InputError(f"--steps {text!r}: give whole numbers separated by commas, e.g. "
                         f"2,4,8,50") from None
    if min(steps) < 1:
        raise InputError(f"--steps {text!r}: every step count must be at least 1")
    return steps


def parse_args():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--eval", action="store_true", help="score the checkpoint on ShapesEval")
    p.add_argument("--eval-size", choices=list(shapes.EVAL_SIZES), default="small",
                   help="prompts per category x 4 images: small 96, medium 384, full 2208 images "
                        "per step count")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file, one prompt per line")
    p.add_argument("--steps", default="2,4,8,50", help="comma-separated step counts")
    # sampler flags: left out, the checkpoint's method picks them (selfe.SAMPLERS)
    p.add_argument("--cfg", type=float, help="guidance scale omega (1 = no guidance; default 5)")
    p.add_argument("--eta", type=float, help="0 = deterministic Euler (default), 1 = DDPM-like")
    p.add_argument("--s-k", help="target time per step: 'next' = t_{k+1} (Self-E's default), or "
                                 "f * t_k (flow matching's default: 1, i.e. s = t)")
    p.add_argument("--uncond-at-t", action=argparse.BooleanOptionalAction,
                   help="guidance asks the empty prompt at (t, t) (default) or, "
                        "--no-uncond-at-t, at the conditional branch's (t, s_k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--out", default="samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.cfg is not None and args.cfg < 0:
        raise InputError(f"--cfg {args.cfg}: the guidance scale must be >= 0 (1 = no guidance)")
    if args.eta is not None and not 0 <= args.eta <= 1:
        raise InputError(f"--eta {args.eta}: must lie in [0, 1]")
    if args.n < 1:
        raise InputError(f"--n {args.n}: must be at least 1")
    try:
        args.s_k = args.s_k if args.s_k in (None, "next") else float(args.s_k)
    except ValueError:
        raise InputError(f"--s-k {args.s_k!r}: 'next' or a number in (0, 1]") from None
    return args


def main():
    args = parse_args()
    prompts = list(args.prompt)
    if args.prompts:
        try:
            with open(args.prompts) as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise InputError(f"--prompts {args.prompts!r}: {e.strerror}") from None
    if not prompts and not args.eval:
        raise InputError("give at least one --prompt or a --prompts file, or --eval")
    steps_list = parse_steps(args.steps)
    model, cfg, step = load_checkpoint(args.ckpt, args.device)
    text = TextEncoder(cfg["text_encoder"], cfg["text_len"], args.device)
    check_writable(args.out)  # after every input is read: bad input leaves no folder behind
    given = dict(cfg=args.cfg, eta=args.eta, s_k=args.s_k, uncond_at_t=args.uncond_at_t)
    sampler = {**selfe.SAMPLERS[cfg["method"]], **{k: v for k, v in given.items() if v is not None},
               "shift": cfg["shift"]}
    if args.eval:
        def draw(prompts, seed):
            return generate(model, text, prompts, steps_list, seed, **sampler)
        info = {"ckpt": args.ckpt, "step": step, "method": cfg["method"], "sampler": sampler}
        results = shapes.report(draw, model.res, args.eval_size, args.out, info, args.seed)
        print(shapes.markdown_table({f"{k} steps": r for k, r in results.items()}, "steps"))
        print(f"wrote {os.path.join(args.out, 'results.json')} and grid.png")
        return
    rows = [pr for pr in prompts for _ in range(args.n)]
    text(rows + [""])  # encoded before the clock starts
    images = {}
    for steps in steps_list:  # one step count at a time, to time each
        t0 = time.perf_counter()
        images.update(generate(model, text, rows, [steps], args.seed, **sampler))
        seconds = time.perf_counter() - t0
        print(f"{steps} step{'s' * (steps > 1)}: {len(rows)} images in {seconds:.2f} s "
              f"({len(rows) / seconds:.1f} images/s, {args.device})")
    shapes.save_grid(images, rows, os.path.join(args.out, "grid.png"))
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    for steps, batch in images.items():
        for i, x in enumerate(batch):
            words = re.sub(r"[^a-z0-9]+", "-", rows[i].lower())[:40]
            name = f"{i // args.n:03d}_{i % args.n:02d}_{steps}steps_{words}.png"
            Image.fromarray(shapes.to_pixels(x)).save(os.path.join(args.out, "images", name))
    print(f"wrote {os.path.join(args.out, 'grid.png')} and {len(rows) * len(steps_list)} images")


if __name__ == "__main__":
    run_cli(main)
