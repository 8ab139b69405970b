"""Shared CLI plumbing: consoles, and turning our errors into one clear line."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def run_cli(app: typer.Typer) -> None:
    """Run the app. Click handles usage errors and exit codes itself (standalone mode);
    our own errors (a user mistake, a missing capability) become one line and exit 2;
    only real bugs show a traceback."""
    from e2e_reme.host import HostCommandError
    from e2e_reme.simulators.errors import SandboxError
    from e2e_reme.vm_images.errors import ImageError

    try:
        app()
    except (SandboxError, ImageError, HostCommandError, ValueError, PermissionError) as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
