"""Sandbox backends. Importing this package registers them; each is one file."""

from e2e_reme.simulators.sandbox.backends import libvirt, nspawn  # noqa: F401
