"""The query side: a local SQLite read model of the saga log, caught up incrementally.

``saga status``, ``history``, ``list``, ``cancel``, ``start --wait`` and the demo's progress all
answer from here. The design, and why:

* **It reads the log, never the managers.** The log is the only state there is, so a query
  needs no manager to be up: it answers while managers are killed, restarting or rebalancing,
  and it shows exactly what a manager would rebuild on takeover (the same fold,
  :class:`sagalog.fold.PartitionFold`: sequence checks, stale-epoch rejection, re-basing on a
  snapshot after compaction).
* **It is a cache, caught up incrementally.** A SQLite file remembers, per log partition, the
  *next offset to read* (``partitions.next_offset``; one past the last record folded, or the
  partition end reached, since transaction markers take offsets too). A query reads only what
  was appended since the last query, with ``assign()`` (no consumer group, no commits,
  read_committed), up to the partition's end as the consumer's EOF event reports it (never
  ListOffsets: the embedded broker under-reports it after multi-record batches).
* **One saga, one partition.** A saga's records are keyed by its id, so they all live on the
  partition Kafka's murmur2 partitioner picks for that key (:func:`partition_for`, the Java
  client's algorithm, which the producers here use too). A status query catches up that one
  partition and then is one indexed SQLite lookup: with a million sagas in the log and a warm
  model, its cost is one DescribeTopics request (the partition count and the topic id), one
  fetch to the partition's end and the records appended since the last query (measured: 22 ms
  median from a fresh process's ReadModel with 1M sagas in the log, 4 ms on an open one).
  ``saga list`` catches up every partition. A status query that finds nothing new imports
  neither pydantic nor the Avro codec: the saga is shown from the stored JSON (:class:`SagaView`).
* **Bounded memory.** Records are folded one ``consume()`` batch at a time: the states a batch
  touches are loaded from SQLite, folded, written back with the batch's history rows and the
  new next offsets in one transaction, and dropped.

Tables (all rebuildable from the log at any time; delete the file to start over)::

    meta        key -> value: schema version, bootstrap, prefix, topic id, partition count
    partitions  partition, next_offset, epoch (newest claim), owner, claimed_ms,
                records, decode_errors, rejected
    sagas       id, partition, type, status, seq, epoch, started_ms, updated_ms, current steps,
                reason, incidents (JSON list of the open incidents, '[]' if none: what
                ``saga list --incidents`` selects, through a partial index), definition_id,
                snapshot (JSON of the saga state, without the definition)
    definitions id (:func:`sagalog.definition.definition_id`), json: pinned definitions, stored
                once however many sagas share one: from the log's definition records, and from
                the inline JSON of sagas begun before schema version 6
    history     partition, offset, saga_id, seq, epoch, timestamp_ms, event_type, event (JSON),
                writer, rejected (why the fold refused it, or NULL)
    removed     saga_id, partition, offset, removed_ms: sagas a tombstone deleted from the log
                (kept a week, so that ``saga status`` can say so)

**Tombstones** delete the saga and its history (the log no longer has it either) and leave a
row in ``removed``, so ``saga status`` can say "finished and removed" instead of "unknown".
**Undecodable records** are skipped and counted per partition (and listed in the saga's
history when their key names one); records the fold refuses are kept in the history with the
reason. **A recreated log** (a new topic id, as after a restart of the memory-only embedded
broker, or on Kafka a stored offset past the partition's end) resets what was read from it.

The file lives in ``$SAGA_STATE_DIR``, else ``$XDG_CACHE_HOME/saga`` or ``~/.cache/saga``,
named after the prefix and a hash of bootstrap servers and prefix. Several processes may use
one file: catching up is serialised by a lock file, reads go through SQLite's WAL.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sqlite3
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicCollection

from sagalog.config import Topics
from sagalog.errors import BrokerUnavailable, ConfigError, DecodeError
from sagalog.kafka import QUICK_RETRY, ClientOverrides, admin_client, reader_config, translate, where
from sagalog.reader import read_to_end

if TYPE_CHECKING:
    from confluent_kafka.admin import ClusterMetadata

    # Imported where they are used: a status query that finds nothing new on the log decodes and
    # folds nothing, and a fresh ``saga status`` process then never imports pydantic or fastavro.
    from sagalog.codec import Codec
    from sagalog.definition import SagaDefinition
    from sagalog.fold import PartitionFold, SagaState
    from sagalog.records import Incident, SagaStatus

#: The layout of the file; a file of another version is rebuilt from the log. 2: sagas.incidents.
SCHEMA_VERSION = "3"  # 3: a history row per event (a log record holds a decision's events)
#: How long ``saga status`` can still say "finished and removed" about a tombstoned saga.
REMOVED_KEPT_MS = 7 * 24 * 3600 * 1000
STATE_DIR_ENV = "SAGA_STATE_DIR"
#: Steps in these states (``StepStatus`` values) are what a saga is "at" right now.
ACTIVE_STEP = frozenset({"RUNNING", "COMPENSATING"})


# --- Kafka's partitioner --------------------------------------------------------------------

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (Java client ``Utils.murmur2``) as a signed 32-bit int.

    librdkafka's ``murmur2_random`` partitioner, which our producers use, is the same function,
    so this tells which partition a saga id's records land on without asking the broker.
    """
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    whole = length & ~3
    for (k,) in struct.iter_unpack("<I", data[:whole]):
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail == 3:
        h ^= data[whole + 2] << 16
    if tail >= 2:
        h ^= data[whole + 1] << 8
    if tail >= 1:
        h ^= data[whole]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (Java) partitioner picks for a non-null ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# --- errors -----------------------------------------------------------------------------------


class SagaNotFound(ConfigError):
    """No saga with this id in the log (a user mistake: a typo, another --topic-prefix...)."""


class SagaRemoved(SagaNotFound):
    """The saga finished and a tombstone removed it from the log after the retention period."""


# --- what queries return ----------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """The newest ``PartitionClaim`` of a partition: who owns it (as far as the log knows)."""

    partition: int
    owner: str
    epoch: int
    claimed_ms: int


@dataclass(frozen=True)
class HistoryEntry:
    """One event of a saga, as read from its log record (``rejected``: why the fold did not apply
    the record). The events of one record share its partition, offset, epoch and timestamp."""

    partition: int
    offset: int
    seq: int | None
    epoch: int | None
    timestamp_ms: int
    event_type: str
    event: dict[str, Any]
    writer: str | None
    rejected: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "offset": self.offset,
            "seq": self.seq,
            "epoch": self.epoch,
            "timestamp_ms": self.timestamp_ms,
            "event_type": self.event_type,
            "event": self.event,
            "writer": self.writer,
            "rejected": self.rejected,
        }


@dataclass(frozen=True)
class SagaSummary:
    """One row of ``saga list``."""

    saga_id: str
    partition: int
    saga_type: str
    status: SagaStatus
    seq: int
    started_ms: int
    updated_ms: int
    current: tuple[str, ...]
    reason: str | None
    #: Open incidents: compensations waiting for an operator (``saga retry``, ``saga resolve``).
    incidents: tuple[Incident, ...] = ()

    #: The ``sagas`` columns :meth:`from_row` reads, in its order.
    COLUMNS: ClassVar[str] = "id, partition, type, status, seq, started_ms, updated_ms, current, reason, incidents"

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> SagaSummary:
        from sagalog.records import Incident, SagaStatus

        return cls(
            saga_id=r[0],
            partition=r[1],
            saga_type=r[2],
            status=SagaStatus(r[3]),
            seq=r[4],
            started_ms=r[5],
            updated_ms=r[6],
            current=tuple(filter(None, r[7].split(","))),
            reason=r[8],
            incidents=tuple(Incident.model_validate(i) for i in json.loads(r[9] or "[]")),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "saga_id": self.saga_id,
            "partition": self.partition,
            "saga_type": self.saga_type,
            "status": self.status.value,
            "seq": self.seq,
            "started_ms": self.started_ms,
            "updated_ms": self.updated_ms,
            "current_steps": list(self.current),
            "reason": self.reason,
            "incidents": [incident_json(i) for i in self.incidents],
        }


def incident_json(incident: Incident) -> dict[str, Any]:
    return {
        "step": incident.step,
        "reason": incident.reason,
        "opened_ms": incident.opened_ms,
        "attempts": incident.attempts,
    }


@dataclass(frozen=True)
class SagaView:
    """Everything ``saga status`` shows: the saga, where it lives and its history.

    ``snapshot`` (the state as JSON, without its definition) and ``definition_data`` (the pinned
    definition's JSON) are what the read model stores: enough to show the saga without building a
    pydantic model, which is how ``saga status`` stays fast in a fresh process. ``state`` and
    ``definition`` build the models on first use.
    """

    #: ``SagaState.model_dump(mode="json")`` without ``definition``: saga_id, seq, epoch, status,
    #: steps (name, status, attempt, comp_attempt, deadline_ms, output, error...), incidents...
    snapshot: dict[str, Any]
    #: The pinned definition's canonical JSON (resolved: inline or by reference alike).
    definition_json: str
    partition: int
    claim: Claim | None
    history: tuple[HistoryEntry, ...]
    #: The pinned definition's id (its content hash), also for a saga that pinned it inline.
    definition_id: str = ""

    @cached_property
    def state(self) -> SagaState:
        return _state_from_data(self.snapshot, self.definition_json)

    @cached_property
    def definition(self) -> SagaDefinition:
        from sagalog.definition import definition_from_json

        return definition_from_json(self.definition_json)

    @cached_property
    def definition_data(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.definition_json)
        return data

    @property
    def current(self) -> tuple[str, ...]:
        return tuple(s["name"] for s in self.snapshot["steps"] if s["status"] in ACTIVE_STEP)

    def dependencies(self) -> dict[str, tuple[str, ...]]:
        """Step name -> the steps it depends on (``SagaDefinition.dependencies``, from the JSON)."""
        return step_dependencies(self.definition_data)


def step_dependencies(definition: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Step name -> the steps it depends on, from a definition's JSON: its ``depends_on``, or
    when that is left out the step before it. The rule of :meth:`SagaDefinition.dependencies`,
    without building the model (a test holds the two together)."""
    deps: dict[str, tuple[str, ...]] = {}
    previous: str | None = None
    for step in definition["steps"]:
        declared = step.get("depends_on")
        deps[step["name"]] = tuple(declared) if declared is not None else ((previous,) if previous else ())
        previous = step["name"]
    return deps


@dataclass
class CatchUpStats:
    """What one catch-up did (for tests, the demo and ``--verbose`` style output)."""

    partitions: tuple[int, ...] = ()
    records: int = 0
    decode_errors: int = 0
    rejected: int = 0
    resets: list[int] = field(default_factory=list)
    seconds: float = 0.0
    #: Partitions not read to their end within the read model's timeout, with the next offset
    #: reached: answers about their sagas may be stale (never an error: see ``_consume``).
    stale: dict[int, int] = field(default_factory=dict)

    def staleness(self) -> str | None:
        """One line for the user when the answer may be stale, else None."""
        if not self.stale:
            return None
        where = ", ".join(f"{p} (read up to offset {o})" for p, o in sorted(self.stale.items()))
        return (
            f"log partition(s) {where} did not reach their end within {self.seconds:.0f}s "
            f"(the broker is slow, or a transaction is still open): the answer may miss their newest records"
        )


# --- storage ----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS partitions (
    partition INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    claimed_ms INTEGER,
    records INTEGER NOT NULL DEFAULT 0,
    decode_errors INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS definitions (id TEXT PRIMARY KEY, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sagas (
    id TEXT PRIMARY KEY,
    partition INTEGER NOT NULL,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    current TEXT NOT NULL,
    reason TEXT,
    incidents TEXT NOT NULL DEFAULT '[]',
    definition_id TEXT NOT NULL,
    snapshot TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sagas_by_start ON sagas (started_ms DESC);
-- Few sagas ever have an open incident: the index holds only those.
CREATE INDEX IF NOT EXISTS sagas_with_incidents ON sagas (started_ms DESC) WHERE incidents != '[]';
CREATE INDEX IF NOT EXISTS sagas_by_status ON sagas (status, started_ms DESC);
CREATE INDEX IF NOT EXISTS sagas_by_type ON sagas (type, started_ms DESC);
CREATE INDEX IF NOT EXISTS sagas_by_partition ON sagas (partition);
CREATE TABLE IF NOT EXISTS history (
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    saga_id TEXT NOT NULL,
    seq INTEGER,
    epoch INTEGER,
    timestamp_ms INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    event TEXT NOT NULL,
    writer TEXT,
    rejected TEXT,
    part INTEGER NOT NULL DEFAULT 0, -- the event's place in its record (a record holds a decision's events)
    PRIMARY KEY (partition, offset, part)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_by_saga ON history (saga_id, partition, offset, part);
CREATE TABLE IF NOT EXISTS removed (
    saga_id TEXT PRIMARY KEY,
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    removed_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS removed_by_time ON removed (removed_ms);
"""
_DATA_TABLES = ("partitions", "sagas", "definitions", "history", "removed")
_NO_SUCH_TOPIC = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})


def default_state_dir() -> Path:
    """``$SAGA_STATE_DIR``, else ``$XDG_CACHE_HOME/saga``, else ``~/.cache/saga``."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "saga"


def model_path(state_dir: Path, bootstrap: str, prefix: str) -> Path:
    """One file per (bootstrap servers, topic prefix): a different cluster is a different log."""
    digest = hashlib.sha256(f"{bootstrap}\0{prefix}".encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", prefix)[:40]
    return state_dir / f"readmodel-{readable}-{digest}.sqlite"


# --- the read model ---------------------------------------------------------------------------


class ReadModel:
    """The SQLite read model of one deployment's saga log (a context manager; close it).

    Every query method catches up first (``catch_up=False`` answers from the file as it is).
    Raises :class:`BrokerUnavailable` when no broker answers, :class:`ConfigError` when the
    log topic does not exist, :class:`SagaNotFound` for an unknown saga id.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        *,
        state_dir: Path | None = None,
        overrides: ClientOverrides | None = None,
        codec: Codec | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.overrides = dict(overrides or {})
        self.timeout_s = timeout_s
        self.state_dir = state_dir or default_state_dir()
        self.path = model_path(self.state_dir, bootstrap, topics.prefix)
        self._codec = codec
        self._consumer: Consumer | None = None
        self._partitions: int | None = None
        self._topic_names: frozenset[str] | None = None
        #: Set by each catch-up: a line for the user when the answer may be stale, else None.
        self.staleness: str | None = None
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.db = self._open()
        except (OSError, sqlite3.Error) as err:
            raise ConfigError(
                f"cannot open the read model {self.path}: {err}; pass --state-dir (or set {STATE_DIR_ENV}) "
                f"to a writable directory"
            ) from err

    def _open(self) -> sqlite3.Connection:
        """Open (and create or upgrade) the file; an unreadable file is deleted and rebuilt: it is a cache."""
        for attempt in (1, 2):
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # a cache: losing the last batch only re-reads it
                self.db = db
                self._init_schema()
                return db
            except sqlite3.DatabaseError:
                db.close()
                if attempt == 2:
                    raise
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        Path(f"{self.path}{suffix}").unlink()
        raise AssertionError("unreachable")

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> ReadModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self.db.close()

    @property
    def codec(self) -> Codec:
        if self._codec is None:
            from sagalog.codec import Codec

            self._codec = Codec()
        return self._codec

    def _init_schema(self) -> None:
        with self._locked():
            tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "meta" in tables and self._meta("schema_version") != SCHEMA_VERSION:
                # Another layout (an older version of this module): it is a cache, rebuild it from the log.
                for table in tables:
                    self.db.execute(f'DROP TABLE IF EXISTS "{table}"')
            self.db.executescript(_SCHEMA)
            for key, value in (
                ("schema_version", SCHEMA_VERSION),
                ("bootstrap", self.bootstrap),
                ("prefix", self.topics.prefix),
            ):
                if self._meta(key) != value:
                    self._set_meta(key, value)

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Only one process catches up a file at a time (another one would fold records twice)."""
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _reset_partition(self, p: int) -> None:
        self.db.execute("DELETE FROM sagas WHERE partition = ?", (p,))
        self.db.execute("DELETE FROM history WHERE partition = ?", (p,))
        self.db.execute("DELETE FROM removed WHERE partition = ?", (p,))
        self.db.execute("DELETE FROM partitions WHERE partition = ?", (p,))

    # -- Kafka ---------------------------------------------------------------------------

    def _client(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(reader_config(self.bootstrap, self.overrides))
        return self._consumer

    def _unavailable(self, err: BaseException) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"no Kafka broker answered at {self.bootstrap} within {self.timeout_s:g}s ({err}); "
            f"start one ('saga broker', or 'saga demo' for everything), or pass --bootstrap-servers "
            f"/ set SAGA_BOOTSTRAP_SERVERS"
        )

    def partition_count(self) -> int:
        """Partitions of the log, from the broker (asked once per ReadModel); checks that the topic
        exists and is still the one read before (:meth:`_check_identity`)."""
        if self._partitions is None:
            self._partitions = self._describe_log()
        return self._partitions

    def _describe_log(self) -> int:
        """One DescribeTopics request: whether the log exists, its partitions and its topic id.

        It names the topic, but librdkafka sends it with topic auto-creation off, so unlike a
        consumer's Metadata request naming one topic it never creates a missing log (checked on
        the embedded broker too): a query never needs the list of every topic.
        """
        log = self.topics.log
        admin = admin_client(self.bootstrap, {**QUICK_RETRY, **self.overrides})
        try:
            futures = admin.describe_topics(TopicCollection([log]), request_timeout=self.timeout_s)
            self._client()  # created while the request is out: the catch-up's reads need it next
            description = futures[log].result()
        except KafkaException as err:
            kerr = err.args[0] if err.args else None
            if isinstance(kerr, KafkaError) and kerr.code() in _NO_SUCH_TOPIC:
                raise self._missing_log() from err
            if isinstance(translate(err, f"describing {log}"), BrokerUnavailable):
                raise self._unavailable(err) from err
            # A broker without DescribeTopics (no topic id to check either), or a principal not
            # allowed to describe the log: the metadata answers as it always did (a topic the
            # principal may not see is one that "does not exist").
            return self._partitions_from_metadata()
        if not description.partitions:
            raise self._missing_log()
        partitions = len(description.partitions)
        self._check_identity(str(description.topic_id), partitions)
        return partitions

    def _partitions_from_metadata(self) -> int:
        meta = self._metadata()
        topic = meta.topics.get(self.topics.log)
        if topic is None or topic.error is not None or not topic.partitions:
            raise self._missing_log()
        return len(topic.partitions)

    def _metadata(self) -> ClusterMetadata:
        try:
            # All topics, never one by name: brokers with auto-creation would create it.
            return self._client().list_topics(timeout=self.timeout_s)
        except KafkaException as err:
            translated = translate(err, f"reading metadata from {self.bootstrap}")
            if isinstance(translated, BrokerUnavailable):
                raise self._unavailable(err) from err
            raise translated from err

    def _missing_log(self) -> ConfigError:
        return ConfigError(
            f"topic {self.topics.log} does not exist at {self.bootstrap}: no saga has run with "
            f"--topic-prefix {self.topics.prefix} there; start a manager ('saga manager') or check "
            f"--topic-prefix / --bootstrap-servers"
        )

    def topic_names(self) -> frozenset[str]:
        """Every topic of the cluster (one Metadata request, the first time it is asked)."""
        if self._topic_names is None:
            self._topic_names = frozenset(self._metadata().topics)
        return self._topic_names

    def _check_identity(self, topic_id: str, partitions: int) -> None:
        """Reset everything if the log topic was deleted and created again (a new topic id) or
        has another number of partitions (every saga may then live on another one).

        Brokers that do not report topic ids are covered by the offset check in ``_consume``.
        """
        now = (topic_id, str(partitions))
        if (self._meta("topic_id"), self._meta("partitions")) == now:
            return  # the usual case: nothing to write
        with self._write():
            known_id, known_n = self._meta("topic_id"), self._meta("partitions")
            if (known_id is not None and known_id != now[0]) or (known_n is not None and known_n != now[1]):
                for table in _DATA_TABLES:
                    self.db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names
            self._set_meta("topic_id", now[0])
            self._set_meta("partitions", now[1])

    def partition_of(self, saga_id: str) -> int:
        return partition_for(saga_id.encode(), self.partition_count())

    # -- catching up ---------------------------------------------------------------------

    def catch_up(self, partitions: Iterable[int] | None = None) -> CatchUpStats:
        """Fold what was appended to these partitions (default: all) since the last catch-up."""
        started = time.monotonic()
        count = self.partition_count()
        wanted = tuple(sorted(set(range(count) if partitions is None else partitions)))
        stats = CatchUpStats(partitions=wanted)
        with self._locked():
            stored = dict(
                self.db.execute(
                    f"SELECT partition, next_offset FROM partitions WHERE partition IN ({','.join('?' * len(wanted))})",  # noqa: S608
                    wanted,
                ).fetchall()
            )
            self._consume({p: stored.get(p, 0) for p in wanted}, stats)
            if stats.records:
                self.db.execute("DELETE FROM removed WHERE removed_ms < ?", (int(time.time() * 1000) - REMOVED_KEPT_MS,))
        stats.seconds = time.monotonic() - started
        self.staleness = stats.staleness()
        return stats

    def _consume(self, starts: dict[int, int], stats: CatchUpStats) -> None:
        """Read each partition from its next offset to its end (:func:`sagalog.reader.read_to_end`),
        folding and storing batch by batch.

        The end is what fetch responses say (EOF), never ListOffsets: measured on the embedded
        broker (Tansu 0.6), ListOffsets answers the first offset of the last record batch + 1,
        short of the real end whenever that batch holds several records. EOF also steps over
        transaction markers, which take offsets but are never delivered.

        A query always answers: when nothing new arrives for ``timeout_s`` (an open transaction
        holds read_committed readers back on Kafka, a broker is slow), the read stops and the
        partitions not read to their end are reported in ``stats.stale``.

        A log that was deleted and created again has a new topic id (see
        :meth:`_check_identity`). On Kafka a stored offset past the end of the log also
        makes the consumer restart at the beginning (``auto.offset.reset=earliest``): the first
        offset delivered, or the end, is then below where we stood (the batch's ``resets``), and
        the partition is read again. (Tansu answers such a fetch with nothing at all: that ends
        as a stale answer after ``timeout_s`` rather than a wait forever.)
        """
        with contextlib.closing(
            read_to_end(self._client(), self.topics.log, starts, quiet_s=self.timeout_s)
        ) as reading:
            for batch in reading:
                if batch.stale:
                    stats.stale = {p: max(offset, starts[p]) for p, offset in batch.stale.items()}
                else:
                    self._apply_batch(batch.messages, batch.ends, batch.resets, stats)

    def _apply_batch(
        self, messages: dict[int, list[Message]], ends: dict[int, int], resets: set[int], stats: CatchUpStats
    ) -> None:
        """Fold one batch and store it with the new next offsets, atomically."""
        with self._write():
            for p in sorted(resets):
                # The log is shorter than what we had read: it was recreated (e.g. the memory-only
                # embedded broker restarted). What we hold for this partition is another log's.
                self._reset_partition(p)
                stats.resets.append(p)
            for p, msgs in messages.items():
                self._fold_partition(p, msgs, stats)
            for p, end in ends.items():
                self.db.execute(
                    "INSERT INTO partitions (partition, next_offset) VALUES (?, ?) "
                    "ON CONFLICT (partition) DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
                    (p, end),
                )

    def _fold_partition(self, p: int, msgs: list[Message], stats: CatchUpStats) -> None:
        from sagalog.fold import PartitionFold
        from sagalog.records import PartitionClaim, SagaDefinitionRecord, SagaLogRecord, is_saga_key

        db = self.db
        row = db.execute("SELECT epoch FROM partitions WHERE partition = ?", (p,)).fetchone()
        fold = PartitionFold(partition=p, epoch=row[0] if row else 0, max_rejected_kept=len(msgs) + 1)
        decoded: list[tuple[Message, Any]] = []
        for msg in msgs:
            value = msg.value()
            try:
                item: Any = None if value is None else self.codec.decode(value)
            except DecodeError as bad:
                item = bad.at(self.topics.log, p, where(msg)[2])
            decoded.append((msg, item))
        saga_records = [i for _, i in decoded if isinstance(i, SagaLogRecord)]
        # Definitions read by an earlier catch-up (maybe another process) are in the file only.
        self._load_definitions({r.snapshot.definition_id for r in saga_records if r.snapshot.definition_id})
        self._load_states(fold, {r.saga_id for r in saga_records})
        touched: set[str] = set()
        records = decode_errors = rejected = 0
        claim: PartitionClaim | None = None
        for msg, item in decoded:
            key: bytes | None = msg.key()
            offset, ts = where(msg)[2], msg.timestamp()[1]
            records += 1
            if item is None:  # a tombstone: the saga is gone from the log, so it goes from here too
                if is_saga_key(key):
                    saga_id = key.decode("utf-8", "replace")
                    fold.apply(key, None, offset)
                    touched.discard(saga_id)
                    db.execute("DELETE FROM sagas WHERE id = ?", (saga_id,))
                    db.execute("DELETE FROM history WHERE saga_id = ?", (saga_id,))
                    db.execute(
                        "INSERT OR REPLACE INTO removed (saga_id, partition, offset, removed_ms) VALUES (?, ?, ?, ?)",
                        (saga_id, p, offset, ts),
                    )
                continue
            if isinstance(item, SagaDefinitionRecord):
                fold.apply(key, item, offset)
                if item.definition_id in fold.definitions:  # accepted: its id is its content's hash
                    db.execute(
                        "INSERT OR IGNORE INTO definitions (id, json) VALUES (?, ?)", (item.definition_id, item.definition)
                    )
                else:
                    rejected += 1
                continue
            if isinstance(item, DecodeError) or not isinstance(item, SagaLogRecord | PartitionClaim):
                decode_errors += 1
                if is_saga_key(key):
                    reason = str(item) if isinstance(item, DecodeError) else f"{type(item).__name__} on the log"
                    db.execute(
                        "INSERT OR REPLACE INTO history (partition, offset, saga_id, timestamp_ms, event_type, "
                        "event, rejected) VALUES (?, ?, ?, ?, '(undecodable)', '{}', ?)",
                        (p, offset, key.decode("utf-8", "replace"), ts, reason),
                    )
                continue
            if isinstance(item, PartitionClaim):
                fold.apply(key, item, offset)
                if claim is None or item.epoch >= claim.epoch:
                    claim = item
                continue
            before = len(fold.rejected)
            fold.apply(key, item, offset)
            why = fold.rejected[-1][1] if len(fold.rejected) > before else None
            if why is not None:
                rejected += 1
            if item.saga_id in fold.sagas and (why is None or fold.sagas[item.saga_id].seq == item.seq):
                touched.add(item.saga_id)
                if item.first_seq == 1:
                    db.execute("DELETE FROM removed WHERE saga_id = ?", (item.saga_id,))
            db.executemany(
                "INSERT OR REPLACE INTO history (partition, offset, part, saga_id, seq, epoch, timestamp_ms, "
                "event_type, event, writer, rejected) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        p,
                        offset,
                        part,
                        item.saga_id,
                        item.first_seq + part,
                        item.epoch,
                        item.timestamp_ms,
                        type(event).__name__,
                        event.model_dump_json(),
                        item.writer,
                        why,
                    )
                    for part, event in enumerate(item.events)
                ],
            )
        for saga_id in touched:
            self._store_state(p, fold.sagas[saga_id])
        db.execute(
            "INSERT INTO partitions (partition, next_offset, epoch, records, decode_errors, rejected) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (partition) DO UPDATE SET "
            "next_offset = max(next_offset, excluded.next_offset), epoch = max(epoch, excluded.epoch), "
            "records = records + excluded.records, decode_errors = decode_errors + excluded.decode_errors, "
            "rejected = rejected + excluded.rejected",
            (p, where(msgs[-1])[2] + 1, fold.epoch, records, decode_errors, rejected),
        )
        if claim is not None:
            db.execute(
                "UPDATE partitions SET owner = ?, claimed_ms = ? WHERE partition = ? AND epoch <= ?",
                (claim.owner, claim.timestamp_ms, p, claim.epoch),
            )
        stats.records += records
        stats.decode_errors += decode_errors
        stats.rejected += rejected

    def _load_states(self, fold: PartitionFold, saga_ids: set[str]) -> None:
        ids = list(saga_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            rows = self.db.execute(
                "SELECT s.snapshot, d.json FROM sagas s JOIN definitions d ON d.id = s.definition_id "
                f"WHERE s.id IN ({','.join('?' * len(chunk))})",  # noqa: S608 - placeholders only
                chunk,
            ).fetchall()
            for snapshot, definition in rows:
                state = _state_from_row(snapshot, definition)
                fold.sagas[state.saga_id] = state

    def _load_definitions(self, ids: set[str]) -> None:
        """Pin (:func:`sagalog.definition.pin`) the definitions of these ids that the file holds
        and this process has not read yet."""
        from sagalog.definition import pin, pinned_json

        wanted = [i for i in ids if pinned_json(i) is None]
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            for definition_id, text in self.db.execute(
                f"SELECT id, json FROM definitions WHERE id IN ({','.join('?' * len(chunk))})",  # noqa: S608
                chunk,
            ):
                pin(text, definition_id)

    def _store_state(self, p: int, state: SagaState) -> None:
        from sagalog.definition import definition_id as hashed

        # A saga begun before schema version 6 carries its definition inline: stored once all the same.
        definition_id = state.definition_id or hashed(state.definition)
        self.db.execute(
            "INSERT OR IGNORE INTO definitions (id, json) VALUES (?, ?)", (definition_id, state.definition_json)
        )
        snapshot = state.model_dump(mode="json", exclude={"definition"})
        self.db.execute(
            "INSERT OR REPLACE INTO sagas (id, partition, type, status, seq, epoch, started_ms, updated_ms, current, "
            "reason, incidents, definition_id, snapshot) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                state.saga_id,
                p,
                state.saga_type,
                state.status.value,
                state.seq,
                state.epoch,
                state.started_ms,
                state.updated_ms,
                ",".join(s.name for s in state.steps if s.status in ACTIVE_STEP),
                state.reason,
                json.dumps(snapshot["incidents"], separators=(",", ":")),
                definition_id,
                json.dumps(snapshot, separators=(",", ":")),
            ),
        )

    # -- queries -------------------------------------------------------------------------

    def find(self, saga_id: str, *, catch_up: bool = True) -> SagaState | None:
        """The saga's state, or None if the log has no such saga (catching up its partition only)."""
        row = self._saga_row(saga_id, catch_up)
        return None if row is None else _state_from_row(row[0], row[1])

    def _saga_row(self, saga_id: str, catch_up: bool) -> tuple[str, str, int, str] | None:
        """The saga's stored snapshot, pinned definition, partition and definition id, or None if
        there is none."""
        if catch_up:
            self.catch_up([self.partition_of(saga_id)])
        row: tuple[str, str, int, str] | None = self.db.execute(
            "SELECT s.snapshot, d.json, s.partition, s.definition_id FROM sagas s "
            "JOIN definitions d ON d.id = s.definition_id WHERE s.id = ?",
            (saga_id,),
        ).fetchone()
        return row

    def get(self, saga_id: str, *, catch_up: bool = True) -> SagaState:
        """Like :meth:`find`, but an unknown id raises :class:`SagaNotFound` saying what to do."""
        state = self.find(saga_id, catch_up=catch_up)
        if state is None:
            raise self._not_found(saga_id)
        return state

    def _not_found(self, saga_id: str) -> SagaNotFound:
        removed = self.db.execute("SELECT removed_ms FROM removed WHERE saga_id = ?", (saga_id,)).fetchone()
        if removed is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(removed[0] / 1000))
            return SagaRemoved(
                f"saga {saga_id!r} finished and was removed from {self.topics.log} at {when} "
                f"(tombstoned after the finished-saga retention); nothing more is known about it"
            )
        return SagaNotFound(
            f"no saga {saga_id!r} in {self.topics.log} at {self.bootstrap}; check the id ('saga list' shows "
            f"recent sagas) or --topic-prefix / --bootstrap-servers (a saga just started appears once a "
            f"manager has begun it)"
        )

    def view(self, saga_id: str, *, catch_up: bool = True) -> SagaView:
        """The saga as stored, with its partition, owner and history (no pydantic model is built
        unless ``state`` or ``definition`` is asked for)."""
        row = self._saga_row(saga_id, catch_up)
        if row is None:
            raise self._not_found(saga_id)
        snapshot, definition, partition, definition_id = row
        return SagaView(
            snapshot=json.loads(snapshot),
            definition_json=definition,
            partition=partition,
            claim=self.claims().get(partition),
            history=tuple(self.history(saga_id, catch_up=False)),
            definition_id=definition_id,
        )

    def history(self, saga_id: str, *, catch_up: bool = True) -> list[HistoryEntry]:
        """Every record of the saga still on the log, in log order (raises if there is none)."""
        if catch_up:
            self.catch_up([self.partition_of(saga_id)])
        rows = self.db.execute(
            "SELECT partition, offset, seq, epoch, timestamp_ms, event_type, event, writer, rejected "
            "FROM history WHERE saga_id = ? ORDER BY partition, offset, part",
            (saga_id,),
        ).fetchall()
        if not rows:
            raise self._not_found(saga_id)
        return [
            HistoryEntry(
                partition=r[0],
                offset=r[1],
                seq=r[2],
                epoch=r[3],
                timestamp_ms=r[4],
                event_type=r[5],
                event=json.loads(r[6]),
                writer=r[7],
                rejected=r[8],
            )
            for r in rows
        ]

    def list_sagas(
        self,
        *,
        status: SagaStatus | None = None,
        saga_type: str | None = None,
        limit: int | None = 50,
        catch_up: bool = True,
        with_incident: bool = False,
    ) -> list[SagaSummary]:
        """Sagas, newest first, optionally filtered (catching up every partition);
        ``with_incident``: only sagas with an open incident."""
        if catch_up:
            self.catch_up()
        where, args = self._filters(status, saga_type, with_incident)
        sql = f"SELECT {SagaSummary.COLUMNS} FROM sagas{where} ORDER BY started_ms DESC, id"  # noqa: S608
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        return [SagaSummary.from_row(r) for r in self.db.execute(sql, args).fetchall()]

    def count(
        self, *, status: SagaStatus | None = None, saga_type: str | None = None, with_incident: bool = False
    ) -> int:
        where, args = self._filters(status, saga_type, with_incident)
        return int(self.db.execute(f"SELECT count(*) FROM sagas{where}", args).fetchone()[0])  # noqa: S608

    @staticmethod
    def _filters(
        status: SagaStatus | None, saga_type: str | None, with_incident: bool = False
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if with_incident:
            clauses.append("incidents != '[]'")  # the partial index's condition, word for word
        if status is not None:
            clauses.append("status = ?")
            args.append(status.value)
        if saga_type is not None:
            clauses.append("type = ?")
            args.append(saga_type)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args

    def counts_by_status(self) -> dict[SagaStatus, int]:
        """Sagas per status, as of the last catch-up (every status present, zeros included)."""
        from sagalog.records import SagaStatus

        counts = dict.fromkeys(SagaStatus, 0)
        for status, n in self.db.execute("SELECT status, count(*) FROM sagas GROUP BY status"):
            counts[SagaStatus(status)] = n
        return counts

    def statuses(self, saga_ids: Iterable[str]) -> dict[str, SagaStatus]:
        """Status of each of these sagas that the model knows (as of the last catch-up)."""
        from sagalog.records import SagaStatus

        ids = list(saga_ids)
        out: dict[str, SagaStatus] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            for saga_id, status in self.db.execute(
                f"SELECT id, status FROM sagas WHERE id IN ({','.join('?' * len(chunk))})",  # noqa: S608
                chunk,
            ):
                out[saga_id] = SagaStatus(status)
        return out

    def states(self, saga_ids: Iterable[str] | None = None) -> dict[str, SagaState]:
        """Full states (all sagas, or these), as of the last catch-up."""
        sql = "SELECT s.snapshot, d.json FROM sagas s JOIN definitions d ON d.id = s.definition_id"
        if saga_ids is None:
            return {s.saga_id: s for s in (_state_from_row(a, b) for a, b in self.db.execute(sql))}
        ids = list(saga_ids)
        out: dict[str, SagaState] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            for a, b in self.db.execute(f"{sql} WHERE s.id IN ({','.join('?' * len(chunk))})", chunk):
                state = _state_from_row(a, b)
                out[state.saga_id] = state
        return out

    def claims(self) -> dict[int, Claim]:
        """The newest claim of each partition (as of the last catch-up): who owns what."""
        return {
            p: Claim(partition=p, owner=owner, epoch=epoch, claimed_ms=claimed_ms)
            for p, owner, epoch, claimed_ms in self.db.execute(
                "SELECT partition, owner, epoch, claimed_ms FROM partitions WHERE owner IS NOT NULL ORDER BY partition"
            )
        }

    def live_count(self, partitions: Iterable[int]) -> int:
        """Unfinished sagas on these partitions (as of the last catch-up)."""
        wanted = list(partitions)
        if not wanted:
            return 0
        return int(
            self.db.execute(
                f"SELECT count(*) FROM sagas WHERE status IN ('RUNNING', 'COMPENSATING') "  # noqa: S608
                f"AND partition IN ({','.join('?' * len(wanted))})",
                wanted,
            ).fetchone()[0]
        )

    def first_record_ms(self, partition: int, *, after_epoch: int, since_ms: int) -> int | None:
        """When the first saga record of an epoch above ``after_epoch`` was written on this partition
        at or after ``since_ms`` (a new owner at work), or None if there is none yet."""
        row = self.db.execute(
            "SELECT min(timestamp_ms) FROM history WHERE partition = ? AND epoch > ? AND timestamp_ms >= ? "
            "AND rejected IS NULL",
            (partition, after_epoch, since_ms),
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def partition_stats(self) -> dict[int, dict[str, int]]:
        """Per partition: next offset, records read, undecodable records skipped, records rejected."""
        return {
            p: {"next_offset": n, "records": r, "decode_errors": d, "rejected": x}
            for p, n, r, d, x in self.db.execute(
                "SELECT partition, next_offset, records, decode_errors, rejected FROM partitions ORDER BY partition"
            )
        }

    def wait_terminal(
        self, saga_id: str, timeout_s: float, *, interval_s: float = 0.1
    ) -> SagaState | None:
        """Poll the saga's partition until the saga is terminal; its state then, else the last seen
        (None if it never appeared) once ``timeout_s`` has passed."""
        deadline = time.monotonic() + timeout_s
        partition = self.partition_of(saga_id)
        state: SagaState | None = None
        while True:
            self.catch_up([partition])
            state = self.find(saga_id, catch_up=False)
            if (state is not None and state.status.terminal) or time.monotonic() >= deadline:
                return state
            time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))  # polling with a deadline


def _state_from_row(snapshot: str, definition: str) -> SagaState:
    return _state_from_data(json.loads(snapshot), definition)


def _state_from_data(snapshot: Mapping[str, Any], definition: str) -> SagaState:
    """The state as the fold gave it: a saga that pins its definition by reference gets it pinned
    in this process (the file stores it once, by id), one that pinned it inline gets it back inline."""
    from sagalog.definition import pin, pinned_json
    from sagalog.fold import SagaState

    definition_id = snapshot.get("definition_id") or ""  # absent in rows stored before schema version 6
    if definition_id:
        if pinned_json(definition_id) is None:
            pin(definition, definition_id)
        return SagaState.model_validate({**snapshot, "definition": ""})
    return SagaState.model_validate({**snapshot, "definition": definition})
