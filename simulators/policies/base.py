"""What a remediation policy is: given a diagnosis report and the sandbox's inventory, write
a playbook (as raw text, the way a model answers). That is the whole contract:

    class MyPolicy:
        name = "mine"
        max_trials = 1                      # > 1: the runner executes and feeds back, then asks again
        def generate(self, ctx: PolicyContext, feedback: list[TrialFeedback]) -> Generation: ...

    @register_policy("mine")                # then `remed bench --policy mine`
    def make_mine(**options) -> Policy: ...

The episode runner owns everything around it: it extracts the YAML from `Generation.text`,
gates, checks and executes it, and, for a multi-trial policy, tells it what happened
through a `TrialFeedback` carrying only a *weak* health signal (service states, an error
rate), never the verifier's verdict. A policy never touches the sandbox itself except
through `ctx.probe`, a read-only, allow-listed command runner (None where not offered).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable


@dataclass(frozen=True)
class PolicyContext:
    report: Any                              # simulators.reports.DiagnosisReport (possibly degraded/noised)
    inventory_hosts: tuple[str, ...]         # the only hosts a playbook may target: ("n0", "n1")
    system: str
    seed: int = 0
    probe: Callable[[str, str], str] | None = None    # probe(host, command) -> truncated output
    episode_id: str = ""


@dataclass(frozen=True)
class TrialFeedback:
    trial: int                               # 1-based
    stage: str                               # where the execution pipeline stopped ("done" if it ran through)
    error_class: str | None                  # the pipeline's error class, None when it ran through
    reason: str                              # one line
    execution: str                           # a short summary: failed tasks and their messages, the recap
    health: dict                             # weak signal: {"ok": bool, "services": {name: state}, "error_rate": float}


@dataclass
class Generation:
    text: str                                # raw output; the playbook is extracted from it by the runner
    messages: list[dict] = field(default_factory=list)   # the transcript as sent (chat messages)
    prompt_tokens: int | None = None         # from the real tokenizer or the API's usage; None if unknown
    completion_tokens: int | None = None
    tool_calls: list[dict] = field(default_factory=list) # probe calls: {"host", "command", "output"}
    model: str = ""
    latency_s: float = 0.0
    extra: dict = field(default_factory=dict)             # e.g. prompt/completion token ids and logprobs


@runtime_checkable
class Policy(Protocol):
    name: str
    max_trials: int

    def generate(self, ctx: PolicyContext, feedback: list[TrialFeedback]) -> Generation: ...


_POLICIES: dict[str, Callable[..., Policy]] = {}


def register_policy(name: str) -> Callable[[Callable[..., Policy]], Callable[..., Policy]]:
    def deco(factory: Callable[..., Policy]) -> Callable[..., Policy]:
        _POLICIES[name] = factory
        return factory
    return deco


def policy_catalog() -> dict[str, Callable[..., Policy]]:
    from e2e_reme.simulators.policies import runbook, solo, think  # noqa: F401  (registration on import)
    return dict(sorted(_POLICIES.items()))


def make_policy(name: str, **options: Any) -> Policy:
    """Build a registered policy; an unknown name raises ValueError listing the catalog."""
    catalog = policy_catalog()
    if name not in catalog:
        raise ValueError(f"unknown policy '{name}'; the catalog has: {', '.join(catalog)}")
    return catalog[name](**options)
