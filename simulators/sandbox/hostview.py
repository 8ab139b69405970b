"""Ground truth of an nspawn node read from the host, with the host's own Python: the
node's processes (by the container's cgroups, never by a list the node prints), their
`/proc` facts (executable, start time, state, cgroup, environment, mapped libraries),
its files through its own mount namespace (symlinks resolved inside the node's root),
and the overlay's upper layer: every file the node has changed since its last reset.

Nothing here runs a binary or loads a library from inside the node, so a remediation
cannot forge what it reads (a replaced `sha256sum`, a `sitecustomize`, a renamed or
stopped process). Only the nspawn backend has such an outside view; for libvirt see
`probe.py` (a toolset the verifier brings) and docs/verdict.md (what stays trusted).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from e2e_reme.simulators.sandbox.nodefs import NodeTree, WalkLimits

# What systemd puts into a service's environment anew at each start: not the service's
# configuration, so a restart may change them.
VOLATILE_ENV = frozenset({"INVOCATION_ID", "JOURNAL_STREAM", "SYSTEMD_EXEC_PID", "MAINPID", "NOTIFY_SOCKET",
                          "MANAGERPID", "WATCHDOG_PID", "WATCHDOG_USEC"})

# Upper-layer paths that change in normal operation and are judged by other checks (seed
# data, parsed configuration) or are harmless (logs, caches, Ansible's scratch files).
VOLATILE_PATHS = ("var/lib/remed/", "var/log/", "var/cache/", "var/tmp/", "tmp/", "root/.ansible/",
                  "root/.ansible_async/", "var/lib/systemd/", "etc/remed/", "var/lib/redis/", "var/spool/",
                  "var/lib/apt/", "var/lib/dhcp/", "var/lib/private/", "var/backups/", "etc/.pwd.lock")
HASH_LIMIT = 4 << 20


def supported(sb) -> bool:
    return sb.backend == "nspawn"


# ---- processes ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Proc:
    pid: int            # on the host
    ns_pid: int         # inside the node
    start: int          # start time in clock ticks since boot: (pid, start) names one process
    state: str          # R S D T t Z X ...
    ppid: int           # host pid of the parent
    exe: str | None     # the executable as the kernel knows it
    cgroup: str         # the systemd (v1 name=systemd, or v2) cgroup path, host view

    def to_dict(self) -> dict:
        return asdict(self)


def read_proc(pid: int) -> Proc | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rest = raw.rsplit(")", 1)[1].split()
    ns = next((l.split()[1:] for l in status.splitlines() if l.startswith("NSpid:")), [str(pid)])
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    return Proc(pid, int(ns[-1]), int(rest[19]), rest[0], int(rest[1]), exe, _cgroup(pid))


def _cgroup(pid: int) -> str:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return ""
    for want in (":name=systemd:", "0::"):
        for line in lines:
            if want in line or line.startswith(want):
                return line.split(":", 2)[2]
    return ""


def node_pids(sb, node: int) -> list[int]:
    """Host pids of every process in the node's cgroups (its init, services, strays)."""
    from e2e_reme.simulators.sandbox.backends.nspawn import _cgroup_pids, _machine
    return _cgroup_pids(_machine(sb.record.number, node))


def processes(sb, node: int) -> list[Proc]:
    out = []
    for pid in node_pids(sb, node):
        p = read_proc(pid)
        if p is not None:
            out.append(p)
    return out


def init_pid(sb, node: int) -> int | None:
    """The node's PID 1, as a host pid: the way into its mount namespace."""
    for p in processes(sb, node):
        if p.ns_pid == 1 and p.pid != 1:
            return p.pid
    return None


def environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    out = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def exec_maps(pid: int) -> list[str] | None:
    """Files mapped executable into the process: its binary and every shared library,
    preloaded or not (path as the kernel names it)."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return None
    out = set()
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6 and "x" in parts[1] and parts[5].startswith("/"):
            out.add(parts[5])
    return sorted(out)


def tagged(procs: list[Proc], tag: str) -> list[Proc]:
    """Live processes whose environment (read from the host) holds `tag` (`NAME=value`)."""
    want = tag.encode()
    out = []
    for p in procs:
        if p.state in ("Z", "X"):
            continue
        try:
            env = Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in env:
            out.append(p)
    return out


def still_alive(recorded: list[dict]) -> list[Proc]:
    """Those of the recorded processes (pid + start time) that still exist and are not
    zombies, whatever they are called now, stopped or not."""
    out = []
    for r in recorded:
        p = read_proc(int(r["pid"]))
        if p is not None and p.start == int(r["start"]) and p.state not in ("Z", "X"):
            out.append(p)
    return out


def descendants(procs: list[Proc], roots: set[int]) -> list[Proc]:
    """Processes whose parent chain reaches one of `roots` (host pids)."""
    by_pid = {p.pid: p for p in procs}
    out = []
    for p in procs:
        seen, cur = set(), p.ppid
        while cur and cur not in seen and cur in by_pid:
            if cur in roots:
                out.append(p)
                break
            seen.add(cur)
            cur = by_pid[cur].ppid
    return out


def unit_processes(procs: list[Proc], unit: str) -> list[Proc]:
    return [p for p in procs if p.cgroup.endswith("/" + unit) or f"/{unit}/" in p.cgroup]


# ---- files through the node's root --------------------------------------------------------

def node_tree(sb, node: int) -> NodeTree | None:
    """The node's root as its init sees it, read by the kernel's own resolution inside it
    (nodefs.NodeTree: no link leads out, nothing but regular files read). The caller
    closes it (`with`). None if the node has no init."""
    pid = init_pid(sb, node)
    if not pid:
        return None
    try:
        return NodeTree.of_process(pid)
    except OSError:
        return None


def file_id(tree: NodeTree, path: str) -> dict | None:
    """(device, inode, size) of a file in the node: a file is the same file when renamed."""
    st = tree.lstat(path)
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size} if st else None


def find_inode(tree: NodeTree, directory: str, ino: int, dev: int) -> str | None:
    """Where in `directory` (one filesystem, bounded walk) the file with that inode is now."""
    for full, st in tree.walk(directory, WalkLimits(max_entries=100_000, max_seconds=10.0), one_fs=True):
        if st.st_ino == ino and st.st_dev == dev:
            return full
    return None


def fs_usage(tree: NodeTree, path: str) -> dict | None:
    v = tree.statvfs(path)
    return {"size": v.f_blocks * v.f_frsize, "avail": v.f_bavail * v.f_frsize} if v else None


def mounts_at(pid: int, path: str) -> list[dict]:
    """Every mount stacked at exactly `path` in the mount table `pid` sees, bottom first
    (fs type, mount options)."""
    try:
        lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        left, right = line.split(" - ", 1)
        f = left.split()
        if f[4] == path.rstrip("/"):
            out.append({"fstype": right.split()[0], "options": f[5]})
    return out


# ---- the overlay's upper layer: what the node changed -------------------------------------

def upper_dir(sb, node: int) -> Path:
    """The node's writable overlay layer (under rw/ when the node has a disk limit)."""
    d = Path(sb.record.dir) / sb.nodes[node].name
    return d / "rw" / "upper" if (d / "rw" / "upper").is_dir() else d / "upper"


def upper_manifest(sb, node: int) -> dict[str, str]:
    """path (relative to the node's /) -> what it is in the upper layer: `f:<sha256>:<mode>`,
    `l:<target>`, `w` (a whiteout: deleted), `o:<mode>` (anything else but a directory).
    Volatile paths are left out. Read by directory descriptors with no link followed
    (nodefs); a layer too big or too deep to read in bounds is itself an entry
    (`!truncated`), so it differs from any baseline."""
    out: dict[str, str] = {}
    try:
        tree = NodeTree.layer(upper_dir(sb, node))
    except OSError as e:
        return {"!unreadable": str(e)}
    with tree:
        for full, st in tree.walk("/", UPPER_LIMITS, one_fs=True, prune=lambda p: _volatile(p[1:] + "/")):
            if stat.S_ISDIR(st.st_mode) or _volatile(full[1:]):
                continue
            out[full] = _describe(tree, full, st)
        if tree.truncated:
            out["!truncated"] = tree.truncated
    return out


UPPER_LIMITS = WalkLimits(max_entries=100_000, max_seconds=20.0, max_depth=48)


def _volatile(rel: str) -> bool:
    return rel.startswith(VOLATILE_PATHS)


def _describe(tree: NodeTree, path: str, st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "l:" + (tree.readlink(path) or "")
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return "w"
    if stat.S_ISREG(st.st_mode):
        if st.st_size > HASH_LIMIT:
            return f"f:size={st.st_size},mtime={st.st_mtime_ns}"
        return f"f:{tree.hash_entry(path, HASH_LIMIT)}:{stat.S_IMODE(st.st_mode):o}"
    return f"o:{st.st_mode:o}"


# ---- the facts the verifier compares with its baseline ------------------------------------

RUN_DROPIN_DIRS = ("/run/systemd/system", "/run/systemd/system.control", "/etc/systemd/system.control")


def _main_process(procs: list[Proc], unit: str) -> Proc | None:
    """The unit's main process: the oldest process of its cgroup whose parent is not in it."""
    mine = unit_processes(procs, unit)
    pids = {p.pid for p in mine}
    tops = sorted((p for p in mine if p.ppid not in pids and p.state not in ("Z", "X")),
                  key=lambda p: p.start)
    return tops[0] if tops else None


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _run_dropins(tree: NodeTree) -> dict[str, str]:
    """Unit drop-ins and property overrides in the node's runtime directories (tmpfs, so
    not in the overlay): `systemctl set-property --runtime`, a drop-in under /run."""
    out = {}
    for top in RUN_DROPIN_DIRS:
        for full, st in tree.walk(top, WalkLimits(max_entries=5000, max_seconds=5.0)):
            if stat.S_ISDIR(st.st_mode):
                continue
            if full.rsplit("/", 1)[0] == top and not full.endswith(".conf"):
                continue    # transient units themselves: their processes are judged elsewhere
            data = tree.read_entry(full, 65536)
            out[full] = hashlib.sha256(data or b"").hexdigest()
        if tree.truncated:
            out[f"{top}/!truncated"] = tree.truncated
    return out


def _code_sha(pid: int, code: str) -> str | None:
    """The service's code as its own process sees it (its mount namespace, not init's)."""
    try:
        with NodeTree.of_process(pid) as t:
            return t.sha256(code)
    except OSError:
        return None


def node_facts(sb, node: int, units: list[str]) -> dict | None:
    """What the verifier compares from the host: per unit its main process's executable,
    command line, code hash, environment and mapped libraries; the node's changed files
    (overlay upper layer) and runtime drop-ins. None if the node has no init."""
    procs = processes(sb, node)
    tree = node_tree(sb, node)
    if tree is None:
        return None
    services = {}
    for unit in units:
        p = _main_process(procs, unit)
        if p is None:
            services[unit] = {"running": False}
            continue
        argv = _cmdline(p.pid)
        code = next((a for a in argv[1:] if a.endswith(".py")), None)
        env = environ(p.pid) or {}
        services[unit] = {"running": True, "pid": p.pid, "ns_pid": p.ns_pid, "exe": p.exe, "argv": argv,
                          "code_sha": _code_sha(p.pid, code) if code else None,
                          "environ": {k: v for k, v in sorted(env.items()) if k not in VOLATILE_ENV},
                          "maps": exec_maps(p.pid) or []}
    with tree:
        run_dropins = _run_dropins(tree)
    return {"services": services, "upper": upper_manifest(sb, node), "run_dropins": run_dropins}
