"""Hessian spectrum: top eigenvalues (power iteration with deflation) and the eigenvalue density
(stochastic Lanczos quadrature, as in PyHessian / Ghorbani et al. 2019)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hawq import HawqError, bars_off
from hawq.sensitivity.hvp import HessianOperator, LossFn, resolve_layers
from hawq.sensitivity.traces import rademacher_like


def _resolve(model: nn.Module, layers: str | Sequence[str] | None) -> tuple[list[str], list[nn.Parameter]]:
    """``None`` -> every parameter that requires grad (the whole-model Hessian); else layer weights."""
    if layers is None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise HawqError("the model has no parameters that require grad: nothing to differentiate")
        return [n for n, _ in named], [p for _, p in named]
    return resolve_layers(model, [layers] if isinstance(layers, str) else list(layers))


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _axpy(alpha: float, x: Sequence[Tensor], y: Sequence[Tensor]) -> list[Tensor]:
    return [yi + alpha * xi for xi, yi in zip(x, y)]


def _scale(alpha: float, x: Sequence[Tensor]) -> list[Tensor]:
    return [alpha * xi for xi in x]


def _normalize(x: Sequence[Tensor]) -> list[Tensor]:
    norm = math.sqrt(_dot(x, x))
    if norm == 0.0:
        raise HawqError("internal: zero vector in the eigen-solver")
    return _scale(1.0 / norm, x)


def _orthogonalize(x: list[Tensor], basis: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    # twice is enough (Kahan): one Gram-Schmidt pass loses orthogonality in float32
    for _ in range(2):
        for b in basis:
            x = _axpy(-_dot(x, b), b, x)
    return x


def _randn_like(weights: Sequence[Tensor], seed: int) -> list[Tensor]:
    device = weights[0].device
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(w.shape, generator=gen, device=device, dtype=w.dtype) for w in weights]


@dataclass
class TopEigen:
    """Top eigenpairs, largest magnitude first. ``vectors[i]`` maps parameter names to tensors."""

    values: list[float]
    vectors: list[dict[str, Tensor]]
    iterations: list[int]
    residuals: list[float]  # ||H v - lambda v|| / |lambda| at exit


def top_eigenvalues(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], k: int = 1,
                    layers: str | Sequence[str] | None = None, max_iter: int = 100, tol: float = 1e-3,
                    seed: int = 0, progress: bool = True, method: str = "auto") -> TopEigen:
    """The ``k`` eigenvalues of largest magnitude of the Hessian (power iteration with deflation).

    ``layers=None`` uses every parameter that requires grad; a layer name (or list) restricts the
    Hessian to those layers' weights. Each eigenpair stops when ``||Hv - lambda v|| <= tol * |lambda|``
    or after ``max_iter`` HVPs. Power iteration converges at the rate ``|lambda_2 / lambda_1|``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise HawqError(f"k must be a positive integer, got {k!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise HawqError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise HawqError(f"tol must be a positive number, got {tol!r}")
    names, weights = _resolve(model, layers)
    dim = sum(w.numel() for w in weights)
    if k > dim:
        raise HawqError(f"k={k} exceeds the Hessian size ({dim})")
    values: list[float] = []
    vectors: list[list[Tensor]] = []
    iterations: list[int] = []
    residuals: list[float] = []
    bar = tqdm(total=k * max_iter, desc="top eigenvalues", unit="hvp", disable=bars_off(progress), leave=False)
    with HessianOperator(model, loss_fn, batches, names, weights, method=method) as op:
        for i in range(k):
            v = _normalize(_orthogonalize(_randn_like(weights, seed + i), vectors))
            lam, res, it = 0.0, math.inf, 0
            for it in range(1, max_iter + 1):  # noqa: B007  (it is reported)
                hv = _orthogonalize(op.hvp(v), vectors)  # deflation: stay in the complement
                lam = _dot(v, hv)
                r = _axpy(-lam, v, hv)
                res = math.sqrt(_dot(r, r)) / max(abs(lam), 1e-300)
                bar.update(1)
                if res <= tol:
                    break
                norm = math.sqrt(_dot(hv, hv))
                if norm == 0.0:  # v lies in the null space: the remaining spectrum is zero
                    lam, res = 0.0, 0.0
                    break
                v = _scale(1.0 / norm, hv)
            values.append(lam)
            vectors.append([t.detach() for t in v])
            iterations.append(it)
            residuals.append(res)
    bar.close()
    return TopEigen(values, [dict(zip(names, vec)) for vec in vectors], iterations, residuals)


@dataclass
class SpectralDensity:
    """SLQ result: for each of ``n_v`` runs, Ritz values (nodes) and their quadrature weights."""

    nodes: list[list[float]]
    weights: list[list[float]]
    dim: int  # Hessian size
    meta: dict[str, Any] = field(default_factory=dict)

    def evaluate(self, grid: Tensor, sigma: float) -> Tensor:
        """Gaussian-smoothed density on ``grid``, averaged over runs; integrates to ~1."""
        dens = torch.zeros_like(grid, dtype=torch.float64)
        for nodes, weights in zip(self.nodes, self.weights):
            nd = torch.tensor(nodes, dtype=torch.float64)
            wt = torch.tensor(weights, dtype=torch.float64)
            kern = torch.exp(-((grid.double()[:, None] - nd[None]) ** 2) / (2 * sigma**2))
            dens += (kern * wt[None]).sum(1) / (sigma * math.sqrt(2 * math.pi))
        return dens / max(len(self.nodes), 1)

    def trace(self) -> float:
        """Trace estimate implied by the quadrature: dim * mean over runs of sum(w * node)."""
        runs = [sum(w * x for w, x in zip(ws, xs)) for xs, ws in zip(self.nodes, self.weights)]
        return self.dim * sum(runs) / max(len(runs), 1)


def spectral_density(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], n_iter: int = 100,
                     n_v: int = 1, layers: str | Sequence[str] | None = None, seed: int = 0,
                     progress: bool = True, method: str = "auto") -> SpectralDensity:
    """Stochastic Lanczos quadrature of the Hessian's eigenvalue density.

    Each of the ``n_v`` runs starts Lanczos from a normalised Rademacher vector and runs ``n_iter``
    steps with full reorthogonalisation (memory: ``n_iter`` copies of the weights); the tridiagonal
    matrix's eigenvalues are the nodes and the squared first components of its eigenvectors the
    weights. Lanczos stops early if it finds an invariant subspace (then the quadrature is exact).
    """
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise HawqError(f"n_iter must be a positive integer, got {n_iter!r}")
    if isinstance(n_v, bool) or not isinstance(n_v, int) or n_v < 1:
        raise HawqError(f"n_v must be a positive integer, got {n_v!r}")
    names, weights = _resolve(model, layers)
    dim = sum(w.numel() for w in weights)
    steps = min(n_iter, dim)
    all_nodes, all_weights = [], []
    bar = tqdm(total=n_v * steps, desc="spectral density", unit="hvp", disable=bars_off(progress), leave=False)
    with HessianOperator(model, loss_fn, batches, names, weights, method=method) as op:
        for run in range(n_v):
            v = _normalize(rademacher_like(weights, seed + run))
            basis: list[list[Tensor]] = [v]
            alphas: list[float] = []
            betas: list[float] = []
            for step in range(steps):
                w = op.hvp(v)
                alpha = _dot(w, v)
                alphas.append(alpha)
                bar.update(1)
                if step == steps - 1:
                    break
                w = _axpy(-alpha, v, w)
                if betas:
                    w = _axpy(-betas[-1], basis[-2], w)
                w = _orthogonalize(w, basis)
                beta = math.sqrt(_dot(w, w))
                scale = math.sqrt(max(abs(a) for a in alphas) ** 2 + (max(betas) if betas else 0.0) ** 2)
                if beta <= 1e-10 * max(scale, 1e-300):
                    break  # invariant subspace: the Ritz values are exact eigenvalues
                betas.append(beta)
                v = _scale(1.0 / beta, w)
                basis.append(v)
            m = len(alphas)
            tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if m > 1:
                off = torch.tensor(betas[: m - 1], dtype=torch.float64)
                tri += torch.diag(off, 1) + torch.diag(off, -1)
            evals, evecs = torch.linalg.eigh(tri)
            all_nodes.append(evals.tolist())
            all_weights.append((evecs[0] ** 2).tolist())
    bar.close()
    return SpectralDensity(all_nodes, all_weights, dim, {"n_iter": n_iter, "n_v": n_v, "seed": seed,
                                                         "layers": None if layers is None else names})


def plot_density(density: SpectralDensity, path: str | os.PathLike, sigma: float | None = None,
                 points: int = 1000) -> None:
    """Write the smoothed eigenvalue density as a PNG (log-scale y, as PyHessian plots it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [x for run in density.nodes for x in run]
    if not nodes:
        raise HawqError("plot_density: the density has no nodes")
    lo, hi = min(nodes), max(nodes)
    span = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    sig = sigma if sigma is not None else 0.01 * span
    if not sig > 0:
        raise HawqError(f"plot_density: sigma must be positive, got {sig}")
    grid = torch.linspace(lo - 0.05 * span - 3 * sig, hi + 0.05 * span + 3 * sig, points, dtype=torch.float64)
    dens = density.evaluate(grid, sig).clamp_min(1e-12)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.semilogy(grid.numpy(), dens.numpy())
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (smoothed)")
        ax.set_title(f"Hessian eigenvalue density (SLQ, {len(density.nodes)} run(s), sigma={sig:.3g})")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
