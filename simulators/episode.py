"""One remediation episode, end to end, on a sandbox that holds a deployed system:

    reset → confirm the deployment is healthy, record the baseline → inject → confirm the
    fault is active → diagnosis report → policy → playbook → safety gate → syntax check →
    execute (ansible-runner) → [multi-trial policies: weak feedback, try again] → settle →
    verify → record

    rec = run_episode(sb, deployment, Scenario("simple-micro", "cpu-stress", "time-service", seed=3),
                      make_policy("runbook"), out_dir=Path("runs/x/episodes"))
    rec.outcome          # "success" | "failure" | "injection_failure" | "infra_failure"
    rec.stage            # where it stopped: "done", or "inject", "extract", "gate", "execute", ...

Outcomes are data: a policy that writes prose, a playbook the gate refuses, a hanging task,
a model server that answers 500 all become a record with the stage and the reason. Only a
sandbox that stops answering is an *infrastructure* failure (never a policy's fault), and a
fault that cannot be injected or confirmed is an *injection* failure: both are counted by
the benchmark, never dropped.

Each episode writes `out_dir/<id>/` (report.json, prompts and raw outputs, the playbook and
ansible events of every trial, verdict.json, record.json) and returns an `EpisodeRecord`,
whose `to_dict()` is one line of episodes.jsonl: everything needed to reproduce the case
and to train on it (schema `SCHEMA_VERSION`).

The injected fault is always recovered, or the sandbox reset, in a `finally`.
"""

from __future__ import annotations

import json
import random
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .errors import FaultError, SandboxError
from .execution import ExecutionOutcome, run_pipeline
from .faults import forget_faults, make_fault, recover_all
from .faults.base import get_fault
from .policies.base import Policy, PolicyContext, TrialFeedback
from .reports import add_noise, build_report
from .sandbox import Sandbox
from .systems.deploy import Deployment, health_all, wait_healthy
from .verifier import take_baseline, verify

SCHEMA_VERSION = 1
OUTCOMES = ("success", "failure", "injection_failure", "infra_failure")


@dataclass(frozen=True)
class Scenario:
    """One case: everything that decides what is broken. The same scenario on a freshly
    reset sandbox gives the same starting state."""

    system: str
    fault: str
    target: str
    seed: int = 0
    params: dict = field(default_factory=dict)
    index: int = 0                    # position in its suite

    @property
    def id(self) -> str:
        return f"{self.index:04d}-{self.fault.replace(':', '_').replace('+', '_')}-{self.target}-s{self.seed}"


@dataclass(frozen=True)
class EpisodeConfig:
    report_detail: str = "full"       # full | symptoms | minimal
    report_noise: float = 0.0         # probability of a wrong service or kind in the report
    report_window_s: float = 3.0
    confirm_timeout_s: float = 20.0   # until the fault's ground truth reads active
    exec_timeout_s: float = 120.0
    settle_timeout_s: float = 30.0    # readiness after the playbook, before judging
    check_idempotence: bool = False
    verify_load: bool = True          # the SLO window under load (the verifier's slo check)
    probes: bool = True               # offer the read-only probe tool to policies that use it


@dataclass
class EpisodeRecord:
    id: str
    scenario: dict
    policy: str
    outcome: str = "failure"
    stage: str = "reset"
    error_class: str | None = None
    reason: str = ""
    backend: str = ""
    sandbox: str = ""
    config: dict = field(default_factory=dict)
    report: dict | None = None
    report_text: str = ""
    noise: dict | None = None
    trials: list[dict] = field(default_factory=list)     # per trial: generation + execution
    playbook: str | None = None                          # the last trial's extracted playbook
    verdict: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int | None] = field(default_factory=lambda: {"prompt": 0, "completion": 0})
    started_at: float = 0.0
    finished_at: float = 0.0
    attempts: int = 1                                    # 2: an infrastructure failure was retried
    schema: int = SCHEMA_VERSION

    @property
    def success(self) -> bool:
        return self.outcome == "success"

    def to_dict(self) -> dict:
        return asdict(self)


class _Clock:
    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    def __call__(self, phase: str):
        clock = self

        class _Phase:
            def __enter__(self):
                self.t = time.monotonic()

            def __exit__(self, *exc):
                clock.timings[phase] = round(clock.timings.get(phase, 0.0) + time.monotonic() - self.t, 3)
        return _Phase()


def weak_health(sb: Sandbox, deployment: Deployment, window_s: float = 2.0) -> dict:
    """What a multi-trial policy is told after a trial: each service's health probe and the
    error rate of a short burst through the entry. Deliberately weaker than the verifier
    (no fault ground truth, no integrity, no seed data, no SLO window)."""
    from .systems.loadgen import run_load
    probes = health_all(deployment.targets, timeout=2.0)
    load = run_load(deployment, window_s=window_s, timeout_s=3.0)
    services = {n: ("healthy" if p.ok else f"unhealthy ({p.detail[:80]})") for n, p in probes.items()}
    error_rate = round(1 - load.success_rate, 3)
    return {"ok": all(p.ok for p in probes.values()) and error_rate <= 0.05,
            "services": services, "error_rate": error_rate, "p95_ms": round(load.p95_ms, 1)}


def _settle(sb: Sandbox, deployment: Deployment, fault, timeout_s: float) -> float:
    """Wait (by readiness probe, not a fixed sleep) until every service answers its health
    check, or the timeout: a restarted service needs a moment; a broken one is judged as is.
    Waiting stops early once the verdict cannot change: the fault still active and nothing
    pending on any node (no systemd job queued, no unit starting, stopping or restarting).
    The playbook's own leftovers were ended after it ran, so nothing else is left to act."""
    t0 = time.monotonic()
    look_at = t0 + 2.0
    while time.monotonic() - t0 < timeout_s:
        if all(p.ok for p in health_all(deployment.targets, timeout=1.0).values()):
            break
        if time.monotonic() >= look_at:
            if _nothing_pending(sb) and fault.is_active(sb):
                break
            look_at = time.monotonic() + 2.0
        time.sleep(0.2)
    return time.monotonic() - t0


def _nothing_pending(sb: Sandbox) -> bool:
    look = ("systemctl list-jobs --no-legend --no-pager && systemctl list-units --all --no-legend "
            "--no-pager --plain --state=activating,deactivating,reloading")
    for i in range(len(sb.nodes)):
        r = sb.exec(look, node=i, timeout=10)
        if not r.ok or r.stdout.strip():
            return False
    return True


def run_episode(sb: Sandbox, deployment: Deployment, scenario: Scenario, policy: Policy, *,
                out_dir: Path, config: EpisodeConfig = EpisodeConfig(),
                progress: Callable[[str], None] | None = None, episode_id: str | None = None) -> EpisodeRecord:
    """Run one episode and write its directory under `out_dir`. `episode_id` (default: the
    scenario's id) names the record and its directory, for runs of one scenario several
    times (a group of sampled completions, each a policies.FixedPolicy)."""
    episode_id = episode_id or scenario.id
    edir = Path(out_dir) / episode_id
    edir.mkdir(parents=True, exist_ok=True)
    rec = EpisodeRecord(id=episode_id, scenario=asdict(scenario), policy=getattr(policy, "name", str(policy)),
                        backend=sb.backend, sandbox=sb.name, config=asdict(config), started_at=time.time())
    clock = _Clock(rec.timings)
    step = progress or (lambda s: None)
    try:
        _episode(sb, deployment, scenario, policy, config, rec, edir, clock, step)
    except SandboxError as e:
        rec.outcome, rec.error_class, rec.reason = "infra_failure", type(e).__name__, str(e)
    except KeyboardInterrupt:
        rec.outcome, rec.error_class, rec.reason = "infra_failure", "Interrupted", "interrupted"
        raise
    except Exception as e:  # a bug of ours must not be counted as the policy's failure
        rec.outcome, rec.error_class = "infra_failure", type(e).__name__
        rec.reason = f"{type(e).__name__}: {e}"
        (edir / "traceback.txt").write_text(traceback.format_exc())
    finally:
        with clock("cleanup"):
            _cleanup(sb, rec)
        rec.finished_at = time.time()
        rec.timings["total"] = round(rec.finished_at - rec.started_at, 3)
        (edir / "record.json").write_text(json.dumps(rec.to_dict(), indent=1, default=str))
    return rec


def _cleanup(sb: Sandbox, rec: EpisodeRecord) -> None:
    """Leave no fault behind: a successful remediation removed it; otherwise recover it with
    the harness's own undo, and reset the sandbox if even that fails."""
    if rec.outcome == "success":
        forget_faults(sb)
        return
    try:
        recover_all(sb)
        forget_faults(sb)
    except Exception as e:
        rec.timings["cleanup_reset"] = 1.0
        try:
            sb.reset()
        except SandboxError:
            pass   # the next episode's reset (or the fleet) replaces the sandbox
        forget_faults(sb)
        rec.reason = rec.reason or f"cleanup needed a reset: {e}"


def _episode(sb, deployment, scenario, policy, config, rec, edir, clock, step) -> None:
    rng = random.Random(f"{scenario.seed}:{scenario.index}:{scenario.fault}:{scenario.target}")

    step("reset")
    rec.stage = "reset"
    with clock("reset"):
        sb.reset()
        forget_faults(sb)   # the reset discarded them with the node
    with clock("deploy_check"):
        try:
            wait_healthy(sb, deployment, timeout_s=60)
            baseline = take_baseline(sb, deployment)
        except Exception as e:
            raise SandboxError(f"sandbox {sb.name}: the deployed baseline is not healthy after a "
                               f"reset: {e}") from e

    step("inject")
    rec.stage = "inject"
    if scenario.target not in deployment.targets:
        raise ValueError(f"scenario {scenario.id}: no service '{scenario.target}' in {deployment.system}; "
                         f"it has: {', '.join(deployment.targets)}")
    with clock("inject"):
        try:
            fault = make_fault(scenario.fault, deployment.targets[scenario.target], deployment.targets,
                               params=scenario.params or None, seed=scenario.seed)
            fault.inject(sb)
        except FaultError as e:      # unavailable here, or refused by the target: the fault's doing
            rec.outcome, rec.error_class, rec.reason = "injection_failure", type(e).__name__, str(e)
            return
        except SandboxError:         # the sandbox stopped answering: infrastructure
            raise
        except Exception as e:
            rec.outcome, rec.error_class, rec.reason = "injection_failure", type(e).__name__, str(e)
            return
    rec.stage = "confirm"
    with clock("confirm"):
        t0 = time.monotonic()
        while not fault.is_active(sb):
            if time.monotonic() - t0 > config.confirm_timeout_s:
                rec.outcome, rec.error_class = "injection_failure", "NotConfirmed"
                rec.reason = f"{fault.name} on {scenario.target}: not active after {config.confirm_timeout_s:.0f} s"
                return
            time.sleep(0.2)

    step("report")
    rec.stage = "report"
    with clock("report"):
        report = build_report(sb, deployment, [fault], config.report_detail, window_s=config.report_window_s)
        if config.report_noise and rng.random() < config.report_noise:
            report, rec.noise = add_noise(report, sb, deployment, rng)
    rec.report, rec.report_text = report.to_dict(), report.to_text()
    (edir / "report.json").write_text(report.to_json())

    inventory = sb.write_inventory(edir / "hosts.yaml")
    hosts = tuple(n.name for n in sb.nodes)
    probe = None
    if config.probes:
        from .policies.tools import make_probe
        probe = make_probe(sb, hosts)
    ctx = PolicyContext(report=report, inventory_hosts=hosts, system=deployment.system, seed=scenario.seed,
                        probe=probe, episode_id=scenario.id)
    feedback: list[TrialFeedback] = []
    max_trials = max(1, int(getattr(policy, "max_trials", 1)))
    outcome: ExecutionOutcome | None = None
    for trial in range(1, max_trials + 1):
        step(f"generate (trial {trial})")
        rec.stage = "generate"
        tdir = edir / f"trial-{trial}"
        tdir.mkdir(exist_ok=True)
        with clock("generate"):
            try:
                gen = policy.generate(ctx, feedback)
            except Exception as e:   # a model server that fails is the policy's failure, recorded
                rec.trials.append({"trial": trial, "error": f"{type(e).__name__}: {e}"})
                rec.error_class, rec.reason = type(e).__name__, f"the policy failed: {e}"
                (tdir / "error.txt").write_text(traceback.format_exc())
                break
        for k, v in (("prompt", gen.prompt_tokens), ("completion", gen.completion_tokens)):
            rec.tokens[k] = None if (v is None or rec.tokens[k] is None) else rec.tokens[k] + v
        (tdir / "output.txt").write_text(gen.text)
        (tdir / "messages.json").write_text(json.dumps(gen.messages, indent=1, default=str))

        step(f"execute (trial {trial})")
        # "pipeline" is the whole of run_pipeline; its stages (extract ... execute) are
        # added beside it, each under its own name, so no phase is counted twice.
        with clock("pipeline"):
            outcome = run_pipeline(gen.text, sandbox=sb, inventory_hosts=hosts, workdir=tdir,
                                   timeout_s=config.exec_timeout_s,
                                   check_idempotence=config.check_idempotence)
        for k, v in outcome.timings.items():
            rec.timings[k] = round(rec.timings.get(k, 0.0) + v, 3)
        trial_rec = {"trial": trial, "messages": gen.messages, "output": gen.text, "model": gen.model,
                     "prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                     "tool_calls": gen.tool_calls, "latency_s": round(gen.latency_s, 3),
                     "extra": gen.extra, "execution": outcome.to_dict()}
        rec.trials.append(trial_rec)
        rec.playbook = outcome.playbook_text
        rec.stage, rec.error_class, rec.reason = outcome.stage, outcome.error_class, outcome.reason
        if trial == max_trials:
            break
        with clock("feedback"):
            health = weak_health(sb, deployment)
        trial_rec["health"] = health
        if outcome.executed_ok and health["ok"]:
            break
        feedback.append(TrialFeedback(trial=trial, stage=outcome.stage, error_class=outcome.error_class,
                                      reason=outcome.reason, execution=outcome.summary(), health=health))

    step("settle")
    with clock("settle"):
        _settle(sb, deployment, fault, config.settle_timeout_s)

    # Every episode is judged, whatever the pipeline did: a playbook that failed half-way may
    # still have fixed the system, and one that "succeeded" may not have.
    step("verify")
    with clock("verify"):
        verdict = verify(sb, deployment, baseline, [fault],
                         **({} if config.verify_load else {"load_check": None}))
    rec.verdict = verdict.to_dict()
    (edir / "verdict.json").write_text(verdict.to_json())
    if not verdict.judged:
        rec.outcome, rec.error_class, rec.reason = "infra_failure", "NotJudged", verdict.reason
        return
    if verdict.success:
        rec.outcome = "success"
        if outcome is None or not outcome.executed_ok:
            # The system is fixed although the pipeline stopped (e.g. a late task failed):
            # the verdict is the score, the stage stays recorded.
            rec.reason = f"verified although the pipeline stopped at {rec.stage}: {rec.reason}"
        else:
            rec.stage, rec.reason = "done", ""
    elif outcome is not None and outcome.error_class == "InternalError":
        # Our pipeline could not run the answer (execution.py): the policy was never judged.
        rec.outcome = "infra_failure"
    else:
        rec.outcome = "failure"
        if outcome is not None and outcome.executed_ok:
            rec.stage, rec.error_class, rec.reason = "verify", "NotRemediated", verdict.reason


# ---- a sandbox kept ready for episodes ----------------------------------------------------------

class Slot:
    """A sandbox with a system deployed, healthy and checkpointed, so that every episode's
    reset returns to that deployment instead of deploying again. One slot serves one
    episode at a time; the benchmark's worker threads and the fleet's host actors each
    own a few.

        slot = Slot("simple-micro", name="bench-1234-0").up()
        rec = run_case(slot, scenario, policy, out_dir=...)
        slot.down()
    """

    def __init__(self, system: str, *, backend: str = "nspawn", name: str | None = None,
                 sandbox_options: dict | None = None):
        self.system, self.backend, self.name = system, backend, name
        self.sandbox_options = dict(sandbox_options or {})
        self.sb: Sandbox | None = None
        self.dep: Deployment | None = None
        self.replacements = 0
        self.up_s = 0.0               # how long the last up() took (create, deploy, checkpoint)

    @property
    def ready(self) -> bool:
        return self.sb is not None and self.dep is not None

    def up(self) -> "Slot":
        from .sandbox import create_sandbox
        from .systems.deploy import deploy
        from .systems.spec import load_system
        spec = load_system(self.system)
        t0 = time.monotonic()
        self.sb = create_sandbox(self.backend, nodes=spec.nodes, name=self.name, **self.sandbox_options)
        try:
            self.dep = deploy(self.sb, self.system)
            self.sb.checkpoint()
            wait_healthy(self.sb, self.dep)
        except BaseException:
            self.down()
            raise
        self.up_s = round(time.monotonic() - t0, 2)
        return self

    def down(self) -> None:
        sb, self.sb, self.dep = self.sb, None, None
        if sb is not None:
            sb.stop()

    def replace(self) -> None:
        """A fresh sandbox under the same name: the old one is destroyed first."""
        self.replacements += 1
        self.down()
        self.up()


def run_case(slot: Slot, scenario: Scenario, policy: Policy, *, out_dir: Path,
             config: EpisodeConfig = EpisodeConfig(), progress: Callable[[str], None] | None = None,
             episode_id: str | None = None, on_replace: Callable[[str], None] | None = None) -> EpisodeRecord:
    """One case on a slot. An infrastructure failure (the sandbox stopped answering)
    replaces the sandbox and runs the case once more; a second one is recorded as it is.
    A sandbox that cannot even be replaced leaves the slot down (`slot.ready` False) and
    the record says why."""
    rec = None
    for attempt in (1, 2):
        if not slot.ready:
            try:
                slot.replace()
            except Exception as e:
                rec = rec or EpisodeRecord(id=episode_id or scenario.id, scenario=asdict(scenario),
                                           policy=getattr(policy, "name", str(policy)), backend=slot.backend,
                                           sandbox=slot.name or "", config=asdict(config),
                                           started_at=time.time(), finished_at=time.time())
                rec.outcome, rec.stage, rec.error_class = "infra_failure", "reset", type(e).__name__
                rec.reason = f"the sandbox could not be replaced: {e}"
                return rec
        rec = run_episode(slot.sb, slot.dep, scenario, policy, out_dir=out_dir, config=config,
                          progress=progress, episode_id=episode_id)
        rec.attempts = attempt
        if rec.outcome != "infra_failure" or attempt == 2:
            return rec
        if on_replace:
            on_replace(rec.reason)
        slot.down()    # the next attempt brings up a fresh sandbox
        edir = Path(out_dir) / rec.id
        kept = edir.with_name(f"{edir.name}.attempt{attempt}")
        from e2e_reme.host import safe_rmtree
        safe_rmtree(kept)
        if edir.exists():
            edir.rename(kept)  # the failed attempt stays for inspection; the retry starts clean
    return rec
