"""The expert runbook as a policy (policies/expert.py): it needs a full report; given a
degraded one it answers with prose, and the episode records a failure at the extract stage."""

from __future__ import annotations

import time

from e2e_reme.simulators.policies.expert import expert_playbook
from e2e_reme.simulators.policies.base import Generation, PolicyContext, TrialFeedback, register_policy


class RunbookPolicy:
    name = "runbook"
    max_trials = 1

    def generate(self, ctx: PolicyContext, feedback: list[TrialFeedback]) -> Generation:
        t = time.monotonic()
        try:
            text = "```yaml\n" + expert_playbook(ctx.report.runbook_input()) + "```\n"
        except (ValueError, KeyError) as e:
            text = f"The runbook cannot act on this report: {e}"
        return Generation(text=text, model="runbook", latency_s=time.monotonic() - t,
                          prompt_tokens=0, completion_tokens=0)


@register_policy("runbook")
def make_runbook(**options) -> RunbookPolicy:
    if options:
        raise ValueError(f"policy 'runbook' takes no options, got: {', '.join(options)}")
    return RunbookPolicy()
