"""The machinery behind train/rl.py: the rollout worker (a Ray actor holding the policy in
a rollout engine), the policy update (one Ray Train fit per step, DDP over its workers),
and the run's checkpoints.

Why one fit per step: the update needs the batch only after the fleet has judged it, and
a fit that starts from the last checkpoint and ends with the next one makes every step
resumable by construction (Ctrl-C or `ray job stop` loses at most the step in flight).
Its cost (starting the workers, loading the model) is reported as part of the update
time. The new weights reach the rollout worker through Ray's object store: the driver
reads the checkpoint it was handed back once, puts its tensors in the store, and the
worker copies them into the model it holds (`RolloutWorker.sync`), so a rollout worker on
another node needs no shared storage and builds no new engine. An engine that cannot take
weights in place (vLLM) loads the checkpoint's directory instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from .rl_config import RLConfig
from .sft import load_trainable

CHECKPOINT_PREFIX = "checkpoint_"


# ---- checkpoints --------------------------------------------------------------------------------

def checkpoints(out: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    found = []
    for p in Path(out).glob(f"{CHECKPOINT_PREFIX}*/rl_state.json"):
        try:
            found.append((json.loads(p.read_text())["step"], p.parent))
        except (OSError, ValueError, KeyError):
            continue    # cut short: not resumable
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    cps = checkpoints(out)
    return cps[-1] if cps else None


def step_of(checkpoint: Path | None) -> int:
    return 0 if checkpoint is None else int(json.loads((checkpoint / "rl_state.json").read_text())["step"])


def _keep(out: Path, n: int) -> None:
    for old in checkpoints(out)[:-max(1, n)]:
        shutil.rmtree(old, ignore_errors=True)


# ---- rollout ------------------------------------------------------------------------------------

class RolloutWorker:
    """A rollout engine in a Ray actor (train/rollout.py: transformers on CPU, vLLM on GPU)."""

    def __init__(self, model_dir: str, kind: str = "auto", batch_size: int = 8, threads: int = 1):
        import torch
        torch.set_num_threads(max(1, threads))
        self.kind, self.batch_size = kind, batch_size
        self.load(model_dir)

    def load(self, model_dir: str) -> str:
        """A new engine for a model directory (the first load, or an engine that cannot take
        weights in place)."""
        from .rollout import make_engine
        self.engine = make_engine(model_dir, kind=self.kind, batch_size=self.batch_size)
        self.model_dir = model_dir
        return model_dir

    def sync(self, weights: dict | None, model_dir: str) -> str:
        """The sync after each update: `weights` (the checkpoint's tensors, from the object
        store) copied into the engine's model in place; without them, or for an engine
        without `load_weights`, the checkpoint's directory is loaded."""
        if weights is None or not hasattr(self.engine, "load_weights"):
            return self.load(model_dir)
        self.engine.load_weights(weights)
        self.model_dir = model_dir
        return "object store"

    def generate(self, prompts: list, params: dict) -> list[list[dict]]:
        from .rollout import SamplingParams
        outs = self.engine.generate(prompts, SamplingParams(**params))
        return [[asdict(c) for c in group] for group in outs]

    def answer_ids(self, texts: list[str]) -> list[list[int]]:
        from .format import answer_ids
        return [answer_ids(self.engine.tokenizer, t) for t in texts]

    def prompt_ids(self, messages: list) -> list[int]:
        from .format import prompt_ids
        return prompt_ids(self.engine.tokenizer, messages)


def checkpoint_weights(checkpoint: Path) -> dict:
    """The tensors of a checkpoint's model (its top-level safetensors files; a LoRA
    checkpoint's adapter/ is not the model), as the rollout workers receive them."""
    from safetensors.torch import load_file
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no model weights (*.safetensors) to send to the rollout workers")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


# ---- the rollout worker as the loop drives it: restarted when lost, synced through the object store ----

def rollout_actor_name(out: Path, restarts: int) -> str:
    """The rollout worker's actor name (in the run's namespace): the `restarts`-th of this run."""
    return f"rl-rollout-{os.getpid()}-{restarts}:{Path(out).name}"


class Rollout:
    """The rollout worker (a Ray actor), and its replacement when it dies: a lost worker
    costs the step the time to start another from the current weights and to generate
    its groups again, never the run (`restarts` counts them)."""

    def __init__(self, config: RLConfig, source: Path, out: Path):
        self.config, self.out, self.restarts = config, out, 0
        self.actor = self._start(source)

    def _start(self, source: Path):
        import ray
        r = self.config.rollout
        return (ray.remote(num_cpus=1)(RolloutWorker)
                .options(name=rollout_actor_name(self.out, self.restarts))
                .remote(str(source), r.engine, r.batch_size))

    def _restart(self, source: Path, why: Exception, say) -> None:
        import ray
        ray.kill(self.actor)
        self.restarts += 1
        say(f"rollout worker lost ({type(why).__name__}); starting another from {Path(source).name}")
        self.actor = self._start(source)

    def submit(self, cases: list[dict], step: int) -> dict:
        """Start generating the group of each case; returns at once."""
        r, a = self.config.rollout, self.actor
        params = {"temperature": r.temperature, "top_p": r.top_p, "max_tokens": r.max_tokens, "n": r.group_size,
                  "seed": self.config.seed * 100003 + step}
        return {"cases": cases, "step": step, "actor": a,
                "groups": a.generate.remote([c["messages"] for c in cases], params) if r.group_size else None,
                "expert_ids": a.answer_ids.remote([c["expert"] for c in cases]) if r.expert_per_group else None}

    def samples(self, pending: dict, source: Path, say) -> list[dict]:
        """The groups of a submitted batch; if the worker that had them died, generated
        again by a new one (from `source`, the current weights)."""
        import ray
        try:
            return rollout_samples(pending, self.config)
        except ray.exceptions.RayActorError as e:
            if pending["actor"] is self.actor:
                self._restart(source, e, say)
            return rollout_samples(self.submit(pending["cases"], pending["step"]), self.config)

    def sync(self, checkpoint: Path, say) -> None:
        """The new weights to the worker (a worker found dead is replaced, loading them)."""
        import ray
        try:
            sync_weights(self.actor, checkpoint)
        except ray.exceptions.RayActorError as e:
            self._restart(checkpoint, e, say)

    def close(self) -> None:
        import ray
        ray.kill(self.actor)


def rollout_samples(pending: dict, config: RLConfig) -> list[dict]:
    """The group of each case: sampled completions, then the expert's answer if configured."""
    import ray
    cases, actor = pending["cases"], pending["actor"]
    groups = ray.get(pending["groups"]) if pending["groups"] is not None else [[]] * len(cases)
    expert_ids = ray.get(pending["expert_ids"]) if pending["expert_ids"] is not None else []
    samples = []
    for i, (case, group) in enumerate(zip(cases, groups)):
        prompt = group[0]["prompt_ids"] if group else ray.get(actor.prompt_ids.remote(case["messages"]))
        for c in group:
            samples.append({"case": i, "text": c["text"], "prompt_ids": prompt, "completion_ids": c["completion_ids"],
                            "old_logprobs": c["logprobs"], "expert": False})
        for _ in range(config.rollout.expert_per_group):
            samples.append({"case": i, "text": case["expert"], "prompt_ids": prompt, "completion_ids": expert_ids[i],
                            "old_logprobs": None, "expert": True})
    return samples


def sync_weights(rollout, checkpoint: Path) -> None:
    """The new weights to the rollout worker through the object store: read once here, put
    once, copied in place by the worker (which needs no access to `out`)."""
    import ray
    weights = ray.put(checkpoint_weights(checkpoint))
    try:
        ray.get(rollout.sync.remote(weights, str(checkpoint)))
    finally:
        del weights     # the store frees the copy once the worker has it


# ---- the update ---------------------------------------------------------------------------------

def use_gpu(config: RLConfig) -> bool:
    u = config.update.use_gpu
    if u in ("true", "false"):
        return u == "true"
    import torch
    return torch.cuda.is_available()


def update(config: RLConfig, out: Path, step: int, source: Path, batch: list[dict]) -> tuple[Path, dict]:
    """One optimizer step on `batch` (sequences with their advantages), from `source` (the
    last checkpoint or the starting model); returns the new checkpoint and the step's
    statistics. Runs as a Ray Train fit with `update.workers` DDP workers."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = use_gpu(config)
    u = config.update
    loop_config = {"base": config.model, "source": str(source), "step": step, "batch": batch,
                   "update": u, "objective": config.objective, "gpu": gpu, "seed": config.seed}
    trainer = TorchTrainer(
        update_loop, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=u.workers, use_gpu=gpu,
                                     resources_per_worker=None if gpu else {"CPU": u.threads_per_worker}),
        run_config=RunConfig(name=f"update-{step:06d}", storage_path=str((out / "ray").resolve()),
                             failure_config=FailureConfig(max_failures=0)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the update of step {step} wrote no checkpoint: {result.error}")
    dest = out / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(result.checkpoint.path, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    shutil.rmtree(out / "ray" / f"update-{step:06d}", ignore_errors=True)
    _keep(out, config.keep_checkpoints)
    return dest, dict(result.metrics or {})


def completion_logprobs(model, prompt_ids: list[int], completion_ids: list[int], device):
    """log p(completion token t | prompt, completion[:t]) for every completion token, as
    [1, len(completion)]: logits only over the completion's positions."""
    import torch
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    n = len(completion_ids)
    logits = model(input_ids=ids, logits_to_keep=n + 1).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(2, ids[:, -n:].unsqueeze(2)).squeeze(2)


def update_loop(cfg: dict) -> None:
    """One optimizer step, in each Ray Train worker; rank 0 writes the checkpoint."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from .objective import policy_loss

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    u, o = cfg["update"], cfg["objective"]
    if not cfg["gpu"]:
        torch.set_num_threads(max(1, int(u.threads_per_worker)))
    torch.manual_seed(cfg["seed"] + cfg["step"] * 1000 + rank)
    device = ray.train.torch.get_device()
    t0 = time.monotonic()
    model = load_trainable(cfg["base"], cfg["source"], u.lora).to(device)
    ref = None
    if o.kl_coef:
        from transformers import AutoModelForCausalLM
        ref = AutoModelForCausalLM.from_pretrained(cfg["base"], local_files_only=True, dtype=torch.float32).to(device)
    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=u.lr, betas=(0.9, 0.95), weight_decay=u.weight_decay)
    if (Path(cfg["source"]) / "optimizer.pt").is_file():
        opt.load_state_dict(torch.load(Path(cfg["source"]) / "optimizer.pt", map_location="cpu", weights_only=True))
    load_s = time.monotonic() - t0

    # The sequences that enter the loss, split over the workers; the loss of each is
    # weighted so that the sum over every worker is the objective's mean (token-level for
    # grpo, sequence-level for reinforce), times the world size because DDP averages.
    seqs = [s for s in cfg["batch"] if s["keep"] and s["completion_ids"]]
    tokens_all = sum(len(s["completion_ids"]) for s in seqs)
    mine = seqs[rank::world]
    model.train()
    stats_sum = {"loss": 0.0, "clip_fraction": 0.0, "approx_kl_old": 0.0, "kl_ref": 0.0}
    for k, s in enumerate(mine):
        sync = k == len(mine) - 1 or not hasattr(model, "no_sync")
        with (model.no_sync() if not sync else _null()):
            lp = completion_logprobs(model, s["prompt_ids"], s["completion_ids"], device)
            old = (torch.tensor([s["old_logprobs"]], device=device) if s["old_logprobs"] is not None
                   else lp.detach())   # an expert answer: no sampling logprobs, ratio 1
            ref_lp = None
            if ref is not None:
                with torch.no_grad():
                    ref_lp = completion_logprobs(ref, s["prompt_ids"], s["completion_ids"], device)
            loss, st = policy_loss(lp, old, torch.tensor([s["advantage"]], device=device), torch.ones_like(lp),
                                   algorithm=o.algorithm, clip_low=o.clip_low, clip_high=o.clip_high,
                                   ref_logprobs=ref_lp, kl_coef=o.kl_coef)
            weight = (lp.shape[1] / tokens_all) if o.algorithm == "grpo" else 1.0 / len(seqs)
            (loss * weight * world).backward()
        for key in stats_sum:
            stats_sum[key] += st.get(key, 0.0) * weight
    if not mine:    # a worker with nothing to learn from this step still joins the all-reduce
        (sum(p.sum() for p in params) * 0.0).backward()
    norm = torch.nn.utils.clip_grad_norm_(params, u.grad_clip) if u.grad_clip else torch.tensor(0.0)
    if seqs:
        opt.step()
    vec = torch.tensor([stats_sum[k] for k in stats_sum], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(vec)
    metrics = {k: round(float(v), 6) for k, v in zip(stats_sum, vec)}
    metrics.update(step=cfg["step"], sequences=len(seqs), completion_tokens=tokens_all, grad_norm=round(float(norm), 4),
                   load_s=round(load_s, 2), update_s=round(time.monotonic() - t0, 2))
    _report(model, opt, metrics, cfg, rank)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _report(model, opt, metrics: dict, cfg: dict, rank: int) -> None:
    import ray.train
    from .sft import write_model_dir
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="rl-ckpt-") as d:
        write_model_dir(model, opt, cfg["base"], d)   # the merged model is what the rollout engine loads
        Path(d, "rl_state.json").write_text(json.dumps({"step": cfg["step"], "metrics": metrics}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


__all__ = ["CHECKPOINT_PREFIX", "Rollout", "RolloutWorker", "checkpoint_weights", "checkpoints", "rollout_actor_name",
           "rollout_samples", "sync_weights", "completion_logprobs", "latest_checkpoint",
           "step_of", "update", "update_loop", "use_gpu"]
