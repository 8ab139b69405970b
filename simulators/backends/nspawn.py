"""systemd-nspawn backend: each node is a container booting systemd from the image's
rootfs through an overlay of its own, on a bridge of its own.

Per sandbox (slot S from the address allocator):
    bridge   rmbrS               the host is .1 on it (SSH, load generation)
    node i   machine rmSnI       `systemd-nspawn --boot --network-bridge=rmbrS`
             veth    vb-rmSnI    made by nspawn, gone with the container's netns
             <state>/sandboxes/<name>/n<i>/{upper,work,merged,console.log}

Reset = kill the container, discard the upper layer, mount a fresh one, boot again: the
node is back to the image in about the time of one boot, with nothing rebuilt.

This host has no systemd as PID 1 and a hybrid cgroup v1 layout, hence `--register=no`
(no machined) and `--keep-unit` (no scope unit to create); both also work on a normal
systemd host.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from e2e_reme.host import (HostCommandError, link_names as _links, mounts_below, proc_start_time,
                           process_alive, processes_named, run, safe_rmtree)

from .. import state
from ..errors import HostNotCapable, SandboxError
from ..sandbox import Sandbox, register
from ..state import SandboxRecord

MACHINE_RE = re.compile(r"^rm(\d+)n(\d+)$")
BRIDGE_RE = re.compile(r"^rmbr(\d+)$")
VETH_RE = re.compile(r"^vb-rm\d+n\d+$")


def _bridge(slot: int) -> str:
    return f"rmbr{slot}"


def _machine(slot: int, index: int) -> str:
    return f"rm{slot}n{index}"


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
    pids += [p for p in _cgroup_pids(machine) if p not in pids]
    deadline = time.monotonic() + 20
    while True:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)
        pids = [p for p in pids if process_alive(p)] + [p for p in _cgroup_pids(machine) if p not in pids]
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


def _cgroup_pids(machine: str) -> list[int]:
    """Every process in the container's cgroups (any hierarchy, any depth)."""
    pids: set[int] = set()
    for top in _cgroup_dirs(machine):
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            try:
                pids.update(int(x) for x in procs.read_text().split() if x != "0")
            except (OSError, ValueError):
                pass
    return sorted(pids)


def _remove_cgroups(machine: str) -> None:
    """rmdir the container's cgroups bottom-up (cgroup dirs hold only control files)."""
    for top in _cgroup_dirs(machine):
        if not top.is_dir():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            top.rmdir()
        except OSError:
            pass


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
    return {_machine(r.slot, n.index) for r in live if r.backend == "nspawn" for n in r.nodes}


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
    def slot_busy(cls, slot: int, subnet) -> bool:
        return _bridge(slot) in _links()

    # ---- hooks -----------------------------------------------------------------------
    def _start_nodes(self) -> None:
        br = _bridge(self.record.slot)
        self.record.extra["bridge"] = br
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
            _kill_container(node.extra.get("pid"), _machine(self.record.slot, node.index))
        for node in self.nodes:
            d = self._dir(node.index)
            run(["umount", "-l", str(d / "merged")], check=False)
            for sub in ("upper", "work"):
                safe_rmtree(d / sub)
            self._mount(node.index)
        for node in self.nodes:
            self._boot(node.index)

    def _checkpoint_nodes(self) -> None:
        """Freeze each node's upper layer into a read-only layer under a fresh upper.
        The node is shut down cleanly first (so that daemons flush their data, e.g. Redis
        saves its dataset) and booted again on the new stack."""
        for node in self.nodes:
            _stop_gracefully(node.extra.get("pid"), _machine(self.record.slot, node.index))
        for node in self.nodes:
            d = self._dir(node.index)
            run(["umount", "-l", str(d / "merged")], check=False)
            layers = node.extra.setdefault("layers", [])
            frozen = d / f"layer{len(layers)}"
            (d / "upper").rename(frozen)
            layers.append(frozen.name)
            safe_rmtree(d / "work")
            self._mount(node.index)
        state.save(self.record)
        for node in self.nodes:
            self._boot(node.index)

    @classmethod
    def destroy(cls, record: SandboxRecord) -> None:
        for node in record.nodes:
            _kill_container(node.extra.get("pid"), _machine(record.slot, node.index))
        # A node booted by a process that died before saving its pid is still found by name.
        running = _nspawn_processes()
        for node in record.nodes:
            m = _machine(record.slot, node.index)
            if m in running:
                _kill_container(running[m], m)
        for node in record.nodes:
            d = record.dir / node.name
            for mnt in mounts_below(d):
                run(["umount", "-l", mnt], check=False)
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
                run(["umount", "-l", mnt], check=False)
                done.append(f"mount {mnt}")
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
        """Container cgroups (`remed-rm<slot>n<i>`) of no live sandbox, with the processes
        still in them: what `sweep` removes, and what a test session checks it left none of."""
        ours = _machines(live)
        out: dict[str, list[int]] = {}
        for top in {cg.parent for cg in _cgroup_dirs("rm0n0")}:
            for cg in top.glob("remed-rm*n*"):
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

    def _mount(self, index: int) -> None:
        d = self._dir(index)
        for sub in ("upper", "work", "merged"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        try:
            # Checkpoint layers sit above the image, the newest on top (leftmost).
            lower = ":".join([str(d / l) for l in reversed(self.nodes[index].extra.get("layers", []))]
                             + [str(self.image.rootfs)])
            run(["mount", "-t", "overlay", "overlay", "-o",
                 f"lowerdir={lower},upperdir={d / 'upper'},workdir={d / 'work'}", str(d / "merged")])
        except HostCommandError as e:
            raise SandboxError(f"sandbox {self.name}: cannot mount the overlay for node "
                               f"{self.nodes[index].name}: {e}") from e
        node = self.nodes[index]
        m = d / "merged"
        (m / "etc/hostname").write_text(node.hostname + "\n")
        hosts = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
        hosts += f"{self.record.gateway} remed-host\n"
        hosts += "".join(f"{n.ip} {n.hostname} {n.name}\n" for n in self.nodes)
        (m / "etc/hosts").write_text(hosts)
        (m / "etc/systemd/network").mkdir(parents=True, exist_ok=True)
        (m / "etc/systemd/network/10-host0.network").write_text(
            "[Match]\nName=host0\n\n[Network]\n"
            f"Address={node.ip}/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n")

    def _boot(self, index: int) -> None:
        node = self.nodes[index]
        d = self._dir(index)
        log = open(d / "console.log", "ab")
        machine = _machine(self.record.slot, index)
        cmd = ["systemd-nspawn", "--quiet", "-D", str(d / "merged"), "--boot", f"--machine={machine}",
               "--register=no", f"--network-bridge={_bridge(self.record.slot)}", "--console=passive"]
        procs_files: list[Path] = []
        if not _systemd_is_init():
            cmd.append("--keep-unit")
            _remove_cgroups(machine)
            for cg in _cgroup_dirs(machine):
                cg.mkdir(exist_ok=True)
                procs_files.append(cg / "cgroup.procs")

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
