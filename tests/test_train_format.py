"""The one prompt format with token ids: the benchmark's messages, the answer as a fenced
playbook and back, and ids that are exactly what the model is given at evaluation time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from e2e_reme.simulators.policies.base import TrialFeedback
from e2e_reme.simulators.policies.prompt import build_messages as simulators_build_messages
from e2e_reme.train.data import DataConfig, build_sft_data, corpus_texts, inventory_hosts
from e2e_reme.train.format import (IGNORE_INDEX, answer_text, build_messages, encode_example, extract_yaml,
                                   prompt_ids, split_transcript)
from e2e_reme.train.model import ModelConfig, TokenizerConfig, init_model, load_model

EPISODES = Path(__file__).parent / "data" / "train-episodes.jsonl"


@pytest.fixture(scope="module")
def records():
    return [json.loads(l) for l in EPISODES.read_text().splitlines()]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    data = build_sft_data(DataConfig(episodes=(str(EPISODES),)))
    path = init_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                  tokenizer=TokenizerConfig(vocab_size=1024)),
                      tmp_path_factory.mktemp("fmt") / "tiny", corpus_texts(data.train))
    return load_model(path)


def test_train_uses_the_benchmarks_prompt_module():
    assert build_messages is simulators_build_messages


def test_an_answer_round_trips_to_the_same_playbook(records):
    for rec in records:
        text = answer_text(rec["playbook"])
        assert yaml.safe_load(extract_yaml(text)) == yaml.safe_load(rec["playbook"])


def test_the_expert_policys_recorded_answer_is_the_answer_format(records):
    for rec in records:
        assert rec["trials"][-1]["output"] == answer_text(rec["playbook"])


def test_prompt_ids_are_what_the_benchmarks_local_model_is_given(lm, records):
    rep = records[0]["report"]
    messages = build_messages(rep, inventory_hosts(rep))
    r = lm.chat(messages, max_tokens=2)
    assert r.raw["prompt_ids"] == prompt_ids(lm.tokenizer, messages)


def test_the_loss_covers_only_the_answer_and_its_end_token(lm, records):
    rec = records[1]
    messages = build_messages(rec["report"], inventory_hosts(rec["report"]))
    ex = encode_example(lm.tokenizer, messages, answer_text(rec["playbook"]))
    labels = ex.labels()
    assert labels[:ex.prompt_len] == [IGNORE_INDEX] * ex.prompt_len
    assert labels[ex.prompt_len:] == ex.input_ids[ex.prompt_len:]
    assert ex.input_ids[-1] == lm.tokenizer.eos_token_id
    assert ex.input_ids[:ex.prompt_len] == prompt_ids(lm.tokenizer, messages)
    assert lm.tokenizer.decode(ex.input_ids[ex.prompt_len:], skip_special_tokens=True) == answer_text(rec["playbook"])


def test_a_multi_turn_transcript_trains_on_its_last_answer_only(lm, records):
    rep = records[2]["report"]
    fb = TrialFeedback(trial=1, stage="execute", error_class="ExecutionFailed", reason="task failed",
                       execution="The playbook failed.", health={"ok": False})
    messages = build_messages(rep, inventory_hosts(rep), mode="think", feedback=[fb], previous_answers=["first try"],
                              observations=[{"host": "n0", "command": "uptime", "output": "up 1 day"}])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    prompt, answer = split_transcript(messages + [{"role": "assistant", "content": "second try"}])
    ex = encode_example(lm.tokenizer, prompt, answer)
    assert lm.tokenizer.decode(ex.input_ids[ex.prompt_len:], skip_special_tokens=True) == "second try"
    assert "first try" in lm.tokenizer.decode(ex.input_ids[:ex.prompt_len])


def test_an_answer_without_a_playbook_extracts_to_none():
    assert extract_yaml("I would restart the service.") is None


# ---- the compact report: every fact the runbook needs, per fault type -------------------------------
# Evidence in the shapes `simulators.faults.observe` writes (unit_state, node_stats, disk, listen,
# network, config), one report per fault type of the runbook's catalog, plus the recorded ones.

from e2e_reme.simulators.reports import DiagnosisReport  # noqa: E402
from e2e_reme.simulators.policies.expert import covered_kinds, expert_playbook  # noqa: E402

UNIT = "remed-orders.service"
TARGET = {"node": "n1", "unit": UNIT, "config_path": "/etc/remed/orders.yaml", "data_dir": "/var/lib/remed/orders",
          "port": 8082, "kind": "http", "health_path": "/health",
          "dependencies": {"stock": {"host": "198.18.7.3", "port": 8083, "kind": "http"},
                           "cache": {"host": "198.18.7.2", "port": 6379, "kind": "redis"}}}
UNIT_STATE = {"active": "active", "sub": "running", "result": "success", "restarts": 0, "main_pid": 41, "drop_ins": []}
DROPIN = "/etc/systemd/system/remed-orders.service.d/limits.conf"
NET = {"qdiscs": [], "nft_ruleset": ["table inet filter {", "chain output {", "}", "}"],
       "dependencies": {"stock": {"address": "198.18.7.3:8083", "tcp_connect": "ok 0.4 ms", "health": {"status": 200}}}}
DISK = {"data_dir": "/var/lib/remed/orders", "mount_point": "/var/lib/remed/orders", "mount_options": "rw,relatime",
        "use_pct": "99%", "writable": True,
        "largest_files": [{"path": "/var/lib/remed/orders/.cache/blob-1", "mib": 850.0},
                          {"path": "/var/lib/remed/orders/seed/data.json", "mib": 2.5},
                          {"path": "/var/lib/remed/orders/orders.log", "mib": 0.2}]}


def _unit(**kw):
    return {"unit_state": {**UNIT_STATE, **kw}}


EVIDENCE = {
    "cpu-stress": {**_unit(), "symptoms": [f"8 process(es) besides the main one in {UNIT}: a busy worker process"]},
    "memory-stress": {**_unit(), "memory_hogs": [
        {"pid": 311, "name": "a busy worker process", "cmd": "a busy worker process --vm 1", "unit": "remed-x1.service",
         "rss_mib": 900.0},
        {"pid": 315, "name": "python3", "cmd": "python3 -c hog", "unit": "an extra unit", "rss_mib": 300.0}]},
    "disk-io": {**_unit(), "symptoms": ["4 process(es) besides the main one"]},
    "disk-full": {**_unit(), "disk": DISK},
    "log-flood": {**_unit(), "disk": {**DISK, "open_by": [
        {"pid": 77, "cmd": "sh -c yes", "unit": "run-u12.scope", "files": ["/var/lib/remed/orders/.cache/blob-1"]},
        {"pid": 41, "cmd": "python3 service.py", "unit": UNIT, "files": ["/var/lib/remed/orders/orders.log"]}]}},
    "network-delay": {**_unit(), "network": {**NET, "qdiscs": ["qdisc netem 8001: dev host0 root refcnt 2 delay 400ms"]}},
    "network-loss": {**_unit(), "network": {**NET, "nft_ruleset": [
        "table inet t {", "chain c {", "    tcp sport 8082 numgen random mod 100 < 40 drop", "}", "}"]}},
    "firewall-drop": {**_unit(), "network": {**NET, "nft_ruleset": [
        "table inet t {", "chain c {", "    ip daddr 198.18.7.3 tcp dport 8083 drop", "}", "}"]}},
    "readonly-fs": {**_unit(), "disk": {**DISK, "mount_point": "/var/lib/remed", "mount_options": "ro,relatime",
                                        "writable": False, "largest_files": []}},
    "pod-fail": _unit(active="failed", sub="failed", result="exit-code", restarts=5),
    "config-error": _unit(drop_ins=[{"path": DROPIN, "settings": ["CPUQuota=1%", "Nice=5"]},
                                    {"path": DROPIN.replace("limits", "mem"), "settings": ["MemoryMax=8M"]}]),
    "hung-process": {**_unit(), "symptoms": ["main process 41 is stopped (state T)"]},
    "wrong-dependency": {**_unit(), "config": {"path": "/etc/remed/orders.yaml",
                                               "dependencies": {"stock": {"host": "198.18.7.9", "port": 8083}}}},
    "port-taken": {**_unit(active="activating", sub="auto-restart"), "listen": {"port": 8082, "holders": [
        {"pid": 501, "cmd": "python3 -m http.server 8082", "unit": "run-p2.scope"},
        {"pid": 502, "cmd": "nc -l 8082", "unit": "an extra unit"}]}},
    "fd-exhaustion": _unit(drop_ins=[{"path": DROPIN, "settings": ["LimitNOFILE=16"]}]),
    "bad-release": _unit(drop_ins=[{"path": DROPIN.replace("limits", "release"),
                                    "settings": ["ExecStart=", "ExecStart=/usr/bin/python3 /opt/remed/v2.py"]}]),
}
CATEGORY = {"cpu-stress": "resource", "memory-stress": "resource", "disk-io": "resource", "disk-full": "resource",
            "log-flood": "resource", "network-delay": "network", "network-loss": "network", "firewall-drop": "network",
            "readonly-fs": "resource", "pod-fail": "application", "config-error": "application",
            "hung-process": "application", "wrong-dependency": "application", "port-taken": "application",
            "fd-exhaustion": "application", "bad-release": "application"}


def _report(kind: str, evidence: dict, target: dict = TARGET) -> DiagnosisReport:
    return DiagnosisReport(system="shop", level="full", symptoms=("orders: 12 of 40 requests failed",),
                           observations={}, call_graph={"web": ["orders"], "orders": ["stock", "cache"]},
                           placement={"n0": ["web"], "n1": ["orders", "stock", "cache"]}, service="orders",
                           category=CATEGORY.get(kind, "compound"), fault_kind=kind, evidence=evidence, target=target)


CASES = {k: _report(k, v) for k, v in EVIDENCE.items()}
CASES["memory-stress (top memory)"] = _report("memory-stress", {**_unit(), "node_stats": {"top_memory": [
    {"pid": 330, "name": "python3", "cmd": "python3 hog.py", "unit": "remed-x2.service", "rss_mib": 700.0},
    {"pid": 41, "name": "python3", "cmd": "python3 service.py", "unit": UNIT, "rss_mib": 30.0}]}})
CASES["disk-full (redis)"] = _report("disk-full", {**_unit(), "disk": DISK},
                                     {**TARGET, "kind": "redis", "health_path": "", "port": 6379})
CASES["compound:cpu-stress+config-error"] = _report(
    "compound:cpu-stress+config-error", {"parts": [EVIDENCE["cpu-stress"], EVIDENCE["config-error"]]})


def _proc(s: str) -> dict:
    import re
    m = re.match(r"pid (\d+) \(unit (.*?), .*\)", s)
    return {"pid": int(m.group(1)), "unit": m.group(2)}


def runbook_input_from_text(text: str) -> dict:
    """What a reader of the compact text alone knows, in the runbook's input terms."""
    import re
    m = re.search(r"^Affected service: (\S+) on host (\S+) \(unit (\S+), port (\d+), kind (\S+), health (\S+), "
                  r"config (\S+), data dir (\S+)\)\.$", text, re.M)
    service, node, unit, port, kind, health, config, data = m.groups()
    deps = {}
    d = re.search(r"^Its dependencies: (.*)\.$", text, re.M)
    for part in (d.group(1).split("; ") if d else []):
        n, host, p, k = re.match(r"(\S+) at (\S+):(\d+) \((\S+)\)", part).groups()
        deps[n] = {"host": host, "port": int(p), "kind": k}
    fault_kind = re.search(r"^Failure: \S+ \((\S+)\)\.$", text, re.M).group(1)
    sections = re.split(r"^Evidence(?: \(\S+\))?:$", text, flags=re.M)[1:]
    evidence = [_evidence_from_lines(re.findall(r"^- (.*)$", sec.split("\nCalls to ")[0], re.M)) for sec in sections]
    return {"service": service, "fault_kind": fault_kind, "node": node, "unit": unit, "config_path": config,
            "data_dir": data, "port": int(port), "dependencies": deps, "kind": kind,
            "health_path": "" if health == "PING" else health,
            "evidence": {"parts": evidence} if len(evidence) > 1 else (evidence[0] if evidence else {})}


def _evidence_from_lines(lines: list[str]) -> dict:
    import re
    ev: dict = {}
    unit = ev.setdefault("unit_state", {"drop_ins": []})
    for line in lines:
        if m := re.match(r"drop-in (\S+): (.*)$", line):
            unit["drop_ins"].append({"path": m.group(1), "settings": m.group(2).split("; ")})
        elif m := re.match(r"(memory hog|large process): (.*) holds ([\d.]+) MiB$", line):
            key = "memory_hogs" if m.group(1) == "memory hog" else "top_memory"
            entry = {**_proc(m.group(2)), "rss_mib": float(m.group(3))}
            (ev.setdefault(key, []) if key == "memory_hogs"
             else ev.setdefault("node_stats", {}).setdefault("top_memory", [])).append(entry)
        elif m := re.match(r"port (\d+) held by: (.*)$", line):
            ev["listen"] = {"port": int(m.group(1)),
                            "holders": [] if m.group(2) == "nobody" else [_proc(h) for h in m.group(2).split("; ")]}
        elif m := re.match(r"(qdiscs|nft rules that drop): (.*)$", line):
            key = "qdiscs" if m.group(1) == "qdiscs" else "nft_ruleset"
            ev.setdefault("network", {})[key] = [] if m.group(2) == "none" else m.group(2).split("; ")
        elif m := re.match(r"config (\S+) names: (.*)$", line):
            ev["config"] = {"path": m.group(1), "dependencies": {
                n: {"host": h, "port": int(p)} for n, h, p in re.findall(r"(\S+) at (\S+):(\d+)", m.group(2))}}
        elif m := re.match(r"disk of \S+: mounted at (\S+) ", line):
            ev.setdefault("disk", {})["mount_point"] = m.group(1)
        elif m := re.match(r"largest files: (.*)$", line):
            ev.setdefault("disk", {})["largest_files"] = [
                {"path": p, "mib": float(s)} for p, s in re.findall(r"(\S+) \(([\d.]+) MiB\)", m.group(1))]
        elif m := re.match(r"writing under it: (pid .*\)): (.*)$", line):
            ev.setdefault("disk", {}).setdefault("open_by", []).append(
                {**_proc(m.group(1)), "files": m.group(2).split(", ")})
    return ev


def test_every_fault_type_of_the_runbook_has_a_compact_case():
    assert set(covered_kinds()) <= set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_runbooks_playbook_can_be_written_from_the_compact_text_alone(case):
    report = CASES[case]
    text = report.to_text()
    assert expert_playbook(runbook_input_from_text(text)) == expert_playbook(report.runbook_input())


def test_recorded_reports_keep_their_runbook_facts_and_lose_the_raw_dumps(records):
    for rec in records:
        from e2e_reme.simulators.policies.prompt import _report_from_dict
        report = _report_from_dict(rec["report"])
        text = report.to_text()
        assert expert_playbook(runbook_input_from_text(text)) == expert_playbook(report.runbook_input())
        assert len(text) < len(json.dumps(rec["report"])) / 3


def test_the_compact_text_keeps_the_plumbing_wording_of_the_benchmark():
    import re
    text = CASES["pod-fail"].to_text()
    assert re.search(r"on host (\S+) \(unit (\S+?),", text).groups() == ("n1", UNIT)
