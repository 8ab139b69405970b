"""The Ray Serve application: one FastAPI ingress deployment holding the model.

    POST /v1/remediate          a diagnosis report (+ inventory) -> playbook, gate verdict,
                                syntax check, tokens, model; mode dry-run or execute
    POST /v1/chat/completions   OpenAI-compatible, `stream: true` answers as SSE
    GET  /v1/models             OpenAI-compatible
    GET  /healthz               {"status": "ok", model...}
    GET  /metrics               this replica's Prometheus text (serve/metrics.py)

Concurrent generations are batched dynamically (`@serve.batch`: up to `max_batch_size`
prompts, waiting at most `batch_wait_timeout_s` for a batch to fill); each batch runs in a
worker thread so the replica keeps answering /healthz meanwhile. A request whose client
disconnects is cancelled by Serve: if it is still waiting for a batch it leaves the queue,
and its slot (`max_ongoing_requests`) is free again at once.

Started by `remed serve` (serve/launch.py) or by `serve run configs/serve.yaml`, whose
`import_path` is `e2e_reme.serve.app:app_builder` with the config's `args`.
"""


import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve

from e2e_reme.train.format import prompt_ids
from e2e_reme.train.rollout import SamplingParams

from .config import ServeConfig
from .remediate import ApiError, Runner, messages_for, new_request_id, plan
from .openai_compat import context_length as _context_length, message_dict as _message_dict, sse as _sse
from .schemas import ChatRequest, RemediateRequest, describe_errors

log = logging.getLogger("e2e_reme.serve")
api = FastAPI(title="E2E-REME", description="Remediation playbooks from diagnosis reports; OpenAI-compatible chat.",
              docs_url=None, redoc_url=None)


class _Gen:
    """One generation in a batch: prompt token ids and its sampling parameters."""
    __slots__ = ("ids", "params")

    def __init__(self, ids: list[int], params: SamplingParams):
        self.ids, self.params = ids, params


@serve.deployment(name="Remed")
@serve.ingress(api)
class RemedServer:
    def __init__(self, config: dict):
        from .engine import load_engine
        from .metrics import Metrics
        self.cfg = ServeConfig.from_mapping(config)
        self.engine, self.info = load_engine(self.cfg.model, kind=self.cfg.engine, device=self.cfg.device,
                                             dtype=self.cfg.dtype, batch_size=self.cfg.max_batch_size)
        self.tokenizer = self.engine.tokenizer
        self.context = _context_length(self.engine)
        self.metrics = Metrics()
        self.runner = Runner(self.cfg)
        self._engine_lock = threading.Lock()
        self.names = {self.info["name"], self.info["path"], self.cfg.model}
        self.created = int(time.time())
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
        for params, idx in groups.items():
            try:
                res = await asyncio.to_thread(self._generate_blocking, [items[i].ids for i in idx], params)
                for i, r in zip(idx, res):
                    out[i] = r[0]
            except Exception as e:          # handed to each caller of this group, never a crash
                log.exception("generation failed")
                for i in idx:
                    out[i] = e
        return out

    def _generate_blocking(self, prompts: list[list[int]], params: SamplingParams):
        with self._engine_lock:
            return self.engine.generate(prompts, params)

    async def generate(self, messages: list[dict], *, max_tokens: int | None, temperature: float,
                       top_p: float = 1.0, seed: int | None = None, field: str = "messages", clamp: bool = False):
        from e2e_reme.simulators.policies.models import plain_messages
        ids = await asyncio.to_thread(prompt_ids, self.tokenizer, plain_messages(messages))
        want = max_tokens or self.cfg.max_tokens
        if clamp:                   # OpenAI clients ask for what they like; the limit holds
            want = min(want, self.cfg.max_tokens_limit)
        if want > self.cfg.max_tokens_limit:
            raise ApiError(422, f"max_tokens: {want} is more than this server allows ({self.cfg.max_tokens_limit}); "
                                f"ask for fewer", field="max_tokens")
        if self.context:
            room = self.context - len(ids)
            if room < 1:
                raise ApiError(413, f"{field}: the prompt is {len(ids)} tokens and the model's context is "
                                    f"{self.context}; send a shorter {('report' if field == 'report' else 'conversation')} "
                                    f"(fewer symptoms, logs or evidence)", field=field, kind="context_length_exceeded")
            want = min(want, room)
        c = await self._generate(_Gen(ids, SamplingParams(temperature=float(temperature), top_p=float(top_p),
                                                          max_tokens=int(want), seed=seed)))
        if isinstance(c, Exception):
            raise ApiError(500, f"the model failed to generate: {type(c).__name__}: {str(c)[:300]}",
                           kind="server_error")
        self.metrics.tokens(len(c.prompt_ids), len(c.completion_ids))
        return c

    # ---- plumbing ----------------------------------------------------------------------------

    async def _body(self, request: Request, model: type[BaseModel]) -> Any:
        limit = self.cfg.max_body_bytes
        cl = request.headers.get("content-length")
        if cl and cl.isdigit() and int(cl) > limit:
            raise ApiError(413, f"the request body is {int(cl)} bytes, more than this server accepts ({limit}); "
                                f"send a smaller report (fewer observations, logs or evidence)", kind="too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is more than {limit} bytes, the most this server accepts; "
                                    f"send a smaller report (fewer observations, logs or evidence)", kind="too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError:
            raise ApiError(400, "the body is not UTF-8 text; send JSON encoded as UTF-8") from None
        except json.JSONDecodeError as e:
            raise ApiError(400, f"the body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); send a "
                                f"JSON object with Content-Type: application/json") from None
        if not isinstance(obj, dict):
            raise ApiError(400, f"the body is a JSON {type(obj).__name__}; send a JSON object")
        try:
            return model.model_validate(obj)
        except ValidationError as e:
            msg, details = describe_errors(e)
            raise ApiError(422, msg, field=details[0]["field"] if details else None, details=details) from None

    async def _answer(self, route: str, handler, *args) -> Response:
        t0 = time.monotonic()
        try:
            resp = await handler(*args)
        except ApiError as e:
            resp = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except asyncio.CancelledError:
            self.metrics.request(route, 499, time.monotonic() - t0)      # the client went away
            raise
        except Exception as e:
            rid = uuid.uuid4().hex[:8]
            log.exception("internal error %s on %s", rid, route)
            resp = JSONResponse({"error": {"message": f"internal error ({type(e).__name__}); see the server log, "
                                                      f"error id {rid}", "type": "server_error", "code": 500}},
                                status_code=500)
        self.metrics.request(route, resp.status_code, time.monotonic() - t0)
        return resp

    def model_info(self) -> dict:
        return dict(self.info)

    # ---- routes ------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> Response:
        return JSONResponse({"status": "ok", "model": self.info["name"], "engine": self.info["engine"],
                             "adapter": self.info["adapter"], "execute_enabled": self.cfg.execute_enabled})

    @api.get("/metrics")
    async def metrics_text(self) -> Response:
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/models")
    async def models(self) -> Response:
        return await self._answer("/v1/models", self._models)

    async def _models(self) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.info["name"], "object": "model", "created": self.created, "owned_by": "e2e-reme",
             "root": self.info["path"], "engine": self.info["engine"], "adapter": self.info["adapter"]}]})

    @api.post("/v1/remediate")
    async def remediate(self, request: Request) -> Response:
        return await self._answer("/v1/remediate", self._remediate, request)

    async def _remediate(self, request: Request) -> Response:
        t0 = time.monotonic()
        req: RemediateRequest = await self._body(request, RemediateRequest)
        p = await asyncio.to_thread(plan, self.cfg, req, request.headers.get("authorization"))
        rid = new_request_id()
        messages = messages_for(p)
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
        result = await asyncio.to_thread(self.runner.run, p, text, rid)
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
        return JSONResponse(body)

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
                                temperature=req.temperature, top_p=req.top_p, seed=req.seed, clamp=True)
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
