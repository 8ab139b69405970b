"""The prompts every model-backed policy uses, in one place, so that benchmarking, training
(SFT/RFT records) and serving all show a model the same words.

The templates are files in `prompts/` (package data), filled with `str.format_map`:

    system.md        {hosts}                            the SRE's role and the rules of a playbook
    think_system.md  {hosts} {max_probes} {allowed}     appended to system.md for ThinkRemed
    solo.md          {report} {hosts} {observations}    the user turn: the report and the inventory
    feedback.md      {trial} {outcome} {execution} {health}   the user turn after a trial

Being `str.format_map`, a literal brace in a template must be doubled (`{{`); the templates
avoid braces altogether. Values are inserted as they are (a report's JSON is a value, so its
braces are fine).

    messages = build_messages(report, ("n0", "n1"))                       # SoloGen
    messages = build_messages(report, hosts, mode="think", feedback=[fb])  # ThinkRemed, trial 2

`report` is a `DiagnosisReport`, a dict of its fields (as training reads them from JSONL),
or text already rendered.

Report text is data. A report may come from anyone (a served request, a recorded episode,
a node's own output), so before it is rendered every string in it, keys included, is made
unable to change the prompt's structure (`field_text`): line breaks and other control
characters become spaces (no field can start a line, so none can start a turn of the
plain transcript `role: text` or a markdown block), runs of three or more backticks or
tildes (code fences) become quotes or dashes, and a field is cut at `MAX_FIELD_CHARS`.
A report without such content renders exactly as before. At the token level,
`literal_messages` keeps every control-token string of a tokenizer (`<start_of_turn>`,
`<|im_end|>`, ...) inside a message's text from being read as the control token: it is
broken by a space after its first character, so it is tokenised as ordinary text.
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable, Mapping, Sequence

from e2e_reme.simulators.reports import DiagnosisReport
from e2e_reme.simulators.policies.base import TrialFeedback

TEMPLATES = ("system", "solo", "think_system", "feedback")
MODES = ("solo", "think")
MAX_FIELD_CHARS = 1000          # any one string of a report, as the model reads it (recorded ones: < 600)
_BREAKS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]+")     # line breaks, controls; a tab stays
_FENCES = re.compile(r"`{3,}|~{3,}")


def field_text(s: str) -> str:
    """One string of a report as it may appear in a prompt: on one line, without code
    fences, at most MAX_FIELD_CHARS long. Ordinary text is returned unchanged."""
    s = _BREAKS.sub(" ", s)
    s = _FENCES.sub(lambda m: ("'" if m.group()[0] == "`" else "-") * len(m.group()), s)
    return s if len(s) <= MAX_FIELD_CHARS else s[:MAX_FIELD_CHARS - 3] + "..."


def safe_fields(obj: Any) -> Any:
    """`obj` (a report's fields) with `field_text` applied to every string, keys included."""
    if isinstance(obj, str):
        return field_text(obj)
    if isinstance(obj, Mapping):
        return {safe_fields(k) if isinstance(k, str) else k: safe_fields(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(safe_fields(v) for v in obj)
    return obj


def control_tokens(tokenizer: Any) -> tuple[tuple[str, ...], frozenset]:
    """The tokenizer's control-token strings (special added tokens) and their ids, cached
    on the tokenizer."""
    cached = getattr(tokenizer, "_remedcontrol_tokens", None)
    if cached is None:
        dec = getattr(tokenizer, "added_tokens_decoder", None) or {}
        pairs = {(i, t.content) for i, t in dec.items() if getattr(t, "special", False) and t.content}
        for t, i in zip(getattr(tokenizer, "all_special_tokens", None) or (),
                        getattr(tokenizer, "all_special_ids", None) or ()):
            if t:
                pairs.add((i, t))
        cached = (tuple(sorted({c for _, c in pairs}, key=len, reverse=True)), frozenset(i for i, _ in pairs))
        try:
            tokenizer._remedcontrol_tokens = cached
        except AttributeError:
            pass
    return cached


def literal_text(tokenizer: Any, text: str) -> str:
    """`text` in which no control-token string of `tokenizer` is left whole: each is
    broken by a space after its first character (`<start_of_turn>` -> `< start_of_turn>`),
    so that tokenising it gives ordinary text tokens. Text without one is unchanged."""
    strings, ids = control_tokens(tokenizer)
    firsts = {s[0] for s in strings}
    for _ in range(8):
        if not any(c in text for c in firsts):
            return text
        found = {tokenizer.convert_ids_to_tokens(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]
                 if i in ids}
        if not found:
            return text
        for s in sorted(found, key=len, reverse=True):
            text = text.replace(s, s[:1] + " " + s[1:])
    raise ValueError("a message keeps producing control tokens after they were broken up; it cannot be "
                     "shown to the model as text")


def literal_messages(tokenizer: Any, messages: Sequence[dict]) -> list[dict]:
    """`messages` with every text content made `literal_text` for `tokenizer`."""
    return [{**m, "content": literal_text(tokenizer, m["content"])} if isinstance(m.get("content"), str) else m
            for m in messages]


@lru_cache(maxsize=None)
def load_template(name: str) -> str:
    """The raw text of a template (`system`, `solo`, `think_system`, `feedback`), read from
    the package on first use."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template '{name}'; the templates are: {', '.join(TEMPLATES)}")
    return resources.files(__package__).joinpath("prompts", f"{name}.md").read_text(encoding="utf-8")


def render(name: str, **values: Any) -> str:
    """A template filled with `values`; a placeholder without a value is an error naming it."""
    try:
        return load_template(name).format_map(values)
    except KeyError as e:
        raise ValueError(f"prompt template '{name}' needs a value for {{{e.args[0]}}}; "
                         f"given: {', '.join(sorted(values)) or 'none'}") from None


def report_text(report: DiagnosisReport | Mapping[str, Any] | str) -> str:
    """The report as the model reads it (`DiagnosisReport.to_text()`)."""
    if isinstance(report, str):
        return report
    if isinstance(report, DiagnosisReport):
        return DiagnosisReport(**safe_fields({f.name: getattr(report, f.name)
                                              for f in dataclasses.fields(DiagnosisReport)})).to_text()
    if isinstance(report, Mapping):
        return _report_from_dict(safe_fields(report)).to_text()
    raise TypeError(f"a report is a DiagnosisReport, a dict of its fields or text, not {type(report).__name__}")


def _report_from_dict(d: Mapping[str, Any]) -> DiagnosisReport:
    # Records may come from an older or newer writer: take the fields we know, default the rest.
    names = {f.name for f in dataclasses.fields(DiagnosisReport)}
    base = {"system": "?", "level": "minimal", "symptoms": (), "observations": {}, "call_graph": {},
            "placement": {}}
    fields = {**base, **{k: v for k, v in d.items() if k in names}}
    fields["symptoms"] = tuple(fields["symptoms"] or ())
    fields["logs"] = tuple(fields.get("logs") or ())
    fields["evidence"] = fields.get("evidence") or {}
    fields["call_graph"] = fields["call_graph"] or {}
    fields["placement"] = fields["placement"] or {}
    return DiagnosisReport(**fields)


def hosts_text(inventory_hosts: Iterable[str]) -> str:
    hosts = [str(h) for h in inventory_hosts]
    if not hosts:
        raise ValueError("the inventory has no hosts: a playbook would have nothing to target")
    return ", ".join(hosts)


def allowed_text() -> str:
    """The probe allow-list as the think prompt lists it (one line per command)."""
    from e2e_reme.simulators.policies.tools import ALLOWED
    return "\n".join(f"- {spec.usage}" for spec in ALLOWED.values() if spec.usage)


def render_observations(observations: Iterable[Mapping[str, Any]]) -> str:
    """Probe results ({"host", "command", "output"}) as text, e.g. those of earlier trials."""
    parts = []
    for o in observations:
        out = str(o.get("output", "")).rstrip() or "(no output)"
        parts.append(f"$ {o.get('host', '?')}: {o.get('command', '')}\n{out}")
    return "\n\n".join(parts)


def _health_text(health: Mapping[str, Any] | None) -> str:
    if not health:
        return "no signal"
    bits = []
    if "ok" in health:
        bits.append("looks healthy" if health["ok"] else "not healthy")
    if health.get("error_rate") is not None:
        bits.append(f"error rate {float(health['error_rate']):.0%}")
    services = health.get("services") or {}
    if services:
        bits.append("services: " + ", ".join(f"{n} {s}" for n, s in services.items()))
    rest = {k: v for k, v in health.items() if k not in ("ok", "error_rate", "services")}
    if rest:
        bits.append(json.dumps(rest, default=str))
    return "; ".join(bits) or "no signal"


def render_feedback(fb: TrialFeedback | Mapping[str, Any]) -> str:
    """The user turn after a trial (feedback.md): how the run went and the weak health signal."""
    if isinstance(fb, Mapping):
        fb = TrialFeedback(trial=int(fb.get("trial", 0)), stage=str(fb.get("stage", "")),
                           error_class=fb.get("error_class"), reason=str(fb.get("reason", "")),
                           execution=str(fb.get("execution", "")), health=dict(fb.get("health") or {}))
    if fb.stage == "done" and not fb.error_class:
        outcome = "the playbook ran through" + (f" ({fb.reason})" if fb.reason else "") + "."
    else:
        outcome = (f"stopped at stage '{fb.stage}'" + (f" ({fb.error_class})" if fb.error_class else "")
                   + (f": {fb.reason}" if fb.reason else "") + ".")
    execution = fb.execution.strip()
    return render("feedback", trial=fb.trial, outcome=outcome,
                  execution=execution if execution else "(no execution summary)",
                  health=_health_text(fb.health))


def system_prompt(inventory_hosts: Iterable[str], mode: str = "solo", max_probes: int = 4) -> str:
    if mode not in MODES:
        raise ValueError(f"prompt mode '{mode}': use one of {', '.join(MODES)}")
    hosts = hosts_text(inventory_hosts)
    text = render("system", hosts=hosts)
    if mode == "think":
        text = text.rstrip("\n") + "\n\n" + render("think_system", hosts=hosts, max_probes=max_probes,
                                                   allowed=allowed_text())
    return text


def build_messages(report: DiagnosisReport | Mapping[str, Any] | str, inventory_hosts: Sequence[str], *,
                   mode: str = "solo", feedback: Iterable[TrialFeedback | Mapping[str, Any]] = (),
                   observations: Iterable[Mapping[str, Any]] = (), previous_answers: Sequence[str] = (),
                   max_probes: int = 4, examples: Sequence[tuple[Any, str]] = ()) -> list[dict]:
    """The chat messages for one request: system, the report turn, then per earlier trial
    the answer given (where known, from `previous_answers`) and its feedback.

    `observations` are probe results made before this request (earlier trials' probes),
    shown in the report turn so a later trial need not probe again. `examples`: (report,
    answer) pairs shown first as earlier turns of the same conversation (few-shot)."""
    hosts = hosts_text(inventory_hosts)
    obs = render_observations(observations)
    user = render("solo", report=report_text(report).rstrip("\n"), hosts=hosts,
                  observations=f"\nWhat read-only probes already showed:\n\n{obs}\n" if obs else "")
    messages = [{"role": "system", "content": system_prompt(inventory_hosts, mode, max_probes)}]
    for ex_report, ex_answer in examples:
        messages += [{"role": "user", "content": render("solo", report=report_text(ex_report).rstrip("\n"),
                                                        hosts=hosts, observations="")},
                     {"role": "assistant", "content": ex_answer}]
    messages.append({"role": "user", "content": user})
    for i, fb in enumerate(feedback):
        if i < len(previous_answers) and previous_answers[i]:
            messages.append({"role": "assistant", "content": previous_answers[i]})
        append_user(messages, render_feedback(fb))
    return messages


def append_user(messages: list[dict], content: str) -> None:
    """Add a user turn, merged into the last one if that is a user turn too: some chat
    templates insist that user and assistant alternate."""
    last = messages[-1] if messages else None
    if last and last.get("role") == "user" and isinstance(last.get("content"), str):
        # A new dict, not an edit: the earlier one may already be in a transcript that was sent.
        messages[-1] = {**last, "content": last["content"].rstrip("\n") + "\n\n" + content}
    else:
        messages.append({"role": "user", "content": content})
