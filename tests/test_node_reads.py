"""Issue 28, family 1, through the real episode path: a node process that swaps a directory
of its writable layer for a link to a host directory while the verifier reads it, plus a
FIFO and a link to /dev/kmsg among its files. No host byte (nor its hash) reaches the
verdict, and the verdict does not block. (The same, driven from a host thread, at the
level of nodefs itself: tests/test_nodefs.py.)"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from pathlib import Path

import pytest

from e2e_reme.simulators import create_sandbox
from e2e_reme.simulators.episode import EpisodeConfig, Scenario, run_episode
from e2e_reme.simulators.policies import FixedPolicy
from e2e_reme.simulators.systems.deploy import deploy, wait_healthy

ATTACK = Path(__file__).parent / "adversarial" / "hostile" / "symlink-swapper.yaml"


@pytest.fixture(scope="module")
def env(image):
    with create_sandbox("nspawn", nodes=1, name=f"pt-nr-{secrets.token_hex(2)}") as sb:
        dep = deploy(sb, "simple-micro")
        sb.checkpoint()
        wait_healthy(sb, dep)
        yield sb, dep


def test_a_link_swapped_in_mid_verdict_never_shows_a_host_byte(env, tmp_path):
    sb, dep = env
    host_dir = tmp_path / "host-secret"
    host_dir.mkdir()
    secret = secrets.token_hex(16).encode()
    for name in ("f", "passwd", "key"):
        (host_dir / name).write_bytes(secret)
    t = dep.targets["time-service"]
    text = ATTACK.read_text()
    for k, v in {"target_node": sb.nodes[t.node].name, "target_unit": t.unit, "host_dir": str(host_dir)}.items():
        text = text.replace("{{ %s }}" % k, v)
    t0 = time.monotonic()
    rec = run_episode(sb, dep, Scenario("simple-micro", "pod-fail", "time-service", seed=3),
                      FixedPolicy("```yaml\n" + text + "```"), out_dir=tmp_path / "ep",
                      config=EpisodeConfig(verify_load=False, settle_timeout_s=5.0))
    took = time.monotonic() - t0
    # The attack was live through the verdict: the swapper (in the service's own process
    # tree, which no sweep ends) is still swapping.
    assert sb.exec("pgrep -f /usr/local/sbin/swapper", node=t.node).rc == 0
    dump = json.dumps(rec.to_dict(), default=str)
    assert rec.stage == "verify" and rec.outcome == "failure", dump[-3000:]
    assert "zz-swap.pth" in dump, dump[-3000:]          # the layer was read: the hook is named
    for leak in (secret.decode(), hashlib.sha256(secret).hexdigest()):
        assert leak not in dump
    everything = b"".join(p.read_bytes() for p in (tmp_path / "ep").rglob("*") if p.is_file())
    assert secret not in everything and hashlib.sha256(secret).hexdigest().encode() not in everything
    assert took < 240, f"the episode took {took:.0f} s"
