"""What a monitoring system would see on the target's node, gathered in one SSH round trip:
the facts a fault's `describe()` reports. Nothing here knows how a fault was made; it
looks at the node the way an SRE's tools do (systemctl, the journal, /proc, df, ss, tc,
nft, an HTTP probe, the service's /metrics).

    facts = observe(sb, target, ["unit", "health", "journal", "processes"], targets)

Sections:
    unit        (as unit_state) systemd state, restarts, main PID, limits, drop-ins and their settings
    health      one health probe from the node (HTTP, or PING for redis), latency
    latency     up to 5 requests of each request type in its config (http only): p50, max, statuses
    metrics     the service's own /metrics: requests, errors by status, calls per dependency
    journal     the unit's recent warning/error lines (and systemd's about it)
    processes   every process in the unit's cgroup: CPU % over a second, RSS, state
    node        (as node_stats) load, memory, pressure (PSI), the top CPU and memory consumers and their units
    disk        the filesystem holding the data dir: type, size, use; its largest files;
                processes writing under it
    listen      who listens on the service's port (pid, command, unit)
    network     qdiscs, the nft ruleset, and each dependency: name resolution, TCP connect
                time, health from this node
    config      the dependency addresses in the service's config
    fds         open file descriptors of the main process and its limit
"""

from __future__ import annotations

import json
from typing import Iterable, Mapping

from e2e_reme.simulators.systems.target import ServiceTarget

# Sections whose key in the facts differs from their name.
SECTION_KEYS = {"unit": "unit_state", "node": "node_stats"}

SECTIONS = ("unit", "health", "latency", "metrics", "journal", "processes", "node", "disk",
            "listen", "network", "config", "fds")

_GUEST = r'''
import json, os, re, socket, subprocess, sys, threading, time, urllib.request, urllib.error

inp = json.load(sys.stdin)
want = set(inp["sections"])
unit, port, host, kind = inp["unit"], inp["port"], inp["host"], inp["kind"]
out = {}

def sh(*cmd, timeout=10):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    except Exception:
        return ""

def show(u, props):
    txt = sh("systemctl", "show", u, *[f"-p{p}" for p in props])
    return dict(l.split("=", 1) for l in txt.splitlines() if "=" in l)

def cg_of(pid):
    try:
        for line in open(f"/proc/{pid}/cgroup"):
            if line.startswith("0::") or ":name=systemd:" in line:
                return line.strip().split(":", 2)[2]
    except OSError:
        pass
    return ""

def unit_of(pid):
    cg = cg_of(pid)
    m = re.findall(r"[^/]+\.(?:service|scope)", cg)
    return m[-1] if m else (cg or None)

def stat(pid):
    try:
        s = open(f"/proc/{pid}/stat").read()
        rest = s.rsplit(")", 1)[1].split()
        return {"state": rest[0], "ticks": int(rest[11]) + int(rest[12]),
                "rss_mib": round(int(rest[21]) * 4096 / 2**20, 1),
                "comm": s[s.index("(") + 1:s.rindex(")")]}
    except (OSError, IndexError, ValueError):
        return None

def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    except OSError:
        return ""

def cpu_sample(pids, secs=1.0):
    a = {p: stat(p) for p in pids}
    time.sleep(secs)
    hz = os.sysconf("SC_CLK_TCK")
    res = {}
    for p in pids:
        b = stat(p)
        if a.get(p) and b:
            res[p] = dict(b, cpu_pct=round((b["ticks"] - a[p]["ticks"]) * 100 / hz / secs, 1))
    return res

def unit_pids(u):
    cg = show(u, ["ControlGroup"]).get("ControlGroup", "")
    if not cg:
        return []
    # The named systemd hierarchy first: a v1/hybrid host's unified one may be shared with
    # other containers (their processes read as pid 0).
    for d in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        try:
            return [int(x) for x in open(f"{d}{cg}/cgroup.procs").read().split() if x != "0"]
        except OSError:
            continue
    return []

def http_get(url, timeout=3.0):
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read(4096)
            status = r.status
    except urllib.error.HTTPError as e:
        body, status = e.read(4096), e.code
    except Exception as e:
        return {"status": 0, "error": f"{type(e).__name__}: {e}"[:200], "ms": round((time.monotonic() - t0) * 1000, 1)}
    res = {"status": status, "ms": round((time.monotonic() - t0) * 1000, 1)}
    try:
        data = json.loads(body)
        for k in ("problems", "error", "status"):
            if k in data and k != "status":
                res[k] = data[k]
    except ValueError:
        res["body"] = body[:120].decode(errors="replace")
    return res

def redis_ping(h, p, timeout=3.0):
    t0 = time.monotonic()
    try:
        with socket.create_connection((h, p), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            r = s.recv(128)
        ok = r.startswith(b"+PONG")
        return {"status": 200 if ok else 503, "reply": r[:80].decode(errors="replace").strip(),
                "ms": round((time.monotonic() - t0) * 1000, 1)}
    except Exception as e:
        return {"status": 0, "error": f"{type(e).__name__}: {e}"[:200], "ms": round((time.monotonic() - t0) * 1000, 1)}

def tcp_connect(h, p, timeout=3.0):
    t0 = time.monotonic()
    try:
        socket.create_connection((h, p), timeout=timeout).close()
        return {"ok": True, "ms": round((time.monotonic() - t0) * 1000, 1)}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:160], "ms": round((time.monotonic() - t0) * 1000, 1)}

def _s_unit():
    props = ["ActiveState", "SubState", "Result", "NRestarts", "MainPID", "ExecMainStatus",
             "ExecMainStartTimestamp", "StateChangeTimestamp", "DropInPaths", "CPUQuotaPerSecUSec",
             "MemoryMax", "MemoryCurrent", "LimitNOFILE", "LimitAS", "ExecStart", "FragmentPath"]
    info = show(unit, props)
    u = {"active": info.get("ActiveState"), "sub": info.get("SubState"), "result": info.get("Result"),
         "restarts": int(info.get("NRestarts") or 0), "main_pid": int(info.get("MainPID") or 0),
         "exit_status": info.get("ExecMainStatus"), "since": info.get("StateChangeTimestamp"),
         "cpu_quota_per_s": info.get("CPUQuotaPerSecUSec"), "memory_max": info.get("MemoryMax"),
         "memory_current": info.get("MemoryCurrent"), "limit_nofile": info.get("LimitNOFILE"),
         "limit_as": info.get("LimitAS"), "unit_file": info.get("FragmentPath")}
    m = re.search(r"argv\[\]=([^;]*)", info.get("ExecStart", ""))
    u["exec_start"] = m.group(1).strip() if m else info.get("ExecStart", "")
    drop = []
    for path in info.get("DropInPaths", "").split():
        try:
            lines = [l.strip() for l in open(path) if l.strip() and not l.startswith(("#", ";"))]
        except OSError:
            lines = []
        try:
            mtime = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.stat(path).st_mtime))
        except OSError:
            mtime = None
        drop.append({"path": path, "settings": [l for l in lines if not l.startswith("[")], "modified": mtime})
    u["drop_ins"] = drop
    out["unit_state"] = u

def _s_health():
    if kind == "redis" or not inp.get("health_path"):
        out["health"] = redis_ping(host, port)
    else:
        out["health"] = http_get(f"http://{host}:{port}{inp['health_path']}")

def _s_latency():
    if not (kind != "redis"):
        return
    rtypes = inp.get("request_types") or []
    if not rtypes:
        try:
            import yaml
            rtypes = sorted((yaml.safe_load(open(inp["config_path"])) or {}).get("requests") or {})
        except Exception:
            rtypes = []
    lat = {}
    stop_at = time.monotonic() + 3    # a budget for the whole section: slow replies say enough
    for rtype in rtypes[:4]:
        samples, statuses = [], {}
        for _ in range(5):
            if samples and time.monotonic() > stop_at:
                break
            r = http_get(f"http://{host}:{port}/{rtype}", timeout=3.0)
            samples.append(r["ms"])
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
            if r["status"] == 0:
                break   # not answering: one timeout says it, five would only take longer
        samples.sort()
        lat[rtype] = {"p50_ms": samples[len(samples) // 2], "max_ms": samples[-1], "samples": len(samples),
                      "statuses": statuses}
    out["latency"] = lat

def _s_metrics():
    if not (kind != "redis"):
        return
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=3) as r:
            m = json.loads(r.read())
        lat = m.get("latency_ms", {})
        out["metrics"] = {"requests": m.get("requests"), "errors": m.get("errors"),
                          "in_flight": m.get("in_flight"), "by_status": m.get("by_status"),
                          "mean_ms": round(lat.get("sum", 0) / lat["count"], 1) if lat.get("count") else None,
                          "calls": m.get("calls"), "uptime_s": m.get("uptime_s")}
    except Exception as e:
        out["metrics"] = {"error": f"{type(e).__name__}: {e}"[:160]}

def _s_journal():
    since = ["--since", f"@{int(inp['since'])}"] if inp.get("since") else []
    txt = sh("journalctl", "-u", unit, *since, "-n", "400", "--no-pager", "-o", "short-iso", timeout=15)
    pat = re.compile(r"error|fail|exception|traceback|refused|denied|timed out|no space|too many open|"
                     r"out of memory|oom|killed|cannot|unable|address already|not writable|status=|core dump", re.I)
    lines = [l for l in txt.splitlines() if pat.search(l) and not l.startswith("--")]
    out["journal"] = {"error_lines": lines[-10:], "matching": len(lines)}

def _s_processes():
    pids = unit_pids(unit)
    main = int(show(unit, ["MainPID"]).get("MainPID") or 0)
    sampled = cpu_sample(pids) if pids else {}
    procs = []
    for p in pids:
        s = sampled.get(p)
        if s:
            procs.append({"pid": p, "name": s["comm"], "cmd": cmdline(p), "state": s["state"],
                          "cpu_pct": s["cpu_pct"], "rss_mib": s["rss_mib"], "main": p == main})
    out["processes"] = {"count": len(procs), "cpu_pct_total": round(sum(p["cpu_pct"] for p in procs), 1),
                        "rss_mib_total": round(sum(p["rss_mib"] for p in procs), 1), "list": procs[:20]}

def _s_node():
    mem = {}
    for line in open("/proc/meminfo"):
        k, v = line.split(":", 1)
        mem[k] = int(v.split()[0]) // 1024
    n = {"load": open("/proc/loadavg").read().split()[:3], "cpus": os.cpu_count(),
         "mem_total_mib": mem.get("MemTotal"), "mem_available_mib": mem.get("MemAvailable")}
    psi = {}
    for r in ("cpu", "memory", "io"):
        try:
            first = open(f"/proc/pressure/{r}").readline()
            psi[r] = float(re.search(r"avg10=([0-9.]+)", first).group(1))
        except (OSError, AttributeError):
            pass
    if psi:
        n["pressure_avg10"] = psi
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    sampled = cpu_sample(pids)
    rows = [{"pid": p, "name": s["comm"], "cmd": cmdline(p), "unit": unit_of(p), "cpu_pct": s["cpu_pct"],
             "rss_mib": s["rss_mib"], "state": s["state"]} for p, s in sampled.items()]
    n["top_cpu"] = sorted(rows, key=lambda r: -r["cpu_pct"])[:6]
    n["top_memory"] = sorted(rows, key=lambda r: -r["rss_mib"])[:6]
    out["node_stats"] = n

def _s_disk():
    dd = inp["data_dir"]
    d = {"data_dir": dd}
    df = sh("df", "-B1", "--output=source,fstype,size,used,avail,pcent,target", dd).splitlines()
    if len(df) >= 2:
        src, fstype, size, used, avail, pcent, target = df[1].split()[:7]
        d.update({"filesystem": src, "fstype": fstype, "size_mib": round(int(size) / 2**20, 1),
                  "used_mib": round(int(used) / 2**20, 1), "avail_mib": round(int(avail) / 2**20, 2),
                  "use_pct": pcent, "mounted_on": target})
    # Only the access mode and atime flags: an overlay's other options name the host's paths.
    opts = sh("findmnt", "-no", "OPTIONS,TARGET", "-T", dd).split()
    if opts:
        d["mount_options"] = ",".join(opts[0].split(",")[:2])
        d["mount_point"] = opts[-1]
    probe = os.path.join(dd, ".write-test")
    try:
        with open(probe, "w") as f:
            f.write("x")
        os.unlink(probe)
        d["writable"] = True
    except OSError as e:
        d["writable"] = False
        d["write_error"] = e.strerror
    files = []
    for root, dirs, names in os.walk(dd):
        for nm in names:
            p = os.path.join(root, nm)
            try:
                files.append((os.lstat(p).st_size, p))
            except OSError:
                pass
    files.sort(reverse=True)
    d["largest_files"] = [{"path": p, "mib": round(s / 2**20, 2)} for s, p in files[:5]]
    writers = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                try:
                    t = os.readlink(f"/proc/{p}/fd/{fd}")
                except OSError:
                    continue
                if t.startswith(dd.rstrip("/") + "/"):
                    w = writers.setdefault(int(p), {"pid": int(p), "cmd": cmdline(int(p)), "unit": unit_of(int(p)), "files": []})
                    if t not in w["files"]:
                        w["files"].append(t)
        except OSError:
            continue
    d["open_by"] = list(writers.values())[:8]
    out["disk"] = d

def _s_listen():
    holders = []
    txt = sh("ss", "-Hltnp", f"sport = :{port}")
    for line in txt.splitlines():
        for pid in re.findall(r"pid=(\d+)", line):
            pid = int(pid)
            if not any(h["pid"] == pid for h in holders):
                holders.append({"pid": pid, "cmd": cmdline(pid), "unit": unit_of(pid)})
    out["listen"] = {"port": port, "listening": bool(txt.strip()), "holders": holders}

def _s_network():
    qd = [l for l in sh("tc", "qdisc", "show").splitlines() if l.strip()]
    out_net = {"qdiscs": [l for l in qd if " noqueue " not in l and "pfifo_fast" not in l][:12]}
    rs = sh("nft", "list", "ruleset")
    out_net["nft_ruleset"] = [l.rstrip() for l in rs.splitlines() if l.strip()][:40]
    deps = {}

    def one(name, a):
        e = {"address": f"{a['host']}:{a['port']}"}
        try:
            e["resolves_to"] = socket.gethostbyname(a["host"])
        except OSError as ex:
            e["resolves_to"] = f"error: {ex}"
        e["tcp_connect"] = tcp_connect(a["host"], int(a["port"]))
        if a.get("kind") == "redis":
            e["health"] = redis_ping(a["host"], int(a["port"]))
        else:
            e["health"] = http_get(f"http://{a['host']}:{a['port']}{a.get('health_path') or '/health'}")
        deps[name] = e

    ts = [threading.Thread(target=one, args=(n, a)) for n, a in (inp.get("deps") or {}).items()]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out_net["dependencies"] = dict(sorted(deps.items()))
    out["network"] = out_net

def _s_config():
    c = {"path": inp["config_path"]}
    try:
        import yaml
        data = yaml.safe_load(open(inp["config_path"])) or {}
        c["dependencies"] = {n: {"host": a.get("host"), "port": a.get("port")}
                             for n, a in (data.get("dependencies") or {}).items() if isinstance(a, dict)}
        st = os.stat(inp["config_path"])
        c["modified"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(st.st_mtime))
    except Exception as e:
        c["error"] = f"{type(e).__name__}: {e}"[:160]
    out["config"] = c

def _s_fds():
    main = int(show(unit, ["MainPID"]).get("MainPID") or 0)
    f = {"main_pid": main}
    if main:
        try:
            f["open"] = len(os.listdir(f"/proc/{main}/fd"))
            for line in open(f"/proc/{main}/limits"):
                if line.startswith("Max open files"):
                    f["soft_limit"] = line.split()[3]
        except OSError:
            pass
    out["fds"] = f

def _run(name, fn):
    try:
        fn()
    except Exception as e:  # one broken probe must not cost the others
        out[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]

# Sections run side by side: the slow ones (a second of CPU sampling, requests that time
# out) then cost the time of the slowest, not their sum.
threads = [threading.Thread(target=_run, args=(n, globals()["_s_" + n])) for n in ['unit', 'health', 'latency', 'metrics', 'journal', 'processes', 'node', 'disk', 'listen', 'network', 'config', 'fds'] if n in want]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
'''


def observe(sb, target: ServiceTarget, sections: Iterable[str],
            targets: Mapping[str, ServiceTarget] | None = None,
            request_types: Iterable[str] = (), timeout: float = 60, since: float | None = None) -> dict:
    """The facts of the given sections for one service, read on its node now. `since` (epoch
    seconds; the start of the incident) limits the journal to what came after it."""
    sections = list(sections)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown observation section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    deps = {}
    for name in target.dependencies:
        t = (targets or {}).get(name)
        if t is not None:
            deps[name] = {"host": t.host, "port": t.port, "kind": t.kind, "health_path": t.health_path}
    payload = json.dumps({"sections": sections, "unit": target.unit, "port": target.port,
                          "host": target.host, "kind": target.kind, "health_path": target.health_path,
                          "data_dir": target.data_dir, "config_path": target.config_path,
                          "deps": deps, "request_types": list(request_types),
                          "since": since - 2 if since else None})
    cmd = ("f=$(mktemp) && cat > $f <<'REMED_OBSERVE_EOF'\n" + _GUEST + "\nREMED_OBSERVE_EOF\n"
           "python3 $f; rc=$?; rm -f $f; exit $rc")
    res = sb.exec(cmd, node=target.node, timeout=timeout, input=payload)
    if not res.ok:
        return {"error": f"the node did not answer the observation ({'timed out' if res.timed_out else res.rc}): "
                         f"{res.stderr.strip()[-300:]}"}
    try:
        return json.loads(res.stdout)
    except ValueError:
        return {"error": f"unreadable observation: {res.stdout[:200]!r}"}


def symptoms(facts: dict, target: ServiceTarget) -> list[str]:
    """One-line findings from the facts, the way an alert would word them."""
    out = []
    u = facts.get("unit_state") or {}
    if u and u.get("active") != "active":
        out.append(f"{target.unit} is {u.get('active')} ({u.get('sub')}, result {u.get('result')}, "
                   f"{u.get('restarts')} restarts)")
    h = facts.get("health")
    if h and h.get("status") != 200:
        why = "; ".join(h.get("problems") or []) or h.get("error") or h.get("reply") or ""
        out.append(f"health check failed: status {h.get('status')} after {h.get('ms')} ms"
                   + (f" ({why})" if why else ""))
    elif h and h.get("ms", 0) > 200:
        out.append(f"health check slow: {h.get('ms')} ms")
    for rtype, lat in (facts.get("latency") or {}).items():
        bad = {s: n for s, n in lat["statuses"].items() if s != "200"}
        if bad:
            out.append(f"GET /{rtype}: statuses {bad} of {lat.get('samples', 5)}")
        if lat["p50_ms"] > 100:
            out.append(f"GET /{rtype}: p50 {lat['p50_ms']} ms, max {lat['max_ms']} ms")
    p = facts.get("processes") or {}
    if p.get("list"):
        extra = [x for x in p["list"] if not x["main"]]
        if extra:
            names = sorted({x["name"] for x in extra})
            out.append(f"{len(extra)} process(es) besides the main one in {target.unit}: {', '.join(names)}; "
                       f"unit total {p['cpu_pct_total']}% CPU, {p['rss_mib_total']} MiB RSS")
        stopped = [x for x in p["list"] if x["main"] and x["state"] == "T"]
        if stopped:
            out.append(f"main process {stopped[0]['pid']} is stopped (state T)")
    d = facts.get("disk") or {}
    if d.get("writable") is False:
        out.append(f"{d['data_dir']} is not writable: {d.get('write_error')} (mounted {d.get('mount_options')} "
                   f"at {d.get('mount_point')})")
    if d.get("use_pct") and d["use_pct"].rstrip("%").isdigit() and int(d["use_pct"].rstrip("%")) >= 95:
        out.append(f"filesystem of {d['data_dir']} ({d.get('mounted_on')}, {d.get('fstype')}) is {d['use_pct']} full, "
                   f"{d.get('avail_mib')} MiB left")
    j = facts.get("journal") or {}
    if j.get("error_lines"):
        out.append(f"journal: {j['error_lines'][-1][:200]}")
    return out
