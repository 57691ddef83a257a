"""Image families (torchvision ResNets, Inception-V3, SqueezeNext), checkpoints and image-folder data."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawq import HawqError
from hawq.data import build_data
from hawq.data.checks import check_compatible
from hawq.data.config import DataConfig
from hawq.data.image_folder import make_fake_image_folder
from hawq.models import get_model_spec, get_task
from hawq.models.checkpoint import load_checkpoint, save_checkpoint
from hawq.models.compat import build_model
from hawq.models.config import ModelConfig


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return make_fake_image_folder(tmp_path_factory.mktemp("imgs"), classes=3, per_class=4, size=32)


def _tiny_resnet(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return get_model_spec("resnet18").builder(num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# checkpoints


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_checkpoint_roundtrip(tmp_path):
    src, dst = _tiny_resnet(seed=0), _tiny_resnet(seed=1)
    assert not _same(src, dst)
    save_checkpoint(src, tmp_path / "m.safetensors")
    load_checkpoint(dst, tmp_path / "m.safetensors")
    assert _same(src, dst)


def test_pth_checkpoint_weights_only_with_wrapper_and_module_prefix(tmp_path):
    src, dst = _tiny_resnet(seed=0), _tiny_resnet(seed=1)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "m.pth")
    load_checkpoint(dst, tmp_path / "m.pth")
    assert _same(src, dst)


def test_checkpoint_mismatch_lists_first_problems(tmp_path):
    save_checkpoint(_tiny_resnet(num_classes=3), tmp_path / "three.safetensors")
    with pytest.raises(HawqError, match=r"shape mismatch 2: fc\.weight: \(3, 512\) vs \(5, 512\)"):
        load_checkpoint(_tiny_resnet(num_classes=5), tmp_path / "three.safetensors")
    state = _tiny_resnet().state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(HawqError, match=r"missing 1: layer1\.0\.conv1\.weight; unexpected 1: extra\.weight"):
        load_checkpoint(_tiny_resnet(), tmp_path / "broken.pth")


def test_checkpoint_refuses_pickled_objects_and_bad_paths(tmp_path):
    import datetime

    torch.save({"created": datetime.datetime(2020, 1, 1), "w": torch.zeros(1)}, tmp_path / "obj.pth")
    with pytest.raises(HawqError, match="weights_only=True"):
        load_checkpoint(_tiny_resnet(), tmp_path / "obj.pth")
    with pytest.raises(HawqError, match="checkpoint not found"):
        load_checkpoint(_tiny_resnet(), tmp_path / "nope.safetensors")
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(HawqError, match="unsupported file type"):
        load_checkpoint(_tiny_resnet(), tmp_path / "m.onnx")


# ---------------------------------------------------------------------------------------------
# torchvision families


def test_resnet18_loss_backward_and_evaluate_on_image_folder(image_root):
    data = build_data(DataConfig(name="imagenet_folder", root=str(image_root), image_size=32))
    assert data.num_classes == 3 and len(data.train) == 12 and tuple(data.test[0][0].shape) == (3, 32, 32)
    spec, model = build_model(ModelConfig(name="resnet18"), data.num_classes)
    check_compatible(spec, model, data)
    task = get_task(spec.task)
    batch = next(iter(data.loader("train", 4)))
    loss = task.loss(model, batch)
    loss.backward()
    assert loss.item() > 0 and model.conv1.weight.grad.abs().sum() > 0
    metrics = task.evaluate(model, data.loader("test", 6), progress=False)
    assert metrics["n"] == 12 and 0.0 <= metrics["top1"] <= 100.0
    assert set(spec.default_pins) <= set(spec.layers(model)) == set(spec.layers(model))


@pytest.mark.parametrize("name", ["resnet50", "resnet152", "inception_v3"])
def test_large_families_build_with_valid_pins(name):
    spec = get_model_spec(name)
    with torch.device("meta"):  # structure only: no memory, no init cost
        model = spec.builder(num_classes=7)
    layers = spec.layers(model)
    assert set(spec.default_pins) <= set(layers)
    assert spec.num_outputs(model) == 7


def test_weights_download_failure_says_use_checkpoint(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(HawqError, match=r"torchvision weights resnet18/IMAGENET1K_V1 failed.*model\.checkpoint"):
        get_model_spec("resnet18").builder(num_classes=3, weights="IMAGENET1K_V1")
    with pytest.raises(HawqError, match="not a torchvision weight of resnet18; known: IMAGENET1K_V1"):
        get_model_spec("resnet18").builder(num_classes=3, weights="IMAGENET9K")


def test_enum_weights_keep_backbone_and_reinit_head_for_other_class_count(monkeypatch):
    import torchvision

    torch.manual_seed(3)
    imagenet = torchvision.models.resnet18(num_classes=1000)
    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict",
                        lambda self, *a, **k: imagenet.state_dict())
    model = get_model_spec("resnet18").builder(num_classes=4, weights="IMAGENET1K_V1")
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert model.fc.out_features == 4


class _TinyAuxNet(nn.Module):
    """Returns torchvision's InceptionOutputs in training mode, like Inception-V3 (which needs 299x299)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.aux = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        from torchvision.models.inception import InceptionOutputs

        return InceptionOutputs(self.fc(x), self.aux(x)) if self.training else self.fc(x)


def test_inception_task_adds_aux_loss_in_training_only():
    torch.manual_seed(0)
    task = get_task(get_model_spec("inception_v3").task)
    model = _TinyAuxNet().train()
    x, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    out = task.forward(model, (x, y))
    assert out.shape == (5, 3) and out.aux_logits.shape == (5, 3)
    expected = F.cross_entropy(out, y) + 0.4 * F.cross_entropy(model.aux(x), y)
    assert torch.allclose(task.loss_from_outputs(out, (x, y)), expected)
    task.loss(model, (x, y)).backward()
    assert model.aux.weight.grad.abs().sum() > 0  # the aux head is trained
    assert task.distill_loss(out, out.detach(), 2.0).abs() < 1e-5  # outputs still act as plain logits
    model.eval()
    ev = task.forward(model, (x, y))
    assert not hasattr(ev, "aux_logits")
    assert torch.allclose(task.loss_from_outputs(ev, (x, y)), F.cross_entropy(ev, y))


def test_inception_enum_weights_without_aux_head(monkeypatch):
    import torchvision

    torch.manual_seed(0)
    imagenet = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    monkeypatch.setattr(torchvision.models.Inception_V3_Weights, "get_state_dict",
                        lambda self, *a, **k: imagenet.state_dict())
    model = get_model_spec("inception_v3").builder(num_classes=5, weights="IMAGENET1K_V1", aux_logits=False)
    assert model.AuxLogits is None and model.transform_input and model.fc.out_features == 5
    assert torch.equal(model.Conv2d_1a_3x3.conv.weight, imagenet.Conv2d_1a_3x3.conv.weight)


def test_inception_v3_eval_forward_and_layers():
    torch.manual_seed(0)
    spec = get_model_spec("inception_v3")
    model = spec.builder(num_classes=3).eval()
    with torch.no_grad():
        out = get_task(spec.task).forward(model, (torch.randn(1, 3, 75, 75), None))  # 75x75: smallest input
    assert out.shape == (1, 3)
    assert not any(n.startswith("AuxLogits") for n in spec.layers(model))
    assert any(n.startswith("AuxLogits") for n, _ in model.named_modules())


# ---------------------------------------------------------------------------------------------
# SqueezeNext


# Expected parameter counts (1000 classes). Source: the SqueezeNext paper (Gholami et al. 2018,
# arXiv:1803.10615, Table 2) lists 1.0-SqNxt-23 at 0.72M parameters; the exact counts of all six
# published ImageNet variants are those of the imgclsmob PyTorch port of the authors' Caffe models
# (github.com/osmr/imgclsmob, pytorch/README.md, "1.0-SqNxt-23 ... 724,056"), found with the search tool.
SQNXT_PARAMS = {
    "1.0-SqNxt-23": 724_056, "1.0-SqNxt-23v5": 921_816,
    "1.5-SqNxt-23": 1_511_824, "1.5-SqNxt-23v5": 1_953_616,
    "2.0-SqNxt-23": 2_583_752, "2.0-SqNxt-23v5": 3_366_344,
}


@pytest.mark.parametrize("variant", sorted(SQNXT_PARAMS))
def test_squeezenext_parameter_counts_match_published(variant):
    with torch.device("meta"):
        model = get_model_spec("squeezenext").builder(variant=variant)
    assert sum(p.numel() for p in model.parameters()) == SQNXT_PARAMS[variant]


def test_squeezenext_paper_rounding_and_training_step():
    assert round(SQNXT_PARAMS["1.0-SqNxt-23"] / 1e6, 2) == 0.72
    spec, model = build_model(ModelConfig(name="squeezenext", kwargs={"variant": "1.0-SqNxt-23v5"}), 5)
    task = get_task(spec.task)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    loss = task.loss(model, (x, y))
    loss.backward()
    assert model.fc.weight.grad is not None and set(spec.default_pins) <= set(spec.layers(model))
    with pytest.raises(HawqError, match="variant '3.0-SqNxt-23' unknown"):
        build_model(ModelConfig(name="squeezenext", kwargs={"variant": "3.0-SqNxt-23"}), 5)
    with pytest.raises(HawqError, match="unknown model.kwargs 'depth'"):
        build_model(ModelConfig(name="squeezenext", kwargs={"depth": 44}), 5)


def test_build_model_loads_checkpoint_for_families(tmp_path):
    torch.manual_seed(0)
    _, src = build_model(ModelConfig(name="squeezenext"), 3)
    save_checkpoint(src, tmp_path / "sq.safetensors")
    torch.manual_seed(1)
    _, dst = build_model(ModelConfig(name="squeezenext", checkpoint=str(tmp_path / "sq.safetensors")), 3)
    assert _same(src, dst)
    with pytest.raises(HawqError, match="does not match"):
        build_model(ModelConfig(name="squeezenext", checkpoint=str(tmp_path / "sq.safetensors")), 4)


# ---------------------------------------------------------------------------------------------
# image-folder errors and model/data compatibility


def test_image_folder_errors(tmp_path, image_root):
    with pytest.raises(HawqError, match="image folder data set not found"):
        build_data(DataConfig(name="imagenet_folder", root=str(tmp_path / "none")))
    make_fake_image_folder(tmp_path / "trainonly", splits=("train",))
    with pytest.raises(HawqError, match="split folder 'val' not found"):
        build_data(DataConfig(name="imagenet_folder", root=str(tmp_path / "trainonly")))
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
    with pytest.raises(HawqError, match="no images"):
        build_data(DataConfig(name="imagenet_folder", root=str(tmp_path / "empty")))
    make_fake_image_folder(tmp_path / "mixed", classes=2, splits=("train",))
    make_fake_image_folder(tmp_path / "mixed", classes=3, splits=("val",))
    with pytest.raises(HawqError, match="different classes"):
        build_data(DataConfig(name="imagenet_folder", root=str(tmp_path / "mixed")))
    data = build_data(DataConfig(name="imagenet_folder", root=str(image_root), image_size=32))
    spec, model = build_model(ModelConfig(name="resnet18", num_classes=5), data.num_classes)
    with pytest.raises(HawqError, match="predicts 5 classes but imagenet_folder has 3"):
        check_compatible(spec, model, data)
