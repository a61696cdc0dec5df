-- The ledger: the durable record of a run (DESIGN.md §5). The transaction that records a step
-- is the commit point of that step.
--
-- One SQL text serves PostgreSQL and SQLite, so it sticks to what both understand: TEXT and
-- BIGINT columns, composite keys, CHECK constraints, partial indexes. Times are milliseconds
-- since the Unix epoch; JSON documents are stored as TEXT.

-- A training run and the configuration it was started with.
CREATE TABLE runs (
    run_id        TEXT   NOT NULL PRIMARY KEY,
    config        TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL,
    -- Touched by every step commit: the row lock it takes serialises step commits of a run.
    updated_at_ms BIGINT NOT NULL
);

-- Recorded optimizer steps. Steps of a run are recorded in order, without gaps.
CREATE TABLE steps (
    run_id         TEXT   NOT NULL REFERENCES runs (run_id),
    step           BIGINT NOT NULL CHECK (step >= 0),
    -- Object-store key of the step's batch manifest (written before this row).
    manifest_key   TEXT   NOT NULL,
    total_tokens   BIGINT NOT NULL CHECK (total_tokens >= 0),
    world_size     BIGINT NOT NULL CHECK (world_size > 0),
    min_version    BIGINT NOT NULL CHECK (min_version >= 0),
    max_version    BIGINT NOT NULL CHECK (max_version >= min_version),
    recorded_at_ms BIGINT NOT NULL,
    PRIMARY KEY (run_id, step)
);

-- Every prompt the run has seen: pending (accepted, neither trained nor dropped), trained in
-- exactly one step, or dropped with a reason. Never both trained and dropped.
CREATE TABLE prompts (
    run_id         TEXT   NOT NULL REFERENCES runs (run_id),
    prompt_id      TEXT   NOT NULL,
    -- The accepted prompt as JSON, kept so that a run can be rebuilt without Kafka or Redis.
    -- NULL for a prompt dropped without ever being accepted (for example malformed input).
    prompt         TEXT,
    recorded_at_ms BIGINT NOT NULL,
    trained_step   BIGINT,
    dropped_reason TEXT,
    dropped_detail TEXT,
    dropped_at_ms  BIGINT,
    PRIMARY KEY (run_id, prompt_id),
    FOREIGN KEY (run_id, trained_step) REFERENCES steps (run_id, step),
    CHECK (trained_step IS NULL OR dropped_reason IS NULL),
    CHECK ((dropped_reason IS NULL) = (dropped_at_ms IS NULL)),
    CHECK (prompt IS NOT NULL OR dropped_reason IS NOT NULL)
);

-- The prompts a step trained.
CREATE INDEX prompts_by_trained_step ON prompts (run_id, trained_step);

-- The pending prompts, in the order they were accepted (rebuilding after losing Redis).
CREATE INDEX prompts_pending ON prompts (run_id, recorded_at_ms)
    WHERE trained_step IS NULL AND dropped_reason IS NULL;

-- Checkpoints: weights and optimizer-state manifests taken after a recorded step.
CREATE TABLE checkpoints (
    run_id         TEXT   NOT NULL,
    step           BIGINT NOT NULL,
    weights_key    TEXT   NOT NULL,
    optimizer_key  TEXT   NOT NULL,
    recorded_at_ms BIGINT NOT NULL,
    PRIMARY KEY (run_id, step),
    FOREIGN KEY (run_id, step) REFERENCES steps (run_id, step)
);
