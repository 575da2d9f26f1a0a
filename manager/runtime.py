"""The manager process: a thin loop around :mod:`manager.decide`.

One consumer group on the inbox. Owning inbox partition p means owning log partition p:

1. **Take over** (after assignment, once the broker confirms the group grants the partition):
   on a worker thread, create the partition's transactional producer (``transactional.id =
   <group>.<log topic>.<p>``; ``init_transactions`` fences any previous owner, zombie or not) and
   replay log partition p to its end; then, in the main loop, check the grant again, claim it
   with epoch = highest epoch seen + 1, re-send every outstanding command and re-arm every
   deadline. The ownership rules, as a state diagram, are in docs/ARCHITECTURE.md and above
   ``_on_assign``.
2. **Work**: each poll's messages are grouped by partition; decisions are made in memory; then per
   partition, ONE transaction carries the log records, the commands, any dead letters and the
   inbox offsets. Write-ahead holds because consumers read ``read_committed``: a command is only
   ever seen together with the log records that decided it.
3. **Give up** (on revocation/loss): drop the partition's state and producer. A fenced or failed
   transaction drops the state too, and the partition is taken over again from the log while the
   group still assigns it: memory never drifts from the log, and only the group ends ownership.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import socket
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from pydantic import BaseModel, ConfigDict, Field

from manager import decide
from sagalog import tracing
from sagalog.codec import Codec
from sagalog.config import Topics
from sagalog.definition import DefinitionSet
from sagalog.errors import BrokerError, DecodeError, Fenced, FoldError
from sagalog.fold import PartitionFold, SagaState, definition_record, fold_newest
from sagalog.kafka import (
    consumer_config,
    must_stop,
    producer_config,
    reader_config,
    serving_fetch_wait_ms,
    translate,
    where,
)
from sagalog.peek import LogPeek
from sagalog.reader import read_to_end
from sagalog.records import (
    Action,
    DeadLetter,
    ParticipantCommand,
    ParticipantReply,
    PartitionClaim,
    SagaDefinitionRecord,
    StartSaga,
)

if TYPE_CHECKING:
    from manager.metrics import ManagerMetrics

log = logging.getLogger("saga.manager")

#: How long a poll waits while a transaction is committing (see ``Manager._poll_wait``).
WRITING_POLL_WAIT_S = 0.002


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ManagerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    bootstrap: str
    definitions: DefinitionSet
    topics: Topics = Topics()
    group_id: str = "saga-managers"
    instance_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    client_overrides: dict[str, Any] = Field(default_factory=dict)
    #: Below the session timeout a frozen manager keeps its partitions; above it, another takes over.
    session_timeout_ms: int = 6000
    #: Finished sagas are tombstoned (removed from the compacted log) and forgotten this long after
    #: they end. Until then a repeated start of the same id is recognised and ignored. It bounds
    #: both the log and the manager's memory; `saga status` keeps history in its own read model.
    finished_retention_s: float = 600.0
    max_batch: int = 2000
    #: Admission control: at most this many live sagas per owned partition (not counting those
    #: that wait only for an operator). Starts beyond it are held, in inbox order, and admitted as
    #: sagas end, while the replies, cancels and operator actions behind them are handled at once:
    #: under overload a saga already running is never stuck behind a backlog of new ones
    #: (docs/ARCHITECTURE.md, "Admission control").
    max_live_sagas_per_partition: int = 1000
    #: At most this many inbox messages held in memory per partition; starts beyond it are read
    #: again from the inbox once half of the held ones are admitted.
    max_held_per_partition: int = 50_000
    #: After a takeover, no deadline fires until the inbox has been read up to where it ended at
    #: takeover (replies that arrived while the partition had no owner count), or this long.
    takeover_catch_up_max_ms: int = 15000
    max_poll_wait_s: float = 0.05
    #: How long a takeover waits for ``init_transactions`` (the broker aborting the previous
    #: owner's open transaction) before it is deferred and retried.
    init_transactions_timeout_s: float = 15.0
    replay_timeout_s: float = 120.0
    #: A commit that takes longer fails and the partition is taken over again from the log. Commits
    #: take milliseconds; a manager frozen in the middle of one finds out this long after it wakes.
    commit_timeout_s: float = 10.0
    #: Serve Prometheus metrics on this port (0: any free port; None: no metrics).
    metrics_port: int | None = None


@dataclass
class Outbox:
    """What one partition's next transaction will carry."""

    log: list[tuple[bytes, bytes | None]] = field(default_factory=list)  # (key, value|None=tombstone)
    commands: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # (topic, key, value)
    dead: list[tuple[bytes | None, bytes]] = field(default_factory=list)  # (original key, DeadLetter)
    next_inbox_offset: int | None = None
    #: Tracing only (empty otherwise): each command's headers by its index in ``commands``, and
    #: the spans its records end, exported once the transaction has committed.
    command_headers: dict[int, tracing.Headers] = field(default_factory=dict)
    spans: list[Any] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.log or self.commands or self.dead or self.next_inbox_offset is not None)


@dataclass
class Owned:
    """A log partition this manager owns: its sagas, timers and transactional producer."""

    partition: int
    epoch: int
    producer: Producer
    live: dict[str, SagaState] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)  # saga id -> ended at (ms), for dedup + tombstones
    timers: list[tuple[int, str]] = field(default_factory=list)  # heap of (wake at ms, saga id)
    #: saga id -> the attempts whose command this manager sent: (step, action, attempt). A tuple,
    #: not a set: a saga has a few, and a manager holds one per live saga.
    sent: dict[str, tuple[tuple[str, Action, int], ...]] = field(default_factory=dict)
    outbox: Outbox = field(default_factory=Outbox)
    #: Timers wait until the inbox partition has been read to its end once (a partition-EOF event)
    #: after takeover, or until ``catch_up_by``.
    caught_up: bool = False
    catch_up_by: int = 0
    next_sweep_ms: int = 0
    #: Admission control. ``held``: inbox messages read but not decided yet, oldest first: starts
    #: not admitted yet, and anything later for a saga whose start is held (a saga's messages stay
    #: in order); ``held_ids``: how many of them each saga id has; ``parked``: live sagas waiting
    #: only for an operator (not counted against the limit); ``overflow_from``: the first start
    #: not held because ``held`` was full, read again from the inbox once it has drained;
    #: ``read_to``: the inbox offset after the last message read.
    held: deque[tuple[int, Message, Any]] = field(default_factory=deque)
    held_ids: Counter[str] = field(default_factory=Counter)
    parked: set[str] = field(default_factory=set)
    overflow_from: int | None = None
    read_to: int | None = None
    #: The transaction committing on a worker thread, if any. At most one per partition: the next
    #: one carries decisions taken on the assumption that this one's records are on the log, so
    #: it starts only once this one has committed (and never, if it failed).
    writing: Future[BrokerError | None] | None = None
    #: Sagas whose commands the takeover re-sent: no deadline of theirs fires before this time
    #: (ms; :func:`manager.decide.resent_deadline_ms`).
    resent_until: dict[str, int] = field(default_factory=dict)
    #: Ids of the definition records on this log partition: from the replay, then our own writes
    #: (dropped with the rest of this state if a transaction fails, so never ahead of the log).
    definitions: set[str] = field(default_factory=set)


@dataclass
class Prepared:
    """A takeover whose slow half (fencing, replay) is done, waiting for the group's confirmation.

    Still valid however long it waits: the producer fenced every previous owner, so nobody else
    wrote to the partition since the replay; should someone fence *us* meanwhile, the claim's
    commit fails and the partition is taken over again from the log."""

    producer: Producer
    fold: PartitionFold
    #: Where the inbox partition is read again from: its committed offset, final once fenced.
    inbox_offset: TopicPartition
    started: float  # monotonic s, when the takeover began
    fenced_s: float
    replayed_s: float


class Manager:
    """One manager replica. ``run()`` until ``stop()``; all Kafka I/O happens on the calling thread."""

    def __init__(self, settings: ManagerSettings, codec: Codec | None = None) -> None:
        self.settings = settings
        self.codec = codec or Codec()
        self._peek = LogPeek(self.codec)
        self.topics = settings.topics
        self.owned: dict[int, Owned] = {}
        self.running = False
        self.stats = {"started": 0, "completed": 0, "aborted": 0, "dead_lettered": 0, "ignored": 0, "takeovers": 0}
        overrides = settings.client_overrides
        self.consumer = Consumer(
            consumer_config(
                settings.bootstrap,
                settings.group_id,
                session_timeout_ms=settings.session_timeout_ms,
                # EOF events tell when a newly owned inbox partition has been read to its end.
                overrides={
                    "client.id": f"manager-{settings.instance_id}",
                    "enable.partition.eof": True,
                    # Incremental rebalancing: when a manager dies only its partitions move; the
                    # others keep theirs (no revoke-everything, no needless replays).
                    "partition.assignment.strategy": "cooperative-sticky",
                    "fetch.wait.max.ms": serving_fetch_wait_ms(settings.bootstrap, overrides),
                    **overrides,
                },
            )
        )
        #: Assigned partitions not served yet: partition -> (due at, monotonic s; attempt).
        self._pending: dict[int, tuple[float, int]] = {}
        #: Takeovers fencing and replaying on a worker thread: partition -> assignment generation.
        self._preparing: dict[int, int] = {}
        self._jobs: list[tuple[Future[dict[int, Prepared | BrokerError]], list[int]]] = []
        #: Takeovers fenced and replayed, waiting for the group to confirm the assignment.
        self._prepared: dict[int, Prepared] = {}
        #: Bumped when a partition is revoked: a takeover prepared for an older assignment is void.
        self._generation: dict[int, int] = {}
        self._takeovers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="saga-takeover")
        self._next_audit = 0.0
        self._writers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="saga-commit")
        self.metrics: ManagerMetrics | None = None
        #: Where /metrics is served, once run() started the server.
        self.metrics_address: tuple[str, int] | None = None
        if settings.metrics_port is not None:
            from manager.metrics import ManagerMetrics

            self.metrics = ManagerMetrics(self)
        #: OpenTelemetry (OTEL_* environment, or sagalog.tracing.install); None: off, and then
        #: no header is built and no span exists.
        self.tracing = tracing.get("saga-manager")
        self._replayed: dict[int, int] = {}  # partition -> records read by its last replay
        self._lag: dict[int, int] = {}  # partition -> inbox records not read yet, at the last audit

    # --- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        self.running = True
        if self.metrics is not None and self.settings.metrics_port is not None:
            from prometheus_client import start_http_server

            server, _ = start_http_server(self.settings.metrics_port, registry=self.metrics.registry)
            host, port = server.server_address[:2]
            self.metrics_address = (str(host), int(port))
            log.info("metrics on http://%s:%d/metrics", host, port)
        self.consumer.subscribe([self.topics.inbox], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke)
        log.info("manager %s started, group %s, inbox %s", self.settings.instance_id, self.settings.group_id, self.topics.inbox)
        try:
            while self.running:
                self.step()
        finally:
            self.close()

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        for p, owned in list(self.owned.items()):
            if owned.outbox and p in self.owned:
                self._commit(p, owned)  # what was decided leaves before the partition does
            self._release(p)
        try:
            self.consumer.close()  # leaves the group: the others take over without waiting for the session timeout
        except KafkaException as err:
            log.warning("closing consumer: %s", translate(err, "close"))
        self._takeovers.shutdown(wait=True, cancel_futures=True)
        self._prepared.clear()
        self._writers.shutdown(wait=True)

    def step(self) -> None:
        """One iteration: poll a batch, decide, fire due timers, write each partition's transaction."""
        # Wait for the first message only; then take whatever else is already fetched, without
        # waiting (consume(n, timeout) would hold a lone message until n arrive or timeout passes).
        first = self.consumer.poll(self._poll_wait())
        messages = [] if first is None else [first, *self.consumer.consume(self.settings.max_batch - 1, 0)]
        now = now_ms()
        for msg in messages:
            err = msg.error()
            if err is not None:
                # Client-level errors (a poll interval exceeded, all brokers down) carry no topic,
                # partition or offset: only a partition-EOF event has them.
                if err.code() == KafkaError._PARTITION_EOF:
                    caught_up = self.owned.get(where(msg)[1])
                    if caught_up is not None:
                        caught_up.caught_up = True
                    continue
                mapped = translate(err, "consuming the inbox")
                if must_stop(err):
                    raise mapped
                log.warning("%s", mapped)
                continue
            owned = self.owned.get(where(msg)[1])
            if owned is not None:
                self._handle_inbox(owned, msg, now)
        for owned in list(self.owned.values()):
            self._fire_timers(owned, now)
            if owned.held:
                self._admit_held(owned, now)
            if now >= owned.next_sweep_ms:
                self._tombstone_finished(owned, now)
        self._write_outboxes()
        self._service_pending()

    def _poll_wait(self) -> float:
        longest = self.settings.max_poll_wait_s
        if any(o.writing is not None for o in self.owned.values()):
            # Nothing wakes a poll when a transaction commits: look again soon, so that the
            # outbox collected meanwhile leaves right after it (or a failure is acted on).
            longest = min(longest, WRITING_POLL_WAIT_S)
        wake = min((o.timers[0][0] for o in self.owned.values() if o.timers), default=None)
        if wake is None:
            return longest
        return max(0.0, min(longest, (wake - now_ms()) / 1000))

    # --- ownership ------------------------------------------------------------------------
    #
    # The group decides who owns a partition; this manager only ever follows it:
    #
    #   assigned --(due)--> check --(group grants)--> fence + replay --> PREPARED --(check)--> claim --> SERVING
    #      ^                  |                        (worker thread)       |                            |
    #      |   not granted:   |                                   not yet:   | wait, keep it             |
    #      +--- retry later <-+                                              +--> (check again soon)     |
    #      +--- fenced / failed write, or assigned but not served (audit) <-----------------------------+
    #   revoked or lost: forget the partition, in any state (a prepared takeover is void).
    #
    # "The group grants" is asked of the broker, not of librdkafka's local view: a manager frozen
    # past its session timeout still believes it holds its old assignment until its next poll,
    # and a takeover it finishes then would fence the rightful owner.
    #
    # Fencing and replay take seconds and run on a worker thread while the main loop keeps
    # polling: a rebalance (another manager restarted) then completes at once instead of waiting
    # for this manager's next poll, and partitions already served keep being served.

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Never take over inside the callback: takeovers block (init_transactions, replay), and
        # the main loop must keep polling so that a revocation is seen between their steps.
        for tp in partitions:
            self._pending.setdefault(tp.partition, (0.0, 1))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._forget(tp.partition)

    def _forget(self, p: int) -> None:
        """The group no longer assigns p: drop it in whatever state it is."""
        self._pending.pop(p, None)
        self._generation[p] = self._generation.get(p, 0) + 1  # a takeover still preparing is void
        if self._prepared.pop(p, None) is not None:
            log.info("partition %d: revoked before its takeover was confirmed; dropped", p)
        self._release(p)

    def _assigned(self) -> set[int]:
        return {tp.partition for tp in self.consumer.assignment() if tp.topic == self.topics.inbox}

    def _group_grants(self, partitions: list[int], replayed: dict[int, int] | None = None) -> list[int]:
        """Those of ``partitions`` the group assigns to this manager right now, as the broker sees it.

        A synchronous offset commit with the consumer's member id and generation is the broker's
        own membership check (any Kafka-compatible broker makes it): a manager evicted while it was
        frozen gets UNKNOWN_MEMBER_ID or ILLEGAL_GENERATION although librdkafka still reports the
        old assignment. What is committed is a marker on the *log* partition (this group never
        consumes the log): where the takeover's replay ended, never an inbox offset.
        """
        local = self._assigned()
        wanted = [p for p in partitions if p in local]
        if not wanted:
            return []
        marks = [TopicPartition(self.topics.log, p, (replayed or {}).get(p, 0)) for p in wanted]
        try:
            results = self.consumer.commit(offsets=marks, asynchronous=False) or []
        except KafkaException as err:
            log.warning("partitions %s: the group does not confirm this manager's assignment (%s); waiting", wanted, translate(err, "checking group membership"))
            return []
        return [tp.partition for tp in results if tp.error is None]

    def _schedule_takeover(self, p: int, delay_s: float, attempt: int) -> None:
        self._pending[p] = (time.monotonic() + delay_s, attempt)

    def _service_pending(self) -> None:
        """Move every assigned partition not served yet one state on (see the diagram above)."""
        now = time.monotonic()
        if now >= self._next_audit:
            self._audit_assignment()
            if self.metrics is not None:
                self._measure_lag()
            self._next_audit = now + 1.0
        self._collect_prepared()
        if not self._pending:
            return
        assigned = self._assigned()
        for p in [p for p in self._pending if p not in assigned]:
            self._forget(p)
        due = sorted(p for p, (at, _) in self._pending.items() if at <= now and p not in self._preparing)
        ready = [p for p in due if p in self._prepared]
        fresh = [p for p in due if p not in self._prepared]
        if ready:
            self._claim_prepared(ready)
        if fresh:
            self._start_takeovers(fresh)

    def _audit_assignment(self) -> None:
        """Served partitions and the group's assignment must agree; repair and say so if not."""
        assigned = self._assigned()
        for p in sorted(assigned - set(self.owned) - set(self._pending)):
            log.warning("partition %d is assigned to this manager but not served; taking it over", p)
            self._schedule_takeover(p, 0.0, 1)
        for p in sorted(set(self.owned) - assigned):
            log.warning("partition %d is served but no longer assigned to this manager; releasing it", p)
            self._release(p)

    def _start_takeovers(self, partitions: list[int]) -> None:
        """Check with the group, then fence and replay the granted partitions on a worker thread."""
        granted = self._group_grants(partitions)
        for p in partitions:
            if p not in granted:
                self._defer(p, "not (yet) granted by the group")
        if not granted:
            return
        for p in granted:
            self._release(p)
            self._preparing[p] = self._generation.get(p, 0)
        self._jobs.append((self._takeovers.submit(self._prepare, granted), granted))

    def _prepare(self, partitions: list[int]) -> dict[int, Prepared | BrokerError]:
        """Fence the previous owners and replay the partitions (worker thread: touches no state
        of the main loop; its result is taken in by :meth:`_collect_prepared`)."""
        started = time.monotonic()
        producers = dict(zip(partitions, self._writers.map(self._fence_previous_owner, partitions), strict=True))
        out: dict[int, Prepared | BrokerError] = {p: err for p, err in producers.items() if isinstance(err, BrokerError)}
        ready = sorted(p for p, prod in producers.items() if not isinstance(prod, BrokerError))
        if not ready:
            return out
        fenced_s = time.monotonic() - started
        reader = self._new_reader()
        try:
            folds = self._replay_many(ready, reader)
            # After fencing, the committed offsets are final: the previous owner's open transaction
            # (and the offsets it would have committed) is aborted, and nobody else can commit them.
            committed = reader.committed([TopicPartition(self.topics.inbox, p) for p in ready], timeout=10)
        except KafkaException as err:
            return {**out, **dict.fromkeys(ready, translate(err, f"reading the committed inbox offsets of {ready}"))}
        except BrokerError as err:
            return {**out, **dict.fromkeys(ready, err)}
        finally:
            reader.close()
        replayed_s = time.monotonic() - started - fenced_s
        inbox_offsets = {tp.partition: tp for tp in committed}
        for p in ready:
            producer = producers[p]
            assert not isinstance(producer, BrokerError)
            offset = inbox_offsets[p]
            if offset.offset < 0:  # nothing committed yet: from the beginning
                offset = TopicPartition(self.topics.inbox, p, OFFSET_BEGINNING)
            out[p] = Prepared(producer, folds[p], offset, started, fenced_s, replayed_s)
        return out

    def _collect_prepared(self) -> None:
        """Take in finished takeover preparations, unless their partition was revoked meanwhile."""
        if not self._jobs:
            return
        done = [(job, partitions) for job, partitions in self._jobs if job.done()]
        self._jobs = [(job, partitions) for job, partitions in self._jobs if not job.done()]
        for job, partitions in done:
            try:
                results = job.result()
            except Exception as err:  # noqa: BLE001 - a bug in a takeover must not stop the manager
                log.exception("a takeover of partitions %s failed unexpectedly; retrying it", partitions)
                results = dict.fromkeys(partitions, BrokerError(f"takeover failed: {type(err).__name__}: {err}", retryable=True))
            for p, result in results.items():
                generation = self._preparing.pop(p, None)
                if generation != self._generation.get(p, 0) or p not in self._pending:
                    continue  # revoked while it was preparing: the producer is simply dropped
                if isinstance(result, BrokerError):
                    self._defer(p, str(result))
                else:
                    self._prepared[p] = result
                    self._schedule_takeover(p, 0.0, 1)

    def _claim_prepared(self, partitions: list[int]) -> None:
        """Check the grant again (fencing and replay took time, the group may have moved on), then
        claim. Not confirmed yet: keep what was prepared and ask again soon; a revocation drops it."""
        checked = time.monotonic()
        still = set(self._group_grants(partitions, {p: self._prepared[p].fold.next_offset for p in partitions}))
        checked_s = time.monotonic() - checked
        if checked_s > 1.0:
            log.warning("partitions %s: the group check took %.1f s", partitions, checked_s)
        for p in partitions:
            if p not in still:
                self._defer(p, "the group does not confirm the assignment yet", prepared=True)
                continue
            try:
                # Messages fetched while the partition was not served were skipped, and messages
                # decided in a transaction that failed were not committed: read again from there.
                self.consumer.seek(self._prepared[p].inbox_offset)
            except KafkaException as err:
                self._defer(p, str(translate(err, f"rewinding inbox partition {p}")), prepared=True)
                continue
            self._pending.pop(p, None)
            prepared = self._prepared.pop(p)
            self._claim(p, prepared.producer, prepared.fold, prepared.started, prepared.fenced_s, prepared.replayed_s)

    def _defer(self, p: int, why: str, *, prepared: bool = False) -> None:
        if p not in self._pending:
            return
        _, attempt = self._pending[p]
        # Soon again, but not in a tight loop: a check is cheap, and every second waited is a
        # second the partition's sagas are not served. Once prepared, only a check remains.
        first, most = (0.1, 0.5) if prepared else (0.25, 2.0)
        delay = min(most, first * 2 ** (attempt - 1))
        log.warning("partition %d: takeover deferred (attempt %d): %s; next try in %.1f s", p, attempt, why, delay)
        self._schedule_takeover(p, delay, attempt + 1)

    def _fence_previous_owner(self, p: int) -> Producer | BrokerError:
        """The partition's transactional producer; ``init_transactions`` fences the previous owner."""
        producer = Producer(
            producer_config(
                self.settings.bootstrap,
                transactional_id=f"{self.settings.group_id}.{self.topics.log}.{p}",
                overrides=self.settings.client_overrides,
            )
        )
        try:
            producer.init_transactions(self.settings.init_transactions_timeout_s)
        except KafkaException as err:
            return translate(err, f"claiming partition {p}")
        return producer

    def _take_over(self, p: int) -> None:
        """Take partition p over now, without asking the group (tests and the replay benchmark)."""
        started = time.monotonic()
        self._release(p)
        producer = self._fence_previous_owner(p)
        if isinstance(producer, BrokerError):
            raise producer
        fenced_s = time.monotonic() - started
        with contextlib.closing(self._new_reader()) as reader:
            fold = self._replay_many([p], reader)[p]
        self._claim(p, producer, fold, started, fenced_s, time.monotonic() - started - fenced_s)

    def _claim(self, p: int, producer: Producer, fold: PartitionFold, started: float, fenced_s: float, replayed_s: float) -> None:
        claim_began = time.monotonic()
        now = now_ms()
        # Above every epoch seen on the partition: its claims, and (should a claim be missing) its records.
        epoch = max([fold.epoch, fold.finished_epoch, *(state.epoch for state in fold.sagas.values())]) + 1
        owned = Owned(partition=p, epoch=epoch, producer=producer, definitions=set(fold.definitions))
        owned.outbox.log.append(
            (PartitionClaim.key(p), self.codec.encode(PartitionClaim(partition=p, epoch=owned.epoch, owner=self.settings.instance_id, timestamp_ms=now)))
        )
        # Ended sagas, oldest first (tombstoned in that order once retained long enough).
        ended = [(saga_id, state.updated_ms) for saga_id, state in fold.sagas.items() if state.status.terminal]
        owned.finished.update(sorted([*ended, *fold.finished.items()], key=lambda item: item[1]))
        for saga_id, state in sorted(fold.sagas.items(), key=lambda item: item[1].updated_ms):
            if not state.status.terminal:
                owned.live[saga_id] = state
                self._after_decision(owned, state, [], now)  # re-sends outstanding commands, arms timers
                until = decide.resent_deadline_ms(state, now)
                if until is not None:
                    owned.resent_until[saga_id] = until
                    heapq.heappush(owned.timers, (until, saga_id))
        owned.catch_up_by = now + self.settings.takeover_catch_up_max_ms
        self.owned[p] = owned
        self._commit(p, owned)
        if p not in self.owned:
            return  # the claim itself failed: already rescheduled (or fenced) by _write_failed
        self.stats["takeovers"] += 1
        if self.metrics is not None:
            self.metrics.took_over(p, time.monotonic() - started, replayed_s, self._replayed.get(p, 0))
        # The rest of the time ("waiting"): from the end of the replay until the group confirmed the
        # assignment (a rebalance in progress delays it), the inbox rewind, and the claims of
        # partitions taken over in the same batch before this one; then its own claim.
        log.info(
            "took over partition %d at epoch %d: %d sagas rebuilt, %d live resumed, %d records rejected, "
            "in %.0f ms (fencing %.0f ms, replay %.0f ms, waiting %.0f ms, claim %.0f ms)",
            p, owned.epoch, len(fold.sagas) + len(fold.finished), len(owned.live), fold.rejected_count,
            1000 * (time.monotonic() - started), 1000 * fenced_s, 1000 * replayed_s,
            1000 * (claim_began - started - fenced_s - replayed_s), 1000 * (time.monotonic() - claim_began),
        )  # fmt: skip

    def _new_reader(self) -> Consumer:
        """A consumer for one takeover's replay. It carries the managers' group id but never
        subscribes nor commits: besides reading the log, it only fetches the group's committed
        inbox offsets (an OffsetFetch needs no membership)."""
        return Consumer(reader_config(self.settings.bootstrap, overrides={"group.id": self.settings.group_id, **self.settings.client_overrides}))

    def _replay_many(self, partitions: list[int], reader: Consumer) -> dict[int, PartitionFold]:
        """Read log partitions from the beginning to their ends and rebuild their sagas.

        The end is the partition-EOF event, never the high watermark: some brokers (Tansu)
        under-report the watermark after multi-record batches, and stopping there would lose sagas.
        Only each saga's newest acceptable record is read, and decoded only if the saga has not
        ended (:func:`sagalog.fold.fold_newest` with :class:`sagalog.peek.LogPeek`).
        """
        messages: dict[int, list[tuple[bytes | None, bytes | None, int]]] = {p: [] for p in partitions}
        ends: dict[int, int] = {}
        reading = read_to_end(
            reader,
            self.topics.log,
            dict.fromkeys(partitions, OFFSET_BEGINNING),
            doing=f"replaying log partitions {partitions}",
            timeout_s=self.settings.replay_timeout_s,
        )
        with contextlib.closing(reading):
            for batch in reading:
                for p, msgs in batch.messages.items():
                    messages[p].extend((m.key(), m.value(), where(m)[2]) for m in msgs)
                ends.update(batch.ends)
        folds = {}
        for p in partitions:
            self._replayed[p] = len(messages[p])
            fold = folds[p] = fold_newest(messages[p], self.codec.decode, p, self._peek.peek)
            fold.next_offset = ends[p]
            for offset, reason in fold.rejected[:20]:
                log.warning("log partition %d offset %d rejected on replay: %s", p, offset, reason)
        return folds

    def _release(self, p: int) -> None:
        owned = self.owned.pop(p, None)
        if owned is None:
            return
        # Its producer is ours again only once a transaction in flight has ended (committed or
        # not: a next owner reads whatever it left on the log).
        self._wait_written(p, owned)
        try:
            owned.producer.abort_transaction(1)
        except KafkaException:
            pass  # no transaction open, or fenced: either way nothing of ours is pending
        log.info("released partition %d (%d live sagas handed over)", p, len(owned.live))

    # --- inputs ---------------------------------------------------------------------------

    def _ctx(self, owned: Owned, now: int) -> decide.Context:
        return decide.Context(now_ms=now, epoch=owned.epoch, reply_topic=self.topics.inbox, reply_partition=owned.partition, writer=self.settings.instance_id)

    def _handle_inbox(self, owned: Owned, msg: Message, now: int) -> None:
        topic, partition, offset = where(msg)
        owned.outbox.next_inbox_offset = owned.read_to = offset + 1
        key = (msg.key() or b"").decode("utf-8", "replace")
        if owned.overflow_from is not None and key not in owned.live:
            return  # read again from overflow_from (see _hold), with everything after it
        try:
            item = self.codec.decode(msg.value())
        except DecodeError as err:
            self._dead_letter(owned, msg, err.at(topic, partition, offset), now)
            return
        saga_id = getattr(item, "saga_id", None)
        if saga_id != key:
            self._dead_letter(owned, msg, f"message key {key!r} is not its saga id {saga_id!r}: key inbox messages by saga id", now)
            return
        if owned.held_ids[key] or (isinstance(item, StartSaga) and (owned.held or self._busy(owned) >= self.settings.max_live_sagas_per_partition)):
            self._hold(owned, offset, msg, item)
            return
        self._decide(owned, msg, item, now)

    def _decide(self, owned: Owned, msg: Message, item: Any, now: int) -> None:
        topic, partition, offset = where(msg)
        key = item.saga_id
        try:
            decision = decide.on_inbox(owned.live.get(key), key in owned.finished, item, self.settings.definitions, self._ctx(owned, now))
        except FoldError as err:  # a decision the state machine refuses: a bug, but never a crash
            self._dead_letter(owned, msg, f"refused by the state machine: {err}", now)
            return
        except Exception as err:  # noqa: BLE001 - one message must never stop the manager
            log.exception("unexpected error deciding on %s[%d]@%d", topic, partition, offset)
            self._dead_letter(owned, msg, f"internal error while deciding: {type(err).__name__}: {err}", now)
            return
        if decision.ignored:
            if decision.reject:
                self._dead_letter(owned, msg, decision.ignored, now)
            else:
                self.stats["ignored"] += 1
                log.debug("%s", decision.ignored)
            return
        if isinstance(item, StartSaga):
            self.stats["started"] += 1
        reply = None
        if self.tracing is not None:
            decision, reply = _traced_input(item, msg, decision)
        self._apply(owned, decision, now, reply)

    # --- admission control ----------------------------------------------------------------
    #
    # A start is held (not decided) while its partition has max_live_sagas_per_partition busy
    # sagas (live, not waiting only for an operator), or older messages are held: first come,
    # first admitted. So is any later message for a saga whose start is held, behind it. Replies
    # and everything else are read and handled as usual. The inbox offset each transaction
    # commits stays at the oldest held message (_seal): a new owner reads the inbox again
    # from there, admits those starts, and finds that what it reads after them was handled
    # already (late or duplicate replies and cancels are ignored by the decisions; see
    # ARCHITECTURE.md). Memory stays bounded without ever pausing the partition (a pause would
    # hold the replies the admitted sagas need): past max_held_per_partition, starts are not
    # held but read again later (overflow_from), and until then only messages for live sagas are
    # handled.

    def _busy(self, owned: Owned) -> int:
        return len(owned.live) - len(owned.parked)

    def _hold(self, owned: Owned, offset: int, msg: Message, item: Any) -> None:
        if isinstance(item, StartSaga) and len(owned.held) >= self.settings.max_held_per_partition:
            if owned.overflow_from is None:
                log.warning("partition %d: %d inbox messages held (admission control); reading the rest again later", owned.partition, len(owned.held))
                owned.overflow_from = offset
            return
        owned.held.append((offset, msg, item))
        owned.held_ids[item.saga_id] += 1

    def _admit_held(self, owned: Owned, now: int) -> None:
        limit = self.settings.max_live_sagas_per_partition
        before = len(owned.held)
        while owned.held:
            _, msg, item = owned.held[0]
            if isinstance(item, StartSaga) and self._busy(owned) >= limit:
                break
            owned.held.popleft()
            owned.held_ids[item.saga_id] -= 1
            if not owned.held_ids[item.saga_id]:
                del owned.held_ids[item.saga_id]
            self._decide(owned, msg, item, now)
        moved = len(owned.held) < before
        if owned.overflow_from is not None and len(owned.held) <= self.settings.max_held_per_partition // 2:
            self.consumer.seek(TopicPartition(self.topics.inbox, owned.partition, owned.overflow_from))
            owned.read_to, owned.overflow_from = owned.overflow_from, None
            moved = True
        # Commit how far the inbox is handled now, even when no message arrives in this loop.
        if moved and owned.read_to is not None:
            owned.outbox.next_inbox_offset = owned.held[0][0] if owned.held else owned.read_to

    def _caught_up(self, owned: Owned, now: int) -> bool:
        """Has the inbox been read to its end since takeover? Until then deadlines wait: a reply
        that arrived while the partition had no owner must win over a timeout."""
        if not owned.caught_up and now >= owned.catch_up_by:
            log.warning("partition %d: inbox not read to its end %d ms after takeover; deadlines fire anyway", owned.partition, self.settings.takeover_catch_up_max_ms)
            owned.caught_up = True
        return owned.caught_up

    def _fire_timers(self, owned: Owned, now: int) -> None:
        timers = owned.timers
        if not timers or timers[0][0] > now or not self._caught_up(owned, now):
            return
        while timers and timers[0][0] <= now:
            _, saga_id = heapq.heappop(timers)
            state = owned.live.get(saga_id)
            if state is None:
                continue
            until = owned.resent_until.get(saga_id)
            if until is not None:
                if until > now:
                    continue  # its commands were re-sent at takeover: the timer at `until` decides
                del owned.resent_until[saga_id]
            try:
                decision = decide.on_time(state, self._ctx(owned, now))
            except FoldError as err:
                log.error("timer for saga %s refused by the state machine: %s", saga_id, err)
                continue
            self._apply(owned, decision, now)

    def _tombstone_finished(self, owned: Owned, now: int) -> None:
        """Remove sagas that ended more than ``finished_retention_s`` ago from the log and memory."""
        owned.next_sweep_ms = now + 1000
        horizon = now - int(self.settings.finished_retention_s * 1000)
        expired = []
        for saga_id, ended in owned.finished.items():  # insertion order is (about) end order
            if ended > horizon:
                break
            expired.append(saga_id)
        for saga_id in expired:
            del owned.finished[saga_id]
            owned.outbox.log.append((saga_id.encode(), None))

    def _apply(self, owned: Owned, decision: decide.Decision, now: int, reply: tuple[str, Action, Any] | None = None) -> None:
        state = decision.state
        assert state is not None
        out = owned.outbox
        key = state.saga_id.encode()
        if decision.records and state.definition_id and state.definition_id not in owned.definitions:
            # The saga's definition is not on this partition yet: its record goes first, in the same
            # transaction, so it precedes every record pinning it (and a failed write drops both).
            pinned = definition_record(state, now, self.settings.instance_id)
            out.log.append((SagaDefinitionRecord.key(pinned.definition_id), self.codec.encode(pinned)))
            owned.definitions.add(pinned.definition_id)
        for record in decision.records:
            out.log.append((key, self.codec.encode(record)))
        if self.metrics is not None:
            self.metrics.decided(decision.records, owned.live.get(state.saga_id))
        if self.tracing is not None:  # the attempts (and the saga) these records end, from the state before
            out.spans.extend(self.tracing.saga_spans(state.saga_id, owned.live.get(state.saga_id), decision.records, reply))
        self._after_decision(owned, state, decision.commands, now)

    def _after_decision(self, owned: Owned, state: SagaState, commands: list[tuple[str, ParticipantCommand]], now: int) -> None:
        """Keep memory in line with the new state: send what is due, arm the next timer."""
        saga_id = state.saga_id
        if state.status.terminal:
            owned.live.pop(saga_id, None)
            owned.sent.pop(saga_id, None)
            owned.resent_until.pop(saga_id, None)
            owned.parked.discard(saga_id)
            owned.finished[saga_id] = state.updated_ms
            self.stats["completed" if state.status.value == "COMPLETED" else "aborted"] += 1
            return
        owned.live[saga_id] = state
        sent = owned.sent.get(saga_id, ())
        key = saga_id.encode()
        # The decision's own commands, then anything the log says is due but not sent by us yet
        # (after a takeover: everything in flight; after a backoff: the delayed retry). Checked
        # by (step, action, attempt) first: building a command costs more than asking.
        own = [(command.step, command.action, command.attempt) for _, command in commands]
        due = []
        for marker in decide.due_attempts(state, now):
            if marker not in sent and marker not in own:
                due.append(decide.command_for(state, *marker, self._ctx(owned, now)))
        for participant, command in chain(commands, due):
            marker = (command.step, command.action, command.attempt)
            if marker in sent:
                continue
            sent = owned.sent[saga_id] = (*sent, marker)
            if self.tracing is not None:  # names the attempt's span, whichever manager emits it
                owned.outbox.command_headers[len(owned.outbox.commands)] = self.tracing.command_headers(saga_id, state, command)
            owned.outbox.commands.append((self.topics.commands(participant), key, self.codec.encode(command)))
        wake = decide.next_wakeup_ms(state, now)
        if wake is not None:
            heapq.heappush(owned.timers, (max(wake, now + 1), saga_id))
            owned.parked.discard(saga_id)
        else:  # waits only for an operator (its compensations left are in incident)
            owned.parked.add(saga_id)

    def _dead_letter(self, owned: Owned, msg: Message, reason: DecodeError | str, now: int) -> None:
        self.stats["dead_lettered"] += 1
        if self.metrics is not None:
            self.metrics.dead_letters.labels("undecodable" if isinstance(reason, DecodeError) else "rejected").inc()
        topic, partition, offset = where(msg)
        log.warning("dead-lettering %s[%d]@%d: %s", topic, partition, offset, reason)
        letter = DeadLetter(
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            key=msg.key(),
            value=msg.value(),
            reason=str(reason),
            error_type=type(reason).__name__ if not isinstance(reason, str) else "Rejected",
            component=f"manager:{self.settings.instance_id}",
            dead_lettered_ms=now,
        )
        try:
            owned.outbox.dead.append((msg.key(), self.codec.encode(letter)))
        except DecodeError:  # the original is too large to keep whole: keep the reason and position
            owned.outbox.dead.append((msg.key(), self.codec.encode(letter.model_copy(update={"value": None}))))

    # --- the one write path -----------------------------------------------------------------

    def _write_outboxes(self) -> None:
        """Start each partition's next transaction: group commit, one in flight per partition.

        A transaction is mostly waiting on the broker (librdkafka releases the GIL), so it runs
        on a worker thread while this loop goes on polling and deciding; whatever is decided
        meanwhile collects in the outbox and leaves as the next transaction once this one has
        committed. Under load each transaction so carries every decision of a commit's duration
        (fewer, larger transactions); when quiet, a decision leaves at once. Each partition has
        its own producer, so partitions commit concurrently."""
        metadata = None
        for p, owned in list(self.owned.items()):
            if owned.writing is not None:
                if not owned.writing.done():
                    continue
                err = owned.writing.result()
                owned.writing = None
                if err is not None:
                    self._write_failed(p, err)  # drops what was decided since: memory is ahead of the log
                    continue
            if not owned.outbox:
                continue
            if metadata is None:
                metadata = self.consumer.consumer_group_metadata()
            owned.writing = self._writers.submit(self._write, p, owned.producer, self._seal(owned), metadata)

    def _seal(self, owned: Owned) -> Outbox:
        """Take the partition's outbox for writing; a new one collects what comes next."""
        out, owned.outbox = owned.outbox, Outbox()
        if owned.held and out.next_inbox_offset is not None:  # not past a start not admitted yet
            out.next_inbox_offset = min(out.next_inbox_offset, owned.held[0][0])
        return out

    def _wait_written(self, p: int, owned: Owned) -> BrokerError | None:
        """Wait for the partition's transaction in flight, if any: its result."""
        writing, owned.writing = owned.writing, None
        return None if writing is None else writing.result()

    def _commit(self, p: int, owned: Owned) -> None:
        """Write one partition's outbox now and wait for it (takeover)."""
        err = self._wait_written(p, owned) or self._write(p, owned.producer, self._seal(owned), self.consumer.consumer_group_metadata())
        if err is not None:
            self._write_failed(p, err)

    def _write(self, p: int, producer: Producer, out: Outbox, group_metadata: object) -> BrokerError | None:
        """One transaction: log records, commands, dead letters and the inbox offset consumed up to.
        Runs on a worker thread: touches nothing but the partition's producer and the sealed outbox."""
        began = time.perf_counter()
        try:
            producer.begin_transaction()
            for key, value in out.log:
                producer.produce(self.topics.log, value=value, key=key, partition=p)
            if out.command_headers:
                for i, (topic, key, value) in enumerate(out.commands):
                    producer.produce(topic, value=value, key=key, headers=out.command_headers.get(i))
            else:
                for topic, key, value in out.commands:
                    producer.produce(topic, value=value, key=key)
            for original_key, letter in out.dead:  # keyed like the original (the contract): its partition by key
                producer.produce(self.topics.dead_letters, value=letter, key=original_key)
            if out.next_inbox_offset is not None:
                producer.send_offsets_to_transaction(
                    [TopicPartition(self.topics.inbox, p, out.next_inbox_offset)], group_metadata, 10
                )
            producer.commit_transaction(self.settings.commit_timeout_s)
        except KafkaException as err:
            if self.metrics is not None:
                self.metrics.committed(p, 0.0, ok=False)
            return translate(err, f"writing partition {p}")
        except BufferError as err:
            if self.metrics is not None:
                self.metrics.committed(p, 0.0, ok=False)
            return BrokerError(f"writing partition {p}: {err}", retryable=True)
        if self.metrics is not None:
            self.metrics.committed(p, time.perf_counter() - began, ok=True)
        if out.spans and self.tracing is not None:
            self.tracing.export(out.spans)
        return None

    def _write_failed(self, p: int, err: BrokerError) -> None:
        """A failed transaction never ends ownership the group still grants: the partition is
        released (memory may be ahead of the log) and, while still assigned, taken over again from
        the log. If another manager fenced us, the group check before that takeover decides who is
        right: a zombie is refused and waits for its revocation; the rightful owner fences back."""
        self._release(p)
        if isinstance(err, Fenced):
            log.warning("partition %d: fenced by another manager's takeover; re-checking the assignment", p)
        else:
            log.error("partition %d: transaction failed (%s); taking it over again from the log", p, err)
        if p in self._assigned():
            self._schedule_takeover(p, 1.0 if isinstance(err, Fenced) else 0.0, 1)

    def inbox_lag(self, p: int) -> int | None:
        """Inbox records of partition p not read yet, as of the last audit (about a second ago);
        None if unknown. Measured on the main thread: the consumer is not called from others."""
        return self._lag.get(p)

    def _measure_lag(self) -> None:
        """From librdkafka's cached high watermark (no broker round trip) and our position."""
        lag: dict[int, int] = {}
        for p in list(self.owned):
            tp = TopicPartition(self.topics.inbox, p)
            try:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                position = self.consumer.position([tp])[0].offset
            except KafkaException:
                continue
            if high is not None and high >= 0 and position is not None and position >= 0:
                lag[p] = max(0, high - position)
        self._lag = lag


def _traced_input(item: object, msg: Message, decision: decide.Decision) -> tuple[decide.Decision, tuple[str, Action, Any] | None]:
    """Tracing only. A start's ``traceparent`` header joins the saga to the client's trace: it is
    kept in the snapshot from the first record on, so any later owner emits into that trace. A
    reply's names the participant's span: (step, action, header), linked from the attempt span."""
    if isinstance(item, ParticipantReply):
        return decision, (item.step, item.action, tracing.header(msg.headers()))
    if isinstance(item, StartSaga) and decision.records and decision.state is not None:
        parsed = tracing.parse_traceparent(tracing.header(msg.headers()))
        if parsed is not None:
            parent = tracing.format_traceparent(parsed[0], parsed[1], bool(parsed[2] & 1))
            decision.records = [r.replace(snapshot=r.snapshot.replace(trace_parent=parent)) for r in decision.records]
            decision.state = decision.state.replace(trace_parent=parent)
    return decision, None
