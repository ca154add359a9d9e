"""The embedded PostgreSQL asks every connection for a password, and the services are not its superuser.

It used to trust every local connection as a superuser with no password, which let any local user
run commands as its owner (COPY ... TO PROGRAM)."""

from __future__ import annotations

import os
import subprocess

import psycopg
import pytest

from abflow.local.stack import DATABASE_NAME, SERVICE_ROLE, EmbeddedPostgres


def refused_without_password(port: int, user: str, database: str) -> bool:
    try:
        psycopg.connect(f"postgresql://{user}@127.0.0.1:{port}/{database}", connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        return "password" in str(exc)
    return False


def test_every_connection_needs_a_password_and_the_services_role_is_no_superuser(stack):
    if stack.postgres is None:
        pytest.skip("needs the embedded PostgreSQL")
    postgres = stack.postgres
    assert refused_without_password(postgres.port, "postgres", "postgres")
    assert refused_without_password(postgres.port, SERVICE_ROLE, DATABASE_NAME)
    assert os.stat(postgres.secrets_path).st_mode & 0o777 == 0o600
    with psycopg.connect(stack.database_url) as conn:
        user, superuser, create_role, create_db = conn.execute(
            "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user").fetchone()
        assert (user, superuser, create_role, create_db) == (SERVICE_ROLE, False, False, False)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("COPY (SELECT 1) TO PROGRAM 'true'")
        conn.rollback()
        # It owns the schema's tables: the migrations and the services work as it.
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' "
                            "AND tableowner <> current_user").fetchone()[0] == 0


def test_a_cluster_made_before_passwords_gets_them_and_keeps_its_data(tmp_path):
    postgres = EmbeddedPostgres(tmp_path / "pgdata", tmp_path / "postgres.log")
    postgres.data_dir.mkdir(parents=True)
    postgres._prepare_root()
    subprocess.run([postgres._bin("initdb"), "-D", str(postgres.data_dir), "--auth=trust", "--encoding=utf8",
                    "-U", "postgres"], user=postgres._os_user, check=True, capture_output=True)
    postgres.process = subprocess.Popen([postgres._bin("postgres"), "-D", str(postgres.data_dir), "-p",
                                         str(postgres.port), "-c", "listen_addresses=127.0.0.1",
                                         "-c", "unix_socket_directories="], user=postgres._os_user,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        postgres._wait_ready()
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')  # as the earlier versions did, owned by the superuser
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{postgres.port}/{DATABASE_NAME}") as conn:
            conn.execute("CREATE TABLE kept (id bigserial PRIMARY KEY, note text)")
            conn.execute("INSERT INTO kept (note) VALUES ('from before')")
    finally:
        postgres.stop()
    postgres.start()
    try:
        assert refused_without_password(postgres.port, "postgres", "postgres")
        with psycopg.connect(postgres.url) as conn:
            assert conn.execute("SELECT note FROM kept").fetchone() == ("from before",)
            conn.execute("INSERT INTO kept (note) VALUES ('after')")  # its sequence was handed over too
    finally:
        postgres.stop()
