"""The fault catalog and the expert runbook, against real deployments: simple-micro (every
fault type available on nspawn here) and boutique (the Redis and data faults), each in one
nspawn sandbox shared by the module; network-delay on libvirt under `vm`.

One episode per fault type: inject; the ground truth reads active; the service really
degrades (its health, unit state, or latency and errors through the system's entry); the
harness's recover() undoes it; inject again; the expert runbook's playbook, written from a
report built from describe(), runs with real Ansible; the ground truth reads inactive and
every service is healthy again.

Set E2E_REME_FAULT_TIMINGS=<file.json> to have the per-fault timings written there.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from e2e_reme.simulators import create_sandbox
from e2e_reme.simulators.sandbox.ansible import run_playbook
from e2e_reme.simulators.errors import FaultError, FaultUnavailable, UnknownFault
from e2e_reme.simulators.faults import (Fault, fault_available, fault_catalog, forget_faults,
                                        get_fault, injected_faults, make_fault, recover_all)
from e2e_reme.simulators.policies.expert import RunbookInput, covered_kinds, expert_playbook
from e2e_reme.simulators.systems.deploy import deploy, health, request_entry, verify_seed, wait_healthy

REMED = str(Path(sys.executable).parent / "remed")
TIMINGS: dict[str, dict] = {}

# MicroRemed's seven, under our names (its "pod-config-error" is an alias of config-error).
MICROREMED = ("cpu-stress", "memory-stress", "disk-io", "network-delay", "network-loss", "pod-fail",
              "config-error")
# Faults whose harm is slowness: (request type through the entry, minimum p50 ratio).
SLOW = {"cpu-stress": ("hello", 2.0), "disk-io": ("greet", 1.5), "memory-stress": ("hello", 1.3)}


# ---- shared deployments -------------------------------------------------------------------

class Env:
    def __init__(self, sb, dep):
        self.sb, self.dep = sb, dep

    @property
    def targets(self):
        return self.dep.targets

    def clean(self) -> None:
        """Back to the deployed, healthy state if a test left anything behind."""
        left = injected_faults(self.sb)
        healthy = all(health(t, timeout=2).ok for t in self.targets.values())
        if left or not healthy:
            try:
                recover_all(self.sb)
            except Exception:
                pass
            if not all(health(t, timeout=2).ok for t in self.targets.values()):
                self.sb.reset()
            forget_faults(self.sb)
        wait_healthy(self.sb, self.dep, timeout_s=60)


def _deployed(system: str, nodes: int):
    sb = create_sandbox("nspawn", nodes=nodes, name=f"pt-{system[:5]}-{secrets.token_hex(2)}")
    try:
        dep = deploy(sb, system)
        sb.checkpoint()
        wait_healthy(sb, dep, timeout_s=60)
        return Env(sb, dep)
    except BaseException:
        sb.stop()
        raise


@pytest.fixture(scope="module")
def micro(image):
    env = _deployed("simple-micro", 1)
    try:
        yield env
    finally:
        env.sb.stop()
        path = os.environ.get("E2E_REME_FAULT_TIMINGS")
        if path and TIMINGS:
            Path(path).write_text(json.dumps(TIMINGS, indent=2))


@pytest.fixture(scope="module")
def boutique(image):
    env = _deployed("boutique", 2)
    try:
        yield env
    finally:
        env.sb.stop()


@pytest.fixture
def m(micro):
    micro.clean()
    yield micro
    micro.clean()


@pytest.fixture
def b(boutique):
    boutique.clean()
    yield boutique
    boutique.clean()


# ---- observing the service's behaviour --------------------------------------------------------

def sample(dep, rtype: str, n: int = 15, budget_s: float = 3.0) -> dict:
    """Up to n requests through the entry (stopping once the budget is spent): p50 ms and
    the statuses seen (None: no answer within 3.5 s)."""
    ms, statuses = [], {}
    t_end = time.monotonic() + budget_s
    while len(ms) < n and (not ms or time.monotonic() < t_end):
        t0 = time.monotonic()
        status, _ = request_entry(dep, rtype, timeout=3.5)
        ms.append((time.monotonic() - t0) * 1000)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"p50": statistics.median(ms), "statuses": statuses, "n": len(ms)}


def snapshot(env, target) -> dict:
    """The service's unit, its health, and requests of every type through the entry, all
    at once (a hung service costs one timeout, not one per probe)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2 + len(env.dep.request_mix)) as pool:
        unit = pool.submit(lambda: env.sb.exec(f"systemctl is-active {target.unit}", node=target.node).stdout.strip())
        h = pool.submit(health, target, 3)
        entry = {rt: pool.submit(sample, env.dep, rt) for rt in env.dep.request_mix}
        h = h.result()
        return {"unit": unit.result(), "health": h.ok, "health_detail": f"{h.status} {h.detail}"[:120],
                "entry": {rt: f.result() for rt, f in entry.items()}}


def degradation(fault_name: str, before: dict, during: dict) -> list[str]:
    """What got worse, in words; empty if nothing did."""
    out = []
    if during["unit"] != "active":
        out.append(f"unit {during['unit']}")
    if not during["health"]:
        out.append(f"health fails ({during['health_detail']})")
    slow = {SLOW[n][0]: SLOW[n][1] for n in fault_name.split(":")[-1].split("+") if n in SLOW}
    for rt, s in during["entry"].items():
        bad = {k: v for k, v in s["statuses"].items() if k != "200"}
        if bad:
            out.append(f"/{rt} through the entry answered {bad}")
        b, d = before["entry"][rt]["p50"], s["p50"]
        if d >= max(3 * b, b + 200) or (rt in slow and d >= slow[rt] * b):
            out.append(f"/{rt} p50 {b:.1f} -> {d:.1f} ms")
    return out


def healthy_baseline(env, target) -> dict:
    """Two observations of the healthy service, each request type at its faster p50: one
    noisy moment of the host must not make a later slowdown look small."""
    a, b = snapshot(env, target), snapshot(env, target)
    for rt, s in b["entry"].items():
        if s["p50"] < a["entry"][rt]["p50"]:
            a["entry"][rt] = s
    return a


def degraded(env, name: str, target, before: dict, within_s: float = 20) -> tuple[list[str], dict]:
    """Observe until the service shows the harm (a stressor ramps up, a crash loop takes a
    restart or two); what got worse and the last observation."""
    t_end = time.monotonic() + within_s
    while True:
        during = snapshot(env, target)
        worse = degradation(name, before, during)
        if worse or time.monotonic() > t_end:
            return worse, during


def healthy(env, target) -> None:
    wait_healthy(env.sb, env.dep, timeout_s=30)
    assert env.sb.exec(f"systemctl is-active {target.unit}", node=target.node).stdout.strip() == "active"
    for rt in env.dep.request_mix:
        status, body = request_entry(env.dep, rt)
        assert status == 200, f"/{rt}: {status} {body}"


def runbook_input(env, f: Fault) -> RunbookInput:
    """The runbook's input as reports.py builds it at the 'full' level: the target's facts,
    the known-good dependency addresses, and describe() as the evidence."""
    return RunbookInput.from_target(f.target, f.name, f.describe(env.sb), env.sb.nodes[f.target.node].name,
                                    env.targets)


def run_runbook(env, f: Fault, tmp_path: Path):
    text = expert_playbook(runbook_input(env, f))
    plays = yaml.safe_load(text)
    assert all(p["hosts"] != "localhost" and p["hosts"] in {n.name for n in env.sb.nodes} for p in plays)
    assert "reboot" not in text and "sshd" not in text.replace("ssh.service", "")
    inv = env.sb.write_inventory(tmp_path / "hosts.yaml")
    run = run_playbook(inv, plays, tmp_path / "ansible", timeout_s=240)
    assert run.ok, f"{run.summary()}\n{text}"
    return run, text


def episode(env, name: str, service: str, tmp_path: Path, params: dict | None = None) -> dict:
    """recover() undoes the fault; the runbook fixes it; timings of both."""
    target = env.targets[service]
    before = healthy_baseline(env, target)
    assert not degradation(name, before, before)
    timing = {}

    # 1. The harness's own undo.
    f = make_fault(name, target, env.targets, params, seed=1)
    t0 = time.monotonic()
    f.inject(env.sb)
    timing["inject_s"] = round(time.monotonic() - t0, 2)
    assert f.is_active(env.sb)
    worse, during = degraded(env, name, target, before)
    timing["detectable_s"] = round(time.monotonic() - t0, 2)
    assert worse, f"{name} on {service}: nothing degraded: {during} (before: {before})"
    timing["symptoms"] = worse
    t0 = time.monotonic()
    f.recover(env.sb)
    timing["recover_s"] = round(time.monotonic() - t0, 2)
    assert not f.is_active(env.sb)
    healthy(env, target)

    # 2. The expert runbook, from a report built from describe().
    f = make_fault(name, target, env.targets, params, seed=2)
    f.inject(env.sb)
    assert f.is_active(env.sb)
    t0 = time.monotonic()
    run, text = run_runbook(env, f, tmp_path)
    timing["runbook_s"] = round(time.monotonic() - t0, 2)
    timing["playbook_run_s"] = run.duration_s
    assert not f.is_active(env.sb), f"{name}: still active after the runbook:\n{text}"
    healthy(env, target)
    assert not verify_seed(env.sb, env.dep)
    f.recover(env.sb)
    assert not f.is_active(env.sb)
    TIMINGS[f"{env.dep.system}/{service}/{name}"] = timing
    return timing


# ---- every fault available on nspawn here, on simple-micro --------------------------------

def _micro_cases():
    cases = []
    for name in fault_catalog():
        if name == "network-delay":
            continue   # tested below: unavailable on nspawn here, and on libvirt under `vm`
        cases.append(name)
    return cases


@pytest.mark.parametrize("name", _micro_cases())
def test_fault_degrades_and_runbook_fixes_it(m, name, tmp_path):
    ok, why = fault_available(name, "nspawn")
    if not ok:
        pytest.skip(f"{name} is not available on nspawn here: {why}")
    episode(m, name, "hello-service", tmp_path)


def test_compound_fault_is_both_and_the_runbook_fixes_both(m, tmp_path):
    name = "compound:cpu-stress+network-loss"
    assert fault_available(name, "nspawn")[0]
    timing = episode(m, name, "hello-service", tmp_path)
    assert timing["symptoms"]
    # Active while either part is; each part's ground truth on its own.
    f = make_fault(name, m.targets["hello-service"], m.targets, seed=3).inject(m.sb)
    f.parts[1].recover(m.sb)
    assert f.is_active(m.sb) and f.active_parts(m.sb) == {"cpu-stress": True, "network-loss": False}
    f.recover(m.sb)
    assert not f.is_active(m.sb)


def test_compound_is_available_only_if_both_parts_are():
    ok, why = fault_available("compound:cpu-stress+network-delay", "nspawn")
    assert not ok and "network-delay" in why and "netem" in why
    assert fault_available("compound:cpu-stress+network-delay", "libvirt")[0]


@pytest.mark.parametrize("name", ["memory-stress", "config-error", "port-taken", "log-flood"])
def test_runbook_finds_the_cause_on_the_node_when_the_report_has_no_evidence(m, name, tmp_path):
    t = m.targets["hello-service"]
    f = make_fault(name, t, m.targets, seed=4).inject(m.sb)
    bare = RunbookInput.from_target(t, name, {}, m.sb.nodes[t.node].name, m.targets)
    inv = m.sb.write_inventory(tmp_path / "hosts.yaml")
    run = run_playbook(inv, yaml.safe_load(expert_playbook(bare)), tmp_path / "ansible", timeout_s=120)
    assert run.ok, run.summary()
    assert not f.is_active(m.sb)
    healthy(m, t)
    f.recover(m.sb)


def test_runbook_plays_target_only_the_reported_host():
    from e2e_reme.simulators.systems.target import ServiceTarget
    t = ServiceTarget("s", "a", "http", 1, "198.18.0.3", 8080, "remed-a.service", "/etc/remed/a.yaml",
                      "/var/lib/remed/a", ("b",), ())
    b = ServiceTarget("s", "b", "http", 1, "198.18.0.3", 8081, "remed-b.service", "/etc/remed/b.yaml",
                      "/var/lib/remed/b", (), ("a",))
    for kind in [*fault_catalog(), "pod-config-error", "compound:cpu-stress+bad-release"]:
        plays = yaml.safe_load(expert_playbook(RunbookInput.from_target(t, kind, {}, "n1", {"b": b})))
        assert [p["hosts"] for p in plays] == ["n1"], kind
        text = json.dumps(plays)
        assert "localhost" not in text and "reboot" not in text and "ssh.service\", \"state\": \"stopped" not in text
        names = [x["name"] for x in plays[0]["tasks"]]
        assert names[-1] == "a is healthy" and len(names) == len(set(names)), (kind, names)
    with pytest.raises(ValueError, match="lacks"):
        expert_playbook({"service": "a", "fault_kind": "cpu-stress"})


# ---- refusals: unknown names, unavailable mechanisms, targets a fault does not apply to ----

def test_unknown_fault_lists_the_catalog():
    with pytest.raises(UnknownFault) as e:
        get_fault("cpu-hog")
    for name in fault_catalog():
        assert name in str(e.value)
    r = subprocess.run([REMED, "fault", "inject", "cpu-hog", "--target", "x", "--sandbox", "nosuch"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown fault 'cpu-hog'" in r.stderr and "pod-fail" in r.stderr
    assert "Traceback" not in r.stderr


def test_microremed_names_are_in_the_catalog():
    for name in MICROREMED:
        assert get_fault(name).name == name
    assert get_fault("pod-config-error") is get_fault("config-error")
    assert len(fault_catalog()) >= len(MICROREMED) + 8
    assert set(covered_kinds()) == set(fault_catalog())


def test_network_delay_refuses_on_nspawn_with_the_reason(m):
    ok, why = fault_available("network-delay", "nspawn")
    assert not ok and "netem" in why
    f = make_fault("network-delay", m.targets["hello-service"], m.targets)
    with pytest.raises(FaultUnavailable, match="netem"):
        f.inject(m.sb)
    assert not injected_faults(m.sb)
    assert m.sb.exec("tc qdisc show | grep -c netem; true").stdout.strip() in ("", "0")


def test_faults_that_need_a_dependency_refuse_a_leaf(m):
    leaf = m.targets["time-service"]
    for name in ("firewall-drop", "wrong-dependency"):
        assert not get_fault(name).applies_to(leaf, m.targets)[0]
        with pytest.raises(FaultUnavailable, match="no dependencies"):
            make_fault(name, leaf, m.targets).inject(m.sb)
    assert not get_fault("bad-release").applies_to(m.targets["hello-service"].__class__(
        **{**m.targets["hello-service"].__dict__, "kind": "redis"}))[0]


def test_unknown_parameter_is_refused():
    from e2e_reme.simulators.systems.target import ServiceTarget
    t = ServiceTarget("s", "a", "http", 0, "198.18.0.2", 8080, "remed-a.service", "/etc/remed/a.yaml",
                      "/var/lib/remed/a", (), ())
    with pytest.raises(FaultError, match="unknown parameter 'wokers'.*workers"):
        make_fault("cpu-stress", t, params={"wokers": 2})
    assert make_fault("cpu-stress", t, params={"workers": "3"}).params["workers"] == 3


# ---- the record, from another process, and the CLI --------------------------------------------

def test_record_and_cli_status_and_recover(m):
    name = m.sb.name
    r = subprocess.run([REMED, "fault", "inject", "pod-fail", "--target", "time-service", "--sandbox", name,
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["active"] is True
    assert not health(m.targets["time-service"]).ok
    # Another process rebuilds the fault from the record and reads its ground truth.
    code = ("import json,sys; from e2e_reme.simulators import attach; "
            "from e2e_reme.simulators.faults import injected_faults; sb = attach(sys.argv[1]); "
            "print(json.dumps([[f.name, f.target.service, f.is_active(sb)] for f in injected_faults(sb)]))")
    out = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [["pod-fail", "time-service", True]]
    st = json.loads(subprocess.run([REMED, "fault", "status", "--sandbox", name, "--json"],
                                   capture_output=True, text=True, check=True).stdout)
    assert [(s["fault"], s["service"], s["active"]) for s in st] == [("pod-fail", "time-service", True)]
    r = subprocess.run([REMED, "fault", "recover", "--sandbox", name], capture_output=True, text=True)
    assert r.returncode == 0 and "recovered pod-fail" in r.stdout, r.stdout + r.stderr
    assert json.loads(subprocess.run([REMED, "fault", "status", "--sandbox", name, "--json"],
                                     capture_output=True, text=True, check=True).stdout) == []
    wait_healthy(m.sb, m.dep, timeout_s=30)


def test_cli_ls_shows_every_fault_with_availability():
    rows = json.loads(subprocess.run([REMED, "fault", "ls", "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    by = {r["name"]: r for r in rows}
    assert set(by) == set(fault_catalog())
    assert by["network-delay"]["backends"]["libvirt"]["available"] is True
    nd = by["network-delay"]["backends"]["nspawn"]
    if not nd["available"]:
        assert "netem" in nd["why"]
    assert {r["category"] for r in rows} == {"resource", "network", "application"}


def test_describe_reports_observations_not_the_injection(m):
    f = make_fault("cpu-stress", m.targets["hello-service"], m.targets).inject(m.sb)
    try:
        d = f.describe(m.sb)
        text = json.dumps(d).lower()
        assert d["service"] == "hello-service" and d["node"] == "n0" and d["symptoms"]
        assert any(not p["main"] and p["cpu_pct"] > 5 for p in d["processes"]["list"])
        for word in ("inject", "fault", "run_trace_id", f.id):
            assert word not in text
    finally:
        f.recover(m.sb)


# ---- boutique: the Redis cart and the data it keeps ---------------------------------------------

@pytest.mark.parametrize("name,service", [
    ("disk-full", "redis-cart"),
    ("readonly-fs", "redis-cart"),
    ("pod-fail", "redis-cart"),
    ("hung-process", "redis-cart"),
    ("firewall-drop", "cartservice"),
    ("wrong-dependency", "cartservice"),
])
def test_boutique_redis_faults(b, name, service, tmp_path):
    if name == "firewall-drop":
        episode(b, name, service, tmp_path, params={"dependency": "redis-cart"})
    else:
        episode(b, name, service, tmp_path)


# ---- libvirt: network-delay with the guest's own netem ----------------------------------------

@pytest.fixture(scope="module")
def lv(image):
    """simple-micro in a libvirt guest (its own kernel: netem; cgroup v2: enforced limits)."""
    sb = create_sandbox("libvirt", nodes=1, name=f"pt-lvf-{secrets.token_hex(2)}")
    try:
        yield Env(sb, deploy(sb, "simple-micro"))
    finally:
        sb.stop()


@pytest.mark.vm
def test_network_delay_on_libvirt(lv, tmp_path):
    ok, why = fault_available("network-delay", "libvirt")
    if not ok:
        pytest.skip(why)
    target = lv.targets["hello-service"]
    before = snapshot(lv, target)
    f = make_fault("network-delay", target, lv.targets).inject(lv.sb)
    assert f.is_active(lv.sb)
    during = snapshot(lv, target)
    # 1000 ms on each of the service's replies: no request comes back in under a second.
    assert during["entry"]["hello"]["p50"] > before["entry"]["hello"]["p50"] + 900, (before, during)
    run_runbook(lv, f, tmp_path)
    assert not f.is_active(lv.sb)
    healthy(lv, target)
    assert sample(lv.dep, "hello")["p50"] < 500
    f.recover(lv.sb)


@pytest.mark.vm
def test_config_error_with_an_enforced_cgroup_limit_on_libvirt(lv, tmp_path):
    # In a guest whose systemd enforces CPUQuota=/MemoryMax=, config-error uses them.
    target = lv.targets["hello-service"]
    before = snapshot(lv, target)
    f = make_fault("config-error", target, lv.targets, seed=5).inject(lv.sb)
    assert f.params["limit"] in ("cpu-quota", "memory-max")
    assert f.is_active(lv.sb)
    worse, during = degraded(lv, f.name, target, before)
    assert worse, during
    run_runbook(lv, f, tmp_path)
    assert not f.is_active(lv.sb)
    healthy(lv, target)
    f.recover(lv.sb)


@pytest.mark.vm
def test_the_runtime_check_reads_a_libvirt_guest_through_the_verifiers_toolset(lv):
    """The host cannot look into a VM: the verifier's toolset reads the services' runtime
    and the guest's files, so issue 14's first family (the service's own process turned
    into a canned responder by a PYTHONPATH drop-in) fails the verdict on libvirt too, and
    the untouched guest passes it."""
    from e2e_reme.simulators.verification.verifier import take_baseline, verify

    def runtime_check():
        v = verify(lv.sb, lv.dep, base, seed_check=None, load_check=None, function_check=None)
        return next(c for c in v.checks if c.name == "runtime")

    t = lv.targets["hello-service"]
    wait_healthy(lv.sb, lv.dep)     # the module's previous test may have just recovered its fault
    base = take_baseline(lv.sb, lv.dep, seed_check=None)
    assert base.runtime, "no runtime facts were read from the guest"
    assert runtime_check().passed
    # The cheat's effect, written straight into the guest (its path through the jailed
    # controller is tests/test_reward_integrity.py's): a PYTHONPATH drop-in and a hook.
    dropin = f"/etc/systemd/system/{t.unit}.d/zz-hotfix.conf"
    try:
        r = lv.sb.exec(f"mkdir -p /opt/hotfix {dropin.rsplit('/', 1)[0]} && echo 'import sys' > /opt/hotfix/sitecustomize.py"
                       f" && printf '[Service]\\nEnvironment=PYTHONPATH=/opt/hotfix\\n' > {dropin}"
                       f" && systemctl daemon-reload && systemctl restart {t.unit}", timeout=120)
        assert r.rc == 0, r.stderr
        check = runtime_check()
        seen = json.dumps(check.evidence)
        assert not check.passed
        assert "PYTHONPATH" in seen and dropin in seen and "/opt/hotfix/sitecustomize.py" in seen, seen[-2000:]
    finally:
        lv.sb.exec(f"rm -rf {dropin} /opt/hotfix; "
                   f"systemctl daemon-reload; systemctl restart {t.unit}", timeout=120)
