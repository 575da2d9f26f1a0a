"""Kafka plumbing: client configurations (each value says why) and the one place where
confluent-kafka errors become ours.

Nothing else in the project should catch ``KafkaException``: call :func:`translate`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka.admin import AdminClient

from sagalog.errors import BrokerError, BrokerRefused, BrokerUnavailable, Fenced

_RDKAFKA_LOG = logging.getLogger("saga.rdkafka")
# Without a handler, Python's last-resort handler would print every librdkafka warning to stderr
# (a CLI talking to a down broker: ~100 lines over its one-line error). Processes that configure
# logging (managers, participants) still see them through the root logger.
_RDKAFKA_LOG.addHandler(logging.NullHandler())


class _ExpectedFencing(logging.Filter):
    """librdkafka reports a fenced transactional producer as CRITICAL 'FATAL'. For a manager it is
    routine (a takeover fenced the previous owner, who drops or re-checks the partition and says so
    itself at WARNING), so it is lowered to INFO: operators' alerts stay for real faults."""

    MARKERS = ("fenced by a newer instance", "newer producer with the same transactionalid", "producer_fenced")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO and any(m in record.getMessage().lower() for m in self.MARKERS):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_RDKAFKA_LOG.addFilter(_ExpectedFencing())

#: Client settings passed through from the CLI (``-X key=value``) for SASL/TLS clusters.
ClientOverrides = Mapping[str, Any]

_UNAVAILABLE = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._RESOLVE,
    KafkaError._TIMED_OUT,
    KafkaError._MSG_TIMED_OUT,
}
_FENCED = {
    KafkaError._FENCED,
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
}
#: Refusals a user must fix, with the fix. librdkafka reports most of them as non-fatal consumer
#: errors and retries forever (a manager below the broker's minimum session timeout used to log
#: "JoinGroup failed" every second for good): they stop the process instead.
_REFUSED = {
    KafkaError.INVALID_SESSION_TIMEOUT: (
        "the broker refuses the consumer group session timeout: it must lie within the broker's "
        "group.min.session.timeout.ms and group.max.session.timeout.ms (6000 and 1800000 ms on a stock "
        "Apache Kafka); pass --session-timeout-ms within them"
    ),
    KafkaError.GROUP_AUTHORIZATION_FAILED: "not authorized for the consumer group: grant READ on the group (see docs/OPERATIONS.md)",
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "not authorized for a topic: grant the topic ACLs of this role (see docs/OPERATIONS.md)",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: (
        "not authorized for the transactional id: grant WRITE and DESCRIBE on transactional ids "
        "'<group>.<log topic>.*' (prefixed) to managers (see docs/OPERATIONS.md)"
    ),
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "not authorized on the cluster (idempotent writes need IDEMPOTENT_WRITE on older brokers)",
    KafkaError.SASL_AUTHENTICATION_FAILED: "authentication failed: check the sasl.* settings passed with -X",
    KafkaError._AUTHENTICATION: "authentication failed: check the sasl.* / ssl.* settings passed with -X",
}


def translate(err: KafkaException | KafkaError, doing: str) -> BrokerError:
    """Map a confluent-kafka error to ours, keeping librdkafka's retriable/fatal verdicts."""
    kerr = err.args[0] if isinstance(err, KafkaException) and err.args else err
    if not isinstance(kerr, KafkaError):
        return BrokerError(f"{doing}: {err}")
    code = kerr.code()
    text = f"{doing}: {kerr.str()}"
    if code in _REFUSED:
        return BrokerRefused(f"{doing}: {_REFUSED[code]} (broker said: {kerr.str()})")
    if code in _FENCED or (kerr.fatal() and "fenced" in kerr.str().lower()):
        return Fenced(f"{text} (another owner took over; this writer stops)")
    if code in _UNAVAILABLE:
        return BrokerUnavailable(text)
    return BrokerError(text, retryable=bool(kerr.retriable()) and not kerr.fatal())


def _base(bootstrap: str, overrides: ClientOverrides | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        # librdkafka's own log goes through Python logging, not raw stderr: a broker that is down
        # otherwise prints ~20 connection errors a second over the CLI's one-line message.
        "logger": _RDKAFKA_LOG,
    }
    config.update(overrides or {})
    return config


def producer_config(
    bootstrap: str,
    *,
    transactional_id: str | None = None,
    overrides: ClientOverrides | None = None,
) -> dict[str, Any]:
    """A producer that batches: never flush per message, let linger collect a poll's output."""
    config = _base(bootstrap, None)
    config.update(
        {
            # Keys are saga ids; murmur2 is what Java clients use, so services in any language that
            # follow the contract land a saga's messages on the same partition as ours do.
            "partitioner": "murmur2_random",
            # Idempotence: broker-side dedup of retried batches, so a retry never doubles a record.
            "enable.idempotence": True,
            "acks": "all",
            # A few ms of linger turns one poll's worth of records into one request per partition.
            "linger.ms": 2,
            "batch.num.messages": 10000,
            "compression.type": "none",
        }
    )
    if transactional_id is not None:
        # One transactional.id per log partition: a new owner's init_transactions() fences the
        # previous owner's producer on any broker, with or without KIP-447.
        config["transactional.id"] = transactional_id
        config["transaction.timeout.ms"] = 30000
    config.update(overrides or {})
    return config


def consumer_config(
    bootstrap: str,
    group_id: str,
    *,
    session_timeout_ms: int = 6000,
    overrides: ClientOverrides | None = None,
) -> dict[str, Any]:
    """A consumer whose offsets we commit ourselves, after the effects they caused are durable."""
    config = _base(bootstrap, None)
    config.update(
        {
            "group.id": group_id,
            "enable.auto.commit": False,
            # Nothing that was written may be skipped: a new group starts at the beginning.
            "auto.offset.reset": "earliest",
            # Only records of committed transactions: a fenced zombie's writes are never seen.
            "isolation.level": "read_committed",
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": max(100, session_timeout_ms // 6),
            "enable.partition.eof": False,
            # Topics created after the consumer subscribed (e.g. a participant started before
            # 'saga topics create') are found within seconds, not librdkafka's default 5 minutes.
            "topic.metadata.refresh.interval.ms": 5000,
            # Short: right for every reader (see FETCH_WAIT_MS); long-running consumers pass
            # serving_fetch_wait_ms(), long on a broker that answers fetches when data arrives.
            "fetch.wait.max.ms": EMBEDDED_FETCH_WAIT_MS,
        }
    )
    config.update(overrides or {})
    return config


#: How long a long-running consumer's fetch may wait at the broker for data (a manager's inbox, a
#: participant's commands). Apache Kafka answers a waiting fetch as soon as data arrives, so a long
#: wait costs no latency and spares the broker answering empty fetches: measured on Kafka 4.0 with
#: one idle read_committed consumer, 10 ms cost the broker 0.45 of a core and 500 ms 0.04, and
#: commit -> receive p50 went from 16.8 to 12.5 ms. The embedded broker (Tansu 0.6) answers a fetch
#: only when its wait is over, so there the wait *is* latency: 10 ms. Short-lived readers (replay,
#: queries) always use 10 ms: they stop at the end, and a long wait would delay the end's answer.
FETCH_WAIT_MS = 500
EMBEDDED_FETCH_WAIT_MS = 10
#: Cluster ids that name the embedded broker (Tansu's default): its fetches need the short wait.
EMBEDDED_CLUSTER_IDS = frozenset({"tansu_cluster"})


def serving_fetch_wait_ms(bootstrap: str, overrides: ClientOverrides | None = None, timeout_s: float = 10.0) -> int:
    """The fetch wait for a long-running consumer of this cluster (one metadata request). The
    embedded broker, and a cluster that does not answer, get the short one (the safe choice for
    latency); ``-X fetch.wait.max.ms=N`` overrides both."""
    configured = (overrides or {}).get("fetch.wait.max.ms")
    if configured is not None:
        return int(configured)
    try:
        cluster_id = admin_client(bootstrap, overrides).list_topics(timeout=timeout_s).cluster_id
    except KafkaException:
        return EMBEDDED_FETCH_WAIT_MS
    return EMBEDDED_FETCH_WAIT_MS if cluster_id in EMBEDDED_CLUSTER_IDS else FETCH_WAIT_MS


#: For clients whose first request is on the critical path (a query's, a replay's). librdkafka
#: drops its bootstrap connection once the first metadata names the broker's id, and a request
#: in flight on it is sent again only after the "sparse connection" pause, half of
#: reconnect.backoff.ms: measured, 4 fresh clients in 10 lost 50 ms (the default 100 ms) on their
#: first request; with 10 ms they lose 11 (librdkafka's floor). Reconnecting to a broker that is
#: down still backs off exponentially, up to reconnect.backoff.max.ms.
QUICK_RETRY: Mapping[str, Any] = {"reconnect.backoff.ms": 10}


def reader_config(bootstrap: str, overrides: ClientOverrides | None = None) -> dict[str, Any]:
    """A group-less consumer for replaying a partition with ``assign()`` (no offsets committed)."""
    config = consumer_config(bootstrap, "sagalog-reader", overrides=None)
    # Not lower: measured on the embedded broker, fetch.wait.max.ms=1 slowed reading a log that
    # had seen aborted transactions to ~100 records/s (fetches answered nearly empty, then backed
    # off), which stalled takeovers for tens of seconds and made queries give up; 10 ms read the
    # same 15,000 records in 0.26 s. Brokers that answer a fetch as soon as data is there (Apache
    # Kafka) never wait it out while there is data to read.
    config.update({"enable.partition.eof": True, "fetch.wait.max.ms": 10, **QUICK_RETRY})
    config.update(overrides or {})
    return config


def where(msg: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed message or partition event. librdkafka sets all
    three on both (the type stubs say Optional because a produced message has no offset yet)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


def must_stop(err: KafkaError) -> bool:
    """Is this consumer error one a process must stop on (fatal, or a refusal only the user can fix)?"""
    return bool(err.fatal()) or err.code() in _REFUSED


def admin_client(bootstrap: str, overrides: ClientOverrides | None = None) -> AdminClient:
    return AdminClient(_base(bootstrap, overrides))


def check_reachable(bootstrap: str, timeout_s: float = 5.0, overrides: ClientOverrides | None = None) -> None:
    """Raise :class:`BrokerUnavailable` if no broker answers within ``timeout_s``."""
    admin = admin_client(bootstrap, overrides)
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as err:
        raise BrokerUnavailable(
            f"no Kafka broker answered at {bootstrap} within {timeout_s:g}s "
            f"({err.args[0].str() if err.args else err}); start one with 'saga broker' "
            f"or pass --bootstrap-servers / set SAGA_BOOTSTRAP_SERVERS"
        ) from err


def existing_topics(bootstrap: str, overrides: ClientOverrides | None = None, timeout_s: float = 10.0) -> set[str]:
    """Names of every topic (never a metadata request naming one topic: some brokers create it)."""
    try:
        return set(admin_client(bootstrap, overrides).list_topics(timeout=timeout_s).topics)
    except KafkaException as err:
        raise translate(err, f"listing topics at {bootstrap}") from err


def session_timeout_bounds(bootstrap: str, overrides: ClientOverrides | None = None) -> tuple[int, int] | None:
    """The broker's (group.min.session.timeout.ms, group.max.session.timeout.ms), or None when it
    does not describe its configs (the embedded broker, or an ACL that forbids it)."""
    from confluent_kafka.admin import ConfigResource

    admin = admin_client(bootstrap, overrides)
    try:
        brokers = admin.list_topics(timeout=10).brokers
        resource = ConfigResource(ConfigResource.Type.BROKER, str(next(iter(brokers))))
        configs = next(iter(admin.describe_configs([resource], request_timeout=5).values())).result()
        return int(configs["group.min.session.timeout.ms"].value), int(configs["group.max.session.timeout.ms"].value)
    except (KafkaException, StopIteration, KeyError, ValueError, TypeError):
        return None


def check_session_timeout(bootstrap: str, session_timeout_ms: int, overrides: ClientOverrides | None = None) -> None:
    """Refuse, before joining any group, a session timeout outside the broker's bounds (brokers that
    do not tell their bounds skip the check; the group's own refusal then stops the process)."""
    from sagalog.errors import ConfigError

    bounds = session_timeout_bounds(bootstrap, overrides)
    if bounds is not None and not bounds[0] <= session_timeout_ms <= bounds[1]:
        raise ConfigError(
            f"--session-timeout-ms {session_timeout_ms} is outside what the broker at {bootstrap} accepts: "
            f"{bounds[0]}..{bounds[1]} ms (its group.min/max.session.timeout.ms); pass a value within them"
        )


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, str]:
    """Turn ``-X key=value`` CLI pairs into a librdkafka config dict."""
    from sagalog.errors import ConfigError

    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"client setting {pair!r} is not key=value (e.g. -X security.protocol=SASL_SSL)")
        out[key.strip()] = value.strip()
    return out
