"""`remed system ls|deploy|status|load`: the microservice systems and their deployments."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer
from rich.table import Table

from ._common import console, err_console

app = typer.Typer(no_args_is_help=True)


@app.command("ls")
def ls(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The systems that can be deployed (one spec file each in simulators/systems/specs/)."""
    from e2e_reme.simulators.systems.spec import list_systems, load_system, summarize
    rows = [summarize(load_system(n)) for n in list_systems()]
    if json_out:
        print(json.dumps([{**r.__dict__, "slo": r.slo.model_dump()} for r in rows], indent=2))
        return
    t = Table()
    for col in ("system", "services", "nodes", "entry", "SLO at the standard load"):
        t.add_column(col, no_wrap=True)
    t.add_column("description")
    for r in rows:
        slo = f"{r.slo.success_rate:.0%} ok, p95≤{r.slo.p95_ms:.0f}ms @ {r.slo.rps:g}rps×{r.slo.window_s:g}s"
        svc = f"{r.http}+{r.redis} redis" if r.redis else str(r.http)
        t.add_row(r.name, svc, str(r.nodes), r.entry, slo, r.description)
    console.print(t)


def deploy_with_progress(sb, system, timeout_s: float = 300, to_stderr: bool = False):
    """Deploy (a name, path or SystemSpec), drawing each step as it happens (on stderr when
    stdout carries JSON); returns the Deployment."""
    from e2e_reme.simulators.systems.deploy import deploy
    out = err_console if to_stderr else console
    name = getattr(system, "name", system)
    t0 = time.monotonic()
    with out.status(f"deploying {name} into {sb.name} …", spinner="dots") as status:
        def progress(step: str, detail: str) -> None:
            status.update(f"[bold]{step}[/]: {detail}")
            if step in ("render", "playbook", "smoke"):
                out.print(f"  [dim]{time.monotonic() - t0:6.2f} s[/]  {step}: {detail}", highlight=False)
        return deploy(sb, system, timeout_s=timeout_s, progress=progress)


@app.command()
def deploy(system: str = typer.Argument(..., help="System name (see `remed system ls`) or spec file."),
           sandbox: str = typer.Option(..., "--sandbox", "-s", help="Sandbox to deploy into."),
           timeout: float = typer.Option(300, "--timeout", help="Seconds the playbook may take."),
           json_out: bool = typer.Option(False, "--json", help="Print the deployment as JSON.")) -> None:
    """Deploy a system into a sandbox (replacing what was deployed there) and wait until it is healthy."""
    from e2e_reme.simulators import attach
    from e2e_reme.simulators.systems.spec import load_system
    spec = load_system(system)          # a bad name or spec is the first thing to report
    sb = attach(sandbox, lease="remed system deploy")
    dep = deploy_with_progress(sb, spec, timeout, to_stderr=json_out)
    if json_out:
        print(json.dumps(dep.to_json(), indent=1))
        return
    _print_targets(dep)
    console.print(f"{dep.system} deployed in {sandbox} in {dep.deploy_s:.1f} s "
                  f"(playbook {dep.timings.get('playbook', 0):.1f} s); entry {dep.entry.url}. "
                  f"Try: remed system status --sandbox {sandbox}")


def _print_targets(dep, probes: dict | None = None, units: dict | None = None) -> None:
    t = Table(title=f"{dep.system} in sandbox {dep.sandbox} (token {dep.token})")
    for col in ("service", "kind", "node", "address", "unit"):
        t.add_column(col)
    if probes is not None:
        t.add_column("health")
        t.add_column("ms", justify="right")
    for name, tg in dep.targets.items():
        row = [name + (" (entry)" if name == dep.entry.service else ""), tg.kind, str(tg.node),
               f"{tg.host}:{tg.port}", units.get(name, "?") if units else tg.unit]
        if probes is not None:
            p = probes[name]
            row += [("[green]ok[/]" if p.ok else f"[red]{p.status or 'down'}[/] {p.detail[:60]}"),
                    f"{p.latency_ms:.1f}"]
        t.add_row(*row)
    console.print(t)


@app.command()
def status(sandbox: str = typer.Option(..., "--sandbox", "-s", help="Sandbox name."),
           json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Each service of the deployed system: unit state, health, latency of the health call."""
    from e2e_reme.simulators import attach
    from e2e_reme.simulators.systems.deploy import load_deployment, health_all
    sb = attach(sandbox)
    dep = load_deployment(sb)
    probes = health_all(dep.targets, timeout=2.0)
    units: dict[str, str] = {}
    for node in sorted({t.node for t in dep.targets.values()}):
        names = [t.service for t in dep.on_node(node)]
        res = sb.exec(["systemctl", "is-active", *[dep.targets[n].unit for n in names]], node=node, timeout=20)
        states = res.stdout.split()
        for i, n in enumerate(names):
            units[n] = states[i] if i < len(states) else "unknown"
    healthy = all(p.ok for p in probes.values()) and all(u == "active" for u in units.values())
    if json_out:
        print(json.dumps({"system": dep.system, "sandbox": sandbox, "token": dep.token, "healthy": healthy,
                          "services": {n: {"node": t.node, "address": f"{t.host}:{t.port}", "unit": t.unit,
                                           "unit_state": units.get(n), "health": probes[n].ok,
                                           "status": probes[n].status, "detail": probes[n].detail,
                                           "latency_ms": probes[n].latency_ms}
                                       for n, t in dep.targets.items()}}, indent=2))
    else:
        _print_targets(dep, probes, units)
        bad = [n for n in dep.targets if not probes[n].ok or units.get(n) != "active"]
        console.print("all services healthy" if healthy else f"[red]unhealthy:[/] {', '.join(bad)}")
    raise typer.Exit(0 if healthy else 1)


@app.command()
def load(sandbox: str = typer.Option(..., "--sandbox", "-s", help="Sandbox name."),
         rps: Optional[float] = typer.Option(None, "--rps", help="Requests per second (default: the SLO's)."),
         window: Optional[float] = typer.Option(None, "--window", help="Seconds (default: the SLO's)."),
         json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Send the system's request mix to its entry and check the SLO (exit 1 if it is missed)."""
    from e2e_reme.simulators.systems.deploy import load_deployment
    from e2e_reme.simulators.systems.loadgen import check_slo, run_load
    dep = load_deployment(sandbox)
    rps = rps or dep.slo.rps
    window = window or dep.slo.window_s
    with console.status(f"{rps:g} rps for {window:g} s to {dep.entry.service} ({dep.entry.url}) …"):
        res = run_load(dep, rps=rps, window_s=window)
    verdict = check_slo(res, dep.slo)
    if json_out:
        print(json.dumps({"result": res.to_json(), "slo": dep.slo.model_dump(), "slo_met": verdict.ok,
                          "reasons": list(verdict.reasons)}, indent=2))
    else:
        console.print(f"sent {res.sent}, ok {res.ok} ({res.success_rate:.1%}), p50 {res.p50_ms:.1f} ms, "
                      f"p95 {res.p95_ms:.1f} ms, p99 {res.p99_ms:.1f} ms in {res.duration_s:.1f} s"
                      + (f"; errors {res.errors}" if res.errors else ""), highlight=False)
        console.print("[green]SLO met[/]" if verdict.ok else "[red]SLO missed:[/] " + "; ".join(verdict.reasons))
    raise typer.Exit(0 if verdict.ok else 1)
