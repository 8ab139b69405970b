"""The episode runner, end to end on one simple-micro deployment in nspawn: for every fault
type available here, deploy → inject → confirmed active → report → the expert runbook's
playbook → gate → execute → verify (with the SLO window under load) is a success; the
report never names the injector; and every way a policy can fail is a recorded failure
at the right stage, never a crash.

Fixed playbooks stand in for a model's raw output here: they are the adversarial inputs.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from e2e_reme.simulators import create_sandbox
from e2e_reme.simulators.episode import EpisodeConfig, Scenario, run_episode
from e2e_reme.simulators.faults import fault_available, fault_catalog, get_fault, injected_faults
from e2e_reme.simulators.policies import FixedPolicy, make_policy
from e2e_reme.simulators.reports import LEAK_WORDS
from e2e_reme.simulators.systems.deploy import deploy, health_all, wait_healthy

SYSTEM = "simple-micro"


@pytest.fixture(scope="module")
def env(image):
    with create_sandbox("nspawn", nodes=1, name=f"pt-ep-{secrets.token_hex(2)}") as sb:
        dep = deploy(sb, SYSTEM)
        sb.checkpoint()
        wait_healthy(sb, dep)
        yield sb, dep


def _target_for(name: str, dep) -> str | None:
    cls = get_fault(name)
    ok = [n for n, t in dep.targets.items() if cls.applies_to(t, dep.targets)[0]]
    # A service that others call shows every kind of harm through the entry.
    return "time-service" if "time-service" in ok else (ok[0] if ok else None)


# test_faults.py already has the runbook fix every fault type, and test_bench.py runs the
# easy suite (cpu-stress, memory-stress, network-loss) through the whole benchmark; here the
# default run takes MicroRemed's other kinds available here and a compound, the rest run
# under `-m slow`.
DEFAULT = ("pod-fail", "config-error", "compound:cpu-stress+network-loss")


def _cases() -> list:
    names = [n for n in fault_catalog() if fault_available(n, "nspawn")[0]]
    names.append("compound:cpu-stress+network-loss")
    return [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in names]


def episode(env, tmp_path, policy, fault="cpu-stress", target="time-service", **cfg):
    sb, dep = env
    cfg.setdefault("verify_load", False)
    return run_episode(sb, dep, Scenario(SYSTEM, fault, target, seed=1), policy, out_dir=tmp_path,
                       config=EpisodeConfig(**cfg))


@pytest.mark.parametrize("fault", _cases())
def test_the_runbook_remediates_every_fault_type_available_here(env, fault, tmp_path):
    sb, dep = env
    target = _target_for(fault, dep)
    if target is None:
        pytest.skip(f"no service of {SYSTEM} admits {fault}")
    rec = episode(env, tmp_path, make_policy("runbook"), fault=fault, target=target, verify_load=True)
    assert rec.outcome == "success", json.dumps(rec.to_dict(), indent=1, default=str)[-3000:]
    assert rec.stage == "done"
    assert all(c["passed"] for c in rec.verdict["checks"])
    assert {c["name"] for c in rec.verdict["checks"]} >= {"fault_gone", "services", "integrity", "seed_data", "slo"}
    text = rec.report_text.lower() + json.dumps(rec.report).lower()
    assert not [w for w in LEAK_WORDS if w in text], "the report leaks the injector"
    edir = tmp_path / rec.id
    for f in ("report.json", "hosts.yaml", "verdict.json", "record.json", "trial-1/playbook.yaml",
              "trial-1/output.txt"):
        assert (edir / f).is_file(), f
    assert not injected_faults(sb)


def test_doing_nothing_is_a_failure_at_verify(env, tmp_path):
    noop = "```yaml\n- hosts: n0\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n```"
    rec = episode(env, tmp_path, FixedPolicy(noop), verify_load=True)
    assert (rec.outcome, rec.stage, rec.error_class) == ("failure", "verify", "NotRemediated")
    failed = [c["name"] for c in rec.verdict["checks"] if not c["passed"]]
    assert "fault_gone" in failed
    # Already decided: the SLO window is not waited for, and the verdict says so.
    assert list(rec.verdict["skipped"]) == ["slo"] and "slo" not in {c["name"] for c in rec.verdict["checks"]}
    # Waiting it out would take the whole window on top of the other checks (not a fixed
    # bound: the other checks take longer on a loaded machine).
    assert rec.timings["verify"] < env[1].slo.window_s


def test_a_fault_left_in_place_is_judged_without_waiting_out_the_settle_time(env, tmp_path):
    noop = "```yaml\n- hosts: n0\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n```"
    rec = episode(env, tmp_path, FixedPolicy(noop), fault="hung-process", settle_timeout_s=60)
    assert (rec.outcome, rec.stage) == ("failure", "verify")
    # The hung service never answers again and nothing on the node is pending: no reason to wait.
    assert rec.timings["settle"] < 15, rec.timings


@pytest.mark.parametrize("text, stage, error_class", [
    ("I would restart the service.", "extract", "NoYaml"),
    ("```yaml\n- hosts: n0\n  tasks: [\n```", "parse", "InvalidYaml"),
    ("```yaml\nhosts: n0\ntasks: []\n```", "parse", "NotAPlaybook"),
    ("```yaml\n- hosts: localhost\n  tasks:\n    - ansible.builtin.command: touch /tmp/x\n```", "gate", "GateViolation"),
    ("```yaml\n- hosts: n0\n  tasks:\n    - ansible.builtin.reboot:\n```", "gate", "GateViolation"),
    ("```yaml\n- hosts: n0\n  tasks:\n    - no.such.module: {x: 1}\n```", "syntax", "SyntaxCheckFailed"),
    ("```yaml\n- hosts: n0\n  gather_facts: false\n  tasks:\n    - ansible.builtin.command: /bin/false\n```",
     "execute", "ExecutionFailed"),
])
def test_bad_output_is_a_failure_at_its_stage(env, tmp_path, text, stage, error_class):
    rec = episode(env, tmp_path, FixedPolicy(text))
    assert rec.outcome == "failure"
    assert (rec.stage, rec.error_class) == (stage, error_class), rec.reason
    assert rec.verdict is not None and not rec.verdict["success"]   # judged all the same
    assert not injected_faults(env[0])                               # and cleaned up


def test_a_hanging_playbook_times_out_and_the_run_goes_on(env, tmp_path):
    hang = "```yaml\n- hosts: n0\n  gather_facts: false\n  tasks:\n    - ansible.builtin.command: sleep 600\n```"
    rec = episode(env, tmp_path, FixedPolicy(hang), exec_timeout_s=10)
    assert (rec.outcome, rec.stage, rec.error_class) == ("failure", "execute", "Timeout")
    assert rec.timings["pipeline"] < 60


def test_a_policy_that_raises_is_recorded_at_generate(env, tmp_path):
    class Broken(FixedPolicy):
        def generate(self, ctx, feedback):
            raise ConnectionError("model server at http://127.0.0.1:9/v1 refused the connection")
    rec = episode(env, tmp_path, Broken(""))
    assert (rec.outcome, rec.stage, rec.error_class) == ("failure", "generate", "ConnectionError")
    assert "refused" in rec.reason


def test_a_fault_that_cannot_be_injected_is_an_injection_failure(env, tmp_path):
    rec = episode(env, tmp_path, make_policy("runbook"), fault="network-delay")
    assert (rec.outcome, rec.stage) == ("injection_failure", "inject")
    assert "netem" in rec.reason.lower()


def test_the_runbook_on_a_degraded_report_fails_honestly(env, tmp_path):
    rec = episode(env, tmp_path, make_policy("runbook"), report_detail="symptoms")
    assert rec.outcome == "failure" and rec.stage == "extract"
    assert rec.report["fault_kind"] is None and rec.report["service"] == "time-service"


def test_report_noise_names_a_wrong_service_or_kind(env, tmp_path):
    rec = episode(env, tmp_path, make_policy("runbook"), report_noise=1.0)
    assert rec.noise and rec.noise["true"] != rec.noise["reported"]
    assert rec.report[rec.noise["field"]] == rec.noise["reported"]
    assert rec.outcome == "failure"


def test_the_record_is_one_json_line_with_what_training_needs(env, tmp_path):
    rec = episode(env, tmp_path, make_policy("runbook"))
    d = json.loads(json.dumps(rec.to_dict(), default=str))
    assert d["schema"] == 1
    assert d["scenario"] == {"system": SYSTEM, "fault": "cpu-stress", "target": "time-service", "seed": 1,
                             "params": {}, "index": 0}
    assert d["report"]["service"] == "time-service" and d["playbook"]
    assert d["trials"][0]["output"].startswith("```yaml")
    assert {"reset", "deploy_check", "inject", "confirm", "report", "generate", "gate", "syntax",
            "execute", "settle", "verify", "total"} <= set(d["timings"])
    sb, dep = env
    assert all(p.ok for p in health_all(dep.targets).values())
