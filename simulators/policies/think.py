"""ThinkRemed (MicroRemed's second reference method): a coordinator that may probe the
hosts with read-only commands before it writes the playbook, and that is retried with
feedback up to a trial budget.

In one trial the coordinator loops: ask the model; if it asks for probes (OpenAI tool calls
named `probe` with {"host", "command"}, or `PROBE host: command` lines in its text) run them
through `ctx.probe` and ask again; at most `max_probes` probes a trial, after which the model
is asked for the playbook without tools and whatever it says is the answer. An answer with
a ```yaml block is final even if it also has PROBE lines. Execution and verification are the
runner's (the "execution" and "verification agents"): on a later trial the runner passes
`feedback`, which the conversation shows after the playbook it judged.

Within an episode (keyed by `ctx.episode_id`) the policy remembers its earlier answers and
probe results, so trial k sees what it wrote and saw in trials 1..k-1; trial 1 (no
feedback) starts afresh.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from typing import Any

from e2e_reme.simulators.policies.base import Generation, PolicyContext, TrialFeedback, register_policy
from e2e_reme.simulators.policies.models import ChatModel, ChatResponse, ModelError
from e2e_reme.simulators.policies.prompt import append_user, build_messages
from e2e_reme.simulators.policies.solo import model_option
from e2e_reme.simulators.policies.tools import parse_text_probes, probe_tool

_YAML_BLOCK = re.compile(r"```\s*(ya?ml)?\s*\n", re.I)
NO_PROBES = "probes are unavailable in this run: answer from the report"


def _has_answer(text: str) -> bool:
    return bool(_YAML_BLOCK.search(text or ""))


class ThinkRemed:
    name = "think"

    def __init__(self, model: ChatModel, *, max_trials: int = 3, max_probes: int = 4, temperature: float = 0.0,
                 max_tokens: int = 1024, tools: bool = True, memory: int = 64):
        if max_trials < 1 or max_probes < 0:
            raise ValueError(f"policy 'think': max_trials must be >= 1 and max_probes >= 0 "
                             f"(got {max_trials}, {max_probes})")
        self.model = model
        self.max_trials = max_trials
        self.max_probes = max_probes
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.tools = tools
        self._memory = memory
        self._episodes: OrderedDict[str, dict] = OrderedDict()

    def _episode(self, ctx: PolicyContext, feedback: list[TrialFeedback]) -> dict:
        if not feedback or ctx.episode_id not in self._episodes:
            self._episodes[ctx.episode_id] = {"answers": [], "probes": []}
        self._episodes.move_to_end(ctx.episode_id)
        while len(self._episodes) > self._memory:   # a long benchmark must not grow without bound
            self._episodes.popitem(last=False)
        return self._episodes[ctx.episode_id]

    def _run_probe(self, ctx: PolicyContext, host: Any, command: Any, used: int) -> str:
        if used >= self.max_probes:
            return f"refused: the probe budget of this attempt ({self.max_probes}) is used up; answer with the playbook"
        if ctx.probe is None:
            return NO_PROBES
        if not isinstance(host, str) or not isinstance(command, str):
            return "refused: a probe needs a host and a command, both strings"
        try:
            return ctx.probe(host, command)
        except Exception as e:   # a probe tool is not supposed to raise; if one does, the model hears it
            return f"error: the probe failed: {type(e).__name__}: {e}".splitlines()[0]

    def _chat(self, messages: list[dict], tools: list[dict] | None, seed: int) -> ChatResponse:
        try:
            return self.model.chat(list(messages), tools=tools, temperature=self.temperature,
                                   max_tokens=self.max_tokens, seed=seed)
        except ModelError as e:
            # Some endpoints refuse `tools` (vLLM without --enable-auto-tool-choice answers 400):
            # the text protocol works everywhere, so fall back to it for good.
            if not tools or e.status != 400 or "tool" not in str(e).lower():
                raise
            self.tools = False
            return self.model.chat(list(messages), tools=None, temperature=self.temperature,
                                   max_tokens=self.max_tokens, seed=seed)

    def generate(self, ctx: PolicyContext, feedback: list[TrialFeedback]) -> Generation:
        t0 = time.monotonic()
        ep = self._episode(ctx, feedback)
        trial = len(feedback) + 1
        messages = build_messages(ctx.report, ctx.inventory_hosts, mode="think", feedback=feedback,
                                  observations=ep["probes"], previous_answers=ep["answers"],
                                  max_probes=self.max_probes)
        tool_specs = [probe_tool(ctx.inventory_hosts)] if self.tools and self.max_probes > 0 else None
        calls: list[dict] = []
        responses: list[ChatResponse] = []
        while True:
            budget_left = self.max_probes - len(calls)
            r = self._chat(messages, tool_specs if budget_left > 0 and self.tools else None, ctx.seed)
            responses.append(r)
            native = list(r.tool_calls) if budget_left > 0 else []
            text_probes = parse_text_probes(r.text) if budget_left > 0 and not _has_answer(r.text) else []
            if not native and not text_probes:
                break                                     # the answer (a playbook, or prose the runner rejects)
            if native:
                messages.append({"role": "assistant", "content": r.text or None, "tool_calls": [
                    {"id": c["id"], "type": "function",
                     "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in native]})
                for c in native:
                    args = c["arguments"]
                    if c["name"] != "probe":
                        out = f"refused: there is no tool '{c['name']}'; the only tool is probe"
                    elif "_unparsed" in args:
                        out = f"refused: the arguments are not a JSON object: {args['_unparsed'][:200]}"
                    else:
                        out = self._run_probe(ctx, args.get("host"), args.get("command"), len(calls))
                    calls.append({"host": args.get("host"), "command": args.get("command"), "output": out,
                                  "via": "tool", "trial": trial})
                    messages.append({"role": "tool", "tool_call_id": c["id"], "content": out})
            else:
                messages.append({"role": "assistant", "content": r.text})
                parts = []
                for host, command in text_probes:
                    out = self._run_probe(ctx, host, command, len(calls))
                    calls.append({"host": host, "command": command, "output": out, "via": "text", "trial": trial})
                    parts.append(f"PROBE {host}: {command}\n{out}")
                append_user(messages, "Probe results:\n\n" + "\n\n".join(parts))
            if len(calls) >= self.max_probes:
                append_user(messages, "No probes are left for this attempt. Answer now with the playbook in one "
                                      "```yaml block.")
        final = responses[-1]
        ep["answers"] = (ep["answers"] + [""] * trial)[:trial - 1] + [final.text]
        ep["probes"] = ep["probes"] + [c for c in calls if not c["output"].startswith(("refused:", "error:"))
                                       and c["output"] != NO_PROBES]
        # latency_s is the model's time alone (summed over its calls); wall_s adds the probes.
        return Generation(text=final.text, messages=messages, prompt_tokens=_sum(r.prompt_tokens for r in responses),
                          completion_tokens=_sum(r.completion_tokens for r in responses), tool_calls=calls,
                          model=self.model.name, latency_s=sum(r.latency_s for r in responses),
                          extra={"trial": trial, "model_calls": len(responses),
                                 "wall_s": round(time.monotonic() - t0, 3),   # model calls and probes
                                 "finish_reason": final.finish_reason})


def _sum(values) -> int | None:
    """Summed over the trial's model calls; unknown (None) if any call's count is unknown,
    since a partial sum would understate the cost."""
    total = 0
    for v in values:
        if v is None:
            return None
        total += v
    return total


@register_policy("think")
def make_think(model: ChatModel | str | None = None, base_url: str | None = None, api_key: str | None = None,
               max_trials: int = 3, max_probes: int = 4, temperature: float = 0.0, max_tokens: int = 1024,
               tools: bool = True, **unknown: Any) -> ThinkRemed:
    if unknown:
        raise ValueError(f"policy 'think' does not take {', '.join(unknown)}; its options: model, base_url, "
                         f"api_key, max_trials, max_probes, temperature, max_tokens, tools")
    if isinstance(tools, str):
        tools = tools.lower() not in ("0", "false", "no", "off")
    return ThinkRemed(model_option("think", model, base_url, api_key), max_trials=int(max_trials),
                      max_probes=int(max_probes), temperature=float(temperature), max_tokens=int(max_tokens),
                      tools=bool(tools))
