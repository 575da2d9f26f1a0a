"""Example participants with real local state, and the saga definitions that use them.

========  ================  ==========================================================
name      step (saga type)  state (one SQLite file each, ``<db-dir>/<name>.db``)
========  ================  ==========================================================
flights   book-flight       seats per flight           (book-trip)
hotels    book-hotel        rooms per hotel            (book-trip)
cars      book-car          cars per class             (book-trip; refuses ``failure_rate``)
credit    reserve-credit    credit line per customer   (place-order)
payments  payment           charges per customer       (place-order; declines ``failure_rate``)
noop      any step          none: stateless, for the benchmark (also ``noop-<suffix>``)
========  ================  ==========================================================

``EXAMPLE_DEFINITIONS_DIR`` holds ``trip.yaml`` (book-trip), ``order.yaml`` (place-order) and
``bench.yaml`` (noop-3); load them with ``DefinitionSet.load([EXAMPLE_DEFINITIONS_DIR])``.
:func:`inventory_report` reads any example's books for consistency checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from participants.examples import order, travel
from participants.examples.inventory import Inventory, InventoryReport, ItemBalance, inventory_report
from participants.examples.noop import noop_participant
from participants.sdk import Participant
from participants.store import SqliteStore
from sagalog.config import Topics
from sagalog.errors import ConfigError

EXAMPLE_DEFINITIONS_DIR = Path(__file__).resolve().parent / "definitions"
NOOP = "noop"


@dataclass(frozen=True)
class ExampleOptions:
    """Knobs for demos and chaos runs.

    ``failure_rate``: share of sagas refused by the participants that simulate refusals (cars,
    payments), deterministic by saga id. ``glitch_rate``: share of attempts failing with a
    transient error (RETRYABLE_ERROR, then a retry succeeds), for every example. ``capacity``:
    stock of each item (seats per flight, credit limit per customer, ...), None = default.
    ``step_time_ms``: ``(lo, hi)`` milliseconds each step "takes", drawn uniformly per reply,
    None = answer at once. The work is pipelined, not serial: handlers run at once and the
    outbox relay holds each reply that long (``Participant(reply_hold_s=...)``), so a slow step
    does not cap a participant's throughput.
    """

    failure_rate: float = 0.0
    glitch_rate: float = 0.0
    capacity: int | None = None
    step_time_ms: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("failure_rate", "glitch_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be between 0 and 1, not {value}")
        if self.capacity is not None and self.capacity < 1:
            raise ConfigError(f"--capacity must be at least 1, not {self.capacity}")
        if self.step_time_ms is not None:
            lo, hi = self.step_time_ms
            if not 0 <= lo <= hi:
                raise ConfigError(f"--step-time-ms must be LO-HI with 0 <= LO <= HI, not {lo}-{hi}")

    @property
    def reply_hold_s(self) -> tuple[float, float] | None:
        """``step_time_ms`` in seconds, as ``Participant(reply_hold_s=...)`` takes it."""
        if self.step_time_ms is None or self.step_time_ms[1] == 0:
            return None
        return self.step_time_ms[0] / 1000, self.step_time_ms[1] / 1000


def parse_step_time_ms(text: str) -> tuple[int, int] | None:
    """``"100-500"`` -> ``(100, 500)``, ``"250"`` -> ``(250, 250)``, ``"0"`` -> None (no step time)."""
    lo_text, sep, hi_text = text.strip().partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
    except ValueError:
        raise ConfigError(f"--step-time-ms must be milliseconds as LO-HI (e.g. 100-500) or N, not {text!r}") from None
    if not 0 <= lo <= hi:
        raise ConfigError(f"--step-time-ms must be LO-HI with 0 <= LO <= HI, not {text!r}")
    return None if hi == 0 else (lo, hi)


@dataclass(frozen=True)
class Example:
    name: str
    saga_type: str
    description: str
    inventory: Callable[..., Inventory] | None  # None: the stateless no-op
    simulates_refusals: bool = False


EXAMPLES: dict[str, Example] = {
    e.name: e
    for e in (
        Example("flights", "book-trip", "seats per flight; sold out -> business failure", travel.flights),
        Example("hotels", "book-trip", "rooms per hotel; full -> business failure", travel.hotels),
        Example("cars", "book-trip", "cars per class; refuses --failure-rate of trips", travel.cars, True),
        Example("credit", "place-order", "credit line per customer; over the limit -> business failure",
                order.credit),
        Example("payments", "place-order", "charges per customer; declines --failure-rate of orders "
                "and expired cards", order.payments, True),
        Example(NOOP, "noop-3", "stateless, answers SUCCESS to any step (benchmark); also noop-<suffix>", None),
    )
}


def example_for(name: str) -> Example:
    """The example a participant name runs; ``noop-<suffix>`` are more no-op participants."""
    if name in EXAMPLES:
        return EXAMPLES[name]
    if name.startswith(f"{NOOP}-") and len(name) > len(NOOP) + 1:
        return EXAMPLES[NOOP]
    raise ConfigError(f"unknown example participant {name!r}; valid: {', '.join(EXAMPLES)} (or noop-<suffix>)")


def example_inventory(name: str, options: ExampleOptions = ExampleOptions()) -> Inventory:
    """The business logic of a stateful example, configured by ``options``."""
    example = example_for(name)
    if example.inventory is None:
        raise ConfigError(f"{name!r} is stateless: it has no inventory")
    kwargs: dict[str, Any] = {
        "failure_rate": options.failure_rate if example.simulates_refusals else 0.0,
        "glitch_rate": options.glitch_rate,
    }
    if options.capacity is not None:
        kwargs["capacity"] = options.capacity
    return example.inventory(**kwargs)


def db_path(db_dir: str | Path, name: str) -> Path:
    """Where an example keeps its state (journal, outbox, offsets and inventory in one file)."""
    return Path(db_dir) / f"{name}.db"


def build_participant(
    name: str,
    *,
    topics: Topics,
    bootstrap: str,
    db_dir: str | Path,
    options: ExampleOptions = ExampleOptions(),
    **participant_kwargs: Any,
) -> Participant:
    """A ready-to-run example participant; extra keyword arguments go to :class:`Participant`.

    ``options.step_time_ms`` becomes the participant's ``reply_hold_s`` (unless given explicitly).
    """
    example = example_for(name)
    if options.reply_hold_s is not None:
        participant_kwargs.setdefault("reply_hold_s", options.reply_hold_s)
    if example.inventory is None:  # the no-op has no business to fail: only the step time applies
        return noop_participant(name, topics=topics, bootstrap=bootstrap, **participant_kwargs)
    inventory = example_inventory(name, options)
    store = SqliteStore(db_path(db_dir, name), setup=inventory.setup)
    participant = Participant(name, topics=topics, bootstrap=bootstrap, store=store, **participant_kwargs)
    participant.execute(inventory.step)(inventory.reserve)
    participant.compensate(inventory.step)(inventory.release)
    return participant


__all__ = [
    "EXAMPLES",
    "EXAMPLE_DEFINITIONS_DIR",
    "Example",
    "ExampleOptions",
    "Inventory",
    "InventoryReport",
    "ItemBalance",
    "build_participant",
    "db_path",
    "example_for",
    "example_inventory",
    "inventory_report",
    "noop_participant",
    "parse_step_time_ms",
]
