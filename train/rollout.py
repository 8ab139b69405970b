"""Rollout engines: a batch of prompts and sampling parameters in, completions with their
token ids and log-probabilities out. One contract, two engines:

    engine = make_engine("runs/sft-tiny/model")             # vLLM where importable and a GPU is
                                                            # present, else transformers
    outs = engine.generate([messages_a, prompt_ids_b], SamplingParams(temperature=1.0, n=4))
    outs[0][2].prompt_ids, .completion_ids, .logprobs, .text, .finish_reason

`outs[i]` holds the `n` completions of prompt i. A prompt is either chat messages
(rendered by `train.format.prompt_ids`, the one prompt format) or token ids already.

`logprobs[t]` is log p(completion_ids[t] | prompt, completion_ids[:t]) under the model's
raw distribution (temperature 1, no top-p), whatever the sampling parameters: the number
an RL loss compares its forward pass with. The transformers engine reads it from
`generate`'s raw logits; vLLM is asked for `raw_logprobs`. A test checks the transformers
engine's numbers against a forward pass of the same model.

`EngineChatModel` wraps an engine as the benchmark's `ChatModel`, so the `solo`/`think`
policies can run a local model through it and their records keep the ids and logprobs.

`SamplingParams(loop_span=N)`: a row whose last N generated tokens are one block of at most
LOOP_PERIOD tokens said again and again is stopped there (`finish_reason` "repetition"): greedy
decoding that has fallen into a loop never leaves it, and would only burn the rest of
`max_tokens`. N well above any block a playbook legitimately repeats (96 by default in the
evaluation) keeps a list of similar tasks from tripping it; `looping(ids, N)` is the rule.

`generate(..., stop=fn)`: `fn(i)` says whether prompt i is no longer wanted (its client
went away, its time ran out). The transformers engine checks it before each micro-batch,
after every generated token (that row stops, `finish_reason` "cancelled") and before each
decoder layer's forward (when every row of a micro-batch is stopped, its prefill or step
is abandoned there). vLLM's offline engine cannot abort: it checks only before it starts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from .errors import EngineUnavailable, TrainError
from .format import prompt_ids as _prompt_ids

ENGINES = ("auto", "transformers", "vllm")
LOOP_PERIOD = 64                       # the longest repeated block `loop_span` looks for, in tokens


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0           # 0: greedy
    top_p: float = 1.0
    max_tokens: int = 1024
    n: int = 1                         # completions per prompt
    seed: int | None = None
    loop_span: int = 0                 # > 0: a row whose last `loop_span` tokens repeat one block of at
                                       # most LOOP_PERIOD tokens is stopped, finish_reason "repetition"


@dataclass
class Completion:
    prompt_ids: list[int]
    completion_ids: list[int]          # ends with the end-of-turn token when finish_reason is "stop"
    logprobs: list[float]              # one per completion id
    text: str                          # decoded without special tokens
    finish_reason: str                 # "stop" | "length" | "cancelled" (generate's `stop`)
    latency_s: float = 0.0             # of the whole batch it came in
    extra: dict = field(default_factory=dict)


@runtime_checkable
class RolloutEngine(Protocol):
    name: str
    tokenizer: Any

    def generate(self, prompts: Sequence[Sequence[dict] | Sequence[int]],
                 params: SamplingParams = SamplingParams(),
                 stop: Callable[[int], bool] | None = None) -> list[list[Completion]]: ...


def _cancelled(prompt: Sequence[int]) -> Completion:
    return Completion(prompt_ids=list(prompt), completion_ids=[], logprobs=[], text="", finish_reason="cancelled")


class _Abandoned(Exception):
    """Raised inside the model's forward when every row of a micro-batch is stopped."""


def looping(ids: Sequence[int], span: int, period: int = LOOP_PERIOD) -> bool:
    """Whether the last `span` tokens of `ids` are one block of at most `period` tokens
    repeated (ids[i] == ids[i - p] throughout the span, for some p <= period, the span at
    least twice the block)."""
    if span <= 0 or len(ids) < span + 1:
        return False
    tail = list(ids[-(span + period):])
    n = len(tail)
    for p in range(1, min(period, span // 2) + 1):
        if n - span - p < 0:
            continue
        if all(tail[i] == tail[i - p] for i in range(n - span, n)):
            return True
    return False


def _stop_hooks(model: Any, rows: int, stop: Callable[[int], bool] | None, stopped: dict,
                width: int = 0, loop_span: int = 0, looped: set | None = None):
    """A stopping criterion (per row: the rows `stop` names end, and the rows whose generated
    tokens (after `width` prompt columns) loop for `loop_span` tokens, added to `looped`;
    their step recorded in `stopped`) and forward pre-hooks on the decoder layers that
    abandon the pass when all rows are stopped (prefill included). Returns (criteria, hook
    handles)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    stop = stop or (lambda r: False)
    looped = looped if looped is not None else set()

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            flags = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            gen = int(input_ids.shape[1]) - width
            check = loop_span > 0 and gen > loop_span and gen % 8 == 0
            for r in range(input_ids.shape[0]):
                if r not in stopped and check and looping(input_ids[r, width:].tolist(), loop_span):
                    looped.add(r)
                if r in stopped or r in looped or stop(r):
                    stopped.setdefault(r, int(input_ids.shape[1]))
                    flags[r] = True
            return flags

    def pre_hook(module, args):
        # Rows stopped for looping keep their text: only cancelled rows abandon the pass.
        if all((r in stopped and r not in looped) or stop(r) for r in range(rows)):
            raise _Abandoned()
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    handles = [m.register_forward_pre_hook(pre_hook) for m in layers]
    return StoppingCriteriaList([_Stop()]), handles


def _as_ids(tokenizer: Any, prompt: Sequence[dict] | Sequence[int]) -> list[int]:
    if len(prompt) and isinstance(prompt[0], dict):
        return _prompt_ids(tokenizer, prompt)
    if all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise TrainError("a prompt is a list of chat messages or a list of token ids")


def _check_params(p: SamplingParams) -> None:
    if p.n < 1 or p.max_tokens < 1:
        raise TrainError(f"sampling: n ({p.n}) and max_tokens ({p.max_tokens}) must be at least 1")
    if p.temperature < 0 or not 0 < p.top_p <= 1:
        raise TrainError(f"sampling: temperature {p.temperature} must be >= 0 and top_p {p.top_p} in (0, 1]")


class TransformersEngine:
    """`model.generate` on the model's device (CPU or GPU), in micro-batches of
    `batch_size` sequences, left-padded."""

    name = "transformers"

    def __init__(self, model: Any, device: str = "auto", dtype: str = "auto", batch_size: int = 8):
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from .model import load_model
            model = load_model(model, device=device, dtype=dtype)
        # A loaded TransformersChatModel (the benchmark's local model): share its weights.
        self.chat_model = model
        self.model = model.model
        self.tokenizer = model.tokenizer
        self.device = model.device
        self.path = getattr(model, "path", None)
        self.batch_size = max(1, int(batch_size))
        self.model.eval()

    def __repr__(self) -> str:
        return f"TransformersEngine({str(self.path)!r}, device={self.device!r})"

    def load_weights(self, state: dict) -> None:
        """New values for the model's parameters, in place (RL's sync after an update). A
        checkpoint of a model with tied embeddings may leave the head out; anything else
        missing or unknown means the weights are another model's, which is an error."""
        import torch
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        try:
            with torch.no_grad():
                missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as e:     # a tensor of another shape: another model's weights
            raise TrainError(f"weights for {self.path} do not fit its model: {str(e).splitlines()[-1].strip()}") from None
        if unexpected or set(missing) - tied:
            raise TrainError(f"weights for {self.path} do not fit its model: missing {sorted(set(missing) - tied)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        self.model.eval()

    def generate(self, prompts, params: SamplingParams = SamplingParams(),
                 stop: Callable[[int], bool] | None = None) -> list[list[Completion]]:
        _check_params(params)
        ids = [_as_ids(self.tokenizer, p) for p in prompts]
        flat = [(i, p) for i, p in enumerate(ids) for _ in range(params.n)]
        out: list[list[Completion]] = [[] for _ in ids]
        if params.seed is not None:
            import torch
            torch.manual_seed(params.seed)
        # Longest first, so a micro-batch pads little.
        order = sorted(range(len(flat)), key=lambda k: -len(flat[k][1]))
        done: dict[int, Completion] = {}
        for b in range(0, len(order), self.batch_size):
            chunk = order[b:b + self.batch_size]
            if stop is not None:
                for k in [k for k in chunk if stop(flat[k][0])]:
                    done[k] = _cancelled(flat[k][1])
                chunk = [k for k in chunk if k not in done]
                if not chunk:
                    continue
            row_stop = (lambda r, c=chunk: stop(flat[c[r]][0])) if stop is not None else None
            for k, c in zip(chunk, self._generate_batch([flat[k][1] for k in chunk], params, row_stop)):
                done[k] = c
        for k, (i, _) in enumerate(flat):
            out[i].append(done[k])
        return out

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams,
                        stop: Callable[[int], bool] | None = None) -> list[Completion]:
        import torch
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            eos_ids.add(tok.eos_token_id)
        width = max(len(p) for p in batch)
        input_ids = torch.full((len(batch), width), pad if pad is not None else 0, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for r, p in enumerate(batch):
            input_ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention[r, width - len(p):] = 1
        kwargs: dict[str, Any] = dict(max_new_tokens=params.max_tokens, return_dict_in_generate=True,
                                      output_logits=True, pad_token_id=pad if pad is not None else 0,
                                      eos_token_id=sorted(eos_ids) or None)
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=float(params.temperature), top_p=float(params.top_p), top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        stopped: dict[int, int] = {}          # row -> sequence length when it was stopped
        looped: set[int] = set()              # rows stopped because they repeat themselves
        handles: list = []
        if stop is not None or params.loop_span > 0:
            kwargs["stopping_criteria"], handles = _stop_hooks(self.model, len(batch), stop, stopped, width,
                                                               params.loop_span, looped)
        t0 = time.monotonic()
        try:
            with torch.no_grad():
                if len(batch) > 1 and len(batch[0]) > 1 and all(p == batch[0] for p in batch):
                    kwargs["cache"] = self._shared_prefix(batch[0], len(batch))
                res = self.model.generate(input_ids=input_ids.to(self.device),
                                          attention_mask=attention.to(self.device), **kwargs)
        except _Abandoned:
            return [_cancelled(p) for p in batch]
        finally:
            for h in handles:
                h.remove()
        latency = time.monotonic() - t0
        seqs = res.sequences[:, width:].cpu()
        # Raw logits per step -> log-probabilities of the chosen tokens, step by step, so a
        # real vocabulary never needs (steps x batch x vocab) log-softmaxed at once.
        chosen = torch.zeros(seqs.shape, dtype=torch.float32)
        for t, logits in enumerate(res.logits):
            lp = torch.log_softmax(logits.float(), dim=-1).cpu()
            chosen[:, t] = lp.gather(1, seqs[:, t:t + 1]).squeeze(1)
        outs = []
        for r, p in enumerate(batch):
            comp = seqs[r].tolist()
            end = next((i for i, t in enumerate(comp) if t in eos_ids), None)
            cut = stopped[r] - width if r in stopped else None
            if end is not None and (cut is None or end < cut):
                comp, finish = comp[:end + 1], "stop"
            elif cut is not None:
                comp, finish = comp[:cut], "repetition" if r in looped else "cancelled"
            else:
                finish = "length"
            outs.append(Completion(prompt_ids=list(p), completion_ids=comp, logprobs=chosen[r, :len(comp)].tolist(),
                                   text=tok.decode(comp, skip_special_tokens=True), finish_reason=finish,
                                   latency_s=round(latency, 3)))
        return outs


    def _shared_prefix(self, prompt: list[int], copies: int):
        """The KV cache of a prompt's forward pass (all but its last token, which `generate`
        feeds itself), copied for each of the `copies` completions of a group: the prompt is
        run once instead of once per completion (RL samples groups of one prompt)."""
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=_ids([prompt[:-1]], self.device), cache=cache, use_cache=True,
                   logits_to_keep=1)
        cache.batch_repeat_interleave(copies)
        return cache


def _ids(rows: list[list[int]], device):
    import torch
    return torch.tensor(rows, dtype=torch.long, device=device)


class VLLMEngine:
    """vLLM's offline `LLM` on a GPU, given token ids (no second tokenisation) and asked for
    the raw log-probability of each sampled token. An optional dependency
    (`pip install '.[vllm]'`), never installed by `make test`."""

    name = "vllm"

    def __init__(self, path: str, dtype: str = "auto", gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, seed: int = 0):
        ok, why = vllm_available()
        if not ok:
            raise EngineUnavailable(f"vLLM engine: {why}")
        import vllm
        from .model import check_model_dir
        self.path = check_model_dir(path)
        kw: dict[str, Any] = dict(model=str(self.path), dtype=dtype, seed=seed,
                                  gpu_memory_utilization=gpu_memory_utilization)
        if max_model_len:
            kw["max_model_len"] = max_model_len
        try:
            self.llm = vllm.LLM(**kw, logprobs_mode="raw_logprobs")
        except TypeError:        # a vLLM older than the logprobs_mode option returns raw ones already
            self.llm = vllm.LLM(**kw)
        self.tokenizer = self.llm.get_tokenizer()
        self._vllm = vllm

    def generate(self, prompts, params: SamplingParams = SamplingParams(),
                 stop: Callable[[int], bool] | None = None) -> list[list[Completion]]:
        _check_params(params)
        ids = [_as_ids(self.tokenizer, p) for p in prompts]
        if stop is not None and all(stop(i) for i in range(len(ids))):
            return [[_cancelled(p)] * params.n for p in ids]      # the offline engine cannot abort later
        sp = self._vllm.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                       max_tokens=params.max_tokens, seed=params.seed, logprobs=0)
        t0 = time.monotonic()
        results = self.llm.generate([{"prompt_token_ids": p} for p in ids], sp, use_tqdm=False)
        latency = time.monotonic() - t0
        out = []
        for p, r in zip(ids, results):
            group = []
            for c in r.outputs:
                toks = list(c.token_ids)
                lps = [float(step[t].logprob) for t, step in zip(toks, c.logprobs or [])]
                group.append(Completion(prompt_ids=list(p), completion_ids=toks, logprobs=lps, text=c.text,
                                        finish_reason="stop" if c.finish_reason == "stop" else "length",
                                        latency_s=round(latency, 3)))
            out.append(group)
        return out


def vllm_available() -> tuple[bool, str]:
    """(True, "") where vLLM can run: importable and a CUDA GPU present; else why not."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU on this machine (vLLM runs on a GPU); use the transformers engine"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False, "vllm is not installed: pip install '.[vllm]' on a GPU machine"
    return True, ""


def make_engine(path: str, kind: str = "auto", device: str = "auto", dtype: str = "auto",
                batch_size: int = 8) -> RolloutEngine:
    """The engine for a local model directory: `auto` picks vLLM where it can run, else
    transformers; naming `vllm` where it cannot is an error saying why."""
    if kind not in ENGINES:
        raise TrainError(f"rollout engine '{kind}': use one of {', '.join(ENGINES)}")
    if kind == "vllm" or (kind == "auto" and vllm_available()[0]):
        return VLLMEngine(path, dtype=dtype)
    return TransformersEngine(path, device=device, dtype=dtype, batch_size=batch_size)


class EngineChatModel:
    """An engine as the benchmark's ChatModel (`chat(messages) -> ChatResponse`): the
    policies `solo` and `think` take it as `model=`; `raw` carries prompt_ids,
    completion_ids and logprobs into the episode record. `loop_span`: stop an answer that
    repeats itself (SamplingParams.loop_span; finish_reason "repetition")."""

    def __init__(self, engine: RolloutEngine, name: str | None = None, loop_span: int = 0):
        self.engine = engine
        self.name = name or str(getattr(engine, "path", None) or engine.name).rstrip("/").split("/")[-1]
        self.loop_span = int(loop_span)

    def chat(self, messages, *, tools=None, temperature: float = 0.0, max_tokens: int = 1024,
             seed: int | None = None):
        t0 = time.monotonic()
        c = self._generate([messages], SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed,
                                                      loop_span=self.loop_span))[0]
        return self._response(c, time.monotonic() - t0)

    def _generate(self, prompts: list, params: SamplingParams) -> list[Completion]:
        from e2e_reme.simulators.policies.models import ModelError, plain_messages
        try:
            return [o[0] for o in self.engine.generate([plain_messages(m) for m in prompts], params)]
        except TrainError:
            raise
        except Exception as e:
            raise ModelError(f"local model {self.name} failed to generate: {type(e).__name__}: {e}",
                             kind="local") from e

    def _response(self, c: Completion, latency_s: float):
        from e2e_reme.simulators.policies.models import ChatResponse
        return ChatResponse(text=c.text, prompt_tokens=len(c.prompt_ids), completion_tokens=len(c.completion_ids),
                            finish_reason=c.finish_reason, latency_s=latency_s,
                            raw={"prompt_ids": c.prompt_ids, "completion_ids": c.completion_ids,
                                 "logprobs": c.logprobs, "engine": self.engine.name})


class GatheredChatModel(EngineChatModel):
    """One model shared by several episode workers (each on its own sandbox, its fault live
    while it waits), whose requests are generated together as one batch: a batch of 4-8
    rows gives 3-4x the tokens per second of one row on this CPU (docs/train.md). Each
    worker thread joins first (`join()`, from the campaign's policy factory); a request
    waits until every joined, still running worker has one waiting too, or until the
    oldest has waited `max_wait_s`; then one of the waiting threads generates them all.
    Requests are batched when they sample alike (temperature, max_tokens, loop_span);
    `seed` is the first request's (greedy decoding ignores it)."""

    def __init__(self, engine: RolloutEngine, name: str | None = None, loop_span: int = 0, max_wait_s: float = 60.0):
        super().__init__(engine, name, loop_span)
        self.max_wait_s = float(max_wait_s)
        self._cv = threading.Condition()
        self._members: set[threading.Thread] = set()
        self._pending: list[dict] = []
        self._busy = False
        self.batches: list[int] = []      # the size of each batch generated, in order

    def join(self) -> "GatheredChatModel":
        with self._cv:
            self._members.add(threading.current_thread())
        return self

    def chat(self, messages, *, tools=None, temperature: float = 0.0, max_tokens: int = 1024,
             seed: int | None = None):
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed, loop_span=self.loop_span)
        req = {"messages": messages, "params": params, "t": time.monotonic(), "done": False}
        with self._cv:
            self._members.add(threading.current_thread())
            self._pending.append(req)
            self._cv.notify_all()
            while not req["done"]:
                if not self._busy and self._ready():
                    self._lead()
                else:
                    self._cv.wait(0.5)
        if "error" in req:
            raise req["error"]
        return req["result"]

    def _ready(self) -> bool:
        live = {t for t in self._members if t.is_alive()}
        self._members = live
        return bool(self._pending) and (len(self._pending) >= len(live)
                                  or time.monotonic() - self._pending[0]["t"] >= self.max_wait_s)

    def _lead(self) -> None:
        """Generate the pending requests that sample like the oldest (called holding the lock;
        released while generating)."""
        key = lambda r: (r["params"].temperature, r["params"].max_tokens, r["params"].loop_span)
        batch = [r for r in self._pending if key(r) == key(self._pending[0])]
        self._pending = [r for r in self._pending if r not in batch]
        self._busy = True
        self._cv.release()
        try:
            t0 = time.monotonic()
            outs = self._generate([r["messages"] for r in batch], batch[0]["params"])
            for r, c in zip(batch, outs):
                r["result"] = self._response(c, time.monotonic() - t0)
        except Exception as e:
            for r in batch:
                r["error"] = e
        finally:
            self._cv.acquire()
            self._busy = False
            self.batches.append(len(batch))
            for r in batch:
                r["done"] = True
            self._cv.notify_all()
