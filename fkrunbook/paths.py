"""Locations of the repository's SQL files and run outputs."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = REPO_ROOT / "sql"
QUERIES_DIR = SQL_DIR / "queries"
MIGRATIONS_DIR = SQL_DIR / "migrations"
RUNBOOKS_DIR = REPO_ROOT / "runbooks"
OUTPUTS_DIR = REPO_ROOT / "outputs"


def read_sql(name: str) -> str:
    """Return the text of ``sql/<name>``."""
    return (SQL_DIR / name).read_text(encoding="utf-8")
