"""libvirt backend: each node is a QEMU virtual machine booting the image's kernel
directly, on a disk overlay of its own, on an isolated libvirt network of its own.

Per sandbox (number S from the address allocator), all on `qemu:///system`:
    network  remed-S     isolated (no <forward>): bridge rmvbrS with the host at .1;
                         dnsmasq gives each node's MAC its fixed address and hostname
    node i   domain remed-S-nI   kernel, initrd and cmdline from the image (direct boot),
                         KVM where `kvm_probe` finds it really runs a guest, else TCG
             <state>/sandboxes/<name>/n<i>/
                 disk.qcow2    overlay on the image's disk.qcow2 (which is never written);
                               also holds the reset point, an internal snapshot
                 console.log   the serial console (`node_log`)

Reset without a reboot. The first time a node is ready (sshd answers, boot finished),
`wait_ready` takes its reset point: a libvirt internal snapshot with memory
(`snapshotCreateXML`), which pauses the guest for under a second in its running QEMU.
A reset reverts to it inside that same QEMU with the monitor's `loadvm`: disk and
memory are back as they were, sshd and the page cache included, with no boot.
The point is taken lazily in `wait_ready`, not in `_start_nodes`, because
`_start_nodes` must not wait for sshd and a point taken mid-boot would replay the
rest of the boot at every reset. A reset before the point exists (a sandbox made with
`wait=False` and never waited for) boots the node afresh from a new overlay.

Measured on this 2-core host under TCG, 768 MiB guests (reset = revert plus sshd
answering again; sshd's handshake under TCG is 1-1.5 s of it):
    internal snapshot + `loadvm` (chosen)        revert 0.3-0.7 s   reset 1.8-2.3 s (1 node),
                                                                    2.8-3.5 s (2 nodes)
    internal snapshot + `revertToSnapshot`       revert 3.5-4.3 s   reset 5.5-6 s
    `virDomainSave` file + overlay copy, then
    destroy + copy back + `virDomainRestore`     revert 1.8-3.2 s   reset 4.0-5.4 s
libvirt's `revertToSnapshot` and the save-file route both replace the QEMU process, and
here each such replacement waits 1.3-1.8 s for PID 1 to reap the old one (libvirt waits
until the pid is gone); `loadvm` keeps the process. It goes through
`qemuMonitorCommand`, so libvirt marks the domain tainted ("custom-monitor"), which only
shows in its log. Where the domain is not running (a playbook powered it off), reset
falls back to `revertToSnapshot`.

The guest clock stands still while QEMU saves or loads the snapshot, so it falls about
half a second behind per reset; the image has no time sync, so the readiness probe
after a reset sets it from the host (to within a few tens of milliseconds) in the
command it runs anyway.

Names (domain `remed-<number>-n<i>`, network `remed-<number>`, bridge `rmvbr<number>`) are what
`sweep` and `number_taken` recognise; nothing else on the host is ever touched.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from xml.sax.saxutils import escape, quoteattr

import paramiko

from e2e_reme.host import HostCommandError, link_names as _links, process_alive, processes_named, run

from e2e_reme.simulators.sandbox import state
from e2e_reme.simulators.errors import HostNotCapable, NodeUnreachable, SandboxError, SandboxNotReady
from e2e_reme.simulators.sandbox.base import Sandbox, register
from e2e_reme.simulators.sandbox.state import SandboxRecord

try:
    import libvirt
except ImportError as _e:  # check_host turns this into a one-line fix
    libvirt = None
    _IMPORT_ERROR: ImportError | None = _e

    class LibvirtError(Exception):
        """Stands in for libvirt.libvirtError in `except` clauses; never raised."""
else:
    import libvirt_qemu
    _IMPORT_ERROR = None
    LibvirtError = libvirt.libvirtError
    # libvirt prints every error to stderr by default, including the "no such domain"
    # that idempotent teardown expects; errors reach us as exceptions anyway.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

DOMAIN_RE = re.compile(r"^remed-(\d+)-n(\d+)$")
NETWORK_RE = re.compile(r"^remed-(\d+)$")
BRIDGE_RE = re.compile(r"^rmvbr(\d+)$")
QEMU = "qemu-system-x86_64"
QEMU_USER = "libvirt-qemu"   # Debian's default `user` in qemu.conf
SNAPSHOT = "ready"
# Internal to the overlay, memory included: taking it pauses the guest under a second
# and needs no new QEMU process.
SNAPSHOT_XML = (f"<domainsnapshot><name>{SNAPSHOT}</name>"
                "<description>e2e-reme reset point: the node as first ready</description>"
                "<memory snapshot='internal'/></domainsnapshot>")


def uri() -> str:
    return os.environ.get("E2E_REME_LIBVIRT_URI", "qemu:///system")


def _domain(number: int, index: int) -> str:
    return f"remed-{number}-n{index}"


def _network(number: int) -> str:
    return f"remed-{number}"


def _bridge(number: int) -> str:
    return f"rmvbr{number}"


def _mac(number: int, index: int) -> str:
    # 52:54:00 is QEMU's locally administered prefix; number and index make it unique here.
    return f"52:54:00:{number >> 8 & 0xff:02x}:{number & 0xff:02x}:{index & 0xff:02x}"


@contextmanager
def _connect() -> Iterator["libvirt.virConnect"]:
    if libvirt is None:
        raise HostNotCapable(f"libvirt-python is not importable ({_IMPORT_ERROR}); run `make setup`")
    try:
        conn = libvirt.open(uri())
    except LibvirtError as e:
        raise HostNotCapable(f"libvirtd is not reachable at {uri()} ({e.get_error_message()}); "
                             "start it: libvirtd -d; virtlogd -d (or `make setup`)") from e
    try:
        yield conn
    finally:
        try:
            conn.close()
        except LibvirtError:
            pass


def _is_missing(e: "libvirt.libvirtError") -> bool:
    return e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_NETWORK,
                                  libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT)


def _qemu_processes() -> dict[str, int]:
    """domain name → pid of every QEMU running one of our domains, found from /proc so
    that a QEMU libvirtd lost track of (libvirtd restarted, state deleted) is found too."""
    found = {}
    for pid, argv in processes_named(QEMU).items():
        for prev, a in zip(argv, argv[1:]):
            if prev == "-name":
                name = a.removeprefix("guest=").split(",")[0]
                if DOMAIN_RE.match(name):
                    found[name] = pid
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        return
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _drop_domain(conn, name: str) -> bool:
    """Destroy and undefine a domain with its snapshot and save metadata; False if absent."""
    try:
        dom = conn.lookupByName(name)
    except LibvirtError as e:
        if _is_missing(e):
            return False
        raise
    try:
        if dom.isActive():
            dom.destroy()
    except LibvirtError as e:
        if not _is_missing(e) and e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
            raise
    try:
        if dom.isPersistent():
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                              | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    except LibvirtError as e:
        if not _is_missing(e):
            raise
    return True


def _drop_network(conn, name: str) -> bool:
    try:
        net = conn.networkLookupByName(name)
    except LibvirtError as e:
        if _is_missing(e):
            return False
        raise
    try:
        if net.isActive():
            net.destroy()
        if net.isPersistent():
            net.undefine()
    except LibvirtError as e:
        if not _is_missing(e):
            raise
    return True


def _loadvm(dom) -> bool:
    """Revert a running domain to the reset point inside its own QEMU process (HMP
    `loadvm`); False when QEMU refuses, so that the caller can fall back."""
    out = libvirt_qemu.qemuMonitorCommand(dom, f"loadvm {SNAPSHOT}",
                                          libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    if out.strip():
        return False  # HMP reports failure as text, e.g. "Error: Snapshot 'ready' does not exist"
    st, _ = dom.state()
    if st == libvirt.VIR_DOMAIN_PAUSED:
        dom.resume()
    return True


def _qemu_ids() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(QEMU_USER)
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 0, 0  # a libvirt built to run QEMU as root


def _parallel(fns: list[Callable[[], None]]) -> None:
    """Run per-node steps at once (each node's QEMU is its own process) and re-raise
    the first failure after all have finished, so none is left half-done."""
    if len(fns) <= 1:
        for f in fns:
            f()
        return
    with ThreadPoolExecutor(max_workers=len(fns)) as pool:
        futures = [pool.submit(f) for f in fns]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]


@register("libvirt")
class LibvirtSandbox(Sandbox):
    # TCG boots to sshd in 30-60 s on a busy 2-core host; KVM in a few seconds.
    default_ready_timeout_s = 150.0

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._clock_stale: set[int] = set()   # nodes whose clock a snapshot left behind
        self._point_lock = threading.Lock()

    # ---- host ------------------------------------------------------------------------
    @classmethod
    def check_host(cls) -> None:
        if libvirt is None:
            raise HostNotCapable(f"libvirt-python is not importable ({_IMPORT_ERROR}); run "
                                 "`make setup` (pip install libvirt-python; it needs libvirt-dev)")
        if shutil.which(QEMU) is None:
            raise HostNotCapable(f"{QEMU} is not installed; run `make setup` "
                                 "(apt-get install qemu-system-x86 libvirt-daemon-system)")
        if shutil.which("qemu-img") is None:
            raise HostNotCapable("qemu-img is not installed; run `make setup` (apt-get install qemu-utils)")
        with _connect():
            pass

    @classmethod
    def tree_group(cls) -> int | None:
        """QEMU (its own user) opens the node's disk in the sandbox's directory."""
        uid, gid = _qemu_ids()
        return gid if uid else None

    def _login_key(self, node: int) -> Path:
        """The image's key until `_prepare_guest` has put the sandbox's own in place (the
        guest boots from the image's disk, which authorises only the image's key)."""
        return self.ssh_key if self.nodes[node].extra.get("own_key") else self.image.ssh_key

    @classmethod
    def number_taken(cls, number: int, subnet) -> bool:
        if _bridge(number) in _links():
            return True
        if libvirt is None:
            return False
        try:
            with _connect() as conn:
                return _network(number) in conn.listNetworks() + conn.listDefinedNetworks()
        except HostNotCapable:
            return False

    # ---- hooks -----------------------------------------------------------------------
    def _start_nodes(self) -> None:
        number = self.record.number
        accel, cpu = self._accel()
        self.record.extra.update(uri=uri(), network=_network(number), bridge=_bridge(number), accel=accel,
                                 limits=self._limits())
        for node in self.nodes:
            node.extra.update(domain=_domain(number, node.index), mac=_mac(number, node.index))
        # Saved before anything exists, so that a crash from here on leaves a record
        # naming every resource destroy() has to look for.
        state.save(self.record)
        with _connect() as conn:
            try:
                conn.networkCreateXML(self._network_xml())
            except LibvirtError as e:
                raise SandboxError(f"sandbox {self.name}: cannot create libvirt network "
                                   f"{_network(number)}: {e.get_error_message()}") from e
            for node in self.nodes:
                self._new_overlay(node.index)
                try:
                    # The number is ours (allocated under the registry lock), so a domain by
                    # this name is a leftover of a crash; its old snapshot must not linger.
                    _drop_domain(conn, node.extra["domain"])
                    dom = conn.defineXML(self._domain_xml(node.index, accel, cpu))
                    dom.create()
                except LibvirtError as e:
                    raise SandboxError(
                        f"sandbox {self.name}: cannot start domain {node.extra['domain']} for node "
                        f"{node.name}: {e.get_error_message()}; see {self.node_log(node.index)}") from e

    def _reset_nodes(self) -> None:
        with _connect() as conn:
            _parallel([lambda i=n.index: self._reset_node(conn, i) for n in self.nodes])
        self._clock_stale = {n.index for n in self.nodes}

    @classmethod
    def destroy(cls, record: SandboxRecord) -> None:
        number = record.number
        domains = {n.extra.get("domain") or _domain(number, n.index) for n in record.nodes}
        network = record.extra.get("network") or _network(number)
        bridge = record.extra.get("bridge") or _bridge(number)
        try:
            with _connect() as conn:
                # At once: each drop waits for its QEMU to be reaped, over a second here.
                _parallel([lambda d=d: _drop_domain(conn, d) for d in sorted(domains)])
                _drop_network(conn, network)
        except LibvirtError as e:
            raise SandboxError(f"sandbox {record.name}: libvirt could not remove its domains or "
                               f"network: {e.get_error_message()}; retry with `remed sandbox gc`") from e
        except HostNotCapable:
            # No libvirtd, so nothing it manages can be removed now; what it no longer
            # manages (a QEMU it lost, a bridge) still can be, and gc retries the rest.
            cls._remove_strays(domains, bridge)
            raise
        cls._remove_strays(domains, bridge)
        for node in record.nodes:
            d = record.dir / node.name
            (d / "disk.qcow2").unlink(missing_ok=True)   # the snapshot lives inside it

    @staticmethod
    def _remove_strays(domains: set[str], bridge: str) -> None:
        for name, pid in _qemu_processes().items():
            if name in domains:
                _kill(pid)
        if bridge in _links():
            run(["ip", "link", "del", bridge], check=False)

    @classmethod
    def sweep(cls, live: list[SandboxRecord]) -> list[str]:
        mine = [r for r in live if r.backend == "libvirt"]
        domains = {n.extra.get("domain") or _domain(r.number, n.index) for r in mine for n in r.nodes}
        networks = {r.extra.get("network") or _network(r.number) for r in mine}
        bridges = {r.extra.get("bridge") or _bridge(r.number) for r in mine}
        done = []
        if libvirt is not None:
            try:
                with _connect() as conn:
                    for dom in conn.listAllDomains():
                        name = dom.name()
                        if DOMAIN_RE.match(name) and name not in domains:
                            _drop_domain(conn, name)
                            done.append(f"domain {name}")
                    for net in conn.listAllNetworks():
                        name = net.name()
                        if NETWORK_RE.match(name) and name not in networks:
                            _drop_network(conn, name)
                            done.append(f"network {name}")
            except HostNotCapable:
                pass  # no libvirtd: nothing of ours can be defined in it right now
        for name, pid in _qemu_processes().items():
            if name not in domains:
                _kill(pid)
                done.append(f"qemu {name} (pid {pid})")
        for link in _links():
            if BRIDGE_RE.match(link) and link not in bridges:
                run(["ip", "link", "del", link], check=False)
                done.append(f"bridge {link}")
        return done

    def node_failed(self, index: int) -> str | None:
        name = self.nodes[index].extra.get("domain")
        if not name:
            return None
        try:
            with _connect() as conn:
                st, reason = conn.lookupByName(name).state()
        except (HostNotCapable, LibvirtError) as e:
            msg = e.get_error_message() if isinstance(e, LibvirtError) else str(e)
            return f"has no running domain {name} ({msg})"
        if st in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_PAUSED):
            return None
        tail = self._log_tail(index)
        what = {libvirt.VIR_DOMAIN_SHUTOFF: "shut off", libvirt.VIR_DOMAIN_CRASHED: "crashed",
                libvirt.VIR_DOMAIN_SHUTDOWN: "is shutting down"}.get(st, f"is in state {st}")
        return f"domain {name} {what} (console: {tail})"

    def _limits(self) -> dict:
        """What bounds a guest is its own size, not the limit_* options (those are nspawn's):
        its memory and vCPUs, and its disk overlay, which grows at most to the image disk's
        virtual size (plus the memory snapshot reset returns to). Its processes are counted
        by its own kernel, so there is no host-side task limit to report."""
        try:
            info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(self.image.disk)]).stdout)
            disk_mib = int(info["virtual-size"]) >> 20
        except (HostCommandError, ValueError, KeyError):
            disk_mib = None
        return {"pids": None, "memory_mib": self.config.memory_mib, "cpus": float(self.config.vcpus),
                "cpu_shares": None, "disk_mib": disk_mib, "userns": None}

    def describe(self) -> dict:
        out = super().describe()
        out["limits"] = self.record.extra.get("limits")    # per node
        return out

    def node_memory_mib(self, index: int) -> float:
        """Proportional set size of the node's QEMU process (guest RAM it touched plus QEMU)."""
        pid = _qemu_processes().get(self.nodes[index].extra.get("domain", ""))
        if not pid:
            return float("nan")
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    # ---- readiness and the reset point ---------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> float:
        """Wait for sshd on every node; the first time, take each node's reset point."""
        waited = super().wait_ready(timeout)
        t0 = time.monotonic()
        with self._point_lock:
            missing = [n.index for n in self.nodes if not n.extra.get("ready_point")]
            if missing:
                self._take_ready_points(missing)
        return waited + time.monotonic() - t0

    def _ssh_works(self, node: int) -> bool:
        # The guest clock stands still while QEMU saves or loads the snapshot, so it
        # falls behind by about half a second per reset. The readiness probe after a
        # reset sets it, which costs nothing: the probe runs a command anyway.
        if node not in self._clock_stale:
            return super()._ssh_works(node)
        try:
            socket.create_connection((self.nodes[node].ip, 22), timeout=0.5).close()
            ok = self._set_clock(node)
        except (OSError, EOFError, paramiko.SSHException, NodeUnreachable):
            self._drop_client(node)
            return False
        if ok:
            self._clock_stale.discard(node)
        return ok

    def _set_clock(self, node: int) -> bool:
        """Set the node's clock to the host's. The guest first says it is listening and
        only then is sent the time, so the error left is one network trip, not the few
        hundred milliseconds a shell takes to start under TCG."""
        chan = self._ssh(node).get_transport().open_session(timeout=10)
        try:
            chan.settimeout(10)
            chan.exec_command("echo listening; read t && date -u -s @$t >/dev/null")
            said = b""
            while b"listening" not in said:
                chunk = chan.recv(64)
                if not chunk:
                    return False
                said += chunk
            chan.sendall(f"{time.time():.6f}\n".encode())
            deadline = time.monotonic() + 10
            while not chan.exit_status_ready():
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)
            return chan.recv_exit_status() == 0
        finally:
            chan.close()

    def _checkpoint_nodes(self) -> None:
        """Replace each node's reset point with a snapshot of its current state."""
        with _connect() as conn:
            for node in self.nodes:
                if node.extra.get("ready_point"):
                    try:
                        dom = conn.lookupByName(node.extra["domain"])
                        dom.snapshotLookupByName(SNAPSHOT).delete(0)
                    except LibvirtError as e:
                        if not _is_missing(e):
                            raise SandboxError(f"sandbox {self.name}: cannot drop the old reset "
                                               f"point of node {node.name}: {e.get_error_message()}") from e
                    node.extra.pop("ready_point", None)
        self._take_ready_points([n.index for n in self.nodes])

    def _take_ready_points(self, indexes: list[int]) -> None:
        for i in indexes:
            self._prepare_guest(i)
        # A session open in the snapshot would come back, at every reset, as a
        # half-open connection the guest keeps until it times out.
        self._close_ssh()
        with _connect() as conn:
            _parallel([lambda i=i: self._take_ready_point(conn, i) for i in indexes])
        state.save(self.record)
        self._clock_stale.update(indexes)
        for i in indexes:
            self._await_ssh(i)

    def _prepare_guest(self, index: int) -> None:
        """What every reset should come back to: boot finished (else each reset would
        replay its tail), /etc/hosts naming the host and every node, and the sandbox's own
        key as root's only authorised key (the image's no longer opens the node)."""
        hosts = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
        hosts += f"{self.record.gateway} remed-host\n"
        hosts += "".join(f"{n.ip} {n.hostname} {n.name}\n" for n in self.nodes)
        key = self.ssh_public_key()
        auth = "" if not key else (
            f"printf %s {shlex.quote(key)} > /root/.ssh/authorized_keys.new && chmod 600 "
            "/root/.ssh/authorized_keys.new && mv -f /root/.ssh/authorized_keys.new /root/.ssh/authorized_keys && ")
        res = self.exec(f"{auth}cat > /etc/hosts || exit 3; systemctl is-system-running --wait >/dev/null; sync",
                        node=index, timeout=90, input=hosts)
        if res.timed_out:
            raise SandboxNotReady(f"sandbox {self.name}: node {self.nodes[index].name} did not "
                                  f"finish booting in 90 s; see {self.node_log(index)}")
        if res.rc == 3:
            raise SandboxError(f"sandbox {self.name}: cannot write root's authorized_keys or /etc/hosts on "
                               f"node {self.nodes[index].name}: {res.stderr.strip()[-200:]}")
        if key:
            self.nodes[index].extra["own_key"] = True
            self._drop_client(index)

    def _take_ready_point(self, conn, index: int) -> None:
        node = self.nodes[index]
        name = node.extra["domain"]
        try:
            conn.lookupByName(name).snapshotCreateXML(SNAPSHOT_XML, 0)
        except LibvirtError as e:
            raise SandboxError(f"sandbox {self.name}: cannot take the reset point (snapshot "
                               f"'{SNAPSHOT}') of domain {name} (node {node.name}): "
                               f"{e.get_error_message()}") from e
        node.extra["ready_point"] = SNAPSHOT

    def _reset_node(self, conn, index: int) -> None:
        node = self.nodes[index]
        name = node.extra["domain"]
        try:
            dom = conn.lookupByName(name)
            if not node.extra.get("ready_point"):
                if dom.isActive():
                    dom.destroy()
                self._new_overlay(index)
                dom.create()
                return
            if dom.isActive() and _loadvm(dom):
                return
            # Not running (a playbook powered it off) or loadvm refused: libvirt's own
            # revert starts a new QEMU from the snapshot, a few seconds slower.
            dom.revertToSnapshot(dom.snapshotLookupByName(SNAPSHOT),
                                 libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING
                                 | libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_FORCE)
        except (LibvirtError, OSError) as e:
            msg = e.get_error_message() if isinstance(e, LibvirtError) else str(e)
            raise SandboxError(f"sandbox {self.name}: cannot reset domain {name} (node "
                               f"{node.name}): {msg}; see {self.node_log(index)}") from e

    def _await_ssh(self, index: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self._ssh_works(index):
            if time.monotonic() > deadline:
                raise SandboxNotReady(f"sandbox {self.name}: node {self.nodes[index].name} did not "
                                      f"answer after its reset point was taken; see {self.node_log(index)}")
            time.sleep(0.1)

    # ---- internals -------------------------------------------------------------------
    def _dir(self, index: int) -> Path:
        return self.record.dir / self.nodes[index].name

    def _log_tail(self, index: int) -> str:
        try:
            lines = self.node_log(index).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no console output"
        return lines[-1].strip()[:160] if lines else "no console output"

    def _accel(self) -> tuple[str, str | None]:
        """('kvm' | 'tcg', the -cpu model for KVM)."""
        want = self.config.accel
        if want not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel must be auto, kvm or tcg, not '{want}'")
        if want == "tcg":
            return "tcg", None
        from e2e_reme.simulators.sandbox.kvm import kvm_probe
        verdict = kvm_probe(self.image.kernel)
        if verdict.works:
            return "kvm", verdict.cpu
        if want == "kvm":
            raise HostNotCapable(f"accel=kvm was asked for, but {verdict.detail}; use accel=tcg "
                                 "(or auto)")
        return "tcg", None

    def _new_overlay(self, index: int) -> None:
        d = self._dir(index)
        d.mkdir(parents=True, exist_ok=True)
        self.nodes[index].extra.pop("own_key", None)    # a fresh disk authorises the image's key
        disk = d / "disk.qcow2"
        disk.unlink(missing_ok=True)
        try:
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                 "-b", str(self.image.disk), str(disk)])
        except HostCommandError as e:
            raise SandboxError(f"sandbox {self.name}: cannot create the overlay disk of node "
                               f"{self.nodes[index].name}: {e}") from e
        # libvirt does not relabel anything of ours (see _domain_xml), so QEMU's user
        # gets the one file it writes; the image's files are world-readable as they are.
        uid, gid = _qemu_ids()
        os.chown(disk, uid, gid)
        os.chmod(disk, 0o600)

    def _network_xml(self) -> str:
        number = self.record.number
        hosts = "".join(
            f"<host mac='{n.extra['mac']}' name={quoteattr(n.hostname)} ip='{n.ip}'/>"
            for n in self.nodes)
        first, last = self.nodes[0].ip, self.nodes[-1].ip
        # No <forward>: isolated, the sandbox reaches the host and nothing beyond it.
        # DNS is off: the nodes resolve each other through /etc/hosts (see _prepare_guest).
        return f"""<network>
  <name>{_network(number)}</name>
  <bridge name='{_bridge(number)}' stp='off' delay='0'/>
  <dns enable='no'/>
  <ip address='{self.record.gateway}' netmask='255.255.255.0'>
    <dhcp>
      <range start='{first}' end='{last}'/>
      {hosts}
    </dhcp>
  </ip>
</network>"""

    def _domain_xml(self, index: int, accel: str, cpu: str | None) -> str:
        node = self.nodes[index]
        d = self._dir(index)
        img = self.image
        cmdline = f"{img.cmdline} systemd.hostname={node.hostname}"
        if accel == "kvm":
            dom_type = "kvm"
            cpu_xml = "<cpu mode='host-passthrough'/>" if cpu in (None, "host") else "<cpu mode='maximum'/>"
        else:
            dom_type, cpu_xml = "qemu", ""
        uid, gid = _qemu_ids()
        return f"""<domain type='{dom_type}'>
  <name>{node.extra['domain']}</name>
  <description>e2e-reme sandbox {escape(self.name)} node {node.name}</description>
  <memory unit='MiB'>{self.config.memory_mib}</memory>
  <vcpu>{self.config.vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(img.kernel))}</kernel>
    <initrd>{escape(str(img.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  {cpu_xml}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{shutil.which(QEMU)}</emulator>
    <disk type='file' device='disk'>
      <!-- The overlay is thrown away with the sandbox: no host flushes are worth waiting for. -->
      <driver name='qemu' type='qcow2' cache='unsafe'/>
      <source file={quoteattr(str(d / 'disk.qcow2'))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='{_network(self.record.number)}'/>
      <mac address='{node.extra['mac']}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path={quoteattr(str(d / 'console.log'))} append='on'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path={quoteattr(str(d / 'console.log'))} append='on'/>
      <target type='serial' port='0'/>
    </console>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
  <!-- libvirt would otherwise chown the image's shared kernel, initrd and backing disk
       to QEMU's user while a domain runs; they are world-readable, so nothing needs it. -->
  <seclabel type='static' model='dac' relabel='no'><label>+{uid}:+{gid}</label></seclabel>
</domain>"""
