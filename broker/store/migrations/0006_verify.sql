-- Verification: the outcome of the last digest comparison of a replica with its source (when,
-- which sequence, how many bytes differed, whether they were repaired), for health and for the
-- verification schedule.
ALTER TABLE relationships ADD COLUMN verify_json TEXT NOT NULL DEFAULT '{}';
