"""Shared fixtures: one Kafka-compatible broker per session, fresh topics per test.

Which broker the suite runs against is chosen with ``--kafka``:

* ``embedded`` (default): a Tansu subprocess (:class:`sagalog.broker.EmbeddedBroker`) on a
  free port, started once per session; memory storage, gone when the session ends.
* ``testcontainers``: a real Apache Kafka in Docker (image from ``$SAGA_KAFKA_IMAGE``).
* ``existing``: the cluster at ``$SAGA_BOOTSTRAP_SERVERS`` (required in this mode).

Tests that use the broker (directly or through ``topics``/``make_topics``) are marked
``kafka`` automatically, so ``-m "not kafka"`` selects the broker-free tests.
Every test gets its own topic prefix, so tests never see each other's records.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator

import pytest

from sagalog.config import BOOTSTRAP_ENV, Topics

KAFKA_MODES = ("embedded", "testcontainers", "existing")
DEFAULT_PARTITIONS = 4
KAFKA_IMAGE_ENV = "SAGA_KAFKA_IMAGE"
DEFAULT_KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
_BROKER_FIXTURES = {"bootstrap", "topics", "make_topics"}

MakeTopics = Callable[..., Topics]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kafka",
        choices=KAFKA_MODES,
        default="embedded",
        help=(
            "broker for tests marked 'kafka': embedded (Tansu subprocess, default), "
            f"testcontainers (Kafka in Docker, image ${KAFKA_IMAGE_ENV}), "
            f"existing (${BOOTSTRAP_ENV})"
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    # Fail at startup, not halfway through the run, when the chosen mode cannot work.
    if config.getoption("--kafka") == "existing" and not os.environ.get(BOOTSTRAP_ENV):
        raise pytest.UsageError(f"--kafka=existing needs ${BOOTSTRAP_ENV} (e.g. broker1:9092)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def bootstrap(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``bootstrap.servers`` of the session's broker."""
    mode = request.config.getoption("--kafka")
    if mode == "embedded":
        from sagalog.broker import EmbeddedBroker

        log = tmp_path_factory.mktemp("broker") / "tansu.log"
        with EmbeddedBroker(port=0, log_path=log) as broker:
            yield broker.bootstrap
    elif mode == "testcontainers":
        try:
            from testcontainers.community.kafka import KafkaContainer
        except ImportError:  # testcontainers < 4.10 only has the old module path
            from testcontainers.kafka import KafkaContainer  # type: ignore[no-redef]

        with KafkaContainer(os.environ.get(KAFKA_IMAGE_ENV, DEFAULT_KAFKA_IMAGE)) as kafka:
            yield kafka.get_bootstrap_server()
    else:
        yield os.environ[BOOTSTRAP_ENV]


def unique_prefix(name: str) -> str:
    """A topic prefix nobody else uses: the test's name (readable in broker tools) plus a nonce."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:40]
    return f"t.{readable}.{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_topics(bootstrap: str, request: pytest.FixtureRequest) -> MakeTopics:
    """A factory for fresh, created topics: ``make_topics(partitions=2, participants=["pay"])``.

    ``create=False`` returns unused names without creating anything (to test creation itself).
    """

    def make(
        partitions: int = DEFAULT_PARTITIONS, participants: Iterable[str] = (), *, create: bool = True
    ) -> Topics:
        from sagalog.topics import ensure_topics

        topics = Topics(prefix=unique_prefix(request.node.name))
        if create:
            ensure_topics(bootstrap, topics, partitions=partitions, participants=list(participants))
        return topics

    return make


@pytest.fixture
def topics(make_topics: MakeTopics, request: pytest.FixtureRequest) -> Topics:
    """Created topics with a unique prefix; 4 partitions unless parametrized indirectly::

    @pytest.mark.parametrize("topics", [{"partitions": 2, "participants": ["pay"]}], indirect=True)
    """
    options = getattr(request, "param", None) or {}
    return make_topics(**options)
