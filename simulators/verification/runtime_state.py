"""What a node runs on besides its files: its mount table, every directory systemd loads
units and drop-ins from, the scheduler spools, and the cgroup every process is in. The
verdict's `runtime` check compares these with the baseline (issue 28, families 3 and 4).

Why each one: a bind mount over a drop-in, a tool (`systemctl`) or a library changes what
systemd or the service reads without changing a file on disk; a tmpfs stacked over a data
dir hides what is under it; a drop-in under `/run/systemd/transient/` outranks one under
`/etc`; a unit or timer under `/run` is not in the overlay's upper layer at all; a process
written into a service's cgroup lives inside the service and dies with nothing the
playbook did.

Read how: on nspawn from the host only. The mount tables are the kernel's
(`/proc/<node init>/mountinfo`, and that of each service's main process where it has its
own mount namespace); unit files are read through the node's root by `nodefs.NodeTree`
(the same view systemd has, mounts included, no link followed out); cgroups are the
host's `/proc/<pid>/cgroup` of every process in the node's cgroups. Nothing of the node
runs. On libvirt the guest is asked by the verifier's toolset (`GUEST_SCRIPT`, the image's
`/usr/bin/python3 -I -S`, as for the other runtime facts): the same shape, trusted as far
as docs/verdict.md says a guest can be.

`node_state()` reads one node; `compare()` returns the problems and evidence against the
baseline, after the changes the fix table allows for the injected faults (`allowances`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass

from e2e_reme.simulators.sandbox import hostview
from e2e_reme.simulators.sandbox.nodefs import NodeTree, WalkLimits

# Every directory the system manager reads unit files and drop-ins from, in systemd's
# order of precedence (systemd.unit(5)), and the user manager's; its own configuration.
UNIT_DIRS = ("/etc/systemd/system.control", "/run/systemd/system.control", "/run/systemd/transient",
             "/run/systemd/generator.early", "/etc/systemd/system", "/etc/systemd/system.attached",
             "/run/systemd/system", "/run/systemd/system.attached", "/run/systemd/generator",
             "/usr/local/lib/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system",
             "/run/systemd/generator.late",
             "/etc/systemd/user", "/run/systemd/user", "/usr/local/lib/systemd/user", "/usr/lib/systemd/user",
             "/etc/systemd/system.conf.d", "/run/systemd/system.conf.d", "/usr/lib/systemd/system.conf.d",
             "/etc/systemd/user.conf.d", "/etc/systemd/system.conf", "/etc/systemd/user.conf")
# Where cron and at keep their jobs (the image runs neither; a playbook that installs one
# and leaves a job is still caught). Left out of the upper-layer manifest as volatile.
SPOOL_DIRS = ("/var/spool/cron", "/var/spool/at", "/var/spool/anacron", "/etc/cron.d", "/etc/crontab",
              "/etc/cron.hourly", "/etc/cron.daily", "/etc/cron.weekly", "/etc/cron.monthly")
# Content-hashed below these (small, and not all in the overlay's upper layer); elsewhere
# (/usr, /lib: the image's own units, changed only through the upper layer, which the
# runtime check hashes) a stat signature.
HASHED = ("/etc/", "/run/", "/var/")
FILE_LIMIT = 256 << 10
WALK = WalkLimits(max_entries=20_000, max_seconds=5.0, max_depth=8)
MOUNTINFO_LIMIT = 4 << 20
# Transient units systemd makes for logins, never a playbook's doing.
VOLATILE_UNIT_FILES = ("/run/systemd/transient/session-*.scope", "/run/systemd/transient/user-*.slice")
# Mounts systemd makes for a service's credentials when it starts (a timer's unit may).
# binfmt_misc is an automount a VM's systemd mounts at the first access.
VOLATILE_MOUNTS = (("/run/credentials/*", "ramfs"), ("/proc/sys/fs/binfmt_misc", "binfmt_misc"),
                   ("/proc/sys/fs/binfmt_misc", "autofs"))


# ---- reading (nspawn: from the host) -------------------------------------------------------

def node_state(sb, node: int, units: list[str]) -> dict | None:
    """The state of one node, read from the host (nspawn) or by the guest toolset (libvirt);
    None if it cannot be read (no init, no answer)."""
    if not hostview.supported(sb):
        return guest_state(sb, node, units)
    procs = hostview.processes(sb, node)
    init = next((p for p in procs if p.ns_pid == 1 and p.pid != 1), None)
    if init is None:
        return None
    notes: list[str] = []
    mounts = mount_table(_read_proc(init.pid, "mountinfo"), notes)
    service_mounts = {}
    init_ns = _mnt_ns(init.pid)
    for unit in units:
        main = _main(procs, unit)
        if main is not None and _mnt_ns(main.pid) not in (None, init_ns):
            service_mounts[unit] = mount_table(_read_proc(main.pid, "mountinfo"), notes)
    try:
        with NodeTree.of_process(init.pid) as tree:
            files = manifest(tree, UNIT_DIRS + SPOOL_DIRS, notes)
    except OSError as e:
        return None if not os.path.exists(f"/proc/{init.pid}") else {"unreadable": str(e)}
    prefix = init.cgroup.rsplit("/", 1)[0] if init.cgroup.endswith("/init.scope") else ""
    census = cgroup_census([(p.pid, p.ns_pid, p.ppid, p.state, p.exe, _rel(p.cgroup, prefix)) for p in procs
                            if p.pid != init.ppid])
    return {"mounts": mounts, "service_mounts": service_mounts, "files": files, "cgroups": census,
            "notes": notes}


def _read_proc(pid: int, what: str) -> bytes | None:
    try:
        fd = os.open(f"/proc/{pid}/{what}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks, left = [], MOUNTINFO_LIMIT
        while left > 0:
            b = os.read(fd, min(left, 1 << 16))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _main(procs, unit: str):
    """The unit's main process as the host sees it: the oldest process of its cgroup whose
    parent is outside it."""
    mine = hostview.unit_processes(procs, unit)
    pids = {p.pid for p in mine}
    tops = sorted((p for p in mine if p.ppid not in pids and p.state not in ("Z", "X")), key=lambda p: p.start)
    return tops[0] if tops else None


def _rel(cgroup: str, prefix: str) -> str:
    return cgroup[len(prefix):] or "/" if prefix and cgroup.startswith(prefix) else cgroup


def mount_table(raw: bytes | None, notes: list[str]) -> list[list[str]]:
    """[mount point, what is mounted there] in mount order (later ones on top), from a
    mountinfo text: what, where from, the mount's and the filesystem's options; not the
    ids, which change with every namespace."""
    if raw is None:
        notes.append("a mount table could not be read")
        return []
    if len(raw) >= MOUNTINFO_LIMIT:
        notes.append(f"a mount table is longer than {MOUNTINFO_LIMIT} bytes")
    out = []
    for line in raw.decode(errors="replace").splitlines():
        left, sep, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if not sep or len(f) < 6 or len(r) < 2:
            continue
        root = _PRIVATE.sub("systemd-private-*-", f[3])    # PrivateTmp's per-start name
        out.append([f[4], " ".join([root, r[0], r[1], f[5], r[2] if len(r) > 2 else ""])])
    return out


_PRIVATE = re.compile(r"systemd-private-[0-9a-f]{32}-")


def manifest(tree, tops: tuple[str, ...], notes: list[str]) -> dict[str, str]:
    """node path -> what it is, for every file, link or other entry (not directories) under
    the given directories (or the file itself), as the node's processes see them."""
    out: dict[str, str] = {}
    seen: set[tuple[int, int]] = set()
    for top in tops:
        st = tree.stat(top)
        if st is None or (st.st_dev, st.st_ino) in seen:
            continue            # absent, or the same directory by another name (/lib -> usr/lib)
        seen.add((st.st_dev, st.st_ino))
        if not stat.S_ISDIR(st.st_mode):
            out[top] = _describe(tree, top, tree.lstat(top) or st)
            continue
        for path, est in tree.walk(top, WALK):
            if not stat.S_ISDIR(est.st_mode):
                out[path] = _describe(tree, path, est)
        if tree.truncated:
            notes.append(tree.truncated)
            out[top + "/..."] = "truncated: " + tree.truncated
    return out


def _describe(tree, path: str, st: os.stat_result) -> str:
    mode = f"{stat.S_IMODE(st.st_mode):o}"
    if stat.S_ISLNK(st.st_mode):
        return "l:" + (tree.readlink(path) or "?")
    if stat.S_ISREG(st.st_mode):
        if path.startswith(HASHED) and st.st_size <= FILE_LIMIT:
            return f"f:{tree.hash_entry(path, FILE_LIMIT)}:{mode}"
        return f"f:size={st.st_size},mtime={st.st_mtime_ns},ino={st.st_ino}:{mode}"
    return f"o:{st.st_mode:o}"


UNIT_SUFFIXES = (".service", ".timer", ".socket", ".path", ".mount", ".automount", ".swap", ".target",
                 ".scope", ".slice")


def unit_cgroup(cgroup: str) -> tuple[str, str]:
    """(the cgroup of the unit a process is in, that unit): the deepest component that names
    a unit other than a slice, so that the cgroups a unit with Delegate= makes below its
    own (udevd's `udev`) count as the unit's. A process in a slice or in a cgroup no unit
    owns gives (its cgroup, "")."""
    parts = cgroup.rstrip("/").split("/")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].endswith(UNIT_SUFFIXES) and not parts[i].endswith(".slice"):
            return "/".join(parts[:i + 1]), parts[i]
    return cgroup, ""


def cgroup_census(procs) -> dict[str, dict]:
    """unit cgroup (node-relative, `unit_cgroup`) -> its processes: how many, and the 'tops'
    (those whose parent is not in the same unit: its main process, or something put there
    from outside) as [ns pid, executable]. procs: (host pid, ns pid, parent host pid, state,
    exe, cgroup)."""
    procs = [(pid, ns, ppid, state, exe, unit_cgroup(cg)[0]) for pid, ns, ppid, state, exe, cg in procs]
    where = {pid: cg for pid, _, _, _, _, cg in procs}
    out: dict[str, dict] = {}
    for pid, ns_pid, ppid, state, exe, cg in procs:
        if state in ("Z", "X"):
            continue
        c = out.setdefault(cg, {"procs": 0, "tops": []})
        c["procs"] += 1
        if where.get(ppid) != cg:
            c["tops"].append([ns_pid, exe])
    for c in out.values():
        c["tops"].sort(key=lambda t: t[0])
    return out


# ---- the guest's view (libvirt), by the verifier's toolset ----------------------------------

GUEST_SCRIPT = r'''
import hashlib, json, os, re, stat, subprocess, sys
want = json.load(sys.stdin)
notes = []
def rd(p, limit=4 << 20):
    try:
        with open(p, "rb") as f:
            return f.read(limit)
    except OSError:
        return None
def mounts(raw):
    out = []
    if raw is None:
        notes.append("a mount table could not be read")
        return out
    for line in raw.decode(errors="replace").splitlines():
        left, sep, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if sep and len(f) >= 6 and len(r) >= 2:
            root = re.sub(r"systemd-private-[0-9a-f]{32}-", "systemd-private-*-", f[3])
            out.append([f[4], " ".join([root, r[0], r[1], f[5], r[2] if len(r) > 2 else ""])])
    return out
def sha(p, limit):
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return hashlib.sha256(os.read(fd, limit)).hexdigest()
    finally:
        os.close(fd)
def describe(p, st):
    mode = "%o" % stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        try:
            return "l:" + os.readlink(p)
        except OSError:
            return "l:?"
    if stat.S_ISREG(st.st_mode):
        if p.startswith(tuple(want["hashed"])) and st.st_size <= want["file_limit"]:
            return "f:%s:%s" % (sha(p, want["file_limit"]), mode)
        return "f:size=%d,mtime=%d,ino=%d:%s" % (st.st_size, st.st_mtime_ns, st.st_ino, mode)
    return "o:%o" % st.st_mode
files, seen, count = {}, set(), 0
for top in want["tops"]:
    try:
        st = os.stat(top)
    except OSError:
        continue
    if (st.st_dev, st.st_ino) in seen:
        continue
    seen.add((st.st_dev, st.st_ino))
    if not stat.S_ISDIR(st.st_mode):
        files[top] = describe(top, os.lstat(top))
        continue
    for dirpath, dirs, names in os.walk(top):
        for n in names + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            count += 1
            if count > want["max_entries"]:
                break
            p = os.path.join(dirpath, n)
            try:
                files[p] = describe(p, os.lstat(p))
            except OSError:
                pass
me = {os.getpid(), os.getppid()}
procs = []
for p in os.listdir("/proc"):
    if not p.isdigit() or int(p) in me:
        continue
    try:
        st = open("/proc/%s/stat" % p).read().rsplit(")", 1)[1].split()
        cg = open("/proc/%s/cgroup" % p).read().splitlines()
        exe = os.readlink("/proc/%s/exe" % p) if int(p) != 2 else None
        cmd = open("/proc/%s/cmdline" % p, "rb").read(300).replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        continue
    paths = dict((l.split(":", 2)[1], l.split(":", 2)[2]) for l in cg if l.count(":") >= 2)
    procs.append([int(p), int(p), int(st[1]), st[0], exe, paths.get("name=systemd") or paths.get("", ""),
                  int(st[19]), cmd])
try:
    init_ns = os.readlink("/proc/1/ns/mnt")
except OSError:
    init_ns = None
    notes.append("the mount namespace of pid 1 cannot be read")
svc = {}
for u in want["units"]:
    try:
        pid = int(subprocess.run([want["systemctl"], "show", "-pMainPID", "--value", u], capture_output=True,
                                 text=True, timeout=10, env={"PATH": "/nonexistent"}).stdout.strip() or 0)
        if pid and os.readlink("/proc/%d/ns/mnt" % pid) != init_ns:
            svc[u] = mounts(rd("/proc/%d/mountinfo" % pid))
    except Exception:
        pass
print(json.dumps({"mounts": mounts(rd("/proc/1/mountinfo")), "service_mounts": svc, "files": files,
                  "procs": procs, "notes": notes}))
'''
GUEST_SHA256 = hashlib.sha256(GUEST_SCRIPT.encode()).hexdigest()


def guest_state(sb, node: int, units: list[str], timeout: float = 60, *, with_procs: bool = False) -> dict | None:
    """node_state read by the guest toolset; `with_procs`: also its processes as
    persistence reads them (pid, start, ppid, state, exe, cgroup, cmdline)."""
    from e2e_reme.simulators.systems.probe import toolset_exec
    want = {"tops": list(UNIT_DIRS + SPOOL_DIRS), "hashed": list(HASHED), "file_limit": FILE_LIMIT,
            "max_entries": WALK.max_entries, "units": units, "systemctl": "/usr/bin/systemctl"}
    res = toolset_exec(sb, node, GUEST_SCRIPT, json.dumps(want), timeout)
    if res is None or res[0] != 0:
        return None
    try:
        data = json.loads(res[1])
    except ValueError:
        return None
    procs = [tuple(p) for p in data.pop("procs")]
    # Kernel threads (kthreadd, pid 2, and its children) are in no unit: not the node's doing.
    procs = [p for p in procs if p[0] != 2 and p[2] != 2]
    data["cgroups"] = cgroup_census([p[:6] for p in procs])
    if with_procs:
        data["procs"] = [{"pid": p[0], "ns_pid": p[0], "start": p[6], "ppid": p[2], "state": p[3], "exe": p[4],
                          "cgroup": p[5], "cmdline": p[7]} for p in procs]
    data["toolset"] = GUEST_SHA256
    return data


# ---- what a fix may change (from the fix table) ----------------------------------------------

@dataclass(frozen=True)
class MountAllowance:
    """Mounts a fault made at `point` that a fix may leave (as they are, or remounted): at
    most `count`, each of `fstype` (if given) or binding `root` (if given). Node paths may
    use the target's `{data_dir}`."""
    point: str
    count: int = 1
    fstype: str | None = None
    root: str | None = None


def allowances(faults) -> tuple[list[MountAllowance], tuple[str, ...]]:
    """The mounts the injected faults made that a fix may leave, and the files of theirs it
    may change (their footprint: a drop-in edited or removed), per the fix table."""
    from e2e_reme.simulators.verification.fixtable import row
    mounts, paths = [], []
    for f in _leaves(faults):
        try:
            r = row(f.name)
        except StopIteration:
            continue
        data_dir = f.target.data_dir.rstrip("/")
        for m in r.mounts_left:
            mounts.append(MountAllowance(m.point.replace("{data_dir}", data_dir), m.count, m.fstype,
                                         m.root.replace("{data_dir}", data_dir) if m.root else None))
        paths += list(f.footprint()) if hasattr(f, "footprint") else []
    return mounts, tuple(paths)


def _leaves(faults):
    for f in faults:
        parts = getattr(f, "parts", None)
        if parts:
            yield from _leaves(parts)
        else:
            yield f


# ---- the comparison -----------------------------------------------------------------------

def compare(base: dict | None, now: dict | None, mounts_ok: list[MountAllowance] = (),
            paths_ok: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    """(problems, evidence) of a node's state now against its baseline."""
    if not base:
        return [], {}
    if not now or "unreadable" in now:
        return ["its mounts, unit files and cgroups cannot be read" + (f": {now['unreadable']}" if now else "")], {}
    problems, evidence = [], {}
    m = mount_changes(base["mounts"], now["mounts"], mounts_ok)
    for unit, table in {**base.get("service_mounts", {}), **now.get("service_mounts", {})}.items():
        sm = mount_changes(base.get("service_mounts", {}).get(unit, base["mounts"]),
                           now.get("service_mounts", {}).get(unit, now["mounts"]), mounts_ok)
        m.update({f"{unit}: {p}": v for p, v in sm.items() if p not in m})
    if m:
        evidence["mounts"] = dict(sorted(m.items())[:20])
        problems.append(f"the mount table changed at {', '.join(sorted(m)[:3])}")
    f = file_changes(base["files"], now["files"], paths_ok)
    if f:
        evidence["unit_files"] = dict(sorted(f.items())[:40])
        problems.append(f"{len(f)} unit, drop-in or job file(s) changed: {', '.join(sorted(f)[:3])}")
    c = cgroup_changes(base["cgroups"], now["cgroups"], _on_demand_units(base["files"]))
    if c:
        evidence["cgroups"] = dict(sorted(c.items())[:20])
        problems.append(f"processes where the baseline had none: {', '.join(sorted(c)[:3])}")
    if now.get("notes"):
        evidence["notes"] = now["notes"][:10]
        if any("truncated" in v for v in now["files"].values() if isinstance(v, str)):
            problems.append("a unit directory could not be read whole: " + now["notes"][0])
    return problems, evidence


def mount_changes(base: list, now: list, allowed: list[MountAllowance] = ()) -> dict[str, dict]:
    """mount point -> {baseline, now} for every point whose stack of mounts changed, less
    the changes allowed (a fault's mount left or remounted) and systemd's own."""
    by_point: dict[str, tuple[list, list]] = {}
    for point, what in base:
        by_point.setdefault(point, ([], []))[0].append(what)
    for point, what in now:
        by_point.setdefault(point, ([], []))[1].append(what)
    out = {}
    for point, (then, cur) in by_point.items():
        if then == cur or _volatile_mount(point, then, cur):
            continue
        added = list(cur)
        for w in then:
            if w in added:
                added.remove(w)
        removed = [w for w in then if w not in cur]
        if not removed and _allowed_mounts(point, added, allowed):
            continue
        out[point] = {"baseline": then, "now": cur}
    return out


def _volatile_mount(point: str, then: list, cur: list) -> bool:
    return any(fnmatch.fnmatch(point, pat) and all(w.split(" ")[1] == fs for w in then + cur)
               for pat, fs in VOLATILE_MOUNTS)


def _allowed_mounts(point: str, added: list[str], allowed: list[MountAllowance]) -> bool:
    """Whether every mount added at `point` is one a fault's allowance covers (two faults
    on one data dir each cover their own)."""
    left = {i: a.count for i, a in enumerate(allowed) if a.point.rstrip("/") == point}
    for w in added:
        root, fstype = w.split(" ")[:2]
        fit = next((i for i, n in left.items() if n > 0 and (allowed[i].fstype in (None, fstype))
                    and (allowed[i].root in (None, root))), None)
        if fit is None:
            return False
        left[fit] -= 1
    return True


def file_changes(base: dict, now: dict, allowed: tuple[str, ...] = ()) -> dict[str, dict]:
    out = {}
    for path in set(base) | set(now):
        if base.get(path) == now.get(path):
            continue
        if any(fnmatch.fnmatch(path, pat) for pat in VOLATILE_UNIT_FILES):
            continue
        if any(path == a or (a.endswith("/") and path.startswith(a)) for a in allowed):
            continue
        out[path] = {"baseline": base.get(path, "absent"), "now": now.get(path, "absent")}
    return out


def _on_demand_units(files: dict) -> set[str]:
    """Units of the image that start by themselves or on a mere query, never the playbook's
    doing: what its own timers (enabled at baseline) start, and systemd's own daemons from
    the image (`systemd-*.service` under /usr/lib: `timedatectl` starts timedated over
    D-Bus). They run the image's binaries on the image's configuration, which the runtime
    check compares anyway."""
    out = set()
    for path in files:
        parent, _, name = path.rpartition("/")
        if parent.endswith("/timers.target.wants") and name.endswith(".timer"):
            out.add(name[:-len(".timer")] + ".service")
        elif parent in ("/usr/lib/systemd/system", "/lib/systemd/system") and name.startswith("systemd-") \
                and name.endswith(".service") and "@" not in name:
            out.add(name)
    return out


def cgroup_changes(base: dict, now: dict, volatile_units: set[str] = frozenset()) -> dict[str, dict]:
    """cgroup -> what is wrong there: processes in a cgroup that had none at baseline (a
    unit the playbook started or made, a hand-made cgroup), more top-level processes than at
    baseline (something written into a unit's cgroup from outside), or anything but PID 1
    in init.scope."""
    out = {}
    for cg, c in now.items():
        unit = cg.rstrip("/").rsplit("/", 1)[-1]
        if unit.startswith("session-") or unit in volatile_units:
            continue
        then = base.get(cg)
        if cg.endswith("/init.scope"):
            if c["procs"] > max(1, then["procs"] if then else 1):
                out[cg] = {"why": "processes besides the node's init in init.scope", "procs": c["procs"],
                           "tops": c["tops"][:10]}
            continue
        if not then or not then["procs"]:
            out[cg] = {"why": "processes in a cgroup that had none at baseline", "procs": c["procs"],
                       "tops": c["tops"][:10]}
        elif len(c["tops"]) > len(then["tops"]):
            out[cg] = {"why": "more processes outside the unit's own process tree than at baseline",
                       "baseline": then["tops"][:10], "now": c["tops"][:10]}
    return out


__all__ = ["node_state", "compare", "allowances", "MountAllowance", "UNIT_DIRS", "SPOOL_DIRS"]
