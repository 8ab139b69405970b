"""The expert traces SFT trains on, collected from real episodes: the runbook policy on
MicroRemed suites, one `remed bench` run per (system, suite, seed), each in
`<out>/<system>-<suite>-s<seed>/` (episodes.jsonl, results.json). The same as running

    remed bench --system boutique --suite easy --policy runbook --seed 0 --out runs/sft-data/boutique-easy-s0

for each entry, so a run started either way resumes the other. The fleet
(`remed fleet collect --policy runbook ...`) writes the same records as shards; point
`data.episodes` at its directory to train on them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import TrainError
from e2e_reme.config import build


@dataclass(frozen=True)
class TraceRun:
    system: str
    suite: str = "easy"
    seeds: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class TracesConfig:
    """The `collect:` section of an SFT config: which runbook bench runs make the traces.
    (Not the fleet's `cluster.CollectConfig`, which samples cases for any policy.)"""
    out: str = "runs/sft-data"
    runs: tuple[TraceRun, ...] = ()
    backend: str = "nspawn"
    parallel: int = 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TracesConfig":
        return build(cls, d, "collect config", TrainError)

    def bench_configs(self) -> list:
        from e2e_reme.simulators.benchmark import BenchConfig
        if not self.runs:
            raise TrainError("collect config has no runs: list {system, suite, seeds} entries under collect.runs")
        return [BenchConfig(system=r.system, suite=r.suite, policy="runbook", backend=self.backend,
                            parallel=self.parallel, seed=s, out=str(Path(self.out) / f"{r.system}-{r.suite}-s{s}"),
                            sandbox_prefix="sftdata")
                for r in self.runs for s in r.seeds]


def collect_traces(config: TracesConfig, *, on_event: Callable[[str, Any], None] | None = None) -> list[dict]:
    """Run (or resume) every bench run of the plan; return their results."""
    from e2e_reme.simulators.benchmark import run_bench
    emit = on_event or (lambda kind, payload: None)
    results = []
    for bc in config.bench_configs():
        emit("run", bc)
        results.append(run_bench(bc, on_event=on_event))
    return results
