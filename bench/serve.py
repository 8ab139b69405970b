"""What serving costs and what batching buys, measured side by side in one run.

    .venv/bin/python bench/serve.py --model runs/models/gemma3-270m --max-tokens 16
    .venv/bin/python bench/serve.py --model DIR --concurrency 1,4,16 --requests 32

The same prompts (SoloGen prompts of the reports in tests/data/train-episodes.jsonl, the
benchmark's one prompt format) three ways:
  1. in-process: the rollout engine called directly, one prompt at a time (latency), and
     in batches of --batch prompts (throughput): no HTTP, no Ray;
  2. `POST /v1/remediate` dry-run on a local Ray Serve deployment with dynamic batching
     (max_batch_size --batch), at each --concurrency level of client threads: latency
     p50/p95 per request and requests per second;
  3. the same deployment with batching off (max_batch_size 1), at the same levels.
Greedy decoding; every generation is exactly --max-tokens long unless the model stops.
Prints a table (medians and ratios side by side) and writes JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
            "latency_s": {"p50": pct(lat, .5), "p95": pct(lat, .95)}, "rps": round(len(lat) / wall, 3),
            "wall_s": round(wall, 2)}


def served(model: str, reps: list[dict], max_tokens: int, batch: int, levels: list[int], requests: int,
           console: Console, cpus: int) -> list[dict]:
    from e2e_reme.serve.config import ServeConfig
    from e2e_reme.serve.launch import Server, free_port
    cfg = ServeConfig(model=model, port=free_port(), max_batch_size=batch, batch_wait_timeout_s=0.05,
                      max_tokens=max_tokens, max_ongoing_requests=64, replica_cpus=1, token_env="")
    out = []
    with Server(cfg, ray_init={"num_cpus": cpus}) as srv:
        load(srv.url, reps[:2], 1, 2, max_tokens)            # warm-up
        for c in levels:
            r = load(srv.url, reps, c, max(requests, c), max_tokens)
            r["max_batch_size"] = batch
            console.log(f"served, max_batch_size {batch}, {c} clients: p50 {r['latency_s']['p50']} s, "
                        f"p95 {r['latency_s']['p95']} s, {r['rps']} req/s, {r['errors']} errors")
            out.append(r)
    return out


def ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "models" / "gemma3-270m"))
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least the level)")
    ap.add_argument("--batch", type=int, default=8, help="max_batch_size with batching (and in-process batch)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs the local Ray may use")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    console = Console(width=160)
    levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    reps = reports(max(a.requests, max(levels)))
    model = str(Path(a.model).resolve())
    t0 = time.monotonic()
    base = in_process(model, reps, a.max_tokens, a.batch, console)
    batched = served(model, reps, a.max_tokens, a.batch, levels, a.requests, console, a.cpus)
    single = served(model, reps, a.max_tokens, 1, levels, a.requests, console, a.cpus)

    t = Table(title=f"/v1/remediate dry-run vs in-process generation ({Path(model).name}, {a.max_tokens} tokens, "
                    f"{base['engine']})")
    for col in ("clients", "p50 s batched", "p95 s batched", "p50 s unbatched", "p95 s unbatched",
                "p50 / in-process", "req/s batched", "req/s unbatched", "batched / unbatched"):
        t.add_column(col, justify="right")
    t.add_row("in-process", str(base["latency_s"]["p50"]), str(base["latency_s"]["p95"]), "", "", "1.0",
              f"{base['batched_rps']} (batches)", f"{base['sequential_rps']} (1 by 1)",
              str(ratio(base["batched_rps"], base["sequential_rps"])))
    for b, s in zip(batched, single):
        t.add_row(str(b["concurrency"]), str(b["latency_s"]["p50"]), str(b["latency_s"]["p95"]),
                  str(s["latency_s"]["p50"]), str(s["latency_s"]["p95"]),
                  str(ratio(b["latency_s"]["p50"], base["latency_s"]["p50"])),
                  str(b["rps"]), str(s["rps"]), str(ratio(b["rps"], s["rps"])))
    console.print(t)
    result = {"model": model, "max_tokens": a.max_tokens, "batch": a.batch, "cpus": a.cpus,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "in_process": base,
              "served_batched": batched, "served_unbatched": single, "wall_s": round(time.monotonic() - t0, 1)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
