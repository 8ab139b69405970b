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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from e2e_reme.simulators.errors import FaultError, SandboxError
from e2e_reme.simulators.playbook.execution import ExecutionOutcome, run_pipeline
from e2e_reme.simulators.faults import forget_faults, make_fault, recover_all
from e2e_reme.simulators.policies.base import Policy, PolicyContext, TrialFeedback
from e2e_reme.simulators.reports import add_noise, build_report
from e2e_reme.simulators.sandbox.base import Sandbox
from e2e_reme.simulators.systems.deploy import Deployment, health_all, wait_healthy
from e2e_reme.simulators.verification.verifier import take_baseline, verify

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
    from e2e_reme.simulators.systems.loadgen import run_load
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
    try:
        _episode(_Episode(sb, deployment, scenario, policy, config, rec, edir, clock, progress or (lambda s: None)))
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


@dataclass
class _Episode:
    """What the phases of one episode share: where it runs, what it runs, where it writes."""

    sb: Sandbox
    deployment: Deployment
    scenario: Scenario
    policy: Policy
    config: EpisodeConfig
    rec: EpisodeRecord
    edir: Path
    clock: _Clock
    step: Callable[[str], None]

    def stage(self, name: str, say: str | None = None) -> None:
        self.step(say or name)
        self.rec.stage = name


def _episode(ep: _Episode) -> None:
    """The phases in order; each returns what the next needs. A phase that ends the episode
    early (the fault could not be injected or confirmed) has written the outcome."""
    baseline = _reset(ep)
    fault = _inject(ep)
    if fault is None or not _confirm(ep, fault):
        return
    report = _report(ep, fault)
    outcome = _remediate(ep, report)
    ep.step("settle")
    with ep.clock("settle"):
        _settle(ep.sb, ep.deployment, fault, ep.config.settle_timeout_s)
    _judge(ep, baseline, fault, outcome)


def _reset(ep: _Episode):
    """The sandbox back to its deployment, healthy; the verifier's baseline of it."""
    ep.stage("reset")
    with ep.clock("reset"):
        ep.sb.reset()
        forget_faults(ep.sb)   # the reset discarded them with the node
    with ep.clock("deploy_check"):
        try:
            wait_healthy(ep.sb, ep.deployment, timeout_s=60)
            return take_baseline(ep.sb, ep.deployment)
        except Exception as e:
            raise SandboxError(f"sandbox {ep.sb.name}: the deployed baseline is not healthy after a "
                               f"reset: {e}") from e


def _inject(ep: _Episode):
    """The scenario's fault, injected; None (and an injection failure recorded) when it
    could not be. A sandbox that stops answering is infrastructure and raises."""
    ep.stage("inject")
    sc, dep, rec = ep.scenario, ep.deployment, ep.rec
    if sc.target not in dep.targets:
        raise ValueError(f"scenario {sc.id}: no service '{sc.target}' in {dep.system}; "
                         f"it has: {', '.join(dep.targets)}")
    with ep.clock("inject"):
        try:
            fault = make_fault(sc.fault, dep.targets[sc.target], dep.targets, params=sc.params or None, seed=sc.seed)
            fault.inject(ep.sb)
            return fault
        except FaultError as e:      # unavailable here, or refused by the target: the fault's doing
            rec.outcome, rec.error_class, rec.reason = "injection_failure", type(e).__name__, str(e)
            return None
        except SandboxError:         # the sandbox stopped answering (FaultError is one too): infrastructure
            raise
        except Exception as e:
            rec.outcome, rec.error_class, rec.reason = "injection_failure", type(e).__name__, str(e)
            return None


def _confirm(ep: _Episode, fault) -> bool:
    """Whether the fault's ground truth reads active in time (else an injection failure)."""
    ep.rec.stage = "confirm"
    with ep.clock("confirm"):
        t0 = time.monotonic()
        while not fault.is_active(ep.sb):
            if time.monotonic() - t0 > ep.config.confirm_timeout_s:
                ep.rec.outcome, ep.rec.error_class = "injection_failure", "NotConfirmed"
                ep.rec.reason = (f"{fault.name} on {ep.scenario.target}: not active after "
                                 f"{ep.config.confirm_timeout_s:.0f} s")
                return False
            time.sleep(0.2)
    return True


def _report(ep: _Episode, fault):
    """The diagnosis report the policy reads (with the configured noise), kept in the record."""
    ep.stage("report")
    sc, config, rec = ep.scenario, ep.config, ep.rec
    rng = random.Random(f"{sc.seed}:{sc.index}:{sc.fault}:{sc.target}")
    with ep.clock("report"):
        report = build_report(ep.sb, ep.deployment, [fault], config.report_detail, window_s=config.report_window_s)
        if config.report_noise and rng.random() < config.report_noise:
            report, rec.noise = add_noise(report, ep.sb, ep.deployment, rng)
    rec.report, rec.report_text = report.to_dict(), report.to_text()
    (ep.edir / "report.json").write_text(report.to_json())
    return report
def _remediate(ep: _Episode, report) -> ExecutionOutcome | None:
    """The policy's trials: generate, run the playbook; a multi-trial policy reads weak
    feedback and tries again. The last trial's execution outcome (None: the policy failed
    before any playbook)."""
    hosts = tuple(n.name for n in ep.sb.nodes)
    ep.sb.write_inventory(ep.edir / "hosts.yaml")
    probe = None
    if ep.config.probes:
        from e2e_reme.simulators.policies.tools import make_probe
        probe = make_probe(ep.sb, hosts)
    ctx = PolicyContext(report=report, inventory_hosts=hosts, system=ep.deployment.system, seed=ep.scenario.seed,
                        probe=probe, episode_id=ep.scenario.id)
    feedback: list[TrialFeedback] = []
    max_trials = max(1, int(getattr(ep.policy, "max_trials", 1)))
    outcome: ExecutionOutcome | None = None
    for trial in range(1, max_trials + 1):
        gen = _generate(ep, ctx, feedback, trial)
        if gen is None:
            break
        outcome = _execute(ep, gen, hosts, trial)
        if trial == max_trials:
            break
        with ep.clock("feedback"):
            health = weak_health(ep.sb, ep.deployment)
        ep.rec.trials[-1]["health"] = health
        if outcome.executed_ok and health["ok"]:
            break
        feedback.append(TrialFeedback(trial=trial, stage=outcome.stage, error_class=outcome.error_class,
                                      reason=outcome.reason, execution=outcome.summary(), health=health))
    return outcome


def _generate(ep: _Episode, ctx: PolicyContext, feedback: list[TrialFeedback], trial: int):
    """One answer of the policy, written beside the trial; None when the policy itself failed
    (a model server that fails is the policy's failure, recorded)."""
    ep.stage("generate", f"generate (trial {trial})")
    rec, tdir = ep.rec, ep.edir / f"trial-{trial}"
    tdir.mkdir(exist_ok=True)
    with ep.clock("generate"):
        try:
            gen = ep.policy.generate(ctx, feedback)
        except Exception as e:
            rec.trials.append({"trial": trial, "error": f"{type(e).__name__}: {e}"})
            rec.error_class, rec.reason = type(e).__name__, f"the policy failed: {e}"
            (tdir / "error.txt").write_text(traceback.format_exc())
            return None
    for k, v in (("prompt", gen.prompt_tokens), ("completion", gen.completion_tokens)):
        rec.tokens[k] = None if (v is None or rec.tokens[k] is None) else rec.tokens[k] + v
    (tdir / "output.txt").write_text(gen.text)
    (tdir / "messages.json").write_text(json.dumps(gen.messages, indent=1, default=str))
    if (gen.extra or {}).get("finish_reason") == "repetition":
        # The model fell into a loop and its engine stopped it (train/rollout.py `loop_span`):
        # the policy's failure, whatever the truncated text would have done.
        rec.trials.append({"trial": trial, "output": gen.text, "completion_tokens": gen.completion_tokens,
                           "error": "the answer repeated itself and was stopped"})
        rec.error_class, rec.reason = "GenerationLoop", (f"the model repeated one block of its answer after "
                                                         f"{gen.completion_tokens} tokens; stopped there")
        return None
    return gen


def _execute(ep: _Episode, gen, hosts: tuple[str, ...], trial: int) -> ExecutionOutcome:
    """The answer through the playbook path (extract, gate, syntax check, run); the trial's
    record with its generation and execution."""
    ep.step(f"execute (trial {trial})")
    rec = ep.rec
    # "pipeline" is the whole of run_pipeline; its stages (extract ... execute) are
    # added beside it, each under its own name, so no phase is counted twice.
    with ep.clock("pipeline"):
        outcome = run_pipeline(gen.text, sandbox=ep.sb, inventory_hosts=hosts, workdir=ep.edir / f"trial-{trial}",
                               timeout_s=ep.config.exec_timeout_s, check_idempotence=ep.config.check_idempotence)
    for k, v in outcome.timings.items():
        rec.timings[k] = round(rec.timings.get(k, 0.0) + v, 3)
    rec.trials.append({"trial": trial, "messages": gen.messages, "output": gen.text, "model": gen.model,
                       "prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                       "tool_calls": gen.tool_calls, "latency_s": round(gen.latency_s, 3),
                       "extra": gen.extra, "execution": outcome.to_dict()})
    rec.playbook = outcome.playbook_text
    rec.stage, rec.error_class, rec.reason = outcome.stage, outcome.error_class, outcome.reason
    return outcome


def _judge(ep: _Episode, baseline, fault, outcome: ExecutionOutcome | None) -> None:
    """The verdict decides the outcome, whatever the pipeline did: a playbook that failed
    half-way may still have fixed the system, and one that "succeeded" may not have."""
    ep.step("verify")
    rec = ep.rec
    with ep.clock("verify"):
        verdict = verify(ep.sb, ep.deployment, baseline, [fault],
                         **({} if ep.config.verify_load else {"load_check": None}))
    rec.verdict = verdict.to_dict()
    (ep.edir / "verdict.json").write_text(verdict.to_json())
    if not verdict.judged:
        rec.outcome, rec.error_class, rec.reason = "infra_failure", "NotJudged", verdict.reason
    elif verdict.success:
        rec.outcome = "success"
        if outcome is None or not outcome.executed_ok:
            # The system is fixed although the pipeline stopped (e.g. a late task failed):
            # the verdict is the score, the stage stays recorded.
            rec.reason = f"verified although the pipeline stopped at {rec.stage}: {rec.reason}"
        else:
            rec.stage, rec.reason = "done", ""
    elif outcome is not None and outcome.error_class == "InternalError":
        # Our pipeline could not run the answer (playbook/execution.py): the policy was never judged.
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
    own a few. A slot holds its sandbox's lease (simulators/sandbox/lease.py) from `up()`
    to `down()`, across replacements, so no other user (a server's execute, another
    process) drives the sandbox while the slot has it.

        slot = Slot("simple-micro", name="bench-1234-0").up()
        rec = run_case(slot, scenario, policy, out_dir=...)
        slot.down()
    """

    def __init__(self, system: str, *, backend: str = "nspawn", name: str | None = None,
                 sandbox_options: dict | None = None, purpose: str = "episode slot"):
        self.system, self.backend, self.name = system, backend, name
        self.sandbox_options = dict(sandbox_options or {})
        self.purpose = purpose        # what its sandbox lease says to those it refuses
        self.lease = None             # held from up() to down(): nobody else drives the sandbox meanwhile
        self.sb: Sandbox | None = None
        self.dep: Deployment | None = None
        self.replacements = 0
        self.up_s = 0.0               # how long the last up() took (create, deploy, checkpoint)

    @property
    def ready(self) -> bool:
        return self.sb is not None and self.dep is not None

    def up(self) -> "Slot":
        from e2e_reme.simulators.sandbox.base import create_sandbox
        from e2e_reme.simulators.systems.deploy import deploy
        from e2e_reme.simulators.systems.spec import load_system
        from e2e_reme.simulators.sandbox.lease import acquire
        spec = load_system(self.system)
        t0 = time.monotonic()
        if self.name and self.lease is None:       # before the sandbox exists: nobody can take it in between
            self.lease = acquire(self.name, self.purpose, wait_s=2.0)
        try:
            self.sb = create_sandbox(self.backend, nodes=spec.nodes, name=self.name, **self.sandbox_options)
            if self.lease is None:
                self.lease = acquire(self.sb.name, self.purpose)
        except BaseException:
            self.down()
            raise
        try:
            self.dep = deploy(self.sb, self.system)
            self.sb.checkpoint()
            wait_healthy(self.sb, self.dep)
        except BaseException:
            self.down()
            raise
        self.up_s = round(time.monotonic() - t0, 2)
        return self

    def down(self, keep_lease: bool = False) -> None:
        sb, self.sb, self.dep = self.sb, None, None
        try:
            if sb is not None:
                sb.stop()
        finally:
            if self.lease is not None and not (keep_lease and self.name):   # a nameless slot's next sandbox has another name
                self.lease, lease = None, self.lease
                lease.release()

    def replace(self) -> None:
        """A fresh sandbox under the same name: the old one is destroyed first; the lease
        is kept throughout."""
        self.replacements += 1
        self.down(keep_lease=True)
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
        slot.down(keep_lease=True)    # the next attempt brings up a fresh sandbox (under the same lease)
        edir = Path(out_dir) / rec.id
        kept = edir.with_name(f"{edir.name}.attempt{attempt}")
        from e2e_reme.host import safe_rmtree
        safe_rmtree(kept)
        if edir.exists():
            edir.rename(kept)  # the failed attempt stays for inspection; the retry starts clean
    return rec
