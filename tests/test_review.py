"""Operator review decisions (serve/review.py), their export as training data
(serve/review_export.py, `remed review`) and the SFT loader's review source (train/data.py
`data.reviews`). A real SQLite file in tmp_path, real processes for the concurrency; no
sandbox (the decisions' reports and playbooks come from tests/data's verified episodes)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_reme.serve.review import (MAX_PLAYBOOK_BYTES, SCHEMA_VERSION, ReviewError, ReviewStore, report_hash)

DATA = Path(__file__).parent / "data"
RECORDS = {json.loads(l)["scenario"]["target"] + ":" + json.loads(l)["scenario"]["fault"]: json.loads(l)
           for l in (DATA / "train-episodes.jsonl").read_text().splitlines() if l.strip()}


def answer(rec: dict, note: str = "Here is the fix.") -> str:
    """A model's answer around a playbook: prose, then a fenced block (what extract reads)."""
    return f"{note}\n\n```yaml\n{rec['playbook'].rstrip()}\n```\n"


def report_of(key: str) -> dict:
    return json.loads(json.dumps(RECORDS[key]["report"]))


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def store(tmp_path):
    s = ReviewStore(tmp_path / "db" / "review.sqlite")
    try:
        yield s
    finally:
        s.close()


def propose(store: ReviewStore, key: str = "frontend:cpu-stress", **kw) -> object:
    args = {"release": "base", "source": "pasted", "report": report_of(key), "playbook": answer(RECORDS[key]),
            "gate": {"ok": True, "rules": []}, "tokens": {"prompt": 900, "completion": 120}, "generate_s": 1.5}
    return store.propose(**{**args, **kw})


# ---- the file ------------------------------------------------------------------------------------

def test_a_new_database_is_private_and_at_the_current_schema(tmp_path):
    path = tmp_path / "a" / "b" / "review.sqlite"
    with ReviewStore(path) as s:
        propose(s)                                   # writes the WAL and its index too
        assert s.schema_version() == SCHEMA_VERSION
        for p in path.parent.iterdir():
            assert mode(p) == 0o600, p
    assert mode(path.parent) == 0o700
    loose = tmp_path / "loose.sqlite"
    loose.touch(mode=0o644)
    os.chmod(loose, 0o644)
    ReviewStore(loose).close()
    assert mode(loose) == 0o600


V1 = """
CREATE TABLE decisions (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    operator TEXT NOT NULL DEFAULT '', release TEXT NOT NULL, source TEXT NOT NULL, sandbox TEXT,
    system TEXT, service TEXT, fault TEXT, report TEXT NOT NULL, playbook TEXT NOT NULL,
    gate TEXT, dry_run TEXT, tokens TEXT, generate_s REAL,
    status TEXT NOT NULL CHECK (status IN ('proposed', 'rejected', 'executing', 'executed', 'interrupted')),
    reason TEXT, verdict TEXT, outcome TEXT);
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, decision_id TEXT NOT NULL REFERENCES decisions(id),
    at REAL NOT NULL, status TEXT NOT NULL, operator TEXT NOT NULL DEFAULT '', note TEXT NOT NULL DEFAULT '');
CREATE INDEX events_by_decision ON events(decision_id, seq);
PRAGMA user_version = 1;
"""


def test_a_version_1_database_made_by_hand_is_migrated_and_keeps_its_decisions(tmp_path):
    path = tmp_path / "old.sqlite"
    rep = report_of("frontend:cpu-stress")
    db = sqlite3.connect(path)
    db.executescript(V1)
    db.execute("INSERT INTO decisions (id, created_at, updated_at, operator, release, source, system, service, fault, "
               "report, playbook, status) VALUES (?, 1.0, 1.0, '', 'old-release', 'pasted', 'boutique', 'frontend', "
               "'cpu-stress', ?, 'old answer', 'proposed')", ("a" * 32, json.dumps(rep)))
    db.execute("INSERT INTO events (decision_id, at, status, note) VALUES (?, 1.0, 'proposed', 'by hand')", ("a" * 32,))
    db.commit()
    db.close()
    with ReviewStore(path) as s:
        assert s.schema_version() == SCHEMA_VERSION == 2
        d = s.get("a" * 32)
        assert (d.release, d.status, d.playbook, d.report) == ("old-release", "proposed", "old answer", rep)
        assert d.report_sha256 == report_hash(rep)          # backfilled by the migration
        assert [e["note"] for e in d.events] == ["by hand"]
        d = s.start_execution(d.id, operator="alice")        # the new columns work on the old row
        assert d.status == "executing"
        indexes = {r[0] for r in s._db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"decisions_by_fault", "decisions_by_report_sha256"} <= indexes
    with ReviewStore(path) as s:                             # opening again changes nothing
        assert s.schema_version() == 2 and s.get("a" * 32).status == "executing"


def test_a_database_newer_than_the_code_or_not_a_database_is_one_clear_error(tmp_path):
    path = tmp_path / "new.sqlite"
    ReviewStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(ReviewError, match=rf"{path}: schema version {SCHEMA_VERSION + 1} is newer than this code.*"
                                          r"upgrade e2e-reme"):
        ReviewStore(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(ReviewError, match=rf"{junk}: not a usable SQLite database"):
        ReviewStore(junk)


# ---- states ------------------------------------------------------------------------------------

def test_a_proposal_takes_its_case_from_the_report_and_moves_only_along_the_allowed_transitions(store):
    d = propose(store, "shippingservice:memory-stress")
    assert (d.status, d.system, d.service, d.fault) == ("proposed", "boutique", "shippingservice", "memory-stress")
    assert d.operator == "" and d.gate == {"ok": True, "rules": []} and d.generate_s == 1.5
    with pytest.raises(ReviewError, match="can become executed only when executing") as e:
        store.finish_execution(d.id, verdict={"success": True}, outcome="success")
    assert e.value.kind == "conflict" and e.value.http_status == 409
    with pytest.raises(ReviewError, match="can become interrupted only when executing"):
        store.interrupt(d.id, reason="x")
    r = store.reject(d.id, operator="  alice  ", reason="restarts the wrong unit")
    assert (r.status, r.operator, r.reason) == ("rejected", "alice", "restarts the wrong unit")
    for call in (lambda: store.start_execution(d.id, operator="bob"),
                 lambda: store.reject(d.id, operator="bob", reason="again")):
        with pytest.raises(ReviewError, match="is rejected"):
            call()
    assert store.get(d.id).status == "rejected" and store.get(d.id).operator == "alice"

    e2 = propose(store)
    store.start_execution(e2.id, operator="bob")
    done = store.finish_execution(e2.id, verdict={"success": True, "checks": [{"name": "slo", "ok": True}]},
                                  outcome="success", result={"stage": "done", "playbook": "- hosts: all\n"})
    assert (done.status, done.outcome, done.operator) == ("executed", "success", "bob")
    assert done.verdict["checks"][0]["name"] == "slo" and done.result["stage"] == "done"
    assert [(e["status"], e["operator"]) for e in done.events] == [("proposed", ""), ("executing", "bob"),
                                                                   ("executed", "bob")]
    assert done.events[0]["at"] <= done.events[1]["at"] <= done.events[2]["at"] == done.updated_at
    assert json.loads(json.dumps(done.to_dict()))["events"][2]["status"] == "executed"

    e3 = propose(store)
    store.start_execution(e3.id, operator="carol")
    i = store.interrupt(e3.id, known={"stage": "execute", "leftovers": []}, reason="server stopped (SIGTERM)")
    assert (i.status, i.reason, i.result, i.outcome) == ("interrupted", "server stopped (SIGTERM)",
                                                         {"stage": "execute", "leftovers": []}, None)

    # What the server records after a run is never refused for its content: the decision must not stay executing.
    e4 = propose(store)
    store.start_execution(e4.id, operator="carol")
    i = store.interrupt(e4.id, known={"workdir": Path("/x"), "obj": object(), "t": float("nan")},
                        reason="stopped\x1b[2J " + "y" * 10_000)
    assert i.status == "interrupted" and len(i.reason) == 4000 and "\x1b" not in i.reason
    assert i.result["workdir"] == "/x" and i.result["t"] == "nan" and i.result["obj"].startswith("<object")
    e5 = propose(store)
    store.start_execution(e5.id, operator="carol")
    f = store.finish_execution(e5.id, verdict={"success": False, "log": "z" * 3_000_000}, outcome="failure")
    assert f.status == "executed" and f.verdict["truncated"] is True and f.verdict["keys"] == ["success", "log"]


def test_bad_values_and_unknown_ids_are_refused_with_the_fix(store):
    for kw, msg in [({"source": "email"}, "source: 'email' is not one of pasted, sandbox"),
                    ({"source": "sandbox"}, "names the sandbox"),
                    ({"sandbox": "Bad Name"}, "sandbox name is 1-31 lowercase"),
                    ({"release": ""}, "release: must not be empty"),
                    ({"release": "a\nb"}, "control characters"),
                    ({"report": ["not", "an", "object"]}, "report: expected a JSON object"),
                    ({"report": {"system": "x", "logs": ["y" * 300_000]}}, r"report: \d+ bytes as JSON, more than 262144"),
                    ({"playbook": "x" * (MAX_PLAYBOOK_BYTES + 1)}, "playbook: more than 409600 bytes"),
                    ({"playbook": None}, "playbook: expected"),
                    ({"gate": {"x": float("nan")}}, "gate: not storable as JSON"),
                    ({"operator": "x" * 65}, "one line of at most 64"),
                    ({"generate_s": -1}, "generate_s")]:
        with pytest.raises(ReviewError, match=msg):
            propose(store, **kw)
    d = propose(store)
    for op in ("", "   ", "eve\nmallory", "eve\x1b[31m", "x" * 65, None):
        with pytest.raises(ReviewError, match="operator"):
            store.start_execution(d.id, operator=op)
    with pytest.raises(ReviewError, match="reason: must not be empty"):
        store.reject(d.id, operator="alice", reason=" ")
    store.start_execution(d.id, operator="alice")
    with pytest.raises(ReviewError, match="outcome: 'great' is not one of success, failure, infra_failure"):
        store.finish_execution(d.id, verdict=None, outcome="great")
    for bad in ("0" * 32, "../../etc/passwd", "", 7):
        with pytest.raises(ReviewError) as e:
            store.reject(bad, operator="alice", reason="no")
        assert e.value.kind == "not_found" and e.value.http_status == 404
        assert store.get(bad) is None
    assert store.count() == 1                                 # nothing refused was written


# ---- several processes ----------------------------------------------------------------------------

def _approve(path: str, rid: str, who: str, barrier, results) -> None:
    store = ReviewStore(path)
    try:
        barrier.wait(timeout=60)
        store.start_execution(rid, operator=who)
        results.put((who, "won"))
    except ReviewError as e:
        results.put((who, f"{e.kind}: {e}"))
    finally:
        store.close()


def _start_and_die(path: str, rid: str) -> None:
    store = ReviewStore(path)
    store.start_execution(rid, operator="ghost")
    os._exit(0)                      # a server killed mid-execution: no interrupt, no close


def test_of_concurrent_approvals_from_several_processes_exactly_one_wins(tmp_path):
    path = tmp_path / "review.sqlite"
    with ReviewStore(path) as s:
        rid = propose(s).id
    ctx = mp.get_context("spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_approve, args=(str(path), rid, f"op{k}", barrier, results)) for k in range(n)]
    try:
        for p in procs:
            p.start()
        got = [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    winners = [w for w, r in got if r == "won"]
    assert len(winners) == 1, got
    assert all(r.startswith("conflict: ") and "is executing" in r for w, r in got if w not in winners), got
    with ReviewStore(path) as s:
        d = s.get(rid)
        assert (d.status, d.operator) == ("executing", winners[0])
        assert [e["status"] for e in d.events] == ["proposed", "executing"]


def test_recover_interrupted_marks_the_runs_of_a_dead_server_and_leaves_live_ones(tmp_path):
    path = tmp_path / "review.sqlite"
    with ReviewStore(path) as s:
        dead, live, idle = propose(s).id, propose(s).id, propose(s).id
        s.start_execution(live, operator="alice")                 # this (live) process runs it
    p = mp.get_context("spawn").Process(target=_start_and_die, args=(str(path), dead))
    p.start()
    p.join(timeout=120)
    assert p.exitcode == 0
    with ReviewStore(path) as s:
        assert s.get(dead).status == "executing"
        got = s.recover_interrupted()
        assert [d.id for d in got] == [dead]
        d = s.get(dead)
        assert (d.status, d.reason, d.operator) == ("interrupted", "server stopped during execution", "ghost")
        assert "no longer running" in d.events[-1]["note"]
        assert s.get(live).status == "executing" and s.get(idle).status == "proposed"
        assert s.recover_interrupted() == []


# ---- the history -------------------------------------------------------------------------------

def test_the_history_filters_pages_and_lists_its_facets(store):
    ids = {}
    for k, (key, release, outcome) in enumerate([("frontend:cpu-stress", "r1", "success"),
                                                 ("frontend:memory-stress", "r1", "failure"),
                                                 ("shippingservice:memory-stress", "r2", "success"),
                                                 ("emailservice:network-loss", "r2", None)]):
        d = propose(store, key, release=release)
        if outcome:
            store.start_execution(d.id, operator="alice")
            store.finish_execution(d.id, verdict={"success": outcome == "success"}, outcome=outcome)
        ids[key] = d.id
    assert [d.id for d in store.list()] == list(reversed(ids.values()))          # newest first
    assert {d.id for d in store.list(fault="memory-stress")} == {ids["frontend:memory-stress"],
                                                                ids["shippingservice:memory-stress"]}
    assert [d.id for d in store.list(fault="memory-stress", outcome="success")] == [ids["shippingservice:memory-stress"]]
    assert [d.id for d in store.list(release="r2", status="proposed")] == [ids["emailservice:network-loss"]]
    assert store.list(release="nope") == [] and store.count(outcome="success") == 2
    assert [d.id for d in store.list(limit=2, offset=1)] == list(reversed(ids.values()))[1:3]
    assert store.facets() == {"faults": ["cpu-stress", "memory-stress", "network-loss"],
                              "outcomes": ["failure", "success"], "releases": ["r1", "r2"],
                              "statuses": ["executed", "proposed"]}
    with pytest.raises(ReviewError, match="status: 'done' is not one of"):
        store.list(status="done")
    with pytest.raises(ReviewError, match="limit"):
        store.list(limit=5000)


# ---- export and the SFT loader --------------------------------------------------------------------

def _test_split_report() -> dict:
    """frontend's cpu-stress report, with frontend and checkoutservice swapped: a consistent
    report of boutique's checkoutservice, a test-split service (configs/splits.yaml)."""
    from e2e_reme.train.data import Rewrite
    return Rewrite({"frontend": "checkoutservice", "checkoutservice": "frontend"}).apply(report_of("frontend:cpu-stress"))


def _history(store: ReviewStore) -> dict:
    """A made-up decision history: who approved, rejected, what the verifier said."""
    fr, sh = RECORDS["frontend:cpu-stress"], RECORDS["shippingservice:memory-stress"]
    h = {}

    def executed(name, key_or_report, text, outcome, **kw):
        rep = report_of(key_or_report) if isinstance(key_or_report, str) else key_or_report
        d = store.propose(release="rel-a", source="pasted", report=rep, playbook=text, **kw)
        store.start_execution(d.id, operator="alice")
        h[name] = store.finish_execution(d.id, verdict={"success": outcome == "success"}, outcome=outcome).id

    def rejected(name, key_or_report, text, release="rel-a"):
        rep = report_of(key_or_report) if isinstance(key_or_report, str) else key_or_report
        d = store.propose(release=release, source="pasted", report=rep, playbook=text)
        h[name] = store.reject(d.id, operator="bob", reason="kills the wrong process").id

    executed("good", "frontend:cpu-stress", answer(fr), "success")
    rejected("rejected", "frontend:cpu-stress", "```yaml\n- hosts: all\n  tasks: []\n```\n", release="rel-b")
    executed("failed", "frontend:cpu-stress", answer(sh, "Try this."), "failure")
    d = store.propose(release="rel-a", source="pasted", report=report_of("frontend:cpu-stress"), playbook="x")
    store.start_execution(d.id, operator="alice")
    h["interrupted"] = store.interrupt(d.id, reason="server stopped", known={"stage": "execute"}).id
    executed("infra", "frontend:cpu-stress", "```yaml\n- hosts: n0\n  tasks: []\n```\n", "infra_failure")
    h["open"] = store.propose(release="rel-a", source="pasted", report=report_of("frontend:cpu-stress"),
                              playbook="undecided").id
    later = {**report_of("frontend:cpu-stress"), "created_at": 12345.0}      # the same report, pasted again later
    rejected("rejected-later", later, answer(fr, "Same fix, but the operator said no."))
    executed("alone", "shippingservice:memory-stress", answer(sh), "success")
    executed("test-split", _test_split_report(), answer(fr), "success")
    rejected("test-split-no", _test_split_report(), "no playbook here")
    return h


def test_export_gives_the_expected_pairs_and_demonstrations_of_a_decision_history(store, tmp_path):
    from e2e_reme.serve.review_export import export_reviews
    h = _history(store)
    out = tmp_path / "export"
    m = export_reviews(store, out)
    pairs = [json.loads(l) for l in (out / "preferences.jsonl").read_text().splitlines()]
    got = {(p["ids"]["chosen"], p["ids"]["rejected"]) for p in pairs}
    assert got == {(h["good"], h["rejected"]), (h["good"], h["failed"]), (h["good"], h["rejected-later"]),
                   (h["test-split"], h["test-split-no"])}
    by = {p["ids"]["rejected"]: p for p in pairs}
    p = by[h["rejected"]]
    assert p["chosen"] == store.get(h["good"]).playbook and p["rejected"] == store.get(h["rejected"]).playbook
    assert p["release"] == {"chosen": "rel-a", "rejected": "rel-b"} and p["split"] == "train"
    assert p["rejected_why"] == "rejected by bob: kills the wrong process"
    assert by[h["failed"]]["rejected_why"] == "executed; the verifier judged it a failure"
    assert [m_["role"] for m_ in p["prompt"]] == ["system", "user"] and "frontend" in p["prompt"][1]["content"]
    assert by[h["test-split-no"]]["split"] == "test" and by[h["test-split-no"]]["service"] == "checkoutservice"

    demos = [json.loads(l) for l in (out / "demonstrations" / "episodes.jsonl").read_text().splitlines()]
    assert {d["review"]["decision"] for d in demos} == {h["good"], h["alone"], h["test-split"]}
    good = next(d for d in demos if d["review"]["decision"] == h["good"])
    assert good["playbook"].strip() == RECORDS["frontend:cpu-stress"]["playbook"].strip()   # extracted from the answer
    assert (good["policy"], good["outcome"], good["scenario"]["target"], good["scenario"]["fault"]) == \
        ("review", "success", "frontend", "cpu-stress")
    from e2e_reme.simulators.episode import EpisodeRecord
    assert set(good) - {"review"} == set(EpisodeRecord.__dataclass_fields__)      # the episode schema, plus provenance
    assert (m["decisions"], m["preference_pairs"], m["demonstrations"]) == (10, 4, 3)
    assert m["skipped"] == {"infrastructure failure (not the playbook's fault)": 1,
                            "interrupted (never verified)": 1, "still proposed (no decision yet)": 1,
                            "report without a rejected answer": 1}
    assert m["demonstrations_by_split"] == {"test": 1, "train": 2}
    assert json.loads((out / "manifest.json").read_text())["db"] == str(store.path.resolve())


def test_the_sft_loader_takes_review_demonstrations_and_refuses_test_split_ones(store, tmp_path):
    from e2e_reme.serve.review_export import export_reviews
    from e2e_reme.train.data import AugmentConfig, DataConfig, build_sft_data, answer_text
    from e2e_reme.train.errors import TrainError
    from e2e_reme.train.splits import load_splits
    h = _history(store)
    out = tmp_path / "export"
    export_reviews(store, out)
    cfg = DataConfig(episodes=(), reviews=(str(out),), augment=AugmentConfig(copies=2))
    data = build_sft_data(cfg)
    assert data.traces == data.reviews == 2
    assert data.skipped["review of a validation/test system or service"] == 1
    assert [r["review"]["decision"] for r in data.held_out] == [h["test-split"]]
    originals = {e.meta["episode"]: e for e in data.train if e.meta["copy"] == 0}
    assert set(originals) == {f"review-{h['good']}", f"review-{h['alone']}"}
    good = originals[f"review-{h['good']}"]
    assert good.answer == answer_text(RECORDS["frontend:cpu-stress"]["playbook"])
    splits = load_splits()
    names = {*splits.held_out_services(), *splits.held_out_systems()}
    for ex in data.train:                                    # the leak check of tests/test_splits.py, for reviews
        assert splits.split_of(ex.meta["system"], ex.meta["service"]) == "train"
        if ex.meta["copy"]:
            assert not {n.lower() for n in ex.meta["rewrite"]["names"].values()} & {n.lower() for n in names}

    # A demonstration whose record claims a train service while its report names a test one is held out too.
    demo = out / "demonstrations" / "episodes.jsonl"
    recs = [json.loads(l) for l in demo.read_text().splitlines()]
    for r in recs:
        if r["review"]["decision"] == h["test-split"]:
            r["scenario"]["target"] = "frontend"
    demo.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert build_sft_data(cfg).skipped["review of a validation/test system or service"] == 1

    # Reviews are a source only where data.reviews names them: among the episodes they are not traces.
    only = build_sft_data(DataConfig(episodes=(str(DATA / "train-episodes.jsonl"), str(out)),
                                     augment=AugmentConfig(copies=0)))
    assert only.reviews == 0 and only.skipped["not a verified trace"] == 3
    with pytest.raises(TrainError, match="is not a review export.*remed review export"):
        build_sft_data(DataConfig(episodes=(), reviews=(str(tmp_path / "nothing"),)))


# ---- the CLI ---------------------------------------------------------------------------------------

def remed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "remed"), *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_the_review_cli_lists_shows_as_text_and_exports(store, tmp_path):
    h = _history(store)
    hostile = store.propose(release="rel-a", source="pasted", report=report_of("frontend:cpu-stress"),
                            playbook="[bold red]not markup[/] \x1b[2J\x1b]0;title\x07 </script>")
    db = str(store.path)
    res = remed("review", "ls", "--db", db, "--fault", "cpu-stress", "--outcome", "success")
    assert res.returncode == 0, res.stderr
    assert h["good"] in res.stdout and h["alone"] not in res.stdout and h["rejected"] not in res.stdout
    res = remed("review", "show", hostile.id, "--db", db)
    assert res.returncode == 0, res.stderr
    assert "[bold red]not markup[/]" in res.stdout and "\x1b" not in res.stdout and "\\x1b[2J" in res.stdout
    res = remed("review", "show", "f" * 32, "--db", db)
    assert res.returncode == 2 and "is not in" in res.stderr and "remed review ls" in res.stderr
    res = remed("review", "export", "--db", db, "--out", str(tmp_path / "x"))
    assert res.returncode == 0, res.stderr
    assert "4 preference pair(s), 3 verified demonstration(s)" in res.stdout
    assert json.loads((tmp_path / "x" / "manifest.json").read_text())["demonstrations"] == 3
    res = remed("review", "ls", "--db", str(tmp_path / "missing.sqlite"))
    assert res.returncode == 2 and "no such file" in res.stderr and not (tmp_path / "missing.sqlite").exists()
