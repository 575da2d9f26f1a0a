"""``saga status`` stays fast as a fresh process: what it imports, not how long it takes.

A fresh ``saga status ID`` must answer in well under a quarter of a second, and most of that is
Python importing modules (measured on a 2-core machine: pydantic and the record models ~0.3 s,
asyncio through confluent_kafka ~50 ms, rich ~0.1 s with its rendering (the text view is printed
without it), every other command's module ~20 ms, the garbage collector ~60 ms (off for short
commands)). Timing it here would fail on a busy machine and pass a slow change on a fast one,
so these tests pin the structure instead: which modules a ``saga status`` process ends with.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Producer

from sagalog.codec import Codec
from sagalog.config import Topics
from sagalog.definition import SagaDefinition, load_file
from sagalog.fold import apply, begin
from sagalog.kafka import producer_config
from sagalog.readmodel import ReadModel, step_dependencies
from sagalog.records import SagaLogRecord, StepBegun, StepEnded, StepOutcome

#: Never on the status path when the log has nothing new for the saga's partition: the saga is
#: shown from the read model's stored JSON, its partition found without the codec.
HEAVY = ("pydantic", "pydantic_core", "fastavro", "yaml", "jsonschema", "asyncio",
         "sagalog.records", "sagalog.codec", "sagalog.fold", "sagalog.definition")  # fmt: skip
#: Only for the tables of the text output.
RICH = ("rich", "rich.console", "rich.table")
#: The one command module ``saga status`` needs (and the shared plumbing): not the others.
CLI_MODULES = {
    "sagacli",
    "sagacli.__main__",
    "sagacli.cli",
    "sagacli.cli.common",
    "sagacli.cli.query",
    "sagacli.cli.topics",
}

DEFINITION = SagaDefinition.model_validate(
    {
        "name": "fan-out",
        "steps": [
            {"name": "a", "participant": "pa"},
            {"name": "b", "participant": "pb"},
            {"name": "c", "participant": "pc", "depends_on": ["a"]},
        ],
    }
)


def _modules_after(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -m sagacli ARGS`` in a fresh interpreter; its output and the modules it ended with."""
    code = (
        "import atexit, json, runpy, sys\n"
        "atexit.register(lambda: sys.stderr.write('\\nMODULES ' + json.dumps(sorted(sys.modules)) + '\\n'))\n"
        f"sys.argv = ['saga', *{list(args)!r}]\n"
        "runpy.run_module('sagacli', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    marker = done.stderr.rindex("MODULES ")
    modules = set(json.loads(done.stderr[marker + len("MODULES ") :].splitlines()[0]))
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout, done.stderr[:marker]), modules


@pytest.fixture
def warm(bootstrap: str, make_topics, tmp_path: Path) -> list[str]:
    """A log with one saga and a read model that has read it: the CLI arguments to query it."""
    topics: Topics = make_topics(partitions=3)
    first, state = begin("fast-1", DEFINITION, '{"n": 1}', 1_700_000_000_000, 1)
    records = [(state, first)]
    for event in (
        StepBegun(step="a", attempt=1, dispatch_at_ms=1, deadline_ms=2),
        StepEnded(step="a", outcome=StepOutcome.SUCCEEDED, output='{"ok": true}'),
        StepBegun(step="b", attempt=1, dispatch_at_ms=3, deadline_ms=4),
    ):
        state = apply(state, event, state.updated_ms + 1, 1)
        records.append((state, event))
    producer = Producer(producer_config(bootstrap))
    codec = Codec()
    for s, event in records:
        record = SagaLogRecord(
            saga_id=s.saga_id,
            seq=s.seq,
            epoch=1,
            timestamp_ms=s.updated_ms,
            event=event,
            snapshot=s.snapshot(),
            writer="t",
        )
        producer.produce(topics.log, codec.encode(record), key=s.saga_id.encode())
    assert producer.flush(10) == 0
    args = ["-b", bootstrap, "--topic-prefix", topics.prefix, "--state-dir", str(tmp_path / "state")]
    with ReadModel(bootstrap, topics, state_dir=tmp_path / "state") as model:
        assert model.get("fast-1").seq == 4  # the model has read the saga's partition to its end
    return args


def test_status_json_imports_no_model_no_codec_no_asyncio_no_rich(warm: list[str]) -> None:
    done, modules = _modules_after("status", "fast-1", "--json", *warm)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["status"] == "RUNNING" and data["current_steps"] == ["b"] and data["seq"] == 4
    assert [(s["name"], s["depends_on"], s["status"]) for s in data["steps"]] == [
        ("a", [], "SUCCEEDED"),
        ("b", ["a"], "RUNNING"),
        ("c", ["a"], "PENDING"),
    ]
    assert sorted(m for m in HEAVY + RICH if m in modules) == []
    assert {m for m in modules if m.startswith("sagacli")} <= CLI_MODULES


def test_status_text_imports_no_model_no_codec_no_asyncio_no_rich(warm: list[str]) -> None:
    done, modules = _modules_after("status", "fast-1", *warm)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "saga fast-1  fan-out v1  RUNNING"  # no colour codes when not on a terminal
    assert "  current step(s): b (running, attempt 1)" in lines
    # Aligned columns under capitalised headers, one row per step and per log record.
    steps = lines[lines.index("steps") + 1 :][:4]
    assert steps[0].split() == ["STEP", "PARTICIPANT", "STATUS", "ATTEMPTS", "OUTPUT", "ERROR"]
    assert [row.split()[:3] for row in steps[1:]] == [["a", "pa", "SUCCEEDED"], ["b", "pb", "RUNNING"], ["c", "pc", "PENDING"]]
    status_at = {row.index(word) for row, word in zip(steps[1:], ("SUCCEEDED", "RUNNING", "PENDING"), strict=True)}
    assert status_at == {steps[0].index("STATUS")}
    timeline = lines[lines.index("time line (log records)") + 1 :]
    assert timeline[0].split() == ["SEQ", "TIME", "+MS", "EVENT", "DETAILS", "EPOCH"]
    assert [row.split()[0] for row in timeline[1:]] == ["1", "2", "3", "4"]
    assert sorted(m for m in HEAVY + RICH if m in modules) == []
    assert {m for m in modules if m.startswith("sagacli")} <= CLI_MODULES


def test_errors_stay_one_line_on_the_lean_path(warm: list[str], tmp_path: Path) -> None:
    done, modules = _modules_after("status", "no-such-saga", *warm)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: no saga 'no-such-saga'")
    assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(m for m in HEAVY if m in modules) == []
    down, _ = _modules_after("status", "x", "-b", "127.0.0.1:1", "--state-dir", str(tmp_path / "other"))
    assert down.returncode == 3 and "no Kafka broker answered at 127.0.0.1:1" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1


def test_the_stored_json_answers_as_the_models_do(warm: list[str], bootstrap: str) -> None:
    """What status shows from the stored JSON is what the pydantic models say."""
    prefix, state_dir = warm[warm.index("--topic-prefix") + 1], Path(warm[warm.index("--state-dir") + 1])
    with ReadModel(bootstrap, Topics(prefix=prefix), state_dir=state_dir) as model:
        view = model.view("fast-1")
        assert view.snapshot == view.state.model_dump(mode="json", exclude={"definition"})
        assert view.current == tuple(
            s.name for s in view.state.steps if s.status in ("RUNNING", "COMPENSATING")
        )
        assert view.dependencies() == {
            s.name: view.definition.dependencies(s.name) for s in view.definition.steps
        }


EXAMPLES = sorted(
    (Path(__file__).resolve().parent.parent / "participants/examples/definitions").glob("*.yaml")
)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_step_dependencies_follow_the_definitions_rule(path: Path) -> None:
    for definition in [*load_file(path), DEFINITION]:
        as_json = json.loads(definition.canonical_json)
        assert step_dependencies(as_json) == {
            s.name: definition.dependencies(s.name) for s in definition.steps
        }


def test_confluent_kafka_without_asyncio_still_finds_it_when_used() -> None:
    code = (
        "import sys\n"
        "from sagacli.cli.common import import_kafka_client\n"
        "import_kafka_client()\n"
        "import confluent_kafka._serde_builder as serde\n"
        "assert 'confluent_kafka' in sys.modules and 'asyncio' not in sys.modules\n"
        "loop_getter = serde.asyncio.get_running_loop\n"  # the first use imports the real asyncio
        "import asyncio\n"
        "assert loop_getter is asyncio.get_running_loop and sys.modules['asyncio'] is asyncio\n"
        "assert type(asyncio).__name__ == 'module'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("command", "collector_on"), [("status", False), ("history", False), ("list", False), ("start", True), ("manager", True)])
def test_only_short_lived_commands_run_without_the_garbage_collector(command: str, collector_on: bool) -> None:
    code = (
        "import gc, sys\n"
        f"sys.argv = ['saga', {command!r}, '--help']\n"
        "from sagacli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write(f'COLLECTOR {gc.isenabled()}')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.endswith(f"COLLECTOR {collector_on}"), done.stderr
