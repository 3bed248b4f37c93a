"""``/client.js`` (``GridClient``) imported by a game's own page in a real headless Chromium, and
a game played through it against a real server: REST, the socket, every event, errors,
reconnect with resume, a replaced connection, logout and a session ended elsewhere.

The game page is the game's own, served by the server from ``[server] static_dir`` at
``/game/``; it only imports the client, and each step below runs in that page.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid

import pytest

from helpers import ROOT, wait_for
from test_browser import PASSWORD, page, until, walkers_config  # noqa: F401 (page is a fixture)

pytestmark = pytest.mark.slow

GAME_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>a game</title></head><body>
<script type="module">
import {GridClient, GridError} from "/client.js";
const c = window.c = new GridClient();
window.GridError = GridError;
window.GridClient = GridClient;
window.log = [];
for (const type of ["open", "close", "message"]) c.on(type, ev => window.log.push([type, ev]));
window.seen = type => window.log.filter(([t, ev]) => t === type || (t === "message" && ev.type === type)).map(e => e[1]);
window.fails = async p => { try { await p; return null; } catch (e) { return {name: e.name, status: e.status, code: e.code, message: e.message}; } };
window.ready = true;
</script></body></html>"""


def game_config(tmp_path, **overrides):
    """Walkers, with the game page below as ``[server] static_dir``'s ``index.html``."""
    (tmp_path / "game").mkdir()
    (tmp_path / "game" / "index.html").write_text(GAME_HTML)
    return walkers_config(tmp_path, server_static_dir=str(tmp_path / "game"), **overrides)


async def open_game(page, running, origin: str | None = None) -> None:
    await page.goto((origin or running.url) + "/game/")
    await until(page, "() => window.ready")


async def read_until_closed(ws) -> list[str]:
    """The types of the messages ``ws`` receives until it is closed."""
    return [m.json()["type"] async for m in ws]


def server_avatar(running, player_id: str):
    world = running.srv.world
    with world.lock:
        for entity_id in world.entity_zone:
            e = world.get_entity(entity_id)
            if e is not None and e.metadata.get("player_id") == player_id:
                return e
    return None


async def test_a_game_plays_through_gridclient(tmp_path, start_server, page):
    running = await start_server(game_config(tmp_path, server_debug=False))
    await open_game(page, running)
    name = "js_" + uuid.uuid4().hex[:8]

    # REST: register, login, errors as GridError with the server's code and status.
    player = await page.evaluate("async ([u, p]) => await c.register(u, p)", [name, PASSWORD])
    assert player["username"] == name
    taken = await page.evaluate("async ([u, p]) => await fails(c.register(u, p))", [name, PASSWORD])
    assert taken == {"name": "GridError", "status": 409, "code": "username_taken", "message": taken["message"]}
    wrong = await page.evaluate("async (u) => await fails(c.login(u, 'not the password'))", name)
    assert (wrong["status"], wrong["code"]) == (401, "invalid_credentials")
    early = await page.evaluate("async () => await fails(c.subscribe('x'))")
    assert early["code"] == "not_connected"
    login = await page.evaluate("async ([u, p]) => await c.login(u, p)", [name, PASSWORD])
    assert login["player_id"] == player["id"] and await page.evaluate("() => c.token") == login["token"]
    me = await page.evaluate("async () => await c.me()")
    assert me["username"] == name and me["is_debug"] is False
    zones = await page.evaluate("async () => await c.zones()")
    lobby = next(z for z in zones if z["name"] == "lobby")
    assert (await page.evaluate("async (id) => await c.zone(id)", lobby["id"]))["id"] == lobby["id"]
    missing = await page.evaluate("async () => await fails(c.zone('00000000-0000-0000-0000-000000000000'))")
    assert (missing["status"], missing["code"]) == (404, "zone_not_found")

    # The socket: connect, subscribe (the promise is the server's answer), ticks with the avatar.
    await page.evaluate("async () => await c.connect()")
    assert await page.evaluate("() => c.connected && seen('open').length === 1")
    answer = await page.evaluate("async (id) => await c.subscribe(id)", lobby["id"])
    assert answer == {"type": "subscribed", "zone_id": lobby["id"]}
    tick = await page.evaluate("""async (pid) => {
        for (;;) {
            const t = await c.next("tick");
            if (t.state.entities.some(e => e.player_id === pid)) return t;
        }}""", player["id"])
    assert tick["zone_id"] == lobby["id"] and tick["tick_number"] >= 1 and "sent_at" in tick
    assert await page.evaluate("() => c.state === c.tick.state && c.zoneId") == lobby["id"]

    # An intent acts: the avatar moves on the server, and the next ticks show it.
    x0 = server_avatar(running, player["id"]).x
    step = 1 if x0 < 19 else -1
    assert await page.evaluate("(dx) => c.intent({dx, dy: 0})", step) is True
    await wait_for(lambda: server_avatar(running, player["id"]).x == x0 + step, what="the move")
    await until(page, """([pid, x]) => c.state && c.state.entities.some(e => e.player_id === pid && e.x === x)""",
                [player["id"], x0 + step])

    # ping answers with the round trip; errors arrive as "error" events; a bad zone rejects.
    assert await page.evaluate("async () => await c.ping()") >= 0
    await page.evaluate("() => c.socket.send(JSON.stringify({type: 'dance'}))")
    error = await until(page, "() => seen('error').find(e => e.code === 'unknown_type')")
    assert "dance" in error["message"]
    bad = await page.evaluate("async () => await fails(c.subscribe('00000000-0000-0000-0000-000000000000'))")
    assert bad["code"] == "zone_not_found"
    assert await page.evaluate("() => c.wanted") == lobby["id"]  # a refused zone is not asked for again
    # an id in another spelling is the same zone: the answer is matched all the same
    assert await page.evaluate("async (id) => (await c.subscribe(id.toUpperCase())).zone_id", lobby["id"]) == lobby["id"]

    # The connection drops: "close" says it reconnects (backoff from 0.5 s, with jitter), it
    # comes back and the server resumes the zone: the same avatar, ticks again.
    avatar_id = str(server_avatar(running, player["id"]).id)
    ticks = await page.evaluate("() => seen('tick').length")
    running.srv.hub.conns[uuid.UUID(player["id"])].abort()
    drop = await until(page, "() => seen('close')[0]")
    assert drop["reconnecting"] is True and drop["attempt"] == 1 and 375 <= drop["delay"] <= 625
    await until(page, "() => seen('open').length === 2 && c.resumed")
    assert await page.evaluate("() => seen('subscribed').some(m => m.resumed === true)")
    assert await page.evaluate("() => c.state !== null && c.tick.zone_id") == lobby["id"]  # kept across the resume
    await until(page, "(n) => seen('tick').length > n + 3", ticks)
    assert str(server_avatar(running, player["id"]).id) == avatar_id

    # Another connection of the same player replaces this one (4000): the client does not fight it.
    other = await running.http.ws_connect(running.ws_url(login["token"]))
    other_reads = asyncio.ensure_future(read_until_closed(other))
    replaced = await until(page, "() => seen('close').find(e => e.code === 4000)")
    assert replaced["reconnecting"] is False and replaced["ended"] is False
    await asyncio.sleep(1.5)  # three times the first backoff: no reconnect happened
    assert await page.evaluate("() => c.socket === null && seen('open').length === 2")
    assert not other.closed and not other_reads.done()
    # connect() again takes the player back (the other socket is the one replaced now).
    await page.evaluate("async () => await c.connect()")
    kinds = await asyncio.wait_for(other_reads, 10)
    assert other.close_code == 4000 and kinds[0] == "subscribed", (kinds, other.exception())

    # logout(): the session ends on the server, the socket closes, nothing reconnects.
    await page.evaluate("async () => await c.logout()")
    assert await page.evaluate("() => c.token === null && c.socket === null && !c.connected")
    status, _ = await running.call("GET", "/api/auth/me", login["token"])
    assert status == 401
    last = await page.evaluate("() => seen('close').at(-1)")
    assert last["reconnecting"] is False and last["ended"] is True  # the server closed it: 4001


async def test_a_session_ended_elsewhere_stops_the_client(tmp_path, start_server, page):
    """Logout everywhere from another device: the socket closes with 4001, "close" says
    ``ended``, the token is dropped and nothing reconnects; connect() then refuses at once."""
    running = await start_server(game_config(tmp_path, server_debug=False))
    player = await running.player()
    await open_game(page, running)
    await page.evaluate("async ([u, p]) => { await c.login(u, p); await c.connect(); }", [player["username"], PASSWORD])
    # A client given the kept token (a reload) learns who it is when it connects.
    assert await page.evaluate("""async () => {
        window.c = new GridClient(undefined, {token: c.token}); window.log = [];
        for (const type of ["open", "close", "message"]) c.on(type, ev => window.log.push([type, ev]));
        await c.connect();
        return c.playerId; }""") == player["id"]
    await wait_for(lambda: uuid.UUID(player["id"]) in running.srv.hub.conns, what="the page's socket")
    status, _ = await running.call("POST", "/api/auth/logout", player["token"], json={"all": True})
    assert status == 204
    ended = await until(page, "() => seen('close').find(e => e.ended)")
    assert ended["code"] == 4001 and ended["reconnecting"] is False
    await asyncio.sleep(1.5)
    assert await page.evaluate("() => c.token === null && c.socket === null && seen('open').length === 1")
    refused = await page.evaluate("async () => await fails(c.connect())")
    assert (refused["status"], refused["code"]) == (401, "unauthorized")


async def test_a_dead_server_is_retried_with_growing_delays(tmp_path, start_server, tcp_proxy, page):
    """While the server cannot be reached each attempt waits about twice as long as the one
    before; a ``subscribe`` asked meanwhile is sent once the socket is open again."""
    running = await start_server(game_config(tmp_path, server_debug=False))
    player = await running.player()
    lobby = next(z for z in running.srv.world.zones.values() if z.zone.name == "lobby")
    proxy = await tcp_proxy("127.0.0.1", running.server.port)
    await open_game(page, running, f"http://127.0.0.1:{proxy.port}")
    await page.evaluate("async ([u, p]) => { await c.login(u, p); await c.connect(); }", [player["username"], PASSWORD])
    proxy.cut()  # the open socket is aborted, new connections are closed at once
    pending = asyncio.ensure_future(page.evaluate("async (id) => await c.subscribe(id)", str(lobby.zone.id)))
    closes = await until(page, "() => seen('close').length >= 3 && seen('close')", timeout=20)
    assert [c["attempt"] for c in closes[:3]] == [1, 2, 3] and all(c["reconnecting"] for c in closes[:3])
    delays = [c["delay"] for c in closes[:3]]
    assert 375 <= delays[0] <= 625 and 750 <= delays[1] <= 1250 and 1500 <= delays[2] <= 2500, delays
    assert not pending.done()
    proxy.restore()
    answer = await asyncio.wait_for(pending, 20)
    assert answer == {"type": "subscribed", "zone_id": str(lobby.zone.id)}
    assert await page.evaluate("() => c.connected && c.attempt === 0 && c.zoneId") == str(lobby.zone.id)
    await wait_for(lambda: running.srv.hub.conns.get(uuid.UUID(player["id"])) is not None
                   and running.srv.hub.conns[uuid.UUID(player["id"])].zone_id == lobby.zone.id, what="subscribed")

    # close() between two attempts: whatever waits is told at once, and nothing reconnects.
    proxy.cut()
    await until(page, "(n) => seen('close').length > n", len(closes))
    waiting = await page.evaluate("""async () => {
        const connecting = fails(c.connect()), ping = fails(c.ping());
        c.close();
        return [await connecting, await ping, seen('close').at(-1)]; }""")
    assert waiting[0]["code"] == "closed" and waiting[1]["code"] in ("closed", "not_connected")
    assert await page.evaluate("""async () => { c.connect().catch(() => {}); const tick = fails(c.next("tick", 60000));
        c.close(); return (await tick).code; }""") == "closed"
    assert waiting[2]["reconnecting"] is False
    proxy.restore()
    await asyncio.sleep(1.5)
    assert await page.evaluate("() => c.socket === null && !c.connected")


async def test_a_silent_network_is_noticed_by_the_heartbeat(tmp_path, start_server, tcp_proxy, page):
    """A connection that stops passing bytes without closing (a network change): the client
    pings after ``heartbeat`` ms of silence, gives the socket up after as long again, and
    reconnects once the network is back; the server resumes the zone."""
    running = await start_server(game_config(tmp_path, server_debug=False))
    player = await running.player()
    lobby = next(z for z in running.srv.world.zones.values() if z.zone.name == "lobby")
    proxy = await tcp_proxy("127.0.0.1", running.server.port)
    await open_game(page, running, f"http://127.0.0.1:{proxy.port}")
    await page.evaluate("""async ([u, p, zone]) => {
        window.c = new GridClient(undefined, {heartbeat: 500, backoff: {first: 200, max: 400}}); window.log = [];
        for (const type of ["open", "close", "message"]) c.on(type, ev => window.log.push([type, ev]));
        await c.login(u, p); await c.connect(); await c.subscribe(zone); }""",
                        [player["username"], PASSWORD, str(lobby.zone.id)])
    await until(page, "() => seen('tick').length > 2")
    proxy.stall()
    dropped = await until(page, "() => seen('close')[0]", timeout=10)
    assert dropped["reconnecting"] is True and dropped["reason"] == "the server stopped answering"
    proxy.restore()
    await until(page, "() => seen('open').length === 2 && c.connected && c.zoneId", timeout=20)
    ticks = await page.evaluate("() => seen('tick').length")
    await until(page, "(n) => seen('tick').length > n + 2", ticks)


def readme_game() -> str:
    """The README's ``game/index.html``: the first html block of "Writing a browser game"."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    section = text[text.index("## Writing a browser game (JavaScript)"):]
    return re.search(r"```html\n(.*?)```", section, re.S).group(1)


async def test_the_readme_browser_game_plays(tmp_path, start_server, page):
    """The README's game page, served from ``static_dir`` as written: a new player logs in
    (registered on the way), sees the ticks, and the arrow keys move the avatar."""
    (tmp_path / "game").mkdir()
    (tmp_path / "game" / "index.html").write_text(readme_game())
    running = await start_server(walkers_config(tmp_path, server_static_dir=str(tmp_path / "game"),
                                                server_debug=False))
    name = "readme_" + uuid.uuid4().hex[:6]
    await page.goto(running.url + "/game/")
    await page.fill("#username", name)
    await page.fill("#password", PASSWORD)
    await page.click("button")
    await until(page, "() => document.getElementById('status').textContent.startsWith('tick ')")
    assert await page.is_hidden("#login")
    player_id = await wait_for(lambda: next((str(p) for p, c in running.srv.hub.conns.items() if c.username == name),
                                            None), what="the page's socket")
    me = await wait_for(lambda: server_avatar(running, player_id), what="the avatar")
    x0, y0 = me.x, me.y
    key, step = ("ArrowRight", 1) if x0 < 19 else ("ArrowLeft", -1)
    await page.keyboard.press(key)
    await wait_for(lambda: server_avatar(running, player_id).x == x0 + step, what="the move")
    # the canvas shows the avatar where the server has it (640 px for the 20-cell lobby)
    await until(page, """([x, y]) => Array.from(document.getElementById('grid').getContext('2d')
        .getImageData(Math.floor((x + .5) * 32), Math.floor((y + .5) * 32), 1, 1).data).slice(0, 3).join() === '47,126,216'""",
                [x0 + step, y0])
    # a wrong password on the next visit is told, not thrown
    await page.goto(running.url + "/game/")
    await page.fill("#username", name)
    await page.fill("#password", "not the password")
    await page.click("button")
    await until(page, "() => document.getElementById('problem').textContent.length > 0")
    assert await page.is_visible("#login")


async def test_a_page_from_another_origin_plays_with_cors_origins(tmp_path, start_server, tcp_proxy, page):
    """The game page comes from another origin (a development server: here a proxy on another
    port) and names the server as ``baseUrl``: with ``[server] cors_origins`` listing the
    page's origin the browser lets GridClient log in and play; without it, it does not."""
    proxy = await tcp_proxy("127.0.0.1", 1)  # upstream set once the server's port is known
    elsewhere = f"http://127.0.0.1:{proxy.port}"
    running = await start_server(game_config(tmp_path, server_debug=False, server_cors_origins=elsewhere))
    proxy.upstream = ("127.0.0.1", running.server.port)
    player = await running.player()
    await open_game(page, running, elsewhere)
    answer = await page.evaluate("""async ([url, u, p]) => {
        window.c = new GridClient(url); window.log = [];
        for (const type of ["open", "close", "message"]) c.on(type, ev => window.log.push([type, ev]));
        await c.login(u, p);
        await c.connect();
        const lobby = (await c.zones()).find(z => z.name === "lobby");
        return await c.subscribe(lobby.id); }""", [running.url, player["username"], PASSWORD])
    assert answer["type"] == "subscribed"
    await until(page, "() => seen('tick').length > 1")

    # Not listed: the browser keeps the answers from the page.
    (tmp_path / "other").mkdir()
    strict = await start_server(game_config(tmp_path / "other", server_debug=False))
    refused = await page.evaluate("async ([url, u, p]) => await fails(new GridClient(url).login(u, p))",
                                  [strict.url, player["username"], PASSWORD])
    assert refused["code"] == "unreachable"
