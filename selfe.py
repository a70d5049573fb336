"""
Self-E, "Self-Evaluation Unlocks Any-Step Text-to-Image Generation" (Yu et al., CVPR 2026, arXiv
2512.22374), in one file: the noise path, the dual-time DiT, the training loss, the any-step
sampler. Equation numbers are the paper's; "ours" marks what the paper leaves open.

t = 0 is data, t = 1 is noise. The network V(x_t, t, s, cond) takes two times 0 <= s <= t <= 1:
where it is, and where to jump. With s = t it is an ordinary flow-matching model. The loss and the
sampler take any such network (toy.py's 2-D MLP too); a condition is a tuple of tensors whose first
dimension is the batch: the DiT's (text tokens, their mask, a pooled text vector), the toy's
(class ids,). This file imports torch alone: copy it, and train it with the loop of train.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel


def bcast(t, x):
    """(B,) -> (B, 1, 1, ...): a per-row number that multiplies a batch x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def per_tensor(f, *conds):
    """Apply f to the matching tensors of one or more conditions: per_tensor(lambda c: c[:m],
    cond)."""
    return tuple(f(*parts) for parts in zip(*conds))


def sq_err(a, b):
    """(B, ...) x 2 -> (B,): each row's mean squared error, in float32 whatever autocast does."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


# -------------------------------------------------------------------------------------------------
# 1. The noise path and the sample head


def add_noise(x0, t, eps):
    """Eq. 1: x_t = alpha_t x0 + sigma_t eps with alpha_t = 1 - t, sigma_t = t."""
    return (1 - bcast(t, x0)) * x0 + bcast(t, x0) * eps


def G(net, x_t, t, s, cond):
    """Eq. 6: the clean image a jump from (x_t, t) toward s aims at (a sample at s re-noises it).
    With s = t it is Tweedie's E[x0 | x_t, c]."""
    return x_t - bcast(t, x_t) * net(x_t, t, s, cond)


def shift_time(u, shift):
    """The resolution shift of SD3 and FLUX: shift > 1 spends more time near noise; 1 is none."""
    return shift * u / (1 + (shift - 1) * u)


# -------------------------------------------------------------------------------------------------
# 2. The network: a DiT that knows two times (appendix), read as DiT's models.py


def sinusoid(t, dim, max_period=10000.0):
    """(B,) times in [0, 1] -> (B, dim). Times are scaled by 1000, as in DiT and FLUX."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device,
                                                           dtype=torch.float32) / half)
    args = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos positions (T, dim), T = grid^2: half the channels for the row, half for the
    column. Fixed, as DiT's (the paper: RoPE)."""
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
    e = MLP_t(t) + MLP_gap(t - s) (appendix) plus a pooled text vector drives every adaLN, and the
    text tokens join the image tokens in attention (both as FLUX)."""

    def __init__(self, res=32, patch=4, channels=3, dim=128, depth=4, heads=4, text_dim=384,
                 act_ckpt=False):
        super().__init__()
        self.act_ckpt = act_ckpt  # recompute each block in the backward pass: less memory kept
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
        # ours: the gap embedding's last layer starts at zero (its bias too, above), so s does
        # nothing until trained: the untrained model is a flow-matching model
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
    "tiny": dict(dim=128, depth=4, heads=4),  # ~1.45M parameters with a 384-wide text input
    "small": dict(dim=384, depth=12, heads=6),  # ~33M, DiT-S width
    "base": dict(dim=768, depth=12, heads=12),  # ~130M, DiT-B width
}


# -------------------------------------------------------------------------------------------------
# 3. Training


@dataclass(frozen=True)
class Recipe:
    """The choices of a training step: the paper's, or ours where it is silent."""
    fm: bool = False  # the flow-matching baseline: s = t on every row, no self-evaluation
    p_equal: float = 0.5  # rows with s = t (paper), a fixed share of each batch (ours)
    p_null: float = 0.1  # rows with the empty prompt, which guidance needs (ours: the rate)
    null_any_s: bool = True  # the empty prompt on any row (ours); False: on s = t rows only
    shift: float = 1.0  # the time shift of shift_time
    renorm: bool = True  # Eq. 19; False: Eq. 16, the paper's ablation "w/o target norm"
    k: float = 0.9  # the classifier score's share once the fake-score term is on (appendix)

    def jump_rows(self, B):
        """Rows [0, m) of a batch jump (s < t); the rest have s = t."""
        return 0 if self.fm else round((1 - self.p_equal) * B)


def sample_times(n, tau, m, shift, device=None):
    """Time pairs: t logit-normal, then shifted; rows [0, m) jump, s ~ U((1 - tau) t, t); the rest
    have s = t. tau ramps 0 -> 1 early in training: jumps grow from nothing to the whole path."""
    t = shift_time(torch.sigmoid(torch.randn(n, device=device)), shift)
    t = t.clamp(1e-3, 1 - 1e-3)  # keeps t / (1 - t) and 1 / t^2 finite (ours)
    s = (t - tau * t * torch.rand(n, device=device)).clamp(min=1e-3)  # s > 0 as well (ours)
    return t, torch.where(torch.arange(n, device=device) < m, s, t)


def null_rows(B, m, recipe, device=None):
    """-> (B,) bool: the rows whose prompt is dropped for the empty one; any row at rate p_null,
    or (null_any_s False) rows [m, B) at a rate that keeps p_null."""
    u = torch.rand(B, device=device)
    if recipe.null_any_s:
        return u < recipe.p_null
    return (torch.arange(B, device=device) >= m) & (u < recipe.p_null * B / max(1, B - m))


def fake_prompts(captions):
    """The appendix's prompt for the model's own samples, which the fake-score term learns."""
    return [c + " fake image" for c in captions]


def lambda_st(t, s):
    """Eq. 17: sigma_t / alpha_t - sigma_s / alpha_s, the self-evaluation weight; 0 when s = t."""
    return t / (1 - t) - s / (1 - s)


def rescale_to(y, ref):
    """y, row by row, at the norm of ref (over C x H x W): the energy-preserving rescale of Eq. 19
    and of guidance (Sec. 3.4)."""
    norm = lambda x: x.flatten(1).norm(dim=1)  # noqa: E731
    return y * bcast(norm(ref) / (norm(y) + 1e-8), y)


def energy_renorm(x0, x_self, lam):
    """Eq. 19: mix the data and the self-evaluation target, then give the mix the data's norm."""
    return rescale_to(x0 + bcast(lam, x0) * x_self, x0)


def selfe_loss(net, x0, cond, null, fake=None, null_fake=None, *, tau, recipe, eval_net=None):
    """One training step's loss (Sec. 3, Eqs. 1-21) -> (loss, stats). x0 (B, ...) the data; cond,
    null: the conditions of the B prompts and of B empty prompts; fake, null_fake: of the fake
    prompts "<prompt> fake image" and "fake image" (None: the fake-score term is off); tau: the
    jumps' reach (train.py ramps it); eval_net: the conditional judge's weights (the paper: EMA;
    None: net's). Stage one reads top to bottom; the appendix's second stage and the ablation
    without Eq. 19 are functions of their own, each called from one marked line."""
    B, dev = x0.shape[0], x0.device
    m = recipe.jump_rows(B)
    # a dropped prompt drops its fake one too; such a row's judges both see the empty prompt
    drop = null_rows(B, m, recipe, dev)
    cond = per_tensor(lambda c, n: torch.where(bcast(drop, c), n, c), cond, null)
    if fake is not None:
        fake = per_tensor(lambda c, n: torch.where(bcast(drop, c), n, c), fake, null_fake)
    t, s = sample_times(B, tau, m, recipe.shift, dev)
    x_t = add_noise(x0, t, torch.randn_like(x0))  # Eq. 1
    x0_hat = G(net, x_t, t, s, cond)  # Eq. 6: the one pass with gradient, (B, ...)
    target, weight, fake_loss = x0, 1.0, x0.new_zeros(1)  # s = t rows learn the data: FM
    if m > 0:  # the model judges its own jumps; on rows [0, m) only, since lam = 0 elsewhere
        x0_sg, t_m, s_m, x0_m = x0_hat[:m].detach(), t[:m], s[:m], x0[:m]
        cond_m, null_m = (per_tensor(lambda c: c[:m], c) for c in (cond, null))
        # re-noise the jump's answer to s with fresh noise, then ask the model as a plain FM
        # model, without gradient; in float32 (ours: bf16 scrambles G_u - G_c, measured), which
        # is TF32 on a CUDA GPU
        with torch.no_grad(), torch.autocast(x0.device.type, enabled=False):
            x_s = add_noise(x0_sg, s_m, torch.randn_like(x0_sg))
            G_c = G(net if eval_net is None else eval_net, x_s, s_m, s_m, cond_m)
            # (the second stage at k = 0 gives the classifier score no share: no pass for it)
            G_u = G(net, x_s, s_m, s_m, null_m) if fake is None or recipe.k > 0 else G_c
        delta = G_u - G_c  # by Tweedie proportional to -grad log q(c | x_s), the classifier score
        if fake is not None:  # the appendix's second stage
            delta, fake_loss = fake_score_term(net, x_s, s_m, x0_sg, G_c, delta,
                                               per_tensor(lambda c: c[:m], fake), recipe.k)
        x_self = x0_sg - delta  # Eq. 14
        lam = lambda_st(t_m, s_m)  # Eq. 17
        y = energy_renorm(x0_m, x_self, lam)  # Eq. 19
        if not recipe.renorm:  # the paper's ablation "w/o target norm"
            y, weight = without_renorm(x0_m, x_self, lam, B)
        jumped = s_m < t_m  # False while tau = 0: the target is then exactly x0
        target = torch.cat([torch.where(bcast(jumped, x0_m), y.to(x0.dtype), x0_m), x0[m:]])
        fake_loss = fake_loss * jumped
    per_row = sq_err(x0_hat, target) / t**2 * weight  # Eqs. 20-21; s = t rows: ||V - v||^2
    loss = per_row.mean() + fake_loss.sum() / B
    # stats stay on the device (reading one costs a sync)
    return loss, {"frac_self": (s < t).float().mean(), "aux": fake_loss.detach().sum() / B}


def fake_score_term(net, x_s, s, x0_sg, G_c, classifier, fake, k):
    """The appendix's second stage -> (delta, each row's fake-score loss). The same net learns the
    mean of its OWN samples under the fake prompt; its pass, on the online weights, also gives the
    mix its G_fake (ours: one pass for both): delta = k (G_u - G_c) + (1 - k) (G_fake - G_c)."""
    G_fake = G(net, x_s, s, s, fake)
    fake_loss = sq_err(G_fake, x0_sg) / s.clamp(min=1e-2) ** 2  # 1/s^2, s >= 0.01, ours
    return k * classifier + (1 - k) * (G_fake.detach() - G_c), fake_loss


def without_renorm(x0, x_self, lam, B):
    """The ablation of Eqs. 16 and 18 -> (target, each row's weight): |x0_hat - x0|^2 + lam
    |x0_hat - x_self|^2 is (1 + lam) times the regression on their mix, up to a constant."""
    y = (x0 + bcast(lam, x0) * x_self) / bcast(1 + lam, x0)
    return y, torch.cat([1 + lam, lam.new_ones(B - len(lam))])


def ema_decay(step, decay):
    """The EMA's decay at a training step, warmed up (ours): fast at first, then `decay`."""
    return min(decay, (1 + step) / (10 + step))


def ema_update(ema, net, decay):
    """ema <- decay * ema + (1 - decay) * net, every weight in one foreach call: the EMA, the
    paper's judge."""
    torch.optim.swa_utils.get_ema_multi_avg_fn(decay)(list(ema.parameters()),
                                                      list(net.parameters()), None)


# -------------------------------------------------------------------------------------------------
# 4. Any-step sampling


@dataclass(frozen=True)
class Sampler:
    cfg: float  # omega of energy-preserving guidance; 1 = none
    eta: float  # 0: Euler (Eq. 22); 1: DDPM-like, what the paper's tables used
    s_k: object  # the time step k jumps to: "next" = t_{k+1}, or a number f for f * t_k
    uncond_at_t: bool  # guidance asks the empty prompt at (t, t) (ours), else at (t, s_k)


# How each method samples unless told otherwise (measured on ShapesEval: results/README.md).
# Self-E: the paper's omega 5, s_k = t_{k+1} and its Eq. 22 (eta 0; its tables used eta 1); the
# empty prompt at (t, t) is ours.
# Flow matching is asked at s = t (s_k = 1), the only time pair it was trained on.
SAMPLERS = {"selfe": Sampler(cfg=5.0, eta=0.0, s_k="next", uncond_at_t=True),
            "fm": Sampler(cfg=5.0, eta=0.0, s_k=1.0, uncond_at_t=True)}


def time_grid(steps, shift):
    return shift_time(torch.linspace(1, 0, steps + 1), shift)  # (N + 1,), from 1 down to 0


def guided_velocity(net, x, t, s, cond, null, cfg, uncond_at_t):
    """Energy-preserving CFG (Sec. 3.4): extrapolate, then rescale to the conditional norm. One
    batch holds both branches."""
    if null is None or cfg == 1.0:
        return net(x, t, s, cond)
    both = per_tensor(lambda c, n: torch.cat([c, n]), cond, null)
    V_c, V_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s, t if uncond_at_t else s]),
                   both).chunk(2)
    return rescale_to(V_u + cfg * (V_c - V_u), V_c)


@torch.no_grad()
def sample(net, noise, cond, null, steps, shift, sampler, generator=None):
    """Any-step sampler (Sec. 3.4, Eq. 22): noise (B, ...) at t = 1 -> images at t = 0, on the
    training's time shift, with a Sampler. Fresh noise (eta > 0) comes from `generator` on the
    CPU, so a seed gives the same images on any device."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    ts = time_grid(steps, shift).tolist()
    x, B = noise, noise.shape[0]
    for i in range(steps):  # step i: from t_i to t_{i+1} (the paper's k)
        t, t_next = ts[i], ts[i + 1]
        s = t_next if sampler.s_k == "next" else float(sampler.s_k) * t
        full = lambda v: x.new_full((B,), v)  # noqa: E731
        g = guided_velocity(net, x, full(t), full(s), cond, null, sampler.cfg, sampler.uncond_at_t)
        x0_hat = x - t * g  # Eq. 6
        if i == steps - 1:
            return x0_hat  # t_next = 0
        eps_hat = (x - (1 - t) * x0_hat) / t
        # DDIM's noise scale from t to t_next with alpha = 1 - t, sigma = t; at eta = 1 the std of
        # the DDPM posterior q(x_t' | x_t, x0). The eps_hat term keeps the total variance.
        ratio = ((1 - t) * t_next) / ((1 - t_next) * t)
        c_n = sampler.eta * t_next * math.sqrt(max(0.0, 1 - ratio**2))
        x = (1 - t_next) * x0_hat + math.sqrt(t_next**2 - c_n**2) * eps_hat  # eta = 0: Eq. 22
        if c_n > 0:  # eta = 0 draws no noise
            x = x + c_n * torch.randn(x.shape, generator=generator).to(x.device)
