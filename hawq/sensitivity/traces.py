"""Per-layer Hessian traces by Hutchinson's estimator.

Two probing schemes, both unbiased for ``tr(H_ll)``:

* per layer (default): the probe ``v_l`` lives on layer ``l`` only and ``v_l . H_ll v_l`` comes from
  a double backward of that layer's gradient. All layers share one gradient graph per batch.
* joint: one probe ``v`` on all layers, one full HVP, and ``v_l . (H v)_l`` for every layer: its
  expectation is ``tr(H_ll) + sum_{m != l} E[v_l^T H_lm v_m] = tr(H_ll)`` (independent, zero-mean
  blocks), but the cross terms add ``sum_{m != l} ||H_lm||_F^2`` to the variance. On ResNets the
  off-diagonal blocks dominate and joint probing needs hundreds of times more probes (measured in
  scripts/bench_sensitivity.py), so it is opt-in.
"""

from __future__ import annotations

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

from hawq import HawqError
from hawq.bitmap import atomic_write_text
from hawq.sensitivity.hvp import HessianOperator, LossFn, resolve_layers

TRACES_FORMAT_VERSION = 1


@dataclass
class TraceEstimate:
    """Hutchinson estimate of the trace of one layer's Hessian block."""

    mean: float  # estimated trace
    std_err: float  # standard error of ``mean`` (sample std over probes / sqrt(n))
    n: int  # probes used
    numel: int  # number of weights in the layer (per-parameter trace = mean / numel)


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


def _stopping_targets(means: Tensor, tol: float) -> Tensor:
    # relative tolerance per layer, with an absolute floor so near-zero traces cannot stall the loop
    floor = tol * 1e-3 * float(means.abs().max()) if means.numel() else 0.0
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
                   meta: dict | None = None, method: str = "auto",
                   probing: str = "per_layer", probes_per_pass: int = 1) -> dict[str, TraceEstimate]:
    """Hutchinson estimate of ``tr(H_ll)`` for each layer's ``.weight`` block of the Hessian.

    ``H`` is the Hessian of ``mean over batches of loss_fn(model, batch)``; probes are seeded
    Rademacher vectors. A layer stops once ``std_err <= max(tol * |trace|, tol * 1e-3 * max_l |trace_l|)``
    after ``min_probes``, or at ``max_probes``. The model's buffers and weights are left exactly as
    they were; the caller picks ``model.eval()`` or ``model.train()``. ``meta`` is the caller's
    bookkeeping and is not read.

    ``probing``: "per_layer" (default) draws each layer's probe on that layer alone and answers it
    with a double backward from that layer's gradient, on one shared graph per batch; converged
    layers stop drawing. "joint" draws one probe on all layers and reads every layer's estimate
    off one full HVP; it is unbiased too, but the off-diagonal blocks add ``sum_m ||H_lm||_F^2``
    to each layer's variance (see docs/sensitivity.md for when that pays). ``method``: "auto"
    (double backward, finite differences where that is unsupported), "autograd" or
    "finite_difference". ``probes_per_pass > 1`` answers that many per-layer probes in one vmapped
    double backward (``is_grads_batched``); the numbers then differ from 1 only by rounding.
    """
    del meta  # the caller's record; nothing here depends on it
    if isinstance(max_probes, bool) or not isinstance(max_probes, int) or max_probes < 2:
        raise HawqError(f"max_probes must be an integer >= 2, got {max_probes!r}")
    if isinstance(min_probes, bool) or not isinstance(min_probes, int) or not 2 <= min_probes <= max_probes:
        raise HawqError(f"min_probes must be an integer in 2..max_probes ({max_probes}), got {min_probes!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise HawqError(f"tol must be a finite number >= 0, got {tol!r}")
    if probing not in ("per_layer", "joint"):
        raise HawqError(f"probing must be 'per_layer' or 'joint', got {probing!r}")
    batches = list(batches)
    names, weights = resolve_layers(model, layers)
    with HessianOperator(model, loss_fn, batches, names, weights, method=method,
                         probes_per_pass=probes_per_pass) as op:
        run = _per_layer if probing == "per_layer" else _joint
        samples = run(op, names, weights, tol, max_probes, min_probes, seed, progress)
    out = {}
    for name, s, w in zip(names, samples, weights):
        mean, err = _summary(s[:, None])
        out[name] = TraceEstimate(float(mean[0]), float(err[0]), int(s.shape[0]), w.numel())
    return out


def _next_chunk(std: float, target: float, n: int, max_probes: int) -> int:
    # probes still needed if the sample variance holds, at most doubling n per round
    need = int(math.ceil((std / max(target, 1e-300)) ** 2)) - n
    return max(1, min(need, n, max_probes - n))


def _per_layer(op: HessianOperator, names: list[str], weights: list[nn.Parameter], tol: float,
               max_probes: int, min_probes: int, seed: int, progress: bool) -> list[Tensor]:
    """Block-masked probes: probe j of layer ``name`` depends only on (seed, name, j)."""
    samples = [torch.zeros(0, dtype=torch.float64) for _ in weights]
    chunks = {i: min_probes for i in range(len(weights))}
    total = len(weights) * max_probes
    bar = tqdm(total=total, desc="hessian traces", unit="hvp", disable=not progress, leave=False)
    while chunks:
        def probe(j: int, i: int, start: int) -> Tensor:
            return rademacher_like([weights[i]], probe_seed(seed, names[i], start + j))[0]

        requests = {i: (functools.partial(probe, i=i, start=samples[i].shape[0]), c) for i, c in chunks.items()}
        got = op.block_quadratic_forms(requests)
        for i, q in got.items():
            samples[i] = torch.cat([samples[i], q.cpu()])
        bar.update(sum(chunks.values()))
        means = torch.stack([s.mean() for s in samples])
        targets = _stopping_targets(means, tol)
        nxt = {}
        for i in chunks:
            n = samples[i].shape[0]
            std = float(samples[i].std(unbiased=True))
            if n < max_probes and std / math.sqrt(n) > float(targets[i]):
                # a kept graph makes rounds free: check after every probe and never overshoot
                nxt[i] = 1 if op.graph_is_kept else _next_chunk(std, float(targets[i]), n, max_probes)
        chunks = nxt
        if progress:
            bar.set_postfix(active=len(chunks))
    bar.close()
    return samples


def _joint(op: HessianOperator, names: list[str], weights: list[nn.Parameter], tol: float, max_probes: int,
           min_probes: int, seed: int, progress: bool) -> list[Tensor]:
    """One probe on all layers, one full HVP per probe; probe j depends only on (seed, j)."""
    samples = torch.zeros(0, len(weights), dtype=torch.float64)
    bar = tqdm(total=max_probes, desc="hessian traces", unit="hvp", disable=not progress, leave=False)
    chunk = min_probes
    while True:
        start = samples.shape[0]
        q = op.quadratic_forms(
            lambda j, s=start: rademacher_like(weights, probe_seed(seed, "joint", s + j)), chunk)
        samples = torch.cat([samples, q.cpu()])
        bar.update(chunk)
        n = samples.shape[0]
        means, errs = _summary(samples)
        targets = _stopping_targets(means, tol)
        if n >= max_probes or bool((errs <= targets).all()):
            break
        ratio = errs / targets.clamp_min(1e-300)
        worst = int(ratio.argmax())
        chunk = _next_chunk(float(errs[worst]) * math.sqrt(n), float(targets[worst]), n, max_probes)
    bar.close()
    return [samples[:, i] for i in range(len(weights))]


# ---------------------------------------------------------------------- traces.json
def save_traces(path: str | os.PathLike, traces: Mapping[str, TraceEstimate], meta: dict) -> None:
    """Write ``{"layers": {name: {mean, std_err, n, numel}}, "meta": {...}}`` atomically."""
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
        if not isinstance(rec, dict) or set(rec) != {"mean", "std_err", "n", "numel"}:
            raise HawqError(f"traces file {path}: layer '{name}' must have exactly mean, std_err, n, numel")
        try:
            t = TraceEstimate(float(rec["mean"]), float(rec["std_err"]), int(rec["n"]), int(rec["numel"]))
        except (TypeError, ValueError):
            raise HawqError(f"traces file {path}: layer '{name}' has a non-numeric field") from None
        if not math.isfinite(t.mean) or t.n < 1 or t.numel < 1:
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
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


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
