"""The saga log: Avro records, their codec, the state fold, topic administration.

Everything a manager needs to rebuild a saga lives here, and nothing here talks to
Kafka except :mod:`sagalog.kafka` (clients, error mapping) and :mod:`sagalog.topics`.
"""

__version__ = "0.1.0"
