"""Fault and system costs, measured side by side in one run.

    .venv/bin/python bench/faults.py                              # simple-micro, every fault available here
    .venv/bin/python bench/faults.py --systems simple-micro,boutique,train-ticket --faults cpu-stress,pod-fail

Per system: deploy time and memory per node after deploy (median over --deploys).
Per fault type (on the first system, one episode each over --runs): time to inject, until
its ground truth reads active, to build the full report, to run the expert runbook's
playbook, to verify (`verify`: the verdict with issue 14's checks; `verify_legacy`: the
same verdict without the runtime, function and host-side seed checks, on the same state,
in alternating order); and whether the verdict was a success. Prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from e2e_reme.simulators import create_sandbox
from e2e_reme.simulators.sandbox.ansible import run_playbook
from e2e_reme.simulators.faults import fault_available, fault_catalog, forget_faults, get_fault, make_fault
from e2e_reme.simulators.reports import build_report
from e2e_reme.simulators.policies.expert import expert_playbook
from e2e_reme.simulators.systems.deploy import deploy, wait_healthy
from e2e_reme.simulators.systems.spec import load_system
from e2e_reme.simulators.verification.verifier import take_baseline, verify

PHASES = ("inject", "active", "report", "execute", "verify", "verify_legacy")


def legacy_seed_check(sb, dep) -> dict:
    """The seed check as before issue 14: the node's own sha256sum and python."""
    from e2e_reme.simulators.systems.deploy import verify_seed
    problems = verify_seed(sb, dep)
    return {"ok": not problems, "detail": "; ".join(problems[:3])}


def verify_both(sb, dep, baseline, f, r: int) -> tuple[object, float, float]:
    """The verify phase with the issue-14 checks and without them (runtime, function, the
    host-side seed check), on the same settled state, in alternating order."""
    def strict():
        t = time.monotonic()
        v = verify(sb, dep, baseline, [f])
        return v, time.monotonic() - t

    def legacy():
        t = time.monotonic()
        verify(sb, dep, baseline, [f], runtime=False, function_check=None, seed_check=legacy_seed_check)
        return time.monotonic() - t

    if r % 2:
        old = legacy()
        v, new = strict()
    else:
        v, new = strict()
        old = legacy()
    return v, new, old


def med(xs):
    return round(statistics.median(xs), 3) if xs else None


def bench_system(name: str, deploys: int) -> dict:
    spec = load_system(name)
    times, mem = [], []
    for _ in range(deploys):
        with create_sandbox("nspawn", nodes=spec.nodes, name=f"bench-{name[:8]}") as sb:
            t = time.monotonic()
            deploy(sb, name)
            times.append(time.monotonic() - t)
            time.sleep(2)
            mem.append([round(sb.node_memory_mib(i), 1) for i in range(len(sb.nodes))])
    return {"deploy_s": {"min": min(times), "median": med(times), "max": max(times)},
            "memory_mib_per_node": mem[-1], "memory_mib_total": round(sum(mem[-1]), 1)}


def bench_faults(system: str, faults: list[str], target: str | None, runs: int, console: Console) -> dict:
    spec = load_system(system)
    out = {}
    with create_sandbox("nspawn", nodes=spec.nodes, name="bench-faults") as sb, \
            tempfile.TemporaryDirectory() as tmp:
        dep = deploy(sb, system)
        sb.checkpoint()
        inv = sb.write_inventory(Path(tmp) / "hosts.yaml")
        # Default: an http service that calls others (every fault type applies to it).
        svc = target or next(n for n, t in dep.targets.items() if t.kind == "http" and t.dependencies)
        for fault in faults:
            ok, why = fault_available(fault, "nspawn")
            if ok:
                ok, why = get_fault(fault).applies_to(dep.targets[svc], dep.targets)
            if not ok:
                out[fault] = {"skipped": why}
                continue
            samples: dict[str, list[float]] = {p: [] for p in PHASES}
            successes = 0
            for r in range(runs):
                console.log(f"{fault} run {r + 1}/{runs}")
                sb.reset()
                forget_faults(sb)   # the reset discarded them with the node
                wait_healthy(sb, dep)
                baseline = take_baseline(sb, dep)
                f = make_fault(fault, dep.targets[svc], dep.targets, seed=r)
                t = time.monotonic()
                f.inject(sb)
                samples["inject"].append(time.monotonic() - t)
                t = time.monotonic()
                while not f.is_active(sb) and time.monotonic() - t < 30:
                    time.sleep(0.1)
                samples["active"].append(time.monotonic() - t)
                t = time.monotonic()
                report = build_report(sb, dep, [f], "full")
                samples["report"].append(time.monotonic() - t)
                t = time.monotonic()
                plays = yaml.safe_load(expert_playbook(report.runbook_input()))
                run = run_playbook(inv, plays, Path(tmp) / "pdd", timeout_s=180)
                samples["execute"].append(time.monotonic() - t)
                verdict, new, old = verify_both(sb, dep, baseline, f, r)
                samples["verify"].append(new)
                samples["verify_legacy"].append(old)
                successes += verdict.success and run.status == "successful"
            out[fault] = {p: med(v) for p, v in samples.items()} | {"runs": runs, "successes": successes}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="simple-micro")
    ap.add_argument("--faults", default="all")
    ap.add_argument("--target", default=None, help="service to aim at (default: one that others call)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--deploys", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 160)
    systems = args.systems.split(",")
    faults = sorted(fault_catalog()) if args.faults == "all" else args.faults.split(",")
    results = {"bench": "faults", "systems": {}, "faults_on": systems[0]}
    for s in systems:
        console.log(f"deploying {s} ×{args.deploys}")
        results["systems"][s] = bench_system(s, args.deploys)
    results["faults"] = bench_faults(systems[0], faults, args.target, args.runs, console)

    t = Table(title="systems on nspawn")
    for c in ("system", "deploy s (min/median/max)", "MiB per node", "MiB total"):
        t.add_column(c)
    for s, r in results["systems"].items():
        d = r["deploy_s"]
        t.add_row(s, f"{d['min']:.1f} / {d['median']:.1f} / {d['max']:.1f}",
                  " ".join(f"{m:.0f}" for m in r["memory_mib_per_node"]), f"{r['memory_mib_total']:.0f}")
    console.print(t)
    t = Table(title=f"faults on {systems[0]} (median seconds over {args.runs} run(s))")
    for c in ("fault", *PHASES, "success"):
        t.add_column(c)
    for f, r in results["faults"].items():
        if "skipped" in r:
            t.add_row(f, *["-"] * len(PHASES), f"skipped: {r['skipped'][:60]}")
        else:
            t.add_row(f, *[f"{r[p]:.2f}" for p in PHASES], f"{r['successes']}/{r['runs']}")
    console.print(t)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"faults-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
