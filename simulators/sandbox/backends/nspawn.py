"""systemd-nspawn backend: each node is a container booting systemd from the image's
rootfs through an overlay of its own, on a bridge of its own.

Per sandbox (number S from the address allocator):
    bridge   rmbrS               the host is .1 on it (SSH, load generation)
    node i   machine rmSnI       `systemd-nspawn --boot --network-bridge=rmbrS`
             veth    vb-rmSnI    made by nspawn, gone with the container's netns
             <state>/sandboxes/<name>/n<i>/{disk.img,rw/{upper,work,layer*},merged,console.log}
             cgroup  remed-rmSnI in every hierarchy, with the node's limits
             disk.img  sparse ext4 of limit_disk_mib, mounted (loop, discard) on rw/: the
                       writable layer can take no more than that from the host's disk

Reset = kill the container, discard the upper layer, mount a fresh one, boot again: the
node is back to the image in about the time of one boot, with nothing rebuilt.

Limits (pids, memory + swap, CPU quota and shares) are written into the node's cgroups
before nspawn joins them; with `userns` the node runs in a user namespace of its own
(a uid range per node, the overlay built from idmapped layers), so its root cannot mount
the cgroup hierarchies to lift them. See docs/sandboxes.md, "Resource limits".

This host has no systemd as PID 1 and a hybrid cgroup v1 layout, hence `--register=no`
(no machined) and `--keep-unit` (no scope unit to create); both also work on a normal
systemd host.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Callable

from e2e_reme.host import (HostCommandError, link_names as _links, mounts_below, proc_start_time,
                           process_alive, processes_named, run, safe_rmtree)

from e2e_reme.simulators.sandbox import state
from e2e_reme.simulators.errors import HostNotCapable, SandboxError
from e2e_reme.simulators.sandbox.base import Sandbox, register
from e2e_reme.simulators.sandbox.state import SandboxRecord

MACHINE_RE = re.compile(r"^rm(\d+)n(\d+)$")
BRIDGE_RE = re.compile(r"^rmbr(\d+)$")
VETH_RE = re.compile(r"^vb-rm\d+n\d+$")


def _bridge(number: int) -> str:
    return f"rmbr{number}"


def _machine(number: int, index: int) -> str:
    return f"rm{number}n{index}"


def _nspawn_processes() -> dict[str, int]:
    """machine name → pid of every systemd-nspawn running one of our machines."""
    found = {}
    for pid, argv in processes_named("systemd-nspawn").items():
        for a in argv:
            if a.startswith("--machine=") and MACHINE_RE.match(a.split("=", 1)[1]):
                found[a.split("=", 1)[1]] = pid
    return found


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for t in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(x) for x in (t / "children").read_text().split()]
    except OSError:
        pass
    return kids


def _kill_container(nspawn_pid: int | None, machine: str) -> None:
    """SIGKILL the container's init (which takes its whole PID namespace down) and
    nspawn itself, then wait until both are gone. Nothing in a sandbox needs a clean
    shutdown: its upper layer is discarded anyway."""
    pids = []
    if nspawn_pid and process_alive(nspawn_pid):
        pids = [nspawn_pid, *_children(nspawn_pid)]
    # And whatever is still in the container's own cgroup: when nspawn died first (a
    # SIGKILLed owner, Ray killing a worker's process group), its init lives on, orphaned,
    # with every service and injected fault of the node; only the cgroup still finds them.
    dirs = _found_cgroup_dirs(machine)      # once: the loop below polls them
    pids += [p for p in _cgroup_pids(machine, dirs) if p not in pids]
    deadline = time.monotonic() + 20
    while True:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)
        pids = [p for p in pids if process_alive(p)] + [p for p in _cgroup_pids(machine, dirs) if p not in pids]
        if not pids or time.monotonic() > deadline:
            break
    # The kernel removes the veth with the container's netns, but asynchronously; a
    # container booted again at once would find the name taken. Remove it now.
    veth = f"vb-{machine}"
    if veth in _links():
        run(["ip", "link", "del", veth], check=False)
    # nspawn removes this itself on a clean exit; a SIGKILL leaves it behind.
    shutil.rmtree(f"/run/systemd/nspawn/propagate/{machine}", ignore_errors=True)
    _remove_cgroups(machine)


def _systemd_is_init() -> bool:
    return Path("/run/systemd/system").is_dir()


def _cgroup_dirs(machine: str) -> list[Path]:
    """The container's own cgroup, `remed-<machine>` under ours, in every hierarchy
    (cpuset excluded: a new v1 cpuset needs its cpus and mems set first).

    Without this, every container started with --keep-unit shares the caller's cgroup,
    and their systemd instances race over the same tree (units then fail at random with
    status=219/CGROUP). A host with systemd as PID 1 gives each container a scope unit
    instead, so this is only used when it does not."""
    known = {line.split()[0] for line in Path("/proc/cgroups").read_text().splitlines()[1:]}
    mounts: dict[frozenset, tuple[str, str]] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fstype, _src, opts = right.split()[:3]
        root, mnt = left.split()[3], left.split()[4]
        if fstype == "cgroup2":
            mounts[frozenset()] = (root, mnt)
        elif fstype == "cgroup":
            ctrls = frozenset(o for o in opts.split(",") if o in known or o.startswith("name="))
            mounts[ctrls] = (root, mnt)
    dirs = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, ctrls, path = line.split(":", 2)
        key = frozenset(ctrls.split(",")) if ctrls else frozenset()
        if "cpuset" in key or key not in mounts:
            continue
        root, mnt = mounts[key]
        rel = path[len(root):] if path.startswith(root) and root != "/" else path
        dirs.append(Path(mnt + rel.rstrip("/")) / f"remed-{machine}")
    return dirs


def _found_cgroup_dirs(machine: str) -> list[Path]:
    """Every `remed-<machine>` cgroup that exists, wherever it is. `_cgroup_dirs` places it
    under the calling process's own cgroup; a process in another one (gc from another
    shell, a host whose sessions get memory cgroups of their own, as here) would miss the
    node's cgroup in that hierarchy, and with it the node's processes and limits."""
    found = {d for d in _cgroup_dirs(machine) if d.is_dir()}
    found.update(_cgroups_named(lambda n: n == f"remed-{machine}"))
    return sorted(found)


def _cgroups_named(match: Callable[[str], bool], depth: int = 4) -> list[Path]:
    """Cgroups whose name matches, in every hierarchy, at most `depth` levels down (not
    below a match). os.walk skips what vanishes while it looks; others' nodes come and go."""
    found = []
    for mnt in _cgroup_mounts():
        top = mnt.rstrip("/").count("/")
        for here, dirs, _files in os.walk(mnt):
            hits = [d for d in dirs if match(d)]
            found += [Path(here, d) for d in hits]
            dirs[:] = [] if here.count("/") - top >= depth - 1 else [d for d in dirs if d not in hits]
    return found


def _cgroup_mounts() -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fstype, _src, opts = right.split()[:3]
        if fstype == "cgroup2" or (fstype == "cgroup" and "cpuset" not in opts.split(",")):
            out.append(left.split()[4])
    return out


def _cgroup_pids(machine: str, dirs: list[Path] | None = None) -> list[int]:
    """Every process in the container's cgroups (any hierarchy, any depth)."""
    pids: set[int] = set()
    for top in _found_cgroup_dirs(machine) if dirs is None else dirs:
        if not top.is_dir():
            continue
        # os.walk, not rglob: the node's systemd creates and removes cgroups below while we
        # look, and a directory gone mid-walk is skipped rather than raised.
        for here, _dirs, files in os.walk(top):
            if "cgroup.procs" not in files:
                continue
            try:
                pids.update(int(x) for x in Path(here, "cgroup.procs").read_text().split() if x != "0")
            except (OSError, ValueError):
                pass
    return sorted(pids)


def _remove_cgroups(machine: str) -> None:
    """rmdir the container's cgroups bottom-up (cgroup dirs hold only control files)."""
    for top in _found_cgroup_dirs(machine):
        if not top.is_dir():
            continue
        for here, _dirs, _files in os.walk(top, topdown=False):    # deepest first, top last
            try:
                os.rmdir(here)
            except OSError:
                pass


def fresh_cgroups(machine: str) -> list[Path]:
    """Empty cgroups `remed-<machine>` in every hierarchy (old ones removed first); their
    `cgroup.procs` files, for the process to join between fork and exec."""
    _remove_cgroups(machine)
    procs = []
    for cg in _cgroup_dirs(machine):
        cg.mkdir(exist_ok=True)
        procs.append(cg / "cgroup.procs")
    return procs


# ---- limits -----------------------------------------------------------------------------

CFS_PERIOD_US = 100_000
MIN_DISK_MIB = 64          # below this ext4 and a booting node do not fit
# What a node writes is hostile to the host: a setuid copy made by node root is owned by
# uid 0 on the layer's disk, a device node opens the host's device. The layers' own mounts
# honour neither and run nothing (the node executes through the overlay, which still can);
# the overlay honours neither setuid nor devices either (nspawn gives the node a /dev of its own).
LAYER_FLAGS = "nosuid,nodev,noexec"
OVERLAY_FLAGS = "nosuid,nodev"


def _limits(config) -> dict:
    """The node limits a config asks for, checked; kept in the record, so that a reset from
    another process (attach) applies the same ones."""
    lim = {"pids": int(config.limit_pids), "memory_mib": int(config.limit_memory_mib),
           "cpus": float(config.limit_cpus), "cpu_shares": int(config.limit_cpu_shares),
           "disk_mib": int(config.limit_disk_mib), "userns": bool(config.userns)}
    for key in ("pids", "memory_mib", "cpus", "cpu_shares", "disk_mib"):
        if lim[key] < 0:
            raise SandboxError(f"limit_{key}={lim[key]}: a limit is a positive number, or 0 for none")
    if 0 < lim["disk_mib"] < MIN_DISK_MIB:
        raise SandboxError(f"limit_disk_mib={lim['disk_mib']}: a node needs at least {MIN_DISK_MIB} MiB "
                           "(or 0 for no disk limit)")
    if 0 < lim["cpu_shares"] < 2:
        raise SandboxError("limit_cpu_shares must be at least 2 (the kernel's minimum), or 0 for the default")
    return lim


def _cgroup_settings(lim: dict) -> dict[str, str]:
    """control file → value, for cgroup v1 and v2 alike; each is written where it exists."""
    out: dict[str, str] = {}
    if lim.get("pids"):
        out["pids.max"] = str(lim["pids"])
    if lim.get("memory_mib"):
        b = str(lim["memory_mib"] << 20)
        # v1: memsw (memory + swap) may not be below the memory limit, so memory first.
        out.update({"memory.limit_in_bytes": b, "memory.memsw.limit_in_bytes": b,
                    "memory.max": b, "memory.swap.max": "0"})
    if lim.get("cpus"):
        quota = max(1000, int(lim["cpus"] * CFS_PERIOD_US))
        out.update({"cpu.cfs_period_us": str(CFS_PERIOD_US), "cpu.cfs_quota_us": str(quota),
                    "cpu.max": f"{quota} {CFS_PERIOD_US}"})
    if lim.get("cpu_shares"):
        out["cpu.shares"] = str(lim["cpu_shares"])
        out["cpu.weight"] = str(max(1, min(10000, lim["cpu_shares"] * 100 // 1024)))
    return out


def _apply_limits(machine: str, lim: dict) -> list[str]:
    """Write the limits into the node's (fresh, empty) cgroups; return what was set, as
    `file=value`. A limit this host has no control file for is left out, not faked."""
    done = []
    for cg in _cgroup_dirs(machine):
        for name, value in _cgroup_settings(lim).items():
            f = cg / name
            if f.exists():
                try:
                    f.write_text(value)
                except OSError as e:
                    raise SandboxError(f"node {machine}: cannot set {name}={value} in {cg}: {e}") from e
                done.append(f"{name}={value}")
    return done


# ---- user namespaces: node root is host uid BASE, not 0 ----------------------------------
#
# nspawn's own `--private-users-ownership=map` idmaps the directory it boots, which here is
# an overlay, and overlayfs cannot be idmapped itself ("ID mapped mounts are apparently not
# available"). Its layers can: the image's rootfs and the node's rw/ (upper, work, frozen
# layers) are bind-mounted idmapped (on-disk uid k shows as BASE + k), the overlay is made
# of those, and nspawn boots it with the ownership left as it is. On disk every file keeps
# the image's own ids, so resets, checkpoints and the host's reading of them are unchanged.

UID_BASE = 0x80000000      # above nspawn's `pick` range (0x00080000-0x6FFF0000) and any login user
UID_RANGE = 1 << 16
MAX_NODES_USERNS = 32


def _uid_base(number: int, index: int) -> int:
    """A 64 Ki uid range of its own for every node of every sandbox (by its number)."""
    base = UID_BASE + (number * MAX_NODES_USERNS + index) * UID_RANGE
    if index >= MAX_NODES_USERNS or base + UID_RANGE > 0xFFFF0000:
        raise SandboxError(f"node {index} of sandbox number {number}: no uid range left for a user namespace "
                           f"(at most {MAX_NODES_USERNS} nodes a sandbox); pass userns=False")
    return base


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442     # x86_64, arm64 alike
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC, _AT_EMPTY_PATH = 1, 0o2000000, 0x1000
_MOVE_MOUNT_F_EMPTY_PATH, _MOUNT_ATTR_IDMAP, _AT_FDCWD = 4, 0x100000, -100
_MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV, _MOUNT_ATTR_NOEXEC = 0x2, 0x4, 0x8


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _syscall(nr: int, *args) -> int:
    r = _libc.syscall(nr, *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def _idmap_userns(base: int) -> int:
    """An fd of a user namespace mapping uid/gid k to BASE + k (k < 64 Ki), and on-disk
    65536 to host root: overlayfs creates its work files as the mounter (root), which an
    idmapped layer must be able to represent (else EOVERFLOW and a read-only overlay)."""
    proc = subprocess.Popen(["unshare", "--user", "sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        mine = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{proc.pid}/ns/user") == mine:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SandboxError("cannot make a user namespace (unshare --user did not start)")
            time.sleep(0.005)
        for f in ("uid_map", "gid_map"):
            Path(f"/proc/{proc.pid}/{f}").write_text(f"0 {base} {UID_RANGE}\n{UID_RANGE} 0 1\n")
        return os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        proc.kill()
        proc.wait()


def _idmapped_bind(src: Path, dst: Path, userns_fd: int) -> None:
    fd = _syscall(_SYS_OPEN_TREE, _AT_FDCWD, str(src).encode(), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC)
    try:
        # The idmapped view of a layer is a layer too (the image's rootfs has setuid files
        # of its own): nosuid, nodev, noexec like rw/.
        attr = _MountAttr(_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV | _MOUNT_ATTR_NOEXEC,
                          0, 0, userns_fd)
        _syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr))
        _syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, str(dst).encode(), _MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(fd)


def _mounted(path: Path) -> bool:
    """Whether something is mounted on `path`. Not os.path.ismount: a bind mount from the
    same filesystem (the image's rootfs, idmapped) has the device of its parent."""
    return os.path.realpath(path) in mounts_below(path)


def _unmount_all_below(d: Path) -> None:
    """Lazily unmount everything below `d`, the overlay first, then the layers under it,
    again while any is left (mounts stacked on one point come off one at a time)."""
    for _ in range(256):
        found = mounts_below(d)
        if not found:
            return
        for mnt in sorted(found, key=lambda m: not m.endswith("/merged")):
            run(["umount", "-l", mnt], check=False)


def _write_in_node(root: Path, rel: str, text: str, owner: int) -> None:
    """Write a file below a node's root as `owner`, following no symlink on the way (each
    directory opened by fd with O_NOFOLLOW) and opening nothing but a regular file: the
    layers below are the node's, and a frozen one may hold what a playbook left.
    Missing directories are made (0700 for `.ssh`, else 0755); files are 0600 in `.ssh`."""
    *dirs, name = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in dirs:
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o700 if part == ".ssh" else 0o755, dir_fd=fd)
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.fchown(nxt, owner, owner)
            os.close(fd)
            fd = nxt
        mode = 0o600 if dirs[-1:] == [".ssh"] else 0o644
        try:
            f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                        mode, dir_fd=fd)
        except OSError as e:
            raise SandboxError(f"cannot write {rel} below {root}: {e} (not a regular file?)") from e
        try:
            if not stat.S_ISREG(os.fstat(f).st_mode):
                raise SandboxError(f"cannot write {rel} below {root}: not a regular file")
            os.ftruncate(f, 0)
            os.write(f, text.encode())
            os.fchown(f, owner, owner)
            os.fchmod(f, mode)
        finally:
            os.close(f)
    except OSError as e:
        raise SandboxError(f"cannot write {rel} below {root}: {e}") from e
    finally:
        os.close(fd)


def _counter(path: Path, key: str) -> int:
    """The value of `key N` in a cgroup's flat-keyed file; 0 if there is none."""
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key and v.strip().isdigit():
                return int(v)
    except OSError:
        pass
    return 0


def _loop_devices_below(path: Path) -> dict[str, str]:
    """loop device → backing file, for every loop device whose file is (or was, before it
    was deleted) below `path`."""
    root = os.path.realpath(path).rstrip("/") + "/"
    found = {}
    for dev in Path("/sys/block").glob("loop*"):
        try:
            backing = (dev / "loop/backing_file").read_text().strip()
        except OSError:
            continue
        if backing.removesuffix(" (deleted)").startswith(root):
            found[f"/dev/{dev.name}"] = backing
    return found


def _detach_loops_below(path: Path) -> list[str]:
    """Detach them (a busy one is detached by the kernel when its last user lets go)."""
    found = _loop_devices_below(path)
    for dev in found:
        run(["losetup", "-d", dev], check=False)
    return [f"loop {dev} ({f})" for dev, f in found.items()]


def _stop_gracefully(nspawn_pid: int | None, machine: str, timeout: float = 15) -> None:
    """SIGTERM makes nspawn power the container off in order (units stopped, data
    flushed); fall back to SIGKILL if that takes too long."""
    if nspawn_pid and process_alive(nspawn_pid):
        os.kill(nspawn_pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process_alive(nspawn_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    _kill_container(nspawn_pid, machine)


def _machines(live: list[SandboxRecord]) -> set[str]:
    """The container names of the live nspawn sandboxes' nodes."""
    return {_machine(r.number, n.index) for r in live if r.backend == "nspawn" for n in r.nodes}


@register("nspawn")
class NspawnSandbox(Sandbox):
    default_ready_timeout_s = 60.0

    @classmethod
    def check_host(cls) -> None:
        if shutil.which("systemd-nspawn") is None:
            raise HostNotCapable("systemd-nspawn is not installed; run `make setup` "
                                 "(apt-get install systemd-container)")
        if "overlay" not in Path("/proc/filesystems").read_text():
            raise HostNotCapable("the kernel has no overlay filesystem (modprobe overlay); "
                                 "the nspawn backend needs it for per-node copy-on-write")

    @classmethod
    def number_taken(cls, number: int, subnet) -> bool:
        return _bridge(number) in _links()

    # ---- hooks -----------------------------------------------------------------------
    def _start_nodes(self) -> None:
        br = _bridge(self.record.number)
        self.record.extra["bridge"] = br
        self.record.extra["limits"] = _limits(self.config)
        state.save(self.record)
        if br not in _links():
            run(["ip", "link", "add", br, "type", "bridge"])
            run(["ip", "addr", "add", f"{self.record.gateway}/24", "dev", br])
            run(["ip", "link", "set", br, "up"])
        for node in self.nodes:
            self._mount(node.index)
        for node in self.nodes:
            self._boot(node.index)

    def _reset_nodes(self) -> None:
        for node in self.nodes:
            _kill_container(node.extra.get("pid"), _machine(self.record.number, node.index))
        for node in self.nodes:
            d = self._dir(node.index)
            run(["umount", "-l", str(d / "merged")], check=False)
            for sub in ("upper", "work"):
                safe_rmtree(d / "rw" / sub)
            if _mounted(d / "rw") and self.record.extra.get("limits", {}).get("disk_mib"):
                # Online discard frees blocks in the background; this waits until every
                # free block is given back to the host's disk.
                run(["fstrim", str(d / "rw")], check=False)
            self._mount(node.index)
        for node in self.nodes:
            self._boot(node.index)

    def _checkpoint_nodes(self) -> None:
        """Freeze each node's upper layer into a read-only layer under a fresh upper.
        The node is shut down cleanly first (so that daemons flush their data, e.g. Redis
        saves its dataset) and booted again on the new stack."""
        for node in self.nodes:
            _stop_gracefully(node.extra.get("pid"), _machine(self.record.number, node.index))
        for node in self.nodes:
            d = self._dir(node.index)
            run(["umount", "-l", str(d / "merged")], check=False)
            # Frozen layers stay on the node's disk image: they count against its quota.
            layers = node.extra.setdefault("layers", [])
            frozen = d / "rw" / f"layer{len(layers)}"
            (d / "rw" / "upper").rename(frozen)
            layers.append(str(frozen.relative_to(d)))
            safe_rmtree(d / "rw" / "work")
            self._mount(node.index)
        state.save(self.record)
        for node in self.nodes:
            self._boot(node.index)

    @classmethod
    def destroy(cls, record: SandboxRecord) -> None:
        for node in record.nodes:
            _kill_container(node.extra.get("pid"), _machine(record.number, node.index))
        # A node booted by a process that died before saving its pid is still found by name.
        running = _nspawn_processes()
        for node in record.nodes:
            m = _machine(record.number, node.index)
            if m in running:
                _kill_container(running[m], m)
        for node in record.nodes:
            # The loop device of the disk image, set to clear itself, goes with its last unmount.
            _unmount_all_below(record.dir / node.name)
        _detach_loops_below(record.dir)
        br = record.extra.get("bridge")
        if br and br in _links():
            run(["ip", "link", "del", br], check=False)

    @classmethod
    def sweep(cls, live: list[SandboxRecord]) -> list[str]:
        ours = _machines(live)
        bridges = {r.extra.get("bridge") for r in live}
        done = []
        for machine, pid in _nspawn_processes().items():
            if machine not in ours:
                _kill_container(pid, machine)
                done.append(f"container {machine} (pid {pid})")
        for link in _links():
            if BRIDGE_RE.match(link) and link not in bridges:
                run(["ip", "link", "del", link], check=False)
                done.append(f"bridge {link}")
            elif VETH_RE.match(link) and link[3:] not in ours:
                run(["ip", "link", "del", link], check=False)
                done.append(f"veth {link}")
        live_dirs = {str(r.dir) for r in live}
        root = str(state.sandboxes_dir())
        for mnt in mounts_below(state.sandboxes_dir()):
            sb_dir = mnt[: len(root)] + "/" + mnt[len(root) + 1:].split("/")[0]
            if sb_dir not in live_dirs:
                _unmount_all_below(Path(mnt))
                done.append(f"mount {mnt}")
        # Disk images of dead sandboxes still attached (their last unmount never came).
        real = Path(os.path.realpath(state.sandboxes_dir()))
        live_real = {os.path.realpath(d) for d in live_dirs}
        for dev, backing in _loop_devices_below(real).items():
            sb_dir = real / Path(backing.removesuffix(" (deleted)")).relative_to(real).parts[0]
            if str(sb_dir) not in live_real:
                run(["losetup", "-d", dev], check=False)
                done.append(f"loop {dev} ({backing})")
        for d in Path("/run/systemd/nspawn/propagate").glob("rm*n*"):
            if MACHINE_RE.match(d.name) and d.name not in ours:
                shutil.rmtree(d, ignore_errors=True)
        for m, orphans in cls.stray_cgroups(live).items():
            # Processes still in it are a node whose nspawn died first: its init and
            # services, orphaned. Killed with the cgroup.
            _kill_container(None, m)
            done.append(f"cgroup remed-{m}" + (f" ({len(orphans)} orphaned processes)" if orphans else ""))
        return done

    @staticmethod
    def stray_cgroups(live: list[SandboxRecord]) -> dict[str, list[int]]:
        """Container cgroups (`remed-rm<number>n<i>`) of no live sandbox, with the processes
        still in them: what `sweep` removes, and what a test session checks it left none of."""
        ours = _machines(live)
        out: dict[str, list[int]] = {}
        for cg in _cgroups_named(lambda n: n.startswith("remed-rm")):
            m = cg.name.removeprefix("remed-")
            if MACHINE_RE.match(m) and m not in ours and m not in out:
                out[m] = _cgroup_pids(m)
        return out

    def node_failed(self, index: int) -> str | None:
        pid = self.nodes[index].extra.get("pid")
        if pid and not process_alive(pid, self.nodes[index].extra.get("pid_start")):
            tail = self.node_log(index).read_text(errors="replace").strip().splitlines()[-1:]
            return f"exited during boot ({tail[0] if tail else 'no output'})"
        return None

    def node_log(self, index: int) -> Path:
        return self._dir(index) / "console.log"

    def describe(self) -> dict:
        out = super().describe()
        out["limits"] = self.record.extra.get("limits")    # per node; None: made before limits existed
        return out

    def limit_events(self, index: int) -> dict:
        """How often the node ran into its limits since it last booted, read on the host:
        `pids` (forks refused), `oom_kills` (processes killed for memory), and `disk_full`
        (its writable layer has under 1 MiB free). What an episode reports as the reason
        when a playbook exhausted one."""
        machine = _machine(self.record.number, index)
        out = {"pids": 0, "oom_kills": 0, "disk_full": False}
        for cg in _found_cgroup_dirs(machine):
            out["pids"] += _counter(cg / "pids.events", "max")
            out["oom_kills"] += _counter(cg / "memory.oom_control", "oom_kill")
            out["oom_kills"] += _counter(cg / "memory.events", "oom_kill")
        rw = self._dir(index) / "rw"
        if _mounted(rw):
            st = os.statvfs(rw)
            out["disk_full"] = st.f_bavail * st.f_frsize < (1 << 20) or st.f_favail == 0
        return out

    def node_memory_mib(self, index: int) -> float:
        """Proportional set size of every process in the node's PID namespace."""
        pid = self.nodes[index].extra.get("pid")
        leaders = _children(pid) if pid else []
        if not leaders:
            return float("nan")
        try:
            ns = os.readlink(f"/proc/{leaders[0]}/ns/pid")
        except OSError:
            return float("nan")
        total_kb = 0
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                if os.readlink(p / "ns/pid") != ns:
                    continue
                for line in (p / "smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total_kb += int(line.split()[1])
                        break
            except OSError:
                continue
        return total_kb / 1024

    # ---- internals -------------------------------------------------------------------
    def _dir(self, index: int) -> Path:
        return self.record.dir / self.nodes[index].name

    def _disk(self, index: int) -> None:
        """The node's writable layer on a disk of its own: a sparse ext4 image of
        limit_disk_mib, made once per node and mounted on rw/ (without a limit, rw/ bound on
        itself), `LAYER_FLAGS` either way. On a real disk, not tmpfs: an IO fault in the node
        must cause real IO."""
        d = self._dir(index)
        rw = d / "rw"
        rw.mkdir(parents=True, exist_ok=True)
        mib = self.record.extra.get("limits", {}).get("disk_mib", 0)
        if _mounted(rw):
            return
        img = d / "disk.img"
        try:
            if not mib:
                run(["mount", "--bind", "-o", LAYER_FLAGS, str(rw), str(rw)])
                return
            if not img.exists():
                with open(img, "wb") as f:
                    f.truncate(mib << 20)
                # No journal (the layer is thrown away on reset), no reserved blocks, inodes
                # written now rather than by a kernel thread during the node's first minutes.
                run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-i", "32768",
                     "-E", "lazy_itable_init=0,nodiscard", "-L", f"remed-{index}", str(img)])
            # loop: detached with the last unmount; discard: deleted files free host blocks.
            run(["mount", "-o", f"loop,discard,noatime,{LAYER_FLAGS}", str(img), str(rw)])
        except HostCommandError as e:
            raise SandboxError(f"sandbox {self.name}: cannot make the {mib} MiB disk of node "
                               f"{self.nodes[index].name}: {e}") from e

    def _idmapped_layers(self, index: int) -> Path:
        """ids/{root,rw}: the image and rw/ as the node's user namespace sees them (once
        per node; they stay mounted across resets)."""
        ids = self._dir(index) / "ids"
        todo = [(src, ids / name) for src, name in ((self.image.rootfs, "root"), (self._dir(index) / "rw", "rw"))
                if not _mounted(ids / name)]
        if not todo:
            return ids
        fd = _idmap_userns(_uid_base(self.record.number, index))
        try:
            for src, dst in todo:
                dst.mkdir(parents=True, exist_ok=True)
                _idmapped_bind(src, dst, fd)
        except OSError as e:
            raise SandboxError(f"sandbox {self.name}: cannot make the idmapped layers of node "
                               f"{self.nodes[index].name} ({e}); pass userns=False") from e
        finally:
            os.close(fd)
        return ids

    def _mount(self, index: int) -> None:
        d = self._dir(index)
        self._disk(index)
        rw = d / "rw"
        for sub in (rw / "upper", rw / "work", d / "merged"):
            sub.mkdir(parents=True, exist_ok=True)
        userns = self.record.extra.get("limits", {}).get("userns")
        # Layers are stored as paths below d (rw/layer0); with a user namespace the same
        # paths below ids/ are their idmapped views.
        top, image = (self._idmapped_layers(index), self._dir(index) / "ids" / "root") if userns \
            else (d, self.image.rootfs)
        try:
            # Checkpoint layers sit above the image, the newest on top (leftmost).
            lower = ":".join([str(top / l) for l in reversed(self.nodes[index].extra.get("layers", []))]
                             + [str(image)])
            up = top / "rw" if userns else rw
            run(["mount", "-t", "overlay", "overlay", "-o",
                 f"{OVERLAY_FLAGS},lowerdir={lower},upperdir={up / 'upper'},workdir={up / 'work'}",
                 str(d / "merged")])
        except HostCommandError as e:
            raise SandboxError(f"sandbox {self.name}: cannot mount the overlay for node "
                               f"{self.nodes[index].name}: {e}") from e
        node = self.nodes[index]
        hosts = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
        hosts += f"{self.record.gateway} remed-host\n"
        hosts += "".join(f"{n.ip} {n.hostname} {n.name}\n" for n in self.nodes)
        files = {"etc/hostname": node.hostname + "\n", "etc/hosts": hosts,
                 "etc/systemd/network/10-host0.network": "[Match]\nName=host0\n\n[Network]\n"
                 f"Address={node.ip}/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n"}
        # The sandbox's own key replaces the image's: a key read in another sandbox opens nothing here.
        key = self.ssh_public_key()
        if key:
            files["root/.ssh/authorized_keys"] = key
        # What the host writes is the node root's, not the host's (uid 0 is not mapped in there).
        owner = _uid_base(self.record.number, index) if userns else 0
        for rel, text in files.items():
            _write_in_node(d / "merged", rel, text, owner)

    def _boot(self, index: int) -> None:
        node = self.nodes[index]
        d = self._dir(index)
        log = open(d / "console.log", "ab")
        machine = _machine(self.record.number, index)
        cmd = ["systemd-nspawn", "--quiet", "-D", str(d / "merged"), "--boot", f"--machine={machine}",
               "--register=no", f"--network-bridge={_bridge(self.record.number)}", "--console=passive"]
        lim = self.record.extra.get("limits", {})
        if lim.get("userns"):
            # A user namespace of its own; the files are already idmapped (`_idmapped_layers`).
            cmd += [f"--private-users={_uid_base(self.record.number, index)}:{UID_RANGE}",
                    "--private-users-ownership=off"]
        procs_files: list[Path] = []
        if not _systemd_is_init():
            cmd.append("--keep-unit")
            procs_files = fresh_cgroups(machine)
            # Set before anything joins: nspawn and the node start inside the limits.
            _apply_limits(machine, lim)

        def enter_cgroups() -> None:  # runs in the child, between fork and exec
            for f in procs_files:
                f.write_text(str(os.getpid()))

        # Own session: Ctrl-C in the caller's terminal must reach our cleanup, not the
        # containers directly; the record and the reaper take care of their lifetime.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, preexec_fn=enter_cgroups)
        log.close()
        node.extra.update(pid=proc.pid, pid_start=proc_start_time(proc.pid))
        state.save(self.record)
