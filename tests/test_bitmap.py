import pytest

from hawq import HawqError
from hawq.bitmap import LayerBits, bitmap_from_dict, load_bitmap, save_bitmap, uniform_bitmap


def test_round_trip(tmp_path):
    bits = {"conv1": LayerBits(8, 8), "layer1.0.conv1": LayerBits(3, 8), "fc": LayerBits(4, 6)}
    save_bitmap(bits, tmp_path / "bits.yaml")
    assert load_bitmap(tmp_path / "bits.yaml", ["conv1", "layer1.0.conv1", "fc"]) == bits


def test_defaults_fill_missing_fields():
    bits = bitmap_from_dict({"defaults": {"weight": 4, "activation": 6}, "layers": {"a": {"weight": 2}, "b": {}}})
    assert bits == {"a": LayerBits(2, 6), "b": LayerBits(4, 6)}


def test_bare_map_and_int_shorthand():
    assert bitmap_from_dict({"a": 4}) == {"a": LayerBits(4, 8)}


@pytest.mark.parametrize("data, message", [
    ({"layers": {"conv": {"weight": 4}}}, "unknown layer 'conv' \\(did you mean 'conv1'"),
    ({"layers": {"conv1": {"weight": 1}}}, "bits must be in 2..16"),
    ({"layers": {"conv1": {"weight": 4.5}}}, "must be an integer"),
    ({"layers": {"conv1": {"wieght": 4}}}, "unknown key 'wieght'"),
])
def test_invalid_maps(data, message):
    with pytest.raises(HawqError, match=message):
        bitmap_from_dict(data, ["conv1", "fc"])


def test_uniform():
    assert uniform_bitmap(["a", "b"], 3) == {"a": LayerBits(3, 8), "b": LayerBits(3, 8)}


def test_missing_file(tmp_path):
    with pytest.raises(HawqError, match="not found"):
        load_bitmap(tmp_path / "x.yaml")
