"""Deploying a system into a sandbox, and reading back what was deployed.

    dep = deploy(sb, "boutique")          # -> Deployment; persisted in the sandbox's state dir
    dep.entry.url, dep.targets["cartservice"].node, dep.seed
    dep = load_deployment(sb)             # from any process (or load_deployment("sandbox-name"))

What a deployment does: render, on the host, every node's files from the spec and the
sandbox's node addresses (each service's config with the *real* addresses of its
dependencies, its systemd unit, redis configs, seed data), pack them as one tarball per
node, and run one Ansible play (through `simulators.sandbox.ansible.run_playbook`) that copies
the tarball, replaces any earlier deployment, starts and enables the units, and loads the
redis seed keys. Then it waits until every service answers its health check (a probe,
never a fixed sleep) and a request of every type of the request mix succeeds through the
entry, touching as many services as the call graph says.

In the guest, for a service S:
    /etc/remed/S.yaml                    config read by /opt/remed/service.py (redis: S.conf)
    /etc/systemd/system/remed-S.service  its unit (CPUQuota= / MemoryMax= from the spec)
    /var/lib/remed/S/                    its data dir (seed/ seed files, work/ scratch)
    /etc/remed/system.json               what this node runs: system, token, services

Seed data (written at deploy so that data loss is detectable later): `Deployment.seed` is

    {"redis": {<redis service>: {"node": 1, "host": "198.18.3.3", "port": 6379,
                                 "keys": {<key>: <sha256 hex of the value>}}},
     "files": {"<node index>": {<absolute path>: <sha256 hex of the content>}}}

and `verify_seed(sb, deployment)` lists whatever is missing or changed.

Services run as root, like the rest of the guest. All of them (and redis) listen on
0.0.0.0; callers use the node's sandbox address, also for a dependency on the same node.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import shlex
import socket
import tarfile
import time
import http.client
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import yaml

from e2e_reme.simulators.errors import DeployError, NotDeployed
from e2e_reme.simulators.sandbox.base import Sandbox, attach
from e2e_reme.simulators.systems.spec import SLO, SystemSpec, load_system
from e2e_reme.simulators.systems.target import ServiceTarget

DEPLOYMENT_FILE = "deployment.json"
RUNTIME = "/opt/remed/service.py"
Progress = Callable[[str, str], None]
"""progress(step, detail): 'render', 'playbook' (task names), 'ready' (n/m), 'smoke', 'done'."""


@dataclass(frozen=True)
class Deployment:
    """A system as deployed in one sandbox: where each service runs and what to expect."""

    system: str
    spec: SystemSpec
    sandbox: str
    subnet: str                          # the sandbox's subnet: load is only ever sent inside it
    token: str                           # this deployment's identity, in every /health reply
    targets: dict[str, ServiceTarget]
    entry: ServiceTarget
    slo: SLO
    request_mix: dict[str, float]
    seed: dict
    deployed_at: float = 0.0
    deploy_s: float = 0.0
    image_hash: str = ""
    timings: dict[str, float] = field(default_factory=dict)   # render, playbook, ready, smoke

    def on_node(self, node: int) -> list[ServiceTarget]:
        return [t for t in self.targets.values() if t.node == node]

    def units(self, node: int | None = None) -> list[str]:
        return [t.unit for t in self.targets.values() if node is None or t.node == node]

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("system", "sandbox", "subnet", "token", "request_mix", "seed",
                                           "deployed_at", "deploy_s", "image_hash", "timings")}
        d["spec"] = self.spec.model_dump(mode="json")
        d["targets"] = {n: asdict(t) for n, t in self.targets.items()}
        d["entry"] = self.entry.service
        d["slo"] = self.slo.model_dump(mode="json")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Deployment":
        targets = {n: ServiceTarget(**{**t, "dependencies": tuple(t["dependencies"]),
                                       "dependents": tuple(t["dependents"])})
                   for n, t in d["targets"].items()}
        spec = SystemSpec.model_validate(d["spec"])
        return cls(system=d["system"], spec=spec, sandbox=d["sandbox"], subnet=d["subnet"], token=d["token"],
                   targets=targets, entry=targets[d["entry"]], slo=SLO.model_validate(d["slo"]),
                   request_mix=dict(d["request_mix"]), seed=d["seed"], deployed_at=d.get("deployed_at", 0.0),
                   deploy_s=d.get("deploy_s", 0.0), image_hash=d.get("image_hash", ""),
                   timings=d.get("timings", {}))


# ---- rendering -----------------------------------------------------------------------------

@dataclass
class _Rendered:
    files: dict[int, dict[str, tuple[bytes, int]]]   # node -> path -> (content, mode)
    units: dict[int, list[str]]                      # node -> units, datastores first
    targets: dict[str, ServiceTarget]
    seed: dict


def targets_for(spec: SystemSpec, node_ips: list[str]) -> dict[str, ServiceTarget]:
    """Where every service of `spec` runs, given the sandbox's node addresses."""
    if len(node_ips) < spec.nodes:
        raise DeployError(f"system {spec.name} needs {spec.nodes} node(s), the sandbox has {len(node_ips)}; "
                          f"create it with `remed sandbox up --system {spec.name}`")
    out = {}
    for name, svc in spec.services.items():
        node = spec.node_of(name)
        redis = svc.kind == "redis"
        out[name] = ServiceTarget(
            system=spec.name, service=name, kind=svc.kind, node=node, host=node_ips[node], port=svc.port,
            unit=f"remed-{name}.service",
            config_path=f"/etc/remed/{name}.conf" if redis else f"/etc/remed/{name}.yaml",
            data_dir=f"/var/lib/remed/{name}", dependencies=svc.dependencies(),
            dependents=spec.dependents(name), health_path="" if redis else svc.health)
    return out


def _seed_json(system: str, service: str, i: int, kib: int) -> bytes:
    """A deterministic JSON document of about `kib` KiB: records a service would keep."""
    records, size, n = [], 0, 0
    while size < kib * 1024 - 200:
        h = hashlib.sha256(f"{system}/{service}/{i}/{n}".encode()).hexdigest()
        rec = {"id": f"{service}-{i}-{n}", "user": f"seed-{int(h[:4], 16) % 50}",
               "items": [h[8:16], h[16:24]], "amount": int(h[24:30], 16) % 100000 / 100, "ref": h}
        records.append(rec)
        size += len(json.dumps(rec)) + 2
        n += 1
    return json.dumps({"system": system, "service": service, "part": i, "records": records},
                      indent=0).encode()


def _redis_value(system: str, service: str, key: str, nbytes: int) -> str:
    h = hashlib.sha256(f"{system}/{service}/{key}".encode()).hexdigest()
    body = {"key": key, "items": [{"product": h[i:i + 8], "qty": int(h[i + 8], 16) % 5 + 1} for i in (0, 16, 32)]}
    text = json.dumps(body)
    return text + " " * max(0, nbytes - len(text))


def render(spec: SystemSpec, node_ips: list[str], token: str) -> _Rendered:
    """Every file each node needs, with the real addresses filled in (nothing is sent)."""
    targets = targets_for(spec, node_ips)
    nodes = range(len(node_ips))
    files: dict[int, dict[str, tuple[bytes, int]]] = {n: {} for n in nodes}
    units: dict[int, list[str]] = {n: [] for n in nodes}
    seed: dict = {"redis": {}, "files": {}}
    for name in spec.redis_services() + spec.http_services():
        svc, t = spec.services[name], targets[name]
        node_files = files[t.node]
        limits = ""
        if svc.limits.cpu_quota:
            limits += f"CPUQuota={svc.limits.cpu_quota}\n"
        if svc.limits.memory_max:
            limits += f"MemoryMax={svc.limits.memory_max}\n"
        if svc.kind == "redis":
            conf = (f"# {spec.name}: {name} (written by remed system deploy)\n"
                    f"port {svc.port}\nbind 0.0.0.0\nprotected-mode no\ndaemonize no\nsupervised no\n"
                    f"dir {t.data_dir}\ndbfilename dump.rdb\nsave 60 1\nappendonly no\n"
                    f"loglevel notice\nlogfile \"\"\n")
            node_files[t.config_path] = (conf.encode(), 0o644)
            exec_start = f"/usr/bin/redis-server {t.config_path}"
            if svc.seed.keys:
                keys = {svc.seed.key_pattern.replace("{i}", f"{i:03d}"): None for i in range(1, svc.seed.keys + 1)}
                values = {k: _redis_value(spec.name, name, k, svc.seed.value_bytes) for k in keys}
                node_files[f"/etc/remed/{name}.seed.json"] = (
                    json.dumps({"host": "127.0.0.1", "port": svc.port, "keys": values}).encode(), 0o644)
                seed["redis"][name] = {"node": t.node, "host": t.host, "port": t.port,
                                       "keys": {k: hashlib.sha256(v.encode()).hexdigest() for k, v in values.items()}}
        else:
            cfg = {
                "service": name, "system": spec.name, "token": token, "port": svc.port, "listen": "0.0.0.0",
                "data_dir": t.data_dir, "health": svc.health, "timeout_ms": svc.timeout_ms,
                "dependencies": {d: {"host": targets[d].host, "port": targets[d].port, "kind": targets[d].kind}
                                 for d in svc.dependencies()},
                "requests": {r: req.model_dump(mode="json") for r, req in svc.requests.items()},
            }
            header = (f"# {spec.name}: {name}, read by {RUNTIME} at start (restart the unit after a change).\n"
                      "# dependencies: where this service calls each of its dependencies.\n")
            node_files[t.config_path] = ((header + yaml.safe_dump(cfg, sort_keys=False)).encode(), 0o644)
            exec_start = f"/usr/bin/python3 {RUNTIME} {t.config_path}"
            for i in range(1, svc.seed.files + 1):
                content = _seed_json(spec.name, name, i, svc.seed.kib)
                path = f"{t.data_dir}/seed/{name}-{i:02d}.json"
                node_files[path] = (content, 0o644)
                seed["files"].setdefault(str(t.node), {})[path] = hashlib.sha256(content).hexdigest()
        unit = (f"[Unit]\nDescription=E2E-REME {spec.name}: {name} ({svc.kind})\nAfter=network.target\n"
                f"StartLimitIntervalSec=30\nStartLimitBurst=10\n\n"
                f"[Service]\nType=simple\nExecStart={exec_start}\nRestart=on-failure\nRestartSec=1\n"
                f"Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1\n{limits}"
                f"\n[Install]\nWantedBy=multi-user.target\n")
        node_files[f"/etc/systemd/system/{t.unit}"] = (unit.encode(), 0o644)
        units[t.node].append(t.unit)
    for n in nodes:
        on_node = [t.service for t in targets.values() if t.node == n]
        files[n]["/etc/remed/units"] = ((" ".join(units[n]) + "\n").encode(), 0o644)
        files[n]["/etc/remed/system.json"] = (json.dumps(
            {"system": spec.name, "token": token, "node": n, "services": on_node}, indent=1).encode(), 0o644)
    return _Rendered(files, units, targets, seed)


def _tarball(files: dict[str, tuple[bytes, int]], dirs: list[str], path: Path) -> None:
    now = time.time()
    done: set[str] = set()
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        # Directories explicitly, so that data dirs exist even with no files in them.
        for d in sorted({str(Path(p).parent) for p in files} | set(dirs) | {"/var/lib/remed"}):
            parts = Path(d).parts[1:]
            for i in range(1, len(parts) + 1):
                name = "/".join(parts[:i])
                if name in done:
                    continue
                done.add(name)
                info = tarfile.TarInfo(name)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, now
                tar.addfile(info)
        for p, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo(p.lstrip("/"))
            info.size, info.mode, info.mtime = len(content), mode, now
            tar.addfile(info, io.BytesIO(content))


# The one task that does the work on each node: replace an earlier deployment, unpack,
# start, seed. One shell task instead of one module per file keeps a deploy to a few
# seconds (every task is an SSH round trip and a Python start on the node).
INSTALL = r"""set -eu
old=$(systemctl list-unit-files --no-legend --plain 'remed-*.service' | awk '{print $1}')
if [ -n "$old" ]; then systemctl disable --now $old >/dev/null 2>&1 || true; fi
rm -rf /etc/remed /var/lib/remed /etc/systemd/system/remed-*.service
tar -xzf /var/tmp/remed-bundle.tar.gz -C / --no-same-owner
rm -f /var/tmp/remed-bundle.tar.gz
systemctl daemon-reload
units=$(cat /etc/remed/units)
if [ -n "$units" ]; then systemctl enable --now $units 2>&1; fi
for f in /etc/remed/*.seed.json; do
  [ -e "$f" ] || continue
  python3 /opt/remed/service.py seed-redis "$f"
done
"""


def playbook(spec: SystemSpec, bundles: Path, runtime_override: Path | None = None) -> list[dict]:
    """The deployment play (a list of one play, as `run_playbook` takes it)."""
    tasks: list[dict] = []
    if runtime_override is not None:
        tasks.append({"name": "runtime directory", "file": {"path": str(Path(RUNTIME).parent), "state": "directory"}})
        tasks.append({"name": "install the service runtime (override of the image's)",
                      "copy": {"src": str(runtime_override), "dest": RUNTIME, "mode": "0755"}})
    tasks.append({"name": "copy the rendered configs, units and seed data",
                  "copy": {"src": f"{bundles}/{{{{ inventory_hostname }}}}.tar.gz",
                           "dest": "/var/tmp/remed-bundle.tar.gz", "mode": "0600"}})
    tasks.append({"name": f"install {spec.name} and (re)start its services",
                  "shell": INSTALL,
                  "args": {"executable": "/bin/bash"}})
    return [{"name": f"deploy {spec.name}", "hosts": "all", "gather_facts": False, "tasks": tasks}]


# ---- probing ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Health:
    service: str
    ok: bool
    status: int | None         # HTTP status (redis: None)
    latency_ms: float
    detail: str                # reply summary or error
    token: str = ""


def health(target: ServiceTarget, timeout: float = 1.0) -> Health:
    """One health check from the host: GET <health path> (http) or PING (redis)."""
    t0 = time.monotonic()
    try:
        if target.kind == "redis":
            with socket.create_connection((target.host, target.port), timeout=timeout) as s:
                s.settimeout(timeout)
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
            ms = (time.monotonic() - t0) * 1000
            ok = reply.startswith(b"+PONG")
            return Health(target.service, ok, None, round(ms, 2), reply.decode(errors="replace").strip())
        conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
        try:
            conn.request("GET", target.health_path)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        ms = (time.monotonic() - t0) * 1000
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        detail = data.get("status", "") if isinstance(data, dict) else ""
        if isinstance(data, dict) and data.get("problems"):
            detail += ": " + "; ".join(data["problems"])
        return Health(target.service, resp.status == 200, resp.status, round(ms, 2),
                     detail or body[:200].decode(errors="replace"),
                     data.get("token", "") if isinstance(data, dict) else "")
    except (OSError, http.client.HTTPException) as e:
        return Health(target.service, False, None, round((time.monotonic() - t0) * 1000, 2),
                     f"{type(e).__name__}: {e}")


def health_all(targets: dict[str, ServiceTarget], timeout: float = 1.0) -> dict[str, Health]:
    with ThreadPoolExecutor(min(16, max(1, len(targets)))) as pool:
        return dict(zip(targets, pool.map(lambda t: health(t, timeout), targets.values())))


def request_entry(dep: Deployment, rtype: str, user: str = "smoke", timeout: float = 10.0) -> tuple[int | None, dict]:
    """One request of type `rtype` through the entry; (status, JSON body) or (None, error)."""
    e = dep.entry
    conn = http.client.HTTPConnection(e.host, e.port, timeout=timeout)
    try:
        conn.request("GET", f"/{rtype}?user={user}")
        resp = conn.getresponse()
        body = resp.read()
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, {"error": body[:300].decode(errors="replace")}
    except (OSError, http.client.HTTPException) as ex:
        return None, {"error": f"{type(ex).__name__}: {ex}"}
    finally:
        conn.close()


def metrics(target: ServiceTarget, timeout: float = 2.0) -> dict:
    """The /metrics counters of an http service (see the runtime's docstring)."""
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


# ---- deploying -------------------------------------------------------------------------------

def deploy(sb: Sandbox, system: str | Path | SystemSpec, *, timeout_s: float = 300,
           ready_timeout_s: float = 90, progress: Progress | None = None,
           runtime_override: str | Path | None = None) -> Deployment:
    """Deploy `system` (a name, a spec path or a SystemSpec) into the sandbox, replacing any
    earlier deployment, and return it once every service is healthy and a request of
    every type succeeds through the entry. Raises DeployError saying which step failed
    and where to look (the playbook's artifacts, a unit's journal)."""
    say = progress or (lambda step, detail: None)
    t0 = time.monotonic()
    spec = system if isinstance(system, SystemSpec) else load_system(system)
    ips = [n.ip for n in sb.nodes]
    token = secrets.token_hex(8)
    say("render", f"{spec.name}: {len(spec.services)} services on {spec.nodes} node(s)")
    rendered = render(spec, ips, token)
    work = sb.record.dir / "deploy"
    bundles = work / "bundles"
    bundles.mkdir(parents=True, exist_ok=True)
    for n in range(len(ips)):
        _tarball(rendered.files[n], [t.data_dir for t in rendered.targets.values() if t.node == n],
                 bundles / f"{sb.nodes[n].name}.tar.gz")
    inventory = sb.write_inventory(work / "hosts.yaml")
    t_render = time.monotonic() - t0

    from e2e_reme.simulators.sandbox.ansible import run_playbook

    def on_event(ev: dict) -> None:
        if ev.get("event") == "playbook_on_task_start":
            say("playbook", ev.get("event_data", {}).get("task", ""))

    override = Path(runtime_override).resolve() if runtime_override else None
    run = run_playbook(inventory, playbook(spec, bundles, override), work / "ansible",
                       timeout_s=timeout_s, event_handler=on_event)
    t_play = time.monotonic() - t0 - t_render
    if not run.ok:
        raise DeployError(f"deploying {spec.name} into {sb.name}: the playbook {run.summary()}; "
                          f"see {run.artifact_dir}/stdout")

    dep = Deployment(system=spec.name, spec=spec, sandbox=sb.name, subnet=sb.record.subnet, token=token,
                     targets=rendered.targets, entry=rendered.targets[spec.entry], slo=spec.slo,
                     request_mix=dict(spec.request_mix), seed=rendered.seed, image_hash=sb.record.image_hash)
    t1 = time.monotonic()
    wait_healthy(sb, dep, ready_timeout_s, progress=say)
    t_ready = time.monotonic() - t1
    t1 = time.monotonic()
    say("smoke", f"one request of each type through {spec.entry}")
    smoke(dep)
    t_smoke = time.monotonic() - t1
    total = time.monotonic() - t0
    dep = replace(dep, deployed_at=time.time(), deploy_s=round(total, 2),
                  timings={"render": round(t_render, 2), "playbook": round(t_play, 2),
                           "ready": round(t_ready, 2), "smoke": round(t_smoke, 2)})
    save_deployment(sb, dep)
    say("done", f"{spec.name} deployed in {total:.1f} s")
    return dep


def wait_healthy(sb: Sandbox, dep: Deployment, timeout_s: float = 60,
                 progress: Progress | None = None) -> float:
    """Block until every service's health check passes (and shows this deployment's
    token); return the seconds waited. DeployError names the ones that did not, with
    the tail of their journal."""
    t0 = time.monotonic()
    pending = dict(dep.targets)
    last: dict[str, Health] = {}
    while pending:
        results = health_all(pending, timeout=1.0)
        last.update(results)
        for name, p in results.items():
            if p.ok and (dep.targets[name].kind == "redis" or p.token == dep.token):
                pending.pop(name)
        if progress:
            progress("ready", f"{len(dep.targets) - len(pending)}/{len(dep.targets)} services healthy")
        if not pending:
            break
        if time.monotonic() - t0 > timeout_s:
            lines = []
            for name in sorted(pending):
                t = dep.targets[name]
                j = sb.exec(f"systemctl is-active {t.unit}; journalctl -u {t.unit} -n 5 --no-pager -o cat",
                            node=t.node, timeout=15)
                tail = " | ".join(l for l in j.stdout.splitlines() if l.strip())[-400:]
                lines.append(f"{name} on node {t.node} ({t.host}:{t.port}): {last[name].detail}; unit: {tail}")
            raise DeployError(f"{dep.system} in {sb.name}: {len(pending)} service(s) not healthy after "
                              f"{timeout_s:.0f} s:\n  " + "\n  ".join(lines))
        time.sleep(0.1)
    return time.monotonic() - t0


def smoke(dep: Deployment) -> None:
    """One request of every request-mix type through the entry: each must answer 200 and
    report as many hops as the call graph has for it."""
    for rtype in dep.request_mix:
        status, body = request_entry(dep, rtype)
        want = dep.spec.hops(dep.spec.entry, rtype)
        if status != 200 or body.get("hops") != want:
            raise DeployError(f"{dep.system} in {dep.sandbox}: smoke request /{rtype} through {dep.entry.service} "
                              f"({dep.entry.url}) answered {status}: {body.get('error') or body} "
                              f"(expected 200 with {want} hops)")


def verify_seed(sb: Sandbox, dep: Deployment) -> list[str]:
    """Every seed key and file that is missing or changed since the deployment (empty: intact)."""
    problems: list[str] = []
    for name, r in dep.seed.get("redis", {}).items():
        keys = list(r["keys"])
        script = ("import hashlib,json,sys,redis\n"
                  f"c=redis.Redis(host='127.0.0.1',port={int(r['port'])},socket_timeout=3)\n"
                  f"ks={json.dumps(keys)}\n"
                  "vals=c.mget(ks)\n"
                  "print(json.dumps({k:(hashlib.sha256(v).hexdigest() if v is not None else None) for k,v in zip(ks,vals)}))\n")
        res = sb.exec(["python3", "-c", script], node=r["node"], timeout=20)
        if not res.ok:
            problems.append(f"redis {name}: cannot read the seed keys: {(res.stderr or res.stdout).strip()[-200:]}")
            continue
        got = json.loads(res.stdout)
        for k, h in r["keys"].items():
            if got.get(k) is None:
                problems.append(f"redis {name}: key {k} is missing")
            elif got[k] != h:
                problems.append(f"redis {name}: key {k} changed")
    for node, files in dep.seed.get("files", {}).items():
        paths = list(files)
        res = sb.exec("sha256sum " + " ".join(shlex.quote(p) for p in paths) + " 2>/dev/null; true",
                      node=int(node), timeout=20)
        got = {}
        for line in res.stdout.splitlines():
            h, _, p = line.partition("  ")
            got[p.strip()] = h
        for p, h in files.items():
            if p not in got:
                problems.append(f"node {node}: seed file {p} is missing")
            elif got[p] != h:
                problems.append(f"node {node}: seed file {p} changed")
    return problems


# ---- persistence ------------------------------------------------------------------------------

def save_deployment(sb: Sandbox, dep: Deployment) -> Path:
    path = sb.record.dir / DEPLOYMENT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dep.to_json(), indent=1))
    tmp.replace(path)
    return path


def load_deployment(sandbox: Sandbox | str) -> Deployment:
    """The system deployed in a sandbox (a handle or a name), as `deploy` recorded it."""
    sb = attach(sandbox) if isinstance(sandbox, str) else sandbox
    path = sb.record.dir / DEPLOYMENT_FILE
    try:
        return Deployment.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise NotDeployed(f"no system deployed in sandbox {sb.name}; run `remed system deploy SYSTEM "
                          f"--sandbox {sb.name}`") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DeployError(f"sandbox {sb.name}: {path} is unreadable ({type(e).__name__}: {e}); "
                          f"deploy again with `remed system deploy SYSTEM --sandbox {sb.name}`") from e


def forget_deployment(sb: Sandbox) -> None:
    (sb.record.dir / DEPLOYMENT_FILE).unlink(missing_ok=True)
