-- `firstcome-worker prune` deletes the ledger's rows by age, in small
-- batches; this index finds the oldest ones without reading the table.
-- On a large ledger in production, create it first by hand with
-- `CREATE INDEX CONCURRENTLY request_ledger_decided_at ON request_ledger
-- (decided_at)` (writes go on meanwhile); this migration then finds it and
-- does nothing. A plain CREATE INDEX here blocks writes to the table while it
-- builds (CONCURRENTLY cannot run under the migration lock).
CREATE INDEX IF NOT EXISTS request_ledger_decided_at ON request_ledger (decided_at);
