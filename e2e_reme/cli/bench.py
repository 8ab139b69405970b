"""`remed bench`: run a MicroRemed suite with a policy on local sandboxes and print the
table; results.json, episodes.jsonl and success.png land in --out. Rerun the same command
to resume an interrupted run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._common import console, read_config


def _config(config_file: Path | None, cli: dict, episode: dict, policy_options: dict):
    """YAML first, then every flag the user gave on top of it."""
    from e2e_reme.simulators.benchmark import BenchConfig
    base = read_config(config_file)
    merged = {**base, **{k: v for k, v in cli.items() if v is not None}}
    ep = {**(base.get("episode") or {}), **{k: v for k, v in episode.items() if v is not None}}
    merged["episode"] = ep
    opts = {**(base.get("policy_options") or {}), **{k: v for k, v in policy_options.items() if v is not None}}
    merged["policy_options"] = opts
    return BenchConfig.from_dict(merged)


def bench(system: str = typer.Option(None, "--system", help="System to deploy (remed system ls). [simple-micro]"),
          suite: str = typer.Option(None, "--suite", help="easy | medium | hard | a per-fault suite | FILE. [easy]"),
          policy: str = typer.Option(None, "--policy", help="runbook | solo | think. [runbook]"),
          model: str = typer.Option(None, "--model", help="Model name at --base-url, a local model directory, or "
                                                         "a release (releases/<name>)."),
          base_url: str = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint, e.g. http://host:8000/v1."),
          api_key_env: str = typer.Option(None, "--api-key-env",
                                          help="Environment variable holding the API key (default OPENAI_API_KEY)."),
          max_trials: int = typer.Option(None, "--max-trials", help="think: trial budget."),
          temperature: float = typer.Option(None, "--temperature"),
          backend: str = typer.Option(None, "--backend",
                                      help="nspawn | libvirt | both, as nspawn,libvirt: a case runs on the first "
                                           "that provides its fault here. [nspawn]"),
          parallel: int = typer.Option(None, "--parallel", "-j", help="Sandboxes run side by side. [1]"),
          seed: int = typer.Option(None, "--seed", help="Seeds the target of each case. [0]"),
          out: Path = typer.Option(None, "--out", help="Results directory. [runs/bench]"),
          limit: int = typer.Option(None, "--limit", help="Only the first N cases of the suite."),
          report_detail: str = typer.Option(None, "--report-detail", help="full | symptoms | minimal. [full]"),
          report_noise: float = typer.Option(None, "--report-noise",
                                             help="Fraction of reports with a wrong service or kind. [0]"),
          idempotence: bool = typer.Option(None, "--idempotence/--no-idempotence",
                                           help="Run each playbook twice to check it is idempotent."),
          no_load: bool = typer.Option(False, "--no-load", help="Judge without the SLO load window (faster, weaker)."),
          config_file: Path = typer.Option(None, "--config", help="YAML with any of these settings."),
          json_out: bool = typer.Option(False, "--json", help="Print results.json instead of the table.")) -> None:
    """Benchmark a policy on a suite of real faults; every verdict comes from executing."""
    if report_noise is not None and not 0 <= report_noise <= 1:
        raise ValueError(f"--report-noise {report_noise}: use a fraction between 0 and 1")
    if api_key_env and not os.environ.get(api_key_env):
        raise ValueError(f"--api-key-env {api_key_env}: that environment variable is empty")
    from e2e_reme.train.release import is_release, model_dir
    if not base_url and is_release(model):
        model = str(model_dir(model))       # a release: its base + adapter, checked, as a model directory
    cfg = _config(config_file,
                  {"system": system, "suite": suite, "policy": policy, "backend": backend, "parallel": parallel,
                   "seed": seed, "out": str(out) if out else None, "limit": limit},
                  {"report_detail": report_detail, "report_noise": report_noise,
                   "check_idempotence": idempotence, "verify_load": False if no_load else None},
                  {"model": model, "base_url": base_url, "api_key_env": api_key_env, "max_trials": max_trials,
                   "temperature": temperature})
    if cfg.episode.report_detail not in ("full", "symptoms", "minimal"):
        raise ValueError(f"--report-detail {cfg.episode.report_detail}: use full, symptoms or minimal")

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[last]}"), console=console,
                  transient=False) as prog:
        task = prog.add_task(f"{cfg.policy} on {cfg.system}/{cfg.suite}", total=None, last="")
        wins = {"n": 0}

        def on_event(kind: str, payload) -> None:
            if kind == "cases":
                todo, done, skipped = payload
                wins["n"] = sum(r["outcome"] == "success" for r in done)
                prog.update(task, total=len(todo) + len(done), completed=len(done),
                            last=f"{len(done)} done before, {len(skipped)} skipped")
            elif kind == "slot":
                prog.console.log(payload)
            elif kind == "step":
                prog.update(task, last=f"[dim]{payload[1]}")
            elif kind == "episode":
                wins["n"] += payload.outcome == "success"
                mark = {"success": "[green]✓[/]", "failure": "[red]✗[/]"}.get(payload.outcome, "[yellow]![/]")
                prog.console.log(f"{mark} {payload.id}: {payload.outcome}"
                                 + (f" at {payload.stage}: {payload.reason[:100]}" if payload.outcome != "success" else "")
                                 + f" ({payload.timings.get('total', 0):.1f} s)")
                prog.update(task, advance=1, last=f"{wins['n']} successes")

        from e2e_reme.simulators.benchmark import run_bench
        results = run_bench(cfg, on_event=on_event)

    if json_out:
        print(json.dumps(results, indent=2))
        return
    print_results(results, Path(cfg.out))


def print_results(results: dict, out: Path) -> None:
    t = Table(title=f"{results['policy']} on {results['system']} / {results['suite']} "
                    f"({results['backend']}, report {results['report_detail']}, seed {results['seed']})")
    for c, j in (("fault", "left"), ("cases", "right"), ("inj. fail", "right"), ("skipped", "right"),
                 ("success", "right"), ("rate [95% CI]", "right"), ("attempts/succ.", "right"),
                 ("mean s", "right"), ("median s", "right"), ("tokens/case", "right")):
        # In a narrow terminal the headers wrap; the fault names and rates stay whole.
        t.add_column(c, justify=j, no_wrap=c in ("fault", "rate [95% CI]"))

    def row(name: str, s: dict, style: str = "") -> None:
        t.add_row(name, str(s["cases"]), str(s["injection_failures"]), str(s["skipped"]), str(s["successes"]),
                  f"{s['success_rate']:.0%} [{s['ci95'][0]:.0%}, {s['ci95'][1]:.0%}]" if s["cases"] else "-",
                  f"{s['attempts_per_success']:.2f}" if s["attempts_per_success"] else "-",
                  f"{s['mean_time_s']:.1f}" if s["mean_time_s"] is not None else "-",
                  f"{s['median_time_s']:.1f}" if s["median_time_s"] is not None else "-",
                  f"{s['tokens_per_case']:.0f}" if s["tokens_per_case"] is not None else "-", style=style)

    for f, s in results["per_fault"].items():
        row(f, s)
    row("overall", results, style="bold")
    console.print(t)
    for s in results["skipped_cases"][:3]:
        console.print(f"[yellow]skipped[/] case {s['index']} ({s['fault']}): {s['reason']}")
    if len(results["skipped_cases"]) > 3:
        console.print(f"[yellow]skipped[/] {len(results['skipped_cases']) - 3} more (see results.json)")
    if results.get("cases_per_backend"):
        console.print("cases per backend: " + ", ".join(f"{b} {n}" for b, n in results["cases_per_backend"].items()))
    if results["infra_failures"]:
        console.print(f"[yellow]{results['infra_failures']} infrastructure failure(s)[/] are left out of the rate")
    console.print(f"results: {out / 'results.json'}  episodes: {out / 'episodes.jsonl'}"
                  + (f"  chart: {results['chart']}" if results.get("chart") else ""))
