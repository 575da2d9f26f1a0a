"""Admission control: a manager keeps at most ``--max-live-sagas`` live sagas per partition,
admits the starts beyond it in inbox order as sagas end, and handles replies meanwhile; a new
owner taking over reads the held starts again and admits each exactly once."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest
from harness import ManagerProcess, ScriptedParticipant, start_sagas, wait_for, wait_terminal

from sagalog.config import Topics
from sagalog.reader import scan
from sagalog.records import SagaAborted, SagaBegun, SagaEnded, SagaLogRecord

DEFINITIONS = """
sagas:
  - name: two
    steps:
      - {name: a, participant: pa, timeout_s: 20.0}
      - {name: b, participant: pb, timeout_s: 20.0}
"""
LIMIT = 2


@pytest.fixture
def setup(bootstrap: str, make_topics, tmp_path: Path) -> tuple[str, Topics, Path]:
    topics = make_topics(partitions=1, participants=["pa", "pb"])  # one partition: one limit for all
    defs = tmp_path / "defs.yaml"
    defs.write_text(DEFINITIONS)
    return bootstrap, topics, defs


def _log(bootstrap: str, topics: Topics) -> list[SagaLogRecord]:
    return [e.item for e in scan(bootstrap, topics) if isinstance(e.item, SagaLogRecord)]


def _most_live(records: list[SagaLogRecord]) -> int:
    """The most sagas live at once, following the log: begun and not yet ended."""
    live = most = 0
    for record in records:
        for event in record.events:
            live += isinstance(event, SagaBegun) - isinstance(event, SagaEnded | SagaAborted)
            most = max(most, live)
    return most


def test_starts_beyond_the_limit_wait_their_turn_and_replies_are_not_stuck_behind_them(setup, tmp_path: Path) -> None:
    bootstrap, topics, defs = setup
    ids = [f"adm-{i:02d}" for i in range(12)]
    manager = ManagerProcess(bootstrap, topics, defs, tmp_path, "m1", partitions=1, extra=("--max-live-sagas", str(LIMIT))).start()
    try:
        with ScriptedParticipant(bootstrap, topics, ["pa", "pb"], delay_s=0.05):
            start_sagas(bootstrap, topics, "two", ids)  # all at once: 10 of them must wait
            states = wait_terminal(bootstrap, topics, ids, 90)
    finally:
        assert manager.stop() == 0, manager.output()[-3000:]
    assert all(states[i].status == "COMPLETED" for i in ids)
    records = _log(bootstrap, topics)
    assert _most_live(records) == LIMIT  # reached, never passed
    begun = [r.saga_id for r in records if isinstance(r.events[0], SagaBegun)]
    assert begun == ids  # admitted first come, first served


def test_a_new_owner_admits_the_held_starts_once(setup, tmp_path: Path) -> None:
    """The inbox offset committed never passes a held start: after a kill -9, the next owner
    reads them again and begins each saga exactly once; none is lost, none doubled."""
    bootstrap, topics, defs = setup
    ids = [f"tko-{i:02d}" for i in range(10)]
    extra = ("--max-live-sagas", str(LIMIT))
    first = ManagerProcess(bootstrap, topics, defs, tmp_path, "m1", partitions=1, extra=extra).start()
    second = None
    try:
        with ScriptedParticipant(bootstrap, topics, ["pa", "pb"], delay_s=0.5):
            start_sagas(bootstrap, topics, "two", ids)
            # Some admitted, the rest held by the first manager: then it dies without a word.
            wait_for(lambda: 1 <= Counter(isinstance(r.events[0], SagaBegun) for r in _log(bootstrap, topics))[True] < len(ids), 60, "some sagas begun, others held")
            first.signal(signal.SIGKILL)
            second = ManagerProcess(bootstrap, topics, defs, tmp_path, "m2", partitions=1, extra=extra).start()
            states = wait_terminal(bootstrap, topics, ids, 120)
    finally:
        first.stop()
        if second is not None:
            assert second.stop() == 0, second.output()[-3000:]
    assert all(states[i].status == "COMPLETED" for i in ids)
    records = _log(bootstrap, topics)
    assert Counter(r.saga_id for r in records if isinstance(r.events[0], SagaBegun)) == Counter(ids)
    assert _most_live(records) <= LIMIT


def test_a_cancel_behind_a_held_start_waits_for_it(setup, tmp_path: Path) -> None:
    """A saga's messages keep their order: the cancel of a saga whose start is held is applied
    once the saga is admitted (it aborts), never dead-lettered as a cancel of an unknown saga."""
    from harness import cancel_saga

    bootstrap, topics, defs = setup
    manager = ManagerProcess(bootstrap, topics, defs, tmp_path, "m1", partitions=1, extra=("--max-live-sagas", "1")).start()
    try:
        with ScriptedParticipant(bootstrap, topics, ["pa", "pb"], delay_s=0.3):
            start_sagas(bootstrap, topics, "two", ["first", "second"])
            cancel_saga(bootstrap, topics, "second", reason="changed my mind")  # "second" is held now
            states = wait_terminal(bootstrap, topics, ["first", "second"], 90)
    finally:
        assert manager.stop() == 0, manager.output()[-3000:]
    assert states["first"].status == "COMPLETED"
    assert states["second"].status == "ABORTED" and "changed my mind" in (states["second"].reason or "")
    assert "unknown saga" not in manager.output()


def test_past_the_held_limit_starts_are_read_again_later_and_none_is_lost(setup, tmp_path: Path) -> None:
    bootstrap, topics, defs = setup
    ids = [f"ovf-{i:02d}" for i in range(10)]
    extra = ("--max-live-sagas", "1", "--max-held", "2")
    manager = ManagerProcess(bootstrap, topics, defs, tmp_path, "m1", partitions=1, extra=extra).start()
    try:
        with ScriptedParticipant(bootstrap, topics, ["pa", "pb"], delay_s=0.05):
            start_sagas(bootstrap, topics, "two", ids)
            states = wait_terminal(bootstrap, topics, ids, 120)
    finally:
        assert manager.stop() == 0, manager.output()[-3000:]
    assert all(states[i].status == "COMPLETED" for i in ids)
    records = _log(bootstrap, topics)
    assert [r.saga_id for r in records if isinstance(r.events[0], SagaBegun)] == ids  # once each, in order
    assert _most_live(records) == 1
    assert "reading the rest again later" in manager.output()
