-- Protection management: the inventory in tables, clouds, cloud pairs with their policy,
-- network and storage mappings, and replication relationships (protected VMs).

CREATE TABLE vms (
    server_id TEXT NOT NULL REFERENCES servers (id),
    vm_id TEXT NOT NULL,
    name TEXT NOT NULL,
    generation INTEGER NOT NULL,
    cpu_count INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    state TEXT NOT NULL,
    disks_json TEXT NOT NULL,           -- [{id, path, format, virtual_size, storage_class, file_size}]
    nics_json TEXT NOT NULL,            -- [{name, network, mac}]
    updated_at REAL NOT NULL,
    PRIMARY KEY (server_id, vm_id)
);
CREATE INDEX vms_id ON vms (vm_id);

CREATE TABLE host_networks (
    server_id TEXT NOT NULL REFERENCES servers (id),
    name TEXT NOT NULL,
    subnets_json TEXT NOT NULL,
    PRIMARY KEY (server_id, name)
);

CREATE TABLE host_storage (
    server_id TEXT NOT NULL REFERENCES servers (id),
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    total_bytes INTEGER NOT NULL,
    free_bytes INTEGER NOT NULL,
    PRIMARY KEY (server_id, name)
);

CREATE TABLE clouds (
    name TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);

CREATE TABLE cloud_hosts (
    server_id TEXT PRIMARY KEY REFERENCES servers (id),  -- a host is in one cloud at most
    cloud TEXT NOT NULL REFERENCES clouds (name),
    added_at REAL NOT NULL
);

CREATE TABLE cloud_pairs (
    primary_cloud TEXT PRIMARY KEY REFERENCES clouds (name),
    recovery_cloud TEXT NOT NULL UNIQUE REFERENCES clouds (name),
    policy_json TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);

CREATE TABLE network_mappings (
    source_network TEXT PRIMARY KEY,
    target_network TEXT NOT NULL,
    created_at REAL NOT NULL
);

CREATE TABLE storage_mappings (
    source_class TEXT PRIMARY KEY,
    target_class TEXT NOT NULL,
    created_at REAL NOT NULL
);

CREATE TABLE relationships (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    vm_name TEXT NOT NULL,
    primary_cloud TEXT NOT NULL,
    recovery_cloud TEXT NOT NULL,
    primary_server TEXT NOT NULL,       -- the host the VM runs on now
    replica_server TEXT NOT NULL,       -- the host holding its replica now
    state TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    policy_json TEXT NOT NULL,
    replica_folder TEXT NOT NULL DEFAULT '',
    replica_vm_json TEXT NOT NULL DEFAULT '{}',
    primary_status_json TEXT NOT NULL DEFAULT '{}',
    replica_status_json TEXT NOT NULL DEFAULT '{}',
    health TEXT NOT NULL DEFAULT 'normal',
    health_reasons_json TEXT NOT NULL DEFAULT '[]',
    paused INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    disabled_at REAL
);
CREATE UNIQUE INDEX relationships_active_vm ON relationships (vm_id) WHERE disabled_at IS NULL;
