"""Shared CLI plumbing: turning our errors into one clear line, common options."""

from __future__ import annotations

import sys
from typing import Any

import click

from sagalog.config import default_bootstrap
from sagalog.errors import SagaError


def main_group() -> type[click.Group]:
    class SagaGroup(click.Group):
        def invoke(self, ctx: click.Context) -> Any:
            try:
                return super().invoke(ctx)
            except SagaError as err:
                # A user mistake or a broker problem: one line that says what and how to fix it.
                click.secho(f"error: {err}", fg="red", err=True)
                sys.exit(2 if not getattr(err, "retryable", False) else 3)

    return SagaGroup


bootstrap_option = click.option(
    "--bootstrap-servers",
    "-b",
    default=default_bootstrap,
    show_default="$SAGA_BOOTSTRAP_SERVERS or 127.0.0.1:9092",
    help="Kafka bootstrap servers.",
)
prefix_option = click.option(
    "--topic-prefix", default="saga", show_default=True, help="Prefix of every topic name."
)
