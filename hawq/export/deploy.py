"""The export stage's work: deployable checkpoint, ONNX files and their pass/fail verdicts.

Everything here runs on the CPU whatever device the run trained on: onnxruntime's CPU provider
and hawq's integer model (``hawq.quant.to_integer``) are CPU-only, so the fake-quant model is
copied to the CPU (the run's model is left where it is) and the example batch moved there.

Verdicts (``check["verdict"]`` is ``"pass"`` or ``"fail"``, ``check["verdict_reason"]`` says why):

* integer-only ONNX (``model_int.onnx``): pass iff every output is bit-identical to hawq's PyTorch
  integer model -- both compute the same integers, so any difference is an exporter bug;
* QDQ ONNX (``model.onnx``): the reference is the fake-quant PyTorch model in float32. Both it and
  onnxruntime compute in float32 with their own summation order, and an activation within float
  error of a rounding boundary lands on the neighbouring code, a difference every later layer
  carries (on deep, untrained nets it can reach tens of output steps). How far such float32 noise
  moves *this* model's outputs is measured per export: the same PyTorch model run in float64 on the
  same inputs (``fp32_fp64_max_abs_diff``). The tolerance is twice that spread (onnxruntime and
  PyTorch float32 may each be that far from float64), and at least one output step (``max|y| /
  127``, for models where float32 noise flips no code). Pass iff the largest difference is within
  the tolerance and, for class logits, onnxruntime's argmax differs from PyTorch's on at most twice
  as many examples as float64's argmax does.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from hawq import HawqError
from hawq.export.onnx_qdq import (
    compare_onnx,
    compare_onnx_integer,
    export_onnx,
    export_onnx_integer,
    ibert_float_view,
)
from hawq.export.quantized_file import save_quantized
from hawq.models.tasks import move_to
from hawq.quant import to_integer

log = logging.getLogger("hawq")

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# ---------------------------------------------------------------------------------------------
# CPU copies


def cpu_copy(model: nn.Module) -> nn.Module:
    """``model`` in eval mode on the CPU: the model itself when it is there already, else a copy
    (the caller's model stays on its device, unchanged)."""
    on_cpu = all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    return model.eval() if on_cpu else copy.deepcopy(model).cpu().eval()


def cpu_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """The example inputs on the CPU (tensors detached; lists of images, as detection takes, too)."""
    return tuple(t.detach().cpu() if isinstance(t, Tensor) else move_to(t, "cpu") for t in inputs)


# ---------------------------------------------------------------------------------------------
# what the ONNX files compute


class TextLogits(nn.Module):
    """A transformers model seen as ``(input_ids, attention_mask, token_type_ids) -> tensor``.

    ``BertForSequenceClassification`` returns a ``SequenceClassifierOutput``; ONNX exports tensors,
    so this returns its ``logits`` (a sentence encoder's embedding tensor passes through). The
    argument names become the ONNX input names.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        kwargs = {k: v for k, v in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids))
                  if v is not None}
        out = self.model(input_ids, **kwargs)
        return out if isinstance(out, Tensor) else out.logits


class DetectionHeads(nn.Module):
    """A torchvision RetinaNet seen as ``images -> (batch, anchors, classes + 4)``: backbone, FPN and
    heads, the part with weights, on images already resized and normalised by the model's
    ``transform`` (:func:`detection_inputs`). Anchors (``model.anchor_generator``), box decoding and NMS
    (``model.postprocess_detections``) take these outputs outside the graph, as
    ``hawq.models.retinanet.head_outputs`` does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        out = self.model.head(list(self.model.backbone(images).values()))
        return torch.cat([out["cls_logits"], out["bbox_regression"]], dim=-1)


def is_detection(model: nn.Module, batch: Any) -> bool:
    """A torchvision one-stage detector (``transform``, ``backbone``, ``head``, ``anchor_generator``) and
    ``(images, targets)`` with a sequence of image tensors, as the detection task's loader yields."""
    return (all(hasattr(model, a) for a in ("transform", "backbone", "head", "anchor_generator"))
            and isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], (list, tuple))
            and all(isinstance(t, Tensor) for t in batch[0]))


def detection_inputs(model: nn.Module, batch: Any) -> tuple[Tensor]:
    """The model's own resize and normalisation of a detection batch, stacked (and padded) as one tensor."""
    with torch.no_grad():
        return (model.transform([t.cpu() for t in batch[0]])[0].tensors,)


def export_inputs(batch: Any) -> tuple[Tensor, ...]:
    """A batch's model inputs in the order the exported model takes them.

    Text batches (dicts) give ``input_ids, attention_mask, token_type_ids``; a later one without an
    earlier one cannot be passed by position, so that is an error. Others give ``(images,)``.
    """
    if isinstance(batch, Mapping):
        present = [k for k in TEXT_INPUTS if k in batch]
        if present != list(TEXT_INPUTS[: len(present)]) or not present:
            raise HawqError(f"export: a text batch needs {', '.join(TEXT_INPUTS)} in that order of presence, "
                            f"got {', '.join(present) or 'none of them'}")
        return tuple(batch[k] for k in present)
    return (batch[0],)


def export_view(model: nn.Module, batch: Any) -> nn.Module:
    """The module the ONNX files are exported from: text models return a tensor (:class:`TextLogits`),
    detection models their raw head outputs (:class:`DetectionHeads`)."""
    if is_detection(model, batch):
        return DetectionHeads(model)
    return TextLogits(model) if isinstance(batch, Mapping) else model


# ---------------------------------------------------------------------------------------------
# verdicts


@torch.no_grad()
def float64_spread(model: nn.Module, inputs: tuple[Tensor, ...], logits: bool) -> dict[str, float]:
    """How far float32 rounding moves ``model``'s outputs: its float32 and float64 runs on ``inputs``.

    Returns ``fp32_fp64_max_abs_diff`` and, for class logits, ``fp32_fp64_argmax_disagreements``.
    """
    ref = model(*inputs)
    m64 = copy.deepcopy(model).double()
    ref64 = m64(*(t.double() if t.is_floating_point() else t for t in inputs))
    out = {"fp32_fp64_max_abs_diff": float((ref.double() - ref64).abs().max())}
    if logits and ref.dim() == 2:
        out["fp32_fp64_argmax_disagreements"] = int((ref.argmax(-1) != ref64.argmax(-1)).sum())
    return out


def qdq_verdict(check: dict[str, Any], spread: dict[str, float], n: int, logits: bool) -> dict[str, Any]:
    """``check`` (from :func:`hawq.export.compare_onnx`) with the tolerance and verdict added (module doc)."""
    tolerance = max(2.0 * spread["fp32_fp64_max_abs_diff"], check["step"])
    out = {**check, **spread, "tolerance": tolerance}
    reasons = []
    if not check["max_abs_diff"] <= tolerance:  # also fails on NaN
        reasons.append(f"max |onnx - torch| {check['max_abs_diff']:.4g} > tolerance {tolerance:.4g}")
    if logits and "argmax_agreement" in check:
        wrong = round((1.0 - check["argmax_agreement"]) * n)
        allowed = 2 * spread.get("fp32_fp64_argmax_disagreements", 0)
        out["argmax_disagreements"] = wrong
        if wrong > allowed:
            reasons.append(f"argmax differs on {wrong} of {n} examples (float64 vs float32: "
                           f"{spread.get('fp32_fp64_argmax_disagreements', 0)}; allowed {allowed})")
    out["verdict"] = "fail" if reasons else "pass"
    out["verdict_reason"] = "; ".join(reasons) or (
        f"max |onnx - torch| {check['max_abs_diff']:.4g} <= tolerance {tolerance:.4g} (2 x the float32/float64 "
        "spread, at least one output step)" + (", argmax within the float64 spread" if logits else ""))
    return out


def integer_verdict(check: dict[str, Any]) -> dict[str, Any]:
    """``check`` (from :func:`hawq.export.compare_onnx_integer`) with its verdict: bit-identical or fail."""
    exact = check["exact_fraction"] == 1.0
    return {**check, "verdict": "pass" if exact else "fail",
            "verdict_reason": "bit-identical to the PyTorch integer model" if exact else
            f"{1.0 - check['exact_fraction']:.3%} of outputs differ from the PyTorch integer model "
            f"(up to {check['max_diff_in_steps']:.4g} steps)"}


def check_qdq(model: nn.Module, path: str | Path, inputs: tuple[Tensor, ...], logits: bool) -> dict[str, Any]:
    """Run the QDQ file and ``model`` (CPU, float32) on ``inputs``; the comparison with its verdict."""
    check = compare_onnx(model, path, inputs)
    return qdq_verdict(check, float64_spread(model, inputs, logits), int(inputs[0].shape[0]), logits)


def check_integer(int_model: nn.Module, path: str | Path, inputs: Tensor | tuple[Tensor, ...]) -> dict[str, Any]:
    """Run the integer-only file and the PyTorch integer model on ``inputs``; the comparison with its verdict."""
    return integer_verdict(compare_onnx_integer(int_model, path, inputs))


# ---------------------------------------------------------------------------------------------
# deployable checkpoint


@contextlib.contextmanager
def without_training_only(model: nn.Module, prefixes: tuple[str, ...]) -> Iterator[nn.Module]:
    """``model`` with the submodules named in ``prefixes`` set to None for the duration (then put back).

    The builders of the families that have such modules (Inception-V3's ``AuxLogits``) skip a
    submodule that is None in eval mode, as they do when built without it.
    """
    removed: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name in prefixes:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            sub = getattr(parent, child, None)
            if isinstance(sub, nn.Module):
                removed.append((parent, child, sub))
                setattr(parent, child, None)
        yield model
    finally:
        for parent, child, sub in reversed(removed):
            setattr(parent, child, sub)


def save_deployable(model: nn.Module, bits: Any, path: Path, model_info: dict, quant_config: Any,
                    integer: bool | None, training_only: tuple[str, ...] = (),
                    deploy_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``save_quantized`` of what inference runs: training-only submodules left out, and the builder
    kwargs in ``model_info`` set so that ``load_quantized`` rebuilds the model without them."""
    info = dict(model_info)
    if deploy_kwargs:
        info["kwargs"] = {**info.get("kwargs", {}), **deploy_kwargs}
    with without_training_only(model, training_only):
        return save_quantized(model, bits, path, info, quant_config=quant_config, integer=integer)


# ---------------------------------------------------------------------------------------------
# the export stage


def export_artifacts(qmodel: nn.Module, bits: Any, run_dir: Path, ecfg: Any, model_info: dict, quant_config: Any,
                     batch: Any = None, logits: bool = False, training_only: tuple[str, ...] = (),
                     deploy_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model.safetensors``, ``model.onnx`` and ``model_int.onnx`` as ``ecfg`` asks; return the
    report's ``export`` section.

    ``qmodel``: the finetuned fake-quant model on any device (not modified). ``batch``: one test
    batch (any device) for the ONNX exports and checks; ``logits``: the outputs are class logits
    (the QDQ verdict then checks argmax agreement too). A failed export is recorded as ``error``; a
    file that was written but could not be checked keeps its ``path`` and records ``check_error``.
    """
    out: dict[str, Any] = {}
    qmodel = cpu_copy(qmodel)  # the integer constants in the checkpoint are computed on the CPU too
    if ecfg.safetensors:
        summary = save_deployable(qmodel, bits, run_dir / "model.safetensors", model_info, quant_config,
                                  ecfg.integer, training_only, deploy_kwargs)
        out["safetensors"] = {"path": "model.safetensors", **summary}
        if training_only:
            out["safetensors"]["left_out"] = list(training_only)
    if not (ecfg.onnx or ecfg.onnx_integer):
        return out
    if batch is None:
        raise HawqError("export_artifacts: ONNX export needs an example batch")
    model = export_view(qmodel, batch)
    inputs = detection_inputs(qmodel, batch) if is_detection(qmodel, batch) else cpu_inputs(export_inputs(batch))
    if ecfg.onnx:
        out["onnx"] = _export_qdq(model, inputs, run_dir / "model.onnx", ecfg, logits)
    if ecfg.onnx_integer:
        out["onnx_integer"] = _export_integer(model, inputs, run_dir / "model_int.onnx", ecfg.onnx_opset)
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _export_qdq(model: nn.Module, inputs: tuple[Tensor, ...], path: Path, ecfg: Any, logits: bool) -> dict[str, Any]:
    # I-BERT kernels are float ops in a QDQ file: its PyTorch reference is the model with those float ops
    float_view = ibert_float_view(model)
    model = model if float_view is None else float_view
    try:
        export_onnx(model, inputs if len(inputs) > 1 else inputs[0], path, opset=ecfg.onnx_opset,
                    int4=ecfg.onnx_int4)
    except Exception as e:  # noqa: BLE001
        # Some graphs (detection post-processing) have no QDQ export yet; the finetuned model and its
        # safetensors are already saved, so record the reason and go on.
        log.warning("onnx export skipped: %s", e)
        return {"error": _one_line(e)}
    try:
        check = check_qdq(model, path, inputs, logits)
        if float_view is not None:
            check["reference"] = ("the fake-quant model with float GELU/softmax/LayerNorm/tanh at the I-BERT grids "
                                  "(the integer kernels are model_int.onnx's)")
        return {"path": path.name, "check": check}
    except Exception as e:  # noqa: BLE001 -- the file exists; say that the check, not the export, failed
        log.warning("onnx check failed: %s", e)
        return {"path": path.name, "check_error": _one_line(e)}


def integer_source(model: nn.Module) -> nn.Module:
    """What ``to_integer`` converts: a traced I-BERT transformer (``quant.transformer: ibert``) already
    takes the text inputs and returns a tensor, so the :class:`TextLogits` view around it is dropped."""
    inner = getattr(model, "model", None)
    return inner if isinstance(model, TextLogits) and isinstance(inner, fx.GraphModule) else model


def _export_integer(model: nn.Module, inputs: tuple[Tensor, ...], path: Path, opset: int) -> dict[str, Any]:
    """``model_int.onnx``: the integer-only model (ConvInteger/MatMulInteger + dyadic rescales).

    Several inputs (a BERT's ids, attention mask, token types) become the file's named inputs."""
    if not all(isinstance(t, Tensor) for t in inputs):
        return {"skipped": "the integer ONNX export takes tensor inputs"}
    example = inputs if len(inputs) > 1 else inputs[0]
    try:
        int_model = to_integer(integer_source(model), example)
        # a detector takes images of any padded size (its anchors follow): height, width, anchors symbolic
        export_onnx_integer(int_model, example, path, opset=opset, dynamic_sizes=isinstance(model, DetectionHeads))
    except HawqError as e:  # e.g. float-only ops (transformers), layers above 8 bits, inputs above 8 bits
        log.info("integer onnx export skipped: %s", e)
        return {"skipped": str(e)}
    try:
        return {"path": path.name, "check": check_integer(int_model, path, example)}
    except Exception as e:  # noqa: BLE001
        log.warning("integer onnx check failed: %s", e)
        return {"path": path.name, "check_error": _one_line(e)}
