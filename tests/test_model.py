"""The policy model: a tiny one built from a config with a tokenizer trained on our own
reports and playbooks, saved and loaded exactly like a real Hugging Face model; a missing
or broken model directory is one clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_reme.train.data import DataConfig, HoldoutConfig, build_sft_data, corpus_texts
from e2e_reme.train.errors import ModelDirError
from e2e_reme.train.model import ModelConfig, TokenizerConfig, check_model_dir, describe, init_model, load_model

EPISODES = Path(__file__).parent / "data" / "train-episodes.jsonl"
TINY = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
            max_position_embeddings=4096, tokenizer=TokenizerConfig(vocab_size=1024))


@pytest.fixture(scope="module")
def texts():
    data = build_sft_data(DataConfig(episodes=(str(EPISODES),), holdout=HoldoutConfig(systems=("simple-micro",))))
    return list(corpus_texts(data.train))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, texts):
    return init_model(ModelConfig(**TINY), tmp_path_factory.mktemp("m") / "tiny-qwen2", texts)


def test_init_writes_what_save_pretrained_writes(qwen_dir):
    names = {p.name for p in qwen_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert json.loads((qwen_dir / "config.json").read_text())["model_type"] == "qwen2"


def test_the_tiny_model_has_a_few_million_parameters_at_the_default_shape(tmp_path, texts):
    path = init_model(ModelConfig(), tmp_path / "default", texts)
    n = json.loads((path / "e2e_reme_init.json").read_text())["parameters"]
    assert 1e6 < n < 2e7


def test_a_tiny_model_loads_through_the_same_path_as_a_real_one(qwen_dir):
    lm = load_model(qwen_dir)          # simulators' TransformersChatModel: from_pretrained(local_files_only)
    assert lm.device == "cpu" and lm.model.config.model_type == "qwen2"
    r = lm.chat([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], max_tokens=5)
    assert r.prompt_tokens > 0 and 0 < r.completion_tokens <= 5


def test_a_llama_architecture_builds_and_loads_too(tmp_path, texts):
    path = init_model(ModelConfig(architecture="llama", **TINY), tmp_path / "tiny-llama", texts)
    assert load_model(path).model.config.model_type == "llama"


def test_the_tokenizer_has_a_chatml_template_ending_where_the_answer_begins(qwen_dir):
    lm = load_model(qwen_dir)
    text = lm.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert lm.tokenizer.eos_token == "<|im_end|>"


def test_the_tokenizer_splits_digits_one_by_one(qwen_dir):
    tok = load_model(qwen_dir).tokenizer
    pieces = tok.convert_ids_to_tokens(tok("port 50052", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if p.isdigit()] == list("50052")


def test_a_missing_directory_is_an_error_naming_it(tmp_path):
    with pytest.raises(ModelDirError, match=r"no-such-model: not found"):
        check_model_dir(tmp_path / "no-such-model")


def _no_weights(d):
    (d / "model.safetensors").unlink()


def _no_tokenizer(d):
    (d / "tokenizer.json").unlink()


def _bad_config(d):
    (d / "config.json").write_text("{not json")


@pytest.mark.parametrize("break_it, message", [
    (_no_weights, r"broken: missing weights"),
    (_no_tokenizer, r"broken: .*missing a tokenizer"),
    (_bad_config, r"config.json is not readable JSON"),
], ids=["no-weights", "no-tokenizer", "config-not-json"])
def test_a_broken_directory_is_one_error_naming_what_is_missing(tmp_path, qwen_dir, break_it, message):
    broken = tmp_path / "broken"
    shutil.copytree(qwen_dir, broken)
    break_it(broken)
    with pytest.raises(ModelDirError, match=message):
        check_model_dir(broken)
    with pytest.raises(ModelDirError, match=message):
        load_model(broken)


def test_remed_model_info_on_a_broken_directory_is_one_line_and_exit_2(tmp_path):
    res = subprocess.run([str(Path(sys.executable).parent / "remed"), "model", "info", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120, env=os.environ | {"COLUMNS": "400"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "nope: not found" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_model_info_describes_without_loading(qwen_dir):
    d = describe(qwen_dir)
    assert d["model_type"] == "qwen2" and d["chat_template"] and d["parameters"] > 0


def test_a_bad_shape_is_refused_before_anything_is_built():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        ModelConfig(hidden_size=100, num_heads=3)
