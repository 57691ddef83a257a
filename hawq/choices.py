"""Enum-like settings: one check for a value that must be one of a ``Literal[...]``'s values.

The config coercer (:mod:`hawq.config`) applies it to every ``Literal``-typed field of a YAML
config; :func:`check_literals` applies it to a dataclass built in code; the public functions
that take such a value (e.g. :func:`hawq.sensitivity.hessian_traces`) call :func:`check_choice`
with the same ``Literal`` alias, so the allowed values are written once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, Union

from hawq import HawqError, did_you_mean


def choices_of(tp: Any) -> tuple[Any, ...]:
    """The values of a ``Literal[...]`` alias."""
    return typing.get_args(tp)


def check_choice(value: Any, choices: Any, key: str) -> Any:
    """``value`` when it is one of ``choices`` (a ``Literal`` alias or an iterable; ``True`` is not
    ``1``), else a one-line HawqError naming ``key``, the allowed values and the closest one."""
    allowed = choices_of(choices) if typing.get_origin(choices) is Literal else tuple(choices)
    if any(value == a and type(value) is type(a) for a in allowed):
        return value
    raise HawqError(f"{key} must be {_alternatives(allowed)}, got {value!r}{did_you_mean(value, allowed)}")


def _alternatives(allowed: Iterable[Any]) -> str:
    quoted = [repr(a) for a in allowed]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _literal_in(tp: Any) -> tuple[Any, bool] | None:
    """(the Literal inside ``tp``, whether ``tp`` is a list of it), for ``Literal``, ``Literal | None``
    and ``list[Literal]``; None for any other annotation."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return tp, False
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0], False) if len(args) == 1 and typing.get_origin(args[0]) is Literal else None
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return (item, True) if typing.get_origin(item) is Literal else None
    return None


def check_literals(obj: Any, prefix: str) -> None:
    """Check every ``Literal``-typed field of the dataclass ``obj`` (and of nested dataclasses)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_literals(value, key)
            continue
        found = _literal_in(hints[f.name])
        if found is None or value is None:
            continue
        literal, is_list = found
        for i, v in enumerate(value if is_list else [value]):
            check_choice(v, literal, f"{key}[{i}]" if is_list else key)
