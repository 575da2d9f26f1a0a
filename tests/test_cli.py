"""``saga start|status|history|list|cancel`` against a real manager process and a scripted participant.

Most tests go through click's CliRunner (fast, in-process); a few run ``python -m sagacli``
as a real subprocess, as a user would. Every error case must come out as one line on stderr,
a non-zero exit code and no traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from harness import ManagerProcess, ScriptedParticipant, reply_to, wait_for

from sagacli.cli import _register, cli
from sagalog.config import Topics
from sagalog.records import Action, ParticipantCommand, ParticipantReply, ReplyOutcome
from sagalog.topics import ensure_topics

_register()

DEFINITIONS = """
sagas:
  - name: order
    payload_schema:
      type: object
      required: [amount]
      properties: {amount: {type: integer, minimum: 1}, hang: {type: boolean}}
    steps:
      - {name: reserve, participant: cli-stock, timeout_s: 30, retry: {attempts: 1}}
      - {name: pay, participant: cli-pay, timeout_s: 30, retry: {attempts: 1}}
  - name: ping
    steps:
      - {name: only, participant: cli-stock, timeout_s: 30}
"""
PARTICIPANTS = ["cli-stock", "cli-pay"]


def behaviour(cmd: ParticipantCommand) -> list[ParticipantReply]:
    """amount > 1000: payment declined (the saga aborts); hang: reserve never answers (stays RUNNING)."""
    payload = json.loads(cmd.payload)
    if cmd.action is Action.EXECUTE and cmd.step == "reserve" and payload.get("hang"):
        return []
    if cmd.action is Action.EXECUTE and cmd.step == "pay" and payload.get("amount", 0) > 1000:
        return [reply_to(cmd, ReplyOutcome.BUSINESS_FAILURE, error="declined: over the limit")]
    return [reply_to(cmd, output=json.dumps({"step": cmd.step}))]


@dataclass
class Deployment:
    bootstrap: str
    topics: Topics
    definitions: Path
    state_dir: Path

    def args(self, *args: str) -> list[str]:
        """A command line pointing at this deployment."""
        return [*args, "-b", self.bootstrap, "--topic-prefix", self.topics.prefix, "--state-dir", str(self.state_dir)]

    def invoke(self, *args: str) -> Result:
        return CliRunner(env={"COLUMNS": "200"}).invoke(cli, self.args(*args))

    def start(self, *args: str) -> Result:
        return self.invoke("start", *args, "--definitions", str(self.definitions))


@pytest.fixture(scope="module")
def deployment(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("cli")
    topics = Topics(prefix=f"t.cli.{uuid.uuid4().hex[:8]}")
    ensure_topics(bootstrap, topics, partitions=3, participants=PARTICIPANTS)
    definitions = tmp / "defs.yaml"
    definitions.write_text(DEFINITIONS)
    manager = ManagerProcess(bootstrap, topics, definitions, tmp, "m1", partitions=3).start()  # 6000 ms: what a stock Kafka accepts
    try:
        with ScriptedParticipant(bootstrap, topics, PARTICIPANTS, behaviour=behaviour):
            yield Deployment(bootstrap, topics, definitions, tmp / "state")
    finally:
        manager.stop()


def one_line_error(result: Result, code: int = 2) -> str:
    """The error contract: this exit code, exactly one line on stderr, no traceback anywhere."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    message = result.stderr.strip()
    assert message and "\n" not in message, f"not one line: {message!r}"
    assert message.startswith("error: ")
    return message


# --- start ------------------------------------------------------------------------------------


def test_start_wait_completed_exits_0(deployment: Deployment) -> None:
    result = deployment.start("order", "--payload", '{"amount": 5}', "--id", "ok-1", "--wait", "--timeout", "60")
    assert result.exit_code == 0, result.output
    assert "saga ok-1 COMPLETED" in result.stdout


def test_start_wait_aborted_exits_4_and_says_why(deployment: Deployment) -> None:
    result = deployment.start("order", "--payload", '{"amount": 5000}', "--id", "no-1", "--wait", "--timeout", "60")
    assert result.exit_code == 4, result.output
    assert "saga no-1 ABORTED" in result.stdout and "declined" in result.stdout


def test_start_wait_timeout_exits_5(deployment: Deployment) -> None:
    result = deployment.start("order", "--payload", '{"amount": 1, "hang": true}', "--id", "slow-1", "--wait", "--timeout", "1")
    assert result.exit_code == 5, result.output
    assert "still RUNNING" in result.stderr and "saga status slow-1" in result.stderr


def test_start_without_wait_returns_at_once_and_json_parses(deployment: Deployment, tmp_path: Path) -> None:
    payload = tmp_path / "p.json"
    payload.write_text('{"amount": 3}')
    result = deployment.start("order", "--payload-file", str(payload), "--json")
    assert result.exit_code == 0, result.output
    started = json.loads(result.stdout)
    assert started["saga_type"] == "order" and started["saga_id"].startswith("order-") and started["status"] is None
    assert wait_for(lambda: deployment.invoke("status", started["saga_id"]).exit_code == 0, 30, "the saga to show up")


def test_start_twice_with_the_same_id_is_refused(deployment: Deployment) -> None:
    assert deployment.start("ping", "--id", "twice", "--wait").exit_code == 0
    message = one_line_error(deployment.start("ping", "--id", "twice"))
    assert "exists already" in message


# --- status, history, list --------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(deployment: Deployment) -> Deployment:
    """A few finished sagas of both outcomes and both types, for the query tests."""
    for saga_id, payload in (("q-ok-1", '{"amount": 1}'), ("q-ok-2", '{"amount": 2}'), ("q-no-1", '{"amount": 2000}')):
        assert deployment.start("order", "--payload", payload, "--id", saga_id, "--wait").exit_code in (0, 4)
    assert deployment.start("ping", "--id", "q-ping-1", "--wait").exit_code == 0
    return deployment


def test_status_shows_steps_and_time_line(finished: Deployment) -> None:
    result = finished.invoke("status", "q-no-1")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "ABORTED" in out and "declined: over the limit" in out
    for text in ("reserve", "pay", "cli-stock", "cli-pay", "COMPENSATED", "FAILED", "SagaBegun", "CompensationEnded", "SagaAborted"):
        assert text in out, text


def test_status_json_parses(finished: Deployment) -> None:
    result = finished.invoke("status", "q-ok-1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "COMPLETED" and data["saga_type"] == "order" and data["payload"] == {"amount": 1}
    assert [s["name"] for s in data["steps"]] == ["reserve", "pay"]
    assert all(s["status"] == "SUCCEEDED" and s["attempts"] == 1 for s in data["steps"])
    assert data["steps"][0]["output"] == {"step": "reserve"}
    assert data["current_steps"] == []
    assert data["owner"]["instance"] and data["owner"]["epoch"] >= 1
    assert [h["event_type"] for h in data["history"]][0] == "SagaBegun"
    assert [h["seq"] for h in data["history"]] == list(range(1, len(data["history"]) + 1))


def test_status_of_a_running_saga_shows_its_current_step(deployment: Deployment) -> None:
    assert deployment.start("order", "--payload", '{"amount": 1, "hang": true}', "--id", "cur-1").exit_code == 0
    data = wait_for(lambda: _status_json(deployment, "cur-1"), 30, "the saga to begin")
    assert data["status"] == "RUNNING" and data["current_steps"] == ["reserve"]
    assert "current step(s): reserve (running, attempt 1)" in deployment.invoke("status", "cur-1").stdout


def _status_json(deployment: Deployment, saga_id: str) -> dict | None:
    result = deployment.invoke("status", saga_id, "--json")
    if result.exit_code != 0:
        return None
    data = json.loads(result.stdout)
    return data if data["current_steps"] else None


def test_history_lists_raw_records(finished: Deployment) -> None:
    result = finished.invoke("history", "q-ok-2", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["event_type"] for r in records] == ["SagaBegun"] + ["StepBegun", "StepEnded"] * 2 + ["SagaEnded"]
    assert all(r["rejected"] is None and r["epoch"] >= 1 and r["writer"] for r in records)
    offsets = [r["offset"] for r in records]
    assert offsets == sorted(offsets) and len({r["partition"] for r in records}) == 1
    table = finished.invoke("history", "q-ok-2")
    assert table.exit_code == 0 and "StepEnded" in table.stdout and "SUCCEEDED" in table.stdout


def test_list_filters_by_status_type_and_limit(finished: Deployment) -> None:
    def listed(*args: str) -> list[dict]:
        result = finished.invoke("list", "--json", "--limit", "0", *args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    everything = listed()
    ids = {s["saga_id"] for s in everything}
    assert {"q-ok-1", "q-ok-2", "q-no-1", "q-ping-1"} <= ids
    aborted = listed("--status", "aborted")
    assert "q-no-1" in {s["saga_id"] for s in aborted} and all(s["status"] == "ABORTED" for s in aborted)
    pings = listed("--type", "ping")
    assert "q-ping-1" in {s["saga_id"] for s in pings} and all(s["saga_type"] == "ping" for s in pings)
    both = listed("--type", "order", "--status", "COMPLETED")
    assert {"q-ok-1", "q-ok-2"} <= {s["saga_id"] for s in both}
    assert all(s["saga_type"] == "order" and s["status"] == "COMPLETED" for s in both)
    limited = finished.invoke("list", "--json", "--limit", "2")
    assert len(json.loads(limited.stdout)) == 2
    newest_first = [s["started_ms"] for s in everything]
    assert newest_first == sorted(newest_first, reverse=True)
    table = finished.invoke("list", "--type", "ping")
    assert table.exit_code == 0 and "q-ping-1" in table.stdout and "matching shown" in table.stdout


# --- cancel -----------------------------------------------------------------------------------


def test_cancel_a_running_saga_aborts_it_then_cancel_again_is_refused(deployment: Deployment) -> None:
    assert deployment.start("order", "--payload", '{"amount": 1, "hang": true}', "--id", "cancel-1").exit_code == 0
    wait_for(lambda: _status_json(deployment, "cancel-1"), 30, "the saga to begin")

    result = deployment.invoke("cancel", "cancel-1", "--reason", "customer changed their mind")
    assert result.exit_code == 0, result.output
    assert "cancel requested" in result.stdout

    def aborted() -> dict | None:
        data = json.loads(deployment.invoke("status", "cancel-1", "--json").stdout)
        return data if data["status"] == "ABORTED" else None

    data = wait_for(aborted, 30, "the cancelled saga to abort")
    assert "customer changed their mind" in data["reason"]
    assert data["steps"][0]["status"] == "COMPENSATED"  # the in-flight reserve was compensated

    message = one_line_error(deployment.invoke("cancel", "cancel-1"))
    assert "already finished (ABORTED)" in message


def test_cancel_unknown_saga_is_refused(deployment: Deployment) -> None:
    assert "no saga 'ghost'" in one_line_error(deployment.invoke("cancel", "ghost"))


# --- errors -----------------------------------------------------------------------------------


def test_unknown_saga_id(deployment: Deployment) -> None:
    for command in ("status", "history"):
        message = one_line_error(deployment.invoke(command, "no-such-saga"))
        assert "no saga 'no-such-saga'" in message and "saga list" in message


def test_unknown_type_lists_the_known_ones(deployment: Deployment) -> None:
    message = one_line_error(deployment.start("teleport"))
    assert "unknown saga type 'teleport'" in message and "known types: order, ping" in message
    # With the default definitions (the examples'), the examples' types are listed.
    default = one_line_error(deployment.invoke("start", "teleport"))
    assert "book-trip" in default and "place-order" in default


def test_malformed_payload(deployment: Deployment) -> None:
    message = one_line_error(deployment.start("order", "--payload", "{amount: 5"))
    assert "--payload is not valid JSON" in message


def test_schema_invalid_payload(deployment: Deployment) -> None:
    missing = one_line_error(deployment.start("order", "--payload", "{}"))
    assert "invalid" in missing and "'amount' is a required property" in missing
    wrong = one_line_error(deployment.start("order", "--payload", '{"amount": -3}'))
    assert "invalid at amount" in wrong


def test_invalid_flags_are_one_line(deployment: Deployment, tmp_path: Path) -> None:
    payload = tmp_path / "p.json"
    payload.write_text("{}")
    cases = [
        ("status",),  # missing ID
        ("list", "--status", "SLEEPING"),
        ("list", "--limit", "-1"),
        ("status", "x", "--no-such-flag"),
        ("start", "order", "--timeout", "5"),  # --timeout without --wait
        ("start", "order", "--payload", "{}", "--payload-file", str(payload)),
        ("start", "order", "--wait", "--timeout", "0"),
        ("start", "order", "--id", "has spaces/and slashes"),
    ]
    for args in cases:
        message = one_line_error(deployment.invoke(*args))
        assert "--help" in message or "saga id" in message or "payload" in message, (args, message)


def test_unknown_topic_prefix_says_nothing_ran_there(deployment: Deployment) -> None:
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(
        cli, ["status", "x", "-b", deployment.bootstrap, "--topic-prefix", f"nothing-{uuid.uuid4().hex[:6]}",
              "--state-dir", str(deployment.state_dir)],
    )
    assert "does not exist" in one_line_error(result)


def test_unreachable_broker_in_process() -> None:
    result = CliRunner().invoke(cli, ["list", "-b", "127.0.0.1:1", "--state-dir", "/tmp/saga-test-unreachable"])
    message = one_line_error(result, code=3)
    assert "no Kafka broker answered at 127.0.0.1:1" in message and "saga broker" in message


# --- real subprocesses ------------------------------------------------------------------------


def saga(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sagacli", *args], capture_output=True, text=True, timeout=timeout)


def test_subprocess_start_wait_and_status(deployment: Deployment) -> None:
    started = saga(*deployment.args("start", "order", "--payload", '{"amount": 7}', "--id", "proc-1", "--wait",
                                    "--json", "--definitions", str(deployment.definitions)))
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["status"] == "COMPLETED"

    status = saga(*deployment.args("status", "proc-1"))
    assert status.returncode == 0, status.stderr
    assert "COMPLETED" in status.stdout and "time line" in status.stdout

    aborted = saga(*deployment.args("start", "order", "--payload", '{"amount": 7000}', "--wait",
                                    "--definitions", str(deployment.definitions)))
    assert aborted.returncode == 4 and "ABORTED" in aborted.stdout


def test_subprocess_errors_are_one_line(deployment: Deployment, tmp_path: Path) -> None:
    cases = [
        (saga("status", "x", "-b", "127.0.0.1:1", "--state-dir", str(tmp_path)), 3, "no Kafka broker answered"),
        (saga(*deployment.args("status", "never-started")), 2, "no saga 'never-started'"),
        (saga(*deployment.args("start", "order", "--payload", "[1,", "--definitions", str(deployment.definitions))), 2,
         "not valid JSON"),
        (saga(*deployment.args("list", "--limit", "many")), 2, "--limit"),
    ]
    for proc, code, text in cases:
        assert proc.returncode == code, (proc.args, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], (proc.args, proc.stderr)


# --- start --from FILE (many sagas, one flush) -------------------------------------------------


def _jsonl(*items: object) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


def test_start_from_file_starts_every_line(deployment: Deployment, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    sagas = tmp_path / "sagas.jsonl"
    sagas.write_text(
        _jsonl(*({"type": "order", "payload": {"amount": n}, "id": f"from-{run}-{n}"} for n in (1, 2, 3)))
        + "\n"  # blank lines are skipped
        + _jsonl({"type": "ping"}, {"type": "order", "payload": '{"amount": 4}'})  # no id; payload as JSON text
    )
    result = deployment.start("--from", str(sagas), "--json")
    assert result.exit_code == 0, result.output
    started = json.loads(result.stdout)
    assert [set(s) for s in started] == [{"saga_id", "saga_type", "partition"}] * 5
    assert [s["saga_id"] for s in started[:3]] == [f"from-{run}-{n}" for n in (1, 2, 3)]
    assert [s["saga_type"] for s in started] == ["order"] * 3 + ["ping", "order"]
    assert started[3]["saga_id"].startswith("ping-")
    for s in started:
        assert wait_for(lambda s=s: deployment.invoke("status", s["saga_id"]).exit_code == 0, 30, s["saga_id"])

    # Standard input, plain output.
    lines = _jsonl({"type": "ping"}, {"type": "ping"})
    plain = CliRunner().invoke(cli, deployment.args("start", "--from", "-", "--definitions", str(deployment.definitions)),
                               input=lines)
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.startswith("started 2 sagas from -")


def test_start_from_file_wait_exit_codes(deployment: Deployment, tmp_path: Path) -> None:
    ok = tmp_path / "ok.jsonl"
    ok.write_text(_jsonl(*({"type": "order", "payload": {"amount": n}} for n in range(1, 4))))
    result = deployment.start("--from", str(ok), "--wait", "--timeout", "60")
    assert result.exit_code == 0, result.output
    assert "3 sagas: 3 COMPLETED, 0 ABORTED" in result.stdout

    one_aborts = tmp_path / "abort.jsonl"
    one_aborts.write_text(_jsonl({"type": "order", "payload": {"amount": 1}}, {"type": "order", "payload": {"amount": 5000}}))
    result = deployment.start("--from", str(one_aborts), "--wait", "--json")
    assert result.exit_code == 4, result.output
    rows = json.loads(result.stdout)
    assert [r["status"] for r in rows] == ["COMPLETED", "ABORTED"] and "declined" in rows[1]["reason"]
    assert not any(r["timed_out"] for r in rows)

    one_hangs = tmp_path / "hang.jsonl"
    run = uuid.uuid4().hex[:6]
    one_hangs.write_text(_jsonl({"type": "ping"}, {"type": "order", "payload": {"amount": 1, "hang": True}, "id": f"hang-{run}"}))
    result = deployment.start("--from", str(one_hangs), "--wait", "--timeout", "3")
    assert result.exit_code == 5, result.output
    assert f"saga hang-{run} is still RUNNING (at reserve)" in result.stderr
    assert "2 sagas: 1 COMPLETED, 0 ABORTED, 1 not ended after 3 s" in result.stdout
    assert deployment.invoke("cancel", f"hang-{run}").exit_code == 0


def test_start_from_file_with_a_bad_line_starts_nothing(
    deployment: Deployment, bootstrap: str, make_topics: Callable[..., Topics], tmp_path: Path
) -> None:
    from harness import end_offset

    # A deployment without a manager: its inbox shows exactly what was produced.
    quiet = Deployment(bootstrap, make_topics(partitions=2), deployment.definitions, tmp_path / "state")
    good = {"type": "order", "payload": {"amount": 1}, "id": "good-1"}
    cases = [
        ([good, "", {"type": "order", "payload": {"amount": -3}}], "line 3: payload for saga type 'order' is invalid at amount"),
        ([good, "{type: order"], "line 2: not valid JSON"),
        ([good, ["order"]], "line 2: expected a JSON object"),
        ([good, {"payload": {}}], "line 2: 'type'"),
        ([good, {"type": "order", "payload": {"amount": 1}, "ID": "x"}], "line 2: unknown key(s) 'ID'"),
        ([good, {"type": "teleport"}], "line 2: unknown saga type 'teleport'; known types: order, ping"),
        ([good, {"type": "ping", "id": "a b"}], "line 2: 'a b' is not a valid saga id"),
        ([good, {"type": "ping", "id": "good-1"}], "line 2: saga id 'good-1' is on line 1 already"),
        ([], "names no saga"),
    ]
    for lines, expected in cases:
        sagas = tmp_path / "bad.jsonl"
        sagas.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
        message = one_line_error(quiet.start("--from", str(sagas)))
        assert expected in message and f"--from {sagas}" in message, (expected, message)
    assert [end_offset(bootstrap, quiet.topics.inbox, p) for p in range(2)] == [0, 0]

    missing = one_line_error(quiet.start("--from", str(tmp_path / "nope.jsonl")))
    assert "cannot read --from" in missing


def test_start_from_file_refuses_an_id_already_started(deployment: Deployment, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    assert deployment.start("ping", "--id", f"done-{run}", "--wait").exit_code == 0
    sagas = tmp_path / "again.jsonl"
    sagas.write_text(_jsonl({"type": "ping", "id": f"fresh-{run}"}, {"type": "ping", "id": f"done-{run}"}))
    message = one_line_error(deployment.start("--from", str(sagas)))
    assert "line 2" in message and "exists already" in message


def test_start_from_file_flag_combinations(deployment: Deployment, tmp_path: Path) -> None:
    sagas = tmp_path / "s.jsonl"
    sagas.write_text(_jsonl({"type": "ping"}))
    for args in (("ping", "--from", str(sagas)), ("--from", str(sagas), "--id", "x"),
                 ("--from", str(sagas), "--payload", "{}"), ("--from", str(sagas), "--timeout", "3")):
        assert "--help" in one_line_error(deployment.start(*args)), args
    assert "missing argument 'TYPE'" in one_line_error(deployment.invoke("start"))
