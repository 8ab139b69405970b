"""Small helpers for driving the host: run a command with a clear error, check that a
process is still the one we started, delete a tree that may still hold mounts, and how
torch's threads wait on a host they share with sandboxes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence


def passive_thread_waits() -> None:
    """Let torch's OpenMP threads sleep, not spin, while they wait for each other: call it
    before torch is imported (the OpenMP runtime reads OMP_WAIT_POLICY once, when it loads);
    processes started afterwards (Ray's local workers among them) inherit it. A value the
    user set is kept.

    Why: here a model generates or trains while sandboxes run on the same cores (a fault's
    stress workers, other episodes). libgomp's default spins before it sleeps; a thread
    spinning for a partner that the scheduler has preempted holds the core that partner
    needs, and every one of the ~1000 parallel regions of a decoding step pays for it
    (`bench/train.py --omp-wait passive,spin --busy 1`, docs/train.md)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class HostCommandError(RuntimeError):
    """A host command failed. `str()` is one line naming the command and its stderr."""

    def __init__(self, cmd: Sequence[str], rc: int, stderr: str):
        self.cmd, self.rc, self.stderr = list(cmd), rc, stderr
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
        super().__init__(f"`{' '.join(self.cmd)}` exited {rc}: {tail}")


def run(cmd: Sequence[str], *, check: bool = True, timeout: float | None = 120,
        input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a host command, capturing text output; raise HostCommandError on failure."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              input=input, env=env)
    except FileNotFoundError as e:
        raise HostCommandError(cmd, 127, f"{cmd[0]}: not installed (run `make setup`)") from e
    except subprocess.TimeoutExpired as e:
        raise HostCommandError(cmd, 124, f"timed out after {timeout} s") from e
    if check and proc.returncode != 0:
        raise HostCommandError(cmd, proc.returncode, proc.stderr or proc.stdout)
    return proc


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone.
    Together with the pid it names a process uniquely (pids are reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses; fields after the last ')' are fixed.
    return int(stat[stat.rindex(")") + 2:].split()[19])


def process_alive(pid: int | None, start_time: int | None = None) -> bool:
    """True if `pid` runs and, when given, started at `start_time` (not a reused pid)."""
    if not pid:
        return False
    st = proc_start_time(pid)
    if st is None:
        return False
    if start_time is not None and st != start_time:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")
            if mnt == root or mnt.startswith(root.rstrip("/") + "/"):
                found.append(mnt)
    return sorted(set(found), key=lambda m: m.count("/"), reverse=True)


def unmount_below(path: Path) -> None:
    for mnt in mounts_below(path):
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def safe_rmtree(path: Path) -> None:
    """Remove a tree, first detaching every mount inside it, so that a leftover bind
    mount of /proc or /dev (from debootstrap or a container) is never deleted through."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    unmount_below(path)
    if mounts_below(path):
        raise HostCommandError(["rm", "-rf", str(path)], 1, "mounts remain below it; not deleting")
    if path.is_dir() and not path.is_symlink():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
    else:
        path.unlink(missing_ok=True)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def link_names() -> list[str]:
    """Names of the host's network interfaces."""
    try:
        out = run(["ip", "-o", "link", "show"]).stdout
    except HostCommandError:
        return []
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def processes_named(program: str) -> dict[int, list[str]]:
    """pid → argv of every process whose argv[0] ends with `program` (found from /proc,
    so that processes another process started, or a dead owner left, are found too)."""
    found = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(program.encode()):
            found[int(p.name)] = [a.decode(errors="replace") for a in argv if a]
    return found
