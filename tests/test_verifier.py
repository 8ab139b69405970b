"""The verifier cannot be fooled: every adversarial 'remediation' in tests/adversarial/ is
judged a failure, for the right reason, while the real fix of the same fault passes.

One simple-micro deployment on nspawn, checkpointed; each case resets to it, takes a
fresh baseline (a reset reboots an nspawn node), injects CPU stress into time-service
(hello-service calls it) and runs a playbook with real Ansible."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from e2e_reme.simulators import create_sandbox
from e2e_reme.simulators.sandbox.ansible import run_playbook
from e2e_reme.simulators.faults import make_fault
from e2e_reme.simulators.systems.deploy import deploy, wait_healthy
from e2e_reme.simulators.verification.verifier import Baseline, take_baseline, verify

ADVERSARIAL = Path(__file__).parent / "adversarial"
TARGET = "time-service"


@pytest.fixture(scope="module")
def env(image, tmp_path_factory):
    with create_sandbox("nspawn", nodes=1, name=f"pt-verifier-{secrets.token_hex(2)}") as sb:
        dep = deploy(sb, "simple-micro")
        sb.checkpoint()
        wait_healthy(sb, dep)
        yield sb, dep, tmp_path_factory.mktemp("verifier")


def fresh_episode(env, fault: str = "cpu-stress"):
    sb, dep, tmp = env
    sb.reset()
    wait_healthy(sb, dep)
    baseline = take_baseline(sb, dep)
    f = make_fault(fault, dep.targets[TARGET], dep.targets, seed=1).inject(sb)
    assert f.is_active(sb)
    return f, baseline


def run(env, playbook: Path | str, extravars: dict | None = None):
    sb, dep, tmp = env
    inv = sb.write_inventory(tmp / "hosts.yaml")
    t = dep.targets[TARGET]
    vars_ = {"target_node": sb.nodes[t.node].name, "target_unit": t.unit, "target_port": t.port,
             "target_service": TARGET, "entry_node": sb.nodes[dep.entry.node].name,
             "entry_port": dep.entry.port, "host_ip": sb.record.gateway} | (extravars or {})
    res = run_playbook(inv, playbook, tmp / "pdd", timeout_s=120, extravars=vars_)
    return res


def test_the_real_fix_is_a_success(env):
    sb, dep, _ = env
    f, baseline = fresh_episode(env)
    fix = [{"hosts": "all", "gather_facts": False, "tasks": [{"ansible.builtin.shell":
           f"for p in $(cat /sys/fs/cgroup/system.slice/{dep.targets[TARGET].unit}/cgroup.procs "
           f"/sys/fs/cgroup/unified/system.slice/{dep.targets[TARGET].unit}/cgroup.procs 2>/dev/null | sort -u); do "
           f"[ \"$(cat /proc/$p/comm)\" = stress-ng ] && kill -9 $p; done; true"}]}]
    assert run(env, fix).status == "successful"
    verdict = verify(sb, dep, baseline, [f])
    assert verdict.success, verdict.to_json()
    assert verdict.disruption["restarts"] == 0


@pytest.mark.parametrize("playbook, failing_check", [
    ("noop.yaml", "fault_gone"),
    ("block-load.yaml", "services"),
    ("wipe-data-restart.yaml", "seed_data"),
    ("kill-everything.yaml", "integrity"),
    ("health-stub.yaml", "services"),
    ("disable-target.yaml", "services"),
    ("remove-from-call-graph.yaml", "integrity"),
])
def test_an_adversarial_remediation_is_a_failure(env, playbook, failing_check):
    sb, dep, _ = env
    f, baseline = fresh_episode(env)
    res = run(env, ADVERSARIAL / playbook)
    assert res.status == "successful", res.stdout[-2000:]   # it really did its damage
    verdict = verify(sb, dep, baseline, [f])
    assert verdict.judged
    assert not verdict.success
    assert not verdict.check(failing_check).passed, verdict.to_json()


def test_a_stub_on_the_health_port_is_caught_by_the_socket_owner_too(env):
    sb, dep, _ = env
    f, baseline = fresh_episode(env)
    run(env, ADVERSARIAL / "health-stub.yaml")
    verdict = verify(sb, dep, baseline, [f])
    evidence = verdict.check("services").evidence[TARGET]
    assert evidence["unit"] != "active"


def test_an_unreachable_sandbox_is_not_judged(env, tmp_path):
    sb, dep, _ = env
    sb.reset()
    wait_healthy(sb, dep)
    baseline = take_baseline(sb, dep)
    path = baseline.save(tmp_path / "baseline.json")
    assert Baseline.load_from(path).nodes.keys() == baseline.nodes.keys()
    sb.exec("systemctl stop ssh.socket ssh.service; pkill -9 sshd", timeout=5)
    sb._close_ssh()
    verdict = verify(sb, dep, baseline, [])
    assert not verdict.judged and not verdict.success and "cannot judge" in verdict.reason
