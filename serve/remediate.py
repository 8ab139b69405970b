"""`POST /v1/remediate` without Ray: request checks, the prompt, and what happens to the
answer, through the benchmark's own execution path (`simulators.playbook.execution.run_pipeline`)
and verifier. The Serve deployment (serve/app.py) calls these; tests may too.

Modes:
    dry-run   (default) extract + parse + the safety gate; the syntax check only where a
              sandbox is named, and then in that sandbox's jailed controller with
              execute=False (model output is never interpreted on the host). Nothing runs.
    execute   the pipeline against a named sandbox (jailed controller, per-sandbox network
              rules, node limits: docs/containment.md), then the verifier's verdict against
              the sandbox's stored baseline, with its evidence.

Security (docs/serve.md): naming a sandbox at all needs the bearer token configured at
start (no token configured: refused); the sandbox must be one this project's registry
holds (`remed sandbox ls`) and match the server's `sandboxes` patterns; the inventory is
always the sandbox's own (written by the jailed controller from the sandbox record), never
one the client sends.

Leases (simulators/sandbox/lease.py): a request that names a sandbox takes the sandbox's
lease for its whole run, without waiting; a sandbox another user holds (another request,
another replica or server, a benchmark or fleet slot, any process of the host) is a 409
that names the holder. While the lease is held a guard process stands by: should this
process die mid-run, it ends the jail and what the playbook left in the nodes, records
the interruption in the request's directory, then lets the lease go.

Shutdown: a Runner stops its runs when `stopping()` turns true (the Serve application
being deleted, as `remed serve` does first on SIGTERM or Ctrl-C; this interpreter
shutting down; or `shutdown()`): the jail is killed, the pipeline ends the playbook's
leftovers, nothing is verified, and the request is answered 503 with what is known (also
written to `interrupted.json` in its directory).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from e2e_reme.simulators.policies.prompt import build_messages

from .config import ServeConfig
from .schemas import RemediateRequest


class ApiError(Exception):
    """A request the server refuses: an HTTP status and a message naming the fix."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None, details: list | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind
        self.headers, self.details = headers or {}, details
        self.extra = extra or {}          # what is known besides the error (a stopped run's stage, leftovers)

    def body(self) -> dict:
        err: dict[str, Any] = {"message": self.message, "type": self.kind, "code": self.status}
        if self.field:
            err["param"] = self.field
        if self.details:
            err["details"] = self.details
        return {**self.extra, "error": err}


def check_token(cfg: ServeConfig, authorization: str | None) -> None:
    """Execute-mode authorisation: 403 when the server has no token (disabled), 401 when
    none is presented, 403 when it is wrong. Compared in constant time, by digest."""
    if not cfg.execute_enabled:
        raise ApiError(403, "execute mode is disabled on this server (no token configured at start); "
                            f"restart it with the token in ${cfg.token_env} or token_file, or use mode dry-run "
                            "without a sandbox", kind="permission_error")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "this request needs the execute token: send the header 'Authorization: Bearer TOKEN'",
                       kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})
    digest = hashlib.sha256(token.strip().encode()).hexdigest()
    if not hmac.compare_digest(digest, cfg.token_sha256 or ""):
        raise ApiError(403, "the bearer token is wrong: send the token this server was started with",
                       kind="permission_error")


def resolve_sandbox(cfg: ServeConfig, name: str):
    """A handle on a live sandbox of this project's registry that the config allows."""
    if not cfg.sandboxes:
        raise ApiError(403, f"sandbox '{name}': this server may use no sandbox (its `sandboxes` setting is empty); "
                            f"restart it with --sandbox PATTERN (config `sandboxes`) naming the ones it may use",
                       field="sandbox", kind="permission_error")
    if not any(fnmatch.fnmatchcase(name, p) for p in cfg.sandboxes):
        raise ApiError(403, f"sandbox '{name}' is not one this server may use (allowed: "
                            f"{', '.join(cfg.sandboxes)}); name a sandbox matching those patterns",
                       field="sandbox", kind="permission_error")
    from e2e_reme.simulators.sandbox.base import attach, list_sandboxes
    if name not in {r.name for r in list_sandboxes()}:
        raise ApiError(404, f"sandbox '{name}' is unknown: no live sandbox of this project has that name; create "
                            f"one with `remed sandbox up` or list them with `remed sandbox ls`",
                       field="sandbox", kind="not_found_error")
    return attach(name)


@dataclass
class Plan:
    """What a checked request will do."""
    request: RemediateRequest
    hosts: list[str]
    sandbox: Any = None           # a Sandbox handle, when one is named

    @property
    def execute(self) -> bool:
        return self.request.mode == "execute"


def plan(cfg: ServeConfig, req: RemediateRequest, authorization: str | None) -> Plan:
    """Every check that can refuse a request, before any generation."""
    if req.max_tokens is not None and req.max_tokens > cfg.max_tokens_limit:
        raise ApiError(422, f"max_tokens: {req.max_tokens} is more than this server allows "
                            f"({cfg.max_tokens_limit}); ask for fewer", field="max_tokens")
    if req.mode == "execute" and not req.sandbox:
        raise ApiError(422, "sandbox: execute mode needs a sandbox to run in; name one (`remed sandbox ls`) or use "
                            "mode dry-run", field="sandbox")
    if req.sandbox is None:
        hosts = list(req.inventory or req.report.placement)
        return Plan(req, hosts)
    check_token(cfg, authorization)
    sb = resolve_sandbox(cfg, req.sandbox)
    refuse_if_busy(sb.name)           # early, before any generation; the run itself takes the lease
    own = [n.name for n in sb.nodes]
    if req.inventory is not None and list(req.inventory) != own:
        raise ApiError(422, f"inventory: sandbox '{sb.name}' has the hosts {own}; a playbook for it always uses "
                            f"the sandbox's own inventory, so omit inventory or send exactly {own}",
                       field="inventory")
    return Plan(req, own, sb)


def refuse_if_busy(name: str) -> None:
    """409 naming the holder where another user holds the sandbox's lease now."""
    from e2e_reme.simulators.sandbox.lease import Busy, holder
    who = holder(name)
    if who is not None:
        raise _busy(Busy(name, who))


def _busy(busy) -> ApiError:
    return ApiError(409, f"{busy.in_use}; retry when it is done, or name another sandbox", field="sandbox",
                    kind="conflict", headers={"Retry-After": "10"})


def messages_for(p: Plan) -> list[dict]:
    """The benchmark's SoloGen prompt for this report and inventory (prompt.py)."""
    return build_messages(p.request.report.to_report(), tuple(p.hosts), mode="solo")


class Runner:
    """Runs answers through the pipeline, each run that names a sandbox under its lease;
    stops them when `stopping()` turns true (module docstring)."""

    POLL_S = 1.0

    def __init__(self, cfg: ServeConfig, stopping: Callable[[], bool] | None = None):
        self.cfg = cfg
        self._probe = stopping or serve_stopping
        self._shutdown = threading.Event()

    def stopping(self) -> bool:
        return self._shutdown.is_set() or self._probe()

    def shutdown(self) -> None:
        """Stop every run of this Runner now (each answers 503) and refuse new ones."""
        self._shutdown.set()

    def run(self, p: Plan, text: str, request_id: str) -> dict:
        """Blocking: the pipeline's result as the response's fields (gate, syntax_check,
        stage, execution, verdict)."""
        from e2e_reme.simulators.playbook.execution import run_pipeline
        if p.sandbox is None:
            tmp = Path(tempfile.mkdtemp(prefix="remed-serve-"))
            try:
                out = run_pipeline(text, sandbox=None, workdir=tmp, execute=False, inventory_hosts=p.hosts)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return _result(out, executed=False, syntax_possible=False)
        if self.stopping():
            raise _shutting_down(f"nothing was run in sandbox '{p.sandbox.name}'")
        lease = self._lease(p, request_id)
        try:
            return self._run_leased(p, text, request_id, lease)
        finally:
            p.sandbox._close_ssh()
            lease.release()

    def _lease(self, p: Plan, request_id: str):
        from e2e_reme.simulators.sandbox.lease import try_acquire
        got = try_acquire(p.sandbox.name, f"serve {p.request.mode} {request_id}")
        if not got.ok:
            raise _busy(got)
        return got

    def _run_leased(self, p: Plan, text: str, request_id: str, lease) -> dict:
        from e2e_reme.simulators.playbook.execution import run_pipeline
        from e2e_reme.simulators.playbook.leftovers import snapshot
        workdir = Path(self.cfg.workdir).expanduser() / "requests" / request_id
        before = snapshot(p.sandbox) if p.execute else None
        lease.note(jail=True, request=request_id, record=str(workdir / "interrupted.json"),
                   snapshot=sorted(before) if before is not None else None)
        from e2e_reme.simulators.errors import SandboxError
        try:
            guard = lease.guard()
        except SandboxError as e:
            raise ApiError(503, f"{e}; nothing was run: retry, and see the server log if it persists",
                           kind="service_unavailable", headers={"Retry-After": "10"}) from None
        try:
            with _Watch(self, p.sandbox) as watch:
                out = run_pipeline(text, sandbox=p.sandbox, workdir=workdir, timeout_s=self.cfg.exec_timeout_s,
                                   execute=p.execute, inventory_hosts=p.hosts)
            res = _result(out, executed=p.execute, syntax_possible=True)
            res["workdir"] = str(workdir)
            if watch.stopped or (p.execute and self.stopping()):      # stopping: no verdict is waited for
                raise self._interrupted(p, request_id, workdir, res)
            if p.execute:
                res["verdict"] = self.judge(p.sandbox)
            return res
        finally:
            lease.clear()
            guard.done()

    def _interrupted(self, p: Plan, request_id: str, workdir: Path, res: dict) -> ApiError:
        """The answer (and the record) of a run stopped by the server's shutdown."""
        import json
        known = {"id": request_id, "mode": p.request.mode, "sandbox": p.sandbox.name, "interrupted": True, **res,
                 "verdict": None}
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "interrupted.json").write_text(json.dumps(known, indent=2, default=str))
        except OSError:
            pass
        left = (known.get("execution") or {}).get("leftovers") or []
        return _shutting_down(f"the run in sandbox '{p.sandbox.name}' was stopped (it reached stage {res['stage']}); "
                              f"its controller jail is ended, and so are the {len(left)} process(es) the playbook left "
                              f"in the nodes; nothing was verified", extra=known)

    def judge(self, sb) -> dict:
        """The verifier's verdict for a sandbox against its stored baseline; a sandbox
        without a deployed system or a baseline is reported as not judged, with the fix."""
        from e2e_reme.simulators.errors import DeployError, NotDeployed
        from e2e_reme.simulators.faults import injected_faults
        from e2e_reme.simulators.systems.deploy import load_deployment, wait_healthy
        from e2e_reme.simulators.verification.verifier import stored_baseline, verify
        try:
            dep = load_deployment(sb)
        except (NotDeployed, DeployError) as e:
            return {"success": False, "judged": False, "reason": str(e), "checks": []}
        base = stored_baseline(sb)
        if base is None:
            return {"success": False, "judged": False, "checks": [],
                    "reason": f"sandbox {sb.name} has no baseline; record one while it is healthy with "
                              f"`remed verify --sandbox {sb.name} --baseline`"}
        try:
            wait_healthy(sb, dep, timeout_s=min(30.0, self.cfg.exec_timeout_s))
        except DeployError:
            pass                     # a broken system is judged as it is
        kw = {} if self.cfg.verify_load else {"load_check": None}
        return verify(sb, dep, base, injected_faults(sb), **kw).to_dict()


def _result(out, executed: bool, syntax_possible: bool) -> dict:
    gate = out.gate.to_dict() if out.gate is not None else None
    stage, error_class, reason = out.stage, out.error_class, out.reason
    if "syntax" in out.timings or stage in ("execute", "idempotence", "done"):
        if stage == "syntax" and error_class != "InternalError":
            syntax = {"status": "failed", "detail": reason}
        elif stage == "syntax":
            syntax = {"status": "error", "detail": reason}
        else:
            syntax = {"status": "passed", "detail": ""}
    elif stage == "syntax" and not syntax_possible:
        # The gate passed; a syntax check interprets the playbook, which only a sandbox's
        # jailed controller may do.
        syntax = {"status": "not run", "detail": "needs a sandbox: name one (with the token) to syntax-check "
                                                 "in its jailed controller"}
        stage, error_class, reason = "gate", None, ""
    else:
        syntax = {"status": "not run", "detail": f"the answer stopped at {stage}"}
    if not executed and stage == "done":
        reason = "checked; nothing was executed (dry-run)"
    return {"stage": stage, "ok": stage == "done" or (stage == "gate" and error_class is None),
            "error_class": error_class, "reason": reason, "playbook": out.playbook_text, "gate": gate,
            "syntax_check": syntax, "executed": executed and out.run is not None,
            "execution": ({"ok": out.executed_ok, "summary": out.summary(), "timings": out.timings,
                           "leftovers": out.leftovers, "limits_hit": out.limits_hit} if executed else None)}


class _Watch:
    """While a run is in its sandbox's jail: once the runner is stopping, kill the jail
    (again every poll, in case it was still being started), so that the pipeline goes on
    to end the playbook's leftovers and returns."""

    def __init__(self, runner: Runner, sb):
        self.runner, self.sb = runner, sb
        self.stopped = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"remed-watch-{sb.name}", daemon=True)

    def _loop(self) -> None:
        from e2e_reme.simulators.sandbox import controller
        while not self._done.wait(Runner.POLL_S):
            if self.stopped or self.runner.stopping():
                self.stopped = True
                try:
                    controller.kill(self.sb.record)
                except Exception:
                    pass          # the guard and the next lease holder are the backstop

    def __enter__(self) -> "_Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=30)


def serve_stopping() -> bool:
    """True once this process is going away: its interpreter is shutting down (the main
    thread has ended and the others are being waited for), or, inside a Serve replica,
    its application is being deleted (`remed serve` on SIGTERM or Ctrl-C, `serve
    delete`)."""
    if not threading.main_thread().is_alive():
        return True
    try:
        from ray import serve
        app = serve.get_replica_context().app_name
    except Exception:
        return False                  # not in a replica
    try:
        st = serve.status().applications.get(app)
    except Exception:
        return False
    return st is None or str(getattr(st.status, "value", st.status)) == "DELETING"


def _shutting_down(what: str, extra: dict | None = None) -> ApiError:
    return ApiError(503, f"the server is shutting down: {what}; send the request again once it is back",
                    kind="service_unavailable", headers={"Retry-After": "30"}, extra=extra)


def new_request_id() -> str:
    return f"rem-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
