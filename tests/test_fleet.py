"""The Ray fleet on a real multi-node Ray cluster on this machine: a head that is no sandbox
host (as a GPU trainer would be) and two nodes that advertise `sandbox_host`, each with its
own raylet. One host actor lands on each sandbox host and none elsewhere; episodes run on
real nspawn sandboxes; a killed sandbox and a killed host actor cost no episode and count
none twice; shutdown leaves nothing behind.
"""

from __future__ import annotations

import json
import secrets
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from e2e_reme.cluster import (CollectConfig, Fleet, FleetConfig, HostConfig, Job, Judge, NoSandboxHosts, collect,
                              plan, plan_slots, reward_of)
from e2e_reme.simulators.campaign import RecordStore
from e2e_reme.simulators import list_sandboxes
from e2e_reme.simulators.episode import EpisodeConfig, Scenario

PREFIX = f"pt-fl{secrets.token_hex(1)}"
FAST = EpisodeConfig(verify_load=False, report_window_s=1.0)
METRICS_PORTS = (28301, 28302)


def _ours() -> list[str]:
    return [r.name for r in list_sandboxes() if r.name.startswith(PREFIX)]


# ---- the plan: a pure function (the shards: test_campaign.py) ---------------------------------------------------

def test_a_plan_is_a_pure_function_of_its_config():
    cfg = CollectConfig(episodes=12, systems=("simple-micro", "boutique"), seed=3)
    a, _ = plan(cfg)
    b, _ = plan(cfg)
    c, _ = plan(CollectConfig(episodes=12, systems=("simple-micro", "boutique"), seed=4))
    assert a == b and a != c
    assert [c.scenario.system for c in a[:4]] == ["simple-micro", "boutique", "simple-micro", "boutique"]
    assert len({s.id for s in a}) == 12


def test_faults_the_backend_cannot_provide_are_left_out_with_the_reason():
    scenarios, skipped = plan(CollectConfig(episodes=30, faults=("network-delay", "cpu-stress")))
    assert {c.scenario.fault for c in scenarios} == {"cpu-stress"}
    assert "netem" in skipped["network-delay"]


@pytest.mark.parametrize("bad, match", [({"episodes": 3, "bogus": 1}, "unknown keys.*bogus"),
                                        ({"fleet": {"host": {"slotz": 2}}}, "fleet.host.*slotz"),
                                        ({"faults": ["cosmic-ray"]}, "cpu-stress")])
def test_a_bad_collect_config_names_the_problem(bad, match):
    with pytest.raises(Exception, match=match):
        plan(CollectConfig.from_dict(bad))


@pytest.mark.parametrize("cores, mem, expect", [(2, 24000, 4), (2, 1000, 1), (16, 64000, 4), (1, 100, 1)])
def test_slots_are_sized_from_cores_and_memory(cores, mem, expect):
    n, why = plan_slots(HostConfig(), cores=cores, memory_mib=mem)
    assert n == expect and "max_slots" in why


# ---- a real cluster ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(image):
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"trainer": 1},
                                                      "include_dashboard": False})
    workers = [c.add_node(num_cpus=1, resources={"sandbox_host": 1}, metrics_export_port=port)
               for port in METRICS_PORTS]
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False, namespace="pt-fleet")
    try:
        yield c, [w.node_id for w in workers], c.head_node.node_id
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def fleet(cluster, tmp_path_factory):
    c, _, _ = cluster
    cfg = FleetConfig(address=c.address, host=HostConfig(slots=1, sandbox_prefix=PREFIX, episode=FAST,
                                                         out_dir=str(tmp_path_factory.mktemp("episodes"))))
    f = Fleet(cfg).start()
    try:
        yield f
    finally:
        f.shutdown()
        assert _ours() == [], f"the fleet left sandboxes behind: {_ours()}"


def test_one_host_actor_lands_on_each_sandbox_host_and_none_elsewhere(fleet, cluster):
    _, workers, head = cluster
    nodes = [h.node_id for h in fleet.hosts]
    assert sorted(nodes) == sorted(workers) and head not in nodes
    assert [h.info["node_id"] for h in fleet.hosts] == nodes      # the actor really runs there
    assert fleet.capacity == 2 and len(_ours()) == 2


def test_a_cluster_without_sandbox_hosts_is_a_clear_error(cluster):
    c, _, _ = cluster
    with pytest.raises(NoSandboxHosts, match="ray start .*--resources"):
        Fleet(FleetConfig(address=c.address, resource="no_such_resource")).start()


def test_collect_writes_shards_and_a_rerun_continues_where_it_stopped(fleet, tmp_path):
    cfg = CollectConfig(episodes=2, faults=("pod-fail", "cpu-stress"), out=str(tmp_path), seed=1)
    first = collect(cfg, fleet=fleet)
    assert (first["episodes"], first["success"], first["complete"]) == (2, 2, True)
    store = RecordStore(tmp_path, sharded=True)
    recs = store.done()
    assert sorted(recs) == sorted(c.id for c in plan(cfg)[0])
    assert {r["host"]["node_id"] for r in recs.values()} <= {h.node_id for h in fleet.hosts}
    assert all(r["schema"] == 1 and r["verdict"]["success"] for r in recs.values())
    before = {p: p.read_text() for p in store.files()}
    # A longer plan with the same settings runs only the new episodes, into a new shard.
    more = collect(CollectConfig(**{**cfg.__dict__, "episodes": 3}), fleet=fleet)
    assert (more["episodes"], more["planned"], more["complete"]) == (3, 3, True)
    assert all(p.read_text() == text for p, text in before.items())       # never rewritten
    assert len(store.files()) == len(before) + 1
    assert len(list(store)) == 3                                           # nothing ran twice
    # And Ray Data reads the shards as they are.
    assert ray.data.read_json([str(p) for p in store.files()]).count() == 3


def test_a_group_runs_every_playbook_from_the_same_starting_state(fleet):
    sc = Scenario("simple-micro", "pod-fail", "time-service", seed=5)
    fix = ("- hosts: n0\n  gather_facts: false\n  tasks:\n"
           "    - ansible.builtin.systemd_service: {name: remed-time-service.service, state: started}\n")
    noop = "- hosts: n0\n  gather_facts: false\n  tasks: []\n"
    recs = fleet.evaluate(sc, [fix, noop, "I would restart it."])
    assert [r["id"] for r in recs] == [f"{sc.id}-g0", f"{sc.id}-g1", f"{sc.id}-g2"]
    assert all(r["scenario"] == recs[0]["scenario"] for r in recs)
    assert [r["outcome"] for r in recs] == ["success", "failure", "failure"]
    assert [r["stage"] for r in recs] == ["done", "verify", "extract"]


# ---- the judge: completions scored by execution, through the real fleet ------------------------

FIX = ("```yaml\n- hosts: n0\n  gather_facts: false\n  tasks:\n"
       "    - ansible.builtin.systemd_service: {name: remed-time-service.service, state: started}\n```\n")


def test_the_judge_rewards_a_fix_and_not_a_completion_that_fixes_nothing(fleet):
    sc = Scenario("simple-micro", "pod-fail", "time-service", seed=6)
    good, bad = Judge(fleet)([sc, sc], [FIX, "The service is down; I would restart it."],
                             completion_ids=[[11, 12, 13], [14, 15]])
    assert (good.reward, good.blame, good.stage) == (1.0, "none", "done")
    assert (bad.reward, bad.blame, bad.stage) == (0.0, "policy", "extract")
    # What a trainer needs to attribute the reward stays in the record.
    assert good.record["trials"][0]["extra"]["completion_ids"] == [11, 12, 13]
    assert good.record["tokens"]["completion"] == 3 and good.record["policy"] == "sampled"


def test_a_failure_of_the_infrastructure_earns_no_reward(fleet):
    # network-delay needs netem, which this host's kernel lacks: the fault cannot be injected.
    judged = Judge(fleet).step(Scenario("simple-micro", "network-delay", "time-service", seed=1), FIX)
    assert (judged.outcome, judged.blame, judged.reward) == ("injection_failure", "infrastructure", None)


def test_the_judge_is_a_reward_function_in_trls_shape(fleet):
    sc = Scenario("simple-micro", "pod-fail", "time-service", seed=7)
    assert Judge(fleet).rewards(["p", "p"], [FIX, ""], scenario=[sc, sc]) == [1.0, 0.0]


@pytest.mark.parametrize("scenarios, completions, ids", [(1, 2, None), (2, 2, [[1]]), (0, 1, None)])
def test_mismatched_inputs_are_refused_before_anything_runs(scenarios, completions, ids):
    sc = Scenario("simple-micro", "pod-fail", "time-service", seed=1)
    with pytest.raises(ValueError, match="completions|scenario"):
        Judge(fleet=None)([sc] * scenarios, ["x"] * completions, ids)


@pytest.mark.parametrize("outcome, blame, reward", [("success", "none", 1.0), ("failure", "policy", 0.0),
                                                    ("injection_failure", "infrastructure", None),
                                                    ("infra_failure", "infrastructure", None),
                                                    ("something-new", "infrastructure", None)])
def test_the_reward_follows_who_the_outcome_is_on(outcome, blame, reward):
    j = reward_of({"id": "e1", "outcome": outcome, "stage": "verify"})
    assert (j.blame, j.reward) == (blame, reward)


def _in_background(fn):
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:     # noqa: BLE001 - surfaced by the test
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _wait_busy(fleet, timeout=120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any(s["slots"]["busy"] for s in fleet.stats()["per_host"]):
            return
        time.sleep(0.5)
    raise AssertionError("no host became busy")


def test_a_sandbox_that_dies_mid_episode_is_replaced_and_the_episode_retried(fleet):
    jobs = [Job(id=f"kill-sb-{i}", scenario=Scenario("simple-micro", "pod-fail", "hello-service", seed=i, index=i))
            for i in range(2)]
    t, box = _in_background(lambda: list(fleet.run(jobs)))
    _wait_busy(fleet)
    time.sleep(3)      # well inside the episode
    killed = [ray.get(h.actor.kill_sandbox.remote()) for h in fleet.hosts]
    t.join(600)
    assert "error" not in box, box.get("error")
    recs = box["value"]
    assert sorted(r["id"] for r in recs) == ["kill-sb-0", "kill-sb-1"]         # each exactly once
    hit = [r for r in recs if r["attempts"] == 2]
    assert any(killed) and hit, [(r["id"], r["attempts"], r["outcome"], r["reason"][:80]) for r in recs]
    assert all(r["outcome"] == "success" for r in hit)                          # retried on a new sandbox
    assert sum(s["replacements"] for s in fleet.stats()["per_host"]) >= 1
    assert len(_ours()) == 2


def test_a_host_actor_that_dies_is_restarted_and_its_jobs_requeued(fleet):
    before = {h.node_id: h.info["pid"] for h in fleet.hosts}
    old_sandboxes = set(_ours())
    jobs = [Job(id=f"kill-host-{i}", scenario=Scenario("simple-micro", "cpu-stress", "time-service", seed=i,
                                                      index=i)) for i in range(3)]
    events = []
    t, box = _in_background(lambda: list(fleet.run(jobs, on_event=lambda k, p: events.append((k, p)))))
    _wait_busy(fleet)
    victim = fleet.hosts[0]
    ray.kill(victim.actor, no_restart=False)
    t.join(900)
    assert "error" not in box, box.get("error")
    recs = box["value"]
    assert sorted(r["id"] for r in recs) == [j.id for j in jobs]               # none lost, none twice
    assert any(k == "requeue" for k, _ in events)
    assert any(r["host"]["requeues"] == 1 for r in recs)
    assert all(r["outcome"] == "success" for r in recs), [(r["id"], r["outcome"], r["reason"][:80]) for r in recs]
    assert victim.state == "ready" and victim.info["pid"] != before[victim.node_id]
    # The dead process's sandbox is destroyed by its reaper; the new one has another name.
    dead = {n for n in old_sandboxes if n.startswith(f"{PREFIX}{before[victim.node_id] % 100000}-")}
    assert dead
    t0 = time.monotonic()
    while dead & set(_ours()) and time.monotonic() - t0 < 60:
        time.sleep(0.5)
    assert not dead & set(_ours()) and len(_ours()) == 2


def test_stats_say_where_the_time_goes(fleet):
    s = fleet.stats()
    assert s["hosts_ready"] == 2 and s["slots"]["total"] == 2
    per = s["per_host"][0]
    assert per["episodes"] >= 1 and {"reset", "inject", "execute", "verify", "total"} <= set(per["phases"])
    assert "episodes" in fleet.summary_line(s)


def test_metrics_reach_each_node_s_prometheus_endpoint(fleet):
    import urllib.request
    seen: set[str] = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60 and len(seen) < 3:
        for port in METRICS_PORTS:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
            except OSError:
                continue
            seen |= {name for name in ("ray_remed_fleet_episodes", "ray_remed_fleet_slots",
                                       "ray_remed_fleet_phase_seconds") if name in body}
        time.sleep(2)
    assert seen == {"ray_remed_fleet_episodes", "ray_remed_fleet_slots", "ray_remed_fleet_phase_seconds"}
