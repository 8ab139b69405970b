"""The one config loader (e2e_reme/config.py): YAML + overrides -> frozen dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e_reme.cluster import CollectConfig
from e2e_reme.config import ConfigError, build, dump, load
from e2e_reme.simulators.benchmark import BenchConfig
from e2e_reme.train.errors import TrainError
from e2e_reme.train.rl_config import RLConfig, load_config
from e2e_reme.train.sft import SFTConfig


def test_nested_sections_become_their_dataclasses_and_lists_tuples():
    cfg = build(CollectConfig, {"systems": ["boutique"], "fleet": {"host": {"systems": ["boutique"],
                                                                            "episode": {"verify_load": False}}}})
    assert cfg.systems == ("boutique",) and cfg.fleet.host.systems == ("boutique",)
    assert cfg.fleet.host.episode.verify_load is False
    assert cfg.fleet.host.episode.settle_timeout_s == 30.0          # the rest keeps its defaults


def test_a_single_value_where_a_list_is_expected_is_a_list_of_one():
    assert build(CollectConfig, {"systems": "boutique", "faults": "cpu-stress"}).faults == ("cpu-stress",)


def test_every_unknown_key_at_any_depth_is_reported_in_one_error_with_the_known_ones():
    with pytest.raises(ConfigError) as e:
        build(CollectConfig, {"episodez": 3, "fleet": {"hots": {}, "host": {"episode": {"verfy_load": 1}}}},
              where="collect config")
    msg = str(e.value)
    assert msg.startswith("collect config: unknown keys:")
    for bad in ("episodez", "fleet.hots", "fleet.host.episode.verfy_load"):
        assert bad in msg
    assert "known in fleet.host.episode:" in msg and "verify_load" in msg


def test_an_optional_section_can_be_switched_off_with_null():
    cfg = load_config("configs/rl-cpu.yaml", ["update.lora=null", "steps=2"])
    assert cfg.update.lora is None and cfg.steps == 2


def test_the_runs_relative_paths_are_taken_from_root(tmp_path):
    # A submitted job runs in a copy of the working directory: root=$PWD points back at runs/.
    cfg = load_config("configs/rl-cpu.yaml", [f"root={tmp_path}"])
    assert (cfg.model, cfg.out) == (str(tmp_path / "runs/sft-cpu-b/model"), str(tmp_path / "runs/rl-cpu"))
    assert cfg.data.episodes == (str(tmp_path / "runs/sft-data"),)


def test_without_a_root_relative_paths_are_the_current_directorys_and_absolute_ones_stay():
    cfg = load_config("configs/rl-cpu.yaml", ["model=/models/base"])
    assert cfg.model == "/models/base" and cfg.out == str(Path.cwd() / "runs/rl-cpu")


def test_overrides_parse_their_values_as_yaml_and_reach_nested_sections():
    cfg = load(RLConfig, "configs/rl-cpu.yaml", ["objective.algorithm=reinforce", "fleet.host.slots=1",
                                                 "rollout.temperature=0.7"], where="rl config")
    assert (cfg.objective.algorithm, cfg.fleet.host.slots, cfg.rollout.temperature) == ("reinforce", 1, 0.7)


@pytest.mark.parametrize("override, match", [
    ("steps", "write it as section.key=value"),
    ("steps.x=1", "steps is not a section"),
    ("rollout.bogus=1", "unknown keys: rollout.bogus"),
])
def test_a_bad_override_names_the_problem(override, match):
    with pytest.raises(TrainError, match=match):
        load_config("configs/rl-cpu.yaml", [override])


def test_yaml_true_for_a_setting_spelled_in_words_is_the_word():
    cfg = SFTConfig.from_dict({"train": {"use_gpu": True, "workers": 1, "batch_size": 1}})
    assert cfg.train.use_gpu == "true"


def test_a_missing_file_is_one_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such file"):
        load(BenchConfig, tmp_path / "nope.yaml")


def test_a_section_that_is_not_a_mapping_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="fleet: expected a section"):
        build(CollectConfig, {"fleet": 3})


def test_dump_builds_back_to_the_same_config():
    cfg = load(RLConfig, "configs/rl-cpu.yaml", ["steps=5"])
    assert build(RLConfig, dump(cfg)) == cfg
