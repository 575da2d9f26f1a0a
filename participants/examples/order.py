"""Order placement (the outbox article's example): a credit check, then a payment.

Saga ``place-order`` (``definitions/order.yaml``): ``reserve-credit`` takes the order amount
from the customer's credit line (a business failure when over the limit), then ``payment``
charges the card. A failed payment releases the reserved credit. A payload looks like::

    {"customer": "c-42", "amount": 250, "card": "4111-1111"}

``"card": "expired"`` is always declined, like the article's expired credit card; with
``failure_rate`` the payment service also declines that share of orders (by saga id).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from participants.examples.inventory import Inventory

#: A payment service has no stock: its "capacity" only bounds the books (far beyond any run).
UNLIMITED = 10**15


def credit(*, capacity: int = 1_000_000, failure_rate: float = 0.0, glitch_rate: float = 0.0) -> Inventory:
    """Each customer's credit line (``capacity`` = the limit); over the limit is a business failure."""
    return Inventory(
        participant="credit", step="reserve-credit", item_key="customer", default_item="c-1",
        quantity_key="amount", default_quantity=100, unit="credit", capacity=capacity,
        failure_rate=failure_rate, glitch_rate=glitch_rate, refusal="credit check refused",
        exhausted="credit limit of customer {item} exceeded: {available} left, {quantity} asked",
    )


def _card_not_expired(payload: Mapping[str, Any]) -> str | None:
    return "card declined: expired" if payload.get("card") == "expired" else None


def payments(*, capacity: int = UNLIMITED, failure_rate: float = 0.0, glitch_rate: float = 0.0) -> Inventory:
    """Charges per customer; compensation refunds. Holds are the charges not refunded."""
    return Inventory(
        participant="payments", step="payment", item_key="customer", default_item="c-1",
        quantity_key="amount", default_quantity=100, unit="charge", capacity=capacity,
        failure_rate=failure_rate, glitch_rate=glitch_rate, refusal="card declined",
        exhausted="payment of {quantity} for {item} refused: ledger full", rules=(_card_not_expired,),
    )
