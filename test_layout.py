"""The code's shape: scripts never import scripts (nor results/'s or the tests), selfe.py imports
torch and the standard library alone, no test module imports another, files a reader finishes,
short lines, no path of one machine."""
import ast
import glob
import os
import re
import subprocess
import sys

from conftest import HERE


SCRIPTS = ("train", "sample", "plot", "toy")
LOCAL = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py"))}
TESTS = {m for m in LOCAL if m.startswith("test_")}
RESULTS = glob.glob(os.path.join(HERE, "results", "*.py"))


def imports(path):
    tree = ast.parse(open(path).read())
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


def test_scripts_import_library_modules_only_and_toy_needs_selfe_only():
    results = {os.path.basename(p)[:-3] for p in RESULTS}
    for path in [*(os.path.join(HERE, s + ".py") for s in SCRIPTS), *RESULTS]:
        mine = imports(path) & (LOCAL | results)
        assert not mine & {*SCRIPTS, *TESTS, *results, "conftest"}, (path, mine)
    assert imports(os.path.join(HERE, "toy.py")) & LOCAL == {"selfe"}


def test_selfe_py_imports_torch_and_the_standard_library_alone():
    roots = {name.split(".")[0] for name in imports(os.path.join(HERE, "selfe.py"))}
    assert roots - set(sys.stdlib_module_names) == {"torch"}


def test_no_test_module_imports_another():
    for test in TESTS:
        assert not imports(os.path.join(HERE, test + ".py")) & TESTS, test


def test_files_a_reader_finishes():
    lines = {os.path.basename(p): len(open(p).readlines())
             for p in glob.glob(os.path.join(HERE, "*.py"))}
    assert lines["selfe.py"] <= 420 and lines["train.py"] <= 500, lines
    assert all(n <= 600 for n in lines.values()), lines


def test_code_lines_are_at_most_100_characters():
    for path in glob.glob(os.path.join(HERE, "*.py")) + RESULTS:
        long = [i for i, line in enumerate(open(path), 1) if len(line.rstrip("\n")) > 100]
        assert not long, (os.path.basename(path), long)


def test_no_file_names_a_path_of_one_machine():
    """Commands are written from the repository's root: no home, temporary or work folder of the
    machine they were run on, in any tracked code or page."""
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.sh", ".ci/*"], cwd=HERE,
                           capture_output=True, text=True, check=True).stdout.split()
    machine = re.compile(r"(^|[^\w.])/(work|tmp|root|home|Users|farm)/")
    named = [f for f in files
             if machine.search(open(os.path.join(HERE, f), encoding="utf-8").read())]
    assert not named, named
