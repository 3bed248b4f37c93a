"""The game developer's loop, against real server processes started the way a developer
does (``gridserver.py --config path/to/config.ini`` from another folder): hot reload under
play, zones that fail and recover, join/leave hooks across a lost tick and a restart, and
start-up errors of the module.

The game is a file written into the test's folder beside its ``config.ini`` (so it is found
through the configuration file's folder, not the working directory), and rewritten to
change the rules.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import aiohttp
import pytest
from aiohttp import WSMsgType

from faultkit import Client, free_port
from helpers import ROOT, scaled, wait_for

HOST = "127.0.0.1"

#: A game whose rule (``RULE``: the step each tick moves every entity) is easy to swap. Each
#: player gets an avatar (``on_player_join``); ``on_reload`` carries its memory (how many
#: reloads it has seen). The state shows the rule, the avatars' cells after the tick's moves
#: and their owners.
RULES = '''
from gridserver import EntityCreate, EntityUpdate, TickResult

RULE = {rule!r}
STEP = {step}
_memory = {{"reloads": 0}}


def on_init(framework):
    global _fw
    _fw = framework
    if not framework.list_zones():
        framework.create_zone("arena", 40, 8, {{}})


def on_reload(previous):
    _memory["reloads"] = previous._memory["reloads"] + 1


def on_player_join(zone_id, player_id):
    return TickResult(entity_creates=[EntityCreate(0, 0, 1, 1, {{"player_id": str(player_id)}})])


def on_player_leave(zone_id, player_id):
    gone = [e.id for e in _fw.list_entities(zone_id) if e.metadata.get("player_id") == str(player_id)]
    return TickResult(entity_deletes=gone)


def on_tick(zone_id, entities, intents, tick_number):
    {extra}
    updates = [EntityUpdate(e.id, x=(e.x + STEP) % 40) for e in entities]
    return TickResult(entity_updates=updates, broadcast_state={{
        "rule": RULE, "reloads": _memory["reloads"], "xs": sorted(u.x for u in updates),
        "players": sorted(e.metadata["player_id"] for e in entities)}})


def get_player_state(zone_id, player_id, full_state):
    return full_state
'''


def write_game(folder, rule: str = "A", step: int = 1, extra: str = "pass", name: str = "rules") -> str:
    path = os.path.join(folder, f"{name}.py")
    with open(path + ".tmp", "w") as fh:
        fh.write(RULES.format(rule=rule, step=step, extra=extra))
    os.replace(path + ".tmp", path)  # one change, as an editor's save
    return path


class DevServer:
    """``python gridserver.py --config <folder>/config.ini [args]`` run from another folder."""

    def __init__(self, folder, dsn: str, module: str = "rules", args: tuple = (), **settings):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        values = {"server": {"port": self.port, "debug": "true", "debug_players": "dev"},
                  "database": {"dsn": dsn}, "game": {"module": module},
                  "tick": {"interval": 0.05}, "auth": {"bcrypt_rounds": 4},
                  "persistence": {"interval": 0.2}, "websocket": {"heartbeat": 5},
                  "debug": {"log_level": "info"}}
        for key, value in settings.items():
            section, _, option = key.partition("_")
            values.setdefault(section, {})[option] = value
        self.config = os.path.join(folder, "config.ini")
        with open(self.config, "w") as fh:
            for section, options in values.items():
                fh.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in options.items()))
        elsewhere = os.path.join(folder, "elsewhere")
        os.makedirs(elsewhere, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSERVER_")}
        self.log_path = os.path.join(folder, f"server-{self.port}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "gridserver.py"), "--config", self.config,
                                      *args], cwd=elsewhere, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    async def ready(self, http: aiohttp.ClientSession) -> Client:
        deadline = time.monotonic() + scaled(30)
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
            try:
                async with http.get(self.url + "/healthz", timeout=aiohttp.ClientTimeout(total=scaled(2))) as r:
                    if r.status == 200:
                        return Client(self.url, http)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"no /healthz within 30 s:\n{self.log_text()[-3000:]}")

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            deadline = time.monotonic() + scaled(30)
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(scaled(10))
        self._log.close()


@pytest.fixture
async def devservers():
    started: list[DevServer] = []

    def start(*args, **kwargs) -> DevServer:
        server = DevServer(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop(signal.SIGKILL)


class Player:
    """One subscribed player: every message in arrival order."""

    def __init__(self, http: aiohttp.ClientSession, client: Client, token: str):
        self.http, self.client, self.token = http, client, token
        self.messages: list[dict] = []
        self.closed: list = []

    async def join(self, zone_id: str, wait_ticks: int = 2) -> "Player":
        self.ws = await self.http.ws_connect(self.client.ws_url(self.token), heartbeat=None)
        self.task = asyncio.ensure_future(self._read())
        if zone_id:
            await self.ws.send_json({"type": "subscribe", "zone_id": zone_id})
            await wait_for(lambda: len(self.ticks()) >= wait_ticks, timeout=scaled(10), what="the first ticks")
        return self

    async def _read(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg.type != WSMsgType.TEXT:
                self.closed.append((msg.type, msg.data))
                return
            self.messages.append(json.loads(msg.data))

    def ticks(self) -> list[dict]:
        return [m for m in self.messages if m["type"] == "tick"]

    def of(self, kind: str, code: str | None = None) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind and (code is None or m.get("code") == code)]

    async def leave(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.ws.close()


async def players(client: Client, http, zone_name: str = "arena", names=("dev", None)) -> tuple[str, list[Player]]:
    out = []
    for name in names:
        p = await client.player(name)
        out.append(Player(http, client, p["token"]))
    zone_id = (await client.zones(out[0].token))[zone_name]["id"]
    for p in out:
        await p.join(zone_id)
    return zone_id, out


async def test_a_reload_under_play_switches_rules_at_a_tick_boundary_and_drops_no_one(tmp_path, devservers):
    path = write_game(tmp_path, rule="A", step=1)
    server = devservers(tmp_path, f"sqlite:///{tmp_path / 'world.db'}")
    async with aiohttp.ClientSession() as http:
        client = await server.ready(http)
        zone_id, (dev, other) = await players(client, http)
        await wait_for(lambda: len(dev.ticks()) >= 10, timeout=scaled(10), what="ten ticks under rule A")

        write_game(tmp_path, rule="B", step=2)
        status, body = await client.call("POST", "/api/debug/module/reload", dev.token)
        assert status == 200, body
        assert body["module"] == "rules" and len(body["version"]) == 12
        await wait_for(lambda: all(len(p.of("module_reloaded")) == 1 and p.ticks()[-1]["state"]["rule"] == "B"
                                   and len(p.ticks()) > 20 for p in (dev, other)),
                       timeout=scaled(10), what="ticks under rule B")

        # A broken version never replaces the working one; the caller and debug players hear
        # where it broke.
        with open(path, "a") as fh:
            fh.write("\ndef broken(:\n")
        status, body = await client.call("POST", "/api/debug/module/reload", dev.token)
        assert status == 422 and body["error"] == "module_error", body
        assert "rules.py:" in body["message"] and "SyntaxError" in body["message"], body
        write_game(tmp_path, rule="C", step=3)  # a good file again, but for an on_init that raises
        with open(path, "a") as fh:
            fh.write("\ndef on_init(framework):\n    raise ValueError('no lobby today')\n")
        status, body = await client.call("POST", "/api/debug/module/reload", dev.token)
        assert status == 422 and "on_init" in body["message"] and "ValueError: no lobby today" in body["message"]
        assert f"{os.path.basename(path)}:" in body["message"]
        await wait_for(lambda: len(dev.of("error", "module_error")) == 2, timeout=scaled(5),
                       what="the debug player told of both refusals")
        assert not other.of("error", "module_error")  # not a debug player
        seen = len(dev.ticks())
        await wait_for(lambda: len(dev.ticks()) >= seen + 5, timeout=scaled(5), what="more ticks")
        status, health = await client.call("GET", "/healthz")
        assert health["zones_failing"] == 0

        for p in (dev, other):
            ticks = p.ticks()
            numbers = [t["tick_number"] for t in ticks]
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "a tick was missed"
            rules = [t["state"]["rule"] for t in ticks]
            switch = rules.index("B")
            assert set(rules[:switch]) == {"A"} and set(rules[switch:]) == {"B"}  # never A again
            # the module_reloaded message comes between the last A tick and the first B tick
            at = p.messages.index(p.of("module_reloaded")[0])
            assert p.messages[at - 1]["state"]["rule"] == "A" and p.messages[at + 1]["state"]["rule"] == "B"
            assert ticks[switch]["state"]["reloads"] == 1  # on_reload carried the memory
            # each tick moved the avatars by its rule's step: 1 cell under A, 2 from the first B tick
            for before, after in zip(ticks, ticks[1:]):
                if len(before["state"]["xs"]) == len(after["state"]["xs"]) == 2:
                    step = 1 if after["state"]["rule"] == "A" else 2
                    assert after["state"]["xs"] == sorted((x + step) % 40 for x in before["state"]["xs"])
            assert not p.closed
        status, state = await client.call("GET", f"/api/debug/zones/{zone_id}/state", dev.token)
        assert status == 200 and len(state["entities"]) == 2  # the world was kept
        log = server.log_text()
        assert "reloaded: version" in log and "reload refused" in log
        await dev.leave()
        await other.leave()


async def test_gridserver_reload_follows_the_file(tmp_path, devservers):
    path = write_game(tmp_path, rule="A")
    server = devservers(tmp_path, f"sqlite:///{tmp_path / 'world.db'}", args=("--reload",))
    async with aiohttp.ClientSession() as http:
        client = await server.ready(http)
        _, (dev,) = await players(client, http, names=("dev",))
        await asyncio.sleep(0.05)
        write_game(tmp_path, rule="B", step=2)
        await wait_for(lambda: dev.ticks()[-1]["state"]["rule"] == "B", timeout=scaled(10),
                       what="the saved file's rule")
        with open(path, "a") as fh:
            fh.write("\nthis is not python\n")
        await wait_for(lambda: dev.of("error", "module_error"), timeout=scaled(10), what="the refusal")
        assert "rules.py:" in dev.of("error", "module_error")[0]["message"]
        seen = len(dev.ticks())
        await wait_for(lambda: len(dev.ticks()) > seen + 3, timeout=scaled(5), what="ticks go on")
        assert dev.ticks()[-1]["state"]["rule"] == "B" and not dev.closed
        await dev.leave()


async def test_a_failing_zone_says_so_once_and_its_joins_wait_for_a_good_tick(tmp_path, devservers):
    flag = tmp_path / "broken"
    write_game(tmp_path, extra=f"if __import__('os').path.exists({str(flag)!r}): 1 / 0")
    server = devservers(tmp_path, f"sqlite:///{tmp_path / 'world.db'}")
    async with aiohttp.ClientSession() as http:
        client = await server.ready(http)
        zone_id, (dev, other) = await players(client, http)
        flag.write_text("")
        await wait_for(lambda: dev.of("error", "zone_failed") and other.of("error", "zone_failed"),
                       timeout=scaled(5), what="zone_failed")
        status, health = await client.call("GET", "/healthz")
        assert status == 200 and health["zones_failing"] == 1 and health["failing_zones"] == [zone_id]
        # a player joining the failing zone hears so at once; their join waits
        late = Player(http, client, (await client.player())["token"])
        await late.join(zone_id, wait_ticks=0)
        await wait_for(lambda: late.of("error", "zone_failed"), timeout=scaled(5), what="told on subscribe")
        ticks_before = len(dev.ticks())
        await asyncio.sleep(1.0)  # about 20 lost ticks
        assert len(dev.ticks()) == ticks_before  # no tick while failing
        flag.unlink()
        await wait_for(lambda: late.ticks() and dev.of("zone_recovered"), timeout=scaled(5), what="recovery")
        for p in (dev, other, late):
            assert len(p.of("error", "zone_failed")) == 1  # once per streak
        assert "ZeroDivisionError" in dev.of("error", "zone_failed")[0]["message"]  # debug: the error
        assert "rules.py" not in other.of("error", "zone_failed")[0]["message"]     # others: a sentence
        assert other.of("zone_recovered")[0]["zone_id"] == zone_id
        # the late player's join reached the module with a good tick: one avatar, not one per
        # lost tick, nor none
        status, state = await client.call("GET", f"/api/debug/zones/{zone_id}/state", dev.token)
        owners = [e["metadata"]["player_id"] for e in state["entities"]]
        assert len(owners) == 3 and len(set(owners)) == 3, owners
        status, health = await client.call("GET", "/healthz")
        assert health["zones_failing"] == 0
        log = server.log_text()
        assert log.count("Traceback") == 1 and "still failing, 10 ticks lost in a row" in log
        assert "recovered at tick" in log
        for p in (dev, other, late):
            await p.leave()


async def test_after_a_restart_players_who_do_not_come_back_are_delivered_as_leaving(tmp_path, devservers, dsn):
    write_game(tmp_path)
    server = devservers(tmp_path, dsn, websocket_reconnect_grace=2.0)
    async with aiohttp.ClientSession() as http:
        client = await server.ready(http)
        names = ("dev", "p_" + uuid.uuid4().hex[:8])
        zone_id, (dev, gone) = await players(client, http, names=names)
        status, state = await client.call("GET", f"/api/debug/zones/{zone_id}/state", dev.token)
        assert len(state["entities"]) == 2
        await asyncio.sleep(0.5)  # a flush saves the joined players
        await server.stop(signal.SIGKILL)

        server = devservers(tmp_path, dsn, websocket_reconnect_grace=2.0)
        client = await server.ready(http)
        dev_token = (await client.login("dev"))["token"]
        back = Player(http, client, dev_token)
        await back.join("", wait_ticks=0)  # no subscribe: the server puts them back
        await wait_for(lambda: back.of("subscribed"), timeout=scaled(5), what="resumed")
        assert back.of("subscribed")[0] == {"type": "subscribed", "zone_id": zone_id, "resumed": True}
        await wait_for(lambda: back.ticks(), timeout=scaled(5), what="ticks after the resume")
        def owners(state: dict) -> list:
            return sorted(e["metadata"]["player_id"] for e in state["entities"])

        status, state = await client.call("GET", f"/api/debug/zones/{zone_id}/state", dev_token)
        both = owners(state)
        assert len(both) == 2  # the other player is held for the grace, the one back kept theirs
        await asyncio.sleep(2.5)
        status, state = await client.call("GET", f"/api/debug/zones/{zone_id}/state", dev_token)
        status, me = await client.call("GET", "/api/auth/me", dev_token)
        assert owners(state) == [me["id"]] and me["id"] in both, state  # the other left
        assert not back.of("subscribed")[1:] and not back.closed
        await back.leave()


@pytest.mark.parametrize("case", ["missing", "syntax", "import_raises", "on_init_raises", "no_method",
                                  "no_attribute"])
async def test_every_start_up_error_of_the_module_is_one_line_exit_2_and_nothing_on_disk(tmp_path, case):
    module = "tag"
    source = {
        "missing": None,
        "syntax": "def on_tick(:\n    pass\n",
        "import_raises": "import gridserver\nSIZE = {}['size']\n",
        "on_init_raises": RULES.format(rule="A", step=1, extra="pass").replace(
            "    global _fw\n", "    global _fw\n    raise RuntimeError('no arena for you')\n"),
        "no_method": "def on_init(framework):\n    pass\n",
        "no_attribute": "class Game:\n    pass\n",
    }[case]
    if source is not None:
        (tmp_path / "tag.py").write_text(source)
    if case == "no_attribute":
        module = "tag:Tagger"
    (tmp_path / "config.ini").write_text(f"[database]\ndsn = sqlite:///{tmp_path / 'world.db'}\n"
                                         f"[game]\nmodule = {module}\n[server]\nport = {free_port()}\n")
    (tmp_path / "elsewhere").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSERVER_")}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "gridserver.py"), "--config",
                           str(tmp_path / "config.ini")], cwd=tmp_path / "elsewhere", env=env,
                          capture_output=True, text=True, timeout=scaled(60))
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and " INFO " not in line
             and " WARNING " not in line]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    line = lines[0]
    assert line.startswith("gridserver: game module 'tag") and module in line, line
    expected = {
        "missing": "no module named 'tag'",
        "syntax": "tag.py:1: SyntaxError",
        "import_raises": "tag.py:2: KeyError: 'size'",
        "on_init_raises": "on_init: " + str(tmp_path / "tag.py"),
        "no_method": "lacks on_tick, get_player_state",
        "no_attribute": "has no attribute 'Tagger'",
    }[case]
    assert expected in line, line
    if case == "on_init_raises":
        assert "RuntimeError: no arena for you" in line
    assert not (tmp_path / "world.db").exists() and not list((tmp_path / "elsewhere").iterdir())


class Recorder:
    """A game that records the zones it was told were deleted."""

    def __init__(self):
        self.deleted: list = []

    def on_init(self, framework):
        self.fw = framework

    def on_tick(self, zone_id, entities, intents, tick_number):
        from gridserver import TickResult
        return TickResult(broadcast_state={"tick": tick_number})

    def get_player_state(self, zone_id, player_id, full_state):
        return full_state

    def on_zone_deleted(self, zone_id):
        assert self.fw.get_zone(zone_id) is None  # gone from the world when the hook runs
        self.deleted.append(zone_id)


async def test_a_deleted_zone_is_told_to_the_module(start_server, dsn):
    from helpers import make_config
    game = Recorder()
    running = await start_server(make_config(dsn, server_debug=True), game)
    p = await running.player()
    kept, doomed = await running.zone(p["token"]), await running.zone(p["token"])
    status, _ = await running.call("DELETE", f"/api/zones/{doomed['id']}", p["token"])
    assert status == 204
    assert [str(z) for z in game.deleted] == [doomed["id"]]
    status, _ = await running.call("DELETE", f"/api/zones/{doomed['id']}", p["token"])
    assert status == 404 and len(game.deleted) == 1 and kept["id"] not in map(str, game.deleted)


def test_walkers_carries_its_views_over_a_reload_unless_their_shape_changed():
    from test_games import WALKERS, Walkers, load_module
    sim = Walkers(things=[(3, 3, 0, 0, {"kind": "item", "value": 1})])
    sim.tick()
    old = sim.game
    assert old._views[sim.zone.id]  # the state entries it built
    new = load_module(WALKERS)
    new.on_init(old._fw)
    new.on_reload(old)
    assert new._views[sim.zone.id] is old._views[sim.zone.id] and new._positions == old._positions
    changed = load_module(source=WALKERS.read_text().replace("VIEW_FORMAT = 1", "VIEW_FORMAT = 2"))
    changed.on_init(old._fw)
    changed.on_reload(old)
    assert changed._views == {} and changed._positions == {}
    new.on_zone_deleted(sim.zone.id)
    assert sim.zone.id not in new._views and sim.zone.id not in new._positions
