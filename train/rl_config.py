"""The reinforcement fine-tuning run's configuration: one frozen object, built from a YAML
file plus `key=value` overrides by one loader, saved whole beside the run's results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from .data import DataConfig
from .errors import TrainError
from .model import check_keys
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
    model: str = ""                    # the model to start from (an SFT export or any model directory)
    steps: int = 20
    seed: int = 0
    keep_checkpoints: int = 2
    ray_address: str | None = None     # None: RAY_ADDRESS (set by `ray job submit`), else a local Ray
    data: DataConfig = DataConfig()    # the training cases: verified expert traces, held-out split excluded
    rollout: RolloutConfig = RolloutConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    update: UpdateConfig = UpdateConfig()
    fleet: Any = None                  # cluster.FleetConfig (None: its defaults)

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


def _build(cls, where: str, d: Mapping[str, Any]):
    """A frozen dataclass from a mapping: nested sections become their dataclasses, lists
    tuples; an unknown key is an error naming it and the known ones."""
    check_keys(where, d, cls)
    kw = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        default = f.default
        if f.name == "lora":
            v = None if v is None else _build(LoraConfig, f"{where}.lora", v)
        elif is_dataclass(default) and isinstance(v, Mapping):
            v = DataConfig.from_dict(v) if isinstance(default, DataConfig) else _build(type(default), f"{where}.{f.name}", v)
        elif isinstance(v, list):
            v = tuple(v)
        kw[f.name] = v
    return cls(**kw)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RLConfig:
    """The run's config: the YAML file, then `section.key=value` overrides (values parsed as
    YAML: `steps=3`, `objective.algorithm=reinforce`, `update.lora=null`)."""
    import yaml
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise TrainError(f"rl config {p}: no such file (see configs/rl-cpu.yaml)")
        d = yaml.safe_load(p.read_text()) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise TrainError(f"override '{item}': write it as section.key=value, e.g. steps=3")
        node = d
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise TrainError(f"override '{item}': {k} is not a section")
        node[leaf] = yaml.safe_load(raw)
    fleet = d.pop("fleet", None)
    cfg = _build(RLConfig, "rl config", d)
    if fleet is not None or cfg.fleet is None:
        from e2e_reme.cluster.experience import CollectConfig
        cfg = replace(cfg, fleet=CollectConfig.from_dict({"fleet": fleet or {}}).fleet)
    cfg.check()
    return cfg


__all__ = ["ObjectiveConfig", "RLConfig", "RolloutConfig", "UpdateConfig", "load_config"]
