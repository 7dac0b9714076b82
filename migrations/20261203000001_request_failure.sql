-- The last record of an accepted request whose `failed` ledger row Postgres
-- refused too (a request that got a 202 must never later be unknown): the
-- record as it was in the log, byte for byte, with no constraint that its
-- content could break. A status lookup that finds no ledger row answers
-- `failed` from here.
CREATE TABLE request_failure (
    request_id uuid PRIMARY KEY,
    failed_at  timestamptz NOT NULL,
    record     bytea NOT NULL,
    reason     text NOT NULL
);
