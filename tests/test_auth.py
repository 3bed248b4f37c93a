"""The Auth table of the contract, over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import uuid

import aiohttp
import pytest

from helpers import Passive, call_from, db_rows, make_config, scaled, wait_for

PASSWORD = "correct horse"


def new_name() -> str:
    return "u_" + uuid.uuid4().hex[:10]


def parse_iso(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert value.tzinfo is not None, text
    return value


def assert_error(status, body, want_status: int, code: str, field: str | None = None):
    assert status == want_status, body
    assert isinstance(body, dict), body
    assert body.get("error") == code, body
    assert isinstance(body.get("message"), str) and body["message"], body
    if field is not None:
        assert field in body["message"], body


async def started(start_server, dsn, **overrides):
    return await start_server(make_config(dsn, **overrides), Passive())


# --------------------------------------------------------------------------- register

async def test_register_201(start_server, dsn):
    s = await started(start_server, dsn)
    name = new_name()
    status, body = await s.call("POST", "/api/auth/register", json={"username": name, "password": PASSWORD})
    assert status == 201, body
    assert set(body) >= {"id", "username", "created_at"}
    assert body["username"] == name
    assert str(uuid.UUID(body["id"])) == body["id"]  # a lowercase UUID string
    created = parse_iso(body["created_at"])
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 60
    assert "password" not in body and "password_hash" not in body
    # the boundaries of the username rule are accepted
    for ok in ("abc", "a" * 32, "A.b-c_9"):
        status, body = await s.call("POST", "/api/auth/register", json={"username": ok, "password": PASSWORD})
        assert status == 201, (ok, body)
    # exactly the minimum length, and exactly 72 bytes, are accepted
    status, body = await s.call("POST", "/api/auth/register", json={"username": new_name(), "password": "x" * 8})
    assert status == 201, body
    status, body = await s.call("POST", "/api/auth/register", json={"username": new_name(), "password": "é" * 36})
    assert status == 201, body


@pytest.mark.parametrize("username", ["ab", "a" * 33, "bad name", "bad/name", "naïve", "emoji😀x", "", "a@b.c"])
async def test_register_bad_username_400(start_server, dsn, username):
    s = await started(start_server, dsn)
    status, body = await s.call("POST", "/api/auth/register", json={"username": username, "password": PASSWORD})
    assert_error(status, body, 400, "bad_request", "username")


async def test_register_bad_password_400(start_server, dsn):
    s = await started(start_server, dsn, auth_min_password_length=10)
    cases = [
        "x" * 9,                     # one short of the configured minimum
        "",                          # empty
        "€" * 25,                    # 25 characters, but 75 bytes in UTF-8
        "x" * 73,                    # 73 bytes
    ]
    for pw in cases:
        status, body = await s.call("POST", "/api/auth/register", json={"username": new_name(), "password": pw})
        assert_error(status, body, 400, "bad_request", "password")
    # the configured minimum is what counts (10 here, not the default 8)
    status, body = await s.call("POST", "/api/auth/register", json={"username": new_name(), "password": "x" * 10})
    assert status == 201, body


@pytest.mark.parametrize("body, field", [
    ({}, "username"),
    ({"password": PASSWORD}, "username"),
    ({"username": "someone"}, "password"),
    ({"username": 12345, "password": PASSWORD}, "username"),
    ({"username": None, "password": PASSWORD}, "username"),
    ({"username": ["abc"], "password": PASSWORD}, "username"),
    ({"username": "someone", "password": 12345678}, "password"),
    ({"username": "someone", "password": True}, "password"),
])
async def test_register_missing_or_mistyped_fields_400(start_server, dsn, body, field):
    s = await started(start_server, dsn)
    status, resp = await s.call("POST", "/api/auth/register", json=body)
    assert_error(status, resp, 400, "bad_request", field)


@pytest.mark.parametrize("path", ["/api/auth/register", "/api/auth/login"])
async def test_bad_bodies_400(start_server, dsn, path):
    s = await started(start_server, dsn, server_max_body_size=1024)
    hdr = {"Content-Type": "application/json"}
    for raw in (b"not json", b"{\"username\": ", b"", b"\xff\xfe{}", b"[]",
                b"[{\"username\": \"abc\", \"password\": \"correct horse\"}]", b"\"a string\"", b"42", b"null"):
        status, body = await s.call("POST", path, data=raw, headers=hdr)
        assert_error(status, body, 400, "bad_request")
    # a JSON array through the client's own encoder too
    status, body = await s.call("POST", path, json=["username", "password"])
    assert_error(status, body, 400, "bad_request")
    # over server_max_body_size: a valid object otherwise
    big = {"username": new_name(), "password": "p" * 2000}
    status, body = await s.call("POST", path, json=big)
    assert_error(status, body, 400, "bad_request")
    # the same without a Content-Length (chunked)

    async def chunks():
        yield b'{"username": "' + b"a" * 600 + b'", '
        yield b'"password": "' + b"b" * 600 + b'"}'

    status, body = await s.call("POST", path, data=chunks(), headers=hdr)
    assert_error(status, body, 400, "bad_request")


async def test_register_409_taken(start_server, dsn):
    s = await started(start_server, dsn)
    name = new_name()
    status, body = await s.call("POST", "/api/auth/register", json={"username": name, "password": PASSWORD})
    assert status == 201, body
    status, body = await s.call("POST", "/api/auth/register", json={"username": name, "password": "other password"})
    assert_error(status, body, 409, "username_taken")


async def test_register_409_under_concurrency(start_server, dsn):
    s = await started(start_server, dsn)
    name = new_name()
    results = await asyncio.gather(*(
        s.call("POST", "/api/auth/register", json={"username": name, "password": f"password-{i}"})
        for i in range(10)))
    statuses = sorted(st for st, _ in results)
    assert statuses == [201] + [409] * 9, results
    for st, body in results:
        if st == 409:
            assert body["error"] == "username_taken", body
    assert db_rows(dsn, f"SELECT count(*) FROM players WHERE username = '{name}'") == [(1,)]
    # exactly the winner's password logs in
    winner = next(i for i, (st, _) in enumerate(results) if st == 201)
    status, body = await s.call("POST", "/api/auth/login", json={"username": name, "password": f"password-{winner}"})
    assert status == 200, body


# --------------------------------------------------------------------------- login

async def test_login_200(start_server, dsn):
    s = await started(start_server, dsn)
    name = new_name()
    _, reg = await s.call("POST", "/api/auth/register", json={"username": name, "password": PASSWORD})
    status, body = await s.call("POST", "/api/auth/login", json={"username": name, "password": PASSWORD})
    assert status == 200, body
    assert set(body) >= {"token", "player_id", "expires_at"}
    assert body["player_id"] == reg["id"]
    assert body["expires_at"] is None  # session_ttl defaults to 0: never expires
    assert isinstance(body["token"], str) and len(body["token"]) >= 32
    # two logins: two distinct sessions, both working
    _, again = await s.call("POST", "/api/auth/login", json={"username": name, "password": PASSWORD})
    assert again["token"] != body["token"]
    for tok in (body["token"], again["token"]):
        status, me = await s.call("GET", "/api/auth/me", tok)
        assert status == 200 and me["id"] == reg["id"], me


async def test_login_401_same_for_unknown_user_and_wrong_password(start_server, dsn):
    s = await started(start_server, dsn)
    p = await s.player()
    wrong = await s.call("POST", "/api/auth/login", json={"username": p["username"], "password": "wrong password"})
    unknown = await s.call("POST", "/api/auth/login", json={"username": new_name(), "password": "wrong password"})
    unknown_same_pw = await s.call("POST", "/api/auth/login", json={"username": new_name(), "password": p["password"]})
    assert_error(*wrong, 401, "invalid_credentials")
    assert wrong == unknown == unknown_same_pw
    # a case variant of the username is another (unknown) user
    upper = await s.call("POST", "/api/auth/login", json={"username": p["username"].upper(), "password": p["password"]})
    assert upper == wrong
    # a password of the right first 72 bytes plus more is not the password
    long_pw = "y" * 72
    await s.player(username=(name := new_name()), password=long_pw)
    status, body = await s.call("POST", "/api/auth/login", json={"username": name, "password": long_pw + "z"})
    assert (status, body) == wrong


@pytest.mark.parametrize("body, field", [
    ({}, "username"),
    ({"username": "someone"}, "password"),
    ({"username": 1, "password": PASSWORD}, "username"),
    ({"username": "someone", "password": None}, "password"),
])
async def test_login_bad_fields_400(start_server, dsn, body, field):
    s = await started(start_server, dsn)
    status, resp = await s.call("POST", "/api/auth/login", json=body)
    assert_error(status, resp, 400, "bad_request", field)


# --------------------------------------------------------------------------- logout, me

async def test_logout_204_then_token_dead(start_server, dsn):
    s = await started(start_server, dsn)
    p = await s.player()
    _, other = await s.call("POST", "/api/auth/login", json={"username": p["username"], "password": p["password"]})
    status, _ = await s.call("GET", "/api/auth/me", p["token"])
    assert status == 200
    status, body = await s.call("POST", "/api/auth/logout", p["token"])
    assert status == 204, body
    assert body is None
    assert_error(*(await s.call("GET", "/api/auth/me", p["token"])), 401, "unauthorized")
    assert_error(*(await s.call("GET", "/api/zones", p["token"])), 401, "unauthorized")
    assert_error(*(await s.call("POST", "/api/auth/logout", p["token"])), 401, "unauthorized")
    # only that session ended
    status, me = await s.call("GET", "/api/auth/me", other["token"])
    assert status == 200, me
    # and it is gone from the database, not just from a cache
    digest = hashlib.sha256(p["token"].encode()).hexdigest()
    assert db_rows(dsn, f"SELECT count(*) FROM sessions WHERE token_digest = '{digest}'") == [(0,)]


async def test_logout_without_token_401(start_server, dsn):
    s = await started(start_server, dsn)
    assert_error(*(await s.call("POST", "/api/auth/logout")), 401, "unauthorized")
    assert_error(*(await s.call("POST", "/api/auth/logout", "not-a-token")), 401, "unauthorized")


async def test_me_200_fields_and_is_debug_true(start_server, dsn):
    s = await started(start_server, dsn, server_debug=True)
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    p = await s.player()
    status, me = await s.call("GET", "/api/auth/me", p["token"])
    assert status == 200, me
    assert set(me) >= {"id", "username", "created_at", "last_login", "is_debug"}
    assert me["id"] == p["id"] and me["username"] == p["username"]
    assert parse_iso(me["created_at"]) >= before
    assert me["last_login"] is not None and parse_iso(me["last_login"]) >= parse_iso(me["created_at"])
    assert me["is_debug"] is True  # debug on, debug_players empty: every player


async def test_me_is_debug_false(start_server, dsn):
    s = await started(start_server, dsn, server_debug=True, server_debug_players="admin, root_user")
    p = await s.player()
    status, me = await s.call("GET", "/api/auth/me", p["token"])
    assert status == 200 and me["is_debug"] is False, me
    admin = await s.player(username="admin")
    status, me = await s.call("GET", "/api/auth/me", admin["token"])
    assert status == 200 and me["is_debug"] is True, me


async def test_me_is_debug_false_when_debug_off(start_server, dsn):
    s = await started(start_server, dsn, server_debug=False)
    p = await s.player()
    status, me = await s.call("GET", "/api/auth/me", p["token"])
    assert status == 200 and me["is_debug"] is False, me


async def test_me_last_login_null_before_login(start_server, dsn):
    s = await started(start_server, dsn)
    name = new_name()
    await s.call("POST", "/api/auth/register", json={"username": name, "password": PASSWORD})
    assert db_rows(dsn, f"SELECT last_login FROM players WHERE username = '{name}'") == [(None,)]


@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", "Bearer garbage", "Basic dXNlcjpwYXNz", "garbage",
    "Bearer " + "a" * 5000, "Token abc",
])
async def test_missing_or_garbage_authorization_401(start_server, dsn, header):
    s = await started(start_server, dsn)
    hdrs = {} if header is None else {"Authorization": header}
    for method, path in (("GET", "/api/auth/me"), ("POST", "/api/auth/logout"), ("GET", "/api/zones")):
        assert_error(*(await s.call(method, path, headers=hdrs)), 401, "unauthorized")


async def test_token_in_wrong_scheme_401(start_server, dsn):
    s = await started(start_server, dsn)
    p = await s.player()
    status, _ = await s.call("GET", "/api/auth/me", headers={"Authorization": f"Bearer {p['token']}"})
    assert status == 200
    assert_error(*(await s.call("GET", "/api/auth/me", headers={"Authorization": p["token"]})), 401, "unauthorized")
    assert_error(*(await s.call("GET", "/api/auth/me", headers={"Authorization": f"Basic {p['token']}"})),
                 401, "unauthorized")


# --------------------------------------------------------------------------- session TTL

async def test_session_ttl_expires(start_server, dsn):
    s = await started(start_server, dsn, auth_session_ttl=1)
    name = new_name()
    await s.call("POST", "/api/auth/register", json={"username": name, "password": PASSWORD})
    status, login = await s.call("POST", "/api/auth/login", json={"username": name, "password": PASSWORD})
    assert status == 200, login
    assert login["expires_at"] is not None
    expires = parse_iso(login["expires_at"])
    now = dt.datetime.now(dt.timezone.utc)
    assert now < expires <= now + dt.timedelta(seconds=5)
    status, _ = await s.call("GET", "/api/auth/me", login["token"])
    assert status == 200  # alive (and now cached)

    async def dead():
        return (await s.call("GET", "/api/auth/me", login["token"]))[0] == 401

    await wait_for(dead, timeout=10, interval=0.1)
    assert dt.datetime.now(dt.timezone.utc) >= expires - dt.timedelta(milliseconds=50)
    assert_error(*(await s.call("GET", "/api/auth/me", login["token"])), 401, "unauthorized")
    assert_error(*(await s.call("POST", "/api/auth/logout", login["token"])), 401, "unauthorized")
    # logging in again gives a fresh, working session
    _, again = await s.call("POST", "/api/auth/login", json={"username": name, "password": PASSWORD})
    assert (await s.call("GET", "/api/auth/me", again["token"]))[0] == 200


# --------------------------------------------------------------------------- token storage

async def test_sessions_table_stores_only_digest(start_server, dsn):
    s = await started(start_server, dsn)
    p = await s.player()
    token = p["token"]
    digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
    sessions = db_rows(dsn, "SELECT * FROM sessions")
    assert sessions, "no session row"
    cells = [str(c) for row in sessions for c in row]
    assert not any(token in c for c in cells), sessions
    assert digest in cells, (digest, sessions)
    # nor anywhere else in the database
    for table in ("players", "zones", "entities"):
        for row in db_rows(dsn, f"SELECT * FROM {table}"):
            assert not any(token in str(c) for c in row), (table, row)
    # the password is not stored either, only a bcrypt hash of it
    for row in db_rows(dsn, "SELECT * FROM players"):
        assert not any(p["password"] in str(c) for c in row), row
    (pw_hash,), = db_rows(dsn, f"SELECT password_hash FROM players WHERE username = '{p['username']}'")
    assert pw_hash.startswith("$2"), pw_hash


# --------------------------------------------------------------------------- bcrypt off the loop

async def test_login_burst_does_not_stall_tick(start_server, dsn):
    """20 clients log in over and over (bcrypt cost 10) until 10 ticks have ended while bcrypt
    jobs were in flight, as sampled on the event loop the server shares with the test (were
    bcrypt run on the loop, no tick could end while a job is in flight). The burst so lasts
    those ticks whatever the machine's speed; the tick keeps time through it."""
    interval, clients, overlapped = 0.05, 20, 10
    # 20 logins at once from one address: within its share of the bcrypt queue (an eighth)
    s = await started(start_server, dsn, auth_bcrypt_rounds=10, tick_interval=interval, auth_max_pending_hashes=256)
    name = new_name()
    status, body = await s.call("POST", "/api/auth/register", json={"username": name, "password": PASSWORD})
    assert status == 201, body
    engine, accounts = s.srv.engine, s.srv.accounts
    await wait_for(lambda: engine.tick_number >= 2)
    loop = asyncio.get_running_loop()
    burst = asyncio.Event()  # set: no client starts another login
    results: list = []

    async def client() -> None:
        while not burst.is_set():
            results.append(await s.call("POST", "/api/auth/login", json={"username": name, "password": PASSWORD}))

    seen = {"tick": engine.tick_number, "pending": accounts._pending, "ticks": 0}

    def ticks_while_hashing() -> bool:
        """Ticks that ended between two samples both taken with bcrypt jobs in flight."""
        tick, pending = engine.tick_number, accounts._pending
        if pending and seen["pending"]:
            seen["ticks"] += tick - seen["tick"]
        seen.update(tick=tick, pending=pending)
        return seen["ticks"] >= overlapped

    ticks_before, t0 = engine.tick_number, loop.time()
    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    try:
        await wait_for(ticks_while_hashing, timeout=20, interval=0.005,
                       what=f"{overlapped} ticks ending while bcrypt jobs were in flight")
    finally:
        burst.set()
        await asyncio.gather(*tasks)
    elapsed = loop.time() - t0
    ticks = engine.tick_number - ticks_before
    assert all(st == 200 for st, _ in results), results
    expected = elapsed / interval
    # the burst lasted at least those 10 ticks, however fast bcrypt is; the tick must keep going
    assert expected >= 4, f"the burst was too quick to measure ({elapsed:.3f} s)"
    assert ticks >= expected / 2, f"only {ticks} ticks during a {elapsed:.2f} s burst (~{expected:.0f} due)"
    # and /metrics counts the same ticks
    status, text = await s.call("GET", "/metrics")
    assert status == 200
    line = next(ln for ln in text.splitlines() if ln.startswith("gridserver_ticks_total "))
    assert int(float(line.split()[1])) >= ticks_before + ticks


async def test_a_login_flood_past_the_bcrypt_queue_gets_503_busy_at_once(start_server, tmp_path):
    """Past ``max_pending_hashes`` waiting bcrypt jobs, logins answer 503 busy instead of queueing
    (from 12 addresses, so that no one address goes past its share of the queue)."""
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}", auth_bcrypt_rounds=10,
                                             auth_bcrypt_threads=1, auth_max_pending_hashes=2))
    await running.player("flooded", PASSWORD)
    body = {"username": "flooded", "password": PASSWORD}
    answers = await asyncio.gather(*(call_from(f"127.0.0.{2 + i}", running.url + "/api/auth/login", body)
                                     for i in range(12)))
    statuses = sorted(status for status, _ in answers)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
    assert all(b["error"] == "busy" and b["message"] for s, b in answers if s == 503)
    status, _ = await running.call("POST", "/api/auth/login", json=body)  # the queue drained: served again
    assert status == 200


async def test_a_session_deleted_in_the_database_ends_after_the_recheck(start_server, dsn):
    """Sessions are cached, but the database is asked again after ``Accounts.recheck`` seconds."""
    running = await start_server(make_config(dsn))
    p = await running.player()
    status, _ = await running.call("GET", "/api/auth/me", p["token"])
    assert status == 200                                   # cached now
    db_rows(dsn, "DELETE FROM sessions")                    # revoked behind the server's back
    status, _ = await running.call("GET", "/api/auth/me", p["token"])
    assert status == 200                                   # still trusted within the recheck window
    running.srv.accounts.recheck = 0.0
    status, body = await running.call("GET", "/api/auth/me", p["token"])
    assert status == 401 and body["error"] == "unauthorized"


# --------------------------------------------------------------------------- limits and sessions

async def test_a_password_with_nul_never_logs_in_as_the_password_without_it(start_server, dsn):
    """bcrypt cannot take NUL; "correct\\0horse" must not pass for "correcthorse"."""
    s = await started(start_server, dsn)
    p = await s.player(password="correcthorse")
    for wrong in ("correct\u0000horse", "\u0000correcthorse", "correcthorse\u0000"):
        status, body = await s.call("POST", "/api/auth/login", json={"username": p["username"], "password": wrong})
        assert_error(status, body, 401, "invalid_credentials")
    status, _ = await s.call("POST", "/api/auth/login", json={"username": p["username"], "password": "correcthorse"})
    assert status == 200


async def test_failed_logins_lock_the_username_and_the_address_with_retry_after(start_server, dsn):
    s = await started(start_server, dsn, auth_max_failed_logins=3)
    p = await s.player()
    other = await s.player()
    for _ in range(3):
        status, body = await s.call("POST", "/api/auth/login", json={"username": p["username"], "password": "wrong one"})
        assert_error(status, body, 401, "invalid_credentials")
    for who in (p, other):  # the username and this address (127.0.0.1) are locked: even the right password
        async with s.http.post(s.url + "/api/auth/login",
                               json={"username": who["username"], "password": PASSWORD}) as resp:
            body = await resp.json()
            assert resp.status == 429 and body["error"] == "too_many_attempts", body
            assert 1 <= int(resp.headers["Retry-After"]) <= 60
    # the username from another address is locked too; another user from another address is not
    status, body = await call_from("127.0.0.7", s.url + "/api/auth/login", {"username": p["username"], "password": PASSWORD})
    assert_error(status, body, 429, "too_many_attempts")
    status, body = await call_from("127.0.0.7", s.url + "/api/auth/login",
                                   {"username": other["username"], "password": PASSWORD})
    assert status == 200, body
    assert s.srv.metrics.failed_logins_total == 3 and s.srv.metrics.logins_throttled_total == 3
    # the lock ends when the oldest failure leaves the window
    for window in (s.srv.accounts.failed_by_name, s.srv.accounts.failed_by_address):
        window.window = 0.0
    status, body = await s.call("POST", "/api/auth/login", json={"username": p["username"], "password": PASSWORD})
    assert status == 200, body


def test_failure_window_locks_at_the_limit_and_opens_when_the_oldest_failure_expires():
    from gridserver import _FailureWindow
    w = _FailureWindow(limit=3, window=60.0, max_keys=4)
    assert w.retry_after("k", 0.0) == 0.0
    assert [w.fail("k", t) for t in (0.0, 10.0, 20.0)] == [False, False, True]
    assert w.fail("k", 21.0) is False             # locked already: only the locking failure says so
    assert w.retry_after("k", 21.0) == pytest.approx(49.0)
    assert w.retry_after("k", 69.9) == pytest.approx(0.1)
    assert w.retry_after("k", 70.0) == 0.0        # the failure at 10 expired: two left, under the limit
    assert w.fail("k", 71.0) is True
    assert w.retry_after("k", 71.0) == pytest.approx(9.0)   # the one at 20 is now the oldest of three
    assert w.retry_after("k", 200.0) == 0.0 and "k" not in w._fails
    for i in range(10):                           # memory stays bounded by max_keys
        w.fail(f"key{i}", 300.0 + i)
    assert len(w._fails) <= 4


async def test_logout_all_ends_every_session_and_closes_their_sockets(start_server, dsn):
    s = await started(start_server, dsn)
    p = await s.player()
    status, second = await s.call("POST", "/api/auth/login", json={"username": p["username"], "password": PASSWORD})
    assert status == 200
    other = await s.player()
    ws = await s.http.ws_connect(s.ws_url(second["token"]))
    try:
        await wait_for(lambda: len(s.srv.hub.conns) == 1)
        status, body = await s.call("POST", "/api/auth/logout", p["token"], json={"all": "yes"})
        assert_error(status, body, 400, "bad_request", "all")
        status, _ = await s.call("POST", "/api/auth/logout", p["token"], json={"all": True})
        assert status == 204
        for token in (p["token"], second["token"]):
            status, body = await s.call("GET", "/api/auth/me", token)
            assert_error(status, body, 401, "unauthorized")
        msg = await ws.receive(timeout=scaled(5))
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4001, msg
    finally:
        await ws.close()
    assert db_rows(s.srv.cfg.get("database", "dsn"), "SELECT count(*) FROM sessions")[0][0] == 1  # the other player's
    status, _ = await s.call("GET", "/api/auth/me", other["token"])
    assert status == 200


async def test_a_player_holds_at_most_max_sessions_the_oldest_end(start_server, dsn):
    s = await started(start_server, dsn, auth_max_sessions=3)
    p = await s.player()
    tokens = [p["token"]]
    for _ in range(4):
        status, body = await s.call("POST", "/api/auth/login", json={"username": p["username"], "password": PASSWORD})
        assert status == 200
        tokens.append(body["token"])
    statuses = [(await s.call("GET", "/api/auth/me", t))[0] for t in tokens]
    assert statuses == [401, 401, 200, 200, 200], statuses
    assert db_rows(s.srv.cfg.get("database", "dsn"), "SELECT count(*) FROM sessions")[0][0] == 3


@pytest.mark.parametrize("text", ["b'/ws?token=SECRET&x=1'", "b'/ws?a=1&%74oken=SECRET'", "Authorization: Bearer SECRET",
                                  "Authorization: bearer\\tSECRET", "bytearray(b'/ws?TOKEN=SECRET...')"])
def test_a_quoted_request_never_shows_a_token(text):
    from gridserver import _redact
    assert "SECRET" not in _redact(text) and "[redacted]" in _redact(text)
