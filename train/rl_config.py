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
    scenarios_per_step: int = 2        # training cases per step
    group_size: int = 4                # completions sampled per case (GRPO's group)
    expert_per_group: int = 0          # the case's verified expert answer joins its group this many times
                                       # (judged like any completion; 0: pure on-policy RL)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    engine: str = "auto"               # auto | transformers | vllm
    batch_size: int = 8                # sequences per generate() call of the transformers engine
    overlap: bool = True               # generate the next step's groups while this step's are judged
                                       # (one step stale; the ratio uses their stored logprobs)


@dataclass(frozen=True)
class ObjectiveConfig:
    algorithm: str = "grpo"            # grpo | reinforce (train/objective.py)
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0               # k3 KL to the starting model; 0: off (no reference pass)
    advantage_scale: str = "std"       # std (GRPO) | none (Dr. GRPO)


@dataclass(frozen=True)
class UpdateConfig:
    workers: int = 1                   # Ray Train workers (DDP replicas)
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
    fleet: FleetConfig = FleetConfig() # the sandboxes that judge the completions

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


__all__ = ["ObjectiveConfig", "RLConfig", "RolloutConfig", "UpdateConfig", "load_config"]
