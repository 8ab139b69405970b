"""Errors of the simulator stage. Each message names the thing and the fix.

Outcomes of a command run *inside* a sandbox (exit codes, timeouts) are data
(`ExecResult`), not exceptions; these classes are for the sandbox itself failing."""


class SandboxError(Exception):
    """Base class for sandbox problems."""


class UnknownBackend(SandboxError):
    """A backend name that is not registered; the message lists the catalog."""


class HostNotCapable(SandboxError):
    """The host lacks something the backend needs (root, a package, a daemon)."""


class SandboxNotFound(SandboxError):
    """No live sandbox has this name."""


class SandboxExists(SandboxError):
    """A sandbox with this name already exists."""


class NoFreeAddress(SandboxError):
    """Every subnet of the address pool is taken."""


class SandboxNotReady(SandboxError):
    """A node did not answer over SSH in time; the message points at its log."""


class NodeUnreachable(SandboxError):
    """An SSH connection to a running node failed."""
