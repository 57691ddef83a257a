"""The export stage (rank 0): ``model.safetensors``, ``model.onnx`` (QDQ) and ``model_int.onnx``
(integer-only), each checked against the PyTorch model it came from. A thin call site: what is
exported, and how, is :mod:`hawq.export`'s."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from hawq import HawqError
from hawq.bitmap import BitMap
from hawq.export import compare_onnx, compare_onnx_integer, export_onnx, export_onnx_integer, save_quantized
from hawq.quant import to_integer
from hawq.run import Run

log = logging.getLogger("hawq")


def stage_export(run: Run, qmodel: nn.Module, bits: BitMap) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ecfg = run.cfg.export
    example = run.spec.model_inputs(run.batches("test", 1, 8)[0]) if ecfg.onnx or ecfg.onnx_integer else ()
    if ecfg.safetensors:
        summary = save_quantized(qmodel, bits, run.run_dir / "model.safetensors", run.results["model_info"],
                                 quant_config=run.cfg.quant, integer=ecfg.integer)
        out["safetensors"] = {"path": "model.safetensors", **summary}
    if ecfg.onnx:
        path = run.run_dir / "model.onnx"
        try:
            export_onnx(qmodel, example if len(example) > 1 else example[0], path, opset=ecfg.onnx_opset,
                        int4=ecfg.onnx_int4)
            out["onnx"] = {"path": "model.onnx", "check": compare_onnx(qmodel, path, example)}
        except Exception as e:  # noqa: BLE001
            # Some graphs (detection post-processing, HF model outputs) have no QDQ export yet; the
            # finetuned model and its safetensors are already saved, so record the reason and go on.
            out["onnx"] = {"error": f"{type(e).__name__}: {e}"}
            log.warning("onnx export skipped: %s", e)
    if ecfg.onnx_integer:
        out["onnx_integer"] = export_onnx_integer_checked(run, qmodel, example)
    return out


def export_onnx_integer_checked(run: Run, qmodel: nn.Module, example: tuple[Any, ...]) -> dict[str, Any]:
    """``model_int.onnx``: the integer-only model (ConvInteger/MatMulInteger + dyadic rescales)."""
    if len(example) != 1:
        return {"skipped": "the integer ONNX export takes models with a single tensor input"}
    try:
        int_model = to_integer(qmodel, example[0])
    except HawqError as e:  # e.g. float-only ops (transformers) or layers above 8 bits
        log.info("integer onnx export skipped: %s", e)
        return {"skipped": str(e)}
    path = run.run_dir / "model_int.onnx"
    export_onnx_integer(int_model, example[0], path, opset=run.cfg.export.onnx_opset)
    return {"path": "model_int.onnx", "check": compare_onnx_integer(int_model, path, example[0])}
