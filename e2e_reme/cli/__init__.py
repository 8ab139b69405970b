"""`remed`: the one command-line interface. Each command group lives in a module of its
own here and is only a thin layer over the stage packages."""

from __future__ import annotations

import signal

from e2e_reme.host import passive_thread_waits

passive_thread_waits()      # before any command imports torch (e2e_reme/host.py says why)

import typer  # noqa: E402

from ._common import console, err_console, run_cli  # noqa: E402

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="E2E-REME: real sandboxes, real faults, verified remediation playbooks.")


def _register() -> None:
    from . import bench, doctor, fault, fleet, image, sandbox, system, verify
    from . import model, release, train
    from . import lab, review, serve
    app.command("doctor", help="What this host can do: backends and fault mechanisms.")(doctor.doctor)
    app.add_typer(image.app, name="image", help="Build and inspect the guest image.")
    app.add_typer(sandbox.app, name="sandbox", help="Create, use and remove sandboxes.")
    app.add_typer(system.app, name="system", help="Microservice systems: list, deploy, status, load.")
    app.add_typer(fault.app, name="fault", help="Fault catalog: list, inject, status, describe, recover.")
    app.command("verify", help="Judge a sandbox against its baseline: exit 0 success, 1 failure, 2 not judged.")(verify.verify)
    app.command("bench", help="Benchmark a policy on a MicroRemed suite of real faults.")(bench.bench)
    app.add_typer(fleet.app, name="fleet", help="Ray fleet: collect verified experience on every sandbox host.")
    app.add_typer(model.app, name="model", help="Policy models: init a tiny one, inspect, generate.")
    app.add_typer(train.app, name="train", help="Expert traces, SFT on Ray Train, evaluation by execution.")
    app.add_typer(release.app, name="release", help="Model releases: pack a trained adapter, check, record evaluations.")
    app.add_typer(lab.app, name="lab", help="The bare-metal lab: Terraform provisions hosts into one Ray cluster.")
    app.command("serve", help="Serve the model on Ray Serve: /v1/remediate and an OpenAI-compatible API.")(serve.serve)
    app.add_typer(review.app, name="review", help="Operator review decisions: list, show, export as training data.")


_register()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so `finally` blocks clean up.
    signal.signal(signal.SIGTERM, _interrupt)
    run_cli(app)


__all__ = ["app", "main", "console", "err_console"]
