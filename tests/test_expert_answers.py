"""The expert runbook's answers to REAL reports (issue 29, "Breadth"): idiomatic Ansible, as
short as the fix allows. Fast: the reports were gathered once from live faults on nspawn
(`bench/expert_lengths.py gather`, stored compact under tests/data/expert_reports/); no
sandbox here. That the answers fix the faults is judged live by tests/test_faults.py,
tests/test_episode.py and tests/test_reward_integrity.py.

Every answer: plays that parse, pass the safety gate, target only the report's host, never
reboot or touch sshd, end with the health check; modules before scripts (at most a few
lines of shell in all); and no longer than a token bound that every generation limit of
the repository clears.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from e2e_reme.simulators.faults import fault_catalog
from e2e_reme.simulators.playbook.gate import check_playbook, check_text
from e2e_reme.simulators.policies.expert import expert_playbook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from expert_lengths import MODELS, stored_inputs

CASES = stored_inputs()
IDS = [c for c, _ in CASES]
HOSTS = ("n0", "n1", "n2")
# The longest answer measured (bench/results/expert_lengths.json, "after"), with a margin: a
# runbook change that makes answers much longer must say so here.
MAX_TOKENS = 400
MAX_CHARS = 1200
# Lines of shell (or of a command's argument) in one answer, in all.
MAX_SCRIPT_LINES = 2


def _answer(ri: dict) -> tuple[str, list[dict]]:
    text = expert_playbook(ri)
    return text, yaml.safe_load(text)


def _tasks(plays: list[dict]) -> list[dict]:
    out = []
    for p in plays:
        for t in p["tasks"]:
            out += [t, *t.get("block", []), *t.get("rescue", []), *t.get("always", [])]
    return out


def test_the_stored_reports_cover_every_fault_type_on_every_system():
    assert len(CASES) >= 60
    systems = {c.split("/")[0] for c in IDS}
    assert systems == {"simple-micro", "boutique", "train-ticket"}
    here = set(fault_catalog()) - {"network-delay"}      # netem: no nspawn host here has it
    assert {c.split("/")[1] for c in IDS} == here
    for system in systems:
        kinds = {c.split("/")[1] for c in IDS if c.startswith(system + "/")}
        assert len(kinds) >= 13, (system, sorted(here - kinds))
    # Real evidence, not a stub: every report carries what describe() observed.
    assert all(ri["evidence"].get("unit_state") or ri["evidence"].get("parts") for _, ri in CASES)


@pytest.mark.parametrize("case", IDS)
def test_the_answer_is_safe_plays_for_the_reports_host_only(case):
    ri = dict(CASES)[case]
    text, plays = _answer(ri)
    assert check_text(text).ok, check_text(text).reason
    res = check_playbook(plays, HOSTS)
    assert res.ok, f"{res.reason}\n{text}"
    assert [p["hosts"] for p in plays] == [ri["node"]]
    assert "localhost" not in text and "delegate_to" not in text and "reboot" not in text
    assert "sshd" not in text and "ssh.service" not in text
    tasks = _tasks(plays)
    names = [t["name"] for t in tasks]
    assert len(names) == len(set(names)), names
    health = f"{ri['service']} answers PING" if ri.get("kind") == "redis" else f"{ri['service']} is healthy"
    assert names[-1] == health


@pytest.mark.parametrize("case", IDS)
def test_the_answer_uses_modules_before_scripts(case):
    text, plays = _answer(dict(CASES)[case])
    script = 0
    for t in _tasks(plays):
        for mod in ("ansible.builtin.shell", "ansible.builtin.command", "ansible.builtin.raw"):
            v = t.get(mod)
            if isinstance(v, str) and (mod != "ansible.builtin.command" or "\n" in v or "<<" in v):
                script += len([l for l in v.splitlines() if l.strip()])
    assert script <= MAX_SCRIPT_LINES, text
    assert "python3 -" not in text and "<<" not in text, "an embedded program"


@pytest.mark.parametrize("case", IDS)
def test_the_answer_is_short(case):
    text, _ = _answer(dict(CASES)[case])
    assert len(text) <= MAX_CHARS, (len(text), text)


@pytest.fixture(scope="module")
def tokenizer():
    path = MODELS["gemma3"]
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"no Gemma tokenizer at {path}: `make model` imports it")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def test_every_answer_fits_the_token_bound_and_every_generation_limit(tokenizer):
    from e2e_reme.train.format import answer_text
    lengths = {c: len(tokenizer(answer_text(expert_playbook(ri)), add_special_tokens=False)["input_ids"])
               for c, ri in CASES}
    longest = max(lengths.values())
    assert longest <= MAX_TOKENS, sorted(lengths.items(), key=lambda kv: -kv[1])[:5]
    # Every generation limit of the repository leaves the longest answer room to finish.
    limits = {}
    for p in sorted((ROOT / "configs").glob("*.yaml")):
        for m in re.finditer(r"^\s*max_tokens:\s*(\d+)", p.read_text(), re.MULTILINE):
            limits[f"configs/{p.name}"] = int(m.group(1))
    from e2e_reme.train.evaluate import EvalConfig
    from e2e_reme.train.rl_config import RolloutConfig
    limits["EvalConfig"], limits["RolloutConfig"] = EvalConfig().max_tokens, RolloutConfig().max_tokens
    short = {k: v for k, v in limits.items() if v <= longest}
    assert not short, f"generation limits at or below the longest expert answer ({longest} tokens): {short}"
