"""hawq.export: bit packing, the model.safetensors format, bit-exact reload, malformed-file handling."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hawq import HawqError
from hawq.bitmap import LayerBits
from hawq.export import load_quantized, pack_codes, read_quantized_file, save_quantized, unpack_codes
from hawq.export.packing import code_range, packed_nbytes
from hawq.layers import quantizable_layers
from hawq.models.fashion import fashion_resnet
from hawq.quant.config import QuantConfig
from hawq.quant.model import calibrate, quantize_model

WIDTH = 4  # fashion_resnet width: tiny, fast


class TinyText(nn.Module):
    """Embedding -> mean pool -> Linear -> ReLU -> Linear (exercises QuantEmbedding and grouping)."""

    def __init__(self, vocab: int = 50, dim: int = 24, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 20)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(20, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.embed(ids).mean(dim=1))))


def _resnet_build(info: dict) -> nn.Module:
    return fashion_resnet(**info["kwargs"])


def _quantized_resnet(bits_cycle: tuple[int, ...], cfg: QuantConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = fashion_resnet(width=WIDTH)
    names = quantizable_layers(model)
    bits = {n: LayerBits(bits_cycle[i % len(bits_cycle)], 8) for i, n in enumerate(names)}
    quantize_model(model, bits, cfg or QuantConfig())
    x = torch.randn(6, 1, 28, 28)
    calibrate(model, [x[:3], x[3:]], lambda m, b: m(b), progress=False)
    return model.eval(), bits, x


def _save(model, bits, path, cfg=None) -> dict:
    return save_quantized(model, bits, path, {"name": "fashion_resnet", "kwargs": {"width": WIDTH}}, cfg)


# --- packing --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", list(range(2, 17)))
def test_pack_roundtrip_every_width(bits):
    lo, hi = code_range(bits)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(lo, hi + 1, (3, 37), generator=g)
    codes[0, 0], codes[0, 1] = lo, hi  # both ends of the range
    packed = pack_codes(codes, bits)
    if bits not in (8, 16):
        assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(codes.numel(), bits)
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).long(), codes.reshape(-1))


def test_pack_int4_is_two_codes_per_byte_lower_nibble_first():
    packed = pack_codes(torch.tensor([1, -2, 7, -8, 3]), 4)
    assert packed.tolist() == [0xE1, 0x87, 0x03]
    assert pack_codes(torch.tensor([-1, 5]), 8).dtype == torch.int8
    assert pack_codes(torch.tensor([-1, 5]), 16).dtype == torch.int16


def test_pack_rejects_out_of_range_and_float_codes():
    with pytest.raises(HawqError, match="outside the signed 4-bit range"):
        pack_codes(torch.tensor([8]), 4)
    with pytest.raises(HawqError, match="integer codes"):
        pack_codes(torch.tensor([1.0]), 4)
    with pytest.raises(HawqError, match="need"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 8)


# --- save / load ----------------------------------------------------------------------------


def test_registry_roundtrip_is_bit_identical(tmp_path):
    model, bits, x = _quantized_resnet((4, 8))
    path = tmp_path / "model.safetensors"
    summary = _save(model, bits, path)
    assert summary["file_bytes"] == path.stat().st_size
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic write left no temp file
    loaded = load_quantized(path)  # rebuilt through hawq.models.get_model_spec("fashion_resnet")
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    _, meta = read_quantized_file(path)
    assert meta["bits"] == bits and meta["model_info"]["kwargs"] == {"width": WIDTH}


@pytest.mark.parametrize("cfg", [QuantConfig(), QuantConfig(fold_bn=True), QuantConfig(per_channel=False)],
                         ids=["per_channel", "fold_bn", "per_tensor"])
def test_every_bit_width_roundtrips_bit_identical(tmp_path, cfg):
    model, bits, x = _quantized_resnet((2, 3, 4, 5, 6, 7, 8, 16), cfg)
    path = tmp_path / "m.safetensors"
    _save(model, bits, path, cfg)
    loaded = load_quantized(path, build=_resnet_build)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_grouped_linear_and_embedding_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = TinyText()
    bits = {"embed": LayerBits(4, 32), "fc1": LayerBits(3, 8), "fc2": LayerBits(8, 8)}
    cfg = QuantConfig(group_size=7)  # 24 = 7 + 7 + 7 + 3: a short last group
    quantize_model(model, bits, cfg)
    ids = torch.randint(0, 50, (4, 9))
    calibrate(model, [ids], lambda m, b: m(b), progress=False)
    model.eval()
    path = tmp_path / "t.safetensors"
    save_quantized(model, bits, path, {"name": "tiny_text"})  # QuantConfig read back from the modules
    assert read_quantized_file(path)[1]["quant_config"]["group_size"] == 7
    loaded = load_quantized(path, build=lambda info: TinyText())
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    raw = load_file(path)
    assert raw["fc1.weight.qscale"].shape == (20, 4)  # per group of 7 along the input dim
    assert "fc1.weight" not in raw and "embed.weight" not in raw


def test_file_size_tracks_the_ilp_model_size(tmp_path):
    from hawq.search.costs import MB, model_size_mb

    torch.manual_seed(0)
    model = fashion_resnet(width=16)
    names = quantizable_layers(model)
    bits = {n: LayerBits((4, 8, 3)[i % 3], 8) for i, n in enumerate(names)}
    ilp_bytes = model_size_mb(model, bits) * MB
    quantize_model(model, bits, QuantConfig())
    calibrate(model, [torch.randn(2, 1, 28, 28)], lambda m, b: m(b), progress=False)
    summary = save_quantized(model.eval(), bits, tmp_path / "m.safetensors",
                             {"name": "fashion_resnet", "kwargs": {"width": 16}})
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    # parameters as stored (the integer model's requantization constants are reported apart)
    payload = summary["file_bytes"] - summary["header_bytes"] - buffer_bytes - summary["integer_bytes"]
    assert ilp_bytes <= payload <= 1.05 * ilp_bytes
    # a float32 copy of the same parameters is far larger: the codes really are packed
    assert summary["packed_weight_bytes"] < 0.2 * sum(p.numel() * 4 for p in model.parameters())


def test_save_rejects_model_that_does_not_match_bits(tmp_path):
    model, bits, _ = _quantized_resnet((4,))
    wrong = dict(bits)
    wrong["fc"] = LayerBits(8, 8)
    with pytest.raises(HawqError, match="'fc'"):
        _save(model, wrong, tmp_path / "m.safetensors")
    with pytest.raises(HawqError, match="disagree"):
        _save(fashion_resnet(width=WIDTH), bits, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# --- malformed files ------------------------------------------------------------------------


@pytest.fixture()
def saved(tmp_path):
    model, bits, x = _quantized_resnet((4, 8))
    path = tmp_path / "model.safetensors"
    _save(model, bits, path)
    return path


def test_truncated_file_is_a_clear_error(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (len(data) - 10, 200, 5):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(HawqError, match="truncated|not a safetensors"):
            load_quantized(bad, build=_resnet_build)


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["HAWQ_TEST_PWNED_DIR"],))


def test_pickle_and_zip_are_refused_without_executing(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("HAWQ_TEST_PWNED_DIR", str(marker))
    pkl = tmp_path / "evil.safetensors"
    pkl.write_bytes(pickle.dumps(_Payload(), protocol=4))
    with pytest.raises(HawqError, match="pickle"):
        load_quantized(pkl, build=_resnet_build)
    zipped = tmp_path / "ckpt.safetensors"
    torch.save({"x": _Payload()}, zipped)
    with pytest.raises(HawqError, match="zip"):
        load_quantized(zipped, build=_resnet_build)
    assert not marker.exists()
    with pytest.raises(HawqError, match="not found"):
        load_quantized(tmp_path / "missing.safetensors")


def _rewrite(path, mutate_meta=None, mutate_tensors=None):
    tensors = load_file(path)
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    meta = json.loads(path.read_bytes()[8:8 + header_len])["__metadata__"]
    if mutate_meta:
        mutate_meta(meta)
    if mutate_tensors:
        mutate_tensors(tensors)
    save_file(tensors, path, metadata=meta)


def test_metadata_that_does_not_match_tensors_is_an_error(saved):
    original = saved.read_bytes()

    def packed_at_other_bits(meta):
        packing = json.loads(meta["packing"])
        packing["conv1"]["bits"] = 8
        meta["packing"] = json.dumps(packing)

    def bits_drop_layer(meta):
        layers = json.loads(meta["bits"])
        del layers["layers"]["fc"]
        meta["bits"] = json.dumps(layers)

    def scale_wrong_shape(tensors):
        tensors["conv1.weight.qscale"] = tensors["conv1.weight.qscale"][:-1].clone()

    def codes_missing(tensors):
        del tensors["fc.weight.qcodes"]

    def codes_wrong_dtype(tensors):
        tensors["fc.weight.qcodes"] = tensors["fc.weight.qcodes"].to(torch.int16)

    def bn_missing(tensors):
        del tensors["bn1.running_var"]

    cases = [
        (packed_at_other_bits, None, "packed at 8 bits"),
        (bits_drop_layer, None, "disagree about layer 'fc'"),
        (lambda m: m.update(format_version="99"), None, "version 99"),
        (lambda m: m.update(format="other"), None, "without hawq metadata"),
        (lambda m: m.update(packing="{not json"), None, "not valid JSON"),
        (None, scale_wrong_shape, "does not match its metadata"),
        (None, codes_missing, "missing"),
        (None, codes_wrong_dtype, "metadata says"),
        (None, bn_missing, "do not match the rebuilt model"),
    ]
    for meta_fn, tensor_fn, message in cases:
        saved.write_bytes(original)
        _rewrite(saved, meta_fn, tensor_fn)
        with pytest.raises(HawqError, match=message):
            load_quantized(saved, build=_resnet_build)


# --- integer-only model ----------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [QuantConfig(), QuantConfig(fold_bn=True)], ids=["bn", "fold_bn"])
def test_integer_model_roundtrip_is_bit_identical(tmp_path, cfg):
    from hawq.quant import to_integer

    model, bits, x = _quantized_resnet((4, 8), cfg)
    path = tmp_path / "m.safetensors"
    summary = _save(model, bits, path)  # QuantConfig (fold_bn) read back from the modules
    assert read_quantized_file(path)[1]["quant_config"]["fold_bn"] == cfg.fold_bn
    assert summary["integer"] and summary["integer_bytes"] > 0
    raw = load_file(path)
    assert any(k.startswith("integer/") and k.endswith("in_mult") for k in raw)  # dyadic multipliers
    reference = to_integer(model)
    loaded = load_quantized(path, build=_resnet_build, integer=True)
    with torch.no_grad():
        assert torch.equal(reference(x), loaded(x))
    # Not only the outputs on this batch: every constant (with fold_bn the residual adds' dyadic
    # multipliers once differed, from BN folded in float64 by to_integer and in float32 on save).
    ref_state, loaded_state = reference.state_dict(), loaded.state_dict()
    assert ref_state.keys() == loaded_state.keys()
    assert [k for k in ref_state if not torch.equal(ref_state[k], loaded_state[k])] == []


def test_integer_codes_are_the_fake_quant_codes():
    """to_integer, to_fbgemm and the packed file take one set of codes: the layers' int_weight()."""
    from hawq.quant import integer_layers, to_integer

    model, _, _ = _quantized_resnet((4, 8), QuantConfig(fold_bn=True))
    for name, layer in integer_layers(to_integer(model)).items():
        assert torch.equal(layer.weight_codes, model.get_submodule(name).int_weight()[0]), name


def test_integer_unavailable_is_recorded_and_requesting_it_fails(tmp_path):
    model, bits, _ = _quantized_resnet((4, 16))  # 16-bit weights: no integer-only model
    path = tmp_path / "m.safetensors"
    assert _save(model, bits, path)["integer"] is False
    assert "16-bit" in read_quantized_file(path)[1]["integer"]["reason"]
    with pytest.raises(HawqError, match="no integer model"):
        load_quantized(path, build=_resnet_build, integer=True)
    with pytest.raises(HawqError, match="16-bit"):
        save_quantized(model, bits, path, {"name": "fashion_resnet", "kwargs": {"width": WIDTH}}, integer=True)


def test_legacy_file_with_integer_code_patches_still_loads(tmp_path):
    """Files written when to_integer derived codes in float64 carry sparse code patches; they still load."""
    from hawq.quant import integer_layers, to_integer

    model, bits, x = _quantized_resnet((8,))
    path = tmp_path / "m.safetensors"
    _save(model, bits, path)
    raw = load_file(path)
    assert not any("weight_codes_patch" in k for k in raw)  # new files need none
    name = next(iter(integer_layers(to_integer(model))))
    old_code = int(model.get_submodule(name).int_weight()[0].reshape(-1)[0])
    raw[f"integer/{name}.weight_codes_patch_index"] = torch.tensor([0], dtype=torch.int64)
    raw[f"integer/{name}.weight_codes_patch_value"] = torch.tensor([0 if old_code else 1], dtype=torch.int8)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        metadata = json.loads(f.read(n))["__metadata__"]
    save_file(raw, path, metadata=metadata)
    loaded = load_quantized(path, build=_resnet_build, integer=True)
    assert int(integer_layers(loaded)[name].weight_codes.reshape(-1)[0]) == (0 if old_code else 1)
    with torch.no_grad():
        assert not torch.equal(to_integer(model)(x), loaded(x))  # the patch mattered
    raw[f"integer/{name}.weight_codes_patch_index"] = torch.tensor([10**9], dtype=torch.int64)
    save_file(raw, path, metadata=metadata)
    with pytest.raises(HawqError, match="invalid integer code patch"):
        load_quantized(path, build=_resnet_build, integer=True)
