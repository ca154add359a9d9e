"""Connections and migrations."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine

from abflow.settings import sqlalchemy_url

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(database_url: str, **kwargs) -> Engine:
    return create_engine(sqlalchemy_url(database_url), pool_pre_ping=True, **kwargs)


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision``. Safe to run again and from several processes at once."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            # Serialise concurrent upgrades (several workers starting together).
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7401201)")
            config = alembic_config(database_url)
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def current_revision(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
