"""Plain helpers shared by the tests: configuration, databases, a running server, waits.

Fixtures and pytest hooks live in ``conftest.py``; test files, ``faultkit.py`` and
``conftest.py`` import what they need from here.

Every wait in the tests scales by ``GRIDSERVER_TEST_TIMEOUT_FACTOR`` (a float, default 1.0),
read here and nowhere else: set it to 3 on a slow or loaded machine and every bound is three
times as long. A helper that takes a ``timeout`` (``wait_for``, ``call_from``, the tools in
``faultkit.py``) takes it in seconds on an ordinary machine and scales it itself; a timeout
handed straight to a library (``ws.receive``, ``asyncio.wait_for``, ``subprocess.run``...) is
written ``scaled(seconds)``. Bounds that are the promise a test checks (a 503 within the
database timeout, ticks kept on time) are not scaled: a slow machine does not change them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sqlite3
import sys
import uuid

import pytest
from aiohttp import ClientSession

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gridserver  # noqa: E402

PG_DSN = os.environ.get("GRIDSERVER_TEST_PG_DSN", "postgresql://root@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("GRIDSERVER_REQUIRE_PG") == "1"
BACKENDS = os.environ.get("GRIDSERVER_TEST_BACKENDS", "sqlite,postgres").split(",")


def _timeout_factor() -> float:
    text = os.environ.get("GRIDSERVER_TEST_TIMEOUT_FACTOR", "").strip()
    if not text:
        return 1.0
    try:
        factor = float(text)
    except ValueError:
        raise ValueError(f"GRIDSERVER_TEST_TIMEOUT_FACTOR must be a number, not {text!r}") from None
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"GRIDSERVER_TEST_TIMEOUT_FACTOR must be a positive number, not {text!r}")
    return factor


#: How much longer than on an ordinary machine every wait may take (GRIDSERVER_TEST_TIMEOUT_FACTOR).
TIMEOUT_FACTOR = _timeout_factor()


def scaled(seconds: float) -> float:
    """``seconds`` times GRIDSERVER_TEST_TIMEOUT_FACTOR: the bound of a wait on this machine."""
    return seconds * TIMEOUT_FACTOR


_pg_reachable: bool | None = None


def pg_available() -> bool:
    global _pg_reachable
    if _pg_reachable is None:
        try:
            import psycopg2
            psycopg2.connect(PG_DSN, connect_timeout=max(1, round(scaled(3)))).close()
            _pg_reachable = True
        except Exception as exc:  # noqa: BLE001
            _pg_reachable = False
            print(f"\nPostgreSQL at {PG_DSN} unreachable: {exc}", file=sys.stderr)
    return _pg_reachable


def pg_exec(sql: str, dsn: str = PG_DSN) -> list:
    """Run one statement on PostgreSQL (autocommit) and return its rows."""
    import psycopg2
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def db_rows(dsn: str, sql: str) -> list[tuple]:
    """Run ``sql`` straight on the test's database, bypassing the server; its rows, if any."""
    if dsn.startswith("sqlite:///"):
        conn = sqlite3.connect(dsn[len("sqlite:///"):], isolation_level=None)  # autocommit, like pg_exec
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()
    return pg_exec(sql, dsn=dsn)  # the dsn carries the test's search_path


def dsn_with_schema(schema: str, dsn: str = PG_DSN) -> str:
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}options=-csearch_path%3D{schema}"


def require_pg() -> None:
    """Skip the calling test when PostgreSQL is unreachable (fail it under GRIDSERVER_REQUIRE_PG=1)."""
    if not pg_available():
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL required (GRIDSERVER_REQUIRE_PG=1) but {PG_DSN} is unreachable")
        pytest.skip(f"PostgreSQL at {PG_DSN} is unreachable")


def make_config(dsn: str, **overrides) -> gridserver.Config:
    """Test defaults (cheap bcrypt, fast flushes) plus ``section_key=value`` overrides."""
    values = {
        "database_dsn": dsn,
        "auth_bcrypt_rounds": 4,
        "persistence_interval": 0.2,
        "tick_interval": 0.1,
        "websocket_heartbeat": 5.0,
        "server_port": 0,
    }
    values.update(overrides)
    cfg = gridserver.Config.load(None, environ={})
    return cfg.with_values(**values)


class Running:
    """A server started by ``start_server``: its base URL, app, and helpers to call it."""

    def __init__(self, server, session: ClientSession):
        self.server = server  # aiohttp.test_utils.TestServer
        self.app = server.app
        self.srv: gridserver.Server = server.app[gridserver.SERVER]
        self.http = session

    @property
    def url(self) -> str:
        return str(self.server.make_url("/"))[:-1]

    def ws_url(self, token: str) -> str:
        return str(self.server.make_url("/ws")).replace("http://", "ws://") + f"?token={token}"

    async def call(self, method: str, path: str, token: str | None = None, json=None, data=None,
                   headers=None) -> tuple[int, object]:
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        async with self.http.request(method, self.url + path, json=json, data=data, headers=hdrs) as resp:
            text = await resp.text()
            body = None
            if text:
                try:
                    body = gridserver.json_loads(text)
                except ValueError:
                    body = text
            return resp.status, body

    async def player(self, username: str | None = None, password: str = "correct horse") -> dict:
        """Register and log in a fresh player; returns {"username", "password", "token", "id"}."""
        username = username or "p_" + uuid.uuid4().hex[:10]
        status, body = await self.call("POST", "/api/auth/register", json={"username": username, "password": password})
        assert status == 201, body
        status, login = await self.call("POST", "/api/auth/login", json={"username": username, "password": password})
        assert status == 200, login
        return {"username": username, "password": password, "token": login["token"], "id": login["player_id"]}

    async def zone(self, token: str, name: str | None = None, width: int = 32, height: int = 32,
                   metadata: dict | None = None) -> dict:
        body = {"name": name or "z_" + uuid.uuid4().hex[:8], "width": width, "height": height}
        if metadata is not None:
            body["metadata"] = metadata
        status, zone = await self.call("POST", "/api/zones", token, json=body)
        assert status == 201, zone
        return zone


async def stop_server(running: Running) -> None:
    """Stop gracefully (final flush, sockets closed), as SIGTERM would."""
    await running.http.close()
    await running.server.close()


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` (sync or async) until it is truthy and return its value; fail after
    ``timeout`` seconds (scaled)."""
    limit = scaled(timeout)
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not met within {limit:g} s")
        await asyncio.sleep(interval)


async def call_from(address: str, url: str, json=None, method: str = "POST", token: str | None = None,
                    timeout: float = 20.0) -> tuple[int, object]:
    """One HTTP call from the local address ``address`` (any 127.x.y.z on Linux): a client of
    its own as far as the server can tell. (status, JSON body or text); ``timeout`` is scaled."""
    import aiohttp
    connector = aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=scaled(timeout))) as http:
        async with http.request(method, url, json=json, headers=headers) as resp:
            text = await resp.text()
            try:
                return resp.status, gridserver.json_loads(text) if text else None
            except ValueError:
                return resp.status, text


class Passive:
    """A game module that does nothing: the server's own behaviour is what a test sees."""

    def on_init(self, framework):
        self.framework = framework

    def on_tick(self, zone_id, entities, intents, tick_number):
        return gridserver.TickResult(broadcast_state={"tick": tick_number, "n": len(entities)})

    def get_player_state(self, zone_id, player_id, full_state):
        return full_state


class TcpProxy:
    """A TCP proxy on 127.0.0.1 (port 0) to ``upstream`` that a test can cut and restore.

    ``cut()`` aborts every open proxied connection and, until ``restore()``, accepts new ones
    only to close them at once: to its clients it looks like a database that went away.
    """

    def __init__(self, upstream_host: str = "127.0.0.1", upstream_port: int = 5432):
        self.upstream = (upstream_host, upstream_port)
        self.port: int | None = None
        self.is_cut = False
        self.is_stalled = False
        self.refused = 0  # connections accepted and closed while cut
        self.held = 0  # connections accepted and ignored while stalled
        self._held: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> "TcpProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @staticmethod
    def _abort(*writers: asyncio.StreamWriter) -> None:
        for w in writers:
            if w.transport is not None and not w.transport.is_closing():
                w.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            if self.is_cut:
                self.refused += 1
                writer.close()
                return
            if self.is_stalled:
                self.held += 1
                self._held.add(writer)
                try:
                    while self.is_stalled and not writer.transport.is_closing():
                        await asyncio.sleep(0.05)
                finally:
                    self._held.discard(writer)
                    self._abort(writer)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                self._abort(writer)
                return
            if self.is_cut:  # cut while connecting upstream
                self.refused += 1
                self._abort(writer, up_writer)
                return
            pair = (writer, up_writer)
            self._pairs.add(pair)
            try:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            finally:
                self._pairs.discard(pair)
                self._abort(writer, up_writer)
        except asyncio.CancelledError:
            self._abort(writer)
        finally:
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.is_stalled:
                    continue  # lost in the network
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if writer.transport is not None and not writer.transport.is_closing():
                writer.close()

    def cut(self) -> None:
        """Abort every open proxied connection and refuse (accept-and-close) new ones."""
        self.is_cut = True
        for pair in list(self._pairs):
            self._abort(*pair)

    def stall(self) -> None:
        """A silent network: open connections stop passing bytes (both ways) and new ones are
        accepted and then ignored. Nothing is closed: only timeouts can notice."""
        self.is_stalled = True

    def restore(self) -> None:
        """Forward new connections to the upstream again (stalled ones are aborted first)."""
        if self.is_stalled:
            self.is_stalled = False
            for pair in list(self._pairs):
                self._abort(*pair)
            for writer in list(self._held):
                self._abort(writer)
        self.is_cut = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), scaled(5))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=scaled(5))


# -- one entity at a time, through the same checked apply as a tick's result -----------------

def create_entity(world: gridserver.World, zone_id, x: int, y: int, width: int = 0, height: int = 0,
                  metadata: dict | None = None, entity_id=None, now: float | None = None) -> gridserver.Entity:
    """Create one entity (checked like a tick result) and mark it for the next flush."""
    result = gridserver.TickResult(entity_creates=[gridserver.EntityCreate(x, y, width, height, metadata or {},
                                                                           entity_id)])
    return world.apply(zone_id, result, now)[0][0]


def update_entity(world: gridserver.World, entity_id, now: float | None = None, **changes) -> gridserver.Entity:
    """Move, resize or replace the metadata of one entity (``x=``, ``y=``, ``width=``...)."""
    zs = world.entity_zone.get(entity_id)
    if zs is None:
        raise gridserver.TickRejected(f"unknown entity {entity_id}")
    world.apply(zs.zone.id, gridserver.TickResult(entity_updates=[gridserver.EntityUpdate(entity_id, **changes)]), now)
    return zs.entities[entity_id]


def delete_entity(world: gridserver.World, entity_id) -> None:
    zs = world.entity_zone.get(entity_id)
    if zs is None:
        raise gridserver.TickRejected(f"unknown entity {entity_id}")
    world.apply(zs.zone.id, gridserver.TickResult(entity_deletes=[entity_id]))
