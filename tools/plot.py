r"""
The in-training ShapesEval score over iterations or training minutes, several runs on one chart (the
paper's Fig. 5 in miniature).

    python tools/plot.py out_fm/log.jsonl out_selfe/log.jsonl --labels "flow matching,Self-E" \
        --out curve.png
    python tools/plot.py out_fm/log.jsonl out_selfe/log.jsonl --x minutes  # vs compute
    python tools/plot.py out_fm/log.jsonl out_selfe/log.jsonl --y swaps    # the model's classifier
    python tools/plot.py out/log.jsonl --y loss                     # any run, your own data too

Reads the `eval_overall` records that train.py writes every --eval-every steps (the small set, at 2
and 8 steps) and draws one colour per run: a solid line at 2 steps, a dashed one at 8. `--y swaps`
draws the records' `swap_accuracy` instead, averaged over its four kinds: how often the model's own
classifier (the one self-evaluation relies on) tells an image's prompt from a one-word swap.
`--y loss` draws the training loss, which every run logs (the mean over each --log-every window).
`--x minutes` puts each score at the training time the run had spent to reach it, summed from the
log's ms_per_step (evaluations and grids excluded): a Self-E step costs more than a flow-matching
one, so this is the fair comparison for a fixed budget. Drawn with Pillow, which the project already
needs, so there is nothing more to install.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's root
from harness.cli import InputError, Parser, run_cli  # noqa: E402

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
# image size and the margins around the plot area
W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 440, 60, 170, 30, 50


def points(rec, y):
    """One log record -> {curve name: value} for the chosen y."""
    if y == "loss":  # None: every step of the window was skipped as non-finite
        return {"loss": rec["loss"]} if rec.get("loss") is not None else {}
    if y == "swaps":
        acc = rec.get("swap_accuracy")
        return {"swap accuracy": sum(acc.values()) / len(acc)} if acc else {}
    return {f"{k} steps": v for k, v in rec.get("eval_overall", {}).items()}


def read_curves(path, x="iteration", y="shapes"):
    """log.jsonl -> {curve: [(x, value), ...]}, x the iteration or the training minutes spent to
    reach it; the curves: ShapesEval overall at each step count, or (y "swaps") the mean swap
    accuracy."""
    curves, ms_per_step = {}, {}
    try:
        with open(path) as f:
            for line in f:
                rec = json.loads(line) if line.strip() else {}
                if "ms_per_step" in rec:
                    # the mean over the steps since the last record
                    ms_per_step[rec["step"]] = rec["ms_per_step"]
                for name, v in points(rec, y).items():
                    curves.setdefault(name, []).append((rec["step"], v))
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from None
    except ValueError:
        raise InputError(f"{path}: not a train.py log.jsonl (a line is not JSON)") from None
    if not curves:
        raise InputError(f"{path}: no {NAMES[y]} in it (train.py writes ShapesEval scores and "
                         f"swap accuracies every --eval-every steps on the shapes data; --y loss "
                         f"draws any run)")
    if x == "minutes":
        if not ms_per_step:
            raise InputError(f"{path}: no ms_per_step records to measure minutes by")
        at = training_minutes(ms_per_step)
        curves = {k: [(at(it), v) for it, v in pts] for k, pts in curves.items()}
    return curves


def training_minutes(ms_per_step):
    """{logged step: mean ms per step since the previous record} -> iteration -> minutes spent to
    reach it (linear between records, which is each interval's own speed)."""
    steps = [0, *sorted(ms_per_step)]
    minutes = np.cumsum([0] + [(b - a) * ms_per_step[b] / 60000
                               for a, b in zip(steps, steps[1:])])
    return lambda it: float(np.interp(it, steps, minutes))


def segment(draw, a, b, fill, dash=None):
    """A line from a to b, 2 px wide; dashed when dash (the length of a dash, in pixels) is
    given."""
    if dash is None:
        return draw.line([a, b], fill=fill, width=2)
    (x0, y0), (x1, y1) = a, b
    n = max(1, int(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5 // dash))
    for i in range(0, n, 2):
        draw.line([(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n),
                   (x0 + (x1 - x0) * (i + 1) / n, y0 + (y1 - y0) * (i + 1) / n)],
                  fill=fill, width=2)


TITLES = {"shapes": "ShapesEval overall during training (small set: 96 images a point)",
          "swaps": "the model's own classifier on one-word prompt swaps "
                   "(256 pairs a point; chance 0.5)",
          "loss": "training loss (the mean over each --log-every window)"}
NAMES = {"shapes": "ShapesEval scores", "swaps": "swap accuracies", "loss": "loss records"}


def axis_top(v):
    """A round number at or above v > 0 (1, 2, 5 or 10 times a power of ten): the y axis's top."""
    power = 10.0 ** math.floor(math.log10(v))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= v * (1 - 1e-9))


def plot(runs, out, x_label="iteration", title=TITLES["shapes"], top=1.0):
    """runs: {label: {curve: [(x, y), ...]}} -> PNG at out. The y axis runs from 0 to top (None:
    from the values); one colour per run, the first curve solid, the others dashed."""
    font = ImageFont.load_default(size=13)
    names = list(dict.fromkeys(name for curves in runs.values() for name in curves))
    legend_w = 56 + max(font.getlength(f"{label}, {k}") for label in runs for k in names)
    # wider for long labels
    img = Image.new("RGB", (max(W, round(W - RIGHT + legend_w)), H), "white")
    draw = ImageDraw.Draw(img)
    x_max = max(it for curves in runs.values() for pts in curves.values() for it, _ in pts)
    top = top or axis_top(max(v for c in runs.values() for pts in c.values() for _, v in pts))
    px = lambda it: LEFT + (W - LEFT - RIGHT) * it / x_max  # noqa: E731
    py = lambda v: H - BOTTOM - (H - TOP - BOTTOM) * v / top  # noqa: E731
    for i in range(6):  # grid and ticks: y and x in fifths
        v, it = top * i / 5, round(x_max * i / 5, 0 if x_max >= 50 else 1)
        draw.line([(LEFT, py(v)), (W - RIGHT, py(v))], fill=(225, 225, 225))
        draw.text((LEFT - 8, py(v)), f"{v:.3g}", fill="black", font=font, anchor="rm")
        draw.text((px(it), H - BOTTOM + 8), f"{it:g}", fill="black", font=font, anchor="mt")
    draw.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline="black")
    draw.text((W / 2, 8), title, fill="black", font=font, anchor="mt")
    draw.text(((LEFT + W - RIGHT) / 2, H - 18), x_label, fill="black", font=font, anchor="mm")
    legend_y = TOP
    for color, (label, curves) in zip(COLORS * len(runs), runs.items()):
        for k in names:
            pts, dash = ([(px(it), py(v)) for it, v in sorted(curves.get(k, []))],
                         None if k == names[0] else 7)
            for a, b in zip(pts, pts[1:]):
                segment(draw, a, b, color, dash)
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            segment(draw, (W - RIGHT + 10, legend_y + 7), (W - RIGHT + 40, legend_y + 7),
                    color, dash)
            draw.text((W - RIGHT + 46, legend_y), f"{label}, {k}", fill="black", font=font)
            legend_y += 20
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    img.save(out)


def main():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="log.jsonl files written by train.py")
    p.add_argument("--labels",
                   help="comma-separated, one per log (default: each log's folder name)")
    p.add_argument("--x", choices=["iteration", "minutes"], default="iteration",
                   help="x axis: iterations, or training minutes from the log's ms_per_step")
    p.add_argument("--y", choices=list(TITLES), default="shapes",
                   help="ShapesEval at 2 and 8 steps, the model's own classifier on prompt "
                        "swaps, or the training loss")
    p.add_argument("--out", default="curve.png")
    args = p.parse_args()
    labels = args.labels.split(",") if args.labels else [
        os.path.basename(os.path.dirname(os.path.abspath(f))) for f in args.logs]
    if len(labels) != len(args.logs):
        raise InputError(f"--labels gives {len(labels)} names for {len(args.logs)} logs")
    x_label = "iteration" if args.x == "iteration" else "training minutes (evaluations excluded)"
    plot({label: read_curves(f, args.x, args.y) for label, f in zip(labels, args.logs)}, args.out,
         x_label, TITLES[args.y], None if args.y == "loss" else 1.0)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
