from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExportConfig:
    safetensors: bool = True  # packed integer weights + scales + bit map in the metadata
    onnx: bool = True  # QDQ model that onnxruntime runs
    onnx_opset: int = 21
