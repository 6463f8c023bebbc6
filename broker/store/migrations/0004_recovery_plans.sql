-- Recovery plans: ordered groups of protected VMs with script and manual actions around them.
CREATE TABLE recovery_plans (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    doc_json TEXT NOT NULL,             -- {"groups": [{"vms": [...], "before": [...], "after": [...]}]}
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
