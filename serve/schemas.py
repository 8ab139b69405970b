"""Request bodies, validated with pydantic, and the one way a bad one is answered.

`Report` mirrors `simulators.reports.DiagnosisReport.to_dict()` field for field (the
benchmark's report JSON); unknown fields are refused, so a typo is named, not ignored.
Every validation error becomes a 4xx whose message names the field and the fix
(`describe_errors`), never a 500.

A body is parsed by `parse_body` before any model sees it: UTF-8 only, JSON nested at
most MAX_JSON_DEPTH deep, integers of at most MAX_INT_DIGITS digits, finite numbers only,
strings without lone surrogates; a violation is a `BodyError` naming the field.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from e2e_reme.simulators.reports import LEVELS, DiagnosisReport

HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SANDBOX_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")     # simulators/sandbox/state.py NAME_RE
MAX_ANSWER_CHARS = 64_000
MAX_TEXT_CHARS = 4_000            # one symptom, log line or name in a report
MAX_JSON_DEPTH = 32               # recorded reports nest 5 deep
MAX_INT_DIGITS = 20               # a 64-bit integer has at most 20
MAX_SEED = 2 ** 63 - 1
MIN_TEMPERATURE = 0.01            # 0 is greedy; between the two a sampler divides by almost nothing
MIN_TOP_P = 0.01
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Name = Annotated[str, Field(min_length=1, max_length=256)]


class BodyError(ValueError):
    """A body that is not acceptable JSON: the HTTP status, the message, the field."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class _BadNumber:
    """What the parser keeps for a number it will not turn into a value."""
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _int(s: str) -> Any:
    return int(s) if len(s.lstrip("-")) <= MAX_INT_DIGITS else _BadNumber(s)


def _float(s: str) -> Any:
    f = float(s)
    return f if math.isfinite(f) else _BadNumber(s)


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object, or a BodyError naming what is wrong and where."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(400, f"the body is not UTF-8 text (byte {e.start}); send JSON encoded as UTF-8") from None
    try:
        obj = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_BadNumber)
    except RecursionError:
        raise BodyError(400, f"the body's JSON is nested too deep; at most {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise BodyError(400, f"the body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); send a "
                             f"JSON object with Content-Type: application/json") from None
    if not isinstance(obj, dict):
        raise BodyError(400, f"the body is a JSON {type(obj).__name__}; send a JSON object")
    _check_values(obj)
    return obj


def _check_values(obj: Any) -> None:
    """Depth, numbers and strings of a parsed body, without recursion."""
    stack: list[tuple[Any, tuple, int]] = [(obj, (), 1)]
    while stack:
        v, path, depth = stack.pop()
        where = ".".join(str(p) for p in path) or "(body)"
        if isinstance(v, dict):
            if depth > MAX_JSON_DEPTH:
                raise BodyError(422, f"{where}: nested more than {MAX_JSON_DEPTH} levels deep; send a flatter "
                                     f"object", where)
            for k, x in v.items():
                if not _utf8(k):
                    raise BodyError(422, f"{where}: a key holds a lone surrogate (\\ud800-\\udfff escape) that is "
                                         f"not a character; send valid Unicode", where)
                stack.append((x, path + (k,), depth + 1))
        elif isinstance(v, list):
            if depth > MAX_JSON_DEPTH:
                raise BodyError(422, f"{where}: nested more than {MAX_JSON_DEPTH} levels deep; send a flatter "
                                     f"array", where)
            stack.extend((x, path + (i,), depth + 1) for i, x in enumerate(v))
        elif isinstance(v, _BadNumber):
            raise BodyError(422, f"{where}: the number {v.text[:24]}{'...' if len(v.text) > 24 else ''} is not "
                                 f"accepted: integers have at most {MAX_INT_DIGITS} digits and numbers must be "
                                 f"finite (no NaN or Infinity); send a smaller value", where)
        elif isinstance(v, str) and not _utf8(v):
            raise BodyError(422, f"{where}: the string holds a lone surrogate (\\ud800-\\udfff escape) that is "
                                 f"not a character; send valid Unicode", where)


def _utf8(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _temperature(v: float) -> float:
    if v != 0 and v < MIN_TEMPERATURE:
        raise ValueError(f"a temperature between 0 and {MIN_TEMPERATURE} cannot be sampled with; send 0 for greedy "
                         f"decoding or at least {MIN_TEMPERATURE}")
    return v


class Dependency(BaseModel):
    """Where a service's dependency is reached (`target.dependencies.NAME`)."""
    model_config = ConfigDict(extra="allow")
    host: Optional[Text] = None
    port: Optional[int] = Field(default=None, ge=0, le=65535)
    kind: Optional[Text] = None


class Target(BaseModel):
    """Where the named service lives (`report.target`): what `DiagnosisReport.to_text()`
    reads from it."""
    model_config = ConfigDict(extra="allow")
    node: Text
    unit: Text
    port: int = Field(ge=0, le=65535)
    kind: Optional[Text] = None
    health_path: Optional[Text] = None
    config_path: Optional[Text] = None
    data_dir: Optional[Text] = None
    dependencies: dict[Text, Dependency] = Field(default_factory=dict)


class Report(BaseModel):
    """A diagnosis report as `DiagnosisReport.to_dict()` writes it."""
    model_config = ConfigDict(extra="forbid")

    system: str = Field(min_length=1, max_length=64)
    level: Literal["full", "symptoms", "minimal"]
    symptoms: list[Text] = Field(max_length=200)
    observations: dict = Field(default_factory=dict)
    call_graph: dict[Text, list[Text]] = Field(default_factory=dict)
    placement: dict[str, list[Text]]
    service: Optional[Name] = None
    category: Optional[Name] = None
    fault_kind: Optional[Name] = None
    evidence: dict = Field(default_factory=dict)
    target: Optional[Target] = None
    logs: list[Text] = Field(default_factory=list, max_length=200)
    created_at: float = 0.0

    @field_validator("placement")
    @classmethod
    def _hosts(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        if not v:
            raise ValueError("placement maps inventory hosts to their services and must name at least one host")
        bad = [h for h in v if not HOST_RE.match(h)]
        if bad:
            raise ValueError(f"host names {bad[:3]} are not inventory host names (letters, digits, '.', '_', '-')")
        return v

    def to_report(self) -> DiagnosisReport:
        d = self.model_dump()
        d["symptoms"], d["logs"] = tuple(d["symptoms"]), tuple(d["logs"])
        return DiagnosisReport(**d)


assert set(Report.model_fields) == set(DiagnosisReport.__dataclass_fields__), "Report must mirror DiagnosisReport"
assert tuple(Report.model_fields["level"].annotation.__args__) == LEVELS


class RemediateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    report: Report
    inventory: Optional[list[str]] = Field(default=None, min_length=1, max_length=64)
    mode: Literal["dry-run", "execute"] = "dry-run"
    sandbox: Optional[str] = None
    answer: Optional[str] = Field(default=None, min_length=1, max_length=MAX_ANSWER_CHARS)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)

    _temperature = field_validator("temperature")(classmethod(lambda cls, v: _temperature(v)))

    @field_validator("inventory")
    @classmethod
    def _inventory(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is not None:
            bad = [h for h in v if not HOST_RE.match(h)]
            if bad:
                raise ValueError(f"{bad[:3]} are not inventory host names (letters, digits, '.', '_', '-')")
        return v

    @field_validator("sandbox")
    @classmethod
    def _sandbox(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not SANDBOX_RE.match(v):
            raise ValueError("a sandbox name is 1-31 lowercase letters, digits and '-', starting with a letter "
                             "(see `remed sandbox ls`)")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: Optional[Union[str, list[dict]]] = None    # a string, or OpenAI content parts


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The OpenAI chat-completions fields this server honours; other OpenAI fields are
    accepted and ignored (clients send many), except that n > 1 and tools are refused."""
    model_config = ConfigDict(extra="ignore")

    model: Optional[Name] = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=MIN_TOP_P, le=1.0)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)

    _temperature = field_validator("temperature")(classmethod(lambda cls, v: _temperature(v)))
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    tools: Optional[list[Any]] = None


_FIXES = {
    "missing": "add it",
    "extra_forbidden": "an unknown field: remove it",
    "literal_error": "use one of the allowed values",
    "string_type": "send a string",
    "int_type": "send an integer",
    "int_parsing": "send an integer",
    "float_type": "send a number",
    "float_parsing": "send a number",
    "list_type": "send a JSON array",
    "dict_type": "send a JSON object",
    "model_type": "send a JSON object",
    "bool_type": "send true or false",
    "bool_parsing": "send true or false",
    "greater_than_equal": "send a larger value",
    "less_than_equal": "send a smaller value",
    "greater_than": "send a larger value",
    "too_short": "send more items",
    "too_long": "send fewer items or a shorter value",
    "string_too_long": "send a shorter string",
    "string_too_short": "send a non-empty string",
}


def describe_errors(e: ValidationError, limit: int = 5) -> tuple[str, list[dict]]:
    """One line naming each wrong field (`report.level`) and its fix, and the details."""
    parts, details = [], []
    for err in e.errors()[:limit]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "(body)"
        msg = err.get("msg", "invalid")
        fix = _FIXES.get(err.get("type", ""), "")
        parts.append(f"{loc}: {msg}" + (f" ({fix})" if fix and fix not in msg else ""))
        details.append({"field": loc, "message": msg, "type": err.get("type")})
    more = len(e.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else ""), details
