"""Train, validation and test: one definition (configs/splits.yaml), decided by system and
service, never by episode.

    splits = load_splits()                       # configs/splits.yaml (or $E2E_REME_SPLITS, or a path)
    splits.split_of("boutique", "paymentservice")          # "validation"
    splits.trains("cpu-stress")                            # a trained fault type
    cases, skipped = splits.cases("test", backends="nspawn")   # the evaluation cases of a split

A case belongs to the split of its system and faulty service: a system named whole in
validation or test puts all its services there; a service named there puts that service
there; everything else is train. Every source of training cases asks this module: the trace
collection (`remed train collect` draws its targets among the train split's services:
`TrainPlanner`), the SFT data and RL's case drawing (train/data.py `select_traces`: only
train-split traces of trained fault types; renamed copies never draw a validation or test
name, nor a word one is made of), and evaluation (`remed train eval --split validation|test`:
`Splits.cases`). tests/test_splits.py checks that nothing trained touches a validation or
test system or service, and the sizes the release issue asks of the test split.

The evaluation plan of a split is host-independent: for each trained fault type, the split's
`cases_per_fault` cases, each on the split's service that the fault applies to and that has
had the fewest cases so far (ties broken by a generator seeded by the split's seed, the plan
seed and the fault), so the cases spread over every service. Only then is each case given
the backend that provides its fault on this host; a fault no backend here provides is
skipped with the reason (network-delay without netem), as the benchmark skips it.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from e2e_reme.config import build, read_yaml

from .errors import TrainError

SPLITS = ("train", "validation", "test")
HELD_OUT = ("validation", "test")
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "configs" / "splits.yaml"
ENV = "E2E_REME_SPLITS"


@dataclass(frozen=True)
class SplitSet:
    """One held-out split: whole systems, services of other systems, and its evaluation plan's size."""
    systems: tuple[str, ...] = ()
    services: dict = field(default_factory=dict)      # {system: [service, ...]}
    cases_per_fault: int = 2
    seed: int = 0

    def service_names(self) -> set[str]:
        return {s for names in self.services.values() for s in names}


@dataclass(frozen=True)
class Member:
    """A service of a split, and the evaluation set its cases are reported under."""
    system: str
    service: str
    eval_set: str


@dataclass(frozen=True)
class Splits:
    trained_faults: tuple[str, ...] = ()
    excluded_faults: dict = field(default_factory=dict)   # {fault: why it is not trained}
    validation: SplitSet = SplitSet()
    test: SplitSet = SplitSet()
    source: str = ""                    # the file it was read from (set by the loader)
    sha256: str = ""                    # of that file's bytes

    def definition_sha256(self) -> str:
        """The hash of what the file defines (not of its comments): an evaluation resumes, and a
        release's manifest stays valid, only under the same definition."""
        import json
        d = {"trained_faults": list(self.trained_faults), "excluded_faults": dict(self.excluded_faults),
             **{n: {"systems": list(s.systems), "services": {k: list(v) for k, v in s.services.items()},
                    "cases_per_fault": s.cases_per_fault, "seed": s.seed}
                for n, s in (("validation", self.validation), ("test", self.test))}}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    # ---- membership ------------------------------------------------------------------------

    def split_set(self, name: str) -> SplitSet:
        if name not in HELD_OUT:
            raise TrainError(f"split '{name}': evaluation runs on one of {', '.join(HELD_OUT)}")
        return getattr(self, name)

    def split_of(self, system: str | None, service: str | None) -> str:
        """"train", "validation" or "test" for a case on `service` of `system`. A held-out
        service name counts whatever system a record says it is on."""
        for name in ("test", "validation"):
            s = getattr(self, name)
            if system in s.systems or (service is not None and service in s.service_names()):
                return name
        return "train"

    def system_split(self, system: str) -> str:
        """The split a whole system is in ("train" where only some of its services are held out)."""
        return next((n for n in ("test", "validation") if system in getattr(self, n).systems), "train")

    def held_out_systems(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.test.systems, *self.validation.systems)))

    def held_out_services(self) -> tuple[str, ...]:
        """Every service of validation and test, those of whole systems included."""
        out = [m.service for n in HELD_OUT for m in self.members(n)]
        return tuple(dict.fromkeys(out))

    def trains(self, fault: str | None) -> bool:
        """Whether traces of `fault` are trained on (a compound: when all its parts are)."""
        from e2e_reme.simulators.faults.base import COMPOUND_PREFIX, canonical_name
        if not fault:
            return False
        if fault.startswith(COMPOUND_PREFIX):
            return all(self.trains(p) for p in fault[len(COMPOUND_PREFIX):].split("+"))
        return canonical_name(fault) in self.trained_faults

    def members(self, name: str) -> list[Member]:
        """The services of a held-out split, whole systems first, in the file's order."""
        from e2e_reme.simulators.systems.spec import load_system
        s = self.split_set(name)
        out = [Member(sys, svc, f"system:{sys}") for sys in s.systems for svc in load_system(sys).services]
        out += [Member(sys, svc, f"service:{svc}") for sys, names in s.services.items() for svc in names]
        return out

    # ---- the evaluation plan ---------------------------------------------------------------

    def plan(self, name: str, seed: int = 0, faults: Sequence[str] = (), planner=None) -> list:
        """The split's evaluation cases before any backend is chosen: (Member, Scenario) pairs
        (see the module docstring); `faults` narrows the trained fault types."""
        from e2e_reme.simulators.campaign import Planner
        from e2e_reme.simulators.episode import Scenario
        planner = planner or Planner("nspawn")
        s, members = self.split_set(name), self.members(name)
        used = {m: 0 for m in members}
        out = []
        for fault in self._faults(faults):
            eligible = [m for m in members if planner.admits(m.system, m.service, fault)[0]]
            if not eligible:
                continue        # check() refuses a trained fault without a service here
            rng = random.Random(f"{s.seed}:{seed}:{fault}")
            for _ in range(s.cases_per_fault):
                ties = {m: rng.random() for m in eligible}
                m = min(eligible, key=lambda x: (used[x], ties[x]))
                used[m] += 1
                out.append((m, Scenario(system=m.system, fault=fault, target=m.service,
                                        seed=rng.randrange(2 ** 31), index=len(out))))
        return out

    def cases(self, name: str, backends: Any = "nspawn", seeds: Sequence[int] = (0,), faults: Sequence[str] = (),
              systems: bool = True, services: bool = True, limit: int | None = None) -> tuple[list, list]:
        """The split's cases on this host (campaign `Case`s, each with its evaluation set) and
        those no backend here provides (campaign `Skipped`, with why). `systems`/`services`:
        the whole systems' cases, the named services' cases; `limit`: at most N per set."""
        from e2e_reme.simulators.campaign import Case, Planner, Skipped
        planner = backends if isinstance(backends, Planner) else Planner(backends)
        cases, skipped, per_set, seen = [], [], {}, set()
        for k, seed in enumerate(seeds):
            for m, sc in self.plan(name, seed, faults, planner):
                whole = m.eval_set.startswith("system:")
                if (whole and not systems) or (not whole and not services):
                    continue
                backend, why = planner.backend_for(sc.fault)
                if backend is None:
                    if (m.eval_set, sc.fault) not in seen:        # once per set and fault, not per case
                        seen.add((m.eval_set, sc.fault))
                        skipped.append(Skipped(sc.fault, why, eval_set=m.eval_set))
                    continue
                if limit is not None and per_set.get(m.eval_set, 0) >= limit:
                    continue
                case = Case(replace(sc, index=sc.index + 10000 * k), backend, m.eval_set)
                per_set[m.eval_set] = per_set.get(m.eval_set, 0) + 1
                cases.append(case)
        return cases, skipped

    def _faults(self, faults: Sequence[str]) -> list[str]:
        from e2e_reme.simulators.faults.base import canonical_name
        if not faults:
            return list(self.trained_faults)
        wanted = [canonical_name(f) for f in faults]
        bad = [f for f in wanted if f not in self.trained_faults]
        if bad:
            raise TrainError(f"fault types {bad} are not trained in {self.source or 'the splits'}; "
                             f"choose among {', '.join(self.trained_faults)}")
        return list(dict.fromkeys(wanted))

    # ---- the definition's own rules --------------------------------------------------------

    def check(self) -> "Splits":
        """Names that exist, splits that do not overlap, and every trained fault type with a
        service it applies to in validation and in test; else one error naming the fix."""
        from e2e_reme.simulators.faults.base import canonical_name, fault_catalog
        from e2e_reme.simulators.systems.spec import list_systems, load_system
        where = self.source or "splits"
        systems = set(list_systems())
        for name in HELD_OUT:
            s = getattr(self, name)
            if s.cases_per_fault < 1:
                raise TrainError(f"{where}: {name}.cases_per_fault must be at least 1")
            for sys in (*s.systems, *s.services):
                if sys not in systems:
                    raise TrainError(f"{where}: {name} names the system '{sys}', which is not one of ours "
                                     f"({', '.join(sorted(systems))})")
            for sys, names in s.services.items():
                unknown = [n for n in names if n not in load_system(sys).services]
                if unknown:
                    raise TrainError(f"{where}: {name}.services.{sys} names {unknown}, not services of {sys}")
        v, t = self.validation, self.test
        both = (set(v.systems) & set(t.systems)) | (v.service_names() & t.service_names())
        both |= {n for n in v.service_names() | set(v.services) if n in t.systems}
        both |= {n for n in t.service_names() | set(t.services) if n in v.systems}
        if both:
            raise TrainError(f"{where}: {sorted(both)} are in both validation and test (directly or through a "
                             f"whole system); a system or service belongs to one split")
        catalog = fault_catalog()
        for f in (*self.trained_faults, *self.excluded_faults):
            if canonical_name(f) not in catalog:
                raise TrainError(f"{where}: unknown fault type '{f}'; the catalog: {', '.join(catalog)}")
        if set(self.trained_faults) & set(self.excluded_faults):
            raise TrainError(f"{where}: {sorted(set(self.trained_faults) & set(self.excluded_faults))} are both "
                             f"trained and excluded")
        from e2e_reme.simulators.campaign import Planner
        planner = Planner("nspawn")
        for name in HELD_OUT:
            members = self.members(name)
            if not members:
                raise TrainError(f"{where}: the {name} split holds no system or service")
            missing = [f for f in self.trained_faults
                       if not any(planner.admits(m.system, m.service, canonical_name(f))[0] for m in members)]
            if missing:
                raise TrainError(f"{where}: the trained fault types {missing} apply to no service of the {name} "
                                 f"split; add a service they apply to, or move them to excluded_faults with the reason")
        return self


def default_path() -> Path:
    return Path(os.environ.get(ENV) or DEFAULT_PATH)


_CACHE: dict[tuple[str, str], Splits] = {}


def load_splits(path: str | Path | Splits | None = None) -> Splits:
    """The splits of `path` (None or "": $E2E_REME_SPLITS, else configs/splits.yaml),
    checked; a Splits is returned as it is."""
    if isinstance(path, Splits):
        return path
    p = Path(path) if path else default_path()
    if not p.is_file():
        raise TrainError(f"splits file {p}: no such file; the repository's is configs/splits.yaml (data.splits "
                         f"or ${ENV} names another)")
    raw = p.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    key = (str(p.resolve()), digest)
    if key not in _CACHE:
        d = read_yaml(p, "splits file", TrainError)
        for name in HELD_OUT:
            sec = d.get(name) or {}
            if isinstance(sec, Mapping) and isinstance(sec.get("services"), Mapping):
                sec = {**sec, "services": {k: tuple(v or ()) for k, v in sec["services"].items()}}
            d[name] = sec
        for k in ("source", "sha256"):
            if k in d:
                raise TrainError(f"splits file {p}: '{k}' is set by the loader, not the file")
        s = build(Splits, d, f"splits file {p}", TrainError)
        _CACHE[key] = replace(s, source=str(p), sha256=digest).check()
    return _CACHE[key]


def split_of_record(rec: Mapping[str, Any], splits: Splits) -> str:
    """The split of an episode record: its scenario's system and faulty service."""
    sc = rec.get("scenario") or {}
    return splits.split_of(sc.get("system"), sc.get("target"))


def train_planner(splits: Splits, backends: Any = "nspawn", report=None):
    """A campaign Planner that offers only the train split's services as targets: with it,
    `make_cases` draws a suite's targets among them (the trace collection)."""
    from e2e_reme.simulators.campaign import Planner

    class TrainPlanner(Planner):
        def services(self, system: str, fault: str) -> list[str]:
            return [s for s in super().services(system, fault) if splits.split_of(system, s) == "train"]

    return TrainPlanner(backends, report)


def describe(splits: Splits, planner=None) -> dict:
    """Each split's systems, services and evaluation plan size (`remed train splits`)."""
    from e2e_reme.simulators.systems.spec import list_systems, load_system
    out = {"source": splits.source, "sha256": splits.sha256, "definition": splits.definition_sha256(),
           "trained_faults": list(splits.trained_faults),
           "excluded_faults": dict(splits.excluded_faults)}
    train = [f"{sys}/{svc}" for sys in list_systems() for svc in load_system(sys).services
             if splits.split_of(sys, svc) == "train"]
    out["train"] = {"services": len(train), "systems": sorted({t.split("/")[0] for t in train})}
    for name in HELD_OUT:
        plan = splits.plan(name, planner=planner)
        per_fault: dict[str, int] = {}
        for _, sc in plan:
            per_fault[sc.fault] = per_fault.get(sc.fault, 0) + 1
        out[name] = {"systems": list(getattr(splits, name).systems),
                     "services": [f"{m.system}/{m.service}" for m in splits.members(name)],
                     "cases": len(plan), "distinct_services": len({(m.system, m.service) for m, _ in plan}),
                     "cases_per_fault": per_fault}
    return out


__all__ = ["HELD_OUT", "Member", "SPLITS", "SplitSet", "Splits", "describe", "load_splits", "split_of_record",
           "train_planner"]
