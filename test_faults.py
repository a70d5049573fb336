"""Fault injection: bad input, interruptions, kill -9, non-finite steps, unsafe checkpoints, several
processes.

Each test fails if the behaviour it names regresses. The CLI contract for bad input: one line on
stderr that starts with "error:", exit code 2, no traceback.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import model
import sample
import selfe
import shapes
import train
from conftest import HERE, HUNG, expect_input_error, image_folder, in_ascii_locale

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
# A short run whose steps are fast; the fake-score term switches on and the tau ramp ends inside it
RUN = ["--preset", "cpu", "--iters", "120", "--batch-size", "4", "--res", "16",
       "--aux-start", "0.5", "--log-every", "1", "--eval-every", "0", "--sample-every", "100000",
       "--final-eval", "off"]


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
                       cwd=HERE, capture_output=True, text=True, env=ENV, timeout=HUNG)
    assert (r.returncode == 2 and r.stderr.strip().count("\n") == 0
            and r.stderr.startswith("error: --data"))


def test_odd_images_are_converted_and_bad_files_skipped_and_counted(tmp_path, capsys):
    root = tmp_path / "odd"
    root.mkdir()
    imgs = {"gray.png": Image.new("L", (30, 50), 200),
            "pal.png": Image.new("RGB", (24, 24), "blue").convert("P"),
            "rgba.png": Image.new("RGBA", (20, 20), (0, 0, 255, 0)),
            "tiny.png": Image.new("RGB", (1, 1), "red"),
            "deep.png": Image.fromarray(np.full((16, 16), 32896, np.uint16)),
            "wide.jpg": Image.new("RGB", (90, 10))}
    for name, img in imgs.items():
        img.save(root / name)
        (root / name).with_suffix(".txt").write_text(f"a photo of {name}")
    Image.new("RGB", (8, 8)).save(root / "nocaption.png")
    (root / "broken.png").write_bytes(open(root / "gray.png", "rb").read()[:40])
    (root / "broken.txt").write_text("a broken file")
    folder = train.FolderData(str(root), 8)
    assert "6 images" in capsys.readouterr().out and len(folder.images) == 6
    assert folder.images.shape == (6, 8, 8, 3) and folder.images.dtype == np.uint8
    by_name = dict(zip(sorted(n for n in imgs), folder.images))
    # 16-bit mid-grey stays mid-grey, not clipped to white
    assert np.all(by_name["deep.png"] == 128)
    assert np.all(by_name["rgba.png"] == 255)  # fully transparent -> white
    assert np.all(by_name["tiny.png"] == [255, 0, 0]) and np.all(by_name["gray.png"] == 200)
    assert np.all(by_name["pal.png"] == [0, 0, 255])
    x, caps = folder.batch(5, np.random.default_rng(0))
    assert x.shape == (5, 8, 8, 3) and x.dtype == np.uint8  # scaled on the training device
    assert all(c.startswith("a photo of") for c in caps)


@pytest.mark.parametrize("kind,counts", [
    ("no caption", "1 without a caption (e.g. c.png), 0 with an empty one, 0 unreadable"),
    ("empty caption", "0 without a caption, 1 with an empty one (e.g. c.png), 0 unreadable"),
    ("unreadable", "0 without a caption, 0 with an empty one, 1 unreadable (e.g. c.png)")])
def test_the_folder_report_counts_each_kind_of_skipped_image(kind, counts, tmp_path, capsys):
    root = tmp_path / "mixed"
    image_folder(root, ["a.png", "b.png"])
    (root / "c.png").write_bytes(b"not a png" if kind == "unreadable" else
                                 open(root / "a.png", "rb").read())
    if kind != "no caption":
        (root / "c.txt").write_text("  \n" if kind == "empty caption" else "a photo")
    train.FolderData(str(root), 8)
    assert capsys.readouterr().out == f"data: 2 images from {root}; skipped {counts}\n"


def test_a_metadata_line_that_is_not_json_is_named(tmp_path):
    root = image_folder(tmp_path / "data", ["a.png"], caption=False)
    (tmp_path / "data" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\nnot\n')
    with pytest.raises(cli.InputError, match="line 2"):
        train.FolderData(root, 8)


@pytest.mark.parametrize("row", ['{"file_name": "a.png", "text": 1}',
                                 '{"file_name": "a.png", "text": ["a", "b"]}',
                                 '{"file_name": "a.png", "text": null}'])
def test_a_caption_that_is_not_a_string_is_one_line_with_file_and_line(row, tmp_path, capsys,
                                                                       monkeypatch):
    root = image_folder(tmp_path / "data", ["a.png", "b.png"], caption=False)
    (tmp_path / "data" / "metadata.jsonl").write_text(
        '{"file_name": "b.png", "text": "a photo"}\n' + row + "\n")
    out = str(tmp_path / "out")
    err = expect_input_error(train.main, ["--out", out, "--data", root], capsys, monkeypatch)
    assert "metadata.jsonl, line 2: 'text' must be a string, not " in err
    assert not os.path.exists(out)  # no log.jsonl, no samples/


def test_captions_are_utf8_with_or_without_a_bom_in_any_locale(tmp_path):
    """Read by a Python whose locale is plain ASCII: the captions still come out whole."""
    root = image_folder(tmp_path / "bom", ["a.png"], caption=False)
    (tmp_path / "bom" / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "un cœur rouge"}\n', encoding="utf-8-sig")  # Notepad's
    txt = image_folder(tmp_path / "txt", ["b.png"], caption=False)
    (tmp_path / "txt" / "b.txt").write_text("ein grünes Dreieck", encoding="utf-8")
    code = (f"import train; print(train.FolderData({root!r}, 8, quiet=True).captions, "
            f"train.FolderData({txt!r}, 8, quiet=True).captions)")
    assert in_ascii_locale(code) == "['un cœur rouge'] ['ein grünes Dreieck']"


def test_a_caption_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    root = image_folder(tmp_path / "latin", ["a.png"], caption=False)
    (tmp_path / "latin" / "a.txt").write_bytes("un c\u0153ur".encode("cp1252"))
    with pytest.raises(cli.InputError, match=r"a\.txt: not UTF-8"):
        train.FolderData(root, 8)


def test_no_usable_image_is_one_line_and_no_progress_bar(tmp_path, capsys):
    root = image_folder(tmp_path / "data", ["a.png", "b.png"], caption=False)
    with pytest.raises(cli.InputError, match="no usable images: 2 without a caption"):
        train.FolderData(root, 8)
    assert capsys.readouterr().err == ""  # the one line is the error's alone


def test_the_hugging_face_imagefolder_layout_with_subfolders(tmp_path, capsys):
    root = tmp_path / "hf"
    image_folder(root / "images", ["x.png", "y.png"], caption=False)
    image_folder(root / "train", ["z.png"], caption=False)
    (root / "metadata.jsonl").write_text('{"file_name": "images/x.png", "text": "an x"}\n'
                                         '{"file_name": "images/y.png", "text": "a y"}\n'
                                         '{"file_name": "images/gone.png", "text": "gone"}\n')
    (root / "train" / "metadata.jsonl").write_text('{"file_name": "z.png", "text": "a z"}\n')
    data = train.FolderData(str(root), 8)
    assert data.captions == ["an x", "a y", "a z"] and len(data.images) == 3
    assert "; 1 captions name no image here (e.g. images/gone.png)" in capsys.readouterr().out


def test_long_captions_are_reported_once_and_grid_labels_cut(tmp_path, capsys):
    text = model.TextEncoder("default", 16)
    cfg = {**train.DEFAULTS, **train.PRESETS["cpu"], "aux_start": 1.0}
    long = "a photo of " + "a very red circle " * 100
    train.print_notes(cfg, text, ["a red circle", long, long])
    notes = capsys.readouterr().out
    assert notes.count("\n") == 1 and "captions: 1 of 2 are longer than --text-len 16" in notes
    train.print_notes({**cfg, "aux_start": 0.5}, text, ["a red circle", long, long])
    notes = capsys.readouterr().out  # with the fake-score term, the fake prompts cut to fit
    assert notes.count("\n") == 2 and ("fake prompts: 1 of 2 captions give up their last words "
                                       "so that the fake prompt keeps \"fake image\"") in notes
    images = {2: torch.zeros(2, 3, 8, 8)}
    shapes.save_grid(images, ["a red circle", long], str(tmp_path / "grid.png"))
    assert Image.open(tmp_path / "grid.png").width < 700  # not as wide as the caption


def test_the_warm_up_is_capped_at_a_share_of_a_short_run(capsys):
    cfg = {**train.DEFAULTS, **train.PRESETS["cpu"], "iters": 30}  # warm-up 100
    assert train.warmup_steps(cfg) == 3 and train.lr_at(2, cfg) == cfg["lr"]
    train.print_notes(cfg, model.TextEncoder("default", 16), ["a red circle"])
    assert "warm-up: 3 steps (--warmup 100 is capped at 10% of --iters 30)" in (
        capsys.readouterr().out)
    default = {**cfg, "iters": 2600}
    assert train.warmup_steps(default) == 100  # the presets' warm-ups are below the cap


# -------------------------------------------------------------------------------------------------
# 2. Runs: resume keeps a run's identity, a folder holds one run


def copy_run(run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(run, out)
    return out


def test_a_run_saves_absolute_paths_an_export_and_no_final_grid(folder_run):
    out, data = folder_run
    cfg = model.read_checkpoint(os.path.join(out, "ckpt.pt"))["config"]
    assert cfg["data"] == data and os.path.isabs(data)  # resumes from any directory
    assert os.listdir(os.path.join(out, "samples")) == []  # --no-final-grid
    assert sorted(os.listdir(os.path.join(out, "model"))) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("flag,value,saved", [("--res", "32", "16"), ("--patch", "2", "4"),
                                              ("--method", "fm", "selfe"),
                                              ("--data", "shapes", None),
                                              ("--text-len", "8", "16"),
                                              ("--text-encoder", "HERE", "default")])
def test_resume_refuses_to_change_what_defines_the_run(flag, value, saved, folder_run, tmp_path,
                                                       capsys, monkeypatch):
    out = copy_run(folder_run[0], tmp_path)
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    value = HERE if value == "HERE" else value
    err = expect_input_error(train.main, ["--out", out, "--resume", flag, value, "--iters", "4"],
                             capsys, monkeypatch)
    saved = folder_run[1] if saved is None else saved
    assert f"{flag} {value} differs from the run's {saved}" in err
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before  # untouched


def test_resume_prints_each_flag_it_overrides(folder_run, tmp_path, capsys):
    out = copy_run(folder_run[0], tmp_path)
    train.main(["--out", out, "--resume", "--iters", "3", "--lr", "0.002"])
    printed = capsys.readouterr().out
    assert "overriding iters: 2 -> 3\n" in printed and "overriding lr: 0.001 -> 0.002\n" in printed
    assert model.read_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 3


@pytest.mark.parametrize("iters", [None, "1"])
def test_resume_with_nothing_left_to_train_says_so(iters, folder_run, tmp_path, capsys,
                                                   monkeypatch):
    out = copy_run(folder_run[0], tmp_path)
    err = expect_input_error(train.main, ["--out", out, "--resume",
                                          *(["--iters", iters] if iters else [])],
                             capsys, monkeypatch)
    assert "is at step 2 and --iters is " in err and "give --iters above 2" in err


def test_a_moved_data_folder_names_the_flag_to_pass(folder_run, tmp_path, capsys, monkeypatch):
    run, data = folder_run
    out, moved = copy_run(run, tmp_path), str(tmp_path / "moved")
    shutil.copytree(data, moved)
    cfg = model.read_checkpoint(os.path.join(out, "ckpt.pt"))["config"]
    monkeypatch.setattr(train, "gone", lambda v: v == cfg["data"])  # as if it had moved away
    err = expect_input_error(train.main, ["--out", out, "--resume", "--iters", "3"], capsys,
                             monkeypatch)
    assert f"the run's data folder {data} is not there any more" in err and "--data" in err
    train.main(["--out", out, "--resume", "--iters", "3", "--data", moved])
    assert f"overriding data: {data} -> {moved}" in capsys.readouterr().out


def test_a_folder_with_a_log_but_no_checkpoint_holds_a_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "died"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 5}\n')
    assert "holds a run (log.jsonl): add --resume" in expect_input_error(
        train.main, ["--out", str(out)], capsys, monkeypatch)
    assert "stopped before its first checkpoint" in expect_input_error(
        train.main, ["--out", str(out), "--resume"], capsys, monkeypatch)
    assert (out / "log.jsonl").read_text() == '{"step": 5}\n'


class StudentNet(torch.nn.Module):
    """A network of one's own: the contract of model.build_model, without .flops."""

    def __init__(self, net):
        super().__init__()
        self.net, self.res, self.channels = net, net.res, net.channels

    def forward(self, x, t, s, cond):
        return self.net(x, t, s, cond)


@pytest.mark.parametrize("own", [False, True])
def test_the_log_shows_mfu_for_a_network_with_flops_and_none_without(own, tmp_path, monkeypatch):
    """On a device whose peak is known (here every device, even this CPU) the log shows MFU; a
    network of one's own without .flops trains all the same, with no MFU."""
    monkeypatch.setattr(train, "peak_flops", lambda name: 1e12)
    if own:
        monkeypatch.setattr(train, "build_model", lambda cfg, dim: StudentNet(model.build_model(
            cfg, dim)))
    out = str(tmp_path / "run")
    train.main(["--out", out, *RUN, "--iters", "3", "--aux-start", "0", "--no-final-grid"])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert [("mfu" in r) for r in log] == [False, not own, not own]  # step 1 builds: not timed


def test_gpu_check_takes_an_empty_out_folder_and_refuses_one_with_files(tmp_path):
    """With --budget 0 every part is skipped and the report is written: the check of --out alone."""
    def check(out):
        return subprocess.run(["bash", "gpu_check.sh", "--tiny", "--budget", "0", "--out", out],
                              cwd=HERE, env={**ENV, "PYTHON": sys.executable},
                              capture_output=True, text=True, timeout=HUNG)
    (tmp_path / "empty").mkdir()
    r = check(str(tmp_path / "empty"))
    assert r.returncode == 0 and (tmp_path / "empty" / "report" / "summary.md").exists(), r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    r = check(str(tmp_path / "full"))
    assert r.returncode == 2 and "holds files but no earlier check" in r.stderr
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


# -------------------------------------------------------------------------------------------------
# 3. Interruptions and exact resume. The test acts at a moment the run reaches and waits at (a
# logged step, the inside of a checkpoint write), never after a sleep: no race on a fast machine.

HELD = """
import io, json, os, sys, time
import cli, model, train

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


def write_synced(path, write, real=model.write_synced):
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


handle, open_log = train.Interrupt.handle, train.open_log
train.Interrupt.handle = lambda self, *a: signals.append(a[0]) or handle(self, *a)
train.open_log = lambda path: Log(open_log(path))
model.write_synced, os.replace, train.export_ema = write_synced, replace, export
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
                                cwd=HERE, env={**ENV, "HOLD": hold, "HOLD_MARK": mark},
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
    r = subprocess.run([sys.executable, "train.py", "--out", out, *RUN, *extra], cwd=HERE, env=ENV,
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
        assert model.read_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == at
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
    assert model.read_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 10  # whole, loadable


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
    assert model.read_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 3
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
        ckpt = model.read_checkpoint(os.path.join(out, "ckpt.pt"))
        assert ckpt["step"] == step and all(torch.isfinite(v).all() for v in ckpt["model"].values())
        assert model.load_checkpoint(os.path.join(out, "model"))[2] == exported
    assert_same_state(finish(out, "--resume"), reference)


# -------------------------------------------------------------------------------------------------
# 4. Numerical faults


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


OPTIMISERS = {"fused Adam": lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
              "Adam": lambda p: torch.optim.Adam(p, lr=0.1),
              "SGD with momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)}


@pytest.mark.parametrize("name", OPTIMISERS)
def test_a_bad_step_changes_nothing_whatever_the_optimiser(name):
    """A course may swap the optimiser: where bad is 1 the weights and the optimiser's state (its
    moments, its step count) stay as they were; where 0 it is the optimiser's own step."""
    torch.manual_seed(0)
    net, ref = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ref.load_state_dict(net.state_dict())
    opt, ref_opt = OPTIMISERS[name](net.parameters()), OPTIMISERS[name](ref.parameters())
    state = lambda: [t.clone() for t in [*net.parameters(), *(  # noqa: E731
        v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]]
    for bad in (0, 0, 1, 1, 0):
        x = torch.randn(4, 3)
        for n in (net, ref):
            n.zero_grad()
            n(x).pow(2).sum().backward()
        before = state()
        train.step_unless(opt, torch.tensor(float(bad)))
        if bad:
            assert all(torch.equal(a, b) for a, b in zip(before, state()))
        else:
            ref_opt.step()
            assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters()))
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
        model.save_checkpoint(path, net, net, opt, 5, {}, 384, 0)
    assert open(path, "rb").read() == b"the last good checkpoint"


# -------------------------------------------------------------------------------------------------
# 5. Checkpoints that would run code are refused


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
# 6. Several processes (torchrun, gloo on the CPU)

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
    wrapper.write_text(WRAPPER.format(here=HERE, out=out))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              str(wrapper), "--out", out, *RUN, "--batch-size", "8", "--aux-start", "0"]
    text = model.TextEncoder("default", 16)
    table = model.TextTable(text, shapes.TrainingData(16).captions, fake=True)
    for steps, extra in ((3, ["--iters", "3"]), (2, ["--iters", "5", "--resume"])):
        r = subprocess.run(launch + extra, cwd=HERE, env=ENV, capture_output=True, text=True,
                           timeout=HUNG)
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
    fresh = model.build_model(ckpt["config"], ckpt["text_dim"]).state_dict()
    assert not all(torch.equal(fresh[k], w0[k]) for k in w0)  # it trained
    logged = [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]
    assert logged == [1, 2, 3, 4, 5]  # one log, written by rank 0 only
