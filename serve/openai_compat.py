"""OpenAI chat-completions shapes: message content parts, the SSE chunk stream, the
model's context length. Kept out of app.py so that Serve's replicas import them by name."""

from __future__ import annotations

import json
from typing import AsyncIterator


def message_dict(m) -> dict:
    d = m.model_dump(exclude_none=True)
    content = d.get("content")
    if isinstance(content, list):
        d["content"] = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return d


async def sse(cid: str, created: int, model: str, text: str, finish: str, usage: dict | None,
               piece: int = 16) -> AsyncIterator[str]:
    """The finished completion as OpenAI's chunk stream: the role, the text in pieces, the
    finish reason, the usage when asked for, then [DONE]."""
    def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
        return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                      "model": model, "choices": [{"index": 0, "delta": delta,
                                                                   "finish_reason": finish_reason}], **extra}) + "\n\n"
    yield chunk({"role": "assistant", "content": ""})
    for i in range(0, len(text), piece):
        yield chunk({"content": text[i:i + piece]})
    yield chunk({}, finish)
    if usage is not None:
        yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                     "model": model, "choices": [], "usage": usage}) + "\n\n"
    yield "data: [DONE]\n\n"


def context_length(engine) -> int | None:
    for get in (lambda: engine.model.config.max_position_embeddings,
                lambda: engine.llm.llm_engine.model_config.max_model_len):
        try:
            n = int(get())
            if n > 0:
                return n
        except Exception:
            continue
    return None
