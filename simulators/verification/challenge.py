"""Functional challenges: questions only the deployed code, doing its real work, answers
right. A stub that replays /health (or a canned responder loaded into the service's own
process) passes health checks; it cannot pass these.

For every request type of the entry service the verifier sends a random number of
requests (drawn fresh per verdict), each with a fresh nonce as its user, and then asks:

- did each answer say 200 with the number of hops the call graph of the deployed spec
  implies (the runtime counts the services a request really passed through);
- did every service's own request counters (`/metrics`, read from the host) move by
  exactly what that call graph implies for those random counts: a responder that does
  not call its dependencies leaves theirs unmoved;
- did the nonce reach the data store: where the call graph writes `{user}` keys into a
  redis, the key of each nonce is read back from the redis directly (RESP from the host,
  not through any service) and must hold what the deployed code writes.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
import urllib.error
import urllib.request
from typing import Any


def resp(host: str, port: int, *args: str, timeout: float = 3.0) -> Any:
    """One Redis command over a plain socket (RESP 2), from the host's own code."""
    out = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(out)
        f = s.makefile("rb")
        return _read_reply(f)


def _read_reply(f) -> Any:
    line = f.readline()
    if not line:
        raise OSError("redis closed the connection")
    kind, rest = line[:1], line[1:].rstrip(b"\r\n")
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise OSError(f"redis error: {rest.decode(errors='replace')}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:n]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise OSError(f"not a redis reply: {line[:40]!r}")


def _get_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            status, body = r.status, r.read(65536)
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read(65536)
    except (OSError, ValueError) as e:   # refused, reset, timed out: an answer too
        return 0, {"error": f"{type(e).__name__}: {e}"}
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"raw": body[:200].decode(errors="replace")}


def _expected_counts(spec, service: str, rtype: str, times: int, acc: dict) -> None:
    """(service, request type) -> how many requests each service must have served."""
    acc[(service, rtype)] = acc.get((service, rtype), 0) + times
    for c in spec.services[service].requests[rtype].calls:
        _expected_counts(spec, c.service, c.request, times, acc)


def _redis_writes(spec, service: str, rtype: str, out: list) -> None:
    """The redis operations on `{user}` keys a request makes, in the order the runtime
    makes them (its own operations first, then its calls in order)."""
    req = spec.services[service].requests[rtype]
    for op in req.redis:
        if "{user}" in op.key:
            out.append((op.service, op.op, op.key))
    for c in req.calls:
        _redis_writes(spec, c.service, c.request, out)


def _counters(targets: dict, names: list[str]) -> dict[str, dict]:
    out = {}
    for n in names:
        status, body = _get_json(targets[n].url + "/metrics")
        out[n] = body if status == 200 else {"status": status}
    return out


def run_challenge(deployment, *, rng=None, max_per_type: int = 4) -> dict:
    """Challenge the deployment through its entry; {"ok", "detail", "problems", ...}."""
    import random
    rng = rng or random.Random(secrets.randbits(64))
    spec, targets, entry = deployment.spec, deployment.targets, deployment.entry
    http = sorted(n for n, t in targets.items() if t.kind == "http")
    t0 = time.monotonic()
    before = _counters(targets, http)
    plan = {r: rng.randint(1, max_per_type) for r in sorted(spec.services[entry.service].requests)}
    expected: dict = {}
    problems, answers, nonces = [], {}, {}
    for rtype, times in plan.items():
        if problems:
            break   # one wrong answer decides; a hung entry must not cost a timeout per request
        _expected_counts(spec, entry.service, rtype, times, expected)
        want_hops = spec.hops(entry.service, rtype)
        for i in range(times):
            if problems:
                break
            user = f"ch{secrets.token_hex(6)}"
            nonces.setdefault(rtype, []).append(user)
            status, body = _get_json(f"{entry.url}/{rtype}?user={user}", timeout=10)
            answers.setdefault(rtype, []).append({"status": status, "hops": body.get("hops"),
                                                  "error": body.get("error")})
            if status != 200:
                problems.append(f"{entry.service}/{rtype} answered {status}: {str(body.get('error', ''))[:120]}")
            elif body.get("hops") != want_hops or body.get("service") != entry.service \
                    or body.get("type") != rtype:
                problems.append(f"{entry.service}/{rtype} answered as the deployed code cannot: "
                                f"hops {body.get('hops')} (the call graph has {want_hops}), "
                                f"service {body.get('service')!r}, type {body.get('type')!r}")
    if problems:
        return _result(problems, plan, {}, answers, t0)
    after = _counters(targets, http)
    counts = {}
    for n in http:
        b, a = before.get(n, {}), after.get(n, {})
        if "by_type" not in a or "by_type" not in b:
            problems.append(f"{n}: /metrics unreadable ({a.get('status', b.get('status'))})")
            continue
        for rtype in spec.services[n].requests:
            got = (a["by_type"].get(rtype, {}).get("requests", 0)
                   - b["by_type"].get(rtype, {}).get("requests", 0))
            want = expected.get((n, rtype), 0)
            counts[f"{n}/{rtype}"] = {"want": want, "got": got}
            if got != want:
                problems.append(f"{n}/{rtype}: served {got} requests for the challenge, "
                                f"its call graph says {want}")
    problems += _check_store(spec, targets, entry.service, nonces)
    return _result(problems, plan, counts, answers, t0)


def _result(problems: list[str], plan: dict, counts: dict, answers: dict, t0: float) -> dict:
    return {"ok": not problems, "detail": ("the entry and every service downstream answered the "
                                           "challenge as the deployed code must") if not problems
            else "; ".join(problems[:3]),
            "problems": problems[:20], "plan": plan, "counts": counts, "answers": answers,
            "duration_s": round(time.monotonic() - t0, 3)}


def _check_store(spec, targets, entry: str, nonces: dict) -> list[str]:
    problems = []
    for rtype, users in nonces.items():
        writes: list = []
        _redis_writes(spec, entry, rtype, writes)
        final: dict = {}
        for svc, op, key in writes:
            final[(svc, key)] = op if op != "get" else final.get((svc, key))
        for (svc, key), op in final.items():
            if op is None:
                continue
            t = targets[svc]
            for user in users:
                k = key.replace("{user}", user)
                try:
                    val = resp(t.host, t.port, "GET", k)
                except OSError as e:
                    problems.append(f"{svc}: cannot read {k} back: {e}")
                    continue
                if op == "del" and val is not None:
                    problems.append(f"{svc}: {k} should be deleted by {entry}/{rtype}, it is still there")
                elif op == "incr" and (val is None or not val.isdigit()):
                    problems.append(f"{svc}: {k} should be a counter after {entry}/{rtype}, found {val!r}")
                elif op == "set" and not _written_by_runtime(val, user):
                    problems.append(f"{svc}: {entry}/{rtype} should have written {k}; found {str(val)[:60]}")
    return problems


def _written_by_runtime(val: bytes | None, user: str) -> bool:
    if val is None:
        return False
    try:
        d = json.loads(val)
    except ValueError:
        return False
    return isinstance(d, dict) and d.get("user") == user and isinstance(d.get("at"), (int, float))
