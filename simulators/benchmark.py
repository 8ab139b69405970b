"""The MicroRemed-compatible benchmark: a suite of fault cases on one system, run by one
policy on N local sandboxes, with comparable, reproducible numbers.

    config = BenchConfig(system="simple-micro", suite="easy", policy="runbook", out="runs/easy")
    results = run_bench(config)          # writes out/config.json, episodes.jsonl, results.json, chart.png

Suites are MicroRemed's fixed sequences (`suites/*.txt`, copied from its experiments/), or a
file of fault names, one per line. The cases, their records and their statistics are the
campaign's (`campaign.py`): each case's target is drawn from the services the fault applies
to with a generator seeded by (seed, index), so the same seed gives the same cases whatever
the policy and however many sandboxes run them. `backend` may name several backends
("nspawn,libvirt"): a case goes to the first that provides its fault here. A fault no
configured backend provides is reported as skipped with the reason, never run and never
counted as a success.

What MicroRemed's harness did and this one does not: an unseeded target choice; failed
injections dropped from the denominator (here they are counted as failures); token counts
estimated from characters (here: the tokenizer or the API's usage fields); a verification
agent that calls the grader (here the policy only sees a weak health signal); probe
commands run on the host (here: read-only, allow-listed, inside the sandbox).

    success_rate = successes / (cases - infra_failures)      cases excludes skipped ones

Infrastructure failures (a sandbox that stopped answering) are retried once on a fresh
sandbox and, if they fail again, reported apart: they are nobody's policy's fault.
An interrupted run resumes: episodes already in episodes.jsonl are not run again.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from e2e_reme.config import build

from e2e_reme.simulators.campaign import (Case, Planner, RecordStore, Skipped, make_cases, parse_backends, per_group, publish,
                       run_local, stats)
from e2e_reme.simulators.episode import EpisodeConfig
from e2e_reme.simulators.policies.base import make_policy

SUITES = ("easy", "medium", "hard")


@dataclass(frozen=True)
class BenchConfig:
    system: str = "simple-micro"
    suite: str = "easy"                 # easy | medium | hard | a MicroRemed per-fault suite | FILE
    policy: str = "runbook"
    policy_options: dict = field(default_factory=dict)   # model, base_url, api_key_env, max_trials, ...
    backend: str = "nspawn"             # or a list, "nspawn,libvirt": a case runs on the first that can
    parallel: int = 1
    seed: int = 0
    out: str = "runs/bench"
    limit: int | None = None            # only the first N cases (quick looks)
    sandbox_prefix: str = "bench"       # sandboxes are named <prefix>-<run>-<slot>
    episode: EpisodeConfig = EpisodeConfig()

    @classmethod
    def from_dict(cls, d: dict) -> "BenchConfig":
        return build(cls, d, "bench config")

    def to_dict(self) -> dict:
        d = asdict(self)
        # A key given on the command line is not written beside the results.
        d["policy_options"] = {k: ("***" if "key" in k and "env" not in k else v)
                               for k, v in self.policy_options.items()}
        return d


# ---- results ---------------------------------------------------------------------------------

RESUME_KEYS = ("system", "suite", "policy", "backend", "seed", "episode", "limit")   # not parallelism


def summarize(records: list[dict], skipped: list[Skipped], config: BenchConfig) -> dict:
    """The run's statistics, and per fault type with the count of its skipped cases."""
    per_fault = per_group(records, also=[s.fault for s in skipped])
    for f, group in per_fault.items():
        group["skipped"] = sum(s.fault == f for s in skipped)
    return {**stats(records), "skipped": len(skipped), "per_fault": per_fault,
            "skipped_cases": [s.to_dict() for s in skipped],
            "system": config.system, "suite": config.suite, "policy": config.policy,
            "backend": config.backend, "seed": config.seed,
            "report_detail": config.episode.report_detail, "report_noise": config.episode.report_noise}


def _backends_used(cases: list[Case], config: BenchConfig) -> dict:
    """With more than one backend configured, how many cases each runs."""
    if len(parse_backends(config.backend)) < 2:
        return {}
    return {"cases_per_backend": dict(collections.Counter(c.backend for c in cases))}


# ---- running ---------------------------------------------------------------------------------

def run_bench(config: BenchConfig, *, on_event: Callable[[str, Any], None] | None = None,
              stop: threading.Event | None = None, planner: Planner | None = None) -> dict:
    """Run (or resume) the benchmark; return the results dict (also written to results.json).
    `on_event(kind, payload)` sees: ("cases", (todo, done, skipped)), ("slot", text),
    ("step", (slot, text)), ("episode", EpisodeRecord). `planner`: one of config.backend's
    that offers fewer targets (the trace collection's: the train split's services only)."""
    emit = on_event or (lambda kind, payload: None)
    cases, skipped = make_cases(config.system, config.suite, config.seed, planner or config.backend, config.limit)
    store = RecordStore(config.out)
    store.claim("config.json", config.to_dict(), RESUME_KEYS)
    todo, done = store.pending(cases)
    emit("cases", (todo, done, skipped))
    if todo:
        opts = _policy_options(config)
        make_policy(config.policy, **opts)      # a bad policy or option fails before any sandbox
        run_local(todo, store, policy=lambda: make_policy(config.policy, **opts), out_dir=store.dir / "episodes",
                  prefix=config.sandbox_prefix, parallel=config.parallel, episode=config.episode, emit=emit,
                  stop=stop)
    records = store.records(cases)
    results = {**summarize(records, skipped, config), "complete": len(records) == len(cases),
               **_backends_used(cases, config)}
    return publish(store, results, {"": results["per_fault"]},
                   f"{config.policy} on {config.system} / {config.suite}: "
                   f"{results['success_rate']:.0%} of {results['cases']} cases")


def _policy_options(config: BenchConfig) -> dict:
    """The policy's options; an API key is read from the environment variable named in the
    config, so that no key is ever written beside the results."""
    import os
    opts = {k: v for k, v in config.policy_options.items() if v is not None}
    env = opts.pop("api_key_env", None)
    if env:
        opts["api_key"] = os.environ.get(env)
    return opts
