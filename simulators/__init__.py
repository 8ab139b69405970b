"""What a sandbox is: backends (nspawn, libvirt) that boot the guest image into nodes on a
private network, and (in later stages) the systems, faults and verifier that run in them."""

from e2e_reme.simulators.errors import (HostNotCapable, NodeUnreachable, NoFreeAddress, SandboxError, SandboxExists,
                     SandboxNotFound, SandboxNotReady, UnknownBackend)
from e2e_reme.simulators.sandbox.base import (ExecResult, Sandbox, SandboxConfig, attach, backend_catalog, create_sandbox, gc,
                      get_backend, list_sandboxes, register)

__all__ = ["ExecResult", "Sandbox", "SandboxConfig", "attach", "backend_catalog", "create_sandbox", "gc",
           "get_backend", "list_sandboxes", "register", "SandboxError", "HostNotCapable",
           "NodeUnreachable", "NoFreeAddress", "SandboxExists", "SandboxNotFound",
           "SandboxNotReady", "UnknownBackend"]
