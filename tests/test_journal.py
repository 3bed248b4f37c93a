"""The journal's time line against a known sequence, on SQLite and PostgreSQL: the history
of a zone's inputs, a rewind to an earlier tick, and ``gridserver replay`` printing the
ticks again from the database (``tests.fault_games:Stepper``, a deterministic game, and
``BulkStepper``, the same game moving its entities in one ``EntityMoves``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import aiohttp
import pytest

import fault_games
import gridserver
from helpers import ROOT, make_config, scaled, stop_server, wait_for


def entities_of(body: list) -> list:
    return sorted([e["id"], e["x"], e["y"], e["width"], e["height"], e["metadata"]] for e in body)


@pytest.mark.parametrize("game", ["Stepper", "BulkStepper"])
async def test_history_rewind_and_replay_of_a_known_sequence(start_server, dsn, game):
    """``BulkStepper`` is ``Stepper`` moving its entities in one ``EntityMoves``."""
    cfg = make_config(dsn, server_debug=True, tick_paused=True, journal_keep=8, persistence_interval=0.05)
    running = await start_server(cfg, getattr(fault_games, game)())
    srv = running.srv
    p = await running.player()
    token = p["token"]
    zone = await running.zone(token, width=20, height=10)
    ws = await running.http.ws_connect(running.ws_url(token))
    frames: dict[int, list] = {}
    states: dict[int, list] = {}
    sent: dict[int, list] = {}

    async def next_tick(after: int) -> dict:
        while True:
            msg = await ws.receive_json(timeout=scaled(10))
            if msg["type"] == "tick" and msg["tick_number"] > after:
                return msg

    try:
        await ws.send_json({"type": "subscribe", "zone_id": zone["id"]})
        n = 0
        for step in range(1, 13):
            adds = [step * 10 + i for i in range(step % 3)]
            for k in adds:
                await ws.send_json({"type": "intent", "data": {"add": k}})
            await ws.send_json({"type": "ping"})
            while (await ws.receive_json(timeout=scaled(10)))["type"] != "pong":
                pass
            flushes = srv.metrics.flushes_total
            status, body = await running.call("POST", "/api/debug/tick/step", token)
            assert status == 200, body
            n = body["tick_number"]
            sent[n] = adds
            frames[n] = (await next_tick(n - 1))["state"]["entities"]
            status, state = await running.call("GET", f"/api/debug/zones/{zone['id']}/state", token)
            states[n] = entities_of(state["entities"])
            assert states[n] == frames[n]  # what the player saw is the zone
            await wait_for(lambda: srv.metrics.flushes_total > flushes, what="a flush (and its snapshot)")
        last, first = n, n - 11

        # History: every tick's inputs in order, the join in the first.
        status, body = await running.call("GET", f"/api/debug/zones/{zone['id']}/history?from={first}&to={last}",
                                          token)
        assert status == 200, body
        got = {t["tick_number"]: t for t in body["ticks"]}
        kept = sorted(got)
        assert kept[-1] == last and len(kept) >= 8  # [journal] keep = 8 before the last flush
        for tick in kept:
            assert [i["data"]["add"] for i in got[tick]["intents"]] == sent[tick], tick
            assert all(i["player_id"] == p["id"] for i in got[tick]["intents"])
        if first in got:
            assert got[first]["events"] == [["join", p["id"]]]
        status, body = await running.call("GET", f"/api/debug/zones/{zone['id']}/history?from=x", token)
        assert status == 400 and body["error"] == "bad_request"

        # Rewind: the zone as it was at the end of tick N; the player gets tick N again.
        target = last - 3
        status, body = await running.call("POST", f"/api/debug/zones/{zone['id']}/rewind", token,
                                          json={"tick_number": target})
        assert status == 200, body
        assert body["tick_number"] == target and entities_of(body["entities"]) == states[target]
        again = await next_tick(target - 1)
        assert again["tick_number"] == target and again["state"]["entities"] == frames[target]
        status, state = await running.call("GET", f"/api/debug/zones/{zone['id']}/state", token)
        assert entities_of(state["entities"]) == states[target] and state["zone_tick_number"] == target
        status, body = await running.call("GET", f"/api/debug/zones/{zone['id']}/history?from={target}&to={last}",
                                          token)
        assert [t["tick_number"] for t in body["ticks"]] == [target]  # the journal after N is gone
        status, body = await running.call("POST", f"/api/debug/zones/{zone['id']}/rewind", token,
                                          json={"tick_number": 1})
        assert status == 409 and body["error"] == "out_of_history", body
        # and the zone goes on from there with tick N+1 (the world's count goes on): one more
        # step moves every entity one cell, and its input is journaled as tick N+1
        await ws.send_json({"type": "intent", "data": {"add": 999}})
        await ws.send_json({"type": "ping"})
        while (await ws.receive_json(timeout=scaled(10)))["type"] != "pong":
            pass
        status, body = await running.call("POST", "/api/debug/tick/step", token)
        assert status == 200 and body["tick_number"] == last + 1, body
        msg = await next_tick(target)
        assert msg["tick_number"] == target + 1
        after = [e for e in msg["state"]["entities"] if e[5] != {"k": 999}]
        assert [[e[0], (e[1] - 1) % 20, *e[2:]] for e in after] == frames[target]
        status, state = await running.call("GET", f"/api/debug/zones/{zone['id']}/state", token)
        assert state["zone_tick_number"] == target + 1 and state["tick_number"] == last + 1
        states[target + 1] = entities_of(state["entities"])
        status, body = await running.call("GET", f"/api/debug/zones/{zone['id']}/history?from={target}&to={last}",
                                          token)
        assert [(t["tick_number"], [i["data"] for i in t["intents"]]) for t in body["ticks"]] == \
            [(target, [{"add": k} for k in sent[target]]), (target + 1, [{"add": 999}])]
    finally:
        await ws.close()
    await stop_server(running)

    # gridserver replay: the kept ticks up to the rewind point and the tick after it, printed
    # again from the database.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSERVER_")}
    env.update(GRIDSERVER_DATABASE_DSN=dsn, GRIDSERVER_GAME_MODULE=f"tests.fault_games:{game}",
               GRIDSERVER_DEBUG_LOG_LEVEL="warning")
    lo = max(kept[0] + 1, target - 4)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "gridserver.py"), "replay", "--zone", zone["id"],
                           "--from", str(lo), "--to", str(target)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=scaled(60))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["tick_number"] for line in lines] == list(range(lo, target + 1))
    after_rewind = subprocess.run([sys.executable, os.path.join(ROOT, "gridserver.py"), "replay", "--zone",
                                   zone["id"], "--from", str(target + 1), "--to", str(target + 1)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=scaled(60))
    assert after_rewind.returncode == 0, after_rewind.stderr
    lines += [json.loads(line) for line in after_rewind.stdout.splitlines()]
    assert lines[-1]["tick_number"] == target + 1
    for line in lines:
        assert entities_of(line["entities"]) == states[line["tick_number"]], line["tick_number"]
    gone = subprocess.run([sys.executable, os.path.join(ROOT, "gridserver.py"), "replay", "--zone", zone["id"],
                           "--from", "1", "--to", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=scaled(60))
    assert gone.returncode == 2 and "not kept" in gone.stderr and not gone.stdout


class Careless:
    """Draws from the ``random`` module and reads the clock instead of ``framework.random`` and
    the tick number: the kind of module a replay cannot reproduce."""

    def on_init(self, framework):
        self.fw = framework

    def on_tick(self, zone_id, entities, intents, tick_number):
        import random
        import time
        if not entities:
            return gridserver.TickResult(entity_creates=[gridserver.EntityCreate(0, 0, 1, 1, {"at": 0})])
        e = entities[0]
        return gridserver.TickResult(entity_updates=[gridserver.EntityUpdate(
            e.id, x=random.randrange(20), metadata={"at": time.time()})])

    def get_player_state(self, zone_id, player_id, full_state):
        return full_state


async def test_with_debug_on_a_module_that_is_not_deterministic_is_named(start_server, tmp_path):
    cfg = make_config(f"sqlite:///{tmp_path / 'db'}", server_debug=True, journal_verify_every=1)
    careless = await start_server(cfg, Careless())
    p = await careless.player()
    zone = await careless.zone(p["token"], width=20, height=4)

    async def named():
        status, state = await careless.call("GET", f"/api/debug/zones/{zone['id']}/state", p["token"])
        return state["last_error"] if state["last_error"] and state["last_error"]["kind"] == "nondeterministic" \
            else None

    error = await wait_for(named, what="the nondeterministic tick to be named")
    # the message a developer gets: the zone's tick, the entity that differed, and what to do
    assert f"tick {error['tick_number']} run twice" in error["message"]
    assert "entity " in error["message"] and "framework.random" in error["message"], error["message"]
    status, text = await careless.call("GET", "/metrics")
    assert "gridserver_replay_mismatches_total 0" not in text

    # a deterministic module run the same way is never named
    cfg = make_config(f"sqlite:///{tmp_path / 'db2'}", server_debug=True, journal_verify_every=1)
    steady = await start_server(cfg, fault_games.Stepper())
    q = await steady.player()
    zone = await steady.zone(q["token"], width=20, height=4)
    ws = await steady.http.ws_connect(steady.ws_url(q["token"]))
    await ws.send_json({"type": "subscribe", "zone_id": zone["id"]})
    for k in range(5):
        await ws.send_json({"type": "intent", "data": {"add": k}})
    start = steady.srv.engine.tick_number
    await wait_for(lambda: steady.srv.engine.tick_number >= start + 20, what="20 ticks, each run twice")
    await ws.close()
    assert steady.srv.metrics.replay_mismatches_total == 0
    status, state = await steady.call("GET", f"/api/debug/zones/{zone['id']}/state", q["token"])
    assert state["last_error"] is None and len(state["entities"]) == 5


async def test_tick_numbers_beyond_a_database_integer_are_bad_requests(start_server, dsn):
    """Found by tests/test_fuzz.py: a rewind to tick -10**30, or a history from it, reached the
    database driver, which cannot bind such an integer (500 internal_error)."""
    running = await start_server(make_config(dsn, server_debug=True), fault_games.Stepper())
    p = await running.player()
    zone = await running.zone(p["token"], width=20, height=4)
    huge = 10 ** 30
    for value in (-huge, -1):
        status, body = await running.call("POST", f"/api/debug/zones/{zone['id']}/rewind", p["token"],
                                          json={"tick_number": value})
        assert status == 400 and body["error"] == "bad_request" and "tick_number" in body["message"], body
    for query in (f"from={-huge}", f"to={huge}", f"from={huge}&to={huge + 5}", "to=-1", f"from={2 ** 63}"):
        status, body = await running.call("GET", f"/api/debug/zones/{zone['id']}/history?{query}", p["token"])
        assert status == 400 and body["error"] == "bad_request", (query, body)
    status, body = await running.call("POST", f"/api/debug/zones/{zone['id']}/rewind", p["token"],
                                      json={"tick_number": huge})
    assert status == 409 and body["error"] == "out_of_history", body
    status, body = await running.call("GET", f"/api/debug/zones/{zone['id']}/history?from=0&to={2 ** 63 - 1}",
                                      p["token"])
    assert status == 400 and "10,000" in body["message"], body
