-- One follower per chain feeds several projections (the KMS mirror first). The checkpoint stays
-- per chain but no longer names the KMS contract; each projection's configuration identity is
-- kept beside it, and every stored event is tagged with the projection that uses it. Rows written
-- before this migration belong to the KMS mirror ('kms', identified by its contract address).
CREATE TABLE chain_projections (
    chain_id   BIGINT NOT NULL,
    projection TEXT NOT NULL,
    identity   BLOB NOT NULL,
    PRIMARY KEY (chain_id, projection)
);

INSERT INTO chain_projections (chain_id, projection, identity)
    SELECT chain_id, 'kms', kms_contract FROM chain_checkpoints;

-- SQLite cannot change a primary key in place: the table is copied.
CREATE TABLE chain_events_tagged (
    chain_id     BIGINT NOT NULL,
    projection   TEXT NOT NULL,
    block_number BIGINT NOT NULL,
    log_index    BIGINT NOT NULL,
    block_hash   BLOB NOT NULL,
    address      BLOB NOT NULL,
    kind         TEXT NOT NULL,
    topics       BLOB NOT NULL,
    data         BLOB NOT NULL,
    PRIMARY KEY (chain_id, projection, block_number, log_index)
);

INSERT INTO chain_events_tagged
    (chain_id, projection, block_number, log_index, block_hash, address, kind, topics, data)
    SELECT chain_id, 'kms', block_number, log_index, block_hash, address, kind, topics, data
    FROM chain_events;

DROP TABLE chain_events;

ALTER TABLE chain_events_tagged RENAME TO chain_events;

ALTER TABLE chain_checkpoints DROP COLUMN kms_contract;
