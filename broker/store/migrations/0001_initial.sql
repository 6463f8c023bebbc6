-- Foundation schema: vault metadata, registration keys, servers, operators, jobs, commands.
-- Times are UTC seconds since the epoch (REAL / double precision), ids are text.

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE registration_keys (
    id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    secret_hash BLOB NOT NULL,          -- HMAC-SHA256(key id, secret); the secret is never stored
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    uses_total INTEGER NOT NULL,
    uses_remaining INTEGER NOT NULL CHECK (uses_remaining >= 0),
    revoked_at REAL,
    created_by TEXT NOT NULL
);

CREATE TABLE servers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    site TEXT NOT NULL,
    registered_at REAL NOT NULL,
    registration_key_id TEXT NOT NULL,
    cert_serial TEXT NOT NULL,
    cert_not_after REAL NOT NULL,
    facts_json TEXT NOT NULL DEFAULT '{}',
    agent_version TEXT NOT NULL DEFAULT '',
    cloud TEXT NOT NULL DEFAULT '',
    connected INTEGER NOT NULL DEFAULT 0,
    connected_since REAL,
    disconnected_at REAL,
    last_heartbeat_at REAL,             -- broker clock, when the heartbeat was stored
    last_heartbeat_sent_at REAL,        -- agent clock, when it was sent
    last_heartbeat_seq INTEGER,
    metrics_json TEXT NOT NULL DEFAULT '{}',
    removed_at REAL
);
CREATE UNIQUE INDEX servers_active_name ON servers (site, name) WHERE removed_at IS NULL;

CREATE TABLE server_inventory (
    server_id TEXT PRIMARY KEY REFERENCES servers (id),
    digest TEXT NOT NULL,
    collected_at REAL NOT NULL,
    received_at REAL NOT NULL,
    payload BLOB NOT NULL               -- serialized sitepair.v1.Inventory
);

CREATE TABLE operators (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    cert_serial TEXT NOT NULL,
    cert_not_after REAL NOT NULL,
    removed_at REAL
);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    created_by TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    params_json TEXT NOT NULL DEFAULT '{}',
    result_json TEXT NOT NULL DEFAULT ''
);
CREATE INDEX jobs_state ON jobs (state);
CREATE INDEX jobs_created ON jobs (created_at);

CREATE TABLE job_steps (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at REAL,
    finished_at REAL,
    message TEXT NOT NULL DEFAULT '',
    progress_done INTEGER NOT NULL DEFAULT 0,
    progress_total INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE commands (
    id TEXT PRIMARY KEY,
    server_id TEXT NOT NULL REFERENCES servers (id),
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,              -- serialized sitepair.v1.Command
    state TEXT NOT NULL,                -- pending, delivered, succeeded, failed, cancelled
    created_at REAL NOT NULL,
    delivered_at REAL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    completed_at REAL,
    result_json TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    job_id TEXT,
    job_step INTEGER
);
CREATE INDEX commands_open ON commands (server_id, state);
