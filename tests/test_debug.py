"""Debug routes (/api/debug/*) and operations (/healthz, /metrics) against a real server."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid

import pytest
from aiohttp import WSMsgType

from helpers import make_config, scaled
from gridserver import EntityCreate, TickResult

ENTITY_FIELDS = {"id", "zone_id", "x", "y", "width", "height", "metadata", "created_at", "updated_at"}


class OneThing:
    """Each zone gets one 3x2 entity at (1, 2) on its first tick; the state counts intents."""

    def on_init(self, framework):
        self.fw = framework

    def on_tick(self, zone_id, entities, intents, tick_number):
        creates = [] if entities else [EntityCreate(1, 2, 3, 2, {"kind": "thing"})]
        return TickResult(entity_creates=creates, broadcast_state={"tick": tick_number, "intents": len(intents)})

    def get_player_state(self, zone_id, player_id, full_state):
        return full_state


def cfg(tmp_path, **overrides):
    values = {"tick_interval": 0.05}
    values.update(overrides)
    return make_config(f"sqlite:///{tmp_path / 'db'}", **values)


def debug_calls(zone_id: str, entity_id: str) -> list[tuple[str, str]]:
    return [("POST", "/api/debug/tick/pause"), ("POST", "/api/debug/tick/resume"),
            ("POST", "/api/debug/tick/step"), ("GET", f"/api/debug/zones/{zone_id}/state"),
            ("GET", f"/api/debug/entities/{entity_id}"), ("GET", "/api/debug/connections")]


async def test_debug_routes_do_not_exist_when_debug_is_off(start_server, tmp_path):
    running = await start_server(cfg(tmp_path, server_debug=False), OneThing())
    p = await running.player()
    for method, path in debug_calls(str(uuid.uuid4()), str(uuid.uuid4())) + [("GET", "/api/debug/nothing")]:
        for token in (p["token"], None):
            status, body = await running.call(method, path, token)
            assert status == 404 and body["error"] == "not_found", (method, path, token, status, body)
            assert body["message"]
    status, body = await running.call("POST", "/api/zones", p["token"], json={"name": "z", "width": 4, "height": 4})
    assert status == 404 and body["error"] == "not_found"
    assert running.srv.engine.paused is False  # and the pause did nothing


async def test_debug_routes_refuse_players_not_listed(start_server, tmp_path):
    running = await start_server(cfg(tmp_path, server_debug=True, server_debug_players="someoneelse"), OneThing())
    p = await running.player()
    for method, path in debug_calls(str(uuid.uuid4()), str(uuid.uuid4())):
        status, body = await running.call(method, path, p["token"])
        assert status == 403 and body["error"] == "forbidden", (method, path, status, body)
        status, body = await running.call(method, path)
        assert status == 401 and body["error"] == "unauthorized", (method, path, status, body)
    status, me = await running.call("GET", "/api/auth/me", p["token"])
    assert status == 200 and me["is_debug"] is False
    assert running.srv.engine.paused is False


async def test_debug_routes_for_an_allowed_player(start_server, tmp_path):
    running = await start_server(cfg(tmp_path, server_debug=True), OneThing())
    p = await running.player("debugger")
    t = p["token"]
    zone = await running.zone(t, "arena", width=10, height=8)
    ws = await running.http.ws_connect(running.ws_url(t))
    await ws.send_json({"type": "subscribe", "zone_id": zone["id"]})

    # step while running: refused
    status, body = await running.call("POST", "/api/debug/tick/step", t)
    assert status == 409 and body["error"] == "not_paused"

    status, body = await running.call("POST", "/api/debug/tick/pause", t)
    assert status == 200 and body["paused"] is True and isinstance(body["tick_number"], int)
    n = body["tick_number"]
    status, health = await running.call("GET", "/healthz")
    assert health["paused"] is True and health["tick_number"] == n
    status, body = await running.call("POST", "/api/debug/tick/step", t)
    assert (status, body) == (200, {"tick_number": n + 1})
    status, body = await running.call("POST", "/api/debug/tick/step", t)
    assert (status, body) == (200, {"tick_number": n + 2})
    assert running.srv.engine.tick_number == n + 2  # nothing ran on its own

    # the stepped tick was broadcast: the subscriber has tick n + 2
    seen = []
    while not seen or seen[-1]["tick_number"] < n + 2:
        msg = await ws.receive(timeout=scaled(5))
        assert msg.type == WSMsgType.TEXT
        m = json.loads(msg.data)
        if m["type"] == "tick":
            seen.append(m)
    assert seen[-1]["tick_number"] == n + 2

    for i in range(2):
        await ws.send_json({"type": "intent", "data": {"i": i}})
    await ws.send_json({"type": "ping"})
    while json.loads((await ws.receive(timeout=scaled(5))).data)["type"] != "pong":
        pass

    status, state = await running.call("GET", f"/api/debug/zones/{zone['id']}/state", t)
    assert status == 200
    assert {"zone", "entities", "tick_number", "pending_intents", "last_error"} <= set(state)
    assert state["zone"]["id"] == zone["id"] and state["zone"]["name"] == "arena"
    assert state["tick_number"] == n + 2 and state["pending_intents"] == 2 and state["last_error"] is None
    (entity,) = state["entities"]
    assert set(entity) >= ENTITY_FIELDS
    assert (entity["x"], entity["y"], entity["width"], entity["height"]) == (1, 2, 3, 2)
    await running.call("POST", "/api/debug/tick/step", t)
    status, state = await running.call("GET", f"/api/debug/zones/{zone['id']}/state", t)
    assert state["pending_intents"] == 0

    status, body = await running.call("GET", f"/api/debug/entities/{entity['id']}", t)
    assert status == 200 and set(body) >= ENTITY_FIELDS
    assert body["id"] == entity["id"] and body["zone_id"] == zone["id"]
    assert (body["x"], body["y"], body["width"], body["height"]) == (1, 2, 3, 2)
    assert body["metadata"] == {"kind": "thing"}
    assert body["created_at"].endswith("Z") and body["updated_at"].endswith("Z")
    for bad in (str(uuid.uuid4()), "not-a-uuid", "1234"):
        status, body = await running.call("GET", f"/api/debug/entities/{bad}", t)
        assert status == 404 and body["error"] in ("not_found", "entity_not_found"), (bad, body)
    for bad in (str(uuid.uuid4()), "not-a-uuid"):
        status, body = await running.call("GET", f"/api/debug/zones/{bad}/state", t)
        assert status == 404 and body["error"] in ("not_found", "zone_not_found"), (bad, body)

    status, body = await running.call("GET", "/api/debug/connections", t)
    assert status == 200
    (conn,) = body["connections"]
    assert conn["player_id"] == p["id"] and conn["username"] == "debugger"
    assert conn["zone_id"] == zone["id"] and conn["connected_at"].endswith("Z")

    status, body = await running.call("POST", "/api/debug/tick/resume", t)
    assert status == 200 and body["paused"] is False and body["tick_number"] == n + 3
    status, body = await running.call("POST", "/api/debug/tick/step", t)
    assert status == 409 and body["error"] == "not_paused"
    status, me = await running.call("GET", "/api/auth/me", t)
    assert me["is_debug"] is True
    await ws.close()


async def test_healthz_and_metrics(start_server, tmp_path):
    running = await start_server(cfg(tmp_path), OneThing())
    status, body = await running.call("GET", "/healthz")
    assert status == 200
    assert body["status"] == "ok" and body["database"] == "ok"
    assert isinstance(body["tick_number"], int) and body["paused"] is False
    async with running.http.get(running.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    names = ["gridserver_ticks_total", "gridserver_tick_duration_seconds", "gridserver_tick_lateness_seconds",
             "gridserver_connections", "gridserver_intents_accepted_total", "gridserver_intents_dropped_total",
             "gridserver_messages_sent_total", "gridserver_bytes_sent_total", "gridserver_flushes_total",
             "gridserver_flush_failures_total", "gridserver_dirty_entities", "gridserver_zone_errors_total"]
    for name in names:
        assert f"# TYPE {name} " in text, name
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
    assert "gridserver_tick_duration_seconds_count" in text


@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
async def test_operations_need_no_token(start_server, tmp_path, path):
    running = await start_server(cfg(tmp_path), OneThing())
    status, _ = await running.call("GET", path)
    assert status == 200


async def test_the_event_loop_never_waits_on_the_world_lock(start_server, tmp_path):
    """A tick's apply or a flush snapshot may hold ``World.lock`` for a while: requests that
    need it wait for it off the loop, and everything else is answered meanwhile."""
    running = await start_server(cfg(tmp_path, server_debug=True), OneThing())
    p = await running.player()
    token = p["token"]
    zone, doomed = await running.zone(token), await running.zone(token)
    lock = running.srv.world.lock
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(scaled(10))

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(scaled(5))
    try:
        waiting = [asyncio.ensure_future(c) for c in (
            running.call("GET", f"/api/debug/zones/{zone['id']}/state", token),
            running.call("POST", "/api/zones", token, json={"name": "made-" + uuid.uuid4().hex[:6], "width": 4,
                                                           "height": 4}),
            running.call("DELETE", f"/api/zones/{doomed['id']}", token))]
        status, body = await asyncio.wait_for(running.call("GET", "/healthz"), scaled(5))
        assert status == 200, body
        status, _ = await asyncio.wait_for(running.call("GET", "/api/auth/me", token), scaled(5))
        assert status == 200
        assert holder.is_alive() and not any(f.done() for f in waiting)  # they wait for the lock, the loop does not
    finally:
        release.set()
    answers = await asyncio.wait_for(asyncio.gather(*waiting), scaled(10))
    assert [status for status, _ in answers] == [200, 201, 204], answers
    assert answers[0][1]["zone"]["id"] == zone["id"]
    holder.join(scaled(5))
