"""What the test files in tests/ share: the CLI contract's check, a folder of captioned images,
an export, the short run's flags and two such runs (on the shapes world and on a folder), a Python
in a plain-ASCII locale, a network of one's own; and, from test_selfe.py, where selfe.py's tests
define them, the stub networks and selfe.py's loss with the paper's settings unless told
otherwise."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
import train  # noqa: E402
from harness import checkpoints, cli  # noqa: E402
from test_selfe import LinearNet, Recorder, loss_with, one, rows, trained_like  # noqa: E402, F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
HUNG = 1800  # seconds: the limit of a subprocess's wait, which only a hung process reaches, even
# on a machine busy with other work (a 120-step run took over 10 minutes beside 4 such processes)


def expect_input_error(main, argv, capsys, monkeypatch):
    """Run a CLI in-process as its __main__ does; -> its stderr's last line, after checking the
    contract for bad input: one line that starts with "error:", exit code 2, no traceback."""
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    with pytest.raises(SystemExit) as e:
        cli.run_cli(main)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # a progress bar may come before it
    assert e.value.code == 2 and last.startswith("error: ") and "Traceback" not in err, err
    return last


def image_folder(root, names, caption=True):
    """root (a Path) with a 20 px red image per name and, if caption, NAME.txt beside it."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (20, 20), "red").save(root / name)
        if caption:
            (root / name).with_suffix(".txt").write_text("a photo of a red square")
    return str(root)


def export_model(folder, seed=0, **changes):
    """An export (no training) of a res-16 model, config as the cpu preset gives it, made by
    trained_like from the weights torch draws at `seed`: another seed, other weights."""
    cfg = {**train.DEFAULTS, **train.PRESETS["cpu"], "res": 16, **changes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = trained_like(checkpoints.build_model(cfg, 384))
    checkpoints.export_ema(str(folder), net, cfg, 0, 384)
    return str(folder)


def in_ascii_locale(code):
    """-> what `python -c code` prints in a plain-ASCII locale with no UTF-8 mode."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, encoding="utf-8")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


# The short run: two steps on 2 rows at 16 px, nothing scored or drawn. A test adds what it needs
# (flags given later win: more --iters, a final grid, the fake-score term).
SHORT = ["--preset", "cpu", "--iters", "2", "--batch-size", "2", "--res", "16", "--log-every", "1",
         "--eval-every", "0", "--sample-every", "100000", "--no-final-grid", "--final-eval", "off"]


@pytest.fixture(scope="session")
def shapes_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes") / "run")
    train.main(["--out", out, *SHORT])
    return out


@pytest.fixture(scope="session")
def folder_run(tmp_path_factory):
    """A run on a folder of two images, both given by relative paths; -> (its folder, the data
    folder's absolute path). Tests that change the run copy it first."""
    root = tmp_path_factory.mktemp("lecture")
    image_folder(root / "pics", ["a.png", "b.png"])
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train.main(["--out", "run", "--data", "pics", *SHORT])
    finally:
        os.chdir(cwd)
    return str(root / "run"), str(root / "pics")


class StudentNet(nn.Module):
    """A network of one's own: the contract of checkpoints.build_model, without .flops."""

    def __init__(self, net):
        super().__init__()
        self.net, self.res, self.channels = net, net.res, net.channels

    def forward(self, x, t, s, cond):
        return self.net(x, t, s, cond)
