"""
Your own captions against the shapes world: the `cpu` preset's ms/step after start-up, and the
start-up line that says how long encoding the captions took, on folders of N distinct captions.

    python results/caption_bench.py 5000 50000     # folders made in a temporary directory

Each folder holds N 32 px images (shapes-world scenes) with a distinct caption each, in
metadata.jsonl. Every run: --iters 300, no evaluation or grid; ms/step is the median of the log's
windows (the first step, and so any start-up, is left out by train.py). Run it alone on the machine.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from harness import shapes  # noqa: E402

RUN = ["--preset", "cpu", "--iters", "300", "--log-every", "25", "--eval-every", "0",
       "--final-eval", "off", "--no-final-grid", "--sample-every", "100000"]


def make_folder(root, n):
    """n shapes-world images, each captioned by its prompt and a number (n distinct captions)."""
    os.makedirs(root)
    rng = np.random.default_rng(0)
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for i in range(n):
            images, captions = shapes.TrainingData(32).batch(1, rng)
            Image.fromarray(images[0]).save(os.path.join(root, f"{i}.png"))
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"{captions[0]}, number {i}"})
                    + "\n")


def run(data, out):
    """-> (median ms/step, the start-up 'text:' line)."""
    r = subprocess.run([sys.executable, "train.py", "--data", data, "--out", out, *RUN], cwd=HERE,
                       capture_output=True, text=True, check=True)
    with open(os.path.join(out, "log.jsonl")) as f:
        ms = [rec["ms_per_step"] for rec in map(json.loads, f) if "ms_per_step" in rec]
    text = next(line for line in r.stdout.splitlines() if line.startswith("text:"))
    return statistics.median(ms), text


def main():
    tmp = tempfile.mkdtemp()
    rows = [("shapes world (240 captions)", *run("shapes", os.path.join(tmp, "shapes")))]
    for n in map(int, sys.argv[1:]):
        make_folder(os.path.join(tmp, f"data{n}"), n)
        rows.append((f"{n} distinct captions", *run(os.path.join(tmp, f"data{n}"),
                                                    os.path.join(tmp, f"out{n}"))))
    print("| data | ms/step | against the shapes world | start-up |\n|---|---|---|---|")
    for name, ms, text in rows:
        print(f"| {name} | {ms:.0f} | {ms / rows[0][1]:.2f}x | {text} |")


if __name__ == "__main__":
    main()
