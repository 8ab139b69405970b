"""The one prompt format, with token ids: what SFT, evaluation, reinforcement fine-tuning,
the benchmark's model-backed policies and serving all show a model, and how its answer
becomes a playbook.

The words live in the simulator stage (`simulators/policies/prompt.py` builds the chat
messages from a diagnosis report, the inventory, and for multi-turn the probe observations
and execution feedback; `simulators/playbook/execution.py` extracts the playbook from an answer);
this module re-exports them and adds the token bookkeeping training needs:

    messages = build_messages(report, ("n0", "n1"))              # the benchmark's SoloGen prompt
    ids = prompt_ids(tokenizer, messages)                         # chat template, generation prompt
    ex = encode_example(tokenizer, messages, answer_text(playbook))
    ex.input_ids, ex.prompt_len, ex.labels()                      # loss only on the answer (+ end token)
    extract_yaml(answer)                                          # answer -> playbook text (or None)

Prompts are rendered by `render_chat`, the same function the benchmark's local model uses
(`TransformersChatModel.render`), so a prompt tokenised here has exactly the ids the model
is given at evaluation time. An answer is tokenised on its own and appended after the
prompt ids, which is also how a generated answer arrives (the engine returns the prompt
ids and the completion ids separately): training never re-tokenises a transcript.

Message text is data: `render_chat` keeps control-token strings inside it as text
(`prompt.literal_messages`), and `prompt_ids` checks that the control tokens of the result
are exactly those of the chat template itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from e2e_reme.simulators.playbook.execution import extract_yaml
from e2e_reme.simulators.policies.models import plain_messages, render_chat
from e2e_reme.simulators.policies.prompt import (append_user, build_messages, control_tokens, render_feedback,
                                                 render_observations, report_text, system_prompt)

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "Encoded", "answer_ids", "answer_text", "append_user", "build_messages",
           "encode_example", "extract_yaml", "plain_messages", "prompt_ids", "render_chat", "render_feedback",
           "render_observations", "report_text", "system_prompt", "split_transcript"]


def answer_text(playbook: str) -> str:
    """A playbook as the expert runbook policy answers it: one fenced yaml block, nothing
    after it (what the system prompt asks for)."""
    return "```yaml\n" + playbook.rstrip("\n") + "\n```\n"


def prompt_ids(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """The prompt's token ids, ending with the assistant's generation prompt. Its control
    tokens are the chat template's and no others: text never becomes one."""
    ids = tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"]
    _, special = control_tokens(tokenizer)
    if [i for i in ids if i in special] != _template_specials(tokenizer, tuple(m["role"] for m in
                                                                         plain_messages(messages))):
        raise ValueError("the prompt's text produced control tokens of its own (a role marker or end-of-turn "
                         "token in a message); it cannot be given to the model")
    return ids


def _template_specials(tokenizer: Any, roles: tuple[str, ...]) -> list[int]:
    """The control-token ids the chat template itself writes for turns of these roles
    (rendered with plain one-letter contents), cached on the tokenizer."""
    cache = getattr(tokenizer, "_remed_template_specials", None)
    if cache is None:
        cache = {}
        try:
            tokenizer._remed_template_specials = cache
        except AttributeError:
            pass
    if roles not in cache:
        _, special = control_tokens(tokenizer)
        skeleton = render_chat(tokenizer, [{"role": r, "content": "x"} for r in roles])
        cache[roles] = [i for i in tokenizer(skeleton, add_special_tokens=False)["input_ids"] if i in special]
    return cache[roles]


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """The answer's ids followed by the end-of-turn token, where generation stops."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


@dataclass
class Encoded:
    input_ids: list[int]
    prompt_len: int                  # the answer starts at input_ids[prompt_len]
    meta: dict = field(default_factory=dict)

    @property
    def answer_len(self) -> int:
        return len(self.input_ids) - self.prompt_len

    def labels(self) -> list[int]:
        """Next-token targets aligned with input_ids (the model shifts them): the prompt is
        ignored, so the loss covers only the answer and its end token."""
        return [IGNORE_INDEX] * self.prompt_len + self.input_ids[self.prompt_len:]

    def to_dict(self) -> dict:
        return {"input_ids": self.input_ids, "prompt_len": self.prompt_len, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Encoded":
        return cls(list(d["input_ids"]), int(d["prompt_len"]), dict(d.get("meta") or {}))


def encode_example(tokenizer: Any, messages: Sequence[dict], answer: str, meta: dict | None = None) -> Encoded:
    """One SFT example: the prompt of `messages` (the whole conversation so far, however
    many turns) and the `answer` to it."""
    p = prompt_ids(tokenizer, messages)
    return Encoded(p + answer_ids(tokenizer, answer), len(p), dict(meta or {}))


def split_transcript(messages: Sequence[dict]) -> tuple[list[dict], str]:
    """A recorded transcript ending with the assistant's answer -> (the prompt's messages,
    the answer)."""
    msgs = list(messages)
    if not msgs or msgs[-1].get("role") != "assistant":
        raise ValueError("a transcript to train on ends with the assistant's answer")
    return msgs[:-1], str(msgs[-1].get("content") or "")
