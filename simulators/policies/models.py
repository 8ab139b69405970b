"""Chat model clients behind one small interface, so a policy does not care whether its
model is a hosted endpoint, our Ray Serve app, or a checkpoint on local disk:

    model = make_model("qwen2.5-7b-instruct", base_url="http://127.0.0.1:8000/v1")  # OpenAI-compatible
    model = make_model("/models/e2e-reme-1.5b")                                      # local HF directory
    r = model.chat(messages, tools=None, temperature=0.0, max_tokens=1024, seed=0)
    r.text, r.tool_calls, r.prompt_tokens, r.completion_tokens

Token counts are never estimated: they come from the API's `usage` fields (None when the
server sends none) or from the local model's own tokenizer. Any failure to get an answer
(HTTP error, connection refused, timeout, a body that is not a chat completion) raises
`ModelError`; the episode runner records it at the "generate" stage.

Tool calls: an OpenAI endpoint gets `tools` in function-calling format and its tool calls
come back parsed. A local transformers model has no native tool calling here; it follows
the plain-text protocol (`PROBE <host>: <command>` lines, see policies/tools.py) that the
think prompt describes, and `tools` is ignored.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

TORCH_HINT = "pip install torch==2.13.0 transformers"


class ModelError(RuntimeError):
    """The model could not give an answer. `kind`: "http" (an error status), "connection"
    (refused, unreachable, timed out), "malformed" (not a chat completion), "local" (the
    local model failed to generate); `status` is the HTTP status where there was one."""

    def __init__(self, message: str, *, kind: str = "http", status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass
class ChatResponse:
    text: str
    tool_calls: list[dict] = field(default_factory=list)   # {"id", "name", "arguments": dict}
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    latency_s: float = 0.0
    raw: dict = field(default_factory=dict)


@runtime_checkable
class ChatModel(Protocol):
    name: str

    def chat(self, messages: Sequence[dict], *, tools: Sequence[dict] | None = None, temperature: float = 0.0,
             max_tokens: int = 1024, seed: int | None = None) -> ChatResponse: ...


# ---- an OpenAI-compatible endpoint ---------------------------------------------------------------

def _api_base(base_url: str) -> str:
    """`http://host:8000` and `http://host:8000/v1` both mean the /v1 API; any other path is
    taken as given (a proxy may mount it elsewhere)."""
    u = urllib.parse.urlsplit(base_url.rstrip("/"))
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ValueError(f"model base_url '{base_url}': give an http(s) URL such as http://127.0.0.1:8000/v1")
    path = u.path if u.path not in ("", "/") else "/v1"
    return urllib.parse.urlunsplit((u.scheme, u.netloc, path, "", ""))


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def parse_tool_calls(calls: Any) -> list[dict]:
    """OpenAI `message.tool_calls` as [{"id", "name", "arguments": dict}]. Arguments that
    are not a JSON object become {"_unparsed": text}: a model's mistake, for the policy to
    answer, not a transport failure."""
    out = []
    for i, c in enumerate(calls or []):
        fn = (c or {}).get("function") or {}
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                args = {"_unparsed": args}
        if not isinstance(args, dict):
            args = {"_unparsed": json.dumps(args)}
        out.append({"id": c.get("id") or f"call_{i}", "name": fn.get("name") or "", "arguments": args})
    return out


class OpenAIChatModel:
    """The chat-completions API over HTTP (urllib; no SDK). `api_key` defaults to the
    environment's OPENAI_API_KEY or E2E_REME_API_KEY; a local server needs none."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 120):
        self.base_url = _api_base(base_url)
        self.model = model
        self.name = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("E2E_REME_API_KEY")
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"OpenAIChatModel({self.base_url!r}, {self.model!r})"

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        url = self.base_url + path
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            detail = _error_detail(e)
            raise ModelError(f"model endpoint {url} answered HTTP {e.code}: {detail}", kind="http",
                             status=e.code) from None
        except http.client.HTTPException as e:
            raise ModelError(f"model endpoint {url} broke the HTTP exchange: {type(e).__name__}: {e}",
                             kind="malformed") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ModelError(f"model endpoint {url} is unreachable ({reason}); is the server running "
                             f"at {self.base_url}?", kind="connection") from None
        try:
            obj = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"model endpoint {url} answered with something that is not JSON: "
                             f"{payload[:200]!r}", kind="malformed") from None
        if not isinstance(obj, dict):
            raise ModelError(f"model endpoint {url} answered JSON that is not an object: {payload[:200]!r}",
                             kind="malformed")
        return obj

    def list_models(self) -> list[str]:
        obj = self._request("GET", "/models")
        try:
            return [m["id"] for m in obj["data"]]
        except (KeyError, TypeError):
            raise ModelError(f"model endpoint {self.base_url}/models: no model list in {str(obj)[:200]}",
                             kind="malformed") from None

    def chat(self, messages: Sequence[dict], *, tools: Sequence[dict] | None = None, temperature: float = 0.0,
             max_tokens: int = 1024, seed: int | None = None) -> ChatResponse:
        body: dict[str, Any] = {"model": self.model, "messages": list(messages), "temperature": temperature,
                                "max_tokens": max_tokens}
        if tools:
            body["tools"] = list(tools)
        if seed is not None:
            body["seed"] = seed
        t0 = time.monotonic()
        obj = self._request("POST", "/chat/completions", body)
        latency = time.monotonic() - t0
        try:
            choice = obj["choices"][0]
            msg = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise ModelError(f"model endpoint {self.base_url}/chat/completions: not a chat completion "
                             f"(no choices[0].message): {json.dumps(obj)[:300]}", kind="malformed") from None
        usage = obj.get("usage") or {}
        content = msg.get("content")
        if isinstance(content, list):    # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return ChatResponse(text=content or "", tool_calls=parse_tool_calls(msg.get("tool_calls")),
                            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
                            completion_tokens=_int_or_none(usage.get("completion_tokens")),
                            finish_reason=choice.get("finish_reason"), latency_s=latency, raw=obj)


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode(errors="replace")
    except Exception:
        return str(e.reason)
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if err:
            return str(err)[:300]
    except (json.JSONDecodeError, AttributeError):
        pass
    return body[:300] or str(e.reason)


# ---- a local Hugging Face checkpoint ----------------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_model_dir(path: str | os.PathLike, error: type[Exception] = ValueError) -> Path:
    """A directory `from_pretrained` can load without a network: config.json, weights and a
    tokenizer. The error (`error`) names the path and what is missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise error(f"model directory {p}: not found; give a local Hugging Face model directory (`remed model "
                    f"import` makes the pretrained Gemma 3 270M) or, for an endpoint, a model name with base_url")
    missing = [what for what, names in (("config.json", ("config.json",)),
                                        ("weights (model.safetensors or pytorch_model.bin, or their .index.json)",
                                         WEIGHT_FILES),
                                        ("a tokenizer (tokenizer.json, tokenizer.model or vocab.json)",
                                         TOKENIZER_FILES))
               if not any((p / f).is_file() for f in names)]
    if missing:
        raise error(f"model directory {p}: missing {', '.join(missing)}; a model directory is what "
                    f"save_pretrained() writes for the model and its tokenizer")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"model directory {p}: config.json is not readable JSON ({e})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise error(f"model directory {p}: config.json has no model_type; it was not written by save_pretrained()")
    return p


def _import_transformers():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"a local model needs torch and transformers ({e}): {TORCH_HINT}") from None
    return torch, transformers


def plain_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages with only system/user/assistant text, for chat templates without tool
    support: an assistant's tool calls become `PROBE host: command` lines and a tool result
    becomes a user turn, i.e. the plain-text protocol."""
    out: list[dict] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            lines = [content] if content else []
            for c in parse_tool_calls(m["tool_calls"]):
                a = c["arguments"]
                lines.append(f"PROBE {a.get('host', '?')}: {a.get('command', '')}")
            content = "\n".join(lines)
        elif role == "tool":
            role, content = "user", f"Probe result:\n{content}"
        elif role not in ("system", "user", "assistant"):
            role = "user"
        if out and out[-1]["role"] == role == "user":
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + content}
        else:
            out.append({"role": role, "content": content})
    return out


def render_chat(tokenizer: Any, messages: Sequence[dict]) -> str:
    """The prompt text a local model sees for `messages`, ending where the assistant's answer
    begins: the tokenizer's chat template, or a plain transcript for a base model without one
    (training tokenises prompts with this same function, so both see the same ids).
    Control-token strings inside a message's text stay text (prompt.literal_messages)."""
    from e2e_reme.simulators.policies.prompt import literal_messages
    msgs = literal_messages(tokenizer, plain_messages(messages))
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n\n" for m in msgs) + "assistant: "


class TransformersChatModel:
    """A local causal LM and its tokenizer (`local_files_only`: nothing is downloaded),
    prompted through the tokenizer's chat template. Token counts come from that tokenizer;
    `raw` carries the prompt and completion token ids (for training)."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", dtype: str = "auto"):
        self.path = check_model_dir(path)
        self.name = self.path.name
        torch, transformers = _import_transformers()
        self._torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
        if torch_dtype is None:
            raise ValueError(f"dtype '{dtype}': use auto or a torch dtype name such as bfloat16, float16, float32")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            try:
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(self.path), local_files_only=True, dtype=torch_dtype)
            except TypeError:   # transformers < 4.56 calls it torch_dtype
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(self.path), local_files_only=True, torch_dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise ValueError(f"model directory {self.path}: cannot load it with transformers: {e}") from None
        self.model.to(device)
        self.model.eval()

    def __repr__(self) -> str:
        return f"TransformersChatModel({str(self.path)!r}, device={self.device!r})"

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt text the model sees, ending where the assistant's answer begins."""
        return render_chat(self.tokenizer, messages)

    def chat(self, messages: Sequence[dict], *, tools: Sequence[dict] | None = None, temperature: float = 0.0,
             max_tokens: int = 1024, seed: int | None = None) -> ChatResponse:
        torch = self._torch
        t0 = time.monotonic()
        try:
            prompt = self.render(messages)
            enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            input_ids = enc["input_ids"].to(self.device)
            attention = enc.get("attention_mask")
            attention = attention.to(self.device) if attention is not None else torch.ones_like(input_ids)
            eos = self.tokenizer.eos_token_id
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
            kwargs: dict[str, Any] = dict(max_new_tokens=max_tokens, pad_token_id=pad if pad is not None else 0)
            if eos is not None:
                kwargs["eos_token_id"] = eos
            if temperature and temperature > 0:
                kwargs.update(do_sample=True, temperature=float(temperature))
            else:
                kwargs.update(do_sample=False)
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        except Exception as e:
            raise ModelError(f"local model {self.path} failed to generate: {type(e).__name__}: {e}",
                             kind="local") from e
        completion = out[0, input_ids.shape[1]:].tolist()
        finish = "stop" if eos is not None and completion and completion[-1] == eos else "length"
        if finish == "length" and len(completion) < max_tokens:
            finish = "stop"     # another stop criterion (e.g. a second eos id in generation_config)
        text = self.tokenizer.decode(completion, skip_special_tokens=True)
        return ChatResponse(text=text, tool_calls=[], prompt_tokens=int(input_ids.shape[1]),
                            completion_tokens=len(completion), finish_reason=finish,
                            latency_s=time.monotonic() - t0,
                            raw={"prompt_ids": input_ids[0].tolist(), "completion_ids": completion,
                                 "chat_template": bool(getattr(self.tokenizer, "chat_template", None))})


def make_model(spec: str | None, base_url: str | None = None, api_key: str | None = None) -> ChatModel:
    """A model from a spec: with `base_url`, `spec` is the model's name on that
    OpenAI-compatible endpoint (None: the endpoint's first model); without, `spec` is a
    local Hugging Face model directory."""
    if base_url:
        if spec:
            return OpenAIChatModel(base_url, spec, api_key=api_key)
        probe = OpenAIChatModel(base_url, "", api_key=api_key)
        names = probe.list_models()
        if not names:
            raise ModelError(f"model endpoint {probe.base_url} serves no model; name one", kind="malformed")
        return OpenAIChatModel(base_url, names[0], api_key=api_key)
    if not spec:
        raise ValueError("no model given: pass a local model directory, or a model name with base_url "
                         "(an OpenAI-compatible endpoint such as http://127.0.0.1:8000/v1)")
    return TransformersChatModel(spec)


def as_model(model: ChatModel | str | None, base_url: str | None = None, api_key: str | None = None) -> ChatModel:
    """A policy's `model` option: a ChatModel as it is, or a spec for make_model."""
    if model is not None and not isinstance(model, str) and hasattr(model, "chat"):
        return model
    return make_model(model, base_url=base_url, api_key=api_key)
