"""Proof that docs/CONTRACT.md and schemas/ are enough: a participant written from them alone.

The participant below imports nothing of this project: it reads the .avsc files, computes the
single-object header as CONTRACT.md says (the spec's Rabin fingerprint, little-endian) and talks
to Kafka with raw confluent-kafka. Real manager processes drive sagas through it to the end.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import fastavro
from confluent_kafka import Consumer, Producer
from fastavro.schema import to_parsing_canonical_form
from harness import ManagerProcess, start_sagas, wait_terminal

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
EMPTY = 0xC15D213AA4D7A795
TABLE: list[int] = []
for i in range(256):
    fp = i
    for _ in range(8):
        fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
    TABLE.append(fp)


def fingerprint64(canonical_form: bytes) -> bytes:
    fp = EMPTY
    for byte in canonical_form:
        fp = (fp >> 8) ^ TABLE[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


def load(name: str) -> tuple[bytes, dict]:
    raw = json.loads((SCHEMAS / name).read_text())
    return b"\xc3\x01" + fingerprint64(to_parsing_canonical_form(raw).encode()), fastavro.parse_schema(raw)


COMMAND_HEADER, COMMAND = load("participant_command.avsc")
REPLY_HEADER, REPLY = load("participant_reply.avsc")


class ContractParticipant:
    """Answers every command it is sent; refuses to execute a step it has compensated."""

    def __init__(self, bootstrap: str, topics: list[str], group: str, fail_step: str | None = None) -> None:
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",  # the contract: only committed commands count
            "session.timeout.ms": 6000,
        })
        self.consumer.subscribe(topics)
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
        self.fail_step = fail_step
        self.journal: dict[str, dict] = {}  # command id -> the reply given (same command, same reply)
        self.handled: list[tuple[str, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            msg = self.consumer.poll(0.05)
            if msg is None or msg.error():
                continue
            value = msg.value()
            assert value[:10] == COMMAND_HEADER, "the header CONTRACT.md describes"
            cmd = fastavro.schemaless_reader(io.BytesIO(value[10:]), COMMAND)
            reply = self.journal.get(cmd["command_id"])
            if reply is None:
                failing = cmd["step"] == self.fail_step and cmd["action"] == "EXECUTE"
                reply = {
                    "command_id": cmd["command_id"], "saga_id": cmd["saga_id"], "step": cmd["step"],
                    "action": cmd["action"], "attempt": cmd["attempt"], "epoch": cmd["epoch"],
                    "outcome": "BUSINESS_FAILURE" if failing else "SUCCESS",
                    "output": None if failing else json.dumps({"by": "contract"}),
                    "error": "refused by the contract participant" if failing else None,
                    "participant": "contract", "replied_ms": int(time.time() * 1000),
                }
                self.journal[cmd["command_id"]] = reply
                self.handled.append((cmd["step"], cmd["action"]))
            body = io.BytesIO()
            fastavro.schemaless_writer(body, REPLY, {**reply, "attempt": cmd["attempt"], "epoch": cmd["epoch"]})
            self.producer.produce(cmd["reply_topic"], REPLY_HEADER + body.getvalue(), key=msg.key(), partition=cmd["reply_partition"])
            self.producer.poll(0)
        self.producer.flush(5)
        self.consumer.close()


def test_a_participant_built_from_the_contract_alone_completes_and_compensates_sagas(bootstrap: str, make_topics, tmp_path: Path) -> None:
    topics = make_topics(partitions=2, participants=["alpha", "beta"])
    defs = tmp_path / "defs.yaml"
    defs.write_text(
        "sagas:\n"
        "  - name: pair\n    steps: [{name: one, participant: alpha}, {name: two, participant: beta}]\n"
        "  - name: doomed\n    steps: [{name: one, participant: alpha}, {name: bad, participant: beta}]\n"
    )
    participant = ContractParticipant(bootstrap, [topics.commands("alpha"), topics.commands("beta")], f"{topics.prefix}-contract", fail_step="bad")
    thread = threading.Thread(target=participant.run, daemon=True)
    thread.start()
    manager = ManagerProcess(bootstrap, topics, defs, tmp_path, "m", partitions=2).start()
    try:
        start_sagas(bootstrap, topics, "pair", [f"ok-{i}" for i in range(5)])
        start_sagas(bootstrap, topics, "doomed", ["doomed-1"])
        states = wait_terminal(bootstrap, topics, [*(f"ok-{i}" for i in range(5)), "doomed-1"], 60)
    finally:
        participant.stop.set()
        thread.join(10)
        assert manager.stop() == 0
    assert all(states[f"ok-{i}"].status == "COMPLETED" for i in range(5))
    assert states["ok-0"].step("two").output == '{"by": "contract"}'
    assert states["doomed-1"].status == "ABORTED"
    assert ("one", "COMPENSATE") in participant.handled and ("bad", "COMPENSATE") not in participant.handled



def test_a_command_the_participant_cannot_act_on_fails_the_step_now_or_opens_an_incident(
    bootstrap: str, make_topics, tmp_path: Path
) -> None:
    """CONTRACT.md section 8 with a real manager: the SDK participant has no handler for one step
    and no compensate handler for another. The first saga aborts at once (its step's timeout is a
    minute: the answer, not the deadline, ends it). The second's compensation becomes an
    incident; since the refusal was not recorded, the next version of the participant, which has
    the handler, runs the compensation when an operator retries it, and the saga ends ABORTED."""
    from harness import wait_for

    from participants import BusinessFailure, Participant, SqliteStore, StepContext
    from sagalog.client import SagaClient
    from sagalog.reader import saga_states

    topics = make_topics(partitions=2, participants=["gamma"])
    defs = tmp_path / "defs.yaml"
    defs.write_text(
        "sagas:\n"
        "  - name: unhandled\n"
        "    steps: [{name: known, participant: gamma, timeout_s: 60},\n"
        "            {name: unknown, participant: gamma, timeout_s: 60, retry: {attempts: 5}}]\n"
        "  - name: undoless\n"
        "    steps: [{name: no-undo, participant: gamma, timeout_s: 60}, {name: declined, participant: gamma}]\n"
    )
    undone: list[str] = []

    def gamma(version: int) -> Participant:
        participant = Participant("gamma", topics=topics, bootstrap=bootstrap,
                                  store=SqliteStore(tmp_path / "gamma.db"), poll_timeout_s=0.1)

        @participant.execute("known")
        @participant.compensate("known")
        @participant.execute("no-undo")
        def done(ctx: StepContext, tx: object) -> dict:
            return {"done": ctx.step}

        @participant.execute("declined")
        def declined(ctx: StepContext, tx: object) -> None:
            raise BusinessFailure("declined")

        if version == 2:  # the next version can undo it
            @participant.compensate("no-undo")
            def undo(ctx: StepContext, tx: object) -> None:
                undone.append(ctx.saga_id)

        return participant

    running: list[tuple[Participant, threading.Thread]] = []

    def run(participant: Participant) -> Participant:
        thread = threading.Thread(target=participant.run, daemon=True)
        thread.start()
        running.append((participant, thread))
        return participant

    def stop(participant: Participant) -> None:
        for p, thread in running:
            if p is participant:
                p.stop()
                thread.join(30)
                assert not thread.is_alive()

    first = run(gamma(1))
    manager = ManagerProcess(bootstrap, topics, defs, tmp_path, "m", partitions=2).start()
    try:
        started = time.monotonic()
        start_sagas(bootstrap, topics, "unhandled", ["unhandled-1"])
        start_sagas(bootstrap, topics, "undoless", ["undoless-1"])
        unhandled = wait_terminal(bootstrap, topics, ["unhandled-1"], 50)["unhandled-1"]
        assert time.monotonic() - started < 50  # < the step's 60 s timeout: the reply ended it
        assert unhandled.status == "ABORTED"
        assert unhandled.reason is not None and "UnknownStep" in unhandled.reason
        assert unhandled.step("unknown").status == "FAILED" and unhandled.step("unknown").attempt == 1
        assert unhandled.step("known").status == "COMPENSATED"

        def incident() -> object:
            state = saga_states(bootstrap, topics).get("undoless-1")
            return state if state is not None and state.incident("no-undo") is not None else None

        stuck = wait_for(incident, 60, "the compensation to become an incident", interval=0.5)
        assert stuck.status == "COMPENSATING"  # type: ignore[attr-defined]
        assert "no compensate handler" in stuck.incident("no-undo").reason  # type: ignore[attr-defined]
        assert stuck.step("no-undo").comp_attempt == 1  # type: ignore[attr-defined]
        assert first.stats.dead_letters == 2  # the unknown step, the compensation's one attempt

        stop(first)
        run(gamma(2))  # the next version, the same journal
        with SagaClient(bootstrap, topic_prefix=topics.prefix, state_dir=tmp_path / "model") as client:
            client.retry("undoless-1", reason="the compensate handler is deployed")
        undoless = wait_terminal(bootstrap, topics, ["undoless-1"], 60)["undoless-1"]
        assert undoless.status == "ABORTED" and undoless.step("no-undo").status == "COMPENSATED"
        assert undone == ["undoless-1"]
    finally:
        for participant, _ in running:
            stop(participant)
        assert manager.stop() == 0
