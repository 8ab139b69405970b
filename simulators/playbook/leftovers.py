"""Processes a playbook left running in the nodes, ended before the verdict.

A playbook that times out (or one that simply backgrounds something: `nohup sleep 3600 &`,
`setsid -f`, `systemd-run`) leaves processes in the nodes that would otherwise run on
until the next reset, and could keep working on the system while it is being judged. So
around every execution of model output the pipeline takes a snapshot of the nodes'
processes and afterwards ends every *new* process that belongs to an SSH session or to a
transient unit (what `systemd-run` makes), never one of a unit that was installed before
(a service the playbook restarted is the fix, not a leftover) and never one that existed
before the run (the injected fault's processes: ending them is the playbook's job).

nspawn: read from the host, from the node's cgroups and /proc (the node cannot hide from
it), and killed from the host. libvirt: the same rules run inside the guest by the
image's own Python with `-I -S` (no site hooks, no PYTHON* environment), the only view of
a VM's processes there is.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from e2e_reme.host import proc_start_time
from e2e_reme.simulators.sandbox.nodefs import NodeTree

Snapshot = frozenset  # of (node index, pid, start time)


@dataclass(frozen=True)
class Leftover:
    node: str
    pid: int
    unit: str          # the cgroup's last component: ssh.service, session-3.scope, run-u7.service
    cmdline: str


def snapshot(sb) -> Snapshot:
    """Every process of every node now, as (node, pid, start time), with each node's unit
    and job files (persistence.with_files: what the run adds there is ended too)."""
    from e2e_reme.simulators.verification.persistence import with_files
    if sb.backend == "nspawn":
        procs = frozenset((i, pid, start) for i in range(len(sb.nodes)) for pid, start, _ in _nspawn_procs(sb, i))
    else:
        procs = frozenset((i, pid, start) for i in range(len(sb.nodes)) for pid, start in _guest_procs(sb, i))
    return with_files(sb, procs)


def end_leftovers(sb, before: Snapshot) -> list[Leftover]:
    """Kill (SIGKILL) every process started since `before` in an SSH session or a
    transient unit; return what was ended. First, what the run left for later (new units
    and timers, processes written into a unit's cgroup, cron and at jobs) is ended and
    recorded for the verdict (simulators/verification/persistence.py)."""
    from e2e_reme.simulators.verification.persistence import sweep
    ended: list = list(sweep(sb, before))
    for i, node in enumerate(sb.nodes):
        if sb.backend == "nspawn":
            ended += _end_nspawn(sb, i, node.name, before)
        else:
            ended += [Leftover(node.name, *x) for x in _guest_kill(sb, i, before)]
    return ended


def _end_nspawn(sb, index: int, node: str, before: Snapshot, passes: int = 20) -> list[Leftover]:
    """Pass after pass until one finds nothing new: a process still forking (a fork flood
    retrying at its pids limit) makes children after a pass has listed the cgroup."""
    ended: list[Leftover] = []
    killed: set[tuple[int, int]] = set()
    for _ in range(passes):
        fresh = [(pid, start, cg) for pid, start, cg in _nspawn_procs(sb, index)
                 if (index, pid, start) not in before and (pid, start) not in killed
                 and _session_or_transient(pid, cg)]
        if not fresh:
            break
        for pid, start, cg in fresh:
            killed.add((pid, start))
            cmdline = _cmdline(pid)           # before the kill: a killed process's cmdline reads empty
            if _kill_host_pid(pid, start):
                ended.append(Leftover(node, pid, cg.rsplit("/", 1)[-1], cmdline))
    # SIGKILL is delivered, not yet done: wait (briefly) until they have left the node, so
    # that what is judged next no longer sees them.
    deadline = time.monotonic() + 5.0
    while killed and time.monotonic() < deadline:
        if not any((pid, start) in killed for pid, start, _ in _nspawn_procs(sb, index)):
            break
        time.sleep(0.1)
    return ended


# ---- nspawn: from the host -----------------------------------------------------------------

def _nspawn_procs(sb, index: int) -> list[tuple[int, int, str]]:
    """(pid, start time, systemd cgroup path) of the node's processes."""
    from e2e_reme.simulators.sandbox.backends.nspawn import _cgroup_pids, _machine
    out = []
    for pid in _cgroup_pids(_machine(sb.record.number, index)):
        start = proc_start_time(pid)
        cg = _systemd_cgroup(pid)
        if start is not None and cg is not None:
            out.append((pid, start, cg))
    return out


def _systemd_cgroup(pid: int) -> str | None:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    paths = {}
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        paths[ctrls] = path
    return paths.get("name=systemd") or paths.get("")


def _session_or_transient(pid: int, cgroup: str) -> bool:
    unit = cgroup.rstrip("/").rsplit("/", 1)[-1]
    if unit == "ssh.service" or unit.startswith(("session-", "run-")):
        return True
    # Any other transient unit (systemd-run --unit=NAME): its definition lives in the
    # node's /run, read through the process's own root without leaving it (a plain path
    # lookup there would follow the node's links into the host's tree).
    if "/" in unit or unit in ("", ".", ".."):
        return False
    try:
        with NodeTree.of_process(pid) as tree:
            return tree.lstat(f"/run/systemd/transient/{unit}") is not None
    except OSError:
        return False


def _kill_host_pid(pid: int, start: int) -> bool:
    if proc_start_time(pid) != start:      # gone, or the pid was reused
        return False
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:300]
    except OSError:
        return ""


# ---- libvirt: inside the guest ----------------------------------------------------------------

_GUEST_PROCS = r"""
import os, json, sys
out = []
me = {os.getpid(), os.getppid()}
for p in os.listdir('/proc'):
    if not p.isdigit() or int(p) in me: continue
    try:
        st = open('/proc/%s/stat' % p).read()
        start = int(st.rsplit(')', 1)[1].split()[19])
        cg = open('/proc/%s/cgroup' % p).read().splitlines()
        cmd = open('/proc/%s/cmdline' % p, 'rb').read().replace(b'\0', b' ').decode(errors='replace')[:300]
    except OSError:
        continue
    paths = dict((l.split(':', 2)[1], l.split(':', 2)[2]) for l in cg if l.count(':') >= 2)
    out.append([int(p), start, paths.get('name=systemd') or paths.get('', ''), cmd])
print(json.dumps(out))
"""

_GUEST_KILL = r"""
import os, json, sys, signal
todo = json.loads(sys.stdin.read())
done = []
for pid, start, unit, cmd in todo:
    try:
        st = open('/proc/%d/stat' % pid).read()
        if int(st.rsplit(')', 1)[1].split()[19]) != start: continue
        os.kill(pid, signal.SIGKILL)
        done.append([pid, unit, cmd])
    except OSError:
        pass
print(json.dumps(done))
"""


def _guest_list(sb, index: int) -> list:
    r = sb.exec(["/usr/bin/python3", "-I", "-S", "-c", _GUEST_PROCS], node=index, timeout=30)
    try:
        return json.loads(r.stdout) if r.rc == 0 else []
    except ValueError:
        return []


def _guest_procs(sb, index: int) -> list[tuple[int, int]]:
    return [(p[0], p[1]) for p in _guest_list(sb, index)]


def _guest_kill(sb, index: int, before: Snapshot) -> list[tuple[int, str, str]]:
    todo = []
    for pid, start, cg, cmd in _guest_list(sb, index):
        unit = cg.rstrip("/").rsplit("/", 1)[-1]
        if (index, pid, start) in before:
            continue
        if unit == "ssh.service" or unit.startswith(("session-", "run-")):
            todo.append([pid, start, unit, cmd])
    if not todo:
        return []
    # Our own SSH session is in ssh.service too: the script skips itself and its parent,
    # and the session's sshd processes die with the connection anyway.
    r = sb.exec(["/usr/bin/python3", "-I", "-S", "-c", _GUEST_KILL], node=index, timeout=30,
                input=json.dumps(todo))
    try:
        return [tuple(x) for x in json.loads(r.stdout)] if r.rc == 0 else []
    except ValueError:
        return []


__all__ = ["snapshot", "end_leftovers", "Leftover"]
