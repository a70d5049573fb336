"""The code's shape: the top level is the card; scripts never import scripts (nor results/'s or the
tests); the harness imports selfe.py and itself alone; selfe.py imports torch and the standard
library alone; test_selfe.py needs selfe.py and toy.py alone; no test module imports another;
files a reader finishes, short lines, no path of one machine."""
import ast
import glob
import os
import re
import subprocess
import sys

from conftest import ROOT

# the card's six files, the demo, what conventions need, and the folders
TOP = {"selfe.py", "train.py", "sample.py", "test_selfe.py", "README.md", "requirements.txt",
       "toy.py", "LICENSE", "pytest.ini", ".gitignore", ".ci", "harness", "tests", "tools",
       "results", "assets"}
SCRIPTS = ["train.py", "sample.py", "toy.py", "tools/plot.py",
           *glob.glob("results/*.py", root_dir=ROOT)]
HARNESS = glob.glob("harness/*.py", root_dir=ROOT)
TESTS = ["test_selfe.py", *glob.glob("tests/*.py", root_dir=ROOT)]
PYTHON = [*SCRIPTS, *HARNESS, *TESTS, "selfe.py"]


def tracked(*patterns):
    return subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.split()


def module(path):
    """tools/plot.py -> plot, harness/cli.py -> harness.cli: the name it is imported by."""
    name = os.path.splitext(path)[0].replace("/", ".")
    return name if name.startswith("harness.") else name.split(".")[-1]


def imports(path):
    """The repository's modules that path imports (harness's own relative imports included)."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "harness." * (node.level > 0) + (node.module or "")
            names |= {base, *(f"{base}.{a.name}" for a in node.names)}
    return names & ({module(p) for p in PYTHON} | {"harness", "conftest"})


def test_the_top_level_is_the_card():
    assert {path.split("/")[0] for path in tracked()} == TOP


def test_scripts_import_selfe_and_the_harness_only_and_toy_selfe_alone():
    for path in SCRIPTS:
        assert all(name == "selfe" or name.startswith("harness") for name in imports(path)), path
    assert imports("toy.py") == {"selfe"}


def test_the_harness_imports_selfe_and_itself_alone():
    for path in HARNESS:
        assert all(name == "selfe" or name.startswith("harness.") for name in imports(path)), path


def test_selfe_py_imports_torch_and_the_standard_library_alone():
    tree = ast.parse(open(os.path.join(ROOT, "selfe.py")).read())
    roots = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for a in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom)}
    assert roots - set(sys.stdlib_module_names) == {"torch"}


def test_test_selfe_needs_selfe_and_toy_alone_and_no_test_imports_another():
    """test_selfe.py runs beside selfe.py and toy.py in an empty folder; tests/ shares through
    conftest.py, which takes the stub networks from test_selfe.py."""
    assert imports("test_selfe.py") == {"selfe", "toy"}
    tests = {module(p) for p in TESTS} - {"conftest"}
    for path in TESTS:
        allowed = {"test_selfe"} if path.endswith("conftest.py") else set()
        assert imports(path) & tests <= allowed, path


def test_files_a_reader_finishes():
    lines = {path: len(open(os.path.join(ROOT, path)).readlines()) for path in PYTHON}
    assert lines["selfe.py"] <= 420 and lines["train.py"] <= 500, lines
    assert all(n <= 600 for n in lines.values()), lines


def test_code_lines_are_at_most_100_characters():
    for path in PYTHON:
        long = [i for i, line in enumerate(open(os.path.join(ROOT, path)), 1)
                if len(line.rstrip("\n")) > 100]
        assert not long, (path, long)


def test_no_file_names_a_path_of_one_machine():
    """Commands are written from the repository's root: no home, temporary or work folder of the
    machine they were run on, in any tracked code or page."""
    machine = re.compile(r"(^|[^\w.])/(work|tmp|root|home|Users|farm)/")
    named = [f for f in tracked("*.py", "*.md", "*.sh", ".ci/*")
             if machine.search(open(os.path.join(ROOT, f), encoding="utf-8").read())]
    assert not named, named
