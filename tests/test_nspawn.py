"""The nspawn backend, specified by what a user of a sandbox can rely on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from e2e_reme.simulators import (NoFreeAddress, SandboxExists, attach, create_sandbox, gc,
                                 list_sandboxes)
from e2e_reme.simulators.sandbox.backends.nspawn import _cgroup_pids, _children, _links, _nspawn_processes
from e2e_reme.host import mounts_below, process_alive

PY = sys.executable


@pytest.fixture(scope="module")
def sb(image):
    with create_sandbox("nspawn", nodes=2, name="pt-shared") as sandbox:
        yield sandbox


def leftovers(record) -> list[str]:
    """Everything of this sandbox that could still be on the host."""
    machines = {f"rm{record.number}n{n.index}" for n in record.nodes}
    found = [f"container {m}" for m in _nspawn_processes() if m in machines]
    found += [f"link {l}" for l in _links() if l == f"rmbr{record.number}" or l[3:] in machines]
    found += [f"mount {m}" for m in mounts_below(record.dir)] if record.dir.exists() else []
    found += [f"dir {record.dir}"] if record.dir.exists() else []
    found += [f"record {r.name}" for r in list_sandboxes() if r.name == record.name]
    return found


# ---- using a running sandbox --------------------------------------------------------

def test_every_node_answers_with_its_own_hostname(sb):
    assert [sb.exec("hostname", node=i).stdout.strip() for i in range(2)] == ["pt-shared-n0", "pt-shared-n1"]


def test_nodes_boot_systemd_to_a_running_state(sb):
    res = sb.exec("systemctl is-system-running --wait", node=1, timeout=60)
    assert res.stdout.strip() == "running", res.stdout + res.stderr


def test_nodes_reach_each_other_but_not_the_host(sb):
    assert sb.exec("ping -c1 -W2 pt-shared-n1", node=0).ok
    assert sb.exec(f"ping -c1 -W2 {sb.nodes[0].ip}", node=1).ok
    # The host answers nothing a node starts (simulators/sandbox/netguard.py; tests/test_containment.py).
    assert not sb.exec(f"ping -c1 -W2 {sb.record.gateway}", node=0).ok


def test_exec_returns_exit_code_stdout_and_stderr(sb):
    res = sb.exec("echo out; echo err >&2; exit 3")
    assert (res.rc, res.stdout, res.stderr, res.ok) == (3, "out\n", "err\n", False)


def test_exec_feeds_stdin(sb):
    assert sb.exec("wc -c", input="hello").stdout.strip() == "5"


def test_a_hanging_command_times_out_and_is_killed_on_the_node(sb):
    res = sb.exec("sleep 4321", timeout=2)
    assert res.timed_out and not res.ok
    assert res.duration_s < 10
    assert sb.exec("pgrep -f '[s]leep 4321'").rc == 1, "the command must not survive its timeout"


def test_put_and_get_file_round_trip(sb, tmp_path):
    payload = bytes(range(256)) * 100
    (tmp_path / "in.bin").write_bytes(payload)
    sb.put_file(tmp_path / "in.bin", "/tmp/x.bin", node=1, mode=0o600)
    assert sb.exec("stat -c %a /tmp/x.bin", node=1).stdout.strip() == "600"
    assert sb.get_file("/tmp/x.bin", tmp_path / "out.bin", node=1).read_bytes() == payload


def test_inventory_drives_real_ansible(sb, tmp_path):
    inv = sb.write_inventory(tmp_path / "hosts.yaml")
    play = tmp_path / "play.yaml"
    play.write_text(textwrap.dedent("""\
        - hosts: all
          gather_facts: false
          tasks:
            - copy: {dest: /etc/remed-test, content: "{{ inventory_hostname }}\\n"}
        """))
    ansible = Path(PY).parent / "ansible-playbook"
    out = subprocess.run([str(ansible), "-i", str(inv), str(play)], capture_output=True, text=True,
                         timeout=180, env=os.environ | {"ANSIBLE_HOST_KEY_CHECKING": "False"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert [sb.exec("cat /etc/remed-test", node=i).stdout.strip() for i in range(2)] == ["n0", "n1"]


def test_systemd_inside_applies_resource_limits(sb):
    # Faults and their fixes (CPUQuota, MemoryMax drop-ins) depend on this working.
    res = sb.exec("systemd-run --wait -p CPUQuota=20% -p MemoryMax=64M true")
    assert res.ok, res.stderr


def test_node_memory_at_idle_is_measured(sb):
    mib = sb.node_memory_mib(0)
    assert 5 < mib < 1024


def test_another_process_can_attach_by_name(sb):
    other = attach("pt-shared")
    assert other.exec("hostname", node=1).stdout.strip() == "pt-shared-n1"


def test_reset_discards_every_change_and_keeps_addresses(sb):
    sb.exec("echo gone > /root/marker && systemctl mask ssh.socket && rm -f /usr/bin/stress-ng", node=0)
    sb.exec("echo gone > /etc/marker", node=1)
    sb.reset()
    assert sb.exec("test -e /root/marker", node=0).rc == 1
    assert sb.exec("test -e /etc/marker", node=1).rc == 1
    assert sb.exec("test -x /usr/bin/stress-ng", node=0).ok
    assert sb.exec("hostname -I", node=1).stdout.split() == [sb.nodes[1].ip]


# ---- lifetimes and cleanup ----------------------------------------------------------

def test_stop_leaves_nothing_behind(image, sb_name):
    sandbox = create_sandbox("nspawn", nodes=2, name=sb_name)
    rec = sandbox.record
    assert leftovers(rec), "a running sandbox should be visible"
    sandbox.stop()
    assert leftovers(rec) == []


def test_a_node_whose_nspawn_died_first_is_still_destroyed_with_all_it_ran(image, sb_name):
    # An owner killed with its process group takes nspawn down but not the container's
    # init, which lives on, orphaned, with the node's services and any injected fault.
    sb = create_sandbox("nspawn", nodes=1, name=sb_name, reaper=False)
    machine = f"rm{sb.record.number}n0"
    try:
        nspawn = sb.record.nodes[0].extra["pid"]
        (init,) = _children(nspawn)
        sb.exec("systemd-run --unit=pt-busy sleep 600")
        os.kill(nspawn, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_alive(nspawn) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_alive(init)
        assert len(_cgroup_pids(machine)) > 1
    finally:
        sb.stop()
    assert not process_alive(init)
    assert _cgroup_pids(machine) == []
    assert leftovers(sb.record) == []


def test_two_sandboxes_run_side_by_side_without_touching_each_other(image):
    with create_sandbox("nspawn", name="pt-left") as a, create_sandbox("nspawn", name="pt-right") as b:
        assert a.record.subnet != b.record.subnet
        a.exec("touch /root/only-left")
        assert b.exec("test -e /root/only-left").rc == 1
        b.reset()
        assert a.exec("test -e /root/only-left").ok
        assert b.exec(f"ping -c1 -W1 {a.nodes[0].ip}").rc != 0, "sandboxes must not share a network"


def test_a_name_is_never_used_twice(sb):
    with pytest.raises(SandboxExists):
        create_sandbox("nspawn", name="pt-shared")


def test_an_exhausted_address_pool_is_a_clear_error(image, monkeypatch, sb_name):
    monkeypatch.setenv("E2E_REME_SUBNET_POOL", "198.19.254.0/24")
    with create_sandbox("nspawn", name=sb_name):
        with pytest.raises(NoFreeAddress, match="subnets of 198.19.254.0/24 are taken"):
            create_sandbox("nspawn", name=sb_name + "b")
    assert not any(r.name == sb_name + "b" for r in list_sandboxes())


OWNER = """
import sys, time
from e2e_reme.simulators import create_sandbox
sb = create_sandbox("nspawn", nodes=1, name=sys.argv[1], reaper=sys.argv[2] == "1")
print("up", flush=True)
time.sleep(600)
"""


def _owner(name: str, reaper: bool) -> subprocess.Popen:
    proc = subprocess.Popen([PY, "-c", OWNER, name, "1" if reaper else "0"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


def test_gc_collects_the_sandbox_of_a_killed_owner(image, sb_name):
    proc = _owner(sb_name, reaper=False)
    rec = attach(sb_name).record
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert leftovers(rec), "without a reaper the orphan stays until gc"
    done = gc()
    assert any(sb_name in line for line in done)
    assert leftovers(rec) == []


def test_a_killed_owners_sandbox_is_reaped_without_gc(image, sb_name):
    proc = _owner(sb_name, reaper=True)
    rec = attach(sb_name).record
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while leftovers(rec) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(rec) == []


def test_ctrl_c_in_the_owner_cleans_up(image, sb_name):
    code = OWNER.replace('print("up", flush=True)\ntime.sleep(600)',
                         'try:\n    print("up", flush=True)\n    time.sleep(600)\nfinally:\n    sb.stop()')
    assert "finally" in code
    proc = subprocess.Popen([PY, "-c", code, sb_name, "0"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    rec = attach(sb_name).record
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert leftovers(rec) == []


def test_gc_never_touches_what_is_not_ours(image, tmp_path):
    subprocess.run(["ip", "link", "add", "rmbrx-foreign", "type", "bridge"], check=True)
    try:
        gc()
        assert "rmbrx-foreign" in _links()
    finally:
        subprocess.run(["ip", "link", "del", "rmbrx-foreign"])


def test_reset_returns_to_a_checkpoint_once_one_is_taken(image, sb_name):
    with create_sandbox("nspawn", nodes=2, name=sb_name) as sandbox:
        sandbox.exec("echo deployed > /root/app && systemctl enable --now redis-server", node=1)
        sandbox.exec("redis-cli set seed 42 && redis-cli save", node=1)
        sandbox.checkpoint()
        sandbox.exec("echo broken > /root/app && rm -rf /etc/ssh/moduli && redis-cli set seed 0", node=1)
        sandbox.exec("touch /root/after-checkpoint", node=0)
        sandbox.reset()
        assert sandbox.exec("cat /root/app", node=1).stdout == "deployed\n"
        assert sandbox.exec("test -e /etc/ssh/moduli", node=1).ok
        assert sandbox.exec("redis-cli get seed", node=1).stdout.strip() == "42"
        assert sandbox.exec("test -e /root/after-checkpoint", node=0).rc == 1


def test_a_record_written_before_the_rename_still_loads(sb):
    # A sandbox created by an older checkout keeps running through an upgrade; gc must still
    # see it as live (an unreadable record would leave its machines to the sweep).
    from dataclasses import asdict
    from e2e_reme.simulators.sandbox.state import SandboxRecord
    old = asdict(sb.record)
    old["slot"] = old.pop("number")
    assert SandboxRecord.from_json(old) == sb.record
