"""Model-backed policies: prompts, chat clients over real HTTP, the probe allow-list,
SoloGen and ThinkRemed. The language model is the only thing stood in for (ScriptedResponder
behind a real local HTTP server, or a tiny random transformers model); the probes run in a
real nspawn sandbox."""

from __future__ import annotations

import importlib.util
import json
import secrets
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from e2e_reme.simulators.policies import Generation, PolicyContext, TrialFeedback, make_policy
from e2e_reme.serve.local_server import LocalChatServer, ScriptedResponder
from e2e_reme.simulators.policies.models import (ChatModel, ModelError, OpenAIChatModel, TransformersChatModel,
                                                 make_model)
from e2e_reme.simulators.policies.prompt import (TEMPLATES, build_messages, load_template, render_feedback,
                                                 report_text)
from e2e_reme.simulators.policies.tools import check_command, make_probe, parse_text_probes
from e2e_reme.simulators.reports import LEVELS, DiagnosisReport
from e2e_reme.simulators.sandbox.base import ExecResult

HOSTS = ("n0", "n1")
PLAYBOOK = "Restart it.\n```yaml\n- hosts: n0\n  gather_facts: false\n  tasks: []\n```\n"


def report(level: str) -> DiagnosisReport:
    """A hand-made report at `level`, shaped like simulators.reports.build_report's."""
    common = dict(system="simple-micro", level=level, observations={"load": {"success_rate": 0.5}},
                  call_graph={"hello-service": ["time-service"], "time-service": []},
                  placement={"n0": ["hello-service"], "n1": ["time-service"]})
    if level == "minimal":
        return DiagnosisReport(symptoms=("50% of requests to the entry (hello-service) failed over 3 s",), **common)
    target = {"node": "n0", "unit": "remed-hello-service.service", "config_path": "/etc/remed/hello-service.yaml",
              "data_dir": "/var/lib/remed/hello-service", "port": 8080, "kind": "http", "health_path": "/health",
              "dependencies": {}}
    extra = dict(symptoms=("hello-service: unit is failed (failed)",), service="hello-service", target=target,
                 logs=("hello-service exited with error: config key port missing",))
    if level == "full":
        extra.update(category="application", fault_kind="config-error", evidence={"config": {"port": None}})
    return DiagnosisReport(**common, **extra)


def ctx(level: str = "symptoms", probe=None, episode: str = "ep-1") -> PolicyContext:
    return PolicyContext(report=report(level), inventory_hosts=HOSTS, system="simple-micro", seed=7, probe=probe,
                         episode_id=episode)


@pytest.fixture
def scripted():
    """(server, responder) factory: a real HTTP server replaying a script."""
    servers = []

    def start(answers):
        responder = ScriptedResponder(answers)
        srv = LocalChatServer(responder).start()
        servers.append(srv)
        return srv, responder
    yield start
    for s in servers:
        s.stop()


# ---- prompts --------------------------------------------------------------------------------

def test_templates_load_from_the_package():
    for name in TEMPLATES:
        assert load_template(name).strip()
    with pytest.raises(ValueError, match="unknown prompt template 'nope'.*system"):
        load_template("nope")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", ["solo", "think"])
def test_messages_carry_the_report_and_the_inventory(level, mode):
    r = report(level)
    msgs = build_messages(r, HOSTS, mode=mode)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert r.to_text() in msgs[1]["content"]
    assert "n0, n1" in msgs[0]["content"] and "n0, n1" in msgs[1]["content"]
    assert "```" in msgs[0]["content"] and "sshd" in msgs[0]["content"]
    assert ("PROBE <host>: <command>" in msgs[0]["content"]) == (mode == "think")
    # Training reads reports back from JSONL as dicts: the same messages.
    assert build_messages(json.loads(r.to_json()), HOSTS, mode=mode) == msgs
    assert report_text(r.to_text()) == r.to_text()


def test_messages_need_hosts_and_a_known_mode():
    with pytest.raises(ValueError, match="no hosts"):
        build_messages(report("full"), ())
    with pytest.raises(ValueError, match="mode 'both'"):
        build_messages(report("full"), HOSTS, mode="both")


def test_render_feedback_shows_the_run_and_the_weak_signal():
    fb = TrialFeedback(trial=1, stage="execute", error_class="TaskFailed", reason="task 'Restart' failed",
                       execution="FAILED Restart remed-hello-service: unit not found\nn0: ok=1 failed=1",
                       health={"ok": False, "services": {"hello-service": "failed"}, "error_rate": 0.5})
    text = render_feedback(fb)
    for piece in ("attempt 1", "execute", "TaskFailed", "task 'Restart' failed", "unit not found",
                  "hello-service failed", "50%", "```yaml"):
        assert piece in text
    assert render_feedback({"trial": 2, "stage": "done", "error_class": None, "reason": "", "execution": "",
                            "health": {}}).startswith("Your playbook of attempt 2")


# ---- the OpenAI-compatible client over a real local server ----------------------------------------

def test_openai_client_text_and_usage(scripted):
    srv, responder = scripted(["hello there operator"])
    model = OpenAIChatModel(srv.base_url, "scripted")
    assert isinstance(model, ChatModel)
    r = model.chat([{"role": "user", "content": "one two three"}], max_tokens=5, seed=1)
    assert r.text == "hello there operator"
    assert (r.prompt_tokens, r.completion_tokens) == (3, 3)   # the responder's usage, passed through
    assert r.finish_reason == "stop" and r.tool_calls == [] and r.raw["usage"]["total_tokens"] == 6
    assert model.list_models() == ["scripted"]
    # No /v1 in the URL means the /v1 API.
    assert OpenAIChatModel(srv.base_url[:-3], "x").base_url == srv.base_url


def test_openai_client_reports_no_usage_as_unknown(scripted):
    srv, _ = scripted([{"content": "hi", "usage": None}])
    r = OpenAIChatModel(srv.base_url, "scripted").chat([{"role": "user", "content": "x"}])
    assert r.text == "hi" and r.prompt_tokens is None and r.completion_tokens is None


def test_tool_call_round_trip(scripted):
    srv, responder = scripted([{"name": "probe", "arguments": {"host": "n0", "command": "uptime"}}, "done"])
    model = OpenAIChatModel(srv.base_url, "scripted")
    tools = [{"type": "function", "function": {"name": "probe", "parameters": {"type": "object"}}}]
    r = model.chat([{"role": "user", "content": "look"}], tools=tools)
    assert r.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in r.tool_calls] == [("probe", {"host": "n0", "command": "uptime"})]
    call = r.tool_calls[0]
    follow = [{"role": "user", "content": "look"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": call["id"], "type": "function",
                   "function": {"name": "probe", "arguments": json.dumps(call["arguments"])}}]},
              {"role": "tool", "tool_call_id": call["id"], "content": "up 3 min"}]
    assert model.chat(follow, tools=tools).text == "done"
    assert responder.requests[0][1] == tools
    assert responder.requests[1][0][2] == {"role": "tool", "tool_call_id": call["id"], "content": "up 3 min"}


def _raw_server(status: int, body: bytes):
    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_server_error_becomes_model_error(scripted):
    srv, _ = scripted([])          # an empty script: the responder fails, the server answers 500
    with pytest.raises(ModelError, match="HTTP 500.*script has 0 answers") as e:
        OpenAIChatModel(srv.base_url, "scripted").chat([{"role": "user", "content": "x"}])
    assert (e.value.kind, e.value.status) == ("http", 500)


def test_connection_refused_becomes_model_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                      # nothing listens there now
    with pytest.raises(ModelError, match="unreachable.*is the server running") as e:
        OpenAIChatModel(f"http://127.0.0.1:{port}/v1", "m", timeout_s=5).chat([{"role": "user", "content": "x"}])
    assert e.value.kind == "connection"


@pytest.mark.parametrize("body,match", [(b"<html>oops</html>", "not JSON"),
                                        (b'{"id": "x", "choices": []}', "not a chat completion")])
def test_malformed_answer_becomes_model_error(body, match):
    httpd = _raw_server(200, body)
    try:
        with pytest.raises(ModelError, match=match) as e:
            OpenAIChatModel(f"http://127.0.0.1:{httpd.server_address[1]}/v1", "m").chat(
                [{"role": "user", "content": "x"}])
        assert e.value.kind == "malformed"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_make_model_specs(tmp_path, scripted):
    srv, _ = scripted([])
    assert make_model(None, base_url=srv.base_url).name == "scripted"       # the endpoint's first model
    assert make_model("other", base_url=srv.base_url).name == "other"
    with pytest.raises(ValueError, match=f"model directory {tmp_path}: missing config.json"):
        make_model(str(tmp_path))
    with pytest.raises(ValueError, match="not found"):
        TransformersChatModel(tmp_path / "missing")
    with pytest.raises(ValueError, match="no model given"):
        make_model(None)


# ---- policies --------------------------------------------------------------------------------

def test_unknown_policy_lists_the_catalog():
    with pytest.raises(ValueError, match="unknown policy 'nope'.*runbook.*solo.*think"):
        make_policy("nope")
    with pytest.raises(ValueError, match="policy 'solo' needs a model"):
        make_policy("solo")
    with pytest.raises(ValueError, match="does not take bogus"):
        make_policy("think", model="m", base_url="http://127.0.0.1:9/v1", bogus=1)


def test_solo_one_prompt_one_answer(scripted):
    srv, responder = scripted([PLAYBOOK])
    policy = make_policy("solo", model="scripted", base_url=srv.base_url, max_tokens=256)
    assert (policy.name, policy.max_trials) == ("solo", 1)
    g = policy.generate(ctx("full"), [])
    assert isinstance(g, Generation) and g.text == PLAYBOOK
    assert [m["role"] for m in g.messages] == ["system", "user"]
    assert report("full").to_text() in g.messages[1]["content"]
    assert g.prompt_tokens == sum(len(m["content"].split()) for m in g.messages)
    assert g.completion_tokens == len(PLAYBOOK.split()) and g.model == "scripted" and g.latency_s > 0
    assert responder.requests[0][1] is None             # SoloGen offers no tools


def test_think_without_probes_available_says_so(scripted):
    srv, responder = scripted(["PROBE n0: uptime", PLAYBOOK])
    g = make_policy("think", model="scripted", base_url=srv.base_url).generate(ctx(), [])
    assert g.text == PLAYBOOK
    assert g.tool_calls[0]["output"].startswith("probes are unavailable")
    assert responder.requests[0][1][0]["function"]["name"] == "probe"


def test_think_probe_budget(scripted):
    calls = [{"name": "probe", "arguments": {"host": "n0", "command": "uptime"}},
             {"name": "probe", "arguments": {"host": "n1", "command": "uptime"}}]
    srv, responder = scripted([calls, "PROBE n0: uptime", PLAYBOOK])
    policy = make_policy("think", model="scripted", base_url=srv.base_url, max_probes=1)
    g = policy.generate(ctx(probe=lambda h, c: f"{h} is up"), [])
    assert [c["output"] for c in g.tool_calls] == ["n0 is up", "refused: the probe budget of this attempt (1) is "
                                                                 "used up; answer with the playbook"]
    # Out of budget: asked without tools, and the next answer is final, PROBE lines or not.
    assert responder.requests[1][1] is None
    assert g.text == "PROBE n0: uptime" and g.extra["model_calls"] == 2
    assert "No probes are left" in g.messages[-1]["content"]


def test_think_with_feedback_shows_it_and_the_earlier_trial(scripted):
    srv, responder = scripted(["PROBE n0: systemctl is-active remed-hello-service", PLAYBOOK, PLAYBOOK + " again"])
    policy = make_policy("think", model="scripted", base_url=srv.base_url)
    assert policy.max_trials == 3
    probe = lambda h, c: "failed"
    g1 = policy.generate(ctx(probe=probe), [])
    fb = TrialFeedback(trial=1, stage="execute", error_class="TaskFailed", reason="the restart task failed",
                       execution="FAILED Restart: exit 1", health={"ok": False, "error_rate": 1.0})
    g2 = policy.generate(ctx(probe=probe), [fb])
    assert g2.text == PLAYBOOK + " again" and g2.extra["trial"] == 2
    roles = [m["role"] for m in g2.messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert g2.messages[2]["content"] == g1.text
    assert render_feedback(fb) in g2.messages[3]["content"]
    assert "systemctl is-active remed-hello-service\nfailed" in g2.messages[1]["content"]   # trial 1's probe
    # Without the episode's memory (another process), the feedback is still there.
    g3 = make_policy("think", model="scripted", base_url=scripted([PLAYBOOK])[0].base_url).generate(
        ctx(probe=probe, episode="other"), [fb])
    assert render_feedback(fb) in g3.messages[-1]["content"]


def test_think_falls_back_to_text_probes_where_tools_are_refused():
    """vLLM without --enable-auto-tool-choice answers 400 to `tools`; PROBE lines work anywhere."""
    seen = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append("tools" in body)
            if "tools" in body:
                status, obj = 400, {"error": {"message": '"auto" tool choice requires --enable-auto-tool-choice'}}
            else:
                text = "PROBE n0: uptime" if len(seen) == 2 else PLAYBOOK
                status, obj = 200, {"choices": [{"message": {"role": "assistant", "content": text},
                                                 "finish_reason": "stop"}]}
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        policy = make_policy("think", model="m", base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1")
        g = policy.generate(ctx(probe=lambda h, c: "up 1 min"), [])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert seen == [True, False, False] and g.text == PLAYBOOK
    assert g.tool_calls[0]["output"] == "up 1 min" and g.prompt_tokens is None   # that server sends no usage


# ---- the probe allow-list --------------------------------------------------------------------

class Recorder:
    """A sandbox stand-in that records what would run: for checks that must run nothing."""

    def __init__(self, result=None):
        self.ran: list[tuple[str, int]] = []
        self.result = result or ExecResult(0, "ok\n", "", 0.01)
        self.nodes = [type("N", (), {"name": h})() for h in HOSTS]

    def exec(self, cmd, node=0, timeout=60):
        self.ran.append((cmd, node))
        return self.result


@pytest.mark.parametrize("command", ["rm -rf /", "cat /etc/shadow; reboot", "systemctl stop ssh",
                                     "echo x > /etc/hosts", "cat /etc/hosts && reboot", "cat $(echo /etc/shadow)",
                                     "ps aux | sh", "journalctl --vacuum-size=1M -u ssh", "cat /etc/remed/../shadow",
                                     "curl -s -m 3 -X POST http://198.18.0.2:8080/", "tail -f /proc/loadavg",
                                     "cat /etc/hosts\nreboot", "ip link set host0 down", "tc qdisc del dev host0 root"])
def test_allow_list_refuses_without_running(command):
    sb = Recorder()
    out = make_probe(sb, HOSTS)("n0", command)
    assert out.startswith("refused: ") and "\n" not in out
    assert sb.ran == []


def test_allow_list_accepts_read_only_commands_as_checked():
    for cmd in ("systemctl status remed-hello-service --no-pager", "journalctl -u ssh -n 20 --no-pager",
                "ps aux | grep -E 'a|b' | head -5", "top -bn1", "free -m", "df -h /", "ss -tlnp", "ip addr",
                "nft list ruleset", "tc qdisc show", "cat /proc/loadavg", "ls -la /etc/systemd/system",
                "curl -s -m 3 http://198.18.0.2:8080/health", "redis-cli -p 6379 ping", "getent hosts n0"):
        c = check_command(cmd)
        assert c.ok, (cmd, c.reason)
    sb = Recorder(ExecResult(3, "x" * 5000, "boom", 0.1))
    out = make_probe(sb, HOSTS, max_output=300)("n1", "ps aux | grep -E 'a|b'")
    assert sb.ran == [("ps aux | grep -E 'a|b'", 1)]
    assert len(out) <= 300 and "characters cut" in out and out.endswith("[exit 3]")
    assert make_probe(sb, HOSTS)("n9", "uptime").startswith("refused: host 'n9' is not in the inventory")


def test_probe_failure_is_output_not_exception():
    class Broken(Recorder):
        def exec(self, cmd, node=0, timeout=60):
            raise OSError("ssh went away")
    assert make_probe(Broken(), HOSTS)("n0", "uptime").startswith("error: could not run the probe on n0")


def test_text_probe_protocol():
    assert parse_text_probes("Let me look.\nPROBE n0: systemctl is-active ssh\n- `PROBE n1: free -m`\n") == [
        ("n0", "systemctl is-active ssh"), ("n1", "free -m")]


# ---- ThinkRemed against a real sandbox --------------------------------------------------------

@pytest.fixture(scope="module")
def sandbox(image):
    from e2e_reme.simulators import create_sandbox
    with create_sandbox("nspawn", nodes=1, name=f"pt-pol-{secrets.token_hex(2)}") as sb:
        yield sb


def test_think_probes_a_real_sandbox(sandbox, scripted):
    hosts = tuple(n.name for n in sandbox.nodes)
    assert hosts == ("n0",)
    srv, responder = scripted([{"name": "probe", "arguments": {"host": "n0", "command": "cat /proc/loadavg"}},
                               "I need one more fact.\nPROBE n0: systemctl is-active ssh", PLAYBOOK])
    policy = make_policy("think", model="scripted", base_url=srv.base_url)
    c = PolicyContext(report=report("minimal"), inventory_hosts=hosts, system="simple-micro",
                      probe=make_probe(sandbox, hosts))
    g = policy.generate(c, [])
    assert g.text == PLAYBOOK
    assert [(t["host"], t["command"], t["via"]) for t in g.tool_calls] == [
        ("n0", "cat /proc/loadavg", "tool"), ("n0", "systemctl is-active ssh", "text")]
    assert len(g.tool_calls[0]["output"].split()) == 5                   # /proc/loadavg's five fields
    assert g.tool_calls[1]["output"] == "active"
    assert [m["role"] for m in g.messages] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert g.prompt_tokens == sum(sum(len(str(m.get("content") or "").split()) for m in req[0])
                                  for req in responder.requests)        # summed over the three calls
    # Refused commands leave the node as it was.
    probe = make_probe(sandbox, hosts)
    for bad in ("systemctl stop ssh", "echo x > /etc/hosts", "cat /etc/shadow; reboot"):
        assert probe("n0", bad).startswith("refused:")
    assert probe("n0", "systemctl is-active ssh") == "active"
    assert "x" not in sandbox.exec("cat /etc/hosts").stdout.split()


# ---- a local transformers model --------------------------------------------------------------

HAVE_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    if not HAVE_TORCH:
        pytest.skip("torch and transformers are not installed (pip install torch==2.13.0 transformers)")
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = [report(level).to_text() for level in LEVELS] + [PLAYBOOK, "PROBE n0: systemctl is-active ssh"]
    tok.train_from_iterator(lines * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def test_transformers_model_generates_with_real_token_counts(tiny_model):
    model = TransformersChatModel(tiny_model, device="cpu")
    msgs = build_messages(report("full"), HOSTS)
    r = model.chat(msgs, max_tokens=12, seed=0)
    prompt_ids = model.tokenizer(model.render(msgs), add_special_tokens=False)["input_ids"]
    assert r.prompt_tokens == len(prompt_ids) == len(r.raw["prompt_ids"])
    assert 1 <= r.completion_tokens <= 12 and r.completion_tokens == len(r.raw["completion_ids"])
    assert r.text == model.tokenizer.decode(r.raw["completion_ids"], skip_special_tokens=True)
    assert r.finish_reason in ("stop", "length") and r.latency_s > 0
    # Greedy decoding is deterministic.
    assert model.chat(msgs, max_tokens=12).raw["completion_ids"] == r.raw["completion_ids"]
    # Tool-call transcripts are turned into the text protocol for a template without tools.
    tool_msgs = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "probe",
                                                      "arguments": '{"host": "n0", "command": "uptime"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "up 1 min"}]
    assert "PROBE n0: uptime" in model.render(tool_msgs) and "up 1 min" in model.render(tool_msgs)


def test_transformers_model_behind_the_local_server(tiny_model):
    from e2e_reme.serve.local_server import TransformersResponder
    responder = TransformersResponder(str(tiny_model), device="cpu")
    with LocalChatServer(responder) as srv:
        policy = make_policy("solo", base_url=srv.base_url, max_tokens=8)   # the endpoint's model
        g = policy.generate(ctx("full"), [])
    assert g.model == tiny_model.name
    direct = responder.model.chat(g.messages, max_tokens=8, seed=7)
    assert (g.prompt_tokens, g.completion_tokens) == (direct.prompt_tokens, direct.completion_tokens)
    assert g.text == direct.text
