-- Hosts an operator deleted (a machine taken out of service). Kept so that a host id is never
-- given to another machine (its old instances, allocations and logs name it) and so that a
-- lookup of a deleted host says when it went.
CREATE TABLE deleted_hosts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    deleted_at INTEGER NOT NULL
);
