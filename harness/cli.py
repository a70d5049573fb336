"""
The command-line contract the scripts share: bad input (a path, a flag, a file) is one line on
stderr that starts with "error:", exit code 2, no traceback, and nothing left behind.
"""
import argparse
import os
import sys


class InputError(ValueError):
    """Bad input from the user: run_cli prints it as one line and exits with code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage first; one line reads better
        raise InputError(f"{message} (see --help)")


def run_cli(main):
    try:
        return main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def check_writable(folder):
    """Make folder, or fail now rather than at the first save an hour from now."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"cannot write to {folder!r} ({e.strerror}); choose another "
                         f"--out") from None
