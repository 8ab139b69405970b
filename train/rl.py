"""Reinforcement fine-tuning of the policy model from the verified outcome of its own
playbooks, executed in sandboxes: GRPO (or group-relative REINFORCE) on a Ray cluster.

The algorithm. Each step draws `scenarios_per_step` training cases (verified expert
traces of the training split only: a system, a fault, a target and a seed; train/data.py
`select_traces`, so no validation or test system or service is ever drawn). Each case is
one group, judged on one sandbox (cluster/judge.py `Judge.groups`): the judge observes the
case there first (reset, inject, the diagnosis report, recover); the rollout worker samples
`group_size` completions for THAT report (keeping prompt ids, completion ids and the
sampling logprobs); each completion then runs in the same sandbox after a reset and a
re-injection, whose report must name the same identifiers (the faults derive them from the
scenario's seed), else the sample is an infrastructure failure. So a completion is always
judged against the state its prompt described. The reward is the verdict: 1 for a verified
fix, 0 for a failure of the policy; an episode the infrastructure failed has no reward and
is masked out of the loss. Rewards become group-relative advantages (train/objective.py).
A group whose rewards are all equal teaches nothing: the step draws up to `refill_groups`
more groups from other cases in its place (dynamic sampling), and a step with nothing to
learn at all skips its update. The trainer actor takes one optimizer step on the clipped
surrogate (grpo) or on the sequence-level REINFORCE loss (reinforce), writes a checkpoint,
and its new weights (with LoRA: the adapter only) go to the rollout worker through Ray's
object store before the next step.

Sound by construction: sampling is at temperature 1 and top-p 1 (the config refuses
anything else: the engines store the raw distribution's logprobs); generation and update
alternate (no overlap), so REINFORCE is on-policy and GRPO's ratio only corrects for the
rollout engine's numerics and for expert answers; `max_tokens` is checked at start against
the longest expert answer of the training cases.

What was simplified. One optimizer step per batch (no PPO epochs); one trainer actor (one
GPU, or the CPU) and one rollout worker; the groups of a step run on the fleet's slots side
by side, each holding its slot from observation to the last episode. `expert_per_group` (0
by default) lets the expert's answer to the observed report join its group, judged like
any completion (its old logprobs are the current policy's): a guide for a policy that never
succeeds on its own, off unless configured. Before a run, `remed train passk` measures
where the starting model has headroom (train/passk.py).

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
costs: a lost sandbox host, its groups (requeued, observed again); a lost rollout worker,
the time to start another and answer its groups again; a lost trainer, that step's
learning (a new one starts from the last checkpoint, the run goes on); Ctrl-C or `ray job
stop`, nothing past the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
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
from .rl_workers import latest_checkpoint, step_of


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

def _signal(rewards: list) -> bool:
    """Whether a group's judged rewards differ (it has something to teach)."""
    judged = [r for r in rewards if r is not None]
    return len(judged) >= 2 and len(set(judged)) > 1


def collect_phase(judge, rollout, trainer, cases: list[dict], config: RLConfig, step: int, rng: random.Random,
                  say) -> tuple[list[dict], dict]:
    """The step's groups: `scenarios_per_step` cases, each observed, answered by the rollout
    worker and judged on one sandbox (cluster/judge.py Judge.groups); then, while groups
    had nothing to teach (every reward equal) and `refill_groups` allows, as many more
    groups of other cases (dynamic sampling). A group whose rollout worker was lost is
    answered again by a new one, once. Returns the groups ({"case", "result"}) and counts."""
    r = config.rollout
    picked: list[int] = []

    def draw(n: int) -> list[int]:
        fresh = [i for i in range(len(cases)) if i not in picked] or list(range(len(cases)))
        out = [rng.choice(fresh) for _ in range(n)]
        picked.extend(out)
        return out

    groups, todo, budget, rounds = [], draw(r.scenarios_per_step), r.refill_groups, 0
    stats = {"groups_refilled": 0, "groups_failed": 0, "rollout_lost": 0}
    while todo:
        rounds += 1
        answer = rollout.answer(step, config.seed * 100003 + step * 101 + rounds)
        results = judge.groups([cases[i]["scenario"] for i in todo], answer)
        lost = [(i, g) for i, g in zip(todo, results) if g.error_class == "AnswerFailed"]
        if lost and stats["rollout_lost"] == 0:
            stats["rollout_lost"] += 1
            rollout.restart(lost[0][1].error, say)
            rollout.sync(trainer.weights(), None)
            again = judge.groups([cases[i]["scenario"] for i, _ in lost], rollout.answer(step, config.seed + rounds))
            results = [again.pop(0) if g.error_class == "AnswerFailed" else g for g in results]
        for i, g in zip(todo, results):
            if g.error:
                stats["groups_failed"] += 1
                say(f"step {step}: the group of {cases[i]['scenario'].id} was not judged ({g.error_class}: "
                    f"{g.error[:200]})")
            groups.append({"case": i, "result": g})
        without = sum(not _signal([j.reward for j in g["result"].judgements]) for g in groups[-len(todo):]
                      if not g["result"].error)
        n = min(budget, without)
        budget -= n
        stats["groups_refilled"] += n
        todo = draw(n) if n else []
    return groups, stats


def group_samples(groups: list[dict]) -> list[dict]:
    """One sample per judged answer of every group that was judged whole (consecutive per
    group, `group` its index): the answer's ids and logprobs, its reward and outcome."""
    samples = []
    for k, g in enumerate(groups):
        res = g["result"]
        if res.error or len(res.judgements) != len(res.answers):
            continue
        for a, j in zip(res.answers, res.judgements):
            samples.append({"group": k, "case": g["case"], "text": a["text"], "prompt_ids": a["prompt_ids"],
                            "completion_ids": a["completion_ids"], "old_logprobs": a["old_logprobs"],
                            "expert": a["expert"], "finish_reason": a.get("finish_reason"), "reward": j.reward,
                            "outcome": j.outcome, "stage": j.stage, "reason": j.reason, "episode": j.id,
                            "error_class": j.record.get("error_class")})
    return samples


def advantage_phase(samples: list[dict], config: RLConfig) -> dict:
    size = config.rollout.group_size + config.rollout.expert_per_group
    adv, keep, stats = group_advantages([s["reward"] for s in samples], size,
                                        scale=config.objective.advantage_scale)
    for s, a, k in zip(samples, adv, keep):
        s.update(advantage=a, keep=k)
    return stats


def update_phase(trainer, out: Path, step: int, source: Path, samples: list[dict], say) -> tuple[Path, dict]:
    """The update, only where some sample enters the loss (a step with nothing to learn
    skips it: no optimizer step, no checkpoint). If it fails (the trainer lost, its node
    gone), the step's samples are not learned from, a new trainer starts from `source`
    (the last checkpoint), and the run goes on."""
    if not any(s["keep"] for s in samples):
        return source, {"update_skipped": True}
    try:
        return trainer.update(step, samples)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        say(f"step {step}: the update failed ({type(e).__name__}: {first}); its samples are not learned from")
        trainer.restart(source, say)
        return source, {"update_failed": True}


def step_metrics(step: int, cases: list[dict], groups: list[dict], samples: list[dict], adv_stats: dict,
                 collect: dict, upd: dict, times: dict) -> dict:
    sampled = [s for s in samples if not s["expert"]]
    judged = [s for s in sampled if s["reward"] is not None]
    by_fault: dict[str, list[float]] = {}
    for s in judged:
        by_fault.setdefault(cases[s["case"]]["scenario"].fault, []).append(s["reward"])
    nll = [-lp for s in sampled for lp in s["old_logprobs"]]
    host = {k: round(sum(g["result"].times.get(k, 0.0) for g in groups), 2) for k in ("observe", "answer", "execute")}
    return {"step": step, "reward": round(sum(s["reward"] for s in judged) / len(judged), 4) if judged else None,
            "success_by_fault": {f: round(sum(v) / len(v), 3) for f, v in sorted(by_fault.items())},
            "expert_reward": [s["reward"] for s in samples if s["expert"]],
            "masked_fraction": round(adv_stats["masked_infrastructure"] / max(1, len(samples)), 4),
            "masked_state_mismatch": sum(s["error_class"] == "StateMismatch" for s in samples),
            **{k: v for k, v in adv_stats.items() if k.startswith("groups")}, **collect,
            "groups_with_signal": adv_stats["groups"] - adv_stats["groups_dropped_zero_variance"]
            - adv_stats["groups_dropped_too_few"],
            "entropy_estimate": round(sum(nll) / len(nll), 4) if nll else None,
            "completion_tokens": sum(len(s["completion_ids"]) for s in sampled),
            "truncated": sum(s["finish_reason"] == "length" for s in sampled),
            **{k: upd.get(k) for k in ("loss", "clip_fraction", "approx_kl_old", "kl_ref", "grad_norm", "sequences")},
            "update_failed": bool(upd.get("update_failed")), "update_skipped": bool(upd.get("update_skipped")),
            "time_s": {**{k: round(v, 2) for k, v in times.items()}, **{f"host_{k}": v for k, v in host.items()}}}


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
    from e2e_reme.cluster import Judge
    from .rl_config import check_generation_limit
    from .rl_workers import Rollout, Trainer

    config = config.absolute()
    if not Path(config.model).is_dir():
        raise TrainError(f"rl config: model {config.model}: no such directory; name the model to start from "
                         "(an SFT export such as runs/sft-cpu/model, or `remed model import`'s output); a "
                         "submitted job runs in a copy of the working directory without runs/: pass root=$PWD")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    cases = training_cases(config)
    longest = check_generation_limit(config, [c["expert"] for c in cases])
    last = latest_checkpoint(out)
    step, source = step_of(last), (last or Path(config.model))
    say(f"rl: {len(cases)} training cases (longest expert answer {longest} tokens), {config.objective.algorithm}, "
        f"from step {step} of {config.steps} ({'checkpoint ' + last.name if last else 'the starting model'})")
    log = _Log(out)
    with ray_session(config), _judging_fleet(config, say) as fleet:
        judge = Judge(fleet, policy="rl")
        trainer = Trainer(config, source, out)
        rollout = Rollout(config, out)
        try:
            rollout.sync(trainer.weights(), last)     # a resumed run's adapter; a fresh one's is a no-op
            while step < config.steps:
                step += 1
                rng = random.Random(f"{config.seed}:{step}")
                times: dict[str, float] = {}
                t = time.monotonic()
                groups, collect = collect_phase(judge, rollout, trainer, cases, config, step, rng, say)
                times["judge"] = time.monotonic() - t          # observe, generate, execute: interleaved per group
                samples = group_samples(groups)
                adv_stats = advantage_phase(samples, config)
                t = time.monotonic()
                source, upd = update_phase(trainer, out, step, source, samples, say)
                times["update"] = time.monotonic() - t
                t = time.monotonic()
                if not upd.get("update_failed") and not upd.get("update_skipped"):
                    _sync(rollout, trainer, source, say)
                times["sync"] = time.monotonic() - t
                m = step_metrics(step, cases, groups, samples, adv_stats, collect, upd, times)
                m["rollout_restarts"], m["trainer_restarts"] = rollout.restarts, trainer.restarts
                log.step(m)
                if on_step:
                    on_step(m)
                (out / "samples").mkdir(exist_ok=True)
                (out / "samples" / f"step-{step:06d}.json").write_text(json.dumps(
                    [{k: v for k, v in s.items() if k != "prompt_ids"} for s in samples], default=str))
                say(f"step {step}/{config.steps}: reward {m['reward']}, {m['groups_with_signal']} of {m['groups']} "
                    f"group(s) with signal ({m['groups_refilled']} refilled), masked {m['masked_fraction']:.0%}, "
                    f"judge {times['judge']:.0f} s (generate {m['time_s']['host_answer']:.0f}), "
                    f"update {times['update']:.0f} s{' (skipped)' if m['update_skipped'] else ''}, "
                    f"sync {times['sync']:.1f} s")
        finally:
            log.close()
            rollout.close()
            trainer.close()
    summary = {"steps": step, "checkpoint": str(source), "metrics": str(log.path)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _judging_fleet(config: RLConfig, say):
    """The judge's fleet, started once the cluster is known to hold the run's two actors: a
    run that could never start brings no sandbox up."""
    from e2e_reme.cluster import Fleet
    from .rl_workers import check_resources
    check_resources(config)
    return Fleet(config.fleet).start(progress=say)


def _sync(rollout, trainer, checkpoint: Path, say) -> None:
    """The new weights to the rollout worker (a worker found dead is replaced, then synced)."""
    import ray
    try:
        rollout.sync(trainer.weights(), checkpoint)
    except ray.exceptions.RayActorError as e:
        rollout.restart(type(e).__name__, say)
        rollout.sync(trainer.weights(), checkpoint)


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
