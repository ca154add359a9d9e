"""What every command shares: settings, one database context, one logging set-up, and the group
that turns every ``AbflowError`` into a one-line error and a non-zero exit."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import click

from abflow.core.errors import AbflowError
from abflow.settings import Settings


class AbflowGroup(click.Group):
    """A command group whose commands may raise ``AbflowError``: the user sees its message, exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AbflowError as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            message = unreachable_database(exc)
            if message is None:
                raise
            raise click.ClickException(message) from None


def unreachable_database(exc: Exception) -> str | None:
    """One line for a PostgreSQL that does not answer (None for any other error): most often a shell
    whose exports point at a stack that is no longer running."""
    import os

    import psycopg
    import sqlalchemy.exc

    if not isinstance(exc, (psycopg.OperationalError, sqlalchemy.exc.OperationalError)):
        return None
    cause = exc.orig if isinstance(exc, sqlalchemy.exc.OperationalError) else exc
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if os.environ.get("ABFLOW_DATABASE_URL"):
        return (f"cannot reach PostgreSQL at ABFLOW_DATABASE_URL ({reason}). If it comes from an earlier `abflow up`, "
                "run `eval \"$(abflow env)\"` again, or unset it to use the running local stack")
    return f"cannot reach PostgreSQL ({reason}); is the stack running (`abflow up`)?"


def load_settings(stack: bool = True) -> Settings:
    """Settings from the environment; with ``stack``, addresses of the local stack fill the gaps."""
    settings = Settings.from_env()
    if not stack:
        return settings
    from abflow.local.stack import with_local_stack

    return with_local_stack(settings)


@contextmanager
def database(settings: Settings | None = None) -> Iterator:
    """An engine on the configured PostgreSQL for one command, closed at the end."""
    from storage.db import engine_for

    settings = settings or load_settings()
    with engine_for(settings.require_database_url()) as engine:
        yield engine


def setup_logging(level: str = "info") -> None:
    """The one log format of every long-running abflow process."""
    logging.basicConfig(level=level.upper(), format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")


def json_option(help_text: str = "Print JSON."):
    return click.option("--json", "as_json", is_flag=True, help=help_text)
