"""The export stage (rank 0): ``model.safetensors``, ``model.onnx`` (QDQ) and ``model_int.onnx``
(integer-only), each with its verdict against the PyTorch model it came from. A thin call site:
what is exported, and how, is :mod:`hawq.export.deploy`'s."""

from __future__ import annotations

from typing import Any

from torch import nn

from hawq.bitmap import BitMap
from hawq.export.deploy import export_artifacts
from hawq.run import Run


def stage_export(run: Run, qmodel: nn.Module, bits: BitMap) -> dict[str, Any]:
    """model.safetensors, model.onnx and model_int.onnx with their verdicts (hawq.export.deploy);
    the ONNX work runs on CPU copies whatever run.device is."""
    ecfg = run.cfg.export
    batch = run.batches("test", 1, 8)[0] if ecfg.onnx or ecfg.onnx_integer else None
    return export_artifacts(qmodel, bits, run.run_dir, ecfg, run.results["model_info"], run.cfg.quant, batch,
                            logits=run.task.logits_output, training_only=run.spec.training_only,
                            deploy_kwargs=run.spec.deploy_kwargs)
