"""The console's two threads and how fresh their answers are.

SQLite connections belong to the thread that opened them, and catching up talks to the broker,
which can be slow (an open transaction on Kafka holds ``read_committed`` readers back, a broker
may be down). So the console splits the work in two, each on a one-thread executor:

* the **query thread** owns a :class:`~sagalog.readmodel.ReadModel` that never catches up: every
  page is rendered from the SQLite file as it is (WAL: reads do not wait for the writer), so a
  page never waits on the broker for longer than ``wait_s``;
* the **broker thread** owns everything that talks to Kafka: a second ReadModel that catches up,
  the dead-letter reader, an admin client for offsets, and a :class:`~sagalog.client.SagaClient`
  for cancelling. Jobs on it are *rounds* (catch up the log, read the dead letters, fetch
  offsets) and cancels.

A page asks for a round of the kind it shows (:meth:`Backend.fresh`): a round that started
less than ``refresh_s`` ago (1 s) is fresh enough; otherwise one is started, unless one is
already running, and the page waits for it up to ``wait_s``. So however many browsers poll,
the broker sees at most one catch-up per second, and nothing at all while nobody looks. After
a failed or stale round the next waits ``retry_s`` (the page shows why). All of this state is
touched on the event loop's thread only; the executors run the jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sagacli.console.deadletters import DeadLetterReader, DeadLetters
from sagacli.console.queries import Offsets
from sagalog.config import Topics
from sagalog.errors import SagaError

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """Which deployment the console shows and how often it reads it."""

    bootstrap: str
    topics: Topics
    state_dir: Path | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    group_id: str = "saga-managers"  # the managers' consumer group: its inbox offsets give the backlog
    timeout_s: float = 3.0  # broker requests; a partition without progress this long is reported stale
    refresh_s: float = 1.0  # at most one round of each kind per this
    retry_s: float = 5.0  # after a failed or stale round
    wait_s: float = 2.5  # how long a page waits for a round before answering from what it has
    poll_s: float = 2.0  # how often pages poll (htmx)


@dataclass
class Round:
    """One kind of broker job and its last outcome."""

    name: str
    job: Callable[[], Any]
    future: asyncio.Future[Any] | None = None
    started: float | None = None  # monotonic
    running_since_ms: int | None = None
    ok: bool = True
    stale: bool = False
    error: str | None = None
    result: Any = None
    finished_ms: int | None = None  # wall clock of the last finished round
    ok_ms: int | None = None  # wall clock of the last round that succeeded


@dataclass(frozen=True)
class Health:
    """What the banner says: broker errors, stale partitions, a long first catch-up."""

    error: str | None
    staleness: str | None
    catching_up_s: float | None
    caught_up_ms: int | None
    stale: dict[int, int]


class _BrokerSide:
    """Everything that talks to Kafka; lives on the broker thread only."""

    def __init__(self, settings: Settings) -> None:
        from sagalog.client import SagaClient
        from sagalog.readmodel import ReadModel

        self.settings = settings
        self.model = ReadModel(
            settings.bootstrap,
            settings.topics,
            state_dir=settings.state_dir,
            overrides=settings.overrides,
            timeout_s=settings.timeout_s,
        )
        self.client = SagaClient(
            settings.bootstrap,
            topic_prefix=settings.topics.prefix,
            overrides=settings.overrides,
            state_dir=settings.state_dir,
            timeout_s=max(5.0, settings.timeout_s),
        )
        self.letters = DeadLetterReader(
            settings.bootstrap, settings.topics, overrides=settings.overrides, timeout_s=settings.timeout_s
        )
        self._admin: Any = None

    def close(self) -> None:
        for closing in (self.letters.close, self.client.close, self.model.close):
            with contextlib.suppress(Exception):
                closing()

    def catch_up(self) -> Any:
        return self.model.catch_up()

    def offsets(self) -> Offsets:
        """Log and inbox ends (read_committed) and the managers' committed inbox offsets."""
        from confluent_kafka import (
            ConsumerGroupTopicPartitions,
            IsolationLevel,
            KafkaException,
            TopicPartition,
        )
        from confluent_kafka.admin import OffsetSpec

        from sagalog.kafka import admin_client

        if self._admin is None:
            self._admin = admin_client(self.settings.bootstrap, self.settings.overrides)
        topics, timeout = self.settings.topics, self.settings.timeout_s
        count = self.model.partition_count()
        wanted = {TopicPartition(t, p): OffsetSpec.latest() for t in (topics.log, topics.inbox) for p in range(count)}
        log_end: dict[int, int] = {}
        inbox_end: dict[int, int] = {}
        committed: dict[int, int] = {}
        errors: list[str] = []
        try:
            for tp, future in self._admin.list_offsets(
                wanted, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=timeout
            ).items():
                with contextlib.suppress(KafkaException):
                    (log_end if tp.topic == topics.log else inbox_end)[tp.partition] = int(future.result().offset)
        except KafkaException as err:
            errors.append(f"log ends: {err}")
        try:
            request = ConsumerGroupTopicPartitions(
                self.settings.group_id, [TopicPartition(topics.inbox, p) for p in range(count)]
            )
            futures = self._admin.list_consumer_group_offsets([request], request_timeout=timeout)
            for tp in futures[self.settings.group_id].result().topic_partitions:
                if tp.error is None and tp.offset >= 0:
                    committed[tp.partition] = int(tp.offset)
        except KafkaException as err:
            errors.append(f"group {self.settings.group_id} offsets: {err}")
        return Offsets(
            log_end=log_end,
            inbox_end=inbox_end,
            inbox_committed=committed,
            group_id=self.settings.group_id,
            error="; ".join(errors) or None,
            read_ms=int(time.time() * 1000),
        )

    def dead_letters(self) -> DeadLetters:
        return self.letters.refresh()

    def cancel(self, saga_id: str, reason: str) -> None:
        self.client.cancel(saga_id, reason=reason)

    def retry(self, saga_id: str, step: str | None, operator: str | None, reason: str) -> None:
        self.client.retry(saga_id, step=step, operator=operator, reason=reason)

    def resolve(self, saga_id: str, step: str, operator: str | None, reason: str) -> None:
        self.client.resolve(saga_id, step, reason=reason, operator=operator)


class Backend:
    """The console's access to the read model and the broker (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._broker_pool = ThreadPoolExecutor(1, thread_name_prefix="saga-console-broker")
        self._query_pool = ThreadPoolExecutor(1, thread_name_prefix="saga-console-query")
        self._local = threading.local()
        self._broker_side: _BrokerSide | None = None
        self._query_models: list[Any] = []
        self.rounds = {
            "log": Round("log", lambda: self._on_broker().catch_up()),
            "dead-letters": Round("dead-letters", lambda: self._on_broker().dead_letters()),
            "offsets": Round("offsets", lambda: self._on_broker().offsets()),
        }
        self._closed = False

    # -- threads -------------------------------------------------------------------------

    def _on_broker(self) -> _BrokerSide:
        """The broker thread's Kafka clients (created there, used there only)."""
        if self._broker_side is None:
            self._broker_side = _BrokerSide(self.settings)
        return self._broker_side

    def _query_model(self) -> Any:
        model = getattr(self._local, "model", None)
        if model is None:
            from sagalog.readmodel import ReadModel

            model = ReadModel(
                self.settings.bootstrap,
                self.settings.topics,
                state_dir=self.settings.state_dir,
                overrides=self.settings.overrides,
                timeout_s=self.settings.timeout_s,
            )
            self._local.model = model
            self._query_models.append(model)
        return model

    async def query(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(read_model, *args)`` on the query thread (the model never catches up)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._query_pool, lambda: fn(self._query_model(), *args, **kwargs)
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()

        def close_broker() -> None:
            if self._broker_side is not None:
                self._broker_side.close()

        def close_queries() -> None:
            for model in self._query_models:
                with contextlib.suppress(Exception):
                    model.close()

        await asyncio.gather(
            loop.run_in_executor(self._broker_pool, close_broker),
            loop.run_in_executor(self._query_pool, close_queries),
        )
        self._broker_pool.shutdown(wait=False)
        self._query_pool.shutdown(wait=False)

    # -- freshness -----------------------------------------------------------------------

    async def fresh(self, name: str, wait_s: float | None = None) -> Round:
        """Make sure a round of this kind started less than ``refresh_s`` ago (``retry_s`` after a
        failure), starting one if needed, and wait for the running one up to ``wait_s``."""
        r = self.rounds[name]
        now = time.monotonic()
        interval = self.settings.refresh_s if r.ok and not r.stale else self.settings.retry_s
        if r.future is None and (r.started is None or now - r.started >= interval):
            r.started, r.running_since_ms = now, int(time.time() * 1000)
            r.future = asyncio.get_running_loop().run_in_executor(self._broker_pool, r.job)
            r.future.add_done_callback(partial(self._finished, r))
        if r.future is not None:
            await asyncio.wait({r.future}, timeout=self.settings.wait_s if wait_s is None else wait_s)
            if r.future is not None and r.future.done():
                self._finished(r, r.future)
        return r

    def _finished(self, r: Round, future: asyncio.Future[Any]) -> None:
        if r.future is not future:
            return  # already recorded
        r.future, r.running_since_ms, r.finished_ms = None, None, int(time.time() * 1000)
        err = future.exception()
        if err is None:
            r.ok, r.error, r.result, r.ok_ms = True, None, future.result(), r.finished_ms
            r.stale = bool(getattr(r.result, "stale", None))
        else:
            r.ok, r.error = False, _message(err)

    def expire(self, name: str) -> None:
        """The next page asking for this kind starts a round at once (after a cancel, say)."""
        self.rounds[name].started = None

    def health(self) -> Health:
        log = self.rounds["log"]
        stats = log.result
        catching_up = None
        if log.future is not None and log.running_since_ms is not None:
            catching_up = max(0.0, time.time() - log.running_since_ms / 1000)
        return Health(
            error=None if log.ok else log.error,
            staleness=stats.staleness() if stats is not None and log.ok else None,
            catching_up_s=catching_up,
            caught_up_ms=log.ok_ms,
            stale=dict(stats.stale) if stats is not None else {},
        )

    # -- actions -------------------------------------------------------------------------

    async def act(self, action: str, saga_id: str, **kwargs: Any) -> None:
        """An operator's action on the broker thread, through ``SagaClient``: ``cancel`` (the rules
        of ``saga cancel``), ``retry`` or ``resolve`` (those of ``saga retry`` / ``saga resolve``)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self._broker_pool, lambda: getattr(self._on_broker(), action)(saga_id, **kwargs)
            )
        finally:
            self.expire("log")


def _message(err: BaseException) -> str:
    if isinstance(err, SagaError):
        return str(err)
    return f"{type(err).__name__}: {err}"
