"""Remediation policies: the expert runbook, SoloGen and ThinkRemed over any chat model."""

from .base import Generation, Policy, PolicyContext, TrialFeedback, make_policy, policy_catalog, register_policy

__all__ = ["Generation", "Policy", "PolicyContext", "TrialFeedback", "make_policy", "policy_catalog",
           "register_policy"]
