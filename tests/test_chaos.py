"""A seeded chaos run in the suite: managers killed, frozen past their session timeout and
restarted in turn, the participants killed and restarted, under load; then every saga must end
and every participant's books must hold exactly the completed sagas' effects."""

from __future__ import annotations

import os

import pytest

from sagacli.chaos import Chaos, ChaosSettings, draw_schedule

SEED = int(os.environ.get("SAGA_CHAOS_SEED", "11"))


def test_the_fault_schedule_is_a_function_of_the_seed() -> None:
    a, b, c = (draw_schedule(ChaosSettings(seed=s, duration_s=120)) for s in (5, 5, 6))
    assert a == b and a != c
    assert {f.kind for f in a} <= {"kill", "freeze", "participant", "poison"}  # broker only when asked
    frozen = [f for f in a if f.kind == "freeze"]
    assert frozen and all(f.hold_s > 6.0 for f in frozen)  # longer than the session timeout: a real zombie
    only_kills = draw_schedule(ChaosSettings(seed=5, duration_s=120, faults=("kill",)))
    assert {f.kind for f in only_kills} == {"kill"}


def test_the_checker_catches_compensations_out_of_reverse_dependency_order() -> None:
    deps = {"s": {"a": [], "b": ["a"], "c": ["b"]}}
    good = {"s": [("CompensationBegun", "c"), ("CompensationEnded", "c"), ("CompensationBegun", "b"),
                  ("CompensationEnded", "b"), ("CompensationBegun", "a"), ("CompensationEnded", "a")]}
    assert Chaos._compensation_order(good, deps) == []
    # a is undone while c (which depends on a through b) is still being undone
    bad = {"s": [("CompensationBegun", "c"), ("CompensationBegun", "a"), ("CompensationEnded", "c"), ("CompensationEnded", "a")]}
    assert Chaos._compensation_order(bad, deps) == ["s: a before c"]


@pytest.mark.slow
def test_a_seeded_chaos_run_ends_every_saga_and_balances_every_book(bootstrap: str, tmp_path) -> None:
    settings = ChaosSettings(
        seed=SEED, duration_s=45, rate=15, fault_every_s=(4.0, 7.0), bootstrap=bootstrap, work_dir=tmp_path
    )
    report = Chaos(settings, echo=lambda line: None).run()
    (tmp_path / "chaos-report.md").write_text(report.to_markdown())
    assert report.ok, report.to_markdown()
    assert report.started >= 500 and report.outcomes.get("COMPLETED", 0) > 0 and report.outcomes.get("ABORTED", 0) > 0
    assert {f.kind for f in report.schedule} >= {"kill", "freeze", "poison"}
    assert report.meddled.get("replies", 0) > 0 and report.meddled.get("commands", 0) > 0
    assert len(report.takeovers_ms) > settings.partitions  # the faults really moved partitions


def test_the_checker_catches_a_fenced_epochs_command_taking_effect_after_a_newer_one(tmp_path) -> None:
    """Read from the participants' journals with plain SQL: per saga, no row recorded later than
    another carries a lower command epoch, and no epoch is above every epoch claimed on the log."""
    import sqlite3

    from sagacli.demo import PARTICIPANTS

    chaos = Chaos(ChaosSettings(seed=1, work_dir=tmp_path), echo=lambda line: None)
    chaos.log_epochs = {"s1": 4, "s2": 4}
    (tmp_path / "db").mkdir()
    for i, name in enumerate(PARTICIPANTS):
        with sqlite3.connect(tmp_path / "db" / f"{name}.db") as db:
            db.execute("CREATE TABLE inventory_holds (saga_id TEXT, item TEXT, quantity INTEGER)")
            db.execute("CREATE TABLE inventory_items (item TEXT, capacity INTEGER, available INTEGER)")
            db.execute("CREATE TABLE saga_journal (saga_id TEXT, step TEXT, action TEXT, command_id TEXT, outcome TEXT, "
                       "output TEXT, error TEXT, recorded_ms INTEGER, epoch INTEGER)")
            if i == 0:  # executed at epoch 3, then compensated by a zombie of epoch 2
                db.execute("INSERT INTO saga_journal VALUES ('s1', 'x', 'EXECUTE', 'c', 'SUCCESS', '{}', NULL, 100, 3)")
                db.execute("INSERT INTO saga_journal VALUES ('s1', 'x', 'COMPENSATE', 'c', 'SUCCESS', '{}', NULL, 200, 2)")
            if i == 1:  # an epoch no manager claimed
                db.execute("INSERT INTO saga_journal VALUES ('s2', 'y', 'EXECUTE', 'c', 'FAILED', NULL, NULL, 100, 5)")
    [fenced] = [inv for inv in chaos._check_participants({}, {}) if "fenced epoch" in inv.name]
    assert not fenced.ok and fenced.count == 2
    assert any("s1 x/EXECUTE@3 then x/COMPENSATE@2" in e for e in fenced.examples)
    assert any("s2 epoch 5 above every epoch on the log (4)" in e for e in fenced.examples)


def test_a_broker_restart_overtaken_by_a_kill_leaves_the_broker_down(tmp_path) -> None:
    """Restarts took 7-30 s and faults came every 5-9 s: a restart that finished after a newer kill
    ended the downtime, and queries made while the broker was down counted as failures."""
    import threading

    from harness import wait_for

    fake = tmp_path / "kafka.sh"  # a "start" that waits until the test lets it finish
    fake.write_text(f'#!/bin/sh\ntouch "{tmp_path}/starting"\nwhile [ ! -e "{tmp_path}/go" ]; do sleep 0.01; done\n')
    fake.chmod(0o755)
    settings = ChaosSettings(seed=1, work_dir=tmp_path, faults=("broker",), kafka_sh=fake, bootstrap="127.0.0.1:1")
    chaos = Chaos(settings, echo=lambda line: None)
    chaos._kill_broker()
    restart = threading.Thread(target=chaos._start_broker)
    restart.start()
    wait_for((tmp_path / "starting").exists, 10, "the restart to begin")
    chaos._kill_broker()  # the next fault, while the first restart is still starting
    (tmp_path / "go").touch()
    restart.join(10)
    assert chaos._broker_down_until == float("inf")  # still down: only a later restart ends it
    chaos._start_broker()
    assert chaos._broker_down_until < float("inf")
