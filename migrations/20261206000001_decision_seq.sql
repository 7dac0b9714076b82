-- A decision's number in its coupon's sequence (the fence's `seq`), kept
-- with the decision: the decision stream (docs/decision-stream.md) carries
-- it, and a decision published again after a crash must carry the number it
-- was stored with, not the 0 a state rebuilt from Postgres hands out for a
-- decision it already holds. NULL for `failed` rows and for rows stored
-- before this column existed.
ALTER TABLE request_ledger ADD COLUMN decision_seq bigint;
