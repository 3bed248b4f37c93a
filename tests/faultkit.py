"""Tools for attacking a gridserver from outside: a real server process, raw HTTP and raw
WebSocket clients that send what well-behaved client libraries refuse to, and the figures
the fault suite measures.

Everything here talks to 127.0.0.1 only and bounds every wait. Every ``timeout`` taken here
is in seconds on an ordinary machine and is scaled (``helpers.scaled``) where it is used.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

import aiohttp
from aiohttp import WSMsgType

from helpers import ROOT, scaled, wait_for

HOST = "127.0.0.1"

#: Figures measured by the fault suite, printed at the end of the run (see conftest).
FIGURES: dict[str, object] = {}


def figure(name: str, value: object) -> None:
    """Record one measured figure (shown in the terminal summary) and print it."""
    FIGURES[name] = value
    print(f"[figure] {name} = {value}")


def add_figure(name: str, amount: int) -> None:
    FIGURES[name] = int(FIGURES.get(name, 0)) + amount


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# ---------------------------------------------------------------------------------------------
# A real server process
# ---------------------------------------------------------------------------------------------


class ServerProcess:
    """``python gridserver.py`` configured only through ``GRIDSERVER_*`` environment variables.

    ``settings`` maps ``SECTION_KEY`` (e.g. ``TICK_INTERVAL``) to a value. The process runs in
    its own session so ``kill()`` reaches it alone; its output goes to ``log_path``.
    ``rlimit_nofile`` (soft, hard), when given, is the process's open files limit.
    """

    def __init__(self, tmp_path, dsn: str, game: str = "tests.fault_games:Counter",
                 settings: dict | None = None, game_settings: dict | None = None, port: int | None = None,
                 rlimit_nofile: tuple[int, int] | None = None):
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDSERVER_")}
        env.update({
            "GRIDSERVER_DATABASE_DSN": dsn,
            "GRIDSERVER_SERVER_PORT": str(self.port),
            "GRIDSERVER_SERVER_DEBUG": "true",
            "GRIDSERVER_AUTH_BCRYPT_ROUNDS": "4",
            "GRIDSERVER_TICK_INTERVAL": "0.05",
            "GRIDSERVER_PERSISTENCE_INTERVAL": "0.2",
            "GRIDSERVER_WEBSOCKET_HEARTBEAT": "5",
            "GRIDSERVER_DEBUG_LOG_LEVEL": "info",
            "GRIDSERVER_GAME_MODULE": game,
        })
        for key, value in (settings or {}).items():
            env["GRIDSERVER_" + key.upper()] = str(value)
        prefix = "GRIDSERVER_" + "".join(c if c.isalnum() else "_" for c in game).upper() + "_"
        for key, value in (game_settings or {}).items():
            env[prefix + key.upper()] = str(value)
        self.env = env
        self.log_path = str(tmp_path / f"server-{self.port}-{uuid.uuid4().hex[:6]}.log")
        self._log = open(self.log_path, "wb")
        preexec = None
        if rlimit_nofile is not None:
            def preexec() -> None:
                resource.setrlimit(resource.RLIMIT_NOFILE, rlimit_nofile)
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "gridserver.py")], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=preexec)
        self.pid = self.proc.pid

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        limit = scaled(timeout)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                async with http.get(self.url + "/healthz", timeout=aiohttp.ClientTimeout(total=scaled(2))) as r:
                    if r.status in (200, 503):
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"server did not answer /healthz within {limit:g} s:\n{self.log_text()[-3000:]}")

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        limit = scaled(timeout)
        deadline = time.monotonic() + limit
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"server still running {limit:g} s after the signal")
            await asyncio.sleep(0.02)
        self._log.close()
        return self.proc.returncode

    def stop(self) -> None:
        """Kill the process group if anything is left (for ``finally`` blocks)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(scaled(10))
        if not self._log.closed:
            self._log.close()

    # -- what the process uses, read from /proc --------------------------------------------
    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def tcp_sockets(self) -> int:
        """Open sockets of the process (listening, clients, database)."""
        n = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                if os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("socket:"):
                    n += 1
            except OSError:
                pass
        return n

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def start(processes: list, *args, **kwargs) -> ServerProcess:
    """A ``ServerProcess`` that the ``processes`` fixture stops at the end of the test."""
    proc = ServerProcess(*args, **kwargs)
    processes.append(proc)
    return proc


class Client:
    """An HTTP client for one server: JSON in, (status, JSON-or-text) out, every call bounded."""

    def __init__(self, url: str, http: aiohttp.ClientSession):
        self.url = url
        self.http = http

    async def call(self, method: str, path: str, token: str | None = None, json_body=None,
                   timeout: float = 20.0) -> tuple[int, object]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.url + path, json=json_body, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=scaled(timeout))) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text) if text else None
            except ValueError:
                return r.status, text

    async def player(self, name: str | None = None, password: str = "correct horse") -> dict:
        name = name or "p_" + uuid.uuid4().hex[:10]
        status, body = await self.call("POST", "/api/auth/register", json_body={"username": name, "password": password})
        assert status == 201, (status, body)
        return await self.login(name, password)

    async def login(self, name: str, password: str = "correct horse") -> dict:
        status, body = await self.call("POST", "/api/auth/login", json_body={"username": name, "password": password})
        assert status == 200, (status, body)
        return {"username": name, "password": password, "token": body["token"], "id": body["player_id"]}

    async def metrics(self) -> dict[str, float]:
        async with self.http.get(self.url + "/metrics", timeout=aiohttp.ClientTimeout(total=scaled(10))) as r:
            assert r.status == 200
            return parse_metrics(await r.text())

    async def tick_number(self) -> int:
        return int((await self.metrics())["gridserver_tick_number"])

    async def zones(self, token: str) -> dict[str, dict]:
        status, body = await self.call("GET", "/api/zones", token)
        assert status == 200, body
        return {z["name"]: z for z in body["zones"]}

    def ws_url(self, token: str) -> str:
        return self.url.replace("http://", "ws://") + f"/ws?token={token}"


class TickReader:
    """A well-behaved player subscribed to one zone: records the tick numbers it gets and
    every other message."""

    def __init__(self, http: aiohttp.ClientSession, client: Client, token: str, zone_id: str):
        self.http, self.client, self.token, self.zone_id = http, client, token, zone_id
        self.numbers: list[int] = []
        self.other: list = []

    async def start(self) -> "TickReader":
        self.ws = await self.http.ws_connect(self.client.ws_url(self.token), heartbeat=None)
        await self.ws.send_json({"type": "subscribe", "zone_id": self.zone_id})
        self.task = asyncio.ensure_future(self._read())
        await wait_for(lambda: len(self.numbers) >= 3, timeout=10, what="the reader's first ticks")
        return self

    async def _read(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg.type != WSMsgType.TEXT:
                self.other.append((msg.type, msg.data))
                return
            m = json.loads(msg.data)
            if m["type"] == "tick":
                self.numbers.append(m["tick_number"])
            elif m["type"] != "subscribed":
                self.other.append(m)

    async def new_ticks(self, n: int, timeout: float = 10.0) -> list[int]:
        """Wait for ``n`` ticks after now; the tick numbers received meanwhile."""
        start = len(self.numbers)
        await wait_for(lambda: len(self.numbers) >= start + n, timeout=timeout, what=f"{n} more ticks")
        return self.numbers[start:]

    def gaps(self, since: int = 0) -> list[tuple[int, int]]:
        n = [t for t in self.numbers if t >= since]
        return [(a, b) for a, b in zip(n, n[1:]) if b != a + 1]

    def assert_unaffected(self) -> None:
        """Every tick arrived, nothing else did, and the socket is still open."""
        assert not self.gaps(), f"the reader missed ticks: {self.gaps()[:5]}"
        assert not self.other, f"the reader got {self.other[:3]}"
        assert not self.task.done()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.ws.close()



class TickWatch:
    """Counts the server's ticks over a span (from /metrics), to show the tick kept time."""

    def __init__(self, client: Client, interval: float):
        self.client, self.interval = client, interval

    async def __aenter__(self) -> "TickWatch":
        self.n0, self.t0 = await self.client.tick_number(), time.monotonic()
        return self

    async def __aexit__(self, *exc) -> None:
        self.n1, self.t1 = await self.client.tick_number(), time.monotonic()

    @property
    def ticks(self) -> int:
        return self.n1 - self.n0

    @property
    def expected(self) -> float:
        return (self.t1 - self.t0) / self.interval

    def assert_kept_time(self, what: str) -> None:
        # half the ticks due, counting whole ticks only: a span shorter than two intervals may
        # fall between two ticks
        assert self.ticks >= math.floor(self.expected / 2), (
            f"only {self.ticks} ticks during {what} ({self.t1 - self.t0:.2f} s, ~{self.expected:.0f} due)")


# ---------------------------------------------------------------------------------------------
# A raw HTTP/1.1 client (blocking; for the fuzzer)
# ---------------------------------------------------------------------------------------------


class HttpAnswer:
    def __init__(self, status: int | None, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self) -> str:
        return f"<{self.status} {self.headers.get('content-type')} {self.body[:300]!r}>"


def raw_http(port: int, request: bytes, timeout: float = 15.0) -> HttpAnswer:
    """Send ``request`` as is, read one response (the server is asked to close after it).

    Raises ``TimeoutError`` when the server neither answers nor closes within ``timeout``
    (scaled): that is a hang. A connection closed without any answer gives status None.
    """
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer (and close) before it has read everything
        buf = b""
        head_end = -1
        while head_end < 0:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except socket.timeout:
                raise TimeoutError(f"no answer within {timeout:g} s to {request[:200]!r}") from None
            if not chunk:
                if not buf:
                    return HttpAnswer(None, {}, b"")
                break
            buf += chunk
            head_end = buf.find(b"\r\n\r\n")
        head, _, body = buf.partition(b"\r\n\r\n")
        while head.startswith(b"HTTP/1.1 100 "):  # an interim answer (Expect: 100-continue)
            buf = body
            while b"\r\n\r\n" not in buf:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    raise TimeoutError(f"no final answer within {timeout:g} s to {request[:200]!r}") from None
                if not chunk:
                    return HttpAnswer(None, {}, b"")
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "-1"))
        while length < 0 or len(body) < length:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise TimeoutError(f"body not complete within {timeout:g} s for {request[:200]!r}") from None
            if not chunk:
                break
            body += chunk
        return HttpAnswer(status, headers, body if length < 0 else body[:length])


# ---------------------------------------------------------------------------------------------
# A raw WebSocket client (asyncio streams; sends anything, masks what it sends)
# ---------------------------------------------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def client_frame(payload: bytes, opcode: int = OP_TEXT, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455) with any payload: invalid UTF-8, huge, fragmented..."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    if n:
        # XOR with the repeated mask, fast for big payloads
        whole = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(whole, "big")).to_bytes(n, "big")
    else:
        masked = b""
    return head + mask + masked


class RawWS:
    """A WebSocket connection with no client library in the way."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.close_code: int | None = None

    @classmethod
    async def connect(cls, port: int, token: str | None, rcvbuf: int | None = None,
                      timeout: float = 10.0) -> "RawWS":
        ws, status = await cls.handshake(port, token, rcvbuf, timeout)
        assert ws is not None, f"upgrade refused: {status}"
        return ws

    @classmethod
    async def handshake(cls, port: int, token: str | None, rcvbuf: int | None = None,
                        timeout: float = 10.0) -> tuple["RawWS | None", str]:
        """Open and upgrade; (client, status line) or (None, status line) when refused."""
        timeout = scaled(timeout)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), timeout)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=2 ** 24)
        key = base64.b64encode(os.urandom(16)).decode()
        query = f"?token={token}" if token is not None else ""
        writer.write((f"GET /ws{query} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if " 101 " not in status + " ":
            writer.transport.abort()
            return None, status
        return cls(reader, writer), status

    def stop_reading(self) -> None:
        """Read nothing more from the socket (a client that never reads: its kernel buffer fills)."""
        self.writer.transport.pause_reading()

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def send(self, payload: bytes | str, opcode: int = OP_TEXT) -> None:
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        self.writer.write(client_frame(payload, opcode))
        await self.writer.drain()

    async def send_json(self, obj) -> None:
        await self.send(json.dumps(obj))

    async def recv_frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """The next frame (answering pings); (OP_CLOSE, payload) on a close, (-1, b"") at EOF."""
        return await self._recv_frame(scaled(timeout))

    async def _recv_frame(self, timeout: float) -> tuple[int, bytes]:
        while True:
            try:
                b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), timeout)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", await self.reader.readexactly(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
                payload = await asyncio.wait_for(self.reader.readexactly(n), timeout)
            except (asyncio.IncompleteReadError, ConnectionError):
                return -1, b""
            opcode = b0 & 0x0F
            if opcode == OP_PING:
                with _suppress_conn():
                    self.writer.write(client_frame(payload, OP_PONG))
                continue
            if opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            return opcode, payload

    async def recv_json(self, timeout: float = 10.0) -> dict:
        return await self._recv_json(scaled(timeout))

    async def _recv_json(self, timeout: float) -> dict:
        opcode, payload = await self._recv_frame(timeout)
        assert opcode == OP_TEXT, (opcode, payload[:200])
        return json.loads(payload)

    async def until(self, pred, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + scaled(timeout)
        while True:
            m = await self._recv_json(max(0.01, deadline - time.monotonic()))
            if pred(m):
                return m

    async def pong_after(self, timeout: float = 10.0) -> list[dict]:
        """Send a ping message and read up to its pong; the messages before it (ticks skipped)."""
        await self.send_json({"type": "ping"})
        seen = []
        deadline = time.monotonic() + scaled(timeout)
        while True:
            m = await self._recv_json(max(0.01, deadline - time.monotonic()))
            if m.get("type") == "pong":
                return seen
            if m.get("type") != "tick":
                seen.append(m)

    async def closed_with(self, timeout: float = 10.0) -> int | None:
        """Read until the server's close frame: its code; None when the socket ended without one."""
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            try:
                opcode, _ = await self._recv_frame(max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if opcode == OP_CLOSE:
                return self.close_code
            if opcode == -1:
                return None
        raise AssertionError("the server neither closed the socket nor sent a close frame")

    def abort(self) -> None:
        """Drop the TCP connection with a reset, no close frame."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with _suppress_conn():
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def drop(self) -> None:
        """Close the TCP connection without a close frame (a FIN, as a crashed client's kernel sends)."""
        self.writer.transport.close()


class _suppress_conn:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, (ConnectionError, OSError))
