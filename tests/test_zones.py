"""The Zones table of the contract, over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest
from aiohttp import WSMsgType

from helpers import Passive, create_entity, db_rows, make_config, scaled

ZONE_FIELDS = {"id", "name", "width", "height", "metadata", "created_at", "updated_at",
               "entity_count", "subscriber_count"}


def assert_error(status, body, want_status: int, code, field: str | None = None):
    assert status == want_status, body
    assert isinstance(body, dict), body
    codes = code if isinstance(code, tuple) else (code,)
    assert body.get("error") in codes, body
    assert isinstance(body.get("message"), str) and body["message"], body
    if field is not None:
        assert field in body["message"], body


def parse_iso(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert value.tzinfo is not None, text
    return value


def zname() -> str:
    return "z_" + uuid.uuid4().hex[:8]


async def debug_server(start_server, dsn, **overrides):
    overrides.setdefault("server_debug", True)
    return await start_server(make_config(dsn, **overrides), Passive())


# --------------------------------------------------------------------------- list

async def test_list_requires_token(start_server, dsn):
    s = await debug_server(start_server, dsn)
    assert_error(*(await s.call("GET", "/api/zones")), 401, "unauthorized")
    assert_error(*(await s.call("GET", "/api/zones", "garbage")), 401, "unauthorized")


async def test_list_200(start_server, dsn):
    s = await debug_server(start_server, dsn)
    p = await s.player()
    status, body = await s.call("GET", "/api/zones", p["token"])
    assert status == 200, body
    assert body == {"zones": []}  # the Passive game creates none
    a = await s.zone(p["token"], name="alpha", width=10, height=20, metadata={"k": [1, 2]})
    b = await s.zone(p["token"], name="beta")
    status, body = await s.call("GET", "/api/zones", p["token"])
    assert status == 200, body
    by_id = {z["id"]: z for z in body["zones"]}
    assert set(by_id) == {a["id"], b["id"]}
    for z in body["zones"]:
        assert set(z) >= ZONE_FIELDS, z
    assert by_id[a["id"]]["name"] == "alpha"
    assert by_id[a["id"]]["metadata"] == {"k": [1, 2]}
    assert (by_id[a["id"]]["width"], by_id[a["id"]]["height"]) == (10, 20)
    # any player may list, not only debug players
    s2 = await debug_server(start_server, dsn, server_debug_players="nobody")
    q = await s2.player()
    status, body = await s2.call("GET", "/api/zones", q["token"])
    assert status == 200 and {z["id"] for z in body["zones"]} == {a["id"], b["id"]}, body


# --------------------------------------------------------------------------- details

async def test_details_200_and_404(start_server, dsn):
    s = await debug_server(start_server, dsn)
    p = await s.player()
    z = await s.zone(p["token"], metadata={"a": 1})
    status, body = await s.call("GET", f"/api/zones/{z['id']}", p["token"])
    assert status == 200, body
    assert body == z
    assert_error(*(await s.call("GET", f"/api/zones/{z['id']}")), 401, "unauthorized")
    assert_error(*(await s.call("GET", f"/api/zones/{uuid.uuid4()}", p["token"])), 404, "zone_not_found")
    # an upper-case spelling of an existing id names the same zone or none; never a 500
    status, body = await s.call("GET", f"/api/zones/{z['id'].upper()}", p["token"])
    assert status in (200, 404), body


@pytest.mark.parametrize("bad", ["not-a-uuid", "123", "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz",
                                 "%00", "%E2%82%AC", "x" * 300, "00000000-0000-0000-0000-0000000000000"])
async def test_details_malformed_uuid_404(start_server, dsn, bad):
    s = await debug_server(start_server, dsn)
    p = await s.player()
    status, body = await s.call("GET", f"/api/zones/{bad}", p["token"])
    assert_error(status, body, 404, ("zone_not_found", "not_found"))
    status, body = await s.call("DELETE", f"/api/zones/{bad}", p["token"])
    assert_error(status, body, 404, ("zone_not_found", "not_found"))


# --------------------------------------------------------------------------- create

async def test_create_404_when_debug_off(start_server, dsn):
    s = await debug_server(start_server, dsn, server_debug=False)
    p = await s.player()
    status, body = await s.call("POST", "/api/zones", p["token"], json={"name": zname(), "width": 5, "height": 5})
    assert_error(status, body, 404, "not_found")
    # also without a token, and nothing was created
    status, body = await s.call("POST", "/api/zones", json={"name": zname(), "width": 5, "height": 5})
    assert_error(status, body, 404, "not_found")
    assert (await s.call("GET", "/api/zones", p["token"]))[1] == {"zones": []}
    assert db_rows(dsn, "SELECT count(*) FROM zones") == [(0,)]


async def test_create_403_for_non_debug_player(start_server, dsn):
    s = await debug_server(start_server, dsn, server_debug_players="admin")
    p = await s.player()
    status, body = await s.call("POST", "/api/zones", p["token"], json={"name": zname(), "width": 5, "height": 5})
    assert_error(status, body, 403, "forbidden")
    assert db_rows(dsn, "SELECT count(*) FROM zones") == [(0,)]
    # without a token: 401, not 403
    status, body = await s.call("POST", "/api/zones", json={"name": zname(), "width": 5, "height": 5})
    assert_error(status, body, 401, "unauthorized")
    admin = await s.player(username="admin")
    await s.zone(admin["token"])


async def test_create_201(start_server, dsn):
    s = await debug_server(start_server, dsn)
    p = await s.player()
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    name = zname()
    meta = {"biome": "forest", "nested": {"list": [1, "two", None, True]}, "n": 1.5}
    status, z = await s.call("POST", "/api/zones", p["token"],
                             json={"name": name, "width": 40, "height": 30, "metadata": meta})
    assert status == 201, z
    assert set(z) >= ZONE_FIELDS
    assert str(uuid.UUID(z["id"])) == z["id"]
    assert (z["name"], z["width"], z["height"], z["metadata"]) == (name, 40, 30, meta)
    assert z["entity_count"] == 0 and z["subscriber_count"] == 0
    assert parse_iso(z["created_at"]) >= before and parse_iso(z["updated_at"]) >= before
    # metadata defaults to {}
    status, z2 = await s.call("POST", "/api/zones", p["token"], json={"name": zname(), "width": 1, "height": 1})
    assert status == 201 and z2["metadata"] == {}, z2
    # it is in the database at once
    rows = db_rows(dsn, f"SELECT name, width, height FROM zones WHERE id = '{z['id']}'")
    assert rows == [(name, 40, 30)]


async def test_create_boundaries_accepted(start_server, dsn):
    s = await debug_server(start_server, dsn, server_max_zone_size=100)
    p = await s.player()
    for body in ({"name": "n" * 64, "width": 100, "height": 100},
                 {"name": "x", "width": 1, "height": 100},
                 {"name": "名前 with spaces & symbols!", "width": 100, "height": 1}):
        status, z = await s.call("POST", "/api/zones", p["token"], json=body)
        assert status == 201, (body, z)
        assert z["name"] == body["name"]


BAD_CREATES = [
    ({"name": "", "width": 5, "height": 5}, "name"),
    ({"name": "n" * 65, "width": 5, "height": 5}, "name"),
    ({"name": 123, "width": 5, "height": 5}, "name"),
    ({"name": None, "width": 5, "height": 5}, "name"),
    ({"name": ["a"], "width": 5, "height": 5}, "name"),
    ({"width": 5, "height": 5}, "name"),
    ({"name": "ok", "height": 5}, "width"),
    ({"name": "ok", "width": 5}, "height"),
    ({"name": "ok", "width": 0, "height": 5}, "width"),
    ({"name": "ok", "width": 5, "height": 0}, "height"),
    ({"name": "ok", "width": -1, "height": 5}, "width"),
    ({"name": "ok", "width": 5, "height": -3}, "height"),
    ({"name": "ok", "width": 101, "height": 5}, "width"),
    ({"name": "ok", "width": 5, "height": 101}, "height"),
    ({"name": "ok", "width": 10 ** 30, "height": 5}, "width"),
    ({"name": "ok", "width": 5.5, "height": 5}, "width"),
    ({"name": "ok", "width": 5, "height": 5.0}, "height"),
    ({"name": "ok", "width": True, "height": 5}, "width"),
    ({"name": "ok", "width": 5, "height": False}, "height"),
    ({"name": "ok", "width": "5", "height": 5}, "width"),
    ({"name": "ok", "width": 5, "height": "tall"}, "height"),
    ({"name": "ok", "width": None, "height": 5}, "width"),
    ({"name": "ok", "width": 5, "height": 5, "metadata": []}, "metadata"),
    ({"name": "ok", "width": 5, "height": 5, "metadata": "x"}, "metadata"),
    ({"name": "ok", "width": 5, "height": 5, "metadata": 1}, "metadata"),
    ({"name": "ok", "width": 5, "height": 5, "metadata": None}, "metadata"),
]


async def test_create_400(start_server, dsn):
    s = await debug_server(start_server, dsn, server_max_zone_size=100, server_max_body_size=1024)
    p = await s.player()
    for body, field in BAD_CREATES:
        status, resp = await s.call("POST", "/api/zones", p["token"], json=body)
        assert_error(status, resp, 400, "bad_request", field)
    hdr = {"Content-Type": "application/json"}
    for raw in (b"not json", b"[]", b"", b"null", b'{"name": "ok", "width": 5, "height": 5, "metadata": {"a": '):
        status, resp = await s.call("POST", "/api/zones", p["token"], data=raw, headers=hdr)
        assert_error(status, resp, 400, "bad_request")
    status, resp = await s.call("POST", "/api/zones", p["token"],
                                json={"name": "big", "width": 5, "height": 5, "metadata": {"x": "y" * 2000}})
    assert_error(status, resp, 400, "bad_request")
    # none of them created anything
    assert (await s.call("GET", "/api/zones", p["token"]))[1] == {"zones": []}
    assert db_rows(dsn, "SELECT count(*) FROM zones") == [(0,)]


async def test_create_409_name_taken(start_server, dsn):
    s = await debug_server(start_server, dsn)
    p = await s.player()
    z = await s.zone(p["token"], name="arena")
    status, body = await s.call("POST", "/api/zones", p["token"], json={"name": "arena", "width": 9, "height": 9})
    assert_error(status, body, 409, "zone_name_taken")
    # the name is free again once the zone is deleted
    assert (await s.call("DELETE", f"/api/zones/{z['id']}", p["token"]))[0] == 204
    await s.zone(p["token"], name="arena")


async def test_create_409_under_concurrency(start_server, dsn):
    s = await debug_server(start_server, dsn)
    p = await s.player()
    name = zname()
    results = await asyncio.gather(*(
        s.call("POST", "/api/zones", p["token"], json={"name": name, "width": 5 + i, "height": 5})
        for i in range(10)))
    assert sorted(st for st, _ in results) == [201] + [409] * 9, results
    for st, body in results:
        if st == 409:
            assert body["error"] == "zone_name_taken", body
    winner = next(body for st, body in results if st == 201)
    _, listing = await s.call("GET", "/api/zones", p["token"])
    assert [z["id"] for z in listing["zones"]] == [winner["id"]]
    assert [str(r[0]) for r in db_rows(dsn, "SELECT id FROM zones")] == [winner["id"]]
    assert db_rows(dsn, "SELECT count(*) FROM zones") == [(1,)]


# --------------------------------------------------------------------------- delete

async def test_delete_404_when_debug_off(start_server, dsn):
    # a zone made while debug was on, then the server restarted with debug off
    s = await debug_server(start_server, dsn)
    p = await s.player()
    z = await s.zone(p["token"])
    s2 = await debug_server(start_server, dsn, server_debug=False)
    _, login = await s2.call("POST", "/api/auth/login", json={"username": p["username"], "password": p["password"]})
    status, body = await s2.call("DELETE", f"/api/zones/{z['id']}", login["token"])
    assert_error(status, body, 404, "not_found")
    status, body = await s2.call("GET", f"/api/zones/{z['id']}", login["token"])
    assert status == 200, body


async def test_delete_403_for_non_debug_player(start_server, dsn):
    s = await debug_server(start_server, dsn, server_debug_players="admin")
    admin = await s.player(username="admin")
    p = await s.player()
    z = await s.zone(admin["token"])
    assert_error(*(await s.call("DELETE", f"/api/zones/{z['id']}", p["token"])), 403, "forbidden")
    assert_error(*(await s.call("DELETE", f"/api/zones/{z['id']}")), 401, "unauthorized")
    assert (await s.call("GET", f"/api/zones/{z['id']}", p["token"]))[0] == 200


async def test_delete_unknown_404(start_server, dsn):
    s = await debug_server(start_server, dsn)
    p = await s.player()
    assert_error(*(await s.call("DELETE", f"/api/zones/{uuid.uuid4()}", p["token"])), 404, "zone_not_found")
    z = await s.zone(p["token"])
    assert (await s.call("DELETE", f"/api/zones/{z['id']}", p["token"]))[0] == 204
    # deleting twice: the second time it is unknown
    assert_error(*(await s.call("DELETE", f"/api/zones/{z['id']}", p["token"])), 404, "zone_not_found")


async def test_delete_204_removes_zone_and_entities(start_server, dsn):
    s = await debug_server(start_server, dsn)
    p = await s.player()
    doomed = await s.zone(p["token"], width=20, height=20)
    kept = await s.zone(p["token"], width=20, height=20)
    world = s.srv.world
    for i in range(5):
        create_entity(world, uuid.UUID(doomed["id"]), i, i, 1, 1, {"i": i})
    create_entity(world, uuid.UUID(kept["id"]), 3, 3, 2, 2, {"keep": True})
    await s.srv.persister.flush()
    count = "SELECT count(*) FROM entities WHERE zone_id = '{}'"
    assert db_rows(dsn, count.format(doomed["id"])) == [(5,)]
    assert db_rows(dsn, count.format(kept["id"])) == [(1,)]
    status, body = await s.call("GET", f"/api/zones/{doomed['id']}", p["token"])
    assert status == 200 and body["entity_count"] == 5, body

    status, body = await s.call("DELETE", f"/api/zones/{doomed['id']}", p["token"])
    assert status == 204, body
    assert body is None
    _, listing = await s.call("GET", "/api/zones", p["token"])
    assert [z["id"] for z in listing["zones"]] == [kept["id"]]
    assert_error(*(await s.call("GET", f"/api/zones/{doomed['id']}", p["token"])), 404, "zone_not_found")
    # gone from the database at once, entities included; the other zone untouched
    assert db_rows(dsn, count.format(doomed["id"])) == [(0,)]
    assert db_rows(dsn, f"SELECT count(*) FROM zones WHERE id = '{doomed['id']}'") == [(0,)]
    assert db_rows(dsn, count.format(kept["id"])) == [(1,)]
    # and a later flush does not bring anything back
    await s.srv.persister.flush()
    assert db_rows(dsn, count.format(doomed["id"])) == [(0,)]
    assert db_rows(dsn, "SELECT count(*) FROM entities") == [(1,)]


async def test_delete_unflushed_entities_never_reach_database(start_server, dsn):
    s = await debug_server(start_server, dsn)
    p = await s.player()
    z = await s.zone(p["token"])
    for i in range(3):
        create_entity(s.srv.world, uuid.UUID(z["id"]), i, 0, 1, 1, {})
    assert (await s.call("DELETE", f"/api/zones/{z['id']}", p["token"]))[0] == 204
    await s.srv.persister.flush()
    assert db_rows(dsn, "SELECT count(*) FROM entities") == [(0,)]


async def test_delete_notifies_subscribers(start_server, dsn):
    s = await debug_server(start_server, dsn, tick_interval=0.05)
    p = await s.player()
    z = await s.zone(p["token"])
    async with s.http.ws_connect(s.ws_url(p["token"])) as ws:
        await ws.send_json({"type": "subscribe", "zone_id": z["id"]})

        async def next_of(kind):
            while True:
                msg = await asyncio.wait_for(ws.receive(), scaled(5))
                assert msg.type == WSMsgType.TEXT, msg
                data = msg.json()
                if data.get("type") == kind:
                    return data

        assert (await next_of("subscribed"))["zone_id"] == z["id"]
        _, body = await s.call("GET", f"/api/zones/{z['id']}", p["token"])
        assert body["subscriber_count"] == 1, body
        assert (await s.call("DELETE", f"/api/zones/{z['id']}", p["token"]))[0] == 204
        err = await next_of("error")
        assert err["code"] == "zone_deleted", err
        # unsubscribed: intents now get not_subscribed, and the connection is still open
        await ws.send_json({"type": "intent", "data": {"x": 1}})
        err = await next_of("error")
        assert err["code"] == "not_subscribed", err
        await ws.send_json({"type": "ping"})
        await next_of("pong")
