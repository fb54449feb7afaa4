"""The throwaway Synapse's database: SQLite (the default, so figures stay comparable), or a
fresh PostgreSQL database on 127.0.0.1:5432 (production homeservers run on PostgreSQL), made
with the C collation Synapse requires and dropped afterwards."""

from __future__ import annotations

from contextlib import contextmanager
import os
from typing import Any, Iterator

PG_DSN = {"host": "127.0.0.1", "port": 5432, "user": os.environ.get("PGUSER", "postgres")}


@contextmanager
def synapse_database(kind: str) -> Iterator[dict[str, Any] | None]:
    if kind == "sqlite":
        yield None
        return
    try:
        import psycopg2
    except ImportError as e:  # matrix-synapse[postgres] brings it (requirements-dev.txt)
        raise SystemExit(f"--synapse-db postgres needs psycopg2: {e}") from e
    name = f"encstate_bench_synapse_{os.getpid()}"
    admin = psycopg2.connect(dbname="postgres", **PG_DSN)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(
                f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' "
                "TEMPLATE template0"
            )
        yield {
            "name": "psycopg2",
            "args": {**PG_DSN, "database": name, "cp_min": 5, "cp_max": 10},
        }
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
