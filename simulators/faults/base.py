"""The fault base class, the catalog, availability, and the per-sandbox record of injections.

A fault type is a small class registered by name:

    @register_fault("cpu-stress")
    class CpuStress(Fault):
        category = "resource"
        needs = ("cgroup_stress",)          # doctor mechanisms; "netem|nftables" = either
        defaults = {"workers": 0}

        def _inject(self, sb): ...         # make it so, in the sandbox, persistently
        def is_active(self, sb): ...        # ground truth, read from the sandbox
        def describe(self, sb): ...         # what monitoring would observe (no implementation)
        def _recover(self, sb): ...         # the harness's own undo

The public `inject()` / `recover()` wrap the hooks: availability first, then the record in
`<sandbox state dir>/faults.json`, so that another process (the CLI, the verifier) can list
the faults of a sandbox and rebuild them with `injected_faults(sb)` to re-check
`is_active` from the sandbox itself.

Processes a fault starts carry `RUN_TRACE_ID=<id>` in their environment: that is how its
ground truth finds them again (whoever renames or moves them), it is not something a
monitoring system shows, and its name says nothing about faults to a policy that looks.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import secrets
import shlex
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

from e2e_reme.simulators.errors import FaultError, FaultUnavailable, UnknownFault
from e2e_reme.simulators.systems.target import ServiceTarget

CATEGORIES = ("resource", "network", "application")
COMPOUND_PREFIX = "compound:"
TAG = "RUN_TRACE_ID"

_CATALOG: dict[str, type["Fault"]] = {}
_ALIASES: dict[str, str] = {}


def register_fault(name: str, *aliases: str) -> Callable[[type["Fault"]], type["Fault"]]:
    """Register a fault class under `name` (and old names, e.g. MicroRemed's spelling)."""
    def deco(cls: type[Fault]) -> type[Fault]:
        if cls.category not in CATEGORIES:
            raise ValueError(f"fault {name}: category {cls.category!r} is not one of {CATEGORIES}")
        cls.name = name
        cls.aliases = tuple(aliases)
        _CATALOG[name] = cls
        for a in aliases:
            _ALIASES[a] = name
        return cls
    return deco


def fault_catalog() -> dict[str, type["Fault"]]:
    """Every registered fault type by name (the built-in ones are imported first)."""
    import importlib
    for mod in ("resource", "network", "application"):
        importlib.import_module(f"{__package__}.{mod}")
    return dict(sorted(_CATALOG.items()))


def canonical_name(name: str) -> str:
    fault_catalog()
    return _ALIASES.get(name, name)


def get_fault(name: str) -> type["Fault"]:
    """The class of a fault by name: a catalog name, an alias, or `compound:a+b`."""
    catalog = fault_catalog()
    if name.startswith(COMPOUND_PREFIX):
        from e2e_reme.simulators.faults.compound import compound_class
        return compound_class(name)
    cls = catalog.get(_ALIASES.get(name, name))
    if cls is None:
        aliases = ", ".join(f"{a} (= {c})" for a, c in sorted(_ALIASES.items()))
        raise UnknownFault(f"unknown fault '{name}'; the catalog: {', '.join(catalog)}"
                           + (f"; aliases: {aliases}" if aliases else "")
                           + f"; or {COMPOUND_PREFIX}<a>+<b> for two at once")
    return cls


# ---- availability -----------------------------------------------------------------------

_REPORT = None


def host_report():
    """The doctor's report of this host, probed once per process (it only changes when the
    host does)."""
    global _REPORT
    if _REPORT is None:
        from e2e_reme.simulators.sandbox.doctor import probe_host
        _REPORT = probe_host()
    return _REPORT


def needs_met(needs: tuple[str, ...], backend: str, report=None) -> tuple[bool, str]:
    """Whether every requirement holds on `backend`; a requirement "a|b" holds if either
    mechanism is usable. The reason names the first one that fails, with the doctor's why."""
    report = report if report is not None else host_report()
    used = []
    for req in needs:
        alts = req.split("|")
        verdicts = []
        for mech in alts:
            per = report.mechanisms.get(mech)
            if per is None:
                verdicts.append((mech, False, f"the doctor knows no mechanism '{mech}'"))
                continue
            u = per.get(backend)
            if u is None:
                verdicts.append((mech, False, f"unknown backend '{backend}'"))
            else:
                verdicts.append((mech, u.usable, u.why))
        ok = [m for m, usable, _ in verdicts if usable]
        if not ok:
            why = "; ".join(f"{m}: {w}" for m, _, w in verdicts)
            return False, f"needs {' or '.join(alts)} on {backend}, which is not usable: {why}"
        used.append(ok[0])
    return True, ("uses " + ", ".join(used) if used else "needs no special mechanism")


def fault_available(name: str, backend: str, report=None) -> tuple[bool, str]:
    """(available, why) for a fault type on a backend of this host, from its `needs` and the
    doctor's report. Target-specific limits (a service with no dependencies, a redis where
    the fault needs our runtime) are checked at injection."""
    return get_fault(name).available(backend, report)


# ---- the record of injected faults, per sandbox ------------------------------------------

def _record_path(sb) -> Path:
    """Where a sandbox's fault records live; `sb` is a Sandbox or its registry record
    (`SandboxRecord`, as `list_sandboxes()` gives: reading needs no handle on the sandbox)."""
    return Path(getattr(sb, "record", sb).dir) / "faults.json"


@contextmanager
def _records_locked(sb) -> Iterator[list[dict]]:
    path = _record_path(sb)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            records = json.loads(path.read_text()) if path.exists() else []
        except ValueError:
            records = []
        yield records
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(records, indent=2))
        tmp.replace(path)


def fault_records(sb) -> list[dict]:
    """Every fault injected into this sandbox since its last reset (name, service, params,
    seed, injected_at, recovered_at, ...), oldest first."""
    path = _record_path(sb)
    try:
        return json.loads(path.read_text()) if path.exists() else []
    except ValueError:
        return []


def injected_faults(sb, include_recovered: bool = False) -> list["Fault"]:
    """The faults of this sandbox, rebuilt from the record: call `is_active(sb)` on them
    (it reads the sandbox), `describe(sb)` or `recover(sb)`."""
    out = []
    for rec in fault_records(sb):
        if rec.get("recovered_at") and not include_recovered:
            continue
        out.append(Fault.from_record(rec))
    return out


def forget_faults(sb) -> None:
    """Drop the record (after `sb.reset()`, which discards every fault with the node)."""
    with _records_locked(sb) as records:
        records.clear()


# ---- the base class ---------------------------------------------------------------------

class Fault:
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    category: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    kinds: ClassVar[tuple[str, ...]] = ("http", "redis")     # service kinds it applies to
    summary: ClassVar[str] = ""

    def __init__(self, target: ServiceTarget, targets: Mapping[str, ServiceTarget] | None = None,
                 params: Mapping[str, Any] | None = None, seed: int = 0, fault_id: str | None = None):
        self.target = target
        self.targets = dict(targets or {})
        self.targets.setdefault(target.service, target)
        self.seed = int(seed)
        self.params = self._coerce(dict(params or {}))
        self.id = fault_id or secrets.token_hex(4)
        self.injected_at: float | None = None
        self.rng = random.Random(f"{self.seed}:{self.name}:{target.service}")
        self._report = None

    # ---- hooks for the subclasses -------------------------------------------------------
    def _check(self, sb) -> None:
        """Raise FaultUnavailable if this target or sandbox cannot take the fault."""

    def _inject(self, sb) -> None:
        raise NotImplementedError

    def _recover(self, sb) -> None:
        raise NotImplementedError

    def is_active(self, sb) -> bool:
        raise NotImplementedError

    def describe(self, sb) -> dict:
        raise NotImplementedError

    # What a fault leaves that the verifier must not count as a change by the remediation
    # (its drop-in, its tool, its release dir): node paths, a trailing '/' for a tree.
    def footprint(self) -> tuple[str, ...]:
        return ()

    def residue(self, sb) -> dict:
        """Evidence, read from outside the node where the backend allows, that the fault is
        still there in a form `is_active` (which asks the node) may miss: processes it started
        that are stopped, renamed or stripped of their tag, a stray file moved aside, a mask
        over the symptom. Empty: nothing left. See docs/verdict.md for each fault type."""
        return {}

    # ---- public API ---------------------------------------------------------------------
    @classmethod
    def available(cls, backend: str, report=None) -> tuple[bool, str]:
        return needs_met(cls.needs, backend, report)

    @classmethod
    def applies_to(cls, target: ServiceTarget, targets: Mapping[str, ServiceTarget] | None = None
                   ) -> tuple[bool, str]:
        """Whether this fault type makes sense for this service at all (its kind; a fault
        acting on a dependency needs one), before any sandbox is asked."""
        if target.kind not in cls.kinds:
            return False, (f"{cls.name} applies to {' or '.join(cls.kinds)} services; "
                           f"{target.service} is {target.kind}")
        return True, ""

    def check(self, sb, report=None) -> None:
        """Raise FaultUnavailable with the reason if the fault cannot be injected here."""
        self._report = report
        ok, why = self.available(sb.backend, report)
        if not ok:
            raise FaultUnavailable(f"{self.name} is not available on {sb.backend} here: {why}")
        ok, why = self.applies_to(self.target, self.targets)
        if not ok:
            raise FaultUnavailable(why)
        self._check(sb)

    def inject(self, sb, report=None) -> "Fault":
        """Inject the fault into the sandbox and record it. It stays until something fixes it.
        On failure, whatever was half done is undone and FaultError says where it failed."""
        self.check(sb, report)
        self.injected_at = time.time()
        try:
            self._inject(sb)
            self._record_identity(sb)
        except BaseException:
            try:
                self._recover(sb)
            except Exception:
                pass
            raise
        with _records_locked(sb) as records:
            records.append(self.to_record())
        return self

    def recover(self, sb) -> None:
        """The harness's ground-truth undo (cleanup; never shown to a policy). Idempotent."""
        self._recover(sb)
        with _records_locked(sb) as records:
            for rec in records:
                if rec["id"] == self.id and not rec.get("recovered_at"):
                    rec["recovered_at"] = time.time()

    @property
    def node(self) -> int:
        return self.target.node

    def node_name(self, sb) -> str:
        return sb.nodes[self.target.node].name

    def public_params(self) -> dict:
        """The parameters, without the private ones kept for recovery (leading '_')."""
        return {k: v for k, v in self.params.items() if not k.startswith("_")}

    def to_record(self) -> dict:
        deps = {n: asdict(t) for n, t in self.targets.items()}
        return {"id": self.id, "name": self.name, "service": self.target.service,
                "system": self.target.system, "node": self.target.node, "category": self.category,
                "params": self.params, "seed": self.seed, "injected_at": self.injected_at,
                "recovered_at": None, "target": asdict(self.target), "targets": deps}

    @staticmethod
    def from_record(rec: dict) -> "Fault":
        def tgt(d: dict) -> ServiceTarget:
            d = dict(d)
            d["dependencies"] = tuple(d.get("dependencies") or ())
            d["dependents"] = tuple(d.get("dependents") or ())
            return ServiceTarget(**d)
        cls = get_fault(rec["name"])
        f = cls(tgt(rec["target"]), {n: tgt(t) for n, t in (rec.get("targets") or {}).items()},
                rec.get("params") or {}, rec.get("seed", 0), fault_id=rec["id"])
        f.injected_at = rec.get("injected_at")
        return f

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.target.service} id={self.id}>"

    # ---- helpers --------------------------------------------------------------------------
    def _coerce(self, given: dict) -> dict:
        out = dict(self.defaults)
        for k, v in given.items():
            if k.startswith("_"):
                out[k] = v
                continue
            if k not in self.defaults:
                known = ", ".join(sorted(self.defaults)) or "none"
                raise FaultError(f"{self.name}: unknown parameter '{k}' (known: {known})")
            out[k] = _coerce_like(self.defaults[k], v, f"{self.name}: parameter '{k}'")
        return out

    def sh(self, sb, script: str, *, node: int | None = None, timeout: float = 60,
           check: bool = True, input: str | None = None):
        """Run a shell script on the target's node (root). With `check`, a non-zero exit is
        a FaultError naming the fault, the node and the script's stderr."""
        node = self.target.node if node is None else node
        res = sb.exec(script, node=node, timeout=timeout, input=input)
        if check and not res.ok:
            tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-3:]
            what = "timed out" if res.timed_out else f"exited {res.rc}"
            raise FaultError(f"{self.name} on {self.target.service} (node {sb.nodes[node].name}): "
                             f"a guest command {what}: {' | '.join(tail) or 'no output'}")
        return res

    def tagged_pids(self, sb) -> list[int]:
        """Live (not zombie) processes on the node that carry this fault's tag."""
        res = self.sh(sb, tagged_pids_script(self.id), check=False, timeout=30)
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    def kill_tagged(self, sb) -> None:
        self.sh(sb, kill_tagged_script(self.id), check=False, timeout=30)
        for p in self._recorded_alive(sb):   # what lost its tag dies too
            try:
                os.kill(p.pid, 9)
                os.kill(p.pid, 18)
            except OSError:
                pass

    # ---- identity: the processes a fault started, recorded from outside ----------------
    spawns: ClassVar[bool] = False     # starts processes of its own (tagged)

    def _record_identity(self, sb) -> None:
        """Record the fault's processes by what they are (host pid, start time, executable,
        cgroup), read from the host: later renames, stops or an erased tag do not change it.
        Waits until the tree stops growing (stress-ng forks its workers after it starts)."""
        from e2e_reme.simulators.sandbox import hostview
        if not self.spawns or not hostview.supported(sb):
            return
        seen: dict = {}
        deadline = time.monotonic() + 5
        stable = 0
        while time.monotonic() < deadline and stable < 2:
            procs = hostview.processes(sb, self.node)
            found = hostview.tagged(procs, f"{TAG}={self.id}")
            found += hostview.descendants(procs, {p.pid for p in found})
            new = {(p.pid, p.start): p for p in found if (p.pid, p.start) not in seen}
            seen.update(new)
            stable = stable + 1 if seen and not new else 0
            time.sleep(0.3)
        self.params["_procs"] = [{"pid": p.pid, "start": p.start, "exe": p.exe, "cgroup": p.cgroup,
                                  "ns_pid": p.ns_pid} for p in seen.values()]

    def _recorded_alive(self, sb) -> list:
        from e2e_reme.simulators.sandbox import hostview
        if not self.params.get("_procs") or not hostview.supported(sb):
            return []
        alive = hostview.still_alive(self.params["_procs"])
        procs = hostview.processes(sb, self.node)
        # Children they fork later (a respawned worker) belong to the fault as well.
        kids = hostview.descendants(procs, {p.pid for p in alive})
        return alive + [k for k in kids if k.pid not in {p.pid for p in alive}]

    def process_residue(self, sb) -> dict:
        """The fault's recorded processes that still exist (stopped, renamed or untagged
        count: gone means gone), and any live process still carrying its tag."""
        from e2e_reme.simulators.sandbox import hostview
        if not hostview.supported(sb):
            return {}
        left = self._recorded_alive(sb)
        procs = hostview.processes(sb, self.node)
        left += [p for p in hostview.tagged(procs, f"{TAG}={self.id}") if p.pid not in {q.pid for q in left}]
        if not left:
            return {}
        return {"processes": [{"pid": p.pid, "ns_pid": p.ns_pid, "state": p.state, "exe": p.exe,
                               "cgroup": p.cgroup} for p in left[:20]], "count": len(left)}


def _coerce_like(default: Any, value: Any, what: str) -> Any:
    """CLI parameters arrive as strings; give them the type of the default."""
    if default is None or not isinstance(value, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise FaultError(f"{what}: '{value}' is not a {type(default).__name__}") from None
    return value


# ---- guest shell snippets shared by the fault types ---------------------------------------

def tagged_pids_script(fault_id: str) -> str:
    # The stat state is the first field after the last ')' (comm may hold spaces and parens).
    return (f"for e in /proc/[0-9]*/environ; do "
            f"if grep -qaxz {shlex.quote(f'{TAG}={fault_id}')} \"$e\" 2>/dev/null; then "
            f"p=${{e#/proc/}}; p=${{p%/environ}}; "
            f"s=$(sed 's/.*) //' /proc/$p/stat 2>/dev/null | cut -d' ' -f1); "
            f"[ -n \"$s\" ] && [ \"$s\" != Z ] && [ \"$s\" != X ] && echo $p; fi; done; true")


def kill_tagged_script(fault_id: str) -> str:
    # A stopped process only dies of SIGKILL once continued, hence CONT after KILL.
    return (f"for i in 1 2 3 4 5; do ps=$({tagged_pids_script(fault_id)}); "
            f"[ -z \"$ps\" ] && exit 0; kill -KILL $ps 2>/dev/null; kill -CONT $ps 2>/dev/null; "
            f"sleep 0.2; done; true")


def cgroup_join_snippet(unit: str) -> str:
    """Shell that moves the current shell ($$) into the unit's cgroup in every hierarchy the
    guest has (v2; or v1 hybrid's name=systemd + unified + any controller that has it), so
    what it execs next counts against the unit (its CPUQuota, its memory) and dies with it.
    Fails if the unit has no cgroup (not running)."""
    u = shlex.quote(unit)
    return (f"cg=$(systemctl show -p ControlGroup --value {u}); "
            f"[ -n \"$cg\" ] || {{ echo '{unit} has no cgroup (not running)' >&2; exit 3; }}; "
            f"moved=0; for d in /sys/fs/cgroup /sys/fs/cgroup/*; do "
            f"if [ -f \"$d$cg/cgroup.procs\" ] && echo $$ > \"$d$cg/cgroup.procs\" 2>/dev/null; "
            f"then moved=1; fi; done; [ $moved = 1 ] || {{ echo 'cannot join the cgroup of {unit}' >&2; exit 3; }}")


def start_detached(fault_id: str, command: str, *, in_unit: str | None = None,
                   env: Mapping[str, str] | None = None) -> str:
    """Shell that starts `command` in a new session, surviving the SSH session, tagged with
    the fault id; inside `in_unit`'s cgroup when given. Prints nothing; fails only if the
    cgroup cannot be joined."""
    envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in {TAG: fault_id, **(env or {})}.items())
    inner = (cgroup_join_snippet(in_unit) + "; " if in_unit else "") + f"exec {command}"
    # The first line of the inner shell must run before it forks anything: it moves itself.
    return (f"setsid -f env {envs} sh -c {shlex.quote(inner)} </dev/null >/dev/null 2>&1; "
            f"sleep 0.3; p=$({tagged_pids_script(fault_id)}); "
            f"[ -n \"$p\" ] || {{ echo 'the process did not start (or died at once)' >&2; exit 4; }}")


def _scenario_rng(fault: "Fault", what: str) -> random.Random:
    """A generator of the fault's scenario (seed, fault, service) for one purpose, apart
    from `fault.rng` so that drawing a name never shifts the fault's other choices."""
    return random.Random(f"{fault.seed}:{fault.name}:{fault.target.service}:{what}")


def seeded_unit_name(fault: "Fault") -> str:
    """A transient unit's name in systemd-run's own shape (`run-r<32 hex>.service`), derived
    from the scenario instead of chance: every injection of one scenario, in any sandbox,
    shows the same unit in its report (what an answer copies to stop it)."""
    return f"run-r{_scenario_rng(fault, 'unit').getrandbits(128):032x}.service"


def seeded_date(fault: "Fault") -> str:
    """A date (YYYYMMDD, within 2025) for names that look dated, derived from the scenario
    instead of the clock: the same name today, tomorrow and on every re-injection."""
    import datetime
    day = datetime.date(2025, 1, 1) + datetime.timedelta(days=_scenario_rng(fault, "date").randrange(365))
    return day.strftime("%Y%m%d")


def unit_cgroup_pids_script(unit: str) -> str:
    u = shlex.quote(unit)
    return (f"cg=$(systemctl show -p ControlGroup --value {u}); [ -n \"$cg\" ] || exit 0; "
            f"for d in /sys/fs/cgroup/systemd /sys/fs/cgroup /sys/fs/cgroup/unified; do "
            f"if [ -f \"$d$cg/cgroup.procs\" ]; then grep -vx 0 \"$d$cg/cgroup.procs\"; exit 0; fi; done")


def limits_enforced_script() -> str:
    """Prints the cgroup controllers a guest's systemd can really apply limits with
    (cpu, memory). In a container on a cgroup-v1 host they are read-only: systemd accepts
    CPUQuota=/MemoryMax= and enforces nothing."""
    return ("if [ \"$(stat -fc %T /sys/fs/cgroup)\" = cgroup2fs ]; then "
            "for c in cpu memory; do grep -qw $c /sys/fs/cgroup/cgroup.controllers && "
            "[ -w /sys/fs/cgroup/cgroup.subtree_control ] && echo $c; done; "
            "else for c in cpu memory; do [ -w /sys/fs/cgroup/$c ] && echo $c; done; fi; true")


def enforced_limits(sb, node: int) -> set[str]:
    res = sb.exec(limits_enforced_script(), node=node, timeout=20)
    return set(res.stdout.split())
