"""``python gridserver.py`` as a user runs it: a real process, configured by the environment.

A lone copy of the file (no game_modules/ beside it, no config) runs the built-in demo game,
which shrugs off malformed moves; the access log never holds a session token; debug mode
for every player is refused on an address other machines reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest

from helpers import ROOT, scaled, wait_for

import gridserver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Runs gridserver.py as ``python gridserver.py`` would, with the game_modules package made
#: unimportable: what a lone copy sees on a machine where the project is not installed
#: (in CI it is installed, so a copy would find the real game_modules).
_WITHOUT_GAME_MODULES = ("import runpy, sys; sys.modules['game_modules'] = None; "
                         "runpy.run_path('gridserver.py', run_name='__main__')")


@contextlib.asynccontextmanager
async def server_process(folder, **env_overrides):
    """A lone gridserver.py in ``folder`` on a free port; yields (base URL, process). SIGTERM at the end."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSERVER_")}
    env.update(GRIDSERVER_SERVER_PORT=str(port), GRIDSERVER_AUTH_BCRYPT_ROUNDS="4",
               GRIDSERVER_TICK_INTERVAL="0.1", PYTHONPATH="")
    env.update(env_overrides)
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", _WITHOUT_GAME_MODULES], cwd=folder, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=scaled(2))) as http:
            async def healthy() -> bool:
                try:
                    async with http.get(base + "/healthz") as r:
                        if r.status == 200:
                            return True
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                assert proc.poll() is None, (folder / "server.log").read_text()
                return False

            await wait_for(healthy, timeout=10, interval=0.05, what="/healthz answering 200")
        yield base, proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(scaled(15)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


async def login(http: aiohttp.ClientSession, base: str, username: str) -> str:
    creds = {"username": username, "password": "correct horse"}
    async with http.post(base + "/api/auth/register", json=creds) as r:
        assert r.status == 201
    async with http.post(base + "/api/auth/login", json=creds) as r:
        return (await r.json())["token"]


async def play_the_builtin_demo(base: str) -> None:
    """Register, subscribe to the demo's lobby, and see a move act."""
    port = int(base.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as http:
        token = await login(http, base, "solo")
        async with http.get(base + "/api/zones", headers={"Authorization": f"Bearer {token}"}) as r:
            zones = (await r.json())["zones"]
        assert [(z["name"], z["metadata"]) for z in zones] == [("lobby", {"game": "builtin demo"})]
        async with http.ws_connect(f"ws://127.0.0.1:{port}/ws?token={token}") as ws:
            await ws.send_json({"type": "subscribe", "zone_id": zones[0]["id"]})

            async def my_x() -> int | None:
                while True:
                    msg = await asyncio.wait_for(ws.receive_json(), scaled(5))
                    if msg.get("type") == "tick":
                        mine = [e for e in msg["state"]["entities"] if e.get("label") == "solo"]
                        if mine:
                            return mine[0]["x"]

            x0 = await my_x()
            direction, step = ("right", 1) if x0 < 23 else ("left", -1)
            await ws.send_json({"type": "intent", "data": {"move": direction}})
            for _ in range(20):
                x = await my_x()
                if x != x0:
                    break
            assert x == x0 + step


async def test_a_lone_copy_runs_the_builtin_demo_and_plays(tmp_path):
    shutil.copy(os.path.join(ROOT, "gridserver.py"), tmp_path / "gridserver.py")
    async with server_process(tmp_path) as (base, proc):
        await play_the_builtin_demo(base)
    text = (tmp_path / "server.log").read_text()
    assert "running the built-in demo game" in text and "Traceback" not in text
    assert (tmp_path / "gridserver.db").exists()


async def test_access_log_never_holds_a_token(tmp_path):
    shutil.copy(os.path.join(ROOT, "gridserver.py"), tmp_path / "gridserver.py")
    async with server_process(tmp_path, GRIDSERVER_DEBUG_ACCESS_LOG="true") as (base, proc):
        async with aiohttp.ClientSession() as http:
            token = await login(http, base, "logged")
            async with http.get(base + "/api/auth/me", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
            ws_url = base.replace("http://", "ws://") + f"/ws?token={token}"
            async with http.ws_connect(ws_url) as ws:
                await ws.send_json({"type": "ping"})
                assert (await asyncio.wait_for(ws.receive_json(), scaled(5)))["type"] == "pong"
            async with http.get(base + f"/api/zones?token={token}") as r:
                assert r.status == 401
    text = (tmp_path / "server.log").read_text()
    assert '"GET /ws"' in text and '"GET /api/auth/me" 200' in text, text  # the requests are logged
    assert token not in text and "token=" not in text, text


async def test_the_builtin_demo_survives_moves_that_are_not_strings(tmp_path):
    """``{"move": []}``, ``{"move": {}}`` and ``{"move": 5}`` (unhashable, or no direction) are
    ignored by the built-in demo: the tick they arrive in runs like any other and a
    ``{"move": "right"}`` sent with them in the same tick moves the avatar."""
    shutil.copy(os.path.join(ROOT, "gridserver.py"), tmp_path / "gridserver.py")
    async with server_process(tmp_path, GRIDSERVER_SERVER_DEBUG="true") as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        async with aiohttp.ClientSession() as http:
            token = await login(http, base, "mover")
            auth = {"Authorization": f"Bearer {token}"}
            async with http.get(base + "/api/zones", headers=auth) as r:
                lobby = (await r.json())["zones"][0]["id"]
            async with http.ws_connect(f"ws://127.0.0.1:{port}/ws?token={token}") as ws:
                await ws.send_json({"type": "subscribe", "zone_id": lobby})

                seen = [0]  # the last tick number received

                async def next_tick() -> tuple[int, int | None]:
                    """The next tick's number and the avatar's x (None: no avatar yet)."""
                    while True:
                        msg = await asyncio.wait_for(ws.receive_json(), scaled(5))
                        if msg.get("type") == "tick":
                            seen[0] = msg["tick_number"]
                            mine = [e for e in msg["state"]["entities"] if e.get("label") == "mover"]
                            return msg["tick_number"], (mine[0]["x"] if mine else None)

                x0 = None
                for _ in range(50):
                    _, x0 = await next_tick()
                    if x0 is not None:
                        break
                assert x0 is not None, "no avatar"
                direction, step = ("right", 1) if x0 < 23 else ("left", -1)  # the lobby is 24 wide
                async with http.post(base + "/api/debug/tick/pause", headers=auth) as r:
                    assert r.status == 200
                for move in ([], {}, 5, direction):  # all in the same tick
                    await ws.send_json({"type": "intent", "data": {"move": move}})
                await ws.send_json({"type": "ping"})
                answers = []
                while not answers or answers[-1] != {"type": "pong"}:
                    msg = await asyncio.wait_for(ws.receive_json(), scaled(5))
                    if msg.get("type") != "tick":
                        answers.append(msg)
                    else:
                        seen[0] = msg["tick_number"]
                assert answers == [{"type": "pong"}], answers  # every intent taken
                async with http.post(base + "/api/debug/tick/resume", headers=auth) as r:
                    assert r.status == 200
                before = seen[0]
                ticks = [await next_tick() for _ in range(5)]
    numbers = [n for n, _ in ticks]
    assert numbers == list(range(before + 1, before + 6)), f"the lobby skipped ticks: {before}, then {numbers}"
    assert x0 + step in [x for _, x in ticks], f"the avatar did not move {direction} from {x0}: {ticks}"
    text = (tmp_path / "server.log").read_text()
    assert "Traceback" not in text and "module raised" not in text, text[-3000:]


#: ``[server] debug`` itself, not the start of ``[server] debug_players``.
_DEBUG_KEY = re.compile(r"\[server\] debug(?!_)")


def test_debug_for_every_player_is_refused_off_loopback(tmp_path, monkeypatch):
    """``[server] debug`` with an empty ``debug_players`` makes every player an admin: the
    configuration is refused, naming both keys, unless the server listens on a loopback
    address or debug players are named."""
    monkeypatch.chdir(tmp_path)  # no config.ini
    debug = {"GRIDSERVER_SERVER_DEBUG": "true"}
    refused = [{"GRIDSERVER_SERVER_HOST": host} for host in ("0.0.0.0", "::", "192.0.2.7", "gridserver.example")]
    refused.append({"GRIDSERVER_SERVER_HOST": "0.0.0.0", "GRIDSERVER_SERVER_DEBUG_PLAYERS": " , "})
    for env in refused:
        with pytest.raises(gridserver.ConfigError) as caught:
            gridserver.Config.load(None, environ={**debug, **env})
        message = str(caught.value)
        assert _DEBUG_KEY.search(message) and "[server] debug_players" in message, (env, message)
        assert "\n" not in message, message
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        cfg = gridserver.Config.load(None, environ={**debug, "GRIDSERVER_SERVER_HOST": host})
        assert cfg.get("server", "debug") is True and cfg.get("server", "host") == host
    cfg = gridserver.Config.load(None, environ={**debug, "GRIDSERVER_SERVER_HOST": "0.0.0.0",
                                                "GRIDSERVER_SERVER_DEBUG_PLAYERS": "admin"})
    assert cfg.get("server", "debug_players") == "admin"
    cfg = gridserver.Config.load(None, environ={"GRIDSERVER_SERVER_HOST": "0.0.0.0"})
    assert cfg.get("server", "debug") is False

    # A real process so configured exits with code 2 and one line on stderr. The game module
    # named does not exist, so that a server that took the configuration would still stop
    # before listening (on every interface), with another message.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSERVER_")}
    env.update(GRIDSERVER_SERVER_HOST="0.0.0.0", GRIDSERVER_SERVER_DEBUG="true",
               GRIDSERVER_SERVER_PORT=str(_free_port()), GRIDSERVER_DATABASE_DSN=f"sqlite:///{tmp_path / 'db'}",
               GRIDSERVER_GAME_MODULE="no_such_game_module_here")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "gridserver.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=scaled(30))
    lines = done.stderr.splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert len(lines) == 1 and done.stdout == "", (done.stdout, done.stderr)
    assert lines[0].startswith("gridserver: ") and _DEBUG_KEY.search(lines[0]) \
        and "[server] debug_players" in lines[0], lines[0]


@pytest.mark.parametrize("choice", ["asyncio", "uvloop", "auto"])
async def test_the_event_loop_is_the_one_configured(tmp_path, choice):
    """``[server] event_loop``: the server runs on the loop named (uvloop comes with the
    ``[fast]`` and ``[test]`` extras), plays, and stops cleanly on SIGTERM; auto picks uvloop
    when it is installed."""
    shutil.copy(os.path.join(ROOT, "gridserver.py"), tmp_path / "gridserver.py")
    async with server_process(tmp_path, GRIDSERVER_SERVER_EVENT_LOOP=choice) as (base, proc):
        await play_the_builtin_demo(base)
    text = (tmp_path / "server.log").read_text()
    want = "uvloop" if choice == "auto" else choice
    assert re.search(rf"event loop: {want}\b", text) and "Traceback" not in text, text


async def test_without_uvloop_auto_falls_back_and_uvloop_refuses_to_start(tmp_path):
    shutil.copy(os.path.join(ROOT, "gridserver.py"), tmp_path / "gridserver.py")
    shadow = tmp_path / "shadow" / "uvloop"  # an uvloop that cannot be imported, first on the path
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('uvloop is not here')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSERVER_")}
    env.update(PYTHONPATH=str(tmp_path / "shadow"), GRIDSERVER_SERVER_EVENT_LOOP="uvloop",
               GRIDSERVER_SERVER_PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_GAME_MODULES], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=scaled(30))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("gridserver: [server] event_loop = uvloop: uvloop is not "
                                                    "installed (pip install 'gridserver[fast]')")
    async with server_process(tmp_path, PYTHONPATH=str(tmp_path / "shadow"), GRIDSERVER_SERVER_EVENT_LOOP="auto") \
            as (base, proc):
        await play_the_builtin_demo(base)
    assert "event loop: asyncio" in (tmp_path / "server.log").read_text()


_MALLOC_PROBE = """
import ctypes, sys
sys.path.insert(0, {root!r})
import gridserver
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if {tune}:
    gridserver._tune_malloc()
libc.malloc_trim(0)  # no free space left on top of the heap to serve what follows
# A block under the threshold, like asyncio's 256 KiB socket reads: where does it come from,
# once the free chunks the imports left in the heap are used up?
kept, small_mapped = [], None
while small_mapped is None and len(kept) < 64:
    info = libc.mallinfo2()
    kept.append(libc.malloc(3 << 20))
    after = libc.mallinfo2()
    if after.hblks > info.hblks:
        small_mapped = 1
    elif after.arena > info.arena:
        small_mapped = 0
for block in kept:
    libc.free(block)
libc.free(libc.malloc(30 << 20))  # freeing a mapped block raises glibc's default threshold to 30 MiB
libc.malloc_trim(0)
before = libc.mallinfo2().hblks
block = libc.malloc(16 << 20)  # a burst's buffer: mapped on its own, or from the heap?
print(small_mapped, libc.mallinfo2().hblks - before, gridserver._LIBC is not None)
libc.free(block)
gridserver._give_back_memory()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is tuned on Linux only")
@pytest.mark.parametrize("tune", [False, True])
def test_large_buffers_stay_mapped_once_malloc_is_tuned(tune):
    """The command line fixes glibc's mmap threshold (``_tune_malloc``) at 4 MiB: a block
    under it comes from the heap, as asyncio's 256 KiB socket reads must (glibc's default,
    from 128 KiB, maps and unmaps one at every read until it drifts up: 14 µs a read; 3 MiB
    blocks stand for them, taken until the heap's free chunks are used up), and a
    16 MiB buffer made after a larger one was freed is still mapped on its own, given back
    when freed (the default, drifted up to 30 MiB, carves it out of the heap, which it
    rarely returns)."""
    proc = subprocess.run([sys.executable, "-c", _MALLOC_PROBE.format(root=ROOT, tune=tune)],
                          capture_output=True, text=True, timeout=scaled(60))
    assert proc.returncode == 0, proc.stderr
    small_mapped, burst_mapped, tuned = proc.stdout.split()
    if tune:
        assert (small_mapped, burst_mapped, tuned) == ("0", "1", "True"), proc.stdout
    else:  # where the default threshold stands by now depends on what the imports freed
        assert (burst_mapped, tuned) == ("0", "False"), proc.stdout
