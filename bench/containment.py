"""The cost of the containment boundary: the jailed controller against a host controller.

    .venv/bin/python bench/containment.py                     # 7 runs each, then 6 episodes
    .venv/bin/python bench/containment.py --runs 3 --cases 0  # the controller comparison only

Side by side in one run, on one 1-node nspawn sandbox, alternating the two arms so that
load on the machine hits both alike:
  host   what the pipeline did before the boundary: `ansible-playbook --syntax-check` and
         ansible-runner, both on the host (only our fixed playbook is run this way here)
  jail   `run_pipeline(sandbox=...)`: syntax check and run in the jailed controller, and
         the leftover-process sweep (simulators/sandbox/controller.py, simulators/playbook/leftovers.py)
for a typical small remediation playbook (3 tasks). Reported: the median seconds of each
arm, the jail's own start time (launch to first command), and the difference as a share
of the median episode, measured by running --cases episodes of simple-micro's easy suite
with the runbook policy (jailed, as every episode now is). Prints tables; writes JSON under
--out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from e2e_reme.simulators import create_sandbox
from e2e_reme.simulators.sandbox.ansible import DEFAULT_ENV, run_playbook
from e2e_reme.simulators.playbook.execution import run_pipeline

PLAYBOOK = """- hosts: n0
  gather_facts: false
  tasks:
    - name: is sshd active
      ansible.builtin.command: systemctl is-active ssh
      changed_when: false
    - name: write the config
      ansible.builtin.copy: {content: "limit: 10\\n", dest: /etc/remed-bench.conf, mode: "0644"}
    - name: check it
      ansible.builtin.shell: "grep -q 'limit: 10' /etc/remed-bench.conf"
      changed_when: false
"""


def host_arm(sb, work: Path) -> float:
    """The pre-boundary path: syntax check and run by a controller on the host."""
    work.mkdir(parents=True, exist_ok=True)
    inv = sb.write_inventory(work / "hosts.yaml")
    pb = work / "playbook.yaml"
    pb.write_text(PLAYBOOK)
    t0 = time.monotonic()
    exe = Path(sys.executable).parent / "ansible-playbook"
    env = {**os.environ, **DEFAULT_ENV, "ANSIBLE_LOCAL_TEMP": str(work / "tmp")}
    r = subprocess.run([str(exe), "--syntax-check", "-i", str(inv), str(pb)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    run = run_playbook(inv, pb, work / "ansible", 120)
    assert run.ok, run.summary()
    return time.monotonic() - t0


def jail_arm(sb, work: Path) -> tuple[float, float]:
    t0 = time.monotonic()
    out = run_pipeline(f"```yaml\n{PLAYBOOK}```\n", sandbox=sb, workdir=work, timeout_s=120)
    assert out.ok, out.reason
    return time.monotonic() - t0, out.controller["start_s"]


def episodes(cases: int, workdir: Path, console: Console) -> list[float]:
    from e2e_reme.simulators.benchmark import BenchConfig, run_bench
    from e2e_reme.simulators.campaign import make_cases
    from e2e_reme.simulators.episode import EpisodeConfig
    runnable, _ = make_cases("simple-micro", "easy", 0, "nspawn")
    limit = runnable[cases - 1].index + 1 if len(runnable) >= cases else None
    cfg = BenchConfig(system="simple-micro", suite="easy", policy="runbook", parallel=1, seed=0,
                      out=str(workdir / "episodes"), limit=limit, sandbox_prefix="bench-cont",
                      episode=EpisodeConfig())
    run_bench(cfg, on_event=lambda kind, p: kind == "episode" and console.log(
        f"episode {p.id}: {p.outcome} ({p.timings.get('total', 0):.1f} s)"))
    recs = [json.loads(l) for l in (workdir / "episodes" / "episodes.jsonl").read_text().splitlines() if l.strip()]
    return [r["timings"]["total"] for r in recs if "total" in r.get("timings", {})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--cases", type=int, default=6, help="episodes for the median episode time (0: none)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 160)
    host, jail, start = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-containment-") as tmp, \
            create_sandbox("nspawn", nodes=1, name=f"bench-cont-{os.getpid()}") as sb:
        for i in range(args.runs):
            host.append(host_arm(sb, Path(tmp) / f"host{i}"))
            t, s = jail_arm(sb, Path(tmp) / f"jail{i}")
            jail.append(t)
            start.append(s)
            console.log(f"run {i + 1}/{args.runs}: host {host[-1]:.2f} s, jail {jail[-1]:.2f} s (start {s:.2f} s)")
        ep = episodes(args.cases, Path(tmp), console) if args.cases else []
    mh, mj = statistics.median(host), statistics.median(jail)
    me = statistics.median(ep) if ep else None
    t = Table(title=f"controller: host vs jail, median of {args.runs} (a 3-task playbook, 1 nspawn node)")
    for c in ("arm", "median s", "min s", "max s", "jail start s (median)"):
        t.add_column(c, justify="right")
    t.add_row("host", f"{mh:.2f}", f"{min(host):.2f}", f"{max(host):.2f}", "")
    t.add_row("jail", f"{mj:.2f}", f"{min(jail):.2f}", f"{max(jail):.2f}", f"{statistics.median(start):.2f}")
    console.print(t)
    summary = {"host_median_s": round(mh, 3), "jail_median_s": round(mj, 3), "jail_over_host": round(mj / mh, 3),
               "jail_start_median_s": round(statistics.median(start), 3),
               "episode_median_s": round(me, 3) if me else None,
               "episode_overhead": round((mj - mh) / me, 3) if me else None}
    t = Table(title="the boundary's share of an episode")
    for c in ("jail / host", "jail - host s", f"median episode s ({len(ep)} episodes)", "overhead of the episode"):
        t.add_column(c, justify="right")
    t.add_row(f"{mj / mh:.2f}", f"{mj - mh:+.2f}", f"{me:.1f}" if me else "-",
              f"{(mj - mh) / me:+.1%}" if me else "-")
    console.print(t)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"containment-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"bench": "containment", "args": vars(args), "summary": summary,
                                "host_s": host, "jail_s": jail, "jail_start_s": start, "episode_s": ep}, indent=2))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
