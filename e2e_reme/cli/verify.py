"""`remed verify --sandbox NAME [--json] [--baseline]`: judge a sandbox against its baseline.
Exit 0: success; 1: failure; 2: could not judge (or a user mistake)."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from e2e_reme.simulators import attach
from e2e_reme.simulators.faults import injected_faults
from e2e_reme.simulators.systems.deploy import load_deployment
from e2e_reme.simulators.verification.verifier import record_baseline, stored_baseline, verify as run_verify

from ._common import console, err_console


def verify(sandbox: str = typer.Option(..., "--sandbox", "-s", help="Sandbox name."),
           json_out: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
           baseline: bool = typer.Option(False, "--baseline",
                                         help="Record the baseline now (the system must be healthy) and exit."),
           no_load: bool = typer.Option(False, "--no-load", help="Skip the SLO load window.")) -> None:
    """Check every condition of a successful remediation, with its evidence."""
    sb = attach(sandbox, lease="remed verify")
    dep = load_deployment(sb)
    if baseline:
        b = record_baseline(sb, dep)
        console.print(f"baseline of {sandbox} recorded ({len(b.health)} services healthy)")
        return
    base = stored_baseline(sb)
    if base is None:
        err_console.print(f"[bold red]error:[/] sandbox {sandbox} has no baseline; run `remed verify "
                          f"--sandbox {sandbox} --baseline` while it is healthy (`remed fault inject` takes one too)")
        raise typer.Exit(2)
    faults = injected_faults(sb)
    with console.status("verifying (services, integrity, seed data, SLO under load) …"):
        kw = {"load_check": None} if no_load else {}
        verdict = run_verify(sb, dep, base, faults, **kw)
    if json_out:
        print(verdict.to_json())
    else:
        t = Table(title=f"verdict for {sandbox}: " + ("[green]SUCCESS[/]" if verdict.success else
                  "[red]FAILURE[/]" if verdict.judged else "[yellow]NOT JUDGED[/]"))
        t.add_column("check")
        t.add_column("result")
        t.add_column("detail", overflow="fold")
        for c in verdict.checks:
            t.add_row(c.name, "[green]pass[/]" if c.passed else "[red]fail[/]", c.detail)
        console.print(t)
        if not verdict.judged:
            console.print(verdict.reason)
        console.print(f"disruption: {json.dumps(verdict.disruption)}")
    raise typer.Exit(0 if verdict.success else 1 if verdict.judged else 2)
