"""Remediation policies: the expert runbook, SoloGen and ThinkRemed over any chat model, and a
fixed answer (a completion sampled elsewhere, judged like any other)."""

from e2e_reme.simulators.policies.base import Generation, Policy, PolicyContext, TrialFeedback, make_policy, policy_catalog, register_policy
from e2e_reme.simulators.policies.fixed import FixedPolicy

__all__ = ["FixedPolicy", "Generation", "Policy", "PolicyContext", "TrialFeedback", "make_policy", "policy_catalog",
           "register_policy"]
