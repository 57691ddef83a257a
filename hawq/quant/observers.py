"""Range observers for activation quantizers: the clipping extent a per-tensor grid should span.

``QuantAct`` keeps the running statistics; the functions here turn one batch into an extent.
They only choose the *scale* of the usual zero-point-0 per-tensor grid, so the integer path
(``to_integer``: requantization to that grid, integer matmul) runs unchanged.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

ActCalibration = Literal["minmax", "ema", "percentile", "mse"]
ACT_CALIBRATIONS: tuple[str, ...] = get_args(ActCalibration)
# Candidate extents of the MSE search, as fractions of the batch's max |x|, largest first (so a tie
# keeps the wider grid). Below 0.2 a grid of 8 bits or more would clip far more than it gains.
MSE_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.02 * i, 2) for i in range(41))
MSE_SAMPLE = 1 << 18  # elements the MSE search runs on (fixed stride: deterministic)
MSE_BATCH_SAMPLE = 1 << 15  # elements kept per calibration batch for the pooled search (8 batches: no re-striding)


def strided_sample(v: Tensor, limit: int = MSE_BATCH_SAMPLE) -> Tensor:
    """At most about ``limit`` elements of ``v`` at a fixed stride (deterministic), as float32."""
    return _strided(v, limit)


def _coprime_stride(n: int, period: int) -> int:
    """The smallest prime ``>= n`` that does not divide ``period``."""
    n = max(n, 2)
    while period % n == 0 or any(n % d == 0 for d in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def _strided(v: Tensor, limit: int) -> Tensor:
    flat = v.detach().flatten()
    if flat.numel() > limit:
        # The stride is a prime coprime with the size of one example (e.g. tokens x 1536 features, or
        # C x H x W): a stride sharing a factor with it (3 and 1536) would sample only some channels,
        # and an outlier channel could be missed altogether.
        period = flat.numel() // v.shape[0] if v.dim() > 1 and v.shape[0] else flat.numel()
        flat = flat[:: _coprime_stride(flat.numel() // limit + 1, period)]
    return flat.float()


def grid_mse(values: Tensor, extent: float, bits: int, signed: bool) -> float:
    """Mean squared error of ``values`` on the zero-point-0 grid of ``bits`` bits spanning ``extent``."""
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    v = values.detach().float()
    if extent <= 0:
        return float(v.pow(2).mean())
    s = extent / qmax
    qmin = -qmax if signed else 0
    return float((torch.clamp(torch.round(v / s), qmin, qmax) * s - v).pow(2).mean())


@torch.no_grad()
def mse_extent(x: Tensor, bits: int, signed: bool, ratios: tuple[float, ...] = MSE_RATIOS,
               amax: Tensor | float | None = None) -> Tensor:
    """The extent ``r * amax`` (``r`` in ``ratios``) whose grid minimises the mean squared error on ``x``.

    ``amax`` defaults to ``max|x|`` (``max x`` when unsigned); pass the exact running extreme when
    ``x`` is itself a sample.

    Clipping trades the error of the few values beyond the extent against a finer step for all the
    others; for heavy-tailed activations (BERT's LayerNorm and GELU outputs) the optimum lies below
    the maximum. On a signed symmetric grid the error of ``x`` equals that of ``|x|`` on the positive
    half, so the search runs on ``|x|`` (``x`` clamped at 0 when unsigned). Ratio 1 is a candidate:
    the result is never worse than min-max on ``x`` (on the sampled elements).
    """
    v = _strided(x.abs() if signed else x.clamp_min(0), MSE_SAMPLE)
    if amax is None:
        amax = v.max() if v.numel() else torch.tensor(0.0)
    amax = torch.as_tensor(amax, dtype=torch.float32, device=v.device)
    if not float(amax) > 0:
        return torch.zeros((), dtype=torch.float32)
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    best_r, best_err = ratios[0], None
    for r in ratios:
        s = amax * r / qmax
        err = float((torch.clamp(torch.round(v / s), 0, qmax) * s - v).pow(2).sum())
        if best_err is None or err < best_err:
            best_r, best_err = r, err
    return (amax * best_r).to(torch.float32)
