"""schema.sql and the schema the server creates are the same database, on PostgreSQL and SQLite."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import uuid
from urllib.parse import urlparse

import pytest

from helpers import (PG_DSN, Passive, ROOT, create_entity, dsn_with_schema, make_config, pg_exec, require_pg, scaled,
                     stop_server)

SCHEMA_SQL = os.path.join(ROOT, "schema.sql")
TABLES = ["entities", "journal", "nodes", "players", "sessions", "snapshots", "zones"]


@pytest.fixture
def pg_schemas():
    """Two fresh, empty PostgreSQL schemas (dropped afterwards)."""
    require_pg()
    names = ["s" + c + "_" + uuid.uuid4().hex[:12] for c in "ab"]
    for n in names:
        pg_exec(f"CREATE SCHEMA {n}")
    yield names
    for n in names:
        pg_exec(f"DROP SCHEMA IF EXISTS {n} CASCADE")


def apply_schema_sql(schema: str) -> subprocess.CompletedProcess:
    url = urlparse(PG_DSN)
    env = dict(os.environ, PGOPTIONS=f"-csearch_path={schema}")
    cmd = ["psql", "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 5432), "-U", url.username or "root",
           "-d", (url.path or "/test").lstrip("/") or "test", "-v", "ON_ERROR_STOP=1", "-X", "-q", "-f", SCHEMA_SQL]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=scaled(60))
    assert proc.returncode == 0, proc.stderr
    return proc


def describe(schema: str) -> dict:
    """Everything that makes the schema what it is, with the schema's name taken out."""

    def norm(value):
        return value.replace(f"{schema}.", "S.") if isinstance(value, str) else value

    def rows(sql):
        return [tuple(norm(v) if not isinstance(v, list) else tuple(v) for v in r) for r in pg_exec(sql)]

    tables = rows(f"SELECT table_name, table_type FROM information_schema.tables "
                  f"WHERE table_schema = '{schema}' ORDER BY 1")
    columns = rows(f"SELECT table_name, ordinal_position, column_name, data_type, is_nullable, column_default "
                   f"FROM information_schema.columns WHERE table_schema = '{schema}' ORDER BY 1, 2")
    constraints = rows(f"""
        SELECT cl.relname, c.conname, c.contype,
               array(SELECT a.attname::text FROM unnest(c.conkey) k
                     JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k ORDER BY a.attname),
               pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_class cl ON cl.oid = c.conrelid
        JOIN pg_namespace n ON n.oid = cl.relnamespace
        WHERE n.nspname = '{schema}' ORDER BY 1, 2""")
    table_constraints = rows(f"""
        SELECT tc.table_name, tc.constraint_type,
               array(SELECT k.column_name::text FROM information_schema.key_column_usage k
                     WHERE k.constraint_schema = tc.constraint_schema AND k.constraint_name = tc.constraint_name
                     ORDER BY k.ordinal_position)
        FROM information_schema.table_constraints tc
        WHERE tc.table_schema = '{schema}' AND tc.constraint_type <> 'CHECK' ORDER BY 1, 2, 3""")
    indexes = rows(f"SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = '{schema}' ORDER BY 1, 2")
    return {"tables": tables, "columns": columns, "constraints": constraints,
            "table_constraints": table_constraints, "indexes": indexes}


async def test_schema_sql_equals_server_schema_on_postgres(start_server, pg_schemas):
    a, b = pg_schemas
    apply_schema_sql(a)
    apply_schema_sql(a)  # idempotent: a second run changes nothing and does not fail
    s = await start_server(make_config(dsn_with_schema(b)), Passive())
    await stop_server(s)
    da, db = describe(a), describe(b)
    assert [t for t, _ in da["tables"]] == TABLES, da["tables"]
    assert da["columns"], "schema.sql created no columns in the target schema"
    for part in da:
        assert da[part] == db[part], part
    # schema.sql over the server's own schema: still idempotent, still the same
    apply_schema_sql(b)
    assert describe(b) == db


async def test_server_runs_on_schema_sql_database(start_server, pg_schemas):
    a, _ = pg_schemas
    apply_schema_sql(a)
    before = describe(a)
    s = await start_server(make_config(dsn_with_schema(a), server_debug=True), Passive())
    p = await s.player()
    z = await s.zone(p["token"])
    create_entity(s.srv.world, uuid.UUID(z["id"]), 1, 1, 1, 1, {"k": "v"})
    await s.srv.persister.flush()
    await stop_server(s)
    assert describe(a) == before  # the server added nothing of its own
    assert pg_exec(f"SELECT count(*) FROM {a}.entities") == [(1,)]
    assert pg_exec(f"SELECT count(*) FROM {a}.players") == [(1,)]


def sqlite_tables(path: str) -> dict[str, list[tuple[str, bool]]]:
    conn = sqlite3.connect(path)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        out = {}
        for name in names:
            # (cid, name, type, notnull, default, pk)
            out[name] = [(r[1], bool(r[3]) or bool(r[5])) for r in conn.execute(f"PRAGMA table_info({name})")]
        indexes = sorted(r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"))
        uniques = set()
        for name in names:
            for idx in conn.execute(f"PRAGMA index_list({name})"):
                if idx[2]:  # unique
                    cols = tuple(r[2] for r in conn.execute(f"PRAGMA index_info('{idx[1]}')"))
                    uniques.add((name, cols))
        return out, indexes, uniques
    finally:
        conn.close()


async def test_sqlite_tables_and_columns_match_postgres(start_server, pg_schemas, tmp_path):
    _, b = pg_schemas
    path = str(tmp_path / "schema.db")
    s = await start_server(make_config(f"sqlite:///{path}"), Passive())
    await stop_server(s)
    s = await start_server(make_config(dsn_with_schema(b)), Passive())
    await stop_server(s)
    lite, lite_indexes, lite_uniques = sqlite_tables(path)

    pg: dict[str, list[tuple[str, bool]]] = {}
    for table, column, nullable in pg_exec(
            f"SELECT table_name, column_name, is_nullable FROM information_schema.columns "
            f"WHERE table_schema = '{b}' ORDER BY table_name, ordinal_position"):
        pg.setdefault(table, []).append((column, nullable == "NO"))
    assert sorted(pg) == TABLES
    assert sorted(lite) == TABLES
    for table in TABLES:
        assert [c for c, _ in lite[table]] == [c for c, _ in pg[table]], table
        assert lite[table] == pg[table], table  # NOT NULL (or primary key) alike

    pg_indexes = sorted(r[0] for r in pg_exec(
        f"SELECT indexname FROM pg_indexes WHERE schemaname = '{b}' AND indexname NOT IN "
        f"(SELECT conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
        f"WHERE n.nspname = '{b}')"))
    assert lite_indexes == pg_indexes
    pg_uniques = {(t, tuple(cols)) for t, cols in pg_exec(f"""
        SELECT cl.relname, array(SELECT a.attname::text FROM unnest(c.conkey) k
                                 JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k)
        FROM pg_constraint c JOIN pg_class cl ON cl.oid = c.conrelid JOIN pg_namespace n ON n.oid = cl.relnamespace
        WHERE n.nspname = '{b}' AND c.contype IN ('p', 'u')""")}
    assert lite_uniques == pg_uniques  # primary keys and UNIQUE constraints
