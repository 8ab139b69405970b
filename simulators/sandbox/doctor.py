"""What this host can do: each capability probed for real, with a verdict, and derived
from those verdicts which sandbox backends and which fault mechanisms are usable here.

    report = probe_host()
    report.check("netem").status                      # 'ok' | 'missing' | 'unusable' | 'unknown'
    report.backends["nspawn"].usable
    report.usable("netem", "nspawn")                  # what the fault catalog asks

Probes never raise: one that fails becomes an 'unknown' check carrying the error, so the
doctor always answers. Importing this module probes nothing; `probe_host()` is cheap (the
scratch-namespace probes take milliseconds, the KVM probe is cached by its own module).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple, get_args

from e2e_reme import paths

Status = Literal["ok", "missing", "unusable", "unknown"]
STATUSES: tuple[str, ...] = get_args(Status)

GiB = 1024 ** 3
DISK_OK_BYTES = 10 * GiB
MEMORY_OK_BYTES = 4 * GiB

BACKENDS = ("nspawn", "libvirt")
MECHANISMS = {
    "netem": "network delay/loss via tc netem",
    "nftables": "packet loss/drop via nftables numgen",
    "cgroup_stress": "cgroup limits (CPUQuota/MemoryMax via systemd) and stress",
}

# Check names, in the order the table shows them. They are stable identifiers: the fault
# catalog and the tests look checks up by them.
ROOT, NSPAWN, OVERLAY = "root", "systemd-nspawn", "overlayfs"
LIBVIRTD, QEMU, DEV_KVM, KVM = "libvirtd", "qemu", "/dev/kvm", "kvm"
NETEM, NFTABLES, CGROUP = "netem", "nftables", "cgroup"
DISK_CACHE, DISK_STATE, MEMORY, IMAGE = "disk:cache", "disk:state", "memory", "guest-image"
CONTAINMENT, SANDBOX_TREE, RAY_TOKEN = "containment", "sandbox-tree", "ray-token"
CHECK_NAMES = (ROOT, NSPAWN, OVERLAY, LIBVIRTD, QEMU, DEV_KVM, KVM, NETEM, NFTABLES, CGROUP,
               DISK_CACHE, DISK_STATE, MEMORY, IMAGE, CONTAINMENT, SANDBOX_TREE, RAY_TOKEN)

PROBE_NETNS_PREFIX = "remed-probe-"
_CMD_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name!r}: status {self.status!r} is not one of {STATUSES}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Usable(NamedTuple):
    usable: bool
    why: str


@dataclass(frozen=True)
class HostReport:
    checks: tuple[Check, ...]
    backends: dict[str, Usable]
    mechanisms: dict[str, dict[str, Usable]]

    @classmethod
    def from_checks(cls, checks: tuple[Check, ...] | list[Check]) -> "HostReport":
        """Derive the backend and mechanism verdicts from the checks alone."""
        checks = tuple(checks)
        backends = _backends({c.name: c for c in checks})
        return cls(checks, backends, _mechanisms({c.name: c for c in checks}, backends))

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; known: {', '.join(c.name for c in self.checks)}")

    def usable(self, mechanism: str, backend: str) -> bool:
        return self.mechanisms[mechanism][backend].usable

    def to_dict(self) -> dict:
        return {
            "checks": [{"name": c.name, "status": c.status, "detail": c.detail, "fix": c.fix}
                       for c in self.checks],
            "backends": {b: u._asdict() for b, u in self.backends.items()},
            "mechanisms": {m: {b: u._asdict() for b, u in per.items()}
                           for m, per in self.mechanisms.items()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def probe_host() -> HostReport:
    """Probe every capability of this host and derive what is usable."""
    # Probes are looked up by name on each call, so a test can replace one to inject a failure.
    return HostReport.from_checks([
        _guarded(ROOT, probe_root),
        _guarded(NSPAWN, probe_nspawn),
        _guarded(OVERLAY, probe_overlay),
        _guarded(LIBVIRTD, probe_libvirtd),
        _guarded(QEMU, probe_qemu),
        _guarded(DEV_KVM, probe_dev_kvm),
        _guarded(KVM, probe_kvm),
        _guarded(NETEM, probe_netem),
        _guarded(NFTABLES, probe_nftables),
        _guarded(CGROUP, probe_cgroup),
        _guarded(DISK_CACHE, probe_disk, DISK_CACHE, paths.cache_dir),
        _guarded(DISK_STATE, probe_disk, DISK_STATE, paths.state_dir),
        _guarded(MEMORY, probe_memory),
        _guarded(IMAGE, probe_image),
        _guarded(CONTAINMENT, probe_containment),
        _guarded(SANDBOX_TREE, probe_sandbox_tree),
        _guarded(RAY_TOKEN, probe_ray_token),
    ])


def _guarded(name: str, probe: Callable[..., Check], *args) -> Check:
    try:
        return probe(*args)
    except Exception as e:  # the doctor must answer even when a probe is broken
        return Check(name, "unknown", f"probe failed: {type(e).__name__}: {_first_line(str(e))}",
                     "report this; the other checks are unaffected")


# ---- probes: each returns one Check ----------------------------------------------------

def probe_root() -> Check:
    euid = os.geteuid()
    if euid == 0:
        return Check(ROOT, "ok", "running as root")
    return Check(ROOT, "missing", f"running as uid {euid}; sandboxes need namespaces, "
                 "bridges and mounts", "run as root (sudo remed ...)")


def probe_nspawn() -> Check:
    exe = shutil.which("systemd-nspawn")
    if exe is None:
        return Check(NSPAWN, "missing", "systemd-nspawn is not installed",
                     "apt-get install systemd-container (or `make setup`)")
    return Check(NSPAWN, "ok", exe)


def probe_overlay() -> Check:
    if re.search(r"\boverlay$", Path("/proc/filesystems").read_text(), re.M):
        return Check(OVERLAY, "ok", "overlay listed in /proc/filesystems")
    return Check(OVERLAY, "missing", "the kernel has no overlay filesystem; the nspawn backend "
                 "needs it for per-node copy-on-write", "modprobe overlay")


def probe_libvirtd() -> Check:
    fix = "libvirtd -d; virtlogd -d  (or `make setup`)"
    try:
        import libvirt
    except ImportError as e:
        return Check(LIBVIRTD, "missing", f"libvirt-python is not importable: {e}",
                     "pip install libvirt-python (needs libvirt-dev)")
    # The default handler prints every libvirt error to stderr; the table reports it instead.
    libvirt.registerErrorHandler(lambda *_: None, None)
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError as e:
        status = "missing" if shutil.which("libvirtd") is None else "unusable"
        return Check(LIBVIRTD, status, f"qemu:///system: {_first_line(str(e))}", fix)
    try:
        detail = (f"qemu:///system reachable: libvirt {_libvirt_version(conn.getLibVersion())}, "
                  f"{conn.getType()} {_libvirt_version(conn.getVersion())}")
    finally:
        conn.close()
    return Check(LIBVIRTD, "ok", detail)


def probe_qemu() -> Check:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        return Check(QEMU, "missing", "qemu-system-x86_64 is not installed",
                     "apt-get install qemu-system-x86 (or `make setup`)")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    return Check(QEMU, "ok", _first_line(r.stdout) or exe)


def probe_dev_kvm() -> Check:
    if not os.path.exists("/dev/kvm"):
        return Check(DEV_KVM, "missing", "no /dev/kvm; libvirt guests run under TCG",
                     "enable virtualization (VT-x/AMD-V) and load kvm_intel or kvm_amd")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Check(DEV_KVM, "unusable", "/dev/kvm exists but this user cannot open it",
                     "run as root or join the kvm group")
    return Check(DEV_KVM, "ok", "/dev/kvm present (whether a guest really runs: see kvm)")


def probe_kvm() -> Check:
    # A /dev/kvm that opens is not enough: on some hosts every KVM guest kernel hangs at
    # start, so only booting a guest tells. That is kvm.py's job; we ask it.
    try:
        from e2e_reme.simulators.sandbox.kvm import kvm_probe
    except ImportError as e:
        return Check(KVM, "unknown", f"KVM probe not available ({e}); treated as not working",
                     "install the complete e2e_reme (simulators/sandbox/kvm.py)")
    if not os.path.exists("/dev/kvm"):
        return Check(KVM, "missing", "no /dev/kvm; libvirt guests run under TCG (slower)",
                     "use a host with hardware virtualization for KVM speed")
    v = kvm_probe()
    detail = f"{v.detail} ({v.seconds:.1f} s)"
    if v.works:
        return Check(KVM, "ok", f"a guest runs under KVM: {detail}")
    return Check(KVM, "unusable", f"a KVM guest does not run: {detail}; libvirt uses TCG",
                 "none needed here (TCG works, slower); for KVM use bare metal or enable "
                 "nested virtualization")


def probe_netem() -> Check:
    if (skip := _scratch_netns_unavailable(NETEM, "tc", "iproute2")) is not None:
        return skip
    with _scratch_netns() as ns:
        # Loopback, not a dummy link: the dummy driver is absent on some kernels (this
        # one), and netem on lo tests the same thing.
        _ns_run(ns, ["ip", "link", "set", "lo", "up"], check=True)
        r = _ns_run(ns, ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
    if r.returncode == 0:
        return Check(NETEM, "ok", "tc netem qdisc works in a scratch network namespace")
    err = _first_line(r.stderr or r.stdout)
    if "unknown" in err.lower():
        return Check(NETEM, "unusable", f"the host kernel has no netem qdisc (tc: {err})",
                     "modprobe sch_netem if the kernel ships it; else nspawn uses nftables "
                     "for loss and libvirt (own guest kernel) for delay")
    return Check(NETEM, "unusable", f"tc netem failed: {err}", "modprobe sch_netem")


def probe_nftables() -> Check:
    if (skip := _scratch_netns_unavailable(NFTABLES, "nft", "nftables")) is not None:
        return skip
    ruleset = ("table inet remed_probe {\n"
               "  chain out {\n"
               "    type filter hook output priority 0;\n"
               "    numgen random mod 100 < 50 drop\n"
               "  }\n"
               "}\n")
    with _scratch_netns() as ns:
        r = _ns_run(ns, ["nft", "-f", "-"], input=ruleset)
    if r.returncode == 0:
        return Check(NFTABLES, "ok", "a `numgen random mod 100 < 50 drop` rule loads in a "
                     "scratch network namespace")
    return Check(NFTABLES, "unusable", f"nft failed: {_first_line(r.stderr or r.stdout)}",
                 "modprobe nf_tables nft_numgen")


def probe_cgroup() -> Check:
    fs = _mount_types()
    root = fs.get("/sys/fs/cgroup")
    if root == "cgroup2":
        layout = "v2 unified"
    elif fs.get("/sys/fs/cgroup/unified") == "cgroup2":
        layout = "v1 hybrid (v2 at /sys/fs/cgroup/unified)"
    elif any(t == "cgroup" for m, t in fs.items() if m.startswith("/sys/fs/cgroup/")):
        layout = "v1 legacy"
    else:
        return Check(CGROUP, "unknown", f"no cgroup mounted at /sys/fs/cgroup ({root or 'none'})",
                     "mount cgroup2 on /sys/fs/cgroup")
    # Information only: limits are applied by systemd inside each guest, which copes with
    # either layout.
    return Check(CGROUP, "ok", layout)


def probe_disk(name: str, where: Callable[[], Path]) -> Check:
    path = where()
    existing = _nearest_existing(path)
    free = shutil.disk_usage(existing).free
    at = str(path) if existing == path else f"{path} (nearest existing: {existing})"
    detail = f"{_gib(free)} free at {at}"
    if free >= DISK_OK_BYTES:
        return Check(name, "ok", detail)
    env = "E2E_REME_CACHE" if name == DISK_CACHE else "E2E_REME_STATE"
    return Check(name, "unusable", f"{detail}; want >= {_gib(DISK_OK_BYTES)}",
                 f"free space there, or point {env} at a larger disk")


def probe_memory() -> Check:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0]) * 1024
    avail, total = info["MemAvailable"], info["MemTotal"]
    detail = f"{_gib(avail)} available of {_gib(total)}"
    if avail >= MEMORY_OK_BYTES:
        return Check(MEMORY, "ok", detail)
    return Check(MEMORY, "unusable", f"{detail}; want >= {_gib(MEMORY_OK_BYTES)}",
                 "stop other workloads, or run fewer/smaller sandboxes")


def probe_image() -> Check:
    from e2e_reme.vm_images import Recipe, find_image
    recipe = Recipe.load()
    img = find_image(recipe)
    if img is None:
        return Check(IMAGE, "missing", f"not built for the current recipe ({recipe.digest()})",
                     "remed image build  (about 100 s and 900 MB)")
    return Check(IMAGE, "ok", f"built: hash {img.hash} at {img.dir}")


# ---- derived verdicts ------------------------------------------------------------------

def probe_containment() -> Check:
    """Are the network rules of every live sandbox in force (simulators/sandbox/netguard.py)?"""
    from e2e_reme.simulators.sandbox import netguard, state
    st = netguard.status()
    if not st.available:
        return Check(CONTAINMENT, "missing", st.reason, "apt-get install nftables")
    live = [r for r in state.list_records() if r.extra.get("bridge")]
    open_ = [r.name for r in live if r.extra["bridge"] not in st.tables and not r.extra.get("reach_host")]
    lab = [r.name for r in live if r.extra.get("reach_host")]
    detail = (f"nftables answers; {len(live) - len(open_) - len(lab)} of {len(live)} sandboxes isolated from the host"
              + (f"; reach_host (lab stand-ins, no rules by design): {', '.join(lab)}" if lab else ""))
    if open_:
        return Check(CONTAINMENT, "unusable", f"{detail}; WITHOUT rules: {', '.join(open_)}",
                     "`remed sandbox down NAME` and create it again (or `remed sandbox gc`)")
    return Check(CONTAINMENT, "ok", detail)


def probe_sandbox_tree() -> Check:
    """Can another host user reach what nodes leave in their layers (docs/containment.md,
    "What a node leaves on the host")? The state directory and its parents must be root's
    and not writable by others (or a user could swap a directory root then walks through),
    `sandboxes/` not listable, and each sandbox's directory root's alone (0710 to QEMU's
    group on libvirt)."""
    import stat as st_
    from e2e_reme.simulators.sandbox import state
    top = state.sandboxes_dir()
    bad = []
    for p in [*reversed(top.parents), top]:
        try:
            s = os.stat(p)
        except FileNotFoundError:
            break
        if s.st_uid != 0 or (s.st_mode & 0o022 and not s.st_mode & st_.S_ISVTX):
            bad.append(f"{p} ({st_.filemode(s.st_mode)}, uid {s.st_uid})")
    if top.is_dir() and os.stat(top).st_mode & 0o066:
        bad.append(f"{top} can be listed by others ({st_.filemode(os.stat(top).st_mode)})")
    open_ = [d.name for d in (top.iterdir() if top.is_dir() else []) if d.is_dir() and os.stat(d).st_mode & 0o067]
    if bad:
        return Check(SANDBOX_TREE, "unusable", "not root's alone: " + "; ".join(bad),
                     "point E2E_REME_STATE at a directory only root can write (default /var/lib/e2e-reme)")
    if open_:
        return Check(SANDBOX_TREE, "unusable", f"sandboxes other users can enter: {', '.join(open_)}",
                     f"chmod 700 {top}/NAME, or `remed sandbox down NAME` and create it again")
    return Check(SANDBOX_TREE, "ok", f"{top}: root's; other users reach no sandbox's files")


def probe_ray_token() -> Check:
    """Is the token of Ray's token authentication readable only by its owner? Whoever
    reads it can submit a job, as root here, to a head that uses it (e2e_reme/ray_auth.py)."""
    from e2e_reme import ray_auth
    path = ray_auth.token_path()
    why = ray_auth.problem(path)
    if why:
        return Check(RAY_TOKEN, "unusable", f"others can read or replace it: {why}", ray_auth.fix_command(path))
    if not path.exists():
        return Check(RAY_TOKEN, "ok", f"no {path} yet (a head the project starts writes it 0600)")
    return Check(RAY_TOKEN, "ok", f"{path}: its owner's alone")


def _backends(c: dict[str, Check]) -> dict[str, Usable]:
    def needs(*names: str) -> list[str]:
        return [_why_not(c, n) for n in names if not _ok(c, n)]

    out = {}
    lacking = needs(ROOT, NSPAWN, OVERLAY)
    out["nspawn"] = (Usable(False, "; ".join(lacking)) if lacking else
                     Usable(True, "root, systemd-nspawn and overlayfs present"))
    lacking = needs(ROOT, LIBVIRTD, QEMU)
    if lacking:
        out["libvirt"] = Usable(False, "; ".join(lacking))
    elif _ok(c, KVM):
        out["libvirt"] = Usable(True, "libvirtd and qemu present; guests run under KVM")
    else:
        out["libvirt"] = Usable(True, "libvirtd and qemu present; guests run under TCG "
                                f"(software emulation, slower); {_why_not(c, KVM)}")
    return out


def _mechanisms(c: dict[str, Check], backends: dict[str, Usable]) -> dict[str, dict[str, Usable]]:
    def per_backend(nspawn: Usable, libvirt: Usable) -> dict[str, Usable]:
        chosen = {"nspawn": nspawn, "libvirt": libvirt}
        return {b: (chosen[b] if backends[b].usable else
                    Usable(False, f"the {b} backend is not usable here"))
                for b in BACKENDS}

    guest_kernel = "the guest runs its own kernel"
    netem_nspawn = (Usable(True, "the host kernel has netem (containers share it)")
                    if _ok(c, NETEM) else
                    Usable(False, f"containers share the host kernel; {_why_not(c, NETEM)}"))
    nft_nspawn = (Usable(True, "nftables with numgen works on the host kernel")
                  if _ok(c, NFTABLES) else
                  Usable(False, f"containers share the host kernel; {_why_not(c, NFTABLES)}"))
    systemd = Usable(True, "systemd in the guest sets CPUQuota/MemoryMax; stress runs inside")
    # In a container on a v1/hybrid host the guest's cgroup controllers are read-only:
    # systemd accepts CPUQuota/MemoryMax but nothing enforces them (config-error falls back
    # to LimitAS, which the kernel enforces per process).
    unified = CGROUP in c and c[CGROUP].detail.startswith("v2")
    systemd_nspawn = systemd if unified else Usable(
        True, "stress runs inside the service's cgroup; CPUQuota/MemoryMax are NOT enforced in a "
              "container on this cgroup-v1 host (config-error uses LimitAS instead)")
    return {
        "netem": per_backend(netem_nspawn, Usable(True, f"{guest_kernel}, with netem")),
        "nftables": per_backend(nft_nspawn, Usable(True, f"{guest_kernel}, with nftables")),
        "cgroup_stress": per_backend(systemd_nspawn, systemd),
    }


def _ok(c: dict[str, Check], name: str) -> bool:
    return name in c and c[name].ok


def _why_not(c: dict[str, Check], name: str) -> str:
    if name not in c:
        return f"{name}: not probed"
    return f"{name} {c[name].status}: {c[name].detail}"


# ---- scratch network namespaces --------------------------------------------------------

_seq = itertools.count()


def _scratch_netns_unavailable(name: str, tool: str, package: str) -> Check | None:
    if os.geteuid() != 0:
        return Check(name, "unknown", "probing needs root (a scratch network namespace)",
                     "run as root: sudo remed doctor")
    for exe in ("ip", tool):
        if shutil.which(exe) is None:
            return Check(name, "missing", f"`{exe}` is not installed", f"apt-get install {package}")
    return None


@contextmanager
def _scratch_netns() -> Iterator[str]:
    """A network namespace of our own, deleted on the way out whatever happens inside."""
    _remove_orphan_probe_netns()
    ns = f"{PROBE_NETNS_PREFIX}{os.getpid()}-{next(_seq)}"
    # `ip netns add` cleans up after itself when it fails, so only a success needs undoing.
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, text=True,
                   timeout=_CMD_TIMEOUT_S)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=_CMD_TIMEOUT_S)


def _ns_run(ns: str, cmd: list[str], *, input: str | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          input=input, timeout=_CMD_TIMEOUT_S, check=check)


def _remove_orphan_probe_netns() -> None:
    # A doctor killed mid-probe (SIGKILL skips `finally`) leaves its namespace behind; the
    # pid in the name tells whether its owner is gone. Names of any other shape are not ours.
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return
    for name in names:
        m = re.fullmatch(re.escape(PROBE_NETNS_PREFIX) + r"(\d+)-\d+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            subprocess.run(["ip", "netns", "delete", name], capture_output=True,
                           timeout=_CMD_TIMEOUT_S)


# ---- small helpers ---------------------------------------------------------------------

def _mount_types() -> dict[str, str]:
    out = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3:
            out[fields[1]] = fields[2]
    return out


def _nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _libvirt_version(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


__all__ = ["Check", "HostReport", "Usable", "probe_host", "CHECK_NAMES", "STATUSES", "BACKENDS",
           "MECHANISMS"]
