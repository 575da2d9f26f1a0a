"""The ``saga`` command line: one click group, one module per command family.

Only the module of the command that runs is imported (``saga status`` starts a fresh process
for every call and must answer fast), every one of them for ``saga --help``; each module imports
its heavy dependencies lazily too. Every user mistake becomes one line on stderr and exit code 2
(see ``main_group``).
"""

from __future__ import annotations

import importlib

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


def main() -> None:
    cli(prog_name="saga")
