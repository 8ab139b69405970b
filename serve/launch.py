"""Start and stop the application: a local Ray (or a cluster's), Serve's HTTP proxy, the
admission front (nginx, serve/proxy.py) on the configured host and port, the app, and a
wait until `/healthz` answers.

    with Server(cfg) as srv:           # cfg: ServeConfig, its token read with cfg.with_token()
        srv.url                        # http://127.0.0.1:8000
    # stopped: nginx stopped, the app deleted, Serve shut down, and the Ray it started too

With `proxy: nginx` (the default) Serve's proxy listens on a free port of 127.0.0.1 and
nginx on `host:port`; with `proxy: none` Serve's proxy listens on `host:port` itself. A
local Ray is started loopback-only (node address 127.0.0.1: its GCS, raylet, workers,
agents and metrics exporters listen on 127.0.0.1 only), and the execute token's
environment variable is removed from this process before anything is started, so no
child (Ray's processes, the replicas, the jail's host-side process, nginx) inherits it.

Used by `remed serve`, the tests and bench/serve.py. `serve run configs/serve.yaml` is the
other way to start the same app (docs/serve.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
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
    """Model, workdir, review database and token file as absolute paths: a replica's
    working directory is not the caller's."""
    base = base or Path.cwd()

    def absolute(p: str | None) -> str | None:
        if not p:
            return p
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())
    return dataclasses.replace(cfg, model=absolute(cfg.model) or "", workdir=absolute(cfg.workdir) or cfg.workdir,
                               token_file=absolute(cfg.token_file), review_db=absolute(cfg.review_db) or cfg.review_db)


def check_model(path: str) -> None:
    """The model directory's problems as one line, before any replica tries to load it."""
    from e2e_reme.train.model import check_model_dir
    from .engine import ADAPTER_CONFIG, adapter_base
    if not path:
        raise ServeConfigError("no model given: pass --model DIR (a local Hugging Face model directory, e.g. "
                               "runs/models/gemma3-270m from `remed model import`)")
    p = Path(path)
    from e2e_reme.train.release import is_release, materialize
    if is_release(p):
        materialize(p)      # checked against its manifest and merged once, before the replicas load it
    elif (p / ADAPTER_CONFIG).is_file():
        check_model_dir(adapter_base(p))
    else:
        check_model_dir(p)


@contextlib.contextmanager
def loopback_ray():
    """While a local Ray starts: its node address is 127.0.0.1, so Ray binds its services
    there (Ray otherwise takes the machine's outward address and binds its gRPC servers
    on every interface). Ray reads this from `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (the
    processes it starts inherit it) and from its constant, which the driver has already
    read; both are put back afterwards."""
    from ray._private import ray_constants
    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    before_env, before = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before_env


def drop_token_env(cfg: ServeConfig) -> None:
    """The token's environment variable out of this process's environment: it was read
    (cfg.with_token()) and no child may inherit it."""
    if cfg.token_env:
        os.environ.pop(cfg.token_env, None)


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
        self.proxy = None
        self.serve_port: int | None = None      # where Serve's own proxy listens

    @property
    def url(self) -> str:
        from .config import _bracket
        return f"http://{_bracket(self.cfg.host)}:{self.cfg.port}{self.cfg.route_prefix.rstrip('/')}"

    def start(self) -> "Server":
        import ray
        from ray import serve
        from .app import build_app
        check_model(self.cfg.model)
        drop_token_env(self.cfg)
        if self.cfg.proxy == "nginx":
            from .proxy import nginx_binary
            nginx_binary()                      # missing: one clear error before anything starts
            serve_host, self.serve_port = "127.0.0.1", free_port()
        else:
            serve_host, self.serve_port = self.cfg.host, self.cfg.port
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
                from e2e_reme.ray_auth import private_token
                private_token(create=not self.address)   # a local head's token, 0600 before Ray writes one
                with loopback_ray() if not self.address else contextlib.nullcontext():
                    ray.init(**kw)
                self._owns_ray = True
                if callable(prev) and prev is not signal.default_int_handler:
                    # Ray's core replaces SIGTERM with a crash dump and abort; the caller's
                    # handler (the CLI unwinds SIGTERM like Ctrl-C so `finally` cleans up) is
                    # put back.
                    signal.signal(signal.SIGTERM, prev)
            self.say("starting Ray Serve")
            serve.start(http_options={"host": serve_host, "port": self.serve_port,
                                      "request_timeout_s": self.cfg.upstream_timeout_s(), "keep_alive_timeout_s": 5})
            self._started = True
            self.say(f"deploying {Path(self.cfg.model).name} ({self.cfg.num_replicas if not self.cfg.autoscaling else 'autoscaled'} replica(s))")
            serve.run(build_app(self.cfg), name=self.cfg.app_name, route_prefix=self.cfg.route_prefix)
            if self.cfg.proxy == "nginx":
                from .proxy import NginxProxy
                self.say(f"starting nginx on {self.cfg.host}:{self.cfg.port}")
                self.proxy = NginxProxy(self.cfg, self.serve_port).start()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def host_header(self) -> str:
        """A Host header value the server accepts (its allowlist), for its own probes."""
        own = f"{self.cfg.host}:{self.cfg.port}".lower()
        hosts = self.cfg.host_allowlist()
        return own if own in hosts else sorted(hosts)[0]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proxy is not None and self.proxy.proc is not None and self.proxy.proc.poll() is not None:
                raise RuntimeError(f"nginx in front of the server exited: {self.proxy.error_log()[-600:]}")
            try:
                probe = urllib.request.Request(self.url + "/healthz", headers={"Host": self.host_header})
                with urllib.request.urlopen(probe, timeout=5) as r:
                    if r.status == 200 and json.loads(r.read()).get("status") == "ok":
                        return
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = str(e)
            time.sleep(0.3)
        raise RuntimeError(f"the server at {self.url} did not answer /healthz within {self.ready_timeout_s:.0f} s "
                           f"({last})")

    def stop(self) -> None:
        self._delete_app()          # first, while everything in front of it still stands
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
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

    def _delete_app(self) -> None:
        """Our application deleted before any proxy goes: its replicas stop their runs in
        sandboxes (serve/remediate.py: the jail and the playbook's leftovers ended, the
        lease released) and answer them 503 while the proxies can still carry the answer."""
        try:
            import ray
            from ray import serve
            if self._started and ray.is_initialized():
                serve.delete(self.cfg.app_name)
        except Exception as e:      # the rest of stop() still runs
            logging.getLogger("e2e_reme.serve").warning("deleting the app %s failed: %s", self.cfg.app_name, e)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
