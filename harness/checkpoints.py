"""
A run's network outside the training loop: built from the run's config, saved (ckpt.pt, and the
EMA weights alone as an export to hand on) and loaded back.
"""
import hashlib
import json
import os

import safetensors.torch
import torch

import selfe
from .cli import InputError


def build_model(cfg, text_dim):
    """The network train.py trains. To try your own, return it here: any nn.Module with
    forward(x (B, C, H, W), t (B,), s (B,), cond) -> V (B, C, H, W), the velocity of Eq. 6, where
    cond = (tokens (B, L, Dt), mask (B, L) bool, pooled (B, Dt)) from the TextEncoder; attributes
    res and channels (sampling reads them); optionally flops(text_len), the forward FLOPs of one
    image, for the log's MFU (without it the log shows none)."""
    return selfe.DiT(res=cfg["res"], patch=cfg["patch"], text_dim=text_dim,
                     act_ckpt=cfg.get("act_ckpt", False), **selfe.MODELS[cfg["model"]])


def recipe_of(cfg):
    """The run's config -> the selfe.Recipe of its training steps."""
    return selfe.Recipe(fm=cfg["method"] == "fm", p_equal=cfg["p_equal"], p_null=cfg["p_null"],
                        null_any_s=cfg["null_any_s"], shift=cfg["shift"], renorm=cfg["renorm"],
                        k=cfg["k"])


# -------------------------------------------------------------------------------------------------
# Checkpoints: tensors and plain data only, so that weights_only=True loads them. Written to a
# temporary file, flushed, then renamed over the old one: a kill at any moment leaves one whole.
# An export (export_ema) holds the EMA weights alone, in the Hugging Face layout, to hand on.

CKPT_KEYS = {"model", "ema", "opt", "step", "config", "text_dim"}  # and "skipped" where counted
BEFORE_KEY = {"null_any_s": False}  # how checkpoints from before a config key were trained
EXPORT_FORMAT = "selfe-ema"
EXPORT_KEYS = {"format", "step", "text_dim", "weights_sha256"}  # config.json's, beside the run's
CKPT_EXPECTED = ("--ckpt expects a ckpt.pt written by train.py or an exported folder (config.json "
                 "+ model.safetensors)")


def write_synced(path, write):
    """write(f) into path, flushed to the disk: a rename after it never exposes a half file."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path, model, ema, opt, step, cfg, text_dim, skipped):
    if not all(p.isfinite().all() for p in model.parameters()):
        raise SystemExit(f"error: non-finite weights at step {step}; not saving over {path}")
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "step": step, "config": cfg, "text_dim": text_dim, "skipped": skipped}
    write_synced(path + ".tmp", lambda f: torch.save(ckpt, f))
    os.replace(path + ".tmp", path)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def export_ema(folder, ema, cfg, step, text_dim):
    """folder/model.safetensors (the EMA weights, float32) and folder/config.json (the run's config
    plus text_dim, step, the format and the weights' SHA-256). Each is written to a temporary name,
    then renamed, config.json last: a kill between the renames leaves weights that disagree with
    the config's hash, which read_export refuses; never a pair that loads but does not belong."""
    state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in ema.state_dict().items()}
    # "pt": the metadata Hugging Face's loaders expect of PyTorch weights
    weights = safetensors.torch.save(state, metadata={"format": "pt"})
    config = {**cfg, "text_dim": text_dim, "step": step, "format": EXPORT_FORMAT,
              "weights_sha256": sha256(weights)}
    os.makedirs(folder, exist_ok=True)
    weights_path, config_path = export_paths(folder)
    write_synced(weights_path + ".tmp", lambda f: f.write(weights))
    write_synced(config_path + ".tmp", lambda f: f.write(json.dumps(config, indent=1).encode()))
    os.replace(weights_path + ".tmp", weights_path)
    os.replace(config_path + ".tmp", config_path)  # last: from here the new pair is whole


def export_paths(folder):
    return os.path.join(folder, "model.safetensors"), os.path.join(folder, "config.json")


def read_checkpoint(path):
    """A train.py checkpoint as a dict, older ones brought to the current format. weights_only:
    only tensors and plain data are unpickled, so a file crafted to run code on load is refused."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path!r} does not exist (train.py writes OUT/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ... by the damage
        if "Unsupported global" in str(e):  # torch's words for a pickled function or class
            raise InputError(f"refusing to load {path!r}: it holds Python objects, not just "
                             f"tensors and plain data, and could run code on load (train.py never "
                             f"writes such files)") from None
        raise InputError(f"{path!r} is not a readable checkpoint (truncated, or not written by "
                         f"train.py: {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not CKPT_KEYS <= set(ckpt):
        raise InputError(f"{path!r} is not a train.py checkpoint (it lacks {sorted(CKPT_KEYS)})")
    return {"skipped": 0, **ckpt, "config": {**BEFORE_KEY, **ckpt["config"]}}


def read_export_config(folder):
    """folder/config.json, checked to be an export's; any other folder is refused in one line."""
    weights_path, config_path = export_paths(folder)
    if not (os.path.isfile(weights_path) and os.path.isfile(config_path)):
        ckpt = os.path.join(folder, "ckpt.pt")
        hint = f"; did you mean {ckpt}?" if os.path.isfile(ckpt) else ""
        raise InputError(f"{folder!r} is a folder but not an export: {CKPT_EXPECTED}{hint}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise InputError(f"{config_path!r} is not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise InputError(f"{config_path!r} is not a Self-E export's config (no \"format\": "
                         f"\"{EXPORT_FORMAT}\"): {CKPT_EXPECTED}")
    missing = EXPORT_KEYS - set(config)
    if missing:
        raise InputError(f"{config_path!r} is damaged: it lacks {sorted(missing)}")
    return config


def read_export(folder):
    """An export folder as read_checkpoint gives a checkpoint: its "ema", "config", "step" and
    "text_dim". The weights must be the ones config.json names by hash: the pair of one save."""
    config = read_export_config(folder)
    weights_path, config_path = export_paths(folder)
    with open(weights_path, "rb") as f:
        weights = f.read()
    if sha256(weights) != config["weights_sha256"]:
        raise InputError(f"{weights_path!r} is not the file {config_path!r} was saved with "
                         f"(damaged, replaced, or its save was cut short: the run's ckpt.pt holds "
                         f"the same weights)")
    run = {k: v for k, v in config.items() if k not in EXPORT_KEYS}
    return {"ema": safetensors.torch.load(weights), "config": {**BEFORE_KEY, **run},
            "step": config["step"], "text_dim": config["text_dim"]}


def load_weights(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError:  # size mismatch or missing keys
        raise InputError(f"{path!r} was saved by a model of another shape; keep --model, --res and "
                         f"--patch as they were, or start a new --out") from None


def load_both(path):
    """A ckpt.pt -> (the run's config, its online weights, its EMA), both networks in eval mode."""
    ckpt = read_checkpoint(path)
    net, ema = (build_model(ckpt["config"], ckpt["text_dim"]) for _ in range(2))
    load_weights(net, ckpt["model"], path)
    load_weights(ema, ckpt["ema"], path)
    return ckpt["config"], net.eval(), ema.eval()


def load_checkpoint(path, device="cpu"):
    """A ckpt.pt or an export folder -> (the EMA model in eval mode, the run's config, its step)."""
    ckpt = read_export(path) if os.path.isdir(path) else read_checkpoint(path)
    model = build_model(ckpt["config"], text_dim=ckpt["text_dim"])
    load_weights(model, ckpt["ema"], path)
    return model.to(device).eval(), ckpt["config"], ckpt["step"]
