"""Walkers (``game_modules/walkers.py``), tested the way a game developer tests a game: with
``gridserver.ZoneSim``, no server, no database, no sockets.

Each test builds a small zone, puts what it needs in it (``sim.place``), lets players join
and send intents, runs ticks and looks at the entities and at what each player was sent.
Walls and items are off unless a test asks for them, so nothing random gets in the way.
"""

from __future__ import annotations

import uuid

from gridserver import EntityCreate, ZoneSim

ALICE, BOB = uuid.UUID(int=0xA1), uuid.UUID(int=0xB0B)
WALL = {"kind": "wall", "color": "#555555"}


def walkers(width=8, height=8, **settings) -> ZoneSim:
    """A zone of walkers, with no walls, no items and no fog unless asked."""
    return ZoneSim("game_modules.walkers", width, height,
                   settings={"walls": 0, "items": 0, "fog_radius": 0, **settings})


def avatar(name: str, player_id: uuid.UUID, x: int, y: int) -> EntityCreate:
    """A player's avatar as walkers makes it (a fresh walkers finds it by its ``player_id``)."""
    meta = {"kind": "avatar", "player_id": str(player_id), "name": name, "score": 0, "color": "#2f7ed8",
            "label": name}
    return EntityCreate(x, y, 1, 1, meta)


def item(x: int, y: int, value: int = 1) -> EntityCreate:
    return EntityCreate(x, y, 0, 0, {"kind": "item", "value": value, "color": "#e8b000"})


def of_kind(sim: ZoneSim, kind: str) -> list:
    return [e for e in sim.entities if e.metadata["kind"] == kind]


def where(sim: ZoneSim, player_id) -> tuple[int, int] | None:
    """Where the player's avatar is (None: they have none)."""
    found = [(e.x, e.y) for e in of_kind(sim, "avatar") if e.metadata["player_id"] == str(player_id)]
    return found[0] if found else None


def move(sim: ZoneSim, player_id, direction: str) -> None:
    """One move, in a tick of its own."""
    sim.intent(player_id, {"move": direction})
    sim.tick()
    assert sim.last_error is None


def test_a_player_who_joins_gets_an_avatar_on_a_free_cell():
    sim = walkers(3, 1)
    sim.place(EntityCreate(0, 0, 1, 1, WALL), item(1, 0))
    sim.join(ALICE, username="alice")
    sim.tick()
    assert sim.last_error is None
    (me,) = of_kind(sim, "avatar")
    assert (me.x, me.y) == (2, 0)  # the only cell with neither a wall nor an item
    assert me.metadata["name"] == "alice" and me.metadata["score"] == 0
    assert me.created_at == sim.now
    sim.tick()  # the state shows what a join did from the next tick on
    (shown,) = [e for e in sim.state_for(ALICE)["entities"] if e["kind"] == "avatar"]
    assert shown == {"id": str(me.id), "x": 2, "y": 0, "w": 1, "h": 1, "kind": "avatar", "color": "#2f7ed8",
                     "label": "alice", "player_id": str(ALICE), "name": "alice", "score": 0}


def test_intents_move_the_avatar_one_cell_inside_the_zone():
    sim = walkers(5, 5)
    sim.place(avatar("alice", ALICE, 2, 2))
    sim.join(ALICE)
    sim.tick()
    move(sim, ALICE, "right")
    assert where(sim, ALICE) == (3, 2)
    sim.intent(ALICE, {"dx": -1, "dy": 1})  # the other way to say it: one step, diagonals too
    sim.tick()
    assert where(sim, ALICE) == (2, 3)
    sim.intent(ALICE, {"move": "up"})
    sim.intent(ALICE, {"move": "left"})  # the last move of a tick counts
    sim.tick()
    assert where(sim, ALICE) == (1, 3)
    sim.intent(ALICE, {"dx": 2})
    sim.intent(ALICE, {"move": "jump"})
    sim.tick()
    assert where(sim, ALICE) == (1, 3)  # nothing valid: no move
    move(sim, ALICE, "down")
    move(sim, ALICE, "down")
    assert where(sim, ALICE) == (1, 4)  # the zone's edge


def test_walls_block_moves():
    sim = walkers(6, 6)
    sim.place(EntityCreate(3, 1, 1, 3, WALL), avatar("alice", ALICE, 2, 2))  # a wall from (3, 1) to (3, 3)
    sim.join(ALICE)
    sim.tick()
    move(sim, ALICE, "right")
    assert where(sim, ALICE) == (2, 2)
    move(sim, ALICE, "down")
    move(sim, ALICE, "down")
    move(sim, ALICE, "right")
    assert where(sim, ALICE) == (3, 4)  # round the end of the wall
    move(sim, ALICE, "up")
    assert where(sim, ALICE) == (3, 4)


def test_two_avatars_never_share_a_cell():
    sim = walkers(4, 1)
    sim.place(avatar("alice", ALICE, 0, 0), avatar("bob", BOB, 2, 0))
    sim.join(ALICE)
    sim.join(BOB)
    sim.tick()
    sim.intent(BOB, {"move": "left"})  # Bob's move came first: he takes (1, 0)
    sim.intent(ALICE, {"move": "right"})
    sim.tick()
    assert where(sim, BOB) == (1, 0) and where(sim, ALICE) == (0, 0)


def test_stepping_on_an_item_picks_it_up_and_scores():
    sim = walkers(6, 6, items=1)
    (gem,) = sim.place(avatar("alice", ALICE, 2, 2), item(3, 2, value=2))[1:]
    sim.join(ALICE)
    sim.tick()
    move(sim, ALICE, "right")
    (me,) = of_kind(sim, "avatar")
    assert (me.x, me.y) == (3, 2) and me.metadata["score"] == 2
    assert sim.entity(gem.id) is None
    (new,) = of_kind(sim, "item")  # ``items = 1``: another appears elsewhere
    assert (new.x, new.y) != (3, 2)
    seen = {e["id"]: e for e in sim.state_for(ALICE)["entities"]}
    assert seen[str(me.id)]["score"] == 2 and str(gem.id) not in seen and str(new.id) in seen


def test_fog_of_war_shows_each_player_only_what_is_near():
    sim = walkers(20, 4, fog_radius=2)
    near_wall, far_wall = sim.place(EntityCreate(3, 0, 1, 4, WALL), EntityCreate(5, 0, 1, 4, WALL))
    sim.place(avatar("alice", ALICE, 1, 1), avatar("bob", BOB, 15, 1))
    sim.join(ALICE)
    sim.join(BOB)
    sim.tick()
    alice_sees = sim.state_for(ALICE)
    assert alice_sees["fog_radius"] == 2
    assert {e["id"] for e in alice_sees["entities"] if e["kind"] == "wall"} == {str(near_wall.id)}
    assert [e["name"] for e in alice_sees["entities"] if e["kind"] == "avatar"] == ["alice"]
    assert [e["name"] for e in sim.state_for(BOB)["entities"]] == ["bob"]  # no wall near Bob
    # "view" names the cells each player sees: every entity seen overlaps it, none unseen does
    assert alice_sees["view"] == {"x": -1, "y": -1, "w": 5, "h": 5}
    assert sim.state_for(BOB)["view"] == {"x": 13, "y": -1, "w": 5, "h": 5}
    v = alice_sees["view"]
    for e in sim.entities:
        overlaps = e.x < v["x"] + v["w"] and v["x"] < e.x + max(e.width, 1) and \
            e.y < v["y"] + v["h"] and v["y"] < e.y + max(e.height, 1)
        assert overlaps == (str(e.id) in {s["id"] for s in alice_sees["entities"]}), e


def test_the_score_table_ranks_the_best_ten_and_is_seen_through_the_fog():
    sim = walkers(30, 4, fog_radius=1)
    players = [uuid.UUID(int=i + 1) for i in range(12)]
    for i, p in enumerate(players):
        a = avatar(f"p{i:02d}", p, 2 * i, 1)
        a.metadata["score"] = i % 5
        sim.place(a)
        sim.join(p)
    sim.tick()
    want = sorted(((i % 5, f"p{i:02d}") for i in range(12)), key=lambda t: (-t[0], t[1]))[:10]
    first, last = sim.state_for(players[0]), sim.state_for(players[-1])
    assert first["scores"] == [{"name": n, "score": s} for s, n in want]
    assert last["scores"] == first["scores"] and len(first["entities"]) == 1  # the fog hides the others


def test_without_fog_everyone_sees_the_whole_zone():
    sim = walkers(20, 4)
    sim.place(EntityCreate(3, 0, 1, 4, WALL), avatar("alice", ALICE, 1, 1), avatar("bob", BOB, 15, 1))
    sim.join(ALICE)
    sim.join(BOB)
    sim.tick()
    assert len(sim.state_for(ALICE)["entities"]) == 3 and sim.state_for(ALICE) == sim.state_for(BOB)


def test_a_player_who_leaves_takes_their_avatar_away():
    sim = walkers()
    sim.join(ALICE)
    sim.join(BOB)
    sim.tick()
    mine = [e for e in of_kind(sim, "avatar") if e.metadata["player_id"] == str(ALICE)][0]
    sim.leave(ALICE)
    sim.tick()
    assert where(sim, ALICE) is None and sim.entity(mine.id) is None and where(sim, BOB) is not None


def test_a_new_zone_gets_walls_and_items_that_stay_off_the_avatars():
    sim = walkers(16, 16, walls=4, items=3)
    sim.join(ALICE)
    sim.tick()
    walls = of_kind(sim, "wall")
    assert 1 <= len(walls) <= 4 and len(of_kind(sim, "item")) == 3
    wall_cells = {(w.x + i, w.y + j) for w in walls for i in range(w.width) for j in range(w.height)}
    assert where(sim, ALICE) not in wall_cells
    sim.tick(5)
    assert of_kind(sim, "wall") == walls  # laid out once


def test_walkers_is_deterministic():
    """Each tick runs twice from the same state (``verify``), and two sims with the same seed
    and the same calls make the same world: what the server's replay after a crash needs."""
    def play(seed: int) -> list:
        sim = ZoneSim("game_modules.walkers", 12, 12, settings={"walls": 6, "items": 10}, seed=seed, verify=True)
        sim.join(ALICE)
        sim.join(BOB)
        for direction in ["up", "left", "left", "down", "right", "down", "down", "left"]:
            sim.intent(ALICE, {"move": direction})
            sim.intent(BOB, {"move": direction})
            sim.tick()
            assert sim.last_error is None
        return [(e.id, e.x, e.y, e.width, e.height, e.metadata) for e in sim.entities]

    assert play(seed=1) == play(seed=1)
    assert play(seed=1) != play(seed=2)
