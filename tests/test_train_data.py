"""SFT data: verified runbook episodes from a bench run or a fleet collection, held out by
system and service, and augmented without lying: every rewritten trace is still what the
expert answers to the rewritten report."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from e2e_reme.simulators.reports import at_level
from e2e_reme.simulators.policies.expert import expert_playbook
from e2e_reme.train.data import (AugmentConfig, DataConfig, HoldoutConfig, augment_trace, build_sft_data,
                                 is_trace, read_episodes)
from e2e_reme.train.errors import NoTrainingData
from e2e_reme.train.format import answer_text, extract_yaml

EPISODES = Path(__file__).parent / "data" / "train-episodes.jsonl"


@pytest.fixture(scope="module")
def records():
    return [json.loads(l) for l in EPISODES.read_text().splitlines()]


def test_reads_a_bench_run_and_a_fleet_collection_alike(tmp_path, records):
    bench = tmp_path / "runs" / "bench-a"
    bench.mkdir(parents=True)
    shutil.copy(EPISODES, bench / "episodes.jsonl")
    fleet = tmp_path / "runs" / "fleet-b" / "shards"
    fleet.mkdir(parents=True)
    (fleet / "part-x-0000.jsonl").write_text("".join(json.dumps({**r, "id": r["id"] + "-f", "host": "h0"}) + "\n"
                                                     for r in records[:2]))
    assert len(read_episodes([bench])) == len(records)
    assert len(read_episodes([tmp_path / "runs" / "fleet-b"])) == 2
    assert len(read_episodes([tmp_path / "runs"])) == len(records) + 2     # a directory of runs
    assert len(read_episodes([bench, bench])) == len(records)              # an episode counts once


def test_a_line_cut_by_a_kill_is_skipped(tmp_path):
    p = tmp_path / "episodes.jsonl"
    lines = EPISODES.read_text().splitlines()
    p.write_text("\n".join(lines[:2]) + "\n" + lines[2][:500])
    assert len(read_episodes([p])) == 2


def test_only_verified_expert_successes_from_full_reports_are_traces(records):
    rec = records[0]
    assert is_trace(rec)
    assert not is_trace({**rec, "outcome": "failure"})
    assert not is_trace({**rec, "policy": "solo"})
    assert not is_trace({**rec, "report": at_level(rec["report"], "symptoms")})


def test_renamed_copies_are_the_experts_answer_to_the_renamed_report(records):
    from e2e_reme.train.data import Rewrite
    for rec in records:
        for ex in augment_trace(rec, AugmentConfig(copies=3, paraphrase=0.0), HoldoutConfig())[1:]:
            rw = Rewrite(**ex.meta["rewrite"])
            assert ex.report["service"] != rec["report"]["service"]
            # The copy's answer is the verified playbook, renamed...
            assert ex.answer == answer_text(rw.text(rec["playbook"]))
            # ...which is what the expert writes for the renamed report: renaming commutes with it.
            def expert(rep):
                return yaml.safe_load(expert_playbook({"service": rep["service"], "fault_kind": rep["fault_kind"],
                                                       **rep["target"], "evidence": rep["evidence"]}))
            assert yaml.safe_load(rw.text(expert_playbook({"service": rec["report"]["service"],
                                                           "fault_kind": rec["report"]["fault_kind"],
                                                           **rec["report"]["target"],
                                                           "evidence": rec["report"]["evidence"]}))) == expert(ex.report)


def test_no_copy_uses_a_held_out_name_or_the_words_it_is_made_of(records):
    holdout = HoldoutConfig(systems=("simple-micro",), services=("emailservice",))
    words = ("hello", "time", "simple", "micro", "email")
    for rec in records:
        if rec["scenario"]["target"] == "emailservice":
            continue
        for ex in augment_trace(rec, AugmentConfig(copies=6), holdout)[1:]:
            text = " ".join(ex.texts()).lower()
            assert "emailservice" not in text and "hello-service" not in text and "time-service" not in text
            names = re.findall(r"affected service: (\S+) on host", text)
            assert not any(w in n for n in names for w in words)


def test_held_out_systems_and_services_are_never_trained_on(records):
    data = build_sft_data(DataConfig(episodes=(str(EPISODES),), augment=AugmentConfig(copies=1),
                                     holdout=HoldoutConfig(services=("frontend",))))
    held = [r for r in records if r["scenario"]["target"] == "frontend"]
    assert held and len(data.held_out) == len(held)
    assert "frontend" not in {e.meta["service"] for e in data.train}
    with pytest.raises(NoTrainingData, match="outside the held-out"):
        build_sft_data(DataConfig(episodes=(str(EPISODES),), holdout=HoldoutConfig(systems=("boutique",))))


def test_the_three_levels_keep_the_incident_and_drop_the_diagnosis(records):
    rec = records[0]
    sym = at_level(rec["report"], "symptoms")
    assert sym["service"] == rec["report"]["service"] and not sym["fault_kind"] and not sym["evidence"]
    mini = at_level(rec["report"], "minimal")
    assert mini["service"] is None and mini["target"] is None
    assert not any(rec["report"]["service"] + ":" in s for s in mini["symptoms"])
    data = build_sft_data(DataConfig(episodes=(str(EPISODES),), augment=AugmentConfig(
        copies=6, levels={"full": 1, "symptoms": 1, "minimal": 1})))
    assert set(data.stats()["by_level"]) == {"full", "symptoms", "minimal"}


def test_paraphrased_symptoms_say_the_same_numbers():
    from e2e_reme.train.data import paraphrase
    import random
    line = "17% of requests to the entry (frontend) failed over 3 s (timeout: 4)"
    out = paraphrase(line, random.Random(1))
    assert out != line and all(x in out for x in ("17", "frontend", "3", "timeout: 4"))


def test_no_episodes_is_one_error_saying_how_to_collect_them(tmp_path):
    with pytest.raises(NoTrainingData, match="remed train collect"):
        build_sft_data(DataConfig(episodes=(str(tmp_path),)))
