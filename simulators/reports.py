"""Diagnosis reports: what a policy is told about an incident.

Built from live observations (a short burst of the standard load through the entry, each
service's /metrics before and after it, unit states, the target's journal, the call graph)
and, at the most detailed level, from the injected fault's `describe()` (observed facts,
never how the fault was made). Three levels of detail, as the issue asks:

    full       service + category + fault kind + evidence (+ symptoms); the expert
               runbook's input (`report.runbook_input()`)
    symptoms   service + symptoms: which service looks wrong and what is seen, not why
    minimal    symptoms only: what the monitoring shows system-wide; no service is named

Every level carries the topology (the call graph, which node runs which service and the
inventory host names), which an SRE would know anyway. The text a model reads
(`to_text()`) is compact: a report that names the service tells its host, unit, port,
config, data dir, dependencies and callers rather than the whole graph, and its evidence
as one fact per line instead of the raw observation.

The report never leaks the harness: words that only the injector would use are replaced
(`_scrub`), and a test checks every fault type's report for them.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from e2e_reme.simulators.systems.probe import probe_all
from e2e_reme.simulators.sandbox.base import Sandbox

LEVELS = ("full", "symptoms", "minimal")

# Words that would reveal the harness rather than the incident, and neutral replacements.
_LEAKS = [
    (re.compile(r"stress-ng(-[a-z]+)?", re.I), "a busy worker process"),
    (re.compile(r"\bremed[-_]chaos[-_\w]*", re.I), "an extra unit"),
    (re.compile(r"\bchaos\b", re.I), "extra"),
    (re.compile(r"\binject(ed|or|ion)?\b", re.I), "introduced"),
]
LEAK_WORDS = ("stress-ng", "chaos", "inject")


def _scrub(obj: Any) -> Any:
    if isinstance(obj, str):
        for pat, repl in _LEAKS:
            obj = pat.sub(repl, obj)
        return obj
    if isinstance(obj, dict):
        return {_scrub(k): _scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_scrub(v) for v in obj]
    return obj


@dataclass(frozen=True)
class DiagnosisReport:
    system: str
    level: str
    symptoms: tuple[str, ...]
    observations: dict                       # entry load figures; per-service metrics deltas and unit state
    call_graph: dict[str, list[str]]
    placement: dict[str, list[str]]          # inventory host -> services
    service: str | None = None               # full, symptoms
    category: str | None = None              # full
    fault_kind: str | None = None            # full
    evidence: dict = field(default_factory=dict)     # full
    target: dict | None = None               # full, symptoms: where the service lives
    logs: tuple[str, ...] = ()               # full, symptoms: the service's recent error lines
    created_at: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def runbook_input(self) -> dict:
        """The expert runbook's input (policies/expert.py); only a full report has it."""
        if self.level != "full" or not self.target:
            raise ValueError(f"the runbook needs a full report, not '{self.level}'")
        return {"service": self.service, "fault_kind": self.fault_kind, **self.target,
                "evidence": self.evidence}

    def to_text(self) -> str:
        """The report as every model reads it (the benchmark's prompts, SFT, serving): compact,
        one fact per line, carrying what a remediation needs (the service's place: host,
        unit, port, config, data dir, dependencies; the failure; the evidence that names
        what to remove) and none of the raw observation dumps. A test per fault type checks
        that the expert runbook's playbook can be written from this text alone."""
        lines = [f"Incident in system {self.system}."]
        if self.service:
            lines.append(f"Affected service: {self.service}"
                         + (f" on host {_where(self.target)}" if self.target else "") + ".")
            deps = (self.target or {}).get("dependencies") or {}
            if deps:
                lines.append("Its dependencies: " + "; ".join(
                    f"{n} at {d.get('host')}:{d.get('port')} ({d.get('kind', 'http')})" for n, d in deps.items()) + ".")
        if self.category:
            lines.append(f"Failure: {self.category} ({self.fault_kind}).")
        lines.append("Symptoms:")
        lines += [f"- {_cut(s)}" for s in self.symptoms] or ["- none observed"]
        if self.evidence:
            parts = self.evidence.get("parts") if isinstance(self.evidence.get("parts"), list) else None
            kinds = (self.fault_kind or "").partition(":")[2].split("+") if parts else []
            for i, ev in enumerate(parts or [self.evidence]):
                label = f" ({kinds[i]})" if parts and i < len(kinds) else ""
                lines.append(f"Evidence{label}:")
                lines += [f"- {l}" for l in _evidence_lines(ev if isinstance(ev, dict) else {})]
        if self.logs:
            lines.append("Recent log lines of the service:")
            lines += [f"- {_cut(l)}" for l in self.logs[-3:]]
        if self.service:
            # Named service: its neighbourhood is what a fix may touch; the whole graph of a
            # 40-service system would be most of the prompt.
            callers = [a for a, b in self.call_graph.items() if self.service in (b or ())]
            callees = list(self.call_graph.get(self.service) or ())
            lines.append(f"Calls to {self.service} come from: {', '.join(callers) or 'outside (it is the entry)'}; "
                         f"it calls: {', '.join(callees) or 'nothing'}.")
        else:
            lines.append("Topology (host: services): " + "; ".join(
                f"{h}: {', '.join(s)}" for h, s in self.placement.items()))
            lines.append("Call graph: " + "; ".join(f"{a} -> {', '.join(b)}" for a, b in self.call_graph.items() if b))
        return "\n".join(lines)


def _cut(s: Any, n: int = 160) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[:n - 3] + "..."


def _where(t: dict) -> str:
    """`n1 (unit U, port P, ...)`: the first two fields keep the wording the benchmark's
    plumbing tests read."""
    health = "PING" if t.get("kind") == "redis" or not t.get("health_path", "/health") else t.get("health_path", "/health")
    return (f"{t['node']} (unit {t['unit']}, port {t['port']}, kind {t.get('kind', 'http')}, health {health}, "
            f"config {t.get('config_path')}, data dir {t.get('data_dir')})")


def _proc(p: dict) -> str:
    return f"pid {p.get('pid')} (unit {p.get('unit')}, {_cut(p.get('cmd') or p.get('name') or '?', 60)})"


def _evidence_lines(ev: dict) -> list[str]:
    """The evidence of one fault (its `describe()`), one fact per line: the findings it
    words itself, then the structured facts a fix acts on (what to stop, remove or
    restore). Everything else of the raw observation is left out."""
    out = [_cut(s) for s in ev.get("symptoms") or []]
    u = ev.get("unit_state") or {}
    if u:
        out.append(f"unit: {u.get('active')} ({u.get('sub')}, result {u.get('result')}), {u.get('restarts')} restarts")
        for d in u.get("drop_ins") or []:
            out.append(f"drop-in {d.get('path')}: " + ("; ".join(d.get("settings") or []) or "(empty)"))
    hogs = ev.get("memory_hogs") or []
    out += [f"memory hog: {_proc(h)} holds {h.get('rss_mib')} MiB" for h in hogs]
    if not hogs:
        big = [p for p in (ev.get("node_stats") or {}).get("top_memory") or [] if (p.get("rss_mib") or 0) >= 64]
        out += [f"large process: {_proc(p)} holds {p.get('rss_mib')} MiB" for p in big[:3]]
    listen = ev.get("listen")
    if listen:
        holders = listen.get("holders") or []
        out.append(f"port {listen.get('port')} held by: " + ("; ".join(_proc(h) for h in holders) or "nobody"))
    net = ev.get("network")
    if net is not None:
        out.append("qdiscs: " + ("; ".join(" ".join(q.split()) for q in net.get("qdiscs") or []) or "none"))
        drops = [" ".join(l.split()) for l in net.get("nft_ruleset") or [] if " drop" in l or "reject" in l]
        out.append("nft rules that drop: " + ("; ".join(drops) or "none"))
        for n, d in (net.get("dependencies") or {}).items():
            h = d.get("health") or {}
            out.append(f"from the node, {n} at {d.get('address')}: connect {_cut(d.get('tcp_connect'), 60)}, "
                       f"health {h.get('status', h.get('error', '?'))}")
    cfg = ev.get("config")
    if cfg and cfg.get("dependencies") is not None:
        out.append(f"config {cfg.get('path')} names: " + ("; ".join(
            f"{n} at {a.get('host')}:{a.get('port')}" for n, a in cfg["dependencies"].items()) or "no dependency"))
    disk = ev.get("disk")
    if disk:
        out.append(f"disk of {disk.get('data_dir')}: mounted at {disk.get('mount_point')} "
                   f"({disk.get('mount_options')}), {disk.get('use_pct')} used, writable {disk.get('writable')}")
        files = disk.get("largest_files") or []
        if files:
            out.append("largest files: " + "; ".join(f"{f.get('path')} ({f.get('mib')} MiB)" for f in files))
        for w in disk.get("open_by") or []:
            out.append(f"writing under it: {_proc(w)}: " + ", ".join(w.get("files") or []))
    fds = ev.get("fds")
    if fds and fds.get("open") is not None:
        out.append(f"open files of the main process: {fds.get('open')} (limit {fds.get('soft_limit')})")
    return out


def _metrics_safe(target) -> dict | None:
    from e2e_reme.simulators.systems.deploy import metrics
    if target.kind != "http":
        return None
    try:
        return metrics(target, timeout=2.0)
    except Exception:
        return None


def _all_metrics(targets: dict) -> dict:
    # Side by side: a service behind a lossy link costs its 2 s timeout once, not once
    # per service after it.
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(targets)))) as pool:
        return dict(zip(targets, pool.map(_metrics_safe, targets.values())))


def observe_system(sb: Sandbox, deployment: Any, window_s: float = 3.0) -> dict:
    """A short burst of the standard load, with each service's counters around it."""
    from e2e_reme.simulators.systems.loadgen import run_load
    targets = deployment.targets
    before = _all_metrics(targets)
    load = run_load(deployment, window_s=window_s, timeout_s=3.0)
    after = _all_metrics(targets)
    facts = probe_all(sb, targets)
    services = {}
    for name, t in targets.items():
        unit = ((facts.get(t.node) or {}).get("services") or {}).get(t.unit, {})
        b, a = before[name], after[name]
        entry = {"unit": unit.get("active"), "sub": unit.get("sub"), "restarts": unit.get("restarts")}
        if a is None:
            entry["metrics"] = "unavailable" if t.kind == "http" else "n/a"
        else:
            req = a["requests"] - (b or {}).get("requests", 0)
            err = a["errors"] - (b or {}).get("errors", 0)
            lat = a.get("latency_ms", {})
            entry.update(requests=req, errors=err,
                         mean_latency_ms=round(lat.get("sum", 0) / lat["count"], 1) if lat.get("count") else None)
        services[name] = entry
    return {"window_s": window_s, "entry": deployment.entry.service,
            "load": {"sent": load.sent, "success_rate": round(load.success_rate, 3),
                     "p95_ms": round(load.p95_ms, 1), "errors": load.errors},
            "slo": {"success_rate": deployment.slo.success_rate, "p95_ms": deployment.slo.p95_ms},
            "services": services}


def _symptoms(obs: dict, name_services: bool) -> list[str]:
    out = []
    load, slo = obs["load"], obs["slo"]
    failed = 1 - load["success_rate"]
    if failed > 0:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(load["errors"].items(), key=lambda kv: -kv[1])[:3])
        out.append(f"{failed:.0%} of requests to the entry ({obs['entry']}) failed over {obs['window_s']:.0f} s ({kinds})")
    if load["p95_ms"] > slo["p95_ms"]:
        out.append(f"p95 latency at the entry is {load['p95_ms']:.0f} ms (SLO {slo['p95_ms']:.0f} ms)")
    if not name_services:
        down = sum(1 for s in obs["services"].values() if s["unit"] not in ("active", None))
        if down:
            out.append(f"{down} service(s) are not running")
        return out
    for name, s in obs["services"].items():
        if s["unit"] not in ("active", None):
            out.append(f"{name}: unit is {s['unit']} ({s['sub']})")
        elif s.get("metrics") == "unavailable":
            out.append(f"{name}: does not answer its metrics endpoint")
        elif s.get("errors"):
            out.append(f"{name}: {s['errors']} of {s['requests']} requests failed")
        if s.get("mean_latency_ms") and s["mean_latency_ms"] > obs["slo"]["p95_ms"] / 2:
            out.append(f"{name}: mean latency {s['mean_latency_ms']:.0f} ms")
    return out


def target_info(sb: Sandbox, deployment: Any, service: str) -> dict:
    """Where a service lives, as a full or symptoms report tells it (the runbook's input)."""
    t = deployment.targets[service]
    return {"node": sb.nodes[t.node].name, "unit": t.unit, "config_path": t.config_path,
            "data_dir": t.data_dir, "port": t.port, "kind": t.kind, "health_path": t.health_path,
            "dependencies": {d: {"host": deployment.targets[d].host, "port": deployment.targets[d].port,
                                 "kind": deployment.targets[d].kind}
                             for d in t.dependencies if d in deployment.targets}}


def add_noise(report: DiagnosisReport, sb: Sandbox, deployment: Any, rng) -> tuple[DiagnosisReport, dict | None]:
    """A wrong diagnosis, as a real one sometimes is: the report names another service (its
    location too), or, at the full level, another failure kind of another category. Return
    the noised report and what was changed (None where the level names nothing to change)."""
    from dataclasses import replace
    from e2e_reme.simulators.faults.base import fault_catalog
    if report.service is None:
        return report, None
    options = ["service"] + (["kind"] if report.level == "full" and report.fault_kind else [])
    what = rng.choice(options)
    if what == "service":
        others = sorted(n for n in deployment.targets if n != report.service)
        if not others:
            what = "kind" if "kind" in options else None
        else:
            wrong = rng.choice(others)
            return (replace(report, service=wrong, target=target_info(sb, deployment, wrong)),
                    {"field": "service", "true": report.service, "reported": wrong})
    if what == "kind":
        catalog = fault_catalog()
        kinds = sorted(n for n, c in catalog.items() if c.category != report.category)
        wrong = rng.choice(kinds)
        return (replace(report, fault_kind=wrong, category=catalog[wrong].category),
                {"field": "fault_kind", "true": report.fault_kind, "reported": wrong})
    return report, None


def at_level(report: dict, level: str) -> dict:
    """A report dict (as `to_dict()` wrote it) told at a lower level of detail, from the
    same observations: what `build_report` would have written at that level for the same
    incident (the symptoms are recomputed; a minimal report names no service). Training
    uses it to show one verified incident at the three levels."""
    if level not in LEVELS:
        raise ValueError(f"report level '{level}': use one of {', '.join(LEVELS)}")
    have = report.get("level", "full")
    if LEVELS.index(level) < LEVELS.index(have):
        raise ValueError(f"a '{have}' report cannot be told at the more detailed level '{level}'")
    if level == have:
        return dict(report)
    out = dict(report, level=level, category=None, fault_kind=None, evidence={})
    obs = report.get("observations") or {}
    named = level == "symptoms"
    if obs.get("load") and obs.get("services") is not None:
        out["symptoms"] = tuple(_scrub(_symptoms(obs, named)))
    if not named:
        out.update(service=None, target=None, logs=())
    return out


def build_report(sb: Sandbox, deployment: Any, faults: Iterable[Any], level: str = "full",
                 window_s: float = 3.0) -> DiagnosisReport:
    """Observe the live system and write the report at the given level of detail.
    `faults` are the injected faults (one, or the parts of a compound)."""
    if level not in LEVELS:
        raise ValueError(f"report level '{level}': use one of {', '.join(LEVELS)}")
    faults = list(faults)
    # What is read about the fault's target (its place, journal and, in a full report, the
    # fault's evidence) is read on the node while the load window runs, not after it: the
    # window is a wait, and the reads are the report's other slow part.
    primary = faults[0] if faults and level != "minimal" else None
    with ThreadPoolExecutor(max_workers=1) as pool:
        about = pool.submit(_about_target, sb, deployment, primary, level) if primary else None
        obs = observe_system(sb, deployment, window_s)
        target, logs, evidence = about.result() if about else (None, [], None)
    call_graph = {n: list(t.dependencies) for n, t in deployment.targets.items()}
    placement: dict[str, list[str]] = {}
    for n, t in deployment.targets.items():
        placement.setdefault(sb.nodes[t.node].name, []).append(n)
    common = dict(system=deployment.system, level=level, observations=obs, call_graph=call_graph,
                  placement=placement, created_at=time.time())
    if level == "minimal" or not faults:
        return DiagnosisReport(symptoms=tuple(_scrub(_symptoms(obs, False))), **common)
    report = dict(common, symptoms=tuple(_scrub(_symptoms(obs, True))), service=primary.target.service,
                  target=target, logs=tuple(_scrub(logs)))
    if level == "full":
        report.update(category=primary.category, fault_kind=primary.name, evidence=_scrub(evidence))
    return DiagnosisReport(**report)


def _about_target(sb: Sandbox, deployment: Any, fault: Any, level: str) -> tuple[dict, list[str], dict | None]:
    t = fault.target
    evidence = fault.describe(sb) if level == "full" else None
    return target_info(sb, deployment, t.service), _journal(sb, t), evidence


def _journal(sb: Sandbox, t, lines: int = 5) -> list[str]:
    # The runtime logs to stdout (journal priority info), so filter by wording, not priority.
    res = sb.exec(f"journalctl -u {t.unit} -n 200 --no-pager -o short-iso 2>/dev/null "
                  "| grep -iE 'error|fail|refused|denied|killed|timeout|timed out|exited' | tail -n {lines}",
                  node=t.node, timeout=15)
    return [l for l in res.stdout.splitlines() if l.strip()][-lines:]
