"""
Images from a Self-E checkpoint at any number of steps, one model for all of them.

    python sample.py --ckpt out/ckpt.pt --prompt "a photo of a red circle" --steps 2,4,8,50

writes OUT/grid.png (rows: prompts, columns: step counts; the same initial noise in every column) and every single
image as OUT/images/PPP_NN_SSsteps.png. Also used by train.py for its periodic sample grids.

    python sample.py --ckpt out/ckpt.pt --eval --eval-size small

scores the checkpoint on ShapesEval, our GenEval over the shapes world (see shapes.py): it draws the evaluation
set at every step count from the same initial noise, judges each image, prints a table like the paper's and writes
OUT/results.json and OUT/grid.png.

    python sample.py --ckpt out/ckpt.pt --bench --n 256

prints images/s at each step count for a batch of --n random evaluation prompts (guidance's two passes batched).
Bad input (a missing checkpoint, --steps 0, a negative --cfg, ...) is one line on stderr and exit code 2.
"""
import argparse
import json
import os
import re
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import selfe
import shapes

# Sampler defaults per method, chosen on ShapesEval's two numbers (results/README.md). Self-E: the paper's omega 5
# and s_k = t_{k+1}; eta 0 (Euler) where the paper reports eta 1, and the unconditional branch asked at (t, t):
# ours. Flow matching: asked at s = t (s_k = 1), the only time pair it was trained on.
SAMPLERS = {"selfe": dict(cfg=5.0, eta=0.0, s_k="next", uncond_at_t=True),
            "fm": dict(cfg=5.0, eta=0.0, s_k=1.0, uncond_at_t=True)}


# ---------------------------------------------------------------------------------------------------------------
# Command-line plumbing shared with train.py: bad input is one line on stderr and exit code 2, never a traceback.


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage first; one line is easier to read
        raise selfe.InputError(f"{message} (see --help)")


def run_cli(main):
    try:
        return main()
    except selfe.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def check_writable(folder):
    """Fail now, not at the first save an hour from now."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise selfe.InputError(f"cannot write to {folder!r} ({e.strerror}); choose another --out") from None


CKPT_KEYS = {"model", "ema", "opt", "step", "config", "text_dim"}


def read_checkpoint(path):
    """A train.py checkpoint as a dict. weights_only=True: only tensors and plain data are unpickled, so a file
    crafted to run code on load is refused instead of run."""
    if not os.path.isfile(path):
        raise selfe.InputError(f"checkpoint {path!r} does not exist (train.py writes OUT/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        if "Unsupported global" in str(e):  # a pickled function or class: the way a file runs code on load
            raise selfe.InputError(f"refusing to load {path!r}: it holds Python objects, not just tensors and plain "
                                   f"data, and could run code on load (train.py never writes such files)") from None
        raise selfe.InputError(f"{path!r} is not a readable checkpoint (truncated, or not written by train.py: "
                               f"{type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not CKPT_KEYS <= set(ckpt):
        raise selfe.InputError(f"{path!r} is not a train.py checkpoint (it lacks {sorted(CKPT_KEYS)})")
    return ckpt


def load_weights(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError:  # size mismatch or missing keys
        raise selfe.InputError(f"{path!r} was saved by a model of another shape; keep --model, --res and --patch "
                               f"as they were, or start a new --out") from None


def load_checkpoint(path, device="cpu"):
    """-> (EMA model in eval mode, run config, step)."""
    ckpt = read_checkpoint(path)
    cfg = ckpt["config"]
    model = build_model(cfg, text_dim=ckpt["text_dim"])
    load_weights(model, ckpt["ema"], path)
    return model.to(device).eval(), cfg, ckpt["step"]


def build_model(cfg, text_dim):
    return selfe.DiT(res=cfg["res"], patch=cfg["patch"], text_dim=text_dim, **selfe.MODELS[cfg["model"]])


# ---------------------------------------------------------------------------------------------------------------
# Sampling, scoring, timing


@torch.no_grad()
def generate(model, text, prompts, steps_list, seed=0, shift=1.0, **sampler):
    """-> {steps: (P, 3, H, W) images in [-1, 1]}. The initial noise depends on the seed only, not on the steps.
    sampler: cfg, eta, s_k, uncond_at_t (Self-E's defaults where not given)."""
    device = next(model.parameters()).device
    cond, null = text(prompts), text([""] * len(prompts))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), model.channels, model.res, model.res, generator=gen).to(device)
    out = {}
    for steps in steps_list:
        gen.manual_seed(seed + 1)  # the fresh noise of eta > 0 is the same for every step count too
        x = selfe.sample(model, noise, cond, null, steps=steps, shift=shift, generator=gen,
                         **{**SAMPLERS["selfe"], **sampler})
        out[steps] = x.float().clamp(-1, 1).cpu()
    return out


# ShapesEval sizes: prompts per category, 4 images each (GenEval: 553 prompts, about 92 per category)
EVAL_SIZES = {"small": 4, "medium": 16, "full": 92}  # 96, 384 and 2208 images per step count


def eval_images(size):
    return 4 * len(shapes.TAGS) * EVAL_SIZES[size]


def evaluate(model, text, steps_list, per_tag, seed=0, batch=96, progress=True, **sampler):
    """ShapesEval -> ({steps: {"overall", "fd", tag: accuracy}}, {steps: (6, 3, H, W)}, 6 prompts): the scores
    (fd: the scene distance to true scenes of the same prompts, lower is better), and the first image of each
    category for a grid. Image i of the set starts from the same noise at every step count."""
    rows = [m for m in shapes.eval_prompts(per_tag) for _ in range(4)]
    firsts = [4 * per_tag * j for j in range(len(shapes.TAGS))]
    correct, feats = {k: [] for k in steps_list}, {k: [] for k in steps_list}
    grid = {k: [None] * len(firsts) for k in steps_list}
    for i in tqdm(range(0, len(rows), batch), desc="eval", disable=not progress):
        chunk = rows[i:i + batch]
        out = generate(model, text, [m["prompt"] for m in chunk], steps_list, seed=seed + i, **sampler)
        for k, x in out.items():
            for img, m in zip(x, chunk):
                pix = np.asarray(to_pil(img))
                dets = shapes.detect(pix)  # once, for the verdict and for the scene statistics
                correct[k].append(shapes.judge(pix, m, dets))
                feats[k].append(shapes.scene_features(pix, dets))
            for g, j in enumerate(firsts):
                if i <= j < i + len(chunk):
                    grid[k][g] = x[j - i]
    ref = shapes.features_of(shapes.true_scenes(rows, model.res))  # true scenes of the same prompts
    results = {k: {**shapes.summarize(rows, c), "fd": shapes.frechet(np.stack(feats[k]), ref)}
               for k, c in correct.items()}
    return results, {k: torch.stack(v) for k, v in grid.items()}, [rows[j]["prompt"] for j in firsts]


def eval_report(model, text, steps_list, size, out, info, seed=0, progress=True, **sampler):
    """ShapesEval at each step count -> results; writes OUT/results.json (info, the sampler, the scores) and
    OUT/grid.png (the first image of each category)."""
    results, images, names = evaluate(model, text, steps_list, EVAL_SIZES[size], seed, progress=progress, **sampler)
    save_grid(images, names, os.path.join(out, "grid.png"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**info, "eval_size": size, "images_per_step_count": eval_images(size),
                   "sampler": sampler, "seed": seed, "results": results}, f, indent=1)
    return results


def sampling_speed(model, text, steps_list, batch, **sampler):
    """-> {steps: images/s}, batched, CFG's two passes as one batch, after a warm-up run of 8 steps; the median of
    3 timings, since one short timing on a busy machine can be far off."""
    prompts = [m["prompt"] for m in shapes.eval_prompts(-(-batch // len(shapes.TAGS)))][:batch]
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    generate(model, text, prompts, [8], **sampler)
    speed = {}
    for steps in steps_list:
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            generate(model, text, prompts, [steps], **sampler)
            sync()
            times.append(time.perf_counter() - t0)
        speed[steps] = batch / float(np.median(times))
    return speed


def to_pil(x):
    """(3, H, W) in [-1, 1] -> PIL image."""
    return Image.fromarray(((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def save_grid(images, prompts, path, cell=96):
    """images: {steps: (P, 3, H, W)}. One row per prompt (its text on the left), one column per step count."""
    font = ImageFont.load_default(size=13)  # the default size, 10, runs words together
    cols, label_w, head_h = list(images), 8 + int(max(font.getlength(p) for p in prompts)), 18
    grid = Image.new("RGB", (label_w + cell * len(cols), head_h + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for j, steps in enumerate(cols):
        draw.text((label_w + j * cell + 4, 2), f"{steps} step{'s' * (steps > 1)}", fill="black", font=font)
        for i, x in enumerate(images[steps]):
            grid.paste(to_pil(x).resize((cell, cell), Image.NEAREST), (label_w + j * cell, head_h + i * cell))
    for i, p in enumerate(prompts):
        draw.text((4, head_h + i * cell + cell // 2 - 7), p, fill="black", font=font)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


def parse_steps(text):
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise selfe.InputError(f"--steps {text!r}: give whole numbers separated by commas, e.g. 2,4,8,50") from None
    if min(steps) < 1:
        raise selfe.InputError(f"--steps {text!r}: every step count must be at least 1")
    return steps


def main():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--eval", action="store_true", help="score the checkpoint on ShapesEval instead of prompts")
    p.add_argument("--eval-size", choices=list(EVAL_SIZES), default="small",
                   help="prompts per category x 4 images: small 96, medium 384, full 2208 images per step count")
    p.add_argument("--bench", action="store_true", help="print images/s at each step count (batch of --n)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file, one prompt per line")
    p.add_argument("--steps", default="2,4,8,50", help="comma-separated step counts")
    # sampler flags: left out, the checkpoint's method picks them (SAMPLERS)
    p.add_argument("--cfg", type=float, help="guidance scale omega (1 = no guidance; default 5)")
    p.add_argument("--eta", type=float, help="0 = deterministic Euler (default), 1 = DDPM-like")
    p.add_argument("--s-k", help="target time per step: 'next' = t_{k+1} (Self-E's default), or f * t_k "
                                 "(flow matching's default: 1, i.e. s = t)")
    p.add_argument("--uncond-at-t", action=argparse.BooleanOptionalAction,
                   help="guidance asks the unconditional branch at (t, t) (default) or, --no-uncond-at-t, at the "
                        "conditional branch's (t, s_k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=1, help="images per prompt (--bench: the batch size)")
    p.add_argument("--out", default="samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    prompts = list(args.prompt)
    if args.prompts:
        try:
            with open(args.prompts) as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise selfe.InputError(f"--prompts {args.prompts!r}: {e.strerror}") from None
    if not prompts and not (args.eval or args.bench):
        raise selfe.InputError("give at least one --prompt or a --prompts file, or --eval, or --bench")
    steps_list = parse_steps(args.steps)
    if args.cfg is not None and args.cfg < 0:
        raise selfe.InputError(f"--cfg {args.cfg}: the guidance scale must be >= 0 (1 = no guidance)")
    if args.eta is not None and not 0 <= args.eta <= 1:
        raise selfe.InputError(f"--eta {args.eta}: must lie in [0, 1]")
    if args.n < 1:
        raise selfe.InputError(f"--n {args.n}: must be at least 1")
    try:
        s_k = args.s_k if args.s_k in (None, "next") else float(args.s_k)
    except ValueError:
        raise selfe.InputError(f"--s-k {args.s_k!r}: 'next' or a number in (0, 1]") from None
    if not args.bench:
        check_writable(args.out)

    model, cfg, step = load_checkpoint(args.ckpt, args.device)
    text = selfe.TextEncoder(cfg["text_encoder"], cfg["text_len"], args.device)
    given = dict(cfg=args.cfg, eta=args.eta, s_k=s_k, uncond_at_t=args.uncond_at_t)
    sampler = {**SAMPLERS[cfg["method"]], **{k: v for k, v in given.items() if v is not None}, "shift": cfg["shift"]}
    if args.bench:
        speed = sampling_speed(model, text, steps_list, args.n, **sampler)
        device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        print(f"sampling speed, batch {args.n}, cfg {sampler['cfg']} "
              f"({'two passes batched' if sampler['cfg'] != 1 else 'one pass'}"
              f"), {device}")
        print("| steps | images/s |\n|---|---|\n" + "\n".join(f"| {k} | {v:.1f} |" for k, v in speed.items()))
        return
    if args.eval:
        results = eval_report(model, text, steps_list, args.eval_size, args.out,
                              {"ckpt": args.ckpt, "step": step, "method": cfg["method"]}, args.seed, **sampler)
        print(shapes.markdown_table({f"{k} steps": r for k, r in results.items()}, "steps"))
        print(f"wrote {os.path.join(args.out, 'results.json')} and grid.png")
        return
    rows = [pr for pr in prompts for _ in range(args.n)]
    images = generate(model, text, rows, steps_list, args.seed, **sampler)
    save_grid(images, rows, os.path.join(args.out, "grid.png"))
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    for steps, batch in images.items():
        for i, x in enumerate(batch):
            name = f"{i // args.n:03d}_{i % args.n:02d}_{steps}steps_{re.sub(r'[^a-z0-9]+', '-', rows[i].lower())[:40]}"
            to_pil(x).save(os.path.join(args.out, "images", name + ".png"))
    print(f"wrote {os.path.join(args.out, 'grid.png')} and {len(rows) * len(steps_list)} images")


if __name__ == "__main__":
    run_cli(main)
