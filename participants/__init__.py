"""Participants: the Python SDK for services that take part in sagas, and example services.

A participant consumes commands from ``<prefix>.commands.<name>``, applies each one at most
once in a local transaction, and answers on the topic and partition the command names. Any
service in any language can do the same by following ``docs/CONTRACT.md``; this SDK is the
Python implementation of that contract.
"""

from participants.sdk import (
    ANY_STEP,
    CRASH_AFTER_COMMIT_ENV,
    BusinessFailure,
    Decision,
    Handler,
    OutboxRelay,
    Participant,
    ParticipantStats,
    StepContext,
    TransientFailure,
    Verdict,
    decide,
)
from participants.store import JournalEntry, OutboxRow, ParticipantStore, SqliteStore, StoreTransaction

__all__ = [
    "ANY_STEP",
    "CRASH_AFTER_COMMIT_ENV",
    "BusinessFailure",
    "TransientFailure",
    "Decision",
    "Handler",
    "JournalEntry",
    "OutboxRelay",
    "OutboxRow",
    "Participant",
    "ParticipantStats",
    "ParticipantStore",
    "SqliteStore",
    "StepContext",
    "StoreTransaction",
    "Verdict",
    "decide",
]
