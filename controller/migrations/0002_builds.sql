-- Builds: versions of an application's server that profiles launch (DESIGN.md §1, §4.1).
CREATE TABLE builds (
    id TEXT PRIMARY KEY,
    application_id INTEGER NOT NULL,
    body TEXT NOT NULL
);
