"""Compound scenarios: two faults on one service at once, named `compound:<a>+<b>`.

Available iff both parts are; active while either is; recovered part by part (last
first). Parameters go to a part by prefix (`cpu-stress.workers=2`) or, unprefixed, to
every part that has that parameter. A part's seed is the compound's seed plus its index,
so two parts of one type still differ.
"""

from __future__ import annotations

from typing import Any, Mapping

from e2e_reme.simulators.errors import FaultError, UnknownFault
from e2e_reme.simulators.systems.target import ServiceTarget
from e2e_reme.simulators.faults.base import COMPOUND_PREFIX, Fault, get_fault
from e2e_reme.simulators.faults.observe import observe

_CLASSES: dict[tuple[str, ...], type["Compound"]] = {}


def compound_class(name: str) -> type["Compound"]:
    body = name[len(COMPOUND_PREFIX):]
    parts = tuple(p for p in body.split("+"))
    if len(parts) != 2 or not all(parts):
        raise UnknownFault(f"a compound fault is {COMPOUND_PREFIX}<a>+<b> (two catalog names), not '{name}'")
    classes = []
    for p in parts:
        if p.startswith(COMPOUND_PREFIX):
            raise UnknownFault(f"'{name}': a compound cannot contain a compound")
        classes.append(get_fault(p))
    key = tuple(c.name for c in classes)
    if key[0] == key[1]:
        raise UnknownFault(f"'{name}': the two parts must differ")
    if key not in _CLASSES:
        cats = list(dict.fromkeys(c.category for c in classes))
        _CLASSES[key] = type(f"Compound_{key[0]}_{key[1]}".replace("-", "_"), (Compound,), {
            "name": COMPOUND_PREFIX + "+".join(key),
            "part_classes": tuple(classes),
            "category": "+".join(cats),           # e.g. "resource+network"
            "needs": tuple(n for c in classes for n in c.needs),
            "kinds": tuple(k for k in classes[0].kinds if k in classes[1].kinds),
            "defaults": {},
            "summary": f"{key[0]} and {key[1]} at once",
        })
    return _CLASSES[key]


class Compound(Fault):
    part_classes: tuple[type[Fault], ...] = ()

    def __init__(self, target: ServiceTarget, targets: Mapping[str, ServiceTarget] | None = None,
                 params: Mapping[str, Any] | None = None, seed: int = 0, fault_id: str | None = None):
        params = dict(params or {})
        super().__init__(target, targets, {}, seed, fault_id)
        per: list[dict] = [dict(params.get(c.name) or {}) if isinstance(params.get(c.name), dict) else {}
                           for c in self.part_classes]
        for k, v in params.items():
            if isinstance(v, dict) and k in [c.name for c in self.part_classes]:
                continue
            if "." in k:
                part, key = k.split(".", 1)
                names = [c.name for c in self.part_classes]
                if part not in names:
                    raise FaultError(f"{self.name}: parameter '{k}' names no part ({', '.join(names)})")
                per[names.index(part)][key] = v
            else:
                hit = [i for i, c in enumerate(self.part_classes) if k in c.defaults]
                if not hit:
                    raise FaultError(f"{self.name}: no part has a parameter '{k}'")
                for i in hit:
                    per[i][k] = v
        self.parts = [c(target, targets, per[i], self.seed + i, fault_id=f"{self.id}-{i}")
                      for i, c in enumerate(self.part_classes)]
        for p in self.parts:
            p.injected_at = self.injected_at
        self.params = {p.name: p.params for p in self.parts}

    @classmethod
    def available(cls, backend: str, report=None) -> tuple[bool, str]:
        whys = []
        for c in cls.part_classes:
            ok, why = c.available(backend, report)
            if not ok:
                return False, f"{c.name}: {why}"
            whys.append(f"{c.name} {why}")
        return True, "; ".join(whys)

    @classmethod
    def applies_to(cls, target, targets=None) -> tuple[bool, str]:
        for c in cls.part_classes:
            ok, why = c.applies_to(target, targets)
            if not ok:
                return False, why
        return True, ""

    def _check(self, sb) -> None:
        for p in self.parts:
            p.check(sb, self._report)

    def _inject(self, sb) -> None:
        done = []
        try:
            for p in self.parts:
                p.injected_at = self.injected_at
                p._inject(sb)
                done.append(p)
                p._record_identity(sb)
        except BaseException:
            for p in reversed(done):
                try:
                    p._recover(sb)
                except Exception:
                    pass
            raise
        self.params = {p.name: p.params for p in self.parts}

    def is_active(self, sb) -> bool:
        return any(p.is_active(sb) for p in self.parts)

    def residue(self, sb) -> dict:
        return {p.name: r for p in self.parts if (r := p.residue(sb))}

    def footprint(self) -> tuple[str, ...]:
        return tuple(f for p in self.parts for f in p.footprint())

    def active_parts(self, sb) -> dict[str, bool]:
        return {p.name: p.is_active(sb) for p in self.parts}

    def describe(self, sb) -> dict:
        """One description per part, in the order of the name; symptoms of both. The node is
        observed once, for the sections of both parts."""
        sections = []
        for p in self.parts:
            sections += [s for s in getattr(p, "sections", ()) if s not in sections]
        facts = observe(sb, self.target, sections, self.targets, since=self.injected_at)
        descs = [p.describe_facts(sb, facts) if hasattr(p, "describe_facts") else p.describe(sb)
                 for p in self.parts]
        seen, merged = set(), []
        for d in descs:
            for s in d.get("symptoms", []):
                if s not in seen:
                    seen.add(s)
                    merged.append(s)
        return {"service": self.target.service, "node": self.node_name(sb), "unit": self.target.unit,
                "symptoms": merged, "parts": descs}

    def _recover(self, sb) -> None:
        errors = []
        for p in reversed(self.parts):
            try:
                p._recover(sb)
            except Exception as e:
                errors.append(f"{p.name}: {e}")
        if errors:
            raise FaultError(f"{self.name}: recovery failed: {'; '.join(errors)}")

    def public_params(self) -> dict:
        return {p.name: p.public_params() for p in self.parts}

    def to_record(self) -> dict:
        rec = super().to_record()
        rec["params"] = {p.name: p.params for p in self.parts}
        rec["part_ids"] = [p.id for p in self.parts]
        return rec
