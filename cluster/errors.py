"""Errors of the fleet stage. Each message names the thing and the fix.

What happens to an episode (a sandbox that died, a host that was lost) is data in its
record, not an exception; these are for the fleet itself not being able to work."""


class FleetError(Exception):
    """Base class for fleet problems."""


class RayUnavailable(FleetError):
    """Ray is not installed, or the cluster at the given address cannot be reached."""


class NoSandboxHosts(FleetError):
    """No node of the Ray cluster advertises the sandbox-host resource."""


class HostStartFailed(FleetError):
    """A host actor could not get its sandboxes ready (no image, no capacity, a deploy
    that failed); the message names the host and the cause."""
