"""A tiny OpenAI-compatible chat server on the standard library, for tests and demos: it
lets every model-backed policy be driven over real HTTP through `OpenAIChatModel`, exactly
as it will talk to the Ray Serve endpoint (serve/), without that stack.

    with LocalChatServer(ScriptedResponder(["```yaml\\n- hosts: n0\\n  tasks: []\\n```"])) as srv:
        model = OpenAIChatModel(srv.base_url, "scripted")

    python -m e2e_reme.serve.local_server --model /models/tiny --port 8000

It serves `POST /v1/chat/completions` and `GET /v1/models`. A responder is a callable
`responder(messages, tools) -> dict` returning {"content": str} or {"tool_calls": [{"name",
"arguments": dict|str, "id"?}]}, and optionally "usage": {"prompt_tokens",
"completion_tokens"} and "finish_reason". A responder whose signature accepts them also gets
temperature, max_tokens and seed as keywords. The server never invents token counts: a
response without usage from its responder carries no `usage` field.

It is a tool for tests and demos on loopback, not a service: no admission limits, Host or
Content-Type checks, token budget or authentication (those are `remed serve`'s,
docs/serve.md). It refuses to listen anywhere but a loopback address.
"""

from __future__ import annotations

import argparse
import inspect
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence

from e2e_reme.simulators.policies.models import TransformersChatModel

Responder = Callable[..., dict]


def _accepts_options(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == "max_tokens" for p in params)


def _completion(model: str, answer: dict) -> dict:
    calls = []
    for i, c in enumerate(answer.get("tool_calls") or []):
        args = c.get("arguments", {})
        calls.append({"id": c.get("id") or f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                      "function": {"name": c["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
    message: dict[str, Any] = {"role": "assistant", "content": answer.get("content") if not calls else
                               (answer.get("content") or None)}
    if calls:
        message["tool_calls"] = calls
    body: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message,
                     "finish_reason": answer.get("finish_reason") or ("tool_calls" if calls else "stop")}]}
    usage = answer.get("usage")
    if usage:
        p, c = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        body["usage"] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    return body


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:   # quiet: tests and demos read their own output
        pass

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "created": 0, "owned_by": "e2e-reme"}]})
        else:
            self._error(404, f"no such endpoint: GET {self.path}", "not_found")

    def do_POST(self) -> None:
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no such endpoint: POST {self.path}", "not_found")
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            messages = body["messages"]
            if not isinstance(messages, list):
                raise TypeError("messages is not a list")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            self._error(400, f"not a chat completion request: {e}", "invalid_request_error")
            return
        tools = body.get("tools")
        opts = {k: body[k] for k in ("temperature", "max_tokens", "seed") if body.get(k) is not None}
        try:
            with self.server.lock:      # one generation at a time: a local model is not re-entrant
                answer = (self.server.responder(messages, tools, **opts) if self.server.pass_options
                          else self.server.responder(messages, tools))
            if not isinstance(answer, dict) or not ("content" in answer or "tool_calls" in answer):
                raise TypeError(f"the responder returned {answer!r}, not {{'content'}} or {{'tool_calls'}}")
            self._send(200, _completion(body.get("model") or self.server.model_name, answer))
        except Exception as e:
            self._error(500, f"{type(e).__name__}: {e}", "server_error")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    responder: Responder
    pass_options: bool
    model_name: str
    lock: threading.Lock


class LocalChatServer:
    """`responder` served over HTTP on a background thread; `base_url` is what an
    OpenAIChatModel takes. Port 0 picks a free one."""

    def __init__(self, responder: Responder, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None):
        self.responder = responder
        self.host, self.port = host, port
        self.model_name = model_name or getattr(responder, "name", None) or "local"
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("LocalChatServer is not started: use it as a context manager or call start()")
        return f"http://{self.host}:{self._httpd.server_address[1]}/v1"

    def start(self) -> "LocalChatServer":
        from .config import _loopback
        if not _loopback(self.host):
            raise ValueError(f"LocalChatServer listens on loopback only, not {self.host}: it has no admission limits "
                             f"or authentication; serve a model to others with `remed serve`")
        httpd = _Server((self.host, self.port), _Handler)
        httpd.responder, httpd.model_name = self.responder, self.model_name
        httpd.pass_options, httpd.lock = _accepts_options(self.responder), threading.Lock()
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="local-chat-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = self._thread = None

    def __enter__(self) -> "LocalChatServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ScriptedResponder:
    """A TEST DOUBLE FOR THE MODEL, for plumbing tests and demos of the HTTP path: it replays
    `answers` in order, whatever it is asked. It stands in only for the language model
    behind the endpoint; nothing the project drives (sandboxes, faults, Ansible, the
    verifier) is faked by it.

    An answer is a string (the assistant's text), a dict {"name", "arguments"} (one tool
    call), a list of such dicts (several), or a full responder dict ({"content"} /
    {"tool_calls"}). Its token counts are whitespace-split word counts of the messages and
    of the answer: stand-ins that make `usage` non-empty, not real token counts.
    `requests` records what it was sent (messages, tools), for a test to inspect."""

    name = "scripted"

    def __init__(self, answers: Sequence[Any]):
        self.answers = list(answers)
        self.requests: list[tuple[list[dict], list[dict] | None]] = []

    def __call__(self, messages: list[dict], tools: list[dict] | None = None) -> dict:
        self.requests.append((messages, tools))
        i = len(self.requests) - 1
        if i >= len(self.answers):
            raise IndexError(f"the script has {len(self.answers)} answers and was asked for answer {i + 1}")
        a = self.answers[i]
        if isinstance(a, str):
            answer = {"content": a}
        elif isinstance(a, dict) and ("content" in a or "tool_calls" in a):
            answer = dict(a)
        elif isinstance(a, dict):
            answer = {"tool_calls": [a]}
        else:
            answer = {"tool_calls": list(a)}
        prompt = sum(len(str(m.get("content") or "").split()) for m in messages)
        completion = len(str(answer.get("content") or "").split()) + sum(
            len(json.dumps(c.get("arguments", {})).split()) for c in answer.get("tool_calls") or [])
        answer.setdefault("usage", {"prompt_tokens": prompt, "completion_tokens": completion})
        return answer


class TransformersResponder:
    """A local Hugging Face model behind the server; usage comes from its tokenizer."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto"):
        self.model = TransformersChatModel(path, device=device, dtype=dtype)
        self.name = self.model.name

    def __call__(self, messages: list[dict], tools: list[dict] | None = None, *, temperature: float = 0.0,
                 max_tokens: int = 1024, seed: int | None = None) -> dict:
        r = self.model.chat(messages, tools=tools, temperature=temperature, max_tokens=max_tokens, seed=seed)
        return {"content": r.text, "finish_reason": r.finish_reason,
                "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m e2e_reme.serve.local_server",
                                 description="Serve a local Hugging Face model over a minimal OpenAI-compatible API.")
    ap.add_argument("--model", required=True, help="a local model directory (config.json, weights, tokenizer)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)
    try:
        responder = TransformersResponder(args.model, device=args.device, dtype=args.dtype)
    except (ValueError, ImportError) as e:
        print(f"error: {e}")
        return 2
    try:
        srv = LocalChatServer(responder, host=args.host, port=args.port).start()
    except ValueError as e:
        print(f"error: {e}")
        return 2
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}; pick another --port")
        return 2
    print(f"serving {responder.name} at {srv.base_url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
