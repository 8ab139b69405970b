"""`remed serve --model DIR [--config configs/serve.yaml]`: the model online on Ray Serve
(serve/): /v1/remediate, the OpenAI-compatible /v1/chat/completions and /v1/models,
/healthz and /metrics, until Ctrl-C. Flags override the config file; see docs/serve.md."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from ._common import console, read_config


def serve(model: Optional[str] = typer.Option(None, "--model", "-m",
                                               help="Local model directory (or a LoRA adapter directory)."),
          config: Optional[Path] = typer.Option(None, "--config", "-c", help="Serve config YAML (configs/serve.yaml)."),
          host: Optional[str] = typer.Option(None, "--host", help="Address to listen on. [127.0.0.1]"),
          port: Optional[int] = typer.Option(None, "--port", help="HTTP port. [8000]"),
          allowed_host: Optional[List[str]] = typer.Option(
              None, "--allowed-host", help="Host header a client may send (NAME or NAME:PORT; repeat). "
                                           "[the address listened on]"),
          engine: Optional[str] = typer.Option(None, "--engine", help="auto | transformers | vllm. [auto]"),
          replicas: Optional[int] = typer.Option(None, "--replicas", help="Replicas (without autoscaling). [1]"),
          max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size",
                                                       help="Dynamic batching: prompts per batch (1: off). [8]"),
          token_file: Optional[Path] = typer.Option(None, "--token-file",
                                                    help="File holding the execute-mode bearer token "
                                                         "(else $REMED_SERVE_TOKEN; neither: execute disabled)."),
          sandbox: Optional[List[str]] = typer.Option(None, "--sandbox",
                                                      help="Sandbox names (fnmatch patterns) execute may use. [none]"),
          address: Optional[str] = typer.Option(None, "--address",
                                                help="A Ray cluster to join (e.g. auto); default: a local Ray."),
          metrics_port: Optional[int] = typer.Option(None, "--metrics-port",
                                                     help="Ray's Prometheus export port (local Ray only).")) -> None:
    """Serve the model: remediation playbooks and an OpenAI-compatible API on Ray Serve."""
    from e2e_reme.serve.config import ServeConfig
    from e2e_reme.serve.launch import Server

    d = read_config(config)               # relative paths: from where the command runs, as elsewhere
    flags = {"model": model, "host": host, "port": port, "engine": engine, "num_replicas": replicas,
             "allowed_hosts": list(allowed_host) if allowed_host else None,
             "max_batch_size": max_batch_size, "token_file": str(token_file) if token_file else None,
             "sandboxes": list(sandbox) if sandbox else None, "metrics_port": metrics_port}
    d.update({k: v for k, v in flags.items() if v is not None})
    cfg = ServeConfig.from_mapping(d).with_token()
    if not cfg.model:
        raise ValueError("no model given: pass --model DIR (a local Hugging Face model directory, e.g. "
                         "runs/models/gemma3-270m from `remed model import`) or set model in --config")
    srv = Server(cfg, address=address, say=lambda s: console.print(f"[dim]{s}[/]"))
    try:
        with console.status("starting Ray Serve and loading the model …"):
            srv.start()
        console.print(f"serving [bold]{Path(srv.cfg.model).name}[/] at {srv.url}  "
                      f"(OpenAI base URL {srv.url}/v1; execute mode "
                      + ("[green]enabled[/] for sandboxes " + (", ".join(cfg.sandboxes) or "none (pass --sandbox PATTERN)")
                         if cfg.execute_enabled
                         else "[yellow]disabled[/]: no token configured") + ")")
        console.print("Ctrl-C to stop")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        srv.stop()
