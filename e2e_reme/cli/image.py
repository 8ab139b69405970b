"""`remed image build|info`."""

from __future__ import annotations

import json
import time

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from e2e_reme.vm_images import Recipe, build_image, find_image, list_images, prune_images
from e2e_reme.vm_images.builder import images_dir

from ._common import console

app = typer.Typer(no_args_is_help=True)

STEPS = ["debootstrap", "configure", "kernel", "disk", "manifest"]


@app.command()
def build(force: bool = typer.Option(False, "--force", help="Rebuild even if the image is cached.")) -> None:
    """Build the guest image for the current recipe (cached by the recipe's hash)."""
    recipe = Recipe.load()
    t0 = time.monotonic()
    if not force and (img := find_image(recipe)):
        console.print(f"image {img.hash} is cached at {img.dir} ({time.monotonic() - t0:.2f} s)")
        return
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[step]:<12}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("", total=len(STEPS), step="starting")

        def progress(step: str, detail: str) -> None:
            if step in STEPS:
                bar.update(task, completed=STEPS.index(step), step=step, description=detail)

        img = build_image(recipe, force=force, progress=progress)
        bar.update(task, completed=len(STEPS), step="done", description=str(img.dir))
    console.print(f"built image {img.hash} in {img.manifest['build_seconds']} s: {img.dir}")


@app.command()
def info(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show the image for the current recipe and every cached image."""
    recipe = Recipe.load()
    current = recipe.digest()
    images = list_images()
    if json_out:
        console.print_json(json.dumps({
            "recipe": str(recipe.path), "current_hash": current, "cache": str(images_dir()),
            "built": find_image(recipe) is not None,
            "images": [{k: v for k, v in i.manifest.items() if k != "packages"} | {"dir": str(i.dir)}
                       for i in images]}))
        return
    console.print(f"recipe {recipe.path} → hash [bold]{current}[/]; cache {images_dir()}")
    t = Table("hash", "current", "built at", "build s", "rootfs MB", "qcow2 MB", "kernel", "packages")
    for i in images:
        m = i.manifest
        t.add_row(i.hash, "yes" if i.hash == current else "", m["built_at"], str(m["build_seconds"]),
                  f"{m['rootfs_bytes'] / 1e6:.0f}", f"{m['disk_bytes'] / 1e6:.0f}", m["kernel_version"],
                  str(len(m["packages"])))
    console.print(t)
    if not any(i.hash == current for i in images):
        console.print("[yellow]no image for the current recipe yet: run `remed image build`[/]")


@app.command()
def prune() -> None:
    """Delete cached images of older recipes that no live sandbox uses."""
    from e2e_reme.simulators import list_sandboxes
    keep = {r.image_hash for r in list_sandboxes()}
    removed = prune_images(keep)
    for d in removed:
        console.print(f"removed {d}")
    console.print(f"pruned {len(removed)} image(s); kept the current one"
                  + (f" and {len(keep)} in use" if keep else ""))
