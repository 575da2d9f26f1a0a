"""Start sagas from code and follow them: :class:`SagaClient`, the API the ``saga`` CLI uses too.

::

    from sagalog.client import SagaClient

    with SagaClient("broker:9092", definitions=DefinitionSet.load(["sagas/"])) as sagas:
        started = sagas.start("book-trip", {"flight": "LH-100", "travellers": 2})
        result = sagas.wait(started.saga_id, timeout_s=30)     # SagaResult; SagaTimeout if not ended
        if result.status == "COMPLETED": ...

Starting produces a ``StartSaga`` request to ``<prefix>.inbox`` keyed by saga id (Kafka's
murmur2 partitioner, as every producer of the project), which the manager owning that
partition picks up; cancelling produces a ``CancelSaga``; answering an incident (a compensation
that waits for an operator) produces an ``OperatorAction`` (:meth:`SagaClient.retry`,
:meth:`SagaClient.resolve`). The client keeps **one producer**
for its lifetime, created at the first request it sends; :meth:`SagaClient.start_many` produces
every request and flushes **once**. Queries (:meth:`~SagaClient.status`, :meth:`~SagaClient.wait`,
:meth:`~SagaClient.list`, ...) answer from the read model (:mod:`sagalog.readmodel`): a local
SQLite cache of the saga log caught up at each call, which needs no manager to be running.

**Synchronous only, by design.** From asyncio, wrap calls in ``asyncio.to_thread`` (e.g.
``await asyncio.to_thread(client.wait, saga_id)``). The read model's SQLite connection belongs
to the thread that opened it, so the client opens one read model per calling thread (lazily)
and shares the producer; simplest is one thread per client (a single-worker executor), but the
default executor's threads work as well. Close the client when done (:meth:`close`, or ``with``).

Errors are the project's own (:mod:`sagalog.errors`): :class:`~sagalog.errors.ConfigError`
for a bad request (the subclasses below say which part), :class:`~sagalog.errors.BrokerUnavailable`
/ :class:`~sagalog.errors.BrokerError` from Kafka (translated by :func:`sagalog.kafka.translate`),
:class:`sagalog.readmodel.SagaNotFound` (also importable from here) for an unknown saga id,
and :class:`SagaTimeout` when :meth:`~SagaClient.wait` gives up. Requests are validated before
anything is produced: a batch with one bad request starts nothing.

Importing this module is cheap (no Kafka client, no SQLite): ``saga status`` starts a fresh
process for every call.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagalog.config import Topics, default_bootstrap
from sagalog.errors import BrokerError, BrokerUnavailable, ConfigError, SagaError

if TYPE_CHECKING:
    from confluent_kafka import Producer

    from sagalog.definition import DefinitionSet
    from sagalog.fold import SagaState
    from sagalog.kafka import ClientOverrides
    from sagalog.readmodel import HistoryEntry, ReadModel, SagaNotFound, SagaRemoved, SagaSummary, SagaView
    from sagalog.records import IncidentAction, OperatorAction, SagaStatus
    from sagalog.tracing import Headers

__all__ = [
    "InvalidPayload",
    "InvalidSagaId",
    "SagaClient",
    "SagaExists",
    "SagaNotFound",
    "SagaRemoved",
    "SagaRequest",
    "SagaResult",
    "SagaTimeout",
    "Started",
    "UnknownSagaType",
]

#: What a saga id may look like (it is a Kafka key and appears in command ids and file names).
SAGA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$")
_TYPE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # sagalog.definition.NAME
_ID_RULE = "use up to 200 letters, digits and . _ : @ -, starting with a letter or digit"


# --- errors -----------------------------------------------------------------------------------


class SagaTimeout(SagaError):
    """:meth:`SagaClient.wait` gave up: the saga did not end in time (``state``: as last seen, or
    None if it has not begun). Retryable: waiting again may see it end."""

    retryable = True

    def __init__(self, message: str, *, saga_id: str, timeout_s: float, state: SagaState | None) -> None:
        super().__init__(message)
        self.saga_id, self.timeout_s, self.state = saga_id, timeout_s, state


class InvalidSagaId(ConfigError):
    """A saga id that is not valid (format, or repeated within one batch)."""


class UnknownSagaType(ConfigError):
    """A saga type the client's definitions do not know (or not a valid type name)."""


class InvalidPayload(ConfigError):
    """A payload that is not JSON, or breaks the saga type's ``payload_schema``."""


class SagaExists(ConfigError):
    """A saga with this explicit id is already on the log: a second start would be ignored."""

    def __init__(self, message: str, *, saga_id: str) -> None:
        super().__init__(message)
        self.saga_id = saga_id


def __getattr__(name: str) -> Any:
    # Re-exported lazily: sagalog.readmodel imports confluent_kafka and sqlite3.
    if name in ("SagaNotFound", "SagaRemoved"):
        from sagalog import readmodel

        return getattr(readmodel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- typed requests and results ---------------------------------------------------------------


@dataclass(frozen=True)
class SagaRequest:
    """One saga to start: its type, its payload (a dict/list, JSON text, or None for ``{}``) and
    optionally its id (default: ``<type>-<12 hex digits>``)."""

    saga_type: str
    payload: Any = None
    saga_id: str | None = None


@dataclass(frozen=True)
class Started:
    """A start request the broker acknowledged (the saga begins once a manager picks it up)."""

    saga_id: str
    saga_type: str
    partition: int

    def as_json(self) -> dict[str, Any]:
        return {"saga_id": self.saga_id, "saga_type": self.saga_type, "partition": self.partition}


@dataclass(frozen=True)
class SagaResult:
    """How a saga ended: ``status`` is COMPLETED or ABORTED (with the ``reason``); ``outputs``
    maps each step that returned output to it (parsed JSON); ``state`` is the whole final state."""

    saga_id: str
    saga_type: str
    status: SagaStatus
    reason: str | None
    outputs: Mapping[str, Any]
    state: SagaState

    @property
    def completed(self) -> bool:
        return self.status == "COMPLETED"

    @classmethod
    def of(cls, state: SagaState) -> SagaResult:
        return cls(
            saga_id=state.saga_id,
            saga_type=state.saga_type,
            status=state.status,
            reason=state.reason,
            outputs={s.name: _json_or_text(s.output) for s in state.steps if s.output is not None},
            state=state,
        )


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class _Prepared:
    saga_id: str
    saga_type: str
    payload: str  # compact JSON
    explicit_id: bool


# --- the client -------------------------------------------------------------------------------


class SagaClient:
    """Start, cancel and follow sagas of one deployment (bootstrap servers + topic prefix).

    ``definitions``: when given, a start is refused unless its type is known and its payload
    satisfies the type's ``payload_schema`` (the managers check again; without definitions a bad
    request reaches them and ends in ``<prefix>.dead-letters``). ``overrides``: librdkafka
    settings (SASL, TLS, ...). ``state_dir``: where the read model lives (default
    ``$SAGA_STATE_DIR``, else ``~/.cache/saga``). ``timeout_s``: how long to wait for the broker
    (metadata, acknowledgements) and, for queries, for a partition to be read to its end.
    """

    def __init__(
        self,
        bootstrap: str | None = None,
        *,
        topic_prefix: str = "saga",
        definitions: DefinitionSet | None = None,
        overrides: ClientOverrides | None = None,
        state_dir: Path | str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.bootstrap = bootstrap or default_bootstrap()
        self.topics = Topics(prefix=topic_prefix)  # a bad prefix: ConfigError, saying what is wrong
        self.definitions = definitions
        self.overrides = dict(overrides or {})
        self.state_dir = Path(state_dir).expanduser() if state_dir is not None else None
        self.timeout_s = timeout_s
        self._producer: Producer | None = None
        self._inbox_checked = False
        self._lock = threading.Lock()
        self._local = threading.local()
        self._models: list[tuple[int, ReadModel]] = []  # (opening thread, model)
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> SagaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Deliver what is still queued (up to ``timeout_s``), close the producer and read models."""
        import sqlite3

        with self._lock:
            if self._closed:
                return
            self._closed = True
            producer, self._producer = self._producer, None
            models, self._models = self._models, []
            self._local = threading.local()  # other threads' references go with it
        failed: BrokerError | None = None
        if producer is not None:
            failed = _flushed(producer, self.timeout_s, "delivering the queued requests")
        me = threading.get_ident()
        for thread, model in models:
            try:
                model.close()
            except sqlite3.ProgrammingError:
                # Opened by another thread: its Kafka consumer is closed (ReadModel.close closes it
                # first), and SQLite closes the connection when the model is garbage-collected.
                if thread == me:
                    raise
        if failed is not None:
            raise failed

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this SagaClient is closed; create a new one")

    @property
    def staleness(self) -> str | None:
        """After a query: one line if some log partition was not read to its end within
        ``timeout_s`` (the answer may miss its newest records), else None."""
        model: ReadModel | None = getattr(self._local, "model", None)
        return None if model is None else model.staleness

    def _model(self) -> ReadModel:
        """This thread's read model (SQLite connections cannot cross threads)."""
        self._check_open()
        model: ReadModel | None = getattr(self._local, "model", None)
        if model is None:
            from sagalog.readmodel import ReadModel

            model = ReadModel(
                self.bootstrap, self.topics, state_dir=self.state_dir, overrides=self.overrides, timeout_s=self.timeout_s
            )
            with self._lock:
                self._models.append((threading.get_ident(), model))
            self._local.model = model
        return model

    # -- starting ------------------------------------------------------------------------

    def validate(self, request: SagaRequest) -> None:
        """Raise what :meth:`start` would raise for this request, without producing anything
        (whether an explicit id is already on the log is not checked: that reads the log)."""
        self._prepare(request)

    def start(self, saga_type: str, payload: Any = None, *, saga_id: str | None = None) -> Started:
        """Start one saga; returns once the broker has acknowledged the request.

        ``payload``: a dict/list (any JSON value), JSON text, or None (``{}``). ``saga_id``:
        default ``<type>-<12 hex digits>``; an explicit id already on the log is refused
        (:class:`SagaExists`). Raises :class:`InvalidSagaId`, :class:`UnknownSagaType`,
        :class:`InvalidPayload` before anything is produced, and broker errors.
        """
        return self.start_many([SagaRequest(saga_type, payload, saga_id)])[0]

    def start_many(self, requests: Iterable[SagaRequest]) -> list[Started]:
        """Start many sagas: every request is validated first (one bad request: nothing is
        produced), then all are produced and flushed once. Results are in request order."""
        self._check_open()
        prepared = [self._prepare(r) for r in requests]
        seen: set[str] = set()
        for p in prepared:
            if p.saga_id in seen:
                raise InvalidSagaId(f"saga id {p.saga_id!r} appears twice in one batch; each saga needs its own id")
            seen.add(p.saga_id)
        if not prepared:
            return []
        self._refuse_existing([p.saga_id for p in prepared if p.explicit_id])

        from sagalog.codec import Codec
        from sagalog.records import StartSaga

        codec, now = Codec(), int(time.time() * 1000)
        encoded = [
            (p.saga_id, codec.encode(StartSaga(saga_id=p.saga_id, saga_type=p.saga_type, payload=p.payload, requested_ms=now)))
            for p in prepared
        ]
        # Started inside a span of the caller's (OpenTelemetry): each saga joins the caller's trace.
        partitions = self._produce(encoded, "start request", headers=_trace_headers())
        return [Started(p.saga_id, p.saga_type, part) for p, part in zip(prepared, partitions, strict=True)]

    def _prepare(self, request: SagaRequest) -> _Prepared:
        saga_type, saga_id = request.saga_type, request.saga_id
        if saga_id is not None and (not isinstance(saga_id, str) or not SAGA_ID.match(saga_id)):
            raise InvalidSagaId(f"{saga_id!r} is not a valid saga id: {_ID_RULE}")
        if not isinstance(saga_type, str) or not _TYPE_NAME.match(saga_type):
            raise UnknownSagaType(f"{saga_type!r} is not a valid saga type name (letters, digits, '_', '.' and '-')")
        definition = None
        if self.definitions is not None:
            definition = self.definitions.get(saga_type)
            if definition is None:
                raise UnknownSagaType(
                    f"unknown saga type {saga_type!r}; known types: {', '.join(self.definitions.names())}"
                )
        payload = request.payload
        if payload is None:
            payload = {}
        elif isinstance(payload, str | bytes | bytearray):
            try:
                payload = json.loads(payload)
            except ValueError as err:
                raise InvalidPayload(f"payload for saga type {saga_type!r} is not valid JSON ({err})") from err
        try:
            text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as err:
            raise InvalidPayload(f"payload for saga type {saga_type!r} cannot be written as JSON ({err})") from err
        if definition is not None:
            try:
                # Validate what the manager will see: the JSON round trip (tuples become lists...).
                definition.validate_payload(json.loads(text))
            except ConfigError as err:
                raise InvalidPayload(str(err)) from err
        if saga_id is None:
            return _Prepared(f"{saga_type}-{uuid.uuid4().hex[:12]}", saga_type, text, explicit_id=False)
        return _Prepared(saga_id, saga_type, text, explicit_id=True)

    def _refuse_existing(self, saga_ids: list[str]) -> None:
        if not saga_ids:
            return
        model = self._model()
        model.catch_up({model.partition_of(i) for i in saga_ids})
        known = model.statuses(saga_ids)
        for saga_id in saga_ids:
            if saga_id in known:
                raise SagaExists(
                    f"saga {saga_id!r} exists already ({known[saga_id].value}); a second start would be ignored: "
                    f"choose another id, or omit the id for a fresh one",
                    saga_id=saga_id,
                )

    # -- producing -----------------------------------------------------------------------

    def _get_producer(self) -> Producer:
        with self._lock:
            self._check_open()
            if self._producer is None:
                from confluent_kafka import Producer

                from sagalog.kafka import producer_config

                self._producer = Producer(producer_config(self.bootstrap, overrides=self.overrides))
            return self._producer

    def _check_inbox(self, producer: Producer) -> None:
        """The inbox must exist (checked once): producing to a missing topic would wait out the
        timeout, or create it with the wrong shape on brokers that auto-create topics."""
        if self._inbox_checked:
            return
        from confluent_kafka import KafkaException

        from sagalog.kafka import translate

        try:
            topics = producer.list_topics(timeout=self.timeout_s).topics  # all topics: never name one
        except KafkaException as err:
            translated = translate(err, f"reading metadata from {self.bootstrap}")
            if isinstance(translated, BrokerUnavailable):
                raise BrokerUnavailable(
                    f"no Kafka broker answered at {self.bootstrap} within {self.timeout_s:g}s ({err}); start one "
                    f"('saga broker', or 'saga demo' for everything), or pass --bootstrap-servers / set "
                    f"SAGA_BOOTSTRAP_SERVERS"
                ) from err
            raise translated from err
        if self.topics.inbox not in topics:
            raise ConfigError(
                f"topic {self.topics.inbox} does not exist at {self.bootstrap}; start a manager ('saga manager') "
                f"or create the topics ('saga topics create')"
            )
        self._inbox_checked = True

    def _produce(self, messages: list[tuple[str, bytes]], what: str, headers: Headers | None = None) -> list[int]:
        """Produce (key, value) pairs to the inbox (each with ``headers``, if any), flush once; each
        one's partition once acknowledged."""
        from confluent_kafka import KafkaError, KafkaException, Message

        from sagalog.kafka import translate

        producer = self._get_producer()
        self._check_inbox(producer)
        inbox = self.topics.inbox
        outcomes: list[tuple[KafkaError | None, Message] | None] = [None] * len(messages)

        def on_delivery(index: int) -> Any:
            return lambda err, msg: outcomes.__setitem__(index, (err, msg))

        deadline = time.monotonic() + self.timeout_s
        try:
            for index, (saga_id, value) in enumerate(messages):
                while True:
                    try:
                        producer.produce(inbox, value, key=saga_id.encode(), on_delivery=on_delivery(index), headers=headers)
                        break
                    except BufferError:
                        # The local queue is full (a very large batch): let deliveries drain it.
                        if time.monotonic() > deadline:
                            raise BrokerUnavailable(
                                f"{what}s are not being delivered to {self.bootstrap} ({index} of {len(messages)} "
                                f"queued in {self.timeout_s:g}s); check the broker and try again"
                            ) from None
                        producer.poll(0.1)
            producer.flush(max(0.0, deadline - time.monotonic()))
        except KafkaException as err:
            raise translate(err, f"sending {what}s to {inbox}") from err
        except SystemError as err:
            # confluent-kafka surfaces a fatal producer error (e.g. no ACL to write anything: no
            # idempotent producer id) raised while a delivery callback runs as a SystemError
            # chained to the KafkaException: report that one, in our words.
            cause = err.__cause__ or err.__context__
            if isinstance(cause, KafkaException):
                raise translate(cause, f"sending {what}s to {inbox}") from err
            raise

        for index, outcome in enumerate(outcomes):
            if outcome is not None and outcome[0] is not None:
                failed = sum(1 for o in outcomes if o is not None and o[0] is not None)
                saga_id = messages[index][0]
                also = f" ({failed} of {len(messages)} refused)" if len(messages) > 1 else ""
                raise translate(outcome[0], f"sending the {what} for saga {saga_id} to {inbox}{also}")
        missing = [messages[i][0] for i, o in enumerate(outcomes) if o is None]
        if missing:
            if len(messages) == 1:
                head = f"the {what} for saga {missing[0]} was not acknowledged"
            else:
                head = f"{len(missing)} of {len(messages)} {what}s (the first for saga {missing[0]}) were not acknowledged"
            raise BrokerUnavailable(
                f"{head} by {self.bootstrap} within {self.timeout_s:g}s; check the broker and try again (it may "
                f"still arrive: check with 'saga status {missing[0]}')"
            )
        return [int(o[1].partition() or 0) for o in outcomes if o is not None]

    # -- cancelling ----------------------------------------------------------------------

    def cancel(self, saga_id: str, reason: str = "cancelled by operator") -> None:
        """Ask the owning manager to abort a running saga (it compensates what it did).

        Refused with :class:`ConfigError` for a saga that has finished or is already being
        compensated, :class:`SagaNotFound` for an unknown one.
        """
        from sagalog.codec import Codec
        from sagalog.records import CancelSaga, SagaStatus

        state = self.status(saga_id)
        if state.status.terminal:
            raise ConfigError(f"saga {saga_id!r} has already finished ({state.status.value}); nothing to cancel")
        if state.status is SagaStatus.COMPENSATING:
            raise ConfigError(f"saga {saga_id!r} is already being compensated ({state.reason}); nothing to cancel")
        request = CancelSaga(saga_id=saga_id, reason=reason, requested_ms=int(time.time() * 1000))
        self._produce([(saga_id, Codec().encode(request))], "cancel request")

    # -- incidents -----------------------------------------------------------------------

    def retry(
        self,
        saga_id: str,
        *,
        step: str | None = None,
        operator: str | None = None,
        reason: str = "retried by operator",
    ) -> OperatorAction:
        """Ask the owning manager to try a compensation in incident again now, with a new retry
        budget (``saga retry``). ``step``: which incident, needed only when the saga has several.
        ``operator`` (default: the OS user) and ``reason`` are recorded on the log.

        Refused with :class:`ConfigError` saying why when the manager would refuse it: the saga
        has finished, or has no open incident (for that step); :class:`SagaNotFound` for an
        unknown saga. Returns the request sent.
        """
        from sagalog.records import IncidentAction

        return self._answer_incident(saga_id, IncidentAction.RETRY, step, operator, reason)

    def resolve(self, saga_id: str, step: str, *, reason: str, operator: str | None = None) -> OperatorAction:
        """Tell the owning manager that ``step``'s effect was undone by hand (``saga resolve
        --as-compensated``): the step becomes COMPENSATED, its incident closes and the saga goes
        on, typically to ABORTED. ``operator`` (default: the OS user) and ``reason`` (required:
        how it was undone) are recorded on the log.

        Refused with :class:`ConfigError` saying why when the manager would refuse it: the saga
        has finished, the step is not being compensated or has no open incident;
        :class:`SagaNotFound` for an unknown saga. Returns the request sent.
        """
        from sagalog.records import IncidentAction

        return self._answer_incident(saga_id, IncidentAction.RESOLVE_COMPENSATED, step, operator, reason)

    def _answer_incident(
        self, saga_id: str, action: IncidentAction, step: str | None, operator: str | None, reason: str
    ) -> OperatorAction:
        from sagalog.codec import Codec
        from sagalog.fold import operator_action_refusal
        from sagalog.records import OperatorAction

        verb = "retry" if action == "RETRY" else "resolve"
        if not reason.strip():
            raise ConfigError(f"a {verb} needs a reason: it is recorded on the log with who asked")
        who = default_operator() if operator is None else operator
        if not who.strip():
            raise ConfigError(f"a {verb} needs an operator name: it is recorded on the log")
        state = self.status(saga_id)
        if state.status.terminal:
            raise ConfigError(f"saga {saga_id!r} has already finished ({state.status.value}); nothing to {verb}")
        if step is None:
            if not state.incidents:
                raise ConfigError(f"saga {saga_id!r} has no open incident; nothing to {verb}")
            if len(state.incidents) > 1:
                steps = ", ".join(i.step for i in state.incidents)
                raise ConfigError(f"saga {saga_id!r} has open incidents on steps {steps}: name the step to {verb}")
            step = state.incidents[0].step
        refusal = operator_action_refusal(state, action, step)
        if refusal is not None:
            raise ConfigError(refusal)
        request = OperatorAction(
            saga_id=saga_id, action=action, step=step, operator=who, reason=reason, requested_ms=int(time.time() * 1000)
        )
        self._produce([(saga_id, Codec().encode(request))], f"{verb} request")
        return request

    # -- queries -------------------------------------------------------------------------

    def status(self, saga_id: str) -> SagaState:
        """The saga as the log says it is now (raises :class:`SagaNotFound` for an unknown id)."""
        return self._model().get(saga_id)

    def view(self, saga_id: str) -> SagaView:
        """The state plus where it lives (partition, owner) and its record history."""
        return self._model().view(saga_id)

    def history(self, saga_id: str) -> list[HistoryEntry]:
        """Every record of the saga still on the log, oldest first (with why any was rejected)."""
        return self._model().history(saga_id)

    def list(
        self,
        status: SagaStatus | str | None = None,
        saga_type: str | None = None,
        limit: int | None = 50,
        *,
        with_incident: bool = False,
    ) -> list[SagaSummary]:
        """Sagas, newest first, optionally of one status and/or type, or only those with an open
        incident (``with_incident``); ``limit`` 0 or None: all."""
        return self._model().list_sagas(
            status=_status(status), saga_type=saga_type, limit=limit or None, with_incident=with_incident
        )

    def count(
        self, status: SagaStatus | str | None = None, saga_type: str | None = None, *, with_incident: bool = False
    ) -> int:
        """How many sagas match (as of the last query's catch-up)."""
        return self._model().count(status=_status(status), saga_type=saga_type, with_incident=with_incident)

    def counts(self) -> dict[SagaStatus, int]:
        """Sagas per status (as of the last query's catch-up), every status present."""
        return self._model().counts_by_status()

    def wait(self, saga_id: str, timeout_s: float = 60.0) -> SagaResult:
        """Block until the saga has ended (COMPLETED or ABORTED) and return how it ended; raise
        :class:`SagaTimeout` if it has not within ``timeout_s`` (or has not even begun)."""
        return self._wait(saga_id, timeout_s, timeout_s)

    result = wait

    def wait_all(self, saga_ids: Iterable[str], timeout_s: float = 60.0) -> Iterator[SagaResult | SagaTimeout]:
        """Wait for several sagas within one overall ``timeout_s``: yields, in order, each one's
        :class:`SagaResult`, or the :class:`SagaTimeout` :meth:`wait` would raise (nothing is raised)."""
        deadline = time.monotonic() + timeout_s
        for saga_id in saga_ids:
            try:
                yield self._wait(saga_id, max(0.0, deadline - time.monotonic()), timeout_s)
            except SagaTimeout as err:
                yield err

    def _wait(self, saga_id: str, budget_s: float, timeout_s: float) -> SagaResult:
        state = self._model().wait_terminal(saga_id, budget_s)
        if state is not None and state.status.terminal:
            return SagaResult.of(state)
        if state is None:
            message = (
                f"saga {saga_id} has not begun after {timeout_s:g} s: is a manager running ('saga manager')? "
                f"Refused start requests go to {self.topics.dead_letters}"
            )
        elif state.incidents:  # it will not end by waiting: say so
            steps = ", ".join(i.step for i in state.incidents)
            message = (
                f"saga {saga_id} is still {state.status.value} after {timeout_s:g} s and waits for an operator: "
                f"incident on {steps}; see 'saga status {saga_id}'"
            )
        else:
            at = ", ".join(s.name for s in state.steps if s.status in ("RUNNING", "COMPENSATING")) or "-"
            message = (
                f"saga {saga_id} is still {state.status.value} (at {at}) after {timeout_s:g} s; "
                f"check it later with 'saga status {saga_id}'"
            )
        raise SagaTimeout(message, saga_id=saga_id, timeout_s=timeout_s, state=state)


def _trace_headers() -> Headers | None:
    """The caller's current span as a ``traceparent`` header, if it has one. A process that never
    imported OpenTelemetry has no current span: then nothing is imported to find out."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    from sagalog.tracing import current_headers

    return current_headers()


def default_operator() -> str:
    """Who acts on an incident when nobody says: the OS user (``getpass.getuser()``), or ``uid N``
    in a process without a user name (a container run with a bare uid)."""
    import getpass
    import os

    try:
        return getpass.getuser()
    except (OSError, KeyError):  # OSError from Python 3.13; KeyError (pwd) before
        return f"uid {os.getuid()}"


def _status(status: SagaStatus | str | None) -> SagaStatus | None:
    from sagalog.records import SagaStatus

    if status is None or isinstance(status, SagaStatus):
        return status
    try:
        return SagaStatus(status.upper())
    except ValueError as err:
        raise ConfigError(
            f"unknown saga status {status!r}; use one of {', '.join(s.value for s in SagaStatus)}"
        ) from err


def _flushed(producer: Any, timeout_s: float, doing: str) -> BrokerError | None:
    """Flush ``producer``; a Kafka error it raises, in our words (None if none). A fatal producer
    error (no ACL to write anything: no idempotent producer id) can surface here rather than in
    the produce call, depending on timing, and confluent-kafka may raise it as a SystemError
    chained to the KafkaException."""
    from confluent_kafka import KafkaException

    from sagalog.kafka import translate

    try:
        producer.flush(timeout_s)
    except (KafkaException, SystemError) as err:
        cause = err if isinstance(err, KafkaException) else (err.__cause__ or err.__context__)
        if not isinstance(cause, KafkaException):
            raise
        return translate(cause, doing)
    return None
