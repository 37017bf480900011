-- Chain mirror: raw logs of the watched contracts (plus synthetic rows such as observed code),
-- recent block hashes for reorg detection, and one checkpoint per chain. Every batch writes all
-- three in one transaction.
CREATE TABLE chain_events (
    chain_id     BIGINT NOT NULL,
    block_number BIGINT NOT NULL,
    log_index    BIGINT NOT NULL,
    block_hash   BYTEA NOT NULL,
    address      BYTEA NOT NULL,
    kind         TEXT NOT NULL,
    topics       BYTEA NOT NULL,
    data         BYTEA NOT NULL,
    PRIMARY KEY (chain_id, block_number, log_index)
);

CREATE TABLE chain_blocks (
    chain_id     BIGINT NOT NULL,
    block_number BIGINT NOT NULL,
    block_hash   BYTEA NOT NULL,
    timestamp    BIGINT NOT NULL,
    PRIMARY KEY (chain_id, block_number)
);

CREATE TABLE chain_checkpoints (
    chain_id        BIGINT PRIMARY KEY NOT NULL,
    kms_contract    BYTEA NOT NULL,
    start_block     BIGINT NOT NULL,
    processed_block BIGINT NOT NULL,
    head_block      BIGINT NOT NULL,
    head_seen_at    BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
