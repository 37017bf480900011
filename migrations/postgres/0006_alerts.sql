-- Alerts (the alerts module): every transition of an alerted subject is recorded once, and its
-- delivery to each configured channel is a row of the outbox until delivered. Recording a
-- transition and queueing its deliveries happen in one transaction, so a restart neither sends a
-- transition twice nor forgets one.
CREATE TABLE alert_transitions (
    alert_key   TEXT NOT NULL,
    transition  TEXT NOT NULL,
    recorded_at BIGINT NOT NULL,
    -- Recording order: deliveries go out in it.
    seq         BIGINT NOT NULL,
    PRIMARY KEY (alert_key, transition)
);

CREATE TABLE alert_deliveries (
    alert_key       TEXT NOT NULL,
    transition      TEXT NOT NULL,
    channel         TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    alert           TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    delivered_at    BIGINT,
    last_error      TEXT,
    PRIMARY KEY (alert_key, transition, channel)
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (delivered_at, next_attempt_at);

-- What Alertmanager must keep seeing: each firing alert is re-posted until it is resolved.
CREATE TABLE alert_firing (
    alert_key   TEXT PRIMARY KEY NOT NULL,
    alert       TEXT NOT NULL,
    starts_at   BIGINT NOT NULL,
    ends_at     BIGINT
);
