"""Saga definitions: validation with errors that point at file, line and field; DAG rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagalog.definition import DefinitionSet, SagaDefinition, definition_from_json, load_file
from sagalog.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "defs.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_error_names_file_line_and_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """name: trip
steps:
  - name: flight
    participant: flights
  - name: hotel
    participant: hotels
    timeout_s: -1
""",
    )
    with pytest.raises(ConfigError) as err:
        load_file(path)
    message = str(err.value)
    assert f"{path}:7:" in message
    assert "steps.1.timeout_s" in message and "greater than 0" in message


def test_list_of_sagas_error_points_into_the_right_item(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """sagas:
  - name: ok
    steps: [{name: a, participant: p}]
  - name: bad
    steps: [{name: a, participant: p, surprise: 1}]
""",
    )
    with pytest.raises(ConfigError, match=r":5: steps\.0\.surprise: Extra inputs are not permitted"):
        load_file(path)


@pytest.mark.parametrize(
    ("steps", "problem"),
    [
        ([{"name": "a", "participant": "p"}, {"name": "a", "participant": "p"}], "unique"),
        ([{"name": "a", "participant": "p", "depends_on": ["zz"]}], "unknown step 'zz'"),
        ([{"name": "a", "participant": "p", "depends_on": ["b"]}, {"name": "b", "participant": "p", "depends_on": ["a"]}], "cycle"),
        ([{"name": "a", "participant": "p", "depends_on": ["a"]}], "itself"),
        ([], "at least 1"),
    ],
)
def test_invalid_graphs_are_refused(steps: list, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        SagaDefinition(name="x", steps=steps)


def test_sequential_by_default_and_dag_dependents() -> None:
    d = SagaDefinition(
        name="trip",
        steps=[
            {"name": "flight", "participant": "f"},
            {"name": "hotel", "participant": "h", "depends_on": ["flight"]},
            {"name": "car", "participant": "c", "depends_on": ["flight"]},
            {"name": "mail", "participant": "m"},
        ],
    )
    assert d.dependencies("flight") == ()
    assert d.dependencies("mail") == ("car",)  # no depends_on: the previous step
    assert set(d.dependents["flight"]) == {"hotel", "car"}


def test_pinned_json_round_trips_to_the_same_definition() -> None:
    d = SagaDefinition(name="x", version=3, steps=[{"name": "a", "participant": "p", "retry": {"attempts": 5}}])
    assert definition_from_json(d.canonical_json) == d


def test_payload_schema_is_checked_and_must_itself_be_valid() -> None:
    d = SagaDefinition(name="x", steps=[{"name": "a", "participant": "p"}], payload_schema={"type": "object", "required": ["amount"]})
    d.validate_payload({"amount": 1})
    with pytest.raises(ConfigError, match="'amount' is a required property"):
        d.validate_payload({})
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        SagaDefinition(name="x", steps=[{"name": "a", "participant": "p"}], payload_schema={"type": 12})


def test_retry_delays_grow_are_capped_and_deterministic() -> None:
    policy = SagaDefinition(name="x", steps=[{"name": "a", "participant": "p", "retry": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "jitter": 0.2}}]).steps[0].retry
    delays = [policy.delay_ms(a, "s/a") for a in range(2, 8)]
    assert delays == [policy.delay_ms(a, "s/a") for a in range(2, 8)]
    assert 80 <= delays[0] <= 100 and all(d <= 500 for d in delays) and delays[-1] >= 400


def test_definition_set_keeps_newest_version_and_refuses_conflicting_duplicates(tmp_path: Path) -> None:
    write(tmp_path, "name: t\nversion: 1\nsteps: [{name: a, participant: p}]\n", "v1.yaml")
    write(tmp_path, "name: t\nversion: 2\nsteps: [{name: a, participant: q}]\n", "v2.yaml")
    defs = DefinitionSet.load([tmp_path])
    assert defs.get("t").version == 2 and defs.participants() == ["q"]
    write(tmp_path, "name: t\nversion: 2\nsteps: [{name: b, participant: q}]\n", "v2b.yaml")
    with pytest.raises(ConfigError, match="bump 'version'"):
        DefinitionSet.load([tmp_path])
    with pytest.raises(ConfigError, match="does not exist"):
        DefinitionSet.load([tmp_path / "nope"])
