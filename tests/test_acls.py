"""Least privilege on a secured Apache Kafka: every role works with exactly the ACLs that
docs/OPERATIONS.md lists, and no more than that is possible.

The test starts its own Apache Kafka 4.0 (``../shared/kafka``, or ``$SAGA_KAFKA_HOME``) on free
ports, from a fresh state directory: a SASL_PLAINTEXT listener with SCRAM-SHA-256, the KRaft
``StandardAuthorizer`` and one super user (``admin``; the PLAINTEXT controller listener's
``ANONYMOUS`` is a super user too, which only the broker itself reaches: it is not advertised).
It creates one SCRAM user per role and grants exactly the ``kafka-acls.sh`` commands of the
"ACLs by role" section of OPERATIONS.md, parsed from the page: one of them runs through the
real ``kafka-acls.sh`` (and must give the same bindings as the parser), the others go through
the AdminClient. Then, each process with its own principal:

* ``saga topics create`` as the topic administrator; a ``saga manager`` process and a
  ``saga participant run noop`` process; ``saga start`` as the starter, ``saga start --id
  --wait`` as an operator (starter + reader ACLs): both sagas complete; ``saga status`` and
  ``saga list`` answer as the reader;
* a participant can read neither the log nor another participant's commands (it can read its
  own);
* a participant can write to the inbox (the contract) but cannot forge a reply for a saga or a
  step it has no command for: the manager dead-letters both (read back as admin);
* the CLI run with a principal that lacks rights says so in one ``error:`` line, exit code 2,
  no traceback (``saga status`` and ``saga start``).

Skipped, with the reason, where Java or the Kafka distribution is missing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from sagacli.process import Child, sagacli_command
from sagalog.codec import Codec
from sagalog.kafka import producer_config
from sagalog.records import Action, DeadLetter, ParticipantReply, ReplyOutcome

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
PREFIX, GROUP = "saga", "saga-managers"  # the defaults, as a fresh cluster of one deployment has them
PARTICIPANTS = ("noop", "other")
ADMIN = "admin"
USERS = (
    "saga-admin", "saga-manager", "saga-participant-noop", "saga-participant-other",
    "saga-starter", "saga-reader", "saga-operator",
)
CODEC = Codec()
DEFINITIONS = """\
sagas:
  - name: acl-check
    steps: [{name: first, participant: noop}, {name: second, participant: noop}]
  - name: acl-wait
    steps: [{name: wait, participant: other, timeout_s: 600}]
"""


def password(user: str) -> str:
    return f"{user}-secret"


def sasl(user: str, secret: str | None = None) -> dict[str, str]:
    return {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanisms": "SCRAM-SHA-256",
        "sasl.username": user,
        "sasl.password": password(user) if secret is None else secret,
    }


# --- the ACLs of docs/OPERATIONS.md, parsed -------------------------------------------------------


def acl_commands(env: dict[str, str]) -> list[str]:
    """Every ``kafka-acls.sh`` command of the "ACLs by role" section, continuation lines joined and
    ``$VARS`` expanded from ``env``. Commands that use ``$N`` come once per participant."""
    text = OPERATIONS.read_text()
    section = text[text.index("\n## ACLs by role"):]
    section = section[:section.index("\n## ", 1)]
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.startswith("kafka-acls.sh "):
                continue
            names = PARTICIPANTS if "$N" in line else (None,)
            for n in names:
                values = {**env, **({"N": n} if n else {})}
                commands.append(re.sub(r"\$\{?(\w+)\}?", lambda m: values[m[1]], line))  # noqa: B023
    return commands


_RESOURCE = {"--topic": ResourceType.TOPIC, "--group": ResourceType.GROUP,
             "--transactional-id": ResourceType.TRANSACTIONAL_ID}


def bindings(command: str) -> list[AclBinding]:
    """The ACL bindings ``kafka-acls.sh --add`` creates for this command (principals x resources x ops)."""
    args = shlex.split(command)
    assert args[0] == "kafka-acls.sh" and "--add" in args, command
    principals, operations, resources = [], [], []
    pattern = ResourcePatternType.LITERAL
    i = 1
    while i < len(args):
        flag = args[i]
        if flag in ("--add",):
            i += 1
            continue
        if flag == "--cluster":
            resources.append((ResourceType.BROKER, "kafka-cluster"))
            i += 1
            continue
        value = args[i + 1]
        if flag == "--allow-principal":
            principals.append(value)
        elif flag == "--operation":
            operations.append(AclOperation[re.sub(r"(?<!^)(?=[A-Z])", "_", value).upper()])
        elif flag in _RESOURCE:
            resources.append((_RESOURCE[flag], value))
        elif flag == "--resource-pattern-type":
            pattern = ResourcePatternType[value.upper()]
        elif flag not in ("--bootstrap-server", "--command-config"):
            raise AssertionError(f"an option this test does not know: {flag} in {command}")
        i += 2
    assert principals and operations and resources, command
    return [AclBinding(rtype, name, pattern, principal, "*", op, AclPermissionType.ALLOW)
            for principal in principals for rtype, name in resources for op in operations]


def key(b: AclBinding) -> tuple[Any, ...]:
    return (b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation, b.permission_type)


# --- the broker -----------------------------------------------------------------------------------


def kafka_home() -> Path | None:
    candidates = [os.environ.get("SAGA_KAFKA_HOME"), ROOT.parent / "shared" / "kafka"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "kafka.sh").is_file() and (Path(candidate) / "bin").is_dir():
            return Path(candidate)
    return None


def free_port_pair() -> int:
    """A port P with P+1 free too (kafka.sh puts the controller on P+1)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


@dataclass
class SecuredKafka:
    home: Path
    bootstrap: str
    state: Path

    def admin(self, user: str = ADMIN) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.bootstrap, **sasl(user)})

    def admin_properties(self) -> Path:
        path = self.state / "admin.properties"
        path.write_text(
            "security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-256\n"
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{ADMIN}" password="{password(ADMIN)}";\n'
        )
        return path


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredKafka]:
    home = kafka_home()
    if home is None:
        pytest.skip("no Apache Kafka distribution: set SAGA_KAFKA_HOME (or put it at ../shared/kafka)")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("no Java (java on PATH or JAVA_HOME): Apache Kafka cannot run here")
    port = free_port_pair()
    state = tmp_path_factory.mktemp("kafka-sasl")
    (state / "data").mkdir()
    (state / "logs").mkdir()
    jaas = state / "jaas.conf"
    jaas.write_text(
        "KafkaServer {\n  org.apache.kafka.common.security.scram.ScramLoginModule required\n"
        f'  username="{ADMIN}" password="{password(ADMIN)}";\n}};\n'
    )
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{port + 1}",
        "listeners": f"SASL_PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{port + 1}",
        "advertised.listeners": f"SASL_PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "SASL_PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
        "sasl.enabled.mechanisms": "SCRAM-SHA-256",
        "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-256",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{ADMIN};User:ANONYMOUS",
    }
    # Formatted here, not by kafka.sh, to store the admin's SCRAM credential before the first start
    # (the broker authenticates to itself with it); kafka.sh then keeps the formatted directory.
    (state / "format.properties").write_text(
        "".join(f"{k}={v}\n" for k, v in settings.items()) + f"log.dirs={state / 'data'}\n"
    )
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    formatted = subprocess.run(
        [str(home / "bin" / "kafka-storage.sh"), "format", "-t", cluster_id, "-c", str(state / "format.properties"),
         "--add-scram", f"SCRAM-SHA-256=[name={ADMIN},password={password(ADMIN)}]"],
        capture_output=True, text=True, timeout=180,
    )
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
    env = {
        **os.environ,
        "KAFKA_STATE_DIR": str(state),
        "KAFKA_OPTS": f"-Djava.security.auth.login.config={jaas}",
        "KAFKA_OVERRIDES": " ".join(f"{k}={v}" for k, v in settings.items()),
    }
    env.pop("KAFKA_FRESH", None)
    started = subprocess.run([str(home / "kafka.sh"), "start", str(port)], env=env, capture_output=True, text=True,
                             timeout=200)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield SecuredKafka(home, f"127.0.0.1:{port}", state)
    finally:
        subprocess.run([str(home / "kafka.sh"), "stop", str(port)], env=env, capture_output=True, timeout=90)


# --- helpers --------------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


def cli_args(kafka: SecuredKafka, user: str, *args: str, secret: str | None = None) -> list[str]:
    settings = [f"{k}={v}" for k, v in sasl(user, secret).items()]
    return sagacli_command(*args, "-b", kafka.bootstrap, "--topic-prefix", PREFIX,
                           *(part for setting in settings for part in ("-X", setting)))


def saga(kafka: SecuredKafka, user: str, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_args(kafka, user, *args), capture_output=True, text=True, timeout=timeout_s)


class Process(Child):
    """A long-running ``saga`` command (manager, participant) with its output in a file, started at once."""

    def __init__(self, kafka: SecuredKafka, user: str, log: Path, *args: str) -> None:
        # A generous grace: the test asserts a clean exit (0), also on a busy machine.
        super().__init__(log.stem, cli_args(kafka, user, *args), log, stop_grace_s=60.0)
        self.start()


def consumer_error(kafka: SecuredKafka, user: str, group: str, topic: str) -> KafkaError:
    """The error a consumer of ``topic`` in ``group`` gets as ``user`` (subscribe, then poll)."""
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, **sasl(user), "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is not None:
                return msg.error()
            if msg is not None:
                raise AssertionError(f"{user} read a record of {topic}")
        raise AssertionError(f"no error within 60 s for {user} consuming {topic}")
    finally:
        consumer.close()


def read_to_end(kafka: SecuredKafka, user: str, group: str, topic: str, partitions: int) -> list[bytes]:
    """Every record of ``topic`` from the beginning to its end (partition EOF), as ``user``."""
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, **sasl(user), "group.id": group,
                         "enable.partition.eof": True, "isolation.level": "read_committed",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        values: list[bytes] = []
        ended: set[int] = set()
        deadline = time.monotonic() + 60
        while len(ended) < partitions:
            assert time.monotonic() < deadline, f"{user} did not reach the end of {topic}"
            for msg in consumer.consume(500, 0.5):
                err = msg.error()
                if err is None:
                    values.append(msg.value())
                elif err.code() == KafkaError._PARTITION_EOF:
                    ended.add(msg.partition())
                else:
                    raise AssertionError(f"{user} reading {topic}: {err}")
        return values
    finally:
        consumer.close()


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- the test -------------------------------------------------------------------------------------


def test_every_role_works_with_exactly_the_documented_acls_and_no_more(kafka: SecuredKafka, tmp_path: Path) -> None:
    admin = kafka.admin()
    upserts = [UserScramCredentialUpsertion(user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 4096),
                                            password(user).encode()) for user in USERS]
    for future in admin.alter_user_scram_credentials(upserts).values():
        future.result()

    # The documented commands; the operator gets the starter's and the reader's, as the page says.
    commands = acl_commands({"BOOTSTRAP": kafka.bootstrap, "PREFIX": PREFIX, "GROUP": GROUP})
    operator = [c.replace("User:saga-starter", "User:saga-operator").replace("User:saga-reader", "User:saga-operator")
                for c in commands if "User:saga-starter" in c or "User:saga-reader" in c]
    [by_tool] = [c for c in commands if "--transactional-id" in c]
    documented = [b for c in commands + operator for b in bindings(c)]
    # One command through the real kafka-acls.sh (a JVM: seconds) while the others are created here.
    tool = subprocess.Popen(
        [str(kafka.home / "bin" / "kafka-acls.sh"),
         *shlex.split(by_tool.replace("admin.properties", str(kafka.admin_properties())))[1:]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={k: v for k, v in os.environ.items() if k != "KAFKA_OPTS"},
    )
    rest = [b for c in commands + operator if c != by_tool for b in bindings(c)]
    for future in admin.create_acls(rest).values():
        future.result()

    defs = tmp_path / "defs.yaml"
    defs.write_text(DEFINITIONS)
    state_dir = tmp_path / "read-models"
    created = saga(kafka, "saga-admin", "topics", "create", "--partitions", "2",
                   *(a for n in PARTICIPANTS for a in ("--participant", n)))
    assert created.returncode == 0, created.stdout + created.stderr

    tool_output, _ = tool.communicate(timeout=180)
    assert tool.returncode == 0, tool_output
    granted = [b for b in admin.describe_acls(AclBindingFilter(
        ResourceType.ANY, None, ResourcePatternType.ANY, None, None, AclOperation.ANY, AclPermissionType.ANY,
    )).result() if b.principal in {f"User:{user}" for user in USERS}]
    assert sorted(map(key, granted)) == sorted(set(map(key, documented))), "exactly the documented ACLs"

    participant = Process(kafka, "saga-participant-noop", tmp_path / "participant.log",
                          "participant", "run", "noop", "--db-dir", str(tmp_path / "db"))
    manager = Process(kafka, "saga-manager", tmp_path / "manager.log",
                      "manager", "--definitions", str(defs), "--partitions", "2")
    try:
        # The starter starts a saga; an operator starts one with its own id and waits for it.
        started = saga(kafka, "saga-starter", "start", "acl-check", "--definitions", str(defs), "--json",
                       "--state-dir", str(state_dir / "starter"))
        assert started.returncode == 0, started.stdout + started.stderr
        first = json.loads(started.stdout)["saga_id"]
        waited = saga(kafka, "saga-operator", "start", "acl-check", "--id", "acl-operator-1", "--wait",
                      "--timeout", "150", "--definitions", str(defs), "--state-dir", str(state_dir / "operator"))
        assert waited.returncode == 0, (waited.stdout, waited.stderr, manager.output()[-3000:],
                                        participant.output()[-3000:])

        # The reader's queries answer.
        def completed() -> dict[str, Any] | None:
            result = saga(kafka, "saga-reader", "status", first, "--json", "--state-dir", str(state_dir / "reader"))
            assert result.returncode == 0, result.stdout + result.stderr
            view = json.loads(result.stdout)
            return view if view["status"] == "COMPLETED" else None

        wait_for(completed, 120, f"saga {first} to complete", interval_s=1.0)
        listed = saga(kafka, "saga-reader", "list", "--json", "--state-dir", str(state_dir / "reader"))
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert {first, "acl-operator-1"} <= {row["saga_id"] for row in json.loads(listed.stdout)}, listed.stdout

        # A saga that waits for participant 'other' (not running): live, so replies to it are decided.
        waiting = saga(kafka, "saga-starter", "start", "acl-wait", "--definitions", str(defs), "--json",
                       "--state-dir", str(state_dir / "starter"))
        assert waiting.returncode == 0, waiting.stdout + waiting.stderr
        live = json.loads(waiting.stdout)["saga_id"]
        assert participant.stop() == 0, participant.output()[-3000:]

        # Each participant reads its own commands, and nothing else.
        commands_of_other = read_to_end(kafka, "saga-participant-other", f"{PREFIX}.participant.other",
                                        f"{PREFIX}.commands.other", 2)
        assert [CODEC.decode(v).saga_id for v in commands_of_other] == [live]
        for user, group, topic in [
            ("saga-participant-noop", f"{PREFIX}.participant.noop", f"{PREFIX}.log"),
            ("saga-participant-other", f"{PREFIX}.participant.other", f"{PREFIX}.log"),
            ("saga-participant-other", f"{PREFIX}.participant.other", f"{PREFIX}.commands.noop"),
        ]:
            assert consumer_error(kafka, user, group, topic).code() == KafkaError.TOPIC_AUTHORIZATION_FAILED

        # A participant may write to the inbox, but a reply for a saga or step it has no command for
        # is dead-lettered by the manager.
        forged_saga = f"acl-check-{uuid.uuid4().hex[:12]}"
        forgeries = [
            ParticipantReply(command_id=f"{forged_saga}/first/execute", saga_id=forged_saga, step="first",
                             action=Action.EXECUTE, attempt=1, epoch=1, outcome=ReplyOutcome.SUCCESS, output="{}",
                             participant="noop", replied_ms=0),
            ParticipantReply(command_id=f"{live}/bogus/execute", saga_id=live, step="bogus", action=Action.EXECUTE,
                             attempt=1, epoch=1, outcome=ReplyOutcome.SUCCESS, output="{}", participant="noop",
                             replied_ms=0),
        ]
        producer = Producer(producer_config(kafka.bootstrap, overrides=sasl("saga-participant-noop")))
        delivered: list[KafkaError | None] = []
        for reply in forgeries:
            producer.produce(f"{PREFIX}.inbox", CODEC.encode(reply), key=reply.saga_id.encode(),
                             on_delivery=lambda err, _msg: delivered.append(err))
        assert producer.flush(30) == 0 and delivered == [None, None], delivered

        def dead_letters() -> list[DeadLetter] | None:
            letters = [CODEC.decode(v) for v in read_to_end(kafka, ADMIN, "acl-test-admin", f"{PREFIX}.dead-letters", 2)]
            forged = [d for d in letters if d.source_topic == f"{PREFIX}.inbox"
                      and isinstance(CODEC.decode(d.value), ParticipantReply)]
            return forged if len(forged) >= 2 else None

        forged = wait_for(dead_letters, 90, "the forged replies to be dead-lettered", interval_s=1.0)
        reasons = sorted(d.reason for d in forged)
        assert len(forged) == 2 and all(d.component.startswith("manager:") for d in forged), reasons
        assert any(f"unknown saga {forged_saga!r}" in r for r in reasons), reasons
        assert any("has no step 'bogus'" in r for r in reasons), reasons
        status = saga(kafka, "saga-reader", "status", live, "--json", "--state-dir", str(state_dir / "reader"))
        assert json.loads(status.stdout)["status"] == "RUNNING", status.stdout + status.stderr

        # The CLI with a principal that lacks rights: one line, exit code 2, no traceback.
        refusals = {
            "status as a participant": cli_args(kafka, "saga-participant-noop", "status", live,
                                                "--state-dir", str(state_dir / "p")),
            "status as the manager": cli_args(kafka, "saga-manager", "status", live, "--state-dir", str(state_dir / "m")),
            "start as the manager": cli_args(kafka, "saga-manager", "start", "acl-check", "--definitions", str(defs)),
        }
        running = {what: subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for what, args in refusals.items()}
        lines = {}
        for what, proc in running.items():
            out, err = proc.communicate(timeout=180)
            lines[what] = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        assert f"topic {PREFIX}.log does not exist" in lines["status as a participant"], lines
        assert "not authorized for the consumer group" in lines["status as the manager"], lines
        assert "not authorized for a topic" in lines["start as the manager"], lines

        assert manager.alive, manager.output()[-3000:]
    finally:
        participant.stop()
        code = manager.stop()
    assert code == 0, manager.output()[-3000:]
    assert "not authorized" not in manager.output(), manager.output()[-3000:]


def test_saga_start_as_a_principal_that_may_write_nothing_says_so_in_one_line(kafka: SecuredKafka) -> None:
    admin = kafka.admin()
    user, prefix = "saga-nowrite", "nowrite"
    upsert = UserScramCredentialUpsertion(user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 4096),
                                          password(user).encode())
    for future in admin.alter_user_scram_credentials([upsert]).values():
        future.result()
    for future in admin.create_topics([NewTopic(f"{prefix}.inbox", 1, 1)]).values():
        future.result()
    # Read implies Describe: it sees the inbox, but may write to no topic.
    read_inbox = AclBinding(ResourceType.TOPIC, f"{prefix}.inbox", ResourcePatternType.LITERAL, f"User:{user}", "*",
                            AclOperation.READ, AclPermissionType.ALLOW)
    for future in admin.create_acls([read_inbox]).values():
        future.result()
    args = cli_args(kafka, user, "start", "noop-3")
    args[args.index("--topic-prefix") + 1] = prefix
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert "not authorized" in one_line_error(result)
