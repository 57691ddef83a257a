from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hawq.keys import added_setting


@dataclass
class ModelConfig:
    name: str = "fashion_resnet"  # see hawq.models.list_models()
    num_classes: int | None = None  # None = the data set's
    checkpoint: str | None = None  # local safetensors or .pth (read with weights_only=True)
    weights: str | None = None  # torchvision weights enum name, e.g. "IMAGENET1K_V1" (needs download)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra builder arguments
    pretrain_epochs: float = 2.0  # train FP32 first when no checkpoint is given
    pretrain_lr: float = 0.05
    pretrain_weight_decay: float = added_setting(5e-4)  # SGD weight decay of that FP32 pretraining
