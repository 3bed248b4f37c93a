"""End to end over real WebSockets: hub (connections, subscriptions, outboxes), tick engine,
WebSocket handler, and the game modules that ship with gridserver.

Every test runs a real server on a real socket. Most use a SQLite file in ``tmp_path`` for
speed; the restart test runs on both backends. Waits poll (``wait_for``) or count ticks,
bounded by timeouts that ``GRIDSERVER_TEST_TIMEOUT_FACTOR`` scales, and never assert on
durations (except the cadence test, which measures the spacing of the ticks received).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import threading
import time
import uuid

import aiohttp
import pytest
from aiohttp import WSMsgType

import gridserver
from helpers import make_config, scaled, stop_server, wait_for
from gridserver import EntityCreate, EntityUpdate, TickResult

# ---------------------------------------------------------------------------------------------
# A test game module and helpers
# ---------------------------------------------------------------------------------------------


class Lab:
    """A game module that records what it is given and misbehaves per zone name on request.

    Each zone gets one 1x1 entity (metadata ``{"n": 0}``) on its first tick; later ticks bump
    ``n``. The broadcast state names the zone and echoes the tick's intents.
    """

    def __init__(self, big: int = 0):
        self.fw = None
        self.big = big
        self.intents: list = []
        self.joins: list = []
        self.leaves: list = []
        self.raise_in: set[str] = set()
        self.invalid_in: set[str] = set()
        self.sleep_in: dict[str, float] = {}  # zone name -> seconds, once
        self.delay_in: dict[str, float] = {}  # zone name -> seconds, every tick
        self.slept: list = []  # (zone name, monotonic start, monotonic end)
        self.lock = threading.Lock()

    def on_init(self, framework):
        self.fw = framework

    def on_player_join(self, zone_id, player_id):
        self.joins.append((zone_id, player_id))

    def on_player_leave(self, zone_id, player_id):
        self.leaves.append((zone_id, player_id))

    def on_tick(self, zone_id, entities, intents, tick_number):
        zone = self.fw.get_zone(zone_id)
        with self.lock:
            self.intents.extend(intents)
        if zone.name in self.raise_in:
            raise RuntimeError(f"boom in {zone.name}")
        seconds = self.sleep_in.pop(zone.name, None) or self.delay_in.get(zone.name)
        if seconds:
            t0 = time.monotonic()
            time.sleep(seconds)
            self.slept.append((zone.name, t0, time.monotonic()))
        state = {"zone": zone.name, "tick": tick_number, "intents": [i.data for i in intents]}
        if self.big:
            state["pad"] = "x" * self.big
        if not entities:
            state["n"] = 0
            return TickResult(entity_creates=[EntityCreate(0, 0, 1, 1, {"n": 0})], broadcast_state=state)
        e = entities[0]
        if zone.name in self.invalid_in:  # valid changes, then one out of bounds: all must be rejected
            return TickResult(
                entity_creates=[EntityCreate(2, 2, 1, 1, {"bad": True})],
                entity_updates=[EntityUpdate(e.id, x=1, metadata={"n": -1}), EntityUpdate(e.id, x=zone.width)],
                broadcast_state=state)
        state["n"] = e.metadata["n"] + 1
        return TickResult(entity_updates=[EntityUpdate(e.id, metadata={"n": state["n"]})], broadcast_state=state)

    def get_player_state(self, zone_id, player_id, full_state):
        return full_state


def sqlite_dsn(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'db'}"


def lab_config(tmp_path, **overrides) -> gridserver.Config:
    values = {"server_debug": True, "tick_interval": 0.05}
    values.update(overrides)
    return make_config(sqlite_dsn(tmp_path), **values)


def walkers_config(tmp_path, dsn: str, fog_radius: int = 0, **overrides) -> gridserver.Config:
    """The walkers game configured through its own INI section, as an operator would."""
    ini = tmp_path / "walkers.ini"
    ini.write_text(
        f"[database]\ndsn = {dsn}\n"
        "[auth]\nbcrypt_rounds = 4\n"
        "[tick]\ninterval = 0.05\n"
        f"[game_modules.walkers]\nfog_radius = {fog_radius}\nwalls = 0\nitems = 0\nlobby_size = 40\n")
    cfg = gridserver.Config.load(str(ini), environ={})
    values = {"server_port": 0, "persistence_interval": 0.2, "websocket_heartbeat": 5.0, "server_debug": True}
    values.update(overrides)
    return cfg.with_values(**values)


async def connect(running, token: str) -> aiohttp.ClientWebSocketResponse:
    return await running.http.ws_connect(running.ws_url(token))


async def recv(ws, timeout: float = 5.0) -> dict:
    """The next message as JSON; fails on a close or a non-text frame (``timeout`` is scaled)."""
    return await _recv(ws, scaled(timeout))


async def _recv(ws, seconds: float) -> dict:
    msg = await ws.receive(timeout=seconds)
    assert msg.type == WSMsgType.TEXT, (msg.type, msg.data)
    return json.loads(msg.data)


async def until(ws, pred, timeout: float = 5.0) -> tuple[dict, list]:
    """Read until a message satisfies ``pred``; returns it and the messages read before it."""
    loop = asyncio.get_running_loop()
    limit = scaled(timeout)
    deadline = loop.time() + limit
    seen: list = []
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"no matching message within {limit:g} s; last ones: {seen[-3:]}")
        try:
            m = await _recv(ws, left)
        except asyncio.TimeoutError:
            continue
        if pred(m):
            return m, seen
        seen.append(m)


async def subscribe(ws, zone_id: str) -> list:
    """Subscribe and wait for the answer; returns the messages that came before it."""
    await ws.send_json({"type": "subscribe", "zone_id": zone_id})
    answer, before = await until(ws, lambda m: m["type"] != "tick")
    assert answer == {"type": "subscribed", "zone_id": zone_id}, answer
    return before


def is_tick(zone_id: str | None = None):
    return lambda m: m["type"] == "tick" and (zone_id is None or m["zone_id"] == zone_id)


async def read_for_ticks(running, ws, n: int, timeout: float = 10.0) -> list:
    """Every message that arrives while the engine runs ``n`` more ticks (plus what is in flight)."""
    engine = running.srv.engine
    target = engine.tick_number + n
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(timeout)
    out = []
    while engine.tick_number < target:
        assert loop.time() < deadline, "the engine stopped ticking"
        try:
            out.append(await _recv(ws, 0.05))
        except asyncio.TimeoutError:
            pass
    end = loop.time() + scaled(0.1)  # what the last tick sent is still on its way
    while (left := end - loop.time()) > 0:
        try:
            out.append(await _recv(ws, left))
        except asyncio.TimeoutError:
            break
    return out


async def pong(ws) -> list:
    """Send a ping and read up to its pong: every earlier message has been handled by then."""
    await ws.send_json({"type": "ping"})
    _, before = await until(ws, lambda m: m["type"] == "pong")
    return before


async def close_code(ws, timeout: float = 5.0) -> int:
    """Read (skipping messages) until the server closes the socket; its close code."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(timeout)
    while loop.time() < deadline:
        try:
            msg = await ws.receive(timeout=deadline - loop.time())
        except asyncio.TimeoutError:
            break
        if msg.type == WSMsgType.CLOSE:
            return msg.data
        if msg.type in (WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
            return ws.close_code
    raise AssertionError("the server did not close the socket")


async def metric(running, name: str) -> float:
    status, text = await running.call("GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


async def zone_state(running, token: str, zone_id: str) -> dict:
    status, body = await running.call("GET", f"/api/debug/zones/{zone_id}/state", token)
    assert status == 200, body
    return body


async def step(running, token: str) -> int:
    status, body = await running.call("POST", "/api/debug/tick/step", token)
    assert status == 200, body
    return body["tick_number"]


# ---------------------------------------------------------------------------------------------
# Authentication of /ws
# ---------------------------------------------------------------------------------------------


async def test_ws_refused_without_valid_token_and_accepts_query_or_header(start_server, tmp_path):
    running = await start_server(lab_config(tmp_path), Lab())
    p = await running.player()
    bare = running.ws_url("x").split("?")[0]
    for url, headers in ((bare, {}), (bare + "?token=nope", {}), (bare + "?token=", {}),
                         (bare, {"Authorization": "Bearer nope"})):
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await running.http.ws_connect(url, headers=headers)
        assert err.value.status == 401, (url, headers)

    ws = await running.http.ws_connect(running.ws_url(p["token"]))
    assert await pong(ws) == []
    await ws.close()
    ws = await running.http.ws_connect(bare, headers={"Authorization": f"Bearer {p['token']}"})
    assert await pong(ws) == []
    await ws.close()


# ---------------------------------------------------------------------------------------------
# Subscribing, intents and ticks
# ---------------------------------------------------------------------------------------------


def avatar(state: dict, player_id: str) -> dict | None:
    for e in state.get("entities", []):
        if e.get("kind") == "avatar" and e.get("player_id") == player_id:
            return e
    return None


async def own_avatar_tick(ws, player_id: str, after: int = 0, timeout: float = 5.0) -> dict:
    m, _ = await until(ws, lambda m: m["type"] == "tick" and m["tick_number"] > after
                       and avatar(m["state"], player_id) is not None, timeout)
    return m


async def walk(ws, player_id: str, move: str, x_from: int) -> dict:
    """Send one move and wait until the avatar's x differs from ``x_from``; the new avatar."""
    await ws.send_json({"type": "intent", "data": {"move": move}})
    m, _ = await until(ws, lambda m: m["type"] == "tick" and (a := avatar(m["state"], player_id)) is not None
                       and a["x"] != x_from)
    return avatar(m["state"], player_id)


async def lobby_id(running, token: str) -> str:
    status, body = await running.call("GET", "/api/zones", token)
    assert status == 200, body
    (lobby,) = [z for z in body["zones"] if z["name"] == "lobby"]
    return lobby["id"]


async def test_walkers_avatar_appears_and_moves_right(start_server, tmp_path):
    running = await start_server(walkers_config(tmp_path, sqlite_dsn(tmp_path)))
    p = await running.player()
    zone_id = await lobby_id(running, p["token"])
    ws = await connect(running, p["token"])
    await subscribe(ws, zone_id)
    m = await own_avatar_tick(ws, p["id"])
    assert m["zone_id"] == zone_id and isinstance(m["tick_number"], int)
    a = avatar(m["state"], p["id"])
    if a["x"] == 39:  # spawned on the right edge: step left first
        a = await walk(ws, p["id"], "left", a["x"])
        assert a["x"] == 38
    x0, y0 = a["x"], a["y"]
    a = await walk(ws, p["id"], "right", x0)
    assert (a["x"], a["y"]) == (x0 + 1, y0)
    await ws.close()


async def test_test_module_sees_intents_and_ticks_show_them(start_server, tmp_path):
    game = Lab()
    running = await start_server(lab_config(tmp_path), game)
    p = await running.player()
    zone = await running.zone(p["token"], "arena")
    ws = await connect(running, p["token"])
    await subscribe(ws, zone["id"])
    await ws.send_json({"type": "intent", "data": {"say": "hi", "n": [1, 2]}})
    m, _ = await until(ws, lambda m: m["type"] == "tick" and m["state"]["intents"])
    assert m["zone_id"] == zone["id"]
    assert m["state"]["zone"] == "arena" and m["state"]["tick"] == m["tick_number"]
    assert m["state"]["intents"] == [{"say": "hi", "n": [1, 2]}]
    await ws.close()


async def test_intents_are_stamped_and_handed_over_in_arrival_order(start_server, tmp_path):
    game = Lab()
    running = await start_server(lab_config(tmp_path, tick_paused=True), game)
    a, b = await running.player(), await running.player()
    zone = await running.zone(a["token"], "arena")
    wa, wb = await connect(running, a["token"]), await connect(running, b["token"])
    await subscribe(wa, zone["id"])
    await subscribe(wb, zone["id"])
    t_before = time.time()
    sent = []
    for ws, who, data in ((wa, a, {"i": 0}), (wa, a, {"i": 1, "nested": {"k": [True, None]}}),
                          (wb, b, {"i": 2}), (wa, a, {"i": 3})):
        await ws.send_json({"type": "intent", "data": data})
        assert await pong(ws) == []  # handled before the next one is sent: a known arrival order
        sent.append((who["id"], data))
    t_after = time.time()
    await step(running, a["token"])
    got = game.intents
    assert [(str(i.player_id), i.data) for i in got] == sent
    assert all(i.zone_id == uuid.UUID(zone["id"]) for i in got)
    assert all(isinstance(i.player_id, uuid.UUID) for i in got)
    seqs = [i.seq for i in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(t_before <= i.received_at <= t_after for i in got)
    for ws in (wa, wb):  # the tick shows them, in the same order
        m, _ = await until(ws, is_tick(zone["id"]))
        assert m["state"]["intents"] == [d for _, d in sent]
        await ws.close()


async def test_switching_zones_stops_the_old_zones_ticks(start_server, tmp_path):
    game = Lab()
    game.delay_in["a"] = 0.08  # A's module call outlasts the interval: switches land inside one
    running = await start_server(lab_config(tmp_path, tick_zone_timeout=1.0), game)
    p = await running.player()
    za, zb = await running.zone(p["token"], "a"), await running.zone(p["token"], "b")
    ws = await connect(running, p["token"])
    for _ in range(4):
        await subscribe(ws, za["id"])
        await until(ws, is_tick(za["id"]))
        # switch while A's next module call runs (its subscriber list was taken before the switch)
        await wait_for(lambda: running.srv.world.zones[uuid.UUID(za["id"])].busy_since is not None)
        await subscribe(ws, zb["id"])  # ticks of A may come before this answer, never after
        after = await read_for_ticks(running, ws, 3)
        ticks = [m for m in after if m["type"] == "tick"]
        assert [m for m in ticks if m["zone_id"] == za["id"]] == []
        assert len(ticks) >= 2 and all(m["zone_id"] == zb["id"] for m in ticks)
    await ws.close()


async def test_unsubscribe_answers_and_stops_ticks(start_server, tmp_path):
    running = await start_server(lab_config(tmp_path), Lab())
    p = await running.player()
    zone = await running.zone(p["token"])
    ws = await connect(running, p["token"])
    await subscribe(ws, zone["id"])
    await until(ws, is_tick(zone["id"]))
    await ws.send_json({"type": "unsubscribe"})
    await until(ws, lambda m: m == {"type": "unsubscribed"})
    assert [m for m in await read_for_ticks(running, ws, 5) if m["type"] == "tick"] == []
    # still usable: intents now need a subscription
    await ws.send_json({"type": "intent", "data": {}})
    m = await recv(ws)
    assert m["type"] == "error" and m["code"] == "not_subscribed"
    await ws.close()


# ---------------------------------------------------------------------------------------------
# Connections: reconnection, replacement, logout
# ---------------------------------------------------------------------------------------------


async def test_reconnect_within_grace_resumes_the_zone(start_server, tmp_path):
    running = await start_server(lab_config(tmp_path, websocket_reconnect_grace=30.0), Lab())
    p = await running.player()
    zone = await running.zone(p["token"])
    ws = await connect(running, p["token"])
    await subscribe(ws, zone["id"])
    await until(ws, is_tick(zone["id"]))
    await ws.close()
    await wait_for(lambda: uuid.UUID(p["id"]) not in running.srv.hub.conns)
    ws = await connect(running, p["token"])
    first = await recv(ws)
    assert first == {"type": "subscribed", "zone_id": zone["id"], "resumed": True}
    m, _ = await until(ws, is_tick())
    assert m["zone_id"] == zone["id"]
    await ws.close()


async def test_reconnect_after_grace_is_not_resumed(start_server, tmp_path):
    game = Lab()
    running = await start_server(lab_config(tmp_path, websocket_reconnect_grace=0.3), game)
    p = await running.player()
    zone = await running.zone(p["token"])
    key = (uuid.UUID(zone["id"]), uuid.UUID(p["id"]))
    ws = await connect(running, p["token"])
    await subscribe(ws, zone["id"])
    await until(ws, is_tick(zone["id"]))
    assert key in game.joins
    await ws.close()
    await wait_for(lambda: key in game.leaves, timeout=5.0)
    ws = await connect(running, p["token"])
    assert await pong(ws) == []  # nothing (no "subscribed") before the pong
    assert [m for m in await read_for_ticks(running, ws, 4) if m["type"] in ("tick", "subscribed")] == []
    await ws.close()


async def test_second_connection_replaces_the_first(start_server, tmp_path):
    running = await start_server(lab_config(tmp_path), Lab())
    p = await running.player()
    zone = await running.zone(p["token"])
    ws1 = await connect(running, p["token"])
    await subscribe(ws1, zone["id"])
    await until(ws1, is_tick(zone["id"]))
    status, login = await running.call("POST", "/api/auth/login",
                                       json={"username": p["username"], "password": p["password"]})
    assert status == 200
    ws2 = await connect(running, login["token"])  # same player, another session
    assert await close_code(ws1) == 4000
    first = await recv(ws2)
    assert first == {"type": "subscribed", "zone_id": zone["id"], "resumed": True}
    m, _ = await until(ws2, is_tick())
    assert m["zone_id"] == zone["id"]
    assert list(running.srv.hub.conns) == [uuid.UUID(p["id"])]
    await ws2.close()


async def test_logout_closes_the_socket_and_refuses_the_token(start_server, tmp_path):
    running = await start_server(lab_config(tmp_path), Lab())
    p = await running.player()
    zone = await running.zone(p["token"])
    ws = await connect(running, p["token"])
    await subscribe(ws, zone["id"])
    await until(ws, is_tick(zone["id"]))
    status, _ = await running.call("POST", "/api/auth/logout", p["token"])
    assert status == 204
    assert await close_code(ws) == 4001
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await connect(running, p["token"])
    assert err.value.status == 401


# ---------------------------------------------------------------------------------------------
# Fog of war (walkers, configured through its INI section)
# ---------------------------------------------------------------------------------------------


async def test_walkers_fog_of_war_gives_players_different_states(start_server, tmp_path):
    from game_modules import walkers
    saved = dict(walkers._settings)
    try:
        await _fog(start_server, tmp_path)
    finally:
        walkers._settings.update(saved)  # module-level settings: do not leak fog into other tests


async def _fog(start_server, tmp_path):
    radius = 2
    running = await start_server(walkers_config(tmp_path, sqlite_dsn(tmp_path), fog_radius=radius))
    a, b = await running.player(), await running.player()
    zone_id = await lobby_id(running, a["token"])
    wa, wb = await connect(running, a["token"]), await connect(running, b["token"])
    await subscribe(wa, zone_id)
    await subscribe(wb, zone_id)
    pa = avatar((await own_avatar_tick(wa, a["id"]))["state"], a["id"])
    pb = avatar((await own_avatar_tick(wb, b["id"]))["state"], b["id"])
    # Spawns are random: walk them apart until neither is within the other's fog radius.
    for _ in range(10):
        if abs(pa["x"] - pb["x"]) > radius:
            break
        if pb["x"] >= pa["x"] and pb["x"] < 39:
            pb = await walk(wb, b["id"], "right", pb["x"])
        elif pb["x"] < pa["x"] and pb["x"] > 0:
            pb = await walk(wb, b["id"], "left", pb["x"])
        elif pb["x"] >= pa["x"]:
            pa = await walk(wa, a["id"], "left", pa["x"])
        else:
            pa = await walk(wa, a["id"], "right", pa["x"])
    assert abs(pa["x"] - pb["x"]) > radius
    now = running.srv.engine.tick_number
    sa = (await own_avatar_tick(wa, a["id"], after=now))["state"]
    sb = (await own_avatar_tick(wb, b["id"], after=now))["state"]
    assert sa["fog_radius"] == radius and sb["fog_radius"] == radius
    assert avatar(sa, a["id"]) is not None and avatar(sa, b["id"]) is None
    assert avatar(sb, b["id"]) is not None and avatar(sb, a["id"]) is None
    assert sa["entities"] != sb["entities"]
    await wa.close()
    await wb.close()


# ---------------------------------------------------------------------------------------------
# Error isolation between zones
# ---------------------------------------------------------------------------------------------


async def test_module_exception_in_one_zone_leaves_others_ticking(start_server, tmp_path):
    game = Lab()
    game.raise_in = {"bad"}
    running = await start_server(lab_config(tmp_path), game)
    p = await running.player()
    bad, good = await running.zone(p["token"], "bad"), await running.zone(p["token"], "good")
    ws = await connect(running, p["token"])
    await subscribe(ws, good["id"])
    await wait_for(lambda: running.srv.engine.tick_number >= 3)
    errors_before = await metric(running, "gridserver_zone_errors_total")
    assert errors_before >= 1
    ticks = []
    while len(ticks) < 10:
        m, _ = await until(ws, is_tick())
        ticks.append(m)
    assert all(m["zone_id"] == good["id"] for m in ticks)
    numbers = [m["tick_number"] for m in ticks]
    assert numbers == sorted(numbers) and len(set(numbers)) == 10
    ns = [m["state"]["n"] for m in ticks]
    assert ns == sorted(ns) and len(set(ns)) == 10  # its entity changes keep being applied
    state = await zone_state(running, p["token"], bad["id"])
    assert state["last_error"] is not None
    assert "boom in bad" in json.dumps(state["last_error"])
    assert state["entities"] == []  # even the first tick's create was not applied
    assert (await zone_state(running, p["token"], good["id"]))["last_error"] is None
    assert await metric(running, "gridserver_zone_errors_total") >= errors_before + 5
    await ws.close()


async def test_slow_module_call_does_not_hold_up_other_zones(start_server, tmp_path):
    interval, nap = 0.05, 0.6
    game = Lab()
    running = await start_server(lab_config(tmp_path, tick_interval=interval), game)
    p, q = await running.player(), await running.player()
    slow, fast = await running.zone(p["token"], "slow"), await running.zone(p["token"], "fast")
    ws_fast, ws_slow = await connect(running, p["token"]), await connect(running, q["token"])
    await subscribe(ws_fast, fast["id"])
    await subscribe(ws_slow, slow["id"])
    received: dict[str, list] = {fast["id"]: [], slow["id"]: []}

    async def reader(ws):
        while True:
            msg = await ws.receive()
            if msg.type != WSMsgType.TEXT:
                return
            m = json.loads(msg.data)
            if m["type"] == "tick":
                received[m["zone_id"]].append((time.monotonic(), m["tick_number"]))

    tasks = [asyncio.ensure_future(reader(ws)) for ws in (ws_fast, ws_slow)]
    try:
        await wait_for(lambda: len(received[fast["id"]]) >= 3 and len(received[slow["id"]]) >= 3)
        game.sleep_in["slow"] = nap
        await wait_for(lambda: game.slept, timeout=10)
        _, t0, t1 = game.slept[0]
        await wait_for(lambda: sum(1 for t, _ in received[slow["id"]] if t > t1) >= 3)  # it recovers
        during = [n for t, n in received[fast["id"]] if t0 <= t <= t1]
        expected = (t1 - t0) / interval
        assert len(during) >= expected / 2, (len(during), expected)
        assert during == sorted(during)
        state = await zone_state(running, p["token"], slow["id"])
        assert state["skipped_ticks"] > 0
    finally:
        for t in tasks:
            t.cancel()
        await ws_fast.close()
        await ws_slow.close()


async def test_invalid_tick_result_is_rejected_whole(start_server, tmp_path):
    game = Lab()
    running = await start_server(lab_config(tmp_path, tick_paused=True), game)
    p = await running.player()
    bad, good = await running.zone(p["token"], "bad"), await running.zone(p["token"], "good")
    await step(running, p["token"])
    await step(running, p["token"])
    before_bad = await zone_state(running, p["token"], bad["id"])
    before_good = await zone_state(running, p["token"], good["id"])
    assert [e["metadata"] for e in before_bad["entities"]] == [{"n": 1}]
    game.invalid_in = {"bad"}
    await step(running, p["token"])
    after_bad = await zone_state(running, p["token"], bad["id"])
    after_good = await zone_state(running, p["token"], good["id"])
    assert after_bad["entities"] == before_bad["entities"]  # no create, no move, no metadata change
    assert after_bad["zone"]["entity_count"] == 1
    assert after_bad["last_error"] is not None
    assert "out of bounds" in json.dumps(after_bad["last_error"])
    assert before_bad["last_error"] is None
    assert after_good["last_error"] is None
    assert [e["metadata"] for e in after_good["entities"]] == [{"n": 2}]
    assert before_good["entities"][0]["metadata"] == {"n": 1}
    assert await metric(running, "gridserver_zone_errors_total") == 1


# ---------------------------------------------------------------------------------------------
# Slow readers
# ---------------------------------------------------------------------------------------------


def _masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    assert n < 126
    return bytes((0x81, 0x80 | n)) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _raw_nonreader(running, token: str, zone_id: str) -> socket.socket:
    """A WebSocket client with a tiny receive buffer that subscribes and then never reads."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (running.server.host, running.server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(sock, (
        f"GET /ws?token={token} HTTP/1.1\r\nHost: {running.server.host}:{running.server.port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = await loop.sock_recv(sock, 1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    await loop.sock_sendall(sock, _masked_text_frame(json.dumps({"type": "subscribe", "zone_id": zone_id})))
    return sock


async def test_client_that_never_reads_neither_delays_others_nor_stays(start_server, tmp_path):
    game = Lab(big=50_000)
    running = await start_server(lab_config(tmp_path, websocket_max_behind=3, websocket_heartbeat=0), game)
    p, q = await running.player(), await running.player()
    zone = await running.zone(p["token"])
    ws = await connect(running, p["token"])
    await subscribe(ws, zone["id"])
    numbers: list[int] = []

    async def reader():
        while True:
            msg = await ws.receive()
            if msg.type != WSMsgType.TEXT:
                return
            m = json.loads(msg.data)
            if m["type"] == "tick":
                assert len(m["state"]["pad"]) == 50_000
                numbers.append(m["tick_number"])

    task = asyncio.ensure_future(reader())
    sock = await _raw_nonreader(running, q["token"], zone["id"])

    async def q_connections():
        status, body = await running.call("GET", "/api/debug/connections", p["token"])
        assert status == 200
        return [c for c in body["connections"] if c["player_id"] == q["id"]]

    try:
        await wait_for(lambda: uuid.UUID(q["id"]) in running.srv.hub.subscribers.get(uuid.UUID(zone["id"]), {}))
        first = len(numbers)
        await wait_for(lambda: _connections_gone(q_connections), timeout=30)
        await wait_for(lambda: len(numbers) >= first + 20, timeout=10)
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "the reading client missed ticks"
        assert not task.done()
    finally:
        task.cancel()
        sock.close()
        await ws.close()


async def _connections_gone(q_connections) -> bool:
    return await q_connections() == []


# ---------------------------------------------------------------------------------------------
# Rate limiting and error messages
# ---------------------------------------------------------------------------------------------


async def test_rate_limit_drops_extra_intents_with_one_error(start_server, tmp_path):
    game = Lab()
    running = await start_server(lab_config(tmp_path, tick_paused=True, tick_max_intents_per_player=3), game)
    p = await running.player()
    zone = await running.zone(p["token"])
    ws = await connect(running, p["token"])
    await subscribe(ws, zone["id"])
    for i in range(10):
        await ws.send_json({"type": "intent", "data": {"i": i}})
    before = await pong(ws)
    assert [(m["type"], m["code"]) for m in before] == [("error", "rate_limited")]
    assert isinstance(before[0]["message"], str) and before[0]["message"]
    await step(running, p["token"])
    assert [i.data for i in game.intents] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert await metric(running, "gridserver_intents_dropped_total") == 7
    assert await metric(running, "gridserver_intents_accepted_total") == 3
    # the limit is per tick: the next tick takes three more
    for i in range(3):
        await ws.send_json({"type": "intent", "data": {"j": i}})
    assert [m for m in await pong(ws) if m["type"] == "error"] == []
    await ws.close()


async def test_a_burst_of_text_and_control_frames_is_handled_in_order(start_server, tmp_path):
    """Text messages are handled as aiohttp parses them (``_DirectQueue``), control frames
    through the handler's loop: sent back to back, in one write where the kernel joins them,
    they are still answered and handed to the game in the order sent."""
    game = Lab()
    running = await start_server(lab_config(tmp_path, tick_paused=True, tick_max_intents_per_player=100), game)
    p = await running.player()
    zone = await running.zone(p["token"], "arena")
    ws = await connect(running, p["token"])
    await subscribe(ws, zone["id"])
    conn = next(iter(running.srv.hub.conns.values()))
    assert conn.ws.direct is not None and conn.ws.direct.on_text is not None
    for i in range(40):  # no await between them but the writes: they leave together
        await ws.send_json({"type": "intent", "data": {"i": i}})
        if i % 10 == 3:
            await ws.ping(b"p%d" % i)  # a WebSocket ping: queued for the handler's loop
        if i % 10 == 7:
            await ws.send_str("not json %d" % i)
    await ws.send_json({"type": "ping"})
    answers = []
    while not answers or answers[-1]["type"] != "pong":
        answers.append(await recv(ws))
    assert [m["code"] for m in answers[:-1]] == ["bad_message"] * 4, answers
    await step(running, p["token"])
    assert [i.data["i"] for i in game.intents] == list(range(40))
    assert len(conn.ws.direct._buffer) == 0  # nothing left waiting in aiohttp's queue
    await ws.close()


def test_direct_queue_hands_text_over_at_once_and_keeps_the_order():
    """``_DirectQueue``: text goes straight to ``on_text`` unless something waits before it;
    everything else, and everything before ``on_text`` is set, is queued; a handler that
    raises ends the connection (the queue's exception) instead of the protocol."""

    class Protocol:
        _reading_paused = False

        def pause_reading(self):
            self._reading_paused = True

    loop = asyncio.new_event_loop()
    try:
        q = gridserver._DirectQueue(Protocol(), 2**16, loop=loop)
        text = lambda s: aiohttp.WSMessage(WSMsgType.TEXT, s, None)  # noqa: E731
        ping = aiohttp.WSMessage(WSMsgType.PING, b"x", None)
        q.feed_data(text("early"), 5)  # no handler yet: queued
        got = []
        q.on_text = got.append
        q.feed_data(text("a"), 1)  # waits behind "early"
        assert got == [] and [m.data for m, _ in q._buffer] == ["early", "a"]
        q._buffer.clear()
        q.feed_data(text("b"), 1)
        assert got == ["b"] and not q._buffer
        q.feed_data(ping, 1)
        q.feed_data(text("c"), 1)  # behind the ping
        assert got == ["b"] and [m.data for m, _ in q._buffer] == [b"x", "c"]
        q._buffer.clear()

        def boom(_text):
            raise ValueError("a bug")

        q.on_text = boom
        q.feed_data(text("d"), 1)
        assert q.on_text is None and isinstance(q.exception(), ValueError)
    finally:
        loop.close()


async def test_bad_messages_get_errors_and_the_connection_stays_usable(start_server, tmp_path):
    running = await start_server(lab_config(tmp_path, websocket_max_message_size=1024), Lab())
    p = await running.player()
    ws = await connect(running, p["token"])

    async def expect(code: str, send):
        await send()
        m = await recv(ws)
        assert m["type"] == "error" and m["code"] == code, m
        assert isinstance(m["message"], str) and m["message"]
        assert await pong(ws) == []  # still open and answering

    await expect("bad_message", lambda: ws.send_str("this is not json"))
    await expect("bad_message", lambda: ws.send_str("[1, 2, 3]"))
    await expect("bad_message", lambda: ws.send_str('"a string"'))
    await expect("unknown_type", lambda: ws.send_json({"type": "dance"}))
    await expect("zone_not_found", lambda: ws.send_json({"type": "subscribe", "zone_id": str(uuid.uuid4())}))
    await expect("zone_not_found", lambda: ws.send_json({"type": "subscribe", "zone_id": "not-a-uuid"}))
    await expect("not_subscribed", lambda: ws.send_json({"type": "intent", "data": {"move": "up"}}))
    await expect("bad_message", lambda: ws.send_json({"type": "intent", "data": [1]}))
    await expect("bad_message", lambda: ws.send_json({"type": "intent", "data": "up"}))
    await expect("message_too_large", lambda: ws.send_json({"type": "ping", "pad": "x" * 2000}))
    await expect("bad_message", lambda: ws.send_bytes(b'{"type": "ping"}'))
    await ws.send_json({"type": "ping"})
    assert await recv(ws) == {"type": "pong"}
    assert not ws.closed
    await ws.close()


async def test_deleting_a_zone_unsubscribes_its_subscribers(start_server, tmp_path):
    running = await start_server(lab_config(tmp_path), Lab())
    p = await running.player()
    zone = await running.zone(p["token"])
    other = await running.zone(p["token"])
    ws = await connect(running, p["token"])
    await subscribe(ws, zone["id"])
    await until(ws, is_tick(zone["id"]))
    status, _ = await running.call("DELETE", f"/api/zones/{zone['id']}", p["token"])
    assert status == 204
    m, _ = await until(ws, lambda m: m["type"] == "error")
    assert m["code"] == "zone_deleted" and m["message"]
    assert [m for m in await read_for_ticks(running, ws, 5) if m["type"] == "tick"] == []
    await ws.send_json({"type": "intent", "data": {}})
    m, _ = await until(ws, lambda m: m["type"] == "error")
    assert m["code"] == "not_subscribed"
    await subscribe(ws, other["id"])  # and it can go elsewhere
    m, _ = await until(ws, is_tick())
    assert m["zone_id"] == other["id"]
    await ws.close()


# ---------------------------------------------------------------------------------------------
# Cadence, persistence across restarts, swapping the game
# ---------------------------------------------------------------------------------------------


async def test_tick_cadence_matches_the_interval(start_server, tmp_path):
    """A subscriber gets every tick, numbered one after the other, spaced by the interval: the
    span between the ``sent_at`` stamps of 39 ticks is 38 intervals, give or take one, plus
    any slots the engine skipped meanwhile (``tick_overruns_total``: a tick that overran, as
    on a loaded machine, is not made up for by a burst and does not shift the schedule)."""
    interval, count = 0.05, 40
    # (the zone's module call is never cut off: a late zone would be skipped, a gap in its numbers)
    running = await start_server(lab_config(tmp_path, tick_interval=interval, tick_zone_timeout=1.0), Lab())
    metrics = running.srv.metrics
    p = await running.player()
    zone = await running.zone(p["token"])
    ws = await connect(running, p["token"])
    await subscribe(ws, zone["id"])
    await until(ws, is_tick(zone["id"]))

    async def receive_ticks() -> list[tuple[int, float, int]]:
        """(tick number, sent_at, the engine's skipped slots so far) of ``count`` ticks."""
        got = []
        while len(got) < count:
            m, _ = await until(ws, is_tick(zone["id"]))
            got.append((m["tick_number"], m["sent_at"], metrics.tick_overruns_total))
        return got

    ticks = await asyncio.wait_for(receive_ticks(), scaled(2 * count * interval + 10))
    await ws.close()
    numbers = [n for n, _, _ in ticks]
    assert numbers == list(range(numbers[0], numbers[0] + count)), numbers
    # Slots skipped after tick k are counted as tick k ends, before its message is read: the
    # ones between ticks[1] and ticks[-1] are those counted from ticks[0] to ticks[-2].
    skipped = ticks[-2][2] - ticks[0][2]
    span = (ticks[-1][1] - ticks[1][1]) / interval
    assert abs(span - (count - 2) - skipped) <= 1, (span, count - 2, skipped)
    assert await metric(running, "gridserver_ticks_total") >= numbers[-1]


async def test_module_changes_survive_a_graceful_restart(start_server, tmp_path, dsn):
    cfg = walkers_config(tmp_path, dsn)
    running = await start_server(cfg)
    p = await running.player()
    zone_id = await lobby_id(running, p["token"])
    ws = await connect(running, p["token"])
    await subscribe(ws, zone_id)
    a = avatar((await own_avatar_tick(ws, p["id"]))["state"], p["id"])
    a = await walk(ws, p["id"], "left" if a["x"] == 39 else "right", a["x"])
    moved = (a["x"], a["y"])
    await ws.close()
    await stop_server(running)

    running = await start_server(cfg)
    status, login = await running.call("POST", "/api/auth/login",
                                       json={"username": p["username"], "password": p["password"]})
    assert status == 200
    status, entity = await running.call("GET", f"/api/debug/entities/{a['id']}", login["token"])
    assert status == 200, entity
    assert (entity["x"], entity["y"]) == moved
    assert entity["zone_id"] == zone_id
    assert entity["metadata"]["kind"] == "avatar" and entity["metadata"]["player_id"] == p["id"]


async def test_echo_game_is_one_line_of_config(start_server, tmp_path):
    cfg = lab_config(tmp_path, game_module="game_modules.echo")
    running = await start_server(cfg)  # no game object: the INI names it
    p = await running.player()
    zone = await running.zone(p["token"])
    ws = await connect(running, p["token"])
    await subscribe(ws, zone["id"])
    await ws.send_json({"type": "intent", "data": {"hello": "world", "n": 3}})
    m, _ = await until(ws, lambda m: m["type"] == "tick" and m["state"].get("intents"))
    assert m["state"]["game"] == "echo"
    assert m["state"]["intents"][0]["data"] == {"hello": "world", "n": 3}
    assert m["state"]["intents"][0]["player_id"] == p["id"]
    await ws.close()


async def test_heartbeat_drops_a_silent_peer_and_keeps_a_quiet_live_one(start_server, tmp_path):
    """A peer that never answers pings is dropped; an idle client that answers them stays."""
    running = await start_server(lab_config(tmp_path, websocket_heartbeat=0.2), Lab())
    silent, quiet = await running.player(), await running.player()
    zone = await running.zone(silent["token"])
    sock = await _raw_nonreader(running, silent["token"], zone["id"])  # sends nothing after subscribing
    async with running.http.ws_connect(running.ws_url(quiet["token"]), autoping=True) as ws:
        hub = running.srv.hub
        await wait_for(lambda: uuid.UUID(silent["id"]) in hub.conns and uuid.UUID(quiet["id"]) in hub.conns)
        # The quiet client only answers pings (aiohttp's autoping), which must keep it alive.
        reader = asyncio.ensure_future(ws.receive())
        await wait_for(lambda: uuid.UUID(silent["id"]) not in hub.conns, timeout=5)
        await asyncio.sleep(1.0)  # five more heartbeat periods
        assert uuid.UUID(quiet["id"]) in hub.conns and not ws.closed
        reader.cancel()
    sock.close()


# ---------------------------------------------------------------------------------------------
# What one player may queue (without sockets)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, problem", [
    ('{"a": NaN}', "NaN"), ('{"a": [1, Infinity]}', "NaN"), ('{"a": {"b": -Infinity}}', "NaN"),
    ('{"a": 1e999}', "NaN"), ('{"a": ' + "9" * 400 + '.0}', "NaN"), ('{"a": ' + "9" * 400 + "}", "too large"),
    ('{"a": -' + "9" * 400 + "}", "too large"),
    ('{"a": ' + "[" * 32 + "]" * 32 + "}", "deeper than 32"),
])
def test_intent_data_json_cannot_carry_again_is_refused(text, problem):
    data = gridserver.json_loads(text)
    found = gridserver._data_problem(data, 32)
    assert found is not None and problem in found, found


@pytest.mark.parametrize("text", [
    "{}", '{"move": "up", "n": 1.5, "big": 1e308, "i": ' + "9" * 300 + ', "t": true, "z": null}',
    '{"a": ' + "[" * 31 + "]" * 31 + "}",  # 32 levels, data itself counted: the deepest allowed
])
def test_intent_data_json_can_carry_is_accepted(text):
    data = gridserver.json_loads(text)
    assert gridserver._data_problem(data, 32) is None
    gridserver.json_dumps(data)  # and it does serialize again


def test_a_join_and_a_leave_before_the_tick_cancel_out():
    zs = gridserver._ZoneState(gridserver.Zone(uuid.uuid4(), "z", 4, 4))
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for player, kind in [(a, "join"), (b, "leave"), (a, "leave"), (c, "join"), (b, "join"), (a, "join")]:
        gridserver._queue_event(zs, player, kind)
    assert list(zs.events.items()) == [(c, "join"), (a, "join")]  # b left and came back: neither
