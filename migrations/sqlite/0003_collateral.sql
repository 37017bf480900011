-- TDX collateral (TCB info, QE identity, CRLs) per FMSPC and PCK CA, refreshed ahead of nextUpdate.
CREATE TABLE collateral_cache (
    fmspc       TEXT NOT NULL,
    ca          TEXT NOT NULL,
    body        TEXT NOT NULL,
    next_update BIGINT NOT NULL,
    fetched_at  BIGINT NOT NULL,
    PRIMARY KEY (fmspc, ca)
);
