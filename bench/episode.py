"""Where an episode's time goes, and how many episodes a minute this host turns out.

    .venv/bin/python bench/episode.py                                # simple-micro + boutique, -j 1,2,4
    .venv/bin/python bench/episode.py --systems simple-micro --parallel 1,2 --cases 6

Runs the expert runbook (the policy costs nothing, so what is measured is the harness) on
the first --cases runnable cases of --suite, through `run_bench` exactly as `remed bench`
does, side by side in one run:
  1. per system at --parallel 1: the median of each phase over the episodes (reset,
     deploy_check, inject, confirm, report, generate, gate, syntax, execute, settle,
     verify, total);
  2. on the first system at each --parallel: episodes per minute (wall clock of the whole
     run, sandbox deployment included and shown apart) and the ratio to --parallel 1.
Prints tables and writes JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from e2e_reme.simulators.benchmark import BenchConfig, run_bench
from e2e_reme.simulators.episode import EpisodeConfig

PHASES = ("reset", "deploy_check", "inject", "confirm", "report", "generate", "gate", "syntax", "execute",
          "settle", "verify", "total")


def one_run(system: str, suite: str, cases: int, parallel: int, seed: int, workdir: Path,
            console: Console) -> dict:
    out = workdir / f"{system}-j{parallel}"
    ready: list[float] = []
    t0 = time.monotonic()

    def on_event(kind, payload):
        if kind == "slot" and payload.endswith("ready"):
            ready.append(time.monotonic() - t0)
        if kind == "episode":
            console.log(f"{system} -j{parallel}: {payload.id} {payload.outcome} ({payload.timings.get('total', 0):.1f} s)")

    cfg = BenchConfig(system=system, suite=suite, policy="runbook", parallel=parallel, seed=seed, out=str(out),
                      limit=None, sandbox_prefix="bench", episode=EpisodeConfig())
    # --cases counts runnable cases: skipped ones (unavailable faults) do not use a slot.
    from e2e_reme.simulators.benchmark import make_cases
    runnable, _ = make_cases(system, suite, seed, "nspawn")
    limit = runnable[cases - 1].index + 1 if len(runnable) >= cases else None
    cfg = BenchConfig(**{**cfg.__dict__, "limit": limit})
    res = run_bench(cfg, on_event=on_event)
    wall = time.monotonic() - t0
    recs = [json.loads(l) for l in (out / "episodes.jsonl").read_text().splitlines() if l.strip()]
    setup = max(ready) if ready else 0.0
    return {"system": system, "parallel": parallel, "episodes": len(recs), "successes": res["successes"],
            "wall_s": round(wall, 1), "setup_s": round(setup, 1),
            "episodes_per_min": round(len(recs) / (wall - setup) * 60, 2) if wall > setup else None,
            "phase_median_s": {p: round(statistics.median([r["timings"].get(p, 0.0) for r in recs]), 3)
                               for p in PHASES} if recs else {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="simple-micro,boutique")
    ap.add_argument("--suite", default="easy")
    ap.add_argument("--cases", type=int, default=8, help="runnable cases per run")
    ap.add_argument("--parallel", default="1,2,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 160)
    systems = args.systems.split(",")
    pars = [int(p) for p in args.parallel.split(",")]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-episode-") as tmp:
        for s in systems:
            runs.append(one_run(s, args.suite, args.cases, 1, args.seed, Path(tmp), console))
        for p in pars:
            if p != 1:
                runs.append(one_run(systems[0], args.suite, args.cases, p, args.seed, Path(tmp), console))

    t = Table(title=f"episode phases, median seconds (runbook, {args.suite}, --parallel 1)")
    t.add_column("phase")
    for r in runs:
        if r["parallel"] == 1:
            t.add_column(r["system"], justify="right")
    for p in PHASES:
        t.add_row(p, *[f"{r['phase_median_s'].get(p, 0):.2f}" for r in runs if r["parallel"] == 1])
    console.print(t)
    base = next(r for r in runs if r["system"] == systems[0] and r["parallel"] == 1)
    t = Table(title=f"throughput on {systems[0]} ({args.cases} episodes per run)")
    for c in ("parallel", "episodes", "successes", "setup s", "wall s", "episodes/min", "× of -j1", "median episode s"):
        t.add_column(c, justify="right")
    for r in runs:
        if r["system"] != systems[0]:
            continue
        ratio = (r["episodes_per_min"] / base["episodes_per_min"]) if base["episodes_per_min"] else 0
        t.add_row(str(r["parallel"]), str(r["episodes"]), str(r["successes"]), f"{r['setup_s']:.1f}",
                  f"{r['wall_s']:.1f}", f"{r['episodes_per_min']:.2f}", f"{ratio:.2f}",
                  f"{r['phase_median_s'].get('total', 0):.1f}")
    console.print(t)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"episode-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"bench": "episode", "args": vars(args), "runs": runs}, indent=2))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
