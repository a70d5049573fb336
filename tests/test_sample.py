"""sample.py and the EMA export: every flag checked against its help, names that sort, exports
that load (and give the checkpoint's images bit for bit) or fail in one line.

Bad input follows the CLI contract: one line on stderr that starts with "error:", exit code 2, no
traceback, and no --out folder left behind.
"""
import json
import os
import shutil
import sys

import pytest
import torch
from PIL import Image

import sample
from harness import checkpoints, cli, draw, text_encoder
from conftest import expect_input_error, export_model, in_ascii_locale


def run_sample(argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sample.py", *argv])
    sample.main()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return export_model(tmp_path_factory.mktemp("export") / "model")


# -------------------------------------------------------------------------------------------------
# 1. Bad flags: one line, exit code 2, nothing written


def bad_input_case(case, tmp_path):
    """-> (argv, expected words) for one bad input; files it needs are made in tmp_path."""
    run = tmp_path / "run"
    if case in ("run_folder", "empty_folder"):
        run.mkdir()
    if case == "run_folder":
        (run / "ckpt.pt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 sign\n".encode("latin-1"))
    return {
        "s_k_0": (["--s-k", "0"], "--s-k '0': 'next' or a number in (0, 1]"),
        "s_k_5": (["--s-k", "5"], "(0, 1]"),
        "s_k_negative": (["--s-k=-1"], "(0, 1]"),
        "s_k_nan": (["--s-k", "nan"], "(0, 1]"),
        "cfg_negative": (["--cfg=-1"], ">= 0"),
        "cfg_nan": (["--cfg", "nan"], ">= 0"),
        "cfg_inf": (["--cfg", "inf"], ">= 0"),
        "eta_above": (["--eta", "1.5"], "[0, 1]"),
        "eta_below": (["--eta=-0.1"], "[0, 1]"),
        "n_0": (["--n", "0"], "at least 1"),
        "seed_negative": (["--seed=-1"], "[0, 2^63)"),
        "seed_huge": (["--seed", str(2**64)], "[0, 2^63)"),
        "steps_empty_item": (["--steps", "4,,2"], "whole numbers"),
        "steps_0": (["--steps", "0"], "at least 1"),
        "steps_word": (["--steps", "2,x"], "whole numbers"),
        "s_k_word": (["--s-k", "half"], "--s-k 'half'"),
        "no_prompt": ([], "give at least one --prompt"),
        "device_nonsense": (["--device", "gpu0"], "--device 'gpu0': torch cannot use it"),
        "device_meta": (["--device", "meta"], "torch cannot use it"),
        "device_cuda": (["--device", "cuda"], "torch cannot use it"),
        "prompts_not_utf8": (["--prompts", str(tmp_path / "latin1.txt")], "not UTF-8"),
        "prompts_missing": (["--prompts", str(tmp_path / "none.txt")], "No such file"),
        "run_folder": (["--ckpt", str(run)], (
            f"{str(run)!r} is a folder but not an export: --ckpt expects a ckpt.pt written by "
            f"train.py or an exported folder (config.json + model.safetensors); did you mean "
            f"{run / 'ckpt.pt'}?")),
        "empty_folder": (["--ckpt", str(run)], checkpoints.CKPT_EXPECTED),
    }[case]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there")


@pytest.mark.parametrize("case", [
    "s_k_0", "s_k_5", "s_k_negative", "s_k_nan", "cfg_negative", "cfg_nan", "cfg_inf",
    "eta_above", "eta_below", "n_0", "seed_negative", "seed_huge", "steps_empty_item", "steps_0",
    "steps_word", "s_k_word", "no_prompt", "device_nonsense", "device_meta",
    pytest.param("device_cuda", marks=NO_CUDA),
    "prompts_not_utf8", "prompts_missing", "run_folder", "empty_folder"])
def test_bad_flags_are_one_line_and_exit_2(case, tmp_path, capsys, monkeypatch):
    argv, expected = bad_input_case(case, tmp_path)
    out = tmp_path / "s"
    prompt = [] if case == "no_prompt" else ["--prompt", "x"]
    argv = ["--ckpt", str(tmp_path / "unused.pt"), *prompt, "--out", str(out), *argv]
    assert expected in expect_input_error(sample.main, argv, capsys, monkeypatch)
    assert not out.exists()


# -------------------------------------------------------------------------------------------------
# 2. The export: small, whole or refused


def test_export_of_the_cpu_default_model_is_under_10_mb_and_loads_bit_for_bit(tmp_path):
    cfg = {"model": "tiny", "res": 32, "patch": 4, "data": "shapes"}
    torch.manual_seed(0)
    net = checkpoints.build_model(cfg, 384)
    for p in net.parameters():  # every weight nonzero: a zero-initialised layer proves nothing
        torch.nn.init.normal_(p)
    checkpoints.export_ema(str(tmp_path / "model"), net, cfg, 7, 384)
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors"]
    assert os.path.getsize(tmp_path / "model" / "model.safetensors") < 10e6
    loaded, config, step = checkpoints.load_checkpoint(str(tmp_path / "model"))
    assert step == 7 and config == {**checkpoints.BEFORE_KEY, **cfg} and not loaded.training
    state = loaded.state_dict()
    assert all(v.dtype == torch.float32 and torch.equal(v, state[k])
               for k, v in net.state_dict().items())
    with open(tmp_path / "model" / "config.json") as f:
        saved = json.load(f)
    assert saved["format"] == "selfe-ema" and saved["text_dim"] == 384 and saved["step"] == 7


def damage(folder, case, other):
    """Damage the export in folder (a Path) one way; other is a second, different export."""
    config, weights = folder / "config.json", folder / "model.safetensors"
    if case == "config_not_json":
        config.write_text('{"format": "selfe-ema", "st')
    if case == "config_foreign":  # a transformers model's config.json
        config.write_text(json.dumps({"model_type": "bert", "hidden_size": 384}))
    if case == "config_lacks_keys":
        config.write_text(json.dumps({"format": "selfe-ema", "model": "tiny"}))
    if case == "config_not_utf8":
        config.write_bytes(b'{"format": "\xff"}')
    if case == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[:100_000])
    if case == "weights_of_another_export":
        shutil.copy(os.path.join(other, "model.safetensors"), weights)
    if case == "weights_missing":
        weights.unlink()


@pytest.mark.parametrize("case,expected", [
    ("config_not_json", "is not readable JSON"), ("config_foreign", "not a Self-E export"),
    ("config_lacks_keys", "is damaged: it lacks ['step', 'text_dim', 'weights_sha256']"),
    ("config_not_utf8", "is not readable JSON"),
    ("weights_truncated", "is not the file"), ("weights_of_another_export", "is not the file"),
    ("weights_missing", "is a folder but not an export")])
def test_a_damaged_or_foreign_export_is_one_line(case, expected, export, tmp_path, capsys,
                                                 monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(export, folder)
    damage(folder, case, export_model(tmp_path / "other", seed=1))
    argv = ["--ckpt", str(folder), "--prompt", "x", "--out", str(tmp_path / "s")]
    assert expected in expect_input_error(sample.main, argv, capsys, monkeypatch)
    assert not os.path.exists(tmp_path / "s")


def test_a_kill_between_the_renames_leaves_no_pair_that_loads(tmp_path, monkeypatch):
    folder = export_model(tmp_path / "model")
    replace, renamed = os.replace, []

    def killed_before_config(src, dst):
        if dst.endswith("config.json"):
            raise KeyboardInterrupt  # stands in for kill -9 between the two renames
        renamed.append(dst)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_config)
    with pytest.raises(KeyboardInterrupt):
        export_model(tmp_path / "model", seed=1)
    assert renamed == [os.path.join(folder, "model.safetensors")]  # new weights, old config
    with pytest.raises(cli.InputError, match="is not the file"):
        checkpoints.load_checkpoint(folder)
    monkeypatch.setattr(os, "replace", replace)
    export_model(tmp_path / "model", seed=1)  # the next save makes it whole again
    checkpoints.load_checkpoint(folder)


# -------------------------------------------------------------------------------------------------
# 3. Sampling: step counts once, names that sort, prompts files, text encoders


def test_duplicate_step_counts_are_drawn_once(export, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    run_sample(["--ckpt", export, "--prompt", "a red circle", "--steps", "4,2,4",
                "--out", str(out)], monkeypatch)
    printed = capsys.readouterr().out
    assert sample.parse_steps("4,2,4") == [4, 2]
    assert printed.count("4 steps:") == 1 and "and 2 images" in printed
    names = ["000_00_2steps_a-red-circle.png", "000_00_4steps_a-red-circle.png"]
    assert sorted(os.listdir(out / "images")) == names
    two, four = (Image.open(out / "images" / n).tobytes() for n in names)
    assert two != four  # each drawn at its own step count


def test_image_names_sort_in_order_for_any_count():
    def names(prompts, n, steps_list):
        largest = (prompts - 1, n - 1, max(steps_list))
        return [sample.image_name("a b", p, k, s, largest)
                for p in range(prompts) for k in range(n) for s in sorted(steps_list)]
    for prompts, n, steps_list in [(1, 1, [2]), (1001, 3, [1]), (2, 101, [50, 2, 8]),
                                   (12, 1000, [100, 9])]:
        made = names(prompts, n, steps_list)
        assert sorted(made) == made and len(set(made)) == len(made)
    assert names(1, 1, [2, 50]) == ["000_00_02steps_a-b.png", "000_00_50steps_a-b.png"]


def test_101_images_per_prompt_are_written_in_sorted_order(export, tmp_path, monkeypatch):
    out = tmp_path / "s"
    run_sample(["--ckpt", export, "--prompt", "a", "--prompt", "b", "--n", "101",
                "--steps", "1", "--out", str(out)], monkeypatch)
    files = sorted(os.listdir(out / "images"))
    assert files == [f"{p:03d}_{k:03d}_1steps_{w}.png" for p, w in enumerate("ab")
                     for k in range(101)]


def test_a_prompts_file_is_utf_8_with_or_without_a_bom_in_any_locale(tmp_path):
    """Read by a Python whose locale is plain ASCII: the prompts still come out whole."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("un cœur rouge\n\n  a red circle \n", encoding="utf-8-sig")  # Notepad's
    code = ("import argparse, sample; print(sample.read_prompts(argparse.Namespace(prompt=['x'], "
            f"prompts={str(prompts)!r}, eval=False)))")
    assert in_ascii_locale(code) == "['x', 'un cœur rouge', 'a red circle']"


def test_the_empty_prompt_samples_unprompted(export, tmp_path, monkeypatch):
    drawn = []
    for prompt, name in (("", "000_00_1steps_.png"), ("a red circle",
                                                      "000_00_1steps_a-red-circle.png")):
        run_sample(["--ckpt", export, "--prompt", prompt, "--steps", "1", "--out",
                    str(tmp_path / name)], monkeypatch)
        assert os.listdir(tmp_path / name / "images") == [name]
        drawn.append(Image.open(tmp_path / name / "images" / name).tobytes())
    assert drawn[0] != drawn[1]  # the same seed and noise, another condition


def set_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    config = {**json.load(open(path)), **changes}
    json.dump(config, open(path, "w"))


def test_a_missing_text_encoder_folder_names_the_flag(export, tmp_path, capsys,
                                                      monkeypatch):
    folder = str(tmp_path / "model")
    shutil.copytree(export, folder)
    gone = str(tmp_path / "elsewhere" / "minilm")
    set_config(folder, text_encoder=gone)  # config.json may be edited: the hash covers weights
    line = expect_input_error(sample.main, ["--ckpt", folder, "--prompt", "x", "--out",
                                            str(tmp_path / "s")], capsys, monkeypatch)
    assert line == (f"error: the run's text encoder {gone!r} is a folder that is not on this "
                    f"machine (trained elsewhere?): pass --text-encoder with a copy of it, a "
                    f"folder or a Hugging Face id")
    assert not os.path.exists(tmp_path / "s")


def test_a_text_encoder_of_another_width_is_refused(export, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer, BertConfig, BertModel
    enc = str(tmp_path / "narrow")
    tokenizer = AutoTokenizer.from_pretrained(text_encoder.resolve_text_encoder("default"))
    tokenizer.save_pretrained(enc)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(enc)
    argv = ["--ckpt", export, "--prompt", "x", "--text-encoder", enc, "--out",
            str(tmp_path / "s")]
    assert (f"--text-encoder {enc!r} gives 32-wide tokens; {export!r} was trained on 384-wide "
            f"ones from 'default'") in expect_input_error(sample.main, argv, capsys, monkeypatch)
    assert not os.path.exists(tmp_path / "s")


# -------------------------------------------------------------------------------------------------
# 4. On trained runs


@pytest.mark.slow
def test_the_export_gives_the_checkpoints_images_bit_for_bit(shapes_run):
    load = checkpoints.load_checkpoint
    from_ckpt, cfg, step = load(os.path.join(shapes_run, "ckpt.pt"))
    from_export, cfg_export, step_export = load(os.path.join(shapes_run, "model"))
    assert (cfg, step) == (cfg_export, step_export) and step == 2
    text = text_encoder.TextEncoder(cfg["text_encoder"], cfg["text_len"])
    prompts = ["a photo of a red circle", "a photo of two blue squares"]
    eta_1 = draw.sampler_of(cfg, eta=1.0)
    a = draw.generate(from_ckpt, text, prompts, [1, 2, 8], 3, 1.0, eta_1)
    b = draw.generate(from_export, text, prompts, [1, 2, 8], 3, 1.0, eta_1)
    untrained = draw.generate(checkpoints.build_model(cfg, text.dim).eval(), text, prompts,
                                     [2], 3, 1.0, eta_1)
    assert not torch.equal(a[2], untrained[2])  # it trained: the weights make a difference
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_text_encoder_override_gives_the_runs_images(shapes_run, tmp_path, capsys, monkeypatch):
    """An export handed to a machine without the run's encoder folder: refused in one line, then
    sampled with --text-encoder, the same images as the run's own."""
    handed = str(tmp_path / "handed")
    shutil.copytree(os.path.join(shapes_run, "model"), handed)
    set_config(handed, text_encoder=str(tmp_path / "their" / "encoder"))
    argv = ["--ckpt", handed, "--prompt", "a photo of a red circle", "--steps", "2"]
    assert "pass --text-encoder" in expect_input_error(
        sample.main, [*argv, "--out", str(tmp_path / "h")], capsys, monkeypatch)
    run_sample([*argv, "--text-encoder", str(text_encoder.resolve_text_encoder("default")),
                "--out", str(tmp_path / "h")], monkeypatch)
    run_sample(["--ckpt", os.path.join(shapes_run, "ckpt.pt"), *argv[2:],
                "--out", str(tmp_path / "own")], monkeypatch)
    name = "000_00_2steps_a-photo-of-a-red-circle.png"
    pixels = [Image.open(tmp_path / o / "images" / name).tobytes() for o in ("h", "own")]
    assert pixels[0] == pixels[1]


@pytest.mark.slow
def test_eval_is_refused_on_a_run_trained_on_folder_data(folder_run, tmp_path, capsys,
                                                         monkeypatch):
    run = folder_run[0]
    for ckpt in (os.path.join(run, "ckpt.pt"), os.path.join(run, "model")):
        line = expect_input_error(sample.main, ["--ckpt", ckpt, "--eval", "--out",
                                                str(tmp_path / "e")], capsys, monkeypatch)
        assert "was trained on '" in line and "ShapesEval judges the shapes world only" in line
        assert not os.path.exists(tmp_path / "e")
