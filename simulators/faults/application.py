"""Application faults: the service is down (pod-fail), a pathological resource limit
(config-error), both MicroRemed's; a hung process, a wrong dependency address, its port
taken by another process, a tiny file-descriptor limit, and a broken release.

Unit changes are drop-ins in `/etc/systemd/system/<unit>.d/` (what `systemctl edit`
makes), followed by a daemon-reload and a restart so the change bites. Which cgroup limits
bite depends on the guest: a libvirt guest enforces CPUQuota=/MemoryMax=; an nspawn
container on a cgroup-v1 host (this one) accepts them and enforces nothing, so there
config-error uses a limit the kernel enforces per process (LimitAS=, the address space).
"""

from __future__ import annotations

import re
import shlex

from e2e_reme.simulators.errors import FaultError, FaultUnavailable
from e2e_reme.simulators.faults.base import (TAG, enforced_limits, register_fault, seeded_unit_name,
                                             unit_cgroup_pids_script)
from e2e_reme.simulators.faults.network import _DependencyMixin
from e2e_reme.simulators.faults.resource import _Observed

DROPIN_DIR = "/etc/systemd/system/{unit}.d"


def _restart(unit: str) -> str:
    u = shlex.quote(unit)
    return f"systemctl daemon-reload && systemctl reset-failed {u} 2>/dev/null; systemctl restart --no-block {u}"


def _show(fault, sb, *props: str) -> dict:
    res = fault.sh(sb, f"systemctl show {shlex.quote(fault.target.unit)} " + " ".join(f"-p {p}" for p in props),
                   check=False)
    return dict(l.split("=", 1) for l in res.stdout.splitlines() if "=" in l)


def _main_pid(fault, sb) -> int:
    v = _show(fault, sb, "MainPID").get("MainPID", "0")
    return int(v) if v.isdigit() else 0


def _proc_limit(fault, sb, pid: int, label: str) -> int | None:
    """The soft limit `label` ('Max address space', 'Max open files') of a process, in its
    unit (bytes or count); None when unlimited or unknown."""
    if not pid:
        return None
    res = fault.sh(sb, f"grep {shlex.quote('^' + label)} /proc/{pid}/limits", check=False)
    m = re.search(r"\s(\d+|unlimited)\s", res.stdout[len(label):] if res.stdout.startswith(label) else "")
    return int(m.group(1)) if m and m.group(1).isdigit() else None


def _as_int(v: str | None) -> int | None:
    return int(v) if v and v.isdigit() else None


def _usec(v: str | None) -> float | None:
    """systemd's time span ('10ms', '1s', '500us', 'infinity') in microseconds."""
    if not v or v == "infinity":
        return None
    total, units = 0.0, {"us": 1, "ms": 1e3, "s": 1e6, "min": 6e7}
    for num, unit in re.findall(r"([\d.]+)\s*(us|ms|min|s)", v):
        total += float(num) * units[unit]
    return total


class _DropInFault(_Observed):
    """A fault made of a unit drop-in; its name is chosen so that it never replaces one the
    deployment made."""

    def _dropin_path(self, sb, preferred: str) -> str:
        d = DROPIN_DIR.format(unit=self.target.unit)
        res = self.sh(sb, f"ls {shlex.quote(d)} 2>/dev/null", check=False)
        taken = set(res.stdout.split())
        name = preferred if preferred not in taken else f"90-{preferred}"
        return f"{d}/{name}"

    def _write_dropin(self, sb, path: str, settings: list[str]) -> None:
        self.params["_dropin"] = path
        body = "[Service]\n" + "".join(f"{s}\n" for s in settings)
        self.sh(sb, f"mkdir -p {shlex.quote(path.rsplit('/', 1)[0])} && cat > {shlex.quote(path)} && "
                    + _restart(self.target.unit), input=body)

    def footprint(self) -> tuple[str, ...]:
        return (self.params["_dropin"],) if self.params.get("_dropin") else ()

    def _remove_dropin(self, sb) -> None:
        path = self.params.get("_dropin")
        if path:
            self.sh(sb, f"rm -f {shlex.quote(path)}; " + _restart(self.target.unit), check=False)

    def _recover(self, sb) -> None:
        self._remove_dropin(sb)


@register_fault("pod-fail")
class PodFail(_Observed):
    category = "application"
    needs = ()
    summary = "the service is stopped and stays down (MicroRemed: pod failure)"
    defaults = {}
    sections = ("unit", "health", "listen", "journal")

    def _inject(self, sb) -> None:
        self.sh(sb, f"systemctl stop {shlex.quote(self.target.unit)}")

    def is_active(self, sb) -> bool:
        res = self.sh(sb, f"systemctl is-active {shlex.quote(self.target.unit)}", check=False)
        return res.stdout.strip() != "active"

    def _recover(self, sb) -> None:
        u = shlex.quote(self.target.unit)
        self.sh(sb, f"systemctl reset-failed {u} 2>/dev/null; systemctl start --no-block {u}", check=False)


@register_fault("config-error", "pod-config-error")
class ConfigError(_DropInFault):
    category = "application"
    needs = ("cgroup_stress",)
    summary = ("a pathological resource limit in a unit drop-in (CPUQuota=1%, MemoryMax below the working set, "
               "or LimitAS where cgroup limits are not enforced), then a restart (MicroRemed: configuration error)")
    defaults = {"limit": "auto", "cpu_quota_pct": 1, "memory_max_mib": 0, "address_space_mib": 16}
    sections = ("unit", "health", "latency", "processes", "journal")
    LIMITS = ("cpu-quota", "memory-max", "address-space")

    def _check(self, sb) -> None:
        limit = self.params["limit"]
        enforced = enforced_limits(sb, self.target.node)
        usable = [l for l, c in (("cpu-quota", "cpu"), ("memory-max", "memory")) if c in enforced]
        if limit == "auto":
            limit = self.rng.choice(usable) if usable else "address-space"
        if limit not in self.LIMITS:
            raise FaultError(f"config-error: limit '{limit}' is not one of auto, {', '.join(self.LIMITS)}")
        if limit in ("cpu-quota", "memory-max") and limit not in usable:
            raise FaultUnavailable(f"config-error with {limit}: the guest's systemd cannot enforce it here "
                                   "(its cgroup controllers are read-only: a container on a cgroup-v1 host); "
                                   "use limit=address-space")
        self.params["limit"] = limit

    def _inject(self, sb) -> None:
        limit = self.params["limit"]
        if limit == "cpu-quota":
            setting = f"CPUQuota={int(self.params['cpu_quota_pct'])}%"
        elif limit == "memory-max":
            mib = int(self.params["memory_max_mib"])
            if not mib:
                # Half of what the service holds now: it is OOM-killed while starting.
                pid = _main_pid(self, sb)
                res = self.sh(sb, f"awk '/VmRSS/ {{print int($2/1024)}}' /proc/{pid}/status", check=False)
                rss = int(res.stdout.strip() or 0)
                mib = max(4, rss // 2)
                self.params["memory_max_mib"] = mib
            setting = f"MemoryMax={mib}M"
        else:
            setting = f"LimitAS={int(self.params['address_space_mib'])}M"
        self._write_dropin(sb, self._dropin_path(sb, "override.conf"), [setting])

    def is_active(self, sb) -> bool:
        limit = self.params["limit"]
        if limit == "cpu-quota":
            q = _usec(_show(self, sb, "CPUQuotaPerSecUSec").get("CPUQuotaPerSecUSec"))
            return q is not None and q <= int(self.params["cpu_quota_pct"]) * 10_000
        if limit == "memory-max":
            m = _as_int(_show(self, sb, "MemoryMax").get("MemoryMax"))
            return m is not None and m <= int(self.params["memory_max_mib"]) << 20
        bad = int(self.params["address_space_mib"]) << 20
        conf = _as_int(_show(self, sb, "LimitASSoft").get("LimitASSoft"))
        running = _proc_limit(self, sb, _main_pid(self, sb), "Max address space")
        return (conf is not None and conf <= bad) or (running is not None and running <= bad)


@register_fault("fd-exhaustion")
class FdExhaustion(_DropInFault):
    category = "application"
    needs = ()
    summary = "a tiny LimitNOFILE= drop-in: the service starts but cannot accept connections (EMFILE)"
    defaults = {"nofile": 4}
    sections = ("unit", "health", "latency", "processes", "fds", "journal")

    def _inject(self, sb) -> None:
        n = int(self.params["nofile"])
        self._write_dropin(sb, self._dropin_path(sb, "limits.conf"), [f"LimitNOFILE={n}"])

    def is_active(self, sb) -> bool:
        bad = int(self.params["nofile"])
        conf = _as_int(_show(self, sb, "LimitNOFILESoft").get("LimitNOFILESoft"))
        running = _proc_limit(self, sb, _main_pid(self, sb), "Max open files")
        return (conf is not None and conf <= bad) or (running is not None and running <= bad)


@register_fault("hung-process")
class HungProcess(_Observed):
    category = "application"
    needs = ()
    summary = "the service's main process is stopped (SIGSTOP): the port accepts, nothing answers"
    defaults = {}
    sections = ("unit", "health", "processes", "listen", "journal")

    def _inject(self, sb) -> None:
        pid = _main_pid(self, sb)
        if not pid:
            raise FaultError(f"hung-process: {self.target.unit} has no main process (not running)")
        self.params["_pid"] = pid
        self.sh(sb, f"kill -STOP {pid}")

    def _stopped(self, sb) -> list[int]:
        pids = f"$({unit_cgroup_pids_script(self.target.unit)}) {int(self.params.get('_pid') or 0)}"
        res = self.sh(sb, f"for p in {pids}; do s=$(sed 's/.*) //' /proc/$p/stat 2>/dev/null | cut -d' ' -f1); "
                          f"[ \"$s\" = T ] && echo $p; done; true", check=False)
        return sorted({int(p) for p in res.stdout.split() if p.isdigit()})

    def is_active(self, sb) -> bool:
        return bool(self._stopped(sb))

    def _recover(self, sb) -> None:
        for pid in self._stopped(sb):
            self.sh(sb, f"kill -CONT {pid}", check=False)


_WRONG_DEP = r'''
import os, sys, yaml
path, dep, field, value = sys.argv[1:5]
cfg = yaml.safe_load(open(path))
addr = cfg["dependencies"][dep]
print(f"{addr.get('host')} {addr.get('port')}")
addr[field] = int(value) if field == "port" else value
tmp = path + ".tmp"
with open(tmp, "w") as f:
    yaml.safe_dump(cfg, f, sort_keys=False, default_flow_style=False)
os.replace(tmp, path)
'''

_DEP_STATE = r'''
import os, sys, yaml
path, dep, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
addr = (yaml.safe_load(open(path)).get("dependencies") or {}).get(dep) or {}
stale = False
if pid:
    hz = os.sysconf("SC_CLK_TCK")
    btime = next(int(l.split()[1]) for l in open("/proc/stat") if l.startswith("btime"))
    start = btime + int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]) / hz
    stale = os.stat(path).st_mtime > start + 1
print(f"{addr.get('host')} {addr.get('port')} {'stale' if stale else 'fresh'}")
'''


@register_fault("wrong-dependency")
class WrongDependency(_DependencyMixin, _Observed):
    category = "application"
    needs = ()
    summary = "a wrong address for a dependency in the service's config (wrong port or unreachable host), restarted"
    defaults = {"dependency": "", "mode": "auto"}
    kinds = ("http",)
    sections = ("unit", "health", "latency", "metrics", "config", "network", "journal")

    def _check(self, sb) -> None:
        super()._check(sb)
        mode = self.params["mode"]
        if mode == "auto":
            mode = self.rng.choice(["port", "host"])
        if mode not in ("port", "host"):
            raise FaultError(f"wrong-dependency: mode '{mode}' is not port, host or auto")
        self.params["mode"] = mode

    def _inject(self, sb) -> None:
        t, dep = self.target, self.params["dependency"]
        self.params["_original"] = self.sh(sb, f"cat {shlex.quote(t.config_path)}").stdout
        if self.params["mode"] == "port":
            field, value = "port", str(self.rng.randint(20000, 29999))
        else:
            import ipaddress
            net = ipaddress.ip_network(f"{t.host}/24", strict=False)
            field, value = "host", str(net.network_address + 251)
        res = self.sh(sb, f"python3 - {shlex.quote(t.config_path)} {shlex.quote(dep)} {field} {shlex.quote(value)} "
                          f"<<'EOF'\n{_WRONG_DEP}\nEOF\n" + _restart(t.unit))
        host, port = res.stdout.split()[:2]
        self.params["_good"] = {"host": host, "port": int(port)}
        self.params["_wrong"] = {field: value}

    def is_active(self, sb) -> bool:
        pid = _main_pid(self, sb)
        res = self.sh(sb, f"python3 - {shlex.quote(self.target.config_path)} "
                          f"{shlex.quote(self.params['dependency'])} {pid} <<'EOF'\n{_DEP_STATE}\nEOF", check=False)
        parts = res.stdout.split()
        if len(parts) != 3:
            return True   # unreadable config: not fixed
        good = self.params["_good"]
        return (parts[0], parts[1]) != (str(good["host"]), str(good["port"])) or parts[2] == "stale"

    def _recover(self, sb) -> None:
        if "_original" in self.params:
            t = self.target
            self.sh(sb, f"cat > {shlex.quote(t.config_path)}.tmp && mv {shlex.quote(t.config_path)}.tmp "
                        f"{shlex.quote(t.config_path)} && " + _restart(t.unit), input=self.params["_original"],
                    check=False)


@register_fault("port-taken")
class PortTaken(_Observed):
    category = "application"
    needs = ()
    summary = "another process holds the service's port; the service's restart fails (address in use)"
    defaults = {}
    sections = ("unit", "health", "listen", "journal")
    spawns = True

    def residue(self, sb) -> dict:
        return self.process_residue(sb)

    def _inject(self, sb) -> None:
        t = self.target
        u = shlex.quote(t.unit)
        squatter = seeded_unit_name(self)        # the scenario's, not systemd-run's random one
        self.sh(sb, f"systemctl stop {u}; systemctl reset-failed {squatter} 2>/dev/null; "
                    f"systemd-run --quiet --collect --unit={squatter} -E {TAG}={self.id} "
                    f"python3 -m http.server {t.port} --bind 0.0.0.0 --directory /var/tmp; "
                    f"for i in $(seq 50); do ss -Hltn 'sport = :{t.port}' | grep -q . && break; sleep 0.1; done; "
                    f"ss -Hltn 'sport = :{t.port}' | grep -q . || {{ echo 'the squatter did not listen' >&2; exit 4; }}; "
                    f"systemctl start --no-block {u}")

    def is_active(self, sb) -> bool:
        t = self.target
        res = self.sh(sb, f"for p in $(ss -Hltnp 'sport = :{t.port}' | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do "
                          f"grep -q {shlex.quote('/' + t.unit)} /proc/$p/cgroup || echo $p; done; true", check=False)
        return bool(res.stdout.split())

    def _recover(self, sb) -> None:
        self.kill_tagged(sb)
        u = shlex.quote(self.target.unit)
        self.sh(sb, f"systemctl reset-failed {u} 2>/dev/null; systemctl restart --no-block {u}", check=False)


_BREAK = r'''
import sys
src, dst, variant, version = sys.argv[1:5]
code = open(src).read()
lines = code.splitlines(keepends=True)
done = False
if variant == "errors":
    for i, l in enumerate(lines):
        if l.lstrip().startswith("def handle(self"):
            indent = l[:len(l) - len(l.lstrip())] + "    "
            lines.insert(i + 1, f'{indent}raise RuntimeError("request schema v3 expected (release {version})")\n')
            done = True
            break
if not done:
    variant = "crash"
    at = next((i + 1 for i, l in enumerate(lines) if l.startswith("from __future__")), 0)
    lines.insert(at, f"import remed_featureflags  # release {version}\n")
open(dst, "w").write("".join(lines))
print(variant)
'''


@register_fault("bad-release")
class BadRelease(_DropInFault):
    category = "application"
    needs = ()
    summary = ("a broken new release of the service's code deployed beside the previous one, the unit pointed at it "
               "by a drop-in; it crashes at start or fails every request")
    defaults = {"variant": "auto", "version": "2.4.0"}
    kinds = ("http",)
    sections = ("unit", "health", "latency", "metrics", "journal")

    @property
    def _release_dir(self) -> str:
        return f"/opt/remed/releases/{self.target.service}"

    def footprint(self) -> tuple[str, ...]:
        return super().footprint() + (self._release_dir + "/", "/opt/remed/releases/")

    def _check(self, sb) -> None:
        v = self.params["variant"]
        if v == "auto":
            v = self.rng.choice(["crash", "errors"])
        if v not in ("crash", "errors"):
            raise FaultError(f"bad-release: variant '{v}' is not crash, errors or auto")
        self.params["variant"] = v

    def _inject(self, sb) -> None:
        exec_start = _show(self, sb, "ExecStart").get("ExecStart", "")
        m = re.search(r"argv\[\]=([^;]*)", exec_start)
        argv = m.group(1).split() if m else []
        code = next((a for a in argv if a.endswith(".py")), None)
        if not code:
            raise FaultUnavailable(f"bad-release: {self.target.unit} runs no python code file "
                                   f"(ExecStart: {exec_start[:200]})")
        version = self.params["version"]
        new_dir = f"{self._release_dir}/{version}"
        new_code = f"{new_dir}/{code.rsplit('/', 1)[1]}"
        res = self.sh(sb, f"mkdir -p {shlex.quote(new_dir)} && python3 - {shlex.quote(code)} {shlex.quote(new_code)} "
                          f"{self.params['variant']} {shlex.quote(version)} <<'EOF'\n{_BREAK}\nEOF")
        self.params["variant"] = res.stdout.strip() or self.params["variant"]
        new_argv = [new_code if a == code else a for a in argv]
        self._write_dropin(sb, self._dropin_path(sb, "release.conf"),
                           ["ExecStart=", "ExecStart=" + " ".join(new_argv)])

    def is_active(self, sb) -> bool:
        marker = f"/releases/{self.target.service}/"
        if marker in _show(self, sb, "ExecStart").get("ExecStart", ""):
            return True
        pid = _main_pid(self, sb)
        if pid:
            res = self.sh(sb, f"tr '\\0' ' ' < /proc/{pid}/cmdline", check=False)
            return marker in res.stdout
        return False

    def _recover(self, sb) -> None:
        self._remove_dropin(sb)
        self.sh(sb, f"rm -rf {shlex.quote(self._release_dir)}; rmdir /opt/remed/releases 2>/dev/null; true",
                check=False)
