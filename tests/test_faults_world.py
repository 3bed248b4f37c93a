"""The fault suite, the world's part: promises about what players can do to zones, their
entities and their queues, each proved against a real ``python gridserver.py`` process
attacked over real sockets (see ``tests/test_faults.py`` for the suite's conventions).

* An entity a module moves from one zone to another (deleted there, created here with the
  same id) is saved as moved, and deleting either zone deletes exactly what memory holds.
* Subscribe/unsubscribe floods neither plant entities through the join and leave hooks nor
  stop a zone.
* The per-player intent limit holds across reconnects, and a zone's queue is bounded.
* Intents whose data the server could not serialize again are refused at the door.

Every wait is bounded; every process is stopped by the ``processes`` fixture.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import os
import signal
import time

import aiohttp
import pytest
from aiohttp import WSMsgType

from fault_games import Traveller, nested_dict
from faultkit import Client, RawWS, ServerProcess, TickReader, client_frame, figure, start
from helpers import db_rows, dsn_with_schema, scaled, wait_for

#: A soak run (bench/soak.py) multiplies the floods' reconnects.
SOAK_ROUNDS = int(os.environ.get("GRIDSERVER_SOAK_ROUNDS", "1"))

TRAVELLER = "tests.fault_games:Traveller"
COUNTER = "tests.fault_games:Counter"
TID = str(Traveller.ID)

pytestmark = pytest.mark.slow


async def stop_gracefully(srv: ServerProcess) -> None:
    """SIGTERM (the final flush) and a clean exit."""
    srv.send(signal.SIGTERM)
    code = await srv.wait_exit()
    assert code == 0, f"exit code {code}:\n{srv.log_text()[-3000:]}"


async def drain_until(ws: RawWS, kind: str, timeout: float = 10.0) -> dict:
    return await ws.until(lambda m: m["type"] == kind, timeout=timeout)


async def zone_state(c: Client, token: str, zone_id: str) -> dict:
    status, body = await c.call("GET", f"/api/debug/zones/{zone_id}/state", token)
    assert status == 200, body
    return body


# ---------------------------------------------------------------------------------------------
# An entity moved between zones is saved as moved
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=["postgres", "sqlite"])
def world_dsn(request, tmp_path):
    """A fresh database on each backend: a PostgreSQL schema or a SQLite file."""
    if request.param == "postgres":
        return dsn_with_schema(request.getfixturevalue("pg_schema"))
    return f"sqlite:///{tmp_path / 'db'}"


def _instant(value) -> dt.datetime:
    """A timestamp as the database or the debug route gives it (datetime or ISO text)."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.astimezone(dt.timezone.utc)


async def _traveller(c: Client, token: str) -> dict | None:
    status, body = await c.call("GET", f"/api/debug/entities/{TID}", token)
    if status == 404:
        return None
    assert status == 200, body
    return body


async def _traveller_in(c: Client, token: str, zone_id: str) -> bool:
    found = await _traveller(c, token)
    return found is not None and found["zone_id"] == zone_id


async def _send(port: int, token: str, zone_id: str, data: dict) -> None:
    """Subscribe to ``zone_id``, send one intent, leave (the intent stays queued)."""
    ws = await RawWS.connect(port, token)
    try:
        await ws.send_json({"type": "subscribe", "zone_id": zone_id})
        # (after a restart the player may first be put back where they were: "resumed")
        await ws.until(lambda m: m["type"] == "subscribed" and not m.get("resumed"), timeout=10.0)
        await ws.send_json({"type": "intent", "data": data})
        assert await ws.pong_after() == []  # taken without an error
    finally:
        ws.abort()


async def test_an_entity_moved_between_zones_is_saved_as_moved(world_dsn, tmp_path, http, processes):
    """A module moves an entity from zone a to zone b (deleted in a, created with the same id
    in b) within one flush window: after SIGTERM the database row says zone b with the
    created_at memory showed, a restart loads it in b, and deleting zone a leaves it alone.
    Moved on into a new zone c that is deleted before any flush, it is gone for good: it does
    not come back in b after a restart."""
    dsn = world_dsn
    settings = {"persistence_interval": 60}  # only SIGTERM's final flush writes

    def run() -> ServerProcess:
        return start(processes, tmp_path, dsn, TRAVELLER, settings)

    # 1. Spawned in zone a, saved there by the final flush.
    srv = run()
    await srv.ready(http)
    c = Client(srv.url, http)
    p = await c.player()
    token = p["token"]
    zones = await c.zones(token)
    a, b = zones["a"]["id"], zones["b"]["id"]
    await _send(srv.port, token, a, {"spawn": True})
    await wait_for(lambda: _traveller_in(c, token, a), timeout=10, what="the traveller in zone a")
    spawned = await _traveller(c, token)
    await stop_gracefully(srv)
    assert [str(r[0]) for r in db_rows(dsn, f"SELECT zone_id FROM entities WHERE id = '{TID}'")] == [a]

    # 2. Moved to zone b (a delete and a create of the same id in one flush window).
    srv = run()
    await srv.ready(http)
    c = Client(srv.url, http)
    assert await _traveller_in(c, token, a)
    await _send(srv.port, token, a, {"to": "b"})
    await wait_for(lambda: _traveller_in(c, token, b), timeout=10, what="the traveller in zone b")
    moved = await _traveller(c, token)
    assert moved["created_at"] != spawned["created_at"]  # created again, by zone b
    await stop_gracefully(srv)
    rows = db_rows(dsn, f"SELECT zone_id, created_at FROM entities WHERE id = '{TID}'")
    assert len(rows) == 1, rows
    saved_zone, saved_created = str(rows[0][0]), _instant(rows[0][1])
    assert saved_zone == b, f"saved in zone {saved_zone} (a is {a}), memory had zone b {b}"
    skew = abs((saved_created - _instant(moved["created_at"])).total_seconds())
    assert skew < 0.01, (rows[0][1], moved["created_at"])

    # 3. Loaded in b; deleting zone a does not touch it, before or after a restart.
    srv = run()
    await srv.ready(http)
    c = Client(srv.url, http)
    assert await _traveller_in(c, token, b)
    status, body = await c.call("DELETE", f"/api/zones/{a}", token)
    assert status == 204, body
    assert await _traveller_in(c, token, b)
    assert [str(r[0]) for r in db_rows(dsn, f"SELECT zone_id FROM entities WHERE id = '{TID}'")] == [b]
    await stop_gracefully(srv)
    srv = run()
    await srv.ready(http)
    c = Client(srv.url, http)
    assert await _traveller_in(c, token, b), "the traveller went with zone a"

    # 4. Moved on into a new zone c, which is deleted before any flush: gone for good.
    status, zone_c = await c.call("POST", "/api/zones", token, {"name": "c", "width": 16, "height": 16})
    assert status == 201, zone_c
    await _send(srv.port, token, b, {"to": "c"})
    await wait_for(lambda: _traveller_in(c, token, zone_c["id"]), timeout=10, what="the traveller in zone c")
    status, body = await c.call("DELETE", f"/api/zones/{zone_c['id']}", token)
    assert status == 204, body
    assert await _traveller(c, token) is None
    await stop_gracefully(srv)
    srv = run()
    await srv.ready(http)
    c = Client(srv.url, http)
    back = await _traveller(c, token)
    assert back is None, f"the traveller came back after its zone c was deleted: {back}"
    assert db_rows(dsn, f"SELECT zone_id FROM entities WHERE id = '{TID}'") == []
    await stop_gracefully(srv)
    backend = "sqlite" if dsn.startswith("sqlite") else "postgres"
    figure(f"moved entity ({backend}): created_at saved vs memory, ms", round(skew * 1000, 3))


# ---------------------------------------------------------------------------------------------
# Subscribe/unsubscribe floods cannot plant entities or stop a zone
# ---------------------------------------------------------------------------------------------


def _pairs(zone_id: str, n: int) -> bytes:
    sub = client_frame(json.dumps({"type": "subscribe", "zone_id": zone_id}).encode())
    unsub = client_frame(b'{"type": "unsubscribe"}')
    return (sub + unsub) * n  # client_frame masks with a random key; repeating one is still valid


async def test_subscribe_floods_cannot_plant_avatars_or_stop_a_zone(tmp_path, http, processes):
    """With the walkers game (an avatar per player who joins, removed when they leave): one
    write of 1,500 subscribe/unsubscribe pairs, then 20 reconnects of 500 pairs each while the
    tick is paused. Afterwards the lobby holds at most one avatar per member and none of a
    player who is not one, the zone has no error, another player keeps getting ticks, the
    flood got rate_limited and the refusals are counted. A player who subscribes and
    unsubscribes within one paused tick never gets an avatar."""
    srv = start(processes, tmp_path, f"sqlite:///{tmp_path / 'db'}", "game_modules.walkers",
                {"tick_interval": 0.05}, {"fog_radius": 0})
    await srv.ready(http)
    c = Client(srv.url, http)
    victim_p, attacker, passer = await c.player(), await c.player(), await c.player()
    token = victim_p["token"]
    lobby = (await c.zones(token))["lobby"]["id"]
    victim = await TickReader(http, c, token, lobby).start()
    errors: collections.Counter = collections.Counter()
    t0 = time.monotonic()
    try:
        before = await c.metrics()
        # 1. One write of 1,500 pairs, the tick running.
        ws = await RawWS.connect(srv.port, attacker["token"])
        ws.send_raw(_pairs(lobby, 1500))
        for m in await ws.pong_after(timeout=30):
            if m["type"] == "error":
                errors[m["code"]] += 1
        ws.abort()
        # 2. Paused: 20 reconnects of 500 pairs each, and a player who comes and goes.
        status, _ = await c.call("POST", "/api/debug/tick/pause", token)
        assert status == 200
        for _ in range(20 * SOAK_ROUNDS):
            ws = await RawWS.connect(srv.port, attacker["token"])
            ws.send_raw(_pairs(lobby, 500))
            for m in await ws.pong_after(timeout=30):
                if m["type"] == "error":
                    errors[m["code"]] += 1
            ws.abort()
        quick = await RawWS.connect(srv.port, passer["token"])
        await quick.send_json({"type": "subscribe", "zone_id": lobby})
        await quick.send_json({"type": "unsubscribe"})
        assert [m["type"] for m in await quick.pong_after()] == ["subscribed", "unsubscribed"]
        paused_at = (await zone_state(c, token, lobby))["tick_number"]
        status, _ = await c.call("POST", "/api/debug/tick/resume", token)
        assert status == 200
        after_resume = await victim.new_ticks(10)
        flood_seconds = time.monotonic() - t0
        state = await zone_state(c, token, lobby)
        after = await c.metrics()
    finally:
        await victim.stop()
    avatars = collections.Counter(e["metadata"].get("player_id") for e in state["entities"]
                                  if e["metadata"].get("kind") == "avatar")
    members = set(state["members"])
    assert all(n == 1 for n in avatars.values()), f"players with several avatars: {avatars.most_common(3)}"
    assert set(avatars) <= members, (f"{len(avatars)} avatars, {len(set(avatars) - members)} of them of "
                                     f"players not in the zone (members: {len(members)})")
    assert avatars[victim_p["id"]] == 1
    assert passer["id"] not in avatars and passer["id"] not in members
    assert state["last_error"] is None, state["last_error"]
    assert all(t > paused_at for t in after_resume) and len(set(after_resume)) >= 10
    assert not victim.gaps(since=paused_at + 1), victim.gaps(since=paused_at + 1)[:5]
    assert errors["rate_limited"] >= 1 and set(errors) == {"rate_limited"}, errors
    dropped = after["gridserver_subscribes_dropped_total"] - before["gridserver_subscribes_dropped_total"]
    assert dropped >= 20_000, dropped
    figure("subscribe flood: subscribes and unsubscribes sent", 2 * (1500 + 20 * SOAK_ROUNDS * 500) + 2)
    figure("subscribe flood: refused (subscribes_dropped_total)", int(dropped))
    figure("subscribe flood: avatars in the lobby afterwards / members", f"{sum(avatars.values())} / {len(members)}")
    figure("subscribe flood: seconds for the whole flood", round(flood_seconds, 2))


# ---------------------------------------------------------------------------------------------
# The per-player intent limit holds across reconnects; a zone's queue is bounded
# ---------------------------------------------------------------------------------------------


async def test_intent_limits_hold_across_reconnects_and_per_zone(tmp_path, http, processes):
    """Tick paused. One player reconnects 100 times (each reconnect resumes the zone) and sends
    10 intents of 60 KB on each connection: the zone holds 10 of them, not 1,000, and the
    process's memory does not grow by the 60 MB sent. In a second zone, with
    max_intents_per_zone = 25, five players send 10 each: the zone holds 25 and the players
    past it are told rate_limited."""
    srv = start(processes, tmp_path, f"sqlite:///{tmp_path / 'db'}", COUNTER,
                {"tick_interval": 0.05, "tick_max_intents_per_zone": 25}, {"zones": 2, "entities": 1, "size": 8})
    await srv.ready(http)
    c = Client(srv.url, http)
    admin, flooder = await c.player(), await c.player()
    others = [await c.player() for _ in range(5)]
    token = admin["token"]
    zones = await c.zones(token)
    first, second = zones["counter-0"]["id"], zones["counter-1"]["id"]
    status, _ = await c.call("POST", "/api/debug/tick/pause", token)
    assert status == 200
    pad = "x" * 60_000
    big = json.dumps({"type": "intent", "data": {"spawn": 1, "pad": pad}})
    assert len(big) < 65536
    errors: collections.Counter = collections.Counter()

    async def connection(i: int) -> None:
        ws = await RawWS.connect(srv.port, flooder["token"])
        try:
            if i == 0:
                await ws.send_json({"type": "subscribe", "zone_id": first})
                m = await drain_until(ws, "subscribed")
            else:
                m = await drain_until(ws, "subscribed")
                assert m == {"type": "subscribed", "zone_id": first, "resumed": True}, m
            for _ in range(10):
                await ws.send(big)
            for m in await ws.pong_after(timeout=30):
                errors[m.get("code", m["type"])] += 1
        finally:
            ws.drop()

    await connection(0)
    rss0 = srv.rss()
    reconnects = 100 * SOAK_ROUNDS
    for i in range(1, reconnects):
        await connection(i)
    rss1 = srv.rss()
    pending = (await zone_state(c, token, first))["pending_intents"]
    assert pending <= 10, f"the zone holds {pending} intents of one player (the limit is 10 per tick)"
    assert errors["rate_limited"] >= 1 and set(errors) == {"rate_limited"}, errors
    growth = (rss1 - rss0) / 2 ** 20
    sent_mib = (reconnects - 1) * 10 * len(big) / 2 ** 20
    assert growth < sent_mib / 4, f"resident memory grew by {growth:.1f} MiB while {sent_mib:.0f} MiB was refused"

    # The zone's queue: 25 at most, whoever sends.
    told = []
    for p in others:
        ws = await RawWS.connect(srv.port, p["token"])
        try:
            await ws.send_json({"type": "subscribe", "zone_id": second})
            await drain_until(ws, "subscribed")
            for i in range(10):
                await ws.send_json({"type": "intent", "data": {"spawn": i}})
            seen = await ws.pong_after()
            assert all(m["type"] == "error" and m["code"] == "rate_limited" for m in seen), seen
            told.append(len(seen))
        finally:
            ws.drop()
    zone2 = await zone_state(c, token, second)
    assert zone2["pending_intents"] == 25, zone2["pending_intents"]
    assert told == [0, 0, 1, 1, 1], told  # the third player filled it; one error per player per tick

    # Both zones tick on with what they hold.
    status, _ = await c.call("POST", "/api/debug/tick/resume", token)
    assert status == 200
    for zone_id in (first, second):
        await wait_for(lambda: _ticked_clean(c, token, zone_id), timeout=10, what="the zone ticking again")
    figure(f"intent limits: intents of 60 KB sent over {reconnects} connections of one player", reconnects * 10)
    figure("intent limits: intents the zone held for that player", pending)
    figure(f"intent limits: resident memory growth in MiB while {sent_mib:.0f} MiB was refused", round(growth, 1))


async def _ticked_clean(c: Client, token: str, zone_id: str) -> bool:
    state = await zone_state(c, token, zone_id)
    assert state["last_error"] is None, state["last_error"]
    return state["pending_intents"] == 0 and state["ticks"] > 0


# ---------------------------------------------------------------------------------------------
# Intents the server could not serialize again are refused at the door
# ---------------------------------------------------------------------------------------------


def _nested_list(depth: int) -> str:
    """JSON text of ``data`` nested ``depth`` deep: ``data`` itself and depth - 1 lists in it."""
    return '{"a": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


#: (what, the intent's data as JSON text, a word the error must hold)
UNSERIALIZABLE = [
    ("NaN", '{"v": NaN}', "NaN"),
    ("Infinity", '{"v": Infinity}', "Infinity"),
    ("-Infinity", '{"v": [1, -Infinity]}', "Infinity"),
    ("1e999", '{"v": 1e999}', "too large"),
    ("a 400-digit number with a fraction", '{"v": ' + "9" * 400 + ".0}", "too large"),
    ("an integer of 401 digits", '{"v": {"w": ' + "9" * 401 + "}}", "too large"),
    ("nested 33 deep", json.dumps(nested_dict(33)), "deeper than 32"),
    ("nested 1,000 deep", _nested_list(1000), "deeper than 32"),
]


async def test_unserializable_intents_are_refused_at_the_door(tmp_path, http, processes):
    """Intents holding NaN, Infinity, numbers too large for a double or nesting deeper than
    [websocket] max_depth get bad_message naming the problem; a normal intent and one nested
    exactly 32 deep are echoed by the next tick; the zone never fails a tick: the sender and
    another player keep getting every tick, and the refusals are counted."""
    srv = start(processes, tmp_path, f"sqlite:///{tmp_path / 'db'}", "game_modules.echo", {"tick_interval": 0.05})
    await srv.ready(http)
    c = Client(srv.url, http)
    sender, other = await c.player(), await c.player()
    status, zone = await c.call("POST", "/api/zones", sender["token"], {"name": "echoes", "width": 8, "height": 8})
    assert status == 201, zone
    reader = await TickReader(http, c, other["token"], zone["id"]).start()
    try:
        before = await c.metrics()
        first_tick = reader.numbers[-1]
        ws = await RawWS.connect(srv.port, sender["token"])
        await ws.send_json({"type": "subscribe", "zone_id": zone["id"]})
        await drain_until(ws, "subscribed")
        for name, data, word in UNSERIALIZABLE:
            text = '{"type": "intent", "data": ' + data + "}"
            assert len(text) < 65536
            await ws.send(text)
            try:
                answer = await ws.until(lambda m: m["type"] != "tick", timeout=5)
            except asyncio.TimeoutError:
                raise AssertionError(f"{name}: no answer within {scaled(5):g} s (the intent was queued)") from None
            assert answer["type"] == "error" and answer["code"] == "bad_message", (name, answer)
            assert word in answer["message"], (name, answer["message"])
        deep = nested_dict(32)
        await ws.send_json({"type": "intent", "data": {"hello": "world", "n": 1}})
        await ws.send_json({"type": "intent", "data": deep})

        async def echoes() -> list:
            echoed: list = []
            while len(echoed) < 2:  # in the next tick, or the one after if a tick fell between them
                m = await ws.until(lambda m: m["type"] == "tick")
                echoed += [i["data"] for i in m["state"]["intents"]]
            return echoed

        echoed = await asyncio.wait_for(echoes(), scaled(10))
        assert echoed == [{"hello": "world", "n": 1}, deep], echoed
        sender_ticks = []
        while len(sender_ticks) < 10:
            m = await ws.until(lambda m: m["type"] == "tick", timeout=5)
            sender_ticks.append(m["tick_number"])
        ws.abort()
        await reader.new_ticks(5)
        state = await zone_state(c, sender["token"], zone["id"])
        after = await c.metrics()
    finally:
        await reader.stop()
    assert state["last_error"] is None and state["errors"] == 0, state["last_error"]
    assert sender_ticks == list(range(sender_ticks[0], sender_ticks[0] + 10)), sender_ticks
    assert not reader.gaps(since=first_tick), f"the other player missed ticks: {reader.gaps(since=first_tick)[:5]}"
    assert not reader.other, reader.other[:3]
    refused = after["gridserver_bad_intents_total"] - before["gridserver_bad_intents_total"]
    assert refused == len(UNSERIALIZABLE), refused
    figure("unserializable intents refused (bad_intents_total)", int(refused))
