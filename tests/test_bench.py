"""``saga bench`` works: a reduced ``--quick`` run writes the JSON, the Markdown and both plots, with
every figure present. Timings are deliberately not asserted (CI machines are shared and noisy);
the benchmark itself compares them with the targets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from participants.examples import EXAMPLE_DEFINITIONS_DIR
from sagacli.bench import report
from sagacli.bench.common import find_broker_process, percentile, summary
from sagacli.bench.config import FIGURE_TARGETS
from sagacli.bench.report import lookup
from sagacli.bench.runner import parse_also
from sagacli.bench.wire import StartEncoder, Template, check_peek, saga_history
from sagalog.codec import Codec
from sagalog.definition import DefinitionSet
from sagalog.peek import LogPeek
from sagalog.records import SagaLogRecord, StartSaga

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: Figures that must be in bench.json after a run with nothing skipped.
REQUIRED = (
    "ceiling.produce_msgs_per_s",
    "ceiling.consume_msgs_per_s",
    "throughput.best_sagas_per_s",
    "replay.records_per_s",
    "replay.assignment_to_first_command_ms",
    "recovery.claim_after_kill_ms",
    "recovery.progress_after_kill_ms",
    "memory.bytes_per_live_saga",
    "query.status_p50_ms",
    "query.status_p99_ms",
    "observability.modes.off.cpu_us_per_saga.total",
    "observability.modes.metrics.cpu_us_per_saga.total",
    "observability.modes.metrics+tracing.cpu_us_per_saga.total",
    "idle.total_cores",
    "overload.completion_share",
    "figures.throughput_sagas_per_s",
    "figures.p50_ms_at_100",
    "figures.cpu_us_per_saga_at_100",
    "figures.cpu_us_per_saga_at_saturation",
    "figures.replay_records_per_s",
    "figures.memory_bytes_per_live_saga",
    "figures.takeover_after_kill_ms",
    "figures.idle_cpu_cores",
    "figures.overload_completion_share",
    "figures.overload_step_retries",
    "figures.overload_admitted_p99_ms",
    "environment.cpu_count",
    "environment.python",
    "environment.confluent_kafka",
    "environment.librdkafka",
    "environment.fastavro",
    "environment.broker",
    "bench.date",
    "bench.command",
)


# --- the bench's own wire shortcuts must agree with the codec (no broker needed) ---------------


def test_hand_written_wire_matches_the_codec() -> None:
    codec = Codec()
    encoder = StartEncoder(codec, "noop-3")  # checks itself against the codec on construction
    decoded = codec.decode(encoder.encode("abc-00000042", 1_700_000_000_000))
    assert decoded == StartSaga(saga_id="abc-00000042", saga_type="noop-3", payload="{}", requested_ms=1_700_000_000_000)

    definition = DefinitionSet.load([EXAMPLE_DEFINITIONS_DIR / "bench.yaml"]).get("noop-3")
    assert definition is not None
    history = saga_history(definition, "#" * 12, now_ms=1_700_000_000_000, epoch=3, reply_topic="x.inbox", reply_partition=2)
    assert [[type(e).__name__ for e in r.events] for r in history] == [
        ["SagaBegun", "StepBegun"], ["StepEnded", "StepBegun"], ["StepEnded", "StepBegun"], ["StepEnded", "SagaEnded"],
    ]
    peek = LogPeek(codec)
    for record in history:
        check_peek(peek, codec, record)
    rendered = codec.decode(Template(codec.encode(history[-1]), "#" * 12).render(b"q00000000007"))
    assert isinstance(rendered, SagaLogRecord)
    assert rendered.saga_id == "q00000000007"
    assert rendered.snapshot == history[-1].snapshot


def test_percentiles_are_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert summary([]) == {"count": 0}
    assert summary([3.0, 1.0, 2.0])["p50_ms"] == 2.0


# --- a reduced quick run, end to end ---------------------------------------------------------


@pytest.mark.slow
def test_quick_bench_writes_every_file_and_figure(bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [
            sys.executable, "-m", "sagacli", "bench", "--quick", "--scale", "0.3", "--no-progress",
            "-b", bootstrap, "--out", str(out),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"saga bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    results = json.loads((out / "bench.json").read_text())
    assert "errors" not in results, results.get("tracebacks")
    for key in REQUIRED:
        assert lookup(results, key) is not None, f"{key} missing from bench.json"
    assert [run["replicas"] for run in results["throughput"]["runs"]] == [1, 2]
    for run in results["throughput"]["runs"]:
        assert run["steps"] and run["probe"]["sagas_per_s"] > 0 and run["cpu_us_per_saga"]
    levels = results["latency"]["levels"]
    assert [lv["offered_per_s"] for lv in levels] == [100, 500, 1000]
    assert "p99_ms" in levels[0], "the lowest load always runs"
    for level in levels:
        assert level.get("skipped") or all(k in level for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "sustained"))
    assert results["recovery"]["lost"] == 0

    _check_figures(results["figures"], broker_measured=results["figures"]["broker_cpu_measured"])
    if results["figures"]["p99_ms_at_500"] is None:
        assert results["latency"]["at_500"].get("skipped"), "p99 at 500/s is missing only when 500/s did not run"
    assert [row["key"] for row in results["figure_targets"]] == [t.key for t in FIGURE_TARGETS]
    assert all(row["met"] in (True, False, None) for row in results["figure_targets"])
    (name,) = results["brokers"]  # no --also: one broker, its figures also at the top level
    assert name == "cluster" and results["brokers"][name]["figures"] == results["figures"]
    assert "comparison" not in results

    targets = results["targets"]
    assert len(targets) == 6
    for target in targets:
        assert target["met"] in (True, False), target
        skipped_500 = target["key"].startswith("latency.") and (results["latency"].get("at_500") or {}).get("skipped")
        assert target["value"] is not None or skipped_500, target

    markdown = (out / "bench.md").read_text()
    for target in targets:
        assert target["label"] in markdown
    assert "## Figures (issue #10)" in markdown
    for figure in FIGURE_TARGETS:
        assert figure.label in markdown and figure.text in markdown
    assert "met" in markdown and results["bench"]["command"] in markdown

    for name in ("latency.png", "throughput.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, f"{name} is not a real plot"

    # every manager and participant the bench started is gone (their command lines name the run's topic prefix)
    leftovers = subprocess.run(["pgrep", "-f", f"bench{results['bench']['run_id']}-"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left running: {leftovers.stdout}"


def _check_figures(figures: dict, *, broker_measured: bool) -> None:
    """The figures of issue #10 that a run measured are there and sane."""
    for target in FIGURE_TARGETS:
        assert target.key in figures, target.key  # None only when its part (or load level) did not run
        assert figures[target.key] is None or figures[target.key] >= 0, (target.key, figures[target.key])
    kinds = ("broker", "managers", "participants", "load_generator")
    for key in ("cpu_us_per_saga_at_100_by_kind", "cpu_us_per_saga_at_saturation_by_kind", "overload_cpu_us_per_saga_by_kind"):
        if figures.get(key.removesuffix("_by_kind")) is None:
            continue
        by_kind = figures[key]
        assert set(by_kind) == set(kinds), by_kind
        for kind in kinds:
            if kind == "broker" and not broker_measured:
                assert by_kind[kind] is None
            else:
                assert by_kind[kind] is not None and by_kind[kind] >= 0, (key, kind, by_kind)
    if figures.get("idle_cpu_cores") is not None:
        idle = figures["idle_cpu_cores_by_kind"]
        assert set(idle) == {"broker", "managers", "participants"}
        assert idle["managers"] >= 0 and idle["participants"] >= 0
        assert (idle["broker"] is not None) == broker_measured
        assert figures["idle_cpu_cores"] == pytest.approx(sum(v for v in idle.values() if v is not None), abs=0.002)


@pytest.mark.slow
def test_quick_bench_also_measures_a_second_broker_side_by_side(bootstrap: str, tmp_path: Path) -> None:
    """``--also``: the embedded broker, then the suite's broker (a real Kafka with --kafka=existing),
    in one run; two parts only, to stay fast."""
    out = tmp_path / "bench"
    keep = ("latency", "idle")
    skip = [arg for part in ("ceiling", "throughput", "overload", "replay", "recovery", "memory", "query", "observability")
            if part not in keep for arg in ("--skip", part)]  # fmt: skip
    done = subprocess.run(
        [
            sys.executable, "-m", "sagacli", "bench", "--quick", "--scale", "0.3", "--no-progress", *skip,
            "--also", f"other={bootstrap}", "--out", str(out),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"saga bench failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    results = json.loads((out / "bench.json").read_text())
    assert "errors" not in results, results.get("tracebacks")
    assert list(results["brokers"]) == ["embedded", "other"]
    embedded, other = results["brokers"]["embedded"], results["brokers"]["other"]
    assert "errors" not in other, other.get("tracebacks")
    assert embedded["embedded"] and not other["embedded"] and other["bootstrap"] == bootstrap
    assert embedded["figures"] == results["figures"] and results["latency"]["levels"]  # the first broker stays at the top level
    assert other["latency"]["levels"] and other["idle"]["total_cores"] >= 0
    assert embedded["broker_pid"] is not None and results["figures"]["broker_cpu_measured"]
    local = find_broker_process(bootstrap)
    assert other["broker_pid"] == local.pid  # a broker on this machine is found by its listening socket
    for section in (embedded, other):
        _check_figures(section["figures"], broker_measured=section["broker_pid"] is not None)
        assert section["figures"]["p50_ms_at_100"] is not None and section["figures"]["idle_cpu_cores"] is not None
    rows = {row["key"]: row for row in results["comparison"]["rows"]}
    assert results["comparison"]["brokers"] == ["embedded", "other"]
    assert set(rows["idle_cpu_cores"]["values"]) == {"embedded", "other"}
    markdown = (out / "bench.md").read_text()
    assert "## Broker `embedded`" in markdown and "## Broker `other`" in markdown
    assert (out / "latency.png").exists() and (out / "latency-other.png").exists()
    leftovers = subprocess.run(["pgrep", "-f", f"bench{results['bench']['run_id']}-"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left running: {leftovers.stdout}"


# --- the report, from fake results (no broker) -----------------------------------------------


def _fake_section(name: str, speed: float, *, embedded: bool, broker_pid: int | None) -> dict:
    """A broker's section as runner._measure returns it, with every part the figures read."""

    def cpu(total: float) -> dict:
        kinds = {"managers": 0.4 * total, "participants": 0.1 * total, "bench": 0.1 * total}
        if broker_pid is not None:
            kinds["broker"] = 0.4 * total
        return {**{k: round(v, 1) for k, v in kinds.items()}, "total": round(sum(kinds.values()), 1)}

    def level(rate: int, p50: float, sustained: bool) -> dict:
        return {
            "offered_per_s": rate, "seconds": 3.0, "sent": rate * 3, "generator_rate": rate, "generator_max_lag_ms": 1.0,
            "completed": rate * 3, "completed_share": 1.0, "achieved_per_s": rate if sustained else rate / 2,
            "sustained": sustained, "cpu_us_per_saga": cpu(10_000 / speed),
            "count": rate * 3, "p50_ms": p50, "p90_ms": p50 * 1.5, "p99_ms": p50 * 2, "max_ms": p50 * 3, "mean_ms": p50,
        }  # fmt: skip

    run = {
        "replicas": 1, "probe": {"sagas_per_s": 600 * speed}, "offered_per_s": 500 * speed, "sagas_per_s": 520.0 * speed,
        "saturated": True, "latency": {"p50_ms": 300.0, "p99_ms": 900.0}, "cpu_us_per_saga": cpu(3000 / speed),
        "transactions_per_saga": 0.05, "steps": [{"offered_per_s": 500 * speed, "sagas_per_s": 520.0 * speed, "sustained": False}],
    }  # fmt: skip
    at100, at500 = level(100, 200 / speed, True), level(500, 900 / speed, speed > 1)
    section = {
        "name": name, "embedded": embedded, "bootstrap": f"{name}:9092", "broker": f"{name} broker", "broker_short": name,
        "broker_pid": broker_pid, "broker_cpu": "measured" if broker_pid else "n/a: not on this machine",
        "part_seconds": {"throughput": 30.0},
        "throughput": {"saga_type": "noop-3", "steps": 3, "messages_per_saga": 15, "runs": [run], "best_sagas_per_s": run["sagas_per_s"]},
        "latency": {"levels": [at100, at500], "at_100": at100, "at_500": at500},
        "overload": {
            "capacity_per_s": run["sagas_per_s"], "capacity_from": "throughput part, 1 manager", "factor": 2.0,
            "offered_per_s": 2 * run["sagas_per_s"], "seconds": 6.0, "sent": 6000, "completed_per_s": 0.5 * run["sagas_per_s"],
            "completion_share": 0.5, "completed": 6000, "drained": True, "step_retries": 3, "aborted": 0, "step_timeout_s": 5.0,
            "admitted": {"p50_ms": 100.0, "p99_ms": 400.0}, "latency": {"p50_ms": 2000.0, "p99_ms": 5000.0},
            "cpu_us_per_saga": cpu(3000 / speed),
        },
        "replay": {
            "records": 10_000, "sagas": 1300, "unfinished_sagas": 130, "record_bytes_mean": 900, "records_per_s": int(40_000 * speed),
            "replay_s": 0.25, "assignment_to_first_command_ms": 600.0, "resumed_sagas": 130, "resumed_commands_seen": 130,
            "records_replayed": 10_000,
        },
        "recovery": {
            "offered_per_s": 150, "killed_partitions": [0, 1], "session_timeout_ms": 3000, "target_ms": 4000,
            "claim_after_kill_ms": 3500.0, "progress_after_kill_ms": 3900.0 / speed, "lost": 0, "sagas_started": 3000,
        },
        "memory": {"live_sagas": 5000, "warmup_sagas": 300, "rss_before_bytes": 60 * 2**20, "rss_after_bytes": 75 * 2**20,
                   "bytes_per_live_saga": 3100},
        "idle": {
            "seconds": 5.0, "managers": 1, "participant_processes": 1, "broker_measured": broker_pid is not None,
            "cores": {"managers": 0.01, "participants": 0.005, **({"broker": 0.15} if broker_pid else {})},
            "total_cores": 0.165 if broker_pid else 0.015,
        },
    }  # fmt: skip
    return section


def _fake_results() -> dict:
    return {
        "bench": {"date": "2026-12-01T00:00:00+00:00", "command": "saga bench --quick --also kafka=k:9092", "quick": True, "config": {}},
        "environment": {"broker": "embedded Tansu", "cpu_count": 2},
    }


def test_figures_have_a_key_for_every_row_of_the_issue_table() -> None:
    results = report.combine(_fake_results(), [_fake_section("embedded", 1.0, embedded=True, broker_pid=123)])
    figures = results["figures"]
    for target in FIGURE_TARGETS:
        assert target.key in figures and figures[target.key] is not None, target.key
    assert figures["throughput_sagas_per_s"] == results["throughput"]["best_sagas_per_s"] == 520.0
    assert figures["cpu_us_per_saga_at_100_by_kind"] == {
        "broker": 4000.0, "managers": 4000.0, "participants": 1000.0, "load_generator": 1000.0,
    }  # fmt: skip
    assert figures["idle_cpu_cores_by_kind"] == {"broker": 0.15, "managers": 0.01, "participants": 0.005}
    checks = {row["key"]: row for row in results["figure_targets"]}
    assert checks["p50_ms_at_100"]["bound"] == 40  # the embedded broker's target
    assert checks["takeover_after_kill_ms"]["met"] is True and checks["takeover_after_kill_ms"]["bound"] == 4000
    assert checks["p99_ms_at_500"]["met"] is False and "not sustained" in checks["p99_ms_at_500"]["note"]
    assert checks["overload_completion_share"]["met"] is False and "3 step retries" in checks["overload_completion_share"]["note"]
    assert checks["idle_cpu_cores"]["met"] is False
    assert "comparison" not in results and list(results["brokers"]) == ["embedded"]
    markdown = report.markdown(results)
    assert "## Figures (issue #10)" in markdown and "| Figure | Target | Measured | Met? | Note |" in markdown
    assert "## Broker `" not in markdown and "## Idle deployment (no traffic)" in markdown and "## Overload (2x capacity" in markdown


def test_side_by_side_report_of_two_brokers() -> None:
    first = _fake_section("embedded", 1.0, embedded=True, broker_pid=123)
    second = _fake_section("kafka", 2.0, embedded=False, broker_pid=None)
    results = report.combine(_fake_results(), [first, second])
    # the first broker stays where a run without --also has it
    assert results["throughput"]["best_sagas_per_s"] == 520.0
    assert results["brokers"]["embedded"]["results"] == "top level" and "throughput" not in results["brokers"]["embedded"]
    kafka = results["brokers"]["kafka"]
    assert kafka["throughput"]["best_sagas_per_s"] == 1040.0 and kafka["figures"]["throughput_sagas_per_s"] == 1040.0
    assert len(kafka["targets"]) == len(results["targets"])
    # no pid for the second broker: its broker CPU is n/a, and the targets that need it are not judged
    assert kafka["figures"]["broker_cpu_measured"] is False
    assert kafka["figures"]["cpu_us_per_saga_at_100_by_kind"]["broker"] is None
    assert kafka["figures"]["idle_cpu_cores_by_kind"]["broker"] is None
    kafka_checks = {row["key"]: row for row in kafka["figure_targets"]}
    assert kafka_checks["idle_cpu_cores"]["met"] is None and "n/a" in kafka_checks["idle_cpu_cores"]["note"]
    assert kafka_checks["p50_ms_at_100"]["bound"] == 25  # a real Kafka's target
    comparison = results["comparison"]
    assert comparison["brokers"] == ["embedded", "kafka"]
    rows = {row["key"]: row for row in comparison["rows"]}
    assert [row["key"] for row in comparison["rows"][: len(FIGURE_TARGETS)]] == [t.key for t in FIGURE_TARGETS]
    assert rows["throughput_sagas_per_s"]["values"] == {"embedded": 520.0, "kafka": 1040.0}
    assert rows["p99_ms_at_500"]["met"] == {"embedded": False, "kafka": False}
    assert rows["cpu_us_per_saga_at_100_by_kind.broker"]["values"] == {"embedded": 4000.0, "kafka": None}

    markdown = report.markdown(results)
    assert "| Figure | Target | embedded (embedded) | kafka (kafka) |" in markdown
    throughput_row = next(line for line in markdown.splitlines() if line.startswith("| 3-step no-op sagas/s"))
    assert "520 sagas/s **not met**" in throughput_row and "1,040 sagas/s **not met**" in throughput_row
    idle_row = next(line for line in markdown.splitlines() if line.startswith("| Idle deployment CPU"))
    assert "0.165 cores **not met**" in idle_row and "0.015 cores not judged" in idle_row
    assert markdown.index("## Broker `embedded`") < markdown.index("## Broker `kafka`")
    assert markdown.count("### Targets (MISSION.md)") == 2 and markdown.count("### Overload") == 2
    assert "n/a: not on this machine" in markdown
    json.dumps(results)  # bench.json can be written


def test_also_takes_an_optional_name() -> None:
    assert parse_also("127.0.0.1:29392") == ("kafka", "127.0.0.1:29392")
    assert parse_also("apache=127.0.0.1:29392,127.0.0.1:29393") == ("apache", "127.0.0.1:29392,127.0.0.1:29393")
    with pytest.raises(ValueError):
        parse_also("a b=host:1")
