"""A lone copy of gridserver.py runs: no game_modules/ beside it, no config, nothing else.

The server falls back to its built-in demo game (and says so), creates a lobby, and a
player can register, log in, subscribe and move over real sockets.
"""

from __future__ import annotations

import asyncio
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


async def test_a_lone_copy_runs_the_builtin_demo_and_plays(tmp_path):
    shutil.copy(os.path.join(ROOT, "gridserver.py"), tmp_path / "gridserver.py")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSERVER_")}
    env.update(GRIDSERVER_SERVER_PORT=str(port), GRIDSERVER_AUTH_BCRYPT_ROUNDS="4",
               GRIDSERVER_TICK_INTERVAL="0.1", PYTHONPATH="")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "gridserver.py"], cwd=tmp_path, env=env, stdout=log,
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
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                await asyncio.sleep(0.05)
            creds = {"username": "solo", "password": "correct horse"}
            async with http.post(base + "/api/auth/register", json=creds) as r:
                assert r.status == 201
            async with http.post(base + "/api/auth/login", json=creds) as r:
                token = (await r.json())["token"]
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
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "running the built-in demo game" in text and "Traceback" not in text
    assert (tmp_path / "gridserver.db").exists()
