"""The load generator: drives a deployment's entry service from the host.

    res = run_load(dep)                       # the spec's standard load: slo.rps for slo.window_s
    check_slo(res, dep.slo)                   # -> SLOCheck(ok, reasons)

    with BackgroundLoad(dep, rps=2) as bg:    # low-rate load while something else happens
        ...                                   # e.g. a remediation playbook runs
    bg.result, bg.samples                     # what the users saw, request by request

Open loop: requests are scheduled at a fixed rate (request types drawn by the spec's
weights, users `u1..uN` in the query string) whatever the answers, so a slow system
builds a queue instead of slowing the load down; latency is measured from the scheduled
send time, so that queueing counts (no coordinated omission). Bounded in every way: at
most `rps * window_s` requests, a fixed pool of worker threads each holding one
keep-alive connection, a per-request timeout, and a drain limit at the end. It only
ever sends to addresses inside the deployment's sandbox subnet.
"""

from __future__ import annotations

import http.client
import ipaddress
import math
import queue
import random
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from e2e_reme.simulators.systems.deploy import Deployment
from e2e_reme.simulators.systems.spec import SLO

DEFAULT_USERS = 20


@dataclass(frozen=True)
class Sample:
    t: float                  # scheduled send time, seconds since the load started
    rtype: str
    latency_ms: float
    ok: bool
    kind: str                 # "ok", "http_502", "timeout", "connection_refused", ...


@dataclass(frozen=True)
class LoadResult:
    sent: int                          # requests scheduled (answered or not)
    ok: int                            # answered 200
    errors: dict[str, int]             # by kind: http_<status>, timeout, connection_refused, ...
    success_rate: float                # ok / sent (1.0 when nothing was sent)
    p50_ms: float                      # over every request: a timeout counts as its wait
    p95_ms: float
    p99_ms: float
    duration_s: float
    rps: float                         # the rate asked for
    by_type: dict[str, dict[str, int]] = field(default_factory=dict)   # type -> {sent, ok}

    def to_json(self) -> dict:
        return self.__dict__.copy()


@dataclass(frozen=True)
class SLOCheck:
    ok: bool
    reasons: tuple[str, ...]   # empty when ok


def check_slo(result: LoadResult, slo: SLO) -> SLOCheck:
    """Does the load's outcome meet the SLO (success rate and p95 latency)?"""
    reasons = []
    if result.sent == 0:
        reasons.append("no request was sent")
    if result.success_rate < slo.success_rate:
        worst = ", ".join(f"{k}: {v}" for k, v in sorted(result.errors.items(), key=lambda kv: -kv[1])[:3])
        reasons.append(f"success rate {result.success_rate:.3f} < {slo.success_rate} ({worst})")
    if result.p95_ms > slo.p95_ms:
        reasons.append(f"p95 latency {result.p95_ms:.0f} ms > {slo.p95_ms:.0f} ms")
    return SLOCheck(not reasons, tuple(reasons))


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return round(sorted_vals[i], 2)


def summarize(samples: list[Sample], rps: float, duration_s: float, unsent: int = 0) -> LoadResult:
    errors: dict[str, int] = {}
    by_type: dict[str, dict[str, int]] = {}
    for s in samples:
        t = by_type.setdefault(s.rtype, {"sent": 0, "ok": 0})
        t["sent"] += 1
        if s.ok:
            t["ok"] += 1
        else:
            errors[s.kind] = errors.get(s.kind, 0) + 1
    if unsent:
        errors["not_sent"] = unsent
    sent = len(samples) + unsent
    ok = sum(1 for s in samples if s.ok)
    lat = sorted(s.latency_ms for s in samples)
    return LoadResult(sent=sent, ok=ok, errors=errors, success_rate=round(ok / sent, 4) if sent else 1.0,
                      p50_ms=_percentile(lat, 0.50), p95_ms=_percentile(lat, 0.95), p99_ms=_percentile(lat, 0.99),
                      duration_s=round(duration_s, 3), rps=rps, by_type=by_type)


class _Driver:
    """The scheduler thread and the workers, shared by run_load and BackgroundLoad."""

    def __init__(self, dep: Deployment, rps: float, mix: dict[str, float] | None, timeout_s: float,
                 users: int, workers: int, max_requests: int | None, seed: int | None, keep: int,
                 max_failures: int | None = None):
        entry = dep.entry
        try:
            inside = ipaddress.ip_address(entry.host) in ipaddress.ip_network(dep.subnet)
        except ValueError:
            inside = False
        if not inside:
            raise ValueError(f"refusing to send load to {entry.host}: not inside sandbox {dep.sandbox}'s "
                             f"subnet {dep.subnet}")
        if rps <= 0 or rps > 500:
            raise ValueError(f"rps must be in (0, 500], not {rps}")
        self.host, self.port = entry.host, entry.port
        self.mix = dict(mix or dep.request_mix)
        unknown = set(self.mix) - set(dep.spec.services[dep.spec.entry].requests)
        if unknown:
            raise ValueError(f"request type(s) {', '.join(sorted(unknown))} are not served by {entry.service}")
        self.rps, self.timeout_s, self.users = rps, timeout_s, max(1, users)
        self.max_requests = max_requests
        self.rng = random.Random(seed)
        self.queue: queue.Queue = queue.Queue()
        self.samples: deque[Sample] = deque(maxlen=keep)
        self.lock = threading.Lock()
        self.stop_sending = threading.Event()
        self.scheduled = 0
        self.completed = 0
        self.failures = 0
        self.max_failures = max_failures       # more than this ends the sending early
        self.t0 = 0.0
        self.t_end = 0.0
        self.threads: list[threading.Thread] = []
        self.n_workers = max(1, min(workers, 64))

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.threads = [threading.Thread(target=self._worker, daemon=True, name=f"load-w{i}")
                        for i in range(self.n_workers)]
        self.threads.append(threading.Thread(target=self._schedule, daemon=True, name="load-sched"))
        for t in self.threads:
            t.start()

    def _schedule(self) -> None:
        types, weights = list(self.mix), list(self.mix.values())
        i = 0
        while not self.stop_sending.is_set():
            if self.max_requests is not None and i >= self.max_requests:
                break
            due = self.t0 + i / self.rps
            wait = due - time.monotonic()
            if wait > 0 and self.stop_sending.wait(wait):
                break
            rtype = self.rng.choices(types, weights)[0]
            user = f"u{self.rng.randint(1, self.users)}"
            self.queue.put((due, rtype, user))
            i += 1
            with self.lock:
                self.scheduled = i
        for _ in range(self.n_workers):
            self.queue.put(None)

    def _worker(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while True:
            item = self.queue.get()
            if item is None:
                break
            due, rtype, user = item
            if self.t_end and time.monotonic() > self.t_end:
                continue   # past the drain limit: counted as not sent
            kind = "ok"
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
                conn.request("GET", f"/{rtype}?user={user}")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    kind = f"http_{resp.status}"
            except (TimeoutError, socket.timeout):
                kind = "timeout"
            except ConnectionRefusedError:
                kind = "connection_refused"
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                kind = "connection_reset"
            except OSError as e:
                kind = f"os_{e.errno}" if e.errno else type(e).__name__.lower()
            except http.client.HTTPException as e:
                kind = type(e).__name__.lower()
            if kind != "ok" and conn is not None:
                conn.close()
                conn = None
            now = time.monotonic()
            self.samples.append(Sample(round(due - self.t0, 4), rtype, round((now - due) * 1000, 2),
                                       kind == "ok", kind))
            with self.lock:
                self.completed += 1
                self.failures += kind != "ok"
                if self.max_failures is not None and self.failures > self.max_failures:
                    self.stop_sending.set()
        if conn is not None:
            conn.close()

    def finish(self, drain_s: float) -> LoadResult:
        """Stop scheduling, let requests in flight finish (at most drain_s), summarize."""
        self.stop_sending.set()
        self.t_end = time.monotonic() + drain_s
        for t in self.threads:
            t.join(max(0.0, self.t_end - time.monotonic()) + 0.5)
        duration = time.monotonic() - self.t0
        with self.lock:
            unsent = max(0, self.scheduled - self.completed)
        return summarize(list(self.samples), self.rps, duration, unsent)


def _requests(rps: float, window_s: float) -> int:
    return max(1, int(round(rps * window_s)))


def failure_budget(slo: SLO) -> int:
    """The most failed requests of the standard load (the SLO's rate for its window) that
    still meet the SLO's success rate."""
    return int(math.floor(_requests(slo.rps, slo.window_s) * (1 - slo.success_rate) + 1e-9))


def run_load(dep: Deployment, *, rps: float | None = None, window_s: float | None = None,
             mix: dict[str, float] | None = None, timeout_s: float = 5.0, users: int = DEFAULT_USERS,
             workers: int | None = None, seed: int | None = None,
             max_failures: int | None = None) -> LoadResult:
    """Send `rps` requests per second (default: the SLO's standard load) for `window_s`
    seconds to the entry and wait for the answers (at most `timeout_s` more). With
    `max_failures`, one failure more than that ends the sending early: for a pass/fail
    judgement by success rate the rest of the window could not change the answer."""
    rps = rps or dep.slo.rps
    window_s = window_s or dep.slo.window_s
    n = _requests(rps, window_s)
    workers = workers or max(4, min(64, int(rps * timeout_s / 4) + 4))
    d = _Driver(dep, rps, mix, timeout_s, users, workers, n, seed, keep=n, max_failures=max_failures)
    d.start()
    # The scheduler stops by itself after n requests; wait for it, then for the answers.
    d.threads[-1].join(window_s + 1)
    return d.finish(drain_s=timeout_s + 1)


class BackgroundLoad:
    """A low-rate load that runs until stopped, recording every request (the last
    `keep` of them): what users saw while something else (a fault, a remediation) ran."""

    def __init__(self, dep: Deployment, rps: float = 2.0, *, mix: dict[str, float] | None = None,
                 timeout_s: float = 3.0, users: int = DEFAULT_USERS, workers: int | None = None,
                 seed: int | None = None, keep: int = 100_000, max_duration_s: float = 3600):
        self._driver = _Driver(dep, rps, mix, timeout_s, users, workers or max(2, min(32, int(rps * timeout_s) + 2)),
                               int(rps * max_duration_s), seed, keep)
        self.result: LoadResult | None = None

    def start(self) -> "BackgroundLoad":
        self._driver.start()
        return self

    @property
    def samples(self) -> list[Sample]:
        return list(self._driver.samples)

    def snapshot(self) -> LoadResult:
        """What it has seen so far, without stopping."""
        return summarize(list(self._driver.samples), self._driver.rps, time.monotonic() - self._driver.t0)

    def stop(self) -> LoadResult:
        if self.result is None:
            self.result = self._driver.finish(drain_s=self._driver.timeout_s + 0.5)
        return self.result

    def __enter__(self) -> "BackgroundLoad":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def disruption(samples: list[Sample], bucket_s: float = 1.0) -> list[dict]:
    """Success rate and p95 per time bucket: how a background load lived through an event."""
    buckets: dict[int, list[Sample]] = {}
    for s in samples:
        buckets.setdefault(int(s.t // bucket_s), []).append(s)
    out = []
    for b in sorted(buckets):
        ss = buckets[b]
        lat = sorted(s.latency_ms for s in ss)
        out.append({"t": round(b * bucket_s, 3), "sent": len(ss), "ok": sum(s.ok for s in ss),
                    "success_rate": round(sum(s.ok for s in ss) / len(ss), 3), "p95_ms": _percentile(lat, 0.95)})
    return out


__all__ = ["BackgroundLoad", "LoadResult", "SLOCheck", "Sample", "check_slo", "disruption", "run_load", "summarize"]
