"""Shared fixtures. Tests drive the real thing: real containers, real SSH, real Ansible.

Every sandbox a test makes is named `pt-...`; at the end of the session the suite fails
if any of them (or any container, bridge or mount of theirs) is still there."""

from __future__ import annotations

import os
import secrets
import signal

import pytest

from e2e_reme.host import passive_thread_waits

passive_thread_waits()      # before any test imports torch: tests share the cores with sandboxes

from e2e_reme.simulators import list_sandboxes

# A test run started in the background by a non-interactive shell (`make test &`, nohup)
# inherits SIGINT ignored, and so would every child it starts: the Ctrl-C tests would then
# interrupt nothing. An ignored disposition survives exec, a handler does not, so this
# gives the children back the default Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def image():
    """The guest image, built if this host has none yet (make test builds it first)."""
    from e2e_reme.vm_images import build_image, find_image
    if os.geteuid() != 0:
        pytest.skip("building and booting the image needs root")
    return find_image() or build_image()


@pytest.fixture
def sb_name():
    return f"pt-{secrets.token_hex(3)}"


@pytest.fixture(scope="session", autouse=True)
def no_leaked_sandboxes():
    before = {r.name for r in list_sandboxes()}
    yield
    # Ours: owned by this process, or detached ones the CLI tests made; not another run's.
    leaked = [r.name for r in list_sandboxes() if r.name.startswith("pt-") and r.name not in before
              and r.owner_pid in (None, os.getpid())]
    assert not leaked, f"tests leaked sandboxes: {leaked} (run `remed sandbox gc`)"


@pytest.fixture(scope="session", autouse=True)
def no_orphaned_container_processes():
    """A container whose record is gone but whose processes live on (its init, services, an
    injected stress-ng) is the worst leak: it holds the CPU for hours, unseen by `ls`."""
    from e2e_reme.simulators.sandbox.backends.nspawn import NspawnSandbox

    def orphans() -> dict[str, list[int]]:
        return {m: pids for m, pids in NspawnSandbox.stray_cgroups(list_sandboxes()).items() if pids}

    before = set(orphans())
    yield
    leaked = {m: pids for m, pids in orphans().items() if m not in before}
    assert not leaked, (f"tests left processes in the cgroups of containers that no sandbox owns: {leaked} "
                        f"(run `remed sandbox gc`)")
