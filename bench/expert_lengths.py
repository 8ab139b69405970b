"""How long the expert runbook's answers are, in Gemma tokens (issue 29, "Breadth"): the
answer an SFT trace teaches (`train.format.answer_text(expert_playbook(report))`), for
every fault type of the catalog on each system where it applies, from REAL reports.

    # 1. Gather reports: inject each fault in a live nspawn sandbox, build the full report
    #    (as an episode does), recover. Writes runs/expert-reports/<system>/<fault>__<service>.json
    #    and a compact copy (the runbook's input) under tests/data/expert_reports/.
    .venv/bin/python bench/expert_lengths.py gather [--system boutique] [--per-system 2]

    # Check live that the runbook fixes those cases (whole episodes, the verifier's verdict).
    .venv/bin/python bench/expert_lengths.py verify [--system boutique] [--fault network-loss]

    # 2. Measure from the stored reports (no sandbox): a table, and the column `--label`
    #    (before/after) merged into bench/results/expert_lengths.json.
    .venv/bin/python bench/expert_lengths.py measure --label before --rev <commit before the rewrite>
    .venv/bin/python bench/expert_lengths.py measure --label after

Tokens are counted with the imported Gemma 3 tokenizer, whole vocabulary
(runs/models/gemma3-270m): a trimmed vocabulary whose corpus holds the runbook's source
(`make model` trims with it) tokenises these answers exactly the same; the stale trim of
another runbook may not, so it is reported beside it (`--trimmed`) only for reference.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "runs" / "expert-reports"
COMPACT = ROOT / "tests" / "data" / "expert_reports"
RESULT = ROOT / "bench" / "results" / "expert_lengths.json"
SYSTEMS = ("simple-micro", "boutique", "train-ticket")
MODELS = {"gemma3": ROOT / "runs" / "models" / "gemma3-270m",
          "gemma3-v16k": ROOT / "runs" / "models" / "gemma3-270m-v16k"}


# ---- gathering real reports -------------------------------------------------------------------

def _pick(targets: dict, cls, per_system: int, rng: random.Random) -> list[str]:
    ok = sorted(n for n, t in targets.items() if cls.applies_to(t, targets)[0])
    redis = [n for n in ok if targets[n].kind == "redis"]
    picked = rng.sample(ok, min(per_system, len(ok)))
    if redis and not set(redis) & set(picked):      # a redis answer differs: keep one if it applies
        picked[-1:] = [redis[0]]
    return sorted(picked)


def _one(sb, dep, name: str, service: str, seed: int) -> dict | str:
    """The full report of one live fault (or why there is none); the fault recovered."""
    from e2e_reme.simulators.errors import FaultError
    from e2e_reme.simulators.faults import forget_faults, make_fault, recover_all
    from e2e_reme.simulators.reports import build_report
    from e2e_reme.simulators.systems.deploy import wait_healthy
    f = make_fault(name, dep.targets[service], dep.targets, seed=seed)
    try:
        try:
            f.inject(sb)
        except FaultError as e:
            return f"not injected: {e}"
        t0 = time.monotonic()
        while not f.is_active(sb):
            if time.monotonic() - t0 > 20:
                return "not active after 20 s"
            time.sleep(0.2)
        return build_report(sb, dep, [f], "full", window_s=1.5).to_dict()
    finally:
        try:
            recover_all(sb)
            forget_faults(sb)
            wait_healthy(sb, dep, timeout_s=60)
        except Exception:      # noqa: BLE001 -- whatever failed, a reset restores the deployment
            sb.reset()
            forget_faults(sb)
            wait_healthy(sb, dep, timeout_s=90)


def compact(system: str, report: dict) -> dict:
    """What the runbook reads of a report (its input), and where it came from."""
    from e2e_reme.simulators.reports import DiagnosisReport
    r = DiagnosisReport(**{**report, "symptoms": tuple(report["symptoms"]), "logs": tuple(report.get("logs") or ())})
    return {"system": system, "runbook_input": r.runbook_input()}


def gather(systems: list[str], per_system: int, faults: list[str] | None, prefix: str) -> None:
    from e2e_reme.simulators import create_sandbox
    from e2e_reme.simulators.faults import fault_available, fault_catalog, get_fault
    from e2e_reme.simulators.systems.deploy import deploy, wait_healthy
    from e2e_reme.simulators.systems.spec import load_system
    names = faults or sorted(fault_catalog())
    COMPACT.mkdir(parents=True, exist_ok=True)
    for system in systems:
        spec = load_system(system)
        with create_sandbox("nspawn", nodes=spec.nodes, name=f"{prefix}-{system[:5]}-{secrets.token_hex(2)}") as sb:
            t0 = time.monotonic()
            dep = deploy(sb, system)
            sb.checkpoint()
            wait_healthy(sb, dep, timeout_s=120)
            print(f"{system}: deployed in {time.monotonic() - t0:.0f} s", flush=True)
            rng = random.Random(f"expert-lengths:{system}")
            for name in names:
                ok, why = fault_available(name, "nspawn")
                if not ok:
                    print(f"  {name}: unavailable here ({why[:80]})", flush=True)
                    continue
                for i, service in enumerate(_pick(dep.targets, get_fault(name), per_system, rng)):
                    t1 = time.monotonic()
                    rep = _one(sb, dep, name, service, seed=7 + i)
                    if isinstance(rep, str):
                        print(f"  {name} on {service}: {rep}", flush=True)
                        continue
                    out = REPORTS / system / f"{name}__{service}.json"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(rep, indent=1, default=str))
                    (COMPACT / f"{system}__{name}__{service}.json").write_text(
                        json.dumps(compact(system, rep), indent=1, default=str) + "\n")
                    print(f"  {name} on {service}: report in {time.monotonic() - t1:.0f} s", flush=True)


# ---- verifying: the runbook's answers fix the same cases live ----------------------------------

def verify(systems: list[str], faults: list[str] | None, prefix: str, load: bool) -> list[dict]:
    """A whole episode (inject, report, the runbook's playbook, the verifier) per stored
    case of these systems; one line per case, and runs/expert-reports/verify-<system>.json."""
    from e2e_reme.simulators import create_sandbox
    from e2e_reme.simulators.episode import EpisodeConfig, Scenario, run_episode
    from e2e_reme.simulators.policies import make_policy
    from e2e_reme.simulators.systems.deploy import deploy, wait_healthy
    from e2e_reme.simulators.systems.spec import load_system
    rows = []
    for system in systems:
        cases = [(ri["fault_kind"], ri["service"]) for c, ri in stored_inputs() if c.startswith(system + "/")
                 and (not faults or ri["fault_kind"] in faults)]
        if not cases:
            continue
        out, done = REPORTS / f"verify-{system}", []
        with create_sandbox("nspawn", nodes=load_system(system).nodes,
                            name=f"{prefix}-{system[:5]}-{secrets.token_hex(2)}") as sb:
            dep = deploy(sb, system)
            sb.checkpoint()
            wait_healthy(sb, dep, timeout_s=120)
            for i, (fault, service) in enumerate(cases):
                rec = run_episode(sb, dep, Scenario(system, fault, service, seed=7, index=i), make_policy("runbook"),
                                  out_dir=out, config=EpisodeConfig(verify_load=load))
                failed = [c["name"] for c in (rec.verdict or {}).get("checks", []) if not c["passed"]]
                row = {"case": f"{system}/{fault}/{service}", "outcome": rec.outcome, "stage": rec.stage,
                       "failed_checks": failed, "reason": (rec.reason or "")[:300],
                       "seconds": rec.timings.get("total")}
                done.append(row)
                print(f"  {row['case']:55} {rec.outcome:18} {rec.stage:8} {' '.join(failed)} {row['reason'][:120]}",
                      flush=True)
        (REPORTS / f"verify-{system}.json").write_text(json.dumps(done, indent=1) + "\n")
        rows += done
    return rows


# ---- measuring ------------------------------------------------------------------------------

def stored_inputs(where: Path = COMPACT) -> list[tuple[str, dict]]:
    """(system/fault/service, runbook input) of every stored compact report, sorted."""
    out = []
    for p in sorted(where.glob("*.json")):
        d = json.loads(p.read_text())
        ri = d["runbook_input"]
        out.append((f"{d['system']}/{ri['fault_kind']}/{ri['service']}", ri))
    return out


def _stats(xs: list[int]) -> dict:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, max(0, -(-95 * len(xs) // 100) - 1))]     # nearest rank
    return {"n": len(xs), "median": statistics.median(xs), "p95": p95, "max": xs[-1]}


def runbook_at(rev: str | None):
    """`expert_playbook` of the working tree, or of the runbook as committed at `rev`."""
    if not rev:
        from e2e_reme.simulators.policies.expert import expert_playbook
        return expert_playbook, "working tree"
    import subprocess
    import types
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    src = subprocess.run(["git", "show", f"{commit}:simulators/policies/expert.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    mod = types.ModuleType(f"expert_at_{commit[:10]}")
    sys.modules[mod.__name__] = mod      # dataclasses look their module up
    exec(compile(src, f"{commit[:10]}:simulators/policies/expert.py", "exec"), mod.__dict__)  # noqa: S102 -- our own committed source
    return mod.expert_playbook, commit


def measure(label: str, trimmed: bool, rev: str | None = None) -> dict:
    from e2e_reme.train.format import answer_text
    from transformers import AutoTokenizer
    expert_playbook, runbook = runbook_at(rev)
    cases = stored_inputs()
    if not cases:
        sys.exit(f"no stored reports under {COMPACT}: run `bench/expert_lengths.py gather` first")
    toks = {k: AutoTokenizer.from_pretrained(str(p), local_files_only=True) for k, p in MODELS.items()
            if trimmed or k == "gemma3"}
    per_case = {}
    for case, ri in cases:
        text = answer_text(expert_playbook(ri))
        per_case[case] = {k: len(t(text, add_special_tokens=False)["input_ids"]) for k, t in toks.items()}
        per_case[case]["chars"] = len(text)
    column = {"label": label, "runbook": runbook, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": per_case,
              "tokenizers": {k: str(MODELS[k]) for k in toks}}
    for k in [*toks, "chars"]:
        by_fault: dict[str, list[int]] = {}
        for case, n in per_case.items():
            by_fault.setdefault(case.split("/")[1], []).append(n[k])
        column[k] = {"overall": _stats([n[k] for n in per_case.values()]),
                     "per_fault": {f: _stats(v) for f, v in sorted(by_fault.items())}}
    return column


def save(column: dict) -> dict:
    data = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    data.setdefault("what", "token length of the expert runbook's answer (fenced YAML as an SFT trace holds it), "
                            "per fault type over real reports: tests/data/expert_reports/")
    data.setdefault("command", ".venv/bin/python bench/expert_lengths.py measure --label <before|after>")
    data[column["label"]] = column
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(data, indent=1) + "\n")
    return data


def table(data: dict, tok: str = "gemma3") -> str:
    labels = [l for l in ("before", "after") if l in data] or [k for k in data if isinstance(data[k], dict)]
    faults = sorted({f for l in labels for f in data[l][tok]["per_fault"]})
    head = f"{'fault':18} {'n':>3} " + " ".join(f"{l + ' med/p95/max':>22}" for l in labels)
    rows = [f"{tok} tokens", head]
    for f in [*faults, "overall"]:
        cells, n = [], ""
        for l in labels:
            s = data[l][tok]["overall"] if f == "overall" else data[l][tok]["per_fault"].get(f)
            n = s["n"] if s else n
            cells.append(f"{s['median']:>8g}/{s['p95']:>5}/{s['max']:>5}" if s else f"{'-':>22}")
        rows.append(f"{f:18} {n:>3} " + " ".join(f"{c:>22}" for c in cells))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gather", help="inject each fault live and store its full report")
    g.add_argument("--system", action="append", choices=SYSTEMS, help="repeatable; default: all three")
    g.add_argument("--fault", action="append", help="repeatable; default: the whole catalog")
    g.add_argument("--per-system", type=int, default=2, help="services per fault and system")
    g.add_argument("--prefix", default="xl", help="sandbox name prefix")
    v = sub.add_parser("verify", help="run the runbook live (whole episodes, judged) on the stored cases")
    v.add_argument("--system", action="append", choices=SYSTEMS, help="repeatable; default: all three")
    v.add_argument("--fault", action="append", help="repeatable; default: every stored one")
    v.add_argument("--prefix", default="xlv", help="sandbox name prefix")
    v.add_argument("--no-load", action="store_true", help="judge without the SLO load window")
    m = sub.add_parser("measure", help="token lengths of the runbook's answers to the stored reports")
    m.add_argument("--label", default="after")
    m.add_argument("--trimmed", action="store_true", help="also count with the trimmed vocabulary (v16k)")
    m.add_argument("--rev", help="the runbook as committed at this git revision (default: the working tree)")
    a = ap.parse_args()
    if a.cmd == "gather":
        gather(a.system or list(SYSTEMS), a.per_system, a.fault, a.prefix)
    elif a.cmd == "verify":
        rows = verify(a.system or list(SYSTEMS), a.fault, a.prefix, not a.no_load)
        bad = [r for r in rows if r["outcome"] != "success"]
        print(f"{len(rows) - len(bad)} of {len(rows)} fixed")
        sys.exit(1 if bad else 0)
    else:
        data = save(measure(a.label, a.trimmed, a.rev))
        print(table(data))
        print(f"written: {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
