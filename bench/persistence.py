"""What issue 28's reads cost: the node state the verdict compares (mounts, unit and job
files, cgroups) and the persistence sweep around every playbook run.

    .venv/bin/python bench/persistence.py [--system simple-micro] [--reps 20] [--backend nspawn|libvirt]

On one sandbox with the system deployed: seconds per call (median, max over --reps)
of `runtime_state.node_state` for each node, of the sweep's snapshot (`with_files`), of a
sweep that finds nothing, and of one that finds a restarted service (a new top-level
process in a unit's cgroup: one toolset call to ask systemd for its MainPID).
"""

from __future__ import annotations

import argparse
import statistics
import time

from e2e_reme.simulators import create_sandbox
from e2e_reme.simulators.playbook.leftovers import end_leftovers, snapshot
from e2e_reme.simulators.systems.deploy import deploy, wait_healthy
from e2e_reme.simulators.systems.spec import load_system
from e2e_reme.simulators.verification import runtime_state


def _time(fn, reps: int) -> tuple[float, float]:
    out = []
    for _ in range(reps):
        t0 = time.monotonic()
        fn()
        out.append(time.monotonic() - t0)
    return round(statistics.median(out), 4), round(max(out), 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", default="simple-micro")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--backend", default="nspawn")
    a = ap.parse_args()
    spec = load_system(a.system)
    with create_sandbox(a.backend, nodes=spec.nodes) as sb:
        dep = deploy(sb, a.system)
        wait_healthy(sb, dep)
        units = {i: [t.unit for t in dep.targets.values() if t.node == i] for i in range(len(sb.nodes))}
        rows = {"node_state (all nodes)": _time(lambda: [runtime_state.node_state(sb, i, units[i])
                                                         for i in range(len(sb.nodes))], a.reps),
                "snapshot (processes + unit files)": _time(lambda: snapshot(sb), a.reps),
                "snapshot + sweep, nothing left": _time(lambda: end_leftovers(sb, snapshot(sb)), a.reps)}
        t = next(iter(dep.targets.values()))

        def restarted():
            before = snapshot(sb)
            sb.exec(f"systemctl restart {t.unit}", node=t.node)
            t0 = time.monotonic()
            end_leftovers(sb, before)
            return time.monotonic() - t0
        after = [restarted() for _ in range(max(3, a.reps // 4))]
        rows["sweep after a service restart (no snapshot)"] = (round(statistics.median(after), 4), round(max(after), 4))
    print(f"{a.system}, {len(sb.nodes)} node(s), {a.backend}; seconds (median, max)")
    for k, (med, mx) in rows.items():
        print(f"  {k:40s} {med:8.4f} {mx:8.4f}")


if __name__ == "__main__":
    main()
