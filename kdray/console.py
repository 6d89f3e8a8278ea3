"""What kdray prints: its own progress and results; third-party chatter only with ``--verbose``.

``--verbose`` (every ``kdray`` command and pipeline) sets ``$KDRAY_VERBOSE=1``; Ray workers
inherit it through the job's environment, so a worker silences pycocotools' tables the same way
the driver does.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys

VERBOSE_ENV = "KDRAY_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    os.environ[VERBOSE_ENV] = "1" if on else "0"


@contextlib.contextmanager
def quiet_stdout():
    """Swallow what a library prints to stdout (pycocotools' summary tables) unless verbose."""
    if verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def log(msg: str) -> None:
    """One kdray line on stderr (stdout is kept for the final JSON line)."""
    print(f"[kdray] {msg}", file=sys.stderr, flush=True)
