"""``saga bench``: the project's own benchmark (throughput, latency, replay, recovery, memory, query).

Everything runs on one machine against one broker (the embedded one by default), with real
manager and participant processes started through the CLI, exactly as a user would run them.
The load generator and the log tailer live in the bench process; they use hand-written Avro
for the few fields they need (:mod:`sagacli.bench.wire`) so that they cost the measured system as
little CPU as possible.

Modules:

* :mod:`sagacli.bench.config`   sizes and durations (full and ``--quick``), the targets
* :mod:`sagacli.bench.wire`     fast StartSaga encoding, log-record peeking, synthetic log records
* :mod:`sagacli.bench.cluster`  child processes (managers, participants) and their cleanup
* :mod:`sagacli.bench.load`     the open-loop generator and the log tailer
* :mod:`sagacli.bench.parts`    the seven measurements
* :mod:`sagacli.bench.report`   JSON, Markdown and PNG output
* :mod:`sagacli.bench.runner`   runs the parts in order with progress, on an embedded or given broker

Entry point: :func:`sagacli.bench.runner.run_bench` (the ``saga bench`` command calls it).
"""
