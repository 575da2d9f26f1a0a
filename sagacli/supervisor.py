"""``saga manager --replicas N``: run N manager processes and watch them.

Each replica is a separate OS process (the point is to be able to ``kill -9`` one). A replica
that exits is reported with its exit status; with ``restart=True`` it is started again after a
short backoff. SIGTERM/SIGINT are forwarded to every replica.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence

from sagacli.process import Child, sagacli_command, stop_all

log = logging.getLogger("saga.supervisor")


class Supervisor:
    def __init__(self, replica_args: Sequence[str], replicas: int, *, restart: bool = False) -> None:
        self.restart = restart
        # Unlike the demo's children, replicas stay in the supervisor's terminal and session: their
        # output is its output, and a Ctrl-C reaches them as it reaches the supervisor. Nor do they
        # die with it: a supervisor that is SIGKILLed leaves its replicas running.
        self.replicas = [
            Child(
                f"replica {i}",
                sagacli_command("manager", *_metrics_port_of_replica(list(replica_args), i)),
                log_path=None,
                own_session=False,
                die_with_parent=False,
            )
            for i in range(replicas)
        ]
        self.running = True

    def _spawn(self, index: int) -> None:
        replica = self.replicas[index].start()
        log.info("replica %d started (pid %d)", index, replica.pid)

    def stop(self, *_: object) -> None:
        self.running = False

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for i in range(len(self.replicas)):
            self._spawn(i)
        failures = 0
        restart_at: dict[int, float] = {}
        while self.running:
            for i, replica in enumerate(self.replicas):
                code = replica.returncode
                if code is None or i in restart_at:
                    continue
                failures += 1
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                log.error("replica %d (pid %d) stopped: %s%s", i, replica.pid, how, "; restarting" if self.restart else "")
                if self.restart:
                    restart_at[i] = time.monotonic() + 1.0
            for i, at in list(restart_at.items()):
                if time.monotonic() >= at:
                    del restart_at[i]
                    self._spawn(i)
            if not self.restart and not any(replica.alive for replica in self.replicas):
                break
            time.sleep(0.2)  # a supervisor's watch interval, not synchronisation
        stop_all(self.replicas)  # SIGTERM to every replica, SIGKILL to those still there 10 s later
        return 1 if failures and not self.restart else 0


def _metrics_port_of_replica(args: list[str], index: int) -> list[str]:
    """Replica i serves its metrics on the given --metrics-port + i: one port each."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--metrics-port" and i + 1 < len(out) and out[i + 1].isdigit() and int(out[i + 1]):
            out[i + 1] = str(int(out[i + 1]) + index)
        elif arg.startswith("--metrics-port=") and arg.split("=", 1)[1].isdigit() and int(arg.split("=", 1)[1]):
            out[i] = f"--metrics-port={int(arg.split('=', 1)[1]) + index}"
    return out
