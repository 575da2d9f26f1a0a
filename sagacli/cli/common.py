"""Shared CLI plumbing: turning our errors into one clear line, common options."""

from __future__ import annotations

import importlib
import logging
import sys
import time
import types
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from sagalog.config import default_bootstrap
from sagalog.errors import SagaError

T = TypeVar("T")


class OneLineUsageError(click.UsageError):
    """A usage error shown as one line (what is wrong, where the help is), not usage + hint + error."""

    def show(self, file: Any = None) -> None:
        command = self.ctx.command_path if self.ctx is not None else "saga"
        click.secho(f"error: {self.format_message()} (see '{command} --help')", fg="red", err=True)


def _one_line(err: click.UsageError) -> OneLineUsageError:
    if isinstance(err, OneLineUsageError):
        return err
    return OneLineUsageError(err.format_message(), err.ctx)


class OneLineCommand(click.Command):
    """A command whose invalid flags and arguments produce one line on stderr and exit code 2,
    whether click finds them while parsing or the command does while checking combinations."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as err:
            raise _one_line(err) from err

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            raise _one_line(err) from err


def main_group(lazy: Mapping[str, str] | None = None) -> type[click.Group]:
    """The class of the ``saga`` group. ``lazy``: command name -> the module that adds the command
    to the group when imported; it is imported only when that command is asked for."""

    class SagaGroup(click.Group):
        command_class = OneLineCommand
        group_class = type  # sub-groups (saga topics, saga participant) are SagaGroups too

        def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any) -> click.Context:
            try:
                return super().make_context(info_name, args, parent=parent, **extra)
            except click.UsageError as err:
                raise _one_line(err) from err

        def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
            try:
                return super().resolve_command(ctx, args)
            except click.UsageError as err:
                raise _one_line(err) from err

        def invoke(self, ctx: click.Context) -> Any:
            try:
                return super().invoke(ctx)
            except SagaError as err:
                # A user mistake or a broker problem: one line that says what and how to fix it.
                click.secho(f"error: {err}", fg="red", err=True)
                sys.exit(2 if not getattr(err, "retryable", False) else 3)

    if not lazy:
        return SagaGroup
    lazy_commands = dict(lazy)

    class LazySagaGroup(SagaGroup):
        group_class = SagaGroup  # a sub-group lists and finds only its own commands

        def list_commands(self, ctx: click.Context) -> list[str]:
            return sorted({*super().list_commands(ctx), *lazy_commands})

        def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
            if cmd_name not in self.commands and cmd_name in lazy_commands:
                importlib.import_module(lazy_commands[cmd_name])
            return super().get_command(ctx, cmd_name)

    return LazySagaGroup


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


def with_retries(call: Callable[[], T], doing: str, within_s: float = 60.0) -> T:
    """Retry a startup step of a long-running process (manager, participant) on a transient
    broker error (a broker restarting or slow to answer, a topic being created by another replica
    at the same moment) until ``within_s`` has passed: a process restarted while its broker is
    briefly down must not die of it. A refusal the user must fix, or an outage that lasts, still
    ends the process with one line."""
    from sagalog.errors import BrokerError

    deadline = time.monotonic() + within_s
    delay = 0.5
    if within_s <= 0:
        return call()
    while True:
        try:
            return call()
        except BrokerError as err:
            if not err.retryable or time.monotonic() + delay > deadline:
                raise
            logging.getLogger("saga.cli").warning("%s: %s; retrying in %.1f s", doing, err, delay)
            time.sleep(delay)  # a backoff between attempts, not a wait for an event
            delay = min(5.0, delay * 2)


wait_for_broker_option = click.option(
    "--wait-for-broker",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="At startup, keep trying this long to reach the broker (0: fail at once, exit 3). Under a "
    "supervisor that restarts the process while its broker restarts too, give it time instead.",
)


def import_kafka_client() -> None:
    """Import confluent_kafka for a short-lived command without the asyncio it imports at once but
    uses only in its asyncio clients (``confluent_kafka._serde_builder``): asyncio (with ssl,
    subprocess, ...) was 40-50 ms of a fresh ``saga status`` process on a 2-core machine. The
    stand-in it gets imports the real asyncio at its first use, so code that uses it (through
    confluent_kafka or otherwise) sees no difference. Does nothing once either is imported."""
    if "confluent_kafka" in sys.modules or "asyncio" in sys.modules:
        return
    sys.modules["asyncio"] = _ImportedOnUse("asyncio")
    try:
        import confluent_kafka  # noqa: F401
    finally:
        if isinstance(sys.modules.get("asyncio"), _ImportedOnUse):
            del sys.modules["asyncio"]  # from now on `import asyncio` imports the real one


class _ImportedOnUse(types.ModuleType):
    """Stands in for a module until one of its attributes is used, then imports the real one."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)
