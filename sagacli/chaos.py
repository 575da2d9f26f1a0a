"""``saga chaos``: a real deployment under load and a seeded schedule of faults, then a verdict.

The run: a broker (embedded, or ``--bootstrap-servers``), N managers and the example
participants as OS processes; sagas started at a steady rate; every few seconds one fault from
a schedule drawn from ``--seed`` (so a failing run can be replayed):

* ``kill``: SIGKILL one manager, sometimes two, sometimes all; each restarted after a random delay;
* ``freeze``: SIGSTOP a manager for longer than the session timeout, then SIGCONT (a zombie);
* ``participant``: SIGKILL the participants' process, restart it on the same state directory;
* ``poison``: garbage bytes, an unknown schema fingerprint and a record of the wrong type, on the
  inbox and on every command topic;
* ``broker`` (only with ``kafka_sh``: a real Kafka started by ``../shared/kafka/kafka.sh``, whose
  data survives a restart): SIGKILL the broker, start it again after a random delay.

All along, a meddler consumes the inbox and the command topics and sends a copy of a share of the
replies and commands again, 0.2-3 s later: replies duplicated, delayed and so reordered; commands
delivered twice.

Then it heals (every frozen manager continued, every dead process restarted), waits until every
started saga is terminal, and checks what must hold. The checker reads the log's records, the
dead-letter topic and the participants' SQLite files on its own; it shares no code with the
manager's fold or decisions:

* liveness: every started saga reached the log and ended; takeovers and queries within bounds;
  every process alive at the end (no poison stopped anything);
* safety: every effect taken once (books balance), completed sagas hold their effects and aborted
  ones none, no execute took effect after its compensation, compensations ended in reverse
  dependency order, the dead-letter topic holds every poison message.

The result is a JSON report and a Markdown summary; :attr:`ChaosReport.ok` says whether every
invariant held.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sagacli.demo import PARTICIPANTS, PlannedSaga, plan_sagas
from sagacli.process import Child, sagacli_command
from sagalog.config import Topics
from sagalog.errors import ConfigError, SagaError

FAULT_KINDS = ("kill", "freeze", "participant", "poison", "broker")
#: Faults drawn by default; ``broker`` needs ``kafka_sh``.
DEFAULT_FAULTS = ("kill", "freeze", "participant", "poison")
_TAKEOVER = re.compile(r"took over partition (\d+) at epoch (\d+).* in (\d+) ms")


@dataclass(frozen=True)
class ChaosSettings:
    seed: int = 1
    duration_s: float = 60.0
    managers: int = 3
    partitions: int = 6
    rate: float = 20.0
    session_timeout_ms: int = 6000
    faults: tuple[str, ...] = DEFAULT_FAULTS
    #: Share of replies and commands the meddler sends a second time, 0.2-3 s later.
    meddle_rate: float = 0.05
    #: ``kafka.sh`` of the real Kafka at ``bootstrap`` (127.0.0.1:PORT), for ``broker`` faults.
    kafka_sh: Path | None = None
    #: Seconds between faults: drawn uniformly from this range.
    fault_every_s: tuple[float, float] = (5.0, 9.0)
    failure_rate: float = 0.15
    glitch_rate: float = 0.1
    #: After healing, every saga must end within this long.
    settle_timeout_s: float = 120.0
    #: A query (read-model catch-up) must answer within this long, whatever the managers do.
    query_bound_s: float = 10.0
    #: Every takeover (fence, replay, claim) must finish within this long once granted.
    takeover_bound_s: float = 10.0
    bootstrap: str | None = None
    work_dir: Path | None = None

    def validate(self) -> None:
        unknown = sorted(set(self.faults) - set(FAULT_KINDS))
        if unknown:
            raise ConfigError(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULT_KINDS)}")
        if "broker" in self.faults and (self.kafka_sh is None or self.bootstrap is None):
            raise ConfigError("the broker fault needs --kafka-sh and --bootstrap-servers of the Kafka it started")
        if self.managers < 2:
            raise ConfigError(f"--managers must be at least 2 (faults need a survivor), not {self.managers}")
        if self.duration_s <= 0 or self.rate <= 0:
            raise ConfigError("--duration and --rate must be positive")


@dataclass
class Fault:
    at_s: float
    kind: str
    target: str
    hold_s: float  # how long the process stays down / frozen


@dataclass
class Invariant:
    name: str
    ok: bool
    count: int = 0
    examples: list[str] = field(default_factory=list)
    detail: str = ""


@dataclass
class ChaosReport:
    seed: int
    settings: dict[str, Any]
    schedule: list[Fault]
    started: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    takeovers_ms: list[int] = field(default_factory=list)
    query_seconds_max: float = 0.0
    #: Replies and commands the meddler sent a second time.
    meddled: dict[str, int] = field(default_factory=dict)
    #: Start requests the broker never acknowledged (e.g. while it was down): not started.
    refused_starts: int = 0
    invariants: list[Invariant] = field(default_factory=list)
    work_dir: str = ""

    @property
    def ok(self) -> bool:
        return all(i.ok for i in self.invariants)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out

    def to_markdown(self) -> str:
        lines = [
            f"# Chaos run, seed {self.seed}: {'PASS' if self.ok else 'FAIL'}",
            "",
            f"{self.started} sagas started; outcomes {dict(sorted(self.outcomes.items()))}; "
            f"{len(self.schedule)} faults; takeovers {len(self.takeovers_ms)} "
            f"(max {max(self.takeovers_ms, default=0)} ms); slowest query {self.query_seconds_max:.2f} s; "
            f"sent again by the meddler: {self.meddled.get('replies', 0)} replies, {self.meddled.get('commands', 0)} commands; "
            f"start requests the broker did not acknowledge: {self.refused_starts}",
            "",
            "| invariant | holds | count | first examples |",
            "|---|---|---|---|",
        ]
        for inv in self.invariants:
            lines.append(f"| {inv.name} | {'yes' if inv.ok else '**NO**'} | {inv.count} | {', '.join(inv.examples[:5])} {inv.detail} |")
        lines += ["", "Fault schedule:", ""]
        lines += [f"- {f.at_s:6.1f} s {f.kind} {f.target} for {f.hold_s:.1f} s" for f in self.schedule]
        return "\n".join(lines) + "\n"


def draw_schedule(settings: ChaosSettings) -> list[Fault]:
    """The faults of a run, a pure function of the settings (and so of the seed)."""
    rng = random.Random(settings.seed)
    session_s = settings.session_timeout_ms / 1000
    out: list[Fault] = []
    t = rng.uniform(*settings.fault_every_s)
    names = [f"m{i}" for i in range(1, settings.managers + 1)]
    while t < settings.duration_s and settings.faults:
        kind = rng.choice(settings.faults)
        if kind == "kill":  # one manager mostly, sometimes two, sometimes every one of them
            for target in rng.sample(names, rng.choice([1, 1, 1, 2, len(names)])):
                out.append(Fault(round(t, 2), "kill", target, round(rng.uniform(2, 8), 2)))
        elif kind == "freeze":
            out.append(Fault(round(t, 2), "freeze", rng.choice(names), round(rng.uniform(session_s + 2, session_s + 9), 2)))
        elif kind == "participant":
            out.append(Fault(round(t, 2), "participant", "participants", round(rng.uniform(1, 4), 2)))
        elif kind == "poison":
            out.append(Fault(round(t, 2), "poison", "inbox and command topics", 0.0))
        else:
            out.append(Fault(round(t, 2), "broker", "broker", round(rng.uniform(2, 6), 2)))
        t += rng.uniform(*settings.fault_every_s)
    return out


class Chaos:
    def __init__(self, settings: ChaosSettings, echo: Callable[[str], None] = print) -> None:
        settings.validate()
        self.settings = settings
        self.echo = echo
        self.work_dir = settings.work_dir or Path(tempfile.mkdtemp(prefix="saga-chaos-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.topics = Topics(prefix=f"chaos{settings.seed}-{int(time.time())}")
        self.broker: Any = None
        self.bootstrap = settings.bootstrap or ""
        self.managers: dict[str, Child] = {}
        self.participants: Child | None = None
        self.schedule = draw_schedule(settings)
        self.started: list[PlannedSaga] = []
        self.plan: list[PlannedSaga] = []
        self.query_seconds: list[float] = []
        self.log_epochs: dict[str, int] = {}  # saga id -> highest epoch claimed on its log partition
        self.unresolved_definitions: list[str] = []  # sagas whose definition record was not before them
        self.query_errors: list[str] = []
        self._t0 = 0.0
        self._stop = threading.Event()
        self.poison: list[tuple[str, int, int]] = []  # (topic, partition, offset) of every poison message
        self.meddled = Counter[str]()
        self.unexpected_exits: list[str] = []
        #: Start requests the broker did not acknowledge (never started; reported, not checked).
        self.refused_starts: list[str] = []
        #: While the broker is down (a broker fault) and shortly after, queries may fail: not counted.
        self._broker_down_until = 0.0
        self._broker_kills = 0  # a restart only ends the downtime if no kill came after it began
        self._broker_lock = threading.Lock()

    # -- processes ---------------------------------------------------------------------------

    def _manager(self, name: str) -> Child:
        from sagacli.cli.manager import default_definitions

        args = [
            "manager", "-b", self.bootstrap, "--topic-prefix", self.topics.prefix,
            "--group-id", f"{self.topics.prefix}-managers", "--partitions", str(self.settings.partitions),
            "--session-timeout-ms", str(self.settings.session_timeout_ms), "--log-level", "INFO",
            "--wait-for-broker", "120",  # restarted while the broker restarts too: wait, as under a supervisor
            *[arg for path in default_definitions() for arg in ("--definitions", str(path))],
        ]  # fmt: skip
        return Child(name, sagacli_command(*args), self.work_dir / f"manager-{name}.log")

    def _participants(self) -> Child:
        s = self.settings
        args = [
            "participant", "run", *PARTICIPANTS, "--db-dir", str(self.work_dir / "db"),
            "--failure-rate", str(s.failure_rate), "--glitch-rate", str(s.glitch_rate),
            "-b", self.bootstrap, "--topic-prefix", self.topics.prefix,
            "--session-timeout-ms", str(s.session_timeout_ms), "--wait-for-broker", "120",
        ]  # fmt: skip
        return Child("participants", sagacli_command(*args), self.work_dir / "participants.log")

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def run(self) -> ChaosReport:
        from sagalog.broker import EmbeddedBroker
        from sagalog.topics import ensure_topics

        s = self.settings
        try:
            if not self.bootstrap:
                self.broker = EmbeddedBroker(port=0, log_path=self.work_dir / "broker.log").start()
                self.bootstrap = self.broker.bootstrap
            ensure_topics(self.bootstrap, self.topics, partitions=s.partitions, participants=list(PARTICIPANTS))
            (self.work_dir / "db").mkdir(exist_ok=True)
            self.participants = self._participants().start()
            for i in range(1, s.managers + 1):
                self.managers[f"m{i}"] = self._manager(f"m{i}").start()
            self._t0 = time.monotonic()
            threads = [threading.Thread(target=f, daemon=True) for f in (self._load, self._query_probe, self._meddle)]
            for t in threads:
                t.start()
            self._inject()
            self._stop.set()
            for t in threads:
                t.join(30)
            self._heal()
            return self._verdict()
        finally:
            for child in [*self.managers.values(), *([self.participants] if self.participants else [])]:
                if child.alive:
                    child.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
                child.stop()
            if self.broker is not None:
                self.broker.stop()

    def _load(self) -> None:
        """Start sagas at the rate. A saga counts as started once the broker acknowledged its start
        request (as `saga start` reports it); one the broker refused was never started."""
        from confluent_kafka import Producer

        from sagalog.codec import Codec
        from sagalog.kafka import producer_config
        from sagalog.records import StartSaga

        codec = Codec()
        producer = Producer(producer_config(self.bootstrap))
        plan = self.plan = plan_sagas(int(self.settings.duration_s * self.settings.rate) + 1, self.settings.seed)
        interval = 1 / self.settings.rate

        def on_delivery(saga: PlannedSaga) -> Callable[[Any, Any], None]:
            def report(err: Any, _msg: Any) -> None:
                if err is None:
                    self.started.append(saga)
                else:
                    self.refused_starts.append(f"{saga.saga_id}: {err}")
            return report

        next_at = time.monotonic()
        for saga in plan:
            if self._stop.is_set():
                break
            start = StartSaga(saga_id=saga.saga_id, saga_type=saga.saga_type, payload=json.dumps(saga.payload), requested_ms=int(time.time() * 1000))
            producer.produce(self.topics.inbox, codec.encode(start), key=saga.saga_id.encode(), on_delivery=on_delivery(saga))
            producer.poll(0)
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        producer.flush(120)

    def _query_probe(self) -> None:
        """A query every few seconds, as a user's repeated `saga list` makes it (a new read model
        object on the same state directory: an incremental catch-up of every partition). Queries
        must answer, within a bound, whatever the managers do. (A first, full catch-up of a large
        log is a one-time cost that grows with the log; it is measured by `saga bench`.)"""
        from sagalog.readmodel import ReadModel

        while not self._stop.wait(3.0):
            began = time.monotonic()
            error: str | None = None
            try:
                with ReadModel(self.bootstrap, self.topics, state_dir=self.work_dir / "probe") as model:
                    model.catch_up()
            except SagaError as err:
                error = f"{self.elapsed():.1f}s: {err}"
            if began < self._broker_down_until:
                continue  # no broker, no answer: that is not the coordinator's doing
            if error is not None:
                self.query_errors.append(error)
            self.query_seconds.append(time.monotonic() - began)

    def _inject(self) -> None:
        timers: list[threading.Timer] = []
        for fault in self.schedule:
            wait = fault.at_s - self.elapsed()
            if wait > 0 and self._stop.wait(wait):
                break
            self.echo(f"[{self.elapsed():6.1f}s] {fault.kind} {fault.target}" + (f" for {fault.hold_s:.1f}s" if fault.hold_s else ""))
            self._note_unexpected_exits()
            timer: threading.Timer | None = None
            if fault.kind == "participant":
                assert self.participants is not None
                self.participants.kill()
                timer = threading.Timer(fault.hold_s, self._restart_participants)
            elif fault.kind == "poison":
                self._inject_poison()
            elif fault.kind == "broker":
                self._kill_broker()
                timer = threading.Timer(fault.hold_s, self._start_broker)
            else:
                child = self.managers[fault.target]
                if not child.alive:
                    continue
                if fault.kind == "kill":
                    child.kill()
                    timer = threading.Timer(fault.hold_s, self._restart_manager, (fault.target,))
                else:
                    child.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
                    timer = threading.Timer(fault.hold_s, child.proc.send_signal, (signal.SIGCONT,))  # type: ignore[union-attr]
            if timer is not None:
                timer.daemon = True
                timer.start()
                timers.append(timer)
        remaining = self.settings.duration_s - self.elapsed()
        if remaining > 0:
            time.sleep(remaining)
        for timer in timers:
            timer.join()

    def _note_unexpected_exits(self) -> None:
        """A process that died without being killed by us (a poison message must never do that)."""
        for child in [*self.managers.values(), *([self.participants] if self.participants else [])]:
            if child.proc is not None and not child.alive and not child.killed:
                line = f"{child.name} (pid {child.proc.pid}) exited with code {child.proc.returncode}"
                if not any(seen.startswith(line) for seen in self.unexpected_exits):
                    self.unexpected_exits.append(f"{line}, seen at {self.elapsed():.1f}s (log: {child.log_path.name})")

    def _inject_poison(self) -> None:
        """Garbage, an unknown schema fingerprint and a record of the wrong type, on the inbox and on
        every command topic; their positions are kept to find them on the dead-letter topic."""
        from confluent_kafka import Producer

        from sagalog.codec import MAGIC, Codec
        from sagalog.kafka import producer_config
        from sagalog.records import PartitionClaim

        wrong_type = Codec().encode(PartitionClaim(partition=0, epoch=1, owner="poison", timestamp_ms=0))
        bodies = [b"\x00garbage\xff" * 3, MAGIC + b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"\x02x", wrong_type]
        topics = [self.topics.inbox, *(self.topics.commands(p) for p in PARTICIPANTS)]
        producer = Producer(producer_config(self.bootstrap))
        delivered: list[tuple[str, int, int]] = []

        def on_delivery(err: Any, msg: Any) -> None:
            if err is None:
                delivered.append((msg.topic(), msg.partition(), msg.offset()))

        n = len(self.poison)
        for topic in topics:
            for i, body in enumerate(bodies):
                producer.produce(topic, body, key=f"poison-{n}-{i}".encode(), on_delivery=on_delivery)
        producer.flush(30)
        self.poison.extend(delivered)

    def _kafka_pid(self) -> int | None:
        port = self.bootstrap.rsplit(":", 1)[-1]
        state = Path(os.environ.get("KAFKA_STATE_DIR") or Path(os.environ.get("TMPDIR", "/tmp")) / f"kafka-{port}")
        try:
            return int((state / "kafka.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _kill_broker(self) -> None:
        with self._broker_lock:
            self._broker_kills += 1
            self._broker_down_until = float("inf")
        pid = self._kafka_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _start_broker(self) -> None:
        assert self.settings.kafka_sh is not None
        port = self.bootstrap.rsplit(":", 1)[-1]
        kills = self._broker_kills
        subprocess.run([str(self.settings.kafka_sh), "start", port], check=False, timeout=180,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with self._broker_lock:
            # Restarts take 7-30 s here, faults come every 5-9 s: a kill may have hit the broker
            # while this start waited for it. Then the broker is down still, until a later start.
            if kills == self._broker_kills:
                self._broker_down_until = time.monotonic() + 15.0  # clients reconnect and groups settle

    def _meddle(self) -> None:
        """Send a copy of a share of the replies (inbox) and commands again, 0.2-3 s later: the
        copies are duplicates, delayed, and so out of order with what followed the originals."""
        from confluent_kafka import Consumer, Producer

        from sagalog.codec import Codec
        from sagalog.kafka import consumer_config, producer_config
        from sagalog.records import ParticipantCommand, ParticipantReply

        rng = random.Random(self.settings.seed + 1)
        codec = Codec()
        consumer = Consumer(consumer_config(self.bootstrap, f"{self.topics.prefix}-meddler", session_timeout_ms=self.settings.session_timeout_ms))
        consumer.subscribe([self.topics.inbox, *(self.topics.commands(p) for p in PARTICIPANTS)])
        producer = Producer(producer_config(self.bootstrap))
        held: list[tuple[float, str, int, bytes | None, bytes]] = []
        try:
            while not self._stop.is_set():
                for msg in consumer.consume(500, 0.1):
                    if msg.error() or rng.random() >= self.settings.meddle_rate:
                        continue
                    try:
                        item = codec.decode(msg.value())
                    except SagaError:
                        continue  # poison: the real consumers deal with it
                    if isinstance(item, ParticipantReply | ParticipantCommand):
                        kind = "replies" if isinstance(item, ParticipantReply) else "commands"
                        self.meddled[kind] += 1
                        held.append((time.monotonic() + rng.uniform(0.2, 3.0), msg.topic(), msg.partition(), msg.key(), msg.value()))
                now = time.monotonic()
                for _due, topic, partition, key, value in [h for h in held if h[0] <= now]:
                    producer.produce(topic, value, key=key, partition=partition)
                held = [h for h in held if h[0] > now]
                producer.poll(0)
        finally:
            producer.flush(10)
            consumer.close()

    def _restart_manager(self, name: str) -> None:
        self.managers[name].stop()
        self.managers[name].start()

    def _restart_participants(self) -> None:
        assert self.participants is not None
        self.participants.stop()
        self.participants.start()

    def _heal(self) -> None:
        self._note_unexpected_exits()
        if self.settings.kafka_sh is not None:
            self._start_broker()  # a no-op when it is running
        for name, child in self.managers.items():
            if child.alive:
                child.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
            else:
                self._restart_manager(name)
        assert self.participants is not None
        if not self.participants.alive:
            self._restart_participants()
        self.echo(f"[{self.elapsed():6.1f}s] healed; waiting for {len(self.started)} sagas to end")

    # -- the verdict ---------------------------------------------------------------------------

    def _read_log(self) -> tuple[dict[str, str], dict[str, list[tuple[str, str]]], dict[str, dict[str, list[str]]]]:
        """Each saga's newest status, its events in log order as (event type, step), and its
        steps' dependencies (from the pinned definition), read from the raw records. On the way,
        the highest epoch claimed on the log of each saga's partition (``self.log_epochs``), and
        the sagas whose definition record was not on their partition before their first record
        (``self.unresolved_definitions``)."""
        from sagalog.fold import pinned_definition_of
        from sagalog.reader import scan
        from sagalog.records import PartitionClaim, SagaDefinitionRecord, SagaLogRecord

        latest: dict[str, tuple[int, str]] = {}
        events: dict[str, list[tuple[str, str]]] = {}
        dependencies: dict[str, dict[str, list[str]]] = {}
        partition_epoch: dict[int, int] = {}
        partition_of: dict[str, int] = {}
        unresolved: list[str] = []
        pinned_on: dict[int, set[str]] = {}  # partition -> ids of the definition records read so far
        for entry in scan(self.bootstrap, self.topics, timeout_s=120):
            item = entry.item
            if isinstance(item, SagaDefinitionRecord):
                pinned_on.setdefault(entry.partition, set()).add(item.definition_id)
            if isinstance(item, PartitionClaim | SagaLogRecord):
                partition_epoch[entry.partition] = max(partition_epoch.get(entry.partition, 0), item.epoch)
            if not isinstance(item, SagaLogRecord):
                continue
            partition_of[item.saga_id] = entry.partition
            seq, _ = latest.get(item.saga_id, (0, ""))
            if item.seq > seq:
                latest[item.saga_id] = (item.seq, str(item.snapshot.status.value))
            events.setdefault(item.saga_id, []).extend((type(e).__name__, getattr(e, "step", "")) for e in item.events)
            if item.saga_id not in dependencies:
                definition = pinned_definition_of(item.snapshot)
                reference = item.snapshot.definition_id
                if definition is None or (reference and reference not in pinned_on.get(entry.partition, ())):
                    unresolved.append(f"{item.saga_id}: definition {item.snapshot.definition_id}")
                    dependencies[item.saga_id] = {}
                else:
                    dependencies[item.saga_id] = {s.name: list(definition.dependencies(s.name)) for s in definition.steps}
        self.log_epochs = {sid: partition_epoch[p] for sid, p in partition_of.items()}
        self.unresolved_definitions = unresolved
        return {k: v for k, (_, v) in latest.items()}, events, dependencies

    def _terminal_states(self) -> dict[str, str]:
        return self._read_log()[0]

    @staticmethod
    def _compensation_order(events: dict[str, list[tuple[str, str]]], dependencies: dict[str, dict[str, list[str]]]) -> list[str]:
        """A step's compensation may begin only after every compensation of a step that depends on
        it (directly or through others) has ended: reverse dependency order."""
        bad: list[str] = []
        for saga_id, saga_events in events.items():
            deps = dependencies.get(saga_id, {})
            dependents: dict[str, set[str]] = {name: set() for name in deps}
            for name, needs in deps.items():
                for need in needs:
                    dependents.setdefault(need, set()).add(name)
            ended: set[str] = set()
            compensated = {step for kind, step in saga_events if kind == "CompensationEnded"}
            for kind, step in saga_events:
                if kind == "CompensationEnded":
                    ended.add(step)
                elif kind == "CompensationBegun":
                    closure, todo = set(), list(dependents.get(step, ()))
                    while todo:
                        d = todo.pop()
                        if d not in closure:
                            closure.add(d)
                            todo.extend(dependents.get(d, ()))
                    early = sorted(d for d in closure & compensated if d not in ended)
                    if early:
                        bad.append(f"{saga_id}: {step} before {', '.join(early)}")
                        break
        return bad

    def _dead_letter_sources(self) -> set[tuple[str, int, int]]:
        from confluent_kafka import Consumer, KafkaError, TopicPartition

        from sagalog.codec import Codec
        from sagalog.kafka import reader_config
        from sagalog.records import DeadLetter

        codec, found = Codec(), set()
        consumer = Consumer(reader_config(self.bootstrap))
        try:
            meta = consumer.list_topics(timeout=10).topics.get(self.topics.dead_letters)
            partitions = sorted(meta.partitions) if meta is not None else []
            consumer.assign([TopicPartition(self.topics.dead_letters, p, 0) for p in partitions])
            pending, deadline = set(partitions), time.monotonic() + 60
            while pending and time.monotonic() < deadline:
                for msg in consumer.consume(1000, 0.2):
                    if msg.error():
                        if msg.error().code() == KafkaError._PARTITION_EOF:
                            pending.discard(msg.partition())
                        continue
                    with contextlib.suppress(SagaError):
                        letter = codec.decode(msg.value())
                        if isinstance(letter, DeadLetter):
                            found.add((letter.source_topic, letter.source_partition, letter.source_offset))
        finally:
            consumer.close()
        return found

    def _verdict(self) -> ChaosReport:
        s = self.settings
        report = ChaosReport(seed=s.seed, settings={k: str(v) for k, v in asdict(s).items()}, schedule=self.schedule, work_dir=str(self.work_dir))
        report.started = len(self.started)
        ids = {p.saga_id for p in self.started}
        deadline = time.monotonic() + s.settle_timeout_s
        while True:
            states = self._terminal_states()
            open_ = sorted(i for i in ids if states.get(i) not in ("COMPLETED", "ABORTED"))
            if not open_ or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        report.outcomes = dict(Counter(states.get(i, "MISSING") for i in ids))
        missing = sorted(i for i in ids if i not in states)
        stuck = sorted(i for i in open_ if i in states)
        report.invariants.append(Invariant("every started saga is on the log", not missing, len(missing), missing[:10]))
        report.invariants.append(Invariant(f"every saga ended within {s.settle_timeout_s:g}s of healing", not stuck, len(stuck), stuck[:10]))
        for child in self.managers.values():
            for m in _TAKEOVER.finditer(child.log_path.read_text(errors="replace")):
                report.takeovers_ms.append(int(m.group(3)))
        slow_takeovers = [f"{ms} ms" for ms in report.takeovers_ms if ms > s.takeover_bound_s * 1000]
        report.invariants.append(Invariant(f"every takeover finished within {s.takeover_bound_s:g}s", not slow_takeovers, len(slow_takeovers), slow_takeovers[:5]))
        report.query_seconds_max = max(self.query_seconds, default=0.0)
        slow = [f"{q:.1f}s" for q in self.query_seconds if q > s.query_bound_s]
        report.invariants.append(Invariant("queries answered throughout", not self.query_errors, len(self.query_errors), self.query_errors[:3]))
        report.invariants.append(Invariant(f"queries answered within {s.query_bound_s:g}s", not slow, len(slow), slow[:5]))
        _, events, dependencies = self._read_log()
        # The books hold every saga on the log (a start whose acknowledgement was lost may still have begun).
        report.invariants.extend(self._check_participants({p.saga_id: p for p in self.plan if p.saga_id in ids or p.saga_id in states}, states))
        unresolved = self.unresolved_definitions
        report.invariants.append(Invariant("every saga's pinned definition is on the log before it", not unresolved, len(unresolved), unresolved[:10]))
        disorder = self._compensation_order(events, dependencies)
        report.invariants.append(Invariant("compensations ran in reverse dependency order", not disorder, len(disorder), disorder[:10]))
        if self.poison:
            lettered = self._dead_letter_sources()
            lost = [f"{t}[{p}]@{o}" for t, p, o in self.poison if (t, p, o) not in lettered]
            report.invariants.append(Invariant(
                f"the dead-letter topic holds every poison message ({len(self.poison)})", not lost, len(lost), lost[:10]))
        self._note_unexpected_exits()
        alive = [c.name for c in [*self.managers.values(), *([self.participants] if self.participants else [])] if not c.alive]
        stopped = self.unexpected_exits + [f"{name} not running at the end" for name in alive]
        report.invariants.append(Invariant("no fault or poison message stopped a process", not stopped, len(stopped), stopped[:10]))
        report.meddled = dict(self.meddled)
        if s.meddle_rate > 0:  # a fault injector that stayed silent makes every other line meaningless
            silent = [kind for kind in ("replies", "commands") if not self.meddled.get(kind)]
            report.invariants.append(Invariant("the meddler sent replies and commands again", not silent, len(silent), [f"no {kind} sent again" for kind in silent]))
        report.refused_starts = len(self.refused_starts)
        return report

    def _check_participants(self, planned: dict[str, PlannedSaga], states: dict[str, str]) -> list[Invariant]:
        """Each participant's SQLite file, read with plain SQL: its books hold exactly the effects of
        completed sagas (each taken once), and no execute took effect after its compensation."""
        unbalanced: list[str] = []
        wrong_holds: list[str] = []
        late: list[str] = []
        fenced: list[str] = []
        for name in PARTICIPANTS:
            path = self.work_dir / "db" / f"{name}.db"
            expected = {
                sid: effect
                for sid, saga in planned.items()
                if states.get(sid) == "COMPLETED" and (effect := saga.effect(name)) is not None
            }
            if not path.exists():
                wrong_holds.extend(f"{name}:{sid} (no database)" for sid in sorted(expected)[:3])
                continue
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                holds = {sid: (item, qty) for sid, item, qty in db.execute("SELECT saga_id, item, quantity FROM inventory_holds")}
                held: Counter[str] = Counter()
                for item, qty in holds.values():
                    held[item] += qty
                for item, capacity, available in db.execute("SELECT item, capacity, available FROM inventory_items"):
                    if capacity - available != held[item]:
                        unbalanced.append(f"{name}:{item} taken {capacity - available}, held {held[item]}")
                for sid in sorted(set(holds) ^ set(expected)):
                    wrong_holds.append(f"{name}:{sid} ({'hold of a saga that did not complete' if sid in holds else 'completed without a hold'})")
                wrong_holds.extend(f"{name}:{sid} (size)" for sid in sorted(set(holds) & set(expected)) if holds[sid] != expected[sid])
                rows = db.execute(
                    "SELECT e.saga_id, e.step FROM saga_journal e JOIN saga_journal c "
                    "ON c.saga_id = e.saga_id AND c.step = e.step AND c.action = 'COMPENSATE' "
                    "WHERE e.action = 'EXECUTE' AND e.outcome = 'SUCCESS' AND e.recorded_ms > c.recorded_ms"
                )
                late.extend(f"{name}:{sid}/{step}" for sid, step in rows)
                # A participant refuses a command older than the newest epoch it saw for the saga;
                # a row recorded later with a lower epoch is a fenced manager's command taking effect.
                rows = db.execute(
                    "SELECT a.saga_id, a.step, a.action, a.epoch, b.step, b.action, b.epoch FROM saga_journal a "
                    "JOIN saga_journal b ON b.saga_id = a.saga_id AND b.recorded_ms > a.recorded_ms AND b.epoch < a.epoch"
                )
                fenced.extend(f"{name}:{sid} {s1}/{a1}@{e1} then {s2}/{a2}@{e2}" for sid, s1, a1, e1, s2, a2, e2 in rows)
                # ...and no command took effect with an epoch no manager claimed on the log.
                for sid, epoch in db.execute("SELECT saga_id, max(epoch) FROM saga_journal GROUP BY saga_id"):
                    if epoch is None or epoch > self.log_epochs.get(sid, 0):
                        fenced.append(f"{name}:{sid} epoch {epoch} above every epoch on the log ({self.log_epochs.get(sid, 0)})")
            finally:
                db.close()
        return [
            Invariant("every effect taken exactly once (books balance)", not unbalanced, len(unbalanced), unbalanced[:10]),
            Invariant("completed sagas hold their effects, aborted ones none", not wrong_holds, len(wrong_holds), wrong_holds[:10]),
            Invariant("no execute took effect after its compensation", not late, len(late), late[:10]),
            Invariant("no command of a fenced epoch took effect after the newer epoch's", not fenced, len(fenced), fenced[:10]),
        ]
