"""`remed release pack|check|add-eval`: a trained model as a release directory (a LoRA
adapter, its manifest, the base's terms, a model card) that every command taking a model
accepts (train/release.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ._common import console

app = typer.Typer(no_args_is_help=True)


@app.command("pack")
def pack(model: Path = typer.Option(..., "--model", help="The SFT output to release: <run>/model (or a checkpoint "
                                                         "of the run, with --run), trained with LoRA; or a "
                                                         "checkpoint of an RL run that started from a release "
                                                         "(<out>/checkpoint_<N>)."),
         out: Path = typer.Option(..., "--out", help="The release directory, releases/<name>."),
         config_file: Path = typer.Option(None, "--config", help="The YAML that trained it (checked against the "
                                                                "run's config.json; the manifest's commands name it)."),
         run: Path = typer.Option(None, "--run", help="The SFT run directory, where the model does not name it."),
         evals: list[Path] = typer.Option(None, "--eval", help="A `remed train eval` results directory to record "
                                                               "(repeat for more)."),
         command: list[str] = typer.Option(None, "--command", help="A command that makes the release again "
                                                                  "(repeat; default: import, collect, sft, pack)."),
         force: bool = typer.Option(False, "--force", help="Replace an existing release directory.")) -> None:
    """Pack an SFT output (or an RL checkpoint) as a release: adapter + manifest (base, hashes, config, traces or
    run, commit, evaluations)."""
    from e2e_reme.train.release import pack as do_pack, read_manifest
    with console.status("packing") as status:
        path = do_pack(model, out, run=run, config=config_file, evals=evals or (), commands=command or (),
                       force=force, progress=lambda s: status.update(s))
    m = read_manifest(path)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    b = m["base"]
    console.print(f"[green]release[/] {path}: {len(m['files'])} files, {size / 2 ** 20:.2f} MB; base "
                  f"{b.get('package') or b.get('source')} (weights {b['weights_sha256'][:16]}...)", highlight=False)


@app.command("check")
def check(release: Path = typer.Argument(..., help="A release directory, releases/<name>."),
          json_out: bool = typer.Option(False, "--json")) -> None:
    """Check a release against its manifest and load it once (the base imported, the adapter merged, cached)."""
    from e2e_reme.train.release import materialize, read_manifest
    with console.status(f"checking {release}") as status:
        path = materialize(release, progress=lambda s: status.update(s))
    m = read_manifest(release)
    summary = {"release": str(release), "name": m["name"], "model_dir": str(path), "base": m["base"],
               "evaluations": {k: e["overall"] for k, e in (m.get("evaluations") or {}).items()}}
    if json_out:
        print(json.dumps(summary, indent=2))
        return
    console.print(f"[green]ok[/] {release}: every file matches its manifest; base and adapter loaded as {path}",
                  highlight=False)
    for k, o in summary["evaluations"].items():
        console.print(f"  {k}: {o['successes']}/{o['cases']} ({o['success_rate']:.0%})", highlight=False)


@app.command("add-eval")
def add_eval(release: Path = typer.Argument(..., help="A release directory, releases/<name>."),
             results: Path = typer.Argument(..., help="A `remed train eval --model releases/<name>` results "
                                                      "directory."),
             label: str = typer.Option(None, "--label", help="Its name in the manifest. [its split]")) -> None:
    """Record an evaluation in the release: results and command in the manifest, records under evals/, the card."""
    from e2e_reme.train.release import add_eval as do_add
    e = do_add(release, results, label)
    o = e["overall"]
    console.print(f"[green]recorded[/] {e['split']}: {o['successes']}/{o['cases']} ({o['success_rate']:.0%}) "
                  f"-> {release / e['records']}", highlight=False)
