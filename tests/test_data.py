"""harness/data.py and the run's start-up notes: a folder of captioned images in either layout,
odd and broken files, captions in any encoding, long captions and their fake prompts, a capped
warm-up."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import train
from harness import cli, data, shapes, text_encoder
from conftest import expect_input_error, image_folder, in_ascii_locale


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
    folder = data.FolderData(str(root), 8)
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
    data.FolderData(str(root), 8)
    assert capsys.readouterr().out == f"data: 2 images from {root}; skipped {counts}\n"


def test_a_metadata_line_that_is_not_json_is_named(tmp_path):
    root = image_folder(tmp_path / "data", ["a.png"], caption=False)
    (tmp_path / "data" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\nnot\n')
    with pytest.raises(cli.InputError, match="line 2"):
        data.FolderData(root, 8)


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
    code = (f"from harness import data; print(data.FolderData({root!r}, 8, quiet=True).captions, "
            f"data.FolderData({txt!r}, 8, quiet=True).captions)")
    assert in_ascii_locale(code) == "['un cœur rouge'] ['ein grünes Dreieck']"


def test_a_caption_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    root = image_folder(tmp_path / "latin", ["a.png"], caption=False)
    (tmp_path / "latin" / "a.txt").write_bytes("un c\u0153ur".encode("cp1252"))
    with pytest.raises(cli.InputError, match=r"a\.txt: not UTF-8"):
        data.FolderData(root, 8)


def test_no_usable_image_is_one_line_and_no_progress_bar(tmp_path, capsys):
    root = image_folder(tmp_path / "data", ["a.png", "b.png"], caption=False)
    with pytest.raises(cli.InputError, match="no usable images: 2 without a caption"):
        data.FolderData(root, 8)
    assert capsys.readouterr().err == ""  # the one line is the error's alone


def test_the_hugging_face_imagefolder_layout_with_subfolders(tmp_path, capsys):
    root = tmp_path / "hf"
    image_folder(root / "images", ["x.png", "y.png"], caption=False)
    image_folder(root / "train", ["z.png"], caption=False)
    (root / "metadata.jsonl").write_text('{"file_name": "images/x.png", "text": "an x"}\n'
                                         '{"file_name": "images/y.png", "text": "a y"}\n'
                                         '{"file_name": "images/gone.png", "text": "gone"}\n')
    (root / "train" / "metadata.jsonl").write_text('{"file_name": "z.png", "text": "a z"}\n')
    folder = data.FolderData(str(root), 8)
    assert folder.captions == ["an x", "a y", "a z"] and len(folder.images) == 3
    assert "; 1 captions name no image here (e.g. images/gone.png)" in capsys.readouterr().out


def test_long_captions_are_reported_once_and_grid_labels_cut(tmp_path, capsys):
    text = text_encoder.TextEncoder("default", 16)
    cfg = {**train.DEFAULTS, **train.PRESETS["cpu"], "aux_start": 1.0}
    long = "a photo of " + "a very red circle " * 100
    train.print_notes(cfg, text, ["a red circle", long, long])
    notes = capsys.readouterr().out
    assert notes.count("\n") == 1 and "captions: 1 of 2 are longer than --text-len 16" in notes
    train.print_notes({**cfg, "aux_start": 0.5}, text, ["a red circle", long, long])
    notes = capsys.readouterr().out  # with the fake-score term, the fake prompts cut to fit
    assert notes.count("\n") == 2 and ("fake prompts: 1 of 2 captions give up their last tokens "
                                       "so that the fake prompt keeps \"fake image\"") in notes
    images = {2: torch.zeros(2, 3, 8, 8)}
    shapes.save_grid(images, ["a red circle", long], str(tmp_path / "grid.png"))
    assert Image.open(tmp_path / "grid.png").width < 700  # not as wide as the caption


def test_the_warm_up_is_capped_at_a_share_of_a_short_run(capsys):
    cfg = {**train.DEFAULTS, **train.PRESETS["cpu"], "iters": 30}  # warm-up 100
    assert train.warmup_steps(cfg) == 3 and train.lr_at(2, cfg) == cfg["lr"]
    train.print_notes(cfg, text_encoder.TextEncoder("default", 16), ["a red circle"])
    assert "warm-up: 3 steps (--warmup 100 is capped at 10% of --iters 30)" in (
        capsys.readouterr().out)
    default = {**cfg, "iters": 2600}
    assert train.warmup_steps(default) == 100  # the presets' warm-ups are below the cap
