"""Prometheus metrics of participants (``Participant(..., metrics_port=P)``, ``saga participant run
--metrics-port P``): served on ``/metrics``.

One registry and one HTTP server per process, whatever the number of participants in it (the
CLI runs one :class:`~participants.sdk.Participant` per name in one process): every series has a
``participant`` label, and the participants that ask for the same port (or for port 0, any port)
share the server the first one started. Counters and histograms are updated where things happen;
the outbox gauge is computed when Prometheus scrapes. Labels are bounded sets: participant, step,
action, outcome; never a saga id.

================================================  ==========================================================
``saga_participant_commands_total``               commands handled, by ``participant``, ``action``
                                                  (``execute``, ``compensate``, ``unknown`` for a message that
                                                  is not a command) and ``outcome``: the reply's (``success``,
                                                  ``business_failure``, ``retryable_error``, ``refused``),
                                                  ``replayed`` (a duplicate answered from the journal) or
                                                  ``dead_lettered`` (nothing to act on; a command it could
                                                  answer is also answered ``BUSINESS_FAILURE``)
``saga_participant_handler_duration_seconds``     one handler call, by ``participant``/``step``/``action``
``saga_participant_outbox_pending_rows``          replies and dead letters committed, not acknowledged yet
                                                  (held ones included)
``saga_participant_replies_delivered_total``      replies the broker acknowledged
``saga_participant_batches_total``                store transactions, by ``result`` (committed / failed)
``saga_participant_commit_duration_seconds``      the commit of one batch's store transaction
================================================  ==========================================================
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from participants.sdk import Participant

_log = logging.getLogger(__name__)

#: Handlers and commits take from well under a millisecond to seconds.
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: The process's registry: every participant's series, one ``/metrics``.
REGISTRY = CollectorRegistry()
COMMANDS = Counter(
    "saga_participant_commands", "Commands handled, by how they were answered.", ["participant", "action", "outcome"], registry=REGISTRY
)
HANDLER_SECONDS = Histogram(
    "saga_participant_handler_duration_seconds", "One handler call.", ["participant", "step", "action"], buckets=_SECONDS, registry=REGISTRY
)
REPLIES_DELIVERED = Counter("saga_participant_replies_delivered", "Replies the broker acknowledged.", ["participant"], registry=REGISTRY)
BATCHES = Counter("saga_participant_batches", "Store transactions, by result.", ["participant", "result"], registry=REGISTRY)
COMMIT_SECONDS = Histogram(
    "saga_participant_commit_duration_seconds", "The commit of one batch's store transaction.", ["participant"], buckets=_SECONDS, registry=REGISTRY
)

_participants: weakref.WeakSet[Participant] = weakref.WeakSet()
_servers: dict[int, tuple[str, int]] = {}  # port asked for -> address served
_lock = threading.Lock()


class ParticipantMetrics:
    """One participant's series, bound to its name (the SDK calls these; cheap: no lookups)."""

    def __init__(self, participant: Participant) -> None:
        self.name = name = participant.name
        self._commands: dict[tuple[str, str], Counter] = {}
        self._handlers: dict[tuple[str, str], Histogram] = {}
        self.replies_delivered = REPLIES_DELIVERED.labels(name)
        self.batches_committed = BATCHES.labels(name, "committed")
        self.batches_failed = BATCHES.labels(name, "failed")
        self.commit_seconds = COMMIT_SECONDS.labels(name)
        with _lock:
            _participants.add(participant)

    def command(self, action: str, outcome: str) -> None:
        child = self._commands.get((action, outcome))
        if child is None:
            child = self._commands[(action, outcome)] = COMMANDS.labels(self.name, action, outcome)
        child.inc()

    def handled(self, step: str, action: str, seconds: float) -> None:
        child = self._handlers.get((step, action))
        if child is None:
            child = self._handlers[(step, action)] = HANDLER_SECONDS.labels(self.name, step, action)
        child.observe(seconds)


def serve(port: int) -> tuple[str, int]:
    """Serve :data:`REGISTRY` on ``port`` (0: any free port) unless this process already does:
    participants asking for the same port, or for port 0, share one server. Returns its address."""
    from prometheus_client import start_http_server

    with _lock:
        if port in _servers:
            return _servers[port]
        if port == 0 and _servers:
            return next(iter(_servers.values()))
        server, _ = start_http_server(port, registry=REGISTRY)
        host, actual = server.server_address[:2]
        address = (str(host), int(actual))
        _servers[port] = _servers[actual] = address
    _log.info("participant metrics on http://%s:%d/metrics", *address)
    return address


class _Outbox(Collector):
    """Rows each participant has committed and not yet seen acknowledged, read at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pending = GaugeMetricFamily(
            "saga_participant_outbox_pending_rows", "Replies and dead letters committed, not acknowledged yet.", labels=["participant"]
        )
        with _lock:
            participants = list(_participants)
        by_name: dict[str, int] = {}
        for participant in participants:  # several instances of one participant add up
            by_name[participant.name] = by_name.get(participant.name, 0) + participant.unacknowledged
        for name, rows in sorted(by_name.items()):
            pending.add_metric([name], rows)
        yield pending


REGISTRY.register(_Outbox())
