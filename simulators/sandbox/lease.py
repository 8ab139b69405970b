"""Sandbox leases: one user drives a sandbox at a time, across threads, processes and Serve
replicas on a host.

    got = try_acquire("srv-demo", "serve execute rem-1")   # a Lease, or a Busy (data)
    if not got.ok:
        print(got.message)     # sandbox srv-demo is in use by pid 4242 (campaign slot) since 12:03:07 ...
    with acquire("srv-demo", "my purpose") as lease:        # the same, LeaseBusy where it is taken
        ...
    holder("srv-demo")         # who holds it now, or None

A lease is an exclusive `flock` on `<state>/leases/<name>.lock`; the file holds who took
it (pid, purpose, since) for the messages of those refused. The kernel drops a flock when
the last descriptor of its open file goes, so a lease ends with its holder however that
ends (return, exception, SIGTERM, SIGKILL, OOM); there is no stale lease to expire.
Acquiring never waits unless asked to (`wait_s`), so no user ever blocks on itself: a
lease is exclusive within a process too (each acquire opens the file anew), and the
refusal says when the holder is the caller's own process, whose code should pass its
`Lease` along rather than take a second one.

Who takes one: an episode runner's slot (`simulators/episode.py` `Slot`: the benchmark's
and evaluation's worker threads, the fleet's SandboxHost actors and so RL's judge) for the
slot's whole life, from `up()` to `down()`; the server (`serve/remediate.py`) for each
request that names a sandbox; the CLI's commands that change a sandbox (`attach(name,
lease=...)`: fault inject and recover, verify, system deploy, sandbox reset). Code that
drives a sandbox by hand takes one with `acquire`. `Sandbox.stop()` removes the file of a
lease nobody holds; `remed sandbox gc` sweeps the rest.

A holder that runs something in a sandbox which must not outlive it (the server's
execute: the jailed controller, the playbook's processes in the nodes) writes what is
needed to end it into the lease (`note`) and starts a `guard`: a process outside its
holder's process tree that holds the same lease and, if the holder dies before saying
`done`, ends the jail, ends every process started in the nodes since the noted snapshot,
writes the noted record and only then lets the lease go. Should the guard die too, the
next acquirer finds the note and does the same before it gets the lease.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from e2e_reme import paths
from e2e_reme.simulators.errors import SandboxError
from e2e_reme.simulators.sandbox.state import NAME_RE

NOTE_LIMIT = 4 << 20          # bytes of a lease file read back (a snapshot of a busy node is ~100 KB)


def leases_dir() -> Path:
    return paths.state_dir() / "leases"


def lease_path(name: str) -> Path:
    if not NAME_RE.match(name or ""):
        raise ValueError(f"sandbox name {name!r}: use 1-31 lowercase letters, digits and '-', starting with a letter")
    return leases_dir() / f"{name}.lock"


@dataclass(frozen=True)
class Holder:
    pid: int | None
    purpose: str
    since: float
    host: str = ""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since)) if self.since else "an unknown time"
        return f"pid {self.pid} ({self.purpose}) since {when}"


@dataclass(frozen=True)
class Busy:
    """A refused acquire: who holds the sandbox (None while the holder has not yet written
    itself into the file, a moment after taking it)."""

    sandbox: str
    holder: Holder | None
    ok = False

    @property
    def in_use(self) -> str:
        """"sandbox X is in use by pid N (purpose) since T"."""
        who = self.holder.describe() if self.holder else "another process (it has not yet said who)"
        return f"sandbox {self.sandbox} is in use by {who}"

    @property
    def message(self) -> str:
        msg = self.in_use
        if self.holder and self.holder.pid == os.getpid():
            msg += "; that is this process: pass the lease it holds along instead of taking a second one"
        return msg


class LeaseBusy(SandboxError):
    """A sandbox another user holds; `busy` says who."""

    def __init__(self, busy: Busy):
        super().__init__(busy.message + "; wait until it is done, or use another sandbox")
        self.busy = busy


class Lease:
    """A held lease. `release()` (or leaving the `with` block) gives it back; dying does too."""

    ok = True

    def __init__(self, sandbox: str, fd: int, holder: Holder, recovered: list[str]):
        self.sandbox, self.holder, self.recovered = sandbox, holder, recovered
        self._fd: int | None = fd
        self._pending: dict | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def note(self, **pending) -> None:
        """What to end should this holder die before `clear()`: `snapshot` (the nodes'
        processes before, as `leftovers.snapshot` gives it), `jail` (True: the sandbox's
        controller may run), `record` (a file to write the interruption to), `request`."""
        self._pending = pending
        self._write()

    def clear(self) -> None:
        self._pending = None
        self._write()

    def guard(self) -> "Guard":
        """Start the guard process (module docstring); call `done()` on it when finished."""
        return Guard(self)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, lease_path(self.sandbox)):
                os.unlink(lease_path(self.sandbox))     # under the lock (acquirers re-check the inode); the note goes too
            elif self._pending is not None:
                self.clear()        # a note left behind would make the next acquirer "recover"
        except OSError:
            pass
        finally:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)    # also for a guard's copy of it, which may not have exited yet
            os.close(fd)

    def _write(self) -> None:
        if self._fd is None:
            return
        data = json.dumps({"holder": asdict(self.holder), "pending": self._pending}).encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


def try_acquire(name: str, purpose: str, *, wait_s: float = 0.0, poll_s: float = 0.2) -> Lease | Busy:
    """The sandbox's lease, or who holds it (`Busy`, after waiting up to `wait_s`)."""
    path = lease_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            who = _holder_of(_read(fd))
            os.close(fd)
            if time.monotonic() >= deadline:
                return Busy(name, who)
            time.sleep(poll_s)
            continue
        if not _same_file(fd, path):       # released (and unlinked) between our open and our lock
            os.close(fd)
            continue
        try:
            return _take(name, fd, purpose)
        except BaseException:
            os.close(fd)            # the lock with it; a note left by a dead holder stays for the next try
            raise


def _take(name: str, fd: int, purpose: str) -> Lease:
    """The lease on a locked file: first what a dead holder noted is ended (`recover`)."""
    pending = _read(fd).get("pending")
    try:
        recovered = recover(name, pending) if pending else []
    except Exception as e:
        raise SandboxError(f"sandbox {name}: its last holder died mid-run, and ending what it left running "
                           f"failed ({type(e).__name__}: {e}); run `remed sandbox gc` or `remed sandbox down "
                           f"{name}`") from e
    lease = Lease(name, fd, Holder(os.getpid(), purpose, time.time(), socket.gethostname()), recovered)
    lease._write()
    return lease


def acquire(name: str, purpose: str, *, wait_s: float = 0.0) -> Lease:
    """`try_acquire`, raising `LeaseBusy` (a SandboxError) where the sandbox is taken."""
    got = try_acquire(name, purpose, wait_s=wait_s)
    if not got.ok:
        raise LeaseBusy(got)
    return got


def holder(name: str) -> Holder | None:
    """Who holds the sandbox's lease now; None if nobody does. Read from the kernel's
    table of locks (/proc/locks), so that asking never takes the lock from a user."""
    try:
        fd = os.open(lease_path(name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        try:
            locked = any(f" {key} " in line and " FLOCK " in line for line in Path("/proc/locks").read_text().splitlines())
        except OSError:
            locked = False
        return (_holder_of(_read(fd)) or Holder(None, "unknown", 0.0)) if locked else None
    finally:
        os.close(fd)


def discard(name: str) -> bool:
    """Remove the lease file of a sandbox that is gone, unless someone holds it (a holder
    removes it when it lets go). True if it was removed."""
    if not lease_path(name).exists():
        return False
    got = try_acquire(name, "removing the lease of a stopped sandbox")
    if got.ok:
        got.release()
    return got.ok


def sweep(live: set[str]) -> list[str]:
    """Lease files of sandboxes that no longer exist and nobody holds (for `remed sandbox gc`)."""
    names = [f.name[:-len(".lock")] for f in sorted(leases_dir().glob("*.lock"))]
    return [f"the lease of {n}" for n in names if n not in live and NAME_RE.match(n) and discard(n)]


# ---- what a dead holder left: ended by its guard, or by the next acquirer ---------------------

def recover(name: str, pending: dict | None) -> list[str]:
    """End what a holder that died mid-use noted: the sandbox's controller jail, and every
    process started in its nodes since the noted snapshot; write the noted record. Returns
    what it did, one line each."""
    if not pending:
        return []
    done = _end_what_was_noted(name, pending)
    if pending.get("record"):
        try:
            Path(pending["record"]).parent.mkdir(parents=True, exist_ok=True)
            Path(pending["record"]).write_text(json.dumps(
                {"sandbox": name, "request": pending.get("request"), "interrupted": True,
                 "reason": "the process serving it died before it finished", "ended": done,
                 "at": time.time()}, indent=2))
        except OSError:
            pass
    return done


def _end_what_was_noted(name: str, pending: dict) -> list[str]:
    from e2e_reme.simulators.errors import SandboxNotFound
    from e2e_reme.simulators.sandbox import controller, state
    try:
        rec = state.load(name)
    except SandboxNotFound:
        return [f"sandbox {name} is gone; nothing to end"]
    done = []
    if pending.get("jail"):
        controller.destroy(rec)
        done.append(f"ended the controller jail of {name}")
    if pending.get("snapshot") is not None:
        from e2e_reme.simulators.playbook.leftovers import end_leftovers
        from e2e_reme.simulators.sandbox.base import attach
        sb = attach(name)
        try:
            ended = end_leftovers(sb, frozenset(tuple(x) for x in pending["snapshot"]))
        finally:
            sb._close_ssh()
        done += [f"ended {x.cmdline or x.pid} (pid {x.pid}) on {x.node}" for x in ended]
    return done


class Guard:
    """A process that holds the lease with its holder and cleans up if the holder dies
    first (module docstring). Started as a grandchild in a session of its own: process
    managers that kill a dead worker's children (Ray does) must not take it along."""

    def __init__(self, lease: Lease):
        r, self._w = os.pipe()
        try:
            launcher = subprocess.run(
                [sys.executable, "-c", _LAUNCH, str(lease._fd), str(r), lease.sandbox, str(_guard_log(lease.sandbox))],
                pass_fds=(lease._fd, r), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
            self.pid = int(launcher.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError, OSError, subprocess.SubprocessError) as e:
            os.close(self._w)
            self._w = None
            raise SandboxError(f"sandbox {lease.sandbox}: the lease's guard did not start: {e}") from None
        finally:
            os.close(r)

    def done(self) -> None:
        """The holder finished: the guard exits without touching anything."""
        w, self._w = self._w, None
        if w is not None:
            try:
                os.write(w, b"done")
            except OSError:
                pass                  # the guard is gone already: nobody to tell
            finally:
                os.close(w)


def _guard_log(name: str) -> Path:
    """In the sandbox's directory, which goes with the sandbox."""
    from e2e_reme.simulators.sandbox.state import sandboxes_dir
    d = sandboxes_dir() / name
    return d / "guard.log" if d.is_dir() else leases_dir() / f"{name}.guard.log"


# The launcher and the guard need nothing but the standard library until the guard has to
# clean up; they never import the project while they only wait.
_LAUNCH = r"""
import subprocess, sys
lease_fd, pipe_fd, name, log = sys.argv[1:5]
with open(log, "ab") as out:
    p = subprocess.Popen([sys.executable, "-c", GUARD, lease_fd, pipe_fd, name], pass_fds=(int(lease_fd), int(pipe_fd)),
                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
print(p.pid, flush=True)
""".replace("GUARD", repr(r"""
import os, signal, sys, time
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)     # it ends on its own, as soon as its holder does
lease_fd, pipe_fd, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
got = b""
while True:
    try:
        chunk = os.read(pipe_fd, 64)
    except InterruptedError:
        continue
    if not chunk:
        break
    got += chunk
if got.startswith(b"done"):
    sys.exit(0)
print(time.strftime("%H:%M:%S"), "the holder of", name, "died before it was done; cleaning up", flush=True)
from e2e_reme.simulators.sandbox.lease import _finish_for_dead_holder
for line in _finish_for_dead_holder(name, lease_fd):
    print("  ", line, flush=True)
"""))


def _finish_for_dead_holder(name: str, fd: int) -> list[str]:
    """In the guard: clean up after the holder, then let the lease go."""
    pending = _read(fd).get("pending")
    try:
        done = recover(name, pending)
    except Exception as e:        # left noted: the next acquirer tries again
        return [f"cleanup failed ({type(e).__name__}: {e}); the next acquirer of {name} will try again"]
    os.pwrite(fd, b"{}", 0)
    os.ftruncate(fd, 2)
    try:
        if _same_file(fd, lease_path(name)):
            os.unlink(lease_path(name))
    except OSError:
        pass
    os.close(fd)
    return done


# ---- the file --------------------------------------------------------------------------------

def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, NOTE_LIMIT, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _holder_of(data: dict) -> Holder | None:
    h = data.get("holder")
    try:
        return Holder(int(h["pid"]) if h.get("pid") is not None else None, str(h.get("purpose", "")),
                      float(h.get("since") or 0), str(h.get("host", ""))) if isinstance(h, dict) else None
    except (TypeError, ValueError, KeyError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


__all__ = ["Busy", "Guard", "Holder", "Lease", "LeaseBusy", "acquire", "discard", "holder", "lease_path", "recover",
           "sweep", "try_acquire"]
