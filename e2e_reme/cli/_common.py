"""Shared CLI plumbing: consoles, and turning our errors into one clear line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console


def _width(stream) -> int | None:
    # Piped output (CI logs, `| tee`) would otherwise be cut to 80 columns and squash the
    # result tables into unreadable stubs; a terminal or COLUMNS decides where they exist.
    if "COLUMNS" in os.environ or stream.isatty():
        return None
    return 160


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))


def read_config(path: Path | None) -> dict:
    """A YAML config file as a dict ({} for no file); a missing or malformed one is a
    user mistake (ValueError: one line, exit 2)."""
    from e2e_reme.config import read_yaml
    return read_yaml(path, "config", ValueError)


def run_cli(app: typer.Typer) -> None:
    """Run the app. Click handles usage errors and exit codes itself (standalone mode);
    our own errors (a user mistake, a missing capability) become one line and exit 2;
    only real bugs show a traceback."""
    from e2e_reme.cluster.errors import FleetError
    from e2e_reme.host import HostCommandError
    from e2e_reme.simulators.errors import SandboxError
    from e2e_reme.vm_images.errors import ImageError

    try:
        app()
    except (SandboxError, ImageError, HostCommandError, FleetError, ValueError, PermissionError) as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
