"""A user's mistake ends every entry point the same way: exit code 2 and one line.

``kdray *`` (kdray/cli.py) and every ``pipelines/*.py`` run their ``main`` through
:func:`run_main`: a bad config value, a malformed data file, an unreadable checkpoint or an
unusable command-line value prints ``<prog>: error: <message>`` on stderr (the message names the
file, the record and the field, or the dotted config key) and returns 2, argparse's code for a
usage error. Anything else is a bug in kdray and keeps its traceback.

The error types are the modules' own (:class:`kdray.config.ConfigError`,
:class:`kdray.data.coco.DataError`, :class:`kdray.train.CheckpointError`, and the registry's
``RegistryError``, a ConfigError); :class:`InputError` is for command-line values that are
neither config nor data.
"""
from __future__ import annotations

import sys

from kdray.config import ConfigError
from kdray.data.coco import DataError


class InputError(ValueError):
    """A command-line value that cannot work: a missing ``--teacher``, an unwritable ``--out``."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's mistake, not kdray's.

    CheckpointError lives in kdray.train, which imports torch: it is only looked up when that
    module is loaded (nothing else can have raised one), so ``kdray eval`` never pays for torch.
    """
    errors: list[type[BaseException]] = [ConfigError, DataError, InputError]
    train = sys.modules.get("kdray.train")
    if train is not None:
        errors.append(train.CheckpointError)
    return tuple(errors)


def _user_error(exc: BaseException) -> BaseException | None:
    """``exc`` or the user error it wraps: Ray re-raises a worker's exception as a RayTaskError
    whose ``cause`` is the original, and Ray Train chains it as ``__cause__``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(cause, user_errors()):
            return cause
        if isinstance(exc, user_errors()):
            return exc
        exc = exc.__cause__
    return None


def run_main(main, argv=None, prog: str = "kdray") -> int:
    """``main(argv)``'s exit code: its int result (0 when it returns anything else, as the
    pipelines return their summary dict), or 2 after printing a user error as one line."""
    try:
        result = main(argv)
    except Exception as exc:
        err = _user_error(exc)
        if err is None:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 2
    return result if isinstance(result, int) else 0
