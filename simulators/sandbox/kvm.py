"""Does KVM really run a guest on this host?

`/dev/kvm` existing proves little: on some hosts (nested virtualisation, odd firmware) a
KVM guest aborts on an MSR or hangs before its first kernel message, while TCG works.
So the probe boots the guest image's own kernel under KVM with no initrd and no root
disk: a working KVM gets through the whole kernel start in about a second and panics
at mount-root ("VFS: Unable to mount root fs"), and `-no-reboot` makes QEMU exit there.
The verdict is whether the serial console reached such a late boot message in time.

    verdict = kvm_probe()          # the built image's kernel
    verdict.works, verdict.detail, verdict.seconds

A verdict is cached in `<state>/kvm-probe.json`, keyed by the kernel's hash, the QEMU
version and the host kernel's release (a host kernel upgrade can fix or break KVM), so
that asking again costs a file read. Verdicts that need no boot (no /dev/kvm, no QEMU,
no image) are not cached: they are cheap and the fix is outside the probe.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from e2e_reme import paths

QEMU = "qemu-system-x86_64"
# A kernel that prints one of these has run its whole early start under KVM.
_LATE_MARKERS = (b"Kernel panic", b"VFS: Unable to mount root", b"Freeing unused kernel", b"Run /init")
# CPU models to try, best first: `host` is what libvirt's host-passthrough gives;
# `max` is the fallback when the host model trips over an MSR the host can't set.
_CPU_MODELS = ("host", "max")
_ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|.)")


@dataclass(frozen=True)
class KvmVerdict:
    works: bool
    detail: str
    seconds: float
    cpu: str | None = None   # the -cpu model that booted ("host" or "max"), when works


def kvm_probe(kernel: Path | None = None, timeout: float = 25.0) -> KvmVerdict:
    """Boot `kernel` (default: the built guest image's) under KVM and say whether it ran."""
    t0 = time.monotonic()

    def verdict(works: bool, detail: str, cpu: str | None = None) -> KvmVerdict:
        return KvmVerdict(works, detail, round(time.monotonic() - t0, 2), cpu)

    if kernel is None:
        from e2e_reme.vm_images import find_image
        img = find_image()
        if img is None:
            return verdict(False, "no guest kernel to boot: build the image first "
                                  "(`remed image build`), then probe again")
        kernel = img.kernel
    kernel = Path(kernel)
    if not kernel.is_file():
        return verdict(False, f"kernel {kernel} not found: build the image first (`remed image build`)")
    if not os.path.exists("/dev/kvm"):
        return verdict(False, "no /dev/kvm: load the module (modprobe kvm_intel or kvm_amd) "
                              "and enable virtualisation (VT-x/AMD-V) in the firmware")
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as e:
        return verdict(False, f"/dev/kvm is not usable ({e.strerror}); run as root or join the kvm group")
    qemu = shutil.which(QEMU)
    if qemu is None:
        return verdict(False, f"{QEMU} is not installed; run `make setup` (apt-get install qemu-system-x86)")

    key = _cache_key(kernel, qemu)
    cached = _load_cache().get(key)
    if cached is not None:
        try:
            return KvmVerdict(**cached)
        except TypeError:
            pass  # written by an older version of this module: probe again

    failures = []
    result = None
    for cpu in _CPU_MODELS:
        ok, why, hung = _boot(qemu, kernel, cpu, timeout)
        if ok:
            result = verdict(True, f"a guest kernel booted under KVM with -cpu {cpu} "
                                   f"(reached mount-root in {why})", cpu)
            break
        failures.append(f"-cpu {cpu}: {why}")
        if hung:
            break  # a hang is the host, not the CPU model; another model would hang as well
    if result is None:
        if len({f.split(": ", 1)[1] for f in failures}) == 1 and len(failures) > 1:
            failures = [" and ".join(f.split(": ", 1)[0] for f in failures) + ": "
                        + failures[0].split(": ", 1)[1]]
        result = verdict(False, "KVM does not run a guest here (" + "; ".join(failures)
                         + "); VMs fall back to TCG (software emulation, several times slower)")
    _store_cache(key, result)
    return result


def _boot(qemu: str, kernel: Path, cpu: str, timeout: float) -> tuple[bool, str, bool]:
    """(booted, detail, hung): run the kernel under KVM until a late marker, an exit or
    the timeout, keeping only the serial output's tail for the detail."""
    cmd = [qemu, "-enable-kvm", "-cpu", cpu, "-m", "256", "-smp", "1", "-nodefaults",
           "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
           "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 loglevel=7"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    out = b""
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                said = _last_line(out, skip=b"qemu-system")
                said = "the kernel printed nothing" if said == "no output" else f"last line: {said!r}"
                return False, f"hung: no late boot message within {timeout:.0f} s ({said})", True
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break  # QEMU exited
            out += chunk
            out = out[-65536:]
            if any(m in out for m in _LATE_MARKERS):
                return True, f"{time.monotonic() - t0:.1f} s", False
        rc = proc.wait()
        how = f"killed by signal {-rc}" if rc < 0 else f"exited {rc}"
        return False, f"QEMU {how}: {_last_line(out, prefer=b'error')}", False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def _last_line(out: bytes, prefer: bytes | None = None, skip: bytes | None = None) -> str:
    """The last meaningful line of the output (the last one containing `prefer` if any:
    QEMU's own "error:" line says more than the assertion that follows it)."""
    # The terminal escapes SeaBIOS prints are noise in a one-line detail.
    text = _ANSI.sub("", out.decode(errors="replace"))
    lines = [l.strip() for l in text.replace("\r", "\n").splitlines() if l.strip()]
    if skip:
        lines = [l for l in lines if not l.startswith(skip.decode())]
    if prefer:
        lines = [l for l in lines if prefer.decode() in l] or lines
    return lines[-1][:200] if lines else "no output"


def _cache_file() -> Path:
    return paths.state_dir() / "kvm-probe.json"


def _cache_key(kernel: Path, qemu: str) -> str:
    h = hashlib.sha256()
    with open(kernel, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"kernel={h.hexdigest()[:16]} qemu={_qemu_version(qemu)} host={os.uname().release}"


def _qemu_version(qemu: str) -> str:
    try:
        first = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                               timeout=10).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"
    # "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
    return first.removeprefix("QEMU emulator version ").strip()


def _load_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_cache(key: str, v: KvmVerdict) -> None:
    try:
        data = _load_cache()
        data[key] = asdict(v)
        f = _cache_file()
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(f)
    except OSError:
        pass  # an unwritable state dir only costs a probe next time
