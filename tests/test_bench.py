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
from sagacli.bench.common import percentile, summary
from sagacli.bench.report import lookup
from sagacli.bench.wire import LogPeek, StartEncoder, Template, saga_history
from sagalog.codec import Codec
from sagalog.definition import DefinitionSet
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
    assert [type(r.event).__name__ for r in history] == [
        "SagaBegun", "StepBegun", "StepEnded", "StepBegun", "StepEnded", "StepBegun", "StepEnded", "SagaEnded",
    ]
    peek = LogPeek(codec)
    for record in history:
        peek.check(codec, record)
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

    targets = results["targets"]
    assert len(targets) == 6
    for target in targets:
        assert target["met"] in (True, False), target
        skipped_500 = target["key"].startswith("latency.") and (results["latency"].get("at_500") or {}).get("skipped")
        assert target["value"] is not None or skipped_500, target

    markdown = (out / "bench.md").read_text()
    for target in targets:
        assert target["label"] in markdown
    assert "met" in markdown and results["bench"]["command"] in markdown

    for name in ("latency.png", "throughput.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, f"{name} is not a real plot"

    # every manager and participant the bench started is gone (their command lines name the run's topic prefix)
    leftovers = subprocess.run(["pgrep", "-f", f"bench{results['bench']['run_id']}-"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left running: {leftovers.stdout}"
