"""`remed review ls|show|export`: the operator decisions the review console records
(serve/review.py), and the training data they make (serve/review_export.py; docs/serve.md,
"Review decisions: database and export").

Everything shown here may hold a model's or a client's text: it is printed as text (no rich
markup, control characters made visible), never interpreted."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ._common import console

app = typer.Typer(no_args_is_help=True)

DEFAULT_DB = Path("runs/serve/review.sqlite")
_DB_HELP = "The review database (the serve config's review_db)."
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _safe(s: object, limit: int | None = None) -> str:
    """Untrusted text for a terminal: no escape sequences, optionally cut."""
    s = _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", "" if s is None else str(s))
    return s if limit is None or len(s) <= limit else s[:limit - 1] + "…"


def _open(db: Path):
    from e2e_reme.serve.review import ReviewStore
    if not db.is_file():
        raise ValueError(f"review database {db}: no such file; the serve console creates it at the first proposal "
                         f"(the serve config's review_db), or pass --db PATH")
    return ReviewStore(db)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


@app.command("ls")
def ls(db: Path = typer.Option(DEFAULT_DB, "--db", help=_DB_HELP),
       fault: Optional[str] = typer.Option(None, "--fault", help="Only decisions on this fault type."),
       outcome: Optional[str] = typer.Option(None, "--outcome", help="Only this outcome (success, failure, "
                                                                     "infra_failure)."),
       release: Optional[str] = typer.Option(None, "--release", help="Only proposals of this model release."),
       status: Optional[str] = typer.Option(None, "--status", help="Only this status (proposed, rejected, "
                                                                   "executing, executed, interrupted)."),
       limit: int = typer.Option(100, "--limit", min=1, max=1000),
       json_out: bool = typer.Option(False, "--json", help="One JSON object a line instead of a table.")) -> None:
    """List decisions, newest first."""
    with _open(db) as store:
        got = store.list(fault=fault, outcome=outcome, release=release, status=status, limit=limit)
        total = store.count(fault=fault, outcome=outcome, release=release, status=status)
    if json_out:
        for d in got:
            print(json.dumps({k: v for k, v in d.to_dict().items() if k not in ("report", "playbook", "events")}))
        return
    t = Table(title=f"{len(got)} of {total} decision(s) in {escape(str(db))}", title_justify="left")
    for col in ("id", "created", "status", "outcome", "operator", "release", "system / service", "fault"):
        t.add_column(col, overflow="fold")
    for d in got:
        t.add_row(*(Text(_safe(v, 60)) for v in (
            d.id, _when(d.created_at), d.status, d.outcome or "", d.operator, d.release,
            f"{d.system or '?'} / {d.service or '?'}", d.fault or "")))
    console.print(t)


@app.command("show")
def show(id: str = typer.Argument(..., help="The decision's id (`remed review ls`)."),
         db: Path = typer.Option(DEFAULT_DB, "--db", help=_DB_HELP),
         json_out: bool = typer.Option(False, "--json", help="The whole decision as JSON.")) -> None:
    """One decision: the report's case, the playbook, the gate, the verdict, the history."""
    with _open(db) as store:
        d = store.get(id)
    if d is None:
        raise ValueError(f"decision '{_safe(id, 40)}' is not in {db}; list them with `remed review ls --db {db}`")
    if json_out:
        print(json.dumps(d.to_dict(), indent=2))
        return
    line = lambda k, v: console.print(Text.assemble((f"{k:>10} ", "bold"), _safe(v)))
    line("id", d.id)
    line("status", d.status + (f" ({d.outcome})" if d.outcome else ""))
    line("operator", d.operator or "-")
    line("release", d.release)
    line("source", d.source + (f" (sandbox {d.sandbox})" if d.sandbox else ""))
    line("case", f"{d.system or '?'} / {d.service or '?'} / {d.fault or '?'}")
    if d.reason:
        line("reason", d.reason)
    gate = d.gate or {}
    if gate:
        line("gate", "passed" if gate.get("ok") else f"refused: {json.dumps(gate)[:400]}")
    if d.verdict is not None:
        line("verdict", ("success" if d.verdict.get("success") else "failure") +
             f"; {json.dumps(d.verdict)[:400]}")
    console.print(Text("playbook (the model's answer, untrusted):", style="bold"))
    console.print(Text(_safe(d.playbook)))
    console.print(Text("history:", style="bold"))
    for e in d.events:
        console.print(Text(_safe(f"  {_when(e['at'])}  {e['status']:<12} {e['operator'] or '-':<16} {e['note']}")))


@app.command("export")
def export(db: Path = typer.Option(DEFAULT_DB, "--db", help=_DB_HELP),
           out: Path = typer.Option(..., "--out", help="Directory for preferences.jsonl, demonstrations/ and "
                                                       "manifest.json.")) -> None:
    """Training data from decisions: preference pairs and verified demonstrations (SFT: data.reviews)."""
    from e2e_reme.serve.review_export import export_reviews
    with _open(db) as store:
        m = export_reviews(store, out)
    console.print(f"[green]exported[/] {m['decisions']} decision(s) of {escape(str(db))} to {escape(str(out))}: "
                  f"{m['preference_pairs']} preference pair(s), {m['demonstrations']} verified demonstration(s)",
                  highlight=False, soft_wrap=True)
    for why, n in m["skipped"].items():
        console.print(f"  skipped {n}: {escape(why)}", highlight=False)
    console.print(f"  demonstrations by split: {m['demonstrations_by_split'] or '{}'} (SFT refuses validation/test)",
                  highlight=False)
