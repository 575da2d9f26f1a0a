"""The manager process: a thin loop around :mod:`manager.decide`.

One consumer group on the inbox. Owning inbox partition p means owning log partition p:

1. **Take over** (on assignment): create the partition's transactional producer
   (``transactional.id = <group>.<log topic>.<p>``; ``init_transactions`` fences any previous
   owner, zombie or not), replay log partition p to its end, claim it with epoch = highest epoch
   seen + 1, re-send every outstanding command and re-arm every deadline.
2. **Work**: each poll's messages are grouped by partition; decisions are made in memory; then per
   partition, ONE transaction carries the log records, the commands, any dead letters and the
   inbox offsets. Write-ahead holds because consumers read ``read_committed``: a command is only
   ever seen together with the log records that decided it.
3. **Give up** (on revocation/loss, or when fenced): drop the partition's state and producer.

If a transaction fails for any other reason the partition is taken over again from the log, so
memory never drifts from what the log says.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

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
from sagalog.codec import Codec
from sagalog.config import Topics
from sagalog.definition import DefinitionSet
from sagalog.errors import BrokerError, ConfigError, DecodeError, Fenced, FoldError
from sagalog.fold import PartitionFold, SagaState, fold_newest
from sagalog.kafka import consumer_config, producer_config, reader_config, translate
from sagalog.records import (
    CancelSaga,
    DeadLetter,
    ParticipantCommand,
    ParticipantReply,
    PartitionClaim,
    StartSaga,
)

log = logging.getLogger("saga.manager")


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
    #: After a takeover, no deadline fires until the inbox has been read up to where it ended at
    #: takeover (replies that arrived while the partition had no owner count), or this long.
    takeover_catch_up_max_ms: int = 15000
    max_poll_wait_s: float = 0.05


@dataclass
class Outbox:
    """What one partition's next transaction will carry."""

    log: list[tuple[bytes, bytes | None]] = field(default_factory=list)  # (key, value|None=tombstone)
    commands: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # (topic, key, value)
    dead: list[bytes] = field(default_factory=list)
    next_inbox_offset: int | None = None

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
    sent: dict[str, set[tuple[str, int]]] = field(default_factory=dict)  # saga id -> {(command id, attempt)}
    outbox: Outbox = field(default_factory=Outbox)
    #: Timers wait until the inbox partition has been read to its end once (a partition-EOF event)
    #: after takeover, or until ``catch_up_by``.
    caught_up: bool = False
    catch_up_by: int = 0
    next_sweep_ms: int = 0


class Manager:
    """One manager replica. ``run()`` until ``stop()``; all Kafka I/O happens on the calling thread."""

    def __init__(self, settings: ManagerSettings, codec: Codec | None = None) -> None:
        self.settings = settings
        self.codec = codec or Codec()
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
                    **overrides,
                },
            )
        )
        self._retry_takeover: dict[int, tuple[float, int]] = {}  # partition -> (due, attempt)
        self._writers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="saga-commit")
        self.reader = Consumer(reader_config(settings.bootstrap, overrides={"group.id": f"saga-replay-{settings.instance_id}", **overrides}))

    # --- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        self.running = True
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
        for p in list(self.owned):
            self._release(p)
        try:
            self.consumer.close()  # leaves the group: the others take over without waiting for the session timeout
        except KafkaException as err:
            log.warning("closing consumer: %s", translate(err, "close"))
        self.reader.close()
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
                if err.code() == KafkaError._PARTITION_EOF:
                    caught_up = self.owned.get(msg.partition())
                    if caught_up is not None:
                        caught_up.caught_up = True
                    continue
                mapped = translate(err, "consuming the inbox")
                if err.fatal():
                    raise mapped
                log.warning("%s", mapped)
                continue
            owned = self.owned.get(msg.partition())
            if owned is not None:
                self._handle_inbox(owned, msg, now)
        for owned in list(self.owned.values()):
            self._fire_timers(owned, now)
            if now >= owned.next_sweep_ms:
                self._tombstone_finished(owned, now)
        self._commit_all()
        self._retry_takeovers()

    def _poll_wait(self) -> float:
        wake = min((o.timers[0][0] for o in self.owned.values() if o.timers), default=None)
        if wake is None:
            return self.settings.max_poll_wait_s
        return max(0.0, min(self.settings.max_poll_wait_s, (wake - now_ms()) / 1000))

    # --- ownership ------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._try_take_over(tp.partition, attempt=1)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._retry_takeover.pop(tp.partition, None)
            self._release(tp.partition)

    def _try_take_over(self, p: int, attempt: int) -> None:
        """Take a partition over; if that fails, retry with backoff while the group still gives it
        to us. Until then its inbox messages are not read past (their offsets stay uncommitted)."""
        try:
            self._take_over(p)
            self._retry_takeover.pop(p, None)
        except BrokerError as err:
            delay = min(30.0, 0.5 * 2 ** (attempt - 1))
            log.error("taking over partition %d failed (attempt %d): %s; retrying in %.1f s", p, attempt, err, delay)
            self._retry_takeover[p] = (time.monotonic() + delay, attempt + 1)

    def _retry_takeovers(self) -> None:
        if not self._retry_takeover:
            return
        assigned = {tp.partition for tp in self.consumer.assignment()}
        for p, (due, attempt) in list(self._retry_takeover.items()):
            if p not in assigned:
                del self._retry_takeover[p]
            elif time.monotonic() >= due:
                try:
                    self._rewind_inbox(p)
                except BrokerError as err:
                    log.error("partition %d: %s; retrying", p, err)
                    self._retry_takeover[p] = (time.monotonic() + 1.0, attempt + 1)
                    continue
                self._try_take_over(p, attempt)

    def _take_over(self, p: int) -> None:
        started = time.monotonic()
        self._release(p)
        producer = Producer(
            producer_config(
                self.settings.bootstrap,
                transactional_id=f"{self.settings.group_id}.{self.topics.log}.{p}",
                overrides=self.settings.client_overrides,
            )
        )
        try:
            producer.init_transactions(30)  # fences the previous owner of this partition, zombie or not
            fold = self._replay(p)
        except KafkaException as err:
            raise translate(err, f"claiming partition {p}") from err
        now = now_ms()
        # Above every epoch seen on the partition: its claims, and (should a claim be missing) its records.
        epoch = max([fold.epoch, *(state.epoch for state in fold.sagas.values())]) + 1
        owned = Owned(partition=p, epoch=epoch, producer=producer)
        owned.outbox.log.append(
            (PartitionClaim.key(p), self.codec.encode(PartitionClaim(partition=p, epoch=owned.epoch, owner=self.settings.instance_id, timestamp_ms=now)))
        )
        for saga_id, state in sorted(fold.sagas.items(), key=lambda item: item[1].updated_ms):
            if state.status.terminal:
                owned.finished[saga_id] = state.updated_ms
            else:
                owned.live[saga_id] = state
                self._after_decision(owned, state, [], now)  # re-sends outstanding commands, arms timers
        owned.catch_up_by = now + self.settings.takeover_catch_up_max_ms
        self.owned[p] = owned
        self._commit(p, owned)
        self.stats["takeovers"] += 1
        log.info(
            "took over partition %d at epoch %d: %d sagas rebuilt, %d live resumed, %d records rejected, in %.0f ms",
            p, owned.epoch, len(fold.sagas), len(owned.live), fold.rejected_count, 1000 * (time.monotonic() - started),
        )

    def _replay(self, p: int) -> PartitionFold:
        """Read log partition p from the beginning to its end and rebuild its sagas.

        The end is the partition-EOF event, never the high watermark: some brokers (Tansu)
        under-report the watermark after multi-record batches, and stopping there would lose sagas.
        Only each saga's newest acceptable record is decoded (:func:`sagalog.fold.fold_newest`).
        """
        messages: list[tuple[bytes | None, bytes | None, int]] = []
        self.reader.assign([TopicPartition(self.topics.log, p, OFFSET_BEGINNING)])
        try:
            deadline = time.monotonic() + 300
            done = False
            while not done:
                if time.monotonic() > deadline:
                    raise BrokerError(f"replaying log partition {p} did not reach its end in 300 s", retryable=True)
                for msg in self.reader.consume(5000, 0.05):
                    err = msg.error()
                    if err is None:
                        messages.append((msg.key(), msg.value(), msg.offset()))
                    elif err.code() == KafkaError._PARTITION_EOF:
                        done = True
                    else:
                        raise translate(err, f"replaying log partition {p}")
        finally:
            self.reader.unassign()
        fold = fold_newest(messages, self.codec.decode, p)
        for offset, reason in fold.rejected[:20]:
            log.warning("log partition %d offset %d rejected on replay: %s", p, offset, reason)
        return fold

    def _release(self, p: int) -> None:
        owned = self.owned.pop(p, None)
        if owned is None:
            return
        try:
            owned.producer.abort_transaction(1)
        except KafkaException:
            pass  # no transaction open, or fenced: either way nothing of ours is pending
        log.info("released partition %d (%d live sagas handed over)", p, len(owned.live))

    # --- inputs ---------------------------------------------------------------------------

    def _ctx(self, owned: Owned, now: int) -> decide.Context:
        return decide.Context(now_ms=now, epoch=owned.epoch, reply_topic=self.topics.inbox, reply_partition=owned.partition, writer=self.settings.instance_id)

    def _handle_inbox(self, owned: Owned, msg: Message, now: int) -> None:
        owned.outbox.next_inbox_offset = msg.offset() + 1
        try:
            item = self.codec.decode(msg.value())
        except DecodeError as err:
            self._dead_letter(owned, msg, err.at(msg.topic(), msg.partition(), msg.offset()), now)
            return
        key = (msg.key() or b"").decode("utf-8", "replace")
        saga_id = getattr(item, "saga_id", None)
        if saga_id != key:
            self._dead_letter(owned, msg, f"message key {key!r} is not its saga id {saga_id!r}: key inbox messages by saga id", now)
            return
        ctx = self._ctx(owned, now)
        state = owned.live.get(key)
        try:
            if isinstance(item, StartSaga):
                definition = self.settings.definitions.get(item.saga_type)
                if definition is None:
                    known = ", ".join(self.settings.definitions.names())
                    self._dead_letter(owned, msg, f"unknown saga type {item.saga_type!r} (known: {known})", now)
                    return
                try:
                    definition.validate_payload(json.loads(item.payload))
                except ValueError as bad:
                    self._dead_letter(owned, msg, f"payload is not JSON: {bad}", now)
                    return
                except ConfigError as bad:
                    self._dead_letter(owned, msg, str(bad), now)
                    return
                decision = decide.on_start(state, key in owned.finished, item, definition, ctx)
            elif state is None:
                if key in owned.finished:
                    self.stats["ignored"] += 1
                    return  # a late reply or cancel for a saga that has ended: nothing to do
                self._dead_letter(owned, msg, f"{type(item).__name__} for unknown saga {key!r}", now)
                return
            elif isinstance(item, ParticipantReply):
                decision = decide.on_reply(state, item, ctx)
            elif isinstance(item, CancelSaga):
                decision = decide.on_cancel(state, item.reason, ctx)
            else:
                self._dead_letter(owned, msg, f"{type(item).__name__} does not belong on the inbox", now)
                return
        except FoldError as err:  # a decision the state machine refuses: a bug, but never a crash
            self._dead_letter(owned, msg, f"refused by the state machine: {err}", now)
            return
        except Exception as err:  # noqa: BLE001 - one message must never stop the manager
            log.exception("unexpected error deciding on %s[%d]@%d", msg.topic(), msg.partition(), msg.offset())
            self._dead_letter(owned, msg, f"internal error while deciding: {type(err).__name__}: {err}", now)
            return
        if decision.ignored:
            self.stats["ignored"] += 1
            log.debug("%s", decision.ignored)
            if decision.reject:
                self._dead_letter(owned, msg, decision.ignored, now)
            return
        if isinstance(item, StartSaga):
            self.stats["started"] += 1
        self._apply(owned, decision, now)

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

    def _apply(self, owned: Owned, decision: decide.Decision, now: int) -> None:
        state = decision.state
        assert state is not None
        out = owned.outbox
        key = state.saga_id.encode()
        for record in decision.records:
            out.log.append((key, self.codec.encode(record)))
        self._after_decision(owned, state, decision.commands, now)

    def _after_decision(self, owned: Owned, state: SagaState, commands: list[tuple[str, ParticipantCommand]], now: int) -> None:
        """Keep memory in line with the new state: send what is due, arm the next timer."""
        saga_id = state.saga_id
        if state.status.terminal:
            owned.live.pop(saga_id, None)
            owned.sent.pop(saga_id, None)
            owned.finished[saga_id] = state.updated_ms
            self.stats["completed" if state.status.value == "COMPLETED" else "aborted"] += 1
            return
        owned.live[saga_id] = state
        sent = owned.sent.setdefault(saga_id, set())
        key = saga_id.encode()
        # The decision's own commands, then anything the log says is due but not sent by us yet
        # (after a takeover: everything in flight; after a backoff: the delayed retry).
        for participant, command in chain(commands, decide.outstanding_commands(state, self._ctx(owned, now))):
            marker = (command.command_id, command.attempt)
            if marker in sent:
                continue
            sent.add(marker)
            owned.outbox.commands.append((self.topics.commands(participant), key, self.codec.encode(command)))
        wake = decide.next_wakeup_ms(state, now)
        if wake is not None:
            heapq.heappush(owned.timers, (max(wake, now + 1), saga_id))

    def _dead_letter(self, owned: Owned, msg: Message, reason: DecodeError | str, now: int) -> None:
        self.stats["dead_lettered"] += 1
        log.warning("dead-lettering %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), reason)
        letter = DeadLetter(
            source_topic=msg.topic(),
            source_partition=msg.partition(),
            source_offset=msg.offset(),
            key=msg.key(),
            value=msg.value(),
            reason=str(reason),
            error_type=type(reason).__name__ if not isinstance(reason, str) else "Rejected",
            component=f"manager:{self.settings.instance_id}",
            dead_lettered_ms=now,
        )
        try:
            owned.outbox.dead.append(self.codec.encode(letter))
        except DecodeError:  # the original is too large to keep whole: keep the reason and position
            owned.outbox.dead.append(self.codec.encode(letter.model_copy(update={"value": None})))

    # --- the one write path -----------------------------------------------------------------

    def _commit_all(self) -> None:
        """Write every partition's outbox. Each partition has its own producer, and a commit is
        mostly waiting on the broker (librdkafka releases the GIL), so they run concurrently."""
        pending = [(p, owned) for p, owned in self.owned.items() if owned.outbox]
        if not pending:
            return
        metadata = self.consumer.consumer_group_metadata()
        if len(pending) == 1:
            errors = [self._write(pending[0][0], pending[0][1], metadata)]
        else:
            errors = list(self._writers.map(lambda item: self._write(item[0], item[1], metadata), pending))
        for (p, _), err in zip(pending, errors, strict=True):
            if err is not None:
                self._write_failed(p, err)

    def _commit(self, p: int, owned: Owned) -> None:
        """Write one partition's outbox now (takeover)."""
        err = self._write(p, owned, self.consumer.consumer_group_metadata())
        if err is not None:
            self._write_failed(p, err)

    def _write(self, p: int, owned: Owned, group_metadata: object) -> BrokerError | None:
        """One transaction: log records, commands, dead letters and the inbox offset consumed up to.
        Runs on a worker thread: touches nothing but the partition's own producer and outbox."""
        out, owned.outbox = owned.outbox, Outbox()
        producer = owned.producer
        try:
            producer.begin_transaction()
            for key, value in out.log:
                producer.produce(self.topics.log, value=value, key=key, partition=p)
            for topic, key, value in out.commands:
                producer.produce(topic, value=value, key=key)
            for value in out.dead:
                producer.produce(self.topics.dead_letters, value=value)
            if out.next_inbox_offset is not None:
                producer.send_offsets_to_transaction(
                    [TopicPartition(self.topics.inbox, p, out.next_inbox_offset)], group_metadata, 10
                )
            producer.commit_transaction(30)
        except KafkaException as err:
            return translate(err, f"writing partition {p}")
        except BufferError as err:
            return BrokerError(f"writing partition {p}: {err}", retryable=True)
        return None

    def _write_failed(self, p: int, err: BrokerError) -> None:
        if isinstance(err, Fenced):
            log.warning("partition %d: %s", p, err)
            self._release(p)
            return
        log.error("partition %d: transaction failed (%s); taking it over again from the log", p, err)
        self._recover(p)

    def _recover(self, p: int) -> None:
        """After a failed transaction: rebuild from the log and re-read the inbox from the committed offset."""
        self._release(p)
        # Re-taking a partition fences its other claimant: only do it while the group still
        # gives it to us, or a zombie with an unrecognised error would fence the rightful owner.
        if any(tp.partition == p for tp in self.consumer.assignment()):
            self._retry_takeover[p] = (0.0, 1)  # now, through _retry_takeovers (which rewinds first)

    def _rewind_inbox(self, p: int) -> None:
        """Seek the inbox partition back to its committed offset: messages read since then were
        either decided in a transaction that failed, or skipped while the partition was unowned."""
        try:
            committed = self.consumer.committed([TopicPartition(self.topics.inbox, p)], timeout=10)[0]
            self.consumer.seek(committed if committed.offset >= 0 else TopicPartition(self.topics.inbox, p, OFFSET_BEGINNING))
        except KafkaException as err:
            raise translate(err, f"rewinding inbox partition {p}") from err
