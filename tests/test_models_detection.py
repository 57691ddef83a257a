"""RetinaNet family, detection task (loss in frozen-BN training mode, COCO mAP) and COCO-style data."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hawq import HawqError
from hawq.data import build_data
from hawq.data.checks import check_compatible
from hawq.data.coco import make_fake_coco
from hawq.data.config import DataConfig
from hawq.models import get_task
from hawq.models.compat import build_model
from hawq.models.config import ModelConfig
from hawq.models.retinanet import coco_map

SMALL = {"min_size": 64, "max_size": 64}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = make_fake_coco(tmp_path_factory.mktemp("coco"), n_train=4, n_val=3, size=64, classes=2)
    return build_data(DataConfig(name="coco", root=str(root)))


def test_coco_data(coco):
    assert coco.num_classes == 3  # category ids 1, 2 used as labels; 0 is background
    image, target = coco.train[0]
    assert image.shape == (3, 64, 64) and 0.0 <= image.min() and image.max() <= 1.0
    boxes = target["boxes"]
    assert boxes.shape[1] == 4 and (boxes[:, 2:] > boxes[:, :2]).all()
    assert set(target["labels"].tolist()) <= {1, 2}
    images, targets = next(iter(coco.loader("train", 2)))
    assert len(images) == len(targets) == 2


def test_retinanet_loss_in_frozen_bn_train_mode_and_evaluate(coco):
    torch.manual_seed(0)
    spec, model = build_model(ModelConfig(name="retinanet_resnet50_fpn", kwargs={**SMALL, "score_thresh": 0.0,
                                                                    "topk_candidates": 20, "detections_per_img": 10}),
                              coco.num_classes)
    check_compatible(spec, model, coco)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # frozen BN only
    assert all(p.requires_grad for p in model.parameters())
    task = get_task(spec.task)
    model.eval()
    batch = next(iter(coco.loader("train", 2)))
    outputs = task.forward(model, batch)
    assert set(outputs) == {"classification", "bbox_regression"} and not model.training
    loss = task.loss_from_outputs(outputs, batch)
    assert torch.allclose(task.loss(model, batch), loss)  # deterministic: BN statistics do not move
    loss.backward()
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert model.head.classification_head.cls_logits.weight.grad.abs().sum() > 0
    metrics = task.evaluate(model, coco.loader("test", 2), progress=False)
    assert metrics["n"] == 3 and 0.0 <= metrics["map"] <= metrics["map50"] <= 100.0
    assert set(spec.default_pins) <= set(spec.layers(model))
    with pytest.raises(HawqError, match="distillation is not supported"):
        task.distill_loss(outputs, outputs, 2.0)


def test_coco_map_perfect_and_wrong_predictions():
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 30.0]]),
                "labels": torch.tensor([1, 2]), "image_id": torch.tensor(1)}]
    perfect = [{"boxes": targets[0]["boxes"].clone(), "scores": torch.tensor([0.9, 0.8]),
                "labels": torch.tensor([1, 2])}]
    assert coco_map(perfect, targets) == {"map": pytest.approx(100.0), "map50": pytest.approx(100.0)}
    wrong_class = [{**perfect[0], "labels": torch.tensor([2, 1])}]
    assert coco_map(wrong_class, targets)["map"] == pytest.approx(0.0)
    shifted = [{**perfect[0], "boxes": perfect[0]["boxes"] + torch.tensor([3.0, 0.0, 3.0, 0.0])}]
    m = coco_map(shifted, targets)
    assert 0.0 < m["map"] < 100.0 and m["map50"] == pytest.approx(100.0)  # IoU 0.54 and 0.74: counted at .5


def test_coco_errors(tmp_path):
    with pytest.raises(HawqError, match="COCO data folder not found"):
        build_data(DataConfig(name="coco", root=str(tmp_path / "none")))
    root = make_fake_coco(tmp_path / "c", n_train=1, n_val=1, size=32)
    (root / "annotations" / "instances_val.json").unlink()
    with pytest.raises(HawqError, match="COCO annotation file not found"):
        build_data(DataConfig(name="coco", root=str(root)))
    (root / "annotations" / "instances_val.json").write_text(json.dumps({"images": []}))
    with pytest.raises(HawqError, match="missing list 'annotations'"):
        build_data(DataConfig(name="coco", root=str(root)))
