"""Experience collection: many verified episodes, written as append-only JSONL shards.

    summary = collect(CollectConfig(policy="runbook", episodes=200, systems=("simple-micro", "boutique"),
                                    out="runs/exp"))
    records = RecordStore("runs/exp", sharded=True).done()   # {id: record}; the trainer reads it too
    ds = ray.data.read_json("runs/exp/shards")                # or as a Ray Dataset

A driver over the campaign (`simulators/campaign.py`: planning, the records store, the
statistics) whose episodes run on the Ray fleet. The plan of a collection is a pure
function of its config (`campaign.sample_cases`): episode i's system is
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

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from e2e_reme.config import build
from e2e_reme.simulators.campaign import Case, RecordStore, per_group, sample_cases, stats
from e2e_reme.simulators.episode import SCHEMA_VERSION

from .fleet import Fleet, FleetConfig
from .sandbox_host import Job

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
        every unknown key is reported in one error that lists the known ones."""
        return build(cls, d, "collect config")


# ---- the plan ----------------------------------------------------------------------------------

def plan(config: CollectConfig) -> tuple[list[Case], dict[str, str]]:
    """The collection's cases, and the faults left out (name -> why). Every case runs on
    the fleet's one backend: a host keeps sandboxes of a single backend."""
    cases, skipped = sample_cases(config.systems, config.faults, config.episodes, config.seed,
                                  (config.fleet.host.backend,))
    return cases, {s.fault: s.reason for s in skipped}


# ---- collecting ------------------------------------------------------------------------------

# What decides the plan and how episodes are judged must match on a rerun; sizes and addresses need not.
RESUME_KEYS = ("policy", "systems", "faults", "seed", "fleet.host.episode", "fleet.host.backend")


def collect(config: CollectConfig, *, fleet: Fleet | None = None,
            on_event: Callable[[str, Any], None] | None = None) -> dict:
    """Run (or continue) the collection; return its summary (also in out/summary.json).
    `on_event(kind, payload)` sees ("plan", (todo, done, skipped)), ("fleet", text), the
    fleet's own events, ("started", the Fleet) and ("episode", record). A fleet passed in is
    used and left running."""
    from e2e_reme.simulators.policies import make_policy
    emit = on_event or (lambda kind, payload: None)
    cases, skipped = plan(config)
    store = RecordStore(config.out, sharded=True, shard_size=config.shard_size)
    store.claim("collect.json", config.to_dict(), RESUME_KEYS, what="collection")
    todo, done = store.pending(cases)
    emit("plan", (todo, done, skipped))
    if todo:
        make_policy(config.policy, **config.policy_options)   # a bad policy fails before any sandbox
        run_on_fleet(todo, store, config, fleet, emit)
    return _summarize(cases, skipped, store)


def run_on_fleet(cases: list[Case], store: RecordStore, config: CollectConfig, fleet: Fleet | None, emit) -> None:
    """Every case as a job of the fleet (started here, and shut down, unless one is given);
    each record is appended to `store` as it arrives."""
    own = fleet is None
    fleet = fleet or Fleet(config.fleet).start(progress=lambda s: emit("fleet", s))
    emit("started", fleet)
    jobs = (Job(id=c.id, scenario=c.scenario, policy=config.policy, policy_options=dict(config.policy_options))
            for c in cases)
    try:
        with store:
            for rec in fleet.run(jobs, on_event=emit):
                store.append(rec)
                emit("episode", rec)
    finally:
        if own:
            fleet.shutdown()


def _summarize(cases: list[Case], skipped: dict[str, str], store: RecordStore) -> dict:
    """Counts per outcome, overall and per fault, and where episodes that did not succeed
    stopped (`outcome@stage`); written to out/summary.json."""
    records = store.records(cases)
    overall = stats(records, stage_of=lambda r: None if r["outcome"] == "success" else f"{r['outcome']}@{r['stage']}")
    summary = {"schema": SCHEMA_VERSION, **_counts(overall),
               "per_fault": {f: _counts(s) for f, s in sorted(per_group(records).items())},
               "failure_stages": overall["failure_stages"], "planned": len(cases),
               "complete": len(records) == len(cases), "skipped_faults": skipped,
               "shards": [p.name for p in store.files()]}
    store.write_json("summary.json", summary)
    return summary


def _counts(s: dict) -> dict:
    """The campaign's statistics as the fleet's summary names them: after the outcomes."""
    return {"episodes": s["cases"], "success": s["successes"], "failure": s["failures"],
            "injection_failure": s["injection_failures"], "infra_failure": s["infra_failures"]}
