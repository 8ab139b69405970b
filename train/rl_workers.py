"""The machinery behind train/rl.py: the rollout worker (a Ray actor holding the policy in
a rollout engine), the trainer (a Ray actor holding the model being trained and its
optimizer for the whole run), and the run's checkpoints.

One trainer for the run. The trainer actor loads the model once (from the starting model,
or from the last checkpoint of `out` when a run resumes), keeps it and the optimizer's
state across steps, and takes one optimizer step per `update(batch)`; after each step it
writes a checkpoint (the adapter and the optimizer's state to resume from, the merged
model to evaluate), so every step stays resumable. A trainer lost mid-run (its node gone)
costs that step's update: a new one starts from the last checkpoint.

What moves to the rollout worker after an update: with LoRA, only the adapter's tensors
(`TrainerWorker.weights`: a few MB), put once in Ray's object store and copied into the
adapter the worker's engine carries on its model (`RolloutWorker.sync`); without LoRA,
the whole state dict the same way. The driver never holds them (it passes the object
reference on), and a worker on another node needs no shared storage. An engine that cannot
take weights in place (vLLM) loads the checkpoint's merged model directory instead.

Resources (`actor_options`): the rollout worker asks for `rollout.cpus` CPUs (0: the
node's cores, which the loop leaves to it while it generates: the trainer and the
sandboxes wait meanwhile) and `rollout.gpus` GPUs (vLLM needs one); the trainer for
`update.threads_per_worker` CPUs, or one GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from .errors import TrainError
from .rl_config import RLConfig

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


# ---- resources ----------------------------------------------------------------------------------

def use_gpu(config: RLConfig) -> bool:
    u = config.update.use_gpu
    if u in ("true", "false"):
        return u == "true"
    import torch
    return torch.cuda.is_available()


def rollout_threads(config: RLConfig) -> int:
    return int(config.rollout.cpus) or (os.cpu_count() or 1)


def actor_options(config: RLConfig, gpu: bool | None = None) -> dict:
    """The Ray resources of the run's two actors, as `.options()` takes them:
    {"rollout": {...}, "trainer": {...}}."""
    r, u = config.rollout, config.update
    gpu = use_gpu(config) if gpu is None else gpu
    rollout = {"num_cpus": max(1, int(r.cpus) or 1), "num_gpus": float(r.gpus)}
    trainer = {"num_cpus": 1, "num_gpus": 1.0} if gpu else {"num_cpus": max(1, int(u.threads_per_worker)),
                                                            "num_gpus": 0.0}
    return {"rollout": rollout, "trainer": trainer}


def check_resources(config: RLConfig) -> None:
    """Refuse a run whose two actors the cluster cannot hold at once: Ray would leave the
    second pending and the run would wait for ever. The loop alternates generation and
    update, so on a small machine the head may advertise more CPUs than it has
    (`ray start --head --num-cpus 4` on 2 cores, as the local session does)."""
    import ray
    opts = actor_options(config)
    need = {"CPU": sum(o["num_cpus"] for o in opts.values()), "GPU": sum(o["num_gpus"] for o in opts.values())}
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if v and have.get(k, 0) < v}
    if short:
        raise TrainError("the Ray cluster cannot hold the rollout worker and the trainer at once: "
                         + ", ".join(f"{k} {v:g} asked, {h:g} there" for k, (v, h) in short.items())
                         + f" (rollout {opts['rollout']}, trainer {opts['trainer']}); start the head with more "
                         "(`ray start --head --num-cpus 4 ...` on this 2-core machine: they take turns) or ask "
                         "less (rollout.cpus, update.threads_per_worker, rollout.gpus, update.use_gpu)")


# ---- rollout ------------------------------------------------------------------------------------

def expert_answer(report: dict) -> str:
    """The expert runbook's answer to a report (a dict, DiagnosisReport.to_dict()), as the
    traces' answers are written (train/format.py answer_text)."""
    from e2e_reme.simulators.policies.expert import expert_playbook
    from .format import answer_text
    ri = {"service": report.get("service"), "fault_kind": report.get("fault_kind"), **(report.get("target") or {}),
          "evidence": report.get("evidence") or {}}
    return answer_text(expert_playbook(ri))


def report_messages(report: dict) -> list[dict]:
    """The solo prompt for a report: what SFT trained on (train/data.py trace_example)."""
    from e2e_reme.simulators.policies.prompt import build_messages
    from .data import inventory_hosts
    return build_messages(report, inventory_hosts(report), mode="solo")


class RolloutWorker:
    """A rollout engine in a Ray actor (train/rollout.py: transformers on CPU, vLLM on GPU);
    with LoRA, the engine's model carries an adapter (fresh: the model unchanged) that each
    sync overwrites."""

    def __init__(self, model_dir: str, kind: str = "auto", batch_size: int = 8, threads: int = 1,
                 lora=None):
        import torch
        torch.set_num_threads(max(1, threads))
        self.kind, self.batch_size, self.lora = kind, batch_size, lora
        self.load(model_dir)

    def load(self, model_dir: str) -> str:
        """A new engine for a model directory (the first load, or an engine that cannot take
        weights in place)."""
        from .rollout import make_engine
        self.engine = make_engine(model_dir, kind=self.kind, batch_size=self.batch_size)
        self.model_dir = model_dir
        if self.lora is not None and hasattr(self.engine, "load_weights"):
            from .sft import with_lora
            self.engine.model = with_lora(self.engine.model, self.lora)
            self.engine.model.eval()
        return model_dir

    def sync(self, weights: dict | None, model_dir: str) -> str:
        """The sync after each update: `weights` (the adapter's tensors with LoRA, else the
        model's) copied into the engine's model in place; without them, or for an engine
        without `load_weights`, the checkpoint's directory is loaded."""
        if weights is None or not hasattr(self.engine, "load_weights"):
            return self.load(model_dir)
        if self.lora is not None:
            import torch
            from peft import set_peft_model_state_dict
            with torch.no_grad():
                res = set_peft_model_state_dict(self.engine.model, weights)
            if getattr(res, "unexpected_keys", None):
                raise ValueError(f"adapter tensors that fit no adapter of the rollout model: {res.unexpected_keys[:5]}")
            self.engine.model.eval()
            return "adapter"
        self.engine.load_weights(weights)
        self.model_dir = model_dir
        return "object store"

    def generate(self, prompts: list, params: dict) -> list[list[dict]]:
        from .rollout import SamplingParams
        outs = self.engine.generate(prompts, SamplingParams(**params))
        return [[asdict(c) for c in group] for group in outs]

    def answer(self, report: dict, params: dict, experts: int = 0) -> list[dict]:
        """The group for an observed report: `params["n"]` completions sampled for its solo
        prompt, then the expert's answer to it `experts` times (no sampling logprobs)."""
        from .format import answer_ids
        messages = report_messages(report)
        group = self.generate([messages], params)[0] if params.get("n") else []
        out = [{"text": c["text"], "prompt_ids": c["prompt_ids"], "completion_ids": c["completion_ids"],
                "old_logprobs": c["logprobs"], "finish_reason": c["finish_reason"], "expert": False} for c in group]
        if experts:
            text = expert_answer(report)
            prompt = out[0]["prompt_ids"] if out else self.prompt_ids(messages)
            out += [{"text": text, "prompt_ids": prompt, "completion_ids": answer_ids(self.engine.tokenizer, text),
                     "old_logprobs": None, "finish_reason": "expert", "expert": True} for _ in range(experts)]
        return out

    def prompt_ids(self, messages: list) -> list[int]:
        from .format import prompt_ids
        return prompt_ids(self.engine.tokenizer, messages)


def checkpoint_weights(checkpoint: Path) -> dict:
    """The tensors of a checkpoint's model (its top-level safetensors files; a LoRA
    checkpoint's adapter/ is not the model): what a vLLM-less engine can load in place."""
    from safetensors.torch import load_file
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint}: no model weights (*.safetensors) to send to the rollout workers")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


class Answer:
    """What a group job calls on its sandbox host with the observed report (cluster/judge.py
    Judge.groups): the rollout worker's group for it. Picklable: an actor handle inside."""

    def __init__(self, actor, params: dict, experts: int = 0):
        self.actor, self.params, self.experts = actor, dict(params), int(experts)

    def __call__(self, scenario, report: dict) -> list[dict]:
        import ray
        return ray.get(self.actor.answer.remote(report, self.params, self.experts))


class RunbookAnswer:
    """A group answered by the expert runbook: its answer to the observed report `n` times,
    then the texts of `also[scenario.id]` (answers written elsewhere, e.g. to a report
    recorded in another sandbox). The reference the judge is checked against."""

    def __init__(self, n: int = 1, also: dict | None = None):
        self.n, self.also = int(n), dict(also or {})

    def __call__(self, scenario, report: dict) -> list[dict]:
        texts = [expert_answer(report)] * self.n + list(self.also.get(scenario.id, []))
        return [{"text": t, "prompt_ids": [], "completion_ids": None, "old_logprobs": None,
                 "finish_reason": "expert", "expert": True} for t in texts]


def rollout_actor_name(out: Path, restarts: int) -> str:
    """The rollout worker's actor name (in the run's namespace): the `restarts`-th of this run."""
    return f"rl-rollout-{os.getpid()}-{restarts}:{Path(out).name}"


def trainer_actor_name(out: Path, restarts: int) -> str:
    return f"rl-trainer-{os.getpid()}-{restarts}:{Path(out).name}"


class Rollout:
    """The rollout worker (a Ray actor), and its replacement when it dies: a lost worker
    costs the step the time to start another from the current weights and to answer its
    groups again, never the run (`restarts` counts them)."""

    def __init__(self, config: RLConfig, out: Path):
        self.config, self.out, self.restarts = config, out, 0
        self.actor = self._start()

    def _start(self):
        import ray
        r = self.config.rollout
        opts = actor_options(self.config)["rollout"]
        return (ray.remote(RolloutWorker).options(name=rollout_actor_name(self.out, self.restarts), **opts)
                .remote(self.config.model, r.engine, r.batch_size, rollout_threads(self.config), self.config.update.lora))

    def restart(self, why: str, say) -> None:
        import ray
        ray.kill(self.actor)
        self.restarts += 1
        say(f"rollout worker lost ({why}); starting another")
        self.actor = self._start()

    def answer(self, step: int, seed: int) -> Answer:
        r = self.config.rollout
        params = {"temperature": r.temperature, "top_p": r.top_p, "max_tokens": r.max_tokens, "n": r.group_size,
                  "seed": seed, "loop_span": r.loop_span}
        return Answer(self.actor, params, r.expert_per_group)

    def sync(self, weights_ref, checkpoint: Path | None) -> str:
        """The trainer's weights (an object reference: they never pass through the driver)
        to the worker; raises RayActorError if it is gone."""
        import ray
        return ray.get(self.actor.sync.remote(weights_ref, str(checkpoint or self.config.model)))

    def close(self) -> None:
        import ray
        ray.kill(self.actor)


# ---- the trainer --------------------------------------------------------------------------------

def completion_logprobs(model, prompt_ids: list[int], completion_ids: list[int], device):
    """log p(completion token t | prompt, completion[:t]) for every completion token, as
    [1, len(completion)]: logits only over the completion's positions."""
    import torch
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    n = len(completion_ids)
    logits = model(input_ids=ids, logits_to_keep=n + 1).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(2, ids[:, -n:].unsqueeze(2)).squeeze(2)


class TrainerWorker:
    """The model being trained and its optimizer, for the whole run (a Ray actor)."""

    def __init__(self, base: str, source: str, update, objective, gpu: bool, seed: int):
        import torch
        from .sft import load_trainable
        self.base, self.u, self.o, self.seed = base, update, objective, seed
        if not gpu:
            torch.set_num_threads(max(1, int(update.threads_per_worker)))
        self.device = torch.device("cuda" if gpu else "cpu")
        t0 = time.monotonic()
        self.model = load_trainable(base, source, update.lora).to(self.device)
        self.ref = None
        if objective.kl_coef:
            from transformers import AutoModelForCausalLM
            self.ref = AutoModelForCausalLM.from_pretrained(base, local_files_only=True,
                                                            dtype=torch.float32).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=update.lr, betas=(0.9, 0.95), weight_decay=update.weight_decay)
        if (Path(source) / "optimizer.pt").is_file():
            self.opt.load_state_dict(torch.load(Path(source) / "optimizer.pt", map_location="cpu", weights_only=True))
        self.load_s = round(time.monotonic() - t0, 2)

    def update(self, step: int, batch: list[dict]) -> dict:
        """One optimizer step on the sequences of `batch` that enter the loss (`keep`): the
        objective's mean (token-level for grpo, sequence-level for reinforce)."""
        import torch
        from .objective import policy_loss
        t0 = time.monotonic()
        torch.manual_seed(self.seed + step * 1000)
        seqs = [s for s in batch if s["keep"] and s["completion_ids"]]
        tokens_all = sum(len(s["completion_ids"]) for s in seqs)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        stats_sum = {"loss": 0.0, "clip_fraction": 0.0, "approx_kl_old": 0.0, "kl_ref": 0.0}
        for s in seqs:
            lp = completion_logprobs(self.model, s["prompt_ids"], s["completion_ids"], self.device)
            old = (torch.tensor([s["old_logprobs"]], device=self.device) if s["old_logprobs"] is not None
                   else lp.detach())   # an expert answer: no sampling logprobs, ratio 1
            ref_lp = None
            if self.ref is not None:
                with torch.no_grad():
                    ref_lp = completion_logprobs(self.ref, s["prompt_ids"], s["completion_ids"], self.device)
            loss, st = policy_loss(lp, old, torch.tensor([s["advantage"]], device=self.device), torch.ones_like(lp),
                                   algorithm=self.o.algorithm, clip_low=self.o.clip_low, clip_high=self.o.clip_high,
                                   ref_logprobs=ref_lp, kl_coef=self.o.kl_coef)
            weight = (lp.shape[1] / tokens_all) if self.o.algorithm == "grpo" else 1.0 / len(seqs)
            (loss * weight).backward()
            for key in stats_sum:
                stats_sum[key] += st.get(key, 0.0) * weight
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.u.grad_clip) if self.u.grad_clip else torch.tensor(0.0)
        if seqs:
            self.opt.step()
        self.model.eval()
        return {**{k: round(float(v), 6) for k, v in stats_sum.items()}, "step": step, "sequences": len(seqs),
                "completion_tokens": tokens_all, "grad_norm": round(float(norm), 4),
                "update_s": round(time.monotonic() - t0, 2)}

    def weights(self) -> dict:
        """What the rollout worker needs after an update: the adapter's tensors (LoRA), else
        the model's state dict; on the CPU."""
        if hasattr(self.model, "peft_config"):
            from peft import get_peft_model_state_dict
            state = get_peft_model_state_dict(self.model)
        else:
            state = self.model.state_dict()
        return {k: v.detach().to("cpu").clone() for k, v in state.items()}

    def save(self, d: str, step: int, metrics: dict) -> str:
        """A checkpoint in `d`: what `load_trainable` resumes from and what evaluates as a model."""
        from .sft import write_model_dir
        write_model_dir(self.model, self.opt, self.base, d)
        Path(d, "rl_state.json").write_text(json.dumps({"step": step, "metrics": metrics}))
        return d


class Trainer:
    """The trainer actor as the loop drives it: started once (from `source`), restarted
    from the last checkpoint when lost."""

    def __init__(self, config: RLConfig, source: Path, out: Path):
        self.config, self.out, self.restarts = config, out, 0
        self.actor = self._start(source)

    def _start(self, source: Path):
        import ray
        c = self.config
        opts = actor_options(c)["trainer"]
        return (ray.remote(TrainerWorker).options(name=trainer_actor_name(self.out, self.restarts), **opts)
                .remote(c.model, str(source), c.update, c.objective, use_gpu(c), c.seed))

    def restart(self, source: Path, say) -> None:
        import ray
        ray.kill(self.actor)
        self.restarts += 1
        say(f"trainer lost; starting another from {Path(source).name}")
        self.actor = self._start(source)

    def weights(self):
        return self.actor.weights.remote()

    def update(self, step: int, batch: list[dict]) -> tuple[Path, dict]:
        """One optimizer step and its checkpoint (written beside, then renamed: a cut write
        leaves no checkpoint); the old ones beyond `keep_checkpoints` removed."""
        import ray
        metrics = ray.get(self.actor.update.remote(step, batch))
        t0 = time.monotonic()
        dest = Path(self.out) / f"{CHECKPOINT_PREFIX}{step:06d}"
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ray.get(self.actor.save.remote(str(tmp), step, metrics))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        _keep(self.out, self.config.keep_checkpoints)
        return dest, {**metrics, "checkpoint_s": round(time.monotonic() - t0, 2)}

    def close(self) -> None:
        import ray
        ray.kill(self.actor)


__all__ = ["Answer", "RunbookAnswer", "CHECKPOINT_PREFIX", "checkpoint_weights", "Rollout", "RolloutWorker", "Trainer", "TrainerWorker", "actor_options",
           "checkpoints", "completion_logprobs", "expert_answer", "latest_checkpoint", "report_messages",
           "rollout_actor_name", "step_of", "trainer_actor_name", "use_gpu"]
