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
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

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


__all__ = ["BLAME", "Judge", "Judgement", "reward_of"]
