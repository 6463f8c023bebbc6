-- Disaster-recovery drills of recovery plans: each drill (run, failed, or skipped with its
-- reason) and its evidence, and each plan's drill schedule (kept across broker restarts).
CREATE TABLE drills (
    id TEXT PRIMARY KEY,
    plan TEXT NOT NULL,
    job_id TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,                -- running, passed, failed, skipped
    reason TEXT NOT NULL DEFAULT '',
    started_by TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    evidence_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX drills_by_start ON drills (started_at, id);
CREATE INDEX drills_by_plan ON drills (plan, started_at);
-- One running drill per plan, whatever broker or operator starts it.
CREATE UNIQUE INDEX drills_one_running ON drills (plan) WHERE state = 'running';
CREATE TABLE drill_schedules (
    plan TEXT PRIMARY KEY,
    every_seconds REAL NOT NULL,
    next_at REAL NOT NULL,
    set_by TEXT NOT NULL,
    updated_at REAL NOT NULL
);
