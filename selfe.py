"""
Self-E, the method: "Self-Evaluation Unlocks Any-Step Text-to-Image Generation" (Yu et al.,
CVPR 2026, arXiv 2512.22374). Equation numbers are the paper's. Read it top to bottom: the noise
path, the training loss, the any-step sampler.

t = 0 is data, t = 1 is noise. The network V(x_t, t, s, cond) takes two times 0 <= s <= t <= 1 and
returns a velocity; with s = t it is an ordinary flow-matching model. Any network will do: the DiT
of model.py or the 2-D MLP of toy.py. A condition is a tuple of tensors whose first dimension is the
batch: the DiT's is (text tokens, their mask, a pooled text vector), the toy's is (class ids,).
"""
import math

import torch


def bcast(t, x):
    """(B,) -> (B, 1, 1, ...): a per-row number that multiplies a batch x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def each(f, *conds):
    """Apply f to the matching tensors of one or more conditions: each(lambda c: c[:m], cond)."""
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
    """Eq. 6: where one jump from (x_t, t) lands. With s = t it is Tweedie's E[x0 | x_t, c]."""
    return x_t - bcast(t, x_t) * net(x_t, t, s, cond)


def shift_time(u, k):
    """The resolution shift of SD3 and FLUX: k > 1 spends more time near noise; 1 is no shift."""
    return k * u / (1 + (k - 1) * u)


# -------------------------------------------------------------------------------------------------
# 2. Training


def sample_times(n, tau, m, shift=1.0, device=None):
    """Time pairs: t logit-normal, then shifted; rows [0, m) jump, s ~ U((1 - tau) t, t); the rest
    have s = t. tau ramps 0 -> 1 early in training: jumps grow from nothing to the whole path."""
    t = shift_time(torch.sigmoid(torch.randn(n, device=device)), shift)
    t = t.clamp(1e-3, 1 - 1e-3)  # keeps t / (1 - t) and 1 / t^2 finite (ours)
    s = (t - tau * t * torch.rand(n, device=device)).clamp(min=1e-3)  # s > 0 as well (ours)
    return t, torch.where(torch.arange(n, device=device) < m, s, t)


def null_rows(B, m, p_null, null_any_s, device=None):
    """-> (B,) bool: the rows whose prompt is dropped for the empty one, which guidance needs (ours:
    the rate; any row, or with null_any_s=False rows [m, B) at a rate that keeps p_null)."""
    u = torch.rand(B, device=device)
    if null_any_s:
        return u < p_null
    return (torch.arange(B, device=device) >= m) & (u < p_null * B / max(1, B - m))


def fake_prompts(captions):
    """The appendix's prompt for the model's own samples, which the fake-score term learns."""
    return [c + " fake image" for c in captions]


def lambda_st(t, s):
    """Eq. 17: sigma_t / alpha_t - sigma_s / alpha_s, the self-evaluation weight; 0 when s = t."""
    return t / (1 - t) - s / (1 - s)


def energy_renorm(x0, x_self, lam):
    """Eq. 19: mix the data and the self-evaluation target, then give the mix the data's norm."""
    y = x0 + bcast(lam, x0) * x_self
    norm = lambda x: x.flatten(1).norm(dim=1)  # noqa: E731  per row, over C x H x W
    return y * bcast(norm(x0) / (norm(y) + 1e-8), y)


def selfe_loss(net, x0, cond, null, fake=None, null_fake=None, *, fm=False, tau=1.0, p_equal=0.5,
               p_null=0.1, shift=1.0, renorm=True, eval_net=None, null_any_s=True, k=0.9):
    """One training step's loss (Sec. 3, Eqs. 1-21) -> (loss, stats).
    x0 (B, ...) data; cond, null: conditions of the prompts and of the empty prompt; fake,
    null_fake: of the fake prompts "<prompt> fake image" and "fake image" (None: the fake-score term
    is off). fm: the flow-matching baseline (s = t on every row). eval_net: the weights of the
    conditional judge (the paper: EMA); the unconditional judge is net, the online weights.
    k: the classifier score's share once the fake-score term is on (the paper's 0.9).
    Without renorm, Eqs. 16-18: |x0_hat - x0|^2 + lam |x0_hat - x_self|^2, one regression on the
    mix (x0 + lam x_self) / (1 + lam) times (1 + lam); renorm (Eq. 19) rescales the mix instead."""
    B, dev = x0.shape[0], x0.device
    # rows [0, m) jump (s < t), the rest have s = t: a fixed share of every batch (ours; the paper
    # draws each row's s = t with probability p_equal)
    m = 0 if fm else round((1 - p_equal) * B)
    drop = null_rows(B, m, p_null, null_any_s, dev)  # (a dropped prompt drops its fake one too)
    cond = each(lambda c, n: torch.where(bcast(drop, c), n, c), cond, null)
    if fake is not None:
        fake = each(lambda c, n: torch.where(bcast(drop, c), n, c), fake, null_fake)
    t, s = sample_times(B, tau, m, shift, dev)
    x_t = add_noise(x0, t, torch.randn_like(x0))  # Eq. 1
    x0_hat = G(net, x_t, t, s, cond)  # Eq. 6: the one pass with gradient, (B, ...)
    target, aux = x0, x0.new_zeros(1)  # rows with s = t learn the data alone: flow matching
    pass_rows = 3 * B  # for the FLOP count: rows of every pass, one with gradient counted 3 times
    if m > 0:  # the model judges its own jumps; on rows [0, m) only, since lam = 0 elsewhere
        x0_sg, t_m, s_m, x0_m = x0_hat[:m].detach(), t[:m], s[:m], x0[:m]
        # re-noise the jump's answer to s with fresh noise, then ask the model as a plain FM
        # model; in float32 under bf16 autocast, which scrambles G_u - G_c's direction (results/);
        # on a CUDA GPU float32 matrix products run in TF32 (model.allow_tf32)
        with torch.no_grad(), torch.autocast(x0.device.type, enabled=False):
            x_s = add_noise(x0_sg, s_m, torch.randn_like(x0_sg))
            judge = net if eval_net is None else eval_net
            G_c = G(judge, x_s, s_m, s_m, each(lambda c: c[:m], cond))
            classifier = fake is None or k > 0  # at k = 0 the mix holds no classifier score
            G_u = G(net, x_s, s_m, s_m, each(lambda c: c[:m], null)) if classifier else G_c
        delta = G_u - G_c  # Tweedie: proportional to -grad log q(c | x_s), the classifier score
        pass_rows += m * (1 + classifier)
        if fake is not None:  # appendix: the same net learns the mean of its OWN samples; its
            # pass, on the online weights, also gives the mix its G_fake (ours: one pass for both)
            G_fake = G(net, x_s, s_m, s_m, each(lambda c: c[:m], fake))
            aux = sq_err(G_fake, x0_sg) / s_m.clamp(min=1e-2) ** 2  # weight 1/s^2, s >= 0.01 (ours)
            pass_rows += 3 * m
            # appendix: k times the classifier score, (1 - k) times the fake-score correction
            delta = k * delta + (1 - k) * (G_fake.detach() - G_c)
        x_self = x0_sg - delta  # Eq. 14
        lam = lambda_st(t_m, s_m)  # Eq. 17
        if renorm:
            y = energy_renorm(x0_m, x_self, lam)  # Eq. 19
        else:  # Eq. 18, the paper's ablation "w/o target norm"
            y = (x0_m + bcast(lam, x0_m) * x_self) / bcast(1 + lam, x0_m)
        jumped = s_m < t_m  # False while tau = 0: the target is then exactly x0
        target = torch.cat([torch.where(bcast(jumped, x0_m), y.to(x0.dtype), x0_m), x0[m:]])
        aux = aux * jumped
    per_row = sq_err(x0_hat, target) / t**2  # Eqs. 20-21; on s = t rows exactly ||V - v||^2
    if not renorm:
        per_row = per_row * (1 + lambda_st(t, s))  # Eq. 16: two squares folded into one
    loss = per_row.mean() + aux.sum() / B
    # stats stay on the device (reading one costs a sync)
    frac_self = (s < t).float().mean()
    return loss, {"frac_self": frac_self, "aux": aux.detach().sum() / B, "jump_rows": m,
                  "pass_rows": pass_rows}


# -------------------------------------------------------------------------------------------------
# 3. Any-step sampling


def time_grid(steps, shift=1.0):
    return shift_time(torch.linspace(1, 0, steps + 1), shift)  # (N + 1,), from 1 down to 0


def guided_velocity(net, x, t, s, cond, null, cfg, uncond_at_t=True):
    """Energy-preserving CFG (Sec. 3.4): extrapolate, then rescale to the conditional norm. One
    batch holds both branches. uncond_at_t (ours, measured): the empty prompt asked at (t, t)."""
    if null is None or cfg == 1.0:
        return net(x, t, s, cond)
    both = each(lambda c, n: torch.cat([c, n]), cond, null)
    V_c, V_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s, t if uncond_at_t else s]),
                   both).chunk(2)
    g = V_u + cfg * (V_c - V_u)
    norm = lambda v: v.flatten(1).norm(dim=1)  # noqa: E731
    return g * bcast(norm(V_c) / (norm(g) + 1e-8), g)


@torch.no_grad()
def sample(net, noise, cond, null=None, steps=4, cfg=5.0, eta=0.0, s_k="next", shift=1.0,
           generator=None, uncond_at_t=True):
    """Any-step sampler (Sec. 3.4, Eq. 22): noise (B, ...) at t = 1 -> images at t = 0.
    s_k: the time each step jumps to; "next" = t_{k+1}, or a number f for f * t_k (1: s = t).
    eta 0: Euler (Eq. 22); eta 1: DDPM-like, what the paper reports. Fresh noise comes from
    `generator` on the CPU, so a seed gives the same images on any device."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    ts = time_grid(steps, shift).tolist()
    x, B = noise, noise.shape[0]
    for k in range(steps):
        t, t_next = ts[k], ts[k + 1]
        s = t_next if s_k == "next" else float(s_k) * t
        full = lambda v: x.new_full((B,), v)  # noqa: E731
        g = guided_velocity(net, x, full(t), full(s), cond, null, cfg, uncond_at_t)
        x0_hat = x - t * g  # Eq. 6
        if k == steps - 1:
            return x0_hat  # t_next = 0
        eps_hat = (x - (1 - t) * x0_hat) / t
        # DDIM's noise scale from t to t_next with alpha = 1 - t, sigma = t; at eta = 1 the std of
        # the DDPM posterior q(x_t' | x_t, x0). The eps_hat term keeps the total variance.
        ratio = ((1 - t) * t_next) / ((1 - t_next) * t)
        c_n = eta * t_next * math.sqrt(max(0.0, 1 - ratio**2))
        x = (1 - t_next) * x0_hat + math.sqrt(t_next**2 - c_n**2) * eps_hat  # eta = 0: Eq. 22
        if c_n > 0:  # eta = 0 draws no noise
            x = x + c_n * torch.randn(x.shape, generator=generator).to(x.device)


# How each method samples unless told otherwise (measured on ShapesEval: results/README.md).
# Self-E: the paper's omega 5, s_k = t_{k+1} and Eq. 22 (eta 0; its tables used eta 1); the
# empty prompt at (t, t) is ours.
# Flow matching is asked at s = t (s_k = 1), the only time pair it was trained on.
SAMPLERS = {"selfe": dict(cfg=5.0, eta=0.0, s_k="next", uncond_at_t=True),
            "fm": dict(cfg=5.0, eta=0.0, s_k=1.0, uncond_at_t=True)}
