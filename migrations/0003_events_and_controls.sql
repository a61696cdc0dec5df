-- Notes on a run that are not prompts or steps: a budget widened when a spent version could
-- complete no group, a purged trajectory regenerated, an entry left out of its step because
-- its data was unusable, an operator's control change. Each has a deterministic key, so a
-- replayed write records nothing twice.
CREATE TABLE events (
    run_id         TEXT   NOT NULL REFERENCES runs (run_id),
    event_key      TEXT   NOT NULL,
    kind           TEXT   NOT NULL,
    detail         TEXT   NOT NULL,
    recorded_at_ms BIGINT NOT NULL,
    PRIMARY KEY (run_id, event_key)
);

-- The operator's controls (the coordinator's admin API), kept here so that they survive a
-- restart and a failover: whether the run is paused, and Φ_r for the versions opened from now
-- on (NULL: the configured one).
ALTER TABLE runs ADD COLUMN paused BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN version_budget BIGINT;
