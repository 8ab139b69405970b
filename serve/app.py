"""The Ray Serve application: one FastAPI ingress deployment holding the model.

    POST /v1/remediate          a diagnosis report (+ inventory) -> playbook, gate verdict,
                                syntax check, tokens, model; mode dry-run or execute
    POST /v1/chat/completions   OpenAI-compatible, `stream: true` answers as SSE
    GET  /v1/models             OpenAI-compatible
    GET  /healthz               {"status": "ok", model...}
    GET  /metrics               this replica's Prometheus text (serve/metrics.py)
    /ui ...                     the operator's review console (serve/console.py): propose, inspect,
                                approve, execute, history; decisions in serve/review.py's store

Concurrent generations are batched dynamically (`@serve.batch`: up to `max_batch_size`
prompts, waiting at most `batch_wait_timeout_s` for a batch to fill); each batch runs in the
engine's own worker thread so the replica keeps answering /healthz meanwhile. A request
whose client disconnects is cancelled by Serve: still waiting for a batch, it leaves the
queue; already generating, its row of the batch is stopped at the next token (or its
prefill abandoned at the next layer: train/rollout.py `stop`). The same stop ends a
generation that runs past `request_timeout_s` (504).

Every request is checked before any model work: the Host header against the allowlist
(DNS rebinding), `Content-Type: application/json` on POST, the body (size, read timeout,
JSON depth, numbers, Unicode: schemas.parse_body), the fields, the prompt's length in
tokens (`max_prompt_tokens`, 413) and `max_tokens` (over `max_tokens_limit`: 422, never
lowered). Answers carry no absolute paths of this machine.

Started by `remed serve` (serve/launch.py) or by `serve run configs/serve.yaml`, whose
`import_path` is `e2e_reme.serve.app:app_builder` with the config's `args`.
"""


import asyncio
import logging
import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from e2e_reme.train.format import prompt_ids
from e2e_reme.train.rollout import SamplingParams

from .config import ServeConfig
from .remediate import ApiError, Runner, messages_for, new_request_id, plan
from .openai_compat import context_length as _context_length, message_dict as _message_dict, sse as _sse
from .schemas import BodyError, ChatRequest, RemediateRequest, describe_errors, parse_body

log = logging.getLogger("e2e_reme.serve")


def _replica_grpc_on_loopback() -> None:
    """Serve's replica starts its inter-deployment gRPC server on "[::]:0", hard-coded
    (ray/serve/_private/replica.py `_on_initialized`), whatever the node's address: every
    interface. On a loopback-only node (the local Ray `remed serve` starts: node address
    127.0.0.1, which is also where Serve connects to it) it is bound to 127.0.0.1 instead.
    Runs when a replica imports this module, before Serve starts that server."""
    try:
        from ray.serve._private import replica as _replica
    except Exception:                  # another Ray layout: leave it as it is
        return
    orig = getattr(_replica, "add_port_to_grpc_server", None)
    if orig is None or getattr(orig, "_remed_loopback", False):
        return

    def bind(server, address):
        if address.startswith("[::]:"):
            try:
                import ray
                if ray.is_initialized() and ray.util.get_node_ip_address() in ("127.0.0.1", "::1"):
                    address = "127.0.0.1:" + address.rsplit(":", 1)[1]
            except Exception:
                pass
        return orig(server, address)
    bind._remed_loopback = True
    _replica.add_port_to_grpc_server = bind


_replica_grpc_on_loopback()
api = FastAPI(title="E2E-REME", description="Remediation playbooks from diagnosis reports; OpenAI-compatible chat.",
              docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's own 404/405 in the shape of every other refusal."""
    what = {404: "no such endpoint: the routes are /v1/remediate, /v1/chat/completions, /v1/models, /healthz, "
                 "/metrics and the console at /ui", 405: f"method {request.method} is not allowed on {request.url.path}"}
    err = {"message": what.get(exc.status_code, str(exc.detail)), "type": "invalid_request_error",
           "code": exc.status_code}
    return JSONResponse({"error": err}, status_code=exc.status_code, headers=exc.headers)


class _Gen:
    """One generation in a batch: prompt token ids, its sampling parameters, and what
    stops it: its client gone (`cancel`), its time up (`deadline`, monotonic)."""
    __slots__ = ("ids", "params", "cancel", "deadline")

    def __init__(self, ids: list[int], params: SamplingParams, deadline: float):
        self.ids, self.params, self.deadline = ids, params, deadline
        self.cancel = threading.Event()

    def stopped(self) -> bool:
        return self.cancel.is_set() or time.monotonic() > self.deadline


def public_info(info: dict) -> dict:
    """What a client may know of the model: names, never this machine's paths."""
    def name(p):
        return Path(str(p)).name if p else None
    out = {"name": info["name"], "engine": info["engine"], "base": name(info.get("base")),
           "adapter": name(info.get("adapter"))}
    for k in ("merged", "rl_step"):
        if k in info:
            out[k] = info[k]
    return out


_TMP_PATH = re.compile(r"/tmp/remed-serve-[A-Za-z0-9_]+")


def _media_type(value: str | None) -> tuple[str, dict]:
    kind, _, rest = (value or "").partition(";")
    params = {}
    for part in rest.split(";"):
        k, _, v = part.partition("=")
        if k.strip():
            params[k.strip().lower()] = v.strip().strip('"').lower()
    return kind.strip().lower(), params


@serve.deployment(name="Remed")
@serve.ingress(api)
class RemedServer:
    def __init__(self, config: dict):
        from .engine import load_engine
        from .metrics import Metrics
        self.cfg = ServeConfig.from_mapping(config)
        if self.cfg.token_env:              # never handed on to what this replica starts (the jail's host side)
            os.environ.pop(self.cfg.token_env, None)
        self.engine, self.info = load_engine(self.cfg.model, kind=self.cfg.engine, device=self.cfg.device,
                                             dtype=self.cfg.dtype, batch_size=self.cfg.max_batch_size)
        self.public = public_info(self.info)
        self.tokenizer = self.engine.tokenizer
        self.context = _context_length(self.engine)
        self.metrics = Metrics()
        self.runner = Runner(self.cfg)
        self._engine_lock = threading.Lock()
        # Own threads per kind of work: a long execution never delays tokenising or the engine.
        self._engine_pool = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._light_pool = ThreadPoolExecutor(4, thread_name_prefix="parse")
        self._run_pool = ThreadPoolExecutor(8, thread_name_prefix="pipeline")
        self.names = {self.info["name"], self.info["path"], self.cfg.model}
        self.hosts = self.cfg.host_allowlist()
        self._paths = sorted({(str(Path(self.cfg.workdir).resolve()), "<workdir>"),
                              (self.info["path"], self.info["name"]),
                              (str(Path(self.cfg.model).resolve()), self.info["name"])}, key=lambda x: -len(x[0]))
        self.created = int(time.time())
        from .console import Console
        self.console = Console(self)        # opens the decision store; interrupted runs of a dead server recorded
        self._generate.set_max_batch_size(self.cfg.max_batch_size)
        self._generate.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    # ---- generation, batched ----------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate(self, items: list[_Gen]) -> list[Any]:
        self.metrics.batch(len(items))
        groups: dict[SamplingParams, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.params, []).append(i)
        out: list[Any] = [None] * len(items)
        loop = asyncio.get_running_loop()
        for params, idx in groups.items():
            group = [items[i] for i in idx]
            self.metrics.generating(len(group))
            try:
                res = await loop.run_in_executor(self._engine_pool, self._generate_blocking, group, params)
                for i, r in zip(idx, res):
                    out[i] = r[0]
            except Exception as e:          # handed to each caller of this group, never a crash
                log.exception("generation failed")
                for i in idx:
                    out[i] = e
            finally:
                self.metrics.generating(-len(group))
        return out

    def _generate_blocking(self, group: list[_Gen], params: SamplingParams):
        with self._engine_lock:
            return self.engine.generate([g.ids for g in group], params, stop=lambda i: group[i].stopped())

    async def generate(self, messages: list[dict], *, max_tokens: int | None, temperature: float,
                       top_p: float = 1.0, seed: int | None = None, field: str = "messages"):
        """The completion, after the token budget is checked: the prompt's length in
        tokens (`max_prompt_tokens`, 413) and `max_tokens` (over the limit: 422, never
        lowered). Stopped when the client goes or `request_timeout_s` runs out (504)."""
        from e2e_reme.simulators.policies.models import plain_messages
        t0 = time.monotonic()
        want = max_tokens or self.cfg.max_tokens
        if want > self.cfg.max_tokens_limit:
            raise ApiError(422, f"max_tokens: {want} is more than this server allows (max_tokens_limit "
                                f"{self.cfg.max_tokens_limit}); ask for at most {self.cfg.max_tokens_limit}",
                           field="max_tokens")
        what = "report" if field == "report" else "conversation"
        try:
            ids = await self._light(prompt_ids, self.tokenizer, plain_messages(messages))
        except ValueError as e:
            raise ApiError(422, f"{field}: {e}", field=field) from None
        if len(ids) > self.cfg.max_prompt_tokens:
            raise ApiError(413, f"{field}: the prompt is {len(ids)} tokens, more than this server accepts "
                                f"(max_prompt_tokens {self.cfg.max_prompt_tokens}); send a shorter {what} (fewer "
                                f"symptoms, logs or evidence)", field=field, kind="context_length_exceeded")
        if self.context:
            room = self.context - len(ids)
            if room < 1:
                raise ApiError(413, f"{field}: the prompt is {len(ids)} tokens and the model's context is "
                                    f"{self.context}; send a shorter {what} (fewer symptoms, logs or evidence)",
                               field=field, kind="context_length_exceeded")
            want = min(want, room)      # the model cannot write past its context: finish_reason "length"
        budget = self.cfg.request_timeout_s
        item = _Gen(ids, SamplingParams(temperature=float(temperature), top_p=float(top_p), max_tokens=int(want),
                                        seed=seed), deadline=t0 + budget)
        try:
            c = await asyncio.wait_for(self._generate(item), timeout=budget + 30)
        except asyncio.CancelledError:
            item.cancel.set()                   # the client went away: its row stops at the next token
            self.metrics.stopped("client_gone")
            raise
        except asyncio.TimeoutError:
            item.cancel.set()
            c = None
        if isinstance(c, Exception):
            rid = uuid.uuid4().hex[:8]
            log.error("generation failed (error id %s): %s: %s", rid, type(c).__name__, c)
            raise ApiError(500, f"the model failed to generate ({type(c).__name__}); see the server log, error id "
                                f"{rid}", kind="server_error")
        if c is None or c.finish_reason == "cancelled":
            self.metrics.stopped("time_limit")
            raise ApiError(504, f"the generation took longer than this server allows (request_timeout_s "
                                f"{budget:g} s) and was stopped; ask for fewer tokens (max_tokens) or send a "
                                f"shorter {what}", kind="timeout_error")
        self.metrics.tokens(len(c.prompt_ids), len(c.completion_ids))
        return c

    async def _light(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._light_pool, fn, *args)

    # ---- plumbing ----------------------------------------------------------------------------

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        kind, params = _media_type(request.headers.get("content-type"))
        if kind != "application/json" or params.get("charset", "utf-8") != "utf-8":
            raise ApiError(415, "Content-Type: this endpoint takes JSON only; send the header 'Content-Type: "
                                "application/json' (UTF-8)", field="Content-Type", kind="invalid_request_error")
        limit = self.cfg.max_body_bytes
        cl = request.headers.get("content-length")
        if cl and cl.isdigit() and int(cl) > limit:
            raise ApiError(413, f"the request body is {int(cl)} bytes, more than this server accepts ({limit}); "
                                f"send a smaller report (fewer observations, logs or evidence)", kind="too_large")
        chunks, size = [], 0
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), timeout=self.cfg.body_timeout_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise ApiError(408, f"the body did not arrive: nothing for {self.cfg.body_timeout_s:g} s "
                                    f"(body_timeout_s); send it at once", kind="timeout_error") from None
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is more than {limit} bytes, the most this server accepts; "
                                    f"send a smaller report (fewer observations, logs or evidence)", kind="too_large")
            chunks.append(chunk)
        try:
            obj = await self._light(parse_body, b"".join(chunks))
            return model.model_validate(obj)
        except BodyError as e:
            raise ApiError(e.status, e.message, field=e.field) from None
        except ValidationError as e:
            msg, details = describe_errors(e)
            raise ApiError(422, msg, field=details[0]["field"] if details else None, details=details) from None

    def _check_host(self, request: Request) -> None:
        """DNS rebinding: a page of another site that made its name resolve here still
        sends its own name as Host."""
        host = (request.headers.get("host") or "").strip().lower()
        if host not in self.hosts:
            raise ApiError(421, f"Host: '{host[:100]}' is not a name this server answers to (allowed_hosts: "
                                f"{', '.join(sorted(self.hosts))}); use one of those in the URL",
                           field="Host", kind="permission_error")

    def _scrub(self, obj: Any) -> Any:
        """Absolute paths of this machine out of an answer: the workdir, the model's
        directory, the dry-run's temporary directory."""
        if isinstance(obj, str):
            if "/" in obj:
                for prefix, name in self._paths:
                    obj = obj.replace(prefix, name)
                obj = _TMP_PATH.sub("<tmp>", obj)
            return obj
        if isinstance(obj, dict):
            return {k: self._scrub(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._scrub(v) for v in obj]
        return obj

    async def _answer(self, route: str, handler, request: Request, count: bool = True) -> Response:
        t0 = time.monotonic()
        try:
            self._check_host(request)
            resp = await handler(request)
        except ApiError as e:
            resp = JSONResponse(self._scrub(e.body()), status_code=e.status, headers=e.headers)
        except asyncio.CancelledError:
            self.metrics.request(route, 499, time.monotonic() - t0)      # the client went away
            raise
        except Exception as e:
            rid = uuid.uuid4().hex[:8]
            log.exception("internal error %s on %s", rid, route)
            resp = JSONResponse({"error": {"message": f"internal error ({type(e).__name__}); see the server log, "
                                                      f"error id {rid}", "type": "server_error", "code": 500}},
                                status_code=500)
        if count:
            self.metrics.request(route, resp.status_code, time.monotonic() - t0)
        return resp

    def model_info(self) -> dict:
        return dict(self.public)

    # ---- routes ------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self, request: Request) -> Response:
        return await self._answer("/healthz", self._healthz, request, count=False)

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.public["name"], "engine": self.public["engine"],
                             "adapter": self.public["adapter"], "execute_enabled": self.cfg.execute_enabled})

    @api.get("/metrics")
    async def metrics_text(self, request: Request) -> Response:
        return await self._answer("/metrics", self._metrics_text, request, count=False)

    async def _metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._answer("/v1/models", self._models, request)

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.public["name"], "object": "model", "created": self.created, "owned_by": "e2e-reme",
             "engine": self.public["engine"], "base": self.public["base"], "adapter": self.public["adapter"]}]})

    @api.post("/v1/remediate")
    async def remediate(self, request: Request) -> Response:
        return await self._answer("/v1/remediate", self._remediate, request)

    async def _remediate(self, request: Request) -> Response:
        t0 = time.monotonic()
        req: RemediateRequest = await self._body(request, RemediateRequest)
        p = await asyncio.to_thread(plan, self.cfg, req, request.headers.get("authorization"))
        rid = new_request_id()
        messages = await self._light(self._messages, p)
        if req.answer is not None:
            text, tokens, finish, source = req.answer, {"prompt": 0, "completion": 0, "total": 0}, None, "request"
            gen_s = 0.0
        else:
            g0 = time.monotonic()
            c = await self.generate(messages, max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed,
                                    field="report")
            gen_s = time.monotonic() - g0
            text, finish, source = c.text, c.finish_reason, "model"
            tokens = {"prompt": len(c.prompt_ids), "completion": len(c.completion_ids),
                      "total": len(c.prompt_ids) + len(c.completion_ids)}
        r0 = time.monotonic()
        result = await asyncio.get_running_loop().run_in_executor(self._run_pool, self.runner.run, p, text, rid)
        if result.get("workdir"):
            result["workdir"] = f"requests/{rid}"        # under the server's workdir
        if result.get("gate") and not result["gate"]["ok"]:
            self.metrics.gate_refusal(result["gate"]["rules"])
        if p.execute:
            v = result.get("verdict") or {}
            self.metrics.execution("not_run" if not result["executed"] else "not_judged" if not v.get("judged")
                                   else "success" if v.get("success") else "failure")
        body = {"id": rid, "object": "remediation", "mode": req.mode, "sandbox": req.sandbox,
                "inventory": p.hosts, "answer_source": source,
                "model": self.model_info() if source == "model" else None,
                "answer": text, "finish_reason": finish, "tokens": tokens, **result,
                "latency_s": {"generate": round(gen_s, 3), "pipeline": round(time.monotonic() - r0, 3),
                              "total": round(time.monotonic() - t0, 3)}}
        body.setdefault("verdict", None)
        return JSONResponse(self._scrub(body))

    @staticmethod
    def _messages(p) -> list[dict]:
        """The prompt for a checked request; a report the prompt cannot be written from is
        a 422 naming the part of it that is malformed."""
        try:
            return messages_for(p)
        except (TypeError, AttributeError, KeyError, ValueError) as e:
            rep = p.request.report
            field = "report"
            for part, empty in (("evidence", {}), ("target", None), ("observations", {})):
                try:
                    p.request.report = rep.model_copy(update={part: empty})
                    messages_for(p)
                    field = f"report.{part}"
                    break
                except (TypeError, AttributeError, KeyError, ValueError):
                    continue
                finally:
                    p.request.report = rep
            raise ApiError(422, f"{field}: has a shape a diagnosis report cannot have ({type(e).__name__}: "
                                f"{str(e)[:120]}); send it as DiagnosisReport.to_dict() writes it",
                           field=field) from None

    @api.api_route("/ui", methods=["GET", "HEAD", "POST"], include_in_schema=False)
    async def console_root(self, request: Request) -> Response:
        return await self._answer("/ui", self.console.handle, request)

    @api.api_route("/ui/{rest:path}", methods=["GET", "HEAD", "POST"], include_in_schema=False)
    async def console_page(self, request: Request, rest: str) -> Response:
        return await self._answer("/ui", self.console.handle, request)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._answer("/v1/chat/completions", self._chat, request)

    async def _chat(self, request: Request) -> Response:
        req: ChatRequest = await self._body(request, ChatRequest)
        if req.model and req.model not in self.names:
            raise ApiError(404, f"model: this server serves '{self.info['name']}', not '{req.model}'; send that "
                                f"name or omit model (GET /v1/models lists it)", field="model",
                           kind="model_not_found")
        messages = [_message_dict(m) for m in req.messages]
        c = await self.generate(messages, max_tokens=req.max_completion_tokens or req.max_tokens,
                                temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        cid, created, name = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time()), self.info["name"]
        usage = {"prompt_tokens": len(c.prompt_ids), "completion_tokens": len(c.completion_ids),
                 "total_tokens": len(c.prompt_ids) + len(c.completion_ids)}
        if not req.stream:
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": name,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                              "finish_reason": c.finish_reason}],
                                 "usage": usage})
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(cid, created, name, c.text, c.finish_reason, usage if include_usage else None),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_app(cfg: ServeConfig):
    """The bound application for `serve.run`, with replicas, autoscaling and resources
    from the config. The token must already be read (`cfg.with_token()`)."""
    import dataclasses
    opts: dict[str, Any] = dict(max_ongoing_requests=cfg.max_ongoing_requests,
                                ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus})
    if cfg.autoscaling:
        opts["autoscaling_config"] = dict(cfg.autoscaling)
    else:
        opts["num_replicas"] = cfg.num_replicas
    d = dataclasses.asdict(cfg)
    d["sandboxes"] = list(cfg.sandboxes)
    return RemedServer.options(**opts).bind(d)


def app_builder(args: dict) -> Any:
    """`serve run e2e_reme.serve.app:app_builder model=DIR` or a config file's `args`:
    the same settings as `remed serve`'s config file; relative paths are resolved against
    the directory `serve run` runs in."""
    from .launch import resolve_paths
    cfg = resolve_paths(ServeConfig.from_mapping({k: v for k, v in (args or {}).items() if k != "token_sha256"}))
    if not cfg.model:
        raise ValueError("serve config: model is required: the local model directory to serve (args: model: DIR)")
    return build_app(cfg.with_token())
