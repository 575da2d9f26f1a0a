"""The ``saga`` command line: one click group, one module per command family.

Every command imports its heavy dependencies lazily so that ``saga --help`` stays fast,
and every user mistake becomes one line on stderr and exit code 2 (see ``run_cli``).
"""

from __future__ import annotations

import click

from sagacli.cli.common import main_group


@click.group(cls=main_group())
@click.version_option(package_name="sagalog")
def cli() -> None:
    """Saga coordinator on Kafka: a saga log, stateless managers, participants by topic contract."""


def _register() -> None:
    # Each module adds its commands to ``cli``; kept in one list so the CLI reference is easy to find.
    from sagacli.cli import broker, topics  # noqa: F401

    for optional in ("manager", "participant", "query", "demo", "bench", "chaos", "console"):
        try:
            __import__(f"sagacli.cli.{optional}")
        except ModuleNotFoundError as err:  # a command family not written yet
            if err.name != f"sagacli.cli.{optional}":
                raise


def main() -> None:
    _register()
    cli(prog_name="saga")
