"""The campaign every driver shares (benchmark, fleet collection, evaluation): cases are a
pure function of the seed and go to a backend that can run them; a records store in either
layout resumes a run and refuses to mix two; statistics carry honest intervals."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from e2e_reme.simulators.campaign import (Planner, RecordStore, Skipped, list_suites, load_suite, make_cases,
                                          per_group, sample_cases, service_cases, stats, wilson, write_chart)
from e2e_reme.simulators.sandbox.doctor import HostReport, Usable

EPISODES = Path(__file__).parent / "data" / "train-episodes.jsonl"


def host(netem_on: tuple[str, ...] = ()) -> HostReport:
    """A doctor's report of a host whose backends have every mechanism, netem only on `netem_on`."""
    def per(usable_on):
        return {b: Usable(b in usable_on, f"{'usable' if b in usable_on else 'missing'} on {b}")
                for b in ("nspawn", "libvirt")}
    return HostReport(checks=(), backends={b: Usable(True, "") for b in ("nspawn", "libvirt")},
                      mechanisms={"netem": per(netem_on), "nftables": per(("nspawn", "libvirt")),
                                  "cgroup_stress": per(("nspawn", "libvirt"))})


def record(id: str, fault: str = "cpu-stress", outcome: str = "success", stage: str = "done", **extra) -> dict:
    return {"id": id, "scenario": {"fault": fault}, "outcome": outcome, "stage": stage, "trials": [{}],
            "timings": {"total": 10.0}, "tokens": {"prompt": 100, "completion": 20}, **extra}


# ---- planning ----------------------------------------------------------------------------------

def test_microremed_suites_are_shipped_with_their_sizes():
    assert {"easy", "medium", "hard"} <= set(list_suites())
    assert (len(load_suite("easy")), len(load_suite("medium")), len(load_suite("hard"))) == (23, 49, 80)


@pytest.mark.parametrize("suite", ["nope", "/does/not/exist.txt"])
def test_an_unknown_suite_lists_the_shipped_ones(suite):
    with pytest.raises(ValueError, match="easy"):
        load_suite(suite)


def test_a_suite_file_with_an_unknown_fault_lists_the_catalog(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("cpu-stress\ncosmic-ray\n")
    with pytest.raises(Exception, match="cpu-stress"):
        load_suite(str(p))


def test_the_same_seed_gives_the_same_cases_and_another_seed_other_targets():
    a, _ = make_cases("boutique", "medium", 7, "nspawn")
    b, _ = make_cases("boutique", "medium", 7, "nspawn")
    c, _ = make_cases("boutique", "medium", 8, "nspawn")
    assert a == b
    assert [x.scenario.target for x in a] != [x.scenario.target for x in c]


def test_a_fault_no_configured_backend_provides_is_skipped_with_the_reason():
    cases, skipped = make_cases("simple-micro", "easy", 0, Planner("nspawn", report=host()))
    assert len(cases) + len(skipped) == 23
    assert {s.fault for s in skipped} == {"network-delay"}
    assert all("netem" in s.reason and "nspawn" in s.reason for s in skipped)
    assert {c.backend for c in cases} == {"nspawn"}


def test_a_case_goes_to_the_backend_that_can_run_it():
    alone, _ = make_cases("simple-micro", "easy", 0, Planner("nspawn", report=host(netem_on=("libvirt",))))
    both, skipped = make_cases("simple-micro", "easy", 0, Planner("nspawn,libvirt", report=host(netem_on=("libvirt",))))
    assert skipped == [] and len(both) == 23
    assert {c.backend for c in both if c.scenario.fault == "network-delay"} == {"libvirt"}
    assert {c.backend for c in both if c.scenario.fault != "network-delay"} == {"nspawn"}
    assert [c.scenario for c in both if c.backend == "nspawn"] == [c.scenario for c in alone]   # same draws


def test_the_first_configured_backend_that_can_run_a_case_wins():
    cases, _ = make_cases("simple-micro", "network-delay", 0,
                          Planner(("libvirt", "nspawn"), report=host(netem_on=("nspawn", "libvirt"))))
    assert {c.backend for c in cases} == {"libvirt"}


def test_a_case_no_backend_can_run_names_every_backends_reason():
    _, skipped = make_cases("simple-micro", "network-delay", 0, Planner("nspawn,libvirt", report=host()))
    assert skipped and all("on nspawn" in s.reason and "on libvirt" in s.reason for s in skipped)


def test_an_unknown_backend_lists_the_known_ones():
    with pytest.raises(Exception, match="nspawn"):
        Planner("nspwan")


def test_limit_plans_only_the_first_entries_of_the_suite():
    cases, skipped = make_cases("simple-micro", "easy", 0, Planner("nspawn", report=host()), limit=4)
    assert sorted([c.index for c in cases] + [s.index for s in skipped]) == [0, 1, 2, 3]


def test_sampled_cases_cycle_over_the_systems_and_are_a_pure_function_of_the_seed():
    a, _ = sample_cases(("simple-micro", "boutique"), ("cpu-stress", "pod-fail"), 6, 3)
    assert a == sample_cases(("simple-micro", "boutique"), ("cpu-stress", "pod-fail"), 6, 3)[0]
    assert [c.scenario.system for c in a[:4]] == ["simple-micro", "boutique", "simple-micro", "boutique"]
    assert a != sample_cases(("simple-micro", "boutique"), ("cpu-stress", "pod-fail"), 6, 4)[0]


def test_sampling_only_faults_no_backend_provides_is_an_error_with_the_reasons():
    with pytest.raises(ValueError, match="network-delay: .*netem"):
        sample_cases(("simple-micro",), ("network-delay",), 3, 0, Planner("nspawn", report=host()))


def test_a_held_out_service_gets_a_case_per_fault_it_admits_and_seed(tmp_path):
    path = tmp_path / "suite.txt"
    path.write_text("firewall-drop\ncpu-stress\n")
    cases, skipped = service_cases("time-service", str(path), (0, 1), eval_set="service:time-service")
    assert [(c.scenario.fault, c.scenario.target) for c in cases] == [("cpu-stress", "time-service")] * 2
    assert [s.fault for s in skipped] == ["firewall-drop"]         # time-service has no dependency to cut
    assert skipped[0].to_dict()["set"] == "service:time-service" and "index" not in skipped[0].to_dict()


def test_a_service_no_system_has_is_skipped_with_the_reason():
    cases, skipped = service_cases("no-such-service", "easy", (0,))
    assert cases == [] and "no system of ours" in skipped[0].reason


def test_one_scenario_in_two_sets_has_two_record_ids():
    (case,), _ = make_cases("simple-micro", "easy", 0, limit=1)
    ids = {replace(case, eval_set=s).id for s in ("system:simple-micro", "service:hello-service")}
    assert len(ids) == 2 and case.id == case.scenario.id


# ---- the records store -----------------------------------------------------------------------------

def test_a_run_directory_holds_its_records_in_one_file(tmp_path):
    with RecordStore(tmp_path) as store:
        store.append(record("a"))
        store.append(record("b"))
    assert [p.name for p in store.files()] == ["episodes.jsonl"]
    assert list(RecordStore(tmp_path).done()) == ["a", "b"]


def test_a_gzipped_records_file_reads_as_the_plain_one(tmp_path):
    import gzip
    with RecordStore(tmp_path / "run") as store:
        store.append({"id": "a", "outcome": "success"})
        store.append({"id": "b", "outcome": "failure"})
    packed = tmp_path / "traces.jsonl.gz"
    packed.write_bytes(gzip.compress((tmp_path / "run" / "episodes.jsonl").read_bytes()))
    (store_gz,) = RecordStore.find(packed)
    assert list(store_gz) == list(RecordStore(tmp_path / "run")) and list(store_gz.done()) == ["a", "b"]
    kept = tmp_path / "kept"                         # a run's directory with its records packed
    kept.mkdir()
    packed.rename(kept / "episodes.jsonl.gz")
    (again,) = RecordStore.find(kept)
    assert list(again.done()) == ["a", "b"]
    with pytest.raises(ValueError, match="read only"):
        again.append({"id": "c"})


def test_a_collection_writes_a_new_shard_every_shard_size_records(tmp_path):
    with RecordStore(tmp_path, sharded=True, shard_size=2, run="a") as store:
        for i in range(3):
            store.append(record(f"e{i}"))
    assert [p.name for p in store.files()] == ["part-a-0000.jsonl", "part-a-0001.jsonl"]
    assert [r["id"] for r in RecordStore(tmp_path, sharded=True)] == ["e0", "e1", "e2"]


def test_a_new_run_never_reopens_an_existing_shard(tmp_path):
    with RecordStore(tmp_path, sharded=True, run="a") as store:
        store.append(record("e0"))
    with pytest.raises(FileExistsError), RecordStore(tmp_path, sharded=True, run="a") as again:
        again.append(record("again"))


@pytest.mark.parametrize("sharded", [False, True], ids=["file", "shards"])
def test_a_line_cut_by_a_kill_is_not_a_record(tmp_path, sharded):
    with RecordStore(tmp_path, sharded=sharded, run="a") as store:
        store.append(record("e0"))
    with open(store.files()[-1], "a") as f:
        f.write('{"id": "cut-by-a-kil')          # what a SIGKILL mid-write leaves
    assert list(RecordStore(tmp_path, sharded=sharded).done()) == ["e0"]


def test_a_record_appended_after_a_cut_line_is_a_line_of_its_own(tmp_path):
    (tmp_path / "episodes.jsonl").write_text(json.dumps(record("e0")) + "\n" + '{"id": "cut')
    with RecordStore(tmp_path) as store:
        store.append(record("e1"))
    assert list(RecordStore(tmp_path).done()) == ["e0", "e1"]


def test_the_first_record_of_an_id_wins(tmp_path):
    with RecordStore(tmp_path) as store:
        store.append(record("a", outcome="success"))
        store.append(record("a", outcome="failure"))
    assert store.done()["a"]["outcome"] == "success"


def test_pending_splits_a_plan_into_cases_to_run_and_records_of_those_done(tmp_path):
    cases, _ = make_cases("simple-micro", "cpu-stress", 0, limit=3)
    with RecordStore(tmp_path) as store:
        store.append(record(cases[1].id))
        store.append(record("of-another-plan"))
    todo, done = store.pending(cases)
    assert [c.id for c in todo] == [cases[0].id, cases[2].id]
    assert [r["id"] for r in done] == [cases[1].id] == [r["id"] for r in store.records(cases)]


def test_a_rerun_with_other_settings_is_refused_naming_the_directory_and_the_fix(tmp_path):
    store = RecordStore(tmp_path)
    store.claim("config.json", {"seed": 0, "parallel": 1}, keys=("seed",))
    store.claim("config.json", {"seed": 0, "parallel": 4}, keys=("seed",))     # not a deciding setting
    with pytest.raises(ValueError, match=f"{tmp_path} holds a run with another seed; .*another --out"):
        store.claim("config.json", {"seed": 1, "parallel": 4}, keys=("seed",))


def test_a_nested_setting_is_compared_by_its_dotted_key(tmp_path):
    store = RecordStore(tmp_path, sharded=True)
    store.claim("collect.json", {"fleet": {"host": {"backend": "nspawn"}}}, keys=("fleet.host.backend",))
    with pytest.raises(ValueError, match="collection with another backend"):
        store.claim("collect.json", {"fleet": {"host": {"backend": "libvirt"}}}, keys=("fleet.host.backend",),
                    what="collection")


def test_records_written_before_the_store_existed_are_read(tmp_path):
    shutil.copy(EPISODES, tmp_path / "episodes.jsonl")
    assert len(RecordStore(tmp_path).done()) == len(EPISODES.read_text().splitlines())


def test_find_reads_a_file_a_run_a_collection_and_a_directory_of_runs(tmp_path):
    (tmp_path / "bench").mkdir()
    shutil.copy(EPISODES, tmp_path / "bench" / "episodes.jsonl")
    with RecordStore(tmp_path / "fleet", sharded=True) as fleet:
        fleet.append(record("f0"))
    assert [s.sharded for s in RecordStore.find(tmp_path)] == [False, True]
    assert [len(RecordStore.find(p)) for p in (EPISODES, tmp_path / "bench", tmp_path / "fleet")] == [1, 1, 1]
    assert RecordStore.find(tmp_path / "nothing-here") == []


# ---- what the records add up to ------------------------------------------------------------------

@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (5, 10), (0, 0)])
def test_the_interval_contains_the_rate(k, n):
    lo, hi = wilson(k, n)
    assert 0 <= lo <= (k / n if n else 0.5) <= hi <= 1


def test_the_interval_is_wilsons():
    assert wilson(0, 10) == (0.0, 0.2775) and wilson(10, 10) == (0.7225, 1.0) and wilson(0, 0) == (0.0, 1.0)


def test_injection_failures_count_against_the_rate_and_infra_failures_do_not():
    s = stats([record("a"), record("b", outcome="injection_failure"), record("c", outcome="infra_failure")])
    assert (s["cases"], s["successes"], s["injection_failures"], s["infra_failures"]) == (3, 1, 1, 1)
    assert s["success_rate"] == 0.5 and s["ci95"] == wilson(1, 2)


def test_failure_stages_count_where_the_policys_failures_stopped():
    recs = [record("a", outcome="failure", stage="gate"), record("b", outcome="failure", stage="gate"),
            record("c", outcome="injection_failure", stage="inject")]
    assert stats(recs)["failure_stages"] == {"gate": 2}
    assert stats(recs, stage_of=lambda r: r["stage"])["failure_stages"] == {"gate": 2, "inject": 1}


def test_per_group_keeps_the_order_of_first_appearance_and_adds_groups_without_records():
    recs = [record("a", "pod-fail"), record("b", "cpu-stress"), record("c", "pod-fail", outcome="failure")]
    groups = per_group(recs, also=["network-delay"])
    assert list(groups) == ["pod-fail", "cpu-stress", "network-delay"]
    assert groups["pod-fail"]["success_rate"] == 0.5 and groups["network-delay"]["cases"] == 0


def test_the_chart_is_a_png_and_nothing_is_drawn_without_cases(tmp_path):
    groups = {"system:a": per_group([record("a")]), "service:b": per_group([record("b", "pod-fail")])}
    path = write_chart(groups, "title", tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_chart({"": per_group([], also=["pod-fail"])}, "title", tmp_path / "none.png") is None


def test_a_skipped_case_says_only_what_it_has():
    assert Skipped("network-delay", "no netem", 2).to_dict() == {"index": 2, "fault": "network-delay",
                                                                "reason": "no netem"}
    assert Skipped("*", "unknown", eval_set="service:x").to_dict() == {"set": "service:x", "fault": "*",
                                                                      "reason": "unknown"}
