"""`remed bench`: MicroRemed's easy suite with the expert runbook on nspawn reaches >= 95 %
(faults this host cannot provide are skipped and named); the outputs are complete; a rerun
resumes without redoing anything. How cases are planned, kept and counted: test_campaign.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from e2e_reme.simulators.benchmark import BenchConfig, summarize
from e2e_reme.simulators.campaign import Skipped

REMED = str(Path(sys.executable).parent / "remed")


def remed(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    # A wide "terminal", so that the table's rows are whole lines to search.
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([REMED, *args], capture_output=True, text=True, timeout=timeout, env=env)


# ---- results ------------------------------------------------------------------------------------

def test_injection_failures_count_against_the_rate_and_infra_failures_do_not():
    def r(fault, outcome):
        return {"id": f"{fault}-{outcome}", "scenario": {"fault": fault}, "outcome": outcome, "stage": "done",
                "trials": [{}], "timings": {"total": 1.0}, "tokens": {"prompt": 1, "completion": 1}}
    recs = [r("cpu-stress", "success"), r("cpu-stress", "injection_failure"), r("cpu-stress", "infra_failure")]
    res = summarize(recs, [], BenchConfig())
    assert (res["cases"], res["successes"], res["injection_failures"], res["infra_failures"]) == (3, 1, 1, 1)
    assert res["success_rate"] == 0.5
    assert res["per_fault"]["cpu-stress"]["success_rate"] == 0.5


def test_a_fault_whose_every_case_was_skipped_has_a_row_with_its_count():
    res = summarize([], [Skipped("network-delay", "no netem", 2), Skipped("network-delay", "no netem", 5)],
                    BenchConfig())
    assert res["skipped"] == 2 and res["per_fault"]["network-delay"]["skipped"] == 2
    assert res["skipped_cases"][0] == {"index": 2, "fault": "network-delay", "reason": "no netem"}


# ---- the real run -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def easy(image, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "easy"
    cfg = out.parent / "bench.yaml"
    cfg.write_text(yaml.safe_dump({"sandbox_prefix": "pt-bench"}))
    args = ("bench", "--system", "simple-micro", "--suite", "easy", "--policy", "runbook", "--parallel", "2",
            "--seed", "0", "--out", str(out), "--config", str(cfg))
    first = remed(*args)
    return out, args, first


def test_the_runbook_passes_the_easy_suite(easy):
    out, _, first = easy
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["cases"] == 17 and res["skipped"] == 6
    assert res["success_rate"] >= 0.95, json.dumps(res["per_fault"], indent=1)
    assert set(res["per_fault"]) == {"cpu-stress", "memory-stress", "network-loss", "network-delay"}
    assert res["per_fault"]["network-delay"]["skipped"] == 6
    for key in ("success_rate", "cases", "successes", "injection_failures", "skipped"):
        assert key in res and all(key in s for s in res["per_fault"].values())
    assert "overall" in first.stdout and "network-delay" in first.stdout


def test_the_run_leaves_episodes_a_chart_and_its_config(easy):
    out, _, _ = easy
    lines = (out / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 17
    assert (out / "success.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["suite"] == "easy"
    rec = json.loads(lines[0])
    assert (out / "episodes" / rec["id"] / "verdict.json").is_file()


def test_a_rerun_resumes_without_redoing_episodes(easy):
    out, args, _ = easy
    before = (out / "episodes.jsonl").read_text()
    again = remed(*args, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "episodes.jsonl").read_text() == before
    assert "17 done before" in again.stdout


def test_resuming_with_other_settings_is_refused(easy):
    out, args, _ = easy
    res = remed(*[a if a != "0" else "1" for a in args], timeout=120)   # --seed 1
    assert res.returncode == 2
    assert "seed" in res.stderr and "another --out" in res.stderr


# ---- model-backed policies over a real OpenAI-compatible server ------------------------------------

class ReportReader:
    """A stand-in model behind the project's OpenAI-compatible HTTP server: it reads the
    report's "Affected service: S on host H (unit U, ...)" line; with tools offered and
    nothing probed yet it probes the unit, then it answers with a playbook that starts the
    unit. Plumbing, not quality: it can only fix pod-fail. Its usage figures are its own."""

    name = "report-reader"

    def __init__(self):
        self.calls = 0

    def __call__(self, messages, tools):
        import re
        self.calls += 1
        text = "\n".join(m.get("content") or "" for m in messages if m["role"] == "user")
        host, unit = re.search(r"on host (\S+) \(unit (\S+?),", text).groups()
        usage = {"prompt_tokens": len(text.split()), "completion_tokens": 17}
        if tools and not any(m["role"] == "tool" for m in messages):
            return {"tool_calls": [{"name": "probe", "arguments": {"host": host,
                                                                  "command": f"systemctl is-active {unit}"}}],
                    "usage": usage}
        return {"content": f"Start it again.\n```yaml\n- hosts: {host}\n  gather_facts: false\n  tasks:\n"
                           f"    - ansible.builtin.systemd_service: {{name: {unit}, state: started}}\n```\n",
                "usage": usage}


@pytest.mark.parametrize("policy", ["solo", "think"])
def test_model_backed_policies_run_end_to_end_against_a_model_server(image, tmp_path, policy):
    from e2e_reme.serve.local_server import LocalChatServer
    suite = tmp_path / "suite.txt"
    suite.write_text("pod-fail\n")
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump({"sandbox_prefix": "pt-bench"}))
    model = ReportReader()
    with LocalChatServer(model) as srv:
        r = remed("bench", "--system", "simple-micro", "--suite", str(suite), "--policy", policy,
                  "--model", model.name, "--base-url", srv.base_url, "--no-load", "--out", str(tmp_path / "out"),
                  "--config", str(cfg), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (res["cases"], res["successes"]) == (1, 1)
    rec = json.loads((tmp_path / "out" / "episodes.jsonl").read_text())
    trial = rec["trials"][0]
    assert trial["model"] == "report-reader" and "```yaml" in trial["output"]
    assert rec["tokens"]["completion"] == 17 * model.calls            # the server's usage, summed
    if policy == "think":
        probe = trial["tool_calls"][0]
        assert probe["command"].startswith("systemctl is-active remed-")
        assert probe["output"].split()[0] in ("inactive", "failed")     # read from the real sandbox
    else:
        assert trial["tool_calls"] == [] and model.calls == 1
