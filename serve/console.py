"""The operator's review console on the Serve application: `/ui`, same process, same port.

    GET  /ui                                 new incident: paste a report, or observe a sandbox's
    GET  /ui/decisions/<id>                  a proposal and what became of it (stable URL)
    GET  /ui/history                         every decision; ?fault= &outcome= &release= &status=
    GET  /ui/login, POST /ui/login, POST /ui/logout
    GET  /ui/static/<file>                   the console's one script and stylesheets
    POST /ui/api/observe                     {sandbox} -> the sandbox's diagnosis report, observed now
    POST /ui/api/propose                     {report, sandbox?, answer?, temperature?, operator?} -> {id, url}
    GET  /ui/api/decisions/<id>              the decision as JSON (the page polls it while it executes)
    POST /ui/api/decisions/<id>/regenerate   another sample for the same report -> a new decision
    POST /ui/api/decisions/<id>/approve      Authorization: Bearer TOKEN, {operator} -> executed, verdict
    POST /ui/api/decisions/<id>/reject       {operator, reason}

Every proposal, approval and outcome is a row of the decision store (serve/review.py,
`review_db`): proposing records it, approving moves it to executing (one winner between
any two approvals) and runs it through the same path as `POST /v1/remediate` in execute mode
(`plan` with the operator's bearer token, `Runner.run`), and the verdict, or the
interruption a shutdown causes, is recorded from the thread that ran it, whether or not
the browser is still there. At start, `executing` rows of a dead server become interrupted.

Security (docs/serve.md, "Review console"):
- the model's playbook and the report are untrusted: rendered by Jinja2 with autoescape and
  Pygments (escaped HTML); nothing the model wrote ever reaches a <script>. No inline script
  at all: the one script is a static file and the Content-Security-Policy says so
  (`script-src 'self'`, `frame-ancestors 'none'`), with `X-Content-Type-Options: nosniff`;
- reading needs a login unless `review_public_read`: the operator types the execute token
  once (POST /ui/login) and gets an HttpOnly, SameSite=Strict cookie holding an expiry and an
  HMAC under a key derived from the token's digest, never the token; a new token ends every
  session;
- every POST needs the same origin (Origin, else Referer, naming a host of the allowlist and
  the request's own Host), the header `X-Remed-Console` (a custom header: a cross-site page
  cannot send it without a CORS preflight, which this server never answers), JSON, and the
  CSRF token of the page (an HMAC of the session); proposing needs a login; approving needs
  the bearer token itself, typed by the operator, checked as /v1 does (`check_token`, in
  constant time); the token is never written to a page, a log or the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlencode, urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .remediate import ApiError, Plan, check_token, new_request_id, plan, refuse_if_busy, resolve_sandbox
from .review import Decision, ReviewError, ReviewStore
from .schemas import (MAX_ANSWER_CHARS, MAX_SEED, BodyError, RemediateRequest, Report, describe_errors, parse_body)

log = logging.getLogger("e2e_reme.serve.console")

HERE = Path(__file__).parent
TEMPLATES = HERE / "console_templates"
STATIC = HERE / "console_static"
COOKIE = "remed_console"
CONSOLE_HEADER = "x-remed-console"
CSRF_HEADER = "x-csrf-token"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
                    "Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Resource-Policy": "same-origin"}
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
_ID = r"(?P<id>[0-9a-f]{32})"


class ProposeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    report: str = Field(min_length=1, max_length=256 * 1024)      # the pasted text: parsed and checked here
    sandbox: Optional[str] = None
    answer: Optional[str] = Field(default=None, max_length=MAX_ANSWER_CHARS)
    operator: str = Field(default="", max_length=64)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: Optional[int] = Field(default=None, ge=1)


class ObserveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sandbox: str = Field(min_length=1, max_length=31)


class ApproveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    operator: str = Field(min_length=1, max_length=64)


class RejectBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    operator: str = Field(min_length=1, max_length=64)
    reason: str = Field(min_length=1, max_length=4000)


class RegenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    operator: str = Field(default="", max_length=64)


class LoginBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=4096)


class Console:
    """The console of one replica: `server` is its RemedServer (engine, runner, checks)."""

    def __init__(self, server: Any):
        import jinja2
        self.srv, self.cfg = server, server.cfg
        self.store: ReviewStore | None = None
        self.store_error = ""
        try:                 # a console without its database answers 503; the /v1 API is unaffected
            self.store = ReviewStore(self.cfg.review_db)
            for d in self.store.recover_interrupted("the server stopped while this decision was executing"):
                log.warning("decision %s: recorded as interrupted (%s)", d.id, d.reason)
        except ReviewError as e:
            self.store_error = e.message
            log.error("the review console is off: %s", e.message)
        seed = (self.cfg.token_sha256 or secrets.token_hex(32)).encode()
        self._key = hmac.new(seed, b"remed-console-v1", hashlib.sha256).digest()
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True)
        self.env.filters["when"] = _when
        self.env.filters["tojson_attr"] = lambda v: json.dumps(v, sort_keys=True, default=str)
        self.routes = [
            ("GET", re.compile(r"/ui/?"), self.page_new),
            ("GET", re.compile(rf"/ui/decisions/{_ID}"), self.page_decision),
            ("GET", re.compile(r"/ui/history"), self.page_history),
            ("GET", re.compile(r"/ui/login"), self.page_login),
            ("POST", re.compile(r"/ui/login"), self.login),
            ("POST", re.compile(r"/ui/logout"), self.logout),
            ("GET", re.compile(r"/ui/static/(?P<name>[a-z0-9_-]+\.(js|css))"), self.static),
            ("POST", re.compile(r"/ui/api/observe"), self.observe),
            ("POST", re.compile(r"/ui/api/propose"), self.propose),
            ("GET", re.compile(rf"/ui/api/decisions/{_ID}"), self.decision_json),
            ("POST", re.compile(rf"/ui/api/decisions/{_ID}/regenerate"), self.regenerate),
            ("POST", re.compile(rf"/ui/api/decisions/{_ID}/approve"), self.approve),
            ("POST", re.compile(rf"/ui/api/decisions/{_ID}/reject"), self.reject),
        ]

    # ---- dispatch ----------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        path, method = request.url.path, request.method.upper()
        if self.store is None:
            return self._headers(self._error(request, 503, f"the review console is off: {self.store_error}"))
        allowed = []
        for m, rx, fn in self.routes:
            match = rx.fullmatch(path)
            if match:
                if m == method or (m == "GET" and method == "HEAD"):
                    return self._headers(await self._call(fn, request, match.groupdict(), path))
                allowed.append(m)
        if allowed:
            return self._headers(self._error(request, 405, f"method {method} is not allowed on {path}; use "
                                                           f"{' or '.join(sorted(set(allowed)))}"))
        return self._headers(self._error(request, 404, f"no such page: {path[:100]}; the console is at /ui, "
                                                       f"/ui/history and /ui/decisions/ID"))

    async def _call(self, fn, request: Request, args: dict, path: str) -> Response:
        try:
            return await fn(request, **args)
        except ApiError as e:
            return self._error(request, e.status, e.message, headers=e.headers)
        except ReviewError as e:
            return self._error(request, e.http_status, e.message)

    def _headers(self, resp: Response) -> Response:
        for k, v in SECURITY_HEADERS.items():
            if k == "Cache-Control" and "cache-control" in resp.headers:
                continue
            resp.headers[k] = v
        return resp

    def _error(self, request: Request, status: int, message: str, headers: dict | None = None) -> Response:
        message = self.srv._scrub(message)
        if request.url.path.startswith("/ui/api/") or request.method != "GET":
            return JSONResponse({"error": {"message": message, "code": status}}, status_code=status,
                                headers=headers)
        return self._page(request, "message.html", status=status, title=f"{status}", message=message)

    # ---- authentication, origin, CSRF ----------------------------------------------------------

    def _sign(self, what: str) -> str:
        return hmac.new(self._key, what.encode(), hashlib.sha256).hexdigest()

    def session_ok(self, request: Request) -> bool:
        """A valid, unexpired console login (the cookie is `EXPIRY.HMAC`, never the token)."""
        if not self.cfg.execute_enabled:
            return False
        value = request.cookies.get(COOKIE, "")
        exp, _, mac = value.partition(".")
        if not exp.isdigit() or len(mac) != 64 or int(exp) < time.time():
            return False
        return hmac.compare_digest(mac, self._sign(f"session|{exp}"))

    def csrf_token(self, request: Request) -> str:
        return self._sign("csrf|" + (request.cookies.get(COOKIE, "") if self.session_ok(request) else "anonymous"))

    def can_read(self, request: Request) -> bool:
        return self.cfg.review_public_read or self.session_ok(request)

    def _need_read(self, request: Request) -> Response | None:
        if self.can_read(request):
            return None
        if not self.cfg.execute_enabled:
            return self._error(request, 403, "the review console needs the execute token configured at start "
                                             "(token_file or $REMED_SERVE_TOKEN), or review_public_read: true "
                                             "for read-only views")
        if request.url.path.startswith("/ui/api/"):
            return self._error(request, 401, "log in to the console first (/ui/login, with the execute token)")
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/ui/login?" + urlencode({"next": target}), status_code=303)

    def _check_post(self, request: Request, *, login: bool = True) -> None:
        """What every state-changing request needs: same origin, the console's header, the
        page's CSRF token, and (unless `login` is False) a console login."""
        host = (request.headers.get("host") or "").strip().lower()
        origin = request.headers.get("origin")
        source = origin if origin and origin != "null" else request.headers.get("referer")
        if not source:
            raise ApiError(403, "this request has neither Origin nor Referer: send it from the console's own page",
                           kind="permission_error")
        parts = urlsplit(source)
        where = (parts.netloc or "").lower()
        if parts.scheme not in ("http", "https") or where != host or where not in self.srv.hosts:
            raise ApiError(403, f"cross-origin request refused: it comes from '{source[:100]}', not from this "
                                f"server's own pages ({host}); use the console at /ui", kind="permission_error")
        if request.headers.get(CONSOLE_HEADER) != "1":
            raise ApiError(403, "the header 'X-Remed-Console: 1' is missing: send the request from the console's "
                                "own page", kind="permission_error")
        if not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), self.csrf_token(request)):
            raise ApiError(403, "the page's CSRF token is missing or stale: reload the page and try again",
                           kind="permission_error")
        if login and not self.session_ok(request):
            raise ApiError(401, "log in to the console first (/ui/login, with the execute token)",
                           kind="authentication_error")

    async def _json(self, request: Request, model):
        return await self.srv._body(request, model)

    # ---- pages -------------------------------------------------------------------------------

    def _page(self, request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(
            csrf=self.csrf_token(request), logged_in=self.session_ok(request), model=self.srv.public["name"],
            execute_enabled=self.cfg.execute_enabled, **ctx)
        return HTMLResponse(html, status_code=status)

    async def page_new(self, request: Request) -> Response:
        if (r := self._need_read(request)) is not None:
            return r
        sandboxes = await asyncio.to_thread(self._sandboxes) if self.session_ok(request) else []
        return self._page(request, "new.html", title="New incident", sandboxes=sandboxes,
                          answers=self.cfg.review_answers, max_tokens=self.cfg.max_tokens)

    async def page_decision(self, request: Request, id: str) -> Response:
        if (r := self._need_read(request)) is not None:
            return r
        d = self.store.get(id)
        if d is None:
            return self._error(request, 404, f"decision {id} is unknown; see /ui/history")
        return self._page(request, "decision.html", title=f"Decision {id[:8]}", d=d, view=decision_view(d),
                          regen_temperature=self.cfg.review_regenerate_temperature)

    async def page_history(self, request: Request) -> Response:
        if (r := self._need_read(request)) is not None:
            return r
        q = request.query_params
        filters = {k: (q.get(k) or None) for k in ("fault", "outcome", "release", "status")}
        page = int(q["page"]) if q.get("page", "").isdigit() and int(q["page"]) < 10 ** 6 else 1
        per = 50
        try:
            rows = self.store.list(**filters, limit=per, offset=(page - 1) * per)
            total = self.store.count(**filters)
        except ReviewError as e:
            return self._error(request, e.http_status, e.message)
        keep = {k: v for k, v in filters.items() if v}
        return self._page(request, "history.html", title="History", rows=[summary(d) for d in rows],
                          facets=self.store.facets(), filters=filters, page=page, total=total, per=per,
                          prev=("?" + urlencode({**keep, "page": page - 1})) if page > 1 else None,
                          next=("?" + urlencode({**keep, "page": page + 1})) if page * per < total else None)

    async def page_login(self, request: Request) -> Response:
        nxt = request.query_params.get("next", "/ui")
        return self._page(request, "login.html", title="Log in", next=safe_next(nxt))

    async def static(self, request: Request, name: str) -> Response:
        if name == "pygments.css":
            return Response(pygments_css(), media_type=STATIC_TYPES[".css"], headers={"Cache-Control": "no-cache"})
        f = STATIC / name
        if not f.is_file():
            return self._error(request, 404, f"no such file: /ui/static/{name}")
        return Response(f.read_bytes(), media_type=STATIC_TYPES[f.suffix], headers={"Cache-Control": "no-cache"})

    # ---- login -------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        self._check_post(request, login=False)
        body: LoginBody = await self._json(request, LoginBody)
        check_token(self.cfg, "Bearer " + body.token)
        exp = int(time.time() + self.cfg.review_session_hours * 3600)
        resp = JSONResponse({"ok": True})
        resp.set_cookie(COOKIE, f"{exp}.{self._sign(f'session|{exp}')}", max_age=int(exp - time.time()),
                        path="/ui", httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return resp

    async def logout(self, request: Request) -> Response:
        self._check_post(request, login=False)
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
        return resp

    # ---- proposing ---------------------------------------------------------------------------

    async def observe(self, request: Request) -> Response:
        self._check_post(request)
        body: ObserveBody = await self._json(request, ObserveBody)
        report = await asyncio.to_thread(self._observe, body.sandbox)
        return JSONResponse({"sandbox": body.sandbox, "report": self.srv._scrub(report)})

    async def propose(self, request: Request) -> Response:
        self._check_post(request)
        body: ProposeBody = await self._json(request, ProposeBody)
        report = parse_report(body.report)
        if body.answer and not self.cfg.review_answers:
            raise ApiError(403, "answer: this server's console proposes the model's playbooks only (review_answers "
                                "is off); leave the playbook field empty", field="answer", kind="permission_error")
        d = await self._propose(report, body.sandbox or None, answer=body.answer or None, operator=body.operator,
                                temperature=body.temperature, max_tokens=body.max_tokens)
        return JSONResponse({"id": d.id, "url": f"/ui/decisions/{d.id}"})

    async def regenerate(self, request: Request, id: str) -> Response:
        self._check_post(request)
        body: RegenerateBody = await self._json(request, RegenerateBody)
        old = self._get(id)
        report = Report.model_validate(old.report)
        d = await self._propose(report, old.sandbox, answer=None, operator=body.operator,
                                temperature=self.cfg.review_regenerate_temperature,
                                seed=secrets.randbelow(MAX_SEED))
        return JSONResponse({"id": d.id, "url": f"/ui/decisions/{d.id}"})

    async def _propose(self, report: Report, sandbox: str | None, *, answer: str | None, operator: str,
                       temperature: float, max_tokens: int | None = None, seed: int | None = None) -> Decision:
        """Generate (or take the operator's answer), check it as a dry-run (in the sandbox's
        jail where one is named: the syntax check), and record the proposal."""
        srv = self.srv
        try:
            req = RemediateRequest(report=report, sandbox=sandbox, temperature=temperature, max_tokens=max_tokens,
                                   seed=seed)
        except ValidationError as e:
            raise ApiError(422, describe_errors(e)[0]) from None
        p = await asyncio.to_thread(self._plan, req)
        messages = await srv._light(srv._messages, p)
        if answer is not None:
            text, tokens, gen_s, source = answer, {"prompt": 0, "completion": 0, "total": 0}, 0.0, "operator"
        else:
            g0 = time.monotonic()
            c = await srv.generate(messages, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                   field="report")
            gen_s, text, source = time.monotonic() - g0, c.text, "model"
            tokens = {"prompt": len(c.prompt_ids), "completion": len(c.completion_ids),
                      "total": len(c.prompt_ids) + len(c.completion_ids), "finish_reason": c.finish_reason}
        res = await asyncio.get_running_loop().run_in_executor(srv._run_pool, srv.runner.run, p, text,
                                                               new_request_id())
        res = srv._scrub(res)
        if res.get("gate") and not res["gate"]["ok"]:
            srv.metrics.gate_refusal(res["gate"]["rules"])
        dry = {k: res.get(k) for k in ("stage", "ok", "error_class", "reason", "syntax_check", "playbook")}
        dry.update(answer_source=source, temperature=temperature, seed=seed)
        return await asyncio.to_thread(
            self.store.propose, release=srv.public["name"], source="sandbox" if sandbox else "pasted",
            report=report.model_dump(), playbook=text, sandbox=sandbox, gate=res.get("gate"), dry_run=dry,
            tokens=tokens, generate_s=round(gen_s, 3), operator=clean_operator(operator))

    def _plan(self, req: RemediateRequest) -> Plan:
        """`plan` for a console proposal: the console's login stands for the token (checked
        by the caller); the sandbox must be one this server may use and not busy."""
        p = plan(self.cfg, req.model_copy(update={"sandbox": None}), None)
        if req.sandbox is None:
            return p
        sb = resolve_sandbox(self.cfg, req.sandbox)
        refuse_if_busy(sb.name)
        return Plan(req, [n.name for n in sb.nodes], sb)

    def _observe(self, name: str) -> dict:
        """The sandbox's diagnosis report, observed now (as the benchmark writes it), under
        its lease so that no run changes it meanwhile."""
        from e2e_reme.simulators.errors import DeployError, NotDeployed
        from e2e_reme.simulators.faults import injected_faults
        from e2e_reme.simulators.reports import build_report
        from e2e_reme.simulators.sandbox.lease import try_acquire
        from e2e_reme.simulators.systems.deploy import load_deployment
        sb = resolve_sandbox(self.cfg, name)
        got = try_acquire(sb.name, "serve console observe")
        if not got.ok:
            raise ApiError(409, f"{got.in_use}; retry when it is done", field="sandbox", kind="conflict")
        try:
            try:
                dep = load_deployment(sb)
            except (NotDeployed, DeployError) as e:
                raise ApiError(409, f"sandbox '{name}': {e}", field="sandbox", kind="conflict") from None
            faults = injected_faults(sb)
            if not faults:
                raise ApiError(409, f"sandbox '{name}' has no active fault to diagnose; inject one (`remed fault "
                                    f"inject`) or paste a report", field="sandbox", kind="conflict")
            return build_report(sb, dep, faults, "full").to_dict()
        finally:
            sb._close_ssh()
            got.release()

    def _sandboxes(self) -> list[dict]:
        """The registry's sandboxes this server may use, with their active faults."""
        import fnmatch
        from e2e_reme.simulators.sandbox.base import list_sandboxes
        out = []
        for r in list_sandboxes():
            if not any(fnmatch.fnmatchcase(r.name, p) for p in self.cfg.sandboxes):
                continue
            try:
                from e2e_reme.simulators.faults import injected_faults
                faults = [f"{f.name} on {f.target.service}" for f in injected_faults(r)]
            except (OSError, ValueError, KeyError) as e:     # an unreadable record: say so, do not hide it
                faults = [f"fault record unreadable: {type(e).__name__}"]
            out.append({"name": r.name, "faults": faults})
        return out

    # ---- deciding ----------------------------------------------------------------------------

    def _get(self, id: str) -> Decision:
        d = self.store.get(id)
        if d is None:
            raise ApiError(404, f"decision {id} is unknown; see /ui/history", kind="not_found_error")
        return d

    async def decision_json(self, request: Request, id: str) -> Response:
        if (r := self._need_read(request)) is not None:
            return r
        d = self._get(id)
        out = {k: v for k, v in d.to_dict().items() if k not in ("report", "playbook")}
        if d.status == "executing":
            started = next((e["at"] for e in reversed(d.events) if e["status"] == "executing"), d.updated_at)
            out["elapsed_s"] = round(time.time() - started, 1)
        return JSONResponse(out)

    async def reject(self, request: Request, id: str) -> Response:
        self._check_post(request)
        body: RejectBody = await self._json(request, RejectBody)
        d = await asyncio.to_thread(self.store.reject, id, operator=clean_operator(body.operator), reason=body.reason)
        return JSONResponse({"id": d.id, "status": d.status})

    async def approve(self, request: Request, id: str) -> Response:
        """The operator's bearer token, then the same execute path as /v1/remediate; the
        verdict (or the interruption) is recorded by the thread that runs it."""
        self._check_post(request, login=False)
        auth = request.headers.get("authorization")
        check_token(self.cfg, auth)
        body: ApproveBody = await self._json(request, ApproveBody)
        d = self._get(id)
        if d.status != "proposed":
            raise ApiError(409, f"decision {id} is {d.status}; only a proposed one can be approved", kind="conflict")
        if not d.sandbox:
            raise ApiError(409, "this proposal names no sandbox to run in; propose it again choosing the sandbox",
                           kind="conflict")
        if d.gate and not d.gate.get("ok"):
            raise ApiError(409, f"the safety gate refused this playbook ({', '.join(d.gate.get('rules') or [])}); "
                                f"it cannot be executed: reject it or regenerate", kind="conflict")
        req = RemediateRequest(report=Report.model_validate(d.report), mode="execute", sandbox=d.sandbox)
        p = await asyncio.to_thread(plan, self.cfg, req, auth)
        await asyncio.to_thread(self.store.start_execution, id, operator=clean_operator(body.operator))
        fut = asyncio.get_running_loop().run_in_executor(self.srv._run_pool, self._execute, d, p)
        status, out = await asyncio.shield(fut)
        return JSONResponse(out, status_code=status)

    def _execute(self, d: Decision, p: Plan) -> tuple[int, dict]:
        """Blocking, in the run pool: run, judge, record; every ending is recorded."""
        rid = new_request_id()
        srv = self.srv
        try:
            res = srv.runner.run(p, d.playbook, rid)
        except ApiError as e:
            known = srv._scrub(e.extra or {})
            if known.get("workdir"):
                known["workdir"] = f"requests/{rid}"
            self.store.interrupt(d.id, known={**known, "request_id": rid, "error": e.message}, reason=e.message)
            return e.status, srv._scrub(e.body())
        except BaseException as e:
            self.store.interrupt(d.id, known={"request_id": rid}, reason=f"the run failed ({type(e).__name__}); "
                                                                           f"see the server log")
            log.exception("decision %s: the run failed", d.id)
            return 500, {"error": {"message": f"the run failed ({type(e).__name__}); see the server log",
                                   "code": 500}}
        if res.get("workdir"):
            res["workdir"] = f"requests/{rid}"
        res = srv._scrub({**res, "request_id": rid})
        v = res.get("verdict") or {}
        outcome = ("infra_failure" if not v.get("judged") or res.get("error_class") == "InternalError"
                   else "success" if v.get("success") else "failure")
        srv.metrics.execution("not_run" if not res["executed"] else "not_judged" if not v.get("judged")
                              else "success" if v.get("success") else "failure")
        done = self.store.finish_execution(d.id, verdict=res.get("verdict"), outcome=outcome,
                                           result={k: x for k, x in res.items() if k != "playbook"})
        return 200, {"id": done.id, "status": done.status, "outcome": done.outcome}


# ---- helpers (pure) ----------------------------------------------------------------------------

def parse_report(text: str) -> Report:
    """A pasted report (the report itself, or a /v1/remediate body holding one) as a checked
    Report, or one ApiError naming what is wrong."""
    try:
        obj = parse_body(text.encode("utf-8", "surrogatepass"))
    except BodyError as e:
        raise ApiError(e.status, "report: " + e.message.replace("the body", "the pasted report"),
                       field="report") from None
    if "report" in obj and "system" not in obj and isinstance(obj["report"], dict):
        obj = obj["report"]
    try:
        return Report.model_validate(obj)
    except ValidationError as e:
        msg, _ = describe_errors(e)
        raise ApiError(422, "the pasted report is not a diagnosis report: " + "; ".join(
            "report." + part for part in msg.split("; ")), field="report") from None


def clean_operator(name: str) -> str:
    return " ".join((name or "").split())[:64]


def safe_next(target: str) -> str:
    """A redirect target after login: a path of this console only."""
    return target if re.fullmatch(r"/ui(/[A-Za-z0-9/_.-]*)?(\?[A-Za-z0-9=&%_.+-]*)?", target or "") else "/ui"


def _when(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts))) if ts else ""


@lru_cache(maxsize=1)
def pygments_css() -> str:
    from pygments.formatters import HtmlFormatter
    return HtmlFormatter(style="default").get_style_defs(".hl")


def highlight_yaml(text: str, lines: list[int]) -> str:
    """The playbook as escaped, highlighted HTML (Pygments escapes every character it
    emits), with the lines the gate names marked."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import YamlLexer
    return highlight(text, YamlLexer(), HtmlFormatter(cssclass="hl", linenos="inline", hl_lines=lines, wrapcode=True))


def violation_line(text: str, v: dict) -> int | None:
    """The 1-based line of the playbook a gate violation names (its play and task), or None."""
    import yaml
    from yaml.nodes import MappingNode, ScalarNode, SequenceNode
    if v.get("play") is None or len(text) > MAX_ANSWER_CHARS:
        return None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except Exception:
        return None
    if not isinstance(root, SequenceNode) or not 0 <= v["play"] < len(root.value):
        return None
    play = root.value[v["play"]]
    task = v.get("task")
    if not task:
        return play.start_mark.line + 1

    def get(node, key):
        if isinstance(node, MappingNode):
            for k, val in node.value:
                if isinstance(k, ScalarNode) and k.value == key:
                    return val
        return None
    if re.fullmatch(r"\w+\[\d+\](\.\w+\[\d+\])*", task):          # a position: tasks[2].block[0]
        node = play
        for key, i in re.findall(r"(\w+)\[(\d+)\]", task):
            node = get(node, key)
            if not isinstance(node, SequenceNode) or int(i) >= len(node.value):
                return None
            node = node.value[int(i)]
        return node.start_mark.line + 1
    stack = [play]
    while stack:
        node = stack.pop()
        if isinstance(node, MappingNode):
            name = get(node, "name")
            if isinstance(name, ScalarNode) and name.value == task and node is not play:
                return node.start_mark.line + 1
            stack.extend(val for _, val in node.value)
        elif isinstance(node, SequenceNode):
            stack.extend(node.value)
    return None


def report_summary(r: dict) -> str:
    parts = [r.get("system") or "?"]
    if r.get("service"):
        parts.append(r["service"])
    if r.get("fault_kind"):
        parts.append(r["fault_kind"])
    sym = (r.get("symptoms") or [""])[0]
    return " / ".join(str(p) for p in parts) + (f": {sym[:120]}" if sym else "")


def summary(d: Decision) -> dict:
    return {"id": d.id, "created_at": d.created_at, "operator": d.operator, "release": d.release,
            "report": report_summary(d.report), "status": d.status, "outcome": d.outcome, "fault": d.fault,
            "sandbox": d.sandbox, "gate_ok": (d.gate or {}).get("ok"),
            "verdict": None if not d.verdict else ("success" if d.verdict.get("success") else "failure")}


def decision_view(d: Decision) -> dict:
    """What the decision page shows, precomputed (the template only escapes and lays out)."""
    dry = d.dry_run or {}
    extracted = dry.get("playbook")
    shown = extracted if extracted else d.playbook
    violations = []
    for v in (d.gate or {}).get("violations") or []:
        violations.append({**v, "line": violation_line(shown, v) if extracted else None})
    lines = sorted({v["line"] for v in violations if v["line"]})
    return {"summary": report_summary(d.report), "playbook_html": highlight_yaml(shown, lines),
            "extracted": bool(extracted), "violations": violations, "hl_lines": lines,
            "report_json": json.dumps(d.report, indent=2, ensure_ascii=False),
            "result": d.result or {}, "verdict": d.verdict, "dry": dry,
            "can_approve": d.status == "proposed" and bool(d.sandbox) and bool((d.gate or {}).get("ok")),
            "symptoms": list(d.report.get("symptoms") or [])[:20]}
