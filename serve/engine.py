"""The model behind the server: a rollout engine (train/rollout.py) and what it is.

    engine, info = load_engine("runs/models/gemma3-270m", kind="auto")
    info  # {"name": "gemma3-270m", "path": ..., "engine": "transformers", "base": None, "adapter": None}

A model directory is what `save_pretrained()` wrote. An SFT or RL checkpoint trained with
LoRA (train/sft.py `write_model_dir`, used by train/rl.py too) is one: the merged weights
beside the adapter in `adapter/`; it is served as the merged model (any engine) and
reported with its adapter and base (and `rl_step` from `rl_state.json`). A bare LoRA
adapter directory (peft's `adapter_config.json` + adapter weights: base + adapter) is
loaded as its base model with the adapter merged in at load, on the transformers engine;
its base is `base_model_name_or_path`, resolved relative to the adapter directory when it
is a relative path. A release (releases/<name>: manifest.json, train/release.py) is checked
against its manifest and loaded as its base with its adapter merged (cached after the first
load); it is reported with its release directory and name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from e2e_reme.train.errors import ModelDirError, TrainError
from e2e_reme.train.rollout import RolloutEngine, TransformersEngine, make_engine

ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(path: Path) -> Path:
    """The base model directory of a LoRA adapter directory."""
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelDirError(f"adapter directory {path}: {ADAPTER_CONFIG} is not readable JSON ({e})") from None
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelDirError(f"adapter directory {path}: {ADAPTER_CONFIG} names no base_model_name_or_path; "
                            f"set it to the base model's directory")
    b = Path(base).expanduser()
    if not b.is_absolute() and (path / b).is_dir():
        b = path / b
    if not b.is_dir():
        raise ModelDirError(f"adapter directory {path}: its base model {base} is not a local directory; "
                            f"set base_model_name_or_path in {ADAPTER_CONFIG} to the base model's directory")
    return b.resolve()


def load_engine(path: str | Path, kind: str = "auto", device: str = "auto", dtype: str = "auto",
                batch_size: int = 8) -> tuple[RolloutEngine, dict]:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelDirError(f"model directory {p}: not found; give a local Hugging Face model directory "
                            f"(e.g. runs/models/gemma3-270m from `remed model import`) or a release (releases/<name>)")
    from e2e_reme.train.release import is_release, materialize, read_manifest
    if is_release(p):
        release = p.resolve()
        engine, info = load_engine(materialize(release), kind=kind, device=device, dtype=dtype, batch_size=batch_size)
        m = read_manifest(release)
        info.update(name=m["name"], release=str(release), adapter=str(release / "adapter"), merged=True,
                    base=m["base"].get("package") or m["base"].get("source"))
        return engine, info
    p = p.resolve()
    if (p / ADAPTER_CONFIG).is_file():
        if kind == "vllm":
            raise TrainError(f"{p} is a LoRA adapter: serve it with engine transformers (it is merged into its "
                             f"base at load), or merge it into a model directory for vLLM")
        base = adapter_base(p)
        from e2e_reme.train.model import load_model
        chat_model = load_model(base, device=device, dtype=dtype)
        try:
            from peft import PeftModel
        except ImportError:
            raise TrainError("serving a LoRA adapter needs peft: pip install peft") from None
        chat_model.model = PeftModel.from_pretrained(chat_model.model, str(p)).merge_and_unload()
        chat_model.model.eval()
        engine: Any = TransformersEngine(chat_model, batch_size=batch_size)
        engine.path = p
        info = {"name": p.name, "path": str(p), "engine": engine.name, "base": str(base), "adapter": str(p),
                "merged": False}
        return engine, info
    engine = make_engine(str(p), kind=kind, device=device, dtype=dtype, batch_size=batch_size)
    info = {"name": p.name, "path": str(p), "engine": engine.name, "base": None, "adapter": None}
    if (p / "adapter" / ADAPTER_CONFIG).is_file():
        # An SFT/RL checkpoint trained with LoRA (train/sft.py write_model_dir): the merged
        # weights, which are what is served, and the adapter they came from in adapter/.
        try:
            cfg = json.loads((p / "adapter" / ADAPTER_CONFIG).read_text())
        except (OSError, json.JSONDecodeError):
            cfg = {}
        info.update(adapter=str(p / "adapter"), base=cfg.get("base_model_name_or_path"), merged=True)
    state = p / "rl_state.json"
    if state.is_file():
        try:
            info["rl_step"] = json.loads(state.read_text()).get("step")
        except (OSError, json.JSONDecodeError):
            pass
    return engine, info
