"""One campaign: the cases to run, the records they leave, and what the records add up to.
The benchmark (`benchmark.py`), the fleet's collection (`cluster/experience.py`) and the
held-out evaluation (`train/evaluate.py`) are drivers over it that differ only in where
the episodes run: worker threads on this host's sandboxes (`run_local`) or the Ray fleet.

    cases, skipped = make_cases("boutique", "easy", seed=0, backends="nspawn,libvirt")
    store = RecordStore("runs/easy")              # episodes.jsonl; sharded=True: shards/part-*.jsonl
    store.claim("config.json", settings, keys=("system", "suite", "seed"))   # a rerun with others is refused
    todo, done = store.pending(cases)             # what an interrupted run has left to do
    run_local(todo, store, policy=lambda: make_policy("runbook"), out_dir=..., prefix="bench")
    records = store.records(cases)
    stats(records), per_group(records)            # outcomes, rate with its Wilson 95 % interval, ...

Planning. A case's fault goes to the first configured backend that provides it here (the
doctor's report; `"nspawn,libvirt"` sends what nspawn lacks, such as netem, to libvirt
guests); a case is skipped, with every backend's reason, only when none does, or when no
service of the system admits the fault. Targets and seeds are drawn with generators seeded
by the campaign's seed and the case's position, so the same seed gives the same cases
whatever runs them, and a rerun finds its finished cases by their record ids.
"""

from __future__ import annotations

import collections
import gzip
import ipaddress
import json
import math
import os
import queue
import random
import statistics
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from e2e_reme.simulators.episode import EpisodeConfig, Scenario, Slot, run_case
from e2e_reme.simulators.faults.base import canonical_name, fault_available, get_fault
from e2e_reme.simulators.policies.base import Policy
from e2e_reme.simulators.sandbox.base import get_backend
from e2e_reme.simulators.sandbox.state import DEFAULT_POOL, node_addresses
from e2e_reme.simulators.systems.deploy import targets_for
from e2e_reme.simulators.systems.spec import list_systems, load_system


def _quiet(kind: str, payload: Any) -> None:
    pass


# ---- suites ------------------------------------------------------------------------------------

def list_suites() -> list[str]:
    return sorted(p.name[:-4] for p in resources.files(__package__).joinpath("suites").iterdir()
                  if p.name.endswith(".txt"))


def load_suite(name_or_path: str) -> list[str]:
    """Fault names of a suite, in order: MicroRemed's (`suites/*.txt`, copied from its
    experiments/) or a file of names, one a line (aliases are resolved when planning)."""
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


# ---- planning ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """A scenario and the backend that runs it. `eval_set` names an evaluation's group (a
    held-out system or service): the record carries it, and it prefixes the record's id so
    that one scenario may stand in two sets."""

    scenario: Scenario
    backend: str
    eval_set: str = ""

    @property
    def id(self) -> str:
        sc = self.scenario
        return f"{self.eval_set.replace(':', '-')}-{sc.system}-{sc.id}" if self.eval_set else sc.id

    @property
    def index(self) -> int:
        """The case's position in its suite."""
        return self.scenario.index

    def fields(self) -> dict:
        """What the record carries besides the episode runner's fields."""
        return {"eval_set": self.eval_set} if self.eval_set else {}


@dataclass(frozen=True)
class Skipped:
    """A case that was not planned, and why: never run, never counted as a success."""

    fault: str
    reason: str
    index: int | None = None           # its position in its suite, where it has one
    eval_set: str = ""

    def to_dict(self) -> dict:
        d = {"set": self.eval_set, "index": self.index, "fault": self.fault, "reason": self.reason}
        return {k: v for k, v in d.items() if v is not None and v != ""}


def parse_backends(backends: str | Sequence[str]) -> tuple[str, ...]:
    """Backends in order of preference, from `"nspawn,libvirt"` or a sequence of names."""
    names = backends.split(",") if isinstance(backends, str) else backends
    out = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not out:
        raise ValueError("name a sandbox backend: nspawn or libvirt")
    for n in out:
        get_backend(n)     # an unknown name is an error that lists the known ones
    return out


class Planner:
    """What can run where, asked before any sandbox exists: whether a backend of this host
    provides a fault (the doctor's `report`, by default this host's) and which services of
    a system a fault applies to."""

    def __init__(self, backends: str | Sequence[str] = "nspawn", report=None):
        self.backends = parse_backends(backends)
        self.report = report
        self._targets: dict[str, dict] = {}

    def backend_for(self, fault: str) -> tuple[str | None, str]:
        """The first backend that provides `fault`, or None and every backend's reason."""
        whys = []
        for b in self.backends:
            ok, why = fault_available(fault, b, self.report)
            if ok:
                return b, why
            whys.append(why)
        return None, "; ".join(whys)

    def admits(self, system: str, service: str, fault: str) -> tuple[bool, str]:
        targets = self._targets_of(system)
        return get_fault(fault).applies_to(targets[service], targets)

    def services(self, system: str, fault: str) -> list[str]:
        """The services of `system` that `fault` applies to, sorted."""
        return sorted(s for s in self._targets_of(system) if self.admits(system, s, fault)[0])

    def _targets_of(self, system: str) -> dict:
        if system not in self._targets:
            spec = load_system(system)
            # targets_for wants every node's address; what a fault applies to depends on a
            # service's kind and dependencies, never on addresses, and no sandbox exists yet:
            # the nodes get those they would have in the address pool's first subnet.
            net = next(ipaddress.ip_network(DEFAULT_POOL).subnets(new_prefix=24))
            self._targets[system] = targets_for(spec, node_addresses(net, spec.nodes))
        return self._targets[system]


Backends = str | Sequence[str] | Planner      # "nspawn,libvirt", ("nspawn",), or a Planner with its report


def _planner(backends: Backends) -> Planner:
    return backends if isinstance(backends, Planner) else Planner(backends)


def make_cases(system: str, suite: str, seed: int, backends: Backends = "nspawn",
               limit: int | None = None) -> tuple[list[Case], list[Skipped]]:
    """A suite's cases on `system` (its first `limit` entries): case i's target is drawn among
    the services its fault applies to with a generator seeded by (seed, i)."""
    planner = _planner(backends)
    names = load_suite(suite)
    cases, skipped = [], []
    for i, raw in enumerate(names[:limit] if limit else names):
        fault = canonical_name(raw)
        backend, why = planner.backend_for(fault)
        eligible = planner.services(system, fault) if backend else []
        if not eligible:
            skipped.append(Skipped(fault, why if backend is None else f"no service of {system} admits {fault}", i))
            continue
        rng = random.Random(f"{seed}:{i}")
        cases.append(Case(Scenario(system=system, fault=fault, target=rng.choice(eligible),
                                   seed=rng.randrange(2 ** 31), index=i), backend))
    return cases, skipped


def sample_cases(systems: Sequence[str], faults: Sequence[str], episodes: int, seed: int,
                 backends: Backends = "nspawn") -> tuple[list[Case], list[Skipped]]:
    """`episodes` cases: case i is on systems[i % n] (or the first system some fault runs
    on), its fault and target drawn with a generator seeded by (seed, i) among the faults a
    backend provides and the services each applies to."""
    if episodes < 0:
        raise ValueError(f"episodes must be >= 0, not {episodes}")
    if not systems:
        raise ValueError("name at least one system (remed system ls)")
    planner = _planner(backends)
    routed, skipped = _route(planner, faults)
    eligible = {s: {f: t for f in routed if (t := planner.services(s, f))} for s in systems}
    if not any(eligible.values()):
        whys = "; ".join(f"{s.fault}: {s.reason}" for s in skipped)
        raise ValueError(f"no fault of {', '.join(faults)} can run on {', '.join(systems)} with the "
                         f"{'/'.join(planner.backends)} backend here" + (f" ({whys})" if whys else ""))
    cases = []
    for i in range(episodes):
        system = systems[i % len(systems)]
        if not eligible[system]:
            system = next(s for s in systems if eligible[s])
        rng = random.Random(f"{seed}:{i}")
        fault = rng.choice(sorted(eligible[system]))
        target = rng.choice(eligible[system][fault])
        cases.append(Case(Scenario(system=system, fault=fault, target=target, seed=rng.randrange(2 ** 31),
                                   index=i), routed[fault]))
    return cases, skipped


def _route(planner: Planner, faults: Iterable[str]) -> tuple[dict[str, str], list[Skipped]]:
    """{fault: backend} for the faults some backend provides; the others, skipped."""
    routed, skipped = {}, []
    for raw in dict.fromkeys(faults):
        name = canonical_name(raw)
        backend, why = planner.backend_for(name)
        if backend:
            routed[name] = backend
        else:
            skipped.append(Skipped(name, why))
    return routed, skipped


def service_cases(service: str, suite: str, seeds: Sequence[int], backends: Backends = "nspawn",
                  eval_set: str = "") -> tuple[list[Case], list[Skipped]]:
    """Every fault type of a suite on one service (of whichever system of ours has it), a
    case per seed, each drawn from (seed, service, fault)."""
    planner = _planner(backends)
    system = next((s for s in list_systems() if service in load_system(s).services), None)
    if system is None:
        return [], [Skipped("*", f"no system of ours has a service '{service}'", eval_set=eval_set)]
    cases, skipped = [], []
    for i, fault in enumerate(dict.fromkeys(canonical_name(f) for f in load_suite(suite))):
        backend, why = planner.backend_for(fault)
        ok, why = planner.admits(system, service, fault) if backend else (False, why)
        if not ok:
            skipped.append(Skipped(fault, why, eval_set=eval_set))
            continue
        for seed in seeds:
            rng = random.Random(f"{seed}:{service}:{fault}")
            cases.append(Case(Scenario(system=system, fault=fault, target=service, seed=rng.randrange(2 ** 31),
                                       index=i), backend, eval_set))
    return cases, skipped


# ---- records -----------------------------------------------------------------------------------

class RecordStore:
    """Episode records, one JSON object a line, under a run's directory: `episodes.jsonl`
    (a benchmark, an evaluation; `path` may also name any such file, gzipped too, to read), or, `sharded`,
    `shards/part-<run>-<k>.jsonl` (a fleet collection: each run appends only to shards of
    its own, a new one every `shard_size` records, so Ray Data can read them as they are).

    Each record is flushed and synced before `append` returns, so a kill loses at most the
    line it was writing; a cut line is not a record, and its episode runs again."""

    def __init__(self, path: str | Path, *, sharded: bool = False, shard_size: int = 500, run: str | None = None):
        path = Path(path)
        self.sharded = sharded
        packed = path / "episodes.jsonl.gz"       # records kept in the repository (read only)
        self.file = (path if path.is_file() else
                     packed if packed.is_file() and not (path / "episodes.jsonl").exists() else path / "episodes.jsonl")
        self.dir = path if sharded else self.file.parent
        self.shard_size = max(1, int(shard_size))
        self.run = run or time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        self._lock = threading.Lock()
        self._f, self._n, self._k = None, 0, 0

    @classmethod
    def find(cls, path: str | Path) -> list["RecordStore"]:
        """The stores at `path`: a JSONL file, a run's directory, or a directory of runs."""
        p = Path(path)
        if p.is_file():
            return [cls(p)]
        if not p.is_dir() or cls._at(p):
            return cls._at(p)
        return [s for sub in sorted(q for q in p.iterdir() if q.is_dir()) for s in cls._at(sub)]

    @classmethod
    def _at(cls, d: Path) -> list["RecordStore"]:
        if (d / "episodes.jsonl").is_file() or (d / "episodes.jsonl.gz").is_file():
            return [cls(d)]
        return [cls(d, sharded=True)] if (d / "shards").is_dir() else []

    # -- reading

    def files(self) -> list[Path]:
        if self.sharded:
            return sorted((self.dir / "shards").glob("part-*.jsonl"))
        return [self.file] if self.file.is_file() else []

    def __iter__(self) -> Iterator[dict]:
        for path in self.files():
            # A gzipped file is read as it is (traces kept in the repository: releases/traces/).
            with (gzip.open(path, "rt") if path.suffix == ".gz" else path.open()) as f:
                for line in f:
                    rec = _parse(line)
                    if rec is not None:
                        yield rec

    def done(self) -> dict[str, dict]:
        """{id: record}; the first record of an id wins (a later one would be a duplicate)."""
        got: dict[str, dict] = {}
        for rec in self:
            got.setdefault(rec["id"], rec)
        return got

    def pending(self, cases: Sequence) -> tuple[list, list[dict]]:
        """The cases without a record, and the records of the others, in plan order."""
        done = self.done()
        return [c for c in cases if c.id not in done], [done[c.id] for c in cases if c.id in done]

    def records(self, cases: Sequence) -> list[dict]:
        """The records of `cases`, in plan order (records of other plans are left out)."""
        return self.pending(cases)[1]

    # -- writing

    def claim(self, name: str, settings: Mapping[str, Any], keys: Iterable[str] = (), what: str = "run") -> None:
        """Take the directory for a campaign with these settings, saved as `name`; refuse
        one whose saved settings differ in any of the (dotted) `keys`, those that decide
        the cases and how they are judged, so that records of two campaigns never mix."""
        saved = self.dir / name
        if saved.exists():
            old, new = json.loads(saved.read_text()), json.loads(json.dumps(settings, default=str))
            diff = [k.rsplit(".", 1)[-1] for k in keys if _dig(old, k) != _dig(new, k)]
            if diff:
                raise ValueError(f"{self.dir} holds a {what} with another {', '.join(diff)}; resume it with the "
                                 f"same settings or choose another --out")
        self.write_json(name, settings)

    def write_json(self, name: str, obj: Any) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / name
        path.write_text(json.dumps(obj, indent=2, default=str))
        return path

    def append(self, record: Mapping[str, Any]) -> None:
        with self._lock:
            if self._f is None or (self.sharded and self._n >= self.shard_size):
                self._open()
            self._f.write(json.dumps(record, default=str) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
            self._n += 1

    def _open(self) -> None:
        self.close()
        if self.sharded:
            path = self.dir / "shards" / f"part-{self.run}-{self._k:04d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._k += 1
            self._f = path.open("x")      # never an existing shard
        else:
            if self.file.suffix == ".gz":
                raise ValueError(f"{self.file}: packed records are read only; write a run to another directory")
            self.file.parent.mkdir(parents=True, exist_ok=True)
            cut = self.file.exists() and self.file.stat().st_size and not self.file.read_bytes().endswith(b"\n")
            self._f = self.file.open("a")
            if cut:
                self._f.write("\n")       # ends a line a kill cut, so the next record is a line of its own
        self._n = 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "RecordStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse(line: str) -> dict | None:
    """A record, or None for a line cut by a kill or anything that is not a record."""
    if not line.endswith("\n"):
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and "id" in rec else None


def _dig(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


# ---- running on this host ----------------------------------------------------------------------

def run_local(cases: Sequence[Case], store: RecordStore, *, policy: Callable[[], Policy], out_dir: Path,
              prefix: str, parallel: int = 1, episode: EpisodeConfig = EpisodeConfig(),
              emit: Callable[[str, Any], None] = _quiet, stop: threading.Event | None = None) -> None:
    """Run `cases` on this host's sandboxes: for each (system, backend) in turn, `parallel`
    worker threads, each with a slot (a sandbox with the system deployed, named
    <prefix>-<run>-<k>) and a policy of its own; each record is appended to `store` as its
    episode ends. Events: ("slot", text), ("step", (worker, text)), ("episode", EpisodeRecord)."""
    stop = stop or threading.Event()
    groups: dict[tuple[str, str], list[Case]] = {}
    for c in cases:
        groups.setdefault((c.scenario.system, c.backend), []).append(c)
    tag, k = f"{int(time.time()) % 100000:05d}", 0
    for (system, backend), group in groups.items():
        if stop.is_set():
            break
        n = max(1, min(parallel, len(group)))
        slots = [Slot(system, backend=backend, name=f"{prefix}-{tag}-{k + i}", purpose=f"{prefix} campaign worker {k + i}")
                 for i in range(n)]
        _Workers(group, store, policy, out_dir, episode, emit, stop).run(slots, first=k)
        k += n


class _Workers:
    """Threads that take cases from one queue, each on a slot of its own."""

    def __init__(self, cases, store, policy, out_dir, episode, emit, stop):
        self.work: queue.Queue[Case] = queue.Queue()
        for c in cases:
            self.work.put(c)
        self.store, self.policy, self.out_dir, self.episode = store, policy, Path(out_dir), episode
        self.emit, self.stop = emit, stop
        self.errors: list[BaseException] = []

    def run(self, slots: list[Slot], first: int = 0) -> None:
        threads = [threading.Thread(target=self._work, args=(first + i, s), name=f"campaign-slot-{first + i}",
                                    daemon=True) for i, s in enumerate(slots)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        except KeyboardInterrupt:
            self.stop.set()
            for t in threads:
                t.join(120)    # each worker stops its sandbox in its finally
            raise
        if self.errors:
            raise self.errors[0]

    def _work(self, index: int, slot: Slot) -> None:
        try:
            # The policy first (one per worker: clients are not shared), so that a model shared by
            # the workers (train.rollout.GatheredChatModel) knows them all before any of them asks.
            policy = self.policy()
            self.emit("slot", f"sandbox {index}: deploying {slot.system}")
            slot.up()
            self.emit("slot", f"sandbox {index}: ready")
            while not self.stop.is_set():
                try:
                    case = self.work.get_nowait()
                except queue.Empty:
                    return
                self._one(index, slot, policy, case)
        except BaseException as e:
            self.errors.append(e)
            self.stop.set()
        finally:
            slot.down()

    def _one(self, index: int, slot: Slot, policy: Policy, case: Case) -> None:
        sc = case.scenario
        rec = run_case(slot, sc, policy, out_dir=self.out_dir, config=self.episode, episode_id=case.id,
                       progress=lambda s: self.emit("step", (index, f"{sc.id}: {s}")),
                       on_replace=lambda why: self.emit(
                           "slot", f"sandbox {index}: {why[:120]}; replacing it and retrying {sc.id}"))
        self.store.append({**rec.to_dict(), **case.fields()})
        self.emit("episode", rec)


# ---- what the records add up to ------------------------------------------------------------------

def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval: honest at small n and at 0 % or 100 %."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (round(max(0.0, c - h), 4), round(min(1.0, c + h), 4))


def fault_of(rec: Mapping[str, Any]) -> str:
    return rec["scenario"]["fault"]


def failure_stage(rec: Mapping[str, Any]) -> str | None:
    """Where a failed episode stopped (the policy's failures only)."""
    return rec.get("stage") if rec["outcome"] == "failure" else None


def stats(records: Sequence[Mapping[str, Any]], stage_of: Callable[[Mapping], str | None] = failure_stage) -> dict:
    """What a group of records adds up to. The success rate and its interval are over the
    cases a policy was judged on: an infrastructure failure is nobody's policy's, while a
    failed injection counts against the rate."""
    n = len(records)
    count = collections.Counter(r["outcome"] for r in records)
    succ, infra = count["success"], count["infra_failure"]
    trials = sum(len(r.get("trials") or []) for r in records if r["outcome"] == "success")
    stages = collections.Counter(s for s in map(stage_of, records) if s)
    return {"cases": n, "successes": succ, "failures": count["failure"],
            "injection_failures": count["injection_failure"], "infra_failures": infra,
            "success_rate": round(succ / (n - infra), 4) if n - infra else 0.0, "ci95": wilson(succ, n - infra),
            "attempts_per_success": round(trials / succ, 3) if succ else None,
            **_times(records), **_tokens(records), "failure_stages": dict(sorted(stages.items()))}


def _times(records: Sequence[Mapping]) -> dict:
    t = [(r.get("timings") or {}).get("total", 0.0) for r in records if r["outcome"] != "infra_failure"]
    return {"mean_time_s": round(statistics.mean(t), 2) if t else None,
            "median_time_s": round(statistics.median(t), 2) if t else None}


def _tokens(records: Sequence[Mapping]) -> dict:
    toks = [r.get("tokens") or {} for r in records]
    prompt = [t["prompt"] for t in toks if t.get("prompt") is not None]
    comp = [t["completion"] for t in toks if t.get("completion") is not None]
    known = [t["prompt"] + t["completion"] for t in toks if t.get("prompt") is not None
             and t.get("completion") is not None]
    return {"tokens_total": sum(known) if known else (0 if not toks else None), "tokens_per_case": _mean(known),
            "prompt_tokens_per_case": _mean(prompt), "completion_tokens_per_case": _mean(comp)}


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 1) if xs else None


def per_group(records: Sequence[Mapping], key: Callable[[Mapping], Any] = fault_of, also: Iterable = (),
              stage_of: Callable[[Mapping], str | None] = failure_stage) -> dict[Any, dict]:
    """stats() for each value of key(record), in order of first appearance; then for each
    of `also` that no record has (all zero)."""
    order = dict.fromkeys([*map(key, records), *also])
    return {k: stats([r for r in records if key(r) == k], stage_of) for k in order}


def write_chart(groups: Mapping[str, Mapping[str, dict]], title: str, path: Path,
                ylabel: str = "success rate (95 % CI)") -> Path | None:
    """Success rate per fault type with its 95 % interval as a PNG: a bar per fault of each
    group ({group: {fault: stats}}; a legend where groups are named). None where nothing
    ran or matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    faults = list(dict.fromkeys(f for g in groups.values() for f, s in g.items() if s["cases"]))
    if not faults:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(faults) + 2), 3.8))
    width = 0.8 / len(groups)
    for k, (name, g) in enumerate(groups.items()):
        bars = [(i, g[f]) for i, f in enumerate(faults) if f in g and g[f]["cases"]]
        xs = [i - 0.4 + (k + 0.5) * width for i, _ in bars]
        rates = [s["success_rate"] for _, s in bars]
        below = [s["success_rate"] - s["ci95"][0] for _, s in bars]
        above = [s["ci95"][1] - s["success_rate"] for _, s in bars]
        ax.bar(xs, rates, width, yerr=[below, above], capsize=3, label=name or None)
    ax.set_xticks(range(len(faults)), faults, rotation=25)
    ax.set_ylim(0, 1.05)
    ax.set(ylabel=ylabel, title=title)
    if any(groups):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def publish(store: RecordStore, results: dict, groups: Mapping[str, Mapping[str, dict]], title: str,
            **chart: Any) -> dict:
    """results.json and success.png beside the records; the results with the chart's path."""
    store.write_json("results.json", results)
    path = write_chart(groups, title, store.dir / "success.png", **chart)
    return {**results, "chart": str(path) if path else None}
