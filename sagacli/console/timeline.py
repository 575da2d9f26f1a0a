"""A saga's time line, drawn from its log records: one row per step, execute and compensate bars
on one time axis. Pure (no I/O): the console renders what :func:`build` returns.

Every bar comes from the records themselves, not from the snapshot, so the time line shows what
happened, in the order the managers decided it:

* ``StepBegun`` opens an execute attempt. Its command leaves at ``dispatch_at_ms`` (later than
  the record when a retry waits out its backoff: that wait is drawn as a thin "backoff" bar).
  The attempt ends at the step's ``StepEnded`` (succeeded, failed, timed out), at the next
  ``StepBegun`` of the step (a retry: the new record's ``last_error`` says why the attempt
  failed) or at its ``CompensationBegun`` (the step was still in flight when the saga aborted).
* ``CompensationBegun`` / ``CompensationEnded`` do the same for compensation attempts.
* ``SagaAborting``, ``SagaAborted`` and ``SagaEnded`` are markers across every row.
* ``IncidentOpened`` ends the compensation attempt that failed (the participant cannot undo the
  step, or the retry budget is spent) and puts a flag on the step's row; ``IncidentRetried`` and
  ``IncidentResolved`` (an operator's answers) are flags too.

What is still open when the records end runs to "now" for a saga still going, else to its last
record. Records the fold rejected (stale epochs, repeats) are not drawn: the raw record table
shows them with the reason. A saga whose first records were compacted away starts its time line
at the oldest record still on the log (``partial``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Bar kinds (CSS classes): the execute attempt's outcome, or the compensation's.
OUTCOME_CLASS = {
    "SUCCEEDED": "ok",
    "FAILED": "failed",
    "TIMED_OUT": "timedout",
    "RETRIED": "retried",
    "IN_FLIGHT_AT_ABORT": "interrupted",
    "RUNNING": "running",
    "COMPENSATED": "compensated",
    "COMPENSATING": "compensating",
    "COMP_RETRIED": "comp-retried",
    "COMP_FAILED": "comp-failed",
    "BACKOFF": "backoff",
}


@dataclass
class Bar:
    """One attempt (or a backoff wait) of one step, placed on the axis in percent."""

    kind: str  # "execute" | "compensate" | "backoff"
    attempt: int
    start_ms: int
    end_ms: int
    outcome: str  # a key of OUTCOME_CLASS
    error: str | None = None
    output: str | None = None
    deadline_ms: int | None = None
    open: bool = False  # still running when the records end
    lane: str = ""  # "execute" or "compensate": where a backoff wait is drawn
    left: float = 0.0
    width: float = 0.0

    def __post_init__(self) -> None:
        self.lane = self.lane or ("compensate" if self.kind == "compensate" else "execute")

    @property
    def css(self) -> str:
        return OUTCOME_CLASS.get(self.outcome, "running")

    @property
    def duration_ms(self) -> int:
        return max(0, self.end_ms - self.start_ms)

    @property
    def label(self) -> str:
        if self.kind == "backoff":
            return "backoff"
        what = "execute" if self.kind == "execute" else "compensate"
        outcome = self.outcome.lower().replace("_", " ")
        if self.outcome in ("RETRIED", "COMP_RETRIED"):
            outcome = "failed, retried"
        elif self.outcome == "COMP_FAILED":
            outcome = "failed, an incident opened"
        elif self.outcome == "IN_FLIGHT_AT_ABORT":
            outcome = "in flight when the saga aborted"
        return f"{what} #{self.attempt}: {outcome}"

    @property
    def title(self) -> str:
        """The tooltip: what, how long, and the error or output."""
        text = f"{self.label} ({_duration(self.duration_ms)}{', still running' if self.open else ''})"
        if self.error:
            text += f"\nerror: {self.error}"
        if self.output and self.output != "{}":
            text += f"\noutput: {self.output}"
        return text


@dataclass
class StepRow:
    name: str
    participant: str
    status: str
    compensable: bool
    failing: bool = False
    error: str | None = None
    bars: list[Bar] = field(default_factory=list)
    #: Incident events on this step (opened, retried, resolved), drawn as flags on its row.
    flags: list[Marker] = field(default_factory=list)

    @property
    def attempts(self) -> int:
        return max((b.attempt for b in self.bars if b.kind == "execute"), default=0)

    @property
    def compensation_attempts(self) -> int:
        return max((b.attempt for b in self.bars if b.kind == "compensate"), default=0)


@dataclass
class Marker:
    at_ms: int
    kind: str  # "begun" | "aborting" | "aborted" | "ended"
    label: str
    left: float = 0.0


@dataclass
class Tick:
    left: float
    label: str


@dataclass
class Timeline:
    start_ms: int
    end_ms: int
    rows: list[StepRow]
    markers: list[Marker]
    ticks: list[Tick]
    partial: bool  # the oldest records were compacted away
    live: bool  # the saga has not ended: open bars run to now

    @property
    def span_ms(self) -> int:
        return self.end_ms - self.start_ms

    @property
    def failing(self) -> StepRow | None:
        return next((r for r in self.rows if r.failing), None)

    @property
    def compensated(self) -> bool:
        return any(b.kind == "compensate" for r in self.rows for b in r.bars)


def _get(event: dict[str, Any], key: str) -> Any:
    value = event.get(key)
    return value if value not in ("", None) else None


def build(
    *,
    steps: Sequence[Any],
    participants: dict[str, str],
    compensable: dict[str, bool],
    history: Iterable[Any],
    started_ms: int,
    updated_ms: int,
    terminal: bool,
    now_ms: int,
) -> Timeline:
    """The time line of one saga.

    ``steps``: the snapshot's steps (objects with ``name``, ``status``, ``error``, in definition
    order); ``history``: its log records (:class:`sagalog.readmodel.HistoryEntry`, log order).
    """
    rows = {
        s.name: StepRow(
            name=s.name,
            participant=participants.get(s.name, ""),
            status=str(s.status),
            compensable=compensable.get(s.name, True),
            error=s.error,
        )
        for s in steps
    }
    open_exec: dict[str, Bar] = {}
    open_comp: dict[str, Bar] = {}
    markers: list[Marker] = []
    records = [e for e in history if e.rejected is None and e.event_type != "(undecodable)"]
    first_seq = min((e.seq for e in records if e.seq is not None), default=1)
    failed_step: str | None = None

    def row(name: str) -> StepRow:
        if name not in rows:  # a step the snapshot does not list (should not happen): show it anyway
            rows[name] = StepRow(name=name, participant=participants.get(name, ""), status="?", compensable=True)
        return rows[name]

    def close(bars: dict[str, Bar], step: str, at: int, outcome: str, error: str | None = None) -> None:
        bar = bars.pop(step, None)
        if bar is not None:
            bar.end_ms, bar.outcome, bar.open = max(at, bar.start_ms), outcome, False
            if error:
                bar.error = error

    def begin(bars: dict[str, Bar], kind: str, step: str, at: int, event: dict[str, Any]) -> None:
        dispatch = _get(event, "dispatch_at_ms") or at
        if dispatch > at:
            row(step).bars.append(Bar("backoff", int(event.get("attempt") or 1), at, dispatch, "BACKOFF", lane=kind))
        bar = Bar(
            kind,
            int(event.get("attempt") or 1),
            max(at, dispatch),
            max(at, dispatch),
            "RUNNING" if kind == "execute" else "COMPENSATING",
            deadline_ms=_get(event, "deadline_ms"),
            open=True,
        )
        bars[step] = bar
        row(step).bars.append(bar)

    for entry in records:
        event, at, kind = entry.event, entry.timestamp_ms, entry.event_type
        step = event.get("step")
        if kind == "StepBegun" and step:
            # A retry: the previous attempt failed (its error is this record's last_error).
            close(open_exec, step, at, "RETRIED", _get(event, "last_error"))
            begin(open_exec, "execute", step, at, event)
        elif kind == "StepEnded" and step:
            bar = open_exec.get(step)
            if bar is not None:
                bar.output = _get(event, "output")
            close(open_exec, step, at, str(event.get("outcome") or "SUCCEEDED"), _get(event, "error"))
        elif kind == "CompensationBegun" and step:
            close(open_exec, step, at, "IN_FLIGHT_AT_ABORT")
            close(open_comp, step, at, "COMP_RETRIED", _get(event, "last_error"))
            begin(open_comp, "compensate", step, at, event)
        elif kind == "CompensationEnded" and step:
            bar = open_comp.get(step)
            if bar is not None:
                bar.output = _get(event, "output")
            close(open_comp, step, at, "COMPENSATED")
        elif kind == "IncidentOpened" and step:
            reason = _get(event, "reason")
            close(open_comp, step, at, "COMP_FAILED", reason)
            row(step).flags.append(Marker(at, "incident", f"incident opened: {reason}"))
        elif kind in ("IncidentRetried", "IncidentResolved") and step:
            what = "retried" if kind == "IncidentRetried" else "resolved as compensated"
            who = event.get("operator") or "an operator"
            row(step).flags.append(Marker(at, what.split()[0], f"{what} by {who}: {event.get('reason') or ''}"))
        elif kind == "SagaBegun":
            markers.append(Marker(at, "begun", "begun"))
        elif kind == "SagaAborting":
            failed_step = _get(event, "failed_step")
            markers.append(Marker(at, "aborting", f"aborting: {event.get('reason') or ''}"))
        elif kind == "SagaAborted":
            markers.append(Marker(at, "aborted", "aborted"))
        elif kind == "SagaEnded":
            markers.append(Marker(at, "ended", "completed"))

    last = max([updated_ms, *(e.timestamp_ms for e in records)])
    # Something in flight runs to now; a saga that only waits (an incident) ends at its last record.
    end = max(last, now_ms) if not terminal and (open_exec or open_comp) else last
    for bars in (open_exec, open_comp):
        for bar in bars.values():
            bar.end_ms, bar.open = max(bar.start_ms, end), not terminal
    start = min([started_ms, *(e.timestamp_ms for e in records)]) if records else started_ms

    # The failing step: the one the abort names, else any step that ended FAILED / TIMED_OUT.
    failing = failed_step or next(
        (r.name for r in rows.values() if r.status in ("FAILED", "TIMED_OUT")), None
    )
    if failing is not None and failing in rows:
        rows[failing].failing = True
        if rows[failing].error is None:
            rows[failing].error = next(
                (b.error for b in reversed(rows[failing].bars) if b.kind == "execute" and b.error), None
            )

    timeline = Timeline(
        start_ms=start,
        end_ms=max(end, start + 1),
        rows=list(rows.values()),
        markers=markers,
        ticks=[],
        partial=first_seq > 1,
        live=not terminal,
    )
    _place(timeline)
    return timeline


def _place(timeline: Timeline) -> None:
    """Percent positions of every bar and marker, and the axis ticks."""
    span = timeline.span_ms

    def pct(ms: int) -> float:
        return round(100.0 * (ms - timeline.start_ms) / span, 3)

    for row in timeline.rows:
        for bar in row.bars:
            bar.left = pct(bar.start_ms)
            bar.width = round(max(0.0, pct(bar.end_ms) - bar.left), 3)
    for marker in [*timeline.markers, *(f for row in timeline.rows for f in row.flags)]:
        marker.left = pct(marker.at_ms)
    step = _nice_step(span)
    timeline.ticks = [Tick(pct(timeline.start_ms + t), f"+{_duration(t)}") for t in range(0, span + 1, step)]


def _nice_step(span_ms: int, ticks: int = 6) -> int:
    """A round tick interval (1, 2 or 5 times a power of ten ms) giving at most ``ticks`` intervals."""
    raw = max(1.0, span_ms / ticks)
    magnitude = 1
    while magnitude * 10 <= raw:
        magnitude *= 10
    for factor in (1, 2, 5, 10):
        if magnitude * factor >= raw:
            return magnitude * factor
    return magnitude * 10


def _duration(ms: int) -> str:
    if ms < 1000:
        return f"{ms} ms"
    if ms < 120_000:
        return f"{ms / 1000:.3g} s" if ms < 10_000 else f"{ms / 1000:.1f} s"
    return f"{ms / 60_000:.1f} min"
