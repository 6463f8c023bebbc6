-- Failover: what the current or last failover of a relationship did, so it can be committed,
-- cancelled, resumed after a restart, and so a returning old primary can be fenced.
ALTER TABLE relationships ADD COLUMN failover_json TEXT NOT NULL DEFAULT '{}';
