"""Containment: a model-written playbook never runs code on, reads from, or reaches the host.

The boundary is structural (simulators/sandbox/controller.py: the playbook is interpreted in a
jail on the sandbox's own network; simulators/sandbox/netguard.py: nodes cannot open connections
to the host or other sandboxes). The gate is only defence in depth, so the attacks here
go to the jail directly, as if the gate had let them through; each family also has a
control run through a plain host controller where that is safe to show the attack is real.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from e2e_reme.simulators import create_sandbox, gc
from e2e_reme.simulators.sandbox import netguard
from e2e_reme.simulators.sandbox.ansible import run_playbook
from e2e_reme.simulators.sandbox.controller import JailJob, run_jailed
from e2e_reme.simulators.playbook.execution import MAX_ANSWER_CHARS, run_pipeline


@pytest.fixture(scope="module")
def sb(image):
    with create_sandbox("nspawn", nodes=2, name=f"pt-cont-{secrets.token_hex(2)}") as s:
        yield s


@pytest.fixture(scope="module")
def other(image):
    with create_sandbox("nspawn", nodes=1, name=f"pt-cont2-{secrets.token_hex(2)}") as s:
        yield s


def jailed(sb, tmp_path, plays, timeout_s=60):
    text = plays if isinstance(plays, str) else yaml.safe_dump(plays, sort_keys=False)
    return run_jailed(sb, text, tmp_path, JailJob(timeout_s=timeout_s))


@pytest.fixture
def marker():
    """A path on the host that an escaped playbook would create."""
    p = Path(f"/tmp/remed-escape-{secrets.token_hex(4)}")
    yield p
    p.unlink(missing_ok=True)


# ---- family 1: code on the controller host -----------------------------------------------------

def _escapes(m: Path) -> dict[str, list]:
    touch = f"touch {m}"
    return {
        "add_host with a local connection": [
            {"hosts": "n0", "gather_facts": False, "tasks": [
                {"add_host": {"name": "n1", "ansible_connection": "local"}}]},
            {"hosts": "n1", "gather_facts": False, "tasks": [{"command": touch}]}],
        "set_fact with a templated connection key": [
            {"hosts": "n0", "gather_facts": False, "vars": {"k": "ansible_connection"}, "tasks": [
                {"set_fact": {"{{ k }}": "local"}}, {"command": touch}]}],
        "a lookup built by concatenation": [
            {"hosts": "n0", "gather_facts": False, "tasks": [
                {"debug": {"msg": "{{ lookup('pi' ~ 'pe', '" + touch + "') }}"}}]}],
        "a ProxyCommand in the connection arguments": [
            {"hosts": "n0", "gather_facts": False,
             "vars": {"ansible_ssh_common_args": f"-o ProxyCommand='sh -c \"{touch}\"'"},
             "tasks": [{"ping": None}]}],
        "delegation to localhost": [
            {"hosts": "n0", "gather_facts": False, "tasks": [
                {"command": touch, "delegate_to": "localhost"}]}],
    }


@pytest.mark.parametrize("family", list(_escapes(Path("/x"))))
def test_a_playbook_that_escapes_to_the_controller_stays_in_the_jail(sb, tmp_path, marker, family):
    jail = jailed(sb, tmp_path, _escapes(marker)[family])
    assert not jail.error and jail.syntax_rc == 0, jail.error or jail.syntax_output
    assert jail.run is not None
    assert not marker.exists(), f"{family}: the playbook ran a command on the host"


def test_the_same_escape_reaches_a_host_controller(sb, tmp_path, marker):
    """The control: without the jail, the attack is real (it creates the host marker)."""
    inv = sb.write_inventory(tmp_path / "hosts.yaml")
    run = run_playbook(inv, _escapes(marker)["delegation to localhost"], tmp_path / "pdd", 60)
    assert run.ok and marker.exists()


def test_a_template_of_the_playbook_file_renders_nothing_of_the_host(sb, tmp_path, marker):
    text = ("# {{ lookup('pipe', 'touch " + str(marker) + "') }}\n"
            "- hosts: n0\n  gather_facts: false\n  tasks:\n"
            "    - template: {src: '{{ playbook_dir }}/playbook.yaml', dest: /tmp/rendered}\n")
    jail = jailed(sb, tmp_path, text)
    assert jail.run is not None and not marker.exists()


# ---- family 2: host files read into the node ---------------------------------------------------

@pytest.fixture
def secret():
    p = Path(f"/tmp/remed-secret-{secrets.token_hex(4)}")
    p.write_text(f"host secret {secrets.token_hex(8)}\n")
    yield p
    p.unlink(missing_ok=True)


def _readers(s: Path) -> dict[str, list]:
    return {
        "copy with a controller src": [{"hosts": "n0", "gather_facts": False, "tasks": [
            {"copy": {"src": str(s), "dest": "/tmp/got"}}]}],
        "copy through module_defaults": [{"hosts": "n0", "gather_facts": False,
                                          "module_defaults": {"copy": {"src": str(s)}},
                                          "tasks": [{"copy": {"dest": "/tmp/got"}}]}],
        "a file lookup": [{"hosts": "n0", "gather_facts": False, "tasks": [
            {"copy": {"content": "{{ lookup('file', '" + str(s) + "') }}", "dest": "/tmp/got"}}]}],
        "script with a controller path": [{"hosts": "n0", "gather_facts": False, "tasks": [
            {"script": str(s)}]}],
        "the controller's root files": [{"hosts": "n0", "gather_facts": False, "tasks": [
            {"copy": {"src": "/etc/hostname", "dest": "/tmp/got"}}]}],
    }


@pytest.mark.parametrize("family", list(_readers(Path("/x"))))
def test_a_playbook_cannot_read_host_files_into_a_node(sb, tmp_path, secret, family):
    sb.exec("rm -f /tmp/got")
    jail = jailed(sb, tmp_path, _readers(secret)[family])
    assert not jail.error, jail.error
    got = sb.exec("cat /tmp/got 2>/dev/null; true").stdout
    assert secret.read_text().strip() not in got
    assert Path("/etc/hostname").read_text().strip() not in got or not got.strip()


def test_the_key_the_jail_holds_is_a_copy_in_its_scratch_space(sb, tmp_path):
    plays = [{"hosts": "n0", "gather_facts": False, "tasks": [
        {"copy": {"content": "{{ ansible_ssh_private_key_file }}", "dest": "/tmp/keypath"}}]}]
    jail = jailed(sb, tmp_path, plays)
    assert jail.run is not None and jail.run.ok
    assert sb.exec("cat /tmp/keypath").stdout.strip() == "/jail/key"


def test_the_jail_leaves_no_mount_or_process(sb, tmp_path):
    jailed(sb, tmp_path, [{"hosts": "n0", "gather_facts": False, "tasks": [{"ping": None}]}])
    from e2e_reme.simulators.sandbox.controller import _jail_processes
    assert not (sb.record.dir / "ctl").exists()
    assert str(sb.record.dir / "ctl") not in Path("/proc/self/mountinfo").read_text()
    assert all(f"--machine=rm{sb.record.number}ctl" not in argv for argv in _jail_processes().values())


# ---- family 3: the network ---------------------------------------------------------------------

class Listener:
    """A TCP listener on the host that records whether anyone connected."""

    def __init__(self, addr: str):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
                self.hits += 1
                c.close()
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def listeners(sb):
    ls = {"bridge": Listener(sb.record.gateway), "any": Listener("0.0.0.0")}
    yield ls
    for l in ls.values():
        l.close()


def connects(sb, addr: str, port: int, node: int = 0) -> bool:
    r = sb.exec(f"nc -z -w 2 {addr} {port}", node=node, timeout=20)
    return r.rc == 0


def test_the_host_reaches_its_own_listeners(sb, listeners):
    """The control: the listeners answer, so a refused node is the rules' doing."""
    for l in listeners.values():
        with socket.create_connection((sb.record.gateway, l.port), timeout=2):
            pass
    time.sleep(0.3)
    assert all(l.hits >= 1 for l in listeners.values())


@pytest.mark.parametrize("which", ["bridge", "any"])
def test_a_node_cannot_connect_to_the_host(sb, listeners, which):
    l = listeners[which]
    assert not connects(sb, sb.record.gateway, l.port)
    assert l.hits == 0


def test_a_node_cannot_reach_the_hosts_address_on_another_bridge_by_adding_a_route(sb, other, listeners):
    gw2 = other.record.gateway
    sb.exec(f"ip route replace {gw2}/32 dev host0; true")
    try:
        assert not connects(sb, gw2, listeners["any"].port)
        assert listeners["any"].hits == 0
    finally:
        sb.exec(f"ip route del {gw2}/32 dev host0; true")


def test_a_node_cannot_reach_another_sandbox(sb, other):
    ip = other.nodes[0].ip
    sb.exec(f"ip route replace {other.record.subnet} dev host0; true")
    try:
        assert not connects(sb, ip, 22)
    finally:
        sb.exec(f"ip route del {other.record.subnet} dev host0; true")


def test_nodes_of_one_sandbox_reach_each_other(sb):
    assert connects(sb, sb.nodes[1].ip, 22, node=0)


def test_the_jailed_controller_cannot_reach_the_host_either(sb, tmp_path, listeners):
    plays = [{"hosts": "n0", "gather_facts": False, "tasks": [
        {"wait_for": {"host": sb.record.gateway, "port": listeners["any"].port, "timeout": 3},
         "delegate_to": "localhost"}]}]
    jail = jailed(sb, tmp_path, plays)
    assert jail.run is not None and not jail.run.ok
    assert listeners["any"].hits == 0


def test_the_rules_live_and_die_with_the_sandbox(image):
    with create_sandbox("nspawn", nodes=1, name=f"pt-cont3-{secrets.token_hex(2)}") as s:
        bridge = s.record.extra["bridge"]
        assert bridge in netguard.tables()
    assert bridge not in netguard.tables()


def test_gc_removes_the_rules_of_a_bridge_no_sandbox_owns():
    netguard.isolate("rmbr9999")
    assert "rmbr9999" in netguard.tables()
    done = gc()
    assert "rmbr9999" not in netguard.tables()
    assert any("rmbr9999" in d for d in done)


def test_a_reach_host_sandbox_gets_no_rules(image):
    with create_sandbox("nspawn", nodes=1, name=f"pt-cont4-{secrets.token_hex(2)}", reach_host=True) as s:
        assert s.record.extra["bridge"] not in netguard.tables()


# ---- after a timeout; cheap refusals --------------------------------------------------------------

def test_what_a_timed_out_playbook_started_is_ended_before_the_verdict(sb, tmp_path):
    text = ("```yaml\n- hosts: n0\n  gather_facts: false\n  tasks:\n"
            "    - shell: 'setsid -f sleep 3601 </dev/null >/dev/null 2>&1; sleep 600'\n```\n")
    # The limit must leave time for the jail to start and reach the task even on a loaded
    # 2-core CI machine; with 8 s the run sometimes timed out before `setsid` ever ran.
    out = run_pipeline(text, sandbox=sb, workdir=tmp_path, timeout_s=25)
    assert (out.stage, out.error_class) == ("execute", "Timeout")
    assert sb.exec("pgrep -f 'sleep 360[1]'").rc == 1, "a process the playbook started is still running"
    assert sb.exec("pgrep -f 'sleep 60[0]'").rc == 1
    assert any("sleep 3601" in l["cmdline"] for l in out.leftovers)


def test_processes_that_predate_the_playbook_are_left_alone(sb, tmp_path):
    """The injected fault's processes are the playbook's to end, not ours."""
    sb.exec("setsid -f sleep 3602 </dev/null >/dev/null 2>&1")
    try:
        out = run_pipeline("```yaml\n- hosts: n0\n  gather_facts: false\n  tasks:\n    - ping:\n```\n",
                           sandbox=sb, workdir=tmp_path, timeout_s=60)
        assert out.ok, out.reason
        assert sb.exec("pgrep -f 'sleep 360[2]'").rc == 0
    finally:
        sb.exec("pkill -f 'sleep 3602'; true")


def test_a_huge_answer_is_refused_before_it_is_parsed(tmp_path):
    text = "```yaml\n" + "- hosts: n0\n  tasks: [{ping: }]\n" * (MAX_ANSWER_CHARS // 20) + "```\n"
    t0 = time.process_time()
    out = run_pipeline(text, workdir=tmp_path, timeout_s=10)
    assert (out.stage, out.error_class) == ("extract", "NotAPlaybook")
    assert "characters" in out.reason
    assert time.process_time() - t0 < 0.5


def test_without_a_sandbox_nothing_reaches_ansible(tmp_path):
    out = run_pipeline("```yaml\n- hosts: n0\n  gather_facts: false\n  tasks:\n    - ping:\n```\n",
                       workdir=tmp_path, inventory_hosts=["n0"])
    assert (out.stage, out.error_class) == ("syntax", "InternalError")
    assert "jailed controller" in out.reason


def test_a_fork_flood_fails_with_the_limit_it_hit_and_leaves_nothing(sb, tmp_path):
    text = ("```yaml\n- hosts: n0\n  gather_facts: false\n  tasks:\n"
            "    - shell: 'i=0; while [ $i -lt 3000 ]; do sleep 2$i & i=$((i+1)); done; wait'\n```\n")
    out = run_pipeline(text, sandbox=sb, workdir=tmp_path, timeout_s=120)
    assert not out.ok
    assert out.limits_hit.get("n0", {}).get("pids", 0) > 0, out.limits_hit
    assert "limits hit" in out.reason and "pids" in out.reason
    # Killed is not yet gone (the node's init reaps a thousand of them); a survivor of the
    # sweep (sleep 2000+ s) would still be there after the wait.
    deadline = time.monotonic() + 5
    while (sleeping := int(sb.exec("pgrep -c -x sleep || true").stdout.strip() or 0)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sleeping == 0, sb.exec("ps -eo stat,comm | grep -w sleep | cut -c1 | sort | uniq -c").stdout
