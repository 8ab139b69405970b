"""Headroom before reinforcement fine-tuning: pass@k at temperature 1, per fault type, on
the training and the validation cases of an RL config.

    remed train passk --config configs/rl-cpu.yaml --k 8          # a table, and out/passk.json

RL learns only from groups whose completions sometimes succeed and sometimes fail: a fault
type where the model never succeeds in k samples (pass@k 0) gives it nothing, and one
where it always does (pass@1 near 1) has nothing left to gain. Each case is judged the way
RL judges it (cluster/judge.py `Judge.groups`: the judge observes the case, the model
samples `n` completions for that report at temperature 1, each runs in the same sandbox
after a re-injection), and pass@k is the unbiased estimator of Chen et al. (2021) from the
n samples of which c succeeded: 1 - C(n-c, k) / C(n, k). Masked samples (the
infrastructure failed) are left out of n; a case with fewer than k judged samples is
reported but has no pass@k. Training cases: one per distinct scenario of the RL config's
training cases (at most `max_cases` a fault type); validation cases: configs/splits.yaml's
validation plan.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from math import comb
from pathlib import Path


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of P(at least one of k samples succeeds) from n samples with c
    successes (k <= n)."""
    if k < 1 or k > n or c < 0 or c > n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def passk_cases(config, splits: tuple[str, ...] = ("train", "validation"), max_cases: int = 2,
                seed: int = 0) -> list[tuple[str, object]]:
    """(split, scenario) pairs: per fault type at most `max_cases` distinct training
    scenarios (drawn with `seed`), and the validation split's plan on this host."""
    out: list[tuple[str, object]] = []
    if "train" in splits:
        from .rl import training_cases
        by_fault: dict[str, list] = {}
        for c in training_cases(config):
            sc = c["scenario"]
            if sc not in by_fault.setdefault(sc.fault, []):
                by_fault[sc.fault].append(sc)
        rng = random.Random(seed)
        for fault in sorted(by_fault):
            scs = by_fault[fault]
            out += [("train", sc) for sc in rng.sample(scs, min(max_cases, len(scs)))]
    if "validation" in splits:
        from .splits import load_splits
        cases, _ = load_splits(config.data.splits or None).cases("validation", backends=config.fleet.host.backend)
        per: dict[str, int] = {}
        for c in cases:
            if per.get(c.scenario.fault, 0) < max_cases:
                per[c.scenario.fault] = per.get(c.scenario.fault, 0) + 1
                out.append(("validation", c.scenario))
    return out


def summarize(rows: list[dict], k: int) -> dict:
    """Per split and fault type: cases, judged samples, pass@1 and pass@k (means over the
    cases that have them)."""
    table: dict[str, dict[str, dict]] = {}
    for r in rows:
        t = table.setdefault(r["split"], {}).setdefault(r["fault"], {"cases": 0, "samples": 0, "successes": 0,
                                                                      "pass@1": [], f"pass@{k}": []})
        t["cases"] += 1
        t["samples"] += r["n"]
        t["successes"] += r["c"]
        if r["n"] >= 1:
            t["pass@1"].append(pass_at_k(r["n"], r["c"], 1))
        if r["n"] >= k:
            t[f"pass@{k}"].append(pass_at_k(r["n"], r["c"], k))
    for split in table.values():
        for t in split.values():
            for key in ("pass@1", f"pass@{k}"):
                t[key] = round(sum(t[key]) / len(t[key]), 4) if t[key] else None
    return table


def run_passk(config, k: int = 8, n: int | None = None, splits: tuple[str, ...] = ("train", "validation"),
              max_cases: int = 2, say=print, on_case=None) -> dict:
    """Judge `n` (default k) temperature-1 samples of the config's model per case; write
    and return {"k", "n", "model", "cases": [...], "table": {split: {fault: ...}}}.
    `on_case(total, group)`: progress, once before the first case (group None) and once a
    finished case."""
    from e2e_reme.cluster import Fleet, Judge
    from .errors import TrainError
    from .rl import ray_session
    from .rl_workers import Rollout

    n = n or k
    if k < 1 or n < k:
        raise TrainError(f"passk: k ({k}) must be at least 1 and n ({n}) at least k")
    config = config.absolute()
    config = replace(config, rollout=replace(config.rollout, group_size=n, expert_per_group=0))
    cases = passk_cases(config, splits, max_cases, config.seed)
    if not cases:
        raise TrainError("passk: no case to judge (no training trace and no validation case on this host)")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"passk: {len(cases)} case(s), {n} samples each at temperature 1, model {config.model}")
    rows = []
    with ray_session(config), Fleet(config.fleet).start(progress=say) as fleet:
        rollout = Rollout(config, out)
        try:
            tick = on_case or (lambda total, group: None)
            tick(len(cases), None)
            results = Judge(fleet, policy="passk").groups([sc for _, sc in cases], rollout.answer(0, config.seed),
                                                          on_group=lambda g: tick(len(cases), g))
        finally:
            rollout.close()
    for (split, sc), g in zip(cases, results):
        rewards = [j.reward for j in g.judgements if j.reward is not None]
        rows.append({"split": split, "scenario": sc.id, "system": sc.system, "fault": sc.fault, "target": sc.target,
                     "n": len(rewards), "c": int(sum(rewards)), "masked": len(g.judgements) - len(rewards),
                     "error": g.error or None,
                     "truncated": sum(a.get("finish_reason") == "length" for a in g.answers)})
    result = {"k": k, "n": n, "model": config.model, "cases": rows, "table": summarize(rows, k)}
    (out / "passk.json").write_text(json.dumps(result, indent=2))
    return result


__all__ = ["pass_at_k", "passk_cases", "run_passk", "summarize"]
