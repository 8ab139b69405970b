"""From a model's answer to an executed playbook, one recorded stage at a time.

A policy answers with text; what runs against the sandbox is whatever playbook that text
holds, if it holds one, if it is safe, if Ansible accepts it. Each of those is a stage,
and the outcome says which stage an answer reached and why it stopped there, as data:

    extract      the YAML out of the text: the first ```yaml / ```yml / ``` block that
                 parses as a list of plays, else the whole text if it does (a leading
                 <think>...</think> is skipped)                              NoYaml
    parse        yaml.safe_load, a non-empty list of mappings        InvalidYaml, NotAPlaybook
    gate         simulators.playbook.gate.check_playbook (the safety rules)  GateViolation
    syntax       ansible-playbook --syntax-check: unknown modules, bad keywords
                                                                            SyntaxCheckFailed
    execute      simulators.sandbox.ansible.run_playbook under a timeout
                                                       ExecutionFailed, Timeout, Unreachable
    idempotence  (check_idempotence=True) a second run changes nothing      NotIdempotent

Model output is only ever interpreted by a jailed controller on the sandbox's own network
(simulators/sandbox/controller.py): the syntax check and the runs happen there, never on the host.
Before anything is parsed, the answer's size is checked (a huge answer costs seconds of YAML
parsing); after a run, every process the playbook left running in the nodes (SSH sessions,
transient units) is ended before anyone judges the system (simulators/playbook/leftovers.py).

`InternalError` marks a failure of ours (no ansible-playbook, an unwritable workdir,
ansible-runner refusing its inputs), not of the playbook: a reward must not count it
against the policy. Nothing here raises for a bad answer.

    out = run_pipeline(text, sandbox=sb, workdir=d, timeout_s=120)
    out.stage, out.ok, out.error_class, out.reason     # "execute", False, "ExecutionFailed", "..."
    out.summary()                                      # what a multi-trial policy is told
    out.to_dict()                                      # JSON for the episode record

The gate comes before anything touches Ansible, because the syntax check already loads
the playbook on the controller. The files: `workdir/playbook.yaml` (the extracted text,
as the model wrote it, so error line numbers match), `workdir/ansible/` (the syntax
check's output, each run's status, rc and stdout: what the host read back from the jail,
bounded, never a copy of its tree), `workdir/events.jsonl` (and `events.rerun.jsonl`)
once it executed. Idempotence is a quality signal only: a fix that works but is not safe
to run twice still fixed the incident (`out.executed_ok` says so).
"""

from __future__ import annotations

import json
import re
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from e2e_reme.simulators.sandbox.ansible import PlaybookRun
from e2e_reme.simulators.sandbox.controller import ControllerConfig, JailJob, JailRun, run_jailed
from e2e_reme.simulators.errors import PlaybookParseError
from e2e_reme.simulators.playbook.gate import GateResult, check_playbook, check_text

STAGES = ("extract", "parse", "gate", "syntax", "execute", "idempotence")
ERROR_CLASSES = ("NoYaml", "InvalidYaml", "NotAPlaybook", "GateViolation", "SyntaxCheckFailed",
                 "ExecutionFailed", "Timeout", "Unreachable", "NotIdempotent", "InternalError")
MAX_PLAYBOOK_CHARS = 200_000
MAX_ANSWER_CHARS = 400_000      # refused before any parsing: YAML parses at ~0.2 MB/s here
MAX_FENCES = 16                 # fenced blocks looked at for a playbook, at most


@dataclass
class ExecutionOutcome:
    stage: str                              # the stage it stopped at, or "done"
    ok: bool
    error_class: str | None = None          # one of ERROR_CLASSES; None when ok
    reason: str = ""                        # one line
    playbook_text: str | None = None        # what extract found
    plays: list | None = None               # what parse made of it
    gate: GateResult | None = None
    run: PlaybookRun | None = None
    rerun: PlaybookRun | None = None        # the idempotence run
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage reached
    controller: dict = field(default_factory=dict)   # the jail: start time, whether it was killed
    leftovers: list[dict] = field(default_factory=list)   # processes the playbook left, ended
    limits_hit: dict[str, dict] = field(default_factory=dict)   # node -> limits it ran into meanwhile

    @property
    def executed_ok(self) -> bool:
        """The playbook ran through once (whatever the idempotence check says)."""
        return self.run is not None and self.run.ok

    def to_dict(self) -> dict:
        """JSON-safe; the runs without their events (those are in events.jsonl)."""
        return {"stage": self.stage, "ok": self.ok, "error_class": self.error_class, "reason": self.reason,
                "playbook_text": self.playbook_text, "plays": _json_safe(self.plays),
                "gate": self.gate.to_dict() if self.gate is not None else None,
                "run": _run_dict(self.run), "rerun": _run_dict(self.rerun),
                "timings": dict(self.timings), "controller": dict(self.controller),
                "leftovers": list(self.leftovers), "limits_hit": dict(self.limits_hit)}

    def summary(self) -> str:
        """What happened, for a person or a model deciding the next attempt: where it
        stopped and why, the failed tasks with their messages, the recap per host."""
        if self.stage == "extract":
            return f"No playbook was run: {self.reason}."
        if self.stage == "parse":
            return f"No playbook was run: it could not be read ({self.error_class}): {self.reason}"
        if self.stage == "gate":
            lines = ["No playbook was run: the safety gate refused it:"]
            lines += [f"- {v}" for v in (self.gate.violations if self.gate else ())][:10]
            return "\n".join(lines)
        if self.stage == "syntax":
            return f"No playbook was run: ansible-playbook --syntax-check rejected it ({self.error_class}): {self.reason}"
        if self.run is None:       # done without executing
            return "The playbook passed extraction, parsing, the safety gate and the syntax check; it was not executed."
        lines = []
        fails = _failures(self.run)
        if self.stage == "execute" and fails and self.error_class == "ExecutionFailed":
            lines.append(f"The playbook failed ({self.error_class}) after {self.run.duration_s:.1f} s:")
        elif self.stage == "execute":
            lines.append(f"The playbook failed ({self.error_class}): {self.reason}")
        else:
            lines.append(f"The playbook ran successfully in {self.run.duration_s:.1f} s.")
        for f in fails[:5]:
            lines.append(f"- {f['host']}: task '{f['task']}' failed: {_one_line(f['msg'], 400)}")
            for k in ("stderr", "stdout"):
                if f[k] and f[k] not in f["msg"]:
                    lines.append(f"  {k}: {_one_line(f[k][-400:], 400)}")
        if self.run.stats:
            lines.append("Recap: " + "; ".join(_recap(h, s) for h, s in self.run.stats.items()))
        if self.stage == "idempotence":
            lines.append(f"Run a second time: {self.reason}")
        elif self.rerun is not None:
            lines.append("Run a second time, it changed nothing (idempotent).")
        return "\n".join(lines)


# ---- extract and parse ----------------------------------------------------------------------------

_TAG = re.compile(r"<(/?)think>", re.I)
_FENCE_OPEN = re.compile(r"[ \t]*(`{3,}|~{3,})[ \t]*([\w.+-]*)")
_YAML_TAGS = ("yaml", "yml", "ansible", "yaml+jinja")
PROBE_CHARS = 40_000            # YAML parsed while looking for the playbook, at most: 0.35 s here
                                # on the slowest shape found ('- - - ...' lines); playbooks are ~1-5 kB


def extract_yaml(text: str) -> str | None:
    """The playbook's YAML in a model's answer, or None where there is none. One pass over
    the text for the <think> tags and one for the fences, no backtracking over the whole
    text, and at most PROBE_CHARS of YAML parsed: linear time on any answer."""
    if not isinstance(text, str) or not text.strip():
        return None
    t = _drop_thinking(text)
    tagged, candidates = [], []
    for lang, body in _fences(t):
        lang = lang.lower()
        if lang in _YAML_TAGS or lang == "":
            body = textwrap.dedent(body).strip("\n")
            candidates.append(body)
            if lang:
                tagged.append(body)
    budget = [PROBE_CHARS]
    for body in candidates:
        if _is_playbook(body, budget):
            return body + "\n"
    whole = t.strip()
    if whole and _is_playbook(whole, budget):
        return whole + "\n"
    # A yaml block that does not parse is still the answer: parse says what is wrong with it.
    if tagged:
        return tagged[0] + "\n"
    if not candidates and whole.startswith(("---", "- ")):
        return whole + "\n"
    return None


def _drop_thinking(text: str) -> str:
    """Every <think>...</think> (any case, the first closing tag ends it) removed; then what
    follows the last stray </think> (the opening tag was in the prompt), or else what
    precedes an unclosed <think> (the model ran out of tokens while thinking)."""
    kept, start, open_at = [], 0, None
    for m in _TAG.finditer(text):
        if open_at is None and not m.group(1):
            open_at = m.start()
        elif open_at is not None and m.group(1):
            kept.append(text[start:open_at])
            start, open_at = m.end(), None
    kept.append(text[start:])
    t = "".join(kept)
    last_close = first_open = None
    for m in _TAG.finditer(t):
        if m.group(1):
            last_close = m.end()
        elif first_open is None:
            first_open = m.start()
    if last_close is not None:
        return t[last_close:]
    return t[:first_open] if first_open is not None else t


def _fences(t: str):
    """(info word, body) of the first MAX_FENCES fenced blocks, line by line: a fence opens
    on a line of 3+ backticks or tildes (then the info word) that ends with a newline, and
    closes on a line of exactly the same fence (spaces, tabs, a CR around it), else at the
    end of the text."""
    pos, n, size = 0, 0, len(t)
    while pos < size and n < MAX_FENCES:
        eol = t.find("\n", pos)
        if eol < 0:
            return
        m = _FENCE_OPEN.match(t, pos, eol)
        pos = eol + 1
        if m is None:
            continue
        n += 1
        fence, body_start = m.group(1), pos
        while pos < size:
            eol = t.find("\n", pos)
            end = size if eol < 0 else eol
            if t[pos:end].lstrip(" \t").rstrip(" \t\r") == fence:
                yield m.group(2), t[body_start:pos]
                pos = end + 1
                break
            pos = end + 1
        else:
            yield m.group(2), t[body_start:]
            return


def _is_playbook(s: str, budget: list[int]) -> bool:
    """Whether `s` parses as a list of plays; past the budget, whether it starts like one
    (parse_playbook still parses it in full, with its own size limit)."""
    if len(s) > budget[0]:
        head = next((l for l in s.split("\n", 64)[:64] if l.strip() and not l.lstrip().startswith("#")), "")
        return head.startswith(("---", "- ")) or head.rstrip() == "-"
    budget[0] -= len(s)
    try:
        data = yaml.safe_load(s)
    except Exception:
        return False
    return isinstance(data, list) and bool(data) and all(isinstance(p, dict) for p in data)


def parse_playbook(text: str) -> list:
    """A non-empty list of plays (mappings), or PlaybookParseError("InvalidYaml" |
    "NotAPlaybook", reason)."""
    if not isinstance(text, str):
        raise PlaybookParseError("NotAPlaybook", f"expected YAML text, got a {type(text).__name__}")
    if len(text) > MAX_PLAYBOOK_CHARS:
        raise PlaybookParseError("NotAPlaybook", f"the playbook is {len(text)} characters, more than {MAX_PLAYBOOK_CHARS}")
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(x for x in (e.context, e.problem) if x) or "invalid YAML"
        raise PlaybookParseError("InvalidYaml", f"{what}{where}") from None
    except Exception as e:   # YAMLError without a mark, RecursionError on deep nesting
        raise PlaybookParseError("InvalidYaml", _one_line(f"{type(e).__name__}: {e}", 300)) from None
    if data is None:
        raise PlaybookParseError("NotAPlaybook", "the YAML is empty")
    if isinstance(data, dict):
        raise PlaybookParseError("NotAPlaybook", "the YAML is a single mapping; a playbook is a list of plays "
                                                 "('- hosts: ...')")
    if not isinstance(data, list):
        raise PlaybookParseError("NotAPlaybook", f"the YAML is a {type(data).__name__}; a playbook is a list of plays")
    if not data:
        raise PlaybookParseError("NotAPlaybook", "the playbook is an empty list")
    for i, p in enumerate(data):
        if not isinstance(p, dict):
            raise PlaybookParseError("NotAPlaybook", f"play {i + 1} is a {type(p).__name__}, not a mapping")
    return data


# ---- the pipeline ------------------------------------------------------------------------------

def run_pipeline(text: str, *, sandbox=None, workdir: Path, timeout_s: float = 120,
                 check_idempotence: bool = False, extravars: dict | None = None, execute: bool = True,
                 inventory_hosts: Iterable[str] | None = None,
                 controller: ControllerConfig | None = None) -> ExecutionOutcome:
    """Run a model's answer through every stage against `sandbox`; see the module's
    docstring. Without a sandbox, only the stages before Ansible run (there is no jail to
    interpret the playbook in), and reaching the syntax check is an InternalError."""
    workdir = Path(workdir)
    hosts = list(inventory_hosts) if inventory_hosts is not None else \
        [n.name for n in sandbox.nodes] if sandbox is not None else []
    out = ExecutionOutcome(stage="extract", ok=False)

    def stop(stage: str, error_class: str, reason: str) -> ExecutionOutcome:
        out.stage, out.ok, out.error_class, out.reason = stage, False, error_class, _one_line(reason, 600)
        return out

    # extract: the size first, before anything parses it
    t0 = time.monotonic()
    if isinstance(text, str) and len(text) > MAX_ANSWER_CHARS:
        out.timings["extract"] = _since(t0)
        return stop("extract", "NotAPlaybook", f"the answer is {len(text)} characters, more than {MAX_ANSWER_CHARS}")
    found = extract_yaml(text)
    out.timings["extract"] = _since(t0)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if found is not None:
            (workdir / "playbook.yaml").write_text(found)
    except OSError as e:
        return stop("extract", "InternalError", f"cannot write to {workdir}: {e}")
    if found is None:
        return stop("extract", "NoYaml", "the answer holds no YAML playbook (a ```yaml block with a list of plays)")
    out.playbook_text = found

    # parse
    t0 = time.monotonic()
    try:
        out.plays = parse_playbook(found)
    except PlaybookParseError as e:
        out.timings["parse"] = _since(t0)
        return stop("parse", e.error_class, e.reason)
    out.timings["parse"] = _since(t0)

    # gate: the raw text (what the parsed structure does not show, e.g. comments), then the plays
    t0 = time.monotonic()
    out.gate = check_text(found)
    if out.gate.ok:
        out.gate = check_playbook(out.plays, hosts)
    out.timings["gate"] = _since(t0)
    if not out.gate.ok:
        n = len(out.gate.violations)
        return stop("gate", "GateViolation", f"refused by the safety gate [{', '.join(out.gate.rules)}]: "
                                             f"{out.gate.reason}" + (f" (and {n - 1} more)" if n > 1 else ""))

    # syntax, execute, idempotence: all in the sandbox's jailed controller
    if sandbox is None:
        return stop("syntax", "InternalError", "no sandbox given: a playbook is only checked and run by the "
                                               "jailed controller of the sandbox it targets")
    from e2e_reme.simulators.playbook.leftovers import end_leftovers, snapshot
    before = snapshot(sandbox) if execute else None
    limits_before = _limit_events(sandbox)
    job = JailJob(timeout_s=timeout_s, execute=execute, rerun=check_idempotence, extravars=dict(extravars or {}))
    jail = run_jailed(sandbox, found, workdir, job, controller or ControllerConfig())
    if before is not None:
        out.leftovers = [asdict(x) for x in end_leftovers(sandbox, before)]
    out.limits_hit = _limits_hit(limits_before, _limit_events(sandbox))
    out.controller = {"start_s": jail.start_s, "total_s": jail.total_s, "killed": jail.killed}
    _stage_timings(out, jail)
    if jail.error:
        return stop("syntax", "InternalError", jail.error)
    out = _judge_jail_run(out, jail, workdir, timeout_s, execute)
    if not out.ok and out.limits_hit:
        # The playbook exhausted a node's limits: its failure, and the reason it failed.
        out.reason = _one_line(out.reason + " (limits hit: " + "; ".join(
            f"{n}: {', '.join(f'{k} {v}' for k, v in hit.items())}" for n, hit in out.limits_hit.items()) + ")", 600)
    return out


def _limit_events(sandbox) -> dict[str, dict]:
    """Each node's limit counters (nspawn), or nothing where the backend has none."""
    read = getattr(sandbox, "limit_events", None)
    if read is None:
        return {}
    try:
        return {n.name: read(n.index) for n in sandbox.nodes}
    except OSError:
        return {}


def _limits_hit(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    hit = {}
    for node, now in after.items():
        was = before.get(node, {})
        d = {k: v - was.get(k, 0) for k, v in now.items() if isinstance(v, int) and not isinstance(v, bool)
             and v > was.get(k, 0)}
        if now.get("disk_full") and not was.get("disk_full"):
            d["disk_full"] = True
        if d:
            hit[node] = d
    return hit


def _stage_timings(out: ExecutionOutcome, jail: JailRun) -> None:
    """Per-stage seconds from the jail's own marks (the jail's start counts to the syntax check)."""
    m, prev = jail.marks, jail.marks.get("started")
    if prev is not None:
        out.timings["syntax"] = round(max(0.0, jail.start_s) + m.get("syntax", prev) - prev, 3)
    for stage, mark, since in (("execute", "run", "syntax"), ("idempotence", "rerun", "run")):
        if mark in m and since in m:
            out.timings[stage] = round(m[mark] - m[since], 3)


def _judge_jail_run(out: ExecutionOutcome, jail: JailRun, workdir: Path, timeout_s: float,
                    execute: bool) -> ExecutionOutcome:
    def stop(stage: str, error_class: str, reason: str) -> ExecutionOutcome:
        out.stage, out.ok, out.error_class, out.reason = stage, False, error_class, _one_line(reason, 600)
        return out

    if jail.syntax_rc is None and jail.output_limit and not jail.killed:
        return stop("syntax", "SyntaxCheckFailed", f"the syntax check left no result: {jail.output_limit}")
    if jail.syntax_rc is None:
        return stop("syntax", "Timeout" if jail.killed else "InternalError",
                    "the syntax check did not finish" + (" in time" if jail.killed else ""))
    if jail.syntax_rc in (126, 127):    # the shell's "not executable" / "not found": no Ansible to check with
        return stop("syntax", "InternalError", _one_line(jail.syntax_output, 300) or f"exit code {jail.syntax_rc}")
    if jail.syntax_rc != 0:
        return stop("syntax", "SyntaxCheckFailed",
                    _first_error(jail.syntax_output) or f"exit code {jail.syntax_rc}")
    if not execute:
        out.stage, out.ok = "done", True
        return out
    out.run = jail.run
    _write_events(workdir / "events.jsonl", out.run)
    error_class, reason = _classify(out.run, timeout_s, jail.output_limit)
    if error_class:
        return stop("execute", error_class, reason)
    if jail.rerun is not None or "rerun" in jail.marks:
        out.rerun = jail.rerun
        if out.rerun is None:
            return stop("idempotence", "InternalError", "the second run left no result")
        _write_events(workdir / "events.rerun.jsonl", out.rerun)
        error_class, reason = _classify(out.rerun, timeout_s, jail.output_limit)
        if error_class == "InternalError":
            return stop("idempotence", error_class, reason)
        if error_class:
            return stop("idempotence", "NotIdempotent", f"the second run did not succeed ({error_class}): {reason}")
        changed = {h: s.changed for h, s in out.rerun.stats.items() if s.changed}
        if changed:
            tasks = _changed_tasks(out.rerun)
            return stop("idempotence", "NotIdempotent",
                        "a second run changed " + ", ".join(f"{h}: {c} task(s)" for h, c in changed.items())
                        + (f" ({', '.join(repr(t) for t in tasks[:5])})" if tasks else ""))
    out.stage, out.ok = "done", True
    return out


def _first_error(output: str) -> str:
    """Ansible's first error line (2.19 writes `[ERROR]: ...`, earlier `ERROR! ...`), with
    the playbook line it points at."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith(("[ERROR]", "ERROR!")):
            msg = re.sub(r"^(\[ERROR\]:?|ERROR!)\s*", "", s)
            for nxt in lines[i + 1:i + 12]:
                m = re.search(r"(?:Origin:|The error appears to be in) '?[^']*?:(\d+):(\d+)", nxt)
                if m:
                    msg += f" (playbook line {m.group(1)}, column {m.group(2)})"
                    break
            return msg
    rest = [l.strip() for l in lines if l.strip() and not l.strip().startswith("[WARNING]")]
    return rest[-1] if rest else ""


def _classify(run: PlaybookRun, timeout_s: float, output_limit: str = "") -> tuple[str | None, str]:
    if run.ok:
        return None, ""
    if run.status == "output_limit":   # what it left in the jail's scratch space: its outcome, not ours
        return "ExecutionFailed", f"the playbook's outputs in the jail passed the host's limits: {output_limit}"
    if run.error:
        return "InternalError", run.error.splitlines()[0] if run.error else "ansible-runner failed"
    if run.status == "timeout":
        task = _last_task(run)
        return "Timeout", f"the playbook ran past its {timeout_s:g} s limit" + (f", in task '{task}'" if task else "")
    if run.status == "canceled":
        return "InternalError", "the run was canceled"
    fails = _failures(run)
    hard = [f for f in fails if f["event"] == "runner_on_failed"]
    if hard:
        return "ExecutionFailed", "; ".join(f"task '{f['task']}' failed on {f['host']}: {_one_line(f['msg'], 200)}"
                                            for f in hard[:3])
    unreachable = [h for h, s in run.stats.items() if s.unreachable] or [f["host"] for f in fails]
    if unreachable:
        msg = next((f["msg"] for f in fails if f["msg"]), "")
        return "Unreachable", f"{', '.join(dict.fromkeys(unreachable))} unreachable" + (f": {_one_line(msg, 200)}" if msg else "")
    # No task failed: ansible stopped before or between tasks (an undefined variable in a
    # play keyword, a templating error); its own summary line says why.
    return "ExecutionFailed", run.summary().split("; ", 1)[-1]


def _failures(run: PlaybookRun) -> list[dict]:
    out = []
    for ev in run.events:
        if ev.get("event") not in ("runner_on_failed", "runner_on_unreachable"):
            continue
        data = ev.get("event_data", {}) or {}
        if data.get("ignore_errors"):
            continue
        res = data.get("res", {}) or {}
        msg = res.get("msg") or res.get("stderr") or res.get("stdout") or ""
        if not isinstance(msg, str):
            msg = json.dumps(msg, default=str)
        if res.get("results") and not res.get("stderr"):   # a loop: the first failed item says more
            item = next((r for r in res["results"] if isinstance(r, dict) and r.get("failed")), None)
            if item:
                why = " ".join(str(x).strip() for x in (item.get("msg"), item.get("stderr")) if x)
                msg = f"{msg}; item {item.get('item')!r}: {why}"
        out.append({"host": data.get("host"), "task": data.get("task"), "event": ev["event"],
                    "msg": msg.strip(), "rc": res.get("rc"),
                    "stderr": str(res.get("stderr") or "").strip(), "stdout": str(res.get("stdout") or "").strip()})
    return out


def _last_task(run: PlaybookRun) -> str | None:
    for ev in reversed(run.events):
        if ev.get("event") == "playbook_on_task_start":
            return (ev.get("event_data") or {}).get("task")
    return None


def _changed_tasks(run: PlaybookRun) -> list[str]:
    names = []
    for ev in run.events:
        data = ev.get("event_data") or {}
        if ev.get("event") == "runner_on_ok" and (data.get("res") or {}).get("changed") and data.get("task") not in names:
            names.append(data.get("task"))
    return names


def _write_events(path: Path, run: PlaybookRun) -> None:
    try:
        with path.open("w") as f:
            for ev in run.events:
                f.write(json.dumps(ev, default=str) + "\n")
    except OSError:
        pass   # the events stay in the runner's artifacts; the outcome does not depend on this copy


def _run_dict(run: PlaybookRun | None) -> dict | None:
    if run is None:
        return None
    return {"status": run.status, "rc": run.rc, "duration_s": run.duration_s,
            "stats": {h: asdict(s) for h, s in run.stats.items()},
            "failed_tasks": [{k: f[k] for k in ("host", "task", "msg", "rc")} for f in _failures(run)][:20],
            "playbook": run.playbook, "artifact_dir": run.artifact_dir, "error": run.error}


def _recap(host: str, s: Any) -> str:
    return (f"{host}: ok={s.ok} changed={s.changed} failed={s.failures} unreachable={s.unreachable} "
            f"skipped={s.skipped} rescued={s.rescued} ignored={s.ignored}")


def _json_safe(obj: Any) -> Any:
    if obj is None:
        return None
    n, stack = 0, [obj]
    while stack:       # an alias bomb parses small and serialises huge
        x = stack.pop()
        n += 1
        if n > 200_000:
            return None
        stack.extend(x.values() if isinstance(x, dict) else x if isinstance(x, list) else ())
    try:
        return json.loads(json.dumps(obj, default=str))
    except (ValueError, TypeError, RecursionError):
        return None


def _one_line(s: str, limit: int) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= limit else s[:limit - 1] + "…"


def _since(t0: float) -> float:
    return round(time.monotonic() - t0, 3)


__all__ = ["ExecutionOutcome", "run_pipeline", "extract_yaml", "parse_playbook", "STAGES", "ERROR_CLASSES"]
