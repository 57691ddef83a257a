"""Operator rules: one table of what each op of a traced fake-quant graph is and what it becomes.

:data:`RULES` lists the ops hawq converts, in match order. A rule names its op, says in one line
what it means, recognises its nodes (``call_module`` by module type, ``call_function`` by function,
``call_method`` by method name) and holds, per conversion target, the handler that rewrites it:

* ``"integer"`` -- :func:`hawq.quant.to_integer`: hawq's dyadic integer arithmetic; every integer
  module it emits lowers itself to ONNX (``to_onnx``), so ``export_onnx_integer`` needs no rule;
* ``"torch_int8"`` -- :func:`hawq.quant.to_fbgemm`: PyTorch's quantized engines;
* ``"*"`` -- every target (quantized layers, float layers, identities: :class:`~hawq.quant.fx_rewrite.GraphRewriter`).

A converter registers its handlers with ``@handles(op, target)``; an op without a handler for a
target is rejected by that target with a one-line error (``to_integer(float_ops=True)`` runs it as a
float64 island instead). Adding an op: one :class:`OpRule` in :data:`RULES` and one handler per target.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from hawq import HawqError
from hawq.quant.ibert import (
    SHAPE_METHODS,
    MaskedMeanNormalize,
    PaddingMask,
    PositionIds,
    QuantGELU,
    QuantSoftmax,
    QuantTanh,
)
from hawq.quant.modules import FoldedBatchNorm2d, QuantAct, QuantConv2d, QuantEmbedding, QuantLinear

TARGETS = ("integer", "torch_int8")
ANY_TARGET = "*"

QUANT_LAYERS = (QuantConv2d, QuantLinear)
IDENTITY_MODULES = (nn.Identity, nn.Dropout, FoldedBatchNorm2d)  # the identity in eval mode
RELU_FUNCS = {F.relu, torch.relu}
ADD_FUNCS = {operator.add, torch.add, operator.iadd}

Handler = Callable[[Any, fx.Node, "nn.Module | None"], None]


@dataclass
class OpRule:
    """One op: how its nodes are recognised and, per target, the handler that converts them."""

    op: str
    doc: str
    modules: tuple[type, ...] = ()
    functions: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()
    accepts: Callable[[fx.Node], bool] | None = None  # an extra condition on the node
    handlers: dict[str, Handler] = field(default_factory=dict)

    def matches(self, node: fx.Node, module: nn.Module | None) -> bool:
        if node.op == "call_module":
            hit = isinstance(module, self.modules)
        elif node.op == "call_function":
            hit = any(node.target is f or node.target == f for f in self.functions)
        elif node.op == "call_method":
            hit = node.target in self.methods
        else:
            return False
        return hit and (self.accepts is None or self.accepts(node))

    def handler(self, target: str) -> Handler | None:
        return self.handlers.get(target) or self.handlers.get(ANY_TARGET)


def _one_node_arg(node: fx.Node) -> bool:
    return len(node.args) == 1 and isinstance(node.args[0], fx.Node)


def _is_shape_getattr(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] == "shape"


def _reads_size(node: fx.Node) -> bool:
    """``x.shape`` / ``x.size()``."""
    return _is_shape_getattr(node) or (node.op == "call_method" and node.target == "size")


def _indexes_a_size(node: fx.Node) -> bool:
    """``x.shape[i]`` / ``x.shape[a:b]``: an index into a tensor's size (not into a tensor)."""
    return len(node.args) == 2 and isinstance(node.args[0], fx.Node) and _reads_size(node.args[0])


def _nearest(node: fx.Node) -> bool:
    return node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest") == "nearest"


RULES: tuple[OpRule, ...] = (
    OpRule("quant_layer", "QuantConv2d / QuantBnConv2d / QuantLinear: integer codes x codes, int32 accumulator",
           modules=QUANT_LAYERS),
    OpRule("float_layer", "a Conv2d / Linear left float: rejected (every conv/linear must be quantized)",
           modules=(nn.Conv2d, nn.Linear)),
    OpRule("identity", "Dropout, Identity, folded BatchNorm (eval): the input itself",
           modules=IDENTITY_MODULES, accepts=_one_node_arg),
    OpRule("batchnorm", "eval BatchNorm2d / torchvision's FrozenBatchNorm2d: a per-channel scale, sign and bias",
           modules=(nn.BatchNorm2d, FrozenBatchNorm2d)),
    OpRule("relu", "ReLU: max(v, 0) on the same grid",
           modules=(nn.ReLU,), functions=tuple(RELU_FUNCS), methods=("relu", "relu_")),
    OpRule("add", "residual add: both operands rescaled to a common grid",
           functions=tuple(ADD_FUNCS), methods=("add",)),
    OpRule("cat", "concatenation: every part rescaled (dyadic) to one shared grid",
           functions=(torch.cat, torch.concat, torch.concatenate)),
    OpRule("flatten", "flatten: per-channel scales expanded to the flattened features",
           modules=(nn.Flatten,), functions=(torch.flatten,), methods=("flatten",)),
    OpRule("upsample", "nearest upsampling (F.interpolate, mode='nearest'): entries copied, grid kept",
           modules=(nn.Upsample,), functions=(F.interpolate,), accepts=_nearest),
    OpRule("size", "x.shape / x.size(): the tensor's size (its integer values have the same)",
           functions=(getattr,), methods=("size",), accepts=_reads_size),
    OpRule("size_item", "x.shape[i] / x.shape[a:b]: an entry or a slice of a size",
           functions=(operator.getitem,), accepts=_indexes_a_size),
    OpRule("max_pool", "max pooling: commutes with a positive scale",
           modules=(nn.MaxPool2d,), functions=(F.max_pool2d,)),
    OpRule("avg_pool", "windowed average pooling (padding, count_include_pad): integer window sum,"
           " rounded division by each position's divisor",
           modules=(nn.AvgPool2d,), functions=(F.avg_pool2d,)),
    OpRule("adaptive_avg_pool", "global average pooling: integer sum, rounded division",
           modules=(nn.AdaptiveAvgPool2d,), functions=(F.adaptive_avg_pool2d,)),
    OpRule("grid", "a StaticGrid / QuantAct node (I-BERT fake-quant): requantize onto its calibrated grid",
           modules=(QuantAct,)),
    OpRule("gelu", "GELU (exact erf form): I-BERT i-GELU",
           modules=(QuantGELU, nn.GELU), functions=(F.gelu,), methods=("gelu",)),
    OpRule("softmax", "softmax over the last dim (optionally with an additive padding mask): I-BERT i-softmax",
           modules=(QuantSoftmax, nn.Softmax), functions=(torch.softmax, F.softmax), methods=("softmax",)),
    OpRule("layernorm", "LayerNorm over the last dim: I-BERT integer LayerNorm (Newton square root)",
           modules=(nn.LayerNorm,)),
    OpRule("matmul", "matmul of two activations: codes x codes on per-tensor grids",
           functions=(operator.matmul, torch.matmul, torch.bmm), methods=("matmul", "bmm")),
    OpRule("scale", "* or / by a Python number: only the scale changes (a sign flip if negative)",
           functions=(operator.truediv, operator.mul, torch.div, torch.mul), methods=("div", "mul")),
    OpRule("mean", "mean over dims: integer sum, rounded division",
           functions=(torch.mean,), methods=("mean",)),
    OpRule("shape", "transpose / permute / view / reshape / contiguous / unflatten: entries move, grid kept",
           functions=(torch.transpose, torch.permute, torch.reshape), methods=SHAPE_METHODS),
    OpRule("select", "x[:, i] (integers and full slices, last dim kept): entries picked, grid kept",
           functions=(operator.getitem,)),
    OpRule("embedding", "QuantEmbedding: lookup of the integer code table, each row's (group's) scale rescaled"
           " (dyadic) to one grid", modules=(QuantEmbedding,)),
    OpRule("positions", "BERT position ids (0 .. seq-1 per row): index arithmetic",
           modules=(PositionIds,)),
    OpRule("padding_mask", "a 1/0 attention mask made additive for the softmax: integer keep flags",
           modules=(PaddingMask,)),
    OpRule("tanh", "tanh (the BERT pooler): i-tanh from I-BERT's i-exp",
           modules=(QuantTanh, nn.Tanh), functions=(torch.tanh,), methods=("tanh",)),
    OpRule("pooling", "masked mean over tokens and L2 normalisation (sentence embeddings): integer sums,"
           " rounded division, Newton square root", modules=(MaskedMeanNormalize,)),
)
RULES_BY_OP: dict[str, OpRule] = {r.op: r for r in RULES}


def match(node: fx.Node, modules: dict[str, nn.Module]) -> OpRule | None:
    """The rule of a ``call_module`` / ``call_function`` / ``call_method`` node, or None (no rule)."""
    module = modules.get(node.target) if node.op == "call_module" else None
    return next((r for r in RULES if r.matches(node, module)), None)


def handles(op: str, target: str) -> Callable[[Handler], Handler]:
    """Register the decorated converter method as ``op``'s handler for ``target`` in :data:`RULES`."""
    if op not in RULES_BY_OP:
        raise HawqError(f"handles: unknown op '{op}' (add an OpRule to hawq.quant.ops.RULES first)")
    if target not in (*TARGETS, ANY_TARGET):
        raise HawqError(f"handles: unknown target '{target}'")

    def register(fn: Handler) -> Handler:
        RULES_BY_OP[op].handlers[target] = fn
        return fn

    return register


def rule_table() -> list[dict[str, str]]:
    """The table as rows (op, meaning, handler per target): for docs and tests."""
    rows = []
    for r in RULES:
        row = {"op": r.op, "doc": r.doc}
        for t in TARGETS:
            h = r.handler(t)
            row[t] = "-" if h is None else h.__qualname__
        rows.append(row)
    return rows
