"""Hessian-vector products of a batch-averaged loss with respect to a chosen set of weights.

One :class:`HessianOperator` serves every estimator in this package (Hutchinson traces, power
iteration, stochastic Lanczos quadrature). For each batch it builds the gradient graph once
(``create_graph=True``) and answers any number of HVPs on it by double backward, so the forward
and first backward are paid once per batch, not once per probe. Only one batch's graph is alive at
a time; with a single batch the graph is kept for the whole estimate.

If the double backward cannot be trusted (a custom ``autograd.Function`` whose backward is not
differentiable, or an op without a double-backward formula) the operator warns, naming the op and
the module, and switches to central finite differences of gradients.

Under ``torch.distributed`` each rank runs its own batches and the per-batch results are summed
across ranks and divided by the global batch count, which equals one process on the union.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hawq import HawqError
from hawq.choices import check_choice
from hawq.layers import quantizable_layers
from hawq.sensitivity.config import HvpMethod

LossFn = Callable[[nn.Module, Any], Tensor]


class DoubleBackwardUnsupported(RuntimeError):
    """The autograd graph of the loss cannot be differentiated twice (internal signal)."""

    def __init__(self, op: str, module: str | None, detail: str = "") -> None:
        where = f" in module '{module}'" if module else ""
        super().__init__(f"double backward is not supported by op '{op}'{where}{detail}")
        self.op, self.module = op, module


def resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> tuple[list[str], list[nn.Parameter]]:
    """Layer names -> their ``.weight`` parameters, validating names and ``requires_grad``."""
    if not any(p.requires_grad for p in model.parameters()):
        raise HawqError("the model has no parameters that require grad: nothing to differentiate")
    modules = dict(model.named_modules())
    if layers is None:
        names = quantizable_layers(model)
        if not names:
            raise HawqError("the model has no quantizable layers (Conv2d/Linear/Embedding); "
                            "pass layers=[...]")
    else:
        names = list(layers)
        if not names:
            raise HawqError("layers is empty: pass None for all quantizable layers or a list of layer names")
        valid = [n for n, m in modules.items() if n and isinstance(getattr(m, "weight", None), nn.Parameter)]
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise HawqError(f"unknown layer(s) {', '.join(map(repr, unknown))}; "
                            f"valid layers: {', '.join(valid)}")
        if len(set(names)) != len(names):
            raise HawqError("layers lists a layer more than once")
    weights = [modules[n].weight for n in names]
    frozen = [n for n, w in zip(names, weights) if not w.requires_grad]
    if frozen:
        raise HawqError(f"layer weight(s) with requires_grad=False: {', '.join(frozen)}; "
                        "unfreeze them or leave them out of layers")
    if len({id(w) for w in weights}) != len(weights):
        raise HawqError("two of the layers share one weight tensor (tied weights): list only one of them")
    return names, weights


NO_BATCHES = "no batches: the Hessian needs at least one batch of data"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_device(weights: Sequence[Tensor]) -> torch.device:
    """Where all-reduced tensors live: the weights' device under nccl, else the CPU (gloo)."""
    backend = dist.get_backend() if _distributed() else "gloo"
    return weights[0].device if backend == "nccl" else torch.device("cpu")


def snapshot_buffers(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Each buffer with a copy: a train-mode forward updates BatchNorm statistics, measuring must not."""
    return [(b, b.detach().clone()) for b in model.buffers()]


def restore_buffers(snapshot: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for b, saved in snapshot:
            b.copy_(saved)


def _custom_nodes(root: Any) -> list[Any]:
    """Custom ``autograd.Function`` nodes reachable from ``root`` in the autograd graph."""
    found, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found.append(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


# autograd nodes that stand for "this gradient cannot be differentiated": differentiating through
# them raises, or (for @once_differentiable in some torch versions) silently drops the path
_ERROR_NODES = frozenset({"Error", "DelayedError", "NotImplemented"})


def _first_error_node(roots: list[Any]) -> str | None:
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ in _ERROR_NODES:
            return node.name()
        stack.extend(nxt for nxt, _ in node.next_functions)
    return None


def _module_of_ops(model: nn.Module, loss_fn: LossFn, batch: Any) -> dict[str, str]:
    """Map custom-op node names to the innermost module whose forward created them (one extra forward)."""
    owner: dict[str, str] = {}
    input_nodes: dict[int, set[int]] = {}
    handles = []

    def grad_fns(obj: Any) -> list[Any]:
        if isinstance(obj, Tensor):
            return [obj.grad_fn] if obj.grad_fn is not None else []
        if isinstance(obj, (list, tuple)):
            return [n for o in obj for n in grad_fns(o)]
        if isinstance(obj, dict):
            return [n for o in obj.values() for n in grad_fns(o)]
        return []

    def pre_hook(mod: nn.Module, args: Any) -> None:
        input_nodes[id(mod)] = {id(n) for n in grad_fns(args)}

    def make_hook(name: str) -> Callable:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            stop = input_nodes.get(id(mod), set())
            seen, stack = set(), grad_fns(out)
            while stack:
                node = stack.pop()
                if node is None or id(node) in seen or id(node) in stop:
                    continue
                seen.add(id(node))
                if isinstance(node, torch.autograd.function.BackwardCFunction):
                    owner.setdefault(type(node).__name__, name or "<model>")  # inner modules finish first
                stack.extend(nxt for nxt, _ in node.next_functions)
        return hook

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(pre_hook))
        handles.append(mod.register_forward_hook(make_hook(name)))
    try:
        with torch.enable_grad():
            loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    return owner


def embedding_rows(root: Any, weights: Sequence[Tensor]) -> dict[int, Tensor]:
    """``{weight index: sorted rows}`` for every weight the graph of ``root`` uses only through embedding
    lookups (``EmbeddingBackward0``) that touch fewer rows than the table has.

    The loss depends on such a table only through the rows it looks up, so its Hessian block is zero
    outside them: a probe needs entries there only (a 30522-row vocabulary, a batch of ~100 distinct
    tokens). Any other use of the weight (a tied output projection, a view) keeps the whole table.
    """
    index = {id(w): i for i, w in enumerate(weights)}
    uses: dict[int, list[Any]] = {}
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for nxt, _ in node.next_functions:
            var = getattr(nxt, "variable", None)  # an AccumulateGrad node: a leaf
            if var is not None and id(var) in index:
                uses.setdefault(index[id(var)], []).append(node)
            stack.append(nxt)
    out = {}
    for i, nodes in uses.items():
        if all(type(n).__name__ == "EmbeddingBackward0" and not getattr(n, "_saved_sparse", True)
               and isinstance(getattr(n, "_saved_indices", None), Tensor) for n in nodes):
            rows = torch.cat([n._saved_indices.reshape(-1) for n in nodes]).unique()
            if rows.numel() < weights[i].shape[0]:
                out[i] = rows.to(weights[i].device)
    return out


def _double_backward(outputs: Any, inputs: Any, grad_outputs: Any) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` on a kept graph; an op that cannot be differentiated twice raises
    :class:`DoubleBackwardUnsupported` (the operator then falls back to finite differences)."""
    try:
        return torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DoubleBackwardUnsupported("<autograd>", None, f": {first}") from e


class _AutogradBatch:
    """The gradient graph of one batch; HVPs by double backward on it."""

    def __init__(self, op: HessianOperator, batch: Any, index: int) -> None:
        self.op, self.batch, self.index = op, batch, index
        self.gu: dict[int, Tensor] = {}
        # per-sample layers: each one's input, its output (where H_yy acts) and the gradient there
        calls: dict[int, list[tuple[Tensor, Tensor]]] = {i: [] for i in op.per_sample}
        modules = dict(op.model.named_modules()) if calls else {}

        def keep_io(i: int) -> Callable:
            def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
                calls[i].append((args[0].detach(), out))
                return out.clone()  # an in-place op after the layer must not rebase the tensor kept here
            return hook

        io_handles = [modules[op.names[i]].register_forward_hook(keep_io(i)) for i in calls]
        with torch.enable_grad():
            outputs = None
            try:
                if op.gn_control:  # an OutputLoss: keep the outputs for the Gauss-Newton control variate
                    outputs = op.loss_fn.forward(op.model, batch)
                    loss = op.loss_fn.loss(outputs, batch)
                else:
                    loss = op.loss_fn(op.model, batch)
            finally:
                for h in io_handles:
                    h.remove()
            op.check_loss(loss, index)
            for i, c in calls.items():
                if len(c) != 1:  # checked on these batches already (gauss_newton); never probe a reused layer so
                    raise HawqError(f"hessian traces: layer '{op.names[i]}' was called {len(c)} times on batch "
                                    f"{index}, not once as the per-sample check found")
            self.io = {i: c[0] for i, c in calls.items()}
            check = op.needs_double_backward_check
            monitored = _custom_nodes(loss.grad_fn) if check else []
            bad: list[Any] = []
            handles = [node.register_hook(self._make_monitor(node, bad)) for node in monitored]
            try:
                order = sorted(self.io)
                grads = torch.autograd.grad(loss, list(op.weights) + [self.io[i][1] for i in order],
                                            create_graph=True, allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
        # the loss gradient in each per-sample layer's output: its derivative along u is H_yy u
        self.out_grads = dict(zip(sorted(self.io), grads[len(op.weights):]))
        grads = grads[:len(op.weights)]
        op.check_grads(grads, index)
        if op.rows is None:  # the first graph of a one-batch, one-process run: fixed for the whole run
            op.rows = embedding_rows(loss.grad_fn, op.weights) if op.graph_is_kept and not op.distributed else {}
        if check:
            op.needs_double_backward_check = False
        if bad:
            name = type(bad[0]).__name__
            module = _module_of_ops(op.model, op.loss_fn, batch).get(name)
            raise DoubleBackwardUnsupported(name, module)
        if check:
            broken = _first_error_node([g.grad_fn for g in grads if g is not None])
            if broken is not None:  # a built-in op without a double-backward formula
                raise DoubleBackwardUnsupported(broken, None)
        self.grads = list(grads)
        if op.gn_control and isinstance(outputs, Tensor):
            # J_l v by the double-backward trick: J_l^T u is linear in a dummy u, and its gradient in u
            # along v is J_l v; the loss Hessian in the outputs then acts on a detached leaf
            layers = sorted(op.gn_control)
            with torch.enable_grad():
                self.u = torch.zeros_like(outputs, requires_grad=True)
                gu = torch.autograd.grad(outputs, [op.weights[i] for i in layers], grad_outputs=self.u,
                                         create_graph=True, allow_unused=True)
                self.leaf = outputs.detach().requires_grad_(True)
                (self.lg,) = torch.autograd.grad(op.loss_fn.loss(self.leaf, batch), self.leaf, create_graph=True)
            self.gu = {i: g for i, g in zip(layers, gu) if g is not None and g.requires_grad}

    def gauss_newton_forms(self, layer: int, vs: Tensor) -> Tensor:
        """``v . G_ll v = (J_l v) . (d^2 l) (J_l v)`` for each probe of ``vs`` (float64)."""
        out = torch.zeros(vs.shape[0], dtype=torch.float64, device=vs.device)
        g = self.gu.get(layer)
        if g is None or not self.lg.requires_grad:
            return out
        for j, v in enumerate(vs):
            (jv,) = torch.autograd.grad(g, self.u, grad_outputs=v, retain_graph=True, allow_unused=True)
            if jv is not None:
                (hjv,) = torch.autograd.grad(self.lg, self.leaf, grad_outputs=jv, retain_graph=True)
                out[j] = (jv.double() * hjv.double()).sum()
        return out

    @staticmethod
    def _make_monitor(node: Any, bad: list[Any]) -> Callable:
        def monitor(grad_inputs: tuple, grad_outputs: tuple) -> None:
            incoming_differentiable = any(g is not None and g.requires_grad for g in grad_outputs)
            for g, (nxt, _) in zip(grad_inputs, node.next_functions):
                if g is None or nxt is None:  # no gradient, or an input that needs none
                    continue
                cut = incoming_differentiable and not g.requires_grad  # backward ran outside autograd
                if cut or type(g.grad_fn).__name__ in _ERROR_NODES:  # e.g. @once_differentiable
                    bad.append(node)
                    return
        return monitor

    def hvp(self, vs: list[Tensor]) -> list[Tensor]:
        need = [i for i, g in enumerate(self.grads) if g is not None and g.requires_grad]
        out = [torch.zeros_like(v) for v in vs]
        if not need:
            return out  # the loss is linear in every weight: the Hessian block is exactly zero
        hv = _double_backward([self.grads[i] for i in need], self.op.weights, [vs[i] for i in need])
        return [h if h is not None else o for h, o in zip(hv, out)]

    def hvp_block(self, layer: int, v: Tensor) -> Tensor:
        """``H_ll v`` for one layer: a double backward from that layer's gradient only."""
        g = self.grads[layer]
        if g is None or not g.requires_grad:
            return torch.zeros_like(v)  # the gradient does not depend on the weights: zero block
        (hv,) = _double_backward(g, self.op.weights[layer], v)
        return hv if hv is not None else torch.zeros_like(v)

    def per_sample_forms(self, layer: int, us: Callable[[int], Tensor], count: int) -> Tensor:
        """``[count, samples]`` float64: ``u_i . (H_yy u)_i`` per sample for ``u = us(j)``, ``H_yy`` the
        Hessian of this batch's loss in the layer's output ``y``.

        ``u = J v`` maps a weight probe ``v_i`` drawn independently for each sample through the layer
        (``y`` is linear in its weight), so each value is ``v_i . H_i v_i``, sample ``i``'s own Hutchinson
        sample of its block: the samples are independent in the loss, the Hessian is block diagonal
        over them, and one double backward answers every sample's own probe at once.
        """
        y, g = self.io[layer][1], self.out_grads[layer]
        out = torch.zeros(count, y.shape[0], dtype=torch.float64, device=y.device)
        if g is None or not g.requires_grad:
            return out  # the loss is linear in this output: zero block
        for j in range(count):
            u = us(j)
            (hu,) = _double_backward(g, y, u)
            if hu is not None:
                out[j] = (u * hu).reshape(u.shape[0], -1).sum(1, dtype=torch.float64)
        return out

    def hvp_block_many(self, layer: int, vs: Tensor) -> Tensor:
        """``H_ll v`` for a stack ``vs`` of probes in one vmapped double backward (``is_grads_batched``)."""
        g = self.grads[layer]
        if g is None or not g.requires_grad:
            return torch.zeros_like(vs)
        if not self.op.batched_ok:
            return torch.stack([self.hvp_block(layer, v) for v in vs])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # vmap's "falling back to a slow loop" notices
                (hv,) = torch.autograd.grad(g, self.op.weights[layer], grad_outputs=vs, retain_graph=True,
                                            allow_unused=True, is_grads_batched=True)
        except RuntimeError:
            # an op without a batching rule: answer the probes one at a time from now on
            self.op.batched_ok = False
            return torch.stack([self.hvp_block(layer, v) for v in vs])
        return hv if hv is not None else torch.zeros_like(vs)


class _FiniteDifferenceBatch:
    """HVP by central differences of gradients: (g(w + eps v) - g(w - eps v)) / (2 eps)."""

    def __init__(self, op: HessianOperator, batch: Any, index: int) -> None:
        self.op, self.batch, self.index = op, batch, index

    def _grad_at(self, vs: list[Tensor], step: float) -> list[Tensor]:
        op = self.op
        with torch.no_grad():
            for w, v in zip(op.weights, vs):
                w.add_(v, alpha=step)
        try:
            with torch.enable_grad():
                loss = op.loss_fn(op.model, self.batch)
                op.check_loss(loss, self.index)
                grads = torch.autograd.grad(loss, op.weights, allow_unused=True)
            op.check_grads(grads, self.index)
        finally:
            with torch.no_grad():
                for w, w0 in zip(op.weights, op.weights_at_start):
                    w.copy_(w0)  # copy back (not subtract) so the weights are restored bit-exactly
        return [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, op.weights)]

    def hvp(self, vs: list[Tensor]) -> list[Tensor]:
        op = self.op
        w_norm = math.sqrt(sum(float(w.detach().double().pow(2).sum()) for w in op.weights))
        v_norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in vs))
        if v_norm == 0.0:
            return [torch.zeros_like(v) for v in vs]
        # cube root of machine epsilon balances truncation (eps^2) against rounding (1/eps)
        eps = torch.finfo(op.weights[0].dtype).eps ** (1 / 3) * (1.0 + w_norm) / v_norm
        plus = self._grad_at(vs, eps)
        minus = self._grad_at(vs, -eps)
        return [(p - m) / (2 * eps) for p, m in zip(plus, minus)]

    def hvp_block(self, layer: int, v: Tensor) -> Tensor:
        vs = [v if i == layer else torch.zeros_like(w) for i, w in enumerate(self.op.weights)]
        return self.hvp(vs)[layer]

    def hvp_block_many(self, layer: int, vs: Tensor) -> Tensor:
        return torch.stack([self.hvp_block(layer, v) for v in vs])


class HessianOperator:
    """HVPs of ``mean over batches of loss_fn(model, batch)`` w.r.t. ``weights``.

    Use as a context manager: the model's buffers (e.g. BatchNorm running statistics, which a
    train-mode forward updates) are restored on exit, so measuring never changes the model.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], names: list[str],
                 weights: list[nn.Parameter], method: str = "auto", probes_per_pass: int = 1,
                 gn_control: Sequence[int] = (), per_sample: Sequence[int] = ()) -> None:
        check_choice(method, HvpMethod, "method")
        if isinstance(probes_per_pass, bool) or not isinstance(probes_per_pass, int) or probes_per_pass < 1:
            raise HawqError(f"probes_per_pass must be a positive integer, got {probes_per_pass!r}")
        self.probes_per_pass = probes_per_pass
        self.batched_ok = True
        # layers whose per-layer forms are v.(H - G)v (Gauss-Newton control variate; needs an OutputLoss
        # and autograd: a fall-back to finite differences empties it, and the caller reads it back)
        self.gn_control = set(gn_control)
        # layers probed per sample (see _AutogradBatch.per_sample_forms): one process, autograd only, and
        # never together with the Gauss-Newton control variate; a fall-back to finite differences empties it,
        # and a slow layer handed to shared probes leaves it (traces._per_layer)
        self.per_sample = set(per_sample) - self.gn_control
        self.model, self.loss_fn, self.names, self.weights = model, loss_fn, names, weights
        self.batches = list(batches)
        self.distributed = _distributed()
        local = len(self.batches)
        if self.distributed:
            t = torch.tensor([float(local)], dtype=torch.float64, device=self.reduce_device)
            dist.all_reduce(t)
            self.global_batches = int(t.item())
        else:
            self.global_batches = local
        if self.global_batches == 0:
            raise HawqError(NO_BATCHES)
        self.method = "finite_difference" if method == "finite_difference" else "autograd"
        if self.method != "autograd" or self.distributed:
            self.per_sample = set()
        if self.method != "autograd":
            self.gn_control = set()
        self.allow_fallback = method == "auto"
        self.needs_double_backward_check = True
        self.fallback_reason: str | None = None
        self._cached: _AutogradBatch | _FiniteDifferenceBatch | None = None
        # finite differences move the weights; keep a copy to restore them bit-exactly (only then)
        self.weights_at_start: list[Tensor] = (
            [w.detach().clone() for w in weights] if self.method == "finite_difference" else [])
        self._buffers: list[tuple[Tensor, Tensor]] = []
        self.last_hvps: dict[int, list[Tensor]] = {}  # per layer: chunks [k, *weight.shape] of products
        self.last_per_sample: dict[int, Tensor] = {}  # per per-sample layer: [count, samples of all batches]
        # embedding tables looked up by the one batch: {layer: rows}, the only rows their Hessian blocks
        # touch (see embedding_rows); None until the first graph is built, {} with several batches or ranks
        # (each would see other rows)
        self.rows: dict[int, Tensor] | None = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> HessianOperator:
        self._buffers = snapshot_buffers(self.model)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cached = None
        restore_buffers(self._buffers)
        with torch.no_grad():
            for w, w0 in zip(self.weights, self.weights_at_start):
                w.copy_(w0)
        self._buffers = []

    @property
    def graph_is_kept(self) -> bool:
        """One batch in all (on whichever rank holds it): a round of probes costs no rebuild.

        Every rank sees the same global count, so every rank schedules the same rounds."""
        return self.global_batches == 1

    # ------------------------------------------------------------------ checks
    @property
    def reduce_device(self) -> torch.device:
        return reduce_device(self.weights)

    def check_loss(self, loss: Any, index: int) -> None:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise HawqError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                            f"on batch {index}")
        if not loss.requires_grad:
            raise HawqError(f"the loss of batch {index} does not depend on any parameter that requires grad")
        if not torch.isfinite(loss.detach()).all():
            raise HawqError(f"non-finite loss ({loss.item()}) on batch {index}")

    def check_grads(self, grads: Sequence[Tensor | None], index: int) -> None:
        unused = [n for n, g in zip(self.names, grads) if g is None]
        if unused:
            raise HawqError(f"layer(s) not used by the loss on batch {index}: {', '.join(unused)}")
        finite = torch.stack([torch.isfinite(g.detach()).all() for g in grads if g is not None]).all()
        if not bool(finite):
            bad = [n for n, g in zip(self.names, grads)
                   if g is not None and not torch.isfinite(g.detach()).all()]
            raise HawqError(f"non-finite gradient on batch {index} (layers: {', '.join(bad)})")

    # ------------------------------------------------------------------ batches
    def _open(self, index: int) -> _AutogradBatch | _FiniteDifferenceBatch:
        if self._cached is not None and self._cached.index == index:
            return self._cached
        self._cached = None  # free the previous graph before building the next one
        batch = self.batches[index]
        if self.method == "autograd":
            session: _AutogradBatch | _FiniteDifferenceBatch = _AutogradBatch(self, batch, index)
        else:
            session = _FiniteDifferenceBatch(self, batch, index)
        if len(self.batches) == 1:
            self._cached = session  # a single batch: keep its graph for every probe
        return session

    def _switch_to_finite_difference(self, err: DoubleBackwardUnsupported) -> None:
        if not self.allow_fallback:
            raise HawqError(f"{err}; use method='auto' or 'finite_difference'") from err
        self.method = "finite_difference"
        self.gn_control = set()
        self.per_sample = set()
        self._cached = None
        self.weights_at_start = [w.detach().clone() for w in self.weights]
        self.fallback_reason = str(err)
        warnings.warn(f"hawq.sensitivity: {err}; falling back to finite-difference Hessian-vector products "
                      "(2 gradient evaluations per product)", RuntimeWarning, stacklevel=3)

    def _run(self, per_batch: Callable[[_AutogradBatch | _FiniteDifferenceBatch], Tensor]) -> Tensor:
        """Sum ``per_batch(session)`` over the local batches (retrying once with finite differences)."""
        while True:
            try:
                total = None
                for i in range(len(self.batches)):
                    r = per_batch(self._open(i))
                    if total is None:
                        total = r
                    elif isinstance(r, list):
                        total = [t + x for t, x in zip(total, r)]
                    else:
                        total = total + r
                    if len(self.batches) > 1:
                        self._cached = None
                return total
            except DoubleBackwardUnsupported as err:
                if self.method != "autograd":
                    raise
                self._switch_to_finite_difference(err)

    def _reduce_mean(self, local_sum: Tensor | None, like: Tensor) -> Tensor:
        total = local_sum if local_sum is not None else torch.zeros_like(like)
        if self.distributed:
            buf = total.to(self.reduce_device)
            dist.all_reduce(buf)
            total = buf.to(like.device)
        return total / self.global_batches

    # ------------------------------------------------------------------ public
    def quadratic_forms(self, probe: Callable[[int], list[Tensor]], count: int) -> Tensor:
        """``[count, n_layers]`` float64: ``v_l . (H v)_l`` for probes ``probe(0..count-1)``.

        ``probe(j)`` must return the same vectors every time it is called with ``j`` (it is
        called once per batch, so only one probe lives in memory at a time).
        """
        like = torch.zeros(count, len(self.weights), dtype=torch.float64, device=self.weights[0].device)

        def per_batch(session: _AutogradBatch | _FiniteDifferenceBatch) -> Tensor:
            out = torch.zeros_like(like)
            for j in range(count):
                vs = probe(j)
                hv = session.hvp(vs)
                out[j] = torch.stack([(v.double() * h.double()).sum() for v, h in zip(vs, hv)])
            return out

        if len(self.batches) == 0:
            return self._reduce_mean(None, like)
        return self._reduce_mean(self._run(per_batch), like)

    def block_quadratic_forms(self, requests: dict[int, tuple[Callable[[int], Tensor], int]],
                              return_hvps: Sequence[int] = ()) -> dict[int, Tensor]:
        """Per-layer probing: ``{layer: float64 [count]}`` of ``v . (H_ll v)`` for ``v = probe(j)``.

        ``requests`` maps a layer index to ``(probe, count)``; each probe is supported on that
        layer alone, so no other layer's block leaks into the estimate. Every batch's graph is
        built once and serves every layer and probe of the request. A layer of :attr:`per_sample` may
        ask ``(probe, count, output_probe)``: ``output_probe(j, bi=batch_index, x=input)`` maps independent
        per-sample weight probes through the layer (input ``x``) and the values come from
        :meth:`_AutogradBatch.per_sample_forms`; the result is then the sum over samples, and the
        per-sample values ``[count, samples of all batches]`` (each over the batch count) are stored in
        :attr:`last_per_sample` (absent after a fall-back to finite differences: weight probes then).
        For the layers listed in ``return_hvps`` the products themselves (mean over batches and ranks) are kept too and
        stored in :attr:`last_hvps` as ``{layer: chunks}``, chunks of shape ``[k, *weight.shape]`` (the
        weight's dtype) that ``torch.cat`` joins to ``[count, *weight.shape]``.
        """
        order = sorted(requests)
        sizes = [requests[i][1] for i in order]
        keep = [i for i in order if i in set(return_hvps)]
        like = torch.zeros(sum(sizes), dtype=torch.float64, device=self.weights[0].device)

        per_pass = self.probes_per_pass
        single = len(self.batches) == 1 and not self.distributed  # per-batch results need no sum

        per_sample: dict[int, dict[int, Tensor]] = {}  # batch index -> layer -> [count, samples]

        def per_batch(session: _AutogradBatch | _FiniteDifferenceBatch) -> list[Tensor]:
            out, kept = [], {i: [] for i in keep}
            per_sample.pop(session.index, None)
            for i in order:
                probe, count = requests[i][:2]
                if i in self.per_sample and len(requests[i]) > 2 and isinstance(session, _AutogradBatch):
                    us = functools.partial(requests[i][2], bi=session.index, x=session.io[i][0])
                    forms = session.per_sample_forms(i, us, count)
                    per_sample.setdefault(session.index, {})[i] = forms
                    out.append(forms.sum(1))
                    continue
                for j0 in range(0, count, per_pass):
                    k = min(per_pass, count - j0)
                    if k == 1:
                        v = probe(j0)
                        hv = session.hvp_block(i, v).unsqueeze(0)
                        vs = v.unsqueeze(0)
                    else:
                        vs = torch.stack([probe(j0 + j) for j in range(k)])
                        hv = session.hvp_block_many(i, vs)
                    # the product in the weights' dtype (exact for +-1 probes), summed in float64: no
                    # float64 copies of both operands (2M-entry embedding tables)
                    rows = (self.rows or {}).get(i)
                    if rows is None:
                        forms = (vs * hv).reshape(k, -1).sum(1, dtype=torch.float64)
                    else:  # the probe is zero off these rows: skip the rest of a large table
                        forms = (vs[:, rows] * hv[:, rows]).reshape(k, -1).sum(1, dtype=torch.float64)
                    if i in self.gn_control and isinstance(session, _AutogradBatch):
                        forms = forms - session.gauss_newton_forms(i, vs)
                    out.append(forms)
                    if i in kept:
                        kept[i].append(hv.detach())
            return [torch.cat(out) if out else like] + [kept[i] if single else torch.cat(kept[i]) for i in keep]

        sums = self._run(per_batch) if self.batches else None
        flat = self._reduce_mean(sums[0] if sums else None, like)
        self.last_per_sample = {
            i: torch.cat([per_sample[b][i] for b in sorted(per_sample)], dim=1) / self.global_batches
            for i in order if i in self.per_sample and all(i in per_sample[b] for b in per_sample) and per_sample}
        if single and sums:
            # one batch, one process: the products are the mean already; no copy of them (a word-embedding
            # table's products are 8 x 2M floats per round)
            self.last_hvps = {i: sums[1 + n] for n, i in enumerate(keep)}
        else:
            self.last_hvps = {i: [self._reduce_mean(sums[1 + n] if sums else None, torch.zeros(
                requests[i][1], *self.weights[i].shape, device=self.weights[0].device, dtype=self.weights[i].dtype))]
                for n, i in enumerate(keep)}
        return dict(zip(order, flat.split(sizes)))

    def hvp(self, vs: list[Tensor]) -> list[Tensor]:
        """``H v`` (mean over all batches, all ranks) for one vector given as per-weight tensors."""
        sizes = [v.numel() for v in vs]
        like = torch.zeros(sum(sizes), dtype=torch.float64, device=self.weights[0].device)

        def per_batch(session: _AutogradBatch | _FiniteDifferenceBatch) -> Tensor:
            return torch.cat([h.reshape(-1).double() for h in session.hvp(vs)])

        flat = self._reduce_mean(self._run(per_batch) if self.batches else None, like)
        return [p.view_as(v).to(v.dtype) for p, v in zip(flat.split(sizes), vs)]
