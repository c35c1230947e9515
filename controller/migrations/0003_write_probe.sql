-- One row the database writer rewrites, while its commits fail and it has nothing else to
-- write, to learn when the disk takes writes again.
CREATE TABLE write_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at INTEGER NOT NULL
);
