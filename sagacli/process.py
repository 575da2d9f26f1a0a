"""The one wrapper for the child processes the application starts (managers, participants, the
web console, profilers): the demo, ``saga chaos``, the bench, ``saga manager --replicas N`` and
the tests all start theirs through :class:`Child`.

By default a child runs in its own session, so a Ctrl-C in the terminal reaches only the parent,
which then stops its children in the order it chooses (the demo and the bench rely on that). On
Linux it also dies with its parent (PR_SET_PDEATHSIG, the embedded broker's hook): a parent that
is SIGKILLed leaves no process behind to load the machine or hold a port. Its output (stdout and
stderr) goes to a log file, appended to across restarts, so offsets taken before a restart stay
valid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self, cast

from sagalog.broker import die_with_parent_hook


def sagacli_command(*args: str) -> list[str]:
    """``python -m sagacli ARGS`` with this interpreter: how the application starts its own CLI
    (not the ``saga`` script, which need not be on the PATH of a checkout)."""
    return [sys.executable, "-m", "sagacli", *args]


@dataclass(eq=False)  # identity: a process is itself, not its fields (children are dict keys)
class Child:
    """One child process: ``argv`` started by :meth:`start` (again after a kill or a stop).

    ``log_path`` None: the child writes to the parent's stdout and stderr.
    """

    name: str
    argv: list[str]
    log_path: Path | None
    #: Added to the parent's environment.
    env: Mapping[str, str] = field(default_factory=dict)
    own_session: bool = True
    die_with_parent: bool = True
    #: How long :meth:`stop` waits after SIGTERM before it SIGKILLs.
    stop_grace_s: float = 10.0
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    #: Set by :meth:`kill`: an exit we caused, not one to report.
    killed: bool = field(default=False, init=False)
    #: Set by :meth:`freeze`, cleared by :meth:`thaw`, :meth:`kill` and :meth:`stop`.
    frozen: bool = field(default=False, init=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    def start(self) -> Self:
        self._close_log()  # the handle of a run that ended on its own
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed when the child is stopped or killed
        self.killed = self.frozen = False
        # PR_SET_PDEATHSIG follows the thread that forks: the hook is None off the main thread.
        preexec = cast(Callable[[], None] | None, die_with_parent_hook() if self.die_with_parent else None)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log is not None else None,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},  # its log is current when we read it
            start_new_session=self.own_session,
            preexec_fn=preexec,  # noqa: PLW1509 - only sets the parent-death signal
        )
        return self

    def _started(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def instance_id(self) -> str:
        """What a manager started this way calls itself (ManagerSettings.instance_id)."""
        return f"{socket.gethostname()}-{self.pid}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (negative: the signal that ended it), else None."""
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: signal.Signals) -> None:
        self._started().send_signal(sig)  # a no-op once it has exited and been reaped

    def wait(self, timeout_s: float | None = None) -> int:
        """Its exit status once it exits; ``subprocess.TimeoutExpired`` after ``timeout_s``."""
        return self._started().wait(timeout_s)

    def freeze(self) -> None:
        """SIGSTOP: alive but silent (no heartbeat, no write), like a long GC pause or a VM stall."""
        if self.alive:
            self.signal(signal.SIGSTOP)
            self.frozen = True

    def thaw(self) -> None:
        """SIGCONT: it carries on where it stopped, unaware of the time that passed."""
        if self.frozen and self.alive:
            self.signal(signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        """SIGKILL (it ends a stopped process too): no goodbye, no offset commit, no leave-group."""
        if self.alive:
            self.signal(signal.SIGKILL)
            self._reap()
        self.killed = True
        self.frozen = False
        self._close_log()

    def stop(self) -> int | None:
        """SIGTERM, SIGKILL if it has not exited ``stop_grace_s`` later; its exit status."""
        self._ask_to_stop()
        self._wait_or_kill()
        return self.returncode

    def _ask_to_stop(self) -> None:
        if self.alive:
            self.signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
            self.signal(signal.SIGTERM)
        self.frozen = False

    def _wait_or_kill(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(self.stop_grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self._reap()
        self._close_log()

    def _reap(self) -> None:
        # A SIGKILLed process exits at once unless stuck in the kernel; then we give up on it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._started().wait(10)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_size(self) -> int:
        """Bytes of output so far: an offset for :meth:`output`."""
        try:
            return self.log_path.stat().st_size if self.log_path is not None else 0
        except OSError:
            return 0

    def output(self, since: int = 0) -> str:
        """Its output from byte ``since`` on, across restarts ("" without a log file)."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.output().strip().splitlines()[-lines:])

    def rss_bytes(self) -> int:
        """Resident memory now (``VmRSS`` of /proc/<pid>/status, Linux)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise LookupError(f"VmRSS not in /proc/{self.pid}/status")


def stop_all(children: Iterable[Child]) -> None:
    """:meth:`Child.stop` for several at once: all are asked first, so they shut down in parallel.

    Each is asked once: a second SIGTERM kills a participant process at once (its handler
    restores the default on the first)."""
    children = list(children)
    for child in children:
        child._ask_to_stop()
    for child in children:
        child._wait_or_kill()


@dataclass
class Processes:
    """Owns every child of a run, each logging to ``log_dir/NAME.log``; :meth:`close` kills
    whatever is still running (idempotent): what a benchmark leaves behind is thrown away."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], *, env: Mapping[str, str] | None = None) -> Child:
        child = Child(name, argv, self.log_dir / f"{name}.log", env=dict(env or {})).start()
        self.children.append(child)
        return child

    def close(self, children: Iterable[Child] | None = None) -> None:
        for child in list(self.children if children is None else children):
            child.kill()
            if child in self.children:
                self.children.remove(child)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
