"""Tests of selfe.py: the formulas, the loss, the sampler, the dual-time DiT, and the mechanism on
toy.py's 2-D mixture."""
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import selfe
import toy

# The stub networks these tests run the loss and the sampler on (Recorder, LinearNet, ConstantG)
# are at the end of this file; tests/ takes them from here through its conftest.py.


# -------------------------------------------------------------------------------------------------
# The formulas


def test_the_noise_path_and_the_sample_head():
    """Eq. 1: x_t = (1 - t) x0 + t eps, the data at t = 0, noise at t = 1. Eq. 6: G = x_t - t V,
    so a net whose V points from c to x_t, (x_t - c) / t, makes G give c back."""
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t, s, c = torch.tensor([0.0, 0.25, 1.0]), torch.tensor([0.0, 0.1, 0.5]), torch.randn(3)
    x_t = selfe.add_noise(x0, t, eps)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], eps[2])
    assert torch.allclose(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    assert torch.allclose(selfe.G(ConstantG(), x_t[1:], t[1:], s[1:], one(c[1:])),
                          const_G(c[1:], x_t[1:]), atol=1e-6)


def test_lambda_is_zero_at_s_equal_t_and_the_gap_of_sigma_over_alpha():
    t = torch.tensor([0.1, 0.5, 0.9, 0.99])
    assert torch.all(selfe.lambda_st(t, t) == 0)
    # sigma/alpha = t/(1 - t): 1 at t = 0.5, 9 at 0.9, 1/3 at 0.25, 1/9 at 0.1 (by hand)
    pairs = torch.tensor([[0.5, 0.25], [0.9, 0.5], [0.9, 0.1], [0.5, 0.1]])
    want = torch.tensor([1 - 1 / 3, 9 - 1, 9 - 1 / 9, 1 - 1 / 9])
    assert torch.allclose(selfe.lambda_st(pairs[:, 0], pairs[:, 1]), want)


def test_energy_renorm_keeps_data_norm_and_is_identity_at_lambda_zero():
    torch.manual_seed(0)
    x0, x_self = torch.randn(5, 3, 4, 4), 3 * torch.randn(5, 3, 4, 4)
    lam = torch.tensor([0.0, 0.5, 2.0, 10.0, 100.0])
    y = selfe.energy_renorm(x0, x_self, lam)
    assert torch.allclose(rows(y).norm(dim=1), rows(x0).norm(dim=1), rtol=1e-5)
    assert torch.allclose(y[0], x0[0], atol=1e-6)
    mix = x0[2] + 2.0 * x_self[2]  # the direction is that of x0 + lambda x_self
    assert torch.allclose(y[2] / y[2].norm(), mix / mix.norm(), atol=1e-6)


@pytest.mark.parametrize("fm,p_equal", [(True, 0.5), (False, 1.0)])
def test_loss_on_s_equal_t_rows_is_the_velocity_flow_matching_loss(fm, p_equal):
    torch.manual_seed(1)
    net = Recorder(LinearNet())
    x0 = torch.randn(16, 3, 8, 8)
    loss, _ = loss_with(net, x0, one(torch.randn(16)), one(torch.zeros(16)), fm=fm,
                        tau=1.0, p_equal=p_equal, p_null=0.0)
    (call,) = net.calls
    t = call["t"]
    eps = (call["x"] - selfe.bcast(1 - t, x0) * x0) / selfe.bcast(t, x0)  # the noise, from x_t
    v = eps - x0  # Eq. 2
    assert torch.allclose(loss, (rows(call["V"]) - rows(v)).pow(2).mean(1).mean(), rtol=1e-4)
    assert torch.equal(call["s"], t)


@pytest.mark.parametrize("renorm", [True, False])
def test_the_loss_is_eqs_14_to_21_by_hand(renorm):
    """With G = c whatever the input, every pass is known: x0_hat = G(cond), G_c = G(cond),
    G_u = G(null), and the loss can be written out from the paper's equations."""
    torch.manual_seed(2)
    net = Recorder(ConstantG())
    B, x0 = 8, torch.randn(8, 1, 2, 2)
    cond, null = torch.randn(B), torch.zeros(B)
    loss, stats = loss_with(net, x0, one(cond), one(null), tau=1.0, p_null=0.0,
                            renorm=renorm)
    t, s = net.calls[0]["t"], net.calls[0]["s"]
    m = 4
    assert (s[:m] < t[:m]).all() and torch.equal(s[m:], t[m:])  # half the rows jump
    x0_hat = const_G(cond, x0)
    x_self = x0_hat - (const_G(null, x0) - const_G(cond, x0))  # Eq. 14
    lam = t / (1 - t) - s / (1 - s)  # Eq. 17, 0 on the rows with s = t
    y = x0 + lam.view(-1, 1, 1, 1) * x_self
    if renorm:  # Eq. 19
        target = y / rows(y).norm(dim=1).view(-1, 1, 1, 1) * rows(x0).norm(dim=1).view(-1, 1, 1, 1)
    else:  # Eq. 18
        target = y / (1 + lam).view(-1, 1, 1, 1)
    per_row = rows(x0_hat - target).pow(2).mean(1) / t**2  # Eqs. 20-21
    if not renorm:
        per_row = per_row * (1 + lam)  # Eq. 16
    assert torch.allclose(loss, per_row.mean(), rtol=1e-5)


@pytest.mark.parametrize("k", [None, 0.3, 0.0])  # None: the paper's 0.9 when not given
def test_the_fake_score_term_mixes_with_k_and_adds_its_own_loss(k):
    """The appendix's mix; at k 0 without the empty prompt's pass, which it does not need."""
    torch.manual_seed(3)
    net = Recorder(ConstantG())
    B, x0 = 8, torch.randn(8, 1, 2, 2)
    cond, null, fake = torch.randn(B), torch.zeros(B), torch.randn(B)
    given = {} if k is None else {"k": k}
    loss, stats = loss_with(net, x0, one(cond), one(null), one(fake), one(null - 1),
                            tau=1.0, p_null=0.0, renorm=False, **given)
    t, s, m = net.calls[0]["t"], net.calls[0]["s"], B // 2
    x0_hat, G = const_G(cond, x0), lambda c: const_G(c, x0)  # noqa: E731
    w = 0.1 if k is None else 1 - k  # the fake-score correction's share
    delta = (1 - w) * (G(null) - G(cond)) + w * (G(fake) - G(cond))  # appendix
    lam = (t / (1 - t) - s / (1 - s)).view(-1, 1, 1, 1)
    target = (x0 + lam * (x0_hat - delta)) / (1 + lam)
    data_term = (rows(x0_hat - target).pow(2).mean(1) / t**2 * (1 + lam.flatten())).mean()
    aux = rows(G(fake) - x0_hat).pow(2).mean(1)[:m] / s[:m] ** 2  # its own loss, weight 1/s^2
    assert torch.allclose(loss, data_term + aux.sum() / B, rtol=1e-5)
    assert torch.allclose(stats["aux"], aux.sum() / B)
    passes = [B, m, m, m] if k != 0 else [B, m, m]  # x0_hat; G_c, G_u, G_fake; G_u at k > 0 only
    assert [c["n"] for c in net.calls] == passes


def test_fm_baseline_never_runs_the_extra_passes():
    net = Recorder(LinearNet())
    _, stats = loss_with(net, torch.randn(32, 3, 4, 4), one(torch.randn(32)),
                         one(torch.zeros(32)), one(torch.ones(32)), one(-torch.ones(32)),
                         fm=True, tau=1.0, p_equal=0.0, p_null=0.0)
    assert [c["n"] for c in net.calls] == [32] and stats["frac_self"] == 0


@pytest.mark.parametrize("p_null", [0.0, 0.5])
def test_selfe_judges_a_fixed_count_of_s_below_t_rows_only(p_null):
    torch.manual_seed(2)
    net = Recorder(LinearNet())
    B, trials = 64, 100
    m = round(0.5 * B)  # s < t on half the rows (p_equal = 0.5), as the paper
    n_null = 0
    for _ in range(trials):
        net.calls.clear()
        loss, stats = loss_with(net, torch.randn(B, 3, 4, 4), one(torch.randn(B)),
                                one(torch.zeros(B)), tau=1.0, p_equal=0.5, p_null=p_null,
                                null_any_s=False)
        main, judged_c, judged_u = net.calls
        is_self, is_null = main["s"] < main["t"], main["c"] == 0
        assert judged_c["n"] == judged_u["n"] == m  # a fixed count of rows
        assert is_self[:m].all() and not is_self[m:].any()  # none of them wasted (lambda > 0)
        assert not is_null[:m].any()  # null_any_s=False: the empty prompt on s = t rows only
        assert (judged_u["c"] == 0).all() and torch.equal(judged_c["c"], main["c"][:m])
        for call in (judged_c, judged_u):  # the judges are plain FM passes at (s, s)
            assert torch.equal(call["t"], call["s"]) and torch.equal(call["s"], main["s"][:m])
        assert stats["frac_self"] == m / B and torch.isfinite(loss)
        n_null += int(is_null.sum())
    assert abs(n_null / (trials * B) - p_null) < 0.02  # the empty prompt keeps its overall rate


def test_evaluation_pass_conditional_on_eval_net_unconditional_on_online_net():
    """The paper (appendix): the conditional judge uses the EMA weights, the unconditional one
    the online weights."""
    online, ema = Recorder(LinearNet()), Recorder(LinearNet())
    x0, cond, null = torch.randn(8, 3, 4, 4), torch.randn(8), torch.zeros(8)
    loss_with(online, x0, one(cond), one(null), tau=1.0, p_equal=0.0, p_null=0.0,
              eval_net=ema)
    (c,) = ema.calls
    assert c["n"] == 8 and torch.equal(c["c"], cond) and not c["grad"]
    main, u = online.calls
    assert main["grad"] and torch.equal(u["c"], null) and not u["grad"]
    assert torch.equal(u["t"], u["s"])


@pytest.mark.parametrize("null_any_s", [None, False, True])
def test_null_prompt_rows_and_their_times_and_fake_prompts(null_any_s):
    """The empty prompt on any row at the rate p_null (default, chosen by measurement), or only on
    rows with s = t; a row without its prompt gets the empty prompt's fake prompt too."""
    torch.manual_seed(4)
    net, B, n_null_self, n_null = Recorder(LinearNet()), 64, 0, 0
    option = {} if null_any_s is None else dict(null_any_s=null_any_s)
    cond = torch.arange(1.0, B + 1)  # row i's prompt is i + 1, its fake prompt -(i + 1)
    for _ in range(50):
        net.calls.clear()
        loss_with(net, torch.randn(B, 3, 4, 4), one(cond), one(torch.zeros(B)), one(-cond),
                  one(torch.full((B,), 1000.0)), tau=1.0, p_null=0.3, **option)
        main, fake_pass = net.calls[0], net.calls[-1]
        is_null = main["c"] == 0
        m = fake_pass["n"]
        assert torch.equal(fake_pass["c"], torch.where(is_null[:m], 1000.0, -cond[:m]))
        n_null_self += int((is_null & (main["s"] < main["t"])).sum())
        n_null += int(is_null.sum())
    assert abs(n_null / (50 * B) - 0.3) < 0.03
    assert (n_null_self > 0) == (null_any_s is not False)


def test_gradients_flow_only_through_x0_hat_and_the_fake_pass():
    torch.manual_seed(3)
    net = Recorder(LinearNet())
    loss_with(net, torch.randn(64, 3, 4, 4), one(torch.randn(64)), one(torch.zeros(64)),
              one(torch.ones(64)), one(-torch.ones(64)), tau=1.0, p_equal=0.0, p_null=0.0)
    # the pass with gradient, the two no-grad judges, the fake-score pass (its own loss)
    assert [c["grad"] for c in net.calls] == [True, False, False, True]


def test_under_bf16_autocast_the_judges_run_in_float32():
    """bf16 scrambles G_u - G_c's direction (results/README.md, 2026-12-04): the two no-grad judge
    passes run with autocast off, the passes with gradient under it."""
    net = Recorder(LinearNet())
    with torch.autocast("cpu", torch.bfloat16):
        loss_with(net, torch.randn(8, 3, 4, 4), one(torch.randn(8)), one(torch.zeros(8)),
                  one(torch.ones(8)), one(-torch.ones(8)), tau=1.0, p_equal=0.0, p_null=0.0)
    assert [(c["grad"], c["autocast"]) for c in net.calls] == [(True, True), (False, False),
                                                               (False, False), (True, True)]


def test_time_pairs():
    torch.manual_seed(5)
    t, s = selfe.sample_times(20000, 1.0, 10000, 1.0)
    assert torch.all(s <= t) and torch.all((t > 0) & (t < 1)) and torch.all(s > 0)
    assert torch.all(s[:10000] < t[:10000]) and torch.equal(s[10000:], t[10000:])
    t0, s0 = selfe.sample_times(1000, 0.0, 1000, 1.0)
    assert torch.equal(t0, s0)  # before the ramp there are no jumps
    t5, s5 = selfe.sample_times(20000, 0.5, 20000, 1.0)
    assert torch.all(s5 >= 0.5 * t5 - 1e-6)  # s ~ U((1 - tau) t, t)
    u = (s5 / t5 - 0.5) / 0.5  # uniform on (0, 1) where t is not clamped
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    z = torch.logit(t)  # logit-normal t (shift 1)
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03
    assert torch.allclose(selfe.shift_time(torch.tensor([0.0, 0.5, 1.0]), 3.0),
                          torch.tensor([0.0, 0.75, 1.0]))


# -------------------------------------------------------------------------------------------------
# The sampler


def test_eta_zero_is_the_euler_step_and_last_step_returns_x0_hat():
    net = LinearNet()
    x1, cond = torch.randn(4, 3, 4, 4), one(torch.randn(4))
    out = sample_with(net, x1, cond, steps=2, eta=0.0)
    ones = torch.ones(4)
    g1 = net(x1, ones, 0.5 * ones, cond)
    x_half = x1 + (0.5 - 1.0) * g1  # Eq. 22: x_t' = x_t + (t' - t) V
    g2 = net(x_half, 0.5 * ones, 0 * ones, cond)
    assert torch.allclose(out, x_half - 0.5 * g2, atol=1e-5)  # last step: x0_hat = x_t - t V
    assert torch.allclose(sample_with(net, x1, cond, steps=1), x1 - net(x1, ones, 0 * ones, cond),
                          atol=1e-6)
    with pytest.raises(ValueError, match="at least 1"):
        sample_with(net, x1, cond, steps=0)


def test_eta_zero_draws_no_noise_and_is_euler_at_every_step(monkeypatch):
    """Eq. 22 at 3 steps: x_t' = x_t + (t' - t) V on the grid 1, 2/3, 1/3, 0; no noise drawn."""
    net, cond = LinearNet(), one(torch.randn(4))
    x = x1 = torch.randn(4, 3, 8, 8)
    for t, t_next in ((1, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0)):
        x = x + (t_next - t) * net(x, torch.full((4,), t), torch.full((4,), t_next), cond)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: pytest.fail("eta = 0 drew noise"))
    out = sample_with(net, x1, cond, steps=3, eta=0.0, generator=torch.Generator())
    assert torch.allclose(out, x, atol=1e-5)


class Still(nn.Module):
    """V = 0: every x0_hat is x_t itself, so a step only rescales x and adds its fresh noise."""

    def forward(self, x, t, s, cond):
        return torch.zeros_like(x)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_eta_one_adds_the_ddpm_posteriors_noise_on_the_shifted_grid(shift):
    """At eta 1 a step from t to t' draws the std of q(x_t' | x_t, x0), derived here from the
    forward process: x_t = a x_t' + b z with a = alpha_t / alpha_t', b^2 = sigma_t^2 - a^2
    sigma_t'^2; conditioning gives variance b^2 sigma_t'^2 / sigma_t^2. The grid: 1 -> 0 in
    equal steps, shifted as u -> shift u / (1 + (shift - 1) u) (shift 3: 1, 6/7, 3/5, 0)."""
    grid = [1.0, 6 / 7, 3 / 5, 0.0] if shift == 3.0 else [1.0, 2 / 3, 1 / 3, 0.0]
    net, cond = Recorder(Still()), one(torch.zeros(20000))
    out = sample_with(net, torch.zeros(20000, 1, 1, 1), cond, steps=3, eta=1.0, shift=shift,
                      generator=torch.Generator().manual_seed(0))
    assert [round(c["t"][0].item(), 6) for c in net.calls] == [round(g, 6) for g in grid[:3]]

    def std(t, t2):  # alpha = 1 - t, sigma = t
        a = (1 - t) / (1 - t2)
        return math.sqrt((t**2 - a**2 * t2**2) * t2**2 / t**2)
    # From x = 0 with V = 0: x_{t'} = (alpha_t' + sqrt(sigma_t'^2 - c^2)) x_t + c z, and the last
    # step returns x itself; so the output's variance follows from the two draws' c alone.
    c1, c2 = std(grid[0], grid[1]), std(grid[1], grid[2])
    carry = (1 - grid[2]) + math.sqrt(grid[2] ** 2 - c2**2)
    assert abs(out.var().item() / ((carry * c1) ** 2 + c2**2) - 1) < 0.03  # 20000 draws: 1 %


def test_s_k_options():
    net = Recorder(LinearNet())
    sample_with(net, torch.randn(2, 3, 4, 4), one(torch.randn(2)), steps=4, s_k=1.0)
    assert all(torch.equal(c["s"], c["t"]) for c in net.calls)
    net.calls.clear()
    sample_with(net, torch.randn(2, 3, 4, 4), one(torch.randn(2)), steps=1, s_k=0.5)
    assert torch.allclose(net.calls[0]["s"], torch.full((2,), 0.5))


@pytest.mark.parametrize("uncond_at_t", [None, False, True])
def test_guidance_asks_the_unconditional_branch_at_the_chosen_times(uncond_at_t):
    """Default (chosen by measurement): the empty prompt at (t, t); the prompt jumps to s_k."""
    net = Recorder(LinearNet())
    option = {} if uncond_at_t is None else dict(uncond_at_t=uncond_at_t)
    sample_with(net, torch.randn(3, 1, 2, 2), one(torch.ones(3)), one(torch.zeros(3)), steps=2,
                cfg=5.0, **option)
    assert len(net.calls) == 2
    for call in net.calls:  # [conditional; unconditional] in one forward per step
        (t_c, t_u), (s_c, s_u) = call["t"].chunk(2), call["s"].chunk(2)
        assert torch.equal(t_c, t_u) and (s_c < t_c).all()  # the prompt jumps (s_k = t_{k+1})
        assert torch.equal(s_u, s_c if uncond_at_t is False else t_u)
        assert torch.equal(call["c"], torch.tensor([1.0] * 3 + [0.0] * 3))


def test_energy_preserving_cfg_has_the_conditional_norm():
    net = LinearNet()
    x, t, s = torch.randn(6, 3, 4, 4), torch.rand(6), torch.zeros(6)
    cond, null = one(torch.randn(6)), one(torch.zeros(6))
    g = selfe.guided_velocity(net, x, t, s, cond, null, cfg=5.0, uncond_at_t=True)
    V_c, V_u = net(x, t, s, cond), net(x, t, t, null)  # the empty prompt at (t, t)
    assert torch.allclose(rows(g).norm(dim=1), rows(V_c).norm(dim=1), rtol=1e-5)
    plain = V_u + 5.0 * (V_c - V_u)
    assert torch.allclose(rows(g) / rows(g).norm(dim=1, keepdim=True),
                          rows(plain) / rows(plain).norm(dim=1, keepdim=True), atol=1e-5)


def test_any_step_count_works_and_at_eta_one_the_seed_fixes_the_noise():
    net = LinearNet()
    noise, cond, null = torch.randn(2, 3, 4, 4), one(torch.randn(2)), one(torch.zeros(2))

    def draw(steps, seed, eta=1.0):
        gen = torch.Generator().manual_seed(seed)
        return sample_with(net, noise, cond, null, steps=steps, eta=eta, generator=gen)
    for steps in range(1, 51):
        out = draw(steps, 0)
        assert out.shape == noise.shape and torch.isfinite(out).all()
    assert torch.equal(draw(7, 1), draw(7, 1)) and not torch.allclose(draw(7, 1), draw(7, 2))
    assert torch.equal(draw(7, 1, eta=0.0), draw(7, 2, eta=0.0))  # Euler: no noise to seed


# -------------------------------------------------------------------------------------------------
# The model


def text_cond(B, L, D=384, valid=(5, 3)):
    tokens = torch.randn(B, L, D)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate(valid[:B]):
        mask[i, :n] = True
    return tokens, mask, torch.randn(B, D)


@pytest.mark.gpu_path
def test_attention_never_lets_torch_choose_cudnn(monkeypatch):
    """torch 2.11 prefers cuDNN attention on Hopper, whose backward with a mask gives NaN gradients
    at some sequence lengths: the DiT allows the other kernels only, wherever it runs."""
    allowed, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        allowed.append((torch.backends.cuda.cudnn_sdp_enabled(),
                        torch.backends.cuda.mem_efficient_sdp_enabled(),
                        torch.backends.cuda.flash_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    net = selfe.DiT(res=16, patch=4, text_dim=384, **selfe.MODELS["tiny"])
    net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.zeros(2), text_cond(2, 8))
    assert allowed == [(False, True, True)] * 4  # every block: cuDNN off, the others allowed
    assert torch.backends.cuda.cudnn_sdp_enabled()  # only while the DiT runs


def test_dit_shapes_and_zero_init():
    net = selfe.DiT(res=16, patch=4, dim=32, depth=2, heads=2)
    x = torch.randn(2, 3, 16, 16)
    V = net(x, torch.rand(2), torch.rand(2) * 0.1, text_cond(2, 8))
    assert V.shape == x.shape and torch.all(V == 0)  # zero-initialised output layer


def test_analytic_flops_match_pytorchs_counter(monkeypatch):
    """MFU rests on DiT.flops; PyTorch's counter sees every matmul, conv and attention."""
    from torch.nn.attention import SDPBackend
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setattr(selfe, "ATTENTION_KERNELS", [SDPBackend.MATH])  # the counter sees math
    net = selfe.DiT(res=32, patch=4, dim=64, depth=3, heads=4, text_dim=48)
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(2, 3, 32, 32), torch.rand(2), torch.rand(2), text_cond(2, 12, D=48))
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    # left out, per image: the time, gap and pooled-text MLPs and the final layer's adaLN
    rest = sum(counts[f"DiT.{m}"] for m in ("t_embed", "gap_embed", "pool_embed", "final.ada"))
    assert 2 * net.flops(text_len=12) == counts["Global"] - rest  # 2 images: exactly the rest
    assert rest / counts["Global"] < 0.01


def test_adaln_zero_block_is_the_identity():
    blk = selfe.DiT(res=16, patch=4, dim=32, depth=1, heads=2).blocks[0]
    x, c = torch.randn(2, 10, 32), torch.randn(2, 32)
    assert torch.equal(blk(x, c, torch.ones(2, 1, 1, 10, dtype=torch.bool)), x)


def test_padding_tokens_change_nothing():
    net = trained_like(selfe.DiT(res=16, patch=4, dim=32, depth=2, heads=2)).eval()
    x, t, s = torch.randn(2, 3, 16, 16), torch.rand(2), torch.rand(2) * 0.1
    tokens, mask, pooled = text_cond(2, 8)
    V = net(x, t, s, (tokens, mask, pooled))
    junk = torch.where(mask[..., None], tokens, 100 * torch.randn_like(tokens))
    assert torch.allclose(net(x, t, s, (junk, mask, pooled)), V, atol=1e-5)
    longer = (torch.cat([tokens, torch.randn(2, 4, 384)], 1),
              torch.cat([mask, torch.zeros(2, 4, dtype=bool)], 1), pooled)
    assert torch.allclose(net(x, t, s, longer), V, atol=1e-5)
    changed = tokens.clone()
    changed[0, 0] = torch.randn(384)  # a real token does matter
    assert not torch.allclose(net(x, t, s, (changed, mask, pooled)), V, atol=1e-5)


def test_gap_embedding_sees_t_minus_s():
    net = trained_like(selfe.DiT(res=16, patch=4, dim=32, depth=1, heads=2))
    seen = []
    net.gap_embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    t, s = torch.tensor([0.9, 0.4]), torch.tensor([0.3, 0.4])
    net(torch.randn(2, 3, 16, 16), t, s, text_cond(2, 8))
    assert torch.allclose(seen[0], t - s)
    fresh = selfe.DiT(res=16, patch=4, dim=32, depth=1, heads=2)  # the gap MLP starts at zero
    e1 = fresh.gap_embed(torch.tensor([0.0])) - fresh.gap_embed(torch.tensor([0.7]))
    assert torch.all(e1 == 0)


def test_pos_embed_is_fixed_2d_sincos():
    pos = selfe.pos_embed_2d(16, 4)
    assert pos.shape == (16, 16) and len(torch.unique(pos, dim=0)) == 16
    net = selfe.DiT(res=16, patch=4, dim=16, depth=1, heads=2)
    assert "pos" not in net.state_dict()  # a buffer, not learned


# -------------------------------------------------------------------------------------------------
# THE MECHANISM on toy.py's 2-D mixture: Self-E makes good 1- and 2-step samples; flow matching not.


def test_toy_scores_true_draws_as_right_and_the_class_mean_as_wrong():
    centres, gen = toy.modes("opposite"), torch.Generator().manual_seed(0)
    x, c = toy.draw_data(centres, 4000, gen)
    assert toy.accuracy(x, c, centres) > 0.98  # 3 std holds 98.9 % of a 2-D Gaussian
    assert abs(toy.energy_distance(x, c, centres)) < 0.02
    assert toy.accuracy(0 * x, c, centres) == 0  # the class mean, where FM's one step lands
    assert toy.energy_distance(0 * x, c, centres) > 1
    for layout in ("opposite", "adjacent", "radii", "unequal"):  # 8 distinct modes, two a class
        assert len(torch.unique(toy.modes(layout).round(decimals=3), dim=0)) == 8
    near, far = toy.modes("unequal")[:4], toy.modes("unequal")[4:]  # class k: modes k and k + 4
    assert torch.allclose(near.norm(dim=1), torch.tensor(1.5)) and torch.allclose(
        far.norm(dim=1), torch.tensor(3.5))
    assert torch.allclose(near / 1.5, -far / 3.5, atol=1e-6)  # opposite, not on one ray


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_mechanism_selfe_beats_flow_matching_at_one_and_two_steps(seed):
    centres = toy.modes("opposite")
    scores = {}
    for method in ("fm", "selfe"):
        ema = toy.train(method, centres, seed, iters=2000)
        for steps in (1, 2, 50):
            x, c = toy.draw_samples(ema, method, steps, cfg=1.0)
            scores[method, steps] = toy.accuracy(x, c, centres)
    print(seed, scores)
    assert scores["selfe", 1] > scores["fm", 1] + 0.4  # measured: 0.56 and 0.55 apart
    assert scores["selfe", 2] > scores["fm", 2] + 0.15  # 0.30 and 0.27
    assert min(scores["selfe", 50], scores["fm", 50]) > 0.95  # both learned the data


@pytest.mark.slow
def test_toy_prints_a_table_per_guidance_scale_and_refuses_bad_options(tmp_path):
    def toy_py(*args):
        return subprocess.run([sys.executable, "toy.py", "--iters", "2", "--out",
                               str(tmp_path / "toy.png"), *args], cwd=os.path.dirname(__file__),
                              capture_output=True, text=True, timeout=600)
    r = toy_py("--cfg", "2,7")
    tables = [line.split(":")[0] for line in r.stdout.splitlines() if "energy distance |" in line]
    assert r.returncode == 0 and tables == ["| cfg 2", "| cfg 7"], r.stdout + r.stderr
    assert (tmp_path / "toy.png").exists()
    for bad in ("5,x", "-1"):
        r = toy_py("--cfg", bad)
        assert r.returncode == 2 and "--cfg" in r.stderr.splitlines()[-1], r.stderr
    r = toy_py("--eta", "2")
    assert r.returncode == 2 and "--eta" in r.stderr.splitlines()[-1], r.stderr


# -------------------------------------------------------------------------------------------------
# Stub networks and helpers (tests/ uses them too). A condition is a tuple of batch-first
# tensors; here, one number per row.


class Recorder(nn.Module):
    """Wraps a net and records every call: batch size, whether the output has gradient, inputs."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, s, cond):
        out = self.net(x, t, s, cond)
        self.calls.append(dict(n=x.shape[0], grad=out.requires_grad, x=x.detach(), t=t, s=s,
                               c=cond[0], V=out.detach(),
                               autocast=torch.is_autocast_enabled(x.device.type)))
        return out


class LinearNet(nn.Module):
    """A small differentiable net for images: V = a * x + b * c + c' * (t - s)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.3))
        self.b = nn.Parameter(torch.tensor(0.2))
        self.c = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, s, cond):
        (c,) = cond
        return self.a * x + self.b * selfe.bcast(c, x) + self.c * selfe.bcast(t - s, x)


class ConstantG(nn.Module):
    """G(x, t, s, c) = c everywhere, whatever x: V = (x - c) / t. The evaluations are noise-free."""

    def forward(self, x, t, s, cond):
        return (x - selfe.bcast(cond[0], x)) / selfe.bcast(t, x)


def const_G(c, like):
    return selfe.bcast(c, like) * torch.ones_like(like)


def one(x):
    return (x,)


def rows(x):
    return x.flatten(1)


def loss_with(net, x0, cond, null, fake=None, null_fake=None, tau=1.0, eval_net=None, **recipe):
    """selfe.selfe_loss with a Recipe of the paper's settings, the fields given changed."""
    return selfe.selfe_loss(net, x0, cond, null, fake, null_fake, tau=tau,
                            recipe=selfe.Recipe(**recipe), eval_net=eval_net)


def sample_with(net, noise, cond, null=None, steps=4, shift=1.0, generator=None, **options):
    """selfe.sample with Self-E's Sampler, the options given changed."""
    sampler = dataclasses.replace(selfe.SAMPLERS["selfe"], **options)
    return selfe.sample(net, noise, cond, null, steps, shift, sampler, generator)


def trained_like(net, seed=6):
    """Add noise of std 0.05 to every weight, so that the zero-initialised layers (adaLN-Zero, the
    output) come alive: a model whose output depends on its inputs. torch's global seed is left
    as it was."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net
