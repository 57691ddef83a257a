"""Build a model from its :class:`ModelConfig` (checks against the data live in ``hawq.data.checks``)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from hawq import HawqError
from hawq.models.checkpoint import load_checkpoint
from hawq.models.config import ModelConfig
from hawq.models.registry import ModelSpec, get_model_spec


def build_model(cfg: ModelConfig, num_classes: int | None = None) -> tuple[ModelSpec, nn.Module]:
    """(spec, model) for ``cfg``: ``num_classes`` is ``cfg.num_classes`` or else the data set's.

    Builders that take ``weights``/``checkpoint`` load them themselves; for the others a
    ``checkpoint`` is loaded here with :func:`load_checkpoint` and ``weights`` is an error.
    """
    spec = get_model_spec(cfg.name)
    params = inspect.signature(spec.builder).parameters
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = dict(cfg.kwargs or {})
    for reserved in ("num_classes", "weights", "checkpoint"):
        if reserved in kwargs:
            raise HawqError(f"model.kwargs.{reserved}: set model.{reserved} instead")
    classes = cfg.num_classes if cfg.num_classes is not None else num_classes
    if classes is not None:
        kwargs["num_classes"] = classes
    own_loading = "checkpoint" in params or takes_var_kw
    if own_loading:
        kwargs["checkpoint"] = cfg.checkpoint
        kwargs["weights"] = cfg.weights
    elif cfg.weights:
        raise HawqError(f"model '{cfg.name}' has no downloadable weights; set model.checkpoint instead")
    unknown = [k for k in kwargs if k not in params and not takes_var_kw]
    if unknown:
        known = [p for p in params if p not in ("num_classes", "weights", "checkpoint")]
        raise HawqError(f"model '{cfg.name}': unknown model.kwargs '{unknown[0]}'; known: {', '.join(known)}")
    try:
        model = spec.builder(**kwargs)
    except TypeError as e:  # e.g. an unknown keyword passed through to torchvision
        raise HawqError(f"model '{cfg.name}': bad model.kwargs ({e})") from None
    if cfg.checkpoint and not own_loading:
        load_checkpoint(model, cfg.checkpoint)
    return spec, model
