"""Rules of the layout that import-linter cannot see: SQL lives in ``storage/``, every package says
what it owns, and the README's layout table names every package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("abflow", "producers", "storage", "stream_jobs", "bandit_service")
SQL = re.compile(r"^\s*(SELECT|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|WITH\s+\w+\s+AS|LISTEN|CREATE\s+DATABASE)\b",
                 re.IGNORECASE)
# The embedded PostgreSQL creates its database before any schema exists: that is the local stack's job.
SQL_OUTSIDE_STORAGE_ALLOWED = {"abflow/local/stack.py"}


def source_files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def sql_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
            found.append((node.lineno, node.value.strip()[:60]))
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
            if SQL.match(text):
                found.append((node.lineno, text.strip()[:60]))
    return found


def test_the_sql_check_finds_sql():
    """The control: the storage package is full of it."""
    assert sql_literals(ROOT / "storage" / "assignments.py")


def test_every_sql_statement_is_in_storage():
    stray = {}
    for package in PACKAGES:
        if package == "storage":
            continue
        for path in source_files(package):
            relative = path.relative_to(ROOT).as_posix()
            if relative not in SQL_OUTSIDE_STORAGE_ALLOWED and (found := sql_literals(path)):
                stray[relative] = found
    assert not stray, f"SQL outside storage/: {stray}"


def test_every_package_says_what_it_owns():
    silent = []
    for package in PACKAGES:
        for init in sorted((ROOT / package).rglob("__init__.py")):
            if "migrations" in init.parts or "examples" in init.parts:
                continue
            if not ast.get_docstring(ast.parse(init.read_text())):
                silent.append(init.relative_to(ROOT).as_posix())
    assert not silent, f"packages without an opening docstring: {silent}"


def test_the_readme_layout_table_names_every_package():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    end = layout.find("\n## ", 4)
    layout = layout if end == -1 else layout[:end]
    missing = []
    for package in PACKAGES:
        for init in sorted((ROOT / package).rglob("__init__.py")):
            if "migrations" in init.parts or "examples" in init.parts:
                continue
            name = init.parent.relative_to(ROOT).as_posix() + "/"
            if f"`{name}`" not in layout:
                missing.append(name)
    assert not missing, f"README's Layout table misses {missing}"
