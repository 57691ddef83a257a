"""The quantize stage: a quantized copy of the FP32 model at a bit map, calibrated.

Weights are rounded (nearest, or GPTQ's error-compensating order) and activation ranges are
calibrated on ``quant.calib_batches`` training batches; see :mod:`hawq.quant` for the contract.
"""

from __future__ import annotations

import copy

from torch import nn

from hawq.bitmap import BitMap
from hawq.quant import calibrate, quantize_model
from hawq.quant.gptq import gptq_options, gptq_round_
from hawq.run import Run


def quantized_copy(run: Run, bits: BitMap) -> nn.Module:
    model = quantize_model(copy.deepcopy(run.fp32), bits, run.cfg.quant)
    model.to(run.device).eval()
    calib = run.batches("train", run.cfg.quant.calib_batches, run.cfg.data.batch_size, shuffle=True)
    if run.cfg.quant.rounding == "gptq":  # weights first (activation quantizers off), then activation ranges
        n = run.cfg.quant.gptq_batches
        hess = calib if n is None else run.batches("train", n, run.cfg.data.batch_size, shuffle=True)
        if run.cfg.quant.gptq_asymmetric:  # its Hessians see the quantized activations: ranges first
            calibrate(model, calib, run.task.forward, progress=run.progress)
        gptq_round_(model, hess, run.task.forward, progress=run.progress, **gptq_options(run.cfg.quant))
    calibrate(model, calib, run.task.forward, progress=run.progress)
    return model


def evaluate_quantized(run: Run, bits: BitMap, desc: str) -> dict[str, float]:
    """Quantize at ``bits``, calibrate and evaluate (the uniform baseline)."""
    return run.evaluate(quantized_copy(run, bits), desc)
