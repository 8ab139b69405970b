"""The one prompt format with token ids: the benchmark's messages, the answer as a fenced
playbook and back, and ids that are exactly what the model is given at evaluation time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from e2e_reme.simulators.policies.base import TrialFeedback
from e2e_reme.simulators.policies.prompt import build_messages as simulators_build_messages
from e2e_reme.train.data import DataConfig, build_sft_data, corpus_texts, inventory_hosts
from e2e_reme.train.format import (IGNORE_INDEX, answer_text, build_messages, encode_example, extract_yaml,
                                   prompt_ids, split_transcript)
from e2e_reme.train.model import ModelConfig, TokenizerConfig, init_model, load_model

EPISODES = Path(__file__).parent / "data" / "train-episodes.jsonl"


@pytest.fixture(scope="module")
def records():
    return [json.loads(l) for l in EPISODES.read_text().splitlines()]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    data = build_sft_data(DataConfig(episodes=(str(EPISODES),)))
    path = init_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                  tokenizer=TokenizerConfig(vocab_size=1024)),
                      tmp_path_factory.mktemp("fmt") / "tiny", corpus_texts(data.train))
    return load_model(path)


def test_train_uses_the_benchmarks_prompt_module():
    assert build_messages is simulators_build_messages


def test_an_answer_round_trips_to_the_same_playbook(records):
    for rec in records:
        text = answer_text(rec["playbook"])
        assert yaml.safe_load(extract_yaml(text)) == yaml.safe_load(rec["playbook"])


def test_the_expert_policys_recorded_answer_is_the_answer_format(records):
    for rec in records:
        assert rec["trials"][-1]["output"] == answer_text(rec["playbook"])


def test_prompt_ids_are_what_the_benchmarks_local_model_is_given(lm, records):
    rep = records[0]["report"]
    messages = build_messages(rep, inventory_hosts(rep))
    r = lm.chat(messages, max_tokens=2)
    assert r.raw["prompt_ids"] == prompt_ids(lm.tokenizer, messages)


def test_the_loss_covers_only_the_answer_and_its_end_token(lm, records):
    rec = records[1]
    messages = build_messages(rec["report"], inventory_hosts(rec["report"]))
    ex = encode_example(lm.tokenizer, messages, answer_text(rec["playbook"]))
    labels = ex.labels()
    assert labels[:ex.prompt_len] == [IGNORE_INDEX] * ex.prompt_len
    assert labels[ex.prompt_len:] == ex.input_ids[ex.prompt_len:]
    assert ex.input_ids[-1] == lm.tokenizer.eos_token_id
    assert ex.input_ids[:ex.prompt_len] == prompt_ids(lm.tokenizer, messages)
    assert lm.tokenizer.decode(ex.input_ids[ex.prompt_len:], skip_special_tokens=True) == answer_text(rec["playbook"])


def test_a_multi_turn_transcript_trains_on_its_last_answer_only(lm, records):
    rep = records[2]["report"]
    fb = TrialFeedback(trial=1, stage="execute", error_class="ExecutionFailed", reason="task failed",
                       execution="The playbook failed.", health={"ok": False})
    messages = build_messages(rep, inventory_hosts(rep), mode="think", feedback=[fb], previous_answers=["first try"],
                              observations=[{"host": "n0", "command": "uptime", "output": "up 1 day"}])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    prompt, answer = split_transcript(messages + [{"role": "assistant", "content": "second try"}])
    ex = encode_example(lm.tokenizer, prompt, answer)
    assert lm.tokenizer.decode(ex.input_ids[ex.prompt_len:], skip_special_tokens=True) == "second try"
    assert "first try" in lm.tokenizer.decode(ex.input_ids[:ex.prompt_len])


def test_an_answer_without_a_playbook_extracts_to_none():
    assert extract_yaml("I would restart the service.") is None
