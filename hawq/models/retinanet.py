"""RetinaNet-ResNet50-FPN (torchvision) as a detection family, scored by COCO AP (pycocotools, crowd = ignore).

The Hessian and training loss is the sum of the model's own training losses (sigmoid focal
classification + L1 box regression). torchvision detection models compute losses only in training
mode, so :class:`DetectionTask` switches the model to training mode for the loss; every
BatchNorm of the backbone is a ``FrozenBatchNorm2d`` (torchvision's choice for detection), so the
mode switch changes no statistics and the loss is a deterministic function of the weights.
Class labels are COCO category ids (0 = background is never used), torchvision's convention.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hawq import HawqError, bars_off
from hawq.models.checkpoint import load_checkpoint
from hawq.models.registry import ModelSpec, register_model
from hawq.models.tasks import Task, register_task

COCO_NUM_CLASSES = 91  # torchvision's COCO weights: category ids 1..90 used as labels directly


def retinanet_resnet50_fpn(num_classes: int = COCO_NUM_CLASSES, weights: str | None = None,
                           checkpoint: str | None = None, min_size: int = 800, max_size: int = 1333,
                           **kwargs: Any) -> nn.Module:
    """torchvision RetinaNet with a frozen-BN ResNet-50-FPN backbone and all layers trainable.

    ``weights``: a ``RetinaNet_ResNet50_FPN_Weights`` name (``COCO_V1``, 91 classes) to download;
    ``checkpoint``: a local state dict of the same architecture. ``min_size``/``max_size`` set the
    internal resize (small values make tests fast); other kwargs go to ``RetinaNet``.
    """
    from torchvision.models import resnet50
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc as misc_ops
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if weights and checkpoint:
        raise HawqError("set model.weights or model.checkpoint, not both")
    backbone = resnet50(weights=None, norm_layer=misc_ops.FrozenBatchNorm2d)
    # all five stages trainable: the sensitivity stage needs gradients of every quantized weight
    backbone = _resnet_fpn_extractor(backbone, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    model = RetinaNet(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs)
    if weights:
        from hawq.models.torchvision_models import _fetch_state_dict, resolve_torchvision_weights

        w = resolve_torchvision_weights("retinanet_resnet50_fpn", weights)
        if num_classes != len(w.meta["categories"]):
            raise HawqError(f"weights {w.name} have {len(w.meta['categories'])} classes, model.num_classes is "
                            f"{num_classes}: set model.num_classes: {len(w.meta['categories'])}")
        state = _fetch_state_dict("retinanet_resnet50_fpn", w)
        model.load_state_dict(state, strict=True)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


def head_outputs(model: nn.Module, images: list[Tensor]) -> Tensor:
    """RetinaNet's raw head outputs for ``images``: ``(batch, anchors, num_classes + 4)``, the
    classification logits and box-regression deltas of every anchor (FPN levels in order), computed
    as the model's own forward computes them (same resize and normalisation) before any decoding.
    """
    image_list, _ = model.transform(images)
    features = list(model.backbone(image_list.tensors).values())
    out = model.head(features)
    return torch.cat([out["cls_logits"], out["bbox_regression"]], dim=-1)


FPN_LEVELS = (3, 7)  # P3..P7: the first level has stride 2^3, each next one halves (stride-2 convs, ceil)


def level_sizes(height: int, width: int, levels: tuple[int, int] = FPN_LEVELS) -> list[tuple[int, int]]:
    """The feature-map sizes of FPN levels ``levels[0]..levels[1]`` for a padded input of ``height x width``.

    Every stride-2 stage of ResNet-FPN (the 7x7 stem conv, the max pool, the 3x3 convs, P6/P7) maps a
    size ``s`` to ``ceil(s / 2)``.
    """
    sizes, h, w = [], height, width
    for level in range(levels[1] + 1):
        if level >= levels[0]:
            sizes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return sizes


def decode_head_outputs(model: nn.Module, head: Tensor, image_list: Any,
                        original_sizes: list[tuple[int, int]] | None = None) -> list[dict[str, Tensor]]:
    """Detections from RetinaNet's raw head outputs ``(batch, anchors, classes + 4)`` -- what the ONNX
    files (:class:`hawq.export.deploy.DetectionHeads`, float QDQ or integer-only) compute -- by the
    model's own float post-processing, as torchvision's ``RetinaNet.forward`` does after its head:
    anchors (``model.anchor_generator``), box decoding, score threshold, top-k and NMS
    (``model.postprocess_detections``) and, with ``original_sizes``, boxes rescaled to the images
    before ``model.transform`` (``model.transform.postprocess``).

    ``image_list``: ``model.transform``'s result for the batch (the padded tensor's size and each image's
    size); only sizes are read, so the features need not exist: the anchors come from the FPN level
    sizes (:func:`level_sizes`), checked against the number of anchors in ``head``.
    """
    levels = level_sizes(*image_list.tensors.shape[-2:])
    per_position = model.anchor_generator.num_anchors_per_location()
    per_level = [h * w * a for (h, w), a in zip(levels, per_position, strict=True)]
    if sum(per_level) != head.shape[1]:
        raise HawqError(f"decode_head_outputs: the head outputs hold {head.shape[1]} anchors, the FPN levels of a "
                        f"{tuple(image_list.tensors.shape[-2:])} input {sum(per_level)}")
    classes = head.shape[-1] - 4
    stand_ins = [head.new_empty((1, 0, h, w)) for h, w in levels]  # the anchor generator reads sizes only
    anchors = model.anchor_generator(image_list, stand_ins)
    split = {"cls_logits": list(head[..., :classes].split(per_level, dim=1)),
             "bbox_regression": list(head[..., classes:].split(per_level, dim=1))}
    detections = model.postprocess_detections(split, [list(a.split(per_level)) for a in anchors],
                                              image_list.image_sizes)
    if original_sizes is not None:
        detections = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)
    return detections


LOSS_KEYS = ("classification", "bbox_regression")  # the training losses in DetectionTask.forward's dict


def _train_mode_losses(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """torchvision RetinaNet's training forward, step by step, so that the raw head outputs come back
    with the losses (``"head"``, for distillation): transform, backbone, head, anchors, ``compute_loss``."""
    was_training = model.training
    model.train()  # detection losses exist only in training mode; BN is frozen, so nothing else changes
    try:
        image_list, targets = model.transform(images, targets)
        features = list(model.backbone(image_list.tensors).values())
        out = model.head(features)
        anchors = model.anchor_generator(image_list, features)
        losses = model.compute_loss(targets, out, anchors)
    finally:
        model.train(was_training)
    return {**losses, "head": torch.cat([out["cls_logits"], out["bbox_regression"]], dim=-1)}


def head_distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Distillation on RetinaNet's raw head outputs ``(batch, anchors, classes + 4)``.

    Classification: the logits are independent sigmoids (focal loss), so each gets the binary
    KL(teacher || student) of its softened probabilities, ``sigmoid(z / T)``, summed over classes,
    averaged over anchors and scaled by ``T^2`` (Hinton et al.). Boxes: the L1 distance of the
    regression deltas, weighted by the teacher's confidence that the anchor holds an object (its
    largest class probability), so background anchors, whose deltas no loss ever trained, do not
    dominate. Zero when the student's outputs equal the teacher's.
    """
    classes = student.shape[-1] - 4
    s_cls, t_cls = student[..., :classes].float() / temperature, teacher[..., :classes].float() / temperature
    p = torch.sigmoid(t_cls)
    # KL(Bern(p) || Bern(q)) = BCE(q; p) - H(p): BCE with the student's logits against the teacher's probability
    kl = F.binary_cross_entropy_with_logits(s_cls, p, reduction="none") - \
        F.binary_cross_entropy_with_logits(t_cls, p, reduction="none")
    cls = kl.sum(-1).mean() * temperature * temperature
    weight = torch.sigmoid(teacher[..., :classes].float()).amax(-1)
    l1 = (student[..., classes:].float() - teacher[..., classes:].float()).abs().sum(-1)
    box = (weight * l1).sum() / weight.sum().clamp_min(1e-6)
    return cls + box


def _xywh(box: list[float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def coco_map(predictions: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> dict[str, float]:
    """COCO box AP of predictions against targets by the official protocol (pycocotools' ``COCOeval``).

    Boxes are xyxy, labels are category ids. Targets may carry ``crowd_boxes``/``crowd_labels``
    (``iscrowd: 1``): ignore regions, so a detection matched to one is neither a true nor a false
    positive and an unmatched crowd box is no miss; ``area``/``crowd_area`` (the annotation's area, which
    COCO's small/medium/large ranges use; default: box area). Returns percent: ``map`` (AP@[.5:.95],
    101-point interpolation, at most 100 detections per image), ``map50``, ``map75``, and
    ``map_small``/``map_medium``/``map_large`` for the area ranges that hold a ground-truth box.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, dets, categories = [], [], [], set()
    for i, (pred, tgt) in enumerate(zip(predictions, targets)):
        image_id = int(tgt["image_id"]) if "image_id" in tgt else i
        images.append({"id": image_id})
        for crowd, prefix in ((0, ""), (1, "crowd_")):
            if f"{prefix}boxes" not in tgt:
                continue
            boxes = tgt[f"{prefix}boxes"].tolist()
            areas = tgt[f"{prefix}area"].tolist() if f"{prefix}area" in tgt else [None] * len(boxes)
            for box, label, area in zip(boxes, tgt[f"{prefix}labels"].tolist(), areas):
                xywh = _xywh(box)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                    "bbox": xywh, "area": xywh[2] * xywh[3] if area is None else float(area),
                                    "iscrowd": crowd})
                categories.add(int(label))
        for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
            dets.append({"image_id": image_id, "category_id": int(label), "score": float(score), "bbox": _xywh(box)})
            categories.add(int(label))
    if not any(a["iscrowd"] == 0 for a in annotations) or not dets:
        # nothing to find, or nothing found: COCOeval cannot load an empty result list
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c} for c in sorted(categories)]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats: AP@[.5:.95], AP50, AP75, AP small/medium/large; -1 = no ground truth in that range
    out = {"map": 100.0 * max(float(ev.stats[0]), 0.0), "map50": 100.0 * max(float(ev.stats[1]), 0.0),
           "map75": 100.0 * max(float(ev.stats[2]), 0.0)}
    for k, name in zip((3, 4, 5), ("small", "medium", "large")):
        if float(ev.stats[k]) >= 0:
            out[f"map_{name}"] = 100.0 * float(ev.stats[k])
    return out


@register_task
class DetectionTask(Task):
    """Batches are ``(list of CHW float images in [0, 1], list of {boxes (xyxy), labels, image_id})``.

    ``forward`` returns the training losses (``LOSS_KEYS``, the model put in training mode for them)
    and the raw head outputs (``"head"``); ``loss_from_outputs`` sums the losses, ``distill_loss`` compares
    the heads (:func:`head_distill_loss`). ``evaluate`` runs inference and reports COCO AP in percent.
    ``output_forward`` returns the raw head outputs, one tensor ``(batch, anchors, classes + 4)``
    (classification logits, then box-regression deltas, over every anchor of every FPN level; anchors,
    decoding and NMS come after it and hold no weights): the label-free sensitivity loss compares them
    with the FP32 model's (``0.5 * ||f - f_fp32||^2 / batch``, one unit for logits and deltas alike).
    """

    name = "detection"
    primary_metric = "map"
    wider_head_ok = True  # a head with more classes than the data's category ids can still be trained/evaluated

    def forward(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        images, targets = batch
        # crowd regions and areas are for evaluation only: the training loss sees the regular boxes
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        return _train_mode_losses(model, list(images), targets)

    def loss_from_outputs(self, outputs: dict[str, Tensor], batch: Any) -> Tensor:
        return sum(outputs[k] for k in LOSS_KEYS)

    def distill_loss(self, student: Any, teacher: Any, temperature: float) -> Tensor:
        return head_distill_loss(student["head"], teacher["head"], temperature)

    def output_forward(self, model: nn.Module, batch: Any) -> Tensor:
        return head_outputs(model, list(batch[0]))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any], device: torch.device | str = "cpu",
                 progress: bool = True, desc: str = "eval") -> dict[str, float]:
        was_training = model.training
        model.eval()
        preds, targets = [], []
        for batch in tqdm(batches, desc=desc, disable=bars_off(progress), leave=False):
            images, tgts = self.to_device(batch, device)
            out = model(list(images))
            preds += [{k: v.cpu() for k, v in o.items()} for o in out]
            targets += [{k: v.cpu() for k, v in t.items()} for t in tgts]
        model.train(was_training)
        if not targets:
            raise HawqError("evaluation data set is empty")
        return {**coco_map(preds, targets), "n": len(targets)}


register_model(ModelSpec(
    name="retinanet_resnet50_fpn", builder=retinanet_resnet50_fpn, task=DetectionTask.name,
    input_shape=(3, 800, 800), num_outputs=lambda model: int(model.head.classification_head.num_classes),
    default_pins={name: {"weight": 8, "activation": 8} for name in (
        "backbone.body.conv1", "head.classification_head.cls_logits", "head.regression_head.bbox_reg")},
    description="torchvision RetinaNet ResNet-50-FPN (frozen BN), COCO mAP; model.kwargs min_size/max_size",
))
