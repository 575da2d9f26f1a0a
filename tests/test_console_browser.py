"""``saga console`` as a user sees it: the real process, in headless Chromium driven by Playwright.

Chromium comes from Debian's packages (``apt-get install chromium``: /usr/bin/chromium) and
Playwright from PyPI; Playwright never downloads a browser of its own here. Without either, the
tests skip with the reason. With ``SAGA_CONSOLE_SCREENSHOTS=DIR`` set, the list, a compensated
saga's time line, the partitions page and the dead letters are saved as
``DIR/console-{list,saga,partitions,dead-letters}.png`` (the README shows the first three).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import ManagerProcess, reply_to, wait_terminal
from test_console import ConsoleDeployment, deploy

from sagalog.codec import Codec
from sagalog.records import Action, ParticipantCommand, ParticipantReply, ReplyOutcome, StartSaga

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SCREENSHOTS_ENV = "SAGA_CONSOLE_SCREENSHOTS"
TIMEOUT_MS = 45_000  # generous: 2 cores shared with the broker, the managers and other test runs

DEFINITIONS = """
sagas:
  - name: book-trip
    steps:
      - {name: flight, participant: web-flights, timeout_s: 30, retry: {attempts: 3, backoff_initial_s: 0.25, jitter: 0}}
      - {name: hotel, participant: web-hotels, depends_on: [flight], timeout_s: 30, retry: {attempts: 1}}
      - {name: car, participant: web-cars, depends_on: [flight], timeout_s: 30, retry: {attempts: 1}}
  - name: place-order
    steps:
      - {name: reserve, participant: web-stock, timeout_s: 30}
      - {name: charge, participant: web-payments, timeout_s: 30, retry: {attempts: 2, backoff_initial_s: 0.3, jitter: 0}}
      - {name: ship, participant: web-stock, timeout_s: 30, compensable: false}
"""
PARTICIPANTS = ["web-flights", "web-hotels", "web-cars", "web-stock", "web-payments"]
FAILURES = {"hotel": "no rooms left at the Ritz on 2025-06-12", "charge": "card declined: insufficient funds"}
OUTPUTS = {"flight": {"booking": "LH-1234", "seat": "14C"}, "hotel": {"room": 512}, "car": {"plate": "M-SG 42"},
           "reserve": {"reservation": "R-77"}, "charge": {"receipt": "PAY-9001"}, "ship": {"tracking": "1Z999"}}


def respond(cmd: ParticipantCommand) -> list[ParticipantReply]:
    """The payload says what goes wrong: ``fail`` (a business failure of that step), ``flaky``
    (that step's first attempt gets a retryable error), ``hang`` (that step never answers),
    ``stuck`` (compensations never answer), ``comp_fail`` (that step cannot be undone: an incident)."""
    p = json.loads(cmd.payload)
    if cmd.action is Action.COMPENSATE:
        if p.get("comp_fail") == cmd.step:
            return [reply_to(cmd, ReplyOutcome.BUSINESS_FAILURE, error="cannot release R-77: already picked")]
        return [] if p.get("stuck") else [reply_to(cmd, output='{"undone": true}')]
    if p.get("hang") == cmd.step:
        return []
    if p.get("flaky") == cmd.step and cmd.attempt == 1:
        return [reply_to(cmd, ReplyOutcome.RETRYABLE_ERROR, error="upstream answered 503 Service Unavailable")]
    if p.get("fail") == cmd.step:
        return [reply_to(cmd, ReplyOutcome.BUSINESS_FAILURE, error=FAILURES.get(cmd.step, "refused"))]
    return [reply_to(cmd, output=json.dumps(OUTPUTS.get(cmd.step, {})))]


SAGAS: list[tuple[str, str, dict[str, Any]]] = [
    ("place-order", "order-1001", {"customer": "ada", "amount": 25}),
    ("book-trip", "trip-lisbon-0612", {"traveller": "ada", "to": "LIS"}),
    ("place-order", "order-1002", {"customer": "bob", "amount": 120}),
    ("place-order", "order-1003", {"customer": "cy", "amount": 15, "flaky": "charge"}),
    ("book-trip", "trip-ritz-0612", {"traveller": "bob", "to": "PAR", "fail": "hotel", "flaky": "flight"}),
    ("place-order", "order-1004", {"customer": "dee", "amount": 990, "fail": "charge"}),
    ("book-trip", "trip-oslo-0701", {"traveller": "cy", "to": "OSL"}),
    ("place-order", "order-1005", {"customer": "eve", "amount": 42}),
    ("place-order", "order-1006", {"customer": "fay", "amount": 310, "fail": "charge", "stuck": True}),
    ("book-trip", "trip-nyc-0815", {"traveller": "dee", "to": "JFK", "hang": "hotel"}),
    ("place-order", "order-1007", {"customer": "gus", "amount": 64}),
    ("place-order", "order-1008", {"customer": "hal", "amount": 5, "hang": "reserve"}),
    ("place-order", "order-1009", {"customer": "kim", "amount": 77, "fail": "charge", "comp_fail": "reserve"}),
]
FINISHING = [saga_id for _, saga_id, p in SAGAS if not {"hang", "stuck", "comp_fail"} & set(p)]


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; never 'playwright install')"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _missing()
    if reason is not None:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def deployment(browser: Any, bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleDeployment]:
    """Trips and orders that complete, abort (some after retries), hang and get stuck; two dead letters."""
    tmp = tmp_path_factory.mktemp("console-browser")
    with deploy(bootstrap, tmp, definitions=DEFINITIONS, participants=PARTICIPANTS, respond=respond, delay_s=0.3) as d:
        for saga_type, saga_id, payload in SAGAS:
            d.start(saga_type, saga_id, payload)
        d.send_garbage(b"junk-1")
        d.send_garbage(b"teleport-1", Codec().encode(StartSaga(saga_id="teleport-1", saga_type="teleport", payload="{}", requested_ms=0)))
        wait_terminal(d.bootstrap, d.topics, FINISHING, 120)
        yield d


@pytest.fixture(scope="module")
def console(deployment: ConsoleDeployment) -> Iterator[str]:
    """``saga console`` as a real process on a free port; its base URL. Stopped with SIGTERM."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(deployment.tmp / "console.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "sagacli", *deployment.cli_args("console", "--port", str(port), "--group-id", deployment.group_id)],
        stdout=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = _first_line(proc.stdout, 60)
        assert f"saga console on http://127.0.0.1:{port}/" in line, (line, (deployment.tmp / "console.log").read_text())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        log.close()
    assert code == 0, (deployment.tmp / "console.log").read_text()


def _first_line(stream: Any, timeout_s: float) -> str:
    """The process's first line of output, waiting for it (not for a fixed time)."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            raise AssertionError(f"saga console printed nothing in {timeout_s:g} s")
    return stream.readline().decode()


@pytest.fixture
def page(browser: Any, console: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=console)
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)  # expect's own default is 5 s
    try:
        yield tab
    finally:
        context.close()


def screenshot(page: Any, name: str, *, full_page: bool = False) -> None:
    where = os.environ.get(SCREENSHOTS_ENV)
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(where) / name), full_page=full_page)


def count(page: Any, status: str) -> int:
    return int(page.locator(f'.chip[data-status="{status}"] .count').inner_text())


def test_the_list_updates_live_and_filters(page: Any, deployment: ConsoleDeployment) -> None:
    from playwright.sync_api import expect

    page.goto("/sagas")
    for saga_id in FINISHING:
        expect(page.locator(f'tr[data-saga="{saga_id}"]')).to_have_attribute("data-status", _final(saga_id))
    before = count(page, "ALL")
    assert before == len(SAGAS)

    # A saga started now appears, then completes, without reloading the page (htmx polling).
    page.evaluate("window.__loaded = true")
    deployment.start("place-order", "order-live", {"customer": "ivy", "amount": 8})
    row = page.locator('tr[data-saga="order-live"]')
    expect(row).to_be_visible()
    expect(row).to_have_attribute("data-status", "COMPLETED")
    expect(page.locator('.chip[data-status="ALL"] .count')).to_have_text(str(before + 1))
    assert page.evaluate("window.__loaded") is True  # same document: no reload happened

    # Typing in the search box filters as you type, and the URL follows.
    page.fill("#q", "trip-")
    expect(page.locator("tr[data-saga]")).to_have_count(4)
    assert "q=trip-" in page.url
    page.select_option('select[name="status"]', "ABORTED")
    expect(page.locator("tr[data-saga]")).to_have_count(1)
    expect(page.locator('tr[data-saga="trip-ritz-0612"]')).to_be_visible()

    page.goto("/sagas")
    expect(page.locator('tr[data-saga="order-1006"]')).to_have_attribute("data-status", "COMPENSATING")
    screenshot(page, "console-list.png")


def _final(saga_id: str) -> str:
    payload = next(p for _, i, p in SAGAS if i == saga_id)
    return "ABORTED" if "fail" in payload else "COMPLETED"


def test_a_compensated_sagas_time_line(page: Any) -> None:
    from playwright.sync_api import expect

    page.goto("/sagas")
    page.click('a[href="/sagas/trip-ritz-0612"]')
    expect(page.locator("#saga-head")).to_have_attribute("data-status", "ABORTED")
    failure = page.locator("#failure")
    expect(failure).to_be_visible()
    expect(failure).to_contain_text("no rooms left at the Ritz")
    expect(failure.locator(".failing-step")).to_have_text("hotel")

    flight = page.locator('.tl-row[data-step="flight"]')
    expect(flight.locator('.bar[data-outcome="RETRIED"]')).to_have_count(1)  # the retry is visible
    execute = flight.locator('.bar[data-kind="execute"][data-outcome="SUCCEEDED"]').bounding_box()
    compensate = flight.locator('.bar[data-kind="compensate"]').bounding_box()
    assert execute and compensate and compensate["x"] >= execute["x"] + execute["width"] - 1  # later, same axis
    assert compensate["y"] > execute["y"]  # its own lane
    expect(page.locator('.tl-row.failing[data-step="hotel"] .bar[data-outcome="FAILED"]')).to_be_visible()
    expect(page.locator(".tl-error")).to_contain_text("no rooms left at the Ritz")
    expect(page.locator("tr[data-event]").first).to_have_attribute("data-event", "SagaBegun")
    screenshot(page, "console-saga.png", full_page=True)


def test_cancel_a_running_saga(page: Any, deployment: ConsoleDeployment) -> None:
    from playwright.sync_api import expect

    deployment.start("place-order", "order-cancel-me", {"customer": "jo", "amount": 3, "hang": "charge"})
    page.goto("/sagas/order-cancel-me")  # maybe before a manager began it: the page polls until it has
    head = page.locator("#saga-head")
    expect(head).to_have_attribute("data-status", "RUNNING")
    expect(page.locator('.tl-row[data-step="charge"] .bar[data-outcome="RUNNING"]')).to_be_visible()

    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    page.fill("#cancel-reason", "customer asked on the phone")
    page.click("#cancel-button")
    expect(page.locator("#flash")).to_contain_text("cancel requested for saga order-cancel-me")
    assert dialogs and "order-cancel-me" in dialogs[0]
    expect(head).to_have_attribute("data-status", "ABORTED", timeout=60_000)  # live, no reload
    expect(page.locator("#failure")).to_contain_text("customer asked on the phone")
    expect(page.locator("#cancel-button")).to_have_count(0)  # the actions follow the status
    # reserve and charge were compensated; ship never ran.
    expect(page.locator('.tl-row[data-step="reserve"] .bar[data-kind="compensate"]')).to_have_count(1)
    expect(page.locator('.tl-row[data-step="charge"] .bar[data-outcome="IN_FLIGHT_AT_ABORT"]')).to_have_count(1)


def test_an_incident_is_retried_then_resolved(page: Any) -> None:
    from playwright.sync_api import expect

    page.goto("/sagas?incident=1")
    expect(page.locator("tr[data-saga]")).to_have_count(1)
    page.click('a[href="/sagas/order-1009"]')
    alert = page.locator('.alert.incident[data-incident="reserve"]')
    expect(alert).to_contain_text("cannot release R-77: already picked")
    expect(page.locator('.tl-row[data-step="reserve"] .flag[data-flag="incident"]')).to_have_count(1)
    screenshot(page, "console-incident.png", full_page=True)

    page.on("dialog", lambda dialog: dialog.accept())
    retry = alert.locator("form", has=page.locator('button[data-action="retry"]'))
    retry.locator('input[name="operator"]').fill("ann")
    retry.locator('input[name="reason"]').fill("the warehouse put it back")
    retry.locator("button").click()
    expect(page.locator("#flash")).to_contain_text("retry requested for saga order-1009 step reserve")
    # The retried compensation fails again: a second failed attempt, a new incident (the panel is re-rendered).
    expect(page.locator('.tl-row[data-step="reserve"] .bar[data-kind="compensate"][data-outcome="COMP_FAILED"]')).to_have_count(2)
    expect(page.locator('.tl-row[data-step="reserve"] .flag[data-flag="retried"]')).to_have_count(1)

    resolve = page.locator('.alert.incident[data-incident="reserve"] form', has=page.locator('button[data-action="resolve"]'))
    resolve.locator('input[name="operator"]').fill("ann")
    resolve.locator('input[name="reason"]').fill("released by hand, ticket 981")
    resolve.locator("button").click()
    expect(page.locator("#saga-head")).to_have_attribute("data-status", "ABORTED")
    expect(page.locator(".alert.incident")).to_have_count(0)
    expect(page.locator('.tl-row[data-step="reserve"] .flag[data-flag="resolved"]')).to_have_count(1)
    expect(page.locator("tr[data-event=IncidentResolved]")).to_contain_text("released by hand, ticket 981")


def test_partitions_follow_a_takeover_and_dead_letters_are_listed(page: Any, deployment: ConsoleDeployment) -> None:
    from playwright.sync_api import expect

    page.goto("/partitions")
    (only,) = set(deployment.claims().values())
    expect(page.locator(".summary")).to_contain_text(f"1 owner: {only} (3)")
    # A second manager joins: the group moves partitions to it, it claims them with a higher epoch,
    # and the page shows it without a reload.
    second = ManagerProcess(deployment.bootstrap, deployment.topics, deployment.definitions, deployment.tmp, "m2",
                            partitions=3).start()
    try:
        expect(page.locator(".summary")).to_contain_text("2 owners", timeout=90_000)
        owners = deployment.claims()
        assert len(set(owners.values())) == 2
        for p, owner in owners.items():
            row = page.locator(f'tr[data-partition="{p}"]')
            expect(row.locator('[data-col="owner"]')).to_have_text(owner)
            expect(row.locator('[data-col="lag"]')).to_have_text("0")
        moved = [p for p, owner in owners.items() if owner != only]
        expect(page.locator(f'tr[data-partition="{moved[0]}"] [data-col="epoch"]')).to_have_text("2")
        screenshot(page, "console-partitions.png")
    finally:
        second.stop()

    page.click("text=Dead letters")
    expect(page.locator('tr[data-key="junk-1"]')).to_contain_text("not Avro single-object encoded")
    expect(page.locator('tr[data-key="teleport-1"]')).to_contain_text("unknown saga type 'teleport'")
    screenshot(page, "console-dead-letters.png")
