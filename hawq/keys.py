"""Cache keys of config sections, stable across releases that add settings.

A stage's artifact is reused when the digest of the settings it was computed from is unchanged
(:func:`hawq.run.cached`). A setting added later is declared with :func:`added_setting`; it is
left out of the key while it holds its default, so a run folder written before it existed keeps
its key and still resumes, and any other value still changes the key. A removed setting (a
config class's ``RETIRED``) stays in the key with the value it always had, for the same reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_ADDED = "hawq_added_setting"


def added_setting(default: Any) -> Any:
    """A dataclass field for a setting introduced after run folders were written (see module doc)."""
    return dataclasses.field(default=default, metadata={_ADDED: True})


def config_key(cfg: Any) -> Any:
    """``dataclasses.asdict(cfg)`` without the added settings that hold their defaults."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        # a removed setting keeps its old value in the key (see hawq.config.check_retired)
        out = {name: default for name, (default, _) in getattr(cfg, "RETIRED", {}).items()}
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.metadata.get(_ADDED) and value == f.default:
                continue
            out[f.name] = config_key(value)
        return out
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(config_key(v) for v in cfg)
    if isinstance(cfg, dict):
        return {k: config_key(v) for k, v in cfg.items()}
    return cfg
