-- One row per CVM instance that received keys: first and last boot, boot count, and the
-- measurements of its latest boot.
CREATE TABLE boot_records (
    app_id        TEXT NOT NULL,
    instance_id   TEXT NOT NULL,
    first_boot    BIGINT NOT NULL,
    last_boot     BIGINT NOT NULL,
    boot_count    BIGINT NOT NULL,
    mr_aggregated TEXT NOT NULL,
    compose_hash  TEXT NOT NULL,
    os_image_hash TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    PRIMARY KEY (app_id, instance_id)
);

-- Every distinct measurement set served to an instance, and when it was last served: what
-- "in use" means when a governance proposal would remove a measurement.
CREATE TABLE served_measurements (
    app_id        TEXT NOT NULL,
    instance_id   TEXT NOT NULL,
    mr_aggregated TEXT NOT NULL,
    compose_hash  TEXT NOT NULL,
    os_image_hash TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    first_served  BIGINT NOT NULL,
    last_served   BIGINT NOT NULL,
    times_served  BIGINT NOT NULL,
    PRIMARY KEY (app_id, instance_id, mr_aggregated, compose_hash, os_image_hash, device_id)
);
CREATE INDEX served_measurements_last_served ON served_measurements (last_served);
