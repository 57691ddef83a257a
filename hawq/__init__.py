"""hawq: Hessian-aware mixed-precision quantization for PyTorch."""

import difflib
from collections.abc import Iterable

__version__ = "0.1.0"


class HawqError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""


def did_you_mean(word: object, choices: Iterable[object], prefix: str = "") -> str:
    """`` (did you mean '<prefix><closest>'?)`` for the closest of ``choices`` to ``word``, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""
