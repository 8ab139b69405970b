"""`python -m e2e_reme.simulators.sandbox.reaper NAME OWNER_PID OWNER_START`

Started (detached) next to every sandbox owned by a process, through
`--spawn NAME OWNER_PID OWNER_START LOG`: a launcher that starts the reaper in a new
session, prints its pid and exits, so that the reaper is not a child of the owner (a
process manager that kills a dead worker's children, as Ray does, would kill it too). It waits for the owner to
exit; if the sandbox's record still names that owner then, the owner died without
stopping it (SIGKILL, a crash), and the reaper destroys it. It exits by itself as soon as
the record is gone (a normal stop also signals it).
"""

from __future__ import annotations

import os
import select
import sys
import time

from e2e_reme.host import process_alive


def main(name: str, owner_pid: int, owner_start: int) -> int:
    from e2e_reme.simulators.sandbox import state
    from e2e_reme.simulators.errors import SandboxNotFound
    from e2e_reme.simulators.sandbox.base import attach

    try:
        fd = os.pidfd_open(owner_pid)
    except OSError:
        fd = None  # already gone
    while True:
        if fd is not None:
            ready, _, _ = select.select([fd], [], [], 2.0)
            owner_gone = bool(ready) or not process_alive(owner_pid, owner_start)
        else:
            owner_gone = True
        try:
            rec = state.load(name)
        except SandboxNotFound:
            return 0
        if rec.owner_pid != owner_pid:
            return 0
        if owner_gone:
            print(f"{time.strftime('%H:%M:%S')} owner {owner_pid} of sandbox {name} died; destroying it",
                  flush=True)
            attach(name).stop()
            return 0


def spawn(name: str, owner_pid: str, owner_start: str, log: str) -> int:
    import subprocess
    with open(log, "ab") as out:
        p = subprocess.Popen([sys.executable, "-m", "e2e_reme.simulators.sandbox.reaper", name, owner_pid, owner_start],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, close_fds=True)
    print(p.pid, flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--spawn":
        sys.exit(spawn(*sys.argv[2:6]))
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
