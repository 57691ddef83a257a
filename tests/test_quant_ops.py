"""hawq.quant.ops: one table of op rules shared by to_integer and to_fbgemm."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import hawq.quant  # noqa: F401 -- importing the package registers both targets' handlers
from hawq import HawqError
from hawq.quant.ops import RULES, TARGETS, handles, match, rule_table


class _Ops(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu, self.pool, self.flat = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.drop, self.bn = nn.Dropout(), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.bn(self.relu(x))) + F.relu(x).relu()
        z = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1) + self.flat(self.pool(y))
        return (z.view(z.shape[0], -1) @ z.t()).softmax(-1) / 2


def test_nodes_match_one_rule_each():
    gm = fx.symbolic_trace(_Ops())
    modules = dict(gm.named_modules())
    ops = [(n.name, r.op if (r := match(n, modules)) else None) for n in gm.graph.nodes
           if n.op in ("call_module", "call_function", "call_method")]
    got = dict(ops)
    assert got["relu"] == "relu" and got["relu_1"] == "relu" and got["relu_2"] == "relu"  # module, F., method
    assert got["bn"] == "batchnorm" and got["drop"] == "identity" and got["add"] == "add"
    assert got["flatten"] == "flatten" and got["flat"] == "flatten"
    assert got["adaptive_avg_pool2d"] == "adaptive_avg_pool" and got["pool"] == "adaptive_avg_pool"
    assert got["view"] == "shape" and got["matmul"] == "matmul" and got["softmax"] == "softmax"
    assert got["truediv"] == "scale"
    # z.shape and z.shape[0]: sizes (integer-only to_integer keeps them; to_fbgemm has no rule: an error)
    assert got["getattr_1"] == "size" and got["getitem"] == "size_item"


def test_every_op_has_an_integer_rule_and_the_table_names_them():
    rows = {row["op"]: row for row in rule_table()}
    assert set(rows) == {r.op for r in RULES}
    assert all(row["integer"] != "-" for row in rows.values()), rows
    # PyTorch's int8 engines: CNN ops only; transformer ops have no quantized kernel there.
    int8 = {op for op, row in rows.items() if row["torch_int8"] != "-"}
    assert {"quant_layer", "identity", "relu", "add", "flatten", "max_pool", "avg_pool",
            "adaptive_avg_pool", "shape"} <= int8
    assert not {"gelu", "softmax", "layernorm", "matmul", "mean"} & int8
    assert set(TARGETS) == {"integer", "torch_int8"}


def test_handles_rejects_an_unknown_op_or_target():
    with pytest.raises(HawqError, match="unknown op 'conv3d'"):
        handles("conv3d", "integer")
    with pytest.raises(HawqError, match="unknown target 'tflite'"):
        handles("relu", "tflite")
