"""What every part shares: the run context, progress reporting, statistics, CPU accounting."""

from __future__ import annotations

import math
import os
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
