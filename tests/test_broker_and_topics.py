"""The embedded broker, topic administration and their CLI commands, against a real broker."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from click.testing import CliRunner
from confluent_kafka.admin import AdminClient, ClusterMetadata, ConfigResource, NewTopic, ResourceType

import sagacli.cli.broker
import sagacli.cli.topics  # noqa: F401 - registers `saga topics` on the group
from sagacli.cli import cli
from sagalog.broker import EmbeddedBroker, free_port
from sagalog.config import Topics
from sagalog.errors import BrokerError, BrokerUnavailable, ConfigError, TopicMismatch
from sagalog.kafka import check_reachable
from sagalog.topics import describe, ensure_topics, partition_count, quiet_client

# -- helpers ------------------------------------------------------------------------------


def create_raw(bootstrap: str, topics: dict[str, tuple[int, dict[str, str]]]) -> None:
    """Create topics behind ensure_topics' back, to set up pre-existing (possibly wrong) shapes."""
    admin = AdminClient({"bootstrap.servers": bootstrap, **quiet_client()})
    futures = admin.create_topics(
        [NewTopic(name, n, 1, config=config) for name, (n, config) in topics.items()], request_timeout=10
    )
    for future in futures.values():
        future.result()


def all_names(topics: Topics, *participants: str) -> list[str]:
    return [topics.log, topics.inbox, topics.dead_letters, *(topics.commands(p) for p in participants)]


def short_prefix() -> str:
    """Short enough that rich never wraps the topic names in an 80-column table."""
    return f"cli{uuid.uuid4().hex[:8]}"


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, list(args))


# -- ensure_topics / describe -------------------------------------------------------------


def test_ensure_topics_creates_then_verifies(bootstrap, make_topics):
    topics = make_topics(create=False)

    first = ensure_topics(bootstrap, topics, partitions=3, participants=["pay"])
    assert first.created == all_names(topics, "pay")
    assert first.partitions == 3
    assert first.warnings == []
    assert first[topics.log].cleanup_policy == "compact"
    assert first[topics.inbox].cleanup_policy == "delete"

    second = ensure_topics(bootstrap, topics, partitions=3, participants=["pay"])
    assert second.created == []
    assert second.verified == all_names(topics, "pay")
    assert [r.partitions for r in second.results] == [3, 3, 3, 3]

    # The log's settings as the broker reports them, not as we remember them.
    admin = AdminClient({"bootstrap.servers": bootstrap, **quiet_client()})
    [future] = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topics.log)]).values()
    assert future.result()["cleanup.policy"].value == "compact"


def test_topic_created_by_someone_else_in_between_counts_as_verified(bootstrap, make_topics):
    """TOPIC_ALREADY_EXISTS (lost creation race) is success, and the topic is still verified."""
    topics = make_topics(create=False)
    create_raw(bootstrap, {topics.log: (2, {"cleanup.policy": "compact"}), topics.inbox: (2, {})})
    real = AdminClient({"bootstrap.servers": bootstrap, **quiet_client()})

    class StaleFirstListing:
        """Answers the first metadata request as if the topics did not exist yet."""

        def __init__(self) -> None:
            self.calls = 0

        def list_topics(self, *args, **kwargs):
            self.calls += 1
            return ClusterMetadata() if self.calls == 1 else real.list_topics(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    report = ensure_topics(StaleFirstListing(), topics, partitions=2)  # type: ignore[arg-type]
    assert report[topics.log].action == "verified"
    assert report[topics.inbox].action == "verified"
    assert report[topics.dead_letters].action == "created"


def test_concurrent_ensure_topics_all_succeed(bootstrap, make_topics):
    topics = make_topics(create=False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ensure_topics(bootstrap, topics, partitions=2, participants=["pay"])
        except BaseException as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert describe(bootstrap, topics) == dict.fromkeys(sorted(all_names(topics, "pay")), 2)


def test_log_and_inbox_partition_mismatch_is_refused(bootstrap, make_topics):
    topics = make_topics(create=False)
    create_raw(bootstrap, {topics.log: (4, {"cleanup.policy": "compact"}), topics.inbox: (2, {})})

    with pytest.raises(TopicMismatch) as caught:
        ensure_topics(bootstrap, topics, partitions=4)
    message = str(caught.value)
    assert "4 partitions" in message and "has 2" in message
    assert topics.log in message and topics.inbox in message
    # Nothing was created on the way to the error.
    assert topics.dead_letters not in describe(bootstrap, topics)


def test_requested_count_differing_from_existing_log_is_refused(bootstrap, topics):
    with pytest.raises(TopicMismatch, match="--partitions 4"):
        ensure_topics(bootstrap, topics, partitions=6)


def test_existing_log_that_is_not_compacted_is_refused(bootstrap, make_topics):
    topics = make_topics(create=False)
    create_raw(bootstrap, {topics.log: (2, {"cleanup.policy": "delete"})})

    with pytest.raises(TopicMismatch, match="cleanup.policy=compact"):
        ensure_topics(bootstrap, topics, partitions=2)


def test_command_topic_with_other_partition_count_is_only_a_warning(bootstrap, make_topics):
    topics = make_topics(partitions=4)
    create_raw(bootstrap, {topics.commands("pay"): (1, {})})

    report = ensure_topics(bootstrap, topics, partitions=4, participants=["pay"])
    assert report[topics.commands("pay")].partitions == 1
    [warning] = report.warnings
    assert topics.commands("pay") in warning and "1 partitions" in warning


@pytest.mark.parametrize("topics", [{"partitions": 3, "participants": ["pay", "ship"]}], indirect=True)
def test_describe_returns_partition_counts(bootstrap, topics):
    assert describe(bootstrap, topics) == dict.fromkeys(sorted(all_names(topics, "pay", "ship")), 3)
    assert partition_count(bootstrap, topics) == 3


def test_describe_never_creates_topics(bootstrap, make_topics):
    topics = make_topics(create=False)
    assert describe(bootstrap, topics) == {}
    with pytest.raises(TopicMismatch, match="saga topics create"):
        partition_count(bootstrap, topics)
    assert describe(bootstrap, topics) == {}


def test_bad_arguments_are_config_errors(bootstrap, make_topics):
    topics = make_topics(create=False)
    with pytest.raises(ConfigError, match="partitions"):
        ensure_topics(bootstrap, topics, partitions=0)
    with pytest.raises(ConfigError, match="participant"):
        ensure_topics(bootstrap, topics, partitions=1, participants=["no spaces"])


def test_unreachable_broker_fails_fast():
    nowhere = f"127.0.0.1:{free_port()}"
    for call in (
        lambda: ensure_topics(nowhere, Topics(prefix="x"), partitions=1, timeout_s=2),
        lambda: describe(nowhere, Topics(prefix="x"), timeout_s=2),
    ):
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="saga broker"):
            call()
        assert time.monotonic() - started < 10


# -- EmbeddedBroker -----------------------------------------------------------------------


@pytest.mark.kafka
def test_embedded_broker_starts_answers_and_releases_its_port():
    with EmbeddedBroker(port=0) as broker:
        assert broker.running
        check_reachable(broker.bootstrap, timeout_s=5)
        port = broker.port
    assert not broker.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.kafka
def test_embedded_broker_on_a_taken_port_is_a_config_error():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} .* already in use"):
            EmbeddedBroker(port=port).start()


def test_missing_broker_binary_is_a_broker_error(monkeypatch):
    monkeypatch.setenv("CALF_TANSU_BIN", "/nonexistent/tansu")
    with pytest.raises(BrokerError, match="binary not found"):
        EmbeddedBroker(port=0).start()


# -- saga broker (a real process) ---------------------------------------------------------


def _read_lines(stream, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@pytest.mark.kafka
@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_saga_broker_command_serves_until_signalled(stop_signal):
    prefix = short_prefix()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sagacli.cli",
            "broker",
            "--port",
            "0",
            "--create-topics",
            "--partitions",
            "3",
            "--topic-prefix",
            prefix,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        output: list[str] = []
        while not any(line.startswith("topics ready") for line in output):
            remaining = deadline - time.monotonic()
            assert remaining > 0 and proc.poll() is None, f"no ready line; output: {output}"
            try:
                output.append(lines.get(timeout=remaining))
            except queue.Empty:
                pytest.fail(f"no ready line within 30 s; output: {output}")
        ready = output[0]
        assert ready.startswith("broker ready at 127.0.0.1:") and "memory storage" in ready
        bootstrap = ready.split()[3]

        check_reachable(bootstrap, timeout_s=5)
        assert partition_count(bootstrap, Topics(prefix=prefix)) == 3

        started = time.monotonic()
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 5
        with pytest.raises(ConnectionRefusedError):  # the broker went with it
            socket.create_connection(("127.0.0.1", int(bootstrap.rsplit(":", 1)[1])), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.kafka
def test_saga_broker_command_on_a_taken_port_is_one_line():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        result = invoke("broker", "--port", str(squatter.getsockname()[1]))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: port") and result.stderr.count("\n") == 1


# -- saga topics (CliRunner) --------------------------------------------------------------


def test_saga_topics_create_and_describe(bootstrap):
    prefix = short_prefix()
    topics = Topics(prefix=prefix)

    first = invoke(
        "topics",
        "create",
        "-b",
        bootstrap,
        "--topic-prefix",
        prefix,
        "--partitions",
        "3",
        "--participant",
        "pay",
        "-X",
        "client.id=saga-test",
    )
    assert first.exit_code == 0, first.output
    for name in all_names(topics, "pay"):
        assert name in first.stdout
    assert first.stdout.count("created") == 4

    again = invoke(
        "topics",
        "create",
        "-b",
        bootstrap,
        "--topic-prefix",
        prefix,
        "--partitions",
        "3",
        "--participant",
        "pay",
    )
    assert again.exit_code == 0, again.output
    assert again.stdout.count("verified") == 4 and "created" not in again.stdout

    shown = invoke("topics", "describe", "-b", bootstrap, "--topic-prefix", prefix)
    assert shown.exit_code == 0, shown.output
    assert topics.commands("pay") in shown.stdout and "missing" not in shown.stdout


def test_saga_topics_errors_are_one_line_without_traceback(bootstrap):
    prefix = short_prefix()
    assert (
        invoke("topics", "create", "-b", bootstrap, "--topic-prefix", prefix, "--partitions", "3").exit_code
        == 0
    )

    cases = {
        # A shape conflict is a user mistake: exit 2.
        2: ("topics", "create", "-b", bootstrap, "--topic-prefix", prefix, "--partitions", "5"),
        # Nothing listening is worth retrying: exit 3, and well within the timeout's bound.
        3: ("topics", "create", "-b", f"127.0.0.1:{free_port()}", "--timeout", "2"),
    }
    for code, args in cases.items():
        started = time.monotonic()
        result = invoke(*args)
        assert time.monotonic() - started < 10
        assert result.exit_code == code, result.output
        assert isinstance(result.exception, SystemExit)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.output

    bad = invoke("topics", "create", "-b", bootstrap, "-X", "no-equals-sign")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: client setting")


def test_a_topic_counts_as_created_only_once_every_partition_has_a_leader():
    """Apache Kafka lists a new topic before it has created every partition's log; writing then
    raced partition creation, and three acknowledged starts never reached the inbox (RELIABILITY.md)."""
    from types import SimpleNamespace

    from sagalog.topics import _partition_counts

    def part(leader: int) -> SimpleNamespace:
        return SimpleNamespace(leader=leader, error=None)

    metadata = SimpleNamespace(topics={
        "ready": SimpleNamespace(partitions={0: part(1), 1: part(1)}),
        "half": SimpleNamespace(partitions={0: part(1), 1: part(-1)}),
        "empty": SimpleNamespace(partitions={}),
    })
    admin = SimpleNamespace(list_topics=lambda timeout: metadata)
    assert _partition_counts(admin, 1.0) == {"ready": 2, "half": 2}  # type: ignore[arg-type]
    assert _partition_counts(admin, 1.0, led=True) == {"ready": 2}  # type: ignore[arg-type]


def test_long_running_consumers_wait_long_only_where_the_broker_answers_fetches_early(bootstrap: str, request: pytest.FixtureRequest) -> None:
    from confluent_kafka.admin import AdminClient

    from sagalog.kafka import (
        EMBEDDED_CLUSTER_IDS,
        EMBEDDED_FETCH_WAIT_MS,
        FETCH_WAIT_MS,
        serving_fetch_wait_ms,
    )

    embedded = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).cluster_id in EMBEDDED_CLUSTER_IDS
    assert embedded == (request.config.getoption("--kafka") == "embedded")  # the suite's broker, told apart
    assert serving_fetch_wait_ms(bootstrap) == (EMBEDDED_FETCH_WAIT_MS if embedded else FETCH_WAIT_MS)
    assert serving_fetch_wait_ms(bootstrap, {"fetch.wait.max.ms": "77"}) == 77  # -X wins, and asks nothing
    assert serving_fetch_wait_ms("127.0.0.1:1", timeout_s=0.5) == EMBEDDED_FETCH_WAIT_MS  # nobody answers
