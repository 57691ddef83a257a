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
