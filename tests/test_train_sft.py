"""SFT on Ray Train: a tiny model built from a config and trained for a few steps on a
handful of real expert episodes by two DDP workers (gloo): the loss falls, the parameters
change, the checkpoint is a model directory that reloads and generates, a rerun resumes
from it; and the trained model is judged by execution on a held-out live incident."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from e2e_reme.train.data import AugmentConfig, DataConfig, HoldoutConfig
from e2e_reme.train.evaluate import EvalConfig, run_eval
from e2e_reme.train.model import ModelConfig, TokenizerConfig, load_model
from e2e_reme.train.rollout import SamplingParams, TransformersEngine
from e2e_reme.train.sft import (LoraConfig, SFTConfig, TrainConfig, batch_indices, checkpoints, lm_windows, lr_at,
                                run_sft)

EPISODES = Path(__file__).parent / "data" / "train-episodes.jsonl"


@pytest.fixture(scope="module")
def ray_session():
    import ray
    from e2e_reme.ray_auth import private_token
    private_token()     # as every head the project starts: the token 0600 before Ray writes one
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return SFTConfig(
        out=str(tmp_path_factory.mktemp("sft") / "run"),
        model_config=ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                 tokenizer=TokenizerConfig(vocab_size=1024)),
        data=DataConfig(episodes=(str(EPISODES),), holdout=HoldoutConfig(systems=("simple-micro",)),
                        augment=AugmentConfig(copies=1)),
        train=TrainConfig(workers=2, max_steps=6, batch_size=2, lr=3e-3, warmup_steps=1, checkpoint_every=3,
                          log_every=1, keep_checkpoints=3),
        eval=EvalConfig(enabled=False))


@pytest.fixture(scope="module")
def trained(ray_session, config):
    summary = run_sft(config)
    return Path(config.out), summary


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_train_and_the_loss_falls(trained):
    out, _ = trained
    ms = metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3, 4, 5, 6]
    assert ms[-1]["loss"] < ms[0]["loss"] - 0.5
    assert all(m["tokens_per_s"] > 0 for m in ms)


def test_the_parameters_change(trained):
    out, summary = trained
    before = load_model(out / "init").model.state_dict()
    after = load_model(summary["model"]).model.state_dict()
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("q_proj.weight"))


def test_checkpoints_are_model_directories_that_reload_and_generate(trained):
    out, summary = trained
    cps = checkpoints(out)
    assert [json.loads((c / "trainer_state.json").read_text())["step"] for c in cps] == [3, 6]
    for path in (cps[0], Path(summary["model"])):
        eng = TransformersEngine(path)
        c = eng.generate([[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]],
                         SamplingParams(max_tokens=6))[0][0]
        assert 0 < len(c.completion_ids) <= 6


def test_metrics_go_to_jsonl_and_tensorboard(trained):
    out, _ = trained
    assert (out / "metrics.jsonl").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((out / "config.json").read_text())["train"]["workers"] == 2


def test_a_rerun_resumes_from_the_last_checkpoint(trained, config):
    out, _ = trained
    run_sft(replace(config, train=replace(config.train, max_steps=8)))
    steps = [m["step"] for m in metrics(out)]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert json.loads((checkpoints(out)[-1] / "trainer_state.json").read_text())["step"] == 8


def test_a_run_directory_refuses_other_settings(trained, config):
    with pytest.raises(ValueError, match="another train.lr"):
        run_sft(replace(config, train=replace(config.train, lr=1e-4)))


def test_batches_are_a_deterministic_stream_of_epochs():
    seen = [i for s in range(5) for i in batch_indices(s, 10, 4, seed=0)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert batch_indices(3, 10, 4, 0) == batch_indices(3, 10, 4, 0)


def test_the_learning_rate_warms_up_then_decays():
    t = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(110, t) == pytest.approx(0.1) and lr_at(60, t) == pytest.approx(0.55)


HELD_OUT = None        # the repository's splits (configs/splits.yaml): simple-micro is the test split's whole system
ONE_CASE = EvalConfig(split="test", faults=("cpu-stress",), limit=1, held_out_services=False, max_tokens=64,
                      verify_load=False, sandbox_prefix="pt-ev")


@pytest.fixture(scope="module")
def model_eval(trained, tmp_path_factory):
    _, summary = trained
    out = tmp_path_factory.mktemp("eval") / "model"
    return out, run_eval(summary["model"], ONE_CASE, HELD_OUT, out)


@pytest.mark.slow
def test_the_trained_model_is_judged_by_executing_its_answer_on_a_live_held_out_incident(model_eval):
    out, res = model_eval
    (rec,) = [json.loads(l) for l in (out / "episodes.jsonl").read_text().splitlines()]
    assert rec["eval_set"] == "system:simple-micro" and rec["scenario"]["system"] == "simple-micro"
    assert rec["outcome"] in ("success", "failure")
    # A few steps on six episodes do not make a remediator: its answer stops somewhere, and
    # the results say where (and what it cost in tokens).
    o = res["overall"]
    assert o["cases"] == 1 and o["successes"] + sum(o["failure_stages"].values()) == 1
    assert o["prompt_tokens_per_case"] > 500
    assert rec["trials"][0]["extra"]["completion_ids"]
    assert len(json.loads((out / "config.json").read_text())["weights_sha256"]) == 64     # what it judged


@pytest.mark.slow
def test_the_runbook_is_judged_on_the_same_cases_and_set_beside_the_model(model_eval, tmp_path):
    from e2e_reme.simulators.policies.base import make_policy
    from e2e_reme.train.evaluate import compare
    model_out, model_res = model_eval
    res = run_eval(None, ONE_CASE, HELD_OUT, tmp_path / "runbook", policy=make_policy("runbook"))
    assert res["model"] == "policy:runbook" and res["overall"]["successes"] == 1
    both = compare({"model": model_out, "runbook": tmp_path / "runbook"}, tmp_path / "cmp")
    assert both["cases"] == 1 and list(both["policies"]) == ["model", "runbook"]
    assert both["policies"]["runbook"]["overall"]["success_rate"] == 1.0
    assert both["policies"]["model"]["overall"] == model_res["overall"]
    assert (tmp_path / "cmp" / "results.json").is_file()


def test_a_results_directory_holding_another_models_evaluation_is_refused(trained, tmp_path):
    _, summary = trained
    (tmp_path / "config.json").write_text(json.dumps({"model": "policy:runbook", "eval": {}, "holdout": {}}))
    with pytest.raises(ValueError, match="another model"):
        run_eval(summary["model"], ONE_CASE, HELD_OUT, tmp_path)


def test_the_same_model_directory_with_other_weights_is_refused(trained, tmp_path):
    """A results directory records the weights it judged, not only their path: a model
    directory retrained in place (or another trim behind the same link) starts its own."""
    from e2e_reme.train.model import check_model_dir
    from e2e_reme.train.release import weights_sha256
    _, summary = trained
    (tmp_path / "config.json").write_text(json.dumps({"model": str(check_model_dir(summary["model"])),
                                                      "weights_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="another weights_sha256"):
        run_eval(summary["model"], ONE_CASE, HELD_OUT, tmp_path)
    assert weights_sha256(summary["model"]) != "0" * 64


def _results(d: Path, outcomes: dict[str, str]) -> Path:
    d.mkdir()
    (d / "episodes.jsonl").write_text("".join(
        json.dumps({"id": i, "outcome": o, "eval_set": "system:x", "scenario": {"fault": "cpu-stress"}}) + "\n"
        for i, o in outcomes.items()))
    (d / "results.json").write_text("{}")
    return d


def test_evaluations_of_different_cases_are_not_set_side_by_side(tmp_path):
    from e2e_reme.train.errors import TrainError
    from e2e_reme.train.evaluate import compare
    a = _results(tmp_path / "a", {"c1": "success", "c2": "success"})
    b = _results(tmp_path / "b", {"c1": "failure", "c3": "success"})
    with pytest.raises(TrainError, match="judged different cases"):
        compare({"a": a, "b": b}, tmp_path / "cmp")
    # Asked for, the cases both judged are compared, and only those.
    both = compare({"a": a, "b": b}, tmp_path / "cmp", common=True)
    assert both["cases"] == 1 and both["common_only"]
    assert both["policies"]["a"]["overall"]["successes"] == 1 and both["policies"]["b"]["overall"]["successes"] == 0


def test_the_lm_phase_cuts_the_same_windows_everywhere_and_ends_some_with_the_answer():
    examples = [{"input_ids": list(range(k * 1000, k * 1000 + 900)), "prompt_len": 700} for k in range(5)]
    a = lm_windows(4, examples, 8, 256, seed=0, answer_share=0.5)
    assert a == lm_windows(4, examples, 8, 256, seed=0, answer_share=0.5)
    assert all(len(w) == 256 for w in a)
    assert any(w[-1] % 1000 == 899 for w in a) and any(w[-1] % 1000 != 899 for w in a)


def test_with_a_head_the_answer_windows_splice_the_reports_header_onto_the_answer():
    # prompt ids k*1000 .. k*1000+699, answer k*1000+700 .. k*1000+899
    examples = [{"input_ids": list(range(k * 1000, k * 1000 + 900)), "prompt_len": 700} for k in range(5)]
    ws = lm_windows(3, examples, 16, 300, seed=0, answer_share=1.0, head=50)
    for w in ws:
        base = w[0] - w[0] % 1000
        assert len(w) == 300
        assert w[:50] == list(range(base, base + 50))                 # the prompt's head
        assert w[-200:] == list(range(base + 700, base + 900))        # the whole answer
        assert w[50:100] == list(range(base + 650, base + 700))       # the prompt's tail between


def test_fsdp_on_cpu_is_refused_with_the_reason(tmp_path, config):
    bad = replace(config, out=str(tmp_path / "fsdp"), train=replace(config.train, fsdp=True, use_gpu="false"))
    with pytest.raises(ValueError, match="fsdp needs GPUs"):
        run_sft(bad)


@pytest.mark.slow
def test_lora_trains_adapters_and_checkpoints_a_merged_model(ray_session, config, tmp_path):
    cfg = replace(config, out=str(tmp_path / "lora"),
                  train=replace(config.train, max_steps=4, checkpoint_every=2, lora=LoraConfig(r=4, alpha=8)))
    summary = run_sft(cfg)
    last = checkpoints(Path(cfg.out))[-1]
    assert (last / "adapter" / "adapter_config.json").is_file() and (last / "model.safetensors").is_file()
    base = load_model(Path(cfg.out) / "init").model.state_dict()
    merged = load_model(summary["model"]).model.state_dict()
    assert any(not torch.equal(base[k], merged[k]) for k in base if k.endswith("q_proj.weight"))
    # The exported model keeps its adapter: what `remed release pack` makes a release of.
    from e2e_reme.train.release import pack
    assert (Path(summary["model"]) / "adapter" / "adapter_model.safetensors").is_file()
    assert (pack(summary["model"], tmp_path / "releases" / "lora") / "adapter" / "adapter_model.safetensors").is_file()
    run_sft(replace(cfg, train=replace(cfg.train, max_steps=6)))      # resumes from the adapter
    assert [m["step"] for m in metrics(Path(cfg.out))] == [1, 2, 3, 4, 5, 6]
