"""Shared fixtures and hooks: a real gridserver on a real socket, on SQLite or PostgreSQL.

The backend is chosen per test by the ``backend`` fixture (both by default). PostgreSQL
tests use ``GRIDSERVER_TEST_PG_DSN`` (default ``postgresql://root@127.0.0.1:5432/test``) and
give every server its own schema; they are skipped, with the reason, when that database
cannot be reached, unless ``GRIDSERVER_REQUIRE_PG=1`` (as CI sets) makes that a failure.

Plain helpers (``make_config``, ``wait_for``, ``scaled``...) are in ``helpers.py``: tests
import them from there, not from here.
"""

from __future__ import annotations

import sys
import uuid

import pytest
from aiohttp import ClientSession

from helpers import BACKENDS, PG_DSN, TIMEOUT_FACTOR, Running, TcpProxy, dsn_with_schema, pg_exec, require_pg

import gridserver  # noqa: E402  (helpers puts the repository on sys.path)


@pytest.fixture(params=[b for b in BACKENDS if b])
def backend(request):
    if request.param == "postgres":
        require_pg()
    return request.param


@pytest.fixture
def dsn(backend, tmp_path):
    """A fresh, empty database for one test: a SQLite file or a PostgreSQL schema."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'gridserver.db'}"
        return
    schema = "t_" + uuid.uuid4().hex[:16]
    pg_exec(f"CREATE SCHEMA {schema}")
    yield dsn_with_schema(schema)
    pg_exec(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
async def start_server(aiohttp_server):
    """``await start_server(cfg, game=None)`` starts a real server on 127.0.0.1; stopped after the test."""
    sessions = []

    async def start(cfg: gridserver.Config, game=None) -> Running:
        app = gridserver.create_app(cfg, game)
        server = await aiohttp_server(app)
        session = ClientSession()
        sessions.append(session)
        return Running(server, session)

    yield start
    for s in sessions:
        await s.close()


@pytest.fixture
async def tcp_proxy():
    """``await tcp_proxy(host=PG host, port=PG port)`` starts a ``TcpProxy``; closed after the test."""
    from urllib.parse import urlsplit
    parts = urlsplit(PG_DSN)
    proxies: list[TcpProxy] = []

    async def make(host: str | None = None, port: int | None = None) -> TcpProxy:
        proxy = await TcpProxy(host or parts.hostname or "127.0.0.1", port or parts.port or 5432).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.close()


@pytest.fixture
def pg_schema():
    """A fresh PostgreSQL schema; the fault suite's database promises are about PostgreSQL."""
    require_pg()
    schema = "f_" + uuid.uuid4().hex[:16]
    pg_exec(f"CREATE SCHEMA {schema}")
    yield schema
    pg_exec(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
async def http():
    import aiohttp
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def processes():
    """Server processes (``faultkit.ServerProcess``) started by a test through ``start``;
    whatever is still running at the end is killed."""
    started: list = []
    yield started
    for proc in started:
        proc.stop()


def pytest_report_header(config):
    if TIMEOUT_FACTOR != 1.0:
        return f"GRIDSERVER_TEST_TIMEOUT_FACTOR: every wait scaled by {TIMEOUT_FACTOR:g}"
    return None


def pytest_terminal_summary(terminalreporter):
    """Print the figures the fault suite measured (cases tried, connections abused...)."""
    faultkit = sys.modules.get("faultkit")
    figures = getattr(faultkit, "FIGURES", None)
    if figures:
        terminalreporter.section("fault suite figures")
        for name, value in figures.items():
            terminalreporter.write_line(f"{name}: {value}")
