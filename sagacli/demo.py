"""``saga demo``: the whole story in one command, with checks at the end.

What it does, in order:

1. starts the embedded broker on a free port (or uses ``--bootstrap-servers``) and creates the
   topics: the log, the inbox, the dead letters and one command topic per example participant;
2. starts the example participants (flights, hotels, cars, credit, payments) as one process and
   N manager replicas as N processes (``python -m sagacli ...``, real OS processes), and waits
   until the managers have claimed every log partition and the participants have joined. Each
   step takes ``--step-time-ms`` (100-500 ms by default, pipelined: the participants' outbox
   relay holds each reply that long), so a few sagas are always in flight on every manager;
3. starts a mix of ``book-trip`` and ``place-order`` sagas at a steady rate; cars and payments
   refuse ``--failure-rate`` of them (and a few orders use an expired card), so those abort and
   compensate;
4. once ``--kill-after`` of the sagas have been started, SIGKILLs the manager with the most sagas
   in flight (waiting, still starting sagas, until one has some), watches the log until other
   managers claim its partitions and its sagas move again, reads from the new owners' logs how
   many of its sagas each one resumed, then restarts it;
5. the zombie (unless ``--no-zombie``): the last sagas are held back until the restarted manager
   is back; then, with them going out, another manager with sagas in flight is SIGSTOPped for the
   session timeout + 3 s. The others claim its partitions and resume its sagas while it is
   frozen; after SIGCONT it wakes up believing it still owns them, is fenced (nothing it writes
   with its old epoch is accepted), and rejoins the group;
6. waits until every saga is terminal, stops everything it started and checks: every saga
   terminal, none lost, every participant's books balanced, with exactly one hold per completed
   saga of the right size and nothing left behind by aborted ones, every manager still alive, and
   the zombie fenced and back.

Progress (counts by state, which manager owns which partitions, elapsed time) is read from the
saga log through the read model, like ``saga status`` does: the demo asks no manager anything.
The exit status is non-zero when a check fails. Every process started is stopped on the way out,
also on Ctrl-C, and dies with the demo if the demo itself is killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table

from sagacli.process import Child, sagacli_command
from sagalog.config import Topics
from sagalog.errors import ConfigError, SagaError
from sagalog.records import SagaStatus

#: The example participants the demo runs, and the saga type each serves.
PARTICIPANTS = {
    "flights": "book-trip",
    "hotels": "book-trip",
    "cars": "book-trip",
    "credit": "place-order",
    "payments": "place-order",
}
FLIGHTS = ("SK-101", "LH-202", "AF-303", "BA-404")
HOTELS = ("grand-central", "harbour-view", "old-town")
CARS = ("compact", "estate", "van")
CUSTOMERS = tuple(f"c-{i}" for i in range(1, 9))
#: Share of orders paid with an expired card: always declined (the outbox article's example).
EXPIRED_CARD_SHARE = 0.03
#: Share of the sagas after the kill held back until the zombie act (they go out while it is frozen).
ZOMBIE_RESERVE_SHARE = 0.4
#: How long the zombie stays frozen beyond the session timeout.
ZOMBIE_EXTRA_S = 3.0
#: How long the demo waits, after SIGCONT, for the zombie to own partitions again. Frozen in the
#: middle of a transaction commit, it first sits out that commit's timeout (30 s) before it notices.
ZOMBIE_REJOIN_WAIT_S = 50.0
#: A manager's WARNING/ERROR log line: the message after the level.
LOG_PROBLEM = re.compile(r"^\S+ \S+ \S+ (?:WARNING|ERROR) (?P<message>.*)$", re.MULTILINE)
#: A manager's takeover line (manager/runtime.py), read from the managers' log files.
TAKEOVER_LINE = re.compile(
    r"took over partition (?P<partition>\d+) at epoch (?P<epoch>\d+): (?P<rebuilt>\d+) sagas rebuilt, "
    r"(?P<resumed>\d+) live resumed"
)


class Interrupted(SagaError):
    """Ctrl-C or SIGTERM: the demo stops everything it started and exits 130."""


@dataclass(frozen=True)
class DemoSettings:
    sagas: int = 300
    replicas: int = 3
    failure_rate: float = 0.1
    kill_after: float = 0.3
    bootstrap: str | None = None  # None: start the embedded broker
    topic_prefix: str | None = None  # None: "saga" on the embedded broker, a fresh one elsewhere
    partitions: int = 6
    rate: float = 15.0  # sagas started per second
    session_timeout_ms: int = 3000
    timeout_s: float = 150.0
    work_dir: Path | None = None
    keep: bool = False
    seed: int = 7
    stay: bool = False
    #: How long each participant step takes (ms, uniformly drawn), None = at once.
    step_time_ms: tuple[int, int] | None = (100, 500)
    zombie: bool = True  # SIGSTOP a second manager after the kill/restart story

    def validate(self) -> None:
        if self.sagas < 1:
            raise ConfigError(f"--sagas must be at least 1, not {self.sagas}")
        if self.replicas < 2:
            raise ConfigError(
                f"--replicas must be at least 2 (one is killed, another takes over), not {self.replicas}"
            )
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ConfigError(f"--failure-rate must be between 0 and 1, not {self.failure_rate}")
        if not 0.0 <= self.kill_after < 1.0:
            raise ConfigError(f"--kill-after must be at least 0 and below 1 (a share of the sagas), not {self.kill_after}")
        if self.partitions < self.replicas:
            raise ConfigError(
                f"--partitions ({self.partitions}) must be at least --replicas ({self.replicas}): "
                f"a manager without a partition has nothing to do"
            )
        if self.rate <= 0:
            raise ConfigError(f"--rate must be positive, not {self.rate}")
        if self.step_time_ms is not None and not 0 <= self.step_time_ms[0] <= self.step_time_ms[1]:
            raise ConfigError(f"--step-time-ms must be LO-HI with 0 <= LO <= HI, not {self.step_time_ms}")

    @property
    def kill_at(self) -> int:
        """How many sagas are started before the kill (it may wait for sagas in flight)."""
        return max(1, round(self.kill_after * self.sagas)) if self.kill_after > 0 else 0

    @property
    def zombie_reserve(self) -> int:
        """Sagas held back until the zombie act: they go out just before and while it is frozen."""
        rest = self.sagas - self.kill_at
        return max(1, round(ZOMBIE_RESERVE_SHARE * rest)) if self.zombie and rest >= 2 else 0


@dataclass(frozen=True)
class PlannedSaga:
    saga_id: str
    saga_type: str
    payload: dict[str, Any]

    def effect(self, participant: str) -> tuple[str, int] | None:
        """(item, quantity) this saga takes from ``participant`` when it completes."""
        p = self.payload
        if self.saga_type == "book-trip":
            return {
                "flights": (p["flight"], p["travellers"]),
                "hotels": (p["hotel"], p["rooms"]),
                "cars": (p["car"], 1),
            }.get(participant)
        if self.saga_type == "place-order" and participant in ("credit", "payments"):
            return p["customer"], p["amount"]
        return None


def plan_sagas(count: int, seed: int) -> list[PlannedSaga]:
    """A reproducible mix: about 60% trips, 40% orders, every payload field explicit."""
    rng = random.Random(seed)
    out: list[PlannedSaga] = []
    for i in range(1, count + 1):
        if rng.random() < 0.6:
            payload: dict[str, Any] = {
                "flight": rng.choice(FLIGHTS),
                "travellers": rng.randint(1, 3),
                "hotel": rng.choice(HOTELS),
                "rooms": rng.randint(1, 2),
                "car": rng.choice(CARS),
            }
            out.append(PlannedSaga(f"trip-{i:04d}", "book-trip", payload))
        else:
            card = "expired" if rng.random() < EXPIRED_CARD_SHARE else "4111-1111"
            payload = {"customer": rng.choice(CUSTOMERS), "amount": rng.randint(10, 200), "card": card}
            out.append(PlannedSaga(f"order-{i:04d}", "place-order", payload))
    return out


# --- the report -------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Takeover:
    victim: str = ""
    victim_pid: int = 0
    killed_at_s: float | None = None
    partitions: list[int] = field(default_factory=list)
    in_flight: int = 0  # its unfinished sagas at the kill (read model)
    #: Start requests sent to its partitions between the kill and the takeover (they had to wait).
    waited: int = 0
    claimed_after_s: float | None = None
    progress_after_s: float | None = None
    nothing_to_resume: bool = False  # its partitions held no unfinished saga once taken over
    new_owners: dict[int, str] = field(default_factory=dict)
    #: Live sagas each new owner resumed, per partition and per manager (from their takeover lines).
    resumed_on: dict[int, int] = field(default_factory=dict)
    resumed: dict[str, int] = field(default_factory=dict)
    restarted_at_s: float | None = None
    rejoined_after_s: float | None = None
    rejoined_partitions: list[int] = field(default_factory=list)


@dataclass
class Zombie:
    """The second act: a manager frozen with SIGSTOP (alive, silent), then woken with SIGCONT."""

    enabled: bool = True
    held_back: int = 0  # sagas kept for this act
    released_at_s: float | None = None
    name: str = ""
    pid: int = 0
    frozen_at_s: float | None = None
    partitions: list[int] = field(default_factory=list)
    in_flight: int = 0
    waited: int = 0  # sagas started on its partitions while it was frozen, before the others claimed them
    claimed_after_s: float | None = None  # since the SIGSTOP
    claimed_while_frozen: bool = False
    new_owners: dict[int, str] = field(default_factory=dict)
    resumed_on: dict[int, int] = field(default_factory=dict)
    resumed: dict[str, int] = field(default_factory=dict)
    progress_after_s: float | None = None  # since the SIGSTOP
    nothing_to_resume: bool = False
    continued_at_s: float | None = None
    frozen_for_s: float | None = None
    alive_after: bool | None = None
    rejoined_after_s: float | None = None  # since the SIGCONT
    rejoined_partitions: list[int] = field(default_factory=list)
    #: What it wrote after waking with its old epoch, as the read model's fold saw it.
    stale_rejected: int = 0
    stale_accepted: int = 0
    #: Its own log after waking: lines where it learned it was fenced / deferred a takeover, and
    #: the first warnings and errors it logged (how it found out it no longer owned anything).
    fenced_lines: int = 0
    deferred_lines: int = 0
    noticed_after_s: float | None = None  # since the SIGCONT: its first warning or error
    woke_log: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the act did not happen


@dataclass
class DemoReport:
    settings: dict[str, Any]
    bootstrap: str
    topic_prefix: str
    work_dir: str
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)  # saga type -> status -> n
    duration_s: float = 0.0
    latency_ms: dict[str, int] = field(default_factory=dict)
    takeover: Takeover = field(default_factory=Takeover)
    zombie: Zombie = field(default_factory=Zombie)
    checks: list[Check] = field(default_factory=list)
    dead_letters: int | None = None
    #: Every process the demo started (name -> pids), all stopped when it returns.
    processes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


# --- the demo ---------------------------------------------------------------------------------


class Demo:
    """One demo run. ``run()`` returns the report; it always stops what it started."""

    TICK_S = 0.1
    REFRESH_S = 0.25

    def __init__(self, settings: DemoSettings, console: Console | None = None) -> None:
        settings.validate()
        self.settings = settings
        self.console = console or Console(highlight=False)
        self.live_display = self.console.is_terminal
        self.plan = plan_sagas(settings.sagas, settings.seed)
        self.broker: Any = None
        self.bootstrap = settings.bootstrap or ""
        prefix = settings.topic_prefix
        if prefix is None:
            prefix = "saga" if settings.bootstrap is None else f"demo-{os.urandom(4).hex()}"
        self.topics = Topics(prefix=prefix)
        self._own_work_dir = settings.work_dir is None
        self.work_dir = settings.work_dir or Path(tempfile.mkdtemp(prefix="saga-demo-"))
        self.managers: list[Child] = []
        self.participants: Child | None = None
        self.web_console: Child | None = None
        self.names_by_pid: dict[int, str] = {}
        self.t0 = time.monotonic()
        self.sagas_t0: float | None = None
        self.started = 0
        self.sent_ms: dict[str, int] = {}
        self.events: list[str] = []
        self.takeover = Takeover()
        self.zombie = Zombie(enabled=settings.zombie, held_back=settings.zombie_reserve)
        self._kill_wait_logged = False
        self._holding_logged = False
        # The start pace: sagas due = base + rate * (now - origin); reset when held-back sagas go out.
        self._pace_origin = self.t0
        self._pace_base = 0
        self._epochs_at_kill: dict[int, int] = {}
        self._kill_wall_ms = 0
        self._zombie_owner = ""
        self._epochs_at_freeze: dict[int, int] = {}
        self._freeze_wall_ms = 0
        self._wake_wall_ms = 0
        self._wake_log_offset = 0
        self.unexpected_exits: list[str] = []
        self.model: Any = None
        self._admin: Any = None
        self.processes: dict[str, list[int]] = {}
        self._last_print = 0.0

    # -- helpers -------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def event(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {text}"
        self.events.append(line)
        self.console.print(escape(line))

    def _manager_command(self) -> list[str]:
        from sagacli.cli.manager import default_definitions

        return sagacli_command(
            "manager",
            "--bootstrap-servers", self.bootstrap,
            "--topic-prefix", self.topics.prefix,
            "--group-id", f"{self.topics.prefix}-managers",
            "--partitions", str(self.settings.partitions),
            "--session-timeout-ms", str(self.settings.session_timeout_ms),
            *[arg for path in default_definitions() for arg in ("--definitions", str(path))],
            "--log-level", "INFO",
        )  # fmt: skip

    # -- phases --------------------------------------------------------------------------

    def run(self, on_report: Callable[[DemoReport], None] | None = None) -> DemoReport:
        """Run the demo; ``on_report`` sees the report before ``--stay`` keeps things running."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        passed = False
        try:
            self._setup()
            self._wait_ready()
            self._drive()
            report = self._finish()
            passed = report.ok
            if on_report is not None:
                on_report(report)
            if self.settings.stay:
                self._stay()
            return report
        finally:
            self._cleanup(remove_work_dir=passed and self._own_work_dir and not self.settings.keep)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}; stopped everything the demo started")

    def _setup(self) -> None:
        from sagalog.broker import EmbeddedBroker
        from sagalog.kafka import session_timeout_bounds
        from sagalog.readmodel import ReadModel
        from sagalog.topics import ensure_topics

        s = self.settings
        (self.work_dir / "db").mkdir(parents=True, exist_ok=True)
        if s.bootstrap is None:
            self.broker = EmbeddedBroker(port=0, log_path=self.work_dir / "broker.log").start()
            self.bootstrap = self.broker.bootstrap
            self.processes["broker"] = [self.broker.pid]
            self.event(f"embedded broker ready at {self.bootstrap} (pid {self.broker.pid}, memory storage)")
        bounds = session_timeout_bounds(self.bootstrap)
        if bounds is not None and not bounds[0] <= s.session_timeout_ms <= bounds[1]:
            # A stock Apache Kafka refuses sessions under 6 s: use the nearest it accepts.
            accepted = min(max(s.session_timeout_ms, bounds[0]), bounds[1])
            self.event(f"the broker accepts session timeouts of {bounds[0]}..{bounds[1]} ms: using {accepted} ms")
            self.settings = s = dataclasses.replace(s, session_timeout_ms=accepted)
        ensure_topics(self.bootstrap, self.topics, partitions=s.partitions, participants=list(PARTICIPANTS))
        self.event(f"topics with prefix {self.topics.prefix!r} ready: {s.partitions} partitions")
        self.participants = Child(
            "participants",
            sagacli_command(
                "participant", "run", *PARTICIPANTS,
                "--db-dir", str(self.work_dir / "db"),
                "--failure-rate", str(s.failure_rate),
                "--step-time-ms", f"{s.step_time_ms[0]}-{s.step_time_ms[1]}" if s.step_time_ms else "0",
                "--bootstrap-servers", self.bootstrap,
                "--topic-prefix", self.topics.prefix,
                "--session-timeout-ms", str(s.session_timeout_ms),
            ),
            self.work_dir / "participants.log",
        ).start()  # fmt: skip
        self.processes["participants"] = [self.participants.pid]
        for i in range(1, s.replicas + 1):
            self._start_manager(Child(f"m{i}", self._manager_command(), self.work_dir / f"manager-m{i}.log"))
        self.event(
            f"started {s.replicas} managers ({', '.join(f'{m.name}: pid {m.pid}' for m in self.managers)}) "
            f"and the participants {', '.join(PARTICIPANTS)} (pid {self.participants.pid})"
        )
        self.model = ReadModel(self.bootstrap, self.topics, state_dir=self.work_dir / "state")

    def _start_manager(self, child: Child) -> None:
        child.start()
        self.names_by_pid[child.pid] = child.name
        self.processes.setdefault(child.name, []).append(child.pid)
        if child not in self.managers:
            self.managers.append(child)

    def _owner_name(self, owner: str) -> str:
        """Claims name their owner ``host-pid``; map our pids back to m1, m2, ..."""
        pid = owner.rsplit("-", 1)[-1]
        return self.names_by_pid.get(int(pid), owner) if pid.isdigit() else owner

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until every partition is claimed by a live manager and every participant has joined."""
        deadline = time.monotonic() + timeout_s
        live_pids = {str(m.pid) for m in self.managers}
        while True:
            self._watch_children()
            self.model.catch_up()
            claims = self.model.claims()
            claimed = [p for p, c in claims.items() if c.owner.rsplit("-", 1)[-1] in live_pids]
            if len(claimed) == self.settings.partitions and self._participants_joined():
                break
            if time.monotonic() > deadline:
                raise SagaError(
                    f"the managers and participants were not ready after {timeout_s:g} s "
                    f"({len(claimed)}/{self.settings.partitions} partitions claimed); logs in {self.work_dir}"
                )
            time.sleep(0.2)  # polling the log with a deadline
        owners = Counter(self._owner_name(c.owner) for c in self.model.claims().values())
        self.event(
            "ready: partitions owned by "
            + ", ".join(f"{name} ({n})" for name, n in sorted(owners.items()))
            + "; participants joined"
        )

    def _participants_joined(self) -> bool:
        """Every participant's consumer group is stable (it has joined and has its partitions)."""
        from confluent_kafka import KafkaException

        from sagalog.kafka import admin_client

        if self._admin is None:
            self._admin = admin_client(self.bootstrap)
        admin = self._admin
        groups = [f"{self.topics.prefix}.participant.{name}" for name in PARTICIPANTS]
        try:
            futures = admin.describe_consumer_groups(groups, request_timeout=5)
            states = [str(f.result().state) for f in futures.values()]
        except KafkaException:
            return False
        return all(state.endswith("STABLE") for state in states)

    def _watch_children(self) -> None:
        for child in [*self.managers, *([self.participants] if self.participants else [])]:
            if child.proc is not None and not child.alive and not child.killed:
                line = f"{child.name} (pid {child.pid}) exited on its own with code {child.returncode}"
                if line not in self.unexpected_exits:
                    self.unexpected_exits.append(line)
                    self.event(f"[warning] {line}; last output:\n{child.tail(8)}")

    def _drive(self) -> None:
        """Start sagas at the rate, kill and restart a manager, freeze and wake another, until every
        saga is terminal and the story is told."""
        from confluent_kafka import Producer

        from sagalog.codec import Codec
        from sagalog.kafka import producer_config
        from sagalog.records import StartSaga

        s = self.settings
        codec = Codec()
        producer = Producer(producer_config(self.bootstrap))
        kill_at = s.kill_at
        self.sagas_t0 = time.monotonic()
        self._pace_origin, self._pace_base = self.sagas_t0, 0
        deadline = self.sagas_t0 + s.timeout_s
        step = f"{s.step_time_ms[0]}-{s.step_time_ms[1]} ms" if s.step_time_ms else "no time"
        self.event(
            f"starting {s.sagas} sagas at {s.rate:g}/s, steps taking {step}; SIGKILL of the manager with the "
            f"most sagas in flight after {kill_at}"
            + (f", then a frozen zombie with the last {self.zombie.held_back}" if s.zombie else "")
            + f" (failure rate {s.failure_rate:g})"
        )
        next_refresh = 0.0
        all_started_logged = False
        display = self._display() if self.live_display else contextlib.nullcontext(None)
        with display as live:
            while True:
                now = time.monotonic()
                due = min(self._start_cap(), self._pace_base + int((now - self._pace_origin) * s.rate) + 1)
                while self.started < due:
                    saga = self.plan[self.started]
                    request = StartSaga(
                        saga_id=saga.saga_id,
                        saga_type=saga.saga_type,
                        payload=json.dumps(saga.payload, separators=(",", ":")),
                        requested_ms=int(time.time() * 1000),
                    )
                    producer.produce(self.topics.inbox, codec.encode(request), key=saga.saga_id.encode())
                    self.sent_ms[saga.saga_id] = request.requested_ms
                    self.started += 1
                producer.poll(0)
                if self.started == s.sagas and not all_started_logged:
                    producer.flush(10)
                    all_started_logged = True
                    self.event(f"all {s.sagas} sagas started")
                if now >= next_refresh:
                    next_refresh = now + self.REFRESH_S
                    self._watch_children()
                    self.model.catch_up()
                    if self.takeover.killed_at_s is None and self.started >= kill_at:
                        self._kill_busiest()
                    self._follow_takeover()
                    self._follow_zombie()
                    counts = self._counts()
                    if live is not None:
                        live.update(self._render(counts))
                    elif now - self._last_print >= 2.0:
                        self._last_print = now
                        self.console.print(escape(self._summary_line(counts)))
                    terminal = counts[SagaStatus.COMPLETED] + counts[SagaStatus.ABORTED]
                    if (
                        terminal >= s.sagas
                        and self.started == s.sagas
                        and self._takeover_settled()
                        and self._zombie_settled()
                    ):
                        break
                    if now > deadline:
                        self.event(f"[warning] gave up waiting after {s.timeout_s:g} s (--timeout)")
                        break
                time.sleep(self.TICK_S)  # the pace of the start rate and the display
        producer.flush(10)
        for m in self.managers:
            m.thaw()  # never leave a frozen manager behind (a timeout mid-act)
        counts = self._counts()
        done = counts[SagaStatus.COMPLETED] + counts[SagaStatus.ABORTED] == s.sagas
        self.event(f"{'all sagas terminal' if done else 'stopped waiting'}: {self._summary_line(counts)}")

    def _start_cap(self) -> int:
        """How many sagas may be started by now: all, except the zombie's reserve, which waits after
        the kill until the restarted manager is back (the kill itself never waits for the cap)."""
        z = self.zombie
        if not z.held_back or z.released_at_s is not None or self.takeover.killed_at_s is None:
            return self.settings.sagas
        cap = self.settings.sagas - z.held_back
        if self.started >= cap and not self._holding_logged:
            self._holding_logged = True
            self.event(f"holding back the last {z.held_back} sagas for the zombie until {self.takeover.victim} is back")
        return cap

    def _unfinished_on(self, partition: int) -> bool:
        """Does any saga of this run on ``partition`` still have work: unfinished, or not begun yet?"""
        from sagalog.readmodel import partition_for

        mine = [sid for sid in self.sent_ms if partition_for(sid.encode(), self.settings.partitions) == partition]
        statuses = self.model.statuses(mine)
        return any(sid not in statuses or not statuses[sid].terminal for sid in mine)

    def _counts(self) -> dict[SagaStatus, int]:
        """This run's sagas by status (other sagas under the same prefix do not count)."""
        counts = dict.fromkeys(SagaStatus, 0)
        for status in self.model.statuses(self.sent_ms).values():
            counts[status] += 1
        return counts

    def _takeover_settled(self) -> bool:
        """The kill/takeover/restart story is told: nothing killed, or the restarted manager is back
        at work (or has had 20 s to get there), or a minute passed without a takeover (a failed check)."""
        t = self.takeover
        if t.killed_at_s is None:
            return True
        if t.claimed_after_s is None:
            return self.elapsed() - t.killed_at_s > 60  # never taken over: the check reports it
        if t.restarted_at_s is None:
            return False
        return t.rejoined_after_s is not None or self.elapsed() - t.restarted_at_s > 20

    def _owned_by(self, claims: dict[int, Any]) -> dict[Child, list[int]]:
        """Partitions each live manager owns according to the newest claims on the log."""
        by_manager: dict[Child, list[int]] = {m: [] for m in self.managers if m.alive}
        pids = {str(m.pid): m for m in by_manager}
        for p, claim in sorted(claims.items()):
            child = pids.get(claim.owner.rsplit("-", 1)[-1])
            if child is not None:
                by_manager[child].append(p)
        return by_manager

    def _kill_busiest(self) -> None:
        """SIGKILL the manager with the most sagas in flight; with none in flight anywhere, wait
        (sagas keep being started) unless every saga has been started already."""
        self.model.catch_up()  # who owns what, and what is in flight, as of now
        claims = self.model.claims()
        by_manager = self._owned_by(claims)
        if not by_manager:
            raise SagaError(f"no manager is alive to be killed; logs in {self.work_dir}")
        in_flight = {m: self.model.live_count(parts) for m, parts in by_manager.items()}
        victim = max(by_manager, key=lambda m: (in_flight[m], len(by_manager[m]), m.name))
        if in_flight[victim] == 0 and self.started < self.settings.sagas:
            if not self._kill_wait_logged:
                self._kill_wait_logged = True
                self.event("no manager has a saga in flight yet: the SIGKILL waits, sagas keep going out")
            return
        partitions = sorted(by_manager[victim])
        t = self.takeover
        t.victim, t.victim_pid, t.partitions = victim.name, victim.pid, partitions
        t.in_flight = in_flight[victim]
        self._epochs_at_kill = {p: claims[p].epoch for p in partitions}
        self._kill_wall_ms = int(time.time() * 1000)
        victim.kill()
        t.killed_at_s = self.elapsed()
        others = ", ".join(f"{m.name} {in_flight[m]}" for m in sorted(by_manager, key=lambda m: m.name) if m is not victim)
        self.event(
            f"SIGKILL {victim.name} (pid {victim.pid}), owner of partitions "
            f"{', '.join(map(str, partitions)) or 'none'} with {t.in_flight} sagas in flight (the most; {others})"
        )

    def _takeover_lines(self) -> list[tuple[str, int, int, int]]:
        """Every takeover the managers logged: (manager name, partition, epoch, live sagas resumed)."""
        found: list[tuple[str, int, int, int]] = []
        for m in self.managers:
            for match in TAKEOVER_LINE.finditer(m.output()):
                found.append((m.name, int(match["partition"]), int(match["epoch"]), int(match["resumed"])))
        return found

    def _resumed(self, epochs: dict[int, int]) -> dict[int, tuple[str, int]]:
        """For each partition, the first takeover above ``epochs[p]``: (by whom, live sagas resumed)."""
        first: dict[int, tuple[int, str, int]] = {}
        for name, p, epoch, resumed in self._takeover_lines():
            if p in epochs and epoch > epochs[p] and (p not in first or epoch < first[p][0]):
                first[p] = (epoch, name, resumed)
        return {p: (name, resumed) for p, (_, name, resumed) in first.items()}

    def _fill_resumed(self, target: Takeover | Zombie, epochs: dict[int, int]) -> None:
        for p, (_name, resumed) in self._resumed(epochs).items():
            target.resumed_on[p] = resumed
        by: Counter[str] = Counter()
        for p, n in target.resumed_on.items():
            by[target.new_owners.get(p, "?")] += n
        target.resumed = dict(sorted(by.items()))

    def _progress(self, partitions: list[int], epochs: dict[int, int], since_ms: int) -> int | None | bool:
        """When records of a newer epoch first appeared on all these partitions (wall ms), False when
        none had anything left to do, None while sagas there still wait for their new owner."""
        firsts: list[int] = []
        for p in partitions:
            first = self.model.first_record_ms(p, after_epoch=epochs[p], since_ms=since_ms)
            if first is not None:
                firsts.append(first)
            elif self._unfinished_on(p):
                return None
        return max(firsts) if firsts else False

    def _sent_to(self, partitions: list[int], from_ms: int, to_ms: int) -> int:
        from sagalog.readmodel import partition_for

        return sum(
            1
            for sid, sent in self.sent_ms.items()
            if from_ms <= sent <= to_ms and partition_for(sid.encode(), self.settings.partitions) in partitions
        )

    def _follow_takeover(self) -> None:
        t = self.takeover
        if t.killed_at_s is None:
            return
        claims = self.model.claims()
        if t.restarted_at_s is not None:
            if t.rejoined_after_s is None:
                victim = next(m for m in self.managers if m.name == t.victim)
                owned = sorted(p for p, c in claims.items() if c.owner.rsplit("-", 1)[-1] == str(victim.pid))
                if owned:
                    t.rejoined_after_s = self.elapsed() - t.restarted_at_s
                    t.rejoined_partitions = owned
                    self.event(
                        f"{victim.name} is back: it owns partitions {', '.join(map(str, owned))} "
                        f"{t.rejoined_after_s:.1f} s after its restart"
                    )
            return
        if t.claimed_after_s is None:
            taken = {
                p: claims[p] for p in t.partitions if p in claims and claims[p].epoch > self._epochs_at_kill[p]
            }
            if len(taken) == len(t.partitions):
                t.new_owners = {p: self._owner_name(c.owner) for p, c in taken.items()}
                claimed_ms = max(c.claimed_ms for c in taken.values())
                t.claimed_after_s = (claimed_ms - self._kill_wall_ms) / 1000
                t.waited = self._sent_to(t.partitions, self._kill_wall_ms, claimed_ms)
                self._fill_resumed(t, self._epochs_at_kill)
                self.event(
                    f"partitions {', '.join(map(str, t.partitions))} claimed {t.claimed_after_s:.1f} s after the kill: "
                    f"{who_resumed(t)} (of {t.in_flight} in flight at the kill; {t.waited} sagas "
                    f"started on them meanwhile waited)"
                )
        if t.claimed_after_s is not None and t.progress_after_s is None and not t.nothing_to_resume:
            progress = self._progress(t.partitions, self._epochs_at_kill, self._kill_wall_ms)
            if progress is None:
                return  # sagas there still wait for their new owner
            if progress is False:
                t.nothing_to_resume = True
                self.event("no saga was left on them to resume")
            else:
                t.progress_after_s = (progress - self._kill_wall_ms) / 1000
                self.event(f"sagas on them progressing again {t.progress_after_s:.1f} s after the kill")
        settled = t.progress_after_s is not None or t.nothing_to_resume or (
            t.claimed_after_s is not None and self.elapsed() - t.killed_at_s > 20
        )
        if settled:
            victim = next(m for m in self.managers if m.name == t.victim)
            self._start_manager(victim)
            t.restarted_at_s = self.elapsed()
            self.event(f"restarted {victim.name} (pid {victim.pid}); the group rebalances around it")

    # -- the zombie ----------------------------------------------------------------------

    def _zombie_settled(self) -> bool:
        """The zombie act is over: disabled or skipped, or woken and back at work (or has had 20 s)."""
        z = self.zombie
        if not z.enabled or z.skipped is not None:
            return True
        if z.continued_at_s is None:
            return False
        return z.rejoined_after_s is not None or self.elapsed() - z.continued_at_s > ZOMBIE_REJOIN_WAIT_S

    def _follow_zombie(self) -> None:
        z = self.zombie
        if not z.enabled or z.skipped is not None or not self._takeover_settled():
            return
        if self.takeover.killed_at_s is None:
            return
        if z.released_at_s is None:
            z.released_at_s = self.elapsed()
            self._pace_origin, self._pace_base = time.monotonic(), self.started
            if z.held_back:
                self.event(f"going on: the last {z.held_back} sagas go out now, and a manager with sagas in "
                           f"flight will freeze")
            return
        if z.frozen_at_s is None:
            self._freeze_zombie()
        elif z.continued_at_s is None:
            self._watch_frozen()
        else:
            self._watch_woken()

    def _freeze_zombie(self) -> None:
        z = self.zombie
        assert z.released_at_s is not None
        waited = self.elapsed() - z.released_at_s
        if waited < 0.5:
            return  # let the released sagas reach the managers first
        claims = self.model.claims()
        by_manager = {m: ps for m, ps in self._owned_by(claims).items() if m.name != self.takeover.victim and ps}
        if not by_manager:
            if self.started == self.settings.sagas and waited > 20:
                z.skipped = "no live manager other than the restarted one owned a partition"
                self.event(f"[warning] no zombie: {z.skipped}")
            return
        in_flight = {m: self.model.live_count(ps) for m, ps in by_manager.items()}
        zombie = max(by_manager, key=lambda m: (in_flight[m], len(by_manager[m]), m.name))
        if in_flight[zombie] == 0 and not (self.started == self.settings.sagas and waited > 3):
            return  # wait (sagas keep going out) until one has sagas in flight
        z.name, z.pid, z.partitions, z.in_flight = zombie.name, zombie.pid, sorted(by_manager[zombie]), in_flight[zombie]
        self._zombie_owner = claims[z.partitions[0]].owner
        self._epochs_at_freeze = {p: claims[p].epoch for p in z.partitions}
        self._freeze_wall_ms = int(time.time() * 1000)
        zombie.freeze()
        z.frozen_at_s = self.elapsed()
        self.event(
            f"SIGSTOP {zombie.name} (pid {zombie.pid}), owner of partitions {', '.join(map(str, z.partitions))} "
            f"with {z.in_flight} sagas in flight: frozen, not dead, for the session timeout + {ZOMBIE_EXTRA_S:g} s"
        )

    def _track_zombie_takeover(self) -> None:
        """Have the others claimed the zombie's partitions (epochs above its own), and are its sagas
        moving again? Claims that land after the SIGCONT count too, but not as "while frozen"."""
        z = self.zombie
        claims = self.model.claims()
        if z.claimed_after_s is None:
            taken = {p: claims[p] for p in z.partitions if p in claims and claims[p].epoch > self._epochs_at_freeze[p]}
            if len(taken) == len(z.partitions):
                z.claimed_while_frozen = z.continued_at_s is None
                z.new_owners = {p: self._owner_name(c.owner) for p, c in taken.items()}
                claimed_ms = max(c.claimed_ms for c in taken.values())
                z.claimed_after_s = (claimed_ms - self._freeze_wall_ms) / 1000
                z.waited = self._sent_to(z.partitions, self._freeze_wall_ms, claimed_ms)
                self._fill_resumed(z, self._epochs_at_freeze)
                self.event(
                    f"partitions {', '.join(map(str, z.partitions))} of the "
                    f"{'frozen' if z.claimed_while_frozen else 'woken'} {z.name} claimed "
                    f"{z.claimed_after_s:.1f} s after the SIGSTOP: {who_resumed(z)} (of {z.in_flight} in "
                    f"flight at the SIGSTOP; {z.waited} sagas started on them meanwhile waited)"
                )
        if z.claimed_after_s is not None and z.progress_after_s is None and not z.nothing_to_resume:
            progress = self._progress(z.partitions, self._epochs_at_freeze, self._freeze_wall_ms)
            if progress is False:
                z.nothing_to_resume = True
                self.event("no saga was left on them to resume")
            elif progress is not None:
                z.progress_after_s = (progress - self._freeze_wall_ms) / 1000
                self.event(f"sagas on them progressing again {z.progress_after_s:.1f} s after the SIGSTOP")

    def _watch_frozen(self) -> None:
        z = self.zombie
        assert z.frozen_at_s is not None
        self._track_zombie_takeover()
        frozen_s = self.elapsed() - z.frozen_at_s
        minimum = self.settings.session_timeout_ms / 1000 + ZOMBIE_EXTRA_S
        # Woken once the minimum passed and the others hold its partitions (up to 15 s more for them
        # to get there), so that it really wakes up as a zombie.
        if frozen_s >= minimum and (z.claimed_after_s is not None or frozen_s >= minimum + 15):
            zombie = next(m for m in self.managers if m.name == z.name)
            self._wake_log_offset = zombie.log_size()
            self._wake_wall_ms = int(time.time() * 1000)
            zombie.thaw()
            z.continued_at_s = self.elapsed()
            z.frozen_for_s = round(frozen_s, 1)
            self.event(
                f"SIGCONT {z.name} after {frozen_s:.1f} s frozen: it wakes up believing it owns partitions "
                f"{', '.join(map(str, z.partitions))}"
                + (", which the others hold now" if z.claimed_after_s is not None else " (still unclaimed)")
            )

    def _watch_woken(self) -> None:
        z = self.zombie
        assert z.continued_at_s is not None
        zombie = next(m for m in self.managers if m.name == z.name)
        self._track_zombie_takeover()
        if z.rejoined_after_s is not None:
            return
        if z.noticed_after_s is None:
            first = LOG_PROBLEM.search(zombie.output(self._wake_log_offset))
            if first is not None:
                z.noticed_after_s = self.elapsed() - z.continued_at_s
                self.event(f"{z.name} notices, {z.noticed_after_s:.1f} s after waking: {first['message'][:140]}")
        owned = sorted(
            p for p, c in self.model.claims().items()
            if c.owner.rsplit("-", 1)[-1] == str(zombie.pid) and c.claimed_ms >= self._wake_wall_ms
        )  # fmt: skip
        if owned and zombie.alive:
            z.rejoined_after_s = self.elapsed() - z.continued_at_s
            z.rejoined_partitions = owned
            self._zombie_stale_writes()
            self.event(
                f"{z.name} rejoined: it owns partitions {', '.join(map(str, owned))} again (new epochs) "
                f"{z.rejoined_after_s:.1f} s after waking; its log: {z.fenced_lines} 'fenced' lines; "
                f"on the log: {z.stale_rejected} stale records of its old epoch rejected, {z.stale_accepted} accepted"
            )

    def _zombie_stale_writes(self) -> None:
        """What the zombie wrote after waking with the epoch it had when frozen, and what its log says."""
        from sagalog.readmodel import SagaNotFound, partition_for

        z = self.zombie
        if z.continued_at_s is None:
            return
        rejected = accepted = 0
        for sid in self.sent_ms:
            if partition_for(sid.encode(), self.settings.partitions) not in z.partitions:
                continue
            try:
                history = self.model.history(sid, catch_up=False)
            except SagaNotFound:
                continue
            for entry in history:
                stale = (
                    entry.writer == self._zombie_owner
                    and entry.epoch is not None
                    and entry.epoch <= self._epochs_at_freeze.get(entry.partition, -1)
                    and entry.timestamp_ms >= self._wake_wall_ms
                )
                if stale:
                    if entry.rejected is None:
                        accepted += 1
                    else:
                        rejected += 1
        z.stale_rejected, z.stale_accepted = rejected, accepted
        zombie = next(m for m in self.managers if m.name == z.name)
        woke = zombie.output(self._wake_log_offset)
        z.fenced_lines = sum(1 for line in woke.lower().splitlines() if "fenced" in line)
        z.deferred_lines = sum(1 for line in woke.lower().splitlines() if "deferred" in line)
        z.woke_log = [m["message"][:160] for m in LOG_PROBLEM.finditer(woke)][:4]
        z.alive_after = zombie.alive

    # -- display -------------------------------------------------------------------------

    def _display(self) -> Any:
        from rich.live import Live

        return Live(console=self.console, refresh_per_second=4, transient=False)

    def _summary_line(self, counts: dict[SagaStatus, int]) -> str:
        return (
            f"started {self.started}/{self.settings.sagas}: "
            + ", ".join(f"{counts[s]} {s.value.lower()}" for s in SagaStatus)
            + f"  [{self.elapsed():.1f} s]"
        )

    def _render(self, counts: dict[SagaStatus, int]) -> Group:
        s = self.settings
        terminal = counts[SagaStatus.COMPLETED] + counts[SagaStatus.ABORTED]
        header = (
            f"[bold]saga demo[/] {s.sagas} sagas, {s.replicas} managers, failure rate {s.failure_rate:g}"
            f"   elapsed {self.elapsed():.1f} s"
        )
        states = Table.grid(padding=(0, 2))
        for _ in range(5):
            states.add_column(justify="right")
        states.add_row("started", "running", "compensating", "[green]completed[/]", "[red]aborted[/]")
        states.add_row(
            f"{self.started}/{s.sagas}",
            str(counts[SagaStatus.RUNNING]),
            str(counts[SagaStatus.COMPENSATING]),
            str(counts[SagaStatus.COMPLETED]),
            str(counts[SagaStatus.ABORTED]),
        )
        owners = Table(title="who owns which partition (claims on the log)", title_justify="left", min_width=50)
        owners.add_column("manager")
        owners.add_column("pid", justify="right")
        owners.add_column("state")
        owners.add_column("partitions")
        claims = self.model.claims()
        for m in self.managers:
            owned = [
                str(p) for p, c in sorted(claims.items()) if c.owner.rsplit("-", 1)[-1] == str(m.pid)
            ]
            if m.alive and m.frozen:
                stalled = f"[yellow]{', '.join(owned)} (frozen: nobody serves them until taken over)[/]" if owned else "-"
                owners.add_row(m.name, str(m.pid), "[yellow]frozen (SIGSTOP)[/]", stalled)
            elif m.alive:
                owners.add_row(m.name, str(m.pid), "[green]alive[/]", ", ".join(owned) or "-")
            else:
                state = "[red]killed[/]" if m.killed else "[red]exited[/]"
                orphaned = f"[red]{', '.join(owned)} (nobody's until taken over)[/]" if owned else "-"
                owners.add_row(m.name, str(m.pid), state, orphaned)
        return Group(
            header,
            ProgressBar(total=s.sagas, completed=terminal, width=60),
            f"{terminal}/{s.sagas} terminal",
            states,
            owners,
        )

    # -- the end -------------------------------------------------------------------------

    def _finish(self) -> DemoReport:
        s = self.settings
        report = DemoReport(
            settings={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
            bootstrap=self.bootstrap,
            topic_prefix=self.topics.prefix,
            work_dir=str(self.work_dir),
            takeover=self.takeover,
            zombie=self.zombie,
            processes=self.processes,
        )
        self.model.catch_up()
        if self.takeover.claimed_after_s is not None:  # a takeover line logged after we looked
            self._fill_resumed(self.takeover, self._epochs_at_kill)
        if self.zombie.frozen_at_s is not None:
            if self.zombie.claimed_after_s is not None:
                self._fill_resumed(self.zombie, self._epochs_at_freeze)
            self._zombie_stale_writes()
        states = self.model.states([saga.saga_id for saga in self.plan])
        alive = [m.name for m in self.managers if m.alive]
        participants_alive = self.participants is not None and self.participants.alive
        report.dead_letters = self._count_dead_letters()
        # Stop the participants before reading their books: nothing may change underneath.
        if not s.stay and self.participants is not None:
            self.participants.stop()

        outcomes: dict[str, Counter[str]] = {}
        for saga in self.plan:
            state = states.get(saga.saga_id)
            outcomes.setdefault(saga.saga_type, Counter())[state.status.value if state else "MISSING"] += 1
        report.outcomes = {k: dict(v) for k, v in outcomes.items()}
        finished = [st for st in states.values() if st.status.terminal]
        if finished:
            report.duration_s = round(
                (max(st.updated_ms for st in finished) - min(st.started_ms for st in states.values())) / 1000, 2
            )
            latencies = sorted(st.updated_ms - st.started_ms for st in finished)
            report.latency_ms = {
                "p50": latencies[len(latencies) // 2],
                "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
                "max": latencies[-1],
            }

        checks = report.checks
        missing = [saga.saga_id for saga in self.plan if saga.saga_id not in states]
        not_terminal = [sid for sid, st in states.items() if not st.status.terminal]
        checks.append(Check("no saga lost", not missing, f"{len(self.plan) - len(missing)}/{len(self.plan)} on the log"
                            + (f"; missing: {', '.join(missing[:5])}" if missing else "")))
        checks.append(Check("every saga terminal", not missing and not not_terminal,
                            f"{len(finished)}/{len(self.plan)} completed or aborted"
                            + (f"; not yet: {', '.join(sorted(not_terminal)[:5])}" if not_terminal else "")))
        completed = {sid for sid, st in states.items() if st.status is SagaStatus.COMPLETED}
        for participant in PARTICIPANTS:
            checks.append(self._check_books(participant, completed))
        t = self.takeover
        if t.killed_at_s is not None:
            checks.append(Check(
                "takeover after SIGKILL",
                t.claimed_after_s is not None,
                f"{t.victim}'s partitions {t.partitions} ({t.in_flight} sagas in flight) claimed by others after "
                f"{t.claimed_after_s:.1f} s, {sum(t.resumed.values())} live sagas resumed"
                if t.claimed_after_s is not None else f"{t.victim}'s partitions {t.partitions} were never claimed by another manager",
            ))  # fmt: skip
        if self.zombie.enabled:
            checks.append(self._check_zombie())
        checks.append(Check(
            "managers still running",
            len(alive) == len(self.managers) and not self.unexpected_exits,
            f"{len(alive)}/{len(self.managers)} alive" + (f"; {'; '.join(self.unexpected_exits)}" if self.unexpected_exits else ""),
        ))  # fmt: skip
        checks.append(Check("participants still running", participants_alive, "alive" if participants_alive else "exited"))
        return report

    def _check_zombie(self) -> Check:
        """The zombie act happened: frozen, its partitions claimed by others meanwhile, alive after
        SIGCONT, and nothing it wrote with its old epoch accepted."""
        z = self.zombie
        name = "zombie fenced after SIGSTOP/SIGCONT"
        if z.frozen_at_s is None:
            return Check(name, False, f"no manager was frozen ({z.skipped or 'the run ended first'})")
        problems: list[str] = []
        if not z.claimed_while_frozen:
            problems.append(f"its partitions {z.partitions} were not claimed by others while it was frozen")
        if z.continued_at_s is None:
            problems.append("it was never woken")
        elif not z.alive_after:
            problems.append("it died after SIGCONT")
        if z.stale_accepted:
            problems.append(f"{z.stale_accepted} records it wrote with its old epoch after waking were accepted")
        back = (
            f"rejoined with partitions {', '.join(map(str, z.rejoined_partitions))}"
            if z.rejoined_partitions else "alive (no partition back yet)"
        )
        detail = (
            f"{z.name} frozen {z.frozen_for_s} s with {z.in_flight} sagas in flight; partitions {z.partitions} "
            f"claimed by others after {z.claimed_after_s:.1f} s, {sum(z.resumed.values())} live sagas resumed; "
            f"after SIGCONT {back}; stale records rejected {z.stale_rejected}, accepted {z.stale_accepted}"
            if z.claimed_after_s is not None else f"{z.name} frozen {z.frozen_for_s} s"
        )
        return Check(name, not problems, "; ".join(problems) if problems else detail)

    def _check_books(self, participant: str, completed: set[str]) -> Check:
        """The participant's books: balanced, one hold per completed saga of the right size, nothing else."""
        from participants.examples import db_path, inventory_report

        saga_type = PARTICIPANTS[participant]
        name = f"{participant} books consistent"
        try:
            books = inventory_report(db_path(self.work_dir / "db", participant))
        except FileNotFoundError:
            expected_any = any(saga.saga_type == saga_type and saga.saga_id in completed for saga in self.plan)
            return Check(name, not expected_any, "no database (no command reached it)")
        expected: dict[str, tuple[str, int]] = {}
        for saga in self.plan:
            effect = saga.effect(participant)
            if saga.saga_id in completed and effect is not None:
                expected[saga.saga_id] = effect
        problems: list[str] = []
        if not books.balanced:
            problems.append("capacity - available != sum of holds")
        extra = sorted(set(books.holds) - set(expected))
        lacking = sorted(set(expected) - set(books.holds))
        wrong = sorted(sid for sid in set(expected) & set(books.holds) if books.holds[sid] != expected[sid])
        if extra:
            problems.append(f"{len(extra)} holds of sagas that did not complete ({', '.join(extra[:3])})")
        if lacking:
            problems.append(f"{len(lacking)} completed sagas without a hold ({', '.join(lacking[:3])})")
        if wrong:
            problems.append(f"{len(wrong)} holds of the wrong size ({', '.join(wrong[:3])})")
        taken: Counter[str] = Counter()
        for item, quantity in expected.values():
            taken[item] += quantity
        for item, balance in books.items.items():
            if balance.capacity - balance.available != taken[item]:
                problems.append(
                    f"{item}: {balance.capacity - balance.available} taken, completed sagas account for {taken[item]}"
                )
        unit = {"flights": "seats", "hotels": "rooms", "cars": "cars", "credit": "credit", "payments": "charged"}[participant]
        detail = (
            f"{len(books.holds)} holds = completed {saga_type} sagas; {sum(taken.values())} {unit} taken, "
            f"aborted sagas left nothing"
        )
        return Check(name, not problems, "; ".join(problems) if problems else detail)

    def _count_dead_letters(self) -> int | None:
        from confluent_kafka import Consumer, KafkaException, TopicPartition

        from sagalog.kafka import reader_config

        consumer = Consumer(reader_config(self.bootstrap))
        try:
            meta = consumer.list_topics(timeout=5).topics.get(self.topics.dead_letters)
            if meta is None:
                return 0
            total = 0
            for p in meta.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(self.topics.dead_letters, p), timeout=5)
                total += high - low
            return total
        except KafkaException:
            return None
        finally:
            consumer.close()

    def _stay(self) -> None:
        url = self._start_web_console()
        self.console.print(
            f"everything keeps running; query any saga meanwhile:\n{escape(query_hints(self.bootstrap, self.topics.prefix, self.plan))}"
            + (f"\nweb console: {url}" if url else "")
            + "\nCtrl-C stops it all"
        )
        with contextlib.suppress(Interrupted):
            while True:
                signal.pause()  # until Ctrl-C / SIGTERM (the handler raises Interrupted)

    def _start_web_console(self) -> str | None:
        """`saga console` on this run's topics (8080 if free, else any port); its URL once it answers."""
        import urllib.error
        import urllib.request

        from sagalog.broker import free_port

        port = 8080
        try:
            with socket.create_server(("127.0.0.1", port)):
                pass
        except OSError:
            port = free_port()
        child = Child(
            "console",
            sagacli_command(
                "console", "-b", self.bootstrap, "--topic-prefix", self.topics.prefix,
                "--group-id", f"{self.topics.prefix}-managers", "--port", str(port),
                "--state-dir", str(self.work_dir / "console-state"),
            ),
            self.work_dir / "console.log",
        ).start()  # fmt: skip
        self.web_console = child
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and child.alive:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                return url
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)  # until the console answers (polling with a deadline)
        self.event(f"[warning] the web console did not start; see {self.work_dir / 'console.log'}")
        return None

    def _cleanup(self, *, remove_work_dir: bool) -> None:
        """Stop every process this demo started: participants, managers, then the broker.

        The work directory (logs, databases) is removed only after a run that passed."""
        for child in [*([self.web_console] if self.web_console else []), *([self.participants] if self.participants else []), *self.managers]:
            with contextlib.suppress(Exception):
                child.stop()
        if self.model is not None:
            with contextlib.suppress(Exception):
                self.model.close()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.stop()
        if remove_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def who_resumed(target: Takeover | Zombie) -> str:
    """``m1 took 2 and resumed 3 live sagas; m2 took 5 and resumed 1 live sagas`` (from their logs)."""
    parts = []
    for owner in sorted(set(target.new_owners.values())):
        mine = sorted(p for p, o in target.new_owners.items() if o == owner)
        n = sum(target.resumed_on.get(p, 0) for p in mine)
        unknown = any(p not in target.resumed_on for p in mine)  # its takeover line not found (yet)
        parts.append(f"{owner} took {', '.join(map(str, mine))} and resumed {n}{'+?' if unknown else ''} live sagas")
    return "; ".join(parts)


def query_hints(bootstrap: str, prefix: str, plan: list[PlannedSaga]) -> str:
    """Commands that look at this run's sagas (while its broker runs)."""
    where = f"-b {bootstrap}" + ("" if prefix == "saga" else f" --topic-prefix {prefix}")
    return "\n".join(
        (
            f"  saga list {where} --status ABORTED",
            f"  saga status {plan[0].saga_id} {where}",
            f"  saga history {plan[-1].saga_id} {where}",
        )
    )


def print_report(report: DemoReport, console: Console) -> None:
    """The final report: outcomes, the takeover, the checks, and how to look further."""
    console.print()
    console.print("[bold]outcomes[/]")
    total: Counter[str] = Counter()
    for saga_type, counts in sorted(report.outcomes.items()):
        total.update(counts)
        console.print(f"  {saga_type:<12} " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())))
    console.print(
        f"  {'all':<12} " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(total.items()))
        + f" in {report.duration_s:.1f} s"
        + (
            f"; start-to-end latency p50 {report.latency_ms['p50']} ms, p99 {report.latency_ms['p99']} ms"
            if report.latency_ms else ""
        )
    )
    t = report.takeover
    if t.killed_at_s is not None:
        console.print("[bold]takeover[/]")
        console.print(
            f"  SIGKILL {t.victim} (pid {t.victim_pid}) at {t.killed_at_s:.1f} s, the manager with the most sagas in "
            f"flight: partitions {', '.join(map(str, t.partitions)) or 'none'}, {t.in_flight} sagas in flight; "
            f"{t.waited} more started on them before the takeover"
        )
        session_s = report.settings["session_timeout_ms"] / 1000
        if t.claimed_after_s is not None:
            console.print(f"  claimed by the others after {t.claimed_after_s:.1f} s (session timeout {session_s:g} s): {who_resumed(t)}")
        if t.progress_after_s is not None:
            console.print(f"  its sagas progressing again after {t.progress_after_s:.1f} s (target: session timeout + 1 s = {session_s + 1:g} s)")
        elif t.nothing_to_resume:
            console.print("  no saga was left on its partitions to resume")
        if t.restarted_at_s is not None:
            back = (
                f"; owns partitions {', '.join(map(str, t.rejoined_partitions))} again {t.rejoined_after_s:.1f} s later"
                if t.rejoined_after_s is not None else "; got no partition back during the run"
            )
            console.print(f"  {t.victim} restarted at {t.restarted_at_s:.1f} s{back}")
    z = report.zombie
    if z.enabled:
        console.print("[bold]zombie[/]")
        if z.frozen_at_s is None:
            console.print(f"  no manager was frozen: {z.skipped or 'the run ended first'}")
        else:
            console.print(
                f"  SIGSTOP {z.name} (pid {z.pid}) at {z.frozen_at_s:.1f} s: partitions "
                f"{', '.join(map(str, z.partitions))}, {z.in_flight} sagas in flight; frozen {z.frozen_for_s} s"
            )
            if z.claimed_after_s is not None:
                console.print(
                    f"  claimed by the others {'while it was frozen' if z.claimed_while_frozen else 'after it woke'}, "
                    f"{z.claimed_after_s:.1f} s after the SIGSTOP: {who_resumed(z)}; "
                    f"{z.waited} sagas started on them meanwhile waited"
                )
            else:
                console.print("  its partitions were never claimed by another manager")
            if z.progress_after_s is not None:
                console.print(f"  its sagas progressing again {z.progress_after_s:.1f} s after the SIGSTOP")
            elif z.nothing_to_resume:
                console.print("  no saga was left on its partitions to resume")
            if z.continued_at_s is not None:
                back = (
                    f"rejoined: owns partitions {', '.join(map(str, z.rejoined_partitions))} again (new epochs) "
                    f"{z.rejoined_after_s:.1f} s later"
                    if z.rejoined_after_s is not None else ("alive, no partition back during the run" if z.alive_after else "dead")
                )
                console.print(f"  SIGCONT at {z.continued_at_s:.1f} s; {back}")
                noticed = f", noticed after {z.noticed_after_s:.1f} s" if z.noticed_after_s is not None else ""
                console.print(
                    f"  after waking{noticed}: {z.fenced_lines} 'fenced' and {z.deferred_lines} 'deferred' lines in its "
                    f"log; {z.stale_rejected} records of its old epoch rejected by the log's fold, "
                    f"{z.stale_accepted} accepted"
                )
                for line in z.woke_log:
                    console.print(f"    {escape(line)}")
    if report.dead_letters:
        console.print(f"[yellow]{report.dead_letters} message(s) in {report.topic_prefix}.dead-letters[/]")
    console.print("[bold]checks[/]")
    for check in report.checks:
        mark = "[green]PASS[/]" if check.ok else "[red]FAIL[/]"
        console.print(f"  {mark} {escape(check.name)}: {escape(check.detail)}")
    console.print("[bold green]all checks passed[/]" if report.ok else "[bold red]some checks failed[/]")

