from __future__ import annotations

from dataclasses import dataclass


@dataclass
class QuantConfig:
    """How layers named in the bit map are quantized (fake-quant for training)."""

    per_channel: bool = True  # symmetric per-output-channel weight scales
    group_size: int | None = None  # per-group weights for Linear/Embedding (Q-BERT); None = per-channel
    act_calibration: str = "minmax"  # "minmax", "ema" or "percentile"
    act_percentile: float = 99.99
    ema_decay: float = 0.99
    calib_batches: int = 8
    fold_bn: bool = False  # HAWQ-V3 QuantBnConv2d: fold BN into the preceding conv during QAT
