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
    assert set(outputs) == {"classification", "bbox_regression", "head"} and not model.training
    with torch.no_grad():  # the step-by-step forward computes torchvision's own training losses
        model.train()
        own = model(list(batch[0]), [{k: t[k] for k in ("boxes", "labels")} for t in batch[1]])
        model.eval()
    for k in own:
        assert torch.allclose(outputs[k], own[k])
    loss = task.loss_from_outputs(outputs, batch)
    assert torch.allclose(task.loss(model, batch), loss)  # deterministic: BN statistics do not move
    loss.backward()
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert model.head.classification_head.cls_logits.weight.grad.abs().sum() > 0
    metrics = task.evaluate(model, coco.loader("test", 2), progress=False)
    assert metrics["n"] == 3 and 0.0 <= metrics["map"] <= metrics["map50"] <= 100.0
    assert set(spec.default_pins) <= set(spec.layers(model))
    same = task.distill_loss(outputs, {k: v.detach() for k, v in outputs.items()}, 2.0)
    assert float(same.detach()) == pytest.approx(0.0, abs=1e-5)


def test_head_distillation_pulls_the_student_to_the_teacher():
    from hawq.models.retinanet import head_distill_loss

    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 30, 7, generator=gen)  # 3 classes + 4 box deltas
    assert float(head_distill_loss(teacher.clone(), teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    student = (teacher + 0.5 * torch.randn(2, 30, 7, generator=gen)).requires_grad_(True)
    loss = head_distill_loss(student, teacher, 2.0)
    loss.backward()
    assert float(loss.detach()) > 0
    step = (student - 0.5 * student.grad).detach()  # a gradient step lowers it
    assert float(head_distill_loss(step, teacher, 2.0)) < float(loss.detach())
    # box deltas count by the teacher's objectness: an error on a background anchor weighs less
    confident = teacher.clone()
    confident[:, 0, :3], confident[:, 1, :3] = 8.0, -8.0  # anchor 0: an object, anchor 1: background
    off0, off1 = confident.clone(), confident.clone()
    off0[:, 0, 3:] += 1.0
    off1[:, 1, 3:] += 1.0
    assert float(head_distill_loss(off0, confident, 2.0)) > 100 * float(head_distill_loss(off1, confident, 2.0))


def test_coco_map_perfect_and_wrong_predictions():
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 30.0]]),
                "labels": torch.tensor([1, 2]), "image_id": torch.tensor(1)}]
    perfect = [{"boxes": targets[0]["boxes"].clone(), "scores": torch.tensor([0.9, 0.8]),
                "labels": torch.tensor([1, 2])}]
    assert coco_map(perfect, targets) == {"map": pytest.approx(100.0), "map50": pytest.approx(100.0),
                                          "map75": pytest.approx(100.0), "map_small": pytest.approx(100.0)}
    wrong_class = [{**perfect[0], "labels": torch.tensor([2, 1])}]
    assert coco_map(wrong_class, targets)["map"] == pytest.approx(0.0)
    shifted = [{**perfect[0], "boxes": perfect[0]["boxes"] + torch.tensor([3.0, 0.0, 3.0, 0.0])}]
    m = coco_map(shifted, targets)
    assert 0.0 < m["map"] < 100.0 and m["map50"] == pytest.approx(100.0)  # IoU 0.54 and 0.74: counted at .5


def _det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def test_coco_map_crowd_boxes_are_ignore_regions():
    """COCO protocol: a detection on a crowd box is neither TP nor FP, an unfound crowd box is no miss."""
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1]),
              "image_id": torch.tensor(1), "crowd_boxes": torch.tensor([[50.0, 50.0, 90.0, 90.0]]),
              "crowd_labels": torch.tensor([1])}
    # the higher-scored detection lies on the crowd region: an FP if crowd were dropped (AP 50), ignored here
    on_crowd = _det([[50.0, 50.0, 90.0, 90.0], [0.0, 0.0, 10.0, 10.0]], [0.95, 0.9], [1, 1])
    assert coco_map([on_crowd], [target])["map"] == pytest.approx(100.0)
    without_crowd = {k: v for k, v in target.items() if not k.startswith("crowd_")}
    assert coco_map([on_crowd], [without_crowd])["map"] == pytest.approx(50.0, abs=0.01)
    # the crowd box is never found: recall still 1, no miss
    assert coco_map([_det([[0.0, 0.0, 10.0, 10.0]], [0.9], [1])], [target])["map"] == pytest.approx(100.0)
    # a crowd box of a class with no regular box: that class has no AP at all, the mean is over class 1
    crowd2 = {**target, "crowd_labels": torch.tensor([2])}
    assert coco_map([_det([[0.0, 0.0, 10.0, 10.0]], [0.9], [1])], [crowd2])["map"] == pytest.approx(100.0)


def test_coco_map_hand_computed_interpolation_max_dets_and_areas():
    boxes = [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]
    target = {"boxes": torch.tensor(boxes), "labels": torch.tensor([1, 1]), "image_id": torch.tensor(1)}
    # TP 0.9, FP 0.8, TP 0.7: precision 1 up to recall .5 (51 of COCO's 101 recall points), 2/3 after (50)
    dets = _det([boxes[0], [60.0, 60.0, 70.0, 70.0], boxes[1]], [0.9, 0.8, 0.7], [1, 1, 1])
    m = coco_map([dets], [target])
    expected = 100.0 * (51 + 50 * 2 / 3) / 101
    assert m["map"] == pytest.approx(expected, abs=1e-3) and m["map50"] == m["map75"] == pytest.approx(m["map"])
    # at most 100 detections per image: 99 higher-scored FPs leave the TP at rank 100 (precision 1/100),
    # 100 of them push it out
    one = {"boxes": torch.tensor([boxes[0]]), "labels": torch.tensor([1]), "image_id": torch.tensor(1)}
    for n_fp, ap in ((99, 1.0), (100, 0.0)):
        fps = [[40.0 + i, 40.0, 45.0 + i, 45.0] for i in range(n_fp)]
        d = _det(fps + [boxes[0]], [0.99 - 1e-4 * i for i in range(n_fp)] + [0.5], [1] * (n_fp + 1))
        assert coco_map([d], [one])["map"] == pytest.approx(ap, abs=1e-3)
    # area ranges use the annotation's area: a 10x10 box is small unless its area says otherwise
    assert set(coco_map([dets], [target])) == {"map", "map50", "map75", "map_small"}
    medium = coco_map([dets], [{**target, "area": torch.tensor([5000.0, 5000.0])}])
    # ... and an unmatched detection outside the range (the 10x10 FP, area 100) is ignored there
    assert medium["map_medium"] == pytest.approx(100.0) and "map_small" not in medium


def test_coco_data_keeps_crowd_as_ignore_regions(tmp_path):
    coco = build_data(DataConfig(name="coco", root=str(make_fake_coco(tmp_path, n_train=2, n_val=2, size=64,
                                                                      crowd=True))))
    _, target = coco.test[0]
    assert target["crowd_boxes"].tolist() == [[0.0, 0.0, 16.0, 16.0]] and target["crowd_labels"].tolist() == [1]
    assert target["crowd_area"].tolist() == [256.0] and len(target["area"]) == len(target["boxes"]) > 0
    assert [0.0, 0.0, 16.0, 16.0] not in target["boxes"].tolist()  # never a training target
    # the training loss takes only the regular boxes; evaluation sees the crowd region
    spec, model = build_model(ModelConfig(name="retinanet_resnet50_fpn", kwargs=SMALL), coco.num_classes)
    task = get_task(spec.task)
    batch = next(iter(coco.loader("train", 2)))
    plain = (batch[0], tuple({k: t[k] for k in ("boxes", "labels")} for t in batch[1]))
    torch.manual_seed(0)
    assert torch.allclose(task.loss(model, batch), task.loss(model, plain))


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


def test_retinanet_config_search_has_real_choices():
    """configs/retinanet.yaml's budget leaves many feasible maps; the ILP picks among them by sensitivity."""
    import dataclasses
    from pathlib import Path

    from hawq.config import load_config
    from hawq.search.allocate import build_search_problem, solve_problem
    from hawq.search.costs import layer_costs

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "retinanet.yaml")
    torch.manual_seed(0)
    spec, model = build_model(ModelConfig(name="retinanet_resnet50_fpn", kwargs=SMALL), 3)
    model.eval()
    costs = layer_costs(model, lambda m: m([torch.zeros(3, 64, 64)]), spec.layers(model))
    search = dataclasses.replace(cfg.search, pins={**spec.default_pins, **cfg.search.pins}, pareto_points=0)
    free = [n for n in costs if n not in search.pins]
    lo, hi = min(search.weight_bits), max(search.weight_bits)
    assert hi > lo and len(free) > 50
    gen = torch.Generator().manual_seed(1)
    traces = {n: {"mean": float(torch.rand((), generator=gen)) + 0.01, "numel": costs[n].weight_numel} for n in costs}
    problem = build_search_problem(model, traces, costs, search)
    budget = problem.budgets["size_mb"]

    def usage(bits: dict[str, int]) -> float:
        return problem.usage({n: (bits.get(n, search.pins.get(n, {}).get("weight", lo)), 8) for n in costs})["size_mb"]

    # several maps fit: all free layers at the low width, and each one of many layers alone raised to the top
    assert usage({}) < budget
    assert sum(usage({n: hi}) <= budget for n in free) > 10
    chosen = solve_problem(problem)
    picked = {n: chosen.bits[n].weight for n in free}
    assert set(picked.values()) == {lo, hi} and chosen.usage["size_mb"] <= budget * (1 + 1e-9)
    # by sensitivity: making a low layer the most sensitive by far raises it; making a high one flat lowers it
    up = next(n for n in free if picked[n] == lo)
    down = next(n for n in free if picked[n] == hi)
    traces2 = {**traces, up: {"mean": 1e6, "numel": costs[up].weight_numel},
               down: {"mean": 1e-9, "numel": costs[down].weight_numel}}
    again = solve_problem(build_search_problem(model, traces2, costs, search))
    assert again.bits[up].weight == hi and again.bits[down].weight == lo


def test_label_free_sensitivity_on_head_outputs_is_sampled_in_the_output_space(coco):
    """The label-free loss on the raw head outputs (logits + box deltas) makes every layer, the heads
    shared by the FPN levels included, take the output-space path: no per-layer Hutchinson probes."""
    from hawq.models.retinanet import head_outputs
    from hawq.sensitivity import hessian_traces, label_free_loss

    torch.manual_seed(0)
    spec, model = build_model(ModelConfig(name="retinanet_resnet50_fpn", kwargs=SMALL), coco.num_classes)
    model.eval()
    task = get_task(spec.task)
    batch = next(iter(coco.loader("train", 2)))
    out = task.output_forward(model, batch)
    anchors = sum(h * w for h, w in ((8, 8), (4, 4), (2, 2), (1, 1), (1, 1))) * 9  # P3..P7 of a 64x64 input
    assert out.shape == (2, anchors, coco.num_classes + 4)
    with torch.no_grad():  # the same numbers as the model's own head, before any decoding
        hd = model.head(list(model.backbone(model.transform(list(batch[0]))[0].tensors).values()))
    assert torch.equal(out[..., :coco.num_classes], hd["cls_logits"])
    assert torch.equal(head_outputs(model, list(batch[0])), out)
    layers = spec.layers(model)
    info: dict = {}
    traces = hessian_traces(model, label_free_loss(task, model), [batch], layers=layers, tol=0.2, max_probes=10,
                            progress=False, info=info)
    assert info["output_space"]["mode"] == "sampled"
    assert {t.estimator for t in traces.values()} == {"gn_sampled"} and len(traces) == len(layers)
    assert all(t.mean > 0 and t.std_err < t.mean for t in traces.values())


@pytest.mark.slow
def test_retinanet_config_end_to_end_on_stand_in_data(tmp_path):
    """configs/retinanet.yaml as shipped, on stand-in data at 64 px: label-free head-output traces for every
    layer, a mixed 4/8-bit map, finetuning with head distillation, and QDQ and integer-only exports of
    backbone + FPN + heads whose verdicts pass (anchors, decoding and NMS stay outside the graph)."""
    from pathlib import Path

    from hawq.config import load_config
    from hawq.pipeline import run_pipeline

    root = make_fake_coco(tmp_path / "coco", n_train=4, n_val=2, size=64, crowd=True)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "retinanet.yaml", [
        f"data.root={root}", "data.train_split=train", "data.val_split=val", "model.weights=null",
        "model.kwargs={min_size: 64, max_size: 64}", "data.num_workers=0", "train.num_workers=0",
        "data.batch_size=2", "data.eval_batch_size=2", "train.batch_size=2", "run.device=cpu",
        "run.progress=false", "run.threads=1", "sensitivity.batches=1", "sensitivity.batch_size=2",
        "quant.calib_batches=1", "export.onnx=true", f"run.out_dir={tmp_path / 'runs'}", "run.name=rn"])
    assert cfg.sensitivity.label_free and cfg.train.distill.enabled
    report = run_pipeline(cfg)
    run_dir = tmp_path / "runs" / "rn"
    traces = json.loads((run_dir / "traces.json").read_text())["layers"]
    assert {t["estimator"] for t in traces.values()} == {"gn_sampled"}
    assert all(t["mean"] > 0 for t in traces.values())
    bits = yaml_load(run_dir / "bits.yaml")
    assert {v["weight"] for v in bits["layers"].values()} == {4, 8}
    assert {"map", "map50", "map75"} <= set(report["quant_after_finetune"])
    qdq = report["export"]["onnx"]
    assert qdq["path"] == "model.onnx" and qdq["check"]["verdict"] == "pass", qdq
    integer = report["export"]["onnx_integer"]
    assert integer["path"] == "model_int.onnx" and integer["check"]["verdict"] == "pass", integer
    assert integer["check"]["exact_fraction"] == 1.0


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_integer_retinanet_onnx_is_bit_identical_and_decodes_to_the_fake_quant_detections(coco, tmp_path):
    """Backbone (frozen BN), FPN (nearest upsampling + adds, P6/P7) and heads in integer only: the ONNX file
    equals hawq's PyTorch integer model bit for bit, and the integer head outputs, decoded in float
    (anchors, boxes, NMS outside the graph), give the detections torchvision's forward makes of them."""

    from hawq.bitmap import LayerBits
    from hawq.export.deploy import DetectionHeads, check_integer, detection_inputs
    from hawq.export.onnx_qdq import export_onnx_integer
    from hawq.layers import quantizable_layers
    from hawq.models.retinanet import decode_head_outputs
    from hawq.quant.config import QuantConfig
    from hawq.quant.integer import IntUpsampleNearest, to_integer
    from hawq.quant.model import calibrate, quantize_model

    torch.manual_seed(0)
    _, model = build_model(ModelConfig(name="retinanet_resnet50_fpn", kwargs={
        **SMALL, "score_thresh": 0.0, "topk_candidates": 20, "detections_per_img": 10}), coco.num_classes)
    model.eval()
    names = quantizable_layers(model)
    quantize_model(model, {n: LayerBits(4 if i % 2 else 8, 8) for i, n in enumerate(names)}, QuantConfig())
    batch = next(iter(coco.loader("test", 2)))
    (x,) = detection_inputs(model, batch)
    heads = DetectionHeads(model).eval()
    calibrate(heads, [x], lambda m, b: m(b), progress=False)

    int_model = to_integer(heads, x)
    assert sum(isinstance(m, IntUpsampleNearest) for m in int_model.modules()) == 2  # the FPN's top-down path
    path = export_onnx_integer(int_model, x, tmp_path / "model_int.onnx", dynamic_sizes=True)
    check = check_integer(int_model, path, x)
    assert check["verdict"] == "pass" and check["exact_fraction"] == 1.0, check
    # the graph reads every size (FPN upsampling, head layout): another image size, other anchors, still exact
    other = check_integer(int_model, path, torch.randn(1, 3, 96, 64))
    assert other["verdict"] == "pass", other

    with torch.no_grad():
        fake, ints = heads(x), int_model(x)
        expected = model(list(batch[0]))  # torchvision's own forward: transform, heads, decoding, NMS
    assert ints.shape == fake.shape and torch.isfinite(ints).all()
    step = float(fake.abs().max()) / 127  # one step of an 8-bit grid over the outputs
    worst = float((ints - fake).abs().max())
    assert worst <= step
    image_list, _ = model.transform(list(batch[0]))
    sizes = [tuple(t.shape[-2:]) for t in batch[0]]
    # the decoding is torchvision's: on the fake-quant head outputs it gives its forward's detections ...
    for got, want in zip(decode_head_outputs(model, fake, image_list, sizes), expected, strict=True):
        assert all(torch.equal(got[k], want[k]) for k in ("boxes", "scores", "labels"))
    # ... and on the integer ones the detections torchvision's forward makes of them (its head swapped out)
    classes = coco.num_classes
    model.head.forward = lambda features: {"cls_logits": ints[..., :classes], "bbox_regression": ints[..., classes:]}
    with torch.no_grad():
        from_ints = model(list(batch[0]))
    del model.head.forward
    decoded = decode_head_outputs(model, ints, image_list, sizes)
    for got, want, fq in zip(decoded, from_ints, expected, strict=True):
        assert all(torch.equal(got[k], want[k]) for k in ("boxes", "scores", "labels"))
        assert got["boxes"].shape == (10, 4) and torch.isfinite(got["boxes"]).all()
        assert bool((got["boxes"][:, 2:] >= got["boxes"][:, :2]).all()) and bool((got["boxes"] <= 64).all())
        # Untrained, every anchor scores the prior 0.01 to within 1e-4: which one ranks first is a tie that
        # rounding decides, so the boxes need not match; the top score does (sigmoid is 1/4-Lipschitz).
        assert abs(float(got["scores"][0]) - float(fq["scores"][0])) <= worst / 4 + 1e-7
