"""Where an episode's time goes, and how many episodes a minute this host turns out.

    .venv/bin/python bench/episode.py                                # simple-micro + boutique, -j 1,2,4
    .venv/bin/python bench/episode.py --systems simple-micro --parallel 1,2 --cases 6
    .venv/bin/python bench/episode.py --compare 0a9a7a2 --policies runbook,nothing --parallel 1,2 --cases 6

Runs the expert runbook (the policy costs nothing, so what is measured is the harness) on
the first --cases runnable cases of --suite, through `run_bench` exactly as `remed bench`
does, side by side in one run:
  1. per system at --parallel 1: the median of each phase over the episodes (reset,
     deploy_check, inject, confirm, report, generate, pipeline (= gate + syntax +
     execute, the playbook's path), settle, verify, total);
  2. on the first system at each --parallel: episodes per minute (wall clock of the whole
     run, sandbox deployment included and shown apart) and the ratio to --parallel 1.
  3. with --compare REV: the same at --parallel 1 (and each --parallel on the first
     system) on the code of git revision REV, run side by side in the same invocation
     (a git worktree of REV, imported in place of this checkout), with the ratios;
  4. with --policies ...,nothing: the first system's cases answered by a playbook that changes
     nothing, at one slot: what a failed episode costs (an RL policy's usual answer early on).
Every run is a subprocess of its own, so the two codes never share a process.
Prints tables and writes JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import statistics
import tempfile
import time
import tomllib
from pathlib import Path

from rich.console import Console
from rich.table import Table

from e2e_reme.simulators.benchmark import BenchConfig, run_bench
from e2e_reme.simulators.episode import EpisodeConfig

PHASES = ("reset", "deploy_check", "inject", "confirm", "report", "generate", "pipeline", "gate", "syntax", "execute",
          "settle", "verify", "total")


def phases(rec: dict) -> dict[str, float]:
    """The record's phase seconds. Records written before the episode's clock was named
    "pipeline" counted the playbook's run twice under "execute" (the whole pipeline plus
    its ansible stage): the pipeline is then that sum less the stage."""
    t = dict(rec["timings"])
    if "pipeline" not in t and "execute" in t:
        stage = sum((tr.get("execution") or {}).get("timings", {}).get("execute", 0.0) for tr in rec.get("trials", []))
        t["pipeline"], t["execute"] = t["execute"] - stage, stage
    return t


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
            "phase_median_s": {p: round(statistics.median([phases(r).get(p, 0.0) for r in recs]), 3)
                               for p in PHASES} if recs else {}}


NOTHING = "```yaml\n- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping:\n```"


def failure_run(system: str, suite: str, cases: int, seed: int, workdir: Path, console: Console) -> dict:
    """The same cases answered by a playbook that changes nothing: what a failed episode
    costs (most of an RL policy's early episodes), at one slot."""
    from e2e_reme.simulators.benchmark import make_cases
    from e2e_reme.simulators.episode import Slot, run_case
    from e2e_reme.simulators.policies.fixed import FixedPolicy
    runnable, _ = make_cases(system, suite, seed, "nspawn")
    slot = Slot(system, name=f"bench-fail-{os.getpid()}").up()
    recs = []
    try:
        for case in runnable[:cases]:
            scenario = getattr(case, "scenario", case)
            rec = run_case(slot, scenario, FixedPolicy(NOTHING, name="nothing"), out_dir=workdir / "episodes")
            console.log(f"{system} nothing: {rec.id} {rec.outcome} ({rec.timings.get('total', 0):.1f} s)")
            recs.append(rec.to_dict())
    finally:
        slot.down()
    return {"system": system, "parallel": 1, "policy": "nothing", "episodes": len(recs),
            "successes": sum(r["outcome"] == "success" for r in recs), "wall_s": None, "setup_s": slot.up_s,
            "episodes_per_min": None,
            "phase_median_s": {p: round(statistics.median([phases(r).get(p, 0.0) for r in recs]), 3)
                               for p in PHASES} if recs else {}}


# ---- the code of another revision, side by side ---------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def code_of(rev: str, tmp: Path) -> tuple[dict[str, str], Path]:
    """An environment whose `import e2e_reme` is the code of git revision `rev`: a worktree
    of it, and a package folder that maps e2e_reme's subpackages onto that worktree's
    folders the way its pyproject.toml's package-dir does."""
    tree = tmp / "rev"
    res = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(tree), rev],
                         capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"--compare {rev}: not a revision of this repository ({(res.stderr.strip().splitlines() or ['git failed'])[-1]})")
    pkg = tmp / "pkg" / "e2e_reme"
    pkg.mkdir(parents=True)
    for f in (tree / "e2e_reme").iterdir():
        (pkg / f.name).symlink_to(f)
    dirs = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in dirs.items():
        if name.count(".") == 1:                       # e2e_reme.X: its subfolders come with it
            (pkg / name.split(".")[1]).symlink_to(tree / folder)
    return {**os.environ, "PYTHONPATH": str(pkg.parent)}, tree


def run_in_subprocess(spec: dict, env: dict[str, str], workdir: Path) -> dict:
    result = workdir / f"result-{spec['label']}-{spec['system']}-j{spec['parallel']}-{spec['policy']}.json"
    subprocess.run([sys.executable, __file__, "--one", json.dumps({**spec, "result": str(result)})],
                   env=env, check=True, cwd=str(workdir))
    return {**json.loads(result.read_text()), "code": spec["label"]}


def run_one_spec(raw: str) -> None:
    spec = json.loads(raw)
    console = Console(width=160)
    if spec.get("policy") == "nothing":
        res = failure_run(spec["system"], spec["suite"], spec["cases"], spec["seed"], Path(spec["workdir"]), console)
    else:
        res = one_run(spec["system"], spec["suite"], spec["cases"], spec["parallel"], spec["seed"],
                      Path(spec["workdir"]), console)
    Path(spec["result"]).write_text(json.dumps(res))


def print_tables(runs: list[dict], args, console: Console) -> None:
    ones = [r for r in runs if r["parallel"] == 1]
    for r in ones:
        r.setdefault("policy", "runbook")
    t = Table(title=f"episode phases, median seconds ({args.suite}, --parallel 1)")
    t.add_column("phase")
    for r in ones:
        t.add_column(f"{r['system']} {r['policy']} {r['code']}", justify="right")
    for p in PHASES:
        t.add_row(p, *[f"{r['phase_median_s'].get(p, 0):.2f}" for r in ones])
    console.print(t)
    first = args.systems.split(",")[0]
    if not any(r["system"] == first and r["policy"] != "nothing" for r in runs):
        return
    t = Table(title=f"throughput on {first} ({args.cases} episodes per run)")
    for c in ("code", "parallel", "episodes", "successes", "setup s", "wall s", "episodes/min", "× of -j1",
              "× of --compare", "median episode s"):
        t.add_column(c, justify="right")
    for r in runs:
        if r["system"] != first or r.get("policy") == "nothing":
            continue
        base = next(b for b in runs if b["system"] == first and b["parallel"] == 1 and b["code"] == r["code"]
                    and b.get("policy") != "nothing")
        old = next((b for b in runs if b["system"] == first and b["parallel"] == r["parallel"]
                    and b["code"] != r["code"] and b["code"] != "this" and b.get("policy") != "nothing"), None)
        rate = r["episodes_per_min"] or 0
        t.add_row(r["code"], str(r["parallel"]), str(r["episodes"]), str(r["successes"]), f"{r['setup_s']:.1f}",
                  f"{r['wall_s']:.1f}", f"{rate:.2f}",
                  f"{rate / base['episodes_per_min']:.2f}" if base["episodes_per_min"] else "-",
                  f"{rate / old['episodes_per_min']:.2f}" if old and old["episodes_per_min"] and r["code"] == "this"
                  else "-", f"{r['phase_median_s'].get('total', 0):.1f}")
    console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--systems", default="simple-micro,boutique")
    ap.add_argument("--suite", default="easy")
    ap.add_argument("--cases", type=int, default=8, help="runnable cases per run")
    ap.add_argument("--parallel", default="1,2,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default="runbook",
                    help="runbook (every run above) and/or nothing: the first system's cases answered by a "
                         "playbook that changes nothing, at one slot (failed episodes)")
    ap.add_argument("--compare", metavar="REV", help="also run the code of this git revision, side by side")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.one:
        return run_one_spec(args.one)
    policies = args.policies.split(",")
    if not policies or set(policies) - {"runbook", "nothing"}:
        ap.error(f"--policies {args.policies}: name runbook and/or nothing, e.g. runbook,nothing")
    console = Console(width=None if sys.stdout.isatty() else 160)
    pars = [int(p) for p in args.parallel.split(",")]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-episode-") as tmp:
        tmp = Path(tmp)
        codes = [("this", dict(os.environ), None)]
        if args.compare:
            env, tree = code_of(args.compare, tmp / "old")
            codes.insert(0, (args.compare, env, tree))
        try:
            first = args.systems.split(",")[0]
            plan = ([(s, 1, "runbook") for s in args.systems.split(",") if "runbook" in policies]
                    + [(first, p, "runbook") for p in pars if p != 1 and "runbook" in policies]
                    + ([(first, 1, "nothing")] if "nothing" in policies else []))
            for system, parallel, policy in plan:
                for label, env, _ in codes:     # the two codes one after the other, per configuration
                    wd = tmp / label / f"{system}-j{parallel}-{policy}"
                    wd.mkdir(parents=True)
                    spec = dict(label=label, system=system, suite=args.suite, cases=args.cases, parallel=parallel,
                                seed=args.seed, workdir=str(wd), policy=policy)
                    console.log(f"{label}: {system} at --parallel {parallel}")
                    runs.append(run_in_subprocess(spec, env, wd))
        finally:
            for _, _, tree in codes:
                if tree is not None:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                                   capture_output=True)
    print_tables(runs, args, console)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"episode-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"bench": "episode", "args": vars(args), "load_average": os.getloadavg(),
                                "runs": runs}, indent=2))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
