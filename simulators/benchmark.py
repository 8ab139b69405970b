"""The MicroRemed-compatible benchmark: a suite of fault cases on one system, run by one
policy on N local sandboxes, with comparable, reproducible numbers.

    config = BenchConfig(system="simple-micro", suite="easy", policy="runbook", out="runs/easy")
    results = run_bench(config)          # writes out/config.json, episodes.jsonl, results.json, chart.png

Suites are MicroRemed's fixed sequences (`suites/*.txt`, copied from its experiments/), or a
file of fault names, one per line. Each case's target is drawn from the services the fault
applies to with a generator seeded by (seed, index): the same seed gives the same cases,
whatever the policy and however many sandboxes run them. A fault this host cannot provide
is reported as skipped with the reason, never run and never counted as a success.

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

import json
import math
import queue
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from e2e_reme.config import check_keys

from .episode import EpisodeConfig, EpisodeRecord, Scenario, Slot, run_case
from .faults.base import canonical_name, fault_available, get_fault
from .policies.base import make_policy
from .systems.deploy import targets_for
from .systems.spec import load_system

SUITES = ("easy", "medium", "hard")


@dataclass(frozen=True)
class BenchConfig:
    system: str = "simple-micro"
    suite: str = "easy"                 # easy | medium | hard | a MicroRemed per-fault suite | FILE
    policy: str = "runbook"
    policy_options: dict = field(default_factory=dict)   # model, base_url, api_key_env, max_trials, ...
    backend: str = "nspawn"
    parallel: int = 1
    seed: int = 0
    out: str = "runs/bench"
    limit: int | None = None            # only the first N cases (quick looks)
    sandbox_prefix: str = "bench"       # sandboxes are named <prefix>-<run>-<slot>
    episode: EpisodeConfig = EpisodeConfig()

    @classmethod
    def from_dict(cls, d: dict) -> "BenchConfig":
        check_keys("bench config", d, cls)
        d = dict(d)
        if isinstance(d.get("episode"), dict):
            check_keys("bench config: episode", d["episode"], EpisodeConfig)
            d["episode"] = EpisodeConfig(**d["episode"])
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        # A key given on the command line is not written beside the results.
        d["policy_options"] = {k: ("***" if "key" in k and "env" not in k else v)
                               for k, v in self.policy_options.items()}
        return d


# ---- suites and cases ----------------------------------------------------------------------

def list_suites() -> list[str]:
    return sorted(p.name[:-4] for p in resources.files(__package__).joinpath("suites").iterdir()
                  if p.name.endswith(".txt"))


def load_suite(name_or_path: str) -> list[str]:
    """Fault names of a suite, in order (MicroRemed's names; aliases are resolved later)."""
    path = Path(name_or_path)
    if path.is_file():
        text = path.read_text()
    else:
        res = resources.files(__package__).joinpath("suites", f"{name_or_path}.txt")
        if not res.is_file():
            raise ValueError(f"suite '{name_or_path}': not a file and not one of {', '.join(list_suites())}")
        text = res.read_text()
    names = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    if not names:
        raise ValueError(f"suite '{name_or_path}' has no cases")
    for n in names:
        get_fault(n)    # an unknown fault name is an error that lists the catalog
    return names


@dataclass(frozen=True)
class Skipped:
    index: int
    fault: str
    reason: str


def make_cases(system: str, suite: str, seed: int, backend: str,
               limit: int | None = None) -> tuple[list[Scenario], list[Skipped]]:
    """The suite's cases on `system`: a Scenario per runnable case, a Skipped (with the
    reason) per case this host cannot provide or that no service of the system admits."""
    spec = load_system(system)
    targets = targets_for(spec, [f"198.18.255.{i + 2}" for i in range(spec.nodes)])
    names = load_suite(suite)[:limit] if limit else load_suite(suite)
    cases, skipped = [], []
    for i, raw in enumerate(names):
        name = canonical_name(raw)
        ok, why = fault_available(name, backend)
        if not ok:
            skipped.append(Skipped(i, name, why))
            continue
        cls = get_fault(name)
        eligible = sorted(n for n, t in targets.items() if cls.applies_to(t, targets)[0])
        if not eligible:
            skipped.append(Skipped(i, name, f"no service of {system} admits {name}"))
            continue
        rng = random.Random(f"{seed}:{i}")
        cases.append(Scenario(system=system, fault=name, target=rng.choice(eligible),
                              seed=rng.randrange(2 ** 31), index=i))
    return cases, skipped


# ---- statistics ----------------------------------------------------------------------------

def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval: honest at small n and at 0 % or 100 %."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (round(max(0.0, c - h), 4), round(min(1.0, c + h), 4))


def _stats(recs: list[dict], skipped: int) -> dict:
    n = len(recs)
    succ = sum(r["outcome"] == "success" for r in recs)
    inj = sum(r["outcome"] == "injection_failure" for r in recs)
    infra = sum(r["outcome"] == "infra_failure" for r in recs)
    judged = n - infra
    times = [r["timings"].get("total", 0.0) for r in recs if r["outcome"] != "infra_failure"]
    toks = [(r["tokens"].get("prompt"), r["tokens"].get("completion")) for r in recs]
    known = [p + c for p, c in toks if p is not None and c is not None]
    trials = sum(len(r["trials"]) for r in recs if r["outcome"] == "success")
    stages: dict[str, int] = {}
    for r in recs:
        if r["outcome"] == "failure":
            stages[r["stage"]] = stages.get(r["stage"], 0) + 1
    return {"cases": n, "successes": succ, "injection_failures": inj, "infra_failures": infra,
            "skipped": skipped,
            "success_rate": round(succ / judged, 4) if judged else 0.0,
            "ci95": wilson(succ, judged),
            "attempts_per_success": round(trials / succ, 3) if succ else None,
            "mean_time_s": round(statistics.mean(times), 2) if times else None,
            "median_time_s": round(statistics.median(times), 2) if times else None,
            "tokens_total": sum(known) if known else (0 if not toks else None),
            "tokens_per_case": round(sum(known) / len(known), 1) if known else None,
            "failure_stages": stages}


def summarize(records: list[dict], skipped: list[Skipped], config: BenchConfig) -> dict:
    per_fault: dict[str, dict] = {}
    faults = list(dict.fromkeys([r["scenario"]["fault"] for r in records] + [s.fault for s in skipped]))
    for f in faults:
        per_fault[f] = _stats([r for r in records if r["scenario"]["fault"] == f],
                              sum(s.fault == f for s in skipped))
    overall = _stats(records, len(skipped))
    return {**overall, "per_fault": per_fault,
            "skipped_cases": [asdict(s) for s in skipped],
            "system": config.system, "suite": config.suite, "policy": config.policy,
            "backend": config.backend, "seed": config.seed,
            "report_detail": config.episode.report_detail, "report_noise": config.episode.report_noise}


def write_chart(results: dict, path: Path) -> Path | None:
    """Success rate per fault type with its 95 % interval, as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [f for f, s in results["per_fault"].items() if s["cases"]]
    if not names:
        return None
    rates = [results["per_fault"][f]["success_rate"] for f in names]
    lo = [r - results["per_fault"][f]["ci95"][0] for f, r in zip(names, rates)]
    hi = [results["per_fault"][f]["ci95"][1] - r for f, r in zip(names, rates)]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names) + 2), 3.6))
    ax.bar(names, rates, yerr=[lo, hi], capsize=4, color="#4c72b0")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (95 % CI)")
    ax.set_title(f"{results['policy']} on {results['system']} / {results['suite']}: "
                 f"{results['success_rate']:.0%} of {results['cases']} cases")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- running ---------------------------------------------------------------------------------

def _load_done(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue    # a line cut by a kill mid-write: that episode runs again
                done[rec["id"]] = rec
    return done


def _check_resume(out: Path, config: BenchConfig) -> None:
    saved = out / "config.json"
    if not saved.exists():
        return
    old = json.loads(saved.read_text())
    new = json.loads(json.dumps(config.to_dict(), default=str))
    # What decides the cases and how they are judged must match; parallelism need not.
    keys = ("system", "suite", "policy", "backend", "seed", "episode", "limit")
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"{out} holds a run with another {', '.join(diff)}; resume it with the same "
                         f"settings or choose another --out")


def run_bench(config: BenchConfig, *, on_event: Callable[[str, Any], None] | None = None,
              stop: threading.Event | None = None) -> dict:
    """Run (or resume) the benchmark; return the results dict (also written to results.json).
    `on_event(kind, payload)` sees: ("cases", (todo, done, skipped)), ("slot", text),
    ("step", (slot, text)), ("episode", EpisodeRecord)."""
    emit = on_event or (lambda kind, payload: None)
    stop = stop or threading.Event()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, config)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    cases, skipped = make_cases(config.system, config.suite, config.seed, config.backend, config.limit)
    jsonl = out / "episodes.jsonl"
    done = _load_done(jsonl)
    todo = [c for c in cases if c.id not in done]
    emit("cases", (todo, [done[c.id] for c in cases if c.id in done], skipped))
    if todo:
        policy_opts = _policy_options(config)
        make_policy(config.policy, **policy_opts)      # a bad policy or option fails before any sandbox
        _run_cases(config, todo, jsonl, emit, stop, policy_opts)
    done = _load_done(jsonl)
    records = [done[c.id] for c in cases if c.id in done]
    results = summarize(records, skipped, config)
    results["complete"] = len(records) == len(cases)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    chart = write_chart(results, out / "success.png")
    results["chart"] = str(chart) if chart else None
    return results


def _policy_options(config: BenchConfig) -> dict:
    """The policy's options; an API key is read from the environment variable named in the
    config, so that no key is ever written beside the results."""
    import os
    opts = {k: v for k, v in config.policy_options.items() if v is not None}
    env = opts.pop("api_key_env", None)
    if env:
        opts["api_key"] = os.environ.get(env)
    return opts


def _run_cases(config: BenchConfig, todo: list[Scenario], jsonl: Path, emit, stop: threading.Event,
               policy_opts: dict) -> None:
    work: queue.Queue[Scenario] = queue.Queue()
    for c in todo:
        work.put(c)
    lock = threading.Lock()
    errors: list[BaseException] = []
    run_tag = f"{int(time.time()) % 100000:05d}"
    n = max(1, min(config.parallel, len(todo)))
    slots = [Slot(config.system, backend=config.backend, name=f"{config.sandbox_prefix}-{run_tag}-{i}")
             for i in range(n)]

    def worker(index: int, slot: Slot) -> None:
        try:
            emit("slot", f"sandbox {index}: deploying {config.system}")
            slot.up()
            emit("slot", f"sandbox {index}: ready")
            policy = make_policy(config.policy, **policy_opts)   # one per worker: clients are not shared
            while not stop.is_set():
                try:
                    sc = work.get_nowait()
                except queue.Empty:
                    return
                rec = run_case(slot, sc, policy, out_dir=Path(config.out) / "episodes", config=config.episode,
                               progress=lambda s, sc=sc: emit("step", (index, f"{sc.id}: {s}")),
                               on_replace=lambda why, sc=sc: emit(
                                   "slot", f"sandbox {index}: {why[:120]}; replacing it and retrying {sc.id}"))
                with lock:
                    with jsonl.open("a") as f:
                        f.write(json.dumps(rec.to_dict(), default=str) + "\n")
                emit("episode", rec)
        except BaseException as e:
            errors.append(e)
            stop.set()
        finally:
            slot.down()

    threads = [threading.Thread(target=worker, args=(i, s), name=f"bench-slot-{i}", daemon=True)
               for i, s in enumerate(slots)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join(120)    # each worker stops its sandbox in its finally
        raise
    if errors:
        raise errors[0]
