"""A running manager's /metrics, scraped after N sagas, agrees with the log."""

from __future__ import annotations

import threading
import urllib.request
from collections import Counter

from harness import ScriptedParticipant, reply_to, start_sagas, wait_for, wait_terminal
from prometheus_client.parser import text_string_to_metric_families

from manager.runtime import Manager, ManagerSettings
from sagalog.definition import DefinitionSet, SagaDefinition
from sagalog.reader import scan
from sagalog.records import Action, ParticipantCommand, ParticipantReply, PartitionClaim, ReplyOutcome

DEFINITION = SagaDefinition(name="pair", steps=[{"name": "a", "participant": "pa"}, {"name": "b", "participant": "pb"}])


def refuse_b_of_failing_sagas(cmd: ParticipantCommand) -> list[ParticipantReply]:
    if cmd.step == "b" and cmd.action is Action.EXECUTE and cmd.saga_id.startswith("fail"):
        return [reply_to(cmd, ReplyOutcome.BUSINESS_FAILURE, error="no")]
    return [reply_to(cmd)]


def scrape(address: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{address[1]}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_managers_metrics_agree_with_the_log(bootstrap: str, make_topics) -> None:
    topics = make_topics(partitions=2, participants=["pa", "pb"])
    manager = Manager(
        ManagerSettings(
            bootstrap=bootstrap, definitions=DefinitionSet([DEFINITION]), topics=topics,
            group_id=f"{topics.prefix}-g", metrics_port=0,
        )  # fmt: skip
    )
    ok = [f"ok-{i}" for i in range(12)]
    failing = [f"fail-{i}" for i in range(5)]
    thread = threading.Thread(target=manager.run, daemon=True)
    thread.start()
    try:
        with ScriptedParticipant(bootstrap, topics, ["pa", "pb"], behaviour=refuse_b_of_failing_sagas):
            wait_for(lambda: manager.metrics_address is not None and len(manager.owned) == 2, 60, "the manager to serve both partitions")
            start_sagas(bootstrap, topics, "pair", [*ok, *failing])
            states = wait_terminal(bootstrap, topics, [*ok, *failing], 60)
            address = manager.metrics_address
            assert address is not None
            # The lag gauge is measured once a second: wait until it has seen the inbox read.
            def read_up() -> dict | None:
                m = scrape(address)
                lags = [m.get(("saga_inbox_lag_records", (("partition", str(p)),)), -1) for p in (0, 1)]
                return m if lags == [0, 0] else None

            metrics = wait_for(read_up, 15, "the inbox lag gauge to reach 0")
    finally:
        manager.stop()
        thread.join(30)

    outcomes = Counter(states[s].status.value for s in [*ok, *failing])
    assert outcomes == {"COMPLETED": 12, "ABORTED": 5}

    def value(name: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("saga_sagas_started_total", saga_type="pair") == 17
    assert value("saga_sagas_ended_total", saga_type="pair", outcome="completed") == 12
    assert value("saga_sagas_ended_total", saga_type="pair", outcome="aborted") == 5
    assert value("saga_duration_seconds_count", saga_type="pair", outcome="completed") == 12
    assert value("saga_step_attempts_total", saga_type="pair", step="a", action="execute") == 17
    assert value("saga_step_attempts_total", saga_type="pair", step="a", action="compensate") == 5  # a undone for each abort
    assert value("saga_step_duration_seconds_count", saga_type="pair", step="b", action="execute") == 17
    claims = [e.item for e in scan(bootstrap, topics) if isinstance(e.item, PartitionClaim)]
    for p in (0, 1):
        assert value("saga_takeovers_total", partition=str(p)) == sum(1 for c in claims if c.partition == p)
        assert value("saga_partition_epoch", partition=str(p)) == max(c.epoch for c in claims if c.partition == p)
        assert value("saga_transactions_total", partition=str(p), result="committed") > 0
        assert value("saga_inbox_lag_records", partition=str(p)) == 0
    assert not any(name == "saga_sagas_in_flight" and v for (name, _), v in metrics.items())  # all ended
    assert all("saga_id" not in dict(labels) for _, labels in metrics)  # bounded labels only


def test_the_grafana_dashboard_plots_only_metrics_a_manager_exposes() -> None:
    import json
    import re
    from pathlib import Path
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from manager.metrics import ManagerMetrics

    idle = SimpleNamespace(owned={}, inbox_lag=lambda p: None)  # a manager serving nothing yet
    metrics = ManagerMetrics(idle)  # type: ignore[arg-type]
    metrics.decided([])  # every family is declared up front; samples appear as things happen
    exposed = {f.name for f in metrics.registry.collect()}
    exposed |= {f"{n}_total" for n in exposed} | {f"{n}_{s}" for n in exposed for s in ("bucket", "count", "sum")}
    assert generate_latest(metrics.registry)  # renders
    dashboard = json.loads((Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for t in panel["targets"] for name in re.findall(r"\bsaga_[a-z_]+", t["expr"]) if name != "saga_type"}
    assert used and used <= exposed, used - exposed
