"""Request bodies, validated with pydantic, and the one way a bad one is answered.

`Report` mirrors `simulators.reports.DiagnosisReport.to_dict()` field for field (the
benchmark's report JSON); unknown fields are refused, so a typo is named, not ignored.
Every validation error becomes a 4xx whose message names the field and the fix
(`describe_errors`), never a 500.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from e2e_reme.simulators.reports import LEVELS, DiagnosisReport

HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SANDBOX_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")     # simulators/sandbox/state.py NAME_RE
MAX_ANSWER_CHARS = 64_000


class Report(BaseModel):
    """A diagnosis report as `DiagnosisReport.to_dict()` writes it."""
    model_config = ConfigDict(extra="forbid")

    system: str = Field(min_length=1, max_length=64)
    level: Literal["full", "symptoms", "minimal"]
    symptoms: list[str] = Field(max_length=200)
    observations: dict = Field(default_factory=dict)
    call_graph: dict[str, list[str]] = Field(default_factory=dict)
    placement: dict[str, list[str]]
    service: Optional[str] = None
    category: Optional[str] = None
    fault_kind: Optional[str] = None
    evidence: dict = Field(default_factory=dict)
    target: Optional[dict] = None
    logs: list[str] = Field(default_factory=list, max_length=200)
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
    seed: Optional[int] = None

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

    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    seed: Optional[int] = None
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
