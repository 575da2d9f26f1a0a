"""Kafka plumbing: client configurations (each value says why) and the one place where
confluent-kafka errors become ours.

Nothing else in the project should catch ``KafkaException``: call :func:`translate`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from sagalog.errors import BrokerError, BrokerUnavailable, Fenced

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
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
}


def translate(err: KafkaException | KafkaError, doing: str) -> BrokerError:
    """Map a confluent-kafka error to ours, keeping librdkafka's retriable/fatal verdicts."""
    kerr = err.args[0] if isinstance(err, KafkaException) and err.args else err
    if not isinstance(kerr, KafkaError):
        return BrokerError(f"{doing}: {err}")
    code = kerr.code()
    text = f"{doing}: {kerr.str()}"
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
            # Deliver up to this many per poll; keep fetches small enough for low latency.
            "fetch.wait.max.ms": 10,
        }
    )
    config.update(overrides or {})
    return config


def reader_config(bootstrap: str, overrides: ClientOverrides | None = None) -> dict[str, Any]:
    """A group-less consumer for replaying a partition with ``assign()`` (no offsets committed)."""
    config = consumer_config(bootstrap, "sagalog-reader", overrides=None)
    # Not lower: measured on the embedded broker, fetch.wait.max.ms=1 slowed reading a log that
    # had seen aborted transactions to ~100 records/s (fetches answered nearly empty, then backed
    # off), which stalled takeovers for tens of seconds and made queries give up; 10 ms read the
    # same 15,000 records in 0.26 s. Brokers that answer a fetch as soon as data is there (Apache
    # Kafka) never wait it out while there is data to read.
    config.update({"enable.partition.eof": True, "fetch.wait.max.ms": 10})
    config.update(overrides or {})
    return config


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
