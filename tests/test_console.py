"""``saga console`` against a real manager process and a scripted participant, through Starlette's
TestClient (in process; tests/test_console_browser.py drives the real process in Chromium).

The deployment runs sagas that complete, one that aborts after a retried payment and compensates,
one that hangs (to cancel) and one whose compensation hangs (stuck COMPENSATING, which a cancel
must refuse as ``saga cancel`` does); garbage sent to the inbox must show up as a dead letter.
"""

from __future__ import annotations

import html
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from confluent_kafka import Producer
from harness import (
    Behaviour,
    ManagerProcess,
    ScriptedParticipant,
    reply_to,
    start_sagas,
    wait_for,
    wait_terminal,
)
from starlette.testclient import TestClient

from sagacli.cli import _register, cli
from sagacli.console import Settings, create_app
from sagacli.console.queries import Filters
from sagacli.console.timeline import build
from sagalog.config import Topics
from sagalog.kafka import producer_config
from sagalog.readmodel import HistoryEntry, ReadModel
from sagalog.records import Action, ParticipantCommand, ParticipantReply, ReplyOutcome
from sagalog.topics import ensure_topics

_register()

DEFINITIONS = """
sagas:
  - name: order
    steps:
      - {name: reserve, participant: con-stock, timeout_s: 30, retry: {attempts: 1}}
      - {name: pay, participant: con-pay, timeout_s: 30, retry: {attempts: 2, backoff_initial_s: 0.3, jitter: 0}}
      - {name: ship, participant: con-stock, timeout_s: 30, compensable: false}
  - name: ping
    steps:
      - {name: only, participant: con-stock, timeout_s: 30}
"""
PARTICIPANTS = ["con-stock", "con-pay"]


def behaviour(cmd: ParticipantCommand) -> list[ParticipantReply]:
    """amount > 1000: the payment gateway is busy once (a retry), then declines (the saga aborts);
    hang: reserve never answers (the saga stays RUNNING); stuck: compensations never answer;
    comp_fail: compensations answer that they cannot undo the step (an incident)."""
    payload = json.loads(cmd.payload)
    if cmd.action is Action.EXECUTE:
        if cmd.step == "reserve" and payload.get("hang"):
            return []
        if cmd.step == "pay" and payload.get("amount", 0) > 1000:
            if cmd.attempt == 1:
                return [reply_to(cmd, ReplyOutcome.RETRYABLE_ERROR, error="payment gateway busy")]
            return [reply_to(cmd, ReplyOutcome.BUSINESS_FAILURE, error="declined: over the limit")]
        return [reply_to(cmd, output=json.dumps({"step": cmd.step, "ref": f"{cmd.step[:2]}-{cmd.saga_id}"}))]
    if payload.get("stuck"):
        return []
    if payload.get("comp_fail"):
        return [reply_to(cmd, ReplyOutcome.BUSINESS_FAILURE, error="cannot undo: the goods already left the warehouse")]
    return [reply_to(cmd, output='{"undone": true}')]


@dataclass
class ConsoleDeployment:
    bootstrap: str
    topics: Topics
    definitions: Path
    state_dir: Path
    group_id: str
    tmp: Path

    def settings(self, **changes: object) -> Settings:
        return Settings(
            bootstrap=self.bootstrap, topics=self.topics, state_dir=self.state_dir, group_id=self.group_id,
            **changes,  # type: ignore[arg-type]
        )

    def cli_args(self, *args: str) -> list[str]:
        return [*args, "-b", self.bootstrap, "--topic-prefix", self.topics.prefix, "--state-dir", str(self.state_dir)]

    def start(self, saga_type: str, saga_id: str, payload: dict) -> None:
        start_sagas(self.bootstrap, self.topics, saga_type, [saga_id], json.dumps(payload))

    def send_garbage(self, key: bytes, value: bytes = b"\x00garbage, not Avro") -> None:
        producer = Producer(producer_config(self.bootstrap))
        producer.produce(self.topics.inbox, value, key=key)
        producer.flush(10)

    def claims(self) -> dict[int, str]:
        with ReadModel(self.bootstrap, self.topics, state_dir=self.tmp / "check") as model:
            model.catch_up()
            return {p: c.owner for p, c in model.claims().items()}


#: Where the deployments' process logs are (the newest last), for failure messages.
LOG_DIRS: list[Path] = []


@contextmanager
def deploy(
    bootstrap: str,
    tmp: Path,
    *,
    definitions: str = DEFINITIONS,
    participants: list[str] = PARTICIPANTS,
    respond: Behaviour = behaviour,
    delay_s: float = 0.15,
) -> Iterator[ConsoleDeployment]:
    """Fresh topics (3 partitions), a manager process and a scripted participant."""
    LOG_DIRS.append(tmp)
    topics = Topics(prefix=f"t.console.{uuid.uuid4().hex[:8]}")
    ensure_topics(bootstrap, topics, partitions=3, participants=participants)
    path = tmp / "defs.yaml"
    path.write_text(definitions)
    manager = ManagerProcess(bootstrap, topics, path, tmp, "m1", partitions=3).start()
    try:
        with ScriptedParticipant(bootstrap, topics, participants, behaviour=respond, delay_s=delay_s):
            yield ConsoleDeployment(bootstrap, topics, path, tmp / "state", f"{topics.prefix}-managers", tmp)
    finally:
        manager.stop()


@pytest.fixture(scope="module")
def console_deployment(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleDeployment]:
    with deploy(bootstrap, tmp_path_factory.mktemp("console")) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def sagas_run(console_deployment: ConsoleDeployment) -> ConsoleDeployment:
    """Two completed orders, one aborted (retried payment, compensated), a ping, one hanging
    (RUNNING), one stuck compensating and one whose compensation is an incident; and a garbage
    inbox message (a dead letter)."""
    d = console_deployment
    for saga_type, saga_id, payload in (
        ("order", "ok-1", {"amount": 5}),
        ("order", "ok-2", {"amount": 7}),
        ("order", "no-1", {"amount": 5000}),
        ("ping", "ping-1", {}),
    ):
        d.start(saga_type, saga_id, payload)
    d.start("order", "hang-1", {"amount": 1, "hang": True})
    d.start("order", "stuck-1", {"amount": 5000, "stuck": True})
    d.start("order", "refund-1", {"amount": 5000, "comp_fail": True})
    d.send_garbage(b"junk-1")
    wait_terminal(d.bootstrap, d.topics, ["ok-1", "ok-2", "no-1", "ping-1"], 90)
    return d


@pytest.fixture
def client(sagas_run: ConsoleDeployment) -> Iterator[TestClient]:
    with TestClient(create_app(sagas_run.settings()), follow_redirects=False) as client:
        yield client


def counts(page: str) -> dict[str, int]:
    """The status chips' counts: {"ALL": n, "RUNNING": n, ...}."""
    found = re.findall(r'data-status="([A-Z]+)">[a-z]+ <b class="count">(\d+)</b>', page)
    return {status: int(n) for status, n in found}


def listed(page: str) -> list[tuple[str, str]]:
    """(saga id, status) of each row of the saga table, in order."""
    return re.findall(r'<tr data-saga="([^"]+)" data-status="([A-Z]+)">', page)


def eventually(client: TestClient, url: str, check, what: str, timeout: float = 60) -> str:  # noqa: ANN001
    """GET ``url`` until ``check(text)`` holds (the console catches up at most once a second)."""
    last: list[str] = []

    def probe() -> str | None:
        response = client.get(url)
        last[:] = [f"{response.status_code} {response.text}"]
        return response.text if response.status_code == 200 and check(response.text) else None

    try:
        return wait_for(probe, timeout, what, interval=0.3)  # type: ignore[return-value]
    except AssertionError as err:
        banners = re.findall(r'class="banner[^"]*"[^>]*>([^<]*)', last[0] if last else "")
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(LOG_DIRS[-1].glob("*.log"))) if LOG_DIRS else ""
        raise AssertionError(f"{err}; last answer {last[0][:200] if last else None!r}, banners {banners}\n{logs}") from None


# --- the list ---------------------------------------------------------------------------------


def test_list_shows_the_sagas_with_counts_by_status(client: TestClient) -> None:
    page = eventually(
        client, "/sagas",
        lambda text: counts(text).get("INCIDENT") == 1 and counts(text).get("ABORTED") == 1,
        "the console to show every saga",
    )
    assert counts(page) == {"ALL": 7, "RUNNING": 1, "COMPENSATING": 2, "COMPLETED": 3, "ABORTED": 1, "INCIDENT": 1}
    rows = dict(listed(page))
    assert rows == {"ok-1": "COMPLETED", "ok-2": "COMPLETED", "no-1": "ABORTED", "ping-1": "COMPLETED",
                    "hang-1": "RUNNING", "stuck-1": "COMPENSATING", "refund-1": "COMPENSATING"}
    assert "declined: over the limit" in page  # the reason column
    assert '<script src="/static/htmx.min.js"></script>' in page and 'hx-trigger="every 2s"' in page
    assert client.get("/static/htmx.min.js").status_code == 200  # vendored: no CDN
    health = client.get("/healthz").json()
    assert health["ok"] and health["counts"] == {"RUNNING": 1, "COMPENSATING": 2, "COMPLETED": 3, "ABORTED": 1}


def test_list_filters(client: TestClient) -> None:
    eventually(client, "/sagas", lambda text: counts(text).get("INCIDENT") == 1, "every saga")

    def ids(query: str) -> set[str]:
        response = client.get(f"/sagas?{query}")
        assert response.status_code == 200
        return {saga_id for saga_id, _ in listed(response.text)}

    assert ids("status=ABORTED") == {"no-1"}
    assert ids("status=completed&type=order") == {"ok-1", "ok-2"}
    assert ids("type=ping") == {"ping-1"}
    assert ids("q=OK-") == {"ok-1", "ok-2"}  # case-insensitive text in the id
    assert ids("q=%25") == set()  # LIKE wildcards are searched for literally
    assert ids("within=3600") == {"ok-1", "ok-2", "no-1", "ping-1", "hang-1", "stuck-1", "refund-1"}
    assert ids("incident=1") == {"refund-1"}
    assert ids("incident=1&status=RUNNING") == set()
    future = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 3600))
    past = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 3600))
    assert ids(f"since={future}") == set()
    assert ids(f"until={past}") == set()
    assert ids(f"since={past}&type=ping") == {"ping-1"}
    assert len(ids("limit=2")) == 2

    # Counts by status follow the other filters; the status filter picks a chip.
    typed = client.get("/sagas?type=order&status=RUNNING").text
    assert counts(typed) == {"ALL": 6, "RUNNING": 1, "COMPENSATING": 2, "COMPLETED": 2, "ABORTED": 1, "INCIDENT": 1}
    assert "1 of 1 matching shown" in typed
    # A bad value is reported, not an error page.
    bad = client.get("/sagas?status=SLEEPING&since=yesterday")
    assert bad.status_code == 200 and "unknown status" in bad.text and "is not a date" in bad.text

    # htmx's polling gets the live region only.
    fragment = client.get("/sagas?status=ABORTED", headers={"HX-Request": "true"}).text
    assert fragment.startswith('<section id="saga-list"') and "<html" not in fragment
    assert [s for s, _ in listed(fragment)] == ["no-1"]


def test_filters_parse_and_round_trip() -> None:
    f = Filters.parse({"status": "aborted", "type": "order", "q": " ok ", "within": "300", "limit": "20", "incident": "1"})
    assert (f.status, f.saga_type, f.q, f.within_s, f.limit, f.incident, f.errors) == (
        "ABORTED", "order", "ok", 300, 20, True, ())
    assert Filters.parse(dict(pair.split("=") for pair in f.query().split("&"))) == f
    assert "status" not in f.query(status=None)


# --- one saga ---------------------------------------------------------------------------------


def test_saga_page_shows_the_time_line_with_the_compensation_and_the_error(client: TestClient) -> None:
    page = eventually(client, "/sagas/no-1", lambda text: 'data-status="ABORTED"' in text, "no-1 aborted")
    # The failing step and its error, prominently.
    failure = page[page.index('id="failure"'):]
    failure = failure[: failure.index("</div>\n  </div>") if "</div>\n  </div>" in failure else 2000]
    assert "declined: over the limit" in failure and '<b class="failing-step">pay</b>' in failure
    # The time line: reserve executed then was compensated; pay's first attempt was retried, the second failed.
    rows = _timeline_rows(page)
    assert [b[:3] for b in rows["reserve"]] == [("execute", "SUCCEEDED", "1"), ("compensate", "COMPENSATED", "1")]
    assert [b[:3] for b in rows["pay"] if b[0] != "backoff"] == [("execute", "RETRIED", "1"), ("execute", "FAILED", "2")]
    assert any(b[0] == "backoff" for b in rows["pay"])  # the retry waited out its backoff
    assert rows["ship"] == []  # never ran
    assert "payment gateway busy" in page  # the retried attempt's error, in its tooltip and the records
    assert 'class="tl-row failing" data-step="pay"' in page
    # Payload, outputs, raw records; no cancel button on a finished saga.
    assert "&#34;amount&#34;: 5000" in page or "&quot;amount&quot;: 5000" in page or '"amount": 5000' in html.unescape(page)
    assert "re-no-1" in page  # reserve's output
    events = re.findall(r'data-event="(\w+)"', page)
    assert events[0] == "SagaBegun" and events[-1] == "SagaAborted" and "CompensationEnded" in events
    assert "Cancel saga" not in page
    assert "hx-get" not in poller(page)  # a finished saga's page does not poll


def _timeline_rows(page: str) -> dict[str, list[tuple[str, str, str]]]:
    rows: dict[str, list[tuple[str, str, str]]] = {}
    for step, body in re.findall(r'<div class="tl-row[^"]*" data-step="([^"]+)">(.*?)(?=<div class="tl-row|<div class="tl-error|</div>\s*<div class="legend")', page, re.S):
        rows[step] = re.findall(r'data-kind="(\w+)" data-outcome="(\w+)" data-attempt="(\d+)"', body)
    return rows


def test_saga_page_of_a_running_saga_polls_and_offers_cancel(client: TestClient) -> None:
    page = eventually(client, "/sagas/hang-1", lambda text: 'data-status="RUNNING"' in text, "hang-1 running")
    assert "Cancel saga" in page and 'hx-post="/sagas/hang-1/cancel"' in page
    assert 'hx-trigger="every 2s, saga-changed from:body"' in poller(page)
    assert 'data-outcome="RUNNING"' in page  # the in-flight attempt runs to now
    # The poll's answer: header and main part out of band, the actions only when they changed.
    key = re.search(r'data-actions="([^"]*)"', page).group(1)
    assert key == "RUNNING"
    same = client.get("/sagas/hang-1", params={"actions": key}, headers={"HX-Request": "true"}).text
    assert '<section id="saga-head" data-status="RUNNING" hx-swap-oob="true">' in same
    assert '<section id="saga-main" hx-swap-oob="true">' in same and 'id="saga-actions"' not in same
    changed = client.get("/sagas/hang-1", params={"actions": "COMPENSATING"}, headers={"HX-Request": "true"}).text
    assert '<section id="saga-actions" data-actions="RUNNING" hx-swap-oob="true">' in changed


def poller(page: str) -> str:
    """The saga page's poller element (what it polls, and when)."""
    start = page.index('<div id="saga-poller"')
    return page[start : page.index("</div>", start)]


def test_unknown_saga_is_a_404_page_that_waits_for_it(client: TestClient) -> None:
    response = client.get("/sagas/no-such-saga")
    assert response.status_code == 404 and "no saga &#39;no-such-saga&#39;" in response.text
    assert 'hx-get="/sagas/no-such-saga"' in poller(response.text)  # it appears once a manager begins it


def test_time_line_from_records() -> None:
    """The pure builder: retries, backoff, an in-flight step at abort, a compensation, markers."""

    class Step:
        def __init__(self, name: str, status: str, error: str | None = None) -> None:
            self.name, self.status, self.error = name, status, error

    def rec(seq: int, at: int, kind: str, **event: object) -> HistoryEntry:
        return HistoryEntry(0, seq, seq, 1, at, kind, dict(event), "m1", None)

    history = [
        rec(1, 1000, "SagaBegun", saga_type="t", definition_version=1),
        rec(2, 1000, "StepBegun", step="a", attempt=1, dispatch_at_ms=1000, deadline_ms=2000),
        rec(3, 1100, "StepEnded", step="a", outcome="SUCCEEDED", output='{"x": 1}'),
        rec(4, 1100, "StepBegun", step="b", attempt=1, dispatch_at_ms=1100, deadline_ms=2000),
        rec(5, 1300, "StepBegun", step="b", attempt=2, dispatch_at_ms=1500, deadline_ms=3000, last_error="busy"),
        rec(6, 1700, "SagaAborting", reason="cancelled", failed_step=None),
        rec(7, 1700, "CompensationBegun", step="b", attempt=1, dispatch_at_ms=1700, deadline_ms=3000),
        rec(8, 1800, "CompensationEnded", step="b"),
        rec(9, 1800, "CompensationBegun", step="a", attempt=1, dispatch_at_ms=1800, deadline_ms=3000),
        rec(10, 2000, "CompensationEnded", step="a"),
        rec(11, 2000, "SagaAborted", reason="cancelled"),
    ]
    line = build(
        steps=[Step("a", "COMPENSATED"), Step("b", "COMPENSATED")], participants={"a": "pa", "b": "pb"},
        compensable={}, history=history, started_ms=1000, updated_ms=2000, terminal=True, now_ms=99999,
    )
    a, b = line.rows
    assert [(x.kind, x.outcome, x.start_ms, x.end_ms) for x in a.bars] == [
        ("execute", "SUCCEEDED", 1000, 1100), ("compensate", "COMPENSATED", 1800, 2000)]
    assert [(x.kind, x.outcome, x.start_ms, x.end_ms, x.error) for x in b.bars] == [
        ("execute", "RETRIED", 1100, 1300, "busy"), ("backoff", "BACKOFF", 1300, 1500, None),
        ("execute", "IN_FLIGHT_AT_ABORT", 1500, 1700, None), ("compensate", "COMPENSATED", 1700, 1800, None)]
    assert (line.start_ms, line.end_ms, line.partial, line.live) == (1000, 2000, False, False)
    assert [m.kind for m in line.markers] == ["begun", "aborting", "aborted"]
    assert a.bars[0].left == 0 and a.bars[1].left + a.bars[1].width == 100
    assert line.failing is None  # a cancel fails no step
    assert not any(x.open for r in line.rows for x in r.bars)  # all ended
    assert [t.label for t in line.ticks][:3] == ["+0 ms", "+200 ms", "+400 ms"]


# --- partitions and dead letters ----------------------------------------------------------------


def cell(row: str, column: str) -> str:
    """The text of a partitions row's cell (``data-col``), tags stripped."""
    found = re.search(rf'<td[^>]*data-col="{column}"[^>]*>(.*?)</td>', row, re.S)
    assert found, (column, row)
    return re.sub(r"<[^>]+>", "", found.group(1)).strip()


def test_partitions_show_owners_epochs_and_takeovers(client: TestClient, sagas_run: ConsoleDeployment) -> None:
    owners = sagas_run.claims()
    assert sorted(owners) == [0, 1, 2]
    page = eventually(client, "/partitions", lambda text: all(f'data-col="owner">{html.escape(o)}<' in text for o in owners.values()),
                      "the partitions' owners")
    rows = {int(p): row for p, row in re.findall(r'<tr data-partition="(\d+)">(.*?)</tr>', page, re.S)}
    assert sorted(rows) == [0, 1, 2]
    for p, owner in owners.items():
        row = rows[p]
        assert cell(row, "owner") == owner
        assert int(cell(row, "epoch")) >= 1
        assert "ago)" in cell(row, "takeover")
        assert int(cell(row, "next-offset")) > 0
        # Lag and backlog come from the broker's offsets: known, never negative.
        assert int(cell(row, "lag")) >= 0 and int(cell(row, "backlog")) >= 0
        assert int(cell(row, "log-end")) >= int(cell(row, "next-offset"))
    assert sum(int(cell(r, "sagas")) for r in rows.values()) >= 6
    assert sum(int(cell(r, "live").split()[0]) for r in rows.values()) >= 1  # at least stuck-1 is unfinished
    assert "1 owner:" in page


def test_dead_letters_are_listed_newest_first_with_the_reason(client: TestClient, sagas_run: ConsoleDeployment) -> None:
    page = eventually(client, "/dead-letters", lambda text: 'data-key="junk-1"' in text, "the garbage's dead letter")
    row = page[page.index('data-key="junk-1"'):]
    row = row[: row.index("</tr>")]
    assert "MalformedRecord" in row and "not Avro single-object encoded" in row
    assert f"{sagas_run.topics.inbox}[" in row and "garbage, not Avro" in row  # the original bytes
    # A second one, later: listed first.
    sagas_run.send_garbage(b"junk-2", b"\xc3\x01" + b"\xff" * 8 + b"unknown schema")
    page = eventually(client, "/dead-letters", lambda text: 'data-key="junk-2"' in text, "the second dead letter")
    assert page.index('data-key="junk-2"') < page.index('data-key="junk-1"')
    assert "unknown schema fingerprint" in page and "2 dead letters" in page


# --- cancel -----------------------------------------------------------------------------------


def _cli_refusal(d: ConsoleDeployment, saga_id: str, command: str = "cancel", *args: str) -> str:
    result = CliRunner().invoke(cli, d.cli_args(command, saga_id, *args))
    assert result.exit_code == 2, result.output
    return result.stderr.strip().removeprefix("error: ")


def test_cancel_aborts_a_running_saga_then_refuses_as_saga_cancel_does(
    client: TestClient, sagas_run: ConsoleDeployment
) -> None:
    eventually(client, "/sagas/hang-1", lambda text: 'data-status="RUNNING"' in text, "hang-1 running")
    # Another site's page cannot post here.
    foreign = client.post("/sagas/hang-1/cancel", data={"reason": "x"}, headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403

    response = client.post("/sagas/hang-1/cancel", data={"reason": "customer called"}, headers={"HX-Request": "true"})
    assert response.status_code == 200 and "cancel requested for saga hang-1" in response.text
    assert response.headers["HX-Trigger"] == "saga-changed"
    page = eventually(client, "/sagas/hang-1", lambda text: 'data-status="ABORTED"' in text, "hang-1 aborted", timeout=60)
    assert "customer called" in page[page.index('id="failure"'):][:300]  # the reason, in the alert
    assert [b[:2] for b in _timeline_rows(page)["reserve"]] == [("execute", "IN_FLIGHT_AT_ABORT"), ("compensate", "COMPENSATED")]

    # Refusals: the same words as 'saga cancel', with a status code saying which.
    for saga_id, status in (("hang-1", 409), ("ok-1", 409), ("stuck-1", 409), ("ghost", 404)):
        expected = _cli_refusal(sagas_run, saga_id)
        refused = client.post(f"/sagas/{saga_id}/cancel", data={}, headers={"HX-Request": "true"})
        assert refused.status_code == status, (saga_id, refused.text)
        assert expected in html.unescape(refused.text), (expected, refused.text)
    assert "already being compensated" in _cli_refusal(sagas_run, "stuck-1")
    assert "already finished (COMPLETED)" in _cli_refusal(sagas_run, "ok-1")


def test_cancel_without_javascript_redirects_back_with_the_outcome(client: TestClient, sagas_run: ConsoleDeployment) -> None:
    sagas_run.start("order", "hang-2", {"amount": 1, "hang": True})
    eventually(client, "/sagas/hang-2", lambda text: 'data-status="RUNNING"' in text, "hang-2 running")
    response = client.post("/sagas/hang-2/cancel", data={"reason": ""}, headers={"Origin": "http://testserver"})
    assert response.status_code == 303
    assert response.headers["location"].startswith("/sagas/hang-2?notice=cancel+requested")
    page = client.get(response.headers["location"]).text
    assert "cancel requested for saga hang-2 (cancelled by operator)" in page
    eventually(client, "/sagas/hang-2", lambda text: 'data-status="ABORTED"' in text, "hang-2 aborted")


# --- the command ------------------------------------------------------------------------------


def test_console_command_refuses_a_wrong_prefix_and_a_busy_port(console_deployment: ConsoleDeployment) -> None:
    d = console_deployment
    wrong = CliRunner().invoke(cli, ["console", "-b", d.bootstrap, "--topic-prefix", f"nothing-{uuid.uuid4().hex[:6]}",
                                     "--state-dir", str(d.state_dir)])
    assert wrong.exit_code == 2 and "does not exist" in wrong.stderr and "\n" not in wrong.stderr.strip()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli, d.cli_args("console", "--port", str(port)))
    assert result.exit_code == 2 and f"port {port} on 127.0.0.1 is in use" in result.stderr


# --- incidents ----------------------------------------------------------------------------------


def test_an_incident_shows_and_is_answered_as_saga_retry_and_resolve_do(
    client: TestClient, sagas_run: ConsoleDeployment
) -> None:
    page = eventually(client, "/sagas/refund-1", lambda text: 'data-incident="reserve"' in text, "refund-1's incident")
    alert = page[page.index('data-incident="reserve"'):][:4000]
    assert "cannot undo: the goods already left the warehouse" in alert
    assert 'data-action="retry"' in alert and 'data-action="resolve"' in alert
    assert ("compensate", "COMP_FAILED", "1") in _timeline_rows(page)["reserve"]
    assert 'data-flag="incident"' in page

    def post(saga_id: str, action: str, **form: str) -> tuple[int, str]:
        response = client.post(f"/sagas/{saga_id}/{action}", data=form, headers={"HX-Request": "true"})
        return response.status_code, html.unescape(response.text)

    # Refused as the CLI refuses, in its words.
    for saga_id, command, form, cli_args in (
        ("ok-1", "retry", {}, ()),
        ("no-1", "resolve", {"step": "reserve", "reason": "x"}, ("--step", "reserve", "--as-compensated", "--reason", "x")),
        ("hang-1", "retry", {}, ()),
    ):
        code, text = post(saga_id, command, **form)
        assert code == 409 and _cli_refusal(sagas_run, saga_id, command, *cli_args) in text, text
    code, text = post("refund-1", "resolve", step="reserve", reason="")
    assert code == 409 and "needs a reason" in text
    assert post("refund-1", "undo")[0] == 404

    # Retry: the compensation runs again (and fails again: a new incident).
    code, text = post("refund-1", "retry", step="reserve", operator="ann", reason="warehouse called back")
    assert code == 200 and "retry requested for saga refund-1 step reserve" in text, text
    page = eventually(client, "/sagas/refund-1", lambda text: 'data-flag="retried"' in text
                      and ("compensate", "COMP_FAILED", "2") in _timeline_rows(text)["reserve"], "the retry and the new incident")
    assert "ann" in page and "warehouse called back" in page

    # Resolve: the step counts as compensated and the saga ends.
    code, text = post("refund-1", "resolve", step="reserve", operator="ann", reason="refunded by hand, ticket 981")
    assert code == 200, text
    page = eventually(client, "/sagas/refund-1", lambda text: 'data-status="ABORTED"' in text, "refund-1 aborted")
    assert 'data-flag="resolved"' in page and "refunded by hand, ticket 981" in page
    assert 'data-incident=' not in page
    assert client.get("/sagas?incident=1").text.count("<tr data-saga=") == 0
