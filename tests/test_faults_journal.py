"""The fault suite, the journal's part: no tick a client has seen is lost to a crash.

A real ``python gridserver.py`` (``tests.fault_games:Drifter``: every tick moves, creates and
deletes entities from ``framework.random``, and players' intents spawn more) is killed with
SIGKILL at random moments while players send intents, on PostgreSQL and on SQLite, and
started again, paused, so that it only recovers: each zone is loaded from its last flush
and the journaled ticks after it are replayed through a fresh module. The zone must then be
at the last tick its player received, or a later one, and equal, entity for entity, to the
state that player received for that tick (the broadcast state holds the whole zone).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal

import aiohttp
import pytest

from faultkit import Client, ServerProcess, add_figure, figure, start
from helpers import dsn_with_schema, pg_exec, require_pg, scaled, wait_for

pytestmark = pytest.mark.slow

#: A soak run (bench/soak.py) multiplies the crash cycles.
SOAK_ROUNDS = int(os.environ.get("GRIDSERVER_SOAK_ROUNDS", "1"))

DRIFTER = "tests.fault_games:Drifter"


@pytest.fixture(params=["postgres", "sqlite"])
def journal_dsn(request, tmp_path):
    if request.param == "sqlite":
        yield request.param, f"sqlite:///{tmp_path / 'journal.db'}"
        return
    require_pg()
    import uuid
    schema = "j_" + uuid.uuid4().hex[:16]
    pg_exec(f"CREATE SCHEMA {schema}")
    yield request.param, dsn_with_schema(schema)
    pg_exec(f"DROP SCHEMA {schema} CASCADE")


class Player:
    """Subscribed to one zone: records the state of every tick it receives, sends spawns."""

    def __init__(self, http: aiohttp.ClientSession, client: Client, token: str, zone_id: str):
        self.http, self.client, self.token, self.zone_id = http, client, token, zone_id
        self.seen: dict[int, list] = {}
        self.sent = 0

    async def start(self) -> "Player":
        self.ws = await self.http.ws_connect(self.client.ws_url(self.token), heartbeat=None)
        await self.ws.send_json({"type": "subscribe", "zone_id": self.zone_id})
        self.reader = asyncio.ensure_future(self._read())
        self.writer = asyncio.ensure_future(self._write())
        return self

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            m = json.loads(msg.data)
            if m["type"] == "tick":
                self.seen[m["tick_number"]] = m["state"]["entities"]

    async def _write(self) -> None:
        k = 0
        while True:
            await asyncio.sleep(random.uniform(0.02, 0.15))
            k += 1
            await self.ws.send_json({"type": "intent", "data": {"spawn": k}})
            self.sent += 1

    async def stop(self) -> None:
        for task in (self.reader, self.writer):
            task.cancel()
        await asyncio.gather(self.reader, self.writer, return_exceptions=True)
        await self.ws.close()


async def test_sigkill_loses_no_tick_a_client_saw(journal_dsn, tmp_path, http, processes):
    backend, dsn = journal_dsn
    settings = {"tick_interval": 0.05, "persistence_interval": 1.5, "journal_mode": "replay"}
    rng = random.Random()
    kills = compared = later = ticks_seen = 0
    tokens: list[str] = []
    for cycle in range(5 * SOAK_ROUNDS):
        srv = start(processes, tmp_path, dsn, DRIFTER, settings, {"zones": 2})
        await srv.ready(http)
        c = Client(srv.url, http)
        if not tokens:  # sessions survive the crashes
            tokens = [(await c.player())["token"] for _ in range(2)]
        zones = await c.zones(tokens[0])
        zone_ids = [zones["drift-0"]["id"], zones["drift-1"]["id"]]
        players = [await Player(http, c, token, zone_id).start() for token, zone_id in zip(tokens, zone_ids)]
        try:
            await wait_for(lambda: all(len(p.seen) >= 3 for p in players), what="ticks reaching the players")
            await asyncio.sleep(rng.uniform(0.3, 2.0))
            srv.send(signal.SIGKILL)
            assert await srv.wait_exit() == -signal.SIGKILL
            kills += 1
        finally:
            for p in players:
                await p.stop()
        # Started again, paused: it only recovers (flush, then the journal replayed).
        again = start(processes, tmp_path, dsn, DRIFTER, {**settings, "tick_paused": "true"}, {"zones": 2})
        await again.ready(http)
        c = Client(again.url, http)
        for p in players:
            last_seen = max(p.seen)
            ticks_seen += len(p.seen)
            status, state = await c.call("GET", f"/api/debug/zones/{p.zone_id}/state", tokens[0])
            assert status == 200, state
            restored = state["zone_tick_number"]
            assert restored >= last_seen, (
                f"cycle {cycle}: the zone came back at tick {restored}, but its player had seen tick {last_seen}")
            if restored in p.seen:
                world = sorted([e["id"], e["x"], e["y"], e["width"], e["height"], e["metadata"]]
                               for e in state["entities"])
                assert world == p.seen[restored], f"cycle {cycle}: tick {restored} came back different"
                compared += len(world)
            else:
                later += 1  # its frames were still on their way when the process died
        again.send(signal.SIGKILL)
        await again.wait_exit()
    assert compared > 0
    figure(f"journal ({backend}): SIGKILLs mid-play / zones restored at the last tick seen, entity for entity",
           f"{kills} / {2 * kills - later}")
    add_figure("journal: entity rows compared with what players saw after a SIGKILL", compared)
    add_figure("journal: SIGKILLs mid-play", kills)


async def test_the_journal_waits_out_a_database_outage_and_then_loses_nothing(pg_schema, tmp_path, http, processes,
                                                                              tcp_proxy):
    """PostgreSQL goes away (connections cut) while players play: ticks and frames go on (the
    journal keeps the inputs in memory, in order), and once the database is back they are all
    written, so a SIGKILL after that still brings every zone back at the last tick seen."""
    proxy = await tcp_proxy()
    dsn = dsn_with_schema(pg_schema, f"postgresql://root@127.0.0.1:{proxy.port}/test")
    settings = {"tick_interval": 0.05, "persistence_interval": 0.5, "persistence_max_backoff": 0.5,
                "database_timeout": 1.0, "journal_mode": "replay"}
    srv = start(processes, tmp_path, dsn, DRIFTER, settings, {"zones": 2})
    await srv.ready(http)
    c = Client(srv.url, http)
    tokens = [(await c.player())["token"] for _ in range(2)]
    zones = await c.zones(tokens[0])
    zone_ids = [zones["drift-0"]["id"], zones["drift-1"]["id"]]
    players = [await Player(http, c, token, zone_id).start() for token, zone_id in zip(tokens, zone_ids)]
    try:
        await wait_for(lambda: all(len(p.seen) >= 5 for p in players), what="ticks before the outage")
        proxy.cut()
        await wait_for(lambda: "journal: cannot write" in srv.log_text(), timeout=20, what="the journal's outage")
        during = [max(p.seen) for p in players]
        await wait_for(lambda: all(max(p.seen) >= n + 20 for p, n in zip(players, during)), timeout=20,
                       what="ticks during the outage")  # frames do not wait for a database that is gone
        outage_ticks = min(max(p.seen) - n for p, n in zip(players, during))
        proxy.restore()
        await wait_for(lambda: "journal: written again" in srv.log_text(), timeout=30, what="the journal written")
        await asyncio.sleep(scaled(0.3))
        srv.send(signal.SIGKILL)
        await srv.wait_exit()
    finally:
        for p in players:
            await p.stop()
    again = start(processes, tmp_path, dsn_with_schema(pg_schema), DRIFTER, {**settings, "tick_paused": "true"},
                  {"zones": 2})
    await again.ready(http)
    c = Client(again.url, http)
    for p in players:
        status, state = await c.call("GET", f"/api/debug/zones/{p.zone_id}/state", tokens[0])
        assert status == 200, state
        assert state["zone_tick_number"] >= max(p.seen)
        if state["zone_tick_number"] in p.seen:
            world = sorted([e["id"], e["x"], e["y"], e["width"], e["height"], e["metadata"]] for e in state["entities"])
            assert world == p.seen[state["zone_tick_number"]]
    figure("journal outage: ticks played while the database was cut, then all restored after a SIGKILL",
           outage_ticks)
