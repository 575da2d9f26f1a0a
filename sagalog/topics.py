"""Topic administration: create or verify, idempotently, the topics a deployment needs.

The invariants checked here are the ones the rest of the system silently relies on:

* the log and the inbox are **co-partitioned** (same partition count, both keyed by saga id),
  so the manager that owns inbox partition p is the one that replays and writes log partition p;
* the log is **compacted only** (``cleanup.policy=compact``): time- or size-based deletion
  would eventually remove the newest snapshot of a long-running saga, and the log is the only
  state there is.

Every function may be run any number of times, by several processes at once (N managers
starting together): a topic that another process created in between counts as success.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from sagalog.config import Topics
from sagalog.errors import ConfigError, TopicMismatch
from sagalog.kafka import ClientOverrides, admin_client, check_reachable, translate

#: Settings of the saga log. Each value says why; pass ``log_config`` to change them.
LOG_CONFIG: dict[str, str] = {
    # Keyed by saga id, every record carries the full snapshot: only the newest per saga is
    # needed for recovery, and finished sagas disappear through tombstones.
    "cleanup.policy": "compact",
    # Records younger than this are never compacted away, so `saga history` shows every step
    # of a recent saga and an incident can be investigated from the full trail.
    "min.compaction.lag.ms": str(60 * 60 * 1000),
    # The active segment is never compacted: rolling hourly (or at 100 MiB) lets superseded
    # snapshots and tombstones actually go, which bounds replay time on partition assignment.
    # (Kafka's defaults, 7 days / 1 GiB, would let a busy log grow far past its live sagas.)
    "segment.ms": str(60 * 60 * 1000),
    "segment.bytes": str(100 * 1024 * 1024),
    # Tombstones stay readable this long: a manager replaying a partition must see the
    # tombstone of a finished saga, or it would resurrect the saga from an older snapshot.
    "delete.retention.ms": str(24 * 60 * 60 * 1000),
}

#: Settings of the inbox, dead-letter and command topics: plain time-retained queues.
#: Compaction would drop a second message with the same saga id (e.g. a reply) unread.
QUEUE_CONFIG: dict[str, str] = {"cleanup.policy": "delete"}

Role = str  # "log", "inbox", "dead-letters" or "commands:<participant>"
Action = Literal["created", "verified"]

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_RDKAFKA_LOG = logging.getLogger("sagalog.rdkafka")


def quiet_client(overrides: ClientOverrides | None = None) -> dict[str, object]:
    """Client settings that keep librdkafka from printing to stderr, plus ``overrides``.

    Without a logger librdkafka writes every failed connection attempt straight to stderr
    (about 20 lines a second while a broker is down), burying the one-line error the CLI
    prints. With a logger its messages are queued for ``poll()``, which these short-lived
    admin clients never call: the exception we raise says what went wrong instead.
    """
    return {"logger": _RDKAFKA_LOG, **(overrides or {})}


@dataclass(frozen=True)
class TopicResult:
    """What ``ensure_topics`` did with one topic and what the topic looks like now."""

    name: str
    role: Role
    action: Action
    partitions: int
    cleanup_policy: str
    warning: str | None = None


@dataclass(frozen=True)
class TopicsReport:
    """The outcome of :func:`ensure_topics`: one result per topic, log first."""

    topics: Topics
    results: list[TopicResult] = field(default_factory=list)

    @property
    def partitions(self) -> int:
        """The partition count of the log (= the inbox's): the unit of manager ownership."""
        return self[self.topics.log].partitions

    @property
    def created(self) -> list[str]:
        return [r.name for r in self.results if r.action == "created"]

    @property
    def verified(self) -> list[str]:
        return [r.name for r in self.results if r.action == "verified"]

    @property
    def warnings(self) -> list[str]:
        return [r.warning for r in self.results if r.warning]

    def __getitem__(self, name: str) -> TopicResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(name)


def _wanted(topics: Topics, participants: Iterable[str]) -> dict[str, Role]:
    """Topic name -> role, in the order they are reported."""
    wanted: dict[str, Role] = {topics.log: "log", topics.inbox: "inbox", topics.dead_letters: "dead-letters"}
    for participant in participants:
        if not _NAME.match(participant):
            raise ConfigError(
                f"participant name {participant!r} cannot be part of a topic name "
                f"(use letters, digits, '.', '_' and '-')"
            )
        wanted[topics.commands(participant)] = f"commands:{participant}"
    return wanted


def _admin(
    admin_or_bootstrap: AdminClient | str, overrides: ClientOverrides | None, timeout_s: float
) -> AdminClient:
    if isinstance(admin_or_bootstrap, str):
        # A clear "nothing answered at X, start one with 'saga broker'" beats a timeout later.
        check_reachable(admin_or_bootstrap, timeout_s=timeout_s, overrides=quiet_client(overrides))
        return admin_client(admin_or_bootstrap, quiet_client(overrides))
    return admin_or_bootstrap


def _partition_counts(admin: AdminClient, timeout_s: float, *, led: bool = False) -> dict[str, int]:
    """Partition count of every topic in the cluster (``led``: only topics whose every
    partition has a leader, i.e. can be written to now).

    Deliberately a metadata request for *all* topics: asking for one named topic lets brokers
    with auto-creation enabled (Tansu always, Kafka by default) create it with the wrong shape.
    """
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as err:
        raise translate(err, "listing topics") from err
    # A topic listed without partitions is still being created: treat it as not there yet.
    return {
        name: len(meta.partitions)
        for name, meta in metadata.topics.items()
        if meta.partitions and (not led or all(p.leader >= 0 and p.error is None for p in meta.partitions.values()))
    }


def _cleanup_policies(admin: AdminClient, names: Iterable[str], timeout_s: float) -> dict[str, str]:
    """``cleanup.policy`` of each topic; Kafka's default ``delete`` where the broker reports none."""
    names = list(names)
    if not names:
        return {}
    futures = admin.describe_configs(
        [ConfigResource(ResourceType.TOPIC, name) for name in names], request_timeout=timeout_s
    )
    policies: dict[str, str] = {}
    for resource, future in futures.items():
        try:
            entries = future.result()
        except KafkaException as err:
            raise translate(err, f"reading the configuration of topic {resource.name}") from err
        entry = entries.get("cleanup.policy")
        policies[resource.name] = entry.value if entry is not None and entry.value else "delete"
    return policies


def _policy_set(policy: str) -> set[str]:
    return {part.strip() for part in policy.split(",") if part.strip()}


def _check_shape(topics: Topics, counts: Mapping[str, int], log_policy: str | None, requested: int) -> None:
    """Raise TopicMismatch if existing log/inbox break co-partitioning or compaction."""
    log_n, inbox_n = counts.get(topics.log), counts.get(topics.inbox)
    if log_n is not None and inbox_n is not None and log_n != inbox_n:
        raise TopicMismatch(
            f"{topics.log} has {log_n} partitions but {topics.inbox} has {inbox_n}: they must be equal "
            f"(both are partitioned by saga id, and a manager owns the same partition of both). "
            f"Recreate {topics.inbox} with {log_n} partitions, or use another --topic-prefix"
        )
    for name, existing in ((topics.log, log_n), (topics.inbox, inbox_n)):
        if existing is not None and existing != requested:
            raise TopicMismatch(
                f"{name} already exists with {existing} partitions, not the {requested} requested: "
                f"the partition count of the log and inbox cannot change under running sagas. "
                f"Pass --partitions {existing}, or use another --topic-prefix"
            )
    if log_policy is not None and _policy_set(log_policy) != {"compact"}:
        raise TopicMismatch(
            f"{topics.log} exists with cleanup.policy={log_policy}, but the saga log must be "
            f"cleanup.policy=compact only (deletion by retention would lose the state of long-running "
            f"sagas). Change it (kafka-configs --alter --entity-type topics --entity-name {topics.log} "
            f"--add-config cleanup.policy=compact) or use another --topic-prefix"
        )


def _create(admin: AdminClient, new: list[NewTopic], timeout_s: float) -> set[str]:
    """Create topics; return the names this call created (an existing topic is not an error)."""
    if not new:
        return set()
    created: set[str] = set()
    futures = admin.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s)
    for name, future in futures.items():
        try:
            future.result()
            created.add(name)
        except KafkaException as err:
            # Another process (a second manager, a concurrent `saga topics create`) won the race:
            # the shape of its topic is verified below like any existing topic.
            if _code(err) != KafkaError.TOPIC_ALREADY_EXISTS:
                raise translate(err, f"creating topic {name}") from err
    return created


def _code(err: KafkaException) -> int | None:
    kerr = err.args[0] if err.args else None
    return kerr.code() if isinstance(kerr, KafkaError) else None


def _wait_visible(admin: AdminClient, names: Iterable[str], timeout_s: float) -> dict[str, int]:
    """Poll metadata until every name is listed with a leader for each partition: creation
    propagates to brokers asynchronously, and a producer writing to a partition before it has a
    leader only waits and retries (measured on Apache Kafka under load: partitions of one new
    topic got their logs over 3.4 s)."""
    names = set(names)
    deadline = time.monotonic() + timeout_s
    pause = 0.05
    while True:
        counts = _partition_counts(admin, timeout_s, led=True)
        missing = names - counts.keys()
        if not missing:
            return counts
        if time.monotonic() >= deadline:
            raise TopicMismatch(
                f"topics {', '.join(sorted(missing))} were created but are not visible after {timeout_s:g}s"
            )
        time.sleep(pause)  # polling with a deadline: metadata has no change notification
        pause = min(pause * 2, 1.0)


def ensure_topics(
    admin_or_bootstrap: AdminClient | str,
    topics: Topics,
    *,
    partitions: int,
    replication: int = 1,
    participants: Iterable[str] = (),
    overrides: ClientOverrides | None = None,
    log_config: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
) -> TopicsReport:
    """Create missing topics and verify existing ones; safe to call any number of times.

    ``overrides`` are client settings (``-X`` pairs, e.g. SASL) used when a bootstrap string
    is given. ``log_config`` replaces entries of :data:`LOG_CONFIG` for newly created logs.

    Raises :class:`TopicMismatch` if the log and the inbox differ in partition count, if either
    exists with a count other than ``partitions``, or if the log is not compact-only; nothing
    is created in those cases. Command and dead-letter topics with another partition count
    only produce a warning: they are not co-partitioned with anything.
    """
    if partitions < 1:
        raise ConfigError(f"--partitions must be at least 1, not {partitions}")
    if replication < 1:
        raise ConfigError(f"--replication must be at least 1, not {replication}")
    wanted = _wanted(topics, participants)
    admin = _admin(admin_or_bootstrap, overrides, timeout_s)

    counts = _partition_counts(admin, timeout_s)
    existing_log_policy = (
        _cleanup_policies(admin, [topics.log], timeout_s)[topics.log] if topics.log in counts else None
    )
    _check_shape(topics, counts, existing_log_policy, partitions)

    log_settings = {**LOG_CONFIG, **(log_config or {})}
    new = [
        NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=replication,
            config=dict(log_settings if role == "log" else QUEUE_CONFIG),
        )
        for name, role in wanted.items()
        if name not in counts
    ]
    created = _create(admin, new, timeout_s)

    # Verify the final state, whoever created each topic (we, or a concurrent caller).
    counts = _wait_visible(admin, wanted, timeout_s) if new else counts
    policies = _cleanup_policies(admin, wanted, timeout_s)
    _check_shape(topics, counts, policies[topics.log], partitions)

    results = []
    for name, role in wanted.items():
        warning = None
        if counts[name] != partitions:
            warning = (
                f"{name} has {counts[name]} partitions, not the {partitions} requested "
                f"(allowed: {role} topics are not co-partitioned with the log)"
            )
        elif role == "inbox" and "compact" in _policy_set(policies[name]):
            warning = f"{name} is compacted: replies for the same saga may be dropped before they are read"
        results.append(
            TopicResult(
                name=name,
                role=role,
                action="created" if name in created else "verified",
                partitions=counts[name],
                cleanup_policy=policies[name],
                warning=warning,
            )
        )
    return TopicsReport(topics=topics, results=results)


def describe(
    admin_or_bootstrap: AdminClient | str,
    topics: Topics,
    *,
    overrides: ClientOverrides | None = None,
    timeout_s: float = 10.0,
) -> dict[str, int]:
    """Partition counts of this deployment's existing topics (log, inbox, dead letters, commands).

    Topics that do not exist are absent from the result; nothing is ever created.
    """
    admin = _admin(admin_or_bootstrap, overrides, timeout_s)
    ours = {topics.log, topics.inbox, topics.dead_letters}
    command_prefix = topics.commands("")
    counts = _partition_counts(admin, timeout_s)
    return {name: n for name, n in sorted(counts.items()) if name in ours or name.startswith(command_prefix)}


def partition_count(
    admin_or_bootstrap: AdminClient | str,
    topics: Topics,
    *,
    overrides: ClientOverrides | None = None,
    timeout_s: float = 10.0,
) -> int:
    """The partition count of the log and inbox, after checking that both exist and agree.

    This is how a manager learns how many partitions (units of ownership) there are.
    """
    counts = describe(admin_or_bootstrap, topics, overrides=overrides, timeout_s=timeout_s)
    missing = [name for name in (topics.log, topics.inbox) if name not in counts]
    if missing:
        raise TopicMismatch(
            f"topic {' and '.join(missing)} does not exist; create the topics first with "
            f"'saga topics create --topic-prefix {topics.prefix}'"
        )
    _check_shape(topics, counts, None, counts[topics.log])
    return counts[topics.log]
