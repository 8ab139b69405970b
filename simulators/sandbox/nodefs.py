"""Reading a tree the node controls, from the host, without ever leaving it.

A node's files are hostile to the host: a process still running in the node can swap a
directory for a symlink while the host walks it, or leave a FIFO or a device where a file
was. Every host-side read of a node's files (the verifier's manifests, hostview, leftovers)
goes through `NodeTree`, which resolves paths in the kernel, never in Python:

- `openat2(2)` relative to a directory file descriptor held for the tree's top, with
  `RESOLVE_IN_ROOT` (a node's root: symlinks, absolute ones included, resolve inside it, as
  they would for the node; `..` stops at its top) or `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`
  (a layer on the host's disk: no link is followed at all), and `RESOLVE_NO_MAGICLINKS`
  always (no `/proc/<pid>/root` jump out of the tree). A swap between two calls can only
  move the walk inside the tree; it cannot lead out of it.
- Nothing but a regular file or a directory is ever opened for reading: an entry is opened
  with `O_PATH | O_NOFOLLOW` (no open side effect, not even for a device or a FIFO), checked
  with `fstat`, and only a regular file is reopened for reading through its own descriptor
  (`/proc/self/fd/N`), so the inode checked is the inode read.
- Every read is bounded in bytes, every walk in entries and seconds, and walks are
  iterative (no recursion, whatever the depth); a walk that stops early says why
  (`truncated`), and the caller judges that as data.

Trusted: the host kernel. Nothing here runs a binary from the node or follows one of its links.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

SYS_OPENAT2 = 437          # x86_64 and aarch64 alike
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """The openat2 system call; raises OSError like os.open."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = _libc.syscall(SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return fd


@dataclass(frozen=True)
class WalkLimits:
    max_entries: int = 200_000
    max_seconds: float = 20.0
    max_depth: int = 64


class NodeTree:
    """A directory tree read without leaving it. Use as a context manager (it holds one
    descriptor), or call `close()`."""

    def __init__(self, top: str | os.PathLike, *, in_root: bool):
        self.top = os.fspath(top)
        self.resolve = RESOLVE_NO_MAGICLINKS | (RESOLVE_IN_ROOT if in_root else RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
        self.fd = os.open(self.top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.truncated: str | None = None

    @classmethod
    def of_process(cls, pid: int) -> NodeTree:
        """The root directory host pid `pid` sees (its mount namespace's root)."""
        return cls(f"/proc/{pid}/root", in_root=True)

    @classmethod
    def layer(cls, path: str | os.PathLike) -> NodeTree:
        """A directory on the host's disk that the node writes (an overlay's upper layer):
        no symlink inside it is followed at all."""
        return cls(path, in_root=False)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> NodeTree:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- single paths ------------------------------------------------------------------------

    def _rel(self, path: str) -> str:
        rel = path.strip("/")
        return rel or "."

    def _open_path(self, path: str, *, follow: bool) -> int | None:
        flags = os.O_PATH | (0 if follow else os.O_NOFOLLOW)
        try:
            return openat2(self.fd, self._rel(path), flags, self.resolve)
        except OSError:
            return None

    def _on_path(self, path: str, follow: bool, fn):
        """fn(an O_PATH descriptor of `path`), or None if it cannot be opened or fn fails."""
        fd = self._open_path(path, follow=follow)
        if fd is None:
            return None
        try:
            return fn(fd)
        except OSError:
            return None
        finally:
            os.close(fd)

    def lstat(self, path: str) -> os.stat_result | None:
        """The entry itself (a symlink is a symlink)."""
        return self._on_path(path, False, os.fstat)

    def stat(self, path: str) -> os.stat_result | None:
        """What the path names with links resolved inside the tree (in_root) or refused."""
        return self._on_path(path, True, os.fstat)

    def exists(self, path: str) -> bool:
        return self.lstat(path) is not None

    def is_dir(self, path: str) -> bool:
        st = self.stat(path)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def readlink(self, path: str) -> str | None:
        return self._on_path(path, False, lambda fd: os.readlink("", dir_fd=fd)
                             if stat.S_ISLNK(os.fstat(fd).st_mode) else None)

    def open_regular(self, path: str, *, follow: bool = True) -> int | None:
        """A read descriptor for `path` if it is a regular file (checked on the inode that
        is then read), else None. The caller closes it."""
        return self._on_path(path, follow, lambda fd: os.open(
            f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            if stat.S_ISREG(os.fstat(fd).st_mode) else None)

    def read_bytes(self, path: str, limit: int = 4 << 20, *, follow: bool = True) -> bytes | None:
        """At most `limit` bytes of a regular file; None for anything else or on error."""
        return self._on_regular(path, follow, lambda fd: b"".join(_chunks(fd, limit)))

    def sha256(self, path: str, limit: int = 1 << 30, *, follow: bool = True) -> str | None:
        def digest(fd: int) -> str:
            h = hashlib.sha256()
            for b in _chunks(fd, limit):
                h.update(b)
            return h.hexdigest()
        return self._on_regular(path, follow, digest)

    def _on_regular(self, path: str, follow: bool, fn):
        rfd = self.open_regular(path, follow=follow)
        if rfd is None:
            return None
        try:
            return fn(rfd)
        finally:
            os.close(rfd)

    def statvfs(self, path: str) -> os.statvfs_result | None:
        return self._on_path(path, True, os.fstatvfs)

    def listdir(self, path: str) -> list[str] | None:
        fd = self._open_dir(path, follow=True)
        if fd is None:
            return None
        try:
            return sorted(os.listdir(fd))
        except OSError:
            return None
        finally:
            os.close(fd)

    def _open_dir(self, path: str, *, follow: bool, dirfd: int | None = None) -> int | None:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
        try:
            return openat2(self.fd if dirfd is None else dirfd, path if dirfd is not None else self._rel(path),
                           flags, self.resolve)
        except OSError:
            return None

    # ---- walks -------------------------------------------------------------------------------

    def walk(self, path: str = "/", limits: WalkLimits = WalkLimits(), *,
             one_fs: bool = False, prune=None) -> Iterator[tuple[str, os.stat_result]]:
        """Every entry under `path` (not `path` itself) as (node path, lstat result), by
        directory descriptors, iteratively; no link is followed and no entry is opened
        except directories (O_DIRECTORY | O_NOFOLLOW); `one_fs`: not into other mounts;
        `prune(node_path)` true: that directory is yielded but not entered.
        Stops at the limits and records why in `truncated`."""
        self.truncated = None
        base = "/" + path.strip("/")
        top = self._open_dir(path, follow=True)
        if top is None:
            return
        top_dev = os.fstat(top).st_dev
        deadline, count = time.monotonic() + limits.max_seconds, 0
        stack: list[tuple[int, str, int]] = [(top, base.rstrip("/"), 0)]
        try:
            while stack:
                dfd, dpath, depth = stack.pop()
                try:
                    names = _scan(dfd)
                except OSError:
                    names = []
                for name in names:
                    count += 1
                    if count > limits.max_entries:
                        self.truncated = f"more than {limits.max_entries} entries under {base}"
                        return
                    if time.monotonic() > deadline:
                        self.truncated = f"walking {base} took more than {limits.max_seconds:g} s"
                        return
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    except OSError:
                        continue
                    full = f"{dpath}/{name}"
                    yield full, st
                    if (stat.S_ISDIR(st.st_mode) and not (one_fs and st.st_dev != top_dev)
                            and not (prune and prune(full))):
                        if depth + 1 >= limits.max_depth:
                            self.truncated = f"deeper than {limits.max_depth} levels at {full}"
                            return
                        child = self._open_dir(name, follow=False, dirfd=dfd)
                        if child is not None:
                            stack.append((child, full, depth + 1))
                os.close(dfd)
        finally:
            for dfd, _, _ in stack:
                os.close(dfd)

    def read_entry(self, node_path: str, limit: int) -> bytes | None:
        """The content of an entry a walk yielded (no link followed at the last step)."""
        return self.read_bytes(node_path, limit, follow=False)

    def hash_entry(self, node_path: str, limit: int = 1 << 30) -> str | None:
        return self.sha256(node_path, limit, follow=False)


def _scan(dfd: int) -> list[str]:
    """The names in an open directory (a dup of its descriptor is consumed)."""
    return sorted(os.listdir(dfd))


def _chunks(fd: int, limit: int) -> Iterator[bytes]:
    """What the descriptor reads, up to `limit` bytes (a would-block read ends it)."""
    left = limit
    while left > 0:
        try:
            b = os.read(fd, min(left, 1 << 20))
        except BlockingIOError:
            return
        if not b:
            return
        yield b
        left -= len(b)


def supported() -> bool:
    """Whether this kernel has openat2 (Linux 5.6+)."""
    top = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(openat2(top, ".", os.O_PATH, RESOLVE_BENEATH))
        return True
    except OSError as e:
        return e.errno != errno.ENOSYS
    finally:
        os.close(top)
