"""Per-layer sensitivity criteria for the same ILP: what ``s_l`` to put in HAWQ's quadratic model.

HAWQ-V3's search minimises the predicted loss increase of a bit map

    Omega = sum_l s_l / n_l * ||Q(W_l) - W_l||^2

(``n_l`` weights in layer ``l``). Every function here returns ``{layer: {"mean": s_l, "numel": n_l}}``,
the shape :func:`hawq.search.build_search_problem` reads for its traces, so every criterion goes
through the same ILP, options and budgets. The criteria:

* ``hessian``: ``s_l = tr(H_ll)`` (HAWQ-V2/V3; :func:`hawq.sensitivity.hessian_traces`).
* ``eigen``: ``s_l = lambda_max(H_ll) * n_l`` (HAWQ-V1's curvature): then ``s_l / n_l ||dW||^2 =
  lambda_max ||dW||^2``, the worst case of ``dW^T H_ll dW`` over directions of that norm.
* ``fisher``: ``s_l = E_x E_{y ~ p(y|x)} ||grad_{W_l} -log p(y|x)||^2``, the trace of the (true)
  Fisher block with one label sampled from the model per example. For cross-entropy and for the
  label-free ``0.5 ||f - f_ref||^2`` loss (a unit Gaussian around the outputs) its expectation is
  the Gauss-Newton trace ``tr(J_l^T (d^2 l) J_l)``.
* ``empirical_fisher``: ``s_l = mean_i ||grad_{W_l} loss(x_i, y_i)||^2`` with the data labels: one
  gradient per example, no second derivative (cheap). At a point where the loss gradient vanishes
  per example (a label-free loss at its reference model) it is 0 and carries no information.
* ``qerror``: ``s_l = n_l``: no curvature, the ILP then minimises ``sum_l ||Q(W_l) - W_l||^2``.
* ``alpha``: data-free heavy-tailed self-regularization (Martin & Mahoney 2021): the power-law
  exponent ``alpha_l`` of the eigenvalue spectrum of ``W_l^T W_l / N`` (conv weights as ``kh * kw``
  slices of shape ``out x in``, eigenvalues pooled, as ``weightwatcher`` does). Smaller alpha = a
  heavier tail = more strongly correlated (better trained) weights, so more sensitive; the mapping
  is ``s_l / n_l = 1 / alpha_l`` (monotone, scale-free, no tuning constant).

:func:`fit_power_law` is the continuous power-law MLE of Clauset, Shalizi & Newman (2009) that the
``powerlaw`` package (and ``weightwatcher``) uses: for each candidate ``x_min``,
``alpha = 1 + m / sum_{x >= x_min} ln(x / x_min)`` over the ``m`` tail points, and ``x_min`` is the
candidate whose fitted CDF has the smallest Kolmogorov-Smirnov distance to the tail's.

:func:`predicted_loss_increase` evaluates ``Omega`` for one bit map from its per-layer perturbations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hawq import HawqError, bars_off
from hawq.sensitivity.hvp import NO_BATCHES, LossFn, resolve_layers
from hawq.sensitivity.spectrum import top_eigenvalues
from hawq.sensitivity.traces import hessian_traces

Sensitivity = dict[str, dict[str, float]]  # layer -> {"mean": s_l, "numel": n_l}
MIN_TAIL = 5  # fewest tail points a power-law fit may use
SampledLoss = Callable[[Tensor, Any, torch.Generator], Tensor]  # (outputs, batch, generator) -> loss


def _entry(mean: float, numel: int) -> dict[str, float]:
    if not math.isfinite(mean):
        raise HawqError(f"sensitivity: non-finite value {mean!r}")
    return {"mean": float(mean), "numel": int(numel)}


# ---------------------------------------------------------------------------------------------
# curvature criteria


def hessian_sensitivity(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], layers: Sequence[str],
                        seed: int = 0, progress: bool = False, **trace_kwargs: Any) -> Sensitivity:
    """``s_l = tr(H_ll)``: hawq's traces (exact where the network allows, Hutchinson elsewhere)."""
    traces = hessian_traces(model, loss_fn, batches, layers=list(layers), seed=seed, progress=progress,
                            **trace_kwargs)
    return {n: _entry(t.mean, t.numel) for n, t in traces.items()}


def eigen_sensitivity(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], layers: Sequence[str],
                      seed: int = 0, max_iter: int = 20, tol: float = 1e-2,
                      progress: bool = False) -> tuple[Sensitivity, dict[str, dict[str, float]]]:
    """``s_l = lambda_max(H_ll) * n_l`` by power iteration on each layer's own Hessian block.

    Returns the sensitivities and, per layer, ``{"eigenvalue", "iterations", "residual"}``
    (``||H v - lambda v|| / |lambda|`` at exit: how far from converged a ``max_iter`` stop left it).
    """
    names, weights = resolve_layers(model, list(layers))
    out: Sensitivity = {}
    info: dict[str, dict[str, float]] = {}
    for i, (name, w) in enumerate(zip(names, weights)):
        top = top_eigenvalues(model, loss_fn, batches, k=1, layers=name, max_iter=max_iter, tol=tol,
                              seed=seed + 7919 * i, progress=progress)
        lam = top.values[0]
        out[name] = _entry(lam * w.numel(), w.numel())
        info[name] = {"eigenvalue": lam, "iterations": top.iterations[0], "residual": top.residuals[0]}
    return out, info


def split_batch(batch: Any) -> list[Any]:
    """One batch (tensor, tuple/list of tensors, or dict of tensors) -> its examples, batches of one."""
    if isinstance(batch, Tensor):
        return [batch[i:i + 1] for i in range(batch.shape[0])]
    if isinstance(batch, (list, tuple)):
        parts = [split_batch(x) if isinstance(x, (Tensor, list, tuple, dict)) else None for x in batch]
        sizes = {len(p) for p in parts if p is not None}
        if len(sizes) != 1:
            raise HawqError("split_batch: the batch's tensors disagree on the batch size")
        n = sizes.pop()
        return [type(batch)(p[i] if p is not None else x for p, x in zip(parts, batch)) for i in range(n)]
    if isinstance(batch, dict):
        parts = {k: split_batch(v) for k, v in batch.items() if isinstance(v, (Tensor, list, tuple, dict))}
        sizes = {len(p) for p in parts.values()}
        if len(sizes) != 1:
            raise HawqError("split_batch: the batch's tensors disagree on the batch size")
        n = sizes.pop()
        return [{k: parts[k][i] if k in parts else v for k, v in batch.items()} for i in range(n)]
    raise HawqError(f"split_batch: cannot split a batch of type {type(batch).__name__}")


def sampled_cross_entropy(outputs: Tensor, batch: Any, generator: torch.Generator) -> Tensor:
    """``-log p(y|x)`` with ``y`` drawn from the model's own softmax (the true Fisher's label)."""
    del batch
    probs = F.softmax(outputs.detach().double(), dim=-1)
    y = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(outputs.device)
    return F.cross_entropy(outputs, y, reduction="sum")


def sampled_gaussian(outputs: Tensor, batch: Any, generator: torch.Generator) -> Tensor:
    """``0.5 ||y - f||^2`` with ``y = f + eps``, ``eps ~ N(0, I)``: its gradient is ``-eps^T J``, whose
    squared norm has expectation ``tr(J^T J)`` (the label-free loss's Gauss-Newton trace)."""
    del batch
    eps = torch.randn(outputs.shape, generator=generator, dtype=torch.float64).to(outputs.device, outputs.dtype)
    return -(eps * outputs).sum()


def _per_example_sq_grads(model: nn.Module, batches: Sequence[Any], names: Sequence[str],
                          weights: Sequence[nn.Parameter], example_loss: Callable[[nn.Module, Any], Tensor],
                          progress: bool) -> dict[str, float]:
    from tqdm.auto import tqdm

    sums = torch.zeros(len(names), dtype=torch.float64)
    count = 0
    examples = [ex for b in batches for ex in split_batch(b)]
    if not examples:
        raise HawqError(NO_BATCHES)
    for ex in tqdm(examples, desc="per-example gradients", disable=bars_off(progress), leave=False):
        loss = example_loss(model, ex)
        grads = torch.autograd.grad(loss, list(weights), allow_unused=True)
        sums += torch.tensor([0.0 if g is None else float(g.detach().double().pow(2).sum()) for g in grads],
                             dtype=torch.float64)
        count += 1
    return {n: float(sums[i] / count) for i, n in enumerate(names)}


def fisher_sensitivity(model: nn.Module, forward: Callable[[nn.Module, Any], Tensor], batches: Sequence[Any],
                       layers: Sequence[str], sampled_loss: SampledLoss, seed: int = 0,
                       progress: bool = False) -> Sensitivity:
    """``s_l`` = mean over examples of ``||grad_{W_l} sampled_loss||^2`` (one model-sampled label each).

    ``forward(model, batch)`` gives the outputs; ``sampled_loss`` draws the label and scores it
    (:func:`sampled_cross_entropy` for classifiers, :func:`sampled_gaussian` for the label-free
    distance). Examples are differentiated one at a time, so BatchNorm should be in eval mode.
    """
    names, weights = resolve_layers(model, list(layers))
    gen = torch.Generator().manual_seed(seed)
    sq = _per_example_sq_grads(model, batches, names, weights,
                               lambda m, ex: sampled_loss(forward(m, ex), ex, gen), progress)
    return {n: _entry(sq[n], w.numel()) for n, w in zip(names, weights)}


def empirical_fisher_sensitivity(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any],
                                 layers: Sequence[str], progress: bool = False) -> Sensitivity:
    """``s_l`` = mean over examples of ``||grad_{W_l} loss_fn(model, example)||^2`` (data labels)."""
    names, weights = resolve_layers(model, list(layers))
    sq = _per_example_sq_grads(model, batches, names, weights, loss_fn, progress)
    return {n: _entry(sq[n], w.numel()) for n, w in zip(names, weights)}


# ---------------------------------------------------------------------------------------------
# data-free criteria


def qerror_sensitivity(model: nn.Module, layers: Sequence[str]) -> Sensitivity:
    """``s_l = n_l``: every weight equally sensitive; the ILP minimises the total squared error."""
    modules = dict(model.named_modules())
    _check_layers(modules, layers)
    return {n: _entry(float(modules[n].weight.numel()), modules[n].weight.numel()) for n in layers}


def _check_layers(modules: Mapping[str, nn.Module], layers: Sequence[str]) -> None:
    if not layers:
        raise HawqError("layers is empty")
    for n in layers:
        if n not in modules or not isinstance(getattr(modules[n], "weight", None), Tensor):
            raise HawqError(f"unknown layer '{n}' (or it has no weight)")


def weight_esd(weight: Tensor) -> np.ndarray:
    """Eigenvalues of ``W^T W / N`` (``N`` the larger side), pooled over a conv's ``kh * kw`` slices.

    A 2-D weight (Linear ``out x in``, Embedding ``vocab x dim``) is one matrix; a conv weight
    ``(out, in, kh, kw)`` gives ``kh * kw`` matrices ``W[:, :, i, j]``. Each contributes its
    ``min(out, in)`` eigenvalues (squared singular values / N). Sorted ascending, float64.
    """
    w = weight.detach().double().cpu()
    if w.dim() == 2:
        mats = [w]
    elif w.dim() > 2:
        mats = [w[(slice(None), slice(None), *idx)] for idx in np.ndindex(*w.shape[2:])]
    else:
        raise HawqError(f"weight_esd: need a 2-D or conv weight, got shape {tuple(w.shape)}")
    evals = []
    for m in mats:
        n = max(m.shape)
        evals.append(torch.linalg.svdvals(m).pow(2).numpy() / n)
    return np.sort(np.concatenate(evals))


def fit_power_law(x: np.ndarray, min_tail: int = MIN_TAIL) -> dict[str, float]:
    """Continuous power-law fit ``p(x) ~ x^-alpha`` for ``x >= x_min`` (Clauset et al. 2009).

    Every distinct value leaving at least ``min_tail`` points in the tail is a candidate ``x_min``;
    for each, ``alpha = 1 + m / sum ln(x / x_min)`` (MLE), and the candidate with the smallest KS
    distance ``D`` between the tail's empirical CDF and ``1 - (x / x_min)^(1 - alpha)`` wins.
    Returns ``{"alpha", "xmin", "D", "n_tail", "n"}``. Non-positive values are dropped.
    """
    x = np.sort(np.asarray(x, dtype=np.float64))
    x = x[x > 0]
    if x.size < min_tail or min_tail < 2:
        raise HawqError(f"fit_power_law: need at least {max(min_tail, 2)} positive values, got {x.size}")
    logs = np.log(x)
    # suffix sums of ln x: tail starting at index k has m = n - k points and sum ln x = suffix[k]
    suffix = np.cumsum(logs[::-1])[::-1]
    best: dict[str, float] | None = None
    n = x.size
    for k in range(n - min_tail + 1):
        if k > 0 and x[k] == x[k - 1]:
            continue
        m = n - k
        denom = suffix[k] - m * logs[k]
        if denom <= 0:
            continue
        alpha = 1.0 + m / denom
        tail = x[k:]
        model_cdf = 1.0 - (tail / x[k]) ** (1.0 - alpha)
        # the empirical CDF below each point, i / m (the ``powerlaw`` package's convention)
        d = float(np.max(np.abs(np.arange(m) / m - model_cdf)))
        if best is None or d < best["D"]:
            best = {"alpha": float(alpha), "xmin": float(x[k]), "D": d, "n_tail": m, "n": n}
    if best is None:
        raise HawqError("fit_power_law: every candidate tail is constant")
    return best


def alpha_sensitivity(model: nn.Module, layers: Sequence[str], min_evals: int = 10,
                      ) -> tuple[Sensitivity, dict[str, dict[str, float]]]:
    """``s_l / n_l = 1 / alpha_l`` from each layer's weight spectrum (data-free; see module doc).

    Layers whose spectrum has fewer than ``min_evals`` eigenvalues (a 10-class head, a 1-channel
    stem) cannot be fitted reliably: they get the median alpha of the fitted layers and are marked
    ``"fitted": False`` in the returned per-layer info (``alpha``, ``xmin``, ``D``, ``n_tail``, ``n``).
    """
    if isinstance(min_evals, bool) or not isinstance(min_evals, int) or min_evals < MIN_TAIL:
        raise HawqError(f"alpha_sensitivity: min_evals must be an integer >= {MIN_TAIL}, got {min_evals!r}")
    modules = dict(model.named_modules())
    _check_layers(modules, layers)
    info: dict[str, dict[str, float]] = {}
    for name in layers:
        evals = weight_esd(modules[name].weight)
        if evals[evals > 0].size >= min_evals:
            info[name] = {**fit_power_law(evals), "fitted": True}
        else:
            info[name] = {"alpha": math.nan, "n": int(evals.size), "fitted": False}
    fitted = [v["alpha"] for v in info.values() if v["fitted"]]
    if not fitted:
        raise HawqError(f"alpha_sensitivity: no layer has {min_evals}+ eigenvalues to fit")
    median = float(np.median(fitted))
    out: Sensitivity = {}
    for name in layers:
        if not info[name]["fitted"]:
            info[name]["alpha"] = median
        numel = modules[name].weight.numel()
        out[name] = _entry(numel / info[name]["alpha"], numel)
    return out, info


# ---------------------------------------------------------------------------------------------
# the quadratic model


def predicted_loss_increase(sensitivity: Mapping[str, Mapping[str, float]],
                            perturbations: Mapping[str, Mapping[int, float]],
                            weight_bits: Mapping[str, int]) -> float:
    """``sum_l s_l / n_l * ||Q_{b_l}(W_l) - W_l||^2`` over the layers of ``weight_bits``.

    ``perturbations[l][b]`` is ``||Q_b(W_l) - W_l||^2`` (:func:`hawq.search.weight_perturbations`).
    """
    total = 0.0
    for name, b in weight_bits.items():
        if name not in sensitivity:
            raise HawqError(f"predicted_loss_increase: no sensitivity for layer '{name}'")
        if name not in perturbations or b not in perturbations[name]:
            raise HawqError(f"predicted_loss_increase: no perturbation for layer '{name}' at {b} bits")
        s = sensitivity[name]
        total += float(s["mean"]) / float(s["numel"]) * float(perturbations[name][b])
    return total
