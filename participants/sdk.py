"""The participant SDK: turn saga commands into local transactions and replies, exactly once in effect.

A participant declares one handler per step and action::

    p = Participant("flights", topics=Topics("saga"), bootstrap="127.0.0.1:9092",
                    store=SqliteStore("flights.db", setup=create_tables))

    @p.execute("book-flight")
    def book(ctx: StepContext, tx: sqlite3.Connection) -> dict:
        ...                                   # business writes through tx; raise BusinessFailure to refuse
        return {"booking": "FL-1"}

    @p.compensate("book-flight")
    def cancel(ctx: StepContext, tx: sqlite3.Connection) -> None:
        ...

    p.run()                                   # until p.stop() (the CLI calls it on SIGTERM/SIGINT)

What the SDK guarantees, and how (see ``docs/CONTRACT.md`` for the wire side):

* **One local transaction per poll batch.** For every command of the batch, the handler's
  business writes (inside a SAVEPOINT, undone if it raises), the journal row, the reply (in
  the outbox) and the next command offset commit together. A crash anywhere leaves either
  all of them or none.
* **Idempotency.** The journal maps ``(saga_id, step, action)`` to the final reply; a repeated
  command gets the recorded reply again and the handler does not run again.
* **Order tolerance.** A compensate that arrives before its execute is recorded as done (the
  handler is not called) and the late execute is refused: nothing stays reserved.
* **Fencing.** The highest manager epoch seen per saga is kept; commands with a lower one
  (from a zombie manager) are refused without effect.
* **Outbox relay.** Replies leave through an idempotent producer after the commit; rows are
  deleted once acknowledged, and rows left behind by a crash are sent at the next start.
  Since the command offsets live in the same database, a participant killed between its
  commit and the publish sends each reply once after restart and never re-runs the command.
  For demos and tests, ``reply_hold_s`` makes the relay hold each new reply for a random
  time before sending it: a service whose work takes that long, pipelined (see
  :class:`Participant`).
* **Bad input never stops it.** Undecodable messages go to the dead-letter topic with the
  reason. A command it can answer but not act on (no handler for its step or action, a payload
  or outputs that are not JSON) is dead-lettered *and* answered BUSINESS_FAILURE, so the
  manager fails the step at once (an execute) or opens an incident for an operator (a
  compensation) instead of waiting for its timeout. An execute's refusal is recorded like any
  business failure; a compensation's is not, so a later attempt (``saga retry``) runs it.

Rules are a pure function (:func:`decide`), testable without Kafka or a database.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from participants.store import JournalEntry, OutboxRow, ParticipantStore, StoreTransaction
from sagalog import tracing
from sagalog.codec import Codec
from sagalog.config import Topics
from sagalog.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigError,
    DecodeError,
    MalformedRecord,
    SagaError,
)
from sagalog.kafka import (
    ClientOverrides,
    consumer_config,
    must_stop,
    producer_config,
    serving_fetch_wait_ms,
    translate,
)
from sagalog.records import Action, DeadLetter, ParticipantCommand, ParticipantReply, ReplyOutcome

if TYPE_CHECKING:
    from participants.metrics import ParticipantMetrics

_log = logging.getLogger(__name__)
#: librdkafka's own log lines, routed into logging instead of stderr.
_kafka_log = logging.getLogger("participants.kafka")

#: Test hook, for the crash test only: when set to 1, the process SIGKILLs itself right after
#: committing a batch that produced replies and before publishing them, to prove that a
#: restarted participant sends each of those replies exactly once and re-runs nothing.
CRASH_AFTER_COMMIT_ENV = "SAGA_PARTICIPANT_CRASH_AFTER_COMMIT"

#: The handler for any step without one of its own (e.g. the no-op participant).
ANY_STEP = "*"

#: Longest error text put into a reply; the rest is in the participant's log.
_MAX_ERROR_CHARS = 2000

#: The ``output`` of a compensation's SUCCESS when there was nothing to undo (and of any
#: handler that returns None): SUCCESS always carries a JSON value (docs/CONTRACT.md, section 4).
NOTHING_TO_UNDO = "{}"


class BusinessFailure(SagaError):
    """Raise from a handler: this step can never succeed (sold out, over the limit, declined).

    The handler's writes are rolled back. For an execute the failure is final and recorded
    (every retry of the command gets the same answer) and the manager aborts the saga. For a
    compensate it is not final: compensations must eventually succeed, so the manager retries.
    """


class TransientFailure(SagaError):
    """Raise from a handler: this attempt failed for a reason that may pass (a dependency is down,
    a lock timed out). The handler's writes are rolled back, the manager is answered
    RETRYABLE_ERROR and retries with backoff, and the participant logs one line. Any *other*
    exception is answered the same way but logged with its traceback: it is presumably a bug.
    """

    retryable = True


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a handler knows about the command it serves. ``payload``/``outputs`` are parsed JSON."""

    saga_id: str
    saga_type: str
    step: str
    action: Action
    attempt: int
    epoch: int
    command_id: str
    payload: Any
    outputs: dict[str, Any]
    deadline_ms: int


#: ``(ctx, tx) -> output``: ``tx`` is the store's handle inside the open transaction
#: (a ``sqlite3.Connection`` for :class:`~participants.store.SqliteStore`); never commit it.
Handler = Callable[[StepContext, Any], Any]
H = TypeVar("H", bound=Handler)


# --- the rules, as a pure function ----------------------------------------------------------


class Verdict(Enum):
    RUN = "run"  # call the handler
    REPLAY = "replay"  # answer with the recorded final reply, do nothing
    SKIP = "skip"  # a compensate with nothing to undo: record SUCCESS, handler not called
    REFUSE = "refuse"  # stale epoch, or execute after compensate: REFUSED, no effect
    UNABLE = "unable"  # it must run but cannot (no handler, bad payload): dead letter + BUSINESS_FAILURE


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str | None = None
    recorded: JournalEntry | None = None


def decide(
    command: ParticipantCommand,
    journal: Mapping[Action, JournalEntry],
    max_epoch: int | None,
    unable: str | None = None,
) -> Decision:
    """What to do with a command, given the step's journal and the saga's highest epoch seen.

    ``unable`` says why this participant could not run the command if it had to (no handler
    for the step and action, a payload or outputs that are not JSON), None if it could.

    Checked in this order (docs/CONTRACT.md, section 6): the epoch (a zombie manager's command
    changes nothing, whatever it is); then the journal, first matching row wins: a recorded
    compensation refuses every execute (even when the execute's SUCCESS is recorded too: its
    effect was undone) and is answered again to a compensate; a recorded execute is answered
    again to an execute; a compensate with no successful execute recorded has nothing to undo.
    Only a command that must really run is checked for ``unable``: it is then dead-lettered and
    answered BUSINESS_FAILURE, so the manager fails the step now instead of waiting it out.
    """
    if max_epoch is not None and command.epoch < max_epoch:
        return Decision(Verdict.REFUSE, f"stale epoch {command.epoch}: epoch {max_epoch} was already seen")
    executed = journal.get(Action.EXECUTE)
    compensated = journal.get(Action.COMPENSATE)
    if command.action is Action.EXECUTE:
        if compensated is not None:
            return Decision(Verdict.REFUSE, "the step was already compensated: a late execute is refused")
        if executed is not None:
            return Decision(Verdict.REPLAY, recorded=executed)
    else:
        if compensated is not None:
            return Decision(Verdict.REPLAY, recorded=compensated)
        if executed is None:
            return Decision(Verdict.SKIP, "compensated before execute: nothing was done, the execute will be refused")
        if executed.outcome is not ReplyOutcome.SUCCESS:
            return Decision(Verdict.SKIP, "the execute failed: nothing to undo")
    if unable is not None:
        return Decision(Verdict.UNABLE, unable)
    return Decision(Verdict.RUN)


# --- the outbox relay -----------------------------------------------------------------------


@dataclass
class _Flight:
    row: OutboxRow
    failures: int = 0
    dead_lettered: bool = False
    headers: tracing.Headers | None = None  # the reply's traceparent, when tracing


class OutboxRelay:
    """Publishes committed outbox rows and reports which ones the broker acknowledged.

    Delivery callbacks run inside ``producer.poll``/``flush``, on the participant's thread, so
    no locking is needed. Acknowledged row ids are handed back to the participant, which deletes
    them in its next transaction (no commit of their own). A row that fails with a retriable
    error is sent again with backoff; one that can never be delivered (e.g. a reply partition
    that does not exist) is replaced by a dead letter that carries it.

    ``hold_s=(lo, hi)`` (a simulation knob for demos and tests) holds each newly published row,
    dead letters excepted, for a delay drawn uniformly from ``[lo, hi]`` seconds before its
    first send. The row is already committed in the outbox, so a crash during the hold loses
    nothing: it is published at the next start, without a new hold. :meth:`flush` (on stop)
    sends held rows at once.
    """

    def __init__(
        self,
        producer: Producer,
        *,
        codec: Codec,
        dead_letters: str,
        component: str,
        hold_s: tuple[float, float] | None = None,
        rng: random.Random | None = None,
        on_reply_delivered: Callable[[], None] | None = None,
    ) -> None:
        self._producer = producer
        self._on_reply_delivered = on_reply_delivered
        self._codec = codec
        self._dead_letters = dead_letters
        self._component = component
        self._flights: dict[int, _Flight] = {}
        self._delivered: list[int] = []
        self._retries: list[tuple[float, int]] = []  # heap of (due, row id): backoffs and holds
        self._hold_s = _check_hold(hold_s)
        self._rng = rng or random.Random()
        self._held: set[int] = set()  # row ids in _retries for their hold, not for a backoff

    @property
    def held(self) -> int:
        """Rows committed and waiting out their hold (not sent yet)."""
        return len(self._held)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def oldest_in_flight(self) -> int | None:
        """Smallest unacknowledged row id (rows are kept in publish order; ids only grow)."""
        return next(iter(self._flights), None)

    def publish(self, rows: list[OutboxRow], *, hold: bool = True, headers: Mapping[int, tracing.Headers] | None = None) -> None:
        """Send committed rows (after their hold, when the relay has one and ``hold`` is true),
        with the Kafka headers ``headers`` gives by row id (a reply's ``traceparent``). Headers are
        kept in memory only: a row sent at the next start after a crash goes without."""
        now = time.monotonic()
        for row in rows:
            if row.id in self._flights:  # already on its way (startup re-publish after a quick restart)
                continue
            self._flights[row.id] = _Flight(row, headers=headers.get(row.id) if headers else None)
            if hold and self._hold_s is not None and row.topic != self._dead_letters:
                self._held.add(row.id)
                heapq.heappush(self._retries, (now + self._rng.uniform(*self._hold_s), row.id))
            else:
                self._send(row.id)

    def service(self) -> None:
        """Serve delivery reports and send rows whose backoff or hold has passed."""
        self._producer.poll(0)
        now = time.monotonic()
        while self._retries and self._retries[0][0] <= now:
            _, row_id = heapq.heappop(self._retries)
            self._held.discard(row_id)
            if row_id in self._flights:
                self._send(row_id)

    def next_due_s(self) -> float | None:
        """Seconds until the next held or backed-off row is due (0 if overdue), None if none."""
        if not self._retries:
            return None
        return max(0.0, self._retries[0][0] - time.monotonic())

    def release_held(self) -> None:
        """Send every held row now (stopping: the simulated work is cut short, the reply is not)."""
        if not self._held:
            return
        held, self._held = self._held, set()
        self._retries = [(due, row_id) for due, row_id in self._retries if row_id not in held]
        heapq.heapify(self._retries)
        for row_id in sorted(held):
            if row_id in self._flights:
                self._send(row_id)

    def take_delivered(self) -> list[int]:
        delivered, self._delivered = self._delivered, []
        return delivered

    def give_back(self, ids: list[int]) -> None:
        """Acknowledged ids whose deletion was rolled back: delete them next time."""
        self._delivered.extend(ids)

    def flush(self, timeout_s: float) -> int:
        """Wait for outstanding deliveries; return how many rows are still unacknowledged."""
        self.release_held()
        deadline = time.monotonic() + timeout_s
        while self._flights and time.monotonic() < deadline:
            self._producer.flush(max(0.0, min(0.5, deadline - time.monotonic())))
            self.service()
        return len(self._flights)

    def _send(self, row_id: int) -> None:
        flight = self._flights[row_id]
        row = flight.row
        kwargs: dict[str, Any] = {"key": row.key, "value": row.value, "on_delivery": partial(self._on_delivery, row_id)}
        if row.partition is not None:
            kwargs["partition"] = row.partition
        if flight.headers is not None:
            kwargs["headers"] = flight.headers
        while True:
            try:
                self._producer.produce(row.topic, **kwargs)
                return
            except BufferError:
                # The local queue is full: serving delivery reports frees room (waits up to 50 ms).
                self._producer.poll(0.05)
            except KafkaException as err:
                self._failed(row_id, translate(err, f"producing to {row.topic}[{row.partition}]"))
                return

    def _on_delivery(self, row_id: int, err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            flight = self._flights.pop(row_id, None)
            if flight is not None:
                self._delivered.append(row_id)
                if self._on_reply_delivered is not None and flight.row.topic != self._dead_letters:
                    self._on_reply_delivered()
            return
        self._failed(row_id, translate(err, "delivering an outbox row"))

    def _failed(self, row_id: int, error: BrokerError) -> None:
        flight = self._flights.get(row_id)
        if flight is None:
            return
        flight.failures += 1
        permanent = not error.retryable and not isinstance(error, BrokerUnavailable)
        if permanent and not flight.dead_lettered:
            _log.error("outbox row %d to %s[%s] cannot be delivered (%s): dead-lettering it",
                       row_id, flight.row.topic, flight.row.partition, error)
            flight.row = self._as_dead_letter(flight.row, str(error))
            flight.dead_lettered = True
            flight.headers = None
            flight.failures = 0
            self._send(row_id)
            return
        delay = min(30.0, 0.1 * 2 ** min(flight.failures - 1, 10))
        log = _log.warning if flight.failures <= 3 else _log.debug
        log("outbox row %d to %s[%s] not delivered (%s); retry %d in %.1fs",
            row_id, flight.row.topic, flight.row.partition, error, flight.failures, delay)
        heapq.heappush(self._retries, (time.monotonic() + delay, row_id))

    def _as_dead_letter(self, row: OutboxRow, reason: str) -> OutboxRow:
        letter = DeadLetter(
            source_topic=row.topic,
            source_partition=row.partition if row.partition is not None else -1,
            source_offset=-1,  # never written: the reply itself could not be produced
            key=row.key,
            value=row.value,
            reason=f"reply could not be delivered: {reason}"[:_MAX_ERROR_CHARS],
            error_type="UndeliverableReply",
            component=self._component,
            dead_lettered_ms=_now_ms(),
        )
        return OutboxRow(row.id, self._dead_letters, None, row.key, self._codec.encode(letter))


# --- the participant ------------------------------------------------------------------------


@dataclass
class _StepHandlers:
    execute: Handler | None = None
    compensate: Handler | None = None

    def get(self, action: Action) -> Handler | None:
        return self.execute if action is Action.EXECUTE else self.compensate


@dataclass(frozen=True, slots=True)
class _Reject:
    """Why a message goes to the dead-letter topic (and, for a command it can answer, why the
    participant replies BUSINESS_FAILURE)."""

    reason: str
    error_type: str


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A decoded command with a usable reply address: the handler for its action and its parsed
    JSON, or ``unable``, why the participant cannot run it (it is still answered, see
    :attr:`Verdict.UNABLE`)."""

    command: ParticipantCommand
    handler: Handler | None
    payload: Any
    outputs: dict[str, Any]
    unable: _Reject | None = None


@dataclass
class ParticipantStats:
    """Counters for logs and tests; read them, do not rely on them for correctness."""

    commands: int = 0
    batches: int = 0
    handler_runs: int = 0
    replays: int = 0
    refused: int = 0
    skipped: int = 0
    dead_letters: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)


class Participant:
    """One participant service: a consumer group on its command topic, a store, a relay.

    ``store=None`` makes a *stateless* participant, for handlers without local effects (the
    no-op participant of the benchmark, pure lookups): no journal, no outbox, no epoch check;
    every command runs its handler and the reply is produced directly. Command offsets are
    committed to Kafka only once the replies they caused are acknowledged, so replies are
    at-least-once (a crash makes the next owner answer some commands again). Anything that
    changes state must use a store.

    Not thread-safe except :meth:`stop`, which any thread (or a signal handler) may call.
    Several instances of one participant may run at once (they share the consumer group); they
    must share the store too (one SQLite file on one host, or a shared database), because a
    rebalance moves a saga's partition, and with it the saga's journal, between instances.

    ``reply_hold_s=(lo, hi)`` is a simulation knob for demos and tests, not for production: it
    models a service whose work takes ``lo``..``hi`` seconds (uniformly drawn per reply) but is
    pipelined. Handlers still run at once and their batch commits as usual; only the relay
    holds each new reply that long before sending it, so many commands can be "in progress"
    at once and throughput is not capped the way sleeping in a handler would cap it. A held
    reply is already durable in the outbox (sent at the next start after a crash).

    ``metrics_port`` serves Prometheus metrics on ``/metrics`` from :meth:`start` on (0: any free
    port; :attr:`metrics_address` says which): see :mod:`participants.metrics`. Participants of
    one process share one registry and one server. Tracing (OpenTelemetry) follows the process's
    ``OTEL_*`` environment or :func:`sagalog.tracing.install`: each command that carries a
    ``traceparent`` is handled inside a span, child of the manager's attempt span, and its reply
    carries the span's ``traceparent``.
    """

    def __init__(
        self,
        name: str,
        *,
        topics: Topics,
        bootstrap: str,
        store: ParticipantStore | None,
        overrides: ClientOverrides | None = None,
        session_timeout_ms: int = 6000,
        max_batch: int = 500,
        poll_timeout_s: float = 0.2,
        codec: Codec | None = None,
        crash_after_commit: bool | None = None,
        reply_hold_s: tuple[float, float] | None = None,
        metrics_port: int | None = None,
    ) -> None:
        if not name or ANY_STEP in name:
            raise ConfigError(f"participant name {name!r} is not valid")
        if max_batch < 1:
            raise ConfigError("max_batch must be at least 1")
        self.name = name
        self.topics = topics
        self.bootstrap = bootstrap
        self.store = store
        self.command_topic = topics.commands(name)
        self.group_id = f"{topics.prefix}.participant.{name}"
        self.stats = ParticipantStats()
        self._overrides = dict(overrides or {})
        self._session_timeout_ms = session_timeout_ms
        self._max_batch = max_batch
        self._poll_timeout_s = poll_timeout_s
        self._codec = codec or Codec()
        self._crash_after_commit = (
            os.environ.get(CRASH_AFTER_COMMIT_ENV) == "1" if crash_after_commit is None else crash_after_commit
        )
        self._reply_hold_s = _check_hold(reply_hold_s)
        self._component = f"participant:{name}@{socket.gethostname()}:{os.getpid()}"
        self._handlers: dict[tuple[str | None, str], _StepHandlers] = {}
        self._stopping = threading.Event()
        self._consumer: Consumer | None = None
        self._relay: OutboxRelay | None = None
        self._assigned: set[int] = set()
        self._kafka_offsets: dict[int, int] = {}  # partition -> next offset, not yet committed to Kafka
        self._last_kafka_commit = 0.0
        self._failures_in_a_row = 0
        # Stateless mode: in-memory row ids, and offsets waiting for their replies' acknowledgement.
        self._row_ids = itertools.count(1)
        self._unacked_offsets: deque[tuple[int, dict[int, int]]] = deque()
        self._metrics_port = metrics_port
        self._metrics: ParticipantMetrics | None = None
        #: Where /metrics is served, once started with a ``metrics_port``.
        self.metrics_address: tuple[str, int] | None = None
        #: None: tracing is off, and no span or header is made.
        self._tracing = tracing.get("saga-participant")
        self._batch_headers: dict[int, tracing.Headers] = {}  # reply row id -> its traceparent header

    # --- declaring handlers -----------------------------------------------------------

    def execute(self, step: str, *, saga_type: str | None = None) -> Callable[[H], H]:
        """Decorator: the handler that performs ``step`` (Ti). ``"*"`` matches any step.

        With ``saga_type`` the handler serves that step of that saga type only (for step names
        that mean different things in different saga types); without, every saga type.
        """
        return self._register(step, saga_type, Action.EXECUTE)

    def compensate(self, step: str, *, saga_type: str | None = None) -> Callable[[H], H]:
        """Decorator: the handler that undoes ``step`` (Ci). It must eventually succeed."""
        return self._register(step, saga_type, Action.COMPENSATE)

    def _register(self, step: str, saga_type: str | None, action: Action) -> Callable[[H], H]:
        def decorator(fn: H) -> H:
            handlers = self._handlers.setdefault((saga_type, step), _StepHandlers())
            slot = "execute" if action is Action.EXECUTE else "compensate"
            if getattr(handlers, slot) is not None:
                raise ConfigError(f"{self.name}: a {slot} handler for step {step!r} is already registered")
            setattr(handlers, slot, fn)
            return fn

        return decorator

    def handles(self) -> list[str]:
        """The steps this participant has handlers for (``type:step`` when bound to a saga type)."""
        return sorted(step if saga_type is None else f"{saga_type}:{step}" for saga_type, step in self._handlers)

    def _handlers_for(self, command: ParticipantCommand) -> _StepHandlers | None:
        for key in ((command.saga_type, command.step), (None, command.step), (None, ANY_STEP)):
            found = self._handlers.get(key)
            if found is not None:
                return found
        return None

    # --- running ----------------------------------------------------------------------

    @property
    def assigned(self) -> frozenset[int]:
        """Command partitions this instance consumes right now."""
        return frozenset(self._assigned)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def unacknowledged(self) -> int:
        """Replies and dead letters sent but not yet acknowledged by the broker (0 when idle)."""
        return self._relay.in_flight if self._relay is not None else 0

    def run(self) -> None:
        """Serve commands until :meth:`stop`; then deliver what is committed and leave the group."""
        self.start()
        try:
            while not self._stopping.is_set():
                self.poll_once()
        finally:
            self.close()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch (safe from signal handlers and threads)."""
        self._stopping.set()

    def start(self) -> None:
        """Open the store, publish replies left by a previous run, join the consumer group."""
        if not self._handlers:
            raise ConfigError(f"participant {self.name!r} has no handlers")
        if self.store is not None:
            self.store.open()  # first: a store that cannot open must not leave clients behind
        if self._metrics_port is not None and self._metrics is None:
            from participants.metrics import ParticipantMetrics, serve

            self._metrics = ParticipantMetrics(self)
            self.metrics_address = serve(self._metrics_port)
        client_id = f"{self.group_id}:{os.getpid()}"
        producer = Producer(
            producer_config(self.bootstrap, overrides={"client.id": client_id, **self._overrides}),
            logger=_kafka_log,
        )
        self._relay = OutboxRelay(
            producer,
            codec=self._codec,
            dead_letters=self.topics.dead_letters,
            component=self._component,
            hold_s=self._reply_hold_s,
            rng=random.Random(self.name),  # a reproducible sequence of holds per participant
            on_reply_delivered=None if self._metrics is None else self._metrics.replies_delivered.inc,
        )
        if self.store is not None:
            leftovers = self.store.pending()
            if leftovers:
                _log.info("%s: publishing %d messages committed before the last stop", self.name, len(leftovers))
                self._relay.publish(leftovers, hold=False)  # their hold, if any, passed while we were down
        config = consumer_config(
            self.bootstrap,
            self.group_id,
            session_timeout_ms=self._session_timeout_ms,
            overrides={
                "client.id": client_id,
                "fetch.wait.max.ms": serving_fetch_wait_ms(self.bootstrap, self._overrides),
                **self._overrides,
            },
        )
        self._consumer = Consumer(config, logger=_kafka_log)
        self._consumer.subscribe(
            [self.command_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )
        _log.info("%s: consuming %s as group %s%s", self.name, self.command_topic, self.group_id,
                  "" if self.store is not None else " (stateless)")

    def poll_once(self, timeout_s: float | None = None) -> int:
        """One iteration of the loop: consume a batch, process it in one transaction, publish.

        Returns how many commands were processed (0 on an idle poll or a failed batch).
        """
        consumer, relay = self._require_started()
        timeout_s = self._poll_timeout_s if timeout_s is None else timeout_s
        due_s = relay.next_due_s()
        if due_s is not None:  # a held reply or a retry falls due sooner: do not sleep past it
            timeout_s = min(timeout_s, due_s)
        messages = self._consume(consumer, timeout_s)
        processed = self._process(messages) if messages else 0
        relay.service()
        if not messages:  # idle: no batch transaction to carry the deletion of acknowledged rows
            self._forget_delivered()
        if self.store is None:
            self._release_acknowledged_offsets()
        self._commit_to_kafka(force=False)
        return processed

    def close(self) -> None:
        """Deliver committed replies (bounded wait), commit offsets, leave the group, close the store."""
        if self._relay is not None:
            left = self._relay.flush(timeout_s=10.0)
            if left:
                _log.warning("%s: %d replies not acknowledged%s", self.name, left,
                             "; they are sent at the next start" if self.store is not None else "")
            self._forget_delivered()
            if self.store is None:
                self._release_acknowledged_offsets()
        if self._consumer is not None:
            self._commit_to_kafka(force=True, asynchronous=False)
            try:
                self._consumer.close()
            except KafkaException as err:
                _log.warning("%s: %s", self.name, translate(err, "leaving the consumer group"))
            self._consumer = None
        self._relay = None
        if self.store is not None:
            self.store.close()

    def _require_started(self) -> tuple[Consumer, OutboxRelay]:
        if self._consumer is None or self._relay is None:
            raise RuntimeError(f"participant {self.name!r} is not started")
        return self._consumer, self._relay

    # --- consuming ----------------------------------------------------------------------

    def _consume(self, consumer: Consumer, timeout_s: float) -> list[Message]:
        # poll() returns as soon as one message is there; consume(n, 0) then takes whatever is
        # already fetched. (consume(n, timeout) alone waits for n messages or the full timeout.)
        try:
            first = consumer.poll(timeout_s)
            if first is None:
                return []
            return [first, *consumer.consume(self._max_batch - 1, 0)] if self._max_batch > 1 else [first]
        except KafkaException as err:
            raise translate(err, f"consuming {self.command_topic}") from err

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The store is the source of truth for where to resume: it was committed with the effects.
        # Partitions it has never seen resume at Kafka's committed offset (or the earliest).
        if self.store is not None:
            stored = self.store.offsets(self.command_topic)
            for tp in partitions:
                if tp.partition in stored:
                    tp.offset = stored[tp.partition]
        consumer.assign(partitions)
        self._assigned |= {tp.partition for tp in partitions}
        _log.info("%s: assigned partitions %s", self.name, sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Every processed batch is already committed locally; only the monitoring commit remains.
        self._commit_to_kafka(force=True)
        revoked = {tp.partition for tp in partitions}
        self._assigned -= revoked
        for p in revoked:
            self._kafka_offsets.pop(p, None)
        _log.info("%s: revoked partitions %s", self.name, sorted(revoked))

    def _records(self, messages: list[Message]) -> list[Message]:
        """The messages that carry records; consumer errors are logged (or raised if fatal)."""
        records: list[Message] = []
        for msg in messages:
            err = msg.error()
            if err is None:
                records.append(msg)
                continue
            error = translate(err, f"consuming {self.command_topic}")
            if must_stop(err):
                raise error
            _log.warning("%s: %s", self.name, error)
        return records

    # --- processing a batch ---------------------------------------------------------------

    def _process(self, messages: list[Message]) -> int:
        records = self._records(messages)
        if not records:
            return 0
        if self.store is None:
            return self._process_stateless(records)
        _, relay = self._require_started()
        delivered = relay.take_delivered()
        outgoing: list[OutboxRow] = []
        next_offsets: dict[int, int] = {}
        self._batch_headers = {}
        try:
            with self.store.transaction() as tx:
                if delivered:
                    tx.delete_outbox(delivered)
                for msg in records:
                    outgoing.extend(self._handle(tx, msg))
                    partition, offset = _where(msg)
                    next_offsets[partition] = offset + 1
                for partition, offset in next_offsets.items():
                    tx.save_offset(self.command_topic, partition, offset)
                committing = time.perf_counter()
        except Exception:
            if self._metrics is not None:
                self._metrics.batches_failed.inc()
            # The store failed (disk, lock timeout, ...): nothing of this batch happened. Read it
            # again after a pause; handler errors never get here (they become replies).
            relay.give_back(delivered)
            self._rewind(records)
            self._failures_in_a_row += 1
            delay = min(5.0, 0.1 * 2 ** min(self._failures_in_a_row - 1, 6))
            _log.exception("%s: a batch of %d commands could not be committed; retrying in %.1fs",
                           self.name, len(records), delay)
            self._stopping.wait(delay)
            return 0
        if self._metrics is not None:
            self._metrics.commit_seconds.observe(time.perf_counter() - committing)
            self._metrics.batches_committed.inc()
        self._failures_in_a_row = 0
        self.stats.batches += 1
        self.stats.commands += len(records)

        if self._crash_after_commit:
            _log.critical("%s: %s=1: killing this process after the commit, before publishing",
                          self.name, CRASH_AFTER_COMMIT_ENV)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

        relay.publish(outgoing, headers=self._batch_headers)
        self._kafka_offsets.update(next_offsets)
        return len(records)

    def _process_stateless(self, records: list[Message]) -> int:
        _, relay = self._require_started()
        rows: list[OutboxRow] = []
        next_offsets: dict[int, int] = {}
        self._batch_headers = {}
        for msg in records:
            rows.extend(self._handle_stateless(msg))
            partition, offset = _where(msg)
            next_offsets[partition] = offset + 1
        relay.publish(rows, headers=self._batch_headers)
        self._unacked_offsets.append((rows[-1].id, next_offsets))
        self.stats.batches += 1
        self.stats.commands += len(records)
        return len(records)

    def _rewind(self, records: list[Message]) -> None:
        consumer, _ = self._require_started()
        first: dict[int, int] = {}
        for msg in records:
            first.setdefault(*_where(msg))
        for partition, offset in first.items():
            try:
                consumer.seek(TopicPartition(self.command_topic, partition, offset))
            except KafkaException as err:  # revoked meanwhile: the next owner reads the stored offset
                _log.debug("%s: %s", self.name, translate(err, f"seeking back partition {partition}"))

    # --- one command ----------------------------------------------------------------------

    def _parse(self, msg: Message) -> _Parsed | _Reject:
        """Decode a command, or say why it must be dead-lettered without a reply (nothing to
        answer, or nowhere to send the answer). A command that can be answered but not run (no
        handler, payload not JSON) comes back as :class:`_Parsed` with ``unable`` set."""
        try:
            command = self._codec.decode(msg.value())
        except DecodeError as err:
            return _Reject(str(err.at(self.command_topic, *_where(msg))), type(err).__name__)
        if not isinstance(command, ParticipantCommand):
            return _Reject(f"a {type(command).__name__} is not a command", "WrongRecordType")
        if command.reply_partition < 0:
            return _Reject(f"reply_partition {command.reply_partition} is negative", "InvalidCommand")
        handlers = self._handlers_for(command)
        if handlers is None:
            unable = _Reject(f"participant {self.name!r} has no handler for step {command.step!r} "
                             f"(saga type {command.saga_type!r})", "UnknownStep")
            return _Parsed(command, None, None, {}, unable)
        handler = handlers.get(command.action)
        if handler is None:
            unable = _Reject(f"participant {self.name!r} has no {command.action.value.lower()} handler for step "
                             f"{command.step!r}", "UnknownStep")
            return _Parsed(command, None, None, {}, unable)
        try:
            payload = json.loads(command.payload)
            outputs = json.loads(command.outputs)
        except ValueError as err:
            return _Parsed(command, None, None, {}, _Reject(f"payload or outputs is not valid JSON: {err}",
                                                            "InvalidCommand"))
        if not isinstance(outputs, dict):
            return _Parsed(command, None, None, {}, _Reject("outputs is not a JSON object", "InvalidCommand"))
        return _Parsed(command, handler, payload, outputs)

    def _handle(self, tx: StoreTransaction, msg: Message) -> list[OutboxRow]:
        """Apply the rules to one command; the reply and any dead letter go into the outbox."""
        parsed = self._parse(msg)
        if isinstance(parsed, _Reject):
            if self._metrics is not None:
                self._metrics.command("unknown", "dead_lettered")
            return [tx.enqueue(self.topics.dead_letters, None, msg.key(), self._dead_letter(msg, parsed))]
        if self._tracing is None and self._metrics is None:
            return self._answer(tx, msg, parsed)[0]
        return self._observed(msg, parsed, lambda: self._answer(tx, msg, parsed))

    def _observed(
        self, msg: Message, parsed: _Parsed, answer: Callable[[], tuple[list[OutboxRow], ParticipantReply, str]]
    ) -> list[OutboxRow]:
        """``answer()`` inside the command's span (tracing), counted (metrics). The reply is the
        last row: it gets the span's ``traceparent`` when it is published."""
        command = parsed.command
        if self._tracing is None:
            rows, reply, outcome = answer()
        else:
            with self._tracing.participant_span(self.name, self.command_topic, command, msg.headers()) as span:
                rows, reply, outcome = answer()
                if span is not None:
                    self._batch_headers[rows[-1].id] = self._tracing.answered(span, outcome, reply.error)
        if self._metrics is not None:
            self._metrics.command(command.action.value.lower(), outcome)
        return rows

    def _answer(
        self, tx: StoreTransaction, msg: Message, parsed: _Parsed
    ) -> tuple[list[OutboxRow], ParticipantReply, str]:
        """The rules for a decoded command: its rows (any dead letter, then the reply), the reply,
        and how it was answered (a metrics outcome: the reply's, ``replayed`` or ``dead_lettered``)."""
        command = parsed.command
        max_epoch = tx.max_epoch(command.saga_id)
        decision = decide(command, tx.journal(command.saga_id, command.step), max_epoch,
                          None if parsed.unable is None else parsed.unable.reason)
        # Every command that is not stale raises the saga's epoch, whatever it ends in (a refusal
        # of a late execute, a retryable error, a dead letter): the epoch proves a newer owner exists.
        # It is written outside the handler's savepoint, so a failing handler does not undo it.
        if max_epoch is None or command.epoch > max_epoch:
            tx.raise_epoch(command.saga_id, command.epoch)
        rows: list[OutboxRow] = []
        encoded: bytes | None = None
        outcome: str | None = None
        if decision.verdict is Verdict.REFUSE:
            self.stats.refused += 1
            _log.info("%s: refused %s (epoch %d): %s", self.name, command.command_id, command.epoch, decision.reason)
            reply = self._reply(command, ReplyOutcome.REFUSED, error=decision.reason)
        elif decision.verdict is Verdict.REPLAY:
            assert decision.recorded is not None
            self.stats.replays += 1
            recorded = decision.recorded
            reply = self._reply(command, recorded.outcome, output=recorded.output, error=recorded.error)
            outcome = "replayed"
        elif decision.verdict is Verdict.SKIP:
            self.stats.skipped += 1
            _log.info("%s: %s: %s", self.name, command.command_id, decision.reason)
            reply = self._reply(command, ReplyOutcome.SUCCESS, output=NOTHING_TO_UNDO)
            tx.record(self._entry(reply))
        elif decision.verdict is Verdict.UNABLE:
            assert parsed.unable is not None
            rows.append(tx.enqueue(self.topics.dead_letters, None, msg.key(), self._dead_letter(msg, parsed.unable)))
            reply = self._unable_reply(command, parsed.unable)
            if command.action is Action.EXECUTE:  # final, like any business failure of an execute
                tx.record(self._entry(reply))
            outcome = "dead_lettered"
        else:
            assert parsed.handler is not None
            reply, encoded = self._run(parsed, parsed.handler, tx.handle, tx.savepoint())
            final = reply.outcome is ReplyOutcome.SUCCESS or (
                reply.outcome is ReplyOutcome.BUSINESS_FAILURE and command.action is Action.EXECUTE
            )
            if final:  # RETRYABLE_ERROR, and a failed compensation, run again on the next attempt
                tx.record(self._entry(reply))
        self._count(reply)
        rows.append(tx.enqueue(command.reply_topic, command.reply_partition, command.saga_id.encode(),
                               encoded if encoded is not None else self._codec.encode(reply)))
        return rows, reply, outcome or reply.outcome.value.lower()

    def _handle_stateless(self, msg: Message) -> list[OutboxRow]:
        parsed = self._parse(msg)
        if isinstance(parsed, _Reject):
            if self._metrics is not None:
                self._metrics.command("unknown", "dead_lettered")
            return [OutboxRow(next(self._row_ids), self.topics.dead_letters, None, msg.key(),
                              self._dead_letter(msg, parsed))]
        if self._tracing is None and self._metrics is None:
            return self._answer_stateless(msg, parsed)[0]
        return self._observed(msg, parsed, lambda: self._answer_stateless(msg, parsed))

    def _answer_stateless(self, msg: Message, parsed: _Parsed) -> tuple[list[OutboxRow], ParticipantReply, str]:
        command = parsed.command
        rows: list[OutboxRow] = []
        outcome: str | None = None
        if parsed.unable is not None:
            rows.append(OutboxRow(next(self._row_ids), self.topics.dead_letters, None, msg.key(),
                                  self._dead_letter(msg, parsed.unable)))
            reply = self._unable_reply(command, parsed.unable)
            encoded = self._codec.encode(reply)
            outcome = "dead_lettered"
        else:
            assert parsed.handler is not None
            reply, encoded = self._run(parsed, parsed.handler, None, nullcontext())
        self._count(reply)
        rows.append(OutboxRow(next(self._row_ids), command.reply_topic, command.reply_partition,
                              command.saga_id.encode(), encoded))
        return rows, reply, outcome or reply.outcome.value.lower()

    def _unable_reply(self, command: ParticipantCommand, unable: _Reject) -> ParticipantReply:
        """The answer to a command this participant cannot act on: a refusal the manager turns
        into a failure now (an execute fails its step; a compensation becomes an incident)."""
        _log.warning("%s: cannot act on %s, answering BUSINESS_FAILURE: %s", self.name, command.command_id,
                     unable.reason)
        error = f"{unable.error_type}: {unable.reason} (dead-lettered by {self._component})"
        return self._reply(command, ReplyOutcome.BUSINESS_FAILURE, error=error[:_MAX_ERROR_CHARS])

    def _run(
        self, parsed: _Parsed, handler: Handler, handle: Any, savepoint: AbstractContextManager[Any]
    ) -> tuple[ParticipantReply, bytes]:
        """Call the handler; its writes stay only if it returns (inside ``savepoint``)."""
        command = parsed.command
        self.stats.handler_runs += 1
        ctx = StepContext(
            saga_id=command.saga_id,
            saga_type=command.saga_type,
            step=command.step,
            action=command.action,
            attempt=command.attempt,
            epoch=command.epoch,
            command_id=command.command_id,
            payload=parsed.payload,
            outputs=parsed.outputs,
            deadline_ms=command.deadline_ms,
        )
        try:
            with savepoint:
                result = handler(ctx, handle) if self._metrics is None else self._timed(handler, ctx, handle)
                output = json.dumps({} if result is None else result, separators=(",", ":"))
                reply = self._reply(command, ReplyOutcome.SUCCESS, output=output)
                # Encoded inside the savepoint: an output too large to send undoes the writes.
                return reply, self._codec.encode(reply)
        except BusinessFailure as failure:
            error = str(failure)[:_MAX_ERROR_CHARS] or type(failure).__name__
            if command.action is Action.COMPENSATE:
                _log.warning("%s: compensation %s failed (%s); the manager will retry it",
                             self.name, command.command_id, error)
            reply = self._reply(command, ReplyOutcome.BUSINESS_FAILURE, error=error)
        except Exception as err:  # any bug or outage in a handler: nothing changed, try again
            # One line for a failure the handler announced; a traceback for anything else (a bug).
            _log.warning("%s: %s attempt %d failed (%s), answering RETRYABLE_ERROR", self.name, command.command_id,
                         command.attempt, err, exc_info=not isinstance(err, TransientFailure))
            reply = self._reply(command, ReplyOutcome.RETRYABLE_ERROR,
                                error=f"{type(err).__name__}: {err}"[:_MAX_ERROR_CHARS])
        return reply, self._codec.encode(reply)

    def _timed(self, handler: Handler, ctx: StepContext, handle: Any) -> Any:
        assert self._metrics is not None
        began = time.perf_counter()
        try:
            return handler(ctx, handle)
        finally:
            self._metrics.handled(ctx.step, ctx.action.value.lower(), time.perf_counter() - began)

    def _reply(
        self, command: ParticipantCommand, outcome: ReplyOutcome, *, output: str | None = None, error: str | None = None
    ) -> ParticipantReply:
        # attempt and epoch are the command's, even for a replayed reply: the manager matches a
        # reply to the attempt it is waiting for; outcome, output and error are the recorded ones.
        return ParticipantReply(
            command_id=command.command_id,
            saga_id=command.saga_id,
            step=command.step,
            action=command.action,
            attempt=command.attempt,
            epoch=command.epoch,
            outcome=outcome,
            output=output,
            error=error,
            participant=self.name,
            replied_ms=_now_ms(),
        )

    @staticmethod
    def _entry(reply: ParticipantReply) -> JournalEntry:
        return JournalEntry(reply.saga_id, reply.step, reply.action, reply.command_id, reply.outcome, reply.output,
                            reply.error, reply.replied_ms, reply.epoch)

    def _count(self, reply: ParticipantReply) -> None:
        key = reply.outcome.value
        self.stats.by_outcome[key] = self.stats.by_outcome.get(key, 0) + 1

    def _dead_letter(self, msg: Message, reject: _Reject) -> bytes:
        """The encoded DeadLetter for a message: the original bytes, where they were, and why."""
        self.stats.dead_letters += 1
        partition, offset = _where(msg)
        _log.warning("%s: dead-lettering %s[%d]@%d: %s", self.name, self.command_topic, partition, offset,
                     reject.reason)
        letter = DeadLetter(
            source_topic=self.command_topic,
            source_partition=partition,
            source_offset=offset,
            key=msg.key(),
            value=msg.value(),
            reason=reject.reason[:_MAX_ERROR_CHARS],
            error_type=reject.error_type,
            component=self._component,
            dead_lettered_ms=_now_ms(),
        )
        try:
            return self._codec.encode(letter)
        except MalformedRecord:  # the original is too big to carry: point at it instead
            return self._codec.encode(letter.model_copy(update={
                "value": None, "reason": f"{letter.reason} (value too large to copy; read it at the source offset)"
            }))

    # --- bookkeeping --------------------------------------------------------------------

    def _forget_delivered(self) -> None:
        """Delete acknowledged outbox rows when no batch came to carry the deletion."""
        if self._relay is None:
            return
        delivered = self._relay.take_delivered()
        if not delivered or self.store is None:
            return
        try:
            with self.store.transaction() as tx:
                tx.delete_outbox(delivered)
        except Exception:
            self._relay.give_back(delivered)
            _log.exception("%s: could not delete %d delivered outbox rows; will retry", self.name, len(delivered))

    def _release_acknowledged_offsets(self) -> None:
        """Stateless mode: a batch's offsets may be committed once all its replies are acknowledged."""
        if self._relay is None:
            return
        oldest = self._relay.oldest_in_flight()
        while self._unacked_offsets and (oldest is None or self._unacked_offsets[0][0] < oldest):
            _, offsets = self._unacked_offsets.popleft()
            self._kafka_offsets.update(offsets)

    def _commit_to_kafka(self, *, force: bool, asynchronous: bool = True) -> None:
        """Copy committed offsets to Kafka about once a second (lag monitoring; the source of truth
        in stateless mode)."""
        if self._consumer is None or not self._kafka_offsets:
            return
        now = time.monotonic()
        if not force and now - self._last_kafka_commit < 1.0:
            return
        offsets = [TopicPartition(self.command_topic, p, o) for p, o in self._kafka_offsets.items()]
        self._kafka_offsets = {}
        self._last_kafka_commit = now
        try:
            if asynchronous:
                self._consumer.commit(offsets=offsets, asynchronous=True)
            else:
                self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as err:
            _log.debug("%s: %s", self.name, translate(err, "committing offsets to Kafka"))


def _where(msg: Message) -> tuple[int, int]:
    """(partition, offset) of a consumed record (never None for a record without error)."""
    partition, offset = msg.partition(), msg.offset()
    assert partition is not None and offset is not None, "a consumed record always has a position"
    return partition, offset


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_hold(hold_s: tuple[float, float] | None) -> tuple[float, float] | None:
    """A valid ``(lo, hi)`` hold in seconds, or None for no hold (also for ``(0, 0)``)."""
    if hold_s is None:
        return None
    lo, hi = (float(x) for x in hold_s)
    if not 0.0 <= lo <= hi:
        raise ConfigError(f"a reply hold needs 0 <= lo <= hi seconds, not {hold_s!r}")
    return None if hi == 0.0 else (lo, hi)
