"""The layers hold at run time too: a serving process imports the SDK without the server's
dependencies, and the kernel imports without any third-party library."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_SIDE = ["psycopg", "psycopg_pool", "sqlalchemy", "alembic", "faust", "scipy", "statsmodels", "matplotlib",
               "fastapi", "uvicorn"]


def import_with_blocked(module: str, blocked: list[str]) -> subprocess.CompletedProcess:
    """Import ``module`` in a fresh interpreter in which importing any of ``blocked`` fails."""
    code = textwrap.dedent(f"""
        import importlib, sys
        BLOCKED = {blocked!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        importlib.import_module({module!r})
        leaked = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
        assert not leaked, leaked
        print("imported")
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_blocker_works():
    """The control: a server-side module does not import with its dependencies blocked."""
    result = import_with_blocked("storage.db", SERVER_SIDE)
    assert result.returncode != 0 and "blocked in this test" in result.stderr


@pytest.mark.parametrize("module", ["producers.sdk", "producers.publisher", "producers.contracts"])
def test_the_serving_sdk_imports_without_server_side_dependencies(module):
    result = import_with_blocked(module, SERVER_SIDE)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr


def test_the_kernel_imports_without_third_party_libraries_but_yaml():
    modules = ["abflow.core.config", "abflow.core.buckets", "abflow.core.windowing", "abflow.core.text",
               "abflow.core.errors"]
    blocked = SERVER_SIDE + ["numpy", "confluent_kafka", "orjson", "click", "httpx", "pydantic"]
    for module in modules:
        result = import_with_blocked(module, blocked)
        assert result.returncode == 0 and "imported" in result.stdout, (module, result.stderr)
