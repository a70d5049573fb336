"""
Time the training step and sampling (nanoGPT's bench.py): no checkpoint, no data folder, nothing written.

    python bench.py                            # the run `python train.py` would start
    python bench.py --preset gpu --method fm   # any train.py flag sets up the run to time

The step: one batch drawn beforehand (so making data does not count), 5 warm-up steps, then the median of 10
blocks of 5 steps, at the middle of the run (tau = 1, the fake-score term on or off as the config has it there):
ms/step, images/s, MFU (on GPUs whose peak we know) and peak memory; for Self-E with the fake-score term coming on
later, once more at the last step, with it on (under torch.compile this also builds that step's graphs, which a
training run started after the bench then finds in the compile cache). Then sampling: images/s at 1, 2, 4, 8 and 50
steps for --batch-size evaluation prompts (guidance's two passes in one batch), from the EMA weights of the timed
steps: the speed of sampling does not depend on what the weights are.
"""
import time

import numpy as np
import torch

import data
import recipe
import shapes
from common import SAMPLERS, generate, run_cli

WARMUP, BLOCKS, BLOCK = 5, 10, 5
SAMPLING_STEPS = (1, 2, 4, 8, 50)


def median_seconds(fn, repeats, device):
    """The median wall-clock time of `repeats` calls of fn, each waiting for the device to finish: one slow moment
    of a busy machine cannot move it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    cfg = {**recipe.DEFAULTS, **vars(recipe.config_parser(__doc__).parse_args())}
    cfg = recipe.finish_config(cfg, world=1)
    device = recipe.setup_device(cfg, world=1)
    source = data.from_config(cfg)
    run = recipe.Trainer(cfg, device)
    if device.type == "cuda":
        run.encode_ahead(source.captions)
    middle, last = cfg["iters"] // 2, cfg["iters"] - 1
    fake_later = recipe.aux_on(last, cfg) and not recipe.aux_on(middle, cfg)
    for at in [middle, last] if fake_later else [middle]:
        x0, captions = data.Batches(source, run.batch, cfg["seed"], 0)[at]
        for _ in range(WARMUP):
            run.step(at, x0, captions)
        dt = median_seconds(lambda: [run.step(at, x0, captions) for _ in range(BLOCK)], BLOCKS, device)
        fig = recipe.speed(dt, BLOCK, run.flops(at), cfg["batch_size"], device)
        fake = "on" if recipe.aux_on(at, cfg) else "off"
        print(f"bench: {cfg['method']} | {recipe.describe(fig)} | fake-score term {fake} | {cfg['preset']} preset, "
              f"model {cfg['model']}, batch {cfg['batch_size']}, compile {'on' if cfg['compile'] else 'off'}, "
              f"{recipe.device_name(device)}")

    n = cfg["batch_size"]
    prompts = [m["prompt"] for m in shapes.eval_prompts(-(-n // len(shapes.TAGS)))][:n]
    sampler = {**SAMPLERS[cfg["method"]], "shift": cfg["shift"]}
    draw = lambda steps: generate(run.ema, run.text, prompts, [steps], **sampler)  # noqa: E731
    draw(8)  # warm-up
    print(f"sampling, batch {n}, guidance {sampler['cfg']}:\n| steps | images/s |\n|---|---|")
    for steps in SAMPLING_STEPS:
        print(f"| {steps} | {n / median_seconds(lambda: draw(steps), 3, device):.1f} |")


if __name__ == "__main__":
    run_cli(main)
