"""`remed train collect|data|splits|sft|eval|rl`: expert traces from real episodes (of the
train split), supervised fine-tuning on Ray Train, evaluation by execution on the validation
or test split, and reinforcement fine-tuning from executed playbooks."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._common import console, read_config

app = typer.Typer(no_args_is_help=True)


def _sft_config(config_file: Path | None, top: dict, train: dict, eval_: dict):
    from e2e_reme.train.sft import SFTConfig
    base = read_config(config_file)
    merged = {**base, **{k: v for k, v in top.items() if v is not None}}
    merged["train"] = {**(base.get("train") or {}), **{k: v for k, v in train.items() if v is not None}}
    merged["eval"] = {**(base.get("eval") or {}), **{k: v for k, v in eval_.items() if v is not None}}
    return SFTConfig.from_dict(merged)


@app.command("collect")
def collect(config_file: Path = typer.Option(..., "--config", help="SFT YAML with a collect section."),
            parallel: int = typer.Option(None, "--parallel", "-j", help="Sandboxes side by side.")) -> None:
    """Run the runbook policy on the config's suites (real episodes) for SFT traces; resumable."""
    from dataclasses import replace

    from e2e_reme.train.collect import TracesConfig, collect_traces
    cfg = TracesConfig.from_dict(read_config(config_file).get("collect") or {})
    if parallel:
        cfg = replace(cfg, parallel=parallel)
    plan = cfg.bench_configs()
    console.print(f"{len(plan)} bench run(s) of the runbook policy into {cfg.out}")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[last]}"), console=console) as prog:
        task = prog.add_task("episodes", total=None, last="")
        counts = {"total": 0, "done": 0}

        def on_event(kind, payload):
            if kind == "run":
                prog.console.log(f"{payload.system}/{payload.suite} seed {payload.seed} -> {payload.out}")
            elif kind == "cases":
                todo, done, _ = payload
                counts["total"] += len(todo) + len(done)
                counts["done"] += len(done)
                prog.update(task, total=counts["total"], completed=counts["done"])
            elif kind == "step":
                prog.update(task, last=f"[dim]{payload[1]}")
            elif kind == "episode":
                counts["done"] += 1
                mark = "[green]✓[/]" if payload.outcome == "success" else "[red]✗[/]"
                prog.console.log(f"{mark} {payload.id}: {payload.outcome}")
                prog.update(task, completed=counts["done"])
        results = collect_traces(cfg, on_event=on_event)
    t = Table(title="runbook traces")
    for c in ("run", "cases", "successes", "skipped"):
        t.add_column(c)
    for bc, r in zip(plan, results):
        t.add_row(f"{bc.system}/{bc.suite} s{bc.seed}", str(r["cases"]), str(r["successes"]), str(r["skipped"]))
    console.print(t)


@app.command("data")
def data(config_file: Path = typer.Option(..., "--config", help="SFT YAML."),
         json_out: bool = typer.Option(False, "--json")) -> None:
    """What SFT would train on: traces, held-out records, examples per fault/system/level."""
    from e2e_reme.train.data import DataConfig, build_sft_data
    cfg = DataConfig.from_dict(read_config(config_file).get("data") or {})
    with console.status(f"reading the episodes under {', '.join(cfg.episodes)}, building the examples"):
        d = build_sft_data(cfg).stats()
    if json_out:
        print(json.dumps(d, indent=2, default=str))
        return
    console.print(f"{d['traces']} verified traces -> {d['examples']} examples; {d['held_out_records']} held-out "
                  f"records left out; skipped: {d['skipped']}")
    for k in ("by_fault", "by_system", "by_level"):
        console.print(f"  {k[3:]}: " + ", ".join(f"{a} {b}" for a, b in d[k].items()))


@app.command("splits")
def splits_(config_file: Path = typer.Option(None, "--config", help="An SFT/RL YAML whose data.splits names the "
                                                                   "file [configs/splits.yaml]."),
            json_out: bool = typer.Option(False, "--json")) -> None:
    """Train, validation and test: their systems, services and evaluation cases (configs/splits.yaml)."""
    from e2e_reme.train.splits import describe, load_splits
    path = ((read_config(config_file).get("data") or {}).get("splits") if config_file else None) or None
    d = describe(load_splits(path))
    if json_out:
        print(json.dumps(d, indent=2))
        return
    console.print(f"{d['source']} (definition sha256 {d['definition'][:16]}...): {len(d['trained_faults'])} trained "
                  f"fault types" + (f", excluded {d['excluded_faults']}" if d["excluded_faults"] else ""),
                  highlight=False)
    console.print(f"  train: {d['train']['services']} services of {', '.join(d['train']['systems'])}", highlight=False)
    for name in ("validation", "test"):
        s = d[name]
        console.print(f"  {name}: {s['cases']} cases on {s['distinct_services']} services "
                      f"({', '.join(s['services'])}); whole systems: {', '.join(s['systems']) or 'none'}",
                      highlight=False)


@app.command("sft")
def sft(config_file: Path = typer.Option(..., "--config", help="SFT YAML, e.g. configs/sft-tiny.yaml."),
        out: str = typer.Option(None, "--out", help="Run directory (a rerun resumes it)."),
        model: str = typer.Option(None, "--model", help="A model directory to fine-tune instead of a tiny init."),
        max_steps: int = typer.Option(None, "--max-steps"),
        lm_steps: int = typer.Option(None, "--lm-steps", help="Plain-LM steps first (0 for a pretrained --model)."),
        time_limit: float = typer.Option(None, "--time-limit", help="Stop training after this many seconds."),
        workers: int = typer.Option(None, "--workers", help="Ray Train workers."),
        address: str = typer.Option(None, "--address", help="Ray cluster to join (auto); none: a local Ray."),
        no_eval: bool = typer.Option(False, "--no-eval", help="Train only; `remed train eval` later."),
        eval_limit: int = typer.Option(None, "--eval-limit", help="At most N held-out cases per set.")) -> None:
    """Expert-guided SFT on Ray Train (DDP; gloo on CPU), then held-out evaluation by execution."""
    from e2e_reme.train.sft import run_sft
    cfg = _sft_config(config_file, {"out": out, "model": model},
                      {"max_steps": max_steps, "lm_steps": lm_steps, "time_limit_s": time_limit, "workers": workers,
                       "ray_address": address},
                      {"limit": eval_limit})
    console.print(f"SFT run in {cfg.out}: {cfg.train.workers} worker(s), {cfg.train.max_steps} steps of "
                  f"{cfg.train.batch_size} sequences")
    with _progress() as prog:
        summary = run_sft(cfg, on_event=_printer(prog), evaluate=False if no_eval else None)
    console.print(f"[green]model[/] {summary['model']} (training {summary['train_s']:.0f} s, "
                  f"data+init+tokenise {summary['prep_s']:.0f} s)")
    if "eval" in summary:
        print_eval(summary["eval"])


@app.command("rl", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def rl(ctx: typer.Context,
       config_file: Path = typer.Option(None, "--config", help="RL YAML, e.g. configs/rl-cpu.yaml."),
       overrides: list[str] = typer.Argument(None, help="section.key=value, e.g. steps=3 objective.algorithm=reinforce")
       ) -> None:
    """GRPO (or group-relative REINFORCE) with rewards from executed, verified playbooks; resumable.
    The same run as `python train/rl.py` and `ray job submit -- python train/rl.py`."""
    from e2e_reme.train.errors import NoTrainingData, TrainError
    from e2e_reme.train.rl import run
    from e2e_reme.train.rl_config import load_config
    try:
        cfg = load_config(config_file, overrides or [])
    except TrainError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    with _progress() as prog:
        task = prog.add_task("RL steps", total=cfg.steps, last="")
        try:
            summary = run(cfg, say=prog.console.log,
                          on_step=lambda m: prog.update(task, completed=m["step"], last=f"reward {m['reward']}"))
        except (TrainError, NoTrainingData) as e:
            console.print(f"[red]error:[/] {e}")
            raise typer.Exit(2)
    console.print(f"[green]checkpoint[/] {summary['checkpoint']}; metrics {summary['metrics']}")


@app.command("passk")
def passk(config_file: Path = typer.Option(..., "--config", help="RL YAML, e.g. configs/rl-cpu.yaml."),
          k: int = typer.Option(8, "--k", help="pass@k's k."),
          n: int = typer.Option(None, "--n", help="Samples per case (default k)."),
          max_cases: int = typer.Option(2, "--max-cases", help="Cases per fault type and split."),
          split: list[str] = typer.Option(None, "--split", help="train | validation (repeat for both). [both]")) -> None:
    """Headroom before RL: pass@k at temperature 1 per fault type on the training and validation cases."""
    from e2e_reme.train.errors import NoTrainingData, TrainError
    from e2e_reme.train.passk import run_passk
    from e2e_reme.train.rl_config import load_config
    splits = tuple(split or ("train", "validation"))
    if set(splits) - {"train", "validation"}:
        _fail(f"--split {' '.join(splits)}: use train and/or validation (the test split is run once, by eval)")
    if k < 1 or (n is not None and n < k) or max_cases < 1:
        _fail(f"--k {k}, --n {n}, --max-cases {max_cases}: k and max-cases at least 1, n (samples) at least k")
    try:
        with _progress() as prog:
            task = prog.add_task(f"pass@{k} cases", total=None, last="")

            def on_case(total, g):
                ok = None if g is None else sum(j.reward or 0 for j in g.judgements)
                prog.update(task, total=total, advance=0 if g is None else 1,
                            last="" if g is None else f"{g.id}: {ok:g}/{len(g.judgements)} {g.error or ''}")
            res = run_passk(load_config(config_file), k=k, n=n, splits=splits, max_cases=max_cases,
                            say=prog.console.log, on_case=on_case)
    except (TrainError, NoTrainingData) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    table = Table("split", "fault", "cases", "samples", "successes", "pass@1", f"pass@{k}")
    for split, faults in res["table"].items():
        for fault, t in sorted(faults.items()):
            table.add_row(split, fault, str(t["cases"]), str(t["samples"]), str(t["successes"]),
                          *(f"{t[x]:.2f}" if t[x] is not None else "-" for x in ("pass@1", f"pass@{k}")))
    console.print(table)
    console.print(json.dumps(res["table"]))


@app.command("eval")
def eval_(model: Path = typer.Option(None, "--model", help="The model directory or release (releases/<name>) "
                                                          "to judge."),
          policy: str = typer.Option(None, "--policy",
                                     help="Judge a built-in policy instead: runbook (the reference)."),
          config_file: Path = typer.Option(..., "--config", help="SFT YAML (its data.splits and eval sections)."),
          split: str = typer.Option(None, "--split", help="validation (every development decision) | test (once "
                                                          "per release). [the config's eval.split: validation]"),
          fault: list[str] = typer.Option(None, "--fault", help="Only this fault type (repeat for more)."),
          out: Path = typer.Option(None, "--out", help="Results directory. [<model>/../eval-<split> | "
                                                      "runs/eval-<release or policy>-<split>]"),
          limit: int = typer.Option(None, "--limit", help="At most N cases per set."),
          shots: int = typer.Option(None, "--shots", help="Few-shot: show N verified train-split expert answers "
                                                         "first (the config's eval.shots_from). [eval.shots: 0]"),
          parallel: int = typer.Option(None, "--parallel", "-j", help="Sandboxes side by side; their answers are "
                                                                      "generated as one batch. [eval.parallel: 4]"),
          json_out: bool = typer.Option(False, "--json")) -> None:
    """Execution success of a model, a release (or the runbook) on a split's cases: real episodes, per fault type
    and failure stage."""
    import shlex
    import sys

    from e2e_reme.train.evaluate import run_eval
    from e2e_reme.train.release import is_release
    if (model is None) == (policy is None):
        _fail("name one thing to judge: --model DIR, or --policy runbook")
    if policy not in (None, "runbook"):
        _fail(f"--policy {policy}: only the runbook is judged without a model (a model-backed policy takes --model)")
    if split not in (None, "validation", "test"):
        _fail(f"--split {split}: use validation or test (the train split is never evaluated on)")
    if shots is not None and (shots < 0 or policy):
        _fail(f"--shots {shots}: a number >= 0, for a model (--model), not a built-in policy")
    if parallel is not None and parallel < 1:
        _fail(f"--parallel {parallel}: at least 1 sandbox")
    cfg = _sft_config(config_file, {}, {}, {"limit": limit, "split": split, "faults": fault or None, "shots": shots,
                                           "parallel": parallel})
    judged = None
    if policy:
        from e2e_reme.simulators.policies.base import make_policy
        judged = make_policy(policy)
    name = model.resolve().name if model is not None else policy
    tag = f"{cfg.eval.split}-{cfg.eval.shots}shot" if cfg.eval.shots else cfg.eval.split
    out = out or (model.resolve().parent / f"eval-{tag}" if model is not None and not is_release(model)
                  else Path(f"runs/eval-{name}-{tag}"))
    with _progress() as prog:
        try:
            results = run_eval(model, cfg.eval, cfg.data.splits or None, out, policy=judged,
                               on_event=None if json_out else _printer(prog),
                               command=shlex.join(["remed", *sys.argv[1:]]))
        except ValueError as e:       # TrainError included: a user mistake, one line
            _fail(str(e))
    if json_out:
        print(json.dumps(results, indent=2))
        return
    print_eval(results)


@app.command("compare")
def compare(evals: list[str] = typer.Argument(..., help="LABEL=DIR: results of `remed train eval` (or a "
                                                      "release's evals/<label>.jsonl.gz), each on the same "
                                                      "held-out cases."),
            out: Path = typer.Option(Path("runs/eval-compare"), "--out", help="Where the table's JSON and chart go."),
            common: bool = typer.Option(False, "--common", help="Compare only the cases all of them judged."),
            reference: str = typer.Option(None, "--reference", help="The label the paired test compares each "
                                                                   "other one with. [the first]"),
            json_out: bool = typer.Option(False, "--json")) -> None:
    """Held-out evaluations side by side: success per fault type with 95 % intervals, one chart."""
    from e2e_reme.train.errors import TrainError
    from e2e_reme.train.evaluate import compare as compare_evals
    named = {}
    for item in evals:
        label, sep, d = item.partition("=")
        if not sep or not label or not d:
            _fail(f"{item!r}: write each evaluation as LABEL=DIR, e.g. sft=runs/sft-cpu/eval")
        named[label] = Path(d)
    try:
        results = compare_evals(named, out, common=common, reference=reference)
    except TrainError as e:
        _fail(str(e))
    if json_out:
        print(json.dumps(results, indent=2))
        return
    print_compare(results)


def _fail(message: str) -> None:
    console.print(f"[red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[last]}"), console=console)


def _printer(prog: Progress):
    """Events of a run as log lines, and progress bars for training steps and held-out cases."""
    log = prog.console.log
    tasks: dict[str, int] = {}

    def on_event(kind, payload):
        if kind == "data":
            log(f"data: {payload['traces']} verified traces -> {payload['examples']} examples "
                f"({payload['held_out_records']} held-out records left out)")
        elif kind == "init":
            log(f"initialising the tiny model (tokenizer trained on the training split) in {payload}")
        elif kind == "tokens":
            log(f"tokenised: {payload}")
        elif kind == "resume":
            log(f"resuming from {payload}")
        elif kind == "fit":
            log(f"Ray Train: {payload['workers']} worker(s), {'GPU' if payload['gpu'] else 'CPU (gloo)'}")
            tasks["train"] = prog.add_task("training", total=payload["max_steps"], completed=payload["start_step"],
                                           last="")
        elif kind == "step" and "train" in tasks:
            prog.update(tasks["train"], completed=payload["step"],
                        last=f"loss {payload['loss']:.4f}  {payload['tokens_per_s']:.0f} tok/s")
        elif kind == "trained":
            log(f"model exported to {payload['model']}")
        elif kind == "eval_cases":
            log(f"evaluation: {payload['total']} cases ({payload['todo']} to run, "
                f"{payload['skipped']} skipped here)")
            tasks["eval"] = prog.add_task("held-out episodes", total=payload["total"],
                                          completed=payload["total"] - payload["todo"], last="")
        elif kind == "eval_slot":
            log(payload)
        elif kind == "eval_step" and "eval" in tasks:
            prog.update(tasks["eval"], last=f"[dim]{payload}")
        elif kind == "eval_episode":
            mark = "[green]✓[/]" if payload["outcome"] == "success" else "[red]✗[/]"
            log(f"{mark} {payload['id']}: {payload['outcome']}"
                + (f" at {payload['stage']}: {str(payload['reason'])[:100]}" if payload["outcome"] != "success" else ""))
            if "eval" in tasks:
                prog.advance(tasks["eval"])
    return on_event


def print_compare(results: dict) -> None:
    pols = results["policies"]
    common = " (the cases all of them judged)" if results["common_only"] else ""
    t = Table(title=f"held-out execution success, {results['cases']} cases{common}, side by side")
    t.add_column("fault")
    for label in pols:
        t.add_column(label, justify="right")

    def cell(g):
        if not g:
            return "-"
        return f"{g['successes']}/{g['cases']} {g['success_rate']:.0%} [{g['ci95'][0]:.0%}, {g['ci95'][1]:.0%}]"
    faults = list(dict.fromkeys(f for p in pols.values() for f in p["per_fault"]))
    for f in faults:
        t.add_row(f, *(cell(p["per_fault"].get(f)) for p in pols.values()))
    for s in dict.fromkeys(x for p in pols.values() for x in p["per_set"]):
        t.add_row(s, *(cell(p["per_set"].get(s)) for p in pols.values()))
    t.add_row("all", *(cell(p["overall"]) for p in pols.values()), style="bold")
    console.print(t)
    ref = results.get("reference")
    if results.get("paired"):
        pt = Table(title=f"paired on the same cases: {ref} against each (McNemar, exact, two-sided)")
        for c in ("against", "cases", f"only {ref} fixed", "only it fixed", "both", "neither", "p"):
            pt.add_column(c, justify="right")
        for label, m in results["paired"].items():
            pt.add_row(label, str(m["cases"]), str(m["a_only"]), str(m["b_only"]), str(m["both"]), str(m["neither"]),
                       f"{m['p_value']:.3g}")
        console.print(pt)
    if results.get("chart"):
        console.print(f"chart: {results['chart']}")


def print_eval(results: dict) -> None:
    t = Table(title=f"execution success on the {results.get('split')} split")
    for c, j in (("set", "left"), ("fault", "left"), ("cases", "right"), ("success", "right"),
                 ("rate [95% CI]", "right"), ("failures stopped at", "left"), ("tokens/case", "right")):
        t.add_column(c, justify=j)

    def row(s, f, g, style=""):
        toks = (f"{g['prompt_tokens_per_case']:.0f}+{g['completion_tokens_per_case']:.0f}"
                if g["prompt_tokens_per_case"] is not None else "-")
        t.add_row(s, f, str(g["cases"]), str(g["successes"]),
                  f"{g['success_rate']:.0%} [{g['ci95'][0]:.0%}, {g['ci95'][1]:.0%}]",
                  ", ".join(f"{k} {v}" for k, v in g["failure_stages"].items()) or "-", toks, style=style)

    for s, faults in results["per_set_fault"].items():
        for f, g in faults.items():
            row(s, f, g)
        row(s, "all", results["per_set"][s], style="bold")
    for f, g in results["per_fault"].items():
        row("all", f, g)
    row("all", "all", results["overall"], style="bold")
    console.print(t)
    if results.get("chart"):
        console.print(f"chart: {results['chart']}")
