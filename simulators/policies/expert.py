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

The answers are what a senior engineer would write, and what a small model is taught
(issue 29): Ansible modules before scripts (systemd_service, file, find, lineinfile,
slurp + copy, uri, command), as short as the fix allows; a stress worker in the unit's
cgroup goes with a restart, an nftables rule is deleted by its handle from `nft -j`'s
listing, a config entry is put back with `combine`. A shell script appears only in the
fallbacks for a report that does not name what to act on. The answers' lengths over real
reports: `bench/expert_lengths.py` (bench/results/expert_lengths.json).

    yaml_text = expert_playbook(report)       # a list of plays, as YAML text
    plays = expert_plays(report)              # the same as Python data
"""

from __future__ import annotations

import json
import re
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
    tasks += _verify(r, tasks)
    return [{"name": f"Remediate {r.fault_kind} on {r.service}", "hosts": r.node, "gather_facts": False,
             "tasks": tasks}]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the few shell scripts) as literal blocks: the playbook reads as written."""


def _str(dumper: yaml.SafeDumper, s: str):
    if "\n" in s:
        s = "\n".join(l.rstrip() for l in s.splitlines()) + ("\n" if s.endswith("\n") else "")
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|")
    if s.startswith("{{") and "'" in s:
        # A template with Jinja string literals: double quotes, not '' doubled inside single ones.
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style='"')
    return dumper.represent_scalar("tag:yaml.org,2002:str", s)


_Dumper.add_representer(str, _str)


def expert_playbook(report: RunbookInput | Mapping[str, Any]) -> str:
    """The playbook as YAML text: a list of plays."""
    # One line per value however long: a folded line is one more thing for a model to learn.
    return yaml.dump(expert_plays(report), Dumper=_Dumper, sort_keys=False, width=1 << 16)


def _parts(r: RunbookInput) -> tuple[list[str], list[Mapping[str, Any]]]:
    if r.fault_kind.startswith(COMPOUND_PREFIX):
        kinds = [canonical_name(k) for k in r.fault_kind[len(COMPOUND_PREFIX):].split("+")]
        evs = list((r.evidence or {}).get("parts") or [])
        evs += [{}] * (len(kinds) - len(evs))
        return kinds, evs[:len(kinds)]
    return [canonical_name(r.fault_kind)], [r.evidence or {}]


# ---- building blocks ------------------------------------------------------------------------
#
# Modules first (systemd_service, file, find, lineinfile, slurp + copy, uri, command with the
# command itself); a shell script only where no module does the job and the report did not
# name what to act on (the fallbacks that find the cause on the node).

def _task(name: str, module: str, args: Any, **kw) -> dict:
    return {"name": name, f"ansible.builtin.{module}": args, **kw}


def _shell(name: str, script: str, **kw) -> dict:
    return _task(name, "shell", script, **kw)


def _reset_failed(r: RunbookInput) -> dict:
    # A unit that crash-looped past its start limit refuses a plain (re)start.
    return _task("Clear the unit's failed state", "command", f"systemctl reset-failed {r.unit}", changed_when=False)


def _restart(r: RunbookInput, reload: bool = False, reset: bool = True, why: str = "") -> list[dict]:
    args = {"name": r.unit, "state": "restarted", **({"daemon_reload": True} if reload else {})}
    return ([_reset_failed(r)] if reset else []) + [_task(f"Restart the service{why}", "systemd_service", args)]


def _starts_unit(r: RunbookInput, tasks: list[dict]) -> bool:
    return any((t.get("ansible.builtin.systemd_service") or {}).get("name") == r.unit
               and (t["ansible.builtin.systemd_service"].get("state") in ("started", "restarted")) for t in tasks)


def _verify(r: RunbookInput, tasks: list[dict]) -> list[dict]:
    """The service is up and answers; a unit no task (re)started is started first."""
    out = [] if _starts_unit(r, tasks) else [
        _task("The service is running", "systemd_service", {"name": r.unit, "state": "started"})]
    if r.kind == "redis" or not r.health_path:
        out.append(_task(f"{r.service} answers PING", "command", f"redis-cli -p {r.port} ping", register="ping",
                         until="ping.stdout == 'PONG'", retries=30, delay=1, changed_when=False))
    else:
        out.append(_task(f"{r.service} is healthy", "uri",
                         {"url": f"http://{{{{ ansible_host }}}}:{r.port}{r.health_path}", "timeout": 3},
                         register="health", until="health.status == 200", retries=30, delay=1))
    return out


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
            pids.append(str(int(p["pid"])))
    for i, u in enumerate(units):
        tasks.append(_task(f"Stop the {what}" + (f" ({i + 1})" if i else ""), "systemd_service",
                           {"name": u, "state": "stopped"}))
    if pids:
        # A pid may have gone with a unit stopped before it.
        tasks.append(_task(f"Kill the {what} outside any unit", "command", f"kill -KILL {' '.join(pids)}",
                           failed_when=False))
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
            label = "that starts the new release" if what == "release" else f"with {'; '.join(bad)}"
            tasks.append(_task(f"Remove the drop-in {label}", "file",
                               {"path": d["path"], "state": "absent"}))
        else:
            for s in bad:
                k, _ = _kv(s)
                tasks.append(_task(f"Remove {s} from its drop-in", "lineinfile",
                                   {"path": d["path"], "regexp": f"^\\s*{k}\\s*=", "state": "absent"}))
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


# Only where the report did not show the drop-ins: no module compares a limit with a threshold.
_DROPIN_SWEEP = r'''
import glob, re, sys
LIMITS = %s
def bad(line):
    k, _, v = line.partition("=")
    m = re.fullmatch(r"([\d.]+)([KMGT%%]?)", v.strip().upper())
    if k.strip() not in LIMITS or not m:
        return False
    scale = {"": 1, "%%": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]
    return float(m.group(1)) * scale < LIMITS[k.strip()]
for path in glob.glob(sys.argv[1] + "/*.conf"):
    lines = open(path).read().splitlines()
    keep = [l for l in lines if not bad(l)]
    if keep != lines:
        open(path, "w").write("\n".join(keep) + "\n")
        print("fixed", path)
''' % json.dumps(PATHOLOGICAL)


# ---- the rules, one per fault kind ----------------------------------------------------------

def _cpu_stress(r: RunbookInput, ev) -> list[dict]:
    # The workers run in the unit's cgroup: a restart stops every process of it.
    return _restart(r, reset=False, why=", stopping the CPU workers in its cgroup")


def _disk_io(r: RunbookInput, ev) -> list[dict]:
    return _restart(r, reset=False, why=", stopping the IO workers in its cgroup") + [
        _task("Find the scratch directories the IO workers left", "find",
              {"paths": r.data_dir, "patterns": "tmp-stress-ng-*", "file_type": "directory"}, register="scratch"),
        _task("Remove them", "file", {"path": "{{ item.path }}", "state": "absent"}, loop="{{ scratch.files }}")]


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
                   "  u=$(grep -m1 -E '^0::|name=systemd:' /proc/$p/cgroup 2>/dev/null | grep -oE '[^/]+\\.(service|scope)$')\n"
                   f"  case \"$u\" in {r.unit}|ssh.service|init.scope|systemd-*) ;;\n"
                   "    '') kill -KILL $p 2>/dev/null && echo $p ;; *) systemctl stop \"$u\" && echo $u ;; esac\n"
                   "done; true", register="hogs", changed_when="hogs.stdout != ''")]


def _netem(r: RunbookInput, ev) -> list[dict]:
    qdiscs = (ev.get("network") or {}).get("qdiscs") or []
    devs = sorted({m.group(1) for q in qdiscs if " netem " in f" {q} " for m in [re.search(r"\bdev (\S+)", q)] if m})
    if devs:
        return [_task(f"Remove the netem qdisc from {d}", "command", f"tc qdisc del dev {d} root") for d in devs]
    return [_shell("Remove the netem qdiscs from the interfaces that have one",
                   "for d in $(ls /sys/class/net); do\n"
                   "  tc qdisc show dev $d | grep -q ' netem ' && tc qdisc del dev $d root && echo $d\n"
                   "done; true", register="qdiscs", changed_when="qdiscs.stdout != ''")]


def _nft_delete(name: str, match: str) -> list[dict]:
    """Delete, by handle, every nftables rule whose JSON form matches the regex `match`
    (the report shows the rules, not the table they are in)."""
    return [_task("List the nftables rules", "command", "nft -j list ruleset", register="nft", changed_when=False),
            _task(name, "command", "nft delete rule {{ item.family }} {{ item.table }} {{ item.chain }} "
                                   "handle {{ item.handle }}",
                  loop="{{ (nft.stdout | from_json).nftables | selectattr('rule', 'defined') "
                       "| map(attribute='rule') | list }}",
                  when=f"item.expr | to_json is search('{match}')")]


def _network_loss(r: RunbookInput, ev) -> list[dict]:
    net = ev.get("network") or {}
    tasks = []
    if any(" netem " in f" {q} " for q in net.get("qdiscs") or []) or not net:
        tasks += _netem(r, ev)
    if any("numgen" in l for l in net.get("nft_ruleset") or []) or not net:
        mine = "|".join([str(r.port), *sorted({str(d["host"]) for d in r.dependencies.values()})])
        tasks += _nft_delete("Delete the rules dropping the service's packets at random", f"({mine}).*numgen")
    return tasks


def _firewall_drop(r: RunbookInput, ev) -> list[dict]:
    deps = [(str(d["host"]), int(d["port"])) for d in r.dependencies.values()]
    rules = " ".join((ev.get("network") or {}).get("nft_ruleset") or [])
    shown = [(h, p) for h, p in deps if re.search(rf"daddr {re.escape(h)} .*dport {p} .*drop", rules)]
    match = "|".join(f"{h}.*{p}" for h, p in shown or deps)
    return _nft_delete("Delete the rules dropping the service's traffic to its dependencies",
                       f"({match}).*drop" if len(shown or deps) > 1 else f"{match}.*drop")


def _pod_fail(r: RunbookInput, ev) -> list[dict]:
    return [_reset_failed(r), _task("Start the service", "systemd_service", {"name": r.unit, "state": "started"})]


def _config_error(r: RunbookInput, ev) -> list[dict]:
    return _fix_dropins(r, ev, _pathological, "limits") + _restart(r, reload=True)


def _bad_release(r: RunbookInput, ev) -> list[dict]:
    def is_release(s: str) -> bool:
        k, v = _kv(s)
        return k == "ExecStart" and bool(v)
    return _fix_dropins(r, ev, is_release, "release") + _restart(r, reload=True)


def _hung_process(r: RunbookInput, ev) -> list[dict]:
    return [_task("Resume the service's stopped processes", "command",
                  f"systemctl kill --signal=SIGCONT {r.unit}")]


def _wrong_dependency(r: RunbookInput, ev) -> list[dict]:
    good = {n: {k: a[k] for k in ("host", "port") if k in a} for n, a in r.dependencies.items()}
    # The entries the config shows differing from the known-good addresses (all, if it is not shown).
    seen = (ev.get("config") or {}).get("dependencies") or {}
    wrong = {n: g for n, g in good.items() if isinstance(seen.get(n), Mapping)
             and any(str(seen[n].get(k)) != str(v) for k, v in g.items())}
    good = wrong or good
    return [_task("Read the service's config", "slurp", {"src": r.config_path}, register="config"),
            _task("Put the known-good dependency addresses back", "copy",
                  {"dest": r.config_path,
                   "content": "{{ config.content | b64decode | from_yaml | combine("
                              + repr({"dependencies": good}) + ", recursive=True) | to_nice_yaml }}"})] \
        + _restart(r, reset=False)


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
    if len(files) == 1:
        return [_task("Delete the stray file", "file", {"path": files[0], "state": "absent"})]
    if files:
        return [_task("Delete the stray files", "file", {"path": "{{ item }}", "state": "absent"}, loop=files)]
    return [_shell(f"Delete the large stray files in {r.data_dir} (not the service's seed/ or work/)",
                   f"find {r.data_dir} -xdev -type f -size +1M -not -path '{own[0]}*' -not -path '{own[1]}*' "
                   "-print -delete", register="strays", changed_when="strays.stdout != ''")]


def _redis_resume_writes(r: RunbookInput) -> list[dict]:
    """A redis whose last save failed refuses writes until one succeeds: save now."""
    if r.kind != "redis":
        return []
    return [_task("Save the data now that it can, so that redis accepts writes again", "command",
                  f"redis-cli -p {r.port} save", register="saved", failed_when="saved.stdout != 'OK'")]


def _readonly_fs(r: RunbookInput, ev) -> list[dict]:
    where = (ev.get("disk") or {}).get("mount_point") or r.data_dir
    # The data dir is a read-only bind mount: make that mount writable again.
    return [_task("Remount the data dir read-write", "command", f"mount -o remount,bind,rw {where}")] \
        + _redis_resume_writes(r)


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
