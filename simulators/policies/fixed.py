"""A policy whose answer is given: a completion a model sampled elsewhere (a GRPO group, a
served request) or a playbook written by hand (the adversarial inputs of the tests).

It is judged exactly like any other policy's answer: the episode extracts, gates, executes
and verifies it. One trial only, since there is no model to ask again. The token ids of a
sampled completion ride along in the generation's `extra`, so the episode record keeps
what the trainer needs to attribute the reward to tokens.
"""

from __future__ import annotations

from e2e_reme.simulators.policies.base import Generation, PolicyContext, TrialFeedback


class FixedPolicy:
    max_trials = 1

    def __init__(self, text: str, *, name: str = "fixed", completion_ids: list[int] | None = None,
                 prompt_tokens: int | None = None):
        self.text, self.name = text, name
        self.completion_ids = list(completion_ids) if completion_ids is not None else None
        self.prompt_tokens = prompt_tokens

    def generate(self, ctx: PolicyContext, feedback: list[TrialFeedback]) -> Generation:
        extra = {"completion_ids": self.completion_ids} if self.completion_ids is not None else {}
        return Generation(text=self.text, model=self.name, prompt_tokens=self.prompt_tokens,
                          completion_tokens=len(self.completion_ids) if self.completion_ids is not None else None,
                          extra=extra)


__all__ = ["FixedPolicy"]
