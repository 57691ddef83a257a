"""Per-layer Hessian traces by Hutchinson's estimator (with Nyström++ variance reduction).

Three probing schemes, all unbiased for ``tr(H_ll)``:

* per layer: the probe ``v_l`` lives on layer ``l`` only and ``v_l . H_ll v_l`` comes from
  a double backward of that layer's gradient. All layers share one gradient graph per batch. A layer
  whose plain probes converge slowly switches to a Nyström control variate built from them.
* per sample (default; per layer where it does not apply): where the samples are independent in the
  loss, ``H_ll = sum_i H_i`` and each sample ``i`` gets its own probe ``v_i``; with ``y = W x`` the
  layer's output, ``v_i . H_i v_i = u_i . (H_yy u)_i`` for ``u_i = J_i v_i``, so one double backward in
  the output answers every sample's probe. ``sum_i v_i . H_i v_i`` is unbiased for ``tr(H_ll)`` with
  variance ``sum_i 2 ||offdiag H_i||_F^2`` instead of ``2 ||offdiag sum_i H_i||_F^2``, and the per-sample
  values give a standard error pooled over the samples.
* joint: one probe ``v`` on all layers, one full HVP, and ``v_l . (H v)_l`` for every layer: its
  expectation is ``tr(H_ll) + sum_{m != l} E[v_l^T H_lm v_m] = tr(H_ll)`` (independent, zero-mean
  blocks), but the cross terms add ``sum_{m != l} ||H_lm||_F^2`` to the variance. On ResNets the
  off-diagonal blocks dominate and joint probing needs hundreds of times more probes (measured in
  scripts/bench_sensitivity.py), so it is opt-in.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hawq import HawqError, bars_off
from hawq.bitmap import atomic_write_text
from hawq.choices import check_choice, choices_of
from hawq.sensitivity.config import Curvature, Estimator, HvpMethod, VarianceReduction
from hawq.sensitivity.gauss_newton import gauss_newton_traces
from hawq.sensitivity.hvp import HessianOperator, LossFn, resolve_layers
from hawq.sensitivity.losses import OutputLoss

TRACES_FORMAT_VERSION = 1
ESTIMATORS = ("hutchinson", "gauss_newton", "gn_sampled")  # TraceEstimate.estimator
CURVATURES = choices_of(Curvature)  # which matrix's block trace: sensitivity.curvature
VARIANCE_REDUCTIONS = choices_of(VarianceReduction)
NEGATIVE_Z = 2.0  # a Hutchinson trace below -NEGATIVE_Z standard errors is "significantly negative"


@dataclass
class TraceEstimate:
    """Estimate of the trace of one layer's Hessian block."""

    mean: float  # estimated trace
    std_err: float  # standard error of ``mean`` (sample std over probes / sqrt(n)); 0 when exact
    n: int  # Hessian-vector products (hutchinson) or backward passes (gauss_newton, gn_sampled) spent
    numel: int  # number of weights in the layer (per-parameter trace = mean / numel)
    estimator: str = "hutchinson"  # "gauss_newton": exact Gauss-Newton block trace; "gn_sampled": the same,
    # from sampled output-space probes (unbiased, std_err from independent probes)
    curvature: str = "hessian"  # "hessian" (tr H_ll; equal to the Gauss-Newton trace where the layer is
    # certified piecewise linear) or "gauss_newton" (tr G_ll, positive semi-definite)
    note: str = ""  # why this layer's curvature differs from the run's (e.g. a significantly negative trace)


def probe_seed(seed: int, *key: object) -> int:
    """Seed of one probe, a pure function of ``(seed, *key)``: independent of how many probes are
    drawn, of chunking and of which other layers are measured (and equal on every rank)."""
    digest = hashlib.blake2b(repr((int(seed),) + key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rademacher_like(weights: Sequence[Tensor], seed: int) -> list[Tensor]:
    """A +-1 vector shaped like ``weights``, a pure function of ``seed`` (and the device type)."""
    device = weights[0].device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for w in weights:
        v = torch.randint(0, 2, w.shape, generator=gen, device=device, dtype=torch.int8)
        out.append(v.to(w.dtype).mul_(2).sub_(1))
    return out


def rademacher_rows(weight: Tensor, rows: Tensor, seed: int) -> Tensor:
    """A probe shaped like ``weight``: +-1 on ``rows`` (a pure function of ``seed`` and the rows), 0 elsewhere.

    For an embedding table whose Hessian block is zero off the rows the batch looks up
    (:func:`hawq.sensitivity.hvp.embedding_rows`) it gives every sample ``v . H v`` the distribution of a
    full Rademacher probe's, without drawing the rest of the table (2M entries for BERT's vocabulary)."""
    gen = torch.Generator(device=weight.device).manual_seed(seed)
    signs = torch.randint(0, 2, (rows.numel(), *weight.shape[1:]), generator=gen, device=weight.device,
                          dtype=torch.int8)
    out = torch.zeros_like(weight)
    out[rows] = signs.to(weight.dtype).mul_(2).sub_(1)
    return out


# rounds a per-sample layer takes at least: its pooled error may have the degrees of freedom of 8 shared
# probes after 2 rounds of a batch of 8, but the mean and the spread of 2-3 heavy-tailed draws per sample
# are low together too often (tests' TinyAttention, 6 seeds x 5 layers: one 7.5 standard errors off at 3 rounds)
PER_SAMPLE_MIN_ROUNDS = 4
_PROBE_CHUNK_ELEMENTS = 1 << 24  # per-sample weight probes drawn at once (64 MiB of float32)


def per_sample_output_probe(module: nn.Module, x: Tensor, seed: int) -> Tensor:
    """``u_i = J_i v_i`` for every sample ``i`` of a batch: an independent Rademacher weight probe ``v_i``
    per sample, mapped through the layer (its output is linear in the weight; no bias), a pure function
    of ``seed`` and the input ``x``. Linear: ``x_i v_i^T``; Conv2d: ``x_i`` convolved with ``v_i`` (one
    grouped convolution for a chunk of samples); Embedding: the rows of ``v_i`` that sample ``i`` looks
    up, one draw per distinct row of the sample, and 0 at ``padding_idx`` (its row gets no gradient)."""
    w = module.weight
    gen = torch.Generator(device=x.device).manual_seed(seed)
    b = x.shape[0]

    def signs(shape: tuple[int, ...]) -> Tensor:
        v = torch.randint(0, 2, shape, generator=gen, device=x.device, dtype=torch.int8)
        return v.to(w.dtype).mul_(2).sub_(1)

    if isinstance(module, nn.Embedding):
        keys = x.reshape(b, -1) + torch.arange(b, device=x.device)[:, None] * module.num_embeddings
        rows, which = keys.reshape(-1).unique(return_inverse=True)
        u = signs((rows.numel(), w.shape[1]))[which].reshape(*x.shape, w.shape[1])
        if module.padding_idx is not None:
            u[x == module.padding_idx] = 0
        return u
    step = max(1, _PROBE_CHUNK_ELEMENTS // w.numel())
    parts = []
    for s in range(0, b, step):
        xs = x[s:s + step]
        c = xs.shape[0]
        v = signs((c, *w.shape))
        if isinstance(module, nn.Linear):
            y = torch.einsum("bti,boi->bto", xs.reshape(c, -1, w.shape[1]), v)
            parts.append(y.reshape(*xs.shape[:-1], w.shape[0]))
        else:  # Conv2d: every sample its own weights, as groups of one convolution
            y = torch.nn.functional.conv2d(xs.reshape(1, -1, *xs.shape[2:]), v.reshape(-1, *w.shape[1:]), None,
                                           module.stride, module.padding, module.dilation, module.groups * c)
            parts.append(y.reshape(c, w.shape[0], *y.shape[2:]))
    return torch.cat(parts)


def pooled_error(values: Tensor) -> tuple[float, float]:
    """Standard error of the mean over rounds of ``values.sum(1)`` (``values``: ``[rounds, samples]`` of
    independent per-sample probes) and its effective degrees of freedom.

    The error is ``sqrt(sum_i var_i / n)`` with each sample's variance over its own ``n`` rounds (its
    trace differs from the others', so the spread across samples is not probe noise). The degrees of
    freedom are Welch-Satterthwaite's, ``(sum_i var_i)^2 / sum_i (var_i^2 / (n - 1))``: ``samples * (n - 1)``
    when the samples are alike, ``n - 1`` when one sample carries all the noise, so a stopping rule that
    asks for as many as ``min_probes`` shared probes give (``min_probes - 1``) cannot trust two rounds of
    a batch whose noise sits in one sample.
    """
    n = values.shape[0]
    if n < 2:
        return math.inf, 0.0
    var = values.var(0, unbiased=True)
    total = float(var.sum())
    spread = float(var.square().sum()) / (n - 1)
    dof = total * total / spread if spread > 0 else math.inf
    return math.sqrt(total / n), dof


def _stopping_targets(means: Tensor, tol: float, known_max: float = 0.0) -> Tensor:
    # relative tolerance per layer, with an absolute floor so near-zero traces cannot stall the loop;
    # known_max: the largest |trace| of layers computed exactly (the floor is relative to all layers)
    floor = tol * 1e-3 * max(float(means.abs().max()) if means.numel() else 0.0, known_max)
    return torch.clamp(tol * means.abs(), min=floor)


def _summary(samples: Tensor) -> tuple[Tensor, Tensor]:
    n = samples.shape[0]
    means = samples.mean(0)
    if n < 2:
        return means, torch.full_like(means, math.inf)
    return means, samples.std(0, unbiased=True) / math.sqrt(n)


def hessian_traces(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any],
                   layers: list[str] | None = None, tol: float = 0.05, max_probes: int = 200,
                   min_probes: int = 8, seed: int = 0, progress: bool = True,
                   method: str = "auto",
                   probing: str = "per_sample", probes_per_pass: int = 1,
                   variance_reduction: str = "nystrom", estimator: str = "auto",
                   exact_directions: int | None = None, curvature: str = "hessian",
                   info: dict[str, Any] | None = None) -> dict[str, TraceEstimate]:
    """``tr(H_ll)`` for each layer's ``.weight`` block of the Hessian: exact where the network allows,
    Hutchinson's estimate elsewhere.

    ``H`` is the Hessian of ``mean over batches of loss_fn(model, batch)``; probes are seeded
    Rademacher vectors. A layer stops once ``std_err <= max(tol * |trace|, tol * 1e-3 * max_l |trace_l|)``
    after ``min_probes``, or at ``max_probes``. The model's buffers and weights are left exactly as
    they were; the caller picks ``model.eval()`` or ``model.train()``.

    ``probing``: "per_layer" draws each layer's probe on that layer alone and answers it
    with a double backward from that layer's gradient, on one shared graph per batch; converged
    layers stop drawing. "per_sample" (default) does the same, except that a layer whose samples are
    independent (found by the per-sample check of the exact path: an ``OutputLoss``, ``estimator="auto"``,
    one process) gets an independent probe per sample, answered by one double backward in the layer's
    output, and a standard error pooled over the samples (``info["per_sample_layers"]`` names them).
    "joint" draws one probe on all layers and reads every layer's estimate
    off one full HVP; it is unbiased too, but the off-diagonal blocks add ``sum_m ||H_lm||_F^2``
    to each layer's variance (see docs/sensitivity.md for when that pays). ``method``: "auto"
    (double backward, finite differences where that is unsupported), "autograd" or
    "finite_difference". ``probes_per_pass > 1`` answers that many per-layer probes in one vmapped
    double backward (``is_grads_batched``); the numbers then differ from 1 only by rounding.

    ``variance_reduction`` (per-layer probing only): "nystrom" (default) lets a layer whose plain
    probes show it slow to converge switch to Nyström++ (a Nyström sketch of its block, built from
    the products of up to ``3 * min_probes`` of those probes, as control variate on fresh probes;
    see :class:`NystromSketch`); "none" is plain Hutchinson. Both are unbiased; ``n`` counts
    every Hessian-vector product spent on the layer, ``std_err`` is that of the final estimator.

    ``estimator="auto"`` (default): when ``loss_fn`` is an :class:`~hawq.sensitivity.OutputLoss`, the
    loss Hessian in the outputs is block diagonal over samples and has at most ``exact_directions``
    entries per sample (default ``2 * min_probes * len(layers)``), every layer through which the outputs are
    piecewise linear (ReLU networks with eval-mode BatchNorm) gets its exact trace from one backward
    pass per output direction (:mod:`hawq.sensitivity.gauss_newton`; ``std_err`` 0,
    ``estimator="gauss_newton"``); the other layers get Hutchinson's estimate. "hutchinson": every
    layer by Hutchinson's estimator. With more output entries per sample than ``exact_directions``, the
    same layers get ``estimator="gn_sampled"``: each sample's heaviest output directions exactly, the
    rest from Rademacher output-space probes ``v_i = A_i r_i`` (``A_i A_i^T`` the loss Hessian in sample
    ``i``'s outputs; one backward pass per probe for all layers), unbiased, each layer stopping on the
    rule above; the cost does not grow with the number of outputs. Below the cap the choice is by cost:
    the sampled estimate is used where its predicted backward passes (``exact_columns``' plan, at least
    ``min_probes``) are under half the exact path's one per output direction (a label-free loss on a
    384-wide embedding: ~25 instead of 384), the exact one elsewhere (a 10-class head: 9 directions
    against at least 8 probes). ``info``, if given, receives ``info["output_space"]``: that decision, its
    predicted costs and why.

    ``curvature``: "hessian" (default) measures ``tr(H_ll)``; a layer whose Hutchinson estimate is
    significantly negative (below ``-NEGATIVE_Z`` standard errors: an indefinite block, which the
    search would otherwise read as "quantization noise is free") gets its Gauss-Newton trace instead,
    with ``curvature="gauss_newton"`` and a ``note`` saying why. "gauss_newton" measures the
    Gauss-Newton trace ``tr(J_l^T (d^2 l) J_l)`` (positive semi-definite for a convex loss of the
    outputs) of every layer with a per-sample norm formula (Conv2d, Linear, Embedding), certified
    or not; it needs an ``OutputLoss`` and ``estimator="auto"``.
    """
    check_choice(method, HvpMethod, "method")
    if isinstance(batches, Tensor):
        raise HawqError("batches must be a list of batches (each what loss_fn takes, e.g. an (inputs, labels) "
                        "pair), got a bare tensor")
    if isinstance(max_probes, bool) or not isinstance(max_probes, int) or max_probes < 2:
        raise HawqError(f"max_probes must be an integer >= 2, got {max_probes!r}")
    if isinstance(min_probes, bool) or not isinstance(min_probes, int) or not 2 <= min_probes <= max_probes:
        raise HawqError(f"min_probes must be an integer in 2..max_probes ({max_probes}), got {min_probes!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise HawqError(f"tol must be a finite number >= 0, got {tol!r}")
    check_choice(probing, ("per_sample", "per_layer", "joint"), "probing")
    check_choice(variance_reduction, VarianceReduction, "variance_reduction")
    if variance_reduction == "gauss_newton" and (not isinstance(loss_fn, OutputLoss) or probing == "joint"):
        raise HawqError("variance_reduction='gauss_newton' needs an OutputLoss and per-layer probing")
    check_choice(estimator, Estimator, "estimator")
    check_choice(curvature, Curvature, "curvature")
    if curvature == "gauss_newton" and (estimator != "auto" or not isinstance(loss_fn, OutputLoss)):
        raise HawqError("curvature='gauss_newton' needs estimator='auto' and an OutputLoss (outputs and a loss "
                        "on them, e.g. task_loss(task))")
    if exact_directions is not None and (isinstance(exact_directions, bool) or not isinstance(exact_directions, int)
                                         or exact_directions < 1):
        raise HawqError(f"exact_directions must be None or an integer >= 1, got {exact_directions!r}")
    batches = list(batches)
    all_names, all_weights = resolve_layers(model, layers)
    out: dict[str, TraceEstimate] = {}
    # exact traces cost about one gradient per output direction; a Hutchinson run costs at least
    # min_probes HVPs per layer, one HVP about 2.2 gradients (scripts/bench_sensitivity.py)
    cap = exact_directions if exact_directions is not None else 2 * min_probes * len(all_names)
    gn_kwargs = {"max_directions": cap, "seed": seed, "progress": progress, "tol": tol,
                 "min_probes": min_probes, "max_probes": max_probes, "prefer_exact": exact_directions is not None}
    missing: dict[str, str] = {}
    independent: set[str] = set()  # Hutchinson's layers whose samples are independent
    if estimator == "auto" and isinstance(loss_fn, OutputLoss):
        got, missing = gauss_newton_traces(model, loss_fn, batches, all_names, all_weights,
                                           certify=curvature == "hessian", info=info,
                                           independent=independent if probing == "per_sample" else None,
                                           **gn_kwargs)
        for name, w in zip(all_names, all_weights):
            if name in got:
                mean, err, n, kind = got[name]
                out[name] = TraceEstimate(mean, err, n, w.numel(), kind, curvature)
    names = [n for n in all_names if n not in out]
    weights = [w for n, w in zip(all_names, all_weights) if n not in out]
    if not names:
        return out
    known_max = max((abs(t.mean) for t in out.values()), default=0.0)
    offsets: dict[int, tuple[float, float, int]] = {}  # Gauss-Newton control variate: (tr G_ll, var, passes)
    if variance_reduction == "gauss_newton":
        # tr(H_ll) = tr(G_ll) + E[v.(H_ll - G_ll)v]: G's trace from output-space probes (all layers at
        # once, to half the tolerance), Hutchinson only on the residual block, which is small where
        # the loss gradient in the outputs is (a trained network on its data)
        got, _ = gauss_newton_traces(model, loss_fn, batches, names, weights, certify=False,
                                     known_max=known_max, **{**gn_kwargs, "tol": tol / 2})
        offsets = {i: (got[n][0], got[n][1] ** 2, got[n][2]) for i, n in enumerate(names) if n in got}
    pooled: dict[int, float] = {}  # per-sample layers: their pooled standard errors
    with HessianOperator(model, loss_fn, batches, names, weights, method=method,
                         probes_per_pass=probes_per_pass, gn_control=list(offsets),
                         per_sample=[i for i, n in enumerate(names) if n in independent]) as op:
        if probing != "joint":
            samples, spent, pooled = _per_layer(op, names, weights, tol, max_probes, min_probes, seed, progress,
                                                variance_reduction, known_max, offsets)
        else:
            samples = _joint(op, names, weights, tol, max_probes, min_probes, seed, progress, known_max)
            spent = [s.shape[0] for s in samples]
        offsets = {i: o for i, o in offsets.items() if i in op.gn_control}  # none after a finite-difference fall-back
    if info is not None and probing == "per_sample":
        info["per_sample_layers"] = [names[i] for i in sorted(pooled)]
    for i, (name, s, n, w) in enumerate(zip(names, samples, spent, weights)):
        mean, err = _summary(s[:, None])
        if i in pooled:
            err = torch.tensor([pooled[i]], dtype=torch.float64)
        if i in offsets:
            mean, err = mean + offsets[i][0], (err.square() + offsets[i][1]).sqrt()
            n += offsets[i][2]
        note = (f"no Gauss-Newton trace ({missing.get(name, 'not measured')}): Hessian trace"
                if curvature == "gauss_newton" else "")
        out[name] = TraceEstimate(float(mean[0]), float(err[0]), int(n), w.numel(), note=note)
    negative = [n for n in names if out[n].mean < -NEGATIVE_Z * out[n].std_err]
    if negative and isinstance(loss_fn, OutputLoss):
        _replace_negative(model, loss_fn, batches, negative, out, gn_kwargs,
                          known_max=max((abs(t.mean) for t in out.values()), default=0.0))
    return {name: out[name] for name in all_names}


def _replace_negative(model: nn.Module, loss_fn: OutputLoss, batches: list, negative: list[str],
                      out: dict[str, TraceEstimate], gn_kwargs: dict[str, Any], known_max: float) -> None:
    """The negative-trace rule: a significantly negative Hessian trace (an indefinite block) says
    nothing about how much quantization noise costs, and read as a cost it would make every bit
    width free for the layer; its Gauss-Newton trace (the positive semi-definite part of the same
    curvature) replaces it, with a note. Layers without a per-sample norm formula keep the Hessian
    trace and a note (the search then uses its magnitude, see hawq.search.allocate)."""
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in negative]
    got, why = gauss_newton_traces(model, loss_fn, batches, negative, weights, certify=False,
                                   known_max=known_max, **gn_kwargs)
    for name in negative:
        t = out[name]
        was = f"Hessian trace {t.mean:.4g} +- {t.std_err:.2g} is significantly negative (indefinite block)"
        if name in got:
            mean, err, n, kind = got[name]
            out[name] = TraceEstimate(mean, err, t.n + n, t.numel, kind, "gauss_newton",
                                      f"{was}: its Gauss-Newton trace is used")
        else:
            out[name] = dataclasses.replace(t, note=f"{was}; no Gauss-Newton trace ({why[name]})")


def _probes_needed(std: float, target: float) -> float:
    """Probes for a standard error of ``target`` if the per-probe std ``std`` holds (inf for target 0)."""
    ratio = std / target if target > 0 else math.inf
    return math.ceil(ratio * ratio) if ratio < 1e150 else math.inf


def _next_chunk(std: float, target: float, n: int, budget: int) -> int:
    # probes still needed if the sample variance holds, at most doubling n per round and within budget
    need = _probes_needed(std, target) - n
    return int(max(1, min(need, n, budget)))


class NystromSketch:
    """Rank-``r`` Nyström approximation ``Ĥ = Y^T C^+ Y`` of one Hessian block, used as a control variate.

    ``S`` holds ``r`` probes (rows), ``Y = S H`` their products and ``C = S H S^T``. The trace of ``Ĥ``
    and its quadratic forms cost no Hessian-vector product, so ``g^T H g - beta (g^T Ĥ g - tr(Ĥ))`` is
    a Hutchinson sample of ``tr(H)`` with a control variate (Nyström++, Persson, Cortinovis & Kressner
    2022, for ``beta = 1``): unbiased for any ``Ĥ`` and ``beta`` chosen without ``g``, with variance
    ``2 sum_{i≠j} (H - Ĥ)_ij^2`` at ``beta = 1`` instead of ``2 sum_{i≠j} H_ij^2``.
    """

    def __init__(self, probes: Tensor, products: Tensor, rtol: float = 1e-6) -> None:
        s = probes.reshape(probes.shape[0], -1).double()
        y = products.reshape(products.shape[0], -1)
        self.y = y if y.dtype == torch.float64 else y.float()  # float32 halves the memory of big layers
        self.rtol = rtol
        core = s @ self.y.double().T
        self.core = (core + core.T) / 2  # symmetric in exact arithmetic
        self.gram = self.y.double() @ self.y.double().T
        self.core_pinv, self.rank = self._pinv(self.core)
        self.trace = float((self.core_pinv * self.gram).sum())  # tr(C^+ Y Y^T)

    def _pinv(self, core: Tensor) -> tuple[Tensor, int]:
        evals, evecs = torch.linalg.eigh(core)
        # drop directions the sketch cannot resolve (float32 products): their pseudo-inverse is noise
        keep = evals.abs() > self.rtol * float(evals.abs().max()) if evals.numel() else evals.bool()
        return (evecs[:, keep] / evals[keep]) @ evecs[:, keep].T, int(keep.sum())

    def quadratic(self, g: Tensor) -> float:
        """``g^T Ĥ g``."""
        z = (self.y @ g.reshape(-1).to(self.y.dtype)).double()
        return float(z @ (self.core_pinv @ z))

    def leave_one_out_samples(self) -> Tensor:
        """For each sketch probe ``s_j``: the control-variate sample a sketch without ``s_j`` would give,
        ``tr(Ĥ_-j) + s_j^T H s_j - s_j^T Ĥ_-j s_j`` (all from ``C`` and ``Y Y^T``, no new product).

        Their spread predicts, before any new product is paid for, whether the control variate beats
        plain probes on this block (it can lose on small indefinite blocks).
        """
        r = self.core.shape[0]
        out = []
        for j in range(r):
            rest = [i for i in range(r) if i != j]
            pinv, _ = self._pinv(self.core[rest][:, rest])
            c = self.core[rest, j]
            out.append(float((pinv * self.gram[rest][:, rest]).sum()) + float(self.core[j, j] - c @ pinv @ c))
        return torch.tensor(out, dtype=torch.float64)


def control_variate_samples(q: Tensor, c: Tensor, trace: float, warmup: int = 3,
                            known: Tensor | None = None) -> Tensor:
    """``q_j - beta_j (c_j - trace)`` with ``beta_j`` the least-squares slope of ``q`` on ``c`` over the
    samples *before* ``j`` (clipped to [0, 1]; 1 for the first ``warmup``).

    ``beta_j`` depends only on earlier probes, so every sample has conditional mean ``tr(H)`` (the
    samples are martingale increments): the mean stays unbiased and ``std / sqrt(n)`` estimates its
    standard error, while a poor sketch drives ``beta`` to 0 (plain Hutchinson) instead of adding variance.
    ``known``: this function's output for the first probes of ``q``; those samples are reused (the same
    numbers: a sample depends on earlier probes only), so a growing run pays for its new probes only.
    """
    out = torch.empty_like(q)
    start = 0 if known is None else known.shape[0]
    out[:start] = known if known is not None else out[:0]
    for j in range(start, q.shape[0]):
        beta = 1.0
        if j >= warmup:
            dq, dc = q[:j] - q[:j].mean(), c[:j] - c[:j].mean()
            var = float((dc * dc).sum())
            if var > 0:
                beta = min(max(float((dq * dc).sum()) / var, 0.0), 1.0)
        out[j] = q[j] - beta * (c[j] - trace)
    return out


SKETCH_PROBES_PER_MIN = 3  # a plain layer may build its sketch from up to 3 * min_probes probes


def _per_layer(op: HessianOperator, names: list[str], weights: list[nn.Parameter], tol: float,
               max_probes: int, min_probes: int, seed: int, progress: bool,
               variance_reduction: str = "none", known_max: float = 0.0,
               offsets: dict[int, tuple[float, float, int]] | None = None,
               ) -> tuple[list[Tensor], list[int], dict[int, float]]:
    """Block-masked probes: probe j of layer ``name`` depends only on (seed, name, j) (and, for an
    embedding table of a one-batch run, on the rows the batch looks up: the probe is zero elsewhere).

    With ``variance_reduction="nystrom"`` a plain layer keeps the products of its probes (at most
    ``3 * min_probes``); once the plain probes still predicted to be needed outnumber ``min_probes``
    and a leave-one-out check predicts at least a halved variance, it turns those products into a
    Nyström sketch of its block and restarts on fresh probes ``(seed, name, "nystrom", j)`` with the
    sketch as control variate. The estimate uses only the fresh probes (so it stays unbiased), while
    ``n`` counts every product spent.

    A layer of ``op.per_sample`` (its samples independent) draws an independent probe for every sample
    instead, keys ``(seed, name, "per_sample", j, batch)``, answered by one double backward per round in
    its output: the cross-sample terms that a shared probe's variance carries vanish in expectation
    (``sum_i 2 ||offdiag H_i||^2`` instead of ``2 ||offdiag sum_i H_i||^2``), and its standard error is
    pooled over the samples (:func:`pooled_error`), so it may stop once that error has the degrees of
    freedom of ``min_probes`` shared probes (and :data:`PER_SAMPLE_MIN_ROUNDS` rounds) instead of after
    ``min_probes`` probes. If after those rounds it still predicts more than ``3 * min_probes`` rounds, it
    goes on with shared probes instead (with ``variance_reduction="nystrom"``), which may switch to a
    Nyström control variate (on trained CNNs 10-400x less variance); its trial rounds stay in ``n``.
    Returns the samples of each layer's final estimator (a per-sample layer's: the sum over samples of
    each round), the products spent, and the pooled standard errors of the per-sample layers.
    """
    samples = [torch.zeros(0, dtype=torch.float64) for _ in weights]
    units: dict[int, Tensor] = {}  # a per-sample layer's [rounds, samples] of v_i . H_i v_i
    modules = dict(op.model.named_modules()) if op.per_sample else {}
    spent = [0] * len(weights)
    sketches: dict[int, NystromSketch] = {}
    cv_q: dict[int, Tensor] = {}  # g^T H g of the control-variate probes
    cv_c: dict[int, Tensor] = {}  # g^T Ĥ g of the same probes
    products: dict[int, list[Tensor]] = {}  # H s_j of a plain layer's probes so far (its sketch-to-be)
    attempt_at: dict[int, int] = {}  # probe count at which a layer next tries its sketch
    sketch_cap = SKETCH_PROBES_PER_MIN * min_probes

    offsets = offsets or {}

    def offset(i: int) -> tuple[float, float]:
        """(tr G_ll, its variance) for a layer on the Gauss-Newton control variate, else (0, 0)."""
        return offsets[i][:2] if i in offsets and i in op.gn_control else (0.0, 0.0)

    def deciding(i: int) -> bool:
        """A plain layer that may still switch: it keeps its products for the sketch."""
        return (variance_reduction == "nystrom" and i not in sketches and i not in op.gn_control
                and i not in op.per_sample and spent[i] < sketch_cap
                and attempt_at.get(i, min_probes) <= sketch_cap)
    # a per-sample layer's floor: PER_SAMPLE_MIN_ROUNDS rounds (or min_probes, if fewer), and the degrees
    # of freedom of min_probes shared probes (pooled_error), checked as it goes
    first_rounds = min(PER_SAMPLE_MIN_ROUNDS, min_probes)
    chunks = {i: first_rounds if i in op.per_sample else min_probes for i in range(len(weights))}
    total = len(weights) * max_probes
    bar = tqdm(total=total, desc="hessian traces", unit="hvp", disable=bars_off(progress), leave=False)

    def draw(i: int, key: int) -> Tensor:
        # an embedding table looked up by the batch: only its looked-up rows (op.rows is set when the
        # first graph is built, before any probe is drawn, and stays fixed)
        rows = (op.rows or {}).get(i)
        return rademacher_like([weights[i]], key)[0] if rows is None else rademacher_rows(weights[i], rows, key)

    def plain_probe(j: int, i: int, start: int) -> Tensor:
        return draw(i, probe_seed(seed, names[i], start + j))

    def cv_probe(j: int, i: int, start: int) -> Tensor:
        return draw(i, probe_seed(seed, names[i], "nystrom", start + j))

    def output_probe(j: int, bi: int, x: Tensor, i: int, start: int) -> Tensor:
        return per_sample_output_probe(modules[names[i]], x, probe_seed(seed, names[i], "per_sample", start + j, bi))

    while chunks:
        requests = {}
        for i, c in chunks.items():
            make, start = (cv_probe, cv_q[i].shape[0]) if i in sketches else (plain_probe, samples[i].shape[0])
            requests[i] = (functools.partial(make, i=i, start=start), c)
            if i in op.per_sample:
                requests[i] += (functools.partial(output_probe, i=i, start=samples[i].shape[0]),)
        got = op.block_quadratic_forms(requests, return_hvps=[i for i in chunks if deciding(i)])
        for i, hv in op.last_hvps.items():
            products.setdefault(i, []).extend(h.cpu() for h in hv)
        for i, q in got.items():
            q = q.cpu()
            spent[i] += q.shape[0]
            if i in op.last_per_sample:
                units[i] = torch.cat([units[i], op.last_per_sample[i].cpu()]) if i in units else (
                    op.last_per_sample[i].cpu())
                samples[i] = units[i].sum(1)
                continue
            if i in units:  # a fall-back to finite differences: shared weight probes from here on (these
                del units[i]  # q came from probe keys a restart may reuse, so they are dropped too)
                samples[i] = torch.zeros(0, dtype=torch.float64)
                continue
            if i in sketches:
                probe, sk = requests[i][0], sketches[i]
                c = torch.tensor([sk.quadratic(probe(j)) for j in range(q.shape[0])], dtype=torch.float64)
                cv_q[i], cv_c[i] = torch.cat([cv_q[i], q]), torch.cat([cv_c[i], c])
                samples[i] = control_variate_samples(cv_q[i], cv_c[i], sk.trace, known=samples[i])
            else:
                samples[i] = torch.cat([samples[i], q])
        bar.update(sum(chunks.values()))
        means = torch.stack([(s.mean() if s.numel() else torch.zeros((), dtype=torch.float64)) + offset(i)[0]
                             for i, s in enumerate(samples)])
        targets = _stopping_targets(means, tol, known_max)
        # a control-variate layer's error adds the variance of tr(G_ll): the residual's share of the target
        targets = torch.stack([(t.square() - offset(i)[1]).clamp_min(0.25 * t.square()).sqrt()
                               for i, t in enumerate(targets)])
        nxt = {}
        for i in chunks:
            n = samples[i].shape[0]
            if i in units:
                err, dof = pooled_error(units[i])
                if spent[i] >= max_probes or (n >= first_rounds and dof >= min_probes - 1
                                              and err <= float(targets[i])):
                    continue
                if (variance_reduction == "nystrom" and n >= first_rounds and max_probes - spent[i] >= min_probes
                        and _probes_needed(err * math.sqrt(n), float(targets[i])) > sketch_cap):
                    # a slow layer: shared probes may switch to a Nyström sketch, which per-sample probes
                    # cannot build (each sample's block differs); its trial rounds stay counted in n
                    op.per_sample.discard(i)
                    del units[i]
                    samples[i] = torch.zeros(0, dtype=torch.float64)
                    nxt[i] = min_probes
                    continue
                # too few degrees of freedom: one more round at a time (each adds at least one)
                nxt[i] = 1 if op.graph_is_kept or dof < min_probes - 1 else _next_chunk(
                    err * math.sqrt(n), float(targets[i]), n, max_probes - spent[i])
                nxt[i] = min(nxt[i], max_probes - spent[i])
                continue
            if n < min_probes and spent[i] < max_probes:  # a per-sample layer's first round answered by
                nxt[i] = min(min_probes - n, max_probes - spent[i])  # shared probes (a fall-back)
                continue
            std = float(samples[i].std(unbiased=True))
            if spent[i] >= max_probes or std / math.sqrt(n) <= float(targets[i]):
                products.pop(i, None)  # done: its sketch-to-be is not needed any more
                continue
            predicted = _probes_needed(std, float(targets[i]))
            if (i in products and n >= attempt_at.get(i, min_probes) and predicted - n > min_probes
                    and max_probes - spent[i] >= min_probes):
                # plain probes still to go outnumber a control-variate restart: try the sketch of all
                # probes so far (every min_probes more; a bigger sketch captures more of the block)
                attempt_at[i] = n + min_probes
                probes = torch.stack([plain_probe(j, i, 0) for j in range(n)])
                sketch = NystromSketch(probes.cpu(), torch.cat(products[i]))
                if float(sketch.leave_one_out_samples().var()) < 0.5 * std * std:
                    sketches[i] = sketch
                    del products[i]
                    cv_q[i] = cv_c[i] = torch.zeros(0, dtype=torch.float64)
                    samples[i] = torch.zeros(0, dtype=torch.float64)
                    nxt[i] = min_probes
                    continue
            if not deciding(i):
                products.pop(i, None)  # past the cap: stay plain and free the memory
            # a kept graph makes rounds free: check after every probe and never overshoot
            nxt[i] = 1 if op.graph_is_kept else _next_chunk(std, float(targets[i]), n, max_probes - spent[i])
        op.last_hvps = {}
        chunks = nxt
        if progress:
            bar.set_postfix(active=len(chunks))
    bar.close()
    return samples, spent, {i: pooled_error(u)[0] for i, u in units.items()}


def _joint(op: HessianOperator, names: list[str], weights: list[nn.Parameter], tol: float, max_probes: int,
           min_probes: int, seed: int, progress: bool, known_max: float = 0.0) -> list[Tensor]:
    """One probe on all layers, one full HVP per probe; probe j depends only on (seed, j)."""
    samples = torch.zeros(0, len(weights), dtype=torch.float64)
    bar = tqdm(total=max_probes, desc="hessian traces", unit="hvp", disable=bars_off(progress), leave=False)
    chunk = min_probes
    while True:
        start = samples.shape[0]
        q = op.quadratic_forms(
            lambda j, s=start: rademacher_like(weights, probe_seed(seed, "joint", s + j)), chunk)
        samples = torch.cat([samples, q.cpu()])
        bar.update(chunk)
        n = samples.shape[0]
        means, errs = _summary(samples)
        targets = _stopping_targets(means, tol, known_max)
        if n >= max_probes or bool((errs <= targets).all()):
            break
        ratio = errs / targets.clamp_min(1e-300)
        worst = int(ratio.argmax())
        chunk = _next_chunk(float(errs[worst]) * math.sqrt(n), float(targets[worst]), n, max_probes - n)
    bar.close()
    return [samples[:, i] for i in range(len(weights))]


# ---------------------------------------------------------------------- traces.json
def save_traces(path: str | os.PathLike, traces: Mapping[str, TraceEstimate], meta: dict) -> None:
    """Write ``{"layers": {name: {mean, std_err, n, numel, estimator}}, "meta": {...}}`` atomically."""
    data = {"layers": {name: asdict(t) for name, t in traces.items()},
            "meta": {"format_version": TRACES_FORMAT_VERSION, **dict(meta)}}
    try:
        text = json.dumps(data, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise HawqError(f"traces: cannot write {path}: {e}") from None
    atomic_write_text(path, text + "\n")


def load_traces(path: str | os.PathLike) -> tuple[dict[str, TraceEstimate], dict]:
    """Read a ``traces.json`` written by :func:`save_traces`, validating every field."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HawqError(f"traces file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise HawqError(f"traces file {path}: invalid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise HawqError(f"traces file {path}: expected an object with 'layers'")
    out: dict[str, TraceEstimate] = {}
    for name, rec in data["layers"].items():
        fields = {"mean", "std_err", "n", "numel"}
        if not isinstance(rec, dict) or not fields <= set(rec) <= fields | {"estimator", "curvature", "note"}:
            raise HawqError(f"traces file {path}: layer '{name}' must have exactly mean, std_err, n, numel "
                            "(and optionally estimator, curvature, note)")
        try:
            t = TraceEstimate(float(rec["mean"]), float(rec["std_err"]), int(rec["n"]), int(rec["numel"]),
                              str(rec.get("estimator", "hutchinson")), str(rec.get("curvature", "hessian")),
                              str(rec.get("note", "")))
        except (TypeError, ValueError):
            raise HawqError(f"traces file {path}: layer '{name}' has a non-numeric field") from None
        if (not math.isfinite(t.mean) or t.numel < 1 or t.estimator not in ESTIMATORS
                or t.curvature not in CURVATURES or t.n < (0 if t.estimator == "gauss_newton" else 1)):
            raise HawqError(f"traces file {path}: layer '{name}' has an invalid estimate {rec}")
        out[name] = t
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        raise HawqError(f"traces file {path}: 'meta' must be an object")
    return out, meta


# ---------------------------------------------------------------------- cache key
def _hash_tensor(h: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too


def batches_fingerprint(batches: Sequence[Any]) -> str:
    """sha256 of every tensor (dtype, shape, bytes) and scalar in the batches, in order."""
    h = hashlib.sha256()

    def visit(obj: Any) -> None:
        if isinstance(obj, Tensor):
            _hash_tensor(h, obj)
        elif isinstance(obj, Mapping):
            for k in sorted(obj, key=str):
                h.update(repr(k).encode())
                visit(obj[k])
        elif isinstance(obj, (list, tuple)):
            h.update(f"[{len(obj)}".encode())
            for o in obj:
                visit(o)
        else:
            h.update(repr(obj).encode())

    for b in batches:
        visit(b)
        h.update(b"|")
    return h.hexdigest()


def traces_cache_key(model: nn.Module, batches_fingerprint: str, config_dict: Mapping[str, Any]) -> str:
    """sha256 over the model's parameters and buffers, the data fingerprint and the config.

    Store it in ``traces.json``'s meta; a pipeline can reuse the file when the key matches.
    """
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        _hash_tensor(h, t)
    h.update(str(batches_fingerprint).encode())
    try:
        h.update(json.dumps(dict(config_dict), sort_keys=True, default=str).encode())
    except (TypeError, ValueError) as e:
        raise HawqError(f"traces_cache_key: config is not serialisable ({e})") from None
    return h.hexdigest()


def per_parameter(traces: Mapping[str, TraceEstimate]) -> dict[str, float]:
    """``trace / numel`` per layer (the HAWQ-V2/V3 normalisation)."""
    return {name: t.mean / t.numel for name, t in traces.items()}
