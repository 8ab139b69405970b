"""`remed doctor`: what this host can do. It reports and always exits 0; a missing
capability is an answer, not an error."""

from __future__ import annotations

import typer
from rich.table import Table

from e2e_reme.simulators.sandbox.doctor import BACKENDS, MECHANISMS, HostReport, probe_host

from ._common import console

_STYLE = {"ok": "green", "missing": "yellow", "unusable": "red", "unknown": "magenta"}


def doctor(json_out: bool = typer.Option(
        False, "--json", help="Print the report as JSON (checks, backends, mechanisms).")) -> None:
    """Probe this host: each capability with a verdict, then the usable sandbox backends
    and fault mechanisms."""
    report = probe_host()
    if json_out:
        # Plain output, no markup or wrapping, so it parses when piped.
        console.out(report.to_json(), highlight=False)
        return
    _print_report(report)


def _print_report(report: HostReport) -> None:
    checks = Table(title="Host capabilities", title_justify="left")
    for col in ("check", "status", "detail", "fix"):
        checks.add_column(col, overflow="fold")
    for c in report.checks:
        checks.add_row(c.name, f"[{_STYLE[c.status]}]{c.status}[/]", c.detail, c.fix)
    console.print(checks, highlight=False)

    backends = Table(title="Sandbox backends", title_justify="left")
    for col in ("backend", "usable", "why"):
        backends.add_column(col, overflow="fold")
    for name, u in report.backends.items():
        backends.add_row(name, _yes_no(u.usable), u.why)
    console.print(backends, highlight=False)

    mechanisms = Table(title="Fault mechanisms", title_justify="left")
    mechanisms.add_column("mechanism", overflow="fold")
    for b in BACKENDS:
        mechanisms.add_column(b, overflow="fold")
    for name, per in report.mechanisms.items():
        label = f"{name}\n[dim]{MECHANISMS.get(name, '')}[/]"
        mechanisms.add_row(label, *(f"{_yes_no(per[b].usable)}: {per[b].why}" for b in BACKENDS))
    console.print(mechanisms, highlight=False)


def _yes_no(usable: bool) -> str:
    return "[green]yes[/]" if usable else "[red]no[/]"
