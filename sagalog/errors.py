"""Every error this project raises on purpose.

::

    SagaError                         root: catch this to catch everything of ours
    ├── ConfigError                   bad user input: flags, definitions, payloads (CLI prints it, exit 2)
    ├── BrokerError                   Kafka said no (mapped in sagalog.kafka.translate)
    │   ├── BrokerUnavailable         nothing answered at the bootstrap address
    │   ├── TopicMismatch             topics exist with the wrong shape (partitions, cleanup.policy)
    │   ├── BrokerRefused             a refusal the user must fix (a setting, an ACL): never retried
    │   └── Fenced                    another owner took over: this writer must stop (never retry)
    ├── DecodeError                   bytes that are not one of our records (dead-letter them)
    │   ├── UnknownSchema             fingerprint not in schemas/ (a newer writer, or not ours)
    │   └── MalformedRecord           right header, wrong body (truncated, corrupt, oversized)
    └── FoldError                     a record that does not follow the saga's state (state unchanged)
        ├── WrongSaga                 record for another saga id
        ├── SequenceRepeat            seq <= the state's seq (a duplicate or an old copy)
        ├── SequenceGap               seq skips ahead (records missing in between)
        ├── StaleEpoch                written by an owner older than one already seen (a zombie)
        ├── IllegalTransition         the transition table has no row for (state, event)
        └── DefinitionMissing         the saga's definition is pinned by an id no definition record gave

Each class says whether retrying the same operation can help (``retryable``).
"""

from __future__ import annotations


class SagaError(Exception):
    """Root of every error raised by sagalog, manager and participants."""

    retryable: bool = False


class ConfigError(SagaError):
    """A user mistake in flags, files or payloads; the message says what to fix."""


class BrokerError(SagaError):
    """The broker refused or failed an operation."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class BrokerUnavailable(BrokerError):
    """No broker answered at the bootstrap address within the timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class TopicMismatch(BrokerError):
    """A topic exists but its partitions or configs break our invariants."""


class BrokerRefused(BrokerError):
    """The broker refuses something only the user can fix (a setting outside its bounds, a missing
    ACL): retrying would loop forever, so the process stops with the message, which names the fix."""


class Fenced(BrokerError):
    """A newer owner of the same partition exists; this writer is a zombie and must stop."""


class DecodeError(SagaError):
    """Bytes that could not be decoded as one of our records; carries where they came from."""

    def __init__(
        self,
        message: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset
        where = f" at {topic}[{partition}]@{offset}" if topic is not None else ""
        super().__init__(message + where)

    def at(self, topic: str, partition: int, offset: int) -> DecodeError:
        """The same error, with the Kafka position it was read from."""
        return type(self)(self.args[0], topic=topic, partition=partition, offset=offset)


class UnknownSchema(DecodeError):
    """The single-object header names a schema fingerprint we do not know."""


class MalformedRecord(DecodeError):
    """The header is ours but the body does not decode (truncated, corrupt, oversized)."""


class FoldError(SagaError):
    """A log record that does not follow the current state; the state is left unchanged."""

    def __init__(self, message: str, *, saga_id: str, seq: int, state_seq: int | None) -> None:
        self.saga_id, self.seq, self.state_seq = saga_id, seq, state_seq
        super().__init__(f"saga {saga_id}: record seq {seq} (state seq {state_seq}): {message}")


class WrongSaga(FoldError):
    pass


class SequenceRepeat(FoldError):
    pass


class SequenceGap(FoldError):
    pass


class StaleEpoch(FoldError):
    pass


class IllegalTransition(FoldError):
    pass


class DefinitionMissing(FoldError):
    """A saga pins its definition by an id (``SagaSnapshot.definition_id``) whose definition record
    this process has not read: it is missing from the log partition, which should never be (it is
    written before the saga's first record and never removed). The saga cannot be run or shown."""

    def __init__(self, definition_id: str, *, saga_id: str, seq: int, state_seq: int | None = None) -> None:
        self.definition_id = definition_id
        if definition_id:
            why = (
                f"its definition {definition_id} is unknown: no definition record (key __definition__/{definition_id}) "
                f"was read before it; it is missing from the saga's log partition"
            )
        else:
            why = "it pins no definition (neither inline JSON nor a definition id)"
        super().__init__(why, saga_id=saga_id, seq=seq, state_seq=state_seq)
