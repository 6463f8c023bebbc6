-- Each replication cycle the broker saw commit, from its primary's reports: what the dashboard's
-- cycle charts draw (size, duration and lag over time). Host clock, unix seconds. A relationship
-- keeps its newest rows only (broker/store/repo/cycles.py).
CREATE TABLE cycles (
    relationship_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    finished_at REAL NOT NULL,
    cut_at REAL NOT NULL,
    seconds REAL NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (relationship_id, sequence)
);
