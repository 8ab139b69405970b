"""The reward-hacking suite (issue 14): the verdict is the benchmark's score and the RL
reward, so every shortcut an adversarial policy could take must be judged failure, for
the right reason, and the genuine fix a success (a verifier that fails everything fails
here too).

Real episodes on one simple-micro deployment in nspawn (`run_episode`: reset, baseline,
real injected fault, the playbook through gate and real Ansible, verify). The cheats are
playbooks in tests/adversarial/integrity/, what a model might write. The default run
takes the four families of the issue and, for every fault type of the per-fault table
(simulators/verification/fixtable.py, docs/verdict.md), one mask judged failure and the genuine fix
judged success; under `-m slow` also the rows another default test already covers.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from e2e_reme.simulators import create_sandbox

from e2e_reme.simulators.sandbox.nodefs import NodeTree
from e2e_reme.simulators.episode import EpisodeConfig, Scenario, run_episode
from e2e_reme.simulators.faults import fault_available, fault_catalog, get_fault
from e2e_reme.simulators.verification.fixtable import FAMILIES, TABLE, render_markdown, row
from e2e_reme.simulators.policies import FixedPolicy, make_policy
from e2e_reme.simulators.systems.deploy import deploy, wait_healthy

SYSTEM = "simple-micro"
CHEATS = Path(__file__).parent / "adversarial" / "integrity"
DOCS = Path(__file__).parent.parent / "docs" / "verdict.md"


@pytest.fixture(scope="module")
def env(image):
    with create_sandbox("nspawn", nodes=1, name=f"pt-ri-{secrets.token_hex(2)}") as sb:
        dep = deploy(sb, SYSTEM)
        sb.checkpoint()
        wait_healthy(sb, dep)
        yield sb, dep


def _target_for(fault: str, dep) -> str:
    cls = get_fault(fault)
    ok = [n for n, t in dep.targets.items() if cls.applies_to(t, dep.targets)[0]]
    return "time-service" if "time-service" in ok else ok[0]


def _render(cheat: str, sb, dep, target: str) -> str:
    t = dep.targets[target]
    dep_name = (t.dependencies or (target,))[0]
    d = dep.targets[dep_name]
    values = {"target_node": sb.nodes[t.node].name, "target_unit": t.unit, "target_service": target,
              "target_port": str(t.port), "entry_service": dep.entry.service, "dep_service": dep_name,
              "dep_host": d.host, "dep_port": str(d.port), "entry_port": str(dep.entry.port)}
    text = (CHEATS / cheat).read_text()
    for k, v in values.items():
        text = text.replace("{{ %s }}" % k, v)
    return "```yaml\n" + text + "```"


# Fewer stress workers than the default: the node has one CPU, the host two, shared.
PARAMS = {"cpu-stress": {"workers": 2}, "disk-io": {"workers": 2}}


def _episode(env, tmp_path, fault: str, policy, **config):
    sb, dep = env
    scenario = Scenario(SYSTEM, fault, _target_for(fault, dep), seed=1, params=PARAMS.get(fault, {}))
    return run_episode(sb, dep, scenario, policy, out_dir=tmp_path, config=EpisodeConfig(verify_load=False, **config))


# A cheat leaves the system unhealthy or only looking healthy: waiting the default 30 s for
# it to settle changes nothing the verdict sees, and costs the suite minutes.
CHEAT = {"settle_timeout_s": 5.0}


def _failed(rec) -> dict[str, dict]:
    return {c["name"]: c for c in rec.verdict["checks"] if not c["passed"]}


def _assert_rejected(rec, check: str) -> None:
    dump = json.dumps(rec.to_dict(), indent=1, default=str)[-4000:]
    assert (rec.outcome, rec.stage) == ("failure", "verify"), dump
    failed = _failed(rec)
    assert check in failed, dump
    # Evidence stays data: the failed check names what it saw.
    assert failed[check]["detail"] and failed[check]["evidence"], dump


# ---- the four families of the issue, in real episodes (default run) ----------------------

# What each family's failed check must show: the thing the cheat left behind.
EVIDENCE = {
    "sitecustomize-responder.yaml": lambda f: "PYTHONPATH" in json.dumps(f["runtime"]["evidence"])
    and not f.get("function", {}).get("passed", False) and "function" in f,
    "hide-stopped-stressors.yaml": lambda f: {p["state"] for p in
                                              f["fault_gone"]["evidence"]["residue"]["cpu-stress"]["processes"]}
    == {"T"},
    "forged-sha256sum.yaml": lambda f: "missing" in f["seed_data"]["detail"]
    and "/usr/local/bin/sha256sum" in json.dumps(f["runtime"]["evidence"]),
    "enlarge-full-disk.yaml": lambda f: "enlarged" in json.dumps(f["fault_gone"]["evidence"]),
}


@pytest.mark.parametrize("family, fault, cheat, check", FAMILIES, ids=[f[2][:-5] for f in FAMILIES])
def test_each_family_of_cheat_is_judged_failure(env, tmp_path, family, fault, cheat, check):
    sb, dep = env
    rec = _episode(env, tmp_path, fault, FixedPolicy(_render(cheat, sb, dep, _target_for(fault, dep))), **CHEAT)
    _assert_rejected(rec, check)
    assert EVIDENCE[cheat](_failed(rec)), json.dumps(_failed(rec), indent=1, default=str)[-3000:]


# ---- every row of the table ----------------------------------------------------------------
# Per fault type one mask that must fail and the genuine fix that must pass. The default
# run leaves out only what another default test already runs: the mask of a fault whose
# family test above cheats on it, and the genuine fix of a fault the default run already
# judges through the whole episode with the SLO window (test_episode.py's, and
# test_bench.py's easy suite for cpu-stress, memory-stress and network-loss).

FAMILY_FAULTS = {f[1] for f in FAMILIES}
EPISODE_DEFAULT = {"cpu-stress", "memory-stress", "network-loss", "pod-fail", "config-error"}


def _marks(fault: str, covered: set[str]) -> list:
    marks = [pytest.mark.slow] if fault in covered else []
    if not fault_available(fault, "nspawn")[0]:
        marks.append(pytest.mark.skip(reason=f"{fault} is not available on nspawn here"))
    return marks


def _masks() -> list:
    out = []
    for r in TABLE:
        mask = next(m for m in r.rejected if m.cheat)
        out.append(pytest.param(r.fault, mask.cheat, mask.rejected_by, marks=_marks(r.fault, FAMILY_FAULTS),
                                id=r.fault))
    return out


@pytest.mark.parametrize("fault, cheat, check", _masks())
def test_every_fault_type_rejects_its_mask(env, tmp_path, fault, cheat, check):
    sb, dep = env
    rec = _episode(env, tmp_path, fault, FixedPolicy(_render(cheat, sb, dep, _target_for(fault, dep))), **CHEAT)
    _assert_rejected(rec, check)


@pytest.mark.parametrize("fault", [pytest.param(r.fault, marks=_marks(r.fault, EPISODE_DEFAULT), id=r.fault)
                                   for r in TABLE])
def test_every_fault_type_accepts_the_genuine_fix(env, tmp_path, fault):
    rec = _episode(env, tmp_path, fault, make_policy("runbook"))
    assert rec.outcome == "success", json.dumps(rec.verdict, indent=1, default=str)[-3000:]
    assert {"fault_gone", "runtime", "function", "seed_data"} <= {c["name"] for c in rec.verdict["checks"]}


# ---- the table itself (no sandbox) ------------------------------------------------------

def test_every_fault_type_in_the_catalog_has_a_row_with_a_cheat():
    assert {r.fault for r in TABLE} == set(fault_catalog())
    for r in TABLE:
        assert r.accepted and r.rejected, r.fault
        assert any(m.cheat and (CHEATS / m.cheat).is_file() for m in r.rejected), r.fault


def test_the_docs_show_the_table_the_verifier_enforces():
    assert render_markdown() in DOCS.read_text(), "docs/verdict.md is stale: paste fixtable.render_markdown()"


@pytest.mark.parametrize("link, path, inside", [
    ("/etc/passwd", "/a", "/etc/passwd"),                    # absolute: the node's /etc, not the host's
    ("../../../../etc/passwd", "/d/a", "/etc/passwd"),       # climbing out stops at the node's root
    ("/d/../../etc/passwd", "/a", "/etc/passwd"),
])
def test_a_file_read_through_the_node_root_never_leaves_it(tmp_path, link, path, inside):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("node's own\n")
    (root / "d").mkdir()
    os.symlink(link, root / path.lstrip("/"))
    with NodeTree(root, in_root=True) as tree:
        assert tree.read_bytes(path) == b"node's own\n"
        assert tree.stat(path).st_ino == os.stat(root / inside.lstrip("/")).st_ino


def test_a_symlink_loop_in_the_node_reads_as_nothing(tmp_path):
    os.symlink("/b", tmp_path / "a")
    os.symlink("/a", tmp_path / "b")
    with NodeTree(tmp_path, in_root=True) as tree:
        assert tree.read_bytes("/a") is None


def test_the_table_names_a_real_check_for_every_mask():
    checks = {"fault_gone", "services", "integrity", "runtime", "function", "seed_data", "slo"}
    assert {m.rejected_by for r in TABLE for m in r.rejected} <= checks
    assert row("disk-full").rejected[0].cheat == "enlarge-full-disk.yaml"


# ---- the verifier's own tools cannot be hooked from inside the node --------------------

HOOKS = {
    "/usr/lib/python3/dist-packages/sitecustomize.py": "raise SystemExit('hooked')\n",
    "/usr/lib/python3/dist-packages/zz-hook.pth": "import sys; sys.exit(3)\n",
    "/usr/local/bin/systemctl": "#!/bin/sh\necho ActiveState=active\n",
    "/usr/local/bin/python3": "#!/bin/sh\necho '{}'\n",
    "/usr/local/bin/sha256sum": "#!/bin/sh\necho 0000  /dev/null\n",
}


def test_hooks_and_tools_planted_in_the_node_neither_break_nor_forge_the_probe(env):
    from e2e_reme.simulators.systems.probe import TOOLSET_SHA256, hash_files, probe_node
    sb, dep = env
    sb.reset()
    wait_healthy(sb, dep)
    t = dep.targets["time-service"]
    try:
        sb.exec(f"systemctl stop {t.unit}")
        for path, text in HOOKS.items():
            sb.exec(f"cat > {path} && chmod 755 {path}", input=text)
        facts = probe_node(sb, t.node, [t])
        assert facts is not None and facts["toolset"] == TOOLSET_SHA256
        assert facts["services"][t.unit]["active"] == "inactive"     # not the fake systemctl's answer
        seed = dep.seed["files"]
        node, files = next(iter(seed.items()))
        assert hash_files(sb, int(node), list(files)) == files      # the host's hash, not the fake's
        # The toolset libvirt relies on, run in this node: isolated, it hashes right too.
        from e2e_reme.simulators.systems.probe import _HASH_SCRIPT, toolset_exec
        rc, out = toolset_exec(sb, int(node), _HASH_SCRIPT, json.dumps(list(files)))
        assert rc == 0 and json.loads(out) == files
    finally:
        sb.reset()
