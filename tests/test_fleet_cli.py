"""`remed fleet collect` as a user runs it: the command starts a local Ray with this machine
as its only sandbox host, collects and prints the summary table. Ctrl-C stops every sandbox the fleet made; after a SIGKILL of the
command, nothing is left once the reapers (or `remed sandbox gc`) have run.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from e2e_reme.simulators import list_sandboxes

pytest.importorskip("ray")

REMED = str(Path(sys.executable).parent / "remed")


def _ours(prefix: str) -> list:
    return [r for r in list_sandboxes() if r.name.startswith(prefix)]


def _config(tmp_path: Path, prefix: str) -> Path:
    p = tmp_path / "collect.yaml"
    p.write_text(yaml.safe_dump({"fleet": {"host": {"sandbox_prefix": prefix, "slots": 1,
                                                     "episode": {"verify_load": False}}}}))
    return p


def _args(tmp_path: Path, prefix: str, episodes: int) -> list[str]:
    return [REMED, "fleet", "collect", "--episodes", str(episodes), "--faults", "pod-fail,cpu-stress",
            "--out", str(tmp_path / "exp"), "--config", str(_config(tmp_path, prefix))]


def test_collect_from_the_command_line(image, tmp_path):
    # Resuming is the same code as through the API (test_fleet.py); here: the command itself.
    prefix = f"pt-fc{secrets.token_hex(1)}"
    r = subprocess.run(_args(tmp_path, prefix, 1), capture_output=True, text=True, timeout=900,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 done before, 1 to run" in r.stdout
    assert "experience in" in r.stdout and ("pod-fail" in r.stdout or "cpu-stress" in r.stdout)
    summary = json.loads((tmp_path / "exp" / "summary.json").read_text())
    assert (summary["episodes"], summary["success"], summary["complete"]) == (1, 1, True)
    assert len(list((tmp_path / "exp" / "shards").glob("part-*.jsonl"))) == 1
    assert _ours(prefix) == []


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"fleet": {"host": {"slotz": 1}}}))
    r = subprocess.run([REMED, "fleet", "collect", "--config", str(bad), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "slotz" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_an_interrupted_or_killed_collection_leaves_no_sandbox(image, tmp_path, sig):
    prefix = f"pt-fk{secrets.token_hex(1)}"
    p = subprocess.Popen(_args(tmp_path, prefix, 6), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while not [r for r in _ours(prefix) if r.status == "running"]:
            assert p.poll() is None, "the collection ended before its sandbox came up"
            assert time.monotonic() - t0 < 300, "no sandbox came up"
            time.sleep(0.5)
        time.sleep(8)      # into the first episode
        p.send_signal(sig)
        rc = p.wait(300)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc != 0
    t0 = time.monotonic()
    while _ours(prefix) and time.monotonic() - t0 < 90:
        time.sleep(1)
    left = [r.name for r in _ours(prefix)]
    if sig == signal.SIGINT:
        assert left == [], f"Ctrl-C left sandboxes: {left}"
    elif left:
        # The reapers did not get there: the backstop must.
        subprocess.run([REMED, "sandbox", "gc"], check=True, capture_output=True, timeout=300)
        assert _ours(prefix) == []
