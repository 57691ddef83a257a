from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["cosine", "constant"]
AmpDtype = Literal["float16", "bfloat16"]


@dataclass
class DistillConfig:
    enabled: bool = True
    alpha: float = 0.5  # weight of the KL(teacher || student) term; (1 - alpha) on the task loss
    temperature: float = 2.0


@dataclass
class TrainConfig:
    """Quantization-aware finetuning (also used for the FP32 pretraining when no checkpoint)."""

    epochs: float = 1.0  # fractional epochs allowed (e.g. 0.5)
    optimizer: Optimizer = "sgd"
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = 5.0
    batch_size: int = 128  # global batch: split evenly over the processes under torchrun
    freeze_bn_after_epochs: float | None = None
    freeze_act_after_epochs: float | None = None
    checkpoint_every_steps: int = 200
    amp: bool = False  # autocast on GPU only
    distill: DistillConfig = field(default_factory=DistillConfig)
    nesterov: bool = False  # SGD only
    min_lr: float = 0.0  # the cosine schedule ends here
    adam_betas: tuple[float, float] = (0.9, 0.999)
    amp_dtype: AmpDtype = "float16"  # "float16" (with a GradScaler) or "bfloat16"
    drop_last: bool = True  # drop the last incomplete batch of an epoch (always under torchrun)
    num_workers: int = 0  # DataLoader worker processes
