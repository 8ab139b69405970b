"""The jail's outputs on the host, and the extraction of a playbook from an answer (issue 28,
families 5 and 6).

A playbook owns the jail's scratch space: a task that runs on the controller (here by
`delegate_to: localhost`, as if the gate had let it through; docs/containment.md) writes
there as the jailed user. What it leaves there is hostile to the host: a sparse file of
gigabytes, a directory tree thousands deep, tens of thousands of files, links to host
files, FIFOs, a full scratch space. The host reads back only data at fixed places, bounded,
never following a link nor opening anything but a regular file (controller.py, "the
results"); what passes a limit is the run's `output_limit`, the policy's failure with the
reason, and the leftover sweep and the verdict still run.

`extract_yaml` runs in linear time: the worst shapes found, near the answer size limit,
each under a second of CPU.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import pytest
import yaml

from e2e_reme.simulators import create_sandbox
from e2e_reme.simulators.playbook import execution
from e2e_reme.simulators.playbook.execution import MAX_ANSWER_CHARS, extract_yaml, run_pipeline
from e2e_reme.simulators.playbook.gate import GateResult
from e2e_reme.simulators.sandbox.controller import MAX_EVENT_FILES, JailJob, run_jailed

RUN = "/jail/pdd/artifacts/run"
SMALL = 2 << 20          # what the host may keep of one run, in real bytes, here at most


@pytest.fixture(scope="module")
def deployed(image):
    """One sandbox for the module: simple-micro deployed, for the episode at the end."""
    from e2e_reme.simulators.systems.deploy import deploy, wait_healthy
    with create_sandbox("nspawn", nodes=1, name=f"pt-jout-{secrets.token_hex(2)}") as s:
        dep = deploy(s, "simple-micro")
        s.checkpoint()
        wait_healthy(s, dep)
        yield s, dep


@pytest.fixture(scope="module")
def sb(deployed):
    return deployed[0]


@pytest.fixture
def no_gate(monkeypatch):
    """The gate refuses every controller-side task it recognises; it is defence in depth,
    not the boundary, so these attacks run as if it had missed them."""
    monkeypatch.setattr(execution, "check_text", lambda *a, **k: GateResult(True))
    monkeypatch.setattr(execution, "check_playbook", lambda *a, **k: GateResult(True))


def in_jail(*cmds: str, node_cmd: str = "true") -> str:
    """An answer whose first tasks run in the jail (the controller), then one on n0."""
    tasks = [{"name": f"jail {i}", "shell": c, "delegate_to": "localhost"} for i, c in enumerate(cmds)]
    tasks.append({"name": "on the node", "shell": node_cmd})
    play = [{"hosts": "n0", "gather_facts": False, "tasks": tasks}]
    return "```yaml\n" + yaml.safe_dump(play, sort_keys=False) + "```\n"


def real_bytes(d: Path) -> tuple[int, int]:
    """(real bytes on disk, largest apparent size) of everything under d."""
    blocks, largest = 0, 0
    for dirpath, dirs, files in os.walk(d):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            blocks += st.st_blocks * 512
            largest = max(largest, st.st_size)
    return blocks, largest


# ---- family 5: output bombs in the jail ---------------------------------------------------------

DEEP = "mkdir -p " + "d/" * 1500      # 3000 characters of path, 1500 levels: more than Python's recursion limit

BOMBS = {
    "a sparse event file": ([f"truncate -s 50G {RUN}/job_events/99999-x.json {RUN}/big /jail/out/big /jail/tmp/big"],
                            "sparse"),
    "a deep tree among the events": ([f"mkdir {RUN}/job_events/9-deep.json && cd {RUN}/job_events/9-deep.json && "
                                      + f"{DEEP} && cd {RUN} && {DEEP}"], "not a regular file"),
    "many event files": ([f"cd {RUN}/job_events && seq 1 {MAX_EVENT_FILES + 5000} | sed 's/$/-x.json/' | xargs touch"],
                         f"more than {MAX_EVENT_FILES} entries"),
    "a full scratch space": (["dd if=/dev/zero of=/jail/tmp/fill bs=1M count=100 || true"], "filled the jail's scratch"),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_an_output_bomb_is_the_policys_failure_and_the_sweep_still_runs(sb, tmp_path, no_gate, bomb):
    cmds, words = BOMBS[bomb]
    t0 = time.monotonic()
    out = run_pipeline(in_jail(*cmds, node_cmd="setsid -f sleep 300"), sandbox=sb, workdir=tmp_path, timeout_s=60)
    assert (out.stage, out.error_class) == ("execute", "ExecutionFailed"), out.reason
    assert out.run.status == "output_limit" and words in out.reason and "limits" in out.reason, out.reason
    assert out.to_dict()["run"]["status"] == "output_limit"
    # The sweep ran after the run: the process the playbook left in the node was ended.
    assert any("sleep 300" in x["cmdline"] for x in out.leftovers), out.leftovers
    blocks, largest = real_bytes(tmp_path)
    assert blocks < SMALL and largest < SMALL, (blocks, largest)
    assert time.monotonic() - t0 < 90


def test_a_deep_tree_and_a_sparse_file_outside_the_results_are_never_looked_at(sb, tmp_path, no_gate):
    out = run_pipeline(in_jail(f"cd {RUN} && {DEEP} && truncate -s 50G {RUN}/d/huge /jail/home/huge"),
                       sandbox=sb, workdir=tmp_path, timeout_s=60)
    assert (out.stage, out.ok, out.run.status) == ("done", True, "successful"), out.reason
    assert real_bytes(tmp_path)[0] < SMALL
    assert (tmp_path / "ansible" / "artifacts" / "run" / "status").read_text() == "successful\n"


@pytest.fixture
def secret():
    p = Path(f"/tmp/remed-jout-secret-{secrets.token_hex(4)}")
    p.write_text(f"host secret {secrets.token_hex(8)}\n")
    yield p
    p.unlink(missing_ok=True)


def test_links_and_fifos_in_the_results_are_neither_followed_nor_opened(sb, tmp_path, secret):
    """Links to a host file where the host reads results, FIFOs where it would block."""
    text = yaml.safe_dump([{"hosts": "n0", "gather_facts": False, "tasks": [
        {"shell": f"ln -sf {secret} /jail/out/syntax.out && ln -s {secret} {RUN}/job_events/99998-x.json "
                  f"&& mkfifo {RUN}/job_events/99999-y.json && ln -sf {secret} /jail/out/run.done "
                  f"&& rm -f {RUN}/stdout && mkfifo {RUN}/stdout", "delegate_to": "localhost"}]}], sort_keys=False)
    t0 = time.monotonic()
    jail = run_jailed(sb, text, tmp_path, JailJob(timeout_s=60))
    assert not jail.error and jail.run is not None, jail.error
    assert time.monotonic() - t0 < 60
    assert jail.run.status == "output_limit" and "not a regular file" in jail.output_limit
    hidden = secret.read_text().strip()
    kept = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    assert kept and not any(hidden in k for k in kept)
    assert hidden not in jail.syntax_output + jail.run.stdout + json.dumps(jail.run.events)
    assert jail.marks.get("run", 0) > jail.marks["syntax"] > jail.marks["started"]   # root's marks, not the link


def test_what_the_host_judges_by_is_the_jails_root_not_the_playbooks(sb, tmp_path, no_gate):
    """The playbook's tasks on the controller run as the user that owns the run's record;
    the exit statuses and times the host judges by are written by the container's root.
    Removing or forging what it can reach once made the run look like our failure."""
    forge = ("rm -rf /jail/out/* && date +%s > /jail/out/rerun.done && echo 1 > /jail/out/syntax.rc; "
             "echo 0 > /jail/mark/run.rc; date +%s > /jail/mark/rerun.done; ls -ld /jail/mark")
    out = run_pipeline(in_jail(forge), sandbox=sb, workdir=tmp_path, timeout_s=60)
    assert (out.stage, out.ok, out.error_class) == ("done", True, None), out.reason
    assert out.run.status == "successful" and out.rerun is None


# ---- the same through the episode path ----------------------------------------------------------

def test_an_output_bomb_in_an_episode_is_judged_not_an_infrastructure_failure(deployed, tmp_path, no_gate):
    from e2e_reme.simulators.episode import EpisodeConfig, Scenario, run_episode
    from e2e_reme.simulators.faults import injected_faults
    from e2e_reme.simulators.policies import FixedPolicy
    s, dep = deployed
    answer = in_jail(f"mkdir {RUN}/job_events/9-deep.json && cd {RUN}/job_events/9-deep.json && {DEEP}",
                     f"truncate -s 50G {RUN}/job_events/99999-x.json", node_cmd="setsid -f sleep 300")
    rec = run_episode(s, dep, Scenario("simple-micro", "cpu-stress", "time-service", seed=1), FixedPolicy(answer),
                      out_dir=tmp_path, config=EpisodeConfig(verify_load=False, settle_timeout_s=10))
    assert (rec.outcome, rec.stage, rec.error_class) == ("failure", "execute", "ExecutionFailed"), rec.reason
    assert "limits" in rec.reason
    execution_rec = rec.trials[-1]["execution"]
    assert execution_rec["run"]["status"] == "output_limit"
    assert any("sleep 300" in x["cmdline"] for x in execution_rec["leftovers"])    # the sweep ran
    assert rec.verdict is not None and rec.verdict["judged"] and not rec.verdict["success"]   # and the verdict
    assert (tmp_path / rec.id / "verdict.json").is_file() and not (tmp_path / rec.id / "traceback.txt").exists()
    assert real_bytes(tmp_path)[0] < 2 * SMALL
    assert not injected_faults(s)


# ---- family 6: extraction in linear time ---------------------------------------------------------

PLAY = "- hosts: n0\n  gather_facts: false\n  tasks:\n    - ansible.builtin.ping: {}\n"


def _fill(unit: str, room: int = MAX_ANSWER_CHARS - 200) -> str:
    return unit * (room // len(unit))


WORST = {
    "unclosed think tags": _fill("<think>"),
    "unclosed think tags on lines": _fill("<think>\n"),
    "nested think tags": _fill("<think><THINK></think>"),
    "stray closing tags": _fill("</think>"),
    "one line of backticks": _fill("`"),
    "one line of tildes": _fill("~"),
    "backticks then a newline": _fill("`") + "\n",
    "many empty fences": _fill("```\n"),
    "many yaml fences": _fill("```yaml\n- a\n```\n"),
    "fence and tilde alternating": _fill("```\n~~~\n"),
    "fences of growing length": "".join("`" * k + "\n" for k in range(3, 880)),
    "crlf fences": _fill("```yaml\r\n- a\r\n"),
    "one line of spaces": _fill(" ") + "x",
    "spaces and tabs under a fence": "```\n" + _fill(" \t\n  \n"),
    "a long info string": "```" + _fill("y") + "\n",
    "think tags inside fences": _fill("```\n<think>\n"),
    "a yaml list": _fill("- a\n"),
    "a fenced yaml list": "```yaml\n" + _fill("- a\n") + "```\n",
    "nested sequences (slow YAML)": _fill("- - - - - -\n"),
    "16 fenced nested sequences": "".join("```\n" + _fill("- - - - - -\n", MAX_ANSWER_CHARS // 16 - 20) + "```\n"
                                          for _ in range(16)),
    "plays": _fill(PLAY),
    "flow brackets": _fill("["),
}


@pytest.mark.parametrize("shape", list(WORST))
def test_extraction_is_linear_on_the_worst_shapes(shape):
    text = WORST[shape]
    assert MAX_ANSWER_CHARS - 20_000 < len(text) <= MAX_ANSWER_CHARS
    t0 = time.process_time()
    extract_yaml(text)
    assert time.process_time() - t0 < 1.0


@pytest.mark.parametrize("text, expected", [
    (f"<think>a <think> b</think> c</think>\n```yaml\n{PLAY}```", PLAY),     # the first </think> ends it
    (f"<think>x</think><think>\n```yaml\n{PLAY}```", None),                  # cut off while thinking
    (f"```yaml\r\n{PLAY.replace(chr(10), chr(13) + chr(10))}```\r\nDone.", PLAY.replace("\n", "\r\n")),
    (f"````yaml\n{PLAY}```\n````\n", PLAY + "```\n"),                        # only the same fence closes
    (f"~~~yml\n{PLAY}~~~~\n~~~", PLAY + "~~~~\n"),
])
def test_extraction_keeps_its_rules(text, expected):
    assert extract_yaml(text) == expected
