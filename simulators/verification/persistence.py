"""What a playbook leaves scheduled or running for later, ended before the verdict, and
held against it (issue 28, family 4).

A playbook can fix the incident, be judged a success, and break the system again a minute
later: a timer (`systemd-run --on-active=45 systemctl stop X`), a unit under
`/run/systemd/system`, a shell that writes itself into the service's cgroup and kills it
later. The leftover sweep (simulators/playbook/leftovers.py) ends processes of SSH sessions
and transient units; this module adds, around the same run:

- units whose definition is new since the run began, in any directory systemd loads units
  from (`runtime_state.UNIT_DIRS`: transient, runtime, /etc, ...): stopped through the
  node's systemd (by the verifier's toolset: the image's python -I -S calling
  /usr/bin/systemctl with no PATH), then re-checked from the host (a transient unit's file
  is gone, no process is left in its cgroup);
- processes new since the run began that sit in a unit's cgroup without being that unit's
  main or control process tree (written there from outside), and any new process in
  init.scope or in a cgroup that is not a unit's: killed from the host by pid + start time;
- cron and at jobs new since the run began (`runtime_state.SPOOL_DIRS`): removed.

Everything found is recorded beside the sandbox (`persistence.jsonl`), and the verdict's
`persistence` check fails on what was found since its baseline, with the evidence: a fix
that needed something left behind is not a fix, and one that plants a re-break is not one
either. A stray process of the playbook's own SSH session (a `nohup` job, a timed-out
task) is only ended, as before (leftovers.py): it cannot act after the sweep.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from e2e_reme.simulators.errors import SandboxError
from e2e_reme.simulators.playbook.leftovers import _cmdline
from e2e_reme.simulators.sandbox import hostview
from e2e_reme.simulators.verification.runtime_state import (SPOOL_DIRS, UNIT_DIRS, UNIT_SUFFIXES, guest_state,
                                                             manifest, unit_cgroup)
RECORD = "persistence.jsonl"


@dataclass(frozen=True)
class Persisted:
    """One thing a playbook left for later, and whether the sweep ended it. Shaped like
    leftovers.Leftover (node, pid, unit, cmdline) so that both go in one list."""
    node: str
    pid: int             # 0 for a unit or a job file
    unit: str            # the unit, the cgroup's unit, or the job file
    cmdline: str         # what it runs (a unit's ExecStart, the process's command line)
    kind: str            # "unit" | "process" | "job"
    ended: bool
    why: str = ""


class Snapshot(frozenset):
    """leftovers' snapshot of (node, pid, start) with each node's unit and job files (node
    index -> runtime_state.manifest) taken at the same moment."""
    files: dict


def with_files(sb, procs: frozenset) -> Snapshot:
    snap = Snapshot(procs)
    snap.files = {i: unit_files(sb, i) for i in range(len(sb.nodes))}
    return snap


def unit_files(sb, node: int) -> dict[str, str] | None:
    """The node's unit, drop-in and job files as its processes see them (runtime_state)."""
    if not hostview.supported(sb):
        state = guest_state(sb, node, [])
        return state["files"] if state else None
    tree = hostview.node_tree(sb, node)
    if tree is None:
        return None
    with tree:
        return manifest(tree, UNIT_DIRS + SPOOL_DIRS, [])


# ---- the sweep ------------------------------------------------------------------------------

def sweep(sb, before) -> list[Persisted]:
    """End what the playbook left scheduled or running since `before` (a Snapshot); record
    it beside the sandbox for the verdict. Never raises for what a node did."""
    files_before = getattr(before, "files", None) or {}
    found: list[Persisted] = []
    for i, node in enumerate(sb.nodes):
        try:
            found += _sweep_node(sb, i, node.name, before, files_before.get(i))
        except (OSError, SandboxError):
            continue    # a node that stopped answering: the verdict says it cannot judge
    if found:
        record(sb, found)
    return found


def _sweep_node(sb, index: int, node: str, before, files_before: dict | None) -> list[Persisted]:
    out: list[Persisted] = []
    procs = None
    if hostview.supported(sb):
        now = unit_files(sb, index)
    else:           # one toolset call for the files and the processes (a VM's calls are slow)
        state = guest_state(sb, index, [], with_procs=True)
        now, procs = (state["files"], state["procs"]) if state else (None, None)
    if files_before is not None and now is not None:
        units, jobs = new_units(files_before, now), new_jobs(files_before, now)
        if units:
            out += _stop_units(sb, index, node, units)
            procs = None        # what the stopped units ran is gone: look again
        if jobs:
            out += _remove_jobs(sb, index, node, jobs)
    out += _end_foreign(sb, index, node, before, procs)
    return out


def new_units(before: dict, now: dict) -> dict[str, str]:
    """unit name -> its file, for every unit file new since `before` directly in one of the
    unit directories (a unit, or a link naming one; not drop-ins, not templates)."""
    out = {}
    tops = tuple(d + "/" for d in UNIT_DIRS)
    for path in sorted(set(now) - set(before)):
        parent, _, name = path.rpartition("/")
        if parent + "/" in tops and name.endswith(UNIT_SUFFIXES) and "@." not in name:
            out.setdefault(name, path)
    return out


def new_jobs(before: dict, now: dict) -> list[str]:
    """Cron and at job files new since `before` (a changed one of the image's is left to the
    verdict's runtime check: removing it would not restore it)."""
    spool = tuple(d.rstrip("/") + "/" for d in SPOOL_DIRS)
    return sorted(p for p in now if p not in before and (p.startswith(spool) or p in SPOOL_DIRS))


# ---- units: stopped by the node's systemd, re-checked from the host ------------------------

_STOP = r'''
import json, subprocess, sys
units = json.load(sys.stdin)
def sc(*a):
    try:
        return subprocess.run(["/usr/bin/systemctl", *a], capture_output=True, text=True, timeout=20,
                              env={"PATH": "/nonexistent"}).stdout
    except Exception as e:
        return ""
sc("stop", "--", *units)
sc("reset-failed", "--", *units)
states = sc("show", "-p", "Id", "-p", "ActiveState", "--", *units)
print(json.dumps([b for b in states.split("\n\n") if b.strip()]))
'''


def _stop_units(sb, index: int, node: str, units: dict[str, str]) -> list[Persisted]:
    from e2e_reme.simulators.systems.probe import toolset_exec
    what = {u: _unit_summary(sb, index, path) for u, path in units.items()}
    # Only what is new: a timer made to start an existing unit is stopped, the unit is not.
    todo = sorted(units)
    res = toolset_exec(sb, index, _STOP, json.dumps(todo), timeout=40)
    states = {}
    for block in _blocks(res):
        kv = dict(l.split("=", 1) for l in block.splitlines() if "=" in l)
        states[kv.get("Id", "")] = kv.get("ActiveState", "")
    gone = _gone_from_host(sb, index, todo)
    out = []
    for u, path in units.items():
        ended = states.get(u) in ("inactive", "failed") and gone.get(u, True)
        why = f"new since the playbook began: {path}" + ("" if ended else
                                                         f"; still {states.get(u) or 'present'} after a stop")
        out.append(Persisted(node, 0, u, what[u], "unit", ended, why))
    return out


def _unit_summary(sb, index: int, path: str) -> str:
    """The lines of a unit file that say what it does and when (ExecStart=, On*=, Unit=)."""
    text = _read(sb, index, path) or ""
    keep = [l.strip() for l in text.splitlines()
            if l.strip().startswith(("ExecStart=", "ExecStop=", "On", "Unit=", "Description="))]
    return "; ".join(keep)[:300]


def _read(sb, index: int, path: str) -> str | None:
    if hostview.supported(sb):
        tree = hostview.node_tree(sb, index)
        if tree is None:
            return None
        with tree:
            data = tree.read_bytes(path, limit=16384)
        return data.decode(errors="replace") if data is not None else None
    r = sb.exec(["/usr/bin/python3", "-I", "-S", "-c", _READ, path], node=index, timeout=20)
    return r.stdout if r.rc == 0 else None


# A regular file only (a FIFO or a device put where a unit file was is not opened for reading).
_READ = ("import os, stat, sys\nfd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)\n"
         "if stat.S_ISREG(os.fstat(fd).st_mode):\n    sys.stdout.write(os.read(fd, 16384).decode(errors='replace'))\n")


def _gone_from_host(sb, index: int, units: list[str], wait_s: float = 3.0) -> dict[str, bool]:
    """Per unit, whether the host sees it ended: no process in its cgroup and (a transient
    unit) its file gone. On libvirt the node's account only."""
    if not hostview.supported(sb):
        return {}
    deadline = time.monotonic() + wait_s
    while True:
        procs = hostview.processes(sb, index)
        tree = hostview.node_tree(sb, index)
        if tree is None:
            return {}
        left = {}
        with tree:
            for u in units:
                running = bool(hostview.unit_processes(procs, u))
                left[u] = not running and tree.lstat(f"/run/systemd/transient/{u}") is None
        if all(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


# ---- job files --------------------------------------------------------------------------------

_RM = r'''
import json, os, sys
done = []
for p in json.load(sys.stdin):
    try:
        os.unlink(p)
        done.append(p)
    except OSError:
        pass
print(json.dumps(done))
'''


def _remove_jobs(sb, index: int, node: str, jobs: list[str]) -> list[Persisted]:
    from e2e_reme.simulators.systems.probe import toolset_exec
    toolset_exec(sb, index, _RM, json.dumps(jobs), timeout=20)
    now = unit_files(sb, index) or {}
    return [Persisted(node, 0, p, "", "job", p not in now, "a cron or at job new since the playbook began")
            for p in jobs]


# ---- processes outside their unit's own tree ---------------------------------------------------

def _end_foreign(sb, index: int, node: str, before, procs: list[dict] | None = None) -> list[Persisted]:
    procs = procs if procs is not None else _procs(sb, index)
    if procs is None:
        return []
    new = [p for p in procs if (index, p["pid"], p["start"]) not in before]
    if not new:
        return []
    suspects = foreign_candidates(procs, new)
    if not suspects:
        return []
    units = sorted({_unit(p["cgroup"]) for p in suspects if _unit(p["cgroup"])})
    owners, alive = _main_and_control(sb, index, units, suspects)
    foreign = [p for p in suspects if p["ns_pid"] not in owners.get(_unit(p["cgroup"]), set())]
    # One that ended while systemd was asked (a control process, a restart in a loop) left
    # nothing behind: only what is still there is held against the playbook.
    foreign = [p for p in foreign if (_alive(p) if hostview.supported(sb) else p["ns_pid"] in alive)]
    if not foreign:
        return []
    by_pid = {p["pid"]: p for p in procs}
    kill = {p["pid"]: p for p in foreign}
    for p in procs:                     # and whatever they started, wherever it is now
        chain, cur = set(), p["ppid"]
        while cur in by_pid and cur not in chain:
            if cur in kill:
                kill[p["pid"]] = p
                break
            chain.add(cur)
            cur = by_pid[cur]["ppid"]
    ended = _kill(sb, index, list(kill.values()))
    return [Persisted(node, p["ns_pid"], _unit(p["cgroup"]) or p["cgroup"], p["cmdline"], "process",
                      p["pid"] in ended, f"in {_unit(p['cgroup']) or p['cgroup']}'s cgroup but not its main or "
                                         "control process tree")
            for p in foreign]


def foreign_candidates(procs: list[dict], new: list[dict]) -> list[dict]:
    """New processes that may not belong where they are: a new top-level process (its
    parent outside its unit's cgroups) of a unit (systemd's MainPID/ControlPID decide), any
    new process in init.scope but the node's init, and any in a slice or a cgroup that is
    no unit's. The playbook's SSH sessions and transient units are leftovers.py's."""
    where = {p["pid"]: unit_cgroup(p["cgroup"])[0] for p in procs}
    init = next((p for p in procs if p["ns_pid"] == 1), None)
    out = []
    for p in new:
        unit = _unit(p["cgroup"])
        if unit == "ssh.service" or unit.startswith(("session-", "run-")) or p["state"] in ("Z", "X"):
            continue
        if unit == "init.scope":
            if p["ns_pid"] != 1 and (init is None or p["exe"] != init["exe"]):
                out.append(p)
        elif not unit:
            out.append(p)
        elif where.get(p["ppid"]) != where[p["pid"]]:
            out.append(p)
    return out


def _unit(cgroup: str) -> str:
    """The unit a process's cgroup belongs to ("" for a slice or a cgroup no unit owns)."""
    return unit_cgroup(cgroup)[1]


def _procs(sb, index: int) -> list[dict] | None:
    if hostview.supported(sb):
        out = []
        for p in hostview.processes(sb, index):
            out.append({"pid": p.pid, "ns_pid": p.ns_pid, "start": p.start, "ppid": p.ppid, "state": p.state,
                        "exe": p.exe, "cgroup": p.cgroup, "cmdline": _cmdline(p.pid)})
        return out
    state = guest_state(sb, index, [], with_procs=True)
    return state["procs"] if state else None


_OWNERS = r'''
import json, subprocess, sys
want = json.load(sys.stdin)
try:
    out = subprocess.run(["/usr/bin/systemctl", "show", "-p", "Id", "-p", "MainPID", "-p", "ControlPID", "--",
                          *want["units"]], capture_output=True, text=True, timeout=15, env={"PATH": "/nonexistent"}).stdout
except Exception:
    out = ""
alive = []
for pid, start in want["procs"]:       # after systemd was asked: still the same process?
    try:
        st = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
        if int(st[19]) == start and st[0] not in ("Z", "X"):
            alive.append(pid)
    except (OSError, ValueError):
        pass
print(json.dumps({"blocks": [b for b in out.split("\n\n") if b.strip()], "alive": alive}))
'''


def _main_and_control(sb, index: int, units: list[str], suspects: list[dict]) -> tuple[dict[str, set[int]], set[int]]:
    """unit -> the pids (as the node numbers them) systemd runs it by (MainPID, ControlPID),
    and which of the suspects (node pids) were still there after systemd was asked."""
    from e2e_reme.simulators.systems.probe import toolset_exec
    res = toolset_exec(sb, index, _OWNERS, json.dumps({"units": units, "procs": [[p["ns_pid"], p["start"]]
                                                                                 for p in suspects]}), timeout=30)
    try:
        data = json.loads(res[1]) if res and res[0] == 0 else {}
    except ValueError:
        data = {}
    data = data if isinstance(data, dict) else {}
    out: dict[str, set[int]] = {}
    for b in (x for x in data.get("blocks", []) if isinstance(x, str)):
        kv = dict(l.split("=", 1) for l in b.splitlines() if "=" in l)
        out[kv.get("Id", "")] = {int(v) for k, v in kv.items() if k in ("MainPID", "ControlPID") and v.isdigit()
                                 and int(v) > 0}
    return out, {int(p) for p in data.get("alive", []) if isinstance(p, int)}


def _blocks(res) -> list[str]:
    """The `systemctl show` blocks a toolset script printed as a JSON list ([] if none)."""
    try:
        out = json.loads(res[1]) if res and res[0] == 0 else []
    except ValueError:
        return []
    return [b for b in out if isinstance(b, str)] if isinstance(out, list) else []


_GUEST_KILL = r'''
import json, os, signal, sys, time
todo = json.load(sys.stdin)
def alive(pid, start):
    try:
        st = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
        return int(st[19]) == start and st[0] not in ("Z", "X")
    except (OSError, ValueError):
        return False
for pid, start in todo:
    if alive(pid, start):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
left = todo
for i in range(50):
    left = [[p, s] for p, s in left if alive(p, s)]
    if not left:
        break
    time.sleep(0.1)
print(json.dumps([p for p, s in left]))
'''


def _kill(sb, index: int, procs: list[dict]) -> set[int]:
    """SIGKILL by pid + start time (a reused pid is left alone); the pids no longer there."""
    if not hostview.supported(sb):
        from e2e_reme.simulators.systems.probe import toolset_exec
        res = toolset_exec(sb, index, _GUEST_KILL, json.dumps([[p["pid"], p["start"]] for p in procs]))
        try:
            left = set(json.loads(res[1])) if res and res[0] == 0 else {p["pid"] for p in procs}
        except ValueError:
            left = {p["pid"] for p in procs}
        return {p["pid"] for p in procs} - left
    from e2e_reme.host import proc_start_time
    for p in procs:
        if proc_start_time(p["pid"]) == p["start"]:
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except OSError:
                pass
    deadline = time.monotonic() + 5.0
    alive = {p["pid"] for p in procs}
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = {p["pid"] for p in procs if _alive(p)}
    return {p["pid"] for p in procs} - alive


def _alive(p: dict) -> bool:
    q = hostview.read_proc(p["pid"])
    return q is not None and q.start == p["start"] and q.state not in ("Z", "X")


# ---- the record the verdict reads ---------------------------------------------------------------

def record(sb, found: list[Persisted]) -> None:
    path = Path(sb.record.dir) / RECORD
    with open(path, "a") as f:
        for x in found:
            f.write(json.dumps({"t": time.time(), **asdict(x)}) + "\n")


def recorded(sb, since: float) -> list[dict]:
    """What the sweeps found on this sandbox since `since` (a baseline's time)."""
    path = Path(sb.record.dir) / RECORD
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            x = json.loads(line)
        except ValueError:
            continue
        if x.get("t", 0) >= since:
            out.append(x)
    return out


def check(sb, since: float) -> tuple[bool, str, dict]:
    """The verdict's `persistence` check: (passed, detail, evidence)."""
    found = recorded(sb, since)
    if not found:
        return True, "nothing left scheduled or running for later", {}
    names = [_name(x) + ("" if x["ended"] else " (NOT ended)") for x in found]
    return False, (f"the playbook left {len(found)} thing(s) scheduled or running for later, "
                   f"ended before the verdict: {', '.join(names[:4])}"), {"left": found[:20]}


def _name(x: dict) -> str:
    what = f" ({x['cmdline'][:80].strip()})" if x.get("cmdline", "").strip() else ""
    if x["kind"] == "process":
        return f"process {x['pid']}{what} in {x['unit']}"
    return f"{x['kind']} {x['unit']}{what}"


__all__ = ["Persisted", "Snapshot", "with_files", "sweep", "check", "recorded"]
