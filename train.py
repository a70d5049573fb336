"""
Train a Self-E text-to-image model from scratch.

    python train.py                      # built-in shapes world; CPU preset without a GPU, GPU preset with one
    python train.py --method fm          # the flow-matching baseline: same model, data and schedule
    python train.py --data DIR           # your images: DIR/metadata.jsonl or a .txt caption beside each image
    python train.py --out out --resume   # continue the run saved in out/ (after Ctrl-C, a crash, kill -9)
    python train.py --bench              # time the step: ms/step, images/s, MFU (CUDA), peak memory
    torchrun --nproc_per_node=8 train.py # DistributedDataParallel; --batch-size is the global batch

Every config key below is a command-line flag (underscores become hyphens). Everything a run writes goes to --out:
ckpt.pt (model, EMA, optimiser, step, config; written atomically), log.jsonl, samples/step_NNNNNN.png.
The randomness of step k (data, times, noise) is drawn from seeds (seed, rank, k), so a resumed run continues
exactly where the checkpoint left it, at any number of GPUs.
"""
import argparse
import json
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import selfe
import shapes
from sample import (EVAL_SIZES, SAMPLERS, Parser, build_model, check_writable, eval_images, eval_report, evaluate,
                    generate, load_weights, read_checkpoint, run_cli, save_grid)
from selfe import InputError

# ---------------------------------------------------------------------------------------------------------------
# Config: plain defaults; a preset fills in the keys it names unless they are given on the command line.
CONFIG = {
    "out": ("out", "folder for everything the run writes"),
    "data": ("shapes", "'shapes' (built in, infinite) or a folder of images with captions"),
    "preset": ("auto", "cpu | gpu | gpu-long | auto (gpu when CUDA is available); README gives their minutes"),
    "method": ("selfe", "selfe | fm (flow-matching baseline: s = t always, no self-evaluation)"),
    "renorm": (True, "energy-preserving target, Eq. 19 (off: the paper's 'w/o target norm' ablation)"),
    "aux_start": (0.77, "fraction of the run after which the fake-score term is on (paper 550k/710k); "
                        "0 = from the start (ablation), 1 = never"),
    "tau_ramp": (0.4, "fraction of the run over which tau ramps 0 -> 1 (paper 300k/710k)"),
    "p_equal": (0.5, "fraction of rows with s = t (paper)"),
    "p_null": (0.1, "probability of the empty prompt (ours; the paper gives none)"),
    "shift": (1.0, "time shift k for training and sampling; 1.0 suits our small pixel resolutions"),
    "ema_eval": (True, "EMA weights for the conditional self-evaluation pass, online for the unconditional one "
                       "(paper, appendix); --no-ema-eval: online weights for both, in one batched forward"),
    "null_any_s": (True, "the empty prompt on any row, s < t included (ours, measured: README); "
                         "--no-null-any-s: only on s = t rows"),
    "min_lr": (1e-5, "learning rate at the end of the linear decay (paper)"),
    "ema": (0.9999, "EMA decay (paper), warmed up as min(ema, (1 + k) / (10 + k)) so short runs work"),
    "clip": (1.0, "gradient clipping norm (ours)"),
    "text_encoder": ("default", "Hugging Face id or local path; 'default' = all-MiniLM-L6-v2, offline copy"),
    "log_every": (25, "steps between progress updates and log.jsonl lines"),
    "sample_every": (1000, "steps between sample grids (EMA weights; 2, 4, 8, 50 steps)"),
    "eval_every": (500, "steps between ShapesEval scores (small set, 2 and 8 steps) in log.jsonl; 0 = off"),
    "final_eval": ("medium", "ShapesEval set scored at 2, 4, 8 and 50 steps when training ends (table printed, "
                             "OUT/eval/results.json and grid.png): small | medium | full | off"),
    "ckpt_every": (1000, "steps between checkpoints (and at the end, and on Ctrl-C / SIGTERM)"),
    "seed": (0, "seed for weights, data and noise"),
    "bench": (False, "time the training step and exit (5 warm-up steps, then the median of 10 blocks of 5 steps; "
                     "at tau = 1)"),
}
PRESETS = {  # README: what each costs, from FLOPs (DiT.flops) and as measured
    # warmup 100 (the paper: 1k of 710k steps): 5 % of a 2000-step run; 1k would spend half of it warming up
    "cpu": dict(model="tiny", res=32, patch=4, text_len=16, batch_size=32, iters=2000, lr=1e-3, warmup=100,
                compile=False, bf16=False, workers=0),  # workers 0: both cores are busy with the step
    # a few minutes on one GPU: the paper's table in miniature (flow matching vs Self-E at 2 to 50 steps); sized
    # by FLOPs (README), iterations and lr still to be set by a measured GPU run
    "gpu": dict(model="small", res=32, patch=2, text_len=16, batch_size=256, iters=2000, lr=5e-4, warmup=100,
                compile=True, bf16=True, workers=12),  # workers: processes rendering batches ahead of the GPU
    # hours: 64 px, room for long captions, the paper's warm-up
    "gpu-long": dict(model="small", res=64, patch=2, text_len=64, batch_size=256, iters=50000, lr=3e-4,
                     warmup=1000, compile=True, bf16=True, workers=12),
}
GRID_PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of a triangle and a circle",
                "a photo of three squares", "a photo of a circle left of a square",
                "a photo of a yellow triangle and a green square"]
BEFORE_KEY = {"null_any_s": False}  # how checkpoints written before a key existed were trained, for --resume
BENCH_WARMUP, BENCH_STEPS, BENCH_BLOCK = 5, 50, 5
MAX_BAD_STEPS = 10  # this many non-finite steps in a row stop the run
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))  # dense, datasheets


def parse_config(argv):
    """-> (config dict, the keys given on the command line, resume?)."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = {"preset": ["auto", *PRESETS], "method": ["selfe", "fm"], "model": list(selfe.MODELS),
               "final_eval": [*EVAL_SIZES, "off"]}
    keys = {**{k: v for k, (v, _) in CONFIG.items()}, **PRESETS["cpu"]}
    for k, v in keys.items():
        flag, helptext = "--" + k.replace("_", "-"), CONFIG[k][1] if k in CONFIG else "(from the preset)"
        if isinstance(v, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=helptext)
        else:
            p.add_argument(flag, type=type(v), choices=choices.get(k), default=argparse.SUPPRESS, help=helptext)
    p.add_argument("--resume", action="store_true", help="continue the run in --out (its config, then your flags)")
    given = vars(p.parse_args(argv))
    resume = given.pop("resume")
    cfg = {k: v for k, (v, _) in CONFIG.items()}
    cfg.update(given)
    return cfg, given, resume


def finish_config(cfg, world, quiet=False):
    if cfg["preset"] == "auto":
        cfg["preset"] = "gpu" if torch.cuda.is_available() else "cpu"
        if not quiet:
            print(f"preset: {cfg['preset']} ({'CUDA found' if cfg['preset'] == 'gpu' else 'no GPU found'}; "
                  f"--preset to choose)")
    cfg.update({k: v for k, v in PRESETS[cfg["preset"]].items() if k not in cfg})  # flags and saved keys win
    checks = [
        (cfg["res"] % cfg["patch"] == 0, f"--res {cfg['res']} is not a multiple of --patch {cfg['patch']}"),
        (min(cfg["iters"], cfg["batch_size"], cfg["text_len"], cfg["res"]) >= 1,
         "--iters, --batch-size, --text-len and --res must be at least 1"),
        (cfg["batch_size"] % world == 0, f"--batch-size {cfg['batch_size']} (global) is not divisible by {world} "
                                         f"processes"),
        (cfg["lr"] > 0 and cfg["clip"] > 0, "--lr and --clip must be positive"),
        (0 <= cfg["p_equal"] <= 1 and 0 <= cfg["p_null"] < 1, "--p-equal must lie in [0, 1], --p-null in [0, 1)"),
        (min(cfg["log_every"], cfg["ckpt_every"], cfg["sample_every"]) >= 1 and cfg["eval_every"] >= 0,
         "--log-every, --ckpt-every and --sample-every must be at least 1, --eval-every at least 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Data: the shapes world, or a folder of captioned images. Both draw a batch from a numpy Generator.
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(path, res):
    """Any image PIL reads -> RGB uint8 (res, res, 3), centre-cropped to a square and resized. Grayscale, palette,
    16-bit and tiny images are converted; transparent pixels become white."""
    img = Image.open(path)
    img.load()  # decode now, so a truncated file fails here
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: PIL's own conversion would clip it
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return np.asarray(img.resize((res, res), Image.BICUBIC))


def read_captions(root):
    """{file name: caption} from root/metadata.jsonl (Hugging Face imagefolder) or sidecar .txt files."""
    meta = os.path.join(root, "metadata.jsonl")
    if os.path.exists(meta):
        caps = {}
        with open(meta) as f:
            for i, line in enumerate(f, 1):
                try:
                    row = json.loads(line) if line.strip() else None
                    if row is not None:
                        caps[row["file_name"]] = row["text"]
                except (ValueError, KeyError, TypeError):
                    raise InputError(f"{meta}, line {i}: need a JSON object with 'file_name' and 'text'") from None
        return caps
    caps = {}
    for name in sorted(os.listdir(root)):
        txt = os.path.join(root, os.path.splitext(name)[0] + ".txt")
        if name.lower().endswith(IMAGE_EXTS) and os.path.exists(txt):
            with open(txt, errors="replace") as f:
                caps[name] = f.read().strip()
    return caps


class FolderData:
    """A folder of captioned images, loaded once into memory at the training resolution. Images without a caption
    and files that do not decode are skipped and counted; no usable image at all is an error."""

    def __init__(self, root, res, quiet=False):
        if not os.path.isdir(root):
            raise InputError(f"--data {root}: no such folder (use 'shapes' for the built-in data)")
        files = sorted(n for n in os.listdir(root) if n.lower().endswith(IMAGE_EXTS))
        if not files:
            raise InputError(f"--data {root}: no images in it ({', '.join(IMAGE_EXTS)})")
        caps = read_captions(root)
        images, self.captions, broken = [], [], []
        uncaptioned = [n for n in files if not caps.get(n)]
        for name in tqdm([n for n in files if caps.get(n)], desc="images", disable=quiet):
            try:
                images.append(load_image(os.path.join(root, name), res))
                self.captions.append(caps[name])
            except Exception:  # PIL raises OSError, ValueError, SyntaxError, ... for damaged files
                broken.append(name)
        skipped = f"{len(uncaptioned)} without a caption, {len(broken)} unreadable" + (
            f" (e.g. {(uncaptioned + broken)[0]})" if uncaptioned or broken else "")
        if not images:
            raise InputError(f"--data {root}: no usable images: {skipped}; captions go in metadata.jsonl "
                             f"or NAME.txt beside NAME.png")
        if not quiet:
            print(f"data: {len(images)} images from {root}; skipped {skipped}")
        self.images = np.stack(images)  # (N, res, res, 3) uint8

    def batch(self, n, rng):
        idx = rng.integers(len(self.images), size=n)
        x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, res, res)
        return x, [self.captions[i] for i in idx]


def step_seed(seed, rank, step):
    """One seed per (run seed, process, step): data, times and noise of a step never depend on the steps before."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class Batches(torch.utils.data.Dataset):
    """Item k is the batch of step k, so DataLoader workers can render ahead of the GPU in any order."""

    def __init__(self, data, batch_size, seed, rank):
        self.data, self.batch_size, self.seed, self.rank = data, batch_size, seed, rank

    def __getitem__(self, step):
        return self.data.batch(self.batch_size, np.random.default_rng(step_seed(self.seed, self.rank, step)))


def batches(dataset, steps, workers, pin):
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=steps, num_workers=workers,
                                       pin_memory=pin, prefetch_factor=4 if workers else None)


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def lr_at(step, cfg):
    """Linear warm-up, then linear decay to min_lr (paper)."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    frac = (step - cfg["warmup"]) / max(1, cfg["iters"] - cfg["warmup"])
    return cfg["lr"] + frac * (cfg["min_lr"] - cfg["lr"])


def tau_at(step, cfg):
    return min(1.0, step / max(1, cfg["tau_ramp"] * cfg["iters"]))


def aux_on(step, cfg):
    return cfg["method"] == "selfe" and step >= cfg["aux_start"] * cfg["iters"]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: tensors and plain data only (weights_only=True loads them). Written to a temp file, flushed to disk,
# then renamed over the old one: a kill at any moment leaves the previous checkpoint whole.


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


# ---------------------------------------------------------------------------------------------------------------
# Speed figures


def step_flops(model, cfg, batch, aux):
    """Analytic FLOPs of one step on one process: the grad pass (forward + backward = 3 forwards) on every row,
    the two no-grad self-evaluation forwards on the s < t rows, and the fake-score pass (with grad) when on."""
    f = model.flops(cfg["text_len"])
    m = 0 if cfg["method"] == "fm" else selfe.self_rows(batch, cfg["p_equal"], cfg["p_null"])[0]
    return f * (3 * batch + 2 * m + (3 * m if aux else 0))


def peak_flops(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in PEAK_BF16 if key in name), None)
    return None  # MFU only where the bf16 peak is known


def speed(dt, steps, flops, batch, device):
    """-> {ms_per_step, img_per_s, mfu (CUDA, known GPUs), peak_mem_gb}. batch: images per step, all processes."""
    out = {"ms_per_step": 1000 * dt / steps, "img_per_s": batch * steps / dt}
    peak = peak_flops(device)
    if peak:
        out["mfu"] = flops * steps / dt / peak
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    else:  # the process's peak resident memory (Linux reports kB)
        out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def describe(fig):
    mfu = f" | MFU {100 * fig['mfu']:.1f}%" if "mfu" in fig else ""
    return (f"{fig['ms_per_step']:.1f} ms/step | {fig['img_per_s']:.0f} img/s{mfu} | "
            f"peak mem {fig['peak_mem_gb']:.2f} GB")


# ---------------------------------------------------------------------------------------------------------------
# Processes: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python train.py` is rank 0 of 1.


def setup_processes(cfg, rank, world):
    """-> this process's device; joins the process group when there is more than one process."""
    cuda = cfg["preset"] == "gpu" and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return torch.device("cuda", local) if cuda else torch.device("cpu")


def agree(flag, device):
    """True on every process if it is True on any: processes must stop at the same step."""
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class Interrupt:
    """Ctrl-C or SIGTERM asks the loop to save and stop after the current step; a second Ctrl-C stops at once.
    restore() puts the previous handlers back (for notebooks and tests that call main())."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, self.previous[signum])

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    """Train (or --bench); returns the trained model (unwrapped) on every process."""
    interrupt = Interrupt()
    try:
        return train(sys.argv[1:] if argv is None else argv, interrupt)
    finally:
        interrupt.restore()
        if dist.is_initialized():
            dist.destroy_process_group()


def train(argv, interrupt):
    started = time.perf_counter()
    cfg, given, resume = parse_config(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ckpt_path = os.path.join(cfg["out"], "ckpt.pt")
    ckpt = None
    if resume:
        ckpt = read_checkpoint(ckpt_path)
        cfg = {**cfg, **BEFORE_KEY, **ckpt["config"], **given}
        if rank == 0:
            print(f"resuming {ckpt_path} at step {ckpt['step']}")
    elif os.path.exists(ckpt_path) and not cfg["bench"]:
        raise InputError(f"{ckpt_path} exists: add --resume to continue that run, or choose another --out")
    cfg = finish_config(cfg, world, quiet=rank > 0)
    device = setup_processes(cfg, rank, world)
    if rank == 0 and not cfg["bench"]:
        check_writable(os.path.join(cfg["out"], "samples"))
    torch.manual_seed(cfg["seed"])  # the initial weights; DDP copies rank 0's to the others anyway
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    data = shapes.ShapesData(cfg["res"]) if cfg["data"] == "shapes" else FolderData(cfg["data"], cfg["res"], rank > 0)
    text = selfe.TextEncoder(cfg["text_encoder"], cfg["text_len"], device)
    model = build_model(cfg, text.dim).to(device)
    ema = build_model(cfg, text.dim).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), fused=True)
    step, skipped = 0, 0
    if ckpt is not None:
        load_weights(model, ckpt["model"], ckpt_path)
        load_weights(ema, ckpt["ema"], ckpt_path)
        opt.load_state_dict(ckpt["opt"])
        step, skipped = ckpt["step"], ckpt.get("skipped", 0)
    net, eval_net = model, ema if cfg["ema_eval"] else None
    if cfg["compile"]:  # whole graphs (a break is an error), one per batch size the step feeds: README, Presets
        net = torch.compile(model, fullgraph=True, dynamic=False)
        if cfg["ema_eval"]:
            eval_net = torch.compile(ema, fullgraph=True, dynamic=False)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.index is not None
                                                        else None, broadcast_buffers=False)  # pos never changes
    autocast = torch.autocast(device.type, torch.bfloat16) if cfg["bf16"] else nullcontext()
    batch = cfg["batch_size"] // world  # per process
    null = text([""] * batch)

    def train_step(step, x0, captions):
        """One optimiser step, no host sync: the loss, grad norm and fault flag stay on the device."""
        x0, cond = x0.to(device, non_blocking=True), text(captions)
        fake = text([c + " fake image" for c in captions]) if aux_on(step, cfg) else None
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        torch.manual_seed(step_seed(cfg["seed"], rank, step))
        with autocast:
            loss, stats = selfe.selfe_loss(
                net, x0, cond, null, fake, method=cfg["method"], tau=tau_at(step, cfg), p_equal=cfg["p_equal"],
                p_null=cfg["p_null"], shift=cfg["shift"], renorm=cfg["renorm"],
                eval_net=eval_net, null_any_s=cfg["null_any_s"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float()
        if world > 1:  # a fault on one process skips the step on all of them
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        opt.found_inf = bad  # fused Adam skips the update on the device when found_inf is 1 (as AMP's GradScaler)
        opt.step()
        decay = min(cfg["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        return loss.detach(), grad_norm, bad, stats

    if cfg["bench"]:  # at the middle of the run: tau = 1, the fake-score term as the config says
        at = cfg["iters"] // 2
        pre = [Batches(data, batch, cfg["seed"], rank)[at] for _ in range(BENCH_WARMUP + BENCH_STEPS)]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        blocks = []  # seconds per block of BENCH_BLOCK steps; their median shrugs off a stray slow moment
        for i, (x0, captions) in enumerate(pre):  # data drawn beforehand: this times the step alone
            if i >= BENCH_WARMUP and (i - BENCH_WARMUP) % BENCH_BLOCK == 0:
                sync()
                blocks.append(-time.perf_counter())
            train_step(at, x0, captions)
            if i >= BENCH_WARMUP and (i - BENCH_WARMUP) % BENCH_BLOCK == BENCH_BLOCK - 1:
                sync()
                blocks[-1] += time.perf_counter()
        fig = speed(float(np.median(blocks)), BENCH_BLOCK, step_flops(model, cfg, batch, aux_on(at, cfg)),
                    cfg["batch_size"], device)
        if rank == 0:
            where = (torch.cuda.get_device_name(device) if device.type == "cuda"
                     else f"cpu, {torch.get_num_threads()} threads")
            print(f"bench: {cfg['method']} | {describe(fig)} | {cfg['preset']} preset, model {cfg['model']}, batch "
                  f"{cfg['batch_size']}, {world} process(es), compile {'on' if cfg['compile'] else 'off'}, {where}")
        return model

    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"{cfg['method']} | model {cfg['model']} ({n_params / 1e6:.2f}M params) | {cfg['res']}px patch "
              f"{cfg['patch']} | batch {cfg['batch_size']} ({world} process(es)) | {cfg['iters']} iters | {device}")
    grid_prompts = GRID_PROMPTS if cfg["data"] == "shapes" else list(dict.fromkeys(data.captions))[:6]
    sampler = SAMPLERS[cfg["method"]]

    def write_grid(step):
        images = generate(ema, text, grid_prompts, [2, 4, 8, 50], seed=0, shift=cfg["shift"], **sampler)
        save_grid(images, grid_prompts, os.path.join(cfg["out"], "samples", f"step_{step:06d}.png"))

    def write_eval(step):  # so a user can watch the few-step score rise
        results, _, _ = evaluate(ema, text, [2, 8], EVAL_SIZES["small"], progress=False, shift=cfg["shift"],
                                 **sampler)
        scores = {k: round(r["overall"], 4) for k, r in results.items()}
        fd = {k: round(r["fd"], 3) for k, r in results.items()}
        log.write(json.dumps({"step": step, "eval_overall": scores, "eval_fd": fd}) + "\n")
        tqdm.write(f"step {step}: ShapesEval overall (scene distance) "
                   + ", ".join(f"{scores[k]:.3f} ({fd[k]:.2f}) at {k} steps" for k in scores))

    def checkpoint(step):
        if rank == 0:
            save_checkpoint(ckpt_path, model, ema, opt, step, cfg, text.dim, int(n_bad.item()))

    log = open_log(os.path.join(cfg["out"], "log.jsonl")) if rank == 0 else None
    loader = batches(Batches(data, batch, cfg["seed"], rank), range(step, cfg["iters"]), cfg["workers"],
                     device.type == "cuda")
    bar = tqdm(total=cfg["iters"], initial=step, desc="train", dynamic_ncols=True, disable=rank > 0)
    zero = torch.zeros((), device=device)  # running figures live on the device, read every log_every steps
    streak, worst, bad_sum, loss_sum, frac_sum = (zero.clone() for _ in range(5))
    n_bad = zero + skipped  # skipped steps over the whole run, resumes included
    t0, window = time.perf_counter(), 0
    for x0, captions in loader:
        loss, grad_norm, bad, stats = train_step(step, x0, captions)
        n_bad += bad
        streak = (streak + 1) * bad  # non-finite steps in a row
        worst = torch.maximum(worst, streak)
        bad_sum += bad
        loss_sum += torch.nan_to_num(loss) * (1 - bad)
        frac_sum += stats["frac_self"]
        step, window = step + 1, window + 1
        bar.update(1)
        last = step == cfg["iters"]

        if step % cfg["log_every"] == 0 or last:
            if worst.item() >= MAX_BAD_STEPS:
                raise SystemExit(f"error: {int(worst.item())} steps in a row had a non-finite loss or gradient "
                                 f"(by step {step}); stopped. {ckpt_path} holds the last good weights: --resume "
                                 f"with a lower --lr or --clip")
            fig = speed(time.perf_counter() - t0, window, step_flops(model, cfg, batch, aux_on(step - 1, cfg)),
                        cfg["batch_size"], device)
            good = window - bad_sum.item()
            rec = {"step": step, "loss": loss_sum.item() / good if good else None,
                   "grad_norm": grad_norm.item(), "lr": lr_at(step - 1, cfg), "tau": tau_at(step - 1, cfg),
                   "aux": float(stats["aux"]), "frac_self": frac_sum.item() / window,
                   "skipped": int(n_bad.item()), **fig, "time": time.time()}
            if rank == 0:
                log.write(json.dumps(rec) + "\n")
                log.flush()
                shown = float("nan") if rec["loss"] is None else rec["loss"]
                bar.set_postfix(loss=f"{shown:.4f}", img_s=f"{rec['img_per_s']:.0f}", tau=f"{rec['tau']:.2f}")
            for acc in (bad_sum, loss_sum, frac_sum):
                acc.zero_()
            t0, window = time.perf_counter(), 0
        # one process alone checks every step; several agree at log steps only (a check costs a sync)
        stop = interrupt.requested if world == 1 else (step % cfg["log_every"] == 0
                                                        and agree(interrupt.requested, device))
        if step % cfg["ckpt_every"] == 0 or last or stop:
            checkpoint(step)
        if stop:
            bar.close()
            if rank == 0:
                print(f"interrupted at step {step}: saved {ckpt_path}; continue with --resume --out {cfg['out']}")
            return model
        paused = time.perf_counter()
        if rank == 0 and (step % cfg["sample_every"] == 0 or last):
            write_grid(step)
        if rank == 0 and cfg["data"] == "shapes" and cfg["eval_every"] and (step % cfg["eval_every"] == 0 or last):
            write_eval(step)
        t0 += time.perf_counter() - paused  # keep grids and evals out of the throughput figures
    bar.close()
    if rank == 0 and cfg["data"] == "shapes" and cfg["final_eval"] != "off":
        final_eval(ema, text, cfg, step, log)
    if rank == 0:
        print(f"done in {minutes(time.perf_counter() - started)}: {ckpt_path}, samples in "
              f"{os.path.join(cfg['out'], 'samples')}")
    return model


def final_eval(ema, text, cfg, step, log):
    """The paper's table in miniature: ShapesEval of the EMA weights at 2, 4, 8 and 50 steps, printed and kept."""
    t0, out = time.perf_counter(), os.path.join(cfg["out"], "eval")
    os.makedirs(out, exist_ok=True)
    results = eval_report(ema, text, [2, 4, 8, 50], cfg["final_eval"], out,
                          {"ckpt": os.path.join(cfg["out"], "ckpt.pt"), "step": step, "method": cfg["method"]},
                          **SAMPLERS[cfg["method"]], shift=cfg["shift"])
    log.write(json.dumps({"step": step, "final_eval": cfg["final_eval"],
                          "final_overall": {k: round(r["overall"], 4) for k, r in results.items()},
                          "final_fd": {k: round(r["fd"], 3) for k, r in results.items()}}) + "\n")
    log.flush()
    print(f"\nShapesEval {cfg['final_eval']} ({eval_images(cfg['final_eval'])} images per step count), "
          f"{cfg['method']}, EMA weights at step {step} ({minutes(time.perf_counter() - t0)}; {out}/results.json, "
          f"grid.png):")
    print(shapes.markdown_table({f"{k} steps": r for k, r in results.items()}, "steps"))


def minutes(seconds):
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


if __name__ == "__main__":
    run_cli(main)
