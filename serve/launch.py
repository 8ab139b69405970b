"""Start and stop the application: a local Ray (or a cluster's), Serve's HTTP proxy on the
configured host and port, the app, and a wait until `/healthz` answers.

    with Server(cfg) as srv:           # cfg: ServeConfig, its token read with cfg.with_token()
        srv.url                        # http://127.0.0.1:8000
    # stopped: the app deleted, Serve shut down, and the Ray it started shut down too

Used by `remed serve`, the tests and bench/serve.py. `serve run configs/serve.yaml` is the
other way to start the same app (docs/serve.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from .config import ServeConfig, ServeConfigError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_paths(cfg: ServeConfig, base: Path | None = None) -> ServeConfig:
    """Model, workdir and token file as absolute paths: a replica's working directory is
    not the caller's."""
    base = base or Path.cwd()

    def absolute(p: str | None) -> str | None:
        if not p:
            return p
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())
    return dataclasses.replace(cfg, model=absolute(cfg.model) or "", workdir=absolute(cfg.workdir) or cfg.workdir,
                               token_file=absolute(cfg.token_file))


def check_model(path: str) -> None:
    """The model directory's problems as one line, before any replica tries to load it."""
    from e2e_reme.train.model import check_model_dir
    from .engine import ADAPTER_CONFIG, adapter_base
    if not path:
        raise ServeConfigError("no model given: pass --model DIR (a local Hugging Face model directory, e.g. "
                               "runs/models/gemma3-270m from `remed model import`)")
    p = Path(path)
    if (p / ADAPTER_CONFIG).is_file():
        check_model_dir(adapter_base(p))
    else:
        check_model_dir(p)


class Server:
    def __init__(self, cfg: ServeConfig, address: str | None = None, ray_init: dict | None = None,
                 ready_timeout_s: float = 300, say: Callable[[str], None] = lambda s: None):
        self.cfg = resolve_paths(cfg)
        self.address = address
        self.ray_init = dict(ray_init or {})
        self.ready_timeout_s = ready_timeout_s
        self.say = say
        self._owns_ray = False
        self._started = False

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}{self.cfg.route_prefix.rstrip('/')}"

    def start(self) -> "Server":
        import ray
        from ray import serve
        from .app import build_app
        check_model(self.cfg.model)
        try:
            if not ray.is_initialized():
                kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                          logging_level=logging.WARNING, namespace="e2e-reme-serve")
                if self.address:
                    kw["address"] = self.address
                else:
                    kw["address"] = "local"
                    if self.cfg.metrics_port:
                        kw["_metrics_export_port"] = int(self.cfg.metrics_port)
                    kw.update(self.ray_init)
                prev = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
                ray.init(**kw)
                self._owns_ray = True
                if callable(prev) and prev is not signal.default_int_handler:
                    # Ray's core replaces SIGTERM with a crash dump and abort; the caller's
                    # handler (the CLI unwinds SIGTERM like Ctrl-C so `finally` cleans up) is
                    # put back.
                    signal.signal(signal.SIGTERM, prev)
            self.say("starting Ray Serve")
            serve.start(http_options={"host": self.cfg.host, "port": self.cfg.port})
            self._started = True
            self.say(f"deploying {Path(self.cfg.model).name} ({self.cfg.num_replicas if not self.cfg.autoscaling else 'autoscaled'} replica(s))")
            serve.run(build_app(self.cfg), name=self.cfg.app_name, route_prefix=self.cfg.route_prefix)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5) as r:
                    if r.status == 200 and json.loads(r.read()).get("status") == "ok":
                        return
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = str(e)
            time.sleep(0.3)
        raise RuntimeError(f"the server at {self.url} did not answer /healthz within {self.ready_timeout_s:.0f} s "
                           f"({last})")

    def stop(self) -> None:
        try:
            import ray
            from ray import serve
            if self._started and ray.is_initialized():
                try:
                    if self._owns_ray:
                        serve.shutdown()
                    else:               # a cluster's Serve may hold other apps: remove only ours
                        serve.delete(self.cfg.app_name)
                finally:
                    self._started = False
        finally:
            if self._owns_ray:
                import ray
                ray.shutdown()
                self._owns_ray = False

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
