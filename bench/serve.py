"""What serving costs and what the admission front holds, measured in one run.

    .venv/bin/python bench/serve.py --model runs/models/gemma3-270m --max-tokens 16
    .venv/bin/python bench/serve.py --model DIR --concurrency 1,4 --requests 16 --slow-clients 40
    .venv/bin/python bench/serve.py --model DIR --compare-batching 8      # + batched and in-process

For each admission front (`--proxies`: nginx, what `remed serve` starts, and none, Serve's
own proxy alone) a local Ray Serve deployment answers `POST /v1/remediate` dry-runs of the
SoloGen prompts of the reports in tests/data/train-episodes.jsonl (the benchmark's one
prompt format), at each --concurrency level of client threads: requests per second and
latency p50/p99. Then `GET /healthz` is timed idle and while --slow-clients connections
hold a request open the way a slowloris client does (headers sent, body trickled one byte
every 0.5 s and never finished). Greedy decoding; every generation is exactly
--max-tokens long unless the model stops. Prints the tables and writes JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
EPISODES = ROOT / "tests" / "data" / "train-episodes.jsonl"


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))], 3)


def reports(n: int) -> list[dict]:
    recs = [json.loads(l)["report"] for l in EPISODES.read_text().splitlines() if l.strip()]
    return [recs[i % len(recs)] for i in range(n)]


def in_process(model: str, reps: list[dict], max_tokens: int, batch: int, console: Console) -> dict:
    from e2e_reme.serve.engine import load_engine
    from e2e_reme.simulators.policies.prompt import build_messages
    from e2e_reme.train.rollout import SamplingParams
    engine, info = load_engine(model, kind="auto", batch_size=batch)
    prompts = [build_messages(r, tuple(r["placement"]), mode="solo") for r in reps]
    sp = SamplingParams(max_tokens=max_tokens)
    engine.generate(prompts[:1], sp)                    # warm-up
    lat = []
    for p in prompts:
        t = time.monotonic()
        engine.generate([p], sp)
        lat.append(time.monotonic() - t)
    console.log(f"in-process, one at a time: p50 {pct(lat, .5)} s")
    t = time.monotonic()
    for i in range(0, len(prompts), batch):
        engine.generate(prompts[i:i + batch], sp)
    wall = time.monotonic() - t
    console.log(f"in-process, batches of {batch}: {len(prompts) / wall:.2f} prompts/s")
    del engine
    return {"engine": info["engine"], "latency_s": {"p50": pct(lat, .5), "p95": pct(lat, .95)},
            "sequential_rps": round(len(lat) / sum(lat), 3), "batched_rps": round(len(prompts) / wall, 3)}


def load(url: str, reps: list[dict], concurrency: int, requests: int, max_tokens: int) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    todo = list(range(requests))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            body = json.dumps({"report": reps[i % len(reps)], "max_tokens": max_tokens}).encode()
            req = urllib.request.Request(url + "/v1/remediate", data=body, headers={"Content-Type": "application/json"})
            t = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    r.read()
                with lock:
                    lat.append(time.monotonic() - t)
            except Exception as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t0
    return {"concurrency": concurrency, "requests": requests, "errors": len(errors), "error_samples": errors[:3],
            "latency_s": {"p50": pct(lat, .5), "p95": pct(lat, .95), "p99": pct(lat, .99)},
            "rps": round(len(lat) / wall, 3), "wall_s": round(wall, 2)}


def healthz_latency(url: str, n: int = 10, timeout: float = 5.0) -> dict:
    """`n` GET /healthz one after another: latency p50/p99/max of those answered, and how
    many were not answered within `timeout`."""
    lat, failed = [], 0
    for _ in range(n):
        t = time.monotonic()
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=timeout) as r:
                r.read()
            lat.append(time.monotonic() - t)
        except Exception:
            failed += 1
    return {"requests": n, "failed": failed, "p50_s": pct(lat, .5), "p99_s": pct(lat, .99),
            "max_s": round(max(lat), 3) if lat else None}


def with_slow_clients(url: str, n: int, settle_s: float = 1.0) -> dict:
    """/healthz latency while `n` clients hold connections open the way the issue's
    attacker did: headers of a POST /v1/chat/completions sent, then its body trickled one
    byte every 0.5 s, never finished. Also how many of them the server turned away (429 or
    closed) and how many it still held at the end."""
    from urllib.parse import urlparse
    u = urlparse(url)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 100000\r\n\r\n{{\"messages\": [").encode()
    socks = []
    for _ in range(n):
        s = socket.create_connection((u.hostname, u.port), timeout=10)
        s.sendall(head)
        socks.append(s)
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.5):
            for s in socks:
                try:
                    s.sendall(b" ")
                except OSError:
                    pass
    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        time.sleep(settle_s)
        health = healthz_latency(url)
        turned_away = held = 0
        for s in socks:
            s.settimeout(0.05)
            try:
                data = s.recv(64)
                turned_away += 1 if (not data or data.startswith(b"HTTP/1.1 4")) else 0
            except socket.timeout:
                held += 1
            except OSError:
                turned_away += 1
    finally:
        stop.set()
        t.join(5)
        for s in socks:
            s.close()
    return {"slow_clients": n, "healthz": health, "turned_away": turned_away, "held": held}


def served(model: str, reps: list[dict], max_tokens: int, batch: int, levels: list[int], requests: int,
           console: Console, cpus: int, proxy: str = "nginx", slow_clients: int = 0) -> dict:
    from e2e_reme.serve.config import ServeConfig
    from e2e_reme.serve.launch import Server, free_port
    cfg = ServeConfig(model=model, port=free_port(), max_batch_size=batch, batch_wait_timeout_s=0.05,
                      max_tokens=max_tokens, max_ongoing_requests=32, max_model_requests=16, replica_cpus=1,
                      token_env="", proxy=proxy, request_timeout_s=600)
    out: dict = {"proxy": proxy, "max_batch_size": batch, "levels": []}
    with Server(cfg, ray_init={"num_cpus": cpus}) as srv:
        load(srv.url, reps[:2], 1, 2, max_tokens)            # warm-up
        for c in levels:
            r = load(srv.url, reps, c, max(requests, c), max_tokens)
            console.log(f"served ({proxy}), max_batch_size {batch}, {c} clients: p50 {r['latency_s']['p50']} s, "
                        f"p99 {r['latency_s']['p99']} s, {r['rps']} req/s, {r['errors']} errors")
            out["levels"].append(r)
        if slow_clients:
            out["healthz_idle"] = healthz_latency(srv.url)
            out["healthz_slow"] = with_slow_clients(srv.url, slow_clients)
            console.log(f"served ({proxy}): /healthz idle {out['healthz_idle']}, with {slow_clients} slow clients "
                        f"{out['healthz_slow']}")
    return out


def ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "models" / "gemma3-270m"))
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least the level)")
    ap.add_argument("--batch", type=int, default=1, help="max_batch_size of the deployment (1: no batching)")
    ap.add_argument("--compare-batching", type=int, default=0, metavar="N",
                    help="also serve with max_batch_size N, and run the engine in-process (batches of N)")
    ap.add_argument("--proxies", default="nginx,none",
                    help="admission fronts to measure: nginx (remed serve's default), none (Serve's proxy alone)")
    ap.add_argument("--slow-clients", type=int, default=40, help="slow clients held open while /healthz is timed")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs the local Ray may use")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    console = Console(width=160)
    levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    proxies = [p.strip() for p in a.proxies.split(",") if p.strip()]
    reps = reports(max(a.requests, max(levels)))
    model = str(Path(a.model).resolve())
    t0 = time.monotonic()
    base = in_process(model, reps, a.max_tokens, a.compare_batching, console) if a.compare_batching else None
    runs = [served(model, reps, a.max_tokens, a.batch, levels, a.requests, console, a.cpus, p, a.slow_clients)
            for p in proxies]
    if a.compare_batching:
        runs.append(served(model, reps, a.max_tokens, a.compare_batching, levels, a.requests, console, a.cpus,
                           proxies[0], 0))

    t = Table(title=f"POST /v1/remediate dry-run ({Path(model).name}, {a.max_tokens} new tokens, greedy)")
    for col in ("front", "max_batch_size", "clients", "req/s", "p50 s", "p99 s", "errors"):
        t.add_column(col, justify="right")
    if base:
        t.add_row("in-process", str(a.compare_batching), "1", f"{base['sequential_rps']} (1 by 1)",
                  str(base["latency_s"]["p50"]), "", "")
    for r in runs:
        for lv in r["levels"]:
            t.add_row(r["proxy"], str(r["max_batch_size"]), str(lv["concurrency"]), str(lv["rps"]),
                      str(lv["latency_s"]["p50"]), str(lv["latency_s"]["p99"]), str(lv["errors"]))
    console.print(t)
    h = Table(title=f"GET /healthz (10 requests, 5 s timeout), idle and with {a.slow_clients} slow clients connected")
    for col in ("front", "idle p50 s", "idle p99 s", "slow: p50 s", "slow: p99 s", "slow: max s", "slow: failed",
                "slow clients turned away", "held"):
        h.add_column(col, justify="right")
    for r in runs:
        if "healthz_slow" in r:
            i, s = r["healthz_idle"], r["healthz_slow"]
            h.add_row(r["proxy"], str(i["p50_s"]), str(i["p99_s"]), str(s["healthz"]["p50_s"]),
                      str(s["healthz"]["p99_s"]), str(s["healthz"]["max_s"]),
                      f"{s['healthz']['failed']}/{s['healthz']['requests']}", str(s["turned_away"]), str(s["held"]))
    console.print(h)
    result = {"model": model, "max_tokens": a.max_tokens, "cpus": a.cpus,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "in_process": base, "served": runs,
              "load_average": list(os.getloadavg()), "wall_s": round(time.monotonic() - t0, 1)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
