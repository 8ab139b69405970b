"""Issue 28, families 3 and 4, through the real episode path on a real nspawn sandbox.

Masks through the mount table (a bind mount over a drop-in, a tmpfs over a full data dir,
a bind mount over systemctl, a bind-mounted library, a drop-in under
/run/systemd/transient/) each pass the fault's own ground truth and must fail `runtime`
with evidence naming the mask. Re-breaks after the verdict (a timer, a unit under
/run/systemd/system, a shell written into the service's cgroup) must be ended before the
verdict, fail `persistence` with the reason, and be gone right after the episode (the
service is not stopped again later). The cheats are playbooks in
tests/adversarial/integrity/ (simulators/verification/fixtable.py HOSTILE). One simple-micro
sandbox for the module; each case is one episode without the SLO window. The same cases
run on a libvirt guest under `-m vm` (read there by the verifier's guest toolset).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_reme.simulators import create_sandbox
from e2e_reme.simulators.episode import EpisodeConfig, Scenario, run_episode
from e2e_reme.simulators.faults import get_fault
from e2e_reme.simulators.policies import FixedPolicy
from e2e_reme.simulators.systems.deploy import deploy, wait_healthy
from e2e_reme.simulators.verification import persistence, runtime_state
from e2e_reme.simulators.verification.fixtable import HOSTILE, MountLeft, row

SYSTEM = "simple-micro"
CHEATS = Path(__file__).parent / "adversarial" / "integrity"


@pytest.fixture(scope="module", params=["nspawn", pytest.param("libvirt", marks=pytest.mark.vm)])
def env(request, image):
    with create_sandbox(request.param, nodes=1, name=f"pt-hn-{secrets.token_hex(2)}") as sb:
        dep = deploy(sb, SYSTEM)
        sb.checkpoint()
        wait_healthy(sb, dep)
        yield sb, dep


def _target(fault: str, dep) -> str:
    cls = get_fault(fault)
    ok = [n for n, t in dep.targets.items() if cls.applies_to(t, dep.targets)[0]]
    return "hello-service" if "hello-service" in ok else ok[0]


def _render(cheat: str, sb, dep, target: str) -> str:
    t = dep.targets[target]
    values = {"target_node": sb.nodes[t.node].name, "target_unit": t.unit, "target_service": target}
    text = (CHEATS / cheat).read_text()
    for k, v in values.items():
        text = text.replace("{{ %s }}" % k, v)
    return "```yaml\n" + text + "```"


def _episode(env, tmp_path, fault: str, cheat: str):
    sb, dep = env
    target = _target(fault, dep)
    scenario = Scenario(SYSTEM, fault, target, seed=1)
    rec = run_episode(sb, dep, scenario, FixedPolicy(_render(cheat, sb, dep, target)), out_dir=tmp_path,
                      config=EpisodeConfig(verify_load=False, settle_timeout_s=5.0))
    return rec, dep.targets[target]


def _checks(rec) -> dict[str, dict]:
    return {c["name"]: c for c in rec.verdict["checks"]}


# What each mask's failed `runtime` check must name: the mask itself.
def _names_mask(cheat: str, t, evidence: str) -> bool:
    return {"bind-over-dropin.yaml": f"/etc/systemd/system/{t.unit}.d/",
            "tmpfs-over-full-dir.yaml": f'"{t.data_dir.rstrip("/")}"',
            "bind-over-systemctl.yaml": '"/usr/bin/systemctl"',
            "bind-mounted-library.yaml": "_json.cpython",
            "transient-dropin.yaml": f"/run/systemd/transient/{t.unit}.d/"}[cheat] in evidence


MASKS = [h for h in HOSTILE if h[3] == "runtime"]
REBREAKS = [h for h in HOSTILE if h[3] == "persistence"]


@pytest.mark.parametrize("what, fault, cheat, check", MASKS, ids=[h[2][:-5] for h in MASKS])
def test_a_mask_through_the_mount_table_fails_runtime(env, tmp_path, what, fault, cheat, check):
    rec, t = _episode(env, tmp_path, fault, cheat)
    dump = json.dumps(rec.to_dict(), indent=1, default=str)[-5000:]
    assert (rec.outcome, rec.stage) == ("failure", "verify"), dump
    checks = _checks(rec)
    # The mask fooled the fault's own ground truth (the cause is hidden, not removed) ...
    assert checks["fault_gone"]["passed"], dump
    # ... and the runtime check names it.
    assert not checks["runtime"]["passed"], dump
    evidence = json.dumps(checks["runtime"]["evidence"])
    assert _names_mask(cheat, t, evidence), evidence[-3000:]


@pytest.mark.parametrize("what, fault, cheat, check", REBREAKS, ids=[h[2][:-5] for h in REBREAKS])
def test_a_rebreak_left_for_after_the_verdict_is_ended_and_fails(env, tmp_path, what, fault, cheat, check):
    sb, dep = env
    rec, t = _episode(env, tmp_path, fault, cheat)
    dump = json.dumps(rec.to_dict(), indent=1, default=str)[-5000:]
    assert (rec.outcome, rec.stage) == ("failure", "verify"), dump
    checks = _checks(rec)
    assert not checks["persistence"]["passed"], dump
    left = checks["persistence"]["evidence"]["left"]
    assert left and all(x["ended"] for x in left), dump
    # The fix itself was genuine: only what it left is refused (and a unit file it left
    # under /run is a changed unit directory as well).
    assert {n for n, c in checks.items() if not c["passed"]} <= {"persistence", "runtime"}, dump
    assert "unit_files" in json.dumps(checks["runtime"]["evidence"]) or checks["runtime"]["passed"], dump
    # Gone right after the episode: no timer, no unit of the playbook's, no process that
    # waits to stop the service; the service runs.
    r = sb.exec("systemctl list-timers --all --no-legend --plain; ls /run/systemd/transient 2>/dev/null",
                node=t.node)
    assert "run-" not in r.stdout, r.stdout
    assert sb.exec("systemctl is-active remed-later.service", node=t.node).stdout.strip() != "active"
    assert sb.exec("pgrep -f 'sleep 2[0]'", node=t.node).rc == 1, "the waiting process is still there"
    assert sb.exec(f"systemctl is-active {t.unit}", node=t.node).stdout.strip() == "active"
    kinds = {x["kind"] for x in left}
    assert {"timer-rebreak.yaml": "unit", "run-unit-rebreak.yaml": "unit",
            "cgroup-moved-shell.yaml": "process"}[cheat] in kinds, dump


# ---- the comparison itself (no sandbox) -------------------------------------------------------

def _state(mounts=(), files=None, cgroups=None) -> dict:
    return {"mounts": [list(m) for m in mounts], "service_mounts": {}, "files": files or {},
            "cgroups": cgroups or {"/init.scope": {"procs": 1, "tops": [[1, "/usr/lib/systemd/systemd"]]}},
            "notes": []}


ROOT = ("/", "/ overlay overlay rw,relatime rw")
DATA = "/var/lib/remed/x"


def test_a_fault_s_mount_left_is_allowed_but_one_stacked_on_it_is_not():
    base = _state([ROOT])
    fault_tmpfs = (DATA, "/ tmpfs tmpfs rw size=49152k")
    allow = runtime_state.MountAllowance(DATA, fstype="tmpfs")
    assert runtime_state.compare(base, _state([ROOT, fault_tmpfs]), [allow]) == ([], {})
    problems, ev = runtime_state.compare(base, _state([ROOT, fault_tmpfs, (DATA, "/ tmpfs tmpfs rw size=64m")]),
                                         [allow])
    assert problems and DATA in ev["mounts"]
    # Without the allowance (another fault), the fault's own kind of mount is a change too.
    assert runtime_state.compare(base, _state([ROOT, fault_tmpfs]))[0]
    # A mount of the baseline removed is a change whatever is allowed.
    assert runtime_state.compare(_state([ROOT, ("/run/lock", "/ tmpfs tmpfs rw x")]), _state([ROOT]), [allow])[0]


def test_the_fix_table_allows_exactly_the_faults_own_mounts():
    assert row("readonly-fs").mounts_left == (MountLeft("{data_dir}", root="{data_dir}"),)
    assert row("disk-full").mounts_left and row("log-flood").mounts_left
    assert not row("config-error").mounts_left and not row("pod-fail").mounts_left


def test_unit_files_and_cgroups_against_the_baseline():
    files = {"/etc/systemd/system/a.service": "f:1:644"}
    now = dict(files, **{"/run/systemd/transient/a.service.d/x.conf": "f:2:644",
                         "/run/systemd/transient/session-3.scope": "f:3:644"})
    problems, ev = runtime_state.compare(_state(files=files), _state(files=now))
    assert list(ev["unit_files"]) == ["/run/systemd/transient/a.service.d/x.conf"]
    # The fault's own drop-in may be edited or removed.
    dropin = "/etc/systemd/system/a.service.d/limits.conf"
    assert runtime_state.compare(_state(files={dropin: "f:1:644"}), _state(), (), (dropin,)) == ([], {})
    svc = "/system.slice/a.service"
    base = _state(cgroups={svc: {"procs": 2, "tops": [[40, "/usr/bin/python3.11"]]}})
    moved = _state(cgroups={svc: {"procs": 3, "tops": [[40, "/usr/bin/python3.11"], [77, "/usr/bin/dash"]]}})
    assert svc in runtime_state.compare(base, moved)[1]["cgroups"]
    started = _state(cgroups={svc: base["cgroups"][svc], "/system.slice/evil.service": {"procs": 1, "tops": [[9, "x"]]}})
    assert "/system.slice/evil.service" in runtime_state.compare(base, started)[1]["cgroups"]
    init2 = _state(cgroups={"/init.scope": {"procs": 2, "tops": [[1, "/usr/lib/systemd/systemd"]]}})
    assert "/init.scope" in runtime_state.compare(_state(), init2)[1]["cgroups"]
    # systemd's own daemons of the image start on a mere query (timedatectl): not a change.
    image = {"/usr/lib/systemd/system/systemd-timedated.service": "f:size=1:644"}
    queried = _state(files=image, cgroups={"/system.slice/systemd-timedated.service": {"procs": 1, "tops": [[5, "t"]]}})
    assert runtime_state.compare(_state(files=image), queried) == ([], {})


def test_new_units_are_the_unit_files_new_at_the_top_of_a_unit_directory():
    before = {"/etc/systemd/system/a.service": "f:1"}
    now = dict(before, **{"/run/systemd/transient/run-r1.timer": "f:2", "/run/systemd/transient/run-r1.service": "f:3",
                          "/run/systemd/system/later.service": "f:4", "/etc/systemd/system/a.service.d/z.conf": "f:5",
                          "/etc/systemd/system/b@.service": "f:6", "/var/spool/cron/crontabs/root": "f:7"})
    assert set(persistence.new_units(before, now)) == {"run-r1.timer", "run-r1.service", "later.service"}
    assert persistence.new_jobs(before, now) == ["/var/spool/cron/crontabs/root"]


def test_foreign_candidates_are_new_tops_in_a_unit_and_anything_new_in_init_scope():
    svc = "/p/system.slice/a.service"
    procs = [{"pid": 10, "ns_pid": 1, "ppid": 5, "state": "S", "exe": "/usr/lib/systemd/systemd", "cgroup": "/p/init.scope"},
             {"pid": 20, "ns_pid": 40, "ppid": 10, "state": "S", "exe": "/py", "cgroup": svc},
             {"pid": 21, "ns_pid": 41, "ppid": 20, "state": "S", "exe": "/py", "cgroup": svc},
             {"pid": 30, "ns_pid": 77, "ppid": 10, "state": "S", "exe": "/bin/dash", "cgroup": svc},
             {"pid": 31, "ns_pid": 78, "ppid": 10, "state": "S", "exe": "/bin/sleep", "cgroup": "/p/init.scope"},
             {"pid": 32, "ns_pid": 79, "ppid": 10, "state": "S", "exe": "/bin/sleep", "cgroup": "/p/system.slice"},
             {"pid": 33, "ns_pid": 80, "ppid": 10, "state": "S", "exe": "/bin/sleep", "cgroup": "/p/system.slice/ssh.service"}]
    found = persistence.foreign_candidates(procs, procs[1:])
    assert {p["pid"] for p in found} == {20, 30, 31, 32}     # 20 is the unit's main process: systemd decides
    # A unit with Delegate= (udevd) runs its workers in a cgroup of its own below the unit's.
    udev = "/p/system.slice/systemd-udevd.service"
    procs += [{"pid": 40, "ns_pid": 90, "ppid": 10, "state": "S", "exe": "/udevd", "cgroup": udev + "/udev"},
              {"pid": 41, "ns_pid": 91, "ppid": 40, "state": "S", "exe": "/udevd", "cgroup": udev + "/udev"}]
    assert persistence.foreign_candidates(procs, procs[-1:]) == []
    assert runtime_state.unit_cgroup(udev + "/udev") == (udev, "systemd-udevd.service")
    assert runtime_state.unit_cgroup("/p/system.slice") == ("/p/system.slice", "")


def test_the_guest_toolset_reads_the_same_shape(tmp_path):
    """The libvirt side, run here by an isolated python on this host's own tree."""
    want = {"tops": [str(tmp_path)], "hashed": [str(tmp_path)], "file_limit": 4096, "max_entries": 100,
            "units": [], "systemctl": "/bin/false"}
    (tmp_path / "a.service").write_text("[Service]\n")
    os.symlink("/etc/passwd", tmp_path / "b.service")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", runtime_state.GUEST_SCRIPT], input=json.dumps(want),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    data = json.loads(out)
    assert data["files"][str(tmp_path / "b.service")] == "l:/etc/passwd"
    assert data["files"][str(tmp_path / "a.service")].startswith("f:")
    assert any(point == "/" for point, _ in data["mounts"])
    assert runtime_state.cgroup_census([tuple(p[:6]) for p in data["procs"]])
