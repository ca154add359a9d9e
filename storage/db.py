"""Engines, connections and migrations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine

from abflow.settings import libpq_url, sqlalchemy_url

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(database_url: str, **kwargs) -> Engine:
    return create_engine(sqlalchemy_url(database_url), pool_pre_ping=True, **kwargs)


@contextmanager
def engine_for(database_url: str, **kwargs) -> Iterator[Engine]:
    """An engine for one piece of work, disposed (its connections closed) at the end."""
    engine = make_engine(database_url, **kwargs)
    try:
        yield engine
    finally:
        engine.dispose()


def connect(database_url: str, autocommit: bool = True, **kwargs) -> psycopg.Connection:
    """A psycopg connection (the hot-path driver; see the package's opening comment). Use it in a ``with``."""
    return psycopg.connect(libpq_url(database_url), autocommit=autocommit, **kwargs)


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision``. Safe to run again and from several processes at once."""
    with engine_for(database_url) as engine, engine.begin() as conn:
        # Serialise concurrent upgrades (several workers starting together).
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7401201)")
        config = alembic_config(database_url)
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def current_revision(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine_for(database_url) as engine, engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
