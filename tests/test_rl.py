"""Reinforcement fine-tuning end to end (train/rl.py), with the tiny model on CPU: a run
submitted with `ray job submit` to a head node this module starts (on free ports) and
stops, whose step takes its rewards from real verdicts of real sandboxes through the judge,
changes the parameters and writes a checkpoint; a rerun resumes from it. The objective's
arithmetic is specified in test_rl_objective.py.

The tiny random model writes no playbook, so its samples fail at extract; the expert's
answer to the observed report joins each group (`expert_per_group: 1`) and is judged like
any completion, which gives the group the variance an update needs. Without it, every
group lacks signal: the step draws other cases (dynamic sampling) and then skips its update.
The judge's same-state rule (a completion judged against the state its prompt describes)
is tested in test_rl_same_state.py.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from e2e_reme.simulators import create_sandbox, list_sandboxes
from e2e_reme.simulators.episode import EpisodeConfig, Scenario, run_episode
from e2e_reme.simulators.policies import make_policy
from e2e_reme.simulators.systems.deploy import deploy, wait_healthy
from e2e_reme.train.model import ModelConfig, TokenizerConfig, init_model
from e2e_reme.train.rl import run
from e2e_reme.train.rl_config import load_config
from e2e_reme.train.rl_workers import actor_options, checkpoints, rollout_actor_name, trainer_actor_name

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PREFIX = f"ptrl{secrets.token_hex(1)}"
# Token authentication on the head and its clients, said explicitly: `ray start --head`
# turns it on only where ~/.ray/auth_token already exists (a local `ray.init` of an earlier
# test may have written it), and a client asked to send a token needs one. The head inherits
# OMP_WAIT_POLICY from the environment conftest set, as its workers must (docs/train.md).
CLIENT_ENV = {**os.environ, "RAY_AUTH_MODE": "token"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def traces(image, tmp_path_factory):
    """One verified expert trace: the runbook fixing pod-fail on simple-micro."""
    d = tmp_path_factory.mktemp("traces")
    with create_sandbox("nspawn", nodes=1, name=f"{PREFIX}-t") as sb:
        dep = deploy(sb, "simple-micro")
        sb.checkpoint()
        wait_healthy(sb, dep)
        rec = run_episode(sb, dep, Scenario("simple-micro", "pod-fail", "time-service", seed=3),
                          make_policy("runbook"), out_dir=d / "episodes",
                          config=EpisodeConfig(verify_load=False, report_window_s=1.0))
    assert rec.outcome == "success", rec.reason
    (d / "records.jsonl").write_text(json.dumps(rec.to_dict(), default=str) + "\n")
    return d / "records.jsonl"


MAX_TOKENS = 400      # above the pod-fail answer in the tiny model's tokens (the config checks it)


@pytest.fixture(scope="module")
def config_file(traces, tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    texts = [json.loads(traces.read_text())["report_text"], "- hosts: n0\n  tasks: []\n"]
    model = init_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                   tokenizer=TokenizerConfig(vocab_size=512), seed=1), d / "tiny", texts)
    # The trace is on simple-micro, which the repository's splits hold out for the test; RL draws
    # only the train split's cases, so this run has splits of its own where simple-micro trains.
    splits = d / "splits.yaml"
    splits.write_text(yaml.safe_dump({"trained_faults": ["pod-fail"],
                                      "validation": {"services": {"boutique": ["adservice"]}},
                                      "test": {"systems": ["train-ticket"]}}))
    cfg = {"out": str(d / "run"), "model": str(model), "steps": 1, "seed": 1,
           "data": {"episodes": [str(traces)], "splits": str(splits)},
           "rollout": {"scenarios_per_step": 1, "group_size": 1, "expert_per_group": 1, "refill_groups": 0,
                       "max_tokens": MAX_TOKENS, "engine": "transformers", "cpus": 1},
           "update": {"lr": 0.01, "workers": 1, "use_gpu": "false"},
           "fleet": {"episode_timeout_s": 1800, "host": {"slots": 2, "sandbox_prefix": PREFIX,
                              "episode": {"verify_load": False, "report_window_s": 1.0}}}}
    path = d / "rl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head on free ports that is also a sandbox host, stopped at the end (only ours)."""
    from e2e_reme.ray_auth import private_token
    private_token()     # ~/.ray/auth_token, 0600, where there is none (`ray get-auth-token` would write it 0644)
    dash = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--ray-client-server-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
         "--num-cpus=4", '--resources={"sandbox_host": 1}'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=CLIENT_ENV)
    address = f"http://127.0.0.1:{dash}"
    try:
        t0 = time.monotonic()
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                             capture_output=True, env=CLIENT_ENV).returncode != 0:
            assert proc.poll() is None and time.monotonic() - t0 < 120, "the Ray head did not come up"
            time.sleep(2)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def submitted(head, config_file):
    """`ray job submit` of a one-step run; its config and what the submit printed."""
    env = {**CLIENT_ENV, "PATH": f"{BIN}:{os.environ['PATH']}"}
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head, "--working-dir", str(ROOT), "--",
                        str(BIN / "python"), "train/rl.py", "--config", str(config_file)],
                       capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
    return load_config(config_file), r


def test_a_submitted_step_is_rewarded_by_real_verdicts_and_changes_the_policy(submitted):
    config, r = submitted
    assert r.returncode == 0 and "succeeded" in (r.stdout + r.stderr).lower(), (r.stdout + r.stderr)[-3000:]
    out = Path(config.out)
    (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = json.loads((out / "samples" / "step-000001.json").read_text())
    # The tiny model's samples fail (the policy's failure); the expert's answer is fixed.
    assert [(s["expert"], s["outcome"], s["reward"]) for s in samples] == [(False, "failure", 0.0),
                                                                          (True, "success", 1.0)]
    assert step["groups"] == 1 and step["groups_dropped_zero_variance"] == 0 and step["sequences"] == 2
    assert step["masked_state_mismatch"] == 0 and not step["update_skipped"]
    assert set(step["time_s"]) == {"judge", "update", "sync", "host_observe", "host_answer", "host_execute"}
    assert step["time_s"]["host_observe"] > 0 and step["time_s"]["host_execute"] > 0
    (ckpt,) = checkpoints(out)
    assert ckpt.name == "checkpoint_000001" and (out / "reward.png").is_file()
    assert _max_weight_change(config.model, ckpt) > 0
    assert not [r.name for r in list_sandboxes() if r.name.startswith(PREFIX)]


def test_a_rerun_resumes_from_the_last_checkpoint(submitted, config_file):
    config, r = submitted
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    lines = []
    summary = run(load_config(config_file, ["steps=2"]), say=lines.append)
    assert "from step 1 of 2" in lines[0]
    assert [json.loads(l)["step"] for l in (Path(config.out) / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert Path(summary["checkpoint"]).name == "checkpoint_000002"
    assert [c.name for c in checkpoints(Path(config.out))] == ["checkpoint_000001", "checkpoint_000002"]


def _kill_and_wait(actor, timeout: float = 60.0) -> None:
    ray.kill(actor)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return
        time.sleep(0.5)
    raise AssertionError("the rollout worker outlived ray.kill")


def test_a_lost_rollout_worker_costs_time_not_the_run(submitted, config_file):
    # The worker is killed after a step, as a lost node would end it; the next step's group
    # finds it dead when its sandbox host asks for the answers: a new worker, synced with
    # the trainer's weights, answers the group again, and the step is judged and learned from.
    config, r = submitted
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out, killed, lines = Path(config.out), [], []

    def kill_once(m):
        if not killed:
            _kill_and_wait(ray.get_actor(rollout_actor_name(out, 0), namespace="e2e-reme-rl"))
            killed.append(m["step"])

    run(load_config(config_file, ["steps=4"]), say=lines.append, on_step=kill_once)
    rows = {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    after = rows[killed[0] + 1]
    assert any("rollout worker lost" in line for line in lines), lines
    assert after["rollout_restarts"] == 1 and not after["update_failed"] and after["sequences"] == 2
    samples = json.loads((out / "samples" / f"step-{after['step']:06d}.json").read_text())
    assert [(s["expert"], s["reward"]) for s in samples] == [(False, 0.0), (True, 1.0)]
    assert checkpoints(out)[-1].name == "checkpoint_000004"
    assert not [r.name for r in list_sandboxes() if r.name.startswith(PREFIX)]


def test_a_failed_update_costs_its_step_not_the_run(submitted, config_file, tmp_path):
    # After step 1 the trainer actor is killed (as a lost node would end it): step 2 is
    # judged and logged as a failed update, nothing is learned from it, no checkpoint is
    # written for it, a new trainer starts from checkpoint 1, and step 3 learns again.
    config, r = submitted
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out, lines = tmp_path / "run", []

    def kill_after_step_1(m):
        if m["step"] == 1:
            _kill_and_wait(ray.get_actor(trainer_actor_name(out, 0), namespace="e2e-reme-rl"))

    summary = run(load_config(config_file, [f"out={out}", "steps=3"]), say=lines.append, on_step=kill_after_step_1)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["update_failed"]) for m in rows] == [(1, False), (2, True), (3, False)]
    assert rows[1]["reward"] is not None and rows[1]["loss"] is None      # judged, not learned from
    assert rows[2]["trainer_restarts"] == 1 and rows[2]["sequences"] == 2
    assert any("step 2: the update failed" in line for line in lines), lines
    assert [c.name for c in checkpoints(out)] == ["checkpoint_000001", "checkpoint_000003"]
    assert Path(summary["checkpoint"]).name == "checkpoint_000003" and summary["steps"] == 3
    assert not [r.name for r in list_sandboxes() if r.name.startswith(PREFIX)]


def test_groups_without_signal_are_refilled_then_the_step_skips_its_update(submitted, config_file, tmp_path):
    # No expert in the groups: the tiny model's two samples both fail, the group has nothing
    # to teach; the step draws one more group (refill_groups 1), which fails alike; with no
    # sequence to learn from, the update is skipped (no optimizer step, no checkpoint).
    config, r = submitted
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = tmp_path / "run"
    run(load_config(config_file, [f"out={out}", "rollout.group_size=2", "rollout.expert_per_group=0",
                                  "rollout.refill_groups=1"]), say=lambda s: None)
    (m,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert m["groups"] == 2 and m["groups_refilled"] == 1 and m["groups_with_signal"] == 0
    assert m["update_skipped"] and m["sequences"] is None and m["time_s"]["update"] < 1
    assert checkpoints(out) == []
    samples = json.loads((out / "samples" / "step-000001.json").read_text())
    assert [s["reward"] for s in samples] == [0.0] * 4 and {s["group"] for s in samples} == {0, 1}


@pytest.mark.parametrize("override, match", [("steps=0", "steps must be at least 1"),
                                             ("objective.algorithm=ppo", "grpo, reinforce"),
                                             ("rollout.group_size=0", "at least two completions"),
                                             ("rollout.bogus=1", "unknown keys.*bogus"),
                                             ("rollout.temperature=0.7", "both must be 1"),
                                             ("rollout.top_p=0.9", "both must be 1"),
                                             ("rollout.overlap=true", "unknown keys.*overlap"),
                                             ("update.workers=2", "one actor for the run"),
                                             ("fleet.episode_timeout_s=600", "whole group"),
                                             ("steps", "section.key=value")])
def test_a_bad_setting_names_the_problem(config_file, override, match):
    from e2e_reme.train.errors import TrainError
    with pytest.raises(TrainError, match=match):
        load_config(config_file, [override])


def _max_weight_change(before: str, after: Path) -> float:
    from safetensors.torch import load_file
    a, b = load_file(str(Path(before) / "model.safetensors")), load_file(str(after / "model.safetensors"))
    return max(float((a[k] - b[k]).abs().max()) for k in set(a) & set(b))


@pytest.mark.parametrize("name", ["rl-cpu.yaml", "rl-gpu-example.yaml"])
def test_the_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.steps >= 1 and cfg.fleet.host.backend == "nspawn" and cfg.objective.algorithm in ("grpo", "reinforce")


def test_the_saved_config_is_the_whole_run_config(submitted):
    config, _ = submitted
    saved = json.loads((Path(config.out) / "config.json").read_text())
    assert saved["rollout"]["expert_per_group"] == 1 and saved["fleet"]["host"]["slots"] == 2


def test_passk_judges_each_cases_samples_as_rl_does(submitted, config_file, tmp_path):
    # pass@k of the tiny model on the training case: two temperature-1 samples, observed
    # and judged on one sandbox; both fail (no playbook), so pass@2 is 0, and it is written.
    from e2e_reme.train.passk import run_passk
    config, r = submitted
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    seen = []
    res = run_passk(load_config(config_file, [f"out={tmp_path}"]), k=2, splits=("train",), say=lambda s: None,
                    on_case=lambda total, g: seen.append((total, g and len(g.judgements))))
    assert seen == [(1, None), (1, 2)]          # the progress: the count first, then the case judged
    (row,) = res["cases"]
    assert (row["split"], row["fault"], row["n"], row["c"], row["error"]) == ("train", "pod-fail", 2, 0, None)
    assert res["table"]["train"]["pod-fail"]["pass@2"] == 0.0
    assert json.loads((tmp_path / "passk.json").read_text())["k"] == 2


def test_the_generation_limit_is_above_the_longest_expert_answer(config_file):
    from e2e_reme.train.errors import TrainError
    from e2e_reme.train.rl import training_cases
    from e2e_reme.train.rl_config import check_generation_limit
    config = load_config(config_file)
    answers = [c["expert"] for c in training_cases(config)]
    longest = check_generation_limit(config, answers)
    assert 16 < longest <= MAX_TOKENS
    with pytest.raises(TrainError, match=f"longest expert answer.*{longest} tokens"):
        check_generation_limit(load_config(config_file, [f"rollout.max_tokens={longest - 1}"]), answers)


def test_the_gpu_config_gives_the_rollout_actor_its_gpu_and_the_cpu_config_none():
    gpu = actor_options(load_config(ROOT / "configs" / "rl-gpu-example.yaml"))
    assert gpu["rollout"]["num_gpus"] == 1 and gpu["trainer"]["num_gpus"] == 1
    cpu = actor_options(load_config(ROOT / "configs" / "rl-cpu.yaml"))
    assert cpu["rollout"]["num_gpus"] == 0 and cpu["trainer"] == {"num_cpus": 2, "num_gpus": 0.0}
    assert load_config(ROOT / "configs" / "rl-cpu.yaml").rollout.max_tokens == 768


def test_a_cluster_that_cannot_hold_both_actors_is_refused_not_waited_on(tmp_path):
    # A head started with 2 CPUs (`ray start --head` on this machine) cannot place the trainer
    # (2 CPUs) beside the rollout worker (1): the run says so and how to start the head,
    # instead of leaving the rollout worker pending for ever; 4 advertised CPUs hold both.
    code = f"""
import ray, sys
from e2e_reme.train.errors import TrainError
from e2e_reme.train.rl_config import load_config
from e2e_reme.train.rl_workers import check_resources
ray.init(address="local", num_cpus=int(sys.argv[1]), include_dashboard=False, log_to_driver=False)
try:
    check_resources(load_config({str(ROOT / "configs" / "rl-cpu.yaml")!r}))
    print("placed")
except TrainError as e:
    print("refused:", e)
finally:
    ray.shutdown()
"""
    out = {}
    for cpus in (2, 4):
        r = subprocess.run([sys.executable, "-c", code, str(cpus)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
        out[cpus] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-2000:]
    assert out[2].startswith("refused:") and "CPU 3 asked, 2 there" in out[2] and "--num-cpus 4" in out[2]
    assert out[4] == "placed"
