from __future__ import annotations

from dataclasses import dataclass

from hawq import HawqError
from hawq.quant.observers import ActCalibration

ROUNDING_MODES = ("nearest", "gptq")


@dataclass
class QuantConfig:
    """How layers named in the bit map are quantized (fake-quant for training)."""

    per_channel: bool = True  # symmetric per-output-channel weight scales
    group_size: int | None = None  # per-group weights for Linear/Embedding (Q-BERT); None = per-channel
    # Activation range per tensor (hawq.quant.modules.QuantAct): "minmax", "ema", "percentile", or "mse"
    # (the clipped extent minimising the squared quantization error; docs/quant.md).
    act_calibration: ActCalibration = "minmax"
    act_percentile: float = 99.99
    ema_decay: float = 0.99
    calib_batches: int = 8
    fold_bn: bool = False  # HAWQ-V3 QuantBnConv2d: fold BN into the preceding conv during QAT
    # Weight rounding after quantization, before activation calibration (docs/quant.md,
    # "Second-order rounding"): "nearest", or "gptq" (hawq.quant.gptq_round_).
    rounding: str = "nearest"
    gptq_batches: int | None = None  # calibration batches for the layer Hessians; None = calib_batches
    gptq_damp: float = 0.01  # dampening: H += gptq_damp * mean(diag H) * I
    gptq_block_size: int = 128  # lazy-batch block of columns
    gptq_act_order: bool = False  # round columns in order of decreasing diag(H)
    gptq_clip_search: bool = False  # per-row clip ratio of the scale minimising the layer output error
    gptq_sequential: bool = True  # Hessians from the already-rounded prefix (GPTQ's standard)
    gptq_asymmetric: bool = False  # FP32 layer outputs as target, quantized inputs (acts too) in H (GPTAQ)


def check_rounding(cfg: QuantConfig) -> None:
    """Fail fast, with one line naming the key, on a bad ``quant.rounding`` or ``quant.gptq_*`` value."""
    if cfg.rounding not in ROUNDING_MODES:
        raise HawqError(f"quant.rounding must be one of {', '.join(ROUNDING_MODES)}, got '{cfg.rounding}'")
    if cfg.gptq_batches is not None and (isinstance(cfg.gptq_batches, bool) or not isinstance(cfg.gptq_batches, int)
                                         or cfg.gptq_batches < 1):
        raise HawqError(f"quant.gptq_batches must be null or an integer >= 1, got {cfg.gptq_batches!r}")
    if isinstance(cfg.gptq_damp, bool) or not isinstance(cfg.gptq_damp, (int, float)) or not 0 < cfg.gptq_damp < 1:
        raise HawqError(f"quant.gptq_damp must be a number in (0, 1), got {cfg.gptq_damp!r}")
    if isinstance(cfg.gptq_block_size, bool) or not isinstance(cfg.gptq_block_size, int) or cfg.gptq_block_size < 1:
        raise HawqError(f"quant.gptq_block_size must be an integer >= 1, got {cfg.gptq_block_size!r}")
