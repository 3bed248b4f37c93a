"""The README's "From an empty folder to a tested, reloading game", followed to the letter:
its files are taken from the README, put in an empty folder beside a copy of
``gridserver.py``, their tests run with pytest, and the server runs the game with
``--reload`` while a player plays and the file changes.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import aiohttp

import gridserver
from faultkit import Client, free_port
from helpers import ROOT, scaled, wait_for


def tutorial_files() -> dict[str, str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    section = readme.split("### From an empty folder to a tested, reloading game", 1)[1].split("\n## ", 1)[0]
    files = dict(re.findall(r"^`tag/([\w.]+)`[^`]*?\n\n```\w*\n(.*?)^```", section, re.M | re.S))
    assert set(files) == {"config.ini", "tag.py", "test_tag.py"}, sorted(files)
    return files


async def test_the_tutorial_game_passes_its_tests_runs_and_reloads(tmp_path):
    folder = tmp_path / "tag"
    folder.mkdir()
    shutil.copy(os.path.join(ROOT, "gridserver.py"), folder)
    for name, text in tutorial_files().items():
        (folder / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSERVER_")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_tag.py"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=scaled(120))
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout + done.stderr

    port = free_port()
    env.update(GRIDSERVER_SERVER_PORT=str(port), GRIDSERVER_AUTH_BCRYPT_ROUNDS="4")
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "gridserver.py", "--config", "config.ini", "--reload"], cwd=folder,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        async with aiohttp.ClientSession() as http:
            client = Client(f"http://127.0.0.1:{port}", http)
            deadline = time.monotonic() + scaled(30)
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                try:
                    if (await client.call("GET", "/healthz", timeout=2))[0] == 200:
                        break
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    await asyncio.sleep(0.1)
            player = await client.player()
            async with gridserver.Client(client.url, token=player["token"], timeout=scaled(15)) as c:
                await c.subscribe((await client.zones(player["token"]))["yard"]["id"])
                await c.next("tick", where=lambda m: m["state"]["it"] == player["id"])  # the only player is it
                source = (folder / "tag.py").read_text()
                (folder / "tag.py").write_text(source.replace('"yard", 12, 12', '"yard", 12, 12)  # bigger soon\n#('))
                await c.next("module_reloaded")
                c.clear("tick")
                for _ in range(3):  # three ticks after the reload (each next waits for a new one)
                    await c.next("tick")
        assert "reloaded: version" in log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(scaled(30))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(scaled(10))
