"""The judge: model completions scored by execution. The interface GRPO and serving use.

    judge = Judge(fleet)
    judged = judge(scenarios, completions, completion_ids)    # one Judgement per completion
    one = judge.step(scenario, completion)                    # the same for one (an env step)
    rewards = judge.rewards(prompts, completions, scenario=scenarios)   # TRL's reward-function shape

Every completion is the answer of a `FixedPolicy` in its own episode on the fleet: the
scenario's sandbox reset, the fault injected, the completion extracted, gated, executed by
the jailed controller and verified; the record is kept whole. Completions of one scenario
start from the same state (same deployment, fault, target and seed), so a group of samples
is comparable (GRPO's baseline is the group's mean).

The reward is the verdict: 1.0 for a verified fix, 0.0 for a failure of the policy at any
stage (no playbook, refused by the gate, failed run, not remediated). When the
infrastructure failed instead (the fault could not be injected, the sandbox stopped
answering, our pipeline or the verdict could not run) there is no reward (`None`): the
sample says nothing about the policy, and a trainer leaves it out rather than punish it.

Groups judged against the state their prompt describes (`Judge.groups`, what RL uses):

    results = judge.groups(scenarios, answer)     # answer(scenario, report) -> completions
    results[0].report_text, results[0].answers, results[0].judgements

A group is one job on one sandbox (one slot of one host, held from start to end): the
scenario is observed first (reset, inject, confirm, the diagnosis report, recover), the
report goes to `answer` (the rollout worker: it samples the group for THAT report, while
no fault runs), and each completion is then executed in the same sandbox after a reset and
a re-injection of the same scenario. The faults derive every identifier a report shows (a
transient unit, a stray file's name) from the scenario's seed, and the sandbox's addresses
are its own, so the re-injected state is the observed one. Before a completion runs, the
episode's own report is compared with the observed one on the identifiers it names
(`report_identifiers`: units, addresses, ports, paths); where they differ, the sample is
an infrastructure failure (`StateMismatch`, no reward), never the policy's.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from e2e_reme.simulators.episode import Scenario

from .sandbox_host import Job

# Who a record's outcome is on. "none": a success.
BLAME = {"success": "none", "failure": "policy", "injection_failure": "infrastructure",
         "infra_failure": "infrastructure"}


@dataclass(frozen=True)
class Judgement:
    """One completion judged by execution: its reward and the episode record behind it."""

    id: str
    reward: float | None     # None: the infrastructure failed, no reward either way
    outcome: str             # the record's: success | failure | injection_failure | infra_failure
    blame: str               # none | policy | infrastructure
    stage: str               # where the episode stopped ("done" on success)
    reason: str
    record: dict

    @property
    def success(self) -> bool:
        return self.outcome == "success"


def reward_of(record: dict) -> Judgement:
    """The judgement of one finished episode record."""
    outcome = record.get("outcome", "infra_failure")
    blame = BLAME.get(outcome, "infrastructure")
    reward = None if blame == "infrastructure" else (1.0 if outcome == "success" else 0.0)
    return Judgement(id=record["id"], reward=reward, outcome=outcome, blame=blame,
                     stage=record.get("stage", ""), reason=record.get("reason", ""), record=record)


class Judge:
    """Judges completions on a started `Fleet`; `policy` names them in the records."""

    def __init__(self, fleet, *, policy: str = "sampled"):
        self.fleet, self.policy = fleet, policy
        self._tag, self._n = secrets.token_hex(3), 0    # record ids unique across judges of one fleet

    def __call__(self, scenarios: Sequence[Scenario], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int] | None] | None = None) -> list[Judgement]:
        """One judgement per completion, in order; `scenarios[i]` is the case completion i
        answers. All run concurrently on the fleet's free slots."""
        if len(scenarios) != len(completions):
            raise ValueError(f"{len(completions)} completions for {len(scenarios)} scenarios: give one scenario "
                             "per completion (repeat a scenario for a group)")
        ids = list(completion_ids) if completion_ids is not None else [None] * len(completions)
        if len(ids) != len(completions):
            raise ValueError(f"{len(ids)} token-id lists for {len(completions)} completions")
        jobs = [self._job(s, c, t) for s, c, t in zip(scenarios, completions, ids)]
        got = {r["id"]: r for r in self.fleet.run(jobs)}
        return [reward_of(got[j.id]) for j in jobs]

    def step(self, scenario: Scenario, completion: str, completion_ids: Sequence[int] | None = None) -> Judgement:
        """One completion, one episode: the environment's step (every episode ends in it)."""
        return self([scenario], [completion], [completion_ids])[0]

    def rewards(self, prompts: Sequence[str], completions: Sequence[str], *, scenario: Sequence[Scenario],
                completion_ids: Sequence[Sequence[int]] | None = None, **_: object) -> list[float | None]:
        """TRL's reward-function shape: prompts and completions in, one reward each out (the
        scenarios ride along as a dataset column). None where the infrastructure failed."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        return [j.reward for j in self(scenario, completions, completion_ids)]

    def _job(self, scenario: Scenario, completion: str, ids: Sequence[int] | None) -> Job:
        self._n += 1
        return Job(id=f"{scenario.id}-j{self._tag}{self._n}", scenario=scenario, policy=self.policy, completion=completion,
                   completion_ids=tuple(ids) if ids is not None else None)


    def groups(self, scenarios: Sequence[Scenario], answer: Callable[[Scenario, dict], list[dict]],
               on_group: Callable[["GroupResult"], None] | None = None) -> list["GroupResult"]:
        """One group per scenario, each observed, answered and judged on one sandbox (the
        module docstring). `answer(scenario, report)` runs on the sandbox host, is
        picklable (a Ray actor handle inside), and returns the group: dicts with at least
        "text" (and "completion_ids" where known). Results in the scenarios' order;
        `on_group` sees each one as it finishes (progress)."""
        jobs = []
        for sc in scenarios:
            self._n += 1
            jobs.append(Job(id=f"{sc.id}-g{self._tag}{self._n}", scenario=sc, policy=self.policy,
                            group=Group(answer)))
        got = {}
        for r in self.fleet.run(jobs):
            got[r["id"]] = group_result(r)
            if on_group:
                on_group(got[r["id"]])
        return [got[j.id] for j in jobs]


# ---- groups: observe, answer, judge on one sandbox -------------------------------------------------

@dataclass(frozen=True)
class Group:
    """What a group job carries (sandbox_host.Job.group): who answers the observed report."""
    answer: Any                 # callable(scenario, report dict) -> list of completion dicts


@dataclass
class GroupResult:
    id: str
    report: dict | None                 # the observed report the group answered (None: never observed)
    report_text: str
    answers: list[dict]                 # what `answer` returned, in order
    judgements: list[Judgement]         # one per answer
    error: str = ""                     # why the group has no judgements (injection, sandbox, rollout)
    error_class: str = ""
    times: dict = field(default_factory=dict)    # observe, answer, execute (seconds, on the host)


def group_result(d: dict) -> GroupResult:
    """A group job's result (or a lost job's record: no judgements, the reason kept)."""
    return GroupResult(id=d["id"], report=d.get("report"), report_text=d.get("report_text") or "",
                       answers=list(d.get("answers") or []), judgements=[reward_of(r) for r in d.get("records") or []],
                       error=d.get("error") or ("" if "records" in d else d.get("reason", "lost")),
                       error_class=d.get("error_class") or ("" if "records" in d else d.get("error_class") or "Lost"),
                       times=dict(d.get("times") or {}))


# What names a thing a fix acts on, in a report's text: a unit, an address, a port, a path.
_IDENTIFIER = re.compile(r"[\w@.:-]+\.(?:service|scope|socket|timer|slice|mount)\b"
                         r"|\b\d{1,3}(?:\.\d{1,3}){3}\b"
                         r"|\b(?:port|dport|sport) \d+\b"
                         r"|(?<![\w.])/(?:[\w.@+-]+/)*[\w.@+-]+")


_REQUEST = re.compile(r"\b(?:GET|POST|PUT|DELETE|HEAD) /\S*")


def report_identifiers(report_text: str) -> list[str]:
    """The identifiers a report's text names (units, addresses, ports, paths), outside its
    recent log lines (a caller's ephemeral port is no identifier of the state) and the
    endpoints whose latency it measured (which is slowest varies). Process ids
    are left out: every start of a process gets a new one, and a fix stops a process by its
    unit (the expert runbook does)."""
    lines = []
    for line in report_text.splitlines():
        if line.startswith("Recent log lines of the service"):
            break
        lines.append(line)
    text = _REQUEST.sub("", "\n".join(lines))      # an endpoint measured is no identifier of the state
    return sorted(set(_IDENTIFIER.findall(text)))


class BoundPolicy:
    """A given completion (policies.FixedPolicy) that runs only in the state its prompt
    described: the episode's own report must name the identifiers the prompt's named;
    otherwise it answers nothing and says why (`state_mismatch` in the trial's extra), and
    the group marks the record an infrastructure failure."""
    max_trials = 1

    def __init__(self, inner, expected: list[str]):
        self.inner, self.expected, self.name = inner, list(expected), inner.name

    def generate(self, ctx, feedback):
        from e2e_reme.simulators.policies.base import Generation
        now = report_identifiers(ctx.report.to_text())
        if now != self.expected:
            gone, new = sorted(set(self.expected) - set(now)), sorted(set(now) - set(self.expected))
            return Generation(text="", model=self.name, prompt_tokens=0, completion_tokens=0,
                              extra={"state_mismatch": {"prompt_only": gone, "episode_only": new}})
        return self.inner.generate(ctx, feedback)


def _mismatch(rec: dict) -> dict | None:
    for t in rec.get("trials") or []:
        m = (t.get("extra") or {}).get("state_mismatch")
        if m:
            return m
    return None


def observe_case(slot, scenario: Scenario, config) -> tuple[dict, str]:
    """The scenario's diagnosis report on the slot's sandbox (reset, inject, confirm, build
    the report), the fault recovered after: (report dict, report text). Raises FaultError
    when the fault cannot be injected or confirmed, SandboxError when the sandbox fails."""
    from e2e_reme.simulators.errors import FaultError
    from e2e_reme.simulators.faults import forget_faults, make_fault, recover_all
    from e2e_reme.simulators.reports import build_report
    from e2e_reme.simulators.systems.deploy import wait_healthy
    if not slot.ready:
        slot.replace()
    sb, dep = slot.sb, slot.dep
    sb.reset()
    forget_faults(sb)
    wait_healthy(sb, dep, timeout_s=60)
    if scenario.target not in dep.targets:
        raise FaultError(f"scenario {scenario.id}: no service '{scenario.target}' in {dep.system}")
    fault = make_fault(scenario.fault, dep.targets[scenario.target], dep.targets, params=scenario.params or None,
                       seed=scenario.seed)
    try:
        fault.inject(sb)
        t0 = time.monotonic()
        while not fault.is_active(sb):
            if time.monotonic() - t0 > config.confirm_timeout_s:
                raise FaultError(f"{fault.name} on {scenario.target}: not active after {config.confirm_timeout_s:.0f} s")
            time.sleep(0.2)
        report = build_report(sb, dep, [fault], config.report_detail, window_s=config.report_window_s)
    finally:
        try:
            recover_all(sb)
        except Exception:
            sb.reset()
        forget_faults(sb)
    return report.to_dict(), report.to_text()


def run_group(slot, job: Job, *, out_dir: Path, config, on_record: Callable[[dict], None] = lambda d: None) -> dict:
    """A group job on one slot (the module docstring): observe, answer, then every answer
    judged in the same sandbox, each after a reset and a re-injection of the scenario."""
    from e2e_reme.simulators.episode import run_case
    from e2e_reme.simulators.errors import FaultError
    from e2e_reme.simulators.policies import FixedPolicy
    out = {"id": job.id, "outcome": "group", "scenario": asdict(job.scenario), "times": {}}
    t = time.monotonic()
    try:
        report, text = observe_case(slot, job.scenario, config)
    except FaultError as e:
        return {**out, "error_class": "InjectionFailure", "error": str(e)}
    except Exception as e:       # the sandbox stopped answering: the next job's reset replaces it
        slot.down(keep_lease=True)
        return {**out, "error_class": type(e).__name__, "error": f"observing the scenario failed: {e}"}
    out.update(report=report, report_text=text)
    out["times"]["observe"] = round(time.monotonic() - t, 2)
    t = time.monotonic()
    try:
        answers = list(job.group.answer(job.scenario, report))
    except Exception as e:       # the rollout worker was lost: the driver starts another
        return {**out, "error_class": "AnswerFailed", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    out["times"]["answer"] = round(time.monotonic() - t, 2)
    out["answers"] = answers
    expected, records = report_identifiers(text), []
    t = time.monotonic()
    for k, a in enumerate(answers):
        ids = a.get("completion_ids")
        policy = BoundPolicy(FixedPolicy(a["text"], name=job.policy, completion_ids=ids), expected)
        d = run_case(slot, job.scenario, policy, out_dir=out_dir, config=config, episode_id=f"{job.id}-{k}").to_dict()
        m = _mismatch(d)
        if m is not None:
            d.update(outcome="infra_failure", error_class="StateMismatch",
                     reason=f"the re-injected state is not the one the prompt described: {m}")
        on_record(d)
        records.append(d)
    out["times"]["execute"] = round(time.monotonic() - t, 2)
    out["records"] = records
    return out


__all__ = ["BLAME", "BoundPolicy", "Group", "GroupResult", "Judge", "Judgement", "group_result", "observe_case",
           "report_identifiers", "reward_of", "run_group"]
