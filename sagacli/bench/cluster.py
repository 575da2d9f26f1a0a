"""The processes a benchmark starts (managers, participants, profilers) and their cleanup.

Every child is started through the project's CLI (``python -m sagacli ...``) in its own
session, so a Ctrl-C in the terminal reaches only the bench, which then kills its children in
order. On Linux the children also get PR_SET_PDEATHSIG: if the bench itself is SIGKILLed, they
die with it instead of loading the machine forever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from sagalog.config import Topics
from sagalog.kafka import admin_client
from sagalog.topics import ensure_topics, quiet_client

PYTHON = sys.executable


def _die_with_parent() -> object | None:
    """preexec hook: SIGKILL the child when the bench dies (Linux; main thread only)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return hook


@dataclass
class Child:
    """One child process and its log file."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes]
    log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def instance_id(self) -> str:
        """What a manager started this way calls itself (ManagerSettings.instance_id)."""
        return f"{socket.gethostname()}-{self.pid}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (also used for cleanup: every topic a bench writes is thrown away)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def rss_bytes(self) -> int:
        """Resident memory now (``VmRSS`` of /proc/<pid>/status)."""
        return _status_kb(self.pid, "VmRSS") * 1024


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise LookupError(f"{key} not in /proc/{pid}/status")


@dataclass
class Processes:
    """Owns every child of a run; :meth:`close` kills whatever is still running (idempotent)."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
            preexec_fn=_die_with_parent(),  # type: ignore[arg-type]
        )
        child = Child(name, argv, log_path, proc, log)
        self.children.append(child)
        return child

    def close(self, children: Iterable[Child] | None = None) -> None:
        for child in list(self.children if children is None else children):
            child.kill()
            child.log.close()
            if child in self.children:
                self.children.remove(child)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
            [
                PYTHON, "-m", "sagacli", "manager",
                "-b", self.bootstrap,
                "--topic-prefix", self.prefix,
                "--group-id", f"{self.prefix}-managers",
                "--definitions", str(self.definitions),
                "--partitions", str(self.partitions),
                "--session-timeout-ms", str(self.session_timeout_ms),
                "--log-level", self.manager_log_level,
                *self.manager_args,
            ],
            env=self.env,
        )
        self.managers.append(child)
        return child

    def start_participant(self, name: str = "noop") -> Child:
        n = len(self.workers) + 1
        child = self.procs.spawn(
            f"{self.prefix}-participant-{n}",
            [
                PYTHON, "-m", "sagacli", "participant", "run", name,
                "-b", self.bootstrap,
                "--topic-prefix", self.prefix,
                "--db-dir", str(self.procs.log_dir / f"{self.prefix}-db"),
                "--session-timeout-ms", str(self.session_timeout_ms),
                "--log-level", "WARNING",
                *self.participant_args,
            ],
            env=self.env,
        )
        self.workers.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.managers + self.workers:
            if not child.alive() and child.proc.returncode != -signal.SIGKILL:
                raise ChildDied(f"{child.name} exited with code {child.proc.returncode}; its log:\n{child.tail()}")

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
