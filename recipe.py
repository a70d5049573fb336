"""
The training recipe: every flag and preset, the schedules, and one optimiser step. train.py runs the step in a
loop; bench.py times it.
"""
import argparse
import os
import resource
from contextlib import nullcontext

import torch
import torch.distributed as dist

import selfe
import shapes
from common import Parser, build_model, load_weights
from data import step_seed
from selfe import InputError

# ---------------------------------------------------------------------------------------------------------------
# Config: plain defaults; a preset fills in the keys it names unless they are given on the command line.
CONFIG = {
    "out": ("out", "folder for everything the run writes"),
    "data": ("shapes", "'shapes' (built in, infinite) or a folder of images with captions"),
    "preset": ("auto", "cpu | gpu | gpu-long | auto (gpu when CUDA is available); README gives their minutes"),
    "method": ("selfe", "selfe | fm (flow-matching baseline: s = t always, no self-evaluation)"),
    "renorm": (True, "energy-preserving target, Eq. 19 (off: the paper's 'w/o target norm' ablation)"),
    "aux_start": (None, "fraction of the run after which the fake-score term is on; 0 = from the start (ablation), "
                        "1 = never; from the preset: the paper's 0.77 (550k/710k), 1 for the short cpu run"),
    "tau_ramp": (0.4, "fraction of the run over which tau ramps 0 -> 1 (paper 300k/710k)"),
    "p_equal": (0.5, "fraction of rows with s = t (paper)"),
    "p_null": (0.1, "probability of the empty prompt (ours; the paper gives none)"),
    "shift": (1.0, "time shift k for training and sampling; 1.0 suits our small pixel resolutions"),
    "ema_eval": (True, "EMA weights for the conditional self-evaluation pass, online for the unconditional one "
                       "(paper, appendix); --no-ema-eval: online weights for both, in one batched forward"),
    "null_any_s": (True, "the empty prompt on any row, s < t included (ours, measured: results/README.md); "
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
}
DEFAULTS = {k: v for k, (v, _) in CONFIG.items()}  # None: the preset gives it
PRESETS = {  # README gives what each costs
    # iters 2600: as many as fit 15 minutes on 2 cores with the table at the end (measured: README); warmup 100
    # (the paper: 1k of 710k steps): 4 % of the run, where 1k would spend 40 % of it warming up; aux_start 1: the
    # fake-score term never comes on. The paper needs it against checkerboard artefacts late in a 710k-step run;
    # in 2600 steps it cost 2-step scene distance on two seeds and 6 % of the time (results/README.md)
    "cpu": dict(model="tiny", res=32, patch=4, text_len=16, batch_size=32, iters=2600, lr=1e-3, warmup=100,
                aux_start=1.0, compile=False, bf16=False, workers=0),  # workers 0: both cores are busy with the step
    # a few minutes on one GPU: the paper's table in miniature (flow matching vs Self-E at 2 to 50 steps); sized
    # by FLOPs (README), iterations and lr still to be set by a measured GPU run; workers: processes rendering
    # batches ahead of the GPU
    "gpu": dict(model="small", res=32, patch=2, text_len=16, batch_size=256, iters=2000, lr=5e-4, warmup=100,
                aux_start=0.77, compile=True, bf16=True, workers=12),
    # hours: 64 px, room for long captions, the paper's warm-up
    "gpu-long": dict(model="small", res=64, patch=2, text_len=64, batch_size=256, iters=50000, lr=3e-4,
                     warmup=1000, aux_start=0.77, compile=True, bf16=True, workers=12),
}
EVAL_CHOICES = [*shapes.EVAL_SIZES, "off"]


def config_parser(description):
    """A flag for every config and preset key (underscores become hyphens). None has a default here: the flags
    given are told apart from the defaults, so that they win over a preset and over a resumed run's config."""
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = {"preset": ["auto", *PRESETS], "method": ["selfe", "fm"], "model": list(selfe.MODELS),
               "final_eval": EVAL_CHOICES}
    for k, v in {**DEFAULTS, **PRESETS["cpu"]}.items():
        flag, helptext = "--" + k.replace("_", "-"), CONFIG[k][1] if k in CONFIG else "(from the preset)"
        if isinstance(v, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=helptext)
        else:
            p.add_argument(flag, type=type(v), choices=choices.get(k), default=argparse.SUPPRESS, help=helptext)
    return p


def finish_config(cfg, world, quiet=False):
    """Resolve the preset (its keys fill in what neither a flag nor a resumed config gave) and check the values."""
    if cfg["preset"] == "auto":
        cfg["preset"] = "gpu" if torch.cuda.is_available() else "cpu"
        if not quiet:
            print(f"preset: {cfg['preset']} ({'CUDA found' if cfg['preset'] == 'gpu' else 'no GPU found'}; "
                  f"--preset to choose)")
    cfg.update({k: v for k, v in PRESETS[cfg["preset"]].items() if cfg.get(k) is None})
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


def setup_device(cfg, world):
    """-> this process's device; joins the process group when torchrun started more than one process."""
    cuda = cfg["preset"] == "gpu" and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda", local) if cuda else torch.device("cpu")


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
# The training step


class Trainer:
    """A run's weights and optimiser, and step(): one optimiser step.
    model: the online weights; ema: their moving average, which is sampled, evaluated and (paper) asked for the
    conditional self-evaluation. net and eval_net are the same two as the step calls them: compiled, and net
    wrapped for several processes, where the config says so."""

    def __init__(self, cfg, device, rank=0, world=1, ckpt=None, ckpt_path=None):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        torch.manual_seed(cfg["seed"])  # the initial weights; DDP copies rank 0's to the others anyway
        self.text = selfe.TextEncoder(cfg["text_encoder"], cfg["text_len"], device)
        self.model = build_model(cfg, self.text.dim).to(device)
        self.ema = build_model(cfg, self.text.dim).to(device).requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), fused=True)
        if ckpt is not None:
            load_weights(self.model, ckpt["model"], ckpt_path)
            load_weights(self.ema, ckpt["ema"], ckpt_path)
            self.opt.load_state_dict(ckpt["opt"])
        self.net, self.eval_net = self.model, self.ema if cfg["ema_eval"] else None
        # whole graphs (a graph break is an error, not a silent slowdown) with static shapes: the step feeds the
        # network two batch sizes only, all B rows and the fixed m rows of self-evaluation and the fake prompt
        if cfg["compile"]:
            self.net = torch.compile(self.model, fullgraph=True, dynamic=False)
            if cfg["ema_eval"]:
                self.eval_net = torch.compile(self.ema, fullgraph=True, dynamic=False)
        if world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=None if device.index is None else [device.index],
                broadcast_buffers=False)  # the only buffer, pos, never changes
        self.autocast = torch.autocast(device.type, torch.bfloat16) if cfg["bf16"] else nullcontext()
        self.batch = cfg["batch_size"] // world  # per process
        self.null = self.text([""] * self.batch)

    def encode_ahead(self, captions):
        """Encode every caption the run can meet now (and its fake prompt, if that term comes on): a caption met for
        the first time mid-run makes the step wait for the encoder on the CPU, and a GPU sit idle (train.py calls
        this on a GPU only). The shapes world has 240 captions; a folder's captions are left to be encoded as they
        come when they overflow the cache."""
        captions = list(dict.fromkeys(captions))
        if aux_on(self.cfg["iters"] - 1, self.cfg):
            captions += fake_prompts(captions)
        if len(captions) < self.text.cache_size:
            self.text(captions)

    def step(self, step, x0, captions):
        """One optimiser step, no host sync: the loss, grad norm and fault flag stay on the device.
        -> (loss, grad_norm, bad: 1.0 when the step was skipped for a non-finite loss or gradient, stats)."""
        cfg, text = self.cfg, self.text
        x0, cond = x0.to(self.device, non_blocking=True), text(captions)
        fake = text(fake_prompts(captions)) if aux_on(step, cfg) else None
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        torch.manual_seed(step_seed(cfg["seed"], self.rank, step))  # the times and noise of this step
        with self.autocast:
            loss, stats = selfe.selfe_loss(
                self.net, x0, cond, self.null, fake, method=cfg["method"], tau=tau_at(step, cfg),
                p_equal=cfg["p_equal"], p_null=cfg["p_null"], shift=cfg["shift"], renorm=cfg["renorm"],
                eval_net=self.eval_net, null_any_s=cfg["null_any_s"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["clip"])
        bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float()
        if self.world > 1:  # a fault on one process skips the step on all of them
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        # Skip the update without a host sync: fused Adam reads `found_inf` (the tensor AMP's GradScaler hands
        # it) on the device and leaves weights and moments untouched where it is 1.
        self.opt.found_inf = bad
        self.opt.step()
        decay = min(cfg["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)
        return loss.detach(), grad_norm, bad, stats

    def flops(self, step):
        return step_flops(self.model, self.cfg, self.batch, aux_on(step, self.cfg))


def fake_prompts(captions):
    return [c + " fake image" for c in captions]  # the appendix's prompt for the model's own samples


def step_flops(model, cfg, batch, aux):
    """Analytic FLOPs of a step on one process: the grad pass (forward + backward = 3 forwards) on every row, the
    two no-grad self-evaluation forwards on the s < t rows, and the fake-score pass (with grad) when on."""
    f = model.flops(cfg["text_len"])
    m = 0 if cfg["method"] == "fm" else selfe.self_rows(batch, cfg["p_equal"], cfg["p_null"])[0]
    return f * (3 * batch + 2 * m + (3 * m if aux else 0))


# ---------------------------------------------------------------------------------------------------------------
# Speed figures

# Dense bf16 peaks (datasheets), for MFU. The first key that the device name contains wins: variants first.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12),
             ("H200", 989e12), ("A100", 312e12))


def peak_flops(name):
    """-> the bf16 peak of a GPU by its name (torch.cuda.get_device_name), None for one we do not know."""
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"


def speed(dt, steps, flops, batch, device):
    """-> {ms_per_step, img_per_s, mfu (known GPUs), peak_mem_gb}. batch: images per step, all processes."""
    out = {"ms_per_step": 1000 * dt / steps, "img_per_s": batch * steps / dt}
    peak = peak_flops(device_name(device)) if device.type == "cuda" else None
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
