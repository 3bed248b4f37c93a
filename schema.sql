CREATE TABLE IF NOT EXISTS players (
    id            UUID PRIMARY KEY,
    username      TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    last_login    TIMESTAMPTZ,
    CONSTRAINT players_username_key UNIQUE (username)
);

CREATE TABLE IF NOT EXISTS sessions (
    token_digest TEXT PRIMARY KEY,
    player_id    UUID NOT NULL REFERENCES players (id) ON DELETE CASCADE,
    created_at   TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS sessions_player_id_idx ON sessions (player_id);

CREATE TABLE IF NOT EXISTS zones (
    id         UUID PRIMARY KEY,
    name       TEXT NOT NULL,
    width      INTEGER NOT NULL CHECK (width > 0),
    height     INTEGER NOT NULL CHECK (height > 0),
    metadata   JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    tick_number BIGINT NOT NULL DEFAULT 0,
    members    TEXT NOT NULL DEFAULT '[]',
    CONSTRAINT zones_name_key UNIQUE (name)
);
ALTER TABLE zones ADD COLUMN IF NOT EXISTS tick_number BIGINT NOT NULL DEFAULT 0;
ALTER TABLE zones ADD COLUMN IF NOT EXISTS members TEXT NOT NULL DEFAULT '[]';
-- Cluster: the node ticking the zone, its fencing number (grows at every change of owner)
-- and until when its claim lasts without renewal (one node: owner stays NULL, epoch 0).
ALTER TABLE zones ADD COLUMN IF NOT EXISTS owner TEXT;
ALTER TABLE zones ADD COLUMN IF NOT EXISTS epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE zones ADD COLUMN IF NOT EXISTS lease_until TIMESTAMPTZ;

CREATE TABLE IF NOT EXISTS entities (
    id         UUID PRIMARY KEY,
    zone_id    UUID NOT NULL REFERENCES zones (id) ON DELETE CASCADE,
    x          INTEGER NOT NULL CHECK (x >= 0),
    y          INTEGER NOT NULL CHECK (y >= 0),
    width      INTEGER NOT NULL CHECK (width >= 0),
    height     INTEGER NOT NULL CHECK (height >= 0),
    metadata   JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS entities_zone_id_idx ON entities (zone_id);
-- The fencing number of the zone's owner when the row was written.
ALTER TABLE entities ADD COLUMN IF NOT EXISTS epoch BIGINT NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS journal (
    zone_id     UUID NOT NULL REFERENCES zones (id) ON DELETE CASCADE,
    tick_number BIGINT NOT NULL,
    seed        BIGINT NOT NULL,
    at          DOUBLE PRECISION NOT NULL,
    inputs      TEXT NOT NULL,
    PRIMARY KEY (zone_id, tick_number)
);
ALTER TABLE journal ADD COLUMN IF NOT EXISTS epoch BIGINT NOT NULL DEFAULT 0;
-- A tick's inputs (kilobytes a zone) are compressed with lz4 where the server has it
-- (PostgreSQL 14 and later, built with it): written in about two thirds of the time the
-- default (pglz) takes. Elsewhere the default stays.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'journal'::regclass AND attname = 'inputs'
               AND attcompression <> 'l') THEN
        ALTER TABLE journal ALTER COLUMN inputs SET COMPRESSION lz4;
    END IF;
EXCEPTION WHEN OTHERS THEN
    NULL;
END
$$;

CREATE TABLE IF NOT EXISTS snapshots (
    zone_id     UUID NOT NULL REFERENCES zones (id) ON DELETE CASCADE,
    tick_number BIGINT NOT NULL,
    entities    TEXT NOT NULL,
    PRIMARY KEY (zone_id, tick_number)
);

-- Cluster: the nodes that have been seen, each renewing its row with its leases.
CREATE TABLE IF NOT EXISTS nodes (
    name        TEXT PRIMARY KEY,
    started_at  TIMESTAMPTZ NOT NULL,
    last_seen   TIMESTAMPTZ NOT NULL,
    connections INTEGER NOT NULL DEFAULT 0
);
