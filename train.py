"""
Train a Self-E text-to-image model from scratch.

    python train.py                      # built-in shapes world; CPU preset without a GPU, GPU preset with one
    python train.py --method fm          # the flow-matching baseline: same model, data and schedule
    python train.py --data DIR           # your images: DIR/metadata.jsonl or a .txt caption beside each image
    python train.py --out out --resume   # continue the run saved in out/

Every config key below is a command-line flag (underscores become hyphens). Everything a run writes goes to --out:
ckpt.pt (model, EMA, optimiser, step, config, RNG states; written atomically), log.jsonl, samples/step_NNNNNN.png.
"""
import argparse
import json
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import selfe
from sample import EVAL_SIZES, SAMPLER, build_model, evaluate, generate, save_grid
from shapes import ShapesData

# ---------------------------------------------------------------------------------------------------------------
# Config: plain defaults; a preset fills in the keys it names unless they are given on the command line.
CONFIG = {
    "out": ("out", "folder for everything the run writes"),
    "data": ("shapes", "'shapes' (built in, infinite) or a folder of images with captions"),
    "preset": ("auto", "cpu | gpu | auto (gpu when CUDA is available)"),
    "method": ("selfe", "selfe | fm (flow-matching baseline: s = t always, no self-evaluation)"),
    "renorm": (True, "energy-preserving target, Eq. 19 (off: the paper's 'w/o target norm' ablation)"),
    "aux_start": (0.77, "fraction of the run after which the fake-score term is on (paper 550k/710k); "
                        "0 = from the start (ablation), 1 = never"),
    "tau_ramp": (0.4, "fraction of the run over which tau ramps 0 -> 1 (paper 300k/710k)"),
    "p_equal": (0.5, "probability of s = t (paper)"),
    "p_null": (0.1, "probability of the empty prompt (ours; the paper gives none)"),
    "shift": (1.0, "time shift k for training and sampling; 1.0 suits our small pixel resolutions"),
    "ema_eval": (False, "use the EMA weights for the conditional self-evaluation pass, as the paper does"),
    "min_lr": (1e-5, "learning rate at the end of the linear decay (paper)"),
    "ema": (0.9999, "EMA decay (paper), warmed up as min(ema, (1 + k) / (10 + k)) so short runs work"),
    "clip": (1.0, "gradient clipping norm (ours)"),
    "text_encoder": ("default", "Hugging Face id or local path; 'default' = all-MiniLM-L6-v2, offline copy"),
    "log_every": (25, "steps between progress updates and log.jsonl lines"),
    "sample_every": (1000, "steps between sample grids (EMA weights; 2, 4, 8, 50 steps)"),
    "eval_every": (500, "steps between ShapesEval scores (small set, 2 and 8 steps) in log.jsonl; 0 = off"),
    "ckpt_every": (1000, "steps between checkpoints (and at the end)"),
    "seed": (0, "seed for weights, data and noise"),
}
PRESETS = {  # measured on 2 CPU cores (README); the GPU preset is the paper's recipe at a small scale
    "cpu": dict(model="tiny", res=32, patch=4, text_len=16, batch_size=32, iters=2000, lr=1e-3, warmup=100,
                compile=False, bf16=False),
    "gpu": dict(model="small", res=64, patch=2, text_len=64, batch_size=256, iters=50000, lr=3e-4, warmup=1000, compile=True,
                bf16=True),
}
GRID_PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of a triangle and a circle",
                "a photo of three squares", "a photo of a circle left of a square",
                "a photo of a yellow triangle and a green square"]


def parse_config(argv):
    """-> (config dict, the keys given on the command line)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = {"preset": ["auto", *PRESETS], "method": ["selfe", "fm"], "model": list(selfe.MODELS)}
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


def finish_config(cfg):
    if cfg["preset"] == "auto":
        cfg["preset"] = "gpu" if torch.cuda.is_available() else "cpu"
        print(f"preset: {cfg['preset']} ({'CUDA found' if cfg['preset'] == 'gpu' else 'no GPU found'}; "
              f"--preset to choose)")
    cfg.update({k: v for k, v in PRESETS[cfg["preset"]].items() if k not in cfg})  # flags and saved keys win
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Data: the shapes world, or a folder of captioned images


def load_image(path, res):
    """RGB, centre-cropped to a square, resized to res x res -> uint8 (res, res, 3)."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return np.asarray(img.resize((res, res), Image.BICUBIC))


def read_captions(root):
    """{file name: caption} from root/metadata.jsonl (Hugging Face imagefolder) or sidecar .txt files."""
    meta = os.path.join(root, "metadata.jsonl")
    if os.path.exists(meta):
        with open(meta) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return {r["file_name"]: r["text"] for r in rows}
    exts = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    caps = {}
    for name in sorted(os.listdir(root)):
        txt = os.path.join(root, os.path.splitext(name)[0] + ".txt")
        if name.lower().endswith(exts) and os.path.exists(txt):
            with open(txt) as f:
                caps[name] = f.read().strip()
    return caps


class FolderData:
    """A folder of captioned images, loaded once into memory at the training resolution."""

    def __init__(self, root, res, seed=0):
        if not os.path.isdir(root):
            raise SystemExit(f"error: --data {root}: no such folder (use 'shapes' for the built-in data)")
        caps = read_captions(root)
        if not caps:
            raise SystemExit(f"error: no captioned images in {root} (need metadata.jsonl or NAME.txt per image)")
        self.names = sorted(caps)
        self.images = np.stack([load_image(os.path.join(root, n), res) for n in tqdm(self.names, desc="images")])
        self.captions = [caps[n] for n in self.names]
        self.rng = np.random.default_rng(seed)

    def batch(self, n):
        idx = self.rng.integers(len(self.names), size=n)
        x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, res, res)
        return x, [self.captions[i] for i in idx]


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
# Checkpoints: tensors and plain data only, so weights_only=True loads them; written to a temp file, then renamed


def save_checkpoint(path, model, ema, opt, step, cfg, data, text_dim):
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
            "config": cfg, "text_dim": text_dim, "torch_rng": torch.get_rng_state(),
            "data_rng": data.rng.bit_generator.state}
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def main(argv=None):
    cfg, given, resume = parse_config(sys.argv[1:] if argv is None else argv)
    ckpt_path = os.path.join(cfg["out"], "ckpt.pt")
    ckpt = None
    if resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        cfg = {**ckpt["config"], **given}
        print(f"resuming {ckpt_path} at step {ckpt['step']}")
    cfg = finish_config(cfg)
    os.makedirs(os.path.join(cfg["out"], "samples"), exist_ok=True)
    device = "cuda" if cfg["preset"] == "gpu" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg["seed"])
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    data = ShapesData(cfg["res"], cfg["seed"]) if cfg["data"] == "shapes" else FolderData(cfg["data"], cfg["res"],
                                                                                          cfg["seed"])
    text = selfe.TextEncoder(cfg["text_encoder"], cfg["text_len"], device)
    model = build_model(cfg, text.dim).to(device)
    ema = build_model(cfg, text.dim).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), fused=device == "cuda")
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["torch_rng"])
        data.rng.bit_generator.state = ckpt["data_rng"]
    net = torch.compile(model) if cfg["compile"] and device == "cuda" else model
    autocast = torch.autocast("cuda", torch.bfloat16) if cfg["bf16"] and device == "cuda" else nullcontext()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg['method']} | model {cfg['model']} ({n_params / 1e6:.2f}M params) | {cfg['res']}px patch "
          f"{cfg['patch']} | batch {cfg['batch_size']} | {cfg['iters']} iters | {device}")
    null = text([""] * cfg["batch_size"])
    grid_prompts = GRID_PROMPTS if cfg["data"] == "shapes" else list(dict.fromkeys(data.captions))[:6]

    def write_grid(step):
        images = generate(ema, text, grid_prompts, [2, 4, 8, 50], seed=0, shift=cfg["shift"], **SAMPLER)
        save_grid(images, grid_prompts, os.path.join(cfg["out"], "samples", f"step_{step:06d}.png"))

    def write_eval(step):  # so a user can watch the few-step score rise
        results, _, _ = evaluate(ema, text, [2, 8], EVAL_SIZES["small"], progress=False, shift=cfg["shift"], **SAMPLER)
        scores = {k: round(r["overall"], 4) for k, r in results.items()}
        log.write(json.dumps({"step": step, "eval_overall": scores}) + "\n")
        tqdm.write(f"step {step}: ShapesEval overall " + ", ".join(f"{v:.3f} at {k} steps" for k, v in scores.items()))

    log = open(os.path.join(cfg["out"], "log.jsonl"), "a")
    bar = tqdm(total=cfg["iters"], initial=step, desc="train", dynamic_ncols=True)
    t0, seen = time.time(), 0
    while step < cfg["iters"]:
        x0, captions = data.batch(cfg["batch_size"])
        x0, cond = x0.to(device, non_blocking=True), text(captions)
        fake = text([c + " fake image" for c in captions]) if aux_on(step, cfg) else None
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast:
            loss, stats = selfe.selfe_loss(
                net, x0, cond, null, fake, method=cfg["method"], tau=tau_at(step, cfg), p_equal=cfg["p_equal"],
                p_null=cfg["p_null"], shift=cfg["shift"], renorm=cfg["renorm"],
                eval_net=ema if cfg["ema_eval"] else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
        decay = min(cfg["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        step += 1
        seen += cfg["batch_size"]
        bar.update(1)

        if step % cfg["log_every"] == 0 or step == cfg["iters"]:
            dt = time.time() - t0
            rec = {"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr,
                   "tau": tau_at(step - 1, cfg), "aux": float(stats["aux"]), "frac_self": stats["frac_self"],
                   "img_per_s": seen / dt, "time": time.time()}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}", tau=f"{rec['tau']:.2f}")
            t0, seen = time.time(), 0
        if step % cfg["ckpt_every"] == 0 or step == cfg["iters"]:
            save_checkpoint(ckpt_path, model, ema, opt, step, cfg, data, text.dim)
        if step % cfg["sample_every"] == 0 or step == cfg["iters"]:
            write_grid(step)
            t0, seen = time.time(), 0  # keep the grid's time out of the throughput figure
        if cfg["data"] == "shapes" and cfg["eval_every"] and (step % cfg["eval_every"] == 0 or step == cfg["iters"]):
            write_eval(step)
            t0, seen = time.time(), 0
    bar.close()
    print(f"done: {ckpt_path}, samples in {os.path.join(cfg['out'], 'samples')}")


if __name__ == "__main__":
    main()
