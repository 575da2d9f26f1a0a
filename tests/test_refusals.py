"""Broker refusals a user can fix stop a process with one line, instead of a retry loop (issue 9)."""

from __future__ import annotations

import subprocess
import sys

from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient, ConfigResource

from sagalog.errors import BrokerRefused, Fenced
from sagalog.kafka import must_stop, translate


def test_fixable_refusals_map_to_broker_refused_and_stop_the_process() -> None:
    session = translate(KafkaError(KafkaError.INVALID_SESSION_TIMEOUT), "joining the group")
    assert isinstance(session, BrokerRefused) and "--session-timeout-ms" in str(session)
    acl = translate(KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED), "claiming partition 0")
    assert isinstance(acl, BrokerRefused) and not isinstance(acl, Fenced)  # an ACL to grant, not a takeover
    assert must_stop(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))
    assert not must_stop(KafkaError(KafkaError._TRANSPORT))  # an outage: keep retrying
    assert isinstance(translate(KafkaError(KafkaError.PRODUCER_FENCED), "writing"), Fenced)


def broker_min_session_ms(bootstrap: str) -> int | None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    broker = next(iter(admin.list_topics(timeout=10).brokers))
    configs = next(iter(admin.describe_configs([ConfigResource(ConfigResource.Type.BROKER, str(broker))]).values())).result()
    entry = configs.get("group.min.session.timeout.ms")
    return int(entry.value) if entry is not None else None


def test_a_manager_below_the_brokers_minimum_session_timeout_fails_fast_with_one_line(bootstrap: str, topics) -> None:
    minimum = broker_min_session_ms(bootstrap)
    args = [
        sys.executable, "-m", "sagacli", "manager", "-b", bootstrap, "--topic-prefix", topics.prefix,
        "--partitions", "4", "--session-timeout-ms", "3000",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
        # The embedded broker has no session bounds: 3000 ms is fine there, and the manager runs.
        assert minimum is None or minimum <= 3000, f"manager kept running below the broker minimum {minimum}:\n{err[-2000:]}"
        return
    assert minimum is not None and minimum > 3000, f"manager exited although the broker accepts 3000 ms:\n{err[-2000:]}"
    assert proc.returncode == 2
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert f"{minimum}..1800000 ms" in line and "--session-timeout-ms" in line and "Traceback" not in err
