from pathlib import Path

import pytest

from hawq import HawqError
from hawq.config import Config, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["search.budget.size_mb=0.05", "run.name=tight", "search.weight_bits=[2,4]",
                             "train.distill.enabled=false", "model.kwargs.width=8"])
    assert isinstance(cfg, Config)
    assert cfg.search.budget.size_mb == 0.05
    assert cfg.run.name == "tight"
    assert cfg.search.weight_bits == [2, 4]
    assert cfg.train.distill.enabled is False
    assert cfg.model.kwargs == {"width": 8}


def test_int_is_accepted_for_float_field():
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("override, message", [
    ("search.budget.sizemb=1", "did you mean 'search.budget.size_mb'"),
    ("serch.weight_bits=[2]", "did you mean 'search'"),
    ("train.lr=abc", "config key 'train.lr': expected a number"),
    ("search.weight_bits=4", "expected a list"),
    ("run.resume=maybe", "expected true/false"),
    ("novalue", "expects key=value"),
    ("search.budget.size_mb=-1", "search.budget.size_mb must be positive"),
    ("run.stages=[sensitivity,serch]", "did you mean 'search'"),
    ("sensitivity.estimator=exact", "sensitivity.estimator must be 'auto' or 'hutchinson'"),
    ("sensitivity.exact_directions=0", "sensitivity.exact_directions must be null or an integer >= 1"),
    ("sensitivity.variance_reduction=hutch",
     "sensitivity.variance_reduction must be 'nystrom', 'gauss_newton' or 'none'"),
    ("sensitivity.curvature=gn", "sensitivity.curvature must be 'hessian' or 'gauss_newton'"),
    ("sensitivity.hvp_method=jvp", "sensitivity.hvp_method must be 'auto', 'autograd' or 'finite_difference'"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(HawqError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_unknown_yaml_key_suggests_closest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("search:\n  weight_bitz: [2, 4]\n")
    with pytest.raises(HawqError, match=r"unknown config key 'search.weight_bitz' \(did you mean 'search.weight_bits'"):
        load_config(p)


def test_bad_yaml_names_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  name: [unclosed\n")
    with pytest.raises(HawqError, match="invalid YAML at line"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(HawqError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "fashion_resnet.yaml", ["run.seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_quant_transformer_mode_is_a_quant_config_key():
    """The I-BERT mode lives in QuantConfig (YAML ``quant.transformer``), checked before any work."""
    cfg = load_config(None, ["quant.transformer=ibert", "quant.attention_bits=6"])
    assert (cfg.quant.transformer, cfg.quant.attention_bits) == ("ibert", 6)
    assert load_config(None, []).quant.transformer == "float"
    with pytest.raises(HawqError, match="did you mean 'ibert'"):
        load_config(None, ["quant.transformer=ibret"])
    with pytest.raises(HawqError, match="quant.attention_bits must be an integer in 2..8"):
        load_config(None, ["quant.attention_bits=16"])
