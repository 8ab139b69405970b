"""The libvirt backend and the KVM probe, specified by what a user can rely on.

One sandbox is booted for the module (under TCG here a boot is most of a minute) and
the tests use it in order; the last ones power a node off and finally stop it.
Timings asserted here are generous bounds; the measured ones are in the backend's
docstring (simulators/sandbox/backends/libvirt.py)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from e2e_reme.simulators import (HostNotCapable, SandboxNotReady, attach, create_sandbox,
                                 get_backend, list_sandboxes)
from e2e_reme.simulators.sandbox.backends.libvirt import _links, _qemu_processes, uri
from e2e_reme.simulators.sandbox.kvm import KvmVerdict, kvm_probe

pytestmark = pytest.mark.vm

NODES = 2   # two boot side by side in about 40 s here under TCG
PY = sys.executable
# Sanity bounds, not the targets (90 s boot, 5 s reset): those are measured by
# bench/sandbox.py on a quiet machine; a loaded CI host must not fail on timing alone.
BOOT_BOUND_S = 240.0
RESET_BOUND_S = 20.0


def _libvirt():
    import libvirt
    return libvirt.open(uri())


@pytest.fixture(scope="module")
def libvirt_host():
    if os.geteuid() != 0:
        pytest.skip("the libvirt backend needs root (qemu:///system, bridges)")
    try:
        get_backend("libvirt").check_host()
    except HostNotCapable as e:
        pytest.skip(f"libvirt is not usable here: {e}")


@pytest.fixture(scope="module")
def sb(libvirt_host, image):
    name = f"pt-lv-{secrets.token_hex(2)}"
    t0 = time.monotonic()
    sandbox = create_sandbox("libvirt", nodes=NODES, name=name, image=image)
    sandbox.boot_seconds = time.monotonic() - t0
    with sandbox:
        yield sandbox


def leftovers(record) -> list[str]:
    """Everything of this sandbox that could still be on the host."""
    domains = {f"remed-{record.number}-n{n.index}" for n in record.nodes}
    conn = _libvirt()
    try:
        found = [f"domain {d.name()}" for d in conn.listAllDomains() if d.name() in domains]
        found += [f"network {n.name()}" for n in conn.listAllNetworks()
                  if n.name() == f"remed-{record.number}"]
    finally:
        conn.close()
    found += [f"qemu {d}" for d in _qemu_processes() if d in domains]
    found += [f"link {l}" for l in _links() if l == f"rmvbr{record.number}"]
    found += [f"overlay {p}" for p in record.dir.glob("n*/disk.qcow2")]
    found += [f"record {r.name}" for r in list_sandboxes() if r.name == record.name]
    return found


# ---- the KVM probe ---------------------------------------------------------------------

def test_kvm_probe_gives_a_verdict_and_caches_it(image):
    first = kvm_probe(image.kernel)
    assert isinstance(first, KvmVerdict) and isinstance(first.works, bool) and first.detail
    t0 = time.monotonic()
    again = kvm_probe(image.kernel)
    assert time.monotonic() - t0 < 1.0, "a repeated probe must come from the cache"
    assert (again.works, again.detail) == (first.works, first.detail)


def test_kvm_probe_without_an_image_says_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("E2E_REME_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("E2E_REME_STATE", str(tmp_path / "state"))
    verdict = kvm_probe()
    assert not verdict.works
    assert "build the image" in verdict.detail


def test_an_unreachable_libvirtd_is_a_one_line_fix(monkeypatch, libvirt_host):
    monkeypatch.setenv("E2E_REME_LIBVIRT_URI", "qemu:///system?socket=/nonexistent/libvirt-sock")
    with pytest.raises(HostNotCapable, match=r"libvirtd -d; virtlogd -d"):
        get_backend("libvirt").check_host()


def test_asking_for_kvm_where_it_does_not_work_is_refused_cleanly(libvirt_host, image):
    verdict = kvm_probe(image.kernel)
    if verdict.works:
        pytest.skip("KVM works on this host")
    name = f"pt-lv-{secrets.token_hex(2)}"
    with pytest.raises(HostNotCapable, match="accel=kvm"):
        create_sandbox("libvirt", name=name, image=image, accel="kvm")
    assert not any(r.name == name for r in list_sandboxes())


# ---- a running sandbox -----------------------------------------------------------------

def test_every_node_boots_to_sshd_within_the_target(sb):
    assert sb.boot_seconds <= BOOT_BOUND_S, f"first boot to sshd took {sb.boot_seconds:.0f} s"
    names = [sb.exec("hostname", node=i).stdout.strip() for i in range(NODES)]
    assert names == [f"{sb.name}-n{i}" for i in range(NODES)]


def test_nodes_run_under_kvm_only_where_the_probe_found_it_works(sb):
    expected = "kvm" if kvm_probe(sb.image.kernel).works else "tcg"
    assert sb.record.extra["accel"] == expected
    conn = _libvirt()
    try:
        xml = conn.lookupByName(sb.nodes[0].extra["domain"]).XMLDesc()
    finally:
        conn.close()
    assert f"<domain type='{'kvm' if expected == 'kvm' else 'qemu'}'" in xml


def test_each_node_gets_its_fixed_address_from_the_sandbox_network(sb):
    for n in sb.nodes:
        addr = sb.exec("ip -4 -o addr show dev eth0", node=n.index).stdout
        assert f"inet {n.ip}/24" in addr
    # The host answers nothing a node starts (simulators/sandbox/netguard.py), its DHCP aside.
    assert not sb.exec(f"ping -c1 -W2 {sb.record.gateway}", node=0).ok
    if NODES > 1:
        assert sb.exec(f"ping -c1 -W2 {sb.nodes[1].hostname}", node=0).ok


def test_exec_returns_exit_code_stdout_and_stderr(sb):
    res = sb.exec("echo out; echo err >&2; exit 3")
    assert (res.rc, res.stdout, res.stderr, res.ok) == (3, "out\n", "err\n", False)


def test_the_serial_console_is_logged_to_a_file(sb):
    log = sb.node_log(0)
    assert log == sb.record.dir / "n0" / "console.log"
    assert sb.name in log.read_text(errors="replace"), "the console should show the guest's login banner"


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
                         timeout=300, env=os.environ | {"ANSIBLE_HOST_KEY_CHECKING": "False"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert [sb.exec("cat /etc/remed-test", node=i).stdout.strip() for i in range(NODES)] == \
        [f"n{i}" for i in range(NODES)]


def test_a_model_playbook_runs_from_the_jailed_controller_on_the_sandbox_network(sb, tmp_path):
    from e2e_reme.simulators.playbook.execution import run_pipeline
    text = ("```yaml\n- hosts: n0\n  gather_facts: false\n  tasks:\n"
            "    - copy: {dest: /etc/remed-jail, content: \"jailed\\n\"}\n"
            "    - shell: 'setsid -f sleep 3603 </dev/null >/dev/null 2>&1'\n```\n")
    out = run_pipeline(text, sandbox=sb, workdir=tmp_path, timeout_s=240)
    assert out.ok, out.reason
    assert sb.exec("cat /etc/remed-jail").stdout == "jailed\n"
    assert sb.exec("pgrep -f 'sleep 360[3]'").rc == 1, "the process the playbook left running was not ended"
    assert any("sleep 3603" in l["cmdline"] for l in out.leftovers)


def test_node_memory_is_measured(sb):
    mib = sb.node_memory_mib(0)
    # QEMU's PSS is the guest RAM it touched plus QEMU itself; under TCG QEMU itself includes
    # its translation cache (up to 1 GiB by default), which grows with the guest code run so
    # far: 1320 MiB was seen for a 768 MiB guest once this module's playbooks and the
    # verifier's toolset scripts had run in it (CI run of 2026-12-06).
    overhead = 512 if sb.record.extra.get("accel") == "kvm" else 512 + 1024
    assert 50 < mib < sb.config.memory_mib + overhead


def test_reset_discards_every_change_without_rebooting(sb):
    boot_id = sb.exec("cat /proc/sys/kernel/random/boot_id").stdout
    sb.exec("echo x > /root/on-disk; echo x > /dev/shm/in-memory; (setsid sleep 4242 >/dev/null 2>&1 &)")
    sb.reset()
    after = sb.exec("ls /root/on-disk /dev/shm/in-memory; pgrep -f '[s]leep 4242'")
    assert after.rc != 0 and after.stdout == "", after.stdout + after.stderr
    assert sb.exec("cat /proc/sys/kernel/random/boot_id").stdout == boot_id, "reset must not reboot"


def test_reset_does_not_boot_again(sb):
    for n in sb.nodes:
        sb.exec("echo x > /root/dirty", node=n.index)
    t0 = time.monotonic()
    sb.reset()
    took = time.monotonic() - t0
    assert took <= RESET_BOUND_S, f"reset took {took:.1f} s (target 5 s; see bench/sandbox.py)"
    assert all(sb.exec("test ! -e /root/dirty", node=n.index).ok for n in sb.nodes)


def test_after_a_reset_the_guest_clock_is_the_hosts(sb):
    time.sleep(2)  # the snapshot is older than this: a clock left at it would be behind
    sb.reset()
    for n in sb.nodes:
        t0 = time.time()
        guest = float(sb.exec("date +%s.%N", node=n.index).stdout)
        assert abs(guest - (t0 + time.time()) / 2) < 0.5


def test_another_process_can_reset_it_from_the_record(sb):
    other = attach(sb.name)
    other.exec("touch /root/from-elsewhere")
    other.reset()
    assert other.exec("test -e /root/from-elsewhere").rc == 1
    other._close_ssh()


def test_a_node_that_was_powered_off_reports_it_and_comes_back_with_reset(sb):
    conn = _libvirt()
    try:
        conn.lookupByName(sb.nodes[0].extra["domain"]).destroy()
    finally:
        conn.close()
    assert "shut off" in sb.node_failed(0)
    with pytest.raises(SandboxNotReady, match="console.log"):
        sb.wait_ready(timeout=5)
    sb.reset()
    assert sb.exec("true").ok


# ---- leftovers -------------------------------------------------------------------------

def test_sweep_removes_only_orphans_with_our_names(libvirt_host):
    """An orphan network, bridge and domain (no record names them) go; libvirt's own
    `default` network stays."""
    number = 511  # the pool's last /24; the tests' sandboxes take the first free ones
    conn = _libvirt()
    try:
        had_default = "default" in conn.listNetworks() + conn.listDefinedNetworks()
        conn.networkCreateXML(f"<network><name>remed-{number}</name><bridge name='rmvbr{number}'/>"
                              f"<ip address='198.19.255.1' netmask='255.255.255.0'/></network>")
        conn.defineXML(f"<domain type='qemu'><name>remed-{number}-n0</name><memory unit='MiB'>64</memory>"
                       "<os><type arch='x86_64'>hvm</type></os></domain>")
        backend = get_backend("libvirt")
        assert backend.number_taken(number, None)
        done = backend.sweep(list_sandboxes())
        assert f"domain remed-{number}-n0" in done and f"network remed-{number}" in done
        assert not backend.number_taken(number, None)
        assert f"rmvbr{number}" not in _links()
        assert had_default == ("default" in conn.listNetworks() + conn.listDefinedNetworks())
    finally:
        for name in (f"remed-{number}-n0",):
            try:
                conn.lookupByName(name).undefine()
            except Exception:
                pass
        try:
            conn.networkLookupByName(f"remed-{number}").destroy()
        except Exception:
            pass
        conn.close()


OWNER = """
import sys, time
from e2e_reme.simulators import create_sandbox
sb = create_sandbox("libvirt", nodes=1, name=sys.argv[1], wait=False)
print("up", flush=True)
time.sleep(600)
"""


def test_a_killed_owners_sandbox_is_reaped(libvirt_host, image):
    name = f"pt-lv-{secrets.token_hex(2)}"
    proc = subprocess.Popen([PY, "-c", OWNER, name], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        record = attach(name).record
        assert leftovers(record), "the owner's sandbox should be running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 60
    while leftovers(record) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert leftovers(record) == []


def test_stop_leaves_no_domain_network_bridge_overlay_or_process(sb):
    record = sb.record
    assert leftovers(record), "the sandbox should be there before it is stopped"
    sb.stop()
    assert leftovers(record) == []
    sb.stop()  # idempotent
