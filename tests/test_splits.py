"""Splits that keep the test a test (configs/splits.yaml, train/splits.py): no training or RL
case touches a validation or test system or service, through the trace collection, the SFT
data (renamed copies included) or RL's case drawing, for every config the repository ships
and the records of tests/data; evaluation takes its cases from the split it is asked for; and
the test split is as large as the release issue asks. No sandbox: planning and data only."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from e2e_reme.config import read_yaml
from e2e_reme.simulators.campaign import Planner
from e2e_reme.simulators.faults.base import fault_catalog
from e2e_reme.simulators.systems.spec import list_systems, load_system
from e2e_reme.train.collect import TracesConfig
from e2e_reme.train.data import (AugmentConfig, DataConfig, HoldoutConfig, NameMaker, build_sft_data, read_episodes,
                                 select_traces, training_holdout)
from e2e_reme.train.errors import NoTrainingData, TrainError
from e2e_reme.train.evaluate import EvalConfig, eval_cases
from e2e_reme.train.splits import load_splits

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
EPISODES = sorted(str(p) for p in DATA.glob("*.jsonl"))      # every record file of tests/data
SFT_CONFIGS = sorted(ROOT.glob("configs/sft-*.yaml"))
RL_CONFIGS = sorted(ROOT.glob("configs/rl-*.yaml"))
SPLITS = load_splits()


def held_out_names() -> set[str]:
    return {*SPLITS.held_out_services(), *SPLITS.held_out_systems()}


def mentions(text: str, names: set[str]) -> set[str]:
    """The names that occur in `text` as whole names (not inside a longer one)."""
    return {n for n in names if re.search(rf"(?<![A-Za-z0-9_-]){re.escape(n)}(?![A-Za-z0-9_-])", text)}


# ---- the definition ------------------------------------------------------------------------------

def test_the_test_split_is_as_large_as_the_release_issue_asks():
    whole = SPLITS.test.systems
    assert whole, "the test split holds at least one whole system"
    others = [m for m in SPLITS.members("test") if m.system not in whole]
    assert len({m.system for m in others}) >= 1 and len(others) >= 4
    plan = SPLITS.plan("test")                       # what the planner generates, host aside
    per_fault = Counter(sc.fault for _, sc in plan)
    assert len(plan) >= 48
    assert set(per_fault) == set(SPLITS.trained_faults) and min(per_fault.values()) >= 3
    assert len({(sc.system, sc.target) for _, sc in plan}) >= 8
    assert len({sc.system for _, sc in plan}) == 3   # every system of ours is in the test
    assert len({c.id for c in SPLITS.cases("test", Planner("nspawn"))[0]}) == len(SPLITS.cases("test")[0])


def test_every_trained_fault_type_appears_in_validation_and_test_and_the_catalog_is_decided():
    catalog = set(fault_catalog())
    assert set(SPLITS.trained_faults) | set(SPLITS.excluded_faults) == catalog, \
        "every fault type of the catalog is trained, or excluded with its reason, in configs/splits.yaml"
    assert all(isinstance(why, str) and why.strip() for why in SPLITS.excluded_faults.values())
    planner = Planner("nspawn")
    for name in ("validation", "test"):
        plan = SPLITS.plan(name, planner=planner)
        assert {sc.fault for _, sc in plan} == set(SPLITS.trained_faults), name
        assert all(planner.admits(sc.system, sc.target, sc.fault)[0] for _, sc in plan)   # each applies to its service


def test_a_system_or_service_is_in_one_split_and_whole_systems_take_all_their_services():
    seen: dict[tuple[str, str], str] = {}
    for sys in list_systems():
        for svc in load_system(sys).services:
            seen[(sys, svc)] = SPLITS.split_of(sys, svc)
    for name in ("validation", "test"):
        members = {(m.system, m.service) for m in SPLITS.members(name)}
        assert all(seen[k] == name for k in members)
        for sys in getattr(SPLITS, name).systems:
            assert all(seen[(sys, s)] == name for s in load_system(sys).services)
    assert Counter(seen.values())["train"] >= 40


def test_a_splits_file_that_breaks_the_rules_is_one_clear_error(tmp_path):
    base = read_yaml(ROOT / "configs/splits.yaml")

    def write(d):
        p = tmp_path / f"s{random.random()}.yaml"
        p.write_text(yaml.safe_dump(d))
        return p
    both = {**base, "validation": {**base["validation"], "services": {"boutique": ["checkoutservice"]}}}
    with pytest.raises(TrainError, match="both validation and test"):
        load_splits(write(both))
    nodeps = {**base, "test": {**base["test"], "systems": [], "services": {"boutique": ["adservice", "emailservice"]}}}
    with pytest.raises(TrainError, match="firewall-drop.*excluded_faults"):
        load_splits(write(nodeps))
    with pytest.raises(TrainError, match="not services of boutique"):
        load_splits(write({**base, "test": {**base["test"], "services": {"boutique": ["ts-news-service"]}}}))


# ---- nothing trained touches validation or test ---------------------------------------------------

def data_config(path: Path) -> DataConfig:
    d = dict(read_yaml(path).get("data") or {})
    return DataConfig.from_dict({**d, "episodes": EPISODES})


@pytest.mark.parametrize("path", SFT_CONFIGS, ids=lambda p: p.name)
def test_no_sft_example_touches_a_validation_or_test_system_or_service(path):
    cfg = data_config(path)
    data = build_sft_data(cfg)
    names = held_out_names()
    assert data.train and data.traces
    for ex in data.train:
        # A copy is judged by its original identity: the record's system and faulty service.
        assert SPLITS.split_of(ex.meta["system"], ex.meta["service"]) == "train"
        if ex.meta["copy"]:
            new = set(ex.meta["rewrite"]["names"].values())
            assert not new & {n.lower() for n in names} and not {n.lower() for n in new} & {n.lower() for n in names}
            # Every service and the system of a copy are renamed: no held-out name is left in its text.
            assert not mentions(" ".join(ex.texts()), names), ex.meta


@pytest.mark.parametrize("path", sorted(ROOT.glob("releases/traces/*.jsonl.gz")), ids=lambda p: p.name)
def test_the_traces_kept_in_the_repository_are_train_split_runbook_successes_only(path):
    recs = read_episodes([path])
    assert recs and all(r["outcome"] == "success" and r["policy"] == "runbook" for r in recs)
    assert all(SPLITS.split_of(r["scenario"]["system"], r["scenario"]["target"]) == "train" for r in recs)
    # The release's own data, as configs/sft-release.yaml builds it: every example's incident is a
    # train-split one (a held-out service may be named in a trained system's call graph, as a
    # neighbour, never as the faulty one), and no renamed copy names a held-out service or system.
    cfg = DataConfig.from_dict({**read_yaml(ROOT / "configs/sft-release.yaml")["data"], "episodes": [str(path)]})
    data = build_sft_data(cfg)
    assert data.traces == len(recs)
    assert all(SPLITS.split_of(ex.meta["system"], ex.meta["service"]) == "train" for ex in data.train)
    assert not any(mentions(" ".join(ex.texts()), held_out_names()) for ex in data.train if ex.meta["copy"])


@pytest.mark.parametrize("path", RL_CONFIGS, ids=lambda p: p.name)
def test_no_rl_case_touches_a_validation_or_test_system_or_service(path):
    from e2e_reme.train.rl import training_cases
    from e2e_reme.train.rl_config import load_config
    cfg = load_config(path, [f"data.episodes=[{','.join(EPISODES)}]"])
    cases = training_cases(cfg)
    assert cases
    assert all(SPLITS.split_of(c["scenario"].system, c["scenario"].target) == "train" for c in cases)


@pytest.mark.parametrize("path", [p for p in SFT_CONFIGS if read_yaml(p).get("collect")], ids=lambda p: p.name)
def test_trace_collection_draws_its_targets_from_the_train_split_only(path):
    plan = TracesConfig.from_dict(read_yaml(path)["collect"]).plan()
    cases = [c for _, cs, _ in plan for c in cs]
    assert cases
    assert all(SPLITS.split_of(c.scenario.system, c.scenario.target) == "train" for c in cases)
    # The same suites drawn over every service would have hit held-out ones: the filter does work.
    from e2e_reme.simulators.campaign import make_cases
    plain = [c for bc, _, _ in plan for c in make_cases(bc.system, bc.suite, bc.seed, Planner(bc.backend))[0]]
    assert any(SPLITS.split_of(c.scenario.system, c.scenario.target) != "train" for c in plain)


def test_the_release_collects_every_fault_type_the_splits_train_on_both_training_systems():
    from e2e_reme.simulators.campaign import load_suite
    assert sorted(load_suite("faults")) == sorted(fault_catalog())
    plan = TracesConfig.from_dict(read_yaml(ROOT / "configs/sft-release.yaml")["collect"]).plan()
    for system in ("boutique", "train-ticket"):
        planned = {c.scenario.fault for bc, cs, _ in plan if bc.system == system for c in cs}
        skipped = {s.fault for bc, _, sk in plan if bc.system == system for s in sk}
        assert planned | skipped == set(SPLITS.trained_faults), system
        assert planned >= set(SPLITS.trained_faults) - {"network-delay"}, system   # netem is the only gap here


def test_collecting_on_a_system_held_out_whole_is_refused():
    cfg = TracesConfig.from_dict({"runs": [{"system": "simple-micro", "suite": "easy", "seeds": [0]}]})
    with pytest.raises(TrainError, match="simple-micro is held out whole"):
        cfg.bench_configs()


def test_records_of_validation_and_test_services_are_held_out_by_every_consumer(tmp_path):
    """Records of tests/data moved onto held-out services (the shape a fleet collection over
    every service has): SFT and RL leave them out, whatever data.holdout says."""
    recs = read_episodes(EPISODES)
    moved = []
    for rec, (system, service) in zip(recs, [("boutique", "checkoutservice"), ("boutique", "paymentservice"),
                                             ("simple-micro", "time-service")]):
        moved.append({**rec, "id": rec["id"] + "-moved", "scenario": {**rec["scenario"], "system": system,
                                                                      "target": service}})
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs + moved))
    cfg = DataConfig(episodes=(str(path),), holdout=HoldoutConfig(), augment=AugmentConfig(copies=1))
    train, held, skipped = select_traces(read_episodes([path]), cfg)
    assert {r["id"] for r in held} == {r["id"] for r in moved} and skipped["held out"] == 3
    assert not {r["id"] for r in train} & {r["id"] for r in moved}
    from e2e_reme.train.rl import training_cases
    from e2e_reme.train.rl_config import RLConfig
    cases = training_cases(RLConfig(model="x", data=cfg))
    assert {(c["scenario"].system, c["scenario"].target) for c in cases}.isdisjoint(
        {(r["scenario"]["system"], r["scenario"]["target"]) for r in moved})
    only_held = tmp_path / "held.jsonl"
    only_held.write_text("".join(json.dumps(r) + "\n" for r in moved))
    with pytest.raises(NoTrainingData, match="outside the held-out"):
        build_sft_data(DataConfig(episodes=(str(only_held),)))


def test_renamed_names_never_are_nor_are_made_of_a_held_out_name():
    holdout = training_holdout(DataConfig())
    held = {n.lower() for n in (*holdout.services, *holdout.systems)}
    rng = random.Random(0)
    maker = NameMaker(rng, holdout)
    kinds = {"a": "http", "b": "redis", "c": "http"}
    made = [n for _ in range(400) for n in maker.services(list(kinds), kinds).values()] + \
           [maker.system() for _ in range(200)]
    assert not {n.lower() for n in made} & held
    words = {"payment", "checkout", "voucher", "cancel", "consign", "news", "station", "hello", "time", "execute",
             "price", "avatar", "recommendation"}
    assert words <= maker.banned_words
    assert not any(w in re.split(r"[-_.]", n.lower()) for n in made for w in words)


# ---- evaluation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["validation", "test"])
def test_evaluation_takes_its_cases_from_the_split_it_is_asked_for(split):
    cases, skipped = eval_cases(EvalConfig(split=split))
    assert cases and all(SPLITS.split_of(c.scenario.system, c.scenario.target) == split for c in cases)
    got = {c.scenario.fault for c in cases} | {s["fault"] for s in skipped}
    assert got == set(SPLITS.trained_faults)            # what this host cannot run is skipped, with why
    assert all(s["reason"] for s in skipped)
    assert all(c.eval_set in {m.eval_set for m in SPLITS.members(split)} for c in cases)
    one, _ = eval_cases(EvalConfig(split=split, faults=("cpu-stress",), limit=1))
    assert one and all(c.scenario.fault == "cpu-stress" for c in one)
    assert max(Counter(c.eval_set for c in one).values()) == 1
    with pytest.raises(TrainError, match="one of validation, test"):
        eval_cases(EvalConfig(split="train"))
