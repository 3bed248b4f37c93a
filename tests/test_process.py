"""``python gridserver.py`` as a user runs it: a real process, configured by the environment.

A lone copy of the file (no game_modules/ beside it, no config) runs the built-in demo game;
the access log never holds a session token.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
               GRIDSERVER_TICK_INTERVAL="0.1", PYTHONPATH="", **env_overrides)
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", _WITHOUT_GAME_MODULES], cwd=folder, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(base + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.poll() is None, (folder / "server.log").read_text()
                await asyncio.sleep(0.05)
        yield base, proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
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


async def test_a_lone_copy_runs_the_builtin_demo_and_plays(tmp_path):
    shutil.copy(os.path.join(ROOT, "gridserver.py"), tmp_path / "gridserver.py")
    async with server_process(tmp_path) as (base, proc):
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
                        msg = await asyncio.wait_for(ws.receive_json(), 5)
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
                assert (await ws.receive_json())["type"] == "pong"
            async with http.get(base + f"/api/zones?token={token}") as r:
                assert r.status == 401
    text = (tmp_path / "server.log").read_text()
    assert '"GET /ws"' in text and '"GET /api/auth/me" 200' in text, text  # the requests are logged
    assert token not in text and "token=" not in text, text
