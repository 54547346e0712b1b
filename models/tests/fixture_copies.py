"""What the plain-script tests of models/ share: a named check and a copy of the tiny bundle."""

import os
import shutil

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "tiny")


def check(cond, what):
    """Prints `ok: what`, or exits with `FAIL: what`."""
    if not cond:
        raise SystemExit(f"FAIL: {what}")
    print(f"ok: {what}")


def copy_tiny(tmp, name):
    """A copy of models/fixtures/tiny (without its golden cases) as tmp/name."""
    dst = os.path.join(tmp, name)
    shutil.copytree(TINY, dst, ignore=shutil.ignore_patterns("golden"))
    return dst
