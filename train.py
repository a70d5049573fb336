"""
Train a Self-E text-to-image model from scratch.

    python train.py                       # the shapes world; the cpu preset, or gpu with CUDA
    python train.py --method fm           # the flow-matching baseline: same model, data, schedule
    python train.py --data DIR            # your images: DIR/metadata.jsonl or NAME.txt captions
    python train.py --out out --resume    # continue the run in out/ (after Ctrl-C, a crash, kill)
    torchrun --nproc_per_node=8 train.py  # DistributedDataParallel; --batch-size stays global

Every key of CONFIG and PRESETS is a flag (underscores become hyphens). A run writes to --out:
ckpt.pt (model, EMA, optimiser, step, config; written atomically), model/ (the EMA weights alone,
model.safetensors + config.json: the file to hand out; sample.py loads either), log.jsonl,
samples/ and, on the shapes world, eval/ (the ShapesEval table at the end). The randomness of
step i (data, times, noise) is seeded by (seed, process, i), so a resumed run continues exactly
where it stopped, and --resume keeps what defines a run (IDENTITY) as it was saved.
"""
import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import selfe
from harness import shapes
from harness.checkpoints import (build_model, export_ema, load_weights, read_checkpoint,
                                 recipe_of, save_checkpoint)
from harness.cli import InputError, Parser, check_writable, run_cli
from harness.control import (Clock, Interrupt, Tally, agree, memory_estimate, minutes, open_log,
                             progress_figures, shield, speed, step_flops, step_unless)
from harness.data import Batches, FolderData, loader, step_seed
from harness.draw import allow_tf32, generate, sampler_of
from harness.text_encoder import TextEncoder, TextTable

# -------------------------------------------------------------------------------------------------
# Config: plain defaults, each with its help. None: the preset gives it.
CONFIG = {
    "out": ("out", "folder for everything the run writes"),
    "data": ("shapes", "'shapes' (built in, infinite) or a folder of captioned images "
                       "(metadata.jsonl as Hugging Face's imagefolder, or NAME.txt)"),
    "preset": ("auto", "cpu | gpu | gpu-long | auto (gpu when CUDA is there); README: minutes"),
    "method": ("selfe", "selfe | fm (flow-matching baseline: s = t always, no self-evaluation)"),
    "renorm": (True, "energy-preserving target, Eq. 19 (off: the paper's 'w/o target norm')"),
    "aux_start": (None, "fraction of the run after which the fake-score term is on; 0 = from the "
                        "start (ablation), 1 = never; preset: cpu 1 (stage one only), gpu the "
                        "paper's 0.77"),
    "k": (None, "the classifier score's share of the self-evaluation once the fake-score term is "
                "on; the rest is the fake-score correction; preset: the paper's 0.9"),
    "tau_ramp": (0.4, "fraction of the run over which tau ramps 0 -> 1 (paper: 300k of 710k)"),
    "p_equal": (0.5, "fraction of rows with s = t (paper)"),
    "p_null": (0.1, "probability of the empty prompt (ours; the paper gives none)"),
    "shift": (1.0, "time shift of training and sampling; 1 suits small pixel resolutions"),
    "ema_eval": (True, "EMA weights for the conditional self-evaluation (paper); "
                       "--no-ema-eval: the online weights"),
    "null_any_s": (True, "the empty prompt on any row (ours, measured); --no-null-any-s: only "
                         "on s = t rows"),
    "min_lr": (1e-5, "learning rate at the end of the linear decay (paper)"),
    "ema": (0.9999, "EMA decay (paper), warmed up as min(ema, (1 + step) / (10 + step))"),
    "clip": (1.0, "gradient clipping norm (ours)"),
    "text_encoder": ("default", "Hugging Face id or folder; 'default': all-MiniLM-L6-v2, offline"),
    "log_every": (25, "steps between progress updates and log.jsonl lines"),
    "sample_every": (1000, "steps between sample grids (EMA weights; 2, 4, 8, 50 steps)"),
    "final_grid": (True, "a sample grid at the end of the run (--no-final-grid: none)"),
    "eval_every": (500, "steps between ShapesEval scores (small set, 2 and 8 steps); 0 = off"),
    "final_eval": ("medium", "ShapesEval set scored at 2, 4, 8 and 50 steps at the end: "
                             "small | medium | full | off"),
    "ckpt_every": (1000, "steps between checkpoints (and at the end, and on Ctrl-C / SIGTERM)"),
    "seed": (0, "seed for weights, data and noise"),
}
DEFAULTS = {k: v for k, (v, _) in CONFIG.items()}
PRESETS = {
    # 2 CPU cores, the table at the end (README: minutes); warm-up 100 (the paper: 1k of 710k);
    # stage one only (--aux-start 0.77: the paper's second stage); workers 0: both cores are busy
    # with the step
    "cpu": dict(model="tiny", res=32, patch=4, text_len=16, batch_size=32, iters=2600, lr=1e-3,
                warmup=100, aux_start=1.0, k=0.9, compile=False, bf16=False, workers=0,
                act_ckpt=False),
    # one GPU, sized by FLOPs (results/README.md: the budget); iterations and lr to be set by a
    # measured run; workers: processes that render batches ahead of the GPU
    "gpu": dict(model="small", res=32, patch=2, text_len=16, batch_size=256, iters=2000, lr=5e-4,
                warmup=100, aux_start=0.77, k=0.9, compile=True, bf16=True, workers=12,
                act_ckpt=False),
    # hours: 64 px, room for longer captions, the paper's warm-up; act_ckpt: activations
    # recomputed, for memory (the start-up line gives the estimate)
    "gpu-long": dict(model="small", res=64, patch=2, text_len=64, batch_size=256, iters=50000,
                     lr=3e-4, warmup=1000, aux_start=0.77, k=0.9, compile=True, bf16=True,
                     workers=12, act_ckpt=True),
}
CHOICES = {"preset": ["auto", *PRESETS], "method": ["selfe", "fm"], "model": list(selfe.MODELS),
           "final_eval": [*shapes.EVAL_SIZES, "off"]}
WARMUP_SHARE = 0.1  # the warm-up is at most this share of the run, so a short run reaches --lr
# A resumed run keeps these: they define the model and what it learns. Other flags may change.
IDENTITY = ("model", "res", "patch", "text_encoder", "text_len", "method", "data")


def flag(key):
    return "--" + key.replace("_", "-")


def config_parser():
    """A flag for every key of CONFIG and the presets. None is the default of every flag, so that
    the flags given win over a preset and over a resumed run's config."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in {**DEFAULTS, **PRESETS["cpu"]}.items():
        helptext = CONFIG[k][1] if k in CONFIG else "(preset)"
        if isinstance(v, bool):
            p.add_argument(flag(k), action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=helptext)
        else:
            p.add_argument(flag(k), type=type(v), choices=CHOICES.get(k),
                           default=argparse.SUPPRESS, help=helptext)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    return p


def finish_config(cfg, world, quiet=False):
    """The preset fills in what neither a flag nor a resumed config gave; then the checks."""
    if cfg["preset"] == "auto":
        cfg["preset"] = "gpu" if torch.cuda.is_available() else "cpu"
        if not quiet:
            why = "CUDA found" if cfg["preset"] == "gpu" else "no GPU found"
            print(f"preset: {cfg['preset']} ({why}; --preset to choose)")
    cfg.update({k: v for k, v in PRESETS[cfg["preset"]].items() if cfg.get(k) is None})
    checks = [
        (cfg["res"] % cfg["patch"] == 0, f"--res {cfg['res']} is not a multiple of --patch "
                                         f"{cfg['patch']}"),
        (min(cfg["iters"], cfg["batch_size"], cfg["text_len"], cfg["res"]) >= 1,
         "--iters, --batch-size, --text-len and --res must be at least 1"),
        (cfg["batch_size"] % world == 0, f"--batch-size {cfg['batch_size']} (global) is not "
                                         f"divisible by {world} processes"),
        (cfg["lr"] > 0 and cfg["clip"] > 0 and cfg["warmup"] >= 0,
         "--lr and --clip must be positive, --warmup at least 0"),
        (0 <= cfg["p_equal"] <= 1 and 0 <= cfg["p_null"] < 1 and 0 <= cfg["k"] <= 1,
         "--p-equal and --k must lie in [0, 1], --p-null in [0, 1)"),
        (min(cfg["log_every"], cfg["ckpt_every"], cfg["sample_every"]) >= 1
         and cfg["eval_every"] >= 0, "--log-every, --ckpt-every and --sample-every must be at "
                                     "least 1, --eval-every at least 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    return cfg


def resolve_paths(cfg):
    """A folder given as --data or --text-encoder -> its absolute path, saved so that the run
    resumes and samples from any directory."""
    for k, builtin in (("data", "shapes"), ("text_encoder", "default")):
        if cfg.get(k, builtin) != builtin and os.path.exists(cfg[k]):
            cfg[k] = os.path.abspath(cfg[k])
    return cfg


def gone(value):
    """True for a folder a run saved (an absolute path) that is not there any more."""
    return isinstance(value, str) and os.path.isabs(value) and not os.path.exists(value)


def resumed_config(saved, given, path, quiet=False):
    """The saved run's config under the flags given with --resume. The flags of IDENTITY must
    match (a saved folder that has moved may be given anew); any other change is printed."""
    saved = resolve_paths(dict(saved))  # a checkpoint from before paths were saved absolute
    for k, v in given.items():
        old = saved.get(k, DEFAULTS.get(k))
        if k == "out" or v == old:
            continue
        if k in IDENTITY and not gone(old):
            keeps = ", ".join(map(flag, IDENTITY))
            raise InputError(f"{flag(k)} {v} differs from the run's {old} ({path}): a resumed run "
                             f"keeps its {keeps}; start a new --out to change them")
        if not quiet:
            print(f"overriding {k}: {old} -> {v}")
    for k in ("data", "text_encoder"):
        if k not in given and gone(saved[k]):
            raise InputError(f"the run's {k.replace('_', ' ')} folder {saved[k]} is not there "
                             f"any more: give its new place with {flag(k)}")
    return {**DEFAULTS, **saved, **given}


def setup_device(cfg, world):
    """-> this process's device; joins the process group when torchrun started several."""
    cuda = cfg["preset"] != "cpu" and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
        allow_tf32()
    return torch.device("cuda", local) if cuda else torch.device("cpu")


def warmup_steps(cfg):
    return min(cfg["warmup"], int(WARMUP_SHARE * cfg["iters"]))


def lr_at(step, cfg):
    """Linear warm-up, then linear decay to min_lr (paper)."""
    warmup = warmup_steps(cfg)
    if step < warmup:
        return cfg["lr"] * (step + 1) / warmup
    frac = (step - warmup) / max(1, cfg["iters"] - warmup)
    return cfg["lr"] + frac * (cfg["min_lr"] - cfg["lr"])


def tau_at(step, cfg):
    return min(1.0, step / max(1, cfg["tau_ramp"] * cfg["iters"]))


def aux_on(step, cfg):
    return cfg["method"] == "selfe" and step >= cfg["aux_start"] * cfg["iters"]


# -------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    """Train; returns the trained model (unwrapped) on every process."""
    interrupt = Interrupt()
    try:
        return train(sys.argv[1:] if argv is None else argv, interrupt)
    except RuntimeError as e:  # torch's words when a data worker dies (killed, out of memory)
        if not str(e).startswith("DataLoader worker"):
            raise
        why = str(e).strip().rstrip(".")
        raise SystemExit(f"error: a data worker died ({why}; out of memory?); "
                         f"{interrupt.last_save}") from None
    finally:
        interrupt.restore()
        if dist.is_initialized():
            dist.destroy_process_group()


def train(argv, interrupt):
    started = time.perf_counter()
    given = resolve_paths(vars(config_parser().parse_args(argv)))
    resume = given.pop("resume")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun
    out = given.setdefault("out", DEFAULTS["out"])  # where the run is, even if it moved
    ckpt_path = check_out(out, resume)
    ckpt = read_checkpoint(ckpt_path) if resume else None
    if ckpt:
        interrupt.saved(ckpt_path, ckpt["step"], out)
    if ckpt and rank == 0:
        print(f"resuming {ckpt_path} at step {ckpt['step']}")
    cfg = resumed_config(ckpt["config"], given, ckpt_path, rank > 0) if ckpt else {**DEFAULTS,
                                                                                  **given}
    cfg = finish_config(cfg, world, rank > 0)
    if ckpt and cfg["iters"] <= ckpt["step"]:
        raise InputError(f"{ckpt_path} is at step {ckpt['step']} and --iters is {cfg['iters']}: "
                         f"nothing to train; give --iters above {ckpt['step']}")
    device = setup_device(cfg, world)
    data = shapes.TrainingData(cfg["res"]) if cfg["data"] == "shapes" else \
        FolderData(cfg["data"], cfg["res"], quiet=rank > 0)

    # The model, its moving average (sampled, evaluated, and the paper's conditional judge) and Adam
    torch.manual_seed(cfg["seed"])
    text = TextEncoder(cfg["text_encoder"], cfg["text_len"], device)
    model = build_model(cfg, text.dim).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), fused=True)
    step = 0
    if ckpt:
        load_weights(model, ckpt["model"], ckpt_path)
        load_weights(ema, ckpt["ema"], ckpt_path)
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    net, eval_net = model, ema if cfg["ema_eval"] else None  # online; the conditional judge
    if cfg["compile"]:  # whole graphs (a graph break is an error), static shapes
        net = torch.compile(model, fullgraph=True, dynamic=False)
        eval_net = torch.compile(ema, fullgraph=True, dynamic=False) if cfg["ema_eval"] else None
    if world > 1:  # the only buffer, pos, never changes
        ids = None if device.index is None else [device.index]
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids,
                                                        broadcast_buffers=False)
    autocast = torch.autocast(device.type, torch.bfloat16) if cfg["bf16"] else nullcontext()
    recipe = recipe_of(cfg)
    batch = cfg["batch_size"] // world  # per process
    null, null_fake = text([""] * batch), text(text.fake_prompts([""] * batch))
    fake_on = aux_on(cfg["iters"] - 1, cfg)  # the fake-score term runs at some step of this run
    if rank == 0:  # only now that every input has been read: bad input leaves no folder behind
        check_writable(os.path.join(cfg["out"], "samples"))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{cfg['method']} | model {cfg['model']} ({params:.2f}M params) | {cfg['res']}px "
              f"patch {cfg['patch']} | batch {cfg['batch_size']} ({world} process(es)) | "
              f"{cfg['iters']} iters | {device}")
        print_notes(cfg, text, data.captions)
        with torch.random.fork_rng(devices=[]):  # the run's random numbers stay as they were
            memory = memory_estimate(cfg, text.dim, batch)
        first = aux_on(0, cfg)  # the fake-score pass on from the first step
        later = f", {memory[True] / 1e9:.2f} GB once the fake-score pass is on" * (fake_on > first)
        print(f"memory: about {memory[first] / 1e9:.2f} GB a step{later} (estimated per process: "
              f"weights, gradients, Adam, EMA and saved activations; --act-ckpt "
              f"{'on' if cfg['act_ckpt'] else 'off'})")
    t0 = time.perf_counter()
    table = TextTable(text, data.captions, fake=fake_on,
                      dtype=torch.float16 if cfg["bf16"] else torch.float32, folder=cfg["out"])
    if rank == 0:
        print(f"text: {len(table.captions)} captions{' and their fake prompts' * fake_on} "
              f"encoded in {time.perf_counter() - t0:.1f} s"
              + " (token states in text_tokens.npy)" * bool(table.on_file))

    log = open_log(os.path.join(cfg["out"], "log.jsonl")) if rank == 0 else None
    batches = loader(Batches(data, batch, cfg["seed"], rank, table.row),
                     range(step, cfg["iters"]), cfg["workers"], pin=device.type == "cuda")
    bar = tqdm(total=cfg["iters"], initial=step, desc="train", dynamic_ncols=True, disable=rank > 0)
    tally, clock = Tally(device, ckpt["skipped"] if ckpt else 0), Clock(device)
    # the steps where torch.compile builds graphs: the first of this process and the first with
    # the fake-score term. Their time is compilation, kept out of the speed figures.
    builds = {step, next((i for i in range(step, cfg["iters"]) if aux_on(i, cfg)), None)}
    for images, rows in batches:
        # One optimiser step: batch -> loss -> backward -> clip -> Adam -> EMA, no host sync.
        with clock.off(step in builds), shield(step in builds):
            x0 = shapes.to_model(images.to(device, non_blocking=True))  # (B, 3, H, W) in [-1, 1]
            cond = table(rows)
            fake = table(rows, fake=True) if aux_on(step, cfg) else None
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            torch.manual_seed(step_seed(cfg["seed"], rank, step))  # this step's times and noise
            with autocast:
                loss, stats = selfe.selfe_loss(net, x0, cond, null, fake, null_fake,
                                               tau=tau_at(step, cfg), recipe=recipe,
                                               eval_net=eval_net)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
            bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float()
            if world > 1:  # a fault on one process skips the step on all of them
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            step_unless(opt, bad)
            selfe.ema_update(ema, model, selfe.ema_decay(step, cfg["ema"]))
        clock.steps += step not in builds
        tally.add(loss.detach(), bad, stats["frac_self"])
        step += 1
        bar.update(1)

        # Everything else: the log, Ctrl-C, checkpoints, grids, evaluations
        if step % cfg["log_every"] == 0 or step == cfg["iters"]:
            tally.stop_if_failing(step, ckpt_path, bar)
            rec = progress_record(step, cfg, tally, clock, grad_norm, stats, model, recipe, batch,
                                  device)
            if rank == 0:
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(progress_figures(rec))
        # one process checks every step; several agree at log steps only (a check costs a sync)
        stop = interrupt.requested if world == 1 else (
            step % cfg["log_every"] == 0 and agree(interrupt.requested, device))
        if rank == 0:
            save_and_show(step, stop, cfg, model, ema, opt, text, data, log, clock, interrupt,
                          tally)
        if stop:
            bar.close()
            if rank == 0:
                print(f"interrupted at step {step}: saved {ckpt_path}; continue with --resume "
                      f"--out {cfg['out']}")
            return model
    bar.close()
    interrupt.at_once = True  # the run is saved: from here Ctrl-C or SIGTERM stops at once
    if interrupt.requested:  # one came during the last grid or evaluation
        raise KeyboardInterrupt
    if rank == 0 and cfg["data"] == "shapes" and cfg["final_eval"] != "off":
        final_eval(ema, text, cfg, step, log)
    if rank == 0:
        print(f"done in {minutes(time.perf_counter() - started)}: {ckpt_path}, samples in "
              f"{os.path.join(cfg['out'], 'samples')}")
    return model


def progress_record(step, cfg, tally, clock, grad_norm, stats, model, recipe, batch, device):
    """log.jsonl's line for the steps since the last (loss, lr, speed, MFU, ...); the tally and
    the clock start their next window."""
    seconds, timed = clock.lap()
    flops = step_flops(model, cfg["text_len"], batch, recipe.jump_rows(batch),
                       aux_on(step - 1, cfg), cfg["k"], cfg["bf16"])
    fig = speed(seconds, timed, flops, cfg["batch_size"], device) if timed else {}
    return {"step": step, **tally.read(), "grad_norm": grad_norm.item(),
            "aux": float(stats["aux"]), "lr": lr_at(step - 1, cfg), "tau": tau_at(step - 1, cfg),
            **fig, "time": time.time()}


def save_and_show(step, stop, cfg, model, ema, opt, text, data, log, clock, interrupt, tally):
    """At their steps, at the end and on a stop: the checkpoint and export; then, unless stopping,
    the sample grid and the small ShapesEval. None of it counts as training time."""
    last, ckpt_path = step == cfg["iters"], os.path.join(cfg["out"], "ckpt.pt")
    save = step % cfg["ckpt_every"] == 0 or last or stop
    grid = not stop and (step % cfg["sample_every"] == 0 or last and cfg["final_grid"])
    score = not stop and cfg["data"] == "shapes" and cfg["eval_every"] > 0 and (
        step % cfg["eval_every"] == 0 or last) and not (last and cfg["final_eval"] != "off")
    with clock.off(save or grid or score):
        if save:
            save_checkpoint(ckpt_path, model, ema, opt, step, cfg, text.dim,
                            int(tally.skipped.item()))
            export_ema(os.path.join(cfg["out"], "model"), ema, cfg, step, text.dim)
            interrupt.saved(ckpt_path, step, cfg["out"])
        if grid:
            write_grid(ema, text, data, cfg, step)
        if score:
            write_eval(ema, text, cfg, step, log)


def print_notes(cfg, text, captions):
    """What a run does that its flags do not say: a capped warm-up, captions cut short."""
    if warmup_steps(cfg) < cfg["warmup"]:
        print(f"warm-up: {warmup_steps(cfg)} steps (--warmup {cfg['warmup']} is capped at "
              f"{WARMUP_SHARE:.0%} of --iters {cfg['iters']})")
    captions = list(dict.fromkeys(captions))
    long = [n for n in text.count_tokens(captions) if n > text.max_len]
    if long:
        print(f"captions: {len(long)} of {len(captions)} are longer than --text-len "
              f"{text.max_len} tokens and are cut (the longest: {max(long)} tokens)")
    if aux_on(cfg["iters"] - 1, cfg):
        fakes = text.fake_prompts(captions)
        cut = sum(f != c for f, c in zip(fakes, selfe.fake_prompts(captions)))
        if cut:
            print(f"fake prompts: {cut} of {len(captions)} captions give up their last tokens "
                  f"so that the fake prompt keeps \"fake image\" within --text-len {text.max_len}")


def check_out(out, resume):
    """-> the run's checkpoint path. A new run never writes into the folder of another, even one
    that stopped before its first checkpoint (its log.jsonl)."""
    ckpt_path, log = os.path.join(out, "ckpt.pt"), os.path.join(out, "log.jsonl")
    held = [os.path.basename(f) for f in (ckpt_path, log) if os.path.exists(f)]
    if not resume and held:
        raise InputError(f"{out} holds a run ({held[0]}): add --resume to continue it, or choose "
                         f"another --out")
    if resume and held == ["log.jsonl"]:
        raise InputError(f"{ckpt_path} does not exist: the run in {out} stopped before its first "
                         f"checkpoint; start it again with another --out")
    return ckpt_path


# -------------------------------------------------------------------------------------------------
# Grids and ShapesEval: what the model draws and scores, during and after training


GRID_PROMPTS = ["a photo of a red circle", "a photo of a blue square",
                "a photo of a triangle and a circle", "a photo of three squares",
                "a photo of a circle left of a square",
                "a photo of a yellow triangle and a green square"]


def drawer(ema, text, cfg, steps_list):
    """-> draw(prompts, seed): ShapesEval's view of the model."""
    return lambda prompts, seed: generate(ema, text, prompts, steps_list, seed, cfg["shift"],
                                          sampler_of(cfg))


def write_grid(ema, text, data, cfg, step):
    prompts = GRID_PROMPTS if cfg["data"] == "shapes" else list(dict.fromkeys(data.captions))[:6]
    images = generate(ema, text, prompts, [2, 4, 8, 50], 0, cfg["shift"], sampler_of(cfg))
    shapes.save_grid(images, prompts, os.path.join(cfg["out"], "samples", f"step_{step:06d}.png"))


def write_eval(ema, text, cfg, step, log):
    """ShapesEval small at 2 and 8 steps into log.jsonl, so a user can watch the few-step score
    rise, and beside it how well the model's own classifier tells prompts apart."""
    results, _, _ = shapes.evaluate(drawer(ema, text, cfg, [2, 8]), ema.res,
                                    shapes.EVAL_SIZES["small"], progress=False)
    scores = {k: round(r["overall"], 4) for k, r in results.items()}
    fd = {k: round(r["fd"], 3) for k, r in results.items()}
    swaps = {k: round(v, 4) for k, v in shapes.swap_accuracy(ema, text).items()}
    log.write(json.dumps({"step": step, "eval_overall": scores, "eval_fd": fd,
                          "swap_accuracy": swaps}) + "\n")
    tqdm.write(f"step {step}: ShapesEval overall (scene distance) "
               + ", ".join(f"{scores[k]:.3f} ({fd[k]:.2f}) at {k} steps" for k in scores)
               + "; swap accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in swaps.items()))


def final_eval(ema, text, cfg, step, log):
    """The paper's table in miniature: ShapesEval of the EMA weights at 2, 4, 8 and 50 steps."""
    t0, out, size = time.perf_counter(), os.path.join(cfg["out"], "eval"), cfg["final_eval"]
    os.makedirs(out, exist_ok=True)
    info = {"ckpt": os.path.join(cfg["out"], "ckpt.pt"), "step": step, "method": cfg["method"],
            "sampler": {**dataclasses.asdict(sampler_of(cfg)), "shift": cfg["shift"]}}
    results = shapes.report(drawer(ema, text, cfg, [2, 4, 8, 50]), ema.res, size, out, info)
    log.write(json.dumps({"step": step, "final_eval": size,
                          "seconds": round(time.perf_counter() - t0, 1),
                          "final_overall": {k: round(r["overall"], 4) for k, r in results.items()},
                          "final_fd": {k: round(r["fd"], 3) for k, r in results.items()}}) + "\n")
    log.flush()
    print(f"\nShapesEval {size} ({shapes.eval_images(size)} images per step count), "
          f"{cfg['method']}, EMA weights at step {step} ({minutes(time.perf_counter() - t0)}; "
          f"{out}/results.json, grid.png):")
    print(shapes.markdown_table({f"{k} steps": r for k, r in results.items()}, "steps"))


if __name__ == "__main__":
    run_cli(main)
