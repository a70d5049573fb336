"""
Guidance per method: ShapesEval Overall and scene distance at each omega and step count, the mean
of the seeds, the best omega of each method per step count, and the accuracy-against-distance
frontier (one panel per step count, a line per method through its omegas).

    python results/omega.py results/cpu2600_omega --out assets/omega_frontier.png

reads FOLDER/{method}_s{seed}_w{omega}.json, each `python sample.py --ckpt CKPT --eval
--eval-size medium --cfg OMEGA` output (results.json).
"""
import argparse
import glob
import json
import os
import re

from PIL import Image, ImageDraw, ImageFont

NAMES = {"fm": "flow matching", "selfe": "Self-E"}
COLORS = {"fm": (31, 119, 180), "selfe": (214, 39, 40)}


def read(folder):
    """-> {(method, omega, steps): [(overall, distance) per seed]}"""
    cells = {}
    for path in sorted(glob.glob(os.path.join(folder, "*_s*_w*.json"))):
        name = os.path.basename(path)
        method, _, omega = re.match(r"(\w+)_s(\d+)_w([\d.]+)\.json", name).groups()
        for steps, r in json.load(open(path))["results"].items():
            cells.setdefault((method, float(omega), int(steps)), []).append((r["overall"], r["fd"]))
    return cells


def mean(cells):
    return {k: tuple(sum(v[i] for v in vs) / len(vs) for i in range(2)) for k, vs in cells.items()}


def tables(cells):
    means, lines = mean(cells), []
    methods = sorted({m for m, _, _ in means}, reverse=True)
    omegas, steps = sorted({w for _, w, _ in means}), sorted({s for _, _, s in means})
    seeds = min(len(v) for v in cells.values())
    head = " | ".join(f"{s} steps" for s in steps)
    lines += [f"| omega, mean of {seeds} seeds | {head} |", "|---" * (len(steps) + 1) + "|"]
    for m in methods:
        for w in omegas:
            row = " | ".join("{:.3f} / {:.1f}".format(*means[m, w, s]) for s in steps)
            lines.append(f"| {NAMES[m]}, {w:g} | {row} |")
    lines += ["", f"| best omega (Overall; scene distance) | {head} |",
              "|---" * (len(steps) + 1) + "|"]
    for m in methods:
        best = []
        for s in steps:
            by_acc = max(omegas, key=lambda w: means[m, w, s][0])
            by_fd = min(omegas, key=lambda w: means[m, w, s][1])
            best.append(f"{by_acc:g}: {means[m, by_acc, s][0]:.3f}; {by_fd:g}: "
                        f"{means[m, by_fd, s][1]:.1f}")
        lines.append(f"| {NAMES[m]} | {' | '.join(best)} |")
    return "\n".join(lines), means, methods, omegas, steps


def frontier(means, methods, omegas, steps, out, cell=260, pad=44):
    """A panel per step count: x scene distance (lower is better), y Overall; each method a line
    through its omegas, each point labelled with its omega."""
    font = ImageFont.load_default(size=12)
    fds = [v[1] for v in means.values()]
    accs = [v[0] for v in means.values()]
    x0, x1, y1 = min(fds) * 0.95, max(fds) * 1.05, max(accs) * 1.1
    img = Image.new("RGB", (len(steps) * (cell + pad) + pad, cell + 3 * pad), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 6), "ShapesEval medium: Overall (up) against scene distance (left is better), "
              "one point per omega", fill="black", font=font)
    for j, s in enumerate(steps):
        left, top = pad + j * (cell + pad), 2 * pad
        draw.rectangle([left, top, left + cell, top + cell], outline=(160, 160, 160))
        draw.text((left + cell / 2, top - 6), f"{s} steps", fill="black", font=font, anchor="mb")
        draw.text((left, top + cell + 4), f"{x0:.0f}", fill="black", font=font)
        draw.text((left + cell, top + cell + 4), f"{x1:.0f}", fill="black", font=font, anchor="ra")
        draw.text((left - 4, top), f"{y1:.2f}", fill="black", font=font, anchor="ra")
        draw.text((left - 4, top + cell), "0", fill="black", font=font, anchor="rb")
        for m in methods:
            pts = [(left + cell * (means[m, w, s][1] - x0) / (x1 - x0),
                    top + cell * (1 - means[m, w, s][0] / y1)) for w in omegas]
            draw.line(pts, fill=COLORS[m], width=2)
            for (x, y), w in zip(pts, omegas):
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[m])
                draw.text((x + 4, y - 4), f"{w:g}", fill=COLORS[m], font=font, anchor="lb")
    for i, m in enumerate(methods):
        draw.text((pad + i * 140, cell + 2 * pad + 22), NAMES[m], fill=COLORS[m], font=font)
    img.save(out)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--out", default="omega_frontier.png")
    args = p.parse_args()
    text, *rest = tables(read(args.folder))
    print(text)
    frontier(*rest, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
