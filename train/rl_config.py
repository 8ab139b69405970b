"""The reinforcement fine-tuning run's configuration: one frozen object, built from a YAML
file plus `key=value` overrides by one loader, saved whole beside the run's results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from e2e_reme.cluster.fleet import FleetConfig
from e2e_reme.config import load

from .data import DataConfig
from .errors import TrainError
from .objective import ALGORITHMS, SCALES
from .sft import LoraConfig


@dataclass(frozen=True)
class RolloutConfig:
    scenarios_per_step: int = 2        # groups with signal a step aims for (one training case each)
    group_size: int = 4                # completions sampled per case (GRPO's group)
    expert_per_group: int = 0          # the case's expert answer (to the observed report) joins its group this
                                       # many times (judged like any completion; 0: pure on-policy RL)
    refill_groups: int = 2             # dynamic sampling: at most this many extra groups a step, from other
                                       # cases, in place of groups whose rewards were all equal
    temperature: float = 1.0           # must be 1: the stored logprobs are the raw distribution's
    top_p: float = 1.0                 # must be 1, for the same reason
    max_tokens: int = 768              # above the longest expert answer of the training cases (checked)
    loop_span: int = 0                 # > 0: stop a completion that repeats one block (train/rollout.py)
    engine: str = "auto"               # auto | transformers | vllm
    batch_size: int = 8                # sequences per generate() call of the transformers engine
    cpus: int = 0                      # the rollout worker's CPUs (Ray) and torch threads; 0: the node's cores
    gpus: float = 0.0                  # the rollout worker's GPUs (vllm: 1)


@dataclass(frozen=True)
class ObjectiveConfig:
    algorithm: str = "grpo"            # grpo | reinforce (train/objective.py)
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0               # k3 KL to the starting model; 0: off (no reference pass)
    advantage_scale: str = "std"       # std (GRPO) | none (Dr. GRPO)


@dataclass(frozen=True)
class UpdateConfig:
    workers: int = 1                   # the trainer is one actor for the run (1 only)
    use_gpu: str = "auto"              # auto | true | false
    threads_per_worker: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora: LoraConfig | None = None


@dataclass(frozen=True)
class RLConfig:
    out: str = "runs/rl-cpu"
    model: str = ""                    # the model to start from: a release (releases/<name>, train/release.py),
                                       # an SFT export or any model directory
    steps: int = 20
    seed: int = 0
    keep_checkpoints: int = 2
    ray_address: str | None = None     # None: RAY_ADDRESS (set by `ray job submit`), else a local Ray
    root: str = ""                     # relative out/model/data.episodes are taken from here ("": the
                                       # current directory); a submitted job runs in a copy of the
                                       # working directory without runs/, so pass root=$PWD
    data: DataConfig = DataConfig()    # the training cases: verified expert traces of the train split only
                                       # (configs/splits.yaml or data.splits; train/data.py select_traces)
    rollout: RolloutConfig = RolloutConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    update: UpdateConfig = UpdateConfig()
    fleet: FleetConfig = FleetConfig(episode_timeout_s=3600.0)   # the sandboxes that judge the completions;
                                       # a job is a whole group (observe, generate, G episodes): its timeout too

    def check(self) -> None:
        r, o, u = self.rollout, self.objective, self.update
        if not self.model:
            raise TrainError("rl config: model is empty; name the model directory to start from (an SFT export, "
                             "e.g. runs/sft-cpu/model)")
        if self.steps < 1:
            raise TrainError("rl config: steps must be at least 1")
        if r.scenarios_per_step < 1 or r.group_size < 0 or r.expert_per_group < 0:
            raise TrainError("rl config: rollout.scenarios_per_step >= 1, group_size and expert_per_group >= 0")
        if r.group_size + r.expert_per_group < 2:
            raise TrainError("rl config: a group needs at least two completions (rollout.group_size + "
                             "rollout.expert_per_group >= 2) to have a baseline")
        if o.algorithm not in ALGORITHMS:
            raise TrainError(f"rl config: objective.algorithm '{o.algorithm}': use one of {', '.join(ALGORITHMS)}")
        if o.advantage_scale not in SCALES:
            raise TrainError(f"rl config: objective.advantage_scale '{o.advantage_scale}': use {', '.join(SCALES)}")
        if u.use_gpu not in ("auto", "true", "false"):
            raise TrainError(f"rl config: update.use_gpu '{u.use_gpu}': use auto, true or false")
        if r.temperature != 1.0 or r.top_p != 1.0:
            raise TrainError(f"rl config: rollout.temperature {r.temperature:g} and top_p {r.top_p:g}: both must be 1; "
                             "the engines store the log-probabilities of the raw (temperature 1, full) distribution, "
                             "so any other sampling makes the objective's ratio and REINFORCE's gradient wrong")
        if r.refill_groups < 0 or r.max_tokens < 1 or r.cpus < 0 or r.gpus < 0:
            raise TrainError("rl config: rollout.refill_groups, cpus and gpus >= 0, max_tokens >= 1")
        if r.engine == "vllm" and not r.gpus:
            raise TrainError("rl config: rollout.engine vllm needs its GPU: set rollout.gpus: 1")
        if self.fleet.episode_timeout_s < 1200:
            raise TrainError(f"rl config: fleet.episode_timeout_s {self.fleet.episode_timeout_s:g}: a judge's job is a "
                             "whole group (observe, generate, one episode per completion); give it 1200 s or more "
                             "(3600 in configs/rl-cpu.yaml)")
        if u.workers != 1:
            raise TrainError(f"rl config: update.workers {u.workers}: the trainer is one actor for the run "
                             "(one GPU or the CPU); set update.workers: 1")

    def to_dict(self) -> dict:
        return asdict(self)

    def absolute(self) -> "RLConfig":
        """The same run with its paths made absolute (from `root`): Ray Train workers and the
        rollout worker run in directories of their own."""
        base = Path(self.root or ".").absolute()

        def at(p: str) -> str:
            return str(p if Path(p).is_absolute() else base / p) if p else p
        return replace(self, out=at(self.out), model=at(self.model),
                       data=replace(self.data, episodes=tuple(at(e) for e in self.data.episodes),
                                    splits=at(self.data.splits)))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RLConfig:
    """The run's config: the YAML file, then `section.key=value` overrides (values parsed as
    YAML: `steps=3`, `objective.algorithm=reinforce`, `update.lora=null`)."""
    if path is not None and not Path(path).is_file():
        raise TrainError(f"rl config {path}: no such file (see configs/rl-cpu.yaml)")
    cfg = load(RLConfig, path, overrides, "rl config", TrainError)
    cfg.check()
    cfg = cfg.absolute()
    from .release import model_dir
    return replace(cfg, model=str(model_dir(cfg.model)))     # a release: its base + adapter, checked


def check_generation_limit(config: RLConfig, answers: list[str]) -> int:
    """The longest of `answers` (the training cases' expert answers) in the model's tokens,
    end of turn included; a TrainError if `rollout.max_tokens` would cut it: a completion
    as long as a correct answer would be truncated and fail, and its group carry no signal."""
    if not answers:
        return 0
    from transformers import AutoTokenizer
    from .format import answer_ids
    tok = AutoTokenizer.from_pretrained(config.model, local_files_only=True)
    longest = max(len(answer_ids(tok, a)) for a in answers)
    if longest > config.rollout.max_tokens:
        raise TrainError(f"rl config: rollout.max_tokens {config.rollout.max_tokens} is below the longest expert answer "
                         f"of the training cases ({longest} tokens): a correct completion would be cut; raise it "
                         f"above {longest}")
    return longest


__all__ = ["check_generation_limit", "ObjectiveConfig", "RLConfig", "RolloutConfig", "UpdateConfig", "load_config"]
