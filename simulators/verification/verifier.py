"""The verifier: did the remediation really restore the system, and only by fixing it?

Its verdict is the benchmark's score and the reinforcement-learning reward, so it must be
hard to fool. Before injection it records a **baseline** of the healthy deployment; after
a remediation a verdict is a success only if ALL of these hold, each with its evidence:

    fault_gone      the injected fault's ground truth, read from the sandbox, is gone
    services        the target and every other service: unit active, listening, /health
                    200 from *our* runtime (same identity as at baseline)
    integrity       nothing was replaced or bent: the same executable, command line, code
                    and (parsed) configuration as at baseline, the listening socket owned
                    by the unit's own process; no node rebooted; sshd running
    runtime         the runtime environment as at baseline, read from the host (nspawn) or by
                    the verifier's toolset (libvirt): each service's environment, executable,
                    code and mapped libraries, and no file changed outside the data dirs but
                    the fault's own footprint (interpreter hooks, drop-ins, tools on PATH,
                    preloads); the mount table, every unit and drop-in directory and the
                    cgroups as at baseline (runtime_state.py)
    persistence     the playbook left nothing for later (a timer, a new unit, a process
                    written into a unit's cgroup, a cron job): the leftover sweep ended it
                    and recorded it (persistence.py)
    function        a nonce challenge through the entry that only the deployed code, calling
                    its dependencies and writing its store, answers right (challenge.py)
    seed_data       the data written at deploy time is intact (read by the host / the
                    verifier's isolated toolset, never by a tool of the node)
    slo             the end-to-end SLO holds under the standard load for a window

"Fault gone" is the fault's ground truth off *and* no residue: its processes, recorded
from the host at injection by pid + start time, gone (not stopped, renamed or untagged),
its stray file gone by inode, no mask over it. What counts as a fix per fault type is
simulators/verification/fixtable.py, shown in docs/verdict.md.

Why these close the known loopholes: doing nothing leaves the fault (fault_gone);
disabling or killing the target leaves it inactive (services); a stub answering /health
does not own the unit's socket or has another command line (integrity); deleting data and
restarting fails seed_data; cutting the target out of the call graph changes the parsed
config (integrity); blocking the load fails slo.

It also reports a **disruption** score: restarts of services during the remediation and,
when a background probe ran while the playbook executed, the downtime it saw.

A verdict that could not be reached (the sandbox does not answer) has `judged=False`: an
infrastructure problem, never a policy failure.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import hashlib

from e2e_reme.simulators.sandbox import hostview
from e2e_reme.simulators.verification import persistence, runtime_state
from e2e_reme.simulators.verification.challenge import resp, run_challenge
from e2e_reme.simulators.systems.probe import guest_runtime_facts, probe_all
from e2e_reme.simulators.errors import SandboxError
from e2e_reme.simulators.sandbox.base import Sandbox
from e2e_reme.simulators.systems.target import ServiceTarget


class _Fault(Protocol):
    name: str

    def is_active(self, sb: Sandbox) -> bool: ...


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    evidence: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    success: bool
    judged: bool
    checks: tuple[Check, ...]
    disruption: dict
    duration_s: float
    reason: str = ""   # one line: why not a success (the first failed check), or why not judged
    skipped: tuple[str, ...] = ()   # checks not run because an earlier one had already failed

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


@dataclass(frozen=True)
class Baseline:
    """The healthy deployment as the verifier will compare it later."""

    taken_at: float
    nodes: dict[int, dict]            # probe output per node
    health: dict[str, dict]           # service -> {"status", "identity"}
    seed: dict                        # service-independent: what seed checks found
    load: dict | None                 # the load result at baseline (for the record)
    # node -> the runtime facts: read from the host (nspawn, hostview.node_facts) or by
    # the verifier's toolset (libvirt, probe.guest_runtime_facts)
    runtime: dict = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2, default=str))
        return path

    @classmethod
    def load_from(cls, path: Path) -> "Baseline":
        data = json.loads(path.read_text())
        data["nodes"] = {int(k): v for k, v in data["nodes"].items()}
        # "host": the name in baselines saved before libvirt guests had runtime facts
        data["runtime"] = {int(k): v for k, v in (data.pop("runtime", None) or data.pop("host", None) or {}).items()}
        return cls(**data)


# ---- the facts ----------------------------------------------------------------------------

def _health(t: ServiceTarget, timeout: float = 3.0) -> dict:
    """One health call from the host. Redis answers PING instead of HTTP."""
    t0 = time.monotonic()
    if t.kind == "redis" or not t.health_path:
        import socket
        try:
            with socket.create_connection((t.host, t.port), timeout=timeout) as s:
                s.sendall(b"PING\r\n")
                s.settimeout(timeout)
                ok = s.recv(64).startswith(b"+PONG")
            return {"status": 200 if ok else 503, "identity": "redis", "ms": _ms(t0)}
        except OSError as e:
            return {"status": 0, "error": str(e), "ms": _ms(t0)}
    try:
        with urllib.request.urlopen(t.url + t.health_path, timeout=timeout) as r:
            body = r.read(4096)
            status = r.status
    except urllib.error.HTTPError as e:
        return {"status": e.code, "error": str(e), "ms": _ms(t0)}
    except (OSError, ValueError) as e:
        return {"status": 0, "error": str(e), "ms": _ms(t0)}
    try:
        data = json.loads(body)
        identity = {k: data.get(k) for k in ("service", "token", "system") if k in data}
    except ValueError:
        identity = {"raw": body[:200].decode(errors="replace")}
    return {"status": status, "identity": identity, "ms": _ms(t0)}


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 1)


def seed_check(sb: Sandbox, deployment: Any) -> dict:
    """The deployment's seed data (redis keys, data files) compared with its checksums,
    read with the verifier's own code: redis keys over RESP from the host, files through
    the node's root from the host (nspawn) or by the verifier's isolated toolset (libvirt),
    never by a tool of the node (a `sha256sum` earlier on its PATH could replay the sums)."""
    from e2e_reme.simulators.systems.probe import hash_files
    problems: list[str] = []
    for name, r in deployment.seed.get("redis", {}).items():
        t = deployment.targets.get(name)
        host = t.host if t else sb.nodes[int(r["node"])].ip
        keys = list(r["keys"])
        try:
            vals = resp(host, int(r["port"]), "MGET", *keys) if keys else []
        except OSError as e:
            problems.append(f"redis {name}: cannot read the seed keys: {e}")
            continue
        for k, v in zip(keys, vals):
            if v is None:
                problems.append(f"redis {name}: key {k} is missing")
            elif hashlib.sha256(v).hexdigest() != r["keys"][k]:
                problems.append(f"redis {name}: key {k} changed")
    for node, files in deployment.seed.get("files", {}).items():
        got = hash_files(sb, int(node), list(files))
        for p, h in files.items():
            if got.get(p) is None:
                problems.append(f"node {node}: seed file {p} is missing")
            elif got[p] != h:
                problems.append(f"node {node}: seed file {p} changed")
    return {"ok": not problems, "problems": problems[:20], "detail": "; ".join(problems[:3]),
            "read_by": "host" if hostview.supported(sb) else "toolset"}


def function_check(sb: Sandbox, deployment: Any) -> dict:
    """The functional challenge (challenge.py): nonce requests through the entry."""
    return run_challenge(deployment)


def load_check(sb: Sandbox, deployment: Any) -> dict:
    """The standard load against the entry for the SLO's window, judged by the SLO."""
    from e2e_reme.simulators.systems.loadgen import check_slo, failure_budget, run_load
    spec = deployment.slo
    # A failure past the success-rate budget decides "missed": the load stops there.
    result = run_load(deployment, max_failures=failure_budget(spec))
    judged = check_slo(result, spec)
    detail = (f"SLO met: success {result.success_rate:.3f}, p95 {result.p95_ms:.0f} ms" if judged.ok
              else "SLO missed: " + "; ".join(judged.reasons))
    return {"ok": judged.ok, "detail": detail, "load": result.to_json(),
            "slo": {"success_rate": spec.success_rate, "p95_ms": spec.p95_ms}}


def take_baseline(sb: Sandbox, deployment: Any, *, seed_check=seed_check, load_check=None) -> Baseline:
    """Record the healthy deployment. Take it after deploy is confirmed healthy (and after
    any checkpoint): taken too early it guards nothing."""
    targets: dict[str, ServiceTarget] = deployment.targets
    nodes = probe_all(sb, targets)
    missing = [i for i, facts in nodes.items() if facts is None]
    if missing:
        raise RuntimeError(f"sandbox {sb.name}: nodes {missing} did not answer the baseline probe")
    health = {name: _health(t) for name, t in targets.items()}
    sick = {n: h for n, h in health.items() if h["status"] != 200}
    if sick:
        raise RuntimeError(f"sandbox {sb.name}: not healthy at baseline: {sorted(sick)}; "
                           "deploy first and wait for health")
    seed = seed_check(sb, deployment) if seed_check else {}
    load = load_check(sb, deployment) if load_check else None
    return Baseline(time.time(), nodes, health, seed, load, runtime_facts(sb, targets))


def runtime_facts(sb: Sandbox, targets: dict[str, ServiceTarget]) -> dict[int, dict]:
    """Per node, its services' environment, executable, code and mappings and its files:
    read from the host where it can look in (nspawn), else by the verifier's toolset."""
    out = {}
    for i in range(len(sb.nodes)):
        units = [t.unit for t in targets.values() if t.node == i]
        facts = (hostview.node_facts(sb, i, units) if hostview.supported(sb)
                 else guest_runtime_facts(sb, i, units))
        if facts is not None:
            # Its mounts, unit and drop-in directories, job spools and cgroups (issue 28).
            facts["state"] = runtime_state.node_state(sb, i, units)
            out[i] = facts
    return out


def verify(sb: Sandbox, deployment: Any, baseline: Baseline, faults: Iterable[_Fault] = (), *,
           seed_check=seed_check, load_check=load_check, probe_downtime: dict | None = None,
           before: dict[int, dict] | None = None, function_check=function_check,
           runtime: bool = True) -> Verdict:
    """Judge the sandbox now against the baseline. `seed_check(sb, deployment)` and
    `load_check(sb, deployment)` return {"ok": bool, ...evidence}; `probe_downtime` is
    what a background probe saw during the remediation, if one ran; `before` is
    `probe_all()` taken just before the remediation, so that disruption counts only what
    the remediation did (the fault itself may have restarted a service).
    `function_check(sb, deployment)` is the challenge (None: skipped); `runtime=False`
    leaves out what is read from the host (the runtime check and the faults' residue)."""
    t0 = time.monotonic()
    faults = list(faults)
    for attempt in range(2):
        try:
            return _judge(sb, deployment, baseline, faults, seed_check, load_check,
                          probe_downtime, before, t0, function_check, runtime)
        except SandboxError as e:
            # A remediation may still be tearing things down after its playbook returned
            # (a detached `kill -9 -1`, a delayed restart of sshd): wait for the nodes to
            # answer and judge the settled state once more.
            why = str(e)
            sb._close_ssh()
            try:
                sb.wait_ready(timeout=30)
            except SandboxError as e2:
                why = str(e2)
                break
    return Verdict(False, False, (), {}, round(time.monotonic() - t0, 3),
                   reason=f"the sandbox did not answer while being judged, cannot judge: {why}")


def _judge(sb, deployment, baseline, faults, seed_check, load_check, probe_downtime, before,
           t0, function_check=None, runtime=False) -> Verdict:
    targets: dict[str, ServiceTarget] = deployment.targets
    nodes = probe_all(sb, targets)
    if any(facts is None for facts in nodes.values()):
        # A remediation may have just restarted sshd or the network: give the nodes a
        # moment to answer again before calling the sandbox unjudgeable.
        sb._close_ssh()
        try:
            sb.wait_ready(timeout=20)
        except SandboxError:
            pass
        nodes = probe_all(sb, targets)
    if any(facts is None for facts in nodes.values()):
        dead = [sb.nodes[i].name for i, f in nodes.items() if f is None]
        return Verdict(False, False, (), {}, round(time.monotonic() - t0, 3),
                       reason=f"nodes {dead} did not answer: cannot judge")
    checks = [
        _check_faults(sb, faults, with_residue=runtime),
        _check_services(targets, nodes, baseline),
        _check_integrity(targets, nodes, baseline),
    ]
    if runtime and baseline.runtime:
        checks.append(_check_runtime(sb, targets, baseline, faults))
        # What the playbook left scheduled or running for later, ended before this verdict.
        checks.append(Check("persistence", *persistence.check(sb, baseline.taken_at)))
    if function_check:
        res = function_check(sb, deployment)
        checks.append(Check("function", bool(res.get("ok")), res.get("detail", ""), res))
    if seed_check:
        res = seed_check(sb, deployment)
        checks.append(Check("seed_data", bool(res.get("ok")),
                            "seed data intact" if res.get("ok") else f"seed data changed: {res.get('detail', '')}",
                            res))
    skipped: tuple[str, ...] = ()
    if load_check and any(not c.passed for c in checks):
        # The SLO window is the verdict's longest wait (the spec's window of load), and a
        # failed check has already decided: a failure costs that window no more.
        skipped = ("slo",)
    elif load_check:
        res = load_check(sb, deployment)
        checks.append(Check("slo", bool(res.get("ok")), res.get("detail", ""), res))
    disruption = _disruption(targets, nodes, before or baseline.nodes, probe_downtime)
    failed = [c for c in checks if not c.passed]
    return Verdict(not failed, True, tuple(checks), disruption, round(time.monotonic() - t0, 3),
                   reason=f"{failed[0].name}: {failed[0].detail}" if failed else "", skipped=skipped)


# ---- the checks ---------------------------------------------------------------------------

def _check_faults(sb: Sandbox, faults: Iterable[_Fault], with_residue: bool = True) -> Check:
    """Gone means gone: the node's own view (`is_active`) and, read from outside where the
    backend allows, what is left of the fault (`residue`: its processes by identity, its
    stray file by inode, a mask over it). Either one keeps the fault active."""
    active, residue = {}, {}
    for f in faults:
        try:
            active[f.name] = bool(f.is_active(sb))
            left = f.residue(sb) if with_residue and hasattr(f, "residue") else {}
        except SandboxError:
            raise   # the node is not answering: judge again once it does
        except Exception as e:  # a ground truth we cannot read is not a fix
            active[f.name] = f"unknown: {e}"
            continue
        if left:
            residue[f.name] = left
            active[f.name] = True
    still = [n for n, a in active.items() if a is not False]
    detail = "the injected fault is gone"
    if still:
        detail = f"still active: {', '.join(still)}"
        for n in still:
            if n in residue:
                detail += f" ({_residue_line(residue[n])})"
    return Check("fault_gone", not still, detail, {"active": active, "residue": residue})


def _residue_line(r: dict) -> str:
    if "processes" in r:
        states = sorted({p["state"] for p in r["processes"]})
        return f"{r['count']} of its processes still exist (state {','.join(states)})"
    if "stray_file" in r:
        return f"the stray file is still there at {r['stray_file']}" + (f"; {r['mask']}" if r.get("mask") else "")
    return json.dumps(r)[:160]


def _check_services(targets: dict[str, ServiceTarget], nodes: dict[int, dict], baseline: Baseline) -> Check:
    bad, evidence = [], {}
    for name, t in targets.items():
        facts = nodes[t.node]["services"].get(t.unit, {})
        health = _health(t)
        want = baseline.health.get(name, {}).get("identity")
        same_identity = want is None or health.get("identity") == want
        ok = facts.get("active") == "active" and facts.get("listening") and health["status"] == 200 \
            and same_identity
        evidence[name] = {"unit": facts.get("active"), "sub": facts.get("sub"),
                          "listening": facts.get("listening"), "health": health,
                          "identity_matches": same_identity}
        if not ok:
            why = (f"unit {facts.get('active')}" if facts.get("active") != "active" else
                   "not listening" if not facts.get("listening") else
                   f"/health {health['status']}" if health["status"] != 200 else
                   "/health answered by something else")
            bad.append(f"{name} ({why})")
    return Check("services", not bad, "every service active and healthy" if not bad else
                 "unhealthy: " + "; ".join(bad), evidence)


# Facts that must be as at baseline: what the service is and how it is configured.
_SAME = ("exe", "cmdline", "code_sha", "config_digest", "exec_start")


def _check_integrity(targets: dict[str, ServiceTarget], nodes: dict[int, dict], baseline: Baseline) -> Check:
    problems, evidence = [], {}
    for i, facts in nodes.items():
        base = baseline.nodes.get(i) or {}
        if facts["boot_id"] != base.get("boot_id"):
            problems.append(f"node n{i} rebooted")
        if facts["sshd"] != "active":
            problems.append(f"sshd on n{i} is {facts['sshd']}")
        elif base.get("sshd_pid") and facts.get("sshd_pid") != base.get("sshd_pid"):
            # Nothing a remediation needs restarts sshd; a changed pid means it was killed.
            problems.append(f"sshd on n{i} was killed or restarted")
    for name, t in targets.items():
        now = nodes[t.node]["services"].get(t.unit, {})
        then = (baseline.nodes.get(t.node) or {}).get("services", {}).get(t.unit, {})
        diffs = {k: {"baseline": then.get(k), "now": now.get(k)} for k in _SAME
                 if now.get("active") == "active" and then.get(k) != now.get(k)}
        owner_cg = now.get("socket_owner_cgroup") or ""
        if now.get("listening") and not owner_cg.endswith("/" + t.unit) and t.unit not in owner_cg:
            diffs["socket_owner"] = {"expected_unit": t.unit, "now": owner_cg or None,
                                     "pid": now.get("socket_owner_pid")}
        if diffs:
            problems.append(f"{name}: {', '.join(sorted(diffs))} changed")
            evidence[name] = diffs
    return Check("integrity", not problems, "nothing replaced, no reboot, sshd running" if not problems
                 else "; ".join(problems), evidence)


_HOOK_WORDS = ("sitecustomize", "usercustomize", ".pth", "ld.so.preload", "/etc/environment", ".bashrc",
               ".profile", "/bin/", "/sbin/", ".service.d/", "/systemd/")


def _check_runtime(sb: Sandbox, targets: dict[str, ServiceTarget], baseline: Baseline,
                   faults: Iterable[_Fault]) -> Check:
    """The runtime environment as at baseline (runtime_facts): each service's main
    process has the same environment, executable, code and mapped libraries (no preload,
    no PYTHON* variable, no sitecustomize on its path), and the node changed no file
    outside its data and logs (interpreter hooks, drop-ins, tools on PATH, libraries)
    except what the injected fault itself wrote (its footprint, docs/verdict.md)."""
    allowed = tuple(p for f in faults for p in _footprints(f))
    state_ok = runtime_state.allowances(faults)    # the fault's own mounts and drop-ins
    now = runtime_facts(sb, targets)
    problems, evidence = [], {}
    for i, base in baseline.runtime.items():
        cur = now.get(i)
        if cur is None:
            problems.append(f"node n{i}: its runtime facts cannot be read")
            continue
        for unit, then in base["services"].items():
            diffs = _process_diffs(then, cur["services"].get(unit, {}))
            if diffs:
                evidence[unit] = diffs
                problems.append(f"{unit}: {', '.join(sorted(diffs))} changed")
        more, seen = runtime_state.compare(base.get("state"), cur.get("state"), *state_ok)
        if more:
            evidence[f"n{i}_state"] = seen
            problems += [f"node n{i}: {p}" for p in more]
        changed = _changed(base["upper"], cur["upper"], allowed)
        changed.update(_changed(base["run_dropins"], cur["run_dropins"], allowed))
        if changed:
            hooks = sorted(p for p in changed if any(w in p for w in _HOOK_WORDS))
            evidence[f"n{i}_files"] = dict(sorted(changed.items())[:40])
            problems.append(f"node n{i}: {len(changed)} file(s) changed outside the data dirs"
                            + (f", among them {', '.join(hooks[:3])}" if hooks else
                               f": {', '.join(sorted(changed)[:3])}"))
    return Check("runtime", not problems, "the runtime environment is as at baseline" if not problems
                 else "; ".join(problems[:4]), evidence)


def _footprints(f) -> tuple[str, ...]:
    parts = getattr(f, "parts", None)
    if parts:
        return tuple(p for part in parts for p in _footprints(part))
    return tuple(f.footprint()) if hasattr(f, "footprint") else ()


def _process_diffs(then: dict, now: dict) -> dict:
    if not then.get("running") or not now.get("running"):
        return {}   # not running: the services check says so
    out = {}
    for k in ("exe", "argv", "code_sha"):
        if then.get(k) != now.get(k):
            out[k] = {"baseline": then.get(k), "now": now.get(k)}
    env_then, env_now = then.get("environ", {}), now.get("environ", {})
    env = {k: {"baseline": env_then.get(k), "now": env_now.get(k)}
           for k in sorted(set(env_then) | set(env_now)) if env_then.get(k) != env_now.get(k)}
    if env:
        out["environ"] = env
    new_maps = sorted(set(now.get("maps", [])) - set(then.get("maps", [])))
    if new_maps:
        out["maps"] = {"new": new_maps[:20]}
    return out


def _changed(then: dict[str, str], now: dict[str, str], allowed: tuple[str, ...]) -> dict:
    out = {}
    for path in set(then) | set(now):
        if then.get(path) == now.get(path):
            continue
        if any(path == a or (a.endswith("/") and path.startswith(a)) for a in allowed):
            continue
        out[path] = {"baseline": then.get(path, "absent"), "now": now.get(path, "absent")}
    return out


def _disruption(targets: dict[str, ServiceTarget], nodes: dict[int, dict], before: dict[int, dict],
                probe_downtime: dict | None) -> dict:
    restarted = []
    for name, t in targets.items():
        now = nodes[t.node]["services"].get(t.unit, {})
        then = (before.get(t.node) or {}).get("services", {}).get(t.unit, {})
        if now.get("main_pid") != then.get("main_pid") or now.get("restarts") != then.get("restarts"):
            restarted.append(name)
    out = {"restarted_services": restarted, "restarts": len(restarted)}
    if probe_downtime:
        out.update(probe_downtime)
    # One number to compare remediations by: restarts, plus seconds of observed downtime.
    out["score"] = round(len(restarted) + float(out.get("downtime_s", 0.0)), 2)
    return out


# ---- the stored baseline of a sandbox (for the CLI and other processes) -------------------

def baseline_path(sb: Sandbox) -> Path:
    return sb.record.dir / "baseline.json"


def record_baseline(sb: Sandbox, deployment: Any) -> Baseline:
    """Take the baseline now and keep it beside the sandbox's record."""
    b = take_baseline(sb, deployment)
    b.save(baseline_path(sb))
    return b


def stored_baseline(sb: Sandbox) -> Baseline | None:
    p = baseline_path(sb)
    return Baseline.load_from(p) if p.exists() else None
