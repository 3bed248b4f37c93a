#!/usr/bin/env python3
"""gridserver: a minimal, authoritative server for tick-based 2D grid multiplayer games.

Quickstart::

    pip install aiohttp bcrypt ujson         # aiopg too, for PostgreSQL
    python gridserver.py                     # http://127.0.0.1:8080, SQLite file gridserver.db
                                             # open that URL in a browser to play and watch

Every tick (default once a second) the server gathers the intents players sent over
WebSocket, hands each zone's entities and intents to the game module named in the INI file,
checks and applies the ``TickResult`` it returns, and sends every subscriber of the zone the
state the module chose for that player. Accounts and zones are written to the database at
once; entity changes are flushed in one batched transaction every few seconds.

A game module is a plain Python module (or class) with ``on_init``, ``on_tick`` and
``get_player_state``; it imports its types from here::

    from gridserver import TickResult, EntityCreate, EntityUpdate

Sections of this file, each calling only those above it (``grep -n '^# [A-Z]' gridserver.py``):

    Imports and JSON
    Configuration
    Wire helpers
    Public types and game protocol
    Spatial index
    World state
    The zone tick (pure)
    Metrics
    Storage (all SQL lives here)
    Accounts and sessions
    Cluster: zone ownership in PostgreSQL, wake-ups over NATS
    Hub: connections, subscriptions, sending
    Cluster: relaying players between nodes
    Journal
    Tick engine
    Persistence
    Game modules and the framework API
    Server state
    Compatibility with aiohttp internals
    HTTP handlers
    WebSocket handler
    Protocol: routes, messages and the OpenAPI document
    App factory and CLI
    Python client
    Browser client and page

Threads. Each thread runs one kind of work and writes only what it owns; hand-offs go
through queues and ``loop.call_soon_threadsafe``, and the event loop never waits on a
threading lock.

* The event loop (main thread): HTTP, WebSocket, the hub, timers, the tick schedule. It
  alone writes connections, subscriptions and each zone's inbox (intents, join and leave
  events), and swaps a zone's inbox out as the inputs of its tick. A text message is
  handled where aiohttp's parser produces it (``_DirectQueue``), still on the loop. Work
  that needs ``World.lock`` goes to the world thread; blocking database calls to the
  database threads.
* Game threads (``gridserver-game``): module code (``on_tick``, the hooks,
  ``get_player_state``), ``run_zone_tick`` and applying results. They alone write the world's
  entities and spatial index (under ``World.lock``), and hand finished zones to the loop
  through a queue. A module call that overstays ``[tick] zone_timeout`` keeps its thread; a
  fresh game thread takes the other zones, so module code can then run on two threads at
  once, for different zones: module state shared between zones must be safe for that.
* ``on_init`` runs once, in a worker thread, before the first tick; ``FrameworkAPI`` (its
  reads take ``World.lock``; ``create_zone`` waits for the loop) serves module code in both.
  A hot reload (importing the new code, its ``on_init`` and ``on_reload``) and
  ``on_zone_deleted`` run in a worker thread too, while the loop holds the ticks
  (``TickEngine.exclusive``): no game thread runs module code meanwhile (but for a call
  stuck past ``zone_timeout``).
* The world thread (``gridserver-world``): adding, removing and restoring zones and the
  debug routes' reads of entities, under ``World.lock``, for the loop.
* Database threads: the flush thread (``gridserver-flush``: the snapshot of changed
  entities under ``World.lock``, serializing it, restoring it when a flush failed, and,
  started from the command line, giving glibc's free pages back after a flush), the
  SQLite thread (``gridserver-sqlite``) and bcrypt
  (``gridserver-bcrypt``). They write nothing in memory but what they are handed;
  PostgreSQL goes through aiopg on the loop.
* Recovery replays journaled ticks through the module in a worker thread at start-up,
  before the first tick (like ``on_init``).
* Cluster mode: the zone directory's rounds, the relay and the NATS client (nats-py is
  asyncio) run on the event loop and write only the directory, the relay's queues and the
  hub's stand-ins for players of other nodes. A zone taken over from another node is
  loaded on the loop and replayed through the module in a worker thread, in a world of its
  own (the module's reads see that world: ``_TICK.world``), while the other zones tick; a
  hot reload waits for it. Game threads read the directory (``FrameworkAPI.list_zones``),
  which the loop replaces whole, never changes in place.
"""

from __future__ import annotations

# =============================================================================
# Imports and JSON
# =============================================================================

import argparse
import array
import asyncio
import base64
import bisect
import collections
import concurrent.futures
import configparser
import contextlib
import dataclasses
import datetime as _dt
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import ipaddress
import itertools
import logging
import math
import operator
import os
import queue
import random
import re
import reprlib
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import traceback
import types
import time
import typing
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Coroutine, Iterable, Mapping, NamedTuple, Protocol, Sequence
from uuid import UUID

import bcrypt
from aiohttp import WSMsgType, web, web_protocol, web_server
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

try:  # ujson is much faster; the standard library keeps the file runnable without it
    import ujson as _ujson

    def json_dumps(obj: Any) -> str:
        """Serialize ``obj`` compactly; UUIDs and datetimes become strings."""
        return _ujson.dumps(obj, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False,
                            default=_json_default)

    json_loads = _ujson.loads
except ImportError:  # pragma: no cover - exercised only where ujson is missing
    import json as _json

    def json_dumps(obj: Any) -> str:
        """Serialize ``obj`` compactly; UUIDs and datetimes become strings."""
        return _json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_json_default)

    json_loads = _json.loads

try:  # PostgreSQL support is optional: the embedded SQLite default needs nothing
    import aiopg
    import psycopg2
    import psycopg2.errors
except ImportError:  # pragma: no cover
    aiopg = psycopg2 = None  # type: ignore[assignment]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, UUID):
        return str(obj)
    if isinstance(obj, _dt.datetime):
        return _iso(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


__all__ = [
    "BuiltinDemo",
    "Entity",
    "EntityCreate",
    "EntityMoves",
    "EntityUpdate",
    "FrameworkAPI",
    "GameLogicModule",
    "Intent",
    "TickResult",
    "Zone",
    "ZoneSim",
    "json_dumps",
    "json_loads",
]

log = logging.getLogger("gridserver")

# =============================================================================
# Configuration
# =============================================================================


class ConfigError(Exception):
    """A configuration value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class _Option:
    section: str
    key: str
    default: str
    kind: str  # "str", "int", "float", "bool"
    help: str
    minimum: float | None = None

    @property
    def env(self) -> str:
        return f"GRIDSERVER_{self.section}_{self.key}".upper()


#: Every configuration key, declared once with its default and meaning. ``config.example.ini``
#: and the README's table are written from this list (``python gridserver.py --print-config``).
OPTIONS: list[_Option] = [
    _Option("server", "host", "127.0.0.1", "str", "address to listen on"),
    _Option("server", "port", "8080", "int", "TCP port to listen on", 0),
    _Option("server", "debug", "false", "bool", "debug mode: debug routes exist only when true"),
    _Option("server", "debug_players", "", "str",
            "comma-separated usernames allowed to use debug routes; empty: every player (refused unless "
            "host is a loopback address)"),
    _Option("server", "max_body_size", "65536", "int", "largest REST request body in bytes", 64),
    _Option("server", "max_zone_size", "10000", "int", "largest zone width and height", 1),
    _Option("server", "shutdown_timeout", "10", "float",
            "seconds a graceful stop waits for the final flush", 0),
    _Option("server", "client_timeout", "60", "float",
            "seconds a client may take to send a request's headers or body, and an idle HTTP connection stays open", 0.1),
    _Option("server", "max_connections_per_address", "256", "int",
            "open connections (HTTP and WebSocket) one client address may hold; more are answered 429 and closed", 1),
    _Option("server", "event_loop", "asyncio", "str",
            "asyncio: asyncio's own loop (the fault suite's guarantees are tested on it); uvloop: uvloop "
            "(pip install 'gridserver[fast]'), or refuse to start without it; auto: uvloop when installed"),
    _Option("server", "cors_origins", "", "str",
            "comma-separated origins (scheme://host:port) whose browser pages may call the REST routes, "
            "for a game page served elsewhere (a development server); * for any; empty: none"),
    _Option("server", "static_dir", "", "str",
            "a folder of the game's own browser files (its page, scripts, images), served at /game/ "
            "(/game/ is its index.html); relative to the config file's folder; empty: none"),
    _Option("server", "workers", "1", "int",
            "node processes to run on this machine sharing one port (also --workers N); more than 1 needs "
            "[cluster] nats_url", 1),
    _Option("database", "dsn", "sqlite:///gridserver.db", "str",
            "postgresql://user@host/db for PostgreSQL through aiopg; sqlite:///PATH for the embedded default"),
    _Option("database", "pool_min", "1", "int", "PostgreSQL pool: connections kept open", 0),
    _Option("database", "pool_max", "10", "int", "PostgreSQL pool: most connections at once", 1),
    _Option("database", "timeout", "5.0", "float",
            "seconds one database call may take before it fails (and the caller gets 503)", 0.1),
    _Option("auth", "min_password_length", "8", "int", "shortest password accepted, in characters", 1),
    _Option("auth", "session_ttl", "0", "float", "seconds a session lives; 0: until logout", 0),
    _Option("auth", "bcrypt_rounds", "12", "int", "bcrypt cost (4 to 31); 4 only for tests and benchmarks", 4),
    _Option("auth", "bcrypt_threads", "2", "int", "threads that hash passwords off the event loop", 1),
    _Option("auth", "max_pending_hashes", "128", "int",
            "logins and registrations waiting for bcrypt at once; more answer 503 busy (one address: "
            "at most an eighth of them, more answer 429)", 1),
    _Option("auth", "max_failed_logins", "10", "int",
            "failed logins a minute per username and per client address; past it every login of that "
            "username or address answers 429 too_many_attempts until the minute has passed", 1),
    _Option("auth", "max_sessions", "100", "int",
            "sessions one player may hold; a login past it ends the player's oldest session", 1),
    _Option("tick", "interval", "1.0", "float", "seconds between ticks", 0.001),
    _Option("tick", "max_intents_per_player", "10", "int",
            "intents a player may send per zone tick, whichever connection sent them; more are dropped "
            "with rate_limited", 1),
    _Option("tick", "max_intents_per_zone", "20000", "int",
            "intents a zone holds for its next tick (also while paused or stalled); more are dropped "
            "with rate_limited", 1),
    _Option("tick", "max_entities_per_zone", "200000", "int",
            "entities a zone may hold; a tick result that would go past it is rejected", 1),
    _Option("tick", "zone_timeout", "0", "float",
            "seconds a zone's module call may run before the tick goes on without it; 0: half the interval", 0),
    _Option("tick", "paused", "false", "bool", "start with the tick paused (debug stepping)"),
    _Option("persistence", "interval", "5.0", "float", "seconds between flushes of changed entities", 0.01),
    _Option("persistence", "max_backoff", "30.0", "float",
            "longest wait between flush retries while the database is down", 0.01),
    _Option("websocket", "max_message_size", "65536", "int",
            "largest client message in bytes; larger ones get an error (16x larger: the socket is closed)", 64),
    _Option("websocket", "heartbeat", "20.0", "float",
            "seconds between heartbeat sweeps: a client silent for a whole period is pinged, and dropped if "
            "still silent at the next sweep; 0: never", 0),
    _Option("websocket", "reconnect_grace", "30.0", "float",
            "seconds a dropped player keeps their zone; reconnecting within it resumes the subscription", 0),
    _Option("websocket", "max_behind", "10", "int",
            "ticks a client may fall behind (unsent) before it is disconnected", 1),
    _Option("websocket", "max_subscribes_per_tick", "2", "int",
            "subscribes and unsubscribes a player may send per tick; more are refused with rate_limited", 1),
    _Option("websocket", "max_depth", "32", "int",
            "deepest nesting of objects and arrays in an intent's data; deeper intents are bad_message", 1),
    _Option("journal", "mode", "replay", "str",
            "replay: each tick's inputs are committed before its frames are sent, and a restart replays "
            "them after the last flush; off: a restart goes back to the last flush"),
    _Option("journal", "keep", "600", "int", "ticks of inputs kept per zone before its last flush (history)", 0),
    _Option("journal", "verify_every", "10", "int",
            "with debug on, every this many ticks each zone's tick runs twice from the same state and "
            "the two are compared (a module that is not deterministic is named); 0: never", 0),
    _Option("cluster", "nats_url", "", "str",
            "NATS server URL(s), comma-separated (pip install 'gridserver[cluster]'); set, this process is one "
            "node of a world shared through the database (PostgreSQL only); empty: one node, no NATS"),
    _Option("cluster", "node_name", "", "str", "this node's unique name; empty: <hostname>:<port>:<pid>"),
    _Option("cluster", "lease", "5.0", "float",
            "seconds a node's claim on its zones lasts without renewal: how long a dead node's zones wait "
            "before other nodes take them over", 0.5),
    _Option("game", "module", "game_modules.walkers", "str",
            "dotted path of the game module (package.module or package.module:Name)"),
    _Option("debug", "log_level", "info", "str", "debug, info, warning or error"),
    _Option("debug", "access_log", "false", "bool",
            "log every HTTP request (method, path without the query string, status, size, time)"),
]


class Config:
    """Typed configuration: ``config.get("tick", "interval")``; module sections as raw strings.

    Values come from the built-in defaults, then the INI file, then ``GRIDSERVER_<SECTION>_<KEY>``
    environment variables, each winning over the one before.
    """

    def __init__(self, values: dict[tuple[str, str], Any], sections: dict[str, dict[str, str]]):
        self._values = values
        self._sections = sections

    @property
    def unused_sections(self) -> list[str]:
        """Sections that are neither the server's nor the configured game module's (typos?)."""
        return sorted(set(self._sections) - {self._values[("game", "module")]})

    def get(self, section: str, key: str) -> Any:
        return self._values[(section, key)]

    def section(self, name: str) -> dict[str, str]:
        """Raw string values of a section that is not the server's own (a game module's)."""
        return dict(self._sections.get(name, {}))

    def with_values(self, **overrides: Any) -> "Config":
        """A copy with ``section_key=value`` overrides (already typed), for tests and tools."""
        values = dict(self._values)
        for name, value in overrides.items():
            section, key = name.split("_", 1) if "_" in name else (name, "")
            if (section, key) not in values:
                raise KeyError(name)
            values[(section, key)] = value
        return Config(values, self._sections)

    @classmethod
    def load(cls, path: str | None = None, environ: Mapping[str, str] | None = None) -> "Config":
        """Read ``path`` (if given or ``config.ini`` exists) and the environment.

        Raises ``ConfigError`` with one line naming the key for any unusable value.
        """
        environ = os.environ if environ is None else environ
        parser = configparser.ConfigParser(interpolation=None)
        if path is None and os.path.exists("config.ini"):
            path = "config.ini"
        if path is not None:
            try:
                with open(path, encoding="utf-8") as fh:
                    parser.read_file(fh)
            except OSError as exc:
                raise ConfigError(f"config file {path}: {exc.strerror}") from None
            except configparser.Error as exc:
                raise ConfigError(f"config file {path}: {str(exc).splitlines()[0]}") from None
        known = {(o.section, o.key) for o in OPTIONS}
        for section in parser.sections():
            if section in {o.section for o in OPTIONS}:
                for key in parser[section]:
                    if (section, key) not in known:
                        raise ConfigError(f"[{section}] {key}: unknown key")
        values: dict[tuple[str, str], Any] = {}
        for opt in OPTIONS:
            raw, where = opt.default, "default"
            if parser.has_option(opt.section, opt.key):
                raw, where = parser.get(opt.section, opt.key), "config file"
            if opt.env in environ:
                raw, where = environ[opt.env], f"environment {opt.env}"
            values[(opt.section, opt.key)] = _parse_option(opt, raw, where)
        static = values[("server", "static_dir")]
        if static and path is not None and not os.path.isabs(static):  # from the config file's folder
            values[("server", "static_dir")] = os.path.join(os.path.dirname(os.path.abspath(path)), static)
        sections = {s: dict(parser[s]) for s in parser.sections() if s not in {o.section for o in OPTIONS}}
        module_section = values[("game", "module")]
        prefix = "GRIDSERVER_" + re.sub(r"[^A-Za-z0-9]", "_", module_section).upper() + "_"
        for name, value in environ.items():
            if name.startswith(prefix):
                sections.setdefault(module_section, {})[name[len(prefix):].lower()] = value
        cfg = cls(values, sections)
        _check_config(cfg)
        return cfg


def _parse_option(opt: _Option, raw: str, where: str) -> Any:
    raw = raw.strip()
    bad = f"[{opt.section}] {opt.key} ({where}): "
    if opt.kind == "str":
        return raw
    if opt.kind == "bool":
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(bad + f"expected true or false, got {raw!r}")
    try:
        value: float = int(raw) if opt.kind == "int" else float(raw)
    except ValueError:
        kind = "a whole number" if opt.kind == "int" else "a number"
        raise ConfigError(bad + f"expected {kind}, got {raw!r}") from None
    if not math.isfinite(value) or (opt.minimum is not None and value < opt.minimum):
        raise ConfigError(bad + f"must be at least {opt.minimum:g}, got {raw!r}")
    return value


def _check_config(cfg: Config) -> None:
    dsn = cfg.get("database", "dsn")
    if not (dsn.startswith("sqlite:///") or dsn.startswith(("postgresql://", "postgres://"))):
        raise ConfigError(f"[database] dsn: expected sqlite:///PATH or postgresql://..., got {dsn!r}")
    if dsn.startswith("postgres") and aiopg is None:
        raise ConfigError("[database] dsn: PostgreSQL needs the aiopg package (pip install aiopg)")
    if not 4 <= cfg.get("auth", "bcrypt_rounds") <= 31:
        raise ConfigError(f"[auth] bcrypt_rounds: must be from 4 to 31, got {cfg.get('auth', 'bcrypt_rounds')}")
    if cfg.get("server", "port") > 65535:
        raise ConfigError(f"[server] port: must be at most 65535, got {cfg.get('server', 'port')}")
    if cfg.get("debug", "log_level").upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"[debug] log_level: expected debug, info, warning or error, got {cfg.get('debug', 'log_level')!r}")
    if cfg.get("database", "pool_min") > cfg.get("database", "pool_max"):
        raise ConfigError("[database] pool_min: must not exceed pool_max")
    if cfg.get("server", "debug") and not any(n.strip() for n in cfg.get("server", "debug_players").split(",")) \
            and not _is_loopback(cfg.get("server", "host")):
        raise ConfigError(f"[server] debug = true with an empty [server] debug_players would make every player "
                          f"an admin on {cfg.get('server', 'host')!r}: name the debug players, or listen on "
                          f"a loopback address")
    if cfg.get("server", "event_loop") not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"[server] event_loop: expected auto, uvloop or asyncio, got {cfg.get('server', 'event_loop')!r}")
    static = cfg.get("server", "static_dir")
    if static and not os.path.isdir(static):
        raise ConfigError(f"[server] static_dir: {static!r} is not a folder")
    if cfg.get("cluster", "nats_url") and dsn.startswith("sqlite:///"):
        raise ConfigError("[cluster] nats_url: a cluster shares its world through PostgreSQL; set [database] dsn "
                          "to postgresql://... (SQLite is one process's file)")
    if cfg.get("cluster", "nats_url") and cfg.get("journal", "mode") != "replay":
        raise ConfigError("[journal] mode: a cluster needs replay: another node takes a zone over from the "
                          "database and the journal, and frames wait for the journal's commit")
    if cfg.get("server", "workers") > 1 and cfg.get("cluster", "node_name"):
        raise ConfigError("[cluster] node_name: leave it empty with more than one worker (each node is named "
                          "<hostname>:<port>:<pid>)")
    if cfg.get("server", "workers") > 1 and not cfg.get("cluster", "nats_url"):
        raise ConfigError("[server] workers: more than one node process needs [cluster] nats_url (the nodes "
                          "share the world through PostgreSQL and NATS)")
    if cfg.get("journal", "mode") not in ("replay", "off"):
        raise ConfigError(f"[journal] mode: expected replay or off, got {cfg.get('journal', 'mode')!r}")
    if not re.fullmatch(r"[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?", cfg.get("game", "module")):
        raise ConfigError(f"[game] module: expected a dotted path like game_modules.walkers, got {cfg.get('game', 'module')!r}")


def _is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _example_ini() -> str:
    """The text of ``config.example.ini``: every key with its default and help."""
    out = ["; gridserver configuration. Every key may be overridden by the environment",
           "; variable GRIDSERVER_<SECTION>_<KEY> (upper case), which wins over this file.", ""]
    section = None
    for opt in OPTIONS:
        if opt.section != section:
            if section is not None:
                out.append("")
            out.append(f"[{opt.section}]")
            section = opt.section
        out.append(f"; {opt.help} ({opt.env})")
        out.append(f"{opt.key} = {opt.default}")
    return "\n".join(out) + "\n"


# =============================================================================
# Wire helpers
# =============================================================================


class GridError(Exception):
    """A refusal with a machine code (``"zone_not_found"``...) and one human sentence.

    Raised anywhere inside the server; only the HTTP edge turns it into a status and the JSON
    envelope (``HTTP_STATUS``). ``headers`` (``Retry-After``) go along with the answer.
    """

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers


@dataclass(frozen=True)
class _ErrorCode:
    code: str
    status: int | None  # the HTTP status; None: only sent over WebSocket
    websocket: bool  # also sent over WebSocket, in ``{"type": "error", "code": ...}``
    meaning: str


#: Every error code the server answers, declared once with its HTTP status and meaning. The
#: README's error table and the OpenAPI document are written from this list
#: (``gridserver --print-protocol``); ``HTTP_STATUS`` below is derived from it.
ERRORS: list[_ErrorCode] = [
    _ErrorCode("bad_request", 400, False,
               "the body is not JSON, not an object, larger than `[server] max_body_size`, or late "
               "(`[server] client_timeout`); a field or query parameter is missing or wrong (the message "
               "names it); or the HTTP itself cannot be parsed"),
    _ErrorCode("unauthorized", 401, False, "no session token, or one that is unknown, expired or logged out"),
    _ErrorCode("invalid_credentials", 401, False,
               "wrong username or password (the same answer for both, after the same work)"),
    _ErrorCode("forbidden", 403, False, "a debug route called by a player who is not a debug player"),
    _ErrorCode("not_found", 404, False,
               "no such path (every `/api/debug` path while debug mode is off; a game file that is not there)"),
    _ErrorCode("zone_not_found", 404, True, "no zone has this id (a malformed id too)"),
    _ErrorCode("entity_not_found", 404, False, "no entity has this id (a malformed id too)"),
    _ErrorCode("method_not_allowed", 405, False,
               "the path exists, but not with this method; `Allow` names those it has"),
    _ErrorCode("username_taken", 409, False, "another player has this username"),
    _ErrorCode("zone_name_taken", 409, False, "another zone has this name"),
    _ErrorCode("not_paused", 409, False, "a step while the tick is running: pause it first"),
    _ErrorCode("journal_off", 409, False, "history and rewind need `[journal] mode = replay`"),
    _ErrorCode("out_of_history", 409, False,
               "the tick asked for is no longer kept (`[journal] keep`) or not before the zone's tick"),
    _ErrorCode("zone_busy", 409, False, "the zone's module call is still running; try again once it returns"),
    _ErrorCode("module_not_reloadable", 409, False,
               "the game was handed to `create_app` as an object, not loaded from `[game] module`"),
    _ErrorCode("expectation_failed", 417, False, "an `Expect` header other than `100-continue`"),
    _ErrorCode("module_error", 422, True,
               "a hot reload was refused: the new code does not import or its `on_init`/`on_reload` "
               "raised (file and line in the message); the old code keeps running. Over WebSocket: "
               "sent to debug players"),
    _ErrorCode("too_many_attempts", 429, False,
               "too many failed logins for the username or from the address (`[auth] max_failed_logins`), or "
               "more than an eighth of `[auth] max_pending_hashes` waiting from one address; `Retry-After` says "
               "how many seconds to wait"),
    _ErrorCode("too_many_connections", 429, False,
               "the address holds `[server] max_connections_per_address` open connections already; the "
               "connection is closed"),
    _ErrorCode("internal_error", 500, False, "a bug in the server: logged, never a trace to the client"),
    _ErrorCode("busy", 503, False,
               "more than `[auth] max_pending_hashes` logins and registrations already wait for bcrypt; "
               "retry in a few seconds"),
    _ErrorCode("database_unavailable", 503, False, "the database did not answer in time; retry shortly"),
    _ErrorCode("bad_message", None, True,
               "not JSON, not an object, a binary frame, a missing or mistyped field, JSON nested deeper "
               "than 1024 levels, a string with an unpaired surrogate escape such as `\\ud800`; for an "
               "intent also `data` holding `NaN`, `Infinity`, a number outside the double range such as "
               "`1e999`, or nesting deeper than `[websocket] max_depth`"),
    _ErrorCode("unknown_type", None, True, "a message `type` the server does not know"),
    _ErrorCode("message_too_large", None, True,
               "a message over `[websocket] max_message_size` bytes (16 times that closes the socket, 1009)"),
    _ErrorCode("not_subscribed", None, True, "an intent before any subscribe"),
    _ErrorCode("rate_limited", None, True,
               "an intent past `[tick] max_intents_per_player` for this player in this zone tick (whichever "
               "connection sent it) or past `[tick] max_intents_per_zone`; a subscribe or unsubscribe past "
               "`[websocket] max_subscribes_per_tick`. The message is dropped; the error is sent once per tick "
               "and connection, and every drop is counted in `/metrics`"),
    _ErrorCode("zone_deleted", None, True, "the zone you were subscribed to was deleted; you are unsubscribed"),
    _ErrorCode("zone_failed", None, True,
               "the zone's last tick was lost (module exception, rejected result, stall); carries `zone_id`. "
               "Subscribers stay; `zone_recovered` follows when a tick succeeds again"),
    _ErrorCode("zone_unavailable", None, True,
               "cluster: no node ticks the zone right now (it is moving between nodes, or its node died and "
               "another takes it over within `[cluster] lease`); subscribe again in a moment"),
    _ErrorCode("zone_moved", None, True,
               "cluster: the zone you were subscribed to moved, and no node took it up within two "
               "`[cluster] lease`s; you are unsubscribed (subscribe again later). A zone that moves to "
               "another node is followed without this: you hear `subscribed` again"),
]

#: The HTTP status of every REST error code, the one place where codes meet HTTP.
HTTP_STATUS: dict[str, int] = {e.code: e.status for e in ERRORS if e.status is not None}

#: WebSocket close codes the server uses, with their meaning.
CLOSE_CODES: list[tuple[int, str]] = [
    (1001, "the server is shutting down"),
    (1002, "the client broke the WebSocket protocol (a reserved opcode, a control frame over 125 bytes, "
           "a continuation with nothing to continue)"),
    (1006, "not sent by the server: the connection was dropped without a close frame (a client that "
           "stopped reading, see slow readers, or stayed silent through a heartbeat ping)"),
    (1007, "a text frame that is not UTF-8"),
    (1009, "a frame over 16 times `[websocket] max_message_size`"),
    (4000, "replaced: the same player opened a newer connection"),
    (4001, "the session ended (logout, `{\"all\": true}` logout elsewhere, expiry or a login past "
           "`[auth] max_sessions`)"),
]


class DatabaseUnavailable(Exception):
    """The database did not answer in time or refused the connection."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _iso(value: _dt.datetime | float | None) -> str | None:
    """ISO 8601 in UTC with a ``Z``; accepts datetimes and epoch seconds."""
    if value is None:
        return None
    if not isinstance(value, _dt.datetime):
        value = _dt.datetime.fromtimestamp(value, _dt.timezone.utc)
    return value.astimezone(_dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json_dumps(body), status=status, content_type="application/json")


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    response = _json_response({"error": code, "message": message}, status)
    if headers:
        response.headers.update(headers)
    return response


def _parse_uuid(text: str, code: str = "not_found", what: str = "resource") -> UUID:
    """A path UUID; anything malformed is the same 404 as an unknown id."""
    try:
        value = UUID(text)
    except (ValueError, TypeError, AttributeError):
        raise GridError(code, f"No {what} has the id {text[:80]!r}.") from None
    return value


#: How deep zone and entity metadata may nest. Readers of the stored world recurse (psycopg2
#: parses jsonb with the standard library, which fails past about 900 levels), so deeper
#: metadata would be written and then stop the server from loading its world again.
MAX_JSON_DEPTH = 100


def _json_problem(value: Any) -> str | None:
    """Why ``value`` cannot be stored as JSON by both databases and read back (None: it can).

    ``json_dumps`` accepts strings PostgreSQL refuses: NUL characters (its text and jsonb
    cannot hold them) and unpaired surrogates (not UTF-8), and nesting too deep to be read
    back. The cheap checks run on the serialized text; a walk only when the text hints at
    a problem.
    """
    try:
        text = json_dumps(value)
    except (TypeError, ValueError, OverflowError) as exc:
        return f"is not JSON ({exc})"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds an unpaired surrogate (not valid Unicode text)"
    if "\\u0000" in text and _holds_nul(value):
        return "holds a NUL character"
    if text.count("{") + text.count("[") > MAX_JSON_DEPTH and _nests_deeper(value, MAX_JSON_DEPTH):
        return f"nests deeper than {MAX_JSON_DEPTH} levels"
    return None


def _nests_deeper(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (v.values() if isinstance(v, dict) else v))
    return False


def _holds_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return False


#: The largest magnitude JSON can carry to every client as a number (an IEEE double).
_DOUBLE_MAX = sys.float_info.max


def _data_problem(data: dict, max_depth: int) -> str | None:
    """Why an intent's ``data`` must be refused at the door (None: it may be queued).

    Whatever is queued reaches the module and may be echoed into a zone's state, which must
    serialize for every player: so no NaN or Infinity (which the parser accepts, as it does
    ``1e999`` and 400-digit numbers, which become infinite), no integer beyond the double
    range, and no nesting deeper than ``max_depth`` (``data`` itself is level 1).
    """
    stack: list[tuple[Any, int]] = [(data, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        value, depth = pop()
        if isinstance(value, dict):
            children: Iterable = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > max_depth:
            return f"nests deeper than {max_depth} levels"
        for child in children:
            if isinstance(child, (dict, list)):
                push((child, depth + 1))
            elif isinstance(child, float):
                if not math.isfinite(child):
                    return "holds NaN, Infinity or a number too large for JSON"
            elif isinstance(child, int) and not isinstance(child, bool) and abs(child) > _DOUBLE_MAX:
                return "holds a number too large for JSON"
    return None


def _as_uuid(value: Any) -> UUID:
    """A UUID from a UUID or its string form (module results may use either)."""
    return value if isinstance(value, UUID) else UUID(str(value))


async def _read_object(request: web.Request, max_size: int, timeout: float | None = None) -> dict:
    """The request body as a JSON object, or ``GridError("bad_request")`` saying what is wrong.

    The whole body must arrive within ``timeout`` seconds (a client that announces more than
    it sends, or trickles it, does not hold a handler forever).
    """
    if request.content_length is not None and request.content_length > max_size:
        raise GridError("bad_request", f"The body is larger than {max_size} bytes.")
    chunks, total = [], 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.read(65536):
                total += len(chunk)
                if total > max_size:
                    raise GridError("bad_request", f"The body is larger than {max_size} bytes.")
                chunks.append(chunk)
    except TimeoutError:
        raise GridError("bad_request", f"The body did not arrive within {timeout:g} seconds.") from None
    except ConnectionError:
        raise GridError("bad_request", "The body could not be read.") from None
    except (web_protocol.RequestPayloadError, HttpProcessingError):  # bad chunking or compression
        raise GridError("bad_request", "The body could not be decoded (transfer or content encoding).") from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise GridError("bad_request", "The body must be a JSON object.")
    try:
        body = json_loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError, OverflowError):
        raise GridError("bad_request", "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise GridError("bad_request", "The body must be a JSON object.")
    return body


def _field(body: dict, name: str, kind: type | tuple, required: bool = True, default: Any = None) -> Any:
    """One typed field of a request body; bools are never accepted as integers."""
    if name not in body:
        if required:
            raise GridError("bad_request", f"The field '{name}' is required.")
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        value = None  # reject: True is not a width
    if not isinstance(value, kind):
        names = {str: "a string", int: "an integer", dict: "a JSON object"}
        want = names.get(kind, getattr(kind, "__name__", str(kind))) if not isinstance(kind, tuple) else "a valid value"
        raise GridError("bad_request", f"The field '{name}' must be {want}.")
    return value


def ws_text_frame(payload: bytes) -> bytes:
    """A complete, unmasked WebSocket text frame (RFC 6455, server to client).

    A tick's frame is built once per zone and written to every subscriber's transport as is.
    """
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


_SECRET_RE = re.compile(r"([?&][^=&\s'\"]*=|bearer(?:\s|\\t)+)[^&\s'\"]*", re.IGNORECASE)


def _redact(text: str) -> str:
    """``text`` with every query value (``?token=...``, however its name is escaped) and
    ``Bearer ...`` replaced, for logs and error messages that quote a piece of a request."""
    return _SECRET_RE.sub(r"\1[redacted]", text)


def _http_answer(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response with the JSON envelope, closing the connection: for answers
    written straight to a transport, before any request has been read."""
    body = json_dumps({"error": code, "message": message}).encode("utf-8")
    reason = {429: "Too Many Requests"}.get(status, "Error")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii") + body


_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 417: "expectation_failed"}


def _http_error_response(exc: web.HTTPException) -> web.Response:
    """An aiohttp HTTP error (routing, size limits, expectations) as the contract's envelope."""
    status = 400 if exc.status == 413 else exc.status
    allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None  # a 405 must say (RFC 9110)
    return _error_response(status, _HTTP_ERROR_CODES.get(exc.status, "bad_request"), exc.reason or "Bad request.",
                           allow)


# =============================================================================
# Public types and game protocol
# =============================================================================


@dataclass(slots=True, eq=False, frozen=True)
class Entity:
    """A thing in a zone. The registry owns it; modules read it and cannot change it.

    It covers the cells ``[x, x+width) x [y, y+height)``; a 0x0 entity is a point at (x, y).
    ``created_at`` and ``updated_at`` are seconds since the epoch. Assigning a field raises
    (``dataclasses.FrozenInstanceError``) and ``metadata`` is read-only all the way down: a
    module changes an entity only by returning an ``EntityUpdate``, so a tick's outcome
    depends on nothing but its inputs (what replaying a tick relies on). Only the registry
    sets fields, through ``_set_fields``.
    """

    id: UUID
    zone_id: UUID
    x: int
    y: int
    width: int = 0
    height: int = 0
    metadata: dict = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.metadata, _FrozenDict):
            _ENTITY_SETTERS["metadata"](self, _freeze(self.metadata))

    def to_json(self) -> dict:
        return {"id": str(self.id), "zone_id": str(self.zone_id), "x": self.x, "y": self.y,
                "width": self.width, "height": self.height, "metadata": self.metadata,
                "created_at": _iso(self.created_at), "updated_at": _iso(self.updated_at)}


#: Each field's slot setter: the registry changes entities through these, not ``setattr``.
_ENTITY_SETTERS: dict[str, Callable[[Entity, Any], None]] = {
    name: Entity.__dict__[name].__set__ for name in Entity.__dataclass_fields__}


def _set_fields(e: Entity, **values: Any) -> None:
    """The registry's way to change an entity (its fields are read-only to everyone else)."""
    for name, value in values.items():
        _ENTITY_SETTERS[name](e, value)


class _ReadOnly:
    """What read-only metadata containers share: every change refuses; copies (``copy``,
    ``copy.deepcopy``, pickling) are the plain, changeable type."""

    __slots__ = ()
    _plain: type = dict

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("entity metadata is read-only: return an EntityUpdate with new metadata "
                        "(copy.deepcopy gives a copy you may change)")

    def __copy__(self) -> Any:
        return self._plain(self)

    def __deepcopy__(self, memo: dict) -> Any:
        return _thaw(self)

    def __reduce__(self) -> Any:
        return (self._plain, (_thaw(self),))


class _FrozenDict(_ReadOnly, dict):
    """Entity metadata: a dict that cannot be changed in place."""

    __slots__ = ()
    _plain = dict
    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _ReadOnly._refuse


class _FrozenList(_ReadOnly, list):
    """A list inside entity metadata: read-only like ``_FrozenDict``."""

    __slots__ = ()
    _plain = list
    __setitem__ = __delitem__ = append = extend = insert = pop = remove = clear = sort = reverse = _ReadOnly._refuse
    __iadd__ = __imul__ = _ReadOnly._refuse


def _freeze(value: Any) -> Any:
    """A read-only deep copy of JSON-like metadata (dicts and lists become frozen ones)."""
    if isinstance(value, dict):
        return _FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return _FrozenList(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """A plain, changeable deep copy of frozen metadata."""
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_thaw(v) for v in value]
    return value


@dataclass(slots=True)
class Intent:
    """What a player asked for, queued for the zone's next tick in arrival order.

    ``data`` is the client's JSON object as sent (read-only, like entity metadata);
    ``received_at`` is seconds since the epoch; ``seq`` increases with every intent the
    server accepts. All of it is journaled with the tick, for replay.
    """

    player_id: UUID
    zone_id: UUID
    data: dict
    received_at: float
    seq: int


@dataclass(slots=True)
class EntityCreate:
    x: int
    y: int
    width: int = 0
    height: int = 0
    metadata: dict = field(default_factory=dict)
    id: UUID | None = None  # None: the server assigns one


@dataclass(slots=True)
class EntityUpdate:
    """Fields left at None stay as they are; ``metadata`` replaces the whole object."""

    id: UUID
    x: int | None = None
    y: int | None = None
    width: int | None = None
    height: int | None = None
    metadata: dict | None = None


@dataclass(slots=True)
class EntityMoves:
    """Many entities moved at once: entity ``ids[i]`` goes to ``(xs[i], ys[i])``.

    The bulk form of ``EntityUpdate(id, x, y)``, for a module that moves many entities a
    tick: three sequences of one item per entity instead of an object per entity, checked in
    one pass and applied with the rest of its ``TickResult``, all or nothing. Width, height
    and metadata stay as they are. ``ids`` is a list or tuple of entity ids; ``xs`` and ``ys``
    are lists, tuples or ``array.array`` of an integer type code, as long as ``ids``.

    A result whose moves break a rule is rejected whole, the error naming the first offending
    entry (``entity_moves.ids[i]``, ``entity_moves.xs[i]``...):

    * each id is an entity of the zone as the tick found it (a UUID, or its text); not one
      the same result creates (give that one its place in its ``EntityCreate``);
    * each id at most once, and not also in the result's ``entity_updates`` or
      ``entity_deletes`` (one change per entity: put a move and a resize in one
      ``EntityUpdate``);
    * each x and y an ``int`` (not a bool), and the entity, with its width and height, inside
      the zone (as for an ``EntityUpdate``).
    """

    ids: Sequence[UUID] = field(default_factory=list)
    xs: Sequence[int] = field(default_factory=list)
    ys: Sequence[int] = field(default_factory=list)


@dataclass
class TickResult:
    """A zone's changes for one tick, checked as a whole before any is applied.

    ``entity_moves`` (an ``EntityMoves``) moves many entities at once; it may come with
    creates, updates and deletes of other entities.
    """

    entity_creates: list[EntityCreate] = field(default_factory=list)
    entity_updates: list[EntityUpdate] = field(default_factory=list)
    entity_deletes: list[UUID] = field(default_factory=list)
    broadcast_state: dict = field(default_factory=dict)
    entity_moves: EntityMoves | None = None


@dataclass
class Zone:
    """A zone's record; its entities live in the world's registry."""

    id: UUID
    name: str
    width: int
    height: int
    metadata: dict = field(default_factory=dict)
    created_at: _dt.datetime = field(default_factory=_now)
    updated_at: _dt.datetime = field(default_factory=_now)


class GameLogicModule(Protocol):
    """What a game module implements.

    ``on_tick`` runs in the server's game thread, never on the event loop, so a slow module
    cannot stall the network; it must not keep references to ``entities`` past the call. It
    returns a ``TickResult`` (None changes nothing); a tick that moves many entities hands
    their moves in as one ``EntityMoves`` (three lists) rather than an ``EntityUpdate`` each.
    Optional hooks: ``on_player_join(zone_id, player_id)`` and ``on_player_leave(zone_id,
    player_id)`` (each may return a ``TickResult``, applied with the tick's own; each join
    and leave is delivered exactly once, with a tick that succeeds), ``on_zone_deleted(zone_id)``
    (after a zone is deleted) and ``on_reload(previous)`` (after a hot reload's ``on_init``:
    ``previous`` is the old module or instance, to carry its memory over).
    """

    def on_init(self, framework: "FrameworkAPI") -> None: ...

    def on_tick(self, zone_id: UUID, entities: list[Entity], intents: list[Intent],
                tick_number: int) -> TickResult: ...

    def get_player_state(self, zone_id: UUID, player_id: UUID, full_state: dict) -> dict: ...


_REQUIRED_METHODS = ("on_init", "on_tick", "get_player_state")


def _missing_methods(game: Any) -> str:
    """The required methods ``game`` lacks, comma-separated ("" when it has them all)."""
    return ", ".join(m for m in _REQUIRED_METHODS if not callable(getattr(game, m, None)))


# =============================================================================
# Spatial index
# =============================================================================

#: Cells per side of one spatial bucket. A query touches only the buckets its area
#: crosses, so its cost follows the entities near it, not the size of the zone.
BUCKET_SIZE = 16
#: An entity (or query) over more buckets than this is "large": it is kept in one list that
#: every query checks, rather than in each bucket it crosses (memory stays one entry).
LARGE_BUCKETS = 64
#: The bucket key of large entities (bucket coordinates never reach 2**62).
LARGE = -1


_SET_X, _SET_Y, _SET_W, _SET_H = (_ENTITY_SETTERS[n] for n in ("x", "y", "width", "height"))


def _each(fn: Callable[..., Any], *columns: Iterable[Any]) -> None:
    """Call ``fn`` on each row of ``columns`` (``fn(a[i], b[i])``...), in a loop that runs in C."""
    collections.deque(map(fn, *columns), 0)


def _set_rect(e: Entity, x: int, y: int, w: int, h: int) -> None:
    """Set an entity's rectangle (only the fields that change: this runs for every move)."""
    if e.x != x:
        _SET_X(e, x)
    if e.y != y:
        _SET_Y(e, y)
    if e.width != w:
        _SET_W(e, w)
    if e.height != h:
        _SET_H(e, h)


class SpatialIndex:
    """A uniform grid of buckets over one zone's entities.

    A sized entity sits in every bucket its rectangle crosses; an entity with no area sits in
    the bucket of its point. Buckets are keyed by one integer (``bx << 32 | by``), which
    hashes faster than a tuple. Pure and synchronous: the world calls it under its lock.
    """

    __slots__ = ("_buckets", "_size", "_big")

    def __init__(self, bucket_size: int = BUCKET_SIZE):
        self._buckets: dict[int, set[Entity]] = {}
        self._size = bucket_size
        self._big: set[Entity] = set()  # the entities larger than one cell

    def cells_only(self) -> bool:
        """Every entity in the index is a point or a single cell (none is wider or taller than 1)."""
        return not self._big

    def _keys(self, x: int, y: int, w: int, h: int) -> list[int]:
        """The bucket keys of a rectangle (of its point when it has no area), clipped at 0.

        A rectangle over more than ``LARGE_BUCKETS`` buckets has the one key ``LARGE``: such
        entities are few and are checked by every query, so one 10000x10000 entity costs one
        set entry instead of hundreds of thousands of buckets.
        """
        s = self._size
        if w == 0 or h == 0:
            return [(x // s) << 32 | (y // s)] if x >= 0 and y >= 0 else []
        bx0, by0, bx1, by1 = max(x, 0) // s, max(y, 0) // s, (x + w - 1) // s, (y + h - 1) // s
        if bx0 == bx1 and by0 == by1:
            return [bx0 << 32 | by0]
        if (bx1 - bx0 + 1) * (by1 - by0 + 1) > LARGE_BUCKETS:
            return [LARGE]
        return [bx << 32 | by for bx in range(bx0, bx1 + 1) for by in range(by0, by1 + 1)]

    def insert(self, e: Entity) -> None:
        buckets = self._buckets
        for key in self._keys(e.x, e.y, e.width, e.height):
            bucket = buckets.get(key)
            if bucket is None:
                buckets[key] = bucket = set()
            bucket.add(e)
        if e.width > 1 or e.height > 1:
            self._big.add(e)

    def remove(self, e: Entity) -> None:
        self._remove_keys(e, self._keys(e.x, e.y, e.width, e.height))
        if self._big:
            self._big.discard(e)

    def _remove_keys(self, e: Entity, keys: list[int]) -> None:
        buckets = self._buckets
        for key in keys:
            bucket = buckets.get(key)
            if bucket is not None:
                bucket.discard(e)
                if not bucket:
                    del buckets[key]

    def move(self, e: Entity, x: int, y: int, w: int, h: int) -> None:
        """Set the entity's rectangle, re-bucketing it only when its buckets change."""
        if e.width <= 1 and e.height <= 1 and w <= 1 and h <= 1:  # points and single cells: one bucket
            s = self._size
            old_key, new_key = (e.x // s) << 32 | (e.y // s), (x // s) << 32 | (y // s)
            _set_rect(e, x, y, w, h)
            if old_key != new_key:
                buckets = self._buckets
                old_bucket = buckets[old_key]
                old_bucket.discard(e)
                if not old_bucket:
                    del buckets[old_key]
                new_bucket = buckets.get(new_key)
                if new_bucket is None:
                    buckets[new_key] = new_bucket = set()
                new_bucket.add(e)
            return
        old = self._keys(e.x, e.y, e.width, e.height)
        new = self._keys(x, y, w, h)
        if old != new:
            self._remove_keys(e, old)
        _set_rect(e, x, y, w, h)
        if old != new:
            self.insert(e)
        if w <= 1 and h <= 1:
            self._big.discard(e)
        else:
            self._big.add(e)

    def move_many(self, es: list[Entity], xs: Sequence[int], ys: Sequence[int], cells: bool = False) -> None:
        """``move`` for many entities at once, sizes unchanged: ``es[i]`` goes to ``(xs[i], ys[i])``,
        each entity at most once. All or nothing: a failure half way (out of memory) puts
        back what moved before it goes on.

        ``cells`` says that every entity is a point or a single cell (the caller knows: it
        checked their sizes): then only those whose bucket changes are re-bucketed (a step
        of one cell crosses a bucket edge once in ``BUCKET_SIZE``), and the positions are set
        in one pass at the end.
        """
        if not cells:
            done: list[tuple[Entity, int, int]] = []
            try:
                for e, x, y in zip(es, xs, ys):
                    done.append((e, e.x, e.y))
                    self.move(e, x, y, e.width, e.height)
            except BaseException:
                for e, x, y in reversed(done):
                    self.move(e, x, y, e.width, e.height)
                raise
            return
        s, buckets = self._size, self._buckets
        if s & (s - 1):
            across = [(e, x, y) for e, x, y in zip(es, xs, ys) if e.x // s != x // s or e.y // s != y // s]
        else:  # a power of two: the same bucket when no bit worth s or more differs (nothing is at x < 0)
            across = [(e, x, y) for e, x, y in zip(es, xs, ys) if (e.x ^ x) | (e.y ^ y) >= s]
        keys = [(e, (e.x // s) << 32 | (e.y // s), (x // s) << 32 | (y // s)) for e, x, y in across]
        try:
            for e, old_key, new_key in keys:
                new_bucket = buckets.get(new_key)
                if new_bucket is None:
                    buckets[new_key] = new_bucket = set()
                new_bucket.add(e)
                old_bucket = buckets[old_key]
                old_bucket.discard(e)
                if not old_bucket:
                    del buckets[old_key]
        except BaseException:
            for e, old_key, new_key in keys:  # the positions are still the old ones
                buckets.setdefault(old_key, set()).add(e)
                new_bucket = buckets.get(new_key)
                if new_bucket is not None:
                    new_bucket.discard(e)
                    if not new_bucket:
                        del buckets[new_key]
            raise
        _each(_SET_X, es, xs)
        _each(_SET_Y, es, ys)

    def _candidates(self, x: int, y: int, w: int, h: int) -> Iterable[Entity]:
        """Every entity in the buckets the rectangle crosses (and every large one), each once.

        A query over more buckets than the index holds walks the buckets it holds instead.
        """
        buckets = self._buckets
        large = buckets.get(LARGE)
        s = self._size
        bx0, by0, bx1, by1 = max(x, 0) // s, max(y, 0) // s, (x + w - 1) // s, (y + h - 1) // s
        if bx0 == bx1 and by0 == by1 and not large:
            return buckets.get(bx0 << 32 | by0, ())
        found: set[Entity] = set(large) if large else set()
        if (bx1 - bx0 + 1) * (by1 - by0 + 1) > len(buckets):
            for key, bucket in buckets.items():
                if key != LARGE and bx0 <= key >> 32 <= bx1 and by0 <= key & 0xFFFFFFFF <= by1:
                    found |= bucket
            return found
        for bx in range(bx0, bx1 + 1):
            for by in range(by0, by1 + 1):
                cell = buckets.get(bx << 32 | by)
                if cell:
                    found |= cell
        return found

    def query_area(self, x: int, y: int, w: int, h: int) -> list[Entity]:
        """Entities whose rectangle shares area with ``[x, x+w) x [y, y+h)``, and points inside it."""
        if w <= 0 or h <= 0:
            return []
        x1, y1 = x + w, y + h
        return [e for e in self._candidates(x, y, w, h)
                if (x <= e.x < x1 and y <= e.y < y1 if e.width == 0 or e.height == 0
                    else e.x < x1 and x < e.x + e.width and e.y < y1 and y < e.y + e.height)]

    def query_overlap(self, x: int, y: int, w: int, h: int, exclude: Entity | None = None) -> list[Entity]:
        """Sized entities whose rectangle shares area with the given one (touching edges do not).

        A rectangle with no area overlaps nothing.
        """
        if w <= 0 or h <= 0:
            return []
        x1, y1 = x + w, y + h
        return [e for e in self._candidates(x, y, w, h)
                if e is not exclude and e.width > 0 and e.height > 0
                and e.x < x1 and x < e.x + e.width and e.y < y1 and y < e.y + e.height]


# =============================================================================
# World state
# =============================================================================


class TickRejected(Exception):
    """A zone's tick result (or the module call itself) failed; nothing of it was applied."""


#: What the flush saves on a zone's row: the tick its saved state is at, and the players its
#: module knows as joined (ids as text, sorted).
ZoneMark = tuple[int, tuple[str, ...]]


@dataclass(eq=False)
class _ZoneState:
    """Everything the server keeps for one live zone."""

    zone: Zone
    entities: dict[UUID, Entity] = field(default_factory=dict)
    index: SpatialIndex = field(default_factory=SpatialIndex)
    intents: list[Intent] = field(default_factory=list)
    journaled: list[str] = field(default_factory=list)  # each intent as the journal writes it, made at the door
    intent_counts: dict[UUID, int] = field(default_factory=dict)  # per player, for the next tick
    limited: set = field(default_factory=set)  # connections told ``rate_limited`` for the next tick
    events: dict[UUID, str] = field(default_factory=dict)  # player -> "join"|"leave", net, in order
    ticks: int = 0                      # ticks this zone has processed
    errors: int = 0
    last_error: dict | None = None
    busy_since: float | None = None     # monotonic start of a module call still running
    skipped: int = 0                    # ticks skipped while its module call was still running
    tick_number: int = 0                # the last tick the zone ran (its world is as that tick left it)
    last_tick_ms: float = 0.0
    #: the players the module was told joined and not yet told left (saved by the flush, so
    #: players who do not come back after a restart are delivered as leaving)
    joined: set[UUID] = field(default_factory=set)
    failing: int = 0                    # ticks lost in a row (0: the last tick succeeded)
    epoch: int = 0                      # cluster: the fencing number this node holds the zone at
    leaving: bool = False               # cluster: being handed to another node; no more ticks here


def _queue_event(zs: _ZoneState, player_id: UUID, kind: str) -> None:
    """Queue a join or leave for the zone's next tick. A join and a leave of one player
    before that tick cancel out: the module sees neither (a player who left and came back
    keeps what the module gave them; one who came and went never gets an avatar). So a
    zone holds at most one pending event per player."""
    pending = zs.events.get(player_id)
    if pending is not None and pending != kind:
        del zs.events[player_id]
    else:
        zs.events[player_id] = kind

def _requeue_events(zs: _ZoneState, events: list[tuple[str, UUID]]) -> None:
    """Put the events of a tick that applied nothing back before those queued since, for the
    zone's next tick (netted as ``_queue_event`` does): the module sees every join and leave
    exactly once, with a tick that succeeds."""
    pending, zs.events = zs.events, {}
    for kind, player_id in events:
        _queue_event(zs, player_id, kind)
    for player_id, kind in pending.items():
        _queue_event(zs, player_id, kind)


def _check_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TickRejected(f"{what} must be an integer, got {value!r}")
    return value


def _in_bounds(zone: Zone, x: int, y: int, w: int, h: int) -> bool:
    if w < 0 or h < 0 or x < 0 or y < 0:
        return False
    if w == 0 or h == 0:
        return x < zone.width and y < zone.height and x + w <= zone.width and y + h <= zone.height
    return x + w <= zone.width and y + h <= zone.height


def _check_metadata(meta: Any, change: Any) -> None:
    """Metadata must be a JSON object the database and clients can take as it is (and a
    database must be able to store and load it back: see ``_json_problem``)."""
    if not isinstance(meta, dict):
        raise TickRejected(f"metadata must be a dict in {_short_repr(change)}")
    problem = _json_problem(meta)
    if problem is not None:
        raise TickRejected(f"metadata {problem} in {_short_repr(change)}")


def _short_repr(value: Any) -> str:
    """A repr for error messages that neither recurses without end nor runs to megabytes."""
    return _REPR.repr(value)


class _ShortRepr(reprlib.Repr):
    def repr_instance(self, obj: Any, level: int) -> str:
        try:
            text = repr(obj)
        except Exception:  # noqa: BLE001 - e.g. RecursionError on metadata nested too deep
            return f"{type(obj).__name__}(id={getattr(obj, 'id', '?')}, ...)"
        return text if len(text) <= self.maxother else text[:self.maxother - 3] + "..."


_REPR = _ShortRepr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxdict, _REPR.maxlist = 4, 80, 200, 8, 8


def _as_list(value: Any, what: str) -> list | tuple:
    if isinstance(value, (list, tuple)):
        return value
    raise TickRejected(f"{what} must be a list, got {type(value).__name__}")


#: ``array.array`` type codes whose items are ints.
_INT_CODES = frozenset("bBhHiIlLqQ")
_INT = frozenset({int})
_WIDTH, _HEIGHT = operator.attrgetter("width"), operator.attrgetter("height")


def _moves_columns(moves: Any) -> tuple[Sequence, Sequence, Sequence]:
    """``entity_moves``'s ids, xs and ys, once their kinds and lengths are right."""
    if not isinstance(moves, EntityMoves):
        raise TickRejected(f"entity_moves must be an EntityMoves, got {type(moves).__name__}")
    columns = moves.ids, moves.xs, moves.ys
    for name, column in zip(("ids", "xs", "ys"), columns):
        if not isinstance(column, (list, tuple)) and not (name != "ids" and isinstance(column, array.array)):
            kinds = "a list or tuple" if name == "ids" else "a list, tuple or array.array"
            raise TickRejected(f"entity_moves.{name} must be {kinds}, got {type(column).__name__}")
    if not len(moves.ids) == len(moves.xs) == len(moves.ys):
        raise TickRejected(f"entity_moves has {len(moves.ids)} ids, {len(moves.xs)} xs and {len(moves.ys)} ys: "
                           f"each id needs one x and one y")
    return columns


def _all_ints(column: Sequence) -> bool:
    """Every item is an ``int`` (an array of an integer type code holds nothing else)."""
    if isinstance(column, array.array):
        return column.typecode in _INT_CODES
    return _INT.issuperset(map(type, column))


class _Moves(NamedTuple):
    """Checked ``entity_moves``: ``entities[i]`` goes to ``(xs[i], ys[i])``."""

    entities: list[Entity]
    xs: Sequence[int]
    ys: Sequence[int]
    moved: set[Entity]   # the same entities, as a set
    cells: bool          # every one is a point or a single cell


class EntityRow(NamedTuple):
    """One changed entity as a flush writes it: its values taken together under the world's
    lock (metadata objects are replaced, never mutated, by the registry)."""

    id: UUID
    entity: Entity
    x: int
    y: int
    width: int
    height: int
    metadata: dict
    updated_at: float


def _entity_rows(entities: Iterable[Entity]) -> list[EntityRow]:
    """The entities' rows as they are now (made by the plain tuple constructor, which is faster
    than ``EntityRow(...)``: a flush takes 100,000 of them under the world's lock)."""
    new = tuple.__new__
    return [new(EntityRow, (e.id, e, e.x, e.y, e.width, e.height, e.metadata, e.updated_at)) for e in entities]


class World:
    """The authority while the server runs: zones, their entities and what changed.

    Every mutation goes through a method here under ``lock`` (the game thread applies tick
    results while the event loop serves requests). ``dirty`` (entities, hashed by identity)
    and ``deleted`` (ids) are what the next persistence flush must write or remove.
    """

    def __init__(self, max_entities_per_zone: int = 200_000) -> None:
        self.lock = threading.RLock()
        self.max_entities = max_entities_per_zone
        self.zones: dict[UUID, _ZoneState] = {}
        self.entity_zone: dict[UUID, _ZoneState] = {}
        self.dirty: set[Entity] = set()
        self.deleted: set[UUID] = set()

    # -- zones ---------------------------------------------------------------------------
    def add_zone(self, zone: Zone, entities: Iterable[Entity] = (), tick_number: int = 0,
                 epoch: int = 0) -> _ZoneState:
        with self.lock:
            zs = _ZoneState(zone, tick_number=tick_number, epoch=epoch)
            for e in entities:
                zs.entities[e.id] = e
                zs.index.insert(e)
                self.entity_zone[e.id] = zs
            self.zones[zone.id] = zs
            return zs

    def load(self, zones: list[Zone], entities: list[Entity], marks: dict[UUID, ZoneMark]) -> None:
        """Add the saved world (``Store.load``): each zone with its entities, at its tick, with
        the players its module knew as joined."""
        by_zone: dict[UUID, list[Entity]] = collections.defaultdict(list)
        for e in entities:
            by_zone[e.zone_id].append(e)
        with self.lock:
            for zone in zones:
                tick, joined = marks.get(zone.id, (0, ()))
                self.add_zone(zone, by_zone.get(zone.id, ()), tick).joined = {UUID(p) for p in joined}

    def adopt_zone(self, zs: _ZoneState, dirty: set[Entity], deleted: set[UUID]) -> None:
        """Put in a zone built in a world of its own (a cluster node taking it over replays
        its journal there first), with the changes that replay made, for the next flush."""
        with self.lock:
            self.zones[zs.zone.id] = zs
            for eid in zs.entities:
                self.entity_zone[eid] = zs
            self.dirty |= dirty
            self.deleted |= deleted

    def remove_zone(self, zone_id: UUID) -> _ZoneState | None:
        """Drop a zone and its entities from memory (the database deleted them already)."""
        with self.lock:
            zs = self.zones.pop(zone_id, None)
            if zs is not None:
                for eid, e in zs.entities.items():
                    self.entity_zone.pop(eid, None)
                    self.dirty.discard(e)
                    self.deleted.discard(eid)
            return zs

    def reset_zone(self, zs: _ZoneState, entities: list[Entity], tick_number: int) -> None:
        """Put the zone back to ``entities`` as of ``tick_number`` (a rewind's start): what it
        holds now goes, and the flush writes the difference."""
        with self.lock:
            for eid, e in list(zs.entities.items()):
                zs.index.remove(e)
                del self.entity_zone[eid]
                self.dirty.discard(e)
                self.deleted.add(eid)
            zs.entities.clear()
            for e in entities:
                if e.id in self.entity_zone:  # another zone has it now: it stays there
                    continue
                zs.entities[e.id] = e
                zs.index.insert(e)
                self.entity_zone[e.id] = zs
                self.dirty.add(e)
                self.deleted.discard(e.id)
            zs.tick_number = tick_number

    def restore_zone(self, zs: _ZoneState) -> None:
        """Put back a zone taken out by ``remove_zone`` (its deletion failed); its entities
        are all written again by the next flush. An entity whose id another zone took
        meanwhile stays there."""
        with self.lock:
            self.zones[zs.zone.id] = zs
            for eid, e in list(zs.entities.items()):
                if eid in self.entity_zone:
                    del zs.entities[eid]
                    zs.index.remove(e)
                    continue
                self.entity_zone[eid] = zs
                self.dirty.add(e)

    def zone_by_name(self, name: str) -> _ZoneState | None:
        for zs in list(self.zones.values()):
            if zs.zone.name == name:
                return zs
        return None

    # -- entity registry -----------------------------------------------------------------
    def get_entity(self, entity_id: UUID) -> Entity | None:
        zs = self.entity_zone.get(entity_id)
        return None if zs is None else zs.entities.get(entity_id)

    def zone_entities_json(self, zs: _ZoneState) -> list[dict]:
        """A zone's entities as JSON, as of one moment (taken under the lock)."""
        with self.lock:
            return [e.to_json() for e in zs.entities.values()]

    def entity_json(self, entity_id: UUID) -> dict | None:
        with self.lock:
            e = self.get_entity(entity_id)
            return None if e is None else e.to_json()

    def entities_of(self, zone_id: UUID) -> list[Entity]:
        zs = self.zones.get(zone_id)
        return [] if zs is None else list(zs.entities.values())

    def query_area(self, zone_id: UUID, x: int, y: int, w: int, h: int) -> list[Entity]:
        with self.lock:
            zs = self.zones.get(zone_id)
            return [] if zs is None else zs.index.query_area(x, y, w, h)

    def query_overlap(self, zone_id: UUID, x: int, y: int, w: int, h: int,
                      exclude: UUID | None = None) -> list[Entity]:
        with self.lock:
            zs = self.zones.get(zone_id)
            if zs is None:
                return []
            skip = zs.entities.get(exclude) if exclude is not None else None
            return zs.index.query_overlap(x, y, w, h, skip)

    # -- tick results --------------------------------------------------------------------
    def validate(self, zs: _ZoneState, result: Any,
                 new_id: Callable[[], UUID] = uuid.uuid4) -> tuple[list, list, _Moves | None, list]:
        """Check a zone's whole ``TickResult`` against the zone; raise ``TickRejected`` naming
        the first offending change. Returns normalized (creates, updates, moves, deletes).

        Changes are checked creates, then updates, then moves, then deletes; an update may
        touch an entity created in the same result, a move may not, nor one that an update or
        a delete of the result touches (so the moves, applied last, need no undo).
        """
        if result is None:
            return [], [], None, []
        if not isinstance(result, TickResult):
            raise TickRejected(f"on_tick returned {type(result).__name__}, not a TickResult")
        if not isinstance(result.broadcast_state, dict):
            raise TickRejected(f"broadcast_state must be a dict, got {type(result.broadcast_state).__name__}")
        zone = zs.zone
        width, height = zone.width, zone.height
        entities = zs.entities
        born: dict[UUID, tuple[int, int, int, int]] = {}  # rects of entities created by this result

        creates = []
        for c in _as_list(result.entity_creates, "entity_creates"):
            if not isinstance(c, EntityCreate):
                raise TickRejected(f"entity_creates holds {type(c).__name__}, not EntityCreate")
            x, y = _check_int(c.x, "create x"), _check_int(c.y, "create y")
            w, h = _check_int(c.width, "create width"), _check_int(c.height, "create height")
            if w < 0 or h < 0:
                raise TickRejected(f"negative size in {c!r}")
            if not _in_bounds(zone, x, y, w, h):
                raise TickRejected(f"out of bounds of the {width}x{height} zone: {c!r}")
            _check_metadata(c.metadata, c)
            try:
                eid = new_id() if c.id is None else _as_uuid(c.id)
            except ValueError:
                raise TickRejected(f"invalid id in {c!r}") from None
            if eid in born or eid in self.entity_zone:
                raise TickRejected(f"an entity with id {eid} exists already")
            born[eid] = (x, y, w, h)
            creates.append((eid, x, y, w, h, _freeze(c.metadata)))

        updates = self._validate_updates(zs, _as_list(result.entity_updates, "entity_updates"), born, False)
        if len({id(t[0]) for t in updates}) != len(updates):
            # An entity updated twice: check again, each update against the one before it.
            updates = self._validate_updates(zs, result.entity_updates, born, True)

        moves = None if result.entity_moves is None else self._validate_moves(zs, result.entity_moves, born)
        if moves is not None and updates:
            for e, *_ in updates:
                if e in moves.moved:
                    raise TickRejected(f"entity_moves.ids[{moves.entities.index(e)}]: entity {e.id} is also in "
                                       f"entity_updates (one change per entity: move it in its EntityUpdate)")

        deletes = []
        gone: set[UUID] = set()
        for d in _as_list(result.entity_deletes, "entity_deletes"):
            try:
                eid = _as_uuid(d)
            except ValueError:
                raise TickRejected(f"invalid id {d!r} in entity_deletes") from None
            if eid in gone or (eid not in entities and eid not in born):
                raise TickRejected(f"delete of unknown entity {eid}")
            if moves is not None and entities.get(eid) in moves.moved:
                raise TickRejected(f"entity_moves.ids[{moves.entities.index(entities[eid])}]: entity {eid} is "
                                   f"also in entity_deletes")
            gone.add(eid)
            deletes.append(eid)
        if creates and len(entities) + len(creates) - len(deletes) > self.max_entities:
            raise TickRejected(f"the zone would hold {len(entities) + len(creates) - len(deletes)} entities, "
                               f"more than [tick] max_entities_per_zone ({self.max_entities})")
        return creates, updates, moves, deletes

    def _validate_moves(self, zs: _ZoneState, entity_moves: Any, born: dict) -> _Moves | None:
        """Check ``entity_moves`` (see ``EntityMoves``) in one pass of loops that run in C;
        only a result that fails it is walked entry by entry, to name the first offending one
        (or to pass moves the quick bound, which takes the widest entity at the largest x, is
        too strict for). None when there are no moves."""
        ids, xs, ys = _moves_columns(entity_moves)
        if not ids:
            return None
        entities = zs.entities
        width, height = zs.zone.width, zs.zone.height
        es: list[Any]
        try:
            if len(ids) == len(entities) and list(entities) == ids:
                es = list(entities.values())  # all of them, in the order on_tick had them: no lookups
            else:
                es = list(map(entities.get, ids))
        except TypeError:  # an id that cannot be hashed
            es = [None]
        moved = set(es)
        fits = None not in moved and len(moved) == len(es) and _all_ints(xs) and _all_ints(ys)
        if fits:
            # x + max(w, 1) <= width keeps an entity inside (a point too: x < width)
            if zs.index.cells_only():
                widest = tallest = 1
            else:
                widest, tallest = max(1, max(map(_WIDTH, es))), max(1, max(map(_HEIGHT, es)))
            fits = min(xs) >= 0 and min(ys) >= 0 and max(xs) + widest <= width and max(ys) + tallest <= height
        if not fits:
            es = self._check_moves_one_by_one(zs, ids, xs, ys, born)
            moved = set(es)
            widest, tallest = max(map(_WIDTH, es)), max(map(_HEIGHT, es))
        return _Moves(es, xs, ys, moved, widest <= 1 and tallest <= 1)

    @staticmethod
    def _check_moves_one_by_one(zs: _ZoneState, ids: Sequence, xs: Sequence, ys: Sequence,
                                born: dict) -> list[Entity]:
        """Each move's entity, after checking the moves in order: ``TickRejected`` names the
        first entry that breaks a rule."""
        entities = zs.entities
        width, height = zs.zone.width, zs.zone.height
        first_at: dict[Entity, int] = {}
        es = []
        for i, (eid, x, y) in enumerate(zip(ids, xs, ys)):
            try:
                eid = _as_uuid(eid)
            except ValueError:
                raise TickRejected(f"entity_moves.ids[{i}]: invalid id {_short_repr(eid)}") from None
            e = entities.get(eid)
            if e is None:
                why = " (created by this same result: give it its place in its EntityCreate)" if eid in born else ""
                raise TickRejected(f"entity_moves.ids[{i}]: move of unknown entity {eid}{why}")
            if first_at.setdefault(e, i) != i:
                raise TickRejected(f"entity_moves.ids[{i}]: entity {eid} is moved twice "
                                   f"(first at entity_moves.ids[{first_at[e]}])")
            x, y = _check_int(x, f"entity_moves.xs[{i}]"), _check_int(y, f"entity_moves.ys[{i}]")
            w, h = e.width, e.height
            if not (0 <= x and 0 <= y and x + w <= width and y + h <= height and x < width and y < height):
                raise TickRejected(f"entity_moves[{i}]: out of bounds of the {width}x{height} zone: "
                                   f"entity {eid} ({w}x{h}) moved to ({x}, {y})")
            es.append(e)
        return es

    def _validate_updates(self, zs: _ZoneState, changes: list | tuple, born: dict, repeated: bool) -> list[tuple]:
        """Check updates; ``repeated`` follows an entity through several updates of one result.

        Returns ``(entity or None, id, x, y, w, h, metadata)`` per update; None stands for an
        entity created by the same result (``born`` holds its rectangle, kept up to date).
        """
        entities = zs.entities
        width, height = zs.zone.width, zs.zone.height
        moved: dict[int, tuple[int, int, int, int]] = {}  # id(entity) -> rect after an earlier update
        updates = []
        born = dict(born) if repeated else born
        for u in changes:
            if type(u) is not EntityUpdate and not isinstance(u, EntityUpdate):
                raise TickRejected(f"entity_updates holds {type(u).__name__}, not EntityUpdate")
            eid = u.id
            if type(eid) is not UUID:
                try:
                    eid = _as_uuid(eid)
                except ValueError:
                    raise TickRejected(f"invalid id in {u!r}") from None
            e = entities.get(eid)
            if e is not None:
                if repeated and id(e) in moved:
                    x0, y0, w0, h0 = moved[id(e)]
                else:
                    x0, y0, w0, h0 = e.x, e.y, e.width, e.height
            elif born and eid in born:
                x0, y0, w0, h0 = born[eid]
            else:
                raise TickRejected(f"update of unknown entity {eid}")
            x, y, w, h = u.x, u.y, u.width, u.height
            x = x0 if x is None else (x if type(x) is int else _check_int(x, "update x"))
            y = y0 if y is None else (y if type(y) is int else _check_int(y, "update y"))
            w = w0 if w is None else (w if type(w) is int else _check_int(w, "update width"))
            h = h0 if h is None else (h if type(h) is int else _check_int(h, "update height"))
            if w < 0 or h < 0:
                raise TickRejected(f"negative size in {u!r}")
            if not (0 <= x and 0 <= y and x + w <= width and y + h <= height and x < width and y < height):
                raise TickRejected(f"out of bounds of the {width}x{height} zone: {u!r}")
            meta = u.metadata
            if meta is not None:
                _check_metadata(meta, u)
                meta = _freeze(meta)
            if e is None:
                born[eid] = (x, y, w, h)
            elif repeated:
                moved[id(e)] = (x, y, w, h)
            updates.append((e, eid, x, y, w, h, meta))
        return updates

    def apply(self, zone_id: UUID, result: Any, now: float | None = None,
              new_id: Callable[[], UUID] = uuid.uuid4, tick_number: int | None = None) -> tuple[list[Entity], int, int]:
        """Validate and apply one zone's result, all or nothing; returns (created, updated, deleted).

        ``new_id`` gives the ids of creates that name none (a zone tick passes one seeded like
        its randomness, so a replay assigns the same ids). ``tick_number``, when given, becomes
        the zone's under the same lock, so a flush snapshot's rows and tick number agree.
        Should applying fail half way (it cannot for a result that passed the checks, short
        of running out of memory), what was applied is undone and ``TickRejected`` raised.
        """
        now = time.time() if now is None else now
        with self.lock:
            zs = self.zones.get(zone_id)
            if zs is None:
                raise TickRejected(f"zone {zone_id} does not exist")
            creates, updates, moves, deletes = self.validate(zs, result, new_id)
            undo: list[tuple] = []
            try:
                done = self._apply(zs, creates, updates, moves, deletes, now, undo)
                if tick_number is not None:
                    zs.tick_number = max(zs.tick_number, tick_number)
                return done
            except BaseException as exc:
                self._undo(zs, undo)
                raise TickRejected(f"applying the result failed ({type(exc).__name__}: {exc}); "
                                   f"nothing of it was applied") from exc

    def _apply(self, zs: _ZoneState, creates: list, updates: list, moves: _Moves | None, deletes: list, now: float,
               undo: list[tuple]) -> tuple[list[Entity], int, int]:
        """Apply checked changes, noting in ``undo`` how to take each back. The count of
        updates includes the moves."""
        zone_id, dirty, deleted = zs.zone.id, self.dirty, self.deleted
        created = []
        for eid, x, y, w, h, meta in creates:
            e = Entity(eid, zone_id, x, y, w, h, meta, now, now)
            undo.append(("create", e, eid in deleted))
            zs.entities[eid] = e
            zs.index.insert(e)
            self.entity_zone[eid] = zs
            dirty.add(e)
            deleted.discard(eid)
            created.append(e)
        move = zs.index.move
        set_meta, set_updated = _ENTITY_SETTERS["metadata"], _ENTITY_SETTERS["updated_at"]
        for e, eid, x, y, w, h, meta in updates:
            if e is None:  # created by this same result
                e = zs.entities[eid]
            undo.append(("update", e, e.x, e.y, e.width, e.height, e.metadata, e.updated_at, e in dirty))
            if x != e.x or y != e.y or w != e.width or h != e.height:
                move(e, x, y, w, h)
            if meta is not None:
                set_meta(e, meta)
            set_updated(e, now)
            dirty.add(e)
        for eid in deletes:
            e = zs.entities.pop(eid)
            undo.append(("delete", e, e in dirty, eid in deleted))
            zs.index.remove(e)
            del self.entity_zone[eid]
            dirty.discard(e)
            deleted.add(eid)
        if moves is None:
            return created, len(updates), len(deletes)
        # Last, so that they need no undo: they are applied whole or not at all.
        fresh = moves.moved - dirty
        try:
            dirty |= fresh
            zs.index.move_many(moves.entities, moves.xs, moves.ys, moves.cells)
        except BaseException:
            dirty -= fresh
            raise
        _each(set_updated, moves.entities, itertools.repeat(now))
        return created, len(updates) + len(moves.entities), len(deletes)

    def _undo(self, zs: _ZoneState, undo: list[tuple]) -> None:
        """Take back what ``_apply`` did, newest first."""
        for step in reversed(undo):
            kind, e = step[0], typing.cast(Entity, step[1])
            if kind == "create":
                if zs.entities.get(e.id) is e:
                    del zs.entities[e.id]
                    zs.index.remove(e)
                    self.entity_zone.pop(e.id, None)
                self.dirty.discard(e)
                if step[2]:
                    self.deleted.add(e.id)
            elif kind == "update":
                _, _, x, y, w, h, meta, updated, was_dirty = step
                zs.index.move(e, x, y, w, h)
                _set_fields(e, metadata=meta, updated_at=updated)
                if not was_dirty:
                    self.dirty.discard(e)
            else:
                _, _, was_dirty, was_deleted = step
                if e.id not in zs.entities:
                    zs.entities[e.id] = e
                    zs.index.insert(e)
                    self.entity_zone[e.id] = zs
                if was_dirty:
                    self.dirty.add(e)
                if not was_deleted:
                    self.deleted.discard(e.id)

    def take_changes(self, marks: dict[UUID, ZoneMark] | None = None,
                     snapshot_due: Callable[[UUID, int], bool] | None = None,
                     snapshots: dict[UUID, tuple[int, list[EntityRow]]] | None = None,
                     fence: dict[UUID, int] | None = None) -> tuple[list[EntityRow], list[UUID]]:
        """Snapshot and clear what the next flush must write: (rows, deleted ids).

        The rows hold the values as they are now, taken under the lock, so the snapshot is
        one state that existed; ``marks``, when given, gets each zone's tick number as of that
        state (the journal is replayed from the tick after it) and the players its module
        knows as joined, and ``snapshots`` every entity
        of the zones for which ``snapshot_due(zone_id, tick_number)`` is true; ``fence`` (in a
        cluster) every zone's epoch, which the write must still hold.
        """
        with self.lock:
            if fence is not None:
                fence.update((zone_id, zs.epoch) for zone_id, zs in self.zones.items())
            if marks is not None:
                marks.update((zone_id, (zs.tick_number, tuple(sorted(map(str, zs.joined)))))
                             for zone_id, zs in self.zones.items())
            if snapshots is not None and snapshot_due is not None:
                for zone_id, zs in self.zones.items():
                    if snapshot_due(zone_id, zs.tick_number):
                        snapshots[zone_id] = (zs.tick_number, _entity_rows(zs.entities.values()))
            rows = _entity_rows(self.dirty)
            deleted = list(self.deleted)
            self.dirty = set()
            self.deleted = set()
            return rows, deleted

    def restore_changes(self, rows: list[EntityRow], deleted: list[UUID]) -> None:
        """Put back a snapshot whose flush failed; later changes stay as they are."""
        with self.lock:
            for row in rows:
                zs = self.entity_zone.get(row.id)
                if zs is not None:
                    self.dirty.add(zs.entities[row.id])
            for eid in deleted:
                if eid not in self.entity_zone:
                    self.deleted.add(eid)


# =============================================================================
# The zone tick (pure)
# =============================================================================


@dataclass(slots=True)
class ZoneInputs:
    """What one zone's tick takes, swapped out of the zone's inbox as one snapshot.

    ``events`` are ``("join" | "leave", player_id)`` in order; ``subscribers`` are the ids of
    the players to compute a state (and a frame) for. ``seed`` seeds the tick's randomness
    (``FrameworkAPI.random`` and the ids the server assigns) and ``at`` is the tick's time
    (seconds since the epoch: the ``created_at`` and ``updated_at`` it writes): with the
    intents and events, everything a deterministic module's tick depends on.
    """

    tick_number: int
    intents: list[Intent] = field(default_factory=list)
    events: list[tuple[str, UUID]] = field(default_factory=list)
    subscribers: list[UUID] = field(default_factory=list)
    seed: int = 0
    at: float = 0.0
    verify: bool = False  # run the tick twice from the same state and compare (debug)
    #: usernames of the players whose intents, joins and leaves the tick carries: what
    #: ``FrameworkAPI.username`` answers during the tick (usernames never change, so a replay
    #: takes them from the players table)
    names: dict[UUID, str] = field(default_factory=dict)
    #: the intents as the journal writes them (``[player, seq, received_at, data]`` JSON)
    journaled: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ZoneOutcome:
    """What one zone's tick produced: a frame per subscriber, or the error that lost the tick.

    When ``error`` is set nothing of the tick was applied and ``frames`` is empty; ``kind`` is
    ``"invalid_result"`` (the result broke a rule) or ``"exception"`` (module code raised:
    ``exception`` is what it raised, for the caller to log).
    """

    frames: list[tuple[UUID, bytes]] = field(default_factory=list)
    error: str | None = None
    kind: str = ""
    #: the tick's changes and events reached the world (false when ``error`` came before
    #: that; true when only ``get_player_state`` failed)
    applied: bool = False
    exception: BaseException | None = None
    mismatch: str | None = None  # with ``verify``: how the second run differed from the first


def take_inputs(zs: _ZoneState, subscribers: list[UUID], usernames: Mapping[UUID, str], seed: int, at: float,
                verify: bool = False) -> ZoneInputs:
    """Swap the zone's inbox (intents, their journal text, join and leave events) out as the
    inputs of the zone's next tick, ``zs.tick_number + 1``; its per-tick limits start again.
    ``names`` get the usernames of the players the tick carries."""
    intents, zs.intents = zs.intents, []
    journaled, zs.journaled = zs.journaled, []
    zs.intent_counts, zs.limited = {}, set()
    events = [(kind, player_id) for player_id, kind in zs.events.items()]
    zs.events = {}
    names = {p: usernames[p] for p in itertools.chain((i.player_id for i in intents), (p for _, p in events))
             if p in usernames}
    return ZoneInputs(zs.tick_number + 1, intents, events, subscribers, seed=seed, at=at, verify=verify,
                      names=names, journaled=journaled)


#: The zone tick under way in this thread: its seed and, once ``FrameworkAPI.random`` is first
#: asked for them (seeding costs 4 µs, a thousand zones a tick), its random numbers.
_TICK = threading.local()

#: Mixed into a tick's seed for the ids the server assigns, so they do not take numbers from
#: the module's own random stream.
_ID_SALT = 0x6772696473657276


def run_zone_tick(world: World, game: Any, zs: _ZoneState, inputs: ZoneInputs,
                  clock: Callable[[], float]) -> ZoneOutcome:
    """Run one zone's tick: join and leave hooks, ``on_tick``, the checks and the all-or-nothing
    apply, then every subscriber's state, serialized into tick frames.

    No I/O and no clock but ``clock`` (seconds since the epoch, for the frames' ``sent_at``
    only). Deterministic for a deterministic module: the same zone, game and inputs (seed
    and time included) give the same outcome and the same world, server-assigned ids too.
    Any exception from the module and any rule a result breaks loses the zone this tick
    (see ``World.validate``); players given the same state object by ``get_player_state``
    share one serialized frame. The zone's ``tick_number`` becomes the tick's either way.
    """
    if not inputs.verify:
        return _seeded_tick(world, game, zs, inputs, clock)
    with world.lock:
        before = [Entity(e.id, e.zone_id, e.x, e.y, e.width, e.height, e.metadata, e.created_at, e.updated_at)
                  for e in zs.entities.values()]
        tick_before, joined_before = zs.tick_number, set(zs.joined)
    first = _seeded_tick(world, game, zs, inputs, clock)
    after_first = _zone_rows(world, zs)
    world.reset_zone(zs, before, tick_before)
    with world.lock:
        zs.joined = joined_before
    outcome = _seeded_tick(world, game, zs, inputs, clock)
    outcome.mismatch = _first_difference(after_first, _zone_rows(world, zs), first.error, outcome.error)
    return outcome


def _seeded_tick(world: World, game: Any, zs: _ZoneState, inputs: ZoneInputs,
                 clock: Callable[[], float]) -> ZoneOutcome:
    ids: list[random.Random] = []  # made at the first id assigned: most ticks assign none

    def new_id() -> UUID:
        if not ids:
            ids.append(random.Random(inputs.seed ^ _ID_SALT))
        return uuid.UUID(int=ids[0].getrandbits(128), version=4)

    previous = getattr(_TICK, "random", None), getattr(_TICK, "seed", None), getattr(_TICK, "names", None)
    _TICK.random, _TICK.seed, _TICK.names = None, inputs.seed, inputs.names
    try:
        return _zone_tick(world, game, zs, inputs, clock, new_id)
    finally:
        _TICK.random, _TICK.seed, _TICK.names = previous
        with world.lock:
            zs.tick_number = max(zs.tick_number, inputs.tick_number)


def _zone_rows(world: World, zs: _ZoneState) -> dict[UUID, tuple]:
    with world.lock:
        return {e.id: (e.x, e.y, e.width, e.height, json_dumps(e.metadata), e.created_at, e.updated_at)
                for e in zs.entities.values()}


def _first_difference(a: dict[UUID, tuple], b: dict[UUID, tuple], error_a: str | None,
                      error_b: str | None) -> str | None:
    """How two runs of one tick from one state differ (None: they do not): the first entity."""
    if error_a != error_b:
        return f"the first run ended with {error_a or 'no error'}, the second with {error_b or 'no error'}"
    fields = ("x", "y", "width", "height", "metadata", "created_at", "updated_at")
    for eid in sorted(a.keys() | b.keys(), key=str):
        if eid not in b:
            return f"entity {eid} exists after the first run only"
        if eid not in a:
            return f"entity {eid} exists after the second run only"
        if a[eid] != b[eid]:
            name = next(f for f, x, y in zip(fields, a[eid], b[eid]) if x != y)
            return f"entity {eid}: {name} was {a[eid][fields.index(name)]!r}, then {b[eid][fields.index(name)]!r}"
    return None


def _zone_tick(world: World, game: Any, zs: _ZoneState, inputs: ZoneInputs, clock: Callable[[], float],
               new_id: Callable[[], UUID]) -> ZoneOutcome:
    zone_id = zs.zone.id
    try:
        extra: list[TickResult] = []
        for kind, player_id in inputs.events:
            hook = getattr(game, "on_player_join" if kind == "join" else "on_player_leave", None)
            if hook is not None:
                r = hook(zone_id, player_id)
                if r is not None:
                    extra.append(r)
        result = game.on_tick(zone_id, [*zs.entities.values()], inputs.intents, inputs.tick_number)
        if extra:
            result = _merge_results(extra, result)
        world.apply(zone_id, result, inputs.at, new_id, inputs.tick_number)
        if inputs.events:
            with world.lock:
                for kind, player_id in inputs.events:
                    (zs.joined.add if kind == "join" else zs.joined.discard)(player_id)
    except TickRejected as exc:
        return ZoneOutcome(error=str(exc), kind="invalid_result")
    except Exception as exc:  # noqa: BLE001 - a module's failure must not reach the server
        return ZoneOutcome(error=f"{type(exc).__name__}: {exc}", kind="exception", exception=exc)
    state = result.broadcast_state if result is not None else {}
    try:
        return ZoneOutcome(frames=_player_frames(game, zone_id, inputs, state, clock()), applied=True)
    except Exception as exc:  # noqa: BLE001
        return ZoneOutcome(error=f"get_player_state: {type(exc).__name__}: {exc}", kind="exception", exception=exc,
                           applied=True)


def _player_frames(game: Any, zone_id: UUID, inputs: ZoneInputs, full_state: dict,
                   now: float) -> list[tuple[UUID, bytes]]:
    """Each subscriber's tick frame; players given the same state object share one frame."""
    if not inputs.subscribers:
        return []
    prefix = (f'{{"type":"tick","zone_id":"{zone_id}","tick_number":{inputs.tick_number},'
              f'"sent_at":{now:.6f},"state":')
    built: dict[int, tuple[Any, bytes]] = {}
    frames = []
    get_state = game.get_player_state
    for player_id in inputs.subscribers:
        state = get_state(zone_id, player_id, full_state)
        cached = built.get(id(state))
        if cached is None:
            cached = (state, ws_text_frame((prefix + json_dumps(state) + "}").encode("utf-8")))
            built[id(state)] = cached  # holding ``state`` keeps its id unique for this tick
        frames.append((player_id, cached[1]))
    return frames


def _merge_results(first: list[TickResult], last: Any) -> Any:
    """Hook results applied with the tick's own: creates, updates, moves and deletes in order."""
    if not isinstance(last, TickResult) and last is not None:
        return last  # let validation reject it
    merged = TickResult()
    moves = []
    for r in [*first, *([last] if last is not None else [])]:
        if not isinstance(r, TickResult):
            raise TickRejected(f"a join/leave hook returned {type(r).__name__}, not a TickResult")
        merged.entity_creates.extend(_as_list(r.entity_creates, "entity_creates"))
        merged.entity_updates.extend(_as_list(r.entity_updates, "entity_updates"))
        merged.entity_deletes.extend(_as_list(r.entity_deletes, "entity_deletes"))
        if r.entity_moves is not None:
            moves.append(r.entity_moves)
    merged.entity_moves = moves[0] if len(moves) == 1 else _joined_moves(moves) if moves else None
    merged.broadcast_state = last.broadcast_state if last is not None else {}
    return merged


def _joined_moves(parts: list[Any]) -> EntityMoves:
    """Several results' ``entity_moves`` as one, each checked whole first (so that lengths which
    differ in one part cannot even out in the sum)."""
    ids: list[Any] = []
    xs: list[Any] = []
    ys: list[Any] = []
    for part_ids, part_xs, part_ys in map(_moves_columns, parts):
        ids += part_ids
        xs += part_xs
        ys += part_ys
    return EntityMoves(ids, xs, ys)


# =============================================================================
# Metrics
# =============================================================================


class _Histogram:
    """A Prometheus histogram that also keeps the last values for p50/p99 gauges."""

    BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
               0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, keep: int = 1000):
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0
        self.recent: collections.deque[float] = collections.deque(maxlen=keep)

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        self.recent.append(value)
        self.counts[bisect.bisect_left(self.BUCKETS, value)] += 1

    def quantile(self, q: float) -> float:
        if not self.recent:
            return 0.0
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def render(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, n in zip(self.BUCKETS, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.count}")
        for q in (0.5, 0.99):
            out.append(f'{name}_recent{{quantile="{q}"}} {self.quantile(q):.6f}')
        return out


def _counter(help_text: str) -> Any:
    return field(default=0, metadata={"help": help_text})


def _histogram(name: str, help_text: str) -> Any:
    return field(default_factory=_Histogram, metadata={"name": name, "help": help_text})


@dataclass(eq=False)
class Metrics:
    """Counters and histograms shown at ``/metrics``: plain attributes, bumped in place, each
    declared once here with its help text."""

    ticks_total: int = _counter("ticks run")
    tick_overruns_total: int = _counter("ticks that started after the next one was due")
    zone_errors_total: int = _counter("zone ticks rejected (module exception or invalid result)")
    module_reloads_total: int = _counter("hot reloads of the game module that took effect")
    module_reload_failures_total: int = _counter("hot reloads refused (the new code failed to load or initialise)")
    zone_ticks_skipped_total: int = _counter("zone ticks skipped because the zone's module call was still running")
    intents_accepted_total: int = _counter("intents queued for a tick")
    intents_dropped_total: int = _counter("intents dropped by the per-player or per-zone tick limits")
    subscribes_dropped_total: int = _counter("subscribes and unsubscribes refused by the per-tick limit")
    bad_intents_total: int = _counter("intents refused at the door: numbers JSON cannot carry, nesting too deep")
    logins_throttled_total: int = _counter(
        "logins and registrations answered 429 (failed-login limits, a share of bcrypt)")
    failed_logins_total: int = _counter("logins with a wrong password or an unknown user")
    connections_refused_total: int = _counter("connections refused for max_connections_per_address")
    messages_sent_total: int = _counter("WebSocket messages handed to sockets")
    relay_messages_total: int = _counter("cluster: NATS messages of frames and answers sent to players' nodes")
    bytes_sent_total: int = _counter("WebSocket payload bytes handed to sockets")
    ticks_dropped_total: int = _counter("tick messages replaced by a newer one before a slow client took them")
    slow_clients_disconnected_total: int = _counter("clients disconnected for falling behind")
    connections_total: int = _counter("WebSocket connections accepted")
    flushes_total: int = _counter("persistence flushes that committed")
    flush_failures_total: int = _counter("persistence flushes that failed (retried)")
    entities_flushed_total: int = _counter("entity rows written or deleted by flushes")
    journal_commits_total: int = _counter("journal transactions committed (each holds one or more ticks)")
    journal_ticks_total: int = _counter("ticks whose inputs the journal committed")
    journal_failures_total: int = _counter("journal writes that failed (the inputs wait in memory; retried)")
    replay_mismatches_total: int = _counter(
        "ticks that, run twice from the same state and inputs (debug, [journal] verify_every), differed")
    tick_duration: _Histogram = _histogram("tick_duration_seconds",
                                           "wall time of a whole tick: module calls, apply, broadcast")
    tick_lateness: _Histogram = _histogram("tick_lateness_seconds", "how late a tick started against its schedule")
    tick_work: _Histogram = _histogram("tick_work_seconds",
                                       "time from tick start until every zone's result was applied")
    broadcast_time: _Histogram = _histogram(
        "tick_broadcast_seconds", "time from tick start until the last subscriber's message was handed to its socket")
    zone_time: _Histogram = _histogram(
        "zone_tick_seconds", "one zone's share of a tick in the game thread: hooks, on_tick, apply, player states")
    flush_duration: _Histogram = _histogram("flush_duration_seconds", "persistence flush time")

    def render(self, gauges: dict[str, tuple[float, str]]) -> str:
        out: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Histogram):
                out += value.render(f"gridserver_{f.metadata['name']}", f.metadata["help"])
            else:
                out += [f"# HELP gridserver_{f.name} {f.metadata['help']}", f"# TYPE gridserver_{f.name} counter",
                        f"gridserver_{f.name} {value}"]
        for name, (gauge, help_text) in gauges.items():
            out += [f"# HELP gridserver_{name} {help_text}", f"# TYPE gridserver_{name} gauge",
                    f"gridserver_{name} {gauge:g}"]
        return "\n".join(out) + "\n"


# =============================================================================
# Storage (all SQL lives here)
# =============================================================================

#: The PostgreSQL schema. ``schema.sql`` holds the same statements (a test compares the
#: database each produces); the server applies them on every start, so they are idempotent.
PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS players (
    id            UUID PRIMARY KEY,
    username      TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    last_login    TIMESTAMPTZ,
    CONSTRAINT players_username_key UNIQUE (username)
);

CREATE TABLE IF NOT EXISTS sessions (
    token_digest TEXT PRIMARY KEY,
    player_id    UUID NOT NULL REFERENCES players (id) ON DELETE CASCADE,
    created_at   TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS sessions_player_id_idx ON sessions (player_id);

CREATE TABLE IF NOT EXISTS zones (
    id         UUID PRIMARY KEY,
    name       TEXT NOT NULL,
    width      INTEGER NOT NULL CHECK (width > 0),
    height     INTEGER NOT NULL CHECK (height > 0),
    metadata   JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    tick_number BIGINT NOT NULL DEFAULT 0,
    members    TEXT NOT NULL DEFAULT '[]',
    CONSTRAINT zones_name_key UNIQUE (name)
);
ALTER TABLE zones ADD COLUMN IF NOT EXISTS tick_number BIGINT NOT NULL DEFAULT 0;
ALTER TABLE zones ADD COLUMN IF NOT EXISTS members TEXT NOT NULL DEFAULT '[]';
-- Cluster: the node ticking the zone, its fencing number (grows at every change of owner)
-- and until when its claim lasts without renewal (one node: owner stays NULL, epoch 0).
ALTER TABLE zones ADD COLUMN IF NOT EXISTS owner TEXT;
ALTER TABLE zones ADD COLUMN IF NOT EXISTS epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE zones ADD COLUMN IF NOT EXISTS lease_until TIMESTAMPTZ;

CREATE TABLE IF NOT EXISTS entities (
    id         UUID PRIMARY KEY,
    zone_id    UUID NOT NULL REFERENCES zones (id) ON DELETE CASCADE,
    x          INTEGER NOT NULL CHECK (x >= 0),
    y          INTEGER NOT NULL CHECK (y >= 0),
    width      INTEGER NOT NULL CHECK (width >= 0),
    height     INTEGER NOT NULL CHECK (height >= 0),
    metadata   JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS entities_zone_id_idx ON entities (zone_id);
-- The fencing number of the zone's owner when the row was written.
ALTER TABLE entities ADD COLUMN IF NOT EXISTS epoch BIGINT NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS journal (
    zone_id     UUID NOT NULL REFERENCES zones (id) ON DELETE CASCADE,
    tick_number BIGINT NOT NULL,
    seed        BIGINT NOT NULL,
    at          DOUBLE PRECISION NOT NULL,
    inputs      TEXT NOT NULL,
    PRIMARY KEY (zone_id, tick_number)
);
ALTER TABLE journal ADD COLUMN IF NOT EXISTS epoch BIGINT NOT NULL DEFAULT 0;
-- A tick's inputs (kilobytes a zone) are compressed with lz4 where the server has it
-- (PostgreSQL 14 and later, built with it): written in about two thirds of the time the
-- default (pglz) takes. Elsewhere the default stays.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'journal'::regclass AND attname = 'inputs'
               AND attcompression <> 'l') THEN
        ALTER TABLE journal ALTER COLUMN inputs SET COMPRESSION lz4;
    END IF;
EXCEPTION WHEN OTHERS THEN
    NULL;
END
$$;

CREATE TABLE IF NOT EXISTS snapshots (
    zone_id     UUID NOT NULL REFERENCES zones (id) ON DELETE CASCADE,
    tick_number BIGINT NOT NULL,
    entities    TEXT NOT NULL,
    PRIMARY KEY (zone_id, tick_number)
);

-- Cluster: the nodes that have been seen, each renewing its row with its leases.
CREATE TABLE IF NOT EXISTS nodes (
    name        TEXT PRIMARY KEY,
    started_at  TIMESTAMPTZ NOT NULL,
    last_seen   TIMESTAMPTZ NOT NULL,
    connections INTEGER NOT NULL DEFAULT 0
);
"""

#: The same tables for the embedded SQLite default: UUIDs, JSON and times (ISO 8601) as text.
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS players (
    id TEXT PRIMARY KEY, username TEXT NOT NULL UNIQUE, password_hash TEXT NOT NULL,
    created_at TEXT NOT NULL, last_login TEXT
);
CREATE TABLE IF NOT EXISTS sessions (
    token_digest TEXT PRIMARY KEY,
    player_id TEXT NOT NULL REFERENCES players (id) ON DELETE CASCADE,
    created_at TEXT NOT NULL, expires_at TEXT
);
CREATE INDEX IF NOT EXISTS sessions_player_id_idx ON sessions (player_id);
CREATE TABLE IF NOT EXISTS zones (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    width INTEGER NOT NULL CHECK (width > 0), height INTEGER NOT NULL CHECK (height > 0),
    metadata TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    tick_number INTEGER NOT NULL DEFAULT 0, members TEXT NOT NULL DEFAULT '[]',
    owner TEXT, epoch INTEGER NOT NULL DEFAULT 0, lease_until TEXT
);
CREATE TABLE IF NOT EXISTS entities (
    id TEXT PRIMARY KEY, zone_id TEXT NOT NULL REFERENCES zones (id) ON DELETE CASCADE,
    x INTEGER NOT NULL CHECK (x >= 0), y INTEGER NOT NULL CHECK (y >= 0),
    width INTEGER NOT NULL CHECK (width >= 0), height INTEGER NOT NULL CHECK (height >= 0),
    metadata TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entities_zone_id_idx ON entities (zone_id);
CREATE TABLE IF NOT EXISTS journal (
    zone_id TEXT NOT NULL REFERENCES zones (id) ON DELETE CASCADE, tick_number INTEGER NOT NULL,
    seed INTEGER NOT NULL, at REAL NOT NULL, inputs TEXT NOT NULL, epoch INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (zone_id, tick_number)
);
CREATE TABLE IF NOT EXISTS snapshots (
    zone_id TEXT NOT NULL REFERENCES zones (id) ON DELETE CASCADE, tick_number INTEGER NOT NULL,
    entities TEXT NOT NULL, PRIMARY KEY (zone_id, tick_number)
);
-- The cluster's columns and table, unused on SQLite (one process), kept so that both
-- backends hold the same tables.
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, started_at TEXT NOT NULL, last_seen TEXT NOT NULL,
    connections INTEGER NOT NULL DEFAULT 0
);
"""

#: Statements shared by both backends, written with %s placeholders (SQLite gets ? instead).
_SQL = {
    "insert_player": "INSERT INTO players (id, username, password_hash, created_at) VALUES (%s, %s, %s, %s)",
    "player_by_name": "SELECT id, username, password_hash, created_at, last_login FROM players WHERE username = %s",
    "player_by_id": "SELECT id, username, password_hash, created_at, last_login FROM players WHERE id = %s",
    "set_last_login": "UPDATE players SET last_login = %s WHERE id = %s",
    "insert_session": "INSERT INTO sessions (token_digest, player_id, created_at, expires_at) VALUES (%s, %s, %s, %s)",
    "session": "SELECT s.player_id, s.expires_at, p.username FROM sessions s JOIN players p ON p.id = s.player_id "
               "WHERE s.token_digest = %s",
    "delete_session": "DELETE FROM sessions WHERE token_digest = %s",
    "delete_expired_sessions": "DELETE FROM sessions WHERE expires_at IS NOT NULL AND expires_at < %s",
    "delete_player_sessions": "DELETE FROM sessions WHERE player_id = %s RETURNING token_digest",
    "delete_old_sessions": "DELETE FROM sessions WHERE player_id = %s AND token_digest NOT IN ("
                           "SELECT token_digest FROM sessions WHERE player_id = %s "
                           "ORDER BY created_at DESC, token_digest LIMIT %s) RETURNING token_digest",
    "insert_zone": "INSERT INTO zones (id, name, width, height, metadata, created_at, updated_at, tick_number) "
                   "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
    "delete_zone_entities": "DELETE FROM entities WHERE zone_id = %s",
    "delete_zone": "DELETE FROM zones WHERE id = %s",
    "zones": "SELECT id, name, width, height, metadata, created_at, updated_at, tick_number, members FROM zones",
    "usernames": "SELECT id, username FROM players",
    "journal_after_flush": "SELECT j.zone_id, j.tick_number, j.seed, j.at, j.inputs FROM journal j "
                           "JOIN zones z ON z.id = j.zone_id WHERE j.tick_number > z.tick_number "
                           "ORDER BY j.zone_id, j.tick_number",
    "journal_range": "SELECT zone_id, tick_number, seed, at, inputs FROM journal "
                     "WHERE zone_id = %s AND tick_number >= %s AND tick_number <= %s ORDER BY tick_number",
    "trim_journal": "DELETE FROM journal WHERE tick_number <= "
                    "(SELECT z.tick_number FROM zones z WHERE z.id = journal.zone_id) - %s",
    "trim_snapshots": "DELETE FROM snapshots WHERE tick_number < "
                      "(SELECT z.tick_number FROM zones z WHERE z.id = snapshots.zone_id) - %s",
    "snapshot_before": "SELECT tick_number, entities FROM snapshots WHERE zone_id = %s AND tick_number < %s "
                       "ORDER BY tick_number DESC LIMIT 1",
    "journal_drop_after": "DELETE FROM journal WHERE zone_id = %s AND tick_number > %s",
    "snapshots_drop_after": "DELETE FROM snapshots WHERE zone_id = %s AND tick_number > %s",
    "entities": "SELECT id, zone_id, x, y, width, height, metadata, created_at, updated_at FROM entities",
    "ping": "SELECT 1",
}

#: One flush chunk: the rows travel as one JSON array parameter, unpacked by PostgreSQL, so a
#: chunk of thousands of entities is one statement. Rows of zones deleted meanwhile are skipped.
#: Every column is written, ``zone_id`` and ``created_at`` too: an entity that a module deleted
#: in one zone and created with the same id in another is saved as moved, as memory has it.
_PG_UPSERT_ENTITIES = """
INSERT INTO entities (id, zone_id, x, y, width, height, metadata, created_at, updated_at, epoch)
SELECT (r->>0)::uuid, (r->>1)::uuid, (r->>2)::int, (r->>3)::int, (r->>4)::int, (r->>5)::int,
       (r->6)::jsonb, to_timestamp((r->>7)::float8), to_timestamp((r->>8)::float8), (r->>9)::bigint
FROM json_array_elements(%s::json) AS r
WHERE EXISTS (SELECT 1 FROM zones z WHERE z.id = (r->>1)::uuid)
ON CONFLICT (id) DO UPDATE SET
    zone_id = EXCLUDED.zone_id, x = EXCLUDED.x, y = EXCLUDED.y, width = EXCLUDED.width,
    height = EXCLUDED.height, metadata = EXCLUDED.metadata, created_at = EXCLUDED.created_at,
    updated_at = EXCLUDED.updated_at, epoch = EXCLUDED.epoch
"""
_PG_DELETE_ENTITIES = "DELETE FROM entities WHERE id = ANY(%s::uuid[])"
#: A cluster node deletes only rows of the zones its flush is fenced on: an entity deleted in a
#: zone that another node has taken over since is that node's to keep.
_PG_DELETE_ENTITIES_IN = "DELETE FROM entities WHERE id = ANY(%s::uuid[]) AND zone_id = ANY(%s::uuid[])"

_SQLITE_UPSERT_ENTITY = """
INSERT INTO entities (id, zone_id, x, y, width, height, metadata, created_at, updated_at)
SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM zones WHERE id = ?)
ON CONFLICT (id) DO UPDATE SET
    zone_id = excluded.zone_id, x = excluded.x, y = excluded.y, width = excluded.width,
    height = excluded.height, metadata = excluded.metadata, created_at = excluded.created_at,
    updated_at = excluded.updated_at
"""
_SQLITE_DELETE_ENTITY = "DELETE FROM entities WHERE id = ?"

#: A tick's journal rows ``(zone_id, tick_number, seed, at, inputs, epoch)``, one array per
#: column (PostgreSQL takes them apart in half the time a JSON array of rows takes). Rows of
#: zones deleted meanwhile are skipped; a tick written again (after a rewind) replaces.
_PG_INSERT_JOURNAL = """
INSERT INTO journal (zone_id, tick_number, seed, at, inputs, epoch)
SELECT r.zone_id, r.tick_number, r.seed, r.at, r.inputs, r.epoch
FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[], %s::float8[], %s::text[], %s::bigint[])
    AS r (zone_id, tick_number, seed, at, inputs, epoch)
WHERE EXISTS (SELECT 1 FROM zones z WHERE z.id = r.zone_id)
ON CONFLICT (zone_id, tick_number) DO UPDATE SET seed = EXCLUDED.seed, at = EXCLUDED.at, inputs = EXCLUDED.inputs,
    epoch = EXCLUDED.epoch
"""
_SQLITE_INSERT_JOURNAL = """
INSERT INTO journal (zone_id, tick_number, seed, at, inputs)
SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM zones WHERE id = ?)
ON CONFLICT (zone_id, tick_number) DO UPDATE SET seed = excluded.seed, at = excluded.at, inputs = excluded.inputs
"""
#: The tick each zone's saved state is at and its joined players, written by the flush with
#: its rows (``[zone_id, tick_number, [player_id, ...]]``).
_PG_ZONE_MARKS = """
UPDATE zones SET tick_number = (r->>1)::bigint, members = r->>2
FROM json_array_elements(%s::json) AS r WHERE zones.id = (r->>0)::uuid
"""
_SQLITE_ZONE_MARK = "UPDATE zones SET tick_number = ?, members = ? WHERE id = ?"
#: A zone's entities as of one tick (``[zone_id, tick_number, [[id, x, y, w, h, metadata,
#: created_at, updated_at], ...]]``): where a rewind or a replay starts.
_PG_INSERT_SNAPSHOTS = """
INSERT INTO snapshots (zone_id, tick_number, entities)
SELECT (r->>0)::uuid, (r->>1)::bigint, (r->2)::text FROM json_array_elements(%s::json) AS r
WHERE EXISTS (SELECT 1 FROM zones z WHERE z.id = (r->>0)::uuid)
ON CONFLICT (zone_id, tick_number) DO UPDATE SET entities = EXCLUDED.entities
"""
_SQLITE_INSERT_SNAPSHOT = """
INSERT INTO snapshots (zone_id, tick_number, entities) SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM zones WHERE id = ?)
ON CONFLICT (zone_id, tick_number) DO UPDATE SET entities = excluded.entities
"""

#: Rows per flush statement; the event loop gets a turn between chunks.
FLUSH_CHUNK = 5000

#: Cluster (PostgreSQL only): the zone directory's statements. A zone's owner holds it until
#: ``lease_until``; taking it over increments ``epoch`` in the same statement, and every
#: write of a zone's state first locks the zone's row and checks that the epoch is still the
#: writer's (``_fence_step``), so an old owner's late write is refused, never interleaved.
_CLUSTER_SQL = {
    "fence": "SELECT id, owner, epoch FROM zones WHERE id = ANY(%s::uuid[]) FOR SHARE",
    "node_beat": "INSERT INTO nodes (name, started_at, last_seen, connections) VALUES (%s, now(), now(), %s) "
                 "ON CONFLICT (name) DO UPDATE SET last_seen = now(), connections = EXCLUDED.connections",
    "node_gone": "DELETE FROM nodes WHERE name = %s",
    "prune_nodes": "DELETE FROM nodes WHERE last_seen < now() - %s * interval '1 second'",
    "renew": "UPDATE zones SET lease_until = now() + %s * interval '1 second' WHERE owner = %s "
             "RETURNING id, epoch",
    "claim": "UPDATE zones SET owner = %s, epoch = epoch + 1, lease_until = now() + %s * interval '1 second' "
             "WHERE id = %s AND (owner IS NULL OR owner = %s OR lease_until IS NULL OR lease_until < now()) "
             "RETURNING epoch",
    "release": "UPDATE zones SET owner = NULL, lease_until = NULL WHERE owner = %s AND id = ANY(%s::uuid[])",
    "directory": "SELECT id, name, width, height, metadata, created_at, updated_at, owner, epoch, "
                 "lease_until IS NOT NULL AND lease_until > now() FROM zones",
    "nodes": "SELECT name, started_at, last_seen, connections, last_seen > now() - %s * interval '1 second' "
             "FROM nodes ORDER BY name",
    "zone": "SELECT id, name, width, height, metadata, created_at, updated_at, tick_number, members "
            "FROM zones WHERE id = %s",
    "zone_entities": "SELECT id, zone_id, x, y, width, height, metadata, created_at, updated_at FROM entities "
                     "WHERE zone_id = %s",
    "usernames_of": "SELECT id, username FROM players WHERE id IN "
                    "(SELECT value::uuid FROM json_array_elements_text(%s::json))",
    "zone_journal": "SELECT j.zone_id, j.tick_number, j.seed, j.at, j.inputs FROM journal j "
                    "JOIN zones z ON z.id = j.zone_id WHERE j.zone_id = %s AND j.tick_number > z.tick_number "
                    "ORDER BY j.tick_number",
}


def _fence_step(fence: Mapping[UUID, int], node: str) -> _Step:
    """The first statement of a fenced write: lock the rows of the zones written (a takeover
    waits for the write to commit) and refuse the whole transaction (``Fenced``) when any of
    them is no longer ``node``'s at the epoch in ``fence``."""
    def check(rows: list) -> None:
        current = {_as_uuid(r[0]): (r[1], r[2]) for r in rows}
        lost = {z: epoch for z, epoch in fence.items() if current.get(z) != (node, epoch)}
        if lost:
            raise Fenced(lost)
    return _Step(_CLUSTER_SQL["fence"], ([str(z) for z in fence],), check=check)


class UniqueViolation(Exception):
    """An insert broke a unique constraint; ``what`` is "username" or "zone_name"."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class Fenced(Exception):
    """A write of zones this node no longer owns (another node took them over, or they were
    deleted): the whole transaction was rolled back; ``zones`` are the ones lost, each with
    the epoch the write was refused at."""

    def __init__(self, zones: dict[UUID, int]):
        super().__init__(f"fenced: {len(zones)} zone(s) owned elsewhere now")
        self.zones = zones


class _Step(NamedTuple):
    """One statement of a call: ``many`` runs it once per tuple of ``args`` (SQLite only);
    ``check`` sees the statement's rows inside the transaction and may raise to roll it back."""

    sql: str
    args: Any = ()
    many: bool = False
    check: Callable[[list], None] | None = None


class _Dialect:
    """How one database runs statements: placeholders, times, transactions, bulk writes.

    ``run`` executes the steps in one transaction (a single statement on its own) and returns
    the last statement's rows (``fetch``: "none", "one" or "all"). Any failure to reach the
    database becomes ``DatabaseUnavailable``; a unique constraint, ``UniqueViolation``.
    ``healthy`` follows the last call's outcome.
    """

    healthy = True
    timeout = 5.0

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def run(self, steps: list[_Step], fetch: str = "none", timeout: float | None = None) -> Any: ...

    def time(self, value: _dt.datetime | None) -> Any:
        """A time as the driver takes it."""
        return value

    def delete_ids(self, ids: list[UUID]) -> list[_Step]:
        """Steps deleting the entities with these ids."""
        raise NotImplementedError

    def flush_steps(self, rows: list[EntityRow], deleted: list[UUID],
                    epochs: Mapping[UUID, int] | None = None) -> list[_Step]:
        """A flush's steps (in the flush thread): deletes first, then the upserts of ``rows``,
        each with its zone's epoch from ``epochs`` (0 when absent). Rows of zones deleted
        meanwhile are skipped. With ``epochs`` (a cluster node), only rows of those zones
        are deleted."""
        raise NotImplementedError

    def zone_marks(self, marks: dict[UUID, ZoneMark]) -> list[_Step]:
        """Steps saving each zone's tick number and joined players."""
        raise NotImplementedError

    def journal_steps(self, rows: list[tuple]) -> list[_Step]:
        """Steps inserting journal rows ``(zone_id, tick_number, seed, at, inputs JSON, epoch)``."""
        raise NotImplementedError

    def snapshot_steps(self, snapshots: dict[UUID, tuple[int, list[EntityRow]]]) -> list[_Step]:
        """Steps saving zone snapshots ``{zone_id: (tick_number, rows)}``."""
        raise NotImplementedError


class _Postgres(_Dialect):
    """PostgreSQL through an aiopg pool. Every call is bounded by ``timeout`` seconds."""

    def __init__(self, dsn: str, pool_min: int, pool_max: int, timeout: float):
        self.dsn, self.pool_min, self.pool_max, self.timeout = dsn, pool_min, pool_max, timeout
        self.pool: Any = None

    async def open(self) -> None:
        try:
            self.pool = await asyncio.wait_for(
                aiopg.create_pool(self.dsn, minsize=self.pool_min, maxsize=self.pool_max,
                                  timeout=self.timeout, connect_timeout=max(1, int(self.timeout))),
                self.timeout * 2)
        except (psycopg2.Error, OSError, asyncio.TimeoutError) as exc:
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {str(exc).strip() or 'timed out'}") from None
        await self.run([_Step(PG_SCHEMA)])

    async def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.wait_closed(), self.timeout)

    async def run(self, steps: list[_Step], fetch: str = "none", timeout: float | None = None) -> Any:
        """On a pooled connection; a dropped connection is retried once, and a connection whose
        call failed half way is closed rather than returned to the pool."""
        timeout = timeout or self.timeout
        for attempt in (1, 2):
            conn = None
            try:
                conn = await asyncio.wait_for(self.pool.acquire(), self.timeout)
                try:
                    async with conn.cursor(timeout=timeout) as cur:
                        result = await asyncio.wait_for(self._execute(cur, steps, fetch), timeout)
                except BaseException:
                    conn.close()
                    raise
                self.healthy = True
                return result
            except psycopg2.errors.UniqueViolation as exc:
                self.healthy = True
                name = getattr(getattr(exc, "diag", None), "constraint_name", "") or ""
                raise UniqueViolation("username" if "players" in name else "zone_name") from None
            except (psycopg2.OperationalError, psycopg2.InterfaceError, OSError) as exc:
                # An idle connection the server dropped fails on first use: try a fresh one.
                stale = conn is not None and isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))
                if attempt == 2 or not stale:
                    self.healthy = False
                    raise DatabaseUnavailable(str(exc).strip() or "timed out") from None
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        self.pool.release(conn)

    @staticmethod
    async def _execute(cur: Any, steps: list[_Step], fetch: str) -> Any:
        tx = len(steps) > 1
        if tx:
            await cur.execute("BEGIN")
        try:
            for step in steps:
                await cur.execute(step.sql, step.args or None)
                if step.check is not None:
                    step.check(await cur.fetchall())
            rows = (await cur.fetchone() if fetch == "one" else await cur.fetchall()) \
                if fetch != "none" and cur.description else None
            if tx:
                await cur.execute("COMMIT")
        except BaseException:
            if tx:
                with contextlib.suppress(Exception):
                    await cur.execute("ROLLBACK")
            raise
        return rows if rows is not None or fetch != "all" else []

    def delete_ids(self, ids: list[UUID]) -> list[_Step]:
        return [_Step(_PG_DELETE_ENTITIES, ([str(i) for i in ids],))] if ids else []

    def flush_steps(self, rows: list[EntityRow], deleted: list[UUID],
                    epochs: Mapping[UUID, int] | None = None) -> list[_Step]:
        """One JSON array per statement, serialized 1,000 rows at a time so that no single
        call holds the GIL for long."""
        zone_ids: dict[UUID, str] = {}
        epoch_of = epochs or {}
        pieces = []
        for start in range(0, len(rows), 1000):
            chunk = []
            for r in rows[start:start + 1000]:
                zone_id = r.entity.zone_id
                zid = zone_ids.get(zone_id) or zone_ids.setdefault(zone_id, str(zone_id))
                # the id's 32 hex digits (PostgreSQL takes a uuid without its hyphens): 5x faster than str()
                chunk.append(("%032x" % r.id.int, zid, r.x, r.y, r.width, r.height, r.metadata, r.entity.created_at,
                              r.updated_at, epoch_of.get(zone_id, 0)))
            pieces.append(json_dumps(chunk)[1:-1])
        per = max(1, FLUSH_CHUNK // 1000)
        deletes = (self.delete_ids(deleted) if epochs is None or not deleted else
                   [_Step(_PG_DELETE_ENTITIES_IN, ([str(i) for i in deleted], [str(z) for z in epochs]))])
        return [*deletes, *(_Step(_PG_UPSERT_ENTITIES, ("[" + ",".join(pieces[i:i + per]) + "]",))
                            for i in range(0, len(pieces), per))]

    def zone_marks(self, marks: dict[UUID, ZoneMark]) -> list[_Step]:
        return [_Step(_PG_ZONE_MARKS, (json_dumps([[str(z), n, list(m)] for z, (n, m) in marks.items()]),))]

    def journal_steps(self, rows: list[tuple]) -> list[_Step]:
        columns = [[r[i] for r in rows] for i in range(6)]
        columns[0] = [str(zone_id) for zone_id in columns[0]]
        return [_Step(_PG_INSERT_JOURNAL, tuple(columns))]

    def snapshot_steps(self, snapshots: dict[UUID, tuple[int, list[EntityRow]]]) -> list[_Step]:
        return [_Step(_PG_INSERT_SNAPSHOTS, (json_dumps([[str(z), tick, _snapshot_rows(rows)]
                                                         for z, (tick, rows) in snapshots.items()]),))]


class _Sqlite(_Dialect):
    """The embedded default: one SQLite file, used from one thread off the event loop."""

    def __init__(self, path: str, timeout: float):
        self.path, self.timeout = path, timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gridserver-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        try:
            await self._call(self._open)
        except DatabaseUnavailable as exc:
            raise DatabaseUnavailable(f"cannot open SQLite database {self.path}: {exc}") from None

    def _open(self) -> None:
        self._conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(SQLITE_SCHEMA)
        # Columns added since the first release, for database files made before them.
        for table, column, decl in (("zones", "tick_number", "INTEGER NOT NULL DEFAULT 0"),
                                    ("zones", "members", "TEXT NOT NULL DEFAULT '[]'"),
                                    ("zones", "owner", "TEXT"), ("zones", "epoch", "INTEGER NOT NULL DEFAULT 0"),
                                    ("zones", "lease_until", "TEXT"),
                                    ("entities", "epoch", "INTEGER NOT NULL DEFAULT 0"),
                                    ("journal", "epoch", "INTEGER NOT NULL DEFAULT 0")):
            if column not in {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}:
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    async def close(self) -> None:
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(loop.run_in_executor(self._executor, fn, *args), self.timeout * 4)
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" not in str(exc):
                raise
            raise UniqueViolation("username" if "players" in str(exc) else "zone_name") from None
        except (sqlite3.OperationalError, asyncio.TimeoutError) as exc:
            self.healthy = False
            raise DatabaseUnavailable(str(exc) or "timed out") from None
        self.healthy = True
        return result

    async def run(self, steps: list[_Step], fetch: str = "none", timeout: float | None = None) -> Any:
        return await self._call(self._execute, steps, fetch)

    def _execute(self, steps: list[_Step], fetch: str) -> Any:
        conn = self._conn
        assert conn is not None, "the SQLite store is not open"
        tx = len(steps) > 1
        if tx:
            conn.execute("BEGIN IMMEDIATE")
        try:
            cur = None
            for step in steps:
                sql = step.sql.replace("%s", "?")
                cur = (conn.executemany if step.many else conn.execute)(sql, step.args)
            rows = None if fetch == "none" or cur is None else cur.fetchone() if fetch == "one" else cur.fetchall()
            if tx:
                conn.execute("COMMIT")
        except BaseException:
            if tx:
                conn.execute("ROLLBACK")
            raise
        return rows

    def time(self, value: _dt.datetime | None) -> Any:
        return _iso(value)

    def delete_ids(self, ids: list[UUID]) -> list[_Step]:
        return [_Step(_SQLITE_DELETE_ENTITY, [(str(i),) for i in ids], True)] if ids else []

    def flush_steps(self, rows: list[EntityRow], deleted: list[UUID],
                    epochs: Mapping[UUID, int] | None = None) -> list[_Step]:
        upserts = [(str(r.id), str(r.entity.zone_id), r.x, r.y, r.width, r.height, json_dumps(r.metadata),
                    _iso(r.entity.created_at), _iso(r.updated_at), str(r.entity.zone_id)) for r in rows]
        return [*self.delete_ids(deleted), _Step(_SQLITE_UPSERT_ENTITY, upserts, True)]

    def zone_marks(self, marks: dict[UUID, ZoneMark]) -> list[_Step]:
        return [_Step(_SQLITE_ZONE_MARK, [(n, json_dumps(list(m)), str(z)) for z, (n, m) in marks.items()], True)]

    def journal_steps(self, rows: list[tuple]) -> list[_Step]:
        return [_Step(_SQLITE_INSERT_JOURNAL, [(str(r[0]), *r[1:5], str(r[0])) for r in rows], True)]

    def snapshot_steps(self, snapshots: dict[UUID, tuple[int, list[EntityRow]]]) -> list[_Step]:
        return [_Step(_SQLITE_INSERT_SNAPSHOT, [(str(z), tick, json_dumps(_snapshot_rows(rows)), str(z))
                                                for z, (tick, rows) in snapshots.items()], True)]


class Store:
    """What the server asks of a database, written once over a ``_Dialect``.

    Every method is one call of the dialect (one transaction where it has several steps),
    bounded by ``[database] timeout``; ``DatabaseUnavailable`` when the database cannot be
    reached. ``healthy`` follows the last call's outcome.
    """

    def __init__(self, dialect: _Dialect):
        self.dialect = dialect
        self._t = dialect.time
        #: cluster mode: this node's name; writes of zone state are then fenced (``_fence_step``)
        self.node: str | None = None

    @property
    def healthy(self) -> bool:
        return self.dialect.healthy

    async def open(self) -> None:
        await self.dialect.open()

    async def close(self) -> None:
        await self.dialect.close()

    async def _do(self, name: str, *args: Any, fetch: str = "none") -> Any:
        return await self.dialect.run([_Step(_SQL[name], args)], fetch)

    async def ping(self) -> None:
        await self._do("ping", fetch="one")

    async def insert_player(self, player_id: UUID, username: str, pw_hash: str, created_at: _dt.datetime) -> None:
        await self._do("insert_player", str(player_id), username, pw_hash, self._t(created_at))

    async def player_by_name(self, username: str) -> dict | None:
        row = await self._do("player_by_name", username, fetch="one")
        return None if row is None else _player_row(row)

    async def player_by_id(self, player_id: UUID) -> dict | None:
        row = await self._do("player_by_id", str(player_id), fetch="one")
        return None if row is None else _player_row(row)

    async def set_last_login(self, player_id: UUID, when: _dt.datetime) -> None:
        await self._do("set_last_login", self._t(when), str(player_id))

    async def insert_session(self, digest: str, player_id: UUID, created_at: _dt.datetime,
                             expires_at: _dt.datetime | None) -> None:
        await self._do("insert_session", digest, str(player_id), self._t(created_at), self._t(expires_at))

    async def session(self, digest: str) -> tuple[UUID, _dt.datetime | None, str] | None:
        """(player id, expiry, username) of a session, or None."""
        row = await self._do("session", digest, fetch="one")
        return None if row is None else (_as_uuid(row[0]), _to_datetime(row[1]), row[2])

    async def delete_session(self, digest: str) -> None:
        await self._do("delete_session", digest)

    async def delete_expired_sessions(self, now: _dt.datetime) -> None:
        await self._do("delete_expired_sessions", self._t(now))

    async def delete_sessions(self, player_id: UUID, keep: int = 0) -> list[str]:
        """End the player's sessions but the ``keep`` newest; the digests of those ended."""
        pid = str(player_id)
        rows = await (self._do("delete_old_sessions", pid, pid, keep, fetch="all") if keep
                      else self._do("delete_player_sessions", pid, fetch="all"))
        return [r[0] for r in rows or []]

    async def insert_zone(self, zone: Zone, tick_number: int = 0) -> None:
        """A new zone whose ticks are numbered on from ``tick_number``."""
        await self._do("insert_zone", str(zone.id), zone.name, zone.width, zone.height, json_dumps(zone.metadata),
                       self._t(zone.created_at), self._t(zone.updated_at), tick_number)

    async def delete_zone(self, zone_id: UUID, entity_ids: list[UUID], epoch: int = 0) -> None:
        """The zone, its entities, and ``entity_ids`` (entities moved into it since the last
        flush: their rows still name another zone), in one transaction; in a cluster, fenced
        at ``epoch``."""
        zid = str(zone_id)
        await self.dialect.run([*([_fence_step({zone_id: epoch}, self.node)] if self.node else []),
                                _Step(_SQL["delete_zone_entities"], (zid,)), *self.dialect.delete_ids(entity_ids),
                                _Step(_SQL["delete_zone"], (zid,))])

    async def load(self) -> tuple[list[Zone], list[Entity], dict[UUID, ZoneMark]]:
        """The saved world: zones, entities, and each zone's mark (the tick its saved state is
        at, and the players its module knew as joined)."""
        zones = await self.dialect.run([_Step(_SQL["zones"])], "all")
        entities = await self.dialect.run([_Step(_SQL["entities"])], "all")
        return ([_zone_row(r) for r in zones], [_entity_row(r) for r in entities],
                {_as_uuid(r[0]): (int(r[7]), tuple(json_loads(r[8] or "[]"))) for r in zones})

    def prepare_flush(self, rows: list[EntityRow], deleted: list[UUID], marks: dict[UUID, ZoneMark] | None = None,
                      keep: int | None = None, snapshots: dict[UUID, tuple[int, list[EntityRow]]] | None = None,
                      fence: Mapping[UUID, int] | None = None) -> tuple[list[_Step], int]:
        """In the flush thread: the flush's statements, serialized. ``marks`` are the zones'
        tick numbers the rows are as of (and their joined players); ``snapshots`` whole zones
        to save as of theirs; with ``keep``, journal rows more than ``keep`` ticks older than
        their zone's saved state go, and the snapshots no kept tick can start from. In cluster
        mode ``fence`` holds the epoch of every zone the rows come from: the write is refused
        (``Fenced``) unless this node still owns them all at those epochs."""
        steps = [_fence_step(fence, self.node)] if fence and self.node else []
        steps += self.dialect.flush_steps(rows, deleted, fence if self.node else None) if rows or deleted else []
        if marks:
            steps += self.dialect.zone_marks(marks)
        if snapshots:
            steps += self.dialect.snapshot_steps(snapshots)
        if keep is not None:
            steps += [_Step(_SQL["trim_journal"], (keep,)), _Step(_SQL["trim_snapshots"], (2 * keep,))]
        return steps, len(rows) + sum(len(r) for _, r in (snapshots or {}).values())

    async def snapshot_before(self, zone_id: UUID, tick_number: int) -> tuple[int, list[Entity]] | None:
        """The newest saved snapshot of the zone from before ``tick_number``: (its tick, entities)."""
        row = await self._do("snapshot_before", str(zone_id), tick_number, fetch="one")
        if row is None:
            return None
        return int(row[0]), [Entity(UUID(e[0]), zone_id, e[1], e[2], e[3], e[4], e[5], e[6], e[7])
                             for e in json_loads(row[1])]

    async def drop_after(self, zone_id: UUID, tick_number: int, epoch: int = 0) -> None:
        """Forget the zone's journal and snapshots after ``tick_number`` (a rewind); in a
        cluster, fenced at ``epoch``."""
        zid = str(zone_id)
        await self.dialect.run([*([_fence_step({zone_id: epoch}, self.node)] if self.node else []),
                                _Step(_SQL["journal_drop_after"], (zid, tick_number)),
                                _Step(_SQL["snapshots_drop_after"], (zid, tick_number))])

    async def write_journal(self, rows: list[tuple]) -> None:
        """One transaction of journal rows ``(zone_id, tick_number, seed, at, inputs JSON, epoch)``;
        in cluster mode fenced by the rows' epochs (``Fenced``): rows of an older epoch than
        the newest of their zone's in the batch are dropped (that owner's ticks never happened),
        and of a tick given twice the last is written."""
        if not self.node:
            await self.dialect.run(self.dialect.journal_steps(rows))
            return
        fence: dict[UUID, int] = {}
        for r in rows:
            fence[r[0]] = max(fence.get(r[0], 0), r[5])
        rows = list({(r[0], r[1]): r for r in rows if r[5] == fence[r[0]]}.values())
        await self.dialect.run([*([_fence_step(fence, self.node)] if fence else []),
                                *self.dialect.journal_steps(rows)])

    async def journal_after_flush(self) -> list[tuple]:
        """Every journaled tick after its zone's saved state, by zone and tick."""
        return [(_as_uuid(r[0]), *r[1:]) for r in await self.dialect.run([_Step(_SQL["journal_after_flush"])], "all")]

    async def usernames(self) -> dict[UUID, str]:
        """Every player's username (for replays: usernames never change)."""
        return {_as_uuid(r[0]): r[1] for r in await self._do("usernames", fetch="all")}

    async def usernames_of(self, player_ids: Iterable[str]) -> dict[UUID, str]:
        """The usernames of these players (ids as text; cluster, PostgreSQL)."""
        ids = sorted(set(player_ids))
        return {_as_uuid(r[0]): r[1] for r in await self._cluster("usernames_of", json_dumps(ids))} if ids else {}

    async def journal_range(self, zone_id: UUID, first: int, last: int) -> list[tuple]:
        rows = await self._do("journal_range", str(zone_id), first, last, fetch="all")
        return [(_as_uuid(r[0]), *r[1:]) for r in rows]

    async def flush(self, prepared: tuple[list[_Step], int]) -> None:
        """Write a prepared flush in one transaction (big flushes may take longer)."""
        steps, count = prepared
        await self.dialect.run(steps, timeout=self.dialect.timeout * (1 + count // 20000))

    # -- cluster (PostgreSQL) ----------------------------------------------------------------
    async def _cluster(self, name: str, *args: Any, fetch: str = "all") -> Any:
        return await self.dialect.run([_Step(_CLUSTER_SQL[name], args)], fetch)

    async def beat(self, node: str, connections: int, lease: float) -> None:
        """This node is alive (its row in ``nodes``); rows of nodes gone for long are pruned."""
        await self.dialect.run([_Step(_CLUSTER_SQL["node_beat"], (node, connections)),
                                _Step(_CLUSTER_SQL["prune_nodes"], (max(60.0, lease * 12),))])

    async def node_gone(self, node: str) -> None:
        await self._cluster("node_gone", node, fetch="none")

    async def renew(self, node: str, lease: float) -> dict[UUID, int]:
        """Extend every claim of ``node``: the zones it still owns, with their epochs."""
        return {_as_uuid(r[0]): int(r[1]) for r in await self._cluster("renew", lease, node)}

    async def claim(self, node: str, zone_id: UUID, lease: float) -> int | None:
        """Take a zone nobody holds (free, its claim lapsed, or held under this node's name by
        an earlier process): its new epoch, or None."""
        row = await self._cluster("claim", node, lease, str(zone_id), node, fetch="one")
        return None if row is None else int(row[0])

    async def release(self, node: str, zone_ids: Iterable[UUID]) -> None:
        await self._cluster("release", node, [str(z) for z in zone_ids], fetch="none")

    async def directory(self, lease: float) -> tuple[list[tuple], list[tuple]]:
        """Every zone ``(Zone, owner, epoch, claim live)`` and node ``(name, started_at,
        last_seen, connections, alive)``."""
        zones = await self._cluster("directory")
        nodes = await self._cluster("nodes", lease)
        return [(_zone_row(r), r[7], int(r[8]), bool(r[9])) for r in zones], [tuple(r) for r in nodes]

    async def load_zone(self, zone_id: UUID) -> tuple[Zone, list[Entity], ZoneMark, list[tuple]] | None:
        """One zone as saved, for the node taking it over: its record, entities, mark, and the
        journaled ticks after its last flush."""
        zid = str(zone_id)
        row = await self._cluster("zone", zid, fetch="one")
        if row is None:
            return None
        entities = await self._cluster("zone_entities", zid)
        journal = await self._cluster("zone_journal", zid)
        return (_zone_row(row), [_entity_row(r) for r in entities],
                (int(row[7]), tuple(json_loads(row[8] or "[]"))), [(_as_uuid(r[0]), *r[1:]) for r in journal])


def _snapshot_rows(rows: list[EntityRow]) -> list[list]:
    return [[str(r.id), r.x, r.y, r.width, r.height, r.metadata, r.entity.created_at, r.updated_at] for r in rows]


def _player_row(row: tuple) -> dict:
    return {"id": _as_uuid(row[0]), "username": row[1], "password_hash": row[2],
            "created_at": _to_datetime(row[3]), "last_login": _to_datetime(row[4])}


def _to_datetime(value: Any) -> _dt.datetime | None:
    if value is None or isinstance(value, _dt.datetime):
        return value
    return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _time_column(value: Any) -> _dt.datetime:
    """A NOT NULL time column: a datetime (PostgreSQL) or ISO 8601 text (SQLite)."""
    when = _to_datetime(value)
    assert when is not None, "a NOT NULL time column held NULL"
    return when


def _zone_row(row: tuple) -> Zone:
    meta = row[4] if isinstance(row[4], dict) else json_loads(row[4])
    return Zone(_as_uuid(row[0]), row[1], row[2], row[3], meta, _time_column(row[5]), _time_column(row[6]))


def _entity_row(row: tuple) -> Entity:
    meta = row[6] if isinstance(row[6], dict) else json_loads(row[6])
    return Entity(_as_uuid(row[0]), _as_uuid(row[1]), row[2], row[3], row[4], row[5], meta,
                  _time_column(row[7]).timestamp(), _time_column(row[8]).timestamp())


def open_store(cfg: Config) -> Store:
    """The store the DSN names (not yet opened)."""
    dsn = cfg.get("database", "dsn")
    timeout = cfg.get("database", "timeout")
    if dsn.startswith("sqlite:///"):
        return Store(_Sqlite(dsn[len("sqlite:///"):] or "gridserver.db", timeout))
    return Store(_Postgres(dsn, cfg.get("database", "pool_min"), cfg.get("database", "pool_max"), timeout))


# =============================================================================
# Accounts and sessions
# =============================================================================

_USERNAME_RE = re.compile(r"[A-Za-z0-9_.-]{3,32}")


@dataclass(slots=True)
class Session:
    """An authenticated session; the token itself is never kept, only its digest."""

    digest: str
    player_id: UUID
    username: str
    expires_at: float | None  # seconds since the epoch; None: until logout
    checked_at: float = 0.0   # monotonic time the database last confirmed it


def token_digest(token: str) -> str:
    """The only form in which a session token is stored: SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class _FailureWindow:
    """Failures per key (a username, a client address) over the last ``window`` seconds.

    A key with ``limit`` failures in the window is locked until the oldest of them is
    ``window`` seconds old. At most ``max_keys`` keys are remembered: past that, keys whose
    failures have all expired go first, then the oldest keys.
    """

    def __init__(self, limit: int, window: float = 60.0, max_keys: int = 100_000):
        self.limit, self.window, self.max_keys = limit, window, max_keys
        self._fails: dict[str, collections.deque[float]] = {}

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again (0: it may now)."""
        fails = self._fails.get(key)
        if fails is None:
            return 0.0
        while fails and fails[0] <= now - self.window:
            fails.popleft()
        if not fails:
            del self._fails[key]
            return 0.0
        return fails[0] + self.window - now if len(fails) >= self.limit else 0.0

    def fail(self, key: str, now: float) -> bool:
        """Count a failure of ``key``; True when this failure locked it (not when it was already)."""
        locked = self.retry_after(key, now) > 0
        fails = self._fails.get(key)
        if fails is None:
            if len(self._fails) >= self.max_keys:
                self._forget(now)
            fails = self._fails[key] = collections.deque(maxlen=self.limit)
        fails.append(now)
        return not locked and len(fails) >= self.limit

    def _forget(self, now: float) -> None:
        for key in [k for k, f in self._fails.items() if not f or f[-1] <= now - self.window]:
            del self._fails[key]
        for key in list(itertools.islice(self._fails, max(0, len(self._fails) - self.max_keys // 2))):
            del self._fails[key]


class Accounts:
    """Registration, login and sessions. bcrypt runs in its own thread pool, off the loop.

    Sessions found valid are cached in memory; logout removes the session from the cache and
    the database at once. A cached session is confirmed against the database again after
    ``recheck`` seconds (a session deleted behind the server's back then ends), except while
    the database is unreachable: sessions in use keep working through an outage.

    Policies against floods and guessing:

    * At most ``max_pending_hashes`` bcrypt jobs wait at once: past that a login or
      registration answers 503 ``busy`` at once, rather than queueing longer than any client
      would wait. One client address may hold at most an eighth of them (429 past that), so
      an anonymous flood from one address never locks the others out.
    * ``max_failed_logins`` failures a minute per username and per client address: past that,
      every login of that username or from that address answers 429 ``too_many_attempts``
      with ``Retry-After``, even with the right password, without any bcrypt work, until the
      oldest failure is a minute old. Failed logins are logged (username and address, never
      the password). The price of the username limit: anyone can keep one player from
      logging in for as long as they keep failing as that player, 10 times a minute from
      addresses of their own; sessions in use are not touched.
    * A player holds at most ``max_sessions`` sessions: a login past that ends the oldest.
    """

    CACHE_LIMIT = 200_000
    recheck = 60.0  #: seconds a cached session is trusted before the database confirms it again

    def __init__(self, store: Store, cfg: Config, metrics: "Metrics | None" = None):
        self.store = store
        self.metrics = metrics or Metrics()
        self.rounds = cfg.get("auth", "bcrypt_rounds")
        self.min_length = cfg.get("auth", "min_password_length")
        self.ttl = cfg.get("auth", "session_ttl")
        self.executor = ThreadPoolExecutor(cfg.get("auth", "bcrypt_threads"), thread_name_prefix="gridserver-bcrypt")
        self.max_pending = cfg.get("auth", "max_pending_hashes")
        self.max_pending_per_address = max(1, self.max_pending // 8)
        self.max_sessions = cfg.get("auth", "max_sessions")
        limit = cfg.get("auth", "max_failed_logins")
        self.failed_by_name = _FailureWindow(limit)
        self.failed_by_address = _FailureWindow(limit)
        self._pending = 0
        self._pending_by_address: dict[str, int] = {}
        self._cache: dict[str, Session] = {}
        self._dummy_hash: bytes | None = None

    def _too_many(self, seconds: float, what: str) -> GridError:
        self.metrics.logins_throttled_total += 1
        wait = max(1, math.ceil(seconds))
        return GridError("too_many_attempts", f"Too many {what}; try again in {wait} seconds.",
                        {"Retry-After": str(wait)})

    async def _bcrypt(self, address: str, fn: Callable, *args: Any) -> Any:
        if self._pending >= self.max_pending:
            raise GridError("busy", "Too many logins at once; try again in a few seconds.")
        mine = self._pending_by_address.get(address, 0)
        if mine >= self.max_pending_per_address:
            raise self._too_many(1, "logins at once from your address")
        self._pending += 1
        self._pending_by_address[address] = mine + 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self._pending -= 1
            left = self._pending_by_address.pop(address) - 1
            if left:
                self._pending_by_address[address] = left

    async def _hash(self, password: bytes, address: str = "") -> str:
        hashed: bytes = await self._bcrypt(address, bcrypt.hashpw, password, bcrypt.gensalt(self.rounds))
        return hashed.decode("ascii")

    async def _check(self, password: bytes, hashed: bytes, address: str) -> bool:
        return bool(await self._bcrypt(address, bcrypt.checkpw, password, hashed))

    def _password_bytes(self, password: str) -> bytes:
        try:
            raw = password.encode("utf-8")
        except UnicodeEncodeError:
            raise GridError("bad_request", "The field 'password' is not valid Unicode text.") from None
        if len(password) < self.min_length:
            raise GridError("bad_request", f"The field 'password' must be at least {self.min_length} characters.")
        if len(raw) > 72:
            raise GridError("bad_request", "The field 'password' must be at most 72 bytes in UTF-8.")
        if b"\x00" in raw:
            raise GridError("bad_request", "The field 'password' must not contain NUL characters.")
        return raw

    async def register(self, username: str, password: str, address: str = "") -> dict:
        if not _USERNAME_RE.fullmatch(username):
            raise GridError("bad_request",
                           "The field 'username' must be 3 to 32 characters of letters, digits, '_', '.' or '-'.")
        raw = self._password_bytes(password)
        if await self.store.player_by_name(username) is not None:
            raise GridError("username_taken", f"The username {username!r} is taken.")
        hashed = await self._hash(raw, address)
        player_id, created = uuid.uuid4(), _now()
        try:
            await self.store.insert_player(player_id, username, hashed, created)
        except UniqueViolation:  # a concurrent registration of the same name won the race
            raise GridError("username_taken", f"The username {username!r} is taken.") from None
        return {"id": str(player_id), "username": username, "created_at": _iso(created)}

    async def login(self, username: str, password: str, address: str = "") -> tuple[dict, list[str]]:
        """Log in: (the answer, digests of the player's sessions this login ended).

        Unknown users and wrong passwords get the same answer after the same bcrypt work; a
        username or address over ``max_failed_logins`` gets 429 before any (see the class).
        """
        valid_name = _USERNAME_RE.fullmatch(username) is not None
        clock = time.monotonic()
        wait = max(self.failed_by_name.retry_after(username, clock) if valid_name else 0.0,
                   self.failed_by_address.retry_after(address, clock))
        if wait > 0:
            raise self._too_many(wait, "failed logins for this username or from your address")
        if self._dummy_hash is None:
            self._dummy_hash = (await self._hash(secrets.token_bytes(16), address)).encode("ascii")
        full = password.encode("utf-8", "surrogatepass")
        raw = full[:72].replace(b"\x00", b"")  # bcrypt refuses NUL; the check below fails such a password
        player = await self.store.player_by_name(username) if valid_name else None
        hashed = player["password_hash"].encode("ascii") if player else self._dummy_hash
        ok = await self._check(raw, hashed, address)
        if not ok or player is None or len(full) > 72 or b"\x00" in full:
            self._failed(username if valid_name else None, address)
            raise GridError("invalid_credentials", "The username or password is wrong.")
        token = secrets.token_urlsafe(32)
        now = _now()
        expires = now + _dt.timedelta(seconds=self.ttl) if self.ttl else None
        await self.store.insert_session(token_digest(token), player["id"], now, expires)
        await self.store.set_last_login(player["id"], now)
        ended = await self.store.delete_sessions(player["id"], keep=self.max_sessions)
        for digest in ended:
            self._cache.pop(digest, None)
        return {"token": token, "player_id": str(player["id"]), "expires_at": _iso(expires)}, ended

    def _failed(self, username: str | None, address: str) -> None:
        """Count and log a failed login (never the password)."""
        self.metrics.failed_logins_total += 1
        clock = time.monotonic()
        log.info("failed login for %r from %s", (username or "(not a valid username)")[:40], address or "?")
        for window, key, what in ((self.failed_by_name, username, "username"),
                                  (self.failed_by_address, address, "address")):
            if key is not None and window.fail(key, clock):
                log.warning("%d failed logins a minute for the %s %r: its logins answer 429 for a minute",
                            window.limit, what, key[:40])

    async def authenticate(self, token: str | None) -> Session | None:
        """The live session of ``token``, or None when it is unknown, expired or logged out."""
        if not token or len(token) > 256:
            return None
        digest = token_digest(token)
        session = self._cache.get(digest)
        if session is not None and time.monotonic() - session.checked_at > self.recheck:
            try:
                if await self.store.session(digest) is None:
                    self._cache.pop(digest, None)
                    return None
                session.checked_at = time.monotonic()
            except DatabaseUnavailable:
                pass  # keep serving the session from memory until the database answers
        if session is None:
            row = await self.store.session(digest)
            if row is None:
                return None
            expires = row[1].timestamp() if row[1] is not None else None
            session = Session(digest, row[0], row[2], expires, time.monotonic())
            if len(self._cache) >= self.CACHE_LIMIT:
                self._cache.clear()
            self._cache[digest] = session
        if session.expires_at is not None and session.expires_at <= time.time():
            self._cache.pop(digest, None)
            return None
        return session

    async def logout(self, session: Session, everywhere: bool = False) -> list[str]:
        """End the session (``everywhere``: every session of its player); the digests ended."""
        if everywhere:
            ended = await self.store.delete_sessions(session.player_id)
        else:
            await self.store.delete_session(session.digest)
            ended = []
        for digest in {session.digest, *ended}:
            self._cache.pop(digest, None)
        return ended or [session.digest]

    async def me(self, session: Session) -> dict:
        player = await self.store.player_by_id(session.player_id)
        if player is None:  # deleted behind the server's back
            raise GridError("unauthorized", "The session's player no longer exists.")
        return player


# =============================================================================
# Cluster: zone ownership in PostgreSQL, wake-ups over NATS
# =============================================================================


class Cluster:
    """This node's part in one world spread over many nodes (``[cluster] nats_url`` set).

    Every zone is ticked by one node, its owner, which holds a lease on it in PostgreSQL
    (``zones.owner``, ``lease_until``) with a fencing number (``zones.epoch``) that grows at
    every change of owner. Policies:

    * Every ``lease / 4`` seconds (a *round*): the node's row in ``nodes`` is renewed, then
      its leases. A zone whose lease came back with another epoch, or not at all, was taken
      over (or deleted): it is dropped at once (``drop``).
    * The node takes free zones and zones whose lease lapsed (claiming increments the
      epoch) until it holds its share, ``ceil(zones / live nodes)``; a node holding two
      zones more than the emptiest live node (and no zone free) hands half the difference
      over (``hand_over``, outside the round: the zones stop ticking, are flushed, then
      released) and wakes the others, who claim them at once. A new node therefore takes
      its share within a round or two.
    * Writes of a zone's state carry its epoch and are fenced in the database
      (``_fence_step``): a write of a zone taken over is refused, whatever the clocks say.
      On top of that, a node whose last renewal began more than ``0.8 * lease`` ago ticks
      nothing (``may_tick``): a node paused or cut off from the database stops on its own
      before its leases can lapse, and its zones go on elsewhere from the database and the
      journal.
    * NATS carries wake-ups here (``gridserver.wake``: a zone was released or created, a
      node left): every node then runs a round at once instead of at its next period.
      Without NATS the rounds still converge, at their period. (The players' traffic over
      NATS is ``Relay``'s.)
    """

    def __init__(self, store: Store, cfg: Config, *, port: int,
                 adopt: Callable[[UUID, int], Awaitable[bool]],
                 drop: Callable[[set[UUID], str], Awaitable[None]],
                 hand_over: Callable[[set[UUID]], Awaitable[None]],
                 connections: Callable[[], int]):
        self.store = store
        #: called after every round (the relay shares its zones' counts), and after this node
        #: took a zone (the relay tells the players' nodes at once)
        self.on_round: Callable[[], None] | None = None
        self.on_owned: Callable[[UUID, int], None] | None = None
        #: ``on_loading(zone_id, started)``: this node starts claiming and loading a zone, or is
        #: done with it (taken or not): messages about it wait meanwhile
        self.on_loading: Callable[[UUID, bool], None] | None = None
        self.node = cfg.get("cluster", "node_name") or f"{socket.gethostname()}:{port}:{os.getpid()}"
        self.lease = cfg.get("cluster", "lease")
        self.period = self.lease / 4
        self.urls = [u.strip() for u in cfg.get("cluster", "nats_url").split(",") if u.strip()]
        self.subject = "gridserver.wake"
        self._adopt, self._drop, self._hand_over, self._connections = adopt, drop, hand_over, connections
        #: zones this node owns, with the epoch it holds them at (written on the loop only)
        self.owned: dict[UUID, int] = {}
        #: the directory as of the last round: every zone's record, owner and epoch (read by
        #: game threads through ``FrameworkAPI.list_zones``: replaced whole, never changed)
        self.zones: dict[UUID, tuple[Zone, str | None, int, bool]] = {}
        self.nodes: list[tuple] = []
        self.renewed_at: float | None = None  # monotonic start of the last renewal that succeeded
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        #: held by a round, and by a zone's creation here (so a round never counts a zone being
        #: created as lost)
        self.lock = asyncio.Lock()
        self._leaving = False
        self._handing: asyncio.Task | None = None  # a hand-over under way (outside the rounds)
        self.nc: Any = None

    # -- what others ask -------------------------------------------------------------------
    def may_tick(self) -> bool:
        """Whether this node's leases are surely still its own (see the class's policies)."""
        return self.renewed_at is not None and time.monotonic() - self.renewed_at < self.lease * 0.8

    def catalog(self) -> list[Zone]:
        """Every zone of the world, wherever it ticks (as of the last round)."""
        return [z for z, _, _, _ in self.zones.values()]

    def owner_of(self, zone_id: UUID) -> str | None:
        entry = self.zones.get(zone_id)
        return entry[1] if entry is not None and entry[3] else None

    def view(self) -> dict:
        """``GET /api/debug/cluster``: the nodes and where each zone ticks."""
        counts = collections.Counter(owner for _, owner, _, live in self.zones.values() if live)
        return {"node": self.node,
                "nodes": [{"name": name, "zones": counts.get(name, 0), "connections": conns,
                           "last_seen": _iso(last_seen), "started_at": _iso(started), "alive": alive}
                          for name, started, last_seen, conns, alive in self.nodes],
                "zones": sorted(({"zone_id": str(z.id), "name": z.name, "node": owner if live else None,
                                  "epoch": epoch} for z, owner, epoch, live in self.zones.values()),
                                key=lambda d: d["name"])}

    # -- start, rounds, stop ---------------------------------------------------------------
    async def connect(self) -> None:
        """Connect to NATS (``pip install 'gridserver[cluster]'``) and read the directory."""
        try:
            import nats  # the [cluster] extra: imported only when configured
        except ImportError:
            raise ConfigError("[cluster] nats_url is set but nats-py is not installed: "
                              "pip install 'gridserver[cluster]'") from None

        async def woken(msg: Any) -> None:
            if msg.data.decode(errors="replace") != self.node:
                self._wake.set()

        async def error(exc: Exception) -> None:
            log.warning("cluster: NATS: %s", exc)
        try:
            self.nc = await nats.connect(servers=self.urls, name=self.node, connect_timeout=2,
                                         allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                         error_cb=error)
        except Exception as exc:  # noqa: BLE001 - nats raises its own kinds
            raise DatabaseUnavailable(f"cannot connect to NATS at {', '.join(self.urls)}: {exc}") from None
        await self.nc.subscribe(self.subject, cb=woken)
        await self.refresh()
        log.info("cluster: node %s, %d zones in the world, lease %.1f s", self.node, len(self.zones), self.lease)

    async def refresh(self) -> None:
        """Read the directory again; news of a newer owner heard meanwhile (``set_owner``) is kept."""
        zones, nodes = await self.store.directory(self.lease)
        known = self.zones
        self.zones = {z.id: (known[z.id] if z.id in known and known[z.id][2] > epoch else (z, owner, epoch, live))
                      for z, owner, epoch, live in zones}
        self.nodes = nodes

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.round()
            except (DatabaseUnavailable, psycopg2.Error) as exc:
                log.warning("cluster: round failed (%s); ticks stop %.1f s after the last renewal",
                            str(exc).strip()[:200], self.lease * 0.8)
            except Exception:  # noqa: BLE001 - the rounds must go on
                log.exception("cluster: round failed")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # rounds start a period apart
                await asyncio.wait_for(self._wake.wait(), max(0.0, started + self.period - time.monotonic()))

    async def wake_others(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.publish(self.subject, self.node.encode())

    async def _renew(self) -> dict[UUID, int]:
        started = time.monotonic()
        await self.store.beat(self.node, self._connections(), self.lease)
        held = await self.store.renew(self.node, self.lease)
        self.renewed_at = started
        return held

    async def round(self) -> None:
        """Renew, drop what was lost, take a share, hand over a surplus (see the policies)."""
        async with self.lock:
            if self._leaving:
                return
            held = await self._renew()
            await self.refresh()
            lost = {z for z, epoch in self.owned.items() if held.get(z) != epoch}
            for zone_id in lost:
                self.owned.pop(zone_id, None)
            if lost - self.zones.keys():
                await self._drop(lost - self.zones.keys(), "deleted")
            if lost & self.zones.keys():
                await self._drop(lost & self.zones.keys(), "taken over by another node")
            for zone_id in held.keys() - self.owned.keys():  # this node's name, an earlier life's claims
                await self._claim(zone_id)
            alive = [n[0] for n in self.nodes if n[4]] or [self.node]
            share = -(-len(self.zones) // max(1, len(alive)))
            free = [zid for zid, (_, owner, _, live) in self.zones.items() if not live and zid not in self.owned]
            # Each node tries the free zones in its own order, so that nodes starting together
            # rarely race for the same one (the claim is atomic either way).
            free.sort(key=lambda z: hashlib.blake2b(f"{self.node}/{z}".encode(), digest_size=8).digest())
            counts = collections.Counter(owner for _, owner, _, live in self.zones.values() if live)
            fewest = min(counts.get(n, 0) for n in alive if n != self.node) if len(alive) > 1 else None
            claimed = 0
            for zone_id in free:
                if not self.may_tick() or (len(self.owned) >= share and fewest is not None and fewest < share):
                    break  # past its share, a node leaves free zones to the nodes below theirs
                if time.monotonic() - (self.renewed_at or 0.0) > self.period:
                    await self._renew()  # a long round (many zones to load) keeps its leases
                claimed += await self._claim(zone_id)
            if claimed:
                await self.wake_others()  # their players of these zones follow them here
            # Even out: a node holding two zones more than the emptiest live node gives some up.
            # (not while zones are free: the nodes below their share are about to take them)
            surplus = (len(self.owned) - fewest) // 2 if fewest is not None and not free else 0
            if surplus > 0 and (self._handing is None or self._handing.done()):
                give = set(sorted(self.owned)[:surplus])
                self._handing = asyncio.ensure_future(self._give(give))
            if self.on_round is not None:
                self.on_round()

    async def _give(self, zone_ids: set[UUID]) -> None:
        """A hand-over, outside the rounds (its flush may take a while; the rounds go on)."""
        try:
            await self._hand_over(zone_ids)
            await self.wake_others()
        except Exception:  # noqa: BLE001 - the zones stay here; a later round tries again
            log.exception("cluster: handing zones over failed")

    async def _claim(self, zone_id: UUID) -> bool:
        if self.on_loading is not None:
            self.on_loading(zone_id, True)
        try:
            epoch = await self.store.claim(self.node, zone_id, self.lease)
            if epoch is None:
                return False
            self.owned[zone_id] = epoch
            try:
                if await self._adopt(zone_id, epoch):
                    self._owns(zone_id, epoch)
                    return True
            except Exception:  # noqa: BLE001 - give it back for another node to try
                log.exception("cluster: taking zone %s over failed", zone_id)
            self.owned.pop(zone_id, None)
            with contextlib.suppress(Exception):
                await self.store.release(self.node, [zone_id])
            return False
        finally:
            if self.on_loading is not None:
                self.on_loading(zone_id, False)

    async def claim_new(self, zone_id: UUID) -> int | None:
        """A zone this node just created: claim it at once (its epoch, or None if another node
        was quicker). The caller holds ``lock``."""
        epoch = await self.store.claim(self.node, zone_id, self.lease)
        if epoch is not None:
            self.owned[zone_id] = epoch
        await self.wake_others()
        return epoch

    def _owns(self, zone_id: UUID, epoch: int) -> None:
        """The directory as this node knows it: the zone is this node's now (before the next
        round reads it back), and the players' nodes hear it at once (``on_owned``)."""
        self.set_owner(zone_id, self.node, epoch)
        if self.on_owned is not None:
            self.on_owned(zone_id, epoch)

    def set_owner(self, zone_id: UUID, node: str | None, epoch: int) -> None:
        entry = self.zones.get(zone_id)
        if entry is not None:  # replaced whole: game threads read the directory
            self.zones = {**self.zones, zone_id: (entry[0], node, epoch, node is not None)}

    async def released(self, zone_ids: set[UUID]) -> None:
        """After ``hand_over`` flushed these zones and dropped them: give the leases back."""
        for zone_id in zone_ids:
            self.owned.pop(zone_id, None)
            self.set_owner(zone_id, None, self.zones[zone_id][2] if zone_id in self.zones else 0)
        await self.store.release(self.node, zone_ids)

    async def leave(self) -> None:
        """Stop taking zones (a graceful stop hands them over afterwards)."""
        self._leaving = True
        if self._handing is not None:
            with contextlib.suppress(Exception):
                await self._handing
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def close(self) -> None:
        """After the hand-over: forget this node's row, wake the others, close NATS."""
        with contextlib.suppress(Exception):
            await self.store.node_gone(self.node)
        await self.wake_others()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 2)
            with contextlib.suppress(Exception):
                await self.nc.close()


# =============================================================================
# Hub: connections, subscriptions, sending
# =============================================================================

#: Close codes beyond the standard ones.
CLOSE_REPLACED = 4000   # the player connected again elsewhere
CLOSE_SESSION_ENDED = 4001  # logout or session expiry

#: Bytes a client's socket may hold unsent before new ticks skip it (newest state wins).
SEND_BUFFER_LIMIT = 256 * 1024
#: Bytes past which the client is disconnected outright, whatever the messages.
SEND_BUFFER_HARD_LIMIT = 4 * 1024 * 1024
#: The kernel's send buffer per WebSocket (it would otherwise grow to megabytes per client).
KERNEL_SEND_BUFFER = 128 * 1024


class Connection:
    """One player's live WebSocket.

    Messages are written straight to the transport as prebuilt frames, so a send never
    waits. A client that stops reading is skipped for ticks while its socket holds more
    than ``SEND_BUFFER_LIMIT`` unsent bytes (it gets the newest tick once it catches up),
    and is disconnected after ``max_behind`` skipped ticks or past ``SEND_BUFFER_HARD_LIMIT``.
    """

    __slots__ = ("ws", "transport", "session", "player_id", "player_text", "username", "zone_id", "connected_at",
                 "behind", "closed", "expiry_handle", "hub", "received", "seen", "pinged", "routed")

    def __init__(self, hub: "Hub", ws: web.WebSocketResponse, transport: Any, session: Session):
        self.hub = hub
        self.ws = ws
        self.transport = transport
        self.session = session
        self.player_id = session.player_id
        self.player_text = str(session.player_id)  # as the journal writes it, once per connection
        self.username = session.username
        self.zone_id: UUID | None = None
        self.connected_at = _now()
        self.behind = 0
        self.closed = False
        self.expiry_handle: asyncio.TimerHandle | None = None
        self.received = 0  # frames from the client, pongs included: the heartbeat's evidence of life
        self.seen = 0
        self.pinged = False
        #: cluster: the zone ticking on another node that this player's messages go to (its
        #: subscribe may still be on the way: ``zone_id`` is set when the owner answers)
        self.routed: UUID | None = None

    def _write(self, frame: bytes) -> bool:
        t = self.transport
        if self.closed or t is None or t.is_closing():
            return False
        if t.get_write_buffer_size() > SEND_BUFFER_HARD_LIMIT:
            self.abort()
            return False
        t.write(frame)
        m = self.hub.metrics
        m.messages_sent_total += 1
        m.bytes_sent_total += len(frame)
        return True

    def send(self, message: dict) -> None:
        """Queue one control message (answers and errors); never waits."""
        self._write(ws_text_frame(json_dumps(message).encode("utf-8")))

    def error(self, code: str, message: str) -> None:
        self.send({"type": "error", "code": code, "message": message})

    def send_tick(self, frame: bytes, max_behind: int) -> bool:
        """Write a tick's frame unless the socket is closing or this client is behind; whether
        it was written (the caller counts what was sent: once per zone, not per frame)."""
        t = self.transport
        if self.closed or t is None or t.is_closing():
            return False
        if t.get_write_buffer_size() > SEND_BUFFER_LIMIT:
            self.behind += 1
            self.hub.metrics.ticks_dropped_total += 1
            if self.behind > max_behind:
                self.hub.metrics.slow_clients_disconnected_total += 1
                log.info("disconnecting %s: %d ticks behind", self.username, self.behind)
                self.abort()
            return False
        self.behind = 0
        t.write(frame)  # under SEND_BUFFER_LIMIT here, so under _write's hard limit too
        return True

    def abort(self) -> None:
        """Drop the connection at once (for clients that do not read)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame and wait (briefly) for the client's; aborts if it does not answer."""
        self.closed = True
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()), 2.0)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            if self.transport is not None:
                self.transport.abort()



class RemotePlayer(Connection):
    """Cluster, on a zone's owner: a player whose socket is on another node (its *gateway*).

    The hub keeps it in ``subscribers`` like a local connection (so joins, leaves, intents,
    rate limits and frames follow the same rules) but never in ``conns``. Everything it is
    sent, and every change of its zone, is queued in order for its gateway (``Relay.queue``),
    which applies them to the player's real connection.
    """

    __slots__ = ("node", "_zone", "_relay")

    def __init__(self, hub: "Hub", relay: Any, node: str, player_id: UUID, username: str):
        self.hub, self._relay, self.node = hub, relay, node
        self.ws, self.transport = None, None  # type: ignore[assignment]
        self.session = Session("", player_id, username, None)
        self.player_id, self.player_text, self.username = player_id, str(player_id), username
        self._zone: UUID | None = None
        self.connected_at = _now()
        self.behind, self.closed, self.expiry_handle = 0, False, None
        self.received = self.seen = 0
        self.pinged = False
        self.routed = None

    @property
    def zone_id(self) -> UUID | None:
        return self._zone

    @zone_id.setter
    def zone_id(self, value: UUID | None) -> None:
        if value != self._zone and not self.closed:
            if value is None:
                self._relay.queue(self.node, "u", self._zone, self.player_text, b"")
            else:
                self._relay.queue(self.node, "z", value, self.player_text, b"")
        self._zone = value

    def _write(self, frame: bytes) -> bool:
        if self.closed:
            return False
        self._relay.queue(self.node, "w", None, self.player_text, frame)
        return True

    def send_tick(self, frame: bytes, max_behind: int) -> bool:
        if self.closed:
            return False
        self._relay.queue(self.node, "t", self._zone, self.player_text, frame)  # the gateway skips it if behind
        return False  # counted by the gateway, which sends it

    def abort(self) -> None:
        self.closed = True

    async def close(self, code: int, reason: str) -> None:
        self.closed = True


class Hub:
    """Who is connected, who is in which zone, and the messages they are owed.

    A player is a *member* of a zone from subscribing until leaving; a dropped connection
    stays a member for ``reconnect_grace`` seconds, so a quick reconnect resumes the zone
    without the game seeing a leave and a join. Join and leave events are queued on the
    zone and delivered to the module at the start of the zone's next tick.
    """

    def __init__(self, world: World, metrics: Metrics, cfg: Config):
        self.world = world
        self.metrics = metrics
        self.heartbeat = cfg.get("websocket", "heartbeat")
        self.grace = cfg.get("websocket", "reconnect_grace")
        self.max_intents = cfg.get("tick", "max_intents_per_player")
        self.max_zone_intents = cfg.get("tick", "max_intents_per_zone")
        self.journal_intents = cfg.get("journal", "mode") == "replay"
        self.max_subscribes = cfg.get("websocket", "max_subscribes_per_tick")
        self.max_behind = cfg.get("websocket", "max_behind")
        self.debug = cfg.get("server", "debug")
        self.debug_players = {n.strip() for n in cfg.get("server", "debug_players").split(",") if n.strip()}
        self.conns: dict[UUID, Connection] = {}
        self.by_text: dict[str, Connection] = {}  # the same, by the player id's text (the relay's key)
        #: player id -> username of every player connected since start (usernames never change),
        #: for ``FrameworkAPI.username``: written on the loop, read from game threads (one dict
        #: lookup, atomic in CPython).
        self.usernames: dict[UUID, str] = {}
        self.subscribers: dict[UUID, dict[UUID, Connection]] = collections.defaultdict(dict)
        self.members: dict[UUID, set[UUID]] = collections.defaultdict(set)
        self._held: dict[UUID, tuple[UUID, asyncio.TimerHandle]] = {}
        self._moves: dict[UUID, int] = {}  # subscribes and unsubscribes per player this tick
        self._tasks: set[asyncio.Task] = set()
        self._seq = itertools.count(1)
        #: cluster, on a zone's owner: the players connected to other nodes, by player id
        #: (``RemotePlayer``: in ``subscribers`` like a connection, never in ``conns``)
        self.remote: dict[UUID, RemotePlayer] = {}
        #: cluster, on a player's node: ``left(conn, zone_id, keep)`` when a connection
        #: subscribed to a zone that ticks elsewhere closes; ``ended(digests)`` when sessions end
        self.left: Callable[[Connection, UUID, bool], None] | None = None
        self.ended: Callable[[list[str]], None] | None = None
        #: cluster: ``moved(conn, zone_id)`` when a zone leaves this node (its player follows it)
        self.moved: Callable[[Connection, UUID], None] | None = None

    # -- membership ----------------------------------------------------------------------
    def _join(self, zone_id: UUID, player_id: UUID) -> None:
        zs = self.world.zones.get(zone_id)
        if zs is not None and player_id not in self.members[zone_id]:
            self.members[zone_id].add(player_id)
            _queue_event(zs, player_id, "join")

    def _leave(self, zone_id: UUID, player_id: UUID) -> None:
        members = self.members.get(zone_id)
        if members is not None and player_id in members:
            members.discard(player_id)
            zs = self.world.zones.get(zone_id)
            if zs is not None:
                _queue_event(zs, player_id, "leave")

    def _grace_expired(self, player_id: UUID) -> None:
        entry = self._held.pop(player_id, None)
        if entry is not None:
            self._leave(entry[0], player_id)

    # -- connections ---------------------------------------------------------------------
    def attach(self, conn: Connection) -> UUID | None:
        """Register a new connection; returns the zone it resumes, if any.

        An older connection of the same player is closed with 4000 and its zone passes to
        the new one; otherwise a zone kept in the grace period is resumed.
        """
        self.metrics.connections_total += 1
        resume: UUID | None = None
        old = self.conns.get(conn.player_id)
        if old is not None:
            resume = old.zone_id
            self._unsubscribe_conn(old)
            old.closed = True
            self.spawn(old.close(CLOSE_REPLACED, "replaced by a new connection"))
        entry = self._held.pop(conn.player_id, None)
        if entry is not None:
            entry[1].cancel()
            resume = resume or entry[0]
        proxy = self.remote.pop(conn.player_id, None)
        if proxy is not None:  # cluster: it played a zone of this node through another node
            resume = resume or proxy.zone_id
            proxy.closed = True
            self._unsubscribe_conn(proxy)
        self.conns[conn.player_id] = conn
        self.by_text[conn.player_text] = conn
        self.usernames[conn.player_id] = conn.username
        if resume is not None and resume in self.world.zones:
            resume = self.world.zones[resume].zone.id
            conn.zone_id = resume
            self.subscribers[resume][conn.player_id] = conn
            self._join(resume, conn.player_id)  # no event if still a member
            return resume
        return None

    def detach(self, conn: Connection, keep_zone: bool = True) -> None:
        """Forget a closed connection; with ``keep_zone`` its zone is held for the grace period."""
        conn.closed = True
        if conn.expiry_handle is not None:
            conn.expiry_handle.cancel()
        if self.conns.get(conn.player_id) is not conn:
            return  # replaced: the new connection owns the player now
        del self.conns[conn.player_id]
        self.by_text.pop(conn.player_text, None)
        zone_id, routed = conn.zone_id, conn.routed
        self._unsubscribe_conn(conn)
        if routed is not None and self.left is not None:  # the zone's owner holds it, on another node
            self.left(conn, routed, keep_zone)
            return
        if zone_id is None:
            return
        if keep_zone and self.grace > 0:
            handle = asyncio.get_running_loop().call_later(self.grace, self._grace_expired, conn.player_id)
            self._held[conn.player_id] = (zone_id, handle)
        else:
            self._leave(zone_id, conn.player_id)

    def _unsubscribe_conn(self, conn: Connection) -> None:
        if conn.zone_id is not None:
            subs = self.subscribers.get(conn.zone_id)
            if subs is not None and subs.get(conn.player_id) is conn:
                del subs[conn.player_id]
                if not subs:
                    del self.subscribers[conn.zone_id]
        conn.zone_id = None

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, holding the task until it ends (closing sockets)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def new_tick(self) -> None:
        """A tick starts: every player may subscribe and unsubscribe again."""
        self._moves.clear()

    def _may_move(self, conn: Connection) -> bool:
        """Count one subscribe or unsubscribe of the player against ``max_subscribes_per_tick``
        (whichever connection sent it); past it, answer ``rate_limited`` and refuse it."""
        n = self._moves.get(conn.player_id, 0) + 1
        self._moves[conn.player_id] = n
        if n <= self.max_subscribes:
            return True
        self.metrics.subscribes_dropped_total += 1
        if n == self.max_subscribes + 1:
            conn.error("rate_limited", f"At most {self.max_subscribes} subscribes and unsubscribes per tick; "
                                       "the rest are refused.")
        return False

    def subscribe(self, conn: Connection, zone_id: UUID) -> None:
        """Leave the current zone (if another) and join ``zone_id``; answer ``subscribed``.

        Ticks are delivered only to connections whose ``zone_id`` is the tick's zone at the
        moment of delivery, so no tick of the old zone can follow the answer.
        """
        if not self._may_move(conn):
            return
        zone_id = self.world.zones[zone_id].zone.id
        entry = self._held.pop(conn.player_id, None)  # cluster: held here while it came by another way
        if entry is not None:
            entry[1].cancel()
            if entry[0] != zone_id:
                self._leave(entry[0], conn.player_id)
        if conn.zone_id != zone_id:
            if conn.zone_id is not None:
                old = conn.zone_id
                self._unsubscribe_conn(conn)
                self._leave(old, conn.player_id)
            conn.zone_id = zone_id
            self.subscribers[zone_id][conn.player_id] = conn
            self._join(zone_id, conn.player_id)
        conn.send({"type": "subscribed", "zone_id": str(zone_id)})
        self.tell_if_failing(conn)

    def unsubscribe(self, conn: Connection) -> None:
        if not self._may_move(conn):
            return
        if conn.zone_id is not None:
            old = conn.zone_id
            self._unsubscribe_conn(conn)
            self._leave(old, conn.player_id)
        conn.send({"type": "unsubscribed"})

    def add_intent(self, conn: Connection, data: dict) -> None:
        """Queue an intent for the next tick of the player's zone, within the per-tick limits.

        ``max_intents_per_player`` counts per player and zone tick, whichever connection sent
        them (reconnecting does not reset it), and ``max_intents_per_zone`` bounds the zone's
        whole queue (also while the tick is paused or the zone stalled): the counts start
        again when the zone's tick takes its queue. Only the first intent a connection has
        dropped in a tick gets an error message.
        """
        zs = self.world.zones.get(conn.zone_id) if conn.zone_id is not None else None
        if zs is None:
            conn.error("not_subscribed", "Subscribe to a zone before sending intents.")
            return
        player_id = conn.player_id
        n = zs.intent_counts.get(player_id, 0)
        if n >= self.max_intents or len(zs.intents) >= self.max_zone_intents:
            self.metrics.intents_dropped_total += 1
            if conn not in zs.limited:
                zs.limited.add(conn)
                why = (f"At most {self.max_intents} intents per tick" if n >= self.max_intents
                       else f"The zone holds {self.max_zone_intents} intents for its next tick")
                conn.error("rate_limited", why + "; the rest are dropped.")
            return
        zs.intent_counts[player_id] = n + 1
        intent = Intent(player_id, zs.zone.id, _freeze(data), time.time(), next(self._seq))
        zs.intents.append(intent)
        if self.journal_intents:  # made here, spread over the tick, not all at its start
            zs.journaled.append(json_dumps([conn.player_text, intent.seq, intent.received_at, data]))
        self.metrics.intents_accepted_total += 1

    # -- players of other nodes (cluster, on the zone's owner) --------------------------------
    def remote_subscribe(self, proxy: RemotePlayer, zone_id: UUID) -> None:
        """A player of another node subscribes to a zone ticking here (``subscribe``'s rules).
        A player this node holds (its connection dropped, or its zone just came here from
        another node) is resumed: no leave and join when it is the same zone."""
        old = self.remote.get(proxy.player_id)
        if old is not None and old is not proxy:  # the player came back through another node
            proxy.zone_id = old.zone_id
            self._replace(old, proxy)
        self.remote[proxy.player_id] = proxy
        self.subscribe(proxy, zone_id)
        if proxy.zone_id == zone_id:  # also when it was there already: its gateway may not know
            proxy._relay.queue(proxy.node, "z", zone_id, proxy.player_text, b"")

    def _replace(self, old: RemotePlayer, new: RemotePlayer) -> None:
        """``new`` takes ``old``'s place in its zone, without a leave or a join."""
        old.closed = True
        if old.zone_id is not None and self.subscribers.get(old.zone_id, {}).get(old.player_id) is old:
            self.subscribers[old.zone_id][old.player_id] = new

    def remote_left(self, proxy: RemotePlayer, keep: bool) -> None:
        """A player of another node closed its connection (``keep``: held for the grace period,
        as a dropped local one) or moved to a zone of another node (not kept)."""
        if self.remote.get(proxy.player_id) is not proxy:
            return
        del self.remote[proxy.player_id]
        proxy.closed = True
        zone_id = proxy.zone_id
        self._unsubscribe_conn(proxy)
        if zone_id is None:
            return
        if keep and self.grace > 0:
            handle = asyncio.get_running_loop().call_later(self.grace, self._grace_expired, proxy.player_id)
            self._held[proxy.player_id] = (zone_id, handle)
        else:
            self._leave(zone_id, proxy.player_id)

    def remote_attached(self, player_id: UUID, make_proxy: Callable[[], RemotePlayer]) -> bool:
        """The player connected again on another node: the zone it had here (live through an
        older connection, or held in the grace period) passes to the new one, which hears
        ``subscribed`` with ``resumed`` (no leave, no join). Whether it had one."""
        old_conn = self.conns.get(player_id)
        if old_conn is not None:  # replaced: an older connection to this node
            del self.conns[player_id]
            self.by_text.pop(old_conn.player_text, None)
            zone_id = old_conn.zone_id
            self._unsubscribe_conn(old_conn)
            old_conn.closed = True
            self.spawn(old_conn.close(CLOSE_REPLACED, "replaced by a new connection"))
        else:
            zone_id = None
        proxy = self.remote.pop(player_id, None)
        entry = self._held.pop(player_id, None)
        if entry is not None:
            entry[1].cancel()
        if proxy is not None:
            proxy.closed = True
            zone_id = zone_id or proxy.zone_id
            self._unsubscribe_conn(proxy)
        zone_id = zone_id or (entry[0] if entry is not None else None)
        if zone_id is None or zone_id not in self.world.zones:
            return False
        new = make_proxy()
        self.remote[player_id] = new
        new.zone_id = zone_id
        self.subscribers[zone_id][player_id] = new
        self._join(zone_id, player_id)  # no event if still a member
        new.send({"type": "subscribed", "zone_id": str(zone_id), "resumed": True})
        self.tell_if_failing(new)
        return True

    def is_debug(self, username: str) -> bool:
        """Whether the player may use the debug routes and sees errors in full."""
        return self.debug and (not self.debug_players or username in self.debug_players)

    def _failed_message(self, conn: Connection, zs: _ZoneState) -> dict:
        error = zs.last_error or {}
        text = (f"tick {error.get('tick_number')}: {error.get('message', '')}" if self.is_debug(conn.username)
                else "This zone's game failed and the zone is not ticking; the server tries again every tick.")
        return {"type": "error", "code": "zone_failed", "zone_id": str(zs.zone.id), "message": text}

    def broadcast(self, message: dict) -> None:
        """One control message to every player subscribed to a zone."""
        frame = ws_text_frame(json_dumps(message).encode("utf-8"))
        for subs in list(self.subscribers.values()):
            for conn in list(subs.values()):
                conn._write(frame)

    def tell_debug_players(self, message: dict) -> None:
        for conn in list(self.conns.values()):
            if self.is_debug(conn.username):
                conn.send(message)

    def tell_if_failing(self, conn: Connection) -> None:
        """After ``subscribed``: a player entering a failing zone hears so at once."""
        zs = self.world.zones.get(conn.zone_id) if conn.zone_id is not None else None
        if zs is not None and zs.failing:
            conn.send(self._failed_message(conn, zs))

    def zone_failed(self, zs: _ZoneState) -> None:
        """Tell the zone's subscribers its ticks fail (once per failing streak)."""
        for conn in list(self.subscribers.get(zs.zone.id, {}).values()):
            conn.send(self._failed_message(conn, zs))

    def zone_recovered(self, zone_id: UUID) -> None:
        message = {"type": "zone_recovered", "zone_id": str(zone_id)}
        for conn in list(self.subscribers.get(zone_id, {}).values()):
            conn.send(message)

    def restore(self, zones: Iterable[_ZoneState]) -> int:
        """At start-up, after the journal's replay: the players each zone's module knows as
        joined are held as if their connections had just dropped. Back within
        ``reconnect_grace``, they resume the zone; the others are delivered as leaving. The
        number held."""
        loop = asyncio.get_running_loop()
        for zs in zones:
            for player_id in sorted(zs.joined):
                self.members[zs.zone.id].add(player_id)
                if player_id in self._held or self.grace <= 0:  # one zone per player
                    self._leave(zs.zone.id, player_id)
                else:
                    self._held[player_id] = (zs.zone.id, loop.call_later(self.grace, self._grace_expired, player_id))
        return len(self._held)

    def zone_deleted(self, zone_id: UUID, moved: bool = False) -> None:
        """Tell the zone's subscribers and forget everything about it: also when it moved to
        another node (``moved``), whose module goes on knowing its players as joined."""
        error = ({"type": "error", "code": "zone_moved", "zone_id": str(zone_id),
                  "message": "The zone moved to another node; you are unsubscribed."} if moved else
                 {"type": "error", "code": "zone_deleted", "message": "The zone you were subscribed to was deleted."})
        for conn in list(self.subscribers.pop(zone_id, {}).values()):
            if moved and self.moved is not None:
                self.moved(conn, zone_id)
                continue
            conn.zone_id = None
            conn.send(error)
        self.members.pop(zone_id, None)
        for player_id, (zid, handle) in list(self._held.items()):
            if zid == zone_id:
                handle.cancel()
                del self._held[player_id]

    async def end_session(self, digest: str) -> None:
        """Close the connection of a session that logged out or expired (no grace period)."""
        await self.end_sessions([digest])

    async def end_sessions(self, digests: list[str], tell_others: bool = True) -> None:
        """Close the connections of sessions that ended (no grace period); in a cluster, the
        other nodes close theirs (``tell_others``)."""
        if not digests:
            return
        if tell_others and self.ended is not None:
            self.ended(digests)
        ended = set(digests)
        closing = [c for c in list(self.conns.values()) if c.session.digest in ended]
        for conn in closing:
            self.detach(conn, keep_zone=False)
        await asyncio.gather(*(c.close(CLOSE_SESSION_ENDED, "session ended") for c in closing))

    async def heartbeat_loop(self) -> None:
        """Find dead peers without a timer per connection.

        Every ``heartbeat`` seconds: a connection that sent nothing since the last look is
        pinged; one that still sent nothing (not even the pong) a period later is dropped.
        A dead peer is gone within about three periods.
        """
        ping = bytes((0x89, 0))
        while True:
            await asyncio.sleep(self.heartbeat)
            for conn in list(self.conns.values()):
                if conn.received != conn.seen:
                    conn.seen = conn.received
                    conn.pinged = False
                elif not conn.pinged:
                    conn.pinged = True
                    conn._write(ping)
                else:
                    log.info("dropping %s: no answer to a ping", conn.username)
                    conn.abort()

    async def close_all(self, code: int = 1001, reason: str = "server shutting down") -> None:
        conns = list(self.conns.values())
        for conn in conns:
            conn.closed = True
        await asyncio.gather(*(c.close(code, reason) for c in conns), *self._tasks, return_exceptions=True)


# =============================================================================
# Cluster: relaying players between nodes
# =============================================================================


class Relay:
    """Cluster mode: a player plays any zone from any node, over NATS.

    The node holding the player's socket is its *gateway*; the node ticking the zone is the
    zone's *owner* (``Cluster``). Subjects, under ``gridserver.``:

    * ``owner.<name>`` (each node, as an owner): a gateway's ``sub``, ``unsub``, ``intent``,
      ``ping`` and ``left`` for its players, each naming its zone, in the order the players
      sent them (one subject per owner: one ordered stream from each gateway), batched per
      loop turn. The owner plays them on a ``RemotePlayer`` in its hub, so ordering, ``seq``,
      rate limits, joins, leaves and errors follow the single-node rules. Messages about a
      zone the owner is still loading wait for it; about a zone that left (or is leaving),
      the gateway is told the zone moved (``m``) and the player follows it.
    * ``node.<name>`` (each node, as a gateway): what owners send its players, in order,
      batched: one message per owner per loop turn (split past half of NATS's largest
      payload), holding every item queued meanwhile (``queue``): a tick's frame once with
      every player of this gateway who shares it (``t``), a message for one player (``w``),
      a change of the player's zone (``z``: subscribed there, ``u``: no longer), or the news
      that the zone moved to another node (``m``).
    * ``all``: ``attach`` (a player connected somewhere: an older connection elsewhere is
      replaced with 4000, a zone held for it is resumed), ``end`` (sessions that ended:
      their sockets close with 4001 on every node), ``owner`` (a node took a zone: the
      players' nodes send them there at once), ``counts`` (each node's zones' entity and
      subscriber counts, every round).
    * ``ask``: a debug route's question to every node, answered by NATS reply.

    A node is both: the single-node server is this code with every zone local and no relay.
    """

    PREFIX = "gridserver."
    #: intents kept for a player while it follows its zone to another node
    MAX_WAITING = 32
    #: seconds a gateway gathers intents for their owners before sending them (an intent waits
    #: for its zone's next tick anyway; answers and control messages go at once)
    BATCH_DELAY = 0.01

    def __init__(self, cluster: Cluster, hub: Hub, world: World, metrics: Metrics, max_behind: int):
        self.cluster, self.hub, self.world, self.metrics = cluster, hub, world, metrics
        self.node = cluster.node
        self.max_behind = max_behind
        self._out: dict[str, list[list]] = {}  # gateway -> items [kind, zone, players, frame]
        self._in: dict[str, list[list]] = {}  # owner -> its players' messages [op, zone, player, name, arg]
        self._flushing = False
        self._later: asyncio.TimerHandle | None = None
        self._sends: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._loading: dict[UUID, list[tuple[str, list]]] = {}  # zone being taken over -> messages waiting
        self._uuids: dict[str, UUID] = {}
        #: the entity and subscriber counts of zones ticking elsewhere, as their owners told
        #: (``share_counts``, every round), for ``GET /api/zones``
        self.counts: dict[UUID, tuple[int, int]] = {}
        hub.left = self._left
        hub.ended = lambda digests: self._publish("all", {"op": "end", "n": self.node, "digests": digests})
        hub.moved = self._moved
        self._owners: dict[UUID, str | None] = {}  # each zone's owner as of the last round
        self._following: set[Connection] = set()
        self._waiting: dict[Connection, list[dict]] = {}  # following players' intents, in order
        #: ``answer(op, message)``: this node's answer to another node's question (``ask_all``)
        self.answer: Callable[[str, dict], Awaitable[dict]] | None = None

    async def start(self) -> None:
        nc = self.cluster.nc
        await nc.subscribe(self.PREFIX + "owner." + self.node, cb=self._to_owner)
        await nc.subscribe(self.PREFIX + "node." + self.node, cb=self._from_owner)
        await nc.subscribe(self.PREFIX + "all", cb=self._from_all)
        await nc.subscribe(self.PREFIX + "ask", cb=self._asked)
        self._tasks.append(asyncio.ensure_future(self._sender()))

    async def drain(self, timeout: float = 2.0) -> None:
        """Let what is queued be published (a stopping node's last words)."""
        await asyncio.sleep(0)  # the queued items are batched on the next loop turn
        deadline = time.monotonic() + timeout
        while not self._sends.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sender(self) -> None:
        """Publish in the order queued (one task: NATS keeps the order of one publisher)."""
        nc = self.cluster.nc
        while True:
            subject, data = await self._sends.get()
            try:
                await nc.publish(subject, data)
            except Exception as exc:  # noqa: BLE001 - NATS down: what was queued is lost, as on a dropped socket
                log.warning("cluster: NATS publish to %s failed: %s", subject, exc)

    def _publish(self, to: str, message: dict) -> None:
        self._sends.put_nowait((self.PREFIX + to, json_dumps(message).encode("utf-8")))

    def _soon(self, later: bool = False) -> None:
        """Publish what is queued at the end of this loop turn, or (``later``: intents, which
        wait for the tick anyway) within ``BATCH_DELAY`` seconds, so that a busy gateway sends
        each owner a few messages per tick rather than one per intent."""
        if self._flushing:
            return
        if not later:
            self._flushing = True
            if self._later is not None:
                self._later.cancel()
                self._later = None
            asyncio.get_running_loop().call_soon(self._flush)
        elif self._later is None:
            self._later = asyncio.get_running_loop().call_later(self.BATCH_DELAY, self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if self._later is not None:
            self._later.cancel()
            self._later = None
        ins, self._in = self._in, {}
        for owner, ops in ins.items():
            self._sends.put_nowait((f"{self.PREFIX}owner.{owner}",
                                    json_dumps({"n": self.node, "ops": ops}).encode("utf-8")))
        outs, self._out = self._out, {}
        limit = max(4096, int(getattr(self.cluster.nc, "max_payload", 1 << 20) or (1 << 20)) // 2)
        for node, items in outs.items():
            chunk: list[list] = []
            size = 0
            for item in items:
                if len(item[3]) > limit:
                    log.warning("cluster: a %d-byte frame is too large for NATS; not relayed", len(item[3]))
                    continue
                if chunk and size + len(item[3]) > limit:
                    self._send_items(node, chunk)
                    chunk, size = [], 0
                chunk.append(item)
                size += len(item[3]) + 40 * len(item[2])
            if chunk:
                self._send_items(node, chunk)

    def _send_items(self, node: str, items: list[list]) -> None:
        header = [[kind, None if zone is None else str(zone), players, len(frame)]
                  for kind, zone, players, frame in items]
        self._sends.put_nowait((self.PREFIX + "node." + node, self.node.encode("utf-8") + b"\n" +
                                json_dumps(header).encode("utf-8") + b"\n" + b"".join(i[3] for i in items)))
        self.metrics.relay_messages_total += 1

    # -- the owner's side --------------------------------------------------------------------
    def loading(self, zone_id: UUID, started: bool) -> None:
        """A zone this node is claiming and loading (``started``), or done with (taken or not):
        what its players' nodes sent meanwhile waited, and is played now."""
        if started:
            self._loading.setdefault(zone_id, [])
            return
        for node, op in self._loading.pop(zone_id, []):
            self._play(node, op)

    def disown(self, zone_id: UUID) -> None:
        """The zone left this node: forget its players of other nodes."""
        for player_id, proxy in list(self.hub.remote.items()):
            if proxy.closed or proxy.zone_id == zone_id:
                if self.hub.remote.get(player_id) is proxy:
                    del self.hub.remote[player_id]
                proxy.closed = True

    def queue(self, node: str, kind: str, zone_id: UUID | None, player: str, frame: bytes) -> None:
        """Queue one item for a gateway (``player``: the player id's text); a tick's frame
        shared by several of its players is queued once."""
        items = self._out.setdefault(node, [])
        if kind == "t" and items:
            last = items[-1]
            if last[0] == "t" and last[1] == zone_id and last[3] is frame:
                last[2].append(player)
                return
        items.append([kind, zone_id, [player], frame])
        self._soon()

    def _error(self, node: str, player: str, error: dict) -> None:
        self.queue(node, "w", None, player, ws_text_frame(json_dumps(error).encode("utf-8")))

    async def _to_owner(self, msg: Any) -> None:
        """A gateway's batch of its players' messages: ``{"n": gateway, "ops": [[op, zone,
        player, username, argument], ...]}``, in the order sent."""
        try:
            m = json_loads(msg.data)
            node, ops = m["n"], m["ops"]
        except (ValueError, KeyError, TypeError):
            log.warning("cluster: unreadable message on %s", msg.subject)
            return
        for op in ops:
            try:
                self._play(node, op)
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("cluster: a message from %s could not be played: %s", node, exc)

    def _uuid(self, text: str) -> UUID:
        """``UUID(text)``, remembered (ids of zones and players come again every tick)."""
        known = self._uuids.get(text)
        if known is None:
            if len(self._uuids) > 200_000:
                self._uuids.clear()
            known = self._uuids[text] = UUID(text)
        return known

    def _play(self, node: str, item: list) -> None:
        op, zone, player, username, arg = item
        zone_id, player_id = self._uuid(zone), self._uuid(player)
        if zone_id in self._loading:
            self._loading[zone_id].append((node, item))
            return
        hub = self.hub
        proxy = hub.remote.get(player_id)
        mine = proxy if proxy is not None and proxy.node == node and not proxy.closed else None
        zs = self.world.zones.get(zone_id)
        if zs is None or zs.leaving:  # it moved on (or is moving): the player follows it
            if op == "ping":
                self.queue(node, "w", None, player, ws_text_frame(b'{"type":"pong"}'))
            elif op == "sub" and zone_id not in self.cluster.zones:
                self.queue(node, "u", zone_id, player, b"")
                self._error(node, player, {"type": "error", "code": "zone_deleted",
                                           "message": "The zone you were subscribed to was deleted."})
            elif op == "sub":
                self.queue(node, "m", zone_id, player, b"")
            elif op == "unsub":
                if zs is not None and mine is not None and mine.zone_id == zone_id:
                    hub.unsubscribe(mine)
                else:
                    self.queue(node, "u", zone_id, player, b"")
                    self.queue(node, "w", None, player, ws_text_frame(b'{"type":"unsubscribed"}'))
            elif op == "left" and zs is not None and mine is not None and mine.zone_id in (zone_id, None):
                hub.remote_left(mine, bool(arg))
            return  # an intent for a zone that is not ticking here is dropped
        if op == "intent":
            if mine is None or mine.zone_id != zone_id:
                self._error(node, player, {"type": "error", "code": "not_subscribed",
                                           "message": "Subscribe to a zone before sending intents."})
            else:
                hub.add_intent(mine, arg)
        elif op == "sub":
            hub.remote_subscribe(mine or RemotePlayer(hub, self, node, player_id, username), zone_id)
        elif op == "unsub" and mine is not None and mine.zone_id in (zone_id, None):
            hub.unsubscribe(mine)
        elif op == "unsub":
            self.queue(node, "u", zone_id, player, b"")
            self.queue(node, "w", None, player, ws_text_frame(b'{"type":"unsubscribed"}'))
        elif op == "ping":
            self.queue(node, "w", None, player, ws_text_frame(b'{"type":"pong"}'))
        elif op == "left" and mine is not None and mine.zone_id in (zone_id, None):
            hub.remote_left(mine, bool(arg))

    # -- the gateway's side ------------------------------------------------------------------
    def forward(self, conn: Connection, zone_id: UUID, op: str, arg: Any = None) -> bool:
        """Send one of the player's messages to the owner of ``zone_id`` (batched per owner
        and loop turn, in order); False when no node holds the zone."""
        owner = self.cluster.owner_of(zone_id)
        if owner is None:
            return False
        self._in.setdefault(owner, []).append(
            [op, str(zone_id), conn.player_text, conn.username if op == "sub" else None, arg])
        self._soon(later=op == "intent")
        return True

    def intent(self, conn: Connection, data: dict) -> None:
        """A player's intent for a zone of another node. While the player follows its zone to
        a new node, intents wait (up to ``MAX_WAITING``) and go there after the subscribe;
        while no node holds the zone, they are dropped."""
        waiting = self._waiting.get(conn)
        if waiting is not None:
            if len(waiting) < self.MAX_WAITING:
                waiting.append(data)
        elif conn.routed is not None:
            self.forward(conn, conn.routed, "intent", data)

    def _left(self, conn: Connection, zone_id: UUID, keep: bool) -> None:
        self.forward(conn, zone_id, "left", keep)

    def after_round(self) -> None:
        """After the cluster's round: share this node's counts; the players of zones whose
        owner changed (a node died, or its zones moved) follow them to the new owner; the
        players of nodes that are gone (killed) are held as dropped."""
        self.share_counts()
        owners = {zone_id: self.cluster.owner_of(zone_id) for zone_id in self.cluster.zones}
        changed = {z for z, o in owners.items() if z in self._owners and o != self._owners[z]}
        previous, self._owners = self._owners, owners
        if changed:
            for conn in list(self.hub.conns.values()):
                if conn.routed is not None and conn.routed in changed and conn not in self._following:
                    self.follow(conn, conn.routed, previous[conn.routed])
        alive = {n[0] for n in self.cluster.nodes if n[4]}
        for proxy in list(self.hub.remote.values()):
            if proxy.node not in alive and not proxy.closed:
                self.hub.remote_left(proxy, True)

    def _moved(self, conn: Connection, zone_id: UUID) -> None:
        """A zone left this node: its players follow it (through their own nodes)."""
        if isinstance(conn, RemotePlayer):
            conn.closed = True  # its gateway is told once, with "m", not with a change of zone
            self.queue(conn.node, "m", zone_id, conn.player_text, b"")
        else:
            conn.zone_id, conn.routed = None, zone_id
            self.follow(conn, zone_id, self.node)

    def follow(self, conn: Connection, zone_id: UUID, old: str | None) -> None:
        """Subscribe the player again where its zone ticks now, once a node other than ``old``
        owns it (or ``old`` again, after a lease): the player hears ``subscribed`` again, and
        no leave or join reaches the game. If no node takes the zone within two leases,
        ``zone_moved``."""
        self._following.add(conn)
        self._waiting.setdefault(conn, [])
        conn.zone_id = None  # no tick of the old owner's from here on
        self.hub.spawn(self._follow(conn, zone_id, old))

    async def _follow(self, conn: Connection, zone_id: UUID, old: str | None) -> None:
        try:
            started = time.monotonic()
            while time.monotonic() < started + self.cluster.lease * 2 + 2:
                if conn.closed or conn.routed != zone_id:
                    return  # gone, or elsewhere by its own choice
                owner = self.cluster.owner_of(zone_id)
                if owner == self.node:
                    if zone_id in self.world.zones and not self.world.zones[zone_id].leaving:
                        conn.routed = None
                        self.hub.subscribe(conn, zone_id)
                        for data in self._waiting.pop(conn, []):
                            self.hub.add_intent(conn, data)
                        return
                elif owner is not None and (owner != old or time.monotonic() > started + self.cluster.lease):
                    self.forward(conn, zone_id, "sub")
                    for data in self._waiting.pop(conn, []):  # after the subscribe, to the same node
                        self.forward(conn, zone_id, "intent", data)
                    return
                await asyncio.sleep(0.02)
            self.forward(conn, zone_id, "left", False)  # wherever it is held
            conn.routed = None
            conn.send({"type": "error", "code": "zone_moved", "zone_id": str(zone_id),
                       "message": "The zone moved and no node has taken it up yet; subscribe again later."})
        finally:
            self._following.discard(conn)
            self._waiting.pop(conn, None)

    def leave_all(self) -> None:
        """This node stops: its players' zones on other nodes hold them as dropped."""
        for conn in list(self.hub.conns.values()):
            if conn.routed is not None:
                self.forward(conn, conn.routed, "left", True)

    async def moved_away(self, zone_ids: set[UUID]) -> None:
        """A stopping node released these zones: the players of other nodes follow them."""
        for proxy in list(self.hub.remote.values()):
            if proxy.zone_id is not None and proxy.zone_id in zone_ids:
                self._moved(proxy, proxy.zone_id)
        await self.drain()

    # -- questions to every node (debug routes) ---------------------------------------------
    async def ask_all(self, op: str, timeout: float = 10.0, **fields: Any) -> list[dict]:
        """Ask every other live node (``gridserver.ask``, NATS request and reply); their
        answers, as many as came within ``timeout`` seconds."""
        nc = self.cluster.nc
        others = [n[0] for n in self.cluster.nodes if n[4] and n[0] != self.node]
        answers: list[dict] = []
        if not others:
            return answers
        done = asyncio.Event()

        async def got(msg: Any) -> None:
            with contextlib.suppress(ValueError):
                answers.append(json_loads(msg.data))
            if len(answers) >= len(others):
                done.set()
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=got)
        try:
            await nc.publish(self.PREFIX + "ask", json_dumps({"op": op, "n": self.node, **fields}).encode("utf-8"),
                             reply=inbox)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), timeout)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return answers

    async def _asked(self, msg: Any) -> None:
        try:
            m = json_loads(msg.data)
        except ValueError:
            return
        if m.get("n") == self.node or not msg.reply or self.answer is None:
            return
        try:
            answer = await self.answer(str(m.get("op")), m)
        except Exception as exc:  # noqa: BLE001 - the asking node hears why
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(Exception):
            await self.cluster.nc.publish(msg.reply, json_dumps({"node": self.node, **answer}).encode("utf-8"))

    # -- news for every node -----------------------------------------------------------------
    def announce(self, zone_id: UUID, epoch: int) -> None:
        """This node ticks the zone now: the nodes of its players send them here at once."""
        self._publish("all", {"op": "owner", "n": self.node, "z": str(zone_id), "e": epoch})

    def _owner_changed(self, zone_id: UUID, node: str, epoch: int) -> None:
        entry = self.cluster.zones.get(zone_id)
        if entry is not None and entry[2] > epoch:
            return  # older news than the directory's
        previous = self.cluster.owner_of(zone_id)
        self.cluster.set_owner(zone_id, node, epoch)
        self._owners[zone_id] = node
        if previous == node:
            return
        for conn in list(self.hub.conns.values()):
            if conn.routed == zone_id and conn.zone_id == zone_id and conn not in self._following:
                self.follow(conn, zone_id, previous)

    def share_counts(self) -> None:
        """Tell the other nodes how many entities and subscribers this node's zones have."""
        self._publish("all", {"op": "counts", "n": self.node, "zones": {
            str(z): [len(zs.entities), len(self.hub.subscribers.get(z, ()))]
            for z, zs in list(self.world.zones.items())}})

    def attached(self, conn: Connection) -> None:
        """A player connected here: other nodes give up older connections and held zones."""
        self._publish("all", {"op": "attach", "p": conn.player_text, "n": self.node, "u": conn.username})

    async def _from_owner(self, msg: Any) -> None:
        """Items from an owner for players connected here, applied in order."""
        data: bytes = msg.data
        first = data.find(b"\n")
        end = data.find(b"\n", first + 1)
        try:
            sender, header = data[:first].decode("utf-8"), json_loads(data[first + 1:end])
        except ValueError:
            log.warning("cluster: unreadable frames from an owner")
            return
        at = end + 1
        conns, max_behind = self.hub.by_text, self.max_behind
        for kind, zone, players, length in header:
            frame, at = data[at:at + length], at + length
            zone_id = None if zone is None else self._uuid(zone)
            for p in players:
                conn = conns.get(p)
                if conn is None:
                    continue
                if kind == "t":
                    if conn.zone_id == zone_id and conn.send_tick(frame, max_behind):
                        self.metrics.messages_sent_total += 1
                        self.metrics.bytes_sent_total += len(frame)
                elif kind == "z" and zone_id is not None:  # subscribed (or resumed) there
                    if conn.routed == zone_id or (conn.routed is None and conn.zone_id is None):
                        conn.routed = conn.zone_id = zone_id
                    else:  # it went elsewhere meanwhile: that owner lets it go
                        self.forward(conn, zone_id, "left", False)
                elif kind == "u":  # no longer in that zone
                    if conn.zone_id == zone_id:
                        conn.zone_id = None
                    if conn.routed == zone_id:
                        conn.routed = None
                elif kind == "m":  # the zone moved to another node: the player follows it
                    if zone_id is not None and conn.routed == zone_id and conn not in self._following:
                        self.follow(conn, zone_id, sender)
                else:
                    conn._write(frame)

    async def _from_all(self, msg: Any) -> None:
        try:
            m = json_loads(msg.data)
        except ValueError:
            return
        if m.get("n") == self.node:
            return
        op = m.get("op")
        with contextlib.suppress(ValueError, TypeError, KeyError):
            if op == "attach":
                player_id, node = UUID(m["p"]), m["n"]
                self.hub.remote_attached(player_id, lambda: RemotePlayer(self.hub, self, node, player_id, m["u"]))
            elif op == "end":
                self.hub.spawn(self.hub.end_sessions(list(m.get("digests") or []), tell_others=False))
            elif op == "owner":
                self._owner_changed(UUID(m["z"]), m["n"], int(m["e"]))
            elif op == "counts":
                self.counts.update((UUID(z), (int(c[0]), int(c[1]))) for z, c in m["zones"].items())


# =============================================================================
# Journal
# =============================================================================


def _journal_row(zone_id: UUID, inputs: ZoneInputs, epoch: int = 0) -> tuple:
    """``(zone_id, tick_number, seed, at, inputs JSON, epoch)``: the intents were serialized as
    they arrived, so this is string joining (on the loop, as the tick starts)."""
    events = ",".join(f'["{kind}","{player_id}"]' for kind, player_id in inputs.events)
    return (zone_id, inputs.tick_number, inputs.seed, inputs.at,
            '{"intents":[' + ",".join(inputs.journaled) + '],"events":[' + events + "]}", epoch)


def _journaled_inputs(zone_id: UUID, tick_number: int, seed: int, at: float, inputs: str,
                      usernames: Mapping[UUID, str] | None = None) -> ZoneInputs:
    """A zone tick's inputs as the journal has them (no subscribers: a replay sends nothing);
    ``usernames`` (from the players table) give the tick's names."""
    data = json_loads(inputs)
    intents = [Intent(UUID(p), zone_id, _freeze(d), received_at, seq) for p, seq, received_at, d in data["intents"]]
    events = [(kind, UUID(p)) for kind, p in data["events"]]
    names: dict[UUID, str] = {}
    if usernames:
        for p in itertools.chain((i.player_id for i in intents), (p for _, p in events)):
            if p in usernames:
                names[p] = usernames[p]
    return ZoneInputs(int(tick_number), intents, events, [], seed=int(seed), at=float(at), names=names)


def _journal_players(rows: Iterable[tuple]) -> set[str]:
    """The ids (as text) of the players whose intents or events journal rows hold."""
    players: set[str] = set()
    for row in rows:
        data = json_loads(row[4])
        players.update(p for p, *_ in data["intents"])
        players.update(p for _, p in data["events"])
    return players


def replay_zone(world: World, game: Any, zs: _ZoneState, rows: Iterable[tuple],
                clock: Callable[[], float] = time.time, subscribers: list[UUID] | None = None,
                each: Callable[[int, ZoneOutcome], None] | None = None,
                usernames: Mapping[UUID, str] | None = None) -> list[tuple[int, ZoneOutcome]]:
    """Run a zone's journaled ticks (rows ``(zone_id, tick_number, seed, at, inputs)``, in order)
    through the module again, in a thread where module code may run. Ticks the zone has
    already run are passed over; the last one builds frames for ``subscribers``; ``each``
    sees every tick's outcome as it is replayed."""
    todo = [row for row in rows if row[1] > zs.tick_number]
    done = []
    for i, (zone_id, tick_number, seed, at, inputs) in enumerate(todo):
        replayed = _journaled_inputs(zone_id, tick_number, seed, at, inputs, usernames)
        if subscribers and i == len(todo) - 1:
            replayed.subscribers = list(subscribers)
        outcome = run_zone_tick(world, game, zs, replayed, clock)
        if each is not None:
            each(tick_number, outcome)
        done.append((tick_number, outcome))
    return done


class Journal:
    """Each zone tick's inputs, committed to the database before any frame of the tick is sent.

    Policies:

    * ``record`` (on the loop, as tick N starts) queues the inputs of every zone that runs
      tick N (their intents serialized as they arrived: this only joins strings); one writer
      task commits everything queued in one transaction (group commit: while one commit
      runs, the next ticks gather).
      ``committed`` is the last tick whose inputs are in the database; frames of a later
      tick wait for it (``waits``).
    * While the database cannot be reached, frames do not wait: ticks and play go on, the
      inputs stay queued in memory, in order, and are written when the database returns.
      A crash during an outage therefore loses the ticks since it began, as it loses the
      entity changes the flush could not write. The queue grows with the outage (every
      tick's inputs), as the flush's changes do.
    * In a cluster (``strict``) frames always wait: another node may take a zone over from
      the database, so a tick not in it must never reach a player. A write refused because
      some zones were taken over (``Fenced``) drops their rows, hands them to ``on_fenced``
      and writes the rest at once.
    """

    def __init__(self, store: Store, metrics: Metrics, on_committed: Callable[[], None],
                 max_backoff: float = 30.0, strict: bool = False,
                 on_fenced: Callable[[dict[UUID, int]], None] | None = None):
        self.store, self.metrics, self._on_committed = store, metrics, on_committed
        self.max_backoff = max_backoff
        self.strict, self._on_fenced = strict, on_fenced
        self.committed = 0
        self.outage_since: float | None = None
        self._queue: list[tuple[int, list[tuple]]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None

    def record(self, tick: int, zones: list[tuple[UUID, ZoneInputs, int]]) -> bool:
        """Queue tick ``tick``'s inputs ``(zone_id, inputs, epoch)`` (on the loop); whether there
        was anything to write."""
        if zones:
            self._queue.append((tick, [_journal_row(zone_id, inputs, epoch) for zone_id, inputs, epoch in zones]))
            self._idle.clear()
            self._wake.set()
            return True
        if not self._queue:
            self.committed = max(self.committed, tick)  # nothing ran: nothing to wait for
        return False

    def forget(self, zone_ids: Iterable[UUID]) -> None:
        """Zones that left this node (cluster): their queued rows are not written."""
        gone = set(zone_ids)
        self._queue = [(tick, [r for r in rows if r[0] not in gone]) for tick, rows in self._queue]

    def waits(self, tick: int) -> bool:
        """Whether frames of ``tick`` must wait for its inputs to be committed."""
        return tick > self.committed and (self.outage_since is None or self.strict)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            batch, self._queue = self._queue, []
            try:
                await self.store.write_journal([row for _, rows in batch for row in rows])
            except Fenced as exc:  # those zones are another node's now: their ticks never happened
                self._queue = [(tick, [r for r in rows if r[0] not in exc.zones]) for tick, rows in batch] + self._queue
                if self._on_fenced is not None:
                    self._on_fenced(exc.zones)
                continue
            except Exception as exc:  # noqa: BLE001 - unreachable or refusing: keep the inputs, retry
                self._queue = batch + self._queue
                self.metrics.journal_failures_total += 1
                if self.outage_since is None:
                    self.outage_since = time.monotonic()
                    log.warning("journal: cannot write (%s); ticks go on, their inputs wait in memory",
                                str(exc).strip()[:200] or type(exc).__name__)
                    self._on_committed()  # frames no longer wait
                backoff = min(self.max_backoff, backoff * 2 if backoff else 0.2)
                await asyncio.sleep(backoff)
                continue
            backoff = 0.0
            self.committed = max(self.committed, batch[-1][0])
            self.metrics.journal_commits_total += 1
            self.metrics.journal_ticks_total += len(batch)
            if self.outage_since is not None:
                log.warning("journal: written again after %.1f s", time.monotonic() - self.outage_since)
                self.outage_since = None
            self._on_committed()

    async def drain(self, deadline: float) -> bool:
        """Wait (until ``deadline``, monotonic) for everything queued to be committed."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
        return not self._queue and self._idle.is_set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


# =============================================================================
# Tick engine
# =============================================================================


@dataclass(eq=False)
class _ZoneJob:
    """One zone's share of one tick: made on the loop, run in a game thread, delivered on the loop."""

    zs: _ZoneState
    inputs: ZoneInputs                  # ``inputs.tick_number``: the zone's own tick number
    world_tick: int = 0                 # the engine's tick that ran it (what the journal commits)
    started: float = 0.0
    finished: float = 0.0
    stalled: bool = False
    outcome: ZoneOutcome | None = None


class _GameThreads:
    """Runs zone jobs one after another in a game thread.

    When a job overstays ``zone_timeout``, its thread is retired (it finishes that one job
    and exits, whenever the module returns) and a fresh thread takes over the queue, so one
    hanging zone never holds up the others. Module code then runs on two threads at once
    (the stuck call and the other zones' calls): see "Threads" in the module docstring.

    Finished jobs go into the ``done`` queue; every ``HANDOFF_EVERY`` seconds of module work,
    or when the job queue runs dry, the game thread asks the loop (``loop.call_soon_threadsafe``)
    to take them and waits (on a queue, up to ``HANDOFF_WAIT``) while the loop sends them: if
    module code ran during the sends, the two threads would trade the GIL at every socket
    write. So the first zones' players get their tick while later zones still compute, and a
    hand-off (which costs a GIL switch) happens a few times per tick, not per zone. The loop
    also takes what is done when a zone overstays (the thread that finished those jobs may be
    the one now stuck). No lock is shared with the loop: the queues never block it, and it
    reads ``_current`` and writes ``_retired`` with single dict and set operations, which are
    atomic in CPython.
    """

    HANDOFF_EVERY = 0.02   # seconds of module work between hand-offs to the loop
    HANDOFF_WAIT = 0.05    # longest the game thread waits for the loop to send a batch

    def __init__(self, run_job: Callable[[_ZoneJob], None], notify: Callable[[], None],
                 loop: asyncio.AbstractEventLoop):
        self._run_job = run_job
        self._notify = notify  # called on the loop: take what is done
        self._loop = loop
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.done: queue.SimpleQueue = queue.SimpleQueue()  # finished jobs, for the loop
        self._sent: queue.SimpleQueue = queue.SimpleQueue()  # one token per hand-off the loop has sent
        self._current: dict[threading.Thread, _ZoneJob] = {}
        self._retired: set[threading.Thread] = set()
        self._threads: list[threading.Thread] = []
        self._spawn()

    def _spawn(self) -> None:
        t = threading.Thread(target=self._work, name="gridserver-game", daemon=True)
        self._threads = [*(x for x in self._threads if x.is_alive()), t]
        t.start()

    def _work(self) -> None:
        """A game thread: take jobs until a ``None`` or until retired."""
        me = threading.current_thread()
        batch_started: float | None = None
        while True:
            job = self._queue.get()
            if job is None:
                break
            job.started = time.monotonic()
            if batch_started is None:
                batch_started = job.started
            self._current[me] = job
            try:
                self._run_job(job)
            except BaseException:  # noqa: BLE001 - e.g. SystemExit from module code: the thread lives on
                log.exception("zone %s tick %d: the game thread caught", job.zs.zone.id, job.inputs.tick_number)
            finally:
                job.finished = time.monotonic()
                del self._current[me]
            self.done.put(job)
            retired = me in self._retired
            dry = self._queue.empty()
            if retired or dry or job.finished - batch_started >= self.HANDOFF_EVERY:
                while not self._sent.empty():  # a token the loop sent after we stopped waiting
                    self._sent.get_nowait()
                try:
                    self._loop.call_soon_threadsafe(self._notify)
                except RuntimeError:  # the loop is closed: a call that returned after shutdown
                    return
                batch_started = None
                if not dry and not retired:
                    with contextlib.suppress(queue.Empty):
                        self._sent.get(timeout=self.HANDOFF_WAIT)
            if retired:
                break
        self._retired.discard(me)

    def submit(self, job: _ZoneJob) -> None:
        self._queue.put(job)

    def take_done(self) -> list[_ZoneJob]:
        """On the loop: every finished job not yet taken (never blocks)."""
        done = []
        with contextlib.suppress(queue.Empty):
            while True:
                done.append(self.done.get_nowait())
        return done

    def sent(self) -> None:
        """On the loop: what a hand-off asked for is sent; the game thread may go on."""
        self._sent.put(None)

    def retire_stuck(self, limit: float) -> list[_ZoneJob]:
        """On the loop: jobs running longer than ``limit`` seconds; their threads are retired
        and as many fresh ones take over the queue."""
        now = time.monotonic()
        stuck = [(t, job) for t, job in list(self._current.items())
                 if t not in self._retired and now - job.started > limit]
        for t, _ in stuck:
            self._retired.add(t)
            self._spawn()
        return [job for _, job in stuck]

    def stop(self) -> None:
        """Every live thread that is not retired ends once the queue is empty."""
        for t in self._threads:
            if t.is_alive() and t not in self._retired:
                self._queue.put(None)


class TickEngine:
    """The heartbeat: gathers each zone's inputs, runs its tick in a game thread, sends the frames.

    Policies:

    * Ticks are scheduled on absolute times (start + n * interval), so they do not drift.
      A tick that overruns the next slot makes the engine skip the missed slots (counted
      in ``tick_overruns_total``) rather than run a burst of catch-up ticks.
    * Each zone's tick (``run_zone_tick``) runs in a game thread, never on the event loop.
      A zone whose call runs past ``zone_timeout`` does not hold up the tick: the tick
      completes without it, and the zone is skipped (its time slowed) until the call
      returns; its late result is applied and broadcast when it does.
    * A zone whose module raises or returns an invalid result loses that tick: nothing of
      it is applied, the error is logged with zone and tick, counted, and shown as the
      zone's ``last_error``. Other zones are untouched.
    """

    def __init__(self, world: World, hub: Hub, game: Any, metrics: Metrics, cfg: Config,
                 journal: Journal | None = None, first_tick: int = 0):
        self.world, self.hub, self.game, self.metrics, self.journal = world, hub, game, metrics, journal
        self._held: list[_ZoneJob] = []  # finished zone ticks whose frames wait for the journal
        self.interval = cfg.get("tick", "interval")
        self.zone_timeout = cfg.get("tick", "zone_timeout") or self.interval / 2
        self.max_behind = cfg.get("websocket", "max_behind")
        self.paused = cfg.get("tick", "paused")
        #: with debug on, every ``verify_every``-th tick runs twice and the two are compared
        self.verify_every = cfg.get("journal", "verify_every") if cfg.get("server", "debug") else 0
        self.tick_number = first_tick  # tick numbers go on from the saved world's
        self.last_tick_at: float | None = None
        self._tick_lock = asyncio.Lock()
        self._tick_ended = asyncio.Condition()
        self._wake = asyncio.Event()
        self._pending: set[_ZoneJob] = set()
        self._all_done = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._threads = _GameThreads(self._run_job, self._handed_off, self._loop)
        self._task: asyncio.Task | None = None
        self._last_sent = 0.0
        self._last_slow_log = 0.0
        #: cluster: whether this node may tick at all now (``Cluster.may_tick``)
        self.gate: Callable[[], bool] | None = None

    # -- in the game thread --------------------------------------------------------------
    def _run_job(self, job: _ZoneJob) -> None:
        job.outcome = run_zone_tick(self.world, self.game, job.zs, job.inputs, time.time)

    # -- on the event loop ---------------------------------------------------------------
    def _handed_off(self) -> None:
        self._drain()
        self._threads.sent()

    def _drain(self) -> None:
        for job in self._threads.take_done():
            self._deliver(job)

    def _deliver(self, job: _ZoneJob) -> None:
        zs, outcome = job.zs, job.outcome
        zs.busy_since = None
        zs.last_tick_ms = (job.finished - job.started) * 1000
        self.metrics.zone_time.observe(job.finished - job.started)
        zone_id = zs.zone.id
        if outcome is None or outcome.error is not None:
            error = outcome.error or "" if outcome is not None else "the zone's tick did not finish"
            kind = outcome.kind if outcome is not None else "exception"
            zs.errors += 1
            self.metrics.zone_errors_total += 1
            if outcome is None or not outcome.applied:
                _requeue_events(zs, job.inputs.events)  # joins and leaves go with the next good tick
            self._failed(zs, job.inputs.tick_number, kind, error, outcome.exception if outcome else None)
        else:
            zs.ticks += 1
            if zs.failing:
                log.warning("zone %s recovered at tick %d after %d lost tick(s)", zone_id, job.inputs.tick_number,
                            zs.failing)
                zs.failing = 0
                self.hub.zone_recovered(zone_id)
        if outcome is not None and outcome.mismatch is not None:
            self.metrics.replay_mismatches_total += 1
            message = (f"nondeterministic: tick {job.inputs.tick_number} run twice from the same state and inputs "
                       f"gave different worlds: {outcome.mismatch}. Draw random numbers from framework.random, "
                       f"take time from the tick number, and keep no state outside the entities that changes "
                       f"what a tick does")
            zs.last_error = {"tick_number": job.inputs.tick_number, "kind": "nondeterministic",
                             "message": message[:2000], "at": _iso(_now())}
            log.warning("zone %s %s", zone_id, message)
        if job.stalled:
            log.warning("zone %s: late result of tick %d arrived after %.1f s",
                        zone_id, job.inputs.tick_number, job.finished - job.started)
        if self.journal is not None and self.journal.waits(job.world_tick):
            self._held.append(job)  # sent once the tick's inputs are committed
            return
        self._send(job)

    def _failed(self, zs: _ZoneState, tick: int, kind: str, error: str, exc: BaseException | None) -> None:
        """A zone lost a tick (it becomes its ``last_error``). The first of a streak is logged
        with its traceback and told to the zone's subscribers (``zone_failed``); later ones
        are counted, and logged at 10, 100, 1000... in a row."""
        zs.failing += 1
        zs.last_error = {"tick_number": tick, "kind": kind, "message": error[:2000], "at": _iso(_now())}
        what = {"invalid_result": "result rejected", "stalled": "stalled"}.get(kind, "module raised")
        if zs.failing == 1:
            log.error("zone %s tick %d: %s: %s", zs.zone.id, tick, what, error[:500], exc_info=exc)
            self.hub.zone_failed(zs)
        elif math.log10(zs.failing).is_integer():
            log.error("zone %s tick %d: still failing, %d ticks lost in a row (last: %s)", zs.zone.id, tick,
                      zs.failing, error[:200])

    def send_frames(self, zone_id: UUID, outcome: ZoneOutcome) -> None:
        """Hand a zone tick's frames to the sockets of its subscribers (those still in the zone)."""
        if outcome.frames:
            subscribers = self.hub.subscribers.get(zone_id, {})
            max_behind = self.max_behind
            sent = sent_bytes = 0
            for player_id, frame in outcome.frames:
                conn = subscribers.get(player_id)
                if conn is not None and conn.zone_id == zone_id and conn.send_tick(frame, max_behind):
                    sent += 1
                    sent_bytes += len(frame)
            self.metrics.messages_sent_total += sent
            self.metrics.bytes_sent_total += sent_bytes
            self._last_sent = time.monotonic()

    def _send(self, job: _ZoneJob) -> None:
        """Send the job's frames; the job is done."""
        if job.outcome is not None:
            self.send_frames(job.zs.zone.id, job.outcome)
        self._pending.discard(job)
        if not self._pending:
            self._all_done.set()

    def journal_committed(self) -> None:
        """On the loop, after each journal commit (or an outage): send the frames it released."""
        if self._held and self.journal is not None:
            held, self._held = self._held, []
            for job in held:
                if self.journal.waits(job.world_tick):
                    self._held.append(job)
                else:
                    self._send(job)

    async def _tick(self, scheduled: float | None = None) -> int:
        """Run one full tick: every ready zone processed and broadcast (or declared stalled)."""
        t0 = time.monotonic()
        if scheduled is not None:
            self.metrics.tick_lateness.observe(max(0.0, self._loop.time() - scheduled))
        try:
            return await self._run_tick(t0)
        finally:
            async with self._tick_ended:
                self._tick_ended.notify_all()

    async def tick_ended(self) -> None:
        """Wait until the next tick (or the one under way) has finished."""
        async with self._tick_ended:
            await self._tick_ended.wait()

    def _take_inputs(self, zs: _ZoneState, n: int, at: float) -> ZoneInputs:
        """Swap the zone's inbox out as the inputs of the zone's next tick (its limits start
        again). ``n`` is the engine's tick: a zone counts its own ticks, which follow the
        engine's except after a rewind or a skipped (stalled) tick."""
        return take_inputs(zs, list(self.hub.subscribers.get(zs.zone.id, ())), self.hub.usernames,
                           secrets.randbits(63), at, self.verify_every > 0 and n % self.verify_every == 0)

    async def _run_tick(self, t0: float) -> int:
        self.tick_number += 1
        n = self.tick_number
        self._last_sent = 0.0
        self.hub.new_tick()
        at = time.time()
        jobs = []
        zones = list(self.world.zones.values()) if self.gate is None or self.gate() else []
        for zs in zones:
            if zs.leaving:
                continue
            if zs.busy_since is not None:
                zs.skipped += 1
                self.metrics.zone_ticks_skipped_total += 1
                continue
            zs.busy_since = t0
            jobs.append(_ZoneJob(zs, self._take_inputs(zs, n, at), n))
        self._pending = set(jobs)
        self._all_done.clear()
        if self.journal is not None and self.journal.record(n, [(job.zs.zone.id, job.inputs, job.zs.epoch)
                                                                for job in jobs]):
            # Let the writer send the tick's inputs before the game threads take the interpreter:
            # the commit then runs in the database while the zones compute.
            for _ in range(4):
                await asyncio.sleep(0)
        for job in jobs:
            self._threads.submit(job)
        check = min(self.zone_timeout / 4, 0.05)
        while self._pending:
            try:
                await asyncio.wait_for(self._all_done.wait(), check)
            except asyncio.TimeoutError:
                self._drain()  # a slow zone is still running: send what the others finished
            for job in self._threads.retire_stuck(self.zone_timeout):
                job.stalled = True
                self._pending.discard(job)
                self._failed(job.zs, job.inputs.tick_number, "stalled",
                             f"the module's call is still running after {self.zone_timeout:.2f} s; the zone "
                             f"is skipped until it returns", None)
        done = time.monotonic()
        self.metrics.tick_work.observe(done - t0)
        if self._last_sent:
            self.metrics.broadcast_time.observe(self._last_sent - t0)
        self.metrics.tick_duration.observe(time.monotonic() - t0)
        self.metrics.ticks_total += 1
        self.last_tick_at = time.time()
        if done - t0 > self.interval and done - self._last_slow_log > 10:
            self._last_slow_log = done
            module = sum(j.finished - j.started for j in jobs if j.finished)
            last = max((j.finished for j in jobs if j.finished), default=t0)
            log.warning("tick %d took %.0f ms for %d zones: module calls %.0f ms, last zone done at %.0f ms, "
                        "sent by %.0f ms", n, (done - t0) * 1000, len(jobs), module * 1000, (last - t0) * 1000,
                        ((self._last_sent or done) - t0) * 1000)
        return n

    async def step(self) -> int:
        async with self._tick_lock:
            return await self._tick()

    def exclusive(self) -> asyncio.Lock:
        """Held, no tick runs (the one under way finishes first)."""
        return self._tick_lock

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    async def run(self) -> None:
        """The tick loop: absolute schedule, pause-aware, stops only when cancelled."""
        loop = self._loop
        next_at = loop.time() + self.interval
        while True:
            if self.paused:
                self._wake.clear()
                await self._wake.wait()
                next_at = loop.time() + self.interval
                continue
            delay = next_at - loop.time()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue  # woken early (pause/resume) or on time: look again
            async with self._tick_lock:
                await self._tick(next_at)
            next_at += self.interval
            now = loop.time()
            if next_at <= now:
                missed = int((now - next_at) // self.interval) + 1
                self.metrics.tick_overruns_total += missed
                next_at += missed * self.interval

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.run())

    @property
    def running(self) -> bool:
        """Ticking on its own schedule: started, not stopped, not paused."""
        return self._task is not None and not self.paused

    async def stop(self, deadline: float | None = None) -> None:
        """Stop scheduling; a tick under way finishes first.

        Module calls still running past ``zone_timeout`` are waited for too (until ``deadline``,
        monotonic): their results are applied when they return, and must be before the final
        flush takes its snapshot.
        """
        if self._task is not None:
            async with self._tick_lock:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        while busy := [zs for zs in list(self.world.zones.values()) if zs.busy_since is not None]:
            if deadline is not None and time.monotonic() >= deadline:
                log.error("stopping with %d zone(s) whose module call is still running: their last "
                          "result will not be saved", len(busy))
                break
            await asyncio.sleep(0.01)
            self._drain()
        self._threads.stop()

    def forget(self, zone_ids: Iterable[UUID]) -> None:
        """Zones that left this node (cluster): frames of theirs waiting for the journal are
        never sent (their ticks were refused, or belong to the next owner now)."""
        gone = set(zone_ids)
        keep = []
        for job in self._held:
            if job.zs.zone.id in gone:
                self._pending.discard(job)
            else:
                keep.append(job)
        self._held = keep
        if not self._pending:
            self._all_done.set()

    def zone_busy_seconds(self, zs: _ZoneState) -> float:
        return 0.0 if zs.busy_since is None else time.monotonic() - zs.busy_since


# =============================================================================
# Persistence
# =============================================================================


class Persister:
    """Flushes changed entities every ``interval`` seconds, in one transaction per flush.

    While the database is down the changes stay in memory (nothing is dropped), flushes are
    retried with exponential backoff up to ``max_backoff``, and the outage is logged once
    when it starts and once when it ends. Zone deletion takes the same lock, so a flush
    never writes entities of a zone deleted under it.
    """

    def __init__(self, world: World, store: Store, metrics: Metrics, cfg: Config,
                 after_tick: Callable[[], Awaitable[None]] | None = None,
                 on_fenced: Callable[[dict[UUID, int]], Awaitable[None]] | None = None):
        self.world, self.store, self.metrics = world, store, metrics
        self._after_tick = after_tick  # waits for the end of the tick under way, if ticks run
        #: cluster: drops zones another node took over (a flush refused as ``Fenced``)
        self._on_fenced = on_fenced
        self._saved_marks: dict[UUID, ZoneMark] = {}  # each zone's tick and joined players as the database has them
        self._snapshot_at: dict[UUID, int] = {}  # the tick of each zone's newest saved snapshot
        #: journal rows older than this many ticks before a zone's saved state are trimmed
        self.keep: int | None = cfg.get("journal", "keep") if cfg.get("journal", "mode") == "replay" else None
        self.interval = cfg.get("persistence", "interval")
        self.max_backoff = cfg.get("persistence", "max_backoff")
        self.lock = asyncio.Lock()
        self.outage_since: float | None = None
        self._task: asyncio.Task | None = None
        self._sweeps = 0
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="gridserver-flush")

    def forget(self, zone_id: UUID) -> None:
        """A zone left this node (cluster): what it knew of the zone's saved state is stale."""
        self._saved_marks.pop(zone_id, None)
        self._snapshot_at.pop(zone_id, None)

    def _snapshot_due(self, zone_id: UUID, tick_number: int) -> bool:
        """A zone is saved whole every ``keep // 4`` ticks (in the flush thread, under the world's
        lock): a rewind or a replay starts from the newest snapshot before its tick."""
        assert self.keep is not None
        last = self._snapshot_at.get(zone_id)
        return tick_number > 0 and (last is None or tick_number - last >= max(1, self.keep // 4) or tick_number < last)

    async def flush(self, between_ticks: bool = False) -> bool:
        """Write everything changed since the last flush; False when the database is down.

        The snapshot and its serialization run in the flush thread, not on the event loop,
        and start just after a tick ends: a flush of 100,000 entities must not delay a tick,
        and every zone's rows then come from the same tick. ``between_ticks``: the caller
        holds the ticks (``TickEngine.exclusive``), so no waiting for one to end.
        """
        if self._after_tick is not None and not between_ticks:
            await self._after_tick()  # not under the lock: zone deletion takes it
        async with self.lock:
            for _ in range(3):
                try:
                    return await self._flush()
                except Fenced as exc:  # nothing was written; those zones are another node's now
                    if self._on_fenced is not None:
                        await self._on_fenced(exc.zones)
            return False

    async def _flush(self) -> bool:
        """One attempt of ``flush``, under its lock."""
        loop = asyncio.get_running_loop()
        marks: dict[UUID, ZoneMark] = {}
        snapshots: dict[UUID, tuple[int, list[EntityRow]]] = {}
        fence: dict[UUID, int] | None = {} if self.store.node else None
        rows, deleted = await loop.run_in_executor(self.executor, self.world.take_changes, marks,
                                                   self._snapshot_due if self.keep else None, snapshots, fence)
        marks = {zone_id: m for zone_id, m in marks.items() if self._saved_marks.get(zone_id) != m}
        t0 = time.monotonic()
        try:
            if rows or deleted or marks:
                prepared = await loop.run_in_executor(self.executor, self.store.prepare_flush, rows, deleted,
                                                      marks, self.keep, snapshots, fence)
                await self.store.flush(prepared)
                self._saved_marks.update(marks)
                self._snapshot_at.update((zone_id, tick) for zone_id, (tick, _) in snapshots.items())
            else:
                await self.store.ping()
        except BaseException as exc:  # nothing taken out of the dirty set may be lost
            restoring = loop.run_in_executor(self.executor, self.world.restore_changes, rows, deleted)
            await asyncio.shield(restoring)  # cancelled or not, the changes go back
            if not isinstance(exc, Exception) or isinstance(exc, Fenced):  # cancelled, or fenced
                raise
            # Unreachable, or reachable but refusing the write (read-only after a failover,
            # a revoked privilege...): either way the changes wait here and the flush is
            # retried. An error must never end the flush loop: nothing would be saved again.
            self.metrics.flush_failures_total += 1
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                if isinstance(exc, DatabaseUnavailable):
                    log.warning("database unreachable (%s); keeping changes in memory and retrying", exc)
                else:
                    log.error("flush failed (%s: %s); keeping changes in memory and retrying",
                              type(exc).__name__, (str(exc).strip().splitlines() or [""])[0][:300])
            return False
        if rows or deleted:
            self.metrics.flushes_total += 1
            self.metrics.entities_flushed_total += len(rows) + len(deleted)
            self.metrics.flush_duration.observe(time.monotonic() - t0)
            if _LIBC is not None:
                await loop.run_in_executor(self.executor, _give_back_memory)
        if self.outage_since is not None:
            log.warning("database back after %.1f s; changes saved", time.monotonic() - self.outage_since)
            self.outage_since = None
        return True

    async def run(self) -> None:
        backoff = 0.0
        while True:
            await asyncio.sleep(backoff or self.interval)
            if await self.flush():
                backoff = 0.0
                self._sweeps += 1
                if self._sweeps % 100 == 0:
                    try:
                        await self.store.delete_expired_sessions(_now())
                    except Exception as exc:  # noqa: BLE001 - a sweep that fails waits for the next one
                        log.warning("sweeping expired sessions failed: %s", exc)
            else:
                backoff = min(self.max_backoff, backoff * 2 if backoff else min(0.5, self.interval))

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.run())

    async def stop(self, deadline: float) -> bool:
        """Stop the schedule, then flush until it succeeds or ``deadline`` (monotonic) passes;
        whether everything was saved."""
        if self._task is not None:
            async with self.lock:  # let a flush under way finish rather than cut it off
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        delay = 0.2
        while not await self.flush():
            if time.monotonic() + delay > deadline:
                n = len(self.world.dirty) + len(self.world.deleted)
                log.error("shutting down with %d entity changes unsaved: the database is unreachable", n)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        return True


# =============================================================================
# Game modules and the framework API
# =============================================================================


class FrameworkAPI:
    """What a game module may use outside a tick's arguments.

    Module code calls it from a game thread (``on_tick``, the hooks, ``get_player_state``) or
    from the thread that runs ``on_init``, never from the event loop. Reads take the world's
    lock; ``create_zone`` writes to the database and waits for it, so calling it from the
    event loop (which would wait on itself) raises ``RuntimeError``.
    """

    def __init__(self, world: World, settings: dict[str, str], *, section: str, tick_interval: float,
                 create_zone: Callable[[str, int, int, dict], Zone], usernames: Mapping[UUID, str],
                 catalog: Callable[[], list[Zone]] | None = None):
        self._world = world
        self._catalog = catalog  # cluster: every zone of the world, not only this node's
        self._section = section
        self._create_zone = create_zone
        self._usernames = usernames
        self.settings = settings
        self._random = random.Random()
        self.logger = logging.getLogger("gridserver.game")
        self.tick_interval: float = tick_interval
        self.tick_rate: float = 1.0 / tick_interval

    @property
    def random(self) -> random.Random:
        """Random numbers for the zone tick under way: seeded by the server for each zone tick,
        the same seed when the tick is replayed, so draw every random number a tick needs from
        here (never from the ``random`` module or the clock). Outside a tick (``on_init``) it
        is a generator seeded from the system."""
        rng: random.Random | None = getattr(_TICK, "random", None)
        if rng is None and getattr(_TICK, "seed", None) is not None:  # in a tick, asked for the first time
            rng = _TICK.random = random.Random(_TICK.seed)
        return rng if rng is not None else self._random

    def setting(self, key: str, default: Any = None, cast: Callable[[str], Any] = str) -> Any:
        """The module's INI setting ``key`` converted by ``cast``; ``default`` when absent."""
        if key not in self.settings:
            return default
        raw = self.settings[key]
        if cast is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        try:
            return cast(raw)
        except ValueError:
            raise ConfigError(f"[{self._section}] {key}: cannot use {raw!r}") from None

    @property
    def _w(self) -> World:
        """The world the reads below look at: the server's, or (in a cluster node's thread that
        replays a zone it takes over) the world that zone is replayed in."""
        world: World | None = getattr(_TICK, "world", None)
        return world if world is not None else self._world

    def list_zones(self) -> list[Zone]:
        """Every zone of the world (in a cluster, also those other nodes tick)."""
        if self._catalog is not None:
            return self._catalog()
        return [zs.zone for zs in list(self._world.zones.values())]

    def get_zone(self, zone_id: UUID) -> Zone | None:
        zone_id = _as_uuid(zone_id)
        zs = self._world.zones.get(zone_id)
        if zs is None and self._catalog is not None:
            return next((z for z in self._catalog() if z.id == zone_id), None)
        return None if zs is None else zs.zone

    def create_zone(self, name: str, width: int, height: int, metadata: dict | None = None) -> Zone:
        """Create and persist a zone (blocking until the database has it); ValueError if refused."""
        return self._create_zone(name, width, height, metadata or {})

    def username(self, player_id: UUID) -> str | None:
        """The username of a player who connected since the server started (None otherwise).
        During a zone tick: of a player whose intent, join or leave the tick carries (None
        for others), which a replay answers the same."""
        names: dict[UUID, str] | None = getattr(_TICK, "names", None)
        if names is not None:
            return names.get(_as_uuid(player_id))
        return self._usernames.get(_as_uuid(player_id))

    def get_entity(self, entity_id: UUID) -> Entity | None:
        return self._w.get_entity(_as_uuid(entity_id))

    def list_entities(self, zone_id: UUID) -> list[Entity]:
        with self._w.lock:
            return self._w.entities_of(_as_uuid(zone_id))

    def query_area(self, zone_id: UUID, x: int, y: int, width: int, height: int) -> list[Entity]:
        """Entities in ``[x, x+width) x [y, y+height)`` (sized ones sharing area, points inside)."""
        return self._w.query_area(_as_uuid(zone_id), x, y, width, height)

    def query_overlap(self, zone_id: UUID, x: int, y: int, width: int, height: int,
                      exclude: UUID | None = None) -> list[Entity]:
        """Sized entities whose rectangle shares area with this one (``exclude``: an id to skip)."""
        return self._w.query_overlap(_as_uuid(zone_id), x, y, width, height,
                                         None if exclude is None else _as_uuid(exclude))


class GameModuleError(ConfigError):
    """The game module cannot be loaded or initialised; the message is one line naming the
    module and the cause, with the file and line where the error arose."""


def _where(exc: BaseException) -> str:
    """``file:line: Type: message`` for an error raised by module code: the line of a syntax
    error, else the innermost frame outside gridserver.py and the import machinery."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}: {type(exc).__name__}: {exc.msg}"
    own = os.path.abspath(__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<") and os.path.abspath(f.filename) != own]
    where = f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""
    return f"{where}{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


@dataclass
class LoadedGame:
    """A game module as loaded from its ``[game] module`` path: what the server calls
    (``game``: the module, or an instance of the class the path names), the module object,
    its source file and ``version`` (a digest of that source)."""

    path: str
    game: Any
    module: types.ModuleType
    file: str | None
    version: str


def _source_version(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()[:12]


def load_game_module(path: str, fresh: bool = False) -> LoadedGame:
    """Import the game named by ``package.module`` or ``package.module:Name`` (a class is
    instantiated with no arguments) and check it has the methods a game needs.

    ``fresh`` runs the module's source file again as a new module object (a hot reload): the
    module loaded before stays in ``sys.modules`` unless this one loads. The command line
    puts the configuration file's folder, the working directory and this file's folder at
    the front of ``sys.path``, in that order. Every failure raises ``GameModuleError``.
    """
    module_name, _, attr = path.partition(":")
    what = f"game module {path!r}"
    try:
        if fresh:
            spec = importlib.util.find_spec(module_name)
            if spec is None or not (spec.origin or "").endswith(".py") or spec.loader is None:
                raise GameModuleError(f"{what}: no Python source file to load again")
            with open(spec.origin or "", "rb") as fh:
                source = fh.read()
            module = importlib.util.module_from_spec(spec)
            # compiled from the source read now: a cached .pyc written in the same second
            # could hold the code from before the change
            exec(compile(source, spec.origin or "", "exec"), module.__dict__)
        else:
            module = importlib.import_module(module_name)
            file = getattr(module, "__file__", None)
            source = b""
            if file and file.endswith(".py"):
                with contextlib.suppress(OSError), open(file, "rb") as fh:
                    source = fh.read()
    except GameModuleError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name) and module_name[len(exc.name):len(exc.name) + 1] in ("", "."):
            raise GameModuleError(f"{what}: no module named {exc.name!r} on the path "
                                  f"(the config file's folder, the working directory, gridserver.py's folder)") from None
        raise GameModuleError(f"{what}: {_where(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - whatever the module's import raised
        raise GameModuleError(f"{what}: {_where(exc)}") from None
    game: Any = module
    if attr:
        if not hasattr(module, attr):
            raise GameModuleError(f"{what}: {module_name!r} has no attribute {attr!r}")
        game = getattr(module, attr)
        if inspect.isclass(game):
            try:
                game = game()
            except Exception as exc:  # noqa: BLE001
                raise GameModuleError(f"{what}: {_where(exc)}") from None
    missing = _missing_methods(game)
    if missing:
        raise GameModuleError(f"{what} lacks {missing} (see GameLogicModule)")
    return LoadedGame(path, game, module, getattr(module, "__file__", None), _source_version(source))


def load_game(path: str) -> Any:
    """The game object ``load_game_module`` loads (see there)."""
    return load_game_module(path).game


def init_game(game: Any, name: str, framework: "FrameworkAPI", previous: Any = None) -> None:
    """Call the game's ``on_init(framework)`` and, for a reload, its ``on_reload(previous)``;
    an exception becomes ``GameModuleError`` naming the game (``name``), file and line."""
    for hook, args in (("on_init", (framework,)), ("on_reload", (previous,))):
        if hook == "on_reload" and previous is None:
            continue
        fn = getattr(game, hook, None)
        if fn is None:
            continue
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001
            raise GameModuleError(f"game module {name!r}: {hook}: {_where(exc)}") from None


#: The game module named by default; when a lone copy of this file runs without the
#: ``game_modules/`` folder beside it, ``BuiltinDemo`` runs instead (with a warning).
DEFAULT_GAME = "game_modules.walkers"

_DEMO_MOVES = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}


class BuiltinDemo:
    """The game a lone copy of gridserver.py runs: one avatar per player in a 'lobby' zone,
    moved by ``{"move": "up" | "down" | "left" | "right"}``. ``game_modules/walkers.py`` is
    the full example (walls, items, scores, fog of war); this keeps a copied file playable.
    """

    def on_init(self, framework: FrameworkAPI) -> None:
        self.fw = framework
        self.avatars: dict[tuple[UUID, UUID], UUID] = {}
        if not framework.list_zones():
            framework.create_zone("lobby", 24, 24, {"game": "builtin demo"})

    def on_player_join(self, zone_id: UUID, player_id: UUID) -> TickResult | None:
        for e in self.fw.list_entities(zone_id):  # kept from before a restart
            if e.metadata.get("player_id") == str(player_id):
                self.avatars[(zone_id, player_id)] = e.id
                return None
        zone = self._zone(zone_id)
        eid = uuid.uuid4()
        self.avatars[(zone_id, player_id)] = eid
        name = self.fw.username(player_id) or str(player_id)[:8]
        meta = {"kind": "avatar", "player_id": str(player_id), "label": name}
        return TickResult(entity_creates=[EntityCreate(player_id.int % zone.width, (player_id.int >> 64) % zone.height,
                                                       1, 1, meta, eid)])

    def on_player_leave(self, zone_id: UUID, player_id: UUID) -> TickResult | None:
        eid = self.avatars.pop((zone_id, player_id), None)
        return TickResult(entity_deletes=[eid]) if eid is not None and self.fw.get_entity(eid) else None

    def _zone(self, zone_id: UUID) -> Zone:
        zone = self.fw.get_zone(zone_id)
        assert zone is not None, "a zone ticks only while it exists"
        return zone

    def on_tick(self, zone_id: UUID, entities: list[Entity], intents: list[Intent], tick_number: int) -> TickResult:
        zone = self._zone(zone_id)
        pos = {e.id: (e.x, e.y) for e in entities}
        moves = {i.player_id: _DEMO_MOVES[i.data["move"]] for i in intents
                 if isinstance(i.data.get("move"), str) and i.data["move"] in _DEMO_MOVES}
        updates = []
        for player_id, (dx, dy) in moves.items():
            eid = self.avatars.get((zone_id, player_id))
            if eid in pos:
                x, y = pos[eid]
                pos[eid] = (min(max(x + dx, 0), zone.width - 1), min(max(y + dy, 0), zone.height - 1))
                updates.append(EntityUpdate(eid, x=pos[eid][0], y=pos[eid][1]))
        state = [{"id": str(e.id), "x": pos[e.id][0], "y": pos[e.id][1], "w": e.width, "h": e.height,
                  **{k: e.metadata[k] for k in ("kind", "player_id", "label") if k in e.metadata}} for e in entities]
        return TickResult(entity_updates=updates, broadcast_state={"tick": tick_number, "entities": state})

    def get_player_state(self, zone_id: UUID, player_id: UUID, full_state: dict) -> dict:
        return full_state


class ZoneSim:
    """A game module run without a server, for its tests: one zone, ticked by hand::

        sim = ZoneSim("game_modules.walkers", 8, 8, settings={"walls": 0, "items": 0})
        sim.join(player_id)
        sim.intent(player_id, {"move": "right"})
        assert sim.tick() == 1 and sim.last_error is None
        sim.state_for(player_id)     # what that player was sent, parsed

    It runs the server's own pieces, not copies of them. The zone lives in a ``World``; joins
    and leaves go to its inbox as the hub queues them (``_queue_event``: a join and a leave of
    one player before a tick cancel out) and intents as the door takes them (a JSON object
    that ``_data_problem`` passes, made read-only); ``tick`` is ``run_zone_tick``: the join and
    leave hooks, ``on_tick``, ``World``'s checks and all-or-nothing apply, ``get_player_state``
    for every player in the zone and the frames. The joins and leaves of a tick that applied
    nothing go with the next tick that does (``_requeue_events``), as in the server.

    Deterministic: each tick's seed is drawn from ``seed`` and tick n happens at ``START + n *
    tick_interval`` (the ``created_at``/``updated_at`` it writes; intents are received at the
    time of the tick before theirs), so two sims given the same game, seed and calls leave the
    same world, ids included. ``on_init`` runs once, here, with a ``FrameworkAPI`` over the
    sim's world (its ``random`` seeded from ``seed`` too); the sim's zone (``zone_id``) exists
    before it, and zones it creates exist too but do not tick. The per-tick intent limits
    (``[tick] max_intents_per_player``) are the server's, not the sim's.

    ``game`` is a module, an object, a class (instantiated with no arguments) or a
    ``"package.module"``/``"package.module:Name"`` path (``load_game``). A module is one object:
    a second sim of it runs its ``on_init`` again, over the second sim's world, so keep to one
    sim of a module at a time (a class gives each sim an instance of its own). With ``verify``
    every tick runs twice from the same state and the two are compared, as the server's debug
    mode does: a module that is not deterministic shows in ``last_error``.
    """

    #: When tick 0 happens (2024-01-01T00:00:00Z): tick n happens ``n * tick_interval`` later.
    START = 1_704_067_200.0
    #: How deep an intent's data may nest: the door's default (``[websocket] max_depth``).
    MAX_DEPTH = int(next(o.default for o in OPTIONS if (o.section, o.key) == ("websocket", "max_depth")))

    def __init__(self, game: Any, width: int = 32, height: int = 32, metadata: dict | None = None,
                 settings: Mapping[str, Any] | None = None, *, seed: int = 0, tick_interval: float = 1.0,
                 usernames: Mapping[UUID | str, str] | None = None, name: str = "sim", verify: bool = False):
        section, self._game = _sim_game(game)
        self._world = World()
        self._seeds = random.Random(seed)               # each tick's seed
        self._ids = random.Random(seed ^ _ID_SALT)      # the ids of zones and placed entities
        self._interval = tick_interval
        self._verify = verify
        self._usernames = {_as_uuid(p): n for p, n in (usernames or {}).items()}
        self._members: dict[UUID, None] = {}            # the players in the zone, in the order they joined
        self._frames: dict[UUID, bytes] = {}            # each player's last frame
        self._seq = itertools.count(1)
        self._outcome: ZoneOutcome | None = None
        self._zs = self._world.zones[self._create_zone(name, width, height, metadata or {}).id]
        self._framework = FrameworkAPI(self._world, {k: str(v) for k, v in (settings or {}).items()},
                                       section=section, tick_interval=tick_interval, create_zone=self._create_zone,
                                       usernames=self._usernames)
        self._framework._random.seed(self._seeds.getrandbits(63))
        self._game.on_init(self._framework)

    def _create_zone(self, name: str, width: int, height: int, metadata: dict) -> Zone:
        """``FrameworkAPI.create_zone`` for the sim: the zone joins the sim's world, numbered on
        from the sim's ticks; ValueError for a size that is no positive integer or a name taken."""
        for value in (width, height):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"a zone's width and height must be positive integers, got {value!r}")
        if self._world.zone_by_name(name) is not None:
            raise ValueError(f"A zone named {name!r} exists already.")
        first = self._zs.tick_number if self._world.zones else 0  # the sim's own zone comes first
        when = _dt.datetime.fromtimestamp(self.START + first * self._interval, _dt.timezone.utc)
        zone = Zone(self._new_id(), name, width, height, dict(metadata), when, when)
        self._world.add_zone(zone, (), first)
        return zone

    def _new_id(self) -> UUID:
        return uuid.UUID(int=self._ids.getrandbits(128), version=4)

    # -- players -------------------------------------------------------------------------
    def join(self, player_id: UUID | str, username: str | None = None) -> None:
        """The player enters the zone (a subscribe): the module hears of it at the next tick,
        and the player is sent a frame every tick from then on. ``username`` is what
        ``framework.username`` answers for them. Joining while in the zone does nothing."""
        player = _as_uuid(player_id)
        if username is not None:
            self._usernames[player] = username
        if player not in self._members:
            self._members[player] = None
            _queue_event(self._zs, player, "join")

    def leave(self, player_id: UUID | str) -> None:
        """The player leaves the zone (an unsubscribe, or the end of the reconnect grace): the
        module hears of it at the next tick and the player is sent no more frames. Leaving a
        zone one is not in does nothing."""
        player = _as_uuid(player_id)
        if player in self._members:
            del self._members[player]
            _queue_event(self._zs, player, "leave")

    def intent(self, player_id: UUID | str, data: dict) -> Intent:
        """Queue an intent for the next tick, as the door takes a client's ``{"type": "intent",
        "data": ...}``: ``data`` becomes what the module would get over the wire (JSON: tuples
        become lists, keys strings, UUIDs text), read-only. ValueError for what the server
        refuses (data that is not a JSON object, NaN or a number too large for JSON, unpaired
        surrogates, nesting deeper than ``MAX_DEPTH``) and for a player who is not in the zone.
        Returns the queued intent."""
        player = _as_uuid(player_id)
        if player not in self._members:
            raise ValueError(f"player {player} is not in the zone: join first (the server takes intents only "
                             f"from players in a zone)")
        if not isinstance(data, dict):
            raise ValueError(f"intent data must be a JSON object (a dict), not {type(data).__name__}")
        try:
            text = json_dumps(data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"intent data is not JSON ({exc})") from None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("intent data holds an unpaired surrogate (not Unicode text)") from None
        sent: dict = json_loads(text)
        problem = _data_problem(sent, self.MAX_DEPTH)
        if problem is not None:
            raise ValueError(f"intent data {problem}")
        intent = Intent(player, self._zs.zone.id, _freeze(sent), self.now, next(self._seq))
        self._zs.intents.append(intent)
        return intent

    # -- ticks ---------------------------------------------------------------------------
    def tick(self, n: int = 1) -> int:
        """Run the zone's next ``n`` ticks; returns the number of the last. A lost tick raises
        nothing: it shows in ``last_error`` (the next tick clears it)."""
        for _ in range(n):
            self._tick()
        return self._zs.tick_number

    def _tick(self) -> None:
        zs = self._zs
        at = self.START + (zs.tick_number + 1) * self._interval
        inputs = take_inputs(zs, list(self._members), self._usernames, self._seeds.getrandbits(63), at, self._verify)
        outcome = run_zone_tick(self._world, self._game, zs, inputs, lambda: at)
        if outcome.error is not None and not outcome.applied:
            _requeue_events(zs, inputs.events)  # as TickEngine._deliver does
        self._frames.update(outcome.frames)
        self._outcome = outcome

    def place(self, *creates: EntityCreate) -> list[Entity]:
        """Put entities in the zone, for a test's starting position: checked and applied as a
        tick's creates are (``TickRejected`` names a broken rule), at the time of the last tick.
        The module is not told. Returns the new entities, in order."""
        created, _, _ = self._world.apply(self._zs.zone.id, TickResult(entity_creates=list(creates)), self.now,
                                          self._new_id)
        return created

    # -- what a test looks at ------------------------------------------------------------
    def state_for(self, player_id: UUID | str) -> dict:
        """The ``state`` of the last frame the player was sent, parsed from the frame's bytes as
        a client reads it (a new copy each call). KeyError for a player sent none yet."""
        player = _as_uuid(player_id)
        frame = self._frames.get(player)
        if frame is None:
            raise KeyError(f"player {player} has been sent no frame (a player gets one from each tick that "
                           f"succeeds while they are in the zone)")
        state: dict = _frame_message(frame)["state"]
        return state

    @property
    def entities(self) -> list[Entity]:
        """The sim's zone's entities, in id order (the same order for two sims that made the
        same world)."""
        with self._world.lock:
            return sorted(self._zs.entities.values(), key=lambda e: e.id)

    def entity(self, entity_id: UUID | str) -> Entity | None:
        """The entity with this id, in any of the sim's zones (None: there is none)."""
        return self._world.get_entity(_as_uuid(entity_id))

    @property
    def last_error(self) -> str | None:
        """Why the last tick was lost (None: it was not, or no tick ran yet), as the zone's
        ``last_error`` says it; with ``verify``, also how its two runs differed."""
        outcome = self._outcome
        if outcome is None:
            return None
        if outcome.error is None and outcome.mismatch is not None:
            return f"nondeterministic: {outcome.mismatch}"
        return outcome.error

    @property
    def last_outcome(self) -> ZoneOutcome | None:
        """What the last tick's ``run_zone_tick`` returned (its frames, ``kind``, ``exception``)."""
        return self._outcome

    @property
    def now(self) -> float:
        """The time of the last tick (``START`` before the first), in seconds since the epoch."""
        return self.START + self._zs.tick_number * self._interval

    @property
    def tick_number(self) -> int:
        """The number of the last tick (0 before the first)."""
        return self._zs.tick_number

    @property
    def zone_id(self) -> UUID:
        """The id of the sim's zone, the one that ticks."""
        return self._zs.zone.id

    @property
    def game(self) -> Any:
        """The game module (or instance) the sim runs."""
        return self._game

    @property
    def framework(self) -> FrameworkAPI:
        """The ``FrameworkAPI`` the game was given."""
        return self._framework

    @property
    def world(self) -> World:
        """The sim's world: its zones and their entities."""
        return self._world


def _sim_game(game: Any) -> tuple[str, Any]:
    """A ZoneSim's game and the name of its settings section, from what a test passed."""
    if isinstance(game, str):
        return game, load_game(game)
    if isinstance(game, type):
        section, game = f"{game.__module__}:{game.__qualname__}", game()
    elif inspect.ismodule(game):
        section = game.__name__
    else:
        section = f"{type(game).__module__}:{type(game).__qualname__}"
    missing = _missing_methods(game)
    if missing:
        raise TypeError(f"{section} lacks {missing} (see GameLogicModule)")
    return section, game


def _frame_message(frame: bytes) -> dict:
    """The JSON message in a server-to-client WebSocket text frame (``ws_text_frame``)."""
    n = frame[1] & 0x7F
    start = 2 if n < 126 else 4 if n == 126 else 10  # the header: 2 bytes, then 2 or 8 of length
    message: dict = json_loads(frame[start:].decode("utf-8"))
    return message


# =============================================================================
# Server state
# =============================================================================


class Server:
    """Everything one running gridserver holds; the app keeps it under ``SERVER``."""

    def __init__(self, cfg: Config, game: Any = None):
        self.cfg = cfg
        #: the loaded game module (None: handed over as an object, or the built-in demo): what
        #: a reload loads again
        self.loaded: LoadedGame | None = game if isinstance(game, LoadedGame) else None
        self.game = game.game if isinstance(game, LoadedGame) else game
        self.framework: FrameworkAPI | None = None
        self.metrics = Metrics()
        self.world = World(cfg.get("tick", "max_entities_per_zone"))
        self.store = open_store(cfg)
        self.accounts = Accounts(self.store, cfg, self.metrics)
        self.hub = Hub(self.world, self.metrics, cfg)
        self.debug = cfg.get("server", "debug")
        self.cors_origins = frozenset(o.strip().rstrip("/") for o in cfg.get("server", "cors_origins").split(",")
                                      if o.strip())
        self.max_body = cfg.get("server", "max_body_size")
        self.max_zone = cfg.get("server", "max_zone_size")
        self.client_timeout = cfg.get("server", "client_timeout")
        self.max_depth = cfg.get("websocket", "max_depth")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine: TickEngine | None = None
        self.journal: Journal | None = None
        self.persister = Persister(self.world, self.store, self.metrics, cfg, self._after_tick, self._flush_fenced)
        self.world_executor = ThreadPoolExecutor(1, thread_name_prefix="gridserver-world")
        #: cluster mode (``[cluster] nats_url``): this node's share of the world, and the relay
        #: of players between nodes
        self.cluster: Cluster | None = None
        self.relay: Relay | None = None
        self.started = time.time()
        self._shut_down = False
        self._heartbeat: asyncio.Task | None = None
        self._reload_lock = asyncio.Lock()


    @property
    def node_name(self) -> str:
        """This process's name: ``[cluster] node_name``, or ``<hostname>:<port>:<pid>``."""
        if self.cluster is not None:
            return self.cluster.node
        return self.cfg.get("cluster", "node_name") or f"{socket.gethostname()}:{self.cfg.get('server', 'port')}:{os.getpid()}"

    @property
    def ticks(self) -> TickEngine:
        """The tick engine (the server has started)."""
        if self.engine is None:
            raise RuntimeError("the server has not started")
        return self.engine

    def is_debug_player(self, username: str) -> bool:
        return self.hub.is_debug(username)

    async def start(self) -> None:
        """Open the database, load the world, load and initialise the game, start the loops."""
        self.loop = asyncio.get_running_loop()
        await self.store.open()
        if self.cfg.get("cluster", "nats_url"):
            # A node starts with no zone: its rounds take its share once the game is ready.
            self.cluster = Cluster(self.store, self.cfg, port=self.cfg.get("server", "port"), adopt=self._adopt,
                                   drop=self.drop_zones, hand_over=self.hand_over,
                                   connections=lambda: len(self.hub.conns))
            self.store.node = self.cluster.node
            try:
                await self.cluster.connect()
            except BaseException:
                await self.store.close()
                raise
            self.relay = Relay(self.cluster, self.hub, self.world, self.metrics,
                               self.cfg.get("websocket", "max_behind"))
            await self.relay.start()
            self.cluster.on_round = self.relay.after_round
            self.cluster.on_owned = self.relay.announce
            self.cluster.on_loading = self.relay.loading
            self.relay.answer = self._answer_node
        else:
            zones, entities, marks = await self.store.load()
            await self.in_world(self.world.load, zones, entities, marks)
            log.info("loaded %d zones and %d entities", len(zones), len(entities))
        if self.game is None:
            loaded = startup_game(self.cfg)
            self.loaded = loaded if isinstance(loaded, LoadedGame) else None
            self.game = loaded.game if isinstance(loaded, LoadedGame) else loaded
        settings = self.cfg.section(self.cfg.get("game", "module"))
        self.framework = framework = FrameworkAPI(self.world, settings, section=self.cfg.get("game", "module"),
                                                  tick_interval=self.cfg.get("tick", "interval"),
                                                  create_zone=self._create_zone_blocking, usernames=self.hub.usernames,
                                                  catalog=self.cluster.catalog if self.cluster else None)
        name = self.loaded.path if self.loaded else getattr(self.game, "__name__", type(self.game).__name__)
        try:
            await self.loop.run_in_executor(None, init_game, self.game, name, framework)
        except GameModuleError:
            await self.store.close()
            raise
        if self.cfg.get("journal", "mode") == "replay":
            if self.cluster is None:  # a cluster node replays each zone as it takes it over
                await self._replay_journal()
            self.journal = Journal(self.store, self.metrics, self._journal_committed,
                                   self.cfg.get("persistence", "max_backoff"), strict=self.cluster is not None,
                                   on_fenced=lambda zones: self.hub.spawn(self.drop_zones(self.fenced(zones))))
            self.journal.start()
        held = self.hub.restore(list(self.world.zones.values()))
        if held:
            log.info("%d player(s) in zones when the server stopped may resume within %.0f s; the others "
                     "are delivered as leaving", held, self.hub.grace)
        first_tick = max((zs.tick_number for zs in list(self.world.zones.values())), default=0)
        self.engine = TickEngine(self.world, self.hub, self.game, self.metrics, self.cfg, self.journal, first_tick)
        if self.cluster is not None:
            self.engine.gate = self.cluster.may_tick
        self.engine.start()
        self.persister.start()
        if self.cluster is not None:
            self.cluster.start()
        if self.hub.heartbeat:
            self._heartbeat = asyncio.ensure_future(self.hub.heartbeat_loop())

    async def shutdown(self) -> None:
        """Ordered and idempotent: stop the tick, write the journal, final flush, close sockets
        with 1001."""
        if self._shut_down:
            return
        self._shut_down = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        deadline = time.monotonic() + self.cfg.get("server", "shutdown_timeout")
        if self.cluster is not None:
            await self.cluster.leave()
        if self.engine is not None:
            await self.engine.stop(deadline)
        if self.journal is not None:
            await self.journal.drain(deadline)
        saved = await self.persister.stop(deadline)
        if self.journal is not None:
            await self.journal.stop()
        if self.cluster is not None:
            # Saved: the others take the zones over at once. Not saved: the leases lapse
            # and the others go on from the journal.
            if saved:
                zone_ids = set(self.cluster.owned)
                with contextlib.suppress(Exception):
                    await self.cluster.released(zone_ids)
                if self.relay is not None:
                    await self.relay.moved_away(zone_ids)
            # this node's players leave their zones' owners (held there for the grace period)
            if self.relay is not None:
                self.relay.leave_all()
            await self.hub.close_all(1001, "server shutting down")
            if self.relay is not None:
                await self.relay.drain()
                await self.relay.stop()
            await self.cluster.close()
            return
        await self.hub.close_all(1001, "server shutting down")

    async def close(self) -> None:
        await self.store.close()
        self.accounts.executor.shutdown(wait=False)
        self.persister.executor.shutdown(wait=False)
        self.world_executor.shutdown(wait=False)

    # -- zones -----------------------------------------------------------------------------
    async def create_zone(self, name: Any, width: Any, height: Any, metadata: Any) -> Zone:
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise GridError("bad_request", "The field 'name' must be a string of 1 to 64 characters.")
        for key, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.max_zone:
                raise GridError("bad_request", f"The field '{key}' must be an integer from 1 to {self.max_zone}.")
        if not isinstance(metadata, dict):
            raise GridError("bad_request", "The field 'metadata' must be a JSON object.")
        for key, problem in (("name", _json_problem(name)), ("metadata", _json_problem(metadata))):
            if problem is not None:
                raise GridError("bad_request", f"The field '{key}' {problem}.")
        if self.world.zone_by_name(name) is not None:
            raise GridError("zone_name_taken", f"A zone named {name!r} exists already.")
        zone = Zone(uuid.uuid4(), name, width, height, metadata)
        # A new zone's ticks are numbered on from the engine's, like the zones beside it.
        first_tick = self.engine.tick_number if self.engine else 0
        try:
            await self.store.insert_zone(zone, first_tick)
        except UniqueViolation:
            raise GridError("zone_name_taken", f"A zone named {name!r} exists already.") from None
        if self.world.zone_by_name(name) is not None:  # created by a racing call meanwhile
            raise GridError("zone_name_taken", f"A zone named {name!r} exists already.")
        if self.cluster is not None:  # the node that creates a zone ticks it, unless another was quicker
            async with self.cluster.lock:
                epoch = await self.cluster.claim_new(zone.id)
                self.cluster.zones = {**self.cluster.zones, zone.id: (zone, self.cluster.node if epoch else None,
                                                                      epoch or 0, epoch is not None)}
                if epoch is None:
                    return zone
                await self.in_world(self.world.add_zone, zone, (), first_tick, epoch)
                self.cluster._owns(zone.id, epoch)
            return zone
        await self.in_world(self.world.add_zone, zone, (), first_tick)
        return zone

    # -- cluster ---------------------------------------------------------------------------
    async def _answer_node(self, op: str, message: dict) -> dict:
        """Cluster: another node asks this one (its debug routes act on every node)."""
        engine = self.ticks
        if op == "pause":
            engine.pause()
        elif op == "resume":
            engine.resume()
        elif op == "step":
            if not engine.paused:
                engine.pause()  # a node that joined since the pause
            return {"tick_number": await engine.step()}
        elif op == "connections":
            return {"connections": self.connections_json()}
        return {"paused": engine.paused, "tick_number": engine.tick_number}

    def connections_json(self) -> list[dict]:
        node = self.node_name
        return [{"player_id": str(c.player_id), "username": c.username,
                 "zone_id": None if c.zone_id is None else str(c.zone_id), "connected_at": _iso(c.connected_at),
                 "node": node} for c in list(self.hub.conns.values())]

    async def on_every_node(self, op: str) -> list[dict]:
        """Ask every other node of a cluster to do what this one did (none: one node)."""
        return await self.relay.ask_all(op) if self.relay is not None else []

    async def _adopt(self, zone_id: UUID, epoch: int) -> bool:
        """A zone this node just claimed: load it as saved, replay its journal after the last
        flush through the module (in a worker thread, in a world of its own), then tick it."""
        loaded = await self.store.load_zone(zone_id)
        if loaded is None:
            return False
        zone, entities, (tick, joined), rows = loaded
        names = await self.store.usernames_of(await asyncio.get_running_loop().run_in_executor(
            None, _journal_players, rows)) if rows else {}

        def build() -> tuple[_ZoneState, World, int]:
            own = World(self.world.max_entities)
            zs = own.add_zone(zone, entities, tick, epoch)
            zs.joined = {UUID(p) for p in joined}
            _TICK.world = own  # the module's reads during the replay see the zone being replayed
            try:
                return zs, own, len(replay_zone(own, self.game, zs, rows, usernames=names))
            finally:
                _TICK.world = None
        async with self._reload_lock:  # module code: not while a hot reload swaps it
            zs, own, replayed = await asyncio.get_running_loop().run_in_executor(None, build)
        if self.cluster is None or self.cluster.owned.get(zone_id) != epoch:
            return False  # lost again meanwhile
        await self.in_world(self.world.adopt_zone, zs, own.dirty, own.deleted)
        self.hub.restore([zs])
        log.info("cluster: zone %s (%s) ticks here now, epoch %d, from tick %d (%d journaled tick(s) replayed)",
                 zone_id, zone.name, epoch, zs.tick_number, replayed)
        return True

    def fenced(self, zones: dict[UUID, int]) -> set[UUID]:
        """A write was refused for these zones at these epochs: those still held here at them
        stop at once (nothing of theirs is sent or written from now on); the ones to drop."""
        gone = {z for z, epoch in zones.items() if (zs := self.world.zones.get(z)) is not None and zs.epoch == epoch}
        for zone_id in gone:
            self.world.zones[zone_id].leaving = True
        if self.engine is not None:
            self.engine.forget(gone)
        if self.journal is not None:
            self.journal.forget(gone)
        return gone

    async def _flush_fenced(self, zones: dict[UUID, int]) -> None:
        await self.drop_zones(self.fenced(zones))

    async def drop_zones(self, zone_ids: set[UUID], why: str = "taken over by another node") -> None:
        """Zones this node lost (another node took them over, or they were deleted): they stop
        here at once, unsaved changes and all (the owner goes on from the database and the
        journal), and their subscribers are told."""
        if self.engine is not None:
            self.engine.forget(zone_ids)
        if self.journal is not None:
            self.journal.forget(zone_ids)
        for zone_id in zone_ids:
            if self.cluster is not None:
                self.cluster.owned.pop(zone_id, None)
            zs = await self.in_world(self.world.remove_zone, zone_id)
            self.persister.forget(zone_id)
            if zs is not None:
                log.log(logging.INFO if why == "handed over" else logging.WARNING,
                        "cluster: zone %s (%s) no longer ticks here: %s", zone_id, zs.zone.name, why)
                self.hub.zone_deleted(zone_id, moved=why != "deleted")
            if self.relay is not None:
                self.relay.disown(zone_id)

    async def hand_over(self, zone_ids: set[UUID]) -> None:
        """Give zones to other nodes with nothing lost: they stop ticking here, are flushed
        (their journal written), leave memory, and their leases are released."""
        zones = [zs for z in zone_ids if (zs := self.world.zones.get(z)) is not None and zs.busy_since is None]
        for zs in zones:
            zs.leaving = True
        saved = await self.persister.flush()
        if saved and self.journal is not None:
            saved = await self.journal.drain(time.monotonic() + self.cfg.get("database", "timeout"))
        if not saved or self.cluster is None:
            for zs in zones:
                zs.leaving = False
            return
        await self.drop_zones({zs.zone.id for zs in zones if self.cluster.owned.get(zs.zone.id) == zs.epoch},
                              "handed over")
        await self.cluster.released({zs.zone.id for zs in zones})

    async def _after_tick(self) -> None:
        """Wait for the end of the tick under way (or the next one) while ticks run, at most
        two intervals: flushes take their snapshot between ticks."""
        engine = self.engine
        if engine is not None and engine.running:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(engine.tick_ended(), engine.interval * 2)

    async def _replay_journal(self) -> None:
        """Recovery: every zone goes on from its last flush through the journaled ticks after
        it, replayed through the module (in a worker thread, where module code may run)."""
        rows = await self.store.journal_after_flush()
        by_zone: dict[UUID, list[tuple]] = collections.defaultdict(list)
        for row in rows:
            by_zone[row[0]].append(row)

        names = await self.store.usernames() if rows else {}

        def replay_all() -> int:
            count = 0
            for zone_id, zone_rows in by_zone.items():
                zs = self.world.zones.get(zone_id)
                if zs is not None:
                    count += len(replay_zone(self.world, self.game, zs, zone_rows, usernames=names))
            return count
        if rows:
            t0 = time.monotonic()
            count = await asyncio.get_running_loop().run_in_executor(None, replay_all)
            log.info("journal: replayed %d ticks of %d zones after their last flush in %.2f s",
                     count, len(by_zone), time.monotonic() - t0)

    async def rewind(self, zs: _ZoneState, n: int) -> list[dict]:
        """Put the zone back as it was at the end of its tick ``n``: pause the ticks, start from
        the newest snapshot before ``n``, replay the journal up to ``n`` through the module (in
        a worker thread), forget the journal after ``n``, save, and send the subscribers a
        ``tick`` message numbered ``n``. Its entities as JSON. The zone's next tick is ``n + 1``
        (a zone counts its own ticks; the engine's count goes on).
        """
        if self.journal is None:
            raise GridError("journal_off", "The journal is off ([journal] mode = off): nothing to rewind to.")
        engine = self.ticks
        engine.pause()
        async with engine.exclusive():  # no tick runs while the zone is put back
            if zs.busy_since is not None:
                raise GridError("zone_busy", "The zone's module call is still running; rewind once it returns.")
            if n >= zs.tick_number:
                raise GridError("out_of_history", f"Tick {n} is not before the zone's tick {zs.tick_number}.")
            await self.journal.drain(time.monotonic() + self.cfg.get("database", "timeout") * 3)
            base = await self.store.snapshot_before(zs.zone.id, n)
            rows = await self.store.journal_range(zs.zone.id, (base[0] + 1) if base else 0, n)
            if base is None or not rows or rows[-1][1] > n:
                raise GridError("out_of_history", f"Tick {n} of this zone is no longer kept ([journal] keep).")
            subscribers = list(self.hub.subscribers.get(zs.zone.id, ()))
            names = await self.store.usernames()

            def replay() -> list[tuple[int, ZoneOutcome]]:
                self.world.reset_zone(zs, base[1], base[0])
                done = replay_zone(self.world, self.game, zs, rows, subscribers=subscribers, usernames=names)
                with self.world.lock:
                    zs.tick_number = n
                return done
            done = await asyncio.get_running_loop().run_in_executor(None, replay)
            await self.store.drop_after(zs.zone.id, n, zs.epoch)
            await self.persister.flush()
            if done:
                engine.send_frames(zs.zone.id, done[-1][1])
            entities: list[dict] = await self.in_world(self.world.zone_entities_json, zs)
            return entities

    async def reload_game(self) -> LoadedGame:
        """Load the game module's code again and switch to it between two ticks.

        The new code is imported from its source file as a new module and initialised
        (``on_init(framework)``, then ``on_reload(previous)`` with the old module or instance)
        in a worker thread while no tick runs. When any of that fails, the old code keeps
        running and ``GridError("module_error")`` carries the file and line; debug players
        hear of it. Otherwise the world is saved (so a crash never replays ticks of the old
        code through the new), the engine calls the new code from the next tick on, and
        every subscribed player gets ``module_reloaded``.
        """
        if self.loaded is None or self.framework is None:
            raise GridError("module_not_reloadable", "The game was not loaded from [game] module (it was handed "
                                                     "to create_app as an object, or is the built-in demo).")
        engine, old, framework = self.ticks, self.loaded, self.framework
        async with self._reload_lock, engine.exclusive():
            def load() -> LoadedGame:
                new = load_game_module(old.path, fresh=True)
                init_game(new.game, new.path, framework, previous=old.game)
                return new
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, load)
            except GameModuleError as exc:
                message = str(exc).removeprefix(f"game module {old.path!r}: ")
                log.error("reload refused, the running code stays: %s", exc)
                self.metrics.module_reload_failures_total += 1
                self.hub.tell_debug_players({"type": "error", "code": "module_error",
                                             "message": f"reload refused: {message}"})
                raise GridError("module_error", message) from None
            await self.persister.flush(between_ticks=True)
            sys.modules[new.module.__name__] = new.module
            self.loaded, self.game, engine.game = new, new.game, new.game
            self.metrics.module_reloads_total += 1
        log.info("game module %s reloaded: version %s (was %s)", new.path, new.version, old.version)
        self.hub.broadcast({"type": "module_reloaded", "version": new.version})
        return new

    def _journal_committed(self) -> None:
        if self.engine is not None:
            self.engine.journal_committed()

    def _create_zone_blocking(self, name: str, width: int, height: int, metadata: dict) -> Zone:
        """``create_zone`` for module code, in a thread that is not the event loop's: it waits
        for the loop to create the zone (the database write included)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("create_zone waits for the event loop: call it from on_init or a game "
                               "thread (on_tick, the hooks), not from a coroutine")
        assert self.loop is not None, "create_zone before the server started"
        future = asyncio.run_coroutine_threadsafe(self.create_zone(name, width, height, metadata), self.loop)
        try:
            return future.result(self.cfg.get("database", "timeout") * 3)
        except GridError as exc:
            raise ValueError(exc.message) from None
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError("create_zone: the database did not answer in time") from None

    async def in_world(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn`` (which takes ``World.lock``) in the world thread: the event loop never
        waits on that lock, which a tick's apply or a flush snapshot may hold for a while."""
        return await asyncio.get_running_loop().run_in_executor(self.world_executor, fn, *args)

    async def delete_zone(self, zone_id: UUID) -> None:
        """Delete a zone and its entities in one transaction, then tell its subscribers.

        The zone leaves memory first (no tick touches it after that), then the database
        deletes its rows, and the rows of entities moved into it and not yet flushed; if the
        database fails, the zone is put back as it was and the caller gets the error.
        """
        async with self.persister.lock:
            zs = await self.in_world(self.world.remove_zone, zone_id)
            if zs is None:
                raise GridError("zone_not_found", f"No zone has the id {zone_id}.")
            try:
                await self.store.delete_zone(zone_id, list(zs.entities), zs.epoch)
            except Fenced:  # another node ticks it now: not this node's to delete
                await self.drop_zones({zone_id})
                raise GridError("zone_not_found", "The zone moved to another node meanwhile; delete it again.") \
                    from None
            except BaseException:
                await self.in_world(self.world.restore_zone, zs)
                raise
            if self.cluster is not None:
                self.cluster.owned.pop(zone_id, None)
        self.hub.zone_deleted(zone_id)
        if self.relay is not None:
            self.relay.disown(zone_id)
        hook = getattr(self.game, "on_zone_deleted", None)
        if hook is not None and self.engine is not None:
            async with self.engine.exclusive():  # module code runs while no tick does
                try:
                    await asyncio.get_running_loop().run_in_executor(None, hook, zs.zone.id)
                except Exception:  # noqa: BLE001 - the zone is gone either way
                    log.exception("zone %s: on_zone_deleted raised", zone_id)

    def zone_json(self, z: Zone) -> dict:
        """A zone as the REST routes show it; the counts of a zone ticking on another node are
        those its owner last told (within a round)."""
        zs = self.world.zones.get(z.id)
        if zs is not None:
            entity_count, subscriber_count = len(zs.entities), len(self.hub.subscribers.get(z.id, ()))
        else:
            entity_count, subscriber_count = self.relay.counts.get(z.id, (0, 0)) if self.relay else (0, 0)
        return {"id": str(z.id), "name": z.name, "width": z.width, "height": z.height, "metadata": z.metadata,
                "created_at": _iso(z.created_at), "updated_at": _iso(z.updated_at),
                "entity_count": entity_count, "subscriber_count": subscriber_count}

    def all_zones(self) -> list[Zone]:
        """Every zone of the world, oldest first: in a cluster also those other nodes tick."""
        zones = [zs.zone for zs in list(self.world.zones.values())]
        if self.cluster is not None:
            zones += [z for z in self.cluster.catalog() if z.id not in self.world.zones]
        return sorted(zones, key=lambda z: (z.created_at, z.name))

    def zone_or_404(self, text: str) -> _ZoneState:
        """The zone ticking here."""
        zs = self.world.zones.get(_parse_uuid(text, "zone_not_found", "zone"))
        if zs is None:
            raise GridError("zone_not_found", f"No zone has the id {text[:80]!r}.")
        return zs

    def any_zone_or_404(self, text: str) -> Zone:
        """The zone's record, wherever it ticks (in a cluster, maybe on another node)."""
        zone_id = _parse_uuid(text, "zone_not_found", "zone")
        zs = self.world.zones.get(zone_id)
        if zs is not None:
            return zs.zone
        if self.cluster is not None and zone_id in self.cluster.zones:
            return self.cluster.zones[zone_id][0]
        raise GridError("zone_not_found", f"No zone has the id {text[:80]!r}.")


#: Where the app keeps its ``Server``.
SERVER = web.AppKey("server", Server)
#: ``/api/openapi.json``'s text, built by ``create_app``.
OPENAPI = web.AppKey("openapi", str)


# =============================================================================
# Compatibility with aiohttp internals
# =============================================================================
#
# gridserver leans on five private parts of aiohttp 3.x, all here and checked by
# ``_check_aiohttp`` when the command line starts (a newer aiohttp that moved them stops
# start-up with one line, rather than quietly losing what they give):
#
# * ``RequestHandler.finish_response`` and ``handle_error``: HTTP that aiohttp cannot parse
#   gets the JSON envelope instead of aiohttp's plain text (``_EnvelopeRequestHandler``);
# * ``AppRunner._make_server`` and ``Server.__call__``/``_kwargs``: connections get that
#   handler, and are counted per client address (``_EnvelopeServer``, ``_AppRunner``);
# * ``WebSocketResponse._close_transport`` and ``_req``: the graceful close for abuse
#   (``_WebSocketResponse``);
# * tick frames written straight to the transport (``Connection``), which holds only while
#   the WebSocket has no compression (``compress=False``; asserted where it is prepared);
# * ``WebSocketResponse._post_start`` and ``WebSocketDataQueue.feed_data``: text messages are
#   handled as aiohttp's parser produces them (``_DirectQueue``).
#
# ``setup.cfg`` pins the aiohttp versions CI tests.

#: The private aiohttp attributes this section relies on: (owner, name).
_AIOHTTP_INTERNALS = [
    (web_protocol.RequestHandler, "finish_response"), (web_protocol.RequestHandler, "handle_error"),
    (web.AppRunner, "_make_server"), (web_server.Server, "connection_made"),
    (web_server.Server, "connection_lost"), (web.WebSocketResponse, "_close_transport"),
    (web.WebSocketResponse, "_post_start"), (web.WebSocketResponse, "_reset_heartbeat"),
    (web.WebSocketResponse, "_on_data_received"), (WebSocketDataQueue, "feed_data"),
]


def _check_aiohttp() -> None:
    """Fail loudly when the installed aiohttp lacks an internal this section overrides."""
    import aiohttp
    missing = [f"{owner.__name__}.{name}" for owner, name in _AIOHTTP_INTERNALS if not hasattr(owner, name)]
    if missing:
        raise ConfigError(f"aiohttp {aiohttp.__version__} is not supported (it lacks {', '.join(missing)}): "
                          f"install the version setup.cfg names")


class _DirectQueue(WebSocketDataQueue):
    """aiohttp's queue of a WebSocket's received messages, handing text messages straight to
    ``on_text`` the moment aiohttp's parser has them (in the protocol's ``data_received``).

    aiohttp queues each message and wakes the handler's task to read it: for an intent, that
    wake-up (a future, a task step, three coroutine frames) cost more than handling it, and
    messages read while the loop was busy piled up in memory as parsed objects. Here a text
    message is handled at once, unless others still wait in the queue (it then waits its turn,
    so the order holds). Everything else (close, ping, pong, binary, errors) and every message
    before ``on_text`` is set still goes through the queue to the handler's ``async for``.
    """

    on_text: Callable[[str], None] | None = None

    def feed_data(self, data: Any, size: int) -> None:
        on_text = self.on_text
        if on_text is not None and data[0] is WSMsgType.TEXT and not self._buffer:
            try:
                on_text(data[1])
            except Exception as exc:  # noqa: BLE001 - a bug handling one message ends that connection
                log.exception("handling a WebSocket message failed")
                self.on_text = None
                self.set_exception(exc)
            return
        super().feed_data(data, size)


class _WebSocketResponse(web.WebSocketResponse):
    """aiohttp's server WebSocket, closing gracefully when it closes for abuse.

    For a frame too large (1009), text that is not UTF-8 (1007) or a protocol error (1002),
    aiohttp sends the close frame and closes the socket at once. A client still sending (the
    rest of a huge frame) then has unread bytes on the server, so the kernel answers with a
    reset, which can destroy the close frame before the client reads it. Here the socket is
    half-closed instead; what the client still sends is read and dropped, and ``linger``
    closes it once the client has closed its side, or after ``LINGER`` seconds.
    """

    LINGER = 2.0
    ABUSE_CODES = (1002, 1007, 1009)
    lingering = False
    sent_code: int | None = None

    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: Any) -> None:
        """aiohttp's, with a ``_DirectQueue`` for the received messages."""
        self._ws_protocol = protocol
        self._writer = writer
        self._reset_heartbeat()
        assert self._loop is not None
        self._reader = _DirectQueue(request._protocol, DEFAULT_CHUNK_SIZE, loop=self._loop)
        self._parser = WebSocketReader(self._reader, self._max_msg_size, compress=bool(self._compress),
                                       decode_text=self._decode_text)
        cb = None if self._heartbeat is None else self._on_data_received
        request.protocol.set_parser(self._parser, data_received_cb=cb)
        request.protocol.keep_alive(False)

    @property
    def direct(self) -> "_DirectQueue | None":
        """The queue that hands text messages straight to a handler (None before ``prepare``)."""
        return self._reader if isinstance(self._reader, _DirectQueue) else None

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool:
        if self.sent_code is None:
            self.sent_code = code
        return await super().close(code=code, message=message, drain=drain)

    def _close_transport(self) -> None:
        transport = self._req.transport if self._req is not None else None
        if (self.sent_code in self.ABUSE_CODES and transport is not None
                and not transport.is_closing() and transport.can_write_eof()):
            self.lingering = True
            transport.write_eof()  # after the close frame already queued
            return
        super()._close_transport()

    async def linger(self, transport: Any) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.LINGER
        while transport is not None and not transport.is_closing() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if transport is not None:
            transport.close()


class _EnvelopeRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering HTTP it cannot parse with the JSON envelope.

    A request line, header or content encoding aiohttp's parser rejects never reaches a
    route or the middleware; aiohttp itself answers it, in plain text and with a traceback
    in the log. This answers it as the contract says and logs one line at debug level.
    Likewise for an aiohttp HTTP error raised before the middleware runs (an unknown
    ``Expect`` header).
    """

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        if isinstance(resp, web.HTTPException) and resp.status >= 400:  # the middleware never saw it
            resp = _http_error_response(resp)
        return await super().finish_response(request, resp, start_time)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response is under way: the connection is broken
            raise ConnectionError("the response was already started")
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            response = _error_response(500, "internal_error", "The server failed to handle this request.")
        else:
            detail = _redact((message or (str(exc) if exc else "") or "malformed request").splitlines()[0])[:200]
            log.debug("unparseable request from %s: %s", request.remote, detail)
            response = _error_response(status, "bad_request", f"The request is not valid HTTP: {detail}")
        response.force_close()
        return response


class _AddressLimit:
    """Open connections per client address, at most ``limit`` each (``max_connections_per_address``).

    Counted when the TCP connection is accepted, before any byte is read, so that sockets
    that never send anything count too; a connection over the limit is answered 429 and
    closed at once (a WebSocket is refused before its upgrade).
    """

    ANSWER = _http_answer(429, "too_many_connections", "Too many open connections from your address.")

    def __init__(self, limit: int, metrics: Metrics):
        self.limit, self.metrics = limit, metrics
        self.by_address: dict[str, int] = {}
        self._address_of: dict[int, str] = {}

    def admit(self, handler: Any, transport: Any) -> bool:
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) and peer else ""
        n = self.by_address.get(address, 0)
        if n >= self.limit:
            self.metrics.connections_refused_total += 1
            return False
        self.by_address[address] = n + 1
        self._address_of[id(handler)] = address
        return True

    def release(self, handler: Any) -> None:
        address = self._address_of.pop(id(handler), None)
        if address is not None:
            left = self.by_address.pop(address) - 1
            if left:
                self.by_address[address] = left


class _EnvelopeServer(web_server.Server):
    address_limit: _AddressLimit | None = None

    def __call__(self) -> web_protocol.RequestHandler:
        return _EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: web_protocol.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if self.address_limit is not None and not self.address_limit.admit(handler, transport):
            transport.write(_AddressLimit.ANSWER)
            transport.close()

    def connection_lost(self, handler: web_protocol.RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        if self.address_limit is not None:
            self.address_limit.release(handler)


class _AppRunner(web.AppRunner):
    """The app runner of ``python gridserver.py``: connections get ``_EnvelopeRequestHandler``
    and are counted per client address."""

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        if type(server) is not web_server.Server or not hasattr(server, "_kwargs"):
            raise ConfigError(f"aiohttp made a {type(server).__name__} without _kwargs: this aiohttp is not "
                              f"supported (install the version setup.cfg names)")
        server.__class__ = _EnvelopeServer  # same state, more methods
        srv = self._app[SERVER]
        limit = _AddressLimit(srv.cfg.get("server", "max_connections_per_address"), srv.metrics)
        typing.cast(_EnvelopeServer, server).address_limit = limit
        return server


# =============================================================================
# HTTP handlers
# =============================================================================



def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


async def _session(request: web.Request) -> Session:
    session = await request.app[SERVER].accounts.authenticate(_bearer(request))
    if session is None:
        raise GridError("unauthorized", "A valid session token is required (Authorization: Bearer <token>).")
    return session


async def _debug_session(request: web.Request) -> Session:
    """The caller's session if debug mode is on and the caller is a debug player."""
    srv = request.app[SERVER]
    if not srv.debug:
        raise GridError("not_found", "Not found.")
    session = await _session(request)
    if not srv.is_debug_player(session.username):
        raise GridError("forbidden", "Only debug players may use this.")
    return session


@web.middleware
async def _cors_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """``[server] cors_origins``: a browser page from one of those origins may call the REST
    routes (the token goes in ``Authorization``, never in a cookie); its preflight is answered
    here. Other origins get no CORS header, so their browsers keep the answers from them."""
    origins = request.app[SERVER].cors_origins
    origin = request.headers.get("Origin")
    if not origins or origin is None or not (origin in origins or "*" in origins):
        return await handler(request)
    allow = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204, headers={**allow, "Access-Control-Allow-Methods": "GET, POST, DELETE",
                                                 "Access-Control-Allow-Headers": "Authorization, Content-Type",
                                                 "Access-Control-Max-Age": "600"})
    response = await handler(request)
    if not response.prepared:  # the WebSocket upgrade has been sent already (and needs no CORS)
        response.headers.update(allow)
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
    return response


@web.middleware
async def _errors_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error leaves as the contract's JSON envelope; nothing else reaches the client."""
    srv = request.app[SERVER]
    if not srv.debug and request.path.startswith("/api/debug"):
        return _error_response(404, "not_found", "Not found.")
    try:
        return await handler(request)
    except GridError as exc:
        return _error_response(HTTP_STATUS[exc.code], exc.code, exc.message, exc.headers)
    except DatabaseUnavailable:
        return _error_response(503, "database_unavailable", "The database is unavailable; try again shortly.")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error_response(exc)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:  # noqa: BLE001
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error_response(500, "internal_error", "The server failed to handle this request.")


async def register(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    body = await _read_object(request, srv.max_body, srv.client_timeout)
    username, password = _field(body, "username", str), _field(body, "password", str)
    return _json_response(await srv.accounts.register(username, password, request.remote or ""), 201)


async def login(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    body = await _read_object(request, srv.max_body, srv.client_timeout)
    username, password = _field(body, "username", str), _field(body, "password", str)
    answer, ended = await srv.accounts.login(username, password, request.remote or "")
    await srv.hub.end_sessions(ended)
    return _json_response(answer)


async def logout(request: web.Request) -> web.Response:
    """``POST /api/auth/logout``; the body ``{"all": true}`` (optional) ends every session of the player."""
    srv = request.app[SERVER]
    session = await _session(request)
    everywhere = False
    if request.can_read_body:
        body = await _read_object(request, srv.max_body, srv.client_timeout)
        everywhere = _field(body, "all", bool, False, False)
    await srv.hub.end_sessions(await srv.accounts.logout(session, everywhere))
    return web.Response(status=204)


async def me(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    session = await _session(request)
    player = await srv.accounts.me(session)
    return _json_response({"id": str(player["id"]), "username": player["username"],
                           "created_at": _iso(player["created_at"]), "last_login": _iso(player["last_login"]),
                           "is_debug": srv.is_debug_player(player["username"])})


async def list_zones(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    await _session(request)
    return _json_response({"zones": [srv.zone_json(z) for z in srv.all_zones()]})


async def get_zone(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    await _session(request)
    return _json_response(srv.zone_json(srv.any_zone_or_404(request.match_info["zone_id"])))


async def create_zone(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    await _debug_session(request)
    body = await _read_object(request, srv.max_body, srv.client_timeout)
    zone = await srv.create_zone(_field(body, "name", str), _field(body, "width", int),
                                 _field(body, "height", int), _field(body, "metadata", dict, False, {}))
    return _json_response(srv.zone_json(zone), 201)


async def delete_zone(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    await _debug_session(request)
    zs = srv.zone_or_404(request.match_info["zone_id"])
    await srv.delete_zone(zs.zone.id)
    return web.Response(status=204)


async def debug_pause(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    await _debug_session(request)
    srv.ticks.pause()
    await srv.on_every_node("pause")
    return _json_response({"paused": True, "tick_number": srv.ticks.tick_number})


async def debug_resume(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    await _debug_session(request)
    srv.ticks.resume()
    await srv.on_every_node("resume")
    return _json_response({"paused": False, "tick_number": srv.ticks.tick_number})


async def debug_step(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    await _debug_session(request)
    if not srv.ticks.paused:
        raise GridError("not_paused", "Pause the tick before stepping it.")
    # in a cluster every node runs the tick, and the answer waits for them all
    tick_number, _ = await asyncio.gather(srv.ticks.step(), srv.on_every_node("step"))
    return _json_response({"tick_number": tick_number})


async def debug_zone_state(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    await _debug_session(request)
    zs = srv.zone_or_404(request.match_info["zone_id"])
    entities = await srv.in_world(srv.world.zone_entities_json, zs)
    return _json_response({
        "zone": srv.zone_json(zs.zone), "entities": entities, "tick_number": srv.ticks.tick_number,
        "zone_tick_number": zs.tick_number,
        "pending_intents": len(zs.intents), "last_error": zs.last_error,
        "errors": zs.errors, "ticks": zs.ticks, "skipped_ticks": zs.skipped,
        "stalled_seconds": round(srv.ticks.zone_busy_seconds(zs), 3) if zs.busy_since else 0.0,
        "last_tick_ms": round(zs.last_tick_ms, 3),
        "members": sorted(str(p) for p in srv.hub.members.get(zs.zone.id, ())),
    })


async def debug_entity(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    await _debug_session(request)
    entity_id = _parse_uuid(request.match_info["entity_id"], "entity_not_found", "entity")
    found = await srv.in_world(srv.world.entity_json, entity_id)
    if found is None:
        raise GridError("entity_not_found", f"No entity has the id {entity_id}.")
    return _json_response(found)


def _tick_query(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 63:  # a database integer: larger ones would fail in the driver
        raise GridError("bad_request", f"The query parameter '{name}' must be a tick number (0 or more).")
    return value


async def debug_history(request: web.Request) -> web.Response:
    """``GET /api/debug/zones/{zone_id}/history?from=N&to=M``: the zone's journaled inputs of
    those ticks (default: its last 100), within what ``[journal] keep`` has kept."""
    srv = request.app[SERVER]
    await _debug_session(request)
    zs = srv.zone_or_404(request.match_info["zone_id"])
    if srv.journal is None:
        raise GridError("journal_off", "The journal is off ([journal] mode = off): there is no history.")
    last = _tick_query(request, "to", zs.tick_number)
    first = _tick_query(request, "from", max(0, last - 99))
    if first > last or last - first >= 10_000:
        raise GridError("bad_request", "'from' must be at most 'to', and at most 10,000 ticks before it.")
    await srv.journal.drain(time.monotonic() + srv.cfg.get("database", "timeout"))
    ticks = []
    for zone_id, tick_number, seed, at, inputs in await srv.store.journal_range(zs.zone.id, first, last):
        data = json_loads(inputs)
        ticks.append({"tick_number": tick_number, "seed": seed, "at": _iso(at),
                      "intents": [{"player_id": p, "seq": seq, "data": d} for p, seq, _, d in data["intents"]],
                      "events": data["events"]})
    return _json_response({"zone_id": str(zs.zone.id), "ticks": ticks})


async def debug_rewind(request: web.Request) -> web.Response:
    """``POST /api/debug/zones/{zone_id}/rewind {"tick_number": N}``: the zone as it was at the
    end of its tick N (see ``Server.rewind``); the tick is paused first."""
    srv = request.app[SERVER]
    await _debug_session(request)
    zs = srv.zone_or_404(request.match_info["zone_id"])
    body = await _read_object(request, srv.max_body, srv.client_timeout)
    n = _field(body, "tick_number", int)
    if n < 0:  # (a huge negative one would fail in the database driver)
        raise GridError("bad_request", "The field 'tick_number' must be a tick number (0 or more).")
    return _json_response({"tick_number": n, "entities": await srv.rewind(zs, n)})


async def debug_connections(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    await _debug_session(request)
    connections = srv.connections_json()
    for answer in await srv.on_every_node("connections"):  # in a cluster, every node's
        connections += answer.get("connections") or []
    return _json_response({"connections": connections})


async def debug_cluster(request: web.Request) -> web.Response:
    """``GET /api/debug/cluster``: the nodes and where each zone ticks (one node: this one)."""
    srv = request.app[SERVER]
    await _debug_session(request)
    if srv.cluster is not None:
        return _json_response(srv.cluster.view())
    started, now = _iso(srv.started), _iso(_now())
    zones = sorted(list(srv.world.zones.values()), key=lambda zs: zs.zone.name)
    return _json_response({"node": srv.node_name, "nodes": [
        {"name": srv.node_name, "zones": len(zones), "connections": len(srv.hub.conns), "last_seen": now,
         "started_at": started, "alive": True}],
        "zones": [{"zone_id": str(zs.zone.id), "name": zs.zone.name, "node": srv.node_name, "epoch": zs.epoch}
                  for zs in zones]})


async def debug_reload(request: web.Request) -> web.Response:
    """``POST /api/debug/module/reload``: the game module's code loaded again at the next tick
    boundary (``Server.reload_game``): ``{"module", "version"}``; ``422 module_error``."""
    srv = request.app[SERVER]
    await _debug_session(request)
    loaded = await srv.reload_game()
    return _json_response({"module": loaded.path, "version": loaded.version})


async def healthz(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    ok = srv.store.healthy and srv.persister.outage_since is None
    engine = srv.engine
    failing = sorted(str(zs.zone.id) for zs in list(srv.world.zones.values()) if zs.failing)
    return _json_response({"status": "ok" if ok else "degraded", "database": "ok" if ok else "down",
                           "tick_number": engine.tick_number if engine else 0,
                           "paused": engine.paused if engine else False,
                           "zones_failing": len(failing), "failing_zones": failing[:100], "node": srv.node_name},
                          200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    srv = request.app[SERVER]
    engine, world = srv.engine, srv.world
    stalled = sum(1 for zs in list(world.zones.values()) if zs.busy_since is not None
                  and engine is not None and engine.zone_busy_seconds(zs) > engine.zone_timeout)
    gauges = {
        "tick_number": (engine.tick_number if engine else 0, "the last tick's number"),
        "tick_paused": (1 if engine and engine.paused else 0, "1 while the tick is paused"),
        "connections": (len(srv.hub.conns), "open WebSocket connections"),
        "zones": (len(world.zones), "zones"),
        "zones_stalled": (stalled, "zones whose module call is still running past zone_timeout"),
        "zones_failing": (sum(1 for zs in list(world.zones.values()) if zs.failing),
                          "zones whose last tick was lost (module exception, rejected result, stall)"),
        "entities": (len(world.entity_zone), "entities"),
        "dirty_entities": (len(world.dirty) + len(world.deleted), "entity changes waiting for the next flush"),
        "database_up": (1 if srv.store.healthy and srv.persister.outage_since is None else 0,
                        "1 when the database answered the last call"),
        "process_cpu_seconds": (time.process_time(), "CPU time used by this process"),
        "process_resident_bytes": (_rss_bytes(), "resident memory of this process"),
    }
    return web.Response(text=srv.metrics.render(gauges), content_type="text/plain")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# =============================================================================
# WebSocket handler
# =============================================================================


async def websocket(request: web.Request) -> web.StreamResponse:
    """``/ws``: authenticate before the upgrade, then read messages until the socket closes.

    Abuse that closes the socket (everything else gets an error message): a frame over 16x
    ``max_message_size`` (1009), a text frame that is not UTF-8 (1007), a client that lets
    its unsent messages pile up (dropped, see ``Connection``).
    """
    srv = request.app[SERVER]
    token = request.query.get("token") or _bearer(request)
    session = await srv.accounts.authenticate(token)
    if session is None:
        raise GridError("unauthorized", "A valid session token is required (?token= or Authorization).")
    max_size = srv.cfg.get("websocket", "max_message_size")
    # No per-connection heartbeat timer: Hub.heartbeat_loop pings quiet connections.
    # autoping is off so that pongs reach the loop below as proof of life.
    ws = _WebSocketResponse(autoping=False, compress=False, max_msg_size=max_size * 16)
    await ws.prepare(request)
    if ws.compress:  # Connection writes whole frames to the transport: they must not be compressed
        raise RuntimeError("the WebSocket was prepared with compression; tick frames bypass aiohttp's writer")
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:  # bound what the kernel buffers for a client that stops reading
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, KERNEL_SEND_BUFFER)
    conn = Connection(srv.hub, ws, request.transport, session)
    resumed = srv.hub.attach(conn)
    if srv.relay is not None:
        srv.relay.attached(conn)
    if session.expires_at is not None:
        delay = max(0.0, session.expires_at - time.time())
        conn.expiry_handle = asyncio.get_running_loop().call_later(
            delay, lambda: srv.hub.spawn(srv.hub.end_session(session.digest)))
    if resumed is not None:
        conn.send({"type": "subscribed", "zone_id": str(resumed), "resumed": True})
        srv.hub.tell_if_failing(conn)

    def on_text(text: str) -> None:
        conn.received += 1
        _handle_message(srv, conn, text, max_size)

    direct = ws.direct
    if direct is not None:
        direct.on_text = on_text
    try:
        async for msg in ws:  # what the direct queue does not hand over: control frames, and text queued behind them
            kind = msg.type
            if kind is WSMsgType.TEXT:
                on_text(msg.data)
                continue
            conn.received += 1
            if kind is WSMsgType.PING:
                await ws.pong(msg.data)
            elif kind is WSMsgType.PONG:
                pass
            elif kind is WSMsgType.BINARY:
                conn.error("bad_message", "Binary frames are not supported; send JSON text.")
            elif kind is WSMsgType.ERROR:
                break
    finally:
        if direct is not None:
            direct.on_text = None
        srv.hub.detach(conn)
    if ws.lingering:
        await ws.linger(request.transport)
    return ws


def _unpaired_surrogate(msg: dict) -> bool:
    try:
        json_dumps(msg).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _subscribe_elsewhere(srv: Server, relay: Relay, conn: Connection, zone_id: UUID) -> None:
    """Cluster: subscribe to a zone another node ticks. The player leaves its zone here at once
    (no tick of it follows); the owner answers ``subscribed`` and sends the ticks."""
    if srv.cluster is None or srv.cluster.owner_of(zone_id) is None:
        conn.send({"type": "error", "code": "zone_unavailable", "zone_id": str(zone_id),
                   "message": "No node ticks this zone right now; subscribe again in a moment."})
        return
    if conn.routed is not None and conn.routed != zone_id:
        relay.forward(conn, conn.routed, "left", False)
    elif conn.zone_id is not None and conn.routed is None:
        old = conn.zone_id
        srv.hub._unsubscribe_conn(conn)
        srv.hub._leave(old, conn.player_id)
    conn.zone_id, conn.routed = None, zone_id
    if not relay.forward(conn, zone_id, "sub"):
        conn.routed = None
        conn.send({"type": "error", "code": "zone_unavailable", "zone_id": str(zone_id),
                   "message": "No node ticks this zone right now; subscribe again in a moment."})


def _handle_message(srv: Server, conn: Connection, text: str, max_size: int) -> None:
    if len(text) > max_size or (len(text) * 4 > max_size and len(text.encode("utf-8", "surrogatepass")) > max_size):
        conn.error("message_too_large", f"Messages may be at most {max_size} bytes.")
        return
    try:
        msg = json_loads(text)
    except (ValueError, RecursionError, OverflowError):
        conn.error("bad_message", "The message is not valid JSON.")
        return
    if not isinstance(msg, dict):
        conn.error("bad_message", "The message must be a JSON object.")
        return
    if "\\u" in text and _unpaired_surrogate(msg):
        # Valid JSON, but no UTF-8 text: echoed in a zone's state it would fail that zone's
        # broadcast for every player in it.
        conn.error("bad_message", "The message holds an unpaired surrogate escape (not Unicode text).")
        return
    kind = msg.get("type")
    if kind == "intent":
        data = msg.get("data")
        if not isinstance(data, dict):
            conn.error("bad_message", "The field 'data' must be a JSON object.")
            return
        problem = _data_problem(data, srv.max_depth)
        if problem is not None:
            srv.metrics.bad_intents_total += 1
            conn.error("bad_message", f"The field 'data' {problem}.")
            return
        if conn.routed is not None and srv.relay is not None:
            srv.relay.intent(conn, data)
        else:
            srv.hub.add_intent(conn, data)
    elif kind == "subscribe":
        zone_text = msg.get("zone_id")
        if not isinstance(zone_text, str):
            conn.error("bad_message", "The field 'zone_id' must be a string.")
            return
        try:
            zone_id = UUID(zone_text)
        except ValueError:
            zone_id = None
        if zone_id is not None and zone_id not in srv.world.zones and srv.relay is not None \
                and srv.cluster is not None and zone_id in srv.cluster.zones:
            _subscribe_elsewhere(srv, srv.relay, conn, zone_id)
            return
        if zone_id is None or zone_id not in srv.world.zones:
            conn.error("zone_not_found", f"No zone has the id {zone_text[:80]!r}.")
            return
        if conn.routed is not None and srv.relay is not None:  # leaves the zone of another node
            srv.relay.forward(conn, conn.routed, "left", False)
            conn.routed = conn.zone_id = None
        srv.hub.subscribe(conn, zone_id)
    elif kind == "unsubscribe":
        if conn.routed is not None and srv.relay is not None:
            if not srv.relay.forward(conn, conn.routed, "unsub"):  # answered there, or here if nobody holds it
                conn.routed = conn.zone_id = None
                conn.send({"type": "unsubscribed"})
        else:
            srv.hub.unsubscribe(conn)
    elif kind == "ping":
        # after the answers on their way from the zone's node
        if conn.routed is None or srv.relay is None or not srv.relay.forward(conn, conn.routed, "ping"):
            conn.send({"type": "pong"})
    elif not isinstance(kind, str):
        conn.error("bad_message", "The field 'type' must be a string.")
    else:
        conn.error("unknown_type", f"Unknown message type {kind[:40]!r}.")


# =============================================================================
# Protocol: routes, messages and the OpenAPI document
# =============================================================================
#
# ``ROUTES`` (every HTTP route; ``create_app`` adds exactly these), ``CLIENT_MESSAGES`` and
# ``SERVER_MESSAGES`` (WebSocket), with ``ERRORS`` and ``CLOSE_CODES`` from the wire helpers,
# declare the protocol once, as data. ``gridserver --print-protocol`` writes the README's
# protocol tables from them, and ``GET /api/openapi.json`` the OpenAPI 3.1 document: neither
# can drift from the code.


@dataclass(frozen=True)
class _Field:
    name: str
    type: str  # "string", "integer", "boolean", "object"
    required: bool
    help: str
    limits: tuple[tuple[str, Any], ...] = ()  # JSON schema keywords: (("minimum", 1),); a value may be a _Setting


class _Setting(NamedTuple):
    """A limit that is a configuration value, filled in from the server's configuration."""
    section: str
    key: str


@dataclass(frozen=True)
class _Route:
    method: str
    path: str
    handler: str  # a function of this module, looked up when the app is built
    access: str  # "anyone", "token" (a session token) or "debug" (a debug player, debug mode only)
    summary: str
    status: int = 200
    answer: str | None = None  # a schema of _SCHEMAS; None: no body
    errors: tuple[str, ...] = ()  # besides those every route or its access may answer
    body: tuple[_Field, ...] = ()
    body_required: bool = True
    query: tuple[_Field, ...] = ()
    content_type: str = "application/json"  # of the answer; "websocket": the /ws upgrade


_USERNAME = _Field("username", "string", True, "3 to 32 of `A-Z a-z 0-9 _ . -`, case-sensitive",
                   (("pattern", "^[A-Za-z0-9_.-]{3,32}$"),))
_PASSWORD = "at least `[auth] min_password_length` characters, at most 72 bytes in UTF-8"

#: Every HTTP route, declared once: ``create_app`` routes exactly these, and the README's
#: route table and ``/api/openapi.json`` are written from them.
ROUTES: list[_Route] = [
    _Route("POST", "/api/auth/register", "register", "anyone", "create an account", 201, "player",
           ("username_taken", "too_many_attempts", "busy", "database_unavailable"),
           (_USERNAME, _Field("password", "string", True, _PASSWORD,
                              (("minLength", _Setting("auth", "min_password_length")), ("maxLength", 72))))),
    _Route("POST", "/api/auth/login", "login", "anyone",
           "log in: a session token for `Authorization: Bearer <token>` and `/ws?token=`", 200, "session",
           ("invalid_credentials", "too_many_attempts", "busy", "database_unavailable"),
           (_USERNAME, _Field("password", "string", True, "the password"))),
    _Route("POST", "/api/auth/logout", "logout", "token",
           "end this session (its open WebSocket closes with 4001); `{\"all\": true}` ends every session of "
           "the player", 204, None, (),
           (_Field("all", "boolean", False, "true: end every session of the player, not only this one"),),
           body_required=False),
    _Route("GET", "/api/auth/me", "me", "token", "the caller's account", 200, "me"),
    _Route("GET", "/api/zones", "list_zones", "token", "every zone, oldest first", 200, "zone_list"),
    _Route("POST", "/api/zones", "create_zone", "debug", "create a zone", 201, "zone", ("zone_name_taken",),
           (_Field("name", "string", True, "1 to 64 characters, unique", (("minLength", 1), ("maxLength", 64))),
            _Field("width", "integer", True, "1 to `[server] max_zone_size`, written without a decimal point",
                   (("minimum", 1), ("maximum", _Setting("server", "max_zone_size")))),
            _Field("height", "integer", True, "1 to `[server] max_zone_size`, written without a decimal point",
                   (("minimum", 1), ("maximum", _Setting("server", "max_zone_size")))),
            _Field("metadata", "object", False, "any JSON object (default `{}`), nested at most 100 levels"))),
    _Route("GET", "/api/zones/{zone_id}", "get_zone", "token", "one zone", 200, "zone", ("zone_not_found",)),
    _Route("DELETE", "/api/zones/{zone_id}", "delete_zone", "debug",
           "delete a zone and its entities; its subscribers get the error `zone_deleted` and are unsubscribed",
           204, None, ("zone_not_found",)),
    _Route("POST", "/api/debug/tick/pause", "debug_pause", "debug", "pause the tick (in a cluster, on every node)",
           200, "tick_status"),
    _Route("POST", "/api/debug/tick/resume", "debug_resume", "debug", "resume the tick (in a cluster, on every node)",
           200, "tick_status"),
    _Route("POST", "/api/debug/tick/step", "debug_step", "debug",
           "run one full tick while paused (all zones processed, frames sent; in a cluster on every node, "
           "answered once all have)", 200, "tick", ("not_paused",)),
    _Route("GET", "/api/debug/zones/{zone_id}/state", "debug_zone_state", "debug",
           "a zone with all its entities, its tick counters and its last error", 200, "zone_state",
           ("zone_not_found",)),
    _Route("GET", "/api/debug/entities/{entity_id}", "debug_entity", "debug", "one entity", 200, "entity",
           ("entity_not_found",)),
    _Route("GET", "/api/debug/connections", "debug_connections", "debug",
           "the open WebSocket connections of every node (each with the `node` it is connected to)", 200,
           "connections"),
    _Route("GET", "/api/debug/cluster", "debug_cluster", "debug",
           "the nodes of a cluster and the node each zone ticks on, with its fencing number `epoch` (one "
           "node: this one)", 200, "cluster"),
    _Route("GET", "/api/debug/zones/{zone_id}/history", "debug_history", "debug",
           "a zone's journaled inputs (intents, join and leave events) of ticks `from`..`to`", 200, "history",
           ("zone_not_found", "journal_off"),
           query=(_Field("from", "integer", False, "the first tick (default: 99 before `to`)", (("minimum", 0),)),
                  _Field("to", "integer", False, "the last tick, at least `from` and at most 10,000 after it "
                                                   "(default: the zone's last tick)", (("minimum", 0),)))),
    _Route("POST", "/api/debug/zones/{zone_id}/rewind", "debug_rewind", "debug",
           "pause the tick and put the zone back as it was at the end of its tick `tick_number`", 200, "rewind",
           ("zone_not_found", "journal_off", "out_of_history", "zone_busy"),
           (_Field("tick_number", "integer", True, "a tick of this zone, before its current one, still kept",
                   (("minimum", 0),)),)),
    _Route("POST", "/api/debug/module/reload", "debug_reload", "debug",
           "load the game module's code again at the next tick boundary (hot reload)", 200, "reload",
           ("module_error", "module_not_reloadable")),
    _Route("GET", "/api/openapi.json", "openapi", "anyone",
           "this API as an OpenAPI 3.1 document (debug routes only in debug mode)", 200, "openapi"),
    _Route("GET", "/healthz", "healthz", "anyone",
           "health: `200` with `\"status\": \"ok\"`, `503` with `\"degraded\"` while the database is down",
           200, "health"),
    _Route("GET", "/metrics", "metrics", "anyone", "Prometheus text format", 200, "text",
           content_type="text/plain"),
    _Route("GET", "/ws", "websocket", "token",
           "the WebSocket (token as `?token=` or `Authorization: Bearer`); a bad token is refused with 401 "
           "before the upgrade", 101, None, content_type="websocket"),
    _Route("GET", "/", "index", "anyone", "the browser page", 200, "text", content_type="text/html"),
    _Route("GET", "/client.js", "client_js", "anyone", "the JavaScript client, GridClient (an ES module)", 200, "text",
           content_type="text/javascript"),
    _Route("GET", "/game/{path}", "game_file", "anyone",
           "a file of `[server] static_dir`, the game's own page, scripts and images (`/game/`: its "
           "`index.html`); `404` when it is not set", 200, "file", ("not_found",), content_type="*/*"),
]

#: Errors any route may answer, whatever it is.
_ANY_ROUTE_ERRORS = ("bad_request", "expectation_failed", "too_many_connections", "internal_error")


#: Errors a route may answer because of who may call it (``_Route.access``).
_ACCESS_ERRORS = {"anyone": (), "token": ("unauthorized", "database_unavailable"),
                  "debug": ("unauthorized", "database_unavailable", "forbidden")}


def _route_errors(route: _Route) -> list[str]:
    """Every error code ``route`` may answer, in the order of ``ERRORS``."""
    codes = set(route.errors) | set(_ANY_ROUTE_ERRORS) | set(_ACCESS_ERRORS[route.access])
    return [e.code for e in ERRORS if e.code in codes]


_UUID = {"type": "string", "format": "uuid"}
_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}


def _object(required: bool = True, **properties: Any) -> dict:
    """A JSON schema of an object with these properties (all required unless told)."""
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(properties)
    return schema


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


#: The JSON schemas of the answers (components of the OpenAPI document).
_SCHEMAS: dict[str, dict] = {
    "error": _object(error={"type": "string", "enum": [e.code for e in ERRORS if e.status is not None]},
                     message={"type": "string"}),
    "player": _object(id=_UUID, username={"type": "string"}, created_at=_TIME),
    "session": _object(token={"type": "string"}, player_id=_UUID, expires_at=_TIME_OR_NULL),
    "me": _object(id=_UUID, username={"type": "string"}, created_at=_TIME, last_login=_TIME_OR_NULL,
                  is_debug={"type": "boolean"}),
    "zone": _object(id=_UUID, name={"type": "string"}, width={"type": "integer"}, height={"type": "integer"},
                    metadata={"type": "object"}, created_at=_TIME, updated_at=_TIME,
                    entity_count={"type": "integer"}, subscriber_count={"type": "integer"}),
    "zone_list": _object(zones={"type": "array", "items": _ref("zone")}),
    "entity": _object(id=_UUID, zone_id=_UUID, x={"type": "integer"}, y={"type": "integer"},
                      width={"type": "integer"}, height={"type": "integer"}, metadata={"type": "object"},
                      created_at=_TIME, updated_at=_TIME),
    "tick_status": _object(paused={"type": "boolean"}, tick_number={"type": "integer"}),
    "tick": _object(tick_number={"type": "integer"}),
    "zone_error": {"type": ["object", "null"], "required": ["tick_number", "kind", "message", "at"],
                   "properties": {"tick_number": {"type": "integer"},
                                  "kind": {"enum": ["invalid_result", "exception", "stalled", "nondeterministic"]},
                                  "message": {"type": "string"}, "at": _TIME}},
    "zone_state": _object(zone=_ref("zone"), entities={"type": "array", "items": _ref("entity")},
                          tick_number={"type": "integer"}, zone_tick_number={"type": "integer"},
                          pending_intents={"type": "integer"}, last_error=_ref("zone_error"),
                          errors={"type": "integer"}, ticks={"type": "integer"}, skipped_ticks={"type": "integer"},
                          stalled_seconds={"type": "number"}, last_tick_ms={"type": "number"},
                          members={"type": "array", "items": _UUID}),
    "connections": _object(connections={"type": "array", "items": _object(
        player_id=_UUID, username={"type": "string"}, zone_id={"type": ["string", "null"], "format": "uuid"},
        connected_at=_TIME, node={"type": "string"})}),
    "history": _object(zone_id=_UUID, ticks={"type": "array", "items": _object(
        tick_number={"type": "integer"}, seed={"type": "integer"}, at=_TIME,
        intents={"type": "array", "items": _object(player_id=_UUID, seq={"type": "integer"},
                                                    data={"type": "object"})},
        events={"type": "array", "items": {"type": "array", "items": {"type": "string"}, "minItems": 2,
                                           "maxItems": 2, "description": '["join" or "leave", player_id]'}})}),
    "rewind": _object(tick_number={"type": "integer"}, entities={"type": "array", "items": _ref("entity")}),
    "reload": _object(module={"type": "string"}, version={"type": "string"}),
    "health": _object(status={"enum": ["ok", "degraded"]}, database={"enum": ["ok", "down"]},
                      tick_number={"type": "integer"}, paused={"type": "boolean"}, zones_failing={"type": "integer"},
                      failing_zones={"type": "array", "items": _UUID}, node={"type": "string"}),
    "cluster": _object(node={"type": "string"}, nodes={"type": "array", "items": _object(
        name={"type": "string"}, zones={"type": "integer"}, connections={"type": "integer"}, last_seen=_TIME,
        started_at=_TIME, alive={"type": "boolean"})}, zones={"type": "array", "items": _object(
            zone_id=_UUID, name={"type": "string"}, node={"type": ["string", "null"]},
            epoch={"type": "integer"})}),
    "openapi": _object(openapi={"type": "string"}, info={"type": "object"}, paths={"type": "object"}),
    "text": {"type": "string"},
    "file": {},
}


@dataclass(frozen=True)
class _Message:
    type: str
    example: dict
    meaning: str
    answer: str = ""  # client messages: the type of the server's answer


_EXAMPLE_ZONE = "6f1c1a2e-0b7d-4c55-9a47-3e8f5d1b2c90"
_EXAMPLE_PLAYER = "0d5e3f4a-8b21-4f6c-a1b2-9c7d6e5f4a3b"

#: What a client may send over ``/ws``, with an example and the server's answer.
CLIENT_MESSAGES: list[_Message] = [
    _Message("subscribe", {"type": "subscribe", "zone_id": _EXAMPLE_ZONE},
             "leave the current zone (if any) and join this one; no tick of the old zone arrives after the "
             "answer. Errors: `zone_not_found`, `rate_limited`, `bad_message`", "subscribed"),
    _Message("intent", {"type": "intent", "data": {"move": "up"}},
             "`data` is any JSON object, opaque to the server: queued for the zone, stamped with the player, the "
             "zone, the receive time and a sequence number, and handed to the game module at the zone's next tick "
             "in arrival order. No answer of its own; errors: `not_subscribed`, `rate_limited`, `bad_message`",
             "tick"),
    _Message("unsubscribe", {"type": "unsubscribe"}, "leave the current zone. Error: `rate_limited`",
             "unsubscribed"),
    _Message("ping", {"type": "ping"}, "an application-level ping (WebSocket pings are answered too)", "pong"),
]

#: What the server sends over ``/ws``, with an example.
SERVER_MESSAGES: list[_Message] = [
    _Message("tick", {"type": "tick", "zone_id": _EXAMPLE_ZONE, "tick_number": 42, "sent_at": 1764400000.25,
                      "state": {"entities": [{"id": _EXAMPLE_PLAYER, "x": 3, "y": 4}]}},
             "after every tick of the subscribed zone: `state` is what the game module chose for this player; "
             "`tick_number` is the zone's own count; `sent_at` is the server's time (seconds since the epoch) "
             "when the frame was built, to measure latency"),
    _Message("subscribed", {"type": "subscribed", "zone_id": _EXAMPLE_ZONE},
             "the answer to `subscribe`; also `{\"type\": \"subscribed\", \"zone_id\": ..., \"resumed\": true}` "
             "on connecting, when the player reconnects within `[websocket] reconnect_grace` and is put back in "
             "their zone"),
    _Message("unsubscribed", {"type": "unsubscribed"}, "the answer to `unsubscribe`"),
    _Message("pong", {"type": "pong"}, "the answer to `ping`"),
    _Message("error", {"type": "error", "code": "zone_not_found", "message": "No zone has the id 'x'."},
             "a refused message or an event (see the error codes); never closes the connection. `zone_failed` "
             "also carries `zone_id`"),
    _Message("zone_recovered", {"type": "zone_recovered", "zone_id": _EXAMPLE_ZONE},
             "the zone ticks again after `zone_failed`"),
    _Message("module_reloaded", {"type": "module_reloaded", "version": "3f2a9c1d"},
             "to every subscribed player: the game module's code was reloaded (`version` names it)"),
]


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _protocol_markdown(part: str = "all") -> str:
    """The README's protocol tables (``gridserver --print-protocol``), written from ``ROUTES``,
    ``ERRORS``, the message tables and ``CLOSE_CODES``. ``part``: ``"rest"`` (routes, bodies,
    answers, error codes), ``"websocket"`` (messages, close codes) or ``"all"`` (both)."""
    who = {"anyone": "anyone", "token": "token", "debug": "debug player"}
    out = ["#### Routes", "",
           "`token`: a session token in `Authorization: Bearer <token>`. `debug player`: the same, of a "
           "debug player; these routes exist only with `[server] debug = true` (otherwise `404 not_found`). "
           "Every route may also answer " + ", ".join(f"`{c}`" for c in _ANY_ROUTE_ERRORS) + "; every `token` "
           "route " + " and ".join(f"`{c}`" for c in _ACCESS_ERRORS["token"]) + ", and every `debug player` "
           "route " + ", ".join(f"`{c}`" for c in _ACCESS_ERRORS["debug"]) + ". `GET` routes answer `HEAD` too.",
           "",
           "| method | path | who | what it does | answer | errors |", "| --- | --- | --- | --- | --- | --- |"]
    for r in ROUTES:
        if r.content_type == "websocket":
            answer = "`101` (upgrade)"
        elif r.answer is None:
            answer = f"`{r.status}`"
        elif r.content_type == "*/*":
            answer = f"`{r.status}` the file (its type from its name)"
        elif r.content_type != "application/json":
            answer = f"`{r.status}` {r.content_type}"
        else:
            answer = f"`{r.status}` {r.answer}"
        errors = ", ".join(f"`{c}`" for c in r.errors) or "-"
        out.append(f"| {r.method} | `{r.path}` | {who[r.access]} | {_markdown_cell(r.summary)} | {answer} | "
                   f"{errors} |")
    out += ["", "Request bodies (JSON objects; fields the server does not know are ignored):", ""]
    for r in ROUTES:
        if r.body or r.query:
            where = "query" if r.query else ("body, optional" if not r.body_required else "body")
            fields = "; ".join(f"`{f.name}` ({f.type}{'' if f.required else ', optional'}): {f.help}"
                               for f in r.body or r.query)
            out.append(f"- `{r.method} {r.path}` ({where}): {fields}.")
    out += ["", "Answers (`?`: may be null):", ""]
    for name, schema in _SCHEMAS.items():
        if name in ("error", "text", "file", "openapi", "zone_error"):
            continue
        out.append(f"- {name}: `{_shape(schema)}`")
    out += ["", "#### Error codes", "",
            "Every REST error is `{\"error\": \"<code>\", \"message\": \"<one sentence>\"}` with the status below; "
            "a WebSocket error is `{\"type\": \"error\", \"code\": \"<code>\", \"message\": \"<one sentence>\"}`.",
            "", "| code | HTTP status | WebSocket | meaning |", "| --- | --- | --- | --- |"]
    for e in ERRORS:
        out.append(f"| `{e.code}` | {e.status or '-'} | {'yes' if e.websocket else '-'} | "
                   f"{_markdown_cell(e.meaning)} |")
    rest, out = out, []
    for title, messages, answers in (("Client to server", CLIENT_MESSAGES, True),
                                     ("Server to client", SERVER_MESSAGES, False)):
        out += ["", f"#### {title}", "", "| type | example | meaning |" + (" answer |" if answers else ""),
                "| --- | --- | --- |" + (" --- |" if answers else "")]
        for m in messages:
            row = f"| `{m.type}` | `{json_dumps(m.example)}` | {_markdown_cell(m.meaning)} |"
            out.append(row + (f" `{m.answer}` |" if answers else ""))
    out += ["", "#### Close codes", "", "| code | meaning |", "| --- | --- |"]
    out += [f"| {code} | {_markdown_cell(meaning)} |" for code, meaning in CLOSE_CODES]
    parts = {"rest": "\n".join(rest) + "\n", "websocket": "\n".join(out[1:]) + "\n"}
    return parts["rest"] + "\n" + parts["websocket"] if part == "all" else parts[part]  # KeyError: no such part


def _shape(schema: dict) -> str:
    """A schema as a short JSON-like shape: ``{"id", "zones": [zone]}``."""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[1]
    if schema.get("type") == "array":
        return f"[{_shape(schema['items'])}]" if "items" in schema else "[...]"
    if "properties" in schema:
        parts = []
        for name, sub in schema["properties"].items():
            inner = sub if "$ref" in sub or sub.get("type") == "array" or "properties" in sub else None
            nullable = isinstance(sub.get("type"), list) and "null" in sub["type"]
            parts.append(f'"{name}"' + ("?" if nullable else "") + (f": {_shape(inner)}" if inner else ""))
        return "{" + ", ".join(parts) + "}"
    return "..."


_JSON_TYPES = {"string": {"type": "string"}, "integer": {"type": "integer"},
               "boolean": {"type": "boolean"}, "object": {"type": "object"}}


def openapi_document(cfg: Config) -> dict:
    """The OpenAPI 3.1 document of the REST routes (``GET /api/openapi.json``) of a server
    configured by ``cfg``, written from ``ROUTES``, ``_SCHEMAS`` and ``ERRORS``. Debug routes
    are in it only when ``[server] debug`` is true (they do not exist otherwise); ``/ws`` is
    left out (OpenAPI cannot describe its messages).

    Constraints JSON Schema cannot say are in the descriptions: a tick range's ``from`` at
    most ``to``, a password's 72 bytes, integers written without a decimal point (``5.0``
    is refused, though JSON Schema counts it as an integer)."""
    debug = cfg.get("server", "debug")

    def schema_of(f: _Field) -> dict:
        limits = {k: cfg.get(*v) if isinstance(v, _Setting) else v for k, v in f.limits}
        return {**_JSON_TYPES[f.type], **limits, "description": f.help}
    paths: dict[str, dict] = {}
    for r in ROUTES:
        if r.content_type == "websocket" or (r.access == "debug" and not debug):
            continue
        op: dict[str, Any] = {"operationId": r.handler, "summary": r.summary.replace("`", ""),
                              "tags": [r.access if r.access != "token" else "player"]}
        params = [{"name": name, "in": "path", "required": True,
                   "schema": {"type": "string", "description": "a file's path in the folder"} if name == "path" else _UUID}
                  for name in re.findall(r"\{(\w+)\}", r.path)]
        params += [{"name": f.name, "in": "query", "required": f.required, "description": f.help,
                    "schema": schema_of(f)} for f in r.query]
        if params:
            op["parameters"] = params
        if r.body:
            op["requestBody"] = {"required": r.body_required, "content": {"application/json": {"schema": {
                "type": "object", "required": [f.name for f in r.body if f.required],
                "properties": {f.name: schema_of(f) for f in r.body}}}}}
        responses: dict[str, Any] = {}
        ok: dict[str, Any] = {"description": r.summary.replace("`", "")}
        if r.answer is not None:
            schema = _ref(r.answer)
            ok["content"] = {r.content_type: {"schema": schema}}
        responses[str(r.status)] = ok
        if r.answer == "health":
            responses["503"] = {"description": "the database is down", "content": {
                "application/json": {"schema": _ref("health")}}}
        by_status: dict[int, list[str]] = {}
        for code in _route_errors(r):
            by_status.setdefault(HTTP_STATUS[code], []).append(code)
        for status, codes in sorted(by_status.items()):
            responses.setdefault(str(status), {
                "description": ", ".join(codes),
                "content": {"application/json": {"schema": {"allOf": [_ref("error"), {"properties": {
                    "error": {"enum": codes}}}]}}}})
        op["responses"] = responses
        if r.access != "anyone":
            op["security"] = [{"bearer": []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "gridserver", "version": _package_version(),
                 "description": "The REST routes of gridserver. The WebSocket `/ws` (`?token=` or "
                                "`Authorization: Bearer`) is described in the README: OpenAPI cannot describe "
                                "its messages."},
        "paths": paths,
        "components": {"schemas": _SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "a token from POST /api/auth/login"}}},
    }


def _package_version() -> str:
    try:
        return str(importlib.metadata.version("gridserver"))
    except importlib.metadata.PackageNotFoundError:  # not installed: run from a copy of the file
        return "unknown"


async def openapi(request: web.Request) -> web.Response:
    """``GET /api/openapi.json``: ``openapi_document`` for this server (no token needed),
    written once when the app is made (``create_app``): it depends on the configuration only."""
    return web.Response(text=request.app[OPENAPI], content_type="application/json")


# =============================================================================
# App factory and CLI
# =============================================================================


async def _on_shutdown(app: web.Application) -> None:
    await app[SERVER].shutdown()


async def _lifecycle(app: web.Application) -> Any:
    srv = app[SERVER]
    await srv.start()
    yield
    await srv.shutdown()
    await srv.close()


def startup_game(cfg: Config) -> LoadedGame | BuiltinDemo:
    """The game ``[game] module`` names, imported (``GameModuleError`` when it cannot be); the
    built-in demo when the default is named and ``game_modules/`` is not beside this file."""
    path = cfg.get("game", "module")
    try:
        return load_game_module(path)
    except GameModuleError:
        if path != DEFAULT_GAME or importlib.util.find_spec("game_modules") is not None:
            raise
    log.warning("game_modules/ is not beside gridserver.py: running the built-in demo game "
                "(set [game] module to your own)")
    return BuiltinDemo()


def _router_path(path: str) -> str:
    """A route's path as aiohttp routes it: a ``{path}`` at the end takes the rest of the URL
    (slashes too)."""
    return path[:-len("{path}")] + "{path:.*}" if path.endswith("{path}") else path


def _route_handler(route: _Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler a route names (looked up by name: the browser page's is defined last)."""
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]] = globals()[route.handler]
    return handler


def create_app(cfg: Config | None = None, game: Any = None) -> web.Application:
    """The aiohttp application. ``game``: a ``LoadedGame`` (``startup_game``), or any game
    object, which replaces the module named in the config (and cannot be reloaded); None:
    the configured module is loaded at start-up."""
    cfg = cfg or Config.load()
    app = web.Application(middlewares=[_cors_middleware, _errors_middleware], client_max_size=cfg.get("server", "max_body_size") + 1024,
                          handler_args={"keepalive_timeout": cfg.get("server", "client_timeout")})
    app[SERVER] = Server(cfg, game)
    app[OPENAPI] = json_dumps(openapi_document(cfg))
    # GET routes answer HEAD too (web.get), as aiohttp's do
    app.router.add_routes([web.get(_router_path(r.path), _route_handler(r)) if r.method == "GET"
                           else web.route(r.method, _router_path(r.path), _route_handler(r)) for r in ROUTES])
    app.on_shutdown.append(_on_shutdown)
    app.cleanup_ctx.append(_lifecycle)
    return app


class _AccessLogger(AbstractAccessLogger):
    """One line per request, without the query string: a WebSocket URL carries its token there."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info('%s "%s %s" %s %s %.3fs', request.remote, request.method, request.path,
                         response.status, response.body_length, time)


#: gc thresholds once the world is loaded: young collections stay cheap, full collections
#: over the frozen world become rare (the default stalls ticks at thousands of clients).
GC_THRESHOLDS = (50_000, 50, 100)


def _tune_gc() -> None:
    """Once the world is loaded: long-lived objects leave the collector's view, and
    collections get rarer. Process-wide, so only the command line does it (not tests or an
    application that embeds ``create_app``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


#: glibc's malloc, once ``_tune_malloc`` has set it up (the command line on Linux): the flush
#: thread gives free memory back through it (``_give_back_memory``).
_LIBC: Any = None
#: Blocks of this size and larger get pages of their own, returned to the system when freed.
#: Above the 256 KiB asyncio asks for at every socket read: a block that size mapped and
#: unmapped at each read costs 14 µs (glibc's default starts at 128 KiB, where it does).
MMAP_THRESHOLD = 4 * 1024 * 1024


def _tune_malloc() -> None:
    """Keep the process's memory from creeping up under glibc's malloc (Linux).

    Every tick makes large, short-lived buffers (socket reads of 256 KiB, shrunk to what
    came; the journal's statement; a flush's serialized rows). glibc's threshold for
    mapping a block on its own starts at 128 KiB, so each socket read maps and unmaps
    pages (14 µs), until it frees some larger mapped block and raises the threshold, up to
    32 MiB: from then on even bursts of many megabytes grow the heap, which glibc rarely
    gives back, and RSS climbs with every burst and stays. A fixed threshold of 4 MiB keeps
    socket reads cheap and bursts beyond it mapped (freed at once), and
    ``_give_back_memory`` returns the heap's free pages after each flush. Process-wide, so
    only the command line does it; elsewhere (musl, macOS) nothing is changed.
    """
    global _LIBC
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold, m_trim_threshold = -3, -1
        if any(libc.mallopt(option, MMAP_THRESHOLD) != 1 for option in (m_mmap_threshold, m_trim_threshold)):
            return
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        _LIBC = libc
    except (OSError, AttributeError):  # not glibc
        return


def _give_back_memory() -> None:
    """In the flush thread, after a flush: the heap's free pages go back to the system (glibc's
    ``malloc_trim``, which runs without the GIL; about a millisecond)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _raise_open_file_limit() -> None:
    """Raise the soft limit of open files to the hard one (every socket is a file) and log it."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
    log.info("open files limit: %d", soft)


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log an error of ``accept()`` (out of file descriptors, say) at most once a second,
    with the count of those not logged, instead of once per failed accept."""
    last: dict[str, list] = {}

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        message = str(context.get("message", ""))
        if "accept" in message:
            now = time.monotonic()
            seen = last.get(message)
            if seen is not None and now - seen[0] < 1.0:
                seen[1] += 1
                return
            last[message] = [now, 0]
            if seen is not None and seen[1]:
                context = dict(context, message=f"{message} ({seen[1]} more in the second before)")
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def _watch_game(srv: Server, every: float = 0.5) -> None:
    """``gridserver --reload``: load the game module again whenever its source file changes
    (polled: no dependency, any file system)."""
    def stamp(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    loaded = srv.loaded
    if loaded is None or not loaded.file:
        log.warning("--reload: the game was not loaded from a file; nothing to watch")
        return
    path = loaded.file
    log.info("--reload: watching %s", path)
    seen = stamp(path)
    while True:
        await asyncio.sleep(every)
        now = stamp(path)
        if now == seen or now is None:
            continue
        await asyncio.sleep(every / 2)  # let the editor finish writing
        seen = stamp(path)
        try:
            await srv.reload_game()
        except GridError:
            pass  # refused: logged, and the running code stays
        except Exception:  # noqa: BLE001 - the watcher goes on
            log.exception("--reload: the reload failed")


async def _serve(cfg: Config, reload: bool = False, reuse_port: bool = False) -> int:
    _quiet_accept_errors(asyncio.get_running_loop())
    try:
        _check_aiohttp()
        game = startup_game(cfg)  # before anything touches the disk or the database
    except ConfigError as exc:
        print(f"gridserver: {exc}", file=sys.stderr)
        return 2
    app = create_app(cfg, game)
    runner = _AppRunner(app, access_log=log if cfg.get("debug", "access_log") else None,
                        access_log_class=_AccessLogger,
                        shutdown_timeout=cfg.get("server", "shutdown_timeout"))
    dsn = cfg.get("database", "dsn")
    new_file = dsn[len("sqlite:///"):] or "gridserver.db" if dsn.startswith("sqlite:///") else None
    if new_file is not None and os.path.exists(new_file):
        new_file = None
    try:
        await runner.setup()
    except (DatabaseUnavailable, ConfigError) as exc:
        if isinstance(exc, GameModuleError) and new_file is not None:  # on_init failed: leave no new file
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.remove(new_file + suffix)
        print(f"gridserver: {exc}", file=sys.stderr)
        return 2
    host, port = cfg.get("server", "host"), cfg.get("server", "port")
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        print(f"gridserver: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        await runner.cleanup()
        return 2
    _tune_gc()
    game = app[SERVER].game
    log.info("gridserver listening on http://%s:%d (game %s)", host, port,
             getattr(game, "__name__", type(game).__name__))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.ensure_future(_watch_game(app[SERVER])) if reload else None
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    log.info("stopping: final flush, then closing connections")
    await runner.cleanup()
    return 0


def _event_loop(cfg: Config) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The event loop ``[server] event_loop`` picks: its name and factory (None: asyncio's).
    uvloop (the ``[fast]`` extra: libuv's loop, in C) is imported only when it may be used;
    ``ConfigError`` when it is required and missing."""
    choice = cfg.get("server", "event_loop")
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("[server] event_loop = uvloop: uvloop is not installed "
                              "(pip install 'gridserver[fast]')") from None
        return "asyncio", None
    return f"uvloop {importlib.metadata.version('uvloop')}", uvloop.new_event_loop


def _workers(cfg: Config, argv: list[str]) -> int:
    """``--workers N``: run N node processes of this configuration on one port (each listens
    with ``SO_REUSEPORT``, so the kernel spreads connections over them). The first starts
    alone (a game module creating its zones in ``on_init`` finds them made by then); a node
    that dies is started again after a second, unless it keeps dying within seconds of its
    start (a configuration it cannot run: then all stop). SIGTERM or SIGINT stops them all
    (each hands its zones over as a stopped node does) and waits for them."""
    n, port = cfg.get("server", "workers"), cfg.get("server", "port")
    if port == 0:
        print("gridserver: --workers needs a fixed [server] port (0 would give each node its own)", file=sys.stderr)
        return 2
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker"]
    env = dict(os.environ, GRIDSERVER_SERVER_WORKERS="1")
    stopping = False
    children: list[subprocess.Popen] = []
    started: list[float] = []
    quick_deaths = 0

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def listening() -> bool:
        with contextlib.suppress(OSError), socket.create_connection((cfg.get("server", "host"), port), timeout=1):
            return True
        return False
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    for i in range(n):
        if stopping:
            break
        children.append(subprocess.Popen(cmd, env=env))
        started.append(time.monotonic())
        while i == 0 and not stopping and children[0].poll() is None and not listening():
            time.sleep(0.1)  # the first node alone until it listens
    log.info("gridserver: %d nodes on port %d (pids %s)", n, port, ", ".join(str(c.pid) for c in children))
    code = 0
    while not stopping:
        time.sleep(0.2)
        for i, child in enumerate(children):
            if child.poll() is None or stopping:
                continue
            quick_deaths = quick_deaths + 1 if time.monotonic() - started[i] < 5 else 0
            if quick_deaths >= 3:
                log.error("gridserver: nodes keep ending within seconds of their start (last: %s); stopping",
                          child.returncode)
                code = 1
                stop(signal.SIGTERM, None)
                break
            log.error("gridserver: node pid %d ended with %s; starting another", child.pid, child.returncode)
            time.sleep(1.0)
            if not stopping:
                children[i] = subprocess.Popen(cmd, env=env)
                started[i] = time.monotonic()
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(cfg.get("server", "shutdown_timeout") + 10)
        if child.poll() is None:
            child.kill()
            child.wait()
    return code


def _run(main: Coroutine[Any, Any, int], factory: Callable[[], asyncio.AbstractEventLoop] | None) -> int:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


async def _replay(cfg: Config, zone_text: str, first: int, last: int) -> int:
    """``gridserver replay``: the zone's ticks ``first``..``last`` replayed from the database
    (the newest snapshot before ``first``, then the journal) through the game module, one JSON
    line per tick on stdout. Reads the database, writes nothing; no server is started."""
    try:
        zone_id = UUID(zone_text)
    except ValueError:
        print(f"gridserver replay: --zone {zone_text!r} is not a zone id", file=sys.stderr)
        return 2
    store = open_store(cfg)
    try:
        await store.open()
        zones, entities, marks = await store.load()
        world = World(cfg.get("tick", "max_entities_per_zone"))
        world.load(zones, entities, marks)
        zs = world.zones.get(zone_id)
        if zs is None:
            print(f"gridserver replay: no zone has the id {zone_id}", file=sys.stderr)
            return 2
        base = await store.snapshot_before(zone_id, first)
        rows = await store.journal_range(zone_id, base[0] + 1 if base else 0, last)
        if base is None or not rows:
            print(f"gridserver replay: tick {first} of zone {zone_id} is not kept ([journal] keep)", file=sys.stderr)
            return 2
        game = load_game(cfg.get("game", "module"))
        names = await store.usernames()

        def refuse(*args: Any) -> Zone:
            raise RuntimeError("a replay creates no zone")

        section = cfg.get("game", "module")
        framework = FrameworkAPI(world, cfg.section(section), section=section,
                                 tick_interval=cfg.get("tick", "interval"), create_zone=refuse, usernames={})

        def each(n: int, outcome: ZoneOutcome) -> None:
            if n >= first:
                line = {"tick_number": n, "entities": sorted((e.to_json() for e in zs.entities.values()),
                                                               key=lambda e: e["id"])}
                if outcome.error is not None:
                    line["error"] = outcome.error
                print(json_dumps(line), flush=True)

        def run() -> None:
            game.on_init(framework)
            world.reset_zone(zs, base[1], base[0])
            replay_zone(world, game, zs, rows, each=each, usernames=names)
        await asyncio.get_running_loop().run_in_executor(None, run)
        return 0
    except (DatabaseUnavailable, ConfigError) as exc:
        print(f"gridserver replay: {exc}", file=sys.stderr)
        return 2
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    """``gridserver [--config PATH]``: run the server until SIGINT or SIGTERM.
    ``gridserver replay --zone ID --from N --to M``: print a zone's ticks replayed (see ``_replay``)."""
    parser = argparse.ArgumentParser(prog="gridserver", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=["serve", "replay"], default="serve",
                        help="serve (the default), or replay a zone's journaled ticks and print them")
    parser.add_argument("--config", metavar="PATH", help="INI file (default: config.ini when present)")
    parser.add_argument("--print-config", action="store_true", help="print every key with its default and exit")
    parser.add_argument("--print-schema", action="store_true", help="print the PostgreSQL schema and exit")
    parser.add_argument("--print-protocol", action="store_true",
                        help="print the protocol tables (routes, errors, WebSocket messages) as in the README and exit")
    parser.add_argument("--reload", action="store_true",
                        help="load the game module again whenever its file changes (players stay connected)")
    parser.add_argument("--zone", metavar="ID", help="replay: the zone's id")
    parser.add_argument("--from", dest="first", type=int, metavar="N", help="replay: the first tick printed")
    parser.add_argument("--to", dest="last", type=int, metavar="M", help="replay: the last tick printed")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="run N node processes on one port ([server] workers; needs [cluster] nats_url)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of --workers' nodes
    args = parser.parse_args(argv)
    if args.workers is not None:
        os.environ["GRIDSERVER_SERVER_WORKERS"] = str(args.workers)
    if args.print_config:
        print(_example_ini(), end="")
        return 0
    if args.print_schema:
        print(PG_SCHEMA.strip())
        return 0
    if args.print_protocol:
        print(_protocol_markdown(), end="")
        return 0
    try:
        cfg = Config.load(args.config)
    except ConfigError as exc:
        print(f"gridserver: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.get("debug", "log_level").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _raise_open_file_limit()
    _tune_malloc()
    # Game modules import from the config file's folder, then the working directory, then
    # this file's folder (inserted in reverse, each at the front).
    config_dir = os.path.dirname(os.path.abspath(args.config)) if args.config else os.getcwd()
    for folder in (os.path.dirname(os.path.abspath(__file__)), os.getcwd(), config_dir):
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)
    if args.command == "replay":
        if args.zone is None or args.first is None or args.last is None or args.first > args.last:
            parser.error("replay needs --zone ID --from N --to M (N at most M)")
        return asyncio.run(_replay(cfg, args.zone, args.first, args.last))
    for name in cfg.unused_sections:
        log.warning("config section [%s] is not used: it is neither a gridserver section nor the game module's", name)
    try:
        loop_name, factory = _event_loop(cfg)
    except ConfigError as exc:
        print(f"gridserver: {exc}", file=sys.stderr)
        return 2
    log.info("event loop: %s", loop_name)
    if cfg.get("server", "workers") > 1:
        rest = list(sys.argv[1:] if argv is None else argv)
        if "--workers" in rest:
            del rest[rest.index("--workers"):rest.index("--workers") + 2]
        rest = [a for a in rest if not a.startswith("--workers=")]
        return _workers(cfg, rest)
    try:
        return _run(_serve(cfg, reload=args.reload, reuse_port=args.worker), factory)
    except KeyboardInterrupt:
        return 130


# =============================================================================
# Python client
# =============================================================================
#
# ``Client`` speaks the contract from the other side, for bots, load tests and tests:
# the REST calls as methods, and one WebSocket that it keeps open (reconnecting with
# backoff and resuming the zone) until it is closed, logged out or replaced. Of the
# server above it uses only the JSON helpers and the close codes.

import aiohttp  # noqa: E402 - only the client needs aiohttp's client half

_client_log = logging.getLogger("gridserver.client")


class ClientError(Exception):
    """Every refusal the client meets, as one exception.

    ``status``: the HTTP status of a REST error; the close code when the socket ended for
    good; 0 for a refusal on the socket or a network failure. ``code``: the server's machine
    code, or the client's own (``unreachable``, ``disconnected``, ``session_ended``,
    ``replaced``, ``closed``, ``not_connected``, ``client_failed``). ``message``: one
    sentence. ``retry_after``: seconds, from a ``Retry-After`` header.
    """

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{code}: {message}" + (f" (HTTP {status})" if 400 <= status < 600 else ""))
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


#: Codes of socket errors that can be the refusal of a subscribe or an unsubscribe.
_REFUSALS = frozenset({"zone_not_found", "rate_limited", "bad_message"})

_Handler = Callable[[dict], Any]


class Client:
    """An asyncio client of one server: ``async with Client("http://127.0.0.1:8080") as c``.

    Every message from the server, and the client's own ``open`` and ``close`` events, goes
    to the handlers of its type (``on``), into a buffer of its type that ``next`` takes from,
    and, for ticks and answers, into ``tick``, ``state`` and ``zone_id``. Buffers are bounded:
    ticks keep only the newest (a bot that falls behind skips ticks, as the server does for a
    slow reader); every other type keeps its last ``buffer`` messages, dropping the oldest.

    The socket stays open from ``connect`` until ``close``, ``logout``, the end of the session
    (close code 4001) or another connection of the same player (4000, not fought): those end
    it for good, and ``ended`` says why. Any other drop reconnects after an exponential
    backoff with jitter (``reconnect_delay``: the first and the largest delay) and puts the
    client back in the zone it wants: resumed by the server within its grace period, else
    subscribed again. While it reconnects, ``intent`` returns False and ``zone_id`` is None.
    The server's heartbeat pings are answered by aiohttp (autoping); the client pings a
    silent server every ``heartbeat`` seconds and reconnects when no pong comes.
    """

    def __init__(self, base_url: str, *, token: str | None = None, session: aiohttp.ClientSession | None = None,
                 timeout: float = 10.0, buffer: int = 100, heartbeat: float | None = 20.0,
                 reconnect_delay: tuple[float, float] = (0.25, 10.0)):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.player_id: str | None = None
        self.username: str | None = None
        self.timeout = timeout  # seconds for a REST call, opening the socket, an answer, next()
        self.buffer = buffer
        self.heartbeat = heartbeat
        self.reconnect_delay = reconnect_delay
        self.tick: dict | None = None  # the last tick message, kept across reconnects
        self.zone_id: str | None = None  # the zone the server says this socket is in
        self.ended: ClientError | None = None  # why the socket ended for good (until connect())
        self.reconnects = 0  # successful reconnections
        self._http = session
        self._own_http = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task | None = None
        self._live = False  # from connect() until the socket ends for good
        self._want: str | None = None  # the zone the user asked for
        self._left = False  # the user unsubscribed: a zone the server resumes is left again
        self._inbox: dict[str, collections.deque[dict]] = {}
        self._arrived = asyncio.Event()
        self._handlers: dict[str, list[_Handler]] = collections.defaultdict(list)
        self._tasks: set[asyncio.Future] = set()
        self._connecting = asyncio.Lock()
        # Socket answers carry no request id, but the server answers in order: every subscribe,
        # unsubscribe and ping is followed by a {"type": "ping"}, and at its pong the request has
        # been answered, or refused (a rate limit past the first is refused without a word).
        self._fences: collections.deque[tuple[str, Any]] = collections.deque()
        self._refusal: dict | None = None
        self._waiters: list[tuple[str, str | None, asyncio.Future]] = []  # ("sub"|"unsub", zone, future)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def state(self) -> dict | None:
        """The ``state`` of the last tick, or None."""
        return self.tick.get("state") if self.tick else None

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    # -- REST -----------------------------------------------------------------------------
    def _http_session(self) -> aiohttp.ClientSession:
        """The HTTP session: the one given, or the client's own, made at first use."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    async def request(self, method: str, path: str, json: Any = None) -> Any:
        """One REST call with the client's token; the parsed JSON answer (None when empty).
        An error status raises ``ClientError`` with the server's code, a network failure
        ``ClientError`` ``unreachable``. For routes without a method here (``/api/debug/...``)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        data = None
        if json is not None:
            data, headers["Content-Type"] = json_dumps(json), "application/json"
        try:
            async with self._http_session().request(method, self.base_url + path, data=data, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                text = await resp.text()
                status, retry = resp.status, resp.headers.get("Retry-After", "")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ClientError(0, "unreachable", f"{method} {path} failed: {exc or type(exc).__name__}") from exc
        try:
            body = json_loads(text) if text else None
        except ValueError:
            body = text
        if status >= 400:
            error = body if isinstance(body, dict) else {}
            raise ClientError(status, str(error.get("error", "http_error")), str(error.get("message", text[:200])),
                              float(retry) if retry.replace(".", "", 1).isdigit() else None)
        return body

    async def register(self, username: str, password: str) -> dict:
        """Create an account: ``{"id", "username", "created_at"}``. It does not log in."""
        body = {"username": username, "password": password}
        return typing.cast(dict, await self.request("POST", "/api/auth/register", body))

    async def login(self, username: str, password: str) -> dict:
        """Log in and keep the token: ``{"token", "player_id", "expires_at"}``."""
        body = {"username": username, "password": password}
        answer = typing.cast(dict, await self.request("POST", "/api/auth/login", body))
        self.token, self.player_id, self.username = answer["token"], answer["player_id"], username
        return answer

    async def logout(self, all: bool = False) -> None:
        """End the session (``all``: every session of the player) and, for good, the socket.
        When the server cannot be told (``unreachable``, 503...) the ``ClientError`` is raised
        and the token and the socket are kept: the session still lives, so log out again."""
        try:
            await self.request("POST", "/api/auth/logout", {"all": True} if all else None)
        except ClientError as exc:
            if exc.status != 401:  # 401: the session had ended already
                raise
        await self._stop(ClientError(CLOSE_SESSION_ENDED, "session_ended", "Logged out."))
        self.token, self._want = None, None

    async def me(self) -> dict:
        """``{"id", "username", "created_at", "last_login", "is_debug"}``."""
        return typing.cast(dict, await self.request("GET", "/api/auth/me"))

    async def zones(self) -> list[dict]:
        """Every zone, oldest first."""
        return typing.cast(list, (await self.request("GET", "/api/zones"))["zones"])

    async def zone(self, zone_id: str | UUID) -> dict:
        return typing.cast(dict, await self.request("GET", f"/api/zones/{zone_id}"))

    async def create_zone(self, name: str, width: int, height: int, metadata: dict | None = None) -> dict:
        """A new zone (debug players, with debug mode on)."""
        body = {"name": name, "width": width, "height": height, "metadata": metadata or {}}
        return typing.cast(dict, await self.request("POST", "/api/zones", body))

    async def delete_zone(self, zone_id: str | UUID) -> None:
        """Delete a zone and its entities (debug players, with debug mode on)."""
        await self.request("DELETE", f"/api/zones/{zone_id}")

    # -- the socket -----------------------------------------------------------------------
    async def connect(self) -> None:
        """Open the WebSocket (after ``login``, or with a ``token``) and keep it open; nothing
        when it is already. ``ClientError`` when this first attempt fails (``unauthorized``,
        ``unreachable``...)."""
        async with self._connecting:  # two callers at once: one socket
            if self._task is not None and not self._task.done():
                return
            if not self.token:
                raise ClientError(401, "unauthorized", "Log in (or pass a token) before connecting.")
            if self.player_id is None:  # given a token: who is it?
                me = await self.me()
                self.player_id, self.username = me["id"], me["username"]
            self.ended = None
            ws = await self._open(reconnect=False)
            self._live = True
            self._task = asyncio.ensure_future(self._run(ws))

    async def subscribe(self, zone_id: str | UUID) -> dict:
        """Join a zone, connecting first if needed; returns the ``subscribed`` answer.
        ``ClientError`` when the server refuses (``zone_not_found``, ``rate_limited``...). A drop
        on the way only delays the answer: the client subscribes again when it reconnects."""
        try:
            zone = str(_as_uuid(zone_id))  # the server's spelling, which its answer uses
        except ValueError:
            zone = str(zone_id)  # the server says zone_not_found
        await self.connect()
        self._want, self._left = zone, False
        answer = self._waiter("sub", zone)
        await self._fenced({"type": "subscribe", "zone_id": zone}, ("sub", zone))
        return typing.cast(dict, await self._wait(answer, f"answer to subscribing to zone {zone}"))

    async def unsubscribe(self) -> None:
        """Leave the zone; returns once the server answered ``unsubscribed``."""
        self._require_live()
        self._want, self._left = None, True
        answer = self._waiter("unsub", None)
        await self._fenced({"type": "unsubscribe"}, ("unsub", None))
        await self._wait(answer, "answer to unsubscribing")

    async def intent(self, data: dict) -> bool:
        """Send an intent to the zone; False when it was dropped because the socket is
        reconnecting. The server's refusals (``rate_limited``...) arrive as ``error`` messages."""
        self._require_live()
        return await self._send({"type": "intent", "data": data})

    def _require_live(self, always: bool = False) -> None:
        """Raise why the socket is not usable: how it ended, or that it was never opened."""
        if always or not self._live:
            raise self.ended or ClientError(0, "not_connected", "Call connect() or subscribe() first.")

    async def ping(self) -> float:
        """Send ``{"type": "ping"}``; the seconds until its ``pong``."""
        pong = asyncio.get_running_loop().create_future()
        if not await self._fenced(None, ("ping", (pong, time.monotonic()))):
            self._require_live(True)
        return typing.cast(float, await self._wait(pong, "pong"))

    def on(self, type: str, fn: _Handler) -> _Handler:
        """Call ``fn(message)`` for each message of ``type``: a server message type, ``"open"``,
        ``"close"``, or ``"*"`` for all. A coroutine function runs as a task of the client;
        an exception in a handler is logged. Returns ``fn``."""
        self._handlers[type].append(fn)
        return fn

    def off(self, type: str, fn: _Handler) -> None:
        with contextlib.suppress(ValueError):
            self._handlers[type].remove(fn)

    async def next(self, type: str = "tick", *, timeout: float | None = None,
                   where: Callable[[dict], bool] | None = None) -> dict:
        """The oldest buffered message of ``type`` (for ticks, the newest tick), else the next
        to arrive. With ``where``, messages it rejects are taken and dropped on the way.
        ``TimeoutError`` after ``timeout`` seconds (default: the client's ``timeout``),
        ``ClientError`` (``ended``) once the socket ended for good and the buffer is empty."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            box = self._inbox.get(type)
            while box:
                message = box.popleft()
                if where is None or where(message):
                    return message
            if self.ended is not None and not self._live:
                raise self.ended
            left = deadline - time.monotonic()
            if left <= 0:
                matching = " matching the condition" if where else ""
                raise TimeoutError(f"no {type!r} message{matching} within {limit:g} s ({self._describe()})")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    def clear(self, type: str | None = None) -> None:
        """Forget the buffered messages (of one type, or all): ``next`` waits for new ones."""
        for name in [type] if type else list(self._inbox):
            self._inbox.pop(name, None)

    async def close(self) -> None:
        """Close the socket and stop every task of the client (handlers' too); closes the HTTP
        session unless it was given. ``ended`` becomes ``closed``."""
        await self._stop(ClientError(0, "closed", "The client was closed."))
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]  # close() from a handler
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_http and self._http is not None:
            await self._http.close()
            self._http = None

    # -- inside ---------------------------------------------------------------------------
    def _describe(self) -> str:
        if self.ended is not None and not self._live:
            return f"the socket ended: {self.ended.code}"
        if not self.connected:
            return "reconnecting" if self._live else "not connected"
        tick = f", last tick {self.tick.get('tick_number')}" if self.tick else ""
        return f"connected, zone {self.zone_id}{tick}"

    async def _open(self, reconnect: bool) -> aiohttp.ClientWebSocketResponse:
        url = ("ws" + self.base_url[4:] if self.base_url.startswith("http") else self.base_url) + "/ws"
        try:
            ws = await asyncio.wait_for(self._http_session().ws_connect(
                url, headers={"Authorization": f"Bearer {self.token}"}, heartbeat=self.heartbeat,
                max_msg_size=64 * 1024 * 1024, timeout=aiohttp.ClientWSTimeout(ws_close=self.timeout)), self.timeout)
        except aiohttp.WSServerHandshakeError as exc:
            code = {401: "unauthorized", 429: "too_many_connections"}.get(exc.status, "handshake_failed")
            raise ClientError(exc.status, code, f"The server refused the WebSocket: {exc.message}") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ClientError(0, "unreachable", f"Cannot open {url}: {exc or type(exc).__name__}") from exc
        self._ws = ws
        if reconnect:
            self.reconnects += 1
        self._emit({"type": "open", "reconnect": reconnect})
        # A zone the server resumes is announced before this pong: then the client knows where it is.
        await self._fenced(None, ("resume", None))
        return ws

    async def _run(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read the socket; after a drop, reconnect with backoff, until it ends for good."""
        try:
            await self._read_and_reconnect(ws)
        except Exception as exc:  # noqa: BLE001 - a bug here must end the client loudly, not hang it
            _client_log.exception("the client's socket task failed")
            if self._ws is not None:
                await self._ws.close()
            self._dropped(None, ClientError(0, "client_failed", f"The client failed: {exc!r}"))

    async def _read_and_reconnect(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        attempt, opened = 0, time.monotonic()
        while True:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    try:
                        message = json_loads(msg.data)
                    except ValueError:
                        continue
                    if isinstance(message, dict):
                        await self._dispatch(message)
            ending = self.ended or self._ending(ws.close_code)
            self._dropped(ws.close_code, ending)
            if ending is not None:
                return
            first, most = self.reconnect_delay
            if time.monotonic() - opened > most:
                attempt = 0  # the socket held for a while: the backoff starts afresh
            while True:
                await asyncio.sleep(min(most, first * 2 ** min(attempt, 30)) * random.uniform(0.5, 1.0))
                attempt += 1
                try:
                    ws = await self._open(reconnect=True)
                except ClientError as exc:
                    if exc.status == 401:  # the session ended while the socket was down
                        self._dropped(None, ClientError(401, "session_ended", "The session ended."))
                        return
                    _client_log.info("reconnecting to %s: %s", self.base_url, exc.message)
                    continue
                opened = time.monotonic()
                break

    @staticmethod
    def _ending(code: int | None) -> ClientError | None:
        """The close codes after which the client does not reconnect."""
        if code == CLOSE_SESSION_ENDED:
            return ClientError(code, "session_ended", "The session ended (logged out, or it expired).")
        if code == CLOSE_REPLACED:
            return ClientError(code, "replaced", "Another connection of this player replaced this one.")
        return None

    def _dropped(self, code: int | None, ending: ClientError | None) -> None:
        """The socket closed: forget what belonged to it; with ``ending``, for good."""
        self._ws, self.zone_id, self._refusal = None, None, None
        for kind, detail in self._fences:
            if kind == "ping" and not detail[0].done():
                detail[0].set_exception(ending or ClientError(0, "disconnected", "The socket dropped."))
        self._fences.clear()
        if ending is not None:
            self.ended, self._live = ending, False
            for _, _, future in self._waiters:
                if not future.done():
                    future.set_exception(ending)
            self._waiters.clear()
        self._emit({"type": "close", "code": code, "reconnecting": ending is None,
                    "reason": None if ending is None else ending.code})

    async def _stop(self, ending: ClientError) -> None:
        """End the socket for good (``close``, ``logout``) and wait for the reading task."""
        self.ended = self.ended or ending
        ws, task = self._ws, self._task
        if ws is not None:
            await ws.close()  # the reader sees the close, and ends on ``ended``
        if task is not None and task is not asyncio.current_task():
            task.cancel()  # or it was waiting to reconnect
            await asyncio.gather(task, return_exceptions=True)
        if self._live:
            self._dropped(None, self.ended)

    async def _send(self, message: dict) -> bool:
        ws = self._ws
        if ws is None or ws.closed:
            return False
        try:
            await ws.send_str(json_dumps(message))
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            return False
        return True

    async def _fenced(self, message: dict | None, fence: tuple[str, Any]) -> bool:
        """Send ``message`` (if any) and the ping that marks its answer; False (and nothing
        sent) when the socket is not open. A send that fails drops the socket, and the fence."""
        if self._ws is None or self._ws.closed:
            return False
        self._fences.append(fence)
        if message is None or await self._send(message):
            await self._send({"type": "ping"})
        return True

    def _waiter(self, kind: str, zone: str | None) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((kind, zone, future))
        return future

    def _settle(self, kind: str, zone: str | None, result: Any = None, error: ClientError | None = None) -> None:
        """Answer the waiters of ``kind`` (of ``zone``, for subscribes)."""
        for entry in list(self._waiters):
            if entry[0] == kind and (kind == "unsub" or entry[1] == zone):
                self._waiters.remove(entry)
                if entry[2].done():
                    continue
                if error is None:
                    entry[2].set_result(result)
                else:
                    entry[2].set_exception(error)

    async def _wait(self, future: asyncio.Future, what: str) -> Any:
        try:
            return await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no {what} within {self.timeout:g} s ({self._describe()})") from None

    async def _dispatch(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "tick":
            self.tick = message
        elif kind == "subscribed":
            self.zone_id = message.get("zone_id")
            if self._want is None and not self._left:
                self._want = self.zone_id  # resumed from an earlier run: stay there
            self._settle("sub", self.zone_id, message)
        elif kind == "unsubscribed":
            self.zone_id = None
            self._settle("unsub", None)
        elif kind == "error" and message.get("code") == "zone_deleted":
            self.zone_id = self._want = None
        elif kind == "error" and message.get("code") in _REFUSALS:
            self._refusal = message
        elif kind == "pong" and self._fences:
            fence, detail = self._fences.popleft()
            if fence != "ping":
                await self._fence_passed(fence, detail)
                return  # the client's own pong, not the user's
            if not detail[0].done():
                detail[0].set_result(time.monotonic() - detail[1])
        self._emit(message)

    async def _fence_passed(self, fence: str, zone: str | None) -> None:
        """Everything the server answered to the request before this fence has arrived."""
        refusal, self._refusal = self._refusal or {}, None
        error = ClientError(0, str(refusal.get("code", "rate_limited")),
                            str(refusal.get("message", "Refused: too many subscribes and unsubscribes this tick.")))
        if fence == "sub" and self.zone_id != zone:
            if self._want == zone:
                self._want = self.zone_id  # where the server still has us
            self._settle("sub", zone, error=error)
        elif fence == "unsub" and self.zone_id is not None:
            self._settle("unsub", None, error=error)
        elif fence == "resume" and not any(f[0] in ("sub", "unsub") for f in self._fences):  # none in flight
            if self._want is not None and self.zone_id != self._want:
                await self._fenced({"type": "subscribe", "zone_id": self._want}, ("sub", self._want))
            elif self._want is None and self._left and self.zone_id is not None:
                await self._fenced({"type": "unsubscribe"}, ("unsub", None))
            elif self.zone_id is None:
                self._settle("unsub", None)

    def _emit(self, message: dict) -> None:
        """Buffer ``message`` for ``next``, wake ``next``, and call the handlers."""
        kind = str(message.get("type"))
        box = self._inbox.get(kind)
        if box is None:
            box = self._inbox[kind] = collections.deque(maxlen=1 if kind == "tick" else self.buffer)
        box.append(message)
        self._arrived.set()
        self._arrived = asyncio.Event()
        for fn in [*self._handlers.get(kind, ()), *self._handlers.get("*", ())]:
            try:
                result = fn(message)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._handler_done)
            except Exception:  # noqa: BLE001 - one handler's bug does not stop the client
                _client_log.exception("client handler for %r failed", kind)

    def _handler_done(self, task: asyncio.Future) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _client_log.error("client handler failed", exc_info=task.exception())


# =============================================================================
# Browser client and page
# =============================================================================
#
# ``GET /client.js`` serves ``CLIENT_JS``, the JavaScript client (``GridClient``: an ES module,
# no build step, no dependency) that browser games import; ``GET /`` serves ``PAGE_HTML``, one
# self-contained page built on it: plain HTML, a canvas, nothing loaded from elsewhere. The
# page logs in, lists zones with their live player counts, draws the chosen zone on every
# tick (dimming the cells outside the tick state's optional ``view``), shows the rest of the
# tick state (a score table) beside it, sends the example game's move intents from the arrow
# keys / WASD, and, for debug players, pauses, resumes, steps and rewinds the tick and shows an
# entity's JSON and the connected players. It knows no game: it draws ``state.entities`` from
# the tick state when that is a list of objects with ``x`` and ``y`` (``w``/``h`` or
# ``width``/``height``), otherwise the debug zone state's entities. An entity's ``color``
# (any CSS colour) and ``label``, top level or in ``metadata``, are used when present; colours
# otherwise follow a hash of ``kind``. Its state is ``window.gridserver``. ``create_app``
# routes both here; they are kept last so that the code above reads without scrolling past them.

#: The JavaScript client, served as ``/client.js`` (README: "Writing a browser game").
CLIENT_JS = r"""// gridserver's JavaScript client, served by the server itself at /client.js: an ES module with
// no build step and no dependency, for browser games (the page at / is built on it).
//
//   import {GridClient} from "/client.js";
//   const game = new GridClient();                  // the server this page came from
//   await game.login("alice", "correct horse");     // register(username, password) first for a new player
//   game.on("tick", m => draw(m.state));            // every server message type, plus "open" and "close"
//   await game.connect();                           // reconnects by itself, with backoff, and resumes
//   await game.subscribe((await game.zones())[0].id);
//   game.intent({move: "right"});
//
// Serve the game's page from the server itself ([server] static_dir, at /game/); a page from
// another origin needs that origin in [server] cors_origins. REST errors reject with a
// GridError (status, code, message, retryAfter). See the README, "Writing a browser game".

export class GridError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.name = "GridError";
    this.status = status;          // HTTP status (or the close code that ended the socket); 0 otherwise
    this.code = code;              // the envelope's "error" ("zone_not_found", ...) or the client's ("unreachable", ...)
    this.retryAfter = retryAfter;  // seconds, from Retry-After (429)
  }
}

const SESSION_ENDED = 4001, REPLACED = 4000, MAX_WAIT = 2 ** 31 - 1;
const uuidText = id => String(id).toLowerCase();  // the server's own spelling of an id

export class GridClient {
  constructor(baseUrl, options = {}) {
    const here = typeof location === "undefined" ? "" : location.origin;
    this.baseUrl = String(baseUrl ?? here).replace(/\/+$/, "");
    this.token = options.token ?? null;       // a session token from login(), or one kept from before
    this.backoff = {first: 500, max: 10000, ...(options.backoff || {})};  // milliseconds
    this.heartbeat = options.heartbeat ?? 10000;  // ms of silence before a ping; no answer as long again: reconnect
    this.playerId = null;
    this.zoneId = null;       // the zone the server has this player in ("subscribed")
    this.wanted = null;       // the zone asked for: asked again after a reconnect that did not resume it
    this.tick = null;         // the last "tick" message
    this.connected = false;
    this.resumed = false;     // the server put the player back in their zone on the last connect
    this.attempt = 0;         // reconnect attempts since the socket was last open
    this.socket = null;       // the WebSocket, while there is one
    this._handlers = new Map();
    this._timer = null;       // the backoff before the next attempt
    this._retrying = false;   // an attempt is asking /api/auth/me
    this._stopped = true;     // not connecting: never connected, or closed, logged out, ended, replaced
    this._generation = 0;     // grows at every stop: an attempt of an older generation gives up
    this._opened = false;     // a socket was open before: the next "open" is a reconnect
    this._heard = 0;          // when the socket last brought anything
    this._watch = null;       // the heartbeat's interval
    this._resubscribing = null;  // the zone asked for again on open, until the answer
    this._told = false;       // a last "close" (reconnecting: false) was emitted since the last stop
  }

  get state() { return this.tick ? this.tick.state : null; }

  // Events: every server message by its type ("tick", "subscribed", "unsubscribed", "pong",
  // "error", "zone_recovered", "module_reloaded", ...), "message" for all of them, "open"
  // ({type, reconnect, attempt}) and "close" ({type, code, reason, reconnecting, delay, attempt, ended}).
  on(type, fn) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) { const set = this._handlers.get(type); if (set) set.delete(fn); }

  // The next event of this type (a Promise), rejected with a GridError "timeout" after timeoutMs,
  // or "closed" when the socket ends for good first.
  next(type, timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      const done = (fn, value) => { clearTimeout(timer); off(); offClose(); fn(value); };
      const off = this.on(type, m => done(resolve, m));
      const offClose = type === "close" ? () => {} : this.on("close", ev => {
        if (!ev.reconnecting) done(reject, new GridError(ev.code, "closed", `the connection closed (${ev.code})`));
      });
      const timer = setTimeout(() => done(reject, new GridError(0, "timeout", `no "${type}" within ${timeoutMs} ms`)),
                               Math.min(timeoutMs, MAX_WAIT));
    });
  }

  _closed(event) {  // every "close" event goes out here
    if (!event.reconnecting) this._told = true;
    this._emit("close", {type: "close", ...event});
  }

  _emit(type, event) {
    for (const fn of [...(this._handlers.get(type) || [])]) {
      try { fn(event); } catch (err) { console.error(`gridserver: a "${type}" handler failed`, err); }
    }
  }

  // REST: the parsed JSON answer (null for 204), or a GridError.
  async request(method, path, body) {
    const headers = {};
    if (this.token) headers.Authorization = "Bearer " + this.token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(this.baseUrl + path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
    } catch (err) {
      throw new GridError(0, "unreachable", `the server could not be reached (${err.message})`);
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (err) { data = {message: text}; }
    if (!resp.ok) {
      const retry = Number(resp.headers.get("Retry-After"));
      throw new GridError(resp.status, (data && data.error) || "http_" + resp.status,
                          (data && data.message) || resp.status + " " + resp.statusText, retry > 0 ? retry : null);
    }
    return data;
  }

  register(username, password) { return this.request("POST", "/api/auth/register", {username, password}); }

  async login(username, password) {
    const answer = await this.request("POST", "/api/auth/login", {username, password});
    this.token = answer.token;
    this.playerId = answer.player_id;
    return answer;
  }

  // Ends the session (all: every session of the player) and the connection; no reconnect.
  // When the server cannot be told (unreachable, 503), the token is kept and the error thrown:
  // the session still lives, call logout() again.
  async logout({all = false} = {}) {
    const running = this._stop();
    try {
      await this.request("POST", "/api/auth/logout", all ? {all: true} : undefined);
    } catch (err) {
      if (err.status !== 401) { this._shut(1000, "logging out", running); throw err; }
    }
    this._shut(1000, "logged out", running);
    this.token = null;
    this.playerId = null;
  }

  async me() { const me = await this.request("GET", "/api/auth/me"); this.playerId = me.id; return me; }
  async zones() { return (await this.request("GET", "/api/zones")).zones; }
  zone(zoneId) { return this.request("GET", "/api/zones/" + encodeURIComponent(zoneId)); }

  // Opens the WebSocket; resolves once it is open. A drop reconnects with backoff (first ms,
  // doubling to max, with jitter) until close() or logout(); a session that has ended
  // rejects (before the first open) or emits "close" with ended: true.
  async connect() {
    if (!this.token) throw new GridError(401, "unauthorized", "log in (or pass a token) before connect()");
    if (this.playerId === null) await this.me();  // a client given a kept token learns who it is
    this._stopped = false;
    if (this.connected) return;
    const opened = new Promise((resolve, reject) => {
      const offOpen = this.on("open", () => { offOpen(); offClose(); resolve(); });
      const offClose = this.on("close", ev => {
        if (!ev.reconnecting) {
          offOpen(); offClose();
          reject(new GridError(ev.code, ev.ended ? "session_ended" : ev.code === REPLACED ? "replaced" : "closed",
                               ev.reason || "the connection closed"));
        }
      });
    });
    if (!this.socket && this._timer === null && !this._retrying) this._open();
    return opened;
  }

  _open() {
    this._timer = null;
    const url = (this.baseUrl || location.origin).replace(/^http/, "ws") + "/ws?token=" + encodeURIComponent(this.token);
    let ws;
    try { ws = this.socket = new WebSocket(url); } catch (err) {
      this._stop();
      return this._closed({code: 1006, reason: err.message, reconnecting: false, ended: false});
    }
    ws.onopen = () => {
      if (ws !== this.socket) return;
      this.connected = true;
      this.resumed = false;
      this._heard = Date.now();
      const attempt = this.attempt;
      this.attempt = 0;
      if (this.wanted) {  // answered at once, resumed or not; refused when the zone is gone
        this._resubscribing = this.wanted;
        this._send({type: "subscribe", zone_id: this.wanted});
      }
      if (this.heartbeat > 0) this._watch = setInterval(() => this._listen(ws), Math.max(100, this.heartbeat / 4));
      this._emit("open", {type: "open", reconnect: this._opened, attempt});
      this._opened = true;
    };
    ws.onmessage = ev => {
      if (ws !== this.socket) return;
      this._heard = Date.now();
      let m;
      try { m = JSON.parse(ev.data); } catch (err) { return; }  // the server sends JSON only
      if (m.type === "tick") this.tick = m;
      else if (m.type === "subscribed") {
        if (this.tick && this.tick.zone_id !== m.zone_id) this.tick = null;
        this.zoneId = m.zone_id;
        if (this._resubscribing === m.zone_id) this._resubscribing = null;
        if (m.resumed) { this.resumed = true; if (!this.wanted) this.wanted = m.zone_id; }
      } else if (m.type === "unsubscribed") { this.zoneId = null; this.tick = null; }
      else if (m.type === "error" && m.code === "zone_deleted") { this.zoneId = this.wanted = null; this.tick = null; }
      else if (m.type === "error" && m.code === "zone_not_found" && this._resubscribing) {
        if (this.wanted === this._resubscribing) this.wanted = this.zoneId;  // the zone is gone
        this._resubscribing = null;
      }
      this._emit(m.type, m);
      this._emit("message", m);
    };
    ws.onclose = ev => {
      if (ws !== this.socket) return;
      clearInterval(this._watch);
      this.socket = null;
      this.connected = false;
      this.zoneId = null;
      this._resubscribing = null;
      if (ev.code === SESSION_ENDED) return this._ended(ev.reason || "the session has ended");
      if (this._stopped || ev.code === REPLACED) {
        this._stop();
        return this._closed({code: ev.code, reason: ev.reason, reconnecting: false, ended: false});
      }
      this.attempt += 1;
      const delay = Math.min(this.backoff.max, this.backoff.first * 2 ** Math.min(this.attempt - 1, 20))
        * (0.75 + Math.random() / 2);
      this._timer = setTimeout(() => this._retry(), delay);
      this._closed({code: ev.code, reason: ev.reason, reconnecting: true, delay, attempt: this.attempt, ended: false});
    };
  }

  // A socket silent for `heartbeat` ms is pinged; silent as long again, it is given up for
  // dead (a half-open connection after a network change) and the client reconnects.
  _listen(ws) {
    const silent = Date.now() - this._heard;
    if (silent > 2 * this.heartbeat) {
      ws.onclose({code: 1006, reason: "the server stopped answering", wasClean: false});
      try { ws.close(); } catch (err) { /* already closing */ }
    } else if (silent > this.heartbeat) {
      this._send({type: "ping"});
    }
  }

  async _retry() {
    const generation = this._generation;
    this._timer = null;
    this._retrying = true;
    try { await this.me(); } catch (err) {
      if (err.status === 401 && generation === this._generation) { this._retrying = false; return this._ended("the session has ended"); }
    }
    this._retrying = false;
    if (this._stopped || this.socket) return;  // closed meanwhile (a connect() since waits for this attempt)
    this._open();
  }

  _ended(reason) {
    this._stop();
    this.token = null;
    this._closed({code: SESSION_ENDED, reason, reconnecting: false, ended: true});
  }

  // Stops reconnecting; true when the client was connected or connecting.
  _stop() {
    const running = !this._stopped;
    if (running) this._told = false;
    this._stopped = true;
    this._generation += 1;
    clearTimeout(this._timer);
    this._timer = null;
    return running;
  }

  _shut(code, reason, running) {
    const ws = this.socket;
    if (ws) {
      ws.close(code, reason);
      ws.onclose({code, reason: reason || "", wasClean: true});  // at once, not when the server answers
    } else if (running && !this._told) {  // between attempts: nothing to close, but whoever waits hears of it
      this._closed({code, reason: reason || "", reconnecting: false, ended: false});
    }
  }

  // Closes the connection for good (no reconnect); "close" follows.
  close() { const running = this._stop(); this.wanted = null; this._shut(1000, "closed by the client", running); }

  _send(msg) {
    if (!this.socket || this.socket.readyState !== 1) return false;
    this.socket.send(JSON.stringify(msg));
    return true;
  }

  // Joins a zone (leaving the current one); resolves with the "subscribed" answer, rejects on
  // zone_not_found or rate_limited (then the zone asked for is again the one the player is in).
  // While the client is (re)connecting it is asked for once the socket is open, and it is asked
  // for again after every reconnect the server did not resume.
  async subscribe(zoneId) {
    const id = uuidText(zoneId);
    this.wanted = id;
    try {
      return await this._ask({type: "subscribe", zone_id: id}, "subscribed", m => m.zone_id === id,
                             ["zone_not_found", "rate_limited"], true);
    } catch (err) {
      if (this.wanted === id && err.code !== "timeout") this.wanted = this.zoneId;
      throw err;
    }
  }

  unsubscribe() {
    this.wanted = null;
    return this._ask({type: "unsubscribe"}, "unsubscribed", () => true, ["rate_limited"]);
  }

  // Queues an intent for the zone's next tick: true when it was sent (false while not connected;
  // intents are never kept for a later connection: they would act on an older state).
  intent(data) { return this._send({type: "intent", data}); }

  // Resolves with the round trip in milliseconds.
  async ping() {
    const start = performance.now();
    await this._ask({type: "ping"}, "pong", () => true, []);
    return performance.now() - start;
  }

  // Sends msg; resolves with the first `answer` event that `matches`; rejects on an error of
  // one of `refusals` (a rate_limited about subscribes only), on a close for good, or after
  // timeoutMs. `whenOpen`: while (re)connecting, wait for the socket instead of rejecting.
  _ask(msg, answer, matches, refusals, whenOpen = false, timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      const done = (fn, value) => { clearTimeout(timer); offAnswer(); offError(); offClose(); fn(value); };
      const offAnswer = this.on(answer, m => { if (matches(m)) done(resolve, m); });
      const offError = this.on("error", m => {
        if (refusals.includes(m.code) && (m.code !== "rate_limited" || /subscribe/.test(m.message))) {
          done(reject, new GridError(0, m.code, m.message));
        }
      });
      const offClose = this.on("close", ev => {
        if (!(whenOpen && ev.reconnecting)) done(reject, new GridError(0, "closed", `the connection closed (${ev.code})`));
      });
      const timer = setTimeout(() => done(reject, new GridError(0, "timeout", `no "${answer}" within ${timeoutMs} ms`)), timeoutMs);
      if (!this._send(msg) && !(whenOpen && !this._stopped)) {
        done(reject, new GridError(0, "not_connected", "not connected: call connect() first"));
      }
    });
  }
}
"""

#: The page. Its inline script and style are allowed by their SHA-256 in the CSP header,
#: so nothing else can run or style it; the hashes are computed from this text at import.
PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gridserver</title>
<link rel="icon" href="data:,">
<style>
:root { color-scheme: light dark; --bg: #f3f4f7; --panel: #fff; --fg: #1c2230; --muted: #697186;
  --line: #d8dce5; --accent: #2f7ed8; --bad: #c62828; --ok: #2e7d32; --warn: #a86400; }
@media (prefers-color-scheme: dark) { :root { --bg: #13161b; --panel: #1c2028; --fg: #e3e6ed;
  --muted: #8d95a7; --line: #303644; --accent: #5aa0f0; --bad: #ef6c6c; --ok: #6cc070; --warn: #e0a040; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; background: var(--bg); color: var(--fg); }
header { display: flex; gap: 12px; align-items: center; padding: 8px 14px; background: var(--panel);
  border-bottom: 1px solid var(--line); }
header h1 { font-size: 16px; margin: 0; }
#status { margin-left: auto; cursor: default; }
.ok { color: var(--ok); } .warn { color: var(--warn); } .bad { color: var(--bad); } .muted { color: var(--muted); }
main { display: grid; grid-template-columns: 220px minmax(0, 1fr) 320px; gap: 12px; padding: 12px;
  height: calc(100vh - 44px); }
.side { display: flex; flex-direction: column; gap: 12px; min-height: 0; overflow: auto; }
.side > * { flex-shrink: 0; }
section, form, details { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 10px; }
section { overflow: auto; }
h2, summary { font-size: 12px; font-weight: 600; text-transform: uppercase; letter-spacing: .06em;
  color: var(--muted); margin: 0 0 8px; }
summary { cursor: pointer; margin: 0; }
details[open] > summary { margin-bottom: 8px; }
h3 { font-size: 12px; font-weight: 600; color: var(--muted); margin: 12px 0 4px; }
button { font: inherit; padding: 4px 10px; border: 1px solid var(--line); border-radius: 4px;
  background: var(--bg); color: var(--fg); cursor: pointer; }
button:hover { border-color: var(--accent); }
button.on { background: var(--accent); border-color: var(--accent); color: #fff; }
input { font: inherit; width: 100%; padding: 6px; margin-bottom: 8px; border: 1px solid var(--line);
  border-radius: 4px; background: var(--bg); color: var(--fg); }
#login { max-width: 340px; margin: 60px auto; }
#zones button { display: flex; width: 100%; justify-content: space-between; gap: 8px; text-align: left; margin-bottom: 4px; }
#zones .n { color: var(--muted); white-space: nowrap; }
#zones button.on .n { color: #fff; }
#stage { display: flex; flex-direction: column; }
#wrap { flex: 1; min-height: 0; display: flex; align-items: center; justify-content: center; margin-top: 8px; }
canvas { background: #0e1116; cursor: crosshair; }
pre { margin: 0; font-size: 12px; white-space: pre-wrap; word-break: break-all; }
table { border-collapse: collapse; font-size: 12px; width: 100%; }
th, td { text-align: left; padding: 1px 6px 1px 0; border-bottom: 1px solid var(--line); }
ul { margin: 0; padding-left: 18px; }
#errors div { color: var(--bad); font-size: 12px; }
[hidden] { display: none !important; }
</style>
</head>
<body>
<header><h1>gridserver</h1><span id="who" class="muted"></span><button id="logout" hidden>Log out</button>
<span id="status" class="muted">not connected</span></header>
<form id="login" hidden>
<h2>Log in or register</h2>
<input id="username" autocomplete="username" placeholder="username (3-32 of A-Z a-z 0-9 _ . -)" required>
<input id="password" type="password" autocomplete="current-password" placeholder="password" required>
<button id="do-login" type="submit">Log in</button> <button id="do-register" type="button">Register</button>
<p id="login-error" class="bad"></p>
</form>
<main id="app" hidden>
<div class="side">
<section><h2>Zones</h2><div id="zones"></div><button id="reload-zones">Refresh</button></section>
<section><h2>Keys</h2><p class="muted">Arrows or WASD send <code>{"move": "up|down|left|right"}</code>.
Click an entity to see it; hover to read its label.</p></section>
</div>
<section id="stage"><div><b id="zone-name">pick a zone</b> · tick <b id="tick">–</b> · <span id="since">–</span>
since the last tick · <span id="count">0</span> entities <span id="source" class="muted"></span></div>
<div id="wrap"><canvas id="grid" width="300" height="300"></canvas></div></section>
<div class="side">
<section><h2>Me</h2><div id="me"></div></section>
<details id="state-panel" open><summary>Game state</summary><div id="state" class="muted">no tick yet</div></details>
<section><h2>Entity</h2><pre id="entity" class="muted">click an entity on the grid</pre></section>
<details id="debug" open hidden><summary>Debug</summary>
<button id="pause">Pause</button> <button id="resume">Resume</button> <button id="step">Step</button>
<span id="paused" class="muted"></span>
<h3>Time line</h3><button id="back" title="the zone as it was one tick earlier">&#9664; Back</button>
<button id="forward" title="pause, then one more tick">Forward &#9654;</button>
<span id="timeline" class="muted">step the zone back and forth</span>
<pre id="inputs" class="muted"></pre>
<h3>Connected players</h3><ul id="connections"></ul></details>
<section><h2>Errors</h2><div id="errors"></div></section>
</div>
</main>
<script type="module">
import {GridClient} from "/client.js";
const $ = id => document.getElementById(id);
const client = new GridClient(location.origin, {token: sessionStorage.getItem("gridserver.token")});
const G = window.gridserver = {client, me: null, zones: [], zone: null, subscribed: null, resumed: false,
  tick: null, ticks: 0, lastTickAt: null, entities: [], view: null, extra: {}, source: null, connected: false,
  paused: null, selected: null, hovered: null, entityJson: null, connections: [], errors: [], scale: 0,
  labels: [], statusLog: [], timeline: null, zoneFailed: null};
G.avatar = () => G.entities.find(e => e.mine) || null;

function setStatus(text, cls) {
  $("status").textContent = text; $("status").className = cls || "muted";
  G.statusLog.push(text);
  if (G.statusLog.length > 50) G.statusLog.shift();
}
function showError(text) {
  G.errors.push(text);
  const div = document.createElement("div");
  div.textContent = new Date().toLocaleTimeString() + " " + text;
  $("errors").prepend(div);
  while ($("errors").children.length > 8) $("errors").lastChild.remove();
}

async function login(register) {
  const username = $("username").value, password = $("password").value;
  if (G.loggingIn) return;  // one login at a time (Enter and a click, Register then Log in)
  G.loggingIn = true;
  $("login-error").textContent = "";
  try {
    if (register) await client.register(username, password);
    await client.login(username, password);
    sessionStorage.setItem("gridserver.token", client.token);
    await start();
  } catch (e) { $("login-error").textContent = e.message; } finally { G.loggingIn = false; }
}

function stopTimers() { clearTimeout(G.retryTimer); clearInterval(G.debugTimer); clearInterval(G.zonesTimer); }

async function start() {
  stopTimers();
  const session = G.session = (G.session || 0) + 1;  // a logout meanwhile makes this start stale
  try { G.me = await client.me(); } catch (e) {
    if (session !== G.session) return;
    if (e.status === 401) return toLogin("Your session has ended: log in again.");
    setStatus("server unreachable (" + e.message + "), retrying…", "bad");
    G.retryTimer = setTimeout(start, 2000);
    return;
  }
  if (session !== G.session) return;
  $("login").hidden = true; $("app").hidden = false; $("logout").hidden = false; $("debug").hidden = !G.me.is_debug;
  $("who").textContent = G.me.username + (G.me.is_debug ? " (debug)" : "");
  await loadZones();
  if (session !== G.session) return;
  G.zonesTimer = setInterval(loadZones, 3000);  // live player counts
  connect();
  if (G.me.is_debug) { refreshDebug(); G.debugTimer = setInterval(refreshDebug, 3000); }
}

function toLogin(message) {
  stopTimers();
  G.session = (G.session || 0) + 1;
  client.close();
  client.token = null;
  client.playerId = null;
  Object.assign(G, {me: null, connected: false, zone: null, subscribed: null, resumed: false, tick: null, ticks: 0,
    lastTickAt: null, entities: [], view: null, extra: {}, source: null, selected: null, hovered: null,
    entityJson: null, connections: [], paused: null, timeline: null, zoneFailed: null});
  for (const id of ["zones", "me", "errors", "connections", "inputs", "paused"]) $(id).textContent = "";
  $("entity").textContent = "click an entity on the grid";
  $("timeline").textContent = "step the zone back and forth";
  $("zone-name").textContent = "pick a zone";
  showState(); draw();
  sessionStorage.removeItem("gridserver.token");
  $("app").hidden = true; $("logout").hidden = true; $("login").hidden = false; $("who").textContent = "";
  $("login-error").textContent = message || "";
  setStatus("not connected");
}

async function loadZones() {
  try { G.zones = await client.zones(); } catch (e) {
    if (e.status === 401) return;  // the socket's close says so
    return showError("zones: " + e.message);
  }
  const box = $("zones"), have = new Map([...box.children].map(b => [b.dataset.zone, b]));
  if (!G.zones.length) box.textContent = "no zones yet";
  else if (box.firstChild && box.firstChild.nodeType === Node.TEXT_NODE) box.textContent = "";
  G.zones.forEach((z, i) => {
    let b = have.get(z.id);
    if (!b) {
      b = document.createElement("button");
      b.dataset.zone = z.id;
      b.append(document.createElement("span"), document.createElement("span"));
      b.lastChild.className = "n";
      b.addEventListener("click", () => pick(G.zones.find(y => y.id === z.id) || z, true));
    }
    have.delete(z.id);
    b.firstChild.textContent = z.name + " · " + z.width + "×" + z.height;
    b.lastChild.textContent = z.subscriber_count + (z.subscriber_count === 1 ? " player" : " players");
    b.className = G.zone && G.zone.id === z.id ? "on" : "";
    if (box.children[i] !== b) box.insertBefore(b, box.children[i] || null);
  });
  for (const gone of have.values()) gone.remove();
  const inside = G.subscribed && G.zones.find(z => z.id === G.subscribed);
  if (inside && (!G.zone || G.zone.id !== inside.id)) pick(inside, false);  // resumed into a zone not known before
}

function pick(z, subscribe) {
  if (!G.zone || G.zone.id !== z.id) {
    Object.assign(G, {entities: [], view: null, extra: {}, tick: null, lastTickAt: null, selected: null, source: null});
    showState();
  }
  G.zone = z;
  for (const b of $("zones").children) b.className = b.dataset.zone === z.id ? "on" : "";
  $("zone-name").textContent = z.name;
  if (subscribe) client.subscribe(z.id).then(loadZones, e => { showError("subscribe: " + e.message); back(); });
  draw();
}

function back() {  // after a refused subscribe: show the zone the player is in, if any
  const z = G.zones.find(z => z.id === client.zoneId);
  if (z) { pick(z, false); return; }
  Object.assign(G, {zone: null, entities: [], view: null, extra: {}, tick: null, lastTickAt: null, selected: null});
  for (const b of $("zones").children) b.className = "";
  $("zone-name").textContent = "pick a zone";
  showState(); draw();
}

function connect() {
  setStatus("connecting…", "warn");
  client.connect().catch(() => {});  // what happens is told by the "open" and "close" events
}

client.on("open", () => { G.connected = true; setStatus("connected", "ok"); });  // the client subscribes again
client.on("close", ev => {
  G.connected = false; G.subscribed = null; G.resumed = false;
  if (ev.ended) return toLogin("Session ended (logged out or expired): log in again.");
  if (ev.code === 4000) return setStatus("replaced by a newer connection (another tab?): click to reconnect", "bad");
  if (ev.reconnecting) setStatus("reconnecting… in " + (ev.delay / 1000).toFixed(1) + " s (attempt " + ev.attempt + ")", "warn");
});
client.on("tick", m => {
  if (!G.zone || m.zone_id !== G.zone.id) return;
  G.tick = m.tick_number; G.ticks += 1; G.lastTickAt = performance.now();
  G.view = viewOf(m.state);
  G.extra = extraOf(m.state);
  showState();
  const list = entitiesOf(m.state);
  if (list) { G.entities = list; G.source = "tick state"; draw(); }
  else if (G.me && G.me.is_debug) debugState();
  else { G.entities = []; G.source = "no entities in the tick state"; draw(); }
});
client.on("subscribed", m => {
  G.subscribed = m.zone_id; G.zoneFailed = null;  // the server says at once if it is failing
  if (m.resumed) G.resumed = true;  // the answer to our own subscribe follows it
  const z = G.zones.find(z => z.id === m.zone_id);
  if (z && (!G.zone || G.zone.id !== z.id)) pick(z, false);
  if (m.resumed) setStatus("connected (resumed " + (z ? z.name : m.zone_id) + ")", "ok");
  if (G.me && G.me.is_debug) refreshDebug();
});
client.on("unsubscribed", () => { G.subscribed = null; });
client.on("zone_recovered", () => { G.zoneFailed = null; draw(); });
client.on("module_reloaded", m => setStatus("connected (game reloaded: version " + m.version + ")", "ok"));
client.on("error", m => {
  if (m.code === "zone_failed") { G.zoneFailed = {zone_id: m.zone_id, message: m.message}; draw(); return; }
  showError(m.code + ": " + m.message);
  if (m.code === "zone_deleted") { G.subscribed = null; G.zoneFailed = null; back(); loadZones(); }
  else if (m.code === "zone_not_found" && G.zone && client.wanted !== G.zone.id) back();  // gone while away
});

function entitiesOf(state) {
  const list = state && Array.isArray(state.entities) ? state.entities : null;
  if (!list) return null;
  const out = [];
  for (const e of list) {
    const n = normalize(e);
    if (!n) return null;
    out.push(n);
  }
  return out;
}

// The optional "view" of a tick state: the cells this player sees, a rectangle {x, y, w, h}
// or a list of them; null when the state has none (everything is seen).
function viewOf(state) {
  const v = state && typeof state === "object" ? state.view : undefined;
  if (v === undefined || v === null) return null;
  const rects = Array.isArray(v) ? v : [v];
  return rects.filter(r => r && [r.x, r.y, r.w, r.h].every(Number.isFinite));
}

function extraOf(state) {  // the tick state but its entities and view: scores, settings...
  if (!state || typeof state !== "object" || Array.isArray(state)) return {value: state};
  const out = {};
  for (const [k, v] of Object.entries(state)) if (k !== "view" && !(k === "entities" && Array.isArray(v))) out[k] = v;
  return out;
}

function showState() {
  const box = $("state"), keys = Object.keys(G.extra);
  box.textContent = "";
  box.className = keys.length ? "" : "muted";
  if (!keys.length) { box.textContent = G.tick == null ? "no tick yet" : "nothing but entities"; return; }
  for (const k of keys) {
    const v = G.extra[k], h = document.createElement("h3");
    h.textContent = k;
    box.append(h, table(v) || Object.assign(document.createElement("pre"), {textContent: JSON.stringify(v, null, 1).slice(0, 4000)}));
  }
}

function table(rows) {  // a list of flat objects (a score table) as a table; null otherwise
  if (!Array.isArray(rows) || !rows.length || rows.length > 200) return null;
  const cols = [];
  for (const r of rows) {
    if (!r || typeof r !== "object" || Array.isArray(r)) return null;
    for (const [k, v] of Object.entries(r)) {
      if (v !== null && typeof v === "object") return null;
      if (!cols.includes(k)) cols.push(k);
    }
  }
  const t = document.createElement("table"), head = t.insertRow();
  for (const c of cols) head.append(Object.assign(document.createElement("th"), {textContent: c}));
  for (const r of rows) { const tr = t.insertRow(); for (const c of cols) tr.insertCell().textContent = r[c] ?? ""; }
  return t;
}

function normalize(e) {
  if (!e || typeof e !== "object" || !Number.isFinite(e.x) || !Number.isFinite(e.y)) return null;
  const meta = e.metadata && typeof e.metadata === "object" ? e.metadata : {};
  const get = k => (e[k] !== undefined && e[k] !== null ? e[k] : meta[k]);
  const pid = get("player_id"), label = get("label") ?? get("name");
  return {id: e.id == null ? null : String(e.id), x: e.x, y: e.y, w: Number(e.w ?? e.width) || 0,
    h: Number(e.h ?? e.height) || 0, kind: String(get("kind") ?? ""), color: get("color"),
    label: label == null ? "" : String(label), player_id: pid == null ? null : String(pid),
    mine: pid != null && G.me != null && String(pid) === G.me.id, data: e};
}

async function debugState() {
  if (G.loadingState || !G.zone) return;
  G.loadingState = true;
  try {
    const s = await client.request("GET", "/api/debug/zones/" + G.zone.id + "/state");
    G.entities = s.entities.map(normalize).filter(Boolean); G.source = "debug state"; draw();
  } catch (e) { showError("debug state: " + e.message); } finally { G.loadingState = false; }
}

function colorOf(e) {
  if (typeof e.color === "string" && e.color) return e.color;
  let h = 7;
  for (const c of e.kind) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return "hsl(" + (h % 360) + ", 65%, 55%)";
}
const isPoint = e => e.w <= 0 && e.h <= 0;
const SHORT = 8;  // characters of a label drawn for an entity that is neither yours, selected nor hovered
const shorten = t => t.length > SHORT ? t.slice(0, SHORT - 1) + "…" : t;

function draw() {
  const c = $("grid"), ctx = c.getContext("2d"), z = G.zone, wrap = $("wrap");
  const W = Math.max(120, wrap.clientWidth - 4), H = Math.max(120, wrap.clientHeight - 4);
  const s = G.scale = z ? Math.min(W / z.width, H / z.height) : 0;
  const cw = z ? Math.max(1, Math.floor(z.width * s)) : W, ch = z ? Math.max(1, Math.floor(z.height * s)) : H;
  const dpr = window.devicePixelRatio || 1;
  if (c.width !== Math.round(cw * dpr) || c.height !== Math.round(ch * dpr)) {
    c.width = Math.round(cw * dpr); c.height = Math.round(ch * dpr);
    c.style.width = cw + "px"; c.style.height = ch + "px";
  }
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#0e1116"; ctx.fillRect(0, 0, cw, ch);
  $("count").textContent = G.entities.length;
  $("source").textContent = G.source ? "(" + G.source + ")" : "";
  G.labels = [];
  if (!z) return;
  if (s >= 6) {
    ctx.strokeStyle = "#1d232d"; ctx.lineWidth = 1; ctx.beginPath();
    for (let x = 1; x < z.width; x++) { ctx.moveTo(Math.round(x * s) + .5, 0); ctx.lineTo(Math.round(x * s) + .5, ch); }
    for (let y = 1; y < z.height; y++) { ctx.moveTo(0, Math.round(y * s) + .5); ctx.lineTo(cw, Math.round(y * s) + .5); }
    ctx.stroke();
  }
  const order = G.entities.slice().sort((a, b) => isPoint(a) - isPoint(b) || b.w * b.h - a.w * a.h || a.mine - b.mine);
  for (const e of order) {
    ctx.fillStyle = colorOf(e);
    if (isPoint(e)) {  // a 0x0 entity: a diamond in the cell at (x, y)
      const cx = (e.x + .5) * s, cy = (e.y + .5) * s, r = Math.max(2.5, s * 0.3);
      ctx.beginPath(); ctx.moveTo(cx, cy - r); ctx.lineTo(cx + r, cy); ctx.lineTo(cx, cy + r); ctx.lineTo(cx - r, cy);
      ctx.closePath(); ctx.fill();
    } else {
      ctx.fillRect(e.x * s, e.y * s, Math.max(1, e.w * s), Math.max(1, e.h * s));
    }
    if (e.mine || e.id === G.selected) {
      const pad = isPoint(e) ? Math.max(3, s * 0.4) : 0, x0 = isPoint(e) ? (e.x + .5) * s - pad : e.x * s;
      const y0 = isPoint(e) ? (e.y + .5) * s - pad : e.y * s;
      ctx.lineWidth = 2; ctx.setLineDash(e.mine ? [] : [4, 3]);
      ctx.strokeStyle = e.mine ? "#ffffff" : "#ff4f9a";
      ctx.strokeRect(x0 - 2, y0 - 2, (isPoint(e) ? 2 * pad : Math.max(1, e.w * s)) + 4, (isPoint(e) ? 2 * pad : Math.max(1, e.h * s)) + 4);
      ctx.setLineDash([]);
    }
  }
  if (G.view) fog(ctx, s, cw, ch, dpr);
  labels(ctx, order, s, cw, ch);
  if (G.zoneFailed && G.zoneFailed.zone_id === z.id) failedBanner(ctx, cw, ch);
  const me = G.avatar();
  $("me").textContent = (G.me ? G.me.username : "") + (me ? " at (" + me.x + ", " + me.y + ")" +
    (me.data.score !== undefined ? ", score " + me.data.score : "") : z ? ", no avatar in this zone" : "");
}

// Cells outside the view are dimmed: what is there is not seen (it may be there all the same).
function fog(ctx, s, cw, ch, dpr) {
  const shade = G.shade || (G.shade = document.createElement("canvas"));
  shade.width = Math.round(cw * dpr); shade.height = Math.round(ch * dpr);
  const sc = shade.getContext("2d");
  sc.setTransform(dpr, 0, 0, dpr, 0, 0);
  sc.fillStyle = "rgba(0, 0, 0, 0.6)"; sc.fillRect(0, 0, cw, ch);
  for (const r of G.view) sc.clearRect(r.x * s, r.y * s, r.w * s, r.h * s);
  ctx.save(); ctx.setTransform(1, 0, 0, 1, 0, 0); ctx.drawImage(shade, 0, 0); ctx.restore();
}

// Labels never overlap: yours first, then the selected and the hovered entity's (in full),
// then the others' (shortened) wherever there is room above or below them.
function labels(ctx, order, s, cw, ch) {
  const fs = Math.max(10, Math.min(13, s * 0.6)), rank = e => e.mine ? 0 : e.id === G.selected ? 1 : e.id === G.hovered ? 2 : 3;
  ctx.font = fs + "px system-ui, sans-serif";
  ctx.textAlign = "center"; ctx.textBaseline = "middle";
  const todo = order.filter(e => e.label && (rank(e) < 3 || s >= 10)).sort((a, b) => rank(a) - rank(b));
  for (const e of todo) {
    const text = rank(e) < 3 ? e.label : shorten(e.label), w = ctx.measureText(text).width + 6, h = fs + 4;
    const mid = (e.x + Math.max(e.w, 1) / 2) * s, above = e.y * s - h - 1, below = (e.y + Math.max(e.h, 1)) * s + 1;
    // above or below the entity; yours, the selected and the hovered one also slide sideways
    // and one row further out before they give up
    const ys = rank(e) < 3 ? [above, below, above - h, below + h] : [above, below];
    const shifts = rank(e) < 3 ? [0, -w / 2, w / 2, -w, w] : [0];
    const spots = ys.flatMap(y => shifts.map(dx => [Math.max(0, Math.min(cw - w, mid - w / 2 + dx)), y]));
    for (const [x, y] of spots) {
      const box = {x, y, w, h, text, id: e.id};
      if (y < 0 || y + h > ch || G.labels.some(b => b.x < x + w && x < b.x + b.w && b.y < y + h && y < b.y + b.h)) continue;
      G.labels.push(box);
      ctx.fillStyle = "rgba(14, 17, 22, 0.75)"; ctx.fillRect(x, y, w, h);
      ctx.fillStyle = e.mine ? "#ffffff" : rank(e) < 3 ? "#ffd0e4" : "#c9d1e0";
      ctx.fillText(text, x + w / 2, y + h / 2 + 0.5);
      break;
    }
  }
}

function failedBanner(ctx, cw, ch) {  // over the grid while the zone's ticks fail
  ctx.fillStyle = "rgba(120, 16, 24, 0.85)"; ctx.fillRect(0, 0, cw, ch);
  ctx.fillStyle = "#ffffff"; ctx.textAlign = "left"; ctx.textBaseline = "top";
  ctx.font = "bold 15px system-ui, sans-serif";
  ctx.fillText("This zone's game is failing", 12, 12);
  ctx.font = "12px ui-monospace, monospace";
  const lines = [], width = cw - 24;
  for (const para of G.zoneFailed.message.split("\n")) {
    let line = "";
    for (const word of para.split(" ")) {
      const next = line ? line + " " + word : word;
      if (ctx.measureText(next).width > width && line) { lines.push(line); line = word; } else line = next;
    }
    lines.push(line);
  }
  lines.slice(0, Math.max(1, Math.floor((ch - 44) / 16))).forEach((l, i) => ctx.fillText(l, 12, 38 + i * 16));
}

function hit(ev) {
  const r = $("grid").getBoundingClientRect();
  const x = (ev.clientX - r.left) / G.scale, y = (ev.clientY - r.top) / G.scale;
  return G.entities.filter(e => isPoint(e) ? Math.abs(x - e.x - .5) + Math.abs(y - e.y - .5) <= .6
    : x >= e.x && x < e.x + e.w && y >= e.y && y < e.y + e.h)
    .sort((a, b) => (isPoint(b) - isPoint(a)) || a.w * a.h - b.w * b.h)[0];
}

async function inspect(e) {
  G.selected = e ? e.id : null; G.entityJson = null; draw();
  if (!e) { $("entity").textContent = "nothing there"; return; }
  if (!(G.me.is_debug && e.id)) { $("entity").textContent = JSON.stringify(e.data, null, 2); return; }
  try {
    G.entityJson = await client.request("GET", "/api/debug/entities/" + encodeURIComponent(e.id));
    $("entity").textContent = JSON.stringify(G.entityJson, null, 2);
  } catch (err) { $("entity").textContent = JSON.stringify(e.data, null, 2); showError("entity: " + err.message); }
}

async function refreshDebug() {
  try {
    const [health, conns] = await Promise.all([client.request("GET", "/healthz").catch(() => null),
                                               client.request("GET", "/api/debug/connections")]);
    if (health) { G.paused = health.paused; showPaused(); }
    G.connections = conns.connections;
    const ul = $("connections");
    ul.textContent = "";
    for (const c of G.connections) {
      const z = G.zones.find(z => z.id === c.zone_id), li = document.createElement("li");
      li.textContent = c.username + (c.zone_id ? " in " + (z ? z.name : c.zone_id.slice(0, 8)) : " (no zone)");
      ul.append(li);
    }
  } catch (e) { showError("connections: " + e.message); }
}

function showPaused() {  // the tick number is the header's: one source, the zone's tick messages
  $("paused").textContent = G.paused == null ? "" : G.paused ? "paused" : "running";
  $("pause").className = G.paused ? "on" : "";
}

async function timeline(dir) {
  if (!G.subscribed) return showError("time line: pick a zone first");
  try {
    let n;
    if (dir < 0) {
      n = (await client.request("POST", "/api/debug/zones/" + G.subscribed + "/rewind", {tick_number: G.tick - 1})).tick_number;
    } else {
      if (!G.paused) await client.request("POST", "/api/debug/tick/pause");
      await client.request("POST", "/api/debug/tick/step");
      n = (await client.request("GET", "/api/debug/zones/" + G.subscribed + "/state")).zone_tick_number;
    }
    G.paused = true; showPaused();
    const h = await client.request("GET", "/api/debug/zones/" + G.subscribed + "/history?from=" + n + "&to=" + n);
    const t = h.ticks.find(t => t.tick_number === n);
    const who = id => { const c = G.connections.find(c => c.player_id === id); return c ? c.username : id.slice(0, 8); };
    G.timeline = {tick: n, inputs: t || null};
    $("timeline").textContent = "tick " + n + (dir < 0 ? " (rewound)" : "");
    $("inputs").textContent = !t ? "no inputs journaled for this tick" :
      (t.intents.map(i => who(i.player_id) + " #" + i.seq + " " + JSON.stringify(i.data)).join("\n") +
       (t.events.length ? "\n" + t.events.map(e => e[0] + " " + who(e[1])).join("\n") : "")) || "no intents, no joins or leaves";
  } catch (e) { showError("time line: " + e.message); }
}

async function control(what) {
  try {
    const r = await client.request("POST", "/api/debug/tick/" + what);
    G.paused = "paused" in r ? r.paused : true;
    showPaused();
  } catch (e) { showError(what + ": " + e.message); }
}

const KEYS = {ArrowUp: "up", KeyW: "up", ArrowDown: "down", KeyS: "down",
              ArrowLeft: "left", KeyA: "left", ArrowRight: "right", KeyD: "right"};
document.addEventListener("keydown", ev => {
  const dir = KEYS[ev.code];
  if (!dir || !G.me || ev.target.tagName === "INPUT" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  ev.preventDefault();
  if (!G.connected) return showError("not connected: the move was not sent");
  if (!G.subscribed) return showError("pick a zone first: moves go to the zone you are in");
  if (!client.intent({move: dir})) showError("not connected: the move was not sent");
});
$("login").addEventListener("submit", ev => { ev.preventDefault(); login(false); });
$("do-register").addEventListener("click", () => login(true));
$("logout").addEventListener("click", async () => {
  try { await client.logout(); } catch (e) {
    showError("logout: " + e.message + " (the session still lives: try again)");
    connect();
    return;
  }
  toLogin("Logged out.");
});
$("reload-zones").addEventListener("click", loadZones);
$("status").addEventListener("click", () => { if (G.me && !G.connected && !client.socket) connect(); });
$("grid").addEventListener("click", ev => { if (G.zone && G.scale) inspect(hit(ev)); });
$("grid").addEventListener("mousemove", ev => {
  const e = G.zone && G.scale ? hit(ev) : null, id = e ? e.id : null;
  $("grid").title = e && e.label ? e.label : "";
  if (id !== G.hovered) { G.hovered = id; draw(); }
});
$("grid").addEventListener("mouseleave", () => { if (G.hovered) { G.hovered = null; draw(); } });
for (const what of ["pause", "resume", "step"]) $(what).addEventListener("click", () => control(what));
$("back").addEventListener("click", () => timeline(-1));
$("forward").addEventListener("click", () => timeline(1));
window.addEventListener("resize", draw);
setInterval(() => {
  $("tick").textContent = G.tick ?? "–";
  $("since").textContent = G.lastTickAt == null ? "–" : ((performance.now() - G.lastTickAt) / 1000).toFixed(1) + " s";
}, 100);
if (client.token) start(); else toLogin("");
</script>
</body>
</html>
"""


def _csp_source(tag: str) -> str:
    """The CSP source that allows exactly the page's inline ``<tag>`` block: its SHA-256."""
    match = re.search(rf"<{tag}[^>]*>(.*?)</{tag}>", PAGE_HTML, re.S)
    if match is None:  # only an edit of the page can cause this
        raise RuntimeError(f"the page has no <{tag}> block")
    return "'sha256-" + base64.b64encode(hashlib.sha256(match.group(1).encode("utf-8")).digest()).decode() + "'"


_PAGE_CSP = ("default-src 'none'; script-src 'self' {script}; style-src {style}; img-src data:; connect-src 'self'{ws}; "
             "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_PAGE_CSP = _PAGE_CSP.replace("{script}", _csp_source("script")).replace("{style}", _csp_source("style"))
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


async def client_js(request: web.Request) -> web.Response:
    """``GET /client.js``: ``GridClient``, for this page and for any page that imports it
    (``Access-Control-Allow-Origin: *``: it is the same public file for everyone)."""
    return web.Response(text=CLIENT_JS, content_type="text/javascript", charset="utf-8", headers={
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache", "Access-Control-Allow-Origin": "*"})


def _game_path(folder: str, name: str) -> str | None:
    """The file ``name`` names in ``folder`` (``index.html`` for a folder), or None: nothing
    outside ``folder``, no hidden files (``.git``, ``.env``), no links out of it. It touches
    the disk: run it off the loop."""
    root = os.path.realpath(folder)
    parts = name.split("/")
    if any(p.startswith(".") for p in parts) or "\\" in name or "\0" in name:
        return None
    path = os.path.realpath(os.path.join(root, *[p for p in parts if p]))
    if os.path.isdir(path):
        path = os.path.join(path, "index.html")
    if os.path.commonpath([path, root]) != root or not os.path.isfile(path):
        return None
    return path


async def game_file(request: web.Request) -> web.StreamResponse:
    """``GET /game/{path}``: a file of ``[server] static_dir``, the game's own page, scripts
    and images, so that a browser game is served from the server it talks to (one origin:
    no CORS) and imports ``/client.js``. Its files bring their own security headers, if any."""
    srv = request.app[SERVER]
    static = srv.cfg.get("server", "static_dir")
    if not static:
        raise GridError("not_found", "No game files are served here ([server] static_dir is not set).")
    name = request.match_info["path"]
    path = await asyncio.get_running_loop().run_in_executor(None, _game_path, static, name)
    if path is None:
        raise GridError("not_found", f"The game's files have no {name[:200]!r}.")
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if path.endswith((".js", ".mjs")):  # RFC 9239; some systems' mimetypes say application/javascript
        headers["Content-Type"] = "text/javascript"
    return web.FileResponse(path, headers=headers)


async def index(request: web.Request) -> web.Response:
    """``GET /``: the page, with a Content-Security-Policy that allows only what it contains.

    Scripts and styles run only when their hash matches the page's own blocks, or come from
    this server (``/client.js``): no inline handlers, nothing from other origins; fetches and
    the WebSocket go only to this server. ``ws://`` and ``wss://`` of the request's host are named as well as ``'self'``
    for browsers that do not yet count WebSocket URLs as ``'self'``.
    """
    host = request.headers.get("Host", "")
    ws = f" ws://{host} wss://{host}" if _HOST_RE.fullmatch(host) else ""
    return web.Response(text=PAGE_HTML, content_type="text/html", charset="utf-8", headers={
        "Content-Security-Policy": _PAGE_CSP.replace("{ws}", ws),
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})


if __name__ == "__main__":
    # One module object whether run as a script or imported by a game module.
    sys.modules.setdefault("gridserver", sys.modules["__main__"])
    sys.exit(main())
