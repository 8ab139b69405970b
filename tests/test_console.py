"""The review console (/ui) in a REAL headless browser (Debian's chromium driven by
Playwright, nothing downloaded) against a REAL `remed serve` of the imported base model
with a REAL sandbox: paste a report, see the model's proposal and the gate's verdict,
approve with the token, see the verifier's verdict, find it in the history; untrusted
playbooks render inert; approving without the token or from another origin is refused;
a bad report is one message; SIGTERM mid-execution leaves the decision interrupted in the
database and the sandbox clean. One server for the module; the SIGTERM test ends it, last.

Screenshots of each view: runs/test-artifacts/console/*.png."""

from __future__ import annotations

import http.server
import json
import os
import secrets
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from serving import serve_process, wait_for
from e2e_reme.serve.review import ReviewStore
from e2e_reme.simulators.sandbox import controller, lease

playwright = pytest.importorskip("playwright.sync_api", reason="`make setup` installs playwright")

CHROMIUM = "/usr/bin/chromium"
EPISODES = Path(__file__).parent / "data" / "train-episodes.jsonl"
REPORT = json.loads(EPISODES.read_text().splitlines()[0])["report"]
TOKEN = secrets.token_urlsafe(24)
ARTIFACTS = Path(os.environ.get("REMED_TEST_ARTIFACTS", "runs/test-artifacts")) / "console"
SLOW = 300_000          # ms: the model writes on two shared cores


def playbook(task: str, name: str = "the task") -> str:
    return f"```yaml\n- hosts: n0\n  gather_facts: false\n  tasks:\n  - name: {name}\n    {task}\n```"


def marker(path: str) -> str:
    return playbook(f"ansible.builtin.file:\n      path: {path}\n      state: touch", "leave a mark")


@pytest.fixture(scope="module", autouse=True)
def browser_present():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` (`make setup` does)")


@pytest.fixture(scope="module")
def sandbox(image):
    """A one-node sandbox with simple-micro deployed and a baseline recorded."""
    from e2e_reme.simulators import create_sandbox
    from e2e_reme.simulators.systems.deploy import deploy
    from e2e_reme.simulators.verification.verifier import record_baseline
    with create_sandbox("nspawn", nodes=1, name=f"pt-con-{secrets.token_hex(2)}") as sb:
        record_baseline(sb, deploy(sb, "simple-micro"))
        yield sb


@pytest.fixture(scope="module")
def served(sandbox, tmp_path_factory):
    """`remed serve` of the imported Gemma (trimmed vocabulary), execute enabled for pt-con-*,
    the console's operator answers on (for the tests that need a given playbook)."""
    from e2e_reme.serve.launch import free_port
    from e2e_reme.train.pretrained import import_model
    model = import_model(trim_vocab=16384).path
    tmp = tmp_path_factory.mktemp("console")
    (tmp / "token").write_text(TOKEN + "\n")
    (tmp / "token").chmod(0o600)
    port = free_port()
    cfg = {"model": str(model), "port": port, "token_file": str(tmp / "token"), "sandboxes": ["pt-con-*"],
           "exec_timeout_s": 120, "verify_load": False, "workdir": str(tmp / "work"),
           "review_db": str(tmp / "review.sqlite"), "review_answers": True, "max_tokens": 16,
           "max_batch_size": 1, "replica_cpus": 0.5}
    (tmp / "serve.yaml").write_text(yaml.safe_dump(cfg))
    with serve_process(tmp / "serve.yaml", port) as server:
        yield {**server, "db": tmp / "review.sqlite"}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def page(browser, served):
    """A page logged in to the console (through its login form)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(served["url"] + "/ui/history")
    assert "/ui/login" in pg.url                     # reading needs a login (review_public_read is off)
    pg.fill("#login-token", TOKEN)
    pg.click("button[type=submit]")
    pg.wait_for_url("**/ui/history")
    yield pg
    ctx.close()


def shot(pg, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / f"{name}.png"
    pg.screenshot(path=str(out), full_page=True)
    return out


def propose(pg, served, *, report: str, sandbox: str | None = None, answer: str | None = None,
            operator: str = "alice") -> str:
    """Through the new-incident form; the decision's id."""
    pg.goto(served["url"] + "/ui")
    pg.fill("#report", report)
    if sandbox:
        pg.select_option("#sandbox", sandbox)
    if answer:
        pg.fill("#answer", answer)
    pg.fill("#operator", operator)
    pg.click("#propose-button")
    pg.wait_for_url("**/ui/decisions/*", timeout=SLOW)
    return pg.url.rsplit("/", 1)[1]


def node_has(sb, path: str) -> bool:
    return sb.exec(f"test -e {path} && echo yes || echo no", node=0, timeout=30).stdout.strip() == "yes"


def store(served) -> ReviewStore:
    return ReviewStore(served["db"])


# ---- the main flow ---------------------------------------------------------------------------------

def test_a_pasted_report_gets_the_models_proposal_with_gate_dry_run_tokens_and_time(page, served, sandbox):
    shot(page, "history-empty")
    page.goto(served["url"] + "/ui")
    shot(page, "new-incident")
    did = propose(page, served, report=json.dumps(REPORT, indent=2), sandbox=sandbox.name)
    shot(page, "proposal-model")
    d = store(served).get(did)
    assert d.status == "proposed" and d.source == "sandbox" and d.sandbox == sandbox.name
    assert d.release.startswith("gemma3-270m") and d.operator == "alice"
    assert d.tokens["prompt"] > 100 and 0 < d.tokens["completion"] <= 16 and d.generate_s > 0
    assert d.dry_run["answer_source"] == "model"
    # What the page shows is what the store holds: the model's tokens, the dry-run's stage.
    cost = page.inner_text("#cost")
    assert f"{d.tokens['prompt']} prompt + {d.tokens['completion']} completion" in cost
    assert f"stage {d.dry_run['stage']}" in page.inner_text("#dry-run")
    assert page.inner_text("#status") == "proposed"
    # Regenerate: another sample of the same report, a new decision at its own URL.
    page.click("#regenerate")
    page.wait_for_url(lambda u: "/ui/decisions/" in u and did not in u, timeout=SLOW)
    again = store(served).get(page.url.rsplit("/", 1)[1])
    assert again.report == d.report and again.sandbox == d.sandbox and again.status == "proposed"
    assert again.dry_run["temperature"] == 0.8 and again.dry_run["seed"] is not None and again.tokens["completion"] > 0


def test_approve_with_the_token_executes_and_shows_the_verdict_then_the_history_finds_it(page, served, sandbox):
    mark = f"/tmp/con-exec-{secrets.token_hex(3)}"
    did = propose(page, served, report=json.dumps(REPORT), sandbox=sandbox.name, answer=marker(mark))
    assert "passed" in page.inner_text("#gate")
    assert "syntax check: passed" in page.inner_text("#dry-run")          # in the sandbox's jail
    assert "leave a mark" in page.inner_text("#playbook")
    shot(page, "proposal")
    page.fill("#approve-token", TOKEN)
    page.fill("#approve-operator", "bob")
    page.click("#approve-button")
    page.wait_for_selector("#progress-box:not([hidden])")                   # live progress while it runs
    page.wait_for_selector("#verdict", timeout=SLOW)
    shot(page, "verdict")
    assert page.inner_text("#status") == "executed"
    assert node_has(sandbox, mark)
    d = store(served).get(did)
    assert d.status == "executed" and d.operator == "bob" and d.outcome in ("success", "failure")
    assert d.verdict["judged"] and {c["name"] for c in d.verdict["checks"]} >= {"fault_gone", "services"}
    for c in d.verdict["checks"]:            # the page shows each check as the verifier judged it
        assert ("passed" if c["passed"] else "failed") in page.inner_text(f"tr[data-check='{c['name']}']")
    assert ("remediated" if d.verdict["success"] else "not remediated") in page.inner_text("#verdict-line")
    assert TOKEN not in page.content()
    page.goto(served["url"] + f"/ui/history?outcome={d.outcome}")
    row = page.locator(f"tr[data-id='{did}']")
    assert row.count() == 1 and "bob" in row.inner_text() and d.outcome in row.inner_text()
    shot(page, "history")
    row.locator("a").click()
    page.wait_for_url(f"**/ui/decisions/{did}")            # its stable URL


def test_reject_records_the_operator_and_reason(page, served, sandbox):
    did = propose(page, served, report=json.dumps(REPORT), sandbox=sandbox.name, answer=marker("/tmp/never"))
    page.fill("#reject-operator", "carol")
    page.fill("#reject-reason", "touches the wrong file")
    page.click("#reject-button")
    page.wait_for_selector("#rejected")
    d = store(served).get(did)
    assert (d.status, d.operator, d.reason) == ("rejected", "carol", "touches the wrong file")
    assert not node_has(sandbox, "/tmp/never")


# ---- untrusted text --------------------------------------------------------------------------------

HOSTILE = ("</script><script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">"
           "<b id=injected>bold</b>")


def test_a_playbook_with_html_and_script_renders_as_inert_text(page, served):
    answer = playbook("ansible.builtin.debug:\n      msg: '" + HOSTILE.replace("'", "''") + "'",
                      name=json.dumps(HOSTILE))
    did = propose(page, served, report=json.dumps({**REPORT, "symptoms": [HOSTILE]}), answer=answer)
    shot(page, "hostile-playbook")
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.locator("#injected").count() == 0 and page.locator("main img").count() == 0
    assert "</script><script>window.pwned=1</script>" in page.inner_text("#playbook")    # shown, as text
    assert HOSTILE in page.text_content("#answer-raw")
    assert HOSTILE in page.inner_text(".symptoms")
    page.goto(served["url"] + "/ui/history")
    assert page.evaluate("typeof window.pwned") == "undefined" and page.locator("#injected").count() == 0
    assert store(served).get(did).playbook == answer


def test_the_gate_names_its_rule_and_the_line(page, served, sandbox):
    answer = playbook("ansible.builtin.command: rm -rf /", "wipe")
    propose(page, served, report=json.dumps(REPORT), sandbox=sandbox.name, answer=answer)
    gate = page.inner_text("#gate")
    assert "refused" in gate and "destructive_delete" in gate and "task 'wipe'" in gate and "line 4" in gate
    assert page.locator("#approve").count() == 0                 # a refused playbook cannot be approved
    shot(page, "gate-refused")


# ---- refusals --------------------------------------------------------------------------------------

def test_a_sandbox_with_an_active_fault_has_its_report_observed_into_the_form(page, served, sandbox):
    from e2e_reme.simulators.faults import make_fault, recover_all
    from e2e_reme.simulators.systems.deploy import load_deployment
    dep = load_deployment(sandbox)
    make_fault("pod-fail", dep.targets["hello-service"], dep.targets, seed=3).inject(sandbox)
    try:
        page.goto(served["url"] + "/ui")
        assert "pod-fail" in page.inner_text("#sandbox")           # the picker names the active fault
        page.select_option("#sandbox", sandbox.name)
        page.click("#observe")
        assert wait_for(lambda: page.input_value("#report"), SLOW / 1000, 0.5), page.inner_text("body")[-500:]
        report = json.loads(page.input_value("#report"))
        assert report["system"] == "simple-micro" and report["service"] == "hello-service"
        assert report["fault_kind"] == "pod-fail" and report["level"] == "full" and report["symptoms"]
        shot(page, "observed")
    finally:
        recover_all(sandbox)
    page.goto(served["url"] + "/ui")                                # no fault left: one clear refusal
    page.select_option("#sandbox", sandbox.name)
    page.click("#observe")
    page.wait_for_selector("#error:not([hidden])")
    assert "no active fault" in page.inner_text("#error")


def test_a_bad_report_is_one_clear_message_on_the_page(page, served):
    page.goto(served["url"] + "/ui")
    for text, says in (("{\"system\": ", "not valid JSON"),
                       (json.dumps({**REPORT, "level": "everything"}), "report.level")):
        page.fill("#report", text)
        page.click("#propose-button")
        page.wait_for_selector("#error:not([hidden])")
        msg = page.inner_text("#error")
        assert says in msg and "Traceback" not in msg and len(msg.splitlines()) == 1, msg
        assert page.url.endswith("/ui")
    shot(page, "bad-report")


def test_approve_with_a_wrong_token_is_refused_and_runs_nothing(page, served, sandbox):
    mark = f"/tmp/con-wrong-{secrets.token_hex(3)}"
    did = propose(page, served, report=json.dumps(REPORT), sandbox=sandbox.name, answer=marker(mark))
    page.fill("#approve-token", "not-the-token-" + "x" * 20)
    page.fill("#approve-operator", "mallory")
    page.click("#approve-button")
    page.wait_for_selector("#error:not([hidden])")
    assert "token is wrong" in page.inner_text("#error")
    assert store(served).get(did).status == "proposed" and not node_has(sandbox, mark)


def _headers(served, page, **extra) -> dict:
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    csrf = page.get_attribute("body", "data-csrf")
    return {"Content-Type": "application/json", "Origin": served["url"], "X-Remed-Console": "1",
            "X-CSRF-Token": csrf, "Cookie": f"remed_console={cookies['remed_console']}", **extra}


def _post(url: str, body: dict, headers: dict) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("what, change, status, says", [
    ("no token", {"Authorization": None}, 401, "execute token"),
    ("another origin", {"Origin": "http://evil.example"}, 403, "cross-origin"),
    ("no origin or referer", {"Origin": None}, 403, "neither Origin nor Referer"),
    ("no console header", {"X-Remed-Console": None}, 403, "X-Remed-Console"),
    ("a stale CSRF token", {"X-CSRF-Token": "0" * 64}, 403, "CSRF"),
])
def test_approve_without_the_token_or_from_elsewhere_is_refused(page, served, sandbox, what, change, status, says):
    mark = f"/tmp/con-csrf-{secrets.token_hex(3)}"
    did = propose(page, served, report=json.dumps(REPORT), sandbox=sandbox.name, answer=marker(mark))
    headers = _headers(served, page, Authorization=f"Bearer {TOKEN}")
    for k, v in change.items():
        headers.pop(k) if v is None else headers.__setitem__(k, v)
    got, text = _post(f"{served['url']}/ui/api/decisions/{did}/approve", {"operator": "eve"}, headers)
    assert got == status and says in text, text
    assert store(served).get(did).status == "proposed" and not node_has(sandbox, mark)


def test_a_page_of_another_origin_cannot_approve_even_with_the_token(browser, page, served, sandbox):
    """A real cross-origin page in the same browser (which holds the console's cookie)."""
    mark = f"/tmp/con-xo-{secrets.token_hex(3)}"
    did = propose(page, served, report=json.dumps(REPORT), sandbox=sandbox.name, answer=marker(mark))
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        other = page.context.new_page()
        other.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
        results = other.evaluate("""async ([url, token]) => {
            const out = [];
            for (const init of [
                {method: "POST", credentials: "include", body: JSON.stringify({operator: "evil"}),
                 headers: {"Content-Type": "application/json", "X-Remed-Console": "1",
                           "Authorization": "Bearer " + token}},
                {method: "POST", credentials: "include", mode: "no-cors", body: '{"operator": "evil"}',
                 headers: {"Content-Type": "text/plain"}}]) {
              try { const r = await fetch(url, init); out.push(r.type + ":" + r.status); }
              catch (e) { out.push("blocked"); }
            }
            return out;
        }""", [f"{served['url']}/ui/api/decisions/{did}/approve", TOKEN])
        other.close()
    finally:
        evil.shutdown()
    assert results[0] == "blocked", results             # the preflight is never answered
    time.sleep(1)
    assert store(served).get(did).status == "proposed" and not node_has(sandbox, mark)


def test_reading_needs_a_login_and_every_page_sends_the_security_headers(served, page):
    for path in ("/ui/history", "/ui/api/decisions/" + "0" * 32):
        req = urllib.request.Request(served["url"] + path)
        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(req, timeout=30) as r:
                got, headers = r.status, r.headers
        except urllib.error.HTTPError as e:
            got, headers = e.code, e.headers
        assert got in (303, 401), (path, got)
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
    cookie = next(c for c in page.context.cookies() if c["name"] == "remed_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None


# ---- SIGTERM mid-execution (last: it ends the module's server) -----------------------------------------

def test_sigterm_mid_execution_records_the_decision_as_interrupted_and_cleans_the_sandbox(page, served, sandbox):
    did = propose(page, served, report=json.dumps(REPORT), sandbox=sandbox.name,
                  answer=playbook("ansible.builtin.command: sleep 6137", "wait"))
    page.fill("#approve-token", TOKEN)
    page.fill("#approve-operator", "dave")
    page.click("#approve-button")
    assert wait_for(lambda: sandbox.exec("pgrep -x sleep -a | grep -q ' 6137$'", timeout=20).rc == 0, 120), \
        "the execution never started"
    assert store(served).get(did).status == "executing"
    shot(page, "executing")
    served["proc"].send_signal(signal.SIGTERM)
    assert served["proc"].wait(timeout=180) == 0, served["log"].read_text()[-3000:]
    d = store(served).get(did)
    assert d.status == "interrupted" and d.operator == "dave", d
    assert "shutting down" in d.reason and d.result["interrupted"]
    assert any(x["cmdline"].strip() == "sleep 6137" for x in d.result["execution"]["leftovers"]), d.result
    assert lease.holder(sandbox.name) is None
    assert not any(f"--machine={controller.machine(sandbox.record.number)}" in argv
                   for argv in controller._jail_processes().values())
    assert sandbox.exec("pgrep -x sleep -a | grep -q ' 6137$'", timeout=20).rc != 0
