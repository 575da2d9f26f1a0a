"""The saga execution coordinator: stateless replicas that own log partitions.

* :mod:`manager.decide`  - pure decisions: (state, input, now) -> log records + commands
* :mod:`manager.runtime` - the thin I/O loop: poll, decode, decide, write in one transaction, commit
"""
