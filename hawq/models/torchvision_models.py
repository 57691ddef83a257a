"""ImageNet classifiers from torchvision: ResNet-18/50/152 (HAWQ-V3) and Inception-V3 (HAWQ/HAWQ-V2).

Weights come from a torchvision weights enum name (``model.weights: IMAGENET1K_V1``, downloaded
into the torch hub cache) or from a local checkpoint (``model.checkpoint``). With enum weights and a
class count other than the enum's, the backbone keeps the weights and the classifier is re-initialised.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from hawq import HawqError
from hawq.models.checkpoint import load_checkpoint
from hawq.models.registry import ModelSpec, register_model
from hawq.models.tasks import ClassificationTask, register_task

PIN_8BIT = {"weight": 8, "activation": 8}


def resolve_torchvision_weights(arch: str, name: str) -> Any:
    """The torchvision weights enum member called ``name`` (e.g. ``IMAGENET1K_V1``) of ``arch``."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    members = [m for m in enum.__members__ if m != "DEFAULT"]
    key = name.split(".")[-1]  # accept "ResNet18_Weights.IMAGENET1K_V1" as well
    if key not in enum.__members__:
        raise HawqError(f"model.weights '{name}' is not a torchvision weight of {arch}; known: {', '.join(members)}")
    return enum[key]


def _fetch_state_dict(arch: str, weights: Any) -> dict[str, Tensor]:
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # noqa: BLE001 - URLError, HTTPError, hash mismatch, OSError...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HawqError(
            f"downloading torchvision weights {arch}/{weights.name} failed ({reason}); download "
            f"{weights.url} elsewhere and set model.checkpoint to the file"
        ) from None


def _load_enum_weights(model: nn.Module, arch: str, weights_name: str, heads: list[str],
                       optional: tuple[str, ...] = ()) -> None:
    """Load enum weights; classifier ``heads`` whose shape differs (other class count) keep their init,
    and weights under an ``optional`` prefix the model lacks (e.g. a disabled aux head) are skipped."""
    weights = resolve_torchvision_weights(arch, weights_name)
    state = _fetch_state_dict(arch, weights)
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if k in own or not any(k.startswith(p + ".") for p in optional)}
    keep = {k: v for k, v in state.items()
            if not (any(k.startswith(h + ".") for h in heads) and k in own and own[k].shape != v.shape)}
    unexpected = [k for k in keep if k not in own]
    missing = [k for k in own if k not in keep and not any(k.startswith(h + ".") for h in heads)]
    if unexpected or missing:
        raise HawqError(f"torchvision weights {weights.name} do not fit {arch}: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(keep, strict=False)


def _check_source(weights: str | None, checkpoint: str | None) -> None:
    if weights and checkpoint:
        raise HawqError("set model.weights or model.checkpoint, not both")


def _resnet(arch: str, num_classes: int, weights: str | None, checkpoint: str | None,
            **kwargs: Any) -> nn.Module:
    import torchvision

    _check_source(weights, checkpoint)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if weights:
        _load_enum_weights(model, arch, weights, heads=["fc"])
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


def resnet18(num_classes: int = 1000, weights: str | None = None, checkpoint: str | None = None,
             **kwargs: Any) -> nn.Module:
    return _resnet("resnet18", num_classes, weights, checkpoint, **kwargs)


def resnet50(num_classes: int = 1000, weights: str | None = None, checkpoint: str | None = None,
             **kwargs: Any) -> nn.Module:
    return _resnet("resnet50", num_classes, weights, checkpoint, **kwargs)


def resnet152(num_classes: int = 1000, weights: str | None = None, checkpoint: str | None = None,
              **kwargs: Any) -> nn.Module:
    return _resnet("resnet152", num_classes, weights, checkpoint, **kwargs)


def inception_v3(num_classes: int = 1000, weights: str | None = None, checkpoint: str | None = None,
                 aux_logits: bool = True, transform_input: bool | None = None, **kwargs: Any) -> nn.Module:
    """torchvision Inception-V3 (299x299 input). ``transform_input`` defaults to True with enum weights,
    as torchvision's ImageNet weights expect (they were trained on [-1, 1] inputs)."""
    import torchvision

    _check_source(weights, checkpoint)
    if transform_input is None:
        transform_input = bool(weights)
    # init_weights=True: torchvision's truncated-normal init, the paper's (and deterministic under the seed)
    model = torchvision.models.inception_v3(weights=None, num_classes=num_classes, aux_logits=aux_logits,
                                            transform_input=transform_input, init_weights=True, **kwargs)
    if weights:
        _load_enum_weights(model, "inception_v3", weights, heads=["fc", "AuxLogits.fc"], optional=("AuxLogits",))
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


@register_task
class AuxClassificationTask(ClassificationTask):
    """Classification with an auxiliary head (Inception-V3): loss = CE(main) + 0.4 * CE(aux) in training.

    ``forward`` returns the main logits; in training mode the auxiliary logits ride along as the
    tensor attribute ``aux_logits`` so every stage that treats outputs as a logits tensor (distillation,
    label-free distance, accuracy) works unchanged. Evaluation and export use the main head only.
    """

    name = "classification_aux"
    aux_weight = 0.4  # Szegedy et al. 2016 / torchvision's reference recipe

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        out = model(batch[0])
        if hasattr(out, "logits"):
            logits = out.logits
            if getattr(out, "aux_logits", None) is not None:
                logits.aux_logits = out.aux_logits
            return logits
        return out

    def loss_from_outputs(self, outputs: Tensor, batch: Any) -> Tensor:
        loss = super().loss_from_outputs(outputs, batch)  # checks the labels too
        aux = getattr(outputs, "aux_logits", None)
        if aux is not None:
            loss = loss + self.aux_weight * F.cross_entropy(aux, batch[1])
        return loss


_RESNET_PINS = {"conv1": PIN_8BIT, "fc": PIN_8BIT}
for _name, _builder, _desc in (
    ("resnet18", resnet18, "torchvision ResNet-18 (11.7M params), ImageNet 224x224"),
    ("resnet50", resnet50, "torchvision ResNet-50 (25.6M params), ImageNet 224x224"),
    ("resnet152", resnet152, "torchvision ResNet-152 (60.2M params), ImageNet 224x224"),
):
    register_model(ModelSpec(name=_name, builder=_builder, task="classification", input_shape=(3, 224, 224),
                             default_pins=dict(_RESNET_PINS), description=_desc))

register_model(ModelSpec(
    name="inception_v3", builder=inception_v3, task=AuxClassificationTask.name, input_shape=(3, 299, 299),
    default_pins={"Conv2d_1a_3x3.conv": PIN_8BIT, "fc": PIN_8BIT}, training_only=("AuxLogits",),
    deploy_kwargs={"aux_logits": False},
    description="torchvision Inception-V3 (27.2M params), 299x299; aux head (loss weight 0.4) in training only",
))
