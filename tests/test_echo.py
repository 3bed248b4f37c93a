"""Echo (``game_modules/echo.py``), tested with ``gridserver.ZoneSim``: the smallest game and
the smallest tests of one."""

from __future__ import annotations

import uuid

from gridserver import ZoneSim

ALICE, BOB = uuid.UUID(int=0xA1), uuid.UUID(int=0xB0B)


def test_echo_sends_everyone_the_tick_s_intents_in_arrival_order():
    sim = ZoneSim("game_modules.echo")
    sim.join(ALICE)
    sim.join(BOB)
    first = sim.intent(ALICE, {"say": "hello"})
    second = sim.intent(BOB, {"say": "hi", "mood": ["glad", 1]})
    assert sim.tick() == 1 and sim.last_error is None
    expected = {"game": "echo", "tick": 1, "intents": [
        {"player_id": str(ALICE), "seq": first.seq, "data": {"say": "hello"}},
        {"player_id": str(BOB), "seq": second.seq, "data": {"say": "hi", "mood": ["glad", 1]}}]}
    assert sim.state_for(ALICE) == expected and sim.state_for(BOB) == expected


def test_each_tick_echoes_only_its_own_intents_and_keeps_no_entities():
    sim = ZoneSim("game_modules.echo")
    sim.join(ALICE)
    sim.intent(ALICE, {"n": 1})
    sim.tick()
    sim.tick()
    assert sim.state_for(ALICE) == {"game": "echo", "tick": 2, "intents": []}
    sim.intent(ALICE, {"n": 3})
    sim.tick()
    assert [i["data"] for i in sim.state_for(ALICE)["intents"]] == [{"n": 3}]
    assert sim.entities == []


def test_echo_shows_intents_as_a_client_sent_them():
    sim = ZoneSim("game_modules.echo")
    sim.join(ALICE)
    sim.intent(ALICE, {"at": (3, 4), 7: "seven"})  # sent over the wire as JSON
    sim.tick()
    (echoed,) = sim.state_for(ALICE)["intents"]
    assert echoed["data"] == {"at": [3, 4], "7": "seven"}
