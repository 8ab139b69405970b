"""Sandbox lifecycle costs per backend, measured side by side in one run.

    .venv/bin/python bench/sandbox.py                       # nspawn, 5 runs
    .venv/bin/python bench/sandbox.py --backends nspawn,libvirt --runs 3 --out bench/results
    .venv/bin/python bench/sandbox.py --option userns=false --option limit_disk_mib=0   # without

For each backend and run: `up` (allocate + start, no wait), `ready` (until sshd answers a
command on every node), `exec` (median round trip of a trivial command over the open SSH
connection), `reset` (back to the image, until ready again), `down` (everything removed);
and idle memory per node measured after the node has settled. Prints min / median / max
and writes everything, raw samples included, as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import platform
import statistics
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from e2e_reme.simulators import create_sandbox
from e2e_reme.vm_images import require_image

PHASES = ("up", "ready", "exec", "reset", "down")


def one_run(backend: str, nodes: int, settle_s: float, options: dict | None = None) -> dict:
    t = time.monotonic()
    sb = create_sandbox(backend, nodes, name=f"bench-{backend[:3]}-{int(time.time() * 1000) % 100000}", wait=False,
                        **(options or {}))
    out = {"up": time.monotonic() - t}
    try:
        out["ready"] = sb.wait_ready()
        rtts = []
        for _ in range(20):
            rtts.append(sb.exec("true").duration_s)
        out["exec"] = statistics.median(rtts)
        time.sleep(settle_s)
        out["memory_mib_per_node"] = [round(sb.node_memory_mib(i), 1) for i in range(nodes)]
        sb.exec("echo changed > /root/changed")
        t = time.monotonic()
        sb.reset()
        out["reset"] = time.monotonic() - t
        assert sb.exec("test -e /root/changed").rc == 1, "reset kept a change"
    finally:
        t = time.monotonic()
        sb.stop()
        out["down"] = time.monotonic() - t
    return out


def summarize(runs: list[dict]) -> dict:
    s = {}
    for p in PHASES:
        xs = [r[p] for r in runs if p in r]
        s[p] = {"min": min(xs), "median": statistics.median(xs), "max": max(xs)} if xs else None
    mem = [m for r in runs for m in r.get("memory_mib_per_node", []) if m == m]
    s["memory_mib_per_node"] = {"min": min(mem), "median": statistics.median(mem), "max": max(mem)} if mem else None
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="nspawn")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--libvirt-runs", type=int, default=2, help="libvirt boots are slow under TCG")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds idle before measuring memory")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a SandboxConfig option for every sandbox (e.g. userns=false, limit_pids=0)")
    args = ap.parse_args()
    options = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.option)}
    console = Console(width=None if sys.stdout.isatty() else 160)
    image = require_image()
    results = {"bench": "sandbox", "host": platform.node(), "kernel": platform.release(),
               "image": image.hash, "nodes": args.nodes, "options": options, "backends": {}}
    for backend in args.backends.split(","):
        runs = []
        n = args.libvirt_runs if backend == "libvirt" else args.runs
        with console.status(f"{backend}: run 1/{n}") as status:
            for i in range(n):
                status.update(f"{backend}: run {i + 1}/{n}")
                runs.append(one_run(backend, args.nodes, args.settle, options))
        results["backends"][backend] = {"runs": runs, "summary": summarize(runs)}

    table = Table(title=f"sandbox lifecycle, {args.nodes} node(s) per sandbox, seconds (min / median / max)")
    table.add_column("backend")
    for p in PHASES:
        table.add_column(p, justify="right")
    table.add_column("idle MiB/node", justify="right")
    table.add_column("reset/ready", justify="right")
    for backend, r in results["backends"].items():
        s = r["summary"]
        cells = [f"{s[p]['min']:.3f} / {s[p]['median']:.3f} / {s[p]['max']:.3f}" for p in PHASES]
        mem = s["memory_mib_per_node"]
        ratio = s["reset"]["median"] / s["ready"]["median"]
        table.add_row(backend, *cells, f"{mem['median']:.0f}" if mem else "n/a", f"{ratio:.2f}")
        r["summary"]["reset_over_first_ready"] = ratio
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sandbox-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
