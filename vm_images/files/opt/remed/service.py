#!/usr/bin/python3
"""E2E-REME service runtime: one generic microservice, shaped by its config.

    python3 /opt/remed/service.py /etc/remed/<service>.yaml     # serve (the systemd unit)
    python3 /opt/remed/service.py seed-redis <seed.json>         # load seed keys into a redis

Only python3's standard library, python3-yaml and python3-redis (the guest image's).

The config (written by the deployment) names the service, its port, its data dir, the
*addresses* of its dependencies and what each request type does. `GET /<type>` then:
burns `cpu_ms` of CPU, touches `memory_kib` of memory, writes and fsyncs
`disk_write_kib` under `<data_dir>/work/`, reads `disk_read_kib` from its seed files,
runs its Redis operations, and calls its dependencies in order over HTTP at the
configured host:port (the query string, e.g. `user=u3`, travels along). It answers 200
with a small JSON body, or:

    502  a dependency answered with an error, refused, reset, or a Redis operation failed
    504  a dependency did not answer within the remaining time budget
    500  its own work failed (e.g. the data dir is not writable)

Every request carries a time budget (header `X-Remed-Budget-Ms`, the service's
`timeout_ms` at the entry); each hop passes on what is left, so a slow leaf makes the
caller nearest to it report 504 and the error propagates up as 502.

`GET /health` (the configured path) answers 200 with the service name, the system and the
deployment's identity token, or 503 with the reasons when the service cannot do its job:
its data dir is not writable, or a Redis it uses does not answer PING. It does not call
HTTP dependencies: a service is healthy if *it* works, so health does not cascade.

`GET /metrics` answers JSON counters: requests and errors (total, per type, per status),
in-flight requests, a latency histogram (ms), and calls to each dependency (ok/errors).

Logs go to stdout (the journal): one line at start and one line per failed request.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
BUDGET_HEADER = "X-Remed-Budget-Ms"
WORK_SLOTS = 4          # rotating scratch files: disk use stays bounded however long it runs


def log(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


class DependencyError(Exception):
    def __init__(self, status: int, cause: str):
        super().__init__(cause)
        self.status = status
        self.cause = cause


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.in_flight = 0
        self.by_type: dict[str, dict[str, int]] = {}
        self.by_status: dict[str, int] = {}
        self.hist = [0] * (len(BUCKETS_MS) + 1)
        self.lat_sum = 0.0
        self.calls: dict[str, dict[str, int]] = {}

    def begin(self) -> None:
        with self.lock:
            self.in_flight += 1

    def end(self, rtype: str, status: int, ms: float) -> None:
        with self.lock:
            self.in_flight -= 1
            self.requests += 1
            t = self.by_type.setdefault(rtype, {"requests": 0, "errors": 0})
            t["requests"] += 1
            if status >= 400:
                self.errors += 1
                t["errors"] += 1
            self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1
            i = 0
            while i < len(BUCKETS_MS) and ms > BUCKETS_MS[i]:
                i += 1
            self.hist[i] += 1
            self.lat_sum += ms

    def call(self, dep: str, ok: bool) -> None:
        with self.lock:
            c = self.calls.setdefault(dep, {"ok": 0, "errors": 0})
            c["ok" if ok else "errors"] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "errors": self.errors, "in_flight": self.in_flight,
                    "by_type": json.loads(json.dumps(self.by_type)), "by_status": dict(self.by_status),
                    "latency_ms": {"buckets": list(BUCKETS_MS) + ["+Inf"], "counts": list(self.hist),
                                   "sum": round(self.lat_sum, 3), "count": sum(self.hist)},
                    "calls": json.loads(json.dumps(self.calls))}


class Service:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.name = cfg["service"]
        self.system = cfg.get("system", "")
        self.token = cfg.get("token", "")
        self.port = int(cfg["port"])
        self.data_dir = cfg["data_dir"]
        self.health_path = cfg.get("health", "/health")
        self.timeout_ms = int(cfg.get("timeout_ms", 3000))
        self.deps = cfg.get("dependencies") or {}
        self.requests = cfg.get("requests") or {}
        self.metrics = Metrics()
        self.started = time.time()
        self.local = threading.local()
        self.slot = 0
        self.slot_lock = threading.Lock()
        self.redis_clients: dict[str, object] = {}
        self.seed_files = []
        os.makedirs(os.path.join(self.data_dir, "work"), exist_ok=True)
        seed_dir = os.path.join(self.data_dir, "seed")
        if os.path.isdir(seed_dir):
            self.seed_files = sorted(os.path.join(seed_dir, f) for f in os.listdir(seed_dir))
        for dep, addr in self.deps.items():
            if addr.get("kind") == "redis":
                import redis  # only services that use redis pay for the import
                self.redis_clients[dep] = redis.Redis(
                    host=addr["host"], port=int(addr["port"]), socket_timeout=1.0,
                    socket_connect_timeout=1.0, health_check_interval=0)

    # ---- the work of one request --------------------------------------------------------
    def handle(self, rtype: str, query: str, budget_ms: float) -> tuple[int, dict]:
        spec = self.requests[rtype]
        deadline = time.monotonic() + budget_ms / 1000
        params = urllib.parse.parse_qs(query)
        user = (params.get("user") or ["anon"])[0]
        self._burn(float(spec.get("cpu_ms", 0)))
        if spec.get("memory_kib"):
            buf = bytearray(int(spec["memory_kib"]) * 1024)
            for i in range(0, len(buf), 4096):
                buf[i] = 1
            del buf
        try:
            if spec.get("disk_write_kib"):
                self._write(int(spec["disk_write_kib"]))
            if spec.get("disk_read_kib"):
                self._read(int(spec["disk_read_kib"]))
        except OSError as e:
            return 500, {"error": f"disk: {e.strerror or e}"}
        for op in spec.get("redis") or ():
            try:
                self._redis(op, user)
                self.metrics.call(op["service"], True)
            except Exception as e:  # redis-py raises many kinds; all mean the store failed us
                self.metrics.call(op["service"], False)
                return 502, {"error": f"redis {op['service']} {op['op']}: {type(e).__name__}: {e}"}
        hops = 1
        for call in spec.get("calls") or ():
            try:
                hops += self._call(call["service"], call["request"], query, deadline)
                self.metrics.call(call["service"], True)
            except DependencyError as e:
                self.metrics.call(call["service"], False)
                return e.status, {"error": f"{call['service']}/{call['request']}: {e.cause}"}
        return 200, {"hops": hops}

    def _burn(self, ms: float) -> None:
        if ms <= 0:
            return
        end = time.thread_time() + ms / 1000
        block = b"remed" * 64
        while time.thread_time() < end:
            block = hashlib.sha256(block).digest() * 10

    def _write(self, kib: int) -> None:
        with self.slot_lock:
            self.slot = (self.slot + 1) % WORK_SLOTS
            slot = self.slot
        path = os.path.join(self.data_dir, "work", f"w{slot}.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, os.urandom(kib * 1024))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read(self, kib: int) -> None:
        left = kib * 1024
        for path in self.seed_files:
            with open(path, "rb") as f:
                left -= len(f.read(left))
            if left <= 0:
                return

    def _redis(self, op: dict, user: str) -> None:
        client = self.redis_clients[op["service"]]
        key = op["key"].replace("{user}", user)
        kind = op["op"]
        if kind == "get":
            client.get(key)
        elif kind == "set":
            client.set(key, json.dumps({"user": user, "at": time.time(), "pad": "x" * int(op.get("value_bytes", 64))}))
        elif kind == "del":
            client.delete(key)
        elif kind == "incr":
            client.incr(key)

    def _call(self, dep: str, rtype: str, query: str, deadline: float) -> int:
        left = deadline - time.monotonic()
        if left <= 0.005:
            raise DependencyError(504, "no time budget left")
        addr = self.deps.get(dep)
        if not addr:
            raise DependencyError(502, f"no address configured for {dep}")
        path = f"/{rtype}" + (f"?{query}" if query else "")
        conns = self.local.__dict__.setdefault("conns", {})
        for attempt in (0, 1):
            conn = conns.get(dep)
            fresh = conn is None
            if fresh:
                conn = http.client.HTTPConnection(addr["host"], int(addr["port"]), timeout=left)
                conns[dep] = conn
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(left)
                else:
                    conn.timeout = left
                # Pass on a little less than is left, so that a callee that runs out answers
                # 504 itself before this caller gives up on it: the error names the culprit.
                budget = max(1, int(left * 900) - 10)
                conn.request("GET", path, headers={BUDGET_HEADER: str(budget)})
                resp = conn.getresponse()
                body = resp.read()
            except (TimeoutError, socket.timeout):
                conns.pop(dep, None)
                conn.close()
                raise DependencyError(504, f"timed out after {left * 1000:.0f} ms at {addr['host']}:{addr['port']}")
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                conns.pop(dep, None)
                conn.close()
                # A kept-alive connection the peer closed meanwhile: retry once on a new one.
                if not fresh and attempt == 0 and isinstance(e, (http.client.RemoteDisconnected,
                                                                  BrokenPipeError, ConnectionResetError)):
                    continue
                raise DependencyError(502, f"{type(e).__name__}: {e} at {addr['host']}:{addr['port']}")
            if resp.status != 200:
                try:
                    cause = json.loads(body).get("error", "")
                except ValueError:
                    cause = body[:200].decode(errors="replace")
                raise DependencyError(502, f"HTTP {resp.status}: {cause}")
            try:
                return int(json.loads(body).get("hops", 1))
            except (ValueError, AttributeError):
                raise DependencyError(502, f"bad reply from {dep}: {body[:100]!r}")
        raise DependencyError(502, "unreachable")

    # ---- health --------------------------------------------------------------------------
    def health(self) -> tuple[int, dict]:
        problems = []
        probe = os.path.join(self.data_dir, "work", ".health")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
            os.unlink(probe)
        except OSError as e:
            problems.append(f"data dir {self.data_dir} not writable: {e.strerror or e}")
        for dep, client in self.redis_clients.items():
            try:
                client.ping()
            except Exception as e:
                problems.append(f"redis {dep} does not answer: {type(e).__name__}: {e}")
        body = {"service": self.name, "system": self.system, "token": self.token,
                "status": "ok" if not problems else "unhealthy", "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 1)}
        if problems:
            body["problems"] = problems
        return (503 if problems else 200), body


def make_handler(svc: Service):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"   # keep-alive: callers reuse their connections
        timeout = 30                    # an idle client does not hold a thread forever
        # Headers and body leave in two writes; with Nagle on, the second waits for the
        # client's delayed ACK (40 ms a hop).
        disable_nagle_algorithm = True
        server_version = f"remed-{svc.name}"

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            path = url.path
            if path == svc.health_path:
                return self._reply(*svc.health())
            if path == "/metrics":
                return self._reply(200, {"service": svc.name, "token": svc.token,
                                         "uptime_s": round(time.time() - svc.started, 1),
                                         **svc.metrics.snapshot()})
            rtype = path.lstrip("/")
            if rtype not in svc.requests:
                return self._reply(404, {"error": f"no request type {path}",
                                         "known": sorted(svc.requests)})
            try:
                budget = float(self.headers.get(BUDGET_HEADER) or svc.timeout_ms)
            except ValueError:
                budget = svc.timeout_ms
            budget = min(budget, svc.timeout_ms)
            t0 = time.monotonic()
            svc.metrics.begin()
            status = 500
            try:
                status, body = svc.handle(rtype, url.query, budget)
            except Exception as e:  # a bug or an odd failure: answer 500, keep serving
                body = {"error": f"{type(e).__name__}: {e}"}
            ms = (time.monotonic() - t0) * 1000
            svc.metrics.end(rtype, status, ms)
            if status != 200:
                log(f"error {rtype} {status} {ms:.0f}ms {body.get('error', '')}")
            body.update({"service": svc.name, "type": rtype, "ms": round(ms, 2)})
            self._reply(status, body)

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def log_message(self, format, *args) -> None:
            pass    # one line per error, not per request

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def seed_redis(seed_path: str) -> int:
    """Load `{"host", "port", "keys": {key: value}}` into a redis, waiting up to 15 s for it
    to answer, then SAVE so the seed survives a restart."""
    import redis
    seed = json.load(open(seed_path))
    client = redis.Redis(host=seed.get("host", "127.0.0.1"), port=int(seed["port"]), socket_timeout=5)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline:
                log(f"seed-redis: redis at {seed.get('host')}:{seed['port']} did not answer in 15 s")
                return 1
            time.sleep(0.1)
    pipe = client.pipeline(transaction=False)
    for k, v in seed["keys"].items():
        pipe.set(k, v)
    pipe.execute()
    client.save()
    log(f"seed-redis: {len(seed['keys'])} keys into {seed.get('host')}:{seed['port']}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "seed-redis":
        return seed_redis(argv[2])
    if len(argv) != 2:
        log("usage: service.py /etc/remed/<service>.yaml | service.py seed-redis <seed.json>")
        return 2
    try:
        with open(argv[1]) as f:
            cfg = yaml.safe_load(f)
        svc = Service(cfg)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        log(f"cannot start: config {argv[1]}: {type(e).__name__}: {e}")
        return 1
    try:
        server = Server((cfg.get("listen", "0.0.0.0"), svc.port), make_handler(svc))
    except OSError as e:
        log(f"cannot start: listen on port {svc.port}: {e.strerror or e}")
        return 1
    deps = ", ".join(f"{d}={a['host']}:{a['port']}" for d, a in svc.deps.items()) or "none"
    log(f"{svc.name} ({svc.system}) listening on :{svc.port}, {len(svc.requests)} request type(s), "
        f"dependencies: {deps}")
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
