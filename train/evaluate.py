"""Evaluation by execution: a model writes playbooks for held-out incidents on live
sandboxes, and only the verifier's verdict counts.

    results = run_eval("runs/sft-tiny/model", EvalConfig(split="validation"), None, "runs/sft-tiny/eval")
    results["overall"]["success_rate"], results["per_fault"], results["overall"]["failure_stages"]

The cases: those of one split of configs/splits.yaml (train/splits.py; `split`: validation,
the default, for every development decision; test, once per release), planned by the split
whatever runs them: for each trained fault type (or those of `faults`), the split's
`cases_per_fault` cases spread over its services (`seeds`: one plan per seed). A case is
reported under its set: `system:<name>` for a system held out whole, `service:<name>` for a
held-out service of a trained system. `model_dir` may be a release (releases/<name>,
train/release.py): its base and adapter, checked against its manifest. Each case is a real episode
(`simulators.episode.run_case`: reset, inject, report, the model's answer, gate, syntax
check, execution, verification) with the model behind the benchmark's SoloGen policy,
through the transformers engine (greedy decoding by default).

Reported per fault type and per set (held-out system / held-out service): successes and
the 95 % interval, where the failures stopped (the answer had no YAML, the safety gate
refused it, the syntax check failed, it failed to execute, or it ran but the verifier
found the system not fixed), and tokens per case. Results land in out/ (episodes.jsonl,
one record per case, the same schema as the benchmark's; results.json; success.png);
a rerun resumes. The episodes run in this process on local sandboxes; a Ray fleet is not
needed (and not used) here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from e2e_reme.config import build

from .errors import TrainError

# Where a failed episode stopped, as the issue names the stages.
STAGE_NAMES = {"generate": "generation", "extract": "no_yaml", "parse": "no_yaml", "gate": "gate",
               "syntax": "syntax", "execute": "execution", "idempotence": "execution", "verify": "verification"}


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = True
    split: str = "validation"          # validation (every development decision) | test (once per release)
    faults: tuple[str, ...] = ()       # only these fault types (empty: every type the splits train)
    seeds: tuple[int, ...] = (0,)      # one plan of the split per seed
    held_out_systems: bool = True      # the cases on the split's whole systems
    held_out_services: bool = True     # the cases on the split's services of trained systems
    limit: int | None = None           # at most this many cases per set (quick looks)
    backend: str = "nspawn"
    temperature: float = 0.0
    max_tokens: int = 1024
    report_detail: str = "full"
    verify_load: bool = True
    engine: str = "transformers"       # transformers | vllm | auto
    sandbox_prefix: str = "eval"
    parallel: int = 4                  # sandboxes side by side, each with its case's fault live; the
                                       # model generates their answers together, as one batch
    max_wait_s: float = 60.0           # how long an answer waits for the other sandboxes' to batch with
    loop_span: int = 96                # an answer repeating one block for this many tokens is stopped: the
                                       # policy's failure (GenerationLoop); 0: off
    shots: int = 0                     # few-shot: verified expert examples shown before the report
    shots_from: tuple[str, ...] = ("runs/sft-data",)   # where those come from (train-split traces only)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EvalConfig":
        return build(cls, d, "eval config", TrainError)


def eval_cases(config: EvalConfig, splits=None) -> tuple[list, list[dict]]:
    """The split's cases (campaign `Case`s, each with its set), and those this host cannot run
    (with why). `splits`: a Splits, a splits file, or None (configs/splits.yaml)."""
    from .splits import load_splits
    cases, skipped = load_splits(splits).cases(config.split, config.backend, config.seeds, config.faults,
                                               config.held_out_systems, config.held_out_services, config.limit)
    return cases, [s.to_dict() for s in skipped]


def make_eval_policy(model_dir: str | Path, config: EvalConfig, examples: tuple = ()):
    """SoloGen over the rollout engine (the benchmark's prompt, with `examples` shown first;
    the record keeps ids and logprobs), its requests from the parallel sandboxes batched."""
    from e2e_reme.simulators.policies.solo import SoloGen
    from .rollout import GatheredChatModel, make_engine
    engine = make_engine(str(model_dir), kind=config.engine, batch_size=max(1, config.parallel))
    chat = GatheredChatModel(engine, loop_span=config.loop_span, max_wait_s=config.max_wait_s)
    return SoloGen(chat, temperature=config.temperature, max_tokens=config.max_tokens, examples=examples)


def few_shot_examples(dirs, n: int, splits) -> tuple:
    """`n` verified expert traces of the train split as (report, answer) pairs: the shortest
    answer of each fault type, shortest first, one per fault type. Refused where there are
    fewer than `n` (collect traces first)."""
    from e2e_reme.simulators.campaign import RecordStore
    from .data import is_trace
    from .format import answer_text
    from .splits import split_of_record
    if n <= 0:
        return ()
    best: dict[str, tuple[str, dict]] = {}
    for d in dirs:
        for store in RecordStore.find(d):
            for rec in store:
                if not is_trace(rec) or split_of_record(rec, splits) != "train":
                    continue
                fault, answer = rec["scenario"]["fault"], answer_text(rec["playbook"])
                if fault not in best or len(answer) < len(best[fault][0]):
                    best[fault] = (answer, rec["report"])
    if len(best) < n:
        raise TrainError(f"few-shot: {n} examples of distinct fault types asked, {len(best)} verified train-split "
                         f"traces found under {', '.join(map(str, dirs))}: run `remed train collect` first")
    chosen = sorted(best.values(), key=lambda x: len(x[0]))[:n]
    return tuple((report, answer) for answer, report in chosen)


def run_eval(model_dir: str | Path | None, config: EvalConfig, splits, out: str | Path, *,
             on_event: Callable[[str, Any], None] | None = None, policy=None, command: str | None = None) -> dict:
    """Run (or resume) every case of the config's split with the model (a model directory or a
    release; or, without one, with `policy`: the runbook as the reference on the same cases);
    return and write the results. `splits`: a Splits, a splits file, or None (configs/splits.yaml);
    `command`: the command line, kept in config.json (a release's manifest quotes it)."""
    from e2e_reme.simulators.campaign import RecordStore, publish, run_local
    from e2e_reme.simulators.episode import EpisodeConfig
    from .model import check_model_dir
    from .release import is_release, model_dir as resolve_model, weights_sha256
    from .splits import load_splits

    emit = on_event or (lambda kind, payload: None)
    if model_dir is None and policy is None:
        raise TrainError("nothing to evaluate: name a model directory or a policy")
    judged = f"policy:{policy.name}" if model_dir is None else None
    if model_dir is not None and is_release(model_dir):
        judged = f"release:{Path(model_dir).resolve()}"
        model_dir = resolve_model(model_dir)
    judged = judged or str(check_model_dir(model_dir))
    splits = load_splits(splits)
    cases, skipped = eval_cases(config, splits)
    if not cases:
        raise TrainError(f"no case of the {config.split} split ({splits.source}) that this host can run "
                         f"({len(skipped)} skipped: {'; '.join(s['reason'] for s in skipped[:2])})")
    store = RecordStore(out)
    weights = weights_sha256(model_dir) if model_dir is not None else None    # one path, other weights: refused
    store.claim("config.json", {"model": judged, "weights_sha256": weights, "eval": asdict(config),
                                "command": command,
                                "splits": {"source": splits.source, "definition": splits.definition_sha256()}},
                keys=("model", "weights_sha256", "eval.split", "eval.faults", "eval.seeds", "eval.backend",
                      "eval.shots", "eval.temperature", "eval.max_tokens", "eval.loop_span", "splits.definition"),
                what="evaluation")
    todo, _ = store.pending(cases)
    emit("eval_cases", {"total": len(cases), "todo": len(todo), "skipped": len(skipped)})
    if todo:
        if policy is None:
            policy = make_eval_policy(model_dir, config, few_shot_examples(config.shots_from, config.shots, splits))
        join = getattr(policy, "model", None)
        join = getattr(join, "join", None) or (lambda: None)
        run_local(todo, store, policy=lambda: (join(), policy)[1], out_dir=store.dir / "episodes",
                  prefix=config.sandbox_prefix, parallel=max(1, config.parallel),
                  episode=EpisodeConfig(report_detail=config.report_detail, verify_load=config.verify_load),
                  emit=_eval_events(emit, todo))
    records = store.records(cases)
    results = {**summarize(records, skipped), "model": judged, "split": config.split,
               "splits": {"source": splits.source, "definition": splits.definition_sha256()},
               "seeds": list(config.seeds), "complete": len(records) == len(cases)}
    o = results["overall"]
    return publish(store, results, results["per_set_fault"],
                   f"execution success on the {config.split} split: {o['success_rate']:.0%} of {o['cases']}",
                   ylabel=f"{config.split} success (95 % CI)")


def _eval_events(emit: Callable[[str, Any], None], cases: list) -> Callable[[str, Any], None]:
    """The local runner's events under the names the trainer's progress uses (its own
    "step" is a training step); an episode as its record, with its set."""
    sets = {c.id: c.eval_set for c in cases}

    def on_event(kind: str, payload: Any) -> None:
        if kind == "slot":
            emit("eval_slot", payload)
        elif kind == "step":
            emit("eval_step", payload[1])
        elif kind == "episode":
            emit("eval_episode", {**payload.to_dict(), "eval_set": sets[payload.id]})
    return on_event


def _stage(rec: Mapping[str, Any]) -> str | None:
    """Where a failed episode stopped, as the evaluation names the stages; a failed injection too."""
    if rec["outcome"] == "failure":
        return STAGE_NAMES.get(rec.get("stage"), rec.get("stage") or "?")
    return "injection" if rec["outcome"] == "injection_failure" else None


def summarize(records: list[dict], skipped: list[dict] = ()) -> dict:
    """Statistics overall, per fault type, per set and per fault type of each set."""
    from e2e_reme.simulators.campaign import per_group, stats
    per_set = per_group(records, key=lambda r: r.get("eval_set"), stage_of=_stage)
    return {"overall": stats(records, _stage), "per_fault": per_group(records, stage_of=_stage), "per_set": per_set,
            "per_set_fault": {s: per_group([r for r in records if r.get("eval_set") == s], stage_of=_stage)
                              for s in per_set},
            "skipped": list(skipped)}


def eval_records(where: str | Path) -> list[dict]:
    """An evaluation's per-case records: a `remed train eval` results directory, or the
    compressed records a release keeps of one (releases/<name>/evals/<label>.jsonl.gz)."""
    import gzip

    from e2e_reme.simulators.campaign import RecordStore
    p = Path(where)
    if p.is_file() and p.name.endswith(".jsonl.gz"):
        try:
            with gzip.open(p, "rt") as f:
                return [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            raise TrainError(f"{p}: not an evaluation's compressed records ({e})") from e
    if not (p / "results.json").is_file():
        raise TrainError(f"{p}: no evaluation results here; run `remed train eval` into it first, or name a "
                         "release's records (releases/<name>/evals/<label>.jsonl.gz)")
    return list(RecordStore(p))


def compare(evals: Mapping[str, str | Path], out: str | Path, common: bool = False,
            reference: str | None = None) -> dict:
    """Evaluations side by side ({label: results dir}): each one's overall, per-fault and
    per-set statistics from its records, and one chart with a bar group per label; the
    `reference` (default: the first label) against each other one, case by case, with
    McNemar's exact test (`paired`).
    Evaluations of different cases are refused, because their rates are not comparable;
    with `common`, each is summarised over the cases all of them judged instead."""
    from e2e_reme.simulators.campaign import RecordStore, publish
    records = {label: {r["id"]: r for r in eval_records(d)} for label, d in evals.items()}
    ids = [set(r) for r in records.values()]
    shared = set.intersection(*ids) if ids else set()
    if not common and any(i != shared for i in ids):
        raise TrainError(f"the evaluations judged different cases ({len(set.union(*ids) - shared)} not in all); "
                         "evaluate each with the same config and let it finish, or compare the cases they "
                         "share (--common)")
    if not shared:
        raise TrainError("the evaluations share no case; evaluate them with the same config")
    order = [i for i in next(iter(records.values())) if i in shared]
    summaries = {label: summarize([recs[i] for i in order]) for label, recs in records.items()}
    ref = reference or next(iter(records))
    if ref not in records:
        raise TrainError(f"reference {ref!r} is not one of the evaluations ({', '.join(records)})")
    results = {"cases": len(order), "common_only": common, "evals": {k: str(v) for k, v in evals.items()},
               "policies": {label: {k: s[k] for k in ("overall", "per_fault", "per_set")}
                            for label, s in summaries.items()},
               "reference": ref,
               "paired": {label: mcnemar([records[ref][i] for i in order], [recs[i] for i in order])
                          for label, recs in records.items() if label != ref}}
    return publish(RecordStore(out), results, {label: s["per_fault"] for label, s in summaries.items()},
                   f"held-out execution success, {len(order)} cases", ylabel="held-out success (95 % CI)")


def mcnemar(a: list[Mapping[str, Any]], b: list[Mapping[str, Any]]) -> dict:
    """McNemar's exact test on paired records of the same cases (a[i] and b[i] judged the same
    case): `a_only` cases only a fixed, `b_only` only b fixed; p is the two-sided exact
    binomial probability of a split at least this uneven of the discordant cases under
    "neither is better" (1.0 without discordant cases). Cases where either side had an
    infrastructure failure are left out (`excluded`): nobody's policy was judged there."""
    from math import comb
    pairs = [(x["outcome"] == "success", y["outcome"] == "success") for x, y in zip(a, b)
             if "infra_failure" not in (x["outcome"], y["outcome"])]
    a_only = sum(1 for x, y in pairs if x and not y)
    b_only = sum(1 for x, y in pairs if y and not x)
    n, k = a_only + b_only, min(a_only, b_only)
    p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"cases": len(pairs), "excluded": len(a) - len(pairs), "a_only": a_only, "b_only": b_only,
            "both": sum(1 for x, y in pairs if x and y), "neither": sum(1 for x, y in pairs if not x and not y),
            "p_value": float(f"{p:.4g}")}
