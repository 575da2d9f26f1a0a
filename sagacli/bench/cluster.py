"""The deployments a benchmark starts (managers, participants) and their cleanup.

Every child is started through the project's CLI (``python -m sagacli ...``) as a
:class:`sagacli.process.Child`, owned by the run's :class:`sagacli.process.Processes`: in its own
session, so a Ctrl-C in the terminal reaches only the bench, which then kills its children in
order; on Linux it also dies with the bench if the bench itself is SIGKILLed, instead of loading
the machine forever.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from sagacli.process import Child, Processes, sagacli_command
from sagalog.config import Topics
from sagalog.kafka import admin_client
from sagalog.topics import ensure_topics, quiet_client


class ChildDied(RuntimeError):
    pass


@dataclass
class Deployment:
    """One saga deployment under test: a topic prefix, its topics, its manager and participant processes."""

    procs: Processes
    bootstrap: str
    prefix: str
    definitions: Path
    partitions: int
    session_timeout_ms: int
    participants: tuple[str, ...] = ("noop",)
    manager_log_level: str = "WARNING"
    #: Extra flags for every manager / participant process, and extra environment for both
    #: (the observability part turns metrics and tracing on with them).
    manager_args: tuple[str, ...] = ()
    participant_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    managers: list[Child] = field(default_factory=list)
    workers: list[Child] = field(default_factory=list)

    @property
    def topics(self) -> Topics:
        return Topics(prefix=self.prefix)

    def create_topics(self) -> None:
        ensure_topics(self.bootstrap, self.topics, partitions=self.partitions, participants=self.participants, timeout_s=30)

    def start_manager(self) -> Child:
        n = len(self.managers) + 1
        child = self.procs.spawn(
            f"{self.prefix}-manager-{n}",
            sagacli_command(
                "manager",
                "-b", self.bootstrap,
                "--topic-prefix", self.prefix,
                "--group-id", f"{self.prefix}-managers",
                "--definitions", str(self.definitions),
                "--partitions", str(self.partitions),
                "--session-timeout-ms", str(self.session_timeout_ms),
                "--log-level", self.manager_log_level,
                *self.manager_args,
            ),
            env=self.env,
        )
        self.managers.append(child)
        return child

    def start_participant(self, name: str = "noop") -> Child:
        n = len(self.workers) + 1
        child = self.procs.spawn(
            f"{self.prefix}-participant-{n}",
            sagacli_command(
                "participant", "run", name,
                "-b", self.bootstrap,
                "--topic-prefix", self.prefix,
                "--db-dir", str(self.procs.log_dir / f"{self.prefix}-db"),
                "--session-timeout-ms", str(self.session_timeout_ms),
                "--log-level", "WARNING",
                *self.participant_args,
            ),
            env=self.env,
        )
        self.workers.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.managers + self.workers:
            if not child.alive and child.returncode != -signal.SIGKILL:
                raise ChildDied(f"{child.name} exited with code {child.returncode}; its log:\n{child.tail()}")

    def stop(self) -> None:
        self.procs.close(self.managers + self.workers)
        self.managers.clear()
        self.workers.clear()

    def delete_topics(self) -> None:
        delete_topics(self.bootstrap, self.prefix)


def delete_topics(bootstrap: str, prefix: str, timeout_s: float = 15.0) -> None:
    """Best effort: drop every topic of a prefix (frees the embedded broker's memory between parts)."""
    admin: AdminClient = admin_client(bootstrap, quiet_client())
    try:
        names = [t for t in admin.list_topics(timeout=timeout_s).topics if t.startswith(prefix + ".")]
        if not names:
            return
        for future in admin.delete_topics(names, operation_timeout=timeout_s).values():
            with contextlib.suppress(KafkaException):
                future.result()
    except KafkaException:
        pass


def wait_until(predicate: object, timeout_s: float, what: str, *, interval_s: float = 0.05, check: object = None) -> None:
    """Poll ``predicate()`` until true; ``check()`` (e.g. children alive) runs on every round."""
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if check is not None:
            check()  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)  # polling with a deadline: the system under test has no callbacks for us
