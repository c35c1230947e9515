-- Fleets deleted through this database. The reconciler removes the idle instances of a fleet
-- listed here; those of a fleet this database never had (a new, wrong or restored database)
-- are left running and reported instead, so that such a database cannot empty the hosts.
CREATE TABLE deleted_fleets (
    id INTEGER PRIMARY KEY,
    deleted_at INTEGER NOT NULL
);
