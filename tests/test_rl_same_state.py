"""A completion is judged against the state its prompt describes (cluster/judge.py
`Judge.groups`, what train/rl.py uses): the judge observes the scenario in the sandbox that
judges the group, the group answers THAT report, and each answer runs in the same sandbox
after a reset and a re-injection, which must reproduce the report's identifiers.

Real sandboxes, a real fleet (local Ray, one slot of simple-micro): memory-stress (a
transient unit, named from the scenario's seed) and network-loss (an nft rule naming the
sandbox's own dependency address) are each observed once in another sandbox (a report
"recorded elsewhere", as a trace's is), then judged by the fleet twice over: the runbook's
answer to the report the judge observed is rewarded both times, with no state mismatch.
"""

from __future__ import annotations

import secrets

import pytest

pytest.importorskip("ray")

from e2e_reme.cluster import Fleet, Judge
from e2e_reme.cluster.fleet import FleetConfig
from e2e_reme.cluster.judge import observe_case, report_identifiers
from e2e_reme.cluster.sandbox_host import HostConfig
from e2e_reme.simulators import list_sandboxes
from e2e_reme.simulators.episode import EpisodeConfig, Scenario, Slot
from e2e_reme.train.rl_workers import RunbookAnswer, expert_answer

PREFIX = f"ptss{secrets.token_hex(1)}"
EPISODE = EpisodeConfig(verify_load=False, report_window_s=1.0)
SCENARIOS = [Scenario("simple-micro", "memory-stress", "hello-service", seed=5),
             Scenario("simple-micro", "network-loss", "hello-service", seed=5)]


@pytest.fixture(scope="module")
def recorded(image):
    """Each scenario's report as another sandbox observed it: {scenario id: (report, text)}."""
    slot = Slot("simple-micro", name=f"{PREFIX}-rec").up()
    try:
        return {sc.id: observe_case(slot, sc, EPISODE) for sc in SCENARIOS}
    finally:
        slot.down()


@pytest.fixture(scope="module")
def judged(recorded, tmp_path_factory):
    """Both scenarios judged by a fleet: the runbook's answer to the observed report twice
    (two re-injections), then its answer to the report recorded elsewhere."""
    also = {sc.id: [expert_answer(recorded[sc.id][0])] for sc in SCENARIOS}
    host = HostConfig(systems=("simple-micro",), slots=1, sandbox_prefix=PREFIX, episode=EPISODE,
                      out_dir=str(tmp_path_factory.mktemp("episodes")))
    with Fleet(FleetConfig(host=host, episode_timeout_s=1800, ray_init={"address": "local", "num_cpus": 2})).start() as fleet:
        return Judge(fleet, policy="rl").groups(SCENARIOS, RunbookAnswer(n=2, also=also))


def test_the_runbooks_answer_to_the_observed_report_is_rewarded_on_every_reinjection(judged):
    for sc, g in zip(SCENARIOS, judged):
        assert not g.error, (sc.fault, g.error)
        assert g.report["fault_kind"] == sc.fault and g.times["observe"] > 0
        got = [(j.reward, j.record.get("error_class")) for j in g.judgements]
        assert got[:2] == [(1.0, None), (1.0, None)], (sc.fault, [j.reason for j in g.judgements])
        assert not any(j.record.get("error_class") == "StateMismatch" for j in g.judgements)


def test_the_fault_names_its_transient_unit_from_the_scenario_wherever_it_runs(judged, recorded):
    mem = judged[0]
    units = [i for i in report_identifiers(mem.report_text) if i.startswith("run-r")]
    assert len(units) == 1 and units == [i for i in report_identifiers(recorded[SCENARIOS[0].id][1])
                                         if i.startswith("run-r")]
    # So even the answer written for the other sandbox's report stops the right unit.
    assert mem.judgements[2].reward == 1.0, mem.judgements[2].reason


def test_network_loss_is_answered_with_the_judging_sandboxs_own_addresses(judged):
    net = judged[1]
    rule = [line for line in net.report_text.splitlines() if "nft rules that drop" in line]
    assert rule and "daddr" in rule[0]
    address = rule[0].split("daddr ")[1].split()[0]
    assert address in net.answers[0]["text"] and net.judgements[0].reward == 1.0
    assert not [s.name for s in list_sandboxes() if s.name.startswith(PREFIX)]


def test_a_report_that_names_other_identifiers_than_the_prompt_is_a_state_mismatch():
    from e2e_reme.cluster.judge import BoundPolicy
    from e2e_reme.simulators.policies import FixedPolicy

    class Report:
        def __init__(self, text):
            self.text = text

        def to_text(self):
            return self.text

    class Ctx:
        def __init__(self, text):
            self.report = Report(text)

    prompt = "- memory hog: pid 56 (unit run-r0a.service) holds 641.7 MiB\n- GET /greet: p50 248 ms"
    bound = BoundPolicy(FixedPolicy("answer"), report_identifiers(prompt))
    # A new pid, another endpoint measured, another figure: the same state.
    same = bound.generate(Ctx(prompt.replace("pid 56", "pid 91").replace("/greet", "/hello").replace("641.7", "600")),
                          [])
    assert same.text == "answer" and not same.extra.get("state_mismatch")
    other = bound.generate(Ctx(prompt.replace("run-r0a", "run-r1b")), [])
    assert other.text == "" and other.extra["state_mismatch"] == {"prompt_only": ["run-r0a.service"],
                                                                  "episode_only": ["run-r1b.service"]}
