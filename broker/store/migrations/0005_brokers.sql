-- Several brokers on one store (PostgreSQL): each running broker holds a lease row, renewed
-- while it lives; the live broker that started first is the leader (it runs the schedulers).
-- A job records the broker that runs it, so the leader takes over only jobs whose broker is gone.
-- Times are the store's own clock, so broker clocks never decide who leads.
CREATE TABLE brokers (
    id TEXT PRIMARY KEY,                -- one broker process (a new id at every start)
    description TEXT NOT NULL DEFAULT '', -- host, pid and addresses, for operators
    started_at REAL NOT NULL,           -- when this id joined (store clock)
    expires_at REAL NOT NULL            -- renewed by the broker; gone (and not leading) after it
);

ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
