"""Model releases (train/release.py) with the tiny model: an SFT output with a LoRA adapter is
packed into a release directory, which loads as its base with the adapter merged (the base
obtained as the manifest says and checked, its trimmed vocabulary rebuilt from the recorded
ids where the trim is not in the cache), and which every model-taking entry point accepts; an
altered adapter file, and a manifest that names another base, are each one clear error."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from e2e_reme.train.data import DataConfig, build_sft_data, corpus_texts, read_episodes, select_traces
from e2e_reme.train.model import ModelConfig, TokenizerConfig, init_model
from e2e_reme.train.release import (ReleaseError, add_eval, is_release, materialize, model_dir, pack, read_manifest,
                                    tokenizer_sha256, weights_sha256)
from e2e_reme.train.sft import LoraConfig, SFTConfig, TrainConfig

EPISODES = Path(__file__).parent / "data" / "train-episodes.jsonl"
TINY = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
            tokenizer=TokenizerConfig(vocab_size=512))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache of this module's own: imports and materialized releases land there."""
    d = tmp_path_factory.mktemp("cache")
    before = os.environ.get("E2E_REME_CACHE")
    os.environ["E2E_REME_CACHE"] = str(d)
    yield d
    if before is None:
        os.environ.pop("E2E_REME_CACHE", None)
    else:
        os.environ["E2E_REME_CACHE"] = before


@pytest.fixture(scope="module")
def texts():
    return list(corpus_texts(build_sft_data(DataConfig(episodes=(str(EPISODES),))).train))


@pytest.fixture(scope="module")
def bases(tmp_path_factory, texts):
    d = tmp_path_factory.mktemp("bases")
    return (init_model(ModelConfig(**TINY, seed=1), d / "tiny-a", texts),
            init_model(ModelConfig(**TINY, seed=2), d / "tiny-b", texts))


def sft_output(root: Path, base: Path) -> Path:
    """What `remed train sft` leaves with LoRA: <run>/config.json, <run>/data/train.jsonl and
    <run>/model with its adapter in adapter/ and e2e_reme_trained.json (a few random LoRA-B
    values, so that the adapter changes the model)."""
    import torch
    from peft import LoraConfig as PeftLora, get_peft_model
    from transformers import AutoModelForCausalLM
    run = root / "run"
    cfg = SFTConfig(out=str(run), model=str(base), data=DataConfig(episodes=(str(EPISODES),)),
                    train=TrainConfig(lora=LoraConfig(r=2, alpha=4, dropout=0.0)))
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), default=str))
    train = select_traces(read_episodes([EPISODES]), cfg.data)[0]
    (run / "data" / "train.jsonl").write_text("".join(json.dumps({"meta": {"episode": r["id"]}}) + "\n" for r in train))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           PeftLora(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(run / "model" / "adapter")
    (run / "model" / "e2e_reme_trained.json").write_text(json.dumps(
        {"stage": "sft", "step": 7, "base": str(base), "run": str(run), "commit": "c0ffee", "dirty": False,
         "data": {"traces": len(train)}}))
    return run / "model"


@pytest.fixture(scope="module")
def release(cache, bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return pack(sft_output(root, bases[0]), root / "releases" / "tiny-r1")


def test_a_release_is_a_small_adapter_with_a_manifest_that_says_how_it_was_made(release, bases):
    m = read_manifest(release)
    assert is_release(release) and m["name"] == "tiny-r1"
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= set(m["files"])
    assert (release / "MODEL_CARD.md").is_file() and not (release / "GEMMA_TERMS.html").exists()   # not a Gemma base
    assert m["base"]["kind"] == "dir" and m["base"]["weights_sha256"] == weights_sha256(bases[0])
    assert m["base"]["tokenizer_sha256"] == tokenizer_sha256(bases[0])
    t = m["training"]
    assert t["config"]["train"]["lora"]["r"] == 2 and t["commit"] == "c0ffee" and t["step"] == 7
    assert t["traces"]["records"] == 6 and len(t["traces"]["sha256"]) == 64 and t["traces"]["dataset_sha256"]
    assert any(c.startswith("remed train sft --config") for c in m["commands"])
    assert sum(p.stat().st_size for p in release.rglob("*") if p.is_file()) < 1 << 20


def test_a_release_loads_as_its_base_with_the_adapter_merged(release, bases, cache):
    import torch
    from transformers import AutoModelForCausalLM
    path = materialize(release)
    assert path.is_relative_to(cache) and json.loads((path / "release.json").read_text())["name"] == "tiny-r1"
    assert model_dir(release) == path and model_dir(bases[0]) == bases[0]      # cached; a model dir is itself
    merged = AutoModelForCausalLM.from_pretrained(str(path)).state_dict()
    base = AutoModelForCausalLM.from_pretrained(str(bases[0])).state_dict()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) and k.endswith("weight") for k in changed)


def test_every_model_taking_entry_point_accepts_a_release(release, tmp_path):
    from e2e_reme.serve.engine import load_engine
    from e2e_reme.train.rl_config import load_config
    from e2e_reme.train.rollout import SamplingParams
    engine, info = load_engine(release, kind="transformers")
    assert info["release"] == str(release.resolve()) and info["name"] == "tiny-r1" and info["merged"]
    out = engine.generate([[{"role": "user", "content": "restart"}]], SamplingParams(max_tokens=3))
    assert 0 < len(out[0][0].completion_ids) <= 3
    cfg = load_config(Path(__file__).parent.parent / "configs" / "rl-cpu.yaml", [f"model={release}"])
    assert Path(cfg.model) == materialize(release)


def test_an_altered_adapter_is_refused_naming_the_file_and_the_fix(release, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(release, bad)
    f = bad / "adapter" / "adapter_model.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-3] ^= 0x01
    f.write_bytes(bytes(blob))
    with pytest.raises(ReleaseError, match=r"adapter/adapter_model\.safetensors has sha256 .*restore it"):
        materialize(bad)
    (bad / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(ReleaseError, match=r"adapter/adapter_config\.json is missing"):
        materialize(bad)


def test_a_manifest_naming_another_base_is_refused(release, bases, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(release, other)
    m = read_manifest(other)
    # Another base, with that base's own hashes: the adapter says what it was trained on.
    m["base"].update(source=str(bases[1]), weights_sha256=weights_sha256(bases[1]),
                     tokenizer_sha256=tokenizer_sha256(bases[1]))
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ReleaseError, match="was trained on base weights .* the manifest's base was changed"):
        materialize(other)
    # Another base under the original's hashes: the base itself does not match them.
    m = read_manifest(release)
    m["base"]["source"] = str(bases[1])
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ReleaseError, match="is not the base the adapter was trained on"):
        materialize(other)


def test_a_trimmed_base_is_rebuilt_from_the_recorded_vocabulary(cache, bases, tmp_path):
    """The Gemma path in small: the base imported (cached by its hash) and trimmed; the release
    records the kept ids, and where the trim is gone (another machine, a changed runbook) the
    loader makes it again from them, to the same weights."""
    from e2e_reme.train.pretrained import import_model
    trimmed = import_model(str(bases[0]), trim_vocab=64).path
    out = sft_output(tmp_path, trimmed)
    rel = pack(out, tmp_path / "releases" / "tiny-trimmed")
    m = read_manifest(rel)
    voc = m["base"]["vocabulary"]
    assert m["base"]["kind"] == "hf" and voc["trim_vocab"] == 64 and (rel / "base-vocab.json.gz").is_file()
    ids = json.loads(gzip.decompress((rel / "base-vocab.json.gz").read_bytes()))
    assert len(ids) == voc["size"] < voc["full_size"]
    shutil.rmtree(trimmed)                       # the trim is gone; the full import stays in the cache
    path = materialize(rel)
    rebuilt = next(cache.glob("models/*-ids-*"))
    assert weights_sha256(rebuilt) == m["base"]["weights_sha256"] and (path / "config.json").is_file()


def test_pack_refuses_what_is_not_a_release(release, bases, tmp_path):
    with pytest.raises(ReleaseError, match="no LoRA adapter"):
        pack(bases[0], tmp_path / "r")
    with pytest.raises(ReleaseError, match="exists and is not empty"):
        pack(sft_output(tmp_path, bases[0]), release)
    stage2 = tmp_path / "stage2"
    shutil.copytree(bases[0], stage2)
    (stage2 / "e2e_reme_trained.json").write_text("{}")
    with pytest.raises(ReleaseError, match="itself a trained model"):
        pack(sft_output(tmp_path / "s2", stage2), tmp_path / "r2")


def test_a_config_that_did_not_train_the_run_is_refused(bases, tmp_path, cache):
    import yaml
    out = sft_output(tmp_path, bases[0])
    cfg = json.loads((out.parent / "config.json").read_text())
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump({**cfg, "eval": {**cfg["eval"], "parallel": 3}}))   # judging is not training
    bad.write_text(yaml.safe_dump({**cfg, "train": {**cfg["train"], "lr": 1.0}}))
    with pytest.raises(ReleaseError, match="not the config that trained .* differ in train"):
        pack(out, tmp_path / "r", config=bad)
    rel = pack(out, tmp_path / "r", config=good)
    assert f"remed train sft --config {good}" in read_manifest(rel)["commands"]


def test_an_evaluation_is_recorded_with_its_command_records_and_table(release, tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    recs = [{"id": f"c{i}", "outcome": "success" if i else "failure", "scenario": {"fault": "cpu-stress"}}
            for i in range(3)]
    (ev / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    g = {"cases": 3, "successes": 2, "success_rate": 2 / 3, "ci95": [0.2, 0.94]}
    (ev / "results.json").write_text(json.dumps({"split": "test", "model": f"release:{release}", "complete": True,
                                                 "overall": g, "per_fault": {"cpu-stress": g}, "per_set": {}}))
    (ev / "config.json").write_text(json.dumps({"command": f"remed train eval --model {release} --split test"}))
    rel = tmp_path / "rel"
    shutil.copytree(release, rel)
    e = add_eval(rel, ev)
    m = read_manifest(rel)
    assert m["evaluations"]["test"]["command"].startswith("remed train eval") and e["overall"]["successes"] == 2
    assert [json.loads(l)["id"] for l in gzip.decompress((rel / e["records"]).read_bytes()).decode().splitlines()] \
        == ["c0", "c1", "c2"]
    assert "| cpu-stress | 2 | 3 |" in (rel / "MODEL_CARD.md").read_text()
    materialize(rel)                 # recording an evaluation does not touch what the release loads


def rl_checkpoint(root: Path, start: Path, step: int = 3) -> Path:
    """What `train/rl.py` leaves: <run>/config.json (its model: the release it started from, as
    loaded) and <run>/checkpoint_<step>/ with rl_state.json and the run's LoRA adapter on that
    model (random LoRA-B values, so that it changes the model)."""
    import torch
    from peft import LoraConfig as PeftLora, get_peft_model
    from transformers import AutoModelForCausalLM
    from e2e_reme.train.rl_config import RLConfig
    run = root / "rl-run"
    cp = run / f"checkpoint_{step:06d}"
    cp.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(RLConfig(model=str(start), out=str(run)).to_dict(), default=str))
    (run / "metrics.jsonl").write_text(json.dumps({"step": step, "reward": 0.5}) + "\n")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(start)),
                           PeftLora(r=2, lora_alpha=4, target_modules=["k_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(cp / "adapter")
    (cp / "rl_state.json").write_text(json.dumps({"step": step, "metrics": {"reward": 0.5}}))
    return cp


def test_an_rl_checkpoint_is_released_on_the_release_it_started_from(release, cache, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    start = materialize(release)
    cp = rl_checkpoint(tmp_path, start)
    r2 = pack(cp, release.parent / "tiny-r2-rl")          # beside the release it was trained from
    try:
        m = read_manifest(r2)
        assert m["base"]["kind"] == "release" and m["base"]["source"] == "../tiny-r1"
        assert m["base"]["weights_sha256"] == weights_sha256(start)
        assert m["training"]["kind"] == "rl" and m["training"]["step"] == 3 and m["training"]["chosen_on"] == "validation"
        assert "tiny-r1" in (r2 / "MODEL_CARD.md").read_text()
        path = materialize(r2)
        merged = AutoModelForCausalLM.from_pretrained(str(path)).state_dict()
        base = AutoModelForCausalLM.from_pretrained(str(start)).state_dict()
        changed = [k for k in base if not torch.equal(base[k], merged[k])]
        assert changed and all("k_proj" in k for k in changed)            # only the RL adapter's layers moved
        # The release it stands on, changed after packing, is refused by name.
        keep = (release / "manifest.json").read_text()
        try:
            (release / "manifest.json").write_text(keep.replace('"tiny-r1"', '"tiny-r1 "', 1))
            shutil.rmtree(path)
            with pytest.raises(ReleaseError, match="base release tiny-r1 has manifest sha256"):
                materialize(r2)
        finally:
            (release / "manifest.json").write_text(keep)
    finally:
        shutil.rmtree(r2, ignore_errors=True)


def test_a_checkpoint_of_a_run_that_did_not_start_from_a_release_is_refused(bases, tmp_path):
    cp = rl_checkpoint(tmp_path, bases[0])
    with pytest.raises(ReleaseError, match="not from a release"):
        pack(cp, tmp_path / "releases" / "x")
