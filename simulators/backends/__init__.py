"""Sandbox backends. Importing this package registers them; each is one file."""

from . import libvirt, nspawn  # noqa: F401
