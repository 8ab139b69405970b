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


def make_eval_policy(model_dir: str | Path, config: EvalConfig):
    """SoloGen over the rollout engine: the benchmark's prompt, the record keeps ids and logprobs."""
    from e2e_reme.simulators.policies.solo import SoloGen
    from .rollout import EngineChatModel, make_engine
    engine = make_engine(str(model_dir), kind=config.engine)
    return SoloGen(EngineChatModel(engine), temperature=config.temperature, max_tokens=config.max_tokens)


def run_eval(model_dir: str | Path | None, config: EvalConfig, splits, out: str | Path, *,
             on_event: Callable[[str, Any], None] | None = None, policy=None, command: str | None = None) -> dict:
    """Run (or resume) every case of the config's split with the model (a model directory or a
    release; or, without one, with `policy`: the runbook as the reference on the same cases);
    return and write the results. `splits`: a Splits, a splits file, or None (configs/splits.yaml);
    `command`: the command line, kept in config.json (a release's manifest quotes it)."""
    from e2e_reme.simulators.campaign import RecordStore, publish, run_local
    from e2e_reme.simulators.episode import EpisodeConfig
    from .model import check_model_dir
    from .release import is_release, model_dir as resolve_model
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
    store.claim("config.json", {"model": judged, "eval": asdict(config), "command": command,
                                "splits": {"source": splits.source, "definition": splits.definition_sha256()}},
                keys=("model", "eval.split", "eval.faults", "eval.seeds", "eval.backend", "splits.definition"),
                what="evaluation")
    todo, _ = store.pending(cases)
    emit("eval_cases", {"total": len(cases), "todo": len(todo), "skipped": len(skipped)})
    if todo:
        policy = policy or make_eval_policy(model_dir, config)
        run_local(todo, store, policy=lambda: policy, out_dir=store.dir / "episodes", prefix=config.sandbox_prefix,
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


def compare(evals: Mapping[str, str | Path], out: str | Path, common: bool = False) -> dict:
    """Evaluations side by side ({label: results dir}): each one's overall, per-fault and
    per-set statistics from its records, and one chart with a bar group per label.
    Evaluations of different cases are refused, because their rates are not comparable;
    with `common`, each is summarised over the cases all of them judged instead."""
    from e2e_reme.simulators.campaign import RecordStore, publish
    records = {}
    for label, d in evals.items():
        if not (Path(d) / "results.json").is_file():
            raise TrainError(f"{d}: no evaluation results here; run `remed train eval` into it first")
        records[label] = {r["id"]: r for r in RecordStore(d)}
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
    results = {"cases": len(order), "common_only": common, "evals": {k: str(v) for k, v in evals.items()},
               "policies": {label: {k: s[k] for k in ("overall", "per_fault", "per_set")}
                            for label, s in summaries.items()}}
    return publish(RecordStore(out), results, {label: s["per_fault"] for label, s in summaries.items()},
                   f"held-out execution success, {len(order)} cases", ylabel="held-out success (95 % CI)")
