-- Each replica's runs apart: "did the previous run stop cleanly" is a question about the same
-- replica's previous run, not another replica's that is still running.
ALTER TABLE service_runs ADD COLUMN replica TEXT NOT NULL DEFAULT '';
