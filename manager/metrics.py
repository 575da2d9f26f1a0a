"""Prometheus metrics of a manager (``saga manager --metrics-port P`` serves them on ``/metrics``).

Counters and histograms are updated where things happen (a decision applied, a takeover, a
transaction); the gauges of what is in flight are computed when Prometheus scrapes, from the
manager's own memory, so the hot path pays nothing for them. Labels are bounded sets: saga type,
step, action, partition, outcome; never a saga id.

===========================================  =================================================
``saga_sagas_started_total``                 sagas begun, by ``saga_type``
``saga_sagas_ended_total``                   sagas ended, by ``saga_type`` and ``outcome``
``saga_duration_seconds``                    start to end, by ``saga_type`` and ``outcome``
``saga_step_attempts_total``                 attempts sent, by ``saga_type``/``step``/``action``
``saga_step_retries_total``                  attempts after the first
``saga_step_duration_seconds``               one attempt, dispatch to its end (execute or compensate)
``saga_dead_letters_total``                  inbox messages dead-lettered, by ``kind``
``saga_sagas_in_flight``                     live sagas, by ``saga_type`` and ``partition``
``saga_sagas_compensating``                  of those, compensating
``saga_compensations_retrying``              compensations past their first attempt, by ``saga_type``
``saga_oldest_in_flight_step_age_seconds``   since the oldest running attempt was dispatched
``saga_partition_epoch``                     owner epoch of each served partition
``saga_inbox_lag_records``                   inbox records not read yet, by ``partition``
``saga_takeovers_total``                     takeovers, by ``partition``
``saga_takeover_duration_seconds``           granted to claimed (fencing + replay + claim)
``saga_replay_records_total``                log records read by takeovers, by ``partition``
``saga_replay_duration_seconds``             the replay part of a takeover
``saga_transactions_total``                  by ``partition`` and ``result`` (committed / failed)
``saga_commit_duration_seconds``             one transaction, begin to commit
===========================================  =================================================
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sagalog.records import (
    CompensationBegun,
    CompensationEnded,
    SagaAborted,
    SagaBegun,
    SagaEnded,
    SagaLogRecord,
    SagaSnapshot,
    SagaStatus,
    StepBegun,
    StepEnded,
    StepStatus,
)

if TYPE_CHECKING:
    from manager.runtime import Manager

#: Steps and sagas last from milliseconds to minutes.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_STEP_IN_FLIGHT = frozenset({StepStatus.RUNNING, StepStatus.COMPENSATING})


class ManagerMetrics:
    def __init__(self, manager: Manager, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sagas_started = Counter("saga_sagas_started", "Sagas begun.", ["saga_type"], registry=r)
        self.sagas_ended = Counter("saga_sagas_ended", "Sagas ended.", ["saga_type", "outcome"], registry=r)
        self.saga_seconds = Histogram("saga_duration_seconds", "Saga start to end.", ["saga_type", "outcome"], buckets=_SECONDS, registry=r)
        self.step_attempts = Counter("saga_step_attempts", "Step attempts sent.", ["saga_type", "step", "action"], registry=r)
        self.step_retries = Counter("saga_step_retries", "Step attempts after the first.", ["saga_type", "step", "action"], registry=r)
        self.step_seconds = Histogram(
            "saga_step_duration_seconds", "One step attempt, dispatch to its end.", ["saga_type", "step", "action"], buckets=_SECONDS, registry=r
        )
        self.dead_letters = Counter("saga_dead_letters", "Inbox messages dead-lettered.", ["kind"], registry=r)
        self.takeovers = Counter("saga_takeovers", "Partitions taken over.", ["partition"], registry=r)
        self.takeover_seconds = Histogram("saga_takeover_duration_seconds", "Takeover, granted to claimed.", buckets=_SECONDS, registry=r)
        self.replay_records = Counter("saga_replay_records", "Log records read by takeovers.", ["partition"], registry=r)
        self.replay_seconds = Histogram("saga_replay_duration_seconds", "The replay part of a takeover.", buckets=_SECONDS, registry=r)
        self.transactions = Counter("saga_transactions", "Transactions, by result.", ["partition", "result"], registry=r)
        self.commit_seconds = Histogram("saga_commit_duration_seconds", "One transaction, begin to commit.", buckets=_SECONDS, registry=r)
        r.register(_InFlight(manager))

    def decided(self, records: list[SagaLogRecord], before: SagaSnapshot | None = None) -> None:
        """Count what one decision's records say happened (``before``: the saga before them, for
        when the steps that end now were dispatched)."""
        for record, event in ((r, e) for r in records for e in r.events):
            snapshot = record.snapshot
            saga_type = snapshot.saga_type
            if isinstance(event, StepBegun | CompensationBegun):
                action = "execute" if isinstance(event, StepBegun) else "compensate"
                self.step_attempts.labels(saga_type, event.step, action).inc()
                if event.attempt > 1:
                    self.step_retries.labels(saga_type, event.step, action).inc()
            elif isinstance(event, StepEnded | CompensationEnded):
                action = "execute" if isinstance(event, StepEnded) else "compensate"
                steps = (before or snapshot).steps  # a compensation begun in the same decision re-dispatches the step
                dispatched = next((s.dispatch_at_ms for s in steps if s.name == event.step), 0)
                if dispatched:
                    self.step_seconds.labels(saga_type, event.step, action).observe(max(0, record.timestamp_ms - dispatched) / 1000)
            elif isinstance(event, SagaBegun):
                self.sagas_started.labels(saga_type).inc()
            elif isinstance(event, SagaEnded | SagaAborted):
                outcome = "completed" if isinstance(event, SagaEnded) else "aborted"
                self.sagas_ended.labels(saga_type, outcome).inc()
                self.saga_seconds.labels(saga_type, outcome).observe(max(0, record.timestamp_ms - snapshot.started_ms) / 1000)

    def took_over(self, partition: int, seconds: float, replay_seconds: float, records: int) -> None:
        self.takeovers.labels(str(partition)).inc()
        self.takeover_seconds.observe(seconds)
        self.replay_seconds.observe(replay_seconds)
        self.replay_records.labels(str(partition)).inc(records)

    def committed(self, partition: int, seconds: float, ok: bool) -> None:
        self.transactions.labels(str(partition), "committed" if ok else "failed").inc()
        if ok:
            self.commit_seconds.observe(seconds)


class _InFlight(Collector):
    """Gauges computed at scrape time from the manager's memory (read from the scrape thread:
    it copies what it iterates, and an answer a moment old is what a gauge is)."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily("saga_sagas_in_flight", "Live sagas.", labels=["saga_type", "partition"])
        compensating = GaugeMetricFamily("saga_sagas_compensating", "Live sagas compensating.", labels=["saga_type", "partition"])
        retrying = GaugeMetricFamily("saga_compensations_retrying", "Compensations past their first attempt.", labels=["saga_type"])
        oldest = GaugeMetricFamily("saga_oldest_in_flight_step_age_seconds", "Since the oldest running attempt was dispatched.")
        epoch = GaugeMetricFamily("saga_partition_epoch", "Owner epoch of each served partition.", labels=["partition"])
        lag = GaugeMetricFamily("saga_inbox_lag_records", "Inbox records not read yet.", labels=["partition"])
        now_ms = time.time_ns() // 1_000_000
        oldest_dispatch = now_ms
        retrying_by_type: dict[str, int] = {}
        for p, owned in list(self.manager.owned.items()):
            epoch.add_metric([str(p)], owned.epoch)
            counts: dict[tuple[str, bool], int] = {}
            for state in list(owned.live.values()):
                key = (state.saga_type, state.status is SagaStatus.COMPENSATING)
                counts[key] = counts.get(key, 0) + 1
                for step in state.steps:
                    if step.status in _STEP_IN_FLIGHT and 0 < step.dispatch_at_ms < oldest_dispatch:
                        oldest_dispatch = step.dispatch_at_ms
                    if step.status is StepStatus.COMPENSATING and step.comp_attempt > 1:
                        retrying_by_type[state.saga_type] = retrying_by_type.get(state.saga_type, 0) + 1
            for saga_type in sorted({t for t, _ in counts}):
                in_flight.add_metric([saga_type, str(p)], counts.get((saga_type, False), 0) + counts.get((saga_type, True), 0))
                compensating.add_metric([saga_type, str(p)], counts.get((saga_type, True), 0))
            lag_records = self.manager.inbox_lag(p)
            if lag_records is not None:
                lag.add_metric([str(p)], lag_records)
        for saga_type, n in sorted(retrying_by_type.items()):
            retrying.add_metric([saga_type], n)
        oldest.add_metric([], max(0, now_ms - oldest_dispatch) / 1000)
        yield from (in_flight, compensating, retrying, oldest, epoch, lag)
