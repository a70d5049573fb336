"""The parts of the GPU path a CPU can check: torch.compile (activation checkpointing under it, a
stop signal while it builds), bf16 autocast, the memory estimate, DataLoader workers, the
half-precision encoder copy, gpu_check.sh's --out. Marked gpu_path: CI runs them on torch 2.11
too."""
import copy
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import selfe
import train
from harness import checkpoints, control, data, shapes, text_encoder
from conftest import ROOT, HUNG, loss_with


@pytest.mark.slow
@pytest.mark.gpu_path
def test_compiled_run_has_no_graph_break_and_compiles_only_when_a_phase_begins(tmp_path,
                                                                               monkeypatch):
    """torch.compile as the GPU presets use it (fullgraph: a graph break is an error; static
    shapes), with bf16 autocast, over a whole short run: tau ramping 0 -> 1, a Ctrl-C that saves,
    --resume, the fake-score term switching on, grids and evaluations in between. New graphs may
    come at the first step of the run, of the resumed run and of the fake-score term only, at most
    one per batch size and grad mode the step feeds a network: all B rows (grad), the m judged rows
    (no grad; online and EMA weights) and the m fake-prompt rows (grad)."""
    from torch._dynamo.utils import counters
    torch.compiler.reset()
    counters.clear()  # reset() leaves them: the counts below are this test's alone
    graphs = []  # graphs compiled so far, read as each step begins
    loss_fn = selfe.selfe_loss

    def counting_loss(*args, **kwargs):
        if len(args[1]) != 8:  # the start-up memory estimate's (2 and 4 rows, not compiled)
            return loss_fn(*args, **kwargs)
        graphs.append(counters["stats"]["unique_graphs"])
        if len(graphs) == 7:  # Ctrl-C during step 6: the run saves after it and stops
            os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(selfe, "selfe_loss", counting_loss)
    run = ["--out", str(tmp_path), "--preset", "cpu", "--compile", "--bf16", "--iters", "12",
           "--batch-size", "8", "--res", "16", "--tau-ramp", "0.4", "--aux-start", "0.75",
           "--log-every", "2", "--sample-every", "4", "--eval-every", "4", "--final-eval", "off"]
    train.main(run)  # steps 0-6, tau reaches 1 at step 5
    assert len(graphs) == 7 and checkpoints.read_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 7
    train.main(run + ["--resume"])  # steps 7-11, the fake-score term from step 9
    graphs.append(counters["stats"]["unique_graphs"])
    new_at = [step for step in range(12) if graphs[step + 1] > graphs[step]]
    assert new_at[0] == 0 and set(new_at) <= {0, 7, 9} and 9 in new_at, graphs
    assert graphs[-1] <= 4 and graphs[-1] - graphs[9] == 1, graphs  # the fake pass: one graph


@pytest.mark.slow
@pytest.mark.gpu_path
def test_activation_checkpointing_compiles_whole_and_gives_the_eager_gradients():
    """The gpu-long preset: --act-ckpt under torch.compile(fullgraph=True) with bf16 autocast; a
    graph break there would stop the run at its first step."""
    torch.compiler.reset()
    torch.manual_seed(0)
    net = selfe.DiT(res=8, patch=4, dim=32, depth=2, heads=2, text_dim=8, act_ckpt=True)
    for p in net.parameters():  # every weight in play (the zero-initialised output layer too)
        nn.init.normal_(p, std=0.2)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.9, 0.4])
    cond = (torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool), torch.randn(2, 8))

    def gradient(model):
        net.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            model(x, t, t / 2, cond).float().pow(2).mean().backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    eager = gradient(net)
    compiled = gradient(torch.compile(net, fullgraph=True, dynamic=False))
    assert F.cosine_similarity(eager, compiled, dim=0) > 0.99


COMPILING = """
import os, sys, time
import torch._inductor.compile_fx as inductor
from torch._inductor.async_compile import AsyncCompile
import train
from harness import cli
compile_fx, mark = inductor.compile_fx, sys.argv[1]

def compile_in_workers(*args, **kwargs):  # as on a GPU: kernels built in the pool's processes
    pool = AsyncCompile.process_pool()  # its first use starts the pool's processes
    pool.submit(time.sleep, 0).result()
    if not os.path.exists(mark):
        open(mark, "w").close()  # the test signals now
    pool.submit(time.sleep, 3).result()  # a kernel being built as the signal comes
    return compile_fx(*args, **kwargs)

inductor.compile_fx = compile_in_workers
sys.argv = ["train.py", *sys.argv[2:]]
cli.run_cli(train.main)
"""


@pytest.mark.slow
@pytest.mark.gpu_path
def test_sigterm_to_the_group_while_the_first_graph_compiles_saves_the_run(tmp_path):
    """timeout, torchrun and kill -TERM -PGID signal the whole process group, the processes that
    build torch.compile's kernels included (on a GPU, Triton's; here the same pool, made to build
    as the first graph compiles): the step being compiled ends, the run saves it and stops."""
    out, mark = str(tmp_path / "run"), str(tmp_path / "compiling")
    with open(out + ".stdout", "w") as stdout, open(out + ".stderr", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", COMPILING, mark, "--out", out, "--preset", "cpu", "--compile",
             "--iters", "3", "--batch-size", "4", "--res", "16", "--final-eval", "off",
             "--no-final-grid"], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=stdout, stderr=stderr, start_new_session=True)  # as timeout starts it
    t0 = time.time()
    while not os.path.exists(mark):
        assert proc.poll() is None and time.time() - t0 < HUNG, "the compile never began"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=HUNG)
    printed, errors = (open(out + part).read() for part in (".stdout", ".stderr"))
    assert proc.returncode == 0 and "Traceback" not in errors, errors[-3000:]
    assert "interrupted at step 1: saved" in printed, printed[-2000:]
    assert checkpoints.read_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 1


@pytest.mark.gpu_path
def test_bf16_autocast_loss_and_gradients_are_finite_and_close_to_fp32():
    torch.manual_seed(0)
    net = selfe.DiT(res=32, patch=4, text_dim=384, **selfe.MODELS["tiny"])
    for p in net.parameters():  # wake the zero-initialised layers: the output matters
        if not p.abs().sum():
            nn.init.normal_(p, std=0.3)
    x0 = shapes.to_model(shapes.TrainingData(32).batch(16, np.random.default_rng(0))[0])
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(16, 16, dtype=torch.bool)
    cond = (torch.randn(16, 16, 384, generator=g), mask, torch.randn(16, 384, generator=g))
    null = (torch.zeros(16, 16, 384), mask, torch.zeros(16, 384))

    def loss_and_grad(bf16):  # the same batch, times and noise; the fake-score term on
        net.zero_grad()
        torch.manual_seed(5)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            V = net(x0[:1], torch.rand(1), torch.rand(1) * 0, tuple(c[:1] for c in cond))
            assert V.dtype == (torch.bfloat16 if bf16 else torch.float32)  # autocast is on
            torch.manual_seed(5)
            loss, _ = loss_with(net, x0, cond, null, cond, null, tau=1.0)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])

    (l32, g32), (l16, g16) = loss_and_grad(False), loss_and_grad(True)
    assert l16.dtype == torch.float32 and torch.isfinite(l16) and torch.isfinite(g16).all()
    assert abs(l16 - l32) / l32 < 0.02 and F.cosine_similarity(g16, g32, dim=0) > 0.99


PEAK = """
import copy, sys, torch
import selfe, train
from harness import checkpoints, control
bf16 = sys.argv[1] == "bf16"
cfg = {**train.DEFAULTS, **train.PRESETS["cpu"], "patch": 2, "batch_size": 64, "bf16": bf16,
       "act_ckpt": bf16}
cond = lambda n: (torch.randn(n, 16, 384), torch.ones(n, 16, dtype=bool), torch.randn(n, 384))


def steps(B):  # two training steps on B rows (Adam's moments come with the first)
    x0, c, null = torch.randn(B, 3, 32, 32), cond(B), cond(B)
    net = checkpoints.build_model(cfg, 384)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), fused=True)
    for _ in range(2):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss, _ = selfe.selfe_loss(net, x0, c, null, c, null, tau=1.0, recipe=selfe.Recipe(),
                                       eval_net=ema)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        selfe.ema_update(ema, net, 0.9)


def status():  # bytes
    rows = (line.split(":") for line in open("/proc/self/status"))
    return {k: int(v.split()[0]) * 1024 for k, v in rows if k.startswith(("Rss", "VmHWM"))}


steps(2)  # one-time buffers the step needs are made before the baseline
base = status()["RssAnon"]
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again from here
steps(64)
end = status()  # library pages read in meanwhile only grow: the end's are taken off
peak = end["VmHWM"] - end["RssFile"] - end["RssShmem"] - base
est = control.memory_estimate(cfg, 384, 64)[True]
print(f"estimate {est / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB over {base / 1e6:.0f} MB, "
      f"{(end['RssFile'] + end['RssShmem']) / 1e6:.0f} MB of files: {est / peak}")
"""


@pytest.mark.slow
@pytest.mark.gpu_path
def test_the_memory_estimate_is_within_10_percent_of_the_measured_peak():
    """The start-up line's estimate (fake-score pass on, float32) against the peak resident memory
    of two real steps, measured in a process of its own where glibc hands every freed tensor back
    to the system (MALLOC_MMAP_THRESHOLD_), so that the peak is that of the live tensors, after the
    same steps at 2 rows (first-use code and buffers out of the measure). In float32 the kernels
    keep no temporaries of note; under bf16 a CPU without native bf16 keeps fewer than one with it
    (results/README.md), so bf16 is checked by its terms below, not by a CPU's peak."""
    r = subprocess.run([sys.executable, "-c", PEAK, "fp32"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
                                       "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert 0.9 <= float(r.stdout.split()[-1]) <= 1.1, r.stdout  # measured: 0.99


@pytest.mark.slow
@pytest.mark.gpu_path
@pytest.mark.parametrize("bf16", [False, True])  # bf16 with act_ckpt
def test_the_memory_estimate_is_the_sum_of_its_terms_measured_on_a_real_step(bf16, monkeypatch):
    """What the estimate decides, each term measured at the full batch of a real step: 5 float32
    copies of the weights (weights, gradients, Adam's moments, EMA: counted after an Adam step),
    the tensors autograd keeps (saved-tensor hooks around the step's forward, judged by the EMA,
    fake-score pass on) and, under act_ckpt, the block inputs the checkpoints hold plus one
    block's activations recomputed. Autograd decides these bytes, not a CPU's kernels."""
    cfg = {**train.DEFAULTS, **train.PRESETS["cpu"], "patch": 2, "bf16": bf16, "act_ckpt": bf16}
    B = 64
    torch.manual_seed(0)
    net = checkpoints.build_model(cfg, 384)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), fused=True)
    weights = {p.untyped_storage().data_ptr() for p in [*net.parameters(), *ema.parameters()]}
    cond = lambda n: (torch.randn(n, 16, 384), torch.ones(n, 16, dtype=bool), torch.randn(n, 384))
    held, checkpoint = [], torch.utils.checkpoint.checkpoint

    def spy(block, h, *args, **kwargs):  # the input each checkpointed block keeps
        held.append(h.nbytes)
        return checkpoint(block, h, *args, **kwargs)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    c = cond(B)

    def forward(rows):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return loss_with(net, torch.randn(rows, 3, 32, 32), c, c, c, c,
                             eval_net=ema)[0]
    kept = control.saved_bytes(forward, B, weights)
    forward(B).backward()
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if t.numel() > 1]
    static = sum(t.nbytes for t in [*net.parameters(), *ema.parameters(), *state]) + sum(
        p.grad.nbytes for p in net.parameters())
    terms = static + kept
    if bf16:  # the checkpointed blocks: their inputs (both passes with gradient), one recomputed
        assert len(held) == 2 * 2 * len(net.blocks)  # saved_bytes' forward and the real one
        N = 16 + (32 // 2) ** 2
        h = torch.randn(B, N, net.dim, dtype=torch.bfloat16)
        block = lambda rows: net.blocks[0](h[:rows], torch.randn(rows, net.dim),  # noqa: E731
                                           torch.ones(rows, 1, 1, N, dtype=bool))
        with torch.autocast("cpu", torch.bfloat16):
            terms += sum(held) / 2 + control.saved_bytes(block, B, weights)
    estimate = control.memory_estimate(cfg, 384, B)[True]
    assert abs(estimate / terms - 1) < 0.01, (estimate / 1e6, terms / 1e6)  # measured: 1.000


@pytest.mark.gpu_path
def test_under_bf16_autocast_the_residual_stream_stays_in_bf16():
    """The fixed positions are a float32 buffer: added as they are, they would turn the stream,
    and every activation the blocks save, into float32 (gpu-long: 92 GB a step, not 81)."""
    net = selfe.DiT(res=16, patch=4, dim=32, depth=2, heads=2, text_dim=8)
    seen = []
    for blk in net.blocks:
        blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    cond = (torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool), torch.randn(2, 8))
    with torch.autocast("cpu", torch.bfloat16):
        net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.rand(2), cond)
    assert seen == [torch.bfloat16] * 2


@pytest.mark.slow
@pytest.mark.gpu_path
def test_half_precision_encoder_copy_loads_and_encodes_in_float32(tmp_path):
    """The GPU machine has no network: it gets the default encoder as a float16 copy
    (gpu_check.sh --pack-encoder, 46 MB), written by the interpreter that runs these tests. Its
    outputs come out in float32, within fp16 rounding of the original's."""
    subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--pack-encoder",
                    str(tmp_path / "enc")], check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable})
    captions = ["a photo of a red circle", "", "a photo of three squares fake image"]
    half = text_encoder.TextEncoder(str(tmp_path / "enc"), 16)
    full = text_encoder.TextEncoder("default", 16)
    for a, b in zip(half(captions), full(captions)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.is_floating_point():
            assert a.dtype == torch.float32 and (a - b).norm() / b.norm() < 3e-3  # measured 1e-3
        else:
            assert torch.equal(a, b)


@pytest.mark.gpu_path
def test_dataloader_workers_give_exactly_the_batches_of_no_workers():
    """Batch k comes from seed (seed, rank, k) whoever renders it, so workers keep resume exact.
    A batch is uint8 images and caption row ids: a quarter of float32's shared memory."""
    rows = {c: i for i, c in enumerate(shapes.all_prompts())}
    items = data.Batches(shapes.TrainingData(32), 8, seed=3, rank=0, rows=rows)
    alone, many = (list(data.loader(items, range(5, 11), n, pin=False)) for n in (0, 2))
    assert all(torch.equal(a, b) and torch.equal(i, j) for (a, i), (b, j) in zip(alone, many))
    images, ids = alone[0]
    assert images.dtype == torch.uint8 and images.shape == (8, 32, 32, 3)
    assert ids.dtype == torch.int64 and set(ids.tolist()) <= set(rows.values())


def test_gpu_check_takes_an_empty_out_folder_and_refuses_one_with_files(tmp_path):
    """With --budget 0 every part is skipped and the report is written: the check of --out alone."""
    def check(out):
        return subprocess.run(["bash", "tools/gpu_check.sh", "--tiny", "--budget", "0", "--out",
                               out], cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
                              capture_output=True, text=True, timeout=HUNG)
    (tmp_path / "empty").mkdir()
    r = check(str(tmp_path / "empty"))
    assert r.returncode == 0 and (tmp_path / "empty" / "report" / "summary.md").exists(), r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    r = check(str(tmp_path / "full"))
    assert r.returncode == 2 and "holds files but no earlier check" in r.stderr
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
