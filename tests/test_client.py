"""``sagalog.client.SagaClient`` against a real manager process and a scripted participant.

The same setup as tests/test_cli.py (whose commands are written on this client): one manager
process (session timeout 6000 ms, the default), a participant answering as ``behaviour`` says.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import FrozenInstanceError
from pathlib import Path

import confluent_kafka
import pytest
from harness import ManagerProcess, ScriptedParticipant, end_offset, reply_to, wait_for

from sagalog.client import (
    InvalidPayload,
    InvalidSagaId,
    SagaClient,
    SagaExists,
    SagaRequest,
    SagaResult,
    SagaTimeout,
    Started,
    UnknownSagaType,
)
from sagalog.config import Topics
from sagalog.definition import DefinitionSet
from sagalog.errors import BrokerUnavailable, ConfigError, SagaError
from sagalog.readmodel import SagaNotFound, partition_for
from sagalog.records import Action, ParticipantCommand, ParticipantReply, ReplyOutcome, SagaStatus
from sagalog.topics import ensure_topics

DEFINITIONS = """
sagas:
  - name: order
    payload_schema:
      type: object
      required: [amount]
      properties:
        amount: {type: integer, minimum: 1}
        hang: {type: boolean}
        stuck_compensation: {type: boolean}
    steps:
      - {name: reserve, participant: cl-stock, timeout_s: 30, retry: {attempts: 1}}
      - {name: pay, participant: cl-pay, timeout_s: 30, retry: {attempts: 1}}
  - name: ping
    steps:
      - {name: only, participant: cl-stock, timeout_s: 30}
"""
PARTICIPANTS = ["cl-stock", "cl-pay"]
PARTITIONS = 3


def behaviour(cmd: ParticipantCommand) -> list[ParticipantReply]:
    """amount > 1000: payment declined (the saga aborts); hang: reserve never answers (stays
    RUNNING); stuck_compensation: reserve's compensation never answers (stays COMPENSATING)."""
    payload = json.loads(cmd.payload)
    if cmd.action is Action.EXECUTE and cmd.step == "reserve" and payload.get("hang"):
        return []
    if cmd.action is Action.COMPENSATE and payload.get("stuck_compensation"):
        return []
    if cmd.action is Action.EXECUTE and cmd.step == "pay" and payload.get("amount", 0) > 1000:
        return [reply_to(cmd, ReplyOutcome.BUSINESS_FAILURE, error="declined: over the limit")]
    return [reply_to(cmd, output=json.dumps({"step": cmd.step, "amount": payload.get("amount")}))]


@pytest.fixture(scope="module")
def deployment(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topics, Path]]:
    tmp = tmp_path_factory.mktemp("client")
    topics = Topics(prefix=f"t.client.{uuid.uuid4().hex[:8]}")
    ensure_topics(bootstrap, topics, partitions=PARTITIONS, participants=PARTICIPANTS)
    definitions = tmp / "defs.yaml"
    definitions.write_text(DEFINITIONS)
    manager = ManagerProcess(bootstrap, topics, definitions, tmp, "m1", partitions=PARTITIONS).start()
    try:
        with ScriptedParticipant(bootstrap, topics, PARTICIPANTS, behaviour=behaviour):
            yield topics, definitions
    finally:
        manager.stop()


@pytest.fixture
def client(bootstrap: str, deployment: tuple[Topics, Path], tmp_path: Path) -> Iterator[SagaClient]:
    topics, definitions = deployment
    with SagaClient(
        bootstrap, topic_prefix=topics.prefix, definitions=DefinitionSet.load([definitions]), state_dir=tmp_path
    ) as c:
        yield c


# --- start and wait ---------------------------------------------------------------------------


def test_start_then_wait_completed_with_outputs(client: SagaClient) -> None:
    started = client.start("order", {"amount": 5})
    assert isinstance(started, Started)
    assert started.saga_type == "order" and started.saga_id.startswith("order-")
    assert started.partition == partition_for(started.saga_id.encode(), PARTITIONS)

    result = client.wait(started.saga_id, timeout_s=60)
    assert isinstance(result, SagaResult)
    assert result.status is SagaStatus.COMPLETED and result.completed and result.reason is None
    assert result.outputs == {"reserve": {"step": "reserve", "amount": 5}, "pay": {"step": "pay", "amount": 5}}
    assert result.state.saga_id == started.saga_id and result.saga_type == "order"
    with pytest.raises(FrozenInstanceError):
        result.status = SagaStatus.ABORTED  # type: ignore[misc]

    assert client.result(started.saga_id).status is SagaStatus.COMPLETED  # the alias
    assert client.status(started.saga_id).status is SagaStatus.COMPLETED
    view = client.view(started.saga_id)
    assert view.partition == started.partition and view.claim is not None
    assert [h.event_type for h in client.history(started.saga_id)][0] == "SagaBegun"
    assert started.saga_id in {s.saga_id for s in client.list(status="completed", saga_type="order", limit=0)}


def test_explicit_id_and_json_text_payload_and_aborted_outcome(client: SagaClient) -> None:
    saga_id = f"abort-{uuid.uuid4().hex[:6]}"
    started = client.start("order", '{"amount": 5000}', saga_id=saga_id)
    assert started.saga_id == saga_id
    result = client.wait(saga_id, timeout_s=60)  # ABORTED is an outcome, not an error
    assert result.status is SagaStatus.ABORTED and not result.completed
    assert "declined" in (result.reason or "")
    # A second start of the same id would be ignored by the manager: refused up front.
    with pytest.raises(SagaExists, match="exists already") as err:
        client.start("order", {"amount": 1}, saga_id=saga_id)
    assert err.value.saga_id == saga_id


def test_start_many_produces_all_with_one_flush_then_wait_all(
    client: SagaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushes: list[float] = []

    class CountingProducer(confluent_kafka.Producer):  # type: ignore[misc]
        def flush(self, *args: float) -> int:
            flushes.append(args[0] if args else -1)
            return int(super().flush(*args))

    monkeypatch.setattr(confluent_kafka, "Producer", CountingProducer)
    requests = [SagaRequest("order", {"amount": n + 1}) for n in range(50)]
    started = client.start_many(iter(requests))  # any iterable
    assert len(flushes) == 1, f"start_many flushed {len(flushes)} times"
    assert [s.saga_type for s in started] == ["order"] * 50
    assert len({s.saga_id for s in started}) == 50
    assert all(s.partition == partition_for(s.saga_id.encode(), PARTITIONS) for s in started)
    assert len({s.partition for s in started}) == PARTITIONS  # spread over the partitions

    outcomes = list(client.wait_all([s.saga_id for s in started], timeout_s=90))
    assert all(isinstance(o, SagaResult) and o.status is SagaStatus.COMPLETED for o in outcomes), outcomes
    # In request order, each with its own payload's outputs.
    assert [o.outputs["pay"]["amount"] for o in outcomes if isinstance(o, SagaResult)] == list(range(1, 51))
    for s in started[:3]:
        assert client.wait(s.saga_id, 1).status is SagaStatus.COMPLETED

    assert client.start_many([]) == []
    assert len(flushes) == 1  # nothing to send, nothing flushed


def test_wait_raises_saga_timeout_when_the_saga_cannot_finish_in_time(client: SagaClient) -> None:
    started = client.start("order", {"amount": 1, "hang": True})
    with pytest.raises(SagaTimeout) as err:
        client.wait(started.saga_id, timeout_s=1.5)
    timeout = err.value
    assert isinstance(timeout, SagaError) and timeout.retryable
    assert timeout.saga_id == started.saga_id and timeout.timeout_s == 1.5
    assert f"saga {started.saga_id} is still RUNNING (at reserve) after 1.5 s" in str(timeout)
    assert timeout.state is not None and timeout.state.status is SagaStatus.RUNNING

    # A saga that never began: no state at all.
    with pytest.raises(SagaTimeout, match="has not begun") as never:
        client.wait(f"never-{uuid.uuid4().hex[:6]}", timeout_s=0.5)
    assert never.value.state is None

    client.cancel(started.saga_id, reason="test over")  # leave nothing running
    assert client.wait(started.saga_id, 60).status is SagaStatus.ABORTED


# --- cancel -----------------------------------------------------------------------------------


def test_cancel_rules(client: SagaClient) -> None:
    running = client.start("order", {"amount": 1, "hang": True})
    wait_for(lambda: _status_or_none(client, running.saga_id), 30, "the saga to begin")

    client.cancel(running.saga_id, reason="customer changed their mind")
    result = client.wait(running.saga_id, timeout_s=60)
    assert result.status is SagaStatus.ABORTED and "customer changed their mind" in (result.reason or "")
    assert result.state.step("reserve").status == "COMPENSATED"

    with pytest.raises(ConfigError, match=r"has already finished \(ABORTED\); nothing to cancel"):
        client.cancel(running.saga_id)

    # Aborting with a compensation that never answers: stays COMPENSATING, cancel is refused.
    stuck = client.start("order", {"amount": 5000, "stuck_compensation": True})
    wait_for(lambda: _status_or_none(client, stuck.saga_id) is SagaStatus.COMPENSATING, 30, "the saga to compensate")
    with pytest.raises(ConfigError, match="already being compensated") as err:
        client.cancel(stuck.saga_id)
    assert "declined" in str(err.value)  # says why it is compensating

    with pytest.raises(SagaNotFound, match="no saga 'ghost'"):
        client.cancel("ghost")


def _status_or_none(client: SagaClient, saga_id: str) -> SagaStatus | None:
    try:
        return client.status(saga_id).status
    except SagaNotFound:
        return None


# --- queries ----------------------------------------------------------------------------------


def test_status_of_an_unknown_id_raises_saga_not_found(client: SagaClient) -> None:
    import sagalog.client

    assert sagalog.client.SagaNotFound is SagaNotFound  # re-exported
    for query in (client.status, client.view, client.history):
        with pytest.raises(SagaNotFound, match="no saga 'no-such-saga'"):
            query("no-such-saga")
    with pytest.raises(ConfigError, match="unknown saga status 'SLEEPING'"):
        client.list(status="SLEEPING")


def test_asyncio_to_thread_from_several_threads(client: SagaClient) -> None:
    """The documented way from asyncio: each worker thread gets its own read model."""

    async def run() -> list[SagaResult]:
        started = await asyncio.gather(*(asyncio.to_thread(client.start, "ping") for _ in range(6)))
        return list(await asyncio.gather(*(asyncio.to_thread(client.wait, s.saga_id, 60) for s in started)))

    results = asyncio.run(run())
    assert [r.status for r in results] == [SagaStatus.COMPLETED] * 6
    client.close()  # closes read models opened by the executor's threads too
    client.close()  # idempotent
    with pytest.raises(ConfigError, match="closed"):
        client.status(results[0].saga_id)


# --- validation: before anything is produced ------------------------------------------------


def test_validation_errors_are_raised_before_anything_is_produced(
    bootstrap: str, make_topics: Callable[..., Topics], deployment: tuple[Topics, Path], tmp_path: Path
) -> None:
    topics = make_topics(partitions=2)  # no manager here: the inbox shows exactly what was produced
    definitions = DefinitionSet.load([deployment[1]])
    with SagaClient(bootstrap, topic_prefix=topics.prefix, definitions=definitions, state_dir=tmp_path) as client:
        with pytest.raises(InvalidSagaId, match="'has spaces/and slashes' is not a valid saga id"):
            client.start("order", {"amount": 1}, saga_id="has spaces/and slashes")
        with pytest.raises(InvalidSagaId):
            client.start("order", {"amount": 1}, saga_id="x" * 201)
        with pytest.raises(UnknownSagaType, match="unknown saga type 'teleport'; known types: order, ping"):
            client.start("teleport")
        with pytest.raises(InvalidPayload, match="'amount' is a required property"):
            client.start("order", {})
        with pytest.raises(InvalidPayload, match="invalid at amount"):
            client.start("order", {"amount": -3})
        with pytest.raises(InvalidPayload, match="not valid JSON"):
            client.start("order", "{amount: 5")
        with pytest.raises(InvalidPayload, match="cannot be written as JSON"):
            client.start("order", {"amount": 1, "when": object()})
        # One bad request in a batch: nothing of the batch is produced.
        with pytest.raises(InvalidPayload, match="invalid at amount"):
            client.start_many([SagaRequest("order", {"amount": 1}), SagaRequest("order", {"amount": 0}),
                               SagaRequest("ping")])
        with pytest.raises(InvalidSagaId, match="appears twice"):
            client.start_many([SagaRequest("ping", saga_id="dup"), SagaRequest("ping", saga_id="dup")])
        for bad in (SagaRequest("teleport"), SagaRequest("order", {"amount": "x"})):
            with pytest.raises(ConfigError):
                client.validate(bad)
        client.validate(SagaRequest("order", '{"amount": 2}', "fine-1"))
        assert [end_offset(bootstrap, topics.inbox, p) for p in range(2)] == [0, 0]

        # And the same client does produce a valid request: the check above was not vacuous.
        started = client.start("order", {"amount": 1}, saga_id="fine-1")
        assert [end_offset(bootstrap, topics.inbox, p) for p in range(2)].count(1) == 1
        assert end_offset(bootstrap, topics.inbox, started.partition) == 1

    # Without definitions, types and payloads go unchecked (the managers check them), ids not.
    with SagaClient(bootstrap, topic_prefix=topics.prefix, state_dir=tmp_path) as unchecked:
        unchecked.validate(SagaRequest("anything", {"amount": -3}))
        with pytest.raises(InvalidSagaId):
            unchecked.validate(SagaRequest("anything", saga_id="a b"))


def test_missing_inbox_and_unreachable_broker(bootstrap: str, tmp_path: Path) -> None:
    nowhere = SagaClient(bootstrap, topic_prefix=f"nothing-{uuid.uuid4().hex[:6]}", state_dir=tmp_path)
    with nowhere, pytest.raises(ConfigError, match=r"inbox does not exist"):
        nowhere.start("ping")
    with SagaClient("127.0.0.1:1", state_dir=tmp_path, timeout_s=1.0) as client:
        with pytest.raises(BrokerUnavailable, match="no Kafka broker answered at 127.0.0.1:1") as err:
            client.start("ping")
        assert err.value.retryable
    with pytest.raises(ConfigError, match="not a valid topic name prefix"):
        SagaClient(bootstrap, topic_prefix="bad prefix!")


def test_importing_the_client_stays_light() -> None:
    """``saga status`` is a fresh process per call: the client must not import Kafka or SQLite."""
    code = (
        "import sys, sagalog.client; "
        "print([m for m in ('confluent_kafka', 'sqlite3', 'sagalog.readmodel', 'jsonschema') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_fatal_producer_error_met_on_close_is_reported_in_our_words() -> None:
    """Whether the refusal surfaces in produce() or in close()'s flush depends on timing: the CLI
    prints one line either way (tests/test_acls.py meets both)."""
    from confluent_kafka import KafkaError, KafkaException

    from sagalog.client import _flushed
    from sagalog.errors import BrokerRefused

    class RefusedProducer:
        def flush(self, timeout: float) -> int:
            raise KafkaException(KafkaError(KafkaError.CLUSTER_AUTHORIZATION_FAILED, "Failed to acquire idempotence PID", fatal=True))

    class SystemErrorProducer:
        def flush(self, timeout: float) -> int:
            try:
                RefusedProducer().flush(timeout)
            except KafkaException as err:
                raise SystemError("error return without exception set") from err
            return 0

    for producer in (RefusedProducer(), SystemErrorProducer()):
        err = _flushed(producer, 1.0, "delivering")
        assert isinstance(err, BrokerRefused) and "not authorized" in str(err)
