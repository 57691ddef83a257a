"""hawq: Hessian-aware mixed-precision quantization for PyTorch."""

import difflib
from collections.abc import Iterable

__version__ = "0.1.0"


class HawqError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""


def bars_off(progress: bool) -> bool | None:
    """tqdm's ``disable`` for a progress flag: off when not asked for, and when asked for, ``None``, which
    tqdm reads as "only on a terminal" (a run redirected to a log file or captured stays quiet)."""
    return None if progress else True


def did_you_mean(word: object, choices: Iterable[object], prefix: str = "") -> str:
    """`` (did you mean '<prefix><closest>'?)`` for the closest of ``choices`` to ``word``, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""
