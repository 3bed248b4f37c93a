"""The page served at ``/``, in a real headless Chromium driven by Playwright.

Chromium is Debian's ``chromium`` package (``GRIDSERVER_TEST_CHROMIUM``, default
``/usr/bin/chromium``), started with the flags below and a fresh profile in ``tmp_path``;
Playwright's own browser downloads are never used. Without Chromium or the ``playwright``
package the browser tests are skipped with the reason (``-rs`` in setup.cfg prints it),
unless ``GRIDSERVER_REQUIRE_BROWSER=1`` (CI sets it once Chromium is installed) makes that
a failure. The server runs in-process on a real port; the test reads what the page shows
from ``window.gridserver`` (its state), the DOM and canvas pixels, and checks it against
the server's own world.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import sys
import uuid

import pytest

import gridserver
from helpers import make_config, scaled, wait_for

CHROMIUM = os.environ.get("GRIDSERVER_TEST_CHROMIUM", "/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("GRIDSERVER_REQUIRE_BROWSER") == "1"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
AVATAR_RGB = (0x2F, 0x7E, 0xD8)     # walkers' avatar colour
BACKGROUND_RGB = (0x0E, 0x11, 0x16)  # the page's empty cell
PASSWORD = "correct horse"

pytestmark = pytest.mark.slow


def _missing_browser() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    return None


@pytest.fixture
async def page(tmp_path):
    """A page in a fresh headless Chromium profile; skipped (with the reason) without Chromium."""
    reason = _missing_browser()
    if reason:
        if REQUIRE_BROWSER:
            pytest.fail(f"browser required (GRIDSERVER_REQUIRE_BROWSER=1): {reason}")
        print(f"\nbrowser test skipped: {reason}", file=sys.stderr)
        pytest.skip(reason)
    from playwright.async_api import async_playwright
    pw = await async_playwright().start()
    context = await pw.chromium.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=CHROMIUM, args=FLAGS, headless=True,
        viewport={"width": 1200, "height": 720})
    page = context.pages[0] if context.pages else await context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}") if "Content Security Policy" in msg.text else None)
    page.set_default_timeout(scaled(15) * 1000)
    try:
        yield page
    finally:
        await context.close()
        await pw.stop()
    assert not problems, problems


def walkers_config(tmp_path, game: dict | None = None, **overrides) -> gridserver.Config:
    """Walkers without walls, items or fog (unless ``game`` sets them), so every move succeeds."""
    settings = {"fog_radius": 0, "walls": 0, "items": 0, "lobby_size": 20, **(game or {})}
    ini = tmp_path / "walkers.ini"
    ini.write_text("[game_modules.walkers]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    values = {"database_dsn": f"sqlite:///{tmp_path / 'db'}", "auth_bcrypt_rounds": 4, "tick_interval": 0.1,
              "persistence_interval": 0.5, "websocket_heartbeat": 5.0, "server_port": 0, "server_debug": True}
    values.update(overrides)
    return gridserver.Config.load(str(ini), environ={}).with_values(**values)


async def until(page, js: str, arg=None, timeout: float = 15.0):
    """Wait until the JavaScript function ``js`` returns something truthy; return it
    (``timeout`` is scaled)."""
    handle = await page.wait_for_function(js, arg=arg, timeout=scaled(timeout) * 1000)
    return await handle.json_value()


async def g(page, expr: str):
    """The value of a JavaScript expression on the page (``gridserver`` is its state)."""
    return await page.evaluate(f"() => {{ const gridserver = window.gridserver; return ({expr}); }}")


async def avatar(page) -> dict:
    return await until(page, "() => { const a = window.gridserver.avatar(); return a && {id: a.id, x: a.x, y: a.y}; }")


async def pixel(page, x: float, y: float) -> tuple:
    """The canvas colour at the centre of cell (x, y)."""
    rgba = await page.evaluate("""([x, y]) => {
        const c = document.getElementById('grid'), s = window.gridserver.scale, d = window.devicePixelRatio || 1;
        return Array.from(c.getContext('2d').getImageData(Math.floor((x + .5) * s * d), Math.floor((y + .5) * s * d), 1, 1).data);
    }""", [x, y])
    return tuple(rgba[:3])


async def click_cell(page, x: float, y: float) -> None:
    box = await page.locator("#grid").bounding_box()
    scale = await g(page, "gridserver.scale")
    await page.mouse.click(box["x"] + (x + .5) * scale, box["y"] + (y + .5) * scale)


async def log_in(page, url: str, username: str, register: bool) -> None:
    await page.goto(url + "/")
    await page.fill("#username", username)
    await page.fill("#password", PASSWORD)
    await page.click("#do-register" if register else "#do-login")
    await page.wait_for_selector("#zones button")


def server_avatar(running, player_id: str):
    with running.srv.world.lock:
        for e in running.srv.world.entity_zone:
            entity = running.srv.world.get_entity(e)
            if entity and entity.metadata.get("player_id") == player_id:
                return entity
    return None


async def test_play_and_debug_in_chromium(tmp_path, start_server, page):
    running = await start_server(walkers_config(tmp_path))
    engine = running.srv.engine
    username = "br_" + uuid.uuid4().hex[:8]
    await log_in(page, running.url, username, register=True)
    assert await page.is_visible("#debug")
    assert username in await page.inner_text("#who")

    # Pick the lobby: the player's avatar appears, highlighted, where the server has it.
    await page.click("#zones button:has-text('lobby')")
    me = await g(page, "gridserver.me.id")
    a = await avatar(page)
    assert await g(page, "gridserver.subscribed") == await g(page, "gridserver.zone.id")
    ent = server_avatar(running, me)
    assert ent is not None and str(ent.id) == a["id"] and (ent.x, ent.y) == (a["x"], a["y"])
    assert await pixel(page, a["x"], a["y"]) == AVATAR_RGB
    assert await g(page, "gridserver.tick") > 0
    assert re.search(r"\d+\.\d s", await page.inner_text("#since"))

    # Keys move the avatar one cell per press: arrows and WASD (no walls, nobody else).
    for forward, back, axis in (("ArrowRight", "ArrowLeft", "x"), ("d", "a", "x"),
                                ("ArrowDown", "ArrowUp", "y"), ("s", "w", "y")):
        before = await avatar(page)
        key, step = (forward, 1) if before[axis] < 19 else (back, -1)
        await page.keyboard.press(key)
        want = dict(before, **{axis: before[axis] + step})
        moved = await until(page, "(w) => { const a = window.gridserver.avatar();"
                                  " return a && a.x === w.x && a.y === w.y && {x: a.x, y: a.y}; }", want)
        assert moved == {"x": want["x"], "y": want["y"]}
        assert await pixel(page, want["x"], want["y"]) == AVATAR_RGB
        assert await pixel(page, before["x"], before["y"]) != AVATAR_RGB  # (the label may be drawn there)
    a = await avatar(page)
    await wait_for(lambda: (lambda e: e is not None and (e.x, e.y) == (a["x"], a["y"]))(server_avatar(running, me)))

    # An error from the server is shown, not swallowed.
    await page.evaluate("() => window.gridserver.client.socket.send('not json')")
    await until(page, "() => document.getElementById('errors').textContent.includes('bad_message')")

    # Pause: the tick stops, on the server and on the page.
    await page.click("#pause")
    await until(page, "() => document.getElementById('paused').textContent.startsWith('paused')")
    assert engine.paused
    await wait_for(lambda: not engine._tick_lock.locked())  # a tick already under way finishes
    paused_at = engine.tick_number
    await until(page, "(t) => window.gridserver.tick === t", paused_at)
    await asyncio.sleep(0.6)  # six tick intervals
    assert engine.tick_number == paused_at and await g(page, "gridserver.tick") == paused_at

    # A move sent while paused happens on the step; the step advances exactly one tick.
    before = await avatar(page)
    key, step = ("ArrowRight", 1) if before["x"] < 19 else ("ArrowLeft", -1)
    accepted = running.srv.metrics.intents_accepted_total
    await page.keyboard.press(key)
    await wait_for(lambda: running.srv.metrics.intents_accepted_total > accepted, what="the move queued")
    assert (await avatar(page))["x"] == before["x"]
    await page.click("#step")
    await until(page, "(t) => window.gridserver.tick === t", paused_at + 1)
    await until(page, "(x) => window.gridserver.avatar().x === x", before["x"] + step)
    # One tick number on the page: the header's, from the zone's tick messages.
    await until(page, "(t) => document.getElementById('tick').textContent === String(t)", paused_at + 1)
    assert await page.inner_text("#paused") == "paused"
    await asyncio.sleep(0.6)
    assert engine.tick_number == paused_at + 1 and await g(page, "gridserver.tick") == paused_at + 1

    # Click the avatar on the canvas: the entity's JSON from the debug endpoint.
    a = await avatar(page)
    await click_cell(page, a["x"], a["y"])
    text = await until(page, "(id) => { const t = document.getElementById('entity').textContent;"
                             " return t.includes(id) && t.includes('zone_id') && t; }", a["id"])
    shown = json.loads(text)
    assert shown["id"] == a["id"] and (shown["x"], shown["y"]) == (a["x"], a["y"])
    assert shown["metadata"]["player_id"] == me and shown["zone_id"] == await g(page, "gridserver.zone.id")

    # Stepping while running is refused, and the page says so.
    await page.click("#resume")
    await until(page, "(t) => window.gridserver.tick > t + 2", paused_at + 1)
    assert not engine.paused
    await page.click("#step")
    await until(page, "() => document.getElementById('errors').textContent.includes('Pause the tick')")

    # The list of connected players (refreshed every few seconds).
    await until(page, "(u) => document.getElementById('connections').textContent.includes(u + ' in lobby')", username)

    # The socket drops: the page says it is reconnecting, comes back and resumes the zone.
    ticks = await g(page, "gridserver.ticks")
    running.srv.hub.conns[uuid.UUID(me)].abort()
    await until(page, "() => document.getElementById('status').textContent.startsWith('reconnecting')")
    await until(page, "() => window.gridserver.connected && window.gridserver.resumed")
    assert "connected (resumed lobby)" in await page.inner_text("#status")
    await until(page, "(n) => window.gridserver.ticks > n + 3", ticks)
    assert (await avatar(page))["id"] == a["id"]  # the same avatar: the game saw no leave


async def test_login_errors_and_no_debug_panel(tmp_path, start_server, page):
    running = await start_server(walkers_config(tmp_path, server_debug_players="somebody_else"))
    player = await running.player()
    await page.goto(running.url + "/")
    await page.fill("#username", player["username"])
    await page.fill("#password", "wrong password")
    await page.click("#do-login")
    await until(page, "() => document.getElementById('login-error').textContent.includes('wrong')")
    await page.click("#do-register")  # the name is taken: the server's 409 is shown
    await until(page, "() => document.getElementById('login-error').textContent.includes('taken')")
    await page.fill("#password", PASSWORD)
    await page.click("#do-login")
    await page.wait_for_selector("#zones button")
    assert await g(page, "gridserver.me.is_debug") is False
    assert not await page.is_visible("#debug")

    # Moving before picking a zone is explained; then play without debug rights.
    await page.keyboard.press("ArrowUp")
    await until(page, "() => document.getElementById('errors').textContent.includes('pick a zone')")
    await page.click("#zones button:has-text('lobby')")
    a = await avatar(page)
    assert await g(page, "gridserver.source") == "tick state"

    # Without debug rights a click shows the tick state's entry for the entity.
    await click_cell(page, a["x"], a["y"])
    text = await until(page, "(id) => { const t = document.getElementById('entity').textContent;"
                             " return t.includes(id) && t; }", a["id"])
    assert json.loads(text)["player_id"] == player["id"]

    # A reload keeps the session (sessionStorage) and the zone (resumed or resubscribed).
    await page.reload()
    await until(page, "() => window.gridserver.subscribed && window.gridserver.avatar()")
    # Logging out forgets the token and returns to the form.
    await page.click("#logout")
    await page.wait_for_selector("#login")
    assert await page.evaluate("() => sessionStorage.getItem('gridserver.token')") is None
    status, _ = await running.call("GET", "/api/auth/me", player["token"])
    assert status == 200  # only the page's own session ended


class Shapes:
    """A game that keeps its entities out of the tick state: the page must use the debug state."""

    def on_init(self, framework):
        self.fw = framework
        if not framework.list_zones():
            framework.create_zone("shapes", 10, 5)

    def on_tick(self, zone_id, entities, intents, tick_number):
        creates = [] if entities else [
            gridserver.EntityCreate(1, 1, 3, 2, {"kind": "block", "color": "#ff0000", "label": "red block"}),
            gridserver.EntityCreate(7, 3, 0, 0, {"kind": "beacon", "color": "rgb(0, 255, 0)"}),
            gridserver.EntityCreate(8, 0, 1, 1, {"kind": "thing"}),
        ]
        return gridserver.TickResult(entity_creates=creates, broadcast_state={"tick": tick_number, "count": len(entities)})

    def get_player_state(self, zone_id, player_id, full_state):
        return full_state


async def test_any_game_drawn_from_the_debug_state(tmp_path, start_server, page):
    cfg = make_config(f"sqlite:///{tmp_path / 'db'}", server_debug=True)
    running = await start_server(cfg, Shapes())
    await log_in(page, running.url, "sh_" + uuid.uuid4().hex[:8], register=True)
    await page.click("#zones button:has-text('shapes')")
    await until(page, "() => window.gridserver.source === 'debug state' && window.gridserver.entities.length === 3")
    assert await pixel(page, 2, 2) == (255, 0, 0)          # the 3x2 block covers (1..3, 1..2)
    assert await pixel(page, 7, 3) == (0, 255, 0)          # the 0x0 point: a marker in its cell
    assert await pixel(page, 5, 2) == BACKGROUND_RGB
    thing = await pixel(page, 8, 0)                        # no colour: one chosen from its kind
    assert thing not in (BACKGROUND_RGB, (255, 0, 0), (0, 255, 0))
    assert await g(page, "gridserver.entities.find(e => e.kind === 'block').label") == "red block"
    await click_cell(page, 7, 3)
    text = await until(page, "() => { const t = document.getElementById('entity').textContent;"
                             " return t.includes('beacon') && t; }")
    assert json.loads(text)["width"] == 0


async def test_page_is_self_contained(tmp_path, start_server):
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}"))  # debug off: the page is there
    async with running.http.get(running.url + "/") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        csp = resp.headers["Content-Security-Policy"]
        html = await resp.text()
    async with running.http.head(running.url + "/") as resp:
        assert resp.status == 200
    assert html == gridserver.PAGE_HTML
    # Nothing from elsewhere: no absolute URL anywhere, every src/href local or data:.
    url = re.search(r".{0,40}(?:(?:https?|wss?|ftp)://|(?<![:/])//)[a-z0-9\[].{0,40}", html, re.I)
    assert url is None, url.group(0)
    for ref in re.findall(r"""(?:src|href|action)\s*=\s*["']([^"']*)""", html, re.I):
        assert ref.startswith("data:") or not re.match(r"[a-z][a-z0-9+.-]*:|//", ref, re.I), ref
    assert "<script src" not in html and "@import" not in html and "url(" not in html
    # The CSP allows exactly the page's own script and style, and connections to itself only.
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    for tag, allowed in (("script", "'self' "), ("style", "")):
        body = re.search(rf"<{tag}[^>]*>(.*?)</{tag}>", html, re.S).group(1)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert directives[f"{tag}-src"] == f"{allowed}'sha256-{digest}'"
        assert html.count(f"<{tag}") == 1
    # 'self' in script-src is for the one module the page imports: the client, from this server.
    script = re.search(r"<script[^>]*>(.*?)</script>", html, re.S).group(1)
    assert re.findall(r"^import .*$|import\(", script, re.M) == ['import {GridClient} from "/client.js";']
    async with running.http.get(running.url + "/client.js") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        client = await resp.text()
    assert client == gridserver.CLIENT_JS and "export class GridClient" in client
    assert not re.search(r"^\s*import\b|import\(|https?://(?!host)", client, re.M)  # no dependency, nothing from elsewhere
    assert directives["connect-src"].split()[0] == "'self'"
    assert all(src.startswith(("'self'", "ws://127.0.0.1:", "wss://127.0.0.1:"))
               for src in directives["connect-src"].split())
    markup = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", html, flags=re.S)
    assert not re.search(r"<[^>]*\s(on[a-z]+|style)\s*=", markup, re.I)  # no inline handlers or styles


async def test_the_time_line_steps_a_zone_forward_and_back(tmp_path, start_server, page):
    """The debug panel's time line: Forward pauses and runs one tick and shows its inputs;
    Back rewinds the zone one tick (the journal replayed) and the grid shows that tick again."""
    running = await start_server(walkers_config(tmp_path, persistence_interval=0.1))
    await log_in(page, running.url, "tl_" + uuid.uuid4().hex[:8], register=True)
    await page.click("#zones button:has-text('lobby')")
    start = await avatar(page)
    await wait_for(lambda: running.srv.metrics.flushes_total >= 2, what="a flush with the zone's snapshot")
    key, step = ("ArrowRight", 1) if start["x"] < 18 else ("ArrowLeft", -1)
    await page.click("#forward")  # pauses first, then one tick
    tick = await until(page, "() => window.gridserver.paused === true && window.gridserver.timeline"
                             " && window.gridserver.timeline.tick")
    positions = {}
    for _ in range(2):
        accepted = running.srv.metrics.intents_accepted_total
        await page.keyboard.press(key)
        await wait_for(lambda: running.srv.metrics.intents_accepted_total > accepted, what="the move queued")
        await page.click("#forward")
        tick = await until(page, "(t) => window.gridserver.timeline.tick > t && window.gridserver.timeline.tick",
                           tick)
        await until(page, "(t) => window.gridserver.tick === t", tick)
        positions[tick] = (await avatar(page))["x"]
        inputs = await page.inner_text("#inputs")
        assert '{"move":"%s"}' % ("right" if step == 1 else "left") in inputs.replace(" ", ""), inputs
    last = max(positions)
    assert positions[last] == positions[last - 1] + step  # each Forward moved it one cell
    await page.click("#back")
    await until(page, "(t) => window.gridserver.tick === t && document.getElementById('timeline').textContent"
                      ".includes('rewound')", last - 1)
    await until(page, "(x) => window.gridserver.avatar().x === x", positions[last - 1])
    assert "move" in await page.inner_text("#inputs")  # the inputs of the tick shown
    zs = next(iter(running.srv.world.zones.values()))
    assert zs.tick_number == last - 1 and running.srv.engine.paused
    await page.click("#forward")  # after a rewind to N the zone's next tick is N+1
    await until(page, "(t) => window.gridserver.timeline.tick === t && window.gridserver.tick === t", last)
    assert zs.tick_number == last and running.srv.engine.tick_number > last
    await page.click("#back")
    await until(page, "(t) => window.gridserver.tick === t && document.getElementById('timeline').textContent"
                      ".includes('rewound')", last - 1)
    shots = os.environ.get("GRIDSERVER_SCREENSHOTS")
    if shots:  # the README's picture: GRIDSERVER_SCREENSHOTS=tests pytest -k time_line
        await page.screenshot(path=os.path.join(shots, "timeline-screenshot.png"), full_page=True)


class Breakable(gridserver.BuiltinDemo):
    """The built-in demo, whose ticks raise while ``broken``."""

    broken = False

    def on_tick(self, zone_id, entities, intents, tick_number):
        if self.broken:
            raise RuntimeError("the rules broke on purpose")
        return super().on_tick(zone_id, entities, intents, tick_number)


async def test_a_failing_zone_is_shown_over_its_grid_until_it_recovers(tmp_path, start_server, page):
    game = Breakable()
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}", server_debug=True), game)
    await log_in(page, running.url, "br_" + uuid.uuid4().hex[:8], register=True)
    await page.click("#zones button:has-text('lobby')")
    spot = await avatar(page)
    x, y = (spot["x"] + 3) % 24, spot["y"]  # a cell with nothing on it
    assert await pixel(page, x, y) == BACKGROUND_RGB
    game.broken = True
    message = await until(page, "() => window.gridserver.zoneFailed && window.gridserver.zoneFailed.message")
    assert "RuntimeError: the rules broke on purpose" in message  # a debug player reads the error
    r, g_, b = await pixel(page, x, y)
    assert r > 90 and g_ < 40 and b < 40, (r, g_, b)  # the grid is covered by the failure
    game.broken = False
    await until(page, "() => window.gridserver.zoneFailed === null")
    await until(page, "([x, y]) => { const c = document.getElementById('grid'), s = window.gridserver.scale,"
                      " d = window.devicePixelRatio || 1; const p = c.getContext('2d').getImageData("
                      "Math.floor((x + .5) * s * d), Math.floor((y + .5) * s * d), 1, 1).data; return p[0] < 60; }",
                [x, y])


def screenshot_dir() -> str | None:
    """Where the README's pictures go: ``GRIDSERVER_SCREENSHOTS=tests pytest tests/test_browser.py``."""
    return os.environ.get("GRIDSERVER_SCREENSHOTS")


def overlapping(boxes: list[dict]) -> list[tuple]:
    return [(a["text"], b["text"]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]]


async def test_the_page_shows_the_whole_game(tmp_path, start_server, page):
    """Many players in a long, low zone: labels never overlap (yours in full, the others
    shortened, a hovered one in full), the score table from the tick state beside the grid,
    and the zone list's player counts follow players coming and going."""
    running = await start_server(walkers_config(tmp_path))
    me = "me_" + uuid.uuid4().hex[:6]
    await log_in(page, running.url, me, register=True)
    token = await g(page, "gridserver.client.token")
    strip = await running.zone(token, "strip", 50, 6)
    bots = contextlib.AsyncExitStack()
    async with bots:
        clients = []
        for i in range(20):
            c = await bots.enter_async_context(gridserver.Client(running.url))
            name = f"walker_number_{i:02d}_" + uuid.uuid4().hex[:4]
            await c.register(name, PASSWORD)
            await c.login(name, PASSWORD)
            await c.subscribe(strip["id"])
            clients.append(c)
        await page.click("#reload-zones")
        await page.click("#zones button:has-text('strip')")
        await until(page, "() => window.gridserver.entities.filter(e => e.kind === 'avatar').length === 21")
        await until(page, "() => window.gridserver.avatar()")
        assert await g(page, "gridserver.scale") >= 10  # the others' labels are drawn at this size
        boxes = await g(page, "gridserver.labels")
        assert boxes and not overlapping(boxes)
        c = await page.evaluate("() => { const c = document.getElementById('grid'); return [c.clientWidth, c.clientHeight]; }")
        assert all(0 <= b["x"] and b["x"] + b["w"] <= c[0] + 0.5 and 0 <= b["y"] and b["y"] + b["h"] <= c[1] + 0.5 for b in boxes)
        mine = await g(page, "gridserver.avatar().id")
        assert [b["text"] for b in boxes if b["id"] == mine] == [me]
        others = [b["text"] for b in boxes if b["id"] != mine]
        assert others and all(len(t) <= 8 and t.endswith("…") for t in others)
        assert len(boxes) < 21  # crowded: some labels had no room and were left out

        # Hovering an avatar shows its whole name (and the canvas's tooltip says it).
        shown = {b["id"] for b in boxes}
        target = await g(page, "gridserver.entities.find(e => e.kind === 'avatar' && !e.mine)")
        box = await page.locator("#grid").bounding_box()
        scale = await g(page, "gridserver.scale")
        await page.mouse.move(box["x"] + (target["x"] + .5) * scale, box["y"] + (target["y"] + .5) * scale)
        await until(page, "(id) => window.gridserver.hovered === id", target["id"])
        hovered = await until(page, "(id) => window.gridserver.labels.find(b => b.id === id)", target["id"])
        assert hovered["text"] == target["label"] and len(target["label"]) > 8
        assert await page.get_attribute("#grid", "title") == target["label"]
        assert not overlapping(await g(page, "gridserver.labels"))
        del shown

        # The score table: the tick state's "scores", not entities, in the game state panel.
        await until(page, "() => document.querySelector('#state table')")
        header = await page.eval_on_selector_all("#state table th", "els => els.map(e => e.textContent)")
        assert header == ["name", "score"]
        rows = await page.eval_on_selector_all("#state table tr", "rows => rows.slice(1).map(r => r.cells[0].textContent)")
        assert len(rows) == 10 and rows == sorted(rows)  # all score 0: by name
        assert "tick" in await page.inner_text("#state")

        # Live player counts: the zone's button follows players leaving.
        await until(page, "() => document.querySelector(\"#zones button[data-zone] .n\") &&"
                          " [...document.querySelectorAll('#zones button')].some(b => b.textContent.includes('21 players'))")
        for c in clients[:5]:
            await c.close()
        await until(page, "() => [...document.querySelectorAll('#zones button')].some(b => b.textContent.includes('strip')"
                          " && b.textContent.includes('16 players'))", timeout=30)
        if screenshot_dir():
            await page.mouse.move(box["x"] + (target["x"] + .5) * scale, box["y"] + (target["y"] + .5) * scale)
            await page.screenshot(path=os.path.join(screenshot_dir(), "page-screenshot.png"), full_page=True)


async def test_the_fogged_view_is_dimmed(tmp_path, start_server, page):
    """With fog, walkers' tick state names the cells the player sees ("view"): the page dims
    every other cell, so what is not shown reads as unseen, not as empty."""
    running = await start_server(walkers_config(tmp_path, {"fog_radius": 3, "items": 12, "walls": 3}))
    await log_in(page, running.url, "fog_" + uuid.uuid4().hex[:6], register=True)
    await page.click("#zones button:has-text('lobby')")
    a = await avatar(page)
    view = await until(page, "() => window.gridserver.view && window.gridserver.view.length && window.gridserver.view")
    assert view == [{"x": a["x"] - 3, "y": a["y"] - 3, "w": 7, "h": 7}]
    await until(page, "(a) => { const v = window.gridserver.view[0]; const m = window.gridserver.avatar();"
                      " return m && v.x === m.x - 3 && m.x === a.x && m.y === a.y; }", a)
    seen = {(e["x"] + i, e["y"] + j)  # every cell an entity covers (a wall spans several)
            for e in await g(page, "gridserver.entities.map(e => ({x: e.x, y: e.y, w: e.w, h: e.h}))")
            for i in range(max(e["w"], 1)) for j in range(max(e["h"], 1))}
    inside = [(x, y) for x in range(a["x"] - 3, a["x"] + 4) for y in range(a["y"] - 3, a["y"] + 4)
              if 0 <= x < 20 and 0 <= y < 20 and (x, y) not in seen and abs(y - a["y"]) == 0]
    outside = [(x, y) for x in range(20) for y in range(20)
               if (abs(x - a["x"]) > 4 or abs(y - a["y"]) > 4)]
    assert inside and outside
    dimmed = tuple(round(c * 0.4) for c in BACKGROUND_RGB)
    assert await pixel(page, *inside[0]) == BACKGROUND_RGB
    colours = [await pixel(page, *cell) for cell in outside[:40]]
    assert all(max(abs(p - d) for p, d in zip(colour, dimmed)) <= 1 for colour in colours), colours
    assert await pixel(page, a["x"], a["y"]) == AVATAR_RGB  # the player's own cell is in the view
    if screenshot_dir():
        await page.screenshot(path=os.path.join(screenshot_dir(), "fog-screenshot.png"), full_page=True)
