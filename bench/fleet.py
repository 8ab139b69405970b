"""What the Ray fleet costs and what it buys on this host, measured side by side in one run.

    .venv/bin/python bench/fleet.py                      # --episodes 6 --slots 1,2,4
    .venv/bin/python bench/fleet.py --episodes 4 --slots 1,2 --kills 1

Runs the expert runbook on simple-micro (MicroRemed's cpu-stress, memory-stress and
network-loss, the faults every host here can provide), the same planned scenarios in
every configuration:
  1. direct: the episode runner called in this process on one slot (`run_case`), no Ray;
  2. through Ray on a local one-node cluster, with 1, 2, 4 slots on the host actor:
     episodes per minute (wall clock from the first dispatch to the last record; sandbox
     deployment is timed apart), scaling efficiency (rate / (slots x rate at 1 slot)),
     and, at 1 slot, the overhead of going through Ray: the driver-observed time per
     episode against the episode's own time, and the ratio of rates against direct;
  3. sandbox replacement: a sandbox destroyed in the middle of an episode, and the time
     until a fresh deployed sandbox stands in its place (`--kills` times).
Prints tables and writes JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from e2e_reme.cluster import CollectConfig, Fleet, FleetConfig, HostConfig, Job, plan
from e2e_reme.simulators.episode import EpisodeConfig, Slot, run_case
from e2e_reme.simulators.policies import make_policy

FAULTS = ("cpu-stress", "memory-stress", "network-loss")
PHASES = ("reset", "deploy_check", "inject", "confirm", "report", "generate", "pipeline", "execute", "settle", "verify",
          "cleanup", "total")


def _med(xs):
    return round(statistics.median(xs), 3) if xs else None


def direct(scenarios, out: Path, console: Console) -> dict:
    slot = Slot("simple-micro", name="bench-fl-direct")
    t0 = time.monotonic()
    slot.up()
    setup = time.monotonic() - t0
    policy = make_policy("runbook")
    recs, walls = [], []
    try:
        t1 = time.monotonic()
        for sc in scenarios:
            t = time.monotonic()
            rec = run_case(slot, sc, policy, out_dir=out, config=EpisodeConfig())
            walls.append(time.monotonic() - t)
            recs.append(rec.to_dict())
            console.log(f"direct: {rec.id} {rec.outcome} ({walls[-1]:.1f} s)")
        wall = time.monotonic() - t1
    finally:
        slot.down()
    return _summary("direct", 1, recs, walls, wall, setup)


def through_ray(scenarios, slots: int, out: Path, console: Console, kills: int = 0) -> dict:
    cfg = FleetConfig(host=HostConfig(slots=slots, sandbox_prefix="bench-fl", out_dir=str(out)))
    t0 = time.monotonic()
    fleet = Fleet(cfg).start()
    setup = time.monotonic() - t0
    recs, walls = [], []
    try:
        sent: dict[str, float] = {}
        jobs = [Job(id=sc.id, scenario=sc) for sc in scenarios]

        def on_event(kind, payload):
            if kind == "dispatch":
                sent[payload[1]] = time.monotonic()
        t1 = time.monotonic()
        for rec in fleet.run(jobs, on_event=on_event):
            walls.append(time.monotonic() - sent[rec["id"]])
            recs.append(rec)
            console.log(f"ray x{slots}: {rec['id']} {rec['outcome']} ({walls[-1]:.1f} s)")
        wall = time.monotonic() - t1
        replace = []
        if kills:
            import ray
            host = fleet.hosts[0]
            for k in range(kills):
                job = Job(id=f"kill-{k}", scenario=scenarios[k % len(scenarios)])
                box = []
                import threading
                th = threading.Thread(target=lambda: box.extend(fleet.run([job])), daemon=True)
                th.start()
                while not ray.get(host.actor.stats.remote())["slots"]["busy"]:
                    time.sleep(0.2)
                time.sleep(3)
                ray.get(host.actor.kill_sandbox.remote())
                th.join(600)
                console.log(f"killed a sandbox mid-episode: {box[0]['outcome']} after {box[0]['attempts']} attempts")
            replace = ray.get(host.actor.stats.remote())["replace_s"]
    finally:
        fleet.shutdown()
    res = _summary("ray", slots, recs, walls, wall, setup)
    res["replace_s"] = replace
    return res


def _summary(mode, slots, recs, walls, wall, setup) -> dict:
    own = [r["timings"].get("total", 0.0) for r in recs]
    return {"mode": mode, "slots": slots, "episodes": len(recs),
            "successes": sum(r["outcome"] == "success" for r in recs),
            "setup_s": round(setup, 1), "wall_s": round(wall, 1),
            "episodes_per_min": round(60 * len(recs) / wall, 2) if wall else None,
            "median_observed_s": _med(walls), "median_episode_s": _med(own),
            "phase_median_s": {p: _med([r["timings"].get(p, 0.0) for r in recs]) for p in PHASES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=6, help="episodes per configuration")
    ap.add_argument("--slots", default="1,2,4")
    ap.add_argument("--kills", type=int, default=2, help="sandboxes killed mid-episode (at 1 slot)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 160)
    import ray
    scenarios = [c.scenario for c in plan(CollectConfig(episodes=args.episodes, faults=FAULTS, seed=args.seed))[0]]
    runs = []
    from e2e_reme.ray_auth import private_token
    private_token()                     # the local head's token, 0600 before Ray writes one
    ray.init(resources={"sandbox_host": 1}, include_dashboard=False, log_to_driver=False, namespace="bench")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            runs.append(direct(scenarios, Path(tmp) / "direct", console))
            for n in [int(s) for s in args.slots.split(",")]:
                runs.append(through_ray(scenarios if n == 1 else _more(scenarios, n, args), n,
                                        Path(tmp) / f"ray{n}", console, kills=args.kills if n == 1 else 0))
    finally:
        ray.shutdown()

    d = runs[0]
    r1 = next(r for r in runs if r["mode"] == "ray" and r["slots"] == 1)
    t = Table(title="simple-micro, runbook: episodes per minute (deployment timed apart)")
    for c in ("mode", "slots", "episodes", "ok", "setup s", "wall s", "episodes/min", "scaling eff.",
              "median episode s", "median observed s"):
        t.add_column(c, justify="right")
    for r in runs:
        eff = (r["episodes_per_min"] / (r["slots"] * r1["episodes_per_min"])) if r["mode"] == "ray" else None
        t.add_row(r["mode"], str(r["slots"]), str(r["episodes"]), str(r["successes"]), f"{r['setup_s']:.1f}",
                  f"{r['wall_s']:.1f}", f"{r['episodes_per_min']:.2f}", f"{eff:.2f}" if eff else "-",
                  f"{r['median_episode_s']:.2f}", f"{r['median_observed_s']:.2f}")
    console.print(t)
    overhead = {"observed_vs_episode": round(r1["median_observed_s"] / r1["median_episode_s"] - 1, 4),
                "ray_vs_direct_median_observed": round(r1["median_observed_s"] / d["median_observed_s"] - 1, 4),
                "direct_vs_ray_rate": round(d["episodes_per_min"] / r1["episodes_per_min"] - 1, 4)}
    t = Table(title="overhead of going through Ray (1 slot, same scenarios)")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in overhead.items():
        t.add_row(k, f"{v:+.1%}")
    if r1.get("replace_s"):
        t.add_row("sandbox replacement, median s (create + deploy + checkpoint)", f"{r1['replace_s']['p50']:.1f}")
    console.print(t)
    t = Table(title="where an episode's time goes: median seconds per phase")
    t.add_column("phase")
    for r in runs:
        t.add_column(f"{r['mode']} x{r['slots']}", justify="right")
    for p in PHASES:
        t.add_row(p, *[f"{r['phase_median_s'][p]:.2f}" if r["phase_median_s"][p] is not None else "-" for r in runs])
    console.print(t)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"bench": "fleet", "args": vars(args), "runs": runs, "overhead": overhead}, indent=2))
    console.print(f"wrote {path}")


def _more(scenarios, n, args):
    """Enough episodes that every slot has work for the whole run."""
    k = max(len(scenarios), 2 * n)
    return [c.scenario for c in plan(CollectConfig(episodes=k, faults=FAULTS, seed=args.seed))[0]]


if __name__ == "__main__":
    main()
