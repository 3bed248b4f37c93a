"""A thin WebSocket client for load tests: asyncio.Protocol, no client library.

It parses only what a measurement needs: a tick's number and ``sent_at`` are read from the
head of the frame with one regular expression, not a JSON parse. Frames it sends use the
all-zero mask (valid per RFC 6455 section 5.3; the server unmasks it like any other).
"""

from __future__ import annotations

import asyncio
import json
import re
import time

_TICK = re.compile(rb'"tick_number":(\d+),"sent_at":([0-9.]+)')
_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


class WSClient(asyncio.Protocol):
    """One player's socket. ``ticks`` maps tick_number -> (latency from ``sent_at``, receipt time),
    in seconds (the receipt time is the wall clock, as ``sent_at`` is: the server and the drivers
    run on one machine)."""

    def __init__(self, host: str, port: int, token: str, record_from: list):
        self.request = (f"GET /ws?token={token} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {_KEY.decode()}\r\n"
                        f"Sec-WebSocket-Version: 13\r\n\r\n").encode()
        self.transport = None
        self.buf = bytearray()
        self.open = False
        self.closed = False
        self.close_code = None
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.control: asyncio.Queue = asyncio.Queue()
        self.ticks: dict[int, float] = {}
        self.record_from = record_from  # [wall time]: ticks are recorded once it is set

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc):
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost during handshake: {exc}"))

    def send_json(self, obj) -> None:
        if not self.closed:
            self.transport.write(client_frame(json.dumps(obj, separators=(",", ":")).encode()))

    def send_raw(self, frame: bytes) -> None:
        if not self.closed:
            self.transport.write(frame)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:end]).split(b"\r\n", 1)[0]
            del buf[:end + 4]
            if b" 101 " not in status:
                self.opened.set_exception(ConnectionError(status.decode(errors="replace")))
                self.transport.close()
                return
            self.open = True
            self.opened.set_result(True)
        while len(buf) >= 2:
            b1 = buf[1] & 0x7F
            off = 2
            if b1 == 126:
                if len(buf) < 4:
                    return
                b1, off = int.from_bytes(buf[2:4], "big"), 4
            elif b1 == 127:
                if len(buf) < 10:
                    return
                b1, off = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < off + b1:
                return
            opcode = buf[0] & 0x0F
            payload = bytes(buf[off:off + b1])
            del buf[:off + b1]
            self._frame(opcode, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x1:
            if payload.startswith(b'{"type":"tick"'):
                if self.record_from[0] is not None:
                    m = _TICK.search(payload, 0, 200)
                    if m:
                        now = time.time()
                        self.ticks[int(m.group(1))] = (now - float(m.group(2)), now)
            else:
                self.control.put_nowait(json.loads(payload))
        elif opcode == 0x9:  # ping -> pong
            self.send_raw(client_frame(payload, 0xA))
        elif opcode == 0x8:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            self.closed = True
            self.transport.close()


async def connect(host: str, port: int, token: str, record_from: list) -> WSClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: WSClient(host, port, token, record_from), host, port)
    await asyncio.wait_for(client.opened, 30)
    return client
