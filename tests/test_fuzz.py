"""Property-based fuzzing of the REST routes with schemathesis, against a real gridserver
process on a real socket: every answer must be one the OpenAPI document (GET
/api/openapi.json) describes, with its status, content type and body schema, and none is a
5xx. Debug mode is on, so the debug routes are fuzzed too, as a registered debug player."""

from __future__ import annotations

import time
import uuid

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, ignored_auth, negative_data_rejection,
                                               response_schema_conformance, status_code_conformance)

from faultkit import ServerProcess
from helpers import scaled

import gridserver

pytestmark = pytest.mark.slow

#: Examples per operation and generation mode: bounds the run to tens of seconds.
EXAMPLES = 25
#: No 5xx; status, content type and body as documented; a route that needs a token refuses
#: the request without it or with a wrong one.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          ignored_auth]


def wait_ready(server: ServerProcess) -> None:
    deadline = time.monotonic() + scaled(30)
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.log_text()[-3000:]
        try:
            if requests.get(server.url + "/healthz", timeout=scaled(2)).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise AssertionError("the server did not start:\n" + server.log_text()[-3000:])


def login(url: str, username: str, password: str) -> str:
    answer = requests.post(url + "/api/auth/login", json={"username": username, "password": password},
                           timeout=scaled(10))
    assert answer.status_code == 200, answer.text
    return answer.json()["token"]


def test_every_answer_matches_the_openapi_document(tmp_path):
    files = tmp_path / "game"  # [server] static_dir: /game/ serves these
    (files / "art").mkdir(parents=True)
    (files / "index.html").write_text("<!doctype html><title>a game</title>")
    (files / "art" / "hero.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (files / ".env").write_text("SECRET=1")
    server = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'fuzz.db'}", game="game_modules.walkers",
                           settings={"AUTH_MAX_FAILED_LOGINS": 1_000_000, "AUTH_MAX_SESSIONS": 1000,
                                     "JOURNAL_KEEP": 50, "SERVER_STATIC_DIR": str(files)})
    try:
        wait_ready(server)
        url = server.url
        password = "correct horse"
        username, leaver = "fuzzer_" + uuid.uuid4().hex[:8], "leaver_" + uuid.uuid4().hex[:8]
        for name in (username, leaver):
            assert requests.post(url + "/api/auth/register", json={"username": name, "password": password},
                                 timeout=scaled(10)).status_code == 201
        token = login(url, username, password)
        zone = requests.post(url + "/api/zones", json={"name": "fuzzed", "width": 16, "height": 16},
                             headers={"Authorization": f"Bearer {token}"}, timeout=scaled(10)).json()
        # loaded as a document, not from its URL: schemathesis leaves out the operation that serves
        # the document it was loaded from, and that one is fuzzed too
        schema = schemathesis.openapi.from_dict(requests.get(url + "/api/openapi.json", timeout=scaled(10)).json())
        schema.config.update(base_url=url)
        operations = [result.ok() for result in schema.get_all_operations()]
        routes = {(r.method, r.path): r for r in gridserver.ROUTES if r.content_type != "websocket"}
        seen: dict[tuple[str, str], set[int]] = {key: set() for key in routes}
        for op in operations:
            route = routes[(op.method.upper(), op.path)]
            strategies = [op.as_strategy()]
            if route.body or route.query or "{zone_id}" in route.path or "{entity_id}" in route.path:
                # something to make invalid (a file's path is any string)
                strategies.append(op.as_strategy(schemathesis.GenerationMode.NEGATIVE))
            if "{zone_id}" in op.path and op.method.upper() != "DELETE":  # the real zone, too
                strategies.append(op.as_strategy(path_parameters={"zone_id": zone["id"]}))
            if "{path}" in op.path:  # the files there are, too
                for name in ("", "index.html", "art/hero.svg", "art/", ".env", "../fuzz.db"):
                    strategies.append(op.as_strategy(path_parameters={"path": name}))
            for strategy in strategies:
                run_cases(op, strategy, url, leaver, password, token, seen)
        # every route was fuzzed, and with the player's token: no route answered only 401
        assert {(op.method.upper(), op.path) for op in operations} == set(routes)
        for key, statuses in seen.items():
            assert statuses - {401}, (key, statuses)
        print({f"{method} {path}": sorted(statuses) for (method, path), statuses in seen.items()})
        assert "Traceback" not in server.log_text(), server.log_text()[-5000:]
    finally:
        server.stop()


def run_cases(op, strategy, url: str, leaver: str, password: str, token: str,
              seen: dict[tuple[str, str], set[int]]) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def each(case) -> None:
        # a logout ends the session it names (``{"all": true}``: every session of the player), so
        # it gets a fresh session of another player
        own = login(url, leaver, password) if op.path == "/api/auth/logout" else token
        checks = CHECKS + ([negative_data_rejection] if case.meta and case.meta.generation.mode.is_negative else [])
        answer = case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {own}"}, checks=checks,
                                        timeout=scaled(10))
        seen[(op.method.upper(), op.path)].add(answer.status_code)

    each()
