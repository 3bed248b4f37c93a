"""``gridserver.ZoneSim``, the test kit for game modules: that it runs a module through the
server's own inbox, checks and apply path (lost ticks, joins and leaves netted and carried
over, read-only intents checked as the door checks them), deterministically, and that it
loads a game however a test names it.

The games here are small classes written for each test; ``tests/test_walkers.py`` and
``tests/test_echo.py`` show the kit on the example games.
"""

from __future__ import annotations

import uuid

import pytest

import gridserver
from gridserver import EntityCreate, EntityUpdate, TickRejected, TickResult, ZoneSim

P, Q = uuid.UUID(int=0xA1), uuid.UUID(int=0xB2)


class Tokens:
    """A token per joined player, placed with ``framework.random`` and an id the server assigns;
    ``{"step": dx}`` moves a player's token. ``fail`` makes ``on_tick`` return a result the
    checks reject (a token out of the zone). Every hook call is noted in ``calls``."""

    def __init__(self):
        self.fail = False
        self.calls: list = []

    def on_init(self, framework):
        self.fw = framework

    def on_player_join(self, zone_id, player_id):
        self.calls.append(("join", player_id))
        zone = self.fw.get_zone(zone_id)
        x, y = self.fw.random.randrange(zone.width), self.fw.random.randrange(zone.height)
        return TickResult(entity_creates=[EntityCreate(x, y, 1, 1, {"owner": str(player_id)})])

    def on_player_leave(self, zone_id, player_id):
        self.calls.append(("leave", player_id))
        mine = [e.id for e in self.fw.list_entities(zone_id) if e.metadata["owner"] == str(player_id)]
        return TickResult(entity_deletes=mine)

    def on_tick(self, zone_id, entities, intents, tick_number):
        updates = []
        for intent in intents:
            for e in entities:
                if e.metadata["owner"] == str(intent.player_id):
                    updates.append(EntityUpdate(e.id, x=e.x + intent.data["step"]))
        if self.fail:
            updates.append(EntityUpdate(entities[0].id, x=-1) if entities else "not an update")
        owners = sorted(e.metadata["owner"] for e in entities)
        return TickResult(entity_updates=updates, broadcast_state={"tick": tick_number, "owners": owners})

    def get_player_state(self, zone_id, player_id, full_state):
        return {**full_state, "me": str(player_id)}


def token(sim: ZoneSim, player_id):
    found = [e for e in sim.entities if e.metadata["owner"] == str(player_id)]
    return found[0] if found else None


def test_a_rejected_tick_changes_nothing_and_its_join_goes_with_the_next_good_tick():
    sim = ZoneSim(Tokens, 16, 16)
    sim.join(P)
    assert sim.tick() == 1 and sim.last_error is None
    before = [(e.id, e.x, e.y, e.updated_at) for e in sim.entities]
    sim.game.fail = True
    sim.join(Q)
    sim.intent(P, {"step": 1})
    assert sim.tick() == 2
    assert "out of bounds" in sim.last_error and sim.last_outcome.kind == "invalid_result"
    assert [(e.id, e.x, e.y, e.updated_at) for e in sim.entities] == before  # P's step and Q's token: neither
    assert token(sim, Q) is None and sim.state_for(P)["tick"] == 1  # no frame from a lost tick
    sim.game.fail = False
    assert sim.tick() == 3 and sim.last_error is None
    assert sim.game.calls == [("join", P), ("join", Q), ("join", Q)]  # heard again, with the good tick
    assert token(sim, Q) is not None and token(sim, P).x == before[0][1]  # the lost tick's intent is gone
    assert sim.state_for(Q) == {"tick": 3, "owners": [str(P)], "me": str(Q)}  # the state shows the next tick


def test_a_failing_get_player_state_keeps_the_tick_and_its_events():
    class Blind(Tokens):
        def get_player_state(self, zone_id, player_id, full_state):
            raise RuntimeError("cannot see")

    sim = ZoneSim(Blind)
    sim.join(P)
    sim.tick()
    assert sim.last_error == "get_player_state: RuntimeError: cannot see" and sim.last_outcome.applied
    sim.tick()
    assert sim.game.calls == [("join", P)] and token(sim, P) is not None  # applied, so not delivered twice
    with pytest.raises(KeyError, match="no frame"):
        sim.state_for(P)


def test_a_join_and_a_leave_before_a_tick_cancel_out():
    sim = ZoneSim(Tokens)
    sim.join(P)
    sim.leave(P)
    sim.tick()
    assert sim.game.calls == [] and sim.entities == []
    with pytest.raises(KeyError, match=str(P)):
        sim.state_for(P)  # not in the zone when the tick ran: no frame
    sim.join(P)
    sim.tick()
    sim.leave(P)
    sim.join(P)  # left and came back before the next tick: the module hears neither
    sim.tick()
    assert sim.game.calls == [("join", P)] and token(sim, P) is not None
    sim.leave(P)
    sim.tick()
    assert sim.game.calls == [("join", P), ("leave", P)] and sim.entities == []
    assert sim.state_for(P)["tick"] == 3  # the last frame P was sent, before leaving


def test_two_sims_with_the_same_seed_make_the_same_world():
    def play(seed: int) -> list:
        sim = ZoneSim(Tokens, 64, 64, seed=seed)
        sim.join(P)
        sim.join(Q)
        sim.tick()
        sim.intent(Q, {"step": 1})
        sim.tick(3)
        return [(e.id, e.zone_id, e.x, e.y, e.metadata, e.created_at, e.updated_at) for e in sim.entities]

    first = play(7)
    assert len(first) == 2 and first == play(7)  # server-assigned ids, framework.random and times too
    assert play(8) != first


def test_verify_catches_a_module_that_is_not_deterministic():
    class Clock(Tokens):
        ticks = 0

        def on_tick(self, zone_id, entities, intents, tick_number):
            self.ticks += 1  # a fact kept in memory: the second run of the tick sees another count
            return TickResult(entity_updates=[EntityUpdate(e.id, metadata={**e.metadata, "n": self.ticks})
                                              for e in entities])

    sim = ZoneSim(Clock, verify=True)
    sim.join(P)
    sim.tick()
    assert sim.last_error is None  # no entity yet when on_tick ran
    sim.tick()
    assert sim.last_error.startswith("nondeterministic: entity ") and "metadata" in sim.last_error
    steady = ZoneSim(Tokens, verify=True)
    steady.join(P)
    steady.tick(3)
    assert steady.last_error is None and token(steady, P) is not None


def test_state_for_is_the_players_frame_parsed():
    sim = ZoneSim(Tokens)
    sim.join(P)
    sim.join(Q)
    assert sim.tick(2) == 2
    state = sim.state_for(P)
    assert state == {"tick": 2, "owners": sorted([str(P), str(Q)]), "me": str(P)}
    assert sim.state_for(str(Q))["me"] == str(Q)  # ids as text do too
    state["tick"] = 99
    assert sim.state_for(P)["tick"] == 2  # a new copy each call
    with pytest.raises(KeyError, match="no frame"):
        sim.state_for(uuid.UUID(int=5))


def test_intents_reach_the_module_as_json_and_read_only():
    seen = []

    class Keeper(Tokens):
        def on_tick(self, zone_id, entities, intents, tick_number):
            seen.extend(intents)
            for intent in intents:
                if intent.data.get("poke"):
                    intent.data["poked"] = True
            return None

    sim = ZoneSim(Keeper)
    sim.join(P)
    first = sim.intent(P, {"to": (1, 2), 3: None})
    second = sim.intent(P, {"to": [0, 0]})
    sim.tick()
    assert sim.last_error is None
    assert [i.data for i in seen] == [{"to": [1, 2], "3": None}, {"to": [0, 0]}]  # what a client could send
    assert [i.seq for i in seen] == [first.seq, second.seq] and first.seq < second.seq
    assert seen[0].received_at == ZoneSim.START and seen[0].zone_id == sim.zone_id
    before = [(e.id, e.x, e.y) for e in sim.entities]
    sim.intent(P, {"poke": True})
    sim.tick()
    assert sim.last_error.startswith("TypeError: ") and "read-only" in sim.last_error
    assert sim.last_outcome.kind == "exception" and [(e.id, e.x, e.y) for e in sim.entities] == before


def nested(levels: int) -> list:
    """A list ``levels`` deep."""
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_data_nested_as_deep_as_the_door_allows_is_taken():
    sim = ZoneSim(Tokens)
    sim.join(P)
    assert sim.intent(P, {"x": nested(31)}).data["x"] == nested(31)  # data is level 1: 32 levels in all


@pytest.mark.parametrize("data, why", [
    (["a list"], "must be a JSON object"),
    ({"x": float("nan")}, "not JSON"),
    ({"x": object()}, "not JSON"),
    ({"x": "\ud800"}, "unpaired surrogate"),
    ({"x": 10 ** 400}, "too large for JSON"),
    ({"x": nested(32)}, "deeper than 32 levels"),
])
def test_intents_the_server_refuses_are_refused(data, why):
    sim = ZoneSim(Tokens)
    sim.join(P)
    with pytest.raises(ValueError, match=why):
        sim.intent(P, data)
    assert sim.world.zones[sim.zone_id].intents == []


def test_only_players_in_the_zone_send_intents():
    sim = ZoneSim(Tokens)
    with pytest.raises(ValueError, match="join first"):
        sim.intent(P, {"step": 1})
    sim.join(P)
    sim.intent(P, {"step": 1})
    sim.leave(P)  # an intent sent before leaving still counts, as in the server
    sim.tick()
    assert sim.last_error is None and sim.game.calls == [] and sim.entities == []


def test_a_game_named_by_its_path_or_given_as_a_class():
    echo = ZoneSim("game_modules.echo")
    assert echo.game.__name__ == "game_modules.echo" and echo.framework._section == "game_modules.echo"
    demo = ZoneSim("gridserver:BuiltinDemo", 5, 5)
    assert isinstance(demo.game, gridserver.BuiltinDemo)
    assert [z.name for z in demo.framework.list_zones()] == ["sim"]  # the demo makes its lobby only in no zone
    demo.join(P, username="alice")
    demo.tick(2)
    (avatar,) = demo.entities
    assert avatar.metadata["label"] == "alice" and demo.state_for(P)["entities"][0]["label"] == "alice"
    own = ZoneSim(Tokens)
    assert isinstance(own.game, Tokens) and own.game is not ZoneSim(Tokens).game  # an instance per sim
    with pytest.raises(gridserver.GameModuleError, match="no module named .game_modules.no_such_game."):
        ZoneSim("game_modules.no_such_game")
    with pytest.raises(TypeError, match="lacks on_init, on_tick, get_player_state"):
        ZoneSim(object())


def test_settings_usernames_and_the_zones_on_init_creates():
    class Builder(Tokens):
        def on_init(self, framework):
            super().on_init(framework)
            self.size = framework.setting("size", 3, int)
            self.loud = framework.setting("loud", False, bool)
            framework.create_zone("annex", self.size, self.size, {"kind": "annex"})
            with pytest.raises(ValueError, match="exists already"):
                framework.create_zone("arena", 4, 4)

        def on_tick(self, zone_id, entities, intents, tick_number):
            names = [self.fw.username(i.player_id) for i in intents]
            return TickResult(broadcast_state={"names": names, "zones": len(self.fw.list_zones())})

    sim = ZoneSim(Builder, 10, 6, {"theme": "dark"}, {"size": 5, "loud": True}, usernames={str(P): "pat"},
                  name="arena")
    assert sim.game.size == 5 and sim.game.loud is True
    zones = {z.name: z for z in sim.framework.list_zones()}
    assert set(zones) == {"arena", "annex"} and sim.zone_id == zones["arena"].id
    assert (zones["arena"].width, zones["arena"].height, zones["arena"].metadata) == (10, 6, {"theme": "dark"})
    assert (zones["annex"].width, zones["annex"].metadata) == (5, {"kind": "annex"})
    sim.join(P)
    sim.join(Q, username="quinn")
    sim.intent(Q, {})
    sim.intent(P, {})
    sim.tick()
    assert sim.state_for(P) == {"names": ["quinn", "pat"], "zones": 2, "me": str(P)}
    assert sim.world.zones[zones["annex"].id].tick_number == 0  # only the sim's zone ticks


def test_place_puts_entities_through_the_checks_at_the_sims_time():
    sim = ZoneSim(Tokens, 4, 4, tick_interval=0.5)
    wall, dot = sim.place(EntityCreate(0, 0, 4, 1, {"owner": "nobody"}), EntityCreate(2, 3, 0, 0, {"owner": "x"}))
    assert sim.entities == sorted([wall, dot], key=lambda e: e.id) and sim.entity(wall.id) is wall
    assert wall.created_at == ZoneSim.START and sim.entity(str(dot.id)) is dot
    with pytest.raises(TickRejected, match="out of bounds"):
        sim.place(EntityCreate(3, 3, 2, 2))
    assert len(sim.entities) == 2 and sim.game.calls == []
    sim.join(P)
    assert sim.tick(4) == 4 and sim.now == ZoneSim.START + 2.0
    assert token(sim, P).created_at == ZoneSim.START + 0.5  # the first tick's time
    assert sim.entity(uuid.UUID(int=1)) is None
