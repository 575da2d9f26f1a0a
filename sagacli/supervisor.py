"""``saga manager --replicas N``: run N manager processes and watch them.

Each replica is a separate OS process (the point is to be able to ``kill -9`` one). A replica
that exits is reported with its exit status; with ``restart=True`` it is started again after a
short backoff. SIGTERM/SIGINT are forwarded to every replica.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

log = logging.getLogger("saga.supervisor")


class Supervisor:
    def __init__(self, replica_args: Sequence[str], replicas: int, *, restart: bool = False) -> None:
        self.replica_args = list(replica_args)
        self.replicas = replicas
        self.restart = restart
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.running = True

    def _spawn(self, index: int) -> None:
        cmd = [sys.executable, "-m", "sagacli", "manager", *_metrics_port_of_replica(self.replica_args, index)]
        self.procs[index] = subprocess.Popen(cmd)
        log.info("replica %d started (pid %d)", index, self.procs[index].pid)

    def stop(self, *_: object) -> None:
        self.running = False

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for i in range(self.replicas):
            self._spawn(i)
        failures = 0
        restart_at: dict[int, float] = {}
        while self.running:
            for i, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None or i in restart_at:
                    continue
                failures += 1
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                log.error("replica %d (pid %d) stopped: %s%s", i, proc.pid, how, "; restarting" if self.restart else "")
                if self.restart:
                    restart_at[i] = time.monotonic() + 1.0
            for i, at in list(restart_at.items()):
                if time.monotonic() >= at:
                    del restart_at[i]
                    self._spawn(i)
            if not self.restart and all(p.poll() is not None for p in self.procs.values()):
                break
            time.sleep(0.2)  # a supervisor's watch interval, not synchronisation
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
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
