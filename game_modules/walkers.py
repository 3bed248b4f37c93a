"""Walkers: the example game that uses every part of the gridserver module interface.

* Every player who subscribes to a zone gets an avatar (a 1x1 entity), spawned on a free
  cell by ``on_player_join`` and removed by ``on_player_leave``.
* Intents move avatars one cell: ``{"move": "up" | "down" | "left" | "right"}`` or
  ``{"dx": -1..1, "dy": -1..1}``. The last move a player sent in a tick counts.
* Walls are sized entities; a move into a cell a wall covers is refused. Two avatars never
  share a cell.
* Items are 0x0 points. Stepping on one picks it up: it is deleted, the avatar's ``score``
  grows by its ``value`` and a new item appears elsewhere.
* ``on_tick`` walks the zone's entities once and learns from that walk which cells walls
  cover and which items lie where, so a move costs a few dictionary lookups; a new avatar
  or item is placed with the spatial queries (``query_overlap`` for walls, ``query_area``
  for what stands there), which look only at the cells asked about.
* Every entity's metadata has a ``color`` (and avatars a ``label``), copied into the tick
  state, which is how the page served at ``/`` knows how to draw them.
* Fog of war: with ``fog_radius`` > 0 a player sees only entities within that many cells of
  their avatar (``get_player_state``), and the state's ``view`` names those cells (the page
  dims the others); with 0 everyone sees the whole zone, and the server serializes the state
  once per zone.
* The state's ``scores`` is the zone's best ten (name and score), seen through the fog too.

Deterministic, so the server can replay journaled ticks after a crash through a freshly
started module, from a world saved ticks earlier:

* A tick's changes depend only on the zone's entities (not on their order), the tick's
  intents and events, ``framework.random`` (seeded per zone tick, the same on replay: every
  random number and every id made here comes from it) and, for a new avatar's name,
  ``framework.username``. No clock: time would be the tick number times
  ``framework.tick_interval``.
* Facts live in the entities only: a player's avatar is the entity with ``kind == "avatar"``
  and their ``player_id``; a zone has been seeded when it has walls.
* Module memory holds the settings and caches that cannot change a result: what this tick's
  join and leave hooks did (for its ``on_tick``, dropped when another tick comes), the
  avatars' cells (for ``get_player_state``, used only with the state they were made with)
  and state entries (reused only for the unchanged entity they were made from). A game that
  copies this one must keep nothing else from one tick to the next.

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
_MOVES = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}

# Caches, per zone (a module's zones may tick on different threads at once; each zone's own
# calls never overlap). None of them carries a fact from one tick into the next.
_hooks: dict = {}      # zone_id -> _HookWork of the zone tick under way (join/leave hooks -> on_tick)
_positions: dict = {}  # zone_id -> (the tick's state, {player_id str: (x, y)}) for get_player_state
_views: dict = {}      # zone_id -> {id(entity): (entity, metadata, state entry)}: entries reused while unchanged
#: The shape of the state entries ``_views`` holds: change it when ``_state_entry`` changes,
#: and a hot reload starts the views afresh instead of reusing entries of the old shape.
VIEW_FORMAT = 1


class _HookWork:
    """What the join and leave hooks of one zone tick did, for the hooks after them and for
    that tick's ``on_tick`` (their results are applied only after it). Tagged with the tick's
    ``framework.random`` (a new generator every zone tick): it is never used by another tick,
    not even when a hook raised and ``on_tick`` never came to take it."""

    __slots__ = ("rng", "avatars", "joined", "left")

    def __init__(self, rng: random.Random, zone_id):
        self.rng = rng
        self.avatars: dict = {}  # player_id str -> [avatar entities] at the start of the tick
        for e in _fw.list_entities(zone_id):
            if _kind(e) == "avatar":
                self.avatars.setdefault(e.metadata.get("player_id"), []).append(e)
        self.joined: dict = {}   # player_id str -> EntityCreate of the avatar made by a join
        self.left: set = set()   # ids of the avatars deleted by leaves


def _hook_work(zone_id) -> _HookWork:
    rng = _fw.random
    work = _hooks.get(zone_id)
    if work is None or work.rng is not rng:
        work = _hooks[zone_id] = _HookWork(rng, zone_id)
    return work


def on_init(framework):
    global _fw
    _fw = framework
    _hooks.clear()
    _positions.clear()
    _views.clear()
    for key, default in _DEFAULTS.items():
        _settings[key] = framework.setting(key, default, int)
    if not framework.list_zones():
        size = _settings["lobby_size"]
        framework.create_zone("lobby", size, size, {"game": "walkers"})
        framework.logger.info("walkers: created the zone 'lobby' (%dx%d)", size, size)


def on_reload(previous):
    """A hot reload (``POST /api/debug/module/reload``, ``gridserver --reload``): this code
    replaces ``previous`` (the old module) between two ticks. What it kept per zone carries
    over when its shape is the same, so the first tick after a reload does not build every
    zone's state entries again."""
    if getattr(previous, "VIEW_FORMAT", None) == VIEW_FORMAT:
        _views.update(previous._views)
        _positions.update(previous._positions)
    _fw.logger.info("walkers: reloaded; the views of %d zone(s) carried over", len(_views))


def on_zone_deleted(zone_id):
    """The zone is gone: so is what was kept for it."""
    for cache in (_hooks, _positions, _views):
        cache.pop(zone_id, None)


def _kind(e) -> str:
    return e.metadata.get("kind", "")


def _cells(e):
    """The cells an entity covers; a point (no width or no height) is on its own cell, as the
    area query sees it."""
    if e.width == 0 or e.height == 0 or (e.width == 1 and e.height == 1):
        return ((e.x, e.y),)
    return [(e.x + i, e.y + j) for i in range(e.width) for j in range(e.height)]


def _new_id(rng: random.Random) -> uuid.UUID:
    """An id for an entity this module creates and must name in the same tick (the same on replay)."""
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def _free_cell(zone, taken: set, rng: random.Random):
    """A random cell no wall overlaps and no avatar or item stands on (nor any cell in ``taken``)."""
    for _ in range(200):
        x, y = rng.randrange(zone.width), rng.randrange(zone.height)
        if (x, y) in taken:
            continue
        if _fw.query_overlap(zone.id, x, y, 1, 1) or _fw.query_area(zone.id, x, y, 1, 1):
            continue
        return x, y
    return None


def on_player_join(zone_id, player_id):
    work = _hook_work(zone_id)
    key = str(player_id)
    if work.avatars.get(key) or key in work.joined:
        return None  # an avatar kept from before (a restart, say): it is theirs again
    zone = _fw.get_zone(zone_id)
    if zone is None:
        return None
    cell = _free_cell(zone, {(c.x, c.y) for c in work.joined.values()}, work.rng)
    if cell is None:
        return None  # a full zone: the player watches without an avatar
    name = _fw.username(player_id) or key[:8]
    meta = {"kind": "avatar", "player_id": key, "name": name, "score": 0, "color": "#2f7ed8", "label": name}
    create = EntityCreate(cell[0], cell[1], 1, 1, meta, id=_new_id(work.rng))
    work.joined[key] = create
    return TickResult(entity_creates=[create])


def on_player_leave(zone_id, player_id):
    work = _hook_work(zone_id)
    key = str(player_id)
    gone = [e.id for e in work.avatars.pop(key, ())]
    created = work.joined.pop(key, None)
    if created is not None:
        gone.append(created.id)  # created by a join of this same tick: deleting it is allowed
    work.left.update(gone)
    return TickResult(entity_deletes=gone) if gone else None


def _walls(zone, occupied, rng) -> list:
    """Walls for a zone that has none yet, clear of the avatars."""
    creates = []
    for _ in range(_settings["walls"]):
        horizontal = rng.random() < 0.5
        length = rng.randint(2, max(2, min(zone.width, zone.height) // 3))
        w, h = (length, 1) if horizontal else (1, length)
        if w > zone.width or h > zone.height:
            continue
        x, y = rng.randrange(zone.width - w + 1), rng.randrange(zone.height - h + 1)
        if any((x + i, y + j) in occupied for i in range(w) for j in range(h)):
            continue
        creates.append(EntityCreate(x, y, w, h, {"kind": "wall", "color": "#555555"}, id=_new_id(rng)))
    return creates


def on_tick(zone_id, entities, intents, tick_number):
    zone = _fw.get_zone(zone_id)
    assert zone is not None  # a zone ticks only while it exists
    rng = _fw.random
    work = _hooks.pop(zone_id, None)
    if work is not None and work.rng is not rng:
        work = None  # left by a tick that failed in a hook
    joined = work.joined if work is not None else {}
    left = work.left if work is not None else set()

    # Everything known comes from the entities, in one walk: the avatars, the cells walls
    # cover, the items on each cell. (Entities are keyed by themselves here, not by id: an
    # entity hashes by identity, in C, where a UUID hashes in Python.)
    pos: dict = {}     # avatar -> (x, y), after this tick's moves
    first: dict = {}   # player_id str -> their avatar (the lowest id, should there be two)
    walled: set = set()  # cells a wall covers
    items_at: dict = {}  # cell -> the items on it
    items_left, has_walls = 0, False
    for e in entities:
        kind = e.metadata.get("kind")
        if kind == "avatar":
            pos[e] = (e.x, e.y)
            owner = e.metadata.get("player_id")
            if owner not in first or e.id.int < first[owner].id.int:
                first[owner] = e
        elif kind == "item":
            items_left += 1
            for cell in _cells(e):
                items_at.setdefault(cell, []).append(e)
        elif kind == "wall":
            has_walls = True
            if e.width > 0 and e.height > 0:  # a wall with no area blocks nothing
                walled.update(_cells(e))
    mine = {owner: e for owner, e in first.items() if e.id not in left} if left else first  # may move
    occupied = {p: e for e, p in pos.items()}
    for c in joined.values():  # avatars this tick's joins make (the state shows them next tick)
        occupied[(c.x, c.y)] = c

    creates: list = []
    updates: list = []
    deletes: list = []
    taken: set = set()  # cells of what this tick creates
    if not has_walls and _settings["walls"] > 0:
        creates += _walls(zone, occupied, rng)
        for c in creates:
            taken.update((c.x + i, c.y + j) for i in range(c.width) for j in range(c.height))

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
    picked: dict = {}  # item id -> None, in the order picked
    scores = {}
    for player_id, (dx, dy) in wanted.items():
        avatar = mine.get(str(player_id))
        if avatar is None:
            continue
        x, y = pos[avatar]
        nx, ny = x + dx, y + dy
        cell = (nx, ny)
        if not (0 <= nx < zone.width and 0 <= ny < zone.height) or cell in occupied or cell in taken \
                or cell in walled:
            continue
        del occupied[(x, y)]
        occupied[cell] = avatar
        pos[avatar] = cell
        gained = 0
        for thing in items_at.get(cell, ()):
            if thing.id not in picked:
                picked[thing.id] = None
                gained += int(thing.metadata.get("value", 1))
        meta = None
        if gained:
            meta = dict(avatar.metadata)
            meta["score"] = meta.get("score", 0) + gained
            scores[avatar] = meta["score"]
        updates.append(EntityUpdate(avatar.id, x=nx, y=ny, metadata=meta))
    deletes += picked
    items_left -= len(picked)
    taken.update(occupied)
    while items_left < _settings["items"]:
        cell = _free_cell(zone, taken, rng)
        if cell is None:
            break
        taken.add(cell)
        creates.append(EntityCreate(cell[0], cell[1], 0, 0, {"kind": "item", "value": 1, "color": "#e8b000"},
                                    id=_new_id(rng)))
        items_left += 1

    # The state: the entities with this tick's moves, pickups and creates (what the join and
    # leave hooks did shows in the next tick's).
    views = _views.setdefault(zone_id, {})
    if len(views) > 2 * len(entities) + 64:
        views.clear()  # entities that are gone
    state = []
    for e in entities:
        if picked and e.id in picked:
            continue
        here = pos.get(e)
        if here is not None:
            state.append(_entry(views, e, here[0], here[1], scores.get(e) if scores else None))
        else:
            state.append(_entry(views, e, e.x, e.y, None))
    for c in creates:
        state.append(_state_entry(c.id, c.x, c.y, c.width, c.height, c.metadata, None))
    cells = {owner: pos[e] for owner, e in first.items()}  # where each player's avatar is in the state
    broadcast = {"tick": tick_number, "entities": state, "scores": _scores(state)}
    _positions[zone_id] = (broadcast, cells)
    return TickResult(entity_creates=creates, entity_updates=updates, entity_deletes=deletes,
                      broadcast_state=broadcast)


def _entry(views: dict, e, x: int, y: int, score) -> dict:
    """The entity's entry in the tick state; the one built last tick when nothing changed
    (the same entity, the same metadata object, the same rectangle: the same entry), or a
    copy of it with the new cell when only the cell changed."""
    cached = views.get(id(e))
    if cached is not None and cached[0] is e and cached[1] is e.metadata and score is None:
        item = cached[2]
        if item["w"] == e.width and item["h"] == e.height:
            if item["x"] == x and item["y"] == y:
                return item
            item = dict(item)  # last tick's state keeps its own
            item["x"], item["y"] = x, y
            views[id(e)] = (e, e.metadata, item)
            return item
    item = _state_entry(e.id, x, y, e.width, e.height, e.metadata, score)
    if score is None:
        views[id(e)] = (e, e.metadata, item)
    return item


def _state_entry(eid, x: int, y: int, w: int, h: int, meta, score) -> dict:
    item = {"id": str(eid), "x": x, "y": y, "w": w, "h": h, "kind": meta.get("kind", "")}
    item.update(_look(meta))
    if item["kind"] == "avatar":
        item.update(player_id=meta.get("player_id"), name=meta.get("name"),
                    score=meta.get("score", 0) if score is None else score)
    return item


def _scores(state: list) -> list:
    """The score table: the best ten avatars, highest score first (ties by name, then id)."""
    best = sorted((-e["score"], e.get("name") or "", e["id"]) for e in state if e["kind"] == "avatar")[:10]
    return [{"name": name, "score": -score} for score, name, _ in best]


def _look(metadata) -> dict:
    """``color`` and ``label`` from an entity's metadata, for the state: the browser page draws with them."""
    return {k: metadata[k] for k in ("color", "label") if k in metadata}


def get_player_state(zone_id, player_id, full_state):
    radius = _settings["fog_radius"]
    if radius <= 0:
        return full_state
    key = str(player_id)
    cached = _positions.get(zone_id)
    if cached is not None and cached[0] is full_state:
        here = cached[1].get(key)
    else:  # not the state on_tick just made: find the avatar in it (the lowest id, as on_tick does)
        found = min(((e["id"], e["x"], e["y"]) for e in full_state.get("entities", ())
                     if e.get("kind") == "avatar" and e.get("player_id") == key), default=None)
        here = None if found is None else found[1:]
    scores = full_state.get("scores", [])
    if here is None:
        return {"tick": full_state.get("tick"), "entities": [], "scores": scores, "fog_radius": radius, "view": []}
    x0, y0 = here
    visible = [e for e in full_state["entities"]
               if e["x"] - radius <= x0 and x0 < e["x"] + max(e["w"], 1) + radius
               and e["y"] - radius <= y0 and y0 < e["y"] + max(e["h"], 1) + radius]
    # "view": the cells this player sees (the page dims the others); an entity is visible when
    # it overlaps them
    view = {"x": x0 - radius, "y": y0 - radius, "w": 2 * radius + 1, "h": 2 * radius + 1}
    return {"tick": full_state.get("tick"), "entities": visible, "scores": scores, "fog_radius": radius,
            "view": view}
