from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from hawq import HawqError
from hawq.choices import check_choice
from hawq.keys import added_setting
from hawq.quant.observers import ActCalibration

Rounding = Literal["nearest", "gptq"]
ROUNDING_MODES: tuple[str, ...] = get_args(Rounding)
TransformerMode = Literal["float", "ibert"]
TRANSFORMER_MODES: tuple[str, ...] = get_args(TransformerMode)


@dataclass
class QuantConfig:
    """Everything about how a model is quantized (torchao-style: ``quantize_model(model, bits, cfg)``).

    The fake-quant model, :func:`hawq.quant.to_integer`, :func:`hawq.quant.to_fbgemm` and the
    exporters read only this and the quantized modules' state.
    """

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
    rounding: Rounding = "nearest"
    gptq_batches: int | None = None  # calibration batches for the layer Hessians; None = calib_batches
    gptq_damp: float = 0.01  # dampening: H += gptq_damp * mean(diag H) * I
    gptq_block_size: int = 128  # lazy-batch block of columns
    gptq_act_order: bool = False  # round columns in order of decreasing diag(H)
    gptq_clip_search: bool = False  # per-row clip ratio of the scale minimising the layer output error
    gptq_sequential: bool = True  # Hessians from the already-rounded prefix (GPTQ's standard)
    gptq_asymmetric: bool = False  # FP32 layer outputs as target, quantized inputs (acts too) in H (GPTAQ)
    # Transformer ops (GELU, softmax, LayerNorm, matmuls of two activations): "float" keeps them float
    # in the fake-quant model (to_integer then needs float_ops=True for them); "ibert" fake-quantizes
    # them as the I-BERT integer kernels compute them and to_integer runs those kernels
    # (docs/quant.md, "Integer-only transformers"). The model must be torch.fx-traceable.
    # added after run folders were written: out of the cache keys at their defaults (hawq.keys)
    transformer: TransformerMode = added_setting("float")
    attention_bits: int = added_setting(8)  # "ibert": bits of the attention matmul operands and softmax output codes


def check_rounding(cfg: QuantConfig) -> None:
    """Fail fast, with one line naming the key, on a bad ``quant.rounding`` or ``quant.gptq_*`` value."""
    check_choice(cfg.rounding, Rounding, "quant.rounding")
    if cfg.gptq_batches is not None and (isinstance(cfg.gptq_batches, bool) or not isinstance(cfg.gptq_batches, int)
                                         or cfg.gptq_batches < 1):
        raise HawqError(f"quant.gptq_batches must be null or an integer >= 1, got {cfg.gptq_batches!r}")
    if isinstance(cfg.gptq_damp, bool) or not isinstance(cfg.gptq_damp, (int, float)) or not 0 < cfg.gptq_damp < 1:
        raise HawqError(f"quant.gptq_damp must be a number in (0, 1), got {cfg.gptq_damp!r}")
    if isinstance(cfg.gptq_block_size, bool) or not isinstance(cfg.gptq_block_size, int) or cfg.gptq_block_size < 1:
        raise HawqError(f"quant.gptq_block_size must be an integer >= 1, got {cfg.gptq_block_size!r}")


def check_quant_config(cfg: QuantConfig) -> None:
    """Fail fast, with one line naming the key, on a ``QuantConfig`` value no quantizer accepts.

    Run by the YAML loader and by every entry point that takes a ``QuantConfig`` built in Python.
    """
    check_rounding(cfg)
    if cfg.transformer not in TRANSFORMER_MODES:
        raise HawqError(f"quant.transformer must be one of {', '.join(TRANSFORMER_MODES)}, "
                        f"got {cfg.transformer!r}")
    bits = cfg.attention_bits
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise HawqError(f"quant.attention_bits must be an integer in 2..8, got {bits!r}")
    group = cfg.group_size
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise HawqError(f"quant.group_size must be a positive integer or null, got {group!r}")
