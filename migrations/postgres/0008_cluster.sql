-- Several replicas on one database: the leadership row whose epoch every singleton write checks
-- (fencing), and every replica's last report.
CREATE TABLE cluster_leader (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL,
    node_id TEXT NOT NULL,
    since BIGINT NOT NULL,
    beat BIGINT NOT NULL
);

CREATE TABLE cluster_nodes (
    node_id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    started BIGINT NOT NULL,
    beat BIGINT NOT NULL,
    api TEXT NOT NULL,
    processed_block BIGINT NOT NULL
);

-- A delivery being sent is claimed by the leadership term sending it; a later term takes over
-- a claim whose term ended (its leader died mid-send), so the alert is sent again, never lost.
ALTER TABLE alert_deliveries ADD COLUMN claimed_by TEXT;
ALTER TABLE alert_deliveries ADD COLUMN claimed_at BIGINT;
