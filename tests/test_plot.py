"""plot.py: each run's loss and scores drawn where they belong."""
import json
import sys

import pytest
from PIL import Image

from harness import cli, shapes
from conftest import expect_input_error


def pixel(x, y, top=1.0):
    """Where plot.py draws the point at x (a share of the x axis) and y (axis from 0 to top)."""
    from tools import plot
    return (round(plot.LEFT + (plot.W - plot.LEFT - plot.RIGHT) * x),
            round(plot.H - plot.BOTTOM - (plot.H - plot.TOP - plot.BOTTOM) * y / top))


def test_plot_draws_the_loss_of_any_run_on_an_axis_that_holds_it(tmp_path, capsys, monkeypatch):
    from tools import plot
    log = tmp_path / "log.jsonl"  # a run on one's own data: losses, no ShapesEval score
    log.write_text("".join(json.dumps({"step": k, "loss": v}) + "\n"
                           for k, v in ((10, 0.8), (20, None), (30, 1.7), (40, 0.3))))
    assert "--y loss draws any run" in expect_input_error(
        plot.main, [str(log), "--out", str(tmp_path / "x.png")], capsys, monkeypatch)
    monkeypatch.setattr(sys, "argv", ["plot.py", str(log), "--y", "loss", "--out",
                                      str(tmp_path / "loss.png")])
    plot.main()
    img = Image.open(tmp_path / "loss.png").convert("RGB")
    for it, v in ((10, 0.8), (30, 1.7), (40, 0.3)):  # the axis runs to 2, the next round number
        assert img.getpixel(pixel(it / 40, v, top=2.0)) == plot.COLORS[0], (it, v)
    assert img.getpixel(pixel(20 / 40, 0, top=2.0)) != plot.COLORS[0]  # a skipped window: none


def test_plot_draws_each_runs_scores_where_they_belong(tmp_path, capsys, monkeypatch):
    from tools import plot
    logs = {}
    for name, scores in (("fm", [0.1, 0.2, 0.3]), ("selfe", [0.4, 0.6, 0.8])):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "log.jsonl", "w") as f:
            f.write(json.dumps({"step": 1, "loss": 1.0}) + "\n")  # other records are skipped
            for i, v in enumerate(scores):
                rec = {"step": 500 * (i + 1), "eval_overall": {"2": v, "8": v / 2}}
                f.write(json.dumps(rec) + "\n")
        logs[name] = str(tmp_path / name / "log.jsonl")
    out = str(tmp_path / "curve.png")
    monkeypatch.setattr(sys, "argv", ["plot.py", *logs.values(), "--out", out])
    plot.main()
    img = Image.open(out).convert("RGB")
    assert img.size == (plot.W, plot.H)  # short labels: the legend fits the right margin
    for color, pts in ((plot.COLORS[0], [(500, 0.1), (1500, 0.3), (1000, 0.1)]),
                       (plot.COLORS[1], [(500, 0.4), (1500, 0.8), (1000, 0.3)])):
        for it, v in pts:  # each point's marker, in its run's colour, at 2 steps and at 8
            assert img.getpixel(pixel(it / 1500, v)) == color, (it, v)
    assert img.getpixel(pixel(1000 / 1500, 0.5)) == (255, 255, 255)  # nothing where none scored
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    monkeypatch.setattr(sys, "argv", ["plot.py", str(empty)])
    with pytest.raises(SystemExit) as e:
        cli.run_cli(plot.main)
    assert e.value.code == 2 and "no ShapesEval scores" in capsys.readouterr().err


def test_plot_draws_the_mean_swap_accuracy(tmp_path, monkeypatch):
    from tools import plot
    log = tmp_path / "log.jsonl"
    with open(log, "w") as f:
        for step, acc in ((500, [0.5, 0.7, 0.5, 0.5]), (1000, [0.9, 0.9, 0.7, 0.5])):
            rec = {"step": step, "swap_accuracy": dict(zip(shapes.SWAPS, acc))}
            f.write(json.dumps(rec) + "\n")
    assert plot.read_curves(str(log), y="swaps") == {"swap accuracy": [(500, 0.55), (1000, 0.75)]}
    monkeypatch.setattr(sys, "argv", ["plot.py", str(log), "--y", "swaps", "--out",
                                      str(tmp_path / "swaps.png")])
    plot.main()
    img = Image.open(tmp_path / "swaps.png").convert("RGB")
    assert img.getpixel(pixel(0.5, 0.55)) == img.getpixel(pixel(1, 0.75)) == plot.COLORS[0]


def test_plot_against_minutes_places_scores_at_the_training_time_spent(tmp_path, capsys,
                                                                      monkeypatch):
    from tools import plot
    logs = {}
    for name, ms in (("fm", [60, 120, 60]), ("selfe", [120, 240, 120])):  # ms/step, 500 steps each
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "log.jsonl", "w") as f:
            for i, m in enumerate(ms):
                f.write(json.dumps({"step": 500 * (i + 1), "ms_per_step": m}) + "\n")
                rec = {"step": 500 * (i + 1), "eval_overall": {"2": 0.2 * (i + 1), "8": 0.1}}
                f.write(json.dumps(rec) + "\n")
        logs[name] = str(tmp_path / name / "log.jsonl")
    out = str(tmp_path / "curve.png")
    monkeypatch.setattr(sys, "argv", ["plot.py", *logs.values(), "--x", "minutes", "--out", out])
    plot.main()
    img = Image.open(out).convert("RGB")
    # x spans selfe's 4 minutes. fm: 500 steps at 60 ms = 0.5 min, then 1.0 more, then 0.5 more;
    # selfe twice as long at every point
    for color, minutes in ((plot.COLORS[0], [0.5, 1.5, 2.0]), (plot.COLORS[1], [1.0, 3.0, 4.0])):
        for i, m in enumerate(minutes):
            assert img.getpixel(pixel(m / 4, 0.2 * (i + 1))) == color, (color, m)
    assert plot.training_minutes({500: 60, 1000: 120})(750) == 1.0  # 0.5 min, then half of 1.0
    untimed = tmp_path / "untimed.jsonl"
    untimed.write_text(json.dumps({"step": 500, "eval_overall": {"2": 0.1, "8": 0.1}}) + "\n")
    monkeypatch.setattr(sys, "argv", ["plot.py", str(untimed), "--x", "minutes"])
    with pytest.raises(SystemExit) as e:
        cli.run_cli(plot.main)
    assert e.value.code == 2 and "no ms_per_step records" in capsys.readouterr().err
