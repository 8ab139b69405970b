"""Operator review decisions in SQLite: what the model proposed, who approved or rejected it,
what running it did, and what the verifier said.

    store = ReviewStore("runs/serve/review.sqlite")          # creates (0700 dir, 0600 file), migrates
    d = store.propose(release="sft-2026-12", source="pasted", report=report, playbook=text, gate=gate)
    store.start_execution(d.id, operator="alice")            # proposed -> executing (one winner)
    store.finish_execution(d.id, verdict=verdict, outcome="success", result=res)
    store.list(fault="cpu-stress", outcome="success")

States (`STATUSES`):

    proposed --reject--> rejected
    proposed --start_execution--> executing --finish_execution--> executed
                                            --interrupt / recover_interrupted--> interrupted

Every state change is one transaction (`BEGIN IMMEDIATE`: the row's state is re-read under the
write lock, so two approvals of the same decision, from any thread, replica or process, give
one winner and one `ReviewError`), and appends an event to the decision's history. WAL journal,
a busy timeout: several Serve replicas and `remed review` may open the same file at once.

Schema migrations (`MIGRATIONS`): `PRAGMA user_version` is the schema version; opening a file
applies the migrations it lacks, in order, in one transaction. A file written by newer code
(a version this code does not know) is refused with one error naming the file and the fix.

Untrusted text: the report and the playbook come from a client and a model; they are stored
as given (bounded in size) and must be escaped wherever they are shown.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

STATUSES = ("proposed", "rejected", "executing", "executed", "interrupted")
SOURCES = ("pasted", "sandbox")
OUTCOMES = ("success", "failure", "infra_failure")

MAX_REPORT_BYTES = 256 * 1024          # the report as JSON
MAX_PLAYBOOK_BYTES = 400 * 1024        # the model's answer text
MAX_DOC_BYTES = 2 * 1024 * 1024        # gate, dry-run, tokens, verdict, result (each, as JSON)
MAX_OPERATOR_CHARS = 64
MAX_RELEASE_CHARS = 256
MAX_REASON_CHARS = 4000
MAX_LIST = 1000
BUSY_TIMEOUT_S = 30.0

_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_SANDBOX_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")          # simulators/sandbox/state.py NAME_RE
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")     # no line breaks, no terminal controls
_CONTROL_BUT_NL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class ReviewError(ValueError):
    """A review operation refused, with a message naming the thing and the fix. `kind` is
    "invalid" (a bad value), "not_found" (no such decision), "conflict" (the decision is not
    in a state that allows this), "database" (the file cannot be used); `http_status` is the
    matching HTTP status for a web layer."""

    _HTTP = {"invalid": 422, "not_found": 404, "conflict": 409, "database": 503}

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.message, self.kind = message, kind

    @property
    def http_status(self) -> int:
        return self._HTTP.get(self.kind, 400)


@dataclass(frozen=True)
class Decision:
    """One proposal and what became of it (a row of `decisions` and its events)."""
    id: str                          # uuid4 hex: stable and URL-safe (/ui/decisions/<id>)
    created_at: float
    updated_at: float
    operator: str                    # who proposed/decided ("" until someone decides)
    release: str                     # the model name or release the proposal came from
    source: str                      # "pasted" | "sandbox"
    sandbox: str | None
    system: str | None               # from the report, where it names them
    service: str | None
    fault: str | None
    report: dict                     # as submitted
    playbook: str                    # the model's answer text: untrusted
    gate: dict | None                # the gate's verdict as the serve pipeline returns it
    dry_run: dict | None             # the syntax/dry-run result
    tokens: dict | None
    generate_s: float | None
    status: str                      # one of STATUSES
    reason: str | None               # why rejected, or what interrupted it
    verdict: dict | None             # the verifier's verdict with its evidence, after execution
    outcome: str | None              # "success" | "failure" | "infra_failure" | None
    events: tuple[dict, ...]         # {at, status, operator, note}, oldest first
    report_sha256: str = ""          # of the report's content (`report_hash`): "the same report"
    result: dict | None = None       # what the execution returned (or what was known when interrupted)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["events"] = [dict(e) for e in self.events]
        return d


def report_hash(report: Mapping[str, Any]) -> str:
    """The identity of a report's content: sha256 of its canonical JSON without `created_at`
    (the same incident observed or pasted twice is the same report)."""
    body = {k: v for k, v in report.items() if k != "created_at"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


# ---- schema and migrations ----------------------------------------------------------------------

def _v1(db: sqlite3.Connection) -> None:
    """The first layout: decisions and their events."""
    db.execute(f"""CREATE TABLE decisions (
        id TEXT PRIMARY KEY, created_at REAL NOT NULL, updated_at REAL NOT NULL,
        operator TEXT NOT NULL DEFAULT '', release TEXT NOT NULL, source TEXT NOT NULL, sandbox TEXT,
        system TEXT, service TEXT, fault TEXT, report TEXT NOT NULL, playbook TEXT NOT NULL,
        gate TEXT, dry_run TEXT, tokens TEXT, generate_s REAL,
        status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
        reason TEXT, verdict TEXT, outcome TEXT)""")
    db.execute("""CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        decision_id TEXT NOT NULL REFERENCES decisions(id),
        at REAL NOT NULL, status TEXT NOT NULL, operator TEXT NOT NULL DEFAULT '', note TEXT NOT NULL DEFAULT '')""")
    db.execute("CREATE INDEX events_by_decision ON events(decision_id, seq)")


def _v2(db: sqlite3.Connection) -> None:
    """The report's content hash (backfilled: export pairs decisions by it), the execution's
    result and owner (the process that runs it: `recover_interrupted` leaves live ones alone),
    and the indexes the history's filters use."""
    db.execute("ALTER TABLE decisions ADD COLUMN report_sha256 TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE decisions ADD COLUMN result TEXT")
    db.execute("ALTER TABLE decisions ADD COLUMN owner TEXT")
    for rid, rep in db.execute("SELECT id, report FROM decisions").fetchall():
        try:
            digest = report_hash(json.loads(rep))
        except (ValueError, TypeError, AttributeError):      # not a JSON object: its text is its identity
            digest = hashlib.sha256(str(rep).encode("utf-8", "surrogatepass")).hexdigest()
        db.execute("UPDATE decisions SET report_sha256 = ? WHERE id = ?", (digest, rid))
    for col in ("created_at", "status", "fault", "outcome", "release", "report_sha256"):
        db.execute(f"CREATE INDEX decisions_by_{col} ON decisions({col})")


# Ordered: MIGRATIONS[k] takes a database from schema version k to k + 1. Append only; never
# edit a migration that has shipped.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1, _v2)
SCHEMA_VERSION = len(MIGRATIONS)


# ---- validation ---------------------------------------------------------------------------------

def _operator(name: Any, required: bool = True) -> str:
    if not isinstance(name, str):
        raise ReviewError(f"operator: expected a name (text), got {type(name).__name__}")
    name = name.strip()
    if required and not name:
        raise ReviewError("operator: a decision needs the operator's name; give who decides")
    if len(name) > MAX_OPERATOR_CHARS or _CONTROL.search(name):
        raise ReviewError(f"operator: a name is one line of at most {MAX_OPERATOR_CHARS} characters, without "
                          f"control characters; give a shorter, plain name")
    return name


def _text(what: str, value: Any, limit: int, required: bool = True, multiline: bool = True) -> str:
    if not isinstance(value, str):
        raise ReviewError(f"{what}: expected text, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise ReviewError(f"{what}: must not be empty")
    if len(value) > limit:
        raise ReviewError(f"{what}: {len(value)} characters, more than {limit}; shorten it")
    if (_CONTROL_BUT_NL if multiline else _CONTROL).search(value):
        raise ReviewError(f"{what}: holds control characters; send plain text")
    return value


def _doc(what: str, value: Any, limit: int = MAX_DOC_BYTES, required: bool = False) -> str | None:
    """A JSON object as stored text, or None."""
    if value is None and not required:
        return None
    if not isinstance(value, Mapping):
        raise ReviewError(f"{what}: expected a JSON object, got {type(value).__name__}")
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=_plain)
    except (TypeError, ValueError) as e:
        raise ReviewError(f"{what}: not storable as JSON ({e}); send plain JSON values") from None
    if len(text.encode("utf-8", "surrogatepass")) > limit:
        raise ReviewError(f"{what}: {len(text.encode('utf-8', 'surrogatepass'))} bytes as JSON, more than "
                          f"{limit}; send a smaller one")
    return text


def _record(what: str, value: Any, limit: int = MAX_DOC_BYTES) -> str | None:
    """What a run reports (verdict, result, what is known), stored whatever it holds: a
    server-side state change must not fail on content. Values JSON cannot hold become text;
    one too large is kept as its top-level keys."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        value = {"value": value}
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=str)
    except ValueError:                      # NaN or infinity: kept as text, so the JSON stays standard
        text = json.dumps(_finite(value), ensure_ascii=False, allow_nan=False, default=str)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        text = json.dumps({"truncated": True, "bytes": size, "keys": [str(k)[:200] for k in list(value)[:200]]})
    return text


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, Mapping):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _note(value: Any, default: str) -> str:
    """A server-side reason as one bounded, printable text."""
    value = value if isinstance(value, str) and value.strip() else default
    return _CONTROL_BUT_NL.sub(" ", value.strip())[:MAX_REASON_CHARS]


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, set, frozenset)):
        return list(v)
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"{type(v).__name__} is not JSON")


def _name_from(report: Mapping[str, Any], key: str) -> str | None:
    v = report.get(key)
    return v[:256] if isinstance(v, str) and v else None


def _check_id(id: Any) -> str:
    if not isinstance(id, str) or not _ID_RE.match(id):
        raise ReviewError(f"decision '{str(id)[:40]}' is unknown: ids are 32 hex characters (`remed review ls`)",
                          "not_found")
    return id


# ---- who runs an execution ----------------------------------------------------------------------

def _proc_start(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def this_owner() -> str:
    """This process, as `host:pid:start` (the start time tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_proc_start(os.getpid())}"


def owner_alive(owner: str | None) -> bool | None:
    """Whether the process an owner string names still runs: True/False on this host, None
    for another host's (not knowable from here)."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return _proc_start(int(pid)) == start


# ---- the store ----------------------------------------------------------------------------------

_COLUMNS = ("id", "created_at", "updated_at", "operator", "release", "source", "sandbox", "system", "service",
            "fault", "report", "playbook", "gate", "dry_run", "tokens", "generate_s", "status", "reason",
            "verdict", "outcome", "report_sha256", "result")
_JSON = ("report", "gate", "dry_run", "tokens", "verdict", "result")


class ReviewStore:
    """The decisions of one SQLite file (module docstring). Thread-safe; open one per process
    (or per replica), close it when done."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._lock = threading.RLock()
        self._db = self._open()
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    # -- opening

    def _open(self) -> sqlite3.Connection:
        p = self.path
        if p.exists() and not p.is_file():
            raise ReviewError(f"review database {p}: exists and is not a file; point review_db (--db) at a file",
                              "database")
        try:
            if not p.parent.exists():
                p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            st = p.stat()
            if st.st_uid == os.getuid() and st.st_mode & 0o077:
                os.chmod(p, 0o600)            # decisions name people and hold reports: not for others
        except OSError as e:
            raise ReviewError(f"review database {p}: cannot create or open it ({e.strerror}); point review_db "
                              f"(--db) at a writable path", "database") from None
        try:
            db = sqlite3.connect(str(p), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as e:
            raise ReviewError(f"review database {p}: not a usable SQLite database ({e}); move it away or point "
                              f"review_db (--db) at another file", "database") from None
        return db

    def _migrate(self) -> None:
        with self._tx():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ReviewError(
                    f"review database {self.path}: schema version {version} is newer than this code knows "
                    f"({SCHEMA_VERSION}); upgrade e2e-reme (`pip install -e .` in an up-to-date checkout) or point "
                    f"review_db (--db) at another file", "database")
            for k in range(version, SCHEMA_VERSION):
                MIGRATIONS[k](self._db)
            if version != SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    class _Tx:
        def __init__(self, store: "ReviewStore"):
            self.store = store

        def __enter__(self):
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as e:
                self.store._lock.release()
                raise ReviewError(f"review database {self.store.path}: cannot write ({e}); retry, or check that "
                                  f"no process holds it locked", "database") from None
            return self.store._db

        def __exit__(self, exc_type, exc, tb):
            db = self.store._db
            try:
                if exc_type is None:
                    try:
                        db.execute("COMMIT")
                    except sqlite3.DatabaseError as e:
                        db.execute("ROLLBACK")
                        raise ReviewError(f"review database {self.store.path}: the change was not saved ({e}); "
                                          f"retry", "database") from None
                else:
                    db.execute("ROLLBACK")
            finally:
                self.store._lock.release()

    def _tx(self) -> "_Tx":
        """One write transaction (BEGIN IMMEDIATE .. COMMIT, ROLLBACK on error)."""
        return ReviewStore._Tx(self)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "ReviewStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state changes

    def propose(self, *, release: str, source: str, report: Mapping[str, Any], playbook: str,
                sandbox: str | None = None, gate: Mapping | None = None, dry_run: Mapping | None = None,
                tokens: Mapping | None = None, generate_s: float | None = None, operator: str = "") -> Decision:
        """Record a new proposal (status proposed)."""
        release = _text("release", release, MAX_RELEASE_CHARS, multiline=False)
        if source not in SOURCES:
            raise ReviewError(f"source: '{str(source)[:40]}' is not one of {', '.join(SOURCES)}")
        if sandbox is not None and (not isinstance(sandbox, str) or not _SANDBOX_RE.match(sandbox)):
            raise ReviewError("sandbox: a sandbox name is 1-31 lowercase letters, digits and '-', starting with a "
                              "letter (`remed sandbox ls`)")
        if source == "sandbox" and sandbox is None:
            raise ReviewError("sandbox: a proposal for a sandbox's report names the sandbox")
        rep = _doc("report", report, MAX_REPORT_BYTES, required=True)
        if not isinstance(playbook, str):
            raise ReviewError(f"playbook: expected the model's answer text, got {type(playbook).__name__}")
        if len(playbook.encode("utf-8", "surrogatepass")) > MAX_PLAYBOOK_BYTES:
            raise ReviewError(f"playbook: more than {MAX_PLAYBOOK_BYTES} bytes; a remediation playbook is far "
                              f"smaller: generate with fewer tokens")
        if generate_s is not None and (not isinstance(generate_s, (int, float)) or not 0 <= generate_s < 1e9):
            raise ReviewError("generate_s: seconds, a number >= 0")
        operator = _operator(operator, required=False)
        now, rid = time.time(), uuid.uuid4().hex
        row = {"id": rid, "created_at": now, "updated_at": now, "operator": operator, "release": release,
               "source": source, "sandbox": sandbox, "system": _name_from(report, "system"),
               "service": _name_from(report, "service"), "fault": _name_from(report, "fault_kind"),
               "report": rep, "playbook": playbook, "gate": _doc("gate", gate), "dry_run": _doc("dry_run", dry_run),
               "tokens": _doc("tokens", tokens), "generate_s": None if generate_s is None else float(generate_s),
               "status": "proposed", "report_sha256": report_hash(report)}
        with self._tx() as db:
            db.execute(f"INSERT INTO decisions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                       tuple(row.values()))
            self._event(db, rid, now, "proposed", operator, f"proposed by {release}")
            return self._get(db, rid)

    def reject(self, id: str, *, operator: str, reason: str) -> Decision:
        """proposed -> rejected, with who and why."""
        operator = _operator(operator)
        reason = _text("reason", reason, MAX_REASON_CHARS)
        return self._move(id, ("proposed",), "rejected", operator, reason, reason=reason)

    def start_execution(self, id: str, *, operator: str) -> Decision:
        """proposed -> executing, by `operator`, owned by this process. Atomic: of two
        approvals of the same decision (any threads or processes), the second is a
        ReviewError (conflict)."""
        operator = _operator(operator)
        return self._move(id, ("proposed",), "executing", operator, "approved for execution", owner=this_owner())

    def finish_execution(self, id: str, *, verdict: Mapping | None, outcome: str,
                         result: Mapping | None = None) -> Decision:
        """executing -> executed, with the verifier's verdict and the outcome."""
        if outcome not in OUTCOMES:
            raise ReviewError(f"outcome: '{str(outcome)[:40]}' is not one of {', '.join(OUTCOMES)}")
        return self._move(id, ("executing",), "executed", None, f"executed: {outcome}",
                          verdict=_record("verdict", verdict), outcome=outcome, result=_record("result", result))

    def interrupt(self, id: str, *, known: Mapping | None = None, reason: str) -> Decision:
        """executing -> interrupted, with what is known of the run (kept as `result`). Never
        refused for its content (the reason is cut and cleaned, `known` stored as it can be)."""
        reason = _note(reason, "interrupted")
        return self._move(id, ("executing",), "interrupted", None, reason, reason=reason,
                          result=_record("known", known))

    def recover_interrupted(self, reason: str = "server stopped during execution", *,
                            other_hosts: bool = False) -> list[Decision]:
        """Mark as interrupted every executing decision whose process is gone (called at
        server start): one run by a live process (another replica, the CLI) is left alone;
        one run on another host only with `other_hosts` (its liveness is not knowable here)."""
        reason = _note(reason, "server stopped during execution")
        out = []
        with self._tx() as db:
            for rid, owner in db.execute("SELECT id, owner FROM decisions WHERE status = 'executing'").fetchall():
                alive = owner_alive(owner)
                if alive or (alive is None and not other_hosts):
                    continue
                note = f"{reason} (run by {owner or 'an unknown process'}, no longer running)"
                out.append(self._set(db, rid, "interrupted", None, note, reason=reason))
        return out

    def _move(self, id: str, allowed: Sequence[str], to: str, operator: str | None, note: str,
              **fields: Any) -> Decision:
        rid = _check_id(id)
        with self._tx() as db:
            row = db.execute("SELECT status, operator FROM decisions WHERE id = ?", (rid,)).fetchone()
            if row is None:
                raise ReviewError(f"decision {rid} is unknown (`remed review ls`)", "not_found")
            if row[0] not in allowed:
                raise ReviewError(f"decision {rid} is {row[0]}; it can become {to} only when "
                                  f"{' or '.join(allowed)}", "conflict")
            return self._set(db, rid, to, operator, note, **fields)

    def _set(self, db: sqlite3.Connection, rid: str, to: str, operator: str | None, note: str,
             **fields: Any) -> Decision:
        now = time.time()
        cols = {"status": to, "updated_at": now, **fields}
        if operator is not None:
            cols["operator"] = operator
        db.execute(f"UPDATE decisions SET {', '.join(f'{k} = ?' for k in cols)} WHERE id = ?",
                   (*cols.values(), rid))
        who = operator if operator is not None else db.execute(
            "SELECT operator FROM decisions WHERE id = ?", (rid,)).fetchone()[0]
        self._event(db, rid, now, to, who, note)
        return self._get(db, rid)

    @staticmethod
    def _event(db: sqlite3.Connection, rid: str, at: float, status: str, operator: str, note: str) -> None:
        db.execute("INSERT INTO events (decision_id, at, status, operator, note) VALUES (?, ?, ?, ?, ?)",
                   (rid, at, status, operator, note[:MAX_REASON_CHARS]))

    # -- reading

    def get(self, id: str) -> Decision | None:
        """The decision, or None for an unknown (or malformed) id."""
        if not isinstance(id, str) or not _ID_RE.match(id):
            return None
        with self._lock:
            return self._get(self._db, id)

    def list(self, *, fault: str | None = None, outcome: str | None = None, release: str | None = None,
             status: str | None = None, limit: int = 100, offset: int = 0) -> list[Decision]:
        """Decisions, newest first, matching every filter given."""
        if status is not None and status not in STATUSES:
            raise ReviewError(f"status: '{str(status)[:40]}' is not one of {', '.join(STATUSES)}")
        if not isinstance(limit, int) or not 0 <= limit <= MAX_LIST:
            raise ReviewError(f"limit: between 0 and {MAX_LIST}")
        if not isinstance(offset, int) or offset < 0:
            raise ReviewError("offset: an integer >= 0")
        where, args = self._where(fault=fault, outcome=outcome, release=release, status=status)
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM decisions {where} "
                                    f"ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
            return self._decisions(self._db, rows)

    def count(self, *, fault: str | None = None, outcome: str | None = None, release: str | None = None,
              status: str | None = None) -> int:
        """How many decisions match (for paging the history)."""
        where, args = self._where(fault=fault, outcome=outcome, release=release, status=status)
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM decisions {where}", args).fetchone()[0]

    def all(self, batch: int = 500) -> Iterator[Decision]:
        """Every decision, in the order they were proposed (what `remed review export` reads)."""
        last = 0
        while True:
            with self._lock:
                rows = self._db.execute(f"SELECT rowid, {', '.join(_COLUMNS)} FROM decisions WHERE rowid > ? "
                                        f"ORDER BY rowid LIMIT ?", (last, batch)).fetchall()
                got = self._decisions(self._db, [r[1:] for r in rows])
            yield from got
            if len(rows) < batch:
                return
            last = rows[-1][0]

    def facets(self) -> dict:
        """The distinct faults, outcomes, releases and statuses present (the history's filters)."""
        out = {}
        with self._lock:
            for key, col in (("faults", "fault"), ("outcomes", "outcome"), ("releases", "release"),
                             ("statuses", "status")):
                out[key] = [r[0] for r in self._db.execute(
                    f"SELECT DISTINCT {col} FROM decisions WHERE {col} IS NOT NULL AND {col} != '' ORDER BY {col}")]
        return out

    @staticmethod
    def _where(**filters: Any) -> tuple[str, tuple]:
        parts, args = [], []
        for col, v in filters.items():
            if v is not None and v != "":
                if not isinstance(v, str):
                    raise ReviewError(f"{col}: a filter value is text")
                parts.append(f"{col} = ?")
                args.append(v)
        return ("WHERE " + " AND ".join(parts)) if parts else "", tuple(args)

    def _get(self, db: sqlite3.Connection, rid: str) -> Decision | None:
        rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM decisions WHERE id = ?", (rid,)).fetchall()
        got = self._decisions(db, rows)
        return got[0] if got else None

    @staticmethod
    def _decisions(db: sqlite3.Connection, rows: Sequence[tuple]) -> list[Decision]:
        if not rows:
            return []
        ids = [r[0] for r in rows]
        events: dict[str, list[dict]] = {i: [] for i in ids}
        for k in range(0, len(ids), 500):
            chunk = ids[k:k + 500]
            for rid, at, st, op, note in db.execute(
                    f"SELECT decision_id, at, status, operator, note FROM events WHERE decision_id IN "
                    f"({', '.join('?' * len(chunk))}) ORDER BY seq", chunk):
                events[rid].append({"at": at, "status": st, "operator": op, "note": note})
        out = []
        for r in rows:
            d = dict(zip(_COLUMNS, r))
            for k in _JSON:
                d[k] = json.loads(d[k]) if d[k] is not None else None
            out.append(Decision(**d, events=tuple(events[d["id"]])))
        return out


__all__ = ["STATUSES", "SOURCES", "OUTCOMES", "Decision", "ReviewError", "ReviewStore", "report_hash",
           "MIGRATIONS", "SCHEMA_VERSION", "MAX_REPORT_BYTES", "MAX_PLAYBOOK_BYTES"]
