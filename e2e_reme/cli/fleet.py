"""`remed fleet collect|hosts`: verified experience from every sandbox host of a Ray cluster."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._common import console, read_config

app = typer.Typer(no_args_is_help=True)


def _split(v: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in v.split(",") if x.strip()) if v else None


def _config(config_file: Path | None, top: dict, fleet: dict, host: dict, episode: dict, policy_options: dict):
    """YAML first, then every flag given on top of it."""
    from e2e_reme.cluster import CollectConfig
    base = read_config(config_file)
    merged = {**base, **{k: v for k, v in top.items() if v is not None}}
    f = {**(base.get("fleet") or {}), **{k: v for k, v in fleet.items() if v is not None}}
    h = {**((base.get("fleet") or {}).get("host") or {}), **{k: v for k, v in host.items() if v is not None}}
    e = {**(h.get("episode") or {}), **{k: v for k, v in episode.items() if v is not None}}
    h["episode"], f["host"], merged["fleet"] = e, h, f
    merged["policy_options"] = {**(base.get("policy_options") or {}),
                                **{k: v for k, v in policy_options.items() if v is not None}}
    return CollectConfig.from_dict(merged)


@app.command("collect")
def collect(policy: str = typer.Option(None, "--policy", help="runbook | solo | think. [runbook]"),
            episodes: int = typer.Option(None, "--episodes", "-n", help="How many episodes in all. [100]"),
            systems: str = typer.Option(None, "--systems", help="Comma-separated systems. [simple-micro]"),
            faults: str = typer.Option(None, "--faults", help="Comma-separated faults. [MicroRemed's seven]"),
            seed: int = typer.Option(None, "--seed", help="Seeds the plan of scenarios. [0]"),
            out: Path = typer.Option(None, "--out", help="Experience directory. [runs/experience]"),
            model: str = typer.Option(None, "--model", help="solo/think: model name at --base-url or a local dir."),
            base_url: str = typer.Option(None, "--base-url", help="solo/think: OpenAI-compatible endpoint."),
            address: str = typer.Option(None, "--address",
                                        help="Ray cluster to join (auto, ray://HEAD:10001); none: a local Ray."),
            slots: int = typer.Option(None, "--slots", help="Sandboxes per host (default: sized from the host)."),
            backend: str = typer.Option(None, "--backend", help="nspawn | libvirt. [nspawn]"),
            shard_size: int = typer.Option(None, "--shard-size", help="Records per shard file. [500]"),
            no_load: bool = typer.Option(False, "--no-load", help="Judge without the SLO load window."),
            config_file: Path = typer.Option(None, "--config", help="YAML with any of these settings."),
            json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON.")) -> None:
    """Run episodes on every sandbox host of the fleet and append their records to shards.
    Rerun the same command to continue an interrupted collection."""
    from e2e_reme.cluster import collect as run_collect
    cfg = _config(config_file,
                  {"policy": policy, "episodes": episodes, "systems": _split(systems), "faults": _split(faults),
                   "seed": seed, "out": str(out) if out else None, "shard_size": shard_size},
                  {"address": address},
                  {"slots": slots, "backend": backend, "systems": _split(systems)},
                  {"verify_load": False if no_load else None},
                  {"model": model, "base_url": base_url})
    state = {"fleet": None, "last": 0.0}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[line]}"), console=console) as prog:
        task = prog.add_task(f"{cfg.policy} on {', '.join(cfg.systems)}", total=None, line="starting the fleet")

        def on_event(kind: str, payload) -> None:
            if kind == "started":
                state["fleet"] = payload
            elif kind == "plan":
                todo, done, skipped = payload
                prog.update(task, total=len(todo) + len(done), completed=len(done), line="")
                prog.console.log(f"{len(done)} done before, {len(todo)} to run")
                for f, why in skipped.items():
                    prog.console.log(f"[yellow]left out[/] {f}: {why}")
            elif kind in ("fleet", "host"):
                prog.console.log(payload)
            elif kind in ("requeue", "timeout"):
                prog.console.log(f"[yellow]{kind}[/] {payload[1]} (host {payload[0]})")
            elif kind == "episode":
                prog.update(task, advance=1)
                if payload["outcome"] not in ("success", "failure"):
                    prog.console.log(f"[yellow]![/] {payload['id']}: {payload['outcome']} at {payload['stage']}: "
                                     f"{payload['reason'][:120]}")
            if kind in ("tick", "episode") and state["fleet"] and time.monotonic() - state["last"] > 5:
                prog.update(task, line=state["fleet"].summary_line())
                state["last"] = time.monotonic()

        summary = run_collect(cfg, on_event=on_event)
    if json_out:
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary, Path(cfg.out))


def _print_summary(s: dict, out: Path) -> None:
    t = Table(title=f"experience in {out}: {s['episodes']} of {s['planned']} planned episodes")
    for c in ("fault", "episodes", "success", "failure", "injection failure", "infra failure"):
        t.add_column(c, justify="left" if c == "fault" else "right")
    for f, c in s["per_fault"].items():
        t.add_row(f, *(str(c[k]) for k in ("episodes", "success", "failure", "injection_failure", "infra_failure")))
    t.add_row("all", *(str(s[k]) for k in ("episodes", "success", "failure", "injection_failure", "infra_failure")),
              style="bold")
    console.print(t)
    for f, why in s["skipped_faults"].items():
        console.print(f"[yellow]left out[/] {f}: {why}")
    console.print(f"shards: {out / 'shards'} ({len(s['shards'])} file(s))  summary: {out / 'summary.json'}"
                  + ("" if s["complete"] else "  [yellow](incomplete: rerun to continue)[/]"))


@app.command("hosts")
def hosts(address: str = typer.Option("auto", "--address", help="The Ray cluster (auto: the one on this machine)."),
          json_out: bool = typer.Option(False, "--json")) -> None:
    """The nodes of a running Ray cluster and whether each is a sandbox host."""
    from e2e_reme.cluster.fleet import RESOURCE, cluster_nodes
    nodes = cluster_nodes(address)
    if json_out:
        print(json.dumps(nodes, indent=2))
        return
    t = Table()
    for c in ("node", "address", "alive", "CPU", "memory GiB", "GPU", RESOURCE):
        t.add_column(c)
    for n in nodes:
        r = n["resources"]
        t.add_row(n["node_id"][:12], n["address"], "yes" if n["alive"] else "no", f"{r.get('CPU', 0):g}",
                  f"{r.get('memory', 0) / 2**30:.1f}", f"{r.get('GPU', 0):g}",
                  "yes" if r.get(RESOURCE, 0) >= 1 else "-")
    console.print(t)
