"""Admission in front of Serve: nginx, started and stopped with the server, configured here.

    with NginxProxy(cfg, upstream_port=port) as px:      # listens on cfg.host:cfg.port
        ...                                               # Serve's own proxy stays on 127.0.0.1:port

Why a reverse proxy and not Serve's own: Serve's HTTP proxy (uvicorn inside a Ray actor)
takes from `http_options` only host, port, `request_timeout_s` and `keep_alive_timeout_s`
(ray/serve/config.py HTTPOptions; ray/serve/_private/http_util.py builds the uvicorn
Config from those alone): no header or body read timeout, no bound on connections per
client or in total, and it streams a slow body into the replica, where each one held a
`max_ongoing_requests` slot. nginx does all of that in front, robustly:

- `client_header_timeout` / `client_body_timeout`: a client that withholds its headers or
  stops sending its body is closed;
- the whole body is read (`proxy_request_buffering on`, at most `max_body_bytes`, in
  memory) before Serve sees the request, so a slow client never holds a replica slot;
- `limit_conn` per client address (`max_connections_per_client`) and for all `/v1/` routes
  together (`max_model_requests`, below the replica's `max_ongoing_requests`): more get
  429 at once; `/healthz` is exempt from both and always finds a free replica slot;
- `worker_connections` bounds open connections in total (`max_connections`);
- Serve's `x-request-timeout-seconds` header (a client could lift Serve's timeout with it)
  is removed; nginx's own errors are JSON like the app's.

Only `/healthz`, `/metrics`, `/v1/...` and the review console `/ui...` are passed on;
everything else is a 404 here. The console has the per-client limit and a total of its own
(`max_model_requests`, in a zone apart from /v1's: its pages and polls take no /v1 slot).
nginx runs as this process's child in the foreground (`daemon off`) with its files in a
private directory, and dies with it (`PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import HEALTH_RESERVE, ServeConfig, ServeConfigError, _bracket

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def nginx_binary() -> str:
    """The nginx executable, or an error naming the fix."""
    found = shutil.which("nginx") or next((p for p in NGINX_CANDIDATES if os.access(p, os.X_OK)), None)
    if not found:
        raise ServeConfigError("nginx is not installed: it is the admission front of `remed serve` (timeouts, "
                               "connection limits); `apt-get install nginx` (`make setup` does), or set proxy: none "
                               "to run Serve's own proxy without those limits (docs/serve.md)")
    return found


def _json_error(status: int, message: str, kind: str) -> str:
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}})
    assert "'" not in body and "$" not in body, "nginx string literal"
    return body


def nginx_conf(cfg: ServeConfig, upstream_port: int, rundir: Path) -> str:
    """The whole nginx configuration for one server."""
    run = str(rundir)
    listen = f"{_bracket(cfg.host)}:{cfg.port}"
    per_client, model = cfg.max_connections_per_client, cfg.max_model_requests
    up_timeout = int(cfg.upstream_timeout_s()) + 5
    errors = {
        400: ("the request is not well-formed HTTP (request line or headers); send a valid HTTP/1.1 request",
              "invalid_request_error"),
        404: ("no such endpoint: the routes are /v1/remediate, /v1/chat/completions, /v1/models, /healthz and "
              "/metrics, and the console at /ui", "not_found_error"),
        413: (f"the request body is more than {cfg.max_body_bytes} bytes, the most this server accepts; send a "
              f"smaller report (fewer observations, logs or evidence)", "too_large"),
        429: (f"too many requests in progress: at most {per_client} per client (max_connections_per_client) and "
              f"{model} model requests in all (max_model_requests); retry when one has finished",
              "rate_limit_error"),
        502: ("the model server behind the proxy is not answering (starting, restarting or stopped); retry shortly",
              "server_error"),
        504: (f"the request took longer than {up_timeout} s end to end (request_timeout_s + exec_timeout_s); "
              f"ask for fewer tokens", "timeout_error"),
    }
    pages = "\n".join(f"        error_page {code} @e{code};" for code in errors)
    named = "\n".join(
        f"        location @e{code} {{ default_type application/json; "
        f"return {code} '{_json_error(code, msg, kind)}'; }}"
        for code, (msg, kind) in errors.items())
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {k}_temp_path {run}/tmp/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# generated by e2e_reme.serve.proxy for `remed serve`; rewritten at every start
worker_processes 1;
daemon off;
master_process on;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
{user}
events {{ worker_connections {cfg.max_connections + model + HEALTH_RESERVE + 8}; }}
http {{
    access_log off;
    server_tokens off;
    default_type application/json;
{temp}
    client_header_timeout {cfg.header_timeout_s:g}s;
    client_body_timeout {cfg.body_timeout_s:g}s;
    send_timeout 30s;
    keepalive_timeout 15s;
    keepalive_requests 100;
    reset_timedout_connection on;
    client_max_body_size {cfg.max_body_bytes};
    client_body_buffer_size {cfg.max_body_bytes};
    client_header_buffer_size 1k;
    large_client_header_buffers 4 8k;
    limit_conn_zone $binary_remote_addr zone=per_client:1m;
    limit_conn_zone $server_name zone=model:64k;
    limit_conn_zone $server_name zone=console:64k;
    limit_conn_status 429;
    limit_conn_log_level info;
    upstream serve {{ server 127.0.0.1:{upstream_port}; keepalive 16; }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    proxy_set_header X-Forwarded-For $remote_addr;
    proxy_set_header X-Request-Timeout-Seconds "";
    proxy_request_buffering on;
    proxy_buffering off;
    proxy_max_temp_file_size 0;
    proxy_connect_timeout 5s;
    server {{
        listen {listen} backlog=511;
        server_name _;
{pages}
        location = /healthz {{ proxy_pass http://serve; proxy_read_timeout 30s; }}
        location = /metrics {{ limit_conn per_client {per_client}; proxy_pass http://serve; proxy_read_timeout 30s; }}
        location /v1/ {{
            limit_conn per_client {per_client};
            limit_conn model {model};
            proxy_pass http://serve;
            proxy_read_timeout {up_timeout}s;
            proxy_send_timeout 60s;
        }}
        location /ui {{
            limit_conn per_client {per_client};
            limit_conn console {model};
            proxy_pass http://serve;
            proxy_read_timeout {up_timeout}s;
            proxy_send_timeout 60s;
        }}
        location / {{ return 404; }}
{named}
    }}
}}
"""


def _die_with_parent() -> None:       # in the child, between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG
    except OSError:
        pass


class NginxProxy:
    """nginx in front of Serve's proxy on 127.0.0.1:`upstream_port`, listening on the
    config's host and port."""

    def __init__(self, cfg: ServeConfig, upstream_port: int):
        self.cfg, self.upstream_port = cfg, upstream_port
        self.rundir: Path | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> "NginxProxy":
        binary = nginx_binary()
        self.rundir = Path(tempfile.mkdtemp(prefix="remed-serve-nginx-"))
        os.chmod(self.rundir, 0o711)         # the workers (nobody) reach their temp directories
        (self.rundir / "tmp").mkdir(mode=0o711)
        conf = self.rundir / "nginx.conf"
        conf.write_text(nginx_conf(self.cfg, self.upstream_port, self.rundir))
        cmd = [binary, "-p", str(self.rundir), "-c", str(conf), "-e", str(self.rundir / "error.log")]
        test = subprocess.run(cmd + ["-t", "-q"], capture_output=True, text=True, timeout=30)
        if test.returncode != 0:
            self.stop()
            raise ServeConfigError(f"nginx refused the generated configuration: {test.stderr.strip()[-600:]}")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                                     close_fds=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.error_log()
                self.stop()
                raise ServeConfigError(f"nginx could not start on {self.cfg.host}:{self.cfg.port}: {log[-600:]}")
            if self._listening():
                return self
            time.sleep(0.05)
        self.stop()
        raise ServeConfigError(f"nginx did not listen on {self.cfg.host}:{self.cfg.port} within {timeout_s:.0f} s")

    def _listening(self) -> bool:
        host = self.cfg.host.strip("[]")
        try:
            with socket.create_connection((host, self.cfg.port), timeout=0.5):
                return True
        except OSError:
            return False

    def error_log(self) -> str:
        try:
            return (self.rundir / "error.log").read_text(errors="replace") if self.rundir else ""
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)       # fast shutdown: connections closed now
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None

    def __enter__(self) -> "NginxProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
