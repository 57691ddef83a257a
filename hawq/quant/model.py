"""Model-level quantization: swap the layers of a bit map, calibrate activations, fold BatchNorm."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d
from tqdm.auto import tqdm

from hawq import HawqError, bars_off
from hawq.bitmap import BitMap, LayerBits, as_bitmap
from hawq.quant.config import QuantConfig, check_quant_config
from hawq.quant.ibert import (
    BERT_LEAVES,
    IBERT_MODULES,
    INNER_BITS,
    INNER_MARGIN,
    SHAPE_METHODS,
    PaddingMask,
    QuantGELU,
    QuantLayerNorm,
    QuantSoftmax,
    QuantTanh,
    StaticGrid,
    TraceableBert,
    is_hf_bert,
)
from hawq.quant.modules import (
    QUANT_MODULES,
    FoldedBatchNorm2d,
    QuantAct,
    QuantBnConv2d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
)
from hawq.quant.ops import RULES_BY_OP
from hawq.quant.quantizers import FLOAT_BITS


class QuantTracer(fx.Tracer):
    """fx tracer that keeps hawq's quantized modules (and QuantAct) as leaves.

    torchvision's ``FrozenBatchNorm2d`` (detection backbones) is a leaf too: traced through, its
    scale and shift become anonymous trace-time constants (``_tensor_constant0``, ...) instead of one
    BatchNorm the conversions know.
    """

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (*QUANT_MODULES, QuantAct, FoldedBatchNorm2d, FrozenBatchNorm2d, *IBERT_MODULES,
                          *BERT_LEAVES)):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, what: str) -> fx.GraphModule:
    """Symbolically trace ``model`` (hawq modules as leaves) or raise a one-line HawqError."""
    try:
        graph = QuantTracer().trace(model)
    except Exception as e:  # noqa: BLE001 -- fx raises many types; the user needs one message
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HawqError(f"{what} needs a torch.fx-traceable model; tracing failed: {first}") from None
    return fx.GraphModule(model, graph, model.__class__.__name__)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """``{conv_name: bn_name}`` for every Conv2d whose only user is a BatchNorm2d (found by fx)."""
    gm = trace(model, "BatchNorm folding")
    modules = dict(model.named_modules())
    pairs: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(
                modules.get(users[0].target), nn.BatchNorm2d):
            pairs[node.target] = users[0].target
    return pairs


def _check_layer(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise HawqError(f"quantize_model: the model has no layer '{name}'") from None
    if isinstance(module, QUANT_MODULES):
        raise HawqError(f"quantize_model: layer '{name}' is already quantized")
    if not isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
        raise HawqError(f"quantize_model: layer '{name}' is a {type(module).__name__}; "
                        "only Conv2d, Linear and Embedding can be quantized")
    return module


def quantize_model(model: nn.Module, bits: BitMap, cfg: QuantConfig | None = None) -> nn.Module:
    """Swap, in place, every layer named in ``bits`` for its fake-quantized twin; return ``model``.

    Names are preserved (``model.get_submodule(name)`` is the quantized module) and parameters
    are shared with the original layers. A layer stays float when both its weight and activation
    bits are >= 32. With ``cfg.fold_bn`` a Conv2d followed by a BatchNorm2d becomes a
    :class:`QuantBnConv2d` and the BN a :class:`FoldedBatchNorm2d` (found by torch.fx tracing).
    Activation quantizers start uncalibrated: run :func:`calibrate` before evaluating.

    ``cfg.transformer == "ibert"`` then also runs :func:`quantize_transformer_ops` and returns its
    result, a *new* ``fx.GraphModule`` (sharing the parameters): use the returned model.
    """
    cfg = cfg or QuantConfig()
    check_quant_config(cfg)
    todo: dict[str, tuple[nn.Module, LayerBits]] = {}
    for name, lb in as_bitmap(bits, "quantize_model").items():
        module = _check_layer(model, name)
        if lb.weight >= FLOAT_BITS and lb.activation >= FLOAT_BITS:
            continue
        todo[name] = (module, lb)
    pairs = conv_bn_pairs(model) if cfg.fold_bn and any(
        isinstance(m, nn.Conv2d) for m, _ in todo.values()) else {}
    for name, (module, lb) in todo.items():
        if isinstance(module, nn.Conv2d) and name in pairs:
            bn_name = pairs[name]
            q, folded = QuantBnConv2d.from_conv_bn(module, model.get_submodule(bn_name), lb.weight,
                                                   lb.activation, cfg)
            _set_submodule(model, bn_name, folded)
        elif isinstance(module, nn.Conv2d):
            q = QuantConv2d.from_float(module, lb.weight, lb.activation, cfg)
        elif isinstance(module, nn.Linear):
            q = QuantLinear.from_float(module, lb.weight, lb.activation, cfg)
        else:
            q = QuantEmbedding.from_float(module, lb.weight, lb.activation, cfg)
        _set_submodule(model, name, q)
    if cfg.transformer == "ibert":
        return quantize_transformer_ops(model, cfg)
    return model


def quantize_(model: nn.Module, bits: BitMap, cfg: QuantConfig | None = None) -> nn.Module:
    """torchao-style alias of :func:`quantize_model`: the same contract, ``cfg`` holds every setting.

    In place, except with ``cfg.transformer == "ibert"``, which returns a new traced model (use the
    returned model in every case).
    """
    return quantize_model(model, bits, cfg)


# --- transformer="ibert": fake-quant transformer ops that compute what the integer kernels compute ---
_SHAPE_FUNCS = (torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.unflatten)
# Which nodes are matmuls, softmaxes, adds, constant scales and means: hawq.quant.ops.RULES (one table).
_MATMUL, _SOFTMAX = RULES_BY_OP["matmul"], RULES_BY_OP["softmax"]
_INPUT_GRID_FUNCS = tuple(f for op in ("add", "scale", "mean") for f in RULES_BY_OP[op].functions)
_INPUT_GRID_METHODS = tuple(m for op in ("add", "scale", "mean") for m in RULES_BY_OP[op].methods)


def _is_call(node: fx.Node, funcs: tuple, methods: tuple) -> bool:
    return ((node.op == "call_function" and node.target in funcs)
            or (node.op == "call_method" and node.target in methods))


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name = base.replace(".", "_")
    while hasattr(gm, name):
        name += "_"
    return name


def quantize_transformer_ops(model: nn.Module, cfg: QuantConfig | None = None) -> fx.GraphModule:
    """I-BERT-aware fake-quant: a traced copy of ``model`` whose transformer ops compute what integer inference does.

    Replaced (so that ``to_integer(result, example_input)`` computes the same
    values; docs/quant.md, "Integer-only transformers"):

    * ``nn.LayerNorm`` -> :class:`~hawq.quant.ibert.QuantLayerNorm` (same name and parameters);
    * GELU (``F.gelu`` / ``nn.GELU``, exact erf form) -> :class:`~hawq.quant.ibert.QuantGELU`;
    * softmax over ``dim=-1`` -> :class:`~hawq.quant.ibert.QuantSoftmax` (``cfg.attention_bits`` output codes);
      ``softmax(scores + mask)`` with ``mask`` a model input becomes ``QuantSoftmax(scores, mask)``: an
      additive padding mask (entries 0 or <= -1e4), whose masked entries get probability code 0;
    * each operand of a matmul of two activations gets a :class:`~hawq.quant.ibert.StaticGrid`
      (signed ``cfg.attention_bits``, per tensor) ahead of its chain of shape ops -- except a softmax output,
      which already is on its grid;
    * a float model input used by an add, a constant ``*`` / ``/`` or a mean gets a 16-bit StaticGrid.

    Returns a new ``fx.GraphModule`` sharing the parameters (and the quantized layers) of ``model``;
    the new grids start uncalibrated: run :func:`calibrate` on the result. Quantize the layers first
    (:func:`quantize_model`, or in one call ``quantize_model(..., QuantConfig(transformer="ibert"))``).
    """
    cfg = cfg or QuantConfig(transformer="ibert")
    check_quant_config(cfg)
    attention_bits = cfg.attention_bits
    if is_hf_bert(model):  # transformers' BertModel does not trace; the same math and names that do
        model = TraceableBert(model).train(model.training)
    gm = trace(model, "quantize_transformer_ops")
    graph = gm.graph
    params = list(model.parameters())
    device = params[0].device if params else None
    modules = dict(gm.named_modules())

    def add_module(base: str, module: nn.Module) -> str:
        name = _free_name(gm, base)
        gm.add_submodule(name, module.to(device).train(model.training))
        return name

    def check_softmax_dim(node: fx.Node, dim: Any) -> None:
        if dim != -1:
            raise HawqError(f"quantize_transformer_ops: softmax '{node.name}' must run over dim=-1 "
                            f"(integer softmax is over the last dim), got dim={dim!r}")

    softmaxes: set[fx.Node] = set()
    for node in list(graph.nodes):
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, nn.LayerNorm) and not isinstance(mod, QuantLayerNorm):
            if len(mod.normalized_shape) != 1:
                raise HawqError(f"quantize_transformer_ops: LayerNorm '{node.target}' must normalise the last "
                                "dim only")
            _set_submodule(gm, node.target, QuantLayerNorm.from_float(mod, cfg))
        elif isinstance(mod, nn.GELU):
            if mod.approximate != "none":
                raise HawqError(f"quantize_transformer_ops: GELU '{node.target}' uses approximate="
                                f"'{mod.approximate}'; i-GELU approximates the exact (erf) GELU")
            _set_submodule(gm, node.target, QuantGELU(cfg).to(device))
        elif isinstance(mod, nn.Softmax):
            check_softmax_dim(node, mod.dim)
            _set_submodule(gm, node.target, QuantSoftmax(attention_bits))
            softmaxes.add(_fold_attention_mask(graph, node))
        elif isinstance(mod, QuantSoftmax):
            softmaxes.add(node)
        elif isinstance(mod, nn.Tanh):
            _set_submodule(gm, node.target, QuantTanh())
        elif _is_call(node, (F.gelu,), ("gelu",)):
            if node.kwargs.get("approximate", "none") != "none" or len(node.args) != 1:
                raise HawqError(f"quantize_transformer_ops: GELU '{node.name}' must be the exact (erf) form")
            _replace_with_module(graph, node, add_module(node.name, QuantGELU(cfg)))
        elif _is_call(node, _SOFTMAX.functions, _SOFTMAX.methods):
            if node.kwargs.get("dtype") is not None or len(node.args) > 2:
                raise HawqError(f"quantize_transformer_ops: softmax '{node.name}' with a dtype is not supported")
            check_softmax_dim(node, node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None))
            new = _replace_with_module(graph, node, add_module(node.name, QuantSoftmax(attention_bits)))
            softmaxes.add(_fold_attention_mask(graph, new))

    def passthrough(node: fx.Node) -> bool:  # shape ops and eval-identity modules between producer and matmul
        mod = modules.get(node.target) if node.op == "call_module" else None
        return (_is_call(node, _SHAPE_FUNCS, SHAPE_METHODS) or isinstance(mod, (nn.Dropout, nn.Identity))) \
            and bool(node.args) and isinstance(node.args[0], fx.Node)

    for node in list(graph.nodes):
        if not _is_call(node, _MATMUL.functions, _MATMUL.methods) or len(node.args) != 2:
            continue
        if not all(isinstance(a, fx.Node) for a in node.args):
            continue  # a matmul with a constant is not an activation x activation product
        for i, operand in enumerate(node.args):
            origin = operand
            while passthrough(origin):
                origin = origin.args[0]
            if origin in softmaxes:
                continue  # probabilities are already codes on the softmax output grid
            # The grid goes before the whole chain of shape ops (integer shape ops need a per-tensor grid).
            consumer, cur = node, operand
            while passthrough(cur) and len(cur.users) == 1:
                consumer, cur = cur, cur.args[0]
            with graph.inserting_after(cur):
                grid = graph.call_module(add_module(f"{node.name}_grid{i}", StaticGrid(attention_bits, 1.0, cfg)),
                                         (cur,))
            consumer.replace_input_with(cur, grid)

    for node in list(graph.nodes):
        if node.op != "placeholder":
            continue
        users = [u for u in node.users if _is_call(u, _INPUT_GRID_FUNCS, _INPUT_GRID_METHODS)]
        if users:
            with graph.inserting_after(node):
                grid = graph.call_module(add_module(f"{node.name}_grid", StaticGrid(INNER_BITS, INNER_MARGIN, cfg)),
                                         (node,))
            for u in users:
                u.replace_input_with(node, grid)
    graph.lint()
    gm.recompile()
    return gm.train(model.training)  # a new GraphModule starts in training mode


def _replace_with_module(graph: fx.Graph, node: fx.Node, target: str) -> fx.Node:
    with graph.inserting_before(node):
        new = graph.call_module(target, (node.args[0],))
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _fold_attention_mask(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """``softmax(scores + mask)`` with ``mask`` a model input -> ``QuantSoftmax(scores, mask)`` (a padding mask)."""
    arg = node.args[0]
    if not (isinstance(arg, fx.Node) and _is_call(arg, (operator.add, torch.add), ("add",)) and len(arg.args) == 2
            and not arg.kwargs and len(arg.users) == 1):
        return node
    a, b = arg.args
    modules = dict(graph.owning_module.named_modules()) if graph.owning_module is not None else {}

    def is_mask(n: Any) -> bool:  # a model input, or a TraceableBert's PaddingMask of one
        return isinstance(n, fx.Node) and (n.op == "placeholder" or (
            n.op == "call_module" and isinstance(modules.get(n.target), PaddingMask)))

    for scores, mask in ((a, b), (b, a)):
        if is_mask(mask) and isinstance(scores, fx.Node):
            node.args = (scores, mask)
            graph.erase_node(arg)
            break
    return node


def _ibert_softmaxes(model: nn.Module) -> list[QuantSoftmax | QuantTanh]:
    """The fixed-grid I-BERT kernels (softmax, tanh): their modes follow the activation quantizers'."""
    return [m for m in model.modules() if isinstance(m, (QuantSoftmax, QuantTanh))]


def infer_quant_config(model: nn.Module) -> QuantConfig:
    """The ``QuantConfig`` a quantized model was built with, read back from its modules.

    Weight granularity from the quantized layers, ``fold_bn`` from ``QuantBnConv2d``, the
    calibration method from the activation quantizers, ``transformer="ibert"`` (and
    ``attention_bits``) from I-BERT fake-quant modules; other fields keep their defaults.
    """
    cfg = QuantConfig()
    layers = [m for _, m in model.named_modules() if isinstance(m, QUANT_MODULES)]
    if layers:
        cfg.per_channel = bool(layers[0].per_channel)
        groups = [m.group_size for m in layers if m.group_size is not None]
        cfg.group_size = groups[0] if groups else None
    cfg.fold_bn = any(isinstance(m, QuantBnConv2d) for m in model.modules())
    acts = [m for m in model.modules() if isinstance(m, QuantAct) and not isinstance(m, StaticGrid)]
    if acts:
        cfg.act_calibration, cfg.act_percentile, cfg.ema_decay = acts[0].method, acts[0].percentile, acts[0].ema_decay
    if any(isinstance(m, IBERT_MODULES) for m in model.modules()):
        cfg.transformer = "ibert"
        softmaxes = [m.out_bits for m in model.modules() if isinstance(m, QuantSoftmax)]
        grids = [m.bits for m in model.modules() if isinstance(m, StaticGrid) and m.bits != INNER_BITS]
        cfg.attention_bits = (softmaxes or grids or [cfg.attention_bits])[0]
    return cfg


def quant_acts(model: nn.Module) -> list[tuple[str, QuantAct]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantAct)]


def set_act_calibration(model: nn.Module, on: bool) -> None:
    """Every QuantAct to ``"calibrating"`` (``on``: observe, no quantization) or ``"frozen"`` (fixed ranges).

    The trainer calls ``set_act_calibration(model, False)`` to stop the QAT range tracking that
    :func:`calibrate` leaves on.
    """
    for _, act in quant_acts(model):
        act.set_mode("calibrating" if on else "frozen")
    for sm in _ibert_softmaxes(model):
        sm.set_mode("calibrating" if on else "frozen")


def set_act_quant(model: nn.Module, enabled: bool) -> None:
    """Switch activation fake-quant ``"off"`` (float activations) or back to ``"frozen"``."""
    for _, act in quant_acts(model):
        act.set_mode("frozen" if enabled else "off")
    for sm in _ibert_softmaxes(model):
        sm.set_mode("frozen" if enabled else "off")


def reset_act_ranges(model: nn.Module) -> None:
    for _, act in quant_acts(model):
        act.reset()


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
              progress: bool = True, max_batches: int | None = None, reset: bool = True,
              track_in_training: bool = False) -> int:
    """Observe activation ranges on ``batches`` (eval mode, no grad), then fix them.

    ``forward(model, batch)`` runs one batch (e.g. ``task.forward``). Returns the number of
    batches used. ``reset`` forgets earlier ranges first. Afterwards the quantizers are
    ``"frozen"``, or with ``track_in_training=True`` in ``"tracking"`` mode: ranges keep adapting
    by EMA in ``model.train()`` (never in eval; HAWQ-V3 QAT) until ``set_act_calibration(model,
    False)`` freezes them.
    """
    acts = quant_acts(model)
    if not acts:
        return 0
    if reset:
        reset_act_ranges(model)
    was_training = model.training
    model.eval()
    set_act_calibration(model, True)
    n = 0
    try:
        for batch in tqdm(batches, desc="calibrate", disable=bars_off(progress), total=max_batches):
            forward(model, batch)
            n += 1
            if max_batches is not None and n >= max_batches:
                break
    finally:
        for _, act in acts:
            act.set_mode("tracking" if track_in_training else "frozen")
        for sm in _ibert_softmaxes(model):
            sm.set_mode("frozen")
        model.train(was_training)
    if n == 0:
        raise HawqError("calibrate: no batches were given")
    missing = [name for name, act in acts if not act.calibrated]
    if missing:
        raise HawqError(f"calibrate: activation quantizer '{missing[0]}' saw no data "
                        f"({len(missing)} unused); is that layer on the forward path?")
    return n


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    g = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    beta = bn.bias if bn.affine else torch.zeros_like(g)
    b = conv.bias if conv.bias is not None else torch.zeros_like(g)
    return conv.weight * g.reshape(-1, 1, 1, 1), beta + (b - bn.running_mean) * g


@torch.no_grad()
def fold_bn(model: nn.Module) -> nn.Module:
    """Fold BatchNorm2d into the preceding convs, in place, with running statistics (for export).

    ``QuantBnConv2d`` becomes a ``QuantConv2d`` carrying the folded weight and bias (same bits,
    same input quantizer); a float Conv2d followed by BatchNorm2d gets the folded weights; the
    folded BN modules become ``nn.Identity``. A plain ``QuantConv2d`` followed by a BN is left
    alone (its codes quantize the unfolded weight). Returns ``model``.
    """
    modules = dict(model.named_modules())
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs.items():
        conv, bn = modules[conv_name], modules[bn_name]
        if isinstance(conv, QuantBnConv2d):
            if conv.bn is not bn:
                raise HawqError(f"fold_bn: '{conv_name}' is folded with a BN other than '{bn_name}'")
            w, b = conv.folded_weight_bias()
            new = QuantConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                              conv.padding, conv.dilation, conv.groups, True, conv.padding_mode,
                              device=w.device, dtype=w.dtype)
            new.weight.copy_(w)
            new.bias.copy_(b)
            new.weight_bits, new.act_bits = conv.weight_bits, conv.act_bits
            new.per_channel, new.group_size = conv.per_channel, None
            new.input_quant = conv.input_quant
            new.train(conv.training)
        elif isinstance(bn, FoldedBatchNorm2d):
            raise HawqError(f"fold_bn: '{bn_name}' is marked folded but '{conv_name}' is not a QuantBnConv2d")
        elif isinstance(conv, QuantConv2d):
            # Its quantizer was trained on the unfolded weight: folding now would change the codes.
            # The BN stays; to_integer folds it exactly into the output scale instead.
            continue
        else:
            w, b = _fold_into(conv, bn)
            conv.weight.copy_(w)
            if conv.bias is None:
                conv.bias = nn.Parameter(b.clone())
            else:
                conv.bias.copy_(b)
            new = conv
        _set_submodule(model, conv_name, new)
        _set_submodule(model, bn_name, nn.Identity())
    leftover = [n for n, m in model.named_modules() if isinstance(m, FoldedBatchNorm2d)]
    if leftover:
        raise HawqError(f"fold_bn: '{leftover[0]}' is a folded BN without its conv")
    return model
