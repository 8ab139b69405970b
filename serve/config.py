"""The server's settings, one dataclass, from a YAML file, CLI flags or `serve run` args.

    cfg = ServeConfig.from_mapping({"model": "runs/models/gemma3-270m", "port": 8000})

The bearer token for execute mode is never a setting itself (it would show in `ps`, in
Ray's stored deployment arguments and in config files): it is read once, at start, from
`token_file` (owned by this user or root, no access for group or others) or from the
environment variable `token_env` (which `remed serve` then removes from its own
environment before any child starts), and only its SHA-256 travels to the replicas. No
token configured: execute mode is disabled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from e2e_reme.config import build

DEFAULT_TOKEN_ENV = "REMED_SERVE_TOKEN"
PROXIES = ("nginx", "none")
TOKEN_FILE_MAX_BYTES = 4096


class ServeConfigError(ValueError):
    """A setting that cannot work, with the fix in its message (one line in the CLI)."""


@dataclass(frozen=True)
class ServeConfig:
    model: str = ""                          # a local model directory (or a LoRA adapter directory)
    engine: str = "auto"                     # auto | transformers | vllm (train/rollout.py)
    device: str = "auto"
    dtype: str = "auto"
    host: str = "127.0.0.1"                  # never 0.0.0.0 unless configured
    port: int = 8000
    allowed_hosts: tuple[str, ...] = ()      # Host header values accepted ("name" or "name:port");
                                             # () = the address listened on (+ localhost forms on loopback)
    # admission (serve/proxy.py: nginx in front of Serve's proxy; `none`: Serve's proxy alone)
    proxy: str = "nginx"
    max_connections: int = 512               # open client connections, in total
    max_connections_per_client: int = 8     # requests in progress per client address (/healthz exempt)
    max_model_requests: int = 16             # /v1 requests in progress, in total; more get 429
    header_timeout_s: float = 10.0           # to send the request line and headers
    body_timeout_s: float = 10.0             # between two reads of the body
    app_name: str = "remed"
    route_prefix: str = "/"
    # replicas and autoscaling (Ray Serve's own settings)
    num_replicas: int = 1
    autoscaling: dict | None = None          # e.g. {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 4}
    max_ongoing_requests: int = 32           # per replica; more wait in Serve's queue
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    # dynamic batching of concurrent generations (@serve.batch)
    max_batch_size: int = 8                  # 1: no batching
    batch_wait_timeout_s: float = 0.02
    # generation limits
    max_tokens: int = 1024                   # default per request
    max_tokens_limit: int = 4096             # a request asking for more gets a 422
    max_body_bytes: int = 256 * 1024         # larger request bodies get a 413
    max_prompt_tokens: int = 2048            # a longer prompt gets a 413 before any model work
    request_timeout_s: float = 120.0         # a generation running longer is stopped (504)
    # execute mode
    token_env: str = DEFAULT_TOKEN_ENV       # the environment variable holding the bearer token
    token_file: str | None = None            # or a file holding it (first line)
    token_sha256: str | None = None          # filled at start from the above; never set by hand
    sandboxes: tuple[str, ...] = ()          # fnmatch patterns of sandbox names a request may name; none by default
    exec_timeout_s: float = 120.0
    verify_load: bool = True                 # the verifier's SLO load window after an execution
    workdir: str = "runs/serve"              # per-request execution directories
    metrics_port: int | None = None          # Ray's Prometheus export port (cluster-wide metrics)
    # the review console (/ui, serve/console.py) and its decision store (serve/review.py)
    review_db: str = "runs/serve/review.sqlite"   # SQLite; relative to where the server starts, like workdir
    review_public_read: bool = False         # True: the console's read-only views need no login
    review_session_hours: float = 12.0       # how long a console login (an HttpOnly cookie) lasts
    review_answers: bool = False             # the console takes an operator's playbook instead of the model's
                                             # (drills, tests); recorded as such. Off by default
    review_regenerate_temperature: float = 0.8   # "regenerate": another sample at this temperature

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> "ServeConfig":
        d = dict(d or {})
        for k in ("port", "num_replicas", "max_ongoing_requests", "max_batch_size", "max_tokens",
                  "max_tokens_limit", "max_body_bytes", "max_prompt_tokens", "max_connections",
                  "max_connections_per_client", "max_model_requests"):
            if k in d and d[k] is not None:
                try:
                    d[k] = int(d[k])
                except (TypeError, ValueError):
                    raise ServeConfigError(f"serve config: {k} must be an integer, not {d[k]!r}") from None
        cfg = build(cls, d, "serve config", ServeConfigError)
        cfg.check()
        return cfg

    def replace(self, **kw: Any) -> "ServeConfig":
        return dataclasses.replace(self, **kw)

    def check(self) -> None:
        if self.engine not in ("auto", "transformers", "vllm"):
            raise ServeConfigError(f"serve config: engine '{self.engine}': use auto, transformers or vllm")
        if not 0 < self.port < 65536:
            raise ServeConfigError(f"serve config: port {self.port} is not a TCP port (1-65535)")
        if self.max_batch_size < 1 or self.num_replicas < 1 or self.max_ongoing_requests < 1:
            raise ServeConfigError("serve config: max_batch_size, num_replicas and max_ongoing_requests must be >= 1")
        if not 1 <= self.max_tokens <= self.max_tokens_limit:
            raise ServeConfigError(f"serve config: max_tokens ({self.max_tokens}) must be between 1 and "
                                   f"max_tokens_limit ({self.max_tokens_limit})")
        if self.autoscaling is not None and not isinstance(self.autoscaling, dict):
            raise ServeConfigError("serve config: autoscaling is a mapping of Ray Serve autoscaling_config keys "
                                   "(min_replicas, max_replicas, target_ongoing_requests, ...)")
        self._check_admission()

    def _check_admission(self) -> None:
        if self.proxy not in PROXIES:
            raise ServeConfigError(f"serve config: proxy '{self.proxy}': use nginx (admission limits in front of "
                                   f"Serve) or none (Serve's own proxy, no connection limits)")
        if min(self.max_connections, self.max_connections_per_client, self.max_model_requests,
               self.max_prompt_tokens, self.max_body_bytes) < 1:
            raise ServeConfigError("serve config: max_connections, max_connections_per_client, max_model_requests, "
                                   "max_prompt_tokens and max_body_bytes must be >= 1")
        if not 0 < self.review_session_hours <= 24 * 30 or not 0.01 <= self.review_regenerate_temperature <= 2:
            raise ServeConfigError("serve config: review_session_hours must be in (0, 720] and "
                                   "review_regenerate_temperature in [0.01, 2]")
        if min(self.header_timeout_s, self.body_timeout_s, self.request_timeout_s, self.exec_timeout_s) <= 0:
            raise ServeConfigError("serve config: header_timeout_s, body_timeout_s, request_timeout_s and "
                                   "exec_timeout_s must be > 0")
        if self.proxy == "nginx" and self.max_ongoing_requests < self.max_model_requests + HEALTH_RESERVE:
            raise ServeConfigError(f"serve config: max_ongoing_requests ({self.max_ongoing_requests}) must be at "
                                   f"least max_model_requests ({self.max_model_requests}) + {HEALTH_RESERVE}, so "
                                   f"that /healthz and /metrics always find a free slot in a replica")
        if _wildcard(self.host) and not self.allowed_hosts:
            raise ServeConfigError(f"serve config: host {self.host} listens on every interface; set allowed_hosts "
                                   f"(--allowed-host) to the names clients use to reach it (e.g. "
                                   f"[\"serve.example.org:{self.port}\"]): the Host allowlist is what keeps "
                                   f"DNS-rebinding pages out")

    def host_allowlist(self) -> frozenset[str]:
        """The Host header values a request may carry (lowercase): `allowed_hosts`, else the
        address listened on, and on a loopback address its localhost forms too."""
        if self.allowed_hosts:
            return frozenset(h.strip().lower() for h in self.allowed_hosts if h.strip())
        names = {_bracket(self.host.lower())}
        if _loopback(self.host):
            names |= {"localhost", "127.0.0.1", "[::1]"}
        out = {f"{n}:{self.port}" for n in names}
        if self.port == 80:
            out |= names
        return frozenset(out)

    def upstream_timeout_s(self) -> float:
        """How long a request may take end to end (the proxies' read timeout): the
        generation budget, then an execution and its verdict."""
        return self.request_timeout_s + self.exec_timeout_s + 120.0

    def with_token(self) -> "ServeConfig":
        """The config with `token_sha256` read from `token_file` or `token_env` (or None)."""
        token = None
        if self.token_file:
            token = read_token_file(Path(self.token_file))
        elif self.token_env and os.environ.get(self.token_env, "").strip():
            token = clean_token(os.environ[self.token_env], f"${self.token_env}")
        return dataclasses.replace(self, token_sha256=token_digest(token) if token else None)

    @property
    def execute_enabled(self) -> bool:
        return bool(self.token_sha256)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


HEALTH_RESERVE = 4      # replica slots kept for /healthz and /metrics beyond max_model_requests


def read_token_file(p: Path) -> str:
    """The token on a file's first non-empty line. Refused: a file that is not a regular
    file, is a symlink, belongs to another user (root excepted), or that group or others
    may read or write; a file that is not UTF-8. A BOM and surrounding whitespace are
    dropped."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        why = "it is a symbolic link; name the file itself" if e.errno == 40 else e.strerror
        raise ServeConfigError(f"serve config: token_file {p}: cannot read it ({why})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ServeConfigError(f"serve config: token_file {p} is not a regular file; put the token in a file")
        if st.st_uid not in (os.geteuid(), 0):
            raise ServeConfigError(f"serve config: token_file {p} belongs to uid {st.st_uid}, not to this user or "
                                   f"root; another user could have written it: `chown $(id -u) {p}`")
        if st.st_mode & 0o077:
            raise ServeConfigError(f"serve config: token_file {p} has mode {stat.S_IMODE(st.st_mode):04o}: group or "
                                   f"others may read or write it; `chmod 600 {p}` (and make a new token if others "
                                   f"could read this one)")
        raw = os.read(fd, TOKEN_FILE_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > TOKEN_FILE_MAX_BYTES:
        raise ServeConfigError(f"serve config: token_file {p} is larger than {TOKEN_FILE_MAX_BYTES} bytes; it "
                               f"holds the token on one line, nothing else")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ServeConfigError(f"serve config: token_file {p} is not UTF-8 text (byte {e.start}); write the token "
                               f"as plain ASCII on the first line") from None
    line = next((l for l in text.splitlines() if l.strip()), "")
    if not line:
        raise ServeConfigError(f"serve config: token_file {p} is empty; put the bearer token on its first line")
    return clean_token(line, f"token_file {p}")


def clean_token(value: str, where: str) -> str:
    """A token without surrounding whitespace or BOM: printable ASCII, no spaces, at
    least 16 characters (what an `Authorization: Bearer` header can carry)."""
    token = value.strip().lstrip("\ufeff").strip()
    if not token or not all(33 <= ord(c) < 127 for c in token):
        raise ServeConfigError(f"serve config: the execute token in {where} has characters an HTTP header cannot "
                               f"carry (only printable ASCII without spaces); make one with "
                               f"`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    if len(token) < 16:
        raise ServeConfigError("serve config: the execute token is shorter than 16 characters; use a long random "
                               "one, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return token


def _wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
