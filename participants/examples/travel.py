"""Travel booking (the seed articles' example): flights, hotels and cars, each its own service.

Saga ``book-trip`` (``definitions/trip.yaml``): book the flight first; then the hotel and the
car in parallel, both depending on the flight. A payload looks like::

    {"flight": "SK-101", "travellers": 2, "hotel": "grand-central", "rooms": 1, "car": "compact"}

Every field is optional (defaults below). With ``failure_rate`` the car rental refuses that
share of trips (deterministically by saga id), which aborts the saga and releases the flight
seats and hotel rooms already taken.
"""

from __future__ import annotations

from participants.examples.inventory import Inventory


def flights(*, capacity: int = 1_000_000, failure_rate: float = 0.0, glitch_rate: float = 0.0) -> Inventory:
    """Seats per flight; sold out is a business failure."""
    return Inventory(
        participant="flights", step="book-flight", item_key="flight", default_item="SK-101",
        quantity_key="travellers", unit="seat", capacity=capacity, failure_rate=failure_rate,
        glitch_rate=glitch_rate, refusal="flight overbooked",
        exhausted="flight {item} is sold out: {available} seats left, {quantity} asked",
    )


def hotels(*, capacity: int = 1_000_000, failure_rate: float = 0.0, glitch_rate: float = 0.0) -> Inventory:
    """Rooms per hotel."""
    return Inventory(
        participant="hotels", step="book-hotel", item_key="hotel", default_item="grand-central",
        quantity_key="rooms", unit="room", capacity=capacity, failure_rate=failure_rate,
        glitch_rate=glitch_rate, refusal="no room available",
        exhausted="hotel {item} is full: {available} rooms left, {quantity} asked",
    )


def cars(*, capacity: int = 1_000_000, failure_rate: float = 0.0, glitch_rate: float = 0.0) -> Inventory:
    """Cars per car class, one per trip."""
    return Inventory(
        participant="cars", step="book-car", item_key="car", default_item="compact",
        unit="car", capacity=capacity, failure_rate=failure_rate, glitch_rate=glitch_rate,
        refusal="no car available",
        exhausted="no {item} car left: {available} available, {quantity} asked",
    )
