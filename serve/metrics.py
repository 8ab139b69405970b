"""What Prometheus scrapes: requests, latency, tokens, gate refusals, executions and their
verdicts. Each number is kept twice:

- in Ray's metrics (`ray.serve.metrics`), which Ray exports for the whole cluster, all
  replicas summed, on every node's metrics export port (`metrics_port` in the config,
  Ray's `_metrics_export_port`), with Serve's own deployment/replica labels; and
- in this replica's own `prometheus_client` registry, served as text at `GET /metrics`
  (one replica's view: with several replicas, scrape Ray's port instead).

Names (Ray prefixes its exports with `ray_`):
    remed_serve_requests_total{route, status}
    remed_serve_request_latency_seconds{route}            histogram
    remed_serve_tokens_total{kind="prompt"|"completion"}
    remed_serve_gate_refusals_total{rule}
    remed_serve_executions_total{verdict="success"|"failure"|"not_judged"|"not_run"}
    remed_serve_batch_size                                histogram of generation batches
    remed_serve_generating                                gauge: prompts in the engine now
    remed_serve_generations_stopped_total{reason="client_gone"|"time_limit"}
"""

from __future__ import annotations

import logging
from typing import Any

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, use_ray: bool = True):
        import prometheus_client as pc
        self.registry = pc.CollectorRegistry()
        self._pc = pc
        self.p_requests = pc.Counter("remed_serve_requests", "HTTP requests by route and status",
                                     ["route", "status"], registry=self.registry)
        self.p_latency = pc.Histogram("remed_serve_request_latency_seconds", "Request latency by route",
                                      ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.p_tokens = pc.Counter("remed_serve_tokens", "Tokens processed", ["kind"], registry=self.registry)
        self.p_gate = pc.Counter("remed_serve_gate_refusals", "Answers the safety gate refused, by rule",
                                 ["rule"], registry=self.registry)
        self.p_exec = pc.Counter("remed_serve_executions", "Executions by verdict", ["verdict"],
                                 registry=self.registry)
        self.p_batch = pc.Histogram("remed_serve_batch_size", "Prompts per generation batch",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.p_generating = pc.Gauge("remed_serve_generating", "Prompts in the engine now", registry=self.registry)
        self.p_stopped = pc.Counter("remed_serve_generations_stopped", "Generations stopped before their end",
                                    ["reason"], registry=self.registry)
        self.ray: dict[str, Any] = {}
        if use_ray:
            try:
                from ray.serve import metrics as rm
                self.ray = {
                    "requests": rm.Counter("remed_serve_requests", description="HTTP requests by route and status",
                                           tag_keys=("route", "status")),
                    "latency": rm.Histogram("remed_serve_request_latency_seconds", description="Request latency",
                                            boundaries=list(LATENCY_BUCKETS), tag_keys=("route",)),
                    "tokens": rm.Counter("remed_serve_tokens", description="Tokens processed", tag_keys=("kind",)),
                    "gate": rm.Counter("remed_serve_gate_refusals", description="Gate refusals by rule",
                                       tag_keys=("rule",)),
                    "exec": rm.Counter("remed_serve_executions", description="Executions by verdict",
                                       tag_keys=("verdict",)),
                    "batch": rm.Histogram("remed_serve_batch_size", description="Prompts per generation batch",
                                          boundaries=list(BATCH_BUCKETS)),
                    "generating": rm.Gauge("remed_serve_generating", description="Prompts in the engine now"),
                    "stopped": rm.Counter("remed_serve_generations_stopped",
                                          description="Generations stopped before their end", tag_keys=("reason",)),
                }
            except Exception as e:          # outside a Serve replica: the text endpoint still counts
                log.debug("ray metrics unavailable: %s", e)
                self.ray = {}

    def request(self, route: str, status: int, seconds: float) -> None:
        self.p_requests.labels(route, str(status)).inc()
        self.p_latency.labels(route).observe(seconds)
        if self.ray:
            self.ray["requests"].inc(tags={"route": route, "status": str(status)})
            self.ray["latency"].observe(seconds, tags={"route": route})

    def tokens(self, prompt: int, completion: int) -> None:
        for kind, n in (("prompt", prompt), ("completion", completion)):
            if n:
                self.p_tokens.labels(kind).inc(n)
                if self.ray:
                    self.ray["tokens"].inc(n, tags={"kind": kind})

    def gate_refusal(self, rules) -> None:
        for rule in rules or ("unknown",):
            self.p_gate.labels(rule).inc()
            if self.ray:
                self.ray["gate"].inc(tags={"rule": rule})

    def execution(self, verdict: str) -> None:
        self.p_exec.labels(verdict).inc()
        if self.ray:
            self.ray["exec"].inc(tags={"verdict": verdict})

    def batch(self, size: int) -> None:
        self.p_batch.observe(size)
        if self.ray:
            self.ray["batch"].observe(size)

    def generating(self, delta: int) -> None:
        self.p_generating.inc(delta)
        if self.ray:
            self.ray["generating"].set(self.p_generating._value.get())

    def stopped(self, reason: str) -> None:
        self.p_stopped.labels(reason).inc()
        if self.ray:
            self.ray["stopped"].inc(tags={"reason": reason})

    def text(self) -> bytes:
        return self._pc.generate_latest(self.registry)
