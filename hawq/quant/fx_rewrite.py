"""The torch.fx rewrite skeleton shared by :func:`hawq.quant.to_integer` and :func:`hawq.quant.to_fbgemm`.

Both conversions trace a working copy of the calibrated fake-quant model, walk its graph once in
order and build a new graph node by node. :class:`GraphRewriter` owns that walk: the per-node
dispatch through the op rules, the quantized-layer / float-layer checks, identity modules (dropout,
folded BN, which alias their input) and the one-line errors. A subclass
supplies ``on_placeholder``, ``on_output``, ``on_quant_layer``, its per-op handlers -- registered in the
one rule table, :data:`hawq.quant.ops.RULES`, with ``@handles(op, target)`` -- and what it knows about
each produced tensor (``info``: a scale, a grid, ...).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from hawq import HawqError
from hawq.quant.model import trace
from hawq.quant.modules import QuantAct, QuantBnConv2d
from hawq.quant.ops import ANY_TARGET, IDENTITY_MODULES, handles, match
from hawq.quant.quantizers import FLOAT_BITS

MAX_BITS = 8  # integer kernels: weights and activations of at most 8 bits
# The reference integer engine takes wider layer inputs (int64 storage, exact float64 products); its
# conversion checks that the worst-case accumulator of every layer still fits in int32.
REFERENCE_ACT_MAX_BITS = 16


# --- checks shared by the conversions (pure functions) -----------------------------------------
def check_input_quant(layer: nn.Module, name: str, what: str, max_bits: int = MAX_BITS) -> QuantAct:
    """The layer's calibrated, at most ``max_bits``-bit input quantizer, or a HawqError naming the problem."""
    act = layer.input_quant
    if act is None:
        raise HawqError(f"{what}: layer '{name}' has float activations (activation bits 32)")
    if not act.calibrated:
        raise HawqError(f"{what}: the input quantizer of '{name}' is not calibrated; run calibrate() first")
    if act.bits > max_bits:
        raise HawqError(f"{what}: layer '{name}' has {act.bits}-bit activations; at most {max_bits} supported")
    return act


def check_weights(layer: nn.Module, name: str, what: str, group_hint: str) -> None:
    """Integer weights at most 8 bits, per channel or per tensor (``group_hint`` explains the last)."""
    if layer.weight_bits >= FLOAT_BITS:
        raise HawqError(f"{what}: layer '{name}' has float weights (weight bits 32)")
    if layer.weight_bits > MAX_BITS:
        raise HawqError(f"{what}: layer '{name}' has {layer.weight_bits}-bit weights; at most {MAX_BITS} supported")
    if layer.group_size is not None:
        raise HawqError(f"{what}: layer '{name}' uses group-wise weights; {group_hint}")


def source_weight_bias(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float weight and bias the layer's codes quantize (BN folded for ``QuantBnConv2d``)."""
    if isinstance(layer, QuantBnConv2d):
        return layer.folded_weight_bias()
    return layer.weight, layer.bias


def working_copy(model: nn.Module, dtype: torch.dtype, what: str) -> tuple[nn.Module, fx.GraphModule]:
    """An eval-mode CPU copy of ``model`` in ``dtype`` and its traced graph (the model is not modified)."""
    work = copy.deepcopy(model).eval().to("cpu", dtype)
    return work, trace(work, what)


def get_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# --- the rewrite skeleton ------------------------------------------------------------------------
class GraphRewriter:
    """Walks a traced fake-quant graph in order and builds a new ``fx.GraphModule`` from handlers.

    Subclasses set ``what`` (the public function's name, prefix of every error), ``supported``
    (the operator list named in "cannot convert" errors), ``float_layer_hint`` and
    ``graph_name``, and implement the ``on_*`` handlers. ``env`` maps an old node to its value
    in the new graph, ``info`` to what the subclass records about it.
    """

    what = "convert"
    target = ""  # the key of this converter's handlers in hawq.quant.ops.RULES
    supported = ""
    float_layer_hint = "every conv/linear must be quantized"
    graph_name = "ConvertedModel"

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.model, self.gm = model, gm
        self.modules = dict(model.named_modules())
        self.graph = fx.Graph()
        self.new_modules: dict[str, Any] = {}
        self.env: dict[fx.Node, fx.Node] = {}
        self.info: dict[fx.Node, Any] = {}

    # --- building the new graph -------------------------------------------------------------
    def module_name(self, base: str) -> str:
        """A free attribute name for a new module derived from ``base`` (dots are not allowed)."""
        name = base.replace(".", "_")
        while name in self.new_modules:
            name += "_"
        return name

    def add_module(self, base: str, module: Any) -> str:
        name = self.module_name(base)
        self.new_modules[name] = module
        return name

    def emit(self, base: str, module: Any, args: tuple) -> fx.Node:
        """A ``call_module`` node of the new graph running ``module`` on ``args``."""
        return self.graph.call_module(self.add_module(base, module), args)

    def bind(self, node: fx.Node, value: fx.Node, info: Any) -> None:
        self.env[node], self.info[node] = value, info

    def value(self, node: fx.Node, arg: Any) -> tuple[fx.Node, Any]:
        """``(new-graph value, info)`` of an argument of ``node`` that must be a converted tensor."""
        if not isinstance(arg, fx.Node) or arg not in self.env:
            raise self.unsupported(node, ": an input is not a tensor of the converted graph")
        return self.env[arg], self.info[arg]

    # --- questions about the old graph --------------------------------------------------------
    def module_of(self, node: fx.Node | None) -> nn.Module | None:
        return self.modules.get(node.target) if node is not None and node.op == "call_module" else None

    def is_identity(self, node: fx.Node) -> bool:
        return (isinstance(self.module_of(node), IDENTITY_MODULES) and len(node.args) == 1
                and isinstance(node.args[0], fx.Node))

    def unsupported(self, node: fx.Node, why: str = "", module: nn.Module | None = None) -> HawqError:
        if module is not None:
            what = f"module '{node.target}' ({type(module).__name__})"
        else:
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
            what = f"node '{node.name}' ({node.op} {target})"
        return HawqError(f"{self.what}: cannot convert {what}{why}; supported: {self.supported}")

    # --- the walk -----------------------------------------------------------------------------
    def rewrite(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            if self.before_node(node):
                continue
            if node.op == "placeholder":
                self.on_placeholder(node)
            elif node.op == "output":
                self.on_output(node)
            elif node.op == "get_attr":
                self.on_get_attr(node)
            elif node.op in ("call_module", "call_function", "call_method"):
                self._dispatch(node)
            else:
                raise self.unsupported(node)
        self.graph.lint()
        return fx.GraphModule(self.new_modules, self.graph, self.graph_name)

    def _dispatch(self, node: fx.Node) -> None:
        """The op's rule in :data:`hawq.quant.ops.RULES` converts the node (for this converter's target)."""
        mod = self.module_of(node)
        rule = match(node, self.modules)
        handler = rule.handler(self.target) if rule is not None else None
        if handler is None:
            self.on_unmatched(node, mod)
        else:
            handler(self, node, mod)

    # --- rules every target shares ------------------------------------------------------------
    @handles("quant_layer", ANY_TARGET)
    def _rule_quant_layer(self, node: fx.Node, mod: nn.Module | None) -> None:
        if len(node.args) != 1 or node.kwargs:
            raise self.unsupported(node, ": extra arguments", module=mod)
        self.on_quant_layer(node, node.target, mod)

    @handles("float_layer", ANY_TARGET)
    def _rule_float_layer(self, node: fx.Node, mod: nn.Module | None) -> None:
        raise HawqError(f"{self.what}: layer '{node.target}' is float (not in the bit map, or at 32 bits); "
                        f"{self.float_layer_hint}")

    @handles("identity", ANY_TARGET)
    def _rule_identity(self, node: fx.Node, mod: nn.Module | None) -> None:
        self.on_identity(node)

    # --- handlers (subclasses) ----------------------------------------------------------------
    def before_node(self, node: fx.Node) -> bool:
        """Handle ``node`` ahead of the dispatch (e.g. a node fused into an earlier one); True if done."""
        return False

    def on_identity(self, node: fx.Node) -> None:
        """Dropout, identity, folded BN (the working copy is in eval mode): the input's value itself."""
        self.bind(node, *self.value(node, node.args[0]))

    def on_get_attr(self, node: fx.Node) -> None:
        raise self.unsupported(node)

    def on_placeholder(self, node: fx.Node) -> None:
        raise NotImplementedError

    def on_output(self, node: fx.Node) -> None:
        raise NotImplementedError

    def on_quant_layer(self, node: fx.Node, name: str, mod: nn.Module) -> None:
        raise NotImplementedError

    def on_unmatched(self, node: fx.Node, mod: nn.Module | None) -> None:
        """A node whose op has no rule for this target."""
        raise self.unsupported(node, module=mod)
