"""The training stage: the policy model, the one prompt format with token ids, rollout
engines, and expert-guided SFT on Ray Train judged by execution.

    from e2e_reme.train import init_model, load_model, make_engine, SamplingParams, run_sft, SFTConfig

    model.py     tiny models from a config (+ a tokenizer trained on our corpus); loading any local HF model
    format.py    the prompt format (simulators' build_messages / extract_yaml) with ids and answer masks
    rollout.py   RolloutEngine: transformers `generate` (CPU/GPU) and vLLM (GPU), ids + logprobs
    data.py      verified runbook traces -> held-out split -> honest augmentation -> examples
    sft.py       the SFT trainer (Ray Train TorchTrainer, DDP/FSDP, LoRA, HF checkpoints, resume)
    evaluate.py  held-out execution success per fault type, failure stages, tokens
    collect.py   `remed train collect`: the expert traces SFT needs, from real episodes

Nothing is imported at package import time (torch and Ray load when used).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "model", "TokenizerConfig": "model", "init_model": "model", "load_model": "model",
    "check_model_dir": "model", "train_tokenizer": "model",
    "build_messages": "format", "extract_yaml": "format", "encode_example": "format", "prompt_ids": "format",
    "answer_text": "format",
    "SamplingParams": "rollout", "Completion": "rollout", "TransformersEngine": "rollout", "VLLMEngine": "rollout",
    "make_engine": "rollout", "EngineChatModel": "rollout",
    "DataConfig": "data", "build_sft_data": "data", "read_episodes": "data",
    "SFTConfig": "sft", "TrainConfig": "sft", "run_sft": "sft",
    "EvalConfig": "evaluate", "run_eval": "evaluate",
    "TrainError": "errors", "ModelDirError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
