"""Write the golden saga logs in this directory. Only rerun deliberately.

The ``*.log.jsonl`` files are recorded saga-log partitions: one line per Kafka message,
``{"offset": n, "key": <utf-8 key>, "value": <base64 of the encoded record> | null}`` (null: a
tombstone). ``*.expected.json`` holds what replaying the log must give: every saga's state,
the partition's owner epoch, and which offsets are rejected. ``tests/test_golden.py`` replays
the bytes with the *current* codec and fold and compares.

They are data, not a snapshot of the code: a change to the schemas or to the fold that makes
an old log replay differently must fail that test. So do not regenerate them to make the test
pass. Regenerate only when the log format changes on purpose *and* old logs need not be read
any more (then say so in the commit), or to add a new log (add a new scenario here, keep the
old files unchanged)::

    python tests/golden/make_golden.py            # writes missing files only
    python tests/golden/make_golden.py --force    # rewrites every file

Scenarios (one log each):

* ``happy_path``: a 3-step order saga, every step succeeds.
* ``business_failure``: the third step fails (business failure); the two done steps are
  compensated in reverse order, the first compensation once retried.
* ``timeout_retry``: written across a rolling upgrade. Manager A writes with schema v1 (no
  ``writer`` field, ``schemas/history/saga_log_record.v1.avsc``); a step times out and is
  retried; manager B (schema v2) claims the partition with epoch 2; a record that the paused
  manager A writes after the claim is a zombie's and is rejected; B retries a timed-out step
  and the saga completes. (Begun by a v1 writer, the saga keeps its definition inline to its
  end; sagas of the other scenarios pin theirs by reference, after a definition record, when
  written by today's code.)
* ``dag_abort``: a DAG: ``budget`` and a non-compensable ``audit`` first, then ``flight``,
  ``hotel`` and ``car`` in parallel, ``confirm`` last. ``hotel`` fails while ``car`` is in
  flight: ``flight`` and ``car`` are compensated in parallel, then ``budget``; ``audit`` stays
  SUCCEEDED and ``confirm`` PENDING. A second, finished saga on the same partition is
  tombstoned.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path
from typing import Any

import fastavro

from sagalog.codec import MAGIC, Codec, schema_fingerprint, schemas_dir
from sagalog.definition import RetryPolicy, SagaDefinition, StepDefinition
from sagalog.fold import PartitionFold, SagaState, apply, begin, definition_record
from sagalog.records import (
    CompensationBegun,
    CompensationEnded,
    PartitionClaim,
    SagaAborted,
    SagaAborting,
    SagaDefinitionRecord,
    SagaEnded,
    SagaLogRecord,
    StepBegun,
    StepEnded,
    StepOutcome,
)

HERE = Path(__file__).resolve().parent
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
CODEC = Codec()


def encode_v1(record: SagaLogRecord) -> bytes:
    """Bytes as a manager on schema version 1 wrote them."""
    raw = json.loads((schemas_dir() / "history" / "saga_log_record.v1.avsc").read_text())
    datum = record.model_dump()
    assert datum.pop("writer") is None
    assert datum["snapshot"].pop("definition_id") == "", "a v1 writer pins its definition inline"
    datum["event"] = (record.event.AVRO_NAME, datum["event"])
    out = io.BytesIO()
    out.write(MAGIC + schema_fingerprint(raw))
    fastavro.schemaless_writer(out, fastavro.parse_schema(raw, _force=True), datum)
    return out.getvalue()


class Log:
    """One partition being written: messages in offset order."""

    def __init__(self, partition: int = 0) -> None:
        self.partition = partition
        self.messages: list[tuple[bytes, bytes | None]] = []
        self.now = T0

    def tick(self, ms: int) -> int:
        self.now += ms
        return self.now

    def claim(self, epoch: int, owner: str) -> None:
        claim = PartitionClaim(partition=self.partition, epoch=epoch, owner=owner, timestamp_ms=self.tick(5))
        self.messages.append((PartitionClaim.key(self.partition), CODEC.encode(claim)))

    def tombstone(self, saga_id: str) -> None:
        self.messages.append((saga_id.encode(), None))


class Saga:
    """A saga written by one manager at a time: begin/apply, then encode the record."""

    def __init__(
        self,
        log: Log,
        saga_id: str,
        definition: SagaDefinition,
        payload: Any,
        epoch: int,
        writer: str | None,
        *,
        v1: bool = False,
    ) -> None:
        self.log, self.saga_id, self.definition = log, saga_id, definition
        self.epoch, self.writer, self.v1 = epoch, writer, v1  # v1: write with schema version 1
        event, self.state = begin(
            saga_id, definition, json.dumps(payload, ensure_ascii=False), log.tick(1), epoch
        )
        if v1:  # begun before schema version 6: the definition inline, for the saga's whole life
            self.state = self.state.replace(definition=definition.canonical_json, definition_id="")
        pinned = self.state.definition_id
        if pinned and SagaDefinitionRecord.key(pinned) not in {k for k, _ in log.messages}:
            # Written as a manager does: once per partition, before the first saga pinning it.
            record = definition_record(self.state, log.now, writer)
            log.messages.append((SagaDefinitionRecord.key(pinned), CODEC.encode(record)))
        self._write(event, self.state)

    def _write(self, event: Any, state: SagaState) -> None:
        record = SagaLogRecord(
            saga_id=self.saga_id,
            seq=state.seq,
            epoch=state.epoch,
            timestamp_ms=state.updated_ms,
            event=event,
            snapshot=state.snapshot(),
            writer=None if self.v1 else self.writer,
        )
        value = encode_v1(record) if self.v1 else CODEC.encode(record)
        self.log.messages.append((self.saga_id.encode(), value))

    def emit(self, event: Any, after_ms: int = 20) -> None:
        self.state = apply(self.state, event, self.log.tick(after_ms), self.epoch)
        self._write(event, self.state)

    def zombie(self, event: Any, epoch: int, after_ms: int = 3) -> None:
        """A write by a paused former owner: computed from its stale view, never applied here."""
        stale = apply(self.state, event, self.log.tick(after_ms), epoch)
        self._write(event, stale)

    # shorthands
    def step_begun(self, step: str, last_error: str | None = None, delay_ms: int = 0) -> None:
        spec, attempt = self.definition.by_name[step], self.state.step(step).attempt + 1
        at = self.log.now + 20 + delay_ms
        self.emit(
            StepBegun(
                step=step,
                attempt=attempt,
                dispatch_at_ms=at,
                deadline_ms=at + int(spec.timeout_s * 1000),
                last_error=last_error,
            )
        )

    def step_ended(
        self, step: str, outcome: StepOutcome, output: str | None = None, error: str | None = None
    ) -> None:
        self.emit(StepEnded(step=step, outcome=outcome, output=output, error=error), after_ms=35)

    def comp_begun(self, step: str, last_error: str | None = None, delay_ms: int = 0) -> None:
        spec, attempt = self.definition.by_name[step], self.state.step(step).comp_attempt + 1
        at = self.log.now + 20 + delay_ms
        self.emit(
            CompensationBegun(
                step=step,
                attempt=attempt,
                dispatch_at_ms=at,
                deadline_ms=at + int(spec.timeout_s * 1000),
                last_error=last_error,
            )
        )


ORDER = SagaDefinition(
    name="order",
    version=3,
    steps=(
        StepDefinition(name="reserve", participant="inventory", timeout_s=2.0),
        StepDefinition(name="charge", participant="payments", timeout_s=2.0, retry=RetryPolicy(attempts=2)),
        StepDefinition(name="ship", participant="shipping", timeout_s=2.0, retry=RetryPolicy(attempts=3)),
    ),
)
PAYLOAD = {"customer": "Zoë Ångström", "items": [{"sku": "книга-42", "qty": 2}], "note": "配達は午前中 🚚"}
OK = StepOutcome.SUCCEEDED


def happy_path() -> tuple[Log, str]:
    log = Log()
    log.claim(1, "manager-a")
    s = Saga(log, "order-0001", ORDER, PAYLOAD, epoch=1, writer="manager-a")
    s.step_begun("reserve")
    s.step_ended("reserve", OK, '{"reservation": "R-17"}')
    s.step_begun("charge")
    s.step_ended("charge", OK, '{"payment": "P-99", "amount": "12.50 €"}')
    s.step_begun("ship")
    s.step_ended("ship", OK, '{"tracking": "ZZ123"}')
    s.emit(SagaEnded())
    return log, "A 3-step order saga; every step succeeds."


def business_failure() -> tuple[Log, str]:
    log = Log()
    log.claim(4, "manager-a")
    s = Saga(log, "order-0002", ORDER, PAYLOAD, epoch=4, writer="manager-a")
    s.step_begun("reserve")
    s.step_ended("reserve", OK, '{"reservation": "R-18"}')
    s.step_begun("charge")
    s.step_ended("charge", OK, '{"payment": "P-100"}')
    s.step_begun("ship")
    s.step_ended("ship", StepOutcome.FAILED, error="address rejected: «Nowhere 0»")
    s.emit(SagaAborting(reason="step ship failed: address rejected", failed_step="ship"))
    s.comp_begun("charge")
    s.comp_begun("charge", last_error="RETRYABLE_ERROR: payments unavailable", delay_ms=200)
    s.emit(CompensationEnded(step="charge", output='{"refund": "F-1"}'))
    s.comp_begun("reserve")
    s.emit(CompensationEnded(step="reserve"))
    s.emit(SagaAborted(reason="step ship failed: address rejected"))
    return (
        log,
        "Third step fails; charge then reserve compensated (reverse order), charge's compensation retried once.",
    )


def timeout_retry() -> tuple[Log, str]:
    log = Log()
    log.claim(1, "manager-a")
    s = Saga(log, "order-0003", ORDER, PAYLOAD, epoch=1, writer=None, v1=True)  # manager A runs schema v1
    s.step_begun("reserve")
    s.step_begun("reserve", last_error="timed out after 2000 ms", delay_ms=100)
    s.step_ended("reserve", OK, '{"reservation": "R-19"}')
    # Manager B (schema v2) takes the partition over; A is paused, not dead.
    log.claim(2, "manager-b")
    s.zombie(StepBegun(step="charge", attempt=1, dispatch_at_ms=log.now, deadline_ms=log.now + 2000), epoch=1)
    s.v1, s.epoch, s.writer = False, 2, "manager-b"
    s.step_begun("charge")
    s.step_ended("charge", OK, '{"payment": "P-101"}')
    s.step_begun("ship")
    s.step_begun("ship", last_error="timed out after 2000 ms", delay_ms=100)
    s.step_begun("ship", last_error="RETRYABLE_ERROR: carrier API 503", delay_ms=200)
    s.step_ended("ship", OK, '{"tracking": "ZZ124"}')
    s.emit(SagaEnded())
    return (
        log,
        "Timeouts retried then succeed, across a v1 -> v2 rolling upgrade with a zombie write rejected.",
    )


TRIP = SagaDefinition(
    name="trip",
    version=1,
    steps=(
        StepDefinition(name="budget", participant="finance", depends_on=()),
        StepDefinition(name="audit", participant="audit-log", depends_on=(), compensable=False),
        StepDefinition(name="flight", participant="airline", depends_on=("budget",)),
        StepDefinition(name="hotel", participant="hotels", depends_on=("budget",)),
        StepDefinition(name="car", participant="cars", depends_on=("budget",), timeout_s=10.0),
        StepDefinition(name="confirm", participant="mailer", depends_on=("flight", "hotel", "car")),
    ),
)
SMALL = SagaDefinition(name="ping", steps=(StepDefinition(name="ping", participant="echo"),))


def dag_abort() -> tuple[Log, str]:
    log = Log()
    log.claim(7, "manager-c")
    other = Saga(log, "ping-1", SMALL, {}, epoch=7, writer="manager-c")
    s = Saga(log, "trip-0001", TRIP, {"traveller": "Jürgen", "to": "Zürich"}, epoch=7, writer="manager-c")
    s.step_begun("budget")
    s.step_begun("audit")
    other.step_begun("ping")
    s.step_ended("budget", OK, '{"hold": 1200}')
    s.step_begun("flight")
    s.step_begun("hotel")
    s.step_begun("car")
    s.step_ended("audit", OK, '{"entry": 5}')
    other.step_ended("ping", OK, '"pong"')
    other.emit(SagaEnded())
    s.step_ended("flight", OK, '{"pnr": "XK9Q"}')
    s.step_ended("hotel", StepOutcome.FAILED, error="no rooms")
    s.emit(SagaAborting(reason="step hotel failed: no rooms", failed_step="hotel"))  # car still in flight
    s.comp_begun("flight")
    s.comp_begun("car")
    s.emit(CompensationEnded(step="car"))
    s.emit(CompensationEnded(step="flight", output='{"refund": true}'))
    s.comp_begun("budget")
    s.emit(CompensationEnded(step="budget"))
    s.emit(SagaAborted(reason="step hotel failed: no rooms"))
    log.tombstone("ping-1")  # finished long enough ago: removed
    return log, "A DAG saga aborts: parallel compensations, then the root; a finished saga is tombstoned."


SCENARIOS = {
    "happy_path": happy_path,
    "business_failure": business_failure,
    "timeout_retry": timeout_retry,
    "dag_abort": dag_abort,
}


def replay_messages(
    messages: list[tuple[bytes, bytes | None]], codec: Codec, partition: int = 0
) -> PartitionFold:
    """Decode and fold a partition as a manager does (the test uses the same steps)."""
    fold = PartitionFold(partition=partition)
    for offset, (key, value) in enumerate(messages):
        fold.apply(key, None if value is None else codec.decode(value), offset)
    return fold


def expected(fold: PartitionFold, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "partition_epoch": fold.epoch,
        "applied": fold.applied,
        "rejected_offsets": [offset for offset, _ in fold.rejected],
        "sagas": {saga_id: state.model_dump(mode="json") for saga_id, state in sorted(fold.sagas.items())},
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    for name, scenario in SCENARIOS.items():
        log_path, expected_path = HERE / f"{name}.log.jsonl", HERE / f"{name}.expected.json"
        if not args.force and (log_path.exists() or expected_path.exists()):
            print(f"{name}: exists, kept")
            continue
        log, description = scenario()
        lines = [
            json.dumps(
                {
                    "offset": offset,
                    "key": key.decode(),
                    "value": None if value is None else base64.b64encode(value).decode(),
                },
                ensure_ascii=False,
            )
            for offset, (key, value) in enumerate(log.messages)
        ]
        log_path.write_text("\n".join(lines) + "\n")
        fold = replay_messages(log.messages, CODEC, log.partition)
        expected_path.write_text(json.dumps(expected(fold, description), indent=2, ensure_ascii=False) + "\n")
        print(f"{name}: {len(lines)} messages, {len(fold.sagas)} saga(s), rejected {len(fold.rejected)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
