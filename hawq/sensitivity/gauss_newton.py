"""Exact per-layer Hessian traces where the network is piecewise linear in each layer.

For a loss ``L = l(f(x; w))`` of the model outputs ``f``, the Hessian block of layer ``l`` is

    H_ll = J_l^T (d^2 l) J_l + sum_k (dl / df_k) d^2 f_k / dW_l^2.

If every operation between ``W_l`` and the outputs is linear or piecewise linear in its
``W_l``-dependent input (convolutions and matmuls with *other* layers' weights, ReLU, max-pool,
eval-mode BatchNorm, sums, average pools, reshapes, ...), then ``f`` is piecewise linear in ``W_l``
alone, its second derivative in ``W_l`` vanishes almost everywhere, and ``H_ll`` *equals* the
Gauss-Newton block ``J_l^T (d^2 l) J_l`` -- autograd's double backward computes the same matrix
(ReLU's derivative has derivative 0). Cross-layer blocks ``H_lm`` keep their second-order terms, but
a layer's trace needs only its own block.

When ``d^2 l`` is block diagonal over the samples (a mean or sum of per-sample losses), with
eigen-decompositions ``H_i = sum_k lambda_ik u_ik u_ik^T``,

    tr(H_ll) = sum_i sum_k lambda_ik ||d(u_ik . f_i) / dW_l||^2,

so one backward pass per output direction ``k``, read out *per sample* for every layer at once,
gives every certified layer's trace exactly: 9 backward passes for a 10-class classifier (plus one
that checks the per-sample split) instead of hundreds of Hessian-vector products per layer. The
per-sample weight-gradient norms come from each layer's input and output gradient (Linear:
``g_i^T x_i``; Conv2d: ``g_i U_i^T`` with ``U_i`` the unfolded input; Embedding: a masked Gram
matrix of positions), never from materialising all per-sample gradients at once.

Whether a layer is certified is read off the autograd graph of each batch (:func:`certify_piecewise_linear`),
conservatively: an op not known to be (piecewise) linear, a product of two tensors that both depend on
``W_l``, train-mode BatchNorm, or a weight used twice leaves the layer to Hutchinson's estimator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hawq import HawqError
from hawq.sensitivity.hvp import NO_BATCHES, _distributed, reduce_device, restore_buffers, snapshot_buffers
from hawq.sensitivity.losses import OutputLoss

# Ops that are linear in each input (sums of linear maps): any number of inputs may depend on W_l.
LINEAR_OPS = frozenset({
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "NegBackward0", "MulBackward1",
    "DivBackward1", "ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0", "AsStridedBackward0",
    "AliasBackward0", "CloneBackward0", "ToCopyBackward0", "ExpandBackward0", "PermuteBackward0",
    "TransposeBackward0", "TransposeBackward1", "TBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "UnsqueezeBackward0", "CatBackward0", "StackBackward0", "SliceBackward0",
    "SelectBackward0", "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0", "IndexBackward0",
    "RepeatBackward0", "ConstantPadNdBackward0", "SumBackward0", "SumBackward1", "MeanBackward0",
    "MeanBackward1", "AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0", "UpsampleNearest2DBackward0",
    "UpsampleBilinear2DBackward0", "FlattenBackward0", "NarrowBackward0", "ChunkBackward0",
    "EmbeddingBackward0",  # a row lookup: linear in the table (the indices are constants)
})
# Piecewise-linear ops: their second derivative is zero almost everywhere.
PIECEWISE_LINEAR_OPS = frozenset({
    "ReluBackward0", "LeakyReluBackward0", "HardtanhBackward0", "ThresholdBackward0",
    "MaxPool2DWithIndicesBackward0", "AdaptiveMaxPool2DBackward0", "MaximumBackward0", "MinimumBackward0",
    "ClampMinBackward0", "ClampMaxBackward0", "ClampBackward1",
})
# Bilinear ops: (indices of the two multiplied inputs); linear in W_l unless both depend on it.
BILINEAR_OPS = {
    "ConvolutionBackward0": (0, 1), "AddmmBackward0": (1, 2), "MmBackward0": (0, 1), "BmmBackward0": (0, 1),
    "MulBackward0": (0, 1), "MvBackward0": (0, 1), "DotBackward0": (0, 1), "BaddbmmBackward0": (1, 2),
}
SUPPORTED_MODULES = (nn.Conv2d, nn.Linear, nn.Embedding)
DIRECTION_RTOL = 1e-6  # output directions whose eigenvalues are all below this (relative) carry nothing
_CHUNK_ELEMENTS = 1 << 25  # cap on intermediate tensors of the per-sample norms (128 MiB in float32)


def certify_piecewise_linear(outputs: Tensor, weights: Sequence[Tensor], check_ops: bool = True) -> list[str | None]:
    """For each weight: None if ``outputs`` is piecewise linear in that weight alone (read off the
    autograd graph), else the reason (the op that breaks it). ``check_ops=False`` checks only that
    each weight is used exactly once (enough where the loss gradient in the outputs vanishes)."""
    index = {id(w): i for i, w in enumerate(weights)}
    reasons: list[str | None] = [None] * len(weights)
    uses = [0] * len(weights)
    if outputs.grad_fn is None:
        return ["outputs do not depend on the weights"] * len(weights)
    # post-order walk: a node's layer dependencies (bit mask) after all of its inputs'
    deps: dict[int, int] = {}
    order: list[Any] = []
    stack: list[tuple[Any, bool]] = [(outputs.grad_fn, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in deps:
            continue
        deps[id(node)] = 0  # placeholder: marks "visited"
        stack.append((node, True))
        stack.extend((nxt, False) for nxt, _ in node.next_functions if nxt is not None and id(nxt) not in deps)
    for node in order:
        var = getattr(node, "variable", None)
        if var is not None:
            deps[id(node)] = 1 << index[id(var)] if id(var) in index else 0
            continue
        inputs = [deps.get(id(nxt), 0) if nxt is not None else 0 for nxt, _ in node.next_functions]
        for nxt, _ in node.next_functions:
            var = getattr(nxt, "variable", None)
            if var is not None and id(var) in index:
                uses[index[id(var)]] += 1
        mask = 0
        for m in inputs:
            mask |= m
        deps[id(node)] = mask
        if not mask or not check_ops:
            continue
        name = node.name()
        if name in LINEAR_OPS or name in PIECEWISE_LINEAR_OPS:
            bad = 0
        elif name in BILINEAR_OPS:
            a, b = BILINEAR_OPS[name]
            bad = (inputs[a] if a < len(inputs) else 0) & (inputs[b] if b < len(inputs) else 0)
        elif name == "NativeBatchNormBackward0" and not bool(getattr(node, "_saved_training", True)):
            bad = inputs[0] & (inputs[1] if len(inputs) > 1 else 0)  # eval BN: affine in x, bilinear with gamma
        elif name == "DivBackward0":
            bad = inputs[1] if len(inputs) > 1 else 0  # linear in the numerator only
        else:
            bad = mask
        for i in range(len(weights)):
            if bad >> i & 1 and reasons[i] is None:
                reasons[i] = f"op '{name}' is not piecewise linear in it"
    for i, n in enumerate(uses):
        if n != 1 and reasons[i] is None:
            reasons[i] = "weight is used more than once" if n else "the outputs do not use the weight"
    return reasons


def output_hessian(outputs: Tensor, loss_of_outputs: Any, seed: int = 0) -> tuple[Tensor, bool] | str:
    """Per-sample Hessians ``(B, C, C)`` of the loss w.r.t. the outputs (flattened per sample) and
    whether the loss gradient in the outputs vanishes (to float rounding), or the reason the Hessian
    is not block diagonal over samples. ``C`` double backwards on the loss alone."""
    b = outputs.shape[0]
    leaf = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_of_outputs(leaf)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return "the loss is not a scalar"
        (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
        g = g.reshape(b, -1)
        c = g.shape[1]
        rows = []
        for j in range(c):
            (row,) = torch.autograd.grad(g[:, j].sum(), leaf, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(leaf) if row is None else row)
        hess = torch.stack([r.reshape(b, c) for r in rows], dim=1)  # row j of H_i = d(g_ij)/d f_i
        # the rows above sum over samples; block diagonality makes them per-sample: check on a random vector
        gen = torch.Generator(device=outputs.device).manual_seed(seed)
        w = torch.randn(b, c, generator=gen, device=outputs.device, dtype=outputs.dtype)
        (full,) = torch.autograd.grad((g * w).sum(), leaf, allow_unused=True)
    full = torch.zeros_like(leaf) if full is None else full
    pred = torch.einsum("bcd,bd->bc", hess, w)
    scale = float(full.abs().max()) + float(pred.abs().max()) + 1e-30
    if float((full.reshape(b, c) - pred).abs().max()) > 1e-4 * scale:
        return "the loss couples samples (its Hessian in the outputs is not block diagonal)"
    # |g| against |outputs| * |H|: the relative size of the residual f - f* for a quadratic loss
    size = float(outputs.detach().abs().max()) * float(hess.abs().max())
    residual_free = float(g.detach().abs().max()) <= 1e-6 * size
    return (hess + hess.transpose(1, 2)) / 2, residual_free


def per_sample_sq_norms(module: nn.Module, x: Tensor, grad_out: Tensor) -> Tensor:
    """``||dL_i / dW||^2`` for each sample ``i`` of a Conv2d/Linear/Embedding layer, from its input ``x`` and the
    gradient of its output (float64, shape ``(B,)``). Samples are taken in chunks that keep the
    unfolded input and the per-sample products below ``_CHUNK_ELEMENTS`` each."""
    b = x.shape[0]
    if isinstance(module, nn.Embedding):
        step = max(1, _CHUNK_ELEMENTS // max(1, x[0].numel() ** 2))
        return torch.cat([_embedding_sq_norms(module, x[s:s + step], grad_out[s:s + step])
                          for s in range(0, b, step)])
    if isinstance(module, nn.Linear):
        positions, k, c, groups = x[0].numel() // x.shape[-1], x.shape[-1], grad_out.shape[-1], 1
    else:
        positions, c, groups = grad_out[0, 0].numel(), grad_out.shape[1], module.groups
        k = module.in_channels * math.prod(module.kernel_size)
    kg, cg = k // groups, c // groups
    # one sample's gradient (C x K) against Gram matrices of its positions (T x T), whichever is smaller
    direct = positions == 1 or kg * cg <= positions * (kg + cg)
    per_sample = max(positions * k, groups * (kg * cg if direct else positions * positions))
    step = max(1, _CHUNK_ELEMENTS // per_sample)
    return torch.cat([_sq_norms(module, x[s:s + step], grad_out[s:s + step], groups, direct)
                      for s in range(0, b, step)])


def _embedding_sq_norms(module: nn.Embedding, idx: Tensor, grad_out: Tensor) -> Tensor:
    """Sample i's table gradient has row r = sum of g_t over its positions t with idx_t = r, so its
    squared norm is sum_{t,t'} [idx_t = idx_t'] g_t . g_t' (a Gram matrix of positions, masked)."""
    b = idx.shape[0]
    ids = idx.reshape(b, -1)
    gs = grad_out.reshape(b, ids.shape[1], -1).double()
    same = ids[:, :, None] == ids[:, None, :]
    if module.padding_idx is not None:  # the padding row gets no gradient
        keep = ids != module.padding_idx
        same = same & keep[:, :, None] & keep[:, None, :]
    return (torch.bmm(gs, gs.transpose(1, 2)) * same).sum((1, 2))


def _sq_norms(module: nn.Module, x: Tensor, grad_out: Tensor, groups: int, direct: bool) -> Tensor:
    b = x.shape[0]
    if isinstance(module, nn.Linear):
        xs = x.reshape(b, -1, x.shape[-1])  # (B, positions, K)
        gs = grad_out.reshape(b, -1, grad_out.shape[-1])  # (B, positions, C)
    else:
        pad = 0 if module.padding == "valid" else module.padding
        xs = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=pad, stride=module.stride)
        xs = xs.transpose(1, 2)
        gs = grad_out.reshape(b, grad_out.shape[1], -1).transpose(1, 2)
    t, k, c = xs.shape[1], xs.shape[2], gs.shape[2]
    if groups > 1:  # (B * groups, positions, K / groups): group g's weights see group g's channels only
        xs = xs.reshape(b, t, groups, k // groups).permute(0, 2, 1, 3).reshape(b * groups, t, k // groups)
        gs = gs.reshape(b, t, groups, c // groups).permute(0, 2, 1, 3).reshape(b * groups, t, c // groups)
    if t == 1:
        out = xs.double().square().sum((1, 2)) * gs.double().square().sum((1, 2))
    elif direct:
        out = torch.bmm(gs.transpose(1, 2), xs).double().square().sum((1, 2))
    else:
        out = (torch.bmm(xs, xs.transpose(1, 2)).double() * torch.bmm(gs, gs.transpose(1, 2)).double()).sum((1, 2))
    return out.reshape(b, groups).sum(1) if groups > 1 else out


def _module_supported(module: nn.Module) -> str | None:
    if not isinstance(module, SUPPORTED_MODULES) or type(module).forward not in (
            nn.Conv2d.forward, nn.Linear.forward, nn.Embedding.forward):
        return f"per-sample norms of {type(module).__name__} are not implemented"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse
                                             or module.scale_grad_by_freq):
        return "Embedding with max_norm, sparse or frequency-scaled gradients is not implemented"
    if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or module.padding == "same"):
        return "Conv2d padding other than zeros / explicit is not implemented"
    return None


def gauss_newton_traces(model: nn.Module, loss_fn: OutputLoss, batches: Sequence[Any], names: Sequence[str],
                        weights: Sequence[nn.Parameter], max_directions: int, seed: int = 0,
                        progress: bool = True) -> tuple[dict[str, tuple[float, int]], dict[str, str]]:
    """Exact ``tr(H_ll)`` (mean over batches) for every layer the graph certifies piecewise linear.

    Returns ``({name: (trace, backward passes)}, {name: reason})``: each layer is in exactly one of the
    two (the second for layers left to Hutchinson's estimator). Outputs with more than
    ``max_directions`` entries per sample are not decomposed (every layer is left out). Under
    ``torch.distributed`` ranks sum their batches, and a layer certified on every rank only is kept.
    Buffers (BatchNorm running statistics) are restored exactly.
    """
    modules = dict(model.named_modules())
    reasons: dict[str, str] = {}
    for name in names:
        why = _module_supported(modules[name])
        if why:
            reasons[name] = why
    sums = torch.zeros(len(names), dtype=torch.float64)
    passes = 0
    saved = snapshot_buffers(model)
    bar = tqdm(total=len(batches), desc="gauss-newton traces", unit="batch", disable=not progress, leave=False)
    try:
        for bi, batch in enumerate(batches):
            if len(reasons) == len(names):
                break
            passes += _one_batch(model, loss_fn, batch, bi, names, weights, modules, reasons, sums,
                                 max_directions, seed)
            bar.update(1)
    finally:
        bar.close()
        restore_buffers(saved)
    count = torch.tensor([float(len(batches))], dtype=torch.float64)
    bad = torch.tensor([1.0 if n in reasons else 0.0 for n in names], dtype=torch.float64)
    if _distributed():
        device = reduce_device(weights)
        packed = torch.cat([sums, count, bad, torch.tensor([float(passes)], dtype=torch.float64)]).to(device)
        flags = bad.to(device)
        dist.all_reduce(packed)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        packed, flags = packed.cpu(), flags.cpu()
        sums, count, passes = packed[:len(names)], packed[len(names):len(names) + 1], int(packed[-1])
        for name, f in zip(names, flags.tolist()):
            if f and name not in reasons:
                reasons[name] = "not certified on another rank"
    if not count[0]:
        raise HawqError(NO_BATCHES)
    exact = {n: (float(sums[i] / count[0]), passes) for i, n in enumerate(names) if n not in reasons}
    return exact, reasons


def _one_batch(model: nn.Module, loss_fn: OutputLoss, batch: Any, bi: int, names: Sequence[str],
               weights: Sequence[nn.Parameter], modules: dict[str, nn.Module], reasons: dict[str, str],
               sums: Tensor, max_directions: int, seed: int) -> int:
    """Add one batch's exact traces to ``sums`` (and new reasons to ``reasons``); returns backward passes."""
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in names if n not in reasons}

    def hook_for(name: str) -> Any:
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            seen[name].append((args[0].detach(), out))
            # the model continues on a copy, so an in-place op after the layer (ReLU(inplace=True))
            # cannot rebase the tensor whose gradient is read below
            return out.clone()
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in seen]
    try:
        with torch.enable_grad():
            outputs = loss_fn.forward(model, batch)
    finally:
        for h in handles:
            h.remove()

    def leave_all(why: str) -> int:
        for n in names:
            reasons.setdefault(n, why)
        return 0

    if not isinstance(outputs, Tensor) or outputs.dim() < 1 or not outputs.is_floating_point():
        return leave_all("the model outputs are not one floating-point tensor")
    if not bool(torch.isfinite(outputs).all()):
        raise HawqError(f"hessian traces: non-finite model outputs on batch {bi}")
    per_sample = outputs[0].numel()
    if per_sample > max_directions:
        return leave_all(f"{per_sample} outputs per sample exceed the {max_directions} directions an exact "
                         "trace may spend")
    hess = output_hessian(outputs, lambda o: loss_fn.loss(o, batch), seed)
    if isinstance(hess, str):
        return leave_all(hess)
    hess, residual_free = hess
    # a zero loss gradient in the outputs (a label-free loss at its reference point) removes the
    # second-order term whatever the ops are; the per-sample norms still need a weight used once
    for n, why in zip(names, certify_piecewise_linear(outputs, weights, check_ops=not residual_free)):
        if why and n not in reasons:
            reasons[n] = why
    for n, calls in seen.items():
        if n not in reasons and len(calls) != 1:
            reasons[n] = f"module called {len(calls)} times per forward"
    live = [n for n in names if n not in reasons]
    if not live:
        return 0
    if not bool(torch.isfinite(hess).all()):
        raise HawqError(f"hessian traces: non-finite loss Hessian on batch {bi}")
    passes = 0
    b = outputs.shape[0]
    if b > 1:
        # The per-sample split needs dim 0 of each layer's input and output to index the samples: a
        # gradient from sample j alone must stay in slice j. A broadcast input (position ids of shape
        # (1, T)), a sequence-first layout or train-mode batch statistics break it; test on one sample.
        gen = torch.Generator(device=outputs.device).manual_seed(seed + bi)
        j = int(torch.randint(b, (1,), generator=gen, device=outputs.device))
        probe = torch.zeros_like(outputs)
        probe[j] = torch.randn(outputs.shape[1:], generator=gen, device=outputs.device, dtype=outputs.dtype)
        grads = torch.autograd.grad(outputs, [seen[n][0][1] for n in live], grad_outputs=probe, retain_graph=True,
                                    allow_unused=True)
        passes += 1
        for n, g in zip(live, grads):
            x = seen[n][0][0]
            if g is not None and (g.shape[0] != b or x.shape[0] != b or bool(g[:j].any()) or bool(g[j + 1:].any())):
                reasons[n] = "dim 0 of its input does not index the samples"
        live = [n for n in live if n not in reasons]
        if not live:
            return passes
    evals, evecs = torch.linalg.eigh(hess.double())
    top = float(evals.abs().max()) if evals.numel() else 0.0
    keep = [k for k in range(evals.shape[1]) if float(evals[:, k].abs().max()) > DIRECTION_RTOL * top]
    index = {n: i for i, n in enumerate(names)}
    tensors = [seen[n][0][1] for n in live]
    for k in keep:
        cot = evecs[:, :, k].to(outputs.dtype).reshape(outputs.shape)
        grads = torch.autograd.grad(outputs, tensors, grad_outputs=cot, retain_graph=True, allow_unused=True)
        for n, g in zip(live, grads):
            if g is None:
                continue  # unused by the loss: 0 here, and the Hutchinson checks name it below
            norms = per_sample_sq_norms(modules[n], seen[n][0][0], g)
            sums[index[n]] += float((evals[:, k] * norms).sum())
    if not math.isfinite(float(sums.sum())):
        raise HawqError(f"hessian traces: non-finite per-sample gradients on batch {bi}")
    return passes + len(keep)
