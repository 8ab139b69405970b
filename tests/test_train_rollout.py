"""Rollout engines: a batch of prompts in, completions with prompt ids, completion ids and
log-probabilities out, consistent with a forward pass of the same model; vLLM has the
same contract and runs only where a GPU is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from e2e_reme.simulators.policies.base import PolicyContext, make_policy
from e2e_reme.train.data import DataConfig, build_sft_data, corpus_texts, inventory_hosts
from e2e_reme.train.errors import EngineUnavailable, TrainError
from e2e_reme.train.format import build_messages, prompt_ids
from e2e_reme.train.model import ModelConfig, TokenizerConfig, init_model
from e2e_reme.train.rollout import (EngineChatModel, SamplingParams, TransformersEngine, VLLMEngine, make_engine,
                                    vllm_available)
from e2e_reme.train.rl_workers import checkpoint_weights

EPISODES = Path(__file__).parent / "data" / "train-episodes.jsonl"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    data = build_sft_data(DataConfig(episodes=(str(EPISODES),)))
    path = init_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                  tokenizer=TokenizerConfig(vocab_size=1024), seed=1),
                      tmp_path_factory.mktemp("roll") / "tiny", corpus_texts(data.train))
    return TransformersEngine(path, batch_size=4)


@pytest.fixture(scope="module")
def prompts():
    recs = [json.loads(l) for l in EPISODES.read_text().splitlines()][:3]
    return [build_messages(r["report"], inventory_hosts(r["report"])) for r in recs]


def forward_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def test_completions_carry_prompt_ids_completion_ids_and_one_logprob_per_token(engine, prompts):
    outs = engine.generate(prompts, SamplingParams(max_tokens=12))
    assert len(outs) == len(prompts)
    for msgs, group in zip(prompts, outs):
        (c,) = group
        assert c.prompt_ids == prompt_ids(engine.tokenizer, msgs)
        assert 0 < len(c.completion_ids) <= 12 and len(c.logprobs) == len(c.completion_ids)
        assert c.finish_reason in ("stop", "length")
        assert c.text == engine.tokenizer.decode(c.completion_ids, skip_special_tokens=True)


def test_logprobs_match_a_forward_pass_of_the_same_model(engine, prompts):
    # Sampled at a high temperature, so unlikely tokens are scored too; padding in the batch
    # (prompts of different lengths) must not change them.
    outs = engine.generate(prompts, SamplingParams(temperature=1.5, top_p=1.0, max_tokens=16, seed=3))
    for group in outs:
        c = group[0]
        ref = forward_logprobs(engine.model, c.prompt_ids, c.completion_ids)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=2e-3), (c.logprobs, ref.tolist())


def test_n_samples_per_prompt_and_a_seed_reproduces_them(engine, prompts):
    p = SamplingParams(temperature=1.0, n=3, max_tokens=8, seed=7)
    a = engine.generate(prompts[:2], p)
    b = engine.generate(prompts[:2], p)
    assert [len(g) for g in a] == [3, 3]
    assert [[c.completion_ids for c in g] for g in a] == [[c.completion_ids for c in g] for g in b]


def test_a_group_runs_its_prompt_once_and_its_logprobs_still_match_a_forward_pass(engine, prompts):
    # n completions of one prompt in one micro-batch share the prompt's KV cache.
    (group,) = engine.generate(prompts[:1], SamplingParams(temperature=1.5, max_tokens=16, n=4, seed=11))
    assert len({tuple(c.completion_ids) for c in group}) > 1
    for c in group:
        ref = forward_logprobs(engine.model, c.prompt_ids, c.completion_ids)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=2e-3), (c.logprobs, ref.tolist())


def test_a_shared_prompt_gives_the_greedy_answer_of_a_prompt_run_alone(engine, prompts):
    alone = engine.generate(prompts[1:2], SamplingParams(max_tokens=12))[0][0]
    group = engine.generate(prompts[1:2], SamplingParams(max_tokens=12, n=3))[0]
    assert [c.completion_ids for c in group] == [alone.completion_ids] * 3


def test_a_prompt_given_as_ids_is_the_same_prompt(engine, prompts):
    ids = prompt_ids(engine.tokenizer, prompts[0])
    a = engine.generate([prompts[0]], SamplingParams(max_tokens=8))[0][0]
    b = engine.generate([ids], SamplingParams(max_tokens=8))[0][0]
    assert a.completion_ids == b.completion_ids


def test_the_solo_policy_runs_a_local_model_through_the_engine_and_keeps_ids(engine):
    rec = json.loads(EPISODES.read_text().splitlines()[0])
    ctx = PolicyContext(report=rec["report"], inventory_hosts=("n0", "n1"), system="boutique")
    policy = make_policy("solo", model=EngineChatModel(engine), max_tokens=8)
    gen = policy.generate(ctx, [])
    assert gen.extra["prompt_ids"] and len(gen.extra["logprobs"]) == len(gen.extra["completion_ids"])
    assert gen.prompt_tokens == len(gen.extra["prompt_ids"])


def _tiny(tmp_path_factory, seed: int, hidden: int = 64) -> Path:
    data = build_sft_data(DataConfig(episodes=(str(EPISODES),)))
    return init_model(ModelConfig(hidden_size=hidden, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                  tokenizer=TokenizerConfig(vocab_size=1024), seed=seed),
                      tmp_path_factory.mktemp("roll") / f"tiny-{seed}-{hidden}", corpus_texts(data.train))


def test_weights_sent_in_place_make_the_engine_answer_as_their_model(engine, prompts, tmp_path_factory):
    # RL's sync: the tensors of a checkpoint, as the object store delivers them, copied into
    # the engine's model; afterwards it is that model, token for token and logprob for logprob.
    other = _tiny(tmp_path_factory, seed=2)
    mine, theirs = TransformersEngine(engine.path), TransformersEngine(other)
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=5)
    assert mine.generate(prompts[:1], params)[0][0].logprobs != theirs.generate(prompts[:1], params)[0][0].logprobs
    mine.load_weights(checkpoint_weights(other))
    a, b = mine.generate(prompts[:1], params)[0][0], theirs.generate(prompts[:1], params)[0][0]
    assert a.completion_ids == b.completion_ids and torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs))


def test_weights_of_another_shape_are_refused_by_name(engine, tmp_path_factory):
    wider = _tiny(tmp_path_factory, seed=1, hidden=96)
    with pytest.raises(TrainError, match="do not fit its model: size mismatch"):
        TransformersEngine(engine.path).load_weights(checkpoint_weights(wider))
    with pytest.raises(TrainError, match="do not fit its model: missing"):
        TransformersEngine(engine.path).load_weights({"model.embed_tokens.weight": engine.model.model.embed_tokens.weight})


def test_auto_picks_transformers_where_vllm_cannot_run(engine):
    if vllm_available()[0]:
        pytest.skip("vLLM can run here; auto would pick it")
    assert isinstance(make_engine(str(engine.path), kind="auto"), TransformersEngine)


def test_asking_for_vllm_where_it_cannot_run_says_why(engine):
    ok, why = vllm_available()
    if ok:
        pytest.skip("vLLM can run here")
    with pytest.raises(EngineUnavailable, match="vLLM engine: "):
        make_engine(str(engine.path), kind="vllm")


@pytest.mark.skipif(not vllm_available()[0], reason=f"vLLM engine: {vllm_available()[1]}")
def test_vllm_has_the_same_contract(engine, prompts):
    v = VLLMEngine(str(engine.path), dtype="float32")
    outs = v.generate(prompts, SamplingParams(temperature=1.0, max_tokens=16, seed=0))
    for msgs, (c,) in zip(prompts, outs):
        assert c.prompt_ids == prompt_ids(v.tokenizer, msgs)
        ref = forward_logprobs(engine.model, c.prompt_ids, c.completion_ids)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=5e-2)


def test_an_answer_that_loops_is_stopped_where_the_loop_shows_and_named(engine, prompts):
    from e2e_reme.train.rollout import looping
    free = engine.generate(prompts, SamplingParams(max_tokens=240))
    stopped = engine.generate(prompts, SamplingParams(max_tokens=240, loop_span=32))
    loops = 0
    for (f,), (s,) in zip(free, stopped):
        first = next((k for k in range(33, len(f.completion_ids) + 1) if looping(f.completion_ids[:k], 32)), None)
        if first is None:                       # it never looped: the rule changed nothing
            assert s.completion_ids == f.completion_ids and s.finish_reason == f.finish_reason
            continue
        loops += 1
        assert s.finish_reason == "repetition"
        assert s.completion_ids == f.completion_ids[:len(s.completion_ids)]
        assert first <= len(s.completion_ids) <= first + 8 and looping(s.completion_ids, 32)
    assert loops, "a random tiny model decoding greedily is expected to loop on one of these prompts"


def test_a_policy_whose_answer_loops_fails_at_generation_with_the_output_kept(engine, prompts):
    from e2e_reme.train.rollout import EngineChatModel
    r = EngineChatModel(engine, loop_span=32).chat(prompts[0], max_tokens=240)
    free = EngineChatModel(engine).chat(prompts[0], max_tokens=240)
    assert r.finish_reason in ("repetition", free.finish_reason)
    assert r.raw["completion_ids"] == free.raw["completion_ids"][:len(r.raw["completion_ids"])]


def test_concurrent_requests_of_joined_workers_are_generated_as_one_batch(engine, prompts):
    import threading
    import time as _time
    from e2e_reme.train.rollout import GatheredChatModel
    chat = GatheredChatModel(engine, max_wait_s=30)
    alone = [EngineChatModel(engine).chat(m, max_tokens=6) for m in prompts]
    got: dict[int, object] = {}
    ready = threading.Barrier(len(prompts) + 1)

    def worker(i):
        chat.join()
        ready.wait()
        _time.sleep(0.3 * i)                    # they reach the model at different times
        got[i] = chat.chat(prompts[i], max_tokens=6)

    def quitter():                               # joins, then ends without asking: nobody waits for it
        chat.join()
        ready.wait()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    threads.append(threading.Thread(target=quitter))
    t0 = _time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert _time.monotonic() - t0 < 25          # not the 30 s a missing worker would cost
    assert chat.batches == [len(prompts)]
    for i, r in got.items():
        assert r.raw["prompt_ids"] == alone[i].raw["prompt_ids"]
        assert r.completion_tokens == len(r.raw["completion_ids"]) <= 6
