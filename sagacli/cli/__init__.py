"""The ``saga`` command line: one click group, one module per command family.

Only the module of the command that runs is imported (``saga status`` starts a fresh process
for every call and must answer fast), every one of them for ``saga --help``; each module imports
its heavy dependencies lazily too. Every user mistake becomes one line on stderr and exit code 2
(see ``main_group``).
"""

from __future__ import annotations

import atexit
import gc
import importlib
import sys

import click

from sagacli.cli.common import main_group

#: Every command, and the module of this package that adds it to ``cli`` when imported: kept in
#: one table so that the CLI reference is easy to find.
COMMANDS = {
    "broker": "broker",
    "topics": "topics",
    "manager": "manager",
    "participant": "participant",
    "start": "query",
    "status": "query",
    "history": "query",
    "list": "query",
    "cancel": "query",
    "retry": "query",
    "resolve": "query",
    "demo": "demo",
    "bench": "bench",
    "chaos": "chaos",
    "console": "console",
}


@click.group(cls=main_group({name: f"sagacli.cli.{module}" for name, module in COMMANDS.items()}))
@click.version_option(package_name="sagalog")
def cli() -> None:
    """Saga coordinator on Kafka: a saga log, stateless managers, participants by topic contract."""


def _register() -> None:
    """Import every command's module now (tests invoke ``cli`` with all commands in place)."""
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(f"sagacli.cli.{module}")


#: Queries people run in a loop and from scripts: a fresh process each time, so their speed is
#: mostly start-up and exit (not ``start --from FILE`` or ``--wait``: those may run long).
SHORT_LIVED = frozenset({"status", "history", "list"})


def main() -> None:
    # CPython's cyclic garbage collector runs again and again while a fresh process imports its
    # modules, and traverses every object at exit: ~60 ms of a 0.25 s `saga status` on a 2-core
    # machine. A command that lasts a moment creates little cyclic garbage, so it goes without;
    # and at exit every object is frozen (out of the collector's reach: the process is ending).
    # Long-running commands (manager, participant, broker, console) keep the collector.
    if len(sys.argv) > 1 and sys.argv[1] in SHORT_LIVED:
        gc.disable()
    atexit.register(gc.freeze)
    cli(prog_name="saga")
