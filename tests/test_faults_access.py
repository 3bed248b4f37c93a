"""The fault suite, access limits: a real gridserver process attacked at its front door.

Each test starts ``python gridserver.py`` as a subprocess and talks to it only over sockets,
from chosen local source addresses (any 127.x.y.z on Linux is a client of its own as far as
the server can tell). It proves that:

* a flood of logins from one address never locks the other players out: that address gets
  429 ``too_many_attempts`` (its share of the bcrypt queue, then its failed-login limit)
  while a real player logs in from another address (PostgreSQL);
* ``max_failed_logins`` failed logins a minute lock the username (from any address) and the
  address (for any username), even for the right password, with ``Retry-After``; failed
  logins are logged with username and address, never with the password;
* idle sockets cannot exhaust the server's file descriptors: the open files limit is raised
  to the hard limit at start, one address holds at most ``max_connections_per_address``
  connections (the rest are answered 429 and closed before any byte is read), and when
  ``accept()`` fails for want of descriptors the log gets at most one line a second and the
  server serves again once descriptors are free;
* a session token in a request too long to parse never reaches the log or the answer.

The figures measured are printed at the end of the run (``fault suite figures``).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import socket
import time
import uuid

import aiohttp
import pytest

from faultkit import HOST, Client, RawWS, figure, raw_http, start
from helpers import call_from, dsn_with_schema, scaled, wait_for

ECHO = "game_modules.echo"
PASSWORD = "correct horse"

pytestmark = pytest.mark.slow


async def login_from(address: str, url: str, username: str, password: str,
                     timeout: float = 20.0) -> tuple[int, object, dict[str, str]]:
    """One login over a fresh connection from ``address``: (status, JSON body, headers);
    ``timeout`` is scaled."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=scaled(timeout))) as http:
        async with http.post(url + "/api/auth/login", json={"username": username, "password": password}) as r:
            text = await r.text()
            return r.status, json.loads(text) if text else None, dict(r.headers)


def assert_too_many_attempts(status: int, body: object, headers: dict[str, str]) -> int:
    """A 429 ``too_many_attempts`` envelope with ``Retry-After`` in whole seconds; those seconds."""
    assert status == 429, (status, body)
    assert isinstance(body, dict) and body.get("error") == "too_many_attempts", body
    assert isinstance(body.get("message"), str) and body["message"], body
    retry = headers.get("Retry-After", "")
    assert retry.isdigit() and 1 <= int(retry) <= 60, f"Retry-After {retry!r}"
    return int(retry)


# ---------------------------------------------------------------------------------------------
# A login flood from one address
# ---------------------------------------------------------------------------------------------


async def test_a_login_flood_from_one_address_never_locks_out_the_others(pg_schema, tmp_path, http, processes):
    """200 anonymous clients on one address (127.0.0.2) keep logins of unknown usernames in
    flight at bcrypt cost 10, each trying again 0.1 s after any answer; meanwhile a real player
    logs in three times from 127.0.0.1 and gets 200 each time (without the per-address share
    of the bcrypt queue, the flood held the whole queue and the player got 503 busy). The
    flood gets 429 ``too_many_attempts`` with ``Retry-After``, never a 5xx, and little bcrypt
    work: its failed logins stop at the failed-login limit plus what was in flight."""
    dsn = dsn_with_schema(pg_schema)
    srv = start(processes, tmp_path, dsn, ECHO, {"auth_bcrypt_rounds": 10, "tick_interval": 0.1})
    await srv.ready(http)
    c = Client(srv.url, http)
    real = await c.player("real_player", PASSWORD)

    attackers, attempts, pause = 200, 40, 0.1
    answers: list[tuple[int | None, object, str | None]] = []
    stop = asyncio.Event()
    deadline = time.monotonic() + scaled(20)

    async def attacker(session: aiohttp.ClientSession, i: int) -> None:
        for k in range(attempts):
            if stop.is_set() or time.monotonic() > deadline:
                return
            body = {"username": f"ghost_{i}_{k}", "password": f"guess-{i}-{k}-wrong"}
            try:
                async with session.post(srv.url + "/api/auth/login", json=body) as r:
                    text = await r.text()
                    try:
                        parsed = json.loads(text)
                    except ValueError:
                        parsed = text
                    answers.append((r.status, parsed, r.headers.get("Retry-After")))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                answers.append((None, repr(exc), None))
            await asyncio.sleep(pause)

    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0), limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=scaled(20))) as flood:
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(attacker(flood, i)) for i in range(attackers)]
        try:
            await wait_for(lambda: len(answers) >= attackers, timeout=15, what="the flood's first answers")
            real_logins = []
            for _ in range(3):
                t = time.monotonic()
                status, body, _ = await login_from("127.0.0.1", srv.url, real["username"], PASSWORD)
                real_logins.append((status, round(time.monotonic() - t, 2)))
                assert status == 200, f"the real player got {status} {body} during the flood"
            await wait_for(lambda: any(s == 429 and "failed logins" in str(b) for s, b, _ in answers),
                           timeout=15, what="the flood's address locked by its failed logins")
            while time.monotonic() - t0 < 2.0:  # the flood goes on a while after the lock
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            done, pending = await asyncio.wait(tasks, timeout=scaled(25))
            for task in pending:
                task.cancel()
        assert not pending, f"{len(pending)} attackers still waiting for answers"
        for task in done:
            task.result()
        flood_seconds = time.monotonic() - t0

    statuses = [s for s, _, _ in answers]
    errors = [b for s, b, _ in answers if s is None]
    assert not errors, f"{len(errors)} flood requests got no answer, e.g. {errors[:3]}"
    assert not [s for s in statuses if s >= 500], sorted(set(statuses))
    assert set(statuses) <= {401, 429}, sorted(set(statuses))
    throttled = [(b, h) for s, b, h in answers if s == 429]
    assert throttled, "the flood was never answered 429"
    for body, retry in throttled:
        assert_too_many_attempts(429, body, {"Retry-After": retry or ""})
    locked = [b for b, _ in throttled if "failed logins" in b["message"]]
    assert locked, "the flood's address never reached its failed-login limit"
    m = await c.metrics()
    failed = m.get("gridserver_failed_logins_total", math.inf)
    assert failed == statuses.count(401), (failed, statuses.count(401))
    # The lock at 10 failures, an eighth of the queue (16) in flight when it locks, and the
    # logins already past the lock's check by then (each still within the eighth); without the
    # lock the flood's bcrypt work never stops.
    assert failed <= 10 + 3 * 16, f"the flood got {failed} bcrypt checks"
    assert m["gridserver_logins_throttled_total"] == len(throttled)
    figure("login flood: attacker requests from one address (200 clients)", len(answers))
    figure("login flood: attacker answers 429 / 401", f"{len(throttled)} / {statuses.count(401)}")
    figure("login flood: flood duration in s", round(flood_seconds, 1))
    figure("login flood: real player's logins from another address (status, s)", real_logins)


# ---------------------------------------------------------------------------------------------
# Failed logins: a limit per username and per address
# ---------------------------------------------------------------------------------------------


async def test_failed_logins_lock_the_username_and_the_address_even_for_the_right_password(tmp_path, http,
                                                                                           processes):
    """With the default ``max_failed_logins`` (10 a minute): ten wrong passwords for one user
    from 127.0.0.1 are 401; then that user's login with the right password is 429
    ``too_many_attempts`` with ``Retry-After`` (from 127.0.0.1 and from 127.0.0.5: the
    username is locked), and so is another user's from 127.0.0.1 (the address is locked);
    that other user logs in from 127.0.0.6. The log names each failed login's username and
    address and never holds a password sent."""
    srv = start(processes, tmp_path, f"sqlite:///{tmp_path / 'db'}", ECHO, {"tick_interval": 0.1})
    await srv.ready(http)
    c = Client(srv.url, http)
    victim, other = "victim_" + uuid.uuid4().hex[:6], "other_" + uuid.uuid4().hex[:6]
    for name in (victim, other):
        status, body = await c.call("POST", "/api/auth/register", json_body={"username": name, "password": PASSWORD})
        assert status == 201, body
    wrong = [f"wrong-{secrets.token_hex(6)}-{i}" for i in range(10)]
    for password in wrong:
        status, body, _ = await login_from("127.0.0.1", srv.url, victim, password)
        assert status == 401 and body["error"] == "invalid_credentials", (status, body)

    retry_afters = []
    for address, name, why in (("127.0.0.1", victim, "the 11th attempt, with the right password"),
                               ("127.0.0.5", victim, "the username from another address"),
                               ("127.0.0.1", other, "another user from the locked address")):
        status, body, headers = await login_from(address, srv.url, name, PASSWORD)
        assert status == 429, f"{why}: {status} {body}"
        retry_afters.append(assert_too_many_attempts(status, body, headers))
    status, body, _ = await login_from("127.0.0.6", srv.url, other, PASSWORD)
    assert status == 200 and body["token"], (status, body)

    m = await c.metrics()
    assert m["gridserver_failed_logins_total"] == 10
    assert m["gridserver_logins_throttled_total"] == 3
    log = srv.log_text()
    assert log.count(f"failed login for '{victim}' from 127.0.0.1") == 10, log[-3000:]
    assert f"failed logins a minute for the username '{victim}'" in log
    assert "failed logins a minute for the address '127.0.0.1'" in log
    leaked = [p for p in wrong + [PASSWORD] if p in log]
    assert not leaked, f"passwords in the log: {leaked}"
    figure("failed logins: Retry-After of the three locked logins in s", retry_afters)


# ---------------------------------------------------------------------------------------------
# Idle sockets and file descriptors
# ---------------------------------------------------------------------------------------------


async def _open_idle(address: str, port: int, timeout: float = 5.0) -> socket.socket | None:
    """A TCP connection from ``address`` that sends nothing; None when the connect times out
    (the server's accept queue is full); ``timeout`` is scaled."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((address, 0))
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (HOST, port)), scaled(timeout))
        return sock
    except (OSError, asyncio.TimeoutError):
        sock.close()
        return None


async def _read_to_end(sock: socket.socket, timeout: float) -> bytes | None:
    """Everything the server sends until it closes; None when it is still open after ``timeout``
    (scaled)."""
    loop = asyncio.get_running_loop()
    data = b""
    end = loop.time() + scaled(timeout)
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), max(0.01, end - loop.time()))
        except asyncio.TimeoutError:
            return None
        except ConnectionError:
            return data
        if not chunk:
            return data
        data += chunk


async def test_idle_sockets_past_the_per_address_limit_are_answered_429_and_closed(tmp_path, http, processes):
    """The server starts with a soft open files limit of 256 (hard 4096) and raises it to 4096.
    300 TCP connections from 127.0.0.3 that never send a byte: 50 (``max_connections_per_address``)
    stay open, the other 250 get an HTTP 429 ``too_many_connections`` JSON envelope and are
    closed. Meanwhile a player registers, logs in and plays over WebSocket from 127.0.0.1;
    once the 50 are closed, 127.0.0.3 is served again."""
    limit, total = 50, 300
    srv = start(processes, tmp_path, f"sqlite:///{tmp_path / 'db'}", ECHO,
                {"tick_interval": 0.1, "server_max_connections_per_address": limit, "server_client_timeout": 30},
                rlimit_nofile=(256, 4096))
    await srv.ready(http)
    assert "open files limit: 4096" in srv.log_text(), srv.log_text()[-2000:]
    with open(f"/proc/{srv.pid}/limits") as fh:
        assert re.search(r"Max open files\s+4096\s+4096", fh.read())

    socks: list[socket.socket] = []
    try:
        for _ in range(total):
            sock = await _open_idle("127.0.0.3", srv.port)
            assert sock is not None, f"connect {len(socks) + 1} from 127.0.0.3 timed out"
            socks.append(sock)
        readers = [asyncio.ensure_future(_read_to_end(s, 10.0)) for s in socks]
        try:
            await wait_for(lambda: sum(t.done() for t in readers) >= total - limit, timeout=10,
                           what=f"{total - limit} connections answered and closed by the server")
            await asyncio.sleep(scaled(0.5))  # and no more than those
        finally:
            for t in readers:
                t.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        refused = [t.result() for t in readers if not t.cancelled() and t.result() is not None]
        assert (len(refused), total - len(refused)) == (total - limit, limit), \
            f"{len(refused)} closed by the server, {total - len(refused)} open"
        for raw in refused:
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429 "), raw[:200]
            assert b"application/json" in head.lower(), raw[:200]
            envelope = json.loads(body)
            assert envelope["error"] == "too_many_connections" and envelope["message"], envelope

        # Another address is served as usual, HTTP and WebSocket.
        c = Client(srv.url, http)
        player = await c.player()
        status, body = await call_from("127.0.0.1", srv.url + "/api/auth/me", method="GET", token=player["token"])
        assert status == 200 and body["id"] == player["id"], body
        ws = await RawWS.connect(srv.port, player["token"])
        try:
            await ws.pong_after()
        finally:
            ws.abort()
        refused_total = (await c.metrics())["gridserver_connections_refused_total"]
        assert refused_total >= total - limit, refused_total
    finally:
        for sock in socks:
            sock.close()
    # The closed connections are no longer counted: the address is served again.
    await wait_for(lambda: _healthz_from("127.0.0.3", srv.url), timeout=10, what="127.0.0.3 served again")
    figure("idle sockets: connections from one address open / answered 429 and closed",
           f"{limit} / {len(refused)}")
    figure("idle sockets: gridserver_connections_refused_total", int(refused_total))


async def _healthz_from(address: str, url: str):
    try:
        status, body = await call_from(address, url + "/healthz", method="GET", timeout=5)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    return (status, body) if status == 200 else None


_ACCEPT_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ .*accept", re.MULTILINE)


async def test_out_of_file_descriptors_logs_at_most_once_a_second_and_recovers(tmp_path, http, processes):
    """The server's open files limit is 150, soft and hard (so it cannot raise it). Idle TCP
    connections from eight addresses (127.0.0.2 to 127.0.0.9, 200 in all) use up its
    descriptors, so that ``accept()`` fails for lack of them; they are kept open about 3 s.
    A WebSocket opened before keeps being answered; the log gets at most one record about
    ``accept`` a second (asyncio by itself logs every failed ``accept()``: up to the listen
    backlog at each of its retries, hundreds a second); once the connections are closed the
    server serves again: a player logs in and plays."""
    srv = start(processes, tmp_path, f"sqlite:///{tmp_path / 'db'}", ECHO,
                {"tick_interval": 0.1, "server_max_connections_per_address": 1000, "server_client_timeout": 30},
                rlimit_nofile=(150, 150))
    await srv.ready(http)
    assert "open files limit: 150" in srv.log_text(), srv.log_text()[-2000:]
    c = Client(srv.url, http)
    player = await c.player()
    playing = await RawWS.connect(srv.port, player["token"])
    fds0 = srv.fd_count()

    addresses = [f"127.0.0.{i}" for i in range(2, 10)]
    per_address, hold = 25, 3.0
    log_start = len(srv.log_text())
    socks: list[socket.socket] = []
    t0 = time.monotonic()
    try:
        opened = await asyncio.gather(*(_open_idle(a, srv.port, timeout=3.0)
                                        for a in addresses for _ in range(per_address)))
        socks = [s for s in opened if s is not None]
        assert len(socks) > 150, f"only {len(socks)} connections opened"
        await wait_for(lambda: _ACCEPT_RECORD.search(srv.log_text()[log_start:]), timeout=5,
                       what="accept() failing for lack of descriptors")
        fds_full = srv.fd_count()
        pongs, end = 0, time.monotonic() + hold
        while time.monotonic() < end:  # the connections it holds are served meanwhile
            await playing.pong_after(timeout=5)
            pongs += 1
            await asyncio.sleep(0.2)
    finally:
        for sock in socks:
            sock.close()
        playing.abort()
    span = time.monotonic() - t0
    # Descriptors come back; the server accepts and serves again.
    _, body = await wait_for(lambda: _login_from_or_none("127.0.0.1", srv.url, player["username"]),
                             timeout=20, what="a login after the descriptors came back")
    ws = await RawWS.connect(srv.port, body["token"])
    try:
        await ws.pong_after()
    finally:
        ws.abort()
    await wait_for(lambda: srv.fd_count() <= fds0 + 5, timeout=20, what=f"descriptors back to about {fds0}")
    records = _ACCEPT_RECORD.findall(srv.log_text()[log_start:])
    bound = math.ceil(span) + 2
    assert 1 <= len(records) <= bound, f"{len(records)} log records about accept() in {span:.1f} s"
    figure("out of descriptors: idle connections opened / server descriptors in use (limit 150)",
           f"{len(socks)} / {fds_full}")
    figure("out of descriptors: log records about accept() over the span (s)", f"{len(records)} ({span:.1f})")
    figure("out of descriptors: WebSocket pings answered meanwhile", pongs)


async def _login_from_or_none(address: str, url: str, username: str):
    try:
        status, body, _ = await login_from(address, url, username, PASSWORD, timeout=5)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    return (status, body) if status == 200 else None


# ---------------------------------------------------------------------------------------------
# Session tokens never reach the log
# ---------------------------------------------------------------------------------------------


async def test_a_token_in_a_request_too_long_to_parse_is_not_logged(tmp_path, http, processes):
    """At log level debug (which logs each unparseable request) and with the access log on: a
    request line of over 8190 bytes carrying ``?token=...`` and an over-long
    ``Authorization: Bearer ...`` header are answered with a 4xx JSON envelope; neither the
    answer nor the log holds the token (aiohttp quotes the start of the line it refused)."""
    srv = start(processes, tmp_path, f"sqlite:///{tmp_path / 'db'}", ECHO,
                {"tick_interval": 0.1, "debug_log_level": "debug", "debug_access_log": "true"})
    await srv.ready(http)
    in_query, in_header = "Q" + secrets.token_urlsafe(32), "H" + secrets.token_urlsafe(32)
    requests = {
        "token in a request line of 9000 bytes":
            b"GET /ws?token=" + in_query.encode() + b"&pad=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "bearer token in a header of 9000 bytes":
            b"GET /api/auth/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + in_header.encode()
            + b"z" * 9000 + b"\r\n\r\n",
    }
    for name, raw in requests.items():
        answer = await asyncio.to_thread(raw_http, srv.port, raw, 15)
        assert answer.status is not None and 400 <= answer.status < 500, (name, answer)
        assert answer.headers.get("content-type", "").startswith("application/json"), (name, answer)
        body = answer.json()
        assert isinstance(body["error"], str) and body["message"], (name, body)
        assert in_query not in answer.body.decode("latin-1") and in_header not in answer.body.decode("latin-1"), \
            (name, answer)
    await wait_for(lambda: srv.log_text().count("unparseable request from 127.0.0.1") >= 2, timeout=5,
                   what="both requests logged")
    log = srv.log_text()
    assert log.count("unparseable request from 127.0.0.1") == 2, log[-3000:]
    assert log.count("[redacted]") >= 2, log[-3000:]  # the part quoted is there, without the token
    for secret in (in_query, in_header):
        assert secret not in log and secret[:16] not in log, "a session token is in the log"
    figure("token redaction: over-long requests with a token answered without it", len(requests))
