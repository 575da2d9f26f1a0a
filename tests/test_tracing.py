"""Traces (OpenTelemetry): one trace per saga, a root span, a span per attempt, the participants'
spans inside them, and a client's trace that a saga joins.

First the span identity and the spans a manager builds from log records, without Kafka (the
records come from the manager's own pure decisions); then a real manager and a real SDK
participant, in-process, with the SDK's in-memory exporter.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="tracing needs the 'tracing' extra (opentelemetry-sdk)")

from harness import wait_for  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from manager import decide  # noqa: E402
from sagalog import tracing  # noqa: E402
from sagalog.definition import DefinitionSet, SagaDefinition  # noqa: E402
from sagalog.fold import SagaState  # noqa: E402
from sagalog.records import (  # noqa: E402
    Action,
    IncidentAction,
    OperatorAction,
    ParticipantCommand,
    ParticipantReply,
    ReplyOutcome,
    StartSaga,
)

FAST_RETRY = {"attempts": 3, "backoff_initial_s": 0.05, "backoff_max_s": 0.1, "jitter": 0}


def definition(participant: str = "shop") -> SagaDefinition:
    return SagaDefinition(
        name="traced",
        steps=[
            {"name": "reserve", "participant": participant, "retry": FAST_RETRY, "timeout_s": 30},
            {"name": "charge", "participant": participant, "timeout_s": 30},
        ],
        compensation_retry=FAST_RETRY,
    )


def in_memory() -> tuple[tracing.Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return tracing.Tracing(exporter, batch=False, service_name="test"), exporter


# --- the header and span identity --------------------------------------------------------------


def test_traceparent_parsing_follows_w3c() -> None:
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert tracing.parse_traceparent(good) == (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, 1)
    assert tracing.parse_traceparent(good.encode()) == tracing.parse_traceparent(good)
    assert tracing.format_traceparent(*tracing.parse_traceparent(good)[:2], True) == good  # type: ignore[index]
    assert tracing.parse_traceparent("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more") is not None  # a later version
    for bad in (None, "", "garbage", good.upper(), good + "-more", "ff" + good[2:],
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", b"\xff\xfe"):
        assert tracing.parse_traceparent(bad) is None, bad
    assert tracing.header([("other", b"x"), ("TraceParent", good.encode())]) == good.encode()
    assert tracing.header(None) is None


def test_off_unless_the_environment_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert tracing.exporter_names() == []
    tracing.reset()
    try:
        assert tracing.get() is None  # nothing set: managers and participants hold None
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
        assert tracing.exporter_names() == []
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console, otlp")
        assert tracing.exporter_names() == ["console", "otlp"]
        monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
        assert tracing.exporter_names() == []
        monkeypatch.delenv("OTEL_SDK_DISABLED")
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,no-such-exporter")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout-managers")
        tracing.reset()
        built = tracing.get("saga-manager")
        assert built is not None and built.provider.resource.attributes["service.name"] == "checkout-managers"
        built.shutdown()
    finally:
        tracing.reset()


def test_span_ids_depend_only_on_the_log() -> None:
    trace = tracing.derived_trace_id("s-1", 1000)
    assert trace == tracing.derived_trace_id("s-1", 1000) and trace.bit_length() <= 128
    assert trace != tracing.derived_trace_id("s-1", 1001)  # the same id reused later: another trace
    ids = {tracing.attempt_span_id("s-1", 1000, step, action, attempt)
           for step in ("a", "b") for action in Action for attempt in (1, 2)}
    assert len(ids) == 8 and tracing.root_span_id("s-1", 1000) not in ids


# --- the spans a manager builds from one saga's records ----------------------------------------


def reply(saga_id: str, step: str, action: Action, attempt: int, outcome: ReplyOutcome = ReplyOutcome.SUCCESS) -> ParticipantReply:
    ok = outcome is ReplyOutcome.SUCCESS
    return ParticipantReply(
        command_id=ParticipantCommand.make_id(saga_id, step, action), saga_id=saga_id, step=step, action=action,
        attempt=attempt, epoch=1, outcome=outcome, output="{}" if ok else None, error=None if ok else "nope",
        participant="shop", replied_ms=0,
    )  # fmt: skip


class Saga:
    """One saga driven through the manager's pure decisions; every decision's records go through
    :meth:`Tracing.saga_spans`, as the runtime does, and every command through ``command_headers``
    of *another* Tracing (a manager that dispatched before a takeover)."""

    def __init__(self, emitter: tracing.Tracing, dispatcher: tracing.Tracing, saga_id: str = "s-1") -> None:
        self.emitter, self.dispatcher, self.saga_id = emitter, dispatcher, saga_id
        self.definitions = DefinitionSet([definition()])
        self.state: SagaState | None = None
        self.now = 1_000_000
        self.spans: list[ReadableSpan] = []
        self.parents: dict[tuple[str, str, int], int] = {}  # (step, action, attempt) -> span id on the command

    def feed(self, item: object | None, at: int) -> None:
        self.now = at
        ctx = decide.Context(now_ms=at, epoch=1, reply_topic="inbox", reply_partition=0)
        if item is None:
            assert self.state is not None
            decision = decide.on_time(self.state, ctx)
        else:
            decision = decide.on_inbox(self.state, False, item, self.definitions, ctx)
        assert decision.ignored is None, decision.ignored
        link = (item.step, item.action, None) if isinstance(item, ParticipantReply) else None
        self.spans += self.emitter.saga_spans(self.saga_id, self.state, decision.records, link)
        self.state = decision.current
        for _, command in [*decision.commands, *decide.outstanding_commands(self.state, ctx)]:
            (_, value), = self.dispatcher.command_headers(self.saga_id, self.state, command)
            parsed = tracing.parse_traceparent(value)
            assert parsed is not None
            self.parents[(command.step, command.action.value.lower(), command.attempt)] = parsed[1]

    def start(self) -> None:
        self.feed(StartSaga(saga_id=self.saga_id, saga_type="traced", payload="{}", requested_ms=0), 1_000_000)

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]


def attempt_of(span: ReadableSpan) -> int:
    assert span.attributes is not None
    return int(span.attributes["saga.attempt"])  # type: ignore[arg-type]


def test_a_saga_that_retries_and_compensates_gives_one_tree() -> None:
    (emitter, _), (dispatcher, _) = in_memory(), in_memory()
    saga = Saga(emitter, dispatcher)
    saga.start()
    saga.feed(reply("s-1", "reserve", Action.EXECUTE, 1, ReplyOutcome.RETRYABLE_ERROR), 1_000_100)
    assert saga.state is not None
    retry_at = saga.state.step("reserve").dispatch_at_ms
    saga.feed(None, retry_at)  # the backoff passes: attempt 2 is sent
    saga.feed(reply("s-1", "reserve", Action.EXECUTE, 2), retry_at + 200)
    saga.feed(reply("s-1", "charge", Action.EXECUTE, 1, ReplyOutcome.BUSINESS_FAILURE), retry_at + 300)
    saga.feed(reply("s-1", "reserve", Action.COMPENSATE, 1), retry_at + 400)
    assert saga.state.status == "ABORTED"

    trace_id = tracing.derived_trace_id("s-1", 1_000_000)
    root_id = tracing.root_span_id("s-1", 1_000_000)
    assert {s.context.trace_id for s in saga.spans} == {trace_id}  # type: ignore[union-attr]
    (root,) = saga.named("saga traced")
    assert root.context.span_id == root_id and root.parent is None  # type: ignore[union-attr]
    assert (root.start_time, root.end_time) == (1_000_000 * 10**6, (retry_at + 400) * 10**6)
    assert root.status.status_code is StatusCode.ERROR and root.attributes["saga.outcome"] == "aborted"  # type: ignore[index]

    attempts = [s for s in saga.spans if s is not root]
    assert sorted((s.name, attempt_of(s)) for s in attempts) == [
        ("compensate reserve", 1), ("execute charge", 1), ("execute reserve", 1), ("execute reserve", 2)
    ]
    for span in attempts:
        assert span.parent is not None and span.parent.span_id == root_id
        assert span.kind is SpanKind.PRODUCER
        action = span.attributes["saga.action"]  # type: ignore[index]
        # The command sent at dispatch named exactly this span as its parent.
        assert span.context.span_id == saga.parents[(span.attributes["saga.step"], action, attempt_of(span))]  # type: ignore[index, union-attr]
    first, second = sorted(saga.named("execute reserve"), key=attempt_of)
    assert first.status.status_code is StatusCode.ERROR and first.attributes["saga.outcome"] == "retry"  # type: ignore[index]
    assert (first.start_time, first.end_time) == (1_000_000 * 10**6, 1_000_100 * 10**6)
    assert second.start_time == retry_at * 10**6 and second.status.status_code is StatusCode.OK  # starts after the backoff
    assert saga.named("execute charge")[0].status.status_code is StatusCode.ERROR
    assert saga.named("compensate reserve")[0].attributes["saga.outcome"] == "compensated"  # type: ignore[index]


def test_an_incident_ends_its_attempt_once() -> None:
    (emitter, _), (dispatcher, _) = in_memory(), in_memory()
    saga = Saga(emitter, dispatcher)
    saga.start()
    saga.feed(reply("s-1", "reserve", Action.EXECUTE, 1), 1_000_100)
    saga.feed(reply("s-1", "charge", Action.EXECUTE, 1, ReplyOutcome.BUSINESS_FAILURE), 1_000_200)
    saga.feed(reply("s-1", "reserve", Action.COMPENSATE, 1, ReplyOutcome.BUSINESS_FAILURE), 1_000_300)  # an incident
    assert saga.state is not None and saga.state.incident("reserve") is not None
    retry = OperatorAction(saga_id="s-1", action=IncidentAction.RETRY, step="reserve", operator="ada", reason="fixed", requested_ms=0)
    saga.feed(retry, 1_000_400)
    saga.feed(reply("s-1", "reserve", Action.COMPENSATE, 2), 1_000_500)
    assert saga.state.status == "ABORTED"
    compensations = sorted(saga.named("compensate reserve"), key=attempt_of)
    assert [(attempt_of(s), s.attributes["saga.outcome"]) for s in compensations] == [(1, "incident"), (2, "compensated")]  # type: ignore[index]
    assert compensations[1].start_time == 1_000_400 * 10**6  # sent at once on the operator's retry


# --- a real manager and a real participant -----------------------------------------------------


@pytest.fixture
def traced() -> Iterator[tuple[tracing.Tracing, InMemorySpanExporter]]:
    tr, exporter = in_memory()
    tracing.install(tr)  # the manager and the participant built below read it
    try:
        yield tr, exporter
    finally:
        tracing.reset()
        tr.shutdown()


def test_a_saga_is_one_trace_across_manager_participant_and_client(bootstrap: str, make_topics, tmp_path: Path, traced) -> None:
    from manager.runtime import Manager, ManagerSettings
    from participants import BusinessFailure, Participant, SqliteStore, StepContext, TransientFailure
    from sagalog.client import SagaClient

    tr, exporter = traced
    name = f"shop-{uuid.uuid4().hex[:6]}"
    topics = make_topics(partitions=2, participants=[name])
    manager = Manager(ManagerSettings(
        bootstrap=bootstrap, definitions=DefinitionSet([definition(name)]), topics=topics, group_id=f"{topics.prefix}-g",
    ))  # fmt: skip
    participant = Participant(name, topics=topics, bootstrap=bootstrap, store=SqliteStore(tmp_path / "shop.db"), poll_timeout_s=0.1)

    @participant.execute("reserve")
    def reserve(ctx: StepContext, tx: sqlite3.Connection) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise TransientFailure("warehouse busy")
        return {"reserved": True}

    @participant.compensate("reserve")
    def release(ctx: StepContext, tx: sqlite3.Connection) -> None:
        return None

    @participant.execute("charge")
    def charge(ctx: StepContext, tx: sqlite3.Connection) -> None:
        raise BusinessFailure("card declined")

    threads = [threading.Thread(target=manager.run, daemon=True), threading.Thread(target=participant.run, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(manager.owned) == 2 and len(participant.assigned) == 2, 60, "the manager and participant to be assigned")
        with SagaClient(bootstrap, topic_prefix=topics.prefix, state_dir=tmp_path / "state", timeout_s=30) as client:
            with tr.provider.get_tracer("test").start_as_current_span("checkout") as checkout:
                in_trace = client.start("traced").saga_id
            alone = client.start("traced").saga_id  # no current span: a trace of its own
            for saga_id in (in_trace, alone):
                assert client.wait(saga_id, timeout_s=60).status == "ABORTED"
            state, alone_state = client.status(in_trace), client.status(alone)
            assert alone_state.trace_parent is None

        def root_of(saga_id: str) -> ReadableSpan | None:
            return next((s for s in exporter.get_finished_spans() if s.name == "saga traced"
                         and s.attributes is not None and s.attributes["saga.id"] == saga_id), None)

        wait_for(lambda: root_of(in_trace) and root_of(alone), 30, "both root spans")
        spans = exporter.get_finished_spans()
    finally:
        participant.stop()
        manager.stop()
        for thread in threads:
            thread.join(30)

    client_ctx = checkout.get_span_context()
    assert state.trace_parent == tracing.format_traceparent(client_ctx.trace_id, client_ctx.span_id, True)

    def of(saga_id: str) -> list[ReadableSpan]:
        return [s for s in spans if s.attributes is not None and s.attributes.get("saga.id") == saga_id]

    # The client-started saga: in the client's trace, its root a child of the client's span.
    mine = of(in_trace)
    assert {s.context.trace_id for s in mine} == {client_ctx.trace_id}  # type: ignore[union-attr]
    root = root_of(in_trace)
    assert root is not None and root.parent is not None and root.parent.span_id == client_ctx.span_id
    root_id = root.context.span_id  # type: ignore[union-attr]
    assert root_id == tracing.root_span_id(in_trace, state.started_ms)
    attempts = {(s.name, attempt_of(s)): s for s in mine if s.kind is SpanKind.PRODUCER}
    assert sorted(attempts) == [("compensate reserve", 1), ("execute charge", 1), ("execute reserve", 1), ("execute reserve", 2)]
    for span in attempts.values():
        assert span.parent is not None and span.parent.span_id == root_id
    handlers = [s for s in mine if s.kind is SpanKind.CONSUMER]
    assert sorted((s.name, attempt_of(s)) for s in handlers) == [
        (f"{name} compensate reserve", 1), (f"{name} execute charge", 1), (f"{name} execute reserve", 1), (f"{name} execute reserve", 2)
    ]
    for span in handlers:  # each participant span is a child of the attempt span its command named
        attempt = attempts[(span.name.removeprefix(f"{name} "), attempt_of(span))]
        assert span.parent is not None and span.parent.span_id == attempt.context.span_id  # type: ignore[union-attr]
        assert span.start_time >= attempt.start_time  # type: ignore[operator]
    outcomes = {(s.name, attempt_of(s)): s.attributes["saga.outcome"] for s in handlers}  # type: ignore[index]
    assert outcomes[(f"{name} execute reserve", 1)] == "retryable_error"
    assert outcomes[(f"{name} execute charge", 1)] == "business_failure"
    # The reply's traceparent: the attempt it ended links to the participant's span.
    linked = {link.context.span_id for s in attempts.values() for link in s.links}
    assert {s.context.span_id for s in handlers} <= linked  # type: ignore[union-attr]

    # The saga started outside any span: a trace of its own, derived from its id and start.
    theirs = of(alone)
    alone_root = root_of(alone)
    assert alone_root is not None and alone_root.parent is None
    assert {s.context.trace_id for s in theirs} == {alone_root.context.trace_id}  # type: ignore[union-attr]
    assert alone_root.context.trace_id != client_ctx.trace_id  # type: ignore[union-attr]
    assert alone_root.context.trace_id == tracing.derived_trace_id(alone, alone_state.started_ms)  # type: ignore[union-attr]
    assert len(theirs) == 9  # root, 4 attempts, 4 participant spans
