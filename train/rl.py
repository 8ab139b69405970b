"""Reinforcement fine-tuning of the policy model from the verified outcome of its own
playbooks, executed in sandboxes: GRPO (or group-relative REINFORCE) on a Ray cluster.

The algorithm. Each step samples `scenarios_per_step` training cases (verified expert
traces of the training split: a system, a fault, a target and a seed, with the diagnosis
report the episode produced; held-out systems and services are never seen). The rollout
worker samples a group of `group_size` completions per case from the current policy,
keeping prompt ids, completion ids and the sampling logprobs. The judge (cluster/judge.py)
runs every completion as its own episode on the fleet: the case's sandbox reset, the same
fault injected, the completion extracted, gated, executed by the jailed controller and
verified. The reward is the verdict: 1 for a verified fix, 0 for a failure of the policy;
an episode the infrastructure failed has no reward and is masked out of the loss. Rewards
become group-relative advantages; groups without signal are dropped (train/objective.py).
Ray Train workers take one optimizer step on the clipped surrogate (grpo) or on the
sequence-level REINFORCE loss (reinforce); the new checkpoint is loaded by the rollout
worker, and the next step begins.

What was simplified. One optimizer step per batch (no PPO epochs), so the importance ratio
only corrects for the rollout engine's numerics and for expert answers; one Ray Train fit
per step (train/rl_workers.py says why); with `rollout.overlap` (on by default) the next
step's groups are generated while this step's are judged, by the weights before this
step's update (staleness of one step, which the stored logprobs' ratio accounts for); the
new weights reach the rollout worker through the object store, but each update is still
a Ray Train fit that starts its workers and loads the model again (no persistent
trainer), and there is one rollout worker. `expert_per_group` (0 by
default) lets the case's verified expert answer join its group, judged like any
completion (its old logprobs are the current policy's): a guide for a policy that never
succeeds on its own, off unless configured. The prompt is the report recorded with the
trace; the judged episode observes the same case afresh, so a sample whose prompt names a
transient unit, an address or a pid that the fix needs and the fresh episode does not have
is masked (`stale_prompt`), not scored: its failure would not be the policy's.

Launch, on this machine (a local Ray is started when no cluster is given):

    python train/rl.py --config configs/rl-cpu.yaml            # or: remed train rl --config ...
    python train/rl.py --config configs/rl-cpu.yaml steps=3 objective.algorithm=reinforce

Against a Ray cluster (on this machine: `(umask 077; ray get-auth-token --generate)`, then
`OMP_WAIT_POLICY=PASSIVE RAY_AUTH_MODE=token ray start --head --resources='{"sandbox_host": 1}'`);
the job runs in a copy of the working directory, without runs/, so `root` says where the
config's relative paths (the model, the traces, the output) are:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python train/rl.py --config configs/rl-cpu.yaml root=$PWD

A rerun of the same command resumes from the last checkpoint in `out`. What a failure
costs: a lost sandbox host, its episodes (masked); a lost rollout worker, the time to start
another and generate the step's groups again; a failed update, that step's learning (the
weights stay, the run goes on); Ctrl-C or `ray job stop`, nothing past the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):      # run as a script (`python train/rl.py`, `ray job submit`)
    from e2e_reme.host import passive_thread_waits
    passive_thread_waits()         # before torch loads, for this process and the local Ray it starts
    import e2e_reme.train  # noqa: F401  (the installed package; this file is its train/rl.py)
    __package__ = "e2e_reme.train"

from .errors import NoTrainingData, TrainError
from .objective import group_advantages
from .rl_config import RLConfig, load_config
from .rl_workers import Rollout, latest_checkpoint, step_of, update


# ---- the training cases ---------------------------------------------------------------------------

def training_cases(config: RLConfig) -> list[dict]:
    """Every verified expert trace of the training split (train/data.py `select_traces`, the
    selection SFT makes: configs/splits.yaml's validation and test never appear): its
    scenario, the solo prompt for its report, and the expert's answer."""
    from e2e_reme.simulators.episode import Scenario
    from .data import read_episodes, select_traces, trace_example
    cases = []
    for rec in select_traces(read_episodes(config.data.episodes), config.data)[0]:
        ex = trace_example(rec)
        cases.append({"scenario": Scenario(**rec["scenario"]), "messages": ex.messages, "expert": ex.answer,
                      "report_text": rec.get("report_text") or ""})
    if not cases:
        raise NoTrainingData(f"no verified '{config.data.policy}' trace of the training split under "
                             f"{', '.join(config.data.episodes)}; collect some: `remed train collect --config ...`")
    return cases


# ---- one step, phase by phase -------------------------------------------------------------------

# What an answer copies from a report and a new injection of the same scenario may change: a
# transient unit's name (systemd-run picks it), an address (the sandbox's subnet), a pid.
_VOLATILE = re.compile(r"\b(?:run-[\w-]+\.service|\d{1,3}(?:\.\d{1,3}){3}|pid \d+)\b")


def stale_identifiers(recorded: str, fresh: str, expert: str) -> list[str]:
    """The identifiers of the recorded report (the prompt) that the fix needs (the expert's
    verified answer copies them) and the judged episode's own report does not name: where
    there are any, a completion answered a state that is no longer there. Identifiers the
    fix does not need (an address in a journal line) do not count."""
    now = set(_VOLATILE.findall(fresh))

    def needed(ident: str) -> bool:        # a pid is copied as its number (`kill 88`)
        value = ident.removeprefix("pid ")
        return re.search(rf"(?<![\w.-]){re.escape(value)}(?![\w-]|\.\d)", expert) is not None

    return sorted({i for i in _VOLATILE.findall(recorded) if i not in now and needed(i)})


def judge_phase(judge, cases: list[dict], samples: list[dict]) -> None:
    """Every sample executed and verified on the fleet; its reward and outcome added. A
    sample whose prompt names what the fix needs and the judged episode no longer has
    (stale_identifiers) gets no reward: a failure there says nothing about the policy
    (docs/train.md, "A known hole"), so it is masked like an infrastructure failure, and a
    success is not trusted either way."""
    judged = judge([cases[s["case"]]["scenario"] for s in samples], [s["text"] for s in samples],
                   [s["completion_ids"] for s in samples])
    for s, j in zip(samples, judged):
        s.update(reward=j.reward, outcome=j.outcome, stage=j.stage, reason=j.reason, episode=j.id)
        case = cases[s["case"]]
        stale = stale_identifiers(case["report_text"], j.record.get("report_text") or "", case["expert"])
        if stale and j.reward is not None:
            s.update(reward=None, outcome="stale_prompt", judged_outcome=j.outcome, stale=stale)


def advantage_phase(samples: list[dict], config: RLConfig) -> dict:
    size = config.rollout.group_size + config.rollout.expert_per_group
    adv, keep, stats = group_advantages([s["reward"] for s in samples], size,
                                        scale=config.objective.advantage_scale)
    for s, a, k in zip(samples, adv, keep):
        s.update(advantage=a, keep=k)
    return stats


def update_phase(config: RLConfig, out: Path, step: int, source: Path, samples: list[dict], say) -> tuple[Path, dict]:
    """The update; if it fails (a Train worker lost, its node gone), the step's samples are
    not learned from, the weights stay `source` (no checkpoint for this step: a rerun
    resumes from the last one), and the run goes on."""
    try:
        return update(config, out, step, source, samples)
    except Exception as e:       # Ray Train wraps the worker's error: name it, keep going
        first = (str(e).splitlines() or [""])[0][:200]
        say(f"step {step}: the update failed ({type(e).__name__}: {first}); its samples are not learned from")
        return source, {"update_failed": True}


def step_metrics(step: int, cases: list[dict], samples: list[dict], adv_stats: dict, upd: dict,
                 times: dict) -> dict:
    sampled = [s for s in samples if not s["expert"]]
    judged = [s for s in sampled if s["reward"] is not None]
    by_fault: dict[str, list[float]] = {}
    for s in judged:
        by_fault.setdefault(cases[s["case"]]["scenario"].fault, []).append(s["reward"])
    nll = [-lp for s in sampled for lp in s["old_logprobs"]]
    return {"step": step, "reward": round(sum(s["reward"] for s in judged) / len(judged), 4) if judged else None,
            "success_by_fault": {f: round(sum(v) / len(v), 3) for f, v in sorted(by_fault.items())},
            "expert_reward": [s["reward"] for s in samples if s["expert"]],
            "masked_fraction": round(adv_stats["masked_infrastructure"] / max(1, len(samples)), 4),
            "masked_stale_prompt": sum(s["outcome"] == "stale_prompt" for s in samples),
            **{k: v for k, v in adv_stats.items() if k.startswith("groups")},
            "entropy_estimate": round(sum(nll) / len(nll), 4) if nll else None,
            "completion_tokens": sum(len(s["completion_ids"]) for s in sampled),
            **{k: upd.get(k) for k in ("loss", "clip_fraction", "approx_kl_old", "kl_ref", "grad_norm", "sequences")},
            "update_failed": bool(upd.get("update_failed")),
            "time_s": {k: round(v, 2) for k, v in times.items()}}


# ---- the run --------------------------------------------------------------------------------------

@contextmanager
def ray_session(config: RLConfig):
    """Join the cluster (`ray_address`, or RAY_ADDRESS as `ray job submit` sets it), else
    start a local Ray whose node is a sandbox host; shut down only what we started."""
    import ray
    from e2e_reme.cluster import RESOURCE
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    kw = dict(logging_level=logging.WARNING, log_to_driver=False, namespace="e2e-reme-rl")
    from e2e_reme.ray_auth import private_token
    private_token(create=not address)        # a local head's token, 0600 before Ray writes one
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(address="local", include_dashboard=False, resources={RESOURCE: 1},
                 num_cpus=max(os.cpu_count() or 1, 4), **kw)
    # `ray job stop` sends SIGTERM: unwind like Ctrl-C, so that the fleet stops its sandboxes
    # (its reapers destroy them if the SIGKILL that follows comes first). Ray's core sets a
    # crash-dump handler at init, hence after it.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        ray.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class _Log:
    """metrics.jsonl, TensorBoard scalars, and the reward curve's PNG at the end."""

    def __init__(self, out: Path):
        self.path = out / "metrics.jsonl"
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:     # TensorBoard is optional; the JSONL is the record
            self.tb = None

    def step(self, m: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(m) + "\n")
        if self.tb:
            for k, v in m.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, m["step"])
            for k, v in m["time_s"].items():
                self.tb.add_scalar(f"time_s/{k}", v, m["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        rows = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []
        rows = [r for r in rows if r.get("reward") is not None]
        if rows:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], marker="o")
            ax.set(xlabel="step", ylabel="mean reward (verified fixes)", ylim=(-0.05, 1.05), title="RL reward")
            fig.tight_layout()
            fig.savefig(self.path.with_name("reward.png"), dpi=120)
            plt.close(fig)


def run(config: RLConfig, say=print, on_step=None) -> dict:
    """Train (or resume) for `config.steps` steps; return the run's summary. `say` gets
    log lines, `on_step` each step's metrics (a progress display)."""
    import ray
    from e2e_reme.cluster import Fleet, Judge

    config = config.absolute()
    if not Path(config.model).is_dir():
        raise TrainError(f"rl config: model {config.model}: no such directory; name the model to start from "
                         "(an SFT export such as runs/sft-cpu/model, or `remed model import`'s output); a "
                         "submitted job runs in a copy of the working directory without runs/: pass root=$PWD")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    cases = training_cases(config)
    last = latest_checkpoint(out)
    step, source = step_of(last), (last or Path(config.model))
    say(f"rl: {len(cases)} training cases, {config.objective.algorithm}, from step {step} of {config.steps} "
        f"({'checkpoint ' + last.name if last else 'the starting model'})")
    log = _Log(out)
    with ray_session(config), Fleet(config.fleet).start(progress=say) as fleet:
        judge = Judge(fleet, policy="rl")
        rollout = Rollout(config, source, out)

        def batch_of(n: int) -> list[dict]:
            rng = random.Random(f"{config.seed}:{n}")
            return [rng.choice(cases) for _ in range(config.rollout.scenarios_per_step)]

        overlap = config.rollout.overlap
        try:
            pending = None
            while step < config.steps:
                step += 1
                times: dict[str, float] = {}
                t = time.monotonic()
                pending = pending or rollout.submit(batch_of(step), step)
                batch, samples = pending["cases"], rollout.samples(pending, source, say)
                times["generation"] = time.monotonic() - t      # what the loop waited for its samples
                # With overlap the next step's groups are generated while this step's run in
                # sandboxes, by the weights before this step's update (staleness 1): the update's
                # importance ratio uses the logprobs stored with them.
                pending = rollout.submit(batch_of(step + 1), step + 1) if overlap and step < config.steps else None
                t = time.monotonic()
                judge_phase(judge, batch, samples)
                times["execution"] = time.monotonic() - t
                adv_stats = advantage_phase(samples, config)
                t = time.monotonic()
                source, upd = update_phase(config, out, step, source, samples, say)
                times["update"] = time.monotonic() - t
                if pending is not None:       # the worker finishes the next groups before it loads
                    t = time.monotonic()
                    refs = [r for r in (pending["groups"], pending["expert_ids"]) if r is not None]
                    ray.wait(refs, num_returns=len(refs))
                    times["generation_next"] = time.monotonic() - t
                t = time.monotonic()
                if not upd.get("update_failed"):
                    rollout.sync(source, say)
                times["sync"] = time.monotonic() - t
                m = step_metrics(step, batch, samples, adv_stats, upd, times)
                m["rollout_restarts"] = rollout.restarts
                log.step(m)
                if on_step:
                    on_step(m)
                (out / "samples").mkdir(exist_ok=True)
                (out / "samples" / f"step-{step:06d}.json").write_text(json.dumps(
                    [{k: v for k, v in s.items() if k != "prompt_ids"} for s in samples], default=str))
                say(f"step {step}/{config.steps}: reward {m['reward']}, {m['groups_dropped_zero_variance']} of "
                    f"{m['groups']} group(s) without signal, masked {m['masked_fraction']:.0%}, "
                    f"gen {times['generation'] + times.get('generation_next', 0):.0f} s, "
                    f"exec {times['execution']:.0f} s, "
                    f"update {times['update']:.0f} s, sync {times['sync']:.0f} s")
        finally:
            log.close()
            rollout.close()
    summary = {"steps": step, "checkpoint": str(source), "metrics": str(log.path)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="the run's YAML (configs/rl-cpu.yaml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. steps=3 objective.algorithm=reinforce")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        run(config)
    except (TrainError, NoTrainingData) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the same command resumes from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
