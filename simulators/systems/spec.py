"""System specs: one YAML file per microservice system, in `specs/<name>.yaml`.

A spec says which services exist, what each request type of each service does (which
services it calls, in order; CPU, memory and disk work; Redis operations), how much of
the node each service may use, where each service runs, which service is the entry,
what load is sent to the entry and what that load must achieve (the SLO):

    name: simple-micro
    description: two tiny HTTP services
    entry: hello-service                 # the service the load generator drives
    placement:                           # node index -> services on it (nodes 0..N-1)
      0: [hello-service, time-service]
    services:
      hello-service:
        kind: http                       # http (our runtime) | redis (a datastore)
        port: 8080
        health: /health                  # default
        limits: {cpu_quota: 50%, memory_max: 64M}   # systemd CPUQuota= / MemoryMax=
        timeout_ms: 3000                 # budget for a request arriving here (deadline propagates)
        seed: {files: 2, kib: 2}         # JSON files written into its data dir at deploy
        requests:
          hello:                         # served at GET /hello
            calls: [time-service/now]    # <service>/<request type>, called in this order
            cpu_ms: 1                    # CPU burnt per request
            memory_kib: 256              # memory allocated and touched per request
            disk_write_kib: 4            # written (and fsynced) under its data dir
            disk_read_kib: 2             # read back from its seed files
            redis:                       # on a redis service of this spec; {user} comes
              - {service: redis-cart, op: get, key: "cart:{user}"}   # from the query string
      redis-cart:
        kind: redis
        port: 6379
        seed: {keys: 20, key_pattern: "cart:seed-{i}", value_bytes: 200}
    request_mix: {hello: 1}              # request types of the entry, with weights
    slo: {success_rate: 0.99, p95_ms: 200, rps: 10, window_s: 10}   # under this standard load

A spec with errors (unknown dependency or request type, a port used twice on a node, a
cycle in the call graph, a missing or unknown entry, a service placed twice or not at
all, bad limit syntax, an unknown key, a key defined twice) is refused with a
`SpecError` listing `file:line: reason` for every problem found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from e2e_reme.simulators.errors import SystemSpecError, UnknownSystem

SpecError = SystemSpecError

SPECS_DIR = Path(__file__).resolve().parent / "specs"
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
REQUEST_RE = re.compile(r"^[a-z][a-z0-9_-]{0,40}$")
CPU_QUOTA_RE = re.compile(r"^[1-9][0-9]{0,4}%$")
MEMORY_RE = re.compile(r"^[1-9][0-9]*[KMG]?$")
KEY_PLACEHOLDERS = {"user"}
RESERVED_PATHS = {"/metrics"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Call(_Model):
    service: str
    request: str

    def __str__(self) -> str:
        return f"{self.service}/{self.request}"


class RedisOp(_Model):
    service: str
    op: Literal["get", "set", "del", "incr"]
    key: str = Field(min_length=1)
    value_bytes: int = Field(64, ge=1, le=65536)


class RequestType(_Model):
    calls: tuple[Call, ...] = ()
    cpu_ms: float = Field(0.0, ge=0, le=200)
    memory_kib: int = Field(0, ge=0, le=65536)
    disk_write_kib: int = Field(0, ge=0, le=4096)
    disk_read_kib: int = Field(0, ge=0, le=4096)
    redis: tuple[RedisOp, ...] = ()

    @field_validator("calls", mode="before")
    @classmethod
    def _parse_calls(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            return v
        out = []
        for c in v:
            if isinstance(c, str):
                if c.count("/") != 1 or not all(c.split("/")):
                    raise ValueError(f"call '{c}' must be '<service>/<request type>'")
                svc, req = c.split("/")
                out.append({"service": svc, "request": req})
            else:
                out.append(c)
        return out


class Limits(_Model):
    cpu_quota: str | None = None      # systemd CPUQuota=, e.g. "50%"
    memory_max: str | None = None     # systemd MemoryMax=, e.g. "64M"

    @field_validator("cpu_quota", mode="before")
    @classmethod
    def _cpu(cls, v: Any) -> Any:
        if v is not None and not CPU_QUOTA_RE.match(str(v)):
            raise ValueError(f"cpu_quota '{v}' is not a systemd CPUQuota= (a percentage such as 50%)")
        return None if v is None else str(v)

    @field_validator("memory_max", mode="before")
    @classmethod
    def _mem(cls, v: Any) -> Any:
        if v is not None and not MEMORY_RE.match(str(v)):
            raise ValueError(f"memory_max '{v}' is not a systemd MemoryMax= (bytes or K/M/G, e.g. 64M)")
        return None if v is None else str(v)


class Seed(_Model):
    files: int = Field(0, ge=0, le=100)                 # http: JSON files in <data_dir>/seed/
    kib: int = Field(1, ge=1, le=1024)                  # size of each
    keys: int = Field(0, ge=0, le=10000)                # redis: keys set at deploy
    key_pattern: str = "seed:{i}"
    value_bytes: int = Field(128, ge=1, le=65536)


class Service(_Model):
    kind: Literal["http", "redis"]
    port: int = Field(ge=1024, le=65535)
    description: str = ""
    health: str = "/health"
    limits: Limits = Limits()
    timeout_ms: int = Field(3000, ge=50, le=60000)
    seed: Seed = Seed()
    requests: dict[str, RequestType] = {}

    def dependencies(self) -> tuple[str, ...]:
        """Services this one calls or reads (redis included), in first-use order."""
        seen: dict[str, None] = {}
        for req in self.requests.values():
            for c in req.calls:
                seen.setdefault(c.service)
            for r in req.redis:
                seen.setdefault(r.service)
        return tuple(seen)


class SLO(_Model):
    success_rate: float = Field(gt=0, le=1)
    p95_ms: float = Field(gt=0)
    rps: float = Field(gt=0, le=200)          # the standard load
    window_s: float = Field(gt=0, le=300)


class SystemSpec(_Model):
    name: str
    description: str = ""
    entry: str
    placement: dict[int, tuple[str, ...]]
    services: dict[str, Service]
    request_mix: dict[str, float]
    slo: SLO
    source: str = ""                           # the file it was read from (not in the YAML)

    @property
    def nodes(self) -> int:
        return len(self.placement)

    def node_of(self, service: str) -> int:
        for node, names in self.placement.items():
            if service in names:
                return node
        raise KeyError(service)

    def dependents(self, service: str) -> tuple[str, ...]:
        return tuple(n for n, s in self.services.items() if service in s.dependencies())

    def hops(self, service: str, request: str) -> int:
        """How many HTTP services one request of this type touches (itself included):
        what the runtime reports as `hops` in its reply."""
        req = self.services[service].requests[request]
        return 1 + sum(self.hops(c.service, c.request) for c in req.calls)

    def http_services(self) -> list[str]:
        return [n for n, s in self.services.items() if s.kind == "http"]

    def redis_services(self) -> list[str]:
        return [n for n, s in self.services.items() if s.kind == "redis"]


# ---- reading a spec, with line numbers for every problem ---------------------------------

class _Lines:
    """Line numbers (1-based) of every key and item of a YAML document, by path, from the
    composed node tree; also the keys defined twice in one mapping (PyYAML's loader
    silently keeps the last one)."""

    def __init__(self, text: str):
        self.lines: dict[tuple, int] = {}
        self.duplicates: list[tuple[int, str]] = []
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            self._walk(root, ())

    def _walk(self, node: yaml.Node, path: tuple) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for k, v in node.value:
                key = _scalar(k)
                if key in seen:
                    where = ".".join(str(p) for p in path + (key,))
                    self.duplicates.append((k.start_mark.line + 1, f"'{where}' is defined twice"))
                seen.add(key)
                self.lines[path + (key,)] = k.start_mark.line + 1
                self._walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, path + (i,))

    def line(self, path: tuple) -> int | None:
        """The line of the longest prefix of `path` that exists in the document."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())


def _scalar(node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return int(node.value) if node.tag.endswith(":int") and node.value.lstrip("-").isdigit() else node.value
    return f"<complex key at line {node.start_mark.line + 1}>"


def list_systems() -> list[str]:
    """Names of the shipped systems (one per file in specs/)."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def spec_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists() and p.is_file():
        if not p.exists():
            raise SpecError(f"system spec {p}: no such file")
        return p
    candidate = SPECS_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        raise UnknownSystem(f"unknown system '{name_or_path}'; known: {', '.join(list_systems()) or 'none'} "
                            f"(or give the path of a spec file)")
    return candidate


def load_system(name_or_path: str | Path) -> SystemSpec:
    """A shipped system by name, or a spec file by path; validated."""
    path = spec_path(name_or_path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read it ({e.strerror})") from e
    return parse_spec(text, str(path))


def parse_spec(text: str, source: str = "<spec>") -> SystemSpec:
    try:
        lines = _Lines(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise SpecError(f"{source}:{line or '?'}: not valid YAML: {getattr(e, 'problem', None) or e}",
                        [(line, "not valid YAML")]) from e
    problems = list(lines.duplicates)
    if not isinstance(data, dict):
        problems.append((1, "a system spec is a mapping (name, entry, placement, services, request_mix, slo)"))
        _raise(source, problems)
    data = dict(data)
    data.pop("source", None)
    try:
        spec = SystemSpec.model_validate({**data, "source": source})
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            where = ".".join(str(p) for p in loc) or "(top)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required key is missing"
            problems.append((lines.line(loc), f"{where}: {msg}"))
        _raise(source, problems)
    problems += _semantic_problems(spec, lines)
    if problems:
        _raise(source, problems)
    return spec


def _raise(source: str, problems: list[tuple[int | None, str]]) -> None:
    problems = sorted(set(problems), key=lambda p: (p[0] or 0, p[1]))
    msg = "\n".join(f"{source}:{line if line is not None else '?'}: {reason}" for line, reason in problems)
    raise SpecError(msg, problems)


def _semantic_problems(spec: SystemSpec, lines: _Lines) -> list[tuple[int | None, str]]:
    out: list[tuple[int | None, str]] = []

    def bad(path: tuple, reason: str) -> None:
        out.append((lines.line(path), reason))

    if not NAME_RE.match(spec.name):
        bad(("name",), f"name '{spec.name}' must be lower-case letters, digits and '-'")
    services = spec.services
    if not services:
        bad(("services",), "a system needs at least one service")
    for name, svc in services.items():
        at = ("services", name)
        if not NAME_RE.match(name):
            bad(at, f"service name '{name}' must be lower-case letters, digits and '-'")
        if not svc.health.startswith("/") or svc.health in RESERVED_PATHS:
            bad(at + ("health",), f"health path '{svc.health}' must start with '/' and not be /metrics")
        if svc.kind == "redis":
            if svc.requests:
                bad(at + ("requests",), f"service '{name}' is a redis datastore: it has no request types "
                    "(other services use it through 'redis:' operations)")
            if svc.seed.files:
                bad(at + ("seed", "files"), f"service '{name}' is a redis datastore: seed it with keys, not files")
            if svc.seed.keys and "{i}" not in svc.seed.key_pattern:
                bad(at + ("seed", "key_pattern"), f"seed key_pattern '{svc.seed.key_pattern}' needs an {{i}}")
            continue
        if svc.seed.keys:
            bad(at + ("seed", "keys"), f"service '{name}' is http: seed it with files, not keys")
        if not svc.requests:
            bad(at, f"http service '{name}' has no request types")
        for rname, req in svc.requests.items():
            rat = at + ("requests", rname)
            if not REQUEST_RE.match(rname):
                bad(rat, f"request type '{rname}' must be lower-case letters, digits, '-' or '_'")
            if f"/{rname}" == svc.health or f"/{rname}" in RESERVED_PATHS:
                bad(rat, f"request type '{rname}' clashes with the path {svc.health} or /metrics")
            for i, call in enumerate(req.calls):
                cat = rat + ("calls", i)
                if call.service not in services:
                    bad(cat, f"{name}/{rname} calls unknown service '{call.service}'")
                elif services[call.service].kind != "http":
                    bad(cat, f"{name}/{rname} calls '{call.service}', a redis datastore: use a 'redis:' operation")
                elif call.request not in services[call.service].requests:
                    known = ", ".join(services[call.service].requests) or "none"
                    bad(cat, f"{name}/{rname} calls unknown request type '{call}' (known: {known})")
                if call.service == name:
                    bad(cat, f"{name}/{rname} calls itself")
            for i, op in enumerate(req.redis):
                oat = rat + ("redis", i)
                if op.service not in services:
                    bad(oat, f"{name}/{rname} uses unknown redis service '{op.service}'")
                elif services[op.service].kind != "redis":
                    bad(oat, f"{name}/{rname} uses '{op.service}' as redis, but it is {services[op.service].kind}")
                unknown = set(re.findall(r"{(\w*)}", op.key)) - KEY_PLACEHOLDERS
                if unknown:
                    bad(oat + ("key",), f"redis key '{op.key}' uses unknown placeholder(s) "
                        f"{', '.join(sorted(unknown))} (known: {', '.join(sorted(KEY_PLACEHOLDERS))})")
            if req.disk_read_kib and not svc.seed.files:
                bad(rat + ("disk_read_kib",), f"{name}/{rname} reads from disk but '{name}' has no seed files to read")

    # The entry and the load sent to it.
    if spec.entry not in services:
        bad(("entry",), f"entry '{spec.entry}' is not a service of this system")
    elif services[spec.entry].kind != "http":
        bad(("entry",), f"entry '{spec.entry}' must be an http service")
    else:
        for rtype in spec.request_mix:
            if rtype not in services[spec.entry].requests:
                bad(("request_mix", rtype), f"request_mix type '{rtype}' is not a request type of the "
                    f"entry '{spec.entry}' (known: {', '.join(services[spec.entry].requests)})")
    if not spec.request_mix:
        bad(("request_mix",), "request_mix needs at least one request type")
    for rtype, w in spec.request_mix.items():
        if w <= 0:
            bad(("request_mix", rtype), f"request_mix weight of '{rtype}' must be > 0")

    # Placement: every service on exactly one node, nodes numbered 0..N-1, no port twice.
    where: dict[str, int] = {}
    for node, names in spec.placement.items():
        for i, name in enumerate(names):
            pat = ("placement", node, i)
            if name not in services:
                bad(pat, f"placement of node {node} names unknown service '{name}'")
            elif name in where:
                bad(pat, f"service '{name}' is placed twice (nodes {where[name]} and {node})")
            else:
                where[name] = node
        ports: dict[int, str] = {}
        for name in names:
            if name in services:
                port = services[name].port
                if port in ports and ports[port] != name:
                    bad(("services", name, "port"), f"port {port} is used twice on node {node} "
                        f"('{ports[port]}' and '{name}')")
                ports.setdefault(port, name)
    if sorted(spec.placement) != list(range(len(spec.placement))):
        bad(("placement",), f"placement nodes must be numbered 0..N-1, not {sorted(spec.placement)}")
    for name in services:
        if name not in where:
            bad(("services", name), f"service '{name}' is not placed on any node")

    # The call graph: no cycles, and every service reachable from the entry.
    graph = {n: [d for d in s.dependencies() if d in services] for n, s in services.items()}
    cycle = _find_cycle(graph)
    if cycle:
        bad(("services", cycle[0]), f"call-graph cycle: {' -> '.join(cycle)}")
    elif spec.entry in services and services[spec.entry].kind == "http" and not out:
        # Only on an otherwise sound graph: after a bad call or entry, every service
        # downstream of it would be reported too, burying the real mistake.
        seen, todo = set(), [spec.entry]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += graph[n]
        for name in services:
            if name not in seen:
                bad(("services", name), f"service '{name}' is not reachable from the entry '{spec.entry}' "
                    "(no request path gets to it, so no load ever would)")
    return out


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = GREY
        stack.append(n)
        for d in graph[n]:
            if color[d] == GREY:
                return stack[stack.index(d):] + [d]
            if color[d] == WHITE:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        color[n] = BLACK
        return None

    for n in graph:
        if color[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None


@dataclass(frozen=True)
class SystemSummary:
    name: str
    description: str
    services: int
    http: int
    redis: int
    nodes: int
    entry: str
    slo: SLO
    source: str


def summarize(spec: SystemSpec) -> SystemSummary:
    return SystemSummary(spec.name, spec.description, len(spec.services), len(spec.http_services()),
                         len(spec.redis_services()), spec.nodes, spec.entry, spec.slo, spec.source)
