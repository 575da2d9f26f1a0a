"""Where a participant keeps what it did: journal, epochs, outbox and consumed offsets.

Everything a participant must not forget lives in one local database, written in one local
transaction per poll batch, together with the business data of its handlers. That single
commit is what makes a participant exactly-once in effect on an at-least-once transport:

* **journal**: ``(saga_id, step, action) -> final reply``. A repeated command returns the
  recorded reply without running the handler again. Only final outcomes are recorded
  (SUCCESS, and BUSINESS_FAILURE of an execute); a RETRYABLE_ERROR is not, so a later
  attempt runs the handler again.
* **epochs**: the highest manager epoch seen per saga; lower ones are stale (zombie managers).
* **outbox**: replies and dead letters waiting to be published. The relay deletes a row once
  the broker has acknowledged it; rows left by a crash are published at the next start.
* **offsets**: the next command offset to read per partition, so that after a crash the
  participant resumes exactly after the last command whose effects were committed (Kafka's
  own committed offsets lag behind and are only for monitoring).

:class:`ParticipantStore` is the pluggable interface; :class:`SqliteStore` the default
(stdlib ``sqlite3``, WAL). A store for another database implements the same two classes;
the ``handle`` it gives to handlers is whatever its business code writes through.
"""

from __future__ import annotations

import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sagalog.errors import ConfigError
from sagalog.records import Action, ReplyOutcome

#: ``PRAGMA synchronous`` values: NORMAL survives a process crash (kill -9), FULL also power loss.
Synchronous = Literal["OFF", "NORMAL", "FULL"]


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """The final reply recorded for one (saga, step, action)."""

    saga_id: str
    step: str
    action: Action
    command_id: str
    outcome: ReplyOutcome
    output: str | None = None
    error: str | None = None
    recorded_ms: int = 0
    #: The epoch of the command that took effect (None in journals written before it was kept):
    #: lets an auditor check that no command of a fenced manager took effect after a newer one's.
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A message committed locally and not yet acknowledged by the broker.

    ``partition`` None lets the producer's partitioner choose (dead letters); replies always
    name the partition the manager asked for.
    """

    id: int
    topic: str
    partition: int | None
    key: bytes | None
    value: bytes


class StoreTransaction(ABC):
    """One open local transaction: the SDK's bookkeeping and the handlers' business writes."""

    @property
    @abstractmethod
    def handle(self) -> Any:
        """What handlers receive as ``tx`` (a ``sqlite3.Connection`` for :class:`SqliteStore`)."""

    @abstractmethod
    def savepoint(self) -> AbstractContextManager[None]:
        """Undo everything done inside the block if it raises (one handler call), keep the rest."""

    @abstractmethod
    def journal(self, saga_id: str, step: str) -> dict[Action, JournalEntry]:
        """The recorded final replies of a step, by action (empty if none)."""

    @abstractmethod
    def record(self, entry: JournalEntry) -> None:
        """Record a final reply; recording one twice for the same key is a bug (raises)."""

    @abstractmethod
    def max_epoch(self, saga_id: str) -> int | None: ...

    @abstractmethod
    def raise_epoch(self, saga_id: str, epoch: int) -> None:
        """Remember ``epoch`` for the saga if it is higher than the one remembered."""

    @abstractmethod
    def enqueue(self, topic: str, partition: int | None, key: bytes | None, value: bytes) -> OutboxRow:
        """Add a message to the outbox; it leaves only if the transaction commits."""

    @abstractmethod
    def save_offset(self, topic: str, partition: int, next_offset: int) -> None:
        """The next offset to consume, committed atomically with the effects of the ones before it."""

    @abstractmethod
    def delete_outbox(self, ids: Iterable[int]) -> None:
        """Forget outbox rows the broker has acknowledged."""


class ParticipantStore(ABC):
    """A participant's durable state. Used from one thread at a time (the participant's loop)."""

    @abstractmethod
    def open(self) -> None:
        """Connect and create missing tables (idempotent)."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def transaction(self) -> AbstractContextManager[StoreTransaction]:
        """Begin; commit when the block ends normally, roll back if it raises."""

    @abstractmethod
    def offsets(self, topic: str) -> dict[int, int]:
        """Next offset to consume per partition of ``topic``, as last committed."""

    @abstractmethod
    def pending(self) -> list[OutboxRow]:
        """Every outbox row not yet acknowledged, oldest first (published at startup)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS saga_journal (
    saga_id     TEXT    NOT NULL,
    step        TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    command_id  TEXT    NOT NULL,
    outcome     TEXT    NOT NULL,
    output      TEXT,
    error       TEXT,
    recorded_ms INTEGER NOT NULL,
    epoch       INTEGER,
    PRIMARY KEY (saga_id, step, action)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS saga_epochs (
    saga_id   TEXT    PRIMARY KEY,
    max_epoch INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS saga_outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    topic      TEXT    NOT NULL,
    partition  INTEGER,
    key        BLOB,
    value      BLOB    NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS saga_consumer_offsets (
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
"""


class _SqliteTransaction(StoreTransaction):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @property
    def handle(self) -> sqlite3.Connection:
        return self._conn

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        # One fixed name: savepoints here never nest, and constant SQL stays in the statement cache.
        self._conn.execute("SAVEPOINT handler")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK TO handler")
            self._conn.execute("RELEASE handler")
            raise
        self._conn.execute("RELEASE handler")

    def journal(self, saga_id: str, step: str) -> dict[Action, JournalEntry]:
        rows = self._conn.execute(
            "SELECT action, command_id, outcome, output, error, recorded_ms, epoch FROM saga_journal "
            "WHERE saga_id = ? AND step = ?",
            (saga_id, step),
        ).fetchall()
        return {
            Action(action): JournalEntry(saga_id, step, Action(action), command_id, ReplyOutcome(outcome), output,
                                         error, recorded_ms, epoch)
            for action, command_id, outcome, output, error, recorded_ms, epoch in rows
        }

    def record(self, entry: JournalEntry) -> None:
        self._conn.execute(
            "INSERT INTO saga_journal (saga_id, step, action, command_id, outcome, output, error, recorded_ms, epoch) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (entry.saga_id, entry.step, entry.action.value, entry.command_id, entry.outcome.value, entry.output,
             entry.error, entry.recorded_ms or _now_ms(), entry.epoch),
        )

    def max_epoch(self, saga_id: str) -> int | None:
        row = self._conn.execute("SELECT max_epoch FROM saga_epochs WHERE saga_id = ?", (saga_id,)).fetchone()
        return None if row is None else int(row[0])

    def raise_epoch(self, saga_id: str, epoch: int) -> None:
        self._conn.execute(
            "INSERT INTO saga_epochs (saga_id, max_epoch) VALUES (?, ?) "
            "ON CONFLICT (saga_id) DO UPDATE SET max_epoch = excluded.max_epoch "
            "WHERE excluded.max_epoch > saga_epochs.max_epoch",
            (saga_id, epoch),
        )

    def enqueue(self, topic: str, partition: int | None, key: bytes | None, value: bytes) -> OutboxRow:
        cur = self._conn.execute(
            "INSERT INTO saga_outbox (topic, partition, key, value, created_ms) VALUES (?, ?, ?, ?, ?)",
            (topic, partition, key, value, _now_ms()),
        )
        assert cur.lastrowid is not None
        return OutboxRow(cur.lastrowid, topic, partition, key, value)

    def save_offset(self, topic: str, partition: int, next_offset: int) -> None:
        self._conn.execute(
            "INSERT INTO saga_consumer_offsets (topic, partition, next_offset) VALUES (?, ?, ?) "
            "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
            (topic, partition, next_offset),
        )

    def delete_outbox(self, ids: Iterable[int]) -> None:
        self._conn.executemany("DELETE FROM saga_outbox WHERE id = ?", ((i,) for i in ids))


class SqliteStore(ParticipantStore):
    """The default store: one SQLite file in WAL mode, shared by the SDK and the handlers.

    ``setup`` runs once at :meth:`open` inside a transaction, to create the business tables
    (``CREATE TABLE IF NOT EXISTS ...``). Several processes may share the file (WAL and a busy
    timeout make that safe), which is how instances of one participant share their journal
    and offsets when a rebalance moves partitions between them.

    ``synchronous="NORMAL"`` (the default) makes every commit survive a kill -9 of the process;
    use ``"FULL"`` if it must also survive losing power, ``"OFF"`` only for throwaway state.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        setup: Callable[[sqlite3.Connection], None] | None = None,
        synchronous: Synchronous = "NORMAL",
        busy_timeout_ms: int = 10_000,
    ) -> None:
        if synchronous not in ("OFF", "NORMAL", "FULL"):
            raise ConfigError(f"synchronous must be OFF, NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self._setup = setup
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None

    @property
    def connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"store {self.path} is not open")
        return self._conn

    def open(self) -> None:
        if self._conn is not None:
            return
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so sqlite3 never opens or
        # commits a transaction behind our back (a handler's write must not commit early).
        # check_same_thread=False: the store is opened by whoever builds the participant and
        # used by the thread that runs its loop; it is never used by two threads at once.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            # WAL: readers (reports, other instances) never block the writer, and commits are
            # an append to the WAL file instead of a rewrite of pages.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            conn.close()
            raise ConfigError(f"cannot open participant store {self.path}: {err}") from err
        try:
            for statement in _split_sql(_SCHEMA):
                conn.execute(statement)
            # Journals written before the command epoch was kept get the column (empty for old rows).
            if "epoch" not in {row[1] for row in conn.execute("PRAGMA table_info(saga_journal)")}:
                conn.execute("ALTER TABLE saga_journal ADD COLUMN epoch INTEGER")
            if self._setup is not None:
                self._setup(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise
        self._conn = conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextmanager
    def transaction(self) -> Iterator[StoreTransaction]:
        conn = self.connection
        # IMMEDIATE takes the write lock up front: a second process sharing the file waits
        # (busy_timeout) here instead of failing halfway through a batch.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield _SqliteTransaction(conn)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if not conn.in_transaction:
            raise RuntimeError(
                "the transaction was ended inside the batch (did a handler call commit() or rollback()?); "
                "handlers must leave transaction control to the SDK"
            )
        conn.execute("COMMIT")

    def offsets(self, topic: str) -> dict[int, int]:
        rows = self.connection.execute(
            "SELECT partition, next_offset FROM saga_consumer_offsets WHERE topic = ?", (topic,)
        ).fetchall()
        return {int(p): int(o) for p, o in rows}

    def pending(self) -> list[OutboxRow]:
        rows = self.connection.execute(
            "SELECT id, topic, partition, key, value FROM saga_outbox ORDER BY id"
        ).fetchall()
        return [OutboxRow(int(i), t, None if p is None else int(p), k, bytes(v)) for i, t, p, k, v in rows]

    def journal_size(self) -> int:
        """Rows in the journal (for tests and operators)."""
        return int(self.connection.execute("SELECT count(*) FROM saga_journal").fetchone()[0])


def _split_sql(script: str) -> list[str]:
    """Statements of a script: ``executescript`` would COMMIT the open transaction first."""
    return [s.strip() for s in script.split(";") if s.strip()]


def _now_ms() -> int:
    return int(time.time() * 1000)

