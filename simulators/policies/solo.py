"""SoloGen (MicroRemed's first reference method): one prompt, one answer, executed once.

    policy = make_policy("solo", model="qwen2.5-7b-instruct", base_url="http://127.0.0.1:8000/v1")
    policy = make_policy("solo", model="/models/e2e-reme-1.5b")      # a local checkpoint
"""

from __future__ import annotations

from typing import Any

from e2e_reme.simulators.policies.base import Generation, PolicyContext, TrialFeedback, register_policy
from e2e_reme.simulators.policies.models import ChatModel, as_model
from e2e_reme.simulators.policies.prompt import build_messages


class SoloGen:
    name = "solo"
    max_trials = 1

    def __init__(self, model: ChatModel, temperature: float = 0.0, max_tokens: int = 1024,
                 examples: tuple[tuple[Any, str], ...] = ()):
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.examples = tuple(examples)    # (report, answer) pairs shown first: few-shot

    def generate(self, ctx: PolicyContext, feedback: list[TrialFeedback]) -> Generation:
        # A single trial by definition: feedback, if a runner passes any, is not shown.
        messages = build_messages(ctx.report, ctx.inventory_hosts, mode="solo", examples=self.examples)
        r = self.model.chat(messages, temperature=self.temperature, max_tokens=self.max_tokens, seed=ctx.seed)
        return Generation(text=r.text, messages=messages, prompt_tokens=r.prompt_tokens,
                          completion_tokens=r.completion_tokens, model=self.model.name, latency_s=r.latency_s,
                          extra={"finish_reason": r.finish_reason, "model_calls": 1,
                                 **{k: r.raw[k] for k in ("prompt_ids", "completion_ids", "logprobs") if k in r.raw}})


def model_option(policy: str, model: Any, base_url: str | None, api_key: str | None) -> ChatModel:
    """Resolve a policy's model option, with an error that names the policy."""
    if model is None and not base_url:
        raise ValueError(f"policy '{policy}' needs a model: model=DIR (a local Hugging Face model directory), "
                         f"or model=NAME with base_url=URL (an OpenAI-compatible endpoint)")
    return as_model(model, base_url=base_url, api_key=api_key)


@register_policy("solo")
def make_solo(model: ChatModel | str | None = None, base_url: str | None = None, api_key: str | None = None,
              temperature: float = 0.0, max_tokens: int = 1024, **unknown: Any) -> SoloGen:
    if unknown:
        raise ValueError(f"policy 'solo' does not take {', '.join(unknown)}; its options: model, base_url, "
                         f"api_key, temperature, max_tokens")
    return SoloGen(model_option("solo", model, base_url, api_key), float(temperature), int(max_tokens))
