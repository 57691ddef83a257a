"""Quantization: weight/activation quantizers, quantized modules and integer-only inference."""

from hawq.quant.config import QuantConfig
from hawq.quant.model import (
    calibrate,
    conv_bn_pairs,
    fold_bn,
    quant_acts,
    quantize_,
    quantize_model,
    set_act_calibration,
    set_act_quant,
)
from hawq.quant.modules import (
    QUANT_MODULES,
    FoldedBatchNorm2d,
    QuantAct,
    QuantBnConv2d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
)
from hawq.quant.quantizers import (
    FakeQuantSTE,
    expand_scale,
    fake_quant_act,
    fake_quant_weight_ste,
    qmax_signed,
    quantize_to_int,
    quantize_weight,
    weight_scale,
)

__all__ = [
    "QUANT_MODULES",
    "FakeQuantSTE",
    "FoldedBatchNorm2d",
    "QuantAct",
    "QuantBnConv2d",
    "QuantConfig",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLinear",
    "calibrate",
    "conv_bn_pairs",
    "expand_scale",
    "fake_quant_act",
    "fake_quant_weight_ste",
    "fold_bn",
    "qmax_signed",
    "quant_acts",
    "quantize_",
    "quantize_model",
    "quantize_to_int",
    "quantize_weight",
    "set_act_calibration",
    "set_act_quant",
    "weight_scale",
]
