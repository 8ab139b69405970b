"""Where the project keeps things on a host. Read from the environment when called,
never at import time, so tests and users can point them elsewhere."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Built images and downloaded packages (safe to delete; rebuilt on demand)."""
    return Path(os.environ.get("E2E_REME_CACHE", "/var/cache/e2e-reme"))


def state_dir() -> Path:
    """Live sandboxes: their records, overlays, logs and the address allocator."""
    return Path(os.environ.get("E2E_REME_STATE", "/var/lib/e2e-reme"))
