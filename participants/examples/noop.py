"""The no-op participant: answers SUCCESS to every command of every step, at once.

For the benchmark, which measures the coordinator and not the participants: it is stateless
(no store, see :class:`~participants.sdk.Participant`), so it costs a decode, an encode and a
produce per command. It has no effects, so the journal's guarantees have nothing to protect.
"""

from __future__ import annotations

from typing import Any

from participants.sdk import ANY_STEP, Participant, StepContext
from sagalog.config import Topics


def noop_participant(name: str = "noop", *, topics: Topics, bootstrap: str, **kwargs: Any) -> Participant:
    participant = Participant(name, topics=topics, bootstrap=bootstrap, store=None, **kwargs)

    @participant.execute(ANY_STEP)
    def execute(ctx: StepContext, tx: None) -> None:
        return None

    @participant.compensate(ANY_STEP)
    def compensate(ctx: StepContext, tx: None) -> None:
        return None

    return participant
