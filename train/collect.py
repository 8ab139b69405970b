"""The expert traces SFT trains on, collected from real episodes: the runbook policy on
MicroRemed suites, one benchmark run per (system, suite, seed), each in
`<out>/<system>-<suite>-s<seed>-train/` (episodes.jsonl, results.json). Each is a `remed
bench --policy runbook` run whose targets are drawn among the train split's services only
(configs/splits.yaml, or `collect.splits`; train/splits.py `train_planner`): a case whose
fault applies to no training service of the system is skipped with that reason, and a run
on a system held out whole (validation or test) is refused. The fleet (`remed fleet collect
--policy runbook ...`) writes the same records as shards; point `data.episodes` at its
directory to train on them too (the SFT data keeps only the train split's traces of them).
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
    splits: str = ""                   # the split definition ("": $E2E_REME_SPLITS or configs/splits.yaml)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TracesConfig":
        return build(cls, d, "collect config", TrainError)

    def bench_configs(self) -> list:
        from e2e_reme.simulators.benchmark import BenchConfig
        from .splits import load_splits
        if not self.runs:
            raise TrainError("collect config has no runs: list {system, suite, seeds} entries under collect.runs")
        splits = load_splits(self.splits or None)
        for r in self.runs:
            if splits.system_split(r.system) != "train":
                raise TrainError(f"collect.runs: {r.system} is held out whole ({splits.system_split(r.system)} split "
                                 f"of {splits.source}); traces come from the train split only: remove it")
        return [BenchConfig(system=r.system, suite=r.suite, policy="runbook", backend=self.backend,
                            parallel=self.parallel, seed=s,
                            out=str(Path(self.out) / f"{r.system}-{r.suite}-s{s}-train"), sandbox_prefix="sftdata")
                for r in self.runs for s in r.seeds]

    def planner(self, report=None):
        """The campaign planner of the collection: targets among the train split's services."""
        from .splits import load_splits, train_planner
        return train_planner(load_splits(self.splits or None), self.backend, report)

    def plan(self, report=None) -> list[tuple[Any, list, list]]:
        """(bench config, cases, skipped) of every run, as `collect_traces` runs them."""
        from e2e_reme.simulators.campaign import make_cases
        planner = self.planner(report)
        return [(bc, *make_cases(bc.system, bc.suite, bc.seed, planner, bc.limit)) for bc in self.bench_configs()]


def collect_traces(config: TracesConfig, *, on_event: Callable[[str, Any], None] | None = None) -> list[dict]:
    """Run (or resume) every bench run of the plan; return their results."""
    from e2e_reme.simulators.benchmark import run_bench
    emit = on_event or (lambda kind, payload: None)
    planner = config.planner()
    results = []
    for bc in config.bench_configs():
        emit("run", bc)
        results.append(run_bench(bc, on_event=on_event, planner=planner))
    return results
