"""Per-layer Gauss-Newton traces from output-space directions: exact Hessian traces where the network is
piecewise linear in a layer, and the Gauss-Newton trace of any layer on request.

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

Many outputs per sample (1000 classes, tokens): write ``H_i = A_i A_i^T`` (signed columns where
``H_i`` is indefinite). For Rademacher ``r_i``, ``v_i = A_i r_i`` has ``E[v_i v_i^T] = H_i``, so

    tr(G_ll) = E_r [ sum_i ||d(v_i . f_i) / dW_l||^2 ],

one backward pass per probe for every layer at once (estimator ``gn_sampled``), whatever the number
of outputs. Each sample's heaviest columns are taken exactly (:func:`exact_columns`), the rest is
sampled; softmax cross-entropy has the analytic ``O(C)`` factor :class:`SoftmaxFactor`, any other
loss an eigen-decomposition (:class:`EigenFactor`). The standard error pools per-sample variances
(:class:`_PerSampleStats`).

Whether a layer is certified is read off the autograd graph of each batch (:func:`certify_piecewise_linear`),
conservatively: an op not known to be (piecewise) linear, a product of two tensors that both depend on
``W_l``, train-mode BatchNorm, or a weight used twice leaves the layer to Hutchinson's estimator
(``certify=False``, for ``curvature="gauss_newton"``, skips the op checks: the Gauss-Newton trace needs
only the per-sample norms).
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

from hawq import HawqError, bars_off
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
GENERIC_MAX_OUTPUTS = 1024  # a loss without a known factor needs C double backwards and an O(C^3) eigh per sample
ROUNDING_ULPS = 64  # a sampled estimate's floor on its standard error, in units of eps * |trace|
DIRECTION_RTOL = 1e-6  # output directions whose eigenvalues are all below this (relative) carry nothing
USED_TWICE = "weight is used more than once"
_CHUNK_ELEMENTS = 1 << 25  # cap on intermediate tensors of the per-sample norms (128 MiB in float32)
_INPUT_CACHE_ELEMENTS = 1 << 26  # the layers' input sides kept across one batch's backward passes (256 MiB in float32)


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
            reasons[i] = USED_TWICE if n else "the outputs do not use the weight"
    return reasons


def _loss_gradient(outputs: Tensor, loss_of_outputs: Any) -> tuple[Tensor, Tensor] | str:
    """A leaf copy of ``outputs`` and the loss gradient in it, flattened per sample ``(B, C)``, with a
    graph for second derivatives; or why there is none."""
    leaf = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_of_outputs(leaf)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return "the loss is not a scalar"
        if not loss.requires_grad:
            return "the loss does not depend on the outputs"
        (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
    return leaf, g.reshape(outputs.shape[0], -1)


def _output_hvp(g: Tensor, leaf: Tensor, w: Tensor) -> Tensor:
    """``(d^2 l) w`` in the outputs (all samples), as ``g``'s shape."""
    if not g.requires_grad:  # the loss is linear in the outputs: zero Hessian
        return torch.zeros_like(g)
    (hw,) = torch.autograd.grad(g, leaf, grad_outputs=w, retain_graph=True, allow_unused=True)
    return torch.zeros_like(g) if hw is None else hw.reshape(g.shape)


def couples_samples(g: Tensor, leaf: Tensor, seed: int = 0) -> bool:
    """Whether the loss Hessian in the outputs has a non-zero block between two samples.

    For each bit ``k`` of the sample index, a random vector supported on the samples whose bit ``k``
    is 1 (then 0) is multiplied by the Hessian; any two samples differ in some bit, so a coupling
    ``H_ij != 0`` shows as a non-zero entry *outside* the support. For a sum of per-sample losses those
    entries are exactly 0.0 -- autograd computes nothing there but products with zero -- so the test
    needs no tolerance. (Comparing ``H w`` with the per-sample blocks times ``w`` did, and a saturated
    softmax, whose Hessian entries (~1e-31) sit below the rounding of its O(1) intermediate terms,
    failed it.) ``2 ceil(log2 B)`` double backwards on the loss alone.
    """
    b = g.shape[0]
    if b == 1 or not g.requires_grad:
        return False
    gen = torch.Generator(device=g.device).manual_seed(seed)
    w = torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype)
    index = torch.arange(b, device=g.device)
    for bit in range(max(1, math.ceil(math.log2(b)))):
        inside = (index >> bit) & 1 == 1
        for side in (inside, ~inside):
            if bool(side.all()) or not bool(side.any()):
                continue
            hw = _output_hvp(g, leaf, w * side[:, None])
            if bool(hw[~side].any()):
                return True
    return False


COUPLED = "the loss couples samples (its Hessian in the outputs is not block diagonal)"


def output_hessian(outputs: Tensor, loss_of_outputs: Any, seed: int = 0) -> tuple[Tensor, bool] | str:
    """Per-sample Hessians ``(B, C, C)`` of the loss w.r.t. the outputs (flattened per sample) and
    whether the loss gradient in the outputs vanishes (to float rounding), or the reason the Hessian
    is not block diagonal over samples (:func:`couples_samples`). ``C`` double backwards on the loss alone."""
    got = _loss_gradient(outputs, loss_of_outputs)
    if isinstance(got, str):
        return got
    leaf, g = got
    b, c = g.shape
    if couples_samples(g, leaf, seed):
        return COUPLED
    # row j of H_i = d(g_ij)/d f_i; the rows sum over samples, and block diagonality makes them per-sample
    eye = torch.zeros_like(g)
    rows = []
    for j in range(c):
        eye.zero_()
        eye[:, j] = 1
        rows.append(_output_hvp(g, leaf, eye))
    hess = torch.stack(rows, dim=1)
    # |g| against |outputs| * |H|: the relative size of the residual f - f* for a quadratic loss
    size = float(outputs.detach().abs().max()) * float(hess.abs().max())
    residual_free = float(g.detach().abs().max()) <= 1e-6 * size
    return (hess + hess.transpose(1, 2)) / 2, residual_free


def per_sample_sq_norms(module: nn.Module, x: Tensor, grad_out: Tensor, cache: InputCache | None = None,
                        key: str = "") -> Tensor:
    """``||dL_i / dW||^2`` for each sample ``i`` of a Conv2d/Linear/Embedding layer, from its input ``x`` and the
    gradient of its output (float64, shape ``(B,)``). Samples are taken in chunks that keep the
    unfolded input and the per-sample products below ``_CHUNK_ELEMENTS`` each. With a ``cache``, the
    input side of each chunk (the unfolded input, or its Gram matrix of positions) is kept under
    ``(key, chunk)`` for the next backward pass over the same inputs."""
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
    out = []
    for s in range(0, b, step):
        def input_side(s: int = s) -> Tensor:
            return _input_side(module, x[s:s + step], groups, direct)

        side = cache.get((key, s), input_side) if cache is not None else input_side()
        out.append(_sq_norms(module, side, grad_out[s:s + step], groups, direct))
    return torch.cat(out)


class InputCache:
    """The input side of the per-sample norms (:func:`_input_side`) of one batch's layers, kept across the
    backward passes over that batch: every output direction and probe reuses the same layer inputs, and
    unfolding a convolution's input costs more than the rest of a pass. Entries stop being kept once
    ``budget`` elements are held (later ones are recomputed each time)."""

    def __init__(self, budget: int) -> None:
        self.left = budget
        self.store: dict[Any, Tensor] = {}

    def get(self, key: Any, make: Any) -> Tensor:
        got = self.store.get(key)
        if got is None:
            got = make()
            if got.numel() <= self.left:
                self.store[key] = got
                self.left -= got.numel()
        return got


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


def _positions(module: nn.Module, x: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    """A Conv2d/Linear's inputs and output gradients position by position: ``(B, positions, K)`` (unfolded
    for a conv) and ``(B, positions, C)``; sample i's weight gradient is ``gs_i^T xs_i``."""
    return _input_positions(module, x), _grad_positions(module, grad_out)


def _input_positions(module: nn.Module, x: Tensor) -> Tensor:
    b = x.shape[0]
    if isinstance(module, nn.Linear):
        return x.reshape(b, -1, x.shape[-1])
    pad = 0 if module.padding == "valid" else module.padding
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=pad, stride=module.stride).transpose(1, 2)


def _grad_positions(module: nn.Module, grad_out: Tensor) -> Tensor:
    b = grad_out.shape[0]
    if isinstance(module, nn.Linear):
        return grad_out.reshape(b, -1, grad_out.shape[-1])
    return grad_out.reshape(b, grad_out.shape[1], -1).transpose(1, 2)


def _by_group(t: Tensor, groups: int) -> Tensor:
    """``(B, positions, F)`` -> ``(B * groups, positions, F / groups)``: group g's weights see its channels only."""
    if groups == 1:
        return t
    b, n, f = t.shape
    return t.reshape(b, n, groups, f // groups).permute(0, 2, 1, 3).reshape(b * groups, n, f // groups)


def _input_side(module: nn.Module, x: Tensor, groups: int, direct: bool) -> Tensor:
    """What the per-sample norms need of a layer's input, the same for every output gradient: per sample
    ``||x_i||^2`` (one position), the positions ``(B * groups, T, K / groups)`` (``direct``), or their
    Gram matrices ``(B * groups, T, T)`` in float64."""
    xs = _by_group(_input_positions(module, x), groups)
    if xs.shape[1] == 1:
        return xs.double().square().sum((1, 2))
    if direct:
        return xs
    return torch.bmm(xs, xs.transpose(1, 2)).double()


def _sq_norms(module: nn.Module, side: Tensor, grad_out: Tensor, groups: int, direct: bool) -> Tensor:
    """Per-sample squared weight-gradient norms from the input side (:func:`_input_side`) and the output gradient."""
    b = grad_out.shape[0]
    gs = _by_group(_grad_positions(module, grad_out), groups)
    if gs.shape[1] == 1:  # side: ||x_i||^2
        out = side * gs.double().square().sum((1, 2))
    elif direct:  # side: the positions x_i
        out = torch.bmm(gs.transpose(1, 2), side).double().square().sum((1, 2))
    else:  # side: the Gram matrices x_i x_i^T
        out = (side * torch.bmm(gs, gs.transpose(1, 2)).double()).sum((1, 2))
    return out.reshape(b, groups).sum(1) if groups > 1 else out


def _sums_calls(module: nn.Module) -> bool:
    """A module whose per-sample gradient :func:`summed_calls_sq_norms` sums over several calls (a head
    shared by the FPN levels): plain Linear, or Conv2d without groups."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def summed_calls_sq_norms(module: nn.Module, calls: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """``||sum_c dL_i/dW (call c)||^2`` per sample for a Conv2d/Linear called several times per forward
    (RetinaNet's heads run once per FPN level): the per-sample gradient of each call, ``g_ic^T U_ic``, is
    formed ``(B, C, K)`` and summed over the calls before the norm (the cross-call terms count): one
    product over the calls' positions side by side. The sum is the total derivative of the outputs in
    the weight, so the norm is the Gauss-Newton trace whatever the calls' order; chunks of samples keep
    ``(chunk, C, K)`` below ``_CHUNK_ELEMENTS``."""
    b = calls[0][0].shape[0]
    c = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    k = module.in_features if isinstance(module, nn.Linear) else module.in_channels * math.prod(module.kernel_size)
    step = max(1, _CHUNK_ELEMENTS // (c * k))
    out = []
    for s in range(0, b, step):
        xs_all, gs_all = zip(*(_positions(module, x[s:s + step], g[s:s + step]) for x, g in calls), strict=True)
        # the calls' positions side by side: one product sums their gradients, in the layer's dtype as
        # autograd's own weight gradient (float64 only for the squares, as _sq_norms)
        total = torch.bmm(torch.cat(gs_all, 1).transpose(1, 2), torch.cat(xs_all, 1))  # (n, C, K)
        out.append(total.double().square().sum((1, 2)))
    return torch.cat(out)


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


class EigenFactor:
    """``H_i = sum_k s_ik a_ik a_ik^T`` from an eigen-decomposition of each per-sample Hessian:
    ``a_ik = sqrt|lambda_ik| u_ik``, ``s_ik = sign(lambda_ik)`` (0 for directions below ``DIRECTION_RTOL``)."""

    def __init__(self, hess: Tensor) -> None:
        hess = hess.double()
        diag = torch.diagonal(hess, dim1=1, dim2=2)
        if not bool((hess - torch.diag_embed(diag)).any()):  # diagonal (squared errors): nothing to decompose
            evals, evecs = diag, torch.eye(hess.shape[1], dtype=hess.dtype, device=hess.device).expand_as(hess)
        else:
            evals, evecs = torch.linalg.eigh(hess)
        top = float(evals.abs().max()) if evals.numel() else 0.0
        live = evals.abs() > DIRECTION_RTOL * top
        self.sign = torch.sign(evals) * live
        self.masses = evals.abs() * live  # ||a_ik||^2
        self.cols = evecs * self.masses.sqrt()[:, None, :]  # (B, C, K)

    def columns(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Column ``idx[i]`` of each sample ``(B, C)`` and its sign ``(B,)``."""
        rows = torch.arange(idx.shape[0], device=idx.device)
        return self.cols[rows, :, idx], self.sign[rows, idx]

    def tail(self, r: Tensor) -> list[tuple[Tensor, float]]:
        """``A_i^+ r_i`` (and ``A_i^- r_i`` when some sampled direction is negative) with their signs."""
        out = [(torch.einsum("bck,bk->bc", self.cols, r * (self.sign > 0)), 1.0)]
        neg = r * (self.sign < 0)
        if bool(neg.any()):
            out.append((torch.einsum("bck,bk->bc", self.cols, neg), -1.0))
        return out


class SoftmaxFactor:
    """Softmax cross-entropy over the last output dim (any positions ``t`` before it): the block of
    position ``t`` is ``alpha_it (diag(p_it) - p_it p_it^T)`` and factors as ``A A^T`` with column ``c``
    equal to ``sqrt(alpha_it p_itc) (e_c - p_it)``: no decomposition, ``O(C)`` per column or probe and
    position. Columns are numbered ``t * C + c``. ``1 - p`` of each position's most likely class is
    summed from the others, so a saturated softmax keeps its (tiny) curvature instead of rounding it to 0."""

    def __init__(self, logits: Tensor, alpha: Tensor) -> None:
        b, c = logits.shape[0], logits.shape[-1]
        self.p = torch.softmax(logits.detach().double(), dim=-1).reshape(b, -1, c)  # (B, positions, C)
        self.alpha = alpha.reshape(b, -1)  # (B, positions)
        self.top = self.p.argmax(-1, keepdim=True)
        rest = self.p.scatter(-1, self.top, 0.0).sum(-1, keepdim=True)  # 1 - p_top, without cancellation
        self.one_minus = (1 - self.p).scatter_(-1, self.top, rest)
        sq = self.p.square()
        masses = self.alpha[..., None] * self.p * (self.one_minus.square() + sq.sum(-1, keepdim=True) - sq)
        self.masses = masses.reshape(b, -1)
        self.sign = torch.ones_like(self.masses)

    def columns(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        b, positions, c = self.p.shape
        rows = torch.arange(b, device=idx.device)
        t, k = idx // c, idx % c
        scale = (self.alpha[rows, t] * self.p[rows, t, k]).sqrt()
        col = torch.zeros_like(self.p)
        col[rows, t] = -scale[:, None] * self.p[rows, t]
        col[rows, t, k] = scale * self.one_minus[rows, t, k]
        return col.reshape(b, -1), self.sign[rows, idx]

    def tail(self, r: Tensor) -> list[tuple[Tensor, float]]:
        # A r = sqrt(alpha) (s - p sum(s)), s = sqrt(p) r; entry c as s_c (1 - p_c) - p_c sum_{d != c} s_d
        s = self.p.sqrt() * r.reshape(self.p.shape)
        rest_top = s.scatter(-1, self.top, 0.0).sum(-1, keepdim=True)  # sum over d != top, no cancellation
        rest = (rest_top + s.gather(-1, self.top) - s).scatter_(-1, self.top, rest_top)  # sum over d != c
        out = self.alpha.sqrt()[..., None] * (s * self.one_minus - self.p * rest)
        return [(out.reshape(r.shape[0], -1), 1.0)]


class DiagonalFactor:
    """A loss Hessian in the outputs that is diagonal per sample, ``H_i = diag(d_i)`` (squared errors, the
    label-free ``0.5 ||f - f_ref||^2 / B``, any sum of per-output losses): column ``k`` is
    ``sqrt|d_ik| e_k`` with sign ``sign(d_ik)``, a probe is ``sqrt|d_i| * r_i``; ``O(C)``, nothing materialised
    beyond ``(B, C)``, so it serves any number of outputs (RetinaNet's head: ~10^5 per image)."""

    def __init__(self, diag: Tensor) -> None:
        diag = diag.double()
        top = float(diag.abs().max()) if diag.numel() else 0.0
        live = diag.abs() > DIRECTION_RTOL * top
        self.sign = torch.sign(diag) * live
        self.masses = diag.abs() * live
        self.scale = self.masses.sqrt()

    def columns(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        rows = torch.arange(idx.shape[0], device=idx.device)
        col = torch.zeros_like(self.scale)
        col[rows, idx] = self.scale[rows, idx]
        return col, self.sign[rows, idx]

    def tail(self, r: Tensor) -> list[tuple[Tensor, float]]:
        out = [(self.scale * r * (self.sign > 0), 1.0)]
        neg = r * (self.sign < 0)
        if bool(neg.any()):
            out.append((self.scale * neg, -1.0))
        return out


def diagonal_factor(g: Tensor, leaf: Tensor, seed: int = 0, rtol: float = 1e-6) -> DiagonalFactor | None:
    """A :class:`DiagonalFactor` if the loss Hessian in the outputs (flattened per sample, ``g``'s shape
    ``(B, C)``) is diagonal, else None. ``d`` is read off one product with a random sign vector
    (``d = (H s) * s``), and a second product with a Gaussian vector must equal ``d * w`` to ``rtol`` of
    its norm: any off-diagonal entry fails it with probability 1. Two double backwards on the loss alone."""
    if not g.requires_grad:
        return None
    gen = torch.Generator(device=g.device).manual_seed(seed + 2)
    signs = torch.randint(0, 2, g.shape, generator=gen, device=g.device).to(g.dtype) * 2 - 1
    d = (_output_hvp(g, leaf, signs) * signs).double()
    w = torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype)
    hw = _output_hvp(g, leaf, w).double()
    if not bool(hw.any()) or float((hw - d * w.double()).norm()) > rtol * float(hw.norm()):
        return None
    return DiagonalFactor(d)


def softmax_cross_entropy_factor(outputs: Tensor, g: Tensor, leaf: Tensor, seed: int = 0,
                                 rtol: float = 1e-4) -> SoftmaxFactor | None:
    """A :class:`SoftmaxFactor` if the loss Hessian in the outputs ``(B, ..., C)`` is, at every position,
    ``alpha (diag(p) - p p^T)`` with ``p`` the softmax over the last dim (cross-entropy: any targets,
    label smoothing, per-sample or per-token weights, ignored tokens with ``alpha = 0``), else None.

    Checked on two random vectors: ``alpha`` is fitted on the first, and the second must then agree
    to ``rtol`` of its norm over the batch (one mismatch in ``C`` dimensions per position fails it, so
    another loss passes with probability 0). Two double backwards on the loss alone.
    """
    if outputs.dim() < 2 or outputs.shape[-1] < 2 or not g.requires_grad:
        return None
    b, c = outputs.shape[0], outputs.shape[-1]
    gen = torch.Generator(device=g.device).manual_seed(seed + 1)
    p = torch.softmax(outputs.detach().double(), dim=-1).reshape(b, -1, c)
    ws = [torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype) for _ in range(2)]
    got = [_output_hvp(g, leaf, w).double().reshape(p.shape) for w in ws]
    want = [p * w.double().reshape(p.shape) - p * (p * w.double().reshape(p.shape)).sum(-1, keepdim=True)
            for w in ws]
    norm2 = want[0].square().sum(-1)  # (B, positions)
    if not bool((norm2 > 0).any()):
        return None
    alpha = (got[0] * want[0]).sum(-1) / norm2.clamp_min(1e-300)
    # a position whose curvature is below rounding fits no alpha of its own: it takes the batch's median
    # (its contribution is of that negligible size either way)
    resolved = norm2 > 1e-12 * float(norm2.max())
    alpha = torch.where(resolved, alpha, alpha[resolved].median()).clamp_min(0)
    for h, v in zip(got, want):
        if float((h - alpha[..., None] * v).norm()) > rtol * float(h.norm()):
            return None
    return SoftmaxFactor(outputs, alpha)


def exact_columns(masses: Tensor, tol: float, min_probes: int, cap: int, samples: int) -> int:
    """How many of each sample's heaviest columns to take exactly (one backward pass each); the rest is sampled.

    A Rademacher combination of the remaining columns has, per sample and probe, a variance of at most
    ``2 (tail mass)^2`` in the units of the trace, so reaching a relative error ``tol`` over ``samples``
    samples needs about ``2 (tail / total)^2 / (samples tol^2)`` probes (at least ``min_probes``). The
    output-space masses stand in for each column's share of a layer's trace; ``m`` minimises
    ``m + probes(m)`` over ``0..cap``.
    """
    return sampled_plan(masses, tol, min_probes, cap, samples)[0]


def sampled_plan(masses: Tensor, tol: float, min_probes: int, cap: int, samples: int) -> tuple[int, float]:
    """:func:`exact_columns`' ``m`` and the backward passes per batch it predicts for the sampled estimate,
    ``m + probes(m)`` (``inf`` where no finite number of probes reaches ``tol``)."""
    ordered = masses.sort(dim=1, descending=True).values
    total = float(ordered.sum())
    if total <= 0:
        return 0, 0.0
    if tol <= 0:  # no tolerance: every probe count is too few, so take as much exactly as allowed
        m = min(cap, ordered.shape[1])
        return m, (float(m) if m == ordered.shape[1] else math.inf)
    # tail[m] = mass left after the m heaviest columns of every sample
    per_rank = ordered.sum(0)
    tail = torch.cat([per_rank.flip(0).cumsum(0).flip(0), per_rank.new_zeros(1)]).tolist()
    best, best_cost = 0, math.inf
    for m in range(0, min(cap, ordered.shape[1]) + 1):
        frac = max(tail[m], 0.0) / total
        if frac <= 1e-12:
            probes = 0.0
        else:
            probes = max(min_probes, 2 * frac * frac / (max(samples, 1) * tol * tol))
        if m + probes < best_cost:
            best, best_cost = m, m + probes
    return best, best_cost


# The sampled estimate is chosen over the exact one only where it is predicted to cost at most half the
# backward passes: the exact traces carry no error at all, and the probe count is a prediction (the
# stopping rule may need more, e.g. where a layer's share of the columns differs from their masses).
SAMPLED_MARGIN = 2.0
# ... and is never planned on fewer than 8 probes, whatever min_probes says: a standard error read off
# fewer is unreliable (docs/sensitivity.md), so a 10-class head (9 directions) stays exact
PLAN_MIN_PROBES = 8


class _PerSampleStats:
    """Running mean and sum of squared deviations (Welford/Chan) of each sample's tail estimate, per layer.

    A probe's tail value is a sum of independent per-sample terms, so the variance of the layer's
    estimate is the sum of the per-sample variances, each estimated from that sample's own probe
    replicates: the same unbiased variance as the spread of the per-probe sums, but pooled over the
    samples, so it does not collapse when a few probes happen to agree (stopping on a standard error
    read off 8 heavy-tailed values made it optimistic)."""

    def __init__(self, layers: int) -> None:
        self.n = torch.zeros(layers, dtype=torch.long)
        self.mean: list[Tensor | None] = [None] * layers  # (samples,) per layer
        self.m2: list[Tensor | None] = [None] * layers

    def add(self, i: int, values: Tensor) -> None:
        """Merge ``values`` ``(probes, samples)`` into layer ``i``."""
        k = values.shape[0]
        mean_b = values.mean(0)
        m2_b = (values - mean_b).square().sum(0)
        n_a = int(self.n[i])
        if n_a == 0:
            self.mean[i], self.m2[i] = mean_b, m2_b
        else:
            delta = mean_b - self.mean[i]
            total = n_a + k
            self.mean[i] = self.mean[i] + delta * (k / total)
            self.m2[i] = self.m2[i] + m2_b + delta.square() * (n_a * k / total)
        self.n[i] += k

    def summary(self, i: int) -> tuple[float, float]:
        """(sum over samples of the mean, sum over samples of the variance of that mean)."""
        n = int(self.n[i])
        if n == 0 or self.mean[i] is None:  # nothing measured (here: a rank without sampled batches)
            return 0.0, 0.0
        var = float(self.m2[i].sum()) / (n - 1) / n if n > 1 else math.inf
        return float(self.mean[i].sum()), var


def gauss_newton_traces(model: nn.Module, loss_fn: OutputLoss, batches: Sequence[Any], names: Sequence[str],
                        weights: Sequence[nn.Parameter], max_directions: int, seed: int = 0,
                        progress: bool = True, tol: float = 0.05, min_probes: int = 8, max_probes: int = 200,
                        certify: bool = True, known_max: float = 0.0, info: dict[str, Any] | None = None,
                        prefer_exact: bool = False, independent: set[str] | None = None,
                        ) -> tuple[dict[str, tuple[float, float, int, str]], dict[str, str]]:
    """``tr(G_ll)``, the Gauss-Newton block trace (mean over batches), for every layer with a per-sample norm
    formula -- with ``certify=True`` only for the layers the graph certifies piecewise linear, where it
    equals the Hessian block's trace.

    Returns ``({name: (trace, std_err, backward passes, estimator)}, {name: reason})``: each layer is in
    exactly one of the two (the second for layers left to Hutchinson's estimator). With at most
    ``max_directions`` outputs per sample the trace is exact (one backward pass per output direction,
    ``std_err`` 0, estimator ``"gauss_newton"``) where that is predicted to cost no more than about twice
    the sampled estimate, or always with ``prefer_exact`` (the caller named the cap); with more, each
    sample's heaviest output directions are
    exact and the rest is sampled (``"gn_sampled"``: Rademacher probes of the output-space factor, one
    backward pass each for all layers; :class:`_PerSampleStats` for the standard error), and each layer
    stops once ``std_err <= tol * |trace|`` (with the usual absolute floor, relative to ``known_max``
    too) after ``min_probes``, or at ``max_probes``. Under ``torch.distributed`` ranks sum their
    batches (and per-sample variances), and a layer certified on every rank only is kept. Buffers
    (BatchNorm running statistics) are restored exactly.

    ``independent``, if given (one process only), receives the layers left to Hutchinson whose samples
    the per-sample check found independent on every batch (a per-sample formula, called once, dim 0
    indexing the samples, a loss that does not couple them): their probes may be drawn per sample.
    """
    from hawq.sensitivity.traces import _next_chunk, _stopping_targets, probe_seed

    modules = dict(model.named_modules())
    reasons: dict[str, str] = {}
    for name in names:
        why = _module_supported(modules[name])
        if why:
            reasons[name] = why
    index = {n: i for i, n in enumerate(names)}
    exact_sums = torch.zeros(len(names), dtype=torch.float64)
    passes = 0
    distributed = _distributed()

    def reduce_sum(t: Tensor) -> Tensor:
        if not distributed:
            return t
        buf = t.to(reduce_device(weights), copy=True)  # all_reduce is in place: never on the caller's tensor
        dist.all_reduce(buf)
        return buf.cpu()

    global_batches = int(reduce_sum(torch.tensor([float(len(batches))], dtype=torch.float64))[0])
    if not global_batches:
        raise HawqError(NO_BATCHES)
    keep_graph = global_batches == 1
    saved = snapshot_buffers(model)
    exact_cols: dict[int, int] = {}
    choices: list[dict[str, Any]] = []  # each batch's exact-or-sampled decision, for info
    stats = _PerSampleStats(len(names))
    sampled_here = False
    bar = tqdm(total=len(batches), desc="gauss-newton traces", unit="batch", disable=bars_off(progress), leave=False)

    def add_round(chunks: list[Tensor], layers: list[int]) -> None:
        """Per-batch ``(probes, samples, layers)`` values of one round into the per-sample statistics."""
        if not chunks:
            return
        values = torch.cat(chunks, dim=1)
        for i in layers:
            stats.add(i, values[:, :, i])

    try:
        # round 1: every batch is prepared, its exact part computed and min_probes tail probes drawn
        kept: _Prepared | None = None
        chunks: list[Tensor] = []
        track = independent is not None and not distributed
        found: set[str] | None = None  # independent on every batch so far
        for bi, batch in enumerate(batches):
            if len(reasons) == len(names) and not track:
                break
            prep = _Prepared(model, loss_fn, batch, bi, names, weights, modules, reasons, max_directions,
                             seed, certify, (tol, min_probes, global_batches), prefer_exact, track)
            found = prep.independent if found is None else found & prep.independent
            if prep.choice:
                choices.append(prep.choice)
            passes += prep.passes
            if prep.mode == "exact":
                exact_sums += prep.exact_sums(index)
                passes += prep.passes_exact
            elif prep.mode == "sampled":
                sampled_here = True
                m = prep.exact_m
                exact_cols[bi] = m
                exact_sums += prep.column_sums(m, index)
                passes += m
                chunks.append(prep.tail_values(range(min_probes), m, index, probe_seed, seed))
                passes += prep.tail_passes * min_probes
            if keep_graph:
                kept = prep
            bar.update(1)
        bar.close()
        if track and found:
            independent.update(n for n in found if n in reasons)
        # a layer is measured only where every batch (and rank) certified it
        bad = reduce_sum(torch.tensor([1.0 if n in reasons else 0.0 for n in names], dtype=torch.float64))
        for n, f in zip(names, bad.tolist()):
            if f and n not in reasons:
                reasons[n] = "not certified on another rank"
        measured = [i for i, n in enumerate(names) if n not in reasons]
        add_round(chunks, measured)
        sampled = bool(reduce_sum(torch.tensor([float(sampled_here)], dtype=torch.float64))[0])
        done: set[int] = set()
        while sampled:
            # every rank holds its own samples: sum the per-sample means and variances over ranks
            local = torch.tensor([v for i in range(len(names)) for v in stats.summary(i)], dtype=torch.float64)
            tail = reduce_sum(local).reshape(len(names), 2)
            means = (exact_sums / global_batches if not distributed else reduce_sum(exact_sums) / global_batches)
            means = means + tail[:, 0] / global_batches
            errs = tail[:, 1].sqrt() / global_batches
            targets = torch.zeros(len(names), dtype=torch.float64)
            targets[measured] = _stopping_targets(means[measured], tol, known_max)
            chunk = 0
            for i in measured:
                n = int(stats.n[i])
                if i in done or n >= max_probes or float(errs[i]) <= float(targets[i]):
                    done.add(i)
                    continue
                std = float(errs[i]) * math.sqrt(n)
                chunk = max(chunk, 1 if keep_graph else _next_chunk(std, float(targets[i]), n, max_probes - n))
            live = [i for i in measured if i not in done]
            if not live:
                break
            start = int(stats.n[live[0]])
            chunk = min(chunk, max_probes - start)
            live_names = [names[i] for i in live]
            chunks = []
            for bi, batch in enumerate(batches):
                prep = kept if kept is not None else _Prepared(
                    model, loss_fn, batch, bi, names, weights, modules, {}, max_directions, seed, certify,
                    (tol, min_probes, global_batches), prefer_exact)
                if prep.mode != "sampled" or bi not in exact_cols:
                    continue
                chunks.append(prep.tail_values(range(start, start + chunk), exact_cols[bi], index, probe_seed, seed,
                                               live_names))
                passes += prep.tail_passes * chunk
            add_round(chunks, live)
            if not chunks:  # this rank holds no sampled batch: keep the counts in step with the others
                for i in live:
                    stats.n[i] += chunk
    finally:
        bar.close()
        restore_buffers(saved)
    if info is not None and choices:
        info["output_space"] = _summarise_choices(choices, max_directions)
    exact_sums = reduce_sum(exact_sums)
    passes = int(reduce_sum(torch.tensor([float(passes)], dtype=torch.float64))[0])
    out: dict[str, tuple[float, float, int, str]] = {}
    for i, n in enumerate(names):
        if n in reasons:
            continue
        tail_sum, tail_var = (float(v) for v in reduce_sum(torch.tensor(stats.summary(i), dtype=torch.float64)))
        mean = float(exact_sums[i] + tail_sum) / global_batches
        if int(stats.n[i]):
            # the probe spread misses the floating-point error of the backward passes, which dominates
            # when the exact columns carry nearly all of a layer's trace (a saturated softmax)
            rounding = ROUNDING_ULPS * torch.finfo(weights[i].dtype).eps * abs(mean)
            out[n] = (mean, math.hypot(math.sqrt(tail_var) / global_batches, rounding), passes, "gn_sampled")
        else:
            out[n] = (mean, 0.0, passes, "gauss_newton")
    return out, reasons


def _summarise_choices(choices: list[dict[str, Any]], cap: int) -> dict[str, Any]:
    """The exact-or-sampled decisions of the batches, in one record (the first batch's numbers, and the
    batch counts per mode), with a sentence saying why."""
    first = dict(choices[0])
    modes = [c["mode"] for c in choices]
    out = {**first, "batches_exact": modes.count("exact"), "batches_sampled": modes.count("sampled"),
           "direction_cap": cap}
    if first.get("why"):
        return out
    if "exact_passes" in first:
        verb = "<" if first["mode"] == "sampled" else ">="
        out["why"] = (f"predicted backward passes per batch: sampled {first['sampled_passes_predicted']} x "
                      f"{SAMPLED_MARGIN:g} {verb} exact {first['exact_passes']}")
    return out


class _Prepared:
    """One batch's forward graph, readied for output-space probing: the layers' inputs and outputs
    (hooks), the checks, and either the exact eigen-directions (``mode == "exact"``) or an output
    factor to sample (``mode == "sampled"``); ``mode == "none"`` when no layer is left."""

    def __init__(self, model: nn.Module, loss_fn: OutputLoss, batch: Any, bi: int, names: Sequence[str],
                 weights: Sequence[nn.Parameter], modules: dict[str, nn.Module], reasons: dict[str, str],
                 max_directions: int, seed: int, certify: bool, plan: tuple[float, int, int] = (0.05, 8, 1),
                 prefer_exact: bool = False, track_independent: bool = False) -> None:
        # plan: (tol, min_probes, batches over all ranks), what the exact-or-sampled choice is costed with;
        # prefer_exact: exact wherever the directions fit max_directions (a cap the caller named)
        self.modules, self.mode, self.passes, self.passes_exact, self.tail_passes = modules, "none", 0, 0, 1
        self.exact_m, self.choice = 0, {}
        # layers whose samples the one-sample check below found independent (a per-sample formula, called
        # once, dim 0 indexing the samples, a loss that does not couple them); only with track_independent
        self.independent: set[str] = set()
        self.shared: set[str] = set()  # layers whose input is broadcast over the batch (see _gather)
        self.inputs = InputCache(_INPUT_CACHE_ELEMENTS)  # per layer: what every backward pass reuses of its input
        self.bi, self.rank = bi, dist.get_rank() if _distributed() else 0
        seen: dict[str, list[tuple[Tensor, Tensor]]] = {
            n: [] for n in names if n not in reasons or (track_independent and _module_supported(modules[n]) is None)}

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

        def leave_all(why: str) -> None:
            for n in names:
                reasons.setdefault(n, why)

        if not isinstance(outputs, Tensor) or outputs.dim() < 1 or not outputs.is_floating_point():
            return leave_all("the model outputs are not one floating-point tensor")
        if not bool(torch.isfinite(outputs).all()):
            raise HawqError(f"hessian traces: non-finite model outputs on batch {bi}")
        self.outputs, self.samples = outputs, outputs.shape[0]
        per_sample = outputs[0].numel()
        got = _loss_gradient(outputs, lambda o: loss_fn.loss(o, batch))
        if isinstance(got, str):
            return leave_all(got)
        leaf, g = got
        if couples_samples(g, leaf, seed):
            return leave_all(COUPLED)
        hess: Tensor | None = None
        factor: EigenFactor | SoftmaxFactor | DiagonalFactor | None = None
        if per_sample > max_directions:
            factor = softmax_cross_entropy_factor(outputs, g, leaf, seed)
            residual_free = False
            if factor is None and per_sample > GENERIC_MAX_OUTPUTS:
                # too many outputs for a dense Hessian: a diagonal one (squared errors, label-free) factors
                # in O(C); its residual term vanishes where the loss gradient does (the reference point)
                factor = diagonal_factor(g, leaf, seed)
                if factor is not None:
                    size = float(outputs.detach().abs().max()) * float(factor.masses.max())
                    residual_free = float(g.detach().abs().max()) <= 1e-6 * size
        if factor is None:
            if per_sample > GENERIC_MAX_OUTPUTS:
                return leave_all(f"{per_sample} outputs per sample and a loss whose output Hessian is neither "
                                 f"softmax cross-entropy's nor diagonal: more than the {GENERIC_MAX_OUTPUTS} a "
                                 "dense output Hessian may have")
            full = output_hessian(outputs, lambda o: loss_fn.loss(o, batch), seed)
            if isinstance(full, str):
                return leave_all(full)
            hess, residual_free = full
            if not bool(torch.isfinite(hess).all()):
                raise HawqError(f"hessian traces: non-finite loss Hessian on batch {bi}")
        # a zero loss gradient in the outputs (a label-free loss at its reference point) removes the
        # second-order term whatever the ops are; the per-sample norms still need a weight used once
        check_ops = certify and not residual_free
        for n, why in zip(names, certify_piecewise_linear(outputs, weights, check_ops=check_ops)):
            if why == USED_TWICE and len(seen.get(n, ())) > 1 and _sums_calls(modules[n]):
                # one module called several times (a head shared by the FPN levels): its per-sample norms
                # sum the calls' gradients; a call whose input depends on the weight (reuse in series)
                # is a product of two dependent tensors, which the op check above still rejects
                continue
            if why and n not in reasons:
                reasons[n] = why
        for n, calls in seen.items():
            if n not in reasons and len(calls) != 1 and not _sums_calls(modules[n]):
                reasons[n] = f"module called {len(calls)} times per forward"
        live = [n for n in names if n not in reasons]
        # the other layers with a per-sample formula, called once: Hutchinson's, whose probes may then be
        # drawn per sample when the check below finds their samples independent (see hawq.sensitivity.hvp)
        others = [n for n in seen if n in reasons and len(seen[n]) == 1] if track_independent else []
        if not live and not others:
            return
        b = outputs.shape[0]
        if b > 1:
            # The per-sample split needs dim 0 of each layer's input and output to index the samples: a
            # gradient from sample j alone must stay in slice j. A broadcast input (position ids of shape
            # (1, T)), a sequence-first layout or train-mode batch statistics break it; test on one sample.
            gen = torch.Generator(device=outputs.device).manual_seed(seed + bi)
            j = int(torch.randint(b, (1,), generator=gen, device=outputs.device))
            probe = torch.zeros_like(outputs)
            probe[j] = torch.randn(outputs.shape[1:], generator=gen, device=outputs.device, dtype=outputs.dtype)
            pairs = [(n, c) for n in live + others for c in range(len(seen[n]))]  # every call of a shared head
            grads = torch.autograd.grad(outputs, [seen[n][c][1] for n, c in pairs], grad_outputs=probe,
                                        retain_graph=True, allow_unused=True)
            self.passes += 1
            for (n, c), gr in zip(pairs, grads):
                if gr is None:
                    continue
                x = seen[n][c][0]
                # one input for the whole batch (BERT's position ids), or a gradient leaving slice j
                shared = gr.shape[0] == 1 and x.shape[0] == 1
                leaks = gr.shape[0] != b or x.shape[0] != b or bool(gr[:j].any()) or bool(gr[j + 1:].any())
                if not shared and not leaks:
                    self.independent.add(n)
                if n in reasons:  # one of the others: only whether its samples are independent
                    continue
                if shared:
                    # no per-sample norms, but with independent Rademacher tails per sample the
                    # batch-level norm is unbiased too
                    self.shared.add(n)
                elif leaks:
                    reasons[n] = "dim 0 of its input does not index the samples"
            live = [n for n in live if n not in reasons]
            if not live:
                return
        self.live, self.seen = live, seen
        tol, min_probes, global_batches = plan
        samples = self.samples * global_batches
        if hess is not None and per_sample <= max_directions:
            # exact or sampled, whichever is predicted to take fewer backward passes (with a margin for the
            # exact one, which has no error): one per output direction, against exact_columns' plan
            self.evals, self.evecs = torch.linalg.eigh(hess.double())
            top = float(self.evals.abs().max()) if self.evals.numel() else 0.0
            live_dirs = self.evals.abs() > DIRECTION_RTOL * top
            directions = int(live_dirs.any(0).sum())
            m, cost = sampled_plan(self.evals.abs() * live_dirs, tol, max(min_probes, PLAN_MIN_PROBES),
                                   max_directions, samples)
            cost = m + (1 + int(bool((self.evals * live_dirs < 0).any()))) * (cost - m)
            self.choice = {"outputs_per_sample": per_sample, "exact_passes": directions,
                           "sampled_passes_predicted": round(cost, 1)}
            if prefer_exact or SAMPLED_MARGIN * cost >= directions:
                self.mode, self.hess = "exact", hess
                self.choice["mode"] = "exact"
                if prefer_exact:
                    self.choice["why"] = f"exact_directions={max_directions} was set: exact wherever it fits"
                self._drop_shared(reasons, "exact")
                return
            self.choice["mode"] = "sampled"
        else:
            self.choice = {"outputs_per_sample": per_sample, "mode": "sampled",
                           "why": f"more outputs per sample than the direction cap ({max_directions}): exact is not "
                                  "allowed"}
        self.mode = "sampled"
        self.factor = factor if factor is not None else EigenFactor(hess)
        # the heaviest columns first, per sample
        self.order = self.factor.masses.argsort(dim=1, descending=True)
        self.tail_passes = 1 + int(bool((self.factor.sign < 0).any()))
        self.exact_m = exact_columns(self.factor.masses, tol, min_probes, max_directions, samples)
        self.choice["exact_columns"] = self.exact_m
        if self.exact_m:
            self._drop_shared(reasons, f"{self.exact_m} exact column(s)")

    def _drop_shared(self, reasons: dict[str, str], why: str) -> None:
        """A batch-level norm is unbiased only for Rademacher tails (independent signs per sample cancel
        the cross-sample terms in expectation); a deterministic direction keeps them: Hutchinson then."""
        for n in self.shared:
            reasons[n] = f"its input is shared by the batch (no per-sample norms) and the output space is {why}"
        self.live = [n for n in self.live if n not in self.shared]
        self.shared = set()
        if not self.live:
            self.mode = "none"

    def _norms(self, cot: Tensor, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Per-sample squared weight-gradient norms ``(B,)`` of ``<f_i, cot_i>`` for each live layer (one backward)."""
        use = [n for n in (names if names is not None else self.live) if n in self.live]
        if not use:
            return {}
        cot = cot.to(self.outputs.dtype).reshape(self.outputs.shape)
        pairs = [(n, c) for n in use for c in range(len(self.seen[n]))]
        grads = torch.autograd.grad(self.outputs, [self.seen[n][c][1] for n, c in pairs], grad_outputs=cot,
                                    retain_graph=True, allow_unused=True)
        by_layer: dict[str, list[tuple[Tensor, Tensor]]] = {}
        for (n, c), g in zip(pairs, grads):
            if g is not None:  # unused by the loss: 0 here, and the Hutchinson checks name it
                by_layer.setdefault(n, []).append((self.seen[n][c][0], g))
        out = {}
        for n, calls in by_layer.items():
            if len(self.seen[n]) == 1:
                out[n] = per_sample_sq_norms(self.modules[n], *calls[0], cache=self.inputs, key=n)
            else:
                out[n] = summed_calls_sq_norms(self.modules[n], calls)
        return out

    def _gather(self, per: dict[str, Tensor], index: dict[str, int], weight: Tensor | float,
                per_sample: bool = False) -> Tensor:
        """``(layers,)`` sums over samples of ``weight * norms`` (or ``(samples, layers)`` with ``per_sample``)."""
        vals = torch.zeros(self.samples, len(index), dtype=torch.float64, device=self.outputs.device)
        for n, v in per.items():
            if n in self.shared:
                # one batch-level value (only on Rademacher tails, whose weight is one sign): it goes to
                # sample 0's slot, so the pooled per-sample variance is that of the batch-level values
                vals[0, index[n]] = v.sum() * weight
            else:
                vals[:, index[n]] = v * weight
        out = vals.cpu()
        if not math.isfinite(float(out.sum())):
            raise HawqError(f"hessian traces: non-finite per-sample gradients on batch {self.bi}")
        return out if per_sample else out.sum(0)

    def exact_sums(self, index: dict[str, int]) -> Tensor:
        """This batch's exact traces: one backward pass per kept eigen-direction."""
        evals, evecs = self.evals, self.evecs
        top = float(evals.abs().max()) if evals.numel() else 0.0
        keep = [k for k in range(evals.shape[1]) if float(evals[:, k].abs().max()) > DIRECTION_RTOL * top]
        total = torch.zeros(len(index), dtype=torch.float64)
        for k in keep:
            total += self._gather(self._norms(evecs[:, :, k]), index, evals[:, k])
        self.passes_exact = len(keep)
        return total

    def column_sums(self, m: int, index: dict[str, int]) -> Tensor:
        """The exact part: each sample's ``m`` heaviest factor columns, one backward pass each."""
        total = torch.zeros(len(index), dtype=torch.float64)
        for k in range(m):
            col, sign = self.factor.columns(self.order[:, k])
            total += self._gather(self._norms(col), index, sign)
        return total

    def tail_values(self, probes: Any, m: int, index: dict[str, int], probe_seed: Any, seed: int,
                    names: Sequence[str] | None = None) -> Tensor:
        """``(len(probes), samples, layers)``: per probe and sample, the sampled columns' estimate
        ``s ||d <f_i, A_i r_i> / dW||^2`` (Rademacher ``r_i`` off the ``m`` exact columns)."""
        masses = self.factor.masses
        rows = []
        for j in probes:
            # independent over probes, batches and ranks (the per-sample variances add up only then)
            gen = torch.Generator(device=masses.device).manual_seed(probe_seed(seed, "gn", self.rank, self.bi, j))
            r = torch.randint(0, 2, masses.shape, generator=gen, device=masses.device).to(masses.dtype) * 2 - 1
            if m:
                r.scatter_(1, self.order[:, :m], 0.0)
            total = torch.zeros(self.samples, len(index), dtype=torch.float64)
            for cot, sign in self.factor.tail(r):
                total += self._gather(self._norms(cot, names), index, sign, per_sample=True)
            rows.append(total)
        return torch.stack(rows) if rows else torch.zeros(0, self.samples, len(index), dtype=torch.float64)
