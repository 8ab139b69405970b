"""Where an RL step's seconds go, from a run's own per-step records (issue 30, "Measured").

    .venv/bin/python bench/rl_steps.py --run runs/rl-release --label after-item-4
    .venv/bin/python bench/rl_steps.py --run releases/rl/<run> --label ...     # a kept run's metrics.jsonl

`train/rl.py` writes one line a step to `<run>/metrics.jsonl`, with `time_s`: `judge` (wall
time of the step's groups: observation, generation and execution interleave on the
fleet's slots), `update` (the trainer actor's optimizer step and checkpoint), `sync` (the
adapter to the rollout worker), and, summed over the groups on their hosts,
`host_observe`, `host_answer` (generation, waiting for the rollout worker included) and
`host_execute`. This prints their medians (and min-max) over the run's steps beside the
step's wall time (judge + update + sync) and each part's share of it, and merges the
column `--label` into bench/results/rl_steps.json. Nothing is timed here: the figures are
the run's, measured on the machine that ran it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "rl_steps.json"
PARTS = ("judge", "update", "sync", "host_observe", "host_answer", "host_execute")


def summarize(rows: list[dict]) -> dict:
    steps = [r for r in rows if r.get("time_s")]
    if not steps:
        raise SystemExit("no step with time_s in the metrics: is this an RL run's metrics.jsonl?")
    wall = [sum(r["time_s"].get(k, 0.0) for k in ("judge", "update", "sync")) for r in steps]
    out = {"steps": len(steps), "step_s": {"median": statistics.median(wall), "min": min(wall), "max": max(wall)},
           "sequences_median": statistics.median(r.get("sequences", 0) for r in steps),
           "completion_tokens_median": statistics.median(r.get("completion_tokens", 0) for r in steps),
           "groups_median": statistics.median(r.get("groups", 0) for r in steps), "parts": {}}
    med_wall = out["step_s"]["median"]
    for k in PARTS:
        xs = [r["time_s"][k] for r in steps if k in r["time_s"]]
        if xs:
            m = statistics.median(xs)
            out["parts"][k] = {"median": round(m, 2), "min": round(min(xs), 2), "max": round(max(xs), 2),
                               "share_of_step": round(m / med_wall, 3) if med_wall else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="an RL run's out directory (metrics.jsonl inside)")
    ap.add_argument("--label", default="run", help="the column's name in bench/results/rl_steps.json")
    args = ap.parse_args()
    path = args.run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; name an RL run's out directory (`train/rl.py` writes it)")
    res = summarize([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    res["run"] = str(args.run)
    print(f"{'part':<14}{'median s':>10}{'min':>9}{'max':>9}{'share':>8}")
    s = res["step_s"]
    print(f"{'step (wall)':<14}{s['median']:>10.1f}{s['min']:>9.1f}{s['max']:>9.1f}{'':>8}")
    for k, v in res["parts"].items():
        share = f"{v['share_of_step']:.0%}" if v["share_of_step"] is not None else "-"
        print(f"{k:<14}{v['median']:>10.1f}{v['min']:>9.1f}{v['max']:>9.1f}{share:>8}")
    print(f"{res['steps']} steps; median {res['groups_median']:g} groups, {res['sequences_median']:g} sequences, "
          f"{res['completion_tokens_median']:g} completion tokens a step (host_* are summed over the groups, "
          "which run side by side: their shares can add up to more than the step)")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    old[args.label] = res
    RESULT.write_text(json.dumps(old, indent=2) + "\n")
    print(f"wrote {RESULT.relative_to(ROOT)} [{args.label}]")


if __name__ == "__main__":
    main()
