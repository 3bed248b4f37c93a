"""``[server] static_dir``: the game's own browser files at ``/game/``, over a real socket,
and nothing else: no file outside the folder, no hidden file, no link out of it."""

from __future__ import annotations

import os

import pytest
from yarl import URL

import gridserver
from helpers import make_config


@pytest.fixture
def files(tmp_path):
    root = tmp_path / "game"
    (root / "art").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>my game</title>")
    (root / "main.js").write_text("import {GridClient} from '/client.js';\n")
    (root / "art" / "hero.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / ".env").write_text("SECRET=1")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]")
    (tmp_path / "secret.txt").write_text("not for players")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    return root


async def get(running, raw_path: str) -> tuple[int, str, str]:
    async with running.http.get(URL(running.url + raw_path, encoded=True)) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def test_the_game_files_are_served_at_game(tmp_path, files, start_server):
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}", server_static_dir=str(files)))
    status, kind, text = await get(running, "/game/")
    assert (status, kind, text) == (200, "text/html", "<!doctype html><title>my game</title>")
    status, kind, text = await get(running, "/game/main.js")
    assert status == 200 and kind == "text/javascript" and "GridClient" in text
    status, kind, _ = await get(running, "/game/art/hero.svg")
    assert (status, kind) == (200, "image/svg+xml")
    async with running.http.get(running.url + "/game/index.html") as resp:
        assert resp.headers["X-Content-Type-Options"] == "nosniff" and resp.headers["Cache-Control"] == "no-cache"


@pytest.mark.parametrize("raw_path", [
    "/game/.env", "/game/.git/config", "/game/%2e%2e/secret.txt", "/game/..%2fsecret.txt", "/game/art/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/game/link.txt", "/game/art/", "/game/missing.html", "/game/art/hero.svg/x", "/game/%00", "/game/a%5c..%5csecret.txt",
])
async def test_nothing_else_is_served(tmp_path, files, start_server, raw_path):
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}", server_static_dir=str(files)))
    status, kind, text = await get(running, raw_path)
    assert status in (400, 404) and kind.startswith("application/json"), (raw_path, status, text)
    assert "not for players" not in text and "SECRET" not in text
    body = gridserver.json_loads(text)
    assert body["error"] in ("not_found", "bad_request") and body["message"]


async def test_without_static_dir_game_is_not_found(tmp_path, start_server):
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}"))
    status, _, text = await get(running, "/game/")
    assert status == 404 and "static_dir" in gridserver.json_loads(text)["message"]


def test_static_dir_is_read_from_the_config_files_folder(tmp_path, files):
    ini = tmp_path / "config.ini"
    ini.write_text("[server]\nstatic_dir = game\n")
    cfg = gridserver.Config.load(str(ini), environ={})
    assert cfg.get("server", "static_dir") == str(files)
    ini.write_text("[server]\nstatic_dir = nowhere\n")
    with pytest.raises(gridserver.ConfigError, match=r"\[server\] static_dir: .*nowhere.* is not a folder"):
        gridserver.Config.load(str(ini), environ={})
