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
step k (data, times, noise) is seeded by (seed, process, k), so a resumed run continues exactly
where it stopped, and --resume keeps what defines a run (IDENTITY) as it was saved.
"""
import argparse
import copy
import json
import os
import resource
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import selfe
import shapes
from cli import InputError, Parser, check_writable, run_cli
from model import (MODELS, TextEncoder, TextTable, allow_tf32, build_model, export_ema,
                   generate, load_weights, read_checkpoint, save_checkpoint)

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
    "shift": (1.0, "time shift k for training and sampling; 1 suits small pixel resolutions"),
    "ema_eval": (True, "EMA weights for the conditional self-evaluation (paper); "
                       "--no-ema-eval: the online weights"),
    "null_any_s": (True, "the empty prompt on any row (ours, measured); --no-null-any-s: only "
                         "on s = t rows"),
    "min_lr": (1e-5, "learning rate at the end of the linear decay (paper)"),
    "ema": (0.9999, "EMA decay (paper), warmed up as min(ema, (1 + k) / (10 + k))"),
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
    # 2600 iterations: the most that fit about 15 minutes on 2 CPU cores with the table at the end;
    # warm-up 100 (the paper: 1k of 710k); stage one only, as the paper's 100k-iteration runs: its
    # second stage comes late in a long run (--aux-start 0.77 for the paper's);
    # workers 0: both cores are busy with the step
    "cpu": dict(model="tiny", res=32, patch=4, text_len=16, batch_size=32, iters=2600, lr=1e-3,
                warmup=100, aux_start=1.0, k=0.9, compile=False, bf16=False, workers=0,
                act_ckpt=False),
    # minutes on one GPU, sized by FLOPs; iterations and lr to be set by a measured run.
    # workers: processes that render batches ahead of the GPU
    "gpu": dict(model="small", res=32, patch=2, text_len=16, batch_size=256, iters=2000, lr=5e-4,
                warmup=100, aux_start=0.77, k=0.9, compile=True, bf16=True, workers=12,
                act_ckpt=False),
    # hours: 64 px, room for longer captions, the paper's warm-up. act_ckpt: without it a step
    # needs an estimated 81 GB, 122 GB with the fake-score pass (the start-up line says)
    "gpu-long": dict(model="small", res=64, patch=2, text_len=64, batch_size=256, iters=50000,
                     lr=3e-4, warmup=1000, aux_start=0.77, k=0.9, compile=True, bf16=True,
                     workers=12, act_ckpt=True),
}
CHOICES = {"preset": ["auto", *PRESETS], "method": ["selfe", "fm"], "model": list(MODELS),
           "final_eval": [*shapes.EVAL_SIZES, "off"]}
MAX_BAD_STEPS = 10  # this many non-finite steps in a row stop the run
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
    batch = cfg["batch_size"] // world  # per process
    null, null_fake = text([""] * batch), text(text.fake_prompts([""] * batch))
    if rank == 0:  # only now that every input has been read: bad input leaves no folder behind
        check_writable(os.path.join(cfg["out"], "samples"))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{cfg['method']} | model {cfg['model']} ({params:.2f}M params) | {cfg['res']}px "
              f"patch {cfg['patch']} | batch {cfg['batch_size']} ({world} process(es)) | "
              f"{cfg['iters']} iters | {device}")
        print_notes(cfg, text, data.captions)
        with torch.random.fork_rng(devices=[]):  # the run's random numbers stay as they were
            memory = memory_estimate(cfg, text.dim, batch)
        print(f"memory: about {memory[False] / 1e9:.2f} GB a step, {memory[True] / 1e9:.2f} GB "
              f"with the fake-score pass (estimated per process: weights, gradients, Adam, EMA "
              f"and saved activations; --act-ckpt {'on' if cfg['act_ckpt'] else 'off'})")
    t0, fake = time.perf_counter(), aux_on(cfg["iters"] - 1, cfg)
    table = TextTable(text, data.captions, fake=fake,
                      dtype=torch.float16 if cfg["bf16"] else torch.float32, folder=cfg["out"])
    if rank == 0:
        print(f"text: {len(table.captions)} captions{' and their fake prompts' * fake} encoded in "
              f"{time.perf_counter() - t0:.1f} s" + (" (token states in text_tokens.npy)"
                                                    if table.on_file else ""))

    log = open_log(os.path.join(cfg["out"], "log.jsonl")) if rank == 0 else None
    batches = loader(Batches(data, batch, cfg["seed"], rank, table.row),
                     range(step, cfg["iters"]), cfg["workers"], pin=device.type == "cuda")
    bar = tqdm(total=cfg["iters"], initial=step, desc="train", dynamic_ncols=True, disable=rank > 0)
    tally, clock = Tally(device, ckpt["skipped"] if ckpt else 0), Clock(device)
    # the steps where torch.compile builds graphs: the first of this process and the first with
    # the fake-score term. Their time is compilation, kept out of the speed figures.
    builds = {step, next((k for k in range(step, cfg["iters"]) if aux_on(k, cfg)), None)}
    for images, rows in batches:
        # One optimiser step: batch -> loss -> backward -> clip -> Adam -> EMA, no host sync.
        with clock.off(step in builds):
            x0 = shapes.to_model(images.to(device, non_blocking=True))  # (B, 3, H, W) in [-1, 1]
            cond, fake = table(rows), table(rows, fake=True) if aux_on(step, cfg) else None
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            torch.manual_seed(step_seed(cfg["seed"], rank, step))  # this step's times and noise
            with autocast:
                loss, stats = selfe.selfe_loss(
                    net, x0, cond, null, fake, null_fake, fm=cfg["method"] == "fm",
                    tau=tau_at(step, cfg), p_equal=cfg["p_equal"], p_null=cfg["p_null"],
                    shift=cfg["shift"], renorm=cfg["renorm"], eval_net=eval_net,
                    null_any_s=cfg["null_any_s"], k=cfg["k"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
            bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float()
            if world > 1:  # a fault on one process skips the step on all of them
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            step_unless(opt, bad)
            decay = min(cfg["ema"], (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        clock.steps += step not in builds
        tally.add(loss.detach(), bad, stats["frac_self"])
        step += 1
        bar.update(1)
        last = step == cfg["iters"]

        # Everything else: the log, checkpoints, grids, evaluations, Ctrl-C
        if step % cfg["log_every"] == 0 or last:
            if tally.worst.item() >= MAX_BAD_STEPS:
                bar.close()  # the error on a line of its own
                saved = (f"{ckpt_path} holds the last good weights: --resume" if
                         os.path.exists(ckpt_path) else "no checkpoint yet: start again")
                raise SystemExit(f"error: {int(tally.worst.item())} steps in a row had a "
                                 f"non-finite loss or gradient (by step {step}); stopped. "
                                 f"{saved} with a lower --lr or --clip")
            seconds, timed = clock.lap()
            flops = step_flops(model, cfg["text_len"], stats["pass_rows"])
            fig = speed(seconds, timed, flops, cfg["batch_size"], device) if timed else {}
            rec = {"step": step, **tally.read(), "grad_norm": grad_norm.item(),
                   "aux": float(stats["aux"]), "lr": lr_at(step - 1, cfg),
                   "tau": tau_at(step - 1, cfg), **fig, "time": time.time()}
            if rank == 0:
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(progress_figures(rec))
        # one process checks every step; several agree at log steps only (a check costs a sync)
        stop = interrupt.requested if world == 1 else (
            step % cfg["log_every"] == 0 and agree(interrupt.requested, device))
        save = rank == 0 and (step % cfg["ckpt_every"] == 0 or last or stop)
        grid = rank == 0 and (step % cfg["sample_every"] == 0 or last and cfg["final_grid"])
        score = rank == 0 and cfg["data"] == "shapes" and cfg["eval_every"] > 0 and (
            step % cfg["eval_every"] == 0 or last)
        with clock.off(save or grid or score):  # none of them is training time
            if save:
                save_checkpoint(ckpt_path, model, ema, opt, step, cfg, text.dim,
                                int(tally.skipped.item()))
                export_ema(os.path.join(cfg["out"], "model"), ema, cfg, step, text.dim)
                interrupt.saved(ckpt_path, step, cfg["out"])
            if stop:
                bar.close()
                if rank == 0:
                    print(f"interrupted at step {step}: saved {ckpt_path}; continue with --resume "
                          f"--out {cfg['out']}")
                return model
            if grid:
                write_grid(ema, text, data, cfg, step)
            if score:
                write_eval(ema, text, cfg, step, log)
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
            print(f"fake prompts: {cut} of {len(captions)} captions give up their last words so "
                  f"that the fake prompt keeps \"fake image\" within --text-len {text.max_len}")


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
# Your images: a folder of captioned images


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(path, res):
    """Any image PIL reads -> RGB uint8 (res, res, 3), centre-cropped to a square and resized.
    Grayscale, palette, 16-bit and tiny images are converted; transparent pixels become white."""
    img = Image.open(path)
    img.load()  # decode now, so that a truncated file fails here
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: PIL's conversion clips it
        pixels = np.asarray(img, dtype=np.float64) / 257
        img = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return np.asarray(img.resize((res, res), Image.BICUBIC))


def read_text(path):
    """A text file as UTF-8 whatever the locale; a BOM (as Notepad writes) is dropped."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte {e.start}); save it as UTF-8") from None


def read_metadata(path):
    """metadata.jsonl (Hugging Face imagefolder) -> {file_name: caption}."""
    caps = {}
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not {"file_name", "text"} <= set(row):
            raise InputError(f"{path}, line {i}: need a JSON object with 'file_name' and 'text'")
        for k in ("file_name", "text"):
            if not isinstance(row[k], str):
                raise InputError(f"{path}, line {i}: '{k}' must be a string, not "
                                 f"{type(row[k]).__name__}")
        caps[os.path.normpath(row["file_name"])] = row["text"].strip()
    return caps


def scan_folder(root):
    """-> (every image under root, as a path relative to it; {image: caption}). Captions come from
    any metadata.jsonl (file_name relative to its own folder, subfolders allowed) or NAME.txt
    beside NAME.png. Hidden folders are skipped."""
    files, caps = [], {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        rel = os.path.relpath(folder, root)
        files += [os.path.normpath(os.path.join(rel, n)) for n in names
                  if n.lower().endswith(IMAGE_EXTS)]
        if "metadata.jsonl" in names:
            caps.update({os.path.normpath(os.path.join(rel, name)): text for name, text
                         in read_metadata(os.path.join(folder, "metadata.jsonl")).items()})
    for f in files:
        txt = os.path.join(root, os.path.splitext(f)[0] + ".txt")
        if f not in caps and os.path.exists(txt):
            caps[f] = read_text(txt).strip()
    return sorted(files), caps


class FolderData:
    """A folder of captioned images, loaded once into memory at the training resolution. Images
    without a caption, with an empty one, and files that do not decode are skipped and counted;
    none left: an error."""

    def __init__(self, root, res, quiet=False):
        if not os.path.isdir(root):
            raise InputError(f"--data {root}: no such folder (use 'shapes' for the built-in data)")
        files, caps = scan_folder(root)
        if not files:
            raise InputError(f"--data {root}: no images in it ({', '.join(IMAGE_EXTS)})")
        images, self.captions, broken = [], [], []
        uncaptioned = [n for n in files if n not in caps]
        empty = [n for n in files if caps.get(n) == ""]
        captioned = [n for n in files if caps.get(n)]
        for name in tqdm(captioned, desc="images", disable=quiet or not captioned):
            try:
                images.append(load_image(os.path.join(root, name), res))
                self.captions.append(caps[name])
            except Exception:  # PIL raises OSError, ValueError, SyntaxError, ... for damaged files
                broken.append(name)
        unmatched = sorted(set(caps) - set(files))
        skipped = ", ".join(f"{len(names)} {why}" + (f" (e.g. {names[0]})" if names else "")
                            for names, why in ((uncaptioned, "without a caption"),
                                               (empty, "with an empty one"),
                                               (broken, "unreadable"))) + (
            f"; {len(unmatched)} captions name no image here (e.g. {unmatched[0]})"
            if unmatched else "")
        if not images:
            raise InputError(f"--data {root}: no usable images: {skipped}; captions go in "
                             f"metadata.jsonl or NAME.txt beside NAME.png")
        if not quiet:
            print(f"data: {len(images)} images from {root}; skipped {skipped}")
        self.images = np.stack(images)  # (N, res, res, 3) uint8

    def batch(self, n, rng):
        """-> ((n, res, res, 3) uint8 images, their n captions)."""
        idx = rng.integers(len(self.images), size=n)
        return self.images[idx], [self.captions[i] for i in idx]


def step_unless(opt, bad):
    """opt.step(), or no change at all (weights, moments, step count) where the 0-d tensor bad is
    1. A fused torch optimiser reads found_inf on the device, as torch's GradScaler hands it over:
    no host sync. Any other optimiser is asked on the host: one sync a step."""
    if opt.defaults.get("fused"):
        opt.found_inf = bad
        opt.step()
        del opt.found_inf  # read by the next step only if set again
    elif not bad.item():
        opt.step()


def step_seed(seed, rank, step):
    """One seed per (run seed, process, step): no step's randomness depends on earlier steps."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class Batches(torch.utils.data.Dataset):
    """Item k is the batch of step k, so DataLoader workers may render ahead in any order: uint8
    images (B, res, res, 3) (a quarter of float32's bytes in shared memory) and their captions' row
    ids in a TextTable, `rows`."""

    def __init__(self, data, batch_size, seed, rank, rows):
        self.data, self.batch_size, self.seed, self.rank = data, batch_size, seed, rank
        self.rows = rows

    def __getitem__(self, step):
        rng = np.random.default_rng(step_seed(self.seed, self.rank, step))
        images, captions = self.data.batch(self.batch_size, rng)
        return torch.from_numpy(images), torch.tensor([self.rows[c] for c in captions])


def loader(batches, steps, workers, pin):
    """The batches of these steps, in order; workers > 0 render them ahead in other processes."""
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=steps, num_workers=workers,
                                       pin_memory=pin, prefetch_factor=4 if workers else None,
                                       worker_init_fn=shield_worker)


def shield_worker(worker_id):
    """Runs in each data worker as it starts. A stop signal sent to the whole process group
    (Ctrl-C, timeout, torchrun, a scheduler) is for the main process, which finishes its step,
    saves, then closes its workers: a worker ignores SIGINT, and SIGTERM from anyone but the main
    process (whose SIGTERM ends a worker that does not stop when asked)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no way to tell who sent a signal
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # kept for the thread below

    def wait_for_the_main_process():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != os.getppid():
            pass
        os._exit(0)
    threading.Thread(target=wait_for_the_main_process, daemon=True).start()


# -------------------------------------------------------------------------------------------------
# What the loop calls: running figures, the clock, speed, grids, evaluations, the log, signals


class Tally:
    """Running figures of the steps since the last log line, kept on the device (reading one costs
    a host sync). skipped: the non-finite steps of the whole run; worst: the longest run of them."""

    def __init__(self, device, skipped):
        zero = torch.zeros((), device=device)
        self.skipped = zero + skipped
        self.streak, self.worst, self.bad = zero.clone(), zero.clone(), zero.clone()
        self.loss, self.frac_self = zero.clone(), zero.clone()
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
        """-> the mean loss of the window's good steps, its share of s < t rows and the skipped
        steps so far; then a new window starts."""
        good = self.steps - self.bad.item()
        rec = {"loss": self.loss.item() / good if good else None,
               "frac_self": self.frac_self.item() / self.steps, "skipped": int(self.skipped.item())}
        for acc in (self.bad, self.loss, self.frac_self):
            acc.zero_()
        self.steps = 0
        return rec


class Clock:
    """Training time: a stopwatch the loop stops (off) for compilation, checkpoints, grids and
    evaluations. It waits for the device where it stops or starts: queued GPU work counts right."""

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


def step_flops(model, text_len, pass_rows):
    """FLOPs of a step on one process: pass_rows forward rows (selfe_loss counts them: a pass with
    gradient, forward and backward, as 3). None for a network without .flops (optional: the log
    then shows no MFU)."""
    if not hasattr(model, "flops"):
        return None
    return model.flops(text_len) * pass_rows


def saved_bytes(run, rows, weights):
    """Bytes autograd keeps for the backward pass of run(rows), a forward pass on `rows` rows on
    the CPU: every tensor it saves, each storage once, those in `weights` (counted apart) not."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(rows)
    return sum(saved.values())


def memory_estimate(cfg, text_dim, batch):
    """-> {fake: bytes} for fake False and True: the estimated peak memory of one process's step
    on `batch` rows, without and with the fake-score pass. Weights, their gradients, Adam's two
    moments and the EMA (5 float32 copies of the weights), plus the activations autograd saves,
    measured on the CPU at 2 and 4 rows and scaled linearly to the batch. With act_ckpt the
    blocks keep their input alone, and one block's activations live again while the backward pass
    recomputes it."""
    net = build_model(cfg, text_dim)  # a CPU copy: sizes, not values, matter
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    L, res, fm = cfg["text_len"], cfg["res"], cfg["method"] == "fm"
    dtype = torch.bfloat16 if cfg["bf16"] else torch.float32
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=cfg["bf16"])

    def cond(n):
        return (torch.randn(n, L, text_dim), torch.ones(n, L, dtype=torch.bool),
                torch.randn(n, text_dim))

    def step(rows, fake):
        with autocast:
            selfe.selfe_loss(net, torch.randn(rows, 3, res, res), cond(rows), cond(rows),
                             cond(rows) if fake else None, cond(rows), fm=fm,
                             p_equal=cfg["p_equal"])

    def scaled(run, rows):  # the saved bytes of run at `rows`, from those at 2 and 4
        two, four = (saved_bytes(run, n, weights) for n in (2, 4))
        return two + (four - two) / 2 * (rows - 2)

    static = 5 * 4 * sum(p.numel() for p in net.parameters())  # 5 float32 copies
    out = {fake: static + scaled(lambda n: step(n, fake), batch) for fake in (False, True)}
    if getattr(net, "act_ckpt", False):  # a DiT's blocks
        N = L + (res // cfg["patch"]) ** 2  # tokens in the stream

        def block(rows):
            with autocast:
                net.blocks[0](torch.randn(rows, N, net.dim, dtype=dtype),
                              torch.randn(rows, net.dim), torch.ones(rows, 1, 1, N, dtype=bool))
        m = 0 if fm else round((1 - cfg["p_equal"]) * batch)  # the fake pass's rows
        for fake in (False, True):
            rows = batch + m * fake  # the rows of the passes with gradient: their inputs kept
            kept = len(net.blocks) * rows * N * net.dim * dtype.itemsize
            out[fake] += kept + scaled(block, batch)  # the widest pass's block recomputed
    return out


# Dense bf16 peaks (datasheets), for MFU. The first key the device name contains wins.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12),
             ("H200", 989e12), ("A100", 312e12))


def peak_flops(name):
    """-> the bf16 peak of a GPU by its name, None for one we do not know."""
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def speed(seconds, steps, flops, batch, device):
    """-> {ms_per_step, img_per_s, mfu (known GPUs), peak_mem_gb}. flops: of one process's step
    (MFU is per GPU); batch: images per step, all processes."""
    out = {"ms_per_step": 1000 * seconds / steps, "img_per_s": batch * steps / seconds}
    cuda = device.type == "cuda"
    peak = peak_flops(torch.cuda.get_device_name(device) if cuda else "cpu")
    if peak and flops:
        out["mfu"] = flops * steps / seconds / peak
    if cuda:
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    else:  # the process's peak resident memory (Linux reports kB)
        out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def progress_figures(rec):
    loss = float("nan") if rec["loss"] is None else rec["loss"]
    out = {"loss": f"{loss:.4f}", "img_s": f"{rec.get('img_per_s', float('nan')):.0f}",
           "tau": f"{rec['tau']:.2f}"}
    if "mfu" in rec:
        out["mfu"] = f"{100 * rec['mfu']:.1f}%"
    return out


GRID_PROMPTS = ["a photo of a red circle", "a photo of a blue square",
                "a photo of a triangle and a circle", "a photo of three squares",
                "a photo of a circle left of a square",
                "a photo of a yellow triangle and a green square"]


def sampler_of(cfg):
    return {**selfe.SAMPLERS[cfg["method"]], "shift": cfg["shift"]}


def drawer(ema, text, cfg, steps_list):
    """-> draw(prompts, seed): ShapesEval's view of the model."""
    return lambda prompts, seed: generate(ema, text, prompts, steps_list, seed, **sampler_of(cfg))


def write_grid(ema, text, data, cfg, step):
    prompts = GRID_PROMPTS if cfg["data"] == "shapes" else list(dict.fromkeys(data.captions))[:6]
    images = generate(ema, text, prompts, [2, 4, 8, 50], seed=0, **sampler_of(cfg))
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
            "sampler": sampler_of(cfg)}
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


def open_log(path):
    """log.jsonl for appending. A kill -9 may have cut its last line short: go on on a new line."""
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
    """Ctrl-C or SIGTERM asks the loop to save and stop after the current step; a second one stops
    at once, and so does the first once at_once is set (the final evaluation). Stopping at once
    raises KeyboardInterrupt. restore() puts the previous handlers back (notebooks, tests).
    last_save: where a run that stops without saving goes on from."""

    def __init__(self):
        self.requested, self.at_once = False, False
        self.last_save = "no checkpoint yet: start again"
        self.previous = {sig: signal.signal(sig, self.handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}

    def saved(self, path, step, out):
        self.last_save = (f"the last checkpoint, {path}, is at step {step}: continue with "
                          f"--resume --out {out}")

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
