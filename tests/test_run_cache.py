"""The artifact cache (hawq.run.cached) and the stability of its keys across hawq versions."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from hawq import HawqError
from hawq.config import Config, load_config
from hawq.keys import added_setting, config_key
from hawq.pipeline import STAGES
from hawq.run import Artifact, cached, digest, json_key, read_json, write_json

REPO = Path(__file__).resolve().parents[1]

# The keys of run folders written before the pipeline was split into stage modules (computed with
# that code: digest(model, data, seed) for fp32.json, the sensitivity part of traces.json's key,
# search + quant for search.json, quant + train for checkpoints/finetune.key). A new setting must
# be declared with hawq.keys.added_setting (left out of the key at its default), else these change
# and every existing run folder recomputes its stages.
OLD_KEYS = {
    "fashion_resnet": ("591f76105d583377", "bac650de12a1d51f", "b7551ee86812320a", "1ff72d4ba2505f36"),
    "minilm_sentence": ("43f57ff69bd1ad2d", "ffc01910865245ea", "a43e1a7c4e5b56c0", "de6ac7cc689c93ec"),
    "resnet18_w4a8": ("b537dd64869dc771", "15a54fc6c3d761d3", "bde17ca24c9a5795", "7922c6219299178c"),
}


@pytest.mark.parametrize("name", sorted(OLD_KEYS))
def test_keys_of_shipped_configs_did_not_change(name):
    cfg = load_config(REPO / f"configs/{name}.yaml")
    keys = (digest(config_key(cfg.model), config_key(cfg.data), cfg.run.seed),
            digest({"sensitivity": config_key(cfg.sensitivity), "seed": cfg.run.seed}),
            digest(config_key(cfg.search), config_key(cfg.quant)),
            digest(config_key(cfg.quant), config_key(cfg.train)))
    assert keys == OLD_KEYS[name]


def test_added_setting_is_in_the_key_only_off_its_default():
    @dataclasses.dataclass
    class Section:
        old: int = 1
        new: float = added_setting(0.5)

    assert config_key(Section()) == {"old": 1}
    assert config_key(Section(new=0.25)) == {"old": 1, "new": 0.25}


def test_retired_setting_loads_at_its_old_value_and_stays_in_the_key():
    cfg = load_config(None, ["sensitivity.normalize=per_param"])
    assert not hasattr(cfg.sensitivity, "normalize")
    assert config_key(cfg.sensitivity)["normalize"] == "per_param"
    with pytest.raises(HawqError, match="sensitivity.normalize is no longer a setting"):
        load_config(None, ["sensitivity.normalize=none"])


def _fake_run(tmp_path: Path, resume: bool = True) -> SimpleNamespace:
    cfg = Config()
    cfg.run.resume = resume
    return SimpleNamespace(cfg=cfg, run_dir=tmp_path)


def _artifact() -> Artifact[dict]:
    def save(run_dir: Path, value: dict, key: str) -> None:
        write_json(run_dir / "thing.json", {**value, "key": key})

    return Artifact("thing", json_key("thing.json"), lambda run_dir: read_json(run_dir / "thing.json"), save)


@pytest.mark.parametrize("where", ["everywhere", "main"])
def test_cached_computes_once_then_loads(tmp_path, where):
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"value": len(calls)}

    run = _fake_run(tmp_path)
    first = cached(run, _artifact(), "k1", compute, where=where)
    again = cached(run, _artifact(), "k1", compute, where=where)
    assert first == {"value": 1} and again == {"value": 1, "key": "k1"} and len(calls) == 1
    assert cached(run, _artifact(), "k2", compute, where=where) == {"value": 2}  # other inputs: recomputed
    assert cached(_fake_run(tmp_path, resume=False), _artifact(), "k2", compute) == {"value": 3}
    assert read_json(tmp_path / "thing.json") == {"value": 3, "key": "k2"}


def test_every_stage_is_named_once_and_inputs_come_from_earlier_stages():
    names = [s.name for s in STAGES]
    assert len(names) == len(set(names))
    produced: set[str] = set()
    for stage in STAGES:
        assert set(stage.inputs) <= produced, stage.name
        produced |= set(stage.outputs)
