"""The token of Ray's token authentication, readable by its owner only.

Whoever can read the token can submit a job to a Ray head that checks it, and jobs here run
as root. Ray writes `~/.ray/auth_token` itself (a local `ray.init()` does when there is
none, `ray get-auth-token --generate` too) with the process's umask: usually readable by
every local user. So every Ray head the project starts (`cluster/fleet.py`, `train/rl.py`,
`train/sft.py`, `serve/launch.py`) first calls `private_token()`: the token exists before
Ray looks for one, 0600 in a 0700 directory, and a token an earlier run (or Ray) left
readable by others is made private. `remed doctor` reports one that is not (`problem`).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

PATH_ENV = "RAY_AUTH_TOKEN_PATH"     # Ray's own: a token file elsewhere than ~/.ray/auth_token


def token_path() -> Path:
    custom = os.environ.get(PATH_ENV)
    return Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"


def _default_dir(path: Path) -> bool:
    """~/.ray is Ray's directory and ours to keep private; a directory named by
    RAY_AUTH_TOKEN_PATH is the user's."""
    return path.parent == Path.home() / ".ray"


def private_token(create: bool = True) -> Path | None:
    """Make the token file private (0600; ~/.ray 0700), creating it first when `create`
    (a local head is about to start and would otherwise write it readable). None when the
    token comes from $RAY_AUTH_TOKEN (a process's environment is its owner's alone)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    if _default_dir(path):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
    if create and not os.path.lexists(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass                                # another process made it just now
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # the shape Ray's own generator gives
    if os.path.exists(path) and os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)
    return path


def problem(path: Path | None = None) -> str | None:
    """Why users other than the token's owner can read (or replace) it; None if they cannot
    or there is no token file."""
    path = path or token_path()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    found = []
    if st.st_uid != os.geteuid():
        found.append(f"{path} is owned by uid {st.st_uid}, not this user")
    if st.st_mode & 0o077:
        found.append(f"{path} is {stat.filemode(st.st_mode)}")
    d = os.stat(path.parent)
    if _default_dir(path) and d.st_mode & 0o077:
        found.append(f"{path.parent} is {stat.filemode(d.st_mode)}")
    return "; ".join(found) or None


def fix_command(path: Path | None = None) -> str:
    path = path or token_path()
    return f"chmod 600 {path}" + (f" && chmod 700 {path.parent}" if _default_dir(path) else "")
