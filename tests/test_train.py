"""train.py end to end on the CPU: presets, the log, resume, the two methods, a folder of images."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import selfe
import train
from harness import checkpoints, control, data, shapes, text_encoder
from conftest import (ROOT, HUNG, SHORT, LinearNet, Recorder, StudentNet, expect_input_error,
                      image_folder, loss_with)


def test_the_preset_says_when_the_fake_score_term_comes_on_and_a_flag_wins():
    """The CPU preset is stage one only (the term never on), the GPU presets switch it on at the
    paper's 77 % with its k 0.9, and so does the CPU preset given --aux-start 0.77 alone;
    --aux-start and --k, given, win over the preset, and a resumed run keeps its own values."""
    def resolved(argv, saved=()):  # as train.py: defaults, a resumed run's config, the flags given
        given = vars(train.config_parser().parse_args(argv))
        given.pop("resume")
        return train.finish_config({**train.DEFAULTS, **dict(saved), **given}, world=1, quiet=True)

    cpu, gpu = resolved(["--preset", "cpu"]), resolved(["--preset", "gpu"])
    assert (cpu["aux_start"], cpu["k"]) == (1.0, 0.9) and not train.aux_on(cpu["iters"] - 1, cpu)
    paper = resolved(["--preset", "cpu", "--aux-start", "0.77"])
    assert [train.aux_on(k, paper) for k in (2001, 2002)] == [False, True] and paper["k"] == 0.9
    assert (gpu["aux_start"], gpu["k"]) == (0.77, 0.9) and train.aux_on(gpu["iters"] - 1, gpu)
    assert not train.aux_on(1500, gpu)
    assert resolved(["--preset", "cpu", "--aux-start", "0.5", "--k", "0"])["aux_start"] == 0.5
    assert resolved(["--preset", "cpu", "--k", "0"])["k"] == 0.0
    assert resolved(["--preset", "gpu", "--k", "0"])["k"] == 0.0
    assert resolved(["--preset", "cpu"], saved={"aux_start": 0.77, "k": 0.9})["k"] == 0.9
    assert resolved(["--preset", "cpu"], saved={"aux_start": 0.77})["aux_start"] == 0.77


@pytest.mark.parametrize("cuda,line", [(False, "preset: cpu (no GPU found; --preset to choose)"),
                                       (True, "preset: gpu (CUDA found; --preset to choose)")])
def test_the_auto_preset_says_which_it_took_and_why(cuda, line, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = train.finish_config({**train.DEFAULTS}, world=1)
    assert capsys.readouterr().out == line + "\n"
    assert cfg["preset"] == ("gpu" if cuda else "cpu") and cfg["bf16"] == cuda


def test_mfu_knows_gpu_variants_apart():
    names = ("H200 NVL", "H200", "H100 NVL", "H100 PCIe", "H100 80GB HBM3", "A100-SXM4-80GB", "L4")
    peaks = {name: control.peak_flops(f"NVIDIA {name}") for name in names}
    bf16 = {name: p and p["bf16"] for name, p in peaks.items()}
    assert bf16 == {"H200 NVL": 835e12, "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
                    "H100 80GB HBM3": 989e12, "A100-SXM4-80GB": 312e12, "L4": None}
    assert all(p["tf32"] == pytest.approx(p["bf16"] / 2, rel=0.01) for p in peaks.values() if p)


@pytest.mark.parametrize("m, fake, k", [(0, False, 0.9), (4, False, 0.9), (4, True, 0.9),
                                        (4, True, 0.0)])
def test_mfu_counts_each_pass_at_the_peak_of_the_precision_it_runs_in(m, fake, k):
    """Under bf16 autocast the passes with gradient run in bf16 and the judges in float32 (TF32 on
    a GPU: half bf16's peak). step_flops counts each pass the loss runs where it runs; MFU is the
    share of the time the step would take with each at its own peak."""
    torch.manual_seed(0)
    net, B = Recorder(LinearNet()), 8
    c = lambda: (torch.randn(B),)  # noqa: E731
    with torch.autocast("cpu", torch.bfloat16):
        loss_with(net, torch.randn(B, 3, 4, 4), c(), c(), *(c(), c()) * fake, fm=m == 0,
                  p_equal=1 - m / B, p_null=0.0, k=k)
    ran = {"bf16": 0, "tf32": 0}
    for call in net.calls:  # with gradient: forward and backward, 3 forwards
        ran["bf16" if call["autocast"] else "tf32"] += call["n"] * (3 if call["grad"] else 1)
    unit = type("Net", (), {"flops": lambda self, text_len: 1})()  # one FLOP a row and pass
    assert control.step_flops(unit, 0, B, m, fake, k, bf16=True) == ran
    assert control.step_flops(unit, 0, B, m, fake, k, bf16=False) == {"tf32": sum(ran.values())}
    peaks = {"bf16": 1e12, "tf32": 0.5e12}
    assert control.mfu({"bf16": 1e12, "tf32": 0.5e12}, 4.0, peaks) == 0.5  # 2 s of 4 at peak


def run(*args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=HUNG, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


TINY = [*SHORT, "--res", "32", "--batch-size", "4", "--ckpt-every", "2", "--sample-every", "4",
        "--final-grid"]


def read_log(out, key="loss"):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


@pytest.mark.slow
def test_speed_in_the_log_is_training_time_only(tmp_path, monkeypatch):
    """ms_per_step, and so plot.py's minutes, leave out the wait for the first batch (the data
    workers' start), the steps that compile (the first, and the first with the fake-score term),
    checkpoint writes, grids and evaluations. On a clock that moves only when told, each step takes
    1 s and each of those 1000 s: every window must read 1000 ms."""
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    loader = train.loader

    def slow_start(*args, **kwargs):
        now[0] += 1000.0  # as the loop asks for its first batch
        yield from loader(*args, **kwargs)
    monkeypatch.setattr(train, "loader", slow_start)

    def taking(seconds, fn):
        def wrapped(*args, **kwargs):
            now[0] += seconds(*args, **kwargs) if callable(seconds) else seconds
            return fn(*args, **kwargs)
        return wrapped

    steps = iter(range(12))  # selfe_loss is called once a step; 6: the fake-score term comes on
    def step_time(*args, **kwargs):  # the start-up memory estimate's calls pass no eval_net
        return (1000.0 if next(steps) in (0, 6) else 1.0) if "eval_net" in kwargs else 0.0
    monkeypatch.setattr(selfe, "selfe_loss", taking(step_time, selfe.selfe_loss))
    monkeypatch.setattr(train, "save_checkpoint", taking(1000.0, train.save_checkpoint))
    monkeypatch.setattr(train, "write_grid", taking(1000.0, lambda *args: None))
    monkeypatch.setattr(train, "write_eval", taking(1000.0, lambda *args: None))
    train.main(["--out", str(tmp_path), "--preset", "cpu", "--iters", "12", "--batch-size", "4",
                "--res", "16", "--aux-start", "0.5", "--log-every", "3", "--ckpt-every", "3",
                "--sample-every", "3", "--eval-every", "3", "--final-eval", "off"])
    assert [r["ms_per_step"] for r in read_log(str(tmp_path))] == [1000.0] * 4


@pytest.mark.slow
def test_train_resume_and_sample_on_shapes(tmp_path):
    out = str(tmp_path / "run")
    text = run("train.py", "--out", out, *TINY, "--iters", "4", "--aux-start", "0.5",
               "--eval-every", "2", "--final-eval", "small")
    assert "selfe | model " in text
    assert "GB a step, " in text and " GB once the fake-score pass is on" in text  # from step 2
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    # the few-step score, logged during training; at the last step the final evaluation alone
    (ev,) = read_log(out, "eval_overall")
    assert ev["step"] == 2 and set(ev["eval_overall"]) == set(ev["eval_fd"]) == {"2", "8"}
    assert set(ev["swap_accuracy"]) == set(shapes.SWAPS)  # each kind's (their test: below)
    assert "ShapesEval overall" in text
    # the paper's table in miniature at the end: printed, logged, kept with its grid
    assert "ShapesEval small (96 images per step count), selfe, EMA weights at step 4" in text
    assert all(f"| {k} steps |" in text for k in (2, 4, 8, 50)) and "done in " in text
    (final,) = read_log(out, "final_overall")
    with open(os.path.join(out, "eval", "results.json")) as f:
        res = json.load(f)
    assert final["step"] == res["step"] == 4
    assert set(res["results"]) == set(final["final_overall"]) == {"2", "4", "8", "50"}
    assert all(abs(final["final_overall"][k] - r["overall"]) < 1e-4
               for k, r in res["results"].items())
    assert os.path.exists(os.path.join(out, "eval", "grid.png"))
    assert os.path.exists(os.path.join(out, "samples", "step_000004.png"))
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["batch_size"] == 4

    run("train.py", "--out", out, "--resume", "--iters", "6", "--final-eval", "off")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"]["batch_size"] == 4
    assert ckpt["config"]["aux_start"] == 0.5
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5, 6]

    s = str(tmp_path / "s")
    text = run("sample.py", "--ckpt", os.path.join(out, "ckpt.pt"), "--prompt",
               "a photo of a red circle", "--prompt", "a photo of two squares", "--steps", "1,3",
               "--n", "2", "--out", s)
    assert Image.open(os.path.join(s, "grid.png")).size[1] == 18 + 4 * 96  # 2 prompts x 2 images
    assert len(os.listdir(os.path.join(s, "images"))) == 8
    for steps in ("1 step", "3 steps"):  # the sampling speed of each step count
        assert f"{steps}: 4 images in " in text and "images/s" in text

    e = str(tmp_path / "e")
    text = run("sample.py", "--ckpt", os.path.join(out, "ckpt.pt"), "--eval", "--steps", "1,2",
               "--out", e)
    assert all(k in text for k in ("| 1 steps |", "| 2 steps |", "color_attr", "scene distance"))
    with open(os.path.join(e, "results.json")) as f:
        res = json.load(f)
    assert res["step"] == 6 and res["images_per_step_count"] == 96
    assert set(res["results"]) == {"1", "2"}
    # what drew the table, for whoever reads it later (that the flags arrive: test_wiring.py)
    assert res["sampler"] == dict(cfg=5.0, eta=0.0, s_k="next", uncond_at_t=True, shift=1.0)
    r = res["results"]["2"]
    assert abs(r["overall"] - np.mean([r[t] for t in shapes.TAGS])) < 1e-9


@pytest.mark.slow
def test_fm_and_selfe_differ_only_in_the_objective(tmp_path):
    """Same seed: the same data, weights and noise: before tau opens (step 1) the losses agree."""
    logs = {}
    for method in ("fm", "selfe"):
        out = str(tmp_path / method)
        text = run("train.py", "--out", out, *TINY, "--method", method, "--sample-every",
                   "100", "--batch-size", "16")
        assert "GB a step (estimated" in text  # the fake-score pass: never on in either run
        logs[method] = read_log(out)
    assert logs["fm"][0]["loss"] == logs["selfe"][0]["loss"]
    assert logs["fm"][0]["frac_self"] == 0 and logs["selfe"][1]["frac_self"] > 0


@pytest.mark.slow
def test_a_folder_in_either_layout_trains_on_each_image_with_its_own_caption(tmp_path,
                                                                             monkeypatch):
    imgs = {"a.png": Image.new("RGB", (40, 30), "red"), "b.png": Image.new("L", (30, 50), 200),
            "c.png": Image.new("RGBA", (64, 64), (0, 0, 255, 128))}
    for layout in ("jsonl", "txt"):
        root = tmp_path / layout
        root.mkdir()
        for name, img in imgs.items():
            img.save(root / name)
            if layout == "txt":
                (root / name).with_suffix(".txt").write_text(f"a photo of {name[0]}")
        if layout == "jsonl":
            (root / "metadata.jsonl").write_text(
                "".join(json.dumps({"file_name": n, "text": f"a photo of {n[0]}"}) + "\n"
                        for n in imgs))
    folders = {layout: data.FolderData(str(tmp_path / layout), 16, quiet=True)
               for layout in ("jsonl", "txt")}
    captions = ["a photo of a", "a photo of b", "a photo of c"]
    assert folders["jsonl"].captions == folders["txt"].captions == captions
    assert np.array_equal(folders["jsonl"].images, folders["txt"].images)
    seen, loss = [], selfe.selfe_loss
    monkeypatch.setattr(selfe, "selfe_loss", lambda net, x0, cond, *a, **k: (
        "eval_net" in k and seen.append((x0, cond[2]))) or loss(net, x0, cond, *a, **k))
    train.main(["--out", str(tmp_path / "run"), "--data", str(tmp_path / "jsonl"), *SHORT,
                "--batch-size", "8"])
    images = shapes.to_model(folders["txt"].images)  # (3, 3, 16, 16)
    pooled = text_encoder.TextEncoder("default", 16)(captions)[2]  # (3, 384)
    assert len(seen) == 2
    for x0, rows in seen:  # every row: one of the images, beside its own caption's embedding
        for x, p in zip(x0, rows):
            (i,) = [i for i in range(3) if torch.equal(x, images[i])]
            assert torch.allclose(p, pooled[i], atol=1e-5)


# -------------------------------------------------------------------------------------------------
# Runs: resume keeps a run's identity, a folder holds one run, the log's MFU


def copy_run(run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(run, out)
    return out


def test_a_run_saves_absolute_paths_an_export_and_no_final_grid(folder_run):
    out, data = folder_run
    cfg = checkpoints.read_checkpoint(os.path.join(out, "ckpt.pt"))["config"]
    assert cfg["data"] == data and os.path.isabs(data)  # resumes from any directory
    assert os.listdir(os.path.join(out, "samples")) == []  # --no-final-grid
    assert sorted(os.listdir(os.path.join(out, "model"))) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("flag,value,saved", [("--res", "32", "16"), ("--patch", "2", "4"),
                                              ("--method", "fm", "selfe"),
                                              ("--data", "shapes", None),
                                              ("--text-len", "8", "16"),
                                              ("--text-encoder", "ROOT", "default")])
def test_resume_refuses_to_change_what_defines_the_run(flag, value, saved, folder_run, tmp_path,
                                                       capsys, monkeypatch):
    out = copy_run(folder_run[0], tmp_path)
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    value = ROOT if value == "ROOT" else value
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
    assert checkpoints.read_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 3


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
    cfg = checkpoints.read_checkpoint(os.path.join(out, "ckpt.pt"))["config"]
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


@pytest.mark.parametrize("own", [False, True])
def test_the_log_shows_mfu_for_a_network_with_flops_and_none_without(own, tmp_path, monkeypatch):
    """On a device whose peak is known (here every device, even this CPU) the log shows MFU; a
    network of one's own without .flops trains all the same, with no MFU."""
    monkeypatch.setattr(control, "peak_flops", lambda name: {"bf16": 1e12, "tf32": 1e12})
    if own:
        monkeypatch.setattr(train, "build_model", lambda cfg, dim: StudentNet(
            checkpoints.build_model(cfg, dim)))
    out, pics = str(tmp_path / "run"), image_folder(tmp_path / "pics", ["a.png"])  # one caption
    train.main(["--out", out, "--data", pics, *SHORT, "--iters", "3", "--aux-start", "0"])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert [("mfu" in r) for r in log] == [False, not own, not own]  # step 1 builds: not timed
