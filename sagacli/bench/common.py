"""What every part shares: the run context, progress reporting, statistics, CPU accounting."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagacli.bench.config import BenchConfig
from sagacli.process import Processes
from sagalog.codec import Codec


#: Messages produced per completed saga of n steps: 1 start, 2n+2 log records, n commands, n replies.
def messages_per_saga(steps: int) -> int:
    return 1 + (2 * steps + 2) + steps + steps


@dataclass
class Progress:
    """How parts report: ``status`` replaces the current line, ``note`` prints a result line."""

    status: Callable[[str], None] = lambda text: None
    note: Callable[[str], None] = lambda text: None


@dataclass
class Context:
    bootstrap: str
    config: BenchConfig
    procs: Processes
    run_id: str
    out: Path
    work: Path  # scratch space (definitions, read models, participant files), removed at the end
    broker_pid: int | None = None
    progress: Progress = field(default_factory=Progress)
    codec: Codec = field(default_factory=Codec)
    ceiling: dict[str, Any] = field(default_factory=dict)
    #: Sagas/s one manager completed in the throughput part (the overload part offers a multiple).
    capacity_per_s: float | None = None

    def prefix(self, part: str) -> str:
        return f"bench{self.run_id}-{part}"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summary(values: Sequence[float]) -> dict[str, float | int]:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "p50_ms": round(percentile(ordered, 50), 2),
        "p90_ms": round(percentile(ordered, 90), 2),
        "p99_ms": round(percentile(ordered, 99), 2),
        "max_ms": round(ordered[-1], 2),
        "mean_ms": round(sum(ordered) / len(ordered), 2),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a whole process (all its threads, librdkafka's included)."""
    if pid == os.getpid():
        return time.process_time()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by groups of processes between :meth:`start` and :meth:`stop`.

    On a shared 2-core machine wall-clock rates move with the neighbours' load; CPU time per
    saga does much less, so it is the figure to compare before and after an optimisation.
    """

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {name: pids for name, pids in groups.items() if pids}
        self._start: dict[int, float] = {}
        self.used: dict[str, float] = {}

    def _read(self) -> dict[int, float]:
        out = {}
        for pids in self.groups.values():
            for pid in pids:
                try:
                    out[pid] = cpu_seconds(pid)
                except (OSError, IndexError, ValueError):
                    pass
        return out

    def start(self) -> CpuMeter:
        self._start = self._read()
        return self

    def stop(self) -> dict[str, float]:
        end = self._read()
        self.used = {
            name: sum(end.get(pid, 0.0) - self._start.get(pid, 0.0) for pid in pids if pid in self._start)
            for name, pids in self.groups.items()
        }
        return self.used

    def per_saga_us(self, sagas: int) -> dict[str, float]:
        if sagas <= 0:
            return {}
        per = {name: round(used / sagas * 1e6, 1) for name, used in self.used.items()}
        per["total"] = round(sum(self.used.values()) / sagas * 1e6, 1)
        return per


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --- the broker's process, for its CPU ---------------------------------------------------------


@dataclass(frozen=True)
class BrokerProcess:
    """The local process that listens on a bootstrap address (None, and why, when there is none)."""

    pid: int | None
    label: str  # "Apache Kafka 4.0.0", "Tansu", "java", ... ("" when not found)
    reason: str = ""  # why pid is None


def _local_address(host: str) -> str | None:
    """The IP ``host`` resolves to, if it is an address of this machine (else None)."""
    try:
        ip = str(socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0])
    except OSError:
        return None
    if ipaddress.ip_address(ip).is_loopback:
        return ip
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((ip, 0))  # only an address of this machine can be bound
        return ip
    return None


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on ``port`` (any local address), from /proc/net/tcp{,6}."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(cols[9])
    return inodes


def _pid_of_socket(inodes: set[str]) -> int | None:
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return int(proc.name)
    return None


def _process_label(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
    text = b" ".join(argv).decode(errors="replace")
    if "kafka.Kafka" in text:
        version = re.search(r"kafka_[0-9.]+-([0-9][0-9A-Za-z.-]*?)\.jar", text)
        return "Apache Kafka" + (f" {version.group(1)}" if version else "")
    if "tansu" in comm.lower() or "tansu" in text.lower():
        return "Tansu"
    return comm


def find_broker_process(bootstrap: str) -> BrokerProcess:
    """The process serving the first address of ``bootstrap``, found by its listening socket.

    Works for any broker on this machine run by a user whose /proc entries we may read (the
    embedded one, ``../shared/kafka/kafka.sh``'s JVM, a Tansu started by hand); a broker on
    another machine or in a container has no pid here, and its CPU is not measured.
    """
    first = bootstrap.split(",")[0].strip()
    first = first.split("://", 1)[-1]
    host, _, port_text = first.rpartition(":")
    host = host.strip("[]") or "localhost"
    try:
        port = int(port_text)
    except ValueError:
        return BrokerProcess(None, "", f"cannot parse the port of {first!r}")
    if _local_address(host) is None:
        return BrokerProcess(None, "", f"{host} is not an address of this machine")
    inodes = _listening_inodes(port)
    if not inodes:
        return BrokerProcess(None, "", f"no process listens on port {port} here (a container?)")
    pid = _pid_of_socket(inodes)
    if pid is None:
        return BrokerProcess(None, "", f"the process listening on port {port} is not visible to this user")
    return BrokerProcess(pid, _process_label(pid))
