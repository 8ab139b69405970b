"""The on-disk registry of live sandboxes and the address allocator.

Every sandbox has a record at `<state>/sandboxes/<name>/record.json` written before any
resource is created and removed after the last one is gone, so that any process (the CLI
in a later shell, `remed sandbox gc`, the reaper of a dead owner) can find and destroy
what a sandbox holds. All changes happen under one lock file.

Addresses: the pool (default 198.18.0.0/15, the range RFC 2544 reserves for benchmark
networks, so it never clashes with a real one) is cut into /24 subnets, one per sandbox:
`.1` is the host, nodes count up from `.2`. A subnet is handed out only when no record
holds it and no interface on the host still uses it, so an address is never given twice.
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from e2e_reme import paths
from e2e_reme.host import process_alive, proc_start_time

from e2e_reme.simulators.errors import NoFreeAddress, SandboxExists, SandboxNotFound

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
DEFAULT_POOL = "198.18.0.0/15"


def pool() -> ipaddress.IPv4Network:
    return ipaddress.ip_network(os.environ.get("E2E_REME_SUBNET_POOL", DEFAULT_POOL))


def sandboxes_dir() -> Path:
    return paths.state_dir() / "sandboxes"


@dataclass
class NodeRecord:
    index: int
    name: str          # inventory name: n0, n1, ...
    hostname: str      # <sandbox>-n0
    ip: str
    extra: dict = field(default_factory=dict)   # backend-specific: pids, domain names, paths


@dataclass
class SandboxRecord:
    name: str
    backend: str
    number: int                  # this host's number for the sandbox: names its bridge, machines, uid ranges
    subnet: str
    gateway: str
    image_dir: str
    image_hash: str
    nodes: list[NodeRecord]
    owner_pid: int | None        # None: detached (made by `remed sandbox up`), lives until `down`
    owner_start: int | None
    created_at: float
    status: str = "creating"     # creating → running; a crash leaves 'creating' for gc
    reaper_pid: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return sandboxes_dir() / self.name

    def owner_alive(self) -> bool:
        return self.owner_pid is None or process_alive(self.owner_pid, self.owner_start)

    @classmethod
    def from_json(cls, data: dict) -> "SandboxRecord":
        data = dict(data)
        if "slot" in data:          # records written before the field was renamed (sandboxes still live)
            data["number"] = data.pop("slot")
        data["nodes"] = [NodeRecord(**n) for n in data["nodes"]]
        return cls(**data)


@contextmanager
def locked() -> Iterator[None]:
    """Hold the registry lock (a process-wide and cross-process flock)."""
    paths.state_dir().mkdir(parents=True, exist_ok=True)
    with open(paths.state_dir() / "registry.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save(rec: SandboxRecord) -> None:
    rec.dir.mkdir(parents=True, exist_ok=True)
    tmp = rec.dir / "record.json.tmp"
    tmp.write_text(json.dumps(asdict(rec), indent=2))
    tmp.replace(rec.dir / "record.json")


def load(name: str) -> SandboxRecord:
    try:
        return SandboxRecord.from_json(json.loads((sandboxes_dir() / name / "record.json").read_text()))
    except FileNotFoundError as e:
        known = ", ".join(r.name for r in list_records()) or "none"
        raise SandboxNotFound(f"no sandbox named '{name}' (live sandboxes: {known}); "
                              "see `remed sandbox ls`") from e


def list_records() -> list[SandboxRecord]:
    out = []
    for f in sorted(sandboxes_dir().glob("*/record.json")):
        try:
            out.append(SandboxRecord.from_json(json.loads(f.read_text())))
        except (OSError, ValueError, TypeError):
            continue  # half-written or foreign: gc deals with the directory
    return out


def forget(name: str) -> None:
    (sandboxes_dir() / name / "record.json").unlink(missing_ok=True)


def allocate(name: str, backend: str, n_nodes: int, image_dir: str, image_hash: str, *,
             detached: bool, number_taken: Callable[[int, ipaddress.IPv4Network], bool]) -> SandboxRecord:
    """Reserve a name, a subnet and a number and write the record (status 'creating').
    `number_taken(number, subnet)` lets the backend veto a number whose names (bridge, network)
    are still in use on the host."""
    if not NAME_RE.match(name):
        raise ValueError(f"sandbox name '{name}': use 1-31 lowercase letters, digits and '-', "
                         "starting with a letter")
    with locked():
        records = list_records()
        if any(r.name == name for r in records):
            raise SandboxExists(f"a sandbox named '{name}' already exists; pick another name "
                                f"or run `remed sandbox down {name}`")
        if n_nodes > 253:
            raise ValueError(f"{n_nodes} nodes do not fit in a /24; at most 253")
        # The subnet and the number (which names the sandbox's bridge and machines) are
        # chosen separately, so that changing the pool never makes two sandboxes collide.
        used_nets = {r.subnet for r in records} | _subnets_on_host()
        subnets = list(pool().subnets(new_prefix=24))
        net = next((n for n in subnets if str(n) not in used_nets), None)
        if net is None:
            raise NoFreeAddress(f"all {len(subnets)} subnets of {pool()} are taken; run "
                                "`remed sandbox ls` and `remed sandbox down NAME` (or `remed "
                                "sandbox gc`), or set E2E_REME_SUBNET_POOL to a larger range")
        taken = {r.number for r in records}
        number = next(i for i in range(100000) if i not in taken and not number_taken(i, net))
        owner = None if detached else os.getpid()
        rec = SandboxRecord(
            name=name, backend=backend, number=number, subnet=str(net), gateway=str(next(net.hosts())),
            image_dir=image_dir, image_hash=image_hash,
            nodes=[NodeRecord(i, f"n{i}", f"{name}-n{i}", ip) for i, ip in enumerate(node_addresses(net, n_nodes))],
            owner_pid=owner, owner_start=proc_start_time(owner) if owner else None,
            created_at=time.time())
        save(rec)
        return rec


def node_addresses(net: ipaddress.IPv4Network, n: int) -> list[str]:
    """The addresses of a sandbox's `n` nodes in its subnet: `.1` is the host's, nodes
    count up from `.2`."""
    return [str(ip) for ip in itertools.islice(net.hosts(), 1, n + 1)]


def _subnets_on_host() -> set[str]:
    """/24s that an interface on the host already has an address in (ours or not)."""
    import subprocess
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    nets = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            addr = parts[parts.index("inet") + 1]
            nets.add(str(ipaddress.ip_interface(addr.split("/")[0] + "/24").network))
    return nets
