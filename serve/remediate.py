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
one the client sends; one execution at a time per sandbox.
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
from typing import Any

from e2e_reme.simulators.policies.prompt import build_messages

from .config import ServeConfig
from .schemas import RemediateRequest


class ApiError(Exception):
    """A request the server refuses: an HTTP status and a message naming the fix."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None, details: list | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind
        self.headers, self.details = headers or {}, details

    def body(self) -> dict:
        err: dict[str, Any] = {"message": self.message, "type": self.kind, "code": self.status}
        if self.field:
            err["param"] = self.field
        if self.details:
            err["details"] = self.details
        return {"error": err}


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
    if not any(fnmatch.fnmatchcase(name, p) for p in cfg.sandboxes):
        raise ApiError(403, f"sandbox '{name}' is not one this server may use (allowed: "
                            f"{', '.join(cfg.sandboxes) or 'none'}); name a sandbox matching those patterns",
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
    own = [n.name for n in sb.nodes]
    if req.inventory is not None and list(req.inventory) != own:
        raise ApiError(422, f"inventory: sandbox '{sb.name}' has the hosts {own}; a playbook for it always uses "
                            f"the sandbox's own inventory, so omit inventory or send exactly {own}",
                       field="inventory")
    return Plan(req, own, sb)


def messages_for(p: Plan) -> list[dict]:
    """The benchmark's SoloGen prompt for this report and inventory (prompt.py)."""
    return build_messages(p.request.report.to_report(), tuple(p.hosts), mode="solo")


class Runner:
    """Runs answers through the pipeline; one execution at a time per sandbox."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

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
        lock = self._lock(p.sandbox.name)
        if not lock.acquire(blocking=False):
            raise ApiError(409, f"sandbox '{p.sandbox.name}' is busy with another request of this server; retry when "
                                f"it is done", field="sandbox", kind="conflict")
        try:
            workdir = Path(self.cfg.workdir).expanduser() / "requests" / request_id
            out = run_pipeline(text, sandbox=p.sandbox, workdir=workdir, timeout_s=self.cfg.exec_timeout_s,
                               execute=p.execute, inventory_hosts=p.hosts)
            res = _result(out, executed=p.execute, syntax_possible=True)
            res["workdir"] = str(workdir)
            if p.execute:
                res["verdict"] = self.judge(p.sandbox)
            return res
        finally:
            p.sandbox._close_ssh()
            lock.release()

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


def new_request_id() -> str:
    return f"rem-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
