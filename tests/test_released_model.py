"""The releases committed under releases/ (issue 29), used as a user who clones the repository
uses them: each one passes its own check (every file's hash, the base imported from its
package and trimmed to the recorded ids, the adapter merged), carries what its manifest
promises (the card, the Gemma terms, the test evaluation with its command and its records),
and `remed serve --model releases/<name>` answers a test-split report with a playbook that
passes the gate, with no training step."""

from __future__ import annotations

import gzip
import json
import secrets
from pathlib import Path

import pytest
import yaml

from e2e_reme.serve.config import ServeConfig
from e2e_reme.serve.launch import Server, free_port
from e2e_reme.train.release import read_manifest

ROOT = Path(__file__).resolve().parents[1]
RELEASES = sorted(p.parent for p in ROOT.glob("releases/*/manifest.json"))


def test_the_repository_holds_a_release():
    assert RELEASES, "releases/ holds no release: train and pack one (docs/train.md, 'Releases')"


@pytest.mark.parametrize("release", RELEASES, ids=lambda p: p.name)
def test_a_committed_release_is_small_and_carries_its_card_terms_and_test_records(release):
    size = sum(f.stat().st_size for f in release.rglob("*") if f.is_file())
    assert size <= 15 * 2**20, f"{release.name}: {size} bytes"
    m = read_manifest(release)
    for name in ("MODEL_CARD.md", "GEMMA_TERMS.html", "NOTICE", "adapter/adapter_model.safetensors"):
        assert (release / name).is_file(), name
    test = m["evaluations"]["test"]
    assert test["split"] == "test" and "--split test" in test["command"]
    records = [json.loads(line) for line in gzip.open(release / test["records"], "rt")]
    assert len(records) == test["overall"]["cases"] >= 48
    assert sum(r["outcome"] == "success" for r in records) == test["overall"]["successes"]
    t = m["training"]                   # chosen on validation, not on test (SFT: its eval section; RL: recorded)
    assert (t.get("chosen_on") if t.get("kind") == "rl" else t["config"]["eval"]["split"]) == "validation"
    assert "validation" in m["evaluations"]



@pytest.mark.parametrize("release", RELEASES, ids=lambda p: p.name)
def test_a_release_s_test_records_compare_with_the_kept_runbook_baseline(release, tmp_path):
    """`remed train compare` reads the release's packed records beside a kept baseline's
    directory: the table of docs/train.md is made again from a fresh clone."""
    from e2e_reme.train.evaluate import compare
    test = read_manifest(release)["evaluations"]["test"]
    res = compare({"release": release / test["records"], "runbook": ROOT / "releases/baselines/runbook-test"},
                  tmp_path, common=True)
    paired = res["paired"]["runbook"]
    assert res["cases"] == paired["cases"] + paired["excluded"] >= 48
    assert paired["both"] + paired["a_only"] == res["policies"]["release"]["overall"]["successes"]
    assert (tmp_path / "success.png").is_file()

@pytest.fixture(scope="module", params=RELEASES, ids=lambda p: p.name)
def served(request, tmp_path_factory):
    release = request.param         # loading it checks every hash; the base from the import's cache
    tmp = tmp_path_factory.mktemp("released")
    (tmp / "token").write_text(secrets.token_urlsafe(24) + "\n")
    (tmp / "token").chmod(0o600)
    cfg = ServeConfig(model=str(release), port=free_port(), max_tokens=768, max_tokens_limit=768,
                      max_batch_size=2, batch_wait_timeout_s=0.1, token_file=str(tmp / "token"),
                      workdir=str(tmp / "work"), replica_cpus=1).with_token()
    srv = Server(cfg, ray_init={"num_cpus": 2})
    try:
        srv.start()
        yield release, srv
    finally:
        srv.stop()


def _a_fixed_test_report(release: Path) -> dict:
    """A test-split report the release fixed in its recorded evaluation, told at the full level."""
    m = read_manifest(release)
    for line in gzip.open(release / m["evaluations"]["test"]["records"], "rt"):
        r = json.loads(line)
        if r["outcome"] == "success" and r["report"].get("level") == "full":
            return r["report"]
    pytest.fail(f"{release.name}: its test evaluation fixed no case told at the full level")


def test_serving_a_release_answers_a_test_report_with_a_playbook_that_passes_the_gate(served):
    import urllib.request
    release, srv = served
    report = _a_fixed_test_report(release)
    req = urllib.request.Request(srv.url + "/v1/remediate", data=json.dumps({"report": report}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        body = json.loads(r.read())
    assert body["model"]["name"] == release.name, body["model"]
    assert body["answer_source"] == "model" and body["tokens"]["completion"] > 20
    assert body["playbook"] is not None and body["gate"]["ok"], (body["stage"], body.get("reason"), body["answer"][:800])
    plays = yaml.safe_load(body["playbook"])
    assert {play.get("hosts") for play in plays} <= set(report["placement"]), body["answer"][:800]
