"""``saga bench --profile``: sample the manager and a participant with py-spy during a saturation run.

py-spy (``pip install py-spy``) attaches to the running processes without stopping them
(``--nonblocking``) and writes collapsed stacks (``profile-<name>.txt``, which speedscope.app or
flamegraph.pl read). The summary kept in the results:

* both are sampled on CPU (without ``--idle``): shares are of time spent computing, which is what
  limits throughput. (The manager's loop no longer blocks on its transactions: they commit on
  worker threads while it goes on deciding, so a wall-clock view would mostly show threads
  waiting on the broker.)

Each leaf frame is classified by its source line: a call into the Kafka client (``consume``,
``commit_transaction``, ...) or Python work.
"""

from __future__ import annotations

import linecache
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from sagacli.bench.common import Context
from sagacli.process import Child

_KAFKA_CALL = re.compile(
    r"\.(consume|poll|commit_transaction|send_offsets_to_transaction|begin_transaction|abort_transaction|produce|"
    r"flush|init_transactions|position|get_watermark_offsets|committed|commit|list_topics)\("
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Recorder:
    """Runs one py-spy per target for ``seconds`` while the ``with`` block produces load."""

    def __init__(self, ctx: Context, targets: dict[str, Child], seconds: float) -> None:
        self.ctx = ctx
        self.targets = targets
        self.seconds = seconds
        self.results: dict[str, Any] = {}
        self._spies: dict[str, Child] = {}

    def __enter__(self) -> Recorder:
        binary = py_spy()
        if binary is None:
            self.results["error"] = "py-spy is not installed (pip install py-spy)"
            return self
        for name, target in self.targets.items():
            out = self.ctx.out / f"profile-{name}.txt"
            argv = [
                binary, "record", "--pid", str(target.pid), "--duration", str(max(1, int(self.seconds))),
                "--rate", "250", "--nonblocking", "--format", "raw", "--output", str(out),
            ]
            self._spies[name] = self.ctx.procs.spawn(f"py-spy-{name}", argv)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, spy in self._spies.items():
            try:
                spy.wait(self.seconds + 30)
            except Exception:  # noqa: BLE001 - a profiler that hangs must not hang the bench
                spy.kill()
            self.ctx.procs.close([spy])
            path = self.ctx.out / f"profile-{name}.txt"
            if path.exists() and path.stat().st_size > 0:
                self.results[name] = summarize(path)
            else:
                self.results[name] = {"error": f"py-spy wrote nothing; its output:\n{spy.tail()}"}


def _source(file: str, line: int) -> str:
    for base in [Path.cwd(), *map(Path, sys.path)]:
        candidate = base / file
        if candidate.is_file():
            return linecache.getline(str(candidate), line).strip()
    return ""


def summarize(path: Path, *, top: int = 15) -> dict[str, Any]:
    """Top frames by self and inclusive samples, and the share spent in Kafka client calls."""
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_samples[frames[-1]] += n
        functions = set()
        for frame in frames:
            m = _FRAME.match(frame)
            functions.add(f"{m['func']} ({m['file']})" if m else frame)
        for function in functions:
            inclusive[function] += n
    if not total:
        return {"samples": 0}
    categories: Counter[str] = Counter()
    top_self = []
    for frame, n in self_samples.most_common():
        m = _FRAME.match(frame)
        code = _source(m["file"], int(m["line"])) if m else ""
        call = _KAFKA_CALL.search(code)
        categories[f"kafka client: {call.group(1)}" if call else "python"] += n
        if len(top_self) < top:
            top_self.append({"frame": frame, "code": code, "share": round(n / total, 4)})
    skip = ("<module>", "_run_code", "_run_module_as_main", "click/", "sagacli/cli/", "threading.py", "Manager.run ")
    top_inclusive = [
        {"function": f, "share": round(n / total, 4)}
        for f, n in inclusive.most_common()
        if not any(s in f for s in skip)
    ][: top + 10]
    return {
        "samples": total,
        "view": "on CPU",
        "file": path.name,
        "categories": {k: round(v / total, 4) for k, v in categories.most_common()},
        "top_self": top_self,
        "top_inclusive": top_inclusive,
    }
