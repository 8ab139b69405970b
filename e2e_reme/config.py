"""Configuration plumbing shared by every stage's frozen dataclasses."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping


def check_keys(where: str, d: Mapping[str, Any], cls, error: type[Exception] = ValueError) -> None:
    """A settings mapping for dataclass `cls` may hold only its fields: a typo is an error
    naming the unknown keys and listing the known ones, never a silently ignored setting."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise error(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
