"""``gridserver.Client`` against a real server over real sockets: the REST verbs and their
errors, the socket's verbs and events, ``next`` and its buffers, reconnecting and resuming
after a drop, the ends that do not reconnect (logout, expiry, another connection), a close
that leaves no task behind, and the README's bot, run as written.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import uuid

import pytest

import gridserver
from gridserver import Client, ClientError
from helpers import ROOT, TcpProxy, make_config, scaled, stop_server, wait_for

PASSWORD = "correct horse"


class Recorder:
    """A game that records joins and leaves and broadcasts the tick number and the intents."""

    def __init__(self):
        self.joins: list = []
        self.leaves: list = []

    def on_init(self, framework):
        self.fw = framework

    def on_player_join(self, zone_id, player_id):
        self.joins.append(str(player_id))

    def on_player_leave(self, zone_id, player_id):
        self.leaves.append(str(player_id))

    def on_tick(self, zone_id, entities, intents, tick_number):
        return gridserver.TickResult(broadcast_state={"tick": tick_number, "intents": [i.data for i in intents]})

    def get_player_state(self, zone_id, player_id, full_state):
        return full_state


def config(tmp_path, dsn: str | None = None, **overrides) -> gridserver.Config:
    values = {"server_debug": True, "tick_interval": 0.05}
    values.update(overrides)
    return make_config(dsn or f"sqlite:///{tmp_path / 'db'}", **values)


def walkers_config(tmp_path) -> gridserver.Config:
    ini = tmp_path / "walkers.ini"
    ini.write_text(f"[database]\ndsn = sqlite:///{tmp_path / 'db'}\n[server]\ndebug = true\n"
                   "[auth]\nbcrypt_rounds = 4\n[tick]\ninterval = 0.05\n"
                   "[game_modules.walkers]\nfog_radius = 0\nwalls = 0\nitems = 0\nlobby_size = 40\n")
    return gridserver.Config.load(str(ini), environ={}).with_values(server_port=0)


async def player(running, **options) -> Client:
    """A fresh player's logged-in client (closed by the test)."""
    c = Client(running.url, timeout=scaled(10), reconnect_delay=(0.05, 0.5), **options)
    name = "p_" + uuid.uuid4().hex[:10]
    await c.register(name, PASSWORD)
    await c.login(name, PASSWORD)
    return c


def avatar(state: dict | None, player_id: str) -> dict | None:
    return next((e for e in (state or {}).get("entities", ()) if e.get("player_id") == player_id), None)


def client_tasks() -> list[str]:
    """The running tasks of clients and their handlers (by the name of their coroutine)."""
    names = (t.get_coro().__qualname__ for t in asyncio.all_tasks())
    return sorted(n for n in names if n.startswith("Client.") or "forever" in n)


# -- REST -------------------------------------------------------------------------------------

async def test_rest_verbs_answer_and_errors_raise_with_their_code(start_server, tmp_path, dsn):
    running = await start_server(config(tmp_path, dsn, auth_max_failed_logins=2), Recorder())
    async with Client(running.url + "/", timeout=scaled(10)) as c:
        with pytest.raises(ClientError) as err:
            await c.me()
        assert (err.value.status, err.value.code) == (401, "unauthorized")
        account = await c.register("alice", PASSWORD)
        assert account["username"] == "alice" and uuid.UUID(account["id"])
        with pytest.raises(ClientError) as err:
            await c.register("alice", PASSWORD)
        assert (err.value.status, err.value.code) == (409, "username_taken") and "taken" in err.value.message
        with pytest.raises(ClientError) as err:
            await c.register("bob", "short")
        assert (err.value.status, err.value.code) == (400, "bad_request") and "password" in err.value.message

        answer = await c.login("alice", PASSWORD)
        assert c.token == answer["token"] and c.player_id == answer["player_id"] == account["id"]
        me = await c.me()
        assert (me["id"], me["username"], me["is_debug"]) == (account["id"], "alice", True)

        zone = await c.create_zone("arena", 20, 10, {"theme": "sand"})
        assert (zone["name"], zone["width"], zone["height"], zone["metadata"]) == ("arena", 20, 10, {"theme": "sand"})
        got = await c.zone(zone["id"])
        assert (got["id"], got["name"], got["width"]) == (zone["id"], "arena", 20)
        assert [z["id"] for z in await c.zones()] == [zone["id"]]
        with pytest.raises(ClientError) as err:
            await c.create_zone("arena", 5, 5)
        assert (err.value.status, err.value.code) == (409, "zone_name_taken")
        paused = await c.request("POST", "/api/debug/tick/pause")
        assert paused["paused"] is True
        stepped = await c.request("POST", "/api/debug/tick/step")
        assert stepped["tick_number"] == paused["tick_number"] + 1
        await c.delete_zone(zone["id"])
        assert await c.zones() == []
        for bad in (zone["id"], "not-a-uuid"):
            with pytest.raises(ClientError) as err:
                await c.zone(bad)
            assert (err.value.status, err.value.code) == (404, "zone_not_found")

        for _ in range(2):
            with pytest.raises(ClientError) as err:
                await c.login("alice", "wrong password")
            assert (err.value.status, err.value.code) == (401, "invalid_credentials")
        with pytest.raises(ClientError) as err:
            await c.login("alice", "wrong password")
        assert (err.value.status, err.value.code) == (429, "too_many_attempts")
        assert err.value.retry_after is not None and err.value.retry_after > 0

        await c.logout()
        assert c.token is None
        c.token = answer["token"]  # the old token no longer works
        with pytest.raises(ClientError) as err:
            await c.me()
        assert (err.value.status, err.value.code) == (401, "unauthorized")

    async with Client("http://127.0.0.1:9", timeout=scaled(5)) as c:  # nothing listens on the discard port
        with pytest.raises(ClientError) as err:
            await c.zones()
        assert (err.value.status, err.value.code) == (0, "unreachable")
        with pytest.raises(ClientError) as err:
            await c.connect()
        assert err.value.code == "unauthorized"  # no token: not even tried


# -- the socket -------------------------------------------------------------------------------

async def test_subscribe_then_intents_move_the_walkers_avatar(start_server, tmp_path):
    running = await start_server(walkers_config(tmp_path))
    async with await player(running) as c:
        (lobby,) = [z for z in await c.zones() if z["name"] == "lobby"]
        opened = []
        c.on("open", opened.append)
        answer = await c.subscribe(lobby["id"])
        assert answer == {"type": "subscribed", "zone_id": lobby["id"]} and c.zone_id == lobby["id"]
        assert opened == [{"type": "open", "reconnect": False}] and c.connected
        tick = await c.next("tick", where=lambda m: avatar(m["state"], c.player_id) is not None)
        assert tick["zone_id"] == lobby["id"] and c.tick is tick and c.state is tick["state"]
        start = avatar(tick["state"], c.player_id)
        move, dx = ("left", -1) if start["x"] == lobby["width"] - 1 else ("right", 1)
        assert await c.intent({"move": move}) is True
        moved = await c.next(where=lambda m: avatar(m["state"], c.player_id)["x"] != start["x"])
        assert (avatar(moved["state"], c.player_id)["x"], avatar(moved["state"], c.player_id)["y"]) == \
            (start["x"] + dx, start["y"])

        await c.unsubscribe()
        assert c.zone_id is None
        c.clear("tick")
        with pytest.raises(TimeoutError, match="no 'tick' message within"):
            await c.next("tick", timeout=scaled(0.3))  # no ticks after leaving
        await c.intent({"move": "up"})
        error = await c.next("error")
        assert error["code"] == "not_subscribed"


async def test_next_keeps_what_arrived_between_calls_and_ticks_newest_first(start_server, tmp_path):
    running = await start_server(config(tmp_path, tick_paused=True), Recorder())
    async with await player(running) as c:
        zone = await c.create_zone("arena", 8, 8)
        await c.subscribe(zone["id"])
        seen, handled = [], []

        async def later(message):
            await asyncio.sleep(0)
            handled.append(message["type"])

        c.on("tick", lambda m: seen.append(m["tick_number"]))
        c.on("pong", later)
        rtts = [await c.ping(), await c.ping()]
        assert all(0 <= rtt < scaled(5) for rtt in rtts)
        assert [m["type"] for m in (await c.next("pong"), await c.next("pong"))] == ["pong", "pong"]
        with pytest.raises(TimeoutError, match=r"no 'pong' message within .*connected, zone " + zone["id"]):
            await c.next("pong", timeout=0.2)
        await wait_for(lambda: handled == ["pong", "pong"], what="both async pong handlers")

        numbers = [(await c.request("POST", "/api/debug/tick/step"))["tick_number"] for _ in range(3)]
        await wait_for(lambda: len(seen) == 3, what="three ticks")
        assert seen == numbers
        assert (await c.next("tick"))["tick_number"] == numbers[-1]  # the newest wins, once
        with pytest.raises(TimeoutError, match="no 'tick' message within"):
            await c.next("tick", timeout=0.2)

        for data in ({"n": 1}, {"n": 2}, {"n": 3}):
            await c.intent(data)
        await c.request("POST", "/api/debug/tick/step")
        tick = await c.next("tick")
        assert tick["state"]["intents"] == [{"n": 1}, {"n": 2}, {"n": 3}] and c.state == tick["state"]

        with pytest.raises(ClientError) as err:
            await c.subscribe(str(uuid.uuid4()))
        assert (err.value.status, err.value.code) == (0, "zone_not_found")
        assert c.zone_id == zone["id"]  # still where it was
        for _ in range(3):
            await c._ws.send_str("not json")
        codes = [(await c.next("error"))["code"] for _ in range(4)]  # the refusal came first, kept in order
        assert codes == ["zone_not_found", "bad_message", "bad_message", "bad_message"]
        await c._ws.send_str("[]")
        await c._ws.send_str('{"type": "intent"}')
        message = await c.next("error", where=lambda m: "data" in m["message"])
        assert message["code"] == "bad_message"  # the one about the array was dropped on the way
        with pytest.raises(TimeoutError, match="matching the condition"):
            await c.next("error", timeout=0.2, where=lambda m: False)


async def test_subscribes_past_the_rate_limit_are_refused(start_server, tmp_path):
    running = await start_server(config(tmp_path, tick_paused=True), Recorder())
    async with await player(running) as c:
        zones = [await c.create_zone(f"z{i}", 4, 4) for i in range(4)]
        await c.subscribe(zones[0]["id"])
        await c.subscribe(zones[1]["id"])
        for z in zones[2:]:  # the second refusal comes without an error message
            with pytest.raises(ClientError) as err:
                await c.subscribe(z["id"])
            assert err.value.code == "rate_limited"
        assert c.zone_id == zones[1]["id"]
        await c.request("POST", "/api/debug/tick/step")
        assert (await c.subscribe(zones[3]["id"]))["zone_id"] == zones[3]["id"]


async def test_a_cut_connection_reconnects_and_resumes_the_zone(start_server, tmp_path):
    game = Recorder()
    running = await start_server(config(tmp_path, websocket_reconnect_grace=30.0), game)
    proxy = await TcpProxy("127.0.0.1", running.server.port).start()
    try:
        async with await player(running) as admin:
            zone = await admin.create_zone("arena", 8, 8)
        c = Client(f"http://127.0.0.1:{proxy.port}", timeout=scaled(10), reconnect_delay=(0.05, 0.2))
        async with c:
            name = "p_" + uuid.uuid4().hex[:10]
            await c.register(name, PASSWORD)
            await c.login(name, PASSWORD)
            await c.subscribe(zone["id"])
            await c.next("tick")
            proxy.cut()
            closed = await c.next("close")
            assert closed["reconnecting"] is True and closed["reason"] is None and c.zone_id is None
            assert await c.intent({"lost": True}) is False
            await asyncio.sleep(0.3)  # a few refused attempts, backing off
            assert proxy.refused >= 1 and not c.connected
            proxy.restore()
            assert (await c.next("open"))["reconnect"] is False  # the first one, kept
            assert await c.next("open") == {"type": "open", "reconnect": True}
            resumed = await c.next("subscribed", where=lambda m: m.get("resumed"))
            assert resumed == {"type": "subscribed", "zone_id": zone["id"], "resumed": True}
            c.clear("tick")
            assert (await c.next("tick"))["zone_id"] == zone["id"] and c.zone_id == zone["id"]
            assert c.reconnects == 1 and game.leaves == [] and game.joins == [c.player_id]

            # The server drops it (as it drops a client that stays behind): the same again.
            running.srv.hub.conns[uuid.UUID(c.player_id)].abort()
            assert (await c.next("close"))["reconnecting"] is True
            await c.next("subscribed", where=lambda m: m.get("resumed"))
            assert c.reconnects == 2 and game.leaves == []

            # Unsubscribed while down: the zone the server resumes is left again.
            proxy.cut()
            await c.next("close")
            leaving = asyncio.ensure_future(c.unsubscribe())
            await asyncio.sleep(0.1)
            assert not leaving.done()  # waits for the socket
            proxy.restore()
            await asyncio.wait_for(leaving, scaled(10))
            assert c.zone_id is None and c.reconnects == 3
            assert running.srv.hub.conns[uuid.UUID(c.player_id)].zone_id is None
            await wait_for(lambda: game.leaves == [c.player_id], what="the game to see the player leave")
    finally:
        await proxy.close()


async def test_a_server_restart_closes_with_1001_and_the_client_comes_back(start_server, aiohttp_server, tmp_path):
    cfg = config(tmp_path, websocket_reconnect_grace=30.0)
    running = await start_server(cfg, Recorder())
    port = running.server.port
    async with await player(running) as c:
        zone = await c.create_zone("arena", 8, 8)
        await c.subscribe(zone["id"])
        await c.next("tick")
        await stop_server(running)  # graceful: the sockets close with 1001
        closed = await c.next("close")
        assert (closed["code"], closed["reconnecting"]) == (1001, True) and c.ended is None
        await asyncio.sleep(0.2)  # refused attempts meanwhile
        await aiohttp_server(gridserver.create_app(cfg, Recorder()), port=port)
        resumed = await c.next("subscribed", where=lambda m: m.get("resumed"))
        assert resumed["zone_id"] == zone["id"] and c.reconnects == 1
        c.clear("tick")
        assert (await c.next("tick"))["zone_id"] == zone["id"]


async def test_after_the_grace_period_the_client_subscribes_again(start_server, tmp_path):
    running = await start_server(config(tmp_path, websocket_reconnect_grace=0.0), Recorder())
    async with await player(running) as c:
        zone = await c.create_zone("arena", 8, 8)
        await c.subscribe(zone["id"])
        await c.next("tick")
        c.clear("subscribed")
        running.srv.hub.conns[uuid.UUID(c.player_id)].abort()
        await c.next("close")
        again = await c.next("subscribed")
        assert again == {"type": "subscribed", "zone_id": zone["id"]}  # not resumed: asked again
        conn = running.srv.hub.conns[uuid.UUID(c.player_id)]
        assert conn.zone_id == uuid.UUID(zone["id"])
        c.clear("tick")
        assert (await c.next("tick"))["zone_id"] == zone["id"]

        await c.unsubscribe()  # a drop after leaving does not put it back
        c.clear("open")
        running.srv.hub.conns[uuid.UUID(c.player_id)].abort()
        await c.next("open", where=lambda m: m["reconnect"])
        await c.ping()
        await c.ping()  # after anything the client would have sent on reconnecting
        await asyncio.sleep(0.2)
        assert c.zone_id is None and c.reconnects == 2
        assert running.srv.hub.conns[uuid.UUID(c.player_id)].zone_id is None
        assert uuid.UUID(c.player_id) not in running.srv.hub.members[uuid.UUID(zone["id"])]


async def test_logout_and_expiry_end_the_socket_without_reconnecting(start_server, tmp_path):
    running = await start_server(config(tmp_path), Recorder())
    async with await player(running) as c, await player(running) as admin:
        zone = await admin.create_zone("arena", 8, 8)
        await c.subscribe(zone["id"])
        await c.next("tick")
        await c.logout()
        closed = await c.next("close")
        assert (closed["code"], closed["reconnecting"], closed["reason"]) == (4001, False, "session_ended")
        assert (c.ended.status, c.ended.code) == (4001, "session_ended") and not c.connected
        c.clear("tick")
        with pytest.raises(ClientError) as err:
            await c.next("tick")
        assert err.value.code == "session_ended"
        with pytest.raises(ClientError):
            await c.intent({"move": "up"})
        await asyncio.sleep(0.3)
        assert c.reconnects == 0 and uuid.UUID(c.player_id) not in running.srv.hub.conns

        # logout(all=True) from another session ends this one's socket (4001) too.
        await c.login(c.username, PASSWORD)
        await c.subscribe(zone["id"])
        c.clear("close")
        other = Client(running.url, timeout=scaled(10))
        async with other:
            await other.login(c.username, PASSWORD)
            await other.logout(all=True)
        assert (await c.next("close"))["reason"] == "session_ended" and c.ended.code == "session_ended"

    (tmp_path / "ttl").mkdir()
    running = await start_server(config(tmp_path / "ttl", auth_session_ttl=1.0), Recorder())
    async with await player(running) as c:
        await c.connect()
        closed = await c.next("close", timeout=scaled(10))  # the session expires under it
        assert (closed["code"], closed["reconnecting"]) == (4001, False) and c.ended.code == "session_ended"
        await asyncio.sleep(0.3)
        assert c.reconnects == 0 and not running.srv.hub.conns


async def test_a_second_connection_of_the_player_replaces_the_first_which_stays_down(start_server, tmp_path):
    running = await start_server(config(tmp_path), Recorder())
    async with await player(running) as first:
        zone = await first.create_zone("arena", 8, 8)
        await first.subscribe(zone["id"])
        second = Client(running.url, timeout=scaled(10))
        async with second:
            await second.login(first.username, PASSWORD)
            await second.connect()
            assert await second.next("subscribed") == {"type": "subscribed", "zone_id": zone["id"], "resumed": True}
            closed = await first.next("close")
            assert (closed["code"], closed["reconnecting"], closed["reason"]) == (4000, False, "replaced")
            assert (first.ended.status, first.ended.code) == (4000, "replaced")
            await asyncio.sleep(0.5)  # ten ticks: the first does not come back
            assert first.reconnects == 0 and second.connected
            await second.ping()
            assert (await second.next("tick"))["zone_id"] == zone["id"]


async def test_an_idle_client_survives_the_servers_heartbeat(start_server, tmp_path):
    running = await start_server(config(tmp_path, websocket_heartbeat=0.1), Recorder())
    async with await player(running, heartbeat=None) as c:  # only answering the server's pings
        await c.connect()
        await asyncio.sleep(1.0)  # ten heartbeat periods without a word
        assert c.connected and c.reconnects == 0 and uuid.UUID(c.player_id) in running.srv.hub.conns


async def test_a_silent_server_is_found_by_the_clients_heartbeat(start_server, tmp_path):
    running = await start_server(config(tmp_path, websocket_reconnect_grace=30.0), Recorder())
    proxy = await TcpProxy("127.0.0.1", running.server.port).start()
    try:
        async with await player(running) as admin:
            zone = await admin.create_zone("arena", 8, 8)
            c = Client(f"http://127.0.0.1:{proxy.port}", token=admin.token, timeout=scaled(10), heartbeat=0.2,
                       reconnect_delay=(0.05, 0.2))
            async with c:
                await c.subscribe(zone["id"])
                await c.next("tick")
                proxy.stall()  # no byte passes, nothing is closed: only a ping can tell
                closed = await c.next("close", timeout=scaled(5))
                assert closed["reconnecting"] is True and closed["code"] != 4001
                proxy.restore()
                assert (await c.next("subscribed", where=lambda m: m.get("resumed")))["zone_id"] == zone["id"]
                c.clear("tick")
                assert (await c.next("tick"))["zone_id"] == zone["id"] and c.reconnects >= 1
    finally:
        await proxy.close()


async def test_close_stops_everything_and_leaves_no_task(start_server, tmp_path):
    running = await start_server(config(tmp_path), Recorder())
    c = await player(running)
    zone = await c.create_zone("arena", 8, 8)
    stuck = asyncio.Event()

    async def forever(message):
        stuck.set()
        await asyncio.sleep(3600)

    c.on("tick", forever)
    await c.subscribe(zone["id"])
    await asyncio.wait_for(stuck.wait(), scaled(5))
    assert "Client._run" in client_tasks() and any("forever" in n for n in client_tasks())
    await c.close()
    assert client_tasks() == []
    assert c.ended.code == "closed" and not c.connected
    with pytest.raises(ClientError, match="closed"):
        await c.intent({})
    await c.close()  # twice is fine
    await wait_for(lambda: not running.srv.hub.conns, what="the server to see the close")
    async with Client(running.url, token=c.token, session=running.http) as shared:  # a session it was given
        await shared.connect()
        assert (shared.player_id, shared.username) == (c.player_id, c.username)  # asked on connecting
    assert not running.http.closed and client_tasks() == []

    # Closed while waiting to reconnect: nothing is left either.
    proxy = await TcpProxy("127.0.0.1", running.server.port).start()
    try:
        c = Client(f"http://127.0.0.1:{proxy.port}", timeout=scaled(10), reconnect_delay=(5.0, 5.0))
        await c.login((await c.register("p_" + uuid.uuid4().hex[:8], PASSWORD))["username"], PASSWORD)
        await c.connect()
        proxy.cut()
        await c.next("close")
        assert client_tasks() == ["Client._run"]
        await c.close()
        assert client_tasks() == [] and (await c.next("close"))["reconnecting"] is False
    finally:
        await proxy.close()


async def test_a_logout_the_server_did_not_hear_keeps_the_session(start_server, tmp_path):
    running = await start_server(config(tmp_path), Recorder())
    proxy = await TcpProxy("127.0.0.1", running.server.port).start()
    c = Client(f"http://127.0.0.1:{proxy.port}", timeout=scaled(10), reconnect_delay=(0.05, 0.2))
    try:
        name = "p_" + uuid.uuid4().hex[:8]
        await c.register(name, PASSWORD)
        await c.login(name, PASSWORD)
        token = c.token
        proxy.cut()
        with pytest.raises(ClientError) as failed:
            await c.logout()
        assert failed.value.code == "unreachable" and c.token == token
        status, _ = await running.call("GET", "/api/auth/me", token)
        assert status == 200  # the session still lives: logging out again is the way
        proxy.restore()
        await c.logout()
        assert c.token is None and (await running.call("GET", "/api/auth/me", token))[0] == 401
    finally:
        await c.close()
        await proxy.close()


async def test_two_subscribes_at_once_share_one_socket(start_server, tmp_path):
    """Two callers connecting at once open one socket (two would replace each other: 4000),
    and a zone id in another spelling is the same zone."""
    running = await start_server(config(tmp_path), Recorder())
    c = await player(running)
    try:
        zone = await c.create_zone("twice", 8, 8)
        answers = await asyncio.gather(c.subscribe(zone["id"]), c.subscribe(zone["id"].upper()))
        assert [a["zone_id"] for a in answers] == [zone["id"], zone["id"]]
        assert await c.intent({"n": 1}) is True
        await c.next("tick", where=lambda m: {"n": 1} in m["state"]["intents"])
        assert c.ended is None and c.connected and c.reconnects == 0
        assert len(running.srv.hub.conns) == 1
    finally:
        await c.close()


async def test_a_handler_may_close_its_client(start_server, tmp_path):
    running = await start_server(config(tmp_path), Recorder())
    c = await player(running)
    zone = await c.create_zone("closing", 8, 8)
    closed = asyncio.Event()

    async def leave(message):
        await c.close()
        closed.set()

    c.on("tick", leave)
    await c.subscribe(zone["id"])
    await asyncio.wait_for(closed.wait(), scaled(5))
    assert c.ended.code == "closed" and not c.connected
    await wait_for(lambda: client_tasks() == [], what="the client's tasks to end")
    await wait_for(lambda: not running.srv.hub.conns, what="the server to see the close")


# -- the README's bot -------------------------------------------------------------------------

def readme_bot() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    section = readme.split("## Writing a bot (Python)", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)^```", section, re.M | re.S).group(1)


async def test_the_readme_bot_logs_in_joins_the_lobby_and_walks(start_server, tmp_path):
    running = await start_server(walkers_config(tmp_path))
    (tmp_path / "walk.py").write_text(readme_bot())
    spec = importlib.util.spec_from_file_location("walk", tmp_path / "walk.py")
    walk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(walk)
    async with await player(running) as admin:
        (lobby,) = await admin.zones()
        cells: list[tuple[int, int]] = []  # where the bot's avatar was, as the debug route saw it

        async def watch() -> None:
            while True:
                state = await admin.request("GET", f"/api/debug/zones/{lobby['id']}/state")
                for e in state["entities"]:
                    if e["metadata"].get("name") == "walker_bot" and (not cells or cells[-1] != (e["x"], e["y"])):
                        cells.append((e["x"], e["y"]))
                await asyncio.sleep(0.01)

        watcher = asyncio.ensure_future(watch())
        try:
            before = running.srv.metrics.intents_accepted_total
            await asyncio.wait_for(walk.main(running.url, "walker_bot", PASSWORD, ticks=12), scaled(30))  # registers
            moved = running.srv.metrics.intents_accepted_total - before
            assert moved >= 8 and len(set(cells)) >= 3, cells
            seen = len(cells)  # its avatar stays for the reconnect grace, and the bot comes back to it
            await asyncio.wait_for(walk.main(running.url, "walker_bot", PASSWORD, ticks=6), scaled(30))  # logs in
            assert running.srv.metrics.intents_accepted_total - before >= moved + 4
            await asyncio.sleep(0.1)
            assert len(cells) > seen, cells  # it moved again
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    with pytest.raises(ClientError) as err:
        await walk.main(running.url, "walker_bot", "a wrong password", ticks=1)
    assert err.value.code == "username_taken"  # not its password, and the name is taken
