"""Experience collection: many verified episodes, written as append-only JSONL shards.

    summary = collect(CollectConfig(policy="runbook", episodes=200, systems=("simple-micro", "boutique"),
                                    out="runs/exp"))
    records = read_records("runs/exp")           # {id: record}, what the trainer reads
    ds = ray.data.read_json("runs/exp/shards")   # or as a Ray Dataset

The plan of a collection is a pure function of its config: episode i's system is
`systems[i % len(systems)]`, its fault and target are drawn with a generator seeded by
(seed, i) among the faults this backend can provide and the services each applies to. So a
rerun of the same command plans the same episodes and runs only those not yet in a shard:
it continues where an interrupted run stopped.

Layout of `out/`:
    collect.json               the config (saved whole; a rerun with other settings is refused)
    shards/part-<run>-<k>.jsonl  one episode record per line; a shard is only ever appended
                               to by the run that created it, and a run opens new ones
    summary.json               counts per fault and outcome, after each run

Records are the episode runner's records (`simulators.episode.EpisodeRecord`, its `schema`
field versions them) plus `host`, where the episode ran.
"""

from __future__ import annotations

import collections
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from e2e_reme.config import check_keys
from e2e_reme.simulators.episode import SCHEMA_VERSION, Scenario

from .fleet import Fleet, FleetConfig
from .host import HostConfig, Job

MICROREMED_FAULTS = ("cpu-stress", "memory-stress", "disk-io", "network-delay", "network-loss", "pod-fail",
                     "config-error")


@dataclass(frozen=True)
class CollectConfig:
    policy: str = "runbook"
    policy_options: dict = field(default_factory=dict)
    episodes: int = 100
    systems: tuple[str, ...] = ("simple-micro",)
    faults: tuple[str, ...] = MICROREMED_FAULTS     # those unavailable on the backend are left out, with why
    seed: int = 0
    out: str = "runs/experience"
    shard_size: int = 500
    fleet: FleetConfig = FleetConfig()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["policy_options"] = {k: ("***" if "key" in k and "env" not in k else v)
                               for k, v in self.policy_options.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CollectConfig":
        """From YAML/JSON: nested fleet, host and episode sections become their dataclasses;
        an unknown key is an error that lists the known ones."""
        from e2e_reme.simulators.episode import EpisodeConfig
        d = dict(d)
        check_keys("collect config", d, cls)
        fleet = dict(d.get("fleet") or {})
        check_keys("fleet config", fleet, FleetConfig)
        host = dict(fleet.get("host") or {})
        check_keys("fleet.host config", host, HostConfig)
        episode = dict(host.get("episode") or {})
        check_keys("fleet.host.episode config", episode, EpisodeConfig)
        if "systems" in host:
            host["systems"] = tuple(host["systems"])
        host["episode"] = EpisodeConfig(**episode)
        fleet["host"] = HostConfig(**host)
        d["fleet"] = FleetConfig(**fleet)
        for k in ("systems", "faults"):
            if k in d:
                d[k] = tuple([d[k]] if isinstance(d[k], str) else d[k])
        return cls(**d)


# ---- the plan ----------------------------------------------------------------------------------

def plan(config: CollectConfig) -> tuple[list[Scenario], dict[str, str]]:
    """The collection's scenarios, and the faults left out (name -> why)."""
    from e2e_reme.simulators.faults.base import canonical_name, fault_available, get_fault
    from e2e_reme.simulators.systems.deploy import targets_for
    from e2e_reme.simulators.systems.spec import load_system
    if config.episodes < 0:
        raise ValueError(f"episodes must be >= 0, not {config.episodes}")
    if not config.systems:
        raise ValueError("name at least one system (remed system ls)")
    backend = config.fleet.host.backend
    skipped: dict[str, str] = {}
    faults = []
    for raw in dict.fromkeys(config.faults):
        name = canonical_name(raw)
        get_fault(name)            # an unknown name lists the catalog
        ok, why = fault_available(name, backend)
        if ok:
            faults.append(name)
        else:
            skipped[name] = why
    eligible: dict[str, dict[str, list[str]]] = {}
    for system in config.systems:
        spec = load_system(system)
        targets = targets_for(spec, [f"198.18.255.{i + 2}" for i in range(spec.nodes)])
        eligible[system] = {}
        for f in faults:
            cls = get_fault(f)
            names = sorted(n for n, t in targets.items() if cls.applies_to(t, targets)[0])
            if names:
                eligible[system][f] = names
    if not any(eligible.values()):
        raise ValueError(f"no fault of {', '.join(config.faults)} can run on {', '.join(config.systems)} with the "
                         f"{backend} backend here" + (f" ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})"
                                                      if skipped else ""))
    out = []
    for i in range(config.episodes):
        system = config.systems[i % len(config.systems)]
        if not eligible[system]:
            system = next(s for s in config.systems if eligible[s])
        rng = random.Random(f"{config.seed}:{i}")
        fault = rng.choice(sorted(eligible[system]))
        target = rng.choice(eligible[system][fault])
        out.append(Scenario(system=system, fault=fault, target=target, seed=rng.randrange(2 ** 31), index=i))
    return out, skipped


# ---- shards ----------------------------------------------------------------------------------

def shard_paths(out: str | Path) -> list[Path]:
    return sorted((Path(out) / "shards").glob("part-*.jsonl"))


def iter_records(out: str | Path) -> Iterator[dict]:
    """Every complete record of every shard (a line cut by a kill is skipped: its episode
    is run again by the next run)."""
    for p in shard_paths(out):
        with p.open() as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                try:
                    yield json.loads(line)
                except ValueError:
                    continue


def read_records(out: str | Path) -> dict[str, dict]:
    """{id: record}; the first record of an id wins (a later one would be a duplicate)."""
    got: dict[str, dict] = {}
    for rec in iter_records(out):
        got.setdefault(rec["id"], rec)
    return got


class ShardWriter:
    """Appends records to `out/shards/part-<run>-<k>.jsonl`, a new file every `size` lines;
    each line is flushed and synced before the next, so a killed run loses at most the one
    line it was writing."""

    def __init__(self, out: str | Path, size: int = 500, run: str | None = None):
        self.dir = Path(out) / "shards"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.size = max(1, int(size))
        self.run = run or time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        self.k, self.n, self.f = 0, 0, None
        self.paths: list[Path] = []

    def write(self, rec: dict) -> None:
        if self.f is None or self.n >= self.size:
            self.close()
            path = self.dir / f"part-{self.run}-{self.k:04d}.jsonl"
            self.k += 1
            self.n = 0
            self.f = path.open("x")     # never an existing shard
            self.paths.append(path)
        self.f.write(json.dumps(rec, default=str) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.n += 1

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- collecting ------------------------------------------------------------------------------

def summarize(records: Iterable[dict]) -> dict:
    per_fault: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total: collections.Counter = collections.Counter()
    stages: collections.Counter = collections.Counter()
    for r in records:
        f = r["scenario"]["fault"]
        per_fault[f]["episodes"] += 1
        per_fault[f][r["outcome"]] += 1
        total["episodes"] += 1
        total[r["outcome"]] += 1
        if r["outcome"] != "success":
            stages[f"{r['outcome']}@{r['stage']}"] += 1
    keys = ("episodes", "success", "failure", "injection_failure", "infra_failure")
    return {"schema": SCHEMA_VERSION, **{k: total.get(k, 0) for k in keys},
            "per_fault": {f: {k: c.get(k, 0) for k in keys} for f, c in sorted(per_fault.items())},
            "failure_stages": dict(stages)}


def _check_resume(out: Path, config: CollectConfig) -> None:
    saved = out / "collect.json"
    if not saved.exists():
        return
    old = json.loads(saved.read_text())
    new = json.loads(json.dumps(config.to_dict(), default=str))
    # What decides the plan and how episodes are judged must match; sizes and addresses need not.
    keys = ("policy", "systems", "faults", "seed")
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if old.get("fleet", {}).get("host", {}).get("episode") != new["fleet"]["host"]["episode"]:
        diff.append("episode settings")
    if old.get("fleet", {}).get("host", {}).get("backend") != new["fleet"]["host"]["backend"]:
        diff.append("backend")
    if diff:
        raise ValueError(f"{out} holds a collection with another {', '.join(diff)}; continue it with the same "
                         f"settings or choose another --out")


def collect(config: CollectConfig, *, fleet: Fleet | None = None,
            on_event: Callable[[str, Any], None] | None = None) -> dict:
    """Run (or continue) the collection; return its summary (also in out/summary.json).
    `on_event(kind, payload)` sees ("plan", (todo, done, skipped)), ("fleet", text), the
    fleet's own events, ("started", the Fleet) and ("episode", record). A fleet passed in is
    used and left running."""
    from e2e_reme.simulators.policies import make_policy
    emit = on_event or (lambda kind, payload: None)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, config)
    scenarios, skipped = plan(config)
    done = read_records(out)
    todo = [s for s in scenarios if s.id not in done]
    emit("plan", (todo, [done[s.id] for s in scenarios if s.id in done], skipped))
    (out / "collect.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    if todo:
        make_policy(config.policy, **config.policy_options)   # a bad policy fails before any sandbox
        own = fleet is None
        fleet = fleet or Fleet(config.fleet).start(progress=lambda s: emit("fleet", s))
        emit("started", fleet)
        try:
            jobs = (Job(id=s.id, scenario=s, policy=config.policy, policy_options=dict(config.policy_options))
                    for s in todo)
            with ShardWriter(out, config.shard_size) as w:
                for rec in fleet.run(jobs, on_event=emit):
                    w.write(rec)
                    emit("episode", rec)
        finally:
            if own:
                fleet.shutdown()
    records = read_records(out)
    summary = summarize(records[s.id] for s in scenarios if s.id in records)
    summary.update(planned=len(scenarios), complete=all(s.id in records for s in scenarios),
                   skipped_faults=skipped, shards=[p.name for p in shard_paths(out)])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
