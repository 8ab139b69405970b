"""`remed sandbox up|exec|reset|down|ls|gc`."""

from __future__ import annotations

import json
import sys
import time
from typing import List, Optional

import typer
from rich.table import Table

from e2e_reme.simulators import attach, create_sandbox, gc as run_gc, list_sandboxes

from ._common import console, err_console

app = typer.Typer(no_args_is_help=True)


@app.command()
def up(backend: str = typer.Option("nspawn", "--backend", "-b", help="nspawn or libvirt."),
       nodes: Optional[int] = typer.Option(None, "--nodes", "-n", min=1,
                                           help="How many nodes (default 1, or as many as --system places services on)."),
       name: Optional[str] = typer.Option(None, "--name", help="Sandbox name (default: sb-<random>)."),
       memory: int = typer.Option(768, "--memory", help="libvirt: MiB per guest."),
       accel: str = typer.Option("auto", "--accel", help="libvirt: auto, kvm or tcg."),
       system: Optional[str] = typer.Option(None, "--system", help="Size the sandbox for this system (see `remed system ls`)."),
       deploy: bool = typer.Option(True, "--deploy/--no-deploy", help="With --system: also deploy it."),
       json_out: bool = typer.Option(False, "--json", help="Print the sandbox as JSON.")) -> None:
    """Create a sandbox that lives until `remed sandbox down NAME`."""
    spec = None
    if system is not None:
        from e2e_reme.simulators.systems.spec import load_system
        spec = load_system(system)
        if nodes is not None and nodes < spec.nodes:
            raise ValueError(f"system {spec.name} places services on {spec.nodes} nodes; --nodes {nodes} is too few")
    nodes = nodes or (spec.nodes if spec else 1)
    t0 = time.monotonic()
    with console.status(f"starting {nodes} {backend} node(s) and waiting for sshd …", spinner="dots"):
        sb = create_sandbox(backend, nodes, name=name, detached=True, memory_mib=memory, accel=accel)
    desc = sb.describe() | {"ready_seconds": round(time.monotonic() - t0, 2),
                            "ssh_key": str(sb.ssh_key)}
    if spec is not None and deploy:
        from e2e_reme.simulators.errors import DeployError
        from .system import deploy_with_progress
        try:
            dep = deploy_with_progress(sb, spec, to_stderr=json_out)
        except DeployError as e:
            raise DeployError(f"{e}\n(sandbox {sb.name} is up, without a working {spec.name}: inspect it, "
                              f"or remove it with `remed sandbox down {sb.name}`)") from e
        desc |= {"system": dep.system, "entry": dep.entry.url, "deploy_seconds": dep.deploy_s}
    if json_out:
        print(json.dumps(desc, indent=2))
        return
    _print_nodes(desc)
    console.print(f"ready in {desc['ready_seconds']} s. Try: remed sandbox exec {sb.name} -- hostname")
    if "system" in desc:
        console.print(f"{desc['system']} deployed in {desc['deploy_seconds']} s, entry {desc['entry']}. "
                      f"Try: remed system status --sandbox {sb.name}")


def _print_nodes(desc: dict) -> None:
    t = Table(title=f"sandbox {desc['name']} ({desc['backend']}, {desc['subnet']}, host {desc['host_ip']})")
    for col in ("node", "hostname", "ip"):
        t.add_column(col)
    for n in desc["nodes"]:
        t.add_row(n["name"], n["hostname"], n["ip"])
    console.print(t)


@app.command("exec")
def exec_(name: str = typer.Argument(..., help="Sandbox name."),
          cmd: List[str] = typer.Argument(..., help="Command (after --)."),
          node: int = typer.Option(0, "--node", "-i", help="Node index."),
          timeout: float = typer.Option(60, "--timeout", help="Seconds before the command is killed.")) -> None:
    """Run a command on a node over SSH; exits with its exit code."""
    sb = attach(name)        # an operator's shell: no lease, so a running benchmark can be looked into
    if not 0 <= node < len(sb.nodes):
        raise ValueError(f"sandbox {name} has nodes 0..{len(sb.nodes) - 1}, not {node}")
    res = sb.exec(cmd if len(cmd) > 1 else cmd[0], node=node, timeout=timeout)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if res.timed_out:
        err_console.print(f"[red]timed out after {timeout:.0f} s on {sb.nodes[node].name}[/]")
        raise typer.Exit(124)
    raise typer.Exit(res.rc)


@app.command()
def reset(name: str = typer.Argument(..., help="Sandbox name.")) -> None:
    """Put every node back to the image's state (changes are discarded)."""
    sb = attach(name, lease="remed sandbox reset")
    t0 = time.monotonic()
    with console.status(f"resetting {name} …"):
        sb.reset()
    console.print(f"reset {name} ({len(sb.nodes)} node(s)) in {time.monotonic() - t0:.2f} s")


@app.command()
def down(names: List[str] = typer.Argument(..., help="Sandbox name(s).")) -> None:
    """Stop and remove sandboxes, leaving nothing behind."""
    for name in names:
        sb = attach(name)
        t0 = time.monotonic()
        sb.stop()
        console.print(f"removed {name} in {time.monotonic() - t0:.2f} s")


@app.command("ls")
def ls(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List sandboxes known on this host."""
    recs = list_sandboxes()
    if json_out:
        print(json.dumps([{"name": r.name, "backend": r.backend, "status": r.status,
                           "subnet": r.subnet, "owner_pid": r.owner_pid, "orphan": not r.owner_alive(),
                           "nodes": [{"name": n.name, "ip": n.ip} for n in r.nodes]} for r in recs], indent=2))
        return
    t = Table("name", "backend", "status", "owner", "subnet", "nodes")
    for r in recs:
        owner = "detached" if r.owner_pid is None else f"pid {r.owner_pid}" + ("" if r.owner_alive() else " (dead: gc)")
        t.add_row(r.name, r.backend, r.status, owner, r.subnet, " ".join(f"{n.name}={n.ip}" for n in r.nodes))
    console.print(t if recs else "no sandboxes")


@app.command()
def gc() -> None:
    """Remove orphans: sandboxes whose owner died and leftovers of ours no sandbox owns."""
    done = run_gc()
    for line in done:
        console.print(f"removed {line}")
    console.print(f"gc: {len(done)} orphan(s) removed")
