"""The model online: a REAL Ray Serve deployment of a tiny random model on this machine,
driven over real HTTP. Both APIs answer; dry-run executes nothing; execute needs the
token, runs in a real sandbox and returns the verifier's verdict; every bad input gets a
4xx that names the field and the fix."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from e2e_reme.serve.config import ServeConfig
from e2e_reme.serve.launch import Server, free_port
from e2e_reme.train.data import DataConfig, build_sft_data, corpus_texts
from e2e_reme.train.model import ModelConfig, TokenizerConfig, init_model

EPISODES = Path(__file__).parent / "data" / "train-episodes.jsonl"
TOKEN = secrets.token_urlsafe(24)
REPORT = json.loads(EPISODES.read_text().splitlines()[0])["report"]
REMED = str(Path(sys.executable).parent / "remed")


def marker_playbook(path: str) -> str:
    return (f"```yaml\n- hosts: n0\n  gather_facts: false\n  tasks:\n  - name: leave a mark\n"
            f"    ansible.builtin.file:\n      path: {path}\n      state: touch\n```")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    data = build_sft_data(DataConfig(episodes=(str(EPISODES),)))
    return init_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                  tokenizer=TokenizerConfig(vocab_size=1024), seed=1),
                      tmp_path_factory.mktemp("serve") / "tiny", corpus_texts(data.train))


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-run")
    (tmp / "token").write_text(TOKEN + "\n")
    (tmp / "token").chmod(0o600)             # a token file others can read is refused
    cfg = ServeConfig(model=str(tiny_model), port=free_port(), max_tokens=8, max_tokens_limit=64,
                      max_body_bytes=64 * 1024, max_batch_size=8, batch_wait_timeout_s=0.3,
                      token_file=str(tmp / "token"), sandboxes=("pt-srv-*",), exec_timeout_s=90,
                      verify_load=False, workdir=str(tmp / "work"), replica_cpus=0.5).with_token()
    srv = Server(cfg, ray_init={"num_cpus": 2})
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def sandbox(image):
    """A real one-node sandbox with simple-micro deployed and a baseline recorded."""
    from e2e_reme.simulators import create_sandbox
    from e2e_reme.simulators.systems.deploy import deploy
    from e2e_reme.simulators.verification.verifier import record_baseline
    with create_sandbox("nspawn", nodes=1, name=f"pt-srv-{secrets.token_hex(2)}") as sb:
        record_baseline(sb, deploy(sb, "simple-micro"))
        yield sb


def call(srv, method: str, path: str, body=None, token: str | None = None, raw: bytes | None = None,
         timeout: float = 300) -> tuple[int, dict, str]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(srv.url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            status, ctype = r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        text, status, ctype = e.read().decode(), e.code, e.headers.get("Content-Type", "")
    return status, (json.loads(text) if "json" in ctype else {}), text


def node_has(sb, path: str) -> bool:
    return sb.exec(f"test -e {path} && echo yes || echo no", node=0, timeout=30).stdout.strip() == "yes"


# ---- both APIs answer ------------------------------------------------------------------------

def test_healthz_names_the_model_and_whether_execute_is_enabled(server):
    status, body, _ = call(server, "GET", "/healthz")
    assert status == 200
    assert body == {"status": "ok", "model": "tiny", "engine": "transformers", "adapter": None, "execute_enabled": True}


def test_models_lists_the_served_model_as_openai_does(server):
    status, body, _ = call(server, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny"]


def test_chat_completion_answers_in_openai_shape_with_real_token_counts(server):
    status, body, _ = call(server, "POST", "/v1/chat/completions",
                           {"model": "tiny", "messages": [{"role": "user", "content": "restart the service"}],
                            "max_tokens": 5})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["prompt_tokens"] > 0 and 0 < u["completion_tokens"] <= 5
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_chat_completion_streams_server_sent_events_that_add_up_to_the_answer(server):
    body = {"messages": [{"role": "user", "content": "restart the service"}], "max_tokens": 6, "seed": 3}
    _, whole, _ = call(server, "POST", "/v1/chat/completions", body)
    status, _, text = call(server, "POST", "/v1/chat/completions",
                           {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    events = [l[len("data: "):] for l in text.split("\n\n") if l.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] in ("stop", "length")
    assert chunks[-1]["usage"] == whole["usage"]


def test_remediate_answers_with_the_playbook_stage_gate_syntax_tokens_and_model(server):
    status, body, _ = call(server, "POST", "/v1/remediate", {"report": REPORT, "max_tokens": 8})
    assert status == 200, body
    assert body["mode"] == "dry-run" and body["answer_source"] == "model"
    assert body["model"]["name"] == "tiny" and body["model"]["engine"] == "transformers"
    assert body["model"]["adapter"] is None
    assert body["tokens"]["prompt"] > 100 and 0 < body["tokens"]["completion"] <= 8
    assert body["inventory"] == list(REPORT["placement"])
    # The tiny random model writes no playbook: recorded as such, not an error.
    assert body["stage"] == "extract" and body["error_class"] == "NoYaml" and body["playbook"] is None
    assert body["syntax_check"]["status"] == "not run" and body["executed"] is False and body["verdict"] is None


def test_remediate_reports_the_gates_refusal_with_its_rules(server):
    status, body, _ = call(server, "POST", "/v1/remediate",
                           {"report": REPORT, "answer": "```yaml\n- hosts: n0\n  tasks:\n  - command: rm -rf /\n```"})
    assert status == 200
    assert body["stage"] == "gate" and body["error_class"] == "GateViolation" and not body["ok"]
    assert body["gate"]["ok"] is False and "destructive_delete" in body["gate"]["rules"]
    assert body["answer_source"] == "request" and body["tokens"]["total"] == 0


def test_a_safe_playbook_in_dry_run_without_a_sandbox_passes_the_gate_and_is_not_syntax_checked(server):
    status, body, _ = call(server, "POST", "/v1/remediate", {"report": REPORT, "answer": marker_playbook("/tmp/x")})
    assert status == 200
    assert body["ok"] and body["stage"] == "gate" and body["gate"]["ok"]
    assert body["syntax_check"]["status"] == "not run" and "sandbox" in body["syntax_check"]["detail"]


def test_concurrent_requests_share_generation_batches(server):
    results = []

    def one(i):
        results.append(call(server, "POST", "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": f"incident {i}"}], "max_tokens": 4})[0])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    before = _metric(server, "remed_serve_batch_size_count"), _metric(server, "remed_serve_batch_size_sum")
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4
    batches = _metric(server, "remed_serve_batch_size_count") - before[0]
    prompts = _metric(server, "remed_serve_batch_size_sum") - before[1]
    assert prompts == 4 and batches < 4, f"{prompts} prompts in {batches} batches"


def test_a_request_whose_client_goes_away_is_cancelled_and_never_generated(server):
    import socket
    import time
    from urllib.parse import urlparse
    before = _metric(server, "remed_serve_batch_size_sum")
    u = urlparse(server.url)
    body = json.dumps({"messages": [{"role": "user", "content": "going away"}], "max_tokens": 8}).encode()
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.05)             # inside the batch window (0.3 s): still queued, not generating
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not _metric(server, 'remed_serve_requests_total{route="/v1/chat/completions",status="499"}'):
        time.sleep(0.2)
    assert _metric(server, 'remed_serve_requests_total{route="/v1/chat/completions",status="499"}') >= 1
    assert _metric(server, "remed_serve_batch_size_sum") == before      # its prompt never reached the model
    assert call(server, "GET", "/healthz")[0] == 200


# ---- dry-run and execute against a real sandbox ----------------------------------------------

def test_dry_run_on_a_sandbox_syntax_checks_in_its_jail_and_executes_nothing(server, sandbox):
    mark = f"/tmp/srv-dry-{secrets.token_hex(3)}"
    status, body, _ = call(server, "POST", "/v1/remediate",
                           {"report": REPORT, "sandbox": sandbox.name, "answer": marker_playbook(mark)}, token=TOKEN)
    assert status == 200, body
    assert body["syntax_check"]["status"] == "passed" and body["stage"] == "done" and body["ok"]
    assert body["executed"] is False and body["execution"] is None and body["verdict"] is None
    assert body["inventory"] == [n.name for n in sandbox.nodes]
    assert not node_has(sandbox, mark)


@pytest.mark.parametrize("token, status", [(None, 401), ("not-the-token-" + "x" * 20, 403)])
def test_execute_without_the_right_token_is_refused_and_runs_nothing(server, sandbox, token, status):
    mark = f"/tmp/srv-noauth-{secrets.token_hex(3)}"
    got, body, _ = call(server, "POST", "/v1/remediate",
                        {"report": REPORT, "mode": "execute", "sandbox": sandbox.name,
                         "answer": marker_playbook(mark)}, token=token)
    assert got == status and "token" in body["error"]["message"]
    assert not node_has(sandbox, mark)


def test_execute_with_the_token_runs_in_the_sandbox_and_returns_the_verdict_with_evidence(server, sandbox):
    mark = f"/tmp/srv-exec-{secrets.token_hex(3)}"
    status, body, _ = call(server, "POST", "/v1/remediate",
                           {"report": REPORT, "mode": "execute", "sandbox": sandbox.name,
                            "answer": marker_playbook(mark)}, token=TOKEN)
    assert status == 200, body
    assert body["executed"] is True and body["execution"]["ok"] and body["stage"] == "done"
    assert node_has(sandbox, mark)
    v = body["verdict"]
    assert v["judged"] is True and isinstance(v["success"], bool)
    assert {c["name"] for c in v["checks"]} >= {"fault_gone", "services", "integrity"}
    assert all("evidence" in c and "detail" in c for c in v["checks"])
    assert Path(server.cfg.workdir, body["workdir"], "playbook.yaml").is_file()   # relative: no path of the host


def test_metrics_count_requests_tokens_gate_refusals_and_executions(server):
    _, _, text = call(server, "GET", "/metrics")
    assert 'remed_serve_requests_total{route="/v1/remediate",status="200"}' in text
    assert 'remed_serve_tokens_total{kind="completion"}' in text
    assert 'remed_serve_gate_refusals_total{rule="destructive_delete"}' in text
    assert "remed_serve_request_latency_seconds_bucket" in text
    if 'remed_serve_executions_total' in text.replace("# HELP remed_serve_executions_total", ""):
        assert 'remed_serve_executions_total{verdict=' in text


# ---- bad input: a 4xx naming the field and the fix, never a 500 ---------------------------------

BIG = {"report": {**REPORT, "logs": ["x" * 1000] * 100}}

BAD = [
    ("malformed JSON", "/v1/remediate", b'{"report": ', None, 400, "not valid JSON"),
    ("a JSON array", "/v1/remediate", b"[1, 2]", None, 400, "JSON object"),
    ("no report", "/v1/remediate", {"mode": "dry-run"}, None, 422, "report"),
    ("a wrong level", "/v1/remediate", {"report": {**REPORT, "level": "everything"}}, None, 422, "report.level"),
    ("symptoms not a list", "/v1/remediate", {"report": {**REPORT, "symptoms": 5}}, None, 422, "report.symptoms"),
    ("an unknown field", "/v1/remediate", {"report": REPORT, "playbook_path": "/etc/x"}, None, 422, "playbook_path"),
    ("an unknown mode", "/v1/remediate", {"report": REPORT, "mode": "run"}, None, 422, "mode"),
    ("a bad host name", "/v1/remediate", {"report": REPORT, "inventory": ["localhost; rm"]}, None, 422, "inventory"),
    ("too many tokens", "/v1/remediate", {"report": REPORT, "max_tokens": 10_000}, None, 422, "max_tokens"),
    ("an oversized report", "/v1/remediate", BIG, None, 413, "smaller report"),
    ("execute without a sandbox", "/v1/remediate", {"report": REPORT, "mode": "execute"}, TOKEN, 422, "sandbox"),
    ("a bad sandbox name", "/v1/remediate", {"report": REPORT, "sandbox": "../etc"}, TOKEN, 422, "sandbox"),
    ("a sandbox outside the allowed ones", "/v1/remediate", {"report": REPORT, "sandbox": "prod-db"}, TOKEN, 403,
     "sandbox"),
    ("an unknown sandbox", "/v1/remediate", {"report": REPORT, "mode": "execute", "sandbox": "pt-srv-none"}, TOKEN,
     404, "sandbox"),
    ("a sandbox without the token", "/v1/remediate", {"report": REPORT, "sandbox": "pt-srv-none"}, None, 401,
     "token"),
    ("no messages", "/v1/chat/completions", {"model": "tiny"}, None, 422, "messages"),
    ("a message without a role", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, None, 422,
     "messages.0.role"),
    ("another model", "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
     None, 404, "model"),
    ("a negative temperature", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, None, 422, "temperature"),
]


@pytest.mark.parametrize("what, path, body, token, status, names", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_naming_the_field_and_the_fix(server, what, path, body, token, status, names):
    raw = body if isinstance(body, bytes) else None
    got, answer, text = call(server, "POST", path, None if raw else body, token=token, raw=raw)
    assert got == status, text
    msg = answer["error"]["message"]
    assert names in msg and "Traceback" not in text, msg


def test_inventory_that_is_not_the_sandboxes_own_is_refused(server, sandbox):
    status, body, _ = call(server, "POST", "/v1/remediate",
                           {"report": REPORT, "sandbox": sandbox.name, "inventory": ["n0", "db.example.com"],
                            "answer": marker_playbook("/tmp/y")}, token=TOKEN)
    assert status == 422 and body["error"]["param"] == "inventory"
    assert "sandbox's own inventory" in body["error"]["message"]


# ---- the benchmark through the deployed model ----------------------------------------------------

def test_the_benchmark_runs_the_solo_policy_through_the_served_model_and_records_its_failures(server, image,
                                                                                              tmp_path):
    # The server refuses max_tokens above its limit (64 here) rather than lowering it: the
    # policy asks for what the server allows.
    (tmp_path / "bench.yaml").write_text("policy_options: {max_tokens: 64}\n")
    res = subprocess.run([REMED, "bench", "--policy", "solo", "--base-url", server.url + "/v1", "--system",
                          "simple-micro", "--suite", "easy", "--limit", "1", "--no-load", "--out", str(tmp_path),
                          "--config", str(tmp_path / "bench.yaml"), "--json"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode in (0, 1), res.stderr[-2000:]
    results = json.loads(res.stdout[res.stdout.index("{"):])
    assert results["cases"] == 1 and results["complete"] and results["successes"] == 0
    record = json.loads((tmp_path / "episodes.jsonl").read_text().splitlines()[0])
    # The served model answered (its name, its real token counts) and the tiny random model
    # wrote no playbook: a recorded failure, not a crash.
    assert record["trials"][0]["model"] == "tiny" and record["trials"][0]["completion_tokens"] > 0
    assert (record["outcome"], record["error_class"]) == ("failure", "NoYaml")


# ---- a LoRA adapter directory is served as base + adapter -------------------------------------------

def test_a_lora_adapter_directory_loads_as_its_base_with_the_adapter_merged(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from e2e_reme.serve.engine import load_engine
    from e2e_reme.train.rollout import SamplingParams
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                    task_type="CAUSAL_LM")).save_pretrained(tmp_path / "adapter")
    engine, info = load_engine(tmp_path / "adapter", kind="transformers")
    assert info["adapter"] == str((tmp_path / "adapter").resolve()) and info["base"] == str(Path(tiny_model).resolve())
    out = engine.generate([[{"role": "user", "content": "restart"}]], SamplingParams(max_tokens=3))
    assert 0 < len(out[0][0].completion_ids) <= 3
    assert not any("lora" in n for n, _ in engine.model.named_parameters())


def test_a_lora_checkpoint_is_served_merged_and_names_its_adapter_and_base(tiny_model, tmp_path):
    import shutil
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from e2e_reme.serve.engine import load_engine
    ckpt = tmp_path / "checkpoint_000003"
    shutil.copytree(tiny_model, ckpt)              # the merged weights (train/sft.py write_model_dir)
    get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                   LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
                   ).save_pretrained(ckpt / "adapter")
    (ckpt / "rl_state.json").write_text(json.dumps({"step": 3, "metrics": {}}))
    _, info = load_engine(ckpt, kind="transformers")
    assert (info["adapter"], info["merged"], info["rl_step"]) == (str(ckpt.resolve() / "adapter"), True, 3)
    assert info["base"] == str(tiny_model)


# ---- the command line --------------------------------------------------------------------------

def test_remed_serve_without_a_usable_model_is_one_clear_line(tmp_path):
    res = subprocess.run([REMED, "serve", "--model", str(tmp_path / "nothing")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert [l for l in res.stderr.splitlines() if l.strip()][0].startswith("error: model directory")


def test_remed_serve_starts_the_app_and_stops_it_cleanly_on_sigterm(tiny_model, tmp_path):
    import signal
    import time
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([REMED, "serve", "--model", str(tiny_model), "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env={**__import__("os").environ, "REMED_SERVE_TOKEN": ""})
    try:
        deadline, health = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    health = json.loads(r.read())
                    break
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(1)
        assert health == {"status": "ok", "model": "tiny", "engine": "transformers", "adapter": None,
                          "execute_enabled": False}, (tmp_path / "serve.log").read_text()[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        log.close()
    out = (tmp_path / "serve.log").read_text()
    assert rc == 0 and "Traceback" not in out, out[-2000:]
    assert "stopping" in out


def _metric(srv, name: str) -> float:
    _, _, text = call(srv, "GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and "{" not in name):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
