-- One follower per chain feeds several projections (the KMS mirror first). The checkpoint stays
-- per chain but no longer names the KMS contract; each projection's configuration identity is
-- kept beside it, and every stored event is tagged with the projection that uses it. Rows written
-- before this migration belong to the KMS mirror ('kms', identified by its contract address).
CREATE TABLE chain_projections (
    chain_id   BIGINT NOT NULL,
    projection TEXT NOT NULL,
    identity   BYTEA NOT NULL,
    PRIMARY KEY (chain_id, projection)
);

INSERT INTO chain_projections (chain_id, projection, identity)
    SELECT chain_id, 'kms', kms_contract FROM chain_checkpoints;

ALTER TABLE chain_events ADD COLUMN projection TEXT NOT NULL DEFAULT 'kms';
ALTER TABLE chain_events ALTER COLUMN projection DROP DEFAULT;
ALTER TABLE chain_events DROP CONSTRAINT chain_events_pkey;
ALTER TABLE chain_events ADD PRIMARY KEY (chain_id, projection, block_number, log_index);

ALTER TABLE chain_checkpoints DROP COLUMN kms_contract;
