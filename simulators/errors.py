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


class SystemSpecError(SandboxError, ValueError):
    """A system spec that cannot be used: the message gives the file, the line and the
    reason (one line per problem); `problems` holds them as (line, reason) pairs."""

    def __init__(self, message: str, problems: list[tuple[int | None, str]] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class UnknownSystem(SystemSpecError):
    """A system name that is not in the catalog; the message lists the catalog."""


class DeployError(SandboxError):
    """Deploying a system into a sandbox failed; the message says which step and where to look."""


class NotDeployed(DeployError):
    """A sandbox with no system deployed in it."""


class FaultError(SandboxError):
    """A fault could not be injected, checked or recovered; the message says where it failed."""


class UnknownFault(FaultError):
    """A fault name that is not in the catalog; the message lists the catalog."""


class FaultUnavailable(FaultError):
    """The fault cannot run here (a missing mechanism, a target it does not apply to); the
    message gives the reason."""


class PlaybookParseError(ValueError):
    """Model output that is not a usable playbook. `error_class` names the kind
    ("InvalidYaml", "NotAPlaybook") for the execution pipeline's outcome; `reason` is one line."""

    def __init__(self, error_class: str, reason: str):
        super().__init__(f"{error_class}: {reason}")
        self.error_class = error_class
        self.reason = reason
