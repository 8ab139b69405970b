"""From review decisions to training data (`remed review export`, docs/serve.md "Review
decisions: database and export").

    manifest = export_reviews(ReviewStore(db), Path("runs/review-export"))

writes, under the output directory:

    preferences.jsonl                 one preference pair a line: for the same report (the
                                      same `report_sha256`), a playbook an operator approved
                                      and the verifier confirmed (executed, outcome success)
                                      as `chosen`, and one an operator rejected or whose
                                      execution the verifier judged a failure as `rejected`
    demonstrations/episodes.jsonl     every executed decision the verifier confirmed, as an
                                      episode record (simulators/episode.py's schema, policy
                                      "review"): train/data.py reads it as a verified trace
                                      when `data.reviews` names this directory
    manifest.json                     counts, the database, the time, what was skipped and why

Nothing is dropped silently: an interrupted decision, an infrastructure failure (not the
playbook's fault), an answer without a playbook, a pair whose two sides are the same text,
each is counted in the manifest's `skipped`. Every pair and demonstration carries the split
of its system and service (train/splits.py); the SFT loader refuses validation and test ones,
and a preference trainer must keep to `split == "train"` likewise.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from .review import Decision, ReviewStore

REVIEW_POLICY = "review"             # the policy name of a demonstration record (train/data.py)
EPISODE_SCHEMA = 1                   # simulators/episode.py SCHEMA_VERSION


def _split_of(system: str | None, service: str | None) -> str:
    try:
        from e2e_reme.train.splits import load_splits
        return load_splits().split_of(system, service)
    except Exception as e:              # a splits file that cannot be read: say so, never guess "train"
        return f"unknown ({str(e)[:120]})"


def _hosts(report: dict) -> tuple[str, ...]:
    hosts = list((report.get("placement") or {}).keys())
    return tuple(sorted(hosts, key=lambda h: (len(h), h)))


def _prompt(report: dict) -> list[dict] | None:
    """The benchmark's solo prompt for the report (what the served model was shown)."""
    from e2e_reme.simulators.policies.prompt import build_messages
    try:
        return build_messages(report, _hosts(report), mode="solo")
    except Exception:
        return None


def _extracted(d: Decision) -> str | None:
    """The playbook that ran: the pipeline's extracted text where the result (or the dry
    run) has it, else extracted from the answer as the pipeline does."""
    for doc in (d.result, d.dry_run):
        got = (doc or {}).get("playbook")
        if isinstance(got, str) and got.strip():
            return got
    from e2e_reme.simulators.playbook.execution import extract_yaml
    return extract_yaml(d.playbook)


def demonstration(d: Decision, db: str = "") -> dict:
    """An executed, verified decision as an episode record (simulators/episode.py
    `EpisodeRecord.to_dict()`, policy "review")."""
    return {
        "id": f"review-{d.id}",
        "scenario": {"system": d.system, "fault": d.fault, "target": d.service, "seed": 0, "params": {},
                     "index": 0},
        "policy": REVIEW_POLICY, "outcome": d.outcome, "stage": "done", "error_class": None, "reason": "",
        "backend": "", "sandbox": d.sandbox or "", "config": {"source": d.source, "release": d.release},
        "report": d.report, "report_text": "", "noise": None, "trials": [], "playbook": _extracted(d),
        "verdict": d.verdict, "timings": {"generate": d.generate_s} if d.generate_s is not None else {},
        "tokens": d.tokens or {"prompt": 0, "completion": 0}, "started_at": d.created_at,
        "finished_at": d.updated_at, "attempts": 1, "schema": EPISODE_SCHEMA,
        "review": {"decision": d.id, "operator": d.operator, "release": d.release, "source": d.source,
                   "report_sha256": d.report_sha256, "db": db, "split": _split_of(d.system, d.service)},
    }


def _rejected_why(d: Decision) -> str | None:
    if d.status == "rejected":
        return f"rejected by {d.operator or 'an operator'}: {d.reason or ''}".strip()
    if d.status == "executed" and d.outcome == "failure":
        return "executed; the verifier judged it a failure"
    return None


def _chosen(d: Decision) -> bool:
    return d.status == "executed" and d.outcome == "success"


def _skip_reason(d: Decision) -> str | None:
    """Why a decision gives neither a chosen nor a rejected side."""
    if d.status == "proposed":
        return "still proposed (no decision yet)"
    if d.status == "executing":
        return "still executing"
    if d.status == "interrupted":
        return "interrupted (never verified)"
    if d.status == "executed" and d.outcome == "infra_failure":
        return "infrastructure failure (not the playbook's fault)"
    if d.status == "executed" and d.outcome not in ("success", "failure"):
        return f"executed without a known outcome ({d.outcome})"
    return None


def preference_pairs(decisions: Iterable[Decision], skipped: dict[str, int]) -> list[dict]:
    """Every (chosen, rejected) pair of distinct answers to the same report."""
    groups: dict[str, list[Decision]] = defaultdict(list)
    for d in decisions:
        groups[d.report_sha256].append(d)
    pairs = []
    for sha, ds in groups.items():
        chosen = [d for d in ds if _chosen(d)]
        rejected = [(d, why) for d in ds if (why := _rejected_why(d))]
        if chosen and not rejected or rejected and not chosen:
            key = "report without a rejected answer" if chosen else "report without a verified answer"
            skipped[key] = skipped.get(key, 0) + 1
        for c in chosen:
            for r, why in rejected:
                if c.playbook.strip() == r.playbook.strip():
                    skipped["same answer both chosen and rejected"] = skipped.get(
                        "same answer both chosen and rejected", 0) + 1
                    continue
                pairs.append({"report_sha256": sha, "report": c.report, "prompt": _prompt(c.report),
                              "chosen": c.playbook, "rejected": r.playbook,
                              "ids": {"chosen": c.id, "rejected": r.id},
                              "release": {"chosen": c.release, "rejected": r.release},
                              "rejected_why": why, "system": c.system, "service": c.service, "fault": c.fault,
                              "split": _split_of(c.system, c.service)})
    return pairs


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export_reviews(store: ReviewStore, out: str | Path) -> dict:
    """Write the pairs, the demonstrations and the manifest under `out`; return the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    decisions = list(store.all())
    skipped: dict[str, int] = {}
    for d in decisions:
        why = _skip_reason(d)
        if why:
            skipped[why] = skipped.get(why, 0) + 1
    pairs = preference_pairs(decisions, skipped)
    demos = []
    for d in decisions:
        if not _chosen(d):
            continue
        rec = demonstration(d, str(store.path))
        if not rec["playbook"]:
            skipped["verified answer without a playbook to extract"] = skipped.get(
                "verified answer without a playbook to extract", 0) + 1
            continue
        demos.append(rec)
    _write_jsonl(out / "preferences.jsonl", pairs)
    _write_jsonl(out / "demonstrations" / "episodes.jsonl", demos)
    by_split = lambda rows, get: {s: sum(1 for r in rows if get(r) == s) for s in sorted({get(r) for r in rows})}
    manifest = {
        "db": str(store.path.resolve()), "schema_version": store.schema_version(),
        "exported_at": time.time(), "exported_at_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "decisions": len(decisions),
        "by_status": {s: sum(1 for d in decisions if d.status == s) for s in sorted({d.status for d in decisions})},
        "preference_pairs": len(pairs), "demonstrations": len(demos),
        "pairs_by_split": by_split(pairs, lambda r: r["split"]),
        "demonstrations_by_split": by_split(demos, lambda r: r["review"]["split"]),
        "skipped": dict(sorted(skipped.items())),
        "files": {"preferences": "preferences.jsonl", "demonstrations": "demonstrations/episodes.jsonl"},
        "use": "SFT: data.reviews: [<this directory>] (validation/test splits are refused there); "
               "preference pairs: train on split == 'train' only",
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest
