"""What each console page shows, read from the read model's SQLite file (never from the broker).

These functions run on the console's query thread with a :class:`~sagalog.readmodel.ReadModel`
that never catches up itself (``catch_up=False`` everywhere): catching up is the broker thread's
job (:mod:`sagacli.console.backend`). The SQL the read model has no method for (a text search on
ids, a time range, counts per partition) is here, against the model's ``db``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from sagacli.console import timeline
from sagalog.readmodel import HistoryEntry, ReadModel, SagaSummary
from sagalog.records import SagaStatus

STATUSES = tuple(s.value for s in SagaStatus)
#: The read model's partial index on sagas with an open incident has this condition, word for word.
_HAS_INCIDENT = "incidents != '[]'"
#: "Started within" choices of the list's time filter: (seconds, label).
WITHIN = ((300, "last 5 min"), (3600, "last hour"), (86400, "last 24 h"), (7 * 86400, "last 7 days"))
DEFAULT_LIMIT = 100
MAX_LIMIT = 5000


# --- the saga list ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """The saga list's filters, from the query string (every field optional)."""

    status: str | None = None
    saga_type: str | None = None
    q: str | None = None  # substring of the saga id
    within_s: int | None = None
    since: str | None = None  # datetime-local text, server time
    until: str | None = None
    incident: bool = False  # only sagas with an open incident
    limit: int = DEFAULT_LIMIT
    errors: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def parse(cls, params: Any) -> Filters:
        """From request query parameters; a value that makes no sense is dropped with a message."""
        errors: list[str] = []

        def text(name: str) -> str | None:
            value = (params.get(name) or "").strip()
            return value or None

        status = text("status")
        if status is not None and status.upper() not in STATUSES:
            errors.append(f"unknown status {status!r}")
            status = None
        within: int | None = None
        if text("within"):
            try:
                within = max(1, int(text("within") or 0))
            except ValueError:
                errors.append("'started within' must be a number of seconds")
        limit = DEFAULT_LIMIT
        if text("limit"):
            try:
                limit = min(MAX_LIMIT, max(1, int(text("limit") or 0)))
            except ValueError:
                errors.append("limit must be a number")
        since, until = text("since"), text("until")
        for name, value in (("from", since), ("to", until)):
            if value is not None and _parse_local(value) is None:
                errors.append(f"'{name}' {value!r} is not a date and time (YYYY-MM-DDTHH:MM)")
        return cls(
            status=status.upper() if status else None,
            saga_type=text("type"),
            q=text("q"),
            within_s=within,
            since=since if since and _parse_local(since) is not None else None,
            until=until if until and _parse_local(until) is not None else None,
            incident=text("incident") not in (None, "0", "false"),
            limit=limit,
            errors=tuple(errors),
        )

    def query(self, **changes: Any) -> str:
        """The query string of these filters with some changed (``None`` drops one)."""
        f = replace(self, **changes)
        pairs = {
            "status": f.status,
            "type": f.saga_type,
            "q": f.q,
            "within": f.within_s,
            "since": f.since,
            "until": f.until,
            "incident": 1 if f.incident else None,
            "limit": None if f.limit == DEFAULT_LIMIT else f.limit,
        }
        return urlencode({k: v for k, v in pairs.items() if v is not None})

    @property
    def active(self) -> bool:
        return any((self.status, self.saga_type, self.q, self.within_s, self.since, self.until, self.incident))

    def where(self, now_ms: int, *, with_status: bool = True, with_incident: bool = True) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if with_incident and self.incident:
            clauses.append(_HAS_INCIDENT)
        if with_status and self.status:
            clauses.append("status = ?")
            args.append(self.status)
        if self.saga_type:
            clauses.append("type = ?")
            args.append(self.saga_type)
        if self.q:
            escaped = self.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            clauses.append("id LIKE ? ESCAPE '\\'")  # case-insensitive for ASCII
            args.append(f"%{escaped}%")
        if self.within_s:
            clauses.append("started_ms >= ?")
            args.append(now_ms - self.within_s * 1000)
        if self.since:
            clauses.append("started_ms >= ?")
            args.append(_parse_local(self.since))
        if self.until:
            clauses.append("started_ms < ?")
            args.append(_parse_local(self.until))
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def _parse_local(text: str) -> int | None:
    """``YYYY-MM-DDTHH:MM[:SS]`` (an HTML datetime-local value) in the server's time zone, as ms."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return int(moment.timestamp() * 1000)


def saga_types(model: ReadModel) -> list[str]:
    return [r[0] for r in model.db.execute("SELECT DISTINCT type FROM sagas ORDER BY type")]


def sagas_page(model: ReadModel, filters: Filters, *, with_types: bool) -> dict[str, Any]:
    now_ms = int(time.time() * 1000)
    where, args = filters.where(now_ms)
    rows = model.db.execute(
        f"SELECT {SagaSummary.COLUMNS} FROM sagas{where} ORDER BY started_ms DESC, id LIMIT ?",  # noqa: S608 - placeholders only
        [*args, filters.limit],
    ).fetchall()
    sagas = [SagaSummary.from_row(r) for r in rows]
    # Counts by status among the sagas the other filters select (all of them without filters).
    other, other_args = filters.where(now_ms, with_status=False)
    by_status = dict.fromkeys(STATUSES, 0)
    for status, n in model.db.execute(f"SELECT status, count(*) FROM sagas{other} GROUP BY status", other_args):  # noqa: S608
        by_status[status] = n
    matching = by_status[filters.status] if filters.status else sum(by_status.values())
    total = int(model.db.execute("SELECT count(*) FROM sagas").fetchone()[0])
    # Sagas with an open incident among those the other filters select (the status filter aside).
    plain, plain_args = filters.where(now_ms, with_status=False, with_incident=False)
    incidents = int(
        model.db.execute(
            f"SELECT count(*) FROM sagas{plain}{' AND ' if plain else ' WHERE '}{_HAS_INCIDENT}",  # noqa: S608
            plain_args,
        ).fetchone()[0]
    )
    return {
        "sagas": sagas,
        "by_status": by_status,
        "filtered_total": sum(by_status.values()),
        "matching": matching,
        "total": total,
        "incidents": incidents,
        "types": saga_types(model) if with_types else [],
        "now_ms": now_ms,
    }


# --- one saga ---------------------------------------------------------------------------------


def pretty_json(text: str | None) -> str | None:
    """JSON text indented for reading; anything else as it is."""
    if text is None:
        return None
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def saga_page(model: ReadModel, saga_id: str) -> dict[str, Any]:
    """Everything the saga page shows (raises SagaNotFound / SagaRemoved for an unknown id)."""
    view = model.view(saga_id, catch_up=False)
    state, definition = view.state, view.definition
    now_ms = int(time.time() * 1000)
    steps = {s.name: s for s in definition.steps}
    line = timeline.build(
        steps=state.steps,
        participants={name: s.participant for name, s in steps.items()},
        compensable={name: s.compensable for name, s in steps.items()},
        history=view.history,
        started_ms=state.started_ms,
        updated_ms=state.updated_ms,
        terminal=state.status.terminal,
        now_ms=now_ms,
    )
    step_rows = [
        {
            "name": s.name,
            "participant": steps[s.name].participant if s.name in steps else "",
            "depends_on": definition.dependencies(s.name) if s.name in steps else (),
            "compensable": steps[s.name].compensable if s.name in steps else True,
            "status": s.status.value,
            "attempts": s.attempt,
            "comp_attempts": s.comp_attempt,
            "output": pretty_json(s.output),
            "error": s.error,
            "deadline_ms": s.deadline_ms or None,
        }
        for s in state.steps
    ]
    return {
        "view": view,
        "state": state,
        "definition": definition,
        "timeline": line,
        "steps": step_rows,
        "payload": pretty_json(state.payload),
        "outputs": {s.name: pretty_json(s.output) for s in state.steps if s.output not in (None, "", "{}")},
        "records": [_record(entry, state.started_ms) for entry in view.history],
        # What the actions panel offers: it is re-rendered only when this changes.
        "actions_key": ";".join(
            [state.status.value, *(f"{i.step}@{i.opened_ms}" for i in state.incidents)]
        ),
        "now_ms": now_ms,
    }


def _record(entry: HistoryEntry, started_ms: int) -> dict[str, Any]:
    return {
        "entry": entry,
        "plus_ms": entry.timestamp_ms - started_ms,
        "event_json": json.dumps(entry.event, separators=(", ", ": "), ensure_ascii=False) if entry.event else "",
    }


# --- partitions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Offsets:
    """Offsets only the broker knows, fetched by the broker thread (None: not known)."""

    log_end: dict[int, int] = field(default_factory=dict)
    inbox_end: dict[int, int] = field(default_factory=dict)
    inbox_committed: dict[int, int] = field(default_factory=dict)
    group_id: str = ""
    error: str | None = None
    read_ms: int = 0


def partitions_page(model: ReadModel, offsets: Offsets | None, stale: dict[int, int]) -> dict[str, Any]:
    db = model.db
    row = db.execute("SELECT value FROM meta WHERE key = 'partitions'").fetchone()
    stats = model.partition_stats()
    count = max(int(row[0]) if row else 0, max(stats, default=-1) + 1)
    claims = model.claims()
    per: dict[int, dict[str, int]] = {p: dict.fromkeys(STATUSES, 0) for p in range(count)}
    for p, status, n in db.execute("SELECT partition, status, count(*) FROM sagas GROUP BY partition, status"):
        per.setdefault(p, dict.fromkeys(STATUSES, 0))[status] = n
    offsets = offsets or Offsets()
    rows = []
    for p in sorted(per):
        s = stats.get(p, {"next_offset": 0, "records": 0, "decode_errors": 0, "rejected": 0})
        claim = claims.get(p)
        next_offset = stale.get(p, s["next_offset"])
        end = offsets.log_end.get(p)
        inbox_end, committed = offsets.inbox_end.get(p), offsets.inbox_committed.get(p)
        rows.append(
            {
                "partition": p,
                "claim": claim,
                "counts": per[p],
                "live": per[p]["RUNNING"] + per[p]["COMPENSATING"],
                "sagas": sum(per[p].values()),
                "next_offset": next_offset,
                "records": s["records"],
                "decode_errors": s["decode_errors"],
                "rejected": s["rejected"],
                # A log end below what was read is a broker under-reporting it (see the page's note).
                "log_end": None if end is None else max(end, next_offset),
                "lag": None if end is None else max(0, end - next_offset),
                "stale": p in stale,
                "inbox_end": inbox_end,
                "inbox_committed": committed,
                "backlog": None if inbox_end is None or committed is None else max(0, inbox_end - committed),
            }
        )
    owners = sorted(Counter(r["claim"].owner for r in rows if r["claim"] is not None).items())
    return {"rows": rows, "owners": owners, "offsets": offsets, "unclaimed": sum(1 for r in rows if r["claim"] is None)}


def known_sagas(model: ReadModel, ids: list[str]) -> set[str]:
    """Which of these ids are sagas in the read model (to link dead letters to their saga)."""
    return set(model.statuses(ids)) if ids else set()
