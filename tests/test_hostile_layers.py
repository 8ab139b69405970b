"""What a node leaves on the host gives other host users nothing, and each sandbox has its
own SSH key (docs/containment.md, "What a node leaves on the host" and "SSH keys").

Real nspawn sandboxes, a real unprivileged host user (`nobody` through setpriv), real SSH,
a real jail, a real local Ray head."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys

import paramiko
import pytest
import yaml

from e2e_reme.simulators import create_sandbox
from e2e_reme.simulators.sandbox import doctor
from e2e_reme.simulators.sandbox.controller import JailJob, run_jailed

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
TAG = secrets.token_hex(2)


@pytest.fixture(scope="module")
def pair(image):
    with create_sandbox("nspawn", nodes=1, name=f"pt-hl-a{TAG}") as a, \
            create_sandbox("nspawn", nodes=1, name=f"pt-hl-b{TAG}") as b:
        yield a, b


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=30)


def mount_opts(path) -> set[str]:
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        if f[4] == str(path):
            return set(f[5].split(","))
    raise AssertionError(f"{path} is not a mount point")


def test_a_setuid_copy_made_in_a_node_gives_a_host_user_nothing(pair):
    sb = pair[0]
    r = sb.exec("cp /usr/bin/id /usr/local/bin/sid && chmod u+s /usr/local/bin/sid")
    assert r.ok, r.stderr
    n0 = sb.record.dir / "n0"
    raw = n0 / "rw/upper/usr/local/bin/sid"
    st = os.lstat(raw)
    assert st.st_uid == 0 and st.st_mode & stat.S_ISUID    # on the layer's disk: a setuid-root file
    # Not reachable: the sandbox's tree is root's.
    assert stat.S_IMODE(os.stat(sb.record.dir).st_mode) == 0o700
    r = as_nobody("stat", str(raw))
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # Even through a path opened for the test, the mounts honour no setuid.
    assert {"nosuid", "nodev", "noexec"} <= mount_opts(n0 / "rw") & mount_opts(n0 / "ids/rw")
    assert {"nosuid", "nodev"} <= mount_opts(n0 / "merged")
    os.chmod(sb.record.dir, 0o711)
    try:
        for path in (raw, n0 / "ids/rw/upper/usr/local/bin/sid"):     # the layer: runs nothing
            r = as_nobody(str(path), "-u")
            assert r.returncode == 126 and "Permission denied" in r.stderr, (path, r)
        r = as_nobody(str(n0 / "merged/usr/local/bin/sid"), "-u")     # the overlay: runs, as nobody
        assert r.returncode == 0 and r.stdout.strip() == "65534", r
    finally:
        os.chmod(sb.record.dir, 0o700)


def test_a_device_node_in_a_layer_is_no_device_on_the_host(pair):
    sb = pair[0]
    assert not sb.exec("mknod /root/mem c 1 1").ok          # node root (a user namespace) cannot make one
    # One there anyway (as a node without a user namespace could make): the host opens no device.
    n0 = sb.record.dir / "n0"
    dev = n0 / "rw/upper/mem"
    os.mknod(dev, 0o600 | stat.S_IFCHR, os.makedev(1, 1))      # /dev/mem
    try:
        for path in (dev, n0 / "merged/mem"):
            with pytest.raises(PermissionError):
                open(path, "rb").close()
    finally:
        dev.unlink()


def _opens(ip: str, key) -> bool:
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        c.connect(ip, username="root", key_filename=str(key), timeout=10, auth_timeout=20, banner_timeout=20,
                  look_for_keys=False, allow_agent=False)
        return True
    except paramiko.AuthenticationException:
        return False
    finally:
        c.close()


def test_each_sandbox_has_its_own_key_and_only_it_opens_its_nodes(pair, tmp_path):
    a, b = pair
    for sb in (a, b):
        assert sb.ssh_key.parent == sb.record.dir
        assert stat.S_IMODE(os.stat(sb.ssh_key).st_mode) == 0o600
    assert a.ssh_key.read_bytes() != b.ssh_key.read_bytes()
    ip_a, ip_b = a.nodes[0].ip, b.nodes[0].ip
    assert _opens(ip_a, a.ssh_key) and _opens(ip_b, b.ssh_key)
    assert not _opens(ip_b, a.ssh_key) and not _opens(ip_a, b.ssh_key)
    assert not _opens(ip_a, a.image.ssh_key)                 # the image's key no longer opens a node
    # The jail gets the sandbox's key (the image's would open nothing now), and nothing else.
    play = [{"hosts": "all", "gather_facts": False, "tasks": [{"ansible.builtin.ping": {}}]}]
    run = run_jailed(a, yaml.safe_dump(play), tmp_path, JailJob(timeout_s=60))
    assert not run.error and run.run is not None and run.run.ok, (run.error, run.run and run.run.stdout[-500:])


@pytest.mark.vm
def test_a_libvirt_node_takes_its_sandboxs_key_and_its_disk_is_qemus_alone(image):
    with create_sandbox("libvirt", nodes=1, name=f"pt-hl-v{TAG}") as sb:
        ip = sb.nodes[0].ip
        assert _opens(ip, sb.ssh_key) and not _opens(ip, sb.image.ssh_key)
        sb.reset()                                       # the reset point holds the sandbox's key
        assert _opens(ip, sb.ssh_key) and not _opens(ip, sb.image.ssh_key)
        assert stat.S_IMODE(os.stat(sb.record.dir).st_mode) == 0o710
        assert stat.S_IMODE(os.stat(sb.record.dir / "n0/disk.qcow2").st_mode) == 0o600


def test_the_sandbox_tree_check_passes_for_private_sandboxes(pair):
    c = doctor.probe_sandbox_tree()
    assert not any(sb.name in c.detail for sb in pair), c


def test_ray_token_is_private_and_the_doctor_says_when_it_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    d = tmp_path / ".ray"
    d.mkdir(mode=0o755)
    token = d / "auth_token"
    token.write_text("0" * 64)
    os.chmod(token, 0o644)                       # as `ray get-auth-token --generate` leaves it
    c = doctor.probe_ray_token()
    assert c.status == "unusable" and "-rw-r--r--" in c.detail, c
    subprocess.run(c.fix, shell=True, check=True)                 # the fix is one line that works
    assert doctor.probe_ray_token().status == "ok"
    # A local head the project starts: the token is written 0600 in a 0700 directory, and used.
    token.unlink()
    os.chmod(d, 0o755)
    code = ("import ray; from e2e_reme.cluster.fleet import Fleet, FleetConfig\n"
            "Fleet(FleetConfig(ray_init={'num_cpus': 1}))._init_ray(ray)\n"
            "from ray._raylet import AuthenticationTokenLoader as L\n"
            "print(L.instance().get_raw_token(ignore_auth_mode=True)); ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert stat.S_IMODE(os.stat(token).st_mode) == 0o600 and stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert r.stdout.strip().splitlines()[-1] == token.read_text()
    assert doctor.probe_ray_token().status == "ok"
