"""The execution pipeline: extract → parse → gate → syntax → execute → idempotence.

Extraction and parsing are pure; the rest runs real ansible-playbook against ONE real
nspawn sandbox shared by the module (no mocks of Ansible or of the sandbox)."""

from __future__ import annotations

import json
import secrets
import sys
import time

import pytest
import yaml

from e2e_reme.simulators import create_sandbox
from e2e_reme.simulators.errors import PlaybookParseError
from e2e_reme.simulators.playbook.execution import ERROR_CLASSES, STAGES, extract_yaml, parse_playbook, run_pipeline

PLAY = "- hosts: n0\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping: {}\n"


# ---- extract ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    f"Here is the fix:\n```yaml\n{PLAY}```\nIt restarts nothing.",
    f"```yml\n{PLAY}```",
    f"```\n{PLAY}```",
    f"~~~yaml\n{PLAY}~~~",
    f"```YAML title=fix.yaml\n{PLAY}```",
    f"First look:\n```bash\nsystemctl status x\n```\nthen:\n```yaml\n{PLAY}```",
    f"Vars:\n```yaml\nport: 8080\n```\nPlaybook:\n```yaml\n{PLAY}```",
    f"<think>\nMaybe:\n```yaml\n- hosts: localhost\n```\nNo.\n</think>\n```yaml\n{PLAY}```",
    f"I reasoned about it.</think>\n\n```yaml\n{PLAY}```",
    f"  1. the playbook:\n\n   ```yaml\n   {PLAY.replace(chr(10), chr(10) + '   ')}```",
    PLAY,
    f"---\n{PLAY}",
    f"```yaml\n{PLAY}",                       # the answer was cut off before the closing fence
], ids=["prose-around", "yml", "untagged", "tilde", "info-string", "bash-first", "dict-first", "think",
        "think-close-only", "indented", "bare", "bare-doc-start", "unterminated"])
def test_extract_finds_the_playbook(text):
    found = extract_yaml(text)
    assert found is not None and yaml.safe_load(found) == yaml.safe_load(PLAY)


@pytest.mark.parametrize("text", ["", "   ", "I cannot write a playbook for this.",
                                  "Run `systemctl restart remed-a` on the node.",
                                  "```bash\nsystemctl restart remed-a\n```",
                                  f"<think>\n```yaml\n{PLAY}```\nstill thinking", None],
                         ids=["empty", "blank", "prose", "inline-code", "bash-only", "unterminated-think", "none"])
def test_extract_finds_nothing(text):
    assert extract_yaml(text) is None


def test_extract_keeps_a_broken_yaml_block_for_parse_to_explain():
    assert extract_yaml("```yaml\n- hosts: n0\n  tasks: [\n```") == "- hosts: n0\n  tasks: [\n"


# ---- parse ------------------------------------------------------------------------------------------

def test_parse_returns_the_plays():
    assert parse_playbook(PLAY) == [{"hosts": "n0", "gather_facts": False, "tasks": [{"ansible.builtin.ping": {}}]}]


@pytest.mark.parametrize("text, error_class, words", [
    ("- hosts: n0\n  tasks: [\n", "InvalidYaml", "line"),
    ("- hosts: n0\n tasks: []\n", "InvalidYaml", "line 2"),
    ("hosts: n0\ntasks: []\n", "NotAPlaybook", "single mapping"),
    ("", "NotAPlaybook", "empty"),
    ("[]", "NotAPlaybook", "empty list"),
    ("42", "NotAPlaybook", "int"),
    ("- hosts: n0\n- just a string\n", "NotAPlaybook", "play 2"),
    ("x" * 300_000, "NotAPlaybook", "characters"),
], ids=["unclosed", "bad-indent", "dict", "empty", "empty-list", "scalar", "string-play", "too-long"])
def test_parse_refuses(text, error_class, words):
    with pytest.raises(PlaybookParseError) as e:
        parse_playbook(text)
    assert e.value.error_class == error_class and words in e.value.reason and "\n" not in e.value.reason


# ---- the stages before Ansible: no sandbox needed -----------------------------------------------------

@pytest.mark.parametrize("text, stage, error_class", [
    ("I would restart the service.", "extract", "NoYaml"),
    ("```yaml\n- hosts: n0\n  tasks: [\n```", "parse", "InvalidYaml"),
    ("```yaml\nhosts: n0\ntasks: []\n```", "parse", "NotAPlaybook"),
    ("```yaml\n- hosts: localhost\n  tasks:\n    - command: id\n```", "gate", "GateViolation"),
])
def test_early_stages_stop_with_their_error_class(tmp_path, text, stage, error_class):
    out = run_pipeline(text, inventory_hosts=["n0"], workdir=tmp_path / "w")
    assert (out.stage, out.ok, out.error_class) == (stage, False, error_class)
    assert out.run is None and not (tmp_path / "w" / "events.jsonl").exists()
    assert out.error_class in ERROR_CLASSES and out.stage in STAGES
    assert json.loads(json.dumps(out.to_dict()))["stage"] == stage
    assert out.summary().startswith("No playbook was run")


def test_a_gate_refusal_names_every_rule(tmp_path):
    text = "```yaml\n- hosts: n0\n  tasks:\n    - command: reboot\n    - shell: kill -9 -1\n```"
    out = run_pipeline(text, inventory_hosts=["n0"], workdir=tmp_path)
    assert out.gate is not None and list(out.gate.rules) == ["reboot", "kills_everything"]
    assert "reboot" in out.reason and "kills_everything" in out.reason
    assert "kill -9 -1" in out.summary()
    assert (tmp_path / "playbook.yaml").read_text().startswith("- hosts: n0")


# ---- against a real sandbox -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(image, tmp_path_factory):
    with create_sandbox("nspawn", nodes=1, name=f"pt-exec-{secrets.token_hex(2)}") as sb:
        yield sb, None, [n.name for n in sb.nodes]


def pipeline(env, tmp_path, tasks: list[dict], **kw):
    sb, inv, hosts = env
    play = [{"name": "remediate", "hosts": hosts[0], "gather_facts": False, "tasks": tasks}]
    text = f"Here you go:\n```yaml\n{yaml.safe_dump(play, sort_keys=False)}```\n"
    return run_pipeline(text, sandbox=sb, inventory_hosts=hosts, workdir=tmp_path, **kw)


def test_a_good_playbook_reaches_done(env, tmp_path):
    sb = env[0]
    out = pipeline(env, tmp_path, [{"name": "write the marker", "ansible.builtin.copy":
                                    {"content": "fixed\n", "dest": "/tmp/exec-good"}}])
    assert (out.stage, out.ok, out.error_class, out.reason) == ("done", True, None, "")
    assert out.run.ok and out.run.stats["n0"].changed == 1 and out.executed_ok
    assert sb.exec("cat /tmp/exec-good").stdout == "fixed\n"
    assert set(out.timings) == {"extract", "parse", "gate", "syntax", "execute"}
    events = [json.loads(l) for l in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "playbook_on_stats" for e in events)
    assert (tmp_path / "ansible" / "artifacts").is_dir() and (tmp_path / "playbook.yaml").is_file()
    d = json.loads(json.dumps(out.to_dict()))
    assert d["run"]["status"] == "successful" and d["run"]["stats"]["n0"]["changed"] == 1 and "events" not in d["run"]
    assert "ran successfully" in out.summary() and "n0: ok=1 changed=1 failed=0" in out.summary()


def test_execute_false_stops_after_the_syntax_check(env, tmp_path):
    sb = env[0]
    out = pipeline(env, tmp_path, [{"ansible.builtin.file": {"path": "/tmp/exec-dry", "state": "touch"}}],
                   execute=False)
    assert (out.stage, out.ok, out.run) == ("done", True, None)
    assert sb.exec("test -e /tmp/exec-dry").rc == 1


def test_no_ansible_beside_the_interpreter_is_ours_not_the_playbooks(env, tmp_path, monkeypatch):
    # An interpreter without Ansible in its venv (a second checkout sharing another's
    # packages): the jail could not check anything, so the playbook is not judged.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bare" / "bin" / "python"))
    out = pipeline(env, tmp_path, [{"ansible.builtin.file": {"path": "/tmp/exec-bare", "state": "touch"}}])
    assert (out.stage, out.ok, out.error_class) == ("syntax", False, "InternalError")
    assert "ansible-playbook" in out.reason and "pip install" in out.reason
    assert env[0].exec("test -e /tmp/exec-bare").rc == 1


def test_an_unknown_module_stops_at_syntax(env, tmp_path):
    out = pipeline(env, tmp_path, [{"name": "frob", "ansible.builtin.frobnicate": {"x": 1}}])
    assert (out.stage, out.error_class, out.run) == ("syntax", "SyntaxCheckFailed", None)
    assert "frobnicate" in out.reason and "line" in out.reason
    assert not (tmp_path / "events.jsonl").exists()


def test_a_bad_keyword_stops_at_syntax(env, tmp_path):
    out = pipeline(env, tmp_path, [{"name": "x", "command": "/bin/true", "retires": 3}])
    assert (out.stage, out.error_class) == ("syntax", "SyntaxCheckFailed")


def test_a_failing_task_stops_at_execute_with_its_name(env, tmp_path):
    out = pipeline(env, tmp_path, [{"name": "check the unit file", "ansible.builtin.shell":
                                    "echo 'no such unit: remed-x' >&2; exit 3"}])
    assert (out.stage, out.ok, out.error_class) == ("execute", False, "ExecutionFailed")
    assert "check the unit file" in out.reason and not out.executed_ok
    s = out.summary()
    assert "task 'check the unit file' failed" in s and "no such unit: remed-x" in s and "failed=1" in s


def test_a_hanging_task_times_out(env, tmp_path):
    sb = env[0]
    t0 = time.monotonic()
    out = pipeline(env, tmp_path, [{"name": "hang", "command": "sleep 601"}], timeout_s=15)
    try:
        assert (out.stage, out.error_class) == ("execute", "Timeout")
        assert "15 s" in out.reason and "hang" in out.reason
        assert time.monotonic() - t0 < 60
    finally:
        sb.exec("pkill -f 'sleep 601'; true")


def test_a_host_that_refuses_ssh_is_unreachable(env, tmp_path):
    sb, _, hosts = env
    # Nothing listens on port 1: refused at once. Extra vars are the pipeline's own (trusted) input.
    out = run_pipeline(f"```yaml\n{PLAY}```", sandbox=sb, inventory_hosts=hosts, workdir=tmp_path / "w",
                       timeout_s=60, extravars={"ansible_port": 1})
    assert (out.stage, out.error_class) == ("execute", "Unreachable")
    assert "n0" in out.reason


def test_a_gate_violation_never_executes(env, tmp_path):
    sb = env[0]
    marker = f"/tmp/exec-gate-{secrets.token_hex(3)}"
    out = pipeline(env, tmp_path, [{"name": "leave a marker", "ansible.builtin.file": {"path": marker, "state": "touch"}},
                                   {"name": "then reboot", "ansible.builtin.reboot": {}}])
    assert (out.stage, out.error_class, out.run) == ("gate", "GateViolation", None)
    assert "reboot" in out.reason and "syntax" not in out.timings
    assert sb.exec(f"test -e {marker}").rc == 1, "a refused playbook must not have run"


def test_an_idempotent_copy_passes_the_idempotence_check(env, tmp_path):
    out = pipeline(env, tmp_path, [{"name": "config", "ansible.builtin.copy": {"content": "a: 1\n", "dest": "/tmp/exec-idem"}}],
                   check_idempotence=True)
    assert (out.stage, out.ok) == ("done", True)
    assert out.rerun is not None and out.rerun.stats["n0"].changed == 0
    assert (tmp_path / "events.rerun.jsonl").is_file() and "changed nothing" in out.summary()


def test_a_shell_append_is_not_idempotent(env, tmp_path):
    sb = env[0]
    out = pipeline(env, tmp_path, [{"name": "stamp", "ansible.builtin.shell": "date >> /tmp/exec-x"}],
                   check_idempotence=True)
    try:
        assert (out.stage, out.ok, out.error_class) == ("idempotence", False, "NotIdempotent")
        assert out.executed_ok and "stamp" in out.reason
        assert "Run a second time" in out.summary()
    finally:
        sb.exec("rm -f /tmp/exec-x")
