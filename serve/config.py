"""The server's settings, one dataclass, from a YAML file, CLI flags or `serve run` args.

    cfg = ServeConfig.from_mapping({"model": "runs/models/gemma3-270m", "port": 8000})

The bearer token for execute mode is never a setting itself (it would show in `ps`, in
Ray's stored deployment arguments and in config files): it is read once, at start, from
`token_file` or from the environment variable `token_env`, and only its SHA-256 travels to
the replicas. No token configured: execute mode is disabled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from e2e_reme.config import build

DEFAULT_TOKEN_ENV = "REMED_SERVE_TOKEN"


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
    # execute mode
    token_env: str = DEFAULT_TOKEN_ENV       # the environment variable holding the bearer token
    token_file: str | None = None            # or a file holding it (first line)
    token_sha256: str | None = None          # filled at start from the above; never set by hand
    sandboxes: tuple[str, ...] = ("*",)      # fnmatch patterns of sandbox names a request may name
    exec_timeout_s: float = 120.0
    verify_load: bool = True                 # the verifier's SLO load window after an execution
    workdir: str = "runs/serve"              # per-request execution directories
    metrics_port: int | None = None          # Ray's Prometheus export port (cluster-wide metrics)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> "ServeConfig":
        d = dict(d or {})
        for k in ("port", "num_replicas", "max_ongoing_requests", "max_batch_size", "max_tokens",
                  "max_tokens_limit", "max_body_bytes"):
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

    def with_token(self) -> "ServeConfig":
        """The config with `token_sha256` read from `token_file` or `token_env` (or None)."""
        token = None
        if self.token_file:
            p = Path(self.token_file)
            try:
                token = p.read_text().strip().splitlines()[0].strip() if p.read_text().strip() else ""
            except OSError as e:
                raise ServeConfigError(f"serve config: token_file {p}: cannot read it ({e.strerror})") from None
            if not token:
                raise ServeConfigError(f"serve config: token_file {p} is empty; put the bearer token on its first line")
        elif self.token_env and os.environ.get(self.token_env):
            token = os.environ[self.token_env].strip()
        if token is not None and len(token) < 16:
            raise ServeConfigError("serve config: the execute token is shorter than 16 characters; use a long random "
                                   "one, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        return dataclasses.replace(self, token_sha256=token_digest(token) if token else None)

    @property
    def execute_enabled(self) -> bool:
        return bool(self.token_sha256)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
