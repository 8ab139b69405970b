"""Remediation policies: the expert runbook, SoloGen and ThinkRemed over any chat model, and a
fixed answer (a completion sampled elsewhere, judged like any other)."""

from .base import Generation, Policy, PolicyContext, TrialFeedback, make_policy, policy_catalog, register_policy
from .fixed import FixedPolicy

__all__ = ["FixedPolicy", "Generation", "Policy", "PolicyContext", "TrialFeedback", "make_policy", "policy_catalog",
           "register_policy"]
