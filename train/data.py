"""SFT data: verified expert episodes, held out honestly, augmented without lying.

Source. Episode records (`simulators.episode.EpisodeRecord.to_dict()`, one schema) from a
`remed bench` run (`<dir>/episodes.jsonl`), a fleet collection (`<dir>/shards/*.jsonl`), a
JSONL file, or a directory holding any number of those, read through the campaign's records
store (`simulators.campaign.RecordStore`). An SFT trace is an episode of the
expert runbook policy that the verifier judged a success: its full-detail report and the
playbook that fixed the live system.
Operator reviews (`data.reviews`: `remed review export` directories, serve/review_export.py)
add demonstrations of policy "review": a served model's playbook an operator approved and
the verifier confirmed on a live sandbox, held out by their report's system and service too.

Held out. Only the train split is trained on (train/splits.py, configs/splits.yaml or
`data.splits`): episodes of a validation or test system, or whose faulty service is a
validation or test service (or one of `data.holdout`, held out on top), are never trained on,
nor traces of a fault type the splits do not train; the renamed copies never draw a held-out
name (nor the words those names are made of), and a copy keeps its original system and
service in its meta (that is its identity), so evaluation measures generalisation, not recall.
`select_traces` is the one selection: SFT and RL's case drawing both use it.

Augmented (`AugmentConfig`), each copy a consistent rewrite of one verified incident:
- service names (and the system's name) replaced everywhere, in the report and in the
  playbook, by generated ones in varied styles (`cartservice`, `ts-x-service`,
  `x-service`, made-up words): the expert's answer to the renamed report is the renamed
  playbook (a test checks it against `expert_playbook`), so the trace stays the expert's;
- the sandbox's /24 and the random names of transient units (`run-r<hex>.service`)
  renumbered, as another sandbox or another run would have them;
- the report told at the three levels of detail (`simulators.reports.at_level`: the same
  observations, the symptoms recomputed), with the same verified playbook as the answer;
- symptom lines reworded from a few templates.
What a copy is not: executed. The renamed services do not exist in any sandbox; only the
original episode was verified.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .errors import NoTrainingData, TrainError
from .format import answer_text, build_messages
from e2e_reme.config import build

LEVELS = ("full", "symptoms", "minimal")


@dataclass(frozen=True)
class HoldoutConfig:
    """Held out on top of the splits (ad hoc; the splits file is the definition)."""
    systems: tuple[str, ...] = ()
    services: tuple[str, ...] = ()


@dataclass(frozen=True)
class AugmentConfig:
    copies: int = 8                    # renamed copies per episode; the original is kept as well
    rename_system: bool = True
    renumber: bool = True              # the sandbox's subnet and transient unit names
    paraphrase: float = 0.5            # share of copies whose symptom lines are reworded
    levels: Mapping[str, float] = field(default_factory=lambda: {"full": 1.0})   # share of copies per level
    seed: int = 0

    def __post_init__(self):
        bad = sorted(set(self.levels) - set(LEVELS))
        if bad:
            raise TrainError(f"data config: augment.levels has unknown levels {bad}; use {list(LEVELS)}")


@dataclass(frozen=True)
class DataConfig:
    episodes: tuple[str, ...] = ("runs/sft-data",)
    policy: str = "runbook"            # whose successful episodes are the traces
    faults: tuple[str, ...] = ()       # only traces of these fault types (empty: all the splits train)
    splits: str = ""                   # the split definition ("": $E2E_REME_SPLITS or configs/splits.yaml)
    holdout: HoldoutConfig = HoldoutConfig()   # held out on top of the splits' validation and test
    augment: AugmentConfig = AugmentConfig()
    max_len: int = 4096                # prompt + answer tokens; longer examples are left out (counted)
    reviews: tuple[str, ...] = ()      # `remed review export` directories: their verified demonstrations
                                       # (policy "review") are traces too, split-checked like the rest

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataConfig":
        return build(cls, d, "data config", TrainError)


# ---- reading episode records --------------------------------------------------------------------

def read_episodes(paths: Iterable[str | Path]) -> list[dict]:
    """Every episode record under `paths` (each a JSONL file, a bench run, a fleet collection,
    or a directory of those), once each: the same episode read twice counts once."""
    from e2e_reme.simulators.campaign import RecordStore
    seen, out = set(), []
    for path in paths:
        for rec in (r for store in RecordStore.find(path) for r in store):
            key = (rec.get("id"), rec.get("started_at"), rec.get("sandbox"))
            if "scenario" in rec and key not in seen:
                seen.add(key)
                out.append(rec)
    return out


REVIEW_POLICY = "review"              # the policy of a review demonstration (serve/review_export.py)


def read_reviews(paths: Iterable[str | Path]) -> list[dict]:
    """The verified demonstrations of `remed review export` directories (each holds
    demonstrations/episodes.jsonl; the JSONL file itself may be named): episode records of
    policy "review", an operator-approved playbook the verifier confirmed on a live sandbox."""
    out = []
    for path in paths:
        p = Path(path)
        src = p / "demonstrations" if (p / "demonstrations").is_dir() else p
        if not (src.is_file() or (src / "episodes.jsonl").is_file()):
            raise TrainError(f"data.reviews: {path} is not a review export (no demonstrations/episodes.jsonl); "
                             f"write one with `remed review export --db runs/serve/review.sqlite --out {path}`")
        out += [r for r in read_episodes([src]) if r.get("policy") == REVIEW_POLICY]
    return out


def is_trace(rec: Mapping[str, Any], policy: str = "runbook") -> bool:
    """A verified expert trace: the policy's episode, judged a success, from a full report,
    with the playbook that ran."""
    rep = rec.get("report") or {}
    return (rec.get("outcome") == "success" and rec.get("policy") == policy and bool(rec.get("playbook"))
            and rep.get("level") == "full" and bool(rep.get("service")) and bool(rep.get("target")))


def is_held_out(rec: Mapping[str, Any], holdout: HoldoutConfig) -> bool:
    sc = rec.get("scenario") or {}
    return sc.get("system") in holdout.systems or sc.get("target") in holdout.services


def _review_held_out(rec: Mapping[str, Any], holdout: HoldoutConfig) -> bool:
    """A review's case is what its report says (no injected ground truth): held out when the
    scenario or the report names a held-out system or service."""
    rep = rec.get("report") or {}
    return is_held_out(rec, holdout) or rep.get("system") in holdout.systems or rep.get("service") in holdout.services


def training_holdout(config: DataConfig) -> HoldoutConfig:
    """What is never trained on: the splits' validation and test systems and services (those
    of whole systems included), and `data.holdout` on top."""
    from .splits import load_splits
    s = load_splits(config.splits or None)
    return HoldoutConfig(systems=tuple(dict.fromkeys((*s.held_out_systems(), *config.holdout.systems))),
                         services=tuple(dict.fromkeys((*s.held_out_services(), *config.holdout.services))))


def select_traces(records: Iterable[Mapping[str, Any]], config: DataConfig) -> tuple[list, list, dict]:
    """The records trained on (verified traces of the train split, of trained fault types),
    the held-out ones, and how many others were left out and why: the one selection SFT and
    RL share. Review demonstrations (policy "review") count only where `config.reviews` names
    a source, and are held out by their report's system and service as well."""
    from .splits import load_splits
    splits, holdout = load_splits(config.splits or None), training_holdout(config)
    skipped = {"not a verified trace": 0, "held out": 0, "other fault type": 0, "fault type not trained": 0}
    train, held = [], []
    for rec in records:
        fault = (rec.get("scenario") or {}).get("fault")
        review = bool(config.reviews) and rec.get("policy") == REVIEW_POLICY
        if not is_trace(rec, REVIEW_POLICY if review else config.policy):
            skipped["not a verified trace"] += 1
        elif config.faults and fault not in config.faults:
            skipped["other fault type"] += 1
        elif review and _review_held_out(rec, holdout):
            key = "review of a validation/test system or service"
            skipped[key] = skipped.get(key, 0) + 1
            held.append(rec)
        elif is_held_out(rec, holdout):
            skipped["held out"] += 1
            held.append(rec)
        elif not splits.trains(fault):
            skipped["fault type not trained"] += 1
        else:
            train.append(rec)
    return train, held, skipped


def inventory_hosts(report: Mapping[str, Any]) -> tuple[str, ...]:
    """The sandbox's inventory host names as the report's placement gives them (n0, n1, ...)."""
    hosts = list((report.get("placement") or {}).keys())
    return tuple(sorted(hosts, key=lambda h: (len(h), h)))


# ---- names -------------------------------------------------------------------------------------

_WORDS = ("account", "ads", "alert", "archive", "asset", "audit", "basket", "billing", "booking", "cache",
          "calendar", "card", "catalog", "chat", "claims", "coupon", "credit", "customer", "delivery",
          "discount", "dispatch", "document", "event", "export", "fare", "feed", "fleet", "gallery", "geo",
          "gift", "guest", "history", "identity", "import", "inventory", "invoice", "journey", "ledger",
          "loyalty", "mail", "map", "media", "member", "menu", "message", "meter", "news", "offer", "order",
          "parcel", "partner", "pass", "photo", "pricing", "profile", "promo", "quote", "rating", "refund",
          "region", "rental", "report", "review", "reward", "route", "schedule", "search", "session",
          "settle", "shelf", "shop", "sku", "stock", "store", "tariff", "tax", "ticket", "token", "track",
          "trade", "transfer", "trip", "user", "vault", "vendor", "voucher", "wallet", "warehouse", "weather",
          "wish", "zone", "auth", "avatar", "benefit", "cart", "config", "contact", "food", "insurance",
          "notify", "payment", "plan", "recommend", "station", "train", "travel", "verify")
_STYLES = ("{w}service", "{w}-service", "ts-{w}-service", "{w}-{v}-service", "{w}-api", "{w}-svc", "{w}{v}",
           "{w}-{v}", "{w}d", "{w}")
_REDIS_STYLES = ("redis-{w}", "{w}-redis", "{w}-store", "{w}-cache")
_SYSTEM_STYLES = ("{w}-shop", "{w}-{v}", "{w}-micro", "{w}hub", "{w}-platform", "{w}")
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


class NameMaker:
    """Service and system names in the styles real systems use, from a word list and
    made-up words, never a held-out name nor a word held-out names are made of."""

    def __init__(self, rng: random.Random, holdout: HoldoutConfig, taken: Iterable[str] = ()):
        self.rng = rng
        banned_words = set()
        for n in (*holdout.services, *holdout.systems, *_held_out_system_services(holdout.systems)):
            banned_words |= {w for w in re.split(r"[-_.]", n.lower()) if w and w not in ("ts", "service")}
            banned_words.add(n.lower().replace("service", "").strip("-"))
        self.banned_words = banned_words
        self.banned = {n.lower() for n in (*holdout.services, *holdout.systems,
                                           *_held_out_system_services(holdout.systems))}
        self.words = [w for w in _WORDS if w not in banned_words]
        self.used = {t.lower() for t in taken}

    def word(self) -> str:
        if self.rng.random() < 0.5:
            return self.rng.choice(self.words)
        while True:
            w = "".join(self.rng.choice(_CONSONANTS) + self.rng.choice(_VOWELS)
                        for _ in range(self.rng.randint(2, 3)))
            if self.rng.random() < 0.4:
                w += self.rng.choice(_CONSONANTS)
            if w not in self.banned_words:
                return w

    def _fresh(self, styles: Sequence[str]) -> str:
        style = self.rng.choice(styles)
        for _ in range(1000):
            w, v = self.word(), self.word()
            name = style.format(w=w, v=v)
            if name.lower() not in self.used and name.lower() not in self.banned and w != v:
                self.used.add(name.lower())
                return name
        raise TrainError("could not make a fresh service name; the word list is too small")

    def services(self, names: Sequence[str], kinds: Mapping[str, str]) -> dict[str, str]:
        """New names for a system's services, one style for the system (as real ones have)."""
        style = self.rng.choice(_STYLES)
        return {n: self._fresh(_REDIS_STYLES if kinds.get(n) == "redis" else (style,)) for n in names}

    def system(self) -> str:
        return self._fresh(_SYSTEM_STYLES)


def _held_out_system_services(systems: Iterable[str]) -> list[str]:
    """The service names of held-out systems (read from their specs), so no copy uses them."""
    out = []
    for s in systems:
        try:
            from e2e_reme.simulators.systems.spec import load_system
            out += list(load_system(s).services)
        except Exception:
            continue        # a held-out system that is not one of ours: nothing more to exclude
    return out


def _substitute(obj: Any, fn) -> Any:
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {fn(k) if isinstance(k, str) else k: _substitute(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_substitute(v, fn) for v in obj]
    return obj


def _name_pattern(names: Iterable[str]) -> re.Pattern | None:
    names = sorted(set(n for n in names if n), key=len, reverse=True)
    if not names:
        return None
    # Longest first, and not inside a longer word: ts-order-service must not rewrite a piece of
    # ts-admin-order-service, while remed-<name>.service and /etc/remed/<name>.yaml are rewritten.
    return re.compile(r"(?<![A-Za-z0-9])(" + "|".join(re.escape(n) for n in names) + r")(?![A-Za-z0-9])")


@dataclass
class Rewrite:
    """A consistent renaming of one incident: services, system, subnet, transient units."""
    names: dict[str, str] = field(default_factory=dict)
    subnets: dict[str, str] = field(default_factory=dict)     # "198.18.3." -> "198.18.77."
    units: dict[str, str] = field(default_factory=dict)       # run-r<hex>.service -> another

    def __post_init__(self):
        pairs = dict(self.names)
        for old, new in self.names.items():
            if "-" in old:          # nft tables and the like spell the name with underscores
                pairs[old.replace("-", "_")] = new.replace("-", "_")
        self._pairs = pairs
        self._names = _name_pattern(pairs)

    def text(self, s: str) -> str:
        if self._names is not None:
            s = self._names.sub(lambda m: self._pairs[m.group(1)], s)
        if self.subnets:
            s = _SUBNET.sub(lambda m: self.subnets.get(m.group(0), m.group(0)), s)
        if self.units:
            s = _UNIT.sub(lambda m: self.units.get(m.group(0), m.group(0)), s)
        return s

    def apply(self, obj: Any) -> Any:
        return _substitute(obj, self.text)


_SUBNET = re.compile(r"(?<![0-9.])198\.1[89]\.\d{1,3}\.")
_UNIT = re.compile(r"\brun-[ru][0-9a-f]{8,}\.(?:service|scope)")


def _service_kinds(report: Mapping[str, Any]) -> dict[str, str]:
    kinds = {}
    t = report.get("target") or {}
    if report.get("service"):
        kinds[report["service"]] = t.get("kind", "http")
    for n, d in (t.get("dependencies") or {}).items():
        kinds[n] = (d or {}).get("kind", "http")
    for n, s in ((report.get("observations") or {}).get("services") or {}).items():
        if s.get("metrics") == "n/a":
            kinds.setdefault(n, "redis")
    return kinds


def make_rewrite(report: Mapping[str, Any], answer: str, rng: random.Random, holdout: HoldoutConfig,
                 augment: AugmentConfig) -> Rewrite:
    services = list(dict.fromkeys(list((report.get("call_graph") or {}).keys())
                                  + [s for v in (report.get("placement") or {}).values() for s in v]))
    maker = NameMaker(rng, holdout, taken=services + [report.get("system", "")])
    names = maker.services(services, _service_kinds(report))
    if augment.rename_system and report.get("system"):
        names[report["system"]] = maker.system()
    subnets, units = {}, {}
    if augment.renumber:
        blob = json.dumps(report) + answer
        for old in sorted(set(_SUBNET.findall(blob))):
            subnets[old] = f"198.{rng.choice((18, 19))}.{rng.randrange(256)}."
        for old in sorted(set(_UNIT.findall(blob))):
            prefix, _, suffix = old.rpartition(".")
            digits = "".join(rng.choice("0123456789abcdef") for _ in range(len(prefix) - 5))
            units[old] = f"{prefix[:5]}{digits}.{suffix}"
    return Rewrite(names, subnets, units)


# ---- symptom paraphrases -------------------------------------------------------------------------

_PARAPHRASES: list[tuple[re.Pattern, tuple[str, ...]]] = [
    (re.compile(r"^(\d+)% of requests to the entry \((.+?)\) failed over (\d+) s \((.*)\)$"),
     ("{0}% of requests through the entry point {1} failed within {2} s ({3})",
      "the entry {1} failed {0}% of its requests over {2} s ({3})",
      "error rate at the entry ({1}): {0}% over {2} s ({3})")),
    (re.compile(r"^p95 latency at the entry is (\d+) ms \(SLO (\d+) ms\)$"),
     ("the entry's p95 latency is {0} ms, above its {1} ms SLO",
      "95th percentile latency at the entry: {0} ms (objective {1} ms)")),
    (re.compile(r"^(.+?): (\d+) of (\d+) requests failed$"),
     ("{0}: {1}/{2} requests failed", "{0} failed {1} of {2} requests", "{0}: {1} failures in {2} requests")),
    (re.compile(r"^(.+?): mean latency (\d+) ms$"),
     ("{0}: average latency {1} ms", "{0} answers in {1} ms on average")),
    (re.compile(r"^(.+?): does not answer its metrics endpoint$"),
     ("{0}: its metrics endpoint does not respond", "{0}: no answer from its metrics endpoint")),
    (re.compile(r"^(.+?): unit is (\S+) \((.+)\)$"),
     ("{0}: the unit is {1} ({2})", "{0}: systemd reports the unit {1} ({2})")),
    (re.compile(r"^(\d+) service\(s\) are not running$"),
     ("{0} service(s) are down", "{0} service(s) not running")),
]


def paraphrase(line: str, rng: random.Random) -> str:
    for pat, options in _PARAPHRASES:
        m = pat.match(line)
        if m:
            return rng.choice(options).format(*m.groups())
    return line


# ---- examples ----------------------------------------------------------------------------------

@dataclass
class Example:
    messages: list[dict]
    answer: str
    meta: dict
    report: dict | None = None          # the report the prompt tells (rewritten, for a copy)

    def texts(self) -> list[str]:
        return [m["content"] for m in self.messages] + [self.answer]


def trace_example(rec: Mapping[str, Any], report: Mapping[str, Any] | None = None, answer: str | None = None,
                  **meta: Any) -> Example:
    """One example from a trace (or a rewrite of it): the benchmark's solo prompt for the
    report and the expert's answer."""
    report = report if report is not None else rec["report"]
    answer = answer if answer is not None else answer_text(rec["playbook"])
    sc = rec.get("scenario") or {}
    base = {"episode": rec.get("id"), "system": sc.get("system"), "fault": sc.get("fault"),
            "service": sc.get("target"), "level": report.get("level"), "copy": 0}
    return Example(build_messages(report, inventory_hosts(report), mode="solo"), answer, {**base, **meta},
                   dict(report))


def augment_trace(rec: Mapping[str, Any], config: AugmentConfig, holdout: HoldoutConfig) -> list[Example]:
    """The original example and `config.copies` rewritten ones."""
    out = [trace_example(rec)]
    levels = [l for l in LEVELS if config.levels.get(l, 0) > 0] or ["full"]
    weights = [config.levels.get(l, 0) for l in levels] if config.levels else [1.0]
    for k in range(1, config.copies + 1):
        rng = random.Random(f"{config.seed}:{rec.get('id')}:{rec.get('started_at')}:{k}")
        report, answer = dict(rec["report"]), answer_text(rec["playbook"])
        rw = make_rewrite(report, answer, rng, holdout, config)
        report, answer = rw.apply(report), rw.text(answer)
        level = rng.choices(levels, weights)[0]
        if level != "full":
            from e2e_reme.simulators.reports import at_level
            report = at_level(report, level)
        para = rng.random() < config.paraphrase
        if para:
            report["symptoms"] = [paraphrase(s, rng) for s in report.get("symptoms") or ()]
        out.append(trace_example(rec, report, answer, copy=k, level=level, paraphrased=para,
                                 rewrite={"names": rw.names, "subnets": rw.subnets, "units": rw.units}))
    return out


@dataclass
class SFTData:
    train: list[Example]
    traces: int                         # verified traces trained on
    held_out: list[dict]                # records of held-out systems/services (not trained on)
    skipped: dict[str, int]             # why other records were not used
    reviews: int = 0                    # of the traces, review demonstrations (data.reviews)

    def stats(self) -> dict:
        by = lambda key: dict(sorted(_count(e.meta.get(key) for e in self.train).items(), key=lambda kv: str(kv[0])))
        return {"examples": len(self.train), "traces": self.traces, "reviews": self.reviews,
                "held_out_records": len(self.held_out),
                "skipped": self.skipped, "by_fault": by("fault"), "by_system": by("system"),
                "by_level": by("level")}


def _count(values: Iterable[Any]) -> dict:
    c: dict = {}
    for v in values:
        c[v] = c.get(v, 0) + 1
    return c


def build_sft_data(config: DataConfig) -> SFTData:
    """Read, filter, hold out, augment: the examples SFT trains on."""
    records = read_episodes(config.episodes) + read_reviews(config.reviews)
    if not records:
        raise NoTrainingData(
            f"no episode records under {', '.join(config.episodes) or '(no paths)'}; collect expert traces first: "
            f"`remed train collect --config configs/sft-tiny.yaml` (or `remed bench --policy runbook --out DIR`)")
    train, held, skipped = select_traces(records, config)
    if not train:
        raise NoTrainingData(f"none of the {len(records)} records under {', '.join(config.episodes)} is a verified "
                             f"'{config.policy}' trace outside the held-out systems/services (the splits' "
                             f"validation and test, data.holdout) of a trained fault type ({skipped})")
    holdout = training_holdout(config)
    examples = [e for rec in train for e in augment_trace(rec, config.augment, holdout)]
    return SFTData(examples, len(train), held, skipped, sum(r.get("policy") == REVIEW_POLICY for r in train))


def corpus_texts(examples: Iterable[Example], max_copy: int | None = 8) -> Iterator[str]:
    """What the tokenizer learns from: every prompt turn and answer of the examples (of the
    first `max_copy` copies of each trace: more copies add names, not vocabulary)."""
    for e in examples:
        if max_copy is None or e.meta.get("copy", 0) <= max_copy:
            yield from e.texts()
