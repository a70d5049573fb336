"""
What the scripts share. train.py, sample.py, bench.py and plot.py import library modules only (selfe, shapes,
data, recipe and this one), never each other. Here:
  1. the command-line contract: bad input is one line on stderr and exit code 2, never a traceback;
  2. the checkpoint format, written and read here and nowhere else;
  3. images from a model at several step counts, sample grids and the ShapesEval report.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import selfe
import shapes
from selfe import InputError

# ---------------------------------------------------------------------------------------------------------------
# 1. Command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage first; one line is easier to read
        raise InputError(f"{message} (see --help)")


def run_cli(main):
    try:
        return main()
    except InputError as e:
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
        raise InputError(f"cannot write to {folder!r} ({e.strerror}); choose another --out") from None


# ---------------------------------------------------------------------------------------------------------------
# 2. Checkpoints: tensors and plain data only, so that weights_only=True loads them. Written to a temp file,
# flushed to disk, then renamed over the old one: a kill at any moment leaves the previous checkpoint whole.

CKPT_KEYS = {"model", "ema", "opt", "step", "config", "text_dim"}  # and "skipped", which older checkpoints lack
BEFORE_KEY = {"null_any_s": False}  # how checkpoints written before a config key existed were trained


def save_checkpoint(path, model, ema, opt, step, cfg, text_dim, skipped):
    if not all(p.isfinite().all() for p in model.parameters()):
        raise SystemExit(f"error: non-finite weights at step {step}; not saving over {path} (the last good one)")
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
            "config": cfg, "text_dim": text_dim, "skipped": skipped}
    with open(path + ".tmp", "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_checkpoint(path):
    """A train.py checkpoint as a dict, older ones filled in to the current format. weights_only=True: only tensors
    and plain data are unpickled, so a file crafted to run code on load is refused instead of run."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path!r} does not exist (train.py writes OUT/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        # torch gives no exception type of its own for a refused object; its message names the "Unsupported
        # global" it met (a pickled function or class: the way a file runs code on load)
        if "Unsupported global" in str(e):
            raise InputError(f"refusing to load {path!r}: it holds Python objects, not just tensors and plain "
                             f"data, and could run code on load (train.py never writes such files)") from None
        raise InputError(f"{path!r} is not a readable checkpoint (truncated, or not written by train.py: "
                         f"{type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not CKPT_KEYS <= set(ckpt):
        raise InputError(f"{path!r} is not a train.py checkpoint (it lacks {sorted(CKPT_KEYS)})")
    return {"skipped": 0, **ckpt, "config": {**BEFORE_KEY, **ckpt["config"]}}


def build_model(cfg, text_dim):
    return selfe.DiT(res=cfg["res"], patch=cfg["patch"], text_dim=text_dim, **selfe.MODELS[cfg["model"]])


def load_weights(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError:  # size mismatch or missing keys
        raise InputError(f"{path!r} was saved by a model of another shape; keep --model, --res and --patch "
                         f"as they were, or start a new --out") from None


def load_checkpoint(path, device="cpu"):
    """-> (EMA model in eval mode, run config, step)."""
    ckpt = read_checkpoint(path)
    model = build_model(ckpt["config"], text_dim=ckpt["text_dim"])
    load_weights(model, ckpt["ema"], path)
    return model.to(device).eval(), ckpt["config"], ckpt["step"]


# ---------------------------------------------------------------------------------------------------------------
# 3. Images, grids, ShapesEval

# Sampler defaults per method, chosen on ShapesEval's two numbers (results/README.md). Self-E: the paper's omega 5
# and s_k = t_{k+1}; eta 0 (Euler) where the paper reports eta 1, and the unconditional branch asked at (t, t):
# ours. Flow matching: asked at s = t (s_k = 1), the only time pair it was trained on.
SAMPLERS = {"selfe": dict(cfg=5.0, eta=0.0, s_k="next", uncond_at_t=True),
            "fm": dict(cfg=5.0, eta=0.0, s_k=1.0, uncond_at_t=True)}


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


def save_grid(images, prompts, path, cell=96):
    """images: {steps: (P, 3, H, W)}. One row per prompt (its text on the left), one column per step count."""
    font = ImageFont.load_default(size=13)  # the default size, 10, runs words together
    cols, label_w, head_h = list(images), 8 + int(max(font.getlength(p) for p in prompts)), 18
    grid = Image.new("RGB", (label_w + cell * len(cols), head_h + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for j, steps in enumerate(cols):
        draw.text((label_w + j * cell + 4, 2), f"{steps} step{'s' * (steps > 1)}", fill="black", font=font)
        for i, x in enumerate(images[steps]):
            img = Image.fromarray(shapes.to_pixels(x))
            grid.paste(img.resize((cell, cell), Image.NEAREST), (label_w + j * cell, head_h + i * cell))
    for i, p in enumerate(prompts):
        draw.text((4, head_h + i * cell + cell // 2 - 7), p, fill="black", font=font)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


@torch.no_grad()
def swap_accuracy(model, text, per_kind=64, s=0.5, seed=0):
    """The model's own classifier, the one self-evaluation relies on, on one-word prompt swaps -> {kind: accuracy}.
    A true scene of each prompt is noised to time s, and the model's Tweedie estimates G(x_s, s, s, c) under the
    true and the swapped prompt are compared: the one nearer the clean image is the model's pick (the classifier
    log q(c | x_s) compares each prompt with the empty one; with the same noise that term cancels). A tie counts
    half, so a model that ignores its prompt scores 0.5."""
    device = next(model.parameters()).device
    swaps = shapes.prompt_swaps(per_kind)
    rng = np.random.default_rng(seed)
    pixels = np.stack([shapes.render(shapes.scene_for(meta, rng), model.res) for _, meta, _ in swaps])
    x0 = data.to_model(pixels).to(device)  # (N, 3, H, W)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    t = torch.full((len(x0),), s, device=device)
    x_s = selfe.add_noise(x0, t, eps)
    err_true, err_swap = (selfe.sq_err(selfe.G(model, x_s, t, t, text([m["prompt"] for m in metas])), x0)
                          for metas in zip(*[(meta, swapped) for _, meta, swapped in swaps]))  # (N,) each
    right = ((err_true < err_swap).float() + 0.5 * (err_true == err_swap).float()).cpu()
    kinds = np.array([kind for kind, _, _ in swaps])
    return {kind: float(right[kinds == kind].mean()) for kind in shapes.SWAPS}


def shapes_eval(model, text, steps_list, size, seed=0, progress=True, **sampler):
    """ShapesEval of a model -> (scores, grid images, grid prompts): shapes.evaluate with this model drawing."""
    draw = lambda prompts, seed: generate(model, text, prompts, steps_list, seed, **sampler)  # noqa: E731
    return shapes.evaluate(draw, model.res, shapes.EVAL_SIZES[size], seed, progress=progress)


def eval_report(model, text, steps_list, size, out, info, seed=0, progress=True, **sampler):
    """ShapesEval at each step count -> results; writes OUT/results.json (info, the sampler, the scores) and
    OUT/grid.png (the first image of each category)."""
    results, images, names = shapes_eval(model, text, steps_list, size, seed, progress, **sampler)
    save_grid(images, names, os.path.join(out, "grid.png"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**info, "eval_size": size, "images_per_step_count": shapes.eval_images(size),
                   "sampler": sampler, "seed": seed, "results": results}, f, indent=1)
    return results
