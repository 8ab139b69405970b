"""Expert-guided supervised fine-tuning of the policy model, on Ray Train.

The algorithm. Each example is one verified remediation: the benchmark's SoloGen prompt
for a diagnosis report (system prompt + report + inventory, `train.format`) and the
answer the expert runbook gave, which the verifier judged to have fixed the live system
(plus consistent rewrites of it, `train.data`). The model is trained by next-token
cross-entropy on the answer tokens only (the prompt is context, not target), averaged
over all answer tokens of a global batch. Workers hold a replica each (DDP; FSDP as an
option for models that do not fit one device) and see disjoint sequences of the same
global batch; the gradients are all-reduced once per optimizer step. AdamW, linear
warmup, cosine decay to `min_lr_ratio`, gradient clipping. Checkpoints are Hugging Face
model directories (plus optimizer and step), so any of them is a model the benchmark can
run; a rerun of the same command resumes from the last one. Then the final model is
judged by execution on held-out scenarios (`train.evaluate`).

A tiny model starts from random weights: it knows no language and, above all, cannot copy
(a playbook is a template plus names copied from the report: the service, its unit, its
port, a transient unit's random name). Its first `lm_steps` steps are therefore plain
language modelling (loss on every token) on windows cut from the same training
transcripts, half of them ending with the answer: a stand-in for the pretraining a real
model has had, on the training split's own text and nothing else. For a real model
`lm_steps` is 0 and every step is SFT.

What is simplified. One sequence per forward pass in SFT (no packing, no padding: the
prompts are 1.5-3.5 k tokens and similar in length); the logits are computed only over
the answer positions (`logits_to_keep`), which the loss mask allows. The learning-rate schedule is
by step, and a `time_limit_s` stops early (with a checkpoint) rather than reshaping it.
LoRA trains adapters and the final model is exported merged. No evaluation loss during
training: the score that matters is the held-out execution success at the end.

Launch (this machine, CPU, 2 DDP workers over gloo; the data first, from sandboxes):

    remed train collect --config configs/sft-tiny.yaml
    nice -n 10 remed train sft --config configs/sft-tiny.yaml

The pretrained Gemma 3 270M with LoRA on this CPU (configs/sft-cpu.yaml, docs/train.md):

    remed model import --trim-vocab 16384 --out runs/models/gemma3-270m-v16k
    nice -n 10 remed train sft --config configs/sft-cpu.yaml

A real model on a GPU (see configs/sft-gpu-example.yaml and docs/train.md):

    remed train sft --config configs/sft-gpu-example.yaml --model /models/Qwen2.5-0.5B-Instruct
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from e2e_reme.config import build

from .data import DataConfig, SFTData, build_sft_data, corpus_texts
from .errors import TrainError
from .evaluate import EvalConfig
from .format import encode_example
from .model import ModelConfig, check_model_dir, init_model

CHECKPOINT_PREFIX = "checkpoint_"


# ---- configuration ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    top_layers: int | None = None      # adapters only in the last N layers: the backward pass then stops
                                       # there (None: every layer)


@dataclass(frozen=True)
class TrainConfig:
    workers: int = 2                   # Ray Train workers (DDP replicas)
    use_gpu: str = "auto"              # auto | true | false
    threads_per_worker: int = 1        # torch intra-op threads per CPU worker
    max_steps: int = 400               # optimizer steps
    batch_size: int = 4                # sequences per optimizer step, all workers together
    lr: float = 1e-3
    lm_steps: int = 0                  # first steps: plain LM on windows of the training transcripts (a
    lm_window: int = 512               # random tiny model learns the language of reports and to copy
    lm_windows: int = 16               # names first); windows per step, all workers together
    lm_answer_share: float = 0.5       # of the windows, those ending with the answer
    lm_head: int = 0                   # >0: those windows start with the prompt's first lm_head tokens
                                       # (system prompt + the report's header, where the names are)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"            # auto (bf16 where the device has it) | bf16 | fp32
    checkpoint_every: int = 100        # steps; and always at the end
    keep_checkpoints: int = 2
    log_every: int = 5
    time_limit_s: float | None = None  # stop (with a checkpoint) after this long
    lora: LoraConfig | None = None     # train LoRA adapters instead of all weights
    fsdp: bool = False                 # shard the model (real sizes, several GPUs)
    gradient_checkpointing: bool = False
    seed: int = 0
    ray_address: str | None = None     # None: a local Ray of this machine; "auto": join a cluster


@dataclass(frozen=True)
class SFTConfig:
    out: str = "runs/sft-tiny"
    model: str = ""                    # a model directory to fine-tune; "" : init a tiny one (model_config)
    model_config: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base_dir: Path | None = None) -> "SFTConfig":
        d = dict(d or {})
        d.pop("collect", None)          # `remed train collect`'s section (train.collect)
        mc = d.get("model_config")
        if isinstance(mc, str):          # a path to the model YAML
            from e2e_reme.config import read_yaml
            d["model_config"] = read_yaml(mc, "sft config: model_config", TrainError)
        cfg = build(cls, d, "sft config", TrainError)
        cfg.check()
        return cfg

    def check(self) -> None:
        t = self.train
        if t.use_gpu not in ("auto", "true", "false"):
            raise TrainError(f"train.use_gpu '{t.use_gpu}': use auto, true or false")
        if t.precision not in ("auto", "bf16", "fp32"):
            raise TrainError(f"train.precision '{t.precision}': use auto, bf16 or fp32")
        if t.workers < 1 or t.batch_size < t.workers:
            raise TrainError(f"train.batch_size {t.batch_size} must be at least train.workers {t.workers} (>= 1)")
        if t.max_steps < 1:
            raise TrainError("train.max_steps must be at least 1")
        if t.lora and t.fsdp:
            raise TrainError("train.lora with train.fsdp is not supported: LoRA adapters are small enough for DDP")
        if t.lm_steps and self.model:
            raise TrainError("train.lm_steps is for a tiny model initialised from random weights; a given model "
                             f"({self.model}) has been pretrained: set lm_steps: 0")

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the driver: data, model, Ray Train, export, evaluation ---------------------------------------

def run_sft(config: SFTConfig, *, on_event: Callable[[str, Any], None] | None = None,
            evaluate: bool | None = None) -> dict:
    """Train (or resume) and evaluate; return the run's summary (also out/summary.json)."""
    emit = on_event or (lambda kind, payload: None)
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, config)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))

    # 1. Data: verified traces, held out by system and service, augmented.
    t0 = time.monotonic()
    data = build_sft_data(config.data)
    emit("data", data.stats())

    # 2. The base model: a given directory, or a tiny one initialised on the training split's texts
    #    (never the held-out ones), once per run directory.
    # Absolute: Ray Train workers run in a directory of their own.
    base = Path(config.model).absolute() if config.model else out / "init"
    if config.model:
        check_model_dir(base)
    elif not (base / "config.json").is_file():
        if base.exists():
            shutil.rmtree(base)      # an init interrupted half-way
        emit("init", str(base))
        init_model(config.model_config, base, corpus_texts(data.train))
    emit("model", str(base))

    # 3. Tokenise once; workers read the ids. A resumed run keeps the dataset it started with
    #    (episodes collected since then wait for a new run), so its batches stay the same.
    if latest_checkpoint(out) is not None and (out / "data" / "dataset.json").is_file():
        dataset = json.loads((out / "data" / "dataset.json").read_text())
    else:
        dataset = tokenize(data, base, out / "data", config.data.max_len)
    emit("tokens", dataset["stats"])

    # 4. Train on Ray (resuming from the last checkpoint, if any).
    prep_s = time.monotonic() - t0
    t1 = time.monotonic()
    result = fit(config, base, out, emit)
    train_s = time.monotonic() - t1

    # 5. Export the last checkpoint as the run's model.
    last = latest_checkpoint(out)
    if last is None:
        raise TrainError(f"training in {out} ended without a checkpoint; see {out / 'ray'}")
    model_dir = export_model(last, out / "model", config, data, dataset["stats"])
    summary = {"model": str(model_dir), "checkpoint": str(last), "prep_s": round(prep_s, 1),
               "train_s": round(train_s, 1), "data": data.stats(), "tokens": dataset["stats"],
               "last_metrics": result.get("metrics")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    emit("trained", summary)

    # 6. Judge by execution on held-out scenarios.
    if evaluate if evaluate is not None else config.eval.enabled:
        from .evaluate import run_eval
        t2 = time.monotonic()
        summary["eval"] = run_eval(model_dir, config.eval, config.data.splits or None, out / "eval", on_event=emit)
        summary["eval_s"] = round(time.monotonic() - t2, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _check_resume(out: Path, config: SFTConfig) -> None:
    """A run directory resumes only the same experiment: data, model and the training
    settings that shape the weights must match (time limits and evaluation may change)."""
    saved = out / "config.json"
    if not saved.exists():
        return
    old = json.loads(saved.read_text())
    new = json.loads(json.dumps(config.to_dict(), default=str))
    volatile = {"time_limit_s", "checkpoint_every", "keep_checkpoints", "log_every", "ray_address", "max_steps"}
    diff = [k for k in ("model", "model_config", "data") if old.get(k) != new.get(k)]
    diff += [f"train.{k}" for k in new["train"] if k not in volatile and old.get("train", {}).get(k) != new["train"][k]]
    if diff:
        raise TrainError(f"{out} holds a run with another {', '.join(diff)}; resume it with the same settings "
                         f"or choose another --out")


def tokenize(data: SFTData, model_dir: Path, out: Path, max_len: int) -> dict:
    """Encode every example with the model's tokenizer into out/train.jsonl (ids, prompt
    length, meta); reused when examples and tokenizer are unchanged."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    h = hashlib.sha256()
    h.update(json.dumps([[e.messages, e.answer] for e in data.train], sort_keys=True).encode())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (model_dir / f).is_file():
            h.update((model_dir / f).read_bytes())
    h.update(str(max_len).encode())
    fp = h.hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    meta_path, path = out / "dataset.json", out / "train.jsonl"
    if meta_path.is_file() and path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp:
            return meta
    kept, too_long, prompt_tokens, answer_tokens = 0, 0, 0, 0
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for e in data.train:
            enc = encode_example(tok, e.messages, e.answer, e.meta)
            if len(enc.input_ids) > max_len:
                too_long += 1
                continue
            kept += 1
            prompt_tokens += enc.prompt_len
            answer_tokens += enc.answer_len
            f.write(json.dumps(enc.to_dict()) + "\n")
    os.replace(tmp, path)
    if not kept:
        raise TrainError(f"every example is longer than data.max_len={max_len} tokens; raise it (the model's "
                         f"max_position_embeddings permitting)")
    meta = {"fingerprint": fp, "path": str(path),
            "stats": {"examples": kept, "too_long": too_long, "prompt_tokens": prompt_tokens,
                      "answer_tokens": answer_tokens, "mean_len": round((prompt_tokens + answer_tokens) / kept, 1)}}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


def _use_gpu(config: TrainConfig) -> bool:
    if config.use_gpu == "auto":
        import torch
        return torch.cuda.is_available()
    return config.use_gpu == "true"


def fit(config: SFTConfig, base: Path, out: Path, emit) -> dict:
    import logging
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = config.train
    gpu = _use_gpu(t)
    if t.fsdp and not gpu:
        raise TrainError("train.fsdp needs GPUs (Ray Train shards with FSDP only on GPU workers); on CPU use DDP "
                         "(fsdp: false), or LoRA for a model too large to train whole")
    owns = not ray.is_initialized()
    if owns:
        # Worker output stays in Ray's session logs; the driver shows progress from metrics.jsonl.
        kw: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                                  namespace="e2e-reme-train")
        if t.ray_address:
            kw["address"] = t.ray_address
        else:
            # A fresh local Ray, never one another process started on this machine.
            kw.update(address="local", num_cpus=max(t.workers * (0 if gpu else t.threads_per_worker), 1) + 1)
        from e2e_reme.ray_auth import private_token
        private_token(create=not t.ray_address)      # a local head's token, 0600 before Ray writes one
        ray.init(**kw)
    try:
        # Resuming: Ray Train restores the run's last reported checkpoint itself (same storage
        # path and name); the one found on disk is the fallback where its snapshot is gone.
        last = latest_checkpoint(out)
        if last is not None:
            emit("resume", str(last))
        loop_config = {"base": str(base), "out": str(out), "data": str(out / "data" / "train.jsonl"),
                       "train": t, "gpu": gpu, "resume": str(last) if last is not None else None}
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=gpu,
                                         resources_per_worker=None if gpu else {"CPU": t.threads_per_worker}),
            run_config=RunConfig(name="sft", storage_path=str(out / "ray"),
                                 checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                                 failure_config=FailureConfig(max_failures=0)),
        )
        emit("fit", {"workers": t.workers, "gpu": gpu, "max_steps": t.max_steps,
                     "start_step": _step_of(last) if last is not None else 0})
        with _MetricsTail(out / "metrics.jsonl", lambda m: emit("step", m)):
            result = trainer.fit()
        return {"metrics": dict(result.metrics or {}),
                "checkpoint": result.checkpoint.path if result.checkpoint else None}
    finally:
        if owns:
            ray.shutdown()


class _MetricsTail:
    """Follows metrics.jsonl (written by rank 0) from the driver, for a progress display."""

    def __init__(self, path: Path, callback: Callable[[dict], None], every_s: float = 1.0):
        import threading
        self.path, self.callback, self.every_s = path, callback, every_s
        self.pos = path.stat().st_size if path.exists() else 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sft-metrics-tail", daemon=True)

    def _poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open() as f:
            f.seek(self.pos)
            for line in f:
                if not line.endswith("\n"):
                    break
                self.pos += len(line.encode())
                try:
                    self.callback(json.loads(line))
                except ValueError:
                    continue

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            self._poll()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        self._poll()
        return False


def _step_of(checkpoint: Path) -> int:
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def checkpoints(out: Path) -> list[Path]:
    """The run's HF-format checkpoints, oldest first (by training step)."""
    found = []
    for p in (Path(out) / "ray").glob(f"sft/{CHECKPOINT_PREFIX}*/trainer_state.json"):
        try:
            found.append((json.loads(p.read_text())["step"], p.parent))
        except (OSError, ValueError, KeyError):
            continue    # a checkpoint cut short: not resumable
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    cps = checkpoints(out)
    return cps[-1] if cps else None


def export_model(checkpoint: Path, dest: Path, config: SFTConfig, data: SFTData, token_stats: dict) -> Path:
    """The checkpoint's model as a plain model directory (no optimizer state), with what trained
    it (e2e_reme_trained.json: the commit and the splits too, which a release's manifest keeps)."""
    from .release import provenance
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if f.is_file() and f.name not in ("optimizer.pt", "rng.pt"):
            shutil.copy2(f, tmp / f.name)
    if (checkpoint / "adapter").is_dir():         # LoRA: the adapter a release is packed from
        shutil.copytree(checkpoint / "adapter", tmp / "adapter")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (tmp / "e2e_reme_trained.json").write_text(json.dumps(
        {"stage": "sft", "step": state.get("step"), "base": config.model or "init", "run": str(Path(config.out)),
         "data": data.stats(), "tokens": token_stats, "holdout": asdict(config.data.holdout),
         **provenance(config.data.splits)}, indent=2, default=str))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


# ---- the worker loop (runs in each Ray Train worker) ---------------------------------------------

def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The global batch of a step: a stream of per-epoch permutations, cut into batches, so
    that a resumed run sees exactly the batches it would have seen."""
    import random
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        take = perm[offset:offset + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


def lm_windows(step: int, examples: list[dict], count: int, width: int, seed: int,
               answer_share: float = 0.5, head: int = 0) -> list[list[int]]:
    """The LM phase's batch: `count` windows of `width` tokens of random transcripts, the
    same on every worker and on a resumed run. A share of them end where the transcript
    ends (the answer and the report's tail, where the names repeat most), the rest start
    anywhere. With `head`, an answer window is the prompt's first `head` tokens (where the
    report names the service, its unit, host and port), then the prompt's last tokens
    (inventory), then the answer: the answer's names are copied from a few hundred tokens
    back instead of two thousand, which a tiny random model learns far sooner; the full
    transcripts of the SFT steps then stretch the same copying over the whole report."""
    import random
    rng = random.Random(f"lm:{seed}:{step}")
    width = min(width, min(len(e["input_ids"]) for e in examples))
    out = []
    for _ in range(count):
        e = examples[rng.randrange(len(examples))]
        ids = e["input_ids"]
        if rng.random() < answer_share:
            p = e["prompt_len"]
            h = min(head, p, max(0, width - (len(ids) - p) - 1))
            out.append((ids[:h] + ids[len(ids) - (width - h):]) if h else ids[len(ids) - width:])
        else:
            start = rng.randrange(len(ids) - width + 1)
            out.append(ids[start:start + width])
    return out


def bf16_supported(device: Any = "cpu") -> bool:
    """Whether bf16 autocast pays on this device (a torch.device or "cpu"/"cuda")."""
    if getattr(device, "type", device) == "cuda":
        import torch
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    # Native bf16 dot products; without them autocast would be slower than fp32.
    return "avx512_bf16" in flags or "amx_bf16" in flags


def with_lora(model, lora: LoraConfig):
    """The model with LoRA adapters (peft) on `lora`'s target modules; only they train."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    kw: dict[str, Any] = {}
    if lora.top_layers:
        n = int(model.config.num_hidden_layers)
        kw["layers_to_transform"] = list(range(max(0, n - int(lora.top_layers)), n))
    return get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
                                                **kw))


def load_trainable(base: str, source: str | Path, lora: LoraConfig | None):
    """The model to train, fp32 on the CPU: with LoRA, the adapter saved in `source` (a
    checkpoint) on the base model, or fresh adapters on `source`; without, `source` whole."""
    import torch
    from transformers import AutoModelForCausalLM
    adapter = Path(source, "adapter")
    if lora and (adapter / "adapter_config.json").is_file():
        from peft import PeftModel
        model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    model = AutoModelForCausalLM.from_pretrained(str(source), local_files_only=True, dtype=torch.float32)
    return with_lora(model, lora) if lora else model


def answer_loss(model, ids, answer_len: int, bf16: bool = False):
    """Summed next-token cross-entropy over the last `answer_len` tokens of each row of
    `ids`. The logits are computed only there (`logits_to_keep`): over a 262 k vocabulary
    the head would otherwise cost as much as the whole model for every prompt token."""
    import torch
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, logits_to_keep=answer_len + 1).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             ids[:, -answer_len:].reshape(-1), reduction="sum")


def train_loop(cfg: dict) -> None:
    """The SFT steps, in each Ray Train worker. `cfg`: the TrainConfig ("train"), the base
    model, the tokenised data, the output directory, "gpu", and the checkpoint to resume
    from if Ray Train has none. Each step: this worker's share of the global batch, the
    answer's loss summed and normalised by the global batch's target tokens, one optimizer
    step; rank 0 logs and checkpoints."""
    import ray.train
    import ray.train.torch
    import torch

    t: TrainConfig = cfg["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg["gpu"]:
        torch.set_num_threads(max(1, int(t.threads_per_worker)))
    torch.manual_seed(t.seed + rank)
    device = ray.train.torch.get_device()

    ckpt_dir, state = _resume_point(cfg)
    if t.lora and t.fsdp:
        raise ValueError("train.lora with train.fsdp is not supported: LoRA adapters are small enough for DDP")
    model = load_trainable(cfg["base"], ckpt_dir or cfg["base"], t.lora)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model = ray.train.torch.prepare_model(model, parallel_strategy="fsdp" if t.fsdp else "ddp")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, t, ckpt_dir)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and bf16_supported(device))
    examples = [json.loads(line) for line in Path(cfg["data"]).read_text().splitlines() if line.strip()]

    log = _Logger(Path(cfg["out"]), enabled=rank == 0)
    log.text(f"sft: {len(examples)} examples, {world} worker(s) on {device}, bf16 autocast {bf16}, "
             f"from step {state['step']} of {t.max_steps}")
    step, tokens_total, t_start = state["step"], state.get("tokens", 0), time.monotonic() - state.get("elapsed_s", 0.0)
    model.train()
    while step < t.max_steps:
        t_step = time.monotonic()
        lm_phase = step < t.lm_steps
        parts, global_targets = _my_share(step, examples, t, rank, world, device, lm_phase)
        lr = lr_at(step, t)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum, tokens = _backward(model, params, parts, global_targets, world, bf16)
        norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip) if t.grad_clip else torch.tensor(0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        loss_sum, tokens, over_time = _all_workers(loss_sum, tokens,
                                                   time.monotonic() - t_start > (t.time_limit_s or float("inf")))
        tokens_total += int(tokens)
        dt = time.monotonic() - t_step
        metrics = {"step": step, "loss": round(loss_sum / global_targets, 5), "phase": "lm" if lm_phase else "sft",
                   "lr": lr, "grad_norm": round(float(norm), 4), "tokens_per_s": round(tokens / dt, 1),
                   "target_tokens_per_s": round(global_targets / dt, 1), "step_s": round(dt, 3),
                   "tokens": tokens_total, "elapsed_s": round(time.monotonic() - t_start, 1)}
        last = step >= t.max_steps or over_time
        if step % t.log_every == 0 or step == 1 or last:
            log.metrics(metrics)
        if step % t.checkpoint_every == 0 or last:
            _save_checkpoint(model, opt, metrics, cfg, rank, t.fsdp)
        else:
            ray.train.report(metrics)
        if over_time:
            log.text(f"sft: time limit {t.time_limit_s} s reached at step {step}")
            break
    log.close()


def _resume_point(cfg: dict) -> tuple[str | None, dict]:
    """The checkpoint to start from (Ray Train's own, else the one found on disk) and its
    trainer state; (None, a fresh state) for a new run."""
    import ray.train
    ckpt = ray.train.get_checkpoint()
    ckpt_dir = ckpt.to_directory() if ckpt is not None else cfg.get("resume")
    if not ckpt_dir:
        return None, {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    return ckpt_dir, json.loads(Path(ckpt_dir, "trainer_state.json").read_text())


def _optimizer(params: list, t: TrainConfig, ckpt_dir: str | None):
    import torch
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    if ckpt_dir and Path(ckpt_dir, "optimizer.pt").is_file() and not t.fsdp:
        opt.load_state_dict(torch.load(Path(ckpt_dir, "optimizer.pt"), map_location="cpu", weights_only=True))
    return opt


def _my_share(step: int, examples: list[dict], t: TrainConfig, rank: int, world: int, device,
              lm_phase: bool) -> tuple[list, int]:
    """This worker's share of the step's global batch, as (ids [rows, length], targets per
    row) pairs (the targets are each row's last positions), and the global batch's target
    count. SFT: one sequence per pass, its answer the targets. LM phase: windows of
    lm_window tokens cut at random from the transcripts, stacked, every token a target."""
    import torch
    if lm_phase:
        windows = lm_windows(step, examples, t.lm_windows, t.lm_window, t.seed, t.lm_answer_share, t.lm_head)
        mine = windows[rank::world]
        parts = [(torch.tensor(mine, device=device), len(mine[0]) - 1)] if mine else []
        return parts, sum(len(w) - 1 for w in windows)
    batch = batch_indices(step, len(examples), t.batch_size, t.seed)
    answer = [len(examples[i]["input_ids"]) - examples[i]["prompt_len"] for i in batch]
    parts = [(torch.tensor([examples[i]["input_ids"]], device=device), a)
             for i, a in list(zip(batch, answer))[rank::world]]
    return parts, sum(answer)


def _backward(model, params: list, parts: list, global_targets: int, world: int, bf16: bool) -> tuple:
    """The gradients of this worker's share (summed loss / the global batch's targets, times
    the world size because DDP averages); the all-reduce runs with the last part."""
    loss_sum, tokens = 0.0, 0
    for k, (ids, a) in enumerate(parts):
        sync = k == len(parts) - 1 or not hasattr(model, "no_sync")
        with (_nullcontext() if sync else model.no_sync()):
            ce = answer_loss(model, ids, a, bf16=bf16)
            (ce * world / global_targets).backward()
        loss_sum += float(ce.detach())
        tokens += ids.numel()
    if not parts:    # a worker with no sequence this step still joins the all-reduce
        (sum(p.sum() for p in params) * 0.0).backward()
    return loss_sum, tokens


def _all_workers(loss_sum: float, tokens: int, over_time: bool) -> tuple[float, float, bool]:
    """Loss and tokens summed over the workers; over time if any worker is."""
    import torch
    import torch.distributed as dist
    v = torch.tensor([loss_sum, float(tokens), float(over_time)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(v)
    return v[0].item(), v[1].item(), v[2].item() > 0


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _save_checkpoint(model, opt, metrics: dict, cfg: dict, rank: int, fsdp: bool) -> None:
    """Rank 0 writes an HF model directory (+ optimizer and step) and reports it; the other
    ranks report without one (Ray Train wants every rank to report)."""
    import tempfile

    import ray.train

    state_dict = None
    if fsdp:
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            state_dict = model.state_dict()
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="sft-ckpt-") as d:
        write_model_dir(model, None if fsdp else opt, cfg["base"], d, state_dict)
        Path(d, "trainer_state.json").write_text(json.dumps(
            {"step": metrics["step"], "tokens": metrics["tokens"], "elapsed_s": metrics["elapsed_s"],
             "loss": metrics["loss"]}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{metrics['step']:06d}")


def write_model_dir(model, opt, base: str, d: str, state_dict=None) -> None:
    """A checkpoint that loads like any model directory: the weights (LoRA: the adapter in
    adapter/ to resume from, the merged model beside it), the optimizer's state (unless
    `opt` is None) and the base model's tokenizer."""
    import torch
    from transformers import AutoTokenizer
    inner = model.module if hasattr(model, "module") else model
    if hasattr(inner, "peft_config"):
        inner.save_pretrained(Path(d, "adapter"))
        _save_merged_lora(Path(d, "adapter"), d, base)
    else:
        inner.save_pretrained(d, state_dict=state_dict)
    if opt is not None:
        torch.save(opt.state_dict(), Path(d, "optimizer.pt"))
    AutoTokenizer.from_pretrained(base, local_files_only=True).save_pretrained(d)


def _save_merged_lora(adapter: Path, d: str, base: str) -> None:
    """The base weights with the adapter merged in, written to `d` (a separate copy: merging
    the training model would end its training)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload().save_pretrained(d)


class _Logger:
    """Metrics to out/metrics.jsonl and TensorBoard (out/tensorboard), rank 0 only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = out / "metrics.jsonl"
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

    def text(self, s: str) -> None:
        if self.enabled:
            print(s, flush=True)

    def metrics(self, m: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({**m, "time": time.time()}) + "\n")
        if self.tb is not None:
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"sft/{k}", v, m["step"])
            self.tb.flush()
        print(f"step {m['step']:5d}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['tokens_per_s']:.0f} tok/s  "
              f"{m['elapsed_s']:.0f} s", flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
