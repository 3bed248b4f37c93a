"""Walkers: the example game that uses every part of the gridserver module interface.

* Every player who subscribes to a zone gets an avatar (a 1x1 entity), spawned on a free
  cell by ``on_player_join`` and removed by ``on_player_leave``.
* Intents move avatars one cell: ``{"move": "up" | "down" | "left" | "right"}`` or
  ``{"dx": -1..1, "dy": -1..1}``. The last move a player sent in a tick counts.
* Walls are sized entities; a move into a cell a wall overlaps (an overlap query) is refused.
  Two avatars never share a cell.
* Items are 0x0 points. Stepping on one (an area query) picks it up: it is deleted, the
  avatar's ``score`` grows by its ``value`` and a new item appears elsewhere.
* Every entity's metadata has a ``color`` (and avatars a ``label``), copied into the tick
  state, which is how the page served at ``/`` knows how to draw them.
* Fog of war: with ``fog_radius`` > 0 a player sees only entities within that many cells of
  their avatar (``get_player_state``); with 0 everyone sees the whole zone, and the server
  serializes the state once per zone.

Settings, in the INI section named after the module::

    [game_modules.walkers]
    fog_radius = 8        ; 0: no fog
    walls = 6             ; walls placed in a new zone
    items = 10            ; items kept in each zone
    lobby_size = 32       ; the zone created when there is none
"""

from __future__ import annotations

import random
import uuid

from gridserver import EntityCreate, EntityUpdate, FrameworkAPI, TickResult

_fw: FrameworkAPI  # set by on_init, before any other call
_DEFAULTS = {"fog_radius": 8, "walls": 6, "items": 10, "lobby_size": 32}
_settings = dict(_DEFAULTS)
_avatars: dict = {}    # zone_id -> {player_id: avatar entity id}
_positions: dict = {}  # zone_id -> {player_id: (x, y)} after the last tick
_seeded: set = set()
_views: dict = {}      # zone_id -> {id(entity): (entity, metadata, state entry)}: entries reused while unchanged
_rng = random.Random()
_MOVES = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}


def on_init(framework):
    global _fw
    _fw = framework
    _avatars.clear()
    _positions.clear()
    _seeded.clear()
    _views.clear()
    for key, default in _DEFAULTS.items():
        _settings[key] = framework.setting(key, default, int)
    if not framework.list_zones():
        size = _settings["lobby_size"]
        framework.create_zone("lobby", size, size, {"game": "walkers"})
        framework.logger.info("walkers: created the zone 'lobby' (%dx%d)", size, size)


def _kind(e) -> str:
    return e.metadata.get("kind", "")


def _free_cell(zone, taken: set, rng: random.Random):
    """A random cell no wall overlaps and no avatar or item stands on."""
    for _ in range(200):
        x, y = rng.randrange(zone.width), rng.randrange(zone.height)
        if (x, y) in taken:
            continue
        if _fw.query_overlap(zone.id, x, y, 1, 1) or _fw.query_area(zone.id, x, y, 1, 1):
            continue
        return x, y
    return None


def on_player_join(zone_id, player_id):
    avatars = _avatars.setdefault(zone_id, {})
    positions = _positions.setdefault(zone_id, {})
    for e in _fw.list_entities(zone_id):  # an avatar kept from before a restart
        if _kind(e) == "avatar" and e.metadata.get("player_id") == str(player_id):
            avatars[player_id] = e.id
            positions[player_id] = (e.x, e.y)
            return None
    zone = _fw.get_zone(zone_id)
    cell = _free_cell(zone, set(positions.values()), _rng)
    if cell is None:
        return None  # a full zone: the player watches without an avatar
    eid = uuid.uuid4()
    avatars[player_id] = eid
    positions[player_id] = cell
    name = _fw.username(player_id) or str(player_id)[:8]
    meta = {"kind": "avatar", "player_id": str(player_id), "name": name, "score": 0, "color": "#2f7ed8",
            "label": name}
    return TickResult(entity_creates=[EntityCreate(cell[0], cell[1], 1, 1, meta, id=eid)])


def on_player_leave(zone_id, player_id):
    eid = _avatars.get(zone_id, {}).pop(player_id, None)
    _positions.get(zone_id, {}).pop(player_id, None)
    if eid is None or _fw.get_entity(eid) is None:
        return None
    return TickResult(entity_deletes=[eid])


def _seed(zone, entities, rng):
    """Walls and items for a zone that has none yet."""
    creates = []
    taken: set = set()
    if not any(_kind(e) == "wall" for e in entities):
        for _ in range(_settings["walls"]):
            horizontal = rng.random() < 0.5
            length = rng.randint(2, max(2, min(zone.width, zone.height) // 3))
            w, h = (length, 1) if horizontal else (1, length)
            if w > zone.width or h > zone.height:
                continue
            x, y = rng.randrange(zone.width - w + 1), rng.randrange(zone.height - h + 1)
            creates.append(EntityCreate(x, y, w, h, {"kind": "wall", "color": "#555555"}, id=uuid.uuid4()))
            taken.update((x + i, y + j) for i in range(w) for j in range(h))
    return creates, taken


def on_tick(zone_id, entities, intents, tick_number):
    zone = _fw.get_zone(zone_id)
    assert zone is not None  # a zone ticks only while it exists
    rng = _rng
    avatars = _avatars.get(zone_id, {})
    creates, updates, deletes = [], [], []
    if zone_id not in _seeded:
        _seeded.add(zone_id)
        walls, _ = _seed(zone, entities, rng)
        creates += walls
    pos, by_id, items_left = {}, {}, 0
    for e in entities:
        kind = e.metadata.get("kind")
        if kind == "avatar":
            pos[e.id] = (e.x, e.y)
            by_id[e.id] = e
        elif kind == "item":
            items_left += 1
    occupied = {p: eid for eid, p in pos.items()}
    wanted: dict = {}
    for intent in intents:  # arrival order: the last move of a player wins
        d = intent.data
        step = _MOVES.get(d.get("move")) if isinstance(d.get("move"), str) else None
        if step is None and isinstance(d.get("dx", 0), int) and isinstance(d.get("dy", 0), int):
            dx, dy = d.get("dx", 0), d.get("dy", 0)
            if (dx, dy) != (0, 0) and abs(dx) <= 1 and abs(dy) <= 1:
                step = (dx, dy)
        if step is not None:
            wanted[intent.player_id] = step
    picked = set()
    scores = {}
    for player_id, (dx, dy) in wanted.items():
        eid = avatars.get(player_id)
        if eid not in pos:
            continue
        x, y = pos[eid]
        nx, ny = x + dx, y + dy
        if not (0 <= nx < zone.width and 0 <= ny < zone.height) or (nx, ny) in occupied:
            continue
        if any(_kind(w) == "wall" for w in _fw.query_overlap(zone_id, nx, ny, 1, 1, exclude=eid)):
            continue
        del occupied[(x, y)]
        occupied[(nx, ny)] = eid
        pos[eid] = (nx, ny)
        gained = 0
        for thing in _fw.query_area(zone_id, nx, ny, 1, 1):
            if _kind(thing) == "item" and thing.id not in picked:
                picked.add(thing.id)
                gained += int(thing.metadata.get("value", 1))
        meta = None
        if gained:
            meta = dict(by_id[eid].metadata)
            meta["score"] = meta.get("score", 0) + gained
            scores[eid] = meta["score"]
        updates.append(EntityUpdate(eid, x=nx, y=ny, metadata=meta))
    deletes += list(picked)
    items_left -= len(picked)
    taken = set(occupied)
    while items_left < _settings["items"]:
        cell = _free_cell(zone, taken, rng)
        if cell is None:
            break
        taken.add(cell)
        creates.append(EntityCreate(cell[0], cell[1], 0, 0, {"kind": "item", "value": 1, "color": "#e8b000"},
                                    id=uuid.uuid4()))
        items_left += 1
    positions = _positions.setdefault(zone_id, {})
    for player_id, eid in avatars.items():
        if eid in pos:
            positions[player_id] = pos[eid]
    views = _views.setdefault(zone_id, {})
    if len(views) > 2 * len(entities) + 64:
        views.clear()  # entities that are gone
    state = []
    for e in entities:
        if picked and e.id in picked:
            continue
        if e.id in pos:
            x, y = pos[e.id]
            state.append(_entry(views, e, x, y, scores.get(e.id)))
        else:
            state.append(_entry(views, e, e.x, e.y, None))
    for c in creates:
        state.append({"id": str(c.id), "x": c.x, "y": c.y, "w": c.width, "h": c.height, "kind": c.metadata["kind"],
                      **_look(c.metadata)})
    return TickResult(entity_creates=creates, entity_updates=updates, entity_deletes=deletes,
                      broadcast_state={"tick": tick_number, "entities": state})


def _entry(views: dict, e, x: int, y: int, score) -> dict:
    """The entity's entry in the tick state; the one built last tick when nothing changed."""
    cached = views.get(id(e))
    if (cached is not None and cached[0] is e and cached[1] is e.metadata and score is None
            and cached[2]["x"] == x and cached[2]["y"] == y and cached[2]["w"] == e.width
            and cached[2]["h"] == e.height):
        return cached[2]
    meta = e.metadata
    item = {"id": str(e.id), "x": x, "y": y, "w": e.width, "h": e.height, "kind": meta.get("kind", "")}
    item.update(_look(meta))
    if item["kind"] == "avatar":
        item.update(player_id=meta.get("player_id"), name=meta.get("name"),
                    score=meta.get("score", 0) if score is None else score)
    if score is None:
        views[id(e)] = (e, meta, item)
    return item


def _look(metadata) -> dict:
    """``color`` and ``label`` from an entity's metadata, for the state: the browser page draws with them."""
    return {k: metadata[k] for k in ("color", "label") if k in metadata}


def get_player_state(zone_id, player_id, full_state):
    radius = _settings["fog_radius"]
    if radius <= 0:
        return full_state
    here = _positions.get(zone_id, {}).get(player_id)
    if here is None:
        return {"tick": full_state.get("tick"), "entities": [], "fog_radius": radius}
    x0, y0 = here
    visible = [e for e in full_state["entities"]
               if e["x"] - radius <= x0 and x0 < e["x"] + max(e["w"], 1) + radius
               and e["y"] - radius <= y0 and y0 < e["y"] + max(e["h"], 1) + radius]
    return {"tick": full_state.get("tick"), "entities": visible, "fog_radius": radius}
