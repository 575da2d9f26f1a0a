"""Traces of sagas (OpenTelemetry): one trace per saga, across managers, participants and clients.

**Off by default**, and then nothing here runs: managers and participants hold ``None`` instead
of a :class:`Tracing` and test for it before building a header or a span. It is turned on by the
standard environment variables: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, any exporter
installed under the ``opentelemetry_traces_exporter`` entry point; a comma-separated list),
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER[_ARG]`` and each
exporter's own (``OTEL_EXPORTER_OTLP_ENDPOINT``, ...). ``OTEL_SDK_DISABLED=true`` or an unset
``OTEL_TRACES_EXPORTER`` (or ``none``) keeps it off. It needs the optional ``tracing`` extra
(``pip install 'sagalog[tracing]'``: ``opentelemetry-sdk`` and the OTLP exporter); without it a
process that is asked to trace says so once and runs without.

The shape of a saga's trace::

    [client span]                      (when the saga was started inside one)
      saga <type>                      root: started_ms .. the end (SagaEnded / SagaAborted)
        execute <step> #1              one per attempt: dispatch_at_ms .. its end (a reply, a
          <participant> execute <step>   retry, a timeout); the participant's span inside it
        execute <step> #2
        compensate <step> #1 ...

**Span identity survives a change of manager.** A manager is stateless and a saga may move to
another one mid-way, so nothing about a span lives in memory: the trace id is the client's
(its ``traceparent``, kept in the saga's snapshot as ``trace_parent``) or else derived from the
saga id and its start time; the root's and each attempt's span ids are hashes of (saga, start
time[, step, action, attempt]). So the command sent at dispatch names its parent span (the
attempt's) long before that span is emitted, and whichever manager ends the attempt emits it
with the same id and its start time from the log (``dispatch_at_ms``). Spans are exported only
after the transaction that decided them commits: a fenced or failed write emits nothing, and the
next owner, deciding again, emits them. Sampling is decided from the trace id alone (the
client's sampled flag, else ``OTEL_TRACES_SAMPLER`` on the derived id), so every manager decides
the same for a saga.

On the wire (docs/CONTRACT.md, "Tracing"): commands carry a W3C ``traceparent`` header naming
the attempt span; a participant that traces starts its span as a child of it and puts its own
``traceparent`` on the reply (the manager links the attempt span to it); a ``StartSaga`` may
carry the client's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sagalog.records import (
    Action,
    CompensationBegun,
    CompensationEnded,
    IncidentOpened,
    ParticipantCommand,
    SagaAborted,
    SagaEnded,
    SagaLogRecord,
    SagaSnapshot,
    StepBegun,
    StepEnded,
    StepOutcome,
    StepSnapshot,
    StepStatus,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Span, SpanContext

log = logging.getLogger("saga.tracing")

#: The one header of the contract: W3C Trace Context, version 00.
TRACEPARENT = "traceparent"
#: Kafka record headers as confluent-kafka takes them.
Headers = list[tuple[str, str | bytes | None]]

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_NANOS_PER_MS = 1_000_000


# --- the header ---------------------------------------------------------------------------------


def parse_traceparent(value: str | bytes | None) -> tuple[int, int, int] | None:
    """``(trace id, parent span id, flags)`` of a W3C traceparent; None if absent or invalid
    (all-zero ids, version ``ff``, or a version-00 value with extra fields)."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace, span, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags, 16)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def header(headers: Mapping[str, Any] | Sequence[tuple[str, Any]] | None, name: str = TRACEPARENT) -> Any:
    """The value of the first header called ``name`` (case-insensitively), None if none."""
    if not headers:
        return None
    for key, value in headers.items() if isinstance(headers, Mapping) else headers:
        if key.lower() == name:
            return value
    return None


def current_headers() -> Headers | None:
    """The caller's current span as a ``traceparent`` header (what :class:`SagaClient` puts on a
    ``StartSaga``), None when there is none. Free in a process that never imported OpenTelemetry:
    it can have no current span then, so nothing is imported to find out."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return [(TRACEPARENT, format_traceparent(context.trace_id, context.span_id, context.trace_flags.sampled).encode())]


# --- span identity: the same on every manager ---------------------------------------------------


def _hash(size: int, *parts: object) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=size).digest()
    return int.from_bytes(digest, "big") or 1  # zero is not a valid id


def derived_trace_id(saga_id: str, started_ms: int) -> int:
    """The trace id of a saga not started inside a trace (the start time tells apart two sagas
    that reuse an id after the first one was forgotten)."""
    return _hash(16, "saga-trace", saga_id, started_ms)


def root_span_id(saga_id: str, started_ms: int) -> int:
    return _hash(8, "saga", saga_id, started_ms)


def attempt_span_id(saga_id: str, started_ms: int, step: str, action: Action | str, attempt: int) -> int:
    return _hash(8, "attempt", saga_id, started_ms, step, str(action).lower(), attempt)


@dataclass(frozen=True, slots=True)
class SagaTrace:
    """Where a saga's spans go: its trace id, the client span it joins (if any), whether sampled."""

    trace_id: int
    root_span_id: int
    client: SpanContext | None
    sampled: bool


# --- configuration ------------------------------------------------------------------------------


def exporter_names(environ: os._Environ[str] | dict[str, str] | None = None) -> list[str]:
    """The exporters ``OTEL_TRACES_EXPORTER`` asks for; empty when tracing is off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    return [n for n in names if n != "none"]


class _Unset:
    pass


_UNSET = _Unset()
_current: Tracing | None | _Unset = _UNSET
_lock = threading.Lock()


def get(service_name: str = "sagalog") -> Tracing | None:
    """This process's tracing: what :func:`install` set, else built once from the environment
    (``service_name`` is the default for ``service.name``); None when tracing is off."""
    global _current
    current = _current
    if isinstance(current, _Unset):
        with _lock:
            if isinstance(_current, _Unset):
                _current = Tracing.from_env(service_name)
            current = _current
    return current


def install(tracing: Tracing | None) -> None:
    """Use ``tracing`` (None: off) in this process from now on, instead of the environment's
    (an application with its own exporter; tests). Managers and participants read it when built."""
    global _current
    with _lock:
        _current = tracing


def reset() -> None:
    """Forget what :func:`install` set: the next :func:`get` reads the environment again."""
    global _current
    with _lock:
        _current = _UNSET


class Tracing:
    """A span pipeline: a tracer provider for live spans (the participants' handler spans) and its
    processors, which also take the manager's spans built with chosen ids and times.

    ``batch=False`` exports each span as it ends (tests: an ``InMemorySpanExporter``).
    """

    def __init__(
        self,
        exporters: SpanExporter | Sequence[SpanExporter],
        *,
        service_name: str = "sagalog",
        batch: bool = True,
        sampler: Sampler | None = None,
    ) -> None:
        import opentelemetry.trace as api
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from sagalog.fold import pinned_definition_of

        # Bound once: the manager builds spans per decision, and imports in a function cost.
        self._api = api
        self._readable_span = ReadableSpan
        self._definition = pinned_definition_of
        self._sampled = api.TraceFlags(api.TraceFlags.SAMPLED)
        self._ok = api.Status(api.StatusCode.OK)
        self._unset = api.Status(api.StatusCode.UNSET)

        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": service_name}))
        self.provider = TracerProvider(sampler=sampler, resource=resource)  # sampler None: OTEL_TRACES_SAMPLER
        listed = [exporters] if isinstance(exporters, SpanExporter) else list(exporters)
        processor = BatchSpanProcessor if batch else SimpleSpanProcessor
        self._processors = [processor(exporter) for exporter in listed]
        for p in self._processors:
            self.provider.add_span_processor(p)
        self._resource = self.provider.resource
        self._scope = InstrumentationScope("sagalog")
        self._tracer = self.provider.get_tracer("sagalog")
        self._trace_of = lru_cache(maxsize=8192)(self._compute_trace)

    @classmethod
    def from_env(cls, service_name: str = "sagalog") -> Tracing | None:
        names = exporter_names()
        if not names:
            return None
        try:
            import opentelemetry.sdk.trace  # noqa: F401
        except ImportError:
            log.warning(
                "OTEL_TRACES_EXPORTER=%s but OpenTelemetry's SDK is not installed (pip install 'sagalog[tracing]'): "
                "tracing stays off", ",".join(names),
            )  # fmt: skip
            return None
        from importlib.metadata import entry_points

        exporters = []
        for name in names:
            found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
            if not found:
                known = sorted(ep.name for ep in entry_points(group="opentelemetry_traces_exporter"))
                log.warning("trace exporter %r is not installed (installed: %s); ignored", name, ", ".join(known))
                continue
            try:
                exporters.append(found[0].load()())
            except Exception as err:  # noqa: BLE001 - a broken exporter must not stop the process
                log.warning("trace exporter %r could not be created (%s: %s); ignored", name, type(err).__name__, err)
        if not exporters:
            return None
        log.info("tracing on: exporting to %s", ", ".join(names))
        return cls(exporters, service_name=service_name)

    def force_flush(self, timeout_ms: int = 5000) -> None:
        self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        self.provider.shutdown()

    # --- the manager: headers on commands, spans from log records ------------------------------

    def trace_of(self, saga_id: str, snapshot: SagaSnapshot) -> SagaTrace:
        return self._trace_of(saga_id, snapshot.started_ms, snapshot.trace_parent)

    def _compute_trace(self, saga_id: str, started_ms: int, trace_parent: str | None) -> SagaTrace:
        api = self._api
        parsed = parse_traceparent(trace_parent)
        client = None
        if parsed is None:
            trace_id = derived_trace_id(saga_id, started_ms)
            parent_context = None
        else:
            trace_id = parsed[0]
            client = api.SpanContext(trace_id, parsed[1], is_remote=True, trace_flags=api.TraceFlags(parsed[2] & 0xFF))
            parent_context = api.set_span_in_context(api.NonRecordingSpan(client))
        sampled = self.provider.sampler.should_sample(parent_context, trace_id, "saga").decision.is_sampled()
        return SagaTrace(trace_id, root_span_id(saga_id, started_ms), client, sampled)

    def command_headers(self, saga_id: str, snapshot: SagaSnapshot, command: ParticipantCommand) -> Headers:
        """The ``traceparent`` of a command: the attempt span it belongs to (emitted later)."""
        trace = self.trace_of(saga_id, snapshot)
        span_id = attempt_span_id(saga_id, snapshot.started_ms, command.step, command.action, command.attempt)
        return [(TRACEPARENT, format_traceparent(trace.trace_id, span_id, trace.sampled).encode())]

    def saga_spans(
        self,
        saga_id: str,
        before: SagaSnapshot | None,
        records: Sequence[SagaLogRecord],
        reply: tuple[str, Action, str | bytes | None] | None = None,
    ) -> list[ReadableSpan]:
        """The spans that one decision's records end: attempts (a step's end, a retry, a
        compensation's end or incident, an execute still in flight when its compensation begins)
        and the saga's root (its end). ``before`` is the saga before the decision; ``reply``
        (step, action, traceparent header) the participant reply that caused it, if any: the
        attempt span it ends is linked to the participant's span."""
        spans: list[ReadableSpan] = []
        for record, last, event in ((r, i == len(r.events) - 1, e) for r in records for i, e in enumerate(r.events)):
            # A record holds all of a decision's events and the snapshot after the last; the
            # states between them are folded here (none before a saga's first record).
            after = record.snapshot if last else _after(before, event, record)
            trace = self.trace_of(saga_id, record.snapshot)
            at = record.timestamp_ms
            prior = _step(before, getattr(event, "step", None))
            if not trace.sampled:
                pass
            elif isinstance(event, SagaEnded | SagaAborted):
                spans.append(self._root(saga_id, trace, record.snapshot, at, event))  # always a record's last event
            elif prior is None or before is None:
                pass  # no step, or a saga we know nothing of before this record: nothing ended
            elif isinstance(event, StepBegun) and event.attempt > 1:
                spans.append(self._attempt(saga_id, trace, before, prior, Action.EXECUTE, prior.attempt, at, "retry", event.last_error, reply))
            elif isinstance(event, StepEnded):
                outcome = event.outcome.value.lower()
                error = None if event.outcome is StepOutcome.SUCCEEDED else event.error or outcome
                spans.append(self._attempt(saga_id, trace, before, prior, Action.EXECUTE, prior.attempt, at, outcome, error, reply))
            elif isinstance(event, CompensationBegun):
                if prior.status is StepStatus.RUNNING:  # in flight when the saga aborted: never answered
                    spans.append(self._attempt(saga_id, trace, before, prior, Action.EXECUTE, prior.attempt, at, "abandoned", None, reply))
                elif event.attempt > 1 and prior.comp_budget_from != prior.comp_attempt:
                    # (equal right after an operator's retry: that attempt ended with its incident)
                    spans.append(self._attempt(saga_id, trace, before, prior, Action.COMPENSATE, prior.comp_attempt, at, "retry", event.last_error, reply))
            elif isinstance(event, CompensationEnded):
                if not any(i.step == prior.name for i in before.incidents):  # else it ended with the incident
                    spans.append(self._attempt(saga_id, trace, before, prior, Action.COMPENSATE, prior.comp_attempt, at, "compensated", None, reply))
            elif isinstance(event, IncidentOpened):
                spans.append(self._attempt(saga_id, trace, before, prior, Action.COMPENSATE, prior.comp_attempt, at, "incident", event.reason, reply))
            before = after
        return spans

    def export(self, spans: Sequence[ReadableSpan]) -> None:
        """Hand finished spans to the exporters (after the transaction that decided them)."""
        for span in spans:
            for processor in self._processors:
                processor.on_end(span)

    def _root(self, saga_id: str, trace: SagaTrace, snapshot: SagaSnapshot, end_ms: int, event: object) -> ReadableSpan:
        api = self._api
        completed = isinstance(event, SagaEnded)
        attributes: dict[str, Any] = {
            "saga.id": saga_id,
            "saga.type": snapshot.saga_type,
            "saga.outcome": "completed" if completed else "aborted",
        }
        if snapshot.reason:
            attributes["saga.reason"] = snapshot.reason
        return self._span(
            f"saga {snapshot.saga_type}",
            api.SpanContext(trace.trace_id, trace.root_span_id, is_remote=False, trace_flags=self._sampled),
            trace.client,
            api.SpanKind.INTERNAL,
            attributes,
            self._ok if completed else api.Status(api.StatusCode.ERROR, snapshot.reason or "aborted"),
            snapshot.started_ms,
            end_ms,
        )

    def _attempt(
        self,
        saga_id: str,
        trace: SagaTrace,
        snapshot: SagaSnapshot,
        step: StepSnapshot,
        action: Action,
        attempt: int,
        end_ms: int,
        outcome: str,
        error: str | None,
        reply: tuple[str, Action, str | bytes | None] | None,
    ) -> ReadableSpan:
        api = self._api
        sampled = self._sampled
        verb = action.value.lower()
        attributes: dict[str, Any] = {
            "saga.id": saga_id,
            "saga.type": snapshot.saga_type,
            "saga.step": step.name,
            "saga.action": verb,
            "saga.attempt": attempt,
            "saga.outcome": outcome,
        }
        definition = self._definition(snapshot)  # known: the manager replayed or began the saga
        spec = definition.by_name.get(step.name) if definition is not None else None
        if spec is not None:
            attributes["saga.participant"] = spec.participant
        links = []
        if reply is not None and reply[0] == step.name and reply[1] is action:
            parsed = parse_traceparent(reply[2])
            if parsed is not None:
                context = api.SpanContext(parsed[0], parsed[1], is_remote=True, trace_flags=api.TraceFlags(parsed[2] & 0xFF))
                links.append(api.Link(context, {"saga.link": "reply"}))
        if error is not None:
            status = api.Status(api.StatusCode.ERROR, error[:500])
        else:
            status = self._ok if outcome in ("succeeded", "compensated") else self._unset
        return self._span(
            f"{verb} {step.name}",
            api.SpanContext(trace.trace_id, attempt_span_id(saga_id, snapshot.started_ms, step.name, action, attempt), is_remote=False, trace_flags=sampled),
            api.SpanContext(trace.trace_id, trace.root_span_id, is_remote=False, trace_flags=sampled),
            api.SpanKind.PRODUCER,
            attributes,
            status,
            step.dispatch_at_ms,
            end_ms,
            links,
        )

    def _span(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: Any,
        attributes: dict[str, Any],
        status: Any,
        start_ms: int,
        end_ms: int,
        links: Sequence[Any] = (),
    ) -> ReadableSpan:
        start = start_ms * _NANOS_PER_MS
        return self._readable_span(
            name=name,
            context=context,
            parent=parent,
            resource=self._resource,
            attributes=attributes,
            links=links,
            kind=kind,
            status=status,
            start_time=start,
            end_time=max(start, end_ms * _NANOS_PER_MS),  # another manager's clock may be behind
            instrumentation_scope=self._scope,
        )

    # --- a participant: a span around each command it answers ---------------------------------

    @contextmanager
    def participant_span(
        self,
        participant: str,
        topic: str,
        command: ParticipantCommand,
        headers: Mapping[str, Any] | Sequence[tuple[str, Any]] | None,
    ) -> Iterator[Span | None]:
        """A span for handling one command, current while it runs (the handler's own spans nest
        in it), a child of the attempt span the command's ``traceparent`` names. None when the
        command has none (its manager does not trace): there is no trace to continue."""
        parsed = parse_traceparent(header(headers))
        if parsed is None:
            yield None
            return
        api = self._api
        parent = api.SpanContext(parsed[0], parsed[1], is_remote=True, trace_flags=api.TraceFlags(parsed[2] & 0xFF))
        verb = command.action.value.lower()
        attributes: dict[str, str | int] = {
            "saga.id": command.saga_id,
            "saga.type": command.saga_type,
            "saga.step": command.step,
            "saga.action": verb,
            "saga.attempt": command.attempt,
            "saga.participant": participant,
            "messaging.system": "kafka",
            "messaging.destination.name": topic,
        }
        with self._tracer.start_as_current_span(
            f"{participant} {verb} {command.step}",
            context=api.set_span_in_context(api.NonRecordingSpan(parent)),
            kind=api.SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            yield span

    def answered(self, span: Span, outcome: str, error: str | None) -> Headers:
        """Record how the command was answered on its span; the reply's ``traceparent``."""
        span.set_attribute("saga.outcome", outcome)
        if outcome in ("success", "replayed"):
            span.set_status(self._ok)
        elif outcome != "refused":
            span.set_status(self._api.Status(self._api.StatusCode.ERROR, (error or outcome)[:500]))
        context = span.get_span_context()
        return [(TRACEPARENT, format_traceparent(context.trace_id, context.span_id, context.trace_flags.sampled).encode())]


def _step(snapshot: SagaSnapshot | None, name: str | None) -> StepSnapshot | None:
    if snapshot is None or name is None:
        return None
    return next((s for s in snapshot.steps if s.name == name), None)


def _after(before: SagaSnapshot | None, event: Any, record: SagaLogRecord) -> SagaSnapshot | None:
    """The saga after one of a record's earlier events, folded from the state before it (None
    when that is unknown: a saga's first record begins it, and nothing before it can end)."""
    from sagalog.errors import FoldError
    from sagalog.fold import SagaState, apply  # the fold is only needed here, by managers that trace

    if not isinstance(before, SagaState):
        return None
    try:
        return apply(before, event, record.timestamp_ms, record.epoch)
    except FoldError:
        return None
