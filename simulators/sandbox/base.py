"""A sandbox: one or more Linux nodes (systemd + sshd, booted from the guest image) on a
private network of their own, where a generated playbook can really run and be undone.

    with create_sandbox("nspawn", nodes=2) as sb:      # started and ready
        sb.exec("systemctl is-system-running", node=1)  # -> ExecResult(rc, stdout, ...)
        sb.put_file("app.yaml", "/etc/app.yaml")
        sb.write_inventory(tmp / "hosts.yaml")          # for ansible-playbook -i
        sb.reset()                                      # back to the image, seconds, no reboot of the host
    # stopped: nothing of it is left on the host

A backend implements three hooks (`_start_nodes`, `_reset_nodes`, `destroy`)
and a `sweep` for orphans, and registers itself by name with `@register("name")`; adding
one is one file in `simulators/sandbox/backends/`. Everything else (SSH exec, files, inventory,
readiness, the registry record, the reaper) is shared here.

Lifetimes: a sandbox made through this API belongs to the calling process; if that
process dies without stopping it, a small reaper process destroys it, and
`remed sandbox gc` is the backstop. A `detached` sandbox (`remed sandbox up`) lives
until `remed sandbox down`.
"""

from __future__ import annotations

import os
import secrets
import select
import shlex
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar

import paramiko
import yaml

from e2e_reme.vm_images import Image, require_image

from e2e_reme.simulators.sandbox import state
from e2e_reme.simulators.errors import HostNotCapable, NodeUnreachable, SandboxError, SandboxNotReady, UnknownBackend
from e2e_reme.simulators.sandbox.state import NodeRecord, SandboxRecord


@dataclass(frozen=True)
class ExecResult:
    """What a command did on a node. A failing command is data, not an exception."""

    rc: int
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


@dataclass(frozen=True)
class SandboxConfig:
    backend: str = "nspawn"
    nodes: int = 1
    name: str | None = None
    detached: bool = False           # outlive this process (the CLI's `sandbox up`)
    ready_timeout_s: float | None = None   # None: the backend's default
    memory_mib: int = 768            # libvirt: guest memory
    vcpus: int = 1                   # libvirt: guest CPUs
    accel: str = "auto"              # libvirt: auto (kvm if doctor finds it works), kvm, tcg
    reaper: bool = True              # destroy the sandbox if the owning process dies
    # Nodes may open connections to the host. Only for sandboxes that stand in for lab hosts
    # (they join the host's Ray cluster); never where a model-written playbook runs.
    reach_host: bool = False
    # Per-node resource limits, 0 = none (docs/sandboxes.md, "Resource limits"). nspawn
    # enforces them in the node's own cgroups and a disk image; a libvirt guest is bounded
    # by its size (memory_mib, vcpus, its disk) instead.
    limit_pids: int = 1024           # tasks (processes and threads)
    limit_memory_mib: int = 3072     # RAM + swap; an excess is OOM-killed inside the node
    limit_cpus: float = 1.0          # CPU time, in CPUs (CFS quota), like a 1-vCPU guest
    limit_cpu_shares: int = 1024     # relative weight while the host's CPUs are contended
    limit_disk_mib: int = 2048       # what the node's writable layer may take from the host's disk
    userns: bool = True              # nspawn: node root is an unprivileged user on the host


_BACKENDS: dict[str, type["Sandbox"]] = {}


def register(name: str) -> Callable[[type["Sandbox"]], type["Sandbox"]]:
    def deco(cls: type[Sandbox]) -> type[Sandbox]:
        cls.backend = name
        _BACKENDS[name] = cls
        return cls
    return deco


def backend_catalog() -> dict[str, type["Sandbox"]]:
    """Every registered backend by name (importing the built-in ones registers them)."""
    import importlib
    importlib.import_module(f"{__package__}.backends")
    return dict(_BACKENDS)


def get_backend(name: str) -> type["Sandbox"]:
    catalog = backend_catalog()
    if name not in catalog:
        raise UnknownBackend(f"unknown sandbox backend '{name}'; known: {', '.join(sorted(catalog))}")
    return catalog[name]


class Sandbox(ABC):
    backend: ClassVar[str] = ""
    default_ready_timeout_s: ClassVar[float] = 60.0
    lease = None                     # the sandbox's lease where this handle holds it (attach(..., lease=...))

    def __init__(self, record: SandboxRecord, image: Image, config: SandboxConfig):
        self.record = record
        self.image = image
        self.config = config
        self._clients: dict[int, paramiko.SSHClient] = {}
        self._ssh_locks: dict[int, threading.Lock] = {}   # one per node: handshakes run side by side
        self._locks_lock = threading.Lock()
        self._keys: dict[Path, paramiko.PKey] = {}      # loaded private keys, by path

    # ---- backend hooks -------------------------------------------------------------
    @classmethod
    def check_host(cls) -> None:
        """Raise HostNotCapable naming what is missing and how to get it."""

    @classmethod
    def number_taken(cls, number: int, subnet) -> bool:
        """True if the host still uses this number or subnet (e.g. a leftover bridge by its name)."""
        return False

    @abstractmethod
    def _start_nodes(self) -> None:
        """Create and boot every node (do not wait for sshd)."""

    @abstractmethod
    def _reset_nodes(self) -> None:
        """Bring every node back to the image's state (do not wait for sshd)."""

    def _checkpoint_nodes(self) -> None:
        """Make the current state of every node the one `_reset_nodes` returns to."""
        raise SandboxError(f"the {self.backend} backend cannot take checkpoints")

    @classmethod
    @abstractmethod
    def destroy(cls, record: SandboxRecord) -> None:
        """Remove everything the record's sandbox holds on the host; idempotent."""

    @classmethod
    def sweep(cls, live: list[SandboxRecord]) -> list[str]:
        """Remove this backend's resources that no live record accounts for; return what."""
        return []

    def node_failed(self, index: int) -> str | None:
        """If the node can no longer come up (its process died), say why and where to look."""
        return None

    def node_log(self, index: int) -> Path:
        return self.record.dir / self.record.nodes[index].name / "console.log"

    def node_memory_mib(self, index: int) -> float:
        """Memory the node uses on the host right now."""
        return float("nan")

    @classmethod
    def tree_group(cls) -> int | None:
        """A group besides root that must reach the sandbox's directory (libvirt: the one
        QEMU runs in, to open the node's disk there); None: root alone."""
        return None

    # ---- the sandbox's own SSH key -------------------------------------------------------
    @property
    def ssh_key(self) -> Path:
        """The sandbox's own private key (made with it: `<record dir>/id_ed25519`, 0600):
        the only key its nodes accept once they are up, and the one its jail gets. A
        sandbox made before keys were per sandbox has none and uses the image's."""
        key = self.record.extra.get("ssh_key")
        return self.record.dir / key if key else self.image.ssh_key

    def ssh_public_key(self) -> str | None:
        """The line nodes authorise (`authorized_keys`); None for a sandbox without its own key."""
        if not self.record.extra.get("ssh_key"):
            return None
        return Path(f"{self.ssh_key}.pub").read_text().strip() + "\n"

    def _login_key(self, node: int) -> Path:
        """The key the host logs in to a node with now (libvirt: the image's until the
        sandbox's own is in place)."""
        return self.ssh_key

    def _pkey(self, node: int) -> paramiko.PKey:
        path = self._login_key(node)
        if path not in self._keys:
            self._keys[path] = paramiko.Ed25519Key.from_private_key_file(str(path))
        return self._keys[path]

    # ---- lifecycle -----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.record.name

    @property
    def nodes(self) -> list[NodeRecord]:
        return self.record.nodes

    def start(self) -> "Sandbox":
        try:
            self._start_nodes()
            self._isolate()
        except BaseException:
            self.stop()
            raise
        self.record.status = "running"
        state.save(self.record)
        return self

    def _isolate(self) -> None:
        """Nodes may answer the host but not call it (see simulators/sandbox/netguard.py). Put in
        force before the first node answers SSH, so before anything but the image has run
        there; a sandbox whose rules cannot be set does not start."""
        bridge = self.record.extra.get("bridge")
        if self.config.reach_host:
            self.record.extra["reach_host"] = True
            state.save(self.record)
            return
        if not bridge:
            return
        from e2e_reme.simulators.sandbox import netguard
        netguard.isolate(bridge, dhcp=self.backend == "libvirt")
        self.record.extra["isolated"] = True
        state.save(self.record)

    def wait_ready(self, timeout: float | None = None) -> float:
        """Block until sshd answers a command on every node; return the seconds waited.
        Nodes are probed concurrently: under TCG one SSH handshake alone takes a second."""
        timeout = timeout or self.config.ready_timeout_s or self.default_ready_timeout_s
        t0 = time.monotonic()

        given_up = threading.Event()   # set when the caller stops waiting (error, Ctrl-C)

        def one(node: NodeRecord) -> None:
            while not self._ssh_works(node.index):
                if given_up.is_set():
                    return
                why = self.node_failed(node.index)
                if why:
                    raise SandboxNotReady(f"sandbox {self.name}: node {node.name} ({node.ip}) "
                                          f"{why}; see {self.node_log(node.index)}")
                if time.monotonic() - t0 > timeout:
                    raise SandboxNotReady(
                        f"sandbox {self.name}: sshd on node {node.name} ({node.ip}) did not "
                        f"answer in {timeout:.0f} s; see {self.node_log(node.index)}")
                time.sleep(0.1)

        if len(self.nodes) == 1:
            one(self.nodes[0])
            return time.monotonic() - t0
        pool = ThreadPoolExecutor(len(self.nodes))
        try:
            for fut in [pool.submit(one, n) for n in self.nodes]:
                fut.result()
        finally:
            given_up.set()
            pool.shutdown(wait=False, cancel_futures=True)
        return time.monotonic() - t0

    def reset(self, wait: bool = True) -> None:
        """Back to the image's state: every change on every node is discarded."""
        self._close_ssh()
        self._reset_nodes()
        if wait:
            self.wait_ready()

    def checkpoint(self) -> None:
        """From now on, `reset()` returns here instead of to the bare image: take it once a
        system is deployed and healthy, and every episode starts from that deployment
        without deploying again. Running services must survive a restart of the node
        (enabled units, data on disk), as they would on a real host."""
        self._close_ssh()
        self._checkpoint_nodes()
        self.wait_ready()

    def stop(self) -> None:
        """Destroy the sandbox: nodes, disks or overlays, network, record. Idempotent."""
        self._close_ssh()
        with _no_interrupts():
            type(self).destroy(self.record)
            _release_host_side(self.record)
            _stop_reaper(self.record)
            state.forget(self.record.name)
            from e2e_reme.host import safe_rmtree
            safe_rmtree(self.record.dir)
            from e2e_reme.simulators.sandbox import lease
            lease.discard(self.record.name)     # its lease file, unless a user still holds it (then it goes on release)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- using the nodes -----------------------------------------------------------
    def exec(self, cmd: str | list[str], node: int = 0, timeout: float = 60,
             input: str | bytes | None = None) -> ExecResult:
        """Run a shell command on a node as root over SSH.

        The command runs under `timeout` on the node itself, so a hanging command is
        killed there too, and the result says `timed_out`."""
        if not isinstance(cmd, str):
            cmd = shlex.join(cmd)
        wrapped = f"timeout -k 3 {max(1, int(timeout))} sh -c {shlex.quote(cmd)}"
        t0 = time.monotonic()
        for attempt in (0, 1):
            try:
                chan = self._ssh(node).get_transport().open_session(timeout=10)
                break
            except (paramiko.SSHException, OSError, AttributeError, EOFError) as e:
                self._drop_client(node)
                if attempt:
                    raise NodeUnreachable(f"sandbox {self.name}: cannot open an SSH session on "
                                          f"node {self.nodes[node].name}: {e}") from e
        chan.exec_command(wrapped)
        if input is not None:
            chan.sendall(input.encode() if isinstance(input, str) else input)
        chan.shutdown_write()
        out, err = bytearray(), bytearray()
        deadline = t0 + timeout + 10
        timed_out = False
        while True:
            if chan.recv_ready():
                out += chan.recv(65536)
                continue
            if chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                continue
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            select.select([chan], [], [], 0.2)
        rc = -1 if timed_out else chan.recv_exit_status()
        chan.close()
        timed_out = timed_out or rc in (124, 137) and time.monotonic() - t0 >= timeout
        return ExecResult(rc, out.decode(errors="replace"), err.decode(errors="replace"),
                          round(time.monotonic() - t0, 4), timed_out)

    def put_file(self, local: str | Path, remote: str, node: int = 0, mode: int | None = None) -> None:
        sftp = self._ssh(node).open_sftp()
        try:
            sftp.put(str(local), remote)
            if mode is not None:
                sftp.chmod(remote, mode)
        finally:
            sftp.close()

    def get_file(self, remote: str, local: str | Path, node: int = 0) -> Path:
        sftp = self._ssh(node).open_sftp()
        try:
            sftp.get(remote, str(local))
        finally:
            sftp.close()
        return Path(local)

    def inventory(self) -> dict:
        """An Ansible inventory of the nodes (YAML-inventory structure)."""
        common = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
        return {"all": {
            "hosts": {n.name: {"ansible_host": n.ip, "remed_hostname": n.hostname} for n in self.nodes},
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(self.ssh_key),
                "ansible_ssh_common_args": common,
                "ansible_python_interpreter": "/usr/bin/python3",
                "remed_sandbox": self.name,
                # Tells one incarnation of a name from the next (e.g. for SSH connection reuse).
                "remed_sandbox_created": self.record.created_at,
            },
        }}

    def write_inventory(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump(self.inventory(), sort_keys=False))
        return path

    def describe(self) -> dict:
        return {"name": self.name, "backend": self.backend, "subnet": self.record.subnet,
                "host_ip": self.record.gateway, "status": self.record.status,
                "detached": self.record.owner_pid is None,
                "nodes": [{"name": n.name, "hostname": n.hostname, "ip": n.ip} for n in self.nodes]}

    # ---- SSH plumbing --------------------------------------------------------------
    def _node_lock(self, node: int) -> threading.Lock:
        with self._locks_lock:
            return self._ssh_locks.setdefault(node, threading.Lock())

    def _ssh(self, node: int) -> paramiko.SSHClient:
        with self._node_lock(node):
            c = self._clients.get(node)
            if c is not None and c.get_transport() is not None and c.get_transport().is_active():
                return c
            n = self.nodes[node]
            c = paramiko.SSHClient()
            c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                c.connect(n.ip, username="root", pkey=self._pkey(node), timeout=5, banner_timeout=10,
                          auth_timeout=10, look_for_keys=False, allow_agent=False)
            except (paramiko.SSHException, OSError, EOFError) as e:
                raise NodeUnreachable(f"sandbox {self.name}: SSH to node {n.name} ({n.ip}) "
                                      f"failed: {e}; see {self.node_log(node)}") from e
            c.get_transport().set_keepalive(15)
            self._clients[node] = c
            return c

    def _ssh_works(self, node: int) -> bool:
        ip = self.nodes[node].ip
        try:
            socket.create_connection((ip, 22), timeout=0.5).close()
        except OSError:
            return False
        try:
            return self.exec("true", node=node, timeout=10).ok
        except NodeUnreachable:
            self._drop_client(node)
            return False

    def _drop_client(self, node: int) -> None:
        with self._node_lock(node):
            c = self._clients.pop(node, None)
        if c is not None:
            c.close()

    def _close_ssh(self) -> None:
        for i in list(self._clients):
            self._drop_client(i)


# ---- module-level API -------------------------------------------------------------------

def create_sandbox(backend: str = "nspawn", nodes: int = 1, *, image: Image | None = None,
                   wait: bool = True, **options) -> Sandbox:
    """Allocate, start and (by default) wait for a sandbox. Use it as a context manager."""
    config = SandboxConfig(backend=backend, nodes=nodes, **options)
    cls = get_backend(backend)
    if os.geteuid() != 0:
        raise HostNotCapable(f"the {backend} backend needs root (namespaces, bridges, mounts); "
                             "run as root or with sudo")
    if nodes < 1:
        raise ValueError(f"a sandbox needs at least one node, not {nodes}")
    cls.check_host()
    image = image or require_image()
    name = config.name or f"sb-{secrets.token_hex(3)}"
    config = replace(config, name=name)
    record = state.allocate(name, backend, nodes, str(image.dir), image.hash,
                            detached=config.detached, number_taken=cls.number_taken)
    sb = cls(record, image, config)
    try:
        _private_tree(record, cls.tree_group())
        _new_ssh_key(record)
        if config.reaper and not config.detached:
            _start_reaper(record)
        sb.start()
        if wait:
            sb.wait_ready()
    except BaseException:
        sb.stop()
        raise
    return sb


def attach(name: str, lease: str | None = None) -> Sandbox:
    """A handle on a live sandbox made by any process (e.g. an earlier `sandbox up`).
    `lease` (what for): first take the sandbox's lease (simulators/sandbox/lease.py), held
    as long as the handle (`sb.lease`) or its process lives; LeaseBusy names who has it."""
    record = state.load(name)
    held = None
    if lease:
        from e2e_reme.simulators.sandbox.lease import acquire
        held = acquire(name, lease)
    cls = get_backend(record.backend)
    image_dir = Path(record.image_dir)
    import json
    image = Image(image_dir, json.loads((image_dir / "manifest.json").read_text()))
    sb = cls(record, image, SandboxConfig(backend=record.backend, nodes=len(record.nodes),
                                          name=name, detached=record.owner_pid is None))
    sb.lease = held
    return sb


def list_sandboxes() -> list[SandboxRecord]:
    return state.list_records()


def gc() -> list[str]:
    """Destroy sandboxes whose owner died, then every resource of ours that no live
    sandbox accounts for. Touches only names this project creates. Returns what it did."""
    done: list[str] = []
    with state.locked():
        records = state.list_records()
        live = []
        for rec in records:
            if rec.owner_alive() and rec.status != "creating":
                live.append(rec)
                continue
            if rec.status == "creating" and rec.owner_alive() and time.time() - rec.created_at < 600:
                live.append(rec)  # being created right now by a live process
                continue
            try:
                cls = get_backend(rec.backend)
            except UnknownBackend:
                continue
            cls.destroy(rec)
            _release_host_side(rec)
            _stop_reaper(rec)
            state.forget(rec.name)
            from e2e_reme.host import safe_rmtree
            safe_rmtree(rec.dir)
            done.append(f"sandbox {rec.name} ({rec.backend}; owner pid {rec.owner_pid} is gone)")
        for cls in backend_catalog().values():
            done += cls.sweep(live)
        from e2e_reme.simulators.sandbox import controller, netguard
        done += controller.sweep(live)
        done += netguard.sweep({r.extra["bridge"] for r in live if r.extra.get("bridge")})
        from e2e_reme.simulators.sandbox import lease
        done += lease.sweep({r.name for r in live})       # lease files of sandboxes gone, held by nobody
        # Directories with no record at all (a crash between mkdir and the record).
        from e2e_reme.host import safe_rmtree
        names = {r.name for r in live}
        for d in state.sandboxes_dir().glob("*"):
            if d.is_dir() and d.name not in names and not (d / "record.json").exists():
                safe_rmtree(d)
                done.append(f"directory {d}")
    return done


def _private_tree(record: SandboxRecord, group: int | None) -> None:
    """What a node leaves in its layers is hostile (a setuid copy, a device node): no other
    host user may reach it. `<state>/sandboxes` may be passed through, not listed; the
    sandbox's own directory is root's alone (0700), or 0710 to the group QEMU runs in
    (libvirt). Done before any node's directory exists below it."""
    os.chmod(state.sandboxes_dir(), 0o711)
    os.chown(record.dir, 0, 0 if group is None else group)
    os.chmod(record.dir, 0o700 if group is None else 0o710)


def _new_ssh_key(record: SandboxRecord) -> Path:
    """The sandbox's own ed25519 key pair, made on the host: `<record dir>/id_ed25519`
    (0600) and its `.pub`. The nodes authorise it (and no longer the image's key) and the
    jail gets only it, so a key a playbook reads in one sandbox opens no other."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Ed25519PrivateKey.generate()
    path = record.dir / "id_ed25519"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()))
    pub = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    Path(f"{path}.pub").write_text(f"{pub} remed-sandbox-{record.name}\n")
    record.extra["ssh_key"] = path.name
    state.save(record)
    return path


def _release_host_side(record: SandboxRecord) -> None:
    """What the sandbox holds on the host outside its backend: its jailed controller (if one
    is running) and its network rules."""
    from e2e_reme.simulators.sandbox import controller, netguard
    controller.destroy(record)
    netguard.release(record.extra.get("bridge"))


# ---- the reaper: destroys a sandbox whose owner died without stopping it ---------------

def _start_reaper(record: SandboxRecord) -> None:
    """Start the reaper as a grandchild: a launcher starts it in a session of its own and
    exits, so it is no child of the owner. Process managers that kill a dying process's
    children (Ray does so for its workers) would otherwise kill the reaper with its owner,
    exactly when it is needed."""
    log = record.dir / "reaper.log"
    record.dir.mkdir(parents=True, exist_ok=True)
    launcher = subprocess.run(
        [sys.executable, "-m", "e2e_reme.simulators.sandbox.reaper", "--spawn", record.name,
         str(record.owner_pid), str(record.owner_start), str(log)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, close_fds=True)
    try:
        record.reaper_pid = int(launcher.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SandboxError(f"sandbox {record.name}: the reaper did not start: "
                           f"{(launcher.stderr or launcher.stdout).strip()[-300:]}") from None
    state.save(record)


def _stop_reaper(record: SandboxRecord) -> None:
    pid = record.reaper_pid
    if pid and pid != os.getpid():
        try:
            os.kill(pid, 15)
        except OSError:
            pass


class _no_interrupts:
    """Defer Ctrl-C while tearing down, so that cleanup itself is not cut in half."""

    def __enter__(self):
        import signal
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._hit = False
            self._old = signal.signal(signal.SIGINT, lambda *a: setattr(self, "_hit", True))
        return self

    def __exit__(self, *exc):
        import signal
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            if self._hit:
                raise KeyboardInterrupt
