"""Evaluation by execution: a model writes playbooks for held-out incidents on live
sandboxes, and only the verifier's verdict counts.

    results = run_eval("runs/sft-tiny/model", EvalConfig(), HoldoutConfig(systems=("simple-micro",)),
                       "runs/sft-tiny/eval")
    results["overall"]["success_rate"], results["per_fault"], results["failure_stages"]

The cases: MicroRemed's suite (`suite`, `seeds`) on every held-out system, as `remed
bench` draws them, so the number is comparable with `remed bench --policy solo --model
DIR` on that system; and, for every held-out service of a trained system, one case per
fault type of the suite that applies to it. Each case is a real episode
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
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import TrainError

# Where a failed episode stopped, as the issue names the stages.
STAGE_NAMES = {"generate": "generation", "extract": "no_yaml", "parse": "no_yaml", "gate": "gate",
               "syntax": "syntax", "execute": "execution", "idempotence": "execution", "verify": "verification"}


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = True
    suite: str = "easy"
    seeds: tuple[int, ...] = (0,)
    held_out_systems: bool = True      # the suite on every held-out system
    held_out_services: bool = True     # each suite fault on every held-out service of a trained system
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
        from .model import check_keys
        d = dict(d or {})
        check_keys("eval config", d, cls)
        if "seeds" in d:
            d["seeds"] = tuple(int(s) for s in (d["seeds"] if isinstance(d["seeds"], (list, tuple)) else [d["seeds"]]))
        return cls(**d)


def system_of(service: str) -> str | None:
    """The system (of ours) that has a service of this name."""
    from e2e_reme.simulators.systems.spec import list_systems, load_system
    for s in list_systems():
        if service in load_system(s).services:
            return s
    return None


def eval_cases(config: EvalConfig, holdout) -> tuple[list[tuple[str, Any]], list[dict]]:
    """[(set name, Scenario)], and the cases this host cannot run (with why)."""
    from e2e_reme.simulators.benchmark import load_suite, make_cases
    from e2e_reme.simulators.episode import Scenario
    from e2e_reme.simulators.faults.base import canonical_name, fault_available, get_fault
    from e2e_reme.simulators.systems.deploy import targets_for
    from e2e_reme.simulators.systems.spec import load_system

    cases: list[tuple[str, Any]] = []
    skipped: list[dict] = []
    if config.held_out_systems:
        for system in holdout.systems:
            got = []
            for seed in config.seeds:
                cs, sk = make_cases(system, config.suite, seed, config.backend)
                got += [c for c in cs if c.id not in {g.id for g in got}]
                skipped += [{"set": f"system:{system}", **asdict(s)} for s in sk if seed == config.seeds[0]]
            cases += [(f"system:{system}", c) for c in got[:config.limit]]
    if config.held_out_services:
        faults = list(dict.fromkeys(canonical_name(f) for f in load_suite(config.suite)))
        for service in holdout.services:
            system = system_of(service)
            if system is None:
                skipped.append({"set": f"service:{service}", "fault": "*",
                                "reason": f"no system of ours has a service '{service}'"})
                continue
            spec = load_system(system)
            targets = targets_for(spec, [f"198.18.255.{i + 2}" for i in range(spec.nodes)])
            got = []
            for i, fault in enumerate(faults):
                ok, why = fault_available(fault, config.backend)
                if not ok:
                    skipped.append({"set": f"service:{service}", "fault": fault, "reason": why})
                    continue
                ok, why = get_fault(fault).applies_to(targets[service], targets)
                if not ok:
                    skipped.append({"set": f"service:{service}", "fault": fault, "reason": why})
                    continue
                for seed in config.seeds:
                    rng = random.Random(f"{seed}:{service}:{fault}")
                    got.append(Scenario(system=system, fault=fault, target=service, seed=rng.randrange(2 ** 31),
                                        index=i))
            cases += [(f"service:{service}", c) for c in got[:config.limit]]
    return cases, skipped


def make_eval_policy(model_dir: str | Path, config: EvalConfig):
    """SoloGen over the rollout engine: the benchmark's prompt, the record keeps ids and logprobs."""
    from e2e_reme.simulators.policies.solo import SoloGen
    from .rollout import EngineChatModel, make_engine
    engine = make_engine(str(model_dir), kind=config.engine)
    return SoloGen(EngineChatModel(engine), temperature=config.temperature, max_tokens=config.max_tokens)


def _done(path: Path) -> dict[str, dict]:
    got: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                got[rec["id"]] = rec
            except (ValueError, KeyError):
                continue
    return got


def run_eval(model_dir: str | Path, config: EvalConfig, holdout, out: str | Path, *,
             on_event: Callable[[str, Any], None] | None = None, policy=None) -> dict:
    """Run (or resume) every held-out case with the model; return and write the results."""
    from e2e_reme.simulators.episode import EpisodeConfig, Slot, run_case
    from .model import check_model_dir

    emit = on_event or (lambda kind, payload: None)
    model_dir = check_model_dir(model_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"model": str(model_dir), "eval": asdict(config),
                                                 "holdout": asdict(holdout)}, indent=2, default=str))
    cases, skipped = eval_cases(config, holdout)
    if not cases:
        raise TrainError("no held-out case to evaluate: hold out a system or a service (data.holdout) whose "
                         f"faults of suite '{config.suite}' this host can run")
    jsonl = out / "episodes.jsonl"
    done = _done(jsonl)
    todo = [(s, c) for s, c in cases if _case_id(s, c) not in done]
    emit("eval_cases", {"total": len(cases), "todo": len(todo), "skipped": len(skipped)})
    if todo:
        policy = policy or make_eval_policy(model_dir, config)
        ep_cfg = EpisodeConfig(report_detail=config.report_detail, verify_load=config.verify_load)
        by_system: dict[str, list] = {}
        for s, c in todo:
            by_system.setdefault(c.system, []).append((s, c))
        tag = f"{int(time.time()) % 100000:05d}"
        for system, items in by_system.items():
            slot = Slot(system, backend=config.backend, name=f"{config.sandbox_prefix}-{tag}-{system[:6]}")
            emit("eval_slot", f"deploying {system}")
            try:
                slot.up()
                for set_name, sc in items:
                    rec = run_case(slot, sc, policy, out_dir=out / "episodes", config=ep_cfg,
                                   episode_id=_case_id(set_name, sc),
                                   progress=lambda step, sc=sc: emit("eval_step", f"{sc.id}: {step}"))
                    d = rec.to_dict()
                    d["eval_set"] = set_name
                    with jsonl.open("a") as f:
                        f.write(json.dumps(d, default=str) + "\n")
                    emit("eval_episode", d)
            finally:
                slot.down()
    done = _done(jsonl)
    records = [done[_case_id(s, c)] for s, c in cases if _case_id(s, c) in done]
    results = summarize(records, skipped)
    results.update(model=str(model_dir), suite=config.suite, seeds=list(config.seeds),
                   complete=len(records) == len(cases))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    chart = write_chart(results, out / "success.png")
    results["chart"] = str(chart) if chart else None
    return results


def _case_id(set_name: str, sc) -> str:
    return f"{set_name.replace(':', '-')}-{sc.system}-{sc.id}"


def _group(records: list[dict]) -> dict:
    from e2e_reme.simulators.benchmark import wilson
    n = len(records)
    infra = sum(r["outcome"] == "infra_failure" for r in records)
    judged = n - infra
    succ = sum(r["outcome"] == "success" for r in records)
    stages: dict[str, int] = {}
    for r in records:
        if r["outcome"] == "failure":
            k = STAGE_NAMES.get(r.get("stage"), r.get("stage") or "?")
            stages[k] = stages.get(k, 0) + 1
        elif r["outcome"] == "injection_failure":
            stages["injection"] = stages.get("injection", 0) + 1
    prompt = [r["tokens"].get("prompt") for r in records if (r.get("tokens") or {}).get("prompt") is not None]
    comp = [r["tokens"].get("completion") for r in records if (r.get("tokens") or {}).get("completion") is not None]
    return {"cases": n, "successes": succ, "infra_failures": infra,
            "success_rate": round(succ / judged, 4) if judged else 0.0, "ci95": wilson(succ, judged),
            "failure_stages": dict(sorted(stages.items())),
            "prompt_tokens_per_case": round(sum(prompt) / len(prompt), 1) if prompt else None,
            "completion_tokens_per_case": round(sum(comp) / len(comp), 1) if comp else None}


def summarize(records: list[dict], skipped: list[dict] = ()) -> dict:
    per_fault = {f: _group([r for r in records if r["scenario"]["fault"] == f])
                 for f in dict.fromkeys(r["scenario"]["fault"] for r in records)}
    per_set = {s: _group([r for r in records if r.get("eval_set") == s])
               for s in dict.fromkeys(r.get("eval_set") for r in records)}
    per_set_fault = {s: {f: _group([r for r in records if r.get("eval_set") == s and r["scenario"]["fault"] == f])
                         for f in dict.fromkeys(r["scenario"]["fault"] for r in records if r.get("eval_set") == s)}
                     for s in per_set}
    return {"overall": _group(records), "per_fault": per_fault, "per_set": per_set,
            "per_set_fault": per_set_fault, "skipped": list(skipped)}


def write_chart(results: dict, path: Path) -> Path | None:
    """Held-out success per fault type (95 % interval), one bar group per set."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sets = list(results["per_set_fault"])
    faults = list(results["per_fault"])
    if not sets or not faults:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(faults) + 2), 3.8))
    width = 0.8 / len(sets)
    for k, s in enumerate(sets):
        xs, ys, lo, hi = [], [], [], []
        for i, f in enumerate(faults):
            g = results["per_set_fault"][s].get(f)
            if not g or not g["cases"]:
                continue
            xs.append(i + k * width - 0.4 + width / 2)
            ys.append(g["success_rate"])
            lo.append(g["success_rate"] - g["ci95"][0])
            hi.append(g["ci95"][1] - g["success_rate"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=s)
    ax.set_xticks(range(len(faults)), faults, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out success (95 % CI)")
    o = results["overall"]
    ax.set_title(f"execution success on held-out cases: {o['success_rate']:.0%} of {o['cases']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
