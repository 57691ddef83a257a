from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExportConfig:
    safetensors: bool = True  # packed integer weights + scales + bit map in the metadata
    onnx: bool = True  # QDQ model that onnxruntime runs
    onnx_opset: int = 21
    onnx_int4: bool = True  # 2..4-bit weight codes as ONNX INT4 (opset >= 21, when onnxruntime runs it)
    integer: bool | None = None  # store the integer-only model's constants: None = when it converts
    onnx_integer: bool = True  # also model_int.onnx: integer-only ops, bit-identical to to_integer (when it converts)


MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


def check_opset(opset: int, where: str = "opset") -> None:
    """An ONNX opset hawq can export to: >= MIN_OPSET and no newer than the installed onnx knows."""
    from hawq import HawqError

    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise HawqError(f"{where} must be an integer >= {MIN_OPSET} (per-channel QDQ), got {opset!r}")
    try:
        from onnx.defs import onnx_opset_version
    except ImportError:  # export reports the missing package itself
        return
    if opset > onnx_opset_version():
        raise HawqError(f"{where} is {opset} but the installed onnx knows opsets up to {onnx_opset_version()}")
