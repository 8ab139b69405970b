"""Sandbox leases (simulators/sandbox/lease.py): one user drives a sandbox at a time,
across processes and Serve replicas, and a server stopped in the middle of an execute
leaves nothing running. A REAL one-node nspawn sandbox (shared by the module), real
processes holding leases, a real `remed serve` with two replicas over real HTTP."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from serving import serve_process, wait_for
from e2e_reme.simulators.sandbox import controller, lease

EPISODES = Path(__file__).parent / "data" / "train-episodes.jsonl"
REPORT = json.loads(EPISODES.read_text().splitlines()[0])["report"]
TOKEN = secrets.token_urlsafe(24)
REMED = str(Path(sys.executable).parent / "remed")
HOLD = """
import sys
from e2e_reme.simulators.sandbox import lease
held = lease.acquire(sys.argv[1], sys.argv[2])
print("held", flush=True)
sys.stdin.read()
"""


def sleeper(seconds: int) -> str:
    """A playbook whose one task runs `sleep SECONDS` in the node until it ends."""
    return (f"```yaml\n- hosts: n0\n  gather_facts: false\n  tasks:\n  - name: wait\n"
            f"    ansible.builtin.command: sleep {seconds}\n```")


@pytest.fixture(scope="module")
def sandbox(image):
    from e2e_reme.simulators import create_sandbox
    with create_sandbox("nspawn", nodes=1, name=f"pt-lease-{secrets.token_hex(2)}") as sb:
        yield sb


@pytest.fixture
def holder_process(sandbox):
    """Another process of this host holding the sandbox's lease."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, sandbox.name, "a test's other process"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def sleeping_in_node(sb, seconds: int) -> bool:
    return sb.exec(f"pgrep -x sleep -a | grep -q ' {seconds}$'", timeout=20).rc == 0


def jail_running(sb) -> bool:
    return any(f"--machine={controller.machine(sb.record.number)}" in argv
               for argv in controller._jail_processes().values())


def execute_plan(sb, mode: str = "execute"):
    from e2e_reme.serve.remediate import Plan
    from e2e_reme.serve.schemas import RemediateRequest
    req = RemediateRequest.model_validate({"report": REPORT, "mode": mode, "sandbox": sb.name})
    return Plan(req, [n.name for n in sb.nodes], sb)


# ---- one process at a time --------------------------------------------------------------------

def test_a_lease_held_by_another_process_refuses_the_server_and_the_episode_runner(sandbox, holder_process, tmp_path):
    from e2e_reme.serve.config import ServeConfig
    from e2e_reme.serve.remediate import ApiError, Runner
    from e2e_reme.simulators.episode import Slot
    got = lease.try_acquire(sandbox.name, "this test")
    assert not got.ok and got.holder.pid == holder_process.pid
    assert f"sandbox {sandbox.name} is in use by pid {holder_process.pid} (a test's other process) since" in got.message
    runner = Runner(ServeConfig(sandboxes=("pt-lease-*",), workdir=str(tmp_path)), stopping=lambda: False)
    with pytest.raises(ApiError) as refused:
        runner.run(execute_plan(sandbox), sleeper(6131), "rem-test-1")
    assert refused.value.status == 409 and f"pid {holder_process.pid}" in refused.value.message
    assert not (tmp_path / "requests" / "rem-test-1").exists() and not sleeping_in_node(sandbox, 6131)
    with pytest.raises(lease.LeaseBusy, match=f"in use by pid {holder_process.pid}"):
        Slot("simple-micro", name=sandbox.name).up()        # a benchmark or fleet slot: refused before any work
    cli = subprocess.run([REMED, "fault", "recover", "--sandbox", sandbox.name], capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 2 and f"in use by pid {holder_process.pid}" in cli.stderr, cli.stderr
    holder_process.kill()
    holder_process.wait(timeout=30)
    mine = lease.acquire(sandbox.name, "this test")          # a dead holder's lease ends with it
    mine.release()


def test_a_lease_is_exclusive_within_its_own_process_and_the_refusal_says_so(sandbox):
    with lease.acquire(sandbox.name, "first use"):
        again = lease.try_acquire(sandbox.name, "second use")
        assert not again.ok and again.holder.purpose == "first use" and "that is this process" in again.message
        assert lease.holder(sandbox.name).pid == os.getpid()
    assert lease.holder(sandbox.name) is None


def test_a_server_process_killed_mid_execute_leaves_its_guard_to_end_the_jail_and_the_playbook(sandbox, tmp_path):
    code = f"""
import sys
from e2e_reme.serve.config import ServeConfig
from e2e_reme.serve.remediate import Plan, Runner
from e2e_reme.serve.schemas import RemediateRequest
from e2e_reme.simulators.sandbox.base import attach
sb = attach({sandbox.name!r})
req = RemediateRequest.model_validate({{"report": {REPORT!r}, "mode": "execute", "sandbox": sb.name}})
Runner(ServeConfig(sandboxes=("pt-lease-*",), workdir={str(tmp_path)!r}, exec_timeout_s=300),
       stopping=lambda: False).run(Plan(req, ["n0"], sb), {sleeper(6132)!r}, "rem-killed")
"""
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert wait_for(lambda: sleeping_in_node(sandbox, 6132)), "the playbook never started"
        assert jail_running(sandbox) and lease.holder(sandbox.name).pid == proc.pid
    finally:
        proc.kill()                                          # no handler, no finally: only the guard is left
        proc.wait(timeout=30)
    assert wait_for(lambda: lease.holder(sandbox.name) is None, timeout=60)
    assert not jail_running(sandbox) and not sleeping_in_node(sandbox, 6132)
    record = json.loads((tmp_path / "requests" / "rem-killed" / "interrupted.json").read_text())
    assert record["interrupted"] and any("sleep 6132" in line for line in record["ended"])


# ---- a real server with two replicas ----------------------------------------------------------

@pytest.fixture(scope="module")
def served(tiny_model, sandbox, tmp_path_factory):
    """`remed serve` with two replicas, execute enabled for pt-lease-* sandboxes."""
    from e2e_reme.serve.launch import free_port
    tmp = tmp_path_factory.mktemp("lease-serve")
    token = tmp / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    port = free_port()
    (tmp / "serve.yaml").write_text(yaml.safe_dump({
        "model": str(tiny_model), "port": port, "num_replicas": 2, "replica_cpus": 0.5, "token_file": str(token),
        "sandboxes": ["pt-lease-*"], "exec_timeout_s": 120, "verify_load": False, "workdir": str(tmp / "work")}))
    with serve_process(tmp / "serve.yaml", port, up_timeout=240) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from e2e_reme.train.data import DataConfig, build_sft_data, corpus_texts
    from e2e_reme.train.model import ModelConfig, TokenizerConfig, init_model
    data = build_sft_data(DataConfig(episodes=(str(EPISODES),)))
    return init_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                  tokenizer=TokenizerConfig(vocab_size=1024), seed=1),
                      tmp_path_factory.mktemp("lease-model") / "tiny", corpus_texts(data.train))


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except (urllib.error.URLError, OSError):
        return 0


def execute(served, sb, seconds: int, timeout: float = 200) -> tuple[int, dict]:
    body = json.dumps({"report": REPORT, "mode": "execute", "sandbox": sb.name, "answer": sleeper(seconds)}).encode()
    req = urllib.request.Request(served["url"] + "/v1/remediate", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def in_background(fn, *args) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    return t, out


def test_two_replicas_and_another_process_never_execute_on_one_sandbox_at_once(served, sandbox):
    with lease.acquire(sandbox.name, "a benchmark of this test"):
        status, body = execute(served, sandbox, 6133)
    assert status == 409 and f"in use by pid {os.getpid()} (a benchmark of this test)" in body["error"]["message"]
    assert not sleeping_in_node(sandbox, 6133)
    first, answer = in_background(execute, served, sandbox, 8)
    assert wait_for(lambda: sleeping_in_node(sandbox, 8)), "the first execute never started"
    # Serve routes by queue length, so this one normally goes to the other replica; either way
    # only the lease can refuse it (a replica keeps no lock of its own).
    status, body = execute(served, sandbox, 6134)
    assert status == 409 and "(serve execute rem-" in body["error"]["message"], body
    busy = lease.try_acquire(sandbox.name, "this test")
    assert not busy.ok and busy.holder.purpose.startswith("serve execute rem-")
    first.join(timeout=200)
    assert answer and answer[0][0] == 200 and answer[0][1]["executed"], answer
    assert not sleeping_in_node(sandbox, 6134) and lease.holder(sandbox.name) is None


def test_sigterm_mid_execute_answers_503_and_leaves_nothing_running(served, sandbox):
    t, answer = in_background(execute, served, sandbox, 6135)
    assert wait_for(lambda: sleeping_in_node(sandbox, 6135)), "the execute never started"
    assert jail_running(sandbox)
    served["proc"].send_signal(signal.SIGTERM)
    t.join(timeout=120)
    assert served["proc"].wait(timeout=180) == 0, served["log"].read_text()[-3000:]
    assert answer, "the client got no answer"
    status, body = answer[0]
    assert status == 503 and "shutting down" in body["error"]["message"] and body["interrupted"], body
    assert any(x["cmdline"].strip() == "sleep 6135" for x in body["execution"]["leftovers"]), body["execution"]
    assert not jail_running(sandbox) and not sleeping_in_node(sandbox, 6135)
    assert lease.holder(sandbox.name) is None
