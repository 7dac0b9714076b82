-- A request whose decision could not be stored (a Postgres error that waiting
-- does not fix) ends as `failed`: dead-lettered, its Redis decision undone.
ALTER TABLE request_ledger DROP CONSTRAINT request_ledger_status_check;
ALTER TABLE request_ledger ADD CONSTRAINT request_ledger_status_check
    CHECK (status IN ('issued', 'duplicate', 'sold_out', 'not_open', 'failed'));
