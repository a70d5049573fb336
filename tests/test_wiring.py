"""The wiring between the command line and the method: each flag of train.py and sample.py reaches
selfe.py as its help says, the judge is the EMA, the EMA is the average its formula gives, and the
loss's gradient has the paper's stop-gradients. Spies stand in for selfe.selfe_loss and
selfe.sample and pass every call through; the expected values are written out here, not read
from the code under test."""
import dataclasses
import math
import sys

import pytest
import torch

import sample
import selfe
import train
from harness import checkpoints, draw, text_encoder
from conftest import SHORT, LinearNet, Recorder, export_model, loss_with, one, trained_like


STEPS = 4
RUN = [*SHORT, "--iters", str(STEPS), "--batch-size", "4", "--sample-every", "100", "--final-grid"]


def spied_run(out, argv):
    """train.main(argv) with spies -> (the loss's calls, the sampler's calls, the encoder's
    calls by step, the final checkpoint). A loss call records its keyword arguments and the
    online weights the step starts from."""
    losses, samples, encodes = [], [], []
    real_loss, real_sample = selfe.selfe_loss, selfe.sample
    real_encode = text_encoder.TextEncoder.encode

    def loss(net, x0, cond, null, fake=None, null_fake=None, **kwargs):
        if "eval_net" in kwargs:  # a training step's (the start-up memory estimate passes none)
            weights = {n: p.detach().clone() for n, p in net.named_parameters()}
            losses.append(dict(dataclasses.asdict(kwargs["recipe"]), tau=kwargs["tau"],
                               eval_net=kwargs["eval_net"], rows=len(x0), cond=cond, fake=fake,
                               weights=weights))
        return real_loss(net, x0, cond, null, fake, null_fake, **kwargs)

    def sampler(net, noise, cond, null, steps, shift, options, generator=None):
        samples.append(dict(steps=steps, shift=shift, **dataclasses.asdict(options)))
        return real_sample(net, noise, cond, null, steps, shift, options, generator)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selfe, "selfe_loss", loss)
        mp.setattr(selfe, "sample", sampler)
        mp.setattr(text_encoder.TextEncoder, "encode",
                   lambda self, c: encodes.append(len(losses)) or real_encode(self, c))
        train.main(["--out", str(out), *RUN, *argv])
    return losses, samples, encodes, checkpoints.read_checkpoint(str(out / "ckpt.pt"))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The cpu preset with the fake-score term on from the third of 4 steps (aux 0.5)."""
    return spied_run(tmp_path_factory.mktemp("default"), ["--no-final-grid", "--aux-start", "0.5"])


@pytest.fixture(scope="module")
def flagged_run(tmp_path_factory):
    """Flow matching with every flag of the loss away from its default, and the final grid."""
    return spied_run(tmp_path_factory.mktemp("flagged"), [
        "--method", "fm", "--k", "0.6", "--p-equal", "0.25", "--p-null", "0.2", "--shift", "2",
        "--no-renorm", "--no-null-any-s", "--no-ema-eval", "--tau-ramp", "0.5"])


LOSS_FLAGS = ("fm", "k", "p_equal", "p_null", "shift", "renorm", "null_any_s", "tau")


def test_each_flag_reaches_the_loss(default_run, flagged_run):
    (default, *_), (flagged, *_) = default_run, flagged_run
    # tau ramps over --tau-ramp of the 4 steps: 0.4 -> 1.6 steps, 0.5 -> 2 steps
    assert [tuple(c[f] for f in LOSS_FLAGS) for c in default] == [
        (False, 0.9, 0.5, 0.1, 1.0, True, True, tau) for tau in (0.0, 0.625, 1.0, 1.0)]
    assert [tuple(c[f] for f in LOSS_FLAGS) for c in flagged] == [
        (True, 0.6, 0.25, 0.2, 2.0, False, False, tau) for tau in (0.0, 0.5, 1.0, 1.0)]
    assert all(c["rows"] == 4 for c in default + flagged)


def test_the_conditional_judge_is_the_ema_and_none_under_no_ema_eval(default_run, flagged_run):
    (default, _, _, ckpt), (flagged, *_) = default_run, flagged_run
    judge = default[0]["eval_net"]
    assert judge is not None and all(c["eval_net"] is judge for c in default)
    state = judge.state_dict()  # after the run: the EMA weights saved, not the online ones
    assert all(torch.equal(state[n], ckpt["ema"][n]) for n in ckpt["ema"])
    assert not all(torch.equal(state[n], ckpt["model"][n]) for n in ckpt["model"])
    assert all(c["eval_net"] is None for c in flagged)


def test_the_fake_prompts_come_once_the_term_is_on_and_captions_are_encoded_before(default_run):
    """With aux 0.5 of 4 steps: the fake prompts in the last two steps, never the
    prompts themselves; every caption and fake prompt is encoded before the first step."""
    losses, _, encodes, _ = default_run
    assert [c["fake"] is None for c in losses] == [True, True, False, False]
    for c in losses[2:]:
        assert [f.shape for f in c["fake"]] == [x.shape for x in c["cond"]]
        assert (c["fake"][2] != c["cond"][2]).any(dim=1).all()  # each row's pooled vector
    assert encodes and set(encodes) == {0}


def test_the_ema_is_the_closed_form_average_of_the_online_weights(default_run):
    """EMA_K = d_0...d_{K-1} W_0 + sum_k (1 - d_k) d_{k+1}...d_{K-1} W_{k+1}, with the warm-up
    d_k = min(0.9999, (1 + k) / (10 + k)) and W_k the online weights after k steps."""
    losses, _, _, ckpt = default_run
    W = [c["weights"] for c in losses] + [ckpt["model"]]  # W_0 ... W_K
    d = [min(0.9999, (1 + k) / (10 + k)) for k in range(STEPS)]
    for name in W[0]:
        want = math.prod(d) * W[0][name].double()
        for k in range(STEPS):
            want += (1 - d[k]) * math.prod(d[k + 1:]) * W[k + 1][name].double()
        assert torch.allclose(ckpt["ema"][name].double(), want, rtol=0, atol=1e-6), name


def test_a_flow_matching_run_draws_its_grid_at_s_equal_t_with_its_shift(flagged_run):
    _, samples, _, _ = flagged_run
    assert sorted(c["steps"] for c in samples) == [2, 4, 8, 50]  # the final grid
    assert all((c["s_k"], c["shift"], c["cfg"]) == (1.0, 2.0, 5.0) for c in samples)


# -------------------------------------------------------------------------------------------------
# The loss's gradient, written out by hand


@pytest.mark.parametrize("seed", [8, 9])
@pytest.mark.parametrize("renorm", [True, False])
def test_the_gradient_is_that_of_the_loss_written_by_hand(renorm, seed):
    """Autograd of the paper's loss with its stop-gradients: x0_hat's copy in x_self (hence in the
    re-noised x_s the judges see, recorded here as given) and in the fake-score target, and G_fake
    in the mix, carry no gradient; the judges none at all. The rows: half jump (p_equal 0.5)."""
    torch.manual_seed(seed)
    net = Recorder(LinearNet())
    B, m, x0, k = 16, 8, torch.randn(16, 3, 4, 4), 0.7
    loss, _ = loss_with(net, x0, one(torch.randn(B)), one(torch.zeros(B)),
                        one(torch.randn(B)), one(torch.full((B,), -1.0)), tau=1.0,
                        p_null=0.2, renorm=renorm, k=k)
    got = torch.autograd.grad(loss, list(net.parameters()))

    def G(call):  # Eq. 6 again from the call's recorded inputs, with gradient
        t = call["t"].view(-1, 1, 1, 1)
        return call["x"] - t * net.net(call["x"], call["t"], call["s"], (call["c"],))

    (main, fake_pass), judges = ([c for c in net.calls if c["grad"] == g] for g in (True, False))
    (judge_u,), (judge_c,) = ([c for c in judges if (c["c"] == 0).all() == empty]
                              for empty in (True, False))  # the empty prompt's, the prompts'
    t, s = main["t"], main["s"]
    x0_hat, G_fake = G(main), G(fake_pass)
    with torch.no_grad():
        G_c, G_u = G(judge_c), G(judge_u)
    delta = k * (G_u - G_c) + (1 - k) * (G_fake.detach() - G_c)
    x_self = x0_hat[:m].detach() - delta
    lam = t / (1 - t) - s / (1 - s)
    y = x0[:m] + lam[:m].view(-1, 1, 1, 1) * x_self
    norm = lambda a: a.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # noqa: E731
    y = y * norm(x0[:m]) / norm(y) if renorm else y / (1 + lam[:m]).view(-1, 1, 1, 1)
    jumped = (s[:m] < t[:m]).view(-1, 1, 1, 1)  # a row with s = t learns the data alone
    target = torch.cat([torch.where(jumped, y, x0[:m]), x0[m:]])
    per_row = (x0_hat - target).pow(2).flatten(1).mean(1) / t**2 * (1 if renorm else 1 + lam)
    # the fake-score term weighs 1/s^2 with s at least 0.01 (ours), on the rows that jumped
    aux = (G_fake - x0_hat[:m].detach()).pow(2).flatten(1).mean(1) / s[:m].clamp(min=0.01) ** 2
    hand = per_row.mean() + (aux * jumped.flatten()).sum() / B
    want = torch.autograd.grad(hand, list(net.parameters()))
    assert torch.allclose(loss, hand, rtol=1e-5)
    assert all(torch.allclose(g, w, rtol=1e-4, atol=1e-7) for g, w in zip(got, want))


# -------------------------------------------------------------------------------------------------
# Sampling: draw.generate and sample.py pass each flag on


def spy_sampler(monkeypatch):
    calls, real = [], selfe.sample

    def sampler(net, noise, cond, null, steps, shift, options, generator=None):
        calls.append(dict(steps=steps, shift=shift, **dataclasses.asdict(options)))
        return real(net, noise, cond, null, steps, shift, options, generator)
    monkeypatch.setattr(selfe, "sample", sampler)
    return calls


SELFE = dict(cfg=5.0, eta=0.0, s_k="next", uncond_at_t=True)  # the paper's omega 5, Eq. 22


def test_generate_passes_its_sampler_and_shift_on_and_has_no_default(monkeypatch):
    calls = spy_sampler(monkeypatch)
    net = trained_like(selfe.DiT(res=16, patch=4, dim=32, depth=1, heads=2))
    text = lambda prompts: (torch.randn(len(prompts), 4, 384),  # noqa: E731
                            torch.ones(len(prompts), 4, dtype=torch.bool),
                            torch.randn(len(prompts), 384))
    draw.generate(net, text, ["a", "b"], [3, 1], 5, 1.0, selfe.SAMPLERS["selfe"])
    draw.generate(net, text, ["a"], [2], 5, 3.0, selfe.Sampler(cfg=2.0, eta=1.0, s_k=0.5,
                                                                      uncond_at_t=False))
    assert calls == [dict(SELFE, steps=3, shift=1.0), dict(SELFE, steps=1, shift=1.0),
                     dict(steps=2, shift=3.0, cfg=2.0, eta=1.0, s_k=0.5, uncond_at_t=False)]
    with pytest.raises(TypeError):  # told the sampler, or nothing: never another method's
        draw.generate(net, text, ["a"], [2], 5, 1.0)


@pytest.mark.parametrize("method,flags,expected", [
    ("selfe", [], SELFE),
    ("selfe", ["--cfg", "3", "--eta", "1", "--s-k", "0.5", "--no-uncond-at-t"],
     dict(cfg=3.0, eta=1.0, s_k=0.5, uncond_at_t=False)),
    ("fm", [], dict(SELFE, s_k=1.0)),  # flow matching at s = t, the only pair it learned
    ("fm", ["--s-k", "next", "--uncond-at-t"], SELFE),
])
def test_sample_py_passes_each_flag_and_the_runs_method_and_shift(method, flags, expected,
                                                                   tmp_path, monkeypatch):
    export = export_model(tmp_path / "model", method=method, shift=2.0)
    calls = spy_sampler(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", export, "--prompt", "a red circle",
                                      "--steps", "2", "--out", str(tmp_path / "s"), *flags])
    sample.main()
    assert 2 in [c["steps"] for c in calls]  # (after an untimed warm-up)
    assert all({k: v for k, v in c.items() if k != "steps"} == dict(expected, shift=2.0)
               for c in calls)
