"""Fault injection: bad input, interruptions, kill -9, non-finite steps, unsafe checkpoints, several
processes.

Each test fails if the behaviour it names regresses. The CLI contract for bad input: one line on
stderr that starts with "error:", exit code 2, no traceback.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import sample
import selfe
import train
from harness import checkpoints, control, shapes, text_encoder
from conftest import ROOT, HUNG, SHORT, expect_input_error, image_folder


ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
# A short run whose steps are fast; the fake-score term switches on and the tau ramp ends inside it
RUN = [*SHORT, "--iters", "120", "--batch-size", "4", "--aux-start", "0.5", "--final-grid"]


# -------------------------------------------------------------------------------------------------
# 1. Bad input: one clear line, exit code 2


@pytest.mark.parametrize("case", ["no_folder", "no_images", "no_captions", "all_broken",
                                  "res_patch", "preset", "method", "iters", "text_encoder",
                                  "resume_missing", "exists_no_resume", "out_unwritable"])
def test_train_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    broken = tmp_path / "broken"
    if case == "all_broken":
        image_folder(broken, ["a.png"])
        (broken / "b.png").write_bytes(b"not a png")
        (broken / "b.txt").write_text("x")
        data = open(broken / "a.png", "rb").read()
        (broken / "a.png").write_bytes(data[: len(data) // 2])  # truncated
    if case == "exists_no_resume":
        os.makedirs(out)
        open(os.path.join(out, "ckpt.pt"), "w").close()
    (tmp_path / "file").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    argv, expected = {
        "no_folder": (["--data", str(tmp_path / "nope")], "no such folder"),
        "no_images": (["--data", str(empty)], "no images"),
        "no_captions": (["--data", image_folder(tmp_path / "nocap", ["a.png", "b.jpg"],
                                                caption=False)], "2 without a caption"),
        "all_broken": (["--data", str(broken)], "2 unreadable"),
        "res_patch": (["--res", "30", "--patch", "4"], "not a multiple of --patch"),
        "preset": (["--preset", "tpu"], "invalid choice: 'tpu'"),
        "method": (["--method", "gan"], "invalid choice: 'gan'"),
        "iters": (["--iters", "0"], "at least 1"),
        "text_encoder": (["--text-encoder", "no-such-org/no-such-encoder"], "text encoder"),
        "resume_missing": (["--resume"], "does not exist"),
        "exists_no_resume": ([], "add --resume"),
        "out_unwritable": (["--out", str(tmp_path / "file" / "run")], "cannot write"),
    }[case]
    argv = (["--out", out, "--preset", "cpu", *argv] if "--out" not in argv
            else ["--preset", "cpu", *argv])
    assert expected in expect_input_error(train.main, argv, capsys, monkeypatch)
    # bad input leaves no folder behind
    assert case == "exists_no_resume" or not os.path.exists(out)


@pytest.mark.slow
def test_checkpoint_errors_for_train_and_sample(shapes_run, tmp_path, capsys, monkeypatch):
    good = shapes_run
    ckpt = os.path.join(good, "ckpt.pt")
    text_file, truncated = tmp_path / "notes.pt", tmp_path / "cut" / "ckpt.pt"
    text_file.write_text("not a checkpoint")
    truncated.parent.mkdir()
    truncated.write_bytes(open(ckpt, "rb").read()[:100_000])
    for path, expected in [(str(tmp_path / "none.pt"), "does not exist"),
                           (str(text_file), "not a readable"), (str(truncated), "not a readable")]:
        assert expected in expect_input_error(
            sample.main, ["--ckpt", path, "--prompt", "x", "--out", str(tmp_path / "s")],
            capsys, monkeypatch)
        assert not os.path.exists(tmp_path / "s")  # bad input leaves no folder behind
    (tmp_path / "file").write_text("x")
    assert "cannot write" in expect_input_error(
        sample.main, ["--ckpt", ckpt, "--prompt", "x", "--out", str(tmp_path / "file" / "out")],
        capsys, monkeypatch)
    assert "not a readable" in expect_input_error(
        train.main, ["--out", str(truncated.parent), "--resume"], capsys, monkeypatch)
    assert "--model small differs from the run's tiny" in expect_input_error(
        train.main, ["--out", good, "--resume", "--model", "small"], capsys, monkeypatch)


def test_the_real_command_line_prints_one_line(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=HUNG)
    assert (r.returncode == 2 and r.stderr.strip().count("\n") == 0
            and r.stderr.startswith("error: --data"))


# -------------------------------------------------------------------------------------------------
# 2. Interruptions and exact resume. The test acts at a moment the run reaches and waits at (a
# logged step, the inside of a checkpoint write), never after a sleep: no race on a fast machine.

HELD = """
import io, json, os, sys, time
import train
from harness import checkpoints, cli, control

# HOLD: "log:N" waits after the log line of step N for a stop signal; "write:N", "rename:N" and
# "export:N" wait for kill -9 with half of the N-th checkpoint written, with all of it written but
# not yet renamed, and with it renamed but the export not written
kind, n = os.environ["HOLD"].split(":")
n, seen, signals = int(n), [0], []


def hold(until=lambda: False):  # the mark tells the test that the moment has come
    open(os.environ["HOLD_MARK"], "w").close()
    while not until():
        time.sleep(0.01)


def reached(k):  # the N-th time the run writes, renames or exports a checkpoint
    seen[0] += k == kind
    return k == kind and seen[0] == n


class Log:
    def __init__(self, f):
        self.f = f

    def __getattr__(self, name):
        return getattr(self.f, name)

    def write(self, line):
        self.f.write(line)
        if kind == "log" and "loss" in line and json.loads(line)["step"] == n:
            self.f.flush()
            hold(until=lambda: signals)


def write_synced(path, write, real=checkpoints.write_synced):
    if os.path.basename(path).startswith("ckpt.pt") and reached("write"):
        buf = io.BytesIO()
        write(buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        hold()
    real(path, write)


def replace(src, dst, real=os.replace):
    if dst.endswith("ckpt.pt") and reached("rename"):
        hold()
    real(src, dst)


def export(*args, real=train.export_ema):
    if reached("export"):
        hold()
    real(*args)


handle, open_log = control.Interrupt.handle, control.open_log
control.Interrupt.handle = lambda self, *a: signals.append(a[0]) or handle(self, *a)
train.open_log = lambda path: Log(open_log(path))
checkpoints.write_synced, os.replace, train.export_ema = write_synced, replace, export
sys.argv[0] = "train.py"
cli.run_cli(train.main)
"""


def start(out, hold, *extra, workers=0):
    """train.py on RUN with HELD's hold, in a session of its own as timeout, torchrun and
    schedulers start it (a signal to its process group reaches data workers too); -> (the process,
    the mark it makes when it holds). Its output goes to files, which never fill up as a pipe
    that nobody reads would."""
    mark = out + ".held"
    with open(out + ".stdout", "w") as stdout, open(out + ".stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", HELD, "--out", out, *RUN, *extra,
                                 *(["--workers", str(workers)] if workers else [])],
                                cwd=ROOT, env={**ENV, "HOLD": hold, "HOLD_MARK": mark},
                                stdout=stdout, stderr=stderr, start_new_session=True)
    return proc, mark


def ended(proc, out):
    """Wait for the run's end; -> (its stdout, its stderr)."""
    proc.wait(timeout=HUNG)
    return tuple(open(out + part).read() for part in (".stdout", ".stderr"))


def held(proc, mark, timeout=HUNG):
    """Wait until the run holds at its moment (the wall clock only bounds the wait)."""
    t0 = time.time()
    while not os.path.exists(mark):
        assert proc.poll() is None, "the run ended before its moment"
        assert time.time() - t0 < timeout, "the run never reached its moment"
        time.sleep(0.02)
    os.remove(mark)


def finish(out, *extra):
    r = subprocess.run([sys.executable, "train.py", "--out", out, *RUN, *extra], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=HUNG)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def logged_steps(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run in one go."""
    return finish(str(tmp_path_factory.mktemp("ref") / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.gpu_path)])
def test_a_stop_signal_to_the_group_saves_at_that_step_and_resumes_bit_exact(workers, reference,
                                                                           tmp_path):
    """Ctrl-C, then SIGTERM, to the whole process group (with --workers 2, the data workers too):
    each run saves the step it was at and says so; the runs together equal the run in one go, bit
    for bit."""
    out = str(tmp_path / "run")
    for sig, at, extra in ((signal.SIGINT, 15, ()), (signal.SIGTERM, 40, ("--resume",))):
        proc, mark = start(out, f"log:{at}", *extra, workers=workers)
        held(proc, mark)
        os.killpg(proc.pid, sig)
        stdout, stderr = ended(proc, out)
        assert proc.returncode == 0 and f"interrupted at step {at}:" in stdout, stderr[-2000:]
        assert "Traceback" not in stderr and "Error" not in stderr, stderr[-2000:]
        assert checkpoints.read_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == at
    assert_same_state(finish(out, "--resume"), reference)  # workers render the same batches
    assert logged_steps(out) == list(range(1, 121))  # the step count went on where it stopped


@pytest.mark.slow
@pytest.mark.gpu_path
def test_a_data_worker_that_dies_is_one_line_naming_the_last_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    proc, mark = start(out, "log:12", "--ckpt-every", "5", workers=2)
    held(proc, mark)  # no signal comes: torch's SIGCHLD handler raises out of the hold
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        os.kill(int(f.read().split()[0]), signal.SIGKILL)  # as the out-of-memory killer would
    _, stderr = ended(proc, out)
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    # torch says "is killed by signal: Killed" or "exited unexpectedly": whichever check saw it
    assert last.startswith("error: a data worker died (DataLoader worker (pid") and last.endswith(
        f"; out of memory?); the last checkpoint, {out}/ckpt.pt, is at step 10: continue with "
        f"--resume --out {out}"), last
    # whole, loadable
    assert checkpoints.read_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 10


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_stops_it_with_the_run_saved(tmp_path, monkeypatch):
    """SIGTERM while the final evaluation draws its first batch (of four: a medium set) stops it
    there: no other batch is drawn, nothing half-scored is written, the last step is saved."""
    drawn, generate = [], train.generate

    def signalled(*args, **kwargs):
        drawn.append(len(args[2]))
        if len(args[2]) == 96:  # the final evaluation's batch; the last step's grid has 6 prompts
            os.kill(os.getpid(), signal.SIGTERM)
        return generate(*args, **kwargs)

    monkeypatch.setattr(train, "generate", signalled)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--out", str(tmp_path), *RUN, "--iters", "3", "--final-eval", "medium"])
    assert drawn == [6, 96]  # the grid, then the evaluation's first batch, stopped there
    assert checkpoints.read_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 3
    assert not os.path.exists(tmp_path / "eval" / "results.json")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


@pytest.mark.slow
def test_kill_9_in_a_checkpoint_write_leaves_the_last_whole_one(reference, tmp_path):
    """kill -9 with half of a checkpoint on disk, with all of it not yet renamed, and between the
    checkpoint and its export: each time ckpt.pt is the last whole checkpoint and model/ the last
    whole export, and the run resumed from ckpt.pt ends where the run in one go does, bit for
    bit."""
    out = str(tmp_path / "run")
    for hold, extra, step, exported in (("write:3", (), 2, 2), ("rename:2", ("--resume",), 3, 3),
                                        ("export:1", ("--resume",), 4, 3)):
        proc, mark = start(out, hold, "--ckpt-every", "1", *extra)
        held(proc, mark)
        proc.kill()
        proc.wait()
        ckpt = checkpoints.read_checkpoint(os.path.join(out, "ckpt.pt"))
        assert ckpt["step"] == step and all(torch.isfinite(v).all() for v in ckpt["model"].values())
        assert checkpoints.load_checkpoint(os.path.join(out, "model"))[2] == exported
    assert_same_state(finish(out, "--resume"), reference)


# -------------------------------------------------------------------------------------------------
# 3. Numerical faults


def faulty_loss(bad_calls, kind="loss"):
    """selfe_loss with a non-finite loss (or, kind='grad', a finite loss with non-finite
    gradients) on some calls."""
    real, calls = selfe.selfe_loss, [0]

    def loss_fn(net, *args, **kwargs):
        loss, stats = real(net, *args, **kwargs)
        if "eval_net" not in kwargs:  # the start-up memory estimate's, not a training step's
            return loss, stats
        calls[0] += 1
        if bad_calls(calls[0]):
            p = next(net.parameters())
            loss = (loss * float("nan") if kind == "loss"
                    else loss + 0 * (p - p.detach()).abs().sqrt().sum())
        return loss, stats
    return loss_fn


OPTIMISERS = {"Adam": lambda p, fused: torch.optim.Adam(p, lr=0.1, fused=fused),
              "AdamW": lambda p, fused: torch.optim.AdamW(p, lr=0.1, fused=fused),
              "SGD with momentum": lambda p, fused: torch.optim.SGD(p, lr=0.1, momentum=0.9,
                                                                    fused=fused),
              "Adagrad": lambda p, fused: torch.optim.Adagrad(p, lr=0.1, fused=fused)}


def optimiser_state(opt):
    """Every tensor an optimiser holds, by name: its weights and its state."""
    params = opt.param_groups[0]["params"]
    out = {("weight", i): p.clone() for i, p in enumerate(params)}
    out.update({(i, k): v.clone() for i, p in enumerate(params)
                for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)})
    return out


@pytest.mark.parametrize("bads", [(1, 0, 1, 0), (0, 0, 1, 1, 0)])  # the first step bad, or later
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", OPTIMISERS)
def test_a_bad_step_changes_nothing_whatever_the_optimiser(name, fused, bads):
    """A course may swap the optimiser: where bad is 1 the weights and the optimiser's state (its
    moments, its step count) stay as they were (a fused one may set up its state at zero); where
    0 it is the optimiser's own step, as if the bad steps had never come."""
    torch.manual_seed(0)
    net, ref = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    ref.load_state_dict(net.state_dict())
    opt, ref_opt = (OPTIMISERS[name](n.parameters(), fused) for n in (net, ref))
    for bad in bads:
        x = torch.randn(4, 16)
        for n in (net, ref):
            n.zero_grad()
            n(x).pow(2).sum().backward()
        before = optimiser_state(opt)
        if bad:  # memory freed full of 1e30: a buffer allocated there and never written shows
            [torch.full_like(p, 1e30) for p in net.parameters()]
        control.step_unless(opt, torch.tensor(float(bad)))
        after = optimiser_state(opt)
        if bad:
            assert all(torch.equal(after[k], v) for k, v in before.items())
            assert not any(after[k].any() for k in after.keys() - before.keys())
        else:
            ref_opt.step()
            expected = optimiser_state(ref_opt)
            assert after.keys() == expected.keys()
            assert all(torch.equal(after[k], v) for k, v in expected.items())
    assert not hasattr(opt, "found_inf")  # nothing left for the optimiser's next step to read


@pytest.mark.slow
@pytest.mark.parametrize("kind, fused", [("loss", True), ("grad", True), ("loss", False)])
def test_non_finite_steps_are_skipped_and_counted(kind, fused, tmp_path, monkeypatch):
    adam = torch.optim.Adam  # train.py's, fused or not (a course's own optimiser)
    monkeypatch.setattr(torch.optim, "Adam", lambda p, **kw: adam(p, **{**kw, "fused": fused}))
    monkeypatch.setattr(selfe, "selfe_loss", faulty_loss(lambda k: k in (3, 4, 7), kind))
    out = str(tmp_path / "run")
    net = train.main(["--out", out, *RUN, "--iters", "10"])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["skipped"] for r in log] == [0, 0, 1, 2, 2, 2, 3, 3, 3, 3]
    assert all(r["loss"] is None if r["step"] in (3, 4, 7) else np.isfinite(r["loss"]) for r in log)
    assert all(p.isfinite().all() for p in net.parameters())
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["skipped"] == 3


@pytest.mark.slow
def test_many_non_finite_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    train.main(["--out", out, *RUN, "--iters", "4"])
    before = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    monkeypatch.setattr(selfe, "selfe_loss", faulty_loss(lambda k: True))
    with pytest.raises(SystemExit, match="10 steps in a row had a non-finite.*holds the last "
                                         "good weights: --resume with a lower --lr"):
        train.main(["--out", out, "--resume", "--iters", "40", "--ckpt-every", "1"])
    after = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    # saved before the tenth; the tenth stopped the run
    assert after["skipped"] == 9 and after["step"] == 13
    # no update got in
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


@pytest.mark.slow
def test_a_run_stopped_before_its_first_checkpoint_says_there_is_none(tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.setattr(selfe, "selfe_loss", faulty_loss(lambda k: True))
    with pytest.raises(SystemExit, match="no checkpoint yet: start again with a lower --lr"):
        train.main(["--out", str(tmp_path / "run"), *RUN, "--iters", "40"])
    assert capsys.readouterr().err.endswith("\n")  # the progress bar ended its line first


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path):
    net, opt = torch.nn.Linear(2, 2), None
    path = str(tmp_path / "ckpt.pt")
    with open(path, "wb") as f:
        f.write(b"the last good checkpoint")
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(SystemExit, match="non-finite weights"):
        checkpoints.save_checkpoint(path, net, net, opt, 5, {}, 384, 0)
    assert open(path, "rb").read() == b"the last good checkpoint"


# -------------------------------------------------------------------------------------------------
# 4. Checkpoints that would run code are refused


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        # creating a file stands in for anything an attacker would run
        return (open, (self.marker, "w"))


def test_a_checkpoint_crafted_to_run_code_is_refused(tmp_path, capsys, monkeypatch):
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.pt")
    torch.save({"model": RunsCode(marker), "ema": {}, "opt": {}, "step": 0, "config": {},
                "text_dim": 384}, path)
    err = expect_input_error(sample.main,
                             ["--ckpt", path, "--prompt", "x", "--out", str(tmp_path / "s")],
                             capsys, monkeypatch)
    assert "refusing to load" in err and not os.path.exists(marker)
    os.makedirs(tmp_path / "run")
    os.replace(path, tmp_path / "run" / "ckpt.pt")
    err = expect_input_error(train.main, ["--out", str(tmp_path / "run"), "--resume"], capsys,
                             monkeypatch)
    assert "refusing to load" in err and not os.path.exists(marker)
    # the file really is hostile: unsafe loading runs it
    torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert os.path.exists(marker)


# -------------------------------------------------------------------------------------------------
# 5. Several processes (torchrun, gloo on the CPU)

WRAPPER = """
import os, sys, torch
sys.path.insert(0, {here!r})
import train
fed, table_call = [], train.TextTable.__call__


def spy(table, ids, fake=False):  # what this process feeds the loss, with the rows' captions
    out = table_call(table, ids, fake)
    fed.append(([table.captions[i] for i in ids.tolist()], fake, out))
    return out


train.TextTable.__call__ = spy
model = train.main(sys.argv[1:])
rank = os.environ["RANK"]
torch.save(model.state_dict(), os.path.join({out!r}, "rank" + rank + ".pt"))
torch.save(fed, os.path.join({out!r}, "fed" + rank + ".pt"))
"""


@pytest.mark.slow
def test_two_processes_with_gloo_train_on_the_right_text_hold_identical_weights_and_resume(
        tmp_path):
    """Each process feeds the loss its own batches' captions and fake prompts with the token
    states, mask and pooled vector that one process encodes for them (DDP would keep the weights
    equal whatever the inputs); the weights stay equal, and the run resumes."""
    out = str(tmp_path / "run")
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(WRAPPER.format(here=ROOT, out=out))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              str(wrapper), "--out", out, *RUN, "--batch-size", "8", "--aux-start", "0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as each process below: the kernels' split, the bits
    try:
        text = text_encoder.TextEncoder("default", 16)
        table = text_encoder.TextTable(text, shapes.TrainingData(16).captions, fake=True)
    finally:
        torch.set_num_threads(threads)
    for steps, extra in ((3, ["--iters", "3"]), (2, ["--iters", "5", "--resume"])):
        r = subprocess.run(launch + extra, cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=HUNG)
        assert r.returncode == 0, r.stderr[-3000:]
        w0, w1 = (torch.load(os.path.join(out, f"rank{i}.pt"), weights_only=True) for i in (0, 1))
        assert all(torch.equal(w0[k], w1[k]) for k in w0)
        fed = [torch.load(os.path.join(out, f"fed{i}.pt"), weights_only=True) for i in (0, 1)]
        assert [len(f) for f in fed] == [2 * steps] * 2  # captions and fake prompts, each step
        assert fed[0][0][0] != fed[1][0][0]  # each process its own batches
        for captions, fake, got in fed[0] + fed[1]:
            want = table(torch.tensor([table.row[c] for c in captions]), fake)
            assert all(torch.equal(g, w) for g, w in zip(got, want)), (captions, fake)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 5 and all(torch.equal(ckpt["model"][k], w0[k]) for k in w0)
    torch.manual_seed(0)
    fresh = checkpoints.build_model(ckpt["config"], ckpt["text_dim"]).state_dict()
    assert not all(torch.equal(fresh[k], w0[k]) for k in w0)  # it trained
    logged = [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]
    assert logged == [1, 2, 3, 4, 5]  # one log, written by rank 0 only
