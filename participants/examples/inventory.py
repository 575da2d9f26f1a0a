"""A small, real inventory in SQLite: the business logic every example participant shares.

An inventory has *items* (a flight, a hotel, a car class, a customer's credit line), each with
a fixed capacity and what is still available, and *holds*: what each saga has taken. Executing
a step takes a hold (available goes down, or a :class:`BusinessFailure` when there is not
enough); compensating it gives the hold back. So the books always balance:

    capacity - available == sum of the item's holds          (for every item)

and after a run, the holds are exactly the completed sagas: an aborted saga leaves nothing
behind, a completed one holds exactly once. :func:`inventory_report` reads those numbers for
the demo's consistency check.

Items are created on first use with the default capacity, so payloads may name any item.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from participants.sdk import BusinessFailure, StepContext, TransientFailure

SCHEMA = """
CREATE TABLE IF NOT EXISTS inventory_items (
    item      TEXT    PRIMARY KEY,
    capacity  INTEGER NOT NULL,
    available INTEGER NOT NULL CHECK (available >= 0 AND available <= capacity)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inventory_holds (
    saga_id    TEXT    PRIMARY KEY,
    item       TEXT    NOT NULL REFERENCES inventory_items (item),
    quantity   INTEGER NOT NULL CHECK (quantity > 0),
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
"""

#: Payload check for rules of one business: returns why a request is refused, or None.
Rule = Callable[[Mapping[str, Any]], str | None]


def simulated_refusal(salt: str, saga_id: str, rate: float) -> bool:
    """True for about ``rate`` of saga ids, always the same ones: reproducible aborts in demos.

    The hash is salted by participant, so two participants with the same rate refuse
    different sagas.
    """
    if rate <= 0:
        return False
    digest = hashlib.blake2b(f"{salt}/{saga_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


def simulated_glitch(salt: str, saga_id: str, attempt: int, rate: float) -> bool:
    """True for about ``rate`` of (saga, attempt): a transient error that a retry gets past."""
    return simulated_refusal(f"{salt}/glitch/{attempt}", saga_id, rate)


@dataclass(frozen=True)
class Inventory:
    """How one business maps a saga payload onto its items, and when it says no.

    ``item_key`` / ``quantity_key`` name the payload fields read (with defaults when absent);
    ``failure_rate`` refuses that share of sagas (deterministically, by saga id) with
    ``refusal``; ``glitch_rate`` raises a transient error on that share of attempts, which
    becomes a RETRYABLE_ERROR reply; ``rules`` are extra business checks.
    """

    participant: str
    step: str
    item_key: str
    default_item: str
    unit: str
    quantity_key: str | None = None
    default_quantity: int = 1
    capacity: int = 1_000_000
    failure_rate: float = 0.0
    glitch_rate: float = 0.0
    refusal: str = "refused"
    exhausted: str = "not enough {unit}s left on {item}: {available} available, {quantity} asked"
    rules: tuple[Rule, ...] = field(default=())

    def setup(self, conn: sqlite3.Connection) -> None:
        """Create the tables (idempotent); the SDK runs it inside its setup transaction."""
        for statement in (s.strip() for s in SCHEMA.split(";")):
            if statement:
                conn.execute(statement)

    def request(self, payload: Any) -> tuple[str, int]:
        """(item, quantity) asked for by a saga payload; a malformed payload is a business failure."""
        if not isinstance(payload, Mapping):
            raise BusinessFailure(f"payload must be a JSON object, not {type(payload).__name__}")
        item = payload.get(self.item_key, self.default_item)
        raw = payload.get(self.quantity_key, self.default_quantity) if self.quantity_key else self.default_quantity
        if not isinstance(item, str | int) or isinstance(item, bool) or str(item) == "":
            raise BusinessFailure(f"{self.item_key!r} must be a non-empty string, not {item!r}")
        if not isinstance(raw, int) or isinstance(raw, bool) or raw <= 0:
            raise BusinessFailure(f"{self.quantity_key!r} must be a positive integer, not {raw!r}")
        return str(item), raw

    def reserve(self, ctx: StepContext, tx: sqlite3.Connection) -> dict[str, Any]:
        """Execute: take a hold for the saga, or refuse (BusinessFailure) without changing anything."""
        if simulated_glitch(self.participant, ctx.saga_id, ctx.attempt, self.glitch_rate):
            raise TransientFailure(f"{self.participant}: simulated transient outage (attempt {ctx.attempt})")
        item, quantity = self.request(ctx.payload)
        payload = ctx.payload if isinstance(ctx.payload, Mapping) else {}
        for rule in self.rules:
            why = rule(payload)
            if why is not None:
                raise BusinessFailure(why)
        if simulated_refusal(self.participant, ctx.saga_id, self.failure_rate):
            raise BusinessFailure(f"{self.refusal} (simulated: failure rate {self.failure_rate:g})")
        tx.execute(
            "INSERT OR IGNORE INTO inventory_items (item, capacity, available) VALUES (?, ?, ?)",
            (item, self.capacity, self.capacity),
        )
        taken = tx.execute(
            "UPDATE inventory_items SET available = available - ? WHERE item = ? AND available >= ?",
            (quantity, item, quantity),
        ).rowcount
        if taken == 0:
            (available,) = tx.execute("SELECT available FROM inventory_items WHERE item = ?", (item,)).fetchone()
            raise BusinessFailure(self.exhausted.format(unit=self.unit, item=item, available=available,
                                                        quantity=quantity))
        # The primary key on saga_id is a second line of defence: a saga can never hold twice.
        tx.execute(
            "INSERT INTO inventory_holds (saga_id, item, quantity, created_ms) VALUES (?, ?, ?, ?)",
            (ctx.saga_id, item, quantity, int(time.time() * 1000)),
        )
        return {"item": item, "quantity": quantity, "reference": f"{self.participant}-{_short(ctx.saga_id)}"}

    def release(self, ctx: StepContext, tx: sqlite3.Connection) -> dict[str, Any]:
        """Compensate: give the saga's hold back. Idempotent: no hold, nothing to give back."""
        row = tx.execute("SELECT item, quantity FROM inventory_holds WHERE saga_id = ?", (ctx.saga_id,)).fetchone()
        if row is None:
            return {"released": 0}
        item, quantity = row
        tx.execute("UPDATE inventory_items SET available = available + ? WHERE item = ?", (quantity, item))
        tx.execute("DELETE FROM inventory_holds WHERE saga_id = ?", (ctx.saga_id,))
        return {"item": item, "released": quantity}


@dataclass(frozen=True)
class ItemBalance:
    capacity: int
    available: int
    held: int  # sum of the holds on the item

    @property
    def balanced(self) -> bool:
        return self.capacity - self.available == self.held


@dataclass(frozen=True)
class InventoryReport:
    """The books of one example participant: items and the sagas that hold something."""

    items: dict[str, ItemBalance]
    holds: dict[str, tuple[str, int]]  # saga id -> (item, quantity)

    @property
    def balanced(self) -> bool:
        """Every item's capacity - available equals what its holds add up to."""
        return all(balance.balanced for balance in self.items.values())

    @property
    def holding_sagas(self) -> set[str]:
        """Sagas that hold something: after a run, exactly the completed ones."""
        return set(self.holds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "balanced": self.balanced,
            "items": {k: {"capacity": v.capacity, "available": v.available, "held": v.held}
                      for k, v in sorted(self.items.items())},
            "holds": {k: {"item": item, "quantity": q} for k, (item, q) in sorted(self.holds.items())},
        }


def inventory_report(db_path: str | Path) -> InventoryReport:
    """Read the books of a participant database (read-only; safe while the participant runs)."""
    path = Path(db_path)
    if not path.exists():
        raise FileNotFoundError(f"no participant database at {path}")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        holds = {
            saga_id: (item, int(quantity))
            for saga_id, item, quantity in conn.execute("SELECT saga_id, item, quantity FROM inventory_holds")
        }
        held: dict[str, int] = {}
        for item, quantity in holds.values():
            held[item] = held.get(item, 0) + quantity
        items = {
            item: ItemBalance(int(capacity), int(available), held.get(item, 0))
            for item, capacity, available in conn.execute("SELECT item, capacity, available FROM inventory_items")
        }
    finally:
        conn.close()
    return InventoryReport(items=items, holds=holds)


def _short(saga_id: str) -> str:
    return hashlib.blake2b(saga_id.encode(), digest_size=4).hexdigest()
