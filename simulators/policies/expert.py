"""The expert runbook: a rule-based policy that writes a correct, minimal Ansible playbook
from a diagnosis report, for every fault type of the catalog (and compounds of two). It is
the benchmark's upper bound and the source of supervised traces.

Input contract: the report at its "full" detail level carries (as a dict or `RunbookInput`)

    service        "hello-service"
    fault_kind     a catalog name ("cpu-stress"; aliases such as "pod-config-error" are
                   accepted) or "compound:<a>+<b>"
    node           the inventory host the service runs on: "n0"
    unit           "remed-hello-service.service"
    config_path    "/etc/remed/hello-service.yaml"
    data_dir       "/var/lib/remed/hello-service"
    port           8080
    dependencies   {name: {"host": "198.18.3.2", "port": 8081, ...}}: the known-good
                   addresses of the services it calls (as the deployment wrote them)
    evidence       what the fault's `describe()` returned: observed facts (unit_state,
                   processes, node_stats, disk, listen, network, config, ...); for a
                   compound, {"parts": [evidence_a, evidence_b]} in the order of the name
    kind           "http" (default) or "redis"                       (optional)
    health_path    "/health" (default; "" for redis)                 (optional)

The playbook targets only the report's inventory host, never localhost; it never
reboots, never touches sshd; it removes the cause (stress workers, qdiscs, nft rules,
drop-ins, stray files, squatters, wrong config entries) and leaves the service active and
healthy, checking /health (or PING) at the end. Where the evidence is missing a fact the
fix needs, a task finds it on the node instead.

    yaml_text = expert_playbook(report)       # a list of plays, as YAML text
    plays = expert_plays(report)              # the same as Python data
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

import yaml

from e2e_reme.simulators.faults.base import COMPOUND_PREFIX, canonical_name

# Thresholds below which a resource limit is pathological for a service of ours.
PATHOLOGICAL = {"CPUQuota": 5.0,            # percent
                "MemoryMax": 32 << 20,      # bytes
                "MemoryHigh": 32 << 20,
                "LimitAS": 256 << 20,
                "LimitNOFILE": 64}
# Units a remediation must never stop, whatever they hold.
PROTECTED_UNITS = ("ssh.service", "sshd.service", "init.scope", "dbus.service", "systemd-")


@dataclass(frozen=True)
class RunbookInput:
    service: str
    fault_kind: str
    node: str
    unit: str
    config_path: str
    data_dir: str
    port: int
    dependencies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    evidence: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "http"
    health_path: str = "/health"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunbookInput":
        """From a report dict; keys the runbook does not use are ignored."""
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("service", "fault_kind", "node", "unit", "config_path", "data_dir", "port")
                   if n not in d]
        if missing:
            raise ValueError(f"runbook input lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_target(cls, target, fault_kind: str, evidence: Mapping[str, Any], node: str,
                    targets: Mapping[str, Any] | None = None) -> "RunbookInput":
        """From a ServiceTarget, the deployment's targets (for the dependencies' addresses),
        the fault's describe() and the node's inventory name."""
        deps = {}
        for name in target.dependencies:
            t = (targets or {}).get(name)
            if t is not None:
                deps[name] = {"host": t.host, "port": t.port, "kind": t.kind}
        return cls(target.service, fault_kind, node, target.unit, target.config_path, target.data_dir,
                   target.port, deps, dict(evidence), target.kind, target.health_path)


def expert_plays(report: RunbookInput | Mapping[str, Any]) -> list[dict]:
    r = report if isinstance(report, RunbookInput) else RunbookInput.from_dict(report)
    kinds, evidences = _parts(r)
    tasks: list[dict] = []
    for kind, ev in zip(kinds, evidences):
        fix = _FIXES.get(kind)
        if fix is None:
            raise ValueError(f"the runbook has no rule for fault kind '{kind}' "
                             f"(known: {', '.join(sorted(_FIXES))})")
        for t in fix(r, ev):
            if t not in tasks:   # two parts may share a step (daemon-reload, a restart)
                tasks.append(t)
    tasks += _verify(r)
    return [{"name": f"Remediate {r.fault_kind} on {r.service}", "hosts": r.node, "gather_facts": False,
             "tasks": tasks}]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (shell scripts) as literal blocks: the playbook reads as written."""


def _str(dumper: yaml.SafeDumper, s: str):
    if "\n" in s:
        s = "\n".join(l.rstrip() for l in s.splitlines()) + ("\n" if s.endswith("\n") else "")
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", s)


_Dumper.add_representer(str, _str)


def expert_playbook(report: RunbookInput | Mapping[str, Any]) -> str:
    """The playbook as YAML text: a list of plays."""
    return yaml.dump(expert_plays(report), Dumper=_Dumper, sort_keys=False, width=120)


def _parts(r: RunbookInput) -> tuple[list[str], list[Mapping[str, Any]]]:
    if r.fault_kind.startswith(COMPOUND_PREFIX):
        kinds = [canonical_name(k) for k in r.fault_kind[len(COMPOUND_PREFIX):].split("+")]
        evs = list((r.evidence or {}).get("parts") or [])
        evs += [{}] * (len(kinds) - len(evs))
        return kinds, evs[:len(kinds)]
    return [canonical_name(r.fault_kind)], [r.evidence or {}]


# ---- building blocks ------------------------------------------------------------------------

def _shell(name: str, script: str, **kw) -> dict:
    return {"name": name, "ansible.builtin.shell": script, **kw}


def _restart(r: RunbookInput, reload: bool = False) -> list[dict]:
    tasks = []
    if reload:
        tasks.append({"name": "Reload systemd's view of the unit files",
                      "ansible.builtin.systemd_service": {"daemon_reload": True}})
    tasks.append({"name": f"Clear the failed state of {r.unit}",
                  "ansible.builtin.command": f"systemctl reset-failed {r.unit}",
                  "changed_when": False, "failed_when": False})
    tasks.append({"name": f"Restart {r.unit}",
                  "ansible.builtin.systemd_service": {"name": r.unit, "state": "restarted"}})
    return tasks


def _verify(r: RunbookInput) -> list[dict]:
    tasks = [{"name": f"{r.unit} is running",
              "ansible.builtin.systemd_service": {"name": r.unit, "state": "started"}}]
    if r.kind == "redis" or not r.health_path:
        tasks.append({"name": f"{r.service} answers PING", "ansible.builtin.command": f"redis-cli -p {r.port} ping",
                      "register": "ping", "until": "ping.stdout == 'PONG'", "retries": 30, "delay": 1,
                      "changed_when": False})
    else:
        tasks.append({"name": f"{r.service} is healthy",
                      "ansible.builtin.uri": {"url": f"http://{{{{ ansible_host }}}}:{r.port}{r.health_path}",
                                              "status_code": 200, "timeout": 3},
                      "register": "health", "until": "health.status == 200", "retries": 30, "delay": 1})
    return tasks


def _cgroup_procs_snippet(unit: str) -> str:
    # The named systemd hierarchy first: in a container on a v1/hybrid host the unified one
    # may be shared with other containers, whose processes it lists as pid 0 (and `kill 0`
    # would kill our own process group). Pid 0 is never a process of ours.
    return (f'cg=$(systemctl show -p ControlGroup --value {unit})\n'
            'procs=""\n'
            'for d in /sys/fs/cgroup/systemd /sys/fs/cgroup /sys/fs/cgroup/unified; do\n'
            '  if [ -n "$cg" ] && [ -f "$d$cg/cgroup.procs" ]; then procs=$(grep -vx 0 "$d$cg/cgroup.procs"); break; fi\n'
            'done\n')


def _kill_extra_in_cgroup(r: RunbookInput, why: str) -> dict:
    """Kill every process in the unit's cgroup but its main one (the service itself)."""
    script = (f"main=$(systemctl show -p MainPID --value {r.unit})\n"
              "for i in 1 2 3 4 5 6 7 8 9 10; do\n"
              + "".join("  " + l + "\n" for l in _cgroup_procs_snippet(r.unit).splitlines())
              + '  extra=""\n'
              '  for p in $procs; do [ "$p" != "$main" ] && extra="$extra $p"; done\n'
              '  [ -z "$extra" ] && exit 0\n'
              '  kill -KILL $extra 2>/dev/null\n'
              '  sleep 0.3\n'
              "done\n"
              "echo \"still there:$extra\" >&2; exit 1\n")
    return _shell(f"Kill the {why} inside {r.unit}'s cgroup (all but its main process)", script)


def _is_protected(unit: str | None, r: RunbookInput) -> bool:
    if not unit or unit == r.unit:
        return True
    return any(unit == p or (p.endswith("-") and unit.startswith(p)) for p in PROTECTED_UNITS)


def _stop_processes(r: RunbookInput, procs: list[Mapping[str, Any]], what: str) -> list[dict]:
    """Stop the units holding these processes (transient or not), or kill bare processes."""
    tasks, units, pids = [], [], []
    for p in procs:
        unit = p.get("unit")
        if isinstance(unit, str) and unit.endswith((".service", ".scope")) and not _is_protected(unit, r):
            if unit not in units:
                units.append(unit)
        elif p.get("pid") and unit != r.unit:
            pids.append(int(p["pid"]))
    for u in units:
        tasks.append({"name": f"Stop {u}, the {what}", "ansible.builtin.systemd_service": {"name": u, "state": "stopped"}})
    if pids:
        tasks.append(_shell(f"Kill the {what} ({', '.join(map(str, pids))})",
                            f"kill -KILL {' '.join(map(str, pids))} 2>/dev/null; true"))
    return tasks


def _kv(setting: str) -> tuple[str, str]:
    k, _, v = setting.partition("=")
    return k.strip(), v.strip()


def _bytes(v: str) -> float | None:
    v = v.strip().upper()
    if not v or v in ("INFINITY",):
        return None
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if v[-1] in mult:
            return float(v[:-1]) * mult[v[-1]]
        return float(v)
    except ValueError:
        return None


def _pathological(setting: str) -> bool:
    k, v = _kv(setting)
    if k not in PATHOLOGICAL or not v:
        return False
    if k == "CPUQuota":
        try:
            return float(v.rstrip("%")) < PATHOLOGICAL[k]
        except ValueError:
            return False
    n = _bytes(v)
    return n is not None and n < PATHOLOGICAL[k]


def _fix_dropins(r: RunbookInput, ev: Mapping[str, Any], is_bad: Callable[[str], bool], what: str) -> list[dict]:
    """Remove the bad settings of the unit's drop-ins: a drop-in with nothing else goes;
    one with other settings keeps them."""
    tasks = []
    for d in (ev.get("unit_state") or {}).get("drop_ins") or []:
        settings = [s for s in d.get("settings") or [] if s.strip()]
        bad = [s for s in settings if is_bad(s)]
        if not bad:
            continue
        # "ExecStart=" (empty) only resets the list before a new ExecStart: it goes with it.
        rest = [s for s in settings if s not in bad and not (what == "release" and s.replace(" ", "") == "ExecStart=")]
        if not rest:
            tasks.append({"name": f"Remove the drop-in {d['path']} ({'; '.join(bad)})",
                          "ansible.builtin.file": {"path": d["path"], "state": "absent"}})
        else:
            for s in bad:
                k, _ = _kv(s)
                tasks.append({"name": f"Remove {s} from {d['path']}",
                              "ansible.builtin.lineinfile": {"path": d["path"], "regexp": f"^\\s*{k}\\s*=",
                                                              "state": "absent"}})
    if not tasks:
        # The report did not show the drop-ins: find the offending lines on the node.
        if what == "release":
            keys = "ExecStart"
            script = (f"d=/etc/systemd/system/{r.unit}.d; [ -d $d ] || exit 0\n"
                      f"for f in $(grep -l '^ExecStart=.\\+' $d/*.conf 2>/dev/null); do rm -f $f; echo removed $f; done\n")
        else:
            keys = "|".join(PATHOLOGICAL)
            script = (f"d=/etc/systemd/system/{r.unit}.d; [ -d $d ] || exit 0\n"
                      f"python3 - $d <<'EOF'\n{_DROPIN_SWEEP.strip()}\nEOF\n")
        tasks.append(_shell(f"Remove pathological {keys} settings from {r.unit}'s drop-ins", script,
                            register="swept", changed_when="swept.stdout != ''"))
    return tasks


_DROPIN_SWEEP = r'''
import glob, os, re, sys
LIMITS = %s
def bytes_(v):
    m = re.fullmatch(r"([\d.]+)([KMGT]?)", v.strip().upper())
    return float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)] if m else None
for path in glob.glob(os.path.join(sys.argv[1], "*.conf")):
    lines = open(path).read().splitlines()
    keep = []
    for l in lines:
        k, _, v = l.partition("=")
        k = k.strip()
        bad = False
        if k == "CPUQuota":
            try:
                bad = float(v.strip().rstrip("%%")) < LIMITS[k]
            except ValueError:
                pass
        elif k in LIMITS:
            n = bytes_(v)
            bad = n is not None and n < LIMITS[k]
        if not bad:
            keep.append(l)
    if keep != lines:
        if [l for l in keep if l.strip() and not l.startswith(("[", "#"))]:
            open(path, "w").write("\n".join(keep) + "\n")
        else:
            os.remove(path)
        print("fixed", path)
''' % json.dumps(PATHOLOGICAL)


# ---- the rules, one per fault kind ----------------------------------------------------------

def _cpu_stress(r: RunbookInput, ev) -> list[dict]:
    return [_kill_extra_in_cgroup(r, "CPU stress workers")]


def _disk_io(r: RunbookInput, ev) -> list[dict]:
    return [_kill_extra_in_cgroup(r, "IO stress workers"),
            _shell(f"Remove the scratch directories the IO workers left in {r.data_dir}",
                   f"find {r.data_dir} -mindepth 1 -maxdepth 1 -type d -name 'tmp-stress-ng-*' -print "
                   "-exec rm -rf {} +", register="scratch", changed_when="scratch.stdout != ''")]


def _memory_stress(r: RunbookInput, ev) -> list[dict]:
    hogs = list(ev.get("memory_hogs") or [])
    if not hogs:
        top = (ev.get("node_stats") or {}).get("top_memory") or []
        hogs = [p for p in top if p.get("rss_mib", 0) >= 128 and p.get("unit") != r.unit]
    if hogs:
        return _stop_processes(r, hogs, "memory hog")
    # Nothing observed: stop whatever holds more than 256 MiB outside the service and sshd,
    # by its unit where it has one (a worker pool respawns a single killed worker).
    return [_shell("Stop the processes holding most of the node's memory",
                   "for p in $(ps -eo pid=,rss= --sort=-rss | awk '$2 > 262144 {print $1}'); do\n"
                   "  [ -d /proc/$p ] || continue   # went with a unit stopped before it\n"
                   "  cg=$(grep -m1 -E '^0::|name=systemd:' /proc/$p/cgroup 2>/dev/null | cut -d: -f3)\n"
                   "  u=${cg##*/}\n"
                   f"  case \"$u\" in {r.unit}|ssh.service|init.scope|systemd-*) continue ;; esac\n"
                   "  case \"$u\" in\n"
                   "    *.service|*.scope) systemctl stop \"$u\" && echo \"$u\" ;;\n"
                   "    *) kill -KILL $p 2>/dev/null && echo $p ;;\n"
                   "  esac\n"
                   "done; true", register="hogs", changed_when="hogs.stdout != ''")]


def _netem(r: RunbookInput, ev) -> list[dict]:
    return [_shell("Remove the netem qdiscs from the interfaces that have one",
                   "for d in $(ls /sys/class/net); do\n"
                   "  if tc qdisc show dev $d | grep -q ' netem '; then tc qdisc del dev $d root && echo $d; fi\n"
                   "done",
                   register="qdiscs", changed_when="qdiscs.stdout != ''")]


_NFT_DELETE = r'''
import json, subprocess, sys
mode, port, deps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
rs = json.loads(subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True, check=True).stdout)
for item in rs.get("nftables", []):
    rule = item.get("rule")
    if not rule:
        continue
    text = json.dumps(rule.get("expr", []))
    drops = '"drop"' in text
    mine = (f'"right": {port}' in text) or any(f'"{h}"' in text and f'"right": {p}' in text for h, p in deps)
    if mode == "loss":
        hit = drops and '"numgen"' in text and mine
    else:
        hit = drops and any(f'"{h}"' in text and f'"right": {p}' in text for h, p in deps)
    if hit:
        subprocess.run(["nft", "delete", "rule", rule["family"], rule["table"], rule["chain"],
                        "handle", str(rule["handle"])], check=True)
        print(f"deleted {rule['family']} {rule['table']} {rule['chain']} handle {rule['handle']}")
'''


def _nft_delete(r: RunbookInput, mode: str, deps: list[tuple[str, int]], name: str) -> dict:
    arg = json.dumps([[h, p] for h, p in deps])
    return _shell(name, f"python3 - {mode} {r.port} '{arg}' <<'EOF'\n{_NFT_DELETE.strip()}\nEOF",
                  register="nft", changed_when="nft.stdout != ''")


def _network_loss(r: RunbookInput, ev) -> list[dict]:
    net = ev.get("network") or {}
    tasks = []
    if any(" netem " in q for q in net.get("qdiscs") or []) or not net:
        tasks += _netem(r, ev)
    if any("numgen" in l for l in net.get("nft_ruleset") or []) or not net:
        deps = [(d["host"], int(d["port"])) for d in r.dependencies.values()]
        tasks.append(_nft_delete(r, "loss", deps, f"Delete the nftables rules randomly dropping {r.service}'s packets"))
    return tasks


def _firewall_drop(r: RunbookInput, ev) -> list[dict]:
    deps = [(d["host"], int(d["port"])) for d in r.dependencies.values()]
    return [_nft_delete(r, "firewall", deps, f"Delete the nftables rules dropping {r.service}'s traffic to its dependencies")]


def _pod_fail(r: RunbookInput, ev) -> list[dict]:
    return [{"name": f"Clear the failed state of {r.unit}", "ansible.builtin.command": f"systemctl reset-failed {r.unit}",
             "changed_when": False, "failed_when": False},
            {"name": f"Start {r.unit}", "ansible.builtin.systemd_service": {"name": r.unit, "state": "started"}}]


def _config_error(r: RunbookInput, ev) -> list[dict]:
    return _fix_dropins(r, ev, _pathological, "limits") + _restart(r, reload=True)


def _bad_release(r: RunbookInput, ev) -> list[dict]:
    def is_release(s: str) -> bool:
        k, v = _kv(s)
        return k == "ExecStart" and bool(v)
    return _fix_dropins(r, ev, is_release, "release") + _restart(r, reload=True)


def _hung_process(r: RunbookInput, ev) -> list[dict]:
    resume = _shell(f"Resume the stopped processes of {r.unit}",
                    _cgroup_procs_snippet(r.unit)
                    + "for p in $procs; do\n"
                    "  s=$(sed 's/.*) //' /proc/$p/stat 2>/dev/null | cut -d' ' -f1)\n"
                    "  [ \"$s\" = T ] && kill -CONT $p && echo $p\n"
                    "done; true", register="resumed", changed_when="resumed.stdout != ''")
    if r.kind == "redis" or not r.health_path:
        return [resume]
    check = {"name": f"{r.service} answers again",
             "ansible.builtin.uri": {"url": f"http://{{{{ ansible_host }}}}:{r.port}{r.health_path}",
                                     "status_code": 200, "timeout": 3},
             "register": "resumed_health", "until": "resumed_health.status == 200", "retries": 5, "delay": 1}
    return [{"name": f"Resume {r.service}, restarting it if it stays unresponsive",
             "block": [resume, check],
             "rescue": _restart(r)}]


_REWRITE_DEPS = r'''
import json, os, sys, yaml
path, good = sys.argv[1], json.loads(sys.argv[2])
cfg = yaml.safe_load(open(path))
deps = cfg.get("dependencies") or {}
changed = []
for name, addr in good.items():
    cur = deps.get(name)
    if not isinstance(cur, dict):
        continue
    for k in ("host", "port"):
        if k in addr and cur.get(k) != addr[k]:
            changed.append(f"{name}.{k}: {cur.get(k)} -> {addr[k]}")
            cur[k] = addr[k]
if changed:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False, default_flow_style=False)
    os.replace(tmp, path)
    print("; ".join(changed))
'''


def _wrong_dependency(r: RunbookInput, ev) -> list[dict]:
    good = {n: {k: a[k] for k in ("host", "port") if k in a} for n, a in r.dependencies.items()}
    return [_shell(f"Put the known-good dependency addresses back into {r.config_path}",
                   f"python3 - {r.config_path} '{json.dumps(good)}' <<'EOF'\n{_REWRITE_DEPS.strip()}\nEOF",
                   register="config", changed_when="config.stdout != ''")] + _restart(r)


def _port_taken(r: RunbookInput, ev) -> list[dict]:
    holders = [h for h in ((ev.get("listen") or {}).get("holders") or []) if h.get("unit") != r.unit]
    tasks = _stop_processes(r, holders, f"process holding port {r.port}") if holders else [
        _shell(f"Free port {r.port} from processes outside {r.unit}",
               f"for p in $(ss -Hltnp 'sport = :{r.port}' | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do\n"
               f"  grep -q '/{r.unit}' /proc/$p/cgroup || {{ kill -TERM $p; echo $p; }}\n"
               "done", register="freed", changed_when="freed.stdout != ''")]
    # No wait for the port to be free: the unit's own Restart= may take it first, and the
    # restart below is right either way.
    return tasks + _restart(r)


def _fd_exhaustion(r: RunbookInput, ev) -> list[dict]:
    return _fix_dropins(r, ev, lambda s: _kv(s)[0] == "LimitNOFILE" and _pathological(s), "limits") \
        + _restart(r, reload=True)


def _stray_files(r: RunbookInput, ev, writers_files: list[str]) -> list[dict]:
    disk = ev.get("disk") or {}
    own = (f"{r.data_dir.rstrip('/')}/seed/", f"{r.data_dir.rstrip('/')}/work/")
    files = list(writers_files)
    for f in disk.get("largest_files") or []:
        if f.get("mib", 0) >= 1 and not f["path"].startswith(own) and f["path"] not in files:
            files.append(f["path"])
    if files:
        return [{"name": f"Delete {p}", "ansible.builtin.file": {"path": p, "state": "absent"}} for p in files]
    return [_shell(f"Delete the large stray files in {r.data_dir} (not the service's seed/ or work/)",
                   f"find {r.data_dir} -xdev -type f -size +1M -not -path '{own[0]}*' -not -path '{own[1]}*' "
                   "-print -delete", register="strays", changed_when="strays.stdout != ''")]


def _redis_resume_writes(r: RunbookInput) -> list[dict]:
    """A redis whose last save failed refuses writes until one succeeds: save now."""
    if r.kind != "redis":
        return []
    return [_shell(f"Save {r.service}'s data now that there is room, so it accepts writes again",
                   f"redis-cli -p {r.port} bgsave >/dev/null 2>&1 || true\n"
                   "for i in $(seq 100); do\n"
                   f"  redis-cli -p {r.port} info persistence | grep -q 'rdb_bgsave_in_progress:0' && break\n"
                   "  sleep 0.1\n"
                   "done\n"
                   f"redis-cli -p {r.port} info persistence | grep -q 'rdb_last_bgsave_status:ok'",
                   changed_when=True)]


def _readonly_fs(r: RunbookInput, ev) -> list[dict]:
    disk = ev.get("disk") or {}
    where = disk.get("mount_point") or r.data_dir
    # A bind mount takes `remount,bind,rw`; a plain one `remount,rw`: try the plain one first.
    return [_shell(f"Make {where} (holding {r.data_dir}) writable again",
                   f"findmnt -no OPTIONS -T {r.data_dir} | grep -q '^ro' || exit 0\n"
                   f"mount -o remount,rw {where} 2>/dev/null || mount -o remount,bind,rw {where}\n"
                   f"findmnt -no OPTIONS -T {r.data_dir} | grep -q '^rw' && echo remounted",
                   register="remount", changed_when="remount.stdout != ''")] + _redis_resume_writes(r)


def _disk_full(r: RunbookInput, ev) -> list[dict]:
    return _stray_files(r, ev, []) + _redis_resume_writes(r)


def _log_flood(r: RunbookInput, ev) -> list[dict]:
    disk = ev.get("disk") or {}
    writers = [w for w in disk.get("open_by") or [] if w.get("unit") != r.unit]
    tasks = _stop_processes(r, writers, "runaway log writer") if writers else [
        _shell(f"Stop the processes writing under {r.data_dir} (other than {r.unit})",
               f"for p in $(ls /proc | grep -E '^[0-9]+$'); do\n"
               f"  ls -l /proc/$p/fd 2>/dev/null | grep -q ' {r.data_dir}/' || continue\n"
               f"  grep -q '/{r.unit}' /proc/$p/cgroup || {{ kill -KILL $p; echo $p; }}\n"
               "done", register="writers", changed_when="writers.stdout != ''")]
    files = [f for w in writers for f in w.get("files") or [] if f.startswith(r.data_dir)]
    return tasks + _stray_files(r, ev, files) + _redis_resume_writes(r)


_FIXES: dict[str, Callable[[RunbookInput, Mapping[str, Any]], list[dict]]] = {
    "cpu-stress": _cpu_stress,
    "memory-stress": _memory_stress,
    "disk-io": _disk_io,
    "disk-full": _disk_full,
    "log-flood": _log_flood,
    "network-delay": _netem,
    "network-loss": _network_loss,
    "firewall-drop": _firewall_drop,
    "readonly-fs": _readonly_fs,
    "pod-fail": _pod_fail,
    "config-error": _config_error,
    "hung-process": _hung_process,
    "wrong-dependency": _wrong_dependency,
    "port-taken": _port_taken,
    "fd-exhaustion": _fd_exhaustion,
    "bad-release": _bad_release,
}


def covered_kinds() -> list[str]:
    return sorted(_FIXES)


__all__ = ["RunbookInput", "expert_playbook", "expert_plays", "covered_kinds", "PATHOLOGICAL"]
