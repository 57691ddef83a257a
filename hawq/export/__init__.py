"""Export: packed integer ``model.safetensors`` (bit-exact reload), ONNX QDQ and integer-only ONNX."""

from hawq.export.config import ExportConfig
from hawq.export.onnx_qdq import compare_onnx, compare_onnx_integer, export_onnx, export_onnx_integer, qdq_twin
from hawq.export.packing import code_range, pack_codes, packed_nbytes, packing_layout, unpack_codes
from hawq.export.quantized_file import (
    FORMAT_NAME,
    FORMAT_VERSION,
    infer_quant_config,
    load_quantized,
    quantized_layers,
    read_quantized_file,
    save_quantized,
)

__all__ = [
    "ExportConfig",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "code_range",
    "compare_onnx",
    "compare_onnx_integer",
    "export_onnx",
    "export_onnx_integer",
    "infer_quant_config",
    "load_quantized",
    "pack_codes",
    "packed_nbytes",
    "packing_layout",
    "qdq_twin",
    "quantized_layers",
    "read_quantized_file",
    "save_quantized",
    "unpack_codes",
]
