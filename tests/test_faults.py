"""The fault suite: a real gridserver process attacked the way players and machines do.

Each promise's test starts ``python gridserver.py`` as a subprocess (configured through
``GRIDSERVER_*`` environment variables, on PostgreSQL where the promise is about the
database) and talks to it only over sockets, as an outsider; two regression tests for bugs
the fuzzer found use the in-process server on both backends. What each test proves is
listed in the README's "Guarantees" section, with the figures it measures; the figures are
printed at the end of the run (``fault suite figures``).

Tick rates are checked by counting ticks over a span (at least half of those due), never by
timing a single event. Every wait is bounded by a timeout ``GRIDSERVER_TEST_TIMEOUT_FACTOR``
scales; the suite is marked ``slow`` (``-m "not slow"`` leaves it out).
``GRIDSERVER_FUZZ_EXAMPLES`` raises the number of fuzzing cases for a soak run and
``GRIDSERVER_SOAK_ROUNDS`` multiplies the crash cycles and abuse waves
(``python bench/soak.py`` runs the suite that way).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import time
import uuid

import aiohttp
import pytest
from aiohttp import WSMsgType

from helpers import PG_DSN, Passive, dsn_with_schema, make_config, pg_exec, require_pg, scaled, stop_server, wait_for
from faultkit import (OP_BINARY, OP_TEXT, Client, RawWS, ServerProcess, TickReader, TickWatch, add_figure,
                      client_frame, figure, start)

#: A soak run (bench/soak.py) multiplies the crash cycles and the abuse waves.
SOAK_ROUNDS = int(os.environ.get("GRIDSERVER_SOAK_ROUNDS", "1"))

COUNTER = "tests.fault_games:Counter"
FAULTY = "tests.fault_games:Faulty"

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------
# The Counter world: every saved state must be one that existed
# ---------------------------------------------------------------------------------------------


def counter_rows(dsn: str) -> dict[str, list[dict]]:
    """Entity rows of every zone, read straight from PostgreSQL: zone name -> rows."""
    rows = pg_exec("SELECT z.name, z.width, z.height, e.id::text, e.x, e.y, e.width, e.height, e.metadata::text "
                   "FROM entities e JOIN zones z ON z.id = e.zone_id", dsn)
    out: dict[str, list[dict]] = {}
    for name, zw, zh, eid, x, y, w, h, meta in rows:
        out.setdefault(name, []).append({"zw": zw, "zh": zh, "id": eid, "x": x, "y": y, "w": w, "h": h,
                                         "meta": json.loads(meta)})
    return out


def read_trace(path) -> list[tuple[str, int, int, list[int]]]:
    """The Counter module's trace: (zone, step, entity count, spawned ks) per call."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.rstrip("\n").split(" ")
            if len(parts) == 4:
                out.append((parts[0], int(parts[1]), int(parts[2]), [int(k) for k in parts[3].split(",") if k]))
    return out


def check_zone_state(name: str, rows: list[dict], trace: list) -> tuple[int, int]:
    """One zone's saved rows are exactly the state of one step the module computed.

    Returns (step, rows checked).
    """
    steps = {r["meta"]["step"] for r in rows}
    assert len(steps) == 1, f"{name}: rows of several steps {sorted(steps)[:10]}: a flush was written half"
    step = steps.pop()
    computed = [t for t in trace if t[0] == name and t[1] == step]
    assert computed, f"{name}: step {step} was never computed by the module"
    count = computed[-1][2]
    assert len(rows) == count, f"{name}: {len(rows)} rows, the module's step {step} had {count} entities"
    assert sorted(r["meta"]["i"] for r in rows) == list(range(count)), f"{name}: entity numbers have gaps"
    for r in rows:
        i, w, h = r["meta"]["i"], r["zw"], r["zh"]
        assert (r["x"], r["y"], r["w"], r["h"]) == ((step + i) % w, (i // w) % h, 1, 1), (name, step, r)
        assert r["meta"]["born"] <= step, r
    spawned = {k for t in trace if t[0] == name and t[1] <= step for k in t[3]}
    assert {r["meta"]["k"] for r in rows if "k" in r["meta"]} == spawned, f"{name}: spawned entities differ"
    return step, len(rows)


class Play:
    """Players subscribed to Counter zones, each spawning entities with intents until stopped,
    recording every tick frame they receive: zone -> [(step, spawned ks)]."""

    def __init__(self, client: Client, http: aiohttp.ClientSession):
        self.client, self.http = client, http
        self.frames: dict[str, list[tuple[int, list[int]]]] = {}
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.closes: list[tuple[WSMsgType, object]] = []
        self.tasks: list[asyncio.Task] = []
        self.readers: list[asyncio.Task] = []
        self.sent = 0
        self.k = random.randrange(1, 10 ** 6) * 1000  # spawn numbers, unique per run

    async def join(self, token: str, zone_id: str, spawn: bool = True) -> None:
        ws = await self.http.ws_connect(self.client.ws_url(token), heartbeat=None, autoping=True)
        await ws.send_json({"type": "subscribe", "zone_id": zone_id})
        while True:
            m = await ws.receive_json(timeout=scaled(10))
            if m["type"] == "subscribed":
                break
        self.sockets.append(ws)
        self.readers.append(asyncio.ensure_future(self._read(ws)))
        self.tasks.append(self.readers[-1])
        if spawn:
            self.tasks.append(asyncio.ensure_future(self._spawn(ws)))

    async def _read(self, ws) -> None:
        while True:
            msg = await ws.receive()
            if msg.type != WSMsgType.TEXT:
                self.closes.append((msg.type, msg.data))
                return
            m = json.loads(msg.data)
            if m["type"] == "tick":
                s = m["state"]
                self.frames.setdefault(s["zone"], []).append((s["step"], s["spawned"]))

    async def _spawn(self, ws) -> None:
        while not ws.closed:
            self.k += 1
            try:
                await ws.send_json({"type": "intent", "data": {"spawn": self.k}})
            except (ConnectionError, RuntimeError):
                return
            self.sent += 1
            await asyncio.sleep(0.03)

    def last_step(self, zone: str) -> int:
        return self.frames[zone][-1][0] if self.frames.get(zone) else 0

    def seen_spawns(self, zone: str, up_to_step: int | None = None) -> set[int]:
        return {k for step, ks in self.frames.get(zone, []) for k in ks if up_to_step is None or step <= up_to_step}

    async def wait_closed(self, timeout: float = 30.0) -> None:
        """Until every socket has ended (a close frame or otherwise); ``timeout`` is scaled."""
        await asyncio.wait_for(asyncio.gather(*self.readers, return_exceptions=True), scaled(timeout))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for ws in self.sockets:
            await ws.close()


# ---------------------------------------------------------------------------------------------
# Crash: SIGKILL in the middle of play
# ---------------------------------------------------------------------------------------------


async def test_sigkill_mid_play_keeps_everything_older_than_a_flush(pg_schema, tmp_path, http, processes):
    """Kill -9 the server three times while players spawn entities and every entity moves every
    tick; restart it on the same database each time. Accounts, sessions and zones survive;
    every change a completed flush covered is there; what is saved is exactly one step of
    every zone (never a half flush); the restarted module continues from it."""
    app = "gridserver-crash-" + uuid.uuid4().hex[:8]  # names the server's connections in pg_stat_activity
    dsn = dsn_with_schema(pg_schema) + "&application_name=" + app
    settings = {"tick_interval": 0.1, "persistence_interval": 0.3}
    game = {"zones": 2, "entities": 3000, "size": 128}
    names = ("counter-0", "counter-1")
    run = 0
    trace = tmp_path / f"trace-{run}"
    srv = start(processes, tmp_path, dsn, COUNTER, settings, {**game, "trace": trace})
    await srv.ready(http)
    c = Client(srv.url, http)
    players = [await c.player() for _ in range(2)]
    status, kept = await c.call("POST", "/api/zones", players[0]["token"],
                                {"name": "kept ✓", "width": 7, "height": 9, "metadata": {"owner": "ü", "n": [1, 2]}})
    assert status == 201, kept
    history: list = []  # trace lines of the steps that are part of the saved world's past
    rows_checked = spawns_checked = 0
    cycles = 3 * SOAK_ROUNDS
    for cycle in range(cycles):
        zones = await c.zones(players[0]["token"])
        play = Play(c, http)
        for p, name in zip(players, names):
            await play.join(p["token"], zones[name]["id"])
        try:
            await wait_for(lambda: all(len(play.frames.get(z, [])) >= 5 for z in names),
                             timeout=20, what="ticks reaching the players")
            must_have = {z: play.last_step(z) for z in names}
            must_spawns = {z: play.seen_spawns(z) for z in names}
            flushed = (await c.metrics())["gridserver_flushes_total"]
            await wait_for(lambda: _flushes_at_least(c, flushed + 2), timeout=20, what="two more flushes")
            if cycle == 0:
                await asyncio.sleep(random.uniform(0, 0.3))  # anywhere in the flush cycle
            else:  # inside a flush's transaction, while it writes entity rows
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, _await_flush, app),
                                       scaled(20))
                await asyncio.sleep(random.uniform(0, 0.02))
            srv.send(signal.SIGKILL)
            assert await srv.wait_exit() == -signal.SIGKILL
        finally:
            await play.stop()

        saved = counter_rows(dsn)
        lines = history + read_trace(trace)
        history = []
        for z in names:
            step, n = check_zone_state(z, saved[z], lines)
            assert step >= must_have[z], f"{z}: saved step {step}, but step {must_have[z]} was flushed before the kill"
            have = {r["meta"]["k"] for r in saved[z] if "k" in r["meta"]}
            assert must_spawns[z] <= have, f"{z}: spawns lost: {sorted(must_spawns[z] - have)[:5]}"
            history += [t for t in lines if t[0] == z and t[1] <= step]
            rows_checked += n
            spawns_checked += len(must_spawns[z])
        assert pg_exec("SELECT count(*) FROM sessions", dsn)[0][0] >= 2

        # Start again on the same database.
        run += 1
        trace = tmp_path / f"trace-{run}"
        srv = start(processes, tmp_path, dsn, COUNTER, settings, {**game, "trace": trace})
        await srv.ready(http)
        c = Client(srv.url, http)
        for p in players:  # the sessions survived: the old tokens work
            status, me = await c.call("GET", "/api/auth/me", p["token"])
            assert status == 200 and me["id"] == p["id"], me
        await c.login(players[0]["username"])  # and the accounts
        zones = await c.zones(players[0]["token"])
        z = zones["kept ✓"]
        assert (z["id"], z["width"], z["height"], z["metadata"]) == (kept["id"], 7, 9, {"owner": "ü", "n": [1, 2]})
        # The module's first step after the restart continues from exactly the saved one.
        await wait_for(lambda: {t[0] for t in read_trace(trace)} >= set(names),
                         timeout=10, what="the first ticks after the restart")
        after = read_trace(trace)
        for name in names:
            first = next(t for t in after if t[0] == name)
            saved_step = saved[name][0]["meta"]["step"]
            assert (first[1], first[2] - len(first[3])) == (saved_step + 1, len(saved[name])), (name, first)
    srv.send(signal.SIGTERM)
    assert await srv.wait_exit() == 0
    add_figure("crash: SIGKILLs", cycles)
    add_figure("crash: SIGKILLs inside a flush transaction", cycles - 1)
    add_figure("crash: entity rows verified as one consistent step after SIGKILL", rows_checked)
    add_figure("crash: spawned entities verified after SIGKILL", spawns_checked)


def _await_flush(application_name: str) -> None:
    """Block until a connection of the server is inside a transaction writing entity rows."""
    import psycopg2
    conn = psycopg2.connect(PG_DSN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            deadline = time.monotonic() + scaled(20)
            while time.monotonic() < deadline:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                            "AND xact_start IS NOT NULL AND query LIKE %s", (application_name, "%INSERT INTO entities%"))
                if cur.fetchone()[0]:
                    return
                time.sleep(0.002)
        raise AssertionError("no flush transaction seen in pg_stat_activity")
    finally:
        conn.close()


async def _flushes_at_least(c: Client, n: float) -> bool:
    return (await c.metrics())["gridserver_flushes_total"] >= n


# ---------------------------------------------------------------------------------------------
# Graceful stop: SIGTERM while players play
# ---------------------------------------------------------------------------------------------


async def test_sigterm_saves_the_last_tick_and_sends_close_frames(pg_schema, tmp_path, http, processes):
    """SIGTERM while three players are connected and intents keep arriving, with one zone whose
    module call always outlasts the zone timeout (so a call is usually in flight at the signal).
    Every client gets a close frame 1001; the process exits 0; the database holds exactly the
    last step the module computed for each zone, with every spawned entity."""
    dsn = dsn_with_schema(pg_schema)
    trace = tmp_path / "trace"
    settings = {"tick_interval": 0.1, "persistence_interval": 0.5}
    game = {"zones": 2, "entities": 300, "trace": trace, "slow_zone": "counter-1", "slow_ms": 80}
    srv = start(processes, tmp_path, dsn, COUNTER, settings, game)
    await srv.ready(http)
    c = Client(srv.url, http)
    players = [await c.player() for _ in range(3)]
    zones = await c.zones(players[0]["token"])
    play = Play(c, http)
    await play.join(players[0]["token"], zones["counter-0"]["id"])
    await play.join(players[1]["token"], zones["counter-1"]["id"])
    await play.join(players[2]["token"], zones["counter-0"]["id"], spawn=False)
    try:
        await wait_for(lambda: all(len(play.frames.get(z, [])) >= 5 for z in ("counter-0", "counter-1")),
                         timeout=20, what="ticks reaching the players")
        await asyncio.sleep(random.uniform(0, 0.2))
        srv.send(signal.SIGTERM)
        assert await srv.wait_exit() == 0, srv.log_text()[-2000:]
        await play.wait_closed()
    finally:
        await play.stop()
    assert len(play.closes) == 3
    for kind, code in play.closes:
        assert (kind, code) == (WSMsgType.CLOSE, 1001), f"a client got {kind.name} {code}, not a close frame 1001"
    saved = counter_rows(dsn)
    trace_lines = read_trace(trace)
    rows = 0
    for z in ("counter-0", "counter-1"):
        step, n = check_zone_state(z, saved[z], trace_lines)
        last = max(t[1] for t in trace_lines if t[0] == z)
        assert step == last, f"{z}: saved step {step}, but the module's last step was {last}"
        assert play.seen_spawns(z) <= {r["meta"]["k"] for r in saved[z] if "k" in r["meta"]}
        rows += n
    assert "unsaved" not in srv.log_text()
    figure("graceful stop: entity rows verified at the last step after SIGTERM", rows)
    figure("graceful stop: intents sent by players", play.sent)


# ---------------------------------------------------------------------------------------------
# Database outage and return (PostgreSQL through a proxy the test can cut)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["refused", "silent"])
async def test_database_outage_then_return_without_restart(mode, pg_schema, tmp_path, http, processes, tcp_proxy):
    """The database goes away (``refused``: connections reset and refused; ``silent``: packets
    vanish, nothing is closed) while a player plays. Ticks go on; every call that needs the
    database answers 503 database_unavailable within the bound; /healthz says degraded. When
    the database returns, the same process saves every change of the outage and logins work."""
    proxy = await tcp_proxy()
    dsn = dsn_with_schema(pg_schema, f"postgresql://root@127.0.0.1:{proxy.port}/test")
    direct = dsn_with_schema(pg_schema)
    interval, timeout = 0.05, 1.0
    bound = 4 * timeout + 1.0  # two attempts of (pool acquire + statement), each bounded by the timeout
    trace = tmp_path / "trace"
    settings = {"tick_interval": interval, "persistence_interval": 0.2, "persistence_max_backoff": 0.5,
                "database_timeout": timeout, "database_pool_min": 2}
    srv = start(processes, tmp_path, dsn, COUNTER, settings, {"zones": 2, "entities": 200, "trace": trace})
    await srv.ready(http)
    c = Client(srv.url, http)
    p = await c.player()
    q = await c.player()
    zones = await c.zones(p["token"])
    play = Play(c, http)
    await play.join(p["token"], zones["counter-0"]["id"])
    slowest = 0.0
    try:
        await wait_for(lambda: len(play.frames.get("counter-0", [])) >= 5, timeout=20, what="ticks")
        before_outage = play.last_step("counter-0")
        proxy.cut() if mode == "refused" else proxy.stall()

        async def degraded():
            status, body = await c.call("GET", "/healthz", timeout=5)
            return status == 503 and (body["status"], body["database"]) == ("degraded", "down")

        async with TickWatch(c, interval) as watch:
            await wait_for(degraded, timeout=20, what="/healthz degraded")
            calls = [
                ("POST", "/api/auth/register", None, {"username": "u_" + uuid.uuid4().hex[:8], "password": "12345678"}),
                ("POST", "/api/auth/login", None, {"username": p["username"], "password": p["password"]}),
                ("POST", "/api/auth/login", None, {"username": "nobody_here", "password": "12345678"}),
                ("GET", "/api/auth/me", p["token"], None),
                ("GET", "/api/zones", "never-seen-" + uuid.uuid4().hex, None),
                ("POST", "/api/auth/logout", q["token"], None),
                ("POST", "/api/zones", p["token"], {"name": "during", "width": 3, "height": 3}),
            ]
            for method, path, token, body in calls:
                t0 = time.monotonic()
                status, answer = await c.call(method, path, token, body, timeout=bound + 5)
                elapsed = time.monotonic() - t0
                slowest = max(slowest, elapsed)
                assert status == 503 and answer["error"] == "database_unavailable" and answer["message"], \
                    (method, path, status, answer)
                assert elapsed <= bound, f"{method} {path} took {elapsed:.1f} s (bound {bound} s)"
            # More at once than the pool holds: each still answers within the bound.
            t0 = time.monotonic()
            burst = await asyncio.gather(*(
                c.call("POST", "/api/auth/login", None, {"username": p["username"], "password": p["password"]},
                       timeout=bound + 5) if i % 2 else
                c.call("GET", "/api/auth/me", "never-seen-" + uuid.uuid4().hex, timeout=bound + 5)
                for i in range(30)))
            elapsed = time.monotonic() - t0
            slowest = max(slowest, elapsed)
            assert all(st == 503 and b["error"] == "database_unavailable" for st, b in burst), burst
            assert elapsed <= bound, f"a burst of 30 calls took {elapsed:.1f} s (bound {bound} s)"
            status, body = await c.call("GET", "/api/zones", p["token"])  # a session in use: served from memory
            assert status == 200 and "counter-0" in {z["name"] for z in body["zones"]}, body
            await wait_for(lambda: play.last_step("counter-0") >= before_outage + 20, timeout=20,
                             what="ticks during the outage")
        watch.assert_kept_time("the outage")
        m = await c.metrics()
        assert m["gridserver_flush_failures_total"] >= 1 and m["gridserver_database_up"] == 0
        during_step = play.last_step("counter-0")
        during_spawns = play.seen_spawns("counter-0")
        saved = counter_rows(direct)
        assert {r["meta"]["step"] for r in saved["counter-0"]} != {during_step}  # the outage was real

        proxy.restore()

        async def healthy():
            status, body = await c.call("GET", "/healthz", timeout=5)
            return status == 200 and body["status"] == "ok"

        await wait_for(healthy, timeout=20, what="/healthz ok again")
        flushed = (await c.metrics())["gridserver_flushes_total"]
        await wait_for(lambda: _flushes_at_least(c, flushed + 2), timeout=20, what="flushes after the return")
    finally:
        await play.stop()
    saved = counter_rows(direct)
    lines = read_trace(trace)
    for z in ("counter-0", "counter-1"):
        check_zone_state(z, saved[z], lines)
    assert saved["counter-0"][0]["meta"]["step"] >= during_step
    have = {r["meta"]["k"] for r in saved["counter-0"] if "k" in r["meta"]}
    assert during_spawns <= have
    # Logins, registrations and fresh tokens work again, in the same process.
    assert srv.proc.poll() is None
    again = await c.login(p["username"], p["password"])
    status, me = await c.call("GET", "/api/auth/me", again["token"])
    assert status == 200 and me["id"] == p["id"], me
    await c.player()
    status, _ = await c.call("GET", "/api/auth/me", "never-seen-" + uuid.uuid4().hex)
    assert status == 401
    status, me = await c.call("GET", "/api/auth/me", q["token"])  # the logout during the outage did not happen
    assert status == 200
    log_text = srv.log_text()
    assert log_text.count("database unreachable") == 1 and log_text.count("database back") == 1, log_text[-3000:]
    changed = len(saved["counter-0"]) + len(saved["counter-1"])
    add_figure(f"outage ({mode}): entity rows changed during the outage and verified after", changed)
    add_figure(f"outage ({mode}): entities spawned during the outage and verified after",
               len({k for s, ks in play.frames["counter-0"] if before_outage < s <= during_step for k in ks}))
    figure(f"outage ({mode}): slowest 503 answer in seconds (bound {bound})", round(slowest, 2))


# ---------------------------------------------------------------------------------------------
# Bad input on every REST route: property-based fuzzing over raw HTTP
# ---------------------------------------------------------------------------------------------

from urllib.parse import quote  # noqa: E402

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from faultkit import raw_http  # noqa: E402

#: Cases per backend; raise it for a soak run (bench/soak.py).
FUZZ_EXAMPLES = int(os.environ.get("GRIDSERVER_FUZZ_EXAMPLES", "1000"))

#: (method, path template, takes a body). {zone} and {entity} are filled by the fuzzer.
ROUTES = [
    ("POST", "/api/auth/register", True), ("POST", "/api/auth/login", True), ("POST", "/api/auth/logout", False),
    ("GET", "/api/auth/me", False), ("GET", "/api/zones", False), ("POST", "/api/zones", True),
    ("GET", "/api/zones/{zone}", False), ("DELETE", "/api/zones/{zone}", False),
    ("POST", "/api/debug/tick/pause", False), ("POST", "/api/debug/tick/resume", False),
    ("POST", "/api/debug/tick/step", False), ("GET", "/api/debug/zones/{zone}/state", False),
    ("GET", "/api/debug/entities/{entity}", False), ("GET", "/api/debug/connections", False),
    ("GET", "/healthz", False), ("GET", "/metrics", False), ("GET", "/ws", False), ("GET", "/", False),
]
FIELDS = ["username", "password", "name", "width", "height", "metadata", "type", "zone_id", "data"]


def _http_request(method: str, target: str, headers: list[tuple[str, str]], body: bytes | None,
                  chunked: bool = False) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if body is not None:
        lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if body is None:
        return head
    if chunked:
        pieces = [body[i:i + 7000] for i in range(0, len(body), 7000)]
        return head + b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
    return head + body


def _sync_call(port: int, method: str, path: str, token: str | None = None, body=None):
    headers = [("Authorization", f"Bearer {token}")] if token else []
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers.append(("Content-Type", "application/json"))
    answer = raw_http(port, _http_request(method, path, headers, data))
    return answer.status, (answer.json() if answer.body else None)


def _deep(depth: int) -> bytes:
    return b'{"username": ' + b"[" * depth + b"]" * depth + b"}"


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2 ** 63, max_value=2 ** 70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
                      st.sampled_from(["\x00", "a\x00b", "'; DROP TABLE players; --", "é" * 40, "🐉", "x" * 100]))
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.text(max_size=8) | st.sampled_from(FIELDS), kids, max_size=4), max_leaves=12)
field_value = st.one_of(json_value, st.text(alphabet="abcdefgh_.-0123456789", min_size=1, max_size=40),
                        st.integers(min_value=-5, max_value=20000), st.dictionaries(st.text(max_size=5), json_value))
object_body = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), field_value, max_size=6)


@st.composite
def bodies(draw) -> bytes | None:
    kind = draw(st.sampled_from(["none", "object", "object", "object", "json", "bytes", "text", "deep", "huge",
                                 "escapes", "empty"]))
    if kind == "none":
        return None
    if kind == "object":
        return json.dumps(draw(object_body), ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind == "json":
        return json.dumps(draw(json_value)).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if kind == "deep":
        return _deep(draw(st.sampled_from([100, 900, 1023, 1024, 1025, 5000, 20000])))
    if kind == "huge":
        return b'{"username": "' + b"a" * draw(st.sampled_from([65000, 65536, 70000, 300000])) + b'"}'
    if kind == "escapes":  # JSON escapes Python can parse but a database cannot store
        value = draw(st.sampled_from([r'"\u0000"', r'"a\u0000"', r'"\ud800"', r'"\udfff x"', r'{"\u0000": 1}',
                                      r'{"a": "\ud83d"}', "1e999", "-1e999", "123456789012345678901234567890"]))
        name = draw(st.sampled_from(["username", "password", "name", "metadata"]))
        rest = draw(st.sampled_from(['', ', "width": 3, "height": 3', ', "password": "12345678"',
                                     ', "name": "n", "width": 2, "height": 2']))
        if name == "metadata" and not value.startswith("{"):
            value = '{"k": ' + value + "}"
        return ('{"%s": %s%s}' % (name, value, rest)).encode()
    return b""


#: Hostile values for one field of an otherwise valid body, as JSON text.
NASTY = [r'"\u0000"', r'"a\u0000b"', r'"\ud800"', r'"x\udfffy"', r'{"k": "\ud800"}', r'{"\u0000": 1}',
         r'{"k": "a\u0000"}', r'{"k": [1, {"\ud83d": 2}]}', "1e999", "-1e999", "123456789012345678901234567890",
         "-1", "0", "true", "null", "[]", "{}", '"%s"' % ("x" * 70), '"%s"' % ("é" * 65),
         r'"'' OR ''1''=''1"', r'"admin\"; DROP TABLE players; --"', '{"d": ' * 120 + "1" + "}" * 120,
         '{"d": ' * 1000 + "1" + "}" * 1000, '[' * 1023 + ']' * 1023, "1.5", '"12"', '"🐉"' ]
VALID_BODY = {
    "/api/auth/register": {"username": '"fz_%s"', "password": '"correct horse"'},
    "/api/auth/login": {"username": '"player1"', "password": '"12345678"'},
    "/api/zones": {"name": '"fz %s"', "width": "8", "height": "8", "metadata": '{"a": 1}'},
}


@st.composite
def route_bodies(draw, path: str) -> bytes:
    """A valid body for the route with one field replaced, dropped or doubled."""
    fields = {k: v.replace("%s", uuid.uuid4().hex[:8]) for k, v in VALID_BODY[path].items()}
    name = draw(st.sampled_from(sorted(fields)))
    how = draw(st.sampled_from(["nasty", "nasty", "nasty", "drop", "extra"]))
    if how == "nasty":
        fields[name] = draw(st.sampled_from(NASTY))
    elif how == "drop":
        del fields[name]
    else:
        fields[draw(st.text(max_size=6))] = draw(st.sampled_from(NASTY))
    return ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}").encode("utf-8", "surrogatepass")


#: Any text, lone surrogates and NUL included, as JSON (escaped where JSON must escape).
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=20)
hostile_json = st.recursive(st.one_of(json_leaf, any_text),
                            lambda kids: st.lists(kids, max_size=3) | st.dictionaries(any_text, kids, max_size=3),
                            max_leaves=8)


@st.composite
def field_cases(draw) -> tuple[str, str, bytes]:
    """(route, field, body): a valid body of a body-taking route with one field made hostile."""
    path = draw(st.sampled_from(sorted(VALID_BODY)))
    fields = {k: v.replace("%s", uuid.uuid4().hex[:8]) for k, v in VALID_BODY[path].items()}
    name = draw(st.sampled_from(sorted(fields)))
    value = draw(st.one_of(st.sampled_from(NASTY), hostile_json.map(lambda v: json.dumps(v, ensure_ascii=True)),
                           any_text.map(lambda v: json.dumps(v, ensure_ascii=True))))
    if name == "metadata" and not value.startswith("{") and draw(st.booleans()):
        value = '{"k": %s}' % value
    fields[name] = value
    body = ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}").encode("utf-8", "surrogatepass")
    return path, name, body


segment = st.one_of(
    st.just("{real}"), st.uuids().map(str), st.text(max_size=40),
    st.sampled_from(["", ".", "..", "%00", "%2F", "%zz", "%", "null", "0", "-1", "1e9", "' OR '1'='1",
                     "00000000-0000-0000-0000-000000000000", "{" + "0" * 36 + "}", "x" * 5000,
                     "ZZZZZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZZZZZZZZZ", "12345678123456781234567812345678"]))


@st.composite
def requests(draw, ids: dict) -> dict:
    method, template, takes_body = draw(st.sampled_from(ROUTES + [r for r in ROUTES if r[2]] * 4))
    mutate = draw(st.sampled_from(["as is", "as is", "method", "segment", "suffix", "random", "query"]
                                  + ["as is"] * 4 * takes_body))
    if mutate == "method":
        method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "FOO", "get"]))
    seg = draw(segment)
    exact_id = seg == "{real}"

    def fill(text: str) -> str:
        out = text
        for key in ("zone", "entity"):
            value = ids[key] if exact_id else seg
            out = out.replace("{%s}" % key, value if value in ("%00", "%2F", "%zz", "%") else quote(value, safe=""))
        return out

    path = fill(template)
    if mutate == "segment" and "{" not in template:
        path = template + "/" + quote(seg.replace("{real}", ids["zone"]), safe="")
    elif mutate == "suffix":
        path += draw(st.sampled_from(["/", "//", "/extra", "/..", "%20", ";x=1", "/%2e%2e"]))
    elif mutate == "random":
        path = "/" + quote(draw(st.text(max_size=60)), safe="/")
    elif mutate == "query":
        path += "?" + quote(draw(st.text(max_size=60)), safe="=&")
    token = draw(st.sampled_from(["none", "player", "admin", "admin", "garbage", "scheme", "long"]))
    auth = {"none": None, "player": "Bearer {player}", "admin": "Bearer {admin}",
            "garbage": "Bearer " + draw(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=255),
                                                  max_size=60)),
            "scheme": draw(st.sampled_from(["Basic dXNlcjpwYXNz", "Token {player}", "{player}", "Bearer",
                                            "bearer {player}", "Bearer  {player} "])),
            "long": "Bearer " + "t" * 9000}[token]
    headers = []
    if auth is not None:
        headers.append(("Authorization", auth))
    if draw(st.booleans()):
        headers.append(("Content-Type", draw(st.sampled_from(
            ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
             "application/json; charset=latin-1", "application/json; charset=utf-16", "garbage", ""]))))
    if draw(st.integers(0, 5)) == 0:
        headers.append(("Content-Encoding", draw(st.sampled_from(["gzip", "deflate", "br", "identity", "zz"]))))
    if draw(st.integers(0, 9)) == 0:
        headers.append(("Expect", draw(st.sampled_from(["100-continue", "100-Continue", "bogus", ""]))))
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20))
        value = draw(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80))
        headers.append((name, value.strip()))
    body = draw(bodies())
    if template in VALID_BODY and draw(st.booleans()):
        body = draw(route_bodies(template))
    chunked = body is not None and draw(st.integers(0, 4)) == 0
    # Whatever the mutation, the path may name a real route (e.g. /api/zones + "/" + a real id).
    real = {t.replace("{zone}", ids["zone"]).replace("{entity}", ids["entity"]): t for _, t, _ in ROUTES}
    route_template = real.get(path.split("?", 1)[0])
    route = (method, route_template) if route_template and (method, route_template) in {r[:2] for r in ROUTES} else None
    return {"method": method, "path": path, "headers": headers, "body": body, "chunked": chunked,
            "route": route, "token": token}


def _fuzz_server(tmp_path_factory, backend: str):
    if backend == "postgres":
        require_pg()
        schema = "f_" + uuid.uuid4().hex[:16]
        pg_exec(f"CREATE SCHEMA {schema}")
        dsn = dsn_with_schema(schema)
        settings_ = {"server_debug": "true", "server_debug_players": "admin", "tick_interval": 0.1}
    else:
        schema = None
        dsn = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'db'}"
        settings_ = {"server_debug": "false", "tick_interval": 0.1}
    # The fuzzer fails logins of the players it then needs to log in again (after it logged
    # them out): the failed-login limit has its own tests (tests/test_faults_access.py).
    settings_["auth_max_failed_logins"] = 1_000_000
    srv = ServerProcess(tmp_path_factory.mktemp("fuzzlog"), dsn, COUNTER, settings_, {"entities": 5})
    return srv, schema


def _wait_ready_sync(srv: ServerProcess) -> None:
    deadline = time.monotonic() + scaled(30)
    while time.monotonic() < deadline:
        assert srv.proc.poll() is None, srv.log_text()[-3000:]
        try:
            if raw_http(srv.port, _http_request("GET", "/healthz", [], None), timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("fuzz server did not start")


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_rest_fuzzing_answers_json_4xx_never_500(backend, tmp_path_factory):
    """Random methods, paths (real routes with mutated segments, random paths, malformed and
    huge ids, unicode), headers (garbage Authorization, content types and encodings) and
    bodies (random bytes and JSON, deep, huge, chunked, escapes no database can store) over
    raw HTTP: every answer is the JSON error envelope with a 4xx status, or a success only
    where the route and method are real; never a 5xx, never a hang; normal players are
    served afterwards."""
    srv, schema = _fuzz_server(tmp_path_factory, backend)
    srv_tmp = tmp_path_factory.mktemp("fuzzlog2")
    tried = {"n": 0, "statuses": {}}
    try:
        _wait_ready_sync(srv)
        port = srv.port
        for name in ("admin", "player1"):
            status, _ = _sync_call(port, "POST", "/api/auth/register", body={"username": name, "password": "12345678"})
            assert status == 201
        tokens = {}
        for key, name in (("admin", "admin"), ("player", "player1")):
            status, body = _sync_call(port, "POST", "/api/auth/login", body={"username": name, "password": "12345678"})
            tokens[key] = body["token"]
        status, body = _sync_call(port, "GET", "/api/zones", tokens["player"])
        zone = counter = {z["name"]: z["id"] for z in body["zones"]}["counter-0"]
        entity = str(uuid.uuid4())
        if backend == "postgres":  # a zone of its own, which the fuzzer may well delete
            status, body = _sync_call(port, "POST", "/api/zones", tokens["admin"],
                                      {"name": "fuzz-target", "width": 4, "height": 4})
            assert status == 201, body
            zone = body["id"]
            deadline = time.monotonic() + scaled(10)
            while True:  # the zone's first tick creates its entities
                status, body = _sync_call(port, "GET", f"/api/debug/zones/{counter}/state", tokens["admin"])
                assert status == 200, body
                if body["entities"] or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            entity = body["entities"][0]["id"]
        ids = {"zone": zone, "entity": entity}

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), database=None)
        @given(req=requests(ids))
        def one(req):
            headers = [(k, v.replace("{player}", tokens["player"]).replace("{admin}", tokens["admin"]))
                       for k, v in req["headers"]]
            raw = _http_request(req["method"], req["path"], headers, req["body"], req["chunked"])
            answer = raw_http(port, raw, timeout=15)  # TimeoutError: a hang
            tried["n"] += 1
            tried["statuses"][answer.status] = tried["statuses"].get(answer.status, 0) + 1
            assert answer.status is not None, f"closed without an answer: {raw[:300]!r}"
            assert answer.status < 500, (answer, raw[:500])
            if req["method"] == "HEAD":
                return
            if answer.status >= 400:
                assert answer.headers.get("content-type", "").startswith("application/json"), (answer, raw[:300])
                body = answer.json()
                assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], answer
                assert isinstance(body.get("message"), str) and body["message"], answer
                return
            route = req["route"]
            assert route is not None and route[0] == req["method"], f"success on a route that is not: {answer} {raw[:300]!r}"
            if route == ("POST", "/api/auth/logout"):  # the player's token ended: log in again
                key = "admin" if req["token"] == "admin" else "player"
                _, again = _sync_call(port, "POST", "/api/auth/login",
                                      body={"username": "admin" if key == "admin" else "player1", "password": "12345678"})
                tokens[key] = again["token"]
            if answer.status != 204 and route[1] not in ("/metrics", "/"):
                assert isinstance(answer.json(), dict), answer

        one()

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=field_cases())
        def field(case):
            path, name, body = case
            token = tokens["admin"] if path == "/api/zones" else None
            headers = [("Content-Type", "application/json")] + ([("Authorization", f"Bearer {token}")] if token else [])
            answer = raw_http(port, _http_request("POST", path, headers, body), timeout=15)
            tried["n"] += 1
            tried["statuses"][answer.status] = tried["statuses"].get(answer.status, 0) + 1
            assert answer.status is not None and answer.status < 500, (name, answer, body[:300])
            assert isinstance(answer.json(), dict), answer
            if answer.status >= 400:
                assert answer.json()["error"] and answer.json()["message"], answer

        field()
        # Still serving normal players, and no request ever reached the 500 handler.
        status, _ = _sync_call(port, "POST", "/api/debug/tick/resume", tokens["admin"])
        asyncio.run(_normal_player_session(srv))
        assert "unhandled error" not in srv.log_text(), srv.log_text()[-3000:]
        # And whatever the fuzzer managed to store, the server starts again on it.
        srv.send(signal.SIGTERM)
        assert srv.proc.wait(scaled(30)) == 0
        srv = ServerProcess(srv_tmp, srv.env["GRIDSERVER_DATABASE_DSN"], COUNTER,
                            {k[len("GRIDSERVER_"):]: v for k, v in srv.env.items()
                             if k.startswith("GRIDSERVER_") and k != "GRIDSERVER_GAME_MODULE"}, port=srv.port)
        _wait_ready_sync(srv)
        asyncio.run(_normal_player_session(srv))
    finally:
        srv.stop()
        if schema:
            pg_exec(f"DROP SCHEMA {schema} CASCADE")
    add_figure("REST fuzzing: requests tried", tried["n"])
    figure(f"REST fuzzing ({backend}): answers by status", dict(sorted(tried["statuses"].items(), key=str)))


async def _normal_player_session(srv: ServerProcess) -> None:
    """A player who is not the fuzzer: another client address (the fuzzer's failed logins may
    have locked 127.0.0.1 out for a minute, as they should)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as http:
        c = Client(srv.url, http)
        p = await c.player()
        zones = await c.zones(p["token"])
        async with http.ws_connect(c.ws_url(p["token"])) as ws:
            await ws.send_json({"type": "subscribe", "zone_id": zones["counter-0"]["id"]})
            seen = set()
            while len(seen) < 3:
                m = await ws.receive_json(timeout=scaled(10))
                if m["type"] == "tick":
                    seen.add(m["tick_number"])


_POST = b"POST /api/auth/register HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"

#: HTTP that is broken below the routes (request line, headers, framing, encodings).
MALFORMED = {
    "bad method": b"G@T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "TLS on the HTTP port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 50,
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "request line of 10000 bytes": b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "200 headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
    "header of 10000 bytes": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 10000 + b"\r\n\r\n",
    "NUL in a header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "header without colon": b"GET /healthz HTTP/1.1\r\nHost: x\r\nbogus\r\n\r\n",
    "Content-Length and chunked": _POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "negative Content-Length": _POST + b"Content-Length: -5\r\n\r\nhello",
    "Content-Length abc": _POST + b"Content-Length: abc\r\n\r\nhello",
    "two Content-Lengths": _POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "bad chunk size": _POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "unknown content encoding": _POST + b"Content-Encoding: br\r\nContent-Length: 2\r\n\r\n{}",
    "gzip body that is not gzip": _POST + b"Content-Encoding: gzip\r\nContent-Length: 10\r\n\r\n0123456789",
    "deflate body that is not deflate": _POST + b"Content-Encoding: deflate\r\nContent-Length: 10\r\n\r\n0123456789",
    "Content-Length longer than the body": _POST + b"Content-Length: 100\r\n\r\n{\"username\"",
    "chunked body cut short": _POST + b"Transfer-Encoding: chunked\r\n\r\n10\r\nabc",
    "unknown expectation": _POST + b"Expect: bogus\r\nContent-Length: 2\r\n\r\n{}",
    "unknown expectation, unknown path": b"PUT /nowhere HTTP/1.1\r\nHost: x\r\nExpect: bogus\r\n"
                                         b"Content-Length: 2\r\n\r\n{}",
    "chunked gzip cut short": _POST + b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n",
}


def test_malformed_http_is_answered_with_the_json_envelope(tmp_path):
    """HTTP broken below the routes gets a 4xx JSON envelope too (not aiohttp's plain text),
    and the connection is closed; the server serves normal requests afterwards."""
    srv = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'db'}", COUNTER,
                        {"tick_interval": 0.1, "server_client_timeout": 1}, {"entities": 2})
    try:
        _wait_ready_sync(srv)
        for name, raw in MALFORMED.items():  # the client waits with its connection open
            answer = raw_http(srv.port, raw, timeout=15)
            assert answer.status is not None and 400 <= answer.status < 500, (name, answer)
            assert answer.headers.get("content-type", "").startswith("application/json"), (name, answer)
            body = answer.json()
            assert isinstance(body["error"], str) and isinstance(body["message"], str) and body["message"], (name, body)
        assert raw_http(srv.port, _http_request("GET", "/healthz", [], None)).status == 200
        assert "unhandled error" not in srv.log_text()
    finally:
        srv.stop()
    add_figure("malformed HTTP requests answered", len(MALFORMED))


# ---------------------------------------------------------------------------------------------
# Strings a database cannot store (found by the fuzzer)
# ---------------------------------------------------------------------------------------------


async def test_zone_strings_no_database_can_store_are_400(dsn, start_server):
    """NUL characters and unpaired surrogates (valid JSON escapes) in a zone's name or metadata
    are refused with 400 naming the field: PostgreSQL cannot store them (it answered 500)."""
    running = await start_server(make_config(dsn, server_debug=True), Passive())
    p = await running.player()
    bad = [("name", {"name": "a\x00b"}), ("name", {"name": "\ud800"}),
           ("metadata", {"metadata": {"k": "a\x00"}}), ("metadata", {"metadata": {"\x00": 1}}),
           ("metadata", {"metadata": {"k": ["x", {"y": "\udfff"}]}}), ("metadata", {"metadata": {"\ud83d": 1}})]
    for field, change in bad:
        body = {"name": "z-" + uuid.uuid4().hex[:6], "width": 4, "height": 4, **change}
        status, answer = await running.call("POST", "/api/zones", p["token"], json=body)
        assert status == 400 and answer["error"] == "bad_request" and field in answer["message"], (change, answer)
    status, zones = await running.call("GET", "/api/zones", p["token"])
    assert status == 200 and zones["zones"] == []
    ok = await running.zone(p["token"], name="fine \\u0000 🐉", metadata={"k": "\\u0000 is text here"})
    assert ok["metadata"] == {"k": "\\u0000 is text here"}


async def test_metadata_too_deep_to_load_back_is_400_and_the_world_restarts(dsn, start_server):
    """Zone metadata nested past the limit is refused: stored, it stopped the server from ever
    loading its world again (the PostgreSQL driver's JSON reader recursed)."""
    running = await start_server(make_config(dsn, server_debug=True), Passive())
    p = await running.player()
    for depth in (101, 1000):  # written by hand: the client's own JSON encoder recurses too
        text = '{"name": "deep%d", "width": 2, "height": 2, "metadata": %s{}%s}' % (
            depth, '{"d": ' * (depth - 1), "}" * (depth - 1))
        status, answer = await running.call("POST", "/api/zones", p["token"], data=text,
                                            headers={"Content-Type": "application/json"})
        assert status == 400 and "metadata" in answer["message"] and "100" in answer["message"], answer
    ok = await running.zone(p["token"], name="deep100", metadata=nested_dict(100))
    await stop_server(running)
    again = await start_server(make_config(dsn, server_debug=True), Passive())
    status, zones = await again.call("GET", "/api/zones", p["token"])
    assert status == 200 and [z["id"] for z in zones["zones"]] == [ok["id"]]


# ---------------------------------------------------------------------------------------------
# Module faults
# ---------------------------------------------------------------------------------------------

from fault_games import Faulty, nested_dict  # noqa: E402

MODULE_FAULTS = ["raise", "hang", "oob", *Faulty.GARBAGE]


class ZoneWatch:
    """One player subscribed to one zone, recording (tick_number, state) of every tick frame."""

    def __init__(self, http, client: Client, token: str, zone_id: str):
        self.http, self.client, self.token, self.zone_id = http, client, token, zone_id
        self.ticks: list[tuple[int, dict]] = []
        self.errors: list[dict] = []

    async def start(self) -> "ZoneWatch":
        self.ws = await self.http.ws_connect(self.client.ws_url(self.token))
        await self.ws.send_json({"type": "subscribe", "zone_id": self.zone_id})
        self.task = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg.type != WSMsgType.TEXT:
                return
            m = json.loads(msg.data)
            if m["type"] == "tick":
                self.ticks.append((m["tick_number"], m["state"]))
            elif m["type"] == "error":
                self.errors.append(m)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.ws.close()


async def test_module_faults_stay_in_their_zone_and_the_zone_recovers(pg_schema, tmp_path, http, processes):
    """A zone whose module raises every tick, hangs, moves an entity out of bounds or returns
    each kind of garbage (including metadata no database can store): the server stays up, the
    other zone ticks every tick, the error shows in the zone's debug state and /metrics,
    persistence keeps working, and when the module behaves the zone ticks again; the server
    then restarts on what was saved."""
    dsn = dsn_with_schema(pg_schema)
    interval = 0.05
    settings = {"tick_interval": interval, "persistence_interval": 0.2}
    srv = start(processes, tmp_path, dsn, FAULTY, settings)
    await srv.ready(http)
    c = Client(srv.url, http)
    admin, p1, p2 = await c.player(), await c.player(), await c.player()
    zones = await c.zones(admin["token"])
    control = await ZoneWatch(http, c, admin["token"], zones["control"]["id"]).start()
    healthy = await ZoneWatch(http, c, p1["token"], zones["healthy"]["id"]).start()
    victim = await ZoneWatch(http, c, p2["token"], zones["victim"]["id"]).start()

    async def victim_state() -> dict:
        status, body = await c.call("GET", f"/api/debug/zones/{zones['victim']['id']}/state", admin["token"])
        assert status == 200, body
        return body

    async def set_mode(mode: str) -> None:
        await control.ws.send_json({"type": "intent", "data": {"zone": "victim", "mode": mode}})

    seen = []
    try:
        await wait_for(lambda: len(victim.ticks) >= 3 and len(healthy.ticks) >= 3, timeout=20, what="ticks")
        async with TickWatch(c, interval) as watch:
            for mode in MODULE_FAULTS:
                before = await victim_state()
                errors_before = (await c.metrics())["gridserver_zone_errors_total"]
                await set_mode(mode)
                if mode == "hang":
                    async def stalled():
                        s = await victim_state()
                        return s["stalled_seconds"] > 0 and s["skipped_ticks"] >= before["skipped_ticks"] + 3 and s
                    state = await wait_for(stalled, timeout=10, what="the hang to show")
                    assert (await c.metrics())["gridserver_zones_stalled"] == 1
                elif mode.startswith("player_state"):  # the tick is applied; its frames cannot be built
                    async def failing():
                        s = await victim_state()
                        return s["errors"] >= before["errors"] + 2 and s
                    state = await wait_for(failing, timeout=10, what=f"{mode} errors")
                    assert "get_player_state" in state["last_error"]["message"], state["last_error"]
                else:
                    async def failing():
                        s = await victim_state()
                        return s["errors"] >= before["errors"] + 2 and s
                    state = await wait_for(failing, timeout=10, what=f"{mode} errors")
                    assert state["last_error"]["kind"] == ("exception" if mode == "raise" else "invalid_result"), \
                        (mode, state["last_error"])
                    assert (await c.metrics())["gridserver_zone_errors_total"] >= errors_before + 2
                    before = state  # while the fault lasts, nothing of the zone's results is applied

                    async def failing():
                        s = await victim_state()
                        return s["errors"] >= before["errors"] + 2 and s
                    state = await wait_for(failing, timeout=10, what=f"{mode} errors")
                    assert state["entities"] == before["entities"], (mode, state["entities"])
                if mode != "hang":
                    assert state["last_error"]["message"], state
                seen.append((mode, state["last_error"]["message"][:80] if state["last_error"] else "stalled"))
                last = victim.ticks[-1][0] if victim.ticks else 0
                await set_mode("ok")
                await wait_for(lambda: sum(1 for n, _ in victim.ticks if n > last) >= 3, timeout=10,
                                 what=f"the zone to recover from {mode}")
        watch.assert_kept_time("the module faults")
        # The healthy zone's player got every tick, in order, while all that went on.
        numbers = [n for n, _ in healthy.ticks]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "the healthy zone missed ticks"
        steps = [s["step"] for _, s in healthy.ticks]
        assert steps == list(range(steps[0], steps[0] + len(steps)))
        # Persistence kept working through it all: the latest steps reach the database.
        want = {"healthy": healthy.ticks[-1][1]["step"], "victim": victim.ticks[-1][1]["step"]}
        flushed = (await c.metrics())["gridserver_flushes_total"]
        await wait_for(lambda: _flushes_at_least(c, flushed + 2), timeout=10, what="flushes after the faults")
        rows = {name: r[0]["meta"]["step"] for name, r in counter_rows(dsn).items()}
        assert rows["healthy"] >= want["healthy"] and rows["victim"] >= want["victim"], (rows, want)
        assert "unhandled error" not in srv.log_text()
    finally:
        for w in (control, healthy, victim):
            await w.stop()
    srv.send(signal.SIGTERM)
    assert await srv.wait_exit() == 0
    srv = start(processes, tmp_path, dsn, FAULTY, settings)  # and it starts again on what was saved
    await srv.ready(http)
    c = Client(srv.url, http)
    status, body = await c.call("GET", f"/api/debug/zones/{zones['victim']['id']}/state", admin["token"])
    assert status == 200 and body["entities"][0]["metadata"]["step"] >= want["victim"], body
    figure("module faults: kinds of fault injected", len(MODULE_FAULTS))
    print("\n".join(f"  {mode}: {message}" for mode, message in seen))


async def test_database_refusing_writes_keeps_changes_and_recovers(pg_schema, tmp_path, http, processes):
    """PostgreSQL stays reachable but refuses entity writes with an error (as a read-only
    failover, a revoked privilege or a trigger would): flushes keep being retried, /healthz
    says degraded, ticks go on; once writes are accepted again every change is saved."""
    dsn = dsn_with_schema(pg_schema)
    trace = tmp_path / "trace"
    srv = start(processes, tmp_path, dsn, COUNTER, {"tick_interval": 0.05, "persistence_interval": 0.2,
                                                     "persistence_max_backoff": 0.5},
                {"zones": 1, "entities": 100, "trace": trace})
    await srv.ready(http)
    c = Client(srv.url, http)
    p = await c.player()
    zones = await c.zones(p["token"])
    play = Play(c, http)
    await play.join(p["token"], zones["counter-0"]["id"])
    s = pg_schema
    try:
        await wait_for(lambda: len(play.frames.get("counter-0", [])) >= 5, timeout=20, what="ticks")
        pg_exec(f"CREATE TABLE {s}.fault_switch (refuse boolean); INSERT INTO {s}.fault_switch VALUES (true); "
                f"CREATE FUNCTION {s}.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF (SELECT refuse FROM {s}.fault_switch) THEN RAISE EXCEPTION 'entity writes refused'; END IF; "
                f"RETURN NEW; END $$; "
                f"CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {s}.entities FOR EACH ROW EXECUTE FUNCTION {s}.refuse()")
        refused_from = play.last_step("counter-0")
        await wait_for(lambda: _metric_at_least(c, "gridserver_flush_failures_total", 3), timeout=20,
                         what="flushes retried while writes are refused")
        status, body = await c.call("GET", "/healthz")
        assert status == 503 and body["status"] == "degraded", body
        refused_to = play.last_step("counter-0")
        assert refused_to > refused_from + 5  # the game went on
        pg_exec(f"UPDATE {s}.fault_switch SET refuse = false")
        await wait_for(lambda: _healthz_ok(c), timeout=20, what="/healthz ok again")
        flushed = (await c.metrics())["gridserver_flushes_total"]
        await wait_for(lambda: _flushes_at_least(c, flushed + 2), timeout=20, what="flushes")
    finally:
        await play.stop()
    saved = counter_rows(dsn)["counter-0"]
    step, _ = check_zone_state("counter-0", saved, read_trace(trace))
    assert step >= refused_to
    assert play.seen_spawns("counter-0", refused_to) <= {r["meta"]["k"] for r in saved if "k" in r["meta"]}
    log_text = srv.log_text()
    assert log_text.count("entity writes refused") >= 1 and log_text.count("database back") == 1, log_text[-2000:]


async def _metric_at_least(c: Client, name: str, n: float) -> bool:
    return (await c.metrics())[name] >= n


async def _healthz_ok(c: Client) -> bool:
    status, body = await c.call("GET", "/healthz")
    return status == 200 and body["status"] == "ok"


# ---------------------------------------------------------------------------------------------
# Bad input on the WebSocket
# ---------------------------------------------------------------------------------------------


async def test_oversized_frame_gets_its_close_frame_even_while_the_client_sends(tmp_path, http, processes):
    """A frame over 16x max_message_size is answered with a close frame 1009 that reaches the
    client although it is still sending the frame (no reset that would destroy it)."""
    srv = start(processes, tmp_path, f"sqlite:///{tmp_path / 'db'}", "game_modules.echo", {"tick_interval": 0.05})
    await srv.ready(http)
    c = Client(srv.url, http)
    p = await c.player()
    for size in (16 * 65536 + 10, 2_000_000, 5_000_000):
        ws = await RawWS.connect(srv.port, p["token"])
        try:
            ws.send_raw(client_frame(b"x" * size))
            await ws.writer.drain()
        except ConnectionError:
            pass
        assert await ws.closed_with(timeout=10) == 1009, size
        ws.abort()


#: (what is sent, the error code it must get). The connection stays open for the next one.
WS_BAD_MESSAGES = [
    ("binary frame", (b'{"type": "ping"}', OP_BINARY), "bad_message"),
    ("not JSON", "hello there", "bad_message"),
    ("invalid JSON", '{"type": "ping"', "bad_message"),
    ("JSON array", "[1, 2, 3]", "bad_message"),
    ("JSON string", '"ping"', "bad_message"),
    ("JSON null", "null", "bad_message"),
    ("nested 20000 deep", "[" * 20000 + "]" * 20000, "bad_message"),
    ("object nested 2000 deep", '{"type": "intent", "data": ' + '{"a": ' * 2000 + "1" + "}" * 2001, "bad_message"),
    ("no type", '{"zone_id": "x"}', "bad_message"),
    ("type is a number", '{"type": 7}', "bad_message"),
    ("type is an object", '{"type": {"a": 1}}', "bad_message"),
    ("unknown type", '{"type": "dance"}', "unknown_type"),
    ("unknown type, long", '{"type": "%s"}' % ("d" * 5000), "unknown_type"),
    ("intent before subscribing", '{"type": "intent", "data": {"move": "up"}}', "not_subscribed"),
    ("intent without data", '{"type": "intent"}', "bad_message"),
    ("intent data not an object", '{"type": "intent", "data": [1]}', "bad_message"),
    ("subscribe without zone", '{"type": "subscribe"}', "bad_message"),
    ("subscribe zone is a number", '{"type": "subscribe", "zone_id": 5}', "bad_message"),
    ("subscribe to no zone", '{"type": "subscribe", "zone_id": "%s"}' % uuid.uuid4(), "zone_not_found"),
    ("subscribe to a malformed id", '{"type": "subscribe", "zone_id": "\' OR 1=1 --"}', "zone_not_found"),
    ("too large", '{"type": "ping", "pad": "%s"}' % ("x" * 70000), "message_too_large"),
    ("too large in UTF-8", '{"type": "ping", "pad": "%s"}' % ("é" * 40000), "message_too_large"),
    ("unpaired surrogate escape", '{"type": "intent", "data": {"s": "\\ud800"}}', "bad_message"),
    ("unpaired surrogate in a key", '{"type": "intent", "data": {"\\udfff": 1}}', "bad_message"),
]


async def test_websocket_bad_input_gets_errors_others_play_on(tmp_path, http, processes):
    """Every kind of bad message on one connection gets the documented error (and the same
    connection keeps working, subscribed or not); abuse that the README says closes the
    socket closes it with the documented code; meanwhile another player in the zone gets
    every tick and the tick keeps time."""
    interval = 0.05
    srv = start(processes, tmp_path, f"sqlite:///{tmp_path / 'db'}", "game_modules.echo",
                {"tick_interval": interval, "tick_max_intents_per_player": 5})
    await srv.ready(http)
    c = Client(srv.url, http)
    admin, victim_p, attacker = await c.player(), await c.player(), await c.player()
    status, zone = await c.call("POST", "/api/zones", admin["token"], {"name": "arena", "width": 8, "height": 8})
    assert status == 201
    victim = await TickReader(http, c, victim_p["token"], zone["id"]).start()
    sent = 0
    try:
        async with TickWatch(c, interval) as watch:
            ws = await RawWS.connect(srv.port, attacker["token"])
            for subscribed in (False, True):
                for name, payload, code in WS_BAD_MESSAGES:
                    if subscribed and code == "not_subscribed":
                        continue
                    data, opcode = payload if isinstance(payload, tuple) else (payload, OP_TEXT)
                    await ws.send(data, opcode)
                    sent += 1
                    answer = await ws.until(lambda m: m["type"] != "tick")
                    assert answer["type"] == "error" and answer["code"] == code, (name, answer)
                    assert answer["message"], answer
                    assert await ws.pong_after() == [], name  # still open, nothing else owed
                if not subscribed:
                    await ws.send_json({"type": "subscribe", "zone_id": zone["id"]})
                    assert (await ws.until(lambda m: m["type"] != "tick"))["type"] == "subscribed"
            # A fragmented message is one message.
            ws.send_raw(client_frame(b'{"type": ', OP_TEXT, fin=False) + client_frame(b'"ping"}', 0x0, fin=True))
            assert await ws.until(lambda m: m["type"] != "tick") == {"type": "pong"}
            # A flood of intents: at most the per-tick limit is taken, one error per tick.
            before = await c.metrics()
            ws.send_raw(b"".join(client_frame(json.dumps({"type": "intent", "data": {"i": i}}).encode())
                                 for i in range(3000)))
            sent += 3000
            seen = await ws.pong_after(timeout=30)
            assert seen and {m["code"] for m in seen} == {"rate_limited"}, seen[:3]
            after = await c.metrics()
            dropped = after["gridserver_intents_dropped_total"] - before["gridserver_intents_dropped_total"]
            accepted = after["gridserver_intents_accepted_total"] - before["gridserver_intents_accepted_total"]
            assert dropped + accepted == 3000 and accepted <= 5 * (len(seen) + 2), (dropped, accepted, len(seen))
            # Abuse that closes the socket, each on a connection of its own.
            closing = [
                ("text that is not UTF-8", client_frame(b'{"type": "\xff\xfe"}'), {1007}),
                ("a frame over 16x max_message_size", client_frame(b"x" * (16 * 65536 + 10)), {1009}),
                ("a reserved opcode", client_frame(b"{}", 0x3), {1002}),
                ("a ping longer than 125 bytes", client_frame(b"p" * 200, 0x9), {1002}),
                ("continuation without a start", client_frame(b"{}", 0x0), {1002}),
            ]
            for name, frame, codes in closing:
                raw = await RawWS.connect(srv.port, attacker["token"])
                try:
                    raw.send_raw(frame)
                    await raw.writer.drain()
                except ConnectionError:
                    pass
                code = await raw.closed_with(timeout=10)
                assert code in codes, f"{name}: closed with {code}, expected one of {codes}"
                raw.abort()
                sent += 1
        watch.assert_kept_time("the bad input")
        victim.assert_unaffected()
        # The attacker's player can still play normally.
        good = await RawWS.connect(srv.port, attacker["token"])
        await good.send_json({"type": "subscribe", "zone_id": zone["id"]})
        # (after a tick: the flood used up this player's intents for the tick under way, and
        # reconnecting does not reset the count)
        await good.until(lambda m: m["type"] == "tick", timeout=10)
        await good.send_json({"type": "intent", "data": {"fine": True}})
        await good.until(lambda m: m["type"] == "tick" and {"fine": True} in [i["data"] for i in m["state"]["intents"]],
                         timeout=10)
        good.abort()
    finally:
        await victim.stop()
    add_figure("WebSocket bad messages sent", sent)


# ---------------------------------------------------------------------------------------------
# Abuse of connections
# ---------------------------------------------------------------------------------------------


async def test_connection_abuse_leaves_nothing_behind(tmp_path, processes):
    """Hundreds of connections dropped without a close (reset or FIN), clients that never read,
    TCP and WebSocket clients that connect and never send, and a reconnect storm of one
    player: another player gets every tick, the tick keeps time, and afterwards the
    connection count, the process's sockets, the zone's members and its memory are back to
    normal."""
    # Idle HTTP connections are closed after 2 s here: this client never reuses one.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        await _connection_abuse(tmp_path, processes, http)


async def _connection_abuse(tmp_path, processes, http) -> None:
    interval = 0.05
    srv = start(processes, tmp_path, f"sqlite:///{tmp_path / 'db'}", COUNTER,
                {"tick_interval": interval, "websocket_heartbeat": 2, "websocket_max_behind": 3,
                 "websocket_reconnect_grace": 1, "server_client_timeout": 2,
                 # every abuser comes from 127.0.0.1 here: this test is about what the server
                 # cleans up, not about the per-address limits (tests/test_faults_access.py)
                 "server_max_connections_per_address": 100000, "auth_max_pending_hashes": 1024},
                {"zones": 1, "entities": 20, "pad": 20000})
    await srv.ready(http)
    c = Client(srv.url, http)
    admin = await c.player()
    players = await asyncio.gather(*(c.player() for _ in range(60)))
    zone = (await c.zones(admin["token"]))["counter-0"]["id"]
    victim = await TickReader(http, c, admin["token"], zone).start()

    async def connections() -> int:
        return int((await c.metrics())["gridserver_connections"])

    async def members() -> list:
        status, body = await c.call("GET", f"/api/debug/zones/{zone}/state", admin["token"])
        return body["members"]

    await wait_for(lambda: _equals(connections(), 1), timeout=10, what="one connection")
    sockets0, rss = srv.tcp_sockets(), [srv.rss()]
    abused = 0
    try:
        async with TickWatch(c, interval) as watch:
            for wave in range(2 * SOAK_ROUNDS):  # the same abuse again: it must not need more memory
                abused += await _abuse_wave(srv, players, zone)
                # Everything abusive is dropped by the server itself.
                await wait_for(lambda: _equals(connections(), 1), timeout=30, what="connections back to one")
                await wait_for(lambda: srv.tcp_sockets() <= sockets0 + 2, timeout=30,
                                 what=f"sockets back to {sockets0} (silent TCP clients dropped)")
                await wait_for(lambda: _equals(members(), [admin["id"]]), timeout=10,
                                 what="the zone's members back to one")
                rss.append(srv.rss())
        watch.assert_kept_time("the abuse")
        victim.assert_unaffected()
        m = await c.metrics()
        assert m["gridserver_slow_clients_disconnected_total"] >= 30, m["gridserver_slow_clients_disconnected_total"]
        status, body = await c.call("GET", "/api/debug/connections", admin["token"])
        assert [x["player_id"] for x in body["connections"]] == [admin["id"]]
        growth = [(b - a) / 2 ** 20 for a, b in zip(rss, rss[1:])]
        assert all(g < 50 for g in growth), f"resident memory grew by {growth} MiB"
    finally:
        await victim.stop()
    add_figure("connections abused", abused)
    figure("abuse: resident memory change per wave in MiB", [round(g, 1) for g in growth])


async def _abuse_wave(srv: ServerProcess, players: list[dict], zone: str) -> int:
    abused = 0
    # 1. Connections that subscribe and vanish without a close frame, three rounds.
    for rnd in range(3):
        conns = await asyncio.gather(*(RawWS.connect(srv.port, p["token"]) for p in players))
        for ws in conns:
            await ws.send_json({"type": "subscribe", "zone_id": zone})
        # each is subscribed and being sent ticks when it vanishes
        await asyncio.gather(*(ws.until(lambda m: m["type"] == "tick") for ws in conns))
        for i, ws in enumerate(conns):
            ws.abort() if (i + rnd) % 2 else ws.drop()
        abused += len(conns)
    # 2. Clients that subscribe and never read (4 KiB receive buffers, 20 KB ticks).
    readers = await asyncio.gather(*(RawWS.connect(srv.port, p["token"], rcvbuf=4096) for p in players[:20]))
    for ws in readers:
        ws.stop_reading()
        await ws.send_json({"type": "subscribe", "zone_id": zone})
    # 3. Clients that connect and never send: plain TCP, and WebSockets that never pong.
    silent_tcp = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(100)]
    silent_ws = await asyncio.gather(*(RawWS.connect(srv.port, p["token"]) for p in players[20:50]))
    for ws in silent_ws:
        ws.stop_reading()
    abused += len(readers) + len(silent_tcp) + len(silent_ws)
    # 4. A reconnect storm of one player: 200 connections in a row, half of them dropped.
    last = None
    for i in range(200):
        ws = await RawWS.connect(srv.port, players[59]["token"])
        if i == 0:
            await ws.send_json({"type": "subscribe", "zone_id": zone})
        if last is not None and i % 2:
            last.abort()
        last = ws
    abused += 200
    # The survivor of the storm holds the zone (resumed) and plays.
    m = await last.until(lambda m: m["type"] == "subscribed", timeout=10)
    assert m == {"type": "subscribed", "zone_id": zone, "resumed": True}, m
    await last.until(lambda m: m["type"] == "tick", timeout=10)
    last.abort()
    for r, w in silent_tcp:  # the server closes them: each reads the end of the stream
        assert await asyncio.wait_for(r.read(), scaled(10)) == b""
        w.close()
    for ws in readers + silent_ws:
        ws.abort()
    return abused


async def _equals(value, want) -> bool:
    return (await value) == want



# ---------------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------------

INJECTIONS = ["' OR '1'='1", "'; DROP TABLE players; --", "admin'--", "\" OR \"\"=\"", "1; DELETE FROM sessions",
              "x' UNION SELECT token_digest, player_id, created_at, expires_at FROM sessions --",
              "$$; DROP TABLE zones; $$", "\\'; TRUNCATE entities; --"]


async def _ws_refused(c: Client, port: int, token: str) -> bool:
    ws, status = await RawWS.handshake(port, token)
    if ws is not None:
        ws.abort()
        return False
    return " 401 " in status + " "


async def test_auth_tokens_sessions_and_injection(pg_schema, tmp_path, http, processes):
    """Tokens are stored only as digests; a logged-out or expired token is refused on REST and
    WebSocket and its open socket is closed (4001); login answers are the same whether or
    not the user exists; bcrypt (cost 10) runs off the event loop; debug routes are 403 for
    players not listed (404 with debug off); SQL injection in every string field changes
    nothing."""
    dsn = dsn_with_schema(pg_schema)
    interval = 0.05
    srv = start(processes, tmp_path, dsn, COUNTER,
                {"tick_interval": interval, "auth_bcrypt_rounds": 10, "auth_session_ttl": 4,
                 "server_debug_players": "admin",
                 # dozens of deliberate failed logins below, all from 127.0.0.1: the failed-login
                 # limit has its own test (tests/test_faults_access.py)
                 "auth_max_failed_logins": 1000}, {"zones": 1, "entities": 5})
    await srv.ready(http)
    c = Client(srv.url, http)
    admin = await c.player("admin")
    alice = await c.player("alice")
    zone = (await c.zones(admin["token"]))["counter-0"]["id"]

    # Tokens: only a SHA-256 digest is stored, nowhere the token itself.
    tokens = [admin["token"], alice["token"]]
    for token in tokens:
        digest = hashlib.sha256(token.encode()).hexdigest()
        assert pg_exec(f"SELECT count(*) FROM sessions WHERE token_digest = '{digest}'", dsn)[0][0] == 1
        for table in ("players", "sessions", "zones", "entities"):
            rows = pg_exec(f"SELECT t::text FROM {table} t", dsn)
            assert not any(token in r[0] for r in rows), table
    assert alice["password"] not in str(pg_exec("SELECT * FROM players", dsn))

    # Logout: that session's socket is closed with 4001, the token is refused everywhere;
    # the player's other session keeps working.
    first, second = await c.login("alice"), await c.login("alice")
    ws = await RawWS.connect(srv.port, first["token"])
    await ws.send_json({"type": "subscribe", "zone_id": zone})
    await ws.until(lambda m: m["type"] == "tick")
    status, _ = await c.call("POST", "/api/auth/logout", first["token"])
    assert status == 204
    assert await ws.closed_with(timeout=10) == 4001
    ws.abort()
    for method, path in (("GET", "/api/auth/me"), ("GET", "/api/zones"), ("POST", "/api/auth/logout")):
        status, body = await c.call(method, path, first["token"])
        assert status == 401 and body["error"] == "unauthorized", (path, body)
    assert await _ws_refused(c, srv.port, first["token"])
    assert (await c.call("GET", "/api/auth/me", second["token"]))[0] == 200

    # Expiry (session_ttl = 4 s): the open socket is closed with 4001, the token refused.
    expiring = await c.login("alice")
    ws = await RawWS.connect(srv.port, expiring["token"])
    await ws.send_json({"type": "subscribe", "zone_id": zone})
    assert await ws.closed_with(timeout=15) == 4001
    ws.abort()
    status, body = await c.call("GET", "/api/auth/me", expiring["token"])
    assert status == 401 and body["error"] == "unauthorized"
    assert await _ws_refused(c, srv.port, expiring["token"])

    # Login answers do not tell whether the username exists.
    answers = []
    for username, password in (("alice", "wrong password"), ("nobody_at_all", "wrong password"),
                               ("a", "wrong password"), ("alice", "x" * 100), ("nobody_at_all", "correct horse")):
        async with http.post(c.url + "/api/auth/login", json={"username": username, "password": password}) as r:
            headers = {k: v for k, v in r.headers.items() if k.lower() != "date"}
            answers.append((r.status, await r.read(), headers))
    assert all(a == answers[0] for a in answers), answers
    assert answers[0][0] == 401 and json.loads(answers[0][1])["error"] == "invalid_credentials"

    # bcrypt runs off the event loop: a burst of logins at cost 10, 16 in flight at a time (the
    # address's share of the bcrypt queue), does not stop the tick. The burst lasts until a
    # player has got 10 ticks, however fast the machine hashes.
    reader = await TickReader(http, c, (await c.login("admin"))["token"], zone).start()
    burst_over = asyncio.Event()
    results: list = []

    async def log_in_again_and_again() -> None:
        while not burst_over.is_set():
            results.append(await c.call("POST", "/api/auth/login", None,
                                        {"username": "alice", "password": "correct horse"}))

    try:
        async with TickWatch(c, interval) as watch:
            clients = [asyncio.ensure_future(log_in_again_and_again()) for _ in range(16)]
            try:
                await reader.new_ticks(10, timeout=20)
            finally:
                burst_over.set()
                await asyncio.gather(*clients)
    finally:
        await reader.stop()
    assert all(st == 200 for st, _ in results)
    assert watch.expected >= 4, f"the burst was too short to measure ({watch.t1 - watch.t0:.2f} s)"
    watch.assert_kept_time(f"a burst of {len(results)} logins at bcrypt cost 10")
    figure("auth: ticks during a burst of logins at bcrypt cost 10, 16 at a time (due)",
           f"{watch.ticks} ({watch.expected:.0f})")

    # Debug routes: 403 for a player not listed, 401 without a token, 200 for the listed one.
    alice = await c.login("alice")
    admin = await c.login("admin")
    debug_calls = [("POST", "/api/debug/tick/pause"), ("POST", "/api/debug/tick/resume"),
                   ("GET", f"/api/debug/zones/{zone}/state"), ("GET", "/api/debug/connections"),
                   ("GET", f"/api/debug/entities/{uuid.uuid4()}"), ("DELETE", f"/api/zones/{zone}")]
    for method, path in debug_calls:
        status, body = await c.call(method, path, alice["token"])
        assert status == 403 and body["error"] == "forbidden", (path, body)
        assert (await c.call(method, path))[0] == 401
    status, body = await c.call("POST", "/api/zones", alice["token"], {"name": "nope", "width": 2, "height": 2})
    assert status == 403
    assert (await c.call("GET", "/api/debug/connections", admin["token"]))[0] == 200

    # SQL injection in every string field changes nothing.
    counts = {t: pg_exec(f"SELECT count(*) FROM {t}", dsn)[0][0] for t in ("players", "zones", "entities")}
    made = []
    for i, text in enumerate(INJECTIONS):
        admin = await c.login("admin")  # sessions live 4 s here; a loaded machine takes longer than that
        for body in ({"username": text, "password": "correct horse"}, {"username": "alice", "password": text}):
            status, _ = await c.call("POST", "/api/auth/register", None, body)
            assert status in (400, 409)
            status, _ = await c.call("POST", "/api/auth/login", None, body)
            assert status in (400, 401)
        name, password = f"inj{i}", (text + "pad")[:72]
        status, body = await c.call("POST", "/api/auth/register", None, {"username": name, "password": password})
        assert status == 201, (text, body)
        assert (await c.call("POST", "/api/auth/login", None, {"username": name, "password": password}))[0] == 200
        assert (await c.call("POST", "/api/auth/login", None, {"username": name, "password": "' OR '1'='1"}))[0] == 401
        status, z = await c.call("POST", "/api/zones", admin["token"],
                                 {"name": text[:64], "width": 3, "height": 3, "metadata": {text: text}})
        assert status == 201 and z["name"] == text[:64] and z["metadata"] == {text: text}, z
        made.append(z["id"])
        for path in (f"/api/zones/{text}", f"/api/debug/entities/{text}", f"/api/debug/zones/{text}/state"):
            status, _ = await c.call("GET", path.replace(text, quote(text, safe="")), admin["token"])
            assert status == 404
        assert (await c.call("GET", "/api/auth/me", text))[0] == 401
        assert await _ws_refused(c, srv.port, quote(text, safe=""))
        ws = await RawWS.connect(srv.port, admin["token"])
        await ws.send_json({"type": "subscribe", "zone_id": text})
        assert (await ws.until(lambda m: m["type"] == "error"))["code"] == "zone_not_found"
        await ws.send_json({"type": "subscribe", "zone_id": zone})
        await ws.send_json({"type": "intent", "data": {text: text}})
        await ws.pong_after()
        ws.abort()
    after = {t: pg_exec(f"SELECT count(*) FROM {t}", dsn)[0][0] for t in ("players", "zones", "entities")}
    assert after == {"players": counts["players"] + len(INJECTIONS), "zones": counts["zones"] + len(INJECTIONS),
                     "entities": counts["entities"]}, (counts, after)
    names = {r[0] for r in pg_exec("SELECT name FROM zones", dsn)}
    assert {t[:64] for t in INJECTIONS} <= names
    add_figure("SQL injection strings tried in every string field", len(INJECTIONS))


async def test_debug_routes_do_not_exist_with_debug_off(tmp_path, http, processes):
    """With debug off every debug route, and zone creation and deletion, is 404 for anyone."""
    srv = start(processes, tmp_path, f"sqlite:///{tmp_path / 'db'}", COUNTER,
                {"tick_interval": 0.05, "server_debug": "false"}, {"zones": 1, "entities": 2})
    await srv.ready(http)
    c = Client(srv.url, http)
    p = await c.player()
    zone = (await c.zones(p["token"]))["counter-0"]["id"]
    calls = [("POST", "/api/debug/tick/pause"), ("POST", "/api/debug/tick/resume"), ("POST", "/api/debug/tick/step"),
             ("GET", f"/api/debug/zones/{zone}/state"), ("GET", "/api/debug/connections"),
             ("GET", f"/api/debug/entities/{uuid.uuid4()}"), ("GET", "/api/debug/anything"),
             ("DELETE", f"/api/zones/{zone}"), ("POST", "/api/zones")]
    for method, path in calls:
        for token in (p["token"], None):
            status, body = await c.call(method, path, token, {"name": "x", "width": 2, "height": 2})
            assert status == 404 and body["error"] == "not_found", (method, path, body)
    assert (await c.call("GET", f"/api/zones/{zone}", p["token"]))[0] == 200
