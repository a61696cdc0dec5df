-- Leader fencing in the ledger (DESIGN.md §6.1): the highest leader-lock fencing token that has
-- written to a run. A step commit or a drop carrying a lower token comes from a deposed leader
-- and is rejected in the same transaction. 0 until the first leader write.
ALTER TABLE runs ADD COLUMN leader_token BIGINT NOT NULL DEFAULT 0 CHECK (leader_token >= 0);
