"""The example participants' business logic, on plain SQLite (no broker).

The SDK runs each handler inside a savepoint; :func:`in_savepoint` does the same here, so a
refusal leaves the books exactly as they were, as it does in production.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from participants.examples import (
    EXAMPLE_DEFINITIONS_DIR,
    EXAMPLES,
    ExampleOptions,
    Inventory,
    example_for,
    example_inventory,
    inventory_report,
)
from participants.examples.inventory import simulated_glitch, simulated_refusal
from participants.sdk import BusinessFailure, StepContext, TransientFailure
from participants.store import SqliteStore
from sagalog.definition import DefinitionSet
from sagalog.errors import ConfigError
from sagalog.records import Action


def ctx(saga_id: str, payload: Any, *, attempt: int = 1, action: Action = Action.EXECUTE) -> StepContext:
    return StepContext(saga_id=saga_id, saga_type="test", step="step", action=action, attempt=attempt, epoch=1,
                       command_id=f"{saga_id}/step/{action.value.lower()}", payload=payload, outputs={},
                       deadline_ms=0)


def in_savepoint(conn: sqlite3.Connection, fn: Callable[[], Any]) -> Any:
    """Run fn like the SDK runs a handler: its writes are undone if it raises."""
    conn.execute("SAVEPOINT t")
    try:
        result = fn()
    except BaseException:
        conn.execute("ROLLBACK TO t")
        conn.execute("RELEASE t")
        raise
    conn.execute("RELEASE t")
    return result


@pytest.fixture
def books(tmp_path: Path) -> Iterator[Callable[[str, ExampleOptions], tuple[Inventory, sqlite3.Connection, Path]]]:
    """Open an example's database the way the participant does (same store, same setup)."""
    stores: list[SqliteStore] = []

    def open_books(name: str, options: ExampleOptions | None = None) -> tuple[Inventory, sqlite3.Connection, Path]:
        inventory = example_inventory(name, options or ExampleOptions())
        store = SqliteStore(tmp_path / f"{name}.db", setup=inventory.setup)
        store.open()
        stores.append(store)
        return inventory, store.connection, store.path

    yield open_books
    for store in stores:
        store.close()


def test_reserve_takes_and_release_gives_back(books: Any) -> None:
    flights, conn, path = books("flights", ExampleOptions(capacity=10))
    out = in_savepoint(conn, lambda: flights.reserve(ctx("s1", {"flight": "LH1", "travellers": 3}), conn))
    assert out["item"] == "LH1" and out["quantity"] == 3
    in_savepoint(conn, lambda: flights.reserve(ctx("s2", {"flight": "LH1"}), conn))

    report = inventory_report(path)
    assert report.items["LH1"].available == 6
    assert report.holds == {"s1": ("LH1", 3), "s2": ("LH1", 1)}
    assert report.balanced

    assert in_savepoint(conn, lambda: flights.release(ctx("s1", {}, action=Action.COMPENSATE), conn)) == {
        "item": "LH1", "released": 3}
    report = inventory_report(path)
    assert report.items["LH1"].available == 9
    assert report.holding_sagas == {"s2"}
    assert report.balanced


def test_release_is_idempotent_and_harmless_without_a_hold(books: Any) -> None:
    hotels, conn, path = books("hotels", ExampleOptions(capacity=5))
    in_savepoint(conn, lambda: hotels.reserve(ctx("s1", {"rooms": 2}), conn))
    hotels.release(ctx("s1", {}), conn)
    assert hotels.release(ctx("s1", {}), conn) == {"released": 0}
    assert hotels.release(ctx("never-booked", {}), conn) == {"released": 0}
    report = inventory_report(path)
    assert report.items["grand-central"].available == 5
    assert report.holds == {} and report.balanced


def test_sold_out_is_a_business_failure_that_changes_nothing(books: Any) -> None:
    cars, conn, path = books("cars", ExampleOptions(capacity=2))
    in_savepoint(conn, lambda: cars.reserve(ctx("s1", {"car": "van"}), conn))
    in_savepoint(conn, lambda: cars.reserve(ctx("s2", {"car": "van"}), conn))
    with pytest.raises(BusinessFailure, match="no van car left"):
        in_savepoint(conn, lambda: cars.reserve(ctx("s3", {"car": "van"}), conn))
    with pytest.raises(BusinessFailure, match="sold out"):
        flights, fconn, _ = books("flights", ExampleOptions(capacity=1))
        in_savepoint(fconn, lambda: flights.reserve(ctx("s4", {"travellers": 2}), fconn))
    report = inventory_report(path)
    assert report.items["van"].available == 0
    assert report.holding_sagas == {"s1", "s2"}
    assert report.balanced


def test_a_saga_cannot_hold_twice(books: Any) -> None:
    """The journal prevents a second execute; the primary key is the second line of defence."""
    flights, conn, path = books("flights", ExampleOptions(capacity=10))
    in_savepoint(conn, lambda: flights.reserve(ctx("s1", {}), conn))
    with pytest.raises(sqlite3.IntegrityError):
        in_savepoint(conn, lambda: flights.reserve(ctx("s1", {}), conn))
    assert inventory_report(path).items["SK-101"].available == 9


def test_credit_limit(books: Any) -> None:
    credit, conn, path = books("credit", ExampleOptions(capacity=500))
    in_savepoint(conn, lambda: credit.reserve(ctx("o1", {"customer": "c-7", "amount": 300}), conn))
    with pytest.raises(BusinessFailure, match="credit limit of customer c-7 exceeded: 200 left, 250 asked"):
        in_savepoint(conn, lambda: credit.reserve(ctx("o2", {"customer": "c-7", "amount": 250}), conn))
    in_savepoint(conn, lambda: credit.reserve(ctx("o3", {"customer": "c-7", "amount": 200}), conn))
    credit.release(ctx("o1", {}), conn)
    report = inventory_report(path)
    assert report.items["c-7"].available == 300
    assert report.holding_sagas == {"o3"} and report.balanced


def test_payment_declines_expired_cards_and_refunds(books: Any) -> None:
    payments, conn, path = books("payments")
    with pytest.raises(BusinessFailure, match="expired"):
        in_savepoint(conn, lambda: payments.reserve(ctx("o1", {"customer": "c-1", "amount": 10, "card": "expired"}),
                                                    conn))
    in_savepoint(conn, lambda: payments.reserve(ctx("o2", {"customer": "c-1", "amount": 10}), conn))
    assert inventory_report(path).holds == {"o2": ("c-1", 10)}
    payments.release(ctx("o2", {}), conn)
    report = inventory_report(path)
    assert report.holds == {} and report.balanced


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (["not", "an", "object"], "JSON object"),
        ({"travellers": 0}, "positive integer"),
        ({"travellers": "two"}, "positive integer"),
        ({"travellers": True}, "positive integer"),
        ({"flight": ""}, "non-empty string"),
        ({"flight": {"no": 1}}, "non-empty string"),
    ],
)
def test_malformed_payloads_are_business_failures(books: Any, payload: Any, match: str) -> None:
    flights, conn, path = books("flights")
    with pytest.raises(BusinessFailure, match=match):
        in_savepoint(conn, lambda: flights.reserve(ctx("s1", payload), conn))
    assert inventory_report(path).items == {}


def test_failure_rate_is_deterministic_and_about_right() -> None:
    sagas = [f"saga-{i}" for i in range(20_000)]
    refused = [s for s in sagas if simulated_refusal("cars", s, 0.1)]
    assert 0.09 < len(refused) / len(sagas) < 0.11
    assert refused == [s for s in sagas if simulated_refusal("cars", s, 0.1)]  # reproducible
    assert not any(simulated_refusal("cars", s, 0.0) for s in sagas[:1000])
    assert all(simulated_refusal("cars", s, 1.0) for s in sagas[:1000])
    # Salted by participant: two services refuse different sagas.
    assert refused != [s for s in sagas if simulated_refusal("payments", s, 0.1)]
    # Glitches depend on the attempt too, so a retry gets past them.
    glitchy = [s for s in sagas[:2000] if simulated_glitch("cars", s, 1, 0.5)]
    assert any(not simulated_glitch("cars", s, 2, 0.5) for s in glitchy)


def test_failure_rate_applies_to_the_refusing_participants_only(books: Any) -> None:
    options = ExampleOptions(failure_rate=1.0)
    cars, conn, _ = books("cars", options)
    with pytest.raises(BusinessFailure, match="no car available"):
        in_savepoint(conn, lambda: cars.reserve(ctx("s1", {}), conn))
    flights, fconn, _ = books("flights", options)
    in_savepoint(fconn, lambda: flights.reserve(ctx("s1", {}), fconn))  # flights ignore it


def test_glitches_are_transient_errors(books: Any) -> None:
    hotels, conn, path = books("hotels", ExampleOptions(glitch_rate=1.0))
    with pytest.raises(TransientFailure, match="transient"):
        in_savepoint(conn, lambda: hotels.reserve(ctx("s1", {}), conn))
    assert inventory_report(path).items == {}


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="failure-rate"):
        ExampleOptions(failure_rate=1.5)
    with pytest.raises(ConfigError, match="capacity"):
        ExampleOptions(capacity=0)


def test_example_names() -> None:
    assert set(EXAMPLES) == {"flights", "hotels", "cars", "credit", "payments", "noop"}
    assert example_for("noop-2").name == "noop"
    with pytest.raises(ConfigError, match="valid: flights, hotels, cars, credit, payments, noop"):
        example_for("trains")
    with pytest.raises(ConfigError):
        example_for("noop-")


def test_report_of_a_missing_database(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        inventory_report(tmp_path / "nope.db")


def test_definitions_use_the_examples() -> None:
    definitions = DefinitionSet.load([EXAMPLE_DEFINITIONS_DIR])
    assert {"book-trip", "place-order", "noop-3"} <= set(definitions.names())

    trip = definitions.get("book-trip")
    assert trip is not None
    assert [(s.name, s.participant) for s in trip.steps] == [
        ("book-flight", "flights"), ("book-hotel", "hotels"), ("book-car", "cars")]
    assert trip.dependencies("book-flight") == ()
    assert trip.dependencies("book-hotel") == ("book-flight",)
    assert trip.dependencies("book-car") == ("book-flight",)

    order = definitions.get("place-order")
    assert order is not None
    assert [(s.name, s.participant) for s in order.steps] == [("reserve-credit", "credit"), ("payment", "payments")]
    assert order.dependencies("payment") == ("reserve-credit",)

    # Every step of the example definitions is served by the example participant it names.
    for definition in (trip, order):
        for step in definition.steps:
            assert example_inventory(step.participant).step == step.name
