"""Persistence: what survives a restart, batched flushes, database outages, and flushes
racing zone deletion. Every check reads the real database (SQLite file or PostgreSQL schema)
or a fresh server started on it."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sqlite3
import uuid
from uuid import UUID

import pytest

import gridserver
from helpers import (PG_DSN, Passive, create_entity, delete_entity, dsn_with_schema, make_config, pg_exec, scaled,
                     stop_server, update_entity, wait_for)

#: Nested metadata with non-ASCII keys and values, escapes and every JSON type.
UNICODE_META = {
    "name": "Zoë 🐉 — ünïcödé",
    "日本語": {"キー": ["値", 1, -2.5, True, False, None, {"deep": {"deeper": ["ß", "€", "𝄞"]}}]},
    "quote": 'he said "hi"\\ and left\n\ttabbed',
    "empty_obj": {},
    "empty_list": [],
    "big": 2 ** 40,
}

ENTITY_FIELDS = ("id", "zone_id", "x", "y", "width", "height", "metadata")


# -- helpers -------------------------------------------------------------------------------

def _epoch(value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.timestamp()


def db_entities(dsn: str) -> dict[str, dict]:
    """Every row of the entities table, read straight from the database: id -> row dict."""
    if dsn.startswith("sqlite:///"):
        conn = sqlite3.connect(dsn[len("sqlite:///"):])
        try:
            rows = conn.execute("SELECT id, zone_id, x, y, width, height, metadata, created_at, updated_at "
                                "FROM entities").fetchall()
        finally:
            conn.close()
    else:
        rows = pg_exec("SELECT id::text, zone_id::text, x, y, width, height, metadata::text, "
                       "extract(epoch FROM created_at)::float8, extract(epoch FROM updated_at)::float8 "
                       "FROM entities", dsn)
    out = {}
    for r in rows:
        out[str(r[0]).lower()] = {"id": str(r[0]).lower(), "zone_id": str(r[1]).lower(), "x": r[2], "y": r[3],
                                  "width": r[4], "height": r[5], "metadata": json.loads(r[6]),
                                  "created_at": _epoch(r[7]), "updated_at": _epoch(r[8])}
    return out


def entity_dict(e) -> dict:
    return {"id": str(e.id), "zone_id": str(e.zone_id), "x": e.x, "y": e.y, "width": e.width,
            "height": e.height, "metadata": e.metadata, "created_at": float(e.created_at),
            "updated_at": float(e.updated_at)}


def world_entities(srv) -> dict[str, dict]:
    with srv.world.lock:
        return {str(e.id): entity_dict(e) for zs in srv.world.zones.values() for e in zs.entities.values()}


def assert_same_entity(got: dict, want: dict) -> None:
    for f in ENTITY_FIELDS:
        assert got[f] == want[f], (f, got, want)
    for f in ("created_at", "updated_at"):
        assert abs(got[f] - want[f]) <= 1e-3, (f, got[f], want[f])


async def zones_json(running, token: str) -> dict[str, dict]:
    status, body = await running.call("GET", "/api/zones", token)
    assert status == 200, body
    out = {}
    for z in body["zones"]:
        z = dict(z)
        z.pop("subscriber_count")
        out[z["id"]] = z
    return out


# -- 1. restart ------------------------------------------------------------------------------

async def test_restart_keeps_zones_entities_and_sessions(dsn, start_server):
    # A long interval: only the explicit mid-test flush and the graceful stop write entities.
    cfg = make_config(dsn, server_debug=True, persistence_interval=60.0)
    running = await start_server(cfg, Passive())
    srv = running.srv
    p = await running.player()
    tok = p["token"]
    z1 = await running.zone(tok, name="Zoë's zone ✓ 🐉", width=64, height=48, metadata=UNICODE_META)
    z2 = await running.zone(tok, name="ice", width=10, height=10, metadata={"biome": "ice", "level": 3})
    z3 = await running.zone(tok, name="plain", width=5, height=7)  # default metadata {}
    zid1, zid2, zid3 = UUID(z1["id"]), UUID(z2["id"]), UUID(z3["id"])
    world = srv.world

    # Phase 1: created and flushed (rows exist in the database).
    sized = create_entity(world, zid1, 1, 1, 3, 2, UNICODE_META)
    corner = create_entity(world, zid1, 63, 47, 0, 0, {"kind": "point", "ü": ["ö"]})
    origin = create_entity(world, zid1, 0, 0, 0, 0, {})
    full = create_entity(world, zid1, 0, 0, 64, 48, {"kind": "floor"})
    flushed_then_deleted = create_entity(world, zid2, 9, 9, 1, 1, {"doomed": True})
    flushed_updated_deleted = create_entity(world, zid2, 2, 3, 0, 0, {"doomed": "later"})
    assert await srv.persister.flush() is True
    assert set(db_entities(dsn)) >= {str(e.id) for e in (sized, corner, origin, full, flushed_then_deleted)}

    # Phase 2: changes only the graceful stop can write.
    update_entity(world, sized.id, x=5, metadata={"moved": "→ east", "nested": {"a": [1, {"b": "ç"}]}})
    update_entity(world, origin.id, y=10, width=2, height=2)  # a point becomes sized
    update_entity(world, corner.id, metadata={"renamed": "コーナー"})
    update_entity(world, full.id, x=0, y=0, width=0, height=0)  # sized becomes a point
    update_entity(world, flushed_updated_deleted.id, x=4)
    delete_entity(world, flushed_updated_deleted.id)
    delete_entity(world, flushed_then_deleted.id)
    late_point = create_entity(world, zid2, 0, 9, 0, 0, {"late": "✓"})
    late_sized = create_entity(world, zid3, 1, 2, 4, 5, {"deep": {"er": {"est": ["🙂"]}}})
    never_flushed_deleted = create_entity(world, zid3, 0, 0, 1, 1, {"ghost": True})
    delete_entity(world, never_flushed_deleted.id)
    assert world.dirty, "phase 2 left nothing dirty: the graceful stop would have nothing to prove"

    deleted_ids = {str(flushed_then_deleted.id), str(flushed_updated_deleted.id), str(never_flushed_deleted.id)}
    zones_before = await zones_json(running, tok)
    entities_before = world_entities(srv)
    assert set(zones_before) == {z1["id"], z2["id"], z3["id"]}
    assert {str(late_point.id), str(late_sized.id), str(sized.id)} <= set(entities_before)
    assert not deleted_ids & set(entities_before)

    await stop_server(running)  # graceful: must flush phase 2

    rows = db_entities(dsn)
    assert set(rows) == set(entities_before)
    for eid, want in entities_before.items():
        assert_same_entity(rows[eid], want)

    running2 = await start_server(make_config(dsn, server_debug=True, persistence_interval=60.0), Passive())
    status, me = await running2.call("GET", "/api/auth/me", tok)
    assert status == 200, me
    assert me["id"] == p["id"] and me["username"] == p["username"]

    zones_after = await zones_json(running2, tok)
    assert zones_after == zones_before
    assert zones_after[z1["id"]]["metadata"] == UNICODE_META

    entities_after = world_entities(running2.srv)
    assert set(entities_after) == set(entities_before)
    assert not deleted_ids & set(entities_after)
    for eid, want in entities_before.items():
        assert_same_entity(entities_after[eid], want)
    # The reloaded entities are indexed too: a point is found where it stands.
    found = running2.srv.world.query_area(zid1, 63, 47, 1, 1)
    assert [str(e.id) for e in found] == [str(corner.id)]

    # And the debug view serves the same entity JSON.
    status, body = await running2.call("GET", f"/api/debug/entities/{sized.id}", tok)
    assert status == 200, body
    assert body["metadata"] == {"moved": "→ east", "nested": {"a": [1, {"b": "ç"}]}}
    assert (body["x"], body["y"], body["width"], body["height"]) == (5, 1, 3, 2)
    assert abs(_epoch(body["updated_at"]) - entities_before[str(sized.id)]["updated_at"]) <= 1e-3
    status, body = await running2.call("GET", f"/api/debug/entities/{flushed_then_deleted.id}", tok)
    assert status == 404 and body["error"] == "entity_not_found", body


# -- 2. batched flush ------------------------------------------------------------------------

async def test_batched_flush_and_periodic_flush(dsn, start_server):
    running = await start_server(make_config(dsn, server_debug=True, persistence_interval=0.2), Passive())
    srv = running.srv
    p = await running.player()
    z = await running.zone(p["token"], width=100, height=100)
    zid = UUID(z["id"])

    created = {}
    for i in range(2000):
        x, y = i % 100, i // 100
        if i % 3 == 0:
            e = create_entity(srv.world, zid, x, y, 0, 0, {"i": i})
        else:
            e = create_entity(srv.world, zid, x, y, 1, 1, {"i": i, "s": f"n°{i}"})
        created[str(e.id)] = entity_dict(e)
    before = srv.metrics.flushes_total
    assert await srv.persister.flush() is True
    assert srv.metrics.flushes_total == before + 1
    rows = db_entities(dsn)
    assert len(rows) == 2000 and set(rows) == set(created)
    for eid, want in created.items():
        assert_same_entity(rows[eid], want)

    # No explicit flush from here: the periodic flush must write these by itself.
    before = srv.metrics.flushes_total
    z2 = await running.zone(p["token"], width=50, height=50)
    zid2 = UUID(z2["id"])
    more = {}
    for i in range(2000):
        e = create_entity(srv.world, zid2, i % 50, (i // 50) % 50, 0, 0, {"j": i})
        more[str(e.id)] = e
    moved = list(created)[:100]
    for eid in moved:
        update_entity(srv.world, UUID(eid), x=99, metadata={"moved": True})

    def all_written():
        rows = db_entities(dsn)
        return (all(eid in rows for eid in more)
                and all(rows[eid]["x"] == 99 and rows[eid]["metadata"] == {"moved": True} for eid in moved))

    await wait_for(all_written, timeout=10.0, interval=0.05)
    # The counter is bumped when the loop resumes after the commit, which the poll may beat.
    await wait_for(lambda: srv.metrics.flushes_total > before, timeout=5.0)
    rows = db_entities(dsn)
    assert len(rows) == 4000
    for eid, e in more.items():
        assert_same_entity(rows[eid], entity_dict(e))


# -- 3. database outage (PostgreSQL) ---------------------------------------------------------

@pytest.fixture
def outage_schema(backend):
    if backend != "postgres":
        pytest.skip("the outage test cuts a TCP connection to PostgreSQL")
    schema = "t_" + uuid.uuid4().hex[:16]
    pg_exec(f"CREATE SCHEMA {schema}")
    yield schema
    pg_exec(f"DROP SCHEMA {schema} CASCADE")


def _count(caplog, text: str) -> int:
    return sum(1 for r in caplog.records if r.name == "gridserver" and text in r.getMessage())


async def test_database_outage_keeps_changes_and_recovers(outage_schema, tcp_proxy, start_server, caplog):
    caplog.set_level(logging.INFO, logger="gridserver")
    proxy = await tcp_proxy()
    proxied_dsn = dsn_with_schema(outage_schema, f"postgresql://root@127.0.0.1:{proxy.port}/test")
    direct_dsn = dsn_with_schema(outage_schema, PG_DSN)
    cfg = make_config(proxied_dsn, server_debug=True, database_timeout=1.0, persistence_interval=0.2,
                      persistence_max_backoff=0.5, server_shutdown_timeout=3.0)
    running = await start_server(cfg, Passive())
    srv = running.srv
    world = srv.world
    p = await running.player()
    z = await running.zone(p["token"], width=40, height=40)
    zid = UUID(z["id"])

    keep = create_entity(world, zid, 1, 1, 2, 2, {"v": 1})
    move = create_entity(world, zid, 5, 5, 0, 0, {"v": "point"})
    doomed = create_entity(world, zid, 7, 7, 1, 1, {"v": "doomed"})
    assert await srv.persister.flush() is True
    assert set(db_entities(direct_dsn)) == {str(keep.id), str(move.id), str(doomed.id)}
    status, body = await running.call("GET", "/healthz")
    assert status == 200 and body["status"] == "ok" and body["database"] == "ok", body

    proxy.cut()
    # Changes while the database is unreachable: they must stay in memory and be written later.
    update_entity(world, move.id, x=30, y=31, metadata={"v": "moved ✓", "n": [1, 2]})
    update_entity(world, keep.id, width=3)
    delete_entity(world, doomed.id)
    born = create_entity(world, zid, 20, 20, 4, 4, {"born": "während"})
    born_point = create_entity(world, zid, 39, 39, 0, 0, {})
    born_then_gone = create_entity(world, zid, 0, 0, 0, 0, {"x": 1})
    delete_entity(world, born_then_gone.id)

    async def degraded():
        status, body = await running.call("GET", "/healthz")
        return status == 503 and body["status"] == "degraded" and body["database"] == "down"

    await wait_for(degraded, timeout=10.0)
    assert proxy.refused >= 1  # the server did try to reconnect, and was refused

    status, body = await asyncio.wait_for(
        running.call("POST", "/api/auth/login", json={"username": p["username"], "password": p["password"]}),
        scaled(10.0))  # a hang guard, not a timing assertion
    assert status == 503, body
    assert body["error"] == "database_unavailable" and body.get("message"), body

    await wait_for(lambda: srv.metrics.flush_failures_total >= 3, timeout=15.0)
    assert _count(caplog, "database unreachable") == 1, [r.getMessage() for r in caplog.records]
    assert _count(caplog, "database back") == 0
    # Nothing of the outage reached the database (the proxy really cut it off).
    rows = db_entities(direct_dsn)
    assert rows[str(move.id)]["x"] == 5 and str(doomed.id) in rows and str(born.id) not in rows

    proxy.restore()

    async def healthy():
        status, body = await running.call("GET", "/healthz")
        return status == 200 and body["status"] == "ok" and body["database"] == "ok"

    await wait_for(healthy, timeout=15.0)
    rows = db_entities(direct_dsn)
    assert set(rows) == {str(keep.id), str(move.id), str(born.id), str(born_point.id)}
    for e in (keep, move, born, born_point):
        assert_same_entity(rows[str(e.id)], entity_dict(e))
    assert (rows[str(move.id)]["x"], rows[str(move.id)]["y"]) == (30, 31)
    assert rows[str(move.id)]["metadata"] == {"v": "moved ✓", "n": [1, 2]}
    assert rows[str(keep.id)]["width"] == 3
    assert _count(caplog, "database back") == 1
    assert _count(caplog, "database unreachable") == 1

    status, body = await running.call("POST", "/api/auth/login",
                                      json={"username": p["username"], "password": p["password"]})
    assert status == 200 and body["token"], body
    status, me = await running.call("GET", "/api/auth/me", body["token"])
    assert status == 200 and me["id"] == p["id"], me

    await stop_server(running)


# -- 4. flush racing zone deletion -----------------------------------------------------------

async def test_flush_racing_zone_deletion(dsn, start_server):
    running = await start_server(make_config(dsn, server_debug=True, persistence_interval=60.0), Passive())
    srv = running.srv
    world = srv.world
    p = await running.player()
    tok = p["token"]
    survivor = await running.zone(tok, name="survivor", width=30, height=30)
    sid = UUID(survivor["id"])
    kept = [create_entity(world, sid, i, i, 1, 1, {"k": i}) for i in range(20)]
    failures = srv.metrics.flush_failures_total

    # Each round: a zone with flushed and unflushed entities, all dirty, deleted while a flush runs.
    for rnd, delay in enumerate([None, None, 0.0, 0.001, 0.003, 0.01, 0.03]):
        z = await running.zone(tok, name=f"doomed-{rnd}", width=30, height=30)
        zid = UUID(z["id"])
        old = [create_entity(world, zid, i, 0, 2, 2, {"r": rnd, "i": i}) for i in range(25)]
        assert await srv.persister.flush() is True
        assert sum(1 for r in db_entities(dsn).values() if r["zone_id"] == z["id"]) == 25
        for e in old[:20]:
            update_entity(world, e.id, y=5, metadata={"r": rnd, "moved": True})
        for e in old[20:]:
            delete_entity(world, e.id)
        for i in range(25):
            create_entity(world, zid, i, 20, 0, 0, {"new": i})
        for e in kept:
            update_entity(world, e.id, metadata={"k": e.metadata["k"], "round": rnd})
        assert any(e.zone_id == zid for e in world.dirty), "the zone's entities must be dirty when it is deleted"

        delete = running.call("DELETE", f"/api/zones/{zid}", tok)
        if delay is None:  # the flush starts first, the deletion arrives while it runs
            flushed, (status, body) = await asyncio.gather(srv.persister.flush(), delete)
        else:  # the deletion starts first, the flush arrives a little later
            task = asyncio.ensure_future(delete)
            await asyncio.sleep(delay)
            flushed = await srv.persister.flush()
            status, body = await task
        assert status == 204, body
        assert flushed is True
        assert await srv.persister.flush() is True

        rows = db_entities(dsn)
        assert not [r for r in rows.values() if r["zone_id"] == z["id"]], f"round {rnd}: rows of the deleted zone"
        for e in kept:
            assert rows[str(e.id)]["metadata"] == {"k": e.metadata["k"], "round": rnd}
        status, body = await running.call("GET", f"/api/zones/{zid}", tok)
        assert status == 404 and body["error"] == "zone_not_found", body

    assert srv.metrics.flush_failures_total == failures


async def test_journal_rows_round_trip_with_awkward_text(dsn, backend):
    """Journal rows go in as one array per column (PostgreSQL) and come back as written:
    text with quotes, backslashes, escapes and non-ASCII, a seed of 63 bits, a tick written
    twice (the later wins), and a zone that no longer exists (its row is skipped). On
    PostgreSQL 14 and later the inputs are stored with lz4."""
    store = gridserver.open_store(make_config(dsn))
    await store.open()
    try:
        zone = gridserver.Zone(uuid.uuid4(), "journaled", 8, 8, {})
        await store.insert_zone(zone)
        inputs = gridserver.json_dumps({"intents": [[str(uuid.uuid4()), 1, 1.5, UNICODE_META]],
                                        "events": [["join", str(uuid.uuid4())]]})
        inputs_escaped = '{"intents":[["p",2,2.5,{"s":"nul \\u0000 tab \\t \\\\ \\"q\\""}]],"events":[]}'
        seed = 2 ** 63 - 1
        await store.write_journal([(zone.id, 1, seed, 10.25, inputs, 0), (zone.id, 2, 7, 11.0, "stale", 0),
                                   (uuid.uuid4(), 1, 1, 1.0, "a zone that is gone", 0)])
        await store.write_journal([(zone.id, 2, 8, 12.0, inputs_escaped, 0)])
        rows = await store.journal_range(zone.id, 1, 5)
        assert [r[1:5] for r in rows] == [(1, seed, 10.25, inputs), (2, 8, 12.0, inputs_escaped)]
        assert json.loads(rows[0][4])["intents"][0][3] == UNICODE_META
        if backend == "postgres":
            version = pg_exec("SHOW server_version_num")[0][0]
            method = pg_exec(f"SELECT attcompression FROM pg_attribute WHERE attrelid = "
                             f"'{dsn.rsplit('%3D', 1)[-1]}.journal'::regclass AND attname = 'inputs'")
            if int(version) >= 140000:
                assert method == [("l",)]
    finally:
        await store.close()
