"""GET /api/openapi.json: a valid OpenAPI 3.1 document of every REST route, and real answers
that match it (the property-based fuzz test against it is tests/test_fuzz.py)."""

from __future__ import annotations

import re
import uuid

import jsonschema_rs
from schemathesis.specs.openapi.definitions import OPENAPI_31

from helpers import make_config

import gridserver

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def rest_routes(debug: bool) -> set[tuple[str, str]]:
    return {(r.method.lower(), r.path) for r in gridserver.ROUTES
            if r.content_type != "websocket" and (debug or r.access != "debug")}


async def fetch_document(running) -> dict:
    async with running.http.get(running.url + "/api/openapi.json") as resp:  # no token
        assert resp.status == 200
        assert resp.content_type == "application/json"
        return await resp.json()


def check_document(doc: dict, debug: bool) -> None:
    errors = [e.message for e in jsonschema_rs.validator_for(OPENAPI_31).iter_errors(doc)]
    assert errors == []
    assert doc["openapi"].startswith("3.1.")
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    operations = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert operations == rest_routes(debug)
    statuses = {**gridserver.HTTP_STATUS}
    for route in gridserver.ROUTES:
        if (route.method.lower(), route.path) not in operations:
            continue
        op = doc["paths"][route.path][route.method.lower()]
        responses = op["responses"]
        assert str(route.status) in responses, route
        for code in route.errors:
            error = responses[str(statuses[code])]["content"]["application/json"]["schema"]
            assert code in error["allOf"][1]["properties"]["error"]["enum"], (route.path, code)
        names = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
        assert names == re.findall(r"\{(\w+)\}", route.path)
        for p in op.get("parameters", []):
            if p["in"] == "path":
                schema = {"type": "string", "format": "uuid"} if p["name"] != "path" else \
                    {"type": "string", "description": "a file's path in the folder"}
                assert p["schema"] == schema and p["required"] is True
        assert ("security" in op) == (route.access != "anyone"), route.path
        if route.body:
            body = op["requestBody"]["content"]["application/json"]["schema"]
            assert set(body["properties"]) == {f.name for f in route.body}
            assert body["required"] == [f.name for f in route.body if f.required]
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "a token from POST /api/auth/login"}


async def test_openapi_without_debug_leaves_the_debug_routes_out(start_server, tmp_path):
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}", server_debug=False))
    doc = await fetch_document(running)
    check_document(doc, debug=False)
    assert not any(path.startswith("/api/debug") for path in doc["paths"])
    assert "post" not in doc["paths"]["/api/zones"] and "/ws" not in doc["paths"]
    assert set(doc["paths"]["/api/zones/{zone_id}"]) == {"get"}


async def test_openapi_with_debug_describes_every_route(start_server, tmp_path):
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}", server_debug=True,
                                             auth_min_password_length=12, server_max_zone_size=100))
    doc = await fetch_document(running)
    check_document(doc, debug=True)
    # limits that are settings are this server's
    body = doc["paths"]["/api/auth/register"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["password"]["minLength"] == 12
    body = doc["paths"]["/api/zones"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["width"]["maximum"] == body["properties"]["height"]["maximum"] == 100
    status, answer = await running.call("POST", "/api/auth/register",
                                        json={"username": "elevenchars", "password": "x" * 11})
    assert status == 400 and "12" in answer["message"]
    history = doc["paths"]["/api/debug/zones/{zone_id}/history"]["get"]
    assert {(p["name"], p["in"], p["schema"]["type"]) for p in history["parameters"]} == {
        ("zone_id", "path", "string"), ("from", "query", "integer"), ("to", "query", "integer")}


def validator(doc: dict, name: str) -> jsonschema_rs.Validator:
    """A validator of the component ``name``, its ``$ref``s resolved within the document."""
    return jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", "components": doc["components"]},
                                       validate_formats=True)


async def test_real_answers_match_their_schemas(start_server, tmp_path):
    """Every JSON route called once on a real server; the answer matches the schema the
    document names for its status."""
    running = await start_server(make_config(f"sqlite:///{tmp_path / 'db'}", server_debug=True,
                                             tick_interval=0.05))
    doc = await fetch_document(running)
    p = await running.player()
    zone = await running.zone(p["token"], metadata={"a": [1, {"b": None}]})
    zid = zone["id"]
    async with running.http.ws_connect(running.ws_url(p["token"])) as ws:
        await ws.send_json({"type": "subscribe", "zone_id": zid})
        await ws.send_json({"type": "intent", "data": {"move": "up"}})
        await ws.receive(timeout=5)
        status, state = await running.call("GET", f"/api/debug/zones/{zid}/state", p["token"])
        assert status == 200
        entity_id = state["entities"][0]["id"] if state["entities"] else str(uuid.uuid4())
        calls = [
            ("POST", "/api/auth/register", None, {"username": "u_" + uuid.uuid4().hex[:8], "password": "x" * 8}),
            ("POST", "/api/auth/login", None, {"username": p["username"], "password": "wrong password"}),
            ("GET", "/api/auth/me", p["token"], None),
            ("GET", "/api/auth/me", None, None),
            ("GET", "/api/zones", p["token"], None),
            ("GET", f"/api/zones/{zid}", p["token"], None),
            ("GET", "/api/zones/not-a-uuid", p["token"], None),
            ("POST", "/api/zones", p["token"], {"name": zone["name"], "width": 4, "height": 4}),
            ("POST", "/api/debug/tick/step", p["token"], None),
            ("GET", f"/api/debug/zones/{zid}/state", p["token"], None),
            ("GET", f"/api/debug/entities/{entity_id}", p["token"], None),
            ("GET", "/api/debug/connections", p["token"], None),
            ("GET", f"/api/debug/zones/{zid}/history?from=0", p["token"], None),
            ("GET", f"/api/debug/zones/{zid}/history?from=x", p["token"], None),
            ("POST", "/api/debug/tick/pause", p["token"], None),
            ("POST", "/api/debug/tick/step", p["token"], None),
            ("POST", f"/api/debug/zones/{zid}/rewind", p["token"], {"tick_number": 10 ** 9}),
            ("POST", "/api/debug/tick/resume", p["token"], None),
            ("GET", "/healthz", None, None),
        ]
        for method, path, token, body in calls:
            status, answer = await running.call(method, path, token, json=body)
            op = _operation(doc, method, path)
            assert str(status) in op["responses"], (method, path, status, answer)
            schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
            name = schema["$ref"].rsplit("/", 1)[1] if "$ref" in schema else "error"
            errors = [e.message for e in validator(doc, name).iter_errors(answer)]
            assert errors == [], (method, path, status, answer)
            if name == "error":
                assert answer["error"] in schema["allOf"][1]["properties"]["error"]["enum"], (path, answer)


def _operation(doc: dict, method: str, path: str) -> dict:
    """The operation of a concrete ``path`` (ids filled in)."""
    path = path.split("?")[0]
    for template, item in doc["paths"].items():
        if re.fullmatch(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)), path) and method.lower() in item:
            return item[method.lower()]
    raise AssertionError(f"{method} {path} is not in the document")
