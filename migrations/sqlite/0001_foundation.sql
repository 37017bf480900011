-- Node identity and other small facts that must survive restarts.
CREATE TABLE meta (
    key        TEXT PRIMARY KEY NOT NULL,
    value      TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- One row per process start; stopped_at stays NULL when a run did not shut down cleanly.
CREATE TABLE service_runs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at BIGINT NOT NULL,
    stopped_at BIGINT,
    version    TEXT NOT NULL,
    git_sha    TEXT NOT NULL
);

-- Security-relevant events, append-only.
CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
