"""Stuck compensations become incidents an operator can resolve.

First the compensation budget of a definition (pure), then the whole story with a real manager
process, the scripted participant of ``tests/harness.py`` and the ``saga`` CLI: a saga whose
compensation always fails ends up with an incident that ``saga status`` and ``saga list
--incidents`` show; ``saga retry`` sends the compensation again; ``saga resolve --as-compensated``
ends the saga ABORTED; ``saga history`` shows who did what and why. The decisions themselves are
tested without a broker in ``tests/test_decide.py``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from harness import ManagerProcess, ScriptedParticipant, reply_to, wait_for

from sagacli.cli import _register, cli
from sagalog.config import Topics
from sagalog.definition import COMPENSATION_ATTEMPTS, RetryPolicy, SagaDefinition, definition_from_json
from sagalog.records import Action, ParticipantCommand, ParticipantReply, ReplyOutcome
from sagalog.topics import ensure_topics

_register()

# --- the budget in the definition ---------------------------------------------------------------

STEPS = [{"name": "a", "participant": "p"}]


def test_compensation_retry_attempts_default_to_the_compensation_budget() -> None:
    assert SagaDefinition(name="x", steps=STEPS).compensation_retry.attempts == COMPENSATION_ATTEMPTS == 10
    # A policy that leaves attempts out gets the budget, not a step's 3 tries: from a file ...
    partial = SagaDefinition(name="x", steps=STEPS, compensation_retry={"backoff_initial_s": 1})
    assert (partial.compensation_retry.attempts, partial.compensation_retry.backoff_initial_s) == (10, 1.0)
    # ... or built in Python; a stated number is kept.
    built = SagaDefinition(name="x", steps=STEPS, compensation_retry=RetryPolicy(backoff_initial_s=1))
    assert built.compensation_retry.attempts == 10
    stated = SagaDefinition(name="x", steps=STEPS, compensation_retry={"attempts": 2})
    assert stated.compensation_retry.attempts == 2
    assert definition_from_json(stated.canonical_json).compensation_retry.attempts == 2  # pinned as stated


def test_a_pinned_definition_without_the_field_takes_the_default() -> None:
    pinned = json.loads(SagaDefinition(name="x", steps=STEPS).canonical_json)
    del pinned["compensation_retry"]["attempts"]
    assert definition_from_json(json.dumps(pinned)).compensation_retry.attempts == 10
    del pinned["compensation_retry"]
    assert definition_from_json(json.dumps(pinned)).compensation_retry.attempts == 10


# --- end to end ----------------------------------------------------------------------------------

BUDGET = 2
DEFINITIONS = f"""
sagas:
  - name: order
    compensation_retry: {{attempts: {BUDGET}, backoff_initial_s: 0.05, backoff_max_s: 0.1}}
    steps:
      - {{name: reserve, participant: inc-stock, timeout_s: 30}}
      - {{name: pay, participant: inc-pay, timeout_s: 30, retry: {{attempts: 1}}}}
"""
PARTICIPANTS = ["inc-stock", "inc-pay"]


def behaviour(cmd: ParticipantCommand) -> list[ParticipantReply]:
    """pay is always declined, so every saga compensates reserve, which never works: a transient
    error ("ledger down"), or with ``cannot`` in the payload a refusal (BUSINESS_FAILURE). With
    ``hang`` reserve never answers (the saga stays RUNNING)."""
    payload = json.loads(cmd.payload)
    if cmd.step == "reserve" and cmd.action is Action.EXECUTE:
        return [] if payload.get("hang") else [reply_to(cmd)]
    if cmd.step == "pay" and cmd.action is Action.EXECUTE:
        return [reply_to(cmd, ReplyOutcome.BUSINESS_FAILURE, error="declined")]
    if cmd.step == "reserve" and cmd.action is Action.COMPENSATE and payload.get("cannot"):
        return [reply_to(cmd, ReplyOutcome.BUSINESS_FAILURE, error="UnknownStep: no compensate handler for reserve")]
    return [reply_to(cmd, ReplyOutcome.RETRYABLE_ERROR, error="ledger down")]


@dataclass
class Deployment:
    bootstrap: str
    topics: Topics
    definitions: Path
    state_dir: Path
    participant: ScriptedParticipant

    def invoke(self, *args: str) -> Result:
        where = ["-b", self.bootstrap, "--topic-prefix", self.topics.prefix, "--state-dir", str(self.state_dir)]
        return CliRunner(env={"COLUMNS": "200"}).invoke(cli, [*args, *where])

    def json(self, *args: str) -> Any:
        result = self.invoke(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def start(self, saga_id: str, payload: dict[str, Any]) -> None:
        result = self.invoke("start", "order", "--payload", json.dumps(payload), "--id", saga_id,
                             "--definitions", str(self.definitions))
        assert result.exit_code == 0, result.output

    def status_when(self, saga_id: str, what: str, check: Any) -> dict[str, Any]:
        """``saga status --json`` once ``check`` holds for it (the read model polls the log)."""

        def probe() -> dict[str, Any] | None:
            result = self.invoke("status", saga_id, "--json")
            if result.exit_code != 0:
                return None
            data = json.loads(result.stdout)
            return data if check(data) else None

        return wait_for(probe, 60, f"saga {saga_id}: {what}", interval=0.5)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def deployment(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("incidents")
    topics = Topics(prefix=f"t.incidents.{uuid.uuid4().hex[:8]}")
    ensure_topics(bootstrap, topics, partitions=2, participants=PARTICIPANTS)
    definitions = tmp / "defs.yaml"
    definitions.write_text(DEFINITIONS)
    manager = ManagerProcess(bootstrap, topics, definitions, tmp, "m1", partitions=2).start()  # 6000 ms session
    try:
        with ScriptedParticipant(bootstrap, topics, PARTICIPANTS, behaviour=behaviour) as participant:
            yield Deployment(bootstrap, topics, definitions, tmp / "state", participant)
    finally:
        code = manager.stop()
        assert code == 0, f"manager did not stop cleanly (exit {code}):\n{manager.output()[-3000:]}"


def one_line_error(result: Result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def compensations(deployment: Deployment, saga_id: str) -> list[int]:
    """The attempts of reserve's compensation the participant was sent."""
    return [a for step, action, a in deployment.participant.commands_for(saga_id) if action == "COMPENSATE"]


def has_incident(attempts: int) -> Any:
    return lambda data: [(i["step"], i["attempts"]) for i in data["incidents"]] == [("reserve", attempts)]


def test_a_stuck_compensation_becomes_an_incident_that_an_operator_retries_then_resolves(
    deployment: Deployment,
) -> None:
    saga = f"stuck-{uuid.uuid4().hex[:6]}"
    deployment.start(saga, {"amount": 1})

    # The budget is spent: an incident, in status (JSON and text) and in list --incidents.
    data = deployment.status_when(saga, "an incident after the budget", has_incident(BUDGET))
    [incident] = data["incidents"]
    assert data["status"] == "COMPENSATING"
    assert incident["reason"] == f"compensation of reserve gave up after {BUDGET} attempts: ledger down"
    assert incident["opened_ms"] > 0
    assert incident["commands"] == [
        f"saga retry {saga} --step reserve --reason '...'",
        f"saga resolve {saga} --step reserve --as-compensated --reason '...'",
    ]
    assert compensations(deployment, saga) == list(range(1, BUDGET + 1))  # and no more: it waits
    text = deployment.invoke("status", saga)
    assert text.exit_code == 0, text.output
    for shown in ("INCIDENT on step reserve", "ledger down", f"after {BUDGET} compensation attempts",
                  f"saga retry {saga} --step reserve", f"saga resolve {saga} --step reserve --as-compensated",
                  "(incident)", "IncidentOpened"):
        assert shown in text.stdout, shown
    listed = deployment.json("list", "--incidents", "--limit", "0")
    assert saga in [s["saga_id"] for s in listed]
    assert all(s["incidents"] for s in listed)
    [row] = [s for s in listed if s["saga_id"] == saga]
    assert row["incidents"][0]["step"] == "reserve" and row["incidents"][0]["attempts"] == BUDGET
    table = deployment.invoke("list")
    assert "with an open incident" in table.stdout and "saga list --incidents" in table.stdout

    # retry: the next attempt goes out at once; it fails again, so a new budget ends in a new incident.
    result = deployment.invoke("retry", saga, "--operator", "alice", "--reason", "ledger is back")
    assert result.exit_code == 0, result.output
    assert f"retry of step reserve requested for saga {saga} (by alice)" in result.stdout
    wait_for(lambda: BUDGET + 1 in compensations(deployment, saga), 60, "the retried compensation")
    deployment.status_when(saga, "an incident after the second budget", has_incident(2 * BUDGET))
    assert compensations(deployment, saga) == list(range(1, 2 * BUDGET + 1))

    # resolve: undone by hand, so the saga ends ABORTED.
    result = deployment.invoke("resolve", saga, "--step", "reserve", "--as-compensated",
                               "--reason", "released the hold by hand, ticket 7", "--operator", "bob")
    assert result.exit_code == 0, result.output
    data = deployment.status_when(saga, "ABORTED", lambda d: d["status"] == "ABORTED")
    assert data["incidents"] == [] and data["reason"] == "step pay failed: declined"
    assert [s["status"] for s in data["steps"]] == ["COMPENSATED", "FAILED"]

    # history: who did it and why.
    records = deployment.json("history", saga)
    operators = [(r["event_type"], r["event"]) for r in records if "operator" in r["event"]]
    assert operators == [
        ("IncidentRetried", {"step": "reserve", "operator": "alice", "reason": "ledger is back"}),
        ("IncidentResolved", {"step": "reserve", "operator": "bob", "reason": "released the hold by hand, ticket 7"}),
    ]
    assert [r["event_type"] for r in records][-2:] == ["IncidentResolved", "SagaAborted"]
    assert [r["event_type"] for r in records].count("IncidentOpened") == 2
    table = deployment.invoke("history", saga)
    assert table.exit_code == 0
    assert "operator alice: ledger is back" in table.stdout
    assert "operator bob: released the hold by hand, ticket 7" in table.stdout

    # Once it has ended, both are refused, with one line saying why.
    for args in (("retry", saga), ("resolve", saga, "--step", "reserve", "--as-compensated", "--reason", "x")):
        assert "has already finished (ABORTED)" in one_line_error(deployment.invoke(*args))


def test_a_participant_that_cannot_compensate_opens_an_incident_at_once(deployment: Deployment) -> None:
    from sagalog.client import SagaClient

    saga = f"cannot-{uuid.uuid4().hex[:6]}"
    deployment.start(saga, {"amount": 1, "cannot": True})
    data = deployment.status_when(saga, "an incident at the first refusal", has_incident(1))
    assert data["incidents"][0]["reason"] == (
        "participant cannot compensate reserve: UnknownStep: no compensate handler for reserve"
    )
    assert compensations(deployment, saga) == [1]

    # The same from code: the client refuses what the manager would, then resolves it.
    with SagaClient(deployment.bootstrap, topic_prefix=deployment.topics.prefix, state_dir=deployment.state_dir) as client:
        from sagalog.errors import ConfigError

        with pytest.raises(ConfigError, match="is FAILED, not COMPENSATING"):
            client.resolve(saga, "pay", reason="x")  # pay failed: it changed nothing, nothing to undo
        with pytest.raises(ConfigError, match="needs a reason"):
            client.resolve(saga, "reserve", reason=" ")
        sent = client.resolve(saga, "reserve", reason="undone in the admin UI")
        assert sent.operator  # the OS user
    state = deployment.status_when(saga, "ABORTED", lambda d: d["status"] == "ABORTED")
    resolved = [r for r in state["history"] if r["event_type"] == "IncidentResolved"]
    assert resolved and resolved[0]["event"]["operator"] == sent.operator


def test_what_the_manager_would_refuse_is_refused_up_front(deployment: Deployment) -> None:
    saga = f"running-{uuid.uuid4().hex[:6]}"
    deployment.start(saga, {"amount": 1, "hang": True})
    deployment.status_when(saga, "RUNNING at reserve", lambda d: d["current_steps"] == ["reserve"])
    assert f"saga {saga!r} has no open incident; nothing to retry" in one_line_error(deployment.invoke("retry", saga))
    message = one_line_error(deployment.invoke("retry", saga, "--step", "reserve"))
    assert "no open incident for step 'reserve' (it has none)" in message
    message = one_line_error(deployment.invoke("resolve", saga, "--step", "reserve", "--as-compensated", "--reason", "x"))
    assert "is RUNNING, not COMPENSATING" in message
    usage = one_line_error(deployment.invoke("resolve", saga, "--step", "reserve", "--reason", "x"))
    assert "--as-compensated" in usage
    assert "no saga 'ghost'" in one_line_error(deployment.invoke("retry", "ghost"))
    assert deployment.invoke("cancel", saga).exit_code == 0  # leave nothing running
