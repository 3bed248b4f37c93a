"""``[server] cors_origins``: a game page served from another origin (a development server)
may call the REST routes from a browser; no other origin may read an answer."""

from __future__ import annotations

from helpers import make_config

DEV = "http://dev.example:5173"


async def test_without_cors_origins_no_answer_allows_another_origin(tmp_path, start_server):
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}"))
    async with running.http.get(running.url + "/api/zones", headers={"Origin": DEV}) as resp:
        assert resp.status == 401 and "Access-Control-Allow-Origin" not in resp.headers
    async with running.http.options(running.url + "/api/auth/login",
                                    headers={"Origin": DEV, "Access-Control-Request-Method": "POST"}) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_a_listed_origin_is_allowed_and_told_its_errors(tmp_path, start_server):
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}",
                                             server_cors_origins=f"{DEV}, http://other.example"))
    preflight = {"Origin": DEV, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with running.http.options(running.url + "/api/auth/login", headers=preflight) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == DEV and resp.headers["Vary"] == "Origin"
        assert set(resp.headers["Access-Control-Allow-Methods"].split(", ")) == {"GET", "POST", "DELETE"}
        assert resp.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
    player = await running.player()
    async with running.http.get(running.url + "/api/zones", headers={"Origin": DEV,
                                                                      "Authorization": f"Bearer {player['token']}"}) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == DEV
    async with running.http.get(running.url + "/api/zones", headers={"Origin": DEV}) as resp:  # an error too
        assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == DEV
        assert resp.headers["Access-Control-Expose-Headers"] == "Retry-After"
    for stranger in ("http://evil.example", DEV + ".evil.example", "null"):
        async with running.http.get(running.url + "/api/zones", headers={"Origin": stranger}) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers, stranger
        async with running.http.options(running.url + "/api/auth/login",
                                        headers={**preflight, "Origin": stranger}) as resp:
            assert resp.status != 204 and "Access-Control-Allow-Origin" not in resp.headers, stranger


async def test_a_star_allows_any_origin(tmp_path, start_server):
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}", server_cors_origins="*"))
    async with running.http.get(running.url + "/api/zones", headers={"Origin": "http://anywhere.example:8000"}) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == "http://anywhere.example:8000"
