-- Berth controller schema. Entities are stored as JSON bodies beside the few columns that
-- need an index or a constraint; the controller loads everything into memory at start.

CREATE TABLE regions (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL
);

CREATE TABLE dc_locations (
    id INTEGER PRIMARY KEY,
    region_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (region_id, name)
);

CREATE TABLE deployment_environments (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL
);

CREATE TABLE applications (
    id INTEGER PRIMARY KEY,
    body TEXT NOT NULL
);

CREATE TABLE profiles (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL
);

CREATE TABLE fleets (
    id INTEGER PRIMARY KEY,
    body TEXT NOT NULL
);

CREATE TABLE hosts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL
);

CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    host_id INTEGER NOT NULL,
    application_id INTEGER NOT NULL,
    removed_at INTEGER,
    body TEXT NOT NULL
);
CREATE INDEX instances_live ON instances (removed_at);

-- Active allocations have released_at NULL. The partial unique indexes are the last line of
-- defence against two matchmakers on one instance and against two allocations for one key.
CREATE TABLE allocations (
    id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    idempotency_key TEXT,
    created_at INTEGER NOT NULL,
    released_at INTEGER,
    body TEXT NOT NULL
);
CREATE UNIQUE INDEX allocations_active_instance ON allocations (instance_id) WHERE released_at IS NULL;
CREATE UNIQUE INDEX allocations_active_key ON allocations (idempotency_key)
    WHERE released_at IS NULL AND idempotency_key IS NOT NULL;

CREATE TABLE error_stories (
    identifier TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX error_stories_age ON error_stories (created_at);
