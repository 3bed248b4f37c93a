"""The protocol tables (ROUTES, ERRORS, the WebSocket messages, CLOSE_CODES): the README holds
what they print, and they agree with what the code does (the router, the source, a real server)."""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import uuid

from aiohttp import WSMsgType

from helpers import ROOT, make_config, scaled

import gridserver

SCRIPT = os.path.join(ROOT, "gridserver.py")
#: The README's two generated blocks: (begin marker, end marker, part of ``_protocol_markdown``).
BLOCKS = [
    ("<!-- protocol: written by `gridserver --print-protocol`; edit the tables in gridserver.py -->",
     "<!-- end of protocol -->", "rest"),
    ("<!-- protocol (WebSocket): written by `gridserver --print-protocol`; edit the tables in gridserver.py -->",
     "<!-- end of protocol (WebSocket) -->", "websocket"),
]


def source() -> str:
    with open(SCRIPT, encoding="utf-8") as fh:
        return fh.read()


def python_source() -> str:
    """gridserver.py without its clients (Python, JavaScript, the page): they speak the protocol
    from the other side."""
    text = source()
    return text[:text.index("# Python client\n")]


# --------------------------------------------------------------------------- the README

def test_readme_holds_the_printed_protocol():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert "CONTRACT" not in readme and "#the-contract" not in readme
    printed = []
    for begin, end, part in BLOCKS:
        assert readme.count(begin) == 1 and readme.count(end) == 1, begin
        between = readme[readme.index(begin) + len(begin):readme.index(end)]
        assert between.strip("\n") + "\n" == gridserver._protocol_markdown(part), \
            "README.md's protocol differs from the code: paste the output of `gridserver --print-protocol`"
        printed.append(between.strip("\n") + "\n")
    assert "\n".join(printed) == gridserver._protocol_markdown()


def test_cli_prints_the_protocol(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--print-protocol"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=scaled(30))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == gridserver._protocol_markdown()
    for route in gridserver.ROUTES:
        assert f"| {route.method} | `{route.path}` |" in proc.stdout
    for error in gridserver.ERRORS:
        assert f"| `{error.code}` |" in proc.stdout
    for message in gridserver.CLIENT_MESSAGES + gridserver.SERVER_MESSAGES:
        assert f"| `{message.type}` | `{gridserver.json_dumps(message.example)}` |" in proc.stdout
    for code, _ in gridserver.CLOSE_CODES:
        assert f"| {code} |" in proc.stdout


# --------------------------------------------------------------------------- the tables against the code

async def test_every_route_checks_who_may_call_it_as_the_table_says(start_server, tmp_path):
    """``_Route.access``, against a real server: a ``token`` or ``debug`` route refuses a call
    without a token (401), a ``debug`` route a player who is not a debug player (403); an
    ``anyone`` route asks for neither."""
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}", server_debug=True,
                                             server_debug_players="somebody_else"))
    p = await running.player()
    for r in gridserver.ROUTES:
        path = r.path.replace("{zone_id}", str(uuid.uuid4())).replace("{entity_id}", str(uuid.uuid4())) \
            .replace("{path}", "index.html")
        status, body = await running.call(r.method, path)
        if r.access == "anyone":
            assert status != 401 and status != 403, (r.path, status, body)
        else:
            assert (status, body["error"]) == (401, "unauthorized"), (r.path, status, body)
        if r.access == "debug":
            status, body = await running.call(r.method, path, p["token"])
            assert (status, body["error"]) == (403, "forbidden"), (r.path, status, body)


def test_router_routes_exactly_the_table(tmp_path):
    app = gridserver.create_app(make_config(f"sqlite:///{tmp_path / 'db'}", server_debug=True))
    routed = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        routed.add((route.method, path))
    table = {(r.method, r.path) for r in gridserver.ROUTES}
    # aiohttp answers HEAD for every GET route (and only for those)
    assert routed - table == {("HEAD", path) for method, path in table if method == "GET"}
    assert table <= routed
    for r in gridserver.ROUTES:
        assert r.access in ("anyone", "token", "debug"), r
        assert r.answer is None or r.answer in gridserver._SCHEMAS, r
        assert set(r.errors) <= {e.code for e in gridserver.ERRORS if e.status}, r
        assert re.findall(r"\{(\w+)\}", r.path) == [f for f in ("zone_id", "entity_id", "path") if f"{{{f}}}" in r.path]


def test_every_error_code_in_the_source_is_in_the_table():
    text = python_source()
    table = {e.code: e for e in gridserver.ERRORS}
    rest = set(re.findall(r'GridError\("(\w+)"', text))
    rest |= set(re.findall(r'_error_response\(\d+, "(\w+)"', text))
    rest |= set(re.findall(r'_http_answer\(\d+, "(\w+)"', text))
    rest |= set(gridserver._HTTP_ERROR_CODES.values())
    ws = set(re.findall(r'\.error\("(\w+)"', text))
    ws |= set(re.findall(r'"type": "error", "code": "(\w+)"', text))
    assert rest and ws
    for code in rest:
        assert code in table and table[code].status == gridserver.HTTP_STATUS[code], code
    for code in ws:
        assert code in table and table[code].websocket, code
    # and the table lists no code the server never answers
    assert set(table) == rest | ws
    # HTTP_STATUS is the table's, and every status in it is an error status
    assert all(400 <= s < 600 for s in gridserver.HTTP_STATUS.values())


def _sent_types() -> set[str]:
    """Every ``"type"`` of a dict literal in the server's Python code outside the protocol
    section (its tables and JSON schemas declare, they send nothing), and of the tick frame
    written as text."""
    text = python_source()
    banner = "# =============================================================================\n# "
    start = text.index(banner + "Protocol: routes")
    end = text.index(banner, start + len(banner))
    text = text[:start] + "\n" * text.count("\n", start, end) + text[end:]
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "type" and isinstance(value, ast.Constant) \
                        and isinstance(value.value, str):
                    found.add(value.value)
    found |= set(re.findall(r'\{\{"type":"(\w+)"', text))
    return found


def test_every_message_type_the_server_sends_is_in_the_table():
    sent = _sent_types()
    server_types = {m.type for m in gridserver.SERVER_MESSAGES}
    assert "tick" in sent and "error" in sent
    assert sent == server_types, (sent ^ server_types)
    client_types = {m.type for m in gridserver.CLIENT_MESSAGES}
    handled = set(re.findall(r'kind == "(\w+)"', inspect.getsource(gridserver._handle_message)))
    assert client_types == handled
    for m in gridserver.CLIENT_MESSAGES + gridserver.SERVER_MESSAGES:
        assert m.example["type"] == m.type
    for m in gridserver.CLIENT_MESSAGES:
        assert m.answer in server_types


def test_close_codes_the_server_uses_are_in_the_table():
    codes = {code for code, _ in gridserver.CLOSE_CODES}
    used = {gridserver.CLOSE_REPLACED, gridserver.CLOSE_SESSION_ENDED, *gridserver._WebSocketResponse.ABUSE_CODES}
    used |= {int(c) for c in re.findall(r'close_all\((\d{4})', python_source())}
    assert 1001 in used
    assert used <= codes
    assert codes - used == {1006}  # documented, never sent: a dropped connection


# --------------------------------------------------------------------------- the messages on a real server

async def receive_type(ws, wanted: str, timeout: float = 5.0) -> dict:
    """The next message of type ``wanted``, skipping ticks; fails on anything else."""
    while True:
        msg = await ws.receive(timeout=scaled(timeout))
        assert msg.type is WSMsgType.TEXT, msg
        data = msg.json()
        assert data["type"] in {m.type for m in gridserver.SERVER_MESSAGES}, data
        if data["type"] == wanted:
            return data
        assert data["type"] == "tick", (wanted, data)


async def test_each_client_message_example_gets_its_documented_answer(start_server, tmp_path):
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}", server_debug=True, tick_interval=0.05))
    p = await running.player()
    zone = await running.zone(p["token"])
    examples = {m.type: m for m in gridserver.SERVER_MESSAGES}
    async with running.http.ws_connect(running.ws_url(p["token"])) as ws:
        for m in gridserver.CLIENT_MESSAGES:
            message = dict(m.example)
            if "zone_id" in message:
                message["zone_id"] = zone["id"]
            await ws.send_json(message)
            answer = await receive_type(ws, m.answer)
            # every documented field of the answer is there
            assert set(examples[m.answer].example) <= set(answer), (m.type, answer)
            if m.type == "subscribe":
                assert answer["zone_id"] == zone["id"]
            if m.type == "intent":  # queued and handed to the module, not refused
                assert running.srv.metrics.intents_accepted_total >= 1
        # the error example: a subscribe to the example's zone id, which no zone has
        await ws.send_json({"type": "subscribe", "zone_id": gridserver._EXAMPLE_ZONE})
        error = await receive_type(ws, "error")
        assert error["code"] == examples["error"].example["code"] and error["message"]
        assert set(examples["error"].example) == set(error)
        await ws.send_json({"type": "no_such_type"})
        assert (await receive_type(ws, "error"))["code"] == "unknown_type"


async def test_a_resumed_subscription_is_announced_as_documented(start_server, tmp_path):
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}", server_debug=True, tick_interval=0.05))
    p = await running.player()
    zone = await running.zone(p["token"])
    async with running.http.ws_connect(running.ws_url(p["token"])) as ws:
        await ws.send_json({"type": "subscribe", "zone_id": zone["id"]})
        await receive_type(ws, "subscribed")
    async with running.http.ws_connect(running.ws_url(p["token"])) as ws:
        resumed = await receive_type(ws, "subscribed")
        assert resumed == {"type": "subscribed", "zone_id": zone["id"], "resumed": True}
        tick = await receive_type(ws, "tick")
        assert set(tick) == set(next(m for m in gridserver.SERVER_MESSAGES if m.type == "tick").example)
    assert uuid.UUID(tick["zone_id"]) and isinstance(tick["sent_at"], float)


async def test_a_method_the_table_does_not_list_is_405_with_the_allowed_ones(start_server, tmp_path):
    """Every path of ROUTES, called with a method the table does not list for it: 405
    ``method_not_allowed`` in the envelope, and ``Allow`` naming the table's methods (RFC 9110)."""
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}", server_debug=True))
    p = await running.player()
    by_path: dict[str, set[str]] = {}
    for r in gridserver.ROUTES:
        by_path.setdefault(r.path, set()).add(r.method)
    for path, methods in by_path.items():
        allowed = methods | ({"HEAD"} if "GET" in methods else set())
        concrete = path.replace("{zone_id}", str(uuid.uuid4())).replace("{entity_id}", str(uuid.uuid4())) \
            .replace("{path}", "index.html")
        for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE"} - methods):
            status, body = await running.call(method, concrete, p["token"])
            assert status == 405 and body["error"] == "method_not_allowed" and body["message"], (method, path, body)
            async with running.http.request(method, running.url + concrete) as resp:
                assert set(resp.headers["Allow"].split(",")) == allowed, (method, path, resp.headers)
