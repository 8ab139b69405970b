"""`remed` as a user meets it: a whole sandbox lifecycle, and one clear line (not a
traceback) with a non-zero exit for every user mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REMED = str(Path(sys.executable).parent / "remed")


def remed(*args: str, env: dict | None = None, user: str | None = None) -> subprocess.CompletedProcess:
    cmd = [REMED, *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env=os.environ | {"COLUMNS": "200"} | (env or {}))


def one_clear_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_a_detached_sandbox_lives_across_commands_until_down(image, sb_name):
    up = remed("sandbox", "up", "--nodes", "2", "--name", sb_name, "--json")
    assert up.returncode == 0, up.stderr
    desc = json.loads(up.stdout)
    try:
        assert [n["hostname"] for n in desc["nodes"]] == [f"{sb_name}-n0", f"{sb_name}-n1"]
        ex = remed("sandbox", "exec", sb_name, "--node", "1", "--", "sh", "-c", "hostname -I; exit 7")
        assert (ex.returncode, ex.stdout.split()) == (7, [desc["nodes"][1]["ip"]])
        assert sb_name in remed("sandbox", "ls").stdout
        assert remed("sandbox", "exec", sb_name, "--", "touch", "/root/x").returncode == 0
        assert remed("sandbox", "reset", sb_name).returncode == 0
        assert remed("sandbox", "exec", sb_name, "--", "test", "-e", "/root/x").returncode == 1
    finally:
        down = remed("sandbox", "down", sb_name)
    assert down.returncode == 0, down.stderr
    assert sb_name not in remed("sandbox", "ls").stdout


def test_a_hanging_command_exits_124(image, sb_name):
    assert remed("sandbox", "up", "--name", sb_name).returncode == 0
    try:
        res = remed("sandbox", "exec", sb_name, "--timeout", "1", "--", "sleep", "30")
        assert res.returncode == 124 and "timed out" in res.stderr
    finally:
        remed("sandbox", "down", sb_name)


@pytest.mark.parametrize("args, says", [
    (["sandbox", "up", "--backend", "qemu-kvm"], "unknown sandbox backend 'qemu-kvm'; known: libvirt, nspawn"),
    (["sandbox", "exec", "no-such-sandbox", "--", "true"], "no sandbox named 'no-such-sandbox'"),
    (["sandbox", "reset", "no-such-sandbox"], "no sandbox named 'no-such-sandbox'"),
    (["sandbox", "down", "no-such-sandbox"], "no sandbox named 'no-such-sandbox'"),
    (["sandbox", "up", "--name", "Bad_Name!"], "sandbox name 'Bad_Name!'"),
])
def test_user_mistakes_are_one_clear_line(image, args, says):
    assert says in one_clear_line(remed(*args))


def test_no_image_yet_says_how_to_build_it(tmp_path):
    line = one_clear_line(remed("sandbox", "up", env={"E2E_REME_CACHE": str(tmp_path)}))
    assert "no guest image" in line and "remed image build" in line


def test_not_root_says_so(tmp_path):
    line = one_clear_line(remed("sandbox", "up", user="65534", env={"E2E_REME_STATE": str(tmp_path)}))
    assert "needs root" in line


def test_no_free_address_says_what_to_do(image, sb_name):
    pool = {"E2E_REME_SUBNET_POOL": "198.19.253.0/24"}
    assert remed("sandbox", "up", "--name", sb_name, env=pool).returncode == 0
    try:
        line = one_clear_line(remed("sandbox", "up", "--name", sb_name + "x", env=pool))
        assert "subnets of 198.19.253.0/24 are taken" in line and "E2E_REME_SUBNET_POOL" in line
    finally:
        remed("sandbox", "down", sb_name)


def test_a_node_that_never_answers_names_the_node_and_its_log(image, sb_name):
    # A node that has not answered when the wait ends (nodes trust their sandbox's own key,
    # so a wrong image key no longer makes one that never does): sshd is not up 10 ms after boot.
    from e2e_reme.simulators import SandboxNotReady, create_sandbox, list_sandboxes
    with pytest.raises(SandboxNotReady, match=r"node n0 \(198\.\d+\.\d+\.2\) did not answer in 0 s; see .*console.log"):
        create_sandbox("nspawn", name=sb_name, image=image, ready_timeout_s=0.01)
    assert sb_name not in {r.name for r in list_sandboxes()}
