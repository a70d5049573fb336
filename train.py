"""
Train a Self-E text-to-image model from scratch.

    python train.py                      # built-in shapes world; CPU preset without a GPU, GPU preset with one
    python train.py --method fm          # the flow-matching baseline: same model, data and schedule
    python train.py --data DIR           # your images: DIR/metadata.jsonl or a .txt caption beside each image
    python train.py --out out --resume   # continue the run saved in out/ (after Ctrl-C, a crash, kill -9)
    torchrun --nproc_per_node=8 train.py # DistributedDataParallel; --batch-size is the global batch

Every key of the config and the presets (recipe.py) is a flag, underscores become hyphens. Everything a run writes
goes to --out: ckpt.pt (model, EMA, optimiser, step, config; written atomically), log.jsonl,
samples/step_NNNNNN.png, and eval/ (the ShapesEval table at the end). The randomness of step k (data, times, noise)
is drawn from seeds (seed, rank, k), so a resumed run continues exactly where the checkpoint left it.
"""
import json
import os
import signal
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import recipe
import shapes
from common import SAMPLERS, check_writable, eval_report, generate, read_checkpoint, run_cli, save_checkpoint, \
    save_grid, shapes_eval, swap_accuracy
from selfe import InputError

GRID_PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of a triangle and a circle",
                "a photo of three squares", "a photo of a circle left of a square",
                "a photo of a yellow triangle and a green square"]
MAX_BAD_STEPS = 10  # this many non-finite steps in a row stop the run


def main(argv=None):
    """Train; returns the trained model (unwrapped) on every process."""
    interrupt = Interrupt()
    try:
        return train(sys.argv[1:] if argv is None else argv, interrupt)
    finally:
        interrupt.restore()
        if dist.is_initialized():
            dist.destroy_process_group()


def train(argv, interrupt):
    started = time.perf_counter()
    p = recipe.config_parser(__doc__)
    p.add_argument("--resume", action="store_true", help="continue the run in --out (its config, then your flags)")
    given = vars(p.parse_args(argv))
    resume = given.pop("resume")
    cfg = {**recipe.DEFAULTS, **given}
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets them
    ckpt_path = os.path.join(cfg["out"], "ckpt.pt")
    ckpt = None
    if resume:
        ckpt = read_checkpoint(ckpt_path)
        cfg = {**cfg, **ckpt["config"], **given}  # the run's own config, then the flags given now
        if rank == 0:
            print(f"resuming {ckpt_path} at step {ckpt['step']}")
    elif os.path.exists(ckpt_path):
        raise InputError(f"{ckpt_path} exists: add --resume to continue that run, or choose another --out")
    cfg = recipe.finish_config(cfg, world, quiet=rank > 0)
    device = recipe.setup_device(cfg, world)
    source = data.from_config(cfg, quiet=rank > 0)
    run = recipe.Trainer(cfg, device, rank, world, ckpt, ckpt_path)
    if rank == 0:  # only now that every input has been read: bad input leaves no folder behind
        check_writable(os.path.join(cfg["out"], "samples"))
    if device.type == "cuda":  # on a CPU the encoder and the step share the cores: no GPU to keep busy
        run.encode_ahead(source.captions)
    step = ckpt["step"] if ckpt else 0
    if rank == 0:
        print(f"{cfg['method']} | model {cfg['model']} ({sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M "
              f"params) | {cfg['res']}px patch {cfg['patch']} | batch {cfg['batch_size']} ({world} process(es)) | "
              f"{cfg['iters']} iters | {device}")
    log = open_log(os.path.join(cfg["out"], "log.jsonl")) if rank == 0 else None
    loader = data.batches(data.Batches(source, run.batch, cfg["seed"], rank), range(step, cfg["iters"]),
                          cfg["workers"], pin=device.type == "cuda")
    bar = tqdm(total=cfg["iters"], initial=step, desc="train", dynamic_ncols=True, disable=rank > 0)
    tally, clock = Tally(device, ckpt["skipped"] if ckpt else 0), Clock(device)
    # the steps where torch.compile builds new graphs: the first of this process and the first with the fake-score
    # term (new batch sizes and grad modes for the network). Their time is compilation, kept out of the speed.
    builds = {step, next((k for k in range(step, cfg["iters"]) if recipe.aux_on(k, cfg)), None)}
    for x0, captions in loader:
        with clock.off(step in builds):
            loss, grad_norm, bad, stats = run.step(step, x0, captions)
        clock.steps += step not in builds
        tally.add(loss, bad, stats["frac_self"])
        step += 1
        bar.update(1)
        last = step == cfg["iters"]

        if step % cfg["log_every"] == 0 or last:
            if tally.worst.item() >= MAX_BAD_STEPS:
                raise SystemExit(f"error: {int(tally.worst.item())} steps in a row had a non-finite loss or gradient "
                                 f"(by step {step}); stopped. {ckpt_path} holds the last good weights: --resume "
                                 f"with a lower --lr or --clip")
            seconds, timed = clock.lap()
            fig = recipe.speed(seconds, timed, run.flops(step - 1), cfg["batch_size"], device) if timed else {}
            rec = {"step": step, **tally.read(), "grad_norm": grad_norm.item(), "aux": float(stats["aux"]),
                   "lr": recipe.lr_at(step - 1, cfg), "tau": recipe.tau_at(step - 1, cfg), **fig, "time": time.time()}
            if rank == 0:
                log.write(json.dumps(rec) + "\n")
                log.flush()
                shown = float("nan") if rec["loss"] is None else rec["loss"]
                bar.set_postfix(loss=f"{shown:.4f}", img_s=f"{rec.get('img_per_s', float('nan')):.0f}",
                                tau=f"{rec['tau']:.2f}")
        # one process alone checks every step; several agree at log steps only (a check costs a sync)
        stop = interrupt.requested if world == 1 else (step % cfg["log_every"] == 0
                                                        and agree(interrupt.requested, device))
        save = rank == 0 and (step % cfg["ckpt_every"] == 0 or last or stop)
        grid = rank == 0 and (step % cfg["sample_every"] == 0 or last)
        score = rank == 0 and cfg["data"] == "shapes" and cfg["eval_every"] and (step % cfg["eval_every"] == 0 or last)
        with clock.off(save or grid or score):  # checkpoints, grids and evaluations are not training time
            if save:
                save_checkpoint(ckpt_path, run.model, run.ema, run.opt, step, cfg, run.text.dim,
                                int(tally.skipped.item()))
            if stop:
                bar.close()
                if rank == 0:
                    print(f"interrupted at step {step}: saved {ckpt_path}; continue with --resume --out {cfg['out']}")
                return run.model
            if grid:
                write_grid(run, source, step)
            if score:
                write_eval(run, step, log)
    bar.close()
    interrupt.at_once = True  # the run is saved: from here Ctrl-C or SIGTERM stops the process at once
    if interrupt.requested:  # one came during the last grid or evaluation
        raise KeyboardInterrupt
    if rank == 0 and cfg["data"] == "shapes" and cfg["final_eval"] != "off":
        final_eval(run, step, log)
    if rank == 0:
        print(f"done in {minutes(time.perf_counter() - started)}: {ckpt_path}, samples in "
              f"{os.path.join(cfg['out'], 'samples')}")
    return run.model


# ---------------------------------------------------------------------------------------------------------------
# What the loop calls


class Tally:
    """Running figures of the steps since the last log line, kept on the device: reading one costs a host sync,
    so the loop reads them every log_every steps only. skipped: the non-finite steps of the whole run, resumes
    included; worst: the longest run of them in a row."""

    def __init__(self, device, skipped):
        zero = torch.zeros((), device=device)
        self.skipped = zero + skipped
        self.streak, self.worst, self.bad, self.loss, self.frac_self = (zero.clone() for _ in range(5))
        self.steps = 0

    def add(self, loss, bad, frac_self):
        self.skipped += bad
        self.streak = (self.streak + 1) * bad
        self.worst = torch.maximum(self.worst, self.streak)
        self.bad += bad
        self.loss += torch.nan_to_num(loss) * (1 - bad)
        self.frac_self += frac_self
        self.steps += 1

    def read(self):
        """-> the window's mean loss (over its good steps), fraction of s < t rows and the skipped steps so far;
        then starts a new window."""
        good = self.steps - self.bad.item()
        rec = {"loss": self.loss.item() / good if good else None, "frac_self": self.frac_self.item() / self.steps,
               "skipped": int(self.skipped.item())}
        for acc in (self.bad, self.loss, self.frac_self):
            acc.zero_()
        self.steps = 0
        return rec


class Clock:
    """Training time: a stopwatch that the loop stops (off) for compilation, checkpoints, grids and evaluations.
    It waits for the device where it starts or stops, so that queued GPU work lands on the right side."""

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds, self.steps, self.t0 = 0.0, 0, time.perf_counter()

    @contextmanager
    def off(self, when=True):
        if not when:
            yield
            return
        self.sync()
        self.seconds += time.perf_counter() - self.t0
        try:
            yield
        finally:
            self.sync()
            self.t0 = time.perf_counter()

    def lap(self):
        """-> (training seconds, steps timed) since the last lap."""
        self.sync()
        now = time.perf_counter()
        out = (self.seconds + now - self.t0, self.steps)
        self.seconds, self.steps, self.t0 = 0.0, 0, now
        return out


def write_grid(run, source, step):
    prompts = GRID_PROMPTS if run.cfg["data"] == "shapes" else list(dict.fromkeys(source.captions))[:6]
    images = generate(run.ema, run.text, prompts, [2, 4, 8, 50], seed=0, shift=run.cfg["shift"],
                      **SAMPLERS[run.cfg["method"]])
    save_grid(images, prompts, os.path.join(run.cfg["out"], "samples", f"step_{step:06d}.png"))


def write_eval(run, step, log):
    """ShapesEval small at 2 and 8 steps into log.jsonl, so a user can watch the few-step score rise, and beside it
    how well the model's own classifier tells prompts apart (swap_accuracy)."""
    results, _, _ = shapes_eval(run.ema, run.text, [2, 8], "small", progress=False, shift=run.cfg["shift"],
                                **SAMPLERS[run.cfg["method"]])
    scores = {k: round(r["overall"], 4) for k, r in results.items()}
    fd = {k: round(r["fd"], 3) for k, r in results.items()}
    swaps = {k: round(v, 4) for k, v in swap_accuracy(run.ema, run.text).items()}
    log.write(json.dumps({"step": step, "eval_overall": scores, "eval_fd": fd, "swap_accuracy": swaps}) + "\n")
    tqdm.write(f"step {step}: ShapesEval overall (scene distance) "
               + ", ".join(f"{scores[k]:.3f} ({fd[k]:.2f}) at {k} steps" for k in scores)
               + "; swap accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in swaps.items()))


def final_eval(run, step, log):
    """The paper's table in miniature: ShapesEval of the EMA weights at 2, 4, 8 and 50 steps, printed and kept."""
    cfg, t0, out = run.cfg, time.perf_counter(), os.path.join(run.cfg["out"], "eval")
    os.makedirs(out, exist_ok=True)
    results = eval_report(run.ema, run.text, [2, 4, 8, 50], cfg["final_eval"], out,
                          {"ckpt": os.path.join(cfg["out"], "ckpt.pt"), "step": step, "method": cfg["method"]},
                          **SAMPLERS[cfg["method"]], shift=cfg["shift"])
    log.write(json.dumps({"step": step, "final_eval": cfg["final_eval"], "seconds": round(time.perf_counter() - t0, 1),
                          "final_overall": {k: round(r["overall"], 4) for k, r in results.items()},
                          "final_fd": {k: round(r["fd"], 3) for k, r in results.items()}}) + "\n")
    log.flush()
    print(f"\nShapesEval {cfg['final_eval']} ({shapes.eval_images(cfg['final_eval'])} images per step count), "
          f"{cfg['method']}, EMA weights at step {step} ({minutes(time.perf_counter() - t0)}; {out}/results.json, "
          f"grid.png):")
    print(shapes.markdown_table({f"{k} steps": r for k, r in results.items()}, "steps"))


def open_log(path):
    """log.jsonl for appending. A kill -9 may have cut its last line short: go on from a fresh line."""
    cut = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read() != b"\n"
    log = open(path, "a")
    if cut:
        log.write("\n")
    return log


def agree(flag, device):
    """True on every process if it is True on any: processes must stop at the same step."""
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class Interrupt:
    """Ctrl-C or SIGTERM asks the loop to save and stop after the current step; a second Ctrl-C stops at once, and
    so does the first once at_once is set (after the last step: the final evaluation). Stopping at once raises
    KeyboardInterrupt. restore() puts the previous handlers back (for notebooks and tests that call main())."""

    def __init__(self):
        self.requested, self.at_once = False, False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.at_once or self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def minutes(seconds):
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


if __name__ == "__main__":
    run_cli(main)
