"""
Images from a Self-E checkpoint at any number of steps: one model for all of them.

    python sample.py --ckpt out/ckpt.pt --prompt "a photo of a red circle" --steps 2,4,8,50

writes OUT/grid.png (a row per image, a column per step count, the same initial noise in every
column), every image as OUT/images/PPP_NN_SSsteps_PROMPT.png (zero-padded: names sort in order),
and prints how long each step count took (images per second: the sampling speed).
--prompt "" is the empty prompt: an image the model draws unprompted.

    python sample.py --ckpt out/model --prompt "a photo of a red circle"

the same images from the export train.py writes beside ckpt.pt (the EMA weights alone:
config.json + model.safetensors, 6 MB for the cpu preset's model). Where the run's text encoder
was a folder that is not here, give a copy of it: --text-encoder DIR.

    python sample.py --ckpt out/ckpt.pt --eval --eval-size small

scores the checkpoint on ShapesEval, our GenEval over the shapes world (harness/shapes.py; runs
trained on it only): the evaluation set at every step count from the same initial noise, judged
image by image; prints a table like the paper's and writes OUT/results.json and OUT/grid.png.
Bad input (a missing checkpoint, --steps 0, a negative --cfg, ...) is one line and exit code 2,
and writes nothing.
"""
import argparse
import dataclasses
import math
import os
import re
import time

import torch
from PIL import Image

from harness import shapes
from harness.checkpoints import load_checkpoint
from harness.cli import InputError, Parser, check_writable, run_cli
from harness.draw import allow_tf32, generate, sampler_of
from harness.text_encoder import TextEncoder, looks_like_path


def parse_steps(text):
    """'4,2,4' -> [4, 2]: a step count given twice is drawn once."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise InputError(f"--steps {text!r}: give whole numbers separated by commas, e.g. "
                         f"2,4,8,50") from None
    if min(steps) < 1:
        raise InputError(f"--steps {text!r}: every step count must be at least 1")
    return list(dict.fromkeys(steps))


def parse_s_k(text):
    """None (the method's default), 'next', or f in (0, 1]: each step jumps to s = f * t_k."""
    if text in (None, "next"):
        return text
    try:
        f = float(text)
    except ValueError:
        f = math.nan
    if not 0 < f <= 1:  # nan fails too
        raise InputError(f"--s-k {text!r}: 'next' or a number in (0, 1]")
    return f


def check_device(name):
    """Fail now, in one line: a device torch cannot use here (no CUDA, a typo, 'meta')."""
    try:
        torch.ones(1, device=name).cpu()  # .cpu(): 'meta' makes tensors that hold no data
    except Exception:  # RuntimeError (no such device), AssertionError (no CUDA), ... by the case
        usable = ", ".join(["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))])
        raise InputError(f"--device {name!r}: torch cannot use it on this machine (usable: "
                         f"{usable})") from None


def parse_args():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="a ckpt.pt written by train.py, or an exported folder (OUT/model: "
                        "config.json + model.safetensors)")
    p.add_argument("--eval", action="store_true",
                   help="score the checkpoint on ShapesEval (runs trained on the shapes world)")
    p.add_argument("--eval-size", choices=list(shapes.EVAL_SIZES), default="small",
                   help="prompts per category x 4 images: small 96, medium 384, full 2208 images "
                        "per step count")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt (repeatable); \"\" is the empty prompt")
    p.add_argument("--prompts", help="a UTF-8 text file, one prompt per line (blank lines skipped)")
    p.add_argument("--steps", default="2,4,8,50",
                   help="comma-separated step counts, each at least 1")
    p.add_argument("--text-encoder",
                   help="a folder or Hugging Face id holding the encoder the run trained with "
                        "(default: the run's, as it named it)")
    # sampler flags: left out, the checkpoint's method picks them (selfe.SAMPLERS)
    p.add_argument("--cfg", type=float, help="guidance scale omega >= 0 (1 = no guidance; "
                                             "default 5)")
    p.add_argument("--eta", type=float, help="in [0, 1]: 0 = Euler, the paper's Eq. 22 (default); "
                                             "1 = DDPM-like, what the paper's tables used")
    p.add_argument("--s-k", help="target time per step: 'next' = t_{k+1} (Self-E's default), or "
                                 "f * t_k, f in (0, 1] (flow matching's default: 1, i.e. s = t)")
    p.add_argument("--uncond-at-t", action=argparse.BooleanOptionalAction,
                   help="guidance asks the empty prompt at (t, t) (default) or, "
                        "--no-uncond-at-t, at the conditional branch's (t, s_k)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise, in [0, 2^63)")
    p.add_argument("--n", type=int, default=1, help="images per prompt, at least 1")
    p.add_argument("--out", default="samples", help="folder for what sample.py writes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="a device torch can use here: cpu, cuda, cuda:N, ... (default: cuda "
                        "when there is one)")
    args = p.parse_args()
    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
        raise InputError(f"--cfg {args.cfg}: the guidance scale must be a finite number >= 0 (1 = "
                         f"no guidance)")
    if args.eta is not None and not 0 <= args.eta <= 1:
        raise InputError(f"--eta {args.eta}: must lie in [0, 1]")
    if args.n < 1:
        raise InputError(f"--n {args.n}: must be at least 1")
    if not 0 <= args.seed < 2**63:  # torch's generator takes 64 bits; evaluation adds to it
        raise InputError(f"--seed {args.seed}: must lie in [0, 2^63)")
    args.s_k = parse_s_k(args.s_k)
    check_device(args.device)
    return args


def read_prompts(args):
    """The --prompt flags, then the --prompts file's non-blank lines (UTF-8, with or without a BOM,
    whatever the locale)."""
    prompts = list(args.prompt)
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8-sig") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise InputError(f"--prompts {args.prompts!r}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise InputError(f"--prompts {args.prompts!r}: not UTF-8 text; save it as UTF-8") \
                from None
    if not prompts and not args.eval:
        raise InputError("give at least one --prompt or a --prompts file with a prompt in it, "
                         "or --eval")
    return prompts


def load_text_encoder(args, cfg, model):
    """--text-encoder, else the run's; checked to be here and to give tokens of the width the
    model was trained on (another encoder of the same width cannot be told apart: give the same)."""
    name = args.text_encoder or cfg["text_encoder"]
    if not args.text_encoder and looks_like_path(name) and not os.path.isdir(name):
        raise InputError(f"the run's text encoder {name!r} is a folder that is not on this "
                         f"machine (trained elsewhere?): pass --text-encoder with a copy of it, "
                         f"a folder or a Hugging Face id")
    text = TextEncoder(name, cfg["text_len"], args.device)
    if text.dim != getattr(model, "text_dim", text.dim):  # a network of one's own may not say
        raise InputError(f"--text-encoder {name!r} gives {text.dim}-wide tokens; {args.ckpt!r} "
                         f"was trained on {model.text_dim}-wide ones from "
                         f"{cfg['text_encoder']!r}")
    return text


def image_name(prompt, p, k, steps, largest):
    """PPP_NN_SSsteps_WORDS.png for image k of prompt p. Each number is zero-padded to the width of
    its largest in largest (prompt index, image index, step count; at least 3, 2 and 1 digits), so
    that names sort in order whatever the counts."""
    wp, wn, ws = (max(w, len(str(m))) for w, m in zip((3, 2, 1), largest))
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:40]
    return f"{p:0{wp}d}_{k:0{wn}d}_{steps:0{ws}d}steps_{words}.png"


def main():
    args = parse_args()
    prompts = read_prompts(args)
    steps_list = parse_steps(args.steps)
    model, cfg, step = load_checkpoint(args.ckpt, args.device)
    if args.device.startswith("cuda"):
        allow_tf32()  # as training
    if args.eval and cfg["data"] != "shapes":
        raise InputError(f"--eval: {args.ckpt!r} was trained on {cfg['data']!r}, and ShapesEval "
                         f"judges the shapes world only")
    text = load_text_encoder(args, cfg, model)
    check_writable(args.out)  # after every input is read: bad input leaves no folder behind
    sampler = sampler_of(cfg, cfg=args.cfg, eta=args.eta, s_k=args.s_k,
                         uncond_at_t=args.uncond_at_t)
    shift = cfg["shift"]
    if args.eval:
        def draw(prompts, seed):
            return generate(model, text, prompts, steps_list, seed, shift, sampler)
        info = {"ckpt": args.ckpt, "step": step, "method": cfg["method"],
                "sampler": {**dataclasses.asdict(sampler), "shift": shift}}
        results = shapes.report(draw, model.res, args.eval_size, args.out, info, args.seed)
        print(shapes.markdown_table({f"{k} steps": r for k, r in results.items()}, "steps"))
        print(f"wrote {os.path.join(args.out, 'results.json')} and grid.png")
        return
    rows = [pr for pr in prompts for _ in range(args.n)]
    # untimed: the prompts' encoding and the first kernels' start-up (cuBLAS, caches)
    generate(model, text, rows, [1], args.seed, shift, sampler)
    images = {}
    for steps in steps_list:  # one step count at a time, to time each
        t0 = time.perf_counter()
        images.update(generate(model, text, rows, [steps], args.seed, shift, sampler))
        seconds = time.perf_counter() - t0
        print(f"{steps} step{'s' * (steps > 1)}: {len(rows)} image{'s' * (len(rows) > 1)} in "
              f"{seconds:.2f} s "
              f"({len(rows) / seconds:.1f} images/s, {args.device})")
    shapes.save_grid(images, rows, os.path.join(args.out, "grid.png"))
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    largest = (len(prompts) - 1, args.n - 1, max(steps_list))
    for steps, batch in images.items():
        for i, x in enumerate(batch):
            name = image_name(rows[i], i // args.n, i % args.n, steps, largest)
            Image.fromarray(shapes.to_pixels(x)).save(os.path.join(args.out, "images", name))
    print(f"wrote {os.path.join(args.out, 'grid.png')} and {len(rows) * len(steps_list)} images")


if __name__ == "__main__":
    run_cli(main)
