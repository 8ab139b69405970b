"""Running an Ansible playbook against a sandbox, through ansible-runner.

    run = run_playbook(sb.write_inventory(d / "hosts.yaml"), plays_or_path, d, timeout_s=120)
    run.status        # 'successful' | 'failed' | 'timeout' | 'canceled'
    run.rc, run.duration_s, run.stdout, run.stats["n0"]["failures"], run.events

Outcomes are data, not exceptions: a playbook that fails, cannot be parsed, reaches no
host or runs out of time gives a `PlaybookRun` that says so. This is used both for our
own deployment playbooks and, later, to execute model-written remediation playbooks, so
nothing here is specific to either.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

STATUSES = ("successful", "failed", "timeout", "canceled")

# Settings that make runs fast and self-contained (no ~/.ansible, no host ansible.cfg).
DEFAULT_ENV = {
    "ANSIBLE_PIPELINING": "True",
    "ANSIBLE_HOST_KEY_CHECKING": "False",
    "ANSIBLE_RETRY_FILES_ENABLED": "False",
    "ANSIBLE_NOCOLOR": "True",
    "ANSIBLE_FORCE_COLOR": "False",
    "ANSIBLE_DEPRECATION_WARNINGS": "False",
    "ANSIBLE_SYSTEM_WARNINGS": "False",
    "ANSIBLE_LOCALHOST_WARNING": "False",
    "ANSIBLE_INTERPRETER_PYTHON": "/usr/bin/python3",
    "ANSIBLE_TIMEOUT": "10",            # SSH connect timeout
    "ANSIBLE_FORKS": "16",
}


@dataclass(frozen=True)
class HostStats:
    ok: int = 0
    changed: int = 0
    failures: int = 0
    unreachable: int = 0
    skipped: int = 0
    rescued: int = 0
    ignored: int = 0

    @property
    def clean(self) -> bool:
        return self.failures == 0 and self.unreachable == 0


@dataclass(frozen=True)
class PlaybookRun:
    status: str                       # one of STATUSES, or (the jail, controller.py) "output_limit"
    rc: int | None
    duration_s: float
    stdout: str
    events: tuple[dict, ...] = ()     # ansible-runner's job events, in order
    stats: dict[str, HostStats] = field(default_factory=dict)   # per inventory host
    playbook: str = ""                # the file that ran
    artifact_dir: str = ""
    error: str = ""                   # why it could not even start (bad input, runner error)

    @property
    def ok(self) -> bool:
        return self.status == "successful"

    def failed_tasks(self) -> list[dict]:
        """One entry per failed/unreachable task result: host, task, msg."""
        out = []
        for ev in self.events:
            if ev.get("event") in ("runner_on_failed", "runner_on_unreachable"):
                data = ev.get("event_data", {})
                if data.get("ignore_errors"):
                    continue
                res = data.get("res", {}) or {}
                msg = res.get("msg") or res.get("stderr") or res.get("stdout") or ""
                out.append({"host": data.get("host"), "task": data.get("task"),
                            "event": ev["event"], "msg": str(msg).strip()[:2000],
                            "stderr": str(res.get("stderr", "")).strip()[-2000:]})
        return out

    def summary(self) -> str:
        """One line: status, time, and the first failure if any."""
        line = f"{self.status} (rc {self.rc}) in {self.duration_s:.1f} s"
        fails = self.failed_tasks()
        if fails:
            f = fails[0]
            line += f"; {f['host']}: task '{f['task']}' failed: {(f['stderr'] or f['msg'])[:300]}"
        elif self.error:
            line += f"; {self.error[:300]}"
        elif not self.ok:
            # No task failed, so ansible stopped before running any (a syntax error, an
            # unknown module, no hosts): its first error line says why.
            lines = [l.strip() for l in self.stdout.splitlines() if l.strip()]
            err = next((l for l in lines if l.startswith(("[ERROR]", "ERROR!"))), lines[-1] if lines else "")
            if err:
                line += f"; {err[:300]}"
        return line


def run_playbook(inventory_path: str | Path, playbook: str | Path | list[dict], private_data_dir: str | Path,
                 timeout_s: float, extravars: dict | None = None, *,
                 envvars: dict[str, str] | None = None,
                 limit: str | None = None,
                 event_handler: Callable[[dict], Any] | None = None,
                 cancel: threading.Event | None = None,
                 keep_artifacts: int = 5,
                 verbosity: int = 0) -> PlaybookRun:
    """Run a playbook (a path, or a list of plays written to `<private_data_dir>/project/`)
    against an inventory file, under a wall-clock timeout.

    `event_handler(event)` sees each runner event as it arrives (for progress); setting
    `cancel` stops the run (status 'canceled'). Artifacts (stdout, events) of the last
    `keep_artifacts` runs are kept under `<private_data_dir>/artifacts/`."""
    import ansible_runner

    pdd = Path(private_data_dir).resolve()
    t0 = time.monotonic()
    try:
        pdd.mkdir(parents=True, exist_ok=True)
        if isinstance(playbook, (list, tuple)):
            project = pdd / "project"
            project.mkdir(exist_ok=True)
            path = project / f"playbook-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{threading.get_ident() % 10000}.yml"
            path.write_text(yaml.safe_dump(list(playbook), sort_keys=False, width=120))
        else:
            path = Path(playbook).resolve()
            if not path.is_file():
                return PlaybookRun("failed", None, 0.0, "", playbook=str(path),
                                   error=f"playbook {path}: no such file")
        inventory = Path(inventory_path).resolve()
        if not inventory.is_file():
            return PlaybookRun("failed", None, 0.0, "", playbook=str(path),
                               error=f"inventory {inventory}: no such file")
    except OSError as e:
        return PlaybookRun("failed", None, time.monotonic() - t0, "", error=f"cannot prepare the run: {e}")

    env = dict(DEFAULT_ENV)
    # ansible-playbook must come from this interpreter's environment, even when the
    # venv is not activated (PATH lacks its bin/).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    env["ANSIBLE_LOCAL_TEMP"] = str(pdd / "tmp")
    # SSH connection reuse (ControlMaster) per run directory *and* per sandbox incarnation
    # (the inventory names it): a sandbox replaced under the same name and addresses, or an
    # episode retried in the same directory, must never talk through a master connection
    # to the dead one.
    import hashlib
    key = hashlib.sha1(f"{pdd}\n{inventory.read_text(errors='replace')}".encode()).hexdigest()
    cp = pdd / f"cp-{key[:8]}"
    if len(str(cp)) > 70:
        # ssh refuses control sockets whose path (plus its 17-character temporary suffix)
        # passes 108 bytes, and then silently runs without connection reuse.
        cp = Path("/tmp") / f"remed-cp-{key[:12]}"
    env["ANSIBLE_SSH_CONTROL_PATH_DIR"] = str(cp)
    env.update(envvars or {})

    def on_event(ev: dict) -> bool:
        if event_handler is not None:
            try:
                event_handler(ev)
            except Exception:  # a broken progress display must not break the run
                pass
        return True

    stop = cancel or threading.Event()
    try:
        r = ansible_runner.run(
            private_data_dir=str(pdd), playbook=str(path), inventory=str(inventory),
            extravars=extravars or {}, envvars=env, limit=limit, timeout=max(1, int(timeout_s)),
            quiet=True, rotate_artifacts=keep_artifacts, suppress_env_files=True,
            verbosity=verbosity or None, event_handler=on_event,
            # Our own cancel callback: the default one installs SIGINT/SIGTERM handlers
            # on the main thread and never restores them.
            cancel_callback=stop.is_set,
            settings={"pexpect_timeout": 0.5, "suppress_ansible_output": True})
    except Exception as e:  # runner refuses the inputs (bad paths, bad settings)
        return PlaybookRun("failed", None, round(time.monotonic() - t0, 3), "", playbook=str(path),
                           error=f"ansible-runner: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")

    status = r.status if r.status in STATUSES else "failed"
    try:
        with r.stdout as f:
            stdout = f.read()
    except Exception:
        stdout = ""
    try:
        events = tuple(r.events)
    except Exception:
        events = ()
    stats = host_stats(events)
    return PlaybookRun(status=status, rc=r.rc, duration_s=round(time.monotonic() - t0, 3), stdout=stdout,
                       events=events, stats=stats, playbook=str(path),
                       artifact_dir=str(r.config.artifact_dir))


def host_stats(events: tuple[dict, ...]) -> dict[str, HostStats]:
    """Per-host counts from the run's final `playbook_on_stats` event."""
    final = next((e for e in reversed(events) if e.get("event") == "playbook_on_stats"), None)
    if final is None:
        return {}
    data = final.get("event_data", {})
    keys = {"ok": "ok", "changed": "changed", "failures": "failures", "dark": "unreachable",
            "skipped": "skipped", "rescued": "rescued", "ignored": "ignored"}
    hosts: set[str] = set()
    for k in keys:
        hosts |= set((data.get(k) or {}).keys())
    return {h: HostStats(**{v: int((data.get(k) or {}).get(h, 0)) for k, v in keys.items()})
            for h in sorted(hosts)}
