"""Names and settings shared by every process: topic names, partitioning, defaults."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
BOOTSTRAP_ENV = "SAGA_BOOTSTRAP_SERVERS"
_PREFIX = re.compile(r"^[A-Za-z0-9._-]+$")


def default_bootstrap() -> str:
    """The bootstrap address from SAGA_BOOTSTRAP_SERVERS, else the embedded broker's default."""
    return os.environ.get(BOOTSTRAP_ENV, DEFAULT_BOOTSTRAP)


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names, all derived from one prefix so that several deployments can share a cluster.

    The log and the inbox are co-partitioned: saga S lives on partition p of both, and the
    manager that owns inbox partition p is the only writer of log partition p.

    A plain dataclass, not a pydantic model: every command imports this module, and pydantic
    costs a fresh ``saga status`` process about a tenth of a second.
    """

    prefix: str = "saga"

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _PREFIX.match(self.prefix):
            from sagalog.errors import ConfigError

            raise ConfigError(
                f"topic prefix {self.prefix!r} is not a valid topic name prefix (use letters, digits, '.', '_' and '-')"
            )

    @property
    def log(self) -> str:
        """Compacted, keyed by saga id: every saga state change (and partition claims)."""
        return f"{self.prefix}.log"

    @property
    def inbox(self) -> str:
        """Start requests, cancel requests and participant replies for the managers."""
        return f"{self.prefix}.inbox"

    @property
    def dead_letters(self) -> str:
        """Messages that could not be decoded or did not belong anywhere, with the reason."""
        return f"{self.prefix}.dead-letters"

    def commands(self, participant: str) -> str:
        """The command topic a participant consumes."""
        return f"{self.prefix}.commands.{participant}"
