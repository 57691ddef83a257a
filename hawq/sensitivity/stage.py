"""The sensitivity stage: per-layer Hessian traces of the FP32 model, cached in ``traces.json``.

HAWQ ranks layers by ``tr(H_l)``, the trace of the loss Hessian's diagonal block of layer ``l``
(estimated, or exact where the network is piecewise linear in the layer; see
:func:`hawq.sensitivity.hessian_traces`). Optional whole-model summaries: top eigenvalues and the
SLQ eigenvalue density (``density.png``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

from torch import nn

from hawq import HawqError
from hawq.keys import config_key
from hawq.run import Artifact, Run, cached, digest
from hawq.sensitivity import (
    batches_fingerprint,
    hessian_traces,
    label_free_loss,
    load_traces,
    plot_density,
    save_traces,
    spectral_density,
    task_loss,
    top_eigenvalues,
    traces_cache_key,
)
from hawq.train import distributed as D

log = logging.getLogger("hawq")

TRACES_FILE = "traces.json"


def _stored_key(run_dir: Path) -> str | None:
    path = run_dir / TRACES_FILE
    if not path.exists():
        return None
    try:
        _, meta = load_traces(path)
    except HawqError as e:
        raise HawqError(f"{e}; delete {path} (or run with --no-resume) to start the sensitivity "
                        "stage over") from None
    return meta.get("key")


def _save(run_dir: Path, value: tuple[dict[str, Any], dict[str, Any], Any], key: str) -> None:
    traces, meta, density = value
    if density is not None:
        plot_density(density, run_dir / "density.png")
    save_traces(run_dir / TRACES_FILE, traces, meta)


TRACES = Artifact("sensitivity", _stored_key, lambda run_dir: (*load_traces(run_dir / TRACES_FILE), None), _save)


def stage_sensitivity(run: Run) -> dict[str, Any]:
    """Per-layer Hessian traces (plus the optional spectrum), cached in ``traces.json``.

    Under torchrun each process takes the batches ``rank, rank + world, ...`` of the same seeded
    list and the Hessian operator sums over processes, so every process gets the traces one process
    computes on the whole list (up to float64 summation order). The cache key fingerprints the whole
    list, so a run on any number of processes reuses the traces of a run on any other number.
    """
    scfg = run.cfg.sensitivity
    all_batches = run.batches("train", scfg.batches, scfg.batch_size, shuffle=True, to_device=False)
    key = traces_cache_key(run.fp32, batches_fingerprint(all_batches),
                           {"sensitivity": config_key(scfg), "seed": run.cfg.run.seed, "layers": run.layers})
    computed: list[bool] = []

    def compute() -> tuple[dict[str, Any], dict[str, Any], Any]:
        computed.append(True)
        return _compute_traces(run, all_batches, key)

    traces, meta, _ = cached(run, TRACES, key, compute)
    run.results["sensitivity_meta"] = meta
    if computed:  # a reused file was checked when it was made
        check_informative(traces, run.main)
    return traces


def _compute_traces(run: Run, all_batches: list[Any], key: str) -> tuple[dict[str, Any], dict[str, Any], Any]:
    scfg = run.cfg.sensitivity
    model = copy.deepcopy(run.fp32)
    model.train(scfg.bn_mode == "train")
    world = D.get_world_size()
    if len(all_batches) < world and run.main:
        log.warning("sensitivity: %d batches for %d processes: some processes idle (set sensitivity.batches "
                    ">= %d)", len(all_batches), world, world)
    batches = [run.task.to_device(b, run.device) for b in D.shard(all_batches)]
    if scfg.label_free:
        # the copy, in the same BN mode, is the reference point: the residual is zero there, so this
        # Hessian is the Gauss-Newton matrix of the output distance
        loss_fn = label_free_loss(run.task, model)
    else:
        loss_fn = task_loss(run.task)  # outputs and a loss on them: exact Gauss-Newton traces where they apply
    kwargs = {**scfg.hutchinson_kwargs(), "seed": run.cfg.run.seed + scfg.seed}
    t0 = time.perf_counter()
    choice: dict[str, Any] = {}  # the estimator's exact-or-sampled decision and why
    traces = hessian_traces(model, loss_fn, batches, layers=run.layers, progress=run.progress, info=choice,
                            **kwargs)
    elapsed = time.perf_counter() - t0
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    meta = {"key": key, "bn_mode": scfg.bn_mode if has_bn else None, "label_free": scfg.label_free,
            "normalize": "per_param",  # what the search does with a trace (kept: traces.json's meta keys)
            "batches": len(all_batches), "batch_size": scfg.batch_size, "seed": kwargs["seed"],
            "tol": scfg.tol, "min_probes": scfg.min_probes, "max_probes": scfg.max_probes,
            "variance_reduction": scfg.variance_reduction, "estimator": scfg.estimator, "curvature": scfg.curvature,
            "exact_layers": sorted(n for n, t in traces.items() if t.estimator == "gauss_newton"),
            "sampled_layers": sorted(n for n, t in traces.items() if t.estimator == "gn_sampled"),
            "curvature_notes": {n: t.note for n, t in traces.items() if t.note},
            "output_space": choice.get("output_space"),
            "per_sample_layers": choice.get("per_sample_layers", []),
            "hvps": sum(t.n for t in traces.values() if t.estimator == "hutchinson"),
            "backward_passes": max((t.n for t in traces.values() if t.estimator in ("gauss_newton", "gn_sampled")),
                                   default=0),
            "seconds": round(elapsed, 3), "device": str(run.device), "processes": world}
    spectrum_batches = D.shard(all_batches[: scfg.spectrum_batches])
    spectrum, density = spectrum_summaries(run, model, loss_fn,
                                           [run.task.to_device(b, run.device) for b in spectrum_batches],
                                           kwargs["seed"])
    meta.update(spectrum)
    if world > 1:
        # The operator all-reduces every product, so the processes hold bit-identical estimates
        # (what DDP relies on for its gradients too). Check it; if they ever differed, rank 0's
        # numbers are the ones written, searched on and reported.
        mine = digest({k: dataclasses.asdict(v) for k, v in traces.items()}, spectrum)
        gathered = D.all_gather_object((len(batches), mine))
        meta["batches_per_process"] = [n for n, _ in gathered]
        meta["ranks_agree"] = len({d for _, d in gathered}) == 1
        if not meta["ranks_agree"]:
            log.warning("sensitivity: the %d processes computed different estimates; using rank 0's", world)
            traces, meta = D.broadcast_object((traces, meta))  # type: ignore[misc]
    return traces, meta, density


def check_informative(traces: dict[str, Any], warn: bool = True) -> None:
    """Sensitivity that carries no information makes the bit map arbitrary: stop on non-finite
    traces (the search cannot rank them), warn in one line when every trace is zero."""
    bad = sorted(n for n, t in traces.items() if not math.isfinite(t.mean))
    if bad:
        raise HawqError(f"sensitivity: the Hessian trace of '{bad[0]}' ({len(bad)} of {len(traces)} layers) is "
                        "not finite: the FP32 model's loss is not finite on this data (was it trained?)")
    if warn and traces and all(t.mean == 0 for t in traces.values()):
        log.warning("sensitivity: every Hessian trace is 0 (a flat or saturated loss: was the FP32 model "
                    "trained?); the bit map carries no sensitivity information")


def spectrum_summaries(run: Run, model: nn.Module, loss_fn: Any, batches: list[Any],
                       seed: int) -> tuple[dict[str, Any], Any]:
    """Optional whole-model curvature summaries: top eigenvalues and the SLQ eigenvalue density.

    Returns the summaries for ``traces.json``'s meta and the density (to plot), or None.
    """
    scfg = run.cfg.sensitivity
    out: dict[str, Any] = {}
    density = None
    if scfg.top_eigen > 0:
        top = top_eigenvalues(model, loss_fn, batches, k=scfg.top_eigen, seed=seed, progress=run.progress)
        out["top_eigenvalues"] = top.values
    if scfg.density_iter > 0:
        density = spectral_density(model, loss_fn, batches, n_iter=scfg.density_iter, seed=seed,
                                   progress=run.progress)
        out["density"] = {"nodes": density.nodes, "weights": density.weights, "png": "density.png",
                          "trace_estimate": density.trace()}
    return out, density
