"""The application layer: the ``saga`` command line, the demo, the chaos run and the benchmark.

It sits on top of everything else and nothing imports it (an import-linter contract in
pyproject.toml keeps it so)::

    sagacli        CLI (sagacli.cli), demo, chaos, bench, the replica supervisor
       │
    manager   participants      the saga manager process; the participant SDK and examples
       │        │
    sagalog                    the core: records, codec, fold, topics, log reading, read model,
                               client, Kafka configuration and errors
"""
