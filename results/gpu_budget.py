"""
The GPU check's time budget (gpu_check.sh on one H100): each phase of its two training runs and
evaluations. What runs on the CPU there (start-up, rendering the data, ShapesEval's judge) is
measured here, on this CPU, one thread; what runs on the GPU is estimated from the FLOP count
(DiT.flops, control.step_flops) at an assumed MFU, each pass at the peak of its precision.

    OMP_NUM_THREADS=1 python results/gpu_budget.py   # from the repository's root; about a minute
"""
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from harness import checkpoints, control, shapes  # noqa: E402

PEAKS = control.peak_flops("NVIDIA H100 80GB HBM3")
EVAL_STEPS = (2, 4, 8, 50)
RUNS = {"gpu": (256, 2000), "gpu-long": (256, 50000)}  # the presets' batch and iterations


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def gpu_seconds(flops, mfu):
    """{precision: FLOPs} -> seconds on the H100 at the given MFU."""
    return control.mfu(flops, 1.0, PEAKS) / mfu


def start_up(preset, folder):
    """-> (seconds, config): train.py's start (imports, text encoder, memory estimate, caption
    table, data workers), one step of 2 rows and its checkpoint on this CPU; the preset's config
    as the run saved it, with the preset's own batch, iterations and bf16."""
    out = os.path.join(folder, preset)
    seconds, _ = timed(lambda: subprocess.run(
        [sys.executable, "train.py", "--preset", preset, "--no-compile", "--no-bf16", "--iters",
         "1", "--batch-size", "2", "--eval-every", "0", "--final-eval", "off", "--no-final-grid",
         "--out", out], cwd=ROOT, check=True, capture_output=True))
    cfg = checkpoints.read_checkpoint(os.path.join(out, "ckpt.pt"))["config"]
    batch, iters = RUNS[preset]
    return seconds, {**cfg, "batch_size": batch, "iters": iters, "bf16": True}


def step_seconds(cfg, m, fake, mfu):
    """One step on the H100; with act_ckpt each pass with gradient runs its forward twice (not in
    MFU's count, in the time)."""
    model, L = checkpoints.build_model(cfg, 384), cfg["text_len"]
    flops = control.step_flops(model, L, cfg["batch_size"], m, fake, cfg["k"], True)
    again = {"bf16": flops["bf16"] / 3 * cfg["act_ckpt"]}  # the recomputed forwards
    return gpu_seconds(flops, mfu) + gpu_seconds(again, mfu)


def run_seconds(cfg, mfu):
    """-> (fm, selfe) seconds of the whole training on the H100."""
    B, iters = cfg["batch_size"], cfg["iters"]
    aux_from = int(cfg["aux_start"] * iters)
    fm = iters * step_seconds(cfg, 0, False, mfu)
    se = aux_from * step_seconds(cfg, B // 2, False, mfu) + (iters - aux_from) * step_seconds(
        cfg, B // 2, True, mfu)
    return fm, se


def main():
    with tempfile.TemporaryDirectory() as folder:
        (start_s, cfg), (_, long_cfg) = (start_up(p, folder) for p in RUNS)
    data = shapes.TrainingData(cfg["res"])
    B = cfg["batch_size"]
    render_s = min(timed(lambda: data.batch(B, np.random.default_rng(k)))[0] for k in range(3))
    rows = [m for m in shapes.eval_prompts(shapes.EVAL_SIZES["medium"])
            for _ in range(shapes.IMAGES_PER_PROMPT)]
    truth = shapes.to_model(torch.from_numpy(np.stack(shapes.true_scenes(rows, cfg["res"]))))

    def draw(prompts, seed):  # true scenes stand in for the model's: the judge's work, alone
        return {k: truth[seed:seed + len(prompts)] for k in EVAL_STEPS}
    judge_s, _ = timed(lambda: shapes.evaluate(draw, cfg["res"], shapes.EVAL_SIZES["medium"],
                                               progress=False))
    F = checkpoints.build_model(cfg, 384).flops(cfg["text_len"])
    sampled = {"tf32": F * 2 * sum(EVAL_STEPS) * len(rows)}  # 2 passes a step (guidance)
    print(f"CPU, one thread (measured): train.py's start-up {start_s:.1f} s, one batch of {B} "
          f"rendered {render_s:.2f} s ({cfg['workers']} workers: one every "
          f"{render_s / cfg['workers'] * 1000:.0f} ms), ShapesEval medium's judge {judge_s:.1f} s "
          f"({len(rows) * len(EVAL_STEPS)} images)")
    print(f"H100 (FLOP count; peaks bf16 {PEAKS['bf16'] / 1e12:.0f}, TF32 "
          f"{PEAKS['tf32'] / 1e12:.0f} TFLOP/s):")
    m = B // 2
    for name, jumps, fake in (("fm", 0, False), ("selfe", m, False), ("selfe, fake pass", m, True)):
        print(f"  {name}: " + ", ".join(f"{1000 * step_seconds(cfg, jumps, fake, u):.0f} ms a step "
                                       f"at {u:.0%} MFU" for u in (0.35, 0.2)))
    for u in (0.35, 0.2):
        fm, se = run_seconds(cfg, u)
        print(f"  gpu preset at {u:.0%} MFU: fm {fm:.0f} s, selfe {se:.0f} s; ShapesEval medium's "
              f"sampling {gpu_seconds(sampled, u):.1f} s")
    fm, se = run_seconds(long_cfg, 0.35)
    print(f"  gpu-long preset at 35% MFU: fm {fm / 60:.0f}, selfe {se / 60:.0f} minutes")


if __name__ == "__main__":
    main()
