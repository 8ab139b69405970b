"""`remed fault ls|inject|status|describe|recover`: the fault catalog, injecting a fault into
a deployed service, reading back from the sandbox whether it is still there."""

from __future__ import annotations

import json
import time
from typing import List, Optional

import typer
from rich.table import Table

from ._common import console

app = typer.Typer(no_args_is_help=True)


def _params(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"--param '{item}': write it as key=value")
        out[k.strip()] = v.strip()
    return out


def _deployment(sb):
    from e2e_reme.simulators.systems.deploy import load_deployment
    return load_deployment(sb)


@app.command("ls")
def ls(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The catalog: each fault type, its category, and whether it can run here, per backend."""
    from e2e_reme.simulators.sandbox.doctor import BACKENDS
    from e2e_reme.simulators.faults import fault_catalog, host_report

    report = host_report()
    rows = []
    for name, cls in fault_catalog().items():
        avail = {b: dict(zip(("available", "why"), cls.available(b, report))) for b in BACKENDS}
        rows.append({"name": name, "category": cls.category, "needs": list(cls.needs),
                     "applies_to": list(cls.kinds), "aliases": list(cls.aliases),
                     "parameters": {k: v for k, v in cls.defaults.items()}, "summary": cls.summary,
                     "backends": avail})
    if json_out:
        console.out(json.dumps(rows, indent=2), highlight=False)
        return
    t = Table(title="Fault catalog (compound:<a>+<b> injects two at once)", title_justify="left")
    for col in ("fault", "category", "needs", *BACKENDS):
        t.add_column(col, overflow="fold")
    for r in rows:
        cells = [("[green]yes[/]" if r["backends"][b]["available"] else f"[red]no[/]: {r['backends'][b]['why']}")
                 for b in BACKENDS]
        name = r["name"] + (f" [dim](alias {', '.join(r['aliases'])})[/]" if r["aliases"] else "")
        t.add_row(name, r["category"], ", ".join(r["needs"]) or "-", *cells)
    console.print(t, highlight=False)
    console.print("[dim]What each does, its parameters and the reasons in full: remed fault ls --json[/]")


@app.command()
def inject(fault: str = typer.Argument(..., help="Fault type (see `remed fault ls`), or compound:<a>+<b>."),
           target: str = typer.Option(..., "--target", "-t", help="Service of the deployed system."),
           sandbox: str = typer.Option(..., "--sandbox", "-s", help="Sandbox name."),
           param: List[str] = typer.Option([], "--param", "-p", help="key=value (repeatable); "
                                           "for a compound, part.key=value."),
           seed: int = typer.Option(0, "--seed", help="Seed for the fault's random choices."),
           baseline: bool = typer.Option(True, "--baseline/--no-baseline",
                                         help="First record the healthy system as `remed verify`'s baseline "
                                              "(unless another fault is already in place)."),
           json_out: bool = typer.Option(False, "--json", help="Print the record as JSON.")) -> None:
    """Inject a fault into a service of the system deployed in a sandbox. It stays until
    something fixes it (`remed fault recover` is the harness's own cleanup); `remed verify`
    then judges a remediation against the baseline taken here."""
    from e2e_reme.simulators import attach
    from e2e_reme.simulators.errors import FaultError
    from e2e_reme.simulators.faults import get_fault, injected_faults, make_fault

    get_fault(fault)   # an unknown name fails before anything is touched
    sb = attach(sandbox, lease="remed fault inject")
    dep = _deployment(sb)
    if target not in dep.targets:
        raise FaultError(f"sandbox {sandbox} runs {dep.system}, which has no service '{target}'; "
                         f"its services: {', '.join(sorted(dep.targets))}")
    f = make_fault(fault, dep.targets[target], dep.targets, _params(param), seed)
    if baseline and not injected_faults(sb):
        from e2e_reme.simulators.verification.verifier import record_baseline
        try:
            record_baseline(sb, dep)
        except RuntimeError as e:
            raise FaultError(f"{e}; a baseline is taken from a healthy system (or pass --no-baseline)") from None
    t0 = time.monotonic()
    with console.status(f"injecting {f.name} into {target} …"):
        f.inject(sb)
    took = time.monotonic() - t0
    active = f.is_active(sb)
    if json_out:
        console.out(json.dumps({"id": f.id, "fault": f.name, "service": target, "params": f.public_params(),
                                "seed": seed, "inject_s": round(took, 2), "active": active}, indent=2),
                    highlight=False)
        return
    console.print(f"injected {f.name} into {target} on {f.node_name(sb)} in {took:.2f} s (id {f.id}); "
                  f"active: {'yes' if active else 'no'}; params: {f.public_params()}", highlight=False)


@app.command()
def status(sandbox: str = typer.Option(..., "--sandbox", "-s", help="Sandbox name."),
           json_out: bool = typer.Option(False, "--json", help="Print JSON."),
           all_: bool = typer.Option(False, "--all", help="Also list recovered faults.")) -> None:
    """The faults injected into a sandbox and whether each is still active, read from the
    sandbox now."""
    from e2e_reme.simulators import attach
    from e2e_reme.simulators.faults import Fault, fault_records

    sb = attach(sandbox)
    rows = []
    for rec in fault_records(sb):
        if rec.get("recovered_at") and not all_:
            continue
        f = Fault.from_record(rec)
        try:
            active: bool | str = f.is_active(sb)
        except Exception as e:  # a sandbox that does not answer: say so, do not crash the listing
            active = f"unknown ({e})"
        rows.append({"id": rec["id"], "fault": rec["name"], "service": rec["service"],
                     "node": sb.nodes[rec["node"]].name, "params": f.public_params(),
                     "injected_at": rec.get("injected_at"), "recovered_at": rec.get("recovered_at"),
                     "active": active})
    if json_out:
        console.out(json.dumps(rows, indent=2), highlight=False)
        return
    if not rows:
        console.print(f"no faults recorded in {sandbox}")
        return
    t = Table("id", "fault", "service", "node", "injected", "active", "params")
    for r in rows:
        act = r["active"]
        shown = ("[red]active[/]" if act is True else "[green]gone[/]" if act is False else f"[yellow]{act}[/]")
        if r["recovered_at"]:
            shown += " (recovered)"
        t.add_row(r["id"], r["fault"], r["service"], r["node"],
                  time.strftime("%H:%M:%S", time.localtime(r["injected_at"] or 0)), shown, json.dumps(r["params"]))
    console.print(t, highlight=False)


def _select(sb, which: Optional[str]):
    from e2e_reme.simulators.errors import FaultError
    from e2e_reme.simulators.faults import canonical_name, injected_faults

    faults = injected_faults(sb)
    if which:
        faults = [f for f in faults if f.id == which or f.name == which or f.name == canonical_name(which)]
        if not faults:
            raise FaultError(f"no unrecovered fault '{which}' in sandbox {sb.name}; "
                             f"see `remed fault status --sandbox {sb.name}`")
    return faults


@app.command()
def describe(sandbox: str = typer.Option(..., "--sandbox", "-s", help="Sandbox name."),
             fault: Optional[str] = typer.Argument(None, help="Fault name or id (default: every unrecovered one).")) -> None:
    """What monitoring would observe for each injected fault (JSON): the evidence a
    diagnosis report carries."""
    from e2e_reme.simulators import attach

    sb = attach(sandbox)
    out = [{"id": f.id, "fault": f.name, "service": f.target.service, "observed": f.describe(sb)}
           for f in _select(sb, fault)]
    console.out(json.dumps(out, indent=2, default=str), highlight=False)


@app.command()
def recover(sandbox: str = typer.Option(..., "--sandbox", "-s", help="Sandbox name."),
            fault: Optional[str] = typer.Argument(None, help="Fault name or id (default: every unrecovered one).")) -> None:
    """Undo injected faults with the harness's own cleanup (not a remediation)."""
    from e2e_reme.simulators import attach

    sb = attach(sandbox, lease="remed fault recover")
    faults = _select(sb, fault)
    if not faults:
        console.print(f"nothing to recover in {sandbox}")
        return
    for f in reversed(faults):
        t0 = time.monotonic()
        f.recover(sb)
        still = f.is_active(sb)
        console.print(f"recovered {f.name} on {f.target.service} (id {f.id}) in {time.monotonic() - t0:.2f} s"
                      + ("; [red]still active[/]" if still else ""), highlight=False)
